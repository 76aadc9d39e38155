//! What a guest observed (`guest-results.json` on the run share) and how it
//! compares with a spec's expectations.

use crate::protocol::StepOutcome;
use crate::spec::Scenario;
use crate::{Flavor, Fs};
use serde::{Deserialize, Serialize};

/// Everything one boot's runner wrote.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BootResults {
    /// `uname -r` in the guest.
    pub kernel: String,
    /// Guest setup steps (namespaces, mkfs, mount, DAX check, rxe), in order.
    pub setup: Vec<StepResult>,
    /// One entry per planned scenario, in plan order.
    pub scenarios: Vec<ScenarioResult>,
    /// Guest uptime when the runner started, in milliseconds.
    pub runner_start_ms: u64,
    /// The filesystem check after the last scenario (`e2fsck -fn` / `xfs_repair -n`
    /// on the unmounted filesystem); `None` if the runner did not get there.
    #[serde(default)]
    pub fsck: Option<StepResult>,
    /// kselftest results, one per TAP test line (and one per program that
    /// did not run or exited with a failure).
    #[serde(default)]
    pub selftests: Vec<SelftestResult>,
    /// What `cargo xtask bench` asked the guest to measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bench: Option<crate::bench::BenchResults>,
}

/// A scenario as run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The scenario id.
    pub id: String,
    /// One per planned step, in order; steps after a stop are [`StepOutcome::NotRun`].
    pub steps: Vec<StepResult>,
    /// Wall time of the whole scenario.
    pub ms: f64,
    /// Set when the runner could not bring the lab back to a clean state
    /// after the scenario (a pin survived, a process did not exit, …).
    #[serde(default)]
    pub isolation: Option<String>,
}

/// A step as run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// The step's name.
    pub name: String,
    /// How it ended.
    pub outcome: StepOutcome,
    /// What the kernel said and what was observed, for people.
    #[serde(default)]
    pub detail: String,
    /// Wall time of the step.
    #[serde(default)]
    pub ms: f64,
    /// What a `locate` step found: blocks carrying the client's pattern, by
    /// owning file (`free` when no file owns them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// What a `locate` step saw, block by block (and, added by the host, what
    /// the host's own scan of the NVDIMM found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub located: Option<Located>,
}

/// A run of 4 KiB blocks on the fsdax block device, `[start, len]` in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
pub struct Run {
    /// The first block (block 0 is the device's first 4 KiB).
    pub start: u64,
    /// How many blocks.
    pub len: u64,
}

impl From<[u64; 2]> for Run {
    fn from([start, len]: [u64; 2]) -> Self {
        Run { start, len }
    }
}

impl From<Run> for [u64; 2] {
    fn from(r: Run) -> Self {
        [r.start, r.len]
    }
}

impl Run {
    /// The block after the run.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Sorted block numbers as runs.
pub fn runs_of(blocks: impl IntoIterator<Item = u64>) -> Vec<Run> {
    let mut v: Vec<u64> = blocks.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<Run> = Vec::new();
    for b in v {
        match out.last_mut() {
            Some(r) if r.end() == b => r.len += 1,
            _ => out.push(Run { start: b, len: 1 }),
        }
    }
    out
}

/// How many blocks the runs cover.
pub fn blocks_in(runs: &[Run]) -> u64 {
    runs.iter().map(|r| r.len).sum()
}

/// What a `locate` step saw on the fsdax namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Located {
    /// The block device read raw, e.g. `/dev/pmem0`.
    pub device: String,
    /// Its size in bytes.
    pub device_bytes: u64,
    /// Where the device's byte 0 is in the NVDIMM (the host's backing file):
    /// the fsdax namespace's data offset in its region, from sysfs. `None`
    /// when sysfs did not say (then the host cannot check).
    pub nvdimm_offset: Option<u64>,
    /// The scenario's pattern seed.
    pub seed: u64,
    /// The client's region, in blocks.
    pub region_blocks: u64,
    /// The device blocks that carry one of the region's pattern blocks.
    pub nic: Vec<Run>,
    /// Every file on the mount and its device blocks (FIEMAP).
    pub owners: std::collections::BTreeMap<String, Vec<Run>>,
    /// What the host found in the NVDIMM backing file while the guest
    /// waited (filled in by the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostScan>,
}

