//! The two things a bench runs against: an embedded store, or any REAPI
//! server through gRPC. Both offer the same calls; every byte read back is
//! checked against its digest here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tonic::transport::Channel;

use super::data::Content;
use super::measure::ClientCpu;
use super::{Compressor, Error};
use larder::compression::Decoder;
use larder::digest::{Digest, Function, FunctionHint, Hasher};
use larder::proto::bytestream::byte_stream_client::ByteStreamClient;
use larder::proto::bytestream::{ReadRequest, WriteRequest};
use larder::proto::reapi;
use larder::proto::reapi::action_cache_client::ActionCacheClient;
use larder::proto::reapi::capabilities_client::CapabilitiesClient;
use larder::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use larder::store::{NewBlob, Store};

/// Bytes per ByteStream write message.
const WRITE_MESSAGE: usize = 1 << 20;
/// Largest message the bench accepts.
const MAX_MESSAGE: usize = 64 << 20;
/// The zstd level the bench compresses at: larder's default, and cheap
/// enough that the client takes little of the machine from the server.
const ZSTD_LEVEL: i32 = 1;
const ZSTD: i32 = reapi::compressor::Value::Zstd as i32;

/// A blob of a workload: its contents (made on demand) and digest.
#[derive(Clone, Copy, Debug)]
pub struct Blob {
    pub content: Content,
    pub digest: Digest,
}

#[derive(Clone)]
pub enum Client {
    Store(Arc<Store>),
    Grpc(Arc<Grpc>),
}

#[derive(Clone)]
pub struct Grpc {
    instance: String,
    cas: ContentAddressableStorageClient<Channel>,
    bytestream: ByteStreamClient<Channel>,
    action_cache: ActionCacheClient<Channel>,
    /// Blobs travel zstd-compressed (asked for, and offered by the server).
    zstd: bool,
}

/// Distinct upload names within this process.
static UPLOADS: AtomicU64 = AtomicU64::new(0);

impl Grpc {
    /// Connects to `endpoint` (grpc://host:port) and reads the server's
    /// largest batch from its capabilities (4 MiB if it does not say), and
    /// whether it takes zstd for streams and batches, if `compressor` asks.
    pub async fn connect(
        endpoint: &str,
        instance: &str,
        compressor: Compressor,
    ) -> Result<(Grpc, u64), Error> {
        let address = match endpoint.split_once("://") {
            Some(("grpc" | "http", rest)) => format!("http://{rest}"),
            Some((scheme, _)) => {
                return Err(Error::Setup(format!(
                    "endpoint {endpoint}: the bench speaks plain gRPC only (grpc://host:port), not {scheme}"
                )));
            }
            None => format!("http://{endpoint}"),
        };
        let channel = Channel::from_shared(address)
            .map_err(|e| Error::Setup(format!("endpoint {endpoint} is not a URL: {e}")))?
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| {
                Error::Setup(format!(
                    "cannot connect to {endpoint} ({e}): is a REAPI server listening there?"
                ))
            })?;
        let mut grpc = Grpc {
            instance: instance.to_string(),
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            bytestream: ByteStreamClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE),
            action_cache: ActionCacheClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE),
            zstd: false,
        };
        let request = reapi::GetCapabilitiesRequest { instance_name: instance.to_string() };
        let max_batch = match CapabilitiesClient::new(channel).get_capabilities(request).await {
            Ok(r) => {
                let cache = r.into_inner().cache_capabilities.unwrap_or_default();
                if !cache.digest_functions.is_empty()
                    && !cache.digest_functions.contains(&(reapi::digest_function::Value::Sha256 as i32))
                {
                    return Err(Error::Setup(format!("{endpoint} does not serve SHA-256 digests")));
                }
                grpc.zstd = compressor == Compressor::Zstd
                    && cache.supported_compressors.contains(&ZSTD)
                    && cache.supported_batch_update_compressors.contains(&ZSTD);
                cache.max_batch_total_size_bytes as u64
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => 0,
            Err(status) => return Err(call_failed("GetCapabilities", status)),
        };
        Ok((grpc, if max_batch == 0 { 4 << 20 } else { max_batch }))
    }

    /// Whether blobs travel zstd-compressed.
    pub fn zstd(&self) -> bool {
        self.zstd
    }

    fn resource(&self, rest: String) -> String {
        if self.instance.is_empty() { rest } else { format!("{}/{rest}", self.instance) }
    }
}

