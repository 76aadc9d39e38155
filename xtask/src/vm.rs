//! One boot: virtiofsd ×2, QEMU, deadlines, the console stream.
//!
//! Every wait has a named deadline, checks the child is still alive, and
//! kills it on expiry. The console is teed to `console.log` and parsed as a
//! stream (markers from the guest init and runner). The children and the
//! socket/NVDIMM tempdir are owned by guards, so an error or Ctrl-C path
//! leaves nothing running behind.

use crate::console::{self, Splat};
use crate::qemu::{self, QemuSpec};
use crate::util::{self, Cache};
use anyhow::{bail, Context, Result};
use pinlab_scenarios::plan::Plan;
use pinlab_scenarios::results::BootResults;
use std::io::{BufRead, BufReader, Write};
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
    /// From QEMU start until QEMU exits.
    pub run: Duration,
}

impl Deadlines {
    /// Generous enough for TCG on a loaded 2-core machine; a healthy boot
    /// reaches the runner in a few seconds.
    pub fn for_plan(accel: Accel, plan: &Plan) -> Deadlines {
        let slow = if accel == Accel::Tcg { 3 } else { 1 };
        let steps: usize = plan.scenarios.iter().map(|s| s.steps.len()).sum();
        Deadlines {
            boot: Duration::from_secs(40 * slow),
            run: Duration::from_secs(60 * slow + 20 * slow * steps as u64),
        }
    }
}

/// What to boot.
pub struct BootSpec<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
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
    /// QEMU start to exit.
    pub wall: Duration,
    /// QEMU start to the runner's start marker.
    pub to_runner: Option<Duration>,
}

/// Kills and reaps a child when dropped.
struct Reaper(Option<Child>);

impl Reaper {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until drop")
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
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
    let child = c.spawn().with_context(|| format!("Failed to start `{shown}`"))?;
    let mut r = Reaper(Some(child));
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
    _tmp: tempfile::TempDir,
    _vfs: [Reaper; 2],
}

fn prepare(
    cache: &Cache,
    kernel: &Path,
    rootfs: &Path,
    dir: &Path,
    plan: &Plan,
    accel: Accel,
    extra: &str,
) -> Result<Machine> {
    let virtiofsd = crate::host::ensure_virtiofsd(cache, false)?;
    let share = dir.join("share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share)?;
    std::fs::write(share.join("plan.json"), serde_json::to_vec_pretty(plan)?)?;
    if !plan.selftests.is_empty() {
        std::fs::create_dir_all(share.join("selftests"))?;
        for t in &plan.selftests {
            let src = Path::new(t);
            let name = src.file_name().context("selftest without a file name")?;
            std::fs::copy(src, share.join("selftests").join(name))
                .with_context(|| format!("Failed to copy the selftest {}", src.display()))?;
        }
    }
    // Sockets need a short path (108 bytes); the NVDIMM files are sparse.
    let tmp = tempfile::Builder::new().prefix("pinlab-vm-").tempdir().context("Failed to create a temp dir")?;
    let pmem = tmp.path().join("pmem0.img");
    let devdax = tmp.path().join("pmem1.img");
    std::fs::File::create(&pmem)?.set_len(qemu::PMEM_MIB << 20)?;
    std::fs::File::create(&devdax)?.set_len(qemu::DEVDAX_MIB << 20)?;
    let rootfs_sock = tmp.path().join("rootfs.sock");
    let share_sock = tmp.path().join("share.sock");
    let vfs_root = spawn_virtiofsd(&virtiofsd, &rootfs_sock, rootfs, true, &dir.join("virtiofsd-rootfs.log"))?;
    let vfs_share = spawn_virtiofsd(&virtiofsd, &share_sock, &share, false, &dir.join("virtiofsd-share.log"))?;
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
    };
    Ok(Machine { qspec, share, _tmp: tmp, _vfs: [vfs_root, vfs_share] })
}

