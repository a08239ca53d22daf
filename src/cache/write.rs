//! Writes: streamed uploads (ByteStream, Bazel's HTTP cache) and batches of
//! small blobs. Each is verified, stored in the local tier, and copied to the
//! object store before it is acknowledged (write-through) or queued for the
//! replicator (write-back).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;
use tonic::Code;

use super::{Cache, Error, blocking};
use crate::budget::Held;
use crate::compression::{self, Decoder};
use crate::digest::{Digest, Encoding};
use crate::store::chunk::Chunker;
use crate::store::{NewBlob, Store, Written};

/// A whole blob of a batch update, as the client sent it.
pub struct Incoming {
    pub digest: Digest,
    pub encoding: Encoding,
    pub data: Bytes,
}

/// Whether an upload goes on, or found its blob stored by another writer
/// (then it is discarded, and the call succeeds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Continue,
    AlreadyPresent,
}

/// Where an upload stands, for QueryWriteStatus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadState {
    /// The blob is stored.
    Complete,
    /// This many uncompressed bytes are committed.
    Committed(u64),
    /// There is no such upload.
    Unknown,
}

impl Cache {
    /// Stores whole blobs: each is checked (and decompressed) on the
    /// blocking pool, the valid ones stored together, and each acknowledged
    /// once both tiers hold it (with write-through). A result per blob.
    pub async fn write_blobs(&self, blobs: Vec<Incoming>) -> Result<Vec<Result<(), Error>>, Error> {
        let store = Arc::clone(&self.store);
        let sizes: Vec<Result<(), Error>> = blobs.iter().map(|b| self.check_blob_size(&b.digest)).collect();
        let results = blocking(move || {
            // Validate (and decompress) each blob; the valid ones go to the store together.
            let mut decoder = None;
            let mut checked = Vec::with_capacity(blobs.len());
            let mut valid = Vec::new();
            for (blob, size) in blobs.into_iter().zip(sizes) {
                checked.push(size.and_then(|()| decode(blob, &mut decoder)).map(|blob| valid.push(blob)));
            }
            let mut stored = valid.iter().map(|b| b.digest).zip(store.put_blobs(&valid));
            let results: Vec<Result<(Digest, Written), Error>> = checked
                .into_iter()
                .map(|checked| {
                    checked.and_then(|()| {
                        let (d, written) = stored.next().expect("one result per valid blob");
                        written.map(|w| (d, w)).map_err(Error::from)
                    })
                })
                .collect();
            Ok::<_, Error>(results)
        })
        .await?;
        // Acknowledged once both tiers hold each blob (with write-through).
        let stored: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
        let mut replicated = self.replicate(stored).await.into_iter();
        Ok(results
            .into_iter()
            .map(|r| r.and_then(|_| replicated.next().expect("one result per stored blob")))
            .collect())
    }

    /// Begins the upload `key` of `digest` at `offset` (uncompressed bytes,
    /// for either encoding: it resumes where [`Cache::upload_state`] said),
    /// or resumes it. `None` if the blob is stored already (a copy an
    /// earlier write-through failed to make is made now).
    pub async fn begin_upload(
        self: &Arc<Self>,
        key: String,
        digest: Digest,
        encoding: Encoding,
        offset: i64,
    ) -> Result<Option<Upload>, Error> {
        self.check_blob_size(&digest)?;
        if self.local(vec![digest]).await?.1[0] {
            self.replicate_one(digest, Written::AlreadyPresent).await?;
            return Ok(None);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return Err(Error::Invalid(format!("write_offset {offset} is negative")));
        };
        // An upload holds a piece being gathered, one being written and, for
        // zstd, a chunk of decompressed bytes (the request body holds the
        // message being received); one cut into chunks as it streams, the
        // bytes waiting for the next cut too.
        let remaining = digest.size.saturating_sub(offset);
        let chunk = self.chunk_size() as u64;
        let cutting = if self.dedups(digest) { Store::chunking().window() as u64 } else { 0 };
        let held = self.budget.hold(remaining.min(2 * chunk) + remaining.min(chunk) + cutting).await?;
        let store = Arc::clone(&self.store);
        let upload = blocking(move || store.begin_upload(&key, digest, offset)).await?;
        Upload::new(Arc::clone(self), upload, encoding, held).map(Some)
    }

