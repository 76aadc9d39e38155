//! Where the NIC's bytes landed, and the files the hazard scenarios need.
//!
//! [`locate`] reads the whole fsdax namespace raw (`O_DIRECT` on the pmem
//! block device: no page cache between it and the media) and finds every
//! 4 KiB block that carries the client's pattern, then asks the filesystem
//! which file owns each block (FIEMAP of every file on the mount). The
//! answer is data: blocks per owning file, `free` for blocks no file owns.

use crate::region::Region;
use crate::StepError;
use pinlab_scenarios::plan::{pattern_block_index, CloneKind};
use pinlab_scenarios::results::{blocks_in, placement_text, runs_of, Located};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A filesystem block, as the oracle counts them.
pub const BLOCK: usize = 4096;
/// The file `fill` creates.
pub const FILLER: &str = "filler.dat";
/// Bytes per read() of the namespace or a file being checked: few system
/// calls, and long runs for the comparisons.
const READ_CHUNK: usize = 8 << 20;

fn io(e: std::io::Error, what: String) -> StepError {
    StepError::io(&e, what)
}

/// One extent of a file on the device: `[start, end)` in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Device offset of the first byte.
    pub start: u64,
    /// Device offset after the last byte.
    pub end: u64,
}

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `struct fiemap` is 32 bytes, each `struct fiemap_extent` 56.
const FIEMAP_HDR: usize = 32;
const FIEMAP_EXT: usize = 56;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_FLAG_SYNC: u32 = 0x1;

/// The device extents of `path` (FIEMAP, synced first).
pub fn extents(path: &Path) -> Result<Vec<Extent>, StepError> {
    let f = File::open(path).map_err(|e| io(e, format!("open({})", path.display())))?;
    let mut out = Vec::new();
    let mut start = 0u64;
    const BATCH: usize = 256;
    loop {
        // u64 words keep the buffer 8-byte aligned, as struct fiemap needs.
        let mut buf = vec![0u64; (FIEMAP_HDR + BATCH * FIEMAP_EXT) / 8];
        {
            let b: &mut [u8] = bytemuck_u8(&mut buf);
            b[0..8].copy_from_slice(&start.to_ne_bytes()); // fm_start
            b[8..16].copy_from_slice(&(u64::MAX - start).to_ne_bytes()); // fm_length
            b[16..20].copy_from_slice(&FIEMAP_FLAG_SYNC.to_ne_bytes()); // fm_flags
            b[24..28].copy_from_slice(&(BATCH as u32).to_ne_bytes()); // fm_extent_count
        }
        // SAFETY: `buf` is a struct fiemap header followed by room for
        // fm_extent_count (BATCH) extents, 8-byte aligned, and lives across
        // the call; the kernel writes at most that many extents.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP as _, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(StepError::last_os(format!("ioctl({}, FS_IOC_FIEMAP)", path.display())));
        }
        let b: &[u8] = bytemuck_u8(&mut buf);
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let mapped = u32_at(20) as usize;
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for i in 0..mapped.min(BATCH) {
            let e = FIEMAP_HDR + i * FIEMAP_EXT;
            let (logical, physical, length, flags) = (u64_at(e), u64_at(e + 8), u64_at(e + 16), u32_at(e + 40));
            out.push(Extent { start: physical, end: physical + length });
            start = logical + length;
            last |= flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    Ok(out)
}

/// View a `u64` buffer as bytes.
fn bytemuck_u8(v: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(v);
    // SAFETY: u8 has no alignment or validity requirements, the length is
    // the same bytes, and the borrow of `v` is carried by the result.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len) }
}

/// `open(path, O_RDWR)`, as the ioctls that move blocks between two files need.
fn open_rw(p: &Path) -> Result<File, StepError> {
    OpenOptions::new().read(true).write(true).open(p).map_err(|e| io(e, format!("open({}, O_RDWR)", p.display())))
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&e.path(), out),
            Ok(t) if t.is_file() => out.push(e.path()),
            _ => {}
        }
    }
}

