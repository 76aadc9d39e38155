//! `rdma-client`: RDMA WRITE the pattern into the region an `rdma-server`
//! offers (or, with `--read`, RDMA READ the region back), then print one
//! JSON line with the report. After a READ the report's `read` counts the
//! 4 KiB blocks that came back: `pattern` (the pattern of `--seed`, each in
//! its place), `uniform` (blocks that are one byte value throughout, by
//! value) and `other`.
//!
//! ```text
//! rdma-client --server HOST:PORT [--read] [--timeout-s 20] [--seed N]
//! ```
//! Exit status 0 on success (whatever a READ returned), 1 when the transfer
//! failed, 2 for bad usage.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use pinlab_demos::rdma::ClientOp;

const USAGE: &str = "usage: rdma-client --server HOST:PORT [--read] [--timeout-s 20] [--seed N]";

#[derive(Debug, PartialEq, Eq)]
struct Args {
    server: String,
    timeout: Duration,
    /// The pattern seed (`pinlab_scenarios::plan::pattern_seed`).
    seed: u64,
    /// RDMA READ instead of WRITE.
    read: bool,
}

/// `None` means `--help`.
fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut server = None;
    let mut timeout = Duration::from_secs(20);
    let mut seed = pinlab_demos::rdma::DEFAULT_SEED;
    let mut read = false;
    let mut p = lexopt::Parser::from_args(argv);
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("read") => read = true,
            Long("server") => server = Some(p.value().map_err(|e| e.to_string())?.string().map_err(|e| e.to_string())?),
            Long("timeout-s") => timeout = pinlab_demos::parse_timeout(p.value().map_err(|e| e.to_string())?)?,
            Long("seed") => {
                let v = p.value().map_err(|e| e.to_string())?.string().map_err(|e| e.to_string())?;
                seed = v.parse().map_err(|_| format!("--seed {v:?}: not an unsigned 64-bit number"))?;
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    let server = server.ok_or("--server HOST:PORT is required")?;
    Ok(Some(Args { server, timeout, seed, read }))
}

fn resolve(server: &str) -> Result<SocketAddr, String> {
    let mut addrs = server
        .to_socket_addrs()
        .map_err(|e| format!("--server {server:?}: cannot resolve (expected HOST:PORT): {e}"))?;
    addrs.next().ok_or_else(|| format!("--server {server:?}: resolves to no address"))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("rdma-client: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let addr = match resolve(&args.server) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rdma-client: {e}");
            return ExitCode::from(2);
        }
    };
    let op = if args.read { ClientOp::Read } else { ClientOp::Write };
    match pinlab_demos::rdma::client_transfer(addr, args.timeout, args.seed, op) {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rdma-client: the transfer succeeded but the report could not be encoded: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("rdma-client: {} with {addr} failed: {e:#}", op.verb());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Args>, String> {
        let v: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse_args(&v)
    }

    #[test]
    fn flags() {
        let a = parse("--server 192.0.2.1:18515").unwrap().unwrap();
        assert_eq!(
            a,
            Args {
                server: "192.0.2.1:18515".into(),
                timeout: Duration::from_secs(20),
                seed: pinlab_demos::rdma::DEFAULT_SEED,
                read: false
            }
        );
        let a = parse("--server h:1 --read --seed 7").unwrap().unwrap();
        assert_eq!((a.read, a.seed), (true, 7));
        let a = parse("--server=h:1 --timeout-s=3").unwrap().unwrap();
        assert_eq!(a.timeout, Duration::from_secs(3));
        assert_eq!(parse("-h").unwrap(), None);
    }

    #[test]
    fn bad_input() {
        assert!(parse("").unwrap_err().contains("--server"));
        assert!(parse("--server").unwrap_err().contains("missing argument"));
        assert!(parse("--server a:1 --timeout-s -1").is_err());
        assert!(parse("--what").unwrap_err().contains("--what"));
        assert!(resolve("no-port").is_err());
        assert_eq!(resolve("127.0.0.1:7").unwrap(), "127.0.0.1:7".parse().unwrap());
    }
}
