//! Reading stored blobs: a chunk at a time (plain, or as the zstd frame
//! stored), whole small blobs, and chunks as stored for copying to another
//! tier. A chunk that fails its check gets its blob removed as corrupt.

use bytes::Bytes;
use rocksdb::{IteratorMode, ReadOptions};

use super::layout::*;
use super::{Blob, Error, Store, chunk};
use crate::digest::{Digest, Encoding};

/// A whole blob read for a batch: its bytes and how they are encoded;
/// `None` if absent.
pub type BatchRead = Result<Option<(Bytes, Encoding)>, Error>;

/// Options for reading chunk values to serve them. Every value written
/// since checksums carries its own CRC-32C, checked as it is decoded:
/// RocksDB's checksum of the same bytes (checked on every read of a
/// blob-file record) would be paid twice. A value from before them is read
/// again with RocksDB's check ([`Store::checked`]).
fn serving() -> ReadOptions {
    let mut opts = ReadOptions::default();
    opts.set_verify_checksums(false);
    opts
}

/// A blob's first chunk as a batch read returns it: the stored frame for a
/// client that accepts zstd, else the plain bytes; with how many bytes of
/// the blob it holds. `None` means the chunk fails its check.
fn whole_chunk(value: Bytes, zstd: bool) -> Option<(Bytes, u64, Encoding)> {
    match zstd && chunk::is_compressed(&value) {
        true => chunk::to_frame(value, 0).map(|(frame, held)| (frame, held, Encoding::Zstd)),
        false => chunk::decode_owned(value).map(|data| {
            let held = data.len() as u64;
            (data, held, Encoding::Identity)
        }),
    }
}

/// A value RocksDB holds pinned for a lookup (a block of its cache, or the
/// blob-file record it read), kept for as long as bytes made of it live, so
/// that a read serves it without copying it out. Those bytes keep the
/// database open: a store dropped while a reply still holds some closes
/// when the reply is gone.
struct Pinned {
    // Declared first: dropped before the database it borrows from.
    value: rocksdb::DBPinnableSlice<'static>,
    _db: std::sync::Arc<rocksdb::DB>,
}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        &self.value
    }
}

impl Store {
    /// A pinned value as bytes that keep the database open while they live.
    fn pinned(&self, value: rocksdb::DBPinnableSlice<'_>) -> Bytes {
        // SAFETY: the slice's lifetime only keeps the database from closing
        // while it lives; `Pinned` holds the database open itself, and drops
        // the slice first.
        let value = unsafe {
            std::mem::transmute::<rocksdb::DBPinnableSlice<'_>, rocksdb::DBPinnableSlice<'static>>(value)
        };
        Bytes::from_owner(Pinned { value, _db: std::sync::Arc::clone(&self.db) })
    }

    /// The blob's bytes from `offset` to the end of the chunk holding it:
    /// decompresses exactly one chunk. Empty at or past the end of the blob.
    pub fn read_at(&self, blob: &Blob, offset: u64) -> Result<Bytes, Error> {
        if offset >= blob.digest.size {
            return Ok(Bytes::new());
        }
        let (start, value) = self.chunk_of(blob, offset)?.ok_or_else(|| {
            Error::Vanished(format!("blob {} has no chunk at offset {offset}", blob.digest))
        })?;
        let Some(data) = chunk::decode_owned(value) else {
            return Err(self.remove_corrupt(blob, format!("the chunk at offset {start} fails its check")));
        };
        let skip = (offset - start) as usize;
        if skip >= data.len() {
            return Err(self.remove_corrupt(blob, format!("a gap at offset {offset}")));
        }
        Ok(data.slice(skip..))
    }

    /// The blob's bytes from `offset` to the end of the chunk holding it, as
    /// one zstd frame (see [`chunk::to_frame`]), and how many bytes of the
    /// blob it holds. At or past the end of the blob: an empty frame.
    pub fn read_frame_at(&self, blob: &Blob, offset: u64) -> Result<(Bytes, u64), Error> {
        if offset >= blob.digest.size {
            return Ok((Bytes::from(crate::compression::raw_frame(&[])), 0));
        }
        let (start, value) = self.chunk_of(blob, offset)?.ok_or_else(|| {
            Error::Vanished(format!("blob {} has no chunk at offset {offset}", blob.digest))
        })?;
        let skip = usize::try_from(offset - start).unwrap_or(usize::MAX);
        match chunk::to_frame(value, skip) {
            Some((frame, held)) if held > 0 => Ok((frame, held)),
            Some(_) => Err(self.remove_corrupt(blob, format!("a gap at offset {offset}"))),
            None => Err(self.remove_corrupt(blob, format!("the chunk at offset {start} fails its check"))),
        }
    }

