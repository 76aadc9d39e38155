//! The client side of one RDMA transfer: a separate process that writes the
//! pattern into the server's MR (RDMA WRITE) or reads the MR back (RDMA
//! READ) and says what it found there.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sideway::ibverbs::completion::PollCompletionQueueError;
use sideway::ibverbs::queue_pair::{PostSendError, PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags};

use super::channel::{connect_until, remaining, unexpected, Endpoint, Msg, Wire};
use super::device::{Device, Mr};
use super::pattern::{fill_pattern, BlockCensus};
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

/// Which one-sided operation the client does on the server's whole MR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientOp {
    /// RDMA WRITE the pattern into it.
    #[default]
    Write,
    /// RDMA READ it into the client's buffer and count what came back.
    Read,
}

impl ClientOp {
    /// `RDMA WRITE` / `RDMA READ`, for messages.
    pub fn verb(self) -> &'static str {
        match self {
            ClientOp::Write => "RDMA WRITE",
            ClientOp::Read => "RDMA READ",
        }
    }
}

/// The byte the client fills its buffer with before an RDMA READ, so that
/// blocks the READ did not deliver show up as blocks of this byte, not as
/// zeroes that a freshly allocated file block could also hold.
pub const READ_FILL: u8 = 0xee;

/// What the client did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientReport {
    /// The operation.
    #[serde(default)]
    pub op: ClientOp,
    /// The RDMA device used.
    pub device: String,
    /// Bytes written into (or read from) the server's region (all of it).
    pub bytes: u64,
    /// The pattern seed written, or compared with what was read.
    #[serde(default)]
    pub seed: u64,
    /// For a READ: what came back, block by block, against the pattern
    /// `seed` (the same bytes always give the same census).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<BlockCensus>,
    /// For a READ: FNV-1a (64 bit) of every byte read, to compare runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_fnv1a: Option<String>,
    /// RDMA WRITE (READ) work requests posted.
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
    client_transfer(server, deadline, seed, ClientOp::Write)
}

/// Client side of one RDMA READ of the server's whole region, like
/// [`client_write`] but the other way: the buffer starts as [`READ_FILL`],
/// RDMA READs fill it, and the report's `read` counts its blocks against
/// pattern `seed`.
pub fn client_read(server: SocketAddr, deadline: Duration, seed: u64) -> anyhow::Result<ClientReport> {
    client_transfer(server, deadline, seed, ClientOp::Read)
}

/// [`client_write`] or [`client_read`].
pub fn client_transfer(
    server: SocketAddr,
    deadline: Duration,
    seed: u64,
    op: ClientOp,
) -> anyhow::Result<ClientReport> {
    let t0 = Instant::now();
    let until = t0 + deadline;
    let stream = connect_until(server, until)?;
    let mut wire = Wire::new(stream)?;
    let hello = match wire.recv("the server's QP info (hello)", until)? {
        Msg::Hello(ep) => ep,
        Msg::Abort { reason, errno } => return Err(step(errno, format!("server aborted: {reason}")).into()),
        other => return Err(unexpected(&other, "hello").into()),
    };
    match client_run(&mut wire, &hello, t0, until, seed, op) {
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
    op: ClientOp,
) -> Result<ClientReport, StepError> {
    let len = usize::try_from(server.len)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| StepError::errno(libc::EPROTO, format!("server offered an unusable length {}", server.len)))?;
    let dev = Device::open(Some(&server.device)).map_err(|e| StepError::other(format!("{e:#}")))?;
    let mut buf = Region::anon(len).map_err(|e| e.context("client buffer"))?;
    match op {
        ClientOp::Write => fill_pattern(seed, 0, buf.as_mut_slice()),
        ClientOp::Read => buf.as_mut_slice().fill(READ_FILL),
    }
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
    let chunks = transfer_all(&mut rc, &mr, server, chunk, until, op)?;
    let elapsed = started.elapsed();
    let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    wire.send(
        &Msg::Done { ok: true, bytes: server.len, status: wc_status_name(0).to_string(), errno: None, elapsed_us },
        until,
    )?;
    // Every completion was polled: the READ's bytes are all in the buffer.
    let (read, read_fnv1a) = match op {
        ClientOp::Write => (None, None),
        ClientOp::Read => {
            (Some(BlockCensus::of(seed, buf.as_slice())), Some(format!("{:016x}", fnv1a(buf.as_slice()))))
        }
    };
    drop(mr);
    let secs = elapsed.as_secs_f64();
    Ok(ClientReport {
        op,
        device: dev.name().to_string(),
        bytes: server.len,
        seed,
        read,
        read_fnv1a,
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

/// FNV-1a, 64 bit.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Post RDMA WRITEs (or READs) covering the server's region, at most
/// SEND_DEPTH in flight, each signaled; poll every completion. Returns the
/// number posted. (The QP lets at most `max_rd_atomic` READs be
/// outstanding on the wire; the rest wait in the send queue.)
fn transfer_all(
    rc: &mut RcQp,
    mr: &Mr,
    server: &Endpoint,
    chunk: usize,
    until: Instant,
    op: ClientOp,
) -> Result<u64, StepError> {
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
            let wr = guard.construct_wr(next as u64, WorkRequestFlags::Signaled);
            let wr = match op {
                ClientOp::Write => wr.setup_write(server.rkey, remote),
                ClientOp::Read => wr.setup_read(server.rkey, remote),
            };
            // SAFETY: local+off..+this lies inside the registered client
            // buffer, which outlives the QP's use of it (we poll every
            // completion before returning, and mr/buf outlive this call).
            // For a READ the device writes into it: the buffer is ours
            // alone and registered with local write access.
            unsafe { wr.setup_sge(mr.lkey(), local + off as u64, this32) };
            guard.post().map_err(|e| {
                let errno = post_send_errno(&e);
                step(
                    errno,
                    format!(
                        "ibv_post_send({}, wr {next}, local={:#x}, len={this}, remote={remote:#x}, rkey={:#x}): {e}",
                        op.verb().replace(' ', "_"),
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
                            "{} wr {wr} (remote offset {}, of {n}) completed with {} ({status}), vendor_err={:#x}",
                            op.verb(),
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
                            "timed out polling the CQ: {done} of {n} {}s completed ({in_flight} in flight)",
                            op.verb()
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
    fn reports_without_the_new_fields_still_parse() {
        let old = r#"{"device":"rxe0","bytes":4096,"chunks":1,"chunk_size":4096,"elapsed_us":1,"setup_us":2,"mib_per_s":1.0,"path_mtu":1024,"gid":"g"}"#;
        let r: ClientReport = serde_json::from_str(old).unwrap();
        assert_eq!((r.op, r.read.is_none(), r.seed), (ClientOp::Write, true, 0));
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.starts_with(r#"{"op":"write","#) && !line.contains("\"read\""), "{line}");
        assert_eq!(format!("{:016x}", fnv1a(b"")), "cbf29ce484222325");
    }

    #[test]
    fn chunks() {
        assert_eq!(chunk_size(0), MAX_CHUNK);
        assert_eq!(chunk_size(u32::MAX), MAX_CHUNK);
        assert_eq!(chunk_size(4096), 4096);
    }
}
