//! Is KVM usable, or only present? `/dev/kvm` may open fine inside a nested
//! VM whose vCPUs then hang at 100% sys (seen on this project's CI machines),
//! so the answer comes from running a real guest: a child process creates a
//! VM and one vCPU, runs a few real-mode instructions that write to an I/O
//! port and halt, and must finish within a deadline. Before that, `/dev/kvm`
//! must open read/write for this user: a user outside the kvm group is told
//! so, not sent looking for nested virtualization.

use anyhow::{bail, Context, Result};
use kvm_ioctls::{Kvm, VcpuExit};
use std::os::unix::fs::MetadataExt;
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
    /// `/dev/kvm` is there but this user cannot open it read/write: what
    /// stands in the way and what to do, in words (the probe did not run).
    NoAccess(String),
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
            Verdict::NoAccess(why) => format!("KVM: {why} → using TCG"),
            Verdict::Absent => "KVM: absent → using TCG".into(),
        }
    }
}

/// What opening `/dev/kvm` read/write found: the facts, judged by [`classify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevKvm {
    /// No such file.
    Missing,
    /// It opened read/write.
    Opens,
    /// The open failed with `errno`.
    OpenFailed {
        /// The open's errno (`EACCES`: file permissions; `EPERM`: a policy).
        errno: i32,
        /// Who tried: the effective user's name (or `uid N`).
        user: String,
        /// The file's permission bits.
        mode: u32,
        /// The file's group's name (or `gid N`).
        group: String,
    },
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

/// Pure classification, unit-tested: the probe prints `PINLAB-KVM-OK 56`
/// after both phases' guests wrote their digit to port 0x3f8 and halted.
/// `end` only counts when `/dev/kvm` opens (otherwise the probe is not run).
pub fn classify(dev: &DevKvm, end: &ChildEnd) -> Verdict {
    let (errno, user, mode, group) = match dev {
        DevKvm::Missing => return Verdict::Absent,
        DevKvm::OpenFailed { errno, user, mode, group } => (*errno, user, *mode, group),
        DevKvm::Opens => return classify_run(end),
    };
    let who = format!("/dev/kvm is not accessible to user {user}");
    let join = "sudo usermod -aG kvm $USER, then log in again";
    Verdict::NoAccess(match errno {
        libc::EACCES if mode & 0o006 == 0o006 => format!(
            "{who} (permission denied, although mode {:04o} lets everyone read and write it: \
             is /dev mounted nodev, or is an ACL or a security module in the way?)",
            mode & 0o7777
        ),
        libc::EACCES if mode & 0o060 == 0o060 => format!(
            "{who} (permission denied): add yourself to the {group} group \
             (sudo usermod -aG {group} $USER, then log in again)"
        ),
        libc::EACCES => format!(
            "{who} (permission denied; mode {:04o}, group {group}, which may not read and write it): \
             give the kvm group access (sudo chgrp kvm /dev/kvm; sudo chmod 0660 /dev/kvm, or a udev rule) \
             and add yourself to it ({join})",
            mode & 0o7777
        ),
        libc::EPERM => format!(
            "{who} (operation not permitted: a container's device rules or a security policy forbid it, \
             not the file's permissions)"
        ),
        e => format!("{who} (open read/write failed: {})", std::io::Error::from_raw_os_error(e)),
    })
}

/// The verdict on a probe that ran.
fn classify_run(end: &ChildEnd) -> Verdict {
    match end {
        ChildEnd::Exited(0, out) if out.trim() == "PINLAB-KVM-OK 56" => Verdict::Works,
        ChildEnd::Exited(0, out) => Verdict::Broken(format!("probe printed {:?}", out.trim())),
        ChildEnd::Exited(code, out) => Verdict::Broken(format!("probe exited {code}: {}", out.trim())),
        ChildEnd::Signalled => Verdict::Broken("probe killed by a signal".into()),
        ChildEnd::TimedOut(d) => Verdict::Broken(format!("vCPU still running after {}", crate::util::fmt_duration(*d))),
        ChildEnd::SpawnFailed(e) => Verdict::Broken(format!("could not start probe: {e}")),
    }
}

/// Check that this user can open `/dev/kvm` read/write, then run the probe in
/// a child process (this binary, `kvm-probe`) with a deadline.
pub fn probe() -> Verdict {
    match open_rw(Path::new("/dev/kvm")) {
        DevKvm::Opens => classify(&DevKvm::Opens, &run_child(Duration::from_secs(2))),
        dev => classify(&dev, &ChildEnd::SpawnFailed("not run".into())),
    }
}

/// Open `path` read/write (and close it again), as QEMU and the probe will.
pub fn open_rw(path: &Path) -> DevKvm {
    let err = match fs_err::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => return DevKvm::Opens,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DevKvm::Missing,
        Err(e) => e,
    };
    let meta = fs_err::metadata(path).ok();
    DevKvm::OpenFailed {
        errno: err.raw_os_error().unwrap_or(0),
        // SAFETY: geteuid has no preconditions and cannot fail.
        user: user_name(unsafe { libc::geteuid() }),
        mode: meta.as_ref().map_or(0, |m| m.mode()),
        group: meta.map_or_else(|| "?".into(), |m| group_name(m.gid())),
    }
}

