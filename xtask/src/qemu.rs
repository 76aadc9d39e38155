//! The only place QEMU's command line is built: pure `*_args()` helpers, one
//! per concern, each flag commented, unit-tested below.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// `kvm` / `tcg`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::str::FromStr for Accel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => anyhow::bail!("unknown accelerator '{s}' (expected kvm or tcg)"),
        }
    }
}

/// The QEMU binary pinlab runs (package qemu-system-x86).
pub const PROGRAM: &str = "qemu-system-x86_64";

/// Guest RAM. Enough for rxe, two 2 MiB MRs per process and mkfs.
pub const RAM_MIB: u64 = 1024;
/// The fsdax NVDIMM (namespace0.0 → /dev/pmem0), label-less (its region is
/// the whole NVDIMM, 2 MiB aligned). As small as the filesystems allow:
/// xfsprogs refuses filesystems under 300 MiB, and the namespace also holds
/// its own memmap (64 bytes per 4 KiB page). The bench registers 256 MiB
/// files, which still fit. Everything that reads or fills the whole
/// namespace (`locate`, S20's victim) costs time in proportion: under TCG
/// 1 GiB took 5-7 s per raw read.
pub const PMEM_MIB: u64 = 384;
/// The devdax NVDIMM (namespace1.0 → /dev/dax1.0); S16 maps 2 MiB of it.
/// Creating the namespace initialises its memmap, so small is quicker.
pub const DEVDAX_MIB: u64 = 64;

