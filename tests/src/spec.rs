//! Scenario specs: `tests/scenarios/SNN-*.yaml`, one per scenario id of
//! DESIGN.md's matrix. A spec is the steps plus what each kernel flavor (and,
//! where they differ, each filesystem) is expected to answer.
//!
//! ```yaml
//! id: S02
//! title: reg_mr on an fsdax file mapping, no lease
//! shows: Stock 6.12 refuses long-term pins of FS-DAX pages.
//! story: |
//!   Plain words for the report.
//! steps:
//!   - name: map a fresh 2 MiB file on the DAX mount
//!     action: {map: {target: file}}
//!     expect: ok
//!   - name: ibv_reg_mr on the DAX mapping
//!     action: reg_mr
//!     expect: {stock: EOPNOTSUPP, patched: EPERM}
//! ```
//!
//! `expect` is `ok`, an errno name, or a map whose keys are `flavor`,
//! `flavor/fs` or `*` (most specific wins). A step that is not a `probe` and
//! is expected to fail ends the scenario for that flavor: later steps must not
//! give an expectation for it, and the report shows them as not run.
//!
//! The `child` exists only after a `fork` step that succeeds: a step run by
//! it or naming it (`kill`, `file_pins`, `send_uverbs`) must come after one.
//! The `receiver` runs from the start, but its `recv_uverbs` must come after
//! a `send_uverbs` that succeeds, or it would wait for nothing.
//!
//! Specs are `*.yaml` or `*.yml`; the file name starts with the id.

use crate::plan::{Action, PlannedScenario, PlannedStep, Proc};
use crate::{errno, Flavor, Fs};
use anyhow::{bail, Context, Result};
use serde::{de, Deserialize, Deserializer};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What a step is expected to return.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// The call succeeded (and for `verify`, the bytes matched).
    Ok,
    /// The call failed with this errno (canonical name, e.g. `EOPNOTSUPP`).
    Errno(String),
    /// The call was still sleeping in the kernel when the runner looked
    /// (a `may_block` step); its end is the outcome of a later `await` step.
    Blocked,
    /// The calls succeeded but what was read back is not what was written
    /// (the victim file of a hazard scenario holds the NIC's bytes).
    Mismatch,
}

impl Outcome {
    /// Parse `ok` or a known errno name.
    pub fn parse(s: &str) -> Result<Outcome, String> {
        if s == "ok" {
            return Ok(Outcome::Ok);
        }
        if s == "blocked" {
            return Ok(Outcome::Blocked);
        }
        if s == "mismatch" {
            return Ok(Outcome::Mismatch);
        }
        errno::canonical(s).map(Outcome::Errno).ok_or_else(|| {
            format!(
                "'{s}' is neither 'ok', 'blocked', 'mismatch' nor a known errno name (e.g. EPERM, EOPNOTSUPP, \
                     ETXTBSY)"
            )
        })
    }

    /// The spelling used in results and reports.
    pub fn as_str(&self) -> &str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Errno(e) => e,
            Outcome::Blocked => "blocked",
            Outcome::Mismatch => "mismatch",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Outcome::parse(&s).map_err(de::Error::custom)
    }
}

/// A key of an `expect` map: `*`, `stock`, `patched/xfs`, ….
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectKey {
    /// `None` for `*`.
    pub flavor: Option<Flavor>,
    /// `None` unless the key names a filesystem.
    pub fs: Option<Fs>,
}

impl<'de> Deserialize<'de> for ExpectKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "*" {
            return Ok(ExpectKey { flavor: None, fs: None });
        }
        let (fl, fs) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s.as_str(), None),
        };
        let flavor = fl.parse::<Flavor>().map_err(|e| de::Error::custom(format!("expect key '{s}': {e}")))?;
        if flavor.is_debug() {
            return Err(de::Error::custom(format!(
                "expect key '{s}': the {flavor} kernel expects what {} does; write '{}' instead",
                flavor.base(),
                flavor.base()
            )));
        }
        let fs =
            fs.map(|f| f.parse::<Fs>()).transpose().map_err(|e| de::Error::custom(format!("expect key '{s}': {e}")))?;
        Ok(ExpectKey { flavor: Some(flavor), fs })
    }
}

