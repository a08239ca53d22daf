//! Streamed uploads. Each chunk is persisted as it arrives, together with the
//! upload's progress, in one atomic write: after a broken stream or a crash
//! the upload resumes at its committed size. The chunks are written once,
//! under the blob id they keep; finishing writes only the index entry.
//!
//! An upload reserves room for all of its bytes when it starts (see
//! [`Store::reserve`]): one the disk cannot take is refused before it sends
//! anything, and concurrent uploads can never overshoot the budget together.
//!
//! A blob of at least 256 KiB is written to a file of its own (see
//! `files`), and only references to its chunks go through RocksDB and its
//! WAL, with the progress: the bytes are written once. A crash after a
//! chunk reached the file but before its reference did leaves bytes past the
//! committed end, which resuming cuts off. Finishing syncs the file before the
//! index entry can point at it.
//!
//! An upload of at least `dedup_min_size` bytes is cut into content-defined
//! chunks instead (see `layout`, "Lists"): each chunk is stored as a blob of
//! its own unless it is stored already, and held by the upload; the upload
//! keeps references to them, and becomes a list when it finishes. The bytes
//! after the last cut wait in memory (at most the largest chunk and a piece)
//! until the next cut, or until the stream ends, which cuts them all: what
//! a resuming client finds committed is every byte it sent, as before.

use std::sync::Arc;
use std::time::Duration;

use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use super::files::Writer;
use super::layout::{
    CF_CHUNKS, CF_INDEX, CF_UPLOADS, Form, IndexEntry, PROGRESS_OFFSET, UploadProgress, UploadRecord,
    chunk_key, index_key,
};
use super::lists::Holds;
use super::{Error, Mismatch, Store, Written, chunk, now_ms, now_secs};
use crate::cdc::Pass;
use crate::digest::{Digest, Hasher};

/// An upload being written by one stream.
pub struct Upload {
    store: Arc<Store>,
    resource: String,
    digest: Digest,
    pub(super) record: UploadRecord,
    /// Whether the record is on disk yet (it is written with the first chunk).
    recorded: bool,
    progress: UploadProgress,
    /// The hash of the bytes so far; `None` for an upload that resumed,
    /// which hashes all of its bytes once, as it finishes (a resumable HTTP
    /// session resumes at every chunk: hashing the committed prefix each
    /// time would make it quadratic).
    hasher: Option<Hasher>,
    /// Whether the finished blob is queued for the object store tier (a
    /// client's write is; a copy from the object store is not).
    queue: bool,
    /// Where the chunks of a blob with a file of its own go.
    file: Option<Writer>,
    /// Bytes still reserved for the rest of the upload.
    reserved: u64,
    /// Cuts a large blob into chunks stored once.
    cutter: Option<Cutter>,
}

/// Cuts an upload into content-defined chunks as its bytes arrive.
struct Cutter {
    pass: Pass,
    /// The bytes a cut needs to see ahead of it.
    window: usize,
    /// Bytes not cut yet, from `start`.
    pending: Vec<u8>,
    start: usize,
    /// Whether every cut so far is where one pass over the whole blob cuts:
    /// then SplitBlob can answer the list as it is.
    exact: bool,
}

impl Cutter {
    fn new(exact: bool) -> Cutter {
        let chunking = Store::chunking();
        Cutter { pass: chunking.pass(), window: chunking.window(), pending: Vec::new(), start: 0, exact }
    }

    fn uncut(&self) -> &[u8] {
        &self.pending[self.start..]
    }
}

/// A chunk written as a blob of its own, not visible yet.
struct Prepared {
    blob_id: u64,
    values: Vec<([u8; 16], Vec<u8>)>,
    stored: u64,
    /// Bytes of its values that go through RocksDB (the rest are in its file).
    in_db: u64,
}

impl Store {
    /// Starts the upload under `resource` (at offset 0, discarding any earlier
    /// attempt) or resumes it (at its committed size). Only one stream may
    /// write an upload at a time.
    pub fn begin_upload(
        self: &Arc<Self>,
        resource: &str,
        digest: Digest,
        offset: u64,
    ) -> Result<Upload, Error> {
        let queue = self.queues();
        if queue {
            self.admit_queued(digest.size)?;
        }
        self.begin(resource, digest, offset, queue)
    }

