//! The cache: the one async API the faces call (gRPC services and HTTP
//! routes). It owns the policy of the two tiers, so that "what happens on a
//! miss?" has one answer, here: the local store always; behind it, when one
//! is configured, the object store, read through on a local miss and written
//! through (or back, by the replicator) on every write.
//!
//! - [`read`]: streams and batches of blobs, read through on a local miss.
//! - [`write`]: uploads and batches, each copied to the object store.
//! - [`actions`]: action results, complete or a miss.
//! - [`assets`]: the Remote Asset API's records, and downloads.
//! - [`directories`]: Directory blobs for GetTree, a level at a time.
//! - [`tier`]: copies between the tiers, one blob at a time.
//! - [`replicator`]: copies what the local tier queued, in the background.
//!
//! Store work runs on the blocking pool through [`blocking`], and every
//! error is a [`Error`], which knows its gRPC code.

mod actions;
mod assets;
mod directories;
mod error;
mod read;
mod replicator;
mod split;
mod tier;
mod write;

use std::future::Future;
use std::sync::Arc;

pub use actions::{Inline, Lookup};
pub use assets::{Downloads, Fetched, Kind as AssetKind, Pushed, Source, Wanted};
pub use directories::DirectoryLimit;
pub use error::Error;
pub use read::{MAX_PIECE, Pieces};
pub use write::{Incoming, Progress, Upload, UploadState, max_wire_bytes};

use crate::budget::Budget;
use crate::digest::{Digest, Function};
use crate::metrics::Metrics;
use crate::objstore::{self, Bucket};
use crate::store::{self, Store};

/// How writes reach the object store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writes {
    /// A write is acknowledged once both tiers hold it.
    Through,
    /// A write is acknowledged once the local tier holds it; the replicator
    /// copies it.
    Back,
}

/// The object store tier: the bucket, and how writes reach it.
pub struct Tier {
    bucket: Arc<Bucket>,
    writes: Writes,
    /// Wakes the replicator after a write-back.
    wake: tokio::sync::Notify,
    /// FindMissingBlobs waits this long for the object store's answers;
    /// blobs not answered by then count as missing.
    lookup_timeout: std::time::Duration,
    /// The bucket's size budget, if it has one.
    trim: Option<objstore::trim::Trim>,
}

impl Tier {
    pub fn connect(
        settings: &objstore::Settings,
        writes: Writes,
        lookup_timeout: std::time::Duration,
    ) -> Result<Tier, Error> {
        let bucket = Arc::new(Bucket::connect(settings)?);
        let trim = settings.trim.clone();
        Ok(Tier { bucket, writes, wake: tokio::sync::Notify::new(), lookup_timeout, trim })
    }

    /// What it is, for messages and the status page: endpoint and bucket.
    pub fn name(&self) -> &str {
        &self.bucket.name
    }
}

/// A name for an upload no client names or resumes (an HTTP PUT, a
/// splice): `{kind}/{ms}-{n}`, unique in this process.
pub fn own_upload(kind: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{kind}/{}-{n}", store::now_ms())
}

/// The limits the cache applies to what it reads for a call.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// What Directory and Tree blobs a call may read.
    pub directories: DirectoryLimit,
    /// Largest gRPC message sent: what an action result may inline.
    pub max_message_size: usize,
    /// Largest blob an upload may store; 0: no limit.
    pub max_blob_size: u64,
}

pub struct Cache {
    store: Arc<Store>,
    tier: Option<Arc<Tier>>,
    metrics: Arc<Metrics>,
    /// The bytes calls in flight may hold, all together.
    budget: Arc<Budget>,
    limits: Limits,
    /// FetchBlob's downloads, when `download_allow` lists any host.
    downloads: Option<Downloads>,
}

impl Cache {
    pub fn new(
        store: Arc<Store>,
        tier: Option<Arc<Tier>>,
        metrics: Arc<Metrics>,
        budget: Arc<Budget>,
        limits: Limits,
        downloads: Option<Downloads>,
    ) -> Arc<Cache> {
        Arc::new(Cache { store, tier, metrics, budget, limits, downloads })
    }

    /// Uncompressed bytes per stored chunk: what a read or an upload holds
    /// at a time.
    pub fn chunk_size(&self) -> usize {
        self.store.options().chunk_size
    }

    /// Holds `bytes` in the budget of calls in flight for a reply being
    /// built (a GetTree page, say), waiting a little for room.
    pub async fn hold(&self, bytes: u64) -> Result<crate::budget::Held, Error> {
        Ok(self.budget.hold(bytes).await?)
    }

    /// Refuses a blob larger than `max_blob_size`, before any of it is stored.
    fn check_blob_size(&self, digest: &Digest) -> Result<(), Error> {
        let limit = self.limits.max_blob_size;
        if limit > 0 && digest.size > limit {
            return Err(Error::Invalid(format!(
                "blob {digest} is {} bytes, over this server's max_blob_size ({limit} bytes, advertised as max_cas_blob_size_bytes)",
                digest.size
            )));
        }
        Ok(())
    }

    /// The largest blob an upload may store (0: no limit), for Capabilities.
    pub fn max_blob_size(&self) -> u64 {
        self.limits.max_blob_size
    }

    /// The requests sent to the object store so far, if there is one.
    pub fn tier_requests(&self) -> Option<&objstore::Requests> {
        self.tier.as_ref().map(|t| &*t.bucket.requests)
    }

    /// The store in figures, for the status page and metrics.
    pub async fn stats(&self) -> Result<store::Stats, Error> {
        let store = Arc::clone(&self.store);
        blocking(move || store.stats()).await
    }

