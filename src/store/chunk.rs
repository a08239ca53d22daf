//! The chunk codec: each stored chunk is a payload, the CRC-32C of the
//! payload (4 bytes, little-endian), and one tag byte (at the end, so zstd
//! can write its frame straight into the value). The checksum is checked
//! before any byte of a chunk is served, compressed or not.
//!
//! - `RAW_SUMMED`: the bytes as they are (tiny chunks, and chunks zstd
//!   cannot shrink);
//! - `ZSTD_SUMMED`: one complete zstd frame with its content size, so that it
//!   can be decompressed alone, and sent as it is to clients that read zstd.
//!   Frames larder writes carry no checksum of their own (zstd's XXH64 of
//!   the content): the seal already proves the frame is the one written, and
//!   zstd verifying its own would cost every read of it a second pass.
//!
//! `RAW` and `ZSTD` are the same without the checksum, as larder wrote them
//! before it had one: still read, never written.
//!
//! A chunk of a blob kept in a file of its own (see `files`) is stored there
//! encoded as above; its value in RocksDB is then a reference, tagged
//! `IN_FILE`: where the encoded chunk starts in the file (8 bytes, BE) and
//! its length (8 bytes, BE), sealed with a checksum like any value.
//!
//! A blob kept as a list of other blobs (see `layout`, "Lists") has no
//! chunks of its own: each of its values is a reference to a whole blob,
//! tagged `BLOB_REF`: the blob's function (1), hash and size (8, BE), and the
//! blob id it had when the list took hold of it (8, BE), sealed the same way.

use std::cell::RefCell;

use bytes::Bytes;

use crate::compression;
use crate::crc::{crc32c, crc32c_append};
use crate::digest::{Digest, Function};

const RAW: u8 = 0;
const ZSTD: u8 = 1;
// Far (in bits) from the legacy tags and from each other: no single flipped
// bit turns a checked value into an unchecked one, or one kind into another.
const RAW_SUMMED: u8 = 0xa5;
const ZSTD_SUMMED: u8 = 0x5a;
const IN_FILE: u8 = 0xc3;
const BLOB_REF: u8 = 0x3c;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Raw,
    Zstd,
}

/// Ends a value: the checksum of the payload `out` holds and of the tag,
/// then the tag.
fn seal(mut out: Vec<u8>, kind: Kind) -> Vec<u8> {
    let tag = match kind {
        Kind::Raw => RAW_SUMMED,
        Kind::Zstd => ZSTD_SUMMED,
    };
    let crc = checksum(&out, tag);
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(tag);
    out
}

/// The value that says a chunk is `len` encoded bytes at `pos` in its
/// blob's file.
pub fn file_ref(pos: u64, len: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(21);
    payload.extend_from_slice(&pos.to_be_bytes());
    payload.extend_from_slice(&(len as u64).to_be_bytes());
    let crc = checksum(&payload, IN_FILE);
    payload.extend_from_slice(&crc.to_le_bytes());
    payload.push(IN_FILE);
    payload
}

/// Whether a stored value refers to a chunk in a file (checked or not: see
/// [`file_ref_of`]).
pub fn is_file_ref(value: &[u8]) -> bool {
    value.last() == Some(&IN_FILE)
}

/// Where the chunk a reference names is in its file, and its length. `None`
/// means the reference is corrupt (no encoded chunk is longer than the
/// largest chunk and its seal).
pub fn file_ref_of(value: &[u8]) -> Option<(u64, usize)> {
    let (&IN_FILE, rest) = value.split_last()? else { return None };
    let (payload, crc) = rest.split_last_chunk::<4>()?;
    if payload.len() != 16 || checksum(payload, IN_FILE) != u32::from_le_bytes(*crc) {
        return None;
    }
    let (pos, len) = payload.split_at(8);
    let (pos, len) = (u64::from_be_bytes(pos.try_into().ok()?), u64::from_be_bytes(len.try_into().ok()?));
    (len <= MAX_CHUNK_SIZE as u64 + SEAL_LEN).then_some((pos, len as usize))
}

