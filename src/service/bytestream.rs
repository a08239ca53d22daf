//! google.bytestream.ByteStream over the CAS: Read, Write, QueryWriteStatus,
//! of plain (`blobs/`) and zstd (`compressed-blobs/zstd/`) resources.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::{READ_MESSAGE_SIZE, Shared, blocking};
use crate::budget::Held;
use crate::compression::Decoder;
use crate::digest::{self, Digest, Encoding};
use crate::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse, byte_stream_server::ByteStream,
};
use crate::store::{Store, Upload, Written};

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

    /// The rules of a ByteStream read; the HTTP cache protocol reads through it too.
    pub async fn read_stream(&self, request: ReadRequest) -> Result<ReadStream, Status> {
        let resource = digest::parse_read_resource(&request.resource_name)?;
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
        // A read holds about a chunk and a message while its client takes
        // them (a read-through holds what its copy has in flight too), taken
        // in one hold: a call that waits for more while holding some could
        // wait on others that do the same.
        let chunk = self.shared.store.options().chunk_size as u64;
        let holds = (end - start).min(chunk) + (end - start).min(READ_MESSAGE_SIZE as u64);
        let budget = &self.shared.budget;
        let store = Arc::clone(&self.shared.store);
        let locate = || {
            let store = Arc::clone(&store);
            blocking(move || store.locate(&digest))
        };
        let not_found = || Status::not_found(format!("blob {digest} is not in the CAS"));
        let blob = match (locate().await?, &self.shared.remote) {
            (Some(blob), remote) => {
                if remote.is_some() {
                    self.shared.metrics.tier_reads(1, 0, 0);
                }
                blob
            }
            (None, Some(remote)) if start < end => {
                let held = budget.hold(3 * holds).await?;
                match self.read_through(remote, digest, start, end, zstd, held).await? {
                    Some(stream) => return Ok(stream),
                    // Another call brought it in meanwhile.
                    None => locate().await?.ok_or_else(not_found)?,
                }
            }
            (None, Some(_)) => {
                self.shared.fetch(&[digest]).await?;
                locate().await?.ok_or_else(not_found)?
            }
            (None, None) => return Err(not_found()),
        };
        let held = budget.hold(holds).await?;
        Ok(read_local(store, blob, start, end, zstd, held))
    }

    /// Streams a blob the local tier lacks from the object store, while it
    /// is copied into the local tier. The last message is held back until
    /// the whole blob has matched its digest: a client never receives a
    /// whole stream of wrong bytes. `None` if another call was copying the
    /// blob in already (it is local now).
    async fn read_through(
        &self,
        remote: &Arc<crate::remote::Remote>,
        digest: Digest,
        start: u64,
        end: u64,
        zstd: bool,
        held: Held,
    ) -> Result<Option<ReadStream>, Status> {
        let (tee, mut pieces) = mpsc::channel(2);
        let fetch = tokio::spawn(self.shared.fetch_one(remote, digest, Some(tee)));
        let finished = |joined: Result<Result<bool, Status>, tokio::task::JoinError>| {
            joined.unwrap_or_else(|e| {
                Err(Status::internal(format!("a fetch from the object store failed: {e}")))
            })
        };
        let metrics = Arc::clone(&self.shared.metrics);
        // The first chunk, or the end of the fetch, decides how the call answers.
        let Some(mut piece) = pieces.recv().await else {
            let found = finished(fetch.await)?;
            metrics.tier_reads(0, u64::from(found), u64::from(!found));
            return match found {
                true => Ok(None),
                false => Err(Status::not_found(format!("blob {digest} is not in the CAS"))),
            };
        };
        let (tx, rx) = mpsc::channel(2);
        let store = Arc::clone(&self.shared.store);
        tokio::spawn(async move {
            // Given back when the copy and the stream are done.
            let _budget = held;
            let mut held: Option<Bytes> = None;
            // Where the pieces sent so far end.
            let mut sent = start;
            loop {
                let at = piece.start;
                sent = sent.max((at + piece.data.len() as u64).min(end));
                if at + piece.data.len() as u64 > start && at < end {
                    let skip = start.saturating_sub(at) as usize;
                    let part = match zstd {
                        true => {
                            crate::store::chunk::to_frame(piece.value.to_vec(), skip).map(|(frame, _)| frame)
                        }
                        false => Some(piece.data.slice(skip..((end - at) as usize).min(piece.data.len()))),
                    };
                    let Some(mut part) = part else {
                        let _ = tx
                            .send(Err(Status::internal(format!("blob {digest}: a chunk fails its check"))))
                            .await;
                        return;
                    };
                    while !part.is_empty() {
                        let message = part.split_to(part.len().min(READ_MESSAGE_SIZE));
                        if let Some(ready) = held.replace(message)
                            && tx.send(Ok(ReadResponse { data: ready })).await.is_err()
                        {
                            return; // the client went away; the copy goes on
                        }
                    }
                }
                match pieces.recv().await {
                    Some(next) => piece = next,
                    None => break,
                }
            }
            let last = match finished(fetch.await) {
                Ok(true) if sent < end => {
                    // A reader that fell behind the copy was left; it goes
                    // on from the local tier.
                    metrics.tier_reads(0, 1, 0);
                    if let Some(data) = held
                        && tx.send(Ok(ReadResponse { data })).await.is_err()
                    {
                        return;
                    }
                    let local = Arc::clone(&store);
                    match blocking(move || local.locate(&digest)).await {
                        Ok(Some(blob)) => {
                            let mut rest = read_local(store, blob, sent, end, zstd, Held::default());
                            while let Some(message) = rest.next().await {
                                if tx.send(message).await.is_err() {
                                    return;
                                }
                            }
                            None
                        }
                        Ok(None) => Some(Err(Status::not_found(format!("blob {digest} is not in the CAS")))),
                        Err(status) => Some(Err(status)),
                    }
                }
                Ok(true) => {
                    metrics.tier_reads(0, 1, 0);
                    held.map(|data| Ok(ReadResponse { data }))
                }
                Ok(false) => {
                    metrics.tier_reads(0, 0, 1);
                    Some(Err(Status::not_found(format!(
                        "blob {digest} was damaged in the object store, and is not in the CAS"
                    ))))
                }
                Err(status) => Some(Err(status)),
            };
            if let Some(last) = last {
                let _ = tx.send(last).await;
            }
        });
        Ok(Some(Box::pin(ReceiverStream::new(rx)) as ReadStream))
    }
}

