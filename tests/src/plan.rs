//! What the host asks one guest boot to do: the scenarios' steps, without
//! their expectations. Written by xtask as `plan.json` on the run share, read
//! by `pinlab-runner` in the guest.

use crate::{Flavor, Fs};
use serde::{de, Deserialize, Deserializer, Serialize};

/// One boot's work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The kernel flavor being booted (for the record; the guest does not branch on it).
    pub flavor: Flavor,
    /// The filesystem to make on the fsdax namespace and mount with `-o dax`.
    pub fs: Fs,
    /// Scenarios to run, in order.
    pub scenarios: Vec<PlannedScenario>,
    /// Host paths of kselftest binaries (the series' uapi tests); the host
    /// copies them to `selftests/` on the share and the runner runs them
    /// after setup, before the scenarios.
    #[serde(default)]
    pub selftests: Vec<String>,
    /// `cargo xtask bench`: measure instead of (or after) the scenarios.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bench: Option<crate::bench::BenchPlan>,
}

/// A scenario as the guest sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedScenario {
    /// Stable id, `S01`…`S18`.
    pub id: String,
    /// One-line title.
    pub title: String,
    /// Steps, run in order by one holder process unless a step says otherwise.
    pub steps: Vec<PlannedStep>,
}

/// One step of a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedStep {
    /// What the step does, in words, for the report.
    pub name: String,
    /// What the runner does.
    pub action: Action,
    /// Which process does it.
    #[serde(default)]
    pub by: Proc,
    /// A probe observes an outcome (often an error) and the scenario goes on
    /// whatever it is; any other step that fails ends the scenario ("stops at").
    #[serde(default)]
    pub probe: bool,
    /// The call may sleep in the kernel (a truncate over pages a device
    /// pins): the runner makes it on a thread of its own and, if it has not
    /// returned after [`BLOCK_CHECK_MS`], records `blocked` with the kernel
    /// function it sleeps in and goes on; a later `await` step takes its end.
    #[serde(default)]
    pub may_block: bool,
}

/// How long a `may_block` call may take before it counts as blocked.
pub const BLOCK_CHECK_MS: u64 = 2000;

/// The processes of a scenario. Each is a real process in the guest; they
/// are coordinated over a control socket and pidfds, never by sleeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proc {
    /// The RDMA server: maps, leases, registers. Started for every scenario.
    #[default]
    Holder,
    /// The holder's child after a `fork` step.
    Child,
    /// A separate process that receives the uverbs fd by SCM_RIGHTS.
    Receiver,
    /// Someone else: the runner itself (truncates, writes, reads /proc, kills).
    Other,
}

impl Proc {
    /// The name used in specs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Proc::Holder => "holder",
            Proc::Child => "child",
            Proc::Receiver => "receiver",
            Proc::Other => "other",
        }
    }
}

/// A lease type for `F_SETLEASE` / `F_GETLEASE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    /// `F_LAYOUT` (16): a breakable layout lease (the series' uapi).
    Layout,
    /// `F_LAYOUT | F_EXCLUSIVE` (48): an unbreakable layout lease.
    LayoutExclusive,
    /// `F_RDLCK`.
    Read,
    /// `F_WRLCK`.
    Write,
    /// `F_UNLCK`: release (for `check_lease`: no lease).
    Unlock,
}

impl LeaseKind {
    /// The fcntl argument.
    pub fn arg(self) -> i32 {
        match self {
            LeaseKind::Layout => F_LAYOUT,
            LeaseKind::LayoutExclusive => F_LAYOUT | F_EXCLUSIVE,
            LeaseKind::Read => 0,
            LeaseKind::Write => 1,
            LeaseKind::Unlock => 2,
        }
    }

    /// The spelling in C.
    pub fn c_name(self) -> &'static str {
        match self {
            LeaseKind::Layout => "F_LAYOUT",
            LeaseKind::LayoutExclusive => "F_LAYOUT|F_EXCLUSIVE",
            LeaseKind::Read => "F_RDLCK",
            LeaseKind::Write => "F_WRLCK",
            LeaseKind::Unlock => "F_UNLCK",
        }
    }
}

/// How long the guest runner waits for one step before it records a
/// timeout and goes on; the host's no-progress watchdog is longer.
pub const STEP_DEADLINE_S: u64 = 60;

