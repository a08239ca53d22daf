//! Eviction primitives: delete the least recently used blobs and action
//! results, and make RocksDB give their space back. The policy (when, how
//! much) lives in `eviction`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use rocksdb::{IteratorMode, WriteBatch};

use super::layout::{CF_CHUNKS, CF_LRU, IndexEntry, Used, chunk_key, lru_key, split_ac_key, split_lru_key};
use super::lists::Holds;
use super::{Error, Store};
use crate::digest::Digest;

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

impl Evicted {
    fn count(&mut self, entry: &IndexEntry) {
        self.blobs += 1;
        self.bytes += entry.stored;
        self.blob_ids = Some(match self.blob_ids {
            None => (entry.blob_id, entry.blob_id),
            Some((lo, hi)) => (lo.min(entry.blob_id), hi.max(entry.blob_id)),
        });
    }
}

/// Blobs deleted per write batch (and per hold of a stripe lock).
const BATCH: usize = 256;

impl Store {
    /// Deletes least recently used blobs and action results, oldest first,
    /// until `want` stored bytes are gone or the next may have been used
    /// after `used_before_ms`. What is queued for the object store is kept:
    /// it may be its only copy.
    pub fn evict_lru(&self, want: u64, used_before_ms: u64) -> Result<Evicted, Error> {
        // Access times still in memory decide the order too.
        self.flush_access_times()?;
        // A recorded use stands for any that came after it within the
        // resolution, which were not written.
        let used_before_ms = used_before_ms.saturating_sub(self.use_resolution_ms());
        let mut evicted = Evicted::default();
        let mut candidates = Vec::with_capacity(BATCH);
        // Bytes of the candidates collected so far; rechecked under the lock.
        let mut planned = 0;
        let mut released = HashMap::new();
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
                        && entry.holders == 0
                        && !self.is_queued(digest)?
                    {
                        planned += entry.stored;
                        if entry.form.is_list() {
                            planned += self.freed_with(&entry, &mut released, used_before_ms)?;
                        }
                    }
                }
                Used::ActionResult(key) => planned += self.result_to_evict(atime, key)?,
            }
            candidates.push((atime, used));
            if candidates.len() == BATCH {
                self.evict_batch(&candidates, used_before_ms, &mut evicted)?;
                candidates.clear();
            }
        }
        self.evict_batch(&candidates, used_before_ms, &mut evicted)?;
        Ok(evicted)
    }

    /// Stored bytes of the chunks that evicting this list frees, with the
    /// lists planned before it (`released` counts their holds on each
    /// chunk): those no list holds then, unused since `used_before_ms`, go
    /// with it (see [`Store::evict_batch`]).
    fn freed_with(
        &self,
        list: &IndexEntry,
        released: &mut HashMap<Digest, u32>,
        used_before_ms: u64,
    ) -> Result<u64, Error> {
        let mut bytes = 0;
        for (_, chunk, id) in self.refs_of(list.blob_id)? {
            let gone = released.entry(chunk).or_insert(0);
            *gone += 1;
            let freed = |e: &IndexEntry| e.blob_id == id && e.holders == *gone && e.atime < used_before_ms;
            if let Some(entry) = self.get_entry(&chunk)?.filter(freed) {
                bytes += entry.stored;
            }
        }
        Ok(bytes)
    }

    /// Evicts the candidates still where the eviction order had them, and
    /// the chunks the lists among them were the last to hold, unless used
    /// since `used_before_ms`: a list's bytes go with it, in the same write.
    fn evict_batch(
        &self,
        candidates: &[(u64, Used)],
        used_before_ms: u64,
        evicted: &mut Evicted,
    ) -> Result<(), Error> {
        let mut batch = WriteBatch::default();
        // Results are locked by their action, like blobs by their digest.
        let actions: Vec<crate::digest::Digest> = candidates
            .iter()
            .filter_map(|(_, used)| match used {
                Used::ActionResult(key) => split_ac_key(key).map(|(_, action)| action),
                Used::Blob(_) => None,
            })
            .collect();
        let blobs: Vec<&Digest> = candidates
            .iter()
            .filter_map(|(_, used)| match used {
                Used::Blob(digest) => Some(digest),
                Used::ActionResult(_) => None,
            })
            .collect();
        // Lists release their chunks: those are locked too. (A list's
        // references never change under its blob id.)
        let mut lists = HashMap::new();
        for digest in &blobs {
            if let Some(entry) = self.get_entry(digest)?.filter(|e| e.form.is_list()) {
                lists.insert(**digest, (entry.blob_id, self.refs_of(entry.blob_id)?));
            }
        }
        let chunks = lists.values().flat_map(|(_, refs)| refs.iter().map(|(_, d, _)| d));
        let _guards = self.lock_stripes(blobs.iter().copied().chain(&actions).chain(chunks));
        let before = (evicted.blobs, evicted.bytes);
        let mut done = HashSet::new();
        let mut ids = Vec::new();
        let mut holds = Holds::default();
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
            let entry = match holds.get(digest) {
                Some(entry) => Some(entry),
                None => self.get_entry(digest)?,
            };
            let Some(entry) = entry else { continue };
            // Held by a list: out of the eviction order until released.
            if entry.holders > 0 {
                continue;
            }
            let locked = lists.get(digest).is_none_or(|(id, _)| *id == entry.blob_id);
            if entry.atime != *atime || entry.form.is_list() && !locked {
                // A stale position (the blob was used since): keep the current one.
                batch.put_cf(self.cf(CF_LRU), lru_key(entry.atime, digest), []);
                continue;
            }
            done.insert(*digest);
            ids.extend(self.delete_blob(&mut batch, &mut holds, digest, &entry)?);
            evicted.count(&entry);
        }
        for (digest, entry) in holds.released() {
            if entry.atime < used_before_ms && !self.is_queued(&digest)? {
                ids.extend(self.delete_blob(&mut batch, &mut holds, &digest, &entry)?);
                evicted.count(&entry);
            }
        }
        self.write_holds(&mut batch, holds);
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
