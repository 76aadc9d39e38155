//! `rdma-server`: map a region, register it, let one `rdma-client` RDMA WRITE
//! the pattern into it, and check the bytes. For humans poking in a guest
//! shell; the scenario runner uses the library directly.
//!
//! ```text
//! rdma-server --target anon|file:PATH|devdax:PATH [--size 2M] [--listen 0.0.0.0:18515]
//!             [--device rxe0] [--timeout-s 60]
//! ```
//! Exit status 0 only if registration, the write and the verification all
//! succeeded; 1 when a step failed; 2 for bad usage.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use pinlab_demos::rdma::{self, Device};
use pinlab_demos::region::Region;
use pinlab_demos::StepError;
use pinlab_scenarios::plan::Size;

const USAGE: &str = "usage: rdma-server --target anon|file:PATH|devdax:PATH [--size 2M] \
[--listen 0.0.0.0:18515] [--device rxe0] [--timeout-s 60]";

#[derive(Debug, PartialEq, Eq)]
enum Target {
    Anon,
    File(PathBuf),
    Devdax(PathBuf),
}

#[derive(Debug, PartialEq, Eq)]
struct Args {
    target: Target,
    size: u64,
    listen: String,
    device: Option<String>,
    timeout: Duration,
}

fn parse_target(s: &str) -> Result<Target, String> {
    if s == "anon" {
        return Ok(Target::Anon);
    }
    let nonempty = |p: &str, what: &str| {
        if p.is_empty() {
            Err(format!("--target {what}: needs a path, e.g. {what}:/mnt/dax/f"))
        } else {
            Ok(PathBuf::from(p))
        }
    };
    if let Some(p) = s.strip_prefix("file:") {
        return nonempty(p, "file").map(Target::File);
    }
    if let Some(p) = s.strip_prefix("devdax:") {
        return nonempty(p, "devdax").map(Target::Devdax);
    }
    Err(format!("--target {s:?}: expected anon, file:PATH or devdax:PATH"))
}

/// `None` means `--help`.
fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut target = None;
    let mut size = Size::default().0;
    let mut listen = "0.0.0.0:18515".to_string();
    let mut device = None;
    let mut timeout = Duration::from_secs(60);
    let mut p = lexopt::Parser::from_args(argv);
    let text = |v: Result<std::ffi::OsString, lexopt::Error>| -> Result<String, String> {
        v.map_err(|e| e.to_string())?.string().map_err(|e| e.to_string())
    };
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("target") => target = Some(parse_target(&text(p.value())?)?),
            Long("size") => size = Size::parse(&text(p.value())?)?.0,
            Long("listen") => listen = text(p.value())?,
            Long("device") => device = Some(text(p.value())?),
            Long("timeout-s") => timeout = pinlab_demos::parse_timeout(p.value().map_err(|e| e.to_string())?)?,
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    let target = target.ok_or("--target is required")?;
    Ok(Some(Args { target, size, listen, device, timeout }))
}

/// `EOPNOTSUPP (what failed)`, `error (what failed)`, …
fn errno_text(e: &StepError) -> String {
    format!("{} ({})", e.outcome(), e.message)
}