/// The series' uapi value for a layout lease (`include/uapi/asm-generic/fcntl.h`).
pub const F_LAYOUT: i32 = 16;
/// The series' uapi flag making a layout lease exclusive (unbreakable).
pub const F_EXCLUSIVE: i32 = 32;

/// `fallocate(2)` modes the scenarios use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallocMode {
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`.
    PunchHole,
    /// `FALLOC_FL_COLLAPSE_RANGE`.
    CollapseRange,
    /// `FALLOC_FL_INSERT_RANGE`.
    InsertRange,
    /// `FALLOC_FL_ZERO_RANGE`.
    ZeroRange,
    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`.
    ZeroRangeKeepSize,
    /// `FALLOC_FL_UNSHARE_RANGE`.
    UnshareRange,
    /// Mode 0: allocate (and extend the size).
    Allocate,
    /// `FALLOC_FL_KEEP_SIZE`: preallocate without changing the size.
    KeepSize,
}

impl FallocMode {
    /// The mode bits.
    pub fn bits(self) -> i32 {
        match self {
            FallocMode::PunchHole => 0x02 | 0x01,
            FallocMode::CollapseRange => 0x08,
            FallocMode::InsertRange => 0x20,
            FallocMode::ZeroRange => 0x10,
            FallocMode::ZeroRangeKeepSize => 0x10 | 0x01,
            FallocMode::UnshareRange => 0x40,
            FallocMode::Allocate => 0,
            FallocMode::KeepSize => 0x01,
        }
    }
}

/// How `clone` shares blocks between two files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneKind {
    /// `ioctl(to, FICLONE, from)`: the whole file.
    Ficlone,
    /// `ioctl(to, FICLONERANGE, {from, 0, 2 MiB, 0})`.
    Ficlonerange,
    /// `ioctl(from, FIDEDUPERANGE, {0, 2 MiB, to, 0})`: the kernel's answer
    /// is the per-destination status (an errno, or "the data differs").
    Dedupe,
}

impl CloneKind {
    /// The ioctl's name.
    pub fn name(self) -> &'static str {
        match self {
            CloneKind::Ficlone => "FICLONE",
            CloneKind::Ficlonerange => "FICLONERANGE",
            CloneKind::Dedupe => "FIDEDUPERANGE",
        }
    }
}

/// How a truncation reaches the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncVia {
    /// `truncate(path, size)`.
    #[default]
    Path,
    /// `ftruncate(fd, size)` on the process's own descriptor (opened if it has none).
    Fd,
}

