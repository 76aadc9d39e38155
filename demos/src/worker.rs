//! The processes of a scenario and what each can do.
//!
//! The runner (the `other` process) starts a `holder` (and a `receiver` when
//! a scenario needs one) as `pinlab-runner --worker ROLE …`. Each worker
//! connects to the runner's control socket, says hello (role, pid), then
//! executes one action per request and answers with the outcome: `ok` or the
//! errno the kernel gave. A `fork` makes the holder's child a worker too.
//! Nothing is coordinated by sleeping: requests and answers go over the
//! socket, and exits are observed through pidfds.

use crate::lease;
use crate::rdma::{self, BlockCensus, Device, Mr};
use crate::region::Region;
use crate::StepError;
use nix::errno::Errno;
use nix::fcntl::FallocateFlags;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::unistd::ForkResult;
use pinlab_scenarios::plan::{
    first_pattern_mismatch, pattern_seed, Action, FallocMode, LeaseKind, Proc, Target, TruncVia,
};
use pinlab_scenarios::protocol::worker::{Hello, Reply, Request};
use pinlab_scenarios::protocol::StepOutcome;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
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

/// A worker's answer to `r`, an action's result: `ok` with its detail, or
/// the failure's outcome with its message.
pub fn reply(r: Result<String, StepError>) -> Reply {
    match r {
        Ok(detail) => Reply { outcome: StepOutcome::Ok, detail, placement: None, located: None },
        Err(e) => Reply { outcome: e.outcome(), detail: e.message, placement: None, located: None },
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
    /// The scenario's pattern seed ([`pattern_seed`]).
    pub fn seed(&self) -> u64 {
        pattern_seed(&self.scenario)
    }

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
    /// Free blocks at the previous `free_blocks` step.
    free_mark: Option<u64>,
    /// A `slow_read` in flight.
    slow: Option<crate::slowfuse::InFlight>,
}

fn io_err(e: std::io::Error, what: String) -> StepError {
    StepError::io(&e, what)
}

/// The process's RDMA context, opened on first use.
fn device(dev: &mut Option<Device>) -> Result<&Device, StepError> {
    match dev {
        Some(d) => Ok(d),
        None => Ok(dev.insert(Device::open(Some(RXE)).map_err(|e| StepError::other(format!("open {RXE}: {e:#}")))?)),
    }
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
            free_mark: None,
            slow: None,
        }
    }

    /// The descriptors of the files this process mapped (at least one).
    fn files(&self) -> Result<&[File], StepError> {
        if self.files.is_empty() {
            return Err(StepError::other(format!("the {} holds no descriptor of the file", self.role.name())));
        }
        Ok(&self.files)
    }

    /// Run `f` on a descriptor of the scenario's main file: this process's
    /// own if it has one, else a fresh `O_WRONLY` one (closed afterwards).
    fn with_data_file<T>(&self, f: impl FnOnce(&File) -> Result<T, StepError>) -> Result<T, StepError> {
        if let Some(mine) = self.files.first() {
            return f(mine);
        }
        let p = self.ctx.file(0);
        let fresh = OpenOptions::new().write(true).open(&p).map_err(|e| io_err(e, format!("open({})", p.display())))?;
        f(&fresh)
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
    /// of the other processes and are handled there; `Fork` and `Exit` by
    /// the worker's main loop ([`serve`]).
    pub fn exec(&mut self, action: &Action) -> Result<String, StepError> {
        match action {
            Action::Map { target, size, files } => self.map(*target, size.0 as usize, *files as usize),
            Action::RegMr => self.reg_mr(None, false),
            Action::RegMrReadOnly => self.reg_mr(None, true),
            Action::RegMrRange { offset, len } => self.reg_mr(Some((offset.0 as usize, len.0 as usize)), false),
            Action::RdmaWrite => self.rdma_write(),
            Action::RdmaRead => self.rdma_read(),
            Action::Verify => self.verify(),
            Action::DeregMr => self.dereg_mr(),
            Action::Lease { kind, read_only: false, uid: None } => self.lease(*kind),
            Action::Lease { kind, read_only: _, uid } => {
                crate::lease::try_lease_read_only(&self.ctx.file(0), *kind, *uid)
            }
            Action::CheckLease { is } => self.check_lease(*is),
            Action::Truncate { size, via } => self.truncate(size.0, *via),
            Action::Fallocate { mode, offset, len } => self.fallocate(*mode, offset.0, len.0),
            Action::Clone { kind, from, to } => {
                let path = |n: &str| if n == "SELF" { self.ctx.file(0) } else { Path::new(PMEM_MNT).join(n) };
                crate::oracle::clone(*kind, &path(from), &path(to))
            }
            Action::DaxFlag { on } => crate::oracle::dax_flag(Path::new(PMEM_MNT), *on),
            Action::ExchangeRange { with } => {
                crate::oracle::exchange_range(&self.ctx.file(0), &Path::new(PMEM_MNT).join(with))
            }
            Action::Unlink => {
                let p = self.ctx.file(0);
                std::fs::remove_file(&p).map_err(|e| io_err(e, format!("unlink({})", p.display())))?;
                Ok(format!("unlink({}) = 0", p.display()))
            }
            Action::FreeBlocks { at_least, below } => self.free_blocks(*at_least, *below),
            Action::CheckLocks { expect } => crate::oracle::check_locks(&self.ctx.file(0), expect),
            Action::SwapExt { with } => crate::oracle::swapext(&self.ctx.file(0), &Path::new(PMEM_MNT).join(with)),
            Action::MoveExt { orig } => crate::oracle::move_ext(&self.ctx.file(0), &Path::new(PMEM_MNT).join(orig)),
            Action::SwapBoot => crate::oracle::swap_boot(&self.ctx.file(0)),
            Action::CatchSigio => catch_sigio(),
            Action::SlowRead { offset, len, delay_ms } => self.slow_read(offset.0 as usize, len.0 as usize, *delay_ms),
            Action::SlowReadWait => {
                self.slow.take().ok_or_else(|| StepError::other("slow_read_wait without a slow_read"))?.wait()
            }
            Action::RaceRegTruncate { seconds, hold_ms, max_ms } => {
                device(&mut self.dev)?;
                let (region, file) = self.last_file_region()?;
                let dev = self.dev.as_ref().ok_or_else(|| StepError::other("no device"))?;
                crate::race::reg_truncate(dev, region, file, *seconds, *hold_ms, *max_ms)
            }
            Action::RaceLeaseClose { seconds } => {
                device(&mut self.dev)?;
                let (region, _) = self.last_file_region()?;
                let path = region.path().map(Path::to_path_buf).unwrap_or_else(|| self.ctx.file(0));
                let dev = self.dev.as_ref().ok_or_else(|| StepError::other("no device"))?;
                crate::race::lease_close(dev, region, &path, *seconds)
            }
            Action::Write { offset, len } => self.write(offset.0, len.0),
            Action::CloseFile => self.close_file(),
            Action::Unmap => self.unmap(),
            Action::SendUverbs { to } => self.send_uverbs(*to),
            Action::RecvUverbs => self.recv_uverbs(),
            Action::CloseUverbs => self.close_uverbs(),
            Action::VerifyFile { len } => self.verify_file(len.0),
            Action::Fill => crate::oracle::fill(Path::new(PMEM_MNT)),
            Action::CreateFile { name, size, all, byte } => {
                crate::oracle::create_file(Path::new(PMEM_MNT), name, (!*all).then_some(size.0 as usize), *byte)
            }
            Action::CheckFile { name, byte } => {
                crate::oracle::check_file(Path::new(PMEM_MNT), name, *byte, self.ctx.seed())
            }
            Action::Fork
            | Action::Exit
            | Action::Kill { .. }
            | Action::FilePins { .. }
            | Action::Remount { .. }
            | Action::Sysctl { .. }
            | Action::Await
            | Action::Locate { .. } => Err(StepError::other(format!(
                "{} is not something the {} can do by itself",
                action.kind(),
                self.role.name()
            ))),
        }
    }

    /// The last mapped region, which must be one file's mapping, and this
    /// process's descriptor of that file.
    fn last_file_region(&self) -> Result<(&Region, &File), StepError> {
        let r = self.regions.last().ok_or_else(|| StepError::other("a race needs a mapped file (map first)"))?;
        if r.kind() != crate::region::RegionKind::File {
            return Err(StepError::other("a race needs the last mapped region to be one file's mapping"));
        }
        let f = self.files.last().ok_or_else(|| StepError::other("a race needs the mapped file's descriptor"))?;
        Ok((r, f))
    }

    /// `slow_read`: see [`Action::SlowRead`].
    fn slow_read(&mut self, offset: usize, len: usize, delay_ms: u32) -> Result<String, StepError> {
        if self.slow.is_some() {
            return Err(StepError::other("a slow_read is already in flight"));
        }
        let r = self.regions.last().ok_or_else(|| StepError::other("slow_read before map"))?;
        if offset.checked_add(len).is_none_or(|end| end > r.len()) {
            return Err(StepError::other(format!("slow_read {offset}+{len} is outside the {}-byte region", r.len())));
        }
        let addr = r.as_mut_ptr() as usize + offset;
        let (inflight, said) = crate::slowfuse::start_read(addr, len, Duration::from_millis(delay_ms.into()))?;
        self.slow = Some(inflight);
        Ok(said)
    }

    /// `map`: a fresh region of `len` bytes (`files` files of `len` bytes
    /// each for [`Target::File`]).
    fn map(&mut self, target: Target, len: usize, files: usize) -> Result<String, StepError> {
        let names = self.next_file..self.next_file + files;
        let mut r = match target {
            Target::Anon => Region::anon(len)?,
            Target::File if files <= 1 => {
                let p = self.ctx.file(self.next_file);
                let _ = std::fs::remove_file(&p);
                Region::file(&p, len)?
            }
            Target::File => {
                let paths: Vec<PathBuf> = names.clone().map(|i| self.ctx.file(i)).collect();
                for p in &paths {
                    let _ = std::fs::remove_file(p);
                }
                Region::files(&paths, len)?
            }
            Target::Devdax => Region::devdax(Path::new(&self.ctx.devdax), len)?,
            Target::Shm => Region::shm(len)?,
        };
        let dax = r.is_dax()?;
        let what = match (target, dax) {
            (Target::File, Some(d)) => format!(
                "{}, {len} bytes each, MAP_SHARED at {:p}, STATX_ATTR_DAX={}",
                names.map(|i| self.ctx.file(i).display().to_string()).collect::<Vec<_>>().join(" + "),
                r.as_mut_ptr(),
                d as u8
            ),
            (Target::Devdax, _) => format!("{} MAP_SHARED, {len} bytes at {:p}", self.ctx.devdax, r.as_mut_ptr()),
            (Target::Shm, _) => format!("memfd (shmem) MAP_SHARED, {len} bytes at {:p}", r.as_mut_ptr()),
            _ => format!("anonymous MAP_SHARED, {len} bytes at {:p}", r.as_mut_ptr()),
        };
        if target == Target::File {
            self.next_file += files;
        }
        self.files.extend(r.take_files());
        self.regions.push(r);
        Ok(what)
    }

    /// `reg_mr` on the last mapped region: all of it, or `(offset, len)` of
    /// it; remote read access only when `read_only`.
    fn reg_mr(&mut self, part: Option<(usize, usize)>, read_only: bool) -> Result<String, StepError> {
        let r = self.regions.last().ok_or_else(|| StepError::other("reg_mr before map"))?;
        let (off, len) = part.unwrap_or((0, r.len()));
        let Some(end) = off.checked_add(len).filter(|&end| end <= r.len()) else {
            return Err(StepError::other(format!("reg_mr range {off}+{len} is outside the {}-byte region", r.len())));
        };
        let mr = device(&mut self.dev)?.reg_mr_with(r, off..end, read_only)?;
        let d = format!(
            "MR #{}: lkey={:#x} rkey={:#x}, {len} bytes at {:p}",
            self.mrs.len() + 1,
            mr.lkey(),
            mr.rkey(),
            mr.addr()
        );
        self.mrs.push(mr);
        Ok(d)
    }

    /// `rdma_write`: an `rdma-client` writes the pattern into the last MR.
    fn rdma_write(&mut self) -> Result<String, StepError> {
        let mr = self.mrs.last().ok_or_else(|| StepError::other("rdma_write before reg_mr"))?;
        let dev = self.dev.as_ref().ok_or_else(|| StepError::other("no device"))?;
        let (pid, report) = rdma::write_from_client(dev, mr, CLIENT, ADDR, Duration::from_secs(30), self.ctx.seed())?;
        self.written = Some(mr.len());
        Ok(format!(
            "rdma-client (pid {pid}) RDMA-WROTE {} bytes into MR rkey={:#x}: {}",
            mr.len(),
            mr.rkey(),
            serde_json::to_string(&report).unwrap_or_default()
        ))
    }

    /// `rdma_read`: an `rdma-client --read` reads the last MR back; `ok` if
    /// every block is the scenario's pattern (what the MR's memory held
    /// after `rdma_write`), `mismatch` with what came back instead.
    fn rdma_read(&mut self) -> Result<String, StepError> {
        let mr = self.mrs.last().ok_or_else(|| StepError::other("rdma_read before reg_mr"))?;
        let dev = self.dev.as_ref().ok_or_else(|| StepError::other("no device"))?;
        let (pid, report) = rdma::read_from_client(dev, mr, CLIENT, ADDR, Duration::from_secs(30), self.ctx.seed())?;
        let census = report.read.clone().unwrap_or_default();
        // Whose bytes the pattern is: the file(s) the MR was registered on, or memory.
        let own = self
            .regions
            .iter()
            .find(|r| r.bytes_at(mr.addr(), mr.len()).is_some())
            .and_then(|r| r.path())
            .and_then(|p| p.file_name())
            .map(|n| format!("{}'s own bytes", n.to_string_lossy()))
            .unwrap_or_else(|| "the region's own bytes".into());
        let json = serde_json::to_string(&report).unwrap_or_default();
        let head =
            format!("the RDMA READ through MR rkey={:#x} (rdma-client pid {pid}, {} bytes)", mr.rkey(), report.bytes);
        if census.all_pattern() && census.blocks > 0 {
            return Ok(format!(
                "{head} returned all {} blocks as {own} (the pattern the client wrote); report: {json}",
                census.blocks
            ));
        }
        let what = read_text(&census, &own, Path::new(PMEM_MNT));
        Err(StepError::mismatch(format!("mismatch: {head} returned {what}; report: {json}")))
    }

    /// `verify`: the last MR's bytes, read through this process's mapping,
    /// are the client's pattern.
    fn verify(&self) -> Result<String, StepError> {
        let mr = self.mrs.last().ok_or_else(|| StepError::other("verify without an MR"))?;
        if self.written.is_none() {
            return Err(StepError::other("verify before rdma_write"));
        }
        let bytes = self
            .regions
            .iter()
            .find_map(|r| r.bytes_at(mr.addr(), mr.len()))
            .ok_or_else(|| StepError::other("verify: the MR's memory is no longer mapped in this process"))?;
        match crate::rdma::first_pattern_mismatch(self.ctx.seed(), bytes) {
            None => Ok(format!("all {} bytes in the MR match the client's pattern", bytes.len())),
            Some((i, got, want)) => {
                Err(StepError::mismatch(format!("mismatch at offset {i}: found {got:#04x}, expected {want:#04x}")))
            }
        }
    }

    /// `dereg_mr`: every MR this process holds.
    fn dereg_mr(&mut self) -> Result<String, StepError> {
        if self.mrs.is_empty() {
            return Err(StepError::other("dereg_mr without an MR"));
        }
        let n = self.mrs.len();
        for mr in self.mrs.drain(..) {
            mr.dereg()?;
        }
        Ok(format!("{n} MR(s) deregistered; their pages unpinned"))
    }

    /// `lease`: `F_SETLEASE` on every file this process mapped.
    fn lease(&self, kind: LeaseKind) -> Result<String, StepError> {
        let files = self.files()?;
        for f in files {
            lease::set_lease(f, kind)?;
        }
        Ok(format!("fcntl(F_SETLEASE, {} = {}) = 0 on {} file(s)", kind.c_name(), kind.arg(), files.len()))
    }

    /// `check_lease`: `F_GETLEASE` on the first file says `is`.
    fn check_lease(&self, is: LeaseKind) -> Result<String, StepError> {
        let v = lease::get_lease(&self.files()?[0])?;
        let name = lease::kind_of(v).map(|k| k.c_name()).unwrap_or("?");
        if v == is.arg() {
            Ok(format!("F_GETLEASE = {v} ({name})"))
        } else {
            Err(StepError::mismatch(format!(
                "mismatch: F_GETLEASE = {v} ({name}), expected {} ({})",
                is.arg(),
                is.c_name()
            )))
        }
    }

    /// `truncate`: the scenario's file to `size`, by path or descriptor.
    fn truncate(&self, size: u64, via: TruncVia) -> Result<String, StepError> {
        let p = self.ctx.file(0);
        let t = Instant::now();
        match via {
            TruncVia::Path => nix::unistd::truncate(&p, size as libc::off_t)
                .map_err(|e| StepError::sys(e, format!("truncate({}, {size})", p.display())))?,
            TruncVia::Fd => self.with_data_file(|f| {
                nix::unistd::ftruncate(f, size as libc::off_t)
                    .map_err(|e| StepError::sys(e, format!("ftruncate({}, {size})", p.display())))
            })?,
        }
        Ok(format!("{} to {size} bytes succeeded in {} us", p.display(), t.elapsed().as_micros()))
    }

    /// `fallocate` on the scenario's file.
    fn fallocate(&self, mode: FallocMode, offset: u64, len: u64) -> Result<String, StepError> {
        let p = self.ctx.file(0);
        self.with_data_file(|f| {
            let flags = FallocateFlags::from_bits_retain(mode.bits());
            nix::fcntl::fallocate(f, flags, offset as libc::off_t, len as libc::off_t)
                .map_err(|e| StepError::sys(e, format!("fallocate({}, {mode:?}, {offset}, {len})", p.display())))
        })?;
        Ok(format!("fallocate({mode:?}, offset {offset}, len {len}) = 0"))
    }

    /// `write`: `pwrite` through a fresh descriptor.
    fn write(&self, offset: u64, len: u64) -> Result<String, StepError> {
        let p = self.ctx.file(0);
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| io_err(e, format!("open({}, O_WRONLY)", p.display())))?;
        let buf = vec![0x5au8; len as usize];
        f.write_all_at(&buf, offset).map_err(|e| io_err(e, format!("pwrite({}, {len}, {offset})", p.display())))?;
        Ok(format!("pwrite of {len} bytes at offset {offset} of {} succeeded", p.display()))
    }

    /// `close_file`: `close()` every descriptor of the files; the mappings stay.
    fn close_file(&mut self) -> Result<String, StepError> {
        if self.files.is_empty() {
            return Err(StepError::other("close_file: no descriptor"));
        }
        let mut closed = Vec::new();
        for f in self.files.drain(..) {
            let fd = f.as_raw_fd();
            nix::unistd::close(f).map_err(|e| StepError::sys(e, format!("close({fd})")))?;
            closed.push(fd.to_string());
        }
        Ok(format!("close({}) = 0; the mapping and the MR stay", closed.join(", ")))
    }

    /// `unmap`: `munmap()` every region; descriptors and MRs stay.
    fn unmap(&mut self) -> Result<String, StepError> {
        let n = self.regions.len();
        self.regions.clear();
        Ok(format!("{n} region(s) unmapped; the descriptor and the MR stay"))
    }

    /// `send_uverbs`: the RDMA context's fd to `to`, with SCM_RIGHTS.
    fn send_uverbs(&self, to: Proc) -> Result<String, StepError> {
        let fd = self
            .dev
            .as_ref()
            .map(|d| d.uverbs_fd())
            .ok_or_else(|| StepError::other("send_uverbs: this process has no RDMA context"))?;
        let p = self.ctx.receiver_socket();
        let s = UnixStream::connect(&p).map_err(|e| io_err(e, format!("connect {}", p.display())))?;
        let fds = [fd];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(b"U")];
        sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(|e| {
            StepError::errno(e as i32, format!("sendmsg(SCM_RIGHTS, uverbs fd {fd}) to the {}", to.name()))
        })?;
        Ok(format!("uverbs fd {fd} sent to the {} with SCM_RIGHTS", to.name()))
    }

    /// `recv_uverbs`: accept one SCM_RIGHTS hand-over and keep the fd.
    fn recv_uverbs(&mut self) -> Result<String, StepError> {
        let l = self.rx_listener.as_ref().ok_or_else(|| StepError::other("recv_uverbs: not listening"))?;
        let (s, _) = l.accept().map_err(|e| io_err(e, "accept".into()))?;
        let mut buf = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
            .map_err(|e| StepError::errno(e as i32, "recvmsg(SCM_RIGHTS)"))?;
        let mut got = None;
        for c in msg.cmsgs().map_err(|e| StepError::errno(e as i32, "cmsgs"))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                got = fds.first().copied();
            }
        }
        let fd = got.ok_or_else(|| StepError::other("recvmsg carried no fd"))?;
        // SAFETY: SCM_RIGHTS installed this fd in our table and nothing else
        // refers to it; we take sole ownership here.
        self.uverbs_rx = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
        Ok(format!("received fd {fd} -> {}", target.display()))
    }

    /// `close_uverbs`: close the received fd.
    fn close_uverbs(&mut self) -> Result<String, StepError> {
        let fd = self.uverbs_rx.take().ok_or_else(|| StepError::other("close_uverbs: no received fd"))?;
        let n = fd.as_raw_fd();
        drop(fd);
        Ok(format!("closed the received uverbs fd {n}"))
    }

    /// `free_blocks`: 4 KiB blocks freed on the mount since the previous call.
    fn free_blocks(&mut self, at_least: Option<u64>, below: Option<u64>) -> Result<String, StepError> {
        let free = || -> Result<u64, StepError> {
            nix::unistd::sync();
            let st =
                nix::sys::statvfs::statvfs(PMEM_MNT).map_err(|e| StepError::sys(e, format!("statvfs({PMEM_MNT})")))?;
            Ok(st.blocks_free() as u64 * st.fragment_size() as u64 / 4096)
        };
        let t = Instant::now();
        let mut now = free()?;
        let Some(mark) = self.free_mark else {
            self.free_mark = Some(now);
            return Ok(format!("{now} blocks of 4 KiB free on {PMEM_MNT} (the mark for the next free_blocks)"));
        };
        let freed = |now: u64| now.saturating_sub(mark);
        while at_least.is_some_and(|n| freed(now) < n) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            now = free()?;
        }
        self.free_mark = Some(now);
        let said = format!("{} blocks of 4 KiB freed since the mark ({mark} -> {now} free)", freed(now));
        let low = at_least.filter(|&n| freed(now) < n).map(|n| format!("expected at least {n}"));
        let high = below.filter(|&n| freed(now) >= n).map(|n| format!("expected fewer than {n}"));
        match low.or(high) {
            None => Ok(said),
            Some(want) => Err(StepError::mismatch(format!("mismatch: {said}, {want}"))),
        }
    }

    /// `verify_file`: `read()` of the scenario's file returns the client's
    /// pattern over the first `len` bytes.
    fn verify_file(&self, len: u64) -> Result<String, StepError> {
        let p = self.ctx.file(0);
        let mut f = File::open(&p).map_err(|e| io_err(e, format!("open({})", p.display())))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).map_err(|e| io_err(e, format!("read({}, {len})", p.display())))?;
        match first_pattern_mismatch(self.ctx.seed(), &buf) {
            None => Ok(format!("read() of {} returns the client's {len} bytes", p.display())),
            Some((i, b, want)) => Err(StepError::mismatch(format!(
                "mismatch: {} offset {i} holds {b:#04x}, expected {want:#04x}",
                p.display()
            ))),
        }
    }
}

