//! What pinlab downloads, resolved once per command before anything is
//! built: the kernel source package and the rootfs packages.
//!
//! `image/packages.lock` and [`kernel::SOURCE_VERSION`] are the record of
//! what was last tested. Debian serves only the current version of a suite,
//! so a pin rots within weeks. When a pinned version is no longer served,
//! pinlab resolves the current one from the same suites (trixie,
//! trixie-updates, trixie-security), prints one line per change and uses it;
//! `--locked` makes that an error instead. What a run actually used is
//! recorded in its results.

use crate::apt::{self, Apt, Index};
use crate::kernel;
use crate::util::{self, Cache};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// One package whose version differs from the lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// Package name.
    pub name: String,
    /// The locked version (`None`: a new dependency).
    pub locked: Option<String>,
    /// The version used (`None`: no longer needed).
    pub used: Option<String>,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.locked, &self.used) {
            (Some(o), Some(n)) => write!(f, "{} {o} → {n}", self.name),
            (None, Some(n)) => write!(f, "{} (new dependency) → {n}", self.name),
            (Some(o), None) => write!(f, "{} {o} → (no longer needed)", self.name),
            (None, None) => write!(f, "{}", self.name),
        }
    }
}

/// What a run's guest and kernels are made from, as recorded in results.json.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The Debian kernel source version used.
    pub kernel_source: String,
    /// The pinned kernel source version (differs when it drifted).
    pub kernel_source_pinned: String,
    /// The exact package set of the rootfs (`name=version`).
    pub packages: Vec<String>,
    /// Packages whose version differs from image/packages.lock.
    pub drift: Vec<Drift>,
}

/// The resolved sources.
pub struct Sources {
    /// The kernel source version to build.
    pub kernel_version: String,
    /// The rootfs package set.
    pub packages: Vec<(String, String)>,
    /// Rootfs drift from the lock.
    pub drift: Vec<Drift>,
    index: Index,
}

/// Compare a lock with a resolved set: one [`Drift`] per difference.
pub fn diff(lock: &[(String, String)], used: &[(String, String)]) -> Vec<Drift> {
    let l: std::collections::BTreeMap<_, _> = lock.iter().cloned().collect();
    let u: std::collections::BTreeMap<_, _> = used.iter().cloned().collect();
    let mut names: Vec<&String> = l.keys().chain(u.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| l.get(*n) != u.get(*n))
        .map(|n| Drift { name: n.clone(), locked: l.get(n).cloned(), used: u.get(n).cloned() })
        .collect()
}

/// Resolve the kernel source and the rootfs packages of `lock` (the text of
/// image/packages.lock); `locked` turns drift into an error.
pub fn resolve_with(cache: &Cache, lock_text: &str, pinned_kernel: &str, locked: bool) -> Result<Sources> {
    let t = Instant::now();
    let apt = Apt::new(cache)?;
    let lock = crate::image::parse_lock(lock_text)?;
    let (index, missing) = apt.index_for(&lock, &[kernel::SOURCE_PACKAGE.to_string()])?;

    // The kernel: the pin, else the newest the suites serve.
    let served = index.versions(kernel::SOURCE_PACKAGE);
    let kernel_version = if served.contains(&pinned_kernel) {
        pinned_kernel.to_string()
    } else if locked {
        bail!(
            "--locked: Debian no longer serves {}={pinned_kernel} (it serves {}); drop --locked to build the newest, \
             or update SOURCE_VERSION in xtask/src/kernel.rs",
            kernel::SOURCE_PACKAGE,
            served.join(", ")
        );
    } else {
        let v = apt::newest(&served)?.with_context(|| {
            format!("Debian serves no {} at all (check the private apt lists)", kernel::SOURCE_PACKAGE)
        })?;
        eprintln!(
            "kernel source: {}={pinned_kernel} is no longer served; using {v}, the newest in trixie, trixie-updates \
             and trixie-security (the series is applied with a 3-way git am)",
            kernel::SOURCE_PACKAGE
        );
        v
    };

    // The rootfs: the lock, else a fresh resolution of packages.txt.
    let (packages, drift, index) = if missing.is_empty() {
        (lock, Vec::new(), index)
    } else if locked {
        let list: Vec<String> = missing.iter().map(|(n, v)| format!("{n}={v}")).collect();
        bail!(
            "--locked: Debian no longer serves {} locked package version(s): {}\n\
             Drop --locked to use the current versions, or refresh the lock with `cargo xtask image --update-lock`.",
            list.len(),
            list.join(", ")
        );
    } else {
        let fresh = apt.resolve(&crate::image::wanted_packages()?)?;
        let drift = diff(&lock, &fresh);
        eprintln!(
            "image: {} of {} locked versions are no longer served; resolved the current ones from the same suites:",
            missing.len(),
            lock.len()
        );
        for d in &drift {
            eprintln!("  {d}");
        }
        eprintln!("  (image/packages.lock is unchanged; `cargo xtask image --update-lock` records the new set)");
        let (index, still) = apt.index_for(&fresh, &[kernel::SOURCE_PACKAGE.to_string()])?;
        if !still.is_empty() {
            bail!("apt resolved versions the archive index does not list: {still:?}");
        }
        (fresh, drift, index)
    };
    eprintln!(
        "sources: kernel {}={kernel_version}, rootfs {} packages{} (resolved in {})",
        kernel::SOURCE_PACKAGE,
        packages.len(),
        if drift.is_empty() { String::new() } else { format!(", {} drifted", drift.len()) },
        util::since(t)
    );
    Ok(Sources { kernel_version, packages, drift, index })
}

/// [`resolve_with`] the shipped lock and kernel pin.
pub fn resolve(cache: &Cache, locked: bool) -> Result<Sources> {
    resolve_with(cache, &crate::image::read_lock()?, kernel::SOURCE_VERSION, locked)
}

impl Sources {
    /// The verified .debs of the rootfs packages (downloaded if needed).
    pub fn rootfs_debs(&self, cache: &Cache) -> Result<Vec<PathBuf>> {
        Apt::new(cache)?.fetch_verified(&self.index, &self.packages)
    }

    /// The verified kernel source .deb (downloaded if needed).
    pub fn kernel_deb(&self, cache: &Cache) -> Result<PathBuf> {
        let pkg = [(kernel::SOURCE_PACKAGE.to_string(), self.kernel_version.clone())];
        Ok(Apt::new(cache)?.fetch_verified(&self.index, &pkg)?.remove(0))
    }

    /// What to record in results.json.
    pub fn provenance(&self) -> Provenance {
        Provenance {
            kernel_source: self.kernel_version.clone(),
            kernel_source_pinned: kernel::SOURCE_VERSION.to_string(),
            packages: self.packages.iter().map(|(n, v)| format!("{n}={v}")).collect(),
            drift: self.drift.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn drift_lines() {
        let lock = p(&[("libc6", "2.41-12+deb13u4"), ("bash", "5.2"), ("gone", "1")]);
        let used = p(&[("libc6", "2.41-12+deb13u5"), ("bash", "5.2"), ("newdep", "2")]);
        let d: Vec<String> = diff(&lock, &used).iter().map(|d| d.to_string()).collect();
        assert_eq!(
            d,
            vec![
                "gone 1 → (no longer needed)",
                "libc6 2.41-12+deb13u4 → 2.41-12+deb13u5",
                "newdep (new dependency) → 2"
            ]
        );
        assert!(diff(&lock, &lock).is_empty());
    }
}