/// Where `device`'s byte 0 sits in its NVDIMM: the fsdax (pfn) device's
/// data start minus its region's start, both from sysfs. `None` when sysfs
/// does not say.
pub fn nvdimm_offset(device: &str) -> Option<u64> {
    let name = Path::new(device).file_name()?.to_str()?;
    // /sys/block/pmem0/device -> .../pfn0.1 (fsdax), whose parent is the region.
    let dev = std::fs::canonicalize(format!("/sys/block/{name}/device")).ok()?;
    let hex = |p: &Path| {
        let s = std::fs::read_to_string(p).ok()?;
        u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
    };
    let data = hex(&dev.join("resource"))?;
    let region = dev.parent()?;
    let start = hex(&region.join("resource"))?;
    data.checked_sub(start)
}

/// Find the pattern (`seed`) of a region of `len` bytes on `device` and say
/// which file under `mount` owns each block carrying it.
pub fn locate(device: &str, mount: &Path, len: usize, seed: u64) -> Result<(String, Located), StepError> {
    let blocks = len.div_ceil(BLOCK) as u64;
    let mut dev = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| io(e, format!("open({device}, O_DIRECT)")))?;
    // O_DIRECT needs an aligned buffer: a page-aligned anonymous mapping.
    let mut buf = Region::anon(READ_CHUNK)?;
    let mut found: Vec<u64> = Vec::new();
    let mut off = 0u64;
    loop {
        let n = dev.read(buf.as_mut_slice()).map_err(|e| io(e, format!("read({device}) at {off}")))?;
        if n == 0 {
            break;
        }
        let data = &buf.as_slice()[..n];
        for (i, blk) in data.chunks_exact(BLOCK).enumerate() {
            if pattern_block_index(seed, blocks, blk).is_some() {
                found.push(off / BLOCK as u64 + i as u64);
            }
        }
        off += n as u64;
    }
    let mut files = Vec::new();
    files_under(mount, &mut files);
    files.sort();
    let b = BLOCK as u64;
    let mut owners = BTreeMap::new();
    for f in files {
        let name = f.strip_prefix(mount).unwrap_or(&f).display().to_string();
        let runs = extents(&f)?.iter().flat_map(|e| e.start / b..e.end.div_ceil(b)).collect::<Vec<_>>();
        owners.insert(name, runs_of(runs));
    }
    let located = Located {
        device: device.to_string(),
        device_bytes: off,
        nvdimm_offset: nvdimm_offset(device),
        seed,
        region_blocks: blocks,
        nic: runs_of(found),
        owners,
        host: None,
    };
    let detail = format!(
        "read {device} raw ({} MiB, O_DIRECT): {} blocks carry the client's pattern (a {} KiB region is {blocks} \
         blocks); owners: {}",
        off >> 20,
        blocks_in(&located.nic),
        len / 1024,
        placement_text(&located.placement())
    );
    Ok((detail, located))
}

/// The lease kinds `/proc/locks` lists for inode `ino`, in order, from
/// lines such as `1: LAYOUT ACTIVE READ 123 fe:00:131 0 EOF`.
pub fn leases_on(proc_locks: &str, ino: u64) -> Vec<String> {
    proc_locks
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // "N:" kind state type pid maj:min:ino start end ("->" lines are waiters).
            let kind = *w.get(1)?;
            let dev_ino = w.iter().find(|x| x.matches(':').count() == 2)?;
            let i: u64 = dev_ino.rsplit(':').next()?.parse().ok()?;
            (i == ino && matches!(kind, "LAYOUT" | "LEASE" | "DELEG")).then(|| kind.to_string())
        })
        .collect()
}

/// `check_locks`: the leases `/proc/locks` shows on `file` are `expect`.
pub fn check_locks(file: &Path, expect: &[String]) -> Result<String, StepError> {
    let ino = std::fs::metadata(file).map_err(|e| io(e, format!("stat({})", file.display())))?;
    let ino = std::os::unix::fs::MetadataExt::ino(&ino);
    let text = std::fs::read_to_string("/proc/locks").map_err(|e| io(e, "read /proc/locks".into()))?;
    let got = leases_on(&text, ino);
    let shown: Vec<&str> =
        text.lines().filter(|l| l.split_whitespace().any(|w| w.ends_with(&format!(":{ino}")))).collect();
    let shown = if shown.is_empty() { "no line for it".to_string() } else { shown.join(" | ") };
    if got == expect {
        Ok(format!("/proc/locks on {} (inode {ino}): {got:?}: '{shown}'", file.display()))
    } else {
        Err(StepError::mismatch(format!(
            "mismatch: /proc/locks on {} (inode {ino}) shows {got:?}, expected {expect:?}: '{shown}'",
            file.display()
        )))
    }
}

