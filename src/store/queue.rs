//! The queue of what the object store tier may lack: each blob and action
//! result a client writes is queued in the same atomic write that stores it,
//! and leaves the queue once a copy is in the object store. The queue
//! survives restarts and kill -9; eviction never removes a queued blob; and
//! its size is bounded, so that an object store that stays away cannot fill
//! the disk with blobs eviction may not touch.
//!
//! A store opened without a queue limit (no object store) queues nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rocksdb::{Direction, IteratorMode, WriteBatch};

pub use super::layout::Queued;
use super::layout::{
    AcValue, BACKFILL_AC_KEY, BACKFILL_KEY, CF_AC, CF_INDEX, CF_QUEUE, QUEUEING_KEY, QueueValue,
    queue_ac_key, queue_blob_key, queued_of_key,
};
use super::{Error, Store, now_ms};
use crate::digest::Digest;

/// The queue time stored for an entry to be checked before it is copied
/// (see [`QueueEntry::check`]): no write happens at the epoch.
const TO_CHECK: u64 = 0;

/// One queue entry, as [`Store::queued`] lists it.
#[derive(Clone, Debug)]
pub struct QueueEntry {
    /// Where it sits in the queue: a listing resumes after it.
    pub key: Vec<u8>,
    pub item: Queued,
    /// When it was queued (0 for one to check).
    pub since_ms: u64,
    /// Queued by the backfill, or written again while stored already: the
    /// object store may hold it already, and is asked before it is copied.
    pub check: bool,
}

/// Entries in the queue, and the bytes they count.
#[derive(Default)]
pub(super) struct Count {
    pub(super) entries: AtomicU64,
    pub(super) bytes: AtomicU64,
}

impl Store {
    /// Whether writes are queued for an object store tier.
    pub fn queues(&self) -> bool {
        self.options.queue_limit > 0
    }

    /// Entries in the queue, and the bytes they count.
    pub fn queue_len(&self) -> (u64, u64) {
        (self.queued.entries.load(Ordering::Relaxed), self.queued.bytes.load(Ordering::Relaxed))
    }

    /// Bytes the queue has left for entries to be checked before copying
    /// (the backfill, blobs written again): they may fill half of it, the
    /// rest is for writes.
    pub fn room_for_checks(&self) -> u64 {
        (self.options.queue_limit / 2).saturating_sub(self.queue_len().1)
    }

    /// Refuses `bytes` of new writes if the queue cannot take them. An
    /// empty queue takes anything: a blob larger than the whole queue.
    pub(super) fn admit_queued(&self, bytes: u64) -> Result<(), Error> {
        let limit = self.options.queue_limit;
        let queued = self.queued.bytes.load(Ordering::Relaxed);
        if self.queues() && queued > 0 && queued.saturating_add(bytes) > limit {
            self.totals.rejected_writes.fetch_add(1, Ordering::Relaxed);
            return Err(Error::QueueFull { queued, limit });
        }
        Ok(())
    }

    /// Adds a new blob's queue entry to `batch`; [`Store::count_queued`]
    /// counts it once the batch is written.
    pub(super) fn queue_blob(&self, batch: &mut WriteBatch, digest: &Digest) {
        let value = QueueValue { since_ms: now_ms(), bytes: digest.size };
        batch.put_cf(self.cf(CF_QUEUE), queue_blob_key(digest), value.encode());
    }

