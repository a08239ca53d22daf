//! Copies between the tiers: a blob the local tier lacks comes in from the
//! object store (a read-through), checked chunk by chunk and against its
//! digest; a blob written locally goes out to it (write-through now, or
//! write-back by the replicator), chunk by chunk as it is stored, without
//! being compressed again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use super::{Cache, Error, Tier, Writes, blocking};
use crate::digest::Digest;
use crate::objstore::{self, BlobReader, Bucket, Header, pack};
use crate::store::{self, Store, Written, chunk};

/// Blobs copied between the tiers at once for one call.
const FETCHES_IN_FLIGHT: usize = 32;
/// A blob as the local tier stores it: its digest and its chunks.
type StoredBlob = (Digest, Vec<Bytes>);
/// Packs written at once for one call.
const PACKS_IN_FLIGHT: usize = 4;
/// How long a copy waits for a reader streaming it to take a chunk.
const TEE_WAIT: Duration = Duration::from_secs(5);
/// A stored chunk holds at most MAX_CHUNK_SIZE bytes, compressed or not (a
/// frame that cannot shrink them is stored raw): a larger one in an object
/// is damage, refused before it is buffered.
const MAX_STORED_CHUNK: usize = chunk::MAX_CHUNK_SIZE + 1024;

/// One chunk of a blob being fetched, as stored (`value`) and decoded.
pub struct Piece {
    /// Its offset in the blob.
    pub start: u64,
    pub data: Bytes,
    pub value: Bytes,
}

impl Cache {
    /// Brings the blobs the local tier lacks in from the object store (a
    /// read-through). Blobs neither tier holds stay missing; an object store
    /// that is down makes this UNAVAILABLE.
    pub(super) async fn fetch(&self, digests: &[Digest]) -> Result<(), Error> {
        let Some(tier) = &self.tier else { return Ok(()) };
        let (wanted, present) = self.local(digests.to_vec()).await?;
        let local = present.iter().filter(|&&p| p).count() as u64;
        let mut absent: Vec<Digest> =
            wanted.into_iter().zip(present).filter(|(_, p)| !p).map(|(d, _)| d).collect();
        // One blob of each pack first, so that the packs are read in
        // parallel (the other blobs of a pack wait for its read).
        let packs = tier.bucket.packs_of(&absent, None).await;
        let mut first = HashSet::new();
        let mut order: Vec<(bool, usize)> = packs
            .iter()
            .enumerate()
            .map(|(i, held)| (held.as_ref().is_some_and(|h| !first.insert(h.pack)), i))
            .collect();
        order.sort_unstable();
        absent = order.into_iter().map(|(_, i)| absent[i]).collect();
        let fetches: Vec<_> = absent.into_iter().map(|d| self.fetch_one(tier, d, None)).collect();
        // In parallel: small blobs cost the object store's latency each.
        let found: Vec<bool> =
            futures::stream::iter(fetches).buffer_unordered(FETCHES_IN_FLIGHT).try_collect().await?;
        let remote_hits = found.iter().filter(|&&f| f).count() as u64;
        self.metrics.tier_reads(local, remote_hits, found.len() as u64 - remote_hits);
        Ok(())
    }

    /// Brings one blob the local tier lacks in from the object store,
    /// sending its chunks to `tee` as they are stored (see [`fetch_into`]);
    /// `false` if the object store lacks it. A damaged object is deleted, so
    /// that clients write it again.
    pub(super) fn fetch_one(
        &self,
        tier: &Arc<Tier>,
        digest: Digest,
        tee: Option<mpsc::Sender<Piece>>,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'static {
        let (tier, store, metrics) = (Arc::clone(tier), Arc::clone(&self.store), Arc::clone(&self.metrics));
        async move {
            match fetch_into(&tier.bucket, &store, digest, tee, true).await {
                Ok(found) => Ok(found),
                Err(Error::ObjStore(objstore::Error::Damaged(what))) => {
                    metrics.tier_error(true);
                    tracing::warn!("deleted, to be written again: the object store held a damaged {what}");
                    let _ = tier.bucket.forget(&digest).await;
                    Ok(false)
                }
                Err(e) => {
                    metrics.tier_error(false);
                    Err(e)
                }
            }
        }
    }

