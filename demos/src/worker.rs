//! The processes of a scenario and what each can do.
//!
//! The runner (the `other` process) starts a `holder` (and a `receiver` when
//! a scenario needs one) as `pinlab-runner --worker ROLE …`. Each worker
//! connects to the runner's control socket, says hello (role, pid), then
//! executes one action per request and answers with the outcome: `ok` or the
//! errno the kernel gave. A `fork` makes the holder's child a worker too.
//! Nothing is coordinated by sleeping: requests and answers go over the
//! socket, and exits are observed through pidfds.

use crate::rdma::{self, Device, Mr};
use crate::region::Region;
use crate::StepError;
use pinlab_scenarios::errno;
use pinlab_scenarios::plan::{pattern_byte, Action, LeaseKind, Proc, Target, TruncVia};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Guest-internal address of the rxe netdev.
pub const ADDR: &str = "192.0.2.1";
/// The RDMA device.
pub const RXE: &str = "rxe0";
/// Where the filesystem under test is mounted.
pub const PMEM_MNT: &str = "/mnt/pmem";
/// The RDMA WRITE client, in the rootfs.
pub const CLIENT: &str = "/usr/local/bin/rdma-client";

/// First message of a worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Its role.
    pub role: Proc,
    /// Its pid.
    pub pid: i32,
}

/// The runner asks a worker to do one action.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// What to do.
    pub action: Action,
}

/// A worker's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    /// `ok`, an errno name, `mismatch` or `error`.
    pub outcome: String,
    /// What happened, for people.
    pub detail: String,
}

impl Reply {
    /// From an action's result.
    pub fn from_result(r: Result<String, StepError>) -> Reply {
        match r {
            Ok(detail) => Reply { outcome: "ok".into(), detail },
            Err(e) => Reply {
                outcome: match e.errno {
                    Some(n) => errno::name(n),
                    None if e.message.starts_with("mismatch") => "mismatch".into(),
                    None => "error".into(),
                },
                detail: e.message,
            },
        }
    }
}

/// What every process knows about the scenario.
#[derive(Clone, Debug)]
pub struct Context {
    /// Scenario id; names its files (`/mnt/pmem/S05.dat`, …).
    pub scenario: String,
    /// The devdax device, e.g. `/dev/dax1.0`.
    pub devdax: String,
    /// The runner's control socket.
    pub ctl: PathBuf,
}

impl Context {
    /// The scenario's `i`-th file (0 = the main one).
    pub fn file(&self, i: usize) -> PathBuf {
        let name = if i == 0 { format!("{}.dat", self.scenario) } else { format!("{}-{i}.dat", self.scenario) };
        Path::new(PMEM_MNT).join(name)
    }

    /// Where the receiver listens for SCM_RIGHTS.
    pub fn receiver_socket(&self) -> PathBuf {
        self.ctl.with_file_name(format!("{}-receiver.sock", self.scenario))
    }
}

/// One process's state: what it has open, mapped and registered.
pub struct Worker {
    /// Who this is.
    pub role: Proc,
    /// The scenario.
    pub ctx: Context,
    /// Descriptors of the files this process mapped, in order (the first is
    /// the scenario's main file).
    files: Vec<File>,
    next_file: usize,
    regions: Vec<Region>,
    mrs: Vec<Mr>,
    dev: Option<Device>,
    uverbs_rx: Option<OwnedFd>,
    rx_listener: Option<UnixListener>,
    written: Option<usize>,
}

fn sys(r: libc::c_int, what: impl FnOnce() -> String) -> Result<libc::c_int, StepError> {
    if r < 0 {
        Err(StepError::last_os(what()))
    } else {
        Ok(r)
    }
}

fn io_err(e: std::io::Error, what: String) -> StepError {
    StepError::errno(e.raw_os_error().unwrap_or(0), format!("{what}: {e}"))
}

impl Worker {
    /// A fresh process state.
    pub fn new(role: Proc, ctx: Context) -> Worker {
        Worker {
            role,
            ctx,
            files: Vec::new(),
            next_file: 0,
            regions: Vec::new(),
            mrs: Vec::new(),
            dev: None,
            uverbs_rx: None,
            rx_listener: None,
            written: None,
        }
    }

    fn device(&mut self) -> Result<&Device, StepError> {
        if self.dev.is_none() {
            self.dev = Some(Device::open(Some(RXE)).map_err(|e| StepError::other(format!("open {RXE}: {e:#}")))?);
        }
        Ok(self.dev.as_ref().expect("just set"))
    }