    pub(super) fn count_queued(&self, entries: i64, bytes: i64) {
        // Adding a negative delta as its two's complement wraps to a subtraction.
        self.queued.entries.fetch_add(entries as u64, Ordering::Relaxed);
        self.queued.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn queue_entry(&self, key: &[u8]) -> Result<Option<QueueValue>, Error> {
        match self.db.get_pinned_cf(self.cf(CF_QUEUE), key)? {
            None => Ok(None),
            Some(v) => QueueValue::decode(&v)
                .map(Some)
                .ok_or_else(|| Error::Corrupt(format!("queue entry {} is malformed", hex::encode(key)))),
        }
    }

    /// Whether the blob waits in the queue.
    pub fn is_queued(&self, digest: &Digest) -> Result<bool, Error> {
        Ok(self.queues() && self.queue_entry(&queue_blob_key(digest))?.is_some())
    }

    /// Removes blobs from the queue once the object store holds them, in
    /// one write. Blobs not queued are left alone.
    pub fn dequeue_blobs(&self, digests: &[Digest]) -> Result<(), Error> {
        self.dequeue_where(digests, |_| Ok(true))
    }

    /// Removes blobs with no local copy left to send from the queue; one
    /// stored again meanwhile (and so queued again) stays.
    pub fn dequeue_vanished(&self, digests: &[Digest]) -> Result<(), Error> {
        self.dequeue_where(digests, |d| Ok(self.get_entry(d)?.is_none()))
    }

    fn dequeue_where(
        &self,
        digests: &[Digest],
        gone: impl Fn(&Digest) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let mut digests = digests.to_vec();
        digests.sort_unstable();
        digests.dedup();
        let _guards = self.lock_stripes(&digests);
        let keys: Vec<_> = digests.iter().map(queue_blob_key).collect();
        let mut batch = WriteBatch::default();
        let (mut entries, mut bytes) = (0, 0);
        let found = self.db.batched_multi_get_cf(self.cf(CF_QUEUE), &keys, false);
        for ((digest, key), value) in digests.iter().zip(&keys).zip(found) {
            if let Some(value) = value?
                && gone(digest)?
            {
                batch.delete_cf(self.cf(CF_QUEUE), key);
                entries += 1;
                bytes += QueueValue::decode(&value).map_or(0, |v| v.bytes) as i64;
            }
        }
        if entries > 0 {
            self.write(batch)?;
            self.count_queued(-entries, -bytes);
        }
        Ok(())
    }

    /// Adds the removal of a queue entry to `batch` and returns it, for the
    /// caller to uncount once written; the caller holds its stripe lock.
    pub(super) fn unqueue(&self, batch: &mut WriteBatch, key: &[u8]) -> Result<Option<QueueValue>, Error> {
        let value = self.queue_entry(key)?;
        if value.is_some() {
            batch.delete_cf(self.cf(CF_QUEUE), key);
        }
        Ok(value)
    }

    /// Removes an action result from the queue once `copied` (what was
    /// read for copying, `None` if there was none) is in the object store,
    /// unless a newer result replaced it meanwhile: that one stays queued.
    pub fn dequeue_action_result(
        &self,
        instance: &str,
        action: &Digest,
        copied: Option<&[u8]>,
    ) -> Result<(), Error> {
        let _guard = self.stripe(action);
        if self.get_action_result(instance, action)?.as_ref().map(|r| &r.result[..]) != copied {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        if let Some(value) = self.unqueue(&mut batch, &queue_ac_key(instance, action))? {
            self.write(batch)?;
            self.count_queued(-1, -(value.bytes as i64));
        }
        Ok(())
    }

    /// An action result to copy to the object store, and whether it is
    /// queued to be checked (then it is looked up there first). Read together
    /// under the action's stripe: a client storing a newer result replaces
    /// both at once.
    pub fn action_result_to_copy(
        &self,
        instance: &str,
        action: &Digest,
    ) -> Result<(Option<Bytes>, bool), Error> {
        let _guard = self.stripe(action);
        let entry = self.queue_entry(&queue_ac_key(instance, action))?;
        let result = self.get_action_result(instance, action)?.map(|r| r.result);
        Ok((result, entry.is_some_and(|v| v.since_ms == TO_CHECK)))
    }

    /// Up to `max` queue entries after the key `after` (from the start for
    /// an empty one), in key order: blobs first, then action results.
    pub fn queued(&self, after: &[u8], max: usize) -> Result<Vec<QueueEntry>, Error> {
        let mut entries = Vec::new();
        let mode = IteratorMode::From(after, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_QUEUE), mode) {
            let (key, value) = item?;
            if *key == *after {
                continue;
            }
            let (Some(item), Some(value)) = (queued_of_key(&key), QueueValue::decode(&value)) else {
                return Err(Error::Corrupt(format!("queue entry {} is malformed", hex::encode(&key))));
            };
            let check = value.since_ms == TO_CHECK;
            entries.push(QueueEntry { key: key.into_vec(), item, since_ms: value.since_ms, check });
            if entries.len() == max {
                break;
            }
        }
        Ok(entries)
    }

    /// At a server's start: a store that starts queueing (its object store
    /// tier is new) backfills the blobs and action results it already
    /// holds; one that stops empties its queue, so that eviction may take
    /// those blobs again.
    pub fn start_or_stop_queueing(&self) -> Result<(), Error> {
        let queueing = self.db.get(QUEUEING_KEY)?.is_some();
        let mut batch = WriteBatch::default();
        match (self.queues(), queueing) {
            (true, false) => {
                batch.put(QUEUEING_KEY, b"1");
                batch.put(BACKFILL_KEY, []);
                batch.put(BACKFILL_AC_KEY, []);
            }
            (false, true) => {
                batch.delete(QUEUEING_KEY);
                batch.delete(BACKFILL_KEY);
                batch.delete(BACKFILL_AC_KEY);
                batch.delete_range_cf(self.cf(CF_QUEUE), [0u8].as_slice(), [2u8].as_slice());
            }
            _ => return Ok(()),
        }
        self.write(batch)?;
        // The default column family is flushed at once (see `open`).
        Ok(self.db.flush()?)
    }

    /// Queues the next blobs, then action results, stored from before the
    /// queue, up to `room` bytes of them, marked to be looked up in the
    /// object store before they are copied (they may be there already).
    /// Returns how many were queued; `None` once the backfill is done (or
    /// none is due).
    pub fn backfill(&self, room: u64) -> Result<Option<usize>, Error> {
        for (cf, cursor) in [(CF_INDEX, BACKFILL_KEY), (CF_AC, BACKFILL_AC_KEY)] {
            if let Some(after) = self.db.get(cursor)? {
                return self.backfill_slice(cf, cursor, &after, room).map(Some);
            }
        }
        Ok(None)
    }

    /// One slice of the backfill of `cf` (the index or the action cache),
    /// from after the key `after`; its progress is kept under `cursor`.
    fn backfill_slice(&self, cf: &str, cursor: &[u8], after: &[u8], room: u64) -> Result<usize, Error> {
        // A queue key is the stored key after a kind byte.
        let kind = if cf == CF_INDEX { 0 } else { 1 };
        let mode = IteratorMode::From(after, Direction::Forward);
        let (mut slice, mut bytes, mut last, mut finished) = (Vec::new(), 0, None, true);
        for item in self.db.iterator_cf(self.cf(cf), mode) {
            let (key, value) = item?;
            if *key == *after {
                continue;
            }
            let queue_key = [&[kind], &*key].concat();
            let (lock, size) = match queued_of_key(&queue_key) {
                Some(Queued::Blob(digest)) => (digest, digest.size),
                Some(Queued::ActionResult { action, .. }) => {
                    let Some(value) = AcValue::decode(&value) else { continue };
                    (action, value.result.len() as u64)
                }
                None => continue,
            };
            if bytes + size > room && !slice.is_empty() {
                finished = false;
                break;
            }
            last = Some(key);
            bytes += size;
            slice.push((queue_key, lock, size));
        }
        let mut batch = WriteBatch::default();
        match (finished, last) {
            (true, _) => batch.delete(cursor),
            (false, Some(last)) => batch.put(cursor, last),
            (false, None) => {}
        }
        self.queue_to_check(cf, slice, batch)
    }

    /// Queues blobs a client wrote again that the local tier held already,
    /// unqueued, to be looked up in the object store and copied if it
    /// lacks them (the client may have found them missing there). With
    /// write-back, the write is acknowledged before that look-up. Best
    /// effort: a queue more than half full leaves them out. Returns how
    /// many were queued.
    pub fn recheck_blobs(&self, digests: &[Digest]) -> Result<usize, Error> {
        let mut items: Vec<(Vec<u8>, Digest, u64)> = digests
            .iter()
            .filter(|d| !d.is_empty_blob())
            .map(|d| (queue_blob_key(d).to_vec(), *d, d.size))
            .collect();
        items.sort_unstable();
        items.dedup();
        let bytes: u64 = items.iter().map(|(_, _, size)| size).sum();
        if !self.queues() || items.is_empty() || bytes > self.room_for_checks() {
            return Ok(0);
        }
        self.queue_to_check(CF_INDEX, items, WriteBatch::default())
    }

    /// Writes `batch` with a queue entry to be checked before copying
    /// (queue key, the digest whose stripe guards it, bytes) for each item
    /// still stored in `cf` and not queued. Under the items' stripe locks:
    /// what was evicted, removed or queued by a write meanwhile is left out.
    fn queue_to_check(
        &self,
        cf: &str,
        items: Vec<(Vec<u8>, Digest, u64)>,
        mut batch: WriteBatch,
    ) -> Result<usize, Error> {
        let _guards = self.lock_stripes(items.iter().map(|(_, lock, _)| lock));
        let (mut queued, mut bytes) = (0, 0);
        for (queue_key, _, size) in items {
            let stored = self.db.get_pinned_cf(self.cf(cf), &queue_key[1..])?.is_some();
            if !stored || self.queue_entry(&queue_key)?.is_some() {
                continue;
            }
            let value = QueueValue { since_ms: TO_CHECK, bytes: size };
            batch.put_cf(self.cf(CF_QUEUE), queue_key, value.encode());
            (queued, bytes) = (queued + 1, bytes + size);
        }
        self.write(batch)?;
        self.count_queued(queued as i64, bytes as i64);
        Ok(queued)
    }

    /// Counts the queue at open (it is bounded, so the scan is too).
    pub(super) fn count_queue(&self) -> Result<(), Error> {
        let (mut entries, mut bytes) = (0, 0);
        for item in self.db.iterator_cf(self.cf(CF_QUEUE), IteratorMode::Start) {
            let (_, value) = item?;
            entries += 1;
            bytes += QueueValue::decode(&value).map_or(0, |v| v.bytes);
        }
        self.queued.entries.store(entries, Ordering::Relaxed);
        self.queued.bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }
}
