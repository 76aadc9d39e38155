//! A private apt: its own sources list, lists and archives under the cache,
//! never the host's apt state, no root needed. Used to fetch the pinned
//! kernel source package and the rootfs packages from Debian 13 (trixie).

use crate::util::{self, Cache};
use anyhow::{bail, Context, Result};
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
            std::fs::create_dir_all(root.join(d))
                .with_context(|| format!("Failed to create {}", root.join(d).display()))?;
        }
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        if !keyring.exists() {
            bail!("{} is missing: install the debian-archive-keyring package", keyring.display());
        }
        std::fs::write(root.join("etc/sources.list"), SOURCES)?;
        let status = root.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "")?;
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
        std::fs::write(&conf_path, conf)?;
        let debs = cache.dir("debs")?;
        Ok(Apt { root, conf: conf_path, debs })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("APT_CONFIG", &self.conf);
        c
    }

    /// `apt-get update` against the private sources, at most once a day.
    pub fn update(&self, force: bool) -> Result<()> {
        let stamp = self.root.join("state/updated");
        let fresh = stamp
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().map(|e| e.as_secs() < 86_400).unwrap_or(false))
            .unwrap_or(false);
        if fresh && !force {
            return Ok(());
        }
        let mut c = self.cmd("apt-get");
        c.args(["update", "-q"]);
        eprintln!("$ APT_CONFIG={} apt-get update -q", self.conf.display());
        util::output(c).context("Failed to update the private apt lists (is deb.debian.org reachable?)")?;
        std::fs::write(&stamp, "")?;
        Ok(())
    }

    /// The .deb for `name=version` in the shared download dir, downloading it
    /// if it is not there yet.
    pub fn fetch(&self, name: &str, version: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(name, version)? {
            return Ok(p);
        }
        self.update(false)?;
        let mut c = self.cmd("apt-get");
        c.current_dir(&self.debs).args(["download", "-q"]).arg(format!("{name}={version}"));
        if let Err(e) = util::output(c) {
            // The lists may be a day old; retry once with fresh ones.
            self.update(true)?;
            let mut c = self.cmd("apt-get");
            c.current_dir(&self.debs).args(["download", "-q"]).arg(format!("{name}={version}"));
            util::output(c).with_context(|| {
                format!("Failed to download {name}={version} (first try: {e:#}). If Debian no longer serves this version, update the pin.")
            })?;
        }
        self.cached(name, version)?.with_context(|| {
            format!("apt-get download {name}={version} succeeded but no .deb appeared in {}", self.debs.display())
        })
    }

    /// The .debs for all of `pkgs`, downloading the missing ones in one apt-get call.
    pub fn fetch_all(&self, pkgs: &[(String, String)]) -> Result<Vec<PathBuf>> {
        let mut missing = Vec::new();
        for (n, v) in pkgs {
            if self.cached(n, v)?.is_none() {
                missing.push(format!("{n}={v}"));
            }
        }
        if !missing.is_empty() {
            self.update(false)?;
            let download = |missing: &[String]| {
                let mut c = self.cmd("apt-get");
                c.current_dir(&self.debs).args(["download", "-q"]).args(missing);
                util::output(c)
            };
            if download(&missing).is_err() {
                self.update(true)?;
                download(&missing).context(
                    "Failed to download the rootfs packages. If Debian no longer serves a pinned version, \
                     run `cargo xtask image --update-lock`",
                )?;
            }
        }
        pkgs.iter()
            .map(|(n, v)| self.cached(n, v)?.with_context(|| format!("{n}={v} was downloaded but no .deb appeared")))
            .collect()
    }

    fn cached(&self, name: &str, version: &str) -> Result<Option<PathBuf>> {
        // apt names files NAME_VERSION_ARCH.deb with ':' in the version escaped as %3a.
        let v = version.replace(':', "%3a");
        let prefix = format!("{name}_{v}_");
        for e in std::fs::read_dir(&self.debs)? {
            let p = e?.path();
            let f = p.file_name().and_then(|f| f.to_str()).unwrap_or("");
            if f.starts_with(&prefix) && f.ends_with(".deb") {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// Resolve `names` and all their dependencies (no recommends) to exact
    /// versions, as apt would install them on an empty system.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<(String, String)>> {
        self.update(true)?;
        let mut c = self.cmd("apt-get");
        c.args(["install", "-s", "-q", "--no-install-recommends"]).args(names);
        let out = util::output(c).context("Failed to resolve the rootfs package list")?;
        let mut pkgs = parse_simulated_install(&out);
        pkgs.sort();
        Ok(pkgs)
    }
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
