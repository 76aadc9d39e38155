//! The host's half of the data-placement oracle: while the guest waits in a
//! `locate` step, map the NVDIMM's backing file with vm-memory and find the
//! scenario's pattern blocks in it, independently of anything the guest's
//! kernel says. The guest names where its block device starts in the NVDIMM
//! (the fsdax data offset); block numbers here count from there.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pinlab_scenarios::plan::{pattern_block_index, PATTERN_BLOCK};
use pinlab_scenarios::results::{runs_of, HostScan};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, VolatileMemory};

/// What the guest asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Where the guest's block device begins in the backing file.
    pub nvdimm_offset: u64,
    /// The block device's size.
    pub device_bytes: u64,
    /// The pattern seed.
    pub seed: u64,
    /// The client's region, in blocks.
    pub region_blocks: u64,
}

/// Search `nvdimm` (the backing file QEMU maps with share=on, so it holds
/// what the guest's memory holds) for the pattern; errors are part of the
/// answer, so the verdict can say why the host has no view.
pub fn scan(nvdimm: &Path, req: &Request) -> HostScan {
    let t = Instant::now();
    match scan_blocks(nvdimm, req) {
        Ok((blocks, scanned)) => HostScan {
            nic: runs_of(blocks),
            scanned_bytes: scanned,
            ms: t.elapsed().as_secs_f64() * 1000.0,
            error: None,
        },
        Err(e) => {
            HostScan { ms: t.elapsed().as_secs_f64() * 1000.0, error: Some(format!("{e:#}")), ..Default::default() }
        }
    }
}

fn scan_blocks(nvdimm: &Path, req: &Request) -> Result<(Vec<u64>, u64)> {
    let file = fs_err::File::open(nvdimm)?.into_file();
    let file_len = file.metadata().with_context(|| format!("Failed to stat {}", nvdimm.display()))?.len();
    let end = req.nvdimm_offset.checked_add(req.device_bytes).context("offset + size overflows")?;
    if !req.nvdimm_offset.is_multiple_of(PATTERN_BLOCK) || end > file_len {
        bail!(
            "the guest's device ({} bytes at {:#x}) does not fit the {} byte NVDIMM file {} at 4 KiB alignment",
            req.device_bytes,
            req.nvdimm_offset,
            file_len,
            nvdimm.display()
        );
    }
    let len = usize::try_from(req.device_bytes)?;
    if len == 0 {
        return Ok((Vec::new(), 0));
    }
    let region = MmapRegionBuilder::<()>::new(len)
        .with_mmap_prot(libc::PROT_READ)
        .with_mmap_flags(libc::MAP_SHARED)
        .with_file_offset(FileOffset::new(file, req.nvdimm_offset))
        .build()
        .with_context(|| format!("Failed to map {} bytes of {} at {:#x}", len, nvdimm.display(), req.nvdimm_offset))?;
    const CHUNK: usize = 1 << 20;
    let bs = PATTERN_BLOCK as usize;
    let mut buf = vec![0u8; CHUNK];
    let mut found = Vec::new();
    let mut off = 0usize;
    while off < len {
        let n = CHUNK.min(len - off);
        let slice = region.get_slice(off, n).with_context(|| format!("offset {off} of the mapped NVDIMM"))?;
        slice.copy_to(&mut buf[..n]);
        for (i, blk) in buf[..n].chunks_exact(bs).enumerate() {
            // Most blocks are zero (a sparse file) or another file's data: the
            // first 8 bytes are the seed in every pattern block.
            if blk[..8] == req.seed.to_le_bytes() && pattern_block_index(req.seed, req.region_blocks, blk).is_some() {
                found.push(((off + i * bs) / bs) as u64);
            }
        }
        off += n;
    }
    Ok((found, len as u64))
}

/// A guest-chosen token that is safe as a file name in the share.
pub fn safe_token(token: &str) -> bool {
    !token.is_empty() && token.len() <= 64 && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinlab_scenarios::plan::{fill_pattern, pattern_seed};
    use pinlab_scenarios::results::Run;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn finds_the_pattern_where_it_was_written_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem0.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        let seed = pattern_seed("S20");
        // Region blocks 0..3 at device blocks 100..103 (device at 2 MiB),
        // block 3 of the region at device block 7, another scenario's at 50.
        let mut region = vec![0u8; 4 * 4096];
        fill_pattern(seed, 0, &mut region);
        let base = 2u64 << 20;
        f.seek(SeekFrom::Start(base + 100 * 4096)).unwrap();
        f.write_all(&region[..3 * 4096]).unwrap();
        f.seek(SeekFrom::Start(base + 7 * 4096)).unwrap();
        f.write_all(&region[3 * 4096..]).unwrap();
        let mut other = vec![0u8; 4096];
        fill_pattern(pattern_seed("S05"), 0, &mut other);
        f.seek(SeekFrom::Start(base + 50 * 4096)).unwrap();
        f.write_all(&other).unwrap();
        drop(f);
        let req = Request { nvdimm_offset: base, device_bytes: 4 << 20, seed, region_blocks: 4 };
        let got = scan(&path, &req);
        assert_eq!(got.error, None);
        assert_eq!(got.nic, vec![Run { start: 7, len: 1 }, Run { start: 100, len: 3 }]);
        assert_eq!(got.scanned_bytes, 4 << 20);
        // A device that does not fit the file is an error, not an empty answer.
        let bad = scan(&path, &Request { nvdimm_offset: 6 << 20, ..req });
        assert!(bad.error.unwrap().contains("does not fit"));
    }

    #[test]
    fn tokens() {
        assert!(safe_token("S20-7"));
        assert!(!safe_token("../x"));
        assert!(!safe_token(""));
    }
}
