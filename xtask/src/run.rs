//! `cargo xtask run`: kernels + rootfs + one boot per (flavor, filesystem),
//! then expected vs actual, reports under `target/pinlab/runs/<id>/`.

use crate::kernel;
use crate::lab::{self, LabOpts};
use crate::qemu::Accel;
use crate::report::{self, BootRecord, RunResults};
use crate::ui;
use crate::util::{self, Cache};
use crate::verdict;
use crate::vm::{self, BootEvent, BootSpec, Deadlines};
use anyhow::{Context, Result};
use pinlab_scenarios::plan::Plan;
use pinlab_scenarios::protocol::GuestEvent;
use pinlab_scenarios::results::CellResult;
use pinlab_scenarios::spec::{self, Scenario};
use pinlab_scenarios::{Flavor, Fs};
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct RunOpts {
    /// Flavors (empty: stock, or every available one for `demo`).
    pub flavors: Vec<Flavor>,
    /// Filesystems (empty: both).
    pub fss: Vec<Fs>,
    /// Scenario ids (empty: all).
    pub scenarios: Vec<String>,
    /// `--accel`.
    pub accel: Option<Accel>,
    /// `--kernel-tree`.
    pub kernel_tree: Option<PathBuf>,
    /// `--no-install`.
    pub no_install: bool,
    /// `run demo`.
    pub demo: bool,
    /// `--explain`: narrate each step as it happens.
    pub explain: bool,
    /// `--locked`: drift from the pinned versions is an error.
    pub locked: bool,
}

/// Load every scenario spec from `tests/scenarios/`.
pub fn load_specs() -> Result<Vec<Scenario>> {
    spec::load_dir(&util::project_root().join("tests/scenarios"))
}

/// How a run ended, and the exit code that says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every cell as expected, no splat, every boot completed.
    Pass,
    /// A cell disagreed with its spec, or the kernel splatted, crashed or
    /// failed a selftest or fsck.
    Fail,
    /// A boot could not run (deadline, QEMU or virtiofsd failed, …).
    Infra,
}

impl Verdict {
    /// 0, 1, or 69 (EX_UNAVAILABLE).
    pub fn code(self) -> u8 {
        match self {
            Verdict::Pass => 0,
            Verdict::Fail => 1,
            Verdict::Infra => 69,
        }
    }
}

