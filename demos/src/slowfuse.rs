//! A FUSE filesystem of one file whose reads answer late: a short-term pin
//! whose length the scenario decides (S34).
//!
//! A read of `/mnt/pinlab-slow/slow` into a user buffer is direct I/O
//! (`FOPEN_DIRECT_IO`): the kernel pins the buffer's pages with FOLL_PIN
//! (`iov_iter_extract_pages()`), sends the request to this server and
//! unpins them when the answer has been copied in, exactly like `O_DIRECT`
//! to a slow disk. When the buffer is a DAX mapping, the pinned pages are
//! the file's own blocks, and a truncate that finds them busy must wait for
//! the I/O rather than fail. The server answers each READ `delay` after it
//! arrived, so the test knows the pages are pinned from the moment the
//! request is seen until then.
//!
//! Only what the kernel sends for a lookup, open, read and release is
//! answered (`include/uapi/linux/fuse.h`, protocol 7.31); everything else
//! gets `ENOSYS`.

use crate::StepError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the filesystem is mounted.
pub const MNT: &str = "/mnt/pinlab-slow";
/// Its one file.
pub const FILE: &str = "slow";
/// The file's size (reads past it return short).
const SIZE: u64 = 1 << 30;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;
const FOPEN_DIRECT_IO: u32 = 1;
const ROOT: u64 = 1;
const SLOW: u64 = 2;
/// `struct fuse_in_header`.
const IN_HEADER: usize = 40;

/// A mounted server: its thread, the READs it saw, and the mount.
pub struct SlowFs {
    server: Option<JoinHandle<()>>,
    reads: mpsc::Receiver<(u64, u32)>,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// `struct fuse_attr` (88 bytes) of the root directory or the file.
fn attr(node: u64) -> Vec<u8> {
    let (size, mode, nlink) = if node == ROOT { (0u64, 0o040755u32, 2u32) } else { (SIZE, 0o100444, 1) };
    let mut a = Vec::with_capacity(88);
    for v in [node, size, size.div_ceil(512), 0, 0, 0] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0u32, 0, 0, mode, nlink, 0, 0, 0, 4096, 0] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    a
}

