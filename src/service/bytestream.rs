//! google.bytestream.ByteStream over the CAS: Read, Write, QueryWriteStatus.

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, Stream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{READ_MESSAGE_SIZE, Shared, blocking};
use crate::digest::{self, BlobResource, Digest, Encoding};
use crate::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse, byte_stream_server::ByteStream,
};
use crate::store::{self, Store, Upload};

pub struct ByteStreamService {
    shared: Arc<Shared>,
}

impl ByteStreamService {
    pub fn new(shared: Arc<Shared>) -> Self {
        ByteStreamService { shared }
    }

    async fn present(&self, digest: Digest) -> Result<bool, Status> {
        let store = Arc::clone(&self.shared.store);
        Ok(blocking(move || store.contains(&[digest])).await?[0])
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

fn identity_only(resource: &BlobResource) -> Result<(), Status> {
    match resource.encoding {
        Encoding::Identity => Ok(()),
        Encoding::Zstd => Err(Status::invalid_argument(
            "compressed-blobs/zstd is not served: this server advertises no compressors",
        )),
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let request = request.into_inner();
        let resource = digest::parse_read_resource(&request.resource_name)?;
        identity_only(&resource)?;
        let digest = resource.digest;
        if request.read_limit < 0 {
            return Err(Status::invalid_argument(format!("read_limit {} is negative", request.read_limit)));
        }
        if request.read_offset < 0 || request.read_offset as u64 > digest.size {
            return Err(Status::out_of_range(format!(
                "read_offset {} is outside blob {digest} (0 to {})",
                request.read_offset, digest.size
            )));
        }
        let store = Arc::clone(&self.shared.store);
        let blob = {
            let store = Arc::clone(&store);
            blocking(move || store.locate(&digest)).await?
        }
        .ok_or_else(|| Status::not_found(format!("blob {digest} is not in the CAS")))?;
        let start = request.read_offset as u64;
        let end = match request.read_limit as u64 {
            0 => digest.size,
            limit => digest.size.min(start.saturating_add(limit)),
        };
        // A small channel: the reader decompresses one chunk ahead of the
        // sender, and memory stays bounded whatever the blob's size.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut offset = start;
            while offset < end {
                let store = Arc::clone(&store);
                let mut data = match blocking(move || store.read_at(&blob, offset)).await {
                    Ok(data) => data,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                data.truncate((end - offset) as usize);
                offset += data.len() as u64;
                while !data.is_empty() {
                    let part = data.split_to(data.len().min(READ_MESSAGE_SIZE));
                    if tx.send(Ok(ReadResponse { data: part })).await.is_err() {
                        return; // the client went away
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as ReadStream))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the write stream ended before its first message"))?;
        if first.resource_name.is_empty() {
            return Err(Status::invalid_argument("resource_name is required on the first write message"));
        }
        let resource = digest::parse_write_resource(&first.resource_name)?;
        identity_only(&resource)?;
        let digest = resource.digest;
        let done = Response::new(WriteResponse { committed_size: digest.size as i64 });
        if self.present(digest).await? {
            return Ok(done);
        }
        if first.write_offset < 0 {
            return Err(Status::invalid_argument(format!("write_offset {} is negative", first.write_offset)));
        }
        let name = first.resource_name.clone();
        let store = Arc::clone(&self.shared.store);
        let upload = {
            let (store, name) = (Arc::clone(&store), name.clone());
            blocking(move || store.begin_upload(&name, digest, first.write_offset as u64)).await?
        };
        let mut sink = Sink::new(store, upload);
        let mut message = first;
        loop {
            if !message.resource_name.is_empty() && message.resource_name != name {
                return sink.fail(Status::invalid_argument(format!(
                    "resource_name changed within the stream from {name:?} to {:?}",
                    message.resource_name
                )));
            }
            if message.write_offset != sink.received as i64 {
                return sink.fail(Status::invalid_argument(format!(
                    "write_offset {} does not follow the {} bytes already written",
                    message.write_offset, sink.received
                )));
            }
            if sink.received + message.data.len() as u64 > digest.size {
                let total = sink.received + message.data.len() as u64;
                return sink.fail(Status::invalid_argument(format!(
                    "{total} bytes written to blob {digest}, more than its declared size"
                )));
            }
            match sink.push(message.data).await? {
                Progress::Continue => {}
                Progress::AlreadyPresent => return Ok(done),
            }
            if message.finish_write {
                break;
            }
            message = match stream.message().await {
                Ok(Some(next)) => next,
                // A disconnect, not an error: keep what arrived so the client can resume.
                Ok(None) | Err(_) => {
                    return Ok(match sink.persist_tail().await? {
                        Progress::AlreadyPresent => done,
                        Progress::Continue => {
                            Response::new(WriteResponse { committed_size: sink.received as i64 })
                        }
                    });
                }
            };
        }
        if sink.received != digest.size {
            return sink.fail(Status::invalid_argument(format!(
                "finish_write after {} bytes, but blob {digest} declares {}",
                sink.received, digest.size
            )));
        }
        if let Progress::AlreadyPresent = sink.persist_tail().await? {
            return Ok(done);
        }
        // Messages after finish_write break the protocol: store nothing then.
        if let Some(Ok(Some(_))) = stream.message().now_or_never() {
            return sink.fail(Status::invalid_argument("the stream went on after finish_write"));
        }
        let upload = sink.upload.take().expect("persist_tail leaves the upload in place");
        blocking(move || upload.finish()).await?;
        Ok(done)
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let name = request.into_inner().resource_name;
        let resource = digest::parse_write_resource(&name)?;
        identity_only(&resource)?;
        let digest = resource.digest;
        if self.present(digest).await? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: digest.size as i64,
                complete: true,
            }));
        }
        let store = Arc::clone(&self.shared.store);
        let committed = blocking(move || store.upload_committed(&name)).await?.unwrap_or(0);
        Ok(Response::new(QueryWriteStatusResponse { committed_size: committed as i64, complete: false }))
    }
}