    /// Copies blobs just written to the local tier to the object store,
    /// [`FETCHES_IN_FLIGHT`] at a time; a result per blob. Write-through: a
    /// write is acknowledged only once both tiers hold it, and a failed copy
    /// stays queued for the replicator. Write-back: the queue holds them
    /// (blobs the local tier held already are queued to be checked), and
    /// the replicator is woken.
    pub(super) async fn replicate(&self, written: Vec<(Digest, Written)>) -> Vec<Result<(), Error>> {
        let all_done = |written: &[(Digest, Written)]| written.iter().map(|_| Ok(())).collect();
        let Some(tier) = &self.tier else { return all_done(&written) };
        if tier.writes == Writes::Back {
            let rewritten: Vec<Digest> =
                written.iter().filter(|(_, w)| *w == Written::AlreadyPresent).map(|(d, _)| *d).collect();
            if !rewritten.is_empty() {
                let store = Arc::clone(&self.store);
                if let Err(e) = blocking(move || store.recheck_blobs(&rewritten)).await {
                    tracing::warn!("could not queue blobs written again for a check: {e}");
                }
            }
            tier.wake.notify_one();
            return all_done(&written);
        }
        // Small blobs go up together, in packs; others one object each. A
        // blob alone (a streamed write) is an object too: a pack of one
        // would cost every other node a read of its index.
        let packed = |d: &Digest| tier.bucket.packing() && d.size < pack::PACKED_BELOW;
        let (mut small, mut others): (Vec<_>, Vec<_>) =
            written.into_iter().enumerate().partition(|(_, (d, _))| packed(d));
        if small.len() < 2 {
            others.append(&mut small);
        }
        let copies: Vec<_> = others.iter().map(|&(_, w)| w).collect();
        let copies = copies.into_iter().map(|(digest, written)| self.copy_out(&tier.bucket, digest, written));
        let (copied, packs) = tokio::join!(
            futures::stream::iter(copies).buffered(FETCHES_IN_FLIGHT).collect::<Vec<_>>(),
            self.pack_out(&tier.bucket, small.iter().map(|&(_, w)| w).collect()),
        );
        let mut results: Vec<Option<Result<Option<Digest>, Error>>> = Vec::new();
        results.resize_with(small.len() + others.len(), || None);
        for ((i, _), result) in others.iter().zip(copied).chain(small.iter().zip(packs)) {
            results[*i] = Some(result);
        }
        let results: Vec<Result<Option<Digest>, Error>> =
            results.into_iter().map(|r| r.expect("a result per blob")).collect();
        // Off the queue in one write.
        let copied: Vec<Digest> = results.iter().filter_map(|r| r.as_ref().ok().copied().flatten()).collect();
        if !copied.is_empty() {
            let store = Arc::clone(&self.store);
            if let Err(e) = blocking(move || store.dequeue_blobs(&copied)).await {
                // Still queued: the replicator copies them again, harmlessly.
                tracing::warn!("could not take copied blobs off the queue: {e}");
            }
        }
        results.into_iter().map(|r| r.map(|_| ())).collect()
    }

    /// [`Cache::replicate`] of one blob.
    pub(super) async fn replicate_one(&self, digest: Digest, written: Written) -> Result<(), Error> {
        self.replicate(vec![(digest, written)]).await.pop().unwrap_or(Ok(()))
    }

    /// Copies one blob to the object store: `Some` if it was copied. A blob
    /// the local tier held already is copied if it is queued, or if the
    /// object store lacks it (it may predate the tier).
    async fn copy_out(
        &self,
        bucket: &Bucket,
        digest: Digest,
        written: Written,
    ) -> Result<Option<Digest>, Error> {
        if digest.is_empty_blob() {
            return Ok(None);
        }
        if written == Written::AlreadyPresent {
            let store = Arc::clone(&self.store);
            let queued = blocking(move || store.is_queued(&digest)).await?;
            if !queued && bucket.contains_now(&[digest]).await?[0] {
                return Ok(None);
            }
        }
        if let Err(e) = upload_from(bucket, &self.store, digest).await {
            self.metrics.tier_error(false);
            return Err(e);
        }
        self.metrics.tier_written(digest.size);
        Ok(Some(digest))
    }

