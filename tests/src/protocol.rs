//! The host↔guest protocol, in one place.
//!
//! Two channels:
//! - **Files on the run share** (`/pinlab` in the guest): the host writes
//!   [`PLAN_FILE`] (a [`crate::plan::Plan`]) before the boot, the runner
//!   writes [`RESULTS_FILE`] (a [`crate::results::BootResults`]) as it goes.
//! - **The serial console**: every message from a pinlab program is one line,
//!   [`MARK`] followed by the JSON of a [`GuestEvent`]. The host streams these
//!   as they arrive (progress, `--explain`, the watchdog) and never parses
//!   pinlab's own prose; kernel output between them is only scanned for
//!   splats.
//!
//! A step's result is a [`StepOutcome`] from the moment the guest observes
//! it until the report prints it: it serializes once, as serde data, and is
//! never re-derived from a message's text.

use crate::plan::Proc;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The plan, on the run share.
pub const PLAN_FILE: &str = "plan.json";
/// What the runner observed, on the run share.
pub const RESULTS_FILE: &str = "guest-results.json";
/// Where the run share is mounted in the guest.
pub const GUEST_SHARE: &str = "/pinlab";
/// The run share's directory where the host answers
/// [`GuestEvent::LocateRequest`]s, one file per token.
pub const HOST_SCAN_DIR: &str = "host-scan";
/// The kernel command-line switch that makes pinlab-init start a shell
/// after setting up the lab instead of running the plan.
pub const SHELL_MODE: &str = "pinlab.mode=shell";

/// Prefix of every pinlab console message.
pub const MARK: &str = "PINLAB-EVENT ";

/// How one step ended, as the guest saw it (and, for [`StepOutcome::Missing`],
/// as the host did not see it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// The call succeeded (and for `verify`, the bytes matched).
    Ok,
    /// The kernel refused with this errno (canonical name, e.g. `ETXTBSY`).
    Errno(String),
    /// The calls succeeded but what was read back is not what was expected
    /// (data, a lease type, a `file_pins` listing).
    Mismatch,
    /// The step was still blocked in the kernel at the guest's step deadline.
    Blocked,
    /// pinlab itself failed (a tool, a worker, the environment), not the kernel.
    Error,
    /// The step was not executed: an earlier step ended the scenario.
    NotRun,
    /// Host side only: the guest reported nothing for this step.
    Missing,
}

impl StepOutcome {
    /// The spelling in tables and reports.
    pub fn as_str(&self) -> &str {
        match self {
            StepOutcome::Ok => "ok",
            StepOutcome::Errno(e) => e,
            StepOutcome::Mismatch => "mismatch",
            StepOutcome::Blocked => "blocked",
            StepOutcome::Error => "error",
            StepOutcome::NotRun => "not run",
            StepOutcome::Missing => "missing",
        }
    }

    /// Whether the step ran and succeeded.
    pub fn is_ok(&self) -> bool {
        *self == StepOutcome::Ok
    }

    /// Whether the step ran (or, for [`StepOutcome::Missing`], should have).
    pub fn ran(&self) -> bool {
        *self != StepOutcome::NotRun
    }
}

impl fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&crate::spec::Outcome> for StepOutcome {
    fn from(o: &crate::spec::Outcome) -> Self {
        match o {
            crate::spec::Outcome::Ok => StepOutcome::Ok,
            crate::spec::Outcome::Errno(e) => StepOutcome::Errno(e.clone()),
            crate::spec::Outcome::Blocked => StepOutcome::Blocked,
            crate::spec::Outcome::Mismatch => StepOutcome::Mismatch,
        }
    }
}

/// One console message from a pinlab program in the guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GuestEvent {
    /// pinlab-init mounted everything and starts the runner (the boot
    /// deadline ends here).
    RunnerStarted,
    /// The runner starts a scenario.
    ScenarioStarted {
        /// Scenario id.
        id: String,
        /// Its title.
        title: String,
    },
    /// The runner finished a step.
    StepFinished {
        /// Scenario id.
        id: String,
        /// Step index in the scenario (0-based).
        index: usize,
        /// The process that ran it.
        by: Proc,
        /// The step's name.
        name: String,
        /// How it ended.
        outcome: StepOutcome,
        /// What the kernel said and what was observed, for people.
        detail: String,
        /// What a `locate` step saw, so that `--explain` can say where the
        /// NIC's bytes are as the step ends (the host adds its own scan
        /// before it hands the event on).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        located: Option<Box<crate::results::Located>>,
    },
    /// A `locate` step found the scenario's pattern on the namespace and
    /// waits for the host to search the NVDIMM backing file for it too. The
    /// host answers by creating `HOST_SCAN_DIR/<token>` in the run share.
    LocateRequest {
        /// Scenario id.
        id: String,
        /// Step index in the scenario (0-based).
        index: usize,
        /// Names the host's answer.
        token: String,
        /// Where the block device's byte 0 is in the NVDIMM.
        nvdimm_offset: u64,
        /// The block device's size in bytes.
        device_bytes: u64,
        /// The scenario's pattern seed.
        seed: u64,
        /// The client's region, in 4 KiB blocks.
        region_blocks: u64,
    },
    /// The runner starts the benchmark plan.
    BenchStarted,
    /// A benchmark figure gained a sample, or failed.
    BenchSample {
        /// The figure's key.
        key: String,
        /// Samples so far.
        samples: usize,
        /// The latest sample.
        value: Option<f64>,
        /// Its unit.
        unit: String,
        /// Why the figure could not be measured.
        error: Option<String>,
    },
    /// The runner finished and the results are synced; the guest powers off next.
    Done {
        /// The runner's exit code.
        rc: i32,
    },
}

