//! Command-line grammar (xflags). `cargo xtask --help` prints it.
#![allow(missing_docs)]

use pinlab_scenarios::{Flavor, Fs};
use std::path::PathBuf;

use crate::qemu::Accel;

xflags::xflags! {
    /// pinlab: the RDMA + FS-DAX truncate lab. Builds stock and patched Linux
    /// 6.12, a Debian rdma-core rootfs, boots them in QEMU with an emulated
    /// NVDIMM and runs the 2019 discussion's scenarios.
    cmd xtask {
        /// Report what the host has and lacks (tools, QEMU devices, KVM, disk).
        cmd doctor {}

        /// Build a kernel flavor (cached by a hash of source, patches and fragments).
        cmd kernel {
            /// Build a flavor's bzImage (the default).
            default cmd build {
                /// Kernel flavor: stock (default) or patched.
                optional --flavor flavor: Flavor
                /// Build this 6.12-ish source tree instead of the pinned Debian source.
                optional --kernel-tree path: PathBuf
                /// Never install missing host packages; print the command instead.
                optional --no-install
                /// Fail if Debian no longer serves a pinned version (default: use the current one and say so).
                optional --locked
            }
            /// Apply kernel-patches/ one at a time: build after each (incrementally) and run checkpatch --strict.
            /// Patches unchanged since a successful check are not rebuilt.
            cmd check-series {
                /// Rebuild every prefix from the base, even unchanged ones.
                optional --full
            }
            /// Make (or show) a git tree with the series as commits, for editing and rebasing.
            cmd edit {}
            /// Write the edit tree's commits back to kernel-patches/ with git format-patch.
            cmd export {}
        }

        /// Build the guest rootfs from pinned Debian packages plus the demos.
        cmd image {
            /// Re-resolve image/packages.txt into image/packages.lock (needs the network).
            optional --update-lock
            /// Never install missing host packages; print the command instead.
            optional --no-install
            /// Fail if Debian no longer serves a pinned version (default: use the current one and say so).
            optional --locked
        }

        /// Boot kernels and run scenarios. `run demo` runs every flavor on ext4 and xfs.
        cmd run {
            /// `demo`: every flavor with kernel patches available, both filesystems.
            optional what: String
            /// Kernel flavor(s) to boot (default: stock).
            repeated --flavor flavor: Flavor
            /// Filesystem(s) for the DAX namespace (default: ext4 and xfs).
            repeated --fs fs: Fs
            /// Only these scenario ids (default: all).
            repeated --scenario id: String
            /// kvm or tcg (default: what `doctor`'s KVM probe found).
            optional --accel accel: Accel
            /// Build this source tree instead of the pinned Debian source.
            optional --kernel-tree path: PathBuf
            /// Never install missing host packages; print the command instead.
            optional --no-install
            /// Narrate each step as it happens: what is tried, what the kernel answered.
            optional --explain
            /// Fail if Debian no longer serves a pinned version (default: use the current one and say so).
            optional --locked
        }

        /// Make the reports (report.md, report.html, junit.xml) of an earlier run again from its results.json.
        cmd report {
            /// The run directory (default: target/pinlab/runs/latest).
            optional dir: PathBuf
        }

        /// Boot the lab (DAX mounted, rxe up, demos on PATH) into a shell on this terminal.
        cmd shell {
            /// Kernel flavor (default: stock).
            optional --flavor flavor: Flavor
            /// Filesystem for the DAX namespace (default: ext4).
            optional --fs fs: Fs
            /// kvm or tcg (default: what the KVM probe found).
            optional --accel accel: Accel
            /// Fail if Debian no longer serves a pinned version (default: use the current one and say so).
            optional --locked
        }

        /// The full test suite: unit tests, then the end-to-end scenarios.
        cmd test {
            /// Only the unit tests (no kernel build, no VM).
            optional --unit
            /// Also the whole matrix on the debug kernel (patched + KASAN, lockdep, hang detectors).
            optional --debug
            /// kvm or tcg (default: what the KVM probe found).
            optional --accel accel: Accel
            /// Fail if Debian no longer serves a pinned version (default: use the current one and say so).
            optional --locked
        }

        /// Measure DESIGN.md's speed targets: boot to scenario start, ibv_reg_mr and RDMA WRITE
        /// into FS-DAX vs anonymous memory, how fast truncate over pinned pages fails.
        cmd bench {
            /// Kernel flavor(s) (default: patched when kernel-patches/ has a series, else stock).
            /// `--flavor stock --flavor patched` adds the patched/stock comparison.
            repeated --flavor flavor: Flavor
            /// Filesystem(s) (default: ext4 and xfs).
            repeated --fs fs: Fs
            /// Repetitions of each registration and bandwidth figure (default: 3).
            optional --reps n: u32
            /// kvm or tcg (default: what the KVM probe found).
            optional --accel accel: Accel
            /// Fail if Debian no longer serves a pinned version (default: use the current one and say so).
            optional --locked
        }

        /// Remove pinlab's caches (kernels, rootfs, downloads) and run outputs.
        cmd clean {
            /// Also remove the downloaded .debs and the extracted kernel source.
            optional --all
        }

        /// Internal: the KVM probe's child process.
        cmd kvm-probe {}
    }
}
