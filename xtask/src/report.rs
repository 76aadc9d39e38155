//! Reports of a run: `results.json`, `report.md`, and the terminal table.

use pinlab_scenarios::results::{CellResult, NOT_RUN};
use pinlab_scenarios::spec::Scenario;
use pinlab_scenarios::{Flavor, Fs};
use serde::Serialize;
use std::fmt::Write as _;

/// One boot, for the record.
#[derive(Clone, Debug, Serialize)]
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
    /// Kernel splats found on the console (`kind: line`).
    pub splats: Vec<String>,
    /// A boot-level failure (deadline, crash, missing results).
    pub failure: Option<String>,
    /// The failure was the infrastructure's (deadline, QEMU, virtiofsd,
    /// set-up), not the kernel's.
    #[serde(default)]
    pub infra: bool,
    /// Guest setup steps: `name: outcome (detail)`.
    pub setup: Vec<String>,
    /// The end-of-boot filesystem check: `name: outcome (detail)`.
    pub fsck: Option<String>,
    /// kselftest results: `name: ok|skip|fail`.
    pub selftests: Vec<String>,
}

/// `results.json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunResults {
    /// Run id (directory name).
    pub run_id: String,
    /// `kvm` or `tcg`.
    pub accel: String,
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
    #[serde(default)]
    pub provenance: crate::sources::Provenance,
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

fn cell_fs(spec: &Scenario, fs: Fs) -> String {
    if spec.uses_fs {
        fs.to_string()
    } else {
        "-".into()
    }
}

/// The terminal table: scenario rows × (stock, patched) × (ext4, xfs)
/// columns, each cell ✓/✗ with the errno actually observed (and, when it
/// disagrees, the expected one), then the one line each scenario shows.
pub fn table(specs: &[Scenario], r: &RunResults) -> String {
    const W: usize = 22;
    let mut s = String::new();
    let _ = write!(s, "{:<4}", "id");
    for fl in Flavor::ALL {
        for fs in Fs::ALL {
            let _ = write!(s, " {:<W$}", format!("{fl}/{fs}"));
        }
    }
    s.push('\n');
    for spec in specs {
        let _ = write!(s, "{:<4}", spec.id);
        for fl in Flavor::ALL {
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
            let _ = writeln!(s, "boot {}/{} kernel splat: {sp}", b.flavor, b.fs);
        }
    }
    s
}

/// `report.md`.
pub fn markdown(specs: &[Scenario], r: &RunResults) -> String {
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
    for spec in specs {
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
            let _ = writeln!(s, "  - **kernel splat:** `{sp}`");
        }
        for st in &b.setup {
            let _ = writeln!(s, "  - setup: {st}");
        }
        if let Some(f) = &b.fsck {
            let _ = writeln!(s, "  - fsck: {f}");
        }
        for t in &b.selftests {
            let _ = writeln!(s, "  - selftest {t}");
        }
    }
    let _ = writeln!(s, "\n## Scenarios\n");
    for spec in specs {
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
                let actual = if st.actual == NOT_RUN { "—".to_string() } else { st.actual.clone() };
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
        }
    }
    s
}
