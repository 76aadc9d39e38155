//! One machine: virtiofsd ×2, QEMU, deadlines, the console as typed events,
//! and how the boot ended ([`BootEnd`]). Judging what the guest observed is
//! [`crate::verdict`]'s job.
//!
//! Every wait has a named deadline, checks the child is still alive, and
//! kills it on expiry. The console is teed to `console.log` and parsed as a
//! stream (markers from the guest init and runner). The children and the
//! socket/NVDIMM tempdir are owned by guards, so an error or Ctrl-C path
//! leaves nothing running behind.

use crate::console::{self, Splat};
use crate::placement;
use crate::qemu::{self, Accel, QemuSpec};
use crate::util;
use anyhow::{bail, Context, Result};
use pinlab_scenarios::plan::Plan;
use pinlab_scenarios::protocol::{GuestEvent, HOST_SCAN_DIR, PLAN_FILE, RESULTS_FILE, SHELL_MODE};
use pinlab_scenarios::results::{BootResults, HostScan};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
    ///
    /// The debug kernels (KASAN, lockdep) boot far slower: under TCG the
    /// runner started 74-75 s after QEMU (run 20261201-171747, both
    /// filesystems), against a 120 s boot deadline; they get three times
    /// as long. Their slowest whole scenario took 25 s (S29 on ext4), well
    /// inside the step deadline, so the stall deadline stays.
    pub fn for_plan(accel: Accel, plan: &Plan) -> Deadlines {
        let slow = if accel == Accel::Tcg { 3 } else { 1 };
        let debug = if plan.flavor.is_debug() { 3 } else { 1 };
        Deadlines {
            boot: Duration::from_secs(40 * slow * debug),
            stall: Duration::from_secs(pinlab_scenarios::plan::STEP_DEADLINE_S + 30),
            grace: Duration::from_secs(10),
        }
    }
}

/// What to boot.
pub struct BootSpec<'a> {
    /// The QEMU to run (a script in tests).
    pub qemu: &'a qemu::QemuBin,
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
    /// Called with each event as it happens (progress, `--explain`).
    pub on_event: &'a mut dyn FnMut(&BootEvent),
}

/// Something the console showed, as it happened.
#[derive(Clone, Debug, PartialEq)]
pub enum BootEvent {
    /// A pinlab program in the guest said something.
    Guest(GuestEvent),
    /// The kernel reported a problem.
    Splat(Splat),
}

/// How a boot ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum BootEnd {
    /// pinlab-init said it was done and QEMU exited cleanly.
    Completed {
        /// The runner's exit code.
        rc: i32,
    },
    /// The runner did not start within the boot deadline; QEMU was killed.
    BootDeadline {
        /// The deadline, seconds.
        after_s: f64,
    },
    /// The guest made no progress within the run deadline (watchdog); QEMU was killed.
    RunDeadline {
        /// The deadline, seconds.
        after_s: f64,
    },
    /// The kernel reported a hang (hung task, soft lockup, RCU stall); QEMU
    /// was killed after a grace period for the report's stack traces.
    KernelHang {
        /// The report's first line.
        report: String,
    },
    /// The kernel crashed (panic, oops, BUG) and the guest went down.
    KernelCrashed {
        /// The crash.
        splat: Splat,
    },
    /// QEMU failed or was stopped by a signal.
    QemuFailed {
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The guest powered off before pinlab-init said it was done, with no crash on the console.
    PoweredOff,
}

impl BootEnd {
    /// The boot did not end as planned because of pinlab or the host
    /// (a deadline nobody in the guest reported, QEMU), not because of what
    /// the guest kernel did.
    pub fn is_infra(&self) -> bool {
        matches!(
            self,
            BootEnd::BootDeadline { .. }
                | BootEnd::RunDeadline { .. }
                | BootEnd::QemuFailed { .. }
                | BootEnd::PoweredOff
        )
    }

