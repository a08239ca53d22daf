//! zstd on the wire: streaming decompression that a hostile stream cannot
//! inflate past a declared size, and zstd frames built around stored bytes
//! without compressing them.

use bytes::Bytes;
use zstd::zstd_safe::{self, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};

/// Largest window a client frame may ask for: 8 MiB, what zstd's levels 1 to
/// 19 use. The window is memory each decoding stream holds.
pub const MAX_WINDOW_LOG: u32 = 23;

/// zstd's frame magic number, little-endian.
const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The largest zstd block.
const MAX_BLOCK: usize = 128 << 10;

/// How much output one decoding step produces at most.
const STEP_OUTPUT: usize = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server's fault, not the stream's.
    #[error("cannot set up zstd decompression: {0}")]
    Setup(&'static str),
    #[error("the zstd data decompresses to more than the declared {0} bytes")]
    TooLarge(u64),
    #[error(
        "the zstd data is invalid ({0}); larder accepts standard zstd frames without dictionaries, with windows up to 8 MiB"
    )]
    Invalid(&'static str),
    #[error("the zstd data ends inside a frame")]
    Truncated,
}

/// A streaming zstd decoder that refuses to produce more than a limit.
pub struct Decoder {
    ctx: DCtx<'static>,
    scratch: Box<[u8]>,
    /// Bytes the stream may still produce.
    room: u64,
    /// Whether input was consumed since the last frame ended.
    in_frame: bool,
}

/// What one [`Decoder::step`] did.
pub struct Step<'a> {
    /// Input bytes consumed.
    pub consumed: usize,
    /// Output produced (valid until the next step).
    pub data: &'a [u8],
    /// A frame ended exactly after the consumed input.
    pub frame_end: bool,
    /// The output was cut short: step again even without more input.
    pub more: bool,
}

impl Decoder {
    /// A decoder for a stream that may decompress to at most `limit` bytes.
    pub fn new(limit: u64) -> Result<Decoder, Error> {
        let mut ctx = DCtx::try_create().ok_or(Error::Setup("no memory for a zstd context"))?;
        ctx.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(|code| Error::Setup(zstd_safe::get_error_name(code)))?;
        Ok(Decoder { ctx, scratch: vec![0; STEP_OUTPUT].into_boxed_slice(), room: limit, in_frame: false })
    }

    /// Starts a new stream with a new limit, reusing the context.
    pub fn reset(&mut self, limit: u64) -> Result<(), Error> {
        self.ctx
            .reset(ResetDirective::SessionOnly)
            .map_err(|code| Error::Setup(zstd_safe::get_error_name(code)))?;
        (self.room, self.in_frame) = (limit, false);
        Ok(())
    }

    /// Decompresses some of `input`. Stops at the end of a frame, so that
    /// callers see every frame boundary. Fails as soon as the output passes
    /// the limit: at most one byte more is ever produced.
    pub fn step(&mut self, input: &[u8]) -> Result<Step<'_>, Error> {
        let window =
            self.scratch.len().min(usize::try_from(self.room.saturating_add(1)).unwrap_or(usize::MAX));
        let mut output = OutBuffer::around(&mut self.scratch[..window]);
        let mut source = InBuffer::around(input);
        let hint = self.ctx.decompress_stream(&mut output, &mut source).map_err(zstd_error)?;
        let (consumed, produced) = (source.pos(), output.pos());
        if produced as u64 > self.room {
            return Err(Error::TooLarge(self.room));
        }
        self.room -= produced as u64;
        let frame_end = hint == 0;
        if frame_end {
            self.in_frame = false;
        } else if consumed > 0 || produced > 0 {
            self.in_frame = true;
        } else if !input.is_empty() {
            // zstd always makes progress on non-empty input; never spin.
            return Err(Error::Invalid("the stream makes no progress"));
        }
        Ok(Step {
            consumed,
            data: &self.scratch[..produced],
            frame_end,
            more: !frame_end && produced == window,
        })
    }

    /// Checks that the stream ended on a frame boundary.
    pub fn finish(&self) -> Result<(), Error> {
        if self.in_frame { Err(Error::Truncated) } else { Ok(()) }
    }
}

fn zstd_error(code: usize) -> Error {
    Error::Invalid(zstd_safe::get_error_name(code))
}

/// A whole zstd stream decompressed, with where each of its frames lies.
pub struct Decompressed {
    pub data: Bytes,
    /// Each frame that holds bytes, in order: the range of `data` it decodes
    /// to, and its bytes (a slice of the input).
    pub frames: Vec<(std::ops::Range<u64>, Bytes)>,
}