/// The things a runner can do. Each records `ok` or the errno it got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Map a fresh region of `size` bytes shared and writable: anonymous
    /// memory, a new file on the filesystem under test (whatever its mount's
    /// DAX mode), or the device-DAX character device.
    Map {
        /// What backs the mapping.
        target: Target,
        /// Length in bytes; `2M`, `1G` and plain numbers are accepted. Default 2 MiB.
        #[serde(default)]
        size: Size,
        /// For `file`: map this many fresh files, `size` each, back to back in
        /// one contiguous range (one MR can then span several files). Default 1.
        #[serde(default = "one")]
        files: u32,
    },
    /// `ibv_reg_mr` on the whole of the last mapped region (local write, remote write).
    RegMr,
    /// `ibv_reg_mr` on the whole of the last mapped region with remote read
    /// access only: the kernel pins the pages without write intent.
    RegMrReadOnly,
    /// `ibv_reg_mr` on part of the last mapped region.
    RegMrRange {
        /// Offset into the region.
        offset: Bytes,
        /// Length.
        len: Size,
    },
    /// A separate client process connects over rxe with an RC queue pair and
    /// RDMA-WRITEs a known pattern into the whole registered region.
    RdmaWrite,
    /// A separate client process connects like for `rdma_write` and
    /// RDMA-READs the whole registered region into its own buffer; the step
    /// compares what came back with the scenario's pattern (what the file
    /// holds after an `rdma_write`): `ok` when every block is the pattern,
    /// `mismatch` with a census of the blocks otherwise ([`BlockCensus`]).
    RdmaRead,
    /// The runner compares the region's bytes with the pattern the client
    /// wrote: `ok` or `mismatch` with the first differing offset.
    Verify,
    /// `ibv_dereg_mr` of every MR the process holds.
    DeregMr,
    /// `fcntl(fd, F_SETLEASE, kind)` on the process's descriptor of the scenario's file.
    Lease {
        /// Which lease.
        kind: LeaseKind,
        /// Use a fresh `O_RDONLY` descriptor of the scenario's file instead
        /// (a lease granted on it is released and the descriptor closed
        /// again at once).
        #[serde(default)]
        read_only: bool,
        /// Try it from a child process running as this user id, on a fresh
        /// `O_RDONLY` descriptor: a user who may read the file (mode 0644)
        /// but does not own it. Implies `read_only`.
        #[serde(default)]
        uid: Option<u32>,
    },
    /// `fcntl(fd, F_GETLEASE)` must report `is` (`mismatch` otherwise).
    CheckLease {
        /// The expected lease (`unlock` = none).
        is: LeaseKind,
    },
    /// Truncate the scenario's (first) file to `size`.
    Truncate {
        /// New size (0 allowed).
        size: Bytes,
        /// `truncate(path)` or `ftruncate(fd)`.
        #[serde(default)]
        via: TruncVia,
    },
    /// `fallocate(fd, mode, offset, len)` on the scenario's file.
    Fallocate {
        /// The mode.
        mode: FallocMode,
        /// Start.
        offset: Bytes,
        /// Length.
        len: Size,
    },
    /// `pwrite` a known byte at `offset` through a fresh descriptor (no size change).
    Write {
        /// Where.
        offset: Bytes,
        /// How much.
        len: Size,
    },
    /// `close()` the process's descriptor of the file (the mapping stays).
    CloseFile,
    /// `munmap()` every mapped region (the descriptor stays).
    Unmap,
    /// The holder forks; the child (with the uverbs fd and mappings) becomes `child`.
    Fork,
    /// The process exits at once: no dereg, no munmap, no close (the kernel does it).
    Exit,
    /// `SIGKILL` a process and wait (pidfd) until it is gone.
    Kill {
        /// Whom.
        who: Proc,
    },
    /// Send the uverbs (RDMA context) fd to another process with SCM_RIGHTS.
    SendUverbs {
        /// The receiving process.
        to: Proc,
    },
    /// Receive an fd sent with `send_uverbs`.
    RecvUverbs,
    /// Close the received uverbs fd.
    CloseUverbs,
    /// Read `/proc/<pid>/file_pins` of `of`: `ok` when it lists exactly the
    /// `expect`ed files (by name, under one uverbs owner), `mismatch` otherwise,
    /// or the errno of the read (`ENOENT` where the kernel has no such file).
    FilePins {
        /// Whose.
        of: Proc,
        /// Expected pinned file names (e.g. `S15.dat`); empty = no pins.
        #[serde(default)]
        expect: Vec<String>,
    },
    /// Read the scenario's file with `read()` through a fresh descriptor and
    /// compare it with the client's pattern over the first `len` bytes.
    VerifyFile {
        /// How many bytes the client wrote.
        #[serde(default)]
        len: Size,
    },
    /// Unmount the filesystem under test and mount it again with `-o dax=MODE`
    /// (the runner restores `dax=always` after the scenario).
    Remount {
        /// The DAX mode to mount with.
        dax: DaxMode,
    },
    /// Write `value` to `/proc/sys/NAME` (dots become slashes); `ENOENT`
    /// where the kernel has no such knob. The runner puts the old value back
    /// after the scenario.
    Sysctl {
        /// e.g. `fs.dax_pinned_truncate`.
        name: String,
        /// What to write.
        value: String,
    },
    /// Wait (up to the step deadline) for the earlier `may_block` call to
    /// return: its outcome, or `blocked` if it still sleeps; `ok` at once if
    /// it had already returned (its outcome is then that step's).
    Await,
    /// Fill the filesystem's free space with `filler.dat` (fallocate), so the
    /// next allocation must take blocks that are freed later. Removed after
    /// the scenario.
    Fill,
    /// Create `NAME` with `write()`, every byte `byte`, and fsync it:
    /// `size` bytes, or with `all: true` as many as the filesystem takes
    /// (every free block; `ENOSPC` only if not one could be written).
    /// Removed after the scenario.
    CreateFile {
        /// File name on the mount, e.g. `victim.dat`.
        name: String,
        /// Its size.
        #[serde(default)]
        size: Size,
        /// Write until the filesystem is full instead.
        #[serde(default)]
        all: bool,
        /// Its contents.
        byte: u8,
    },
    /// `read()` `NAME`: `ok` if every byte is still `byte`, `mismatch` with
    /// where the first other byte is (and whether it is the client's pattern).
    CheckFile {
        /// File name on the mount.
        name: String,
        /// The byte it was created with.
        byte: u8,
    },
    /// Share the blocks of `from` with `to` (reflink), both files on the
    /// mount opened read-write by this process; `SELF` names the scenario's
    /// file. `EOPNOTSUPP` where the filesystem cannot share blocks.
    Clone {
        /// Which ioctl.
        kind: CloneKind,
        /// Source file name, e.g. `S25-lo.dat` or `SELF`.
        from: String,
        /// Destination file name.
        to: String,
    },
    /// `unlink()` the scenario's file.
    Unlink,
    /// `statfs` of the mount (after `sync`): how many 4 KiB blocks were freed
    /// since this process's previous `free_blocks` step. The first one only
    /// records the count. `mismatch` unless at least `at_least` (waiting up
    /// to 5 s: inodes are freed in the background) and fewer than `below`.
    FreeBlocks {
        /// At least this many blocks must have been freed.
        #[serde(default)]
        at_least: Option<u64>,
        /// Fewer than this many blocks may have been freed.
        #[serde(default)]
        below: Option<u64>,
    },
    /// Set (`on: true`) or clear `FS_XFLAG_DAX` on the mount's root
    /// directory (`FS_IOC_FSSETXATTR`): files created in it afterwards are
    /// DAX, on a mount with `dax=inode`, only while it is set.
    DaxFlag {
        /// Set or clear.
        on: bool,
    },
    /// `XFS_IOC_EXCHANGE_RANGE`: exchange the first 2 MiB of the scenario's
    /// file with those of `with` (both opened read-write by this process).
    /// `ENOTTY` on filesystems other than xfs.
    ExchangeRange {
        /// The other file on the mount, e.g. `S24-tmp.dat`.
        with: String,
    },
    /// Read `/proc/locks`: `ok` when the leases on the scenario's file are
    /// exactly `expect` (their kinds as /proc/locks names them: `LAYOUT`,
    /// `LEASE`, `DELEG`; empty = none), `mismatch` otherwise.
    CheckLocks {
        /// Expected lease kinds on the file, e.g. `[LAYOUT]`.
        #[serde(default)]
        expect: Vec<String>,
    },
    /// `EXT4_IOC_MOVE_EXT` (what `e4defrag` does): move all blocks of the
    /// scenario's file (the donor) into `orig` (the original, same size),
    /// both opened read-write by this process. `ENOTTY` on filesystems other
    /// than ext4.
    MoveExt {
        /// The original file on the mount, e.g. `S23-orig.dat`.
        orig: String,
    },
    /// Install a `SIGIO` handler that does nothing (without `SA_RESTART`):
    /// a lease break the process causes itself then interrupts its own call
    /// (`EINTR`) instead of killing it, as `SIGIO`'s default action would.
    CatchSigio,
    /// `EXT4_IOC_SWAP_BOOT`: swap the scenario's file's blocks with those of
    /// the boot loader inode (opened read-write by this process; needs
    /// `CAP_SYS_ADMIN`). `ENOTTY` on filesystems other than ext4.
    SwapBoot,
    /// `XFS_IOC_SWAPEXT` (what `xfs_fsr` does): swap all extents of the
    /// scenario's file with those of `with` (same size), both opened
    /// read-write by this process. `ENOTTY` on filesystems other than xfs.
    #[serde(rename = "swapext")]
    SwapExt {
        /// The other file on the mount, e.g. `S22-tmp.dat`.
        with: String,
    },
    /// Start a `read()` of `len` bytes from a FUSE file whose server answers
    /// `delay_ms` late, into the last mapped region at `offset`, on a thread
    /// of its own: direct I/O, so the kernel pins the buffer's pages
    /// (FOLL_PIN, short-term, like `O_DIRECT` to a slow disk) until the
    /// answer. `ok` once the server has the request, i.e. once the pages
    /// are pinned; `slow_read_wait` collects the read.
    SlowRead {
        /// Where in the region the buffer starts.
        offset: Bytes,
        /// How many bytes to read.
        len: Size,
        /// How long the server keeps the request (and the pages pinned).
        delay_ms: u32,
    },
    /// Wait for the `slow_read` of this process to return: `ok` with the
    /// bytes it read and how long it took.
    SlowReadWait,
    /// Race registration against truncation inside one process: this thread
    /// loops `ibv_reg_mr` of the whole last mapped region (a file mapping),
    /// keeps each MR `hold_ms` and deregisters it, while a second thread
    /// loops `ftruncate()` of that file to half its size and back, for
    /// `seconds`. The truncates that shrink the file unmap its second half,
    /// so each registration finds the pages partly faulted in. `ok` when no
    /// truncate took `max_ms` or longer (errors such as `EDEADLK` are fine:
    /// the point is that nothing waits for a long-term pin); `mismatch`
    /// naming the slowest truncate otherwise; the registrations' errno when
    /// not one registration succeeded (there was nothing to race).
    RaceRegTruncate {
        /// How long to race. Default 8.
        #[serde(default = "race_seconds")]
        seconds: u32,
        /// How long each MR lives. Default 1500: a truncate that waits for
        /// a pin then takes at least this long.
        #[serde(default = "race_hold_ms")]
        hold_ms: u32,
        /// The longest a truncate may take. Default 1000.
        #[serde(default = "race_max_ms")]
        max_ms: u32,
    },
    /// Race the lease's lifetime against registration inside one process: a
    /// second thread loops `open(O_RDWR)`, `fcntl(F_SETLEASE,
    /// F_LAYOUT|F_EXCLUSIVE)`, `close()` of the scenario's file, while this
    /// thread loops `ibv_reg_mr`/`ibv_dereg_mr` of the last mapped region
    /// (a mapping of another descriptor of the file), for `seconds`. A
    /// registration can only succeed while the loop's lease exists, so many
    /// meet a lease whose file is being closed. `ok` with the counts when at
    /// least one registration succeeded, else the registrations' errno.
    /// What must not happen shows in the console (a use-after-free or a
    /// reference taken from zero), which the verdict checks.
    RaceLeaseClose {
        /// How long to race. Default 8.
        #[serde(default = "race_seconds")]
        seconds: u32,
    },
    /// The data-placement oracle: read the whole fsdax namespace raw
    /// (`O_DIRECT` on the pmem block device), find every 4 KiB block that
    /// carries the client's pattern for a region of `len` bytes, and map
    /// each to the file that owns it (FIEMAP of every file on the mount) or
    /// `free`. `ok` with the placement as data ([`crate::results::StepResult::placement`]).
    Locate {
        /// The registered region's length (what the client wrote). Default 2 MiB.
        #[serde(default)]
        len: Size,
    },
}