/// The `expect:` of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// One outcome for every flavor and filesystem.
    All(Outcome),
    /// Outcomes by flavor and filesystem; missing = the step does not run there.
    By(BTreeMap<ExpectKey, Outcome>),
}

impl<'de> Deserialize<'de> for Expect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Expect;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("'ok', an errno name, or a map like {stock: EOPNOTSUPP, patched: EPERM}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Expect, E> {
                Outcome::parse(v).map(Expect::All).map_err(E::custom)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Expect, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = m.next_entry::<ExpectKey, Outcome>()? {
                    out.insert(k, v);
                }
                if out.is_empty() {
                    return Err(de::Error::custom("empty expect map"));
                }
                Ok(Expect::By(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl Expect {
    /// The outcome expected on `flavor` with `fs`, if the step runs there.
    pub fn for_cell(&self, flavor: Flavor, fs: Fs) -> Option<&Outcome> {
        let flavor = flavor.base();
        match self {
            Expect::All(o) => Some(o),
            Expect::By(m) => m
                .get(&ExpectKey { flavor: Some(flavor), fs: Some(fs) })
                .or_else(|| m.get(&ExpectKey { flavor: Some(flavor), fs: None }))
                .or_else(|| m.get(&ExpectKey { flavor: None, fs: None })),
        }
    }
}

/// One step of a spec.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// What the step does, in words.
    pub name: String,
    /// What the runner does.
    pub action: Action,
    /// Which process does it (default: the holder).
    #[serde(default)]
    pub by: crate::plan::Proc,
    /// Observe and go on (see [`PlannedStep::probe`]).
    #[serde(default)]
    pub probe: bool,
    /// The call may sleep in the kernel (see [`PlannedStep::may_block`]).
    #[serde(default)]
    pub may_block: bool,
    /// This step's outcome is what the matrix shows for the scenario
    /// (where it ran); without one, the first failing step is shown.
    #[serde(default)]
    pub headline: bool,
    /// Expected outcome (with its place in the file, for error messages).
    pub expect: Spanned<Expect>,
    /// For a `locate` step: where the pattern's blocks must be, per flavor
    /// (`{patched: {S20.dat: 512}, hazard: {victim.dat: 512}}`; `free` for
    /// blocks no file owns). A cell without an entry does not check placement.
    #[serde(default)]
    pub placement: BTreeMap<ExpectKey, BTreeMap<String, u64>>,
}

impl Step {
    /// Where a `locate` step's blocks must be on `flavor`/`fs`, if the spec says.
    pub fn placement_for(&self, flavor: Flavor, fs: Fs) -> Option<&BTreeMap<String, u64>> {
        let flavor = flavor.base();
        let m = &self.placement;
        m.get(&ExpectKey { flavor: Some(flavor), fs: Some(fs) })
            .or_else(|| m.get(&ExpectKey { flavor: Some(flavor), fs: None }))
            .or_else(|| m.get(&ExpectKey { flavor: None, fs: None }))
    }
}

/// One scenario spec file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// `S01`…`S18`; must match the file name's prefix.
    pub id: String,
    /// One line.
    pub title: String,
    /// One sentence: what a learner sees in this scenario.
    pub shows: String,
    /// A paragraph for the report: the story in plain words.
    #[serde(default)]
    pub story: String,
    /// Where the 2019 discussion argued this (who, which message), for the report.
    #[serde(default)]
    pub reference: String,
    /// Whether the scenario touches the filesystem under test; if not, it runs
    /// once per flavor (on the ext4 boot) and the report shows one cell.
    #[serde(default = "yes")]
    pub uses_fs: bool,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The file it came from (set by [`load_file`]).
    #[serde(skip)]
    pub path: PathBuf,
}

fn yes() -> bool {
    true
}

/// The expectation of every step of a scenario in one cell; `None` = not run.
pub type CellExpectation = Vec<Option<Outcome>>;

impl Scenario {
    /// Expected outcome of each step for `flavor` on `fs`.
    pub fn expected(&self, flavor: Flavor, fs: Fs) -> CellExpectation {
        self.steps.iter().map(|s| s.expect.value.for_cell(flavor, fs).cloned()).collect()
    }

    /// Whether this scenario runs on a boot with filesystem `fs`.
    pub fn runs_on(&self, fs: Fs) -> bool {
        self.uses_fs || fs == Fs::Ext4
    }

    /// The guest's view: steps without expectations.
    pub fn planned(&self) -> PlannedScenario {
        PlannedScenario {
            id: self.id.clone(),
            title: self.title.clone(),
            steps: self
                .steps
                .iter()
                .map(|s| PlannedStep {
                    name: s.name.clone(),
                    action: s.action.clone(),
                    by: s.by,
                    probe: s.probe,
                    may_block: s.may_block,
                })
                .collect(),
        }
    }

    /// Check what the YAML types cannot: the id matches the file name, and
    /// per flavor/filesystem the expectations form a run that makes sense.
    pub fn validate(&self) -> Result<()> {
        let file = self.path.display();
        let stem = self.path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if !is_scenario_id(&self.id) {
            bail!("{file}: id '{}' is not of the form S01..S99", self.id);
        }
        if !stem.is_empty() && !stem.starts_with(&self.id) {
            let ext = self.path.extension().and_then(|x| x.to_str()).unwrap_or("yaml");
            bail!("{file}: id '{}' does not match the file name (expected {}-*.{ext})", self.id, self.id);
        }
        if self.steps.is_empty() {
            bail!("{file}: scenario {} has no steps", self.id);
        }
        let mut blocking_before = false;
        for (i, step) in self.steps.iter().enumerate() {
            let at = &step.expect.referenced;
            let detachable = matches!(
                step.action,
                Action::Truncate { via: crate::plan::TruncVia::Path, .. }
                    | Action::Fallocate { .. }
                    | Action::Clone { .. }
                    | Action::SwapExt { .. }
                    | Action::ExchangeRange { .. }
            );
            if step.may_block && (step.by != Proc::Other || !detachable) {
                bail!(
                    "{file}:{}:{}: step {} ('{}') is may_block, but only a truncate by path, a fallocate, a clone, a swapext or an exchange_range run \
                     by `other` can be watched while it sleeps",
                    at.line(),
                    at.column(),
                    i + 1,
                    step.name
                );
            }
            if !step.may_block && step_expects(step, &Outcome::Blocked) {
                bail!(
                    "{file}:{}:{}: step {} ('{}') expects `blocked` but is not `may_block: true`",
                    at.line(),
                    at.column(),
                    i + 1,
                    step.name
                );
            }
            if matches!(step.action, Action::Await) && !blocking_before {
                bail!(
                    "{file}:{}:{}: step {} ('{}') awaits, but no step before it is `may_block`",
                    at.line(),
                    at.column(),
                    i + 1,
                    step.name
                );
            }
            let race = match step.action {
                Action::RaceRegTruncate { seconds, hold_ms, .. } => {
                    Some(u64::from(seconds) + u64::from(hold_ms) / 1000)
                }
                Action::RaceLeaseClose { seconds } => Some(u64::from(seconds)),
                _ => None,
            };
            if let Some(s) = race.filter(|&s| s == 0 || s + 10 > crate::plan::STEP_DEADLINE_S) {
                bail!(
                    "{file}:{}:{}: step {} ('{}') races for {s} s; a race must last at least 1 s and end \
                     10 s before the {} s step deadline",
                    at.line(),
                    at.column(),
                    i + 1,
                    step.name,
                    crate::plan::STEP_DEADLINE_S
                );
            }
            if !step.placement.is_empty() && !matches!(step.action, Action::Locate { .. }) {
                bail!(
                    "{file}:{}:{}: step {} ('{}') has a placement, but only `locate` steps find blocks",
                    at.line(),
                    at.column(),
                    i + 1,
                    step.name
                );
            }
            blocking_before |= step.may_block;
        }
        for flavor in Flavor::SPEC {
            for fs in Fs::ALL {
                let mut stopped: Option<usize> = None;
                for (i, step) in self.steps.iter().enumerate() {
                    let at = &step.expect.referenced;
                    let exp = step.expect.value.for_cell(flavor, fs);
                    match (stopped, exp) {
                        (Some(k), Some(o)) => bail!(
                            "{file}:{}:{}: step {} ('{}') expects {o} on {flavor}/{fs}, but step {} ('{}') \
                             already stops the scenario there (it is not a probe and expects an error); \
                             drop the expectation or mark step {} `probe: true`",
                            at.line(),
                            at.column(),
                            i + 1,
                            step.name,
                            k + 1,
                            self.steps[k].name,
                            k + 1
                        ),
                        (None, None) => bail!(
                            "{file}:{}:{}: step {} ('{}') has no expectation for {flavor}/{fs} \
                             (add a '{flavor}' or '*' key)",
                            at.line(),
                            at.column(),
                            i + 1,
                            step.name
                        ),
                        (None, Some(Outcome::Errno(_) | Outcome::Mismatch)) if !step.probe => stopped = Some(i),
                        _ => {}
                    }
                }
            }
        }
        self.validate_processes()
    }

    /// The child exists only after a `fork` step that succeeded (the runner
    /// accepts it then), and `recv_uverbs` waits for a descriptor that a
    /// `send_uverbs` step must have sent: check both in the file's order and,
    /// per flavor/filesystem, against the steps expected to succeed there.
    fn validate_processes(&self) -> Result<()> {
        let file = self.path.display();
        let mut fork_before = false;
        let mut send_before = false;
        for (i, step) in self.steps.iter().enumerate() {
            let at = &step.expect.referenced;
            if let Some(how) = child_use(step).filter(|_| !fork_before) {
                bail!(
                    "{file}:{}:{}: step {} ('{}') {how}, but no step before it forks: \
                     the child exists only after a `fork` step",
                    at.line(),
                    at.column(),
                    i + 1,
                    step.name
                );
            }
            if matches!(step.action, Action::RecvUverbs) && !send_before {
                bail!(
                    "{file}:{}:{}: step {} ('{}') receives the uverbs fd, but no step before it sends one \
                     (`send_uverbs`): recv_uverbs would wait for it until the step deadline",
                    at.line(),
                    at.column(),
                    i + 1,
                    step.name
                );
            }
            fork_before |= matches!(step.action, Action::Fork);
            send_before |= matches!(step.action, Action::SendUverbs { .. });
        }
        for flavor in Flavor::SPEC {
            for fs in Fs::ALL {
                let mut forked = false;
                let mut sent = false;
                for (i, step) in self.steps.iter().enumerate() {
                    let Some(exp) = step.expect.value.for_cell(flavor, fs) else { continue };
                    let at = &step.expect.referenced;
                    if let Some(how) = child_use(step).filter(|_| !forked) {
                        bail!(
                            "{file}:{}:{}: step {} ('{}') {how} on {flavor}/{fs}, but no earlier `fork` step \
                             is expected to succeed there, so there is no child",
                            at.line(),
                            at.column(),
                            i + 1,
                            step.name
                        );
                    }
                    if matches!(step.action, Action::RecvUverbs) && !sent {
                        bail!(
                            "{file}:{}:{}: step {} ('{}') receives the uverbs fd on {flavor}/{fs}, but no earlier \
                             `send_uverbs` step is expected to succeed there, so it would wait until the step deadline",
                            at.line(),
                            at.column(),
                            i + 1,
                            step.name
                        );
                    }
                    let ok = *exp == Outcome::Ok;
                    forked |= ok && matches!(step.action, Action::Fork);
                    sent |= ok && matches!(step.action, Action::SendUverbs { .. });
                }
            }
        }
        Ok(())
    }
}

/// Whether any cell of `step` expects `o`.
fn step_expects(step: &Step, o: &Outcome) -> bool {
    match &step.expect.value {
        Expect::All(x) => x == o,
        Expect::By(m) => m.values().any(|x| x == o),
    }
}

/// How `step` needs the child process, if it does: run by it, or naming it.
fn child_use(step: &Step) -> Option<&'static str> {
    if step.by == Proc::Child {
        return Some("is run by the child");
    }
    match step.action {
        Action::Kill { who: Proc::Child } => Some("kills the child"),
        Action::FilePins { of: Proc::Child, .. } => Some("reads the child's file_pins"),
        Action::SendUverbs { to: Proc::Child } => Some("sends the uverbs fd to the child"),
        _ => None,
    }
}

