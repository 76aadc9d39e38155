//! Is KVM usable, or only present? `/dev/kvm` may open fine inside a nested
//! VM whose vCPUs then hang at 100% sys (seen on this project's CI machines),
//! so the answer comes from running a real guest: a child process creates a
//! VM and one vCPU, runs a few real-mode instructions that write to an I/O
//! port and halt, and must finish within a deadline.

use anyhow::{bail, Context, Result};
use kvm_ioctls::{Kvm, VcpuExit};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A vCPU ran the probe guest to its halt.
    Works,
    /// `/dev/kvm` is there but the probe guest did not run to completion.
    Broken(String),
    /// No `/dev/kvm`.
    Absent,
}

impl Verdict {
    /// Whether to use `-accel kvm`.
    pub fn usable(&self) -> bool {
        *self == Verdict::Works
    }

    /// The line `doctor` prints.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Works => "KVM: works".into(),
            Verdict::Broken(why) => {
                format!("KVM: /dev/kvm present but a vCPU did not run (nested virtualization?) → using TCG [{why}]")
            }
            Verdict::Absent => "KVM: absent → using TCG".into(),
        }
    }
}

/// How the probe's child process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChildEnd {
    /// Exited with this code; stdout is what it printed.
    Exited(i32, String),
    /// Killed by a signal (no exit code).
    Signalled,
    /// Still running at the deadline (and then killed).
    TimedOut(Duration),
    /// Could not be started.
    SpawnFailed(String),
}

/// Pure classification, unit-tested: the probe prints `PINLAB-KVM-OK <out>`
/// after the guest wrote `out` to port 0x3f8 and halted.
pub fn classify(dev_kvm_exists: bool, end: &ChildEnd) -> Verdict {
    if !dev_kvm_exists {
        return Verdict::Absent;
    }
    match end {
        ChildEnd::Exited(0, out) if out.trim() == "PINLAB-KVM-OK 5" => Verdict::Works,
        ChildEnd::Exited(0, out) => Verdict::Broken(format!("probe printed {:?}", out.trim())),
        ChildEnd::Exited(code, out) => Verdict::Broken(format!("probe exited {code}: {}", out.trim())),
        ChildEnd::Signalled => Verdict::Broken("probe killed by a signal".into()),
        ChildEnd::TimedOut(d) => Verdict::Broken(format!("vCPU still running after {}", crate::util::fmt_duration(*d))),
        ChildEnd::SpawnFailed(e) => Verdict::Broken(format!("could not start probe: {e}")),
    }
}

/// Run the probe in a child process (this binary, `kvm-probe`) with a deadline.
pub fn probe() -> Verdict {
    let dev = Path::new("/dev/kvm").exists();
    if !dev {
        return classify(false, &ChildEnd::SpawnFailed(String::new()));
    }
    classify(true, &run_child(Duration::from_secs(2)))
}

fn run_child(deadline: Duration) -> ChildEnd {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return ChildEnd::SpawnFailed(e.to_string()),
    };
    let mut child = match Command::new(exe)
        .arg("kvm-probe")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return ChildEnd::SpawnFailed(e.to_string()),
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let out = child
                    .wait_with_output()
                    .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
                return match status.code() {
                    Some(c) => ChildEnd::Exited(c, out.unwrap_or_default()),
                    None => ChildEnd::Signalled,
                };
            }
            Ok(None) if start.elapsed() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return ChildEnd::TimedOut(start.elapsed());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return ChildEnd::SpawnFailed(e.to_string()),
        }
    }
}

/// The child side: the kvm-ioctls real-mode example, step for step.
pub fn child_main() -> Result<()> {
    // 1. Open /dev/kvm.
    let kvm = Kvm::new().context("Failed to open /dev/kvm")?;
    // 2. One VM.
    let vm = kvm.create_vm().context("Failed to create a VM")?;
    // 3. One page of guest memory at 0x1000 holding the code:
    //    mov $0x3f8,%dx; add %bl,%al; add $'0',%al; out %al,%dx; hlt
    let code: [u8; 12] = [0xba, 0xf8, 0x03, 0x00, 0xd8, 0x04, b'0', 0xee, 0xf4, 0xf4, 0xf4, 0xf4];
    let base = GuestAddress(0x1000);
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(base, 0x1000)]).context("Failed to map guest memory")?;
    mem.write_slice(&code, base).context("Failed to write the probe code")?;
    let host = mem.get_host_address(base).context("Failed to find the host address of guest memory")?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: base.0,
        memory_size: 0x1000,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: `host` points to 0x1000 bytes mapped by `mem`, which outlives the VM
    // (both are dropped at the end of this function, the VM first).
    unsafe { vm.set_user_memory_region(region) }.context("Failed to set the memory region")?;
    // 4. One vCPU.
    let mut vcpu = vm.create_vcpu(0).context("Failed to create a vCPU")?;
    // 5. Real mode at 0x1000 with al=2, bl=3.
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rip = 0x1000;
    regs.rax = 2;
    regs.rbx = 3;
    regs.rflags = 2;
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    // 6. Run until hlt; the guest writes '5' to port 0x3f8 on the way.
    let mut out = String::new();
    for _ in 0..16 {
        match vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(0x3f8, data) => out.push_str(&String::from_utf8_lossy(data)),
            VcpuExit::Hlt => {
                println!("PINLAB-KVM-OK {out}");
                return Ok(());
            }
            other => bail!("unexpected vCPU exit {other:?}"),
        }
    }
    bail!("the probe guest did not halt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(false, &ChildEnd::Exited(0, "PINLAB-KVM-OK 5".into())), Verdict::Absent);
        assert_eq!(classify(true, &ChildEnd::Exited(0, "PINLAB-KVM-OK 5\n".into())), Verdict::Works);
        assert!(matches!(classify(true, &ChildEnd::TimedOut(Duration::from_secs(2))), Verdict::Broken(_)));
        assert!(matches!(classify(true, &ChildEnd::Exited(1, "KVM_RUN: EINTR".into())), Verdict::Broken(_)));
        assert!(matches!(classify(true, &ChildEnd::Exited(0, "PINLAB-KVM-OK 7".into())), Verdict::Broken(_)));
        assert!(matches!(classify(true, &ChildEnd::Signalled), Verdict::Broken(_)));
        let d = classify(true, &ChildEnd::TimedOut(Duration::from_secs(2))).describe();
        assert!(
            d.starts_with("KVM: /dev/kvm present but a vCPU did not run (nested virtualization?) → using TCG"),
            "{d}"
        );
        assert!(!Verdict::Absent.usable());
        assert!(Verdict::Works.usable());
    }
}
