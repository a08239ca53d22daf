//! Blobs kept as lists of other blobs (see `layout`, "Lists"): the holds a
//! list takes on its chunks, making a list of stored chunks (SpliceBlob, and
//! a blob SplitBlob cut), and what deleting a list releases.

use std::collections::HashMap;

use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use super::layout::*;
use super::{Error, Mismatch, Store, Written, chunk, now_ms};
use crate::cdc::Chunking;
use crate::digest::{Digest, Hasher};
use crate::proto::reapi::chunking_function::Value as Wire;

/// Index entries whose holder counts a write changes, with their counts
/// before it: written together, with their moves in the eviction order.
#[derive(Default)]
pub(super) struct Holds {
    changed: HashMap<Digest, (u32, IndexEntry)>,
}

impl Holds {
    /// Takes a hold on the blob `digest`, whose entry (as stored) is `entry`.
    fn take(&mut self, digest: Digest, entry: IndexEntry) {
        let (_, current) = self.changed.entry(digest).or_insert((entry.holders, entry));
        current.holders = current.holders.saturating_add(1);
    }

    /// Drops the change of a blob this write deletes.
    pub(super) fn forget(&mut self, digest: &Digest) {
        self.changed.remove(digest);
    }

    /// The blobs this write leaves with no holder that had one, with their
    /// entries.
    pub(super) fn released(&self) -> Vec<(Digest, IndexEntry)> {
        let released = self.changed.iter().filter(|(_, (before, e))| *before > 0 && e.holders == 0);
        released.map(|(d, (_, e))| (*d, *e)).collect()
    }

    /// The entry of `digest` as this write leaves it so far, if it changed.
    pub(super) fn get(&self, digest: &Digest) -> Option<IndexEntry> {
        self.changed.get(digest).map(|(_, e)| *e)
    }
}

/// What a splice did, or why the store cannot make the list itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Spliced {
    Done(Written),
    /// A chunk is not stored here (it may be in another tier).
    Absent(Digest),
    /// A chunk is a list itself: lists never hold lists.
    Nested(Digest),
    /// The blob is no larger than a chunk the store cuts: a list is kept
    /// only of larger blobs, so that no chunk the store cuts is a list.
    Small,
}

/// Where the chunks of a splice come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunks {
    /// A client named them: their bytes are hashed against the blob's
    /// digest before the list is made, and a stored blob is left as it is.
    Named,
    /// This server cut them from the stored blob itself (SplitBlob), each
    /// one's digest computed from the bytes it read, checked as it read
    /// them: the list is the blob by construction, and replaces it (its
    /// bytes are freed) without being hashed again.
    CutFromBlob,
}

impl Store {
    /// How the store cuts large uploads: FastCDC 2020 with the advertised
    /// parameters, which Bazel cuts with too.
    pub fn chunking() -> Chunking {
        Chunking::for_request(Wire::FastCdc2020 as i32)
    }

