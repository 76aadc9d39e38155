//! `cargo xtask test`: the unit tests of the workspace, then every scenario
//! end to end (`run demo`), failing on any mismatch. Also `clean`.

use crate::util::{self, Cache};
use crate::vm::Accel;
use anyhow::{Context, Result};
use std::process::Command;

/// Run the suite; returns whether everything passed.
pub fn run(cache: &Cache, unit_only: bool, accel: Option<Accel>) -> Result<bool> {
    crate::host::ensure(&[crate::host::Need::Demos, crate::host::Need::Test], false)?;
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(util::project_root()).args(["test", "--workspace"]);
    eprintln!("$ {}", util::show(&c));
    let unit_ok = c.status().context("Failed to run cargo test")?.success();
    if !unit_ok {
        eprintln!("unit tests failed; not starting the end-to-end scenarios");
        return Ok(false);
    }
    if unit_only {
        return Ok(true);
    }
    let ok = crate::run::run(cache, crate::run::RunOpts { demo: true, accel, ..Default::default() })?;
    let html_ok = check_report_in_browser(&util::target_dir().join("runs/latest"))?;
    let latest = util::target_dir().join("runs/latest/results.json");
    let text = std::fs::read_to_string(&latest).with_context(|| format!("Failed to read {}", latest.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let cells = v["results"].as_array().map(|a| a.as_slice()).unwrap_or(&[]);
    let passed = cells.iter().filter(|c| c["pass"] == true).count();
    // The plain closing line CI reads.
    println!("scenarios: {} passed, {} failed", passed, cells.len() - passed);
    Ok(ok && html_ok)
}

/// Render `report.html` in headless Chromium: keep a screenshot in the run
/// dir, and check the DOM Chromium built has the matrix with a row per
/// scenario and a cell per result.
fn check_report_in_browser(run_dir: &std::path::Path) -> Result<bool> {
    let html = run_dir.join("report.html").canonicalize().context("no report.html in the latest run")?;
    let url = format!("file://{}", html.display());
    let chromium = crate::util::which("chromium").context("chromium is missing (Debian package chromium)")?;
    let base = |c: &mut Command| {
        // As root Chromium needs --no-sandbox; the rest keeps it off the network.
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ]);
    };
    let profile = tempfile::tempdir()?;
    let mut shot = Command::new(&chromium);
    base(&mut shot);
    shot.arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--window-size=1300,1600")
        .arg(format!("--screenshot={}", run_dir.join("report.png").display()))
        .arg(&url);
    util::output(shot).context("Failed to screenshot report.html")?;
    let mut dump = Command::new(&chromium);
    base(&mut dump);
    dump.arg(format!("--user-data-dir={}", profile.path().display())).arg("--dump-dom").arg(&url);
    let dom = util::output(dump).context("Failed to render report.html")?;
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json"))?)?;
    let problems = dom_problems(&dom, &results);
    for p in &problems {
        eprintln!("report.html: {p}");
    }
    eprintln!(
        "report.html rendered in Chromium: {} (screenshot {})",
        if problems.is_empty() { "matrix complete" } else { "PROBLEMS" },
        run_dir.join("report.png").display()
    );
    Ok(problems.is_empty())
}

/// What is missing from the rendered DOM: the matrix table, a row per
/// scenario in results.json, and as many ✓/✗ cells as results.
pub fn dom_problems(dom: &str, results: &serde_json::Value) -> Vec<String> {
    let mut p = Vec::new();
    let Some(start) = dom.find("id=\"matrix\"") else {
        return vec!["no table with id=matrix".into()];
    };
    let table = &dom[start..dom[start..].find("</table>").map(|e| start + e).unwrap_or(dom.len())];
    let cells = results["results"].as_array().cloned().unwrap_or_default();
    let mut ids: Vec<String> = cells.iter().filter_map(|c| c["scenario"].as_str().map(String::from)).collect();
    ids.sort();
    ids.dedup();
    for id in &ids {
        if !table.contains(&format!("data-scenario=\"{id}\"")) {
            p.push(format!("the matrix has no row for {id}"));
        }
    }
    let marks = table.matches("✓").count() + table.matches("✗").count();
    if marks != cells.len() {
        p.push(format!("the matrix shows {marks} result cells, results.json has {}", cells.len()));
    }
    p
}

/// `cargo xtask clean [--all]`.
pub fn clean(cache: &Cache, all: bool) -> Result<()> {
    let mut dirs = vec!["kernels", "rootfs", "build", "trees"];
    if all {
        dirs.extend(["debs", "src", "apt", "tools", "ccache"]);
    }
    for d in dirs {
        let p = cache.root.join(d);
        if p.exists() {
            eprintln!("removing {}", p.display());
            std::fs::remove_dir_all(&p).with_context(|| format!("Failed to remove {}", p.display()))?;
        }
    }
    let t = util::target_dir();
    if t.exists() {
        eprintln!("removing {}", t.display());
        std::fs::remove_dir_all(&t).with_context(|| format!("Failed to remove {}", t.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::dom_problems;

    #[test]
    fn dom_check() {
        let results = serde_json::json!({"results": [{"scenario": "S01"}, {"scenario": "S02"}]});
        let good = "<table id=\"matrix\"><tr data-scenario=\"S01\"><td>✓ ok</td></tr><tr data-scenario=\"S02\"><td>✗ EPERM</td></tr></table>";
        assert!(dom_problems(good, &results).is_empty());
        assert_eq!(dom_problems("<p>nothing</p>", &results).len(), 1);
        let short = "<table id=\"matrix\"><tr data-scenario=\"S01\"><td>✓ ok</td></tr></table>";
        assert_eq!(dom_problems(short, &results).len(), 2);
    }
}
