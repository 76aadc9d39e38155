//! The patch workflow: `kernel check-series` (every prefix builds, every
//! patch passes checkpatch --strict or says why not), `kernel edit` (a git
//! tree with the series as commits) and `kernel export` (back to
//! `kernel-patches/` with git format-patch).

use crate::kernel::{self, apply_patch, base_tree, git, reset_to_base};
use crate::util::{self, Cache};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
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

/// What a check-series run verified, kept in `build/check/check-series.json`
/// so the next run only rebuilds from the first patch that changed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Hash of the source version and the config fragments.
    pub base_key: String,
    /// One per patch applied in the check tree, in order.
    pub patches: Vec<Checked>,
}

/// One patch as checked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Checked {
    /// File name.
    pub name: String,
    /// Hash of the base key and every patch up to and including this one.
    pub prefix_key: String,
    /// Whether the tree built with this prefix.
    pub built: bool,
    /// How long that incremental build took, and how many objects it compiled.
    pub build: String,
}

/// Prefix keys: each patch's key covers the base and every patch before it,
/// so an edit to patch k changes the keys of k and everything after it.
/// What `git format-patch` rewrites without changing the patch (the commit id
/// on the `From` line, `[PATCH n/m]` when the series grows) is left out.
pub fn prefix_keys(base_key: &str, series: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut prev = base_key.to_string();
    series
        .iter()
        .map(|(name, bytes)| {
            prev = util::KeyHasher::default().part("prev", prev.as_bytes()).part(name, &key_view(bytes)).finish();
            prev.clone()
        })
        .collect()
}

/// `patch` without its mbox `From <commit id> …` line and with `[PATCH n/m]`
/// in the subject reduced to `[PATCH]`: exporting the same commits as a
/// longer series, or after a rebase, must not look like an edit.
fn key_view(patch: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(patch);
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if i == 0 && line.starts_with("From ") {
            continue;
        }
        match line.strip_prefix("Subject: [PATCH ").and_then(|r| r.split_once(']')) {
            Some((n, rest))
                if n.split_once('/').is_some_and(|(a, b)| {
                    [a, b].iter().all(|x| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit()))
                }) =>
            {
                out.push_str("Subject: [PATCH]");
                out.push_str(rest);
            }
            _ => out.push_str(line),
        }
    }
    out.into_bytes()
}

/// How many leading patches of `keys` the record shows as applied and built.
pub fn unchanged_prefix(record: &Record, keys: &[String]) -> usize {
    record.patches.iter().zip(keys).take_while(|(c, k)| c.built && &c.prefix_key == *k).count()
}

/// Remove the checkpatch reports of patches that `series` no longer lists
/// (renamed or renumbered), so that every report left beside the log is
/// about the series being checked.
fn remove_stale_reports(build_dir: &Path, series: &[(String, Vec<u8>)]) -> Result<()> {
    for e in fs_err::read_dir(build_dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(patch) = name.strip_suffix(".checkpatch.txt") {
            if !series.iter().any(|(n, _)| n == patch) {
                fs_err::remove_file(e.path())?;
            }
        }
    }
    Ok(())
}

