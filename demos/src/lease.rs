//! File leases: `fcntl(F_SETLEASE)` and `fcntl(F_GETLEASE)`, including the
//! series' layout leases ([`F_LAYOUT`], [`F_LAYOUT`]` | `[`F_EXCLUSIVE`]).
//!
//! `nix` has no `F_SETLEASE` / `F_GETLEASE` (and no layout leases at all),
//! so these two calls are the raw `fcntl`s, here and nowhere else.
//!
//! [`F_LAYOUT`]: pinlab_scenarios::plan::F_LAYOUT
//! [`F_EXCLUSIVE`]: pinlab_scenarios::plan::F_EXCLUSIVE

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::ForkResult;

use pinlab_scenarios::plan::LeaseKind;

use crate::StepError;

/// Every lease kind, for decoding what `F_GETLEASE` answered.
pub const KINDS: [LeaseKind; 5] =
    [LeaseKind::Layout, LeaseKind::LayoutExclusive, LeaseKind::Read, LeaseKind::Write, LeaseKind::Unlock];

/// The lease kind whose `fcntl` argument is `arg` (`F_GETLEASE`'s answer).
pub fn kind_of(arg: i32) -> Option<LeaseKind> {
    KINDS.into_iter().find(|k| k.arg() == arg)
}

/// `fcntl(fd, F_SETLEASE, kind)`.
///
/// The error names the call, the descriptor and the lease, and carries the
/// kernel's errno (`EINVAL` for a layout lease on a kernel without the
/// series, `EAGAIN` when a conflicting open exists, …).
pub fn set_lease(fd: impl AsFd, kind: LeaseKind) -> Result<(), StepError> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: F_SETLEASE takes an integer argument and touches no memory of
    // ours; fd is a descriptor borrowed from its owner for this call.
    let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, kind.arg()) };
    if r < 0 {
        return Err(StepError::last_os(format!("fcntl(fd {fd}, F_SETLEASE, {} = {})", kind.c_name(), kind.arg())));
    }
    Ok(())
}

/// `fcntl(fd, F_GETLEASE)`: the lease held on `fd` as the kernel's raw
/// value (`F_UNLCK` when none); [`kind_of`] names it.
pub fn get_lease(fd: impl AsFd) -> Result<i32, StepError> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: F_GETLEASE takes no argument and touches no memory of ours; fd
    // is a descriptor borrowed from its owner for this call.
    let r = unsafe { libc::fcntl(fd, libc::F_GETLEASE) };
    if r < 0 {
        return Err(StepError::last_os(format!("fcntl(fd {fd}, F_GETLEASE)")));
    }
    Ok(r)
}

/// Exit status of the [`try_lease_read_only`] child when `open` failed (errnos are below it).
const CHILD_OPEN_FAILED: i32 = 250;

