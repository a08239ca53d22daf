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
    /// Blocks of the three kinds above, in the proportions of `mixed` data:
    /// one file of mixed content.
    Mixed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Random => "random",
            Kind::Text => "text",
            Kind::Binary => "binary",
            Kind::Mixed => "mixed",
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

/// A blob's contents, fixed by its kind, seed and size; or a later version
/// of such a blob (see [`Content::next_version`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Content {
    pub kind: Kind,
    pub seed: u64,
    pub size: u64,
    /// 0 for a blob as its seed makes it; n for its n-th version, the one
    /// before it edited in a few places (see [`edits`]).
    pub version: u16,
    /// The size of version 0, which every version follows from.
    pub base: u64,
}

/// Places each version edits, and the fraction of its bytes they change.
const EDIT_PLACES: u64 = 10;
const EDIT_SHARE: f64 = 0.01;

/// One edit of a version: at `at` in the version before it, `cut` bytes go
/// and `new` random bytes (from `seed`) take their place: an overwrite when
/// the two are equal, an insertion when nothing is cut.
#[derive(Clone, Copy, Debug)]
struct Edit {
    at: u64,
    cut: u64,
    new: u64,
    seed: u64,
}

/// The edits that make version `version` from the `previous` bytes before
/// it: [`EDIT_SHARE`] of them in [`EDIT_PLACES`] places, one in each tenth
/// of the blob, three in ten insertions (which shift every byte after them).
fn edits(seed: u64, version: u16, previous: u64) -> Vec<Edit> {
    let mut rng = Rng::new(seed ^ u64::from(version).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let len = ((previous as f64 * EDIT_SHARE) as u64 / EDIT_PLACES).max(1);
    let span = previous / EDIT_PLACES;
    (0..EDIT_PLACES)
        .filter(|_| span > len)
        .map(|i| {
            let at = i * span + rng.below(span - len);
            let cut = if rng.below(10) < 3 { 0 } else { len };
            Edit { at, cut, new: len, seed: rng.next_u64() }
        })
        .collect()
}

impl Content {
    pub fn new(kind: Kind, seed: u64, size: u64) -> Content {
        Content { kind, seed, size, version: 0, base: size }
    }

    /// The next version: this one with [`EDIT_SHARE`] of its bytes
    /// overwritten or inserted, in [`EDIT_PLACES`] places.
    pub fn next_version(&self) -> Content {
        let version = self.version + 1;
        let grown: u64 = edits(self.seed, version, self.size).iter().map(|e| e.new - e.cut).sum();
        Content { size: self.size + grown, version, ..*self }
    }

    /// The version before this one (version > 0).
    fn previous(&self) -> Content {
        let mut content = Content { version: 0, size: self.base, ..*self };
        while content.version + 1 < self.version {
            content = content.next_version();
        }
        content
    }

    /// All of the blob's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size as usize);
        self.push(0, self.size as usize, &mut out);
        out
    }

    /// Appends `len` bytes from `offset` on to `out`.
    pub fn push(&self, offset: u64, len: usize, out: &mut Vec<u8>) {
        let end = (offset + len as u64).min(self.size);
        if self.version > 0 {
            return self.push_edited(offset, end, out);
        }
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

    /// Bytes `offset..end` of a version: the version before it, cut where
    /// its edits are, with their new bytes in between.
    fn push_edited(&self, offset: u64, end: u64, out: &mut Vec<u8>) {
        let previous = self.previous();
        // (start here, length, where in the version before or which edit)
        let mut pieces: Vec<(u64, u64, Result<u64, Edit>)> = Vec::new();
        let (mut here, mut there) = (0, 0);
        for edit in edits(self.seed, self.version, previous.size) {
            pieces.push((here, edit.at - there, Ok(there)));
            here += edit.at - there;
            pieces.push((here, edit.new, Err(edit)));
            here += edit.new;
            there = edit.at + edit.cut;
        }
        pieces.push((here, previous.size - there, Ok(there)));
        for (start, len, from) in pieces {
            let (lo, hi) = (offset.max(start), end.min(start + len));
            if lo >= hi {
                continue;
            }
            match from {
                Ok(there) => previous.push(there + lo - start, (hi - lo) as usize, out),
                Err(edit) => {
                    let new = random_bytes(edit.new as usize, edit.seed);
                    out.extend_from_slice(&new[(lo - start) as usize..(hi - start) as usize]);
                }
            }
        }
    }

    fn make_block(&self, index: u64, len: usize, out: &mut Vec<u8>) {
        let seed = Rng::new(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
        let kind = match self.kind {
            Kind::Mixed => Data::Mixed.pick(&mut Rng::new(seed)),
            kind => kind,
        };
        match kind {
            Kind::Random | Kind::Mixed => push_random(out, len, seed),
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