    fn fds(&self) -> Result<Vec<RawFd>, StepError> {
        if self.files.is_empty() {
            return Err(StepError::other(format!("the {} holds no descriptor of the file", self.role.name())));
        }
        Ok(self.files.iter().map(|f| f.as_raw_fd()).collect())
    }

    /// A descriptor of the scenario's main file: this process's own if it has
    /// one, else a fresh `O_WRONLY` one (returned too, so it stays open).
    fn data_fd(&self) -> Result<(RawFd, Option<File>), StepError> {
        if let Some(f) = self.files.first() {
            return Ok((f.as_raw_fd(), None));
        }
        let p = self.ctx.file(0);
        let f = OpenOptions::new().write(true).open(&p).map_err(|e| io_err(e, format!("open({})", p.display())))?;
        Ok((f.as_raw_fd(), Some(f)))
    }

    /// Listen for an SCM_RIGHTS hand-over (the receiver does this at start).
    pub fn listen_for_fd(&mut self) -> Result<(), StepError> {
        let p = self.ctx.receiver_socket();
        let _ = std::fs::remove_file(&p);
        self.rx_listener = Some(UnixListener::bind(&p).map_err(|e| io_err(e, format!("bind {}", p.display())))?);
        Ok(())
    }

    /// Undo everything the process holds, in the order a careful program
    /// would: dereg, munmap, close.
    pub fn release_all(&mut self) -> Result<(), StepError> {
        for mr in self.mrs.drain(..) {
            mr.dereg()?;
        }
        self.regions.clear();
        self.files.clear();
        self.uverbs_rx = None;
        self.dev = None;
        Ok(())
    }

