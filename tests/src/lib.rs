//! The data pinlab passes around: scenario specs (YAML, written by people),
//! the plan the host hands to a guest (JSON), and the results the guest hands
//! back (JSON).
//!
//! The host (`xtask`) reads [`spec`]s, turns them into a [`plan::Plan`] for
//! one boot, and later compares the guest's [`results::BootResults`] with the
//! expectations ([`spec::Scenario::expected`]). The guest (`pinlab-runner` in
//! `demos/`) only sees the plan: it never knows what is expected of it.
#![deny(missing_docs)]

pub mod bench;
pub mod errno;
pub mod plan;
pub mod protocol;
pub mod results;
pub mod spec;

use serde::{Deserialize, Serialize};
use std::fmt;

/// A kernel flavor: which source tree and patches a kernel is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// Unpatched Linux 6.12.
    Stock,
    /// Linux 6.12 with `kernel-patches/` applied.
    Patched,
    /// A teaching kernel: stock 6.12 with `kernel-patches/hazard/`, which
    /// allows long-term pins of FS-DAX pages again (as before v4.15) and can
    /// make truncate wait for them (v4.18+) or free them at once (before).
    Hazard,
    /// Stock with `kernel-config/debug/` (KASAN, lockdep, the hang
    /// detectors): built on demand, to tell whether a splat seen on `debug`
    /// is the series' or was there before. Expects what stock does.
    #[serde(rename = "stock-debug")]
    StockDebug,
    /// Patched with `kernel-config/debug/`. Expects what patched does, and
    /// no splat.
    Debug,
}

impl Flavor {
    /// Every flavor, in report order.
    pub const ALL: [Flavor; 5] = [Flavor::Stock, Flavor::Patched, Flavor::Hazard, Flavor::StockDebug, Flavor::Debug];

    /// The flavors scenario specs name in their expectations; the debug
    /// flavors expect what their [`Flavor::base`] does.
    pub const SPEC: [Flavor; 3] = [Flavor::Stock, Flavor::Patched, Flavor::Hazard];

    /// The name used on the command line, in paths and in specs.
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Stock => "stock",
            Flavor::Patched => "patched",
            Flavor::Hazard => "hazard",
            Flavor::StockDebug => "stock-debug",
            Flavor::Debug => "debug",
        }
    }

    /// The flavor whose source, patches and expectations this one shares:
    /// itself, or for a debug flavor the one it adds the checkers to.
    pub fn base(self) -> Flavor {
        match self {
            Flavor::StockDebug => Flavor::Stock,
            Flavor::Debug => Flavor::Patched,
            f => f,
        }
    }

    /// A kernel with KASAN, lockdep and the hang detectors (`kernel-config/debug/`).
    pub fn is_debug(self) -> bool {
        self.base() != self
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Flavor {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Flavor::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            anyhow::anyhow!("unknown kernel flavor '{s}' (expected stock, patched, hazard, debug or stock-debug)")
        })
    }
}

/// A filesystem the DAX namespace is formatted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    /// ext4, `mkfs.ext4`, `mount -o dax`.
    Ext4,
    /// xfs, `mkfs.xfs`, `mount -o dax`.
    Xfs,
}

impl Fs {
    /// Every filesystem, in report order.
    pub const ALL: [Fs; 2] = [Fs::Ext4, Fs::Xfs];

    /// The name used on the command line, in paths, in specs and for `mount -t`.
    pub fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }
}

impl fmt::Display for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Fs {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Fs::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown filesystem '{s}' (expected ext4 or xfs)"))
    }
}