    /// Copies small blobs to the object store in packs of about
    /// [`pack::PACK_BYTES`], a few packs at a time; a result per blob, as
    /// [`Cache::copy_out`] gives. Blobs the local tier held already are
    /// copied if queued or if the object store lacks them.
    pub(super) async fn pack_out(
        &self,
        bucket: &Bucket,
        written: Vec<(Digest, Written)>,
    ) -> Vec<Result<Option<Digest>, Error>> {
        let mut results: Vec<Result<Option<Digest>, Error>> = written.iter().map(|_| Ok(None)).collect();
        let mut wanted: Vec<usize> = Vec::with_capacity(written.len());
        let mut held: Vec<usize> = Vec::new();
        for (i, (digest, w)) in written.iter().enumerate() {
            match w {
                _ if digest.is_empty_blob() => {}
                Written::Stored => wanted.push(i),
                Written::AlreadyPresent => held.push(i),
            }
        }
        if !held.is_empty() {
            let store = Arc::clone(&self.store);
            let asked: Vec<Digest> = held.iter().map(|&i| written[i].0).collect();
            let queued = blocking(move || {
                Ok::<_, Error>(
                    asked.iter().map(|d| store.is_queued(d).map_err(Error::from)).collect::<Vec<_>>(),
                )
            });
            let queued = match queued.await {
                Ok(queued) => queued,
                Err(e) => held.iter().map(|_| Err(Error::Worker(e.to_string()))).collect(),
            };
            let mut unqueued = Vec::new();
            for (&i, queued) in held.iter().zip(queued) {
                match queued {
                    Ok(true) => wanted.push(i),
                    Ok(false) => unqueued.push(i),
                    Err(e) => results[i] = Err(e),
                }
            }
            let asked: Vec<Digest> = unqueued.iter().map(|&i| written[i].0).collect();
            match bucket.contains_now(&asked).await {
                Ok(present) => {
                    wanted.extend(unqueued.iter().zip(present).filter(|(_, p)| !p).map(|(&i, _)| i))
                }
                Err(e) => {
                    self.metrics.tier_error(false);
                    for &i in &unqueued {
                        results[i] = Err(e.clone().into());
                    }
                }
            }
        }
        // Their chunks as stored, in one trip to the blocking pool.
        let store = Arc::clone(&self.store);
        let digests: Vec<Digest> = wanted.iter().map(|&i| written[i].0).collect();
        let chunks =
            blocking(move || Ok::<_, Error>(digests.iter().map(|d| stored_chunks(&store, d)).collect()));
        let chunks: Vec<Result<Option<Vec<Bytes>>, Error>> = match chunks.await {
            Ok(chunks) => chunks,
            Err(e) => wanted.iter().map(|_| Err(Error::Worker(e.to_string()))).collect(),
        };
        // Each pack: its blobs' places in `written`, and the blobs.
        let mut packs: Vec<(Vec<usize>, Vec<StoredBlob>)> = Vec::new();
        let (mut bytes, mut data) = (0, 0);
        for (i, chunks) in wanted.into_iter().zip(chunks) {
            let chunks = match chunks {
                Ok(Some(chunks)) => chunks,
                // A list goes up as a list object, after its chunks.
                Ok(None) => {
                    let digest = written[i].0;
                    results[i] = upload_from(bucket, &self.store, digest).await.map(|()| {
                        self.metrics.tier_written(digest.size);
                        Some(digest)
                    });
                    continue;
                }
                Err(e) => {
                    results[i] = Err(e);
                    continue;
                }
            };
            let len: usize = chunks.iter().map(|c| 4 + c.len()).sum();
            match packs.last_mut() {
                Some((members, blobs))
                    if bytes + len <= pack::PACK_BYTES
                        && data + written[i].0.size <= pack::PACK_DATA
                        && blobs.len() < pack::PACK_BLOBS =>
                {
                    members.push(i);
                    blobs.push((written[i].0, chunks));
                    (bytes, data) = (bytes + len, data + written[i].0.size);
                }
                _ => {
                    packs.push((vec![i], vec![(written[i].0, chunks)]));
                    (bytes, data) = (len, written[i].0.size);
                }
            }
        }
        let puts: Vec<_> = packs
            .into_iter()
            .map(|(members, blobs)| async move { (members, bucket.put_pack(&blobs).await) }.boxed())
            .collect();
        let mut puts = futures::stream::iter(puts).buffer_unordered(PACKS_IN_FLIGHT);
        while let Some((members, put)) = puts.next().await {
            match put {
                Ok(()) => {
                    for i in members {
                        self.metrics.tier_written(written[i].0.size);
                        results[i] = Ok(Some(written[i].0));
                    }
                }
                Err(e) => {
                    self.metrics.tier_error(false);
                    for i in members {
                        results[i] = Err(e.clone().into());
                    }
                }
            }
        }
        results
    }