/// Streams `start..end` of a blob the local tier holds. Lazily: a chunk is
/// read once the client has taken the one before, so a client that stops
/// reading holds at most one chunk here, whatever the blob's size; `held`
/// counts it in the budget until the stream ends.
fn read_local(
    store: Arc<Store>,
    blob: crate::store::Blob,
    start: u64,
    end: u64,
    zstd: bool,
    held: Held,
) -> ReadStream {
    struct Reading {
        _held: Held,
        store: Arc<Store>,
        blob: crate::store::Blob,
        offset: u64,
        end: u64,
        zstd: bool,
        /// What is left of the last chunk read.
        piece: Bytes,
        /// Nothing read yet: a read always reads once (a compressed read of
        /// an empty range still gets its frame).
        first: bool,
        failed: bool,
    }
    let reading = Reading {
        _held: held,
        store,
        blob,
        offset: start,
        end,
        zstd,
        piece: Bytes::new(),
        first: true,
        failed: false,
    };
    let stream = futures::stream::unfold(reading, |mut r| async move {
        while r.piece.is_empty() {
            if r.failed || (!r.first && r.offset >= r.end) {
                return None;
            }
            r.first = false;
            let (store, blob, offset, zstd) = (Arc::clone(&r.store), r.blob, r.offset, r.zstd);
            // Each piece is the rest of one stored chunk: plain bytes, or
            // (for zstd) one frame of them, the stored frame where it can be.
            let piece = blocking(move || {
                if zstd {
                    store.read_frame_at(&blob, offset)
                } else {
                    let data = store.read_at(&blob, offset)?;
                    let len = data.len() as u64;
                    Ok((data, len))
                }
            })
            .await;
            match piece {
                Ok((mut data, len)) => {
                    if !r.zstd {
                        data.truncate((r.end - r.offset) as usize);
                    }
                    r.offset += len.min(r.end - r.offset);
                    r.piece = data;
                }
                Err(status) => {
                    r.failed = true;
                    return Some((Err(status), r));
                }
            }
        }
        let part = r.piece.split_to(r.piece.len().min(READ_MESSAGE_SIZE));
        Some((Ok(ReadResponse { data: part }), r))
    });
    Box::pin(stream) as ReadStream
}

