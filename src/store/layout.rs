//! Keys and values of every column family, in one place.
//!
//! Layout version 5:
//!
//! | column family | key | value |
//! |---|---|---|
//! | `index`   | function (1) · hash (20 to 64, by function) · size (8, BE) | [`IndexEntry`] |
//! | `chunks`  | blob id (8, BE) · uncompressed offset (8, BE) | payload · tag (1), or a reference to it in the blob's file, or (in a list) to the whole blob at that offset (see `chunk`) |
//! | `chunks`  | blob id (8, BE) · `u64::MAX` | [`UploadProgress`] of an unfinished upload |
//! | `chunks`  | `0` (8) · `0` (8) | stored bytes of all blobs and uploads (i64 LE, merge-added) |
//! | `chunks`  | `0` (8) · `1` (8) | number of blobs (i64 LE, merge-added) |
//! | `chunks`  | `0` (8) · `2` (8) | uncompressed bytes of all blobs (i64 LE, merge-added) |
//! | `lru`     | last access (8, BE, ms) · index key | empty: the eviction order of blobs... |
//! | `lru`     | last access (8, BE, ms) · 0xFF · `ac` key | empty: ...and of action results, in one order |
//! | `uploads` | ByteStream resource name (UTF-8) | [`UploadRecord`] |
//! | `ac`      | instance name · 0x00 · function (1) · hash | [`AC_VALUE_TIMED`] · last access (8, BE, ms) · action size (8, BE; `u64::MAX` if unknown) · ActionResult protobuf |
//! | `queue`   | 0x00 · index key | [`QueueValue`]: a blob the object store may lack |
//! | `queue`   | 0x01 · `ac` key | [`QueueValue`]: an action result the object store may lack |
//! | `default` | `layout` | layout version (ASCII) |
//! | `default` | `backfill` | the index key after which blobs from before the queue are still to be queued |
//! | `default` | `backfill-ac` | the same for action results (an `ac` key), after the blobs |
//! | `default` | `queueing` | `1` while the store keeps a queue (it has an object store tier) |
//!
//! Outside RocksDB, `files/{id % 256:02x}/{id:016x}` holds the encoded chunks
//! of blob id `id`, back to back, for every blob of at least 256 KiB (see
//! `files`). Most bytes are in such blobs, and eviction gives their space back
//! by deleting the file: at once, and without room to rewrite anything
//! (RocksDB's blob files free space only when every chunk in them is dead, or
//! by rewriting the live ones, which a full disk cannot). Measured under full
//! speed writes, this and admission by reservation took the peak disk from
//! 1.82x to 1.00x the budget (see README, "Size budget and eviction").
//!
//! A blob's chunks live under a blob id, allocated when its upload starts, not
//! under its digest: an upload writes its chunks where they will stay, and
//! becomes visible by one atomic write of its index entry. The index is the
//! single source of truth for "present"; chunks without an index entry or an
//! upload record are garbage.
//!
//! An upload's progress lives beside its chunks, in the same column family,
//! and is written in the same batch as each chunk (or its reference, once the
//! chunk is in the blob's file): a crash never leaves progress that claims
//! chunks the store lacks. Bytes a crash left in a file past the committed
//! end are cut off when the upload resumes (see `upload`).
//!
//! ## Lists
//!
//! A blob can be kept as a list of other blobs (its index entry's form says
//! so): its values in `chunks` are references, each naming the whole blob
//! that starts at that offset. Large uploads are cut into content-defined
//! chunks as they arrive (FastCDC 2020 with the advertised parameters, see
//! `cdc`), each chunk stored as a blob of its own, once however many blobs
//! contain it; SpliceBlob makes a list of the client's chunks; SplitBlob of a
//! list cut that way answers its list. A chunk is an ordinary blob: found by
//! FindMissingBlobs, read by anyone, counted in the stored bytes once; a
//! list counts only its references.
//!
//! A list *holds* its chunks, and so does an upload for the chunks it has
//! cut: a blob's index entry counts its holders, and a blob with holders has
//! no place in the eviction order, so eviction never takes a chunk a list
//! needs. Every change of a holder count is made under the chunk's stripe
//! lock, in the same atomic write as the reference that takes or drops the
//! hold: a list becomes visible with its holds taken, and deleting a list
//! (eviction, a discarded upload) releases them; a chunk no longer held goes
//! back into the eviction order at its own last use. A chunk found corrupt
//! is removed even when held (its bytes are gone): reading a list that needs
//! it then finds it absent, and removes the list as corrupt, so that clients
//! upload it again. Lists never hold lists.
//!
//! The `queue` column family is used only with an object store tier: a blob's
//! queue entry is written in the same batch as its index entry, so no crash
//! can leave a stored blob that is neither copied nor queued. Blobs stored
//! while there was no queue (before the object store tier was configured)
//! are queued by a backfill, a slice at a time, from the `backfill` cursor,
//! and then action results from the `backfill-ac` one; a server opening the
//! store without a tier empties the queue (nothing waits for an object
//! store that is gone) and drops the cursors, so that turning the tier on
//! again backfills from the start.

