//! Judging a boot, in one place: how it ended, kernel splats, missing
//! results, selftests, the filesystem check, and every cell's expectations.
//! [`crate::vm`] only reports what happened; this module says whether that
//! is what the specs expect.

use crate::console::{Splat, SplatKind};
use crate::report::{step_line, BootRecord, NoticedSplat};
use crate::vm::{Boot, BootEnd};
use anyhow::{Context, Result};
use pinlab_scenarios::protocol::StepOutcome;
use pinlab_scenarios::results::{self, BootResults, CellResult, TapOutcome};
use pinlab_scenarios::spec::Scenario;
use pinlab_scenarios::{Flavor, Fs};
use serde::Deserialize;
use std::path::Path;

/// Why a boot as a whole failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// For people: what, where the guest was, the console's last lines.
    pub text: String,
    /// pinlab's or the host's fault (a deadline, QEMU, missing results,
    /// guest set-up), not the kernel's answer.
    pub infra: bool,
}

/// Whether the boot itself went wrong, whatever the cells say. Splats are
/// judged separately ([`splats_fail`]).
pub fn boot_problem(boot: &Boot) -> Option<Problem> {
    let console = boot.console.display();
    let last_lines = || boot.tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    if let Some(what) = boot.end.describe() {
        let killed =
            matches!(boot.end, BootEnd::BootDeadline { .. } | BootEnd::RunDeadline { .. } | BootEnd::KernelHang { .. });
        let text = match &boot.end {
            BootEnd::QemuFailed { .. } => format!("{what}; the guest was in {}. Console: {console}", boot.during),
            _ => format!(
                "{what}; {}the guest was in {}. Console: {console}; it last printed:\n{}",
                if killed { "QEMU killed while " } else { "" },
                boot.during,
                last_lines()
            ),
        };
        return Some(Problem { text, infra: boot.end.is_infra() });
    }
    let r = match &boot.results {
        Err(e) => return Some(Problem { text: format!("{e}; console: {console}"), infra: true }),
        Ok(None) => {
            return Some(Problem {
                text: format!("the guest wrote no {}; console: {console}", pinlab_scenarios::protocol::RESULTS_FILE),
                infra: true,
            })
        }
        Ok(Some(r)) => r,
    };
    results_problem(r, &console.to_string())
}

/// What is wrong in a completed boot's results: failed selftests, a dirty
/// filesystem, a failed guest set-up, a missing filesystem check.
fn results_problem(r: &BootResults, console: &str) -> Option<Problem> {
    let failed: Vec<String> = r
        .selftests
        .iter()
        .filter(|t| t.outcome == TapOutcome::Fail)
        .map(|t| format!("{} ({})", t.label(), t.detail))
        .collect();
    if !failed.is_empty() {
        return Some(Problem { text: format!("selftests failed: {}", failed.join("; ")), infra: false });
    }
    let failed_setup: Vec<String> = r.setup.iter().filter(|s| !s.outcome.is_ok()).map(step_line).collect();
    match &r.fsck {
        Some(f) if f.outcome.is_ok() => None,
        Some(f) => Some(Problem {
            text: format!("filesystem check failed: {}: {} {}", f.name, f.outcome, f.detail),
            infra: false,
        }),
        None if !failed_setup.is_empty() => {
            Some(Problem { text: format!("guest setup failed: {}", failed_setup.join("; ")), infra: true })
        }
        None => Some(Problem {
            text: format!("the runner did not check the filesystem at the end; console: {console}"),
            infra: true,
        }),
    }
}

/// A splat a flavor is expected to print in a scenario (`tests/expected-splats.yaml`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedSplat {
    /// The flavor.
    pub flavor: Flavor,
    /// The scenario that provokes it, or a list of scenarios that each
    /// provoke a splat the kernel prints once per boot (`WARN_ON_ONCE`): it
    /// appears in the first of them the boot runs, and must appear in one
    /// of them if any ran.
    pub scenario: OneOrMany,
    /// Its kind.
    pub kind: SplatKind,
    /// A regular expression its console line matches.
    pub matches: String,
    /// Why, for the report.
    pub reason: String,
}

/// A scenario id, or a list of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::One(s) => Ok(OneOrMany(vec![s])),
            Raw::Many(v) if v.is_empty() => Err(serde::de::Error::custom("an empty list of scenarios")),
            Raw::Many(v) => Ok(OneOrMany(v)),
        }
    }
}

impl OneOrMany {
    fn contains(&self, id: &str) -> bool {
        self.0.iter().any(|s| s == id)
    }
}

