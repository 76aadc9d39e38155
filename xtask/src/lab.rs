//! Everything a boot needs, resolved once per command: host tools, sources
//! (with drift handled), downloads, kernels per flavor, rootfs with the
//! demos, virtiofsd and the accelerator. `run`, `shell`, `bench` and `test`
//! all start here.
//!
//! Order matters for a newcomer's first run: every download is resolved and
//! fetched before the first kernel build starts (a bad download fails in
//! seconds, not after twenty minutes of compiling), and virtiofsd, the demos
//! and the rootfs are built on a second thread while the kernels compile.

use crate::host::{self, Need};
use crate::kernel::{self, Kernel, Source};
use crate::qemu::Accel;
use crate::sources::{self, Provenance, Sources};
use crate::util::{self, Cache};
use anyhow::{Context, Result};
use pinlab_scenarios::Flavor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to prepare.
#[derive(Clone, Debug, Default)]
pub struct LabOpts {
    /// Kernel flavors to build (deduplicated, in order).
    pub flavors: Vec<Flavor>,
    /// `--kernel-tree`.
    pub kernel_tree: Option<PathBuf>,
    /// `--no-install`.
    pub no_install: bool,
    /// `--locked`: a pinned version Debian no longer serves is an error.
    pub locked: bool,
    /// `--accel`.
    pub accel: Option<Accel>,
}

/// A prepared lab.
pub struct Lab {
    /// One kernel per requested flavor that built, in order.
    pub kernels: Vec<Kernel>,
    /// The flavors whose kernel could not be built, and why: their boots
    /// are reported as not run, the others still run.
    pub failed: Vec<(Flavor, String)>,
    /// The rootfs (packages + overlay + demos).
    pub rootfs: PathBuf,
    /// The virtiofsd binary.
    pub virtiofsd: PathBuf,
    /// pinlab's QEMU.
    pub qemu: crate::qemu::QemuBin,
    /// The accelerator.
    pub accel: Accel,
    /// What the kernels and rootfs were made from.
    pub provenance: Provenance,
    /// Where the set-up time went.
    pub timings: Timings,
}

/// Named durations, in the order they finished.
#[derive(Default)]
pub struct Timings(Mutex<Vec<(String, Duration)>>);

impl Timings {
    /// Time `f` under `name`.
    pub fn time<T>(&self, name: impl Into<String>, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let r = f();
        if let Ok(mut v) = self.0.lock() {
            v.push((name.into(), t.elapsed()));
        }
        r
    }

    /// Record a measured phase.
    pub fn add(&self, name: impl Into<String>, d: Duration) {
        if let Ok(mut v) = self.0.lock() {
            v.push((name.into(), d));
        }
    }

    /// The phases that took at least `min`, as `name  4m05s` lines.
    pub fn summary(&self, min: Duration) -> Vec<String> {
        let v = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        v.iter().filter(|(_, d)| *d >= min).map(|(n, d)| format!("  {:<44} {:>8}", n, util::fmt_duration(*d))).collect()
    }
}

/// Deduplicate, keeping the first occurrence.
pub fn dedup<T: PartialEq + Clone>(v: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for x in v {
        if !out.contains(x) {
            out.push(x.clone());
        }
    }
    out
}