/// Decompresses a whole stream (a batch upload) that must decode to exactly
/// `size` bytes.
pub fn decompress(decoder: &mut Decoder, input: &Bytes, size: u64) -> Result<Decompressed, Error> {
    decoder.reset(size)?;
    // The declared size is the client's word: grow past what the input
    // could plausibly hold only as the output really grows.
    let guess = size.min(input.len() as u64 * 8 + 4096);
    let mut data = Vec::with_capacity(usize::try_from(guess).map_err(|_| Error::TooLarge(size))?);
    let mut frames = Vec::new();
    let (mut at, mut frame_start) = (0, (0, 0));
    loop {
        let step = decoder.step(&input[at..])?;
        data.extend_from_slice(step.data);
        at += step.consumed;
        if step.frame_end {
            // Frames that hold nothing (empty or skippable) never make a chunk.
            if data.len() > frame_start.1 {
                frames.push((frame_start.1 as u64..data.len() as u64, input.slice(frame_start.0..at)));
            }
            frame_start = (at, data.len());
        }
        if at == input.len() && !step.more {
            break;
        }
    }
    decoder.finish()?;
    Ok(Decompressed { data: Bytes::from(data), frames })
}

/// A zstd frame holding `data` in raw (uncompressed) blocks: how stored bytes
/// that did not compress are sent to clients that asked for zstd.
pub fn raw_frame(data: &[u8]) -> Vec<u8> {
    let blocks = data.len().div_ceil(MAX_BLOCK).max(1);
    let mut out = Vec::with_capacity(4 + 1 + 8 + 3 * blocks + data.len());
    out.extend_from_slice(&MAGIC);
    // Single segment: the window is the content size, so no window descriptor.
    let (flag, size_field) = content_size_field(data.len() as u64, true);
    out.push(flag << 6 | 0b0010_0000);
    out.extend_from_slice(&size_field);
    if data.is_empty() {
        out.extend_from_slice(&raw_block_header(0, true));
    }
    let mut parts = data.chunks(MAX_BLOCK).peekable();
    while let Some(part) = parts.next() {
        out.extend_from_slice(&raw_block_header(part.len(), parts.peek().is_none()));
        out.extend_from_slice(part);
    }
    out
}