/// The value that says the bytes at its offset are the whole blob `digest`,
/// stored under `blob_id`.
pub fn blob_ref(digest: &Digest, blob_id: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + digest.hash().len() + 8 + 8 + 5);
    payload.push(digest.function as u8);
    payload.extend_from_slice(digest.hash());
    payload.extend_from_slice(&digest.size.to_be_bytes());
    payload.extend_from_slice(&blob_id.to_be_bytes());
    let crc = checksum(&payload, BLOB_REF);
    payload.extend_from_slice(&crc.to_le_bytes());
    payload.push(BLOB_REF);
    payload
}

/// Whether a stored value carries no checksum of its own: a chunk as
/// larder wrote them before checksums (`RAW`, `ZSTD` tags).
pub fn is_unsummed(value: &[u8]) -> bool {
    matches!(value.last(), Some(&RAW) | Some(&ZSTD))
}

/// Whether a stored value refers to a whole blob (checked or not: see
/// [`blob_ref_of`]).
pub fn is_blob_ref(value: &[u8]) -> bool {
    value.last() == Some(&BLOB_REF)
}

/// The blob a reference names, and the blob id it had. `None` means the
/// reference is corrupt.
pub fn blob_ref_of(value: &[u8]) -> Option<(Digest, u64)> {
    let (&BLOB_REF, rest) = value.split_last()? else { return None };
    let (payload, crc) = rest.split_last_chunk::<4>()?;
    if checksum(payload, BLOB_REF) != u32::from_le_bytes(*crc) {
        return None;
    }
    let (&function, rest) = payload.split_first()?;
    let function = Function::from_byte(function)?;
    let (rest, blob_id) = rest.split_last_chunk::<8>()?;
    let (hash, size) = rest.split_last_chunk::<8>()?;
    let digest = Digest::new(function, hash, u64::from_be_bytes(*size))?;
    (hash.len() == function.hash_len()).then_some((digest, u64::from_be_bytes(*blob_id)))
}

/// Covers the tag too: a flipped tag must not pass a frame off as raw bytes.
fn checksum(payload: &[u8], tag: u8) -> u32 {
    crc32c_append(crc32c(payload), &[tag])
}

/// The kind and payload of a value, its checksum verified. `None` means the
/// value is corrupt.
fn open(value: &[u8]) -> Option<(Kind, &[u8])> {
    let (&tag, rest) = value.split_last()?;
    match tag {
        RAW => Some((Kind::Raw, rest)),
        ZSTD => Some((Kind::Zstd, rest)),
        RAW_SUMMED | ZSTD_SUMMED => {
            let (payload, crc) = rest.split_last_chunk::<4>()?;
            if checksum(payload, tag) != u32::from_le_bytes(*crc) {
                return None;
            }
            Some((if tag == RAW_SUMMED { Kind::Raw } else { Kind::Zstd }, payload))
        }
        _ => None,
    }
}

/// The payload's length, from the tag alone (no checksum).
fn payload_len(value: &[u8]) -> Option<(Kind, usize)> {
    let (&tag, rest) = value.split_last()?;
    match tag {
        RAW => Some((Kind::Raw, rest.len())),
        ZSTD => Some((Kind::Zstd, rest.len())),
        RAW_SUMMED => Some((Kind::Raw, rest.len().checked_sub(4)?)),
        ZSTD_SUMMED => Some((Kind::Zstd, rest.len().checked_sub(4)?)),
        _ => None,
    }
}

/// The most bytes one chunk holds (the largest `chunk_size`). A frame that
/// declares more is corrupt or hostile (an object-store object is anyone's
/// bytes): it is refused before anything is allocated for it.
pub const MAX_CHUNK_SIZE: usize = 64 << 20;

