//! pinlab-runner: sets the lab up inside the guest (fsdax + devdax
//! namespaces, mkfs, `mount -o dax`, DAX check, rxe) and runs the plan's
//! scenarios, recording for every step the errno or bytes actually observed.
//!
//! Usage: pinlab-runner PLAN.json RESULTS.json [--setup-only]
//!
//! Results are rewritten after every scenario, so a crash mid-run still leaves
//! what was observed until then.

use pinlab_demos::rdma::{self, Device, Mr};
use pinlab_demos::region::Region;
use pinlab_demos::StepError;
use pinlab_scenarios::errno;
use pinlab_scenarios::plan::{pattern_byte, Action, DaxMode, Plan, PlannedScenario, Target};
use pinlab_scenarios::results::{BootResults, ScenarioResult, StepResult, NOT_RUN};
use pinlab_scenarios::Fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PMEM_MNT: &str = "/mnt/pmem";
const RXE: &str = "rxe0";
const NETDEV: &str = "eth0";
const ADDR: &str = "192.0.2.1";

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// Run a tool, returning its stdout; failure names the command, exit code and stderr.
fn tool(prog: &str, args: &[&str]) -> Result<String, StepError> {
    let shown = format!("{prog} {}", args.join(" "));
    let out =
        Command::new(prog).args(args).output().map_err(|e| StepError::other(format!("cannot run `{shown}`: {e}")))?;
    if !out.status.success() {
        return Err(StepError::other(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn record(name: &str, t: Instant, r: Result<String, StepError>) -> StepResult {
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    match r {
        Ok(detail) => StepResult { name: name.into(), outcome: "ok".into(), detail, ms },
        Err(e) => StepResult {
            name: name.into(),
            outcome: match e.errno {
                Some(n) => errno::name(n),
                None if e.message.starts_with("mismatch") => "mismatch".into(),
                None => "error".into(),
            },
            detail: e.message,
            ms,
        },
    }
}

/// `ndctl create-namespace` on a label-less NVDIMM; returns the device it made.
fn create_namespace(ns: &str, mode: &str, key: &str) -> Result<String, StepError> {
    let out = tool("ndctl", &["create-namespace", "-f", "-e", ns, "-m", mode])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| StepError::other(format!("ndctl printed no JSON ({e}): {out}")))?;
    let dev = v
        .get(key)
        .or_else(|| {
            v.get("daxregion").and_then(|d| d.get("devices")).and_then(|d| d.get(0)).and_then(|d| d.get("chardev"))
        })
        .and_then(|d| d.as_str())
        .ok_or_else(|| StepError::other(format!("ndctl output has no {key}: {out}")))?;
    Ok(format!("/dev/{dev}"))
}

fn mount_pmem(dev: &str, fs: Fs, dax: DaxMode) -> Result<String, StepError> {
    std::fs::create_dir_all(PMEM_MNT).map_err(|e| StepError::other(format!("mkdir {PMEM_MNT}: {e}")))?;
    let opts = format!("dax={}", dax.name());
    nix::mount::mount(Some(dev), PMEM_MNT, Some(fs.name()), nix::mount::MsFlags::empty(), Some(opts.as_str()))
        .map_err(|e| StepError::errno(e as i32, format!("mount -t {fs} -o {opts} {dev} {PMEM_MNT}")))?;
    Ok(format!("{dev} on {PMEM_MNT} type {fs} ({opts})"))
}

fn umount_pmem() -> Result<(), StepError> {
    nix::mount::umount(PMEM_MNT).map_err(|e| StepError::errno(e as i32, format!("umount {PMEM_MNT}")))
}

/// statx(STATX_ATTR_DAX) on a fresh file: the one check that DAX is really on.
fn check_dax(expect: bool) -> Result<String, StepError> {
    let p = Path::new(PMEM_MNT).join(".pinlab-dax-check");
    let r = Region::file(&p, 4096)?;
    let dax = r.is_dax()?;
    drop(r);
    let _ = std::fs::remove_file(&p);
    match dax {
        Some(d) if d == expect => Ok(format!("statx on {} reports STATX_ATTR_DAX={}", p.display(), d as u8)),
        other => Err(StepError::other(format!(
            "DAX is not what the mount asked for: statx on {} reports STATX_ATTR_DAX={other:?}, expected {expect}",
            p.display()
        ))),
    }
}

fn rxe_up() -> Result<String, StepError> {
    tool("ip", &["link", "set", "lo", "up"])?;
    tool("ip", &["link", "set", NETDEV, "up"])?;
    tool("ip", &["addr", "add", &format!("{ADDR}/24"), "dev", NETDEV])?;
    tool("rdma", &["link", "add", RXE, "type", "rxe", "netdev", NETDEV])?;
    let state = format!("/sys/class/infiniband/{RXE}/ports/1/state");
    let t = Instant::now();
    loop {
        let s = std::fs::read_to_string(&state).unwrap_or_default();
        if s.contains("ACTIVE") {
            return Ok(format!("{RXE} on {NETDEV} ({ADDR}): port 1 {} after {} ms", s.trim(), t.elapsed().as_millis()));
        }
        if t.elapsed() > Duration::from_secs(15) {
            return Err(StepError::other(format!("{state} is '{}' after 15 s, not ACTIVE", s.trim())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lab as set up: devices and the mount.
struct Lab {
    fs: Fs,
    pmem: String,
    devdax: String,
}

fn setup(fs: Fs, out: &mut Vec<StepResult>) -> Option<Lab> {
    macro_rules! step {
        ($name:expr, $e:expr) => {{
            let t = Instant::now();
            let r = $e;
            let ok = r.as_ref().ok().cloned();
            let rec = record($name, t, r.map(|v: String| v));
            println!("pinlab-runner: setup {}: {} {}", rec.name, rec.outcome, rec.detail);
            out.push(rec);
            ok?
        }};
    }
    let pmem = step!("create fsdax namespace", create_namespace("namespace0.0", "fsdax", "blockdev"));
    let devdax = step!("create devdax namespace", create_namespace("namespace1.0", "devdax", "chardev"));
    step!(
        &format!("mkfs.{fs}"),
        match fs {
            Fs::Ext4 => tool("mkfs.ext4", &["-q", "-F", &pmem]),
            Fs::Xfs => tool("mkfs.xfs", &["-q", "-f", &pmem]),
        }
        .map(|_| format!("{fs} on {pmem}"))
    );
    step!("mount -o dax=always", mount_pmem(&pmem, fs, DaxMode::Always));
    step!("verify DAX (statx)", check_dax(true));
    step!("rxe link up", rxe_up());
    Some(Lab { fs, pmem, devdax })
}

/// One scenario's state: what the holder (this process) has.
struct Holder<'a> {
    lab: &'a Lab,
    id: String,
    dev: Option<Device>,
    region: Option<Region>,
    mr: Option<Mr>,
    remounted: bool,
    written: bool,
}

impl Holder<'_> {
    fn device(&mut self) -> Result<&Device, StepError> {
        if self.dev.is_none() {
            self.dev = Some(Device::open(Some(RXE)).map_err(|e| StepError::other(format!("open {RXE}: {e:#}")))?);
        }
        Ok(self.dev.as_ref().expect("just set"))
    }

    fn file_path(&self) -> PathBuf {
        Path::new(PMEM_MNT).join(format!("{}.dat", self.id))
    }

    fn step(&mut self, action: &Action) -> Result<String, StepError> {
        match action {
            Action::Map { target, size } => {
                let len = size.0 as usize;
                self.mr = None;
                self.region = None;
                let r = match target {
                    Target::Anon => Region::anon(len)?,
                    Target::File => {
                        let p = self.file_path();
                        let _ = std::fs::remove_file(&p);
                        Region::file(&p, len)?
                    }
                    Target::Devdax => Region::devdax(Path::new(&self.lab.devdax), len)?,
                };
                let what = match (target, r.is_dax()?) {
                    (Target::File, Some(d)) => {
                        format!("{} MAP_SHARED, {len} bytes, STATX_ATTR_DAX={}", self.file_path().display(), d as u8)
                    }
                    (Target::Devdax, _) => format!("{} MAP_SHARED, {len} bytes", self.lab.devdax),
                    _ => format!("anonymous MAP_SHARED, {len} bytes"),
                };
                self.region = Some(r);
                Ok(what)
            }
            Action::RegMr => {
                let (ptr, len) = {
                    let r = self.region.as_ref().ok_or_else(|| StepError::other("reg_mr before map"))?;
                    (r.as_mut_ptr(), r.len())
                };
                let mr = self.device()?.reg_mr(ptr, len)?;
                let d = format!("lkey={:#x} rkey={:#x}, {len} bytes at {ptr:p}", mr.lkey(), mr.rkey());
                self.mr = Some(mr);
                Ok(d)
            }
            Action::RdmaWrite => {
                let mr = self.mr.as_ref().ok_or_else(|| StepError::other("rdma_write before reg_mr"))?;
                let listener = std::net::TcpListener::bind((ADDR, 0))
                    .map_err(|e| StepError::errno(e.raw_os_error().unwrap_or(0), format!("bind {ADDR}:0: {e}")))?;
                let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                let mut client = Command::new("/usr/local/bin/rdma-client")
                    .args(["--server", &format!("{ADDR}:{port}"), "--timeout-s", "30"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .map_err(|e| StepError::other(format!("start rdma-client: {e}")))?;
                let dev = self.dev.as_ref().ok_or_else(|| StepError::other("no device"))?;
                let served = rdma::serve_write(dev, mr, &listener, Duration::from_secs(40));
                if served.is_err() {
                    let _ = client.kill();
                }
                let pid = client.id();
                let out = client.wait_with_output().map_err(|e| StepError::other(format!("wait rdma-client: {e}")))?;
                served?;
                if !out.status.success() {
                    return Err(StepError::other(format!(
                        "rdma-client failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                self.written = true;
                Ok(format!(
                    "rdma-client (pid {pid}) wrote {} bytes over an RC QP: {}",
                    mr.len(),
                    String::from_utf8_lossy(&out.stdout).trim()
                ))
            }
            Action::Verify => {
                let r = self.region.as_ref().ok_or_else(|| StepError::other("verify before map"))?;
                if !self.written {
                    return Err(StepError::other("verify before rdma_write"));
                }
                let bytes = r.as_slice();
                match bytes.iter().enumerate().find(|(i, b)| **b != pattern_byte(*i as u64)) {
                    None => Ok(format!("all {} bytes match the client's pattern", bytes.len())),
                    Some((i, b)) => Err(StepError::other(format!(
                        "mismatch at offset {i}: found {b:#04x}, expected {:#04x}",
                        pattern_byte(i as u64)
                    ))),
                }
            }
            Action::DeregMr => {
                let mr = self.mr.take().ok_or_else(|| StepError::other("dereg_mr without an MR"))?;
                mr.dereg()?;
                Ok("deregistered; pages unpinned".into())
            }
            Action::Remount { dax } => {
                self.mr = None;
                self.region = None;
                umount_pmem()?;
                self.remounted = true;
                let m = mount_pmem(&self.lab.pmem, self.lab.fs, *dax)?;
                let check = check_dax(*dax == DaxMode::Always)?;
                Ok(format!("{m}; {check}"))
            }
        }
    }

    /// Back to a clean lab: no MR, no mapping, the scenario's file gone, dax=always.
    fn cleanup(mut self) -> Result<(), StepError> {
        if let Some(mr) = self.mr.take() {
            mr.dereg()?;
        }
        self.region = None;
        let _ = std::fs::remove_file(self.file_path());
        if self.remounted {
            umount_pmem()?;
            mount_pmem(&self.lab.pmem, self.lab.fs, DaxMode::Always)?;
            check_dax(true)?;
        }
        Ok(())
    }
}

fn run_scenario(lab: &Lab, sc: &PlannedScenario) -> ScenarioResult {
    println!("PINLAB-SCENARIO {} {}", sc.id, sc.title);
    let t0 = Instant::now();
    let mut h = Holder { lab, id: sc.id.clone(), dev: None, region: None, mr: None, remounted: false, written: false };
    let mut steps = Vec::new();
    let mut stopped = false;
    for st in &sc.steps {
        if stopped {
            steps.push(StepResult { name: st.name.clone(), outcome: NOT_RUN.into(), detail: String::new(), ms: 0.0 });
            continue;
        }
        let t = Instant::now();
        let rec = record(&st.name, t, h.step(&st.action));
        println!("pinlab-runner: {} {}: {} {}", sc.id, rec.name, rec.outcome, rec.detail);
        if rec.outcome != "ok" && !st.probe {
            stopped = true;
        }
        steps.push(rec);
    }
    if let Err(e) = h.cleanup() {
        // Isolation failed: say so in the last step's detail, and fail the scenario visibly.
        steps.push(StepResult { name: "cleanup".into(), outcome: "error".into(), detail: e.to_string(), ms: 0.0 });
    }
    ScenarioResult { id: sc.id.clone(), steps, ms: t0.elapsed().as_secs_f64() * 1000.0 }
}

fn write_results(path: &Path, r: &BootResults) {
    let tmp = path.with_extension("tmp");
    let ok = serde_json::to_vec_pretty(r)
        .map_err(|e| e.to_string())
        .and_then(|b| std::fs::write(&tmp, b).map_err(|e| e.to_string()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if let Err(e) = ok {
        println!("pinlab-runner: cannot write {}: {e}", path.display());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: pinlab-runner PLAN.json RESULTS.json [--setup-only]");
        std::process::exit(2);
    }
    let setup_only = args.iter().any(|a| a == "--setup-only");
    let plan: Plan = match std::fs::read(&args[1])
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            println!("pinlab-runner: cannot read plan {}: {e}", args[1]);
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(&args[2]);
    let mut res = BootResults {
        kernel: nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        runner_start_ms: uptime_ms(),
        ..Default::default()
    };
    let lab = setup(plan.fs, &mut res.setup);
    write_results(&out, &res);
    let Some(lab) = lab else {
        println!("pinlab-runner: setup failed; no scenario can run");
        std::process::exit(1);
    };
    if setup_only {
        return;
    }
    for sc in &plan.scenarios {
        let r = run_scenario(&lab, sc);
        res.scenarios.push(r);
        write_results(&out, &res);
    }
    let _ = umount_pmem();
    println!("pinlab-runner: {} scenarios done at uptime {} ms", res.scenarios.len(), uptime_ms());
}