impl ByteStreamService {
    /// The rules of a ByteStream write over any stream of messages: a gRPC
    /// stream, or the body of an HTTP PUT.
    pub async fn write_stream<S>(&self, first: WriteRequest, mut stream: S) -> Result<WriteResponse, Status>
    where
        S: Stream<Item = Result<WriteRequest, Status>> + Unpin + Send,
    {
        if first.resource_name.is_empty() {
            return Err(Status::invalid_argument("resource_name is required on the first write message"));
        }
        let resource = digest::parse_write_resource(&first.resource_name)?;
        let digest = resource.digest;
        // REAPI: an upload that finds its blob stored ends at once with the
        // full size, or -1 for compressed uploads.
        let done = WriteResponse {
            committed_size: match resource.encoding {
                Encoding::Identity => digest.size as i64,
                Encoding::Zstd => -1,
            },
        };
        if self.present(digest).await? {
            // A copy an earlier write-through failed to make is made now.
            self.shared.replicate_one(digest, Written::AlreadyPresent).await?;
            return Ok(done);
        }
        if first.write_offset < 0 {
            return Err(Status::invalid_argument(format!("write_offset {} is negative", first.write_offset)));
        }
        // An upload holds a piece being gathered, one being written and, for
        // zstd, a chunk of decompressed bytes (the request body holds the
        // message being received).
        let remaining = digest.size.saturating_sub(first.write_offset as u64);
        let chunk = self.shared.store.options().chunk_size as u64;
        let _held = self.shared.budget.hold(remaining.min(2 * chunk) + remaining.min(chunk)).await?;
        // The first offset counts uncompressed bytes for either encoding: it
        // resumes at what QueryWriteStatus reported.
        let name = first.resource_name.clone();
        let store = Arc::clone(&self.shared.store);
        let upload = {
            let (store, name) = (Arc::clone(&store), name.clone());
            blocking(move || store.begin_upload(&name, digest, first.write_offset as u64)).await?
        };
        let mut sink = Sink::new(store, upload, resource.encoding)?;
        let mut message = first;
        loop {
            if !message.resource_name.is_empty() && message.resource_name != name {
                return sink.fail(Status::invalid_argument(format!(
                    "resource_name changed within the stream from {name:?} to {:?}",
                    message.resource_name
                )));
            }
            if message.write_offset != sink.wire as i64 {
                return sink.fail(Status::invalid_argument(format!(
                    "write_offset {} does not follow the {} bytes already written",
                    message.write_offset, sink.wire
                )));
            }
            let total = sink.wire + message.data.len() as u64;
            if total > sink.wire_limit {
                return sink.fail(Status::invalid_argument(match resource.encoding {
                    Encoding::Identity => {
                        format!("{total} bytes written to blob {digest}, more than its declared size")
                    }
                    Encoding::Zstd => format!(
                        "{} compressed bytes written to blob {digest}: no zstd stream of it is that large",
                        total - sink.first_offset
                    ),
                }));
            }
            match sink.push(message.data).await? {
                Progress::Continue => {}
                Progress::AlreadyPresent => return Ok(done),
            }
            if message.finish_write {
                break;
            }
            message = match stream.next().await.transpose() {
                Ok(Some(next)) => next,
                ended => {
                    // Whatever ended the stream, what arrived is kept for
                    // the client to resume.
                    let progress = sink.persist_tail().await?;
                    return match (ended, progress) {
                        (_, Progress::AlreadyPresent) => Ok(done),
                        // A client that stalled is told why its call ended.
                        (Err(status), _) if status.code() == Code::DeadlineExceeded => Err(status),
                        // A disconnect is not an error.
                        _ => Ok(WriteResponse { committed_size: sink.wire as i64 }),
                    };
                }
            };
        }
        if let Progress::AlreadyPresent = sink.persist_tail().await? {
            return Ok(done);
        }
        let writer = sink.writer.as_ref().expect("persist_tail leaves the writer in place");
        if let Err(status) = writer.check_complete() {
            return sink.fail(status);
        }
        // Messages after finish_write break the protocol: store nothing then.
        if let Some(Some(Ok(_))) = stream.next().now_or_never() {
            return sink.fail(Status::invalid_argument("the stream went on after finish_write"));
        }
        let upload = sink.writer.take().expect("checked above").upload;
        let digest = upload.digest();
        let written = blocking(move || upload.finish()).await?;
        self.shared.replicate_one(digest, written).await?;
        if written == Written::AlreadyPresent {
            return Ok(done); // stored by another writer meanwhile
        }
        Ok(WriteResponse { committed_size: sink.wire as i64 })
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
        let digest = digest::parse_write_resource(&name)?.digest;
        if self.present(digest).await? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: digest.size as i64,
                complete: true,
            }));
        }
        // A stream that just broke off may still be storing what it received:
        // wait for it, or the client would resume at an offset already passed.
        let store = Arc::clone(&self.shared.store);
        for _ in 0..100 {
            if !store.upload_active(&name) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Uncompressed bytes for either encoding: a compressed upload resumes
        // at this offset of the blob with a new zstd stream.
        let looked_up = name.clone();
        let committed = blocking(move || store.upload_committed(&looked_up)).await?.ok_or_else(|| {
            Status::not_found(format!("no upload {name:?} is in progress: start it with a Write at offset 0"))
        })?;
        Ok(Response::new(QueryWriteStatusResponse { committed_size: committed as i64, complete: false }))
    }
}