/// Boot into an interactive shell on this terminal: the lab is set up (DAX
/// mounted, rxe up), the demos are on PATH; `exit` powers the guest off.
pub fn shell(cache: &Cache, kernel: &Path, rootfs: &Path, dir: &Path, plan: &Plan, accel: Accel) -> Result<()> {
    let mut m = prepare(cache, kernel, rootfs, dir, plan, accel, "pinlab.mode=shell")?;
    m.qspec.interactive = true;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(qemu::args(&m.qspec));
    let shown = util::show(&cmd);
    eprintln!("$ {shown}");
    eprintln!("(type `exit` in the guest to power it off)");
    let status = cmd.status().with_context(|| format!("Failed to start `{shown}`"))?;
    if !status.success() {
        bail!("QEMU exited with {status}");
    }
    Ok(())
}

/// Boot once and run the plan.
pub fn boot(cache: &Cache, spec: BootSpec<'_>) -> Result<BootOutcome> {
    let m = prepare(cache, spec.kernel, spec.rootfs, spec.dir, spec.plan, spec.accel, "")?;
    let share = m.share.clone();
    let qspec = m.qspec.clone();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(qemu::args(&qspec));
    let shown = util::show(&cmd);
    std::fs::write(spec.dir.join("qemu-cmdline.txt"), format!("{shown}\n"))?;
    let qemu_log = spec.dir.join("qemu.log");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(std::fs::File::create(&qemu_log)?);
    let t0 = Instant::now();
    let mut qemu = Reaper(Some(cmd.spawn().with_context(|| format!("Failed to start `{shown}`"))?));
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
    let mut console = std::fs::File::create(&console_path)?;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut to_runner = None;
    let mut failure = None;
    let mut done = false;
    loop {
        let (deadline, name) = if to_runner.is_none() {
            (spec.deadlines.boot, "boot deadline (kernel start to runner start)")
        } else {
            (spec.deadlines.run, "run deadline (QEMU start to poweroff)")
        };
        let left = deadline.saturating_sub(t0.elapsed());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                writeln!(console, "{line}")?;
                if to_runner.is_none() && console::has_marker(&line, console::MARK_RUNNER) {
                    to_runner = Some(t0.elapsed());
                }
                if console::has_marker(&line, console::MARK_DONE) {
                    done = true;
                }
                (spec.on_line)(&line);
                tail.push_back(line);
                if tail.len() > 15 {
                    tail.pop_front();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if t0.elapsed() >= deadline {
                    let _ = qemu.child().kill();
                    failure = Some(format!(
                        "{name} of {} expired; QEMU killed. The console last printed:\n{}",
                        util::fmt_duration(deadline),
                        tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
                    ));
                    break;
                }
            }
        }
    }
    let _ = reader.join();
    let status = qemu.child().wait()?;
    let wall = t0.elapsed();
    console.flush()?;
    drop(console);
    if failure.is_none() && !status.success() {
        let err = std::fs::read_to_string(&qemu_log).unwrap_or_default();
        failure = Some(format!("QEMU exited with {status}: {}", err.trim()));
    }
    if failure.is_none() && !done {
        failure = Some(format!(
            "the guest stopped before pinlab-init printed {} (crash or panic?). The console last printed:\n{}",
            console::MARK_DONE,
            tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
        ));
    }
    let log = std::fs::read_to_string(&console_path).unwrap_or_default();
    let splats = console::scan(&log);
    let results_path = share.join("guest-results.json");
    let results = match std::fs::read(&results_path) {
        Ok(b) => Some(
            serde_json::from_slice::<BootResults>(&b)
                .with_context(|| format!("Failed to parse {}", results_path.display()))?,
        ),
        Err(_) => None,
    };
    if results.is_none() && failure.is_none() {
        failure = Some(format!("the guest wrote no {}", results_path.display()));
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
        match results.as_ref().and_then(|r| r.fsck.as_ref()) {
            Some(f) if f.outcome == "ok" => {}
            Some(f) => failure = Some(format!("filesystem check failed: {}: {} {}", f.name, f.outcome, f.detail)),
            None => failure = Some("the runner did not check the filesystem at the end".into()),
        }
    }
    Ok(BootOutcome { console: console_path, results, splats, failure, wall, to_runner })
}

#[cfg(test)]
mod tests {
    use super::*;

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