impl Action {
    /// A short name for tables: `map`, `reg_mr`, ….
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Map { .. } => "map",
            Action::RegMr | Action::RegMrReadOnly | Action::RegMrRange { .. } => "reg_mr",
            Action::Lease { .. } => "lease",
            Action::CheckLease { .. } => "check_lease",
            Action::Truncate { .. } => "truncate",
            Action::Fallocate { .. } => "fallocate",
            Action::Write { .. } => "write",
            Action::CloseFile => "close_file",
            Action::Unmap => "unmap",
            Action::Fork => "fork",
            Action::Exit => "exit",
            Action::Kill { .. } => "kill",
            Action::SendUverbs { .. } => "send_uverbs",
            Action::RecvUverbs => "recv_uverbs",
            Action::CloseUverbs => "close_uverbs",
            Action::FilePins { .. } => "file_pins",
            Action::VerifyFile { .. } => "verify_file",
            Action::RdmaWrite => "rdma_write",
            Action::RdmaRead => "rdma_read",
            Action::Verify => "verify",
            Action::DeregMr => "dereg_mr",
            Action::Remount { .. } => "remount",
            Action::Sysctl { .. } => "sysctl",
            Action::Await => "await",
            Action::Fill => "fill",
            Action::CreateFile { .. } => "create_file",
            Action::CheckFile { .. } => "check_file",
            Action::Locate { .. } => "locate",
            Action::SwapExt { .. } => "swapext",
            Action::MoveExt { .. } => "move_ext",
            Action::SwapBoot => "swap_boot",
            Action::CatchSigio => "catch_sigio",
            Action::CheckLocks { .. } => "check_locks",
            Action::Clone { .. } => "clone",
            Action::Unlink => "unlink",
            Action::DaxFlag { .. } => "dax_flag",
            Action::ExchangeRange { .. } => "exchange_range",
            Action::FreeBlocks { .. } => "free_blocks",
            Action::SlowRead { .. } => "slow_read",
            Action::SlowReadWait => "slow_read_wait",
            Action::RaceRegTruncate { .. } => "race_reg_truncate",
            Action::RaceLeaseClose { .. } => "race_lease_close",
        }
    }
}