    /// Which of `digests` the local tier holds; held ones count as used.
    async fn local(&self, digests: Vec<Digest>) -> Result<(Vec<Digest>, Vec<bool>), Error> {
        let store = Arc::clone(&self.store);
        blocking(move || {
            let present = store.contains(&digests)?;
            Ok::<_, store::Error>((digests, present))
        })
        .await
    }

    /// Which of `digests` neither tier holds: the local index first, then
    /// the object store for the local misses only. With the object store
    /// down, its blobs count as missing (clients upload them again).
    pub async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, Error> {
        let (digests, mut present) = self.local(digests).await?;
        if let Some(tier) = &self.tier {
            let misses: Vec<usize> = (0..digests.len()).filter(|&i| !present[i]).collect();
            let asked: Vec<Digest> = misses.iter().map(|&i| digests[i]).collect();
            let deadline = std::time::Instant::now() + tier.lookup_timeout;
            match tier.bucket.contains(&asked, Some(deadline)).await {
                Ok(found) => misses.iter().zip(found).for_each(|(&i, f)| present[i] = f),
                Err(e) => tracing::warn!("FindMissingBlobs answered from the local tier alone: {e}"),
            }
            // A client told a blob is present relies on it: a use.
            if self.records_uses() {
                let found: Vec<Digest> =
                    digests.iter().zip(&present).filter(|(_, p)| **p).map(|(d, _)| *d).collect();
                self.touch(&found).await;
            }
        }
        Ok(digests.into_iter().zip(present).filter(|(_, p)| !p).map(|(d, _)| d).collect())
    }

    /// Whether uses are recorded in the object store (it has a size budget):
    /// without, the hot paths skip gathering what was used.
    fn records_uses(&self) -> bool {
        self.tier.as_ref().is_some_and(|t| t.trim.is_some())
    }

    /// Records in the object store that `digests` were used, for its
    /// trimmer (see [`Bucket::touch_blobs`]), with the chunks of those the
    /// local tier keeps as lists: a list's chunk objects must last as long
    /// as the list's object, though readers of this node never ask the
    /// bucket for them.
    async fn touch(&self, digests: &[Digest]) {
        let Some(tier) = self.tier.as_ref().filter(|t| t.trim.is_some()) else { return };
        // Lists smaller than this come only from clients' splices: their
        // chunks are recorded when read, and no lookup delays small calls.
        const LISTS_FROM: u64 = 64 << 10;
        let fresh: Vec<Digest> = digests
            .iter()
            .zip(tier.bucket.touch_blobs(digests))
            .filter(|(d, f)| *f && d.size >= LISTS_FROM)
            .map(|(d, _)| *d)
            .collect();
        if fresh.is_empty() {
            return;
        }
        let store = Arc::clone(&self.store);
        let chunks = blocking(move || {
            let mut chunks = Vec::new();
            for d in &fresh {
                chunks.extend(store.list_of(d)?.map(|(_, c)| c).unwrap_or_default());
            }
            Ok::<_, store::Error>(chunks)
        })
        .await;
        if let Ok(chunks) = chunks {
            tier.bucket.touch_blobs(&chunks);
        }
    }

    /// The stored blob of `function` whose hash is `hash`, whatever its size
    /// (Bazel's HTTP cache names blobs by hash alone): the local tier's, else
    /// the object store's (found by its object's header).
    pub async fn find_by_hash(&self, function: Function, hash: Vec<u8>) -> Result<Option<Digest>, Error> {
        let store = Arc::clone(&self.store);
        let looked_up = hash.clone();
        let found = blocking(move || store.find_by_hash(function, &looked_up)).await?;
        match (found, &self.tier) {
            (None, Some(tier)) => Ok(tier.bucket.find_by_hash(function, &hash).await.unwrap_or_else(|e| {
                tracing::warn!("HTTP cache lookup answered from the local tier alone: {e}");
                None
            })),
            (found, _) => Ok(found),
        }
    }

    /// The object store tier's background work, for the server's
    /// supervisor to run: a first check that the object store answers, then
    /// the replicator, the writer of last-use markers and the trimmer (those
    /// two with a size budget); `None` without an object store.
    pub fn tier_work(self: &Arc<Self>) -> Option<impl Future<Output = ()> + Send + 'static> {
        let tier = Arc::clone(self.tier.as_ref()?);
        let cache = Arc::clone(self);
        let toucher = tier.bucket.toucher();
        let indexer = tier.bucket.indexer();
        let trimmer = tier.trim.clone().map(|trim| objstore::trim::run(Arc::clone(&tier.bucket), trim));
        Some(async move {
            // Say at once whether the object store answers; serving goes on either way.
            let waits = match tier.writes {
                Writes::Back => "writes queue",
                Writes::Through => "writes fail",
            };
            match tier.bucket.check().await {
                Ok(()) => tracing::info!("object store tier: {} answers", tier.name()),
                Err(e @ objstore::Error::Config(_)) => {
                    tracing::error!("object store tier {}: {e}; writes fail until that is fixed", tier.name())
                }
                Err(e) => tracing::warn!("object store tier {}: {e}; {waits} until it answers", tier.name()),
            }
            let toucher = async move {
                if let Some(toucher) = toucher {
                    toucher.await
                }
            };
            let trimmer = async move {
                if let Some(trimmer) = trimmer {
                    trimmer.await
                }
            };
            let indexer = async move {
                if let Some(indexer) = indexer {
                    indexer.await
                }
            };
            tokio::join!(replicator::run(cache, tier), toucher, trimmer, indexer);
        })
    }
}

/// Runs store work on the blocking pool, keeping the async runtime free:
/// the one place where the sync store meets async callers.
pub async fn blocking<T, E, F>(f: F) -> Result<T, Error>
where
    T: Send + 'static,
    E: Into<Error> + Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Worker(e.to_string()))?.map_err(Into::into)
}