/// The bytes an encoded chunk may take beyond its data: a checksum and a tag.
pub const SEAL_LEN: u64 = 5;

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

/// Encodes a chunk for storage at the given zstd level (0: uncompressed).
pub fn encode(data: &[u8], level: i32) -> Vec<u8> {
    if level > 0 && data.len() >= MIN_COMPRESS && (data.len() < PROBE_FROM || looks_compressible(data, level))
    {
        let compressed = with_compressor(level, |c| {
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()) + 5);
            let n = c.compress_to_buffer(data, &mut out).ok()?;
            // A frame that does not save at least 1/32 is not worth decompressing.
            (n < data.len() - data.len() / 32).then(|| seal(out, Kind::Zstd))
        })
        .flatten();
        if let Some(out) = compressed {
            return out;
        }
    }
    raw(data)
}

/// Encodes a chunk that arrived as the client's zstd `frame` of `data`:
/// keeps the frame (completing its header) when it saves what our own
/// compression must, stores `data` raw when the client's compressor could not
/// shrink it, and compresses `data` itself only if the frame cannot be kept.
pub fn encode_frame(frame: &[u8], data: &[u8], level: i32) -> Vec<u8> {
    // With room for the content size the header may gain.
    if level == 0 || frame.len() + 8 >= data.len() - data.len() / 32 {
        return raw(data);
    }
    match compression::with_content_size(frame, data.len() as u64) {
        Some(out) => seal(out, Kind::Zstd),
        None => encode(data, level),
    }
}

/// Cuts a blob's bytes into stored chunks as they arrive, and keeps a
/// client's zstd frame as the stored form of a chunk where the frame holds
/// the whole chunk: it began where a chunk begins, its compressed bytes and
/// the bytes it decodes to each fit in `chunk_size`, and it decodes to at
/// least `min_kept` bytes or ends the blob. Other bytes are cut at
/// `chunk_size`. The one home of that rule, for uploads (which feed it as
/// they decompress) and batches (which feed it each frame whole).
pub struct Chunker {
    chunk_size: usize,
    min_kept: usize,
    /// Bytes not stored yet: less than a chunk.
    out: Vec<u8>,
    /// The compressed bytes of the current frame, while `capturing`: while
    /// it may still become a chunk of its own. Reused from frame to frame.
    frame: Vec<u8>,
    capturing: bool,
}

impl Chunker {
    pub fn new(chunk_size: usize, min_kept: usize) -> Chunker {
        Chunker {
            chunk_size,
            min_kept,
            out: Vec::with_capacity(chunk_size),
            frame: Vec::new(),
            capturing: true,
        }
    }

    /// Bytes taken and not stored yet.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Compressed bytes of the current frame, as they are consumed.
    pub fn frame_bytes(&mut self, compressed: &[u8]) {
        if self.capturing {
            self.frame.extend_from_slice(compressed);
            // Larger than the bytes it could hold raw: never kept.
            self.capturing = self.frame.len() <= self.chunk_size;
        }
    }