    /// One sentence for people; `None` for [`BootEnd::Completed`].
    pub fn describe(&self) -> Option<String> {
        Some(match self {
            BootEnd::Completed { .. } => return None,
            BootEnd::BootDeadline { after_s } => format!(
                "boot deadline: the runner did not start within {} of QEMU starting",
                util::fmt_duration(Duration::from_secs_f64(*after_s))
            ),
            BootEnd::RunDeadline { after_s } => {
                format!("watchdog: no progress for {}", util::fmt_duration(Duration::from_secs_f64(*after_s)))
            }
            BootEnd::KernelHang { report } => format!("the guest kernel reported a hang ({})", report.trim()),
            BootEnd::KernelCrashed { splat } => {
                format!(
                    "the guest kernel crashed ({}: {} at console.log:{})",
                    splat.kind,
                    splat.text.trim(),
                    splat.line
                )
            }
            BootEnd::QemuFailed { status, stderr } => {
                format!("{status}. QEMU said: {}", if stderr.trim().is_empty() { "nothing" } else { stderr.trim() })
            }
            BootEnd::PoweredOff => "the guest powered off before pinlab-init said it was done, \
                                    and no kernel crash is on the console"
                .to_string(),
        })
    }
}

/// What one boot produced.
#[derive(Debug)]
pub struct Boot {
    /// How it ended.
    pub end: BootEnd,
    /// Where the guest was when it ended (scenario and step), for people.
    pub during: String,
    /// The console log.
    pub console: PathBuf,
    /// The last console lines.
    pub tail: Vec<String>,
    /// Kernel splats on the console, in order.
    pub splats: Vec<Splat>,
    /// What the runner wrote ([`RESULTS_FILE`]): `None` if nothing, an
    /// error if it cannot be read as results.
    pub results: Result<Option<BootResults>, String>,
    /// QEMU start to exit.
    pub wall: Duration,
    /// QEMU start to the runner's start.
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
    let logf = fs_err::File::create(log)?;
    let logf = logf.into_file();
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

/// Extra kernel parameters for a boot of `flavor`. Debug kernels under TCG
/// get `watchdog_thresh=30` (a soft lockup is reported after 60 s instead
/// of 20 s): with KASAN, ACPI's PCI interrupt routing at boot ran 26 s
/// without a scheduling point when the host's two cores were shared with
/// two kernel builds, and the detector reported it. The hung-task detector
/// (20 s) still reports a scenario stuck in the kernel before the runner's
/// 60 s step deadline.
pub fn cmdline_for(flavor: pinlab_scenarios::Flavor, accel: Accel, extra: &str) -> String {
    if flavor.is_debug() && accel == Accel::Tcg {
        [extra, "watchdog_thresh=30"].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(" ")
    } else {
        extra.to_string()
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
    let extra = &cmdline_for(plan.flavor, accel, extra);
    let share = dir.join("share");
    let _ = fs_err::remove_dir_all(&share);
    fs_err::create_dir_all(&share).with_context(|| format!("Failed to create {}", share.display()))?;
    let plan_path = share.join(PLAN_FILE);
    fs_err::write(&plan_path, serde_json::to_vec_pretty(plan)?)
        .with_context(|| format!("Failed to write {}", plan_path.display()))?;
    if !plan.selftests.is_empty() {
        fs_err::create_dir_all(share.join("selftests"))
            .with_context(|| format!("Failed to create {}", share.join("selftests").display()))?;
        for t in &plan.selftests {
            let src = Path::new(t);
            let name = src.file_name().context("selftest without a file name")?;
            fs_err::copy(src, share.join("selftests").join(name))
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
        fs_err::File::create(file)
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

/// The one place QEMU is started: `program` with `spec`'s arguments, dying
/// with us and registered for Ctrl-C cleanup.
fn spawn_qemu(bin: &qemu::QemuBin, spec: &QemuSpec, stdout: Stdio, stderr: Stdio) -> Result<(Reaper, String)> {
    let mut cmd = qemu::command(bin, spec);
    if !spec.interactive {
        cmd.stdin(Stdio::null());
    }
    cmd.stdout(stdout).stderr(stderr);
    let shown = util::show(&cmd);
    let q = Reaper::spawn(&mut cmd).with_context(|| format!("Failed to start `{shown}`"))?;
    Ok((q, shown))
}

/// Boot into an interactive shell on this terminal: the lab is set up (DAX
/// mounted, rxe up), the demos are on PATH; `exit` powers the guest off.
/// The console is also logged to `dir/console.log`; a kernel panic or oops
/// there makes this fail (after QEMU exits) instead of returning success.
pub fn shell(
    qemu_bin: &qemu::QemuBin,
    virtiofsd: &Path,
    kernel: &Path,
    rootfs: &Path,
    dir: &Path,
    plan: &Plan,
    accel: Accel,
) -> Result<()> {
    let mut m = prepare(virtiofsd, kernel, rootfs, dir, plan, accel, SHELL_MODE)?;
    m.qspec.interactive = true;
    let console_path = dir.join("console.log");
    m.qspec.console_log = Some(console_path.clone());
    let (mut q, shown) = spawn_qemu(qemu_bin, &m.qspec, Stdio::inherit(), Stdio::inherit())?;
    eprintln!("$ {shown}");
    eprintln!("(type `exit` in the guest to power it off; console log: {})", console_path.display());
    let status = q.child().wait().with_context(|| format!("Failed to wait for `{shown}`"))?;
    let log = fs_err::read_to_string(&console_path).unwrap_or_default();
    if let Some(f) = console::scan(&log).into_iter().find(|s| s.kind.is_fatal()) {
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

/// The scenario and step the guest was in, from its events.
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

/// Which deadline is armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Armed {
    Boot,
    Stall,
    Hang,
}

/// Tell the guest its `locate` request was served: create `token` in the
/// share's [`HOST_SCAN_DIR`].
fn answer_locate(share: &Path, token: &str) -> Result<()> {
    if !placement::safe_token(token) {
        bail!("the guest asked for a host scan with an unusable token {token:?}");
    }
    let dir = share.join(HOST_SCAN_DIR);
    fs_err::create_dir_all(&dir)?;
    fs_err::write(dir.join(token), b"")?;
    Ok(())
}

/// Put the host's scans into the guest's `locate` records they answer.
fn add_host_scans(results: &mut BootResults, scans: std::collections::BTreeMap<(String, usize), HostScan>) {
    for ((id, index), scan) in scans {
        let step = results.scenarios.iter_mut().find(|s| s.id == id).and_then(|s| s.steps.get_mut(index));
        if let Some(located) = step.and_then(|s| s.located.as_mut()) {
            located.host = Some(scan);
        }
    }
}

/// Boot once and run the plan. An error means the machine could not be set
/// up or its output not written; everything that happens once QEMU runs is
/// in the returned [`Boot`].
pub fn boot(spec: BootSpec<'_>) -> Result<Boot> {
    let m = prepare(spec.virtiofsd, spec.kernel, spec.rootfs, spec.dir, spec.plan, spec.accel, "")?;
    let share = m.share.clone();
    // The host's scans for the guest's `locate` steps, by (scenario, step).
    let mut host_scans: std::collections::BTreeMap<(String, usize), HostScan> = Default::default();
    let qemu_log = spec.dir.join("qemu.log");
    let qlog = fs_err::File::create(&qemu_log).with_context(|| format!("Failed to create {}", qemu_log.display()))?;
    let t0 = Instant::now();
    let (mut qemu, shown) = spawn_qemu(spec.qemu, &m.qspec, Stdio::piped(), Stdio::from(qlog.into_file()))?;
    let cmdline_path = spec.dir.join("qemu-cmdline.txt");
    fs_err::write(&cmdline_path, format!("{shown}\n"))
        .with_context(|| format!("Failed to write {}", cmdline_path.display()))?;
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
        fs_err::File::create(&console_path).with_context(|| format!("Failed to create {}", console_path.display()))?;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut splats: Vec<Splat> = Vec::new();
    // Splats whose report lines are still being collected.
    let mut collecting: Vec<usize> = Vec::new();
    let mut to_runner = None;
    let mut end: Option<BootEnd> = None;
    let mut done: Option<i32> = None;
    let mut progress = Progress::default();
    let mut last_progress = t0;
    let mut lineno = 0usize;
    // A hung-task or soft-lockup report: when, and its line.
    let mut hang: Option<(Instant, String)> = None;
    let deadline = |hang: &Option<(Instant, String)>, to_runner: Option<Duration>, last_progress: Instant| {
        if let Some((at, _)) = hang {
            (*at + spec.deadlines.grace, Armed::Hang)
        } else if to_runner.is_none() {
            (t0 + spec.deadlines.boot, Armed::Boot)
        } else {
            (last_progress + spec.deadlines.stall, Armed::Stall)
        }
    };
    loop {
        let (deadline_at, _) = deadline(&hang, to_runner, last_progress);
        let left = deadline_at.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                lineno += 1;
                writeln!(console, "{line}").with_context(|| format!("Failed to write {}", console_path.display()))?;
                if let Some(mut ev) = GuestEvent::parse(&line) {
                    match &ev {
                        GuestEvent::RunnerStarted => {
                            to_runner.get_or_insert(t0.elapsed());
                        }
                        GuestEvent::ScenarioStarted { id, .. } => {
                            // A runner-started line garbled by interleaved kernel
                            // output must not leave the boot deadline armed.
                            to_runner.get_or_insert(t0.elapsed());
                            progress = Progress { scenario: Some(id.clone()), step: None };
                        }
                        GuestEvent::StepFinished { index, .. } => progress.step = Some(*index),
                        GuestEvent::Done { rc } => done = Some(*rc),
                        GuestEvent::LocateRequest {
                            id,
                            index,
                            token,
                            nvdimm_offset,
                            device_bytes,
                            seed,
                            region_blocks,
                        } => {
                            let req = placement::Request {
                                nvdimm_offset: *nvdimm_offset,
                                device_bytes: *device_bytes,
                                seed: *seed,
                                region_blocks: *region_blocks,
                            };
                            host_scans.insert((id.clone(), *index), placement::scan(&m.qspec.pmem, &req));
                            answer_locate(&share, token)?;
                        }
                        GuestEvent::BenchStarted | GuestEvent::BenchSample { .. } => {}
                    }
                    // A locate step's event carries what the host saw too, as
                    // its record in the results will.
                    if let GuestEvent::StepFinished { id, index, located: Some(l), .. } = &mut ev {
                        if let Some(scan) = host_scans.get(&(id.clone(), *index)) {
                            l.host = Some(scan.clone());
                        }
                    }
                    last_progress = Instant::now();
                    (spec.on_event)(&BootEvent::Guest(ev));
                } else if !line.starts_with("pinlab-") {
                    // A kernel line: part of the reports still being printed.
                    collecting.retain(|&i| splats.get_mut(i).is_some_and(|s: &mut Splat| s.extend_report(&line)));
                    if let Some(kind) = console::splat_in_line(&line) {
                        let splat = Splat {
                            scenario: progress.scenario.clone(),
                            during: Some(progress.describe(spec.plan)),
                            ..Splat::new(kind, lineno, &line)
                        };
                        if hang.is_none() && kind.is_hang() {
                            hang = Some((Instant::now(), line.clone()));
                        }
                        (spec.on_event)(&BootEvent::Splat(splat.clone()));
                        collecting.push(splats.len());
                        splats.push(splat);
                    }
                }
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
        let (deadline_at, armed) = deadline(&hang, to_runner, last_progress);
        if Instant::now() >= deadline_at {
            let _ = qemu.child().kill();
            end = Some(match armed {
                Armed::Hang => {
                    BootEnd::KernelHang { report: hang.as_ref().map(|(_, l)| l.clone()).unwrap_or_default() }
                }
                Armed::Boot => BootEnd::BootDeadline { after_s: spec.deadlines.boot.as_secs_f64() },
                Armed::Stall => BootEnd::RunDeadline { after_s: spec.deadlines.stall.as_secs_f64() },
            });
            break;
        }
    }
    let _ = reader.join();
    let status = qemu.child().wait().context("Failed to wait for QEMU")?;
    let wall = t0.elapsed();
    console.flush().with_context(|| format!("Failed to write {}", console_path.display()))?;
    drop(console);
    let qerr = fs_err::read_to_string(&qemu_log).unwrap_or_default();
    let end = end.unwrap_or_else(|| {
        if !status.success() || qerr.contains("terminating on signal") {
            // QEMU exits 0 after SIGINT/SIGTERM ("terminating on signal 2").
            let what = match status.signal() {
                Some(sig) => format!("QEMU was killed by signal {sig} (interrupted?)"),
                None if qerr.contains("terminating on signal") => "QEMU was stopped by a signal (interrupted?)".into(),
                None => format!("QEMU exited with {status}"),
            };
            BootEnd::QemuFailed { status: what, stderr: qerr.trim().to_string() }
        } else if let Some(rc) = done {
            BootEnd::Completed { rc }
        } else if let Some(c) = splats.iter().find(|s| s.kind.is_fatal()) {
            BootEnd::KernelCrashed { splat: c.clone() }
        } else {
            BootEnd::PoweredOff
        }
    });
    let results_path = share.join(RESULTS_FILE);
    let results = match fs_err::read(&results_path) {
        Ok(b) => serde_json::from_slice::<BootResults>(&b)
            .map(|mut r| {
                add_host_scans(&mut r, host_scans);
                Some(r)
            })
            .map_err(|e| format!("{} is not a results file: {e}", results_path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("Failed to read {}: {e}", results_path.display())),
    };
    Ok(Boot {
        end,
        during: progress.describe(spec.plan),
        console: console_path,
        tail: tail.into(),
        splats,
        results,
        wall,
        to_runner,
    })
}

#[cfg(test)]
mod cmdline_tests {
    use super::*;
    use pinlab_scenarios::Flavor;

    #[test]
    fn debug_kernels_under_tcg_get_a_longer_soft_lockup_threshold() {
        assert_eq!(cmdline_for(Flavor::Debug, Accel::Tcg, ""), "watchdog_thresh=30");
        assert_eq!(
            cmdline_for(Flavor::StockDebug, Accel::Tcg, "pinlab.mode=shell"),
            "pinlab.mode=shell watchdog_thresh=30"
        );
        assert_eq!(cmdline_for(Flavor::Debug, Accel::Kvm, ""), "");
        assert_eq!(cmdline_for(Flavor::Patched, Accel::Tcg, "x"), "x");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Boot a fake QEMU (a shell script printing `console` lines) with a
    /// fake virtiofsd that only creates its socket, and tight deadlines.
    fn fake_boot(console: &str) -> (Boot, Vec<BootEvent>) {
        let plan = Plan {
            flavor: pinlab_scenarios::Flavor::Stock,
            fs: pinlab_scenarios::Fs::Ext4,
            scenarios: Vec::new(),
            selftests: Vec::new(),
            bench: None,
        };
        fake_boot_with(console, &plan)
    }

    fn fake_boot_with(console: &str, plan: &Plan) -> (Boot, Vec<BootEvent>) {
        let d = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let p = d.path().join(name);
            fs_err::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        // --socket-path SOCK ...: create SOCK, then wait to be killed.
        let vfs = script("virtiofsd", "touch \"$2\"; exec sleep 30");
        let qemu = script("qemu", console);
        let (rootfs, dir) = (d.path().join("rootfs"), d.path().join("boot"));
        fs_err::create_dir_all(&rootfs).unwrap();
        fs_err::create_dir_all(&dir).unwrap();
        let mut seen = Vec::new();
        let mut on_event = |e: &BootEvent| seen.push(e.clone());
        let qemu = qemu::QemuBin::program(&qemu);
        let out = boot(BootSpec {
            qemu: &qemu,
            kernel: Path::new("/nonexistent/bzImage"),
            virtiofsd: &vfs,
            rootfs: &rootfs,
            dir: &dir,
            plan,
            accel: Accel::Tcg,
            deadlines: Deadlines {
                boot: Duration::from_secs(2),
                stall: Duration::from_secs(2),
                grace: Duration::from_secs(1),
            },
            on_event: &mut on_event,
        })
        .unwrap();
        // The console log survives for the report.
        assert!(fs_err::read_to_string(&out.console).is_ok());
        (out, seen)
    }

    /// A shell command printing `ev`'s console line.
    fn say(ev: GuestEvent) -> String {
        format!("echo '{}'", ev.line())
    }

    #[test]
    fn a_silent_guest_misses_the_boot_deadline() {
        let t = Instant::now();
        let (out, _) = fake_boot("echo 'Linux version 6.12'; exec sleep 30");
        assert_eq!(out.end, BootEnd::BootDeadline { after_s: 2.0 });
        assert!(out.end.is_infra());
        assert_eq!(out.tail, vec!["Linux version 6.12".to_string()]);
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_panic_is_the_kernels_failure_not_the_infrastructures() {
        let (out, seen) = fake_boot(&format!(
            "{}; echo '[    3.1] Kernel panic - not syncing: Attempted to kill init!'; exit 0",
            say(GuestEvent::RunnerStarted)
        ));
        let BootEnd::KernelCrashed { splat } = &out.end else { panic!("{:?}", out.end) };
        assert_eq!((splat.kind, splat.line), (console::SplatKind::KernelPanic, 2));
        assert!(!out.end.is_infra());
        assert_eq!(seen[0], BootEvent::Guest(GuestEvent::RunnerStarted));
        assert!(matches!(&seen[1], BootEvent::Splat(s) if s.kind == console::SplatKind::KernelPanic));
    }

    #[test]
    fn a_completed_boot_streams_its_events_in_order() {
        let evs = [
            GuestEvent::RunnerStarted,
            GuestEvent::ScenarioStarted { id: "S01".into(), title: "t".into() },
            GuestEvent::Done { rc: 0 },
        ];
        let script: Vec<String> = evs.iter().cloned().map(say).collect();
        let (out, seen) = fake_boot(&format!("{}; exit 0", script.join("; ")));
        assert_eq!(out.end, BootEnd::Completed { rc: 0 });
        let guest: Vec<GuestEvent> =
            seen.into_iter().filter_map(|e| if let BootEvent::Guest(g) = e { Some(g) } else { None }).collect();
        assert_eq!(guest, evs.to_vec());
        assert_eq!(out.results, Ok(None));
        assert!(out.to_runner.is_some());
    }

    #[test]
    fn a_failing_qemu_is_named() {
        let (out, _) = fake_boot("echo 'qemu-system-x86_64: -device nvdimm: no such device' >&2; exit 1");
        let BootEnd::QemuFailed { status, stderr } = &out.end else { panic!("{:?}", out.end) };
        assert!(status.contains("exit status: 1") && stderr.contains("no such device"), "{status} {stderr}");
        assert!(out.end.is_infra());
    }

    #[test]
    fn a_stalled_guest_trips_the_watchdog_even_while_it_keeps_printing() {
        // A printk storm: lines keep coming, no step ever finishes.
        let t = Instant::now();
        let (out, _) =
            fake_boot(&format!("{}; while :; do echo '[ 9.9] rcu: noise'; done", say(GuestEvent::RunnerStarted)));
        assert_eq!(out.end, BootEnd::RunDeadline { after_s: 2.0 });
        assert_eq!(out.during, "before the first scenario (lab setup or selftests)");
        assert!(out.end.is_infra());
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }

    #[test]
    fn a_splat_keeps_its_report_and_where_the_guest_was() {
        use pinlab_scenarios::plan::{Action, Bytes, PlannedScenario, PlannedStep, Proc, Size, Target, TruncVia};
        use pinlab_scenarios::protocol::StepOutcome;
        let step = |name: &str, by: Proc, action: Action| PlannedStep {
            name: name.into(),
            action,
            by,
            probe: false,
            may_block: false,
        };
        let plan = Plan {
            flavor: pinlab_scenarios::Flavor::Debug,
            fs: pinlab_scenarios::Fs::Ext4,
            scenarios: vec![PlannedScenario {
                id: "S05".into(),
                title: "t".into(),
                steps: vec![
                    step("map", Proc::Holder, Action::Map { target: Target::File, size: Size(4096), files: 1 }),
                    step("truncate", Proc::Other, Action::Truncate { size: Bytes(0), via: TruncVia::Path }),
                ],
            }],
            selftests: Vec::new(),
            bench: None,
        };
        let finished = GuestEvent::StepFinished {
            id: "S05".into(),
            index: 0,
            by: Proc::Holder,
            name: "map".into(),
            outcome: StepOutcome::Ok,
            detail: String::new(),
            located: None,
        };
        let mut lines = vec!["[ 5.0] ==================================================================".to_string()];
        lines.push("[ 5.0] BUG: KASAN: slab-use-after-free in file_pins_hold_file+0x1c/0x80".into());
        lines.extend((0..40).map(|i| format!("[ 5.0] frame {i}")));
        let script = [
            say(GuestEvent::RunnerStarted),
            say(GuestEvent::ScenarioStarted { id: "S05".into(), title: "t".into() }),
            say(finished),
            "echo 'pinlab-runner: not the kernel'".into(),
            lines.iter().map(|l| format!("echo '{l}'")).collect::<Vec<_>>().join("; "),
            say(GuestEvent::Done { rc: 0 }),
        ]
        .join("; ");
        let (out, _) = fake_boot_with(&script, &plan);
        let sp = out.splats.iter().find(|s| s.kind == console::SplatKind::Kasan).expect("the KASAN report");
        assert_eq!(sp.scenario.as_deref(), Some("S05"));
        assert_eq!(sp.during.as_deref(), Some("scenario S05, step 2 (truncate)"));
        assert_eq!(sp.report.len(), console::REPORT_LINES);
        assert!(sp.report[0].contains("BUG: KASAN"));
        assert_eq!(sp.report[1], "[ 5.0] frame 0");
        assert!(sp.report.iter().all(|l| !l.starts_with("pinlab-")));
    }

    #[test]
    fn a_hung_task_report_ends_the_boot_after_its_grace() {
        let (out, _) = fake_boot(&format!(
            "{}; echo '[ 30.0] INFO: task truncate:77 blocked for more than 20 seconds.'; exec sleep 30",
            say(GuestEvent::RunnerStarted)
        ));
        let BootEnd::KernelHang { report } = &out.end else { panic!("{:?}", out.end) };
        assert!(report.contains("blocked for more than"), "{report}");
        assert!(!out.end.is_infra());
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
