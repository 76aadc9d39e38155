//! The server side of one RDMA WRITE or READ: it owns the MR and waits for
//! a client. One-sided operations need nothing of the server once its QP is
//! up: it serves a WRITE and a READ alike.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::channel::{accept_until, unexpected, Msg, Wire};
use super::client::{ClientOp, ClientReport};
use super::device::{Device, Mr};
use super::qp::RcQp;
use super::step;
use crate::StepError;

/// Server side of one RDMA WRITE into (or READ of) `mr`.
///
/// Accepts one TCP connection on `listener`, creates a CQ and an RC QP on
/// `dev`, sends the client (QPN, GID, PSN, MTU, address, length, rkey),
/// reads the client's, brings the QP to RTR/RTS, tells the client to go, and
/// waits for its "done" message. `Ok(())` when the client reports every
/// RDMA WRITE (READ) completed successfully; otherwise the error carries the
/// client's completion status (or errno). Everything is bounded by `deadline`.
pub fn serve_write(dev: &Device, mr: &Mr, listener: &TcpListener, deadline: Duration) -> Result<(), StepError> {
    let until = Instant::now() + deadline;
    let stream = accept_until(listener, until)?;
    let mut wire = Wire::new(stream)?;
    let result = serve_on(dev, mr, &mut wire, until);
    if let Err(e) = &result {
        let abort = Msg::Abort { reason: e.message.clone(), errno: e.failure.errno() };
        let _ = wire.send(&abort, Instant::now() + Duration::from_secs(1));
    }
    result
}

/// One whole RDMA WRITE into `mr` by a separate `rdma-client` process:
/// listen on `bind`:0, start the client (`client` is its path) against that
/// port (writing pattern `seed`), serve it with [`serve_write`], and return
/// the JSON report it prints.
/// The client is killed if serving fails; its stderr is quoted on failure.
pub fn write_from_client(
    dev: &Device,
    mr: &Mr,
    client: &str,
    bind: &str,
    deadline: Duration,
    seed: u64,
) -> Result<(u32, ClientReport), StepError> {
    transfer_with_client(dev, mr, client, bind, deadline, seed, ClientOp::Write)
}

/// One whole RDMA READ of `mr` by a separate `rdma-client --read` process,
/// like [`write_from_client`]; the report's `read` says what came back,
/// counted against pattern `seed`.
pub fn read_from_client(
    dev: &Device,
    mr: &Mr,
    client: &str,
    bind: &str,
    deadline: Duration,
    seed: u64,
) -> Result<(u32, ClientReport), StepError> {
    let (pid, report) = transfer_with_client(dev, mr, client, bind, deadline, seed, ClientOp::Read)?;
    if report.op != ClientOp::Read || report.read.is_none() {
        return Err(StepError::other(format!(
            "{client} (pid {pid}) was asked to RDMA READ but reports no read: {}",
            serde_json::to_string(&report).unwrap_or_default()
        )));
    }
    Ok((pid, report))
}

fn transfer_with_client(
    dev: &Device,
    mr: &Mr,
    client: &str,
    bind: &str,
    deadline: Duration,
    seed: u64,
    op: ClientOp,
) -> Result<(u32, ClientReport), StepError> {
    let listener = TcpListener::bind((bind, 0))
        .map_err(|e| step(e.raw_os_error(), format!("bind {bind}:0 for the RDMA side channel: {e}")))?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let timeout = deadline.as_secs().max(1).to_string();
    let mut cmd = std::process::Command::new(client);
    cmd.args(["--server", &format!("{bind}:{port}"), "--timeout-s", &timeout, "--seed", &seed.to_string()]);
    if op == ClientOp::Read {
        cmd.arg("--read");
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| step(e.raw_os_error(), format!("start {client}: {e}")))?;
    let pid = child.id();
    let served = serve_write(dev, mr, &listener, deadline + Duration::from_secs(10));
    if served.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().map_err(|e| StepError::other(format!("wait for {client} (pid {pid}): {e}")))?;
    served?;
    if !out.status.success() {
        return Err(StepError::other(format!(
            "{client} (pid {pid}) failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim()).map_err(|e| {
        StepError::other(format!("{client} (pid {pid}) printed a report that does not parse ({e}): {}", text.trim()))
    })?;
    Ok((pid, report))
}

fn serve_on(dev: &Device, mr: &Mr, wire: &mut Wire, until: Instant) -> Result<(), StepError> {
    let mut rc = RcQp::new(dev, 4)?;
    wire.send(&Msg::Hello(rc.endpoint(Some(mr))), until)?;
    let remote = match wire.recv("the client's QP info (hello)", until)? {
        Msg::Hello(ep) => ep,
        Msg::Done { status, errno, .. } => {
            return Err(step(errno, format!("client failed before connecting: {status}")));
        }
        other => return Err(unexpected(&other, "hello")),
    };
    rc.connect(&remote)?;
    wire.send(&Msg::Ready, until)?;
    match wire.recv("the client's done message", until)? {
        Msg::Done { ok: true, bytes, .. } if bytes == mr.len() as u64 => Ok(()),
        Msg::Done { ok: true, bytes, .. } => {
            Err(StepError::other(format!("client reported success but moved {bytes} of {} bytes", mr.len())))
        }
        Msg::Done { status, errno, .. } => Err(step(errno, format!("client's RDMA transfer failed: {status}"))),
        other => Err(unexpected(&other, "done")),
    }
}
