//! `cargo xtask bench`: DESIGN.md's speed targets, measured on this machine.
//!
//! One boot per filesystem of the chosen flavor (patched by default) with a
//! plan that asks the guest runner to measure instead of running scenarios
//! (see `pinlab_scenarios::bench`). The host adds what only it can see (QEMU
//! start to runner start) and prints every figure next to its target. The
//! JSON and a Markdown copy of the table go to
//! `target/pinlab/bench/<stamp>/`, with each boot's console log.
//!
//! Missing a target is reported, not an error: the exit code is non-zero
//! only when a figure could not be measured or a boot failed.

use crate::kernel;
use crate::qemu::Accel;
use crate::ui;
use crate::util::{self, Cache};
use crate::vm::{self, BootEvent, BootSpec, Deadlines};
use anyhow::Result;
use pinlab_scenarios::bench::{key, BenchPlan, BenchResults};
use pinlab_scenarios::plan::Plan;
use pinlab_scenarios::protocol::GuestEvent;
use pinlab_scenarios::{Flavor, Fs};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Duration;

/// What to measure.
#[derive(Clone, Debug, Default)]
pub struct BenchOpts {
    /// Flavors, each booted once per filesystem (default: patched when the
    /// series exists, else stock). With stock and patched, a comparison of
    /// the two follows their tables.
    pub flavors: Vec<Flavor>,
    /// Filesystems (default: both).
    pub fss: Vec<Fs>,
    /// Repetitions (default: [`BenchPlan::default`]).
    pub reps: Option<u32>,
    /// `--accel`.
    pub accel: Option<Accel>,
    /// `--locked`.
    pub locked: bool,
}

/// One boot's measurements.
#[derive(Clone, Debug, Serialize)]
pub struct BootBench {
    /// Filesystem.
    pub fs: Fs,
    /// `uname -r` in the guest.
    pub kernel: String,
    /// QEMU start to the runner's start marker, seconds (host clock).
    pub to_runner_s: Option<f64>,
    /// Guest uptime when the runner started, seconds.
    pub guest_uptime_at_runner_s: f64,
    /// The runner's lab setup (namespaces, mkfs, mount, DAX check, rxe), seconds.
    pub setup_s: f64,
    /// The whole boot, seconds.
    pub wall_s: f64,
    /// What the guest measured.
    pub guest: Option<BenchResults>,
    /// Why the boot failed, if it did (deadline, splat, no results).
    pub failure: Option<String>,
}

impl BootBench {
    /// QEMU start to the moment the first scenario could start.
    pub fn to_scenarios_s(&self) -> Option<f64> {
        self.to_runner_s.map(|t| t + self.setup_s)
    }
}

/// The whole bench, as written to `bench.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Bench {
    /// UTC stamp.
    pub id: String,
    /// Host CPU model, core count, memory, accelerator.
    pub machine: String,
    /// Kernel flavor booted.
    pub flavor: Flavor,
    /// What each guest was asked to do.
    pub plan: BenchPlan,
    /// One per filesystem.
    pub boots: Vec<BootBench>,
}

