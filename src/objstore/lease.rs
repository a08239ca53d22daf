//! The trimmer's lease: nodes sharing a bucket take turns at trimming it,
//! agreeing through the bucket itself.
//!
//! The lease is a series of generation objects, `larder/v1/trim/lease/{n}`
//! (n zero-padded, so that listings sort them). A generation is created
//! with a conditional PUT (`If-None-Match: *`), which one node alone can
//! win: Ceph's RGW 16.2 and AWS S3 honour it, and [`probe`] checks that the
//! bucket does before a node relies on it. The holder writes the next
//! generation every third of the lease, and trims only while its newest
//! generation is younger than half the lease. Another node takes over once
//! it has seen the same newest generation for a whole lease, by its own
//! clock: no clocks are compared across nodes, and a holder that stalls
//! stops before another starts.
//!
//! Each generation carries the state of the pass in progress, so that a
//! node that takes over resumes it.

use std::time::{Duration, Instant};

use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use futures::{StreamExt, TryStreamExt};

use super::{Bucket, Error, Requests};

/// Largest generation object read back (the bucket holds anyone's bytes).
const MAX_STATE: u64 = 4096;
/// Generations listed at most (there are one or two, unless deletes failed).
const MAX_GENERATIONS: usize = 1000;

/// This node's view of the lease.
pub struct Lease {
    /// Who this node is, in the generations it writes.
    me: String,
    duration: Duration,
    /// The generation this node wrote last, and when.
    held: Option<(u64, Instant)>,
    /// The newest generation of another node, and when this node first saw it.
    seen: Option<(u64, Instant)>,
    /// Generations older than the one held, to delete before the next is
    /// written: a slow delete then delays a renewal, not the trimming.
    stale: Vec<u64>,
}

/// Whose turn it is to trim.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// This node's, as it was.
    Mine,
    /// This node's from now: it took the lease over. The state the previous
    /// holder left, if any.
    Taken(Option<String>),
    /// Another node's.
    Theirs,
}

impl Lease {
    pub fn new(duration: Duration) -> Lease {
        let me = random_name();
        Lease { me, duration, held: None, seen: None, stale: Vec::new() }
    }

    /// How often [`Lease::hold`] should be called, holding it or not.
    pub fn period(&self) -> Duration {
        self.duration / 3
    }

    /// Whether this node may trim now: it holds the lease, renewed lately
    /// enough that no other node can have taken it over.
    pub fn valid(&self) -> bool {
        self.held.is_some_and(|(_, since)| since.elapsed() < self.duration / 2)
    }

    /// Takes the lease if it is free, renews it if it is due, and says
    /// whose turn it is. `state` goes into a generation this node writes.
    pub async fn hold(&mut self, bucket: &Bucket, state: &str) -> Result<Turn, Error> {
        self.turn(bucket, state, false).await
    }

    /// Writes a generation now if this node holds the lease, carrying
    /// `state` (a pass this node starts), rather than when the next renewal
    /// is due; else as [`Lease::hold`].
    pub async fn record(&mut self, bucket: &Bucket, state: &str) -> Result<Turn, Error> {
        self.turn(bucket, state, true).await
    }

    async fn turn(&mut self, bucket: &Bucket, state: &str, now: bool) -> Result<Turn, Error> {
        if let Some((n, since)) = self.held {
            if !now && since.elapsed() < self.period() {
                return Ok(Turn::Mine);
            }
            return match self.renew(bucket, n, state).await {
                Ok(true) => Ok(Turn::Mine),
                Ok(false) => {
                    tracing::warn!("another node took the trimmer's lease over: this one stops trimming");
                    self.held = None;
                    Ok(Turn::Theirs)
                }
                Err(e) => {
                    if !self.valid() {
                        self.held = None;
                    }
                    Err(e)
                }
            };
        }
        let generations = self.generations(bucket).await?;
        let newest = generations.iter().max().copied();
        let next = match (newest, self.seen) {
            (None, _) => 1,
            (Some(n), Some((m, since))) if n == m && since.elapsed() >= self.duration => following(n)?,
            (Some(n), Some((m, _))) if n == m => return Ok(Turn::Theirs),
            (Some(n), _) => {
                self.seen = Some((n, Instant::now()));
                return Ok(Turn::Theirs);
            }
        };
        // Valid from before the create is sent: the other nodes' wait for
        // a whole lease starts after it lands.
        let sent = Instant::now();
        if !self.create(bucket, next, state).await? {
            self.seen = None;
            return Ok(Turn::Theirs);
        }
        self.held = Some((next, sent));
        self.seen = None;
        let left = match newest {
            Some(n) => self.state_of(bucket, n).await,
            None => None,
        };
        if next > 1 {
            tracing::info!("this node took the trimmer's lease over (generation {next})");
        }
        self.stale = generations;
        Ok(Turn::Taken(left))
    }

