//! A private apt: its own sources list, lists and archives under the cache,
//! never the host's apt state, no root needed. Used to fetch the pinned
//! kernel source package and the rootfs packages from Debian 13 (trixie).

use crate::util::{self, Cache};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Debian release the rootfs and kernel source come from.
#[allow(dead_code)]
pub const SUITE: &str = "trixie";

/// Sources: the release, its updates and its security archive (where the
/// newest linux-source-6.12 lives).
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main
";

/// The private apt root.
pub struct Apt {
    root: PathBuf,
    conf: PathBuf,
    /// Downloaded .deb files, shared by the kernel source and the rootfs.
    pub debs: PathBuf,
}

impl Apt {
    /// Lay out the private apt tree under the cache (idempotent).
    pub fn new(cache: &Cache) -> Result<Apt> {
        let root = cache.dir("apt")?;
        for d in [
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/trusted.gpg.d",
            "etc/sources.list.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            fs_err::create_dir_all(root.join(d))
                .with_context(|| format!("Failed to create {}", root.join(d).display()))?;
        }
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        if !keyring.exists() {
            bail!("{} is missing: install the debian-archive-keyring package", keyring.display());
        }
        // Written only when they differ, atomically: a concurrent run's
        // apt-get may be reading them right now.
        let put = |p: &Path, text: &str| -> Result<()> {
            if fs_err::read_to_string(p).ok().as_deref() != Some(text) {
                util::write_atomic(p, text.as_bytes())?;
            }
            Ok(())
        };
        put(&root.join("etc/sources.list"), SOURCES)?;
        let status = root.join("state/status");
        if !status.exists() {
            put(&status, "")?;
        }
        let r = root.display();
        let conf = format!(
            "Dir::Etc \"{r}/etc\";\nDir::Etc::SourceList \"{r}/etc/sources.list\";\nDir::Etc::SourceParts \"{r}/etc/sources.list.d\";\n\
             Dir::Etc::Parts \"{r}/etc/apt.conf.d\";\nDir::Etc::Preferences \"{r}/etc/preferences\";\n\
             Dir::Etc::PreferencesParts \"{r}/etc/preferences.d\";\nDir::Etc::TrustedParts \"{r}/etc/trusted.gpg.d\";\n\
             Dir::State \"{r}/state\";\nDir::State::status \"{r}/state/status\";\nDir::Cache \"{r}/cache\";\n\
             APT::Architecture \"amd64\";\nAPT::Architectures {{ \"amd64\"; }};\nAPT::Sandbox::User \"{}\";\n\
             Acquire::Languages \"none\";\nAcquire::Retries \"3\";\nAPT::Install-Recommends \"false\";\n",
            if crate::host::nix_is_root() { "root" } else { "" }
        );
        let conf_path = root.join("apt.conf");
        put(&conf_path, &conf)?;
        let debs = cache.dir("debs")?;
        Ok(Apt { root, conf: conf_path, debs })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("APT_CONFIG", &self.conf);
        c
    }