/// What backs a mapped region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `MAP_ANONYMOUS | MAP_SHARED`.
    Anon,
    /// A fresh file on the filesystem under test, `MAP_SHARED`.
    File,
    /// The device-DAX namespace `/dev/daxX.Y`, `MAP_SHARED`.
    Devdax,
    /// A shmem file (`memfd_create`), `MAP_SHARED`: a regular file on no
    /// filesystem under test, as on tmpfs.
    Shm,
}

/// `-o dax=` modes (Documentation/filesystems/dax.rst).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaxMode {
    /// Every file is DAX.
    Always,
    /// No file is DAX: ordinary page cache.
    Never,
    /// A file is DAX if it (or, when it is created, its directory) has
    /// `FS_XFLAG_DAX` (`chattr +x`).
    Inode,
}

impl DaxMode {
    /// The `-o dax=` value.
    pub fn name(self) -> &'static str {
        match self {
            DaxMode::Always => "always",
            DaxMode::Never => "never",
            DaxMode::Inode => "inode",
        }
    }
}

fn one() -> u32 {
    1
}

fn race_seconds() -> u32 {
    8
}

fn race_hold_ms() -> u32 {
    1500
}

fn race_max_ms() -> u32 {
    1000
}

/// An offset or size that may be zero or unaligned: `0`, `3M`, `12345`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bytes(pub u64);