use std::ops::Deref;

use crate::digest::{Digest, Function, MAX_HASH_LEN};

pub const CF_INDEX: &str = "index";
pub const CF_CHUNKS: &str = "chunks";
pub const CF_UPLOADS: &str = "uploads";
pub const CF_AC: &str = "ac";
pub const CF_LRU: &str = "lru";
pub const CF_QUEUE: &str = "queue";

/// Every column family but `default`.
pub const COLUMN_FAMILIES: [&str; 6] = [CF_INDEX, CF_LRU, CF_CHUNKS, CF_UPLOADS, CF_AC, CF_QUEUE];

/// Where the stored-bytes counter lives: in the chunks column family, so that
/// it shares a memtable (and crash fate) with the chunk writes it counts.
/// Blob ids start at 1, so no chunk ever has this key.
pub const USAGE_KEY: [u8; 16] = [0; 16];

/// Where the number of blobs and their uncompressed bytes are counted,
/// beside [`USAGE_KEY`] and for the same reason. Directories from before
/// these counters get them from a scan of the index at open.
pub const BLOBS_KEY: [u8; 16] = chunk_key(0, 1);
pub const LOGICAL_KEY: [u8; 16] = chunk_key(0, 2);

/// A counter delta, as a merge operand of [`USAGE_KEY`], [`BLOBS_KEY`] or
/// [`LOGICAL_KEY`].
pub fn usage_delta(delta: i64) -> [u8; 8] {
    delta.to_le_bytes()
}

/// The merge operator of the chunks column family: adds the deltas.
pub fn merge_usage(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let read = |v: &[u8]| v.try_into().map(i64::from_le_bytes).unwrap_or(0);
    let total = operands.iter().fold(existing.map_or(0, read), |sum, op| sum.wrapping_add(read(op)));
    Some(total.to_le_bytes().to_vec())
}

pub fn lru_key(atime_ms: u64, d: &Digest) -> Key {
    let mut k = Key::default();
    k.push(&atime_ms.to_be_bytes());
    k.push(&index_key(d));
    k
}

/// Marks an action result's place in the eviction order: no index key
/// starts with it (they start with a digest function).
const LRU_ACTION: u8 = 0xff;

/// An action result's place in the eviction order.
pub fn lru_action_key(atime_ms: u64, ac_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + ac_key.len());
    k.extend_from_slice(&atime_ms.to_be_bytes());
    k.push(LRU_ACTION);
    k.extend_from_slice(ac_key);
    k
}

/// What a place in the eviction order holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Used {
    Blob(Digest),
    /// An action result, by its `ac` key.
    ActionResult(Vec<u8>),
}

pub fn split_lru_key(k: &[u8]) -> Option<(u64, Used)> {
    let (atime, rest) = k.split_first_chunk::<8>()?;
    let used = match rest.split_first()? {
        (&LRU_ACTION, ac_key) => Used::ActionResult(ac_key.to_vec()),
        _ => Used::Blob(digest_of_index_key(rest)?),
    };
    Some((u64::from_be_bytes(*atime), used))
}

