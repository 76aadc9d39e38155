//! One boot: virtiofsd ×2, QEMU, deadlines, the console stream.
//!
//! Every wait has a named deadline, checks the child is still alive, and
//! kills it on expiry. The console is teed to `console.log` and parsed as a
//! stream (markers from the guest init and runner). The children and the
//! socket/NVDIMM tempdir are owned by guards, so an error or Ctrl-C path
//! leaves nothing running behind.

use crate::console::{self, Splat};
use crate::qemu::{self, QemuSpec};
use crate::util;
use anyhow::{bail, Context, Result};
use pinlab_scenarios::plan::Plan;
use pinlab_scenarios::results::BootResults;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// `kvm` / `tcg`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::str::FromStr for Accel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => bail!("unknown accelerator '{s}' (expected kvm or tcg)"),
        }
    }
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

/// Deadlines of one boot.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// From QEMU start until the runner starts (kernel boot + guest setup).
    pub boot: Duration,
    /// The no-progress watchdog: the longest the guest may go without
    /// finishing a step (or starting a scenario, or ending the run).
    pub stall: Duration,
    /// How long the guest may keep printing after a hung-task or soft-lockup
    /// report (its stack traces) before the host ends the boot.
    pub grace: Duration,
}

impl Deadlines {
    /// Measured under TCG on the 2-core CI machine (run 20261201-054913,
    /// 68 cells): the runner starts 2.2–2.4 s after QEMU, the slowest step
    /// took 1.4 s (S14's RDMA WRITE on patched/xfs), the slowest scenario
    /// 2.4 s, the slowest whole boot 20 s. The
    /// watchdog must still leave the guest's own per-step deadline
    /// ([`pinlab_scenarios::plan::STEP_DEADLINE_S`], 60 s) room to fire first:
    /// a step that blocks then becomes one failed cell with the kernel's
    /// hung-task report (the guest runs with a 20 s hung-task timeout),
    /// not a killed boot. So: that deadline plus 30 s, whatever the
    /// accelerator (guest time runs at wall-clock speed under TCG too).
    pub fn for_plan(accel: Accel, _plan: &Plan) -> Deadlines {
        let slow = if accel == Accel::Tcg { 3 } else { 1 };
        Deadlines {
            boot: Duration::from_secs(40 * slow),
            stall: Duration::from_secs(pinlab_scenarios::plan::STEP_DEADLINE_S + 30),
            grace: Duration::from_secs(10),
        }
    }
}

/// What to boot.
pub struct BootSpec<'a> {
    /// The QEMU program ([`qemu::PROGRAM`]; a script in tests).
    pub qemu: &'a Path,
    /// Kernel image.
    pub kernel: &'a Path,
    /// The virtiofsd binary.
    pub virtiofsd: &'a Path,
    /// Rootfs directory.
    pub rootfs: &'a Path,
    /// This boot's output directory (console.log, share/).
    pub dir: &'a Path,
    /// The work.
    pub plan: &'a Plan,
    /// Accelerator.
    pub accel: Accel,
    /// Deadlines.
    pub deadlines: Deadlines,
    /// Called with each console line (for progress and `--explain`).
    pub on_line: &'a mut dyn FnMut(&str),
}

/// What happened.
#[derive(Debug)]
pub struct BootOutcome {
    /// The console log.
    pub console: PathBuf,
    /// What the runner wrote, if it wrote anything.
    pub results: Option<BootResults>,
    /// Kernel splats on the console.
    pub splats: Vec<Splat>,
    /// A boot-level failure: a deadline, a crash, missing results.
    pub failure: Option<String>,
    /// The failure is pinlab's or the host's (a deadline, QEMU or virtiofsd
    /// failing, missing results), not the kernel's answer to a scenario.
    pub infra: bool,
    /// QEMU start to exit.
    pub wall: Duration,
    /// QEMU start to the runner's start marker.
    pub to_runner: Option<Duration>,
}

/// Kills and reaps a child when dropped.
struct Reaper(Option<Child>);