    /// `apt-get update` against the private sources, at most once a day.
    ///
    /// Offline with lists from an earlier update: a warning, not an error
    /// (a warm run needs no network). `force` still skips an update another
    /// run made in the last minute.
    pub fn update(&self, force: bool) -> Result<()> {
        let stamp = self.root.join("state/updated");
        let age =
            || stamp.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).map(|e| e.as_secs());
        let fresh = |limit: u64| age().is_some_and(|a| a < limit);
        if fresh(86_400) && !force {
            return Ok(());
        }
        let _lock = util::FileLock::exclusive(&self.root.join("update.lock"))?;
        // Another run may have updated while we waited for the lock.
        if fresh(if force { 60 } else { 86_400 }) {
            return Ok(());
        }
        let mut c = self.cmd("apt-get");
        c.args(["update", "-q"]);
        eprintln!("$ APT_CONFIG={} apt-get update -q", self.conf.display());
        if let Err(e) = util::output(c) {
            if self.has_lists() {
                eprintln!(
                    "apt: could not refresh the package lists ({}); using the lists from the last update",
                    format!("{e:#}").lines().last().unwrap_or("")
                );
                return Ok(());
            }
            return Err(e).context("Failed to update the private apt lists (is deb.debian.org reachable?)");
        }
        util::write_atomic(&stamp, b"")?;
        Ok(())
    }

    fn has_lists(&self) -> bool {
        fs_err::read_dir(self.root.join("state/lists"))
            .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().ends_with("_Packages")))
            .unwrap_or(false)
    }

    /// A hash of the `InRelease` files of the lists: changes exactly when an
    /// update brought new indices.
    pub fn lists_id(&self) -> Result<String> {
        let lists = self.root.join("state/lists");
        let mut names: Vec<PathBuf> = fs_err::read_dir(&lists)
            .with_context(|| format!("Failed to read {}", lists.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|f| f.to_string_lossy().ends_with("_InRelease")))
            .collect();
        names.sort();
        let mut h = util::KeyHasher::default();
        for p in names {
            let b = fs_err::read(&p).with_context(|| format!("Failed to read {}", p.display()))?;
            h.part(&p.file_name().unwrap_or_default().to_string_lossy(), &b);
        }
        Ok(h.finish())
    }

    /// Where resolutions are remembered (see `sources`).
    pub fn resolved_dir(&self) -> PathBuf {
        self.root.join("resolved")
    }

    /// The archive index (the `Packages` files of the private lists) for
    /// the packages named in `names`: every version each suite serves, with
    /// the size and SHA-256 the archive promises for its .deb.
    pub fn index(&self, names: &BTreeSet<String>) -> Result<Index> {
        let lists = self.root.join("state/lists");
        let mut idx = Index::default();
        let rd = fs_err::read_dir(&lists).with_context(|| format!("Failed to read {}", lists.display()))?;
        for e in rd {
            let p = e.with_context(|| format!("Failed to read {}", lists.display()))?.path();
            let f = p.file_name().and_then(|f| f.to_str()).unwrap_or("");
            if !f.ends_with("_Packages") {
                continue;
            }
            let text = fs_err::read_to_string(&p).with_context(|| format!("Failed to read {}", p.display()))?;
            parse_packages(&text, names, &mut idx);
        }
        Ok(idx)
    }

    /// The index for `pins` (and `extra` names) from the current lists, and
    /// the pins it does not serve.
    pub fn index_for(&self, pins: &[(String, String)], extra: &[String]) -> Result<(Index, Vec<(String, String)>)> {
        let mut names: BTreeSet<String> = pins.iter().map(|(n, _)| n.clone()).collect();
        names.extend(extra.iter().cloned());
        let idx = self.index(&names)?;
        let missing = pins.iter().filter(|(n, v)| idx.get(n, v).is_none()).cloned().collect();
        Ok((idx, missing))
    }

    /// The verified .debs of `pkgs` (each must be in `idx`): a cached .deb is
    /// used only if its size and SHA-256 match the archive index (a damaged
    /// one is deleted and fetched again, with one line saying why); the
    /// missing ones are downloaded in one `apt-get download`.
    pub fn fetch_verified(&self, idx: &Index, pkgs: &[(String, String)]) -> Result<Vec<PathBuf>> {
        let _lock = util::FileLock::exclusive(&self.root.join("fetch.lock"))?;
        let mut out = Vec::new();
        let mut missing = Vec::new();
        for (n, v) in pkgs {
            let entry = idx.get(n, v).with_context(|| format!("{n}={v} is not in the archive index"))?;
            let path = self.debs.join(deb_file_name(n, entry));
            match verify_deb(&path, entry) {
                Ok(()) => {}
                Err(Damage::Missing) => missing.push(format!("{n}={v}")),
                Err(Damage::Unreadable(e)) => bail!("Failed to read {}: {e}", path.display()),
                Err(d) => {
                    eprintln!("apt: cached {} is damaged ({d}); fetching it again", path.display());
                    fs_err::remove_file(&path).with_context(|| format!("Failed to remove {}", path.display()))?;
                    missing.push(format!("{n}={v}"));
                }
            }
            out.push(path);
        }
        if !missing.is_empty() {
            let mut c = self.cmd("apt-get");
            c.current_dir(&self.debs).args(["download", "-q"]).args(&missing);
            util::output(c).with_context(|| format!("Failed to download {} package(s) from Debian", missing.len()))?;
        }
        for ((n, v), path) in pkgs.iter().zip(&out) {
            let entry = idx.get(n, v).context("index entry vanished")?;
            verify_deb(path, entry).map_err(|d| {
                anyhow::anyhow!("{} was just downloaded but is damaged ({d}); the mirror may be broken", path.display())
            })?;
        }
        Ok(out)
    }

    /// Resolve `names` and all their dependencies (no recommends) to exact
    /// versions, as apt would install them on an empty system.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<(String, String)>> {
        self.update(true)?;
        self.simulate(names)
    }

    /// What `apt-get install -s` of `args` (names, or `name=version`) would
    /// install on an empty system, from the current lists.
    pub fn simulate(&self, args: &[String]) -> Result<Vec<(String, String)>> {
        let mut c = self.cmd("apt-get");
        c.args(["install", "-s", "-q", "--no-install-recommends"]).args(args);
        let out = util::output(c).context("Failed to resolve the rootfs package list")?;
        let mut pkgs = parse_simulated_install(&out);
        pkgs.sort();
        Ok(pkgs)
    }
}