    /// The stored chunk that holds `offset`, encoded as the chunk codec wrote
    /// it, with its start and how many bytes of the blob it holds: for copying
    /// a blob to another tier without compressing it again. Checked first.
    pub fn encoded_chunk_at(&self, blob: &Blob, offset: u64) -> Result<(u64, Vec<u8>, u64), Error> {
        let (start, value) = self.chunk_of(blob, offset)?.ok_or_else(|| {
            Error::Vanished(format!("blob {} has no chunk at offset {offset}", blob.digest))
        })?;
        match chunk::content_len(&value) {
            Some(held) if start + held > offset => Ok((start, Vec::from(value), held)),
            Some(_) => Err(self.remove_corrupt(blob, format!("a gap at offset {offset}"))),
            None => Err(self.remove_corrupt(blob, format!("the chunk at offset {start} fails its check"))),
        }
    }

    /// The chunk of a present blob that holds `offset`: a chunk RocksDB finds
    /// corrupt (its own checksums) gets the blob removed, like one failing ours.
    pub(super) fn chunk_of(&self, blob: &Blob, offset: u64) -> Result<Option<(u64, Bytes)>, Error> {
        match self.chunk_at(blob.blob_id, offset) {
            Err(Error::Db(e)) if e.kind() == rocksdb::ErrorKind::Corruption => {
                Err(self.remove_corrupt(blob, format!("RocksDB: {e}")))
            }
            Err(Error::Corrupt(detail)) => Err(self.remove_corrupt(blob, detail)),
            other => other,
        }
    }