/// The host's own search of the NVDIMM backing file for a `locate` step's
/// pattern, made while the guest waited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostScan {
    /// The device blocks (translated with [`Located::nvdimm_offset`]) that
    /// carry one of the region's pattern blocks.
    pub nic: Vec<Run>,
    /// Bytes of the backing file read.
    pub scanned_bytes: u64,
    /// How long the scan took.
    pub ms: f64,
    /// Why the host could not scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Located {
    /// The device block → owning file, `free` when none.
    pub fn owner_of(&self, block: u64) -> &str {
        self.owners
            .iter()
            .find(|(_, runs)| runs.iter().any(|r| r.start <= block && block < r.end()))
            .map(|(n, _)| n.as_str())
            .unwrap_or("free")
    }

    /// The guest's blocks by owner.
    pub fn placement(&self) -> Placement {
        placement_of(self, &self.nic)
    }

    /// Whether the host saw the same blocks; `Err` says how they differ.
    pub fn host_agrees(&self) -> Result<(), String> {
        let Some(off) = self.nvdimm_offset else {
            return Err(
                "the guest could not tell where the namespace sits in the NVDIMM, so the host could not look".into()
            );
        };
        let Some(h) = &self.host else {
            return Err(format!("the host did not scan the NVDIMM (data offset {off:#x})"));
        };
        if let Some(e) = &h.error {
            return Err(format!("the host's scan failed: {e}"));
        }
        if h.nic == self.nic {
            Ok(())
        } else {
            Err(format!(
                "the guest found {} ({} blocks), the host's scan of the NVDIMM found {} ({} blocks)",
                placement_text(&self.placement()),
                blocks_in(&self.nic),
                placement_text(&placement_of(self, &h.nic)),
                blocks_in(&h.nic)
            ))
        }
    }
}

/// `runs` by owning file, as `located`'s owners say.
pub fn placement_of(located: &Located, runs: &[Run]) -> Placement {
    let mut p = Placement::new();
    for r in runs {
        for b in r.start..r.end() {
            *p.entry(located.owner_of(b).to_string()).or_default() += 1;
        }
    }
    p
}

/// How one kselftest test ended (its TAP line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TapOutcome {
    /// `ok N name`.
    Ok,
    /// `ok N name # SKIP why`.
    Skip,
    /// `not ok N name`, or a program that could not run or exited with a failure.
    Fail,
}

impl TapOutcome {
    /// `ok`, `skip`, `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            TapOutcome::Ok => "ok",
            TapOutcome::Skip => "skip",
            TapOutcome::Fail => "fail",
        }
    }
}

/// One kselftest result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelftestResult {
    /// The program (its file name).
    pub program: String,
    /// The test's name from its TAP line; empty for the program as a whole.
    pub test: String,
    /// How it ended.
    pub outcome: TapOutcome,
    /// The TAP directive (`SKIP …`), or why the program failed.
    #[serde(default)]
    pub detail: String,
}

impl SelftestResult {
    /// `program: test`, or `program` for the program as a whole.
    pub fn label(&self) -> String {
        if self.test.is_empty() {
            self.program.clone()
        } else {
            format!("{}: {}", self.program, self.test)
        }
    }
}

/// The results of one kselftest program: one per TAP test line, plus a
/// failure for the program itself if it printed no test line or its exit
/// code is neither 0 (pass) nor 4 (`KSFT_SKIP`, everything skipped).
pub fn parse_tap(program: &str, stdout: &str, exit_code: Option<i32>, stderr: &str) -> Vec<SelftestResult> {
    let mut out = Vec::new();
    for line in stdout.lines() {
        let (ok, rest) = if let Some(r) = line.strip_prefix("not ok ") {
            (false, r)
        } else if let Some(r) = line.strip_prefix("ok ") {
            (true, r)
        } else {
            continue;
        };
        // `N name # DIRECTIVE`; the number is optional in TAP.
        let rest = match rest.split_once(' ') {
            Some((n, t)) if n.chars().all(|c| c.is_ascii_digit()) => t,
            _ if rest.chars().all(|c| c.is_ascii_digit()) => "",
            _ => rest,
        };
        let (test, directive) = rest.split_once(" # ").unwrap_or((rest, ""));
        let outcome = match (ok, directive.trim_start().to_uppercase().starts_with("SKIP")) {
            (true, true) => TapOutcome::Skip,
            (true, false) => TapOutcome::Ok,
            (false, _) => TapOutcome::Fail,
        };
        out.push(SelftestResult {
            program: program.to_string(),
            test: test.trim().to_string(),
            outcome,
            detail: directive.trim().to_string(),
        });
    }
    let n = out.len();
    if n == 0 || !matches!(exit_code, Some(0) | Some(4)) {
        let code = exit_code.map(|c| c.to_string()).unwrap_or_else(|| "killed by a signal".into());
        out.push(SelftestResult {
            program: program.to_string(),
            test: String::new(),
            outcome: TapOutcome::Fail,
            detail: format!("exit {code}; {n} TAP test lines; {}", stderr.trim()),
        });
    }
    out
}