fn call_failed(call: &str, status: tonic::Status) -> Error {
    Error::Call(format!("{call} failed: {:?}: {}", status.code(), status.message()))
}

fn store_failed(call: &str, e: larder::store::Error) -> Error {
    Error::Call(format!("{call} failed: {e}"))
}

/// How long a write refused at the size budget waits before it is sent
/// again, and how long it may go on being refused.
const REFUSED_PAUSE: Duration = Duration::from_millis(20);
const REFUSED_AT_MOST: Duration = Duration::from_secs(120);

/// Fails a write refused at the size budget for too long: eviction cannot
/// make room (everything is younger than eviction_min_age, say).
fn full_for_too_long(since: Instant, e: &larder::store::Error) -> Result<(), Error> {
    match since.elapsed() > REFUSED_AT_MOST {
        true => Err(Error::Call(format!(
            "writes refused for {REFUSED_AT_MOST:?}: {e} (is --max-size smaller than what eviction_min_age keeps?)"
        ))),
        false => Ok(()),
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Call(format!("a store task failed: {e}")))?
}

/// Checks bytes read back as a whole against their blob.
fn verify(blob: &Blob, data: &[u8], cpu: &ClientCpu) -> Result<(), Error> {
    let actual = cpu.count(|| blob.digest.function.digest(data));
    if actual == blob.digest { Ok(()) } else { Err(wrong_bytes(blob, data.len() as u64, actual)) }
}

fn wrong_bytes(blob: &Blob, len: u64, actual: Digest) -> Error {
    Error::Verify(format!(
        "blob {} read back as {len} bytes that hash to {}: the server returned wrong bytes",
        blob.digest, actual
    ))
}

thread_local! {
    // zstd contexts are costly to set up; each client thread keeps its own.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn zstd_failed(e: std::io::Error) -> Error {
    Error::Call(format!("zstd failed in the bench: {e}"))
}

/// A blob's bytes as one zstd frame, as a client compresses them.
fn compress(data: &[u8]) -> Result<Bytes, Error> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = match &mut *cell {
            Some(compressor) => compressor,
            empty => empty.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(zstd_failed)?),
        };
        compressor.compress(data).map(Bytes::from).map_err(zstd_failed)
    })
}

/// A blob's bytes from the zstd a server answered, at most its size.
fn decompress(blob: &Blob, frame: &[u8]) -> Result<Bytes, Error> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match &mut *cell {
            Some(decompressor) => decompressor,
            empty => empty.insert(zstd::bulk::Decompressor::new().map_err(zstd_failed)?),
        };
        decompressor.decompress(frame, blob.digest.size as usize).map(Bytes::from).map_err(|e| {
            Error::Verify(format!("blob {} came as zstd that does not decode to its size: {e}", blob.digest))
        })
    })
}

/// A ByteStream upload in the making: its encoder if compressed, the bytes
/// sent, and why its stream stopped short if it did.
#[derive(Default)]
struct Upload {
    encoder: Option<zstd::stream::write::Encoder<'static, Vec<u8>>>,
    sent: u64,
    failed: Option<std::io::Error>,
}

/// What the encoder of a compressed upload gives out for its next piece of
/// the blob (all it holds back, at the last).
fn encode_piece(
    encoder: &mut zstd::stream::write::Encoder<'static, Vec<u8>>,
    data: &[u8],
    last: bool,
) -> std::io::Result<Vec<u8>> {
    encoder.write_all(data)?;
    if last {
        encoder.do_finish()?
    } else {
        encoder.flush()?
    }
    Ok(std::mem::take(encoder.get_mut()))
}

fn undecodable(blob: &Blob, e: impl std::fmt::Display) -> Error {
    Error::Verify(format!("blob {} came as zstd that does not decode: {e}", blob.digest))
}

