//! The client side of one RDMA WRITE: a separate process that writes the
//! pattern into the server's MR.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sideway::ibverbs::completion::PollCompletionQueueError;
use sideway::ibverbs::queue_pair::{PostSendError, PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags};

use super::channel::{connect_until, remaining, unexpected, Endpoint, Msg, Wire};
use super::device::{Device, Mr};
use super::pattern::fill_pattern;
use super::qp::{wc_status_name, RcQp};
use super::{step, MAX_CHUNK, SEND_DEPTH};
use crate::region::Region;
use crate::StepError;

fn post_send_errno(e: &PostSendError) -> Option<i32> {
    match e {
        PostSendError::Ibverbs(e)
        | PostSendError::InvalidWorkRequest(e)
        | PostSendError::InvalidQueuePair(e)
        | PostSendError::NotEnoughResources(e) => e.raw_os_error(),
        _ => None,
    }
}

/// What the client did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientReport {
    /// The RDMA device used.
    pub device: String,
    /// Bytes written into the server's region (all of it).
    pub bytes: u64,
    /// RDMA WRITE work requests posted.
    pub chunks: u64,
    /// Bytes per work request (the last may be shorter).
    pub chunk_size: u64,
    /// From the first post to the last completion, in microseconds.
    pub elapsed_us: u64,
    /// From the TCP connect to the server's "ready", in microseconds.
    pub setup_us: u64,
    /// `bytes / elapsed` in MiB/s.
    pub mib_per_s: f64,
    /// Path MTU in bytes.
    pub path_mtu: u32,
    /// The local GID used, e.g. `rxe0[3]=::ffff:192.0.2.1 (RoCE v2)`.
    pub gid: String,
}

impl ClientReport {
    /// The write phase as a Duration.
    pub fn elapsed(&self) -> Duration {
        Duration::from_micros(self.elapsed_us)
    }
}

/// Client side of one RDMA WRITE (run it in a separate process from the
/// server): connect to `server`, open the device the server names, register
/// a buffer filled with the pattern, bring an RC QP to RTS, write the
/// server's whole region in chunks of at most [`MAX_CHUNK`] (each signaled,
/// each completion polled), and tell the server how it went. Everything is
/// bounded by `deadline`.
pub fn client_write(server: SocketAddr, deadline: Duration, seed: u64) -> anyhow::Result<ClientReport> {
    let t0 = Instant::now();
    let until = t0 + deadline;
    let stream = connect_until(server, until)?;
    let mut wire = Wire::new(stream)?;
    let hello = match wire.recv("the server's QP info (hello)", until)? {
        Msg::Hello(ep) => ep,
        Msg::Abort { reason, errno } => return Err(step(errno, format!("server aborted: {reason}")).into()),
        other => return Err(unexpected(&other, "hello").into()),
    };
    match client_run(&mut wire, &hello, t0, until, seed) {
        Ok(report) => Ok(report),
        Err(e) => {
            let done =
                Msg::Done { ok: false, bytes: 0, status: e.message.clone(), errno: e.failure.errno(), elapsed_us: 0 };
            let _ = wire.send(&done, Instant::now() + Duration::from_secs(1));
            Err(e.into())
        }
    }
}

fn client_run(
    wire: &mut Wire,
    server: &Endpoint,
    t0: Instant,
    until: Instant,
    seed: u64,
) -> Result<ClientReport, StepError> {
    let len = usize::try_from(server.len)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| StepError::errno(libc::EPROTO, format!("server offered an unusable length {}", server.len)))?;
    let dev = Device::open(Some(&server.device)).map_err(|e| StepError::other(format!("{e:#}")))?;
    let mut buf = Region::anon(len).map_err(|e| e.context("client buffer"))?;
    fill_pattern(seed, 0, buf.as_mut_slice());
    let mr = dev.reg_mr(&buf, 0..len).map_err(|e| e.context("client buffer"))?;
    let mut rc = RcQp::new(&dev, SEND_DEPTH)?;
    wire.send(&Msg::Hello(rc.endpoint(None)), until)?;
    rc.connect(server)?;
    match wire.recv("the server's ready message", until)? {
        Msg::Ready => {}
        Msg::Abort { reason, errno } => return Err(step(errno, format!("server aborted: {reason}"))),
        other => return Err(unexpected(&other, "ready")),
    }
    let setup = t0.elapsed();
    let (_, path_mtu) = rc.path_mtu(server)?;
    let chunk = chunk_size(rc.max_msg);
    let started = Instant::now();
    let chunks = write_all(&mut rc, &mr, server, chunk, until)?;
    let elapsed = started.elapsed();
    let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    wire.send(
        &Msg::Done { ok: true, bytes: server.len, status: wc_status_name(0).to_string(), errno: None, elapsed_us },
        until,
    )?;
    let secs = elapsed.as_secs_f64();
    Ok(ClientReport {
        device: dev.name().to_string(),
        bytes: server.len,
        chunks,
        chunk_size: chunk as u64,
        elapsed_us,
        setup_us: u64::try_from(setup.as_micros()).unwrap_or(u64::MAX),
        mib_per_s: if secs > 0.0 { server.len as f64 / (1024.0 * 1024.0) / secs } else { 0.0 },
        path_mtu,
        gid: rc.gid_text.clone(),
    })
}