/// `cargo xtask kernel check-series`; `full` starts again from the base.
pub fn check(cache: &Cache, full: bool) -> Result<bool> {
    let series = kernel::read_series()?;
    if series.is_empty() {
        println!("kernel-patches/series lists no patches: nothing to check.");
        return Ok(true);
    }
    let sources = crate::sources::resolve(cache, false)?;
    let _lock = kernel::tree_lock(cache, "check")?;
    let tree = base_tree(cache, "check", &sources)?;
    let build_dir = cache.dir("build")?.join("check");
    fs_err::create_dir_all(&build_dir)?;
    let log = build_dir.join("check-series.log");
    let record_path = build_dir.join("check-series.json");
    let _ = fs_err::remove_file(&log);
    let t0 = Instant::now();

    // The base is the stock kernel: same source, fragments and recipe.
    let base_key =
        kernel::cache_key(&kernel::debian_source_id(&sources.kernel_version), &[], &kernel::read_fragments()?);
    let keys = prefix_keys(&base_key, &series);
    let old: Record = fs_err::read(&record_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let applied = kernel::applied_count(&tree)?;
    // Reuse only what the tree really holds: the record must describe it.
    let keep = if full || old.base_key != base_key || applied != old.patches.len() {
        0
    } else {
        unchanged_prefix(&old, &keys)
    };
    eprintln!("check-series: base {} (log {})", sources.kernel_version, log.display());
    kernel::configure(cache, &tree, &build_dir, &log, "check-series base", &kernel::read_fragments()?)?;
    if keep == 0 {
        reset_to_base(&tree)?;
        let t = Instant::now();
        kernel::compile(cache, &tree, &build_dir, &log, "check-series base")?;
        eprintln!("check-series: base built in {}", util::since(t));
    } else {
        kernel::rewind(&tree, applied, keep)?;
        if keep == series.len() {
            eprintln!("check-series: all {keep} patches unchanged since they were built; only checkpatch runs");
        } else {
            eprintln!(
                "check-series: patches 1–{keep} unchanged since they were built; rebuilding from patch {}",
                keep + 1
            );
        }
    }
    let mut record = Record { base_key, patches: old.patches.iter().take(keep).cloned().collect() };
    let save = |r: &Record| -> Result<()> { util::write_atomic(&record_path, &serde_json::to_vec_pretty(r)?) };
    save(&record)?;

    remove_stale_reports(&build_dir, &series)?;
    let mut ok = true;
    let mut rows = Vec::new();
    for (i, (name, bytes)) in series.iter().enumerate() {
        let text = String::from_utf8_lossy(bytes);
        let mut cp = std::process::Command::new("perl");
        cp.current_dir(&tree)
            .arg("scripts/checkpatch.pl")
            .args(["--strict", "--no-summary-file", "--color=never"])
            .arg(util::project_root().join("kernel-patches").join(name));
        // checkpatch exits non-zero on any complaint; the tally says how bad.
        let out = cp.output().with_context(|| format!("Failed to run checkpatch.pl on {name}"))?;
        let out_text = String::from_utf8_lossy(&out.stdout).into_owned();
        fs_err::write(build_dir.join(format!("{name}.checkpatch.txt")), &out_text)?;
        let tally = parse_tally(&out_text).unwrap_or(Tally { errors: 1, ..Default::default() });
        let built: Result<String> = if i < keep {
            Ok(format!("unchanged, built earlier: {}", record.patches[i].build))
        } else {
            apply_patch(&tree, name)?;
            let t = Instant::now();
            let r = kernel::compile(cache, &tree, &build_dir, &log, &format!("check-series {name}"))
                .map(|n| format!("ok in {} ({n} objects)", util::since(t)));
            record.patches.push(Checked {
                name: name.clone(),
                prefix_key: keys[i].clone(),
                built: r.is_ok(),
                build: r.as_ref().map(|s| s.trim_start_matches("ok in ").to_string()).unwrap_or_default(),
            });
            save(&record)?;
            r
        };
        let justified = tally.warnings + tally.checks == 0 || changelog_justifies(&text);
        let row_ok = built.is_ok() && tally.errors == 0 && justified;
        ok &= row_ok;
        rows.push(format!(
            "{} {name}\n    build: {}  checkpatch --strict: {} errors, {} warnings, {} checks{}",
            if row_ok { "✓" } else { "✗" },
            match &built {
                Ok(s) => s.clone(),
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
    if ok {
        let r = coverage(cache, &tree, &build_dir, &series, &log);
        ok &= r.is_ok();
        let row = match r {
            Ok(s) => format!("✓ coverage: {s}"),
            Err(e) => format!("✗ coverage: {e:#}"),
        };
        eprintln!("{row}");
        rows.push(row);
    }
    println!("\n{}", rows.join("\n"));
    println!(
        "\ncheck-series: {} of {} patches checked in {} ({} unchanged and not rebuilt; --full rebuilds every \
         prefix); checkpatch reports in {}",
        rows.iter().filter(|r| !r.contains(" coverage: ")).count(),
        series.len(),
        util::since(t0),
        keep,
        build_dir.display()
    );
    Ok(ok)
}

/// The kernel C files the series changes (`+++ b/…` lines), in order of
/// first appearance; user-space files under `tools/` are built elsewhere.
pub fn touched_c_files(series: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, bytes) in series {
        for line in String::from_utf8_lossy(bytes).lines() {
            let Some(path) = line.strip_prefix("+++ b/") else { continue };
            if path.ends_with(".c") && !path.starts_with("tools/") && !out.iter().any(|p| p == path) {
                out.push(path.to_string());
            }
        }
    }
    out
}

/// Compile, with `kernel-config/coverage/` on top of the lean fragments, every
/// C file the series touches that the per-patch builds did not compile (no
/// object in `build_dir`), on the tree with the whole series applied.
fn coverage(
    cache: &Cache,
    tree: &std::path::Path,
    build_dir: &std::path::Path,
    series: &[(String, Vec<u8>)],
    log: &std::path::Path,
) -> Result<String> {
    let touched = touched_c_files(series);
    let missing: Vec<String> = touched
        .iter()
        .filter(|f| !build_dir.join(Path::new(f.as_str()).with_extension("o")).exists())
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(format!("all {} touched C files were compiled by the per-patch builds", touched.len()));
    }
    let t = Instant::now();
    let cov_dir = cache.dir("build")?.join("check-coverage");
    fs_err::create_dir_all(&cov_dir)?;
    let extra = kernel::read_fragments_in("kernel-config/coverage")?;
    let mut fragments = without_options(kernel::read_fragments()?, &option_names(&extra));
    fragments.extend(extra);
    kernel::configure(cache, tree, &cov_dir, log, "check-series coverage", &fragments)?;
    let objs: Vec<String> = missing.iter().map(|f| Path::new(f).with_extension("o").display().to_string()).collect();
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let mut args = vec![format!("-j{jobs}")];
    args.extend(objs.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pb = crate::ui::spinner(format!("check-series coverage: compiling {}", objs.join(", ")));
    let r = util::run_logged(kernel::make(cache, tree, &cov_dir, &args), log, |_| {});
    pb.finish_and_clear();
    r.with_context(|| {
        format!("compiling {} with kernel-config/coverage failed; the full log is {}", objs.join(", "), log.display())
    })?;
    for o in &objs {
        anyhow::ensure!(cov_dir.join(o).exists(), "make did not produce {o} (log: {})", log.display());
    }
    Ok(format!(
        "{} of {} touched C files are outside the lean config; compiled with kernel-config/coverage in {}: {}",
        missing.len(),
        touched.len(),
        util::since(t),
        missing.join(", ")
    ))
}

/// The `CONFIG_…` names that `fragments` set (`=…` or `is not set`).
fn option_names(fragments: &[(String, String)]) -> Vec<String> {
    fragments
        .iter()
        .flat_map(|(_, text)| text.lines().filter_map(|l| kernel::fragment_option(l).map(|(n, _)| n.to_string())))
        .collect()
}

/// `fragments` without the lines that set any of `names`: the coverage
/// fragment overrides the lean one there (the lean config turns Ethernet
/// off, mlx5 needs it).
fn without_options(fragments: Vec<(String, String)>, names: &[String]) -> Vec<(String, String)> {
    fragments
        .into_iter()
        .map(|(file, text)| {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !kernel::fragment_option(l).is_some_and(|(n, _)| names.iter().any(|m| m == n)))
                .collect();
            (file, kept.join("\n") + "\n")
        })
        .collect()
}

fn edit_tree(cache: &Cache) -> Result<std::path::PathBuf> {
    Ok(cache.dir("trees")?.join("edit"))
}

/// `cargo xtask kernel edit`.
pub fn edit(cache: &Cache) -> Result<()> {
    let tree = edit_tree(cache)?;
    let fresh = !tree.join(".git/pinlab-base").exists();
    let sources = crate::sources::resolve(cache, false)?;
    let _lock = kernel::tree_lock(cache, "edit")?;
    let tree = base_tree(cache, "edit", &sources)?;
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
    for e in fs_err::read_dir(&dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.len() > 5 && name[..4].chars().all(|c| c.is_ascii_digit()) && name.ends_with(".patch") {
            fs_err::remove_file(&p)?;
        }
    }
    let mut fp = git(&tree, &["format-patch", "--no-signature", "--abbrev=12", "-o"]);
    fp.arg(&dir).arg("pinlab-base..HEAD");
    let out = util::output(fp)?;
    let names: Vec<String> =
        out.lines().filter_map(|l| Path::new(l.trim()).file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    let base = fs_err::read_to_string(tree.join(".git/pinlab-base")).unwrap_or_default();
    let series = format!(
        "# Applied in this order with `git am` onto Debian linux-source-6.12 {}.\n{}\n",
        base.trim(),
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
    fn reports_of_patches_no_longer_in_the_series_are_removed() {
        let d = tempfile::tempdir().unwrap();
        for f in ["0001-a.patch.checkpatch.txt", "0001-old.patch.checkpatch.txt", "check-series.log"] {
            fs_err::write(d.path().join(f), "x").unwrap();
        }
        remove_stale_reports(d.path(), &[("0001-a.patch".into(), Vec::new())]).unwrap();
        let mut left: Vec<String> = fs_err::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["0001-a.patch.checkpatch.txt", "check-series.log"]);
    }

    #[test]
    fn renumbering_or_rebasing_a_patch_does_not_change_its_key() {
        let p = |id: &str, n: &str, body: &str| {
            (
                "0001-a.patch".to_string(),
                format!("From {id} Mon Sep 17 00:00:00 2001\nSubject: [PATCH {n}] a\n\n{body}").into_bytes(),
            )
        };
        let k = |x| prefix_keys("base", &[x])[0].clone();
        assert_eq!(k(p("1111", "01/20", "diff")), k(p("2222", "01/22", "diff")));
        assert_ne!(k(p("1111", "01/20", "diff")), k(p("1111", "01/20", "diff2")));
        assert_eq!(key_view(b"Subject: [PATCH v2] x\n"), b"Subject: [PATCH v2] x\n".to_vec());
    }

    #[test]
    fn prefix_keys_change_from_the_edited_patch_on() {
        let p = |n: &str, b: &str| (n.to_string(), b.as_bytes().to_vec());
        let a = prefix_keys("base", &[p("1", "one"), p("2", "two"), p("3", "three")]);
        let b = prefix_keys("base", &[p("1", "one"), p("2", "TWO"), p("3", "three")]);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_ne!(a[2], b[2], "a later patch's key covers the edited one");
        assert_ne!(prefix_keys("other base", &[p("1", "one")])[0], a[0]);
        let rec = |built: &[bool]| Record {
            base_key: "base".into(),
            patches: a
                .iter()
                .zip(built)
                .map(|(k, &ok)| Checked { name: String::new(), prefix_key: k.clone(), built: ok, build: String::new() })
                .collect(),
        };
        assert_eq!(unchanged_prefix(&rec(&[true, true, true]), &a), 3);
        assert_eq!(unchanged_prefix(&rec(&[true, true, true]), &b), 1);
        assert_eq!(unchanged_prefix(&rec(&[true, false]), &a), 1, "a failed build is not reused");
        assert_eq!(unchanged_prefix(&Record::default(), &a), 0);
    }

    #[test]
    fn touched_c_files_are_the_kernel_sources_of_the_diffs() {
        let p = |t: &str| ("p".to_string(), t.as_bytes().to_vec());
        let series = [
            p("--- a/fs/dax.c\n+++ b/fs/dax.c\n--- a/include/linux/dax.h\n+++ b/include/linux/dax.h\n"),
            p("+++ b/fs/dax.c\n+++ b/drivers/infiniband/hw/mlx5/mr.c\n+++ b/tools/testing/x/t.c\n"),
        ];
        assert_eq!(touched_c_files(&series), ["fs/dax.c", "drivers/infiniband/hw/mlx5/mr.c"]);
    }

    #[test]
    fn coverage_options_replace_the_lean_ones() {
        let lean = vec![(
            "50-rdma.config".to_string(),
            "CONFIG_INFINIBAND=y\n# CONFIG_ETHERNET is not set\nCONFIG_NET_VENDOR_MELLANOX=n\n".to_string(),
        )];
        let cov = vec![("cov".to_string(), "# comment\nCONFIG_ETHERNET=y\nCONFIG_NET_VENDOR_MELLANOX=y\n".to_string())];
        let names = option_names(&cov);
        assert_eq!(names, ["CONFIG_ETHERNET", "CONFIG_NET_VENDOR_MELLANOX"]);
        assert_eq!(without_options(lean, &names)[0].1, "CONFIG_INFINIBAND=y\n");
    }

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
