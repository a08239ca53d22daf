//! The blob index: which blobs are present, storing whole blobs (batch
//! writes) with their chunks, access times for eviction's order, and the
//! removal of blobs found corrupt.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use super::layout::*;
use super::lists::Holds;
use super::{Admitted, Error, Mismatch, STRIPES, Store, chunk, files, now_ms, present, stripe_of};
use crate::digest::{Digest, Function};

/// Blobs and action results used since the last access-time flush, with
/// the time of their last use (see [`Store::flush_access_times`]): written
/// to the index in batches, not on every read.
#[derive(Default)]
pub(super) struct Accessed {
    /// foldhash, not SipHash: every present digest a FindMissingBlobs asks
    /// about is entered here, and only stored blobs are (whose digests no
    /// client can choose to collide).
    pub(super) blobs: Mutex<HashMap<Digest, u64, foldhash::fast::RandomState>>,
    /// By `ac` key.
    pub(super) results: Mutex<HashMap<Vec<u8>, u64>>,
}

/// What a flush of access times did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Blobs and action results moved in the eviction order.
    pub updated: usize,
    /// Refreshes left in memory, not written.
    pub left: usize,
}

/// A present blob, located for reading.
#[derive(Clone, Copy, Debug)]
pub struct Blob {
    pub digest: Digest,
    pub(super) blob_id: u64,
}

/// A whole blob to store (see [`Store::put_blobs`]).
pub struct NewBlob {
    pub digest: Digest,
    pub data: Bytes,
    /// The zstd frames the client sent, in order, each with the range of
    /// `data` it decodes to (see [`crate::compression::decompress`]): a frame
    /// that holds exactly one chunk is stored as it is, not compressed again.
    pub frames: Vec<(Range<u64>, Bytes)>,
    /// The blob's one chunk as a larder node's codec stored it (a copy from
    /// the object store), `data` being what it decodes to: kept as it is,
    /// not encoded again.
    pub stored: Option<Bytes>,
}

impl NewBlob {
    pub fn new(digest: Digest, data: Bytes) -> NewBlob {
        NewBlob { digest, data, frames: Vec::new(), stored: None }
    }
}

/// Whether a write stored new bytes or found the blob already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Stored,
    AlreadyPresent,
}