    /// Bytes the current frame decoded to; `frame_ends` if they are its
    /// last. Full chunks go to `emit` (bytes, and the frame to keep).
    pub fn data<E>(
        &mut self,
        mut data: &[u8],
        frame_ends: bool,
        emit: &mut impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            // A whole chunk that no frame can claim goes out uncopied.
            let whole_chunk = self.out.is_empty() && data.len() >= self.chunk_size;
            if whole_chunk && !(frame_ends && data.len() == self.chunk_size) {
                self.capturing = false;
                emit(&data[..self.chunk_size], None)?;
                data = &data[self.chunk_size..];
                continue;
            }
            let n = data.len().min(self.chunk_size - self.out.len());
            self.out.extend_from_slice(&data[..n]);
            data = &data[n..];
            // A full chunk inside a frame: that frame spans chunks.
            if self.out.len() == self.chunk_size && !(frame_ends && data.is_empty()) {
                self.capturing = false;
                emit(&self.out, None)?;
                self.out.clear();
            }
        }
        Ok(())
    }

    /// The current frame ended; `ends_blob` if the bytes taken so far
    /// complete the blob.
    pub fn frame_end<E>(
        &mut self,
        ends_blob: bool,
        emit: &mut impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        let whole = self.out.len() >= self.min_kept || ends_blob;
        if self.capturing && !self.out.is_empty() && whole {
            // The frame holds exactly these bytes: keep it.
            emit(&self.out, Some(&self.frame))?;
            self.out.clear();
        } else if self.out.len() == self.chunk_size {
            emit(&self.out, None)?;
            self.out.clear();
        }
        self.frame.clear();
        self.capturing = self.out.is_empty();
        Ok(())
    }

    /// Bytes that arrived in no frame of the client's.
    pub fn unframed<E>(
        &mut self,
        data: &[u8],
        emit: &mut impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.capturing = false;
        self.frame.clear();
        self.data(data, false, emit)?;
        self.capturing = self.out.is_empty();
        Ok(())
    }

    /// Stores what is left: the end of the blob, or of what arrived.
    pub fn flush<E>(
        &mut self,
        emit: &mut impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.capturing = false;
        if !self.out.is_empty() {
            emit(&self.out, None)?;
            self.out.clear();
        }
        Ok(())
    }
}

fn raw(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 5);
    out.extend_from_slice(data);
    seal(out, Kind::Raw)
}

/// Runs `f` with this thread's compressor at `level`; `None` if zstd failed to set up.
fn with_compressor<T>(level: i32, f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> T) -> Option<T> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().map(|(l, _)| *l) != Some(level) {
            let mut c = zstd::bulk::Compressor::new(level).ok()?;
            c.include_checksum(false).ok()?;
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

/// Decodes a stored chunk, its checksum verified. `None` means the value is
/// corrupt.
pub fn decode(value: &[u8]) -> Option<Bytes> {
    match open(value)? {
        (Kind::Raw, payload) => Some(Bytes::copy_from_slice(payload)),
        (Kind::Zstd, frame) => decompress(frame),
    }
}

/// [`decode`] of a value in memory of its own: raw bytes stay where they
/// are, not copied.
pub fn decode_owned(mut value: Bytes) -> Option<Bytes> {
    let (kind, len) = open(&value).map(|(kind, payload)| (kind, payload.len()))?;
    match kind {
        Kind::Raw => {
            value.truncate(len);
            Some(value)
        }
        Kind::Zstd => decompress(&value[..len]),
    }
}

fn decompress(frame: &[u8]) -> Option<Bytes> {
    let size = frame_content_size(frame)?;
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        let out = cell.as_mut()?.decompress(frame, size as usize).ok()?;
        (out.len() as u64 == size).then(|| Bytes::from(out))
    })
}

/// The bytes a frame declares it holds; `None` if it declares none, or more
/// than a chunk can hold.
fn frame_content_size(frame: &[u8]) -> Option<u64> {
    let size = zstd::zstd_safe::get_frame_content_size(frame).ok()??;
    (size <= MAX_CHUNK_SIZE as u64).then_some(size)
}

/// How many bytes of the blob a stored chunk holds, its checksum verified
/// (without decompressing). `None` means the value is corrupt.
pub fn content_len(value: &[u8]) -> Option<u64> {
    match open(value)? {
        (Kind::Raw, payload) => Some(payload.len() as u64),
        (Kind::Zstd, frame) => frame_content_size(frame),
    }
}

pub fn is_compressed(value: &[u8]) -> bool {
    payload_len(value).is_some_and(|(kind, _)| kind == Kind::Zstd)
}