impl std::fmt::Display for OneOrMany {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(" or "))
    }
}

/// The expected splats, their expressions compiled.
#[derive(Clone, Debug, Default)]
pub struct SplatAllowList(Vec<(ExpectedSplat, regex::Regex)>);

impl SplatAllowList {
    /// Read `tests/expected-splats.yaml`.
    pub fn load() -> Result<SplatAllowList> {
        let p = crate::util::project_root().join("tests/expected-splats.yaml");
        let text = fs_err::read_to_string(&p)?;
        Self::parse(&text).with_context(|| format!("{} is malformed", p.display()))
    }

    /// Parse the YAML list.
    pub fn parse(text: &str) -> Result<SplatAllowList> {
        let list: Vec<ExpectedSplat> = pinlab_scenarios::spec::parse_yaml(text)?;
        let mut out = Vec::new();
        for (i, e) in list.into_iter().enumerate() {
            let re = regex::Regex::new(&e.matches).with_context(|| {
                format!("entry {} ({} {}): bad expression '{}'", i + 1, e.flavor, e.scenario, e.matches)
            })?;
            out.push((e, re));
        }
        Ok(SplatAllowList(out))
    }
}

/// A boot's splats sorted out: the ones expected (with their reason), the
/// unexpected ones, and the expected ones that did not appear.
#[derive(Debug, Default)]
pub struct Splats {
    /// Expected for this flavor and scenario.
    pub noticed: Vec<NoticedSplat>,
    /// Anything else: fails the boot.
    pub unexpected: Vec<Splat>,
    /// Expected here (its scenario ran) but not printed: fails the boot.
    pub missing: Vec<String>,
}

/// Sort `boot`'s splats for `flavor`, given the scenarios this boot ran.
pub fn sort_splats(boot: &Boot, flavor: Flavor, ran: &[&str], allow: &SplatAllowList) -> Splats {
    let mut out = Splats::default();
    let mut seen = vec![false; allow.0.len()];
    for sp in &boot.splats {
        let hit = allow.0.iter().position(|(e, re)| {
            e.flavor == flavor
                && e.kind == sp.kind
                && sp.scenario.as_deref().is_some_and(|id| e.scenario.contains(id))
                && re.is_match(&sp.text)
        });
        match hit {
            Some(i) => {
                seen[i] = true;
                out.noticed.push(NoticedSplat { splat: sp.clone(), reason: allow.0[i].0.reason.clone() });
            }
            None => out.unexpected.push(sp.clone()),
        }
    }
    for (i, (e, _)) in allow.0.iter().enumerate() {
        if e.flavor == flavor && ran.iter().any(|id| e.scenario.contains(id)) && !seen[i] {
            out.missing.push(format!(
                "the {} kernel was expected to print a {} matching '{}' in {} ({}), and did not",
                e.flavor, e.kind, e.matches, e.scenario, e.reason
            ));
        }
    }
    out
}

/// Whether the kernel's splats fail a boot that runs no scenario (bench):
/// any splat does.
pub fn splats_fail(boot: &Boot, _flavor: Flavor) -> bool {
    !boot.splats.is_empty()
}

/// Judge one boot of a run: a cell per scenario it ran, and its record.
#[allow(clippy::too_many_arguments)]
pub fn judge(
    boot: &Boot,
    scenarios: &[&Scenario],
    flavor: Flavor,
    fs: Fs,
    kernel_key: &str,
    run_dir: &Path,
    allow: &SplatAllowList,
) -> (Vec<CellResult>, BootRecord) {
    let ran: Vec<&str> = scenarios.iter().map(|s| s.id.as_str()).collect();
    let splats = sort_splats(boot, flavor, &ran, allow);
    let mut problem = boot_problem(boot);
    if problem.is_none() && !splats.missing.is_empty() {
        problem = Some(Problem { text: splats.missing.join("; "), infra: false });
    }
    let boot_ok = problem.is_none() && splats.unexpected.is_empty();
    let res = boot.results.as_ref().ok().and_then(Option::as_ref);
    let mut cells = Vec::new();
    for s in scenarios {
        let got = res.and_then(|r| r.scenarios.iter().find(|x| x.id == s.id));
        let mut c = results::check(s, flavor, fs, got);
        // A splat or a dead boot fails every cell of that boot.
        c.pass &= boot_ok;
        if got.is_none() {
            if let Some(p) = &problem {
                c.not_run = Some(p.text.lines().next().unwrap_or(&p.text).to_string());
            }
        }
        cells.push(c);
    }
    let rel = |p: &Path| p.strip_prefix(run_dir).unwrap_or(p).display().to_string();
    let record = BootRecord {
        flavor,
        fs,
        kernel: res.map(|r| r.kernel.clone()).unwrap_or_default(),
        kernel_key: kernel_key.to_string(),
        wall_s: boot.wall.as_secs_f64(),
        to_runner_s: boot.to_runner.map(|d| d.as_secs_f64()),
        console: rel(&boot.console),
        end: Some(boot.end.clone()),
        splats: splats.unexpected,
        noticed: splats.noticed,
        failure: problem.as_ref().map(|p| p.text.clone()),
        infra: problem.as_ref().is_some_and(|p| p.infra),
        setup: res.map(|r| r.setup.clone()).unwrap_or_default(),
        fsck: res.and_then(|r| r.fsck.clone()),
        selftests: res.map(|r| r.selftests.clone()).unwrap_or_default(),
    };
    (cells, record)
}