/// A size as written in YAML: a number or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    N(u64),
    S(String),
}

impl NumOrStr {
    fn text(self) -> String {
        match self {
            NumOrStr::N(n) => n.to_string(),
            NumOrStr::S(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_bytes(&NumOrStr::deserialize(d)?.text()).map(Bytes).map_err(de::Error::custom)
    }
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").unwrap_or(t);
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size (examples: 0, 4096, 64K, 2M, 1G)"))?;
    n.checked_mul(mul).ok_or_else(|| format!("size '{s}' is too large"))
}

/// A byte count written as `4096`, `64K`, `2M` or `1G` (binary units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Size(pub u64);

impl Default for Size {
    fn default() -> Self {
        Size(2 << 20)
    }
}

impl Size {
    /// Parse `4096`, `64K`, `2M`, `1G` (optionally with `iB`).
    pub fn parse(s: &str) -> Result<Size, String> {
        let bytes = parse_bytes(s).map_err(|e| e.replace("0, 4096", "4096"))?;
        if bytes == 0 || bytes % 4096 != 0 {
            return Err(format!("size '{s}' must be a non-zero multiple of 4096"));
        }
        Ok(Size(bytes))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Size::parse(&NumOrStr::deserialize(d)?.text()).map_err(de::Error::custom)
    }
}

/// The seed of the pattern written when no scenario names one (the
/// stand-alone `rdma-server`/`rdma-client` and the benchmarks).
pub const DEFAULT_SEED: u64 = 0x7069_6e6c_6162_0001;

/// The pattern seed of scenario `id`: every scenario writes its own bytes, so
/// blocks an earlier scenario of the same boot left on the namespace are
/// never counted as this one's (FNV-1a of the id; never 0).
pub fn pattern_seed(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"pinlab-pattern:".iter().chain(id.as_bytes()) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

/// The pattern's block size: each 4 KiB block of it starts with its seed
/// (8 bytes, little endian) and its block number in the region (8 bytes), so
/// a block found anywhere says whose it is and where it belongs.
pub const PATTERN_BLOCK: u64 = 4096;

/// The byte the client writes at `offset` of a region with pattern `seed`:
/// a pattern that a zeroed, stale, shifted or other scenario's buffer
/// cannot match by accident.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let (block, at) = (offset / PATTERN_BLOCK, offset % PATTERN_BLOCK);
    match at {
        0..8 => seed.to_le_bytes()[at as usize],
        8..16 => block.to_le_bytes()[(at - 8) as usize],
        // Mix the page number and the seed in, so a page written to the
        // wrong place, or by another scenario, is caught.
        _ => ((offset.wrapping_mul(31)) ^ block.wrapping_mul(0x9e) ^ (seed >> ((block % 8) * 8)) ^ 0xa5) as u8,
    }
}

/// Fill `buf`, which sits at `offset` of the region, with pattern `seed`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, offset + i as u64);
    }
}

