//! Reads: a blob as a stream of pieces (ByteStream, Bazel's HTTP cache), or
//! small blobs whole (batch reads). A blob the local tier lacks is read
//! through from the object store.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Cache, Error, Tier, blocking};
use crate::budget::Held;
use crate::digest::{Digest, Encoding};
use crate::store::{Blob, Store};

/// Largest piece a read streams: well under the 4 MiB that gRPC clients
/// accept in one message by default.
pub const MAX_PIECE: usize = 1 << 20;

/// A blob's bytes (or zstd frames of them) as they are read.
pub type Pieces = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

fn not_found(digest: &Digest) -> Error {
    Error::NotFound(format!("blob {digest} is not in the CAS"))
}

impl Cache {
    /// Streams `start..end` of a blob, plain or (`zstd`) as zstd frames
    /// whose content starts at `start` and runs to the end of the blob. The
    /// caller has checked the range against the blob's size.
    pub async fn read(&self, digest: Digest, start: u64, end: u64, zstd: bool) -> Result<Pieces, Error> {
        // A read holds about a chunk and a piece while its client takes
        // them (a read-through holds what its copy has in flight too), taken
        // in one hold: a call that waits for more while holding some could
        // wait on others that do the same.
        let chunk = self.chunk_size() as u64;
        let holds = (end - start).min(chunk) + (end - start).min(MAX_PIECE as u64);
        let locate = || {
            let store = Arc::clone(&self.store);
            blocking(move || store.locate(&digest))
        };
        let blob = match (locate().await?, &self.tier) {
            (Some(blob), tier) => {
                if tier.is_some() {
                    self.metrics.tier_reads(1, 0, 0);
                    self.touch(&[digest]).await;
                }
                blob
            }
            (None, Some(tier)) if start < end => {
                let held = self.budget.hold(3 * holds).await?;
                match self.read_through(tier, digest, start, end, zstd, held).await? {
                    Some(stream) => return Ok(stream),
                    // Another call brought it in meanwhile.
                    None => locate().await?.ok_or_else(|| not_found(&digest))?,
                }
            }
            (None, Some(_)) => {
                self.fetch(&[digest]).await?;
                locate().await?.ok_or_else(|| not_found(&digest))?
            }
            (None, None) => return Err(not_found(&digest)),
        };
        let held = self.budget.hold(holds).await?;
        Ok(read_local(Arc::clone(&self.store), blob, start, end, zstd, held))
    }

    /// Streams a blob the local tier lacks from the object store, while it
    /// is copied into the local tier. The last piece is held back until the
    /// whole blob has matched its digest: a client never receives a whole
    /// stream of wrong bytes. `None` if another call was copying the blob in
    /// already (it is local now).
    async fn read_through(
        &self,
        tier: &Arc<Tier>,
        digest: Digest,
        start: u64,
        end: u64,
        zstd: bool,
        held: Held,
    ) -> Result<Option<Pieces>, Error> {
        let (tee, mut pieces) = mpsc::channel(2);
        let fetch = tokio::spawn(self.fetch_one(tier, digest, Some(tee)));
        let finished = |joined: Result<Result<bool, Error>, tokio::task::JoinError>| {
            joined
                .unwrap_or_else(|e| Err(Error::Worker(format!("a fetch from the object store failed: {e}"))))
        };
        let metrics = Arc::clone(&self.metrics);
        // The first chunk, or the end of the fetch, decides how the call answers.
        let Some(mut piece) = pieces.recv().await else {
            let found = finished(fetch.await)?;
            metrics.tier_reads(0, u64::from(found), u64::from(!found));
            return match found {
                true => Ok(None),
                false => Err(not_found(&digest)),
            };
        };
        let (tx, rx) = mpsc::channel(2);
        let store = Arc::clone(&self.store);
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
                            crate::store::chunk::to_frame(piece.value.clone(), skip).map(|(frame, _)| frame)
                        }
                        false => Some(piece.data.slice(skip..((end - at) as usize).min(piece.data.len()))),
                    };
                    let Some(mut part) = part else {
                        let failed = Error::Worker(format!("blob {digest}: a chunk fails its check"));
                        let _ = tx.send(Err(failed)).await;
                        return;
                    };
                    while !part.is_empty() {
                        let next = part.split_to(part.len().min(MAX_PIECE));
                        if let Some(ready) = held.replace(next)
                            && tx.send(Ok(ready)).await.is_err()
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
                        && tx.send(Ok(data)).await.is_err()
                    {
                        return;
                    }
                    let local = Arc::clone(&store);
                    match blocking(move || local.locate(&digest)).await {
                        Ok(Some(blob)) => {
                            let mut rest = read_local(store, blob, sent, end, zstd, Held::default());
                            while let Some(next) = rest.next().await {
                                if tx.send(next).await.is_err() {
                                    return;
                                }
                            }
                            None
                        }
                        Ok(None) => Some(Err(not_found(&digest))),
                        Err(e) => Some(Err(e)),
                    }
                }
                Ok(true) => {
                    metrics.tier_reads(0, 1, 0);
                    held.map(Ok)
                }
                Ok(false) => {
                    metrics.tier_reads(0, 0, 1);
                    Some(Err(Error::NotFound(format!(
                        "blob {digest} was damaged in the object store, and is not in the CAS"
                    ))))
                }
                Err(e) => Some(Err(e)),
            };
            if let Some(last) = last {
                let _ = tx.send(last).await;
            }
        });
        Ok(Some(Box::pin(ReceiverStream::new(rx)) as Pieces))
    }

    /// Small blobs whole, for a batch read: plain, or (when the client
    /// accepts `zstd`) the stored frames where any chunk is compressed. The
    /// blobs the local tier lacks are read through first; with the object
    /// store down, the local tier still answers for what it holds.
    pub async fn read_blobs(
        &self,
        digests: Vec<Digest>,
        zstd: bool,
    ) -> Result<Vec<Result<(Bytes, Encoding), Error>>, Error> {
        // The reply holds every blob read.
        let _held = self.budget.hold(digests.iter().map(|d| d.size).sum()).await?;
        if let Err(e) = self.fetch(&digests).await {
            tracing::warn!("BatchReadBlobs: {e}");
        }
        let store = Arc::clone(&self.store);
        let (digests, read) = blocking(move || {
            let read = store.read_batch(&digests, zstd).into_iter().zip(&digests);
            let read: Vec<_> = read.map(|(found, d)| found?.ok_or_else(|| not_found(d))).collect();
            Ok::<_, Error>((digests, read))
        })
        .await?;
        if self.records_uses() {
            let found: Vec<Digest> =
                digests.iter().zip(&read).filter(|(_, r)| r.is_ok()).map(|(d, _)| *d).collect();
            self.touch(&found).await;
        }
        Ok(read)
    }
}

/// Streams `start..end` of a blob the local tier holds. Lazily: a chunk is
/// read once the client has taken the one before, so a client that stops
/// reading holds at most one chunk here, whatever the blob's size; `held`
/// counts it in the budget until the stream ends.
fn read_local(store: Arc<Store>, blob: Blob, start: u64, end: u64, zstd: bool, held: Held) -> Pieces {
    struct Reading {
        _held: Held,
        store: Arc<Store>,
        blob: Blob,
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
                Err(e) => {
                    r.failed = true;
                    return Some((Err(e), r));
                }
            }
        }
        let part = r.piece.split_to(r.piece.len().min(MAX_PIECE));
        Some((Ok(part), r))
    });
    Box::pin(stream) as Pieces
}