    /// Starts an upload of a blob copied in from the object store tier
    /// (which holds it already: it is not queued).
    pub fn begin_copy(self: &Arc<Self>, resource: &str, digest: Digest) -> Result<Upload, Error> {
        self.begin(resource, digest, 0, false)
    }

    fn begin(
        self: &Arc<Self>,
        resource: &str,
        digest: Digest,
        offset: u64,
        queue: bool,
    ) -> Result<Upload, Error> {
        {
            let mut active = self.active_uploads.lock().unwrap_or_else(|e| e.into_inner());
            if !active.insert(resource.to_string()) {
                return Err(Error::UploadBusy(resource.to_string()));
            }
        }
        // From here on, dropping `upload` releases the resource name.
        let mut upload = Upload {
            store: Arc::clone(self),
            resource: resource.to_string(),
            digest,
            record: UploadRecord { blob_id: 0, created: now_secs() },
            recorded: false,
            progress: UploadProgress::default(),
            hasher: Some(Hasher::new(digest.function)),
            queue,
            file: None,
            reserved: 0,
            cutter: None,
        };
        match self.upload_state(resource)? {
            Some((record, progress)) if offset == progress.committed && offset > 0 => {
                (upload.record, upload.progress, upload.recorded) = (record, progress, true);
                upload.hasher = None;
            }
            Some((record, progress)) if offset == 0 => {
                self.discard_upload(resource, record.blob_id, progress.stored)?;
                upload.record.blob_id = self.allocate_blob_id();
            }
            None if offset == 0 => upload.record.blob_id = self.allocate_blob_id(),
            state => {
                return Err(Error::BadOffset {
                    resource: resource.to_string(),
                    offset,
                    committed: state.map_or(0, |(_, p)| p.committed),
                });
            }
        }
        let room = self.room_for(digest.size - upload.progress.committed.min(digest.size));
        self.reserve(room)?;
        upload.reserved = room;
        // An upload resumes as it began: cut, or whole (the size threshold
        // may have changed since).
        let cut = match upload.progress.committed {
            0 => self.options.dedup_min_size > 0 && digest.size >= self.options.dedup_min_size,
            _ => !self.refs_of(upload.record.blob_id)?.is_empty(),
        };
        if cut {
            // A pass resumed mid-blob does not cut where one whole pass does.
            upload.cutter = Some(Cutter::new(upload.progress.committed == 0));
        } else if self.has_file(digest.size) {
            let end = self.file_end(upload.record.blob_id)?;
            upload.file =
                Some(self.files.writer(upload.record.blob_id, end).map_err(|e| self.file_error(e))?);
        }
        Ok(upload)
    }

