//! The gRPC codec: prost's, with every request message's entries counted on
//! the wire before it is decoded.
//!
//! Decoding builds a struct per entry: a FindMissingBlobs of two-byte empty
//! digests costs some 32 bytes of memory per wire byte, so a 4 MB request
//! would cost over a hundred megabytes before any handler could refuse it.
//! Counting fields on the wire costs nothing, and a request over the limit is
//! refused with INVALID_ARGUMENT naming it.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Buf;
use prost::{Message, Name};
use prost_types::field_descriptor_proto::{self, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder, EncodeBuf, Encoder};

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

/// Every message's fields, from the protos larder was built from (build.rs
/// writes them): message types by full name, resolved once to indexes, so
/// that counting hashes no names.
struct Schema {
    index: HashMap<String, usize>,
    messages: Vec<Fields>,
}

struct Fields {
    by_tag: HashMap<u32, Field>,
    /// Whether any field can hold entries: a message with none (a Digest,
    /// say) is one entry, and is not looked into.
    has_entries: bool,
}

/// What decoding a field costs: a struct per message, a string per repeated
/// string, a number per packed byte at most; a single string or number
/// costs no more than its bytes on the wire, and is not an entry.
#[derive(Clone, Debug)]
enum Field {
    /// A message of this type (its index in the schema): an entry, and so
    /// are the entries inside it.
    Message(usize),
    /// Repeated strings or bytes: an entry each.
    Strings,
    /// Repeated numbers, which arrive packed: an entry per byte.
    Packed,
    /// Anything else.
    Plain,
}

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let set = FileDescriptorSet::decode(&include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"))[..])
        .expect("build.rs wrote a valid descriptor set");
    let mut named: Vec<(String, &DescriptorProto)> = Vec::new();
    for file in &set.file {
        let package = file.package();
        let mut queue: Vec<(String, &DescriptorProto)> =
            file.message_type.iter().map(|m| (format!("{package}.{}", m.name()), m)).collect();
        while let Some((name, message)) = queue.pop() {
            queue.extend(message.nested_type.iter().map(|n| (format!("{name}.{}", n.name()), n)));
            named.push((name, message));
        }
    }
    let index: HashMap<String, usize> =
        named.iter().enumerate().map(|(i, (name, _))| (name.clone(), i)).collect();
    let messages = named
        .iter()
        .map(|(_, message)| {
            let by_tag: HashMap<u32, Field> = message
                .field
                .iter()
                .map(|f| {
                    let repeated = f.label() == field_descriptor_proto::Label::Repeated;
                    let kind = match f.r#type() {
                        // A type outside the set (none in REAPI's) is not looked into.
                        Type::Message | Type::Group => match index.get(f.type_name().trim_start_matches('.'))
                        {
                            Some(&i) => Field::Message(i),
                            None => Field::Strings,
                        },
                        Type::String | Type::Bytes if repeated => Field::Strings,
                        _ if repeated => Field::Packed,
                        _ => Field::Plain,
                    };
                    (f.number() as u32, kind)
                })
                .collect();
            let has_entries = by_tag.values().any(|f| !matches!(f, Field::Plain));
            Fields { by_tag, has_entries }
        })
        .collect();
    Schema { index, messages }
});

/// The entries of a protobuf message of type `message` (a full name, such
/// as `build.bazel.remote.execution.v2.Tree`): the messages and repeated
/// values in it, at any depth (see [`Field`]), counting stopped once past
/// `limit`. Malformed input ends the count (prost's decoder then says what
/// is wrong with it), except groups, which prost would skip and decode past:
/// a message with one is over any limit.
pub fn count_entries(buf: &[u8], message: &str, limit: usize) -> usize {
    count_in(buf, SCHEMA.index.get(message).map(|&i| &SCHEMA.messages[i]), limit)
}

/// [`count_entries`] of a message whose fields are `fields` (`None`: of a
/// type outside the schema, whose fields are all skipped).
fn count_in(buf: &[u8], fields: Option<&Fields>, limit: usize) -> usize {
    let mut count = 0;
    let mut at = 0;
    while at < buf.len() && count <= limit {
        let Some((key, used)) = varint(&buf[at..]) else { break };
        at += used;
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
                let field = u32::try_from(key >> 3).ok().and_then(|tag| fields?.by_tag.get(&tag));
                match field {
                    Some(Field::Message(inner)) => {
                        count += 1;
                        let inner = &SCHEMA.messages[*inner];
                        if count <= limit && inner.has_entries {
                            count += count_in(&buf[start..end], Some(inner), limit - count);
                        }
                    }
                    Some(Field::Strings) => count += 1,
                    Some(Field::Packed) => count = count.saturating_add(end - start),
                    // Unknown fields are skipped by the decoder.
                    Some(Field::Plain) | None => {}
                }
                end
            }
            // Groups (long deprecated, and never used by REAPI).
            3 | 4 => return limit.saturating_add(1),
            _ => break,
        };
    }
    count.min(limit.saturating_add(1))
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

