//! `cargo xtask kernel`: source, config, build, cache.
//!
//! Source is Debian's `linux-source-6.12` at a pinned version, fetched with
//! the private apt and extracted once into the cache. Each flavor builds out
//! of tree (`O=`) in a build dir inside its source tree ([`BUILD_SUBDIR`]),
//! so that kbuild names the source `..` and trees that differ in a few files
//! share objects (see [`build_dir_of`]); `.config` is `tinyconfig` plus
//! `kernel-config/*.config` merged with `merge_config.sh`, and every option a
//! fragment asks for must survive `olddefconfig`. The bzImage is cached by a
//! content hash of (source version, patches, fragments).

use crate::sources::Sources;
use crate::ui;
use crate::util::{self, Cache, KeyHasher};
use anyhow::{bail, Context, Result};
use pinlab_scenarios::Flavor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Debian source package of the kernel.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// Its pinned version (port-notes.md's line numbers refer to this tree).
pub const SOURCE_VERSION: &str = "6.12.117-1";
/// Bump when the recipe below changes in a way that must rebuild kernels.
const RECIPE: &str = "pinlab-kernel-recipe-1";
/// Objects a lean build compiles, for the progress bar until one is measured.
const DEFAULT_OBJECTS: u64 = 1400;

/// The build dir of a Debian-based flavor, a direct subdirectory of its
/// source tree. Kbuild then sets `srctree := ..` instead of the tree's
/// absolute path, so the compiler command lines and `.cmd` files of two
/// trees are the same wherever their files are: a build dir copied from
/// the stock tree into the hazard or patched tree recompiles only the files
/// those series change (and what includes them), and ccache hits across trees.
pub const BUILD_SUBDIR: &str = ".pinlab-build";

/// A built kernel.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Which flavor.
    pub flavor: Flavor,
    /// The bootable image.
    pub bzimage: PathBuf,
    /// The cache key it was built under.
    pub key: String,
    /// The series' kselftests built against this tree's uapi headers (empty for stock).
    pub selftests: Vec<PathBuf>,
}

/// Where the series keeps its uapi selftests (kselftest harness, TAP output).
pub const SELFTEST_DIRS: &[&str] = &["tools/testing/selftests/filesystems/layout_leases"];

/// Build every `*.c` of [`SELFTEST_DIRS`] present in `srctree` into `out`,
/// against the tree's exported uapi headers (`make headers`).
fn build_selftests(cache: &Cache, srctree: &Path, build_dir: &Path, log: &Path, out: &Path) -> Result<()> {
    let mut sources = Vec::new();
    for d in SELFTEST_DIRS {
        let Ok(rd) = fs_err::read_dir(srctree.join(d)) else { continue };
        for e in rd {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) == Some("c") {
                sources.push(p);
            }
        }
    }
    if sources.is_empty() {
        return Ok(());
    }
    util::run_logged(make(cache, srctree, build_dir, &["headers"]), log, |_| {}).context("Failed to make headers")?;
    fs_err::create_dir_all(out).with_context(|| format!("Failed to create {}", out.display()))?;
    for src in sources {
        let name = src.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let mut cc = Command::new("gcc");
        cc.args(["-Wall", "-O2", "-g", "-isystem"])
            .arg(build_dir.join("usr/include"))
            .arg("-o")
            .arg(out.join(&name))
            .arg(&src);
        util::run_logged(cc, log, |_| {}).with_context(|| format!("Failed to build the selftest {}", src.display()))?;
    }
    Ok(())
}

