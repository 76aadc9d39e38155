//! What a guest observed (`guest-results.json` on the run share) and how it
//! compares with a spec's expectations.

use crate::spec::{Outcome, Scenario};
use crate::{Flavor, Fs};
use serde::{Deserialize, Serialize};

/// Outcome string of a step the runner did not execute.
pub const NOT_RUN: &str = "not run";

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
    /// kselftest results, one per TAP test line: outcome `ok`, `skip` or `fail`.
    #[serde(default)]
    pub selftests: Vec<StepResult>,
    /// What `cargo xtask bench` asked the guest to measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bench: Option<crate::bench::BenchResults>,
}

/// A scenario as run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The scenario id.
    pub id: String,
    /// One per planned step, in order; steps after a stop are [`NOT_RUN`].
    pub steps: Vec<StepResult>,
    /// Wall time of the whole scenario.
    pub ms: f64,
    /// Set when the runner could not bring the lab back to a clean state
    /// after the scenario (a pin survived, a process did not exit, …).
    #[serde(default)]
    pub isolation: Option<String>,
}

/// A step as run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// The step's name.
    pub name: String,
    /// `ok`, an errno name, `mismatch`, `error` (pinlab itself failed) or [`NOT_RUN`].
    pub outcome: String,
    /// What the kernel said and what was observed, for people.
    #[serde(default)]
    pub detail: String,
    /// Wall time of the step.
    #[serde(default)]
    pub ms: f64,
}

/// One step, expected vs actual.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepCheck {
    /// The step's name.
    pub name: String,
    /// Expected outcome, or [`NOT_RUN`] after a stop.
    pub expected: String,
    /// What the guest observed.
    pub actual: String,
    /// The guest's detail text.
    pub detail: String,
    /// Whether they agree.
    pub pass: bool,
    /// Wall time.
    pub ms: f64,
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
        let s = self.steps.iter().find(|s| !s.pass).or_else(|| self.steps.iter().rev().find(|s| s.actual != NOT_RUN));
        match s {
            Some(s) if s.pass => format!("{}: {}", s.name, s.actual),
            Some(s) => format!("{}: expected {}, got {}", s.name, s.expected, s.actual),
            None => "no steps".into(),
        }
    }

    /// The expected counterpart of [`CellResult::verdict`].
    pub fn expected_verdict(&self) -> String {
        self.steps
            .iter()
            .filter(|s| s.expected != NOT_RUN)
            .find(|s| s.expected != "ok")
            .map(|s| s.expected.clone())
            .unwrap_or_else(|| "ok".into())
    }

    /// The errno that ends or characterises the run: the first non-ok actual
    /// outcome among executed steps, else `ok`.
    pub fn verdict(&self) -> String {
        if self.not_run.is_some() {
            return NOT_RUN.into();
        }
        self.steps
            .iter()
            .filter(|s| s.actual != NOT_RUN)
            .find(|s| s.actual != "ok")
            .map(|s| s.actual.clone())
            .unwrap_or_else(|| "ok".into())
    }
}

/// Compare a scenario's results with its spec for one cell. A missing
/// result (the guest crashed or skipped it) fails every step.
pub fn check(spec: &Scenario, flavor: Flavor, fs: Fs, got: Option<&ScenarioResult>) -> CellResult {
    let expected = spec.expected(flavor, fs);
    let mut steps = Vec::new();
    for (i, (step, exp)) in spec.steps.iter().zip(expected).enumerate() {
        let exp = exp.as_ref().map(Outcome::as_str).unwrap_or(NOT_RUN).to_string();
        let (actual, detail, ms) = match got.and_then(|g| g.steps.get(i)) {
            Some(r) => (r.outcome.clone(), r.detail.clone(), r.ms),
            None => ("missing".to_string(), "the guest reported no result for this step".to_string(), 0.0),
        };
        steps.push(StepCheck { name: step.name.clone(), pass: actual == exp, expected: exp, actual, detail, ms });
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
    use std::path::Path;

    fn spec() -> Scenario {
        parse(
            "id: S02\ntitle: t\nshows: s\nsteps:\n  - name: map\n    action: {map: {target: file}}\n    expect: ok\n  \
             - name: reg\n    action: reg_mr\n    expect: {stock: EOPNOTSUPP, patched: ok}\n  \
             - name: verify\n    action: verify\n    expect: {patched: ok}\n",
            Path::new("S02-t.yaml"),
        )
        .unwrap()
    }

    fn res(outcomes: &[&str]) -> ScenarioResult {
        ScenarioResult {
            id: "S02".into(),
            steps: outcomes
                .iter()
                .map(|o| StepResult { name: "x".into(), outcome: o.to_string(), detail: String::new(), ms: 1.0 })
                .collect(),
            ms: 3.0,
            isolation: None,
        }
    }

    #[test]
    fn stop_matches_not_run() {
        let c = check(&spec(), Flavor::Stock, Fs::Ext4, Some(&res(&["ok", "EOPNOTSUPP", NOT_RUN])));
        assert!(c.pass, "{c:?}");
        assert_eq!(c.verdict(), "EOPNOTSUPP");
    }

    #[test]
    fn wrong_errno_fails() {
        let c = check(&spec(), Flavor::Stock, Fs::Ext4, Some(&res(&["ok", "EPERM", NOT_RUN])));
        assert!(!c.pass);
        assert_eq!(c.headline(), "reg: expected EOPNOTSUPP, got EPERM");
    }

    #[test]
    fn failed_isolation_fails_the_cell() {
        let mut r = res(&["ok", "EOPNOTSUPP", NOT_RUN]);
        r.isolation = Some("pid 12 still pins".into());
        let c = check(&spec(), Flavor::Stock, Fs::Ext4, Some(&r));
        assert!(!c.pass);
    }

    #[test]
    fn missing_results_fail() {
        let c = check(&spec(), Flavor::Patched, Fs::Xfs, None);
        assert!(!c.pass);
        let short = check(&spec(), Flavor::Patched, Fs::Xfs, Some(&res(&["ok"])));
        assert!(!short.pass);
        assert_eq!(short.steps[1].actual, "missing");
    }
}