/// A message with more entries than `max_call_entries`, found before decoding.
#[derive(Debug, thiserror::Error)]
#[error("the {what} carries more than {limit} entries (max_call_entries): split it into smaller calls")]
pub struct TooManyEntries {
    what: &'static str,
    limit: usize,
}

/// Checks a message's entries against the limit before it is decoded.
pub fn check_entries<M: Name>(wire: &[u8]) -> Result<(), TooManyEntries> {
    let limit = max_entries();
    if count_entries(wire, &M::full_name(), limit) > limit {
        return Err(TooManyEntries { what: M::NAME, limit });
    }
    Ok(())
}

/// prost's codec, with [`check_entries`] before each decode.
pub struct Codec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = CountingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        CountingDecoder(PhantomData)
    }
}

/// prost's encoder, with room for the whole message made first: encoding
/// into tonic's small buffer would grow it by doubling, copying a 4 MiB
/// batch read about twice over before it is sent.
pub struct SizedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf).map_err(|e| Status::internal(format!("the message does not encode: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

pub struct CountingDecoder<U>(PhantomData<U>);

impl<U: Message + Name + Default> Decoder for CountingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // A message arrives whole in one buffer; should it ever not, the
        // count covers what is contiguous, and decoding is bounded anyway.
        check_entries::<U>(buf.chunk()).map_err(|e| Status::from(crate::cache::Error::from(e)))?;
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
            prop_assert!(count_entries(&wire, &reapi::UpdateActionResultRequest::full_name(), limit) <= limit + 1);
            prop_assert!(count_entries(&wire, &reapi::Tree::full_name(), limit) <= limit + 1);
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
        let find = reapi::FindMissingBlobsRequest::full_name();
        // Each digest is an entry; the instance name and function are not.
        assert_eq!(count_entries(&request.encode_to_vec(), &find, usize::MAX), 1000);
        assert_eq!(count_entries(&request.encode_to_vec(), &find, 10), 11, "stops past the limit");

        let result = reapi::ActionResult {
            output_files: vec![reapi::OutputFile::default(); 500],
            exit_code: 1,
            ..Default::default()
        };
        let update = reapi::UpdateActionResultRequest { action_result: Some(result), ..Default::default() };
        let name = reapi::UpdateActionResultRequest::full_name();
        assert_eq!(count_entries(&update.encode_to_vec(), &name, usize::MAX), 1 + 500);
        // Entries as deep as they go: properties of an output file's node
        // properties, and the metadata of an execution.
        let property = reapi::NodeProperty::default();
        let file = reapi::OutputFile {
            node_properties: Some(reapi::NodeProperties {
                properties: vec![property; 300],
                ..Default::default()
            }),
            ..Default::default()
        };
        let metadata = reapi::ExecutedActionMetadata {
            auxiliary_metadata: vec![Default::default(); 200],
            ..Default::default()
        };
        let result = reapi::ActionResult {
            output_files: vec![file],
            execution_metadata: Some(metadata),
            ..Default::default()
        };
        let update = reapi::UpdateActionResultRequest { action_result: Some(result), ..Default::default() };
        assert_eq!(count_entries(&update.encode_to_vec(), &name, usize::MAX), 1 + 2 + 1 + 300 + 200);
        // Repeated strings are entries too.
        let get = reapi::GetActionResultRequest {
            inline_output_files: vec![String::new(); 70],
            ..Default::default()
        };
        assert_eq!(
            count_entries(&get.encode_to_vec(), &reapi::GetActionResultRequest::full_name(), 1000),
            70
        );
        // Truncated or garbage input just ends the count; a group is over
        // any limit (prost would skip it and decode on).
        assert!(count_entries(&[0x12, 0x7f, 0x00], &name, usize::MAX) <= 1);
        assert!(count_entries(&[0xff; 20], &name, usize::MAX) <= 1);
        let grouped =
            [&[0x7b, 0x7c][..], &reapi::FindMissingBlobsRequest::default().encode_to_vec()].concat();
        assert_eq!(count_entries(&grouped, &find, 1000), 1001);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_by_name() {
        let request = reapi::BatchReadBlobsRequest {
            digests: vec![reapi::Digest::default(); 200_001],
            ..Default::default()
        };
        let refused = check_entries::<reapi::BatchReadBlobsRequest>(&request.encode_to_vec()).unwrap_err();
        let status = Status::from(crate::cache::Error::from(refused));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("BatchReadBlobsRequest carries more than"), "{}", status.message());
    }
}