pub const LAYOUT_KEY: &[u8] = b"layout";
/// Where the backfill of blobs from before the object store tier is: the
/// last index key queued (empty: none yet); absent once done.
pub const BACKFILL_KEY: &[u8] = b"backfill";
/// The same for action results (an action cache key), after the blobs.
pub const BACKFILL_AC_KEY: &[u8] = b"backfill-ac";
/// Whether the queue was kept when the store last opened (`1`), in the
/// default column family too.
pub const QUEUEING_KEY: &[u8] = b"queueing";
pub const LAYOUT_VERSION: &[u8] = b"5";
/// Version 4 differs only in having no lists: its index entries are all
/// version 1 (whole blobs, held by nothing), which version 5 reads as they
/// are.
pub const LAYOUT_VERSION_4: &[u8] = b"4";
/// Version 3 differs only in having no blob files: none of its chunk values
/// refers to one, so it is version 4 as it is.
pub const LAYOUT_VERSION_3: &[u8] = b"3";
/// Version 2 differs only in action results: they were neither timed nor
/// in the eviction order, nor counted in the stored bytes; opening a
/// version 2 directory times them all as used now.
pub const LAYOUT_VERSION_2: &[u8] = b"2";
/// Written before the upgrade from version 2 changes anything, and replaced
/// by [`LAYOUT_VERSION`] once it is done: a larder that reads version 2 only
/// refuses a directory half upgraded, and this one finishes the upgrade.
pub const LAYOUT_UPGRADING_TO_3: &[u8] = b"3-upgrading";
/// Version 1 differs only in the action cache key, which ended in the
/// action's size; opening a version 1 directory re-keys it.
pub const LAYOUT_VERSION_1: &[u8] = b"1";

/// A key of at most [`Key::MAX`] bytes, built on the stack: index keys and
/// the keys that embed one.
#[derive(Clone, Copy)]
pub struct Key {
    bytes: [u8; Key::MAX],
    len: usize,
}

impl Key {
    /// An eviction-order key: a time stamp and the longest index key.
    const MAX: usize = 8 + 1 + MAX_HASH_LEN + 8;

    fn push(&mut self, part: &[u8]) {
        self.bytes[self.len..self.len + part.len()].copy_from_slice(part);
        self.len += part.len();
    }
}

impl Default for Key {
    fn default() -> Key {
        Key { bytes: [0; Key::MAX], len: 0 }
    }
}

impl Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// The function's key byte is first, and fixes the hash length: keys of
/// different functions never collide, and every index key is prefix-free.
pub fn index_key(d: &Digest) -> Key {
    let mut k = Key::default();
    k.push(&[d.function as u8]);
    k.push(d.hash());
    k.push(&d.size.to_be_bytes());
    k
}

pub fn digest_of_index_key(k: &[u8]) -> Option<Digest> {
    let (&function, rest) = k.split_first()?;
    let function = Function::from_byte(function)?;
    let (hash, size) = rest.split_at_checked(function.hash_len())?;
    Digest::new(function, hash, u64::from_be_bytes(size.try_into().ok()?))
}

pub const fn chunk_key(blob_id: u64, offset: u64) -> [u8; 16] {
    let (id, at) = (blob_id.to_be_bytes(), offset.to_be_bytes());
    let mut k = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        (k[i], k[8 + i]) = (id[i], at[i]);
        i += 1;
    }
    k
}

pub fn split_chunk_key(k: &[u8]) -> Option<(u64, u64)> {
    let k: &[u8; 16] = k.try_into().ok()?;
    Some((u64::from_be_bytes(k[..8].try_into().ok()?), u64::from_be_bytes(k[8..].try_into().ok()?)))
}

/// A queued blob: its index key after the kind byte 0, so that a pass over
/// the queue copies blobs before the action results (kind 1) naming them.
pub fn queue_blob_key(d: &Digest) -> Key {
    let mut k = Key::default();
    k.push(&[0]);
    k.push(&index_key(d));
    k
}

pub fn queue_ac_key(instance: &str, action: &Digest) -> Vec<u8> {
    queue_key_of_ac_key(&ac_key(instance, action))
}

/// The queue key of the action result stored under an `ac` key.
pub fn queue_key_of_ac_key(ac_key: &[u8]) -> Vec<u8> {
    let mut k = vec![1];
    k.extend_from_slice(ac_key);
    k
}

/// What a queue key names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Queued {
    Blob(Digest),
    ActionResult { instance: String, action: Digest },
}

pub fn queued_of_key(k: &[u8]) -> Option<Queued> {
    match k.split_first()? {
        (0, index) => digest_of_index_key(index).map(Queued::Blob),
        (1, ac) => {
            let nul = ac.iter().position(|b| *b == 0)?;
            let (&function, hash) = ac[nul + 1..].split_first()?;
            let function = Function::from_byte(function)?;
            // The hash fixes the size; the action's size is not kept.
            let action = Digest::new(function, hash, 0)?;
            Some(Queued::ActionResult { instance: String::from_utf8(ac[..nul].to_vec()).ok()?, action })
        }
        _ => None,
    }
}