const FICLONE: libc::c_ulong = 0x4004_9409;
const FICLONERANGE: libc::c_ulong = 0x4020_940D;
const FIDEDUPERANGE: libc::c_ulong = 0xC018_9436;
/// The length `FICLONERANGE` and `FIDEDUPERANGE` share.
const CLONE_LEN: u64 = 2 << 20;

/// `clone`: share `from`'s blocks with `to` with one of the reflink ioctls.
pub fn clone(kind: CloneKind, from: &Path, to: &Path) -> Result<String, StepError> {
    let (src, dst) = (open_rw(from)?, open_rw(to)?);
    let what = format!("ioctl({}, {}, {})", to.display(), kind.name(), from.display());
    let t = std::time::Instant::now();
    let rc = match kind {
        // SAFETY: FICLONE takes the source descriptor as its argument.
        CloneKind::Ficlone => unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) },
        CloneKind::Ficlonerange => {
            // struct file_clone_range: src_fd, src_offset, src_length, dest_offset.
            let range: [u64; 4] = [src.as_raw_fd() as u64, 0, CLONE_LEN, 0];
            // SAFETY: `range` is a struct file_clone_range that the kernel
            // only reads, alive across the call.
            unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE as _, range.as_ptr()) }
        }
        CloneKind::Dedupe => {
            // struct file_dedupe_range (src_offset, src_length, dest_count,
            // 2 reserved) + one file_dedupe_range_info (dest_fd,
            // dest_offset, bytes_deduped, status, reserved).
            let mut buf = [0u64; 3 + 4];
            buf[1] = CLONE_LEN;
            buf[2] = 1; // dest_count = 1 (u16), reserved = 0
            buf[3] = dst.as_raw_fd() as u64;
            // SAFETY: `buf` is a file_dedupe_range with room for the one
            // info record it announces; the kernel writes only that record.
            let rc = unsafe { libc::ioctl(src.as_raw_fd(), FIDEDUPERANGE as _, buf.as_mut_ptr()) };
            if rc == 0 {
                let status = (buf[6] & 0xffff_ffff) as u32 as i32;
                return match status {
                    0 => Ok(format!("{what}: {} bytes deduplicated in {} us", buf[5], t.elapsed().as_micros())),
                    1 => Err(StepError::mismatch(format!("{what}: FILE_DEDUPE_RANGE_DIFFERS (the data differs)"))),
                    e if e < 0 => {
                        Err(StepError::errno(-e, format!("{what}: status {}", nix::errno::Errno::from_raw(-e))))
                    }
                    other => Err(StepError::other(format!("{what}: unknown status {other}"))),
                };
            }
            rc
        }
    };
    if rc < 0 {
        return Err(StepError::last_os(what));
    }
    Ok(format!("{what} = 0 in {} us", t.elapsed().as_micros()))
}

const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801C_581F;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401C_5820;
const FS_XFLAG_DAX: u32 = 0x8000;
/// `XFS_IOC_EXCHANGE_RANGE`: `_IOW('X', 129, struct xfs_exchange_range)` (40 bytes).
const XFS_IOC_EXCHANGE_RANGE: libc::c_ulong = 0x4028_5881;

/// `dax_flag`: set or clear `FS_XFLAG_DAX` on directory `dir`.
pub fn dax_flag(dir: &Path, on: bool) -> Result<String, StepError> {
    let d = File::open(dir).map_err(|e| io(e, format!("open({})", dir.display())))?;
    // struct fsxattr: fsx_xflags first, 28 bytes in all.
    let mut fsx = [0u32; 7];
    // SAFETY: `fsx` is a struct fsxattr-sized, 4-aligned buffer alive across the call.
    if unsafe { libc::ioctl(d.as_raw_fd(), FS_IOC_FSGETXATTR as _, fsx.as_mut_ptr()) } < 0 {
        return Err(StepError::last_os(format!("ioctl({}, FS_IOC_FSGETXATTR)", dir.display())));
    }
    fsx[0] = if on { fsx[0] | FS_XFLAG_DAX } else { fsx[0] & !FS_XFLAG_DAX };
    // SAFETY: as above; the kernel only reads it.
    if unsafe { libc::ioctl(d.as_raw_fd(), FS_IOC_FSSETXATTR as _, fsx.as_ptr()) } < 0 {
        return Err(StepError::last_os(format!("ioctl({}, FS_IOC_FSSETXATTR)", dir.display())));
    }
    Ok(format!(
        "FS_XFLAG_DAX {} on {}: new files in it are{} DAX",
        if on { "set" } else { "cleared" },
        dir.display(),
        if on { "" } else { " not" }
    ))
}

