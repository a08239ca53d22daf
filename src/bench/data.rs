//! Deterministic test data, cheap to make in bulk: the same seed always
//! gives the same bytes.

/// Incompressible bytes (xorshift64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible bytes resembling source text.
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 12] =
        ["fn ", "let ", "mut ", "impl ", "return ", "self", "(x)", "{\n", "}\n", "; ", "0x1f", "match "];
    let noise = random_bytes(len / 4 + 8, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[noise[i % noise.len()] as usize % WORDS.len()].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_seed() {
        assert_eq!(random_bytes(1000, 7), random_bytes(1000, 7));
        assert_ne!(random_bytes(1000, 7), random_bytes(1000, 8));
        assert_eq!(text_bytes(999, 3).len(), 999);
        assert_eq!(text_bytes(500, 3), text_bytes(500, 3));
    }
}
