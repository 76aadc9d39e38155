//! The serial console as a stream: markers the guest prints, and kernel
//! splats (panic, oops, BUG, WARNING, KASAN, lockdep, hung task) that fail a
//! run whatever the scenarios said.

/// Printed by pinlab-init when the runner starts (boot deadline ends here).
pub const MARK_RUNNER: &str = "PINLAB-RUNNER-START";
/// Printed by the runner before each scenario: `PINLAB-SCENARIO S01 <title>`.
pub const MARK_SCENARIO: &str = "PINLAB-SCENARIO ";
/// Printed by the runner after each step: `PINLAB-STEP S05 3 ETXTBSY [other] name: detail`.
pub const MARK_STEP: &str = "PINLAB-STEP ";

/// A parsed step line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepLine<'a> {
    /// Scenario id.
    pub id: &'a str,
    /// Step index (0-based).
    pub index: usize,
    /// Outcome.
    pub outcome: &'a str,
    /// `[proc] name: detail`.
    pub rest: &'a str,
}

/// Parse a `PINLAB-STEP` line.
pub fn step_line(line: &str) -> Option<StepLine<'_>> {
    let rest = &line[line.find(MARK_STEP)? + MARK_STEP.len()..];
    let mut it = rest.splitn(4, ' ');
    let id = it.next()?;
    let index = it.next()?.parse().ok()?;
    let outcome = it.next()?;
    Some(StepLine { id, index, outcome, rest: it.next().unwrap_or("") })
}

/// Printed by the runner after each bench figure: `PINLAB-BENCH <figure>`.
pub const MARK_BENCH: &str = "PINLAB-BENCH ";

/// Printed by pinlab-init after the runner finished and results are synced.
pub const MARK_DONE: &str = "PINLAB-DONE";

/// A kernel splat found on the console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splat {
    /// Which kind (`Kernel panic`, `Oops`, `BUG`, `WARNING`, `KASAN`, `lockdep`, `hung task`, …).
    pub kind: &'static str,
    /// 1-based line number in the console log.
    pub line: usize,
    /// The line itself.
    pub text: String,
}

/// (kind, substring) pairs; checked after stripping the printk timestamp.
const PATTERNS: &[(&str, &str)] = &[
    // Specific kinds first: their lines also say "BUG:" or "WARNING:".
    ("Kernel panic", "Kernel panic - not syncing"),
    ("KASAN", "KASAN: "),
    ("UBSAN", "UBSAN: "),
    ("lockdep", "possible circular locking dependency detected"),
    ("lockdep", "possible recursive locking detected"),
    ("lockdep", "inconsistent lock state"),
    ("lockdep", "suspicious RCU usage"),
    ("hung task", "blocked for more than"),
    ("soft lockup", "soft lockup - CPU#"),
    ("RCU stall", "rcu_sched self-detected stall"),
    ("RCU stall", "rcu: INFO: rcu_preempt detected stalls"),
    ("general protection fault", "general protection fault"),
    ("Oops", "Oops: "),
    ("Oops", "] Oops"),
    ("BUG", "BUG: "),
    ("BUG", "kernel BUG at "),
    ("WARNING", "WARNING: "),
];

/// Strip a `[    1.234567] ` printk timestamp.
fn strip_time(line: &str) -> &str {
    let t = line.trim_start();
    if let Some(rest) = t.strip_prefix('[') {
        if let Some(end) = rest.find("] ") {
            if rest[..end].trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
                return &rest[end + 2..];
            }
        }
    }
    t
}

/// Splats in one console line, if any.
pub fn splat_in_line(line: &str) -> Option<&'static str> {
    let body = strip_time(line);
    PATTERNS.iter().find(|(_, p)| body.contains(p)).map(|(k, _)| *k)
}

/// Every splat in a whole console log.
pub fn scan(log: &str) -> Vec<Splat> {
    log.lines()
        .enumerate()
        .filter_map(|(i, l)| splat_in_line(l).map(|kind| Splat { kind, line: i + 1, text: l.trim_end().to_string() }))
        .collect()
}

/// Whether a line carries a marker, after the timestamp (markers come from
/// userspace and have none, but the kernel may interleave output).
pub fn has_marker(line: &str, marker: &str) -> bool {
    line.contains(marker)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "\
[    0.000000] Linux version 6.12.117 (pinlab@pinlab) (gcc (Debian 12.2.0-14) 12.2.0) #1 SMP
[    0.812345] nd_pmem namespace0.0: unable to guarantee persistence of writes
[    1.100000] EXT4-fs (pmem0): mounted filesystem with ordered data mode. Quota mode: none.
[    1.200000] EXT4-fs (pmem0): DAX enabled. Warning: DAX support in ext4 driver is experimental
[    1.500000] rdma_rxe: loaded
[    2.000000] rxe_reg_user_mr: returned err = -95
PINLAB-SCENARIO S02 reg_mr on an fsdax file mapping, no lease
[    2.100000] xfs filesystem being mounted at /mnt/pmem supports timestamps until 2038-01-19 (0x7fffffff)
PINLAB-DONE
";

    #[test]
    fn clean_log_passes() {
        assert_eq!(scan(CLEAN), vec![]);
    }

    #[test]
    fn each_splat_kind_fails() {
        let cases = [
            ("[   12.000000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100", "Kernel panic"),
            ("[    3.000000] Oops: general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP", "general protection fault"),
            ("[    3.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008", "BUG"),
            ("[    3.000000] kernel BUG at mm/gup.c:123!", "BUG"),
            ("[    3.000000] WARNING: CPU: 1 PID: 77 at fs/dax.c:400 dax_disassociate_entry+0x5b/0x70", "WARNING"),
            ("[    3.000000] BUG: KASAN: use-after-free in ib_umem_release+0x1c/0x80", "KASAN"),
            ("[    3.000000] ==================================================================\n[    3.000001] KASAN: maybe wild-memory-access in range", "KASAN"),
            ("[    3.000000] WARNING: possible circular locking dependency detected", "lockdep"),
            ("[    3.000000] possible recursive locking detected", "lockdep"),
            ("[  243.000000] INFO: task truncate:123 blocked for more than 120 seconds.", "hung task"),
            ("[    3.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [qemu:1]", "soft lockup"),
            ("[    3.000000] UBSAN: shift-out-of-bounds in fs/locks.c:10:2", "UBSAN"),
        ];
        for (text, kind) in cases {
            let log = format!("{CLEAN}{text}\n");
            let s = scan(&log);
            assert!(!s.is_empty(), "{text}");
            assert_eq!(s[0].kind, kind, "{text}");
            assert!(s[0].line > CLEAN.lines().count(), "{text}");
        }
    }

    #[test]
    fn step_lines() {
        let l = step_line("PINLAB-STEP S05 3 ETXTBSY [other] truncate: truncate(/mnt/pmem/S05.dat, 0): busy").unwrap();
        assert_eq!((l.id, l.index, l.outcome), ("S05", 3, "ETXTBSY"));
        assert!(l.rest.starts_with("[other] truncate"));
        assert_eq!(step_line("PINLAB-STEP S05 x ok"), None);
        assert_eq!(step_line("random"), None);
    }

    #[test]
    fn markers() {
        assert!(has_marker("PINLAB-DONE", MARK_DONE));
        assert!(!has_marker("[ 1.0] random", MARK_DONE));
        assert_eq!(strip_time("[    1.500000] rdma_rxe: loaded"), "rdma_rxe: loaded");
        assert_eq!(strip_time("[x] y"), "[x] y");
    }
}
