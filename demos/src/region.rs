//! Memory regions to register with the RDMA device: anonymous shared memory,
//! a `MAP_SHARED` mapping of a (possibly FS-DAX) file, or a device-DAX
//! character device.
//!
//! Every failure is a [`StepError`] carrying the errno of the failed call and
//! a message naming the call, its path and its length.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::mman::{self, MapFlags, ProtFlags};

use crate::StepError;

/// The alignment device-DAX mappings need when sysfs does not say (the
/// default `align` of an `ndctl create-namespace -m devdax` namespace).
pub const DEVDAX_DEFAULT_ALIGN: usize = 2 << 20;

/// What backs a [`Region`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// `MAP_SHARED | MAP_ANONYMOUS` (shmem-backed).
    Anon,
    /// `MAP_SHARED` mapping of a regular file.
    File,
    /// `MAP_SHARED` mapping of a device-DAX character device.
    Devdax,
    /// `MAP_SHARED` mapping of a shmem file (`memfd_create`).
    Shm,
}

/// A mapped memory region. Unmapped on drop; the file (if any) stays open as
/// long as the region lives.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    kind: RegionKind,
    file: Option<File>,
    path: Option<PathBuf>,
    /// Further files mapped right after the first (see [`Region::files`]).
    extra: Vec<File>,
}

// SAFETY: a Region exclusively owns its mapping (nothing else unmaps it) and
// the File; moving that ownership to another thread is sound.
unsafe impl Send for Region {}

fn io_errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

const RW: ProtFlags = ProtFlags::PROT_READ.union(ProtFlags::PROT_WRITE);

/// A mapping length for nix; a zero length fails as the kernel would fail
/// `mmap` (`EINVAL`), with the same text.
fn map_len(len: usize, what: &str) -> Result<NonZeroUsize, StepError> {
    NonZeroUsize::new(len).ok_or_else(|| StepError::sys(Errno::EINVAL, format!("mmap({what}, len={len})")))
}

/// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_ANONYMOUS|flags, -1, 0)` with
/// the errno in the error.
fn map_anon(len: usize, flags: MapFlags, what: &str) -> Result<NonNull<u8>, StepError> {
    let n = map_len(len, what)?;
    // SAFETY: a fresh mapping at an address the kernel chooses (addr = NULL);
    // it does not alias any Rust object.
    let p = unsafe { mman::mmap_anonymous(None, n, RW, flags) }
        .map_err(|e| StepError::sys(e, format!("mmap({what}, len={len})")))?;
    Ok(p.cast::<u8>())
}

/// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0)` with the
/// errno in the error.
fn map_shared(len: usize, file: &File, what: &str) -> Result<NonNull<u8>, StepError> {
    let n = map_len(len, what)?;
    // SAFETY: a fresh mapping at an address the kernel chooses (addr = NULL);
    // it does not alias any Rust object.
    let p = unsafe { mman::mmap(None, n, RW, MapFlags::MAP_SHARED, file, 0) }
        .map_err(|e| StepError::sys(e, format!("mmap({what}, len={len})")))?;
    Ok(p.cast::<u8>())
}

fn open_error(e: io::Error, flags: &str, path: &Path) -> StepError {
    StepError::errno(io_errno(&e), format!("open({}, {flags}): {e}", path.display()))
}

impl Region {
    /// `mmap(MAP_SHARED|MAP_ANONYMOUS, PROT_READ|PROT_WRITE)`, every page
    /// written (zeroed) so the pages exist before registration.
    pub fn anon(len: usize) -> Result<Region, StepError> {
        let ptr = map_anon(len, MapFlags::MAP_SHARED, "MAP_SHARED|MAP_ANONYMOUS")?;
        let mut region = Region { ptr, len, kind: RegionKind::Anon, file: None, path: None, extra: Vec::new() };
        region.as_mut_slice().fill(0);
        Ok(region)
    }

