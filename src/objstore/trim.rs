//! The trimmer: keeps the bucket within `s3_max_size`, deleting the least
//! recently used objects first.
//!
//! A pass lists the bucket twice, paged, merging each object with its
//! last-use marker (both listings are sorted by key: S3 lists in key
//! order), so that memory stays a page and a histogram whatever the
//! bucket holds. The first listing measures: bytes in the bucket, and
//! bytes by age of last use (ages in steps of 2 %). Over 90 % of the budget
//! (writes go on between passes), it picks the age above which deleting
//! leaves at most 80 % of the budget,
//! never younger than `s3_trim_min_age`; the second listing deletes what
//! was last used before then (action results come first: `ac/` sorts
//! before `cas/`), a thousand objects per request.
//!
//! Ages are measured against the object store's clock (a probe object's
//! modification time), so a node's clock being off costs nothing.
//!
//! Nothing a pass leaves half done is inconsistent: an action result whose
//! blobs are gone is a miss on every node (each hit checks that its blobs
//! are present, and brings them in), and a list object whose chunk is gone
//! is deleted when read. A pass resumes from where the lease's last
//! generation says it was (see [`super::lease`]), else starts again.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};
use serde::Deserialize;

use super::lease::{self, Lease, Turn};
use super::{Bucket, Error, Requests};

/// Objects deleted per request (S3's limit for one multi-object delete).
const DELETE_BATCH: usize = 1000;
/// How long an object listed for deletion may wait for its batch: a use
/// after it was listed is not seen, so the wait stays short.
const DELETE_WAIT: Duration = Duration::from_secs(2);
/// Keys S3 lists per request.
const PAGE: u64 = 1000;
/// A pass trims when the bucket holds more than this fraction of the
/// budget (so that writes between passes stay within it)...
const HIGH_WATERMARK: f64 = 0.9;
/// ...down to this fraction.
const LOW_WATERMARK: f64 = 0.8;
/// Steps of the age histogram: each 2 % older than the last, up to
/// centuries.
const AGE_STEP: f64 = 1.02;
const AGE_BUCKETS: usize = 1200;
/// Longest resume key accepted from a lease generation.
const MAX_KEY: usize = 1024;

/// How nodes share the trimming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Turns {
    /// Nodes take turns through a lease object in the bucket.
    Lease,
    /// This node trims, without a lease: the others must say `never`.
    Always,
    /// This node never trims (it still records uses).
    Never,
}

/// The bucket's size budget, and how this node keeps it.
#[derive(Clone, Debug)]
pub struct Trim {
    /// Bytes the bucket may hold.
    pub max_size: u64,
    /// Objects used more recently are never deleted.
    pub min_age: Duration,
    /// How often the bucket is measured.
    pub interval: Duration,
    /// How often each node records a use of one object at most.
    pub touch_interval: Duration,
    pub turns: Turns,
    /// How long a silent holder keeps the lease.
    pub lease: Duration,
}

/// Where a deleting listing is: everything last used before `cutoff_ms`
/// (the object store's clock) goes, from the key after `after` on.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    cutoff_ms: i64,
    after: String,
}

impl Plan {
    fn state(&self) -> String {
        format!("cutoff {}\nafter {}\n", self.cutoff_ms, self.after)
    }

    /// The plan a lease generation carries, if it is well formed (the
    /// bucket holds anyone's bytes).
    fn parse(state: &str) -> Option<Plan> {
        let mut lines = state.lines();
        let cutoff_ms = lines.next()?.strip_prefix("cutoff ")?.parse().ok()?;
        let after = lines.next()?.strip_prefix("after ")?.to_string();
        let ok = after.len() <= MAX_KEY && after.bytes().all(|b| b.is_ascii_graphic());
        ok.then_some(Plan { cutoff_ms, after })
    }
}

