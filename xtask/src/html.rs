//! `report.html` (one self-contained page a learner can read on its own: no
//! scripts, fonts or images fetched from anywhere) and `junit.xml`.

use crate::report::RunResults;
use pinlab_scenarios::plan::Proc;
use pinlab_scenarios::results::{CellResult, NOT_RUN};
use pinlab_scenarios::spec::Scenario;
use pinlab_scenarios::{Flavor, Fs};
use std::fmt::Write as _;

/// Escape text for HTML and XML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

const PROBLEM: &str = "RDMA lets a network card write straight into a program's memory for hours after the program \
registers it (ibv_reg_mr pins the pages). On persistent memory with a filesystem mounted -o dax there is no page \
cache: the pinned pages are the file's own blocks. If the file is truncated or a hole is punched, the filesystem \
frees those blocks and may give them to another file while the card still writes into them - silent corruption. \
Since 2017 Linux refuses such registrations (EOPNOTSUPP). In 2019 Ira Weiny proposed to allow them safely: the \
application takes an exclusive layout lease on the file, and while pages are pinned, truncate and hole punch fail \
with ETXTBSY instead of corrupting data; pins are tracked to the RDMA context that owns them and shown in \
/proc/&lt;pid&gt;/file_pins. Below, each scenario of that discussion runs on a stock Linux 6.12 kernel and on one \
carrying pinlab's forward port of the series, on ext4 and xfs, and shows what each kernel answered.";