/// `lease` with `read_only` or `uid`: `fcntl(F_SETLEASE, kind)` on a fresh
/// `O_RDONLY` descriptor of `path`, from this process or, with `uid`, from a
/// child process running as that user (and group). A lease that is granted
/// is released and the descriptor closed again at once: the step asks only
/// whether the kernel grants it.
pub fn try_lease_read_only(path: &Path, kind: LeaseKind, uid: Option<u32>) -> Result<String, StepError> {
    let what = format!(
        "fcntl(F_SETLEASE, {} = {}) on a fresh O_RDONLY descriptor of {}",
        kind.c_name(),
        kind.arg(),
        path.display()
    );
    let Some(uid) = uid else {
        let f = File::open(path).map_err(|e| {
            StepError::errno(e.raw_os_error().unwrap_or(0), format!("open({}, O_RDONLY): {e}", path.display()))
        })?;
        set_lease(&f, kind)?;
        set_lease(&f, LeaseKind::Unlock)?;
        return Ok(format!("{what} = 0 (released again)"));
    };
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| StepError::other(format!("{} contains a NUL byte", path.display())))?;
    // SAFETY: the child only makes async-signal-safe system calls (setgroups,
    // setresgid, setresuid, open, fcntl) on memory prepared before the fork,
    // then _exit()s; it never returns into Rust code of this process.
    match unsafe { nix::unistd::fork() }.map_err(|e| StepError::sys(e, "fork()"))? {
        // SAFETY: in the child of the fork above: raw system calls on the
        // C string made before the fork, ending in _exit (see above).
        ForkResult::Child => unsafe {
            let id = uid as libc::uid_t;
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(id, id, id) != 0
                || libc::setresuid(id, id, id) != 0
            {
                libc::_exit(CHILD_OPEN_FAILED + 1);
            }
            let fd = libc::open(cpath.as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                libc::_exit(CHILD_OPEN_FAILED);
            }
            let r = libc::fcntl(fd, libc::F_SETLEASE, kind.arg());
            libc::_exit(if r < 0 { *libc::__errno_location() } else { 0 });
        },
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).map_err(|e| StepError::sys(e, format!("waitpid({child})")))?;
            let code = match status {
                WaitStatus::Exited(_, c) => c,
                other => return Err(StepError::other(format!("the uid {uid} child ended with {other:?}"))),
            };
            match code {
                0 => Ok(format!("{what}, as uid {uid} (pid {child}) = 0")),
                CHILD_OPEN_FAILED => {
                    Err(StepError::other(format!("uid {uid} (pid {child}) could not open {} O_RDONLY", path.display())))
                }
                c if c > CHILD_OPEN_FAILED => Err(StepError::other(format!("pid {child} could not become uid {uid}"))),
                errno => Err(StepError::errno(
                    errno,
                    format!("{what}, as uid {uid} (pid {child}): {}", Errno::from_raw(errno).desc()),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinlab_scenarios::plan::{F_EXCLUSIVE, F_LAYOUT};

    #[test]
    fn kinds_are_the_uapi_values() {
        assert_eq!(LeaseKind::Read.arg(), libc::F_RDLCK);
        assert_eq!(LeaseKind::Write.arg(), libc::F_WRLCK);
        assert_eq!(LeaseKind::Unlock.arg(), libc::F_UNLCK);
        assert_eq!(LeaseKind::LayoutExclusive.arg(), F_LAYOUT | F_EXCLUSIVE);
        for k in KINDS {
            assert_eq!(kind_of(k.arg()), Some(k));
        }
        assert_eq!(kind_of(F_EXCLUSIVE), None);
    }

    #[test]
    fn errors_name_the_call_and_descriptor() {
        // A pipe cannot carry a lease: the kernel answers EINVAL.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let fd = r.as_raw_fd();
        let e = set_lease(&r, LeaseKind::Read).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::EINVAL), "{e}");
        assert!(e.message.starts_with(&format!("fcntl(fd {fd}, F_SETLEASE, F_RDLCK = 0): ")), "{e}");
        assert_eq!(get_lease(&r).map(kind_of).unwrap(), Some(LeaseKind::Unlock));
        // An O_PATH descriptor allows no F_GETLEASE: EBADF.
        let o = nix::fcntl::open("/", nix::fcntl::OFlag::O_PATH, nix::sys::stat::Mode::empty()).unwrap();
        let e = get_lease(&o).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::EBADF), "{e}");
        assert!(e.message.starts_with(&format!("fcntl(fd {}, F_GETLEASE): ", o.as_raw_fd())), "{e}");
    }

    #[test]
    fn read_lease_on_a_file_of_ours() {
        let p = std::env::temp_dir().join(format!("pinlab-lease-{}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let r = set_lease(&f, LeaseKind::Read).and_then(|()| get_lease(&f));
        let after = set_lease(&f, LeaseKind::Unlock).and_then(|()| get_lease(&f));
        std::fs::remove_file(&p).unwrap();
        assert_eq!(r.map(kind_of).unwrap(), Some(LeaseKind::Read));
        assert_eq!(after.map(kind_of).unwrap(), Some(LeaseKind::Unlock));
    }
}