/// The chunk's bytes from `skip` on, as one zstd frame, its checksum
/// verified once: a stored frame as it is (no copy), raw bytes wrapped in raw
/// blocks (no compression). Only a compressed chunk entered past its start
/// is decompressed, to be wrapped raw. Also returns how many bytes the frame
/// holds. `None` means the value is corrupt, or `skip` is past its end.
pub fn to_frame(mut value: Bytes, skip: usize) -> Option<(Bytes, u64)> {
    let wrap = |data: &[u8]| Some((Bytes::from(compression::raw_frame(data)), data.len() as u64));
    match open(&value)? {
        (Kind::Raw, payload) => wrap(payload.get(skip..)?),
        (Kind::Zstd, frame) if skip > 0 => wrap(decompress(frame)?.get(skip..)?),
        (Kind::Zstd, frame) => {
            let (len, held) = (frame.len(), frame_content_size(frame)?);
            value.truncate(len);
            Some((value, held))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// Stored values come from disk or from the object store, which
        /// holds anyone's bytes: any value decodes or is corrupt, sealed
        /// with a good checksum or not, and never yields more than a chunk.
        #[test]
        fn any_value_decodes_or_is_corrupt(payload in crate::hostile::bytes(), zstd in any::<bool>()) {
            let kind = if zstd { Kind::Zstd } else { Kind::Raw };
            for value in [payload.clone(), seal(payload.clone(), kind)] {
                if let Some(data) = decode(&value) {
                    prop_assert!(data.len() <= MAX_CHUNK_SIZE);
                }
                prop_assert!(content_len(&value).is_none_or(|n| n <= MAX_CHUNK_SIZE as u64));
                let _ = to_frame(Bytes::from(value.clone()), 0);
                let _ = to_frame(Bytes::from(value), 3);
            }
            let mut reference = payload.clone();
            reference.push(BLOB_REF);
            prop_assert!(blob_ref_of(&reference).is_none_or(|(d, _)| d.hash().len() == d.function.hash_len()));
            let mut reference = payload.clone();
            reference.push(IN_FILE);
            prop_assert!(file_ref_of(&reference).is_none_or(|(_, len)| len <= MAX_CHUNK_SIZE + 5));
        }
    }

    #[test]
    fn blob_refs_round_trip_and_fail_their_check_when_changed() {
        for f in Function::ALL {
            let d = f.digest(b"a chunk");
            let value = blob_ref(&d, 77);
            assert!(is_blob_ref(&value) && !is_file_ref(&value));
            assert_eq!(blob_ref_of(&value), Some((d, 77)));
            for i in 0..value.len() - 1 {
                let mut bad = value.clone();
                bad[i] ^= 1;
                assert_eq!(blob_ref_of(&bad), None, "flipped byte {i}");
            }
            assert!(decode(&value).is_none(), "a reference is no chunk");
        }
    }

    #[test]
    fn round_trip_compressible_random_and_tiny() {
        let text: Vec<u8> = b"fn main() { println!(\"hello\"); }\n".repeat(4096);
        let random: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for data in [&text[..], &random[..], b"tiny", b""] {
            let stored = encode(data, 1);
            assert_eq!(decode(&stored).unwrap(), data);
        }
        assert!(encode(&text, 1).len() < text.len() / 10, "text compresses");
        assert_eq!(encode(b"tiny", 1).last(), Some(&RAW_SUMMED));
    }

    #[test]
    fn chunks_become_frames_from_any_offset() {
        let text: Vec<u8> = b"fn main() { println!(\"hello\"); }\n".repeat(4096);
        let random = crate::testdata::random_bytes(100_000, 1);
        for data in [&text[..], &random[..]] {
            let stored = encode(data, 1);
            assert_eq!(content_len(&stored), Some(data.len() as u64));
            for skip in [0, 1, 5000, data.len() - 1, data.len()] {
                let (frame, held) = to_frame(Bytes::from(stored.clone()), skip).unwrap();
                assert_eq!(held, (data.len() - skip) as u64);
                assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), &data[skip..], "skip {skip}");
            }
            assert!(to_frame(Bytes::from(stored.clone()), data.len() + 1).is_none());
        }
        let stored = encode(&text, 1);
        assert!(is_compressed(&stored));
        assert_eq!(
            to_frame(Bytes::from(stored.clone()), 0).unwrap().0,
            stored[..stored.len() - 5],
            "sent as stored"
        );
    }

    #[test]
    fn client_frames_are_kept_completed_or_stored_raw() {
        let text: Vec<u8> = b"let x = compile(unit);\n".repeat(5000);
        let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut e, &text).unwrap();
        let frame = e.finish().unwrap();
        let stored = encode_frame(&frame, &text, 1);
        assert!(
            stored.ends_with(&[ZSTD_SUMMED]) && stored.len() < frame.len() + 13,
            "kept, not recompressed"
        );
        assert_eq!(decode(&stored).unwrap(), text);
        assert_eq!(content_len(&stored), Some(text.len() as u64));

        let random = crate::testdata::random_bytes(50_000, 2);
        let frame = zstd::bulk::compress(&random, 3).unwrap();
        assert_eq!(encode_frame(&frame, &random, 1).last(), Some(&RAW_SUMMED), "incompressible: raw");
        // Two frames are not one chunk frame: compressed afresh instead.
        let two =
            [zstd::bulk::compress(&text[..10], 1).unwrap(), zstd::bulk::compress(&text[10..], 1).unwrap()];
        let stored = encode_frame(&two.concat(), &text, 1);
        assert_eq!(decode(&stored).unwrap(), text);
    }

    #[test]
    fn any_flipped_byte_is_caught_by_the_checksum() {
        let text: Vec<u8> = b"fn main() { println!(\"hello\"); }\n".repeat(4096);
        let random = crate::testdata::random_bytes(100_000, 2);
        for data in [&text[..], &random[..]] {
            let stored = encode(data, 1);
            let tag = stored.len() - 1;
            let flips = [0, stored.len() / 2, stored.len() - 3].map(|at| (at, 0x01)).into_iter();
            for (at, bit) in flips.chain((0..8).map(|bit| (tag, 1u8 << bit))) {
                let mut bad = stored.clone();
                bad[at] ^= bit;
                assert!(decode(&bad).is_none(), "flip {bit:#x} at {at}");
                assert!(content_len(&bad).is_none(), "flip {bit:#x} at {at}, length");
                assert!(to_frame(Bytes::from(bad), 0).is_none(), "flip {bit:#x} at {at}, sent as a frame");
            }
        }
        // Values written before checksums still read.
        let mut legacy = b"old bytes".to_vec();
        legacy.push(RAW);
        assert_eq!(decode(&legacy).unwrap(), b"old bytes".as_slice());
    }

    #[test]
    fn frames_declaring_more_than_a_chunk_are_refused_unallocated() {
        // A valid frame header declaring 2^62 bytes, sealed with a good
        // checksum: what a hostile object in the object store could hold.
        let mut frame = zstd::bulk::compress(b"tiny", 1).unwrap();
        let declared = 1u64 << 62;
        // Rewrite the header to an 8-byte content size field (FCS flag 3).
        let descriptor = frame[4];
        let old_fcs = match descriptor >> 6 {
            0 => usize::from(descriptor & 0x20 != 0),
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let window = usize::from(descriptor & 0x20 == 0);
        let body = frame.split_off(5 + window + old_fcs);
        frame.truncate(5 + window);
        frame[4] = (descriptor & 0x3f) | 0xc0;
        frame.extend_from_slice(&declared.to_le_bytes());
        frame.extend_from_slice(&body);
        assert_eq!(zstd::zstd_safe::get_frame_content_size(&frame).ok(), Some(Some(declared)));
        let stored = seal(frame, Kind::Zstd);
        assert!(decode(&stored).is_none());
        assert!(content_len(&stored).is_none());
        assert!(to_frame(Bytes::from(stored.clone()), 0).is_none());
        assert!(to_frame(Bytes::from(stored), 1).is_none());
    }

    #[test]
    fn frames_written_now_carry_no_checksum_and_older_ones_still_decode() {
        let data = b"abcdefgh".repeat(1000);
        let stored = encode(&data, 1);
        let (kind, frame) = open(&stored).expect("sealed");
        assert!(kind == Kind::Zstd);
        // The frame header's descriptor follows the 4-byte magic; bit 2 is
        // the content checksum flag.
        assert_eq!(frame[4] & 0x04, 0, "no XXH64 of the content");
        assert_eq!(decode(&stored).as_deref(), Some(&data[..]));

        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        c.include_checksum(true).unwrap();
        c.include_contentsize(true).unwrap();
        let older = seal(c.compress(&data).unwrap(), Kind::Zstd);
        assert_ne!(open(&older).expect("sealed").1[4] & 0x04, 0);
        assert_eq!(
            decode(&older).as_deref(),
            Some(&data[..]),
            "a frame with its checksum, as written before"
        );
    }

    #[test]
    fn corrupt_values_are_rejected() {
        assert!(decode(b"").is_none());
        assert!(decode(&[9, 1, 2]).is_none());
        let mut stored = encode(&b"abcdefgh".repeat(1000), 1);
        let checksum = stored.len() - 2;
        stored[checksum] ^= 0xff; // breaks the seal's checksum
        assert!(decode(&stored).is_none());
    }

    #[test]
    fn file_references_round_trip_and_are_checked() {
        let reference = file_ref(7 << 30, 1 << 20);
        assert!(is_file_ref(&reference));
        assert_eq!(file_ref_of(&reference), Some((7 << 30, 1 << 20)));
        assert!(decode(&reference).is_none(), "a reference is not a chunk");
        for bit in 0..reference.len() * 8 - 8 {
            let mut flipped = reference.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(file_ref_of(&flipped), None, "bit {bit}");
        }
        assert_eq!(file_ref_of(&file_ref(0, MAX_CHUNK_SIZE + 6)), None);
        assert!(!is_file_ref(&encode(b"data", 0)));
    }

    /// The one rule for keeping a client's frame, as uploads (a quarter
    /// chunk or more) and batches (whole chunks only) use it.
    #[test]
    fn the_chunker_keeps_whole_frames_and_cuts_the_rest() {
        let run = |min_kept, frames: &[(usize, bool)]| {
            let mut chunks = Vec::new();
            let mut emit = |data: &[u8], frame: Option<&[u8]>| -> Result<(), ()> {
                chunks.push((data.len(), frame.is_some()));
                Ok(())
            };
            let mut chunker = Chunker::new(100, min_kept);
            let total: usize = frames.iter().map(|(len, _)| len).sum();
            let mut taken = 0;
            for &(len, framed) in frames {
                taken += len;
                if framed {
                    chunker.frame_bytes(&[0; 10]);
                    chunker.data(&vec![1; len], true, &mut emit).unwrap();
                    chunker.frame_end(taken == total, &mut emit).unwrap();
                } else {
                    chunker.unframed(&vec![1; len], &mut emit).unwrap();
                }
            }
            chunker.flush(&mut emit).unwrap();
            chunks
        };
        // A frame of 30 is kept; one of 10 is not, nor is the one that
        // then spans a chunk boundary, nor what follows it.
        let upload = run(25, &[(30, true), (10, true), (100, true), (5, true)]);
        assert_eq!(upload, [(30, true), (100, false), (15, false)]);
        // Whole chunks only: a frame of a chunk, and the blob's last one.
        let batch = run(100, &[(100, true), (30, true), (70, false), (20, true)]);
        assert_eq!(batch, [(100, true), (100, false), (20, true)]);
    }
}
