//! SplitBlob and SpliceBlob: a stored blob cut into content-defined chunks,
//! each stored as a blob of its own; and a blob made from stored chunks,
//! verified against its digest before it becomes visible. With
//! deduplication on, both leave a large blob as a list of its chunks (see
//! the store's `layout`, "Lists"): a list the store cut as SplitBlob asks is
//! answered as it is, a spliced blob costs only its references, and a blob
//! split with the store's own chunking gives its bytes up to its chunks.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{Cache, Error, Incoming, Progress, blocking};
use crate::cdc::Chunking;
use crate::digest::{Digest, Encoding, Hasher};
use crate::store::{Chunks, Form, Spliced, Store};

/// Chunks are stored in batches of about this many bytes.
const BATCH_BYTES: usize = 4 << 20;

impl Cache {
    /// Cuts the stored blob `digest` with `chunking` as it streams, stores
    /// every chunk as a blob, and answers their digests in order (none for
    /// the empty blob).
    pub async fn split_blob(&self, digest: Digest, chunking: &Chunking) -> Result<Vec<Digest>, Error> {
        let own = *chunking == Store::chunking();
        if own {
            let store = Arc::clone(&self.store);
            if let Some((Form::ListFastCdc, chunks)) = blocking(move || store.list_of(&digest)).await? {
                return Ok(chunks);
            }
        }
        let (chunks, read) = self.cut(digest, chunking).await?;
        // Kept as the list of its chunks from now on, its own bytes freed:
        // only if what was read is the blob (each chunk was checked as it
        // was read, but not that it was the chunk the index meant).
        if own && self.dedups(digest) {
            if read != digest {
                return Err(Error::DataLoss(format!("the stored bytes of {digest} hash to {read}")));
            }
            let (store, listed) = (Arc::clone(&self.store), chunks.clone());
            blocking(move || store.splice(&digest, &listed, Form::ListFastCdc, Chunks::CutFromBlob)).await?;
        }
        Ok(chunks)
    }

    /// Whether `blob` is large enough to be kept as a list, with
    /// deduplication on.
    pub(super) fn dedups(&self, blob: Digest) -> bool {
        let min = self.store.options().dedup_min_size;
        min > 0 && blob.size >= min
    }

    /// Cuts the blob `digest` as it streams, and stores every chunk; with
    /// the digest of all it read.
    async fn cut(&self, digest: Digest, chunking: &Chunking) -> Result<(Vec<Digest>, Digest), Error> {
        let window = chunking.window();
        // The window being cut and a batch of chunks being stored.
        let _held = self.hold((window + BATCH_BYTES + window) as u64).await?;
        let mut pieces = self.read(digest, 0, digest.size, false).await?;
        let (mut buffer, mut batch, mut batch_bytes) = (BytesMut::new(), Vec::new(), 0);
        let (mut pass, mut chunks, mut ended) = (chunking.pass(), Vec::new(), false);
        let mut read = Hasher::new(digest.function);
        loop {
            while !ended && buffer.len() < window {
                match pieces.next().await {
                    Some(piece) => buffer.extend_from_slice(&piece?),
                    None => ended = true,
                }
            }
            if buffer.is_empty() {
                break;
            }
            let cut = pass.cut(&buffer);
            let data = buffer.split_to(cut).freeze();
            read.update(&data);
            let chunk = digest_of(digest, &data);
            if chunks.len() == self.max_chunks() {
                return Err(Error::Invalid(format!(
                    "blob {digest} has more than {} chunks, more than one reply can list: read it whole",
                    chunks.len()
                )));
            }
            chunks.push(chunk);
            batch_bytes += data.len();
            batch.push(Incoming { digest: chunk, encoding: Encoding::Identity, data });
            if batch_bytes >= BATCH_BYTES || buffer.is_empty() {
                self.store_chunks(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
        }
        Ok((chunks, read.finish()))
    }

    /// The most chunk digests a reply can list within the largest message
    /// (a digest takes up to 140 bytes on the wire).
    fn max_chunks(&self) -> usize {
        self.limits.max_message_size / 140
    }

    async fn store_chunks(&self, batch: Vec<Incoming>) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        for stored in self.write_blobs(batch).await? {
            stored?;
        }
        Ok(())
    }

    /// Makes `blob` from the stored `chunks`, in order: NotFound if one is
    /// missing, InvalidArgument if their sizes do not add up to the blob's
    /// or their bytes do not hash to its digest (then nothing is visible).
    /// A blob stored already is left as it is.
    pub async fn splice_blob(self: &Arc<Self>, blob: Digest, chunks: Vec<Digest>) -> Result<(), Error> {
        let total = chunks.iter().fold(0u64, |sum, c| sum.saturating_add(c.size));
        if total != blob.size {
            return Err(Error::Invalid(format!(
                "the chunks add up to {total} bytes, but blob {blob} has {}",
                blob.size
            )));
        }
        let missing = self.find_missing(chunks.clone()).await?;
        if let Some(chunk) = missing.first() {
            return Err(Error::NotFound(format!(
                "chunk {chunk} is not in the CAS ({} of {} chunks are missing): upload them, then splice",
                missing.len(),
                chunks.len()
            )));
        }
        // A list of the chunks where they are; copied where the store cannot
        // (a chunk in the object store only, or a list itself).
        if self.dedups(blob) {
            let (store, listed) = (Arc::clone(&self.store), chunks.clone());
            if let Spliced::Done(written) =
                blocking(move || store.splice(&blob, &listed, Form::List, Chunks::Named)).await?
            {
                return self.replicate_one(blob, written).await;
            }
        }
        let key = super::own_upload("splice");
        let Some(mut upload) = self.begin_upload(key, blob, Encoding::Identity, 0).await? else {
            return Ok(());
        };
        for chunk in chunks {
            let mut pieces = match self.read(chunk, 0, chunk.size, false).await {
                Ok(pieces) => pieces,
                Err(e) => return Err(upload.fail(e).await),
            };
            while let Some(piece) = pieces.next().await {
                let piece: Bytes = match piece {
                    Ok(piece) => piece,
                    Err(e) => return Err(upload.fail(e).await),
                };
                if upload.push(piece).await? == Progress::AlreadyPresent {
                    return Ok(());
                }
            }
        }
        if upload.complete().await? == Progress::Continue {
            upload.commit().await?;
        }
        Ok(())
    }
}

/// The digest of a chunk of `blob`, with the blob's function.
fn digest_of(blob: Digest, data: &[u8]) -> Digest {
    let mut hasher = Hasher::new(blob.function);
    hasher.update(data);
    hasher.finish()
}
