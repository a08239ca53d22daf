//! google.bytestream.ByteStream over the CAS: Read, Write, QueryWriteStatus,
//! of plain (`blobs/`) and zstd (`compressed-blobs/zstd/`) resources. The
//! rules of the protocol are checked here; the bytes go to and from the
//! cache.

use std::pin::Pin;
use std::sync::Arc;

use futures::{FutureExt, Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

use super::{Shared, invalid};
use crate::cache::{self, Progress, UploadState};
use crate::digest::{self, Encoding};
use crate::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse, byte_stream_server::ByteStream,
};
use crate::store::Written;

pub struct ByteStreamService {
    shared: Arc<Shared>,
}

impl ByteStreamService {
    pub fn new(shared: Arc<Shared>) -> Self {
        ByteStreamService { shared }
    }

    /// The rules of a ByteStream read.
    async fn read_stream(&self, request: ReadRequest) -> Result<ReadStream, Status> {
        let resource = digest::parse_read_resource(&request.resource_name).map_err(invalid)?;
        let digest = resource.digest;
        if request.read_limit < 0 {
            return Err(Status::invalid_argument(format!("read_limit {} is negative", request.read_limit)));
        }
        let zstd = resource.encoding == Encoding::Zstd;
        if zstd && request.read_limit != 0 {
            return Err(Status::invalid_argument(format!(
                "read_limit {} is set on a compressed-blobs read: it must be 0",
                request.read_limit
            )));
        }
        // Offsets count uncompressed bytes, compressed reads included.
        if request.read_offset < 0 || request.read_offset as u64 > digest.size {
            return Err(Status::out_of_range(format!(
                "read_offset {} is outside blob {digest} (0 to {})",
                request.read_offset, digest.size
            )));
        }
        let start = request.read_offset as u64;
        let end = match request.read_limit as u64 {
            0 => digest.size,
            limit => digest.size.min(start.saturating_add(limit)),
        };
        let pieces = self.shared.cache.read(digest, start, end, zstd).await?;
        Ok(Box::pin(pieces.map(|piece| piece.map(|data| ReadResponse { data }).map_err(Status::from))))
    }

    /// The rules of a ByteStream write.
    async fn write_stream<S>(&self, first: WriteRequest, mut stream: S) -> Result<WriteResponse, Status>
    where
        S: Stream<Item = Result<WriteRequest, Status>> + Unpin + Send,
    {
        if first.resource_name.is_empty() {
            return Err(Status::invalid_argument("resource_name is required on the first write message"));
        }
        let resource = digest::parse_write_resource(&first.resource_name).map_err(invalid)?;
        let digest = resource.digest;
        // REAPI: an upload that finds its blob stored ends at once with the
        // full size, or -1 for compressed uploads.
        let done = WriteResponse {
            committed_size: match resource.encoding {
                Encoding::Identity => digest.size as i64,
                Encoding::Zstd => -1,
            },
        };
        // The first offset counts uncompressed bytes for either encoding: it
        // resumes at what QueryWriteStatus reported.
        let name = first.resource_name.clone();
        let cache = &self.shared.cache;
        let Some(mut upload) =
            cache.begin_upload(name.clone(), digest, resource.encoding, first.write_offset).await?
        else {
            return Ok(done);
        };
        let mut message = first;
        loop {
            if !message.resource_name.is_empty() && message.resource_name != name {
                let changed = format!(
                    "resource_name changed within the stream from {name:?} to {:?}",
                    message.resource_name
                );
                return Err(upload.fail(cache::Error::Invalid(changed)).await.into());
            }
            if message.write_offset != upload.wire() as i64 {
                let message = format!(
                    "write_offset {} does not follow the {} bytes already written",
                    message.write_offset,
                    upload.wire()
                );
                return Err(upload.fail(cache::Error::Invalid(message)).await.into());
            }
            if upload.push(message.data).await? == Progress::AlreadyPresent {
                return Ok(done);
            }
            if message.finish_write {
                break;
            }
            message = match stream.next().await.transpose() {
                Ok(Some(next)) => next,
                ended => {
                    // Whatever ended the stream, what arrived is kept for
                    // the client to resume.
                    let progress = upload.persist().await?;
                    return match (ended, progress) {
                        (_, Progress::AlreadyPresent) => Ok(done),
                        // A client that stalled is told why its call ended.
                        (Err(status), _) if status.code() == Code::DeadlineExceeded => Err(status),
                        // A disconnect is not an error.
                        _ => Ok(WriteResponse { committed_size: upload.wire() as i64 }),
                    };
                }
            };
        }
        if upload.complete().await? == Progress::AlreadyPresent {
            return Ok(done);
        }
        // Messages after finish_write break the protocol: store nothing then.
        if let Some(Some(Ok(_))) = stream.next().now_or_never() {
            let broken = cache::Error::Invalid("the stream went on after finish_write".into());
            return Err(upload.fail(broken).await.into());
        }
        let committed = upload.wire() as i64;
        match upload.commit().await? {
            // Stored by another writer meanwhile.
            Written::AlreadyPresent => Ok(done),
            Written::Stored => Ok(WriteResponse { committed_size: committed }),
        }
    }
}

pub type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        self.read_stream(request.into_inner()).await.map(Response::new)
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let mut stream = request.into_inner();
        // A stalled first message ends the call too: the request body times out.
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the write stream ended before its first message"))?;
        self.write_stream(first, stream).await.map(Response::new)
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let name = request.into_inner().resource_name;
        let digest = digest::parse_write_resource(&name).map_err(invalid)?.digest;
        // Uncompressed bytes for either encoding: a compressed upload resumes
        // at this offset of the blob with a new zstd stream.
        let (committed_size, complete) = match self.shared.cache.upload_state(name.clone(), digest).await? {
            UploadState::Complete => (digest.size as i64, true),
            UploadState::Committed(committed) => (committed as i64, false),
            UploadState::Unknown => {
                return Err(Status::not_found(format!(
                    "no upload {name:?} is in progress: start it with a Write at offset 0"
                )));
            }
        };
        Ok(Response::new(QueryWriteStatusResponse { committed_size, complete }))
    }
}
