//! Reports of a run: `results.json` (the record every other report is made
//! from), `report.md`, and the terminal table. `cargo xtask report` renders
//! them again from an earlier run's `results.json` alone.

use crate::console::Splat;
use crate::vm::BootEnd;
use anyhow::{Context, Result};
use pinlab_scenarios::plan::Proc;
use pinlab_scenarios::results::{CellResult, SelftestResult, StepResult, TapOutcome};
use pinlab_scenarios::spec::Scenario;
use pinlab_scenarios::{Flavor, Fs};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// One boot, for the record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BootRecord {
    /// Kernel flavor.
    pub flavor: Flavor,
    /// Filesystem.
    pub fs: Fs,
    /// `uname -r` in the guest.
    pub kernel: String,
    /// The bzImage's cache key.
    pub kernel_key: String,
    /// QEMU start to exit, seconds.
    pub wall_s: f64,
    /// QEMU start to the runner's start, seconds.
    pub to_runner_s: Option<f64>,
    /// Console log, relative to the run dir.
    pub console: String,
    /// How the boot ended; `None` if it never started.
    pub end: Option<BootEnd>,
    /// Kernel splats found on the console that no entry of
    /// `tests/expected-splats.yaml` expects: each fails the boot.
    pub splats: Vec<Splat>,
    /// Splats this flavor is expected to print there, with the reason.
    #[serde(default)]
    pub noticed: Vec<NoticedSplat>,
    /// A boot-level failure, for people (deadline, crash, missing results, selftests, fsck).
    pub failure: Option<String>,
    /// The failure was the infrastructure's (deadline, QEMU, virtiofsd,
    /// set-up), not the kernel's.
    pub infra: bool,
    /// Guest setup steps.
    pub setup: Vec<StepResult>,
    /// The end-of-boot filesystem check.
    pub fsck: Option<StepResult>,
    /// kselftest results.
    pub selftests: Vec<SelftestResult>,
}

impl BootRecord {
    /// `3 ok, 1 skipped, 0 failed`, or `—`.
    pub fn selftest_summary(&self) -> String {
        if self.selftests.is_empty() {
            return "—".into();
        }
        let count = |o: TapOutcome| self.selftests.iter().filter(|t| t.outcome == o).count();
        format!("{} ok, {} skipped, {} failed", count(TapOutcome::Ok), count(TapOutcome::Skip), count(TapOutcome::Fail))
    }
}

/// An expected splat: the kernel noticing what the scenario provoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoticedSplat {
    /// The splat.
    pub splat: Splat,
    /// Why this kernel prints it there.
    pub reason: String,
}

/// `kind at console.log:N: text`, with where the guest was if known.
pub fn splat_line(s: &Splat) -> String {
    match &s.during {
        Some(d) => format!("{} at console.log:{} ({d}): {}", s.kind, s.line, s.text),
        None => format!("{} at console.log:{}: {}", s.kind, s.line, s.text),
    }
}

/// The splat's report lines as an indented block for report.md (empty
/// when only its first line is known).
pub fn splat_report_md(s: &Splat) -> String {
    if s.report.len() <= 1 {
        return String::new();
    }
    let mut out = String::from("\n\n    ```\n");
    for l in &s.report {
        out.push_str("    ");
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("    ```");
    out
}

/// `name: outcome (detail)`.
pub fn step_line(s: &StepResult) -> String {
    format!("{}: {} ({})", s.name, s.outcome, s.detail)
}

/// What the reports say about a scenario (from its spec, so that a run's
/// reports can be made again from `results.json` alone).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioDoc {
    /// Id.
    pub id: String,
    /// Title.
    pub title: String,
    /// What a learner sees.
    pub shows: String,
    /// The story in plain words.
    pub story: String,
    /// Where the 2019 discussion argued it.
    pub reference: String,
    /// Whether it runs on each filesystem (else once per flavor).
    pub uses_fs: bool,
    /// Its steps: name and who runs it.
    pub steps: Vec<(String, Proc)>,
}

impl From<&Scenario> for ScenarioDoc {
    fn from(s: &Scenario) -> Self {
        ScenarioDoc {
            id: s.id.clone(),
            title: s.title.clone(),
            shows: s.shows.clone(),
            story: s.story.clone(),
            reference: s.reference.clone(),
            uses_fs: s.uses_fs,
            steps: s.steps.iter().map(|st| (st.name.clone(), st.by)).collect(),
        }
    }
}