fn is_scenario_id(s: &str) -> bool {
    s.len() == 3 && s.starts_with('S') && s[1..].chars().all(|c| c.is_ascii_digit())
}

/// Parse any YAML document of pinlab's (e.g. `tests/expected-splats.yaml`)
/// with the same parser as the specs.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Parse one spec from text; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<Scenario> {
    let mut sc: Scenario = serde_saphyr::from_str(text).map_err(|e| {
        let loc = e.location().map(|l| format!(":{}:{}", l.line(), l.column())).unwrap_or_default();
        anyhow::anyhow!("{}{loc}: malformed scenario spec: {}", path.display(), e.without_snippet())
    })?;
    sc.path = path.to_path_buf();
    sc.validate()?;
    Ok(sc)
}

/// Read and validate one spec file.
pub fn load_file(path: &Path) -> Result<Scenario> {
    let text = std::fs::read_to_string(path).with_context(|| format!("Failed to read {}", path.display()))?;
    parse(&text, path)
}

/// Whether `path` names a spec file: `*.yaml` or `*.yml`.
pub fn is_spec_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|x| x.to_str()), Some("yaml" | "yml"))
}

/// Read every `*.yaml` and `*.yml` in `dir`, sorted by id; ids must be unique.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("Failed to read {}", dir.display()))?;
    for e in entries {
        let p = e.with_context(|| format!("Failed to read {}", dir.display()))?.path();
        if is_spec_file(&p) {
            out.push(load_file(&p)?);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    for w in out.windows(2) {
        if w[0].id == w[1].id {
            bail!("{} and {} both define scenario {}", w[0].path.display(), w[1].path.display(), w[0].id);
        }
    }
    Ok(out)
}

/// Keep the scenarios whose ids are in `ids` (all if empty), in `all`'s
/// order (by id) and each once, however often `ids` repeats it; unknown ids
/// are an error.
pub fn select(all: Vec<Scenario>, ids: &[String]) -> Result<Vec<Scenario>> {
    if ids.is_empty() {
        return Ok(all);
    }
    for id in ids {
        if !all.iter().any(|s| &s.id == id) {
            let known: Vec<_> = all.iter().map(|s| s.id.as_str()).collect();
            bail!("unknown scenario '{id}' (known: {})", known.join(", "));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    Ok(all.into_iter().filter(|s| ids.contains(&s.id) && seen.insert(s.id.clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
id: S02
title: reg_mr on an fsdax file mapping, no lease
shows: stock refuses
steps:
  - name: map
    action: {map: {target: file, size: 2M}}
    expect: ok
  - name: reg
    action: reg_mr
    expect: {stock: EOPNOTSUPP, patched: EPERM, patched/xfs: ENOTSUP, hazard: ok}
";

    fn p(s: &str) -> Result<Scenario> {
        parse(s, Path::new("tests/scenarios/S02-x.yaml"))
    }

    #[test]
    fn good_spec_parses_and_resolves_cells() {
        let sc = p(GOOD).unwrap();
        assert_eq!(sc.steps.len(), 2);
        assert_eq!(
            sc.expected(Flavor::Stock, Fs::Ext4),
            vec![Some(Outcome::Ok), Some(Outcome::Errno("EOPNOTSUPP".into()))]
        );
        // Most specific key wins, aliases are canonicalised.
        assert_eq!(sc.expected(Flavor::Patched, Fs::Xfs)[1], Some(Outcome::Errno("EOPNOTSUPP".into())));
        assert_eq!(sc.expected(Flavor::Patched, Fs::Ext4)[1], Some(Outcome::Errno("EPERM".into())));
        assert!(sc.uses_fs);
        // The debug kernels expect what their base flavor does.
        for fs in Fs::ALL {
            assert_eq!(sc.expected(Flavor::Debug, fs), sc.expected(Flavor::Patched, fs));
            assert_eq!(sc.expected(Flavor::StockDebug, fs), sc.expected(Flavor::Stock, fs));
        }
    }

    #[test]
    fn debug_flavors_are_not_expectation_keys() {
        let e = p(&GOOD.replace("hazard: ok}", "hazard: ok, debug: EPERM}")).unwrap_err().to_string();
        assert!(e.contains("expect key 'debug'") && e.contains("write 'patched' instead"), "{e}");
    }

    #[test]
    fn unknown_errno_names_line_and_column() {
        let bad = GOOD.replace("EPERM", "EPRM");
        let e = p(&bad).unwrap_err().to_string();
        assert!(e.starts_with("tests/scenarios/S02-x.yaml:10:"), "{e}");
        assert!(e.contains("EPRM"), "{e}");
    }

    #[test]
    fn unknown_action_names_line() {
        let bad = GOOD.replace("action: reg_mr", "action: reg_mrr");
        let e = p(&bad).unwrap_err().to_string();
        assert!(e.starts_with("tests/scenarios/S02-x.yaml:9:"), "{e}");
    }

    #[test]
    fn unknown_field_names_line() {
        let bad = GOOD.replace("    expect: ok\n", "    expect: ok\n    expcet: ok\n");
        let e = p(&bad).unwrap_err().to_string();
        assert!(e.starts_with("tests/scenarios/S02-x.yaml:8:"), "{e}");
        assert!(e.contains("expcet"), "{e}");
    }

    #[test]
    fn bad_size_is_rejected() {
        let bad = GOOD.replace("size: 2M", "size: 3");
        let e = p(&bad).unwrap_err().to_string();
        assert!(e.contains("multiple of 4096"), "{e}");
        assert!(e.starts_with("tests/scenarios/S02-x.yaml:6:"), "{e}");
    }

    #[test]
    fn missing_expectation_is_reported_with_its_line() {
        let bad = GOOD
            .replace("{stock: EOPNOTSUPP, patched: EPERM, patched/xfs: ENOTSUP, hazard: ok}", "{stock: EOPNOTSUPP}");
        let e = p(&bad).unwrap_err().to_string();
        assert!(e.contains(":10:"), "{e}");
        assert!(e.contains("no expectation for patched/ext4"), "{e}");
    }

    #[test]
    fn expectation_after_a_stop_is_rejected() {
        let bad = format!("{GOOD}  - name: verify\n    action: verify\n    expect: ok\n");
        let e = p(&bad).unwrap_err().to_string();
        assert!(e.contains(":13:"), "{e}");
        assert!(e.contains("already stops"), "{e}");
        // ... unless the failing step is a probe.
        let ok = bad.replace("    action: reg_mr\n", "    action: reg_mr\n    probe: true\n");
        p(&ok).unwrap();
    }

    #[test]
    fn rdma_read_parses_and_may_expect_a_mismatch() {
        let text = with_steps(&[
            ("reg", "action: reg_mr", "ok"),
            ("write", "action: rdma_write", "ok"),
            ("read", "action: rdma_read\nheadline: true", "{stock: ok, patched: ok, hazard: mismatch}"),
        ]);
        let sc = p13(&text).unwrap();
        assert_eq!(sc.steps[3].action, Action::RdmaRead);
        assert_eq!(sc.steps[3].action.kind(), "rdma_read");
        assert!(sc.steps[3].headline);
        assert_eq!(sc.expected(Flavor::Hazard, Fs::Xfs)[3], Some(Outcome::Mismatch));
        assert_eq!(sc.planned().steps[3].action, Action::RdmaRead);
        // It takes no arguments.
        let e = p13(&text.replace("action: rdma_read", "action: {rdma_read: {len: 2M}}")).unwrap_err().to_string();
        assert!(e.starts_with("tests/scenarios/S13-x.yaml:"), "{e}");
    }

    #[test]
    fn an_empty_placement_means_nowhere() {
        let text = with_steps(&[(
            "where",
            "by: other\naction: {locate: {}}\nplacement: {'*': {}, patched: {S13.dat: 512}}",
            "ok",
        )]);
        let sc = p13(&text).unwrap();
        assert_eq!(sc.steps[1].placement_for(Flavor::Stock, Fs::Ext4), Some(&BTreeMap::new()));
        assert_eq!(sc.steps[1].placement_for(Flavor::Patched, Fs::Xfs).map(|m| m["S13.dat"]), Some(512));
    }

    #[test]
    fn id_must_match_file_name() {
        let e = parse(GOOD, Path::new("tests/scenarios/S03-x.yaml")).unwrap_err().to_string();
        assert!(e.contains("does not match the file name"), "{e}");
    }

    #[test]
    fn the_shipped_specs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let all = load_dir(&dir).unwrap();
        assert!(!all.is_empty());
        assert!(select(all, &["S99".into()]).unwrap_err().to_string().contains("unknown scenario"));
    }

    /// A spec `S13-x.yaml`: step 1 maps (lines 5-7), then `steps`, each
    /// `(name, lines between name and expect, expect)`, so step 2 starts on
    /// line 8 and a step's `expect:` is its last line.
    fn with_steps(steps: &[(&str, &str, &str)]) -> String {
        let mut s = String::from(
            "id: S13\ntitle: t\nshows: s\nsteps:\n  - name: map\n    action: {map: {target: file}}\n    expect: ok\n",
        );
        for (name, lines, expect) in steps {
            s.push_str(&format!("  - name: {name}\n"));
            for l in lines.lines() {
                s.push_str(&format!("    {l}\n"));
            }
            s.push_str(&format!("    expect: {expect}\n"));
        }
        s
    }

    fn p13(s: &str) -> Result<Scenario> {
        parse(s, Path::new("tests/scenarios/S13-x.yaml"))
    }

    #[test]
    fn a_child_step_before_any_fork_is_rejected_with_its_line() {
        let bad = with_steps(&[("child exits", "by: child\naction: exit", "ok"), ("fork", "action: fork", "ok")]);
        let e = p13(&bad).unwrap_err().to_string();
        assert!(e.starts_with("tests/scenarios/S13-x.yaml:11:"), "{e}");
        assert!(e.contains("step 2 ('child exits') is run by the child, but no step before it forks"), "{e}");
        // After the fork it is fine.
        p13(&with_steps(&[("fork", "action: fork", "ok"), ("child exits", "by: child\naction: exit", "ok")])).unwrap();
    }

    #[test]
    fn naming_the_child_before_any_fork_is_rejected() {
        for (action, how) in [
            ("action: {kill: {who: child}}", "kills the child"),
            ("action: {file_pins: {of: child}}", "reads the child's file_pins"),
            ("action: {send_uverbs: {to: child}}", "sends the uverbs fd to the child"),
        ] {
            let bad = with_steps(&[("look", &format!("by: other\n{action}"), "ok")]);
            let e = p13(&bad).unwrap_err().to_string();
            assert!(e.starts_with("tests/scenarios/S13-x.yaml:11:"), "{e}");
            assert!(e.contains(&format!("step 2 ('look') {how}, but no step before it forks")), "{e}");
        }
    }

    #[test]
    fn a_child_step_where_the_fork_is_expected_to_fail_is_rejected() {
        let bad = with_steps(&[
            ("fork", "action: fork\nprobe: true", "{stock: ENOMEM, patched: ok, hazard: ok}"),
            ("child exits", "by: child\naction: exit", "ok"),
        ]);
        let e = p13(&bad).unwrap_err().to_string();
        assert!(e.starts_with("tests/scenarios/S13-x.yaml:15:"), "{e}");
        assert!(e.contains("is run by the child on stock/ext4, but no earlier `fork` step"), "{e}");
        // A failed fork that stops the scenario there, with the child step
        // run only where the fork succeeds, is fine.
        p13(&with_steps(&[
            ("fork", "action: fork", "{stock: ENOMEM, patched: ok, hazard: ok}"),
            ("child exits", "by: child\naction: exit", "{patched: ok, hazard: ok}"),
        ]))
        .unwrap();
    }

    #[test]
    fn recv_uverbs_needs_an_earlier_send() {
        let bad = with_steps(&[
            ("take", "by: receiver\naction: recv_uverbs", "ok"),
            ("send", "action: {send_uverbs: {to: receiver}}", "ok"),
        ]);
        let e = p13(&bad).unwrap_err().to_string();
        assert!(e.starts_with("tests/scenarios/S13-x.yaml:11:"), "{e}");
        assert!(e.contains("step 2 ('take') receives the uverbs fd, but no step before it sends one"), "{e}");
        // The receiver itself runs from the start: other steps by it may come first.
        p13(&with_steps(&[
            ("receiver maps", "by: receiver\naction: {map: {target: anon}}", "ok"),
            ("send", "action: {send_uverbs: {to: receiver}}", "ok"),
            ("take", "by: receiver\naction: recv_uverbs", "ok"),
        ]))
        .unwrap();
    }

    /// A fresh empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!("pinlab-spec-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn load_dir_reads_yml_as_well_as_yaml() {
        let d = TempDir::new("yml");
        std::fs::write(d.0.join("S02-a.yaml"), GOOD).unwrap();
        std::fs::write(d.0.join("S03-b.yml"), GOOD.replace("id: S02", "id: S03")).unwrap();
        std::fs::write(d.0.join("README.md"), "not a spec").unwrap();
        let all = load_dir(&d.0).unwrap();
        let ids: Vec<_> = all.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["S02", "S03"]);
        // The id/file name check holds for .yml too, and names the extension.
        std::fs::write(d.0.join("S04-c.yml"), GOOD).unwrap();
        let e = load_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("S04-c.yml: id 'S02' does not match the file name (expected S02-*.yml)"), "{e}");
        // The same id in a .yaml and a .yml is a duplicate.
        std::fs::remove_file(d.0.join("S04-c.yml")).unwrap();
        std::fs::write(d.0.join("S03-c.yaml"), GOOD.replace("id: S02", "id: S03")).unwrap();
        let e = load_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("both define scenario S03"), "{e}");
    }

    #[test]
    fn select_runs_a_repeated_id_once() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let all = load_dir(&dir).unwrap();
        let ids = |v: &[Scenario]| v.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
        let got = select(all.clone(), &["S02".into(), "S02".into()]).unwrap();
        assert_eq!(ids(&got), ["S02"]);
        let got = select(all.clone(), &["S03".into(), "S02".into(), "S03".into()]).unwrap();
        assert_eq!(ids(&got), ["S02", "S03"]);
        // Even if the list itself held a scenario twice.
        let mut twice = all.clone();
        twice.push(all[0].clone());
        let got = select(twice, &[all[0].id.clone(), all[0].id.clone()]).unwrap();
        assert_eq!(ids(&got), [all[0].id.clone()]);
    }
}