/// The name of user `uid` from the passwd database, or `uid N`.
fn user_name(uid: libc::uid_t) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut res) };
    if rc != 0 || res.is_null() || pw.pw_name.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside buf.
    unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }.to_string_lossy().into_owned()
}

/// The name of group `gid` from the group database, or `gid N`.
fn group_name(gid: libc::gid_t) -> String {
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: an all-zero group is a valid value to be overwritten.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut res) };
    if rc != 0 || res.is_null() || gr.gr_name.is_null() {
        return format!("gid {gid}");
    }
    // SAFETY: on success gr_name points to a NUL-terminated string inside buf.
    unsafe { std::ffi::CStr::from_ptr(gr.gr_name) }.to_string_lossy().into_owned()
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

/// The child side. Phase 1 is the kvm-ioctls real-mode example, step for
/// step; it prints `5`. Phase 2 does what every Linux boot needs and the real
/// mode example does not: an in-kernel irqchip and PIT, the supported CPUID,
/// and 64-bit long mode with paging; it prints `6`. On nested hosts whose KVM
/// hangs Linux guests, phase 1 alone has been seen to pass.
pub fn child_main() -> Result<()> {
    let kvm = Kvm::new().context("Failed to open /dev/kvm")?;
    let mut out = real_mode(&kvm).context("real-mode phase")?;
    out.push_str(&long_mode(&kvm).context("long-mode phase")?);
    println!("PINLAB-KVM-OK {out}");
    Ok(())
}

/// Run `vcpu` until it halts, collecting what it writes to port 0x3f8.
fn run_to_hlt(vcpu: &mut kvm_ioctls::VcpuFd) -> Result<String> {
    let mut out = String::new();
    for _ in 0..16 {
        match vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(0x3f8, data) => out.push_str(&String::from_utf8_lossy(data)),
            VcpuExit::Hlt => return Ok(out),
            other => bail!("unexpected vCPU exit {other:?}"),
        }
    }
    bail!("the probe guest did not halt")
}

/// Map `mem` into `vm` at guest physical 0 as slot `slot`.
fn add_memory(vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap, base: GuestAddress, size: u64, slot: u32) -> Result<()> {
    let host = mem.get_host_address(base).context("Failed to find the host address of guest memory")?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot,
        guest_phys_addr: base.0,
        memory_size: size,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: `host` points to `size` bytes mapped by `mem`, which the caller
    // keeps alive for as long as the VM exists.
    unsafe { vm.set_user_memory_region(region) }.context("Failed to set the memory region")
}

fn real_mode(kvm: &Kvm) -> Result<String> {
    // 2. One VM.
    let vm = kvm.create_vm().context("Failed to create a VM")?;
    // 3. One page of guest memory at 0x1000 holding the code:
    //    mov $0x3f8,%dx; add %bl,%al; add $'0',%al; out %al,%dx; hlt
    let code: [u8; 12] = [0xba, 0xf8, 0x03, 0x00, 0xd8, 0x04, b'0', 0xee, 0xf4, 0xf4, 0xf4, 0xf4];
    let base = GuestAddress(0x1000);
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(base, 0x1000)]).context("Failed to map guest memory")?;
    mem.write_slice(&code, base).context("Failed to write the probe code")?;
    add_memory(&vm, &mem, base, 0x1000, 0)?;
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
    run_to_hlt(&mut vcpu)
}

