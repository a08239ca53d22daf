//! The eviction compactor: keeps the data directory under its size budget.
//!
//! It measures the real bytes on disk a few times a second. Past the high
//! watermark it deletes least recently used blobs and action results (and
//! idle partial uploads)
//! down to the low watermark, then compacts the deleted ranges so RocksDB
//! gives the space back. Writes that would pass the budget itself are
//! refused by the store until eviction catches up; reads always go on.

use std::sync::Arc;
use std::time::Duration;

use super::{Error, Store, now_ms};

/// The size budget and how eviction keeps to it.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Bytes on disk never to exceed.
    pub max_size: u64,
    /// Eviction starts above this fraction of `max_size`...
    pub high_watermark: f64,
    /// ...and stops below this one.
    pub low_watermark: f64,
    /// Blobs used more recently than this are never evicted.
    pub min_age: Duration,
}

impl Budget {
    /// The budget a config sets.
    pub fn of(config: &crate::config::Config) -> Budget {
        Budget {
            max_size: config.store.max_size.0,
            high_watermark: config.eviction.high_watermark,
            low_watermark: config.eviction.low_watermark,
            min_age: config.eviction.min_age,
        }
    }

    /// The budget the disk can actually hold: `max_size`, or less when the
    /// filesystem would fill first (current use plus free space, less a
    /// reserve). A full disk is then handled like a full budget: writes are
    /// refused and eviction makes room, instead of RocksDB meeting ENOSPC.
    pub fn within(self, used: u64, free: u64) -> Budget {
        let capacity = used + free;
        let reserve = (capacity / 16).min(64 << 20);
        Budget { max_size: self.max_size.min(capacity.saturating_sub(reserve)), ..self }
    }

    /// Writes are refused above this: halfway between the high watermark and
    /// `max_size`, so that compaction's temporary files fit in the budget.
    pub fn hard_limit(&self) -> u64 {
        (self.max_size as f64 * (1.0 + self.high_watermark) / 2.0) as u64
    }
}

/// How often disk use is measured: often enough that eviction keeps ahead
/// of writers at full speed, whose reservations it sees between passes.
const MEASURE_EVERY: Duration = Duration::from_millis(100);

/// What eviction leaves for compaction to clean up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Compaction {
    /// The blob ids whose chunks were deleted.
    blob_ids: Option<(u64, u64)>,
    action_results: bool,
}

impl Compaction {
    fn add(&mut self, other: Compaction) {
        self.blob_ids = match (self.blob_ids, other.blob_ids) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (x, y) => x.or(y),
        };
        self.action_results |= other.action_results;
    }

    fn run(self, store: &Store) {
        if let Some(range) = self.blob_ids {
            store.compact_chunks(range);
        }
        if self.action_results {
            store.compact_action_results();
        }
    }
}

/// Runs for as long as the server does. The compactions that follow
/// eviction run beside the measurements, one at a time: one that takes
/// seconds must not leave admission with a stale measure of the disk while
/// its own output grows it.
pub async fn run(store: Arc<Store>, budget: Budget) {
    let mut tick = tokio::time::interval(MEASURE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut compacting: Option<tokio::task::JoinHandle<()>> = None;
    let mut pending = Compaction::default();
    loop {
        tick.tick().await;
        let measured = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || pass(&measured, budget)).await {
            Ok(Ok(more)) => pending.add(more),
            Ok(Err(e)) => tracing::warn!("eviction failed: {e}"),
            Err(e) => tracing::warn!("eviction task failed: {e}"),
        }
        let idle = compacting.as_ref().is_none_or(|c| c.is_finished());
        if idle && (pending.blob_ids.is_some() || pending.action_results) {
            let (store, todo) = (Arc::clone(&store), std::mem::take(&mut pending));
            compacting = Some(tokio::task::spawn_blocking(move || todo.run(&store)));
        }
    }
}

/// One measurement, and an eviction if what is on disk, what is being
/// written and the largest write just refused would pass the high
/// watermark: the least recently used blobs and action results go until
/// that would be at the low watermark. Blobs with files of their own give
/// their space back at once; the chunks of the others are to be compacted
/// away (what it returns).
pub fn pass(store: &Store, budget: Budget) -> Result<Compaction, Error> {
    let disk = store.measure_disk()?;
    let budget = budget.within(disk, store.free_disk()?);
    store.set_hard_limit(budget.hard_limit());
    let high = (budget.max_size as f64 * budget.high_watermark) as u64;
    let low = (budget.max_size as f64 * budget.low_watermark) as u64;
    let wanted = store.disk_wanted();
    if wanted <= high {
        if store.set_eviction_blocked(false) {
            tracing::info!("eviction can make room again: {wanted} bytes on disk and being written");
        }
        return Ok(Compaction::default());
    }
    let uploads = store.expire_uploads(budget.min_age)?;
    let used_before = now_ms().saturating_sub(budget.min_age.as_millis() as u64);
    let evicted = store.evict_lru(wanted - low, used_before)?;
    let after = store.measure_disk()?;
    let blocked = evicted.blobs == 0 && evicted.action_results == 0 && uploads == 0;
    if !blocked {
        tracing::debug!(
            "evicted {} blobs and {} action results ({} stored bytes), and {uploads} idle partial uploads: {disk} -> {after} bytes on disk",
            evicted.blobs,
            evicted.action_results,
            evicted.bytes
        );
    }
    // Said once when it starts, and once when it ends: writes are refused
    // meanwhile, never let past the budget.
    match (store.set_eviction_blocked(blocked), blocked) {
        (false, true) => tracing::warn!(
            "{wanted} bytes on disk and being written, over the high watermark of the {} byte budget, and nothing is old enough to evict (a use written within 1.5 times eviction_min_age, {:?}, or waiting for the object store): writes are refused until blobs age",
            budget.max_size,
            budget.min_age
        ),
        (true, false) => tracing::info!("eviction can make room again: {after} bytes on disk"),
        _ => {}
    }
    Ok(Compaction { blob_ids: evicted.blob_ids, action_results: evicted.action_results > 0 })
}