/// A new, unique run directory under `runs` (`YYYYMMDD-HHMMSS-PID`, with a
/// suffix if that exists), and `runs/latest` pointing at it.
pub fn new_run_dir(runs: &std::path::Path) -> Result<(String, PathBuf)> {
    fs_err::create_dir_all(runs).with_context(|| format!("Failed to create {}", runs.display()))?;
    let base = format!("{}-{}", util::utc_stamp(SystemTime::now()), std::process::id());
    for n in 0.. {
        let id = if n == 0 { base.clone() } else { format!("{base}.{n}") };
        let dir = runs.join(&id);
        match fs_err::create_dir(&dir) {
            Ok(()) => {
                // Point `latest` here atomically: a new link renamed over the old one.
                let tmp = util::staging_path(&runs.join("latest"));
                std::os::unix::fs::symlink(&id, &tmp).with_context(|| format!("Failed to link {}", tmp.display()))?;
                fs_err::rename(&tmp, runs.join("latest"))
                    .with_context(|| format!("Failed to update {}", runs.join("latest").display()))?;
                return Ok((id, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("Failed to create {}", dir.display())),
        }
    }
    unreachable!("an unbounded range ends only by returning")
}

static LAST_RUN_DIR: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The directory of the last run this process made.
pub fn last_run_dir() -> Option<PathBuf> {
    LAST_RUN_DIR.lock().ok()?.clone()
}

/// Run; returns how it went.
pub fn run(cache: &Cache, opts: RunOpts) -> Result<Verdict> {
    let t0 = Instant::now();
    let specs = spec::select(load_specs()?, &opts.scenarios)?;
    let allow = verdict::SplatAllowList::load()?;
    let flavors = if !opts.flavors.is_empty() {
        lab::dedup(&opts.flavors)
    } else if opts.demo {
        kernel::available_flavors()?
    } else {
        vec![Flavor::Stock]
    };
    let fss = if opts.fss.is_empty() { Fs::ALL.to_vec() } else { lab::dedup(&opts.fss) };
    let lab = lab::prepare(
        cache,
        &LabOpts {
            flavors: flavors.clone(),
            kernel_tree: opts.kernel_tree.clone(),
            no_install: opts.no_install,
            locked: opts.locked,
            accel: opts.accel,
        },
    )?;
    let accel = lab.accel;
    let selftests: Vec<std::path::PathBuf> =
        lab.kernels.iter().find(|k| !k.selftests.is_empty()).map(|k| k.selftests.clone()).unwrap_or_default();

    let (run_id, run_dir) = new_run_dir(&util::target_dir().join("runs"))?;
    if let Ok(mut l) = LAST_RUN_DIR.lock() {
        *l = Some(run_dir.clone());
    }
    eprintln!(
        "run {run_id}: {} flavor(s) × {} filesystem(s), {} scenario(s), accel {}",
        flavors.len(),
        fss.len(),
        specs.len(),
        accel.name()
    );
    let t_boots = Instant::now();

    // Boots are independent. Each TCG guest keeps two host threads busy, so
    // run as many at once as there are pairs of cores (one at a time on 2).
    let parallel = std::env::var("PINLAB_PARALLEL")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() / 2).unwrap_or(1))
        .max(1);
    let jobs: Vec<(&kernel::Kernel, Fs)> = lab
        .kernels
        .iter()
        .flat_map(|k| fss.iter().map(move |&fs| (k, fs)))
        .filter(|(_, fs)| specs.iter().any(|s| s.runs_on(*fs)))
        .collect();
    let mp = indicatif::MultiProgress::new();
    let mut outcomes = Vec::new();
    for batch in jobs.chunks(parallel) {
        let results: Vec<(Vec<CellResult>, BootRecord)> = std::thread::scope(|sc| {
            let handles: Vec<_> = batch
                .iter()
                .map(|(k, fs)| {
                    let ctx = BootCtx {
                        allow: &allow,
                        specs: &specs,
                        rootfs: &lab.rootfs,
                        virtiofsd: &lab.virtiofsd,
                        qemu: &lab.qemu,
                        selftests: &selftests,
                        run_dir: &run_dir,
                        accel,
                        explain: opts.explain,
                        mp: &mp,
                    };
                    sc.spawn(move || {
                        let r = run_boot(&ctx, k, *fs);
                        r.unwrap_or_else(|e| not_run(ctx.specs, k.flavor, &k.key, *fs, &format!("{e:#}")))
                    })
                })
                .collect();
            handles
                .into_iter()
                .zip(batch)
                .map(|(h, (k, fs))| {
                    h.join().unwrap_or_else(|_| not_run(&specs, k.flavor, &k.key, *fs, "the boot thread panicked"))
                })
                .collect()
        });
        outcomes.extend(results);
    }
    lab.timings.add(format!("boots ({} of them)", jobs.len()), t_boots.elapsed());
    for (f, why) in &lab.failed {
        for &fs in &fss {
            if specs.iter().any(|s| s.runs_on(fs)) {
                outcomes.push(not_run(&specs, *f, "", fs, why));
            }
        }
    }
    let mut cells: Vec<CellResult> = Vec::new();
    let mut boots = Vec::new();
    for (c, b) in outcomes {
        cells.extend(c);
        boots.push(b);
    }
    let infra = boots.iter().any(|b| b.infra);
    let pass = cells.iter().all(|c| c.pass) && boots.iter().all(|b| b.failure.is_none() && b.splats.is_empty());
    let res = RunResults {
        run_id: run_id.clone(),
        accel: accel.name().into(),
        scenarios: specs.iter().map(report::ScenarioDoc::from).collect(),
        results: cells,
        boots,
        wall_s: t0.elapsed().as_secs_f64(),
        pass,
        provenance: lab.provenance.clone(),
    };
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = run_dir.join(name);
        fs_err::write(&p, bytes).with_context(|| format!("Failed to write {}", p.display()))
    };
    write("results.json", &serde_json::to_vec_pretty(&res)?)?;
    for (name, bytes) in report::files(&res) {
        write(name, &bytes)?;
    }
    println!("\n{}", report::table(&res));
    let passed = res.results.iter().filter(|c| c.pass).count();
    println!(
        "{passed}/{} as expected in {}. Report: {}",
        res.results.len(),
        util::since(t0),
        run_dir.join("report.html").display()
    );
    let summary = lab.timings.summary(std::time::Duration::from_secs(1));
    if !summary.is_empty() {
        println!("Where the time went:\n{}", summary.join("\n"));
    }
    Ok(if infra {
        Verdict::Infra
    } else if pass {
        Verdict::Pass
    } else {
        Verdict::Fail
    })
}

/// `cargo xtask shell`.
pub fn shell(cache: &Cache, flavor: Flavor, fs: Fs, accel: Option<Accel>, locked: bool) -> Result<()> {
    let lab = lab::prepare(cache, &LabOpts { flavors: vec![flavor], accel, locked, ..Default::default() })?;
    let k = lab.kernels.first().context("the kernel did not build")?;
    let dir = util::target_dir().join("shell").join(format!("{flavor}-{fs}-{}", std::process::id()));
    fs_err::create_dir_all(&dir).with_context(|| format!("Failed to create {}", dir.display()))?;
    let selftests = k.selftests.iter().map(|p| p.display().to_string()).collect();
    let plan = Plan { flavor, fs, scenarios: Vec::new(), selftests, bench: None };
    vm::shell(&lab.qemu, &lab.virtiofsd, &k.bzimage, &lab.rootfs, &dir, &plan, lab.accel)
}