/// The cells and record of a boot that could not run at all.
pub fn not_run(specs: &[Scenario], flavor: Flavor, key: &str, fs: Fs, why: &str) -> (Vec<CellResult>, BootRecord) {
    let cells = specs
        .iter()
        .filter(|s| s.runs_on(fs))
        .map(|s| {
            let mut c = results::check(s, flavor, fs, None);
            c.not_run = Some(why.lines().next().unwrap_or(why).to_string());
            c
        })
        .collect();
    let boot = BootRecord {
        flavor,
        fs,
        kernel: String::new(),
        kernel_key: key.to_string(),
        wall_s: 0.0,
        to_runner_s: None,
        console: String::new(),
        end: None,
        splats: Vec::new(),
        noticed: Vec::new(),
        failure: Some(format!("not run: {why}")),
        infra: true,
        setup: Vec::new(),
        fsck: None,
        selftests: Vec::new(),
    };
    (cells, boot)
}

/// How a step compares with its expectation, for `--explain`.
pub fn step_mark(expected: &StepOutcome, actual: &StepOutcome) -> &'static str {
    if expected == actual {
        "✓"
    } else {
        "✗"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinlab_scenarios::results::{SelftestResult, StepResult};
    use std::time::Duration;

    fn boot(end: BootEnd, results: Option<BootResults>) -> Boot {
        Boot {
            end,
            during: "scenario S05, step 4 (truncate)".into(),
            console: "/run/x/stock-ext4/console.log".into(),
            tail: vec!["[ 1.0] last line".into()],
            splats: vec![],
            results: Ok(results),
            wall: Duration::from_secs(3),
            to_runner: Some(Duration::from_secs(1)),
        }
    }

    fn step(name: &str, outcome: StepOutcome) -> StepResult {
        StepResult { name: name.into(), outcome, detail: String::new(), ms: 1.0, placement: None, located: None }
    }

    fn clean() -> BootResults {
        BootResults { fsck: Some(step("e2fsck -f -n /dev/pmem0", StepOutcome::Ok)), ..Default::default() }
    }

    #[test]
    fn each_end_is_judged_and_classified() {
        let deadline = boot_problem(&boot(BootEnd::RunDeadline { after_s: 90.0 }, None)).unwrap();
        assert!(deadline.infra);
        assert!(deadline.text.starts_with("watchdog: no progress for 1m30s; QEMU killed while the guest was in scenario S05, step 4 (truncate). Console: /run/x/stock-ext4/console.log; it last printed:\n    [ 1.0] last line"), "{}", deadline.text);
        let splat = Splat::new(SplatKind::Oops, 7, "Oops: 0000");
        let crash = boot_problem(&boot(BootEnd::KernelCrashed { splat }, None)).unwrap();
        assert!(!crash.infra);
        assert!(
            crash.text.starts_with("the guest kernel crashed (Oops: Oops: 0000 at console.log:7); the guest was in"),
            "{}",
            crash.text
        );
        assert_eq!(boot_problem(&boot(BootEnd::Completed { rc: 0 }, Some(clean()))), None);
        let nothing = boot_problem(&boot(BootEnd::Completed { rc: 0 }, None)).unwrap();
        assert!(nothing.infra && nothing.text.contains("wrote no guest-results.json"), "{}", nothing.text);
    }

    #[test]
    fn results_problems() {
        let mut r = clean();
        r.selftests.push(SelftestResult {
            program: "layout_lease".into(),
            test: "pin".into(),
            outcome: TapOutcome::Fail,
            detail: String::new(),
        });
        let p = boot_problem(&boot(BootEnd::Completed { rc: 0 }, Some(r))).unwrap();
        assert_eq!(p, Problem { text: "selftests failed: layout_lease: pin ()".into(), infra: false });
        let mut r = clean();
        r.fsck = Some(step("xfs_repair -n", StepOutcome::Error));
        assert!(!boot_problem(&boot(BootEnd::Completed { rc: 0 }, Some(r))).unwrap().infra);
        let mut r = clean();
        r.fsck = None;
        r.setup.push(step("mkfs", StepOutcome::Errno("EIO".into())));
        let p = boot_problem(&boot(BootEnd::Completed { rc: 1 }, Some(r))).unwrap();
        assert!(p.infra && p.text == "guest setup failed: mkfs: EIO ()", "{}", p.text);
    }

    #[test]
    fn expected_splats_are_noticed_unexpected_fail_missing_fail() {
        let allow = SplatAllowList::parse(
            "- flavor: hazard\n  scenario: S20\n  kind: warning\n  matches: 'fs/dax\\.c:\\d+ dax_disassociate_entry'\n  \
             reason: free mode\n",
        )
        .unwrap();
        let warn = |sc: &str| Splat {
            scenario: Some(sc.into()),
            ..Splat::new(
                SplatKind::Warning,
                9,
                "[ 5.1] WARNING: CPU: 0 PID: 77 at fs/dax.c:390 dax_disassociate_entry+0x5b/0x70",
            )
        };
        let mut b = boot(BootEnd::Completed { rc: 0 }, Some(clean()));
        b.splats = vec![warn("S20")];
        let s = sort_splats(&b, Flavor::Hazard, &["S19", "S20"], &allow);
        assert_eq!((s.noticed.len(), s.unexpected.len(), s.missing.len()), (1, 0, 0));
        assert_eq!(s.noticed[0].reason, "free mode");
        // The same line on patched, or in another scenario, fails.
        assert_eq!(sort_splats(&b, Flavor::Patched, &["S20"], &allow).unexpected.len(), 1);
        b.splats = vec![warn("S19")];
        let s = sort_splats(&b, Flavor::Hazard, &["S19", "S20"], &allow);
        assert_eq!((s.unexpected.len(), s.missing.len()), (1, 1));
        // Not expected where S20 did not run.
        b.splats.clear();
        assert!(sort_splats(&b, Flavor::Hazard, &["S19"], &allow).missing.is_empty());
    }

    #[test]
    fn a_once_per_boot_splat_may_come_in_any_of_its_scenarios() {
        let allow = SplatAllowList::parse(
            "- flavor: hazard\n  scenario: [S20, S21]\n  kind: warning\n  matches: 'dax_disassociate_entry'\n  \
             reason: once\n",
        )
        .unwrap();
        let warn = |sc: &str| Splat {
            scenario: Some(sc.into()),
            ..Splat::new(
                SplatKind::Warning,
                9,
                "WARNING: CPU: 0 PID: 77 at fs/dax.c:390 dax_disassociate_entry+0x5b/0x70",
            )
        };
        let mut b = boot(BootEnd::Completed { rc: 0 }, Some(clean()));
        // Both ran: WARN_ON_ONCE fired in the first, and only there.
        b.splats = vec![warn("S20")];
        let s = sort_splats(&b, Flavor::Hazard, &["S20", "S21"], &allow);
        assert_eq!((s.noticed.len(), s.unexpected.len(), s.missing.len()), (1, 0, 0));
        // S21 alone.
        b.splats = vec![warn("S21")];
        let s = sort_splats(&b, Flavor::Hazard, &["S21"], &allow);
        assert_eq!((s.noticed.len(), s.unexpected.len(), s.missing.len()), (1, 0, 0));
        // Neither printed it: missing, and the message names both.
        b.splats.clear();
        let s = sort_splats(&b, Flavor::Hazard, &["S21"], &allow);
        assert_eq!(s.missing.len(), 1);
        assert!(s.missing[0].contains("in S20 or S21"), "{}", s.missing[0]);
        // Elsewhere it is unexpected.
        b.splats = vec![warn("S19")];
        assert_eq!(sort_splats(&b, Flavor::Hazard, &["S19"], &allow).unexpected.len(), 1);
        assert!(
            SplatAllowList::parse("- {flavor: hazard, scenario: [], kind: warning, matches: x, reason: r}\n").is_err()
        );
    }

    #[test]
    fn the_shipped_allow_list_parses() {
        SplatAllowList::load().unwrap();
    }
}
