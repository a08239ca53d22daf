//! Streamed uploads. Each chunk is persisted as it arrives, together with the
//! upload's record, in one atomic write: after a broken stream or a crash the
//! upload resumes at its committed size. The chunks are written once, under
//! the blob id they keep; finishing only writes the index entry.

use std::sync::Arc;

use rocksdb::WriteBatch;

use super::layout::{
    CF_CHUNKS, CF_INDEX, CF_UPLOADS, IndexEntry, UploadRecord, chunk_key, index_key,
};
use super::{Error, Store, Written, chunk, now_secs};
use crate::digest::{Digest, Hasher};

/// An upload being written by one stream.
pub struct Upload {
    store: Arc<Store>,
    resource: String,
    digest: Digest,
    record: UploadRecord,
    hasher: Hasher,
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
        {
            let mut active = self
                .active_uploads
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !active.insert(resource.to_string()) {
                return Err(Error::UploadBusy(resource.to_string()));
            }
        }
        // From here on, dropping `upload` releases the resource name.
        let mut upload = Upload {
            store: Arc::clone(self),
            resource: resource.to_string(),
            digest,
            record: UploadRecord {
                blob_id: 0,
                committed: 0,
                stored: 0,
                updated: now_secs(),
            },
            hasher: Hasher::default(),
        };
        match self.upload_record(resource)? {
            Some(existing) if offset == existing.committed && offset > 0 => {
                upload.record = existing;
                upload.rehash()?;
            }
            Some(existing) if offset == 0 => {
                let mut batch = WriteBatch::default();
                self.delete_upload(&mut batch, resource, existing.blob_id);
                self.write(batch)?;
                upload.record.blob_id = self.allocate_blob_id();
            }
            None if offset == 0 => upload.record.blob_id = self.allocate_blob_id(),
            existing => {
                return Err(Error::BadOffset {
                    resource: resource.to_string(),
                    offset,
                    committed: existing.map_or(0, |r| r.committed),
                });
            }
        }
        Ok(upload)
    }
}

impl Upload {
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Uncompressed bytes persisted so far.
    pub fn committed(&self) -> u64 {
        self.record.committed
    }

    /// Hashes what earlier streams committed, so that a resumed upload is
    /// verified over all of its bytes. Costs one read of the committed prefix.
    fn rehash(&mut self) -> Result<(), Error> {
        let mut offset = 0;
        while offset < self.record.committed {
            let (start, value) = self
                .store
                .chunk_at(self.record.blob_id, offset)?
                .filter(|(s, _)| *s == offset)
                .ok_or_else(|| {
                    Error::Corrupt(format!(
                        "upload {:?} has no chunk at {offset}",
                        self.resource
                    ))
                })?;
            let data = chunk::decode(&value).ok_or_else(|| {
                Error::Corrupt(format!(
                    "upload {:?} has a corrupt chunk at {start}",
                    self.resource
                ))
            })?;
            self.hasher.update(&data);
            offset += data.len() as u64;
        }
        Ok(())
    }

    /// Persists `data` as the next chunk. Blocks on compression and disk.
    pub fn append(&mut self, data: &[u8]) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        self.hasher.update(data);
        let value = chunk::encode(data, self.store.options.zstd_level);
        let mut record = self.record;
        record.committed += data.len() as u64;
        record.stored += value.len() as u64;
        record.updated = now_secs();
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.store.cf(CF_CHUNKS),
            chunk_key(record.blob_id, self.record.committed),
            value,
        );
        batch.put_cf(
            self.store.cf(CF_UPLOADS),
            self.resource.as_bytes(),
            record.encode(),
        );
        self.store.write(batch)?;
        self.record = record;
        Ok(())
    }

    /// Verifies the bytes against the digest and makes the blob visible in one
    /// atomic write. On a mismatch nothing becomes visible and the upload is
    /// deleted.
    pub fn finish(self) -> Result<Written, Error> {
        let actual = self.hasher.clone().finish();
        let store = &self.store;
        let mut batch = WriteBatch::default();
        store.delete_upload(&mut batch, &self.resource, self.record.blob_id);
        if actual != self.digest {
            store.write(batch)?;
            return Err(Error::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        let _guard = store.stripe(&self.digest);
        if store.get_entry(&self.digest)?.is_some() {
            store.write(batch)?;
            return Ok(Written::AlreadyPresent);
        }
        // The chunks stay where they are: only the record goes.
        let mut batch = WriteBatch::default();
        batch.delete_cf(store.cf(CF_UPLOADS), self.resource.as_bytes());
        let entry = IndexEntry {
            blob_id: self.record.blob_id,
            stored: self.record.stored,
            atime: now_secs(),
        };
        batch.put_cf(store.cf(CF_INDEX), index_key(&self.digest), entry.encode());
        store.write(batch)?;
        Ok(Written::Stored)
    }

    /// Deletes the upload and everything it wrote (a stream that broke a rule,
    /// or a blob that another writer stored meanwhile).
    pub fn discard(self) -> Result<(), Error> {
        let mut batch = WriteBatch::default();
        self.store
            .delete_upload(&mut batch, &self.resource, self.record.blob_id);
        self.store.write(batch)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let mut active = self
            .store
            .active_uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        active.remove(&self.resource);
    }
}
