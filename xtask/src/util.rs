//! Paths, the cache layout, running tools with logs, hashing.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The repository root (every relative path in xtask is relative to it).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
        .to_path_buf()
}

/// pinlab's cache: `$XDG_CACHE_HOME/pinlab`, default `~/.cache/pinlab`.
/// Everything expensive lives here (downloads, kernel source, build dirs,
/// ccache, kernels, rootfs, tools) so a fresh clone on the same machine is warm.
#[derive(Clone, Debug)]
pub struct Cache {
    /// The cache root.
    pub root: PathBuf,
}

impl Cache {
    /// Locate the cache from the environment.
    pub fn from_env() -> Result<Cache> {
        let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(v) => PathBuf::from(v),
            None => {
                let home = std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?;
                PathBuf::from(home).join(".cache")
            }
        };
        Ok(Cache { root: base.join("pinlab") })
    }

    /// A subdirectory, created if missing.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.root.join(name);
        fs_err::create_dir_all(&d).with_context(|| format!("Failed to create {}", d.display()))?;
        Ok(d)
    }
}

/// Where run outputs go: `target/pinlab`.
pub fn target_dir() -> PathBuf {
    project_root().join("target").join("pinlab")
}

/// Print a command the way a person would type it.
pub fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), quote(v)));
        }
    }
    s.push_str(&quote(cmd.get_program()));
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=/.,:+@%".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Run `cmd`, streaming its stdout and stderr lines into `log` (appended) and
/// to `on_line`. Fails with the command, its exit code, the log's path and
/// the last lines of output.
pub fn run_logged(mut cmd: Command, log: &Path, mut on_line: impl FnMut(&str)) -> Result<()> {
    let shown = show(&cmd);
    let mut logf = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("Failed to open log {}", log.display()))?;
    writeln!(logf, "$ {shown}")?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // A long build (make, cargo) must not outlive an interrupted pinlab.
    crate::cleanup::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().with_context(|| {
        format!("Failed to start `{shown}` (is {} installed?)", cmd.get_program().to_string_lossy())
    })?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().context("no stdout pipe")?);
    let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().context("no stderr pipe")?);
    for pipe in [out, err] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                if tx.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut tail = std::collections::VecDeque::new();
    for line in rx {
        writeln!(logf, "{line}")?;
        on_line(&line);
        tail.push_back(line);
        if tail.len() > 25 {
            tail.pop_front();
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().with_context(|| format!("Failed to wait for `{shown}`"))?;
    if !status.success() {
        let tail: Vec<_> = tail.into_iter().collect();
        bail!("`{shown}` failed ({status})\nfull log: {}\nlast lines:\n{}", log.display(), tail.join("\n"));
    }
    Ok(())
}

/// Run a short command, capturing stdout; on failure say what ran and what it printed.
pub fn output(mut cmd: Command) -> Result<String> {
    let shown = show(&cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("Failed to start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({})\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`output`], but the command is killed if it has not finished within
/// `deadline` (Chromium, for one, can hang on a broken profile or display).
pub fn output_within(mut cmd: Command, deadline: Duration) -> Result<String> {
    use std::io::Read;
    let shown = show(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("Failed to start `{shown}`"))?;
    crate::cleanup::register_pid(child.id());
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().with_context(|| format!("Failed to wait for `{shown}`"))? {
            break Some(st);
        }
        if t.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    crate::cleanup::forget_pid(child.id());
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    match status {
        None => bail!(
            "`{shown}` did not finish within {}; killed. It printed: {}",
            fmt_duration(deadline),
            String::from_utf8_lossy(&err).trim()
        ),
        Some(st) if !st.success() => {
            bail!("`{shown}` failed ({st})\n{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err))
        }
        Some(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
    }
}

/// Print then run a short command, passing its output through.
pub fn run_shown(mut cmd: Command) -> Result<()> {
    let shown = show(&cmd);
    eprintln!("$ {shown}");
    let status = cmd.status().with_context(|| format!("Failed to start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Is `prog` on PATH?
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(prog)).find(|p| is_executable(p))
}

/// Is `p` an executable file?
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// A content hash, as hex, over labelled parts (label and length are mixed in
/// so that moving bytes between parts changes the key).
#[derive(Default)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    /// Add a labelled part.
    pub fn part(&mut self, label: &str, bytes: &[u8]) -> &mut Self {
        self.0.update((label.len() as u64).to_le_bytes());
        self.0.update(label.as_bytes());
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// The first 16 hex digits of the digest.
    pub fn finish(&self) -> String {
        let d = self.0.clone().finalize();
        d.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// Write `bytes` to `path` atomically (temp file + rename), so an interrupted
/// run never leaves a half-written cache entry.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = staging_path(path);
    fs_err::write(&tmp, bytes).with_context(|| format!("Failed to write {}", tmp.display()))?;
    fs_err::rename(&tmp, path).with_context(|| format!("Failed to rename {} to {}", tmp.display(), path.display()))
}

/// An advisory lock on a file (`flock`), released when dropped. Shared
/// cache artefacts are checked and built under one, so runs from one or
/// several clones either wait for a complete artefact or build it once.
#[derive(Debug)]
pub struct FileLock {
    _file: fs_err::File,
}

impl FileLock {
    /// Take the exclusive lock on `path` (created if missing), waiting for
    /// another holder and saying so if the wait is noticeable.
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        if let Some(parent) = path.parent() {
            fs_err::create_dir_all(parent).with_context(|| format!("Failed to create {}", parent.display()))?;
        }
        let f = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("Failed to open the lock file {}", path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                eprintln!("pinlab: waiting for another pinlab run holding {}", path.display());
                f.lock().with_context(|| format!("Failed to lock {}", path.display()))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("Failed to lock {}", path.display()));
            }
        }
        Ok(FileLock { _file: f })
    }
}

/// A name for a staging sibling of `path` that no other process uses:
/// `NAME.tmp-PID-N`.
pub fn staging_path(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{name}.tmp-{}-{n}", std::process::id()))
}

/// Move a complete staging directory into place (replacing what was there).
pub fn publish_dir(staging: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        let old = staging_path(dest);
        fs_err::rename(dest, &old).with_context(|| format!("Failed to move {} aside", dest.display()))?;
        let _ = fs_err::remove_dir_all(&old);
    }
    fs_err::rename(staging, dest)
        .with_context(|| format!("Failed to rename {} to {}", staging.display(), dest.display()))
}

/// `12.3s` / `4m05s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s as u64) % 60)
    }
}

/// Seconds since `t`, formatted.
pub fn since(t: Instant) -> String {
    fmt_duration(t.elapsed())
}

/// UTC `YYYYMMDD-HHMMSS` for run ids (no date crate needed).
pub fn utc_stamp(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, (rem % 3600) / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_within_kills_at_the_deadline() {
        let t = Instant::now();
        let mut c = Command::new("sleep");
        c.arg("30");
        let e = output_within(c, Duration::from_millis(200)).unwrap_err().to_string();
        assert!(e.contains("did not finish within") && e.contains("sleep 30"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let mut c = Command::new("echo");
        c.arg("hi");
        assert_eq!(output_within(c, Duration::from_secs(5)).unwrap(), "hi\n");
    }

    #[test]
    fn key_is_stable_and_sensitive() {
        let k = |a: &[u8], b: &[u8]| KeyHasher::default().part("a", a).part("b", b).finish();
        // Fixed value: a change here invalidates every cached kernel; do it on purpose only.
        assert_eq!(k(b"x", b"y"), k(b"x", b"y"));
        assert_eq!(k(b"x", b"y").len(), 16);
        assert_ne!(k(b"xy", b""), k(b"x", b"y"));
        assert_ne!(k(b"x", b"y"), k(b"x", b"z"));
    }

    #[test]
    fn stamps() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(utc_stamp(t), "20261118-110640");
        assert_eq!(utc_stamp(std::time::UNIX_EPOCH), "19700101-000000");
    }

    #[test]
    fn shell_quoting() {
        let mut c = Command::new("make");
        c.arg("O=/tmp/a b").arg("-j2");
        assert_eq!(show(&c), "make 'O=/tmp/a b' -j2");
    }

    #[test]
    fn failed_command_keeps_log_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let mut c = Command::new("sh");
        c.args(["-c", "echo hello; echo oops >&2; exit 3"]);
        let mut seen = Vec::new();
        let e = run_logged(c, &log, |l| seen.push(l.to_string())).unwrap_err().to_string();
        assert!(e.contains("exit status: 3"), "{e}");
        assert!(e.contains(&log.display().to_string()), "{e}");
        assert!(e.contains("oops"), "{e}");
        assert_eq!(seen.len(), 2);
        assert!(fs_err::read_to_string(&log).unwrap().contains("hello"));
    }
}
