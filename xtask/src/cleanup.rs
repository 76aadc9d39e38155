//! Nothing left behind: on Ctrl-C, SIGTERM or SIGHUP pinlab kills the
//! QEMU and virtiofsd processes it started and removes its temporary
//! directories before exiting; children also get SIGKILL from the kernel if
//! pinlab itself is killed outright (`PR_SET_PDEATHSIG`); and directories
//! left by a pinlab that died with SIGKILL are swept on the next start.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

#[derive(Default)]
struct State {
    dirs: Vec<PathBuf>,
    pids: Vec<u32>,
}

static STATE: Mutex<State> = Mutex::new(State { dirs: Vec::new(), pids: Vec::new() });

/// Prefix of a boot's temporary directory: `pinlab-vm-<pid>-…`.
pub const VM_DIR_PREFIX: &str = "pinlab-vm-";

/// Install the signal handler (once, at start).
pub fn install() {
    let r = ctrlc::set_handler(|| {
        let (dirs, pids) = {
            let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut s.dirs), std::mem::take(&mut s.pids))
        };
        for pid in &pids {
            // SAFETY: kill(2) on a pid we spawned; at worst the pid is gone (ESRCH).
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        for d in &dirs {
            let _ = fs_err::remove_dir_all(d);
        }
        eprintln!(
            "\npinlab: interrupted; stopped {} child process(es) and removed {} temporary director{}",
            pids.len(),
            dirs.len(),
            if dirs.len() == 1 { "y" } else { "ies" }
        );
        std::process::exit(130);
    });
    if let Err(e) = r {
        eprintln!("pinlab: could not install the Ctrl-C handler ({e}); an interrupted run may leave QEMU behind");
    }
}

/// Remove `dir` if pinlab is interrupted before [`forget_dir`].
pub fn register_dir(dir: &Path) {
    if let Ok(mut s) = STATE.lock() {
        s.dirs.push(dir.to_path_buf());
    }
}

/// `dir` is gone or owned by someone else now.
pub fn forget_dir(dir: &Path) {
    if let Ok(mut s) = STATE.lock() {
        s.dirs.retain(|d| d != dir);
    }
}

/// Kill `pid` if pinlab is interrupted before [`forget_pid`].
pub fn register_pid(pid: u32) {
    if let Ok(mut s) = STATE.lock() {
        s.pids.push(pid);
    }
}

/// `pid` was reaped.
pub fn forget_pid(pid: u32) {
    if let Ok(mut s) = STATE.lock() {
        s.pids.retain(|p| *p != pid);
    }
}

/// The child gets SIGKILL when the thread that spawned it dies (pinlab
/// killed with SIGKILL, or a panic), so QEMU and virtiofsd never outlive us.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
    // memory of the parent; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The owner pid encoded in `pinlab-vm-<pid>-…` or `NAME.tmp-<pid>-N`.
pub fn owner_pid(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix(VM_DIR_PREFIX) {
        return rest.split('-').next()?.parse().ok();
    }
    let (_, rest) = name.rsplit_once(".tmp-")?;
    rest.split('-').next()?.parse().ok()
}

/// Remove what dead pinlab processes left in `dir`: `pinlab-vm-<pid>-*`
/// boot directories, and (`staging`: only in pinlab's own cache
/// directories) `*.tmp-<pid>-*` staging entries. Returns how many.
pub fn sweep(dir: &Path, staging: bool) -> usize {
    let Ok(rd) = fs_err::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !staging && !name.starts_with(VM_DIR_PREFIX) {
            continue;
        }
        let Some(pid) = owner_pid(&name) else { continue };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let p = e.path();
        let gone = if p.is_dir() { fs_err::remove_dir_all(&p) } else { fs_err::remove_file(&p) };
        if gone.is_ok() {
            n += 1;
        }
    }
    n
}

/// Sweep TMPDIR and the cache's build areas at start.
pub fn sweep_all(cache: &crate::util::Cache) {
    let mut n = sweep(&std::env::temp_dir(), false);
    for d in ["kernels", "rootfs", "rootfs-demos", "src", "trees", "tools", "debs", "apt/resolved"] {
        n += sweep(&cache.root.join(d), true);
    }
    if n > 0 {
        eprintln!("pinlab: removed {n} leftover(s) of earlier runs that were killed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids() {
        assert_eq!(owner_pid("pinlab-vm-1234-AbCd"), Some(1234));
        assert_eq!(owner_pid("stock-0123abcd.tmp-77-0"), Some(77));
        assert_eq!(owner_pid("stock-0123abcd"), None);
        assert_eq!(owner_pid("pinlab-vm-xyz"), None);
    }

    #[test]
    fn sweeps_only_dead_owners() {
        let d = tempfile::tempdir().unwrap();
        // A pid that cannot exist (above pid_max's hard limit of 2^22).
        let dead = d.path().join("pinlab-vm-4194305-x");
        let mine = d.path().join(format!("pinlab-vm-{}-y", std::process::id()));
        let staging = d.path().join("k.tmp-4194305-0");
        for p in [&dead, &mine, &staging] {
            fs_err::create_dir(p).unwrap();
        }
        let other = d.path().join("notes.tmp-4194305-0");
        fs_err::create_dir(&other).unwrap();
        assert_eq!(sweep(d.path(), false), 1);
        assert!(other.exists(), "outside pinlab's cache only pinlab-vm-* is swept");
        fs_err::remove_dir(&other).unwrap();
        assert_eq!(sweep(d.path(), true), 1);
        assert!(!dead.exists() && !staging.exists() && mine.exists());
    }

    #[test]
    fn child_dies_with_its_spawning_thread() {
        // The thread that spawns `sleep` exits without reaping it: the
        // kernel sends the child SIGKILL.
        let pid = std::thread::spawn(|| {
            let mut c = Command::new("sleep");
            c.arg("30");
            die_with_parent(&mut c);
            let child = c.spawn().unwrap();
            let pid = child.id();
            std::mem::forget(child);
            pid
        })
        .join()
        .unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child; blocks until it is killed.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        assert_eq!(r, pid as i32);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL, "status {status:#x}");
    }
}