/// One step, expected vs actual.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepCheck {
    /// The step's name.
    pub name: String,
    /// Expected outcome, or [`StepOutcome::NotRun`] after a stop.
    pub expected: StepOutcome,
    /// What the guest observed ([`StepOutcome::Missing`] if nothing).
    pub actual: StepOutcome,
    /// The guest's detail text.
    pub detail: String,
    /// Whether they agree.
    pub pass: bool,
    /// Wall time.
    pub ms: f64,
    /// The spec marks this step as the scenario's headline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headline: bool,
    /// The step is a probe: it observes and the scenario goes on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe: bool,
    /// For a `locate` step: where the spec says the pattern's blocks must be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_placement: Option<Placement>,
    /// For a `locate` step: where the guest found them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// For a `locate` step: the blocks, their owners and the host's view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub located: Option<Located>,
}

/// Blocks carrying a pattern, by owning file (`free`: no file owns them).
pub type Placement = std::collections::BTreeMap<String, u64>;

/// Whether `got` is where `want` says: every file `want` names holds exactly
/// that many pattern blocks and no other file holds any. Free blocks are
/// checked only where `want` names `free`: within one scenario, blocks the
/// scenario itself freed (a truncate that went through, S19 on hazard) may
/// still carry its pattern, and the spec says so where it matters.
/// An empty `want` (`{}`) means nowhere at all, free blocks included: the
/// region was never on the namespace.
pub fn placed_as(got: &Placement, want: &Placement) -> bool {
    // An empty placement says the pattern is nowhere on the namespace
    // (anonymous memory): not even in free blocks.
    let checks_free = want.is_empty() || want.contains_key("free");
    want.iter().all(|(f, n)| got.get(f) == Some(n))
        && got.keys().all(|f| want.contains_key(f) || (f == "free" && !checks_free))
}

/// `victim.dat: 512 blocks, free: 0`.
pub fn placement_text(p: &Placement) -> String {
    if p.is_empty() {
        return "nowhere".into();
    }
    p.iter().map(|(f, n)| format!("{f}: {n} blocks")).collect::<Vec<_>>().join(", ")
}

/// One cell of the matrix: a scenario on one flavor and filesystem.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    /// Scenario id.
    pub scenario: String,
    /// Kernel flavor.
    pub flavor: Flavor,
    /// Filesystem of the boot it ran in.
    pub fs: Fs,
    /// Every step agreed.
    pub pass: bool,
    /// Per step.
    pub steps: Vec<StepCheck>,
    /// Wall time of the scenario.
    pub ms: f64,
    /// The runner's isolation check failed (see [`ScenarioResult::isolation`]).
    #[serde(default)]
    pub isolation: Option<String>,
    /// The cell never ran because its boot failed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
}

impl CellResult {
    /// The first disagreeing step, or else the step that decided the outcome
    /// (the last one that ran), as `expected → actual` text for tables.
    pub fn headline(&self) -> String {
        if let Some(why) = &self.not_run {
            return format!("not run: {why}");
        }
        let s = self.steps.iter().find(|s| !s.pass).or_else(|| self.steps.iter().rev().find(|s| s.actual.ran()));
        match s {
            Some(s) if s.pass => format!("{}: {}", s.name, s.actual),
            Some(s) if s.expected == s.actual => format!(
                "{}: the pattern should be in {}, found in {}",
                s.name,
                s.expected_placement.as_ref().map(placement_text).unwrap_or_default(),
                s.placement.as_ref().map(placement_text).unwrap_or_else(|| "nothing reported".into())
            ),
            Some(s) => format!("{}: expected {}, got {}", s.name, s.expected, s.actual),
            None => "no steps".into(),
        }
    }

