//! `cargo xtask doctor`: what the host has and lacks, and installing what is
//! missing (Debian package names; `apt-get` as root, else the command to run).

use crate::util::{self, Cache};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One host requirement.
#[derive(Clone, Debug)]
pub struct Req {
    /// What it is for, as printed.
    pub what: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// How to tell it is there.
    pub check: Check,
    /// Which steps need it.
    pub needed_for: Need,
}

/// How a requirement is detected.
#[derive(Clone, Debug)]
pub enum Check {
    /// A program on PATH.
    Program(&'static str),
    /// Any of these files exists (headers, libraries).
    AnyFile(&'static [&'static str]),
}

/// Which pipeline step needs a requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Building kernels.
    Kernel,
    /// Building the demos (sideway: cmake + libclang).
    Demos,
    /// Building the rootfs.
    Image,
    /// Booting.
    Boot,
    /// Building virtiofsd with cargo.
    Virtiofsd,
    /// `cargo xtask test`: rendering the report.
    Test,
    /// Nice to have.
    Optional,
}

/// Everything pinlab uses from the host.
pub fn requirements() -> Vec<Req> {
    use Check::*;
    use Need::*;
    vec![
        Req {
            what: "qemu-system-x86_64",
            package: "qemu-system-x86",
            check: Program("qemu-system-x86_64"),
            needed_for: Boot,
        },
        Req { what: "make", package: "make", check: Program("make"), needed_for: Kernel },
        Req { what: "gcc", package: "gcc", check: Program("gcc"), needed_for: Kernel },
        Req { what: "flex", package: "flex", check: Program("flex"), needed_for: Kernel },
        Req { what: "bison", package: "bison", check: Program("bison"), needed_for: Kernel },
        Req { what: "bc", package: "bc", check: Program("bc"), needed_for: Kernel },
        // The bzImage is LZ4-compressed (kernel-config/10-base.config).
        Req { what: "lz4", package: "lz4", check: Program("lz4"), needed_for: Kernel },
        Req { what: "cpio", package: "cpio", check: Program("cpio"), needed_for: Kernel },
        Req { what: "perl", package: "perl", check: Program("perl"), needed_for: Kernel },
        Req {
            what: "libelf headers",
            package: "libelf-dev",
            check: AnyFile(&["/usr/include/libelf.h", "/usr/include/libelf/libelf.h"]),
            needed_for: Kernel,
        },
        Req {
            what: "libssl headers",
            package: "libssl-dev",
            check: AnyFile(&["/usr/include/openssl/ssl.h"]),
            needed_for: Kernel,
        },
        Req { what: "ccache", package: "ccache", check: Program("ccache"), needed_for: Optional },
        Req { what: "cmake (sideway)", package: "cmake", check: Program("cmake"), needed_for: Demos },
        Req {
            what: "libclang (sideway)",
            package: "libclang-dev",
            check: AnyFile(&[
                "/usr/lib/llvm-14/lib/libclang.so",
                "/usr/lib/llvm-15/lib/libclang.so",
                "/usr/lib/llvm-16/lib/libclang.so",
                "/usr/lib/llvm-17/lib/libclang.so",
                "/usr/lib/llvm-18/lib/libclang.so",
                "/usr/lib/llvm-19/lib/libclang.so",
                "/usr/lib/x86_64-linux-gnu/libclang.so",
            ]),
            needed_for: Demos,
        },
        Req { what: "apt-get", package: "apt", check: Program("apt-get"), needed_for: Image },
        Req { what: "dpkg-deb", package: "dpkg", check: Program("dpkg-deb"), needed_for: Image },
        Req { what: "tar", package: "tar", check: Program("tar"), needed_for: Image },
        Req {
            what: "libseccomp headers (virtiofsd)",
            package: "libseccomp-dev",
            check: AnyFile(&["/usr/include/seccomp.h"]),
            needed_for: Virtiofsd,
        },
        Req {
            what: "libcap-ng headers (virtiofsd)",
            package: "libcap-ng-dev",
            check: AnyFile(&["/usr/include/cap-ng.h"]),
            needed_for: Virtiofsd,
        },
        Req { what: "pkg-config", package: "pkg-config", check: Program("pkg-config"), needed_for: Virtiofsd },
        Req { what: "chromium (report test)", package: "chromium", check: Program("chromium"), needed_for: Test },
    ]
}

impl Req {
    /// Whether the host has it.
    pub fn present(&self) -> bool {
        match &self.check {
            Check::Program(p) => util::which(p).is_some(),
            Check::AnyFile(files) => files.iter().any(|f| Path::new(f).exists()),
        }
    }
}

