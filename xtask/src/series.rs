//! The patch workflow: `kernel check-series` (every prefix builds, every
//! patch passes checkpatch --strict or says why not), `kernel edit` (a git
//! tree with the series as commits) and `kernel export` (back to
//! `kernel-patches/` with git format-patch).

use crate::kernel::{self, apply_patch, base_tree, git, reset_to_base};
use crate::util::{self, Cache};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;

/// checkpatch's closing tally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// ERROR lines.
    pub errors: u32,
    /// WARNING lines.
    pub warnings: u32,
    /// CHECK lines (--strict).
    pub checks: u32,
}

/// Parse `total: 0 errors, 1 warnings, 2 checks, 120 lines checked`.
pub fn parse_tally(out: &str) -> Option<Tally> {
    let line = out.lines().rev().find(|l| l.starts_with("total: "))?;
    let num = |word: &str| -> Option<u32> {
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let i = words.iter().position(|w| w.starts_with(word))?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    Some(Tally { errors: num("error")?, warnings: num("warning")?, checks: num("check").unwrap_or(0) })
}

/// Whether a patch's changelog (the part before the `---` line) explains its
/// remaining checkpatch complaints: it must mention checkpatch.
pub fn changelog_justifies(patch: &str) -> bool {
    let changelog = patch.split("\n---\n").next().unwrap_or("");
    changelog.to_lowercase().contains("checkpatch")
}

/// `cargo xtask kernel check-series`.
pub fn check(cache: &Cache) -> Result<bool> {
    let series = kernel::read_series()?;
    if series.is_empty() {
        println!("kernel-patches/series lists no patches: nothing to check.");
        return Ok(true);
    }
    let tree = base_tree(cache, "check")?;
    reset_to_base(&tree)?;
    let build_dir = cache.dir("build")?.join("check");
    std::fs::create_dir_all(&build_dir)?;
    let log = build_dir.join("check-series.log");
    let _ = std::fs::remove_file(&log);
    let t0 = Instant::now();
    eprintln!("check-series: base {} (log {})", kernel::SOURCE_VERSION, log.display());
    kernel::configure(cache, &tree, &build_dir, &log, "check-series base")?;
    let t = Instant::now();
    kernel::compile(cache, &tree, &build_dir, &log, "check-series base")?;
    eprintln!("check-series: base built in {}", util::since(t));
    let mut ok = true;
    let mut rows = Vec::new();
    for (name, bytes) in &series {
        apply_patch(&tree, name)?;
        let text = String::from_utf8_lossy(bytes);
        let mut cp = std::process::Command::new("perl");
        cp.current_dir(&tree)
            .arg("scripts/checkpatch.pl")
            .args(["--strict", "--no-summary-file", "--color=never"])
            .arg(util::project_root().join("kernel-patches").join(name));
        // checkpatch exits non-zero on any complaint; the tally says how bad.
        let out = cp.output().with_context(|| format!("Failed to run checkpatch.pl on {name}"))?;
        let out_text = String::from_utf8_lossy(&out.stdout).into_owned();
        std::fs::write(build_dir.join(format!("{name}.checkpatch.txt")), &out_text)?;
        let tally = parse_tally(&out_text).unwrap_or(Tally { errors: 1, ..Default::default() });
        let t = Instant::now();
        let built = kernel::compile(cache, &tree, &build_dir, &log, &format!("check-series {name}"));
        let took = util::since(t);
        let justified = tally.warnings + tally.checks == 0 || changelog_justifies(&text);
        let row_ok = built.is_ok() && tally.errors == 0 && justified;
        ok &= row_ok;
        rows.push(format!(
            "{} {name}\n    build: {}  checkpatch --strict: {} errors, {} warnings, {} checks{}",
            if row_ok { "✓" } else { "✗" },
            match &built {
                Ok(n) => format!("ok in {took} ({n} objects)"),
                Err(e) => format!("FAILED ({e:#})"),
            },
            tally.errors,
            tally.warnings,
            tally.checks,
            if justified { String::new() } else { " — not justified in the changelog".into() }
        ));
        if let Some(r) = rows.last() {
            eprintln!("{r}");
        }
        if built.is_err() {
            break;
        }
    }
    println!("\n{}", rows.join("\n"));
    println!(
        "\ncheck-series: {} of {} patches checked in {}; checkpatch reports in {}",
        rows.len(),
        series.len(),
        util::since(t0),
        build_dir.display()
    );
    Ok(ok)
}

fn edit_tree(cache: &Cache) -> Result<std::path::PathBuf> {
    Ok(cache.dir("trees")?.join("edit"))
}

/// `cargo xtask kernel edit`.
pub fn edit(cache: &Cache) -> Result<()> {
    let tree = edit_tree(cache)?;
    let fresh = !tree.join(".git/pinlab-base").exists();
    let tree = base_tree(cache, "edit")?;
    let head = util::output(git(&tree, &["rev-parse", "HEAD"]))?;
    let base = util::output(git(&tree, &["rev-parse", "pinlab-base"]))?;
    if fresh || head == base {
        for (name, _) in kernel::read_series()? {
            apply_patch(&tree, &name)?;
        }
    } else {
        eprintln!("{} already has commits on top of pinlab-base; leaving them alone.", tree.display());
    }
    let log = util::output(git(&tree, &["log", "--oneline", "pinlab-base..HEAD"]))?;
    println!("Edit tree: {}\n{}", tree.display(), log.trim_end());
    println!(
        "\nEdit with git there (commit --amend, rebase -i pinlab-base, new commits with -s), then\n\
         `cargo xtask kernel export` writes the commits back to kernel-patches/, and\n\
         `cargo xtask kernel check-series` builds every prefix and runs checkpatch."
    );
    Ok(())
}

/// `cargo xtask kernel export`.
pub fn export(cache: &Cache) -> Result<()> {
    let tree = edit_tree(cache)?;
    if !tree.join(".git/pinlab-base").exists() {
        bail!("no edit tree at {}; make one with `cargo xtask kernel edit`", tree.display());
    }
    let status = util::output(git(&tree, &["status", "--porcelain", "--untracked-files=no"]))?;
    if !status.trim().is_empty() {
        bail!("{} has uncommitted changes; commit them first:\n{status}", tree.display());
    }
    let dir = util::project_root().join("kernel-patches");
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.len() > 5 && name[..4].chars().all(|c| c.is_ascii_digit()) && name.ends_with(".patch") {
            std::fs::remove_file(&p)?;
        }
    }
    let mut fp = git(&tree, &["format-patch", "--no-signature", "--abbrev=12", "-o"]);
    fp.arg(&dir).arg("pinlab-base..HEAD");
    let out = util::output(fp)?;
    let names: Vec<String> =
        out.lines().filter_map(|l| Path::new(l.trim()).file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    let series = format!(
        "# Applied in this order with `git am` onto Debian linux-source-6.12 {}.\n{}\n",
        kernel::SOURCE_VERSION,
        names.join("\n")
    );
    util::write_atomic(&dir.join("series"), series.as_bytes())?;
    println!("Exported {} patches to {} and wrote series.", names.len(), dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally() {
        let out = "WARNING: ...\n\ntotal: 0 errors, 2 warnings, 1 checks, 96 lines checked\n";
        assert_eq!(parse_tally(out), Some(Tally { errors: 0, warnings: 2, checks: 1 }));
        let plain = "total: 3 errors, 0 warnings, 250 lines checked\n";
        assert_eq!(parse_tally(plain), Some(Tally { errors: 3, warnings: 0, checks: 0 }));
        assert_eq!(parse_tally("nothing"), None);
    }

    #[test]
    fn justification() {
        let p = "Subject: x\n\nWhy.\n\ncheckpatch: the long line is a quoted log.\n\nSigned-off-by: a\n---\n fs/x.c | 1 +\n";
        assert!(changelog_justifies(p));
        let q = "Subject: x\n\nWhy.\n---\n checkpatch.pl mentioned only in the diff\n";
        assert!(!changelog_justifies(q));
    }
}