/// A queue entry: when it was queued, and the bytes it counts against the
/// queue's limit (a blob's size, an action result's length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueValue {
    pub since_ms: u64,
    pub bytes: u64,
}

impl QueueValue {
    const VERSION: u8 = 1;
    const LEN: usize = 17;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut v = [0u8; Self::LEN];
        v[0] = Self::VERSION;
        v[1..9].copy_from_slice(&self.since_ms.to_be_bytes());
        v[9..17].copy_from_slice(&self.bytes.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<QueueValue> {
        (v.len() == Self::LEN && v[0] == Self::VERSION)
            .then(|| QueueValue { since_ms: u64_at(v, 1), bytes: u64_at(v, 9) })
    }
}

/// Action results are keyed by the action's hash without its size: Bazel's
/// HTTP cache protocol names them by hash alone, and the hash fixes the size.
pub fn ac_key(instance: &str, action: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(instance.len() + 2 + action.hash().len());
    k.extend_from_slice(instance.as_bytes());
    k.push(0);
    k.push(action.function as u8);
    k.extend_from_slice(action.hash());
    k
}

/// Marks the function byte of an `ac` key whose value is a raw entry of
/// Bazel's HTTP cache (`disable_http_ac_validation`): bytes no one checks,
/// kept apart from the action results gRPC and REST serve.
const RAW_ENTRY: u8 = 0x80;

/// The `ac` key of a raw entry: an action result's key, its function byte marked.
pub fn raw_ac_key(instance: &str, key: &Digest) -> Vec<u8> {
    let mut k = ac_key(instance, key);
    k[instance.len() + 1] |= RAW_ENTRY;
    k
}

/// A version 1 action cache key (instance · 0 · index key) as version 2
/// has it; `None` if `k` is not one (already re-keyed, or malformed).
pub fn ac_key_from_v1(k: &[u8]) -> Option<Vec<u8>> {
    let nul = k.iter().position(|b| *b == 0)?;
    let action = digest_of_index_key(&k[nul + 1..])?;
    Some(ac_key(std::str::from_utf8(&k[..nul]).ok()?, &action))
}

/// The instance and action (its size unknown) of an `ac` key, or of a raw
/// entry's.
pub fn split_ac_key(k: &[u8]) -> Option<(String, Digest)> {
    let nul = k.iter().position(|b| *b == 0)?;
    let (&function, hash) = k[nul + 1..].split_first()?;
    let action = Digest::new(Function::from_byte(function & !RAW_ENTRY)?, hash, 0)?;
    Some((String::from_utf8(k[..nul].to_vec()).ok()?, action))
}

/// A stored action result is prefixed with a version byte, so that an
/// all-default ActionResult (zero bytes of protobuf) is never an empty value.
/// Layout 2 wrote this one: the result alone.
pub const AC_VALUE_VERSION: u8 = 1;
/// The value layout 3 writes: the last access (for eviction) and the
/// action's size, which REAPI makes part of the digest, so that a lookup
/// with another size is a miss. Bazel's HTTP cache names actions by hash
/// alone: their size is unknown.
pub const AC_VALUE_TIMED: u8 = 2;
const UNKNOWN_SIZE: u64 = u64::MAX;

/// An action cache value, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcValue<'a> {
    /// Last access, ms; `None` for a layout 2 value.
    pub atime: Option<u64>,
    pub size: Option<u64>,
    pub result: &'a [u8],
}

impl AcValue<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(17 + self.result.len());
        value.push(AC_VALUE_TIMED);
        value.extend_from_slice(&self.atime.unwrap_or(0).to_be_bytes());
        value.extend_from_slice(&self.size.unwrap_or(UNKNOWN_SIZE).to_be_bytes());
        value.extend_from_slice(self.result);
        value
    }

    /// `None` if the value is malformed.
    pub fn decode(v: &[u8]) -> Option<AcValue<'_>> {
        match v.split_first()? {
            (&AC_VALUE_VERSION, result) => Some(AcValue { atime: None, size: None, result }),
            (&AC_VALUE_TIMED, rest) => {
                let (atime, rest) = rest.split_first_chunk::<8>()?;
                let (size, result) = rest.split_first_chunk::<8>()?;
                let size = Some(u64::from_be_bytes(*size)).filter(|s| *s != UNKNOWN_SIZE);
                Some(AcValue { atime: Some(u64::from_be_bytes(*atime)), size, result })
            }
            _ => None,
        }
    }
}

