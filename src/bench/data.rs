//! Deterministic test data, cheap to make in bulk: the same seed always
//! gives the same bytes. Blob contents are made [`BLOCK`] bytes at a time,
//! each block from its own seed, so that a large blob can be streamed (and
//! made again to check a read) without holding it whole.

use std::sync::OnceLock;

/// Incompressible bytes (xorshift64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    push_random(&mut out, len, seed);
    out
}

fn push_random(out: &mut Vec<u8>, len: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let end = out.len() + len;
    while out.len() < end {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(end);
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

/// A small, fast, seedable generator (wyrand): workloads draw sizes and
/// choices from it, so a seed fixes a whole workload.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x2545_F491_4F6C_DD1D)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xA076_1D64_78BD_642F);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xE703_7ED1_A0B4_28DB);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-uniform in `lo..=hi`: as many values between 1 and 2 KiB as
    /// between 1 and 2 MiB, the shape of file sizes in a build.
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (l, h) = ((lo.max(1) as f64).ln(), ((hi + 1) as f64).ln());
        ((l + self.unit() * (h - l)).exp() as u64).clamp(lo, hi)
    }
}

/// What a blob's bytes look like, and so how well they compress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Incompressible: archives, media, already compressed outputs.
    Random,
    /// Source-like text, zstd-1 about 3-5x.
    Text,
    /// Object-code-like bytes, zstd-1 about 2x.
    Binary,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Random => "random",
            Kind::Text => "text",
            Kind::Binary => "binary",
        }
    }
}

/// The data a workload writes: one kind, or a mix like real build outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Data {
    Random,
    Text,
    Binary,
    /// Per blob: 45 % binary, 35 % text, 20 % random.
    Mixed,
}

impl Data {
    pub fn name(self) -> &'static str {
        match self {
            Data::Random => "random",
            Data::Text => "text",
            Data::Binary => "binary",
            Data::Mixed => "mixed",
        }
    }

    /// The kind of one blob.
    pub fn pick(self, rng: &mut Rng) -> Kind {
        match self {
            Data::Random => Kind::Random,
            Data::Text => Kind::Text,
            Data::Binary => Kind::Binary,
            Data::Mixed => match rng.below(20) {
                0..9 => Kind::Binary,
                9..16 => Kind::Text,
                _ => Kind::Random,
            },
        }
    }
}

/// Blob contents are made this many bytes at a time.
pub const BLOCK: usize = 64 << 10;

/// A blob's contents, fixed by its kind, seed and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Content {
    pub kind: Kind,
    pub seed: u64,
    pub size: u64,
}

impl Content {
    /// All of the blob's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size as usize);
        self.push(0, self.size as usize, &mut out);
        out
    }

    /// Appends `len` bytes from `offset` on to `out`.
    pub fn push(&self, offset: u64, len: usize, out: &mut Vec<u8>) {
        let end = (offset + len as u64).min(self.size);
        let mut at = offset;
        let mut block = Vec::with_capacity(BLOCK + 64);
        while at < end {
            let index = at / BLOCK as u64;
            let start = index * BLOCK as u64;
            let block_len = (self.size - start).min(BLOCK as u64) as usize;
            block.clear();
            self.make_block(index, block_len, &mut block);
            let (from, to) = ((at - start) as usize, ((end - start) as usize).min(block_len));
            out.extend_from_slice(&block[from..to]);
            at = start + to as u64;
        }
    }

    fn make_block(&self, index: u64, len: usize, out: &mut Vec<u8>) {
        let seed = Rng::new(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
        match self.kind {
            Kind::Random => push_random(out, len, seed),
            Kind::Text => push_text(out, len, &mut Rng::new(seed)),
            Kind::Binary => push_binary(out, len, &mut Rng::new(seed)),
        }
    }
}

/// Identifier-like words, punctuation and indentation: 512 tokens.
fn vocabulary() -> &'static [Vec<u8>] {
    static WORDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    WORDS.get_or_init(|| {
        const STEMS: [&str; 16] = [
            "get", "set", "value", "index", "buffer", "request", "handle", "config", "node", "count",
            "result", "error", "parse", "write", "read", "state",
        ];
        const MARKS: [&str; 16] = [
            " ",
            " ",
            "(",
            ")",
            ", ",
            ";\n",
            " = ",
            ".",
            "\n    ",
            "\n        ",
            "{\n",
            "}\n",
            " -> ",
            "::",
            "&",
            " == ",
        ];
        let mut rng = Rng::new(0x7e57);
        (0..512)
            .map(|i| match i % 4 {
                0 | 1 => {
                    let (a, b) = (rng.below(16) as usize, rng.below(16) as usize);
                    format!("{}_{}", STEMS[a], STEMS[b]).into_bytes()
                }
                2 => MARKS[rng.below(16) as usize].as_bytes().to_vec(),
                _ => format!("{}", rng.below(4096)).into_bytes(),
            })
            .collect()
    })
}

fn push_text(out: &mut Vec<u8>, len: usize, rng: &mut Rng) {
    let words = vocabulary();
    let end = out.len() + len;
    while out.len() < end {
        let mut bits = rng.next_u64();
        for _ in 0..7 {
            out.extend_from_slice(&words[(bits & 511) as usize]);
            bits >>= 9;
        }
    }
    out.truncate(end);
}

/// Instruction-like byte strings: a few common opcodes dominate.
fn opcodes() -> &'static [Vec<u8>] {
    static OPS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    OPS.get_or_init(|| {
        let mut rng = Rng::new(0x0bc0de);
        (0..256)
            .map(|_| {
                let len = 1 + rng.below(4) as usize;
                (0..len).map(|_| rng.below(256) as u8).collect()
            })
            .collect()
    })
}

fn push_binary(out: &mut Vec<u8>, len: usize, rng: &mut Rng) {
    let ops = opcodes();
    let words = vocabulary();
    let start = out.len();
    let end = start + len;
    while out.len() < end {
        let r = rng.next_u64();
        match r & 63 {
            // Padding and zeroed data.
            0 => out.resize(out.len() + 16 + (r >> 8) as usize % 112, 0),
            // Symbol names and strings.
            1..=3 => {
                for k in 0..3 {
                    out.extend_from_slice(&words[(r >> (8 + 9 * k)) as usize & 511]);
                    out.push(0);
                }
            }
            // Repeated sequences (prologues, inlined code, relocations).
            4..=21 if out.len() - start >= 4096 => {
                let len = 8 + (r >> 8) as usize % 56;
                let from = out.len() - 64 - (r >> 16) as usize % 4000;
                out.extend_from_within(from..from + len);
            }
            // Instructions: an opcode (the low ones far more often) and an
            // operand, often a small displacement, sometimes a full address.
            _ => {
                for k in 0..4 {
                    let b = r >> (8 + 14 * k);
                    out.extend_from_slice(&ops[(b & 255 & ((b >> 8) & 255)) as usize]);
                    match (b >> 8) & 7 {
                        0..=3 => out.push(b as u8 & 0x1c),
                        4 => out.extend_from_slice(&((b as u32 & 0xfff) << 4).to_le_bytes()),
                        _ => {}
                    }
                }
            }
        }
    }
    out.truncate(end);
}