/// Whether `path` is DAX now (`STATX_ATTR_DAX`), for messages.
fn dax_word(path: &Path) -> &'static str {
    match crate::region::path_is_dax(path) {
        Ok(true) => "DAX",
        Ok(false) => "not DAX",
        Err(_) => "DAX unknown",
    }
}

/// `exchange_range`: `XFS_IOC_EXCHANGE_RANGE` of the first 2 MiB of `file`
/// and `with` (the ioctl goes to `file`, `with` is file1).
pub fn exchange_range(file: &Path, with: &Path) -> Result<String, StepError> {
    let (f2, f1) = (open_rw(file)?, open_rw(with)?);
    let kinds = format!("{} is {}, {} is {}", file.display(), dax_word(file), with.display(), dax_word(with));
    // struct xfs_exchange_range: file1_fd (s32) + pad, file1_offset,
    // file2_offset, length, flags.
    let args: [u64; 5] = [f1.as_raw_fd() as u32 as u64, 0, 0, 2 << 20, 0];
    // SAFETY: `args` is a struct xfs_exchange_range the kernel only reads.
    if unsafe { libc::ioctl(f2.as_raw_fd(), XFS_IOC_EXCHANGE_RANGE as _, args.as_ptr()) } < 0 {
        let e = StepError::last_os(format!(
            "ioctl({}, XFS_IOC_EXCHANGE_RANGE, with {}) ({kinds})",
            file.display(),
            with.display()
        ));
        return Err(e);
    }
    Ok(format!("XFS_IOC_EXCHANGE_RANGE exchanged 2 MiB of {} and {} ({kinds})", file.display(), with.display()))
}

/// `XFS_IOC_SWAPEXT`: `_IOWR('X', 109, struct xfs_swapext)` (192 bytes).
const XFS_IOC_SWAPEXT: libc::c_ulong = 0xC0C0_586D;
/// `XFS_IOC_FSBULKSTAT_SINGLE`: `_IOWR('X', 102, struct xfs_fsop_bulkreq)`.
const XFS_IOC_FSBULKSTAT_SINGLE: libc::c_ulong = 0xC020_5866;
/// `struct xfs_swapext`: version, fdtarget, fdtmp, offset, length at 0, 8,
/// 16, 24, 32; the target's `struct xfs_bstat` (136 bytes) at 56.
const SWAPEXT_SIZE: usize = 192;
const SWAPEXT_STAT: usize = 56;

