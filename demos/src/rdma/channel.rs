//! The TCP side channel: the two ends of an RDMA WRITE exchange their queue
//! pair endpoints and the outcome over it, one JSON object per line (see
//! [`Msg`]).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{step, MAX_LINE};
use crate::StepError;

/// One endpoint of the RC connection, as exchanged over TCP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Endpoint {
    /// The RDMA device the sender uses (the client opens the same one).
    pub(super) device: String,
    pub(super) qpn: u32,
    pub(super) psn: u32,
    pub(super) gid: Ipv6Addr,
    pub(super) gid_index: u8,
    /// Active MTU of the sender's port, in bytes.
    pub(super) mtu: u32,
    /// Target region (server only; 0 from the client).
    pub(super) addr: u64,
    pub(super) len: u64,
    pub(super) rkey: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(super) enum Msg {
    /// Both ways, server first: QP number, PSN, GID (and the server's MR).
    Hello(Endpoint),
    /// Server to client: my QP is at RTS, write now.
    Ready,
    /// Client to server: how the RDMA WRITEs completed.
    Done { ok: bool, bytes: u64, status: String, errno: Option<i32>, elapsed_us: u64 },
    /// Server to client: giving up.
    Abort { reason: String, errno: Option<i32> },
}

fn encode(msg: &Msg) -> Result<Vec<u8>, StepError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| StepError::other(format!("encoding {msg:?}: {e}")))?;
    line.push(b'\n');
    Ok(line)
}

fn decode(line: &[u8]) -> Result<Msg, StepError> {
    serde_json::from_slice(line).map_err(|e| {
        StepError::errno(
            libc::EPROTO,
            format!("bad side-channel message {:?}: {e}", String::from_utf8_lossy(line).trim_end()),
        )
    })
}

/// The time left until `until`, `None` once it passed.
pub(super) fn remaining(until: Instant) -> Option<Duration> {
    until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

/// One side-channel connection: a line writer and a buffered line reader.
pub(super) struct Wire {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    peer: String,
}

impl Wire {
    pub(super) fn new(stream: TcpStream) -> Result<Wire, StepError> {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "peer".to_string());
        let _ = stream.set_nodelay(true);
        let reader =
            stream.try_clone().map_err(|e| step(e.raw_os_error(), format!("dup of the TCP socket to {peer}: {e}")))?;
        Ok(Wire { writer: stream, reader: BufReader::new(reader), peer })
    }

    fn timeout(&self, what: &str) -> StepError {
        StepError::errno(libc::ETIMEDOUT, format!("timed out waiting for {what} from {}", self.peer))
    }

    pub(super) fn send(&mut self, msg: &Msg, until: Instant) -> Result<(), StepError> {
        let line = encode(msg)?;
        let left = remaining(until).ok_or_else(|| self.timeout("the socket to accept a message"))?;
        let peer = self.peer.clone();
        let io_err = |e: io::Error| step(e.raw_os_error(), format!("sending to {peer}: {e}"));
        self.writer.set_write_timeout(Some(left)).map_err(io_err)?;
        self.writer.write_all(&line).map_err(io_err)?;
        self.writer.flush().map_err(io_err)
    }

    pub(super) fn recv(&mut self, what: &str, until: Instant) -> Result<Msg, StepError> {
        let mut line = Vec::new();
        loop {
            let left = remaining(until).ok_or_else(|| self.timeout(what))?;
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| step(e.raw_os_error(), format!("SO_RCVTIMEO on {}: {e}", self.peer)))?;
            let limit = MAX_LINE.saturating_sub(line.len() as u64);
            if limit == 0 {
                return Err(StepError::errno(
                    libc::EPROTO,
                    format!("message from {} longer than {MAX_LINE} bytes", self.peer),
                ));
            }
            match (&mut self.reader).take(limit).read_until(b'\n', &mut line) {
                Ok(0) => {
                    return Err(StepError::errno(
                        libc::ECONNRESET,
                        format!("{} closed the connection while we waited for {what}", self.peer),
                    ))
                }
                Ok(_) if line.ends_with(b"\n") => return decode(&line),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    return Err(step(e.raw_os_error(), format!("reading {what} from {}: {e}", self.peer)));
                }
            }
        }
    }
}

