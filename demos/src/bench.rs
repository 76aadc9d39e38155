//! The guest half of `cargo xtask bench`: DESIGN.md's in-guest figures,
//! measured on the lab as `pinlab-runner` set it up (FS-DAX mounted at
//! [`PMEM_MNT`], rxe up).
//!
//! - `ibv_reg_mr` of anonymous memory vs an FS-DAX file under an unbreakable
//!   layout lease (target: the file costs at most 1.5× the anonymous memory);
//! - RDMA WRITE bandwidth from an `rdma-client` process into both (target: at
//!   least 0.9×), every byte verified afterwards;
//! - how long the holder's `ftruncate` and `fallocate(PUNCH_HOLE)` over its pinned pages take
//!   to fail (target: under 1 ms, i.e. nothing waits for the pin).
//!
//! Each figure is measured for real or carries the error that stopped it
//! (on the stock kernel: `F_SETLEASE` answers EINVAL, so only the anonymous
//! figures exist). Nothing here knows what a "good" number is; the host
//! compares with the targets.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::ftruncate;
use pinlab_scenarios::bench::{key, BenchPlan, BenchResults, Figure};
use pinlab_scenarios::plan::LeaseKind;

use crate::lease::set_lease;
use crate::rdma::{self, Device, Mr};
use crate::region::Region;
use crate::worker::{ADDR, CLIENT, PMEM_MNT};
use crate::StepError;

const MIB: usize = 1 << 20;

fn figure(key: &str, what: String, unit: &str) -> Figure {
    Figure { key: key.into(), what, unit: unit.into(), samples: Vec::new(), error: None }
}

/// Take one sample unless the figure already failed; a failure is kept as
/// the figure's error (and ends its sampling).
fn sample(fig: &mut Figure, progress: &mut dyn FnMut(&Figure), f: impl FnOnce() -> Result<f64, StepError>) {
    if fig.error.is_some() {
        return;
    }
    match f() {
        Ok(v) => fig.samples.push(v),
        Err(e) => fig.error = Some(e.to_string()),
    }
    progress(fig);
}

/// A fresh FS-DAX file region of `len` bytes at `path` (checked to be DAX)
/// under `F_LAYOUT|F_EXCLUSIVE`.
fn leased_dax_file(path: &Path, len: usize) -> Result<Region, StepError> {
    let region = Region::file(path, len)?;
    match region.is_dax()? {
        Some(true) => {}
        other => return Err(StepError::other(format!("{} is not DAX (statx says {other:?})", path.display()))),
    }
    let file = region.backing_file().ok_or_else(|| StepError::other("file region without a file"))?;
    set_lease(file, LeaseKind::LayoutExclusive)?;
    Ok(region)
}