    /// A fresh shmem file (`memfd_create`, as on tmpfs) of `len` bytes,
    /// mapped `MAP_SHARED` read-write; the region keeps its descriptor.
    pub fn shm(len: usize) -> Result<Region, StepError> {
        let fd = nix::sys::memfd::memfd_create(c"pinlab-shm", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| StepError::sys(e, "memfd_create(\"pinlab-shm\")"))?;
        let file = File::from(fd);
        file.set_len(len as u64).map_err(|e| StepError::errno(io_errno(&e), format!("ftruncate(memfd, {len})")))?;
        let ptr = map_shared(len, &file, "memfd, MAP_SHARED")?;
        Ok(Region { ptr, len, kind: RegionKind::Shm, file: Some(file), path: None, extra: Vec::new() })
    }

    /// Create a fresh file at `path` (`O_CREAT|O_TRUNC|O_RDWR`, mode 0644),
    /// `fallocate(fd, 0, 0, len)` so its blocks exist, and map it
    /// `MAP_SHARED` read-write. The pages are not touched: the kernel faults
    /// them (for FS-DAX, at registration time).
    pub fn file(path: &Path, len: usize) -> Result<Region, StepError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(path)
            .map_err(|e| open_error(e, "O_CREAT|O_TRUNC|O_RDWR, 0644", path))?;
        let off_len = libc::off_t::try_from(len).map_err(|_| {
            StepError::errno(libc::EFBIG, format!("fallocate({}, len={len}): length too large", path.display()))
        })?;
        fallocate(&file, FallocateFlags::empty(), 0, off_len)
            .map_err(|e| StepError::sys(e, format!("fallocate({}, mode=0, 0, len={len})", path.display())))?;
        let ptr = map_shared(len, &file, &format!("{}, MAP_SHARED", path.display()))?;
        Ok(Region {
            ptr,
            len,
            kind: RegionKind::File,
            file: Some(file),
            path: Some(path.to_path_buf()),
            extra: Vec::new(),
        })
    }

    /// Several fresh files, `each` bytes apiece, mapped back to back in one
    /// contiguous range (first file at the lowest address), so that a single
    /// MR can span more than one file. The first file is the region's
    /// [`Region::backing_file`]; the others stay open with the region.
    pub fn files(paths: &[PathBuf], each: usize) -> Result<Region, StepError> {
        let Some(first) = paths.first() else {
            return Err(StepError::other("Region::files needs at least one path"));
        };
        let total = each
            .checked_mul(paths.len())
            .ok_or_else(|| StepError::errno(libc::EFBIG, format!("{} files of {each} bytes", paths.len())))?;
        // Reserve the whole range, then replace it piece by piece with MAP_FIXED.
        let base = map_anon(total, MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE, "reservation")?;
        let mut region = Region {
            ptr: base,
            len: total,
            kind: RegionKind::File,
            file: None,
            path: Some(first.clone()),
            extra: Vec::new(),
        };
        for (i, p) in paths.iter().enumerate() {
            let single = Region::file(p, each)?;
            // Move the file's mapping into its slot: map the fd again there.
            let file = single.backing_file().ok_or_else(|| StepError::other("a file region without its file"))?;
            let at = (base.as_ptr() as usize).checked_add(i * each).and_then(NonZeroUsize::new).ok_or_else(|| {
                StepError::other(format!("{} files of {each} bytes overflow the address space", i + 1))
            })?;
            let n = map_len(each, &format!("{}, MAP_SHARED|MAP_FIXED", p.display()))?;
            // SAFETY: base+i*each..+each lies inside our own reservation (no
            // Rust object lives there); MAP_FIXED replaces that part of it.
            unsafe { mman::mmap(Some(at), n, RW, MapFlags::MAP_SHARED | MapFlags::MAP_FIXED, file, 0) }
                .map_err(|e| StepError::sys(e, format!("mmap({}, len={each}, MAP_SHARED|MAP_FIXED)", p.display())))?;
            let mut single = single;
            let file = single.take_file();
            drop(single);
            match (i, file) {
                (0, f) => region.file = f,
                (_, Some(f)) => region.extra.push(f),
                (_, None) => {}
            }
        }
        Ok(region)
    }

    /// Open a device-DAX character device (e.g. `/dev/dax1.0`) `O_RDWR` and
    /// map `len` bytes `MAP_SHARED` read-write. `len` must be a non-zero
    /// multiple of the device's alignment (`/sys/bus/dax/devices/<dev>/align`,
    /// 2 MiB when sysfs does not say); the kernel then picks an aligned
    /// address by itself.
    pub fn devdax(path: &Path, len: usize) -> Result<Region, StepError> {
        let align = devdax_align(path);
        if len == 0 || !len.is_multiple_of(align) {
            return Err(StepError::errno(
                libc::EINVAL,
                format!(
                    "mmap({}, len={len}): device-DAX needs a non-zero length that is a multiple of the device align ({align})",
                    path.display()
                ),
            ));
        }
        if let Some(size) = devdax_size(path) {
            if (len as u64) > size {
                return Err(StepError::errno(
                    libc::EINVAL,
                    format!("mmap({}, len={len}): the device is only {size} bytes", path.display()),
                ));
            }
        }
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| open_error(e, "O_RDWR", path))?;
        let ptr = map_shared(len, &file, &format!("{}, MAP_SHARED", path.display()))?;
        let region = Region {
            ptr,
            len,
            kind: RegionKind::Devdax,
            file: Some(file),
            path: Some(path.to_path_buf()),
            extra: Vec::new(),
        };
        if !(ptr.as_ptr() as usize).is_multiple_of(align) {
            // The kernel refuses misaligned device-DAX VMAs itself; this only
            // makes a surprising layout visible (and unmaps on drop).
            drop(region);
            return Err(StepError::other(format!(
                "mmap({}, len={len}) returned {:p}, not aligned to {align}",
                path.display(),
                ptr.as_ptr()
            )));
        }
        Ok(region)
    }

    /// The start of the mapping.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true for a mapped region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What backs the region.
    pub fn kind(&self) -> RegionKind {
        self.kind
    }

    /// The mapped bytes. Reading faults in pages that were not faulted yet.
    /// Only meaningful when nothing (no RDMA transfer in flight) writes them
    /// concurrently.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live PROT_READ mapping owned by self,
        // and the returned borrow cannot outlive self (munmap is in Drop).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, plus PROT_WRITE; &mut self makes the
        // borrow unique on the Rust side.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The `len` mapped bytes at `addr`, if they lie inside this region
    /// (e.g. the memory an MR registered, while the region still maps it).
    /// Only meaningful when nothing writes them concurrently, as for
    /// [`Region::as_slice`].
    pub fn bytes_at(&self, addr: *const u8, len: usize) -> Option<&[u8]> {
        let start = (addr as usize).checked_sub(self.ptr.as_ptr() as usize)?;
        self.as_slice().get(start..start.checked_add(len)?)
    }

    /// The open file behind the mapping: the data file for file regions, the
    /// character device for device-DAX regions, `None` for anonymous ones.
    ///
    /// (Named `backing_file` because `Region::file` is the constructor; Rust
    /// allows only one inherent item per name.)
    pub fn backing_file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// The path behind the mapping (`None` for anonymous regions).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Take the open file out of the region (e.g. to close the data fd while
    /// the mapping and its pins stay, or to keep the fd across `munmap` by
    /// dropping the region afterwards). Later [`Region::backing_file`] calls
    /// return `None`; [`Region::is_dax`] then uses the path.
    pub fn take_file(&mut self) -> Option<File> {
        self.file.take()
    }

    /// Take every file of the region (the first one, then those of
    /// [`Region::files`]); the mapping stays.
    pub fn take_files(&mut self) -> Vec<File> {
        let mut v: Vec<File> = self.file.take().into_iter().collect();
        v.append(&mut self.extra);
        v
    }

    /// For file regions: whether the file is DAX (`statx` `STATX_ATTR_DAX`,
    /// on the fd, or on the path once the fd was taken). `None` for anonymous
    /// and device-DAX regions. An error when `statx` fails or the kernel does
    /// not report the DAX attribute.
    pub fn is_dax(&self) -> Result<Option<bool>, StepError> {
        if self.kind != RegionKind::File {
            return Ok(None);
        }
        let Some(path) = self.path.as_ref() else {
            return Ok(None);
        };
        statx_dax(self.file.as_ref(), path).map(Some)
    }
}