/// Runs until the bucket is dropped: a pass every `interval`, when it is
/// this node's turn.
pub async fn run(bucket: std::sync::Arc<Bucket>, trim: Trim) {
    let mut lease = match trim.turns {
        Turns::Never => return,
        Turns::Always => None,
        Turns::Lease => loop {
            match lease::probe(&bucket).await {
                Ok(true) => break Some(Lease::new(trim.lease)),
                Ok(false) => {
                    tracing::error!(
                        "the object store does not honour conditional PUTs (If-None-Match), so nodes cannot take turns at trimming it: set s3_trim = \"always\" on one node and \"never\" on the others; no trimming until then"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot check the object store for conditional PUTs ({e}); trying again in {:?}",
                        trim.interval
                    );
                    tokio::time::sleep(trim.interval).await;
                }
            }
        },
    };
    let mut resume = None;
    let mut due = Instant::now() + trim.interval;
    loop {
        if let Some(lease) = &mut lease {
            match lease.hold(&bucket, "").await {
                Ok(Turn::Mine) => {}
                Ok(Turn::Taken(state)) => resume = state.as_deref().and_then(Plan::parse),
                Ok(Turn::Theirs) => {}
                Err(e) => tracing::warn!("the trimmer's lease: {e}"),
            }
        }
        let mine = lease.as_ref().is_none_or(Lease::valid);
        if mine && (resume.is_some() || Instant::now() >= due) {
            if let Err(e) = pass(&bucket, &trim, lease.as_mut(), resume.take()).await {
                tracing::warn!("trimming the object store: {e}; trying again in {:?}", trim.interval);
            }
            due = Instant::now() + trim.interval;
        }
        let wake = lease.as_ref().map_or(trim.interval, Lease::period);
        tokio::time::sleep(
            wake.min(due.saturating_duration_since(Instant::now())).max(Duration::from_millis(100)),
        )
        .await;
    }
}

/// One pass: measure, then delete if over the budget (or go on with a
/// pass another node left).
async fn pass(
    bucket: &Bucket,
    trim: &Trim,
    mut lease: Option<&mut Lease>,
    resume: Option<Plan>,
) -> Result<(), Error> {
    let now = server_now(bucket).await?;
    // Never younger than this node allows, whoever planned the pass.
    let latest = now - trim.min_age.as_millis() as i64;
    let plan = match resume {
        Some(plan) => {
            tracing::info!("resuming the trim pass another node left, after {:?}", plan.after);
            Plan { cutoff_ms: plan.cutoff_ms.min(latest), after: plan.after }
        }
        None => {
            let Some((total, ages)) = measure(bucket, now, lease.as_deref_mut()).await? else {
                return Ok(());
            };
            bucket.requests.bucket_bytes.store(total, std::sync::atomic::Ordering::Relaxed);
            if total as f64 <= trim.max_size as f64 * HIGH_WATERMARK {
                return Ok(());
            }
            let low = (trim.max_size as f64 * LOW_WATERMARK) as u64;
            let age = cutoff_age(&ages, total, low);
            if age < trim.min_age {
                tracing::warn!(
                    "the object store holds {total} bytes, near s3_max_size ({}), and most were used within s3_trim_min_age ({:?}): only older objects go",
                    trim.max_size,
                    trim.min_age
                );
            }
            Plan { cutoff_ms: (now - age.as_millis() as i64).min(latest), after: String::new() }
        }
    };
    delete_older(bucket, plan, lease).await
}

/// Renews the lease if due; `false` if this node may not trim now.
async fn keep(lease: Option<&mut Lease>, bucket: &Bucket, state: &str) -> bool {
    let Some(lease) = lease else { return true };
    match lease.hold(bucket, state).await {
        Ok(Turn::Mine) => lease.valid(),
        Ok(_) => false,
        Err(e) => {
            tracing::warn!("renewing the trimmer's lease: {e}");
            lease.valid()
        }
    }
}

/// The object store's time now, in ms since the epoch: the modification
/// time of an object written for it.
async fn server_now(bucket: &Bucket) -> Result<i64, Error> {
    let path = bucket.path("trim/clock".into());
    Requests::count(&bucket.requests.put);
    bucket.store.put(&path, PutPayload::default()).await?;
    Requests::count(&bucket.requests.head);
    Ok(bucket.store.head(&path).await?.last_modified.timestamp_millis())
}

/// The age histogram's step of `age_ms`.
fn age_bucket(age_ms: i64) -> usize {
    let seconds = (age_ms.max(0) as f64) / 1000.0;
    ((seconds + 1.0).ln() / AGE_STEP.ln()) as usize
}

/// The youngest age of step `b`.
fn age_of_bucket(b: usize) -> Duration {
    Duration::from_secs_f64(AGE_STEP.powi(b as i32) - 1.0)
}

/// Bytes in the bucket and bytes by age of last use, or `None` if this
/// node lost its turn meanwhile.
async fn measure(
    bucket: &Bucket,
    now: i64,
    mut lease: Option<&mut Lease>,
) -> Result<Option<(u64, Vec<u64>)>, Error> {
    let mut ages = vec![0u64; AGE_BUCKETS];
    let (mut total, mut listed) = (0u64, 0u64);
    let mut entries = Merged::new(bucket, "");
    while let Some(entry) = entries.next().await? {
        total += entry.size;
        ages[age_bucket(now - entry.last_use_ms).min(AGE_BUCKETS - 1)] += entry.size;
        listed += 1;
        if listed.is_multiple_of(PAGE) && !keep(lease.as_deref_mut(), bucket, "").await {
            return Ok(None);
        }
    }
    Ok(Some((total, ages)))
}