    /// Do one action. `Kill`, `FilePins` and `Remount` need the runner's view
    /// of the other processes and are handled there.
    pub fn exec(&mut self, action: &Action) -> Result<String, StepError> {
        match action {
            Action::Map { target, size, files } => {
                let len = size.0 as usize;
                let r = match target {
                    Target::Anon => Region::anon(len)?,
                    Target::File if *files <= 1 => {
                        let p = self.ctx.file(self.next_file);
                        let _ = std::fs::remove_file(&p);
                        Region::file(&p, len)?
                    }
                    Target::File => {
                        let paths: Vec<PathBuf> =
                            (self.next_file..self.next_file + *files as usize).map(|i| self.ctx.file(i)).collect();
                        for p in &paths {
                            let _ = std::fs::remove_file(p);
                        }
                        Region::files(&paths, len)?
                    }
                    Target::Devdax => Region::devdax(Path::new(&self.ctx.devdax), len)?,
                };
                let dax = r.is_dax()?;
                let what = match (target, dax) {
                    (Target::File, Some(d)) => format!(
                        "{}, {len} bytes each, MAP_SHARED at {:p}, STATX_ATTR_DAX={}",
                        (self.next_file..self.next_file + *files as usize)
                            .map(|i| self.ctx.file(i).display().to_string())
                            .collect::<Vec<_>>()
                            .join(" + "),
                        r.as_mut_ptr(),
                        d as u8
                    ),
                    (Target::Devdax, _) => {
                        format!("{} MAP_SHARED, {len} bytes at {:p}", self.ctx.devdax, r.as_mut_ptr())
                    }
                    _ => format!("anonymous MAP_SHARED, {len} bytes at {:p}", r.as_mut_ptr()),
                };
                let mut r = r;
                if *target == Target::File {
                    self.next_file += *files as usize;
                }
                self.files.extend(r.take_files());
                self.regions.push(r);
                Ok(what)
            }
            Action::RegMr | Action::RegMrRange { .. } => {
                let r = self.regions.last().ok_or_else(|| StepError::other("reg_mr before map"))?;
                let (off, len) = match action {
                    Action::RegMrRange { offset, len } => (offset.0 as usize, len.0 as usize),
                    _ => (0, r.len()),
                };
                if off.checked_add(len).is_none_or(|end| end > r.len()) {
                    return Err(StepError::other(format!(
                        "reg_mr range {off}+{len} is outside the {}-byte region",
                        r.len()
                    )));
                }
                // SAFETY: off+len <= r.len(), checked above.
                let ptr = unsafe { r.as_mut_ptr().add(off) };
                let mr = self.device()?.reg_mr(ptr, len)?;
                let d = format!(
                    "MR #{}: lkey={:#x} rkey={:#x}, {len} bytes at {ptr:p}",
                    self.mrs.len() + 1,
                    mr.lkey(),
                    mr.rkey()
                );
                self.mrs.push(mr);
                Ok(d)
            }
            Action::RdmaWrite => {
                let mr = self.mrs.last().ok_or_else(|| StepError::other("rdma_write before reg_mr"))?;
                let dev = self.dev.as_ref().ok_or_else(|| StepError::other("no device"))?;
                let (pid, report) = rdma::write_from_client(dev, mr, CLIENT, ADDR, Duration::from_secs(30))?;
                self.written = Some(mr.len());
                Ok(format!(
                    "rdma-client (pid {pid}) RDMA-WROTE {} bytes into MR rkey={:#x}: {}",
                    mr.len(),
                    mr.rkey(),
                    serde_json::to_string(&report).unwrap_or_default()
                ))
            }
            Action::Verify => {
                let mr = self.mrs.last().ok_or_else(|| StepError::other("verify without an MR"))?;
                if self.written.is_none() {
                    return Err(StepError::other("verify before rdma_write"));
                }
                let (a, n) = (mr.addr() as usize, mr.len());
                if !self
                    .regions
                    .iter()
                    .any(|r| (r.as_mut_ptr() as usize) <= a && a + n <= r.as_mut_ptr() as usize + r.len())
                {
                    return Err(StepError::other("verify: the MR's memory is no longer mapped in this process"));
                }
                // SAFETY: the MR covers mapped memory of one of our regions, which are still mapped.
                let bytes = unsafe { std::slice::from_raw_parts(mr.addr().cast_const(), mr.len()) };
                match crate::rdma::first_pattern_mismatch(bytes) {
                    None => Ok(format!("all {} bytes in the MR match the client's pattern", bytes.len())),
                    Some((i, got, want)) => {
                        Err(StepError::other(format!("mismatch at offset {i}: found {got:#04x}, expected {want:#04x}")))
                    }
                }
            }
            Action::DeregMr => {
                if self.mrs.is_empty() {
                    return Err(StepError::other("dereg_mr without an MR"));
                }
                let n = self.mrs.len();
                for mr in self.mrs.drain(..) {
                    mr.dereg()?;
                }
                Ok(format!("{n} MR(s) deregistered; their pages unpinned"))
            }
            Action::Lease { kind } => {
                let fds = self.fds()?;
                for fd in &fds {
                    // SAFETY: fcntl on a descriptor we own, integer argument.
                    sys(unsafe { libc::fcntl(*fd, libc::F_SETLEASE, kind.arg()) }, || {
                        format!("fcntl(fd {fd}, F_SETLEASE, {} = {})", kind.c_name(), kind.arg())
                    })?;
                }
                Ok(format!("fcntl(F_SETLEASE, {} = {}) = 0 on {} file(s)", kind.c_name(), kind.arg(), fds.len()))
            }
            Action::CheckLease { is } => {
                let fd = self.fds()?[0];
                // SAFETY: fcntl on a descriptor we own.
                let v = sys(unsafe { libc::fcntl(fd, libc::F_GETLEASE) }, || format!("fcntl(fd {fd}, F_GETLEASE)"))?;
                let name = [
                    LeaseKind::Layout,
                    LeaseKind::LayoutExclusive,
                    LeaseKind::Read,
                    LeaseKind::Write,
                    LeaseKind::Unlock,
                ]
                .into_iter()
                .find(|k| k.arg() == v)
                .map(|k| k.c_name())
                .unwrap_or("?");
                if v == is.arg() {
                    Ok(format!("F_GETLEASE = {v} ({name})"))
                } else {
                    Err(StepError::other(format!(
                        "mismatch: F_GETLEASE = {v} ({name}), expected {} ({})",
                        is.arg(),
                        is.c_name()
                    )))
                }
            }
            Action::Truncate { size, via } => {
                let p = self.ctx.file(0);
                let t = Instant::now();
                match via {
                    TruncVia::Path => {
                        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                            .map_err(|e| StepError::other(e.to_string()))?;
                        // SAFETY: valid C string, plain syscall.
                        sys(unsafe { libc::truncate(c.as_ptr(), size.0 as libc::off_t) }, || {
                            format!("truncate({}, {})", p.display(), size.0)
                        })?;
                    }
                    TruncVia::Fd => {
                        let (fd, _own) = self.data_fd()?;
                        // SAFETY: plain syscall on a descriptor we hold.
                        sys(unsafe { libc::ftruncate(fd, size.0 as libc::off_t) }, || {
                            format!("ftruncate({}, {})", p.display(), size.0)
                        })?;
                    }
                }
                Ok(format!("{} to {} bytes succeeded in {} us", p.display(), size.0, t.elapsed().as_micros()))
            }
            Action::Fallocate { mode, offset, len } => {
                let p = self.ctx.file(0);
                let (fd, _own) = self.data_fd()?;
                // SAFETY: plain syscall on a descriptor we hold.
                sys(
                    unsafe { libc::fallocate(fd, mode.bits(), offset.0 as libc::off_t, len.0 as libc::off_t) },
                    || format!("fallocate({}, {mode:?}, {}, {})", p.display(), offset.0, len.0),
                )?;
                Ok(format!("fallocate({mode:?}, offset {}, len {}) = 0", offset.0, len.0))
            }
            Action::Write { offset, len } => {
                let p = self.ctx.file(0);
                let f = OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|e| io_err(e, format!("open({}, O_WRONLY)", p.display())))?;
                let buf = vec![0x5au8; len.0 as usize];
                f.write_all_at(&buf, offset.0)
                    .map_err(|e| io_err(e, format!("pwrite({}, {}, {})", p.display(), len.0, offset.0)))?;
                Ok(format!("pwrite of {} bytes at offset {} of {} succeeded", len.0, offset.0, p.display()))
            }
            Action::CloseFile => {
                if self.files.is_empty() {
                    return Err(StepError::other("close_file: no descriptor"));
                }
                let mut closed = Vec::new();
                for f in self.files.drain(..) {
                    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
                    // SAFETY: we own fd (taken from the File above) and close it once.
                    sys(unsafe { libc::close(fd) }, || format!("close({fd})"))?;
                    closed.push(fd.to_string());
                }
                Ok(format!("close({}) = 0; the mapping and the MR stay", closed.join(", ")))
            }
            Action::Unmap => {
                let n = self.regions.len();
                self.regions.clear();
                Ok(format!("{n} region(s) unmapped; the descriptor and the MR stay"))
            }
            Action::SendUverbs { to } => {
                let fd = self
                    .dev
                    .as_ref()
                    .map(|d| d.uverbs_fd())
                    .ok_or_else(|| StepError::other("send_uverbs: this process has no RDMA context"))?;
                let p = self.ctx.receiver_socket();
                let s = UnixStream::connect(&p).map_err(|e| io_err(e, format!("connect {}", p.display())))?;
                let fds = [fd];
                let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                let iov = [std::io::IoSlice::new(b"U")];
                nix::sys::socket::sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, nix::sys::socket::MsgFlags::empty(), None)
                    .map_err(|e| {
                        StepError::errno(e as i32, format!("sendmsg(SCM_RIGHTS, uverbs fd {fd}) to the {}", to.name()))
                    })?;
                Ok(format!("uverbs fd {fd} sent to the {} with SCM_RIGHTS", to.name()))
            }
            Action::RecvUverbs => {
                let l = self.rx_listener.as_ref().ok_or_else(|| StepError::other("recv_uverbs: not listening"))?;
                let (s, _) = l.accept().map_err(|e| io_err(e, "accept".into()))?;
                let mut buf = [0u8; 1];
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let mut space = nix::cmsg_space!([RawFd; 1]);
                let msg = nix::sys::socket::recvmsg::<()>(
                    s.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(|e| StepError::errno(e as i32, "recvmsg(SCM_RIGHTS)"))?;
                let mut got = None;
                for c in msg.cmsgs().map_err(|e| StepError::errno(e as i32, "cmsgs"))? {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                        got = fds.first().copied();
                    }
                }
                let fd = got.ok_or_else(|| StepError::other("recvmsg carried no fd"))?;
                // SAFETY: SCM_RIGHTS installed this fd in our table; we own it now.
                self.uverbs_rx = Some(unsafe { OwnedFd::from_raw_fd(fd) });
                let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
                Ok(format!("received fd {fd} -> {}", target.display()))
            }
            Action::CloseUverbs => {
                let fd = self.uverbs_rx.take().ok_or_else(|| StepError::other("close_uverbs: no received fd"))?;
                let n = fd.as_raw_fd();
                drop(fd);
                Ok(format!("closed the received uverbs fd {n}"))
            }
            Action::VerifyFile { len } => {
                let p = self.ctx.file(0);
                let mut f = File::open(&p).map_err(|e| io_err(e, format!("open({})", p.display())))?;
                let mut buf = vec![0u8; len.0 as usize];
                f.read_exact(&mut buf).map_err(|e| io_err(e, format!("read({}, {})", p.display(), len.0)))?;
                match buf.iter().enumerate().find(|(i, b)| **b != pattern_byte(*i as u64)) {
                    None => Ok(format!("read() of {} returns the client's {} bytes", p.display(), len.0)),
                    Some((i, b)) => Err(StepError::other(format!(
                        "mismatch: {} offset {i} holds {b:#04x}, expected {:#04x}",
                        p.display(),
                        pattern_byte(i as u64)
                    ))),
                }
            }
            Action::Fork | Action::Exit | Action::Kill { .. } | Action::FilePins { .. } | Action::Remount { .. } => {
                Err(StepError::other(format!(
                    "{} is not something the {} can do by itself",
                    action.kind(),
                    self.role.name()
                )))
            }
        }
    }
}