/// One .deb as the archive index describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Exact version.
    pub version: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// `amd64` or `all`.
    pub arch: String,
}

/// Every served version of the packages asked for, by name.
#[derive(Clone, Debug, Default)]
pub struct Index(BTreeMap<String, Vec<Entry>>);

impl Index {
    /// The entry for `name=version`, if the archive serves it.
    pub fn get(&self, name: &str, version: &str) -> Option<&Entry> {
        self.0.get(name)?.iter().find(|e| e.version == version)
    }

    /// Add an entry (as remembered from an earlier resolution).
    pub fn insert(&mut self, name: String, e: Entry) {
        let list = self.0.entry(name).or_default();
        if !list.iter().any(|x| x.version == e.version) {
            list.push(e);
        }
    }

    /// Every version served of `name`.
    pub fn versions(&self, name: &str) -> Vec<&str> {
        self.0.get(name).map(|v| v.iter().map(|e| e.version.as_str()).collect()).unwrap_or_default()
    }
}

/// Add the stanzas of a `Packages` file whose `Package:` is in `names`.
pub fn parse_packages(text: &str, names: &BTreeSet<String>, idx: &mut Index) {
    for stanza in text.split("\n\n") {
        let mut name = None;
        let (mut version, mut size, mut sha, mut arch) = (None, None, None, None);
        for l in stanza.lines() {
            if let Some(v) = l.strip_prefix("Package: ") {
                if !names.contains(v.trim()) {
                    break;
                }
                name = Some(v.trim());
            } else if let Some(v) = l.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = l.strip_prefix("Size: ") {
                size = v.trim().parse::<u64>().ok();
            } else if let Some(v) = l.strip_prefix("SHA256: ") {
                sha = Some(v.trim());
            } else if let Some(v) = l.strip_prefix("Architecture: ") {
                arch = Some(v.trim());
            }
        }
        if let (Some(n), Some(v), Some(sz), Some(h)) = (name, version, size, sha) {
            let list = idx.0.entry(n.to_string()).or_default();
            if !list.iter().any(|e| e.version == v) {
                let arch = arch.unwrap_or("amd64").to_string();
                list.push(Entry { version: v.to_string(), size: sz, sha256: h.to_string(), arch });
            }
        }
    }
}

/// apt's file name for a downloaded .deb: `NAME_VERSION_ARCH.deb`, ':' as %3a.
pub fn deb_file_name(name: &str, e: &Entry) -> String {
    format!("{name}_{}_{}.deb", e.version.replace(':', "%3a"), e.arch)
}

/// Why a cached .deb cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum Damage {
    /// Not there.
    Missing,
    /// Size differs from the index.
    Size(u64, u64),
    /// Hash differs from the index.
    Hash,
    /// Could not be read (not evidence of damage: never deleted for it).
    Unreadable(String),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Missing => f.write_str("missing"),
            Damage::Size(got, want) => write!(f, "{got} bytes, the archive index says {want}"),
            Damage::Hash => f.write_str("SHA-256 differs from the archive index"),
            Damage::Unreadable(e) => write!(f, "unreadable: {e}"),
        }
    }
}

/// Check a .deb against its index entry (size first: cheap).
pub fn verify_deb(path: &Path, e: &Entry) -> std::result::Result<(), Damage> {
    let Ok(meta) = path.metadata() else { return Err(Damage::Missing) };
    if meta.len() != e.size {
        return Err(Damage::Size(meta.len(), e.size));
    }
    let mut f = fs_err::File::open(path).map_err(|e| Damage::Unreadable(e.to_string()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) => return Err(Damage::Unreadable(e.to_string())),
        }
    }
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != e.sha256 {
        return Err(Damage::Hash);
    }
    Ok(())
}