/// What an RDMA READ returned, for a learner: "512 of 512 blocks of 0x53,
/// the byte victim.dat was written with: another file's data, 0 blocks of
/// S21.dat's own bytes, 0 other". A byte value is
/// named after the file on `mount` whose first block is nothing but it
/// (the hazard scenarios' victims are written that way).
pub fn read_text(c: &BlockCensus, own: &str, mount: &Path) -> String {
    let files = uniform_files(mount);
    let mut uniform = c.uniform.clone();
    uniform.sort_by_key(|u| (std::cmp::Reverse(u.blocks), u.byte));
    let mut parts: Vec<String> = uniform
        .iter()
        .map(|u| {
            let whose = match (u.byte, files.iter().find(|(_, b)| *b == u.byte)) {
                (_, Some((name, _))) => format!(", the byte {name} was written with: another file's data"),
                (rdma::READ_FILL, None) => ": the client's own fill byte, the READ delivered nothing there".into(),
                (0, None) => ": zeroes".into(),
                _ => String::new(),
            };
            format!("{} of {} blocks of {:#04x}{whose}", u.blocks, c.blocks, u.byte)
        })
        .collect();
    parts.push(format!("{} blocks of {own}", c.pattern));
    parts.push(format!("{} other", c.other));
    // Where the file's own bytes stop, when some came back at all.
    let first = c.first_not_pattern.filter(|_| c.pattern > 0).map(|b| format!(" (the first at block {b})"));
    format!("{}{}", parts.join(", "), first.unwrap_or_default())
}