/// Whether `path` is DAX now (`statx`'s `STATX_ATTR_DAX`).
pub fn path_is_dax(path: &Path) -> Result<bool, StepError> {
    statx_dax(None, path)
}

/// `statx(fd, "", AT_EMPTY_PATH)` (or `statx(AT_FDCWD, path)` without an
/// fd) and the `STATX_ATTR_DAX` bit.
fn statx_dax(file: Option<&File>, path: &Path) -> Result<bool, StepError> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| StepError::errno(libc::EINVAL, format!("path {} contains a NUL byte", path.display())))?;
    let (dirfd, name, flags, how) = match file {
        Some(f) => (f.as_raw_fd(), c"", libc::AT_EMPTY_PATH, "fd, AT_EMPTY_PATH"),
        None => (libc::AT_FDCWD, c_path.as_c_str(), 0, "AT_FDCWD"),
    };
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: name is a valid NUL-terminated string that outlives the call;
    // stx points to writable memory of the right type for the kernel to fill.
    let r = unsafe { libc::statx(dirfd, name.as_ptr(), flags, libc::STATX_BASIC_STATS, stx.as_mut_ptr()) };
    if r != 0 {
        return Err(StepError::last_os(format!("statx({}, {how})", path.display())));
    }
    // SAFETY: statx returned 0, so the kernel filled the structure (and it
    // was zero-initialised before anyway).
    let stx = unsafe { stx.assume_init() };
    let dax = libc::STATX_ATTR_DAX as u64;
    if stx.stx_attributes_mask & dax == 0 {
        return Err(StepError::other(format!(
            "statx({}): the kernel does not report STATX_ATTR_DAX (attributes_mask={:#x})",
            path.display(),
            stx.stx_attributes_mask
        )));
    }
    Ok(stx.stx_attributes & dax != 0)
}