    /// The references of the list (or upload) stored under `blob_id`, in
    /// order: each chunk's offset in the list, digest and blob id. One that
    /// fails its check is left out: reading the list fails at its offset,
    /// and removes it.
    pub(super) fn refs_of(&self, blob_id: u64) -> Result<Vec<(u64, Digest, u64)>, Error> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(chunk_key(blob_id, 0));
        opts.set_iterate_upper_bound(chunk_key(blob_id, PROGRESS_OFFSET));
        let mut refs = Vec::new();
        for item in self.db.iterator_cf_opt(self.cf(CF_CHUNKS), opts, IteratorMode::Start) {
            let (key, value) = item?;
            if let (Some((_, offset)), Some((digest, id))) =
                (split_chunk_key(&key), chunk::blob_ref_of(&value))
            {
                refs.push((offset, digest, id));
            }
        }
        Ok(refs)
    }

    /// Whether `refs` cover `size` bytes back to back, from 0.
    pub(super) fn refs_cover(refs: &[(u64, Digest, u64)], size: u64) -> bool {
        let mut end = 0;
        for (offset, digest, _) in refs {
            if *offset != end {
                return false;
            }
            end += digest.size;
        }
        end == size
    }

    /// The chunks of a present list, and its form; `None` if the blob is
    /// absent or whole. Counts as a use.
    pub fn list_of(&self, digest: &Digest) -> Result<Option<(Form, Vec<Digest>)>, Error> {
        let Some(entry) = self.get_entry(digest)?.filter(|e| e.form.is_list()) else {
            return Ok(None);
        };
        let refs = self.refs_of(entry.blob_id)?;
        if !Store::refs_cover(&refs, digest.size) {
            let blob = super::Blob { digest: *digest, blob_id: entry.blob_id };
            return Err(self.remove_corrupt(&blob, "its references do not cover its bytes".into()));
        }
        self.touch([*digest]);
        Ok(Some((entry.form, refs.into_iter().map(|(_, d, _)| d).collect())))
    }

    /// Takes a hold on the present blob `digest` for a list being written
    /// (the caller holds its stripe). `None` if it is absent.
    pub(super) fn hold(&self, holds: &mut Holds, digest: &Digest) -> Result<Option<IndexEntry>, Error> {
        let entry = match holds.get(digest) {
            Some(entry) => entry,
            None => match self.get_entry(digest)? {
                Some(entry) => entry,
                None => return Ok(None),
            },
        };
        holds.take(*digest, entry);
        Ok(Some(entry))
    }

    /// Releases the holds of a list's (or an upload's) references (the
    /// caller holds their stripes). A chunk stored again under another id
    /// since, or gone, was not held by them: left alone.
    pub(super) fn release(&self, holds: &mut Holds, refs: &[(u64, Digest, u64)]) -> Result<(), Error> {
        for (_, digest, id) in refs {
            let entry = match holds.get(digest) {
                Some(entry) => Some(entry),
                None => self.get_entry(digest)?,
            };
            let Some(entry) = entry.filter(|e| e.blob_id == *id) else { continue };
            let (_, current) = holds.changed.entry(*digest).or_insert((entry.holders, entry));
            current.holders = current.holders.saturating_sub(1);
        }
        Ok(())
    }

    /// Adds the changed entries to `batch`: a blob that gained its first
    /// holder leaves the eviction order, one that lost its last returns to
    /// it at its own last use.
    pub(super) fn write_holds(&self, batch: &mut WriteBatch, holds: Holds) {
        for (digest, (before, entry)) in holds.changed {
            batch.put_cf(self.cf(CF_INDEX), index_key(&digest), entry.encode());
            match (before > 0, entry.holders > 0) {
                (false, true) => batch.delete_cf(self.cf(CF_LRU), lru_key(entry.atime, &digest)),
                (true, false) => batch.put_cf(self.cf(CF_LRU), lru_key(entry.atime, &digest), []),
                _ => {}
            }
        }
    }

    /// Makes `digest` a list of the stored `chunks`, in order: nothing is
    /// copied. Chunks a client [named](Chunks::Named) are hashed against the
    /// digest first; chunks [cut from the blob](Chunks::CutFromBlob) replace
    /// a whole blob stored already.
    pub fn splice(
        &self,
        digest: &Digest,
        chunks: &[Digest],
        form: Form,
        from: Chunks,
    ) -> Result<Spliced, Error> {
        if digest.size <= Store::chunking().window() as u64 {
            return Ok(Spliced::Small);
        }
        let replace = from == Chunks::CutFromBlob;
        let chunks: Vec<Digest> = chunks.iter().copied().filter(|c| !c.is_empty_blob()).collect();
        let total = chunks.iter().fold(0u64, |sum, c| sum.saturating_add(c.size));
        if replace && total != digest.size {
            return Err(Error::Corrupt(format!(
                "the chunks cut from {digest} hold {total} bytes, not {}",
                digest.size
            )));
        }
        let present = |entry: Option<IndexEntry>| entry.is_some_and(|e| !(replace && e.form == Form::Whole));
        let entry = self.get_entry(digest)?;
        // A list of the blob itself is the blob.
        if digest.is_empty_blob() || present(entry) || (entry.is_some() && chunks.contains(digest)) {
            return Ok(Spliced::Done(Written::AlreadyPresent));
        }
        if from == Chunks::Named {
            // Before anything is written, the chunks' bytes, in order, must
            // hash to the digest.
            if let Some(refused) = self.verify_chunks(digest, &chunks)? {
                return Ok(refused);
            }
        }
        let _guards = self.lock_stripes(chunks.iter().chain([digest]));
        let existing = self.get_entry(digest)?;
        if present(existing) {
            return Ok(Spliced::Done(Written::AlreadyPresent));
        }
        let blob_id = self.allocate_blob_id();
        let (mut batch, mut holds, mut offset, mut stored) = (WriteBatch::default(), Holds::default(), 0, 0);
        for chunk in &chunks {
            let Some(entry) = self.hold(&mut holds, chunk)? else { return Ok(Spliced::Absent(*chunk)) };
            if entry.form.is_list() {
                return Ok(Spliced::Nested(*chunk));
            }
            let value = chunk::blob_ref(chunk, entry.blob_id);
            stored += value.len() as u64;
            batch.put_cf(self.cf(CF_CHUNKS), chunk_key(blob_id, offset), value);
            offset += chunk.size;
        }
        let mut entry = IndexEntry { form, ..IndexEntry::whole(blob_id, stored, now_ms()) };
        let mut file = None;
        // A blob replaced keeps its use and its place in the queue.
        if let Some(old) = existing {
            file = self.delete_blob(&mut batch, &mut holds, digest, &old)?;
            entry.atime = old.atime;
        }
        self.write_holds(&mut batch, holds);
        let queue = existing.is_none() && self.queues();
        if queue {
            self.queue_blob(&mut batch, digest);
        }
        self.add_entry(&mut batch, digest, &entry);
        self.count_stored(&mut batch, stored as i64);
        self.write_deleting(batch, file.as_slice())?;
        self.present.insert(digest, entry.blob_id);
        if queue {
            self.count_queued(1, digest.size as i64);
        }
        Ok(Spliced::Done(Written::Stored))
    }
    /// Hashes the stored `chunks`, in order, against `digest`: `Some` of
    /// why a list cannot be made here (a chunk absent or a list), an error
    /// if they are not the blob.
    fn verify_chunks(&self, digest: &Digest, chunks: &[Digest]) -> Result<Option<Spliced>, Error> {
        let mut hasher = Hasher::new(digest.function);
        for chunk in chunks {
            let Some(blob) = self.locate(chunk)? else { return Ok(Some(Spliced::Absent(*chunk))) };
            if self.get_entry(chunk)?.is_some_and(|e| e.form.is_list()) {
                return Ok(Some(Spliced::Nested(*chunk)));
            }
            let mut offset = 0;
            while offset < chunk.size {
                let data = match self.read_at(&blob, offset) {
                    Ok(data) if !data.is_empty() => data,
                    Ok(_) | Err(Error::Vanished(_)) | Err(Error::Removed(_)) => {
                        return Ok(Some(Spliced::Absent(*chunk)));
                    }
                    Err(e) => return Err(e),
                };
                hasher.update(&data);
                offset += data.len() as u64;
            }
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(Error::DigestMismatch(Box::new(Mismatch { expected: *digest, actual })));
        }
        Ok(None)
    }
}