fn raw_block_header(len: usize, last: bool) -> [u8; 3] {
    // Block_Size (21 bits) · Block_Type 0 (raw) · Last_Block.
    let v = (len as u32) << 3 | u32::from(last);
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// The Frame_Content_Size field for `size`: its flag and bytes, as short as
/// the format allows.
fn content_size_field(size: u64, single_segment: bool) -> (u8, Vec<u8>) {
    match size {
        0..256 if single_segment => (0, vec![size as u8]),
        256..65_792 => (1, ((size - 256) as u16).to_le_bytes().to_vec()),
        0..=0xffff_ffff => (2, (size as u32).to_le_bytes().to_vec()),
        _ => (3, size.to_le_bytes().to_vec()),
    }
}

/// `frame` (one complete zstd frame decoding to `size` bytes) with its
/// content size in the header, which stored chunks need to be decompressed
/// alone: streaming compressors leave it out. Only the header changes; the
/// blocks are kept. `None` if `frame` is not a single plain zstd frame.
pub fn with_content_size(frame: &[u8], size: u64) -> Option<Vec<u8>> {
    if !frame.starts_with(&MAGIC) || zstd_safe::find_frame_compressed_size(frame).ok()? != frame.len() {
        return None;
    }
    let descriptor = *frame.get(4)?;
    let (size_flag, single_segment, dictionary_flag) =
        (descriptor >> 6, descriptor & 0b0010_0000 != 0, descriptor & 0b11);
    if dictionary_flag != 0 || descriptor & 0b1000 != 0 {
        return None; // a dictionary id, or the reserved bit
    }
    if size_flag != 0 || single_segment {
        // The size is there already.
        let declared = zstd_safe::get_frame_content_size(frame).ok()??;
        return (declared == size).then(|| frame.to_vec());
    }
    let window = *frame.get(5)?;
    let (flag, size_field) = content_size_field(size, false);
    let mut out = Vec::with_capacity(frame.len() + size_field.len());
    out.extend_from_slice(&MAGIC);
    out.push(descriptor | flag << 6);
    out.push(window);
    out.extend_from_slice(&size_field);
    out.extend_from_slice(&frame[6..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{random_bytes, text_bytes};

    fn unzstd(stream: &[u8]) -> Vec<u8> {
        zstd::stream::decode_all(stream).unwrap()
    }

    /// What a streaming compressor without a pledged size writes: no
    /// content size in the header.
    fn streamed(data: &[u8], level: i32) -> Vec<u8> {
        let mut e = zstd::stream::Encoder::new(Vec::new(), level).unwrap();
        std::io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn raw_frames_decode_to_their_bytes() {
        for n in [0, 1, 255, 256, 65_791, 65_792, 128 << 10, (128 << 10) + 1, 1 << 20] {
            let data = random_bytes(n, n as u64);
            let frame = raw_frame(&data);
            assert_eq!(unzstd(&frame), data, "{n} bytes");
            assert_eq!(zstd_safe::get_frame_content_size(&frame).unwrap(), Some(n as u64));
            assert!(frame.len() <= n + 4 + 1 + 8 + 3 * (n / MAX_BLOCK + 1));
        }
    }

    #[test]
    fn content_sizes_are_added_without_touching_blocks() {
        for data in [text_bytes(300_000, 1), text_bytes(100, 2), random_bytes(70_000, 3)] {
            let frame = streamed(&data, 3);
            assert_eq!(zstd_safe::get_frame_content_size(&frame).unwrap(), None);
            let fixed = with_content_size(&frame, data.len() as u64).unwrap();
            assert_eq!(zstd_safe::get_frame_content_size(&fixed).unwrap(), Some(data.len() as u64));
            assert_eq!(unzstd(&fixed), data);
            assert!(fixed.ends_with(&frame[6..]), "blocks kept");
        }
        let one_shot = zstd::bulk::compress(b"abcabcabc", 1).unwrap();
        assert_eq!(with_content_size(&one_shot, 9).unwrap(), one_shot);
        assert_eq!(with_content_size(&one_shot, 10), None, "a wrong size is refused");
        let two = [streamed(b"a", 1), streamed(b"b", 1)].concat();
        assert_eq!(with_content_size(&two, 2), None, "two frames are not one");
        assert_eq!(with_content_size(b"not zstd at all", 1), None);
    }

    #[test]
    fn multi_frame_streams_decompress_with_their_frames() {
        let (a, b) = (text_bytes(200_000, 4), random_bytes(1000, 5));
        let input = Bytes::from([streamed(&a, 1), raw_frame(&b)].concat());
        let mut decoder = Decoder::new(u64::MAX).unwrap();
        let out = decompress(&mut decoder, &input, (a.len() + b.len()) as u64).unwrap();
        assert_eq!(out.data, [a.clone(), b.clone()].concat());
        let ranges: Vec<_> = out.frames.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(ranges, vec![0..a.len() as u64, a.len() as u64..(a.len() + b.len()) as u64]);
        assert_eq!(unzstd(&out.frames[1].1), b);
    }

    #[test]
    fn a_bomb_stops_one_byte_past_the_limit() {
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        assert!(bomb.len() < 10_000);
        let mut decoder = Decoder::new(1000).unwrap();
        let step = decoder.step(&bomb);
        assert!(matches!(step, Err(Error::TooLarge(_))), "the first step already fails");
        let err = decompress(&mut decoder, &Bytes::from(bomb), 1000).err().unwrap();
        assert!(matches!(err, Error::TooLarge(1000)), "{err}");
    }

    #[test]
    fn truncated_and_garbage_streams_fail() {
        let frame = streamed(&text_bytes(100_000, 6), 1);
        let mut decoder = Decoder::new(1 << 20).unwrap();
        let cut = Bytes::copy_from_slice(&frame[..frame.len() / 2]);
        assert!(matches!(decompress(&mut decoder, &cut, 100_000), Err(Error::Truncated)));
        let garbage = Bytes::from_static(b"definitely not a zstd frame");
        assert!(matches!(decompress(&mut decoder, &garbage, 10), Err(Error::Invalid(_))));
        // The context is reusable after errors.
        let ok = Bytes::from(streamed(b"fine", 1));
        assert_eq!(decompress(&mut decoder, &ok, 4).unwrap().data, b"fine".as_slice());
    }

    #[test]
    fn windows_beyond_the_limit_are_refused() {
        let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        e.set_parameter(zstd_safe::CParameter::WindowLog(MAX_WINDOW_LOG + 2)).unwrap();
        let data = text_bytes(1 << 20, 7);
        std::io::Write::write_all(&mut e, &data).unwrap();
        let wide = Bytes::from(e.finish().unwrap());
        let mut decoder = Decoder::new(data.len() as u64).unwrap();
        let err = decompress(&mut decoder, &wide, data.len() as u64).err().unwrap();
        assert!(err.to_string().contains("8 MiB"), "{err}");
    }
}
