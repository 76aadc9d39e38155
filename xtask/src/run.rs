//! `cargo xtask run`: kernels + rootfs + one boot per (flavor, filesystem),
//! then expected vs actual, reports under `target/pinlab/runs/<id>/`.

use crate::host::{self, Need};
use crate::kernel::{self, Source};
use crate::report::{self, BootRecord, RunResults};
use crate::ui;
use crate::util::{self, Cache};
use crate::vm::{self, Accel, BootSpec, Deadlines};
use anyhow::{Context, Result};
use pinlab_scenarios::plan::Plan;
use pinlab_scenarios::results::{self, CellResult};
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
}

/// Load every scenario spec from `tests/scenarios/`.
pub fn load_specs() -> Result<Vec<Scenario>> {
    spec::load_dir(&util::project_root().join("tests/scenarios"))
}

/// Run; returns whether every expectation held.
pub fn run(cache: &Cache, opts: RunOpts) -> Result<bool> {
    let t0 = Instant::now();
    host::ensure(&[Need::Kernel, Need::Demos, Need::Image, Need::Boot], opts.no_install)?;
    host::ensure_virtiofsd(cache, opts.no_install)?;
    let specs = spec::select(load_specs()?, &opts.scenarios)?;
    let flavors = if !opts.flavors.is_empty() {
        opts.flavors.clone()
    } else if opts.demo {
        kernel::available_flavors()?
    } else {
        vec![Flavor::Stock]
    };
    let fss = if opts.fss.is_empty() { Fs::ALL.to_vec() } else { opts.fss.clone() };
    let accel = vm::choose_accel(opts.accel);
    let source = match &opts.kernel_tree {
        Some(p) => Source::Tree(p.clone()),
        None => Source::Debian,
    };
    let mut kernels = Vec::new();
    for &f in &flavors {
        kernels.push(kernel::build(cache, f, &source)?);
    }
    let rootfs = crate::image::build(cache)?;
    let selftests: Vec<std::path::PathBuf> =
        kernels.iter().find(|k| !k.selftests.is_empty()).map(|k| k.selftests.clone()).unwrap_or_default();

    let run_id = util::utc_stamp(SystemTime::now());
    let runs = util::target_dir().join("runs");
    let run_dir = runs.join(&run_id);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("Failed to create {}", run_dir.display()))?;
    let latest = runs.join("latest");
    let _ = std::fs::remove_file(&latest);
    std::os::unix::fs::symlink(&run_id, &latest).with_context(|| format!("Failed to link {}", latest.display()))?;
    eprintln!(
        "run {run_id}: {} flavor(s) × {} filesystem(s), {} scenario(s), accel {}",
        flavors.len(),
        fss.len(),
        specs.len(),
        accel.name()
    );

    // Boots are independent. Each TCG guest keeps two host threads busy, so
    // run as many at once as there are pairs of cores (one at a time on 2).
    let parallel = std::env::var("PINLAB_PARALLEL")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() / 2).unwrap_or(1))
        .max(1);
    let jobs: Vec<(&kernel::Kernel, Fs)> = kernels
        .iter()
        .flat_map(|k| fss.iter().map(move |&fs| (k, fs)))
        .filter(|(_, fs)| specs.iter().any(|s| s.runs_on(*fs)))
        .collect();
    let mp = indicatif::MultiProgress::new();
    let mut outcomes = Vec::new();
    for batch in jobs.chunks(parallel) {
        let results: Vec<Result<(Vec<CellResult>, BootRecord)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = batch
                .iter()
                .map(|(k, fs)| {
                    let ctx = BootCtx {
                        cache,
                        specs: &specs,
                        rootfs: &rootfs,
                        selftests: &selftests,
                        run_dir: &run_dir,
                        accel,
                        explain: opts.explain,
                        mp: &mp,
                    };
                    sc.spawn(move || run_boot(&ctx, k, *fs))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a boot thread panicked"))))
                .collect()
        });
        outcomes.extend(results);
    }
    let mut cells: Vec<CellResult> = Vec::new();
    let mut boots = Vec::new();
    for r in outcomes {
        let (c, b) = r?;
        cells.extend(c);
        boots.push(b);
    }
    let pass = cells.iter().all(|c| c.pass) && boots.iter().all(|b| b.failure.is_none() && b.splats.is_empty());
    let res = RunResults {
        run_id: run_id.clone(),
        accel: accel.name().into(),
        results: cells,
        boots,
        wall_s: t0.elapsed().as_secs_f64(),
        pass,
    };
    std::fs::write(run_dir.join("results.json"), serde_json::to_vec_pretty(&res)?)?;
    std::fs::write(run_dir.join("report.md"), report::markdown(&specs, &res))?;
    std::fs::write(run_dir.join("report.html"), crate::html::render(&specs, &res))?;
    std::fs::write(run_dir.join("junit.xml"), crate::html::junit(&specs, &res))?;
    println!("\n{}", report::table(&specs, &res));
    let passed = res.results.iter().filter(|c| c.pass).count();
    println!(
        "{passed}/{} as expected in {}. Report: {}",
        res.results.len(),
        util::since(t0),
        run_dir.join("report.html").display()
    );
    Ok(pass)
}

