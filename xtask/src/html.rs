//! `report.html` (one self-contained page a learner can read on its own: no
//! scripts, fonts or images fetched from anywhere).

use crate::report::RunResults;
use pinlab_scenarios::plan::Proc;
use pinlab_scenarios::results::CellResult;
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
.summary{font-size:1.1em;padding:.5em .8em;border-radius:4px}.pass{background:#e6f6e6}.fail{background:#fbe3e3}\
figure.blockmap{margin:1em 0 1.4em}figure.blockmap svg{max-width:100%;height:auto;display:block}\
.maplabel{margin:.2em 0}figcaption{font-weight:600;margin-top:.2em}";

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
                format!("<br><span class=\"small\">expected {}</span>", esc(c.expected_verdict().as_str()))
            };
            format!(
                "<td class=\"{class}\" colspan=\"{colspan}\"{title}>{mark} <span class=\"mono\">{}</span>{extra}</td>",
                esc(c.verdict().as_str())
            )
        }
    }
}

/// The whole page.
pub fn render(r: &RunResults) -> String {
    let mut s = String::new();
    let passed = r.results.iter().filter(|c| c.pass).count();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>pinlab run {id}</title><style>{CSS}</style></head><body>\n\
         <h1>pinlab: RDMA pins on FS-DAX, what each Linux 6.12 kernel answers</h1>\n\
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
    matrix(&mut s, r);
    scenarios(&mut s, r);
    boots(&mut s, r);
    s.push_str("<p class=\"small\">Made by pinlab (<code>cargo xtask run demo</code>). Expected outcomes are the data in tests/scenarios/*.yaml; actual outcomes are the errno or bytes the guest observed.</p>\n</body></html>\n");
    s
}