/// The age beyond which objects go, so that at most `low` bytes stay.
fn cutoff_age(ages: &[u64], total: u64, low: u64) -> Duration {
    let mut left = total;
    for b in (0..ages.len()).rev() {
        left -= ages[b];
        if left <= low {
            return age_of_bucket(b);
        }
    }
    Duration::ZERO
}

/// The second listing: deletes what was last used before the plan's
/// cutoff, after its key, recording where it is in the lease.
async fn delete_older(bucket: &Bucket, plan: Plan, mut lease: Option<&mut Lease>) -> Result<(), Error> {
    // Whoever takes the lease over from here on resumes this pass.
    if let Some(lease) = lease.as_deref_mut()
        && lease.record(bucket, &plan.state()).await? != Turn::Mine
    {
        return Ok(());
    }
    let mut entries = Merged::new(bucket, &plan.after);
    let (mut batch, mut bytes, mut objects) = (Vec::new(), 0u64, 0u64);
    // Keys up to `done` are dealt with (their deletes sent); `last` is the
    // last key seen.
    let (mut done, mut last) = (plan.after.clone(), plan.after.clone());
    let (mut listed, mut batch_since) = (0u64, None);
    loop {
        let entry = entries.next().await?;
        listed += 1;
        // A long stretch with nothing to delete still renews the lease.
        let state = || Plan { cutoff_ms: plan.cutoff_ms, after: done.clone() }.state();
        if listed.is_multiple_of(PAGE) && !keep(lease.as_deref_mut(), bucket, &state()).await {
            tracing::info!("the trimmer's turn ended mid-pass; the next holder resumes it");
            return Ok(());
        }
        // An entry adds two paths at most: the batch never exceeds S3's limit.
        let full = batch.len() + 2 > DELETE_BATCH
            || batch_since.is_some_and(|t: Instant| t.elapsed() >= DELETE_WAIT);
        if (entry.is_none() || full) && !batch.is_empty() {
            if !keep(lease.as_deref_mut(), bucket, &state()).await {
                tracing::info!("the trimmer's turn ended mid-pass; the next holder resumes it");
                return Ok(());
            }
            delete(bucket, std::mem::take(&mut batch)).await?;
            batch_since = None;
            done.clone_from(&last);
        }
        let Some(entry) = entry else { break };
        last.clone_from(&entry.rest);
        if entry.last_use_ms < plan.cutoff_ms {
            batch_since.get_or_insert_with(Instant::now);
            if entry.object {
                batch.push(bucket.path(entry.rest.clone()));
                bytes += entry.size;
                objects += 1;
            }
            if entry.marker {
                batch.push(bucket.used_path(&entry.rest));
            }
        }
    }
    if objects > 0 {
        let requests = &bucket.requests;
        Requests::count(&requests.trims);
        requests.trimmed_objects.fetch_add(objects, std::sync::atomic::Ordering::Relaxed);
        requests.trimmed_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let before = requests.bucket_bytes.load(std::sync::atomic::Ordering::Relaxed);
        requests.bucket_bytes.store(before.saturating_sub(bytes), std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            "trimmed the object store: {objects} objects, {bytes} bytes, last used before the cutoff"
        );
    }
    Ok(())
}

/// Deletes `paths` in one multi-object request.
async fn delete(bucket: &Bucket, paths: Vec<Path>) -> Result<(), Error> {
    Requests::count(&bucket.requests.delete);
    let mut results = bucket.store.delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed());
    while let Some(result) = results.next().await {
        match result {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// An object, or its marker alone, with its last use.
struct Entry {
    /// Its path under `larder/v1/`.
    rest: String,
    /// The object's size (0 for a marker whose object is gone).
    size: u64,
    last_use_ms: i64,
    object: bool,
    marker: bool,
}

/// One sorted listing, a key at a time.
struct Side {
    stream: BoxStream<'static, object_store::Result<ObjectMeta>>,
    /// What keys start with, cut off to give `rest`.
    base: String,
    /// Keys from this one on are not this side's.
    end: Option<&'static str>,
    head: Option<(String, u64, i64)>,
    done: bool,
    listed: u64,
}

impl Side {
    fn new(bucket: &Bucket, under: &str, after: &str, end: Option<&'static str>) -> Side {
        let prefix = bucket.path(under.trim_end_matches('/').to_string());
        let offset = if after.is_empty() { prefix.clone() } else { bucket.path(format!("{under}{after}")) };
        Side {
            stream: bucket.store.list_with_offset(Some(&prefix), &offset),
            base: format!("{prefix}/"),
            end,
            head: None,
            done: false,
            listed: 0,
        }
    }

    async fn fill(&mut self, requests: &Requests) -> Result<(), Error> {
        if self.head.is_some() || self.done {
            return Ok(());
        }
        if self.listed.is_multiple_of(PAGE) {
            Requests::count(&requests.list);
        }
        match self.stream.next().await {
            None => self.done = true,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(meta)) => {
                self.listed += 1;
                let key = meta.location.as_ref();
                let rest = key.strip_prefix(self.base.as_str()).unwrap_or(key).to_string();
                if self.end.is_some_and(|end| rest.as_str() >= end) {
                    self.done = true;
                } else {
                    self.head = Some((rest, meta.size, meta.last_modified.timestamp_millis()));
                }
            }
        }
        Ok(())
    }
}

/// The bucket's objects merged with their markers, in key order.
struct Merged<'a> {
    bucket: &'a Bucket,
    objects: Side,
    markers: Side,
    /// The last key given, to check that the listings are sorted.
    last: String,
}