fn long_mode(kvm: &Kvm) -> Result<String> {
    const GDT: u64 = 0x500;
    const PML4: u64 = 0x9000;
    const PDPT: u64 = 0xa000;
    const PD: u64 = 0xb000;
    const CODE: u64 = 0x1000;
    let vm = kvm.create_vm().context("Failed to create a VM")?;
    // What QEMU sets up before the first instruction of a Linux guest.
    vm.set_tss_address(0xfffb_d000).context("KVM_SET_TSS_ADDR")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    vm.create_pit2(kvm_bindings::kvm_pit_config::default()).context("KVM_CREATE_PIT2")?;
    let base = GuestAddress(0);
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(base, 0x10000)]).context("Failed to map guest memory")?;
    // GDT: null, 64-bit code, data.
    let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + 8 * i as u64)).context("write GDT")?;
    }
    // Identity-map the first 2 MiB: PML4 → PDPT → PD with one 2 MiB page.
    mem.write_obj(PDPT | 3, GuestAddress(PML4)).context("write PML4")?;
    mem.write_obj(PD | 3, GuestAddress(PDPT)).context("write PDPT")?;
    mem.write_obj(0x83u64, GuestAddress(PD)).context("write PD")?;
    // mov $0x3f8,%dx; mov $'6',%al; out %al,%dx; hlt
    let code: [u8; 8] = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'6', 0xee, 0xf4];
    mem.write_slice(&code, GuestAddress(CODE)).context("write code")?;
    add_memory(&vm, &mem, base, 0x10000, 0)?;
    let mut vcpu = vm.create_vcpu(0).context("Failed to create a vCPU")?;
    let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).context("KVM_GET_SUPPORTED_CPUID")?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
    let mut s = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(0x8, 0xb, 1, 0);
    let data = seg(0x10, 0x3, 0, 1);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.gdt.base = GDT;
    s.gdt.limit = 23;
    s.cr3 = PML4;
    s.cr4 |= 1 << 5; // PAE
    s.cr0 |= 1 | (1 << 31); // PE | PG
    s.efer |= (1 << 8) | (1 << 10); // LME | LMA
    vcpu.set_sregs(&s).context("KVM_SET_SREGS")?;
    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rip = CODE;
    regs.rsp = 0x8000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    run_to_hlt(&mut vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let ok = DevKvm::Opens;
        assert_eq!(classify(&DevKvm::Missing, &ChildEnd::Exited(0, "PINLAB-KVM-OK 56".into())), Verdict::Absent);
        assert_eq!(classify(&ok, &ChildEnd::Exited(0, "PINLAB-KVM-OK 56\n".into())), Verdict::Works);
        assert!(matches!(classify(&ok, &ChildEnd::TimedOut(Duration::from_secs(2))), Verdict::Broken(_)));
        assert!(matches!(classify(&ok, &ChildEnd::Exited(1, "KVM_RUN: EINTR".into())), Verdict::Broken(_)));
        assert!(matches!(classify(&ok, &ChildEnd::Exited(0, "PINLAB-KVM-OK 5".into())), Verdict::Broken(_)));
        assert!(matches!(classify(&ok, &ChildEnd::Signalled), Verdict::Broken(_)));
        let d = classify(&ok, &ChildEnd::TimedOut(Duration::from_secs(2))).describe();
        assert_eq!(
            d,
            "KVM: /dev/kvm present but a vCPU did not run (nested virtualization?) → using TCG \
             [vCPU still running after 2.0s]"
        );
        assert_eq!(Verdict::Absent.describe(), "KVM: absent → using TCG");
        assert_eq!(Verdict::Works.describe(), "KVM: works");
        assert!(!Verdict::Absent.usable());
        assert!(Verdict::Works.usable());
    }

    fn failed(errno: i32, mode: u32, group: &str) -> DevKvm {
        DevKvm::OpenFailed { errno, user: "alice".into(), mode: 0o20000 | mode, group: group.into() }
    }

    #[test]
    fn no_access_says_so_instead_of_blaming_nesting() {
        // Even a probe that would have worked does not count: it is not run.
        let works = ChildEnd::Exited(0, "PINLAB-KVM-OK 56".into());
        let v = classify(&failed(libc::EACCES, 0o660, "kvm"), &works);
        assert!(!v.usable());
        assert_eq!(
            v.describe(),
            "KVM: /dev/kvm is not accessible to user alice (permission denied): add yourself to the kvm group \
             (sudo usermod -aG kvm $USER, then log in again) → using TCG"
        );
        // The group that may open it is named as it is.
        let d = classify(&failed(libc::EACCES, 0o660, "hypervisor"), &works).describe();
        assert!(d.contains("add yourself to the hypervisor group (sudo usermod -aG hypervisor $USER"), "{d}");
        // No group access at all: the group alone would not help.
        let d = classify(&failed(libc::EACCES, 0o600, "root"), &works).describe();
        assert!(
            d.starts_with("KVM: /dev/kvm is not accessible to user alice (permission denied; mode 0600, group root"),
            "{d}"
        );
        assert!(d.contains("sudo chmod 0660 /dev/kvm") && d.contains("sudo usermod -aG kvm $USER"), "{d}");
        // Everyone may, yet it was refused: not a group matter either.
        let d = classify(&failed(libc::EACCES, 0o666, "kvm"), &works).describe();
        assert!(d.contains("mode 0666 lets everyone") && !d.contains("usermod"), "{d}");
        // A policy, not permissions.
        let d = classify(&failed(libc::EPERM, 0o666, "kvm"), &works).describe();
        assert!(d.contains("operation not permitted") && !d.contains("usermod"), "{d}");
        for d in [d, classify(&failed(libc::ENXIO, 0o666, "kvm"), &works).describe()] {
            assert!(!d.contains("nested"), "{d}");
            assert!(d.ends_with("→ using TCG"), "{d}");
        }
    }

    #[test]
    fn open_rw_on_real_files() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(open_rw(&d.path().join("nope")), DevKvm::Missing);
        let f = d.path().join("kvm");
        fs_err::write(&f, "").unwrap();
        assert_eq!(open_rw(&f), DevKvm::Opens);
        // Root opens anything; as any other user a mode-000 file is refused.
        fs_err::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            match open_rw(&f) {
                DevKvm::OpenFailed { errno, user, mode, .. } => {
                    assert_eq!(errno, libc::EACCES);
                    assert_eq!(mode & 0o777, 0);
                    assert!(!user.is_empty());
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
