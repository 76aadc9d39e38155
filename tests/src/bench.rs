//! `cargo xtask bench`: what the host asks a guest to measure, and what the
//! guest measured. The figures are DESIGN.md's in-guest targets: registering
//! an FS-DAX file under an unbreakable layout lease against anonymous memory,
//! RDMA WRITE bandwidth into both, and how fast a layout change over pinned
//! pages fails, and what the guest runner spends on a scenario besides its
//! steps.

use serde::{Deserialize, Serialize};

/// The measurements one boot makes (part of [`crate::plan::Plan`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchPlan {
    /// Repetitions of each registration and bandwidth measurement.
    pub reps: u32,
    /// Size of the registered regions, MiB.
    pub reg_mib: u64,
    /// Bytes the RDMA client writes per bandwidth run, MiB.
    pub write_mib: u64,
    /// Repetitions of each failing truncate / hole punch.
    pub fail_reps: u32,
    /// Repetitions of the empty scenario that measures the runner's
    /// per-scenario overhead.
    #[serde(default = "default_scenario_reps")]
    pub scenario_reps: u32,
}

fn default_scenario_reps() -> u32 {
    10
}

impl Default for BenchPlan {
    fn default() -> Self {
        BenchPlan { reps: 5, reg_mib: 256, write_mib: 32, fail_reps: 50, scenario_reps: default_scenario_reps() }
    }
}

/// Stable keys of the guest's figures.
pub mod key {
    /// `ibv_reg_mr` of anonymous memory (pages already present).
    pub const REG_ANON: &str = "reg_mr_anon";
    /// `ibv_reg_mr` of an FS-DAX file under `F_LAYOUT|F_EXCLUSIVE`, pages
    /// already written (like the anonymous ones).
    pub const REG_FSDAX: &str = "reg_mr_fsdax_lease";
    /// The same on a freshly allocated file: the registration itself write-
    /// faults every page, and the filesystem zeroes its unwritten blocks.
    pub const REG_FSDAX_COLD: &str = "reg_mr_fsdax_lease_cold";
    /// RDMA WRITE bandwidth into an anonymous MR.
    pub const WRITE_ANON: &str = "write_anon";
    /// RDMA WRITE bandwidth into an FS-DAX MR.
    pub const WRITE_FSDAX: &str = "write_fsdax";
    /// The first `ftruncate` over pinned pages (lease released, pins kept):
    /// it also unmaps the file from the process's page tables.
    pub const TRUNC_FIRST: &str = "truncate_pinned_first";
    /// Later `ftruncate`s over pinned pages: must fail.
    pub const TRUNC_PINNED: &str = "truncate_pinned";
    /// The first `fallocate(PUNCH_HOLE)` over pinned pages.
    pub const PUNCH_FIRST: &str = "punch_pinned_first";
    /// Later `fallocate(PUNCH_HOLE)`s over pinned pages: must fail.
    pub const PUNCH_PINNED: &str = "punch_pinned";
    /// What a scenario costs besides its steps: an empty scenario (the
    /// holder started, one trivial step, torn down with the isolation
    /// check), its wall time minus the step's.
    pub const SCENARIO_OVERHEAD: &str = "scenario_overhead";
    /// Part of it: starting the holder until it said hello.
    pub const WORKER_START: &str = "worker_start";
    /// Part of it: tearing the scenario down (workers exit, isolation check).
    pub const SCENARIO_FINISH: &str = "scenario_finish";
}

/// One measured quantity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// One of [`key`].
    pub key: String,
    /// What was measured, for people (sizes, errno observed).
    pub what: String,
    /// Unit of the samples: `ms`, `us` or `MiB/s`.
    pub unit: String,
    /// Every sample, in the order taken.
    pub samples: Vec<f64>,
    /// Why the figure could not be measured (e.g. the stock kernel has no
    /// layout leases), or what went wrong; samples may then be short.
    #[serde(default)]
    pub error: Option<String>,
}

impl Figure {
    /// The median sample, if any (the mean of the middle two for an even count).
    pub fn median(&self) -> Option<f64> {
        median(&self.samples)
    }

    /// The largest sample.
    pub fn max(&self) -> Option<f64> {
        self.samples.iter().copied().fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
    }
}

/// What the guest measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchResults {
    /// Every figure, in the order measured.
    pub figures: Vec<Figure>,
}

impl BenchResults {
    /// The figure with this key.
    pub fn get(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.key == key)
    }
}

/// Median of `xs` (NaNs sort last); `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        let f = Figure { samples: vec![2.0, 9.0, 4.0], ..Default::default() };
        assert_eq!(f.max(), Some(9.0));
        assert_eq!(f.median(), Some(4.0));
        assert_eq!(Figure::default().max(), None);
    }

    #[test]
    fn plan_round_trips_and_rejects_unknown_fields() {
        let p = BenchPlan::default();
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<BenchPlan>(&j).unwrap(), p);
        assert!(
            serde_json::from_str::<BenchPlan>(r#"{"reps":1,"reg_mib":1,"write_mib":1,"fail_reps":1,"x":1}"#).is_err()
        );
    }
}
