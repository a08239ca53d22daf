//! Packs: the small blobs of one write go to the object store together, as
//! one object, so that the bucket takes them at its rate of bytes rather
//! than at its rate of requests (a gateway that answers a few thousand
//! requests a second would otherwise bound small-blob write-through and
//! cold reads).
//!
//! A pack, `larder/v1/pack/{ms}-{id}` (`ms`: when its writer sent it, in
//! milliseconds since 1970, 13 digits; `id`: 16 random hex digits), is the 8
//! bytes `LARDERP\n`, the length of its index (u32, little-endian), the
//! index: the number of blobs (u32, little-endian), then per blob its digest
//! (its function's key byte, its hash and its size, u64 little-endian) and
//! the length of its record (u32, little-endian); the CRC-32C of the index
//! (u32, little-endian); then the records, back to back in the index's
//! order, each a blob's chunks as a blob object holds them (length, u32
//! little-endian, and the chunk codec's value).
//!
//! Every node keeps an index of the packs it knows: which pack holds a blob,
//! and where. It learns packs by writing them and by listing the bucket's
//! packs: all of them when it starts and hourly (a pack no longer listed is
//! forgotten), and, at most once a second when a lookup finds a blob in no
//! known pack, those named from [`LATE`] before the newest it listed (a pack
//! sent that much later than its name says is learnt at the next full
//! listing). Each new pack's index is read by a range GET.
//!
//! A pack is known present for `s3_existence_ttl` after this node wrote it,
//! read it or found it by a HEAD (each of which records a use of it, as of
//! any object: the trimmer deletes a pack whole, by its last use); after
//! that, one HEAD of the pack answers for all its blobs. A pack found gone
//! is forgotten. A read of a packed blob brings its whole pack into the
//! local tier: blobs written together are mostly read together.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use futures::{FutureExt, StreamExt};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::known::Identity;
use super::{Bucket, Error, Requests};
use crate::crc::crc32c;
use crate::digest::{Digest, Function};

pub const MAGIC: &[u8; 8] = b"LARDERP\n";
/// Blobs smaller than this go up in packs: those the local tier keeps in
/// RocksDB rather than in files of their own.
pub const PACKED_BELOW: u64 = 256 << 10;
/// A pack holds records of about this many bytes at most (one record alone
/// may be larger), so that a read of one of its blobs brings in little more
/// than its neighbours, and the trimmer frees space in small steps.
pub const PACK_BYTES: usize = 1 << 20;
/// Blobs in a pack at most.
pub const PACK_BLOBS: usize = 4096;
/// Bytes of blobs in a pack at most, decoded (what a reader holds while it
/// stores them): compressible blobs make packs smaller than [`PACK_BYTES`].
pub const PACK_DATA: u64 = 4 << 20;
/// Largest index: the count, and each blob's digest (the longest hash is 64
/// bytes) and record length.
const MAX_INDEX: usize = 4 + PACK_BLOBS * (1 + 64 + 8 + 4);
/// Largest object taken for a pack: its index, a full pack and one more
/// record of a blob just under [`PACKED_BELOW`] (in chunks as small as 4 KiB,
/// each with its length and codec overhead).
pub const MAX_PACK: u64 = (12 + MAX_INDEX + 4 + PACK_BYTES) as u64 + 2 * PACKED_BELOW;
/// Bytes of a pack read first when learning its index: the index of a pack
/// of blobs of 3 KiB or more (45 bytes a blob, for SHA-256).
const INDEX_PEEK: u64 = 16 << 10;
/// A listing for new packs starts this long before the newest pack listed.
pub const LATE: Duration = Duration::from_secs(30);
/// A lookup that finds a blob in no known pack lists the bucket's new packs
/// if the last listing is older than this.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// All packs are listed this often (packs deleted meanwhile are forgotten).
pub const FULL_SYNC_EVERY: Duration = Duration::from_secs(3600);
/// Packs read at once, by this node: each holds up to [`MAX_PACK`] bytes and
/// [`PACK_DATA`] decoded while its blobs are stored (55 MiB in all).
const READS_IN_FLIGHT: usize = 8;
/// Packs whose names a listing keeps to read their indexes, at most: the
/// newest, if there are more (each holds a blob or more, and an index full
/// of newer packs would forget older ones at once).
const NEW_PACKS_LISTED: usize = 1 << 17;
/// How long a read of a blob waits for another call's read of its pack
/// (which a stalled object store may hold for minutes) before reading it
/// itself.
const READ_WAIT: Duration = Duration::from_secs(10);

/// This node's clock, in milliseconds since 1970: what pack names carry.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_millis() as u64)
}

/// A pack's record of one blob: where it is in the pack object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub digest: Digest,
    pub offset: u32,
    pub len: u32,
}