/// Make sure the requirements for `needs` are present: install them with
/// apt-get when running as root on an apt host (unless `no_install`), else
/// stop with the exact command to run.
pub fn ensure(needs: &[Need], no_install: bool) -> Result<()> {
    let missing: Vec<Req> = requirements()
        .into_iter()
        .filter(|r| needs.contains(&r.needed_for) || r.needed_for == Need::Optional)
        .filter(|r| !r.present())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|r| r.package).collect();
    pkgs.sort();
    pkgs.dedup();
    let cmd = format!("apt-get install -y --no-install-recommends {}", pkgs.join(" "));
    let is_root = nix_is_root();
    if no_install || !is_root || util::which("apt-get").is_none() {
        let names: Vec<_> = missing.iter().map(|r| format!("{} ({})", r.what, r.package)).collect();
        bail!("missing host tools: {}\nInstall them with:\n    sudo apt-get update && sudo {cmd}", names.join(", "));
    }
    eprintln!("pinlab: installing missing host packages: {}", pkgs.join(" "));
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    util::run_shown(update).context("Failed to run apt-get update")?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive");
    util::run_shown(install).with_context(|| format!("Failed to install host packages; try `{cmd}` by hand"))?;
    let still: Vec<_> =
        requirements().into_iter().filter(|r| needs.contains(&r.needed_for) && !r.present()).map(|r| r.what).collect();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

/// Whether pinlab runs as root (then it may install host packages itself).
pub fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// QEMU devices pinlab needs, and whether `qemu-system-x86_64 -device help` lists them.
pub fn qemu_devices() -> Result<Vec<(&'static str, bool)>> {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-device", "help"]);
    let out = util::output(c)?;
    Ok(["nvdimm", "vhost-user-fs-pci", "virtio-rng-pci"]
        .into_iter()
        .map(|d| (d, out.contains(&format!("name \"{d}\""))))
        .collect())
}

/// The virtiofsd to use: on PATH, Debian's /usr/libexec one, or pinlab's own
/// `cargo install` in the cache.
pub fn find_virtiofsd(cache: &Cache) -> Option<PathBuf> {
    let own = cache.root.join("tools/bin/virtiofsd");
    [util::which("virtiofsd"), Some(PathBuf::from("/usr/libexec/virtiofsd")), Some(own)]
        .into_iter()
        .flatten()
        .find(|p| util::is_executable(p))
}

/// A usable virtiofsd, installed with `cargo install virtiofsd --locked` into
/// the cache when there is none (about 1.5 minutes, once).
pub fn ensure_virtiofsd(cache: &Cache, no_install: bool) -> Result<PathBuf> {
    if let Some(p) = find_virtiofsd(cache) {
        return Ok(p);
    }
    ensure(&[Need::Virtiofsd], no_install)?;
    let root = cache.dir("tools")?;
    eprintln!("pinlab: building virtiofsd once into {} (about 1.5 minutes on 2 cores)", root.display());
    let mut c = Command::new("cargo");
    c.args(["install", "virtiofsd", "--locked", "--root"]).arg(&root);
    util::run_shown(c).context("Failed to build virtiofsd (needs libseccomp-dev and libcap-ng-dev)")?;
    find_virtiofsd(cache).context("cargo install virtiofsd finished but no virtiofsd binary appeared")
}

/// Free space in the filesystem holding `p`, in bytes.
pub fn free_bytes(p: &Path) -> Option<u64> {
    let mut c = Command::new("df");
    c.args(["--output=avail", "-B1"]).arg(p);
    util::output(c).ok()?.lines().nth(1)?.trim().parse().ok()
}

/// `cargo xtask doctor`.
pub fn doctor(cache: &Cache) -> Result<()> {
    let mut missing = Vec::new();
    for r in requirements() {
        let ok = r.present();
        let mark = if ok { "ok     " } else { "MISSING" };
        let opt = if r.needed_for == Need::Optional { " (optional)" } else { "" };
        println!("{mark} {}{opt}  [{}]", r.what, r.package);
        if !ok {
            missing.push(r.package);
        }
    }
    if util::which("qemu-system-x86_64").is_some() {
        match qemu_devices() {
            Ok(devs) => {
                for (d, ok) in devs {
                    println!("{} qemu device {d}", if ok { "ok     " } else { "MISSING" });
                }
            }
            Err(e) => println!("MISSING qemu devices: {e:#}"),
        }
    }
    match find_virtiofsd(cache) {
        Some(p) => println!("ok      virtiofsd  [{}]", p.display()),
        None => println!(
            "MISSING virtiofsd  [`cargo xtask run` builds it with cargo install into {}]",
            cache.root.display()
        ),
    }
    let existing = cache.root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let free = free_bytes(existing);
    match free {
        Some(b) => {
            let gib = b as f64 / (1u64 << 30) as f64;
            let mark = if gib >= 10.0 { "ok     " } else { "LOW    " };
            println!("{mark} free disk for the cache: {gib:.1} GiB (about 6 GiB needed: kernel source, two build dirs, rootfs)");
        }
        None => println!("?       free disk: could not run df"),
    }
    println!("{}", crate::kvm::probe().describe());
    println!("cache: {}", cache.root.display());
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        println!(
            "\nTo install what is missing:\n    sudo apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        );
        println!("(`cargo xtask run demo` does this itself when run as root.)");
    }
    Ok(())
}
