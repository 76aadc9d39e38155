//! Guest-side code shared by pinlab's guest programs: the init, the scenario
//! runner, the RDMA server and client.

pub mod bench;
pub mod rdma;
pub mod region;
pub mod worker;

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

/// Why a step did not return `ok`: the errno the kernel gave (when there was
/// one) and a message saying which call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    /// The errno a system call or verbs call returned, if the failure was one.
    pub errno: Option<i32>,
    /// What was being done, e.g. `ibv_reg_mr(addr=0x7f.., len=2097152)`.
    pub message: String,
}

impl StepError {
    /// A failure that carries the kernel's errno.
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        StepError { errno: Some(errno), message: message.into() }
    }

    /// A failure of pinlab itself (no errno): a bug or a broken environment.
    pub fn other(message: impl Into<String>) -> Self {
        StepError { errno: None, message: message.into() }
    }

    /// `errno` from the last failed libc call, with context.
    pub fn last_os(message: impl Into<String>) -> Self {
        let e = std::io::Error::last_os_error();
        StepError::errno(e.raw_os_error().unwrap_or(0), format!("{}: {e}", message.into()))
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(n) => write!(f, "{} ({})", self.message, pinlab_scenarios::errno::name(n)),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for StepError {}
