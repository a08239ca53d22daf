//! Which blobs are present, and under which blob id, in memory:
//! FindMissingBlobs is answered here without a RocksDB lookup, and a batch
//! read finds its blobs' chunks without one, as long as every stored blob
//! fits the bound.
//!
//! The set may lag the index, never lead it: a digest enters only after the
//! write that stored it, under its stripe's lock, and leaves before the write
//! that deletes it, under the same lock. So "present" here is always true of
//! the index, and the worst a lag does is call a stored blob missing for a
//! moment, which costs a client one needless upload (it is found present).
//! A blob keeps its id for as long as its index entry lives (a blob stored
//! anew, as a splice's replacement, is deleted and entered again), so the id
//! here is the index's; a reader that finds the blob's chunks gone meanwhile
//! reads the index.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockWriteGuard};

use crate::digest::Digest;

/// The most bytes the set spends per blob: a slot is a 24-byte key, an
/// 8-byte [`Slot`] and a control byte, and a table is between 7/16 full
/// (just grown) and 7/8 full, so 33 * 16/7 at worst (about 52 on average).
pub const BYTES_PER_BLOB: usize = 76;

/// Locks are per shard, so that a shard growing (rehashing every key it
/// holds) stalls only the lookups that fall in it.
const SHARDS: usize = 64;

/// A digest reduced to 24 bytes: the first 15 bytes of its hash (every
/// digest function's hash has at least 20), its function, and its size.
/// Only verified blobs enter the set, so two stored blobs share a key only
/// if their hashes share 120 bits; a digest a client makes up to match a
/// stored blob's key names bytes that nobody can produce, so calling it
/// present misleads nobody.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key([u64; 3]);

impl Key {
    fn of(d: &Digest) -> Key {
        let hash = d.hash();
        let mut head = [0u8; 16];
        head[..15].copy_from_slice(&hash[..15]);
        head[15] = d.function as u8;
        let [a, b] = [&head[..8], &head[8..]].map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")));
        Key([a, b, d.size])
    }

    fn shard(&self) -> usize {
        // Hash bytes are uniform; the table hashes the whole key again.
        (self.0[0] >> 58) as usize % SHARDS
    }
}

/// A present blob's id, and a check of the hash bytes its key leaves out.
/// Keys of two different stored blobs could be made to meet (a birthday
/// search over 120 bits is costly, not impossible): the id must then not
/// serve one blob's bytes for the other. The check is keyed by a secret of
/// this process, so no one can make it meet as well; a blob whose check
/// differs is read through the index.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Slot(u64);

/// Bits of a [`Slot`] for the blob id: ids are allocated one per upload, so
/// 2^40 lasts decades of writes at any rate larder reaches. A larger id is
/// entered without one (read through the index).
const ID_BITS: u32 = 40;
pub(super) const NO_ID: u64 = (1 << ID_BITS) - 1;

impl Slot {
    fn new(blob_id: u64, check: u64) -> Slot {
        Slot(check << ID_BITS | blob_id.min(NO_ID))
    }

    /// The blob id, if `check` (a digest's) is this slot's.
    fn blob_id(self, check: u64) -> Option<u64> {
        let id = self.0 & NO_ID;
        (id != NO_ID && self.0 >> ID_BITS == check).then_some(id)
    }
}

type Map = HashMap<Key, Slot, foldhash::fast::RandomState>;
type Shard = RwLock<Map>;

pub(super) struct Present {
    shards: Box<[Shard]>,
    entries: AtomicUsize,
    /// Most entries the set holds; past it, new blobs are not entered.
    limit: usize,
    /// Whether every blob in the index is in the set: then a digest that is
    /// not in it is absent. Once a blob is left out, it stays false.
    complete: AtomicBool,
    /// The key of the slots' checks (SipHash, seeded at random).
    secret: RandomState,
}

impl Present {
    /// An empty set of at most `max_bytes`, complete (a new index is empty;
    /// an existing one is entered before the store serves).
    pub fn new(max_bytes: u64) -> Present {
        Present {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            entries: AtomicUsize::new(0),
            limit: usize::try_from(max_bytes).unwrap_or(usize::MAX) / BYTES_PER_BLOB,
            complete: AtomicBool::new(max_bytes > 0),
            secret: RandomState::new(),
        }
    }

    /// The check of `d`'s hash in a [`Slot`]: its top bits.
    fn check(&self, d: &Digest) -> u64 {
        self.secret.hash_one(d.hash()) >> ID_BITS
    }

    fn shard(&self, key: &Key) -> RwLockWriteGuard<'_, Map> {
        self.shards[key.shard()].write().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for `blobs` entries (up to the bound), so that entering
    /// them at open rehashes little.
    pub fn reserve(&self, blobs: u64) {
        let per_shard = usize::try_from(blobs).unwrap_or(usize::MAX).min(self.limit) / SHARDS;
        for shard in self.shards.iter() {
            shard.write().unwrap_or_else(|e| e.into_inner()).reserve(per_shard);
        }
    }

