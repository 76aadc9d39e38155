//! An opened RDMA device (verbs context + protection domain), its port and
//! GIDs, and memory regions registered on it.

use std::ffi::c_void;
use std::io;
use std::net::Ipv6Addr;
use std::ops::Range;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use sideway::ibverbs::address::Gid;
use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListErrorKind, OpenDeviceErrorKind};
use sideway::ibverbs::device_context::{
    AllocateProtectionDomainErrorKind, DeviceContext, Mtu, PortState, QueryPortErrorKind,
};
use sideway::ibverbs::protection_domain::ProtectionDomain;

use super::verbs::{raw_verbs, DeregMrFn, RawIbvMr, RawVerbs};
use super::{io_text, mr_access, mr_access_read_only, step, MR_ACCESS_READ_ONLY_TEXT, MR_ACCESS_TEXT, PORT};
use crate::region::Region;
use crate::StepError;

/// An opened RDMA device: its verbs context and one protection domain.
pub struct Device {
    pub(super) name: String,
    pub(super) ctx: Arc<DeviceContext>,
    pub(super) pd: Arc<ProtectionDomain>,
    verbs: RawVerbs,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Load libibverbs and the device providers into this process without
/// opening any device, so that processes forked from it later open one
/// without loading them again. Returns the devices' names.
pub fn preload() -> anyhow::Result<Vec<String>> {
    let list = DeviceList::new().map_err(|e| anyhow::anyhow!("ibv_get_device_list: {e}"))?;
    raw_verbs().map_err(anyhow::Error::msg)?;
    Ok(list.iter().map(|d| d.name()).collect())
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

    /// `ibv_reg_mr(pd, addr, len, IBV_ACCESS_LOCAL_WRITE|IBV_ACCESS_REMOTE_WRITE|IBV_ACCESS_REMOTE_READ)`
    /// on the bytes `range` of `region`.
    ///
    /// A range that is not inside the region is refused with `EINVAL` before
    /// any call. On failure the error carries the errno `ibv_reg_mr` left
    /// (the kernel's answer: `EOPNOTSUPP`, `EPERM`, `EFAULT`, ...), read
    /// right after the call. The MR does not borrow the region: the kernel
    /// holds its own page pins, and scenarios unmap registered memory on
    /// purpose; whoever uses the MR remotely keeps the region mapped.
    pub fn reg_mr(&self, region: &Region, range: Range<usize>) -> Result<Mr, StepError> {
        self.reg_mr_with(region, range, false)
    }

    /// [`Device::reg_mr`] with `IBV_ACCESS_REMOTE_READ` only when
    /// `read_only`: the kernel then pins the pages without write intent.
    pub fn reg_mr_with(&self, region: &Region, range: Range<usize>, read_only: bool) -> Result<Mr, StepError> {
        let (access, access_text) =
            if read_only { (mr_access_read_only(), MR_ACCESS_READ_ONLY_TEXT) } else { (mr_access(), MR_ACCESS_TEXT) };
        let Some((addr, len)) = span(region, &range) else {
            return Err(StepError::errno(
                libc::EINVAL,
                format!(
                    "ibv_reg_mr({}, bytes {}..{} of a {}-byte region): the range is not inside the region",
                    self.name,
                    range.start,
                    range.end,
                    region.len()
                ),
            ));
        };
        let what = format!("ibv_reg_mr({}, addr={addr:p}, len={len}, {access_text})", self.name);
        // SAFETY: pd() is the live PD of this device (kept alive by self.pd).
        let pd = unsafe { self.pd.pd() }.as_ptr().cast::<c_void>();
        nix::errno::Errno::clear();
        // SAFETY: addr..addr+len lies inside region's live mapping (checked
        // by span); ibv_reg_mr only reads pd and asks the kernel to pin that
        // user range, which it validates itself (answering with an errno).
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

    pub(super) fn port_attr(&self) -> Result<PortInfo, StepError> {
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
    pub(super) fn pick_gid(&self, tbl_len: i32) -> Result<(u8, Gid, String), StepError> {
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

/// What [`Device::port_attr`] reports of [`PORT`].
pub(super) struct PortInfo {
    pub(super) state: u32,
    pub(super) active_mtu: u32,
    pub(super) max_msg_sz: u32,
    pub(super) gid_tbl_len: i32,
}

/// `IBV_PORT_ACTIVE`.
pub(super) const PORT_ACTIVE: u32 = PortState::Active as u32;

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
pub(super) fn mtu_from_ibv(v: u32) -> Option<(Mtu, u32)> {
    [(Mtu::Mtu256, 256), (Mtu::Mtu512, 512), (Mtu::Mtu1024, 1024), (Mtu::Mtu2048, 2048), (Mtu::Mtu4096, 4096)]
        .into_iter()
        .find(|(m, _)| *m as u32 == v)
}

pub(super) fn mtu_from_bytes(b: u32) -> Option<Mtu> {
    [(Mtu::Mtu256, 256), (Mtu::Mtu512, 512), (Mtu::Mtu1024, 1024), (Mtu::Mtu2048, 2048), (Mtu::Mtu4096, 4096)]
        .into_iter()
        .find(|(_, n)| *n == b)
        .map(|(m, _)| m)
}

/// The address and length of the bytes `range` of `region`, if they lie
/// inside it.
fn span(region: &Region, range: &Range<usize>) -> Option<(*mut u8, usize)> {
    if range.start > range.end || range.end > region.len() {
        return None;
    }
    Some((region.as_mut_ptr().wrapping_add(range.start), range.end - range.start))
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn mtus() {
        assert_eq!(mtu_from_ibv(Mtu::Mtu1024 as u32).map(|m| m.1), Some(1024));
        assert_eq!(mtu_from_ibv(0), None);
        assert_eq!(mtu_from_bytes(4096), Some(Mtu::Mtu4096));
        assert_eq!(mtu_from_bytes(1500), None);
    }

    #[test]
    fn registrations_stay_inside_the_region() {
        let r = Region::anon(4 * 4096).unwrap();
        let base = r.as_mut_ptr();
        assert_eq!(span(&r, &(0..r.len())), Some((base, 4 * 4096)));
        assert_eq!(span(&r, &(4096..8192)), Some((base.wrapping_add(4096), 4096)));
        assert_eq!(span(&r, &(r.len()..r.len())).map(|s| s.1), Some(0));
        assert_eq!(span(&r, &(0..r.len() + 1)), None);
        assert_eq!(span(&r, &Range { start: 8192, end: 4096 }), None);
        assert_eq!(span(&r, &(usize::MAX..usize::MAX)), None);
    }
}
