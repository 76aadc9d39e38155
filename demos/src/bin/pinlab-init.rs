//! pinlab-init: PID 1 of the guest.
//!
//! Mounts the basics and the run share, starts `pinlab-runner` (or, with
//! `pinlab.mode=shell` on the kernel command line, sets the lab up and gives
//! an interactive shell), reaps every child, syncs and powers off. Whatever
//! happens, it powers off: the host learns the outcome from the results file
//! and the console, and QEMU exits.

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use pinlab_scenarios::protocol::{GuestEvent, GUEST_SHARE, PLAN_FILE, RESULTS_FILE, SHELL_MODE};
use std::process::Command;

const RUNNER: &str = "/usr/local/bin/pinlab-runner";

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    match mount(Some(src), target, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        // devtmpfs may already be mounted by the kernel (CONFIG_DEVTMPFS_MOUNT).
        Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("mount -t {fstype} {src} {target}: {e}")),
    }
}

fn setup() -> Result<(), String> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs("proc", "/proc", "proc", nosuid | MsFlags::MS_NOEXEC, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid | MsFlags::MS_NOEXEC, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0620,ptmxmode=0666"))?;
    // The rootfs is read-only; everything the guest writes goes to tmpfs,
    // the DAX mount or the run share.
    for d in ["/run", "/tmp", "/mnt", "/var/tmp", "/root"] {
        mount_fs("tmpfs", d, "tmpfs", nosuid, Some("mode=0755"))?;
    }
    mount_fs("pinlab", GUEST_SHARE, "virtiofs", nosuid, None)?;
    // Busybox applets Debian's packages do not provide, last on PATH.
    std::fs::create_dir_all("/run/busybox").map_err(|e| format!("mkdir /run/busybox: {e}"))?;
    let _ = Command::new("/usr/bin/busybox").args(["--install", "-s", "/run/busybox"]).status();
    std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/busybox");
    std::env::set_var("HOME", "/root");
    // RDMA registrations count against RLIMIT_MEMLOCK (root has CAP_IPC_LOCK
    // anyway, but a shell user dropping it should not hit the limit).
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    );
    Ok(())
}

fn cmdline_has(word: &str) -> bool {
    std::fs::read_to_string("/proc/cmdline").map(|c| c.split_whitespace().any(|w| w == word)).unwrap_or(false)
}

/// Start `prog args` and wait for it, reaping any other child that exits meanwhile.
fn run_and_reap(prog: &str, args: &[&str]) -> Result<i32, String> {
    let child = Command::new(prog).args(args).spawn().map_err(|e| format!("start {prog}: {e}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(code),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("waitpid: {e}")),
        }
    }
}

fn main() {
    let code = match setup() {
        Err(e) => {
            println!("pinlab-init: setup failed: {e}");
            1
        }
        Ok(()) => {
            let shell = cmdline_has(SHELL_MODE);
            GuestEvent::RunnerStarted.emit();
            let plan = format!("{GUEST_SHARE}/{PLAN_FILE}");
            let results = format!("{GUEST_SHARE}/{RESULTS_FILE}");
            let mut args = vec![plan.as_str(), results.as_str()];
            if shell {
                args.push("--setup-only");
            }
            let mut rc = run_and_reap(RUNNER, &args).unwrap_or_else(|e| {
                println!("pinlab-init: {e}");
                1
            });
            if shell {
                println!(
                    "\npinlab: DAX mounted at /mnt/pmem, rxe0 up on dummy0 (192.0.2.1), demos on PATH \
                     (rdma-server, rdma-client, pinlab-runner). Type `exit` to power off.\n"
                );
                // setsid -c: a session with the serial console as controlling
                // terminal, so job control and Ctrl-C work in the shell.
                rc = run_and_reap("/usr/bin/setsid", &["-c", "-w", "/bin/bash", "--login"]).unwrap_or(1);
            }
            rc
        }
    };
    nix::unistd::sync();
    GuestEvent::Done { rc: code }.emit();
    let _ = reboot(RebootMode::RB_POWER_OFF);
    // Not reached unless reboot failed; PID 1 must not exit (that panics the kernel).
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