/// `swapext`: what `xfs_fsr` does to defragment a file: swap every extent
/// of `target` with those of `tmp` (same size) in one transaction. The
/// kernel checks that `target` did not change since its bulkstat, so that
/// is taken first.
pub fn swapext(target: &Path, tmp: &Path) -> Result<String, StepError> {
    let (t, x) = (open_rw(target)?, open_rw(tmp)?);
    let meta = t.metadata().map_err(|e| io(e, format!("fstat({})", target.display())))?;
    let mut sx = vec![0u64; SWAPEXT_SIZE / 8];
    let mut ino: u64 = std::os::unix::fs::MetadataExt::ino(&meta);
    let mut count: i32 = 0;
    {
        let b = bytemuck_u8(&mut sx);
        let stat = b[SWAPEXT_STAT..].as_mut_ptr();
        // struct xfs_fsop_bulkreq: lastip, icount (s32, padded), ubuffer, ocount.
        let mut req = [0u64; 4];
        req[0] = std::ptr::addr_of_mut!(ino) as u64;
        req[1] = 1;
        req[2] = stat as u64;
        req[3] = std::ptr::addr_of_mut!(count) as u64;
        // SAFETY: `req` is a struct xfs_fsop_bulkreq whose pointers name
        // `ino`, the 136-byte xfs_bstat slot inside `sx` and `count`, all
        // alive across the call; the kernel writes one xfs_bstat at most.
        let rc = unsafe { libc::ioctl(t.as_raw_fd(), XFS_IOC_FSBULKSTAT_SINGLE as _, req.as_mut_ptr()) };
        if rc < 0 {
            return Err(StepError::last_os(format!("ioctl({}, XFS_IOC_FSBULKSTAT_SINGLE)", target.display())));
        }
    }
    {
        let b = bytemuck_u8(&mut sx);
        let put = |b: &mut [u8], at: usize, v: i64| b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        put(b, 0, 0); // XFS_SX_VERSION
        put(b, 8, i64::from(t.as_raw_fd()));
        put(b, 16, i64::from(x.as_raw_fd()));
        put(b, 24, 0);
        put(b, 32, meta.len() as i64);
    }
    // SAFETY: `sx` is a 192-byte, 8-aligned struct xfs_swapext (filled above)
    // that lives across the call.
    let rc = unsafe { libc::ioctl(t.as_raw_fd(), XFS_IOC_SWAPEXT as _, sx.as_mut_ptr()) };
    if rc < 0 {
        return Err(StepError::last_os(format!(
            "ioctl({}, XFS_IOC_SWAPEXT, with {})",
            target.display(),
            tmp.display()
        )));
    }
    Ok(format!(
        "XFS_IOC_SWAPEXT swapped all {} bytes of extents between {} and {}",
        meta.len(),
        target.display(),
        tmp.display()
    ))
}

/// `EXT4_IOC_MOVE_EXT`: `_IOWR('f', 15, struct move_extent)` (40 bytes).
const EXT4_IOC_MOVE_EXT: u64 = 0xC028_660F;
/// `EXT4_IOC_SWAP_BOOT`: `_IO('f', 17)`.
const EXT4_IOC_SWAP_BOOT: u64 = 0x6611;

/// `move_ext`: what `e4defrag` does: `EXT4_IOC_MOVE_EXT` on `orig` with
/// `donor` as the donor, over all of `donor`'s 4 KiB blocks, so the donor's
/// blocks end up in `orig`.
pub fn move_ext(donor: &Path, orig: &Path) -> Result<String, StepError> {
    let (d, o) = (open_rw(donor)?, open_rw(orig)?);
    let len = d.metadata().map_err(|e| io(e, format!("fstat({})", donor.display())))?.len();
    // struct move_extent: reserved (u32), donor_fd (u32), orig_start,
    // donor_start, len (u64, in filesystem blocks), moved_len (u64, out).
    let mut me = [0u64; 5];
    me[0] = (d.as_raw_fd() as u32 as u64) << 32;
    me[3] = len / 4096;
    // SAFETY: `me` is a 40-byte, 8-aligned struct move_extent (little-endian:
    // reserved in the low half of the first word, donor_fd in the high half)
    // that lives across the call; the kernel writes moved_len into it.
    let rc = unsafe { libc::ioctl(o.as_raw_fd(), EXT4_IOC_MOVE_EXT as _, me.as_mut_ptr()) };
    if rc < 0 {
        return Err(StepError::last_os(format!(
            "ioctl({}, EXT4_IOC_MOVE_EXT, donor {})",
            orig.display(),
            donor.display()
        )));
    }
    Ok(format!(
        "EXT4_IOC_MOVE_EXT moved {} of {} blocks from {} into {}",
        me[4],
        me[3],
        donor.display(),
        orig.display()
    ))
}

/// `swap_boot`: `EXT4_IOC_SWAP_BOOT` on `file`: its blocks and the boot
/// loader inode's (inode 5) change places.
pub fn swap_boot(file: &Path) -> Result<String, StepError> {
    let f = open_rw(file)?;
    // SAFETY: EXT4_IOC_SWAP_BOOT takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), EXT4_IOC_SWAP_BOOT as _, 0) };
    if rc < 0 {
        return Err(StepError::last_os(format!("ioctl({}, EXT4_IOC_SWAP_BOOT)", file.display())));
    }
    Ok(format!("EXT4_IOC_SWAP_BOOT swapped the blocks of {} with the boot loader inode's", file.display()))
}