/// Regular files directly on `mount` whose first 4 KiB are one byte value
/// throughout, with that byte (at most 64 files looked at).
fn uniform_files(mount: &Path) -> Vec<(String, u8)> {
    let Ok(rd) = std::fs::read_dir(mount) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten().take(64) {
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        let Ok(mut f) = File::open(e.path()) else { continue };
        if f.read_exact(&mut buf).is_ok() && buf.iter().all(|&b| b == buf[0]) {
            out.push((e.file_name().to_string_lossy().into_owned(), buf[0]));
        }
    }
    out.sort();
    out
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
                    &Reply {
                        outcome: StepOutcome::Ok,
                        detail: format!("pid {} exits now", std::process::id()),
                        placement: None,
                        located: None,
                    },
                );
                // No destructors: no dereg, no munmap, no close. The kernel does it all at exit.
                // SAFETY: _exit is async-signal-safe and ends the process at once; skipping
                // Rust destructors is the point (nix has no _exit).
                unsafe { libc::_exit(0) }
            }
            // SAFETY: this worker is single-threaded (no thread was spawned),
            // so the child may go on running ordinary Rust code.
            Action::Fork => match unsafe { nix::unistd::fork() } {
                Err(e) => {
                    let _ = send(&mut s, &reply(Err(StepError::sys(e, "fork()"))));
                }
                Ok(ForkResult::Child) => {
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
                }
                Ok(ForkResult::Parent { child }) => {
                    let _ = send(
                        &mut s,
                        &Reply {
                            outcome: StepOutcome::Ok,
                            detail: format!("fork() = {child}; the child shares the uverbs fd and the mappings"),
                            placement: None,
                            located: None,
                        },
                    );
                }
            },
            other => {
                let rep = reply(w.exec(&other));
                if send(&mut s, &rep).is_err() {
                    std::process::exit(0);
                }
            }
        }
    }
}