/// Accept one connection on `listener`, at the latest at `until`.
pub(super) fn accept_until(listener: &TcpListener, until: Instant) -> Result<TcpStream, StepError> {
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".to_string());
    listener
        .set_nonblocking(true)
        .map_err(|e| step(e.raw_os_error(), format!("fcntl(O_NONBLOCK) on listener {local}: {e}")))?;
    let started = Instant::now();
    let result = loop {
        match listener.accept() {
            Ok((s, _)) => break Ok(s),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                if remaining(until).is_none() {
                    break Err(StepError::errno(
                        libc::ETIMEDOUT,
                        format!("no RDMA client connected to {local} within {:?}", started.elapsed()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => break Err(step(e.raw_os_error(), format!("accept on {local}: {e}"))),
        }
    };
    let _ = listener.set_nonblocking(false);
    let stream = result?;
    stream
        .set_nonblocking(false)
        .map_err(|e| step(e.raw_os_error(), format!("clearing O_NONBLOCK on the accepted socket: {e}")))?;
    Ok(stream)
}

/// Connect to `server`, retrying until `until` while it is not listening yet.
pub(super) fn connect_until(server: SocketAddr, until: Instant) -> Result<TcpStream, StepError> {
    let mut last: Option<io::Error> = None;
    loop {
        let Some(left) = remaining(until) else {
            let why = last.map(|e| e.to_string()).unwrap_or_else(|| "no attempt finished".to_string());
            return Err(StepError::errno(
                libc::ETIMEDOUT,
                format!("connect to {server} timed out (last error: {why})"),
            ));
        };
        match TcpStream::connect_timeout(&server, left) {
            Ok(s) => return Ok(s),
            // The server may not be listening yet: retry until the deadline.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(step(e.raw_os_error(), format!("connect to {server}: {e}"))),
        }
    }
}

/// A well-formed message that is not the one the protocol expects now.
pub(super) fn unexpected(msg: &Msg, wanted: &str) -> StepError {
    StepError::errno(libc::EPROTO, format!("expected a {wanted} message on the side channel, got {msg:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        Endpoint {
            device: "rxe0".into(),
            qpn: 0x11,
            psn: 0xabcdef,
            gid: "::ffff:192.0.2.1".parse().unwrap(),
            gid_index: 3,
            mtu: 1024,
            addr: 0x7f00_0000_0000,
            len: 2 << 20,
            rkey: 0x1234,
        }
    }

    #[test]
    fn messages_round_trip_as_json_lines() {
        let msgs = [
            Msg::Hello(ep()),
            Msg::Ready,
            Msg::Done { ok: false, bytes: 0, status: "IBV_WC_REM_ACCESS_ERR".into(), errno: Some(14), elapsed_us: 3 },
            Msg::Abort { reason: "x".into(), errno: None },
        ];
        for m in msgs {
            let line = encode(&m).unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(decode(&line).unwrap(), m);
        }
        let hello = String::from_utf8(encode(&Msg::Hello(ep())).unwrap()).unwrap();
        assert!(hello.starts_with(r#"{"msg":"hello","#), "{hello}");
        assert!(hello.contains(r#""gid":"::ffff:192.0.2.1""#), "{hello}");
    }

    #[test]
    fn bad_messages_are_eproto() {
        let e = decode(b"{\"msg\":\"nope\"}\n").unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::EPROTO));
        assert!(decode(b"garbage\n").is_err());
    }

    #[test]
    fn wire_talks_over_loopback_and_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        let t = std::thread::spawn(move || {
            let mut w = Wire::new(connect_until(addr, until).unwrap()).unwrap();
            let m = w.recv("hello", until).unwrap();
            w.send(&m, until).unwrap();
            // then go quiet until the peer gives up
            let _ = w.recv("nothing", Instant::now() + Duration::from_millis(500));
        });
        let mut w = Wire::new(accept_until(&l, until).unwrap()).unwrap();
        w.send(&Msg::Hello(ep()), until).unwrap();
        assert_eq!(w.recv("echo", until).unwrap(), Msg::Hello(ep()));
        let e = w.recv("silence", Instant::now() + Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::ETIMEDOUT), "{e}");
        t.join().unwrap();
        let e = w.recv("after close", Instant::now() + Duration::from_secs(2)).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::ECONNRESET), "{e}");
    }

    #[test]
    fn accept_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = accept_until(&l, Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::ETIMEDOUT));
    }

    #[test]
    fn connect_retries_then_times_out() {
        // Bind then drop to get a (very likely) closed port.
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = connect_until(addr, Instant::now() + Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.failure.errno(), Some(libc::ETIMEDOUT), "{e}");
    }
}