/// `results.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    /// Run id (directory name).
    pub run_id: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The scenarios run, in report order.
    pub scenarios: Vec<ScenarioDoc>,
    /// Every cell compared.
    pub results: Vec<CellResult>,
    /// Every boot.
    pub boots: Vec<BootRecord>,
    /// Whole run wall time, seconds.
    pub wall_s: f64,
    /// All cells passed and no boot failed.
    pub pass: bool,
    /// The kernel source version and the exact rootfs package set used,
    /// with what drifted from the pins.
    pub provenance: crate::sources::Provenance,
}

impl RunResults {
    /// Read a run's `results.json`.
    pub fn load(path: &Path) -> Result<RunResults> {
        let text = fs_err::read_to_string(path).with_context(|| format!("Failed to read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!("{} is not a results file of this pinlab version (re-run to make one)", path.display())
        })
    }
}

/// Every report file of a run, from its results.
pub fn files(r: &RunResults) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("report.md", markdown(r).into_bytes()),
        ("report.html", crate::html::render(r).into_bytes()),
        ("junit.xml", crate::junit::junit(r).into_bytes()),
    ]
}

/// `cargo xtask report [RUN-DIR]`: the reports of an earlier run, made again
/// from its `results.json` (byte for byte what the run wrote).
pub fn rerender(run_dir: &Path) -> Result<()> {
    let r = RunResults::load(&run_dir.join("results.json"))?;
    for (name, bytes) in files(&r) {
        let p = run_dir.join(name);
        fs_err::write(&p, bytes).with_context(|| format!("Failed to write {}", p.display()))?;
        println!("{}", p.display());
    }
    println!("\n{}", table(&r));
    Ok(())
}

/// One line on what the kernels and the rootfs were made from.
pub fn provenance_line(p: &crate::sources::Provenance) -> String {
    let kernel = if p.kernel_source_pinned.is_empty() {
        format!("Kernel source: {}", p.kernel_source)
    } else if p.kernel_source == p.kernel_source_pinned {
        format!("Kernel source: Debian linux-source-6.12 {}", p.kernel_source)
    } else {
        format!(
            "Kernel source: Debian linux-source-6.12 {} (pinned {} is no longer served)",
            p.kernel_source, p.kernel_source_pinned
        )
    };
    let drift = if p.drift.is_empty() {
        "exactly as image/packages.lock".to_string()
    } else {
        let d: Vec<String> = p.drift.iter().map(|d| d.to_string()).collect();
        format!("{} drifted from image/packages.lock: {}", d.len(), d.join(", "))
    };
    format!("{kernel}. Rootfs: {} Debian 13 packages, {drift}.", p.packages.len())
}

fn cell_fs(spec: &ScenarioDoc, fs: Fs) -> String {
    if spec.uses_fs {
        fs.to_string()
    } else {
        "-".into()
    }
}

/// A cell's `locate` steps that found something: step index and the
/// sentence on where the NIC's bytes are ([`crate::blockmap::nic_sentence`]).
pub fn nic_findings(c: &CellResult) -> Vec<(usize, String)> {
    c.steps
        .iter()
        .enumerate()
        .filter_map(|(i, st)| {
            let p = st.located.as_ref().map(|l| l.placement()).or_else(|| st.placement.clone())?;
            Some((i, crate::blockmap::nic_sentence(&c.scenario, &p, st.located.as_ref())))
        })
        .collect()
}