/// A pack object's name under `larder/v1/`, for a pack sent at `ms`.
pub fn name(ms: u64, id: u64) -> String {
    format!("pack/{ms:013}-{id:016x}")
}

/// The time and id of a pack's name; `None` for any other object.
pub fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (ms, id) = name.strip_prefix("pack/")?.split_once('-')?;
    let valid = ms.len() == 13 && id.len() == 16 && ms.bytes().all(|b| b.is_ascii_digit());
    valid.then(|| Some((ms.parse().ok()?, u64::from_str_radix(id, 16).ok()?))).flatten()
}

/// A pack of `blobs` (each a digest and its chunks as the codec stored
/// them): the object's parts, to send without copying the chunks, and the
/// records.
pub fn encode(blobs: &[(Digest, Vec<Bytes>)]) -> (Vec<Bytes>, Vec<Record>) {
    let mut index = BytesMut::with_capacity(4 + blobs.len() * 46);
    index.extend_from_slice(&(blobs.len() as u32).to_le_bytes());
    let lens: Vec<u32> =
        blobs.iter().map(|(_, chunks)| chunks.iter().map(|c| 4 + c.len() as u32).sum()).collect();
    for ((digest, _), len) in blobs.iter().zip(&lens) {
        index.extend_from_slice(&[digest.function as u8]);
        index.extend_from_slice(digest.hash());
        index.extend_from_slice(&digest.size.to_le_bytes());
        index.extend_from_slice(&len.to_le_bytes());
    }
    let mut head = BytesMut::with_capacity(16 + index.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&(index.len() as u32).to_le_bytes());
    head.extend_from_slice(&index);
    head.extend_from_slice(&crc32c(&index).to_le_bytes());
    let mut offset = head.len() as u32;
    let mut parts = vec![head.freeze()];
    let mut records = Vec::with_capacity(blobs.len());
    for ((digest, chunks), len) in blobs.iter().zip(lens) {
        records.push(Record { digest: *digest, offset, len });
        offset += len;
        for chunk in chunks {
            parts.push(Bytes::copy_from_slice(&(chunk.len() as u32).to_le_bytes()));
            parts.push(chunk.clone());
        }
    }
    (parts, records)
}

/// How many bytes from the start of a pack hold its index, from its first
/// 12 bytes.
pub fn index_end(head: &[u8]) -> Result<usize, Error> {
    let rest = head.strip_prefix(MAGIC).ok_or_else(|| damaged("it is not a larder pack"))?;
    let len = rest.first_chunk::<4>().ok_or_else(|| damaged("it is truncated"))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_INDEX {
        return Err(damaged(&format!("its index declares {len} bytes")));
    }
    Ok(12 + len + 4)
}