/// `fill`: fallocate every free block into `FILLER`. Several passes, each
/// after a sync: blocks freed by earlier scenarios are busy until the
/// journal commits (xfs busy extents, ext4's freed-data list), and closing
/// the file drops its preallocation (ext4), which frees blocks again.
pub fn fill(mount: &Path) -> Result<String, StepError> {
    let p = mount.join(FILLER);
    let mut total = 0i64;
    for pass in 0..6 {
        nix::unistd::sync();
        let f = OpenOptions::new()
            .create(true)
            .truncate(pass == 0)
            .write(true)
            .open(&p)
            .map_err(|e| io(e, format!("open({})", p.display())))?;
        let before = total;
        let mut step: i64 = 64 << 20;
        while step >= BLOCK as i64 {
            match nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), total, step) {
                Ok(()) => total += step,
                Err(nix::errno::Errno::ENOSPC) => step /= 2,
                Err(e) => return Err(StepError::sys(e, format!("fallocate({}, {total}, {step})", p.display()))),
            }
        }
        f.sync_all().map_err(|e| io(e, format!("fsync({})", p.display())))?;
        drop(f);
        if total == before && pass > 0 {
            break;
        }
    }
    nix::unistd::sync();
    let st =
        nix::sys::statvfs::statvfs(mount).map_err(|e| StepError::sys(e, format!("statvfs({})", mount.display())))?;
    Ok(format!(
        "{} holds {} MiB; {} blocks of {} bytes left free ({} for root)",
        p.display(),
        total >> 20,
        st.blocks_available(),
        st.fragment_size(),
        st.blocks_free()
    ))
}

/// `create_file`: `name` with `size` bytes of `byte` (or, with `None`, as
/// many as fit: every block the filesystem will still give), written and
/// fsynced. A file that could not be written is removed.
pub fn create_file(mount: &Path, name: &str, size: Option<usize>, byte: u8) -> Result<String, StepError> {
    let p = mount.join(name);
    // Blocks freed by a truncate become allocatable once its transaction
    // commits (ext4 keeps freed data blocks busy until then, xfs too).
    nix::unistd::sync();
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&p)
        .map_err(|e| io(e, format!("open({})", p.display())))?;
    let fail = |f: File, e: std::io::Error, what: String| {
        drop(f);
        let _ = std::fs::remove_file(&p);
        Err(io(e, what))
    };
    let mut written = 0usize;
    match size {
        Some(n) => {
            if let Err(e) = f.write_all(&vec![byte; n]) {
                return fail(f, e, format!("write({}, {n} bytes)", p.display()));
            }
            written = n;
        }
        None => {
            let chunk = vec![byte; 1 << 20];
            let mut piece = chunk.len();
            while piece >= BLOCK {
                match f.write(&chunk[..piece]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => piece /= 2,
                    Err(e) => return fail(f, e, format!("write({}) at {written}", p.display())),
                }
            }
            if written == 0 {
                return fail(f, std::io::Error::from_raw_os_error(libc::ENOSPC), format!("write({})", p.display()));
            }
        }
    }
    if let Err(e) = f.sync_all() {
        return fail(f, e, format!("fsync({})", p.display()));
    }
    drop(f);
    let ex = extents(&p)?;
    let shown: Vec<String> =
        ex.iter().map(|e| format!("{}..{}", e.start / BLOCK as u64, e.end / BLOCK as u64)).collect();
    Ok(format!("{} = {written} bytes of {byte:#04x}; blocks {}", p.display(), shown.join(", ")))
}

