//! Where on the fsdax namespace the NIC's bytes are, from a `locate` step's
//! record: one sentence (the terminal table, `--explain`, report.md and the
//! caption in report.html all say it with [`nic_sentence`]) and a picture
//! (inline SVG in report.html, [`svg`]).

use crate::html::esc;
use pinlab_scenarios::results::{Located, Placement, Run};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The oracle's block size (the pattern is laid out in 4 KiB blocks).
pub const BLOCK: u64 = pinlab_scenarios::plan::PATTERN_BLOCK;

/// The file a scenario registers with the NIC (its first mapped file).
pub fn pinned_file(scenario: &str) -> String {
    format!("{scenario}.dat")
}

/// `2 MiB`, `12 KiB`: a number of 4 KiB blocks as bytes.
pub fn size_of_blocks(blocks: u64) -> String {
    let bytes = blocks * BLOCK;
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// `262,144`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The one sentence on where a `locate` step found the NIC's bytes, and
/// whether the host's own scan of the NVDIMM agrees, e.g. "The NIC's 2 MiB
/// (512 blocks) are inside victim.dat; the host's scan of the NVDIMM
/// agrees." `placement` is the guest's finding by owner; `located` the
/// block-level record (absent in results made before the host scanned).
pub fn nic_sentence(scenario: &str, placement: &Placement, located: Option<&Located>) -> String {
    let pinned = pinned_file(scenario);
    let total: u64 = placement.values().sum();
    let what = format!("The NIC's {} ({} blocks)", size_of_blocks(total), thousands(total));
    let place = |f: &str| {
        if f == "free" {
            "in free blocks, owned by no file".to_string()
        } else {
            format!("inside {f}")
        }
    };
    let mut s = match placement.len() {
        _ if total == 0 => "No block of the namespace carries the NIC's bytes".to_string(),
        1 => {
            let (f, _) = placement.iter().next().expect("one entry");
            if *f == pinned {
                format!("{what} are {}, where they belong", place(f))
            } else {
                format!("{what} are {}", place(f))
            }
        }
        _ => {
            // The registered file first, free blocks last, the rest by name.
            let mut parts: Vec<(&String, &u64)> = placement.iter().collect();
            parts.sort_by_key(|(f, _)| (**f != pinned, *f == "free"));
            let parts: Vec<String> = parts
                .iter()
                .map(|(f, n)| match f.as_str() {
                    "free" => format!("{} in free blocks", thousands(**n)),
                    f => format!("{} inside {f}", thousands(**n)),
                })
                .collect();
            format!("{what} are in {} places: {}", placement.len(), parts.join(", "))
        }
    };
    s.push_str("; ");
    s.push_str(&host_clause(located));
    s.push('.');
    s
}

/// Whether the host's scan of the NVDIMM backing file saw the same blocks.
fn host_clause(located: Option<&Located>) -> String {
    let Some(l) = located else {
        return "no scan by the host was recorded".into();
    };
    match l.host_agrees() {
        Ok(()) => "the host's scan of the NVDIMM agrees".into(),
        Err(e) if l.host.as_ref().is_some_and(|h| h.error.is_none()) => {
            format!("the host's scan of the NVDIMM DISAGREES: {e}")
        }
        Err(e) => format!("no check by the host: {e}"),
    }
}

/// A stretch of the device owned by one file: blocks `[start, end)`, `owner`
/// an index into [`Located::owners`] (in name order). Where files share
/// blocks (reflinks) the first name owns them, as [`Located::owner_of`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    start: u64,
    end: u64,
    owner: usize,
}

/// Every owned block as sorted, disjoint stretches.
fn segments(l: &Located) -> Vec<Seg> {
    // (where, starts here, owner); at one block, ends sort before starts.
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, runs) in l.owners.values().enumerate() {
        for r in runs.iter().filter(|r| r.len > 0) {
            events.push((r.start, true, i));
            events.push((r.end(), false, i));
        }
    }
    events.sort_unstable();
    let mut active: BTreeMap<usize, u32> = BTreeMap::new();
    let mut out: Vec<Seg> = Vec::new();
    let mut prev = 0;
    for (at, starts, i) in events {
        if at > prev {
            if let Some((&owner, _)) = active.first_key_value() {
                match out.last_mut() {
                    Some(last) if last.end == prev && last.owner == owner => last.end = at,
                    _ => out.push(Seg { start: prev, end: at, owner }),
                }
            }
        }
        prev = at;
        if starts {
            *active.entry(i).or_default() += 1;
        } else if let Some(n) = active.get_mut(&i) {
            *n -= 1;
            if *n == 0 {
                active.remove(&i);
            }
        }
    }
    out
}