/// A target from DESIGN.md and how a value compares with it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// At most this.
    AtMost(f64),
    /// At least this.
    AtLeast(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtMost(t) => v <= t,
            Target::AtLeast(t) => v >= t,
        }
    }

    fn text(self, unit: &str) -> String {
        match self {
            Target::AtMost(t) => format!("≤ {}{unit}", trim(t)),
            Target::AtLeast(t) => format!("≥ {}{unit}", trim(t)),
        }
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn machine(accel: Accel) -> String {
    let cpu = fs_err::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem_gib = fs_err::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    format!("{cpu}, {cores} cores, {mem_gib:.0} GiB, guest under {}", accel.name())
}

/// `cargo xtask bench`.
pub fn bench(cache: &Cache, opts: BenchOpts) -> Result<bool> {
    let mut flavors: Vec<Flavor> = Vec::new();
    for f in &opts.flavors {
        if !flavors.contains(f) {
            flavors.push(*f);
        }
    }
    if flavors.is_empty() {
        flavors.push(if kernel::available_flavors()?.contains(&Flavor::Patched) {
            Flavor::Patched
        } else {
            Flavor::Stock
        });
    }
    let fss = if opts.fss.is_empty() { Fs::ALL.to_vec() } else { opts.fss.clone() };
    let lab = crate::lab::prepare(
        cache,
        &crate::lab::LabOpts { flavors: flavors.clone(), accel: opts.accel, locked: opts.locked, ..Default::default() },
    )?;
    let accel = lab.accel;
    let mut plan_b = BenchPlan::default();
    if let Some(r) = opts.reps {
        anyhow::ensure!(r >= 1, "--reps must be at least 1");
        plan_b.reps = r;
    }
    let rootfs = &lab.rootfs;
    let (id, dir) = crate::run::new_run_dir(&util::target_dir().join("bench"))?;
    let machine = machine(accel);
    let mut benches = Vec::new();
    for k in &lab.kernels {
        let flavor = k.flavor;
        eprintln!(
            "bench {id}: {flavor} kernel on {}; {machine}",
            fss.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
        );
        let mut boots = Vec::new();
        for &fs in &fss {
            boots.push(boot_bench(&lab.qemu, &lab.virtiofsd, k, rootfs, &dir, fs, accel, &plan_b)?);
        }
        benches.push(Bench { id: id.clone(), machine: machine.clone(), flavor, plan: plan_b.clone(), boots });
    }
    anyhow::ensure!(!benches.is_empty(), "no kernel was built for {flavors:?}");
    let mut text = benches.iter().map(table).collect::<Vec<_>>().join("\n");
    let cmp = comparison(&benches);
    if let Some(c) = &cmp {
        text.push('\n');
        text.push_str(c);
    }
    // One flavor: bench.json is that flavor's Bench, as before; several: a list.
    let json = match benches.as_slice() {
        [one] => serde_json::to_vec_pretty(one)?,
        many => serde_json::to_vec_pretty(many)?,
    };
    fs_err::write(dir.join("bench.json"), json)?;
    fs_err::write(dir.join("bench.md"), format!("# pinlab bench {id}\n\n```text\n{text}```\n"))?;
    println!("\n{text}");
    println!("Written to {}", dir.join("bench.json").display());
    let measured = benches.iter().all(|b| {
        b.boots.iter().all(|bb| {
            bb.failure.is_none()
                && bb
                    .guest
                    .as_ref()
                    .is_some_and(|g| g.figures.iter().all(|f| f.error.is_none() || b.flavor == Flavor::Stock))
        })
    });
    Ok(measured)
}

/// DESIGN.md: the series must not slow registrations of ordinary anonymous
/// memory. The patched/stock ratio of the anonymous `ibv_reg_mr` medians per
/// filesystem, when both flavors were benched; `None` otherwise.
pub fn comparison(benches: &[Bench]) -> Option<String> {
    let find = |f: Flavor| benches.iter().find(|b| b.flavor == f);
    let (stock, patched) = (find(Flavor::Stock)?, find(Flavor::Patched)?);
    let reg = patched.plan.reg_mib;
    let mut s = String::new();
    let _ = writeln!(s, "patched / stock (same machine, same plan)");
    for pb in &patched.boots {
        let Some(sb) = stock.boots.iter().find(|b| b.fs == pb.fs) else {
            continue;
        };
        let target = Target::AtMost(1.05);
        // Under TCG single registrations are bimodal (about 33 or 55 ms
        // for 256 MiB on either kernel): the fastest of the runs is the
        // cost of the code path, the median mostly says which mode won.
        let cell = match (fig_min(pb, key::REG_ANON), fig_min(sb, key::REG_ANON)) {
            (Ok(p), Ok(st)) if st > 0.0 => {
                let r = p / st;
                let med = match (fig_median(pb, key::REG_ANON), fig_median(sb, key::REG_ANON)) {
                    (Ok(pm), Ok(sm)) if sm > 0.0 => format!("; medians {pm:.0} / {sm:.0} ms = {:.2}×", pm / sm),
                    _ => String::new(),
                };
                format!(
                    "{r:.2}× (fastest of {}: {p:.1} ms / {st:.1} ms{med})  {}{}",
                    patched.plan.reps,
                    target.text("×"),
                    if target.met(r) { " ✓" } else { " ✗" }
                )
            }
            (Err(e), _) => format!("patched: {e}"),
            (_, Err(e)) => format!("stock: {e}"),
            _ => "stock: 0 ms".into(),
        };
        let _ = writeln!(s, "  ibv_reg_mr {reg} MiB anonymous, {}: {cell}", pb.fs);
    }
    Some(s)
}

#[allow(clippy::too_many_arguments)]
fn boot_bench(
    qemu: &crate::qemu::QemuBin,
    virtiofsd: &std::path::Path,
    k: &kernel::Kernel,
    rootfs: &std::path::Path,
    dir: &std::path::Path,
    fs: Fs,
    accel: Accel,
    bp: &BenchPlan,
) -> Result<BootBench> {
    let plan = Plan { flavor: k.flavor, fs, scenarios: Vec::new(), selftests: Vec::new(), bench: Some(bp.clone()) };
    let boot_dir = dir.join(format!("{}-{}", k.flavor, fs));
    fs_err::create_dir_all(&boot_dir)?;
    let label = format!("bench {}/{}", k.flavor, fs);
    let pb = ui::spinner(format!("{label}: booting"));
    let mut on_event = |ev: &BootEvent| match ev {
        BootEvent::Guest(e @ (GuestEvent::BenchSample { .. } | GuestEvent::BenchStarted)) => {
            pb.set_message(format!("{label}: {e}"))
        }
        BootEvent::Guest(GuestEvent::RunnerStarted) => {
            pb.set_message(format!("{label}: runner started, setting up the lab"))
        }
        _ => {}
    };
    let mut deadlines = Deadlines::for_plan(accel, &plan);
    // Registrations of hundreds of MiB and bandwidth runs, under TCG.
    // One figure is several registrations of 256 MiB or bandwidth runs under TCG.
    deadlines.stall += Duration::from_secs(20 * u64::from(bp.reps) * if accel == Accel::Tcg { 3 } else { 1 });
    let out = vm::boot(BootSpec {
        qemu,
        kernel: &k.bzimage,
        virtiofsd,
        rootfs,
        dir: &boot_dir,
        plan: &plan,
        accel,
        deadlines,
        on_event: &mut on_event,
    })?;
    pb.finish_and_clear();
    let mut failure = crate::verdict::boot_problem(&out).map(|p| p.text);
    if crate::verdict::splats_fail(&out, k.flavor) {
        failure = Some(format!("{} kernel splat(s), first: {}", out.splats.len(), out.splats[0].text));
    }
    let res = out.results.as_ref().ok().and_then(Option::as_ref);
    let guest = res.and_then(|r| r.bench.clone());
    if guest.is_none() && failure.is_none() {
        failure = Some(format!("the runner wrote no bench results (console: {})", out.console.display()));
    }
    let bb = BootBench {
        fs,
        kernel: res.map(|r| r.kernel.clone()).unwrap_or_default(),
        to_runner_s: out.to_runner.map(|d| d.as_secs_f64()),
        guest_uptime_at_runner_s: res.map(|r| r.runner_start_ms as f64 / 1e3).unwrap_or(0.0),
        setup_s: res.map(|r| r.setup.iter().map(|s| s.ms).sum::<f64>() / 1e3).unwrap_or(0.0),
        wall_s: out.wall.as_secs_f64(),
        guest,
        failure,
    };
    eprintln!("{label}: {} in {}", if bb.failure.is_none() { "done" } else { "FAILED" }, util::fmt_duration(out.wall));
    Ok(bb)
}

/// One row of the table: label, value per boot, target, verdict.
struct Row {
    label: String,
    cells: Vec<String>,
    target: String,
    met: Option<bool>,
}

fn row(
    label: &str,
    boots: &[BootBench],
    target: Option<(Target, &str)>,
    f: impl Fn(&BootBench) -> Result<f64, String>,
    fmt: impl Fn(f64) -> String,
) -> Row {
    let vals: Vec<Result<f64, String>> = boots.iter().map(&f).collect();
    let met = target.and_then(|(t, _)| {
        let ok: Vec<f64> = vals.iter().filter_map(|v| v.as_ref().ok().copied()).collect();
        (!ok.is_empty()).then(|| ok.iter().all(|&v| t.met(v)))
    });
    Row {
        label: label.into(),
        cells: vals.iter().map(|v| v.as_ref().map(|&x| fmt(x)).unwrap_or_else(|e| e.clone())).collect(),
        target: target.map(|(t, u)| t.text(u)).unwrap_or_default(),
        met,
    }
}

fn fig_median(b: &BootBench, k: &str) -> Result<f64, String> {
    let g = b.guest.as_ref().ok_or("no results")?;
    let f = g.get(k).ok_or("not measured")?;
    match (f.median(), &f.error) {
        (Some(m), None) => Ok(m),
        (_, Some(e)) => Err(short_error(e)),
        (None, None) => Err("no samples".into()),
    }
}

fn fig_min(b: &BootBench, k: &str) -> Result<f64, String> {
    fig_median(b, k)?;
    b.guest
        .as_ref()
        .and_then(|g| g.get(k))
        .and_then(|f| f.samples.iter().copied().reduce(f64::min))
        .ok_or_else(|| "no samples".into())
}

fn fig_max(b: &BootBench, k: &str) -> Result<f64, String> {
    fig_median(b, k)?;
    b.guest.as_ref().and_then(|g| g.get(k)).and_then(|f| f.max()).ok_or_else(|| "no samples".into())
}

/// Errors in a table cell: the errno name if there is one.
fn short_error(e: &str) -> String {
    match e.rsplit_once('(').map(|(_, t)| t.trim_end_matches(')')) {
        Some(name) if name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()) && !name.is_empty() => {
            format!("n/a ({name})")
        }
        _ => "error".into(),
    }
}

