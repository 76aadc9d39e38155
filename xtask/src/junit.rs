//! `junit.xml`: the matrix for CI systems.

use crate::html::esc;
use crate::report::RunResults;
use pinlab_scenarios::results::CellResult;
use std::fmt::Write as _;

/// `junit.xml`: one testcase per scenario × flavor × filesystem.
pub fn junit(r: &RunResults) -> String {
    // A cell whose boot died (deadline, crash, QEMU failing) is an <error>:
    // the test could not give its answer. A wrong answer is a <failure>.
    let boot_failure = |c: &CellResult| -> Option<String> {
        if let Some(why) = &c.not_run {
            return Some(format!("not run: {why}"));
        }
        // Only the infrastructure's failures: a splat, a failed selftest or
        // fsck is the kernel's answer, reported as a <failure>.
        r.boots.iter().find(|b| b.flavor == c.flavor && b.fs == c.fs && b.infra).and_then(|b| b.failure.clone())
    };
    let errors = r.results.iter().filter(|c| !c.pass && boot_failure(c).is_some()).count();
    let failures = r.results.iter().filter(|c| !c.pass).count() - errors;
    let mut s = String::new();
    let _ = writeln!(s, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let _ = writeln!(
        s,
        "<testsuites name=\"pinlab\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{:.3}\">",
        r.results.len(),
        r.wall_s
    );
    let _ = writeln!(
        s,
        "  <testsuite name=\"pinlab.{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\">",
        esc(&r.run_id),
        r.results.len()
    );
    for c in &r.results {
        let title = r.scenarios.iter().find(|sp| sp.id == c.scenario).map(|sp| sp.title.as_str()).unwrap_or("");
        let _ = write!(
            s,
            "    <testcase classname=\"pinlab.{}.{}\" name=\"{} {}\" time=\"{:.3}\"",
            c.flavor,
            c.fs,
            esc(&c.scenario),
            esc(title),
            c.ms / 1000.0
        );
        if c.pass {
            s.push_str("/>\n");
        } else if let Some(why) = boot_failure(c) {
            let _ = writeln!(
                s,
                ">\n      <error message=\"{}\">{}</error>\n    </testcase>",
                esc(why.lines().next().unwrap_or("")),
                esc(&why)
            );
        } else {
            let body: Vec<String> = c
                .steps
                .iter()
                .map(|st| {
                    format!(
                        "{} {}: expected {}, got {} ({})",
                        if st.pass { "ok  " } else { "FAIL" },
                        st.name,
                        st.expected,
                        st.actual,
                        st.detail
                    )
                })
                .chain(c.isolation.iter().map(|i| format!("isolation: {i}")))
                .collect();
            let _ = writeln!(
                s,
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                esc(&c.headline()),
                esc(&body.join("\n"))
            );
        }
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::BootRecord;
    use pinlab_scenarios::protocol::StepOutcome;
    use pinlab_scenarios::results::StepCheck;
    use pinlab_scenarios::{Flavor, Fs};

    fn cell(flavor: Flavor, fs: Fs, pass: bool, not_run: Option<&str>) -> CellResult {
        CellResult {
            scenario: "S02".into(),
            flavor,
            fs,
            pass,
            steps: vec![StepCheck {
                name: "reg".into(),
                expected: StepOutcome::Errno("EPERM".into()),
                actual: if pass { StepOutcome::Errno("EPERM".into()) } else { StepOutcome::Ok },
                detail: String::new(),
                pass,
                ms: 1.0,
                expected_placement: None,
                placement: None,
                located: None,
                headline: false,
                probe: false,
            }],
            ms: 1.0,
            isolation: None,
            not_run: not_run.map(String::from),
        }
    }

    fn boot(flavor: Flavor, fs: Fs, failure: Option<&str>) -> BootRecord {
        BootRecord {
            flavor,
            fs,
            kernel: String::new(),
            kernel_key: String::new(),
            wall_s: 0.0,
            to_runner_s: None,
            console: String::new(),
            end: None,
            splats: vec![],
            noticed: vec![],
            failure: failure.map(String::from),
            infra: failure.is_some(),
            setup: vec![],
            fsck: None,
            selftests: vec![],
        }
    }

    #[test]
    fn junit_tells_a_dead_boot_from_a_wrong_answer() {
        let r = RunResults {
            run_id: "x".into(),
            accel: "tcg".into(),
            scenarios: vec![],
            results: vec![
                cell(Flavor::Stock, Fs::Ext4, true, None),
                cell(Flavor::Patched, Fs::Ext4, false, None),
                cell(Flavor::Patched, Fs::Xfs, false, Some("watchdog: no progress for 1m00s")),
            ],
            boots: vec![
                boot(Flavor::Stock, Fs::Ext4, None),
                boot(Flavor::Patched, Fs::Ext4, None),
                boot(Flavor::Patched, Fs::Xfs, Some("watchdog: no progress for 1m00s")),
            ],
            wall_s: 1.0,
            pass: false,
            provenance: Default::default(),
        };
        let x = junit(&r);
        assert!(x.contains("tests=\"3\" failures=\"1\" errors=\"1\""), "{x}");
        assert!(x.contains("<failure message=\"reg: expected EPERM, got ok\">"), "{x}");
        assert!(x.contains("<error message=\"not run: watchdog: no progress for 1m00s\">"), "{x}");
        assert!(!x.contains("got missing"), "{x}");
    }
}
