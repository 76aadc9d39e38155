//! What the host asks one guest boot to do: the scenarios' steps, without
//! their expectations. Written by xtask as `plan.json` on the run share, read
//! by `pinlab-runner` in the guest.

use crate::{Flavor, Fs};
use serde::{de, Deserialize, Deserializer, Serialize};

/// One boot's work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The kernel flavor being booted (for the record; the guest does not branch on it).
    pub flavor: Flavor,
    /// The filesystem to make on the fsdax namespace and mount with `-o dax`.
    pub fs: Fs,
    /// Scenarios to run, in order.
    pub scenarios: Vec<PlannedScenario>,
}

/// A scenario as the guest sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedScenario {
    /// Stable id, `S01`…`S18`.
    pub id: String,
    /// One-line title.
    pub title: String,
    /// Steps, run in order by one holder process unless a step says otherwise.
    pub steps: Vec<PlannedStep>,
}

/// One step of a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedStep {
    /// What the step does, in words, for the report.
    pub name: String,
    /// What the runner does.
    pub action: Action,
    /// A probe observes an outcome (often an error) and the scenario goes on
    /// whatever it is; any other step that fails ends the scenario ("stops at").
    #[serde(default)]
    pub probe: bool,
}

/// The things a runner can do. Each records `ok` or the errno it got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Map a fresh region of `size` bytes shared and writable: anonymous
    /// memory, a new file on the filesystem under test (whatever its mount's
    /// DAX mode), or the device-DAX character device.
    Map {
        /// What backs the mapping.
        target: Target,
        /// Length in bytes; `2M`, `1G` and plain numbers are accepted. Default 2 MiB.
        #[serde(default)]
        size: Size,
    },
    /// `ibv_reg_mr` on the whole mapped region (local write, remote write).
    RegMr,
    /// A separate client process connects over rxe with an RC queue pair and
    /// RDMA-WRITEs a known pattern into the whole registered region.
    RdmaWrite,
    /// The runner compares the region's bytes with the pattern the client
    /// wrote: `ok` or `mismatch` with the first differing offset.
    Verify,
    /// `ibv_dereg_mr`.
    DeregMr,
    /// Unmount the filesystem under test and mount it again with `-o dax=MODE`
    /// (the runner restores `dax=always` after the scenario).
    Remount {
        /// The DAX mode to mount with.
        dax: DaxMode,
    },
}

impl Action {
    /// A short name for tables: `map`, `reg_mr`, ….
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Map { .. } => "map",
            Action::RegMr => "reg_mr",
            Action::RdmaWrite => "rdma_write",
            Action::Verify => "verify",
            Action::DeregMr => "dereg_mr",
            Action::Remount { .. } => "remount",
        }
    }
}

/// What backs a mapped region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `MAP_ANONYMOUS | MAP_SHARED`.
    Anon,
    /// A fresh file on the filesystem under test, `MAP_SHARED`.
    File,
    /// The device-DAX namespace `/dev/daxX.Y`, `MAP_SHARED`.
    Devdax,
}

/// `-o dax=` modes (Documentation/filesystems/dax.rst).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaxMode {
    /// Every file is DAX.
    Always,
    /// No file is DAX: ordinary page cache.
    Never,
}

impl DaxMode {
    /// The `-o dax=` value.
    pub fn name(self) -> &'static str {
        match self {
            DaxMode::Always => "always",
            DaxMode::Never => "never",
        }
    }
}

/// A byte count written as `4096`, `64K`, `2M` or `1G` (binary units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Size(pub u64);

impl Default for Size {
    fn default() -> Self {
        Size(2 << 20)
    }
}

impl Size {
    /// Parse `4096`, `64K`, `2M`, `1G` (optionally with `iB`).
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let t = t.strip_suffix("iB").unwrap_or(t);
        let (num, mul) = match t.chars().last() {
            Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
            Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
            Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
            _ => (t, 1),
        };
        let n: u64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size (examples: 4096, 64K, 2M, 1G)"))?;
        let bytes = n.checked_mul(mul).ok_or_else(|| format!("size '{s}' is too large"))?;
        if bytes == 0 || bytes % 4096 != 0 {
            return Err(format!("size '{s}' must be a non-zero multiple of 4096"));
        }
        Ok(Size(bytes))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Size::parse(&n.to_string()).map_err(de::Error::custom),
            Raw::S(s) => Size::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// The byte the client writes at `offset` of a region: a pattern that a
/// zeroed, stale or shifted buffer cannot match by accident.
pub fn pattern_byte(offset: u64) -> u8 {
    // Mix the page number in so a page written to the wrong place is caught.
    let page = offset >> 12;
    ((offset.wrapping_mul(31)) ^ page.wrapping_mul(0x9e) ^ 0xa5) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("2M").unwrap(), Size(2 << 20));
        assert_eq!(Size::parse("64KiB").unwrap(), Size(64 << 10));
        assert_eq!(Size::parse("4096").unwrap(), Size(4096));
        assert!(Size::parse("12").unwrap_err().contains("multiple of 4096"));
        assert!(Size::parse("two").unwrap_err().contains("not a size"));
        assert!(Size::parse("0").is_err());
    }

    #[test]
    fn plan_round_trips_through_json() {
        let plan = Plan {
            flavor: Flavor::Stock,
            fs: Fs::Xfs,
            scenarios: vec![PlannedScenario {
                id: "S02".into(),
                title: "t".into(),
                steps: vec![
                    PlannedStep {
                        name: "map".into(),
                        action: Action::Map { target: Target::File, size: Size(4096) },
                        probe: false,
                    },
                    PlannedStep { name: "reg".into(), action: Action::RegMr, probe: true },
                ],
            }],
        };
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
    }

    #[test]
    fn pattern_differs_between_pages() {
        assert_ne!(pattern_byte(0), pattern_byte(4096));
        assert_ne!(pattern_byte(0), 0);
    }
}