/// A blob's bytes from a batch read's answer, decompressed if it came
/// compressed (which only a bench that accepts zstd takes).
fn unpack(g: &Grpc, blob: &Blob, compressor: i32, data: Bytes, cpu: &ClientCpu) -> Result<Bytes, Error> {
    match compressor {
        0 => Ok(data),
        ZSTD if g.zstd => cpu.count(|| decompress(blob, &data)),
        other => Err(Error::Verify(format!(
            "BatchReadBlobs answered {} with compressor {other}, which the bench did not accept",
            blob.digest
        ))),
    }
}

impl Client {
    /// The digests among `digests` that the target lacks.
    pub async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, Error> {
        match self {
            Client::Store(store) => {
                let store = Arc::clone(store);
                blocking(move || {
                    let present = store.contains(&digests).map_err(|e| store_failed("contains", e))?;
                    Ok(digests.into_iter().zip(present).filter(|(_, p)| !p).map(|(d, _)| d).collect())
                })
                .await
            }
            Client::Grpc(g) => {
                let request = reapi::FindMissingBlobsRequest {
                    instance_name: g.instance.clone(),
                    blob_digests: digests.iter().map(Digest::to_proto).collect(),
                    digest_function: 0,
                };
                let response = g
                    .cas
                    .clone()
                    .find_missing_blobs(request)
                    .await
                    .map_err(|s| call_failed("FindMissingBlobs", s))?
                    .into_inner();
                response
                    .missing_blob_digests
                    .iter()
                    .map(|d| {
                        Digest::from_proto(d, FunctionHint::Given(Function::Sha256)).map_err(|e| {
                            Error::Verify(format!("FindMissingBlobs answered a malformed digest: {e}"))
                        })
                    })
                    .collect()
            }
        }
    }

    /// Stores small blobs in one call; `data` holds their bytes in order.
    pub async fn batch_update(
        &self,
        blobs: Vec<Blob>,
        data: Vec<Bytes>,
        cpu: &ClientCpu,
    ) -> Result<(), Error> {
        match self {
            Client::Store(store) => {
                let store = Arc::clone(store);
                blocking(move || {
                    let mut new: Vec<NewBlob> =
                        blobs.iter().zip(data).map(|(b, d)| NewBlob::new(b.digest, d)).collect();
                    let refused_since = Instant::now();
                    // Blobs refused at the size budget are sent again, as a
                    // client would, once eviction has made room.
                    while !new.is_empty() {
                        let results = store.put_blobs(&new);
                        let mut again = Vec::new();
                        for (blob, r) in new.into_iter().zip(results) {
                            match r {
                                Ok(_) => {}
                                Err(e @ larder::store::Error::Full { .. }) => {
                                    full_for_too_long(refused_since, &e)?;
                                    again.push(blob);
                                }
                                Err(e) => return Err(store_failed("put_blobs", e)),
                            }
                        }
                        if !again.is_empty() {
                            std::thread::sleep(REFUSED_PAUSE);
                        }
                        new = again;
                    }
                    Ok(())
                })
                .await
            }
            Client::Grpc(g) => {
                let data_len = blobs.len();
                let (compressor, data) = match g.zstd {
                    true => {
                        (ZSTD, cpu.count(|| data.iter().map(|d| compress(d)).collect::<Result<Vec<_>, _>>())?)
                    }
                    false => (0, data),
                };
                let requests = blobs
                    .iter()
                    .zip(data)
                    .map(|(b, data)| reapi::batch_update_blobs_request::Request {
                        digest: Some(b.digest.to_proto()),
                        data,
                        compressor,
                    })
                    .collect();
                let request = reapi::BatchUpdateBlobsRequest {
                    instance_name: g.instance.clone(),
                    requests,
                    digest_function: 0,
                };
                let response = g
                    .cas
                    .clone()
                    .batch_update_blobs(request)
                    .await
                    .map_err(|s| call_failed("BatchUpdateBlobs", s))?
                    .into_inner();
                if response.responses.len() != data_len {
                    return Err(Error::Verify(format!(
                        "BatchUpdateBlobs answered {} of {data_len} blobs",
                        response.responses.len()
                    )));
                }
                for r in response.responses {
                    let status = r.status.unwrap_or_default();
                    if status.code != 0 {
                        return Err(Error::Call(format!(
                            "BatchUpdateBlobs refused a blob: code {}: {}",
                            status.code, status.message
                        )));
                    }
                }
                Ok(())
            }
        }
    }