/// The first offset where `buf` (a whole region) differs from pattern
/// `seed`, with the byte found and the byte expected.
pub fn first_pattern_mismatch(seed: u64, buf: &[u8]) -> Option<(usize, u8, u8)> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        let want = pattern_byte(seed, i as u64);
        (b != want).then_some((i, b, want))
    })
}

/// Which block of a pattern-`seed` region of `blocks` blocks `block` (4 KiB
/// read from anywhere) is, if it is one: its head names the seed and the
/// block number, and every other byte must match too.
pub fn pattern_block_index(seed: u64, blocks: u64, block: &[u8]) -> Option<u64> {
    if block.len() as u64 != PATTERN_BLOCK || block[..8] != seed.to_le_bytes() {
        return None;
    }
    let k = u64::from_le_bytes(block[8..16].try_into().ok()?);
    let base = k.checked_mul(PATTERN_BLOCK)?;
    (k < blocks && block.iter().enumerate().all(|(i, &b)| b == pattern_byte(seed, base + i as u64))).then_some(k)
}

/// What a buffer read back through an MR holds, 4 KiB block by block:
/// blocks of the scenario's pattern in their right place, blocks that are
/// one byte value throughout (a file written with `create_file`, zeroes),
/// and the rest. The same bytes and seed always give the same census.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockCensus {
    /// 4 KiB blocks looked at (a short last block counts as one).
    pub blocks: u64,
    /// Blocks that are the pattern's block for their offset.
    pub pattern: u64,
    /// Blocks whose bytes are all one value, by value (ascending).
    pub uniform: Vec<UniformBlocks>,
    /// Everything else (another scenario's pattern, a block of the pattern
    /// at the wrong offset, mixed bytes).
    pub other: u64,
    /// The first block that is not the pattern's, if any.
    pub first_not_pattern: Option<u64>,
}

/// `blocks` blocks that hold nothing but `byte`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniformBlocks {
    /// The byte.
    pub byte: u8,
    /// How many blocks.
    pub blocks: u64,
}

impl BlockCensus {
    /// Count the blocks of `buf`, a whole region read back, against pattern `seed`.
    pub fn of(seed: u64, buf: &[u8]) -> BlockCensus {
        let mut c = BlockCensus::default();
        let mut uniform = std::collections::BTreeMap::<u8, u64>::new();
        for (i, blk) in buf.chunks(PATTERN_BLOCK as usize).enumerate() {
            let i = i as u64;
            c.blocks += 1;
            let start = i * PATTERN_BLOCK;
            if blk.iter().enumerate().all(|(j, &b)| b == pattern_byte(seed, start + j as u64)) {
                c.pattern += 1;
                continue;
            }
            c.first_not_pattern.get_or_insert(i);
            match blk.first() {
                Some(&b0) if blk.iter().all(|&b| b == b0) => *uniform.entry(b0).or_default() += 1,
                _ => c.other += 1,
            }
        }
        c.uniform = uniform.into_iter().map(|(byte, blocks)| UniformBlocks { byte, blocks }).collect();
        c
    }

    /// Every block is the pattern.
    pub fn all_pattern(&self) -> bool {
        self.pattern == self.blocks
    }