    /// Copies an action result just stored locally to the object store, as
    /// [`Cache::replicate`] does a blob.
    pub(super) async fn replicate_action_result(
        &self,
        instance: String,
        action: Digest,
        result: Vec<u8>,
    ) -> Result<(), Error> {
        let Some(tier) = &self.tier else { return Ok(()) };
        if tier.writes == Writes::Back {
            tier.wake.notify_one();
            return Ok(());
        }
        if let Err(e) = tier.bucket.put_action_result(&instance, &action, &result).await {
            self.metrics.tier_error(false);
            return Err(e.into());
        }
        let store = Arc::clone(&self.store);
        blocking(move || store.dequeue_action_result(&instance, &action, Some(&result))).await
    }
}

/// Copies a blob from the local tier to the object store, chunk by chunk as
/// it is stored; a blob kept as a list goes as a list object, after the
/// chunks the object store lacks, each once. A blob the local tier no
/// longer holds is [`store::Error::Vanished`].
pub(super) async fn upload_from(bucket: &Bucket, local: &Arc<Store>, digest: Digest) -> Result<(), Error> {
    let list = {
        let local = Arc::clone(local);
        blocking(move || local.list_of(&digest)).await?
    };
    let Some((_, chunks)) = list.filter(|(_, chunks)| chunks.len() <= objstore::MAX_LIST_CHUNKS) else {
        return upload_whole(bucket, local, digest).await;
    };
    // Asked for real: a chunk another node deleted would leave a list naming it.
    let present = bucket.contains_now(&chunks).await?;
    let mut sent = HashSet::new();
    for (chunk, there) in chunks.iter().zip(present) {
        if !there && sent.insert(*chunk) {
            upload_whole(bucket, local, *chunk).await?;
        }
    }
    Ok(bucket.put_list(&digest, &chunks).await?)
}

/// The chunks of a blob the local tier keeps whole, as stored; `None` for
/// a blob it keeps as a list (a client's splice of small blobs).
fn stored_chunks(local: &Store, digest: &Digest) -> Result<Option<Vec<Bytes>>, Error> {
    if local.list_of(digest)?.is_some() {
        return Ok(None);
    }
    let Some(blob) = local.locate(digest)? else {
        return Err(store::Error::Vanished(format!("blob {digest} is not in the local tier")).into());
    };
    let (mut chunks, mut offset) = (Vec::new(), 0);
    while offset < digest.size {
        let (start, value, held) = local.encoded_chunk_at(&blob, offset)?;
        if start != offset {
            return Err(
                store::Error::Corrupt(format!("blob {digest} has no chunk starting at {offset}")).into()
            );
        }
        offset += held;
        chunks.push(Bytes::from(value));
    }
    Ok(Some(chunks))
}