/// The cells and record of a boot that could not run at all, said on the terminal.
fn not_run(specs: &[Scenario], flavor: Flavor, key: &str, fs: Fs, why: &str) -> (Vec<CellResult>, BootRecord) {
    eprintln!("boot {flavor}/{fs}: NOT RUN: {why}");
    verdict::not_run(specs, flavor, key, fs, why)
}

/// What every boot of a run shares.
struct BootCtx<'a> {
    /// The splats each flavor is expected to print.
    allow: &'a verdict::SplatAllowList,
    specs: &'a [Scenario],
    rootfs: &'a std::path::Path,
    virtiofsd: &'a std::path::Path,
    qemu: &'a crate::qemu::QemuBin,
    /// The series' kselftests (from the patched kernel), run on every boot:
    /// they must pass on patched and skip cleanly on stock.
    selftests: &'a [std::path::PathBuf],
    run_dir: &'a std::path::Path,
    accel: Accel,
    explain: bool,
    mp: &'a indicatif::MultiProgress,
}

/// One boot: plan, boot, compare.
fn run_boot(ctx: &BootCtx<'_>, k: &kernel::Kernel, fs: Fs) -> Result<(Vec<CellResult>, BootRecord)> {
    let (run_dir, accel) = (ctx.run_dir, ctx.accel);
    let mine: Vec<&Scenario> = ctx.specs.iter().filter(|s| s.runs_on(fs)).collect();
    let plan = Plan {
        flavor: k.flavor,
        fs,
        scenarios: mine.iter().map(|s| s.planned()).collect(),
        selftests: ctx.selftests.iter().map(|p| p.display().to_string()).collect(),
        bench: None,
    };
    let dir = run_dir.join(format!("{}-{}", k.flavor, fs));
    fs_err::create_dir_all(&dir).with_context(|| format!("Failed to create {}", dir.display()))?;
    let label = format!("boot {}/{}", k.flavor, fs);
    eprintln!("{label}: booting {} under {} ({} scenarios)", k.bzimage.display(), accel.name(), plan.scenarios.len());
    let pb = ctx.mp.add(ui::spinner(format!("{label}: booting")));
    let explain = ctx.explain;
    let flavor = k.flavor;
    let mut on_event = |ev: &BootEvent| match ev {
        BootEvent::Guest(GuestEvent::ScenarioStarted { id, title }) => {
            pb.set_message(format!("{label}: {id} {title}"));
            ui::line(&pb, format!("  {label}: {id} {title}"));
            if explain {
                if let Some(sp) = mine.iter().find(|s| &s.id == id) {
                    ui::line(&pb, format!("      {}", sp.shows));
                }
            }
        }
        BootEvent::Guest(GuestEvent::StepFinished { id, index, by, name, outcome, detail, located }) if explain => {
            let expected = mine
                .iter()
                .find(|s| &s.id == id)
                .and_then(|s| s.expected(flavor, fs).get(*index).cloned().flatten())
                .map(|o| pinlab_scenarios::protocol::StepOutcome::from(&o))
                .unwrap_or(pinlab_scenarios::protocol::StepOutcome::NotRun);
            let mark = verdict::step_mark(&expected, outcome);
            ui::line(&pb, format!("    [{}] {name} → {outcome} (expected {expected} {mark})", by.name()));
            if !detail.is_empty() {
                ui::line(&pb, format!("        {detail}"));
            }
            if let Some(l) = located {
                ui::line(&pb, format!("        {}", crate::blockmap::nic_sentence(id, &l.placement(), Some(l))));
            }
        }
        BootEvent::Guest(GuestEvent::RunnerStarted) => pb.set_message(format!("{label}: runner started")),
        _ => {}
    };
    let boot = vm::boot(BootSpec {
        qemu: ctx.qemu,
        kernel: &k.bzimage,
        virtiofsd: ctx.virtiofsd,
        rootfs: ctx.rootfs,
        dir: &dir,
        plan: &plan,
        accel,
        deadlines: Deadlines::for_plan(accel, &plan),
        on_event: &mut on_event,
    })?;
    pb.finish_and_clear();
    let (cells, record) = verdict::judge(&boot, &mine, k.flavor, fs, &k.key, run_dir, ctx.allow);
    eprintln!(
        "{label}: {} in {} (runner started at {})",
        if record.failure.is_none() && record.splats.is_empty() { "done" } else { "FAILED" },
        util::fmt_duration(boot.wall),
        boot.to_runner.map(util::fmt_duration).unwrap_or_else(|| "—".into())
    );
    Ok((cells, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let (a, da) = new_run_dir(d.path()).unwrap();
        let (b, db) = new_run_dir(d.path()).unwrap();
        assert_ne!(a, b);
        assert!(da.is_dir() && db.is_dir());
        assert!(a.contains(&std::process::id().to_string()), "{a}");
        assert_eq!(fs_err::read_link(d.path().join("latest")).unwrap(), PathBuf::from(&b));
    }

    #[test]
    fn exit_codes() {
        assert_eq!((Verdict::Pass.code(), Verdict::Fail.code(), Verdict::Infra.code()), (0, 1, 69));
    }
}
