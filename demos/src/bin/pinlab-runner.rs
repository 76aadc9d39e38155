//! pinlab-runner: sets the lab up inside the guest (fsdax + devdax
//! namespaces, mkfs, `mount -o dax`, DAX check, rxe) and runs the plan's
//! scenarios, recording for every step the errno or bytes actually observed.
//!
//! Usage: pinlab-runner PLAN.json RESULTS.json [--setup-only]
//!
//! Results are rewritten after every scenario, so a crash mid-run still leaves
//! what was observed until then.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pinlab_demos::region::Region;
use pinlab_demos::worker::{self, pidfd_open, recv_line, reply, send, wait_readable, Context, Worker};
use pinlab_demos::StepError;
use pinlab_scenarios::bench::{key, Figure};
use pinlab_scenarios::plan::{Action, DaxMode, Plan, PlannedScenario, PlannedStep, Proc, Size, Target};
use pinlab_scenarios::protocol::worker::{Hello, Reply, Request};
use pinlab_scenarios::protocol::{GuestEvent, StepOutcome, GUEST_SHARE, HOST_SCAN_DIR};
use pinlab_scenarios::results::{parse_tap, BootResults, ScenarioResult, SelftestResult, StepResult, TapOutcome};
use pinlab_scenarios::Fs;
use std::collections::BTreeMap;
use std::io::BufReader;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pinlab_demos::worker::{ADDR, PMEM_MNT, RXE};
const NETDEV: &str = "dummy0";

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// Run a tool, returning its stdout; failure names the command, exit code and stderr.
fn tool(prog: &str, args: &[&str]) -> Result<String, StepError> {
    let shown = format!("{prog} {}", args.join(" "));
    let out =
        Command::new(prog).args(args).output().map_err(|e| StepError::other(format!("cannot run `{shown}`: {e}")))?;
    if !out.status.success() {
        return Err(StepError::other(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A step as it ended (`rep`, from this process or a worker), timed from `t`.
fn record(name: &str, t: Instant, rep: Reply) -> StepResult {
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    StepResult {
        name: name.into(),
        outcome: rep.outcome,
        detail: rep.detail,
        ms,
        placement: rep.placement,
        located: rep.located,
    }
}

/// `ndctl create-namespace` on a label-less NVDIMM; returns the device it made.
fn create_namespace(ns: &str, mode: &str, key: &str) -> Result<String, StepError> {
    let out = tool("ndctl", &["create-namespace", "-f", "-e", ns, "-m", mode])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| StepError::other(format!("ndctl printed no JSON ({e}): {out}")))?;
    let dev = v
        .get(key)
        .or_else(|| {
            v.get("daxregion").and_then(|d| d.get("devices")).and_then(|d| d.get(0)).and_then(|d| d.get("chardev"))
        })
        .and_then(|d| d.as_str())
        .ok_or_else(|| StepError::other(format!("ndctl output has no {key}: {out}")))?;
    Ok(format!("/dev/{dev}"))
}

fn mount_pmem(dev: &str, fs: Fs, dax: DaxMode) -> Result<String, StepError> {
    std::fs::create_dir_all(PMEM_MNT).map_err(|e| StepError::other(format!("mkdir {PMEM_MNT}: {e}")))?;
    let opts = format!("dax={}", dax.name());
    nix::mount::mount(Some(dev), PMEM_MNT, Some(fs.name()), nix::mount::MsFlags::empty(), Some(opts.as_str()))
        .map_err(|e| StepError::errno(e as i32, format!("mount -t {fs} -o {opts} {dev} {PMEM_MNT}")))?;
    Ok(format!("{dev} on {PMEM_MNT} type {fs} ({opts})"))
}

fn umount_pmem() -> Result<(), StepError> {
    nix::mount::umount(PMEM_MNT).map_err(|e| StepError::errno(e as i32, format!("umount {PMEM_MNT}")))
}

/// statx(STATX_ATTR_DAX) on a fresh file: the one check that DAX is really on.
fn check_dax(expect: bool) -> Result<String, StepError> {
    let p = Path::new(PMEM_MNT).join(".pinlab-dax-check");
    let r = Region::file(&p, 4096)?;
    let dax = r.is_dax()?;
    drop(r);
    let _ = std::fs::remove_file(&p);
    match dax {
        Some(d) if d == expect => Ok(format!("statx on {} reports STATX_ATTR_DAX={}", p.display(), d as u8)),
        other => Err(StepError::other(format!(
            "DAX is not what the mount asked for: statx on {} reports STATX_ATTR_DAX={other:?}, expected {expect}",
            p.display()
        ))),
    }
}

fn rxe_up() -> Result<String, StepError> {
    tool("ip", &["link", "set", "lo", "up"])?;
    // A dummy netdev: guest-internal by construction (it drops what it
    // transmits); rxe delivers traffic to its own address internally.
    if !Path::new("/sys/class/net").join(NETDEV).exists() {
        tool("ip", &["link", "add", NETDEV, "type", "dummy"])?;
    }
    tool("ip", &["link", "set", NETDEV, "up"])?;
    tool("ip", &["addr", "add", &format!("{ADDR}/24"), "dev", NETDEV])?;
    tool("rdma", &["link", "add", RXE, "type", "rxe", "netdev", NETDEV])?;
    let state = format!("/sys/class/infiniband/{RXE}/ports/1/state");
    let t = Instant::now();
    loop {
        let s = std::fs::read_to_string(&state).unwrap_or_default();
        if s.contains("ACTIVE") {
            return Ok(format!("{RXE} on {NETDEV} ({ADDR}): port 1 {} after {} ms", s.trim(), t.elapsed().as_millis()));
        }
        if t.elapsed() > Duration::from_secs(15) {
            return Err(StepError::other(format!("{state} is '{}' after 15 s, not ACTIVE", s.trim())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lab as set up: devices and the mount.
struct Lab {
    fs: Fs,
    pmem: String,
    devdax: String,
}

fn setup(fs: Fs, out: &mut Vec<StepResult>) -> Option<Lab> {
    macro_rules! step {
        ($name:expr, $e:expr) => {{
            let t = Instant::now();
            let r = $e;
            let ok = r.as_ref().ok().cloned();
            let rec = record($name, t, reply(r.map(|v: String| v)));
            println!("pinlab-runner: setup {}: {} {}", rec.name, rec.outcome, rec.detail);
            out.push(rec);
            ok?
        }};
    }
    // rxe needs nothing from the NVDIMM side: bring it up meanwhile. (Creating
    // the devdax namespace alongside the fsdax one was measured slower: the
    // two ndctl runs serialise in the kernel and slowed each other down.)
    let t_side = Instant::now();
    let rxe = std::thread::spawn(rxe_up);
    let pmem = step!("create fsdax namespace", create_namespace("namespace0.0", "fsdax", "blockdev"));
    let devdax = step!("create devdax namespace", create_namespace("namespace1.0", "devdax", "chardev"));
    step!(
        &format!("mkfs.{fs}"),
        match fs {
            // `-T default`: under 512 MiB mke2fs picks its "small" type, 1 KiB
            // blocks, which DAX refuses (it needs page-sized blocks).
            Fs::Ext4 => tool("mkfs.ext4", &["-q", "-F", "-T", "default", &pmem]),
            // exchange=1: XFS_IOC_EXCHANGE_RANGE needs the feature on disk (S24).
            Fs::Xfs => tool("mkfs.xfs", &["-q", "-f", "-i", "exchange=1", &pmem]),
        }
        .map(|_| format!("{fs} on {pmem}"))
    );
    step!("mount -o dax=always", mount_pmem(&pmem, fs, DaxMode::Always));
    step!("verify DAX (statx)", check_dax(true));
    // The step's own time is only the wait for the thread; say when it was ready.
    let joined = |h: std::thread::JoinHandle<Result<String, StepError>>, what: &str| {
        h.join().unwrap_or_else(|_| Err(StepError::other(format!("the {what} thread panicked"))))
    };
    step!(
        "rxe link up (alongside)",
        joined(rxe, "rxe set-up").map(|d| format!("{d}; ready {} ms after set-up began", t_side.elapsed().as_millis()))
    );
    Some(Lab { fs, pmem, devdax })
}

/// A live worker process.
struct Live {
    pid: i32,
    pidfd: OwnedFd,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// How the runner reaps it, if it is the runner's child.
    reap: Option<Reap>,
}

/// A worker the runner started, to be reaped when it is gone.
enum Reap {
    /// Forked from the runner: `waitpid`.
    Forked,
    /// Started as `pinlab-runner --worker` (the runner had other threads).
    Spawned(std::process::Child),
}

/// How many threads this process has (`/proc/self/task`).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|rd| rd.count()).unwrap_or(usize::MAX)
}

/// One scenario's processes and the runner's own state (the `other` process).
struct Scene<'a> {
    lab: &'a Lab,
    ctx: Context,
    listener: UnixListener,
    procs: BTreeMap<Proc, Live>,
    me: Worker,
    remounted: bool,
    /// A `may_block` call that was still sleeping when looked at.
    pending: Option<Pending>,
    /// Sysctls the scenario changed: (name, old value), to put back.
    sysctls: Vec<(String, String)>,
    /// Files the scenario created besides its own (victim, filler), to remove.
    created: Vec<PathBuf>,
    /// The step being run (0-based).
    step_index: usize,
}

/// A call made on a thread of its own that had not returned when looked at.
struct Pending {
    /// What it is, for messages.
    what: String,
    /// Its end.
    rx: std::sync::mpsc::Receiver<Reply>,
    /// Its thread, to join once it returned.
    thread: std::thread::JoinHandle<()>,
}

/// Where thread `tid` of this process sleeps: `/proc/self/task/TID/wchan`
/// and the top of its kernel stack (root can read it).
fn sleeping_in(tid: i32) -> String {
    let base = format!("/proc/self/task/{tid}");
    let wchan = std::fs::read_to_string(format!("{base}/wchan")).unwrap_or_default();
    let state = std::fs::read_to_string(format!("{base}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.chars().next().unwrap_or('?')))
        .unwrap_or('?');
    let stack: Vec<String> = std::fs::read_to_string(format!("{base}/stack"))
        .unwrap_or_default()
        .lines()
        .take(6)
        .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_string())
        .collect();
    format!(
        "sleeping in {} (state {state}){}",
        if wchan.trim().is_empty() || wchan.trim() == "0" { "?" } else { wchan.trim() },
        if stack.is_empty() { String::new() } else { format!("; kernel stack: {}", stack.join(" <- ")) }
    )
}

/// How long a `locate` waits for the host's scan of the NVDIMM.
const HOST_SCAN_WAIT: Duration = Duration::from_secs(30);

const STEP_DEADLINE: Duration = Duration::from_secs(pinlab_scenarios::plan::STEP_DEADLINE_S);

impl<'a> Scene<'a> {
    fn new(lab: &'a Lab, id: &str) -> Result<Scene<'a>, StepError> {
        let dir = Path::new("/run/pinlab");
        std::fs::create_dir_all(dir).map_err(|e| StepError::other(format!("mkdir {}: {e}", dir.display())))?;
        let ctl = dir.join(format!("{id}-ctl.sock"));
        let _ = std::fs::remove_file(&ctl);
        let listener =
            UnixListener::bind(&ctl).map_err(|e| StepError::other(format!("bind {}: {e}", ctl.display())))?;
        let ctx = Context { scenario: id.to_string(), devdax: lab.devdax.clone(), ctl };
        Ok(Scene {
            lab,
            me: Worker::new(Proc::Other, ctx.clone()),
            ctx,
            listener,
            procs: BTreeMap::new(),
            pending: None,
            sysctls: Vec::new(),
            created: Vec::new(),
            step_index: 0,
            remounted: false,
        })
    }

    /// Accept the next worker's connection (at most 10 s) and check its hello.
    fn accept(&mut self, role: Proc, reap: Option<Reap>) -> Result<(), StepError> {
        if !wait_readable(&self.listener, Duration::from_secs(10))? {
            return Err(StepError::other(format!("the {} did not connect within 10 s", role.name())));
        }
        let (stream, _) = self.listener.accept().map_err(|e| StepError::other(format!("accept: {e}")))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| StepError::other(e.to_string()))?);
        let hello: Hello = recv_line(&mut reader)
            .map_err(|e| StepError::other(format!("hello from the {}: {e}", role.name())))?
            .ok_or_else(|| StepError::other(format!("the {} hung up before saying hello", role.name())))?;
        if hello.role != role {
            return Err(StepError::other(format!(
                "expected the {} to connect, got the {}",
                role.name(),
                hello.role.name()
            )));
        }
        let pidfd = pidfd_open(hello.pid)?;
        self.procs.insert(role, Live { pid: hello.pid, pidfd, stream, reader, reap });
        Ok(())
    }

    /// Start `role`'s worker process and wait for its hello. It is forked
    /// from the runner, which has libibverbs and its provider loaded already
    /// (exec'ing `pinlab-runner --worker` cost ~0.3 s per process under TCG);
    /// only when the runner has another thread (a `may_block` call that never
    /// returned) is it exec'd instead, as fork would copy that thread's locks.
    fn spawn(&mut self, role: Proc) -> Result<(), StepError> {
        if thread_count() != 1 {
            let child = Command::new("/usr/local/bin/pinlab-runner")
                .args([
                    "--worker",
                    role.name(),
                    "--scenario",
                    &self.ctx.scenario,
                    "--devdax",
                    &self.ctx.devdax,
                    "--ctl",
                ])
                .arg(&self.ctx.ctl)
                .spawn()
                .map_err(|e| StepError::other(format!("start the {}: {e}", role.name())))?;
            return self.accept(role, Some(Reap::Spawned(child)));
        }
        // SAFETY: the runner is single-threaded here (checked just above, and
        // nothing in it starts a thread behind our back), so the child may run
        // ordinary Rust code. It never returns into the runner's code: it
        // serves requests and leaves with _exit, also when it panics.
        match unsafe { nix::unistd::fork() } {
            Err(e) => Err(StepError::sys(e, format!("fork() for the {}", role.name()))),
            Ok(nix::unistd::ForkResult::Child) => {
                // Only stdio survives: nothing of the runner's (its control
                // socket, pidfds, files) may stay open in a worker.
                // SAFETY: close_range(2) takes integers and touches no memory;
                // the Rust objects owning these fds are never used or dropped
                // in this process.
                unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
                let ctx = self.ctx.clone();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker::serve(role, ctx)));
                // SAFETY: _exit ends this process at once, without running the
                // runner's destructors or atexit handlers in the child.
                unsafe { libc::_exit(101) }
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => self.accept(role, Some(Reap::Forked)),
        }
    }

    /// Wait (pidfd) until `role`'s process is gone, at most `d`.
    fn wait_gone(&mut self, role: Proc, d: Duration) -> Result<String, StepError> {
        let Some(mut live) = self.procs.remove(&role) else { return Ok(String::new()) };
        let t = Instant::now();
        if !wait_readable(&live.pidfd, d)? {
            return Err(StepError::other(format!("the {} (pid {}) still runs after {d:?}", role.name(), live.pid)));
        }
        match live.reap.as_mut() {
            Some(Reap::Spawned(c)) => {
                let _ = c.wait();
            }
            Some(Reap::Forked) => {
                let _ = nix::sys::wait::waitpid(Pid::from_raw(live.pid), None);
            }
            None => {}
        }
        Ok(format!("pid {} gone after {} ms", live.pid, t.elapsed().as_millis()))
    }

    /// Have `role` do `action` and return its reply. An error is the
    /// runner's own failure to get one: no such process, it died or hung
    /// up, or it is still blocked at the step deadline.
    fn ask(&mut self, role: Proc, action: &Action) -> Result<Reply, StepError> {
        let Some(live) = self.procs.get_mut(&role) else {
            return Err(StepError::other(format!("there is no {} process (yet, or any more)", role.name())));
        };
        send(&mut live.stream, &Request { action: action.clone() })
            .map_err(|e| StepError::other(format!("send to the {}: {e}", role.name())))?;
        let t = Instant::now();
        // Wait for the answer; notice a crash instead of waiting out the deadline.
        loop {
            if wait_readable(&live.stream, Duration::from_millis(200))? {
                break;
            }
            if wait_readable(&live.pidfd, Duration::ZERO)? {
                return Err(StepError::other(format!(
                    "the {} (pid {}) died during {}",
                    role.name(),
                    live.pid,
                    action.kind()
                )));
            }
            if t.elapsed() > STEP_DEADLINE {
                let stacks = kernel_stacks(live.pid);
                // The evidence goes to the console too, next to the kernel's own reports.
                println!("pinlab-runner: the {} (pid {}) is stuck in {}:", role.name(), live.pid, action.kind());
                for l in stacks.lines() {
                    println!("pinlab-runner:   {l}");
                }
                return Err(StepError::blocked(format!(
                    "the {} did not answer {} within {STEP_DEADLINE:?}; where its threads sleep in the kernel: {}",
                    role.name(),
                    action.kind(),
                    stacks.replace('\n', " | ")
                )));
            }
        }
        let rep: Reply = recv_line(&mut live.reader)
            .map_err(|e| StepError::other(format!("answer from the {}: {e}", role.name())))?
            .ok_or_else(|| StepError::other(format!("the {} hung up during {}", role.name(), action.kind())))?;
        match (action, &rep.outcome) {
            (Action::Fork, StepOutcome::Ok) => self.accept(Proc::Child, None)?,
            (Action::Exit, StepOutcome::Ok) => {
                let gone = self.wait_gone(role, Duration::from_secs(10))?;
                return Ok(Reply {
                    outcome: StepOutcome::Ok,
                    detail: format!("{}; {gone}", rep.detail),
                    placement: None,
                    located: None,
                });
            }
            _ => {}
        }
        Ok(rep)
    }

    fn file_pins(&self, of: Proc, expect: &[String]) -> Result<String, StepError> {
        let pid =
            self.procs.get(&of).map(|l| l.pid).ok_or_else(|| StepError::other(format!("no {} process", of.name())))?;
        let path = format!("/proc/{pid}/file_pins");
        let text = std::fs::read_to_string(&path).map_err(|e| StepError::io(&e, format!("read {path}")))?;
        let shown = text.trim_end().replace('\n', " | ").replace('\t', "\\t");
        let got =
            parse_file_pins(&text).map_err(|e| StepError::mismatch(format!("mismatch: {path}: {e}: '{shown}'")))?;
        let mut want: Vec<String> = expect.to_vec();
        want.sort();
        if got == want {
            Ok(format!("{path}: '{shown}'"))
        } else {
            Err(StepError::mismatch(format!("mismatch: {path} lists {got:?}, expected {want:?}: '{shown}'")))
        }
    }

    /// Do one step: the runner's own actions here, the others' by asking them.
    fn step(&mut self, st: &PlannedStep) -> Reply {
        if st.may_block {
            return self.detached(st);
        }
        match (st.by, &st.action) {
            (Proc::Other, Action::Sysctl { name, value }) => {
                reply(pinlab_demos::oracle::sysctl(name, value).map(|(old, detail)| {
                    self.sysctls.push((name.clone(), old));
                    detail
                }))
            }
            (Proc::Other, Action::Await) => self.await_pending(STEP_DEADLINE),
            (_, Action::Locate { len }) => self.locate(len.0 as usize),
            (_, Action::Fill) | (_, Action::CreateFile { .. }) => {
                let name = match &st.action {
                    Action::CreateFile { name, .. } => name.clone(),
                    _ => pinlab_demos::oracle::FILLER.to_string(),
                };
                self.created.push(Path::new(PMEM_MNT).join(name));
                match st.by {
                    Proc::Other => reply(self.me.exec(&st.action)),
                    role => self.ask(role, &st.action).unwrap_or_else(|e| reply(Err(e))),
                }
            }
            (Proc::Other, Action::Kill { who }) => reply(self.kill(*who)),
            (Proc::Other, Action::FilePins { of, expect }) => reply(self.file_pins(*of, expect)),
            (Proc::Other, Action::Remount { dax }) => reply(self.remount(*dax)),
            (Proc::Other, a) => reply(self.me.exec(a)),
            (role, a) => self.ask(role, a).unwrap_or_else(|e| reply(Err(e))),
        }
    }

    /// `locate`: find the scenario's pattern on the namespace, then have the
    /// host search the NVDIMM backing file for it while nothing here moves
    /// (the host adds its view to the results; see [`GuestEvent::LocateRequest`]).
    fn locate(&mut self, len: usize) -> Reply {
        let seed = self.ctx.seed();
        let (mut detail, located) = match pinlab_demos::oracle::locate(&self.lab.pmem, Path::new(PMEM_MNT), len, seed) {
            Ok(v) => v,
            Err(e) => return reply(Err(e)),
        };
        match located.nvdimm_offset {
            Some(off) => {
                let token = format!("{}-{}", self.ctx.scenario, self.step_index);
                GuestEvent::LocateRequest {
                    id: self.ctx.scenario.clone(),
                    index: self.step_index,
                    token: token.clone(),
                    nvdimm_offset: off,
                    device_bytes: located.device_bytes,
                    seed,
                    region_blocks: located.region_blocks,
                }
                .emit();
                let answer = Path::new(GUEST_SHARE).join(HOST_SCAN_DIR).join(&token);
                let t = Instant::now();
                // readdir is not cached by virtiofs (a negative lookup would be, for a second).
                let answered = || {
                    std::fs::read_dir(answer.parent().unwrap_or(Path::new(GUEST_SHARE)))
                        .map(|rd| rd.flatten().any(|e| e.file_name().to_str() == Some(token.as_str())))
                        .unwrap_or(false)
                };
                while !answered() && t.elapsed() < HOST_SCAN_WAIT {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if answered() {
                    detail.push_str(&format!(
                        "; the host searched the NVDIMM meanwhile ({} ms)",
                        t.elapsed().as_millis()
                    ));
                } else {
                    detail.push_str(&format!("; the host did not answer within {} s", HOST_SCAN_WAIT.as_secs()));
                }
            }
            None => detail.push_str("; sysfs does not say where the namespace sits in the NVDIMM: no host check"),
        }
        Reply { outcome: StepOutcome::Ok, detail, placement: Some(located.placement()), located: Some(located) }
    }

    /// A `may_block` step: the call runs on a thread of its own; if it has not
    /// returned after BLOCK_CHECK_MS it is `blocked`, with where it sleeps,
    /// and a later `await` takes its end.
    fn detached(&mut self, st: &PlannedStep) -> Reply {
        // Which blocks the call is about to change, for the record.
        let blocks = pinlab_demos::oracle::extents(&self.ctx.file(0))
            .map(|ex| {
                let b = pinlab_demos::oracle::BLOCK as u64;
                let shown: Vec<String> = ex.iter().map(|e| format!("{}..{}", e.start / b, e.end / b)).collect();
                format!(
                    " (the file's blocks before: {})",
                    if shown.is_empty() { "none".into() } else { shown.join(", ") }
                )
            })
            .unwrap_or_default();
        let (tx, rx) = std::sync::mpsc::channel::<Reply>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel::<i32>();
        let ctx = self.ctx.clone();
        let action = st.action.clone();
        let thread = match std::thread::Builder::new().name("may-block".into()).spawn(move || {
            let _ = tid_tx.send(nix::unistd::gettid().as_raw());
            let mut w = Worker::new(Proc::Other, ctx);
            let _ = tx.send(reply(w.exec(&action)));
        }) {
            Ok(t) => t,
            Err(e) => return reply(Err(StepError::other(format!("spawn a thread for {}: {e}", st.action.kind())))),
        };
        let tid = tid_rx.recv().unwrap_or(0);
        let check = Duration::from_millis(pinlab_scenarios::plan::BLOCK_CHECK_MS);
        match rx.recv_timeout(check) {
            Ok(mut rep) => {
                let _ = thread.join();
                rep.detail.push_str(&blocks);
                rep
            }
            Err(_) => {
                let where_ = sleeping_in(tid);
                let what = format!("{} (thread {tid})", st.action.kind());
                self.pending = Some(Pending { what: what.clone(), rx, thread });
                Reply {
                    outcome: StepOutcome::Blocked,
                    detail: format!("{what} has not returned after {} ms: {where_}{blocks}", check.as_millis()),
                    placement: None,
                    located: None,
                }
            }
        }
    }

    /// `await`: the pending call's end, waiting at most `d`.
    fn await_pending(&mut self, d: Duration) -> Reply {
        let Some(p) = self.pending.take() else {
            return reply(Ok(
                "nothing to wait for: the may_block call had already returned (its outcome is that step's)".into(),
            ));
        };
        let t = Instant::now();
        match p.rx.recv_timeout(d) {
            Ok(mut rep) => {
                let _ = p.thread.join();
                rep.detail =
                    format!("{} returned {} ms after the await began: {}", p.what, t.elapsed().as_millis(), rep.detail);
                rep
            }
            Err(_) => {
                let detail = format!("{} still sleeps after {} s more", p.what, d.as_secs());
                self.pending = Some(p);
                Reply { outcome: StepOutcome::Blocked, detail, placement: None, located: None }
            }
        }
    }

    /// `kill`: SIGKILL `who` and wait (pidfd) until it is gone.
    fn kill(&mut self, who: Proc) -> Result<String, StepError> {
        let pid = self
            .procs
            .get(&who)
            .map(|l| l.pid)
            .ok_or_else(|| StepError::other(format!("no {} to kill", who.name())))?;
        kill(Pid::from_raw(pid), Signal::SIGKILL).map_err(|e| StepError::sys(e, format!("kill({pid}, SIGKILL)")))?;
        let gone = self.wait_gone(who, Duration::from_secs(10))?;
        Ok(format!("SIGKILL to the {} (pid {pid}); {gone}", who.name()))
    }

    /// `remount`: the filesystem under test with `-o dax=MODE`.
    fn remount(&mut self, dax: DaxMode) -> Result<String, StepError> {
        umount_pmem()?;
        self.remounted = true;
        let m = mount_pmem(&self.lab.pmem, self.lab.fs, dax)?;
        let check = check_dax(dax == DaxMode::Always)?;
        Ok(format!("{m}; {check}"))
    }

    /// Back to a clean lab, and prove it: every worker exits (the kernel drops
    /// whatever they held), nobody's file_pins lists a file, the scenario's
    /// file can be truncated, the mount is dax=always again.
    fn finish(mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        let roles: Vec<Proc> = self.procs.keys().copied().collect();
        for role in roles {
            let why = match self.ask(role, &Action::Exit) {
                Ok(rep) if rep.outcome.is_ok() => continue,
                Ok(Reply { outcome: StepOutcome::Errno(name), detail, .. }) => format!("{detail} ({name})"),
                Ok(rep) => rep.detail,
                Err(e) => e.to_string(),
            };
            problems.push(format!("{} did not exit cleanly: {why}", role.name()));
            if let Some(l) = self.procs.get(&role) {
                let _ = kill(Pid::from_raw(l.pid), Signal::SIGKILL);
            }
            let _ = self.wait_gone(role, Duration::from_secs(10));
        }
        if let Err(e) = self.me.release_all() {
            problems.push(format!("runner release: {e}"));
        }
        // Every pin is gone now: a call that slept on one must return.
        if self.pending.is_some() {
            let rep = self.await_pending(Duration::from_secs(10));
            if rep.outcome == StepOutcome::Blocked {
                problems.push(format!("a may_block call never returned: {}", rep.detail));
            }
        }
        for (name, old) in self.sysctls.drain(..).rev() {
            if let Err(e) = pinlab_demos::oracle::sysctl(&name, &old) {
                problems.push(format!("restore {name}={old}: {e}"));
            }
        }
        for p in self.created.drain(..) {
            let _ = std::fs::remove_file(&p);
        }
        for (pid, text) in all_file_pins() {
            if parse_file_pins(&text).map(|f| !f.is_empty()).unwrap_or(true) {
                problems.push(format!("pid {pid} still pins: {}", text.trim()));
            }
        }
        for i in 0..4 {
            let p = self.ctx.file(i);
            if p.exists() {
                if let Err(e) = std::fs::OpenOptions::new().write(true).open(&p).and_then(|f| f.set_len(0)) {
                    problems.push(format!("truncate {} after the scenario: {e} (a pin survived?)", p.display()));
                }
                let _ = std::fs::remove_file(&p);
            }
        }
        // Commit those frees now: a journaling filesystem keeps freed blocks
        // unallocatable until its transaction commits, so without this the
        // next scenario's file lands in whatever little space was free
        // before (S21.dat after S20's full-disk victim: in the last gap
        // the next victim never reaches, and the hazard did not show).
        nix::unistd::sync();
        if self.remounted {
            if let Err(e) = umount_pmem()
                .and_then(|()| mount_pmem(&self.lab.pmem, self.lab.fs, DaxMode::Always))
                .and_then(|_| check_dax(true))
            {
                problems.push(format!("restore dax=always: {e}"));
            }
        }
        let _ = std::fs::remove_file(&self.ctx.ctl);
        let _ = std::fs::remove_file(self.ctx.receiver_socket());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// `/proc/<pid>/file_pins`: `N: owner` lines, each followed by tab-indented
/// pinned files; bare paths are pins owned by an mm. Returns the pinned
/// files' names, sorted.
fn parse_file_pins(text: &str) -> Result<Vec<String>, String> {
    let mut files = Vec::new();
    let mut owner = false;
    for l in text.lines() {
        if l.trim().is_empty() {
            continue;
        }
        if let Some(f) = l.strip_prefix('\t') {
            if !owner {
                return Err("a tab-indented file before any owner line".into());
            }
            files.push(f.trim().to_string());
        } else if let Some((n, path)) = l.split_once(": ").filter(|(n, _)| n.chars().all(|c| c.is_ascii_digit())) {
            if !path.starts_with("/dev/infiniband/uverbs") {
                return Err(format!("owner of fd {n} is '{path}', not a /dev/infiniband/uverbsN context"));
            }
            owner = true;
        } else {
            files.push(l.trim().to_string());
        }
    }
    let mut names: Vec<String> = files
        .iter()
        .map(|f| Path::new(f).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
        .collect();
    names.sort();
    Ok(names)
}

fn all_file_pins() -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter_map(|e| {
            let t = std::fs::read_to_string(e.path().join("file_pins")).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), t))
        })
        .collect()
}

fn run_scenario(lab: &Lab, sc: &PlannedScenario) -> ScenarioResult {
    GuestEvent::ScenarioStarted { id: sc.id.clone(), title: sc.title.clone() }.emit();
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let mut scene = match Scene::new(lab, &sc.id) {
        Ok(s) => s,
        Err(e) => {
            return ScenarioResult { id: sc.id.clone(), steps, ms: 0.0, isolation: Some(format!("cannot start: {e}")) };
        }
    };
    let needs_receiver = sc
        .steps
        .iter()
        .any(|s| s.by == Proc::Receiver || matches!(s.action, Action::SendUverbs { to: Proc::Receiver }));
    let mut start = scene.spawn(Proc::Holder);
    if start.is_ok() && needs_receiver {
        start = scene.spawn(Proc::Receiver);
    }
    let mut stopped = start.as_ref().err().map(|e| format!("workers did not start: {e}"));
    for (i, st) in sc.steps.iter().enumerate() {
        if stopped.is_some() {
            steps.push(StepResult {
                name: st.name.clone(),
                outcome: StepOutcome::NotRun,
                detail: String::new(),
                ms: 0.0,
                placement: None,
                located: None,
            });
            continue;
        }
        let t = Instant::now();
        scene.step_index = i;
        let rec = record(&st.name, t, scene.step(st));
        GuestEvent::StepFinished {
            id: sc.id.clone(),
            index: i,
            by: st.by,
            name: rec.name.clone(),
            outcome: rec.outcome.clone(),
            detail: rec.detail.clone(),
            located: rec.located.clone().map(Box::new),
        }
        .emit();
        let still_sleeping = st.may_block && rec.outcome == StepOutcome::Blocked;
        if !rec.outcome.is_ok() && !st.probe && !still_sleeping {
            stopped = Some(String::new());
        }
        steps.push(rec);
    }
    let isolation = match (start, scene.finish()) {
        (Err(e), _) => Some(format!("workers did not start: {e}")),
        (_, Err(e)) => Some(e),
        _ => None,
    };
    if let Some(i) = &isolation {
        println!("pinlab-runner: {} isolation check FAILED: {i}", sc.id);
    }
    ScenarioResult { id: sc.id.clone(), steps, ms: t0.elapsed().as_secs_f64() * 1000.0, isolation }
}

/// The bench's empty scenario: the holder maps 4 KiB of anonymous memory.
fn empty_scenario() -> PlannedScenario {
    PlannedScenario {
        id: "B00".into(),
        title: "empty scenario (bench: the runner's per-scenario overhead)".into(),
        steps: vec![PlannedStep {
            name: "map 4 KiB of anonymous memory".into(),
            action: Action::Map { target: Target::Anon, size: Size(4096), files: 1 },
            by: Proc::Holder,
            probe: false,
            may_block: false,
        }],
    }
}

/// `reps` empty scenarios through [`run_scenario`]: their wall time minus the
/// step's ([`key::SCENARIO_OVERHEAD`]); then as many through the pieces of
/// [`Scene`], timing the holder's start and the tear-down.
fn bench_overhead(lab: &Lab, reps: u32, progress: &mut dyn FnMut(&Figure)) -> Vec<Figure> {
    let fig = |key: &str, what: &str| Figure {
        key: key.into(),
        what: what.into(),
        unit: "ms".into(),
        samples: Vec::new(),
        error: None,
    };
    let mut overhead = fig(
        key::SCENARIO_OVERHEAD,
        "an empty scenario (holder started, one 4 KiB anonymous map, workers exit, isolation check), minus its step",
    );
    let mut start = fig(key::WORKER_START, "start the holder until its hello arrived");
    let mut finish = fig(key::SCENARIO_FINISH, "tear-down: workers exit, isolation check, files removed");
    let sc = empty_scenario();
    for _ in 0..reps {
        let r = run_scenario(lab, &sc);
        let steps: f64 = r.steps.iter().map(|s| s.ms).sum();
        match (&r.isolation, r.steps.iter().find(|s| !s.outcome.is_ok())) {
            (Some(i), _) => overhead.error = Some(format!("isolation: {i}")),
            (None, Some(s)) => overhead.error = Some(format!("{}: {} {}", s.name, s.outcome, s.detail)),
            (None, None) => overhead.samples.push(r.ms - steps),
        }
        progress(&overhead);
        if overhead.error.is_some() {
            break;
        }
    }
    for _ in 0..reps {
        let pieces = Scene::new(lab, &sc.id).and_then(|mut scene| {
            let t = Instant::now();
            scene.spawn(Proc::Holder)?;
            let started = t.elapsed();
            let rep = scene.step(&sc.steps[0]);
            if !rep.outcome.is_ok() {
                return Err(StepError::other(format!("{}: {} {}", sc.steps[0].name, rep.outcome, rep.detail)));
            }
            let t = Instant::now();
            scene.finish().map_err(StepError::other)?;
            Ok((started, t.elapsed()))
        });
        match pieces {
            Ok((s, f)) => {
                start.samples.push(s.as_secs_f64() * 1e3);
                finish.samples.push(f.as_secs_f64() * 1e3);
            }
            Err(e) => {
                start.error = Some(e.to_string());
                finish.error = Some(e.to_string());
            }
        }
        progress(&start);
        progress(&finish);
        if start.error.is_some() {
            break;
        }
    }
    vec![overhead, start, finish]
}

/// Run every kselftest binary in `dir` on the DAX mount and turn its TAP
/// lines into results: `ok`, `skip` (`ok … # SKIP`) or `fail` (`not ok`,
/// or a program that could not run or exited with a failure).
fn run_selftests(dir: &Path) -> Vec<SelftestResult> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut bins: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    bins.sort();
    let mut out = Vec::new();
    for b in bins {
        let name = b.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let results = match Command::new(&b).env("LAYOUT_LEASE_DIR", PMEM_MNT).current_dir(PMEM_MNT).output() {
            Ok(o) => parse_tap(
                &name,
                &String::from_utf8_lossy(&o.stdout),
                o.status.code(),
                &String::from_utf8_lossy(&o.stderr),
            ),
            Err(e) => vec![SelftestResult {
                program: name,
                test: String::new(),
                outcome: TapOutcome::Fail,
                detail: format!("cannot run: {e}"),
            }],
        };
        for r in &results {
            println!("pinlab-runner: selftest {}: {} {}", r.label(), r.outcome.as_str(), r.detail);
        }
        out.extend(results);
    }
    out
}

fn write_results(path: &Path, r: &BootResults) {
    let tmp = path.with_extension("tmp");
    let ok = serde_json::to_vec_pretty(r)
        .map_err(|e| e.to_string())
        .and_then(|b| std::fs::write(&tmp, b).map_err(|e| e.to_string()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if let Err(e) = ok {
        println!("pinlab-runner: cannot write {}: {e}", path.display());
    }
}

fn arg_after(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(role) = arg_after(&args, "--worker") {
        let role = match role.as_str() {
            "holder" => Proc::Holder,
            "receiver" => Proc::Receiver,
            other => {
                eprintln!("pinlab-runner: unknown worker role {other}");
                std::process::exit(2);
            }
        };
        let ctx = Context {
            scenario: arg_after(&args, "--scenario").unwrap_or_default(),
            devdax: arg_after(&args, "--devdax").unwrap_or_default(),
            ctl: PathBuf::from(arg_after(&args, "--ctl").unwrap_or_default()),
        };
        worker::serve(role, ctx);
    }
    if args.len() < 3 {
        eprintln!("usage: pinlab-runner PLAN.json RESULTS.json [--setup-only]");
        std::process::exit(2);
    }
    let setup_only = args.iter().any(|a| a == "--setup-only");
    let plan: Plan = match std::fs::read(&args[1])
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            println!("pinlab-runner: cannot read plan {}: {e}", args[1]);
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(&args[2]);
    let mut res = BootResults {
        kernel: nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        runner_start_ms: uptime_ms(),
        ..Default::default()
    };
    let lab = setup(plan.fs, &mut res.setup);
    write_results(&out, &res);
    let Some(lab) = lab else {
        println!("pinlab-runner: setup failed; no scenario can run");
        std::process::exit(1);
    };
    // Workers are forked from here: load libibverbs and rxe's provider once.
    let t = Instant::now();
    match pinlab_demos::rdma::preload() {
        Ok(devs) => {
            println!("pinlab-runner: libibverbs loaded ({}) in {} ms", devs.join(", "), t.elapsed().as_millis())
        }
        Err(e) => println!("pinlab-runner: cannot preload libibverbs: {e:#}"),
    }
    res.selftests = run_selftests(&Path::new(GUEST_SHARE).join("selftests"));
    write_results(&out, &res);
    if setup_only {
        return;
    }
    if let Some(bp) = &plan.bench {
        GuestEvent::BenchStarted.emit();
        println!("pinlab-runner: bench plan: {bp:?}");
        let mut progress = |f: &Figure| {
            if f.error.is_some() || !f.samples.is_empty() {
                GuestEvent::BenchSample {
                    key: f.key.clone(),
                    samples: f.samples.len(),
                    value: f.samples.last().copied(),
                    unit: f.unit.clone(),
                    error: f.error.clone(),
                }
                .emit();
            }
        };
        let mut b = pinlab_demos::bench::run(bp, &mut progress);
        b.figures.extend(bench_overhead(&lab, bp.scenario_reps, &mut progress));
        res.bench = Some(b);
        write_results(&out, &res);
    }
    for sc in &plan.scenarios {
        let r = run_scenario(&lab, sc);
        res.scenarios.push(r);
        write_results(&out, &res);
    }
    // The filesystem must be clean after everything the scenarios did to it.
    let t = Instant::now();
    let fsck = umount_pmem().and_then(|()| match lab.fs {
        Fs::Ext4 => tool("e2fsck", &["-fn", &lab.pmem]),
        Fs::Xfs => tool("xfs_repair", &["-n", &lab.pmem]),
    });
    let rec = record(
        &format!("{} -n {}", if lab.fs == Fs::Ext4 { "e2fsck -f" } else { "xfs_repair" }, lab.pmem),
        t,
        reply(fsck.map(|out| format!("clean: {}", out.lines().last().unwrap_or("").trim()))),
    );
    println!("pinlab-runner: fsck: {} {}", rec.outcome, rec.detail);
    res.fsck = Some(rec);
    write_results(&out, &res);
    println!("pinlab-runner: {} scenarios done at uptime {} ms", res.scenarios.len(), uptime_ms());
}

/// Where the threads of `pid` sleep in the kernel: each thread's
/// `/proc/<pid>/task/<tid>/stack` (`wchan` when the kernel has no stack
/// traces), one line per frame, for a step that did not return.
fn kernel_stacks(pid: i32) -> String {
    let mut out = String::new();
    let dir = format!("/proc/{pid}/task");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return format!("{dir}: gone");
    };
    let mut tids: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    tids.sort();
    for tid in tids {
        let base = format!("{dir}/{tid}");
        let state = std::fs::read_to_string(format!("{base}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.chars().next().unwrap_or('?')))
            .unwrap_or('?');
        match std::fs::read_to_string(format!("{base}/stack")) {
            Ok(st) if !st.trim().is_empty() => {
                out.push_str(&format!("thread {tid} (state {state}):\n"));
                for l in st.lines() {
                    out.push_str(&format!("  {}\n", l.trim()));
                }
            }
            _ => {
                let wchan = std::fs::read_to_string(format!("{base}/wchan")).unwrap_or_default();
                out.push_str(&format!(
                    "thread {tid} (state {state}): wchan {}\n",
                    if wchan.is_empty() { "?" } else { &wchan }
                ));
            }
        }
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::parse_file_pins;

    #[test]
    fn file_pins_format() {
        let t = "3: /dev/infiniband/uverbs0\n\t/mnt/pmem/S15.dat\n\t/mnt/pmem/S15-1.dat\n4: /dev/infiniband/uverbs0\n\t/mnt/pmem/S15-2.dat\n";
        assert_eq!(parse_file_pins(t).unwrap(), vec!["S15-1.dat", "S15-2.dat", "S15.dat"]);
        assert_eq!(parse_file_pins("").unwrap(), Vec::<String>::new());
        // Pins owned by an mm are bare paths.
        assert_eq!(parse_file_pins("/mnt/pmem/a\n").unwrap(), vec!["a"]);
        assert!(parse_file_pins("\t/mnt/pmem/a\n").is_err());
        assert!(parse_file_pins("3: /dev/null\n\t/mnt/pmem/a\n").is_err());
    }
}