/// The newest of `versions` by Debian's ordering (`dpkg --compare-versions`).
pub fn newest(versions: &[&str]) -> Result<Option<String>> {
    let mut best: Option<&str> = None;
    for v in versions {
        best = match best {
            None => Some(v),
            Some(b) => {
                let st = Command::new("dpkg")
                    .args(["--compare-versions", v, "gt", b])
                    .status()
                    .context("Failed to run dpkg --compare-versions (package dpkg)")?;
                Some(if st.success() { v } else { b })
            }
        };
    }
    Ok(best.map(String::from))
}

/// `Inst libc6 (2.41-12 Debian:13.2/stable [amd64])` → (`libc6`, `2.41-12`).
pub fn parse_simulated_install(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| {
            let mut it = l.splitn(2, ' ');
            let name = it.next()?.to_string();
            let rest = it.next()?.trim_start_matches('(');
            let ver = rest.split_whitespace().next()?.to_string();
            Some((name, ver))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGES: &str = "Package: libc6\nSource: glibc\nVersion: 2.41-12+deb13u5\nSize: 4\n\
SHA256: 88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589\nDescription: x\n\n\
Package: bash\nArchitecture: all\nVersion: 5.2.37-2+b10\nSize: 10\nSHA256: 00\n\n\
Package: libc6\nVersion: 2.41-12+deb13u4\nSize: 7\nSHA256: 11\n";

    #[test]
    fn index_keeps_the_asked_packages_and_all_their_versions() {
        let mut idx = Index::default();
        let names: BTreeSet<String> = ["libc6".to_string()].into();
        parse_packages(PACKAGES, &names, &mut idx);
        assert_eq!(idx.versions("libc6"), vec!["2.41-12+deb13u5", "2.41-12+deb13u4"]);
        assert!(idx.versions("bash").is_empty());
        assert_eq!(idx.get("libc6", "2.41-12+deb13u5").unwrap().size, 4);
    }

    #[test]
    fn debs_are_verified_against_the_index() {
        let d = tempfile::tempdir().unwrap();
        let mut idx = Index::default();
        parse_packages(PACKAGES, &["libc6".to_string()].into(), &mut idx);
        let e = idx.get("libc6", "2.41-12+deb13u5").unwrap();
        let p = d.path().join(deb_file_name("libc6", e));
        assert_eq!(verify_deb(&p, e), Err(Damage::Missing));
        fs_err::write(&p, b"").unwrap();
        assert_eq!(verify_deb(&p, e), Err(Damage::Size(0, 4)));
        fs_err::write(&p, b"abcd").unwrap();
        assert_eq!(verify_deb(&p, e), Ok(()));
        fs_err::write(&p, b"abce").unwrap();
        assert_eq!(verify_deb(&p, e), Err(Damage::Hash));
        let bb = Entry { version: "1:1.37.0-6+b9".into(), size: 1, sha256: String::new(), arch: "all".into() };
        assert_eq!(deb_file_name("busybox", &bb), "busybox_1%3a1.37.0-6+b9_all.deb");
    }

    #[test]
    fn newest_uses_debian_ordering() {
        let v = newest(&["6.12.117-1", "6.12.118-1", "6.12.99-1", "6.12.118~rc1-1"]).unwrap();
        assert_eq!(v.as_deref(), Some("6.12.118-1"));
        assert_eq!(newest(&[]).unwrap(), None);
    }

    #[test]
    fn parses_apt_simulation() {
        let out = "NOTE: This is only a simulation!\nInst gcc-14-base (14.2.0-19 Debian:13.1/stable [amd64])\n\
                   Inst libc6 (2.41-12 Debian:13.1/stable [amd64])\nConf libc6 (2.41-12 Debian:13.1/stable [amd64])\n\
                   Inst busybox (1:1.37.0-6+b9 Debian:13.1/stable [amd64])\n";
        assert_eq!(
            parse_simulated_install(out),
            vec![
                ("gcc-14-base".to_string(), "14.2.0-19".to_string()),
                ("libc6".into(), "2.41-12".into()),
                ("busybox".into(), "1:1.37.0-6+b9".into())
            ]
        );
    }
}
