//! The action cache in the store: results live inside the size budget like
//! blobs. Each write is admitted against the hard limit and counted in the
//! stored bytes; each result has a place in the one eviction order (by last
//! use), so that eviction takes old results and old blobs alike.

use bytes::Bytes;
use rocksdb::WriteBatch;

use super::layout::{
    AcValue, CF_AC, CF_LRU, CF_QUEUE, QueueValue, ac_key, lru_action_key, queue_ac_key, queue_key_of_ac_key,
    raw_ac_key, split_ac_key,
};
use super::{Error, Store, now_ms, stripe_of};
use crate::digest::Digest;

/// An action result as stored: the action's size, if the client gave one,
/// and the ActionResult protobuf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResult {
    pub size: Option<u64>,
    pub result: Bytes,
}

impl Store {
    /// Stores an action result, queued when there is an object store tier.
    /// `size` is the action's size, when the client gave one (Bazel's HTTP
    /// cache names actions by hash alone). Refused with [`Error::Full`] at
    /// the hard limit.
    pub fn put_action_result(
        &self,
        instance: &str,
        action: &Digest,
        size: Option<u64>,
        result: &[u8],
    ) -> Result<(), Error> {
        let queue = self.queues().then(|| queue_ac_key(instance, action));
        self.store_entry(ac_key(instance, action), action, size, result, queue)
    }

    /// Stores an action result copied in from the object store (which
    /// holds it already: it is not queued).
    pub fn copy_action_result(
        &self,
        instance: &str,
        action: &Digest,
        size: Option<u64>,
        result: &[u8],
    ) -> Result<(), Error> {
        self.store_entry(ac_key(instance, action), action, size, result, None)
    }

    /// Stores a raw entry of Bazel's HTTP cache under `key` (with
    /// `disable_http_ac_validation`): bytes no one checks, apart from the
    /// action results gRPC and REST serve, inside the budget and the
    /// eviction order like them. They stay on this node: the object store
    /// tier copies only what it can check.
    pub fn put_raw_entry(&self, instance: &str, key: &Digest, value: &[u8]) -> Result<(), Error> {
        self.store_entry(raw_ac_key(instance, key), key, None, value, None)
    }

    /// The raw entry stored under `key`, if any. Not a use: a served hit
    /// calls [`Store::touch_raw_entry`].
    pub fn get_raw_entry(&self, instance: &str, key: &Digest) -> Result<Option<Bytes>, Error> {
        Ok(self.get_ac_value(&raw_ac_key(instance, key), key)?.map(|stored| stored.result))
    }

    /// Counts a served raw entry as a use.
    pub fn touch_raw_entry(&self, instance: &str, key: &Digest) {
        let mut accessed = self.accessed.results.lock().unwrap_or_else(|e| e.into_inner());
        accessed.insert(raw_ac_key(instance, key), now_ms());
    }

    /// Stores `result` under the `ac` key `key` of `action`, and in the
    /// queue under `queue` (if given).
    fn store_entry(
        &self,
        key: Vec<u8>,
        action: &Digest,
        size: Option<u64>,
        result: &[u8],
        queue: Option<Vec<u8>>,
    ) -> Result<(), Error> {
        let now = now_ms();
        let value = AcValue { atime: Some(now), size, result }.encode();
        let _admitted = self.admit(value.len() as u64)?;
        // Under the action's stripe: the result it replaces leaves the
        // eviction order in the same write, and a dequeue compares the stored
        // result with the one it copied, and must not slip between.
        let _guard = self.stripe(action);
        let mut batch = WriteBatch::default();
        self.forget_result(&mut batch, &key)?;
        batch.put_cf(self.cf(CF_LRU), lru_action_key(now, &key), []);
        self.count_stored(&mut batch, value.len() as i64);
        batch.put_cf(self.cf(CF_AC), &key, value);
        let Some(queue_key) = queue else {
            return self.write(batch);
        };
        let before = self.queue_entry(&queue_key)?;
        let bytes = result.len() as u64;
        self.admit_queued(bytes.saturating_sub(before.map_or(0, |v| v.bytes)))?;
        batch.put_cf(self.cf(CF_QUEUE), &queue_key, QueueValue { since_ms: now, bytes }.encode());
        self.write(batch)?;
        match before {
            None => self.count_queued(1, bytes as i64),
            Some(v) => self.count_queued(0, bytes as i64 - v.bytes as i64),
        }
        Ok(())
    }

    /// Adds to `batch` the removal of the result stored under `key`, if
    /// any: its place in the eviction order and its stored bytes. (Results
    /// from before layout 3 have neither.)
    fn forget_result(&self, batch: &mut WriteBatch, key: &[u8]) -> Result<(), Error> {
        let Some(old) = self.db.get_pinned_cf(self.cf(CF_AC), key)? else {
            return Ok(());
        };
        if let Some(AcValue { atime: Some(atime), .. }) = AcValue::decode(&old) {
            batch.delete_cf(self.cf(CF_LRU), lru_action_key(atime, key));
            self.count_stored(batch, -(old.len() as i64));
        }
        batch.delete_cf(self.cf(CF_AC), key);
        Ok(())
    }