/// A pidfd for `pid` (a worker's process), for the runner to wait on.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, StepError> {
    // SAFETY: pidfd_open(2) takes two integers and touches no memory of ours
    // (nix has no wrapper for it); the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(StepError::last_os(format!("pidfd_open({pid})")));
    }
    let fd = RawFd::try_from(fd).map_err(|_| StepError::other(format!("pidfd_open({pid}) returned {fd}")))?;
    // SAFETY: the kernel just installed this fd for us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wait until `fd` (a socket, listener or pidfd) is readable, at most `timeout`.
pub fn wait_readable(fd: impl AsFd, timeout: Duration) -> Result<bool, StepError> {
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut p, ms) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(StepError::sys(e, "poll")),
            Ok(n) => return Ok(n > 0),
        }
    }
}

/// How many `SIGIO`s this process caught (see [`catch_sigio`]).
static SIGIO_CAUGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn on_sigio(_: libc::c_int) {
    SIGIO_CAUGHT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// `catch_sigio`: a `SIGIO` handler without `SA_RESTART`.
fn catch_sigio() -> Result<String, StepError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(SigHandler::Handler(on_sigio), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only increments an atomic counter, which is
    // async-signal-safe.
    unsafe { sigaction(Signal::SIGIO, &act) }.map_err(|e| StepError::sys(e, "sigaction(SIGIO)"))?;
    Ok(format!(
        "SIGIO handler installed (no SA_RESTART); {} caught so far",
        SIGIO_CAUGHT.load(std::sync::atomic::Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinlab_scenarios::plan::{Bytes, Size};

    fn worker() -> Worker {
        let ctx = Context {
            scenario: "T01".into(),
            devdax: "/dev/dax-pinlab-none".into(),
            ctl: std::env::temp_dir().join("pinlab-worker-test.sock"),
        };
        Worker::new(Proc::Other, ctx)
    }

    #[test]
    fn replies_carry_the_typed_outcome_and_the_message() {
        let ok = reply(Ok("done".into()));
        assert_eq!((ok.outcome, ok.detail.as_str()), (StepOutcome::Ok, "done"));
        let m = reply(Err(StepError::mismatch("mismatch at offset 3: found 0x00, expected 0xa5")));
        assert_eq!(m.outcome, StepOutcome::Mismatch);
        assert_eq!(m.detail, "mismatch at offset 3: found 0x00, expected 0xa5");
        assert_eq!(reply(Err(StepError::errno(26, "t"))).outcome, StepOutcome::Errno("ETXTBSY".into()));
        assert_eq!(reply(Err(StepError::other("mismatch-looking text"))).outcome, StepOutcome::Error);
        assert_eq!(reply(Err(StepError::blocked("late"))).outcome, StepOutcome::Blocked);
    }

    #[test]
    fn actions_check_their_preconditions_before_any_call() {
        let mut w = worker();
        let e = w.exec(&Action::RegMr).unwrap_err();
        assert_eq!((e.outcome(), e.message.as_str()), (StepOutcome::Error, "reg_mr before map"));
        let d = w.exec(&Action::Map { target: Target::Anon, size: Size(8192), files: 1 }).unwrap();
        assert!(d.starts_with("anonymous MAP_SHARED, 8192 bytes at 0x"), "{d}");
        // Outside the region: refused before the RDMA device is even opened.
        let e = w.exec(&Action::RegMrRange { offset: Bytes(4096), len: Size(8192) }).unwrap_err();
        assert_eq!(e.message, "reg_mr range 4096+8192 is outside the 8192-byte region");
        let e = w.exec(&Action::Lease { kind: LeaseKind::Read, read_only: false, uid: None }).unwrap_err();
        assert_eq!(e.message, "the other holds no descriptor of the file");
        assert_eq!(w.exec(&Action::Verify).unwrap_err().message, "verify without an MR");
        assert_eq!(w.exec(&Action::DeregMr).unwrap_err().message, "dereg_mr without an MR");
        assert_eq!(w.exec(&Action::CloseFile).unwrap_err().message, "close_file: no descriptor");
        let e = w.exec(&Action::Kill { who: Proc::Holder }).unwrap_err();
        assert_eq!(e.message, "kill is not something the other can do by itself");
        assert_eq!(w.exec(&Action::Unmap).unwrap(), "1 region(s) unmapped; the descriptor and the MR stay");
        let e = w.exec(&Action::Map { target: Target::Devdax, size: Size(4096), files: 1 }).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::EINVAL));
    }

    #[test]
    fn read_text_names_the_file_a_byte_came_from() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("victim.dat"), vec![0x53u8; 2 * 4096]).unwrap();
        std::fs::write(d.path().join("S21.dat"), b"").unwrap();
        let seed = pinlab_scenarios::plan::pattern_seed("S21");
        let mut buf = vec![0x53u8; 512 * 4096];
        let c = BlockCensus::of(seed, &buf);
        assert_eq!(
            read_text(&c, "S21.dat's own bytes", d.path()),
            "512 of 512 blocks of 0x53, the byte victim.dat was written with: another file's data, 0 blocks of \
             S21.dat's own bytes, 0 other"
        );
        pinlab_scenarios::plan::fill_pattern(seed, 0, &mut buf[..4096 * 500]);
        buf[4096 * 510..].fill(rdma::READ_FILL);
        buf[4096 * 505] = 1;
        let t = read_text(&BlockCensus::of(seed, &buf), "S21.dat's own bytes", d.path());
        assert_eq!(
            t,
            "9 of 512 blocks of 0x53, the byte victim.dat was written with: another file's \
             data, 2 of 512 blocks of 0xee: the client's own fill byte, the READ delivered nothing there, 500 blocks \
             of S21.dat's own bytes, 1 other (the first at block 500)"
        );
    }

    #[test]
    fn wait_readable_sees_data_and_times_out() {
        let (mut a, b) = UnixStream::pair().unwrap();
        assert!(!wait_readable(&b, Duration::ZERO).unwrap());
        a.write_all(b"x").unwrap();
        assert!(wait_readable(&b, Duration::from_secs(5)).unwrap());
        let me = pidfd_open(std::process::id() as i32).unwrap();
        assert!(!wait_readable(&me, Duration::from_millis(10)).unwrap());
    }

    #[test]
    fn protocol_lines_round_trip() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut r = BufReader::new(b);
        send(&mut a, &Request { action: Action::Truncate { size: Bytes(0), via: TruncVia::Fd } }).unwrap();
        send(&mut a, &reply(Err(StepError::errno(26, "ftruncate(/mnt/pmem/S06.dat, 0)")))).unwrap();
        drop(a);
        let q: Request = recv_line(&mut r).unwrap().unwrap();
        assert_eq!(q.action, Action::Truncate { size: Bytes(0), via: TruncVia::Fd });
        let p: Reply = recv_line(&mut r).unwrap().unwrap();
        assert_eq!(p.outcome, StepOutcome::Errno("ETXTBSY".into()));
        assert!(recv_line::<Reply>(&mut r).unwrap().is_none());
    }
}
