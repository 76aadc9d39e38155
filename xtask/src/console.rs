//! Kernel splats on the serial console (panic, oops, BUG, WARNING, KASAN,
//! lockdep, hung task, …): they fail a run whatever the scenarios said.
//! pinlab's own messages on the console are [`pinlab_scenarios::protocol`]'s.

use serde::{Deserialize, Serialize};

/// What the kernel reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplatKind {
    /// `Kernel panic - not syncing`.
    KernelPanic,
    /// A KASAN report.
    Kasan,
    /// A KFENCE report (`BUG: KFENCE: …`).
    Kfence,
    /// `BUG: sleeping function called from invalid context` or
    /// `scheduling while atomic` (DEBUG_ATOMIC_SLEEP).
    AtomicSleep,
    /// A UBSAN report.
    Ubsan,
    /// A lockdep report.
    Lockdep,
    /// The hung-task detector.
    HungTask,
    /// The soft-lockup detector.
    SoftLockup,
    /// An RCU stall.
    RcuStall,
    /// A general protection fault.
    GeneralProtectionFault,
    /// An oops.
    Oops,
    /// `BUG:` or `kernel BUG at`.
    Bug,
    /// `WARNING:`.
    Warning,
}

impl SplatKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            SplatKind::KernelPanic => "Kernel panic",
            SplatKind::Kasan => "KASAN",
            SplatKind::Kfence => "KFENCE",
            SplatKind::AtomicSleep => "sleep in atomic context",
            SplatKind::Ubsan => "UBSAN",
            SplatKind::Lockdep => "lockdep",
            SplatKind::HungTask => "hung task",
            SplatKind::SoftLockup => "soft lockup",
            SplatKind::RcuStall => "RCU stall",
            SplatKind::GeneralProtectionFault => "general protection fault",
            SplatKind::Oops => "Oops",
            SplatKind::Bug => "BUG",
            SplatKind::Warning => "WARNING",
        }
    }

    /// The kernel cannot go on (the guest dies or is about to).
    pub fn is_fatal(self) -> bool {
        matches!(self, SplatKind::KernelPanic | SplatKind::Oops | SplatKind::Bug | SplatKind::GeneralProtectionFault)
    }

    /// The kernel reports that something stopped making progress.
    pub fn is_hang(self) -> bool {
        matches!(self, SplatKind::HungTask | SplatKind::SoftLockup | SplatKind::RcuStall)
    }
}

impl std::fmt::Display for SplatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel splat found on the console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splat {
    /// Which kind.
    pub kind: SplatKind,
    /// 1-based line number in the console log.
    pub line: usize,
    /// The line itself.
    pub text: String,
    /// The scenario the guest was running when the kernel printed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
    /// Where the guest was: `scenario S05, step 4 (truncate)` (from the
    /// runner's events, which share the console with the kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub during: Option<String>,
    /// The report: this line and the kernel lines after it, at most
    /// [`REPORT_LINES`] (the runner's own lines left out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report: Vec<String>,
}

/// How many console lines of a splat's report are kept.
pub const REPORT_LINES: usize = 30;

impl Splat {
    /// A splat found at 1-based console `line`, with nothing else known yet.
    pub fn new(kind: SplatKind, line: usize, text: &str) -> Splat {
        let text = text.trim_end().to_string();
        Splat { kind, line, report: vec![text.clone()], text, scenario: None, during: None }
    }

    /// Add a console line that follows the splat; false once the report is full.
    pub fn extend_report(&mut self, line: &str) -> bool {
        if self.report.len() >= REPORT_LINES {
            return false;
        }
        self.report.push(line.trim_end().to_string());
        self.report.len() < REPORT_LINES
    }
}