/// The matrix: a row per scenario, a cell per flavor and filesystem.
fn matrix(s: &mut String, r: &RunResults) {
    let _ = write!(
        s,
        "<h2>The matrix</h2>\n<p class=\"small\">Each cell: what the kernel answered at the step that decides the scenario \
         (✓ = as DESIGN.md expects). Scenarios without a filesystem run once per kernel.</p>\n\
         <table id=\"matrix\"><thead><tr><th rowspan=\"2\">scenario</th>"
    );
    // The flavors this run has cells for, in report order.
    let flavors: Vec<Flavor> = Flavor::ALL.into_iter().filter(|f| r.results.iter().any(|c| c.flavor == *f)).collect();
    for fl in &flavors {
        let label = match fl {
            Flavor::Stock => "stock 6.12",
            Flavor::Patched => "patched 6.12",
            Flavor::Hazard => "hazard (teaching kernel)",
            Flavor::StockDebug => "stock-debug (stock + KASAN, lockdep)",
            Flavor::Debug => "debug (patched + KASAN, lockdep)",
        };
        let _ = write!(s, "<th colspan=\"2\">{label}</th>");
    }
    s.push_str("</tr>\n<tr>");
    for _ in &flavors {
        s.push_str("<th>ext4</th><th>xfs</th>");
    }
    s.push_str("</tr></thead><tbody>\n");
    for sp in &r.scenarios {
        let _ = write!(
            s,
            "<tr data-scenario=\"{id}\"><td><a href=\"#{id}\"><b>{id}</b></a> {title}</td>",
            id = esc(&sp.id),
            title = esc(&sp.title)
        );
        for &fl in &flavors {
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
}

/// Per scenario: the story, then each cell's timeline of steps by process.
fn scenarios(s: &mut String, r: &RunResults) {
    s.push_str("<h2>The scenarios</h2>\n");
    for sp in &r.scenarios {
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
        block_maps(s, r, &sp.id);
        let procs: Vec<Proc> = {
            let mut v: Vec<Proc> = sp.steps.iter().map(|(_, by)| *by).collect();
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
            for (i, (st, (_, by))) in c.steps.iter().zip(&sp.steps).enumerate() {
                let class = if !st.actual.ran() && !st.expected.ran() {
                    "none"
                } else if st.pass {
                    "ok"
                } else {
                    "bad"
                };
                let _ = write!(s, "<tr><td>{}</td>", i + 1);
                for p in &procs {
                    if p == by {
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
                let where_ = |p: &Option<pinlab_scenarios::results::Placement>| {
                    p.as_ref()
                        .map(|p| {
                            format!(
                                "<br><span class=\"small\">{}</span>",
                                esc(&pinlab_scenarios::results::placement_text(p))
                            )
                        })
                        .unwrap_or_default()
                };
                let _ = writeln!(
                    s,
                    "<td class=\"mono\">{}{}</td><td class=\"{class} mono\">{}{}</td></tr>",
                    esc(st.expected.as_str()),
                    where_(&st.expected_placement),
                    esc(st.actual.as_str()),
                    where_(&st.placement)
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
}

/// Where each cell's `locate` steps found the NIC's bytes: a block map per
/// step (when the record has the blocks) with the sentence every report says.
fn block_maps(s: &mut String, r: &RunResults, id: &str) {
    let mut figs = String::new();
    for c in r.results.iter().filter(|c| c.scenario == id) {
        for (i, sentence) in crate::report::nic_findings(c) {
            let st = &c.steps[i];
            let label = format!("{} / {} · step {}: {}", c.flavor, c.fs, i + 1, st.name);
            let Some(l) = &st.located else {
                let _ = writeln!(
                    figs,
                    "<p class=\"maplabel\"><b>{}</b><br>{} <span class=\"small\">(this record has no block list, so no picture)</span></p>",
                    esc(&label),
                    esc(&sentence)
                );
                continue;
            };
            let _ = writeln!(
                figs,
                "<figure class=\"blockmap\" data-map=\"{}/{}/{}/{}\"><p class=\"maplabel\"><b>{}</b></p>\n{}\n<figcaption>{}</figcaption></figure>",
                esc(id),
                c.flavor,
                c.fs,
                i + 1,
                esc(&label),
                crate::blockmap::svg(id, l, &format!("Block map of {}, {label}. {sentence}", l.device)),
                esc(&sentence)
            );
        }
    }
    if figs.is_empty() {
        return;
    }
    if !figs.contains("<figure") {
        let _ = write!(s, "<h4>Where the NIC's bytes landed</h4>\n{figs}");
        return;
    }
    let _ = write!(
        s,
        "<h4>Where the NIC's bytes landed, block by block</h4>\n<p class=\"small\">Each picture is the fsdax namespace as \
         the guest read it raw after the step: every 4 KiB block colored by the file that owns it (FIEMAP; light grey: \
         free). The top strip is the whole device; the box on it is the part zoomed in below, where each cell stands \
         for a few blocks and takes the color of the file owning most of them. Red marks the blocks that carry the \
         NIC's bytes (the client's RDMA WRITE pattern); the thin lane under the zoom is what the host found in the \
         NVDIMM's backing file on its own; the blue bracket shows the blocks of the file the scenario registered with \
         the NIC. Hover a part for its block numbers.</p>\n{figs}"
    );
}

/// The boots: kernel, timings, fsck, selftests, problems.
fn boots(s: &mut String, r: &RunResults) {
    s.push_str("<h2>The boots</h2>\n<table><tr><th>kernel / fs</th><th>uname -r</th><th>wall</th><th>to runner</th><th>fsck</th><th>selftests</th><th>console</th><th>problems</th></tr>\n");
    for b in &r.boots {
        let mut problems: Vec<String> =
            b.failure.iter().cloned().chain(b.splats.iter().map(crate::report::splat_line)).collect();
        let noticed: Vec<String> = b
            .noticed
            .iter()
            .map(|n| {
                format!(
                    "the kernel noticed ({}): {} — {}",
                    n.splat.scenario.as_deref().unwrap_or("-"),
                    n.splat.text.trim(),
                    n.reason
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "<tr><td>{}/{}</td><td class=\"mono\">{}</td><td>{:.1} s</td><td>{}</td><td class=\"small\">{}</td><td class=\"small\">{}</td><td><a href=\"{c}\">{c}</a></td><td class=\"{}\">{}</td></tr>",
            b.flavor,
            b.fs,
            esc(&b.kernel),
            b.wall_s,
            b.to_runner_s.map(|t| format!("{t:.1} s")).unwrap_or_else(|| "—".into()),
            esc(&b.fsck.as_ref().map(crate::report::step_line).unwrap_or_else(|| "—".into())),
            b.selftest_summary(),
            if problems.is_empty() { "ok" } else { "bad" },
            if problems.is_empty() && noticed.is_empty() {
                "none".to_string()
            } else {
                problems.append(&mut noticed.clone());
                let reports: String = b
                    .splats
                    .iter()
                    .filter(|sp| sp.report.len() > 1)
                    .map(|sp| {
                        format!(
                            "<details><summary>{} report (console.log:{})</summary><pre>{}</pre></details>",
                            esc(sp.kind.name()),
                            sp.line,
                            esc(&sp.report.join("\n"))
                        )
                    })
                    .collect();
                format!("{}{reports}", esc(&problems.join("; ")))
            },
            c = esc(&b.console)
        );
    }
    s.push_str("</table>\n");
}