/// Reads fixed-width big-endian fields.
fn u64_at(v: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(v[i..i + 8].try_into().expect("caller checked the length"))
}

/// How a blob's bytes are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// In chunks of its own.
    Whole,
    /// As a list of other blobs a client spliced (see "Lists" above).
    List,
    /// As a list of the chunks FastCDC 2020 cuts with the advertised
    /// parameters (see `cdc`): what SplitBlob answers with no work.
    ListFastCdc,
}

impl Form {
    pub fn is_list(self) -> bool {
        self != Form::Whole
    }
}

/// What the index knows of a stored blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub blob_id: u64,
    /// Bytes the chunks take (after compression), for size accounting.
    pub stored: u64,
    /// Last access, milliseconds since the Unix epoch; refreshed coarsely.
    pub atime: u64,
    /// Lists and uploads that hold this blob: while any does, it has no
    /// place in the eviction order.
    pub holders: u32,
    pub form: Form,
}

impl IndexEntry {
    /// Version 1 (layout 4) had neither holders nor form.
    const VERSION_1: u8 = 1;
    const LEN_1: usize = 25;
    const VERSION: u8 = 2;
    const LEN: usize = 30;

    pub fn whole(blob_id: u64, stored: u64, atime: u64) -> IndexEntry {
        IndexEntry { blob_id, stored, atime, holders: 0, form: Form::Whole }
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut v = [0u8; Self::LEN];
        v[0] = Self::VERSION;
        v[1..9].copy_from_slice(&self.blob_id.to_be_bytes());
        v[9..17].copy_from_slice(&self.stored.to_be_bytes());
        v[17..25].copy_from_slice(&self.atime.to_be_bytes());
        v[25..29].copy_from_slice(&self.holders.to_be_bytes());
        v[29] = match self.form {
            Form::Whole => 0,
            Form::List => 1,
            Form::ListFastCdc => 2,
        };
        v
    }

    pub fn decode(v: &[u8]) -> Option<IndexEntry> {
        let version_1 = v.len() == Self::LEN_1 && v[0] == Self::VERSION_1;
        let version_2 = v.len() == Self::LEN && v[0] == Self::VERSION;
        if !version_1 && !version_2 {
            return None;
        }
        let entry = IndexEntry::whole(u64_at(v, 1), u64_at(v, 9), u64_at(v, 17));
        if version_1 {
            return Some(entry);
        }
        let form = match v[29] {
            0 => Form::Whole,
            1 => Form::List,
            2 => Form::ListFastCdc,
            _ => return None,
        };
        Some(IndexEntry { holders: u32::from_be_bytes(v[25..29].try_into().ok()?), form, ..entry })
    }
}

/// Where a partial upload's chunks are (written through the WAL when the
/// upload writes its first chunk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadRecord {
    pub blob_id: u64,
    /// Seconds since the Unix epoch, for expiry of uploads with no progress.
    pub created: u64,
}

impl UploadRecord {
    const VERSION: u8 = 1;
    const LEN: usize = 17;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut v = [0u8; Self::LEN];
        v[0] = Self::VERSION;
        v[1..9].copy_from_slice(&self.blob_id.to_be_bytes());
        v[9..17].copy_from_slice(&self.created.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<UploadRecord> {
        (v.len() == Self::LEN && v[0] == Self::VERSION)
            .then(|| UploadRecord { blob_id: u64_at(v, 1), created: u64_at(v, 9) })
    }
}

/// The chunk offset under which an unfinished upload keeps its progress.
pub const PROGRESS_OFFSET: u64 = u64::MAX;

/// How far a partial upload got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadProgress {
    /// Uncompressed bytes persisted (what QueryWriteStatus reports).
    pub committed: u64,
    /// Bytes its chunks take on disk.
    pub stored: u64,
    /// Last write, seconds since the Unix epoch, for expiry.
    pub updated: u64,
}

