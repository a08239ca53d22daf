//! Eviction primitives: delete the least recently used blobs and action
//! results, and make RocksDB give their space back. The policy (when, how
//! much) lives in `eviction`.

use std::sync::atomic::Ordering;

use rocksdb::{IteratorMode, WriteBatch};

use super::layout::{CF_CHUNKS, CF_LRU, Used, chunk_key, lru_key, split_ac_key, split_lru_key};
use super::{Error, Store};

/// What one eviction pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub blobs: u64,
    pub action_results: u64,
    /// Stored (compressed) bytes of the evicted blobs and action results.
    pub bytes: u64,
    /// The lowest and highest blob id evicted: the chunk range to compact.
    pub blob_ids: Option<(u64, u64)>,
}

/// Blobs deleted per write batch (and per hold of a stripe lock).
const BATCH: usize = 256;

impl Store {
    /// Deletes least recently used blobs and action results, oldest first,
    /// until `want` stored bytes are gone or the next was used after
    /// `used_before_ms`. What is queued for the object store is kept: it may
    /// be its only copy.
    pub fn evict_lru(&self, want: u64, used_before_ms: u64) -> Result<Evicted, Error> {
        // Access times still in memory decide the order too.
        self.flush_access_times()?;
        let mut evicted = Evicted::default();
        let mut candidates = Vec::with_capacity(BATCH);
        // Bytes of the candidates collected so far; rechecked under the lock.
        let mut planned = 0;
        let iter = self.db.iterator_cf(self.cf(CF_LRU), IteratorMode::Start);
        for item in iter {
            let (key, _) = item?;
            let Some((atime, used)) = split_lru_key(&key) else {
                return Err(Error::Corrupt(format!("eviction order key {} is malformed", hex::encode(&key))));
            };
            if atime >= used_before_ms || planned >= want {
                break;
            }
            match &used {
                Used::Blob(digest) => {
                    if let Some(entry) = self.get_entry(digest)?
                        && entry.atime == atime
                        && !self.is_queued(digest)?
                    {
                        planned += entry.stored;
                    }
                }
                Used::ActionResult(key) => planned += self.result_to_evict(atime, key)?,
            }
            candidates.push((atime, used));
            if candidates.len() == BATCH {
                self.evict_batch(&candidates, &mut evicted)?;
                candidates.clear();
            }
        }
        self.evict_batch(&candidates, &mut evicted)?;
        Ok(evicted)
    }

    fn evict_batch(&self, candidates: &[(u64, Used)], evicted: &mut Evicted) -> Result<(), Error> {
        let mut batch = WriteBatch::default();
        // Results are locked by their action, like blobs by their digest.
        let actions: Vec<crate::digest::Digest> = candidates
            .iter()
            .filter_map(|(_, used)| match used {
                Used::ActionResult(key) => split_ac_key(key).map(|(_, action)| action),
                Used::Blob(_) => None,
            })
            .collect();
        let blobs = candidates.iter().filter_map(|(_, used)| match used {
            Used::Blob(digest) => Some(digest),
            Used::ActionResult(_) => None,
        });
        let _guards = self.lock_stripes(blobs.chain(&actions));
        let before = (evicted.blobs, evicted.bytes);
        let mut done = std::collections::HashSet::new();
        let mut ids = Vec::new();
        for (atime, used) in candidates {
            let digest = match used {
                Used::Blob(digest) => digest,
                Used::ActionResult(key) => {
                    let freed = self.evict_result(&mut batch, *atime, key)?;
                    if freed > 0 {
                        evicted.action_results += 1;
                        evicted.bytes += freed;
                    }
                    continue;
                }
            };
            if self.is_queued(digest)? {
                // Kept in its place, for a later pass once it is copied.
                continue;
            }
            batch.delete_cf(self.cf(CF_LRU), lru_key(*atime, digest));
            if done.contains(digest) {
                continue;
            }
            let Some(entry) = self.get_entry(digest)? else { continue };
            if entry.atime != *atime {
                // A stale position (the blob was used since): keep the current one.
                batch.put_cf(self.cf(CF_LRU), lru_key(entry.atime, digest), []);
                continue;
            }
            done.insert(*digest);
            ids.extend(self.delete_blob(&mut batch, digest, &entry));
            evicted.blobs += 1;
            evicted.bytes += entry.stored;
            evicted.blob_ids = Some(match evicted.blob_ids {
                None => (entry.blob_id, entry.blob_id),
                Some((lo, hi)) => (lo.min(entry.blob_id), hi.max(entry.blob_id)),
            });
        }
        self.write_deleting(batch, &ids)?;
        self.totals.evicted_blobs.fetch_add(evicted.blobs - before.0, Ordering::Relaxed);
        self.totals.evicted_bytes.fetch_add(evicted.bytes - before.1, Ordering::Relaxed);
        Ok(())
    }

    /// Compacts the chunks of the given blob id range, so that deleted chunks
    /// leave the SST files and RocksDB's blob files with no live chunk are
    /// deleted. (Blobs with files of their own gave their space back already.)
    pub fn compact_chunks(&self, (lo, hi): (u64, u64)) {
        self.db.compact_range_cf(self.cf(CF_CHUNKS), Some(chunk_key(lo, 0)), Some(chunk_key(hi + 1, 0)));
    }

    /// Compacts the action cache, so that evicted results leave its files
    /// (and the write-ahead log that held them is released).
    pub fn compact_action_results(&self) {
        self.db.compact_range_cf(self.cf(super::layout::CF_AC), None::<&[u8]>, None::<&[u8]>);
    }
}