impl Reaper {
    /// Spawn `cmd` so that it dies with us, registered for Ctrl-C cleanup.
    fn spawn(cmd: &mut Command) -> std::io::Result<Reaper> {
        crate::cleanup::die_with_parent(cmd);
        let child = cmd.spawn()?;
        crate::cleanup::register_pid(child.id());
        Ok(Reaper(Some(child)))
    }

    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until drop")
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // Forget first: once reaped, the pid may belong to someone else.
            crate::cleanup::forget_pid(c.id());
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

fn spawn_virtiofsd(bin: &Path, sock: &Path, dir: &Path, readonly: bool, log: &Path) -> Result<Reaper> {
    let mut c = Command::new(bin);
    c.arg("--socket-path")
        .arg(sock)
        .arg("--shared-dir")
        .arg(dir)
        // No namespace sandbox: works for non-root users too; the share is ours.
        .args(["--sandbox", "none"])
        // The host reads results only after QEMU exits; never serve stale data.
        .args(["--cache", if readonly { "auto" } else { "never" }]);
    if readonly {
        c.arg("--readonly");
    }
    let logf = std::fs::File::create(log)?;
    c.stdin(Stdio::null()).stdout(logf.try_clone()?).stderr(logf);
    let shown = util::show(&c);
    let mut r = Reaper::spawn(&mut c).with_context(|| format!("Failed to start `{shown}`"))?;
    // Deadline: the socket must appear within 10 s.
    let t = Instant::now();
    while !sock.exists() {
        if let Some(st) = r.child().try_wait()? {
            bail!("virtiofsd exited ({st}) before creating {}; its log: {}", sock.display(), log.display());
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("virtiofsd did not create {} within 10 s; its log: {}", sock.display(), log.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(r)
}

/// A prepared machine: the share with the plan, the NVDIMM backing files and
/// the two virtiofsd daemons, all released when dropped.
struct Machine {
    qspec: QemuSpec,
    share: PathBuf,
    _vfs: [Reaper; 2],
    tmp: tempfile::TempDir,
}

impl Drop for Machine {
    fn drop(&mut self) {
        crate::cleanup::forget_dir(self.tmp.path());
    }
}

fn prepare(
    virtiofsd: &Path,
    kernel: &Path,
    rootfs: &Path,
    dir: &Path,
    plan: &Plan,
    accel: Accel,
    extra: &str,
) -> Result<Machine> {
    let share = dir.join("share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share).with_context(|| format!("Failed to create {}", share.display()))?;
    let plan_path = share.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec_pretty(plan)?)
        .with_context(|| format!("Failed to write {}", plan_path.display()))?;
    if !plan.selftests.is_empty() {
        std::fs::create_dir_all(share.join("selftests"))
            .with_context(|| format!("Failed to create {}", share.join("selftests").display()))?;
        for t in &plan.selftests {
            let src = Path::new(t);
            let name = src.file_name().context("selftest without a file name")?;
            std::fs::copy(src, share.join("selftests").join(name))
                .with_context(|| format!("Failed to copy the selftest {}", src.display()))?;
        }
    }
    // Sockets need a short path (108 bytes); the NVDIMM files are sparse.
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{}{}-", crate::cleanup::VM_DIR_PREFIX, std::process::id()))
        .tempdir()
        .context("Failed to create a temp dir")?;
    crate::cleanup::register_dir(tmp.path());
    let pmem = tmp.path().join("pmem0.img");
    let devdax = tmp.path().join("pmem1.img");
    for (file, mib) in [(&pmem, qemu::PMEM_MIB), (&devdax, qemu::DEVDAX_MIB)] {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(mib << 20))
            .with_context(|| format!("Failed to create the {mib} MiB NVDIMM backing file {}", file.display()))?;
    }
    let rootfs_sock = tmp.path().join("rootfs.sock");
    let share_sock = tmp.path().join("share.sock");
    let vfs_root = spawn_virtiofsd(virtiofsd, &rootfs_sock, rootfs, true, &dir.join("virtiofsd-rootfs.log"))?;
    let vfs_share = spawn_virtiofsd(virtiofsd, &share_sock, &share, false, &dir.join("virtiofsd-share.log"))?;
    let qspec = QemuSpec {
        accel,
        cpus: 2,
        kernel: kernel.to_path_buf(),
        cmdline_extra: extra.to_string(),
        pmem,
        devdax,
        rootfs_sock,
        share_sock,
        interactive: false,
        console_log: None,
    };
    Ok(Machine { qspec, share, tmp, _vfs: [vfs_root, vfs_share] })
}

/// Boot into an interactive shell on this terminal: the lab is set up (DAX
/// mounted, rxe up), the demos are on PATH; `exit` powers the guest off.
/// The console is also logged to `dir/console.log`; a kernel panic or oops
/// there makes this fail (after QEMU exits) instead of returning success.
pub fn shell(virtiofsd: &Path, kernel: &Path, rootfs: &Path, dir: &Path, plan: &Plan, accel: Accel) -> Result<()> {
    let mut m = prepare(virtiofsd, kernel, rootfs, dir, plan, accel, "pinlab.mode=shell")?;
    m.qspec.interactive = true;
    let console_path = dir.join("console.log");
    m.qspec.console_log = Some(console_path.clone());
    let mut cmd = Command::new(qemu::PROGRAM);
    cmd.args(qemu::args(&m.qspec));
    let shown = util::show(&cmd);
    eprintln!("$ {shown}");
    eprintln!("(type `exit` in the guest to power it off; console log: {})", console_path.display());
    let mut q = Reaper::spawn(&mut cmd).with_context(|| format!("Failed to start `{shown}`"))?;
    let status = q.child().wait().with_context(|| format!("Failed to wait for `{shown}`"))?;
    let log = std::fs::read_to_string(&console_path).unwrap_or_default();
    let fatal: Vec<Splat> =
        console::scan(&log).into_iter().filter(|s| matches!(s.kind, "Kernel panic" | "Oops" | "BUG")).collect();
    if let Some(f) = fatal.first() {
        bail!(
            "the guest kernel crashed: {} (console.log:{}); the whole console is in {}",
            f.text,
            f.line,
            console_path.display()
        );
    }
    if !status.success() {
        bail!("QEMU exited with {status}; the console is in {}", console_path.display());
    }
    Ok(())
}

/// The scenario and step the guest was in, from its progress markers.
#[derive(Clone, Debug, Default)]
struct Progress {
    scenario: Option<String>,
    step: Option<usize>,
}

impl Progress {
    fn describe(&self, plan: &Plan) -> String {
        let Some(id) = &self.scenario else {
            return "before the first scenario (lab setup or selftests)".into();
        };
        let sc = plan.scenarios.iter().find(|s| &s.id == id);
        let next = self.step.map(|i| i + 1).unwrap_or(0);
        match sc.and_then(|s| s.steps.get(next)) {
            Some(st) => format!("scenario {id}, step {} ({})", next + 1, st.name),
            None => format!("scenario {id}, after its last step (isolation check, or fsck at the end)"),
        }
    }
}

/// Boot once and run the plan.
pub fn boot(spec: BootSpec<'_>) -> Result<BootOutcome> {
    let m = prepare(spec.virtiofsd, spec.kernel, spec.rootfs, spec.dir, spec.plan, spec.accel, "")?;
    let share = m.share.clone();
    let qspec = m.qspec.clone();
    let mut cmd = Command::new(spec.qemu);
    cmd.args(qemu::args(&qspec));
    let shown = util::show(&cmd);
    std::fs::write(spec.dir.join("qemu-cmdline.txt"), format!("{shown}\n"))
        .with_context(|| format!("Failed to write {}", spec.dir.join("qemu-cmdline.txt").display()))?;
    let qemu_log = spec.dir.join("qemu.log");
    let qlog = std::fs::File::create(&qemu_log).with_context(|| format!("Failed to create {}", qemu_log.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(qlog);
    let t0 = Instant::now();
    let mut qemu = Reaper::spawn(&mut cmd).with_context(|| format!("Failed to start `{shown}`"))?;
    let stdout = qemu.child().stdout.take().context("no QEMU stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let s = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
            if tx.send(s).is_err() {
                break;
            }
        }
    });

    let console_path = spec.dir.join("console.log");
    let mut console =
        std::fs::File::create(&console_path).with_context(|| format!("Failed to create {}", console_path.display()))?;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut to_runner = None;
    let mut failure = None;
    let mut infra = false;
    let mut done = false;
    let mut progress = Progress::default();
    let mut last_progress = t0;
    // A hung-task or soft-lockup report: when, and what.
    let mut hang: Option<(Instant, String)> = None;
    let last_lines = |tail: &std::collections::VecDeque<String>| {
        tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
    };
    let deadline = |hang: &Option<(Instant, String)>, to_runner: Option<Duration>, last_progress: Instant| {
        if let Some((at, _)) = hang {
            (*at + spec.deadlines.grace, "hang")
        } else if to_runner.is_none() {
            (t0 + spec.deadlines.boot, "boot")
        } else {
            (last_progress + spec.deadlines.stall, "stall")
        }
    };
    loop {
        let (deadline_at, _) = deadline(&hang, to_runner, last_progress);
        let left = deadline_at.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                writeln!(console, "{line}").with_context(|| format!("Failed to write {}", console_path.display()))?;
                if to_runner.is_none() && console::has_marker(&line, console::MARK_RUNNER) {
                    to_runner = Some(t0.elapsed());
                    last_progress = Instant::now();
                }
                if let Some(rest) = line.split(console::MARK_SCENARIO).nth(1) {
                    // A runner marker garbled by interleaved kernel output must
                    // not leave the boot deadline armed once scenarios run.
                    to_runner.get_or_insert(t0.elapsed());
                    progress = Progress { scenario: rest.split_whitespace().next().map(String::from), step: None };
                    last_progress = Instant::now();
                } else if let Some(st) = console::step_line(&line) {
                    progress.step = Some(st.index);
                    last_progress = Instant::now();
                }
                if console::has_marker(&line, console::MARK_BENCH) {
                    last_progress = Instant::now();
                }
                if console::has_marker(&line, console::MARK_DONE) {
                    done = true;
                    last_progress = Instant::now();
                }
                if hang.is_none()
                    && matches!(console::splat_in_line(&line), Some("hung task" | "soft lockup" | "RCU stall"))
                {
                    hang = Some((Instant::now(), line.clone()));
                }
                (spec.on_line)(&line);
                tail.push_back(line);
                if tail.len() > 15 {
                    tail.pop_front();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Checked after every line too: a guest that keeps printing (a printk
        // storm, a looping process) must not keep the watchdog from firing.
        let (deadline_at, what) = deadline(&hang, to_runner, last_progress);
        if Instant::now() >= deadline_at {
            let _ = qemu.child().kill();
            let why = match what {
                "hang" => format!(
                    "the guest kernel reported a hang ({})",
                    hang.as_ref().map(|(_, l)| l.trim()).unwrap_or_default()
                ),
                "boot" => format!(
                    "boot deadline: the runner did not start within {} of QEMU starting",
                    util::fmt_duration(spec.deadlines.boot)
                ),
                _ => format!("watchdog: no progress for {}", util::fmt_duration(spec.deadlines.stall)),
            };
            failure = Some(format!(
                "{why}; QEMU killed while the guest was in {}. Console: {}; it last printed:\n{}",
                progress.describe(spec.plan),
                console_path.display(),
                last_lines(&tail)
            ));
            // A kernel that reports its own hang is the kernel's fault; a silent stall is ours to explain.
            infra = what != "hang";
            break;
        }
    }
    let _ = reader.join();
    let status = qemu.child().wait().context("Failed to wait for QEMU")?;
    let wall = t0.elapsed();
    console.flush()?;
    drop(console);
    let log = std::fs::read_to_string(&console_path).unwrap_or_default();
    let splats = console::scan(&log);
    let crashed =
        splats.iter().find(|s| matches!(s.kind, "Kernel panic" | "Oops" | "BUG" | "general protection fault"));
    let qerr = std::fs::read_to_string(&qemu_log).unwrap_or_default();
    if failure.is_none() && (!status.success() || qerr.contains("terminating on signal")) {
        // QEMU exits 0 after SIGINT/SIGTERM ("terminating on signal 2").
        let what = match status.signal() {
            Some(sig) => format!("QEMU was killed by signal {sig} (interrupted?)"),
            None if qerr.contains("terminating on signal") => "QEMU was stopped by a signal (interrupted?)".into(),
            None => format!("QEMU exited with {status}"),
        };
        failure = Some(format!(
            "{what} while the guest was in {}. QEMU said: {}; console: {}",
            progress.describe(spec.plan),
            if qerr.trim().is_empty() { "nothing" } else { qerr.trim() },
            console_path.display()
        ));
        infra = true;
    }
    if failure.is_none() && !done {
        failure = Some(match crashed {
            Some(c) => format!(
                "the guest kernel crashed ({}: {} at console.log:{}). Console: {}; it last printed:\n{}",
                c.kind,
                c.text.trim(),
                c.line,
                console_path.display(),
                last_lines(&tail)
            ),
            None => {
                infra = true;
                format!(
                    "the guest powered off before pinlab-init printed {} and no kernel crash is on the console. \
                     Console: {}; it last printed:\n{}",
                    console::MARK_DONE,
                    console_path.display(),
                    last_lines(&tail)
                )
            }
        });
    }
    let results_path = share.join("guest-results.json");
    let results = match std::fs::read(&results_path) {
        Ok(b) => Some(
            serde_json::from_slice::<BootResults>(&b)
                .with_context(|| format!("Failed to parse {}", results_path.display()))?,
        ),
        Err(_) => None,
    };
    if results.is_none() && failure.is_none() {
        failure = Some(format!("the guest wrote no {}; console: {}", results_path.display(), console_path.display()));
        infra = true;
    }
    if failure.is_none() {
        let failed: Vec<String> = results
            .iter()
            .flat_map(|r| r.selftests.iter())
            .filter(|t| t.outcome != "ok" && t.outcome != "skip")
            .map(|t| format!("{} ({})", t.name, t.detail))
            .collect();
        if !failed.is_empty() {
            failure = Some(format!("selftests failed: {}", failed.join("; ")));
        }
    }
    if failure.is_none() {
        let failed_setup: Vec<String> = results
            .iter()
            .flat_map(|r| r.setup.iter())
            .filter(|s| s.outcome != "ok")
            .map(|s| format!("{}: {} ({})", s.name, s.outcome, s.detail))
            .collect();
        match results.as_ref().and_then(|r| r.fsck.as_ref()) {
            Some(f) if f.outcome == "ok" => {}
            Some(f) => failure = Some(format!("filesystem check failed: {}: {} {}", f.name, f.outcome, f.detail)),
            None if !failed_setup.is_empty() => {
                failure = Some(format!("guest setup failed: {}", failed_setup.join("; ")));
                infra = true;
            }
            None => {
                failure = Some(format!(
                    "the runner did not check the filesystem at the end; console: {}",
                    console_path.display()
                ));
                infra = true;
            }
        }
    }
    Ok(BootOutcome { console: console_path, results, splats, failure, infra, wall, to_runner })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Boot a fake QEMU (a shell script printing `console` lines) with a
    /// fake virtiofsd that only creates its socket, and tight deadlines.
    fn fake_boot(console: &str) -> BootOutcome {
        let d = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        // --socket-path SOCK ...: create SOCK, then wait to be killed.
        let vfs = script("virtiofsd", "touch \"$2\"; exec sleep 30");
        let qemu = script("qemu", console);
        let (rootfs, dir) = (d.path().join("rootfs"), d.path().join("boot"));
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let plan = Plan {
            flavor: pinlab_scenarios::Flavor::Stock,
            fs: pinlab_scenarios::Fs::Ext4,
            scenarios: Vec::new(),
            selftests: Vec::new(),
            bench: None,
        };
        let mut on_line = |_: &str| {};
        let out = boot(BootSpec {
            qemu: &qemu,
            kernel: Path::new("/nonexistent/bzImage"),
            virtiofsd: &vfs,
            rootfs: &rootfs,
            dir: &dir,
            plan: &plan,
            accel: Accel::Tcg,
            deadlines: Deadlines {
                boot: Duration::from_secs(2),
                stall: Duration::from_secs(2),
                grace: Duration::from_secs(1),
            },
            on_line: &mut on_line,
        })
        .unwrap();
        // The console log survives for the report.
        assert!(std::fs::read_to_string(&out.console).is_ok());
        out
    }

    #[test]
    fn a_silent_guest_misses_the_boot_deadline() {
        let t = Instant::now();
        let out = fake_boot("echo 'Linux version 6.12'; exec sleep 30");
        let f = out.failure.unwrap();
        assert!(f.starts_with("boot deadline"), "{f}");
        assert!(f.contains("Linux version 6.12") && f.contains("console.log"), "{f}");
        assert!(out.infra);
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_panic_is_the_kernels_failure_not_the_infrastructures() {
        let out = fake_boot(
            "echo PINLAB-RUNNER-START; echo '[    3.1] Kernel panic - not syncing: Attempted to kill init!'; exit 0",
        );
        let f = out.failure.unwrap();
        assert!(f.starts_with("the guest kernel crashed (Kernel panic"), "{f}");
        assert!(!out.infra);
        assert_eq!(out.splats[0].kind, "Kernel panic");
    }

    #[test]
    fn a_stalled_guest_trips_the_watchdog_even_while_it_keeps_printing() {
        // A printk storm: lines keep coming, no step ever finishes.
        let t = Instant::now();
        let out = fake_boot("echo PINLAB-RUNNER-START; while :; do echo '[ 9.9] rcu: noise'; done");
        let f = out.failure.unwrap();
        assert!(f.starts_with("watchdog: no progress for 2.0s"), "{f}");
        assert!(f.contains("before the first scenario"), "{f}");
        assert!(out.infra);
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }

    #[test]
    fn a_hung_task_report_ends_the_boot_after_its_grace() {
        let out = fake_boot(
            "echo PINLAB-RUNNER-START; echo '[ 30.0] INFO: task truncate:77 blocked for more than 20 seconds.'; \
             exec sleep 30",
        );
        let f = out.failure.unwrap();
        assert!(f.starts_with("the guest kernel reported a hang (") && f.contains("blocked for more than"), "{f}");
        assert!(!out.infra);
    }

    #[test]
    fn accel_parse() {
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("hvf".parse::<Accel>().is_err());
    }

    #[test]
    fn reaper_kills_on_drop() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        drop(Reaper(Some(child)));
        // The process is gone (reaped): kill(pid, 0) fails.
        // SAFETY: kill with signal 0 only checks for existence.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0);
    }
}