    /// Reads small blobs in one call and checks them; returns their bytes.
    pub async fn batch_read(&self, blobs: Vec<Blob>, cpu: &ClientCpu) -> Result<u64, Error> {
        let read: Vec<(Blob, Option<Bytes>)> = match self {
            Client::Store(store) => {
                let store = Arc::clone(store);
                blocking(move || {
                    blobs
                        .into_iter()
                        .map(|b| Ok((b, store.read_all(&b.digest).map_err(|e| store_failed("read_all", e))?)))
                        .collect()
                })
                .await?
            }
            Client::Grpc(g) => {
                let request = reapi::BatchReadBlobsRequest {
                    instance_name: g.instance.clone(),
                    digests: blobs.iter().map(|b| b.digest.to_proto()).collect(),
                    acceptable_compressors: if g.zstd { vec![ZSTD] } else { Vec::new() },
                    digest_function: 0,
                };
                let response = g
                    .cas
                    .clone()
                    .batch_read_blobs(request)
                    .await
                    .map_err(|s| call_failed("BatchReadBlobs", s))?
                    .into_inner();
                if response.responses.len() != blobs.len() {
                    return Err(Error::Verify(format!(
                        "BatchReadBlobs answered {} of {} blobs",
                        response.responses.len(),
                        blobs.len()
                    )));
                }
                // REAPI asks for no order (NativeLink answers in its own).
                let mut answers: HashMap<String, reapi::batch_read_blobs_response::Response> = response
                    .responses
                    .into_iter()
                    .filter_map(|r| Some((r.digest.as_ref()?.hash.clone(), r)))
                    .collect();
                blobs
                    .into_iter()
                    .map(|b| {
                        let Some(r) = answers.remove(&b.digest.hex()) else {
                            return Err(Error::Verify(format!(
                                "BatchReadBlobs did not answer for {}",
                                b.digest
                            )));
                        };
                        let code = r.status.as_ref().map_or(0, |s| s.code);
                        match code {
                            0 => Ok((b, Some(unpack(g, &b, r.compressor, r.data, cpu)?))),
                            5 => Ok((b, None)), // NOT_FOUND
                            _ => Err(Error::Call(format!(
                                "BatchReadBlobs failed for {}: code {code}: {}",
                                b.digest,
                                r.status.map(|s| s.message).unwrap_or_default()
                            ))),
                        }
                    })
                    .collect::<Result<_, Error>>()?
            }
        };
        let mut total = 0;
        for (blob, data) in read {
            let data = data.ok_or_else(|| Error::Missing(blob.digest))?;
            verify(&blob, &data, cpu)?;
            total += data.len() as u64;
        }
        Ok(total)
    }