enum Progress {
    Continue,
    AlreadyPresent,
}

/// The receiving end of an upload: gathers messages into pieces and hands
/// each to a [`Writer`] on the blocking pool while the next one arrives.
struct Sink {
    store: Arc<Store>,
    encoding: Encoding,
    /// The writer, when no piece is being written.
    writer: Option<Writer>,
    /// The piece being written; it hands the writer back.
    pending: Option<JoinHandle<Result<(Writer, bool), Status>>>,
    buffer: BytesMut,
    /// The offset the next message must carry. REAPI: the first offset plus
    /// the bytes received since, compressed bytes for zstd uploads.
    wire: u64,
    first_offset: u64,
    /// More wire bytes than this cannot be the blob.
    wire_limit: u64,
}

impl Sink {
    fn new(store: Arc<Store>, upload: Upload, encoding: Encoding) -> Result<Sink, Status> {
        let first_offset = upload.committed();
        let remaining = upload.digest().size - first_offset;
        let (wire_limit, inflater) = match encoding {
            Encoding::Identity => (upload.digest().size, None),
            // zstd's worst case adds a little per 128 KiB block and per
            // frame; this leaves plenty of room for both.
            Encoding::Zstd => (
                first_offset + remaining + remaining / 8 + (1 << 20),
                Some(Inflater::new(remaining, store.options().chunk_size)?),
            ),
        };
        Ok(Sink {
            store,
            encoding,
            writer: Some(Writer { upload, inflater }),
            pending: None,
            buffer: BytesMut::new(),
            wire: first_offset,
            first_offset,
            wire_limit,
        })
    }

    /// How many wire bytes make a piece: a chunk's worth when plain; for
    /// zstd, enough compressed bytes to be worth a trip to the pool.
    fn piece_size(&self) -> usize {
        let chunk_size = self.store.options().chunk_size;
        match self.encoding {
            Encoding::Identity => chunk_size,
            Encoding::Zstd => (chunk_size / 4).max(64 << 10),
        }
    }

    async fn push(&mut self, data: Bytes) -> Result<Progress, Status> {
        self.wire += data.len() as u64;
        self.buffer.extend_from_slice(&data);
        let piece_size = self.piece_size();
        while self.buffer.len() >= piece_size {
            let piece = self.buffer.split_to(piece_size).freeze();
            if self.write(piece, false).await? {
                return Ok(Progress::AlreadyPresent);
            }
        }
        Ok(Progress::Continue)
    }

    /// Waits for the piece in flight; true if another writer stored the blob
    /// meanwhile (then this upload is discarded).
    async fn settle(&mut self) -> Result<bool, Status> {
        let Some(pending) = self.pending.take() else {
            return Ok(false);
        };
        let (writer, present) =
            pending.await.map_err(|e| Status::internal(format!("a storage worker failed: {e}")))??;
        if present {
            blocking(move || writer.upload.discard()).await?;
            return Ok(true);
        }
        self.writer = Some(writer);
        Ok(false)
    }

    /// Starts writing `piece` once the previous one is written; `last`
    /// also stores whatever the writer still holds.
    async fn write(&mut self, piece: Bytes, last: bool) -> Result<bool, Status> {
        if self.settle().await? {
            return Ok(true);
        }
        let mut writer = self.writer.take().expect("settled");
        let store = Arc::clone(&self.store);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            let written = writer.write(&piece).and_then(|()| if last { writer.flush() } else { Ok(()) });
            if let Err(status) = written {
                // A stream that broke a rule (a zstd bomb, a corrupt frame)
                // stores nothing; a storage error keeps what was committed.
                if status.code() == Code::InvalidArgument {
                    let _ = writer.upload.discard();
                }
                return Err(status);
            }
            let present = store.contains(&[writer.upload.digest()])?[0];
            Ok((writer, present))
        }));
        Ok(false)
    }

    /// Stores everything received, including a partial last chunk.
    async fn persist_tail(&mut self) -> Result<Progress, Status> {
        let tail = std::mem::take(&mut self.buffer).freeze();
        // A zstd writer may hold decompressed bytes even when no wire bytes do.
        let holding = !tail.is_empty() || self.encoding == Encoding::Zstd;
        if (holding && self.write(tail, true).await?) || self.settle().await? {
            return Ok(Progress::AlreadyPresent);
        }
        Ok(Progress::Continue)
    }

    /// Ends a stream that broke a rule: the upload is deleted.
    fn fail(&mut self, status: Status) -> Result<WriteResponse, Status> {
        let (writer, pending) = (self.writer.take(), self.pending.take());
        tokio::spawn(async move {
            let writer = match (writer, pending) {
                (Some(w), _) => Some(w),
                (None, Some(p)) => p.await.ok().and_then(Result::ok).map(|(w, _)| w),
                (None, None) => None,
            };
            if let Some(writer) = writer {
                let _ = tokio::task::spawn_blocking(move || writer.upload.discard()).await;
            }
        });
        Err(status)
    }
}

