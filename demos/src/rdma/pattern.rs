//! The byte pattern the RDMA client writes and the verifiers check.

/// Fill `buf` with `pattern_byte(offset)` for every offset.
pub fn fill_pattern(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pinlab_scenarios::plan::pattern_byte(i as u64);
    }
}

/// The first offset where `buf` differs from the pattern, with the byte
/// found and the byte expected.
pub fn first_pattern_mismatch(buf: &[u8]) -> Option<(usize, u8, u8)> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        let want = pinlab_scenarios::plan::pattern_byte(i as u64);
        (b != want).then_some((i, b, want))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_fill_and_check() {
        let mut b = vec![0u8; 3 * 4096 + 7];
        fill_pattern(&mut b);
        assert_eq!(first_pattern_mismatch(&b), None);
        b[5000] ^= 1;
        let (off, _, _) = first_pattern_mismatch(&b).unwrap();
        assert_eq!(off, 5000);
    }
}
