//! Guest-side code shared by pinlab's guest programs: the init, the scenario
//! runner, the RDMA server and client.

pub mod bench;
pub mod lease;
pub mod oracle;
pub mod race;
pub mod rdma;
pub mod region;
pub mod slowfuse;
pub mod worker;

use pinlab_scenarios::protocol::StepOutcome;
use std::fmt;

/// `--timeout-s N` for the demo programs: whole seconds, at least 1.
pub fn parse_timeout(v: std::ffi::OsString) -> Result<std::time::Duration, String> {
    let v = v.to_string_lossy();
    let secs: u64 = v.parse().map_err(|_| format!("--timeout-s {v:?}: not a number of seconds"))?;
    if secs == 0 {
        return Err("--timeout-s must be at least 1".to_string());
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// What kind of failure a [`StepError`] is; decides the step's [`StepOutcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A system call or verbs call returned this errno.
    Errno(i32),
    /// The calls succeeded but what was read back is not what was expected.
    Mismatch,
    /// The step was still blocked in the kernel at the step deadline.
    Blocked,
    /// pinlab itself failed (a tool, a worker, the environment), not the kernel.
    Error,
}

impl Failure {
    /// The errno, if the failure is one.
    pub fn errno(self) -> Option<i32> {
        match self {
            Failure::Errno(n) => Some(n),
            _ => None,
        }
    }
}

/// Why a step did not return `ok`: what kind of failure it was and a message
/// saying which call failed. Its errno, if any, is `e.failure.errno()`
/// (`StepError::errno` is the constructor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    /// What kind of failure this is.
    pub failure: Failure,
    /// What was being done, e.g. `ibv_reg_mr(addr=0x7f.., len=2097152)`.
    pub message: String,
}

impl StepError {
    /// A failure that carries the kernel's errno.
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        StepError { failure: Failure::Errno(errno), message: message.into() }
    }

    /// A failure of pinlab itself (no errno): a bug or a broken environment.
    pub fn other(message: impl Into<String>) -> Self {
        StepError { failure: Failure::Error, message: message.into() }
    }

    /// What was read back is not what was expected.
    pub fn mismatch(message: impl Into<String>) -> Self {
        StepError { failure: Failure::Mismatch, message: message.into() }
    }

    /// The step did not finish within its deadline.
    pub fn blocked(message: impl Into<String>) -> Self {
        StepError { failure: Failure::Blocked, message: message.into() }
    }

    /// A failure with the errno when there is one, else a failure of pinlab
    /// itself (for errors that may or may not come from a system call).
    pub fn maybe_errno(errno: Option<i32>, message: impl Into<String>) -> Self {
        match errno {
            Some(n) => StepError::errno(n, message),
            None => StepError::other(message),
        }
    }

    /// `errno` from the last failed libc call, with context.
    pub fn last_os(message: impl Into<String>) -> Self {
        StepError::io(&std::io::Error::last_os_error(), message)
    }

    /// A failed `nix` call: `message: <strerror> (os error N)`, the same text
    /// as [`StepError::last_os`] gives for a libc call.
    pub fn sys(errno: nix::errno::Errno, message: impl Into<String>) -> Self {
        StepError::io(&std::io::Error::from(errno), message)
    }

    /// A failed `std::io` call: `message: <error>`, with its errno (0 when
    /// the error has none).
    pub fn io(e: &std::io::Error, message: impl Into<String>) -> Self {
        StepError::errno(e.raw_os_error().unwrap_or(0), format!("{}: {e}", message.into()))
    }

    /// The same failure, its message prefixed with `context: `.
    pub fn context(self, context: &str) -> Self {
        StepError { failure: self.failure, message: format!("{context}: {}", self.message) }
    }

    /// How the step ended, as recorded in the results.
    pub fn outcome(&self) -> StepOutcome {
        match self.failure {
            Failure::Errno(n) => StepOutcome::Errno(pinlab_scenarios::errno::name(n)),
            Failure::Mismatch => StepOutcome::Mismatch,
            Failure::Blocked => StepOutcome::Blocked,
            Failure::Error => StepOutcome::Error,
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.failure {
            Failure::Errno(n) => write!(f, "{} ({})", self.message, pinlab_scenarios::errno::name(n)),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for StepError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_come_from_the_failure_kind_not_the_text() {
        assert_eq!(StepError::errno(26, "truncate").outcome(), StepOutcome::Errno("ETXTBSY".into()));
        assert_eq!(StepError::errno(4095, "x").outcome(), StepOutcome::Errno("E4095".into()));
        assert_eq!(StepError::other("mismatch: looks like one").outcome(), StepOutcome::Error);
        assert_eq!(StepError::mismatch("offset 3").outcome(), StepOutcome::Mismatch);
        assert_eq!(StepError::blocked("no answer").outcome(), StepOutcome::Blocked);
        assert_eq!(StepError::maybe_errno(None, "x").outcome(), StepOutcome::Error);
        assert_eq!(StepError::maybe_errno(Some(1), "x").failure.errno(), Some(1));
        assert_eq!(StepError::mismatch("x").failure.errno(), None);
    }

    #[test]
    fn system_errors_read_like_strerror() {
        let e = StepError::sys(nix::errno::Errno::EINVAL, "fallocate(f)");
        assert_eq!(e.failure.errno(), Some(libc::EINVAL));
        assert_eq!(e.message, format!("fallocate(f): {}", std::io::Error::from_raw_os_error(libc::EINVAL)));
        assert_eq!(e.to_string(), format!("{} (EINVAL)", e.message));
        let c = StepError::errno(2, "open(x)").context("client buffer");
        assert_eq!((c.failure.errno(), c.message.as_str()), (Some(2), "client buffer: open(x)"));
        assert_eq!(StepError::mismatch("m").to_string(), "m");
    }
}
