//! Test payloads: bytes that are not all alike (a misplaced chunk or range shows) and their
//! SHA-256, for the large-body and large-result tests and the `large` benchmark.

/// `len` pseudo-random bytes (xorshift from `seed`): the same `len` and `seed`, the same bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64 ^ seed;
    if state == 0 {
        state = 1;
    }
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_repeat_per_seed_and_differ_between_seeds() {
        assert_eq!(pattern(1000, 7), pattern(1000, 7));
        assert_ne!(pattern(1000, 7), pattern(1000, 8));
        let bytes = pattern(4096, 0);
        assert!(bytes.iter().any(|&b| b != bytes[0]), "not all alike");
        // The SHA-256 of "abc" (FIPS 180-2, appendix B.1).
        assert_eq!(
            sha256(b"abc")[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "the SHA-256 test vector"
        );
    }
}
