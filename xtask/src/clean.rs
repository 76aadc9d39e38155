//! `cargo xtask clean`: pinlab's caches and run outputs.

use crate::util::{self, Cache};
use anyhow::{Context, Result};

/// `cargo xtask clean [--all]`.
pub fn clean(cache: &Cache, all: bool) -> Result<()> {
    let mut dirs = vec!["kernels", "rootfs", "rootfs-demos", "build", "trees", "locks"];
    if all {
        dirs.extend(["debs", "src", "apt", "tools", "ccache"]);
    }
    for d in dirs {
        let p = cache.root.join(d);
        if p.exists() {
            eprintln!("removing {}", p.display());
            fs_err::remove_dir_all(&p).with_context(|| format!("Failed to remove {}", p.display()))?;
        }
    }
    // The stock build dir lives inside the extracted source (kept without --all).
    if let Ok(rd) = fs_err::read_dir(cache.root.join("src")) {
        for e in rd.flatten() {
            let b = e.path().join(crate::kernel::BUILD_SUBDIR);
            if b.exists() {
                eprintln!("removing {}", b.display());
                fs_err::remove_dir_all(&b)?;
            }
        }
    }
    let t = util::target_dir();
    if t.exists() {
        eprintln!("removing {}", t.display());
        fs_err::remove_dir_all(&t).with_context(|| format!("Failed to remove {}", t.display()))?;
    }
    Ok(())
}