    /// The stored action result for `action` under `instance` (whatever its
    /// size), as protobuf bytes, with the action size it was stored with.
    /// Not a use: a served hit calls [`Store::touch_action_result`].
    pub fn get_action_result(&self, instance: &str, action: &Digest) -> Result<Option<StoredResult>, Error> {
        self.get_ac_value(&ac_key(instance, action), action)
    }

    fn get_ac_value(&self, key: &[u8], action: &Digest) -> Result<Option<StoredResult>, Error> {
        let Some(v) = self.db.get_pinned_cf(self.cf(CF_AC), key)? else {
            return Ok(None);
        };
        match AcValue::decode(&v) {
            Some(value) => Ok(Some(StoredResult {
                size: value.size,
                result: bytes::Bytes::copy_from_slice(value.result),
            })),
            None => Err(Error::Corrupt(format!("action cache entry of {action} is malformed"))),
        }
    }

    /// Counts a served hit as a use of the result (written with the next
    /// flush of access times).
    pub fn touch_action_result(&self, instance: &str, action: &Digest) {
        let mut accessed = self.accessed.results.lock().unwrap_or_else(|e| e.into_inner());
        accessed.insert(ac_key(instance, action), now_ms());
    }

    /// Removes an action result (one whose outputs are gone).
    pub fn delete_action_result(&self, instance: &str, action: &Digest) -> Result<(), Error> {
        let _guard = self.stripe(action);
        let mut batch = WriteBatch::default();
        self.forget_result(&mut batch, &ac_key(instance, action))?;
        self.write(batch)
    }

    /// Writes the last uses of results hit since the last flush; the number
    /// of results moved in the eviction order.
    pub(super) fn flush_result_access_times(&self) -> Result<usize, Error> {
        // One batch per lock stripe, as for blobs.
        let mut by_stripe: std::collections::BTreeMap<usize, Vec<(Vec<u8>, u64)>> = Default::default();
        for (key, atime) in self.accessed.results.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            if let Some((_, action)) = split_ac_key(&key) {
                by_stripe.entry(stripe_of(&action)).or_default().push((key, atime));
            }
        }
        let mut updated = 0;
        for (stripe, accessed) in by_stripe {
            let _guard = self.stripes[stripe].lock().unwrap_or_else(|e| e.into_inner());
            let mut batch = WriteBatch::default();
            for (key, atime) in accessed {
                let Some(stored) = self.db.get_pinned_cf(self.cf(CF_AC), &key)? else { continue };
                let Some(value) = AcValue::decode(&stored) else { continue };
                if value.atime.is_some_and(|t| t.saturating_add(self.use_resolution_ms()) >= atime) {
                    continue;
                }
                // (Every result has a time since layout 3: opening upgrades.)
                if let Some(old) = value.atime {
                    batch.delete_cf(self.cf(CF_LRU), lru_action_key(old, &key));
                }
                batch.put_cf(self.cf(CF_LRU), lru_action_key(atime, &key), []);
                batch.put_cf(self.cf(CF_AC), &key, AcValue { atime: Some(atime), ..value }.encode());
                updated += 1;
            }
            self.write(batch)?;
        }
        Ok(updated)
    }

    /// The stored bytes [`Store::evict_result`] would free.
    pub(super) fn result_to_evict(&self, atime: u64, key: &[u8]) -> Result<u64, Error> {
        let Some(stored) = self.db.get_pinned_cf(self.cf(CF_AC), key)? else {
            return Ok(0);
        };
        let current = AcValue::decode(&stored).and_then(|v| v.atime) == Some(atime);
        let queued = self.queues() && self.queue_entry(&queue_key_of_ac_key(key))?.is_some();
        Ok(if current && !queued { stored.len() as u64 } else { 0 })
    }

    /// Evicts the result stored under `key` if it was last used at `atime`
    /// (else its place in the order is stale) and is not queued for the
    /// object store; the stored bytes freed.
    pub(super) fn evict_result(&self, batch: &mut WriteBatch, atime: u64, key: &[u8]) -> Result<u64, Error> {
        let Some(stored) = self.db.get_pinned_cf(self.cf(CF_AC), key)? else {
            batch.delete_cf(self.cf(CF_LRU), lru_action_key(atime, key));
            return Ok(0);
        };
        if AcValue::decode(&stored).and_then(|v| v.atime) != Some(atime) {
            // Used since: it has a newer place.
            batch.delete_cf(self.cf(CF_LRU), lru_action_key(atime, key));
            return Ok(0);
        }
        // Queued for the object store: kept in its place for a later pass.
        let freed = self.result_to_evict(atime, key)?;
        if freed > 0 {
            self.forget_result(batch, key)?;
        }
        Ok(freed)
    }
}
