//! Races inside one process: registration against truncation (S30) and
//! against the lease's own lifetime (S36).
//!
//! The verbs calls stay on the calling thread (the RDMA context is not
//! shared between threads); the other side of each race is a thread that
//! needs nothing but a descriptor or a path. Both loops run for a bounded
//! time and count what every call returned, so the step's detail says how
//! hard the race was tried.

use crate::lease;
use crate::rdma::Device;
use crate::region::Region;
use crate::StepError;
use pinlab_scenarios::errno;
use pinlab_scenarios::plan::LeaseKind;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often each result came back: `ok` or the errno's name.
#[derive(Default, Debug)]
struct Tally(BTreeMap<String, u64>);

impl Tally {
    fn add<E>(&mut self, r: &Result<(), E>, errno_of: impl Fn(&E) -> Option<i32>) {
        let key = match r {
            Ok(()) => "ok".to_string(),
            Err(e) => errno_of(e).map(errno::name).unwrap_or_else(|| "error".into()),
        };
        *self.0.entry(key).or_default() += 1;
    }

    fn count(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// The most frequent errno, if any call failed with one.
    fn commonest_errno(&self) -> Option<i32> {
        self.0.iter().filter(|(k, _)| k.as_str() != "ok").max_by_key(|(_, n)| **n).and_then(|(k, _)| errno::number(k))
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, n)| format!("{k} {n}")).collect();
        write!(f, "{}", if parts.is_empty() { "none".to_string() } else { parts.join(", ") })
    }
}

fn step_errno(e: &StepError) -> Option<i32> {
    e.failure.errno()
}

/// Loop `ibv_reg_mr` of all of `region`, keeping each MR for `hold` (zero:
/// deregister at once), until `stop` is set. Pauses 1 ms after a failure so
/// a loop that can never succeed does not starve the other thread.
fn reg_loop(dev: &Device, region: &Region, hold: Duration, stop: &AtomicBool) -> Result<Tally, StepError> {
    let mut regs = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        match dev.reg_mr_with(region, 0..region.len(), false) {
            Ok(mr) => {
                regs.add::<StepError>(&Ok(()), step_errno);
                if !hold.is_zero() {
                    std::thread::sleep(hold);
                }
                mr.dereg()?;
            }
            Err(e) if e.failure.errno().is_some() => {
                regs.add(&Err(e), step_errno);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(regs)
}

/// Runs `reg_loop` on this thread against `other` on a second one for `run`.
/// The registration loop stops first, so whatever the other thread waits
/// for is released before it is joined.
fn race<T: Send>(
    dev: &Device,
    region: &Region,
    hold: Duration,
    run: Duration,
    other: impl FnOnce(&AtomicBool) -> T + Send,
) -> Result<(Tally, T), StepError> {
    let stop_regs = AtomicBool::new(false);
    let stop_other = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| other(&stop_other));
        let timer = s.spawn(|| {
            std::thread::sleep(run);
            stop_regs.store(true, Ordering::Relaxed);
        });
        let regs = reg_loop(dev, region, hold, &stop_regs);
        stop_regs.store(true, Ordering::Relaxed);
        stop_other.store(true, Ordering::Relaxed);
        let _ = timer.join();
        let got = h.join().map_err(|_| StepError::other("the racing thread panicked"))?;
        Ok((regs?, got))
    })
}

/// What the truncating thread saw.
#[derive(Default)]
struct Truncates {
    tally: Tally,
    slowest: Duration,
    slowest_size: u64,
    slowest_result: String,
}

