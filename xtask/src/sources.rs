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

/// A resolution as remembered under `apt/resolved/<key>.json`: the key
/// covers the lock, packages.txt, the kernel pin and the lists' InRelease
/// files, so a warm run neither parses the 56 MB index nor asks apt again
/// until an update brings new lists.
#[derive(Serialize, Deserialize)]
struct Resolution {
    kernel_version: String,
    packages: Vec<(String, String)>,
    drift: Vec<Drift>,
    /// Locked pins the archive no longer serves.
    missing: Vec<(String, String)>,
    /// Index entries of `packages` and the kernel, for verifying downloads.
    entries: Vec<(String, apt::Entry)>,
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

/// Resolve against the current lists (no network), without judging drift.
fn resolve_fresh(apt: &Apt, lock: &[(String, String)], pinned_kernel: &str) -> Result<Resolution> {
    let (index, missing) = apt.index_for(lock, &[kernel::SOURCE_PACKAGE.to_string()])?;
    let served = index.versions(kernel::SOURCE_PACKAGE);
    let kernel_version = if served.contains(&pinned_kernel) {
        pinned_kernel.to_string()
    } else {
        apt::newest(&served)?.with_context(|| {
            format!("Debian serves no {} at all (check the private apt lists)", kernel::SOURCE_PACKAGE)
        })?
    };
    let (packages, index) = if missing.is_empty() {
        (lock.to_vec(), index)
    } else {
        // Change as little as possible: keep every pin that is still served,
        // let apt pick the current version of the others (and any new
        // dependency); only if that set does not hold together, resolve
        // packages.txt afresh.
        let args: Vec<String> = lock
            .iter()
            .map(|(n, v)| if missing.iter().any(|(m, _)| m == n) { n.clone() } else { format!("{n}={v}") })
            .collect();
        let used = match apt.simulate(&args) {
            Ok(mut set) => {
                set.sort();
                set
            }
            Err(e) => {
                eprintln!(
                    "image: keeping the other pins does not resolve ({}); resolving image/packages.txt afresh",
                    format!("{e:#}").lines().find(|l| l.contains("E:")).unwrap_or("apt refused")
                );
                let mut set = apt.simulate(&crate::image::wanted_packages()?)?;
                set.sort();
                set
            }
        };
        let (index, still) = apt.index_for(&used, &[kernel::SOURCE_PACKAGE.to_string()])?;
        if !still.is_empty() {
            bail!("apt resolved versions the archive index does not list: {still:?}");
        }
        (used, index)
    };
    let mut entries = Vec::new();
    for (n, v) in packages.iter().chain(std::iter::once(&(kernel::SOURCE_PACKAGE.to_string(), kernel_version.clone())))
    {
        let e = index.get(n, v).with_context(|| format!("{n}={v} is not in the archive index"))?;
        entries.push((n.clone(), e.clone()));
    }
    let drift = diff(lock, &packages);
    Ok(Resolution { kernel_version, packages, drift, missing, entries })
}

/// Resolve the kernel source and the rootfs packages of `lock_text` (the
/// text of image/packages.lock); `locked` turns drift into an error.
pub fn resolve_with(cache: &Cache, lock_text: &str, pinned_kernel: &str, locked: bool) -> Result<Sources> {
    let t = Instant::now();
    let apt = Apt::new(cache)?;
    apt.update(false)?;
    let lock = crate::image::parse_lock(lock_text)?;
    let wanted = fs_err::read_to_string(util::project_root().join("image/packages.txt")).unwrap_or_default();
    let key = util::KeyHasher::default()
        .part("recipe", b"pinlab-resolution-1")
        .part("lock", lock_text.as_bytes())
        .part("wanted", wanted.as_bytes())
        .part("kernel", pinned_kernel.as_bytes())
        .part("lists", apt.lists_id()?.as_bytes())
        .finish();
    let path = apt.resolved_dir().join(format!("{key}.json"));
    let remembered = fs_err::read(&path).ok().and_then(|b| serde_json::from_slice::<Resolution>(&b).ok());
    let r = match remembered {
        Some(r) => r,
        None => {
            let r = resolve_fresh(&apt, &lock, pinned_kernel)?;
            fs_err::create_dir_all(apt.resolved_dir())
                .with_context(|| format!("Failed to create {}", apt.resolved_dir().display()))?;
            util::write_atomic(&path, &serde_json::to_vec_pretty(&r)?)?;
            r
        }
    };
    if r.kernel_version != pinned_kernel {
        if locked {
            bail!(
                "--locked: Debian no longer serves {}={pinned_kernel} (the newest it serves is {}); drop --locked \
                 to build that, or update SOURCE_VERSION in xtask/src/kernel.rs",
                kernel::SOURCE_PACKAGE,
                r.kernel_version
            );
        }
        eprintln!(
            "kernel source: {}={pinned_kernel} is no longer served; using {}, the newest in trixie, trixie-updates \
             and trixie-security (the series is applied with a 3-way git am)",
            kernel::SOURCE_PACKAGE,
            r.kernel_version
        );
    }
    if !r.missing.is_empty() {
        let list: Vec<String> = r.missing.iter().map(|(n, v)| format!("{n}={v}")).collect();
        if locked {
            bail!(
                "--locked: Debian no longer serves {} locked package version(s): {}\n\
                 Drop --locked to use the current versions, or refresh the lock with `cargo xtask image --update-lock`.",
                list.len(),
                list.join(", ")
            );
        }
        eprintln!(
            "image: {} of {} locked versions are no longer served ({}); using the current ones from the same suites:",
            r.missing.len(),
            lock.len(),
            list.join(", ")
        );
        for d in &r.drift {
            eprintln!("  {d}");
        }
        eprintln!("  (image/packages.lock is unchanged; `cargo xtask image --update-lock` records the new set)");
    }
    eprintln!(
        "sources: kernel {}={}, rootfs {} packages{} (resolved in {})",
        kernel::SOURCE_PACKAGE,
        r.kernel_version,
        r.packages.len(),
        if r.drift.is_empty() { String::new() } else { format!(", {} drifted from the lock", r.drift.len()) },
        util::since(t)
    );
    let mut index = Index::default();
    for (n, e) in r.entries {
        index.insert(n, e);
    }
    Ok(Sources { kernel_version: r.kernel_version, packages: r.packages, drift: r.drift, index })
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