/// The blocking half of an upload: turns wire bytes into stored chunks.
struct Writer {
    upload: Upload,
    /// Decompresses a zstd upload.
    inflater: Option<Inflater>,
}

impl Writer {
    fn write(&mut self, piece: &[u8]) -> Result<(), Status> {
        match &mut self.inflater {
            None => Ok(self.upload.append(piece, None)?),
            Some(inflater) => inflater.write(&mut self.upload, piece),
        }
    }

    /// Stores the partial chunk a zstd upload holds.
    fn flush(&mut self) -> Result<(), Status> {
        if let Some(inflater) = &mut self.inflater {
            inflater.capturing = false;
            self.upload.append(&inflater.out, None)?;
            inflater.out.clear();
        }
        Ok(())
    }

    /// At finish_write: all bytes arrived, and a zstd stream ended cleanly.
    fn check_complete(&self) -> Result<(), Status> {
        let digest = self.upload.digest();
        if self.upload.committed() != digest.size {
            return Err(Status::invalid_argument(format!(
                "finish_write after {} bytes, but blob {digest} declares {}",
                self.upload.committed(),
                digest.size
            )));
        }
        if let Some(inflater) = &self.inflater {
            inflater.decoder.finish()?;
        }
        Ok(())
    }
}

/// Decompresses a zstd upload as it streams, into chunks. A client frame
/// that holds a whole chunk's bytes is kept and stored as it is.
struct Inflater {
    decoder: Decoder,
    chunk_size: usize,
    /// Decompressed bytes not stored yet: less than a chunk.
    out: Vec<u8>,
    /// The compressed bytes of the current frame, while `capturing`: while
    /// it may still become a chunk of its own (it began a chunk, and is no
    /// larger than one). Reused from frame to frame.
    frame: Vec<u8>,
    capturing: bool,
}

impl Inflater {
    /// `remaining`: the uncompressed bytes the stream may produce; any more
    /// and it is cut off.
    fn new(remaining: u64, chunk_size: usize) -> Result<Inflater, Status> {
        Ok(Inflater {
            decoder: Decoder::new(remaining)?,
            chunk_size,
            out: Vec::with_capacity(chunk_size),
            frame: Vec::new(),
            capturing: true,
        })
    }

    fn write(&mut self, upload: &mut Upload, mut input: &[u8]) -> Result<(), Status> {
        let chunk_size = self.chunk_size;
        loop {
            let step = self.decoder.step(input)?;
            if self.capturing {
                self.frame.extend_from_slice(&input[..step.consumed]);
                // Larger than the bytes it could hold raw: never kept.
                self.capturing = self.frame.len() <= chunk_size;
            }
            input = &input[step.consumed..];
            let mut data = step.data;
            while !data.is_empty() {
                let n = data.len().min(chunk_size - self.out.len());
                self.out.extend_from_slice(&data[..n]);
                data = &data[n..];
                // A full chunk inside a frame: that frame spans chunks.
                if self.out.len() == chunk_size && !(step.frame_end && data.is_empty()) {
                    self.capturing = false;
                    upload.append(&self.out, None)?;
                    self.out.clear();
                }
            }
            if step.frame_end {
                let ends_blob = upload.committed() + self.out.len() as u64 == upload.digest().size;
                let whole = self.out.len() >= chunk_size / 4 || ends_blob;
                if self.capturing && !self.out.is_empty() && whole {
                    // The frame holds exactly these bytes: keep it.
                    upload.append(&self.out, Some(&self.frame))?;
                    self.out.clear();
                } else if self.out.len() == chunk_size {
                    upload.append(&self.out, None)?;
                    self.out.clear();
                }
                self.frame.clear();
                self.capturing = self.out.is_empty();
            }
            if input.is_empty() && !step.more {
                return Ok(());
            }
        }
    }
}