/// The records of a pack of `size` bytes, from its first bytes (at least
/// [`index_end`] of them): the index checked against its checksum, every
/// record within the object.
pub fn records(head: &[u8], size: u64) -> Result<Vec<Record>, Error> {
    let end = index_end(head)?;
    if head.len() < end {
        return Err(damaged("it is truncated"));
    }
    let index = &head[12..end - 4];
    let crc = u32::from_le_bytes(head[end - 4..end].try_into().expect("4 bytes"));
    if crc32c(index) != crc {
        return Err(damaged("its index fails its checksum"));
    }
    let (count, mut rest) = index.split_first_chunk::<4>().ok_or_else(|| damaged("its index is empty"))?;
    let count = u32::from_le_bytes(*count) as usize;
    if count > PACK_BLOBS {
        return Err(damaged(&format!("it declares {count} blobs")));
    }
    let mut records = Vec::with_capacity(count);
    let (mut offset, mut data) = (end as u64, 0);
    for _ in 0..count {
        let function = rest.first().and_then(|&b| Function::from_byte(b));
        let function = function.ok_or_else(|| damaged("a record has an unknown function"))?;
        let hash_len = function.hash_len();
        let Some(entry) = rest.get(1..1 + hash_len + 12) else {
            return Err(damaged("its index is truncated"));
        };
        rest = &rest[1 + hash_len + 12..];
        let (hash, sizes) = entry.split_at(hash_len);
        let blob_size = u64::from_le_bytes(sizes[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(sizes[8..].try_into().expect("4 bytes"));
        let digest = Digest::new(function, hash, blob_size)
            .ok_or_else(|| damaged("a record has a malformed digest"))?;
        if offset + u64::from(len) > size.min(MAX_PACK) {
            return Err(damaged("a record runs past its end"));
        }
        // Beyond what this version writes: maybe a later one's, not read here.
        data += blob_size;
        if blob_size >= PACKED_BELOW || data > PACK_DATA {
            return Err(damaged("its blobs are larger than this version of larder packs"));
        }
        records.push(Record { digest, offset: offset as u32, len });
        offset += u64::from(len);
    }
    if !rest.is_empty() {
        return Err(damaged("its index has bytes after its records"));
    }
    Ok(records)
}

/// The chunks of a record (each as the codec stored it, none longer than
/// `max_chunk`).
pub fn chunks(record: &Bytes, max_chunk: usize) -> Result<Vec<Bytes>, Error> {
    let mut chunks = Vec::new();
    let mut at = 0;
    while at < record.len() {
        let len = record.get(at..at + 4).ok_or_else(|| damaged("a record is truncated"))?;
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if len > max_chunk || at + 4 + len > record.len() {
            return Err(damaged(&format!("a record declares a chunk of {len} bytes")));
        }
        chunks.push(record.slice(at + 4..at + 4 + len));
        at += 4 + len;
    }
    Ok(chunks)
}

fn damaged(what: &str) -> Error {
    Error::Damaged(format!("pack: {what}"))
}

/// Where one blob is, in the index (keyed by [`key_of`] its hash).
#[derive(Clone, Copy)]
struct Entry {
    /// The end of the blob's hash: a blob matches only if its key and this
    /// do (a collision of 128 bits of a hash is out of reach), and its size.
    check: u64,
    size: u64,
    pack: u32,
}

/// A pack in the index.
struct Pack {
    name: Arc<str>,
    /// The id in its name: the fingerprint of its last-use marker.
    id: u64,
    /// When this node last knew it present.
    confirmed: Option<Instant>,
    /// When this node added it to its index.
    learnt: Instant,
    /// Entries that name it (some may name a newer pack since).
    blobs: usize,
    /// Held while this node reads it, so that one read serves all waiting.
    reading: Arc<tokio::sync::Mutex<()>>,
}

/// A pack that holds a blob asked about.
#[derive(Clone)]
pub struct Held {
    /// Its number in this node's index.
    pub pack: u32,
    pub name: Arc<str>,
    pub id: u64,
    /// Known present: written, read or found by this node within the
    /// existence time to live.
    pub fresh: bool,
    pub reading: Arc<tokio::sync::Mutex<()>>,
}

impl Held {
    /// Takes the turn to read this pack, waiting for another call's read
    /// of it for a while: one read serves all the calls that want its
    /// blobs. `None` if the wait was too long (read it anyway, then).
    pub async fn read_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        tokio::time::timeout(READ_WAIT, Arc::clone(&self.reading).lock_owned()).await.ok()
    }
}

struct Index {
    blobs: HashMap<u64, Entry, BuildHasherDefault<Identity>>,
    packs: HashMap<u32, Pack>,
    /// Packs by name: oldest first, the first to go when the index is full.
    names: BTreeMap<Arc<str>, u32>,
    next: u32,
    /// The newest pack time listed, and when listings began.
    newest_ms: Option<u64>,
    listed: Option<Instant>,
    listed_all: Option<Instant>,
}

/// The packs this node knows, and which blob each holds.
pub struct Packs {
    index: Mutex<Index>,
    /// Most blobs indexed (0: packs are neither written nor read).
    pub(super) max: usize,
    ttl: Duration,
    /// Wakes the indexer for a listing that a lookup wants.
    wanted: tokio::sync::Notify,
    /// Listings ended so far (done or failed), for lookups waiting on one.
    done: tokio::sync::watch::Sender<u64>,
    /// Whether the indexer is listing.
    running: std::sync::atomic::AtomicBool,
    /// Turns for reading packs.
    pub(super) reads: tokio::sync::Semaphore,
    /// Ids of the packs this node writes: its packs counted, hashed with
    /// keys random to this process, so that no two nodes pick the same.
    ids: std::collections::hash_map::RandomState,
    sent: AtomicU64,
}

/// A listing to make of the bucket's packs.
pub enum Listing {
    /// All of them.
    All,
    /// Those named from this time on.
    From(u64),
}

/// The index's key of a blob: the start of its hash, and its function
/// (not its size: Bazel's HTTP cache names blobs by hash alone).
fn key_of(function: Function, hash: &[u8]) -> u64 {
    let head = u64::from_le_bytes(hash[..8].try_into().expect("every hash has 8 bytes or more"));
    head ^ ((function as u64) << 56)
}

fn check_of(hash: &[u8]) -> u64 {
    u64::from_le_bytes(hash[hash.len() - 8..].try_into().expect("every hash has 8 bytes or more"))
}

impl Packs {
    pub fn new(ttl: Duration, max: usize) -> Packs {
        let index = Index {
            blobs: HashMap::default(),
            packs: HashMap::new(),
            names: BTreeMap::new(),
            next: 0,
            newest_ms: None,
            listed: None,
            listed_all: None,
        };
        Packs {
            index: Mutex::new(index),
            max,
            ttl,
            wanted: tokio::sync::Notify::new(),
            done: tokio::sync::watch::Sender::new(0),
            running: std::sync::atomic::AtomicBool::new(false),
            reads: tokio::sync::Semaphore::new(READS_IN_FLIGHT),
            ids: std::collections::hash_map::RandomState::new(),
            sent: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this node writes and reads packs.
    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// The pack holding each of `digests`, if this node knows one.
    pub fn find(&self, digests: &[Digest]) -> Vec<Option<Held>> {
        if !self.enabled() {
            return vec![None; digests.len()];
        }
        let index = self.lock();
        digests
            .iter()
            .map(|d| {
                if d.size >= PACKED_BELOW {
                    return None;
                }
                let entry = index.blobs.get(&key_of(d.function, d.hash()))?;
                if entry.check != check_of(d.hash()) || entry.size != d.size {
                    return None;
                }
                let pack = index.packs.get(&entry.pack)?;
                Some(Held {
                    pack: entry.pack,
                    name: Arc::clone(&pack.name),
                    id: pack.id,
                    fresh: pack.confirmed.is_some_and(|t| t.elapsed() < self.ttl),
                    reading: Arc::clone(&pack.reading),
                })
            })
            .collect()
    }

    /// The blob whose hash is `hash`, if a known pack holds it.
    pub fn find_by_hash(&self, function: Function, hash: &[u8]) -> Option<Digest> {
        if !self.enabled() || hash.len() != function.hash_len() {
            return None;
        }
        let index = self.lock();
        let entry = index.blobs.get(&key_of(function, hash)).filter(|e| e.check == check_of(hash))?;
        index.packs.contains_key(&entry.pack).then(|| Digest::new(function, hash, entry.size)).flatten()
    }

    /// The pack `name`'s number in the index, if it is there.
    pub fn number(&self, name: &str) -> Option<u32> {
        self.lock().names.get(name).copied()
    }

    /// Adds the pack `name` holding `records`; `confirmed` if this node
    /// just wrote or read it. Of two packs holding a blob, the one with the
    /// newer name wins. The oldest packs are forgotten when the index is full.
    pub fn add(&self, name: &str, id: u64, records: &[Record], confirmed: bool) {
        if !self.enabled() || records.is_empty() {
            return;
        }
        let mut index = self.lock();
        if let Some(&pack) = index.names.get(name) {
            if confirmed {
                self.confirm_locked(&mut index, pack);
            }
            return;
        }
        let mut pack = index.next;
        while index.packs.contains_key(&pack) {
            pack = pack.wrapping_add(1);
        }
        index.next = pack.wrapping_add(1);
        let shared: Arc<str> = Arc::from(name);
        index.names.insert(Arc::clone(&shared), pack);
        let confirmed = confirmed.then(Instant::now);
        let reading = Arc::new(tokio::sync::Mutex::new(()));
        let learnt = Instant::now();
        index.packs.insert(pack, Pack { name: shared, id, confirmed, learnt, blobs: records.len(), reading });
        let index = &mut *index;
        for r in records {
            let (function, hash) = (r.digest.function, r.digest.hash());
            let entry = Entry { check: check_of(hash), size: r.digest.size, pack };
            let key = key_of(function, hash);
            let newer = |old: &Entry| index.packs.get(&old.pack).is_some_and(|p| *p.name > *name);
            let keep = index.blobs.get(&key).is_some_and(|old| old.check == entry.check && newer(old));
            if !keep {
                index.blobs.insert(key, entry);
            }
        }
        if index.blobs.len() > self.max {
            // Down to 90 %: the entries of packs forgotten since go first,
            // then the oldest packs (a scan per entry or per pack would
            // stall lookups; this scans once per tenth of the index).
            let packs = &index.packs;
            index.blobs.retain(|_, e| packs.contains_key(&e.pack));
            let mut excess = index.blobs.len().saturating_sub(self.max * 9 / 10);
            if excess > 0 {
                while excess > 0 {
                    let Some((_, oldest)) = index.names.pop_first() else { break };
                    if let Some(p) = index.packs.remove(&oldest) {
                        excess = excess.saturating_sub(p.blobs.max(1));
                    }
                }
                let packs = &index.packs;
                index.blobs.retain(|_, e| packs.contains_key(&e.pack));
            }
        }
    }

    fn confirm_locked(&self, index: &mut Index, pack: u32) {
        if let Some(p) = index.packs.get_mut(&pack) {
            p.confirmed = Some(Instant::now());
        }
    }

    /// This node found the pack present just now.
    pub fn confirm(&self, pack: u32) {
        let mut index = self.lock();
        self.confirm_locked(&mut index, pack);
    }

    /// Forgets a pack (found gone or unreadable), and so every blob it
    /// holds: their entries name a pack no longer there, and go when the
    /// index next makes room (a scan of the index per pack would stall
    /// lookups after a trim).
    pub fn forget(&self, pack: u32) {
        let mut index = self.lock();
        if let Some(p) = index.packs.remove(&pack) {
            index.names.remove(&p.name);
        }
    }

    /// The listing due now, if any, marked begun: none if the last began
    /// less than `every` ago; all packs at first and, if `all_when_due`,
    /// hourly; else those named since the newest listed (less [`LATE`]).
    pub fn listing_due(&self, every: Duration, all_when_due: bool) -> Option<Listing> {
        let mut index = self.lock();
        let now = Instant::now();
        if index.listed.is_some_and(|t| now.duration_since(t) < every) {
            return None;
        }
        let all_due = index.listed_all.is_none_or(|t| now.duration_since(t) >= FULL_SYNC_EVERY);
        index.listed = Some(now);
        match index.newest_ms {
            Some(ms) if !(all_due && all_when_due) => {
                Some(Listing::From(ms.saturating_sub(LATE.as_millis() as u64)))
            }
            _ => {
                index.listed_all = Some(now);
                Some(Listing::All)
            }
        }
    }

    /// Whether a listing is due: none began within `every`.
    fn due(&self, every: Duration) -> bool {
        self.lock().listed.is_none_or(|t| t.elapsed() >= every)
    }

    /// After a listing: the newest pack time it saw, and (for a listing of
    /// all packs) the known packs it saw, the others being gone (but those
    /// learnt or found present since the listing began).
    pub fn listed(&self, newest_ms: Option<u64>, all: Option<&HashSet<u32>>) {
        let mut index = self.lock();
        let index = &mut *index;
        index.newest_ms = index.newest_ms.max(newest_ms);
        if let (Some(all), Some(began)) = (all, index.listed_all) {
            let kept = |(id, p): (&u32, &Pack)| {
                all.contains(id) || p.learnt >= began || p.confirmed.is_some_and(|t| t >= began)
            };
            let gone: HashSet<u32> = index.packs.iter().filter(|&p| !kept(p)).map(|(&id, _)| id).collect();
            if gone.is_empty() {
                return;
            }
            for pack in &gone {
                if let Some(p) = index.packs.remove(pack) {
                    index.names.remove(&p.name);
                }
            }
            let packs = &index.packs;
            index.blobs.retain(|_, e| packs.contains_key(&e.pack));
        }
    }

    /// Blobs and packs indexed.
    pub fn len(&self) -> (usize, usize) {
        let index = self.lock();
        (index.blobs.len(), index.packs.len())
    }
}

/// Longest a lookup waits for a listing of new packs (another may be
/// listing all of a large bucket): then it asks about each blob.
const LISTING_WAIT: Duration = Duration::from_secs(2);
/// Pack indexes read at once while listing (small range GETs: a node
/// starting, or reading just after another node's writes, may have hundreds
/// to learn while lookups wait).
const INDEXES_IN_FLIGHT: usize = 32;
/// How often the indexer lists new packs, lookups or not.
const INDEX_EVERY: Duration = Duration::from_secs(10);

impl Bucket {
    /// Writes `blobs` (each a digest and its chunks as the local tier
    /// stored them) as one pack, and indexes it.
    pub async fn put_pack(&self, blobs: &[(Digest, Vec<Bytes>)]) -> Result<(), Error> {
        let (parts, records) = encode(blobs);
        let ms = now_ms();
        let id = self.packs.ids.hash_one(self.packs.sent.fetch_add(1, Ordering::Relaxed));
        let name = name(ms, id);
        Requests::count(&self.requests.put);
        self.store.put(&self.path(name.clone()), PutPayload::from_iter(parts)).await?;
        self.packs.add(&name, id, &records, true);
        Ok(())
    }

    /// The pack holding each of `digests`, if a known one does. Blobs in
    /// none are looked for in the bucket's new packs first (at most once a
    /// second, waiting at most until `deadline`).
    pub async fn packs_of(&self, digests: &[Digest], deadline: Option<Instant>) -> Vec<Option<Held>> {
        let mut held = self.packs.find(digests);
        // Only small blobs are packed.
        let unknown = |i: usize| held[i].is_none() && digests[i].size < PACKED_BELOW;
        if !self.packs.enabled() || !(0..digests.len()).any(unknown) {
            return held;
        }
        if self.list_new_packs(deadline).await {
            let missing: Vec<usize> = (0..digests.len()).filter(|&i| unknown(i)).collect();
            let asked: Vec<Digest> = missing.iter().map(|&i| digests[i]).collect();
            for (i, h) in missing.into_iter().zip(self.packs.find(&asked)) {
                held[i] = h;
            }
        }
        held
    }

    /// Has the indexer list the bucket's new packs if no listing began in
    /// the last second, or waits for the one under way; waits at most until
    /// `deadline` and [`LISTING_WAIT`]. Whether a listing ended meanwhile.
    /// (The indexer lists, not the caller: a caller giving up cancels
    /// nothing.)
    pub(super) async fn list_new_packs(&self, deadline: Option<Instant>) -> bool {
        let mut done = self.packs.done.subscribe();
        let before = *done.borrow_and_update();
        if !self.packs.running.load(Ordering::Acquire) {
            if !self.packs.due(SYNC_EVERY) {
                return false;
            }
            self.packs.wanted.notify_one();
        }
        let wait =
            deadline.map_or(LISTING_WAIT, |d| d.saturating_duration_since(Instant::now()).min(LISTING_WAIT));
        matches!(tokio::time::timeout(wait, done.wait_for(|&n| n > before)).await, Ok(Ok(_)))
    }

    /// The pack holding `digest`, if a known one does (see [`Bucket::packs_of`]).
    pub async fn pack_of(&self, digest: &Digest) -> Option<Held> {
        self.packs_of(std::slice::from_ref(digest), None).await.pop().flatten()
    }

    /// A turn to read a pack, to hold until its blobs are stored: packs read
    /// at once are bounded (see [`READS_IN_FLIGHT`]).
    pub async fn pack_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.packs.reads.acquire().await.ok()
    }

    /// The blobs of a pack, each with its chunks as stored (none over
    /// `max_chunk` bytes; not checked here); `None` if it is gone (it is
    /// forgotten then). A read is a use of the pack. Take a
    /// [`Bucket::pack_turn`] first.
    pub async fn read_pack(
        &self,
        held: &Held,
        max_chunk: usize,
    ) -> Result<Option<Vec<(Digest, Vec<Bytes>)>>, Error> {
        Requests::count(&self.requests.get);
        let result = match self.store.get(&self.path(held.name.to_string())).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                self.packs.forget(held.pack);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        // Its size comes from the bucket: bounded before it is buffered.
        let size = result.meta.size;
        if size > MAX_PACK {
            return Err(damaged(&format!("{} is {size} bytes", held.name)));
        }
        let mut object = BytesMut::with_capacity(size as usize);
        let mut stream = result.into_stream();
        while let Some(part) = stream.next().await {
            let part = part?;
            if (object.len() + part.len()) as u64 > size {
                return Err(damaged(&format!("{} holds more than it declares", held.name)));
            }
            object.extend_from_slice(&part);
        }
        let object = object.freeze();
        let blobs = records(&object, object.len() as u64)?
            .into_iter()
            .map(|r| {
                let record = object.slice(r.offset as usize..(r.offset + r.len) as usize);
                Ok((r.digest, chunks(&record, max_chunk)?))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.packs.confirm(held.pack);
        self.touch_pack(held);
        Ok(Some(blobs))
    }

    /// Whether a pack is still there (one HEAD): if so, a use; if not, it
    /// is forgotten.
    pub(super) async fn head_pack(&self, held: &Held) -> Result<bool, Error> {
        Requests::count(&self.requests.head);
        match self.store.head(&self.path(held.name.to_string())).await {
            Ok(_) => {
                self.packs.confirm(held.pack);
                self.touch_pack(held);
                Ok(true)
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.packs.forget(held.pack);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Forgets a pack this node cannot read (damaged, or a later version's),
    /// leaving it in the bucket: its blobs look missing here.
    pub fn forget_unread_pack(&self, held: &Held) {
        self.packs.forget(held.pack);
    }

    /// Deletes a damaged pack (its sound blobs written again first).
    pub async fn forget_pack(&self, held: &Held) -> Result<(), Error> {
        self.packs.forget(held.pack);
        Requests::count(&self.requests.delete);
        match self.store.delete(&self.path(held.name.to_string())).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records a use of a pack, as of any object.
    pub(super) fn touch_pack(&self, held: &Held) -> bool {
        self.touch_object(held.name.to_string(), held.id)
    }

    /// Learns the bucket's packs (see the module's documentation): all of
    /// them at first and hourly, else those named since the newest listed.
    async fn list_packs(&self) -> Result<(), Error> {
        let Some(listing) = self.packs.listing_due(Duration::ZERO, true) else { return Ok(()) };
        let began = Instant::now();
        let prefix = self.path("pack".into());
        let mut stream = match listing {
            Listing::All => self.store.list(Some(&prefix)),
            Listing::From(ms) => {
                self.store.list_with_offset(Some(&prefix), &self.path(format!("pack/{ms:013}")))
            }
        };
        let base = format!("{}/", self.path(String::new()));
        // Known packs this listing saw (a listing of all forgets the others).
        let mut seen = matches!(listing, Listing::All).then(HashSet::new);
        let (mut newest, mut new, mut listed) = (None, std::collections::VecDeque::new(), 0u64);
        // Names from further ahead than a listing reaches back are not
        // trusted to date the next listing (a node whose clock runs ahead
        // would make others miss everyone's new packs until the hourly one).
        let ahead = now_ms() + LATE.as_millis() as u64;
        while let Some(meta) = stream.next().await {
            if listed.is_multiple_of(1000) {
                Requests::count(&self.requests.list);
            }
            listed += 1;
            let meta = meta?;
            let Some(name) = meta.location.as_ref().strip_prefix(base.as_str()) else { continue };
            let Some((ms, id)) = parse_name(name) else { continue };
            if ms <= ahead {
                newest = newest.max(Some(ms));
            }
            match self.packs.number(name) {
                Some(pack) => {
                    if let Some(seen) = &mut seen {
                        seen.insert(pack);
                    }
                }
                None => {
                    if new.len() == NEW_PACKS_LISTED.min(self.packs.max) {
                        new.pop_front();
                    }
                    new.push_back((name.to_string(), id, meta.size));
                }
            }
        }
        // Newest first, a few rounds at a time, until the index is full:
        // older packs would only push out newer ones.
        let new: Vec<_> = new.into_iter().rev().collect();
        for round in new.chunks(4 * INDEXES_IN_FLIGHT) {
            if self.packs.len().0 >= self.packs.max {
                break;
            }
            let reads: Vec<_> = round
                .iter()
                .map(|(name, id, size)| {
                    async move { (self.read_index(name, *size).await, name, *id) }.boxed()
                })
                .collect();
            let mut learnt = futures::stream::iter(reads).buffer_unordered(INDEXES_IN_FLIGHT);
            while let Some((records, name, id)) = learnt.next().await {
                match records {
                    Ok(Some(records)) => self.packs.add(name, id, &records, false),
                    Ok(None) => {}
                    Err(Error::Damaged(what)) => tracing::warn!("skipped the object {name}: {what}"),
                    Err(e) => return Err(e),
                }
            }
        }
        self.packs.listed(newest, seen.as_ref());
        tracing::debug!("listed {listed} packs of the object store in {:?}", began.elapsed());
        Ok(())
    }

    /// A pack's records, from the start of its object; `None` if it is gone.
    async fn read_index(&self, name: &str, size: u64) -> Result<Option<Vec<Record>>, Error> {
        if size < 16 {
            return Err(damaged("it is truncated"));
        }
        let path = self.path(name.to_string());
        Requests::count(&self.requests.get);
        let head = match self.store.get_range(&path, 0..INDEX_PEEK.min(size)).await {
            Ok(head) => head,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let end = index_end(&head)? as u64;
        let head = if end > head.len() as u64 && end <= size {
            Requests::count(&self.requests.get);
            let rest = match self.store.get_range(&path, head.len() as u64..end).await {
                Ok(rest) => rest,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            [head, rest].concat().into()
        } else {
            head
        };
        records(&head, size).map(Some)
    }

    /// Lists the bucket's packs every [`INDEX_EVERY`] and whenever a lookup
    /// wants it, until aborted; `None` if this node does not use packs.
    pub fn indexer(self: &Arc<Self>) -> Option<impl Future<Output = ()> + Send + 'static + use<>> {
        if !self.packs.enabled() {
            return None;
        }
        let bucket = Arc::clone(self);
        Some(async move {
            loop {
                bucket.packs.running.store(true, Ordering::Release);
                let listed = bucket.list_packs().await;
                bucket.packs.running.store(false, Ordering::Release);
                bucket.packs.done.send_modify(|n| *n += 1);
                if let Err(e) = listed {
                    tracing::warn!(
                        "could not list the object store's packs: {e}; trying again in {INDEX_EVERY:?}"
                    );
                }
                tokio::select! {
                    () = bucket.packs.wanted.notified() => {}
                    () = tokio::time::sleep(INDEX_EVERY) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blob(n: u32) -> (Digest, Vec<Bytes>) {
        let data = format!("blob number {n}").into_bytes();
        let value = Bytes::from(crate::store::chunk::encode(&data, 3));
        (Digest::of(&data), vec![value])
    }

    fn object(blobs: &[(Digest, Vec<Bytes>)]) -> (Bytes, Vec<Record>) {
        let (parts, records) = encode(blobs);
        (parts.concat().into(), records)
    }

    #[test]
    fn packs_round_trip_and_any_change_to_the_index_is_damage() {
        let mut blobs: Vec<_> = (0..20).map(blob).collect();
        let other = Function::ALL.iter().map(|f| f.digest(b"another function")).collect::<Vec<_>>();
        for d in other {
            blobs.push((d, vec![Bytes::from_static(b"not a real chunk")]));
        }
        let (object, written) = object(&blobs);
        let read = records(&object, object.len() as u64).unwrap();
        assert_eq!(read, written);
        for (r, (digest, chunks_in)) in read.iter().zip(&blobs) {
            assert_eq!(r.digest, *digest);
            let record = object.slice(r.offset as usize..(r.offset + r.len) as usize);
            assert_eq!(&chunks(&record, 1 << 20).unwrap(), chunks_in);
        }
        let end = index_end(&object).unwrap();
        for i in 0..end {
            let mut bad = object.to_vec();
            bad[i] ^= 0x10;
            assert!(records(&bad, bad.len() as u64).is_err(), "byte {i} changed");
        }
        assert!(records(&object[..end - 1], object.len() as u64).is_err(), "truncated index");
        assert!(records(&object, object.len() as u64 - 1).is_err(), "a record past the end");
        assert!(chunks(&Bytes::from_static(&[9, 0, 0, 0, 1]), 1 << 20).is_err());
        assert!(chunks(&Bytes::from_static(&[1, 0, 0, 0, 1]), 0).is_err());
    }

    #[test]
    fn names_round_trip_and_others_are_refused() {
        let n = name(1_700_000_000_123, 0xdead_beef);
        assert_eq!(parse_name(&n), Some((1_700_000_000_123, 0xdead_beef)));
        for bad in ["pack/1-2", "cas/1700000000123-00000000deadbeef", "pack/17000000001x3-00000000deadbeef"] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_index_finds_blobs_forgets_packs_and_stays_within_its_bound() {
        let packs = Packs::new(Duration::from_secs(60), 100);
        let records = |from: u32, n: u32| -> Vec<Record> {
            (from..from + n).map(|i| Record { digest: blob(i).0, offset: 0, len: 1 }).collect()
        };
        packs.add(&name(1, 1), 1, &records(0, 40), true);
        packs.add(&name(2, 2), 2, &records(40, 40), false);
        let found = packs.find(&[blob(0).0, blob(41).0, blob(1000).0]);
        assert!(found[0].as_ref().is_some_and(|h| h.fresh && h.id == 1));
        assert!(found[1].as_ref().is_some_and(|h| !h.fresh && h.id == 2));
        assert!(found[2].is_none());
        let second = found[1].as_ref().unwrap().pack;
        packs.forget(second);
        assert!(packs.find(&[blob(41).0])[0].is_none());
        assert_eq!(packs.number(&name(2, 2)), None);
        // Over the bound: the oldest packs go.
        for p in 3..10u32 {
            packs.add(&name(p.into(), p.into()), p.into(), &records(p * 100, 40), false);
        }
        assert!(packs.len().0 <= 100);
        assert!(packs.find(&[blob(0).0])[0].is_none(), "the oldest pack is forgotten");
        assert!(packs.find(&[blob(901).0])[0].is_some(), "the newest is kept");
        // A listing of all packs forgets those it did not see, but those
        // learnt since it began.
        assert!(matches!(packs.listing_due(Duration::ZERO, true), Some(Listing::All)));
        let seen: HashSet<u32> = packs.number(&name(9, 9)).into_iter().collect();
        packs.add(&name(10, 10), 10, &records(2000, 4), false);
        packs.listed(Some(9), Some(&seen));
        assert_eq!(packs.len().1, 2);
        assert!(packs.find(&[blob(2001).0])[0].is_some());
        assert!(packs.listing_due(Duration::from_secs(60), false).is_none(), "within a minute");
        assert!(matches!(packs.listing_due(Duration::ZERO, false), Some(Listing::From(_))));
        let off = Packs::new(Duration::from_secs(60), 0);
        off.add(&name(1, 1), 1, &records(0, 4), true);
        assert!(off.find(&[blob(0).0])[0].is_none());
    }

    proptest! {
        #![proptest_config(crate::hostile::config())]
        /// A pack's head is anyone's bytes: it parses, or is damaged, and
        /// never yields more records than the limit or one past its end.
        #[test]
        fn any_pack_head_parses_or_is_damaged(rest in crate::hostile::bytes(), len in any::<u32>(), size in any::<u64>()) {
            let mut head = MAGIC.to_vec();
            head.extend_from_slice(&len.to_le_bytes());
            head.extend_from_slice(&rest);
            if let Ok(records) = records(&head, size) {
                prop_assert!(records.len() <= PACK_BLOBS);
                for r in records {
                    prop_assert!(u64::from(r.offset) + u64::from(r.len) <= size.min(MAX_PACK));
                }
            }
        }
    }
}
