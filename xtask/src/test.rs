//! `cargo xtask test`: the unit tests of the workspace, then every scenario
//! end to end (`run demo`), failing on any mismatch. Also `clean`.

use crate::util::{self, Cache};
use crate::vm::Accel;
use anyhow::{Context, Result};
use std::process::Command;

/// Run the suite; returns whether everything passed.
pub fn run(cache: &Cache, unit_only: bool, accel: Option<Accel>) -> Result<bool> {
    crate::host::ensure(&[crate::host::Need::Demos], false)?;
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
    let latest = util::target_dir().join("runs/latest/results.json");
    let text = std::fs::read_to_string(&latest).with_context(|| format!("Failed to read {}", latest.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let cells = v["results"].as_array().map(|a| a.as_slice()).unwrap_or(&[]);
    let passed = cells.iter().filter(|c| c["pass"] == true).count();
    // The plain closing line CI reads.
    println!("scenarios: {} passed, {} failed", passed, cells.len() - passed);
    Ok(ok)
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