/// `/sys/bus/dax/devices/<name>/<attr>` of the device-DAX node `path`.
fn devdax_sysfs(path: &Path, attr: &str) -> Option<String> {
    let name = path.file_name()?;
    let p = Path::new("/sys/bus/dax/devices").join(name).join(attr);
    std::fs::read_to_string(p).ok()
}

fn parse_sysfs_number(s: &str) -> Option<u64> {
    let t = s.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

fn devdax_align(path: &Path) -> usize {
    devdax_sysfs(path, "align")
        .as_deref()
        .and_then(parse_sysfs_number)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| n.is_power_of_two() && *n >= 4096)
        .unwrap_or(DEVDAX_DEFAULT_ALIGN)
}

fn devdax_size(path: &Path) -> Option<u64> {
    devdax_sysfs(path, "size").as_deref().and_then(parse_sysfs_number).filter(|n| *n > 0)
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping this Region created and still
        // owns; no borrow of it outlives self.
        if let Err(e) = unsafe { mman::munmap(self.ptr.cast(), self.len) } {
            eprintln!("pinlab: munmap({:p}, {}) failed: {}", self.ptr.as_ptr(), self.len, io::Error::from(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("pinlab-region-{}-{name}", std::process::id()))
    }

    #[test]
    fn anon_is_zeroed_and_writable() {
        let mut r = Region::anon(3 * 4096).unwrap();
        assert_eq!(r.len(), 3 * 4096);
        assert!(r.as_slice().iter().all(|&b| b == 0));
        r.as_mut_slice()[4097] = 7;
        assert_eq!(r.as_slice()[4097], 7);
        assert_eq!(r.kind(), RegionKind::Anon);
        assert!(r.backing_file().is_none() && r.path().is_none());
        assert_eq!(r.is_dax().unwrap(), None);
    }

    #[test]
    fn anon_zero_length_reports_einval() {
        let e = Region::anon(0).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::EINVAL));
        assert!(e.message.contains("mmap"), "{e}");
    }

    #[test]
    fn file_region_is_allocated_and_shared() {
        let p = tmp("file");
        {
            let mut r = Region::file(&p, 2 * 4096).unwrap();
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * 4096);
            r.as_mut_slice()[10] = 0x5a;
            assert_eq!(r.path(), Some(p.as_path()));
            // tmpfs or a disk filesystem here: not DAX, but statx answers.
            assert_eq!(r.is_dax().unwrap(), Some(false));
            let f = r.take_file().unwrap();
            assert!(r.backing_file().is_none());
            assert_eq!(r.is_dax().unwrap(), Some(false));
            drop(f);
            r.as_mut_slice()[11] = 0x5b;
        }
        assert_eq!(&std::fs::read(&p).unwrap()[10..12], &[0x5a, 0x5b]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn files_are_mapped_back_to_back() {
        let paths = [tmp("files-0"), tmp("files-1")];
        {
            let mut r = Region::files(&paths, 4096).unwrap();
            assert_eq!(r.len(), 2 * 4096);
            r.as_mut_slice()[1] = 1;
            r.as_mut_slice()[4096 + 2] = 2;
            assert_eq!(r.path(), Some(paths[0].as_path()));
            assert_eq!(r.take_files().len(), 2);
        }
        assert_eq!(&std::fs::read(&paths[0]).unwrap()[..3], &[0, 1, 0]);
        assert_eq!(&std::fs::read(&paths[1]).unwrap()[..3], &[0, 0, 2]);
        for p in &paths {
            std::fs::remove_file(p).unwrap();
        }
        let e = Region::files(&[], 4096).unwrap_err();
        assert_eq!(e.failure.errno(), None);
    }

    #[test]
    fn bytes_at_stays_inside_the_region() {
        let mut r = Region::anon(2 * 4096).unwrap();
        r.as_mut_slice()[4096] = 9;
        let base = r.as_mut_ptr().cast_const();
        assert_eq!(r.bytes_at(base.wrapping_add(4096), 4096).map(|b| b[0]), Some(9));
        assert_eq!(r.bytes_at(base, 2 * 4096).map(<[u8]>::len), Some(2 * 4096));
        assert!(r.bytes_at(base.wrapping_add(4096), 4097).is_none());
        assert!(r.bytes_at(base.wrapping_sub(1), 1).is_none());
        assert!(r.bytes_at(base, usize::MAX).is_none());
    }

    #[test]
    fn file_in_missing_dir_names_the_call() {
        let e = Region::file(Path::new("/nonexistent-pinlab/x"), 4096).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::ENOENT));
        assert!(e.message.starts_with("open(/nonexistent-pinlab/x, O_CREAT"), "{e}");
    }

    #[test]
    fn devdax_checks_alignment_before_opening() {
        let e = Region::devdax(Path::new("/dev/dax-pinlab-none"), 4096).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::EINVAL));
        assert!(e.message.contains("multiple"), "{e}");
        let e = Region::devdax(Path::new("/dev/dax-pinlab-none"), 2 << 20).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::ENOENT));
    }

    #[test]
    fn sysfs_numbers() {
        assert_eq!(parse_sysfs_number("2097152\n"), Some(2097152));
        assert_eq!(parse_sysfs_number("0x200000"), Some(0x200000));
        assert_eq!(parse_sysfs_number("x"), None);
    }
}