    /// Enters a blob the index now holds (call after the write that stored
    /// it, holding its stripe). Past the bound the set stops being complete.
    /// A writer that finds its blob indexed already enters it too: a delete
    /// whose write failed took it out of the set, and a client told it is
    /// missing uploads it again, which puts it back. An id of [`NO_ID`] or
    /// more enters the blob without one.
    pub fn insert(&self, d: &Digest, blob_id: u64) {
        if !self.complete.load(Ordering::Relaxed) {
            return;
        }
        if self.entries.load(Ordering::Relaxed) >= self.limit {
            if self.complete.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    "the in-memory index of present blobs is full ({} blobs): FindMissingBlobs asks RocksDB from now on; raise index_memory to keep it in memory",
                    self.limit
                );
            }
            return;
        }
        let (key, slot) = (Key::of(d), Slot::new(blob_id, self.check(d)));
        if self.shard(&key).insert(key, slot).is_none() {
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes a blob out before the write that deletes it (holding its stripe).
    pub fn remove(&self, d: &Digest) {
        let key = Key::of(d);
        if self.shard(&key).remove(&key).is_some() {
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether `d` is present: `Some` when the set can say, `None` when only
    /// the index can (the set is incomplete and `d` is not in it).
    pub fn lookup(&self, d: &Digest) -> Option<bool> {
        let key = Key::of(d);
        let shard = self.shards[key.shard()].read().unwrap_or_else(|e| e.into_inner());
        match shard.contains_key(&key) {
            true => Some(true),
            false => self.complete.load(Ordering::Relaxed).then_some(false),
        }
    }

    /// The blob id of `d`, if the set holds it (else the index may).
    pub fn blob_id(&self, d: &Digest) -> Option<u64> {
        let key = Key::of(d);
        let slot = *self.shards[key.shard()].read().unwrap_or_else(|e| e.into_inner()).get(&key)?;
        slot.blob_id(self.check(d))
    }

    /// Blobs in the set, and whether it holds every present blob.
    pub fn len(&self) -> (usize, bool) {
        (self.entries.load(Ordering::Relaxed), self.complete.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes the tables take: a key, a slot and a control byte for every
    /// bucket, full or not (std's capacity is 7/8 of the buckets, or one
    /// fewer than the buckets under 8).
    fn table_bytes(set: &Present) -> usize {
        let slot = std::mem::size_of::<(Key, Slot)>() + 1;
        let buckets = |capacity: usize| match capacity {
            0 => 0,
            c if c < 8 => (c + 1).next_power_of_two(),
            c => (c * 8 / 7).next_power_of_two(),
        };
        set.shards.iter().map(|s| buckets(s.read().unwrap().capacity()) * slot).sum()
    }

    #[test]
    fn the_tables_stay_inside_the_bound_however_full_they_are() {
        // Bounds 8 % apart, so that some fill every shard just past a
        // doubling, where a table is least full.
        let mut next = 0u64;
        let mut max_bytes = 1u64 << 20;
        while max_bytes < 16 << 20 {
            let set = Present::new(max_bytes);
            for _ in 0..set.limit + 10 {
                set.insert(&Digest::of(&next.to_le_bytes()), next);
                next += 1;
            }
            assert_eq!(set.len(), (set.limit, false), "full, so no longer complete");
            let bytes = table_bytes(&set);
            assert!(bytes <= max_bytes as usize, "{bytes} bytes for a bound of {max_bytes}");
            max_bytes = max_bytes * 108 / 100;
        }
    }

    #[test]
    fn a_full_set_answers_what_it_holds_and_leaves_the_rest_to_the_index() {
        let set = Present::new(2 * BYTES_PER_BLOB as u64);
        let [a, b, c] = [b"a", b"b", b"c"].map(|data| Digest::of(data));
        set.insert(&a, 1);
        assert_eq!((set.lookup(&a), set.lookup(&b)), (Some(true), Some(false)));
        set.insert(&b, 2);
        set.insert(&c, 3);
        assert_eq!([a, b, c].map(|d| set.lookup(&d)), [Some(true), Some(true), None]);
        assert_eq!([a, b, c].map(|d| set.blob_id(&d)), [Some(1), Some(2), None]);
        set.remove(&a);
        assert_eq!(set.lookup(&a), None, "once incomplete, absent here is unknown");
        assert_eq!(set.len(), (1, false));
        assert_eq!(Present::new(0).lookup(&a), None, "0 turns the set off");
    }

    #[test]
    fn a_blob_id_is_given_only_for_the_digest_that_entered_it() {
        let set = Present::new(1 << 20);
        let a = Digest::of(b"a");
        set.insert(&a, 7);
        assert_eq!(set.blob_id(&a), Some(7));
        set.insert(&a, 9);
        assert_eq!((set.blob_id(&a), set.len().0), (Some(9), 1), "entered again under a new id");
        // A digest whose key meets a stored one's, with other hash bytes
        // past it: present by the key, but not placed by it.
        let mut hash = a.hash().to_vec();
        *hash.last_mut().unwrap() ^= 1;
        let twin = Digest::new(a.function, &hash, a.size).unwrap();
        assert_eq!((set.lookup(&twin), set.blob_id(&twin)), (Some(true), None));
        // The largest ids are entered without one: read through the index.
        set.insert(&a, NO_ID);
        assert_eq!((set.lookup(&a), set.blob_id(&a)), (Some(true), None));
        set.insert(&a, NO_ID - 1);
        assert_eq!(set.blob_id(&a), Some(NO_ID - 1));
    }
}