    /// Where the upload `key` of `digest` stands. A stream that just broke
    /// off may still be storing what it received: it is waited for (a
    /// little), or the client would resume at an offset already passed.
    pub async fn upload_state(&self, key: String, digest: Digest) -> Result<UploadState, Error> {
        if self.local(vec![digest]).await?.1[0] {
            return Ok(UploadState::Complete);
        }
        for _ in 0..100 {
            if !self.store.upload_active(&key) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let store = Arc::clone(&self.store);
        let committed = blocking(move || store.upload_committed(&key)).await?;
        Ok(committed.map_or(UploadState::Unknown, UploadState::Committed))
    }
}

/// Checks one blob of a batch update, decompressing a zstd one (with the
/// batch's `decoder`, made on first use) and noting its frames.
fn decode(blob: Incoming, decoder: &mut Option<Decoder>) -> Result<NewBlob, Error> {
    let Incoming { digest, encoding, data } = blob;
    let (blob, arrived) = match encoding {
        Encoding::Identity => (NewBlob::new(digest, data), "were sent"),
        Encoding::Zstd => {
            let decoder = match decoder {
                Some(decoder) => decoder,
                None => decoder.insert(Decoder::new(0)?),
            };
            let out = compression::decompress(decoder, &data, digest.size)
                .map_err(|e| Error::Invalid(format!("blob {digest}: {e}")))?;
            (
                NewBlob { digest, data: out.data, frames: out.frames, stored: None },
                "is what the zstd data decompresses to",
            )
        }
    };
    if blob.data.len() as u64 != digest.size {
        return Err(Error::Invalid(format!(
            "digest {digest} declares {} bytes but {} {arrived}",
            digest.size,
            blob.data.len()
        )));
    }
    Ok(blob)
}

/// The most bytes a client can send of `size` bytes of a blob in
/// `encoding`: more cannot be them. zstd's worst case adds a little per
/// 128 KiB block and per frame; this leaves plenty of room for both.
pub fn max_wire_bytes(size: u64, encoding: Encoding) -> u64 {
    match encoding {
        Encoding::Identity => size,
        Encoding::Zstd => size.saturating_add(size / 8).saturating_add(1 << 20),
    }
}

/// An upload in progress: gathers what arrives into pieces and hands each
/// to a [`Writer`] on the blocking pool while the next one arrives.
pub struct Upload {
    cache: Arc<Cache>,
    digest: Digest,
    encoding: Encoding,
    state: State,
    buffer: BytesMut,
    /// The offset the next bytes must carry. REAPI: the first offset plus
    /// the bytes received since, compressed bytes for zstd uploads.
    wire: u64,
    first_offset: u64,
    /// More wire bytes than this cannot be the blob.
    wire_limit: u64,
    /// What the upload holds in the budget.
    _held: Held,
}

/// Whether the writer is free, or writing a piece on the blocking pool.
enum State {
    Idle(Box<Writer>),
    /// The piece being written; it hands the writer back, and whether the
    /// blob was stored by another writer meanwhile.
    Writing(JoinHandle<Result<(Box<Writer>, bool), Error>>),
    /// Discarded, or lost with a failed piece: the call is ending.
    Ended,
}

impl Upload {
    fn new(
        cache: Arc<Cache>,
        upload: crate::store::Upload,
        encoding: Encoding,
        held: Held,
    ) -> Result<Upload, Error> {
        let first_offset = upload.committed();
        let remaining = upload.digest().size - first_offset;
        let wire_limit = first_offset + max_wire_bytes(remaining, encoding);
        let inflater = match encoding {
            Encoding::Identity => None,
            Encoding::Zstd => Some(Inflater::new(remaining, cache.chunk_size())?),
        };
        Ok(Upload {
            cache,
            digest: upload.digest(),
            encoding,
            state: State::Idle(Box::new(Writer { upload, inflater })),
            buffer: BytesMut::new(),
            wire: first_offset,
            first_offset,
            wire_limit,
            _held: held,
        })
    }