/// The part of the device a strip shows: `per` blocks a cell from `start`
/// up to `end` (the last cell is shorter when the device ends inside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First block shown.
    pub start: u64,
    /// The block after the last one shown.
    pub end: u64,
    /// Blocks per cell.
    pub per: u64,
}

impl Window {
    /// How many cells.
    pub fn cells(&self) -> u64 {
        (self.end - self.start).div_ceil(self.per)
    }
}

/// One cell of a strip: how many of its blocks each file owns, and how many
/// carry the NIC's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// Its first block.
    pub start: u64,
    /// The block after its last.
    pub end: u64,
    /// Blocks per owner, indexed as [`Located::owners`], and free blocks last.
    pub counts: Vec<u64>,
    /// Blocks where the guest's raw read found the NIC's bytes.
    pub nic: u64,
    /// Blocks where the host's scan of the NVDIMM found them.
    pub host: u64,
}

impl Cell {
    /// The owner of most of the cell's blocks (an index into `counts`: the
    /// last is free). On a tie the file first in name order wins, and any
    /// file wins over free blocks.
    pub fn majority(&self) -> usize {
        let mut best = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            if n > self.counts[best] {
                best = i;
            }
        }
        best
    }
}

/// Blocks in `[start, end)` of the device that sorted, disjoint `spans` cover,
/// added to the cells they fall in with `add`.
fn spread(w: &Window, cells: &mut [Cell], spans: impl IntoIterator<Item = (u64, u64)>, add: impl Fn(&mut Cell, u64)) {
    for (s, e) in spans {
        let (s, e) = (s.max(w.start), e.min(w.end));
        if s >= e {
            continue;
        }
        let first = (s - w.start) / w.per;
        let last = (e - 1 - w.start) / w.per;
        for c in &mut cells[first as usize..=last as usize] {
            let n = e.min(c.end) - s.max(c.start);
            add(c, n);
        }
    }
}

/// Bin the device blocks of `w` into cells of `w.per` blocks.
pub fn cells(l: &Located, w: &Window) -> Vec<Cell> {
    let owners = l.owners.len();
    let mut cells: Vec<Cell> = (0..w.cells())
        .map(|i| {
            let start = w.start + i * w.per;
            Cell { start, end: (start + w.per).min(w.end), counts: vec![0; owners + 1], nic: 0, host: 0 }
        })
        .collect();
    let segs = segments(l);
    for seg in &segs {
        spread(w, &mut cells, [(seg.start, seg.end)], |c, n| c.counts[seg.owner] += n);
    }
    for c in &mut cells {
        let owned: u64 = c.counts[..owners].iter().sum();
        c.counts[owners] = (c.end - c.start).saturating_sub(owned);
    }
    spread(w, &mut cells, l.nic.iter().map(|r| (r.start, r.end())), |c, n| c.nic += n);
    if let Some(h) = l.host.as_ref().filter(|h| h.error.is_none()) {
        spread(w, &mut cells, h.nic.iter().map(|r| (r.start, r.end())), |c, n| c.host += n);
    }
    cells
}

/// The device's size in blocks.
fn device_blocks(l: &Located) -> u64 {
    l.device_bytes / BLOCK
}

/// Cells in the zoomed strip, at most.
const ZOOM_CELLS: u64 = 160;
/// Cells in the whole-device strip, at most.
const OVERVIEW_CELLS: u64 = 200;

/// The whole device.
pub fn overview(l: &Located) -> Window {
    let blocks = device_blocks(l).max(1);
    Window { start: 0, end: blocks, per: blocks.div_ceil(OVERVIEW_CELLS).next_power_of_two() }
}

/// The part worth a close look: the registered file's blocks and every
/// block either scan found the NIC's bytes in, with a margin; `None` when
/// there is none of those.
pub fn zoom(l: &Located, pinned: &str) -> Option<Window> {
    let host = l.host.iter().filter(|h| h.error.is_none()).flat_map(|h| h.nic.iter());
    let runs: Vec<&Run> = l.owners.get(pinned).into_iter().flatten().chain(&l.nic).chain(host).collect();
    let lo = runs.iter().map(|r| r.start).min()?;
    let hi = runs.iter().map(|r| r.end()).max()?;
    let dev = device_blocks(l).max(hi);
    let margin = ((hi - lo) / 4).max(16);
    let per = (hi - lo + 2 * margin).div_ceil(ZOOM_CELLS).next_power_of_two();
    let start = lo.saturating_sub(margin) / per * per;
    let end = ((hi + margin).div_ceil(per) * per).min(dev);
    Some(Window { start, end, per })
}