const CSS: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}\
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{margin-top:1.6em}\
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .55em;vertical-align:top}\
th{background:#f3f3f3;text-align:left}.ok{background:#e6f6e6}.bad{background:#fbe3e3;font-weight:bold}\
.none{color:#999;background:#fafafa}code,.mono{font-family:ui-monospace,monospace;font-size:.92em}\
.small{font-size:.85em;color:#555}details{margin:.2em 0}.proc{font-weight:600}.shows{font-style:italic}\
.summary{font-size:1.1em;padding:.5em .8em;border-radius:4px}.pass{background:#e6f6e6}.fail{background:#fbe3e3}";

fn cell<'a>(r: &'a RunResults, id: &str, flavor: Flavor, fs: Fs) -> Option<&'a CellResult> {
    r.results.iter().find(|c| c.scenario == id && c.flavor == flavor && c.fs == fs)
}

fn cell_html(c: Option<&CellResult>, colspan: usize) -> String {
    match c {
        None => format!("<td class=\"none\" colspan=\"{colspan}\">not run</td>"),
        Some(c) => {
            let (class, mark) = if c.pass { ("ok", "✓") } else { ("bad", "✗") };
            let title = if c.pass { String::new() } else { format!(" title=\"{}\"", esc(&c.headline())) };
            let extra = if c.pass {
                String::new()
            } else {
                format!("<br><span class=\"small\">expected {}</span>", esc(&c.expected_verdict()))
            };
            format!(
                "<td class=\"{class}\" colspan=\"{colspan}\"{title}>{mark} <span class=\"mono\">{}</span>{extra}</td>",
                esc(&c.verdict())
            )
        }
    }
}

/// The whole page.
pub fn render(specs: &[Scenario], r: &RunResults) -> String {
    let mut s = String::new();
    let passed = r.results.iter().filter(|c| c.pass).count();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>pinlab run {id}</title><style>{CSS}</style></head><body>\n\
         <h1>pinlab: RDMA pins on FS-DAX, stock vs patched Linux 6.12</h1>\n\
         <p class=\"summary {cls}\" id=\"summary\">{passed} of {n} cells as expected · run <span class=\"mono\">{id}</span> · accelerator {accel} · {wall:.0} s</p>\n\
         <p class=\"small\" id=\"provenance\">{prov}</p>\n\
         <h2>The problem</h2>\n<p>{PROBLEM}</p>\n",
        prov = esc(&crate::report::provenance_line(&r.provenance)),
        id = esc(&r.run_id),
        cls = if r.pass { "pass" } else { "fail" },
        n = r.results.len(),
        accel = esc(&r.accel),
        wall = r.wall_s
    );
    // The matrix.
    let _ = write!(
        s,
        "<h2>The matrix</h2>\n<p class=\"small\">Each cell: what the kernel answered at the step that decides the scenario \
         (✓ = as DESIGN.md expects). Scenarios without a filesystem run once per kernel.</p>\n\
         <table id=\"matrix\"><thead><tr><th rowspan=\"2\">scenario</th><th colspan=\"2\">stock 6.12</th><th colspan=\"2\">patched 6.12</th></tr>\
         <tr><th>ext4</th><th>xfs</th><th>ext4</th><th>xfs</th></tr></thead><tbody>\n"
    );
    for sp in specs {
        let _ = write!(
            s,
            "<tr data-scenario=\"{id}\"><td><a href=\"#{id}\"><b>{id}</b></a> {title}</td>",
            id = esc(&sp.id),
            title = esc(&sp.title)
        );
        for fl in Flavor::ALL {
            if sp.uses_fs {
                for fs in Fs::ALL {
                    s.push_str(&cell_html(cell(r, &sp.id, fl, fs), 1));
                }
            } else {
                s.push_str(&cell_html(cell(r, &sp.id, fl, Fs::Ext4), 2));
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody></table>\n");

    // Per scenario.
    s.push_str("<h2>The scenarios</h2>\n");
    for sp in specs {
        let _ = write!(
            s,
            "<section id=\"{id}\"><h3>{id} — {title}</h3>\n<p class=\"shows\">{shows}</p>\n<p>{story}</p>\n",
            id = esc(&sp.id),
            title = esc(&sp.title),
            shows = esc(&sp.shows),
            story = esc(sp.story.trim()).replace("\n\n", "</p><p>")
        );
        if !sp.reference.is_empty() {
            let _ = writeln!(s, "<p class=\"small\"><b>From the 2019 discussion:</b> {}</p>", esc(sp.reference.trim()));
        }
        let procs: Vec<Proc> = {
            let mut v: Vec<Proc> = sp.steps.iter().map(|st| st.by).collect();
            v.sort();
            v.dedup();
            v
        };
        for c in r.results.iter().filter(|c| c.scenario == sp.id) {
            let _ = writeln!(
                s,
                "<details{open}><summary><b>{fl} / {fs}</b>: {mark} {head} <span class=\"small\">({ms:.0} ms)</span></summary>",
                open = if c.pass { "" } else { " open" },
                fl = c.flavor,
                fs = if sp.uses_fs { c.fs.to_string() } else { "no filesystem".into() },
                mark = if c.pass { "✓" } else { "✗" },
                head = esc(&c.headline()),
                ms = c.ms
            );
            s.push_str("<table class=\"timeline\"><tr><th>#</th>");
            for p in &procs {
                let _ = write!(s, "<th>{}</th>", p.name());
            }
            s.push_str("<th>expected</th><th>actual</th></tr>\n");
            for (i, (st, spec_step)) in c.steps.iter().zip(&sp.steps).enumerate() {
                let class = if st.actual == NOT_RUN && st.expected == NOT_RUN {
                    "none"
                } else if st.pass {
                    "ok"
                } else {
                    "bad"
                };
                let _ = write!(s, "<tr><td>{}</td>", i + 1);
                for p in &procs {
                    if *p == spec_step.by {
                        let detail = if st.detail.is_empty() {
                            String::new()
                        } else {
                            format!("<details><summary class=\"small\">what the kernel said</summary><pre class=\"mono small\">{}</pre></details>", esc(&st.detail))
                        };
                        let _ = write!(s, "<td><span class=\"proc\">{}</span>{detail}</td>", esc(&st.name));
                    } else {
                        s.push_str("<td></td>");
                    }
                }
                let _ = writeln!(
                    s,
                    "<td class=\"mono\">{}</td><td class=\"{class} mono\">{}</td></tr>",
                    esc(&st.expected),
                    esc(&st.actual)
                );
            }
            s.push_str("</table>\n");
            if let Some(iso) = &c.isolation {
                let _ = writeln!(s, "<p class=\"bad\">Isolation check failed: {}</p>", esc(iso));
            }
            s.push_str("</details>\n");
        }
        s.push_str("</section>\n");
    }

    // Boots.
    s.push_str("<h2>The boots</h2>\n<table><tr><th>kernel / fs</th><th>uname -r</th><th>wall</th><th>to runner</th><th>fsck</th><th>selftests</th><th>console</th><th>problems</th></tr>\n");
    for b in &r.boots {
        let problems: Vec<String> = b.failure.iter().cloned().chain(b.splats.iter().cloned()).collect();
        let _ = writeln!(
            s,
            "<tr><td>{}/{}</td><td class=\"mono\">{}</td><td>{:.1} s</td><td>{}</td><td class=\"small\">{}</td><td class=\"small\">{}</td><td><a href=\"{c}\">{c}</a></td><td class=\"{}\">{}</td></tr>",
            b.flavor,
            b.fs,
            esc(&b.kernel),
            b.wall_s,
            b.to_runner_s.map(|t| format!("{t:.1} s")).unwrap_or_else(|| "—".into()),
            esc(b.fsck.as_deref().unwrap_or("—")),
            {
                let count = |o: &str| b.selftests.iter().filter(|t| t.ends_with(&format!(": {o}"))).count();
                if b.selftests.is_empty() {
                    "—".to_string()
                } else {
                    format!("{} ok, {} skipped, {} failed", count("ok"), count("skip"), count("fail"))
                }
            },
            if problems.is_empty() { "ok" } else { "bad" },
            if problems.is_empty() { "none".to_string() } else { esc(&problems.join("; ")) },
            c = esc(&b.console)
        );
    }
    s.push_str("</table>\n<p class=\"small\">Made by pinlab (<code>cargo xtask run demo</code>). Expected outcomes are the data in tests/scenarios/*.yaml; actual outcomes are the errno or bytes the guest observed.</p>\n</body></html>\n");
    s
}

/// `junit.xml`: one testcase per scenario × flavor × filesystem.
pub fn junit(specs: &[Scenario], r: &RunResults) -> String {
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
        let title = specs.iter().find(|sp| sp.id == c.scenario).map(|sp| sp.title.as_str()).unwrap_or("");
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
    use pinlab_scenarios::results::StepCheck;

    fn cell(flavor: Flavor, fs: Fs, pass: bool, not_run: Option<&str>) -> CellResult {
        CellResult {
            scenario: "S02".into(),
            flavor,
            fs,
            pass,
            steps: vec![StepCheck {
                name: "reg".into(),
                expected: "EPERM".into(),
                actual: if pass { "EPERM".into() } else { "ok".into() },
                detail: String::new(),
                pass,
                ms: 1.0,
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
            splats: vec![],
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
        let x = junit(&[], &r);
        assert!(x.contains("tests=\"3\" failures=\"1\" errors=\"1\""), "{x}");
        assert!(x.contains("<failure message=\"reg: expected EPERM, got ok\">"), "{x}");
        assert!(x.contains("<error message=\"not run: watchdog: no progress for 1m00s\">"), "{x}");
        assert!(!x.contains("got missing"), "{x}");
    }
}