    /// The end of the last chunk an upload has in its file: where the next
    /// one goes (0 for a new upload).
    fn file_end(&self, blob_id: u64) -> Result<u64, Error> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(chunk_key(blob_id, PROGRESS_OFFSET));
        let mut end = 0;
        for item in self.db.iterator_cf_opt(
            self.cf(CF_CHUNKS),
            opts,
            rocksdb::IteratorMode::From(&chunk_key(blob_id, 0), rocksdb::Direction::Forward),
        ) {
            let (_, value) = item?;
            if let Some((pos, len)) = chunk::file_ref_of(&value) {
                end = end.max(pos + len as u64);
            }
        }
        Ok(end)
    }

    /// Whether a stream is writing the upload under `resource` right now.
    pub fn upload_active(&self, resource: &str) -> bool {
        self.active_uploads.lock().unwrap_or_else(|e| e.into_inner()).contains(resource)
    }

    /// Committed bytes of the partial upload under `resource`, if there is one.
    pub fn upload_committed(&self, resource: &str) -> Result<Option<u64>, Error> {
        Ok(self.upload_state(resource)?.map(|(_, p)| p.committed))
    }

    fn upload_state(&self, resource: &str) -> Result<Option<(UploadRecord, UploadProgress)>, Error> {
        let Some(v) = self.db.get_pinned_cf(self.cf(CF_UPLOADS), resource.as_bytes())? else {
            return Ok(None);
        };
        let record = UploadRecord::decode(&v)
            .ok_or_else(|| Error::Corrupt(format!("upload record of {resource:?} is malformed")))?;
        // No progress: a crash took the upload's first chunks with it.
        let progress =
            match self.db.get_pinned_cf(self.cf(CF_CHUNKS), chunk_key(record.blob_id, PROGRESS_OFFSET))? {
                None => UploadProgress::default(),
                Some(v) => UploadProgress::decode(&v)
                    .ok_or_else(|| Error::Corrupt(format!("upload progress of {resource:?} is malformed")))?,
            };
        Ok(Some((record, progress)))
    }

    /// Adds the deletion of an upload (its record, progress and chunks, which
    /// take `stored` bytes) to `batch`.
    fn delete_upload(&self, batch: &mut WriteBatch, resource: &str, blob_id: u64, stored: u64) {
        batch.delete_cf(self.cf(CF_UPLOADS), resource.as_bytes());
        batch.delete_range_cf(self.cf(CF_CHUNKS), chunk_key(blob_id, 0), chunk_key(blob_id + 1, 0));
        self.count_stored(batch, -(stored as i64));
    }

    /// Deletes an upload and everything it wrote, releasing the chunks it
    /// holds.
    fn discard_upload(&self, resource: &str, blob_id: u64, stored: u64) -> Result<(), Error> {
        let refs = self.refs_of(blob_id)?;
        let _guards = self.lock_stripes(refs.iter().map(|(_, d, _)| d));
        self.drop_upload(resource, blob_id, stored, &refs)
    }

    /// [`Store::discard_upload`] with the stripes of `refs`, the upload's
    /// references, taken.
    fn drop_upload(
        &self,
        resource: &str,
        blob_id: u64,
        stored: u64,
        refs: &[(u64, Digest, u64)],
    ) -> Result<(), Error> {
        let (mut batch, mut holds) = (WriteBatch::default(), Holds::default());
        self.release(&mut holds, refs)?;
        self.write_holds(&mut batch, holds);
        self.delete_upload(&mut batch, resource, blob_id, stored);
        self.write_deleting(batch, &[blob_id])
    }

    /// Deletes partial uploads not written to for `max_age`, except those a
    /// stream is writing now. Returns how many were deleted.
    pub fn expire_uploads(&self, max_age: Duration) -> Result<usize, Error> {
        let cutoff = now_secs().saturating_sub(max_age.as_secs());
        let mut stale = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_UPLOADS), IteratorMode::Start) {
            let (key, _) = item?;
            let resource = String::from_utf8_lossy(&key).into_owned();
            match self.upload_state(&resource) {
                Ok(Some((record, progress))) if record.created.max(progress.updated) > cutoff => {}
                Ok(state) => stale.push((resource, state.map(|(r, p)| (r.blob_id, p.stored)))),
                Err(_) => stale.push((resource, None)),
            }
        }
        // Held throughout, so that no stream starts on an upload being deleted.
        let active = self.active_uploads.lock().unwrap_or_else(|e| e.into_inner());
        let mut deleted = 0;
        for (resource, blob_id) in stale.iter().filter(|(r, _)| !active.contains(r)) {
            match blob_id {
                Some((id, stored)) => self.discard_upload(resource, *id, *stored)?,
                None => self.db.delete_cf(self.cf(CF_UPLOADS), resource.as_bytes())?,
            }
            deleted += 1;
        }
        Ok(deleted)
    }
}

impl Upload {
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Uncompressed bytes persisted so far.
    pub fn committed(&self) -> u64 {
        self.progress.committed
    }

    /// The hash of every committed byte, read back: how a resumed upload is
    /// verified over all of its bytes.
    fn hash_committed(&self) -> Result<Digest, Error> {
        let mut hasher = Hasher::new(self.digest.function);
        let mut offset = 0;
        while offset < self.progress.committed {
            let (start, value) =
                self.store.chunk_at(self.record.blob_id, offset)?.filter(|(s, _)| *s == offset).ok_or_else(
                    || Error::Corrupt(format!("upload {:?} has no chunk at {offset}", self.resource)),
                )?;
            let data = chunk::decode(&value).ok_or_else(|| {
                Error::Corrupt(format!("upload {:?} has a corrupt chunk at {start}", self.resource))
            })?;
            hasher.update(&data);
            offset += data.len() as u64;
        }
        Ok(hasher.finish())
    }