const FREE_COLOR: &str = "#e6e6e6";
const NIC_COLOR: &str = "#c0001a";
const PINNED_COLOR: &str = "#3b6fb6";
const VICTIM_COLOR: &str = "#f28e2b";
const FILLER_COLOR: &str = "#b8aea8";
const PALETTE: [&str; 8] = ["#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#9c755f", "#bcbd22", "#c5b0d5", "#17becf"];

/// A color per owner (as indexed in [`Located::owners`]): the registered
/// file blue, a victim orange, the filler grey, the others from a palette
/// in name order.
fn colors(l: &Located, pinned: &str) -> Vec<&'static str> {
    let mut next = 0;
    l.owners
        .keys()
        .map(|name| match name.as_str() {
            n if n == pinned => PINNED_COLOR,
            "victim.dat" => VICTIM_COLOR,
            "filler.dat" => FILLER_COLOR,
            _ => {
                next += 1;
                PALETTE[(next - 1) % PALETTE.len()]
            }
        })
        .collect()
}

// The picture's geometry (SVG user units).
const WIDTH: f64 = 1000.0;
const X0: f64 = 112.0;
const STRIP_W: f64 = 878.0;
const OV_Y: f64 = 22.0;
const OV_H: f64 = 14.0;
const ZOOM_Y: f64 = 70.0;
const ZOOM_H: f64 = 36.0;
const HOST_H: f64 = 8.0;

/// Where block `b` of window `w` is drawn.
fn x_of(w: &Window, b: u64) -> f64 {
    X0 + (b - w.start) as f64 / (w.cells() * w.per) as f64 * STRIP_W
}

/// Runs of consecutive cells with the same `key` (`None`: draw nothing).
fn groups<K: PartialEq + Copy>(cells: &[Cell], key: impl Fn(&Cell) -> Option<K>) -> Vec<(K, &[Cell])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cells.len() {
        let k = key(&cells[i]);
        let mut j = i + 1;
        while j < cells.len() && key(&cells[j]) == k {
            j += 1;
        }
        if let Some(k) = k {
            out.push((k, &cells[i..j]));
        }
        i = j;
    }
    out
}

/// `blocks 1,024–1,535 (512 blocks)`.
fn range_text(cells: &[Cell]) -> String {
    let (a, b) = (cells[0].start, cells[cells.len() - 1].end);
    format!("blocks {}–{} ({} blocks)", thousands(a), thousands(b - 1), thousands(b - a))
}

/// A rectangle with an accessible title.
fn rect(s: &mut String, x1: f64, x2: f64, y: f64, h: f64, fill: &str, title: &str) {
    let _ = write!(
        s,
        "<rect x=\"{x1:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{fill}\"><title>{}</title></rect>",
        (x2 - x1).max(0.6),
        esc(title)
    );
}

/// The owners' colors along a strip, a rectangle per run of cells with the
/// same majority owner.
fn owner_strip(s: &mut String, w: &Window, cells: &[Cell], names: &[&str], colors: &[&str], y: f64, h: f64) {
    let free = names.len();
    for (owner, run) in groups(cells, |c| Some(c.majority())) {
        let mut total = vec![0u64; free + 1];
        for c in run {
            for (t, n) in total.iter_mut().zip(&c.counts) {
                *t += n;
            }
        }
        let name = |i: usize| if i == free { "free blocks" } else { names[i] };
        let mut title = format!("{}: {}", range_text(run), name(owner));
        let others: Vec<String> = (0..=free)
            .filter(|&i| i != owner && total[i] > 0)
            .map(|i| format!("{} {}", name(i), thousands(total[i])))
            .collect();
        if !others.is_empty() {
            let _ = write!(title, " ({} blocks; also {})", thousands(total[owner]), others.join(", "));
        }
        let fill = if owner == free { FREE_COLOR } else { colors[owner] };
        rect(s, x_of(w, run[0].start), x_of(w, run[run.len() - 1].end), y, h, fill, &title);
    }
}