/// Copies a blob the local tier keeps whole to the object store.
async fn upload_whole(bucket: &Bucket, local: &Arc<Store>, digest: Digest) -> Result<(), Error> {
    let blob = {
        let local = Arc::clone(local);
        blocking(move || local.locate(&digest)).await?
    };
    let Some(blob) = blob else {
        return Err(store::Error::Vanished(format!("blob {digest} is not in the local tier")).into());
    };
    let mut writer = bucket.blob_writer(&digest);
    let mut offset = 0;
    let copied: Result<(), Error> = async {
        while offset < digest.size {
            let (local, b) = (Arc::clone(local), blob);
            let (start, value, held) = blocking(move || local.encoded_chunk_at(&b, offset)).await?;
            if start != offset {
                return Err(store::Error::Corrupt(format!(
                    "blob {digest} has no chunk starting at {offset}"
                ))
                .into());
            }
            offset += held;
            writer.push(value).await?;
        }
        Ok(())
    }
    .await;
    match copied {
        Ok(()) => Ok(writer.finish().await?),
        Err(e) => {
            writer.abort().await;
            Err(e)
        }
    }
}

/// Copies a blob into the local tier, checking every chunk and the digest;
/// `false` if the object store lacks it (or holds it damaged). Each chunk is
/// also sent to `tee`, if given, once it is stored: a reader can stream the
/// blob while it arrives. (A blob another call is fetching already is waited
/// for, and sends nothing.)
///
/// A list object brings in the chunks the local tier lacks, then makes the
/// list of them locally (and sends nothing to `tee`: the reader reads the
/// local tier). `lists` is false for a list's chunks: lists never hold lists.
async fn fetch_into(
    bucket: &Bucket,
    local: &Arc<Store>,
    digest: Digest,
    tee: Option<mpsc::Sender<Piece>>,
    lists: bool,
) -> Result<bool, Error> {
    if let Some(found) = fetch_packed(bucket, local, digest).await? {
        return Ok(found);
    }
    let resource = format!("remote-fetch/{}/{}", digest.function.name(), digest.hex());
    // Another call may be fetching it right now: wait for that one, and if
    // it failed, fetch again, so that this call gets its own answer
    // (UNAVAILABLE, say) rather than a missing blob.
    let (reader, upload) = loop {
        let Some(reader) = bucket.blob_reader(&digest, MAX_STORED_CHUNK).await? else {
            return Ok(false);
        };
        let upload = {
            let (local, resource) = (Arc::clone(local), resource.clone());
            blocking(move || local.begin_copy(&resource, digest)).await
        };
        match upload {
            Ok(upload) => break (reader, upload),
            Err(Error::Store(store::Error::UploadBusy(_))) => {
                drop(reader);
                while local.upload_active(&resource) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let (local, d) = (Arc::clone(local), digest);
                if blocking(move || local.contains(&[d])).await?[0] {
                    return Ok(true);
                }
            }
            Err(e) => return Err(e),
        }
    };
    let finished = match copy(reader, upload, digest, tee).await {
        (Some(upload), Ok(Copied::Chunks)) => blocking(move || upload.finish()).await,
        (Some(upload), Ok(Copied::List(chunks))) => {
            blocking(move || upload.discard()).await?;
            if !lists {
                return Err(damaged(digest, "a chunk of a list is a list itself".into()));
            }
            return fetch_list(bucket, local, digest, chunks).await;
        }
        (Some(upload), Err(e)) => {
            let _ = blocking(move || upload.discard()).await;
            return Err(e);
        }
        (None, result) => return result.map(|_| false),
    };
    match finished {
        Ok(_) => Ok(true),
        Err(Error::Store(store::Error::DigestMismatch(m))) => Err(objstore::Error::Damaged(format!(
            "object for {}: its bytes hash to {}",
            m.expected, m.actual
        ))
        .into()),
        Err(e) => Err(e),
    }
}