    /// Persists `data` as the next chunk. `frame`, if given, is the client's
    /// zstd frame that decodes to exactly `data`: stored as it is instead of
    /// compressing `data` again. Blocks on compression and disk.
    pub fn append(&mut self, data: &[u8], frame: Option<&[u8]>) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        if self.cutter.is_some() {
            return self.cut(data, false);
        }
        let level = self.store.options.zstd_level;
        let value = match frame {
            Some(frame) => chunk::encode_frame(frame, data, level),
            None => chunk::encode(data, level),
        };
        self.persist(data, value)
    }

    /// Persists `data` as the next chunk, as `value`: a chunk another tier
    /// encoded, which the caller has decoded to `data` (so it is checked).
    pub fn append_encoded(&mut self, data: &[u8], value: Vec<u8>) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        if self.cutter.is_some() {
            return self.cut(data, false);
        }
        self.persist(data, value)
    }

    /// Bytes taken so far: committed, and waiting for a cut.
    pub fn received(&self) -> u64 {
        self.progress.committed + self.cutter.as_ref().map_or(0, |c| c.uncut().len() as u64)
    }

    /// Commits every byte taken (cutting what waits for a cut): what a
    /// client that resumes finds committed. A cut forced before the end of
    /// the blob is not where a whole pass cuts.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.cutter.as_ref().is_some_and(|c| !c.uncut().is_empty()) {
            self.cut(&[], true)?;
        }
        Ok(())
    }

    /// Takes `data` into the cutter, and stores every chunk it can cut:
    /// those with a window of bytes after their start, or all if `all`.
    fn cut(&mut self, data: &[u8], all: bool) -> Result<(), Error> {
        let mut cutter = self.cutter.take().expect("a cutting upload");
        cutter.pending.extend_from_slice(data);
        let ends_blob = self.received_with(&cutter) == self.digest.size;
        let mut result = Ok(());
        while !cutter.uncut().is_empty() && (all || cutter.uncut().len() >= cutter.window) {
            let n = cutter.pass.cut(&cutter.pending[cutter.start..]);
            result = self.store_chunk(&cutter.pending[cutter.start..cutter.start + n]);
            if result.is_err() {
                break;
            }
            cutter.start += n;
        }
        if all && !ends_blob && result.is_ok() {
            cutter.exact = false;
            cutter.pass = Store::chunking().pass();
        }
        // Cut bytes go once they are a window's worth: each byte moves at
        // most once or twice.
        if cutter.start >= cutter.window || cutter.start == cutter.pending.len() {
            cutter.pending.drain(..cutter.start);
            cutter.start = 0;
        }
        self.cutter = Some(cutter);
        result
    }

    fn received_with(&self, cutter: &Cutter) -> u64 {
        self.progress.committed + cutter.uncut().len() as u64
    }

    /// Stores one cut chunk as a blob of its own, unless it is stored
    /// already, takes a hold on it, and commits the reference to it.
    fn store_chunk(&mut self, data: &[u8]) -> Result<(), Error> {
        let store = Arc::clone(&self.store);
        let digest = self.digest.function.digest(data);
        // Written outside the lock, where it is not stored yet.
        let mut prepared = match store.get_entry(&digest)? {
            Some(_) => None,
            None => Some(self.prepare(&digest, data)?),
        };
        let guard = store.stripe(&digest);
        let (mut batch, mut holds) = (WriteBatch::default(), Holds::default());
        let (chunk_id, new) = match store.hold(&mut holds, &digest)? {
            Some(entry) if entry.form.is_list() => {
                return Err(Error::Corrupt(format!("chunk {digest} is stored as a list")));
            }
            Some(entry) => (entry.blob_id, None),
            None => {
                // Evicted since the check: written under the lock (rare).
                let new = match prepared.take() {
                    Some(new) => new,
                    None => self.prepare(&digest, data)?,
                };
                for (key, value) in &new.values {
                    batch.put_cf(store.cf(CF_CHUNKS), key, value);
                }
                let entry = IndexEntry { holders: 1, ..IndexEntry::whole(new.blob_id, new.stored, now_ms()) };
                batch.put_cf(store.cf(CF_INDEX), index_key(&digest), entry.encode());
                store.count_blobs(&mut batch, 1, digest.size as i64);
                store.count_stored(&mut batch, new.stored as i64);
                (new.blob_id, Some(new))
            }
        };
        store.write_holds(&mut batch, holds);
        let value = chunk::blob_ref(&digest, chunk_id);
        let progress = UploadProgress {
            committed: self.progress.committed + data.len() as u64,
            stored: self.progress.stored + value.len() as u64,
            updated: now_secs(),
        };
        let in_db = value.len() as u64 + new.as_ref().map_or(0, |new| new.in_db);
        let used = value.len() as u64 + new.as_ref().map_or(0, |new| new.stored);
        batch.put_cf(store.cf(CF_CHUNKS), chunk_key(self.record.blob_id, self.progress.committed), value);
        batch.put_cf(store.cf(CF_CHUNKS), chunk_key(self.record.blob_id, PROGRESS_OFFSET), progress.encode());
        store.count_stored(&mut batch, progress.stored as i64 - self.progress.stored as i64);
        if !self.recorded {
            batch.put_cf(store.cf(CF_UPLOADS), self.resource.as_bytes(), self.record.encode());
        }
        let result = store.write(batch);
        if result.is_ok() {
            store.present.insert(&digest, chunk_id);
        }
        drop(guard);
        // A chunk written for nothing (stored meanwhile, or the write failed).
        let unused = new.filter(|_| result.is_err()).into_iter().chain(prepared);
        for id in unused.map(|p| p.blob_id) {
            if let Err(e) = store.files.remove(id) {
                tracing::warn!("cannot delete the file of blob id {id}: {e}");
            }
        }
        store.disk.written_since.fetch_add(in_db, std::sync::atomic::Ordering::Relaxed);
        let freed = used.min(self.reserved);
        store.unreserve(freed);
        self.reserved -= freed;
        result?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(data);
        }
        self.recorded = true;
        self.progress = progress;
        Ok(())
    }

    /// Encodes a chunk as a blob of its own (in a file of its own if it is
    /// large enough, synced: an index entry must never point at bytes a
    /// crash could lose).
    fn prepare(&mut self, digest: &Digest, data: &[u8]) -> Result<Prepared, Error> {
        let store = &self.store;
        let (chunk_size, level) = (store.options.chunk_size, store.options.zstd_level);
        let blob_id = store.allocate_blob_id();
        let mut file = match store.has_file(digest.size) {
            true => Some(store.files.writer(blob_id, 0).map_err(|e| store.file_error(e))?),
            false => None,
        };
        let mut prepared = Prepared { blob_id, values: Vec::new(), stored: 0, in_db: 0 };
        let written = (|| {
            for (i, part) in data.chunks(chunk_size).enumerate() {
                let mut value = chunk::encode(part, level);
                prepared.stored += value.len() as u64;
                if let Some(file) = &mut file {
                    let at = file.append(&store.files, &value).map_err(|e| store.file_error(e))?;
                    value = chunk::file_ref(at, value.len());
                }
                prepared.in_db += value.len() as u64;
                prepared.values.push((chunk_key(blob_id, (i * chunk_size) as u64), value));
            }
            match &file {
                Some(file) => file.sync().map_err(|e| store.file_error(e)),
                None => Ok(()),
            }
        })();
        if let Err(e) = written {
            let _ = store.files.remove(blob_id);
            return Err(e);
        }
        // The reservation covers the chunk's bytes; more than it is admitted
        // on its own.
        let wanted = prepared.stored + chunk::SEAL_LEN + 64;
        if wanted > self.reserved {
            if let Err(e) = store.reserve(wanted - self.reserved) {
                let _ = store.files.remove(blob_id);
                return Err(e);
            }
            self.reserved = wanted;
        }
        Ok(prepared)
    }

    fn persist(&mut self, data: &[u8], value: Vec<u8>) -> Result<(), Error> {
        let store = Arc::clone(&self.store);
        let stored = value.len() as u64;
        // The reservation covers every byte the declared size allows; a
        // chunk past it (a client sending more than it declared, which
        // finishing refuses) must be admitted on its own.
        if stored > self.reserved {
            store.reserve(stored - self.reserved)?;
            self.reserved = stored;
        }
        let value = match &mut self.file {
            Some(file) => {
                let at = file.append(&store.files, &value).map_err(|e| store.file_error(e))?;
                if store.options.sync_writes {
                    file.sync().map_err(|e| store.file_error(e))?;
                }
                chunk::file_ref(at, value.len())
            }
            None => value,
        };
        if let Some(hasher) = &mut self.hasher {
            hasher.update(data);
        }
        let progress = UploadProgress {
            committed: self.progress.committed + data.len() as u64,
            stored: self.progress.stored + stored,
            updated: now_secs(),
        };
        let blob_id = self.record.blob_id;
        let mut batch = WriteBatch::default();
        let written = value.len() as u64;
        batch.put_cf(store.cf(CF_CHUNKS), chunk_key(blob_id, self.progress.committed), value);
        batch.put_cf(store.cf(CF_CHUNKS), chunk_key(blob_id, PROGRESS_OFFSET), progress.encode());
        store.count_stored(&mut batch, stored as i64);
        if !self.recorded {
            batch.put_cf(store.cf(CF_UPLOADS), self.resource.as_bytes(), self.record.encode());
        }
        let result = store.write(batch);
        // What reached RocksDB is counted as written; what reached the file
        // is counted by the files already.
        store.disk.written_since.fetch_add(written, std::sync::atomic::Ordering::Relaxed);
        store.unreserve(stored);
        self.reserved -= stored;
        result?;
        self.recorded = true;
        self.progress = progress;
        Ok(())
    }

    /// Commits what waits for a cut, verifies the bytes against the digest
    /// and makes the blob visible in one atomic write. On a mismatch nothing
    /// becomes visible and the upload is deleted.
    pub fn finish(mut self) -> Result<Written, Error> {
        // Bytes waiting for a cut end the blob: they are its last chunks.
        self.flush()?;
        let actual = match &self.hasher {
            Some(hasher) => hasher.clone().finish(),
            None => self.hash_committed()?,
        };
        let store = &self.store;
        let blob_id = self.record.blob_id;
        if actual != self.digest {
            self.discard()?;
            return Err(Error::DigestMismatch(Box::new(Mismatch { expected: self.digest, actual })));
        }
        if let Some(file) = &self.file {
            // The index entry must never point at bytes a crash could lose.
            file.sync().map_err(|e| store.file_error(e))?;
        }
        // A list's chunks are held by the upload already; they stay held by
        // the list, or are released if another writer stored the blob.
        let refs = match self.cutter {
            Some(_) => store.refs_of(blob_id)?,
            None => Vec::new(),
        };
        let _guards = store.lock_stripes(refs.iter().map(|(_, d, _)| d).chain([&self.digest]));
        if let Some(stored) = store.get_entry(&self.digest)? {
            store.present.insert(&self.digest, stored.blob_id);
            store.drop_upload(&self.resource, blob_id, self.progress.stored, &refs)?;
            return Ok(Written::AlreadyPresent);
        }
        // The chunks stay where they are (and stay counted): only the record
        // and progress go.
        let mut batch = WriteBatch::default();
        batch.delete_cf(store.cf(CF_UPLOADS), self.resource.as_bytes());
        batch.delete_cf(store.cf(CF_CHUNKS), chunk_key(blob_id, PROGRESS_OFFSET));
        let form = match &self.cutter {
            None => Form::Whole,
            Some(cutter) if cutter.exact => Form::ListFastCdc,
            Some(_) => Form::List,
        };
        let entry = IndexEntry { form, ..IndexEntry::whole(blob_id, self.progress.stored, now_ms()) };
        store.add_entry(&mut batch, &self.digest, &entry);
        if self.queue {
            store.queue_blob(&mut batch, &self.digest);
        }
        store.write(batch)?;
        store.present.insert(&self.digest, blob_id);
        if self.queue {
            store.count_queued(1, self.digest.size as i64);
        }
        Ok(Written::Stored)
    }

    /// Deletes the upload and everything it wrote (a stream that broke a rule,
    /// or a blob that another writer stored meanwhile).
    pub fn discard(&self) -> Result<(), Error> {
        self.store.discard_upload(&self.resource, self.record.blob_id, self.progress.stored)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.store.unreserve(self.reserved);
        let mut active = self.store.active_uploads.lock().unwrap_or_else(|e| e.into_inner());
        active.remove(&self.resource);
    }
}
