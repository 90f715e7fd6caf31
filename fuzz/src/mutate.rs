//! A coverage-less mutator: the engine of the seeded smoke in this crate's tests, and the
//! fallback where libFuzzer cannot be built. Byte flips, interesting integers (lengths and
//! their neighbours), insertions, deletions, repeats and splices with other corpus entries.

/// Integers that sit on the boundaries decoders check, big-endian and little-endian.
const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];

/// Longest input the mutator makes (libFuzzer's default `-max_len` is 4096 too).
pub const MAX_LEN: usize = 4096;

/// Mutates `input` in place with one to four random edits; `corpus` gives splice material.
pub fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..rng.usize(1..=4) {
        edit(rng, input, corpus);
    }
    input.truncate(MAX_LEN);
}

fn edit(rng: &mut fastrand::Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = input.len();
    match rng.u8(0..8) {
        0 if len > 0 => {
            let i = rng.usize(..len);
            input[i] ^= 1 << rng.u8(0..8);
        }
        1 if len > 0 => {
            let i = rng.usize(..len);
            input[i] = rng.u8(..);
        }
        2 => {
            let at = rng.usize(..=len);
            let n = rng.usize(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            input.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let at = rng.usize(..len);
            let n = rng.usize(1..=(len - at).min(32));
            input.drain(at..at + n);
        }
        4 if len > 0 => {
            // An interesting integer over 1, 2, 4 or 8 bytes.
            let width = [1, 2, 4, 8][rng.usize(..4)];
            let value = INTERESTING[rng.usize(..INTERESTING.len())];
            let bytes = if rng.bool() {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            let bytes = if rng.bool() {
                &bytes[8 - width..]
            } else {
                &bytes[..width]
            };
            let at = rng.usize(..len);
            let end = (at + width).min(len);
            input.splice(at..end, bytes.iter().copied());
        }
        5 if len > 0 => {
            // Repeat a slice (long strings, many headers, deep nesting).
            let at = rng.usize(..len);
            let n = rng.usize(1..=(len - at).min(16));
            let piece = input[at..at + n].to_vec();
            for _ in 0..rng.usize(1..=32) {
                input.splice(at..at, piece.iter().copied());
            }
        }
        6 if !corpus.is_empty() => {
            // Splice: a prefix of this input, a suffix of another.
            let other = &corpus[rng.usize(..corpus.len())];
            let keep = rng.usize(..=len);
            let from = rng.usize(..=other.len());
            input.truncate(keep);
            input.extend_from_slice(&other[from..]);
        }
        _ if len > 0 => {
            input.truncate(rng.usize(..len));
        }
        _ => input.push(rng.u8(..)),
    }
}