impl UploadProgress {
    const VERSION: u8 = 1;
    const LEN: usize = 25;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut v = [0u8; Self::LEN];
        v[0] = Self::VERSION;
        v[1..9].copy_from_slice(&self.committed.to_be_bytes());
        v[9..17].copy_from_slice(&self.stored.to_be_bytes());
        v[17..25].copy_from_slice(&self.updated.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<UploadProgress> {
        (v.len() == Self::LEN && v[0] == Self::VERSION).then(|| UploadProgress {
            committed: u64_at(v, 1),
            stored: u64_at(v, 9),
            updated: u64_at(v, 17),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for f in Function::ALL {
            let d = f.digest(b"hello");
            assert_eq!(digest_of_index_key(&index_key(&d)), Some(d));
            assert_eq!(split_lru_key(&lru_key(9, &d)), Some((9, Used::Blob(d))));
            let ac = ac_key("team/a", &d);
            assert_eq!(split_lru_key(&lru_action_key(9, &ac)), Some((9, Used::ActionResult(ac.clone()))));
            let action = Digest::new(f, d.hash(), 0).unwrap();
            assert_eq!(split_ac_key(&ac), Some(("team/a".to_string(), action)));
            let raw = raw_ac_key("team/a", &action);
            assert_ne!(raw, ac, "raw entries are kept apart");
            assert_eq!(split_ac_key(&raw), Some(("team/a".to_string(), action)));
        }
        for (atime, size) in [(None, None), (Some(5), None), (Some(5), Some(7))] {
            let value = AcValue { atime, size, result: b"result" };
            let encoded = value.encode();
            let decoded = AcValue::decode(&encoded).unwrap();
            assert_eq!(decoded, AcValue { atime: Some(atime.unwrap_or(0)), ..value });
        }
        assert_eq!(
            AcValue::decode(&[AC_VALUE_VERSION, b'r']),
            Some(AcValue { atime: None, size: None, result: b"r" })
        );
        assert_eq!(AcValue::decode(&[AC_VALUE_TIMED, 1, 2]), None);
        assert_eq!(digest_of_index_key(&index_key(&Digest::of(b"x"))[..40]), None);
        assert_eq!(split_chunk_key(&chunk_key(7, 1 << 40)), Some((7, 1 << 40)));
        let e = IndexEntry::whole(1, 2, 3);
        assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        for form in [Form::Whole, Form::List, Form::ListFastCdc] {
            let e = IndexEntry { holders: 7, form, ..e };
            assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        }
        let mut v1 = vec![1u8];
        for n in [1u64, 2, 3] {
            v1.extend_from_slice(&n.to_be_bytes());
        }
        assert_eq!(IndexEntry::decode(&v1), Some(e), "layout 4's entries read as whole, unheld");
        let u = UploadRecord { blob_id: 1, created: 2 };
        assert_eq!(UploadRecord::decode(&u.encode()), Some(u));
        let p = UploadProgress { committed: 1, stored: 2, updated: 3 };
        assert_eq!(UploadProgress::decode(&p.encode()), Some(p));
        let q = QueueValue { since_ms: 1, bytes: 2 };
        assert_eq!(QueueValue::decode(&q.encode()), Some(q));
        let d = Function::Sha384.digest(b"queued");
        assert_eq!(queued_of_key(&queue_blob_key(&d)), Some(Queued::Blob(d)));
        let action = Digest::new(d.function, d.hash(), 0).unwrap();
        let instance = "team/main".to_string();
        assert_eq!(
            queued_of_key(&queue_ac_key(&instance, &d)),
            Some(Queued::ActionResult { instance, action })
        );
        assert!(*queue_blob_key(&d) < *queue_ac_key("", &d));
        assert_eq!(IndexEntry::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn version_1_action_keys_are_re_keyed_once() {
        let action = Function::Blake3.digest(b"action");
        let mut v1 = b"team/main\0".to_vec();
        v1.extend_from_slice(&index_key(&action));
        let v2 = ac_key_from_v1(&v1).unwrap();
        assert_eq!(v2, ac_key("team/main", &action));
        assert_eq!(ac_key_from_v1(&v2), None, "a re-keyed key is left alone");
    }

    #[test]
    fn chunk_keys_sort_by_blob_then_offset() {
        assert!(chunk_key(1, u64::MAX) < chunk_key(2, 0));
        assert!(chunk_key(1, 255) < chunk_key(1, 256));
        assert!(USAGE_KEY < chunk_key(1, 0));
        let d = Digest::of(b"x");
        assert!(*lru_key(1, &d) < *lru_key(2, &Digest::of(b"a")));
    }
}
