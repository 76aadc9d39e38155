//! `cargo xtask doctor`: what the host has and lacks, and installing what is
//! missing (Debian package names; `apt-get` as root, else the command to run).

use crate::util::{self, Cache};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
        Req { what: "git (kernel trees)", package: "git", check: Program("git"), needed_for: Kernel },
        Req {
            what: "Debian archive keyring (rootfs, kernel source)",
            package: "debian-archive-keyring",
            check: AnyFile(&["/usr/share/keyrings/debian-archive-keyring.gpg"]),
            needed_for: Image,
        },
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
    // Wait for another apt or dpkg (unattended upgrades, a second pinlab) instead of failing.
    let mut apt_opts: Vec<String> = vec!["-o".into(), "DPkg::Lock::Timeout=300".into()];
    let mut update = Command::new("apt-get");
    update.args(&apt_opts).args(["update", "-q"]);
    util::run_shown(update).context("Failed to run apt-get update")?;
    // Install, never remove: apt's plan may remove a package to satisfy a
    // new one (qemu-system-x86 7.2 from bookworm takes qemu-utils 10.0 from
    // bookworm-backports with it, and -y would accept that).
    // Holds the extra sources directory until the install is done.
    let mut backports: Option<Backports> = None;
    let mut wanted: Vec<String> = pkgs.iter().map(|p| p.to_string()).collect();
    let mut removed = removals(&simulate(&apt_opts, &wanted, &cmd)?);
    if !removed.is_empty() {
        // A package that would go came from backports (installed by whoever
        // made this machine, the source since dropped): take its siblings
        // from the same backports suite, so the versions match again.
        if let Some(bp) = Backports::for_removals(&removed, &pkgs)? {
            eprintln!(
                "pinlab: {} on this host came from {}; taking {} from there too (source enabled for this install only)",
                bp.installed.join(", "),
                bp.suite,
                bp.siblings.join(", ")
            );
            apt_opts.extend(bp.apt_opts.iter().cloned());
            let mut update = Command::new("apt-get");
            update.args(&apt_opts).args(["update", "-q"]);
            util::run_shown(update).with_context(|| format!("Failed to fetch the index of {}", bp.suite))?;
            wanted = pkgs
                .iter()
                .map(|p| if bp.siblings.iter().any(|s| s == p) { format!("{p}/{}", bp.suite) } else { p.to_string() })
                .collect();
            // `pkg/suite` takes only pkg from there; its dependencies that
            // need the suite's versions are named the same way, until apt
            // has a plan (a handful of rounds: qemu-system-common, -data, seabios).
            let mut plan = simulate_raw(&apt_opts, &wanted)?;
            for _ in 0..8 {
                let deps = unmet_from(&plan.1);
                if plan.0 || deps.is_empty() {
                    break;
                }
                wanted.extend(deps.into_iter().map(|d| format!("{d}/{}", bp.suite)));
                plan = simulate_raw(&apt_opts, &wanted)?;
            }
            if !plan.0 {
                bail!("apt-get cannot plan the install with {} enabled:\n{}", bp.suite, plan.1.trim());
            }
            removed = removals(&plan.1);
            backports = Some(bp);
        }
    }
    if !removed.is_empty() {
        bail!(
            "installing the missing host packages would REMOVE {}: {}\npinlab never removes host packages. \
             Review and run it yourself:\n    sudo {cmd}",
            removed.len(),
            removed.join(", ")
        );
    }
    let mut install = Command::new("apt-get");
    install
        .args(&apt_opts)
        // --no-remove: if apt's plan changes between the check and now, abort rather than remove.
        .args(["install", "-y", "-q", "--no-remove", "--no-install-recommends"])
        .args(&wanted)
        .env("DEBIAN_FRONTEND", "noninteractive");
    util::run_shown(install).with_context(|| format!("Failed to install host packages; try `{cmd}` by hand"))?;
    drop(backports);
    let still: Vec<_> =
        requirements().into_iter().filter(|r| needs.contains(&r.needed_for) && !r.present()).map(|r| r.what).collect();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

/// `apt-get install -s`: what installing `pkgs` would do.
fn simulate(apt_opts: &[String], pkgs: &[String], cmd: &str) -> Result<String> {
    let mut sim = Command::new("apt-get");
    sim.args(apt_opts).args(["install", "-s", "-q", "--no-install-recommends"]).args(pkgs);
    util::output(sim).with_context(|| format!("apt-get cannot plan `{cmd}`"))
}