fn run(args: Args) -> ExitCode {
    let Ok(len) = usize::try_from(args.size) else {
        println!("region: error (size {} does not fit this machine)", args.size);
        return ExitCode::FAILURE;
    };
    let region = match &args.target {
        Target::Anon => Region::anon(len),
        Target::File(p) => Region::file(p, len),
        Target::Devdax(p) => Region::devdax(p, len),
    };
    let region = match region {
        Ok(r) => r,
        Err(e) => {
            println!("region: {}", errno_text(&e));
            return ExitCode::FAILURE;
        }
    };
    let dax = match region.is_dax() {
        Ok(Some(d)) => format!(" dax={d}"),
        Ok(None) => String::new(),
        Err(e) => format!(" dax=? ({e})"),
    };
    let where_ = region.path().map(|p| format!(" {}", p.display())).unwrap_or_default();
    println!("region: {:?}{where_} len={}{dax}", region.kind(), region.len());

    let dev = match Device::open(args.device.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            println!("device: error ({e:#})");
            return ExitCode::FAILURE;
        }
    };
    let mr = match dev.reg_mr(&region, 0..region.len()) {
        Ok(mr) => {
            println!("reg_mr: ok (device={} lkey={:#x} rkey={:#x})", dev.name(), mr.lkey(), mr.rkey());
            mr
        }
        Err(e) => {
            println!("reg_mr: {}", errno_text(&e));
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            println!("listen: error (bind {}: {e})", args.listen);
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("listening: {a} (run: rdma-client --server HOST:{})", a.port()),
        Err(_) => println!("listening: {}", args.listen),
    }
    if let Err(e) = rdma::serve_write(&dev, &mr, &listener, args.timeout) {
        println!("write: {}", errno_text(&e));
        return ExitCode::FAILURE;
    }
    println!("write: ok ({} bytes)", region.len());
    let verified = match rdma::first_pattern_mismatch(rdma::DEFAULT_SEED, region.as_slice()) {
        None => {
            println!("verify: ok");
            true
        }
        Some((off, got, want)) => {
            println!("verify: mismatch at offset {off} ({off:#x}): got {got:#04x}, expected {want:#04x}");
            false
        }
    };
    let deregistered = match mr.dereg() {
        Ok(()) => {
            println!("dereg_mr: ok");
            true
        }
        Err(e) => {
            println!("dereg_mr: {}", errno_text(&e));
            false
        }
    };
    if verified && deregistered {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(&argv) {
        Ok(Some(args)) => run(args),
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rdma-server: {e}\n{USAGE}");
            ExitCode::from(2)
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
    fn defaults() {
        let a = parse("--target anon").unwrap().unwrap();
        assert_eq!(
            a,
            Args {
                target: Target::Anon,
                size: 2 << 20,
                listen: "0.0.0.0:18515".into(),
                device: None,
                timeout: Duration::from_secs(60),
            }
        );
    }

    #[test]
    fn all_flags_both_spellings() {
        let a = parse("--target=file:/mnt/dax/f --size 4M --listen=127.0.0.1:9 --device rxe0 --timeout-s=5")
            .unwrap()
            .unwrap();
        assert_eq!(a.target, Target::File("/mnt/dax/f".into()));
        assert_eq!(a.size, 4 << 20);
        assert_eq!(a.listen, "127.0.0.1:9");
        assert_eq!(a.device.as_deref(), Some("rxe0"));
        assert_eq!(a.timeout, Duration::from_secs(5));
        let a = parse("--target devdax:/dev/dax1.0").unwrap().unwrap();
        assert_eq!(a.target, Target::Devdax("/dev/dax1.0".into()));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(parse("").unwrap_err().contains("--target is required"));
        assert!(parse("--target").unwrap_err().contains("missing argument"));
        assert!(parse("--target disk").unwrap_err().contains("expected anon"));
        assert!(parse("--target file:").unwrap_err().contains("needs a path"));
        assert!(parse("--target anon --size 3").unwrap_err().contains("multiple of 4096"));
        assert!(parse("--target anon --timeout-s x").unwrap_err().contains("seconds"));
        assert!(parse("--target anon --timeout-s 0").is_err());
        assert!(parse("--target anon --bogus").unwrap_err().contains("--bogus"));
        assert_eq!(parse("--help").unwrap(), None);
    }

    #[test]
    fn errno_lines() {
        let e = StepError::errno(95, "ibv_reg_mr(...)");
        assert_eq!(errno_text(&e), "EOPNOTSUPP (ibv_reg_mr(...))");
        assert_eq!(errno_text(&StepError::other("x")), "error (x)");
        assert_eq!(errno_text(&StepError::errno(4095, "y")), "E4095 (y)");
    }
}