/// The terminal table: scenario rows × (stock, patched) × (ext4, xfs)
/// columns, each cell ✓/✗ with the errno actually observed (and, when it
/// disagrees, the expected one), then the one line each scenario shows.
pub fn table(r: &RunResults) -> String {
    const W: usize = 22;
    let mut s = String::new();
    let _ = write!(s, "{:<4}", "id");
    // The three flavors specs are written for, and a debug one if it ran.
    let flavors: Vec<Flavor> =
        Flavor::ALL.into_iter().filter(|f| !f.is_debug() || r.results.iter().any(|c| c.flavor == *f)).collect();
    for &fl in &flavors {
        for fs in Fs::ALL {
            let _ = write!(s, " {:<W$}", format!("{fl}/{fs}"));
        }
    }
    s.push('\n');
    for spec in &r.scenarios {
        let _ = write!(s, "{:<4}", spec.id);
        for &fl in &flavors {
            for fs in Fs::ALL {
                let text = if !spec.uses_fs && fs != Fs::Ext4 {
                    "(no fs)".to_string()
                } else {
                    match r.results.iter().find(|c| c.scenario == spec.id && c.flavor == fl && c.fs == fs) {
                        None => "·".to_string(),
                        Some(c) if c.pass => format!("✓ {}", c.verdict()),
                        Some(c) if c.not_run.is_some() => "✗ not run".to_string(),
                        Some(c) => format!("✗ {} (want {})", c.verdict(), c.expected_verdict()),
                    }
                };
                let pad = W.saturating_sub(text.chars().count());
                let _ = write!(s, " {text}{}", " ".repeat(pad));
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "     {}", spec.shows);
        // Where the NIC's bytes were found, at each locate step of each cell.
        for c in r.results.iter().filter(|c| c.scenario == spec.id) {
            let found = nic_findings(c);
            for (i, sentence) in &found {
                let at = if found.len() > 1 { format!(" at step {}", i + 1) } else { String::new() };
                let _ = writeln!(s, "     {}/{}{at}: {sentence}", c.flavor, cell_fs(spec, c.fs));
            }
        }
        for c in r.results.iter().filter(|c| c.scenario == spec.id && !c.pass) {
            let _ = writeln!(s, "     ✗ {}/{}: {}", c.flavor, cell_fs(spec, c.fs), c.headline());
            if let Some(i) = &c.isolation {
                let _ = writeln!(s, "       isolation: {i}");
            }
        }
    }
    let _ = writeln!(s, "(✓ = the errno DESIGN.md expects; · = flavor not run; (no fs) = scenario without a filesystem, run once per kernel)");
    for b in &r.boots {
        if let Some(f) = &b.failure {
            let _ = writeln!(s, "boot {}/{} FAILED: {f}", b.flavor, b.fs);
        }
        for sp in &b.splats {
            let _ = writeln!(s, "boot {}/{} kernel splat: {}", b.flavor, b.fs, splat_line(sp));
        }
        for n in &b.noticed {
            let _ = writeln!(
                s,
                "boot {}/{} {}: the kernel noticed (expected): {}",
                b.flavor,
                b.fs,
                n.splat.scenario.as_deref().unwrap_or("-"),
                n.splat.text.trim()
            );
        }
    }
    s
}

/// `report.md`.
pub fn markdown(r: &RunResults) -> String {
    let mut s = String::new();
    let passed = r.results.iter().filter(|c| c.pass).count();
    let _ = writeln!(s, "# pinlab run {}\n", r.run_id);
    let _ = writeln!(
        s,
        "{} of {} cells as expected; accelerator `{}`; wall time {:.1} s.\n",
        passed,
        r.results.len(),
        r.accel,
        r.wall_s
    );
    let _ = writeln!(s, "{}\n", provenance_line(&r.provenance));
    let _ = writeln!(s, "| id | kernel | fs | expected | actual | | what it shows |\n|---|---|---|---|---|---|---|");
    for spec in &r.scenarios {
        for c in r.results.iter().filter(|c| c.scenario == spec.id) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                c.scenario,
                c.flavor,
                cell_fs(spec, c.fs),
                c.expected_verdict(),
                c.verdict(),
                if c.pass { "✓" } else { "✗" },
                spec.shows.replace('|', "\\|")
            );
        }
    }
    let _ = writeln!(s, "\n## Boots\n");
    for b in &r.boots {
        let _ = writeln!(
            s,
            "- **{}/{}** kernel `{}` (key {}): {:.1} s wall, runner started at {}; console `{}`{}",
            b.flavor,
            b.fs,
            b.kernel,
            b.kernel_key,
            b.wall_s,
            b.to_runner_s.map(|t| format!("{t:.1} s")).unwrap_or_else(|| "—".into()),
            b.console,
            b.failure.as_ref().map(|f| format!("\n  - **failed:** {}", f.replace('\n', " "))).unwrap_or_default()
        );
        for sp in &b.splats {
            let _ = writeln!(s, "  - **kernel splat:** `{}`{}", splat_line(sp), splat_report_md(sp));
        }
        for n in &b.noticed {
            let _ = writeln!(s, "  - the kernel noticed (expected here): `{}` — {}", splat_line(&n.splat), n.reason);
        }
        for st in &b.setup {
            let _ = writeln!(s, "  - setup: {}", step_line(st));
        }
        if let Some(f) = &b.fsck {
            let _ = writeln!(s, "  - fsck: {}", step_line(f));
        }
        for t in &b.selftests {
            let _ = writeln!(s, "  - selftest {}: {}", t.label(), t.outcome.as_str());
        }
    }
    let _ = writeln!(s, "\n## Scenarios\n");
    for spec in &r.scenarios {
        let _ = writeln!(s, "### {} — {}\n", spec.id, spec.title);
        let _ = writeln!(s, "{}\n", spec.shows);
        if !spec.story.is_empty() {
            let _ = writeln!(s, "{}\n", spec.story.trim());
        }
        if !spec.reference.is_empty() {
            let _ = writeln!(s, "*From the discussion:* {}\n", spec.reference.trim());
        }
        for c in r.results.iter().filter(|c| c.scenario == spec.id) {
            let _ = writeln!(
                s,
                "**{} / {}** — {} ({:.0} ms)\n",
                c.flavor,
                cell_fs(spec, c.fs),
                if c.pass { "as expected" } else { "NOT as expected" },
                c.ms
            );
            let _ = writeln!(s, "| step | expected | actual | detail |\n|---|---|---|---|");
            for st in &c.steps {
                let actual = if st.actual.ran() { st.actual.to_string() } else { "—".to_string() };
                let _ = writeln!(
                    s,
                    "| {} | {} | {}{} | {} |",
                    st.name,
                    st.expected,
                    actual,
                    if st.pass { "" } else { " ✗" },
                    st.detail.replace('|', "\\|").replace('\n', " ")
                );
            }
            let _ = writeln!(s);
            for (i, sentence) in nic_findings(c) {
                let _ = writeln!(s, "Where the NIC's bytes are after step {}: {sentence}\n", i + 1);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Render a saved run's reports (its `results.json` in `dir`) and compare
    /// them with the saved ones; `PINLAB_BLESS=1 cargo test -p xtask`
    /// rewrites them after a deliberate change to the rendering.
    fn reports_render_as_saved(dir: &Path) -> RunResults {
        let r = RunResults::load(&dir.join("results.json")).unwrap();
        let bless = std::env::var_os("PINLAB_BLESS").is_some();
        let mut files = files(&r);
        files.push(("table.txt", table(&r).into_bytes()));
        for (name, bytes) in files {
            let p = dir.join(name);
            if bless {
                fs_err::write(&p, &bytes).unwrap();
                continue;
            }
            let want = fs_err::read(&p).unwrap();
            assert!(
                want == bytes,
                "{name} differs from {} (PINLAB_BLESS=1 cargo test -p xtask rewrites it)",
                p.display()
            );
        }
        r
    }

    /// The reports of a saved run (a real `cargo xtask run demo`, its
    /// `results.json` in `xtask/tests/fixtures/`) must come out as saved. Its
    /// locate steps predate the block lists: the reports say where the NIC's
    /// bytes are without a picture.
    #[test]
    fn reports_render_from_a_saved_results_json() {
        let r = reports_render_as_saved(&crate::util::project_root().join("xtask/tests/fixtures"));
        // The saved run is a whole demo: three flavors, both filesystems.
        assert!(r.results.len() > 60, "{}", r.results.len());
        assert!(r.boots.iter().any(|b| !b.noticed.is_empty()), "no expected splat in the fixture");
    }

    /// A real run of S19 and S20 on hazard and patched (ext4) whose locate
    /// steps carry the blocks, their owners and the host's scan
    /// (`xtask/tests/fixtures/located/`): the block maps and their captions.
    #[test]
    fn block_maps_render_from_a_saved_results_json() {
        let dir = crate::util::project_root().join("xtask/tests/fixtures/located");
        let r = reports_render_as_saved(&dir);
        let html = crate::html::render(&r);
        // One picture per locate step with blocks: S19 has two, S20 one, on two kernels.
        assert_eq!(html.matches("<figure class=\"blockmap\"").count(), 6);
        assert!(html.contains("data-map=\"S20/hazard/ext4/8\""));
        assert!(html.contains(
            "<figcaption>The NIC&#39;s 2 MiB (512 blocks) are inside victim.dat; the host&#39;s scan of the NVDIMM agrees.</figcaption>"
        ));
        assert!(html.contains(
            "<figcaption>The NIC&#39;s 2 MiB (512 blocks) are inside S20.dat, where they belong; the host&#39;s scan of the NVDIMM agrees.</figcaption>"
        ));
        let table = table(&r);
        assert!(table.contains(
            "hazard/ext4: The NIC's 2 MiB (512 blocks) are inside victim.dat; the host's scan of the NVDIMM agrees."
        ));
        assert!(table.contains("hazard/ext4 at step 9: The NIC's 2 MiB (512 blocks) are in free blocks"));
        // What the Chromium check looks for, on this page as Chromium would
        // serialize it (quotes in text unescaped).
        let dom = html.replace("&#39;", "'").replace("&quot;", "\"");
        assert_eq!(crate::test::dom_problems(&dom, &r), Vec::<String>::new());
        // And what it finds missing when a picture or its caption is gone.
        let no_svg = dom.replacen("<svg class=\"blockmap\"", "<div class=\"x\"", 1);
        assert!(!crate::test::dom_problems(&no_svg, &r).is_empty());
        let no_caption = dom.replace("are inside victim.dat;", "are somewhere;");
        assert_eq!(
            crate::test::dom_problems(&no_caption, &r).len(),
            1,
            "{:?}",
            crate::test::dom_problems(&no_caption, &r)
        );
    }
}
