//! `larder bench yardstick`: a bare in-memory REAPI cache on the same tonic
//! stack, which checks the SHA-256 of every upload and keeps blobs in a map.
//! No disk, no limits beyond message sizes: what a server can reach on this
//! machine, to read larder's figures against (run it and larder side by side
//! with `bench grpc --endpoint`). It takes zstd as Bazel sends it, decoding
//! each upload to check it, and keeps the client's frames to answer
//! compressed reads with: the least any server does for zstd transfers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status, Streaming};

use larder::proto::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use larder::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use larder::proto::reapi::action_cache_server::{ActionCache, ActionCacheServer};
use larder::proto::reapi::capabilities_server::{Capabilities, CapabilitiesServer};
use larder::proto::reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use larder::proto::reapi::{self, digest_function};

use super::Error;

/// Bytes of a read message, as larder sends them.
const READ_MESSAGE: usize = 1 << 20;
const MAX_MESSAGE: usize = 64 << 20;

const ZSTD: i32 = reapi::compressor::Value::Zstd as i32;

thread_local! {
    // zstd contexts are costly to set up; each server thread keeps its own.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Blobs by (hash, size), and the zstd they came as if they came so;
/// action results by action hash.
#[derive(Default)]
struct Memory {
    blobs: RwLock<HashMap<(String, i64), Bytes>>,
    frames: RwLock<HashMap<(String, i64), Bytes>>,
    results: RwLock<HashMap<String, reapi::ActionResult>>,
}

#[derive(Clone, Default)]
struct Yardstick(Arc<Memory>);

impl Yardstick {
    fn get(&self, hash: &str, size: i64) -> Option<Bytes> {
        self.0.blobs.read().unwrap_or_else(|e| e.into_inner()).get(&(hash.to_string(), size)).cloned()
    }

    fn frame(&self, hash: &str, size: i64) -> Option<Bytes> {
        self.0.frames.read().unwrap_or_else(|e| e.into_inner()).get(&(hash.to_string(), size)).cloned()
    }

    /// A blob's bytes from the zstd a client sent, if they are its digest's.
    fn check_zstd(frame: &Bytes, hash: &str, size: i64) -> Option<Bytes> {
        let size = u64::try_from(size).ok()?;
        let data = match usize::try_from(size).ok().filter(|&n| n <= MAX_MESSAGE) {
            // Up to a message's size: at once into the output, on this
            // thread's context.
            Some(capacity) => DECOMPRESSOR.with(|cell| {
                let mut cell = cell.borrow_mut();
                let decompressor = match &mut *cell {
                    Some(decompressor) => decompressor,
                    empty => empty.insert(zstd::bulk::Decompressor::new().ok()?),
                };
                decompressor.decompress(frame, capacity).ok().map(Bytes::from)
            })?,
            // Larger: grown as it decodes, never past the size declared.
            None => {
                let mut decoder = larder::compression::Decoder::new(size).ok()?;
                larder::compression::decompress(&mut decoder, frame, size).ok()?.data
            }
        };
        (data.len() as u64 == size && sha256(&data) == hash).then_some(data)
    }
}

/// Serves the yardstick on `listen` until interrupted.
pub async fn serve(listen: SocketAddr) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Io { context: format!("cannot listen on {listen}"), source })?;
    let addr = listener.local_addr().map_err(|source| Error::Io { context: "the address".into(), source })?;
    println!(
        "yardstick serving REAPI on {addr} (in memory, SHA-256 checked): bench it with --endpoint grpc://{addr}"
    );
    let y = Yardstick::default();
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(CapabilitiesServer::new(y.clone()))
        .add_service(
            ContentAddressableStorageServer::new(y.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(ByteStreamServer::new(y.clone()).max_decoding_message_size(MAX_MESSAGE))
        .add_service(ActionCacheServer::new(y).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::Setup(format!("the yardstick stopped: {e}")))
}

/// Starts `larder bench yardstick` on a free port, as a process of its own
/// (so that it is measured like any server): the process, killed when
/// dropped, and its endpoint.
pub async fn spawn() -> Result<(tokio::process::Child, String), Error> {
    use tokio::io::AsyncBufReadExt;
    let program = std::env::current_exe()
        .map_err(|source| Error::Io { context: "cannot find this program to run it again".into(), source })?;
    let mut child = tokio::process::Command::new(&program)
        .args(["bench", "yardstick", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Io { context: format!("cannot run {}", program.display()), source })?;
    let stdout = child.stdout.take().ok_or_else(|| Error::Setup("the yardstick has no stdout".into()))?;
    let mut line = String::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    let addr = line.split("serving REAPI on ").nth(1).and_then(|rest| rest.split_whitespace().next());
    match (read, addr) {
        (Ok(Ok(_)), Some(addr)) => Ok((child, format!("grpc://{addr}"))),
        _ => Err(Error::Setup(format!("the yardstick did not start (it said {:?})", line.trim()))),
    }
}

/// A read's messages, of at most [`READ_MESSAGE`] bytes each.
fn messages(data: Bytes) -> Vec<Result<ReadResponse, Status>> {
    (0..data.len().div_ceil(READ_MESSAGE).max(1))
        .map(|i| {
            Ok(ReadResponse { data: data.slice(i * READ_MESSAGE..((i + 1) * READ_MESSAGE).min(data.len())) })
        })
        .collect()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `{instance/}blobs/{hash}/{size}` or `…/compressed-blobs/zstd/{hash}/{size}`,
/// or an upload's `…/uploads/{uuid}/` before either: the blob, and whether
/// its bytes travel as zstd.
fn blob_of(name: &str) -> Result<(String, i64, bool), Status> {
    let mut parts = name.rsplit('/');
    let (size, hash, marker) = (parts.next(), parts.next(), parts.next());
    let zstd = marker == Some("zstd") && parts.next() == Some("compressed-blobs");
    match (marker, hash, size.and_then(|s| s.parse().ok())) {
        (Some("blobs"), Some(hash), Some(size)) => Ok((hash.to_string(), size, false)),
        (Some("zstd"), Some(hash), Some(size)) if zstd => Ok((hash.to_string(), size, true)),
        _ => Err(Status::invalid_argument(format!(
            "{name:?} is not a blobs/ or compressed-blobs/zstd/ resource"
        ))),
    }
}

#[tonic::async_trait]
impl Capabilities for Yardstick {
    async fn get_capabilities(
        &self,
        _: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: vec![digest_function::Value::Sha256 as i32],
                action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: 4 << 20,
                supported_compressors: vec![ZSTD],
                supported_batch_update_compressors: vec![ZSTD],
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for Yardstick {
    async fn find_missing_blobs(
        &self,
        r: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let blobs = self.0.blobs.read().unwrap_or_else(|e| e.into_inner());
        let missing = r
            .into_inner()
            .blob_digests
            .into_iter()
            .filter(|d| d.size_bytes > 0 && !blobs.contains_key(&(d.hash.clone(), d.size_bytes)))
            .collect();
        Ok(Response::new(reapi::FindMissingBlobsResponse { missing_blob_digests: missing }))
    }

    async fn batch_update_blobs(
        &self,
        r: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        let (mut checked, mut frames) = (Vec::new(), Vec::new());
        let responses = r
            .into_inner()
            .requests
            .into_iter()
            .map(|q| {
                let digest = q.digest.unwrap_or_default();
                let key = (digest.hash.clone(), digest.size_bytes);
                let data = match q.compressor {
                    0 => Some(q.data.clone())
                        .filter(|d| d.len() as i64 == digest.size_bytes && sha256(d) == digest.hash),
                    ZSTD => Yardstick::check_zstd(&q.data, &digest.hash, digest.size_bytes),
                    _ => None,
                };
                let code = if data.is_some() { 0 } else { tonic::Code::InvalidArgument as i32 };
                if let Some(data) = data {
                    if q.compressor == ZSTD {
                        frames.push((key.clone(), q.data));
                    }
                    checked.push((key, data));
                }
                reapi::batch_update_blobs_response::Response {
                    digest: Some(digest),
                    status: Some(larder::proto::rpc::Status { code, ..Default::default() }),
                }
            })
            .collect();
        self.0.blobs.write().unwrap_or_else(|e| e.into_inner()).extend(checked);
        self.0.frames.write().unwrap_or_else(|e| e.into_inner()).extend(frames);
        Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        r: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        let r = r.into_inner();
        let zstd = r.acceptable_compressors.contains(&ZSTD);
        let responses = r
            .digests
            .into_iter()
            .map(|d| {
                let frame = zstd.then(|| self.frame(&d.hash, d.size_bytes)).flatten();
                let compressor = if frame.is_some() { ZSTD } else { 0 };
                let data = match (d.size_bytes, frame) {
                    (0, _) => Some(Bytes::new()),
                    (_, Some(frame)) => Some(frame),
                    _ => self.get(&d.hash, d.size_bytes),
                };
                let code = if data.is_some() { 0 } else { tonic::Code::NotFound as i32 };
                reapi::batch_read_blobs_response::Response {
                    digest: Some(d),
                    data: data.unwrap_or_default(),
                    compressor,
                    status: Some(larder::proto::rpc::Status { code, ..Default::default() }),
                }
            })
            .collect();
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = Pin<Box<dyn Stream<Item = Result<reapi::GetTreeResponse, Status>> + Send>>;

    async fn get_tree(
        &self,
        _: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented("the yardstick serves no GetTree"))
    }

    async fn split_blob(
        &self,
        _: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("the yardstick serves no SplitBlob"))
    }

    async fn splice_blob(
        &self,
        _: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("the yardstick serves no SpliceBlob"))
    }
}

#[tonic::async_trait]
impl ByteStream for Yardstick {
    type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

    async fn read(&self, r: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let r = r.into_inner();
        let (hash, size, zstd) = blob_of(&r.resource_name)?;
        // A compressed read of a whole blob that came compressed is
        // answered with the client's frame, as it came.
        let whole = r.read_offset <= 0 && r.read_limit <= 0;
        if let Some(frame) = (zstd && whole).then(|| self.frame(&hash, size)).flatten() {
            return Ok(Response::new(Box::pin(futures::stream::iter(messages(frame)))));
        }
        let data = match size {
            0 => Bytes::new(),
            _ => self.get(&hash, size).ok_or_else(|| Status::not_found(format!("blob {hash}/{size}")))?,
        };
        let start = (r.read_offset.max(0) as usize).min(data.len());
        let end = match r.read_limit {
            n if n > 0 => (start + n as usize).min(data.len()),
            _ => data.len(),
        };
        let data = data.slice(start..end);
        // Offsets count uncompressed bytes: any other compressed read is
        // compressed here.
        let data = match zstd {
            true => Bytes::from(
                zstd::bulk::compress(&data, 1).map_err(|e| Status::internal(format!("zstd failed: {e}")))?,
            ),
            false => data,
        };
        Ok(Response::new(Box::pin(futures::stream::iter(messages(data)))))
    }

    async fn write(&self, r: Request<Streaming<WriteRequest>>) -> Result<Response<WriteResponse>, Status> {
        let mut stream = r.into_inner();
        let (mut key, mut buffer, mut hasher) = (None, BytesMut::new(), Sha256::new());
        while let Some(message) = stream.message().await? {
            if key.is_none() {
                key = Some(blob_of(&message.resource_name)?);
            }
            let (_, size, zstd) = key.as_ref().expect("set above");
            // zstd may take a little more than the bytes it holds.
            let most = if *zstd { zstd::zstd_safe::compress_bound(*size as usize) as i64 } else { *size };
            if buffer.len() as i64 + message.data.len() as i64 > most {
                return Err(Status::invalid_argument("more bytes than the blob's size"));
            }
            if !zstd {
                hasher.update(&message.data);
            }
            buffer.extend_from_slice(&message.data);
            if message.finish_write {
                break;
            }
        }
        let (hash, size, zstd) = key.ok_or_else(|| Status::invalid_argument("an empty write"))?;
        let wrong = || Status::invalid_argument("the bytes do not match the digest");
        let (data, committed) = match zstd {
            true => {
                let frame = buffer.freeze();
                let data = Yardstick::check_zstd(&frame, &hash, size).ok_or_else(wrong)?;
                let sent = frame.len() as i64;
                self.0.frames.write().unwrap_or_else(|e| e.into_inner()).insert((hash.clone(), size), frame);
                (data, sent)
            }
            false if buffer.len() as i64 != size || hex::encode(hasher.finalize()) != hash => {
                return Err(wrong());
            }
            false => (buffer.freeze(), size),
        };
        self.0.blobs.write().unwrap_or_else(|e| e.into_inner()).insert((hash, size), data);
        Ok(Response::new(WriteResponse { committed_size: committed }))
    }

    async fn query_write_status(
        &self,
        r: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let (hash, size, _) = blob_of(&r.into_inner().resource_name)?;
        let complete = self.get(&hash, size).is_some();
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: if complete { size } else { 0 },
            complete,
        }))
    }
}

#[tonic::async_trait]
impl ActionCache for Yardstick {
    async fn get_action_result(
        &self,
        r: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let hash = r.into_inner().action_digest.unwrap_or_default().hash;
        let results = self.0.results.read().unwrap_or_else(|e| e.into_inner());
        results.get(&hash).cloned().map(Response::new).ok_or_else(|| Status::not_found("no such action"))
    }

    async fn update_action_result(
        &self,
        r: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let r = r.into_inner();
        let (hash, result) = (r.action_digest.unwrap_or_default().hash, r.action_result.unwrap_or_default());
        self.0.results.write().unwrap_or_else(|e| e.into_inner()).insert(hash, result.clone());
        Ok(Response::new(result))
    }
}