    /// The offset the next bytes must carry.
    pub fn wire(&self) -> u64 {
        self.wire
    }

    /// How many wire bytes make a piece: a chunk's worth when plain; for
    /// zstd, enough compressed bytes to be worth a trip to the pool.
    fn piece_size(&self) -> usize {
        let chunk_size = self.cache.chunk_size();
        match self.encoding {
            Encoding::Identity => chunk_size,
            Encoding::Zstd => (chunk_size / 4).max(64 << 10),
        }
    }

    /// Takes the next bytes the client sent. More than the blob can be
    /// ends the upload.
    pub async fn push(&mut self, data: Bytes) -> Result<Progress, Error> {
        let total = self.wire + data.len() as u64;
        if total > self.wire_limit {
            let digest = self.digest;
            let message = match self.encoding {
                Encoding::Identity => {
                    format!("{total} bytes written to blob {digest}, more than its declared size")
                }
                Encoding::Zstd => format!(
                    "{} compressed bytes written to blob {digest}: no zstd stream of it is that large",
                    total - self.first_offset
                ),
            };
            return Err(self.fail(Error::Invalid(message)).await);
        }
        self.wire = total;
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

    /// Waits for the piece in flight and takes the writer: `None` if
    /// another writer stored the blob meanwhile (this upload is discarded).
    async fn take_writer(&mut self) -> Result<Option<Box<Writer>>, Error> {
        match std::mem::replace(&mut self.state, State::Ended) {
            State::Idle(writer) => Ok(Some(writer)),
            State::Writing(pending) => {
                let (writer, present) = pending.await.map_err(|e| Error::Worker(e.to_string()))??;
                if present {
                    blocking(move || writer.upload.discard()).await?;
                    return Ok(None);
                }
                Ok(Some(writer))
            }
            State::Ended => Err(Error::Worker("the upload has ended".into())),
        }
    }

    /// Starts writing `piece` once the previous one is written; `last`
    /// also stores whatever the writer still holds. True if another writer
    /// stored the blob meanwhile.
    async fn write(&mut self, piece: Bytes, last: bool) -> Result<bool, Error> {
        let Some(mut writer) = self.take_writer().await? else {
            return Ok(true);
        };
        let store = Arc::clone(&self.cache.store);
        self.state = State::Writing(tokio::task::spawn_blocking(move || {
            let written = writer.write(&piece).and_then(|()| if last { writer.flush() } else { Ok(()) });
            if let Err(e) = written {
                // A stream that broke a rule (a zstd bomb, a corrupt frame)
                // stores nothing; a storage error keeps what was committed.
                if e.code() == Code::InvalidArgument {
                    let _ = writer.upload.discard();
                }
                return Err(e);
            }
            let present = store.contains(&[writer.upload.digest()])?[0];
            Ok((writer, present))
        }));
        Ok(false)
    }

    /// Stores everything received, including a partial last chunk: what a
    /// client that resumes finds committed.
    pub async fn persist(&mut self) -> Result<Progress, Error> {
        let tail = std::mem::take(&mut self.buffer).freeze();
        // The writer may hold bytes even when no wire bytes wait: decompressed
        // ones, or bytes waiting for the store's next cut.
        if self.write(tail, true).await? {
            return Ok(Progress::AlreadyPresent);
        }
        match self.take_writer().await? {
            Some(writer) => {
                self.state = State::Idle(writer);
                Ok(Progress::Continue)
            }
            None => Ok(Progress::AlreadyPresent),
        }
    }

    /// At the client's last message: stores what it holds, and checks that
    /// all bytes arrived and a zstd stream ended cleanly.
    pub async fn complete(&mut self) -> Result<Progress, Error> {
        if self.persist().await? == Progress::AlreadyPresent {
            return Ok(Progress::AlreadyPresent);
        }
        let checked = match &self.state {
            State::Idle(writer) => writer.check_complete(),
            _ => Err(Error::Worker("the upload has ended".into())),
        };
        match checked {
            Ok(()) => Ok(Progress::Continue),
            Err(e) => Err(self.fail(e).await),
        }
    }

    /// Verifies the whole blob against its digest, makes it visible, and
    /// copies it to the object store (with write-through).
    pub async fn commit(mut self) -> Result<Written, Error> {
        let Some(writer) = self.take_writer().await? else {
            return Ok(Written::AlreadyPresent);
        };
        let upload = writer.upload;
        let digest = upload.digest();
        let written = blocking(move || upload.finish()).await?;
        self.cache.replicate_one(digest, written).await?;
        Ok(written)
    }

    /// Ends an upload that broke a rule: it is deleted before the call
    /// answers, so that a client that retries at once finds its name free.
    /// Gives `e` back.
    pub async fn fail(&mut self, e: Error) -> Error {
        let writer = match std::mem::replace(&mut self.state, State::Ended) {
            State::Idle(writer) => Some(writer),
            State::Writing(pending) => pending.await.ok().and_then(Result::ok).map(|(writer, _)| writer),
            State::Ended => None,
        };
        if let Some(writer) = writer {
            let _ = blocking(move || writer.upload.discard()).await;
        }
        e
    }
}

/// The blocking half of an upload: turns wire bytes into stored chunks.
struct Writer {
    upload: crate::store::Upload,
    /// Decompresses a zstd upload.
    inflater: Option<Inflater>,
}

impl Writer {
    fn write(&mut self, piece: &[u8]) -> Result<(), Error> {
        match &mut self.inflater {
            None => Ok(self.upload.append(piece, None)?),
            Some(inflater) => inflater.write(&mut self.upload, piece),
        }
    }