    /// The expected counterpart of [`CellResult::verdict`].
    pub fn expected_verdict(&self) -> StepOutcome {
        if let Some(h) = self.steps.iter().find(|s| s.headline && s.expected.ran()) {
            return h.expected.clone();
        }
        // The step that stops the scenario, else the first failing probe.
        let failing = |s: &&StepCheck| s.expected.ran() && !s.expected.is_ok();
        self.steps
            .iter()
            .filter(failing)
            .find(|s| !s.probe)
            .or_else(|| self.steps.iter().find(failing))
            .map(|s| s.expected.clone())
            .unwrap_or(StepOutcome::Ok)
    }

    /// The errno that ends or characterises the run: the first non-ok actual
    /// outcome among executed steps, else `ok`.
    pub fn verdict(&self) -> StepOutcome {
        if self.not_run.is_some() {
            return StepOutcome::NotRun;
        }
        if let Some(h) = self.steps.iter().find(|s| s.headline && s.expected.ran()) {
            return h.actual.clone();
        }
        // The step that stops the scenario, else the first failing probe.
        let failing = |s: &&StepCheck| s.actual.ran() && !s.actual.is_ok();
        self.steps
            .iter()
            .filter(failing)
            .find(|s| !s.probe)
            .or_else(|| self.steps.iter().find(failing))
            .map(|s| s.actual.clone())
            .unwrap_or(StepOutcome::Ok)
    }
}