enum Progress {
    Continue,
    AlreadyPresent,
}

/// The receiving end of an upload: buffers messages into chunks and persists
/// each full chunk on the blocking pool while the next one arrives.
struct Sink {
    store: Arc<Store>,
    /// The upload, when no chunk is being persisted.
    upload: Option<Upload>,
    /// The chunk being persisted; it hands the upload back.
    pending: Option<JoinHandle<Result<(Upload, bool), store::Error>>>,
    buffer: BytesMut,
    /// Bytes received so far, counting those committed by earlier streams.
    received: u64,
}

impl Sink {
    fn new(store: Arc<Store>, upload: Upload) -> Sink {
        let received = upload.committed();
        Sink { store, upload: Some(upload), pending: None, buffer: BytesMut::new(), received }
    }

    async fn push(&mut self, data: Bytes) -> Result<Progress, Status> {
        self.received += data.len() as u64;
        self.buffer.extend_from_slice(&data);
        let chunk_size = self.store.options().chunk_size;
        while self.buffer.len() >= chunk_size {
            let chunk = self.buffer.split_to(chunk_size).freeze();
            if self.persist(chunk).await? {
                return Ok(Progress::AlreadyPresent);
            }
        }
        Ok(Progress::Continue)
    }

    /// Waits for the chunk in flight; true if another writer stored the blob
    /// meanwhile (then this upload is discarded).
    async fn settle(&mut self) -> Result<bool, Status> {
        let Some(pending) = self.pending.take() else {
            return Ok(false);
        };
        let (upload, present) = pending
            .await
            .map_err(|e| Status::internal(format!("a storage worker failed: {e}")))?
            .map_err(Status::from)?;
        if present {
            blocking(move || upload.discard()).await?;
            return Ok(true);
        }
        self.upload = Some(upload);
        Ok(false)
    }

    /// Starts persisting `chunk` once the previous chunk is done.
    async fn persist(&mut self, chunk: Bytes) -> Result<bool, Status> {
        if self.settle().await? {
            return Ok(true);
        }
        let mut upload = self.upload.take().expect("settled");
        let store = Arc::clone(&self.store);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            upload.append(&chunk)?;
            let present = store.contains(&[upload.digest()])?[0];
            Ok((upload, present))
        }));
        Ok(false)
    }

    /// Persists everything received, including a partial last chunk.
    async fn persist_tail(&mut self) -> Result<Progress, Status> {
        let tail = std::mem::take(&mut self.buffer).freeze();
        if (!tail.is_empty() && self.persist(tail).await?) || self.settle().await? {
            return Ok(Progress::AlreadyPresent);
        }
        Ok(Progress::Continue)
    }

    /// Ends a stream that broke a rule: the upload is deleted.
    fn fail(&mut self, status: Status) -> Result<Response<WriteResponse>, Status> {
        let (upload, pending) = (self.upload.take(), self.pending.take());
        tokio::spawn(async move {
            let upload = match (upload, pending) {
                (Some(u), _) => Some(u),
                (None, Some(p)) => p.await.ok().and_then(Result::ok).map(|(u, _)| u),
                (None, None) => None,
            };
            if let Some(upload) = upload {
                let _ = tokio::task::spawn_blocking(move || upload.discard()).await;
            }
        });
        Err(status)
    }
}
