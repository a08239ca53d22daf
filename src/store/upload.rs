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

use std::sync::Arc;
use std::time::Duration;

use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use super::files::Writer;
use super::layout::{
    CF_CHUNKS, CF_UPLOADS, IndexEntry, PROGRESS_OFFSET, UploadProgress, UploadRecord, chunk_key,
};
use super::{Error, Mismatch, Store, Written, chunk, now_ms, now_secs};
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
        };
        match self.upload_state(resource)? {
            Some((record, progress)) if offset == progress.committed && offset > 0 => {
                (upload.record, upload.progress, upload.recorded) = (record, progress, true);
                upload.hasher = None;
            }
            Some((record, progress)) if offset == 0 => {
                let mut batch = WriteBatch::default();
                self.delete_upload(&mut batch, resource, record.blob_id, progress.stored);
                self.write_deleting(batch, &[record.blob_id])?;
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
        if self.has_file(digest.size) {
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
        let active = self.active_uploads.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = WriteBatch::default();
        let mut ids = Vec::new();
        let mut deleted = 0;
        for (resource, blob_id) in stale.iter().filter(|(r, _)| !active.contains(r)) {
            match blob_id {
                Some((id, stored)) => {
                    self.delete_upload(&mut batch, resource, *id, *stored);
                    ids.push(*id);
                }
                None => batch.delete_cf(self.cf(CF_UPLOADS), resource.as_bytes()),
            }
            deleted += 1;
        }
        self.write_deleting(batch, &ids)?;
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
        self.persist(data, value)
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

    /// Verifies the bytes against the digest and makes the blob visible in one
    /// atomic write. On a mismatch nothing becomes visible and the upload is
    /// deleted.
    pub fn finish(self) -> Result<Written, Error> {
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
        let _guard = store.stripe(&self.digest);
        if store.get_entry(&self.digest)?.is_some() {
            self.discard()?;
            return Ok(Written::AlreadyPresent);
        }
        // The chunks stay where they are (and stay counted): only the record
        // and progress go.
        let mut batch = WriteBatch::default();
        batch.delete_cf(store.cf(CF_UPLOADS), self.resource.as_bytes());
        batch.delete_cf(store.cf(CF_CHUNKS), chunk_key(blob_id, PROGRESS_OFFSET));
        let entry = IndexEntry { blob_id, stored: self.progress.stored, atime: now_ms() };
        store.add_entry(&mut batch, &self.digest, &entry);
        if self.queue {
            store.queue_blob(&mut batch, &self.digest);
        }
        store.write(batch)?;
        if self.queue {
            store.count_queued(1, self.digest.size as i64);
        }
        Ok(Written::Stored)
    }

    /// Deletes the upload and everything it wrote (a stream that broke a rule,
    /// or a blob that another writer stored meanwhile).
    pub fn discard(&self) -> Result<(), Error> {
        let mut batch = WriteBatch::default();
        self.store.delete_upload(&mut batch, &self.resource, self.record.blob_id, self.progress.stored);
        self.store.write_deleting(batch, &[self.record.blob_id])
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.store.unreserve(self.reserved);
        let mut active = self.store.active_uploads.lock().unwrap_or_else(|e| e.into_inner());
        active.remove(&self.resource);
    }
}
