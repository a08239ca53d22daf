//! Content-defined chunking, as REAPI 2.12 defines it for SplitBlob and
//! SpliceBlob: a blob is cut where its content says (a rolling hash over
//! the bytes before a cut), so that an edit changes only the chunks around
//! it, and two versions of a file share the rest. Both functions are
//! bit-exact with what clients (Bazel) compute: a chunk a client made is a
//! chunk this server makes.

mod fastcdc;
mod gear;
mod repmax;

pub use fastcdc::FastCdc;
pub use repmax::RepMax;

use crate::proto::reapi::chunking_function::Value as Wire;
use crate::proto::reapi::{FastCdc2020Params, RepMaxCdcParams};

/// The parameters this server chunks with, as Bazel defaults them: FastCDC
/// with 512 KiB chunks on average (128 KiB to 2 MiB), seed 0; RepMaxCDC with
/// chunks of 256 KiB to 512 KiB and a horizon of 2 MiB.
const FAST_CDC_AVG: u64 = 512 << 10;
const FAST_CDC_SEED: u32 = 0;
const REP_MAX_MIN: u64 = 256 << 10;
const REP_MAX_HORIZON: u64 = 8 * REP_MAX_MIN;

/// A chunking function with its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunking {
    FastCdc2020(FastCdc),
    RepMaxCdc(RepMax),
}

impl Chunking {
    /// The function a request asks for, with this server's parameters: the
    /// one named, or FastCDC (which Bazel prefers) when it names none this
    /// server knows (the spec lets the server choose).
    pub fn for_request(wire: i32) -> Chunking {
        match Wire::try_from(wire) {
            Ok(Wire::RepMaxCdc) => {
                Chunking::RepMaxCdc(RepMax::new(REP_MAX_MIN, REP_MAX_HORIZON).expect("valid parameters"))
            }
            _ => Chunking::FastCdc2020(FastCdc::new(FAST_CDC_AVG, FAST_CDC_SEED).expect("valid parameters")),
        }
    }

    /// The parameters advertised in Capabilities.
    pub fn advertised() -> (FastCdc2020Params, RepMaxCdcParams) {
        (
            FastCdc2020Params { avg_chunk_size_bytes: FAST_CDC_AVG, seed: FAST_CDC_SEED },
            RepMaxCdcParams { min_chunk_size_bytes: REP_MAX_MIN, horizon_size_bytes: REP_MAX_HORIZON },
        )
    }

    /// The bytes [`Chunking::cut`] needs to decide a chunk (or all that are
    /// left of the blob).
    pub fn window(&self) -> usize {
        match self {
            Chunking::FastCdc2020(c) => c.max_size(),
            Chunking::RepMaxCdc(c) => c.window(),
        }
    }

    /// A pass over one blob, from its first byte.
    pub fn pass(&self) -> Pass {
        match self {
            Chunking::FastCdc2020(c) => Pass::FastCdc2020(c.clone()),
            Chunking::RepMaxCdc(c) => Pass::RepMaxCdc(c.pass()),
        }
    }

    /// The function as the wire names it.
    pub fn wire(&self) -> Wire {
        match self {
            Chunking::FastCdc2020(_) => Wire::FastCdc2020,
            Chunking::RepMaxCdc(_) => Wire::RepMaxCdc,
        }
    }

    /// The chunk lengths of a whole blob in memory.
    pub fn split(&self, data: &[u8]) -> Vec<usize> {
        let (mut pass, mut lengths, mut at) = (self.pass(), Vec::new(), 0);
        while at < data.len() {
            let cut = pass.cut(&data[at..]);
            lengths.push(cut);
            at += cut;
        }
        lengths
    }
}

/// One pass of a chunking function over one blob, chunk after chunk.
pub enum Pass {
    FastCdc2020(FastCdc),
    RepMaxCdc(repmax::Pass),
}

impl Pass {
    /// The length of the next chunk: `data` starts where the last chunk
    /// ended, and holds at least [`Chunking::window`] bytes or all that is
    /// left of the blob. Only an empty `data` gives 0.
    pub fn cut(&mut self, data: &[u8]) -> usize {
        match self {
            Pass::FastCdc2020(c) => c.cut(data),
            Pass::RepMaxCdc(pass) => pass.cut(data),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// The input of the published test vectors (see tests/data/README.md).
    pub fn sekien() -> &'static [u8] {
        let data: &[u8] = include_bytes!("../../tests/data/SekienAkashita.jpg");
        assert_eq!(sha256(data), "d9e749d9367fc908876749d6502eb212fee88c9a94892fb07da5ef3ba8bc39ed");
        data
    }

    pub fn sha256(data: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(data))
    }
}