fn selftests_in(out_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs_err::read_dir(out_dir.join("selftests"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| util::is_executable(p)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Where a flavor's source comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The pinned Debian source package.
    Debian,
    /// A user's own tree.
    Tree(PathBuf),
}

/// One option a fragment sets, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// `CONFIG_FOO`.
    pub name: String,
    /// `y`, `m`, a number or string, or `n` for `# CONFIG_FOO is not set`.
    pub value: String,
    /// The fragment file.
    pub file: String,
    /// Line in that file.
    pub line: usize,
}

/// The option a fragment line sets and its value: `CONFIG_FOO=v`, or
/// `# CONFIG_FOO is not set` as `n`; `None` for comments, blank lines and
/// anything else.
pub fn fragment_option(line: &str) -> Option<(&str, &str)> {
    let l = line.trim();
    if let Some(name) = l.strip_prefix("# ").and_then(|r| r.strip_suffix(" is not set")) {
        return Some((name, "n"));
    }
    l.split_once('=').filter(|(k, _)| k.starts_with("CONFIG_"))
}

/// Parse Kconfig fragments; two fragments disagreeing on an option is an error.
pub fn parse_fragments(frags: &[(String, String)]) -> Result<BTreeMap<String, Want>> {
    let mut out: BTreeMap<String, Want> = BTreeMap::new();
    for (file, text) in frags {
        for (i, raw) in text.lines().enumerate() {
            let l = raw.trim();
            let kv = if let Some((k, v)) = fragment_option(l) {
                Some((k.to_string(), v.to_string()))
            } else if l.is_empty() || l.starts_with('#') {
                None
            } else if l.contains('=') {
                bail!("{file}:{}: '{raw}' is not a CONFIG_ option", i + 1);
            } else {
                bail!("{file}:{}: cannot parse '{raw}' (expected CONFIG_FOO=y or '# CONFIG_FOO is not set')", i + 1);
            };
            if let Some((name, value)) = kv {
                let want = Want { name: name.clone(), value, file: file.clone(), line: i + 1 };
                if let Some(prev) = out.get(&name) {
                    if prev.value != want.value {
                        bail!(
                            "conflicting fragments: {}:{} sets {name}={} but {}:{} sets {name}={}",
                            prev.file,
                            prev.line,
                            prev.value,
                            want.file,
                            want.line,
                            want.value
                        );
                    }
                }
                out.insert(name, want);
            }
        }
    }
    Ok(out)
}

/// Options the fragments asked for that the final `.config` does not have.
pub fn dropped_options(wants: &BTreeMap<String, Want>, config: &str) -> Vec<(Want, String)> {
    let mut have: BTreeMap<&str, &str> = BTreeMap::new();
    for l in config.lines() {
        if let Some((k, v)) = l.split_once('=') {
            have.insert(k, v);
        } else if let Some(rest) = l.strip_prefix("# ").and_then(|r| r.strip_suffix(" is not set")) {
            have.insert(rest, "n");
        }
    }
    wants
        .values()
        .filter_map(|w| {
            let got = have.get(w.name.as_str()).copied().unwrap_or("n");
            (got != w.value).then(|| (w.clone(), got.to_string()))
        })
        .collect()
}

/// The fragments, sorted by file name, as (path relative to the repo, text).
pub fn read_fragments() -> Result<Vec<(String, String)>> {
    read_fragments_in("kernel-config")
}

/// The fragments `flavor` is configured with: `kernel-config/*.config`,
/// and for the debug flavors `kernel-config/debug/*.config` after them.
pub fn fragments_of(flavor: Flavor) -> Result<Vec<(String, String)>> {
    let mut v = read_fragments()?;
    if flavor.is_debug() {
        v.extend(read_fragments_in("kernel-config/debug")?);
    }
    Ok(v)
}

/// The `*.config` files of `rel` (relative to the repo), sorted by name.
pub fn read_fragments_in(rel: &str) -> Result<Vec<(String, String)>> {
    let dir = util::project_root().join(rel);
    let mut out = Vec::new();
    for e in fs_err::read_dir(&dir).with_context(|| format!("Failed to read {}", dir.display()))? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) == Some("config") {
            let text = fs_err::read_to_string(&p).with_context(|| format!("Failed to read {}", p.display()))?;
            out.push((format!("{rel}/{}", p.file_name().unwrap_or_default().to_string_lossy()), text));
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no {rel}/*.config fragments found in {}", dir.display());
    }
    Ok(out)
}

/// The patch files of `kernel-patches/series`, in order, as (name, contents).
pub fn read_series() -> Result<Vec<(String, Vec<u8>)>> {
    read_series_file("series")
}

/// The patches a flavor applies onto the stock source, as (name relative to
/// `kernel-patches/`, contents): none for stock, `series` for patched,
/// `hazard/series` for hazard.
pub fn series_of(flavor: Flavor) -> Result<Vec<(String, Vec<u8>)>> {
    let mut series = match flavor.base() {
        Flavor::Patched => read_series()?,
        Flavor::Hazard => read_series_file("hazard/series")?,
        _ => Vec::new(),
    };
    // The debug flavors add diagnostics after the series (an LKDTM trigger
    // for a lockdep report), never anything the scenarios depend on.
    if flavor.is_debug() {
        series.extend(read_series_file("debug/series")?);
    }
    Ok(series)
}

/// The patches a series file under `kernel-patches/` lists (names in it are
/// relative to its own directory).
fn read_series_file(rel: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = util::project_root().join("kernel-patches");
    let series = dir.join(rel);
    let sub = Path::new(rel).parent().unwrap_or(Path::new(""));
    let text = match fs_err::read_to_string(&series) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("Failed to read {}", series.display())),
    };
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let name = sub.join(l).display().to_string();
        let p = dir.join(&name);
        let bytes =
            fs_err::read(&p).with_context(|| format!("kernel-patches/{rel}:{}: cannot read {}", i + 1, p.display()))?;
        out.push((name, bytes));
    }
    Ok(out)
}

/// The flavors that can be built now: stock always, patched and hazard once
/// their series list patches.
pub fn available_flavors() -> Result<Vec<Flavor>> {
    let mut v = vec![Flavor::Stock];
    for f in [Flavor::Patched, Flavor::Hazard] {
        if !series_of(f)?.is_empty() {
            v.push(f);
        }
    }
    Ok(v)
}

/// The pristine Debian source tree of the resolved version, fetched and
/// extracted once (under a lock, in a staging directory renamed into place).
pub fn debian_source(cache: &Cache, sources: &Sources) -> Result<PathBuf> {
    let version = &sources.kernel_version;
    let src = cache.dir("src")?;
    let tree = src.join(format!("linux-{version}"));
    if tree.join(".pinlab-complete").exists() {
        return Ok(tree);
    }
    let _lock = util::FileLock::exclusive(&src.join(format!("linux-{version}.lock")))?;
    if tree.join(".pinlab-complete").exists() {
        return Ok(tree);
    }
    let t = Instant::now();
    let pb = ui::spinner(format!("kernel source: fetching {SOURCE_PACKAGE}={version}"));
    let deb = sources.kernel_deb(cache)?;
    pb.set_message(format!("kernel source: extracting {}", deb.display()));
    let tmp = util::staging_path(&tree);
    let _ = fs_err::remove_dir_all(&tmp);
    fs_err::create_dir_all(&tmp).with_context(|| format!("Failed to create {}", tmp.display()))?;
    // dpkg-deb -x gives usr/src/linux-source-6.12.tar.xz; unpack that next to it.
    let mut x = Command::new("dpkg-deb");
    x.arg("-x").arg(&deb).arg(&tmp);
    util::output(x).context("Failed to unpack the linux-source .deb")?;
    let tarball = tmp.join("usr/src/linux-source-6.12.tar.xz");
    let mut tar = Command::new("tar");
    tar.arg("-xJf").arg(&tarball).arg("-C").arg(&tmp);
    util::output(tar).context("Failed to extract the kernel tarball")?;
    let extracted = tmp.join("linux-source-6.12");
    if !extracted.join("Makefile").exists() {
        bail!("{} has no Makefile after extraction", extracted.display());
    }
    let done = extracted.join(".pinlab-complete");
    fs_err::write(&done, version).with_context(|| format!("Failed to write {}", done.display()))?;
    util::publish_dir(&extracted, &tree)?;
    let _ = fs_err::remove_dir_all(&tmp);
    pb.finish_and_clear();
    eprintln!("kernel source: {} ready in {}", tree.display(), util::since(t));
    Ok(tree)
}

/// `git -C tree …` with a fixed identity.
pub fn git(tree: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("git");
    // No automatic gc: after committing a whole kernel tree git starts
    // `gc --auto` in the background, whose ref locks made the next
    // `git reset` of the tree fail ("cannot lock ref 'HEAD'") in a cold run.
    c.arg("-C")
        .arg(tree)
        .args(["-c", "user.name=pinlab developers", "-c", "user.email=pinlab@localhost"])
        .args(["-c", "gc.auto=0", "-c", "maintenance.auto=false"])
        .args(args);
    c
}

/// A git tree `cache/trees/NAME` holding the pristine source as one commit
/// tagged `pinlab-base` (made once per source version: copy + `git add`
/// take a minute or two). The caller holds the tree's lock ([`tree_lock`]).
pub fn base_tree(cache: &Cache, name: &str, sources: &Sources) -> Result<PathBuf> {
    let version = &sources.kernel_version;
    let tree = cache.dir("trees")?.join(name);
    let stamp = tree.join(".git/pinlab-base");
    let old = match fs_err::read_to_string(&stamp) {
        Ok(v) if v.trim() == version => return Ok(tree),
        Ok(v) => Some(v.trim().to_string()),
        Err(_) => None,
    };
    if let Some(old) = &old {
        // Never throw away someone's work: an edit tree with commits or
        // changes of its own is moved aside, not replaced.
        let own = util::output(git(&tree, &["rev-list", "--count", "pinlab-base..HEAD"])).unwrap_or_default();
        let dirty = util::output(git(&tree, &["status", "--porcelain", "--untracked-files=no"])).unwrap_or_default();
        if name == "edit" && (own.trim() != "0" || !dirty.trim().is_empty()) {
            let aside = tree.with_file_name(format!("edit-{old}"));
            fs_err::rename(&tree, &aside)
                .with_context(|| format!("Failed to move {} to {}", tree.display(), aside.display()))?;
            eprintln!(
                "trees/edit: its base is {old}, the source is now {version}; your edit tree (with its commits) is kept \
                 at {}",
                aside.display()
            );
        } else {
            eprintln!("trees/{name}: its base is {old}, the source is now {version}; making it again");
        }
        // Its objects were compiled from the old source under the same paths:
        // make would keep every one whose source file looks older.
        let build = cache.root.join("build").join(name);
        if build.exists() {
            fs_err::remove_dir_all(&build).with_context(|| format!("Failed to remove {}", build.display()))?;
        }
    }
    let pristine = debian_source(cache, sources)?;
    let pb = ui::spinner(format!("trees/{name}: copying the pristine source and committing it as the base"));
    let staging = util::staging_path(&tree);
    fs_err::create_dir_all(&staging)?;
    // Everything but the stock build dir (cp -a keeps the mtimes, so a copied
    // build dir sees only the files a series changes as newer than its objects).
    let mut cp = Command::new("cp");
    cp.arg("-a");
    for e in fs_err::read_dir(&pristine)? {
        let e = e?;
        if e.file_name() != BUILD_SUBDIR {
            cp.arg(e.path());
        }
    }
    cp.arg(&staging);
    util::output(cp)?;
    let _ = fs_err::remove_file(staging.join(".pinlab-complete"));
    // Debian's linux-source ships a .gitignore that ignores everything at the
    // top level ("/*", "!/debian/"); drop those two lines so git sees the tree.
    let gi = staging.join(".gitignore");
    if let Ok(text) = fs_err::read_to_string(&gi) {
        let kept: Vec<&str> = text.lines().filter(|l| *l != "/*" && *l != "!/debian/").collect();
        fs_err::write(&gi, kept.join("\n") + "\n").with_context(|| format!("Failed to write {}", gi.display()))?;
    }
    util::output(git(&staging, &["init", "-q"]))?;
    let exclude = staging.join(".git/info/exclude");
    fs_err::create_dir_all(staging.join(".git/info"))?;
    fs_err::write(&exclude, format!("/{BUILD_SUBDIR}/\n"))?;
    util::output(git(&staging, &["add", "-A"]))?;
    util::output(git(&staging, &["commit", "-q", "-m", &format!("Debian {SOURCE_PACKAGE} {version}")]))?;
    util::output(git(&staging, &["tag", "-f", "pinlab-base"]))?;
    // The old base's blobs let `git am -3` merge patches written against it.
    let old_tree = [tree.clone(), tree.with_file_name(format!("{name}-{}", old.as_deref().unwrap_or("")))]
        .into_iter()
        .find(|t| t.join(".git").exists());
    if let (Some(o), Some(t)) = (&old, old_tree) {
        let mut f = git(&staging, &["fetch", "-q", "--no-tags"]);
        f.arg(&t).arg(format!("pinlab-base:refs/pinlab/base-{o}"));
        if let Err(e) = util::output(f) {
            eprintln!("trees/{name}: could not keep the {o} base for 3-way merges: {e:#}");
        }
    }
    let st = staging.join(".git/pinlab-base");
    fs_err::write(&st, version).with_context(|| format!("Failed to write {}", st.display()))?;
    util::publish_dir(&staging, &tree)?;
    pb.finish_and_clear();
    Ok(tree)
}

/// The lock guarding `cache/trees/NAME` and `cache/build/NAME`.
pub fn tree_lock(cache: &Cache, name: &str) -> Result<util::FileLock> {
    util::FileLock::exclusive(&cache.dir("locks")?.join(format!("tree-{name}.lock")))
}

/// `git am` one patch of kernel-patches/ onto `tree` (aborting on failure).
pub fn apply_patch(tree: &Path, name: &str) -> Result<()> {
    // -3: when the source has moved on from the pinned version, fall back to
    // a 3-way merge where the patch's context no longer matches exactly.
    let mut am = git(tree, &["am", "-q", "-3", "--keep-cr"]);
    am.arg(util::project_root().join("kernel-patches").join(name));
    if let Err(e) = util::output(am) {
        util::output(git(tree, &["am", "--abort"])).ok();
        let base = fs_err::read_to_string(tree.join(".git/pinlab-base")).unwrap_or_default();
        return Err(e).with_context(|| {
            format!(
                "kernel-patches/{name} does not apply to {SOURCE_PACKAGE} {} even with a 3-way merge. \
                 Rebase the series: `cargo xtask kernel edit` makes a tree with the patches that apply, \
                 fix {name} there with git, then `cargo xtask kernel export`",
                base.trim()
            )
        });
    }
    Ok(())
}

/// Reset `tree` to the pristine base.
pub fn reset_to_base(tree: &Path) -> Result<()> {
    util::output(git(tree, &["am", "--abort"])).ok();
    util::output(git(tree, &["reset", "-q", "--hard", "pinlab-base"]))?;
    Ok(())
}

/// How many patch commits `tree` has on top of `pinlab-base`.
pub fn applied_count(tree: &Path) -> Result<usize> {
    let n = util::output(git(tree, &["rev-list", "--count", "pinlab-base..HEAD"]))?;
    n.trim().parse().with_context(|| format!("git rev-list --count printed {n:?} in {}", tree.display()))
}

/// Drop the last `applied - keep` patch commits of `tree` with `git reset
/// --hard`, which rewrites only the files that differ: after an edit to
/// patch 12 of 14, a build recompiles what patches 12–14 touch, not what
/// patch 1 touched.
pub fn rewind(tree: &Path, applied: usize, keep: usize) -> Result<()> {
    if applied > keep {
        util::output(git(tree, &["reset", "-q", "--hard", &format!("HEAD~{}", applied - keep)]))
            .with_context(|| format!("Failed to rewind {} to its first {keep} patches", tree.display()))?;
    }
    Ok(())
}

/// A git tree of the pinned source with a flavor's series applied as
/// commits (`cache/trees/<name>`). The longest unchanged prefix of the
/// applied series stays (see [`rewind`]); only the patches from the first
/// changed one on are applied again.
pub fn series_tree(cache: &Cache, name: &str, series: &[(String, Vec<u8>)], sources: &Sources) -> Result<PathBuf> {
    let tree = base_tree(cache, name, sources)?;
    let keys: Vec<String> =
        series.iter().map(|(n, b)| format!("{n} {}", KeyHasher::default().part(n, b).finish())).collect();
    let stamp = tree.join(".git/pinlab-series");
    let applied: Vec<String> =
        fs_err::read_to_string(&stamp).map(|t| t.lines().map(String::from).collect()).unwrap_or_default();
    if applied == keys {
        return Ok(tree);
    }
    let common = applied.iter().zip(&keys).take_while(|(a, b)| a == b).count();
    let start = if stamp.exists() && applied_count(&tree).ok() == Some(applied.len()) {
        rewind(&tree, applied.len(), common)?;
        common
    } else {
        reset_to_base(&tree)?;
        0
    };
    let _ = fs_err::remove_file(&stamp);
    for (name, _) in &series[start..] {
        apply_patch(&tree, name)?;
    }
    util::write_atomic(&stamp, keys.join("\n").as_bytes())?;
    Ok(tree)
}

/// `make -C srctree O=build_dir ARCH=x86_64 args…`, with ccache when present.
pub fn make(cache: &Cache, srctree: &Path, build_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("make");
    c.current_dir(srctree)
        .arg(format!("O={}", build_dir.display()))
        .arg("ARCH=x86_64")
        .args(args)
        .env("KBUILD_BUILD_USER", "pinlab")
        .env("KBUILD_BUILD_HOST", "pinlab");
    if util::which("ccache").is_some() {
        c.arg("CC=ccache gcc").env("CCACHE_DIR", cache.root.join("ccache"));
    }
    c
}

/// `.config` = tinyconfig + `fragments`, then check nothing was dropped.
pub fn configure(
    cache: &Cache,
    srctree: &Path,
    build_dir: &Path,
    log: &Path,
    label: &str,
    fragments: &[(String, String)],
) -> Result<()> {
    let wants = parse_fragments(fragments)?;
    let pb = ui::spinner(format!("{label}: configuring (tinyconfig + {} fragments)", fragments.len()));
    util::run_logged(make(cache, srctree, build_dir, &["tinyconfig"]), log, |_| {})
        .context("Failed to make tinyconfig")?;
    // What scripts/kconfig/merge_config.sh -m does, without a shell (it
    // splits paths with spaces): each fragment option replaces the base's.
    let cfg_path = build_dir.join(".config");
    let base = fs_err::read_to_string(&cfg_path).with_context(|| format!("Failed to read {}", cfg_path.display()))?;
    util::write_atomic(&cfg_path, merge_config(&base, fragments).as_bytes())?;
    util::run_logged(make(cache, srctree, build_dir, &["olddefconfig"]), log, |_| {})
        .context("Failed to make olddefconfig")?;
    pb.finish_and_clear();
    let config = fs_err::read_to_string(build_dir.join(".config"))
        .with_context(|| format!("Failed to read {}", build_dir.join(".config").display()))?;
    let dropped = dropped_options(&wants, &config);
    if !dropped.is_empty() {
        let lines: Vec<_> = dropped
            .iter()
            .map(|(w, got)| format!("  {}={} ({}:{}) ended up as {got}", w.name, w.value, w.file, w.line))
            .collect();
        bail!(
            "{label}: Kconfig dropped {} option(s) the fragments ask for, probably due to unsatisfied dependencies:\n{}\n\
             Add the missing dependencies to a fragment (see `make O={} menuconfig`, search with /).",
            dropped.len(),
            lines.join("\n"),
            build_dir.display()
        );
    }
    Ok(())
}

/// `base` (a `.config`) with every option the fragments set replaced by the
/// fragment's line, in fragment order; `olddefconfig` then settles the rest.
pub fn merge_config(base: &str, fragments: &[(String, String)]) -> String {
    let symbol = |l: &str| -> Option<String> {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("# ").and_then(|r| r.strip_suffix(" is not set")) {
            return Some(rest.to_string());
        }
        l.split_once('=').map(|(k, _)| k.to_string()).filter(|k| k.starts_with("CONFIG_"))
    };
    let mut lines: Vec<String> = Vec::new();
    let mut set = std::collections::BTreeSet::new();
    for (_, text) in fragments {
        for l in text.lines() {
            if let Some(sym) = symbol(l) {
                set.insert(sym);
                lines.push(l.trim().to_string());
            }
        }
    }
    let mut out: String =
        base.lines().filter(|l| symbol(l).is_none_or(|s| !set.contains(&s))).map(|l| format!("{l}\n")).collect();
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// `make bzImage` with a progress bar (compiled objects vs the count the
/// last full build saw); returns the number of objects compiled.
pub fn compile(cache: &Cache, srctree: &Path, build_dir: &Path, log: &Path, label: &str) -> Result<u64> {
    let count_file = build_dir.join(".pinlab-objects");
    let expected =
        fs_err::read_to_string(&count_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(DEFAULT_OBJECTS);
    let pb = ui::bar(expected, format!("{label}: compiling"));
    let mut n = 0u64;
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    util::run_logged(make(cache, srctree, build_dir, &[&format!("-j{jobs}"), "bzImage"]), log, |line| {
        if line.starts_with("  CC ") || line.starts_with("  AS ") {
            n += 1;
            pb.set_position(n.min(expected));
            if let Some(obj) = line.split_whitespace().nth(1) {
                pb.set_message(format!("{label}: {obj}"));
            }
        }
    })
    .with_context(|| format!("{label}: build failed; the full log is {}", log.display()))?;
    pb.finish_and_clear();
    if n > expected / 2 {
        util::write_atomic(&count_file, n.to_string().as_bytes())?;
    }
    Ok(n)
}

/// The source part of a cache key for a Debian kernel source version.
pub fn debian_source_id(version: &str) -> String {
    format!("debian:{SOURCE_PACKAGE}={version}")
}

/// The cache key of a flavor's kernel. Each patch counts only by its diff
/// (see [`build_view`]): a changelog edit, a renumbering or a rebase that
/// leaves the code alone does not rebuild the kernel.
pub fn cache_key(source_id: &str, series: &[(String, Vec<u8>)], fragments: &[(String, String)]) -> String {
    let mut h = KeyHasher::default();
    h.part("recipe", RECIPE.as_bytes()).part("source", source_id.as_bytes());
    for (_, b) in series {
        h.part("patch", build_view(b));
    }
    for (n, t) in fragments {
        h.part(&format!("fragment:{n}"), t.as_bytes());
    }
    h.finish()
}

/// What of a `git format-patch` file reaches the built tree: everything from
/// its first `diff --git` line on (the mail headers, changelog and diffstat
/// do not), or all of it when it has none.
fn build_view(patch: &[u8]) -> &[u8] {
    if patch.starts_with(b"diff --git ") {
        return patch;
    }
    match patch.windows(12).position(|w| w == b"\ndiff --git ") {
        Some(i) => &patch[i + 1..],
        None => patch,
    }
}

/// What a complete kernel cache entry carries, written last.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Manifest {
    key: String,
    source: String,
    bzimage_size: u64,
    selftests: Vec<String>,
}

/// Why a cached kernel cannot be used (nothing: it can).
fn kernel_problems(out_dir: &Path, key: &str) -> Option<String> {
    let m: Manifest = match fs_err::read(out_dir.join("manifest.json")) {
        Err(_) => return Some("no manifest.json (an interrupted build?)".into()),
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(m) => m,
            Err(e) => return Some(format!("manifest.json does not parse: {e}")),
        },
    };
    if m.key != key {
        return Some(format!("manifest.json is for key {}, not {key}", m.key));
    }
    let bz = out_dir.join("bzImage");
    let bytes = match fs_err::read(&bz) {
        Ok(b) => b,
        Err(e) => return Some(format!("bzImage unreadable: {e}")),
    };
    if bytes.len() as u64 != m.bzimage_size {
        return Some(format!("bzImage is {} bytes, the manifest says {}", bytes.len(), m.bzimage_size));
    }
    if let Some(p) = bzimage_problem(&bytes) {
        return Some(p);
    }
    for t in &m.selftests {
        if !util::is_executable(&out_dir.join("selftests").join(t)) {
            return Some(format!("selftest {t} is missing"));
        }
    }
    None
}

/// An x86 bzImage carries the boot protocol magic `HdrS` at 0x202.
pub fn bzimage_problem(bytes: &[u8]) -> Option<String> {
    if bytes.len() < 0x1000 {
        return Some(format!("bzImage is only {} bytes", bytes.len()));
    }
    if &bytes[0x202..0x206] != b"HdrS" {
        return Some("bzImage has no x86 boot header (HdrS at 0x202)".into());
    }
    None
}

/// The cached kernel of `flavor` built from the resolved Debian source, if
/// a complete, verified one is there (nothing is built or fetched).
pub fn cached(cache: &Cache, flavor: Flavor, sources: &Sources) -> Result<Option<Kernel>> {
    let series = series_of(flavor)?;
    let key = cache_key(&debian_source_id(&sources.kernel_version), &series, &fragments_of(flavor)?);
    let out_dir = cache.root.join("kernels").join(format!("{}-{key}", flavor.name()));
    if !out_dir.exists() || kernel_problems(&out_dir, &key).is_some() {
        return Ok(None);
    }
    Ok(Some(Kernel { flavor, bzimage: out_dir.join("bzImage"), key, selftests: selftests_in(&out_dir) }))
}

/// A `--kernel-tree` may be booted as `patched` only if it carries the
/// series: pinlab builds a user's tree as it is and never mislabels it.
pub fn check_tree(flavor: Flavor, tree: &Path, series: &[(String, Vec<u8>)]) -> Result<()> {
    if flavor != Flavor::Stock && !tree_has_series(tree, series)? {
        bail!(
            "--flavor {flavor} --kernel-tree {}: that tree does not carry its series (the last patch, {}, \
             does not reverse-apply). pinlab builds your tree as it is and will not label it {flavor}. Apply \
             the series first (`git -C {} am -3 {}/<the series' patches>`), or boot it as --flavor stock.",
            tree.display(),
            series.last().map(|(n, _)| n.as_str()).unwrap_or(""),
            tree.display(),
            util::project_root().join("kernel-patches").display()
        );
    }
    Ok(())
}

/// `tree` carries the whole series if its last patch reverse-applies.
fn tree_has_series(tree: &Path, series: &[(String, Vec<u8>)]) -> Result<bool> {
    let Some((last, _)) = series.last() else { return Ok(true) };
    let mut c = Command::new("git");
    c.current_dir(tree).args(["apply", "--check", "-R"]).arg(util::project_root().join("kernel-patches").join(last));
    Ok(c.stdin(std::process::Stdio::null()).output().context("Failed to run git apply")?.status.success())
}

/// Give a fresh build dir of a series flavor the stock build's objects (a
/// copy that keeps their mtimes): make then compiles only what the series
/// changes. Nothing to do if the build dir exists or stock was never built.
fn seed_from_stock(cache: &Cache, sources: &Sources, build_dir: &Path, flavor: Flavor) -> Result<()> {
    if build_dir.join(".config").exists() {
        return Ok(());
    }
    let stock = cache.root.join("src").join(format!("linux-{}", sources.kernel_version)).join(BUILD_SUBDIR);
    if !stock.join("vmlinux").exists() {
        return Ok(());
    }
    // The stock build must not change while it is copied.
    let _lock = tree_lock(cache, Flavor::Stock.name())?;
    let t = Instant::now();
    let staging = util::staging_path(build_dir);
    let _ = fs_err::remove_dir_all(&staging);
    let mut cp = Command::new("cp");
    cp.args(["-a", "--reflink=auto"]).arg(&stock).arg(&staging);
    util::output(cp).with_context(|| format!("Failed to copy the stock build dir {}", stock.display()))?;
    let _ = fs_err::remove_file(staging.join("pinlab-build.log"));
    util::publish_dir(&staging, build_dir)?;
    eprintln!(
        "kernel {flavor}: starting from the stock build's objects ({}, copied in {})",
        stock.display(),
        util::since(t)
    );
    Ok(())
}

/// Build (or find in the cache) `flavor`'s bzImage. A cached one is used
/// only if its manifest and header check out; otherwise it is rebuilt with
/// one line saying why.
pub fn build(cache: &Cache, flavor: Flavor, source: &Source, sources: &Sources) -> Result<Kernel> {
    let fragments = fragments_of(flavor)?;
    parse_fragments(&fragments)?;
    let series = series_of(flavor)?;
    if flavor.base() != Flavor::Stock && series.is_empty() {
        bail!(
            "the {flavor} flavor needs patches: {} lists none yet",
            if flavor == Flavor::Hazard { "kernel-patches/hazard/series" } else { "kernel-patches/series" }
        );
    }
    let (source_id, build_name, tree_path) = match source {
        Source::Debian => (debian_source_id(&sources.kernel_version), flavor.name().to_string(), None),
        Source::Tree(p) => {
            let p = p.canonicalize().with_context(|| format!("--kernel-tree {} does not exist", p.display()))?;
            if !p.join("Makefile").exists() || !p.join("scripts/kconfig/merge_config.sh").exists() {
                bail!("--kernel-tree {} does not look like a Linux source tree", p.display());
            }
            check_tree(flavor, &p, &series)?;
            // A user's tree may change under us: the key covers its path, make does the rest.
            let id = format!(
                "tree:{}:{}",
                p.display(),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs()
            );
            let name = format!("tree-{}", KeyHasher::default().part("p", p.display().to_string().as_bytes()).finish());
            (id, name, Some(p))
        }
    };
    let key = cache_key(&source_id, &series, &fragments);
    let out_dir = cache.dir("kernels")?.join(format!("{}-{key}", flavor.name()));
    let bzimage = out_dir.join("bzImage");
    let cached = |why: &mut Option<String>| -> bool {
        *why = if out_dir.exists() { kernel_problems(&out_dir, &key) } else { Some(String::new()) };
        why.is_none()
    };
    let mut why = None;
    if cached(&mut why) {
        eprintln!("kernel {flavor}: cached {} (key {key})", bzimage.display());
        return Ok(Kernel { flavor, bzimage, key, selftests: selftests_in(&out_dir) });
    }
    let _lock = tree_lock(cache, &build_name)?;
    if cached(&mut why) {
        eprintln!("kernel {flavor}: cached {} (key {key}, built by another run)", bzimage.display());
        return Ok(Kernel { flavor, bzimage, key, selftests: selftests_in(&out_dir) });
    }
    if let Some(w) = why.filter(|w| !w.is_empty()) {
        eprintln!("kernel {flavor}: cached {} is damaged ({w}); rebuilding it", out_dir.display());
    }
    let srctree = match (&tree_path, flavor) {
        (Some(p), _) => p.clone(),
        (None, Flavor::Stock) => debian_source(cache, sources)?,
        (None, f) => series_tree(cache, f.name(), &series, sources)?,
    };
    let build_dir = match &tree_path {
        // Never write into a user's tree.
        Some(_) => cache.dir("build")?.join(&build_name),
        None => srctree.join(BUILD_SUBDIR),
    };
    // A debug configuration changes every object's compiler flags: the
    // stock build's objects would all be compiled again.
    if tree_path.is_none() && flavor != Flavor::Stock && !flavor.is_debug() {
        seed_from_stock(cache, sources, &build_dir, flavor)?;
    }
    fs_err::create_dir_all(&build_dir).with_context(|| format!("Failed to create {}", build_dir.display()))?;
    let log = build_dir.join("pinlab-build.log");
    let _ = fs_err::remove_file(&log);
    let t = Instant::now();
    eprintln!("kernel {flavor}: building in {} (log: {})", build_dir.display(), log.display());

    configure(cache, &srctree, &build_dir, &log, &format!("kernel {flavor}"), &fragments)?;
    let n = compile(cache, &srctree, &build_dir, &log, &format!("kernel {flavor}"))?;
    let built = build_dir.join("arch/x86/boot/bzImage");
    let staging = util::staging_path(&out_dir);
    fs_err::create_dir_all(&staging).with_context(|| format!("Failed to create {}", staging.display()))?;
    let copy = |from: &Path, to: &Path| {
        fs_err::copy(from, to).with_context(|| format!("Failed to copy {} to {}", from.display(), to.display()))
    };
    let size = copy(&built, &staging.join("bzImage"))?;
    copy(&build_dir.join(".config"), &staging.join("config"))?;
    build_selftests(cache, &srctree, &build_dir, &log, &staging.join("selftests"))?;
    copy(&log, &staging.join("build.log"))?;
    let manifest = Manifest {
        key: key.clone(),
        source: source_id.clone(),
        bzimage_size: size,
        selftests: selftests_in(&staging)
            .iter()
            .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .collect(),
    };
    if let Some(p) = fs_err::read(staging.join("bzImage")).map(|b| bzimage_problem(&b)).unwrap_or(None) {
        bail!("kernel {flavor}: the build in {} produced a bad bzImage: {p}", build_dir.display());
    }
    util::write_atomic(&staging.join("manifest.json"), &serde_json::to_vec_pretty(&manifest)?)?;
    util::publish_dir(&staging, &out_dir)?;
    eprintln!("kernel {flavor}: built {} in {} ({n} objects compiled)", bzimage.display(), util::since(t));
    Ok(Kernel { flavor, bzimage, key, selftests: selftests_in(&out_dir) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frags() -> Vec<(String, String)> {
        vec![
            ("a.config".into(), "# comment\nCONFIG_ZONE_DEVICE=y\n# CONFIG_MODULES is not set\n".into()),
            ("b.config".into(), "CONFIG_NR_CPUS=4\n".into()),
        ]
    }

    #[test]
    fn dropped_option_is_reported_with_its_fragment() {
        let wants = parse_fragments(&frags()).unwrap();
        let config = "CONFIG_NR_CPUS=4\n# CONFIG_ZONE_DEVICE is not set\n";
        let d = dropped_options(&wants, config);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0.name, "CONFIG_ZONE_DEVICE");
        assert_eq!(d[0].0.file, "a.config");
        assert_eq!(d[0].0.line, 2);
        assert_eq!(d[0].1, "n");
    }

    #[test]
    fn satisfied_config_has_nothing_dropped() {
        let wants = parse_fragments(&frags()).unwrap();
        // An unset option may also simply be absent from .config.
        assert!(dropped_options(&wants, "CONFIG_ZONE_DEVICE=y\nCONFIG_NR_CPUS=4\n").is_empty());
        // A value changed by Kconfig counts as dropped.
        assert_eq!(dropped_options(&wants, "CONFIG_ZONE_DEVICE=y\nCONFIG_NR_CPUS=8\n").len(), 1);
    }

    #[test]
    fn conflicting_fragments_name_both_files() {
        let mut f = frags();
        f.push(("c.config".into(), "CONFIG_NR_CPUS=8\n".into()));
        let e = parse_fragments(&f).unwrap_err().to_string();
        assert!(e.contains("b.config:1") && e.contains("c.config:1"), "{e}");
        let bad = vec![("d.config".into(), "ZONE_DEVICE=y\n".into())];
        assert!(parse_fragments(&bad).unwrap_err().to_string().contains("d.config:1"));
    }

    #[test]
    fn cache_key_is_stable_and_covers_inputs() {
        let f = frags();
        let k1 = cache_key("debian:x", &[], &f);
        assert_eq!(k1, cache_key("debian:x", &[], &f));
        assert_ne!(k1, cache_key("debian:y", &[], &f));
        assert_ne!(k1, cache_key("debian:x", &[("0001.patch".into(), b"diff".to_vec())], &f));
        // Only the diff counts: not the name, the mail headers or the changelog.
        let patch = |head: &str, hunk: &str| {
            format!("From 1 Mon\nSubject: [PATCH {head}\n\nwhy\n---\n a | 1 +\n\ndiff --git a/a b/a\n{hunk}\n")
        };
        let k = |n: &str, p: String| cache_key("debian:x", &[(n.into(), p.into_bytes())], &f);
        assert_eq!(k("0001-x.patch", patch("1/2] x", "+a")), k("0003-y.patch", patch("3/3] y, reworded", "+a")));
        assert_ne!(k("0001-x.patch", patch("1/2] x", "+a")), k("0001-x.patch", patch("1/2] x", "+b")));
        let mut g = f.clone();
        g[1].1.push_str("CONFIG_SMP=y\n");
        assert_ne!(k1, cache_key("debian:x", &[], &g));
        // Pinned: a change to the hashing or the build recipe renames every
        // cached kernel, so it must be a conscious one (update this value).
        assert_eq!(k1, "98656755906ae79c");
    }

    #[test]
    fn merge_replaces_base_options_without_a_shell() {
        let base = "CONFIG_A=y\n# CONFIG_ZONE_DEVICE is not set\nCONFIG_NR_CPUS=64\nCONFIG_B=m\n";
        let out = merge_config(base, &frags());
        assert_eq!(
            out,
            "CONFIG_A=y\nCONFIG_B=m\nCONFIG_ZONE_DEVICE=y\n# CONFIG_MODULES is not set\nCONFIG_NR_CPUS=4\n"
        );
    }

    #[test]
    fn bzimage_header_is_checked() {
        assert!(bzimage_problem(b"").unwrap().contains("0 bytes"));
        let mut img = vec![0u8; 8192];
        assert!(bzimage_problem(&img).unwrap().contains("HdrS"));
        img[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(bzimage_problem(&img), None);
    }

    #[test]
    fn damaged_kernel_entries_are_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        assert!(kernel_problems(d.path(), "k").unwrap().contains("manifest"));
        let mut img = vec![0u8; 8192];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        fs_err::write(d.path().join("bzImage"), &img).unwrap();
        let m = Manifest { key: "k".into(), source: "s".into(), bzimage_size: 8192, selftests: vec![] };
        fs_err::write(d.path().join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(kernel_problems(d.path(), "k"), None);
        assert!(kernel_problems(d.path(), "other").unwrap().contains("key"));
        // Truncated to 0 bytes after the build: rebuilt, not "cached".
        fs_err::write(d.path().join("bzImage"), b"").unwrap();
        assert!(kernel_problems(d.path(), "k").unwrap().contains("0 bytes"));
    }

    #[test]
    fn shipped_fragments_parse() {
        let w = parse_fragments(&read_fragments().unwrap()).unwrap();
        for must in [
            "CONFIG_ZONE_DEVICE",
            "CONFIG_FS_DAX",
            "CONFIG_RDMA_RXE",
            "CONFIG_VIRTIO_FS",
            "CONFIG_ACPI_NFIT",
            "CONFIG_XFS_FS",
            "CONFIG_EXT4_FS",
            "CONFIG_DEV_DAX_PMEM",
        ] {
            assert_eq!(w.get(must).map(|x| x.value.as_str()), Some("y"), "{must}");
        }
    }
}