impl GuestEvent {
    /// The console line for this event (without a newline).
    pub fn line(&self) -> String {
        // Serializing a derive(Serialize) enum of strings and numbers cannot fail.
        format!("{MARK}{}", serde_json::to_string(self).unwrap_or_default())
    }

    /// Print the event on stdout (the console), as one write.
    pub fn emit(&self) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", self.line());
        let _ = out.flush();
    }

    /// The event on a console line, if it carries one. Kernel output may be
    /// printed on the same line before or after the message; what follows
    /// the JSON value is ignored.
    pub fn parse(line: &str) -> Option<GuestEvent> {
        let rest = &line[line.find(MARK)? + MARK.len()..];
        serde_json::Deserializer::from_str(rest).into_iter::<GuestEvent>().next()?.ok()
    }
}

impl fmt::Display for GuestEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestEvent::RunnerStarted => f.write_str("runner started"),
            GuestEvent::ScenarioStarted { id, title } => write!(f, "{id} {title}"),
            GuestEvent::StepFinished { id, index, by, name, outcome, detail, .. } => {
                write!(f, "{id} step {} [{}] {name}: {outcome}", index + 1, by.name())?;
                if !detail.is_empty() {
                    write!(f, " ({detail})")?;
                }
                Ok(())
            }
            GuestEvent::LocateRequest { id, index, nvdimm_offset, .. } => {
                write!(f, "{id} step {}: asks the host to search the NVDIMM (device at {nvdimm_offset:#x})", index + 1)
            }
            GuestEvent::BenchStarted => f.write_str("bench started"),
            GuestEvent::BenchSample { key, error: Some(e), .. } => write!(f, "{key}: error: {e}"),
            GuestEvent::BenchSample { key, samples, value, unit, .. } => {
                write!(f, "{key} #{samples}: {:.1} {unit}", value.unwrap_or(f64::NAN))
            }
            GuestEvent::Done { rc } => write!(f, "done (rc={rc})"),
        }
    }
}

/// The messages a worker process and the runner exchange over the control
/// socket (one JSON object per line).
pub mod worker {
    use super::StepOutcome;
    use crate::plan::{Action, Proc};
    use serde::{Deserialize, Serialize};

    /// A worker's first message: who it is.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Hello {
        /// Its role.
        pub role: Proc,
        /// Its pid.
        pub pid: i32,
    }

    /// The runner asks a worker to do one action.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Request {
        /// What to do.
        pub action: Action,
    }

    /// A worker's answer.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Reply {
        /// How it ended.
        pub outcome: StepOutcome,
        /// What happened, for people.
        pub detail: String,
        /// What a `locate` found.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub placement: Option<crate::results::Placement>,
        /// What a `locate` saw, block by block.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub located: Option<crate::results::Located>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_a_console_line() {
        let evs = [
            GuestEvent::RunnerStarted,
            GuestEvent::ScenarioStarted { id: "S05".into(), title: "truncate \"under\" a pin".into() },
            GuestEvent::StepFinished {
                id: "S05".into(),
                index: 3,
                by: Proc::Other,
                name: "truncate".into(),
                outcome: StepOutcome::Errno("ETXTBSY".into()),
                detail: "truncate(/mnt/pmem/S05.dat, 0)\nbusy".into(),
                located: None,
            },
            GuestEvent::StepFinished {
                id: "S05".into(),
                index: 4,
                by: Proc::Holder,
                name: "verify".into(),
                outcome: StepOutcome::Mismatch,
                detail: String::new(),
                located: None,
            },
            GuestEvent::StepFinished {
                id: "S20".into(),
                index: 7,
                by: Proc::Other,
                name: "locate".into(),
                outcome: StepOutcome::Ok,
                detail: "512 blocks".into(),
                located: Some(Box::new(crate::results::Located {
                    device: "/dev/pmem0".into(),
                    device_bytes: 1 << 30,
                    nvdimm_offset: Some(0x20_0000),
                    seed: 7,
                    region_blocks: 512,
                    nic: vec![crate::results::Run { start: 100, len: 512 }],
                    owners: [("victim.dat".to_string(), vec![crate::results::Run { start: 0, len: 4096 }])].into(),
                    host: None,
                })),
            },
            GuestEvent::BenchSample { key: "reg".into(), samples: 2, value: Some(1.5), unit: "ms".into(), error: None },
            GuestEvent::Done { rc: 0 },
        ];
        for e in evs {
            let line = e.line();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(GuestEvent::parse(&line), Some(e.clone()), "{line}");
            // Kernel output around it on the same line.
            let noisy = format!("[   3.1] rxe: x{line}[   3.2] more");
            assert_eq!(GuestEvent::parse(&noisy), Some(e), "{noisy}");
        }
        assert_eq!(GuestEvent::parse("pinlab-runner: fsck: ok"), None);
        assert_eq!(GuestEvent::parse("PINLAB-EVENT {\"event\":\"runner_sta"), None);
    }

    #[test]
    fn outcomes_serialize_as_data() {
        let j = serde_json::to_string(&StepOutcome::Errno("EPERM".into())).unwrap();
        assert_eq!(j, r#"{"errno":"EPERM"}"#);
        assert_eq!(serde_json::to_string(&StepOutcome::NotRun).unwrap(), r#""not_run""#);
        assert_eq!(StepOutcome::NotRun.to_string(), "not run");
        assert_eq!(StepOutcome::from(&crate::spec::Outcome::Ok), StepOutcome::Ok);
    }
}