    /// The blocks that are all `byte`.
    pub fn uniform_of(&self, byte: u8) -> u64 {
        self.uniform.iter().find(|u| u.byte == byte).map(|u| u.blocks).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("2M").unwrap(), Size(2 << 20));
        assert_eq!(Size::parse("64KiB").unwrap(), Size(64 << 10));
        assert_eq!(Size::parse("4096").unwrap(), Size(4096));
        assert!(Size::parse("12").unwrap_err().contains("multiple of 4096"));
        assert!(Size::parse("two").unwrap_err().contains("not a size"));
        assert!(Size::parse("0").is_err());
    }

    #[test]
    fn plan_round_trips_through_json() {
        let plan = Plan {
            flavor: Flavor::Stock,
            fs: Fs::Xfs,
            selftests: Vec::new(),
            bench: None,
            scenarios: vec![PlannedScenario {
                id: "S02".into(),
                title: "t".into(),
                steps: vec![
                    PlannedStep {
                        name: "map".into(),
                        action: Action::Map { target: Target::File, size: Size(4096), files: 1 },
                        by: Proc::Other,
                        probe: false,
                        may_block: false,
                    },
                    PlannedStep {
                        name: "reg".into(),
                        action: Action::RegMr,
                        by: Proc::Holder,
                        probe: true,
                        may_block: false,
                    },
                ],
            }],
        };
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
    }

    #[test]
    fn pattern_differs_between_pages() {
        let seed = pattern_seed("S05");
        assert_ne!(seed, pattern_seed("S13"));
        assert_ne!(pattern_byte(seed, 16), pattern_byte(seed, 4096 + 16));
        assert_ne!(pattern_byte(seed, 100), pattern_byte(pattern_seed("S13"), 100));
        let mut region = vec![0u8; 3 * 4096];
        fill_pattern(seed, 0, &mut region);
        assert_eq!(first_pattern_mismatch(seed, &region), None);
        assert_eq!(pattern_block_index(seed, 3, &region[8192..]), Some(2));
        // Another scenario's block, a block beyond the region, a damaged block: none are this one's.
        assert_eq!(pattern_block_index(pattern_seed("S13"), 3, &region[8192..]), None);
        assert_eq!(pattern_block_index(seed, 2, &region[8192..]), None);
        region[8192 + 100] ^= 1;
        assert_eq!(pattern_block_index(seed, 3, &region[8192..]), None);
        assert_eq!(first_pattern_mismatch(seed, &region).map(|m| m.0), Some(8292));
    }

    #[test]
    fn census_counts_pattern_uniform_and_other_blocks() {
        let seed = pattern_seed("S21");
        let mut region = vec![0u8; 6 * 4096];
        fill_pattern(seed, 0, &mut region);
        let all = BlockCensus::of(seed, &region);
        assert_eq!((all.blocks, all.pattern, all.other, all.first_not_pattern), (6, 6, 0, None));
        assert!(all.all_pattern() && all.uniform.is_empty());
        // Blocks 1 and 4: a victim's secret; block 2: zeroes; block 3:
        // another scenario's pattern; block 5: this pattern's block 0 (a
        // block in the wrong place is not the file's own byte).
        region[4096..8192].fill(0x53);
        region[4 * 4096..5 * 4096].fill(0x53);
        region[8192..12288].fill(0);
        let mut other = vec![0u8; 4 * 4096];
        fill_pattern(pattern_seed("S20"), 0, &mut other);
        region[12288..16384].copy_from_slice(&other[12288..16384]);
        let first = region[..4096].to_vec();
        region[5 * 4096..].copy_from_slice(&first);
        let c = BlockCensus::of(seed, &region);
        assert_eq!((c.blocks, c.pattern, c.other, c.first_not_pattern), (6, 1, 2, Some(1)));
        assert_eq!(c.uniform, vec![UniformBlocks { byte: 0, blocks: 1 }, UniformBlocks { byte: 0x53, blocks: 2 }]);
        assert_eq!((c.uniform_of(0x53), c.uniform_of(0x5a)), (2, 0));
        assert!(!c.all_pattern());
        assert_eq!(BlockCensus::of(seed, &region), c, "the same bytes give the same census");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<BlockCensus>(&json).unwrap(), c);
    }
}