/// (kind, substring) pairs; checked after stripping the printk timestamp.
const PATTERNS: &[(SplatKind, &str)] = &[
    // Specific kinds first: their lines also say "BUG:" or "WARNING:".
    (SplatKind::KernelPanic, "Kernel panic - not syncing"),
    (SplatKind::Kasan, "KASAN: "),
    (SplatKind::Kfence, "KFENCE: "),
    (SplatKind::Ubsan, "UBSAN: "),
    (SplatKind::AtomicSleep, "sleeping function called from invalid context"),
    (SplatKind::AtomicSleep, "scheduling while atomic"),
    (SplatKind::Lockdep, "possible circular locking dependency detected"),
    (SplatKind::Lockdep, "possible recursive locking detected"),
    (SplatKind::Lockdep, "possible irq lock inversion dependency detected"),
    (SplatKind::Lockdep, "inconsistent lock state"),
    (SplatKind::Lockdep, "suspicious RCU usage"),
    (SplatKind::Lockdep, "bad unlock balance detected"),
    (SplatKind::Lockdep, "held lock freed"),
    (SplatKind::Lockdep, "lock held when returning to user space"),
    (SplatKind::Lockdep, "lock held at task exit time"),
    (SplatKind::HungTask, "blocked for more than"),
    (SplatKind::SoftLockup, "soft lockup - CPU#"),
    (SplatKind::RcuStall, "self-detected stall on CPU"),
    (SplatKind::RcuStall, "rcu_sched self-detected stall"),
    (SplatKind::RcuStall, "detected stalls on CPUs/tasks"),
    (SplatKind::RcuStall, "rcu: INFO: rcu_preempt detected stalls"),
    (SplatKind::GeneralProtectionFault, "general protection fault"),
    (SplatKind::Oops, "Oops: "),
    (SplatKind::Oops, "] Oops"),
    (SplatKind::Bug, "BUG: "),
    (SplatKind::Bug, "kernel BUG at "),
    (SplatKind::Warning, "WARNING: "),
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
pub fn splat_in_line(line: &str) -> Option<SplatKind> {
    let body = strip_time(line);
    PATTERNS.iter().find(|(_, p)| body.contains(p)).map(|(k, _)| *k)
}

/// Every splat in a whole console log.
pub fn scan(log: &str) -> Vec<Splat> {
    log.lines().enumerate().filter_map(|(i, l)| splat_in_line(l).map(|kind| Splat::new(kind, i + 1, l))).collect()
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

    /// Real reports, captured from the debug kernel's console (LKDTM via
    /// debugfs; see xtask/tests/fixtures/splats/README.md): each file's
    /// first splat is the kind its name says.
    #[test]
    fn captured_debug_reports_are_recognised() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/splats");
        let mut seen = 0;
        for e in fs_err::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("log") {
                continue;
            }
            let want: SplatKind = serde_json::from_value(serde_json::Value::String(
                p.file_stem().unwrap().to_string_lossy().split('.').next().unwrap().to_string(),
            ))
            .unwrap_or_else(|e| panic!("{}: the file name does not start with a splat kind: {e}", p.display()));
            let log = fs_err::read_to_string(&p).unwrap();
            let s = scan(&log);
            assert!(!s.is_empty(), "{}: no splat found", p.display());
            assert_eq!(s[0].kind, want, "{}: {}", p.display(), s[0].text);
            seen += 1;
        }
        assert!(seen >= 6, "only {seen} captured reports in {}", dir.display());
    }

    #[test]
    fn each_splat_kind_fails() {
        let cases = [
            ("[   12.000000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100", SplatKind::KernelPanic),
            ("[    3.000000] Oops: general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP", SplatKind::GeneralProtectionFault),
            ("[    3.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008", SplatKind::Bug),
            ("[    3.000000] kernel BUG at mm/gup.c:123!", SplatKind::Bug),
            ("[    3.000000] WARNING: CPU: 1 PID: 77 at fs/dax.c:400 dax_disassociate_entry+0x5b/0x70", SplatKind::Warning),
            ("[    3.000000] BUG: KASAN: use-after-free in ib_umem_release+0x1c/0x80", SplatKind::Kasan),
            ("[    3.000000] ==================================================================\n[    3.000001] KASAN: maybe wild-memory-access in range", SplatKind::Kasan),
            ("[    3.000000] WARNING: possible circular locking dependency detected", SplatKind::Lockdep),
            ("[    3.000000] possible recursive locking detected", SplatKind::Lockdep),
            ("[  243.000000] INFO: task truncate:123 blocked for more than 120 seconds.", SplatKind::HungTask),
            ("[    3.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [qemu:1]", SplatKind::SoftLockup),
            ("[    3.000000] UBSAN: shift-out-of-bounds in fs/locks.c:10:2", SplatKind::Ubsan),
            ("[    3.000000] BUG: KFENCE: use-after-free read in lkdtm_kfence_read_after_free+0x1a/0x30", SplatKind::Kfence),
            ("[    3.000000] BUG: sleeping function called from invalid context at mm/gup.c:1200", SplatKind::AtomicSleep),
            ("[    3.000000] BUG: scheduling while atomic: truncate/77/0x00000002", SplatKind::AtomicSleep),
            ("[    3.000000] WARNING: lock held when returning to user space!", SplatKind::Lockdep),
            ("[    3.000000] rcu: INFO: rcu_preempt self-detected stall on CPU", SplatKind::RcuStall),
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
    fn timestamps() {
        assert_eq!(strip_time("[    1.500000] rdma_rxe: loaded"), "rdma_rxe: loaded");
        assert_eq!(strip_time("[x] y"), "[x] y");
    }
}