    /// A stored chunk value as the codec wrote it: the value itself, or, for
    /// a reference, the chunk it names in the blob's file. A reference that
    /// fails its check, or names bytes the file lacks, is [`Error::Corrupt`]
    /// (or the blob was deleted meanwhile, which `remove_corrupt` tells apart).
    pub(super) fn resolve(&self, blob_id: u64, value: Bytes) -> Result<Bytes, Error> {
        if !chunk::is_file_ref(&value) {
            return Ok(value);
        }
        let Some((pos, len)) = chunk::file_ref_of(&value) else {
            return Err(Error::Corrupt(format!(
                "a reference to the file of blob id {blob_id} fails its check"
            )));
        };
        self.files.read(blob_id, pos, len).map(Bytes::from).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof => {
                Error::Corrupt(format!("the file of blob id {blob_id} lacks {len} bytes at {pos}: {e}"))
            }
            _ => Error::File(e),
        })
    }

    /// The stored chunk of `blob_id` that holds `offset`, with its start
    /// offset. In a list, the chunk of the blob its reference names.
    pub(super) fn chunk_at(&self, blob_id: u64, offset: u64) -> Result<Option<(u64, Bytes)>, Error> {
        let Some((start, value)) = self.value_at(blob_id, offset)? else { return Ok(None) };
        if !chunk::is_blob_ref(&value) {
            return Ok(Some((start, self.resolve(blob_id, value)?)));
        }
        let (digest, id) = self.follow(blob_id, &value)?;
        match self.value_at(id, offset - start)? {
            Some((inner, value)) if !chunk::is_blob_ref(&value) => {
                Ok(Some((start + inner, self.resolve(id, value)?)))
            }
            _ => Err(Error::Corrupt(format!(
                "chunk {digest} of the list under blob id {blob_id} is not stored whole"
            ))),
        }
    }

    /// The blob a list's reference names, by digest (a chunk removed as
    /// corrupt and stored again since serves as well), and its blob id now.
    fn follow(&self, blob_id: u64, value: &[u8]) -> Result<(Digest, u64), Error> {
        let Some((digest, _)) = chunk::blob_ref_of(value) else {
            return Err(Error::Corrupt(format!(
                "a reference of the list under blob id {blob_id} fails its check"
            )));
        };
        match self.get_entry(&digest)? {
            Some(entry) => Ok((digest, entry.blob_id)),
            None => {
                Err(Error::Corrupt(format!("chunk {digest} of the list under blob id {blob_id} is gone")))
            }
        }
    }

    /// The value stored for the chunk of `blob_id` that holds `offset`, as
    /// it is, with its start offset.
    fn value_at(&self, blob_id: u64, offset: u64) -> Result<Option<(u64, Bytes)>, Error> {
        let cf = self.cf(CF_CHUNKS);
        // Sequential reads ask for chunk starts: one point lookup.
        if let Some(v) = self.db.get_pinned_cf_opt(cf, chunk_key(blob_id, offset), &serving())? {
            return Ok(Some((offset, self.checked(chunk_key(blob_id, offset), self.pinned(v))?)));
        }
        let mut opts = serving();
        opts.set_iterate_lower_bound(chunk_key(blob_id, 0));
        opts.set_iterate_upper_bound(chunk_key(blob_id + 1, 0));
        let mut it = self.db.raw_iterator_cf_opt(cf, opts);
        it.seek_for_prev(chunk_key(blob_id, offset));
        it.status()?;
        match (it.key().and_then(split_chunk_key), it.value()) {
            (Some((_, start)), Some(v)) => {
                Ok(Some((start, self.checked(chunk_key(blob_id, start), Bytes::copy_from_slice(v))?)))
            }
            _ => Ok(None),
        }
    }

    /// A chunk value read without RocksDB's checksum, as it may be served:
    /// read again with it if the value has no checksum of its own.
    fn checked(&self, key: [u8; 16], value: Bytes) -> Result<Bytes, Error> {
        if !chunk::is_unsummed(&value) {
            return Ok(value);
        }
        self.db.get_cf(self.cf(CF_CHUNKS), key)?.map(Bytes::from).ok_or_else(|| {
            Error::Vanished(format!(
                "a chunk of blob id {} went while it was read",
                u64::from_be_bytes(key[..8].try_into().expect("8 bytes"))
            ))
        })
    }

    /// A whole blob in memory, for small blobs (batch reads, directories,
    /// trees). `None` if absent.
    pub fn read_all(&self, digest: &Digest) -> Result<Option<Bytes>, Error> {
        let Some(blob) = self.locate(digest)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(digest.size as usize);
        while (out.len() as u64) < digest.size {
            let part = self.read_at(&blob, out.len() as u64)?;
            out.extend_from_slice(&part);
        }
        Ok(Some(Bytes::from(out)))
    }

    /// Small blobs whole, for a batch read, as [`Store::read_all`] (or, with
    /// `zstd`, [`Store::read_all_encoded`]) reads each: `None` for an absent
    /// one. The in-memory set of present blobs gives their blob ids (one
    /// batched index lookup, those it cannot), and one batched lookup their
    /// first chunks, where two point lookups a blob would; a blob that is
    /// not one chunk (a list, client frames kept as chunks) is read alone.
    /// Present blobs count as used.
    pub fn read_batch(
        &self,
        digests: &[Digest],
        zstd: bool,
    ) -> Vec<Result<Option<(Bytes, Encoding)>, Error>> {
        let alone = |d: &Digest| match zstd {
            true => self.read_all_encoded(d),
            false => self.read_all(d).map(|data| data.map(|data| (data, Encoding::Identity))),
        };
        let mut results: Vec<Option<BatchRead>> = Vec::with_capacity(digests.len());
        // Blobs whose first chunk may be all of them: (index, blob).
        let mut whole = Vec::with_capacity(digests.len());
        // The blobs the in-memory set cannot place, for the index.
        let mut unplaced = Vec::new();
        for (i, digest) in digests.iter().enumerate() {
            results.push(match self.present.blob_id(digest) {
                _ if digest.is_empty_blob() => Some(Ok(Some((Bytes::new(), Encoding::Identity)))),
                Some(blob_id) => {
                    whole.push((i, Blob { digest: *digest, blob_id }));
                    None
                }
                None => {
                    unplaced.push(i);
                    None
                }
            });
        }
        if !unplaced.is_empty() {
            let keys: Vec<Key> = unplaced.iter().map(|&i| index_key(&digests[i])).collect();
            let entries = self.db.batched_multi_get_cf(self.cf(CF_INDEX), &keys, false);
            for (&i, entry) in unplaced.iter().zip(entries) {
                let digest = &digests[i];
                let entry = entry.map_err(Error::from).and_then(|found| {
                    found
                        .map(|v| {
                            IndexEntry::decode(&v).ok_or_else(|| {
                                Error::Corrupt(format!("index entry of {digest} is malformed"))
                            })
                        })
                        .transpose()
                });
                match entry {
                    Ok(None) => results[i] = Some(Ok(None)),
                    Ok(Some(entry)) if !entry.form.is_list() => {
                        whole.push((i, Blob { digest: *digest, blob_id: entry.blob_id }))
                    }
                    // A list, or an entry to look at again.
                    _ => {}
                }
            }
        }
        let chunk_keys: Vec<[u8; 16]> = whole.iter().map(|(_, blob)| chunk_key(blob.blob_id, 0)).collect();
        let firsts = self.db.batched_multi_get_cf_opt(self.cf(CF_CHUNKS), &chunk_keys, false, &serving());
        for ((i, blob), first) in whole.iter().zip(firsts) {
            let value = match first {
                Ok(Some(value)) if !chunk::is_blob_ref(&value) && !chunk::is_unsummed(&value) => value,
                // Evicted meanwhile, a reference, RocksDB's error: read alone.
                _ => continue,
            };
            // A chunk RocksDB holds is served from where RocksDB put it (plain
            // bytes not copied); one in the blob's file is read first.
            let read = match self.resolve(blob.blob_id, self.pinned(value)) {
                Ok(value) => whole_chunk(value, zstd),
                Err(Error::Corrupt(detail)) => {
                    results[*i] = Some(Err(self.remove_corrupt(blob, detail)));
                    continue;
                }
                Err(e) => {
                    results[*i] = Some(Err(e));
                    continue;
                }
            };
            results[*i] = match read {
                Some((data, held, encoding)) if held == blob.digest.size => Ok(Some((data, encoding))).into(),
                // More chunks follow: read alone.
                Some(_) => None,
                None => Err(self.remove_corrupt(blob, "the chunk at offset 0 fails its check".into())).into(),
            };
        }
        self.touch(
            whole.iter().filter(|(i, _)| matches!(results[*i], Some(Ok(Some(_))))).map(|(_, b)| b.digest),
        );
        digests.iter().zip(results).map(|(d, result)| result.unwrap_or_else(|| alone(d))).collect()
    }

    /// A whole small blob for a client that accepts zstd: the stored frames
    /// as they are when any chunk is compressed (raw chunks wrapped), else
    /// the plain bytes. `None` if absent.
    pub fn read_all_encoded(&self, digest: &Digest) -> Result<Option<(Bytes, Encoding)>, Error> {
        let Some(blob) = self.locate(digest)? else {
            return Ok(None);
        };
        if digest.size == 0 {
            return Ok(Some((Bytes::new(), Encoding::Identity)));
        }
        // One scan of the blob's chunks; each checksum is checked once, as
        // its chunk is converted.
        let values = self.chunks_of(&blob)?;
        let encoding = match values.iter().any(|(_, v)| chunk::is_compressed(v)) {
            true => Encoding::Zstd,
            false => Encoding::Identity,
        };
        let mut out = Vec::with_capacity(values.iter().map(|(_, v)| v.len()).sum());
        let mut offset = 0;
        for (start, value) in values {
            let part = match encoding {
                Encoding::Zstd => chunk::to_frame(value, 0),
                Encoding::Identity => chunk::decode(&value).map(|data| {
                    let held = data.len() as u64;
                    (data, held)
                }),
            };
            let Some((part, held)) = part.filter(|(_, held)| *held > 0 && start == offset) else {
                return Err(
                    self.remove_corrupt(&blob, format!("the chunk at offset {start} fails its check"))
                );
            };
            out.extend_from_slice(&part);
            offset += held;
        }
        match offset {
            // Evicted since it was located: absent, like any missing blob.
            0 => Err(Error::Vanished(format!("blob {digest} has no chunks"))),
            n if n != digest.size => Err(self.remove_corrupt(&blob, format!("its chunks hold {n} bytes"))),
            _ => Ok(Some((Bytes::from(out), encoding))),
        }
    }

    /// All chunks of a present blob, in order, with their offsets (a list's
    /// are its chunks' chunks). RocksDB finding one corrupt gets the blob
    /// removed, as in `chunk_of`.
    pub(super) fn chunks_of(&self, blob: &Blob) -> Result<Vec<(u64, Bytes)>, Error> {
        match self.values_of(blob.blob_id, 0, true) {
            Ok(chunks) => Ok(chunks),
            Err(Error::Corrupt(detail)) => Err(self.remove_corrupt(blob, detail)),
            Err(Error::Db(e)) if e.kind() == rocksdb::ErrorKind::Corruption => {
                Err(self.remove_corrupt(blob, format!("RocksDB: {e}")))
            }
            Err(e) => Err(e),
        }
    }

    /// The chunks stored under `blob_id`, resolved, their offsets moved by
    /// `base`; references followed if `follow` (one level: lists never hold
    /// lists).
    fn values_of(&self, blob_id: u64, base: u64, follow: bool) -> Result<Vec<(u64, Bytes)>, Error> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(chunk_key(blob_id, 0));
        opts.set_iterate_upper_bound(chunk_key(blob_id, PROGRESS_OFFSET));
        let mut chunks = Vec::new();
        for item in self.db.iterator_cf_opt(self.cf(CF_CHUNKS), opts, IteratorMode::Start) {
            let (key, value) = item?;
            let Some((_, start)) = split_chunk_key(&key) else { continue };
            if !chunk::is_blob_ref(&value) {
                chunks.push((base + start, self.resolve(blob_id, Bytes::from(value.into_vec()))?));
            } else if follow {
                let (_, id) = self.follow(blob_id, &value)?;
                chunks.extend(self.values_of(id, base + start, false)?);
            } else {
                return Err(Error::Corrupt(format!("the list under blob id {blob_id} holds a list")));
            }
        }
        Ok(chunks)
    }
}