/// Prepare everything for booting `opts.flavors`.
pub fn prepare(cache: &Cache, opts: &LabOpts) -> Result<Lab> {
    let timings = Timings::default();
    let flavors = dedup(&opts.flavors);
    // Refuse a mislabelled tree before minutes of set-up, not after.
    if let Some(t) = &opts.kernel_tree {
        for &f in flavors.iter().filter(|f| **f != Flavor::Stock) {
            let t = t.canonicalize().with_context(|| format!("--kernel-tree {} does not exist", t.display()))?;
            kernel::check_tree(f, &t, &kernel::series_of(f)?)?;
        }
    }
    timings.time("host packages", || {
        host::ensure(&[Need::Kernel, Need::Demos, Need::Image, Need::Boot, Need::Virtiofsd], opts.no_install)
    })?;
    let mut sources =
        timings.time("resolve sources (Debian archive index)", || sources::resolve(cache, opts.locked))?;
    let source = match &opts.kernel_tree {
        Some(p) => Source::Tree(p.clone()),
        None => Source::Debian,
    };
    // Every download first: a bad one fails in seconds, not after the kernels.
    timings.time("downloads (kernel source, rootfs packages, crates)", || {
        match prefetch(cache, &sources, &flavors, &source) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The lists may be a day old and name a version the mirror
                // has since dropped: refresh, resolve again, retry once.
                eprintln!("downloads: {e:#}\ndownloads: refreshing the archive lists and resolving again");
                crate::apt::Apt::new(cache)?.update(true)?;
                sources = sources::resolve(cache, opts.locked)?;
                prefetch(cache, &sources, &flavors, &source)
            }
        }
    })?;
    // Before the builds load both cores: the probe has a 2 s deadline.
    let accel = timings.time("KVM probe", || Ok(choose_accel(opts.accel)))?;

    let side_failed = AtomicBool::new(false);
    let (built, side) = std::thread::scope(|sc| {
        let side = sc.spawn(|| -> Result<(PathBuf, crate::qemu::QemuBin, PathBuf)> {
            let r = (|| {
                let virtiofsd = timings.time("virtiofsd", || host::ensure_virtiofsd(cache, opts.no_install))?;
                let qemu = timings.time("QEMU 7.2 (Debian 12)", || host::ensure_qemu(cache))?;
                let rootfs = timings.time("rootfs + demos", || crate::image::build(cache, &sources))?;
                Ok((virtiofsd, qemu, rootfs))
            })();
            if let Err(e) = &r {
                // Say it now, not after the kernels: nothing can boot without these.
                eprintln!("error: {e:#}\n(the kernel build in progress finishes; no further flavor starts)");
                side_failed.store(true, Ordering::SeqCst);
            }
            r
        });
        let mut built = Vec::new();
        for &f in &flavors {
            if side_failed.load(Ordering::SeqCst) {
                break;
            }
            built.push((f, timings.time(format!("kernel {f}"), || kernel::build(cache, f, &source, &sources))));
        }
        let side = side.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the rootfs/virtiofsd thread panicked")));
        (built, side)
    });
    let (virtiofsd, qemu, rootfs) = side?;
    let mut kernels = Vec::new();
    let mut failed = Vec::new();
    for (f, r) in built {
        match r {
            Ok(k) => kernels.push(k),
            Err(e) => {
                eprintln!("kernel {f}: FAILED: {e:#}");
                failed.push((f, format!("the {f} kernel did not build: {e:#}")));
            }
        }
    }
    if kernels.is_empty() {
        let why: Vec<&str> = failed.iter().map(|(_, w)| w.as_str()).collect();
        anyhow::bail!("no kernel could be built:\n{}", why.join("\n"));
    }
    let mut provenance = sources.provenance();
    if let Some(t) = &opts.kernel_tree {
        provenance.kernel_source = format!("your tree {}", t.display());
        provenance.kernel_source_pinned = String::new();
    }
    Ok(Lab { kernels, failed, rootfs, virtiofsd, qemu, accel, provenance, timings })
}

/// Fetch what the builds will need and do not have yet: the kernel source
/// .deb (unless every kernel is cached or the source is extracted) and the
/// rootfs .debs (unless the rootfs is cached).
fn prefetch(cache: &Cache, sources: &Sources, flavors: &[Flavor], source: &Source) -> Result<()> {
    if matches!(source, Source::Debian) {
        let extracted = cache.root.join("src").join(format!("linux-{}", sources.kernel_version));
        let mut all_cached = true;
        for &f in flavors {
            all_cached &= kernel::cached(cache, f, sources)?.is_some();
        }
        if !all_cached && !extracted.join(".pinlab-complete").exists() {
            let t = Instant::now();
            let deb = sources.kernel_deb(cache).context("Failed to fetch the kernel source")?;
            eprintln!("kernel source: {} fetched and verified in {}", deb.display(), util::since(t));
        }
    }
    crate::image::prefetch(cache, sources)?;
    // The demos' crates (virtiofsd's are fetched by its own `cargo install`).
    let mut c = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(util::project_root()).args(["fetch", "--locked", "--quiet"]);
    util::output(c).context("Failed to fetch the workspace's crates (is crates.io reachable?)")?;
    Ok(())
}

/// The accelerator to use: the flag, else the KVM probe's verdict (printed).
pub fn choose_accel(flag: Option<Accel>) -> Accel {
    if let Some(a) = flag {
        eprintln!("accel: {} (--accel)", a.name());
        return a;
    }
    let v = crate::kvm::probe();
    eprintln!("{}", v.describe());
    if v.usable() {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_order() {
        assert_eq!(dedup(&[2, 1, 2, 3, 1]), vec![2, 1, 3]);
    }

    #[test]
    fn summary_skips_short_phases() {
        let t = Timings::default();
        t.add("kernel stock", Duration::from_secs(500));
        t.add("KVM probe", Duration::from_millis(10));
        let s = t.summary(Duration::from_millis(500));
        assert_eq!(s.len(), 1);
        assert!(s[0].contains("kernel stock") && s[0].contains("8m20s"), "{s:?}");
    }
}
