//! RDMA verbs for pinlab through `sideway`: open a device, register memory,
//! and move data with one-sided RDMA WRITEs over an RC queue pair.
//!
//! `ibv_reg_mr` and `ibv_dereg_mr` are called through function pointers
//! looked up with `dlsym` in the very `libibverbs.so.1` that sideway's loader
//! opened, so the errno we report is the one libibverbs (and the kernel) set,
//! captured immediately after the call. sideway's own wrappers are avoided for
//! these two calls because (a) its MR type deregisters only in `Drop`,
//! discarding `ibv_dereg_mr`'s result, and (b) its static loader stub answers
//! *every* call with `EOPNOTSUPP` when libibverbs could not be loaded, which
//! is exactly the errno the stock kernel gives for FS-DAX, so a broken rootfs
//! would look like a correct result.
//!
//! The TCP side channel carries one JSON object per line (see [`Msg`]).

use std::ffi::{c_int, c_void, CStr};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CreateCompletionQueueErrorKind, GenericCompletionQueue, PollCompletionQueueError,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListErrorKind, OpenDeviceErrorKind};
use sideway::ibverbs::device_context::{
    AllocateProtectionDomainErrorKind, DeviceContext, Mtu, PortState, QueryPortErrorKind,
};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, CreateQueuePairErrorKind, ModifyQueuePairErrorKind, PostSendError, PostSendGuard, QueuePair,
    QueuePairAttribute, QueuePairState, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use crate::region::Region;
use crate::StepError;

/// The HCA port pinlab uses (rxe has exactly one).
pub const PORT: u8 = 1;

/// Largest RDMA WRITE we post in one work request.
pub const MAX_CHUNK: usize = 1 << 20;

/// Send-queue depth (and the number of WRITEs kept in flight) on the client.
const SEND_DEPTH: u32 = 32;

/// Longest side-channel line we accept.
const MAX_LINE: u64 = 64 << 10;

/// `IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE`.
fn mr_access() -> AccessFlags {
    AccessFlags::LocalWrite | AccessFlags::RemoteWrite
}

// ---------------------------------------------------------------------------
// Raw ibv_reg_mr / ibv_dereg_mr from the loaded libibverbs.

type RegMrFn = unsafe extern "C" fn(pd: *mut c_void, addr: *mut c_void, length: usize, access: c_int) -> *mut c_void;
type DeregMrFn = unsafe extern "C" fn(mr: *mut c_void) -> c_int;

#[derive(Clone, Copy)]
struct RawVerbs {
    reg_mr: RegMrFn,
    dereg_mr: DeregMrFn,
}

/// The head of `struct ibv_mr` (include/infiniband/verbs.h); stable ABI.
#[repr(C)]
struct RawIbvMr {
    context: *mut c_void,
    pd: *mut c_void,
    addr: *mut c_void,
    length: usize,
    handle: u32,
    lkey: u32,
    rkey: u32,
}

fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc,
    // valid until the next dl* call on this thread; we copy it at once.
    unsafe {
        let p = libc::dlerror();
        if p.is_null() {
            "no dlerror text".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn load_raw_verbs() -> Result<RawVerbs, String> {
    // RTLD_NOLOAD: only find the copy sideway's loader already opened (so our
    // pointers belong to the same library instance as the PD we pass in).
    // SAFETY: dlopen with a valid C string; NOLOAD never runs initialisers.
    let h = unsafe { libc::dlopen(c"libibverbs.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if h.is_null() {
        return Err(format!(
            "libibverbs.so.1 is not loaded in this process (sideway's loader could not dlopen it: is rdma-core's libibverbs1 installed?): {}",
            dlerror_text()
        ));
    }
    let sym = |name: &CStr| -> Result<*mut c_void, String> {
        // SAFETY: h is a live handle from dlopen; name is NUL-terminated.
        let p = unsafe { libc::dlsym(h, name.as_ptr()) };
        if p.is_null() {
            Err(format!("dlsym(libibverbs.so.1, {}): {}", name.to_string_lossy(), dlerror_text()))
        } else {
            Ok(p)
        }
    };
    let reg = sym(c"ibv_reg_mr")?;
    let dereg = sym(c"ibv_dereg_mr")?;
    // SAFETY: these symbols are libibverbs' exported functions with the C
    // prototypes `struct ibv_mr *ibv_reg_mr(struct ibv_pd *, void *, size_t,
    // int)` and `int ibv_dereg_mr(struct ibv_mr *)`, which RegMrFn/DeregMrFn
    // mirror with opaque pointers.
    unsafe {
        Ok(RawVerbs {
            reg_mr: std::mem::transmute::<*mut c_void, RegMrFn>(reg),
            dereg_mr: std::mem::transmute::<*mut c_void, DeregMrFn>(dereg),
        })
    }
}

fn raw_verbs() -> Result<RawVerbs, String> {
    static RAW: OnceLock<Result<RawVerbs, String>> = OnceLock::new();
    RAW.get_or_init(load_raw_verbs).clone()
}

// ---------------------------------------------------------------------------
// errno out of sideway's error types.

fn io_text(e: &io::Error) -> (Option<i32>, String) {
    (e.raw_os_error(), e.to_string())
}

fn modify_errno(kind: &ModifyQueuePairErrorKind) -> Option<i32> {
    match kind {
        ModifyQueuePairErrorKind::Ibverbs(e) => e.raw_os_error(),
        ModifyQueuePairErrorKind::InvalidTransition { source, .. }
        | ModifyQueuePairErrorKind::InvalidAttributeMask { source, .. }
        | ModifyQueuePairErrorKind::ResolveRouteTimedout { source, .. }
        | ModifyQueuePairErrorKind::NetworkUnreachable { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

fn post_send_errno(e: &PostSendError) -> Option<i32> {
    match e {
        PostSendError::Ibverbs(e)
        | PostSendError::InvalidWorkRequest(e)
        | PostSendError::InvalidQueuePair(e)
        | PostSendError::NotEnoughResources(e) => e.raw_os_error(),
        _ => None,
    }
}

fn step(errno: Option<i32>, message: String) -> StepError {
    StepError { errno, message }
}

// ---------------------------------------------------------------------------
// Device and memory regions.

/// An opened RDMA device: its verbs context and one protection domain.
pub struct Device {
    name: String,
    ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    verbs: RawVerbs,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Device {
    /// Open the named RDMA device (e.g. `"rxe0"`), or the first one if
    /// `None`, and allocate a protection domain on it.
    pub fn open(name: Option<&str>) -> anyhow::Result<Device> {
        let verbs = raw_verbs().map_err(anyhow::Error::msg)?;
        let list = DeviceList::new().map_err(|e| {
            let detail = match &e.0 {
                GetDeviceListErrorKind::Ibverbs(io) => io.to_string(),
                other => other.to_string(),
            };
            anyhow::anyhow!("ibv_get_device_list: {detail} (is the ib_uverbs module/driver present?)")
        })?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        let device = match name {
            Some(want) => list.iter().find(|d| d.name() == want).ok_or_else(|| {
                anyhow::anyhow!(
                    "RDMA device {want:?} not found (devices: {}); set one up with `rdma link add {want} type rxe netdev dummy0`",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                )
            })?,
            None => list.iter().next().ok_or_else(|| {
                anyhow::anyhow!("no RDMA devices found; set one up with `rdma link add rxe0 type rxe netdev dummy0`")
            })?,
        };
        let dev_name = device.name();
        let ctx = device.open().map_err(|e| {
            let detail = match &e.0 {
                OpenDeviceErrorKind::Ibverbs(io) => io.to_string(),
                other => other.to_string(),
            };
            anyhow::anyhow!("ibv_open_device({dev_name}): {detail}")
        })?;
        let pd = ctx.alloc_pd().map_err(|e| {
            let detail = match &e.0 {
                AllocateProtectionDomainErrorKind::Ibverbs(io) => io.to_string(),
                other => other.to_string(),
            };
            anyhow::anyhow!("ibv_alloc_pd({dev_name}): {detail}")
        })?;
        Ok(Device { name: dev_name, ctx, pd, verbs })
    }

    /// The device name, e.g. `rxe0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The uverbs command fd (`/dev/infiniband/uverbsN`) of this context: the
    /// file pins are accounted to (for SCM_RIGHTS and fork scenarios).
    pub fn uverbs_fd(&self) -> RawFd {
        // SAFETY: the context pointer stays valid while self.ctx lives;
        // cmd_fd is a plain int field set by ibv_open_device.
        unsafe { self.ctx.context().as_ref().cmd_fd }
    }

    /// `ibv_reg_mr(pd, addr, len, IBV_ACCESS_LOCAL_WRITE|IBV_ACCESS_REMOTE_WRITE)`.
    ///
    /// On failure the error carries the errno `ibv_reg_mr` left (the kernel's
    /// answer: `EOPNOTSUPP`, `EPERM`, `EFAULT`, ...), read right after the
    /// call. The caller keeps `addr..addr+len` mapped for as long as the MR is
    /// used remotely (the kernel holds its own page pins meanwhile).
    pub fn reg_mr(&self, addr: *mut u8, len: usize) -> Result<Mr, StepError> {
        let access = mr_access();
        let what = format!(
            "ibv_reg_mr({}, addr={addr:p}, len={len}, IBV_ACCESS_LOCAL_WRITE|IBV_ACCESS_REMOTE_WRITE)",
            self.name
        );
        // SAFETY: pd() is the live PD of this device (kept alive by self.pd).
        let pd = unsafe { self.pd.pd() }.as_ptr().cast::<c_void>();
        nix::errno::Errno::clear();
        // SAFETY: ibv_reg_mr only reads pd and asks the kernel to pin the
        // user range; the kernel validates addr/len and answers with an errno.
        let mr = unsafe { (self.verbs.reg_mr)(pd, addr.cast::<c_void>(), len, access.bits()) };
        let err = io::Error::last_os_error();
        let Some(mr) = NonNull::new(mr.cast::<RawIbvMr>()) else {
            return Err(match err.raw_os_error() {
                Some(n) if n != 0 => StepError::errno(n, format!("{what}: {err}")),
                _ => StepError::other(format!("{what} returned NULL without setting errno")),
            });
        };
        // SAFETY: a non-NULL result is a valid struct ibv_mr owned by us
        // until ibv_dereg_mr.
        let (lkey, rkey) = unsafe { (mr.as_ref().lkey, mr.as_ref().rkey) };
        Ok(Mr {
            raw: Some(mr),
            addr,
            len,
            lkey,
            rkey,
            dereg_fn: self.verbs.dereg_mr,
            device: self.name.clone(),
            _pd: Arc::clone(&self.pd),
        })
    }

    fn port_attr(&self) -> Result<PortInfo, StepError> {
        let attr = self.ctx.query_port(PORT).map_err(|e| {
            let (errno, text) = match &e.source {
                QueryPortErrorKind::Ibverbs(io) => io_text(io),
                other => (None, other.to_string()),
            };
            step(errno, format!("ibv_query_port({}, port {PORT}): {text}", self.name))
        })?;
        let a = &attr.attr;
        Ok(PortInfo { state: a.state, active_mtu: a.active_mtu, max_msg_sz: a.max_msg_sz, gid_tbl_len: a.gid_tbl_len })
    }

    /// The GID to use: the first RoCE v2 entry holding an IPv4-mapped
    /// address (`::ffff:192.0.2.1`), else index 0.
    fn pick_gid(&self, tbl_len: i32) -> Result<(u8, Gid, String), StepError> {
        let mut cands = Vec::new();
        for idx in 0..tbl_len.clamp(0, 256) as u32 {
            let gid = match self.ctx.query_gid(PORT, idx) {
                Ok(g) if !g.is_zero() => g,
                _ => continue,
            };
            cands.push(GidCandidate { index: idx, gid: gid.raw, kind: self.gid_kind(idx) });
        }
        if let Some(c) = choose_gid(&cands) {
            let index = u8::try_from(c.index)
                .map_err(|_| StepError::other(format!("GID index {} does not fit the AH's u8", c.index)))?;
            let text = format!("{}[{}]={} ({})", self.name, c.index, Ipv6Addr::from(c.gid), c.kind.name());
            return Ok((index, Gid { raw: c.gid }, text));
        }
        let gid = self.ctx.query_gid(PORT, 0).map_err(|e| {
            step(
                None,
                format!(
                    "no RoCE v2 IPv4-mapped GID on {} port {PORT} and ibv_query_gid(index 0) failed: {e} (GIDs seen: {})",
                    self.name,
                    describe_gids(&cands)
                ),
            )
        })?;
        let text = format!(
            "{}[0]={} (fallback: no RoCE v2 IPv4-mapped GID; seen: {})",
            self.name,
            Ipv6Addr::from(gid.raw),
            describe_gids(&cands)
        );
        Ok((0, gid, text))
    }

    /// The GID type of `idx` from sysfs, or ibv_query_gid_type.
    fn gid_kind(&self, idx: u32) -> GidKind {
        let p = format!("/sys/class/infiniband/{}/ports/{PORT}/gid_attrs/types/{idx}", self.name);
        if let Ok(s) = std::fs::read_to_string(p) {
            return GidKind::from_sysfs(&s);
        }
        match self.ctx.query_gid_type(PORT, idx) {
            Ok(1) => GidKind::RoceV2,
            Ok(0) => GidKind::IbOrRoceV1,
            _ => GidKind::Unknown,
        }
    }
}

struct PortInfo {
    state: u32,
    active_mtu: u32,
    max_msg_sz: u32,
    gid_tbl_len: i32,
}

/// `IBV_PORT_ACTIVE`.
const PORT_ACTIVE: u32 = PortState::Active as u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GidKind {
    RoceV2,
    IbOrRoceV1,
    Unknown,
}

impl GidKind {
    fn from_sysfs(s: &str) -> GidKind {
        match s.trim() {
            "RoCE v2" => GidKind::RoceV2,
            "IB/RoCE v1" => GidKind::IbOrRoceV1,
            _ => GidKind::Unknown,
        }
    }

    fn name(self) -> &'static str {
        match self {
            GidKind::RoceV2 => "RoCE v2",
            GidKind::IbOrRoceV1 => "IB/RoCE v1",
            GidKind::Unknown => "unknown type",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct GidCandidate {
    index: u32,
    gid: [u8; 16],
    kind: GidKind,
}

fn choose_gid(cands: &[GidCandidate]) -> Option<&GidCandidate> {
    cands.iter().find(|c| c.kind == GidKind::RoceV2 && Ipv6Addr::from(c.gid).to_ipv4_mapped().is_some())
}

fn describe_gids(cands: &[GidCandidate]) -> String {
    if cands.is_empty() {
        return "none".to_string();
    }
    cands
        .iter()
        .map(|c| format!("[{}] {} {}", c.index, Ipv6Addr::from(c.gid), c.kind.name()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `Mtu` for an `ibv_mtu` value, and its size in bytes.
fn mtu_from_ibv(v: u32) -> Option<(Mtu, u32)> {
    [(Mtu::Mtu256, 256), (Mtu::Mtu512, 512), (Mtu::Mtu1024, 1024), (Mtu::Mtu2048, 2048), (Mtu::Mtu4096, 4096)]
        .into_iter()
        .find(|(m, _)| *m as u32 == v)
}

fn mtu_from_bytes(b: u32) -> Option<Mtu> {
    [(Mtu::Mtu256, 256), (Mtu::Mtu512, 512), (Mtu::Mtu1024, 1024), (Mtu::Mtu2048, 2048), (Mtu::Mtu4096, 4096)]
        .into_iter()
        .find(|(_, n)| *n == b)
        .map(|(m, _)| m)
}

/// A registered memory region. Deregistered on drop (errors then go to
/// stderr); call [`Mr::dereg`] to see `ibv_dereg_mr`'s errno.
pub struct Mr {
    raw: Option<NonNull<RawIbvMr>>,
    addr: *mut u8,
    len: usize,
    lkey: u32,
    rkey: u32,
    dereg_fn: DeregMrFn,
    device: String,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: libibverbs objects may be used and destroyed from any thread; Mr
// owns its ibv_mr exclusively.
unsafe impl Send for Mr {}

impl std::fmt::Debug for Mr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mr")
            .field("device", &self.device)
            .field("addr", &self.addr)
            .field("len", &self.len)
            .field("lkey", &self.lkey)
            .field("rkey", &self.rkey)
            .finish()
    }
}

impl Mr {
    /// The registered start address.
    pub fn addr(&self) -> *mut u8 {
        self.addr
    }

    /// The registered length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the MR covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The local key.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The remote key.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// `ibv_dereg_mr`, reporting its errno. After a failure the MR is
    /// abandoned (the kernel releases it when the device context closes).
    pub fn dereg(mut self) -> Result<(), StepError> {
        self.dereg_inner()
    }

    fn dereg_inner(&mut self) -> Result<(), StepError> {
        let Some(raw) = self.raw.take() else {
            return Ok(());
        };
        nix::errno::Errno::clear();
        // SAFETY: raw is the ibv_mr ibv_reg_mr returned, not yet
        // deregistered (take() makes this the only call).
        let ret = unsafe { (self.dereg_fn)(raw.as_ptr().cast::<c_void>()) };
        if ret == 0 {
            return Ok(());
        }
        let errno = if ret > 0 { ret } else { io::Error::last_os_error().raw_os_error().unwrap_or(0) };
        let text = io::Error::from_raw_os_error(errno);
        Err(StepError::errno(
            errno,
            format!("ibv_dereg_mr({}, addr={:p}, len={}): {text}", self.device, self.addr, self.len),
        ))
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        if let Err(e) = self.dereg_inner() {
            eprintln!("pinlab: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// The byte pattern.

/// Fill `buf` with `pattern_byte(offset)` for every offset.
pub fn fill_pattern(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pinlab_scenarios::plan::pattern_byte(i as u64);
    }
}

/// The first offset where `buf` differs from the pattern, with the byte
/// found and the byte expected.
pub fn first_pattern_mismatch(buf: &[u8]) -> Option<(usize, u8, u8)> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        let want = pinlab_scenarios::plan::pattern_byte(i as u64);
        (b != want).then_some((i, b, want))
    })
}

// ---------------------------------------------------------------------------
// The side channel.

/// One endpoint of the RC connection, as exchanged over TCP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Endpoint {
    /// The RDMA device the sender uses (the client opens the same one).
    device: String,
    qpn: u32,
    psn: u32,
    gid: Ipv6Addr,
    gid_index: u8,
    /// Active MTU of the sender's port, in bytes.
    mtu: u32,
    /// Target region (server only; 0 from the client).
    addr: u64,
    len: u64,
    rkey: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum Msg {
    /// Both ways, server first: QP number, PSN, GID (and the server's MR).
    Hello(Endpoint),
    /// Server to client: my QP is at RTS, write now.
    Ready,
    /// Client to server: how the RDMA WRITEs completed.
    Done { ok: bool, bytes: u64, status: String, errno: Option<i32>, elapsed_us: u64 },
    /// Server to client: giving up.
    Abort { reason: String, errno: Option<i32> },
}

fn encode(msg: &Msg) -> Result<Vec<u8>, StepError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| StepError::other(format!("encoding {msg:?}: {e}")))?;
    line.push(b'\n');
    Ok(line)
}

fn decode(line: &[u8]) -> Result<Msg, StepError> {
    serde_json::from_slice(line).map_err(|e| {
        StepError::errno(
            libc::EPROTO,
            format!("bad side-channel message {:?}: {e}", String::from_utf8_lossy(line).trim_end()),
        )
    })
}

fn remaining(until: Instant) -> Option<Duration> {
    until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

struct Wire {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    peer: String,
}

impl Wire {
    fn new(stream: TcpStream) -> Result<Wire, StepError> {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "peer".to_string());
        let _ = stream.set_nodelay(true);
        let reader =
            stream.try_clone().map_err(|e| step(e.raw_os_error(), format!("dup of the TCP socket to {peer}: {e}")))?;
        Ok(Wire { writer: stream, reader: BufReader::new(reader), peer })
    }

    fn timeout(&self, what: &str) -> StepError {
        StepError::errno(libc::ETIMEDOUT, format!("timed out waiting for {what} from {}", self.peer))
    }

    fn send(&mut self, msg: &Msg, until: Instant) -> Result<(), StepError> {
        let line = encode(msg)?;
        let left = remaining(until).ok_or_else(|| self.timeout("the socket to accept a message"))?;
        let peer = self.peer.clone();
        let io_err = |e: io::Error| step(e.raw_os_error(), format!("sending to {peer}: {e}"));
        self.writer.set_write_timeout(Some(left)).map_err(io_err)?;
        self.writer.write_all(&line).map_err(io_err)?;
        self.writer.flush().map_err(io_err)
    }

    fn recv(&mut self, what: &str, until: Instant) -> Result<Msg, StepError> {
        let mut line = Vec::new();
        loop {
            let left = remaining(until).ok_or_else(|| self.timeout(what))?;
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| step(e.raw_os_error(), format!("SO_RCVTIMEO on {}: {e}", self.peer)))?;
            let limit = MAX_LINE.saturating_sub(line.len() as u64);
            if limit == 0 {
                return Err(StepError::errno(
                    libc::EPROTO,
                    format!("message from {} longer than {MAX_LINE} bytes", self.peer),
                ));
            }
            match (&mut self.reader).take(limit).read_until(b'\n', &mut line) {
                Ok(0) => {
                    return Err(StepError::errno(
                        libc::ECONNRESET,
                        format!("{} closed the connection while we waited for {what}", self.peer),
                    ))
                }
                Ok(_) if line.ends_with(b"\n") => return decode(&line),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    return Err(step(e.raw_os_error(), format!("reading {what} from {}: {e}", self.peer)));
                }
            }
        }
    }
}

fn accept_until(listener: &TcpListener, until: Instant) -> Result<TcpStream, StepError> {
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".to_string());
    listener
        .set_nonblocking(true)
        .map_err(|e| step(e.raw_os_error(), format!("fcntl(O_NONBLOCK) on listener {local}: {e}")))?;
    let started = Instant::now();
    let result = loop {
        match listener.accept() {
            Ok((s, _)) => break Ok(s),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                if remaining(until).is_none() {
                    break Err(StepError::errno(
                        libc::ETIMEDOUT,
                        format!("no RDMA client connected to {local} within {:?}", started.elapsed()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => break Err(step(e.raw_os_error(), format!("accept on {local}: {e}"))),
        }
    };
    let _ = listener.set_nonblocking(false);
    let stream = result?;
    stream
        .set_nonblocking(false)
        .map_err(|e| step(e.raw_os_error(), format!("clearing O_NONBLOCK on the accepted socket: {e}")))?;
    Ok(stream)
}

fn connect_until(server: SocketAddr, until: Instant) -> Result<TcpStream, StepError> {
    let mut last: Option<io::Error> = None;
    loop {
        let Some(left) = remaining(until) else {
            let why = last.map(|e| e.to_string()).unwrap_or_else(|| "no attempt finished".to_string());
            return Err(StepError::errno(
                libc::ETIMEDOUT,
                format!("connect to {server} timed out (last error: {why})"),
            ));
        };
        match TcpStream::connect_timeout(&server, left) {
            Ok(s) => return Ok(s),
            // The server may not be listening yet: retry until the deadline.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(step(e.raw_os_error(), format!("connect to {server}: {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------
// RC queue pair.

struct RcQp {
    cq: Arc<BasicCompletionQueue>,
    qp: BasicQueuePair,
    device: String,
    psn: u32,
    gid_index: u8,
    gid: Gid,
    gid_text: String,
    mtu_bytes: u32,
    max_msg: u32,
}

fn initial_psn() -> u32 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (nanos ^ (std::process::id() << 7)) & 0x00ff_ffff
}

impl RcQp {
    /// CQ + RC QP on `dev`, moved to INIT, with our GID and PSN chosen.
    fn new(dev: &Device, send_depth: u32) -> Result<RcQp, StepError> {
        let port = dev.port_attr()?;
        if port.state != PORT_ACTIVE {
            return Err(StepError::errno(
                libc::ENETDOWN,
                format!(
                    "port {PORT} of {} is not ACTIVE (ibv_port_state {}); is the netdev under it up?",
                    dev.name, port.state
                ),
            ));
        }
        let (_, mtu_bytes) = mtu_from_ibv(port.active_mtu).ok_or_else(|| {
            StepError::other(format!("{} port {PORT} reports an unknown active_mtu {}", dev.name, port.active_mtu))
        })?;
        let (gid_index, gid, gid_text) = dev.pick_gid(port.gid_tbl_len)?;

        let cqe = send_depth * 2 + 2;
        let cq = dev.ctx.create_cq_builder().setup_cqe(cqe).build().map_err(|e| {
            let (errno, text) = match &e.0 {
                CreateCompletionQueueErrorKind::Ibverbs(io) => io_text(io),
                other => (None, other.to_string()),
            };
            step(errno, format!("ibv_create_cq({}, cqe={cqe}): {text}", dev.name))
        })?;
        let qp = dev
            .pd
            .create_qp_builder()
            .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&cq)))
            .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&cq)))
            .setup_max_send_wr(send_depth)
            .setup_max_recv_wr(1)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .build()
            .map_err(|e| {
                let (errno, text) = match &e.0 {
                    CreateQueuePairErrorKind::Ibverbs(io) => io_text(io),
                    other => (None, other.to_string()),
                };
                step(errno, format!("ibv_create_qp({}, RC, max_send_wr={send_depth}): {text}", dev.name))
            })?;
        let mut rc = RcQp {
            cq,
            qp,
            device: dev.name.clone(),
            psn: initial_psn(),
            gid_index,
            gid,
            gid_text,
            mtu_bytes,
            max_msg: port.max_msg_sz,
        };
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init).setup_pkey_index(0).setup_port(PORT).setup_access_flags(mr_access());
        rc.modify(&attr, "INIT (pkey_index=0, port=1, access=LOCAL_WRITE|REMOTE_WRITE)")?;
        Ok(rc)
    }

    fn modify(&mut self, attr: &QueuePairAttribute, what: &str) -> Result<(), StepError> {
        let qpn = self.qp.qp_number();
        self.qp.modify(attr).map_err(|e| {
            let errno = modify_errno(&e.0);
            let text = match errno {
                Some(n) => format!("{e}: {}", io::Error::from_raw_os_error(n)),
                None => e.to_string(),
            };
            step(errno, format!("ibv_modify_qp({}, qpn={qpn:#x}) to {what}: {text}", self.device))
        })
    }

    fn endpoint(&self, mr: Option<&Mr>) -> Endpoint {
        Endpoint {
            device: self.device.clone(),
            qpn: self.qp.qp_number(),
            psn: self.psn,
            gid: Ipv6Addr::from(self.gid.raw),
            gid_index: self.gid_index,
            mtu: self.mtu_bytes,
            addr: mr.map(|m| m.addr() as u64).unwrap_or(0),
            len: mr.map(|m| m.len() as u64).unwrap_or(0),
            rkey: mr.map(|m| m.rkey()).unwrap_or(0),
        }
    }

    /// The path MTU both sides can use.
    fn path_mtu(&self, remote: &Endpoint) -> Result<(Mtu, u32), StepError> {
        let bytes = self.mtu_bytes.min(remote.mtu);
        let mtu = mtu_from_bytes(bytes)
            .ok_or_else(|| StepError::errno(libc::EPROTO, format!("peer sent an invalid MTU {}", remote.mtu)))?;
        Ok((mtu, bytes))
    }

    /// INIT -> RTR -> RTS towards `remote`.
    fn connect(&mut self, remote: &Endpoint) -> Result<(), StepError> {
        let (mtu, mtu_bytes) = self.path_mtu(remote)?;
        let remote_gid = Gid::from(remote.gid);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(0).setup_port(PORT).setup_service_level(0).setup_grh(&remote_gid, 0, self.gid_index, 64, 0);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&ah);
        self.modify(
            &attr,
            &format!(
                "RTR (path_mtu={mtu_bytes}, dest_qpn={:#x}, rq_psn={:#x}, dgid={}, sgid_index={})",
                remote.qpn, remote.psn, remote.gid, self.gid_index
            ),
        )?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(16)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(1);
        self.modify(&attr, &format!("RTS (sq_psn={:#x}, timeout=16, retry_cnt=7, rnr_retry=7)", self.psn))
    }
}

/// `ibv_wc_status_str`-style names for work-completion status codes.
pub fn wc_status_name(status: u32) -> &'static str {
    const NAMES: [&str; 24] = [
        "IBV_WC_SUCCESS",
        "IBV_WC_LOC_LEN_ERR",
        "IBV_WC_LOC_QP_OP_ERR",
        "IBV_WC_LOC_EEC_OP_ERR",
        "IBV_WC_LOC_PROT_ERR",
        "IBV_WC_WR_FLUSH_ERR",
        "IBV_WC_MW_BIND_ERR",
        "IBV_WC_BAD_RESP_ERR",
        "IBV_WC_LOC_ACCESS_ERR",
        "IBV_WC_REM_INV_REQ_ERR",
        "IBV_WC_REM_ACCESS_ERR",
        "IBV_WC_REM_OP_ERR",
        "IBV_WC_RETRY_EXC_ERR",
        "IBV_WC_RNR_RETRY_EXC_ERR",
        "IBV_WC_LOC_RDD_VIOL_ERR",
        "IBV_WC_REM_INV_RD_REQ_ERR",
        "IBV_WC_REM_ABORT_ERR",
        "IBV_WC_INV_EECN_ERR",
        "IBV_WC_INV_EEC_STATE_ERR",
        "IBV_WC_FATAL_ERR",
        "IBV_WC_RESP_TIMEOUT_ERR",
        "IBV_WC_GENERAL_ERR",
        "IBV_WC_TM_ERR",
        "IBV_WC_TM_RNDV_INCOMPLETE",
    ];
    NAMES.get(status as usize).copied().unwrap_or("IBV_WC_<unknown>")
}

// ---------------------------------------------------------------------------
// Server.

/// Server side of one RDMA WRITE into `mr`.
///
/// Accepts one TCP connection on `listener`, creates a CQ and an RC QP on
/// `dev`, sends the client (QPN, GID, PSN, MTU, address, length, rkey),
/// reads the client's, brings the QP to RTR/RTS, tells the client to go, and
/// waits for its "done" message. `Ok(())` when the client reports every
/// RDMA WRITE completed successfully; otherwise the error carries the
/// client's completion status (or errno). Everything is bounded by `deadline`.
pub fn serve_write(dev: &Device, mr: &Mr, listener: &TcpListener, deadline: Duration) -> Result<(), StepError> {
    let until = Instant::now() + deadline;
    let stream = accept_until(listener, until)?;
    let mut wire = Wire::new(stream)?;
    let result = serve_on(dev, mr, &mut wire, until);
    if let Err(e) = &result {
        let abort = Msg::Abort { reason: e.message.clone(), errno: e.errno };
        let _ = wire.send(&abort, Instant::now() + Duration::from_secs(1));
    }
    result
}

/// One whole RDMA WRITE into `mr` by a separate `rdma-client` process:
/// listen on `bind`:0, start the client (`client` is its path) against that
/// port, serve it with [`serve_write`], and return the JSON report it prints.
/// The client is killed if serving fails; its stderr is quoted on failure.
pub fn write_from_client(
    dev: &Device,
    mr: &Mr,
    client: &str,
    bind: &str,
    deadline: Duration,
) -> Result<(u32, ClientReport), StepError> {
    let listener = TcpListener::bind((bind, 0))
        .map_err(|e| step(e.raw_os_error(), format!("bind {bind}:0 for the RDMA side channel: {e}")))?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let timeout = deadline.as_secs().max(1).to_string();
    let mut child = std::process::Command::new(client)
        .args(["--server", &format!("{bind}:{port}"), "--timeout-s", &timeout])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| step(e.raw_os_error(), format!("start {client}: {e}")))?;
    let pid = child.id();
    let served = serve_write(dev, mr, &listener, deadline + Duration::from_secs(10));
    if served.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().map_err(|e| StepError::other(format!("wait for {client} (pid {pid}): {e}")))?;
    served?;
    if !out.status.success() {
        return Err(StepError::other(format!(
            "{client} (pid {pid}) failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim()).map_err(|e| {
        StepError::other(format!("{client} (pid {pid}) printed a report that does not parse ({e}): {}", text.trim()))
    })?;
    Ok((pid, report))
}

fn serve_on(dev: &Device, mr: &Mr, wire: &mut Wire, until: Instant) -> Result<(), StepError> {
    let mut rc = RcQp::new(dev, 4)?;
    wire.send(&Msg::Hello(rc.endpoint(Some(mr))), until)?;
    let remote = match wire.recv("the client's QP info (hello)", until)? {
        Msg::Hello(ep) => ep,
        Msg::Done { status, errno, .. } => {
            return Err(step(errno, format!("client failed before connecting: {status}")));
        }
        other => return Err(unexpected(&other, "hello")),
    };
    rc.connect(&remote)?;
    wire.send(&Msg::Ready, until)?;
    match wire.recv("the client's done message", until)? {
        Msg::Done { ok: true, bytes, .. } if bytes == mr.len() as u64 => Ok(()),
        Msg::Done { ok: true, bytes, .. } => {
            Err(StepError::other(format!("client reported success but wrote {bytes} of {} bytes", mr.len())))
        }
        Msg::Done { status, errno, .. } => Err(step(errno, format!("client's RDMA WRITE failed: {status}"))),
        other => Err(unexpected(&other, "done")),
    }
}

fn unexpected(msg: &Msg, wanted: &str) -> StepError {
    StepError::errno(libc::EPROTO, format!("expected a {wanted} message on the side channel, got {msg:?}"))
}

// ---------------------------------------------------------------------------
// Client.

/// What the client did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientReport {
    /// The RDMA device used.
    pub device: String,
    /// Bytes written into the server's region (all of it).
    pub bytes: u64,
    /// RDMA WRITE work requests posted.
    pub chunks: u64,
    /// Bytes per work request (the last may be shorter).
    pub chunk_size: u64,
    /// From the first post to the last completion, in microseconds.
    pub elapsed_us: u64,
    /// From the TCP connect to the server's "ready", in microseconds.
    pub setup_us: u64,
    /// `bytes / elapsed` in MiB/s.
    pub mib_per_s: f64,
    /// Path MTU in bytes.
    pub path_mtu: u32,
    /// The local GID used, e.g. `rxe0[3]=::ffff:192.0.2.1 (RoCE v2)`.
    pub gid: String,
}

impl ClientReport {
    /// The write phase as a Duration.
    pub fn elapsed(&self) -> Duration {
        Duration::from_micros(self.elapsed_us)
    }
}

/// Client side of one RDMA WRITE (run it in a separate process from the
/// server): connect to `server`, open the device the server names, register
/// a buffer filled with the pattern, bring an RC QP to RTS, write the
/// server's whole region in chunks of at most [`MAX_CHUNK`] (each signaled,
/// each completion polled), and tell the server how it went. Everything is
/// bounded by `deadline`.
pub fn client_write(server: SocketAddr, deadline: Duration) -> anyhow::Result<ClientReport> {
    let t0 = Instant::now();
    let until = t0 + deadline;
    let stream = connect_until(server, until)?;
    let mut wire = Wire::new(stream)?;
    let hello = match wire.recv("the server's QP info (hello)", until)? {
        Msg::Hello(ep) => ep,
        Msg::Abort { reason, errno } => return Err(step(errno, format!("server aborted: {reason}")).into()),
        other => return Err(unexpected(&other, "hello").into()),
    };
    match client_run(&mut wire, &hello, t0, until) {
        Ok(report) => Ok(report),
        Err(e) => {
            let done = Msg::Done { ok: false, bytes: 0, status: e.message.clone(), errno: e.errno, elapsed_us: 0 };
            let _ = wire.send(&done, Instant::now() + Duration::from_secs(1));
            Err(e.into())
        }
    }
}

fn client_run(wire: &mut Wire, server: &Endpoint, t0: Instant, until: Instant) -> Result<ClientReport, StepError> {
    let len = usize::try_from(server.len)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| StepError::errno(libc::EPROTO, format!("server offered an unusable length {}", server.len)))?;
    let dev = Device::open(Some(&server.device)).map_err(|e| StepError::other(format!("{e:#}")))?;
    let mut buf = Region::anon(len).map_err(|e| step(e.errno, format!("client buffer: {}", e.message)))?;
    fill_pattern(buf.as_mut_slice());
    let mr = dev.reg_mr(buf.as_mut_ptr(), len).map_err(|e| step(e.errno, format!("client buffer: {}", e.message)))?;
    let mut rc = RcQp::new(&dev, SEND_DEPTH)?;
    wire.send(&Msg::Hello(rc.endpoint(None)), until)?;
    rc.connect(server)?;
    match wire.recv("the server's ready message", until)? {
        Msg::Ready => {}
        Msg::Abort { reason, errno } => return Err(step(errno, format!("server aborted: {reason}"))),
        other => return Err(unexpected(&other, "ready")),
    }
    let setup = t0.elapsed();
    let (_, path_mtu) = rc.path_mtu(server)?;
    let chunk = chunk_size(rc.max_msg);
    let started = Instant::now();
    let chunks = write_all(&mut rc, &mr, server, chunk, until)?;
    let elapsed = started.elapsed();
    let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    wire.send(
        &Msg::Done { ok: true, bytes: server.len, status: wc_status_name(0).to_string(), errno: None, elapsed_us },
        until,
    )?;
    let secs = elapsed.as_secs_f64();
    Ok(ClientReport {
        device: dev.name().to_string(),
        bytes: server.len,
        chunks,
        chunk_size: chunk as u64,
        elapsed_us,
        setup_us: u64::try_from(setup.as_micros()).unwrap_or(u64::MAX),
        mib_per_s: if secs > 0.0 { server.len as f64 / (1024.0 * 1024.0) / secs } else { 0.0 },
        path_mtu,
        gid: rc.gid_text.clone(),
    })
}

/// Bytes per RDMA WRITE: [`MAX_CHUNK`], or the port's max message size if
/// smaller (0 means "not reported").
fn chunk_size(max_msg: u32) -> usize {
    match max_msg as usize {
        0 => MAX_CHUNK,
        m => m.min(MAX_CHUNK),
    }
}

/// Post RDMA WRITEs covering the server's region, at most SEND_DEPTH in
/// flight, each signaled; poll every completion. Returns the number posted.
fn write_all(rc: &mut RcQp, mr: &Mr, server: &Endpoint, chunk: usize, until: Instant) -> Result<u64, StepError> {
    let len = mr.len();
    let n = len.div_ceil(chunk);
    let local = mr.addr() as u64;
    let (mut next, mut done, mut in_flight) = (0usize, 0usize, 0u32);
    let mut idle_polls = 0u32;
    while done < n {
        while in_flight < SEND_DEPTH && next < n {
            let off = next * chunk;
            let this = chunk.min(len - off);
            let this32 = u32::try_from(this).map_err(|_| StepError::other(format!("chunk {this} exceeds u32")))?;
            let remote = server.addr.wrapping_add(off as u64);
            let mut guard = rc.qp.start_post_send();
            let wr = guard.construct_wr(next as u64, WorkRequestFlags::Signaled).setup_write(server.rkey, remote);
            // SAFETY: local+off..+this lies inside the registered client
            // buffer, which outlives the QP's use of it (we poll every
            // completion before returning, and mr/buf outlive this call).
            unsafe { wr.setup_sge(mr.lkey(), local + off as u64, this32) };
            guard.post().map_err(|e| {
                let errno = post_send_errno(&e);
                step(
                    errno,
                    format!(
                        "ibv_post_send(RDMA_WRITE, wr {next}, local={:#x}, len={this}, remote={remote:#x}, rkey={:#x}): {e}",
                        local + off as u64,
                        server.rkey
                    ),
                )
            })?;
            next += 1;
            in_flight += 1;
        }
        match rc.cq.start_poll() {
            Ok(poller) => {
                idle_polls = 0;
                for wc in poller {
                    let status = wc.status();
                    if status != 0 {
                        let wr = wc.wr_id();
                        return Err(StepError::other(format!(
                            "RDMA WRITE wr {wr} (remote offset {}, of {n}) completed with {} ({status}), vendor_err={:#x}",
                            wr.saturating_mul(chunk as u64),
                            wc_status_name(status),
                            wc.vendor_err()
                        )));
                    }
                    done += 1;
                    in_flight = in_flight.saturating_sub(1);
                }
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => {
                if remaining(until).is_none() {
                    return Err(StepError::errno(
                        libc::ETIMEDOUT,
                        format!(
                            "timed out polling the CQ: {done} of {n} RDMA WRITEs completed ({in_flight} in flight)"
                        ),
                    ));
                }
                idle_polls += 1;
                if idle_polls < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            Err(e) => {
                let errno = match &e {
                    PollCompletionQueueError::Ibverbs(io) => io.raw_os_error(),
                    _ => None,
                };
                return Err(step(errno, format!("ibv_poll_cq: {e}")));
            }
        }
    }
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sideway::ibverbs::completion::WorkCompletionStatus;

    fn ep() -> Endpoint {
        Endpoint {
            device: "rxe0".into(),
            qpn: 0x11,
            psn: 0xabcdef,
            gid: "::ffff:192.0.2.1".parse().unwrap(),
            gid_index: 3,
            mtu: 1024,
            addr: 0x7f00_0000_0000,
            len: 2 << 20,
            rkey: 0x1234,
        }
    }

    #[test]
    fn messages_round_trip_as_json_lines() {
        let msgs = [
            Msg::Hello(ep()),
            Msg::Ready,
            Msg::Done { ok: false, bytes: 0, status: "IBV_WC_REM_ACCESS_ERR".into(), errno: Some(14), elapsed_us: 3 },
            Msg::Abort { reason: "x".into(), errno: None },
        ];
        for m in msgs {
            let line = encode(&m).unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(decode(&line).unwrap(), m);
        }
        let hello = String::from_utf8(encode(&Msg::Hello(ep())).unwrap()).unwrap();
        assert!(hello.starts_with(r#"{"msg":"hello","#), "{hello}");
        assert!(hello.contains(r#""gid":"::ffff:192.0.2.1""#), "{hello}");
    }

    #[test]
    fn bad_messages_are_eproto() {
        let e = decode(b"{\"msg\":\"nope\"}\n").unwrap_err();
        assert_eq!(e.errno, Some(libc::EPROTO));
        assert!(decode(b"garbage\n").is_err());
    }

    #[test]
    fn wire_talks_over_loopback_and_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        let t = std::thread::spawn(move || {
            let mut w = Wire::new(connect_until(addr, until).unwrap()).unwrap();
            let m = w.recv("hello", until).unwrap();
            w.send(&m, until).unwrap();
            // then go quiet until the peer gives up
            let _ = w.recv("nothing", Instant::now() + Duration::from_millis(500));
        });
        let mut w = Wire::new(accept_until(&l, until).unwrap()).unwrap();
        w.send(&Msg::Hello(ep()), until).unwrap();
        assert_eq!(w.recv("echo", until).unwrap(), Msg::Hello(ep()));
        let e = w.recv("silence", Instant::now() + Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.errno, Some(libc::ETIMEDOUT), "{e}");
        t.join().unwrap();
        let e = w.recv("after close", Instant::now() + Duration::from_secs(2)).unwrap_err();
        assert_eq!(e.errno, Some(libc::ECONNRESET), "{e}");
    }

    #[test]
    fn accept_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = accept_until(&l, Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.errno, Some(libc::ETIMEDOUT));
    }

    #[test]
    fn connect_retries_then_times_out() {
        // Bind then drop to get a (very likely) closed port.
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = connect_until(addr, Instant::now() + Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.errno, Some(libc::ETIMEDOUT), "{e}");
    }

    #[test]
    fn picks_roce_v2_ipv4_mapped_gid() {
        let g = |s: &str| s.parse::<Ipv6Addr>().unwrap().octets();
        let cands = [
            GidCandidate { index: 0, gid: g("fe80::1"), kind: GidKind::IbOrRoceV1 },
            GidCandidate { index: 1, gid: g("fe80::1"), kind: GidKind::RoceV2 },
            GidCandidate { index: 2, gid: g("::ffff:192.0.2.1"), kind: GidKind::IbOrRoceV1 },
            GidCandidate { index: 3, gid: g("::ffff:192.0.2.1"), kind: GidKind::RoceV2 },
        ];
        assert_eq!(choose_gid(&cands).map(|c| c.index), Some(3));
        assert!(choose_gid(&cands[..3]).is_none());
        assert!(describe_gids(&cands[..1]).contains("fe80::1"));
        assert_eq!(GidKind::from_sysfs("RoCE v2\n"), GidKind::RoceV2);
        assert_eq!(GidKind::from_sysfs("IB/RoCE v1\n"), GidKind::IbOrRoceV1);
    }

    #[test]
    fn mtus_and_chunks() {
        assert_eq!(mtu_from_ibv(Mtu::Mtu1024 as u32).map(|m| m.1), Some(1024));
        assert_eq!(mtu_from_ibv(0), None);
        assert_eq!(mtu_from_bytes(4096), Some(Mtu::Mtu4096));
        assert_eq!(mtu_from_bytes(1500), None);
        assert_eq!(chunk_size(0), MAX_CHUNK);
        assert_eq!(chunk_size(u32::MAX), MAX_CHUNK);
        assert_eq!(chunk_size(4096), 4096);
    }

    #[test]
    fn wc_status_names_match_libibverbs() {
        assert_eq!(wc_status_name(WorkCompletionStatus::Success as u32), "IBV_WC_SUCCESS");
        assert_eq!(wc_status_name(WorkCompletionStatus::RemoteAccessError as u32), "IBV_WC_REM_ACCESS_ERR");
        assert_eq!(wc_status_name(WorkCompletionStatus::RetryCounterExceededError as u32), "IBV_WC_RETRY_EXC_ERR");
        assert_eq!(wc_status_name(WorkCompletionStatus::GeneralError as u32), "IBV_WC_GENERAL_ERR");
        assert_eq!(wc_status_name(999), "IBV_WC_<unknown>");
    }

    #[test]
    fn pattern_fill_and_check() {
        let mut b = vec![0u8; 3 * 4096 + 7];
        fill_pattern(&mut b);
        assert_eq!(first_pattern_mismatch(&b), None);
        b[5000] ^= 1;
        let (off, _, _) = first_pattern_mismatch(&b).unwrap();
        assert_eq!(off, 5000);
    }
}