/// Bytes per RDMA WRITE: [`MAX_CHUNK`], or the port's max message size if
/// smaller (0 means "not reported").
fn chunk_size(max_msg: u32) -> usize {
    match max_msg as usize {
        0 => MAX_CHUNK,
        m => m.min(MAX_CHUNK),
    }
}

/// Post RDMA WRITEs covering the server's region, at most SEND_DEPTH in
/// flight, each signaled; poll every completion. Returns the number posted.
fn write_all(rc: &mut RcQp, mr: &Mr, server: &Endpoint, chunk: usize, until: Instant) -> Result<u64, StepError> {
    let len = mr.len();
    let n = len.div_ceil(chunk);
    let local = mr.addr() as u64;
    let (mut next, mut done, mut in_flight) = (0usize, 0usize, 0u32);
    let mut idle_polls = 0u32;
    while done < n {
        while in_flight < SEND_DEPTH && next < n {
            let off = next * chunk;
            let this = chunk.min(len - off);
            let this32 = u32::try_from(this).map_err(|_| StepError::other(format!("chunk {this} exceeds u32")))?;
            let remote = server.addr.wrapping_add(off as u64);
            let mut guard = rc.qp.start_post_send();
            let wr = guard.construct_wr(next as u64, WorkRequestFlags::Signaled).setup_write(server.rkey, remote);
            // SAFETY: local+off..+this lies inside the registered client
            // buffer, which outlives the QP's use of it (we poll every
            // completion before returning, and mr/buf outlive this call).
            unsafe { wr.setup_sge(mr.lkey(), local + off as u64, this32) };
            guard.post().map_err(|e| {
                let errno = post_send_errno(&e);
                step(
                    errno,
                    format!(
                        "ibv_post_send(RDMA_WRITE, wr {next}, local={:#x}, len={this}, remote={remote:#x}, rkey={:#x}): {e}",
                        local + off as u64,
                        server.rkey
                    ),
                )
            })?;
            next += 1;
            in_flight += 1;
        }
        match rc.cq.start_poll() {
            Ok(poller) => {
                idle_polls = 0;
                for wc in poller {
                    let status = wc.status();
                    if status != 0 {
                        let wr = wc.wr_id();
                        return Err(StepError::other(format!(
                            "RDMA WRITE wr {wr} (remote offset {}, of {n}) completed with {} ({status}), vendor_err={:#x}",
                            wr.saturating_mul(chunk as u64),
                            wc_status_name(status),
                            wc.vendor_err()
                        )));
                    }
                    done += 1;
                    in_flight = in_flight.saturating_sub(1);
                }
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => {
                if remaining(until).is_none() {
                    return Err(StepError::errno(
                        libc::ETIMEDOUT,
                        format!(
                            "timed out polling the CQ: {done} of {n} RDMA WRITEs completed ({in_flight} in flight)"
                        ),
                    ));
                }
                idle_polls += 1;
                if idle_polls < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            Err(e) => {
                let errno = match &e {
                    PollCompletionQueueError::Ibverbs(io) => io.raw_os_error(),
                    _ => None,
                };
                return Err(step(errno, format!("ibv_poll_cq: {e}")));
            }
        }
    }
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks() {
        assert_eq!(chunk_size(0), MAX_CHUNK);
        assert_eq!(chunk_size(u32::MAX), MAX_CHUNK);
        assert_eq!(chunk_size(4096), 4096);
    }
}