fn send_line<T: Serialize>(s: &mut UnixStream, v: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// Read one JSON line (`None` at EOF).
pub fn recv_line<T: for<'de> Deserialize<'de>>(r: &mut BufReader<UnixStream>) -> std::io::Result<Option<T>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line).map(Some).map_err(std::io::Error::other)
}

/// Send a request / reply line.
pub fn send<T: Serialize>(s: &mut UnixStream, v: &T) -> std::io::Result<()> {
    send_line(s, v)
}

fn connect(ctx: &Context, role: Proc) -> std::io::Result<(UnixStream, BufReader<UnixStream>)> {
    let mut s = UnixStream::connect(&ctx.ctl)?;
    send_line(&mut s, &Hello { role, pid: std::process::id() as i32 })?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

/// A worker process's main loop: serve requests until told to exit or the
/// runner goes away. Never returns.
pub fn serve(role: Proc, ctx: Context) -> ! {
    let mut w = Worker::new(role, ctx.clone());
    if role == Proc::Receiver {
        if let Err(e) = w.listen_for_fd() {
            eprintln!("pinlab worker {}: {e}", role.name());
            std::process::exit(1);
        }
    }
    let (mut s, mut r) = match connect(&ctx, role) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("pinlab worker {}: cannot reach the runner at {}: {e}", role.name(), ctx.ctl.display());
            std::process::exit(1);
        }
    };
    loop {
        let req: Request = match recv_line(&mut r) {
            Ok(Some(q)) => q,
            // The runner is gone or sent garbage: leave, the kernel cleans up.
            _ => std::process::exit(0),
        };
        match req.action {
            Action::Exit => {
                let _ = send(
                    &mut s,
                    &Reply { outcome: "ok".into(), detail: format!("pid {} exits now", std::process::id()) },
                );
                // No destructors: no dereg, no munmap, no close. The kernel does it all at exit.
                // SAFETY: _exit is async-signal-safe and ends the process at once.
                unsafe { libc::_exit(0) }
            }
            Action::Fork => {
                // SAFETY: this worker is single-threaded (no thread was spawned),
                // so the child may go on running ordinary Rust code.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    let _ = send(&mut s, &Reply::from_result(Err(StepError::last_os("fork()"))));
                } else if pid == 0 {
                    // The child: a worker of its own, with everything the parent had.
                    w.role = Proc::Child;
                    match connect(&ctx, Proc::Child) {
                        Ok((s2, r2)) => {
                            s = s2;
                            r = r2;
                        }
                        Err(e) => {
                            eprintln!("pinlab worker child: cannot reach the runner: {e}");
                            // SAFETY: as for Exit.
                            unsafe { libc::_exit(1) }
                        }
                    }
                } else {
                    let _ = send(
                        &mut s,
                        &Reply {
                            outcome: "ok".into(),
                            detail: format!("fork() = {pid}; the child shares the uverbs fd and the mappings"),
                        },
                    );
                }
            }
            other => {
                let rep = Reply::from_result(w.exec(&other));
                if send(&mut s, &rep).is_err() {
                    std::process::exit(0);
                }
            }
        }
    }
}

/// The pids of a worker's process, for the runner.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, StepError> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(StepError::last_os(format!("pidfd_open({pid})")));
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Wait until `fd` (a socket, listener or pidfd) is readable, at most `timeout`.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> Result<bool, StepError> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(StepError::last_os("poll"));
        }
        return Ok(r > 0);
    }
}