/// Brings in the pack holding `digest`, if a known pack does: every blob of
/// it the local tier lacks, as stored (blobs written together are mostly
/// read together). `None` if no known pack holds it, or its pack is gone or
/// unreadable. A pack holding a damaged blob is deleted once its sound blobs
/// are written again in a pack of their own.
async fn fetch_packed(bucket: &Bucket, local: &Arc<Store>, digest: Digest) -> Result<Option<bool>, Error> {
    let Some(held) = bucket.pack_of(&digest).await else { return Ok(None) };
    // One read of a pack serves every call waiting for it.
    let _reading = held.read_turn().await;
    let present = {
        let local = Arc::clone(local);
        blocking(move || local.contains(&[digest])).await?[0]
    };
    if present {
        return Ok(Some(true));
    }
    // Held until its blobs are stored: what pack reads hold is bounded.
    let _turn = bucket.pack_turn().await;
    let blobs = match bucket.read_pack(&held, MAX_STORED_CHUNK).await {
        Ok(Some(blobs)) => blobs,
        Ok(None) => return Ok(None),
        // Damaged, or a later version's: not read here, and left alone.
        Err(objstore::Error::Damaged(what)) => {
            tracing::warn!("could not read the object store's {}: {what}", held.name);
            bucket.forget_unread_pack(&held);
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let (wanted, sound, damage) = {
        let local = Arc::clone(local);
        blocking(move || Ok::<_, Error>(store_pack(&local, blobs, digest))).await?
    };
    if let Some(what) = damage {
        let rewritten = match sound.is_empty() {
            true => Ok(()),
            false => bucket.put_pack(&sound).await,
        };
        match rewritten {
            Ok(()) => {
                tracing::warn!(
                    "deleted the object store's damaged {} ({what}); its sound blobs went up again",
                    held.name
                );
                let _ = bucket.forget_pack(&held).await;
            }
            Err(e) => tracing::warn!(
                "the object store's {} is damaged ({what}), and stays: its sound blobs could not go up again: {e}",
                held.name
            ),
        }
    }
    match wanted {
        Some(Ok(_)) => Ok(Some(true)),
        Some(Err(store::Error::DigestMismatch(_))) | None => Ok(None),
        Some(Err(e)) => Err(e.into()),
    }
}

/// Stores the blobs of a pack that the local tier lacks, each checked (its
/// chunks against their checksums, its bytes against its digest), not
/// queued for the object store: what writing `wanted` gave (`None` if the
/// pack does not hold it, or holds it damaged), the sound blobs, and the
/// damage found.
fn store_pack(
    local: &Store,
    blobs: Vec<StoredBlob>,
    wanted: Digest,
) -> (Option<Result<Written, store::Error>>, Vec<StoredBlob>, Option<String>) {
    let mut damage = None;
    let (mut new, mut sound) = (Vec::with_capacity(blobs.len()), Vec::with_capacity(blobs.len()));
    for (digest, chunks) in blobs {
        // Sizes come from the bucket: each chunk is bounded by what is left
        // of its blob (under 256 KiB: the pack's index said so) before it is
        // decoded.
        let mut data = bytes::BytesMut::with_capacity(digest.size.min(pack::PACKED_BELOW) as usize);
        let mut whole = true;
        for c in &chunks {
            let left = digest.size - data.len() as u64;
            match chunk::content_len(c).filter(|&n| n <= left).and_then(|_| chunk::decode(c)) {
                Some(d) if d.len() as u64 <= left => data.extend_from_slice(&d),
                _ => {
                    whole = false;
                    break;
                }
            }
        }
        if whole && data.len() as u64 == digest.size {
            let stored = (chunks.len() == 1).then(|| chunks[0].clone());
            new.push(store::NewBlob { digest, data: data.freeze(), frames: Vec::new(), stored });
            sound.push((digest, chunks));
        } else {
            damage = Some(format!("its record of {digest} fails its check"));
        }
    }
    let mut wanted_result = None;
    let mut kept = Vec::with_capacity(sound.len());
    for ((blob, result), sound) in new.iter().zip(local.put_copies(&new)).zip(sound) {
        match &result {
            Err(store::Error::DigestMismatch(m)) => {
                damage = Some(format!("its record of {} hashes to {}", m.expected, m.actual));
            }
            _ => kept.push(sound),
        }
        if blob.digest == wanted {
            wanted_result = Some(result);
        }
    }
    (wanted_result, kept, damage)
}

/// Brings in the chunks of a list object the local tier lacks (a few at a
/// time), then makes the list of them locally, verified against `digest`.
async fn fetch_list(
    bucket: &Bucket,
    local: &Arc<Store>,
    digest: Digest,
    chunks: Vec<Digest>,
) -> Result<bool, Error> {
    // A use of the list is a use of every chunk, those held here too.
    bucket.touch_blobs(&chunks);
    let mut seen = HashSet::new();
    let wanted: Vec<Digest> = chunks.iter().copied().filter(|c| seen.insert(*c)).collect();
    let present = {
        let (local, asked) = (Arc::clone(local), wanted.clone());
        blocking(move || local.contains(&asked)).await?
    };
    let fetches = wanted.into_iter().zip(present).filter(|(_, p)| !p).map(|(chunk, _)| async move {
        match Box::pin(fetch_into(bucket, local, chunk, None, false)).await? {
            true => Ok(()),
            false => Err(damaged(digest, format!("its chunk {chunk} is missing"))),
        }
    });
    futures::stream::iter(fetches).buffer_unordered(4).try_collect::<Vec<()>>().await?;
    let spliced = {
        let local = Arc::clone(local);
        blocking(move || local.splice(&digest, &chunks, store::Form::List, store::Chunks::Named)).await
    };
    match spliced {
        Ok(store::Spliced::Done(_)) => Ok(true),
        // Evicted since it came in: missing here, and there to fetch again.
        Ok(store::Spliced::Absent(chunk)) => {
            Err(store::Error::Vanished(format!("chunk {chunk} of blob {digest} went while it was fetched"))
                .into())
        }
        Ok(store::Spliced::Nested(_) | store::Spliced::Small) => {
            Err(damaged(digest, "it is a list no larder writes".into()))
        }
        Err(Error::Store(store::Error::DigestMismatch(m))) => {
            Err(damaged(digest, format!("its chunks hash to {}", m.actual)))
        }
        Err(e) => Err(e),
    }
}

/// What a blob object held.
enum Copied {
    /// Its chunks, now in the upload.
    Chunks,
    /// The list of blobs it is made of (the upload has nothing).
    List(Vec<Digest>),
}

/// Copies a blob object's chunks into a local upload, checking each (on the
/// blocking pool: decompression and disk), and sends each to `tee`; or
/// reads a list object's list. Gives the upload back.
async fn copy(
    mut reader: BlobReader,
    mut upload: store::Upload,
    digest: Digest,
    mut tee: Option<mpsc::Sender<Piece>>,
) -> (Option<store::Upload>, Result<Copied, Error>) {
    let size = match reader.header().await {
        Ok(Header::Chunks(size)) if size == digest.size => size,
        Ok(Header::List(size)) if size == digest.size => {
            return (Some(upload), reader.list(size).await.map(Copied::List).map_err(Error::from));
        }
        Ok(Header::Chunks(size) | Header::List(size)) => {
            return (Some(upload), Err(damaged(digest, format!("it declares {size} bytes"))));
        }
        Err(e) => return (Some(upload), Err(e.into())),
    };
    let mut held = 0;
    while held < size {
        let value = match reader.chunk().await {
            Ok(v) => v,
            Err(e) => return (Some(upload), Err(e.into())),
        };
        let stored = value.clone();
        let remaining = size - held;
        let worked = tokio::task::spawn_blocking(move || {
            let appended = match chunk::decode(&stored) {
                Some(data) if data.len() as u64 <= remaining => {
                    upload.append_encoded(&data, stored.to_vec()).map(|()| data).map_err(Error::from)
                }
                Some(_) => Err(damaged(digest, format!("its chunks hold more than {size} bytes"))),
                None => Err(damaged(digest, "a chunk fails its check".into())),
            };
            (upload, appended)
        })
        .await;
        let appended;
        (upload, appended) = match worked {
            Ok(pair) => pair,
            // The upload went with the failed task; its record expires.
            Err(e) => return (None, Err(Error::Worker(e.to_string()))),
        };
        match appended {
            Ok(data) => {
                let start = held;
                held += data.len() as u64;
                // A reader that went away, or that is slower than the object
                // store, does not hold up the copy: it is sent no more.
                if let Some(sender) = &tee {
                    let sent =
                        tokio::time::timeout(TEE_WAIT, sender.send(Piece { start, data, value })).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        tee = None;
                    }
                }
            }
            Err(e) => return (Some(upload), Err(e)),
        }
    }
    (Some(upload), Ok(Copied::Chunks))
}

fn damaged(digest: Digest, what: String) -> Error {
    objstore::Error::Damaged(format!("object for {digest}: {what}")).into()
}
