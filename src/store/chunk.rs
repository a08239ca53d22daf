//! The chunk codec: each stored chunk is a payload followed by one tag byte
//! (at the end, so zstd can write its frame straight into the value).
//!
//! - `RAW`: the bytes as they are (tiny chunks, and chunks zstd cannot shrink);
//! - `ZSTD`: one complete zstd frame with its content size and checksum, so
//!   that it can be decompressed alone and later sent as-is to zstd clients.

use std::cell::RefCell;

use bytes::Bytes;

const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// Below this, compression rarely pays for its frame header.
const MIN_COMPRESS: usize = 128;

thread_local! {
    // zstd contexts are costly to set up; each worker thread keeps its own.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Chunks at least this large are probed before being compressed whole.
const PROBE_FROM: usize = 64 << 10;
const PROBE_SLICES: usize = 4;
const PROBE_SLICE: usize = 4 << 10;

/// Encodes a chunk for storage at the given zstd level.
pub fn encode(data: &[u8], level: i32) -> Vec<u8> {
    if data.len() >= MIN_COMPRESS && (data.len() < PROBE_FROM || looks_compressible(data, level)) {
        let compressed = with_compressor(level, |c| {
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()) + 1);
            let n = c.compress_to_buffer(data, &mut out).ok()?;
            // A frame that does not save at least 1/32 is not worth decompressing.
            (n < data.len() - data.len() / 32).then(|| {
                out.push(ZSTD);
                out
            })
        })
        .flatten();
        if let Some(out) = compressed {
            return out;
        }
    }
    let mut out = Vec::with_capacity(data.len() + 1);
    out.extend_from_slice(data);
    out.push(RAW);
    out
}

/// Runs `f` with this thread's compressor at `level`; `None` if zstd failed to set up.
fn with_compressor<T>(level: i32, f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> T) -> Option<T> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().map(|(l, _)| *l) != Some(level) {
            let mut c = zstd::bulk::Compressor::new(level).ok()?;
            c.include_checksum(true).ok()?;
            c.include_contentsize(true).ok()?;
            *cell = Some((level, c));
        }
        cell.as_mut().map(|(_, c)| f(c))
    })
}

/// Compresses a few slices spread over `data`: incompressible data (already
/// compressed archives, media, random bytes) is then stored raw for about 2 %
/// of the cost of trying to compress it all.
fn looks_compressible(data: &[u8], level: i32) -> bool {
    let step = data.len() / PROBE_SLICES;
    let mut sample = Vec::with_capacity(PROBE_SLICES * PROBE_SLICE);
    for i in 0..PROBE_SLICES {
        sample.extend_from_slice(&data[i * step..i * step + PROBE_SLICE]);
    }
    let compressed = with_compressor(level, |c| c.compress(&sample).ok()).flatten();
    compressed.is_some_and(|c| c.len() < sample.len() - sample.len() / 16)
}

/// Decodes a stored chunk. `None` means the value is corrupt.
pub fn decode(value: &[u8]) -> Option<Bytes> {
    let (&tag, payload) = value.split_last()?;
    match tag {
        RAW => Some(Bytes::copy_from_slice(payload)),
        ZSTD => {
            let size = zstd::zstd_safe::get_frame_content_size(payload).ok()??;
            DECOMPRESSOR.with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(zstd::bulk::Decompressor::new().ok()?);
                }
                let out = cell.as_mut()?.decompress(payload, size as usize).ok()?;
                (out.len() as u64 == size).then(|| Bytes::from(out))
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_compressible_random_and_tiny() {
        let text: Vec<u8> = b"fn main() { println!(\"hello\"); }\n".repeat(4096);
        let random: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for data in [&text[..], &random[..], b"tiny", b""] {
            let stored = encode(data, 1);
            assert_eq!(decode(&stored).unwrap(), data);
        }
        assert!(encode(&text, 1).len() < text.len() / 10, "text compresses");
        assert_eq!(encode(b"tiny", 1).last(), Some(&RAW));
    }

    #[test]
    fn corrupt_values_are_rejected() {
        assert!(decode(b"").is_none());
        assert!(decode(&[9, 1, 2]).is_none());
        let mut stored = encode(&b"abcdefgh".repeat(1000), 1);
        let checksum = stored.len() - 2;
        stored[checksum] ^= 0xff; // breaks the frame checksum
        assert!(decode(&stored).is_none());
    }
}