/// Marks where a scan found the NIC's bytes (`count` picks whose).
fn nic_marks(s: &mut String, w: &Window, cells: &[Cell], count: fn(&Cell) -> u64, y: f64, h: f64, whose: &str) {
    for ((), run) in groups(cells, |c| (count(c) > 0).then_some(())) {
        let n: u64 = run.iter().map(count).sum();
        let (x1, x2) = (x_of(w, run[0].start), x_of(w, run[run.len() - 1].end));
        // At least 2 units wide, so that 512 blocks show on the whole device.
        let x2 = x2.max(x1 + 2.0);
        rect(s, x1, x2, y, h, NIC_COLOR, &format!("{}: {} blocks carry the NIC's bytes ({whose})", range_text(run), n));
    }
}

/// A text element.
fn text(s: &mut String, x: f64, y: f64, anchor: &str, extra: &str, t: &str) {
    let _ = write!(s, "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\"{extra}>{}</text>", esc(t));
}

/// The block map of one `locate` step as inline SVG: the whole device, a
/// zoomed strip around the registered file and the NIC's blocks, each cell
/// colored by the file owning most of its blocks, the NIC's blocks (the
/// guest's raw read) as a red band on top, the host's scan as red marks
/// below, the registered file's blocks bracketed, and a legend. `title` is
/// the picture's accessible name.
pub fn svg(scenario: &str, l: &Located, title: &str) -> String {
    let pinned = pinned_file(scenario);
    let names: Vec<&str> = l.owners.keys().map(String::as_str).collect();
    let colors = colors(l, &pinned);
    let free = names.len();
    let ov = overview(l);
    let ov_cells = cells(l, &ov);
    let zw = zoom(l, &pinned);
    let z_cells = zw.as_ref().map(|w| cells(l, w)).unwrap_or_default();
    let host_ok = l.host.as_ref().is_some_and(|h| h.error.is_none());

    let mut body = String::new();
    let small = " font-size=\"11\" fill=\"#555\"";
    text(
        &mut body,
        X0,
        OV_Y - 6.0,
        "start",
        small,
        &format!(
            "whole namespace {}: {} = {} blocks of 4 KiB (1 cell = {} blocks)",
            l.device,
            size_of_blocks(device_blocks(l)),
            thousands(device_blocks(l)),
            thousands(ov.per)
        ),
    );
    text(&mut body, X0 - 8.0, OV_Y + OV_H - 3.0, "end", "", "whole device");
    let _ = write!(
        body,
        "<rect x=\"{X0}\" y=\"{OV_Y}\" width=\"{STRIP_W}\" height=\"{OV_H}\" fill=\"{FREE_COLOR}\" stroke=\"#999\" stroke-width=\"0.5\"/>"
    );
    owner_strip(&mut body, &ov, &ov_cells, &names, &colors, OV_Y, OV_H);
    nic_marks(&mut body, &ov, &ov_cells, |c| c.nic, OV_Y, OV_H, "the guest's raw read");
    let mut y = OV_Y + OV_H + 14.0;
    if let Some(w) = &zw {
        // The zoom window on the whole device, and lines down to the strip.
        let (a, b) = (x_of(&ov, w.start), x_of(&ov, w.end).max(x_of(&ov, w.start) + 2.0));
        let _ = write!(
            body,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" stroke=\"#000\" stroke-width=\"1.5\"><title>the zoomed part: {}</title></rect>",
            a - 1.0,
            OV_Y - 2.0,
            b - a + 2.0,
            OV_H + 4.0,
            esc(&format!("blocks {}–{}", thousands(w.start), thousands(w.end - 1)))
        );
        let _ = write!(
            body,
            "<path d=\"M{:.1} {:.1} L{X0} {:.1} M{:.1} {:.1} L{:.1} {:.1}\" stroke=\"#888\" stroke-dasharray=\"3 3\" fill=\"none\"/>",
            a - 1.0,
            OV_Y + OV_H + 2.0,
            ZOOM_Y - 18.0,
            b + 1.0,
            OV_Y + OV_H + 2.0,
            X0 + STRIP_W,
            ZOOM_Y - 18.0
        );
        // Under the lines' ends: where the zoomed strip starts and ends.
        text(&mut body, X0, ZOOM_Y - 4.0, "start", small, &format!("block {}", thousands(w.start)));
        text(
            &mut body,
            X0 + STRIP_W / 2.0,
            ZOOM_Y - 4.0,
            "middle",
            small,
            &format!(
                "zoomed: 1 cell = {} block{} ({})",
                w.per,
                if w.per == 1 { "" } else { "s" },
                size_of_blocks(w.per)
            ),
        );
        text(&mut body, X0 + STRIP_W, ZOOM_Y - 4.0, "end", small, &format!("block {}", thousands(w.end - 1)));
        text(&mut body, X0 - 8.0, ZOOM_Y + ZOOM_H / 2.0 + 4.0, "end", "", "zoomed in");
        owner_strip(&mut body, w, &z_cells, &names, &colors, ZOOM_Y, ZOOM_H);
        let _ = write!(
            body,
            "<rect x=\"{X0}\" y=\"{ZOOM_Y}\" width=\"{:.1}\" height=\"{ZOOM_H}\" fill=\"none\" stroke=\"#999\" stroke-width=\"0.5\"/>",
            x_of(w, w.end) - X0
        );
        nic_marks(&mut body, w, &z_cells, |c| c.nic, ZOOM_Y + ZOOM_H / 3.0, ZOOM_H / 3.0, "the guest's raw read");
        y = ZOOM_Y + ZOOM_H + 5.0;
        if host_ok {
            text(&mut body, X0 - 8.0, y + HOST_H, "end", small, "host's scan");
            let _ = write!(
                body,
                "<rect x=\"{X0}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{HOST_H}\" fill=\"#f6f6f6\"/>",
                x_of(w, w.end) - X0
            );
            nic_marks(&mut body, w, &z_cells, |c| c.host, y, HOST_H, "the host's scan of the NVDIMM backing file");
            y += HOST_H + 4.0;
        }
        // The registered file's blocks, bracketed below the strip.
        let pinned_idx = names.iter().position(|n| *n == pinned);
        if let Some(pi) = pinned_idx {
            let brackets = groups(&z_cells, |c| (c.counts[pi] > 0).then_some(()));
            let label = if brackets.is_empty() {
                format!("{pinned}, the file registered with the NIC, owns no blocks now")
            } else {
                format!("{pinned}, the file registered with the NIC")
            };
            for ((), run) in &brackets {
                let (x1, x2) = (x_of(w, run[0].start), x_of(w, run[run.len() - 1].end));
                let _ = write!(
                    body,
                    "<path d=\"M{x1:.1} {:.1} V{:.1} H{x2:.1} V{:.1}\" stroke=\"{PINNED_COLOR}\" stroke-width=\"2\" fill=\"none\"><title>{}</title></path>",
                    y,
                    y + 6.0,
                    y,
                    esc(&format!("{}: {pinned}", range_text(run)))
                );
            }
            let (lx, anchor) = match brackets.first() {
                Some((_, run)) => {
                    let x1 = x_of(w, run[0].start);
                    if x1 + 7.0 * label.len() as f64 > X0 + STRIP_W {
                        (x_of(w, brackets[brackets.len() - 1].1.last().map(|c| c.end).unwrap_or(w.end)), "end")
                    } else {
                        (x1, "start")
                    }
                }
                None => (X0, "start"),
            };
            text(&mut body, lx, y + 20.0, anchor, &format!(" fill=\"{PINNED_COLOR}\""), &label);
            y += 26.0;
        }
    }
    // The legend: every owner some cell shows, free blocks, the NIC's marks.
    y += 10.0;
    let mut shown: Vec<usize> = ov_cells.iter().chain(&z_cells).map(Cell::majority).collect();
    shown.sort_unstable_by_key(|&i| (names.get(i) != Some(&pinned.as_str()), i));
    shown.dedup();
    let mut items: Vec<(&str, String)> = shown
        .iter()
        .map(
            |&i| if i == free { (FREE_COLOR, "free (no file)".to_string()) } else { (colors[i], names[i].to_string()) },
        )
        .collect();
    items.push((NIC_COLOR, "the NIC's bytes (guest's raw read of the device)".into()));
    if host_ok && zw.is_some() {
        items.push((NIC_COLOR, "host's scan: the NIC's bytes in the NVDIMM backing file".into()));
    }
    let mut x = X0;
    for (color, label) in &items {
        let w = 22.0 + 6.6 * label.chars().count() as f64;
        if x + w > WIDTH && x > X0 {
            x = X0;
            y += 18.0;
        }
        let _ = write!(
            body,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\" stroke=\"#999\" stroke-width=\"0.5\"/>",
            y - 10.0
        );
        text(&mut body, x + 16.0, y, "start", "", label);
        x += w + 8.0;
    }
    let height = y + 8.0;
    format!(
        "<svg class=\"blockmap\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" viewBox=\"0 0 {WIDTH} {height:.0}\" width=\"{WIDTH}\" height=\"{height:.0}\" font-family=\"system-ui,sans-serif\" font-size=\"12\"><title>{}</title>{body}</svg>",
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinlab_scenarios::results::HostScan;

    pub(crate) fn located(
        owners: &[(&str, &[(u64, u64)])],
        nic: &[(u64, u64)],
        host: Option<&[(u64, u64)]>,
    ) -> Located {
        let runs = |v: &[(u64, u64)]| v.iter().map(|&(start, len)| Run { start, len }).collect::<Vec<_>>();
        Located {
            device: "/dev/pmem0".into(),
            device_bytes: 1024 * BLOCK,
            nvdimm_offset: Some(2 << 20),
            seed: 1,
            region_blocks: 512,
            nic: runs(nic),
            owners: owners.iter().map(|(n, r)| (n.to_string(), runs(r))).collect(),
            host: host.map(|h| HostScan { nic: runs(h), scanned_bytes: 1024 * BLOCK, ms: 1.0, error: None }),
        }
    }

    #[test]
    fn sentences() {
        let l = located(&[("victim.dat", &[(0, 1000)])], &[(100, 512)], Some(&[(100, 512)]));
        assert_eq!(
            nic_sentence("S20", &l.placement(), Some(&l)),
            "The NIC's 2 MiB (512 blocks) are inside victim.dat; the host's scan of the NVDIMM agrees."
        );
        let l = located(&[("S20.dat", &[(100, 512)]), ("victim.dat", &[(0, 100)])], &[(100, 512)], Some(&[(100, 511)]));
        let s = nic_sentence("S20", &l.placement(), Some(&l));
        assert!(s.starts_with("The NIC's 2 MiB (512 blocks) are inside S20.dat, where they belong; "), "{s}");
        assert!(s.contains("the host's scan of the NVDIMM DISAGREES: the guest found S20.dat: 512 blocks"), "{s}");
        let l = located(&[("S20.dat", &[(100, 512)])], &[(100, 512), (900, 1)], None);
        assert_eq!(
            nic_sentence("S20", &l.placement(), Some(&l)),
            "The NIC's 2.0 MiB (513 blocks) are in 2 places: 512 inside S20.dat, 1 in free blocks; \
             no check by the host: the host did not scan the NVDIMM (data offset 0x200000)."
        );
        let free: Placement = [("free".to_string(), 512)].into();
        assert_eq!(
            nic_sentence("S19", &free, None),
            "The NIC's 2 MiB (512 blocks) are in free blocks, owned by no file; no scan by the host was recorded."
        );
        assert!(nic_sentence("S19", &Placement::new(), None).starts_with("No block of the namespace carries"));
        assert_eq!(thousands(262144), "262,144");
        assert_eq!(thousands(999), "999");
        assert_eq!(size_of_blocks(3), "12 KiB");
    }

    fn win(start: u64, end: u64, per: u64) -> Window {
        Window { start, end, per }
    }

    #[test]
    fn blocks_bin_into_cells_by_majority_owner() {
        // a.dat 0..10, b.dat 10..13, the rest free; the NIC at 6..9, the host at 6..8.
        let l = located(&[("a.dat", &[(0, 10)]), ("b.dat", &[(10, 3)])], &[(6, 3)], Some(&[(6, 2)]));
        let c = cells(&l, &win(0, 18, 4));
        let got: Vec<(u64, u64, Vec<u64>, usize, u64, u64)> =
            c.iter().map(|c| (c.start, c.end, c.counts.clone(), c.majority(), c.nic, c.host)).collect();
        assert_eq!(
            got,
            vec![
                (0, 4, vec![4, 0, 0], 0, 0, 0),
                (4, 8, vec![4, 0, 0], 0, 2, 2),
                // A tie: the file first in name order.
                (8, 12, vec![2, 2, 0], 0, 1, 0),
                // Mostly free.
                (12, 16, vec![0, 1, 3], 2, 0, 0),
                // The last cell ends with the window.
                (16, 18, vec![0, 0, 2], 2, 0, 0),
            ]
        );
        // A window that starts inside the device counts only its own blocks.
        let c = cells(&l, &win(8, 16, 8));
        assert_eq!((c.len(), c[0].counts.clone(), c[0].nic), (1, vec![2, 3, 3], 1));
        // Any file beats free blocks on a tie.
        let c = cells(&l, &win(12, 14, 2));
        assert_eq!((c[0].counts.clone(), c[0].majority()), (vec![0, 1, 1], 1));
    }

    #[test]
    fn shared_blocks_belong_to_the_first_name() {
        let l = located(&[("a.dat", &[(0, 4)]), ("b.dat", &[(2, 4), (8, 1)])], &[], None);
        assert_eq!(
            segments(&l),
            vec![
                Seg { start: 0, end: 4, owner: 0 },
                Seg { start: 4, end: 6, owner: 1 },
                Seg { start: 8, end: 9, owner: 1 }
            ]
        );
        assert_eq!(l.owner_of(3), "a.dat");
        assert_eq!(cells(&l, &win(0, 8, 8))[0].counts, vec![4, 2, 2]);
    }

    #[test]
    fn the_zoom_covers_the_registered_file_and_the_nic_with_a_margin() {
        let mut l =
            located(&[("S20.dat", &[(100_000, 512)]), ("victim.dat", &[(0, 100_000)])], &[(100_000, 512)], None);
        l.device_bytes = 262_144 * BLOCK;
        let w = zoom(&l, "S20.dat").unwrap();
        assert_eq!(w, win(99_872, 100_640, 8));
        assert!(w.cells() <= ZOOM_CELLS);
        assert_eq!(overview(&l), win(0, 262_144, 2048));
        // Far-apart NIC blocks widen the window; cells grow to keep their number.
        l.nic.push(Run { start: 200_000, len: 1 });
        let w = zoom(&l, "S20.dat").unwrap();
        assert!(w.start <= 100_000 && w.end > 200_000 && w.cells() <= ZOOM_CELLS, "{w:?}");
        // Nothing to look at: no zoom.
        let empty = located(&[("victim.dat", &[(0, 10)])], &[], None);
        assert_eq!(zoom(&empty, "S20.dat"), None);
    }

    #[test]
    fn the_picture_marks_the_nic_escapes_names_and_has_a_legend() {
        let mut l = located(
            &[("S20.dat", &[]), ("victim.dat", &[(0, 900)]), ("<b>&\"x'.dat", &[(900, 50)])],
            &[(100, 512)],
            Some(&[(100, 512)]),
        );
        l.device_bytes = 1024 * BLOCK;
        let svg = svg("S20", &l, "S20 on hazard/ext4 & more");
        assert!(svg.starts_with("<svg class=\"blockmap\"") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains("<title>S20 on hazard/ext4 &amp; more</title>"));
        // The NIC's blocks on top of victim.dat's, in both strips, and the host's marks.
        assert!(
            svg.contains("blocks 96–615 (520 blocks): 512 blocks carry the NIC&#39;s bytes (the guest&#39;s raw read)"),
            "{svg}"
        );
        assert!(svg.contains("carry the NIC&#39;s bytes (the host&#39;s scan of the NVDIMM backing file)"));
        let victim = format!("fill=\"{VICTIM_COLOR}\"><title>blocks 0–743 (744 blocks): victim.dat</title>");
        let band = "y=\"82.0\" width=\"613.7\" height=\"12.0\" fill=\"#c0001a\"><title>blocks 96–615";
        // Drawn on top: after the owners' colors.
        assert!(svg.find(&victim).unwrap() < svg.find(band).unwrap(), "{svg}");
        // The registered file owns nothing any more, and the picture says so.
        assert!(svg.contains("S20.dat, the file registered with the NIC, owns no blocks now"));
        // A file name is text, never markup.
        assert!(!svg.contains("<b>&"));
        assert!(svg.contains("&lt;b&gt;&amp;&quot;x&#39;.dat"));
        for item in ["victim.dat</text>", "free (no file)</text>", "(guest&#39;s raw read of the device)</text>"] {
            assert!(svg.contains(item), "legend lacks {item}: {svg}");
        }
        // Every rectangle that stands for blocks says which.
        assert_eq!(svg.matches("<title>").count(), svg.matches("</title>").count());
        // No scan: no host lane and no legend entry for it.
        l.host = None;
        assert!(!super::svg("S20", &l, "t").contains("host&#39;s scan"));
    }
}
