//! The gRPC codec: prost's, with every request message's entries counted on
//! the wire before it is decoded.
//!
//! Decoding builds a struct per entry: a FindMissingBlobs of two-byte empty
//! digests costs some 32 bytes of memory per wire byte, so a 4 MB request
//! would cost over a hundred megabytes before any handler could refuse it.
//! Counting fields on the wire costs nothing, and a request over the limit is
//! refused with INVALID_ARGUMENT naming it.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Buf;
use prost::{Message, Name};
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic_prost::ProstCodec;

/// `max_call_entries`: most entries (digests, blobs, output files...) one
/// message may carry. Set once at start from the configuration; the codec is
/// built by generated code, which cannot pass it along.
static MAX_ENTRIES: AtomicUsize = AtomicUsize::new(100_000);

/// Sets the entry limit for every message decoded from now on.
pub fn set_max_entries(max: usize) {
    MAX_ENTRIES.store(max, Ordering::Relaxed);
}

pub fn max_entries() -> usize {
    MAX_ENTRIES.load(Ordering::Relaxed)
}

/// Fields of a few messages whose own fields are entries too: the protobuf
/// field numbers to descend into, level by level. Every other message counts
/// its top-level fields.
pub fn nested<M: Name>() -> &'static [&'static [u32]] {
    if M::PACKAGE != "build.bazel.remote.execution.v2" {
        return &[];
    }
    match M::NAME {
        // action_result: its output files, directories and symlinks.
        "UpdateActionResultRequest" => &[&[3]],
        // root and children: their files, directories and symlinks.
        "Tree" => &[&[1, 2]],
        _ => &[],
    }
}

/// Fields (`nested` levels deep) of a protobuf message, counting stopped once
/// past `limit`. Malformed input ends the count: prost's decoder then says
/// what is wrong with it.
pub fn count_entries(buf: &[u8], nested: &[&[u32]], limit: usize) -> usize {
    let mut count = 0;
    let mut at = 0;
    while at < buf.len() && count <= limit {
        let Some((key, used)) = varint(&buf[at..]) else { break };
        at += used;
        count += 1;
        at = match key & 7 {
            0 => match varint(&buf[at..]) {
                Some((_, used)) => at + used,
                None => break,
            },
            1 => at + 8,
            5 => at + 4,
            2 => {
                let Some((len, used)) = varint(&buf[at..]) else { break };
                let start = at + used;
                let Some(end) = usize::try_from(len).ok().and_then(|l| start.checked_add(l)) else { break };
                if end > buf.len() {
                    break;
                }
                if count <= limit
                    && let Some((here, deeper)) = nested.split_first()
                    && u32::try_from(key >> 3).is_ok_and(|tag| here.contains(&tag))
                {
                    count += count_entries(&buf[start..end], deeper, limit - count);
                }
                end
            }
            // Groups (long deprecated) and invalid wire types.
            _ => break,
        };
    }
    count
}

fn varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Checks a message's entries against the limit before it is decoded.
pub fn check_entries<M: Name>(wire: &[u8]) -> Result<(), Status> {
    let limit = max_entries();
    let count = count_entries(wire, nested::<M>(), limit);
    if count > limit {
        return Err(Status::invalid_argument(format!(
            "the {} carries more than {limit} entries (max_call_entries): split it into smaller calls",
            M::NAME
        )));
    }
    Ok(())
}

/// prost's codec, with [`check_entries`] before each decode.
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = CountingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CountingDecoder(PhantomData)
    }
}

pub struct CountingDecoder<U>(PhantomData<U>);

impl<U: Message + Name + Default> Decoder for CountingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // A message arrives whole in one buffer; should it ever not, the
        // count covers what is contiguous, and decoding is bounded anyway.
        check_entries::<U>(buf.chunk())?;
        let message =
            U::decode(buf).map_err(|e| Status::internal(format!("the message does not decode: {e}")))?;
        Ok(Some(message))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reapi;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// Any bytes: the count stops just past its limit, and what passes
        /// the check decodes or fails cleanly.
        #[test]
        fn any_bytes_are_counted_within_the_limit(wire in crate::hostile::bytes(), limit in 0usize..64) {
            prop_assert!(count_entries(&wire, &[&[3]], limit) <= limit + 1);
            prop_assert!(count_entries(&wire, &[&[1, 2]], limit) <= limit + 1);
            if check_entries::<reapi::UpdateActionResultRequest>(&wire).is_ok() {
                let _ = reapi::UpdateActionResultRequest::decode(&wire[..]);
            }
            if check_entries::<reapi::Tree>(&wire).is_ok() {
                let _ = reapi::Tree::decode(&wire[..]);
            }
        }
    }

    #[test]
    fn entries_are_counted_on_the_wire() {
        let digests = vec![reapi::Digest::default(); 1000];
        let request = reapi::FindMissingBlobsRequest {
            instance_name: "main".into(),
            blob_digests: digests,
            digest_function: 1,
        };
        assert_eq!(count_entries(&request.encode_to_vec(), &[], usize::MAX), 1002);
        assert_eq!(count_entries(&request.encode_to_vec(), &[], 10), 11, "stops past the limit");

        let result = reapi::ActionResult {
            output_files: vec![reapi::OutputFile::default(); 500],
            exit_code: 1,
            ..Default::default()
        };
        let update = reapi::UpdateActionResultRequest { action_result: Some(result), ..Default::default() };
        let nested = nested::<reapi::UpdateActionResultRequest>();
        assert_eq!(count_entries(&update.encode_to_vec(), nested, usize::MAX), 1 + 501);
        // Truncated or garbage input just ends the count.
        assert!(count_entries(&[0x12, 0x7f, 0x00], &[], usize::MAX) <= 1);
        assert!(count_entries(&[0xff; 20], &[], usize::MAX) <= 1);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_by_name() {
        let request = reapi::BatchReadBlobsRequest {
            digests: vec![reapi::Digest::default(); 200_001],
            ..Default::default()
        };
        let status = check_entries::<reapi::BatchReadBlobsRequest>(&request.encode_to_vec()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("BatchReadBlobsRequest carries more than"), "{}", status.message());
    }
}
