//! Errno names for Linux x86-64, so results say `EOPNOTSUPP`, not `95`.
//!
//! Aliases (`ENOTSUP` = `EOPNOTSUPP`, `EDEADLOCK` = `EDEADLK`, `EWOULDBLOCK` =
//! `EAGAIN`) are accepted in specs and normalised to the first name.

/// (name, number) for the errnos pinlab can meet; first name wins on lookup by number.
const TABLE: &[(&str, i32)] = &[
    ("EPERM", 1),
    ("ENOENT", 2),
    ("ESRCH", 3),
    ("EINTR", 4),
    ("EIO", 5),
    ("ENXIO", 6),
    ("E2BIG", 7),
    ("ENOEXEC", 8),
    ("EBADF", 9),
    ("ECHILD", 10),
    ("EAGAIN", 11),
    ("EWOULDBLOCK", 11),
    ("ENOMEM", 12),
    ("EACCES", 13),
    ("EFAULT", 14),
    ("ENOTBLK", 15),
    ("EBUSY", 16),
    ("EEXIST", 17),
    ("EXDEV", 18),
    ("ENODEV", 19),
    ("ENOTDIR", 20),
    ("EISDIR", 21),
    ("EINVAL", 22),
    ("ENFILE", 23),
    ("EMFILE", 24),
    ("ENOTTY", 25),
    ("ETXTBSY", 26),
    ("EFBIG", 27),
    ("ENOSPC", 28),
    ("ESPIPE", 29),
    ("EROFS", 30),
    ("EMLINK", 31),
    ("EPIPE", 32),
    ("EDOM", 33),
    ("ERANGE", 34),
    ("EDEADLK", 35),
    ("EDEADLOCK", 35),
    ("ENAMETOOLONG", 36),
    ("ENOLCK", 37),
    ("ENOSYS", 38),
    ("ENOTEMPTY", 39),
    ("ELOOP", 40),
    ("ENODATA", 61),
    ("ETIME", 62),
    ("EPROTO", 71),
    ("EBADMSG", 74),
    ("EOVERFLOW", 75),
    ("ENOTSOCK", 88),
    ("EPROTONOSUPPORT", 93),
    ("EOPNOTSUPP", 95),
    ("ENOTSUP", 95),
    ("EAFNOSUPPORT", 97),
    ("EADDRINUSE", 98),
    ("EADDRNOTAVAIL", 99),
    ("ENETDOWN", 100),
    ("ENETUNREACH", 101),
    ("ECONNABORTED", 103),
    ("ECONNRESET", 104),
    ("ENOBUFS", 105),
    ("ETIMEDOUT", 110),
    ("ECONNREFUSED", 111),
    ("EHOSTUNREACH", 113),
    ("EALREADY", 114),
    ("EINPROGRESS", 115),
    ("ECANCELED", 125),
    ("EOWNERDEAD", 130),
    ("ENOTRECOVERABLE", 131),
    ("EHWPOISON", 133),
];

/// The canonical name of errno `n`, or `E<n>` when pinlab does not know it.
pub fn name(n: i32) -> String {
    TABLE.iter().find(|(_, v)| *v == n).map(|(s, _)| s.to_string()).unwrap_or_else(|| format!("E{n}"))
}

/// The number of a known errno name (aliases included).
pub fn number(name: &str) -> Option<i32> {
    TABLE.iter().find(|(s, _)| *s == name).map(|(_, v)| *v)
}

/// The canonical spelling of a known errno name (`ENOTSUP` → `EOPNOTSUPP`).
pub fn canonical(name: &str) -> Option<String> {
    number(name).map(self::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        assert_eq!(name(95), "EOPNOTSUPP");
        assert_eq!(name(35), "EDEADLK");
        assert_eq!(name(4095), "E4095");
        assert_eq!(canonical("ENOTSUP").as_deref(), Some("EOPNOTSUPP"));
        assert_eq!(canonical("EDEADLOCK").as_deref(), Some("EDEADLK"));
        assert_eq!(canonical("ENOPE"), None);
        for (n, v) in TABLE {
            assert_eq!(number(n), Some(*v), "{n}");
        }
    }
}