impl Store {
    /// The highest blob id referenced by a chunk or an upload record: ids above
    /// it are free. (A prefix of deleted ids may be reused; nothing refers to them.)
    pub(super) fn highest_blob_id(&self) -> Result<u64, Error> {
        let mut highest = 0;
        if let Some(item) = self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::End).next() {
            let (key, _) = item?;
            highest = split_chunk_key(&key).map_or(0, |(id, _)| id);
        }
        for item in self.db.iterator_cf(self.cf(CF_UPLOADS), IteratorMode::Start) {
            let (_, value) = item?;
            if let Some(record) = UploadRecord::decode(&value) {
                highest = highest.max(record.blob_id);
            }
        }
        Ok(highest)
    }

    /// Deletes blob files that no chunk refers to: a crash came between
    /// writing one and its first reference, or between deleting a blob and
    /// its file. (Ids are allocated above every referenced one, so a file
    /// kept here is never written again by another blob.)
    pub(super) fn remove_orphan_files(&self) -> Result<(), Error> {
        let mut removed = 0;
        for id in self.files.ids().map_err(Error::File)? {
            let mut opts = ReadOptions::default();
            opts.set_iterate_upper_bound(chunk_key(id + 1, 0));
            let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_CHUNKS), opts);
            it.seek(chunk_key(id, 0));
            it.status()?;
            if !it.valid() {
                self.files.remove(id).map_err(Error::File)?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!("removed {removed} blob files that nothing refers to (left by a crash)");
        }
        Ok(())
    }

    pub(super) fn allocate_blob_id(&self) -> u64 {
        self.next_blob_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn get_entry(&self, d: &Digest) -> Result<Option<IndexEntry>, Error> {
        match self.db.get_pinned_cf(self.cf(CF_INDEX), index_key(d))? {
            None => Ok(None),
            Some(v) => IndexEntry::decode(&v)
                .map(Some)
                .ok_or_else(|| Error::Corrupt(format!("index entry of {d} is malformed"))),
        }
    }

    pub(super) fn touch(&self, digests: impl IntoIterator<Item = Digest>) {
        let now = now_ms();
        let mut accessed = self.accessed.blobs.lock().unwrap_or_else(|e| e.into_inner());
        accessed.extend(digests.into_iter().map(|d| (d, now)));
    }

    /// Gives a directory from before the blob counters its counts, from one
    /// scan of the index (a new directory starts them at zero).
    pub(super) fn count_blobs_if_uncounted(&self) -> Result<(), Error> {
        if self.counter(BLOBS_KEY)?.is_some() {
            return Ok(());
        }
        let (mut blobs, mut bytes) = (0i64, 0i64);
        for item in self.db.iterator_cf(self.cf(CF_INDEX), IteratorMode::Start) {
            let (key, _) = item?;
            if let Some(d) = digest_of_index_key(&key) {
                (blobs, bytes) = (blobs + 1, bytes + d.size as i64);
            }
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_CHUNKS), BLOBS_KEY, blobs.to_le_bytes());
        batch.put_cf(self.cf(CF_CHUNKS), LOGICAL_KEY, bytes.to_le_bytes());
        self.write(batch)
    }

    /// Enters every blob of the index in the in-memory set of present blobs
    /// (at open, before anything else reads or writes), up to its bound.
    pub(super) fn enter_present_blobs(&self) -> Result<(), Error> {
        let started = std::time::Instant::now();
        self.present.reserve(self.counter(BLOBS_KEY)?.unwrap_or(0));
        let mut opts = ReadOptions::default();
        opts.fill_cache(false);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_INDEX), opts);
        it.seek_to_first();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if let Some(d) = digest_of_index_key(key) {
                // An entry that does not decode still names a present blob
                // (reading it says what is wrong): entered without an id.
                let blob_id = IndexEntry::decode(value).map_or(present::NO_ID, |entry| entry.blob_id);
                self.present.insert(&d, blob_id);
            }
            // Full (it has said so) or off: the rest is RocksDB's to answer.
            if !self.present.len().1 {
                break;
            }
            it.next();
        }
        it.status()?;
        let blobs = self.present.len().0;
        tracing::info!("{blobs} present blobs indexed in memory in {:.1?}", started.elapsed());
        Ok(())
    }

    /// Which of `digests` are present (the empty blob always is): asked of
    /// the in-memory set, then in one batched RocksDB lookup for those it
    /// cannot answer. Present blobs count as used.
    pub fn contains(&self, digests: &[Digest]) -> Result<Vec<bool>, Error> {
        let mut present = Vec::with_capacity(digests.len());
        let mut unknown = Vec::new();
        for (i, d) in digests.iter().enumerate() {
            let known = if d.is_empty_blob() { Some(true) } else { self.present.lookup(d) };
            if known.is_none() {
                unknown.push(i);
            }
            present.push(known.unwrap_or(false));
        }
        if !unknown.is_empty() {
            let keys: Vec<Key> = unknown.iter().map(|&i| index_key(&digests[i])).collect();
            let found = self.db.batched_multi_get_cf(self.cf(CF_INDEX), &keys, false);
            for (&i, result) in unknown.iter().zip(found) {
                present[i] = result?.is_some();
            }
        }
        self.touch(digests.iter().zip(&present).filter(|(_, p)| **p).map(|(d, _)| *d));
        Ok(present)
    }

    /// The stored blob of `function` whose hash is `hash`, whatever its size
    /// (Bazel's HTTP cache names blobs by hash alone). The empty blob is
    /// always found. Does not count as a use: reading it does.
    pub fn find_by_hash(&self, function: Function, hash: &[u8]) -> Result<Option<Digest>, Error> {
        if let Some(empty) = Digest::new(function, hash, 0).filter(Digest::is_empty_blob) {
            return Ok(Some(empty));
        }
        let mut prefix = vec![function as u8];
        prefix.extend_from_slice(hash);
        let mut it = self.db.raw_iterator_cf(self.cf(CF_INDEX));
        it.seek(&prefix);
        it.status()?;
        Ok(it.key().filter(|k| k.starts_with(&prefix)).and_then(digest_of_index_key))
    }

    /// Finds a blob for reading; `None` if absent. Counts as a use.
    pub fn locate(&self, digest: &Digest) -> Result<Option<Blob>, Error> {
        if digest.is_empty_blob() {
            return Ok(Some(Blob { digest: *digest, blob_id: 0 }));
        }
        let entry = self.get_entry(digest)?;
        if entry.is_some() {
            self.touch([*digest]);
        }
        Ok(entry.map(|e| Blob { digest: *digest, blob_id: e.blob_id }))
    }

    /// Removes a blob found corrupt on disk, so that it is never served and
    /// clients upload it again: the error says NOT_FOUND either way. Only
    /// the copy found corrupt goes: a blob stored again since is kept.
    pub fn remove_corrupt(&self, blob: &Blob, detail: String) -> Error {
        let digest = &blob.digest;
        tracing::warn!(digest = %digest, "removing a corrupt blob: {detail}");
        let removed = (|| -> Result<bool, Error> {
            // A list releases its chunks: their stripes are taken with its own.
            let refs = match self.get_entry(digest)?.filter(|e| e.form.is_list()) {
                Some(entry) => self.refs_of(entry.blob_id)?,
                None => Vec::new(),
            };
            let _guards = self.lock_stripes(refs.iter().map(|(_, d, _)| d).chain([digest]));
            let Some(entry) = self.get_entry(digest)?.filter(|e| e.blob_id == blob.blob_id) else {
                return Ok(false);
            };
            let mut batch = WriteBatch::default();
            let mut holds = Holds::default();
            let file = self.delete_blob(&mut batch, &mut holds, digest, &entry)?;
            self.write_holds(&mut batch, holds);
            // Nothing left to copy to the object store.
            let queued = self.unqueue(&mut batch, &queue_blob_key(digest))?;
            self.write_deleting(batch, file.as_slice())?;
            self.count_queued(-i64::from(queued.is_some()), -(queued.map_or(0, |v| v.bytes) as i64));
            Ok(true)
        })();
        match removed {
            Ok(true) => {
                self.totals.corrupt_blobs.fetch_add(1, Ordering::Relaxed);
                Error::Removed(format!(
                    "blob {digest} was corrupt on disk ({detail}) and has been removed: upload it again"
                ))
            }
            Ok(false) => Error::Vanished(format!("blob {digest} was corrupt on disk ({detail}) and is gone")),
            Err(e) => {
                tracing::warn!(digest = %digest, "could not remove the corrupt blob: {e}");
                Error::Vanished(format!(
                    "blob {digest} is corrupt on disk ({detail}); removing it failed: {e}"
                ))
            }
        }
    }

    /// Adds the deletion of a blob (index entry, eviction order, chunks,
    /// counters) to `batch`; a list releases its chunks into `holds` (the
    /// caller holds their stripes). Returns the blob id of its file, if it
    /// has one, to delete once the batch is written (see
    /// [`Store::write_deleting`]).
    pub(super) fn delete_blob(
        &self,
        batch: &mut WriteBatch,
        holds: &mut Holds,
        digest: &Digest,
        entry: &IndexEntry,
    ) -> Result<Option<u64>, Error> {
        if entry.form.is_list() {
            self.release(holds, &self.refs_of(entry.blob_id)?)?;
        }
        holds.forget(digest);
        // Out of the set before the index: never present there and gone here.
        self.present.remove(digest);
        batch.delete_cf(self.cf(CF_INDEX), index_key(digest));
        if entry.holders == 0 {
            batch.delete_cf(self.cf(CF_LRU), lru_key(entry.atime, digest));
        }
        batch.delete_range_cf(
            self.cf(CF_CHUNKS),
            chunk_key(entry.blob_id, 0),
            chunk_key(entry.blob_id + 1, 0),
        );
        self.count_stored(batch, -(entry.stored as i64));
        self.count_blobs(batch, -1, -(digest.size as i64));
        Ok((self.has_file(digest.size) && !entry.form.is_list()).then_some(entry.blob_id))
    }

    /// Stores whole blobs (a BatchUpdateBlobs): verifies each against its
    /// digest, then makes all new ones visible in one atomic write.
    pub fn put_blobs(&self, blobs: &[NewBlob]) -> Vec<Result<Written, Error>> {
        self.put_blobs_queued(blobs, self.queues())
    }

    /// Stores whole blobs copied in from the object store tier, as
    /// [`Store::put_blobs`] does, except that they are not queued for it.
    pub fn put_copies(&self, blobs: &[NewBlob]) -> Vec<Result<Written, Error>> {
        self.put_blobs_queued(blobs, false)
    }

    fn put_blobs_queued(&self, blobs: &[NewBlob], queue: bool) -> Vec<Result<Written, Error>> {
        let mut results: Vec<Result<Written, Error>> = blobs
            .iter()
            .map(|NewBlob { digest, data, .. }| {
                let actual = digest.function.digest(data);
                if actual == *digest {
                    Ok(Written::Stored)
                } else {
                    Err(Error::DigestMismatch(Box::new(Mismatch { expected: *digest, actual })))
                }
            })
            .collect();
        if let Err(e) = self.store_verified(blobs, &mut results, queue) {
            let message = e.to_string();
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(match e {
                    Error::Full { estimate, limit } => Error::Full { estimate, limit },
                    Error::TooLarge { bytes, limit } => Error::TooLarge { bytes, limit },
                    Error::QueueFull { queued, limit } => Error::QueueFull { queued, limit },
                    _ => Error::Batch(message.clone()),
                });
            }
        }
        results
    }

    fn store_verified(
        &self,
        blobs: &[NewBlob],
        results: &mut [Result<Written, Error>],
        queue: bool,
    ) -> Result<(), Error> {
        // Candidates: verified, not the empty blob, first occurrence of their digest.
        let mut seen = HashSet::new();
        let mut candidates = Vec::new();
        for (i, NewBlob { digest, .. }) in blobs.iter().enumerate() {
            if results[i].is_err() {
                continue;
            }
            if digest.is_empty_blob() || !seen.insert(*digest) {
                results[i] = Ok(Written::AlreadyPresent);
            } else {
                candidates.push(i);
            }
        }
        let digests: Vec<Digest> = candidates.iter().map(|&i| blobs[i].digest).collect();
        let present = self.contains(&digests)?;
        let candidates: Vec<usize> = candidates
            .into_iter()
            .zip(present)
            .filter_map(|(i, there)| {
                if there {
                    results[i] = Ok(Written::AlreadyPresent);
                }
                (!there).then_some(i)
            })
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let bytes = candidates.iter().map(|&i| self.room_for(blobs[i].digest.size)).sum();
        if queue {
            self.admit_queued(candidates.iter().map(|&i| blobs[i].digest.size).sum())?;
        }
        let mut admitted = self.admit(bytes)?;
        // Blob files written for this batch: deleted again unless the batch
        // makes them a stored blob's.
        let mut filed = Vec::new();
        let stored = self.store_prepared(blobs, &candidates, results, &mut admitted, &mut filed, queue);
        let kept: HashSet<u64> =
            stored.as_ref().map_or_else(|_| HashSet::new(), |ids| ids.iter().copied().collect());
        for id in filed.iter().filter(|id| !kept.contains(id)) {
            if let Err(e) = self.files.remove(*id) {
                tracing::warn!("cannot delete the file of blob id {id}: {e}");
            }
        }
        stored.map(|_| ())
    }

    /// Encodes the candidates (outside the locks), writes those of at least
    /// one chunk to files of their own (listed in `filed`), and makes every
    /// one that no other writer stored meanwhile visible in one batch.
    /// Returns the blob ids it stored.
    fn store_prepared(
        &self,
        blobs: &[NewBlob],
        candidates: &[usize],
        results: &mut [Result<Written, Error>],
        admitted: &mut Admitted<'_>,
        filed: &mut Vec<u64>,
        queue: bool,
    ) -> Result<Vec<u64>, Error> {
        let now = now_ms();
        let mut prepared = Vec::with_capacity(candidates.len());
        for &i in candidates {
            let NewBlob { digest, data, frames, stored: copied } = &blobs[i];
            let blob_id = self.allocate_blob_id();
            let mut file = match self.has_file(digest.size) {
                true => {
                    filed.push(blob_id);
                    Some(self.files.writer(blob_id, 0).map_err(|e| self.file_error(e))?)
                }
                false => None,
            };
            let (chunk_size, level) = (self.options.chunk_size, self.options.zstd_level);
            // A copy of a blob of one chunk keeps the chunk its writer stored.
            if let Some(value) = copied.as_ref().filter(|_| file.is_none() && data.len() <= chunk_size) {
                admitted.release(self.room_for(digest.size).saturating_sub(value.len() as u64));
                let entry = IndexEntry::whole(blob_id, value.len() as u64, now);
                prepared.push((i, *digest, entry, vec![(chunk_key(blob_id, 0), value.clone())]));
                continue;
            }
            let (mut chunks, mut stored, mut offset) = (Vec::new(), 0, 0);
            let mut emit = |part: &[u8], frame: Option<&[u8]>| -> Result<(), Error> {
                let mut value = match frame {
                    Some(frame) => chunk::encode_frame(frame, part, level),
                    None => chunk::encode(part, level),
                };
                stored += value.len() as u64;
                if let Some(file) = &mut file {
                    let at = file.append(&self.files, &value).map_err(|e| self.file_error(e))?;
                    value = chunk::file_ref(at, value.len());
                }
                chunks.push((chunk_key(blob_id, offset), Bytes::from(value)));
                offset += part.len() as u64;
                Ok(())
            };
            // A batch keeps only frames that hold a whole chunk: its chunks
            // stay `chunk_size` apart, as they always have.
            let mut chunker = chunk::Chunker::new(chunk_size, chunk_size);
            let mut at = 0;
            for (range, frame) in frames {
                let (start, end) = (range.start as usize, range.end as usize);
                if start < at || start > end || end > data.len() {
                    continue; // not in order: its bytes go unframed
                }
                chunker.unframed(&data[at..start], &mut emit)?;
                chunker.frame_bytes(frame);
                chunker.data(&data[start..end], true, &mut emit)?;
                chunker.frame_end(end == data.len(), &mut emit)?;
                at = end;
            }
            chunker.unframed(&data[at..], &mut emit)?;
            chunker.flush(&mut emit)?;
            match file {
                Some(file) => {
                    // The index entry must never point at bytes a crash could lose.
                    file.sync().map_err(|e| self.file_error(e))?;
                    admitted.release(self.room_for(digest.size));
                }
                None => admitted.release(self.room_for(digest.size).saturating_sub(stored)),
            }
            let entry = IndexEntry::whole(blob_id, stored, now);
            prepared.push((i, *digest, entry, chunks));
        }
        let _guards = self.lock_stripes(prepared.iter().map(|(_, d, _, _)| d));
        // Sized for the chunks, so that it is not copied as it grows (an
        // index entry and a queue entry per blob are well under 256 bytes).
        let bytes: usize =
            prepared.iter().flat_map(|(_, _, _, c)| c).map(|(k, v)| k.len() + v.len() + 8).sum();
        let mut batch = WriteBatch::with_capacity_bytes(bytes + 256 * prepared.len());
        let (mut queued, mut queued_bytes) = (0, 0);
        let mut ids = Vec::with_capacity(prepared.len());
        let mut entered = Vec::with_capacity(prepared.len());
        for (i, digest, entry, chunks) in prepared {
            // Another writer may have stored it since the check above, or
            // the set lacks it (see `Present::insert`).
            if let Some(stored) = self.get_entry(&digest)? {
                entered.push((digest, stored.blob_id));
                results[i] = Ok(Written::AlreadyPresent);
                continue;
            }
            entered.push((digest, entry.blob_id));
            for (key, value) in chunks {
                batch.put_cf(self.cf(CF_CHUNKS), key, value);
            }
            self.add_entry(&mut batch, &digest, &entry);
            self.count_stored(&mut batch, entry.stored as i64);
            if queue {
                self.queue_blob(&mut batch, &digest);
                (queued, queued_bytes) = (queued + 1, queued_bytes + digest.size as i64);
            }
            ids.push(entry.blob_id);
        }
        self.write(batch)?;
        // Still under the stripes' locks, so no eviction comes between.
        for (digest, blob_id) in &entered {
            self.present.insert(digest, *blob_id);
        }
        self.count_queued(queued, queued_bytes);
        Ok(ids)
    }

    /// Whether a blob of `size` bytes is kept in a file of its own.
    pub(super) fn has_file(&self, size: u64) -> bool {
        size >= files::MIN_SIZE
    }

    /// Adds a new index entry to `batch`, with its place in the eviction
    /// order, and counts the blob.
    pub(super) fn add_entry(&self, batch: &mut WriteBatch, digest: &Digest, entry: &IndexEntry) {
        batch.put_cf(self.cf(CF_INDEX), index_key(digest), entry.encode());
        batch.put_cf(self.cf(CF_LRU), lru_key(entry.atime, digest), []);
        self.count_blobs(batch, 1, digest.size as i64);
    }

    /// Adds a change of the blob counters to `batch`.
    pub(super) fn count_blobs(&self, batch: &mut WriteBatch, blobs: i64, bytes: i64) {
        batch.merge_cf(self.cf(CF_CHUNKS), BLOBS_KEY, usage_delta(blobs));
        batch.merge_cf(self.cf(CF_CHUNKS), LOGICAL_KEY, usage_delta(bytes));
    }

    /// Writes access times recorded since the last call into the index and
    /// the eviction order, one batch per lock stripe, except those that come
    /// within [`StoreOptions::use_resolution`](super::StoreOptions) of the
    /// use already written. A crash may lose the last interval's refreshes,
    /// nothing else.
    pub fn flush_access_times(&self) -> Result<usize, Error> {
        Ok(self.flush_access_times_while(&|| true)?.updated)
    }

    /// As [`Store::flush_access_times`], while `go_on` says so (it is asked
    /// before each stripe): what is left goes back to memory, for the next
    /// flush. A stop bounds its last flush this way: a refresh not written
    /// leaves a blob looking as old as its last written use, no worse than
    /// a crash.
    pub fn flush_access_times_while(&self, go_on: &dyn Fn() -> bool) -> Result<Flushed, Error> {
        let mut by_stripe: Vec<Vec<(Key, Digest, u64)>> = vec![Vec::new(); STRIPES];
        {
            let mut accessed = self.accessed.blobs.lock().unwrap_or_else(|e| e.into_inner());
            for (digest, atime) in accessed.drain() {
                by_stripe[stripe_of(&digest)].push((index_key(&digest), digest, atime));
            }
        }
        let mut flushed = Flushed::default();
        for (stripe, mut accessed) in by_stripe.into_iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            if !go_on() {
                flushed.left += accessed.len();
                let mut pending = self.accessed.blobs.lock().unwrap_or_else(|e| e.into_inner());
                for (_, digest, atime) in accessed {
                    let newest = pending.entry(digest).or_insert(atime);
                    *newest = (*newest).max(atime);
                }
                continue;
            }
            // One sorted lookup of the stripe's entries, under its lock, so
            // that an eviction cannot slip between read and write.
            accessed.sort_unstable_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
            let _guard = self.stripes[stripe].lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<&Key> = accessed.iter().map(|(key, _, _)| key).collect();
            let found = self.db.batched_multi_get_cf(self.cf(CF_INDEX), keys, true);
            let mut batch = WriteBatch::default();
            for ((key, digest, atime), stored) in accessed.iter().zip(found) {
                let Some(stored) = stored? else { continue };
                let mut entry = IndexEntry::decode(&stored)
                    .ok_or_else(|| Error::Corrupt(format!("index entry of {digest} is malformed")))?;
                if entry.atime.saturating_add(self.use_resolution_ms()) < *atime {
                    // A held blob has no place in the eviction order.
                    if entry.holders == 0 {
                        batch.delete_cf(self.cf(CF_LRU), lru_key(entry.atime, digest));
                        batch.put_cf(self.cf(CF_LRU), lru_key(*atime, digest), []);
                    }
                    entry.atime = *atime;
                    batch.put_cf(self.cf(CF_INDEX), key, entry.encode());
                    flushed.updated += 1;
                }
            }
            self.write(batch)?;
        }
        flushed.updated += self.flush_result_access_times()?;
        Ok(flushed)
    }
}