/// Write one byte per page, so every page is mapped writable before the
/// registration (as [`Region::anon`] leaves anonymous memory).
fn touch_pages(region: &mut Region) {
    for b in region.as_mut_slice().iter_mut().step_by(4096) {
        // SAFETY: b is a valid &mut u8 into the mapping; volatile keeps the
        // store (and so the write fault) from being optimised away.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

fn timed_reg(dev: &Device, region: &Region) -> Result<(Mr, Duration), StepError> {
    let t = Instant::now();
    let mr = dev.reg_mr(region, 0..region.len())?;
    Ok((mr, t.elapsed()))
}

/// One RDMA WRITE of the whole region by `rdma-client`, then every byte
/// checked; returns the client's MiB/s.
fn write_and_verify(dev: &Device, region: &Region) -> Result<f64, StepError> {
    let mr = dev.reg_mr(region, 0..region.len())?;
    let (_, report) = rdma::write_from_client(dev, &mr, CLIENT, ADDR, Duration::from_secs(120), rdma::DEFAULT_SEED)?;
    mr.dereg()?;
    if let Some((off, got, want)) = rdma::first_pattern_mismatch(rdma::DEFAULT_SEED, region.as_slice()) {
        return Err(StepError::other(format!(
            "after the RDMA WRITE, offset {off} holds {got:#04x}, expected {want:#04x}"
        )));
    }
    Ok(report.mib_per_s)
}

/// Time a call that must fail with EDEADLK: a layout change by the lease
/// holder over pages it pinned itself, which goes through the busy-page scan
/// (another process would be stopped earlier, by the lease, with ETXTBSY).
/// Success is an error of the bench: blocks under a live MR went away.
fn timed_refusal(what: &str, call: impl FnOnce() -> nix::Result<()>) -> Result<f64, StepError> {
    let t = Instant::now();
    let r = call();
    let took = t.elapsed();
    match r {
        Ok(()) => Err(StepError::other(format!("{what} succeeded over pinned pages (expected EDEADLK)"))),
        Err(Errno::EDEADLK) => Ok(took.as_secs_f64() * 1e6),
        Err(e) => Err(StepError::errno(e as i32, format!("{what}: {} (expected EDEADLK)", std::io::Error::from(e)))),
    }
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Run the whole plan. `progress` is called after every sample.
pub fn run(plan: &BenchPlan, progress: &mut dyn FnMut(&Figure)) -> BenchResults {
    let reg_len = usize::try_from(plan.reg_mib).unwrap_or(0).saturating_mul(MIB);
    let write_len = usize::try_from(plan.write_mib).unwrap_or(0).saturating_mul(MIB);
    let mnt = PathBuf::from(PMEM_MNT);
    let mut reg_anon = figure(
        key::REG_ANON,
        format!("ibv_reg_mr, {} MiB MAP_SHARED|MAP_ANONYMOUS (pages already present)", plan.reg_mib),
        "ms",
    );
    let mut reg_dax = figure(
        key::REG_FSDAX,
        format!(
            "ibv_reg_mr, {} MiB FS-DAX file MAP_SHARED under F_LAYOUT|F_EXCLUSIVE (pages already mapped writable)",
            plan.reg_mib
        ),
        "ms",
    );
    let mut write_anon = figure(
        key::WRITE_ANON,
        format!("RDMA WRITE of {} MiB into an anonymous MR, verified", plan.write_mib),
        "MiB/s",
    );
    let mut write_dax =
        figure(key::WRITE_FSDAX, format!("RDMA WRITE of {} MiB into an FS-DAX MR, verified", plan.write_mib), "MiB/s");
    let mut reg_cold = figure(
        key::REG_FSDAX_COLD,
        format!(
            "ibv_reg_mr, {} MiB freshly fallocated FS-DAX file under the lease: the call write-faults every page \
             and the filesystem zeroes the unwritten blocks",
            plan.reg_mib
        ),
        "ms",
    );
    let pinned_what = format!("a {} MiB FS-DAX file an MR pins, lease released", plan.reg_mib);
    let mut punch_first = figure(
        key::PUNCH_FIRST,
        format!(
            "first fallocate(PUNCH_HOLE|KEEP_SIZE), 2 MiB in the middle of {pinned_what} (unmaps that range): EDEADLK"
        ),
        "us",
    );
    let mut punch =
        figure(key::PUNCH_PINNED, "later fallocate(PUNCH_HOLE|KEEP_SIZE) of the same range: EDEADLK".into(), "us");
    let mut trunc_first = figure(
        key::TRUNC_FIRST,
        format!("first ftruncate(fd, 0) of {pinned_what} (unmaps the whole file from the process): EDEADLK"),
        "us",
    );
    let mut trunc = figure(key::TRUNC_PINNED, "later ftruncate(fd, 0) of the same file: EDEADLK".into(), "us");

    let dev = match Device::open(None) {
        Ok(d) => d,
        Err(e) => {
            let msg = format!("no RDMA device: {e:#}");
            let mut all =
                vec![reg_anon, reg_dax, reg_cold, write_anon, write_dax, punch_first, punch, trunc_first, trunc];
            for f in &mut all {
                f.error = Some(msg.clone());
            }
            return BenchResults { figures: all };
        }
    };

    // Registration cost, interleaved so drift hits both alike.
    let reg_path = mnt.join("bench-reg");
    for _ in 0..plan.reps {
        sample(&mut reg_anon, progress, || {
            let region = Region::anon(reg_len)?;
            let (mr, took) = timed_reg(&dev, &region)?;
            mr.dereg()?;
            Ok(took.as_secs_f64() * 1e3)
        });
        sample(&mut reg_dax, progress, || {
            let mut region = leased_dax_file(&reg_path, reg_len)?;
            touch_pages(&mut region);
            let (mr, took) = timed_reg(&dev, &region)?;
            mr.dereg()?;
            Ok(took.as_secs_f64() * 1e3)
        });
        remove(&reg_path);
        sample(&mut reg_cold, progress, || {
            let region = leased_dax_file(&reg_path, reg_len)?;
            let (mr, took) = timed_reg(&dev, &region)?;
            mr.dereg()?;
            Ok(took.as_secs_f64() * 1e3)
        });
        remove(&reg_path);
    }

    // Bandwidth.
    let write_path = mnt.join("bench-write");
    for _ in 0..plan.reps {
        sample(&mut write_anon, progress, || write_and_verify(&dev, &Region::anon(write_len)?));
        sample(&mut write_dax, progress, || write_and_verify(&dev, &leased_dax_file(&write_path, write_len)?));
        remove(&write_path);
    }

    // Failing layout changes: register under the lease; the holder's own
    // truncate and punch over its pins must then fail at once (EDEADLK:
    // the lease keeps other processes out earlier, and it cannot be
    // released while pinned).
    let pinned_path = mnt.join("bench-pinned");
    let pinned = leased_dax_file(&pinned_path, reg_len).and_then(|region| {
        let mr = dev.reg_mr(&region, 0..region.len())?;
        Ok((region, mr))
    });
    match &pinned {
        Ok((region, _)) => {
            let file = region.backing_file();
            let mid = libc::off_t::try_from(reg_len / 2).unwrap_or(0);
            let two_mib = libc::off_t::try_from(2 * MIB).unwrap_or(0);
            let punch_mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            let punch_call = || fallocate(file.ok_or(Errno::EBADF)?, punch_mode, mid, two_mib);
            let trunc_call = || ftruncate(file.ok_or(Errno::EBADF)?, 0);
            let punch_name = "fallocate(PUNCH_HOLE|KEEP_SIZE)";
            sample(&mut punch_first, progress, || timed_refusal(punch_name, punch_call));
            for _ in 0..plan.fail_reps {
                sample(&mut punch, progress, || timed_refusal(punch_name, punch_call));
            }
            sample(&mut trunc_first, progress, || timed_refusal("ftruncate(fd, 0)", trunc_call));
            for _ in 0..plan.fail_reps {
                sample(&mut trunc, progress, || timed_refusal("ftruncate(fd, 0)", trunc_call));
            }
        }
        Err(e) => {
            for f in [&mut punch_first, &mut punch, &mut trunc_first, &mut trunc] {
                f.error = Some(e.to_string());
            }
        }
    }
    if let Ok((region, mr)) = pinned {
        if let Err(e) = mr.dereg() {
            trunc.error.get_or_insert(format!("dereg_mr after the truncates: {e}"));
        }
        drop(region);
    }
    remove(&pinned_path);
    BenchResults {
        figures: vec![reg_anon, reg_dax, reg_cold, write_anon, write_dax, punch_first, punch, trunc_first, trunc],
    }
}
