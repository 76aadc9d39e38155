//! File leases: `fcntl(F_SETLEASE)` and `fcntl(F_GETLEASE)`, including the
//! series' layout leases ([`F_LAYOUT`], [`F_LAYOUT`]` | `[`F_EXCLUSIVE`]).
//!
//! `nix` has no `F_SETLEASE` / `F_GETLEASE` (and no layout leases at all),
//! so these two calls are the raw `fcntl`s, here and nowhere else.
//!
//! [`F_LAYOUT`]: pinlab_scenarios::plan::F_LAYOUT
//! [`F_EXCLUSIVE`]: pinlab_scenarios::plan::F_EXCLUSIVE

use std::os::fd::{AsFd, AsRawFd};

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