    /// Streams a blob to the target, making its bytes as it goes.
    pub async fn write(&self, blob: Blob, cpu: &ClientCpu) -> Result<(), Error> {
        match self {
            Client::Store(store) => {
                let (store, cpu) = (Arc::clone(store), cpu.clone());
                blocking(move || {
                    let n = UPLOADS.fetch_add(1, Ordering::Relaxed);
                    let resource =
                        format!("uploads/bench-{n}/blobs/{}/{}", blob.digest.hex(), blob.digest.size);
                    let refused_since = Instant::now();
                    let mut upload = loop {
                        match store.begin_upload(&resource, blob.digest, 0) {
                            Ok(upload) => break upload,
                            Err(e @ larder::store::Error::Full { .. }) => {
                                full_for_too_long(refused_since, &e)?;
                                std::thread::sleep(REFUSED_PAUSE);
                            }
                            Err(e) => return Err(store_failed("begin_upload", e)),
                        }
                    };
                    let chunk = store.options().chunk_size;
                    let mut piece = Vec::with_capacity(chunk);
                    let mut offset = 0;
                    while offset < blob.digest.size {
                        piece.clear();
                        cpu.count(|| blob.content.push(offset, chunk, &mut piece));
                        upload.append(&piece, None).map_err(|e| store_failed("append", e))?;
                        offset += piece.len() as u64;
                    }
                    upload.finish().map_err(|e| store_failed("finish", e))?;
                    Ok(())
                })
                .await
            }
            Client::Grpc(g) => {
                let n = UPLOADS.fetch_add(1, Ordering::Relaxed);
                let name = g.resource(format!(
                    "uploads/{:08x}-0000-4000-8000-{:012x}/{}/{}/{}",
                    std::process::id(),
                    n,
                    if g.zstd { "compressed-blobs/zstd" } else { "blobs" },
                    blob.digest.hex(),
                    blob.digest.size
                ));
                let size = blob.digest.size;
                let pieces = size.div_ceil(WRITE_MESSAGE as u64).max(1);
                let cpu = cpu.clone();
                // A compressed upload is one zstd frame over the whole blob,
                // as a client streaming it makes, each message what the
                // encoder gave out for a piece; offsets count bytes sent.
                let encoder = match g.zstd {
                    true => {
                        Some(zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(zstd_failed)?)
                    }
                    false => None,
                };
                let progress = Arc::new(std::sync::Mutex::new(Upload { encoder, sent: 0, failed: None }));
                let shared = Arc::clone(&progress);
                let messages = futures::stream::iter((0..pieces).map_while(move |i| {
                    let offset = i * WRITE_MESSAGE as u64;
                    let last = i + 1 == pieces;
                    let mut data = Vec::with_capacity(WRITE_MESSAGE);
                    cpu.count(|| blob.content.push(offset, WRITE_MESSAGE, &mut data));
                    let mut progress = shared.lock().unwrap_or_else(|e| e.into_inner());
                    let progress = &mut *progress;
                    if let Some(encoder) = progress.encoder.as_mut() {
                        match cpu.count(|| encode_piece(encoder, &data, last)) {
                            Ok(encoded) => data = encoded,
                            // The stream ends short: the server refuses the upload.
                            Err(e) => {
                                progress.failed = Some(e);
                                return None;
                            }
                        }
                    }
                    let message = WriteRequest {
                        resource_name: if i == 0 { name.clone() } else { String::new() },
                        write_offset: progress.sent as i64,
                        finish_write: last,
                        data: data.into(),
                    };
                    progress.sent += message.data.len() as u64;
                    Some(message)
                }));
                let response = g.bytestream.clone().write(messages).await;
                let Upload { sent, failed, .. } =
                    std::mem::take(&mut *progress.lock().unwrap_or_else(|e| e.into_inner()));
                if let Some(e) = failed {
                    return Err(zstd_failed(e));
                }
                let committed =
                    response.map_err(|s| call_failed("ByteStream.Write", s))?.into_inner().committed_size;
                // The whole size, or for a compressed upload what was sent;
                // -1 if the blob was there already.
                let whole = if g.zstd { sent } else { size };
                if committed != whole as i64 && committed != -1 {
                    return Err(Error::Call(format!(
                        "ByteStream.Write of {} committed {committed} of {size} bytes",
                        blob.digest
                    )));
                }
                Ok(())
            }
        }
    }