/// `check_file`: every byte of `name` is still `byte` (read in chunks: the
/// victim may be as large as the filesystem); blocks that are not are
/// checked for the scenario's pattern (`seed`).
pub fn check_file(mount: &Path, name: &str, byte: u8, seed: u64) -> Result<String, StepError> {
    let p = mount.join(name);
    let mut f = File::open(&p).map_err(|e| io(e, format!("open({})", p.display())))?;
    let mut buf = vec![0u8; READ_CHUNK];
    // What every chunk should be: comparing slices is one memcmp (vectorised
    // in libc), where a byte-by-byte loop costs seconds per GiB under TCG.
    let want = vec![byte; READ_CHUNK];
    let (mut len, mut other, mut first, mut pattern_blocks) = (0usize, 0usize, None, 0usize);
    loop {
        let n = f.read(&mut buf).map_err(|e| io(e, format!("read({}) at {len}", p.display())))?;
        if n == 0 {
            break;
        }
        if buf[..n] == want[..n] {
            len += n;
            continue;
        }
        for (i, blk) in buf[..n].chunks(BLOCK).enumerate() {
            if *blk == want[..blk.len()] {
                continue;
            }
            let off = len + i * BLOCK;
            let bad = blk.iter().filter(|b| **b != byte).count();
            other += bad;
            if first.is_none() {
                let j = blk.iter().position(|b| *b != byte).unwrap_or(0);
                first = Some((off + j, blk[j]));
            }
            if pattern_block_index(seed, u64::MAX, blk).is_some() {
                pattern_blocks += 1;
            }
        }
        len += n;
    }
    let Some((at, got)) = first else {
        return Ok(format!("read() of {}: all {len} bytes are still {byte:#04x}", p.display()));
    };
    Err(StepError::mismatch(format!(
        "read() of {}: {other} of {len} bytes are no longer {byte:#04x} (first at offset {at}: {got:#04x}); \
         {pattern_blocks} of its {} blocks hold the RDMA client's pattern",
        p.display(),
        len.div_ceil(BLOCK)
    )))
}

/// `sysctl`: write `value` to /proc/sys/NAME; returns the old value.
pub fn sysctl(name: &str, value: &str) -> Result<(String, String), StepError> {
    let p = Path::new("/proc/sys").join(name.replace('.', "/"));
    let old = std::fs::read_to_string(&p).map_err(|e| io(e, format!("read {}", p.display())))?;
    std::fs::write(&p, value).map_err(|e| io(e, format!("write {value} to {}", p.display())))?;
    Ok((old.trim().to_string(), format!("{} = {value} (was {})", p.display(), old.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines() {
        let t = "1: LAYOUT ACTIVE    READ 123 fe:00:131 0 EOF\n2: POSIX  ADVISORY  WRITE 9 fe:00:131 0 EOF\n\
                 3: LEASE  BREAKING  READ 7 fe:00:99 0 EOF\n3: -> LEASE  BREAKER   UNLCK 8 fe:00:99 0 EOF\n";
        assert_eq!(leases_on(t, 131), vec!["LAYOUT"]);
        assert_eq!(leases_on(t, 99), vec!["LEASE"]);
        assert!(leases_on(t, 5).is_empty());
    }

    #[test]
    fn fiemap_of_a_real_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![1u8; 3 * BLOCK]).unwrap();
        // tmpfs has no FIEMAP; any other filesystem reports the file's bytes.
        match extents(&p) {
            Ok(ex) => assert!(ex.iter().map(|e| e.end - e.start).sum::<u64>() >= 3 * BLOCK as u64, "{ex:?}"),
            Err(e) => assert_eq!(e.failure.errno(), Some(libc::EOPNOTSUPP), "{e}"),
        }
    }

    #[test]
    fn check_file_names_the_pattern() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("v"), vec![0x5a; 2 * BLOCK]).unwrap();
        let seed = pinlab_scenarios::plan::pattern_seed("S20");
        assert!(check_file(d.path(), "v", 0x5a, seed).is_ok());
        // Block 7 of this scenario's region, then block 7 of another scenario's.
        let mut data = vec![0x5a; BLOCK];
        let mut region = vec![0u8; 8 * BLOCK];
        pinlab_scenarios::plan::fill_pattern(seed, 0, &mut region);
        data.extend(&region[7 * BLOCK..]);
        pinlab_scenarios::plan::fill_pattern(pinlab_scenarios::plan::pattern_seed("S05"), 0, &mut region);
        data.extend(&region[7 * BLOCK..]);
        std::fs::write(d.path().join("v"), data).unwrap();
        let e = check_file(d.path(), "v", 0x5a, seed).unwrap_err();
        assert!(e.message.contains("1 of its 3 blocks hold the RDMA client's pattern"), "{}", e.message);
    }
}