    /// Writes the generation after `n`, which this node wrote; `false` if
    /// another node has taken the lease over.
    async fn renew(&mut self, bucket: &Bucket, n: u64, state: &str) -> Result<bool, Error> {
        for old in std::mem::take(&mut self.stale) {
            self.delete(bucket, old).await;
        }
        // A node that took the lease over while this one stalled deletes
        // the generations before its own: `n + 1` may be free again, and
        // is this node's only while `n` is still the newest.
        if self.generations(bucket).await?.iter().max() != Some(&n) {
            return Ok(false);
        }
        let (next, sent) = (following(n)?, Instant::now());
        if !self.create(bucket, next, state).await? {
            return Ok(false);
        }
        self.held = Some((next, sent));
        self.stale.push(n);
        Ok(true)
    }

    fn path(bucket: &Bucket, n: u64) -> Path {
        bucket.path(format!("trim/lease/{n:020}"))
    }

    /// Creates generation `n`; `false` if it exists (another node's).
    async fn create(&self, bucket: &Bucket, n: u64, state: &str) -> Result<bool, Error> {
        let body = format!("node {}\n{state}", self.me);
        let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        Requests::count(&bucket.requests.put);
        match bucket.store.put_opts(&Lease::path(bucket, n), PutPayload::from(body), options).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The generations in the bucket: the newest, the one before it, and
    /// any that a failed delete left behind (a few bytes each).
    async fn generations(&self, bucket: &Bucket) -> Result<Vec<u64>, Error> {
        Requests::count(&bucket.requests.list);
        let listed: Vec<_> = bucket
            .store
            .list(Some(&bucket.path("trim/lease".into())))
            .take(MAX_GENERATIONS + 1)
            .try_collect()
            .await?;
        if listed.len() > MAX_GENERATIONS {
            return Err(Error::Damaged(format!(
                "trimmer's lease: over {MAX_GENERATIONS} objects under larder/v1/trim/lease/ (delete them all)"
            )));
        }
        Ok(listed.iter().filter_map(|meta| meta.location.filename()?.parse::<u64>().ok()).collect())
    }

    /// The pass state generation `n` carries (after its `node` line).
    async fn state_of(&self, bucket: &Bucket, n: u64) -> Option<String> {
        Requests::count(&bucket.requests.get);
        let got = bucket.store.get(&Lease::path(bucket, n)).await.ok()?;
        if got.meta.size > MAX_STATE {
            return None;
        }
        let bytes = got.bytes().await.ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        text.split_once('\n').map(|(_, state)| state.to_string())
    }

    /// Deletes generation `n`, which a newer one replaced.
    async fn delete(&self, bucket: &Bucket, n: u64) {
        Requests::count(&bucket.requests.delete);
        let _ = bucket.store.delete(&Lease::path(bucket, n)).await;
    }
}

/// The generation after `n` (a bucket may hold anyone's numbers).
fn following(n: u64) -> Result<u64, Error> {
    n.checked_add(1).ok_or_else(|| Error::Damaged("trimmer's lease: a generation numbered u64::MAX".into()))
}

/// A name no other node picks: 64 random bits (std's hasher keys are
/// random per process).
fn random_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    format!("{:016x}", hasher.finish())
}

/// Whether the bucket honours conditional PUTs: a second create of one
/// object must fail. Without that, two nodes could both hold the lease.
pub async fn probe(bucket: &Bucket) -> Result<bool, Error> {
    let path = bucket.path(format!("trim/probe-{}", random_name()));
    let create = || PutOptions { mode: PutMode::Create, ..PutOptions::default() };
    Requests::count(&bucket.requests.put);
    bucket.store.put_opts(&path, PutPayload::from_static(b"probe"), create()).await?;
    Requests::count(&bucket.requests.put);
    let second = bucket.store.put_opts(&path, PutPayload::from_static(b"probe"), create()).await;
    Requests::count(&bucket.requests.delete);
    let _ = bucket.store.delete(&path).await;
    match second {
        Ok(_) => Ok(false),
        Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(true),
        Err(object_store::Error::NotImplemented { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