impl<'a> Merged<'a> {
    /// From the key after `after` on (all, if empty).
    fn new(bucket: &'a Bucket, after: &str) -> Merged<'a> {
        Merged {
            bucket,
            // `ac/` and `cas/`; `trim/` and `used/` sort after them.
            objects: Side::new(bucket, "", after, Some("trim/")),
            markers: Side::new(bucket, "used/", after, None),
            last: after.to_string(),
        }
    }

    async fn next(&mut self) -> Result<Option<Entry>, Error> {
        self.objects.fill(&self.bucket.requests).await?;
        self.markers.fill(&self.bucket.requests).await?;
        let entry = match (self.objects.head.take(), self.markers.head.take()) {
            (None, None) => return Ok(None),
            (Some((rest, size, ms)), None) => {
                Entry { rest, size, last_use_ms: ms, object: true, marker: false }
            }
            (None, Some((rest, _, ms))) => {
                Entry { rest, size: 0, last_use_ms: ms, object: false, marker: true }
            }
            (Some(o), Some(m)) if o.0 == m.0 => {
                Entry { rest: o.0, size: o.1, last_use_ms: o.2.max(m.2), object: true, marker: true }
            }
            (Some(o), Some(m)) if o.0 < m.0 => {
                self.markers.head = Some(m);
                Entry { rest: o.0, size: o.1, last_use_ms: o.2, object: true, marker: false }
            }
            (Some(o), Some(m)) => {
                self.objects.head = Some(o);
                Entry { rest: m.0, size: 0, last_use_ms: m.2, object: false, marker: true }
            }
        };
        if entry.rest <= self.last && !self.last.is_empty() {
            return Err(Error::Unavailable(format!(
                "the object store lists keys out of order ({} after {}): cannot trim it",
                entry.rest, self.last
            )));
        }
        self.last.clone_from(&entry.rest);
        Ok(Some(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_keeps_the_newest_bytes_within_the_low_watermark() {
        let mut ages = vec![0u64; AGE_BUCKETS];
        // 100 bytes each at 10 s, 100 s, 1000 s and 10000 s.
        for s in [10_000, 100_000, 1_000_000, 10_000_000] {
            ages[age_bucket(s)] += 100;
        }
        // Nothing to delete: only the oldest step, centuries old, would go.
        assert!(cutoff_age(&ages, 400, 400) > Duration::from_secs(100 * 365 * 86400));
        let two = cutoff_age(&ages, 400, 250);
        assert!(two > Duration::from_secs(100) && two <= Duration::from_secs(1000), "{two:?}");
        let one = cutoff_age(&ages, 400, 100);
        assert!(one > Duration::from_secs(10) && one <= Duration::from_secs(100), "{one:?}");
        // Nothing may stay: all but the youngest step go, and that from its youngest age.
        assert!(cutoff_age(&ages, 400, 0) <= Duration::from_secs(10));
        // Every step's youngest age falls in that step.
        for b in 1..600 {
            let age = age_of_bucket(b).as_millis() as i64 + 1;
            assert_eq!(age_bucket(age), b, "step {b}");
        }
    }

    #[test]
    fn plans_round_trip_and_hostile_ones_are_refused() {
        let plan = Plan { cutoff_ms: 1_700_000_000_000, after: "cas/sha256/ab".into() };
        assert_eq!(Plan::parse(&plan.state()), Some(plan));
        for bad in ["", "cutoff x\nafter a\n", "cutoff 1\n", "cutoff 1\nafter a b\n", "after a\ncutoff 1\n"] {
            assert_eq!(Plan::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Plan::parse(&format!("cutoff 1\nafter {}\n", "a".repeat(MAX_KEY + 1))), None);
    }
}