/// The table `cargo xtask bench` prints.
pub fn table(b: &Bench) -> String {
    let boots = &b.boots;
    let ms = |v: f64| format!("{v:.0} ms");
    let secs = |v: f64| format!("{v:.2} s");
    let us = |v: f64| format!("{v:.0} µs");
    let ratio = |v: f64| format!("{v:.2}×");
    let bw = |v: f64| format!("{v:.0} MiB/s");
    let reg = b.plan.reg_mib;
    let rows = vec![
        row("QEMU start → runner start", boots, None, |x| x.to_runner_s.ok_or("—".into()), secs),
        row("  lab setup (ndctl, mkfs, mount, rxe)", boots, None, |x| Ok(x.setup_s), secs),
        row(
            "boot → scenario start",
            boots,
            Some((Target::AtMost(3.0), " s")),
            |x| x.to_scenarios_s().ok_or("—".into()),
            secs,
        ),
        row(&format!("ibv_reg_mr {reg} MiB anonymous"), boots, None, |x| fig_median(x, key::REG_ANON), ms),
        row(&format!("ibv_reg_mr {reg} MiB FS-DAX + lease"), boots, None, |x| fig_median(x, key::REG_FSDAX), ms),
        row(
            "  FS-DAX / anonymous",
            boots,
            Some((Target::AtMost(1.5), "×")),
            |x| Ok(fig_median(x, key::REG_FSDAX)? / fig_median(x, key::REG_ANON)?),
            ratio,
        ),
        row("  FS-DAX, pages first touched by the call", boots, None, |x| fig_median(x, key::REG_FSDAX_COLD), ms),
        row(
            &format!("RDMA WRITE {} MiB → anonymous MR", b.plan.write_mib),
            boots,
            None,
            |x| fig_median(x, key::WRITE_ANON),
            bw,
        ),
        row(
            &format!("RDMA WRITE {} MiB → FS-DAX MR", b.plan.write_mib),
            boots,
            None,
            |x| fig_median(x, key::WRITE_FSDAX),
            bw,
        ),
        row(
            "  FS-DAX / anonymous",
            boots,
            Some((Target::AtLeast(0.9), "×")),
            |x| Ok(fig_median(x, key::WRITE_FSDAX)? / fig_median(x, key::WRITE_ANON)?),
            ratio,
        ),
        row("punch hole over pins → EDEADLK, first call", boots, None, |x| fig_median(x, key::PUNCH_FIRST), us),
        row("  later calls, median", boots, None, |x| fig_median(x, key::PUNCH_PINNED), us),
        row(
            "  later calls, slowest",
            boots,
            Some((Target::AtMost(1000.0), " µs")),
            |x| fig_max(x, key::PUNCH_PINNED),
            us,
        ),
        row(
            &format!("ftruncate over pins → EDEADLK, first call (unmaps {reg} MiB)"),
            boots,
            None,
            |x| fig_median(x, key::TRUNC_FIRST),
            us,
        ),
        row("  later calls, median", boots, None, |x| fig_median(x, key::TRUNC_PINNED), us),
        row(
            "  later calls, slowest",
            boots,
            Some((Target::AtMost(1000.0), " µs")),
            |x| fig_max(x, key::TRUNC_PINNED),
            us,
        ),
        row(
            "scenario overhead (empty scenario minus its step)",
            boots,
            Some((Target::AtMost(150.0), " ms")),
            |x| fig_median(x, key::SCENARIO_OVERHEAD),
            ms,
        ),
        row("  start the holder (until its hello)", boots, None, |x| fig_median(x, key::WORKER_START), ms),
        row("  tear-down and isolation check", boots, None, |x| fig_median(x, key::SCENARIO_FINISH), ms),
    ];
    let w0 = rows.iter().map(|r| r.label.chars().count()).max().unwrap_or(0);
    let wc = rows.iter().flat_map(|r| r.cells.iter().map(|c| c.chars().count())).max().unwrap_or(0).max(12);
    let mut s = String::new();
    let _ = writeln!(s, "{}", b.machine);
    let _ = writeln!(
        s,
        "{} kernel; medians of {} runs ({} for the failing calls, {} for the scenario overhead)\n",
        b.flavor, b.plan.reps, b.plan.fail_reps, b.plan.scenario_reps
    );
    let _ = write!(s, "{:w0$}", "");
    for bb in boots {
        let _ = write!(s, "  {:>wc$}", bb.fs.name());
    }
    let _ = writeln!(s, "  target");
    for r in &rows {
        let _ = write!(s, "{:w0$}", r.label);
        for c in &r.cells {
            let _ = write!(s, "  {c:>wc$}");
        }
        let verdict = match r.met {
            Some(true) => " ✓",
            Some(false) => " ✗",
            None => "",
        };
        let _ = writeln!(s, "  {}{verdict}", r.target);
    }
    let errors: Vec<String> = boots
        .iter()
        .flat_map(|bb| {
            let fail = bb.failure.iter().map(move |f| format!("{}: {f}", bb.fs));
            let figs = bb
                .guest
                .iter()
                .flat_map(|g| g.figures.iter())
                .filter_map(move |f| f.error.as_ref().map(|e| format!("{} {}: {e}", bb.fs, f.key)));
            fail.chain(figs)
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "\nNot measured:");
        for e in errors {
            let _ = writeln!(s, "  {e}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinlab_scenarios::bench::Figure;

    fn fig(k: &str, samples: &[f64], error: Option<&str>) -> Figure {
        Figure {
            key: k.into(),
            what: String::new(),
            unit: String::new(),
            samples: samples.to_vec(),
            error: error.map(String::from),
        }
    }

    fn boot(fs: Fs, figures: Vec<Figure>) -> BootBench {
        BootBench {
            fs,
            kernel: "6.12.117".into(),
            to_runner_s: Some(2.0),
            guest_uptime_at_runner_s: 1.5,
            setup_s: 1.5,
            wall_s: 30.0,
            guest: Some(BenchResults { figures }),
            failure: None,
        }
    }

    #[test]
    fn comparison_is_the_patched_over_stock_anonymous_registration() {
        let bench = |flavor, ms: f64| Bench {
            id: "x".into(),
            machine: "m".into(),
            flavor,
            plan: BenchPlan::default(),
            boots: vec![boot(Fs::Ext4, vec![fig(key::REG_ANON, &[ms, ms, ms], None)])],
        };
        assert_eq!(comparison(&[bench(Flavor::Patched, 100.0)]), None);
        let c = comparison(&[bench(Flavor::Stock, 100.0), bench(Flavor::Patched, 104.0)]).unwrap();
        assert!(
            c.contains("ext4: 1.04× (fastest of 5: 104.0 ms / 100.0 ms; medians 104 / 100 ms = 1.04×)  ≤ 1.05× ✓"),
            "{c}"
        );
        let c = comparison(&[bench(Flavor::Stock, 100.0), bench(Flavor::Patched, 120.0)]).unwrap();
        assert!(c.contains("1.20×") && c.contains("✗"), "{c}");
    }

    #[test]
    fn table_compares_with_the_targets() {
        let b = Bench {
            id: "x".into(),
            machine: "test machine".into(),
            flavor: Flavor::Patched,
            plan: BenchPlan::default(),
            boots: vec![
                boot(
                    Fs::Ext4,
                    vec![
                        fig(key::REG_ANON, &[100.0, 110.0, 90.0], None),
                        fig(key::REG_FSDAX, &[120.0, 130.0, 125.0], None),
                        fig(key::WRITE_ANON, &[100.0], None),
                        fig(key::WRITE_FSDAX, &[80.0], None),
                        fig(key::TRUNC_FIRST, &[5000.0], None),
                        fig(key::TRUNC_PINNED, &[10.0, 20.0, 30.0], None),
                        fig(key::PUNCH_PINNED, &[10.0, 2000.0], None),
                        fig(key::SCENARIO_OVERHEAD, &[120.0, 90.0, 100.0], None),
                    ],
                ),
                boot(
                    Fs::Xfs,
                    vec![
                        fig(key::REG_ANON, &[100.0], None),
                        fig(
                            key::REG_FSDAX,
                            &[],
                            Some(
                                "fcntl(F_SETLEASE, F_LAYOUT|F_EXCLUSIVE = 48): Invalid argument (os error 22) (EINVAL)",
                            ),
                        ),
                    ],
                ),
            ],
        };
        let t = table(&b);
        let line =
            |p: &str| t.lines().find(|l| l.starts_with(p)).unwrap_or_else(|| panic!("no {p:?} in\n{t}")).to_string();
        // 3.5 s > 3 s on both boots.
        assert!(
            line("boot → scenario start").contains("3.50 s") && line("boot → scenario start").ends_with('✗'),
            "{t}"
        );
        // ext4: 125/100 = 1.25 ≤ 1.5; xfs has no FS-DAX figure: n/a, not a failure.
        let reg = t.lines().find(|l| l.contains("FS-DAX / anonymous") && l.contains("1.25×")).unwrap();
        assert!(reg.contains("n/a (EINVAL)") && reg.ends_with('✓'), "{t}");
        let bw = t.lines().filter(|l| l.contains("FS-DAX / anonymous")).nth(1).unwrap();
        assert!(bw.contains("0.80×") && bw.ends_with('✗'), "{t}");
        // Punch's slowest later call (2 ms) misses the 1 ms target; truncate's
        // first call has no target, its later calls meet it.
        let slowest: Vec<&str> = t.lines().filter(|l| l.contains("later calls, slowest")).collect();
        assert!(slowest[0].ends_with('✗') && slowest[1].ends_with('✓'), "{t}");
        assert!(line("ftruncate over pins → EDEADLK, first call").contains("5000 µs"), "{t}");
        // 100 ms ≤ 150 ms; xfs did not measure it (not a failure).
        let o = line("scenario overhead");
        assert!(o.contains("100 ms") && o.contains("not measured") && o.ends_with('✓'), "{t}");
        assert!(t.contains("Not measured:") && t.contains("xfs reg_mr_fsdax_lease: fcntl"), "{t}");
    }

    #[test]
    fn targets() {
        assert!(Target::AtMost(1.5).met(1.5) && !Target::AtMost(1.5).met(1.51));
        assert!(Target::AtLeast(0.9).met(0.95) && !Target::AtLeast(0.9).met(0.5));
        assert_eq!(Target::AtMost(1000.0).text(" µs"), "≤ 1000 µs");
        assert_eq!(Target::AtLeast(0.9).text("×"), "≥ 0.9×");
        assert_eq!(short_error("x: Invalid argument (os error 22) (EINVAL)"), "n/a (EINVAL)");
        assert_eq!(short_error("boom"), "error");
    }
}