    /// Streams a blob back and checks every byte; returns its size.
    pub async fn read(&self, blob: Blob, cpu: &ClientCpu) -> Result<u64, Error> {
        let mut hasher = Hasher::new(blob.digest.function);
        let mut len = 0u64;
        match self {
            Client::Store(store) => {
                let (store, cpu) = (Arc::clone(store), cpu.clone());
                (hasher, len) = blocking(move || {
                    let found = store.locate(&blob.digest).map_err(|e| store_failed("locate", e))?;
                    let found = found.ok_or(Error::Missing(blob.digest))?;
                    while len < blob.digest.size {
                        let part = store.read_at(&found, len).map_err(|e| store_failed("read_at", e))?;
                        cpu.count(|| hasher.update(&part));
                        len += part.len() as u64;
                    }
                    Ok((hasher, len))
                })
                .await?;
            }
            Client::Grpc(g) => {
                let kind = if g.zstd { "compressed-blobs/zstd" } else { "blobs" };
                let request = ReadRequest {
                    resource_name: g.resource(format!("{kind}/{}/{}", blob.digest.hex(), blob.digest.size)),
                    read_offset: 0,
                    read_limit: 0,
                };
                let mut stream = match g.bytestream.clone().read(request).await {
                    Ok(r) => r.into_inner(),
                    Err(s) if s.code() == tonic::Code::NotFound => return Err(Error::Missing(blob.digest)),
                    Err(s) => return Err(call_failed("ByteStream.Read", s)),
                };
                // A compressed read is decoded as it comes (one frame or
                // several, back to back), never past the blob's size.
                let mut decoder = match g.zstd {
                    true => Some(Decoder::new(blob.digest.size).map_err(|e| undecodable(&blob, e))?),
                    false => None,
                };
                while let Some(message) =
                    stream.message().await.map_err(|s| call_failed("ByteStream.Read", s))?
                {
                    let mut input = &message.data[..];
                    cpu.count(|| -> Result<(), Error> {
                        let Some(decoder) = decoder.as_mut() else {
                            hasher.update(input);
                            len += input.len() as u64;
                            return Ok(());
                        };
                        loop {
                            let step = decoder.step(input).map_err(|e| undecodable(&blob, e))?;
                            hasher.update(step.data);
                            len += step.data.len() as u64;
                            input = &input[step.consumed..];
                            if input.is_empty() && !step.more {
                                return Ok(());
                            }
                        }
                    })?;
                }
                if let Some(decoder) = decoder {
                    decoder.finish().map_err(|e| undecodable(&blob, e))?;
                }
            }
        }
        let actual = hasher.finish();
        if actual == blob.digest { Ok(len) } else { Err(wrong_bytes(&blob, len, actual)) }
    }

    pub async fn get_action_result(&self, action: Digest) -> Result<Option<reapi::ActionResult>, Error> {
        match self {
            Client::Store(store) => {
                let store = Arc::clone(store);
                let bytes = blocking(move || {
                    store
                        .get_action_result("", &action)
                        .map(|r| r.map(|r| r.result))
                        .map_err(|e| store_failed("get_action_result", e))
                })
                .await?;
                bytes
                    .map(reapi::ActionResult::decode)
                    .transpose()
                    .map_err(|e| Error::Verify(format!("the action result of {action} does not decode: {e}")))
            }
            Client::Grpc(g) => {
                let request = reapi::GetActionResultRequest {
                    instance_name: g.instance.clone(),
                    action_digest: Some(action.to_proto()),
                    ..Default::default()
                };
                match g.action_cache.clone().get_action_result(request).await {
                    Ok(r) => Ok(Some(r.into_inner())),
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                    Err(s) => Err(call_failed("GetActionResult", s)),
                }
            }
        }
    }

    pub async fn update_action_result(
        &self,
        action: Digest,
        result: reapi::ActionResult,
    ) -> Result<(), Error> {
        match self {
            Client::Store(store) => {
                let store = Arc::clone(store);
                blocking(move || {
                    store
                        .put_action_result("", &action, Some(action.size), &result.encode_to_vec())
                        .map_err(|e| store_failed("put_action_result", e))
                })
                .await
            }
            Client::Grpc(g) => {
                let request = reapi::UpdateActionResultRequest {
                    instance_name: g.instance.clone(),
                    action_digest: Some(action.to_proto()),
                    action_result: Some(result),
                    ..Default::default()
                };
                g.action_cache
                    .clone()
                    .update_action_result(request)
                    .await
                    .map_err(|s| call_failed("UpdateActionResult", s))?;
                Ok(())
            }
        }
    }
}