/// `apt-get install -s`: whether apt has a plan, and its output (stdout and stderr).
fn simulate_raw(apt_opts: &[String], pkgs: &[String]) -> Result<(bool, String)> {
    let mut sim = Command::new("apt-get");
    sim.args(apt_opts).args(["install", "-s", "-q", "--no-install-recommends"]).args(pkgs);
    let shown = util::show(&sim);
    let out = sim.stdin(Stdio::null()).output().with_context(|| format!("Failed to start `{shown}`"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// The packages apt says it cannot take at the needed version:
/// ` X : Depends: Y (= 1.0) but 0.9 is to be installed` (or `… but it is not going to be installed`).
fn unmet_from(apt_out: &str) -> Vec<String> {
    let mut v: Vec<String> = apt_out
        .lines()
        .filter_map(|l| l.split_once("Depends: ").map(|(_, r)| r))
        .filter(|r| r.contains(" but "))
        .filter_map(|r| r.split_whitespace().next().map(String::from))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A backports suite to take some packages from, for one install.
struct Backports {
    /// `bookworm-backports`.
    suite: String,
    /// The installed packages from it that apt would otherwise remove.
    installed: Vec<String>,
    /// The packages to install from it: those built from the same source.
    siblings: Vec<String>,
    /// `-o` options that add the suite to the host's sources (a directory of
    /// ours holding copies of the host's source files plus the suite).
    apt_opts: Vec<String>,
    /// That directory, removed when the install is done.
    _dir: tempfile::TempDir,
}

impl Backports {
    fn for_removals(removed: &[String], wanted: &[&str]) -> Result<Option<Backports>> {
        let from_bpo: Vec<&String> = removed.iter().filter(|p| installed_version(p).contains("~bpo")).collect();
        let Some(codename) = os_codename() else { return Ok(None) };
        if from_bpo.is_empty() {
            return Ok(None);
        }
        let sources: Vec<String> = from_bpo.iter().filter_map(|p| source_package(p)).collect();
        let siblings: Vec<String> = wanted
            .iter()
            .filter(|w| source_package(w).is_some_and(|s| sources.contains(&s)))
            .map(|w| w.to_string())
            .collect();
        if siblings.is_empty() {
            return Ok(None);
        }
        let suite = format!("{codename}-backports");
        let tmp =
            tempfile::Builder::new().prefix("pinlab-apt-sources-").tempdir().context("Failed to create a temp dir")?;
        let dir = tmp.path().to_path_buf();
        if let Ok(rd) = fs_err::read_dir("/etc/apt/sources.list.d") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".list") || name.ends_with(".sources") {
                    fs_err::copy(e.path(), dir.join(&name))
                        .with_context(|| format!("Failed to copy {}", e.path().display()))?;
                }
            }
        }
        let extra = dir.join("pinlab-backports.sources");
        fs_err::write(
            &extra,
            format!(
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite}\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )
        .with_context(|| format!("Failed to write {}", extra.display()))?;
        Ok(Some(Backports {
            suite,
            installed: from_bpo.iter().map(|p| format!("{p} {}", installed_version(p))).collect(),
            siblings,
            apt_opts: vec!["-o".into(), format!("Dir::Etc::SourceParts={}", dir.display())],
            _dir: tmp,
        }))
    }
}

/// The installed version of a package, or "".
fn installed_version(pkg: &str) -> String {
    let mut c = Command::new("dpkg-query");
    c.args(["-W", "-f=${Version}", pkg]);
    util::output(c).unwrap_or_default().trim().to_string()
}

/// The source package a binary package is built from (apt's candidate, else the installed one).
fn source_package(pkg: &str) -> Option<String> {
    let mut c = Command::new("apt-cache");
    c.args(["show", "--no-all-versions", pkg]);
    let out = util::output(c).ok()?;
    let src = out.lines().find_map(|l| l.strip_prefix("Source: ")).map(|s| s.split_whitespace().next().unwrap_or(s));
    Some(src.unwrap_or(pkg).to_string())
}

/// `VERSION_CODENAME` from /etc/os-release (`bookworm`).
fn os_codename() -> Option<String> {
    let t = fs_err::read_to_string("/etc/os-release").ok()?;
    t.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=")).map(|v| v.trim_matches('"').to_string())
}

/// The packages an `apt-get install -s` plan removes (`Remv NAME [VERSION]`).
pub fn removals(plan: &str) -> Vec<String> {
    plan.lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
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

/// Whether `bin` is a virtiofsd that runs (`--version` succeeds and names it).
pub fn virtiofsd_works(bin: &Path) -> Result<(), String> {
    match Command::new(bin).arg("--version").stdin(std::process::Stdio::null()).output() {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("virtiofsd") => Ok(()),
        Ok(o) => Err(format!("`{} --version` failed ({})", bin.display(), o.status)),
        Err(e) => Err(format!("`{} --version` could not run: {e}", bin.display())),
    }
}

/// The virtiofsd release pinlab builds (tested with [`QEMU_SUITE`]'s QEMU).
pub const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Where pinlab's QEMU comes from: Debian 12's qemu-system-x86 (7.2).
///
/// QEMU 10.0 (Debian 13, and bookworm-backports) breaks every guest under
/// TCG here: the rootfs is served over vhost-user virtiofs, and programs read
/// from it crash at once (busybox and pinlab-runner segfault in ld.so with
/// garbage instruction bytes), with virtiofsd 1.13.2 and 1.14.0 alike, with
/// `-cpu max` or `qemu64`, `thread=single` or `multi`, `pc` or `q35`, memfd
/// or /dev/shm guest RAM; QEMU 7.2 runs the same kernel, rootfs and
/// virtiofsd cleanly (measured 2026-12-01). So pinlab runs its own QEMU 7.2,
/// extracted from the Debian packages into the cache, whatever the host has.
pub const QEMU_SUITE: &str = "bookworm";

/// The Debian packages pinlab's QEMU is extracted from.
const QEMU_PACKAGES: [&str; 3] = ["qemu-system-x86", "qemu-system-common", "qemu-system-data"];

/// pinlab's QEMU: Debian 12's, extracted into `cache/tools/qemu-<version>`
/// once (downloaded with the host's apt, nothing installed). Its firmware
/// comes from its own data package and the host's seabios.
pub fn ensure_qemu(cache: &Cache) -> Result<crate::qemu::QemuBin> {
    let tools = cache.dir("tools")?;
    let found = |dir: &Path| -> Option<crate::qemu::QemuBin> {
        let b = crate::qemu::QemuBin::extracted(dir);
        qemu_works(&b).ok().map(|_| b)
    };
    if let Some(b) = extracted_qemus(cache).iter().rev().find_map(|d| found(d)) {
        return Ok(b);
    }
    let _lock = util::FileLock::exclusive(&cache.dir("locks")?.join("qemu.lock"))?;
    let t = std::time::Instant::now();
    let tmp = tempfile::Builder::new().prefix("pinlab-qemu-").tempdir_in(&tools)?;
    let mut dl = Command::new("apt-get");
    dl.current_dir(tmp.path()).args(["download", "-q"]);
    for p in QEMU_PACKAGES {
        dl.arg(format!("{p}/{QEMU_SUITE}"));
    }
    util::output(dl).with_context(|| {
        format!(
            "pinlab runs QEMU 7.2 from Debian 12 ({QEMU_SUITE}), because QEMU 10's TCG crashes every guest that \
             runs programs from virtiofs; apt-get could not download it. Add Debian {QEMU_SUITE} to the apt \
             sources (deb http://deb.debian.org/debian {QEMU_SUITE} main) and run `apt-get update`"
        )
    })?;
    let debs: Vec<PathBuf> = fs_err::read_dir(tmp.path())?.flatten().map(|e| e.path()).collect();
    let main = debs
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu-system-x86_")))
        .context("apt-get download gave no qemu-system-x86 .deb")?;
    let mut v = Command::new("dpkg-deb");
    v.args(["-f"]).arg(main).arg("Version");
    let version = util::output(v)?.trim().replace([':', '+', '~'], "_");
    let dest = tools.join(format!("qemu-{version}"));
    let staging = util::staging_path(&dest);
    let _ = fs_err::remove_dir_all(&staging);
    fs_err::create_dir_all(&staging)?;
    for d in &debs {
        let mut x = Command::new("dpkg-deb");
        x.arg("-x").arg(d).arg(&staging);
        util::output(x).with_context(|| format!("Failed to unpack {}", d.display()))?;
    }
    let b = crate::qemu::QemuBin::extracted(&staging);
    let shown = qemu_works(&b).map_err(|e| {
        anyhow::anyhow!("QEMU from {QEMU_SUITE} does not run here: {e} (its libraries come from the host's packages)")
    })?;
    fs_err::write(staging.join(".pinlab-complete"), &shown)?;
    util::publish_dir(&staging, &dest)?;
    eprintln!("pinlab: {shown} extracted into {} in {}", dest.display(), util::since(t));
    Ok(crate::qemu::QemuBin::extracted(&dest))
}

/// The complete QEMU extractions in the cache (`tools/qemu-*`), oldest version first.
fn extracted_qemus(cache: &Cache) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs_err::read_dir(cache.root.join("tools"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        p.join(".pinlab-complete").exists() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu-"))
    });
    v.sort();
    v
}

/// `qemu --version` (its first line), or why it does not run (e.g. a
/// library the host lacks: `ldd` names it).
pub fn qemu_works(b: &crate::qemu::QemuBin) -> Result<String, String> {
    let out = Command::new(&b.program).arg("--version").stdin(Stdio::null()).output();
    match out {
        Ok(o) if o.status.success() => {
            Ok(String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("QEMU").trim().to_string())
        }
        Ok(o) => {
            let ldd = Command::new("ldd").arg(&b.program).output().map(|l| l.stdout).unwrap_or_default();
            let missing: Vec<String> = String::from_utf8_lossy(&ldd)
                .lines()
                .filter(|l| l.contains("not found"))
                .map(|l| l.trim().to_string())
                .collect();
            Err(format!(
                "`{} --version` failed ({}){}",
                b.program.display(),
                o.status,
                if missing.is_empty() { String::new() } else { format!("; missing libraries: {}", missing.join(", ")) }
            ))
        }
        Err(e) => Err(format!("`{} --version` could not run: {e}", b.program.display())),
    }
}

/// A usable virtiofsd, installed with `cargo install virtiofsd --locked` into
/// the cache when there is none that works (about 1.5 minutes, once): built
/// into a staging root under a lock and moved into place when complete.
pub fn ensure_virtiofsd(cache: &Cache, no_install: bool) -> Result<PathBuf> {
    let usable = |p: Option<PathBuf>| -> Result<Option<PathBuf>, String> {
        match p {
            None => Ok(None),
            Some(p) => virtiofsd_works(&p).map(|()| Some(p)),
        }
    };
    match usable(find_virtiofsd(cache)) {
        Ok(Some(p)) => return Ok(p),
        Ok(None) => {}
        Err(why) => eprintln!("pinlab: the cached virtiofsd is damaged ({why}); rebuilding it"),
    }
    ensure(&[Need::Virtiofsd], no_install)?;
    let root = cache.dir("tools")?;
    let _lock = util::FileLock::exclusive(&cache.dir("locks")?.join("virtiofsd.lock"))?;
    let own = root.join("bin/virtiofsd");
    if virtiofsd_works(&own).is_ok() {
        return Ok(own);
    }
    eprintln!("pinlab: building virtiofsd once into {} (about 1.5 minutes on 2 cores)", root.display());
    let staging = util::staging_path(&root.join("virtiofsd-root"));
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args(["install", "virtiofsd", "--version", VIRTIOFSD_VERSION, "--locked", "--quiet", "--root"]).arg(&staging);
    let log = cache.dir("tools")?.join("virtiofsd-build.log");
    let _ = fs_err::remove_file(&log);
    util::run_logged(c, &log, |_| {}).context("Failed to build virtiofsd (needs libseccomp-dev and libcap-ng-dev)")?;
    let built = staging.join("bin/virtiofsd");
    virtiofsd_works(&built).map_err(|e| anyhow::anyhow!("cargo install virtiofsd built a broken binary: {e}"))?;
    fs_err::create_dir_all(root.join("bin"))
        .with_context(|| format!("Failed to create {}", root.join("bin").display()))?;
    fs_err::rename(&built, &own).with_context(|| format!("Failed to move {} to {}", built.display(), own.display()))?;
    let _ = fs_err::remove_dir_all(&staging);
    Ok(own)
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
    // The host's QEMU (its libraries and firmware serve pinlab's own).
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
    match extracted_qemus(cache).last().map(|d| crate::qemu::QemuBin::extracted(d)) {
        Some(b) => match qemu_works(&b) {
            Ok(v) => println!("ok      pinlab's QEMU: {v}  [{}]", b.program.display()),
            Err(e) => println!("BROKEN  pinlab's QEMU: {e} (the next run extracts it again)"),
        },
        None => println!(
            "MISSING pinlab's QEMU  [`cargo xtask run` extracts {QEMU_SUITE}'s qemu-system-x86 7.2 into {}]",
            cache.root.join("tools").display()
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmet_dependencies_are_read_from_apt() {
        let out = " qemu-system-x86 : Depends: qemu-system-common (= 1:10.0.2) but it is not going to be installed\n\
                   \x20                  Depends: qemu-system-data (> 1:10.0.2+ds~) but 1:7.2+dfsg-7 is to be installed\n\
                   \x20                  Depends: seabios (> 1.16.3-1~) but 1.16.2-1 is to be installed\n\
                   E: Unable to correct problems, you have held broken packages.\n";
        assert_eq!(unmet_from(out), vec!["qemu-system-common", "qemu-system-data", "seabios"]);
    }

    #[test]
    fn removals_are_read_from_the_plan() {
        let plan = "NOTE: This is only a simulation!\nRemv qemu-utils [1:7.2+dfsg-7]\n\
                    Inst qemu-system-x86 (1:7.2+dfsg-7 Debian:12.8/stable [amd64])\nConf qemu-system-x86\n";
        assert_eq!(removals(plan), vec!["qemu-utils".to_string()]);
        assert!(removals("Inst lz4 (1.9.4-1 Debian [amd64])\n").is_empty());
    }
}
