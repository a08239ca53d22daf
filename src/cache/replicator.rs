//! The replicator: copies what the store's queue holds to the object store
//! tier, in the background. With write-back that is every write; with
//! write-through, only what a call could not copy itself (the object store
//! was down, or larder stopped mid-call). While the object store is away it
//! backs off, and it catches up by itself when it returns.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{Cache, Error, Tier, Writes, blocking, tier};
use crate::digest::Digest;
use crate::objstore::{self, pack};
use crate::store::{self, QueueEntry, Queued, Written, now_ms};

/// Queue entries read per pass.
const PASS: usize = 256;
/// Copies in flight: small blobs cost the object store's latency each.
const IN_FLIGHT: usize = 32;
/// With write-through, the call that queued an entry copies it itself:
/// entries younger than this are left to it.
const SETTLE: Duration = Duration::from_secs(10);
/// How long an idle replicator sleeps unless woken.
const IDLE: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs until aborted. The tier's `wake` is notified after each write-back.
pub(super) async fn run(cache: Arc<Cache>, tier: Arc<Tier>) {
    let (store, metrics) = (&cache.store, &cache.metrics);
    let settle = match tier.writes {
        Writes::Back => 0,
        Writes::Through => SETTLE.as_millis() as u64,
    };
    let mut after = Vec::new();
    let mut backoff = MIN_BACKOFF;
    loop {
        // An empty queue is not scanned: every entry copied leaves a delete
        // tombstone behind, which a scan from the start must step over.
        let (listing, from, empty) = (Arc::clone(store), after.clone(), store.queue_len().0 == 0);
        let listed = if empty { Ok(Vec::new()) } else { blocking(move || listing.queued(&from, PASS)).await };
        let entries = match listed {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!("cannot read the queue for the object store: {e}");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
        };
        // A full pass resumes after its last entry; a short one wraps around.
        after = match entries.len() {
            PASS => entries.last().map(|e| e.key.clone()).unwrap_or_default(),
            _ => Vec::new(),
        };
        let now = now_ms();
        let due: Vec<QueueEntry> =
            entries.into_iter().filter(|e| now.saturating_sub(e.since_ms) >= settle).collect();
        if due.is_empty() {
            if after.is_empty() {
                // Idle: queue the next blobs from before the tier, if any,
                // into at most half of the queue (the rest is for writes).
                let (filler, room) = (Arc::clone(store), store.room_for_checks());
                if room > 0 {
                    match blocking(move || filler.backfill(room)).await {
                        Ok(Some(n)) if n > 0 => continue,
                        Ok(_) => {}
                        Err(e) => tracing::warn!("cannot queue blobs from before the object store tier: {e}"),
                    }
                }
                tokio::select! {
                    () = tier.wake.notified() => {}
                    () = tokio::time::sleep(IDLE) => {}
                }
            }
            continue;
        }
        // Small blobs go up together in packs (those from before the tier
        // are looked up first, one by one); the rest one object each.
        let packed = |e: &QueueEntry| match e.item {
            Queued::Blob(d) => tier.bucket.packing() && !e.check && d.size < pack::PACKED_BELOW,
            Queued::ActionResult { .. } => false,
        };
        let (small, others): (Vec<QueueEntry>, Vec<QueueEntry>) = due.into_iter().partition(packed);
        let (small, others) = match small.len() {
            0 | 1 => (Vec::new(), others.into_iter().chain(small).collect()),
            _ => (small, others),
        };
        let copies: Vec<_> = others.into_iter().map(|entry| copy(&cache, &tier.bucket, entry)).collect();
        let small: Vec<(Digest, Written)> = small
            .into_iter()
            .filter_map(|e| match e.item {
                Queued::Blob(d) => Some((d, Written::Stored)),
                Queued::ActionResult { .. } => None,
            })
            .collect();
        let (mut outcomes, packed): (Vec<Result<Outcome, Error>>, _) = tokio::join!(
            futures::stream::iter(copies).buffer_unordered(IN_FLIGHT).collect(),
            cache.pack_out(&tier.bucket, small.clone()),
        );
        outcomes.extend(small.into_iter().zip(packed).map(|((digest, _), result)| match result {
            Ok(_) => Ok(Outcome::Copied(digest)),
            Err(Error::Store(store::Error::Vanished(_) | store::Error::Removed(_))) => {
                Ok(Outcome::Vanished(digest))
            }
            Err(e) => Err(e),
        }));
        // Blobs leave the queue in one write each way.
        let (mut copied, mut vanished) = (Vec::new(), Vec::new());
        for outcome in &outcomes {
            match outcome {
                Ok(Outcome::Copied(d)) => copied.push(*d),
                Ok(Outcome::Vanished(d)) => vanished.push(*d),
                _ => {}
            }
        }
        let dequeue = Arc::clone(store);
        let dequeued = blocking(move || {
            dequeue.dequeue_blobs(&copied)?;
            dequeue.dequeue_vanished(&vanished)
        })
        .await;
        let failure = outcomes.into_iter().find_map(Result::err).or(dequeued.err());
        match failure {
            None => backoff = MIN_BACKOFF,
            // The local tier failed: the object store is fine, no backoff
            // (the entry is tried again next pass).
            Some(e @ (Error::Store(_) | Error::Worker(_))) => {
                tracing::warn!("copying queued writes to the object store: {e}");
                tokio::time::sleep(MIN_BACKOFF).await;
            }
            Some(e) => {
                metrics.tier_error(false);
                tracing::warn!("copying queued writes to the object store: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                // Start over: what failed is retried first.
                after.clear();
            }
        }
    }
}

/// What became of a queue entry.
enum Outcome {
    /// The object store holds the blob: it leaves the queue.
    Copied(Digest),
    /// The blob has no local copy left to send: it leaves the queue, unless
    /// it was stored (and queued) again meanwhile.
    Vanished(Digest),
    /// An action result, taken off the queue already.
    Done,
}

/// Copies one queued blob or action result.
async fn copy(cache: &Cache, bucket: &objstore::Bucket, entry: QueueEntry) -> Result<Outcome, Error> {
    let store = &cache.store;
    match entry.item {
        Queued::Blob(digest) => {
            // From before the tier: maybe there already (another node's).
            if entry.check && bucket.contains_now(&[digest]).await?[0] {
                return Ok(Outcome::Copied(digest));
            }
            match tier::upload_from(bucket, store, digest).await {
                Ok(()) => {
                    cache.metrics.tier_written(digest.size);
                    Ok(Outcome::Copied(digest))
                }
                // Found corrupt and removed, say.
                Err(Error::Store(store::Error::Vanished(_) | store::Error::Removed(_))) => {
                    Ok(Outcome::Vanished(digest))
                }
                Err(e) => Err(e),
            }
        }
        Queued::ActionResult { instance, action } => {
            // Whether it is from before the tier is read with the result: a
            // client's newer one may have replaced both since the listing.
            let (result, check) = {
                let (store, instance) = (Arc::clone(store), instance.clone());
                blocking(move || store.action_result_to_copy(&instance, &action)).await?
            };
            // From before the tier: another node's newer result may be
            // there already, and stays.
            let there = check
                && result.is_some()
                && match bucket.get_action_result(&instance, &action).await {
                    Ok(found) => found.is_some(),
                    // A damaged one is replaced.
                    Err(objstore::Error::Damaged(_)) => false,
                    Err(e) => return Err(e.into()),
                };
            if let Some(result) = result.as_ref().filter(|_| !there) {
                bucket.put_action_result(&instance, &action, result).await?;
            }
            let store = Arc::clone(store);
            blocking(move || store.dequeue_action_result(&instance, &action, result.as_deref())).await?;
            Ok(Outcome::Done)
        }
    }
}