/// `race_reg_truncate`: see [`pinlab_scenarios::plan::Action::RaceRegTruncate`].
pub fn reg_truncate(
    dev: &Device,
    region: &Region,
    file: &File,
    seconds: u32,
    hold_ms: u32,
    max_ms: u32,
) -> Result<String, StepError> {
    let len = region.len() as u64;
    let path = region.path().map(|p| p.display().to_string()).unwrap_or_else(|| "the file".into());
    let pages = small_pages(region)?;
    let (regs, t) =
        race(dev, region, Duration::from_millis(hold_ms.into()), Duration::from_secs(seconds.into()), |stop| {
            let mut t = Truncates::default();
            'outer: loop {
                for size in [len / 2, len] {
                    if stop.load(Ordering::Relaxed) {
                        break 'outer;
                    }
                    let start = Instant::now();
                    let r = nix::unistd::ftruncate(file, size as libc::off_t);
                    let took = start.elapsed();
                    t.tally.add(&r, |e| Some(*e as i32));
                    if took > t.slowest {
                        t.slowest = took;
                        t.slowest_size = size;
                        t.slowest_result = match r {
                            Ok(()) => "ok".into(),
                            Err(e) => errno::name(e as i32),
                        };
                    }
                }
            }
            t
        })?;
    // Leave the file whole for the steps after the race.
    let restore = nix::unistd::ftruncate(file, len as libc::off_t);
    let said = format!(
        "{seconds} s, {pages}: {} ibv_reg_mr ({}), each MR kept {hold_ms} ms; {} ftruncate to {} and {len} bytes ({}); \
         slowest truncate {} ms (to {} bytes, {})",
        regs.total(),
        regs,
        t.tally.total(),
        len / 2,
        t.tally,
        t.slowest.as_millis(),
        t.slowest_size,
        t.slowest_result
    );
    if let Err(e) = restore {
        return Err(StepError::sys(e, format!("ftruncate({path}, {len}) after the race; {said}")));
    }
    if regs.count("ok") == 0 {
        let n = regs.commonest_errno().unwrap_or(libc::EIO);
        return Err(StepError::errno(n, format!("no registration succeeded, nothing raced: {said}")));
    }
    if t.slowest >= Duration::from_millis(max_ms.into()) {
        return Err(StepError::mismatch(format!(
            "mismatch: a truncate took {} ms (limit {max_ms} ms): it waited for pages that were being pinned \
             for as long as the MR lived; {said}",
            t.slowest.as_millis()
        )));
    }
    Ok(said)
}

/// Mark `region` `MADV_NOHUGEPAGE`, so DAX faults map it 4 KiB at a time
/// and a registration pins it page by page (with 2 MiB mappings a batch of
/// 512 pages is faulted and pinned at once, and the window between pinning
/// and counting the pins is too short to meet). Says which it got.
fn small_pages(region: &Region) -> Result<&'static str, StepError> {
    let ptr = std::ptr::NonNull::new(region.as_mut_ptr().cast::<libc::c_void>())
        .ok_or_else(|| StepError::other("the region has no address"))?;
    // SAFETY: ptr..ptr+len is the region's own live mapping; MADV_NOHUGEPAGE
    // only changes how later faults map it, never its contents.
    match unsafe { nix::sys::mman::madvise(ptr, region.len(), nix::sys::mman::MmapAdvise::MADV_NOHUGEPAGE) } {
        Ok(()) => Ok("4 KiB mappings (MADV_NOHUGEPAGE)"),
        // A kernel without transparent huge pages maps DAX 4 KiB at a time anyway.
        Err(nix::errno::Errno::EINVAL) => Ok("4 KiB mappings (no THP)"),
        Err(e) => Err(StepError::sys(e, format!("madvise({ptr:p}, {}, MADV_NOHUGEPAGE)", region.len()))),
    }
}

/// `race_lease_close`: see [`pinlab_scenarios::plan::Action::RaceLeaseClose`].
pub fn lease_close(dev: &Device, region: &Region, path: &Path, seconds: u32) -> Result<String, StepError> {
    let (regs, (opens, leases)) = race(dev, region, Duration::ZERO, Duration::from_secs(seconds.into()), |stop| {
        let mut opens = Tally::default();
        let mut leases = Tally::default();
        while !stop.load(Ordering::Relaxed) {
            match OpenOptions::new().read(true).write(true).open(path) {
                Ok(f) => {
                    opens.add::<()>(&Ok(()), |_| None);
                    leases.add(&lease::set_lease(&f, LeaseKind::LayoutExclusive), step_errno);
                    drop(f);
                }
                Err(e) => {
                    opens.add(&Err(e), |e| e.raw_os_error());
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        (opens, leases)
    })?;
    let said = format!(
        "{seconds} s: {} open/F_SETLEASE(F_LAYOUT|F_EXCLUSIVE)/close (open: {opens}; lease: {leases}) against {} \
         ibv_reg_mr/ibv_dereg_mr ({regs})",
        opens.total(),
        regs.total()
    );
    if regs.count("ok") == 0 {
        let n = regs.commonest_errno().unwrap_or(libc::EIO);
        return Err(StepError::errno(n, format!("no registration succeeded, nothing raced: {said}")));
    }
    Ok(said)
}