/// `cargo xtask shell`.
pub fn shell(cache: &Cache, flavor: Flavor, fs: Fs, accel: Option<Accel>) -> Result<()> {
    host::ensure(&[Need::Kernel, Need::Demos, Need::Image, Need::Boot], false)?;
    let accel = vm::choose_accel(accel);
    let k = kernel::build(cache, flavor, &Source::Debian)?;
    let rootfs = crate::image::build(cache)?;
    let dir = util::target_dir().join("shell").join(format!("{flavor}-{fs}"));
    std::fs::create_dir_all(&dir)?;
    let selftests = k.selftests.iter().map(|p| p.display().to_string()).collect();
    let plan = Plan { flavor, fs, scenarios: Vec::new(), selftests, bench: None };
    vm::shell(cache, &k.bzimage, &rootfs, &dir, &plan, accel)
}

/// What every boot of a run shares.
struct BootCtx<'a> {
    cache: &'a Cache,
    specs: &'a [Scenario],
    rootfs: &'a std::path::Path,
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
    let (cache, run_dir, accel) = (ctx.cache, ctx.run_dir, ctx.accel);
    let mine: Vec<&Scenario> = ctx.specs.iter().filter(|s| s.runs_on(fs)).collect();
    let plan = Plan {
        flavor: k.flavor,
        fs,
        scenarios: mine.iter().map(|s| s.planned()).collect(),
        selftests: ctx.selftests.iter().map(|p| p.display().to_string()).collect(),
        bench: None,
    };
    let dir = run_dir.join(format!("{}-{}", k.flavor, fs));
    std::fs::create_dir_all(&dir)?;
    let label = format!("boot {}/{}", k.flavor, fs);
    eprintln!("{label}: booting {} under {} ({} scenarios)", k.bzimage.display(), accel.name(), plan.scenarios.len());
    let pb = ctx.mp.add(ui::spinner(format!("{label}: booting")));
    let explain = ctx.explain;
    let flavor = k.flavor;
    let mut on_line = |line: &str| {
        if let Some(rest) = line.split(crate::console::MARK_SCENARIO).nth(1) {
            pb.set_message(format!("{label}: {rest}"));
            ui::line(&pb, format!("  {label}: {rest}"));
            if explain {
                let id = rest.split_whitespace().next().unwrap_or("");
                if let Some(sp) = mine.iter().find(|s| s.id == id) {
                    ui::line(&pb, format!("      {}", sp.shows));
                }
            }
        } else if let Some(st) = crate::console::step_line(line).filter(|_| explain) {
            let expected = mine
                .iter()
                .find(|s| s.id == st.id)
                .and_then(|s| s.expected(flavor, fs).get(st.index).cloned().flatten())
                .map(|o| o.to_string())
                .unwrap_or_else(|| "not run".into());
            let (what, detail) = st.rest.split_once(": ").unwrap_or((st.rest, ""));
            let mark = if expected == st.outcome { "✓" } else { "✗" };
            ui::line(&pb, format!("    {what} → {} (expected {expected} {mark})", st.outcome));
            if !detail.is_empty() {
                ui::line(&pb, format!("        {detail}"));
            }
        } else if line.contains(crate::console::MARK_RUNNER) {
            pb.set_message(format!("{label}: runner started"));
        }
    };
    let outcome = vm::boot(
        cache,
        BootSpec {
            kernel: &k.bzimage,
            rootfs: ctx.rootfs,
            dir: &dir,
            plan: &plan,
            accel,
            deadlines: Deadlines::for_plan(accel, &plan),
            on_line: &mut on_line,
        },
    )?;
    pb.finish_and_clear();
    eprintln!(
        "{label}: {} in {} (runner started at {})",
        if outcome.failure.is_none() && outcome.splats.is_empty() { "done" } else { "FAILED" },
        util::fmt_duration(outcome.wall),
        outcome.to_runner.map(util::fmt_duration).unwrap_or_else(|| "—".into())
    );
    let boot_ok = outcome.failure.is_none() && outcome.splats.is_empty();
    let mut cells = Vec::new();
    for s in &mine {
        let got = outcome.results.as_ref().and_then(|r| r.scenarios.iter().find(|x| x.id == s.id));
        let mut c = results::check(s, k.flavor, fs, got);
        // A splat or a dead boot fails every cell of that boot.
        c.pass &= boot_ok;
        cells.push(c);
    }
    let rel = |p: &std::path::Path| p.strip_prefix(run_dir).unwrap_or(p).display().to_string();
    let boot = BootRecord {
        flavor: k.flavor,
        fs,
        kernel: outcome.results.as_ref().map(|r| r.kernel.clone()).unwrap_or_default(),
        kernel_key: k.key.clone(),
        wall_s: outcome.wall.as_secs_f64(),
        to_runner_s: outcome.to_runner.map(|d| d.as_secs_f64()),
        console: rel(&outcome.console),
        splats: outcome.splats.iter().map(|s| format!("{} at console.log:{}: {}", s.kind, s.line, s.text)).collect(),
        failure: outcome.failure.clone(),
        setup: outcome
            .results
            .as_ref()
            .map(|r| r.setup.iter().map(|s| format!("{}: {} ({})", s.name, s.outcome, s.detail)).collect())
            .unwrap_or_default(),
        selftests: outcome
            .results
            .as_ref()
            .map(|r| r.selftests.iter().map(|s| format!("{}: {}", s.name, s.outcome)).collect())
            .unwrap_or_default(),
        fsck: outcome
            .results
            .as_ref()
            .and_then(|r| r.fsck.as_ref())
            .map(|s| format!("{}: {} ({})", s.name, s.outcome, s.detail)),
    };
    Ok((cells, boot))
}