fn reply(dev: &mut File, unique: u64, error: i32, body: &[u8]) {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(&(-error).to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(body);
    // The request may have been interrupted meanwhile (ENOENT): nothing to do.
    let _ = dev.write_all(&out);
}

/// Serve requests until the connection goes away (unmount).
fn serve(mut dev: File, delay: Duration, reads: mpsc::Sender<(u64, u32)>) {
    let mut buf = vec![0u8; 1 << 20 | 4096];
    loop {
        let n = match dev.read(&mut buf) {
            Ok(n) if n >= IN_HEADER => n,
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(_) => return, // ENODEV: unmounted
        };
        let req = &buf[..n];
        let (opcode, unique, node) = (le32(req, 4), le64(req, 8), le64(req, 16));
        let arg = &req[IN_HEADER..];
        match opcode {
            FUSE_INIT => {
                let max_readahead = if arg.len() >= 12 { le32(arg, 8) } else { 0 };
                let mut out = Vec::with_capacity(64);
                for v in [7u32, 31, max_readahead, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&1u16.to_le_bytes()); // max_background
                out.extend_from_slice(&1u16.to_le_bytes()); // congestion_threshold
                out.extend_from_slice(&(128u32 << 10).to_le_bytes()); // max_write
                out.extend_from_slice(&1u32.to_le_bytes()); // time_gran
                out.extend_from_slice(&256u16.to_le_bytes()); // max_pages
                out.resize(64, 0);
                reply(&mut dev, unique, 0, &out);
            }
            FUSE_LOOKUP => {
                let name = arg.split(|&b| b == 0).next().unwrap_or_default();
                if node == ROOT && name == FILE.as_bytes() {
                    let mut out = Vec::with_capacity(128);
                    for v in [SLOW, 0, 3600, 3600] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    out.extend_from_slice(&[0u8; 8]);
                    out.extend_from_slice(&attr(SLOW));
                    reply(&mut dev, unique, 0, &out);
                } else {
                    reply(&mut dev, unique, libc::ENOENT, &[]);
                }
            }
            FUSE_GETATTR => {
                let mut out = Vec::with_capacity(104);
                out.extend_from_slice(&3600u64.to_le_bytes());
                out.extend_from_slice(&[0u8; 8]);
                out.extend_from_slice(&attr(node));
                reply(&mut dev, unique, 0, &out);
            }
            FUSE_OPEN => {
                let mut out = vec![0u8; 16];
                out[8..12].copy_from_slice(&FOPEN_DIRECT_IO.to_le_bytes());
                reply(&mut dev, unique, 0, &out);
            }
            FUSE_READ if arg.len() >= 20 => {
                let (offset, size) = (le64(arg, 8), le32(arg, 16));
                let _ = reads.send((offset, size));
                std::thread::sleep(delay);
                let len = (size as u64).min(SIZE.saturating_sub(offset)) as usize;
                reply(&mut dev, unique, 0, &vec![0x33u8; len]);
            }
            FUSE_RELEASE | FUSE_FLUSH => reply(&mut dev, unique, 0, &[]),
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => {}
            _ => reply(&mut dev, unique, libc::ENOSYS, &[]),
        }
    }
}

impl SlowFs {
    /// Mount the filesystem at [`MNT`] with a server answering READs after `delay`.
    pub fn mount(delay: Duration) -> Result<SlowFs, StepError> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| StepError::io(&e, "open(/dev/fuse) (CONFIG_FUSE_FS)".to_string()))?;
        std::fs::create_dir_all(MNT).map_err(|e| StepError::io(&e, format!("mkdir {MNT}")))?;
        let opts = format!("fd={},rootmode=40000,user_id=0,group_id=0,allow_other", dev.as_raw_fd());
        nix::mount::mount(
            Some("pinlab-slow"),
            MNT,
            Some("fuse"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(|e| StepError::sys(e, format!("mount -t fuse pinlab-slow {MNT} -o {opts}")))?;
        let (tx, rx) = mpsc::channel();
        let conn = dev.try_clone().map_err(|e| StepError::io(&e, "dup /dev/fuse".to_string()))?;
        let server = std::thread::spawn(move || serve(conn, delay, tx));
        // The mount holds its own reference on the connection; ours goes now.
        drop(dev);
        Ok(SlowFs { server: Some(server), reads: rx })
    }

    /// The file to read from.
    pub fn path() -> PathBuf {
        Path::new(MNT).join(FILE)
    }

    /// Wait up to `within` for the server to receive a READ: the buffer's
    /// pages are pinned from then until it answers.
    pub fn read_arrived(&self, within: Duration) -> Option<(u64, u32)> {
        self.reads.recv_timeout(within).ok()
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        // Unmounting ends the connection: the server's read() fails with
        // ENODEV and its thread returns.
        let _ = nix::mount::umount2(MNT, nix::mount::MntFlags::MNT_DETACH);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
    }
}

/// A read from the slow file into a mapping, running on its own thread.
pub struct InFlight {
    fs: SlowFs,
    reader: JoinHandle<Result<(usize, Duration), std::io::Error>>,
    started: Instant,
}

/// Start reading `len` bytes of the slow file into `addr` (in a mapping
/// that stays mapped until [`InFlight::wait`] returns); returns once the
/// server has the request, i.e. once the pages are pinned.
pub fn start_read(addr: usize, len: usize, delay: Duration) -> Result<(InFlight, String), StepError> {
    let fs = SlowFs::mount(delay)?;
    let p = SlowFs::path();
    let f = File::open(&p).map_err(|e| StepError::io(&e, format!("open({})", p.display())))?;
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        let t = Instant::now();
        // SAFETY: the caller keeps addr..addr+len mapped and writable until
        // wait() has joined this thread.
        let n = unsafe { libc::pread(f.as_raw_fd(), addr as *mut libc::c_void, len, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((n as usize, t.elapsed()))
    });
    match fs.read_arrived(Duration::from_secs(10)) {
        Some((off, size)) => Ok((
            InFlight { fs, reader, started },
            format!(
                "read({}, {len} bytes into {addr:#x}) in flight: the FUSE server got READ offset {off} size {size} \
                 after {} ms and answers {} ms later; the buffer's pages are pinned (FOLL_PIN) until then",
                p.display(),
                started.elapsed().as_millis(),
                delay.as_millis()
            ),
        )),
        None => {
            drop(fs);
            let r = reader.join();
            Err(StepError::other(format!("the FUSE server saw no READ within 10 s (reader: {r:?})")))
        }
    }
}

impl InFlight {
    /// Wait for the read to return; says how many bytes it read and when.
    pub fn wait(self) -> Result<String, StepError> {
        let r = self.reader.join().map_err(|_| StepError::other("the reader thread panicked"))?;
        let total = self.started.elapsed();
        drop(self.fs);
        match r {
            Ok((n, took)) => Ok(format!(
                "the read returned {n} bytes after {} ms ({} ms since it started)",
                took.as_millis(),
                total.as_millis()
            )),
            Err(e) => Err(StepError::io(&e, "read() of the slow FUSE file".to_string())),
        }
    }
}