/// Compare a scenario's results with its spec for one cell. A missing
/// result (the guest crashed or skipped it) fails every step.
pub fn check(spec: &Scenario, flavor: Flavor, fs: Fs, got: Option<&ScenarioResult>) -> CellResult {
    let expected = spec.expected(flavor, fs);
    let mut steps = Vec::new();
    for (i, (step, exp)) in spec.steps.iter().zip(expected).enumerate() {
        let exp = exp.as_ref().map(StepOutcome::from).unwrap_or(StepOutcome::NotRun);
        let (actual, mut detail, ms, placement, located) = match got.and_then(|g| g.steps.get(i)) {
            Some(r) => (r.outcome.clone(), r.detail.clone(), r.ms, r.placement.clone(), r.located.clone()),
            None => (StepOutcome::Missing, "the guest reported no result for this step".to_string(), 0.0, None, None),
        };
        // Where the guest saw the NIC's bytes must be where the host sees them.
        let agrees = match &located {
            Some(l) => l.host_agrees().map_err(|e| detail.push_str(&format!("; HOST DISAGREES: {e}"))).is_ok(),
            None => true,
        };
        let expected_placement = step.placement_for(flavor, fs).cloned();
        // A locate step checks where the bytes are, not only that it ran.
        let placed = match &expected_placement {
            Some(want) => actual != StepOutcome::Ok || placement.as_ref().is_some_and(|got| placed_as(got, want)),
            None => true,
        };
        steps.push(StepCheck {
            name: step.name.clone(),
            pass: actual == exp && placed && agrees,
            expected: exp,
            actual,
            detail,
            ms,
            expected_placement,
            placement,
            located,
            headline: step.headline,
            probe: step.probe,
        });
    }
    CellResult {
        scenario: spec.id.clone(),
        flavor,
        fs,
        pass: got.is_some_and(|g| g.isolation.is_none()) && steps.iter().all(|s| s.pass),
        steps,
        ms: got.map(|g| g.ms).unwrap_or(0.0),
        isolation: got.and_then(|g| g.isolation.clone()),
        not_run: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse;
    use StepOutcome::{NotRun, Ok as OK};

    fn e(n: &str) -> StepOutcome {
        StepOutcome::Errno(n.into())
    }
    use std::path::Path;

    fn spec() -> Scenario {
        parse(
            "id: S02\ntitle: t\nshows: s\nsteps:\n  - name: map\n    action: {map: {target: file}}\n    expect: ok\n  \
             - name: reg\n    action: reg_mr\n    expect: {stock: EOPNOTSUPP, patched: ok, hazard: ok}\n  \
             - name: verify\n    action: verify\n    expect: {patched: ok, hazard: ok}\n",
            Path::new("S02-t.yaml"),
        )
        .unwrap()
    }

    fn res(outcomes: &[StepOutcome]) -> ScenarioResult {
        ScenarioResult {
            id: "S02".into(),
            steps: outcomes
                .iter()
                .map(|o| StepResult {
                    name: "x".into(),
                    outcome: o.clone(),
                    detail: String::new(),
                    ms: 1.0,
                    placement: None,
                    located: None,
                })
                .collect(),
            ms: 3.0,
            isolation: None,
        }
    }

    #[test]
    fn stop_matches_not_run() {
        let c = check(&spec(), Flavor::Stock, Fs::Ext4, Some(&res(&[OK, e("EOPNOTSUPP"), NotRun])));
        assert!(c.pass, "{c:?}");
        assert_eq!(c.verdict(), e("EOPNOTSUPP"));
    }

    #[test]
    fn wrong_errno_fails() {
        let c = check(&spec(), Flavor::Stock, Fs::Ext4, Some(&res(&[OK, e("EPERM"), NotRun])));
        assert!(!c.pass);
        assert_eq!(c.headline(), "reg: expected EOPNOTSUPP, got EPERM");
    }

    #[test]
    fn failed_isolation_fails_the_cell() {
        let mut r = res(&[OK, e("EOPNOTSUPP"), NotRun]);
        r.isolation = Some("pid 12 still pins".into());
        let c = check(&spec(), Flavor::Stock, Fs::Ext4, Some(&r));
        assert!(!c.pass);
    }

    #[test]
    fn missing_results_fail() {
        let c = check(&spec(), Flavor::Patched, Fs::Xfs, None);
        assert!(!c.pass);
        let short = check(&spec(), Flavor::Patched, Fs::Xfs, Some(&res(&[OK])));
        assert!(!short.pass);
        assert_eq!(short.steps[1].actual, StepOutcome::Missing);
    }

    #[test]
    fn placement_checks_files_exactly_and_free_blocks_where_named() {
        let p = |v: &[(&str, u64)]| v.iter().map(|(f, n)| (f.to_string(), *n)).collect::<Placement>();
        assert!(placed_as(&p(&[("S20.dat", 512)]), &p(&[("S20.dat", 512)])));
        // A leftover of an earlier scenario in free space is not this NIC's.
        assert!(placed_as(&p(&[("S20.dat", 512), ("free", 1)]), &p(&[("S20.dat", 512)])));
        assert!(!placed_as(&p(&[("S20.dat", 511), ("victim.dat", 1)]), &p(&[("S20.dat", 512)])));
        assert!(!placed_as(&p(&[("victim.dat", 512)]), &p(&[("S20.dat", 512)])));
        assert!(placed_as(&p(&[("free", 512)]), &p(&[("free", 512)])));
        assert!(!placed_as(&p(&[("free", 513)]), &p(&[("free", 512)])));
        // `{}`: nowhere, not even in free space (anonymous memory).
        assert!(placed_as(&p(&[]), &p(&[])));
        assert!(!placed_as(&p(&[("free", 1)]), &p(&[])));
        assert!(!placed_as(&p(&[("S01.dat", 1)]), &p(&[])));
    }

    #[test]
    fn tap() {
        let out = "TAP version 13\n1..4\nok 1 lease_then_pin\nnot ok 2 pin_without_lease\n\
                   ok 3 dax_only # SKIP not a DAX mount\nok 4\n# Totals: pass:2 fail:1\n";
        let r = parse_tap("layout_lease", out, Some(1), "boom");
        let got: Vec<(&str, TapOutcome, &str)> =
            r.iter().map(|t| (t.test.as_str(), t.outcome, t.detail.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("lease_then_pin", TapOutcome::Ok, ""),
                ("pin_without_lease", TapOutcome::Fail, ""),
                ("dax_only", TapOutcome::Skip, "SKIP not a DAX mount"),
                ("", TapOutcome::Ok, ""),
                ("", TapOutcome::Fail, "exit 1; 4 TAP test lines; boom"),
            ]
        );
        assert_eq!(r[0].label(), "layout_lease: lease_then_pin");
        let skipped = parse_tap("x", "ok 1 a # SKIP no\n", Some(4), "");
        assert_eq!(skipped.len(), 1);
        assert_eq!(parse_tap("x", "", Some(0), "")[0].outcome, TapOutcome::Fail);
        assert!(parse_tap("x", "ok 1 a\n", None, "")[1].detail.contains("signal"));
    }
}