/// Everything one boot needs.
#[derive(Clone, Debug)]
pub struct QemuSpec {
    /// `-accel` choice.
    pub accel: Accel,
    /// vCPUs.
    pub cpus: u32,
    /// The kernel image.
    pub kernel: PathBuf,
    /// Extra kernel command line (appended).
    pub cmdline_extra: String,
    /// NVDIMM backing files: fsdax, devdax.
    pub pmem: PathBuf,
    /// See [`QemuSpec::pmem`].
    pub devdax: PathBuf,
    /// vhost-user socket of the virtiofsd serving the rootfs.
    pub rootfs_sock: PathBuf,
    /// vhost-user socket of the virtiofsd serving the run share.
    pub share_sock: PathBuf,
    /// A person types on the console (`cargo xtask shell`).
    pub interactive: bool,
    /// Interactive only: also log the console to this file.
    pub console_log: Option<PathBuf>,
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

/// `p` as a value inside a `key=value,...` option string. QEMU splits such
/// strings at commas and reads a doubled comma as a literal one
/// (docs/system/invocation.rst), so `/tmp/a,b` must be written `/tmp/a,,b`;
/// spaces and everything else pass as they are (argv is not a shell line).
/// Bytes, not `display()`: a non-UTF-8 path reaches QEMU unchanged.
pub fn opt_value(p: &Path) -> OsString {
    let mut out = Vec::with_capacity(p.as_os_str().len() + 4);
    for &b in p.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// `head` + `path` (escaped with [`opt_value`]) + `tail`: one option string.
fn opt_with_path(head: &str, path: &Path, tail: &str) -> OsString {
    let mut o = OsString::from(head);
    o.push(opt_value(path));
    o.push(tail);
    o
}

/// Machine, CPU model and accelerator.
pub fn machine_args(accel: Accel, cpus: u32) -> Vec<OsString> {
    let mut a = os(&[
        // Start from nothing: no default NIC, VGA, floppy, CD, monitor or user config.
        "-nodefaults",
        "-no-user-config",
        // A guest poweroff or panic (panic=-1 below) ends QEMU instead of rebooting.
        "-no-reboot",
        // No window; the console is the serial port on stdio.
        "-display",
        "none",
        // "pc" (i440fx) with the NVDIMM ACPI NFIT enabled, and no PS/2
        // controller: probing for a PS/2 mouse cost 0.4 s of every TCG boot.
        "-machine",
        "pc,nvdimm=on,i8042=off",
        "-smp",
    ]);
    a.push(cpus.to_string().into());
    match accel {
        // A working KVM: the host CPU model is fastest.
        Accel::Kvm => a.extend(os(&["-accel", "kvm", "-cpu", "host"])),
        // TCG: one host thread per vCPU; "max" gives every feature TCG can emulate.
        Accel::Tcg => a.extend(os(&["-accel", "tcg,thread=multi", "-cpu", "max"])),
    }
    a
}

/// Guest RAM on a shared memfd (vhost-user-fs needs guest RAM it can map),
/// with room for the NVDIMMs as hot-pluggable memory.
pub fn memory_args() -> Vec<OsString> {
    vec![
        "-m".into(),
        // slots/maxmem: NVDIMMs live in the hotplug area above RAM.
        format!("{RAM_MIB}M,slots=4,maxmem={}M", RAM_MIB + PMEM_MIB + DEVDAX_MIB + 1024).into(),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={RAM_MIB}M,share=on").into(),
        // Guest RAM must come from the shared memfd: one NUMA node backed by it.
        "-numa".into(),
        "node,memdev=mem".into(),
    ]
}

/// Two label-less NVDIMMs on sparse host files (share=on: guest writes reach
/// the file, as on real persistent memory).
pub fn nvdimm_args(pmem: &Path, devdax: &Path) -> Vec<OsString> {
    let mut a = Vec::new();
    for (i, (file, mib)) in [(pmem, PMEM_MIB), (devdax, DEVDAX_MIB)].into_iter().enumerate() {
        a.push("-object".into());
        a.push(opt_with_path(
            &format!("memory-backend-file,id=nv{i},share=on,mem-path="),
            file,
            &format!(",size={mib}M"),
        ));
        a.push("-device".into());
        a.push(format!("nvdimm,id=nvdimm{i},memdev=nv{i}").into());
    }
    a
}

/// virtiofs shares: the rootfs (`rootfs`) and the run share (`pinlab`).
pub fn virtiofs_args(rootfs_sock: &Path, share_sock: &Path) -> Vec<OsString> {
    let mut a = Vec::new();
    for (i, (sock, tag)) in [(rootfs_sock, "rootfs"), (share_sock, "pinlab")].into_iter().enumerate() {
        a.push("-chardev".into());
        a.push(opt_with_path(&format!("socket,id=vfs{i},path="), sock, ""));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-pci,chardev=vfs{i},tag={tag}").into());
    }
    a
}

/// No NIC at all: rxe runs on the guest's own dummy0 netdev, so nothing can
/// leave the guest. (A virtio-net on a QEMU hub with no other port stalls its
/// TX queue and the guest logs NETDEV WATCHDOG timeouts every 5 s.)
/// Entropy, so nothing in the guest waits for the CRNG.
pub fn net_args() -> Vec<OsString> {
    os(&["-device", "virtio-rng-pci"])
}

/// The serial console on stdio (the host tees it to console.log); no
/// monitor. Interactive: Ctrl-C goes to the guest, not to QEMU, and QEMU
/// itself logs the console to `log` (the host does not see the stream).
pub fn serial_args(interactive: bool, log: Option<&Path>) -> Vec<OsString> {
    if interactive {
        let chardev = match log {
            Some(l) => opt_with_path("stdio,id=con0,signal=off,logfile=", l, ",logappend=off"),
            None => "stdio,id=con0,signal=off".into(),
        };
        vec!["-chardev".into(), chardev, "-serial".into(), "chardev:con0".into(), "-monitor".into(), "none".into()]
    } else {
        os(&["-serial", "stdio", "-monitor", "none"])
    }
}

/// The kernel command line.
pub fn cmdline(extra: &str) -> String {
    let mut s = String::from(
        // Console on the first serial port.
        "console=ttyS0 \
         root=rootfs rootfstype=virtiofs ro \
         init=/usr/local/bin/pinlab-init \
         panic=-1 oops=panic \
         sysctl.kernel.hung_task_timeout_secs=20 \
         loglevel=7",
    );
    // oops=panic: an oops ends the run at once instead of leaving a wedged guest.
    // hung_task_timeout_secs=20: a task stuck in D state is reported by the
    // guest kernel itself (with its stack) well before the runner's 60 s step
    // deadline and the host's watchdog.
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// Direct kernel boot. `-kernel` takes the path as a whole argument (QEMU
/// sets the machine's `kernel` property from it without splitting at
/// commas), so it is not escaped.
pub fn kernel_args(kernel: &Path, extra: &str) -> Vec<OsString> {
    vec!["-kernel".into(), kernel.into(), "-append".into(), cmdline(extra).into()]
}

/// The whole argv (without the program name).
pub fn args(spec: &QemuSpec) -> Vec<OsString> {
    let mut a = machine_args(spec.accel, spec.cpus);
    a.extend(memory_args());
    a.extend(nvdimm_args(&spec.pmem, &spec.devdax));
    a.extend(virtiofs_args(&spec.rootfs_sock, &spec.share_sock));
    a.extend(net_args());
    a.extend(serial_args(spec.interactive, spec.console_log.as_deref()));
    a.extend(kernel_args(&spec.kernel, &spec.cmdline_extra));
    a
}

/// A QEMU to run: the program and where its firmware is (`-L`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuBin {
    /// `qemu-system-x86_64` (a script in tests).
    pub program: PathBuf,
    /// Firmware directories, searched in order.
    pub datadirs: Vec<PathBuf>,
}

impl QemuBin {
    /// The QEMU extracted from Debian packages into `root` (see
    /// [`crate::host::ensure_qemu`]): its own data package first, then the
    /// host's seabios and QEMU data (its symlinks point there).
    pub fn extracted(root: &Path) -> QemuBin {
        QemuBin {
            program: root.join("usr/bin").join(PROGRAM),
            datadirs: vec![root.join("usr/share/qemu"), "/usr/share/seabios".into(), "/usr/share/qemu".into()],
        }
    }

    /// Just a program (tests' fake QEMU).
    #[cfg(test)]
    pub fn program(p: &Path) -> QemuBin {
        QemuBin { program: p.to_path_buf(), datadirs: Vec::new() }
    }
}

/// The QEMU command for `spec`: `bin`'s program with `-L` for its firmware,
/// then [`args`].
pub fn command(bin: &QemuBin, spec: &QemuSpec) -> std::process::Command {
    let mut c = std::process::Command::new(&bin.program);
    for d in &bin.datadirs {
        c.arg("-L").arg(d);
    }
    c.args(args(spec));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_parse() {
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("hvf".parse::<Accel>().is_err());
    }

    fn spec(accel: Accel) -> QemuSpec {
        QemuSpec {
            accel,
            cpus: 2,
            kernel: "/k/bzImage".into(),
            cmdline_extra: "pinlab.mode=run".into(),
            pmem: "/t/pmem0.img".into(),
            devdax: "/t/pmem1.img".into(),
            rootfs_sock: "/t/rootfs.sock".into(),
            share_sock: "/t/share.sock".into(),
            interactive: false,
            console_log: None,
        }
    }

    fn joined(a: &[OsString]) -> String {
        a.iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn tcg_argv() {
        let a = joined(&args(&spec(Accel::Tcg)));
        assert!(a.contains("-machine pc,nvdimm=on,i8042=off"), "{a}");
        assert!(a.contains("-accel tcg,thread=multi -cpu max"), "{a}");
        assert!(!a.contains("kvm"), "{a}");
        assert!(a.contains("-object memory-backend-memfd,id=mem,size=1024M,share=on -numa node,memdev=mem"), "{a}");
        assert!(a.contains("memory-backend-file,id=nv0,share=on,mem-path=/t/pmem0.img,size=384M -device nvdimm,id=nvdimm0,memdev=nv0"), "{a}");
        assert!(a.contains("mem-path=/t/pmem1.img,size=64M"), "{a}");
        assert!(
            a.contains("-chardev socket,id=vfs0,path=/t/rootfs.sock -device vhost-user-fs-pci,chardev=vfs0,tag=rootfs"),
            "{a}"
        );
        assert!(a.contains("tag=pinlab"), "{a}");
        assert!(a.contains("-no-reboot"), "{a}");
        assert!(a.ends_with("pinlab.mode=run"), "{a}");
    }

    #[test]
    fn interactive_console_keeps_ctrl_c_for_the_guest() {
        let mut s = spec(Accel::Tcg);
        s.interactive = true;
        let a = joined(&args(&s));
        assert!(a.contains("-chardev stdio,id=con0,signal=off -serial chardev:con0"), "{a}");
    }

    #[test]
    fn kvm_argv() {
        let a = joined(&args(&spec(Accel::Kvm)));
        assert!(a.contains("-accel kvm -cpu host"), "{a}");
    }

    #[test]
    fn no_host_networking() {
        let a = joined(&args(&spec(Accel::Tcg)));
        assert!(!a.contains("-netdev") && !a.contains("-nic") && !a.contains("tap"), "{a}");
    }

    #[test]
    fn commas_in_option_values_are_doubled() {
        assert_eq!(opt_value(Path::new("/tmp/a,b/pmem0.img")), "/tmp/a,,b/pmem0.img");
        assert_eq!(opt_value(Path::new("/tmp/a,,b")), "/tmp/a,,,,b");
        assert_eq!(opt_value(Path::new("/tmp/a b/rootfs.sock")), "/tmp/a b/rootfs.sock");
        assert_eq!(opt_value(Path::new("/t/pmem0.img")), "/t/pmem0.img");
        // Non-UTF-8 bytes pass unchanged.
        let raw = Path::new(std::ffi::OsStr::from_bytes(b"/t/\xff,x"));
        assert_eq!(opt_value(raw).as_bytes(), b"/t/\xff,,x");
    }

    #[test]
    fn every_path_in_an_option_string_is_escaped() {
        let mut s = spec(Accel::Tcg);
        s.pmem = "/tmp/a,b/pmem0.img".into();
        s.devdax = "/tmp/a b/pmem1.img".into();
        s.rootfs_sock = "/tmp/a,b/rootfs.sock".into();
        s.share_sock = "/tmp/a b,c/share.sock".into();
        s.kernel = "/k,1/bzImage".into();
        let argv = args(&s);
        let a = joined(&argv);
        assert!(a.contains("memory-backend-file,id=nv0,share=on,mem-path=/tmp/a,,b/pmem0.img,size=384M"), "{a}");
        assert!(a.contains("memory-backend-file,id=nv1,share=on,mem-path=/tmp/a b/pmem1.img,size=64M"), "{a}");
        assert!(a.contains("-chardev socket,id=vfs0,path=/tmp/a,,b/rootfs.sock -device"), "{a}");
        assert!(a.contains("-chardev socket,id=vfs1,path=/tmp/a b,,c/share.sock -device"), "{a}");
        // -kernel's argument is a whole path, not an option string.
        let k = argv.iter().position(|x| x == "-kernel").unwrap();
        assert_eq!(argv[k + 1], "/k,1/bzImage");
    }

    #[test]
    fn maxmem_covers_ram_and_nvdimms() {
        let a = joined(&memory_args());
        assert!(a.contains("1024M,slots=4,maxmem=2496M"), "{a}");
    }
}