    /// Stores the partial chunk a zstd upload holds, and the bytes the
    /// store holds for its next cut.
    fn flush(&mut self) -> Result<(), Error> {
        if let Some(inflater) = &mut self.inflater {
            inflater.chunker.flush(&mut |data, frame| self.upload.append(data, frame))?;
        }
        Ok(self.upload.flush()?)
    }

    /// At finish_write: all bytes arrived, and a zstd stream ended cleanly.
    fn check_complete(&self) -> Result<(), Error> {
        let digest = self.upload.digest();
        if self.upload.committed() != digest.size {
            return Err(Error::Invalid(format!(
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

/// Decompresses a zstd upload as it streams, into chunks: the store's
/// chunker keeps a client frame that holds a quarter chunk or more (or ends
/// the blob) as it is, and cuts the rest at the chunk size.
struct Inflater {
    decoder: Decoder,
    chunker: Chunker,
}

impl Inflater {
    /// `remaining`: the uncompressed bytes the stream may produce; any more
    /// and it is cut off.
    fn new(remaining: u64, chunk_size: usize) -> Result<Inflater, Error> {
        Ok(Inflater { decoder: Decoder::new(remaining)?, chunker: Chunker::new(chunk_size, chunk_size / 4) })
    }

    fn write(&mut self, upload: &mut crate::store::Upload, mut input: &[u8]) -> Result<(), Error> {
        loop {
            let step = self.decoder.step(input)?;
            self.chunker.frame_bytes(&input[..step.consumed]);
            input = &input[step.consumed..];
            self.chunker.data(step.data, step.frame_end, &mut |data, frame| upload.append(data, frame))?;
            if step.frame_end {
                let ends_blob = upload.received() + self.chunker.pending() as u64 == upload.digest().size;
                self.chunker.frame_end(ends_blob, &mut |data, frame| upload.append(data, frame))?;
            }
            if input.is_empty() && !step.more {
                return Ok(());
            }
        }
    }
}
