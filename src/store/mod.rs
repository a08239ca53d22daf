//! The blob store on RocksDB: the only code that knows column families and
//! key formats (see [`layout`]). Every method is synchronous and may block on
//! disk or CPU: async callers run them on the blocking pool.

mod actions;
pub mod chunk;
mod evict;
mod files;
mod layout;
mod queue;
mod upload;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode,
    Options, ReadOptions, WriteBatch, WriteOptions,
};

use crate::digest::{Digest, Encoding, Function};
pub use evict::Evicted;
use layout::*;
pub use queue::{BACKFILLED, QueueEntry, Queued};
pub use upload::Upload;

/// Tuning that callers choose; the layout itself is not configurable.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Uncompressed bytes per stored chunk.
    pub chunk_size: usize,
    /// zstd level of stored chunks; 0 stores them uncompressed.
    pub zstd_level: i32,
    /// fsync the WAL on every commit.
    pub sync_writes: bool,
    /// Chunks of 4 KiB or more of blobs under 256 KiB go to RocksDB's blob
    /// files, not into SST files (larger blobs have files of their own).
    pub blob_files: bool,
    /// RocksDB's block cache (index, filters, and chunks kept in SST files).
    pub cache_size: usize,
    /// The size budget: memtables and the WAL are sized to fit well inside
    /// it, and writes are refused (see [`Store::set_hard_limit`]) above it.
    pub max_size: u64,
    /// Bytes of blobs and action results that may wait in the queue for the
    /// object store tier (see `queue`); 0 without one: nothing is queued.
    pub queue_limit: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_size: 1 << 20,
            zstd_level: 1,
            sync_writes: false,
            blob_files: true,
            cache_size: 32 << 20,
            max_size: 10 << 30,
            queue_limit: 0,
        }
    }
}

pub struct Store {
    db: DB,
    path: PathBuf,
    options: StoreOptions,
    next_blob_id: AtomicU64,
    /// Striped by digest: serializes "is it there? then write" for one digest,
    /// so racing writers never orphan chunks or overwrite a live entry.
    stripes: Box<[Mutex<()>]>,
    /// Uploads being written by a stream right now, by resource name.
    active_uploads: Mutex<HashSet<String>>,
    /// Blobs used since the last access-time flush, with the time of their
    /// last use (see [`Store::flush_access_times`]).
    accessed: Mutex<HashMap<Digest, u64>>,
    /// The same for action results, by `ac` key.
    accessed_results: Mutex<HashMap<Vec<u8>, u64>>,
    /// Blobs of at least [`files::MIN_SIZE`], in files of their own.
    files: files::Files,
    /// Writes are refused while the disk use estimate is above this.
    hard_limit: AtomicU64,
    /// Bytes of RocksDB's files and memtables at the last measurement.
    measured_disk: AtomicU64,
    /// Bytes written to RocksDB since that measurement began (some may be in it).
    written_since: AtomicU64,
    /// Bytes admitted for writing and not yet written (see [`Store::reserve`]).
    reserved: AtomicU64,
    /// The largest write refused since eviction last looked: room it should
    /// make, although the write is not reserved.
    demand: AtomicU64,
    /// Whether the last eviction pass found the disk over its watermark and
    /// nothing old enough to evict.
    eviction_blocked: AtomicBool,
    /// Totals since the store opened, for metrics.
    rejected_writes: AtomicU64,
    corrupt_blobs: AtomicU64,
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
    /// Entries in the queue for the object store, and the bytes they count.
    queued: AtomicU64,
    queued_bytes: AtomicU64,
}

/// A present blob, located for reading.
/// An action result as stored: the action's size, if the client gave one,
/// and the ActionResult protobuf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResult {
    pub size: Option<u64>,
    pub result: Bytes,
}

#[derive(Clone, Copy, Debug)]
pub struct Blob {
    pub digest: Digest,
    blob_id: u64,
}

/// What a scrub checked and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scrubbed {
    pub blobs: u64,
    pub bytes: u64,
    pub removed: u64,
}

/// The store in figures (see [`Store::stats`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub blobs: u64,
    /// Uncompressed bytes of all blobs.
    pub logical_bytes: u64,
    /// Bytes their chunks take, and partial uploads'.
    pub stored_bytes: u64,
    /// Bytes of the data directory: the last measurement, writes since, and
    /// what writes in progress have reserved.
    pub disk_bytes: u64,
    pub max_size: u64,
    pub partial_uploads: u64,
    /// Since the store opened: writes refused at the hard limit, and what
    /// eviction removed.
    pub rejected_writes: u64,
    /// Blobs found corrupt on disk and removed.
    pub corrupt_blobs: u64,
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    /// Whether writes are refused because nothing is old enough to evict.
    pub eviction_blocked: bool,
    /// Blobs and action results waiting to be copied to the object store,
    /// the bytes they count, and the most the queue may count.
    pub queued: u64,
    pub queued_bytes: u64,
    pub queue_limit: u64,
    /// RocksDB's own figures: compaction debt, and whether writes are stopped
    /// or slowed (the delayed rate in bytes/s, 0 when not delayed).
    pub pending_compaction_bytes: u64,
    pub write_stopped: bool,
    pub delayed_write_rate: u64,
}

/// A whole blob to store (see [`Store::put_blobs`]).
pub struct NewBlob {
    pub digest: Digest,
    pub data: Bytes,
    /// The zstd frames the client sent, in order, each with the range of
    /// `data` it decodes to (see [`crate::compression::decompress`]): a frame
    /// that holds exactly one chunk is stored as it is, not compressed again.
    pub frames: Vec<(Range<u64>, Bytes)>,
}

impl NewBlob {
    pub fn new(digest: Digest, data: Bytes) -> NewBlob {
        NewBlob { digest, data, frames: Vec::new() }
    }
}

/// Whether a write stored new bytes or found the blob already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Stored,
    AlreadyPresent,
}

/// Bytes reserved for a write to RocksDB (see [`Store::reserve`]): counted
/// as being written until dropped (written, or failed), then as written since
/// the last measurement, which counts them for good only if it began after
/// that. Bytes the write put in blob files are counted there instead.
struct Admitted<'a> {
    store: &'a Store,
    bytes: u64,
}

impl Admitted<'_> {
    /// Up to `bytes` of the reservation are not needed, or went to blob
    /// files, which count them already.
    fn release(&mut self, bytes: u64) {
        let bytes = bytes.min(self.bytes);
        self.store.unreserve(bytes);
        self.bytes -= bytes;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.store.written_since.fetch_add(self.bytes, Ordering::Relaxed);
        self.store.unreserve(self.bytes);
    }
}

const STRIPES: usize = 256;

fn stripe_of(d: &Digest) -> usize {
    d.hash()[0] as usize % STRIPES
}

impl Store {
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store, Error> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Open(format!("cannot create {}: {e}", path.display())))?;
        let cache = Cache::new_lru_cache(options.cache_size);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);
        // Memtables and the WAL are bytes the budget (or a smaller disk) must
        // hold: small budgets and small disks get small ones.
        let (disk_size, _) = filesystem_space(path).map_err(Error::Measure)?;
        let room = options.max_size.min(disk_size);
        let buffer = (room / 32).clamp(1 << 20, 32 << 20) as usize;
        db_opts.set_max_total_wal_size((room / 32).clamp(1 << 20, 256 << 20));
        // RocksDB's own log lives in the data directory and counts against
        // the budget: warnings only, at most 2 MiB of it.
        db_opts.set_log_level(rocksdb::LogLevel::Warn);
        db_opts.set_keep_log_file_num(2);
        db_opts.set_max_log_file_size(1 << 20);
        // A manifest takes its preallocation on disk at once (4 MiB by default).
        db_opts.set_manifest_preallocation_size(64 << 10);

        let mut point = BlockBasedOptions::default();
        point.set_block_cache(&cache);
        point.set_bloom_filter(10.0, false);
        point.set_cache_index_and_filter_blocks(true);

        let mut index = Options::default();
        index.set_block_based_table_factory(&point);
        index.set_compression_type(DBCompressionType::None); // hashes do not compress
        index.set_write_buffer_size(buffer);

        // Chunks are compressed by larder itself, in parallel worker threads;
        // RocksDB must not compress them again. Chunks of blobs under 256 KiB,
        // from 4 KiB, go to RocksDB's blob files, which compaction does not
        // rewrite; larger blobs have files of their own (`files`).
        let mut chunks = Options::default();
        chunks.set_compression_type(DBCompressionType::None);
        chunks.set_enable_blob_files(options.blob_files);
        chunks.set_min_blob_size(4096);
        // Small enough that garbage collection frees space in fine steps.
        chunks.set_blob_file_size((room / 64).clamp(1 << 20, 256 << 20));
        // Eviction deletes the oldest blobs first, so blob files mostly die
        // whole. Those that live chunks (a hot set) keep alive are collected
        // as compaction meets them, and compacted for it once they are half
        // garbage: only the oldest 2 % of files, because the others hold
        // chunks next in line for eviction, which collecting would rewrite
        // for nothing. (Collecting the oldest quarter took the peak disk of
        // a small-blob load from 1.01x to 1.15x the budget, and cut ingest
        // by a tenth.)
        chunks.set_enable_blob_gc(true);
        chunks.set_blob_gc_age_cutoff(0.02);
        chunks.set_blob_gc_force_threshold(0.5);
        chunks.set_write_buffer_size(buffer);
        chunks.set_max_write_buffer_number(2);
        // Compaction writes its output before it deletes its input: small
        // files and small compactions keep that transient a small part of
        // the budget (RocksDB's defaults, 64 MiB files and 1.6 GiB
        // compactions, are sized for databases, not for a budget).
        chunks.set_target_file_size_base((room / 64).clamp(1 << 20, 64 << 20));
        chunks.set_max_compaction_bytes((room / 16).clamp(4 << 20, 1 << 30));
        chunks.set_max_bytes_for_level_base((room / 8).clamp(8 << 20, 256 << 20));
        chunks.set_merge_operator_associative("larder-usage", merge_usage);
        let mut chunk_table = BlockBasedOptions::default();
        chunk_table.set_block_cache(&cache);
        chunks.set_block_based_table_factory(&chunk_table);

        let mut ac = Options::default();
        ac.set_block_based_table_factory(&point);
        ac.set_compression_type(DBCompressionType::Zstd);

        let mut lru = Options::default();
        lru.set_write_buffer_size(buffer);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_INDEX, index),
            ColumnFamilyDescriptor::new(CF_LRU, lru),
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_UPLOADS, Options::default()),
            ColumnFamilyDescriptor::new(CF_AC, ac),
            ColumnFamilyDescriptor::new(CF_QUEUE, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
            // RocksDB's LOCK file is held by another process.
            let message = e.to_string();
            if message.contains("While lock file")
                || message.contains("/LOCK: Resource temporarily unavailable")
            {
                Error::Locked(path.display().to_string())
            } else {
                Error::Open(format!("cannot open the data directory {}: {e}", path.display()))
            }
        })?;
        match db.get(LAYOUT_KEY)? {
            None => db.put(LAYOUT_KEY, LAYOUT_VERSION)?,
            Some(v) if v == LAYOUT_VERSION => {}
            // Version 4 only adds blob files: a version 3 directory has none.
            Some(v) if v == LAYOUT_VERSION_3 => db.put(LAYOUT_KEY, LAYOUT_VERSION)?,
            Some(v) if v == LAYOUT_VERSION_1 => {
                upgrade_from_v1(&db)?;
                upgrade_from_v2(&db)?;
            }
            Some(v) if v == LAYOUT_VERSION_2 || v == LAYOUT_UPGRADING_TO_3 => upgrade_from_v2(&db)?,
            Some(v) => {
                return Err(Error::Open(format!(
                    "{} holds layout version {}, this larder reads version {}: use a new --dir",
                    path.display(),
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(LAYOUT_VERSION)
                )));
            }
        }
        // The default column family (the layout version) is flushed at once:
        // unflushed, it would hold on to every write-ahead log file from its
        // entry on, until the WAL limit forced a flush.
        db.flush()?;
        let files = files::Files::open(path)
            .map_err(|e| Error::Open(format!("cannot open the blob files in {}: {e}", path.display())))?;
        let store = Store {
            db,
            path: path.to_path_buf(),
            options,
            next_blob_id: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            active_uploads: Mutex::new(HashSet::new()),
            accessed: Mutex::new(HashMap::new()),
            accessed_results: Mutex::new(HashMap::new()),
            files,
            hard_limit: AtomicU64::new(u64::MAX),
            measured_disk: AtomicU64::new(0),
            written_since: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            demand: AtomicU64::new(0),
            eviction_blocked: AtomicBool::new(false),
            rejected_writes: AtomicU64::new(0),
            corrupt_blobs: AtomicU64::new(0),
            evicted_blobs: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
        };
        store.count_blobs_if_uncounted()?;
        store.remove_orphan_files()?;
        store.count_queue()?;
        store.measure_disk()?;
        store.next_blob_id.store(store.highest_blob_id()? + 1, Ordering::Relaxed);
        Ok(store)
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    fn write_options(&self) -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(self.options.sync_writes);
        w
    }

    fn write(&self, batch: WriteBatch) -> Result<(), Error> {
        Ok(self.db.write_opt(batch, &self.write_options())?)
    }

    /// The highest blob id referenced by a chunk or an upload record: ids above
    /// it are free. (A prefix of deleted ids may be reused; nothing refers to them.)
    fn highest_blob_id(&self) -> Result<u64, Error> {
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
    fn remove_orphan_files(&self) -> Result<(), Error> {
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

    /// Writes `batch`, then deletes the files of the blobs and uploads it
    /// deletes (ids without one are skipped).
    fn write_deleting(&self, batch: WriteBatch, ids: &[u64]) -> Result<(), Error> {
        self.write(batch)?;
        for &id in ids {
            if let Err(e) = self.files.remove(id) {
                // Left behind; the next open removes it.
                tracing::warn!("cannot delete the file of blob id {id}: {e}");
            }
        }
        Ok(())
    }

    fn allocate_blob_id(&self) -> u64 {
        self.next_blob_id.fetch_add(1, Ordering::Relaxed)
    }

    fn stripe(&self, d: &Digest) -> MutexGuard<'_, ()> {
        self.stripes[stripe_of(d)].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stripes of all of `digests`, each once, taken in order (so that
    /// two callers never deadlock).
    fn lock_stripes<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) -> Vec<MutexGuard<'_, ()>> {
        let stripes: BTreeSet<usize> = digests.into_iter().map(stripe_of).collect();
        stripes.into_iter().map(|s| self.stripes[s].lock().unwrap_or_else(|e| e.into_inner())).collect()
    }

    fn get_entry(&self, d: &Digest) -> Result<Option<IndexEntry>, Error> {
        match self.db.get_pinned_cf(self.cf(CF_INDEX), index_key(d))? {
            None => Ok(None),
            Some(v) => IndexEntry::decode(&v)
                .map(Some)
                .ok_or_else(|| Error::Corrupt(format!("index entry of {d} is malformed"))),
        }
    }

    fn touch(&self, digests: impl IntoIterator<Item = Digest>) {
        let now = now_ms();
        let mut accessed = self.accessed.lock().unwrap_or_else(|e| e.into_inner());
        accessed.extend(digests.into_iter().map(|d| (d, now)));
    }

    /// Stored bytes of all blobs and partial uploads (after compression),
    /// kept up to date by every write.
    pub fn stored_bytes(&self) -> Result<u64, Error> {
        Ok(self.counter(USAGE_KEY)?.unwrap_or(0))
    }

    fn counter(&self, key: [u8; 16]) -> Result<Option<u64>, Error> {
        let value = self.db.get_cf(self.cf(CF_CHUNKS), key)?;
        Ok(value.map(|v| v.as_slice().try_into().map_or(0, i64::from_le_bytes).max(0) as u64))
    }

    /// Gives a directory from before the blob counters its counts, from one
    /// scan of the index (a new directory starts them at zero).
    fn count_blobs_if_uncounted(&self) -> Result<(), Error> {
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

    /// What metrics and the status page show of the store.
    pub fn stats(&self) -> Result<Stats, Error> {
        let mut partial_uploads = 0;
        for item in self.db.iterator_cf(self.cf(CF_UPLOADS), IteratorMode::Start) {
            item?;
            partial_uploads += 1;
        }
        let property = |cf: Option<&str>, name: &str| {
            let value = match cf {
                Some(cf) => self.db.property_int_value_cf(self.cf(cf), name),
                None => self.db.property_int_value(name),
            };
            value.ok().flatten().unwrap_or(0)
        };
        let (queued, queued_bytes) = self.queue_len();
        Ok(Stats {
            blobs: self.counter(BLOBS_KEY)?.unwrap_or(0),
            logical_bytes: self.counter(LOGICAL_KEY)?.unwrap_or(0),
            stored_bytes: self.stored_bytes()?,
            disk_bytes: self.disk_estimate(),
            max_size: self.options.max_size,
            partial_uploads,
            rejected_writes: self.rejected_writes.load(Ordering::Relaxed),
            corrupt_blobs: self.corrupt_blobs.load(Ordering::Relaxed),
            evicted_blobs: self.evicted_blobs.load(Ordering::Relaxed),
            evicted_bytes: self.evicted_bytes.load(Ordering::Relaxed),
            eviction_blocked: self.eviction_blocked.load(Ordering::Relaxed),
            queued,
            queued_bytes,
            queue_limit: self.options.queue_limit,
            pending_compaction_bytes: COLUMN_FAMILIES
                .iter()
                .map(|cf| property(Some(cf), "rocksdb.estimate-pending-compaction-bytes"))
                .sum(),
            write_stopped: property(None, "rocksdb.is-write-stopped") != 0,
            delayed_write_rate: property(None, "rocksdb.actual-delayed-write-rate"),
        })
    }

    /// Measures the bytes the data directory takes on disk: the blocks
    /// allocated to every file RocksDB keeps there (SST and blob files, WAL,
    /// manifest, its log), plus what the memtables hold, plus the blob files
    /// (counted as they change), and restarts the estimate of writes since.
    pub fn measure_disk(&self) -> Result<u64, Error> {
        use std::os::unix::fs::MetadataExt;
        // Writes that end during the scan may be missing from it, and
        // writes in progress are: both stay in the estimate.
        let counted = self.written_since.load(Ordering::Relaxed);
        let mut total = 0;
        for entry in std::fs::read_dir(&self.path).map_err(Error::Measure)? {
            // Files vanish under us as RocksDB compacts: skip them.
            if let Ok(meta) = entry.and_then(|e| e.metadata())
                && meta.is_file()
            {
                total += meta.blocks() * 512;
            }
        }
        // Memtables will be files soon: count them now.
        for name in COLUMN_FAMILIES {
            let memtables = self.db.property_int_value_cf(self.cf(name), "rocksdb.cur-size-all-mem-tables");
            total += memtables.ok().flatten().unwrap_or(0);
        }
        self.measured_disk.store(total, Ordering::Relaxed);
        let _ = self
            .written_since
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some(w.saturating_sub(counted)));
        Ok(total + self.files.bytes())
    }

    /// Bytes still free on the filesystem of the data directory (for an
    /// unprivileged writer).
    pub fn free_disk(&self) -> Result<u64, Error> {
        Ok(filesystem_space(&self.path).map_err(Error::Measure)?.1)
    }

    /// The last disk measurement plus what was written since, or is being
    /// written (reserved).
    pub fn disk_estimate(&self) -> u64 {
        self.written_estimate() + self.reserved.load(Ordering::Relaxed)
    }

    /// The disk estimate without the reserved bytes.
    fn written_estimate(&self) -> u64 {
        self.measured_disk.load(Ordering::Relaxed)
            + self.written_since.load(Ordering::Relaxed)
            + self.files.bytes()
    }

    /// The disk estimate plus the largest write refused since the last call:
    /// what eviction must make room for.
    pub fn disk_wanted(&self) -> u64 {
        self.disk_estimate() + self.demand.swap(0, Ordering::Relaxed)
    }

    /// Records whether eviction found nothing old enough to evict while over
    /// its watermark; returns what it was.
    pub fn set_eviction_blocked(&self, blocked: bool) -> bool {
        self.eviction_blocked.swap(blocked, Ordering::Relaxed)
    }

    /// Writes that would take the disk estimate above `limit` are refused
    /// with [`Error::Full`]; reads go on.
    pub fn set_hard_limit(&self, limit: u64) {
        self.hard_limit.store(limit, Ordering::Relaxed);
    }

    /// Admits `bytes` of new data to RocksDB, or refuses them at the hard
    /// limit. The caller holds the admission while it writes them.
    fn admit(&self, bytes: u64) -> Result<Admitted<'_>, Error> {
        self.reserve(bytes)?;
        Ok(Admitted { store: self, bytes })
    }

    /// Reserves room for `bytes` about to be written, or refuses them if the
    /// disk estimate with them (and every other reservation) would pass the
    /// hard limit. A refusal asks eviction to make that much room, unless
    /// the write could never fit.
    fn reserve(&self, bytes: u64) -> Result<(), Error> {
        let limit = self.hard_limit.load(Ordering::Relaxed);
        let written = self.written_estimate();
        let reserved = self.reserved.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
            (written.saturating_add(r).saturating_add(bytes) <= limit).then_some(r + bytes)
        });
        match reserved {
            Ok(_) => Ok(()),
            Err(r) => {
                self.rejected_writes.fetch_add(1, Ordering::Relaxed);
                if bytes > limit {
                    return Err(Error::TooLarge { bytes, limit });
                }
                self.demand.fetch_max(bytes, Ordering::Relaxed);
                Err(Error::Full { estimate: written + r, limit })
            }
        }
    }

    /// Gives back reserved bytes: written (and counted where they went) or
    /// not needed.
    fn unreserve(&self, bytes: u64) {
        let _ = self
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| Some(r.saturating_sub(bytes)));
    }

    /// Which of `digests` are present (the empty blob always is). One batched
    /// RocksDB lookup; present blobs count as used.
    pub fn contains(&self, digests: &[Digest]) -> Result<Vec<bool>, Error> {
        let keys: Vec<Key> = digests.iter().map(index_key).collect();
        let cf = self.cf(CF_INDEX);
        let found = self.db.batched_multi_get_cf(cf, &keys, false);
        let mut present = Vec::with_capacity(digests.len());
        for (d, result) in digests.iter().zip(found) {
            present.push(d.is_empty_blob() || result?.is_some());
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

    /// The blob's bytes from `offset` to the end of the chunk holding it:
    /// decompresses exactly one chunk. Empty at or past the end of the blob.
    pub fn read_at(&self, blob: &Blob, offset: u64) -> Result<Bytes, Error> {
        if offset >= blob.digest.size {
            return Ok(Bytes::new());
        }
        let (start, value) = self.chunk_of(blob, offset)?.ok_or_else(|| {
            Error::Vanished(format!("blob {} has no chunk at offset {offset}", blob.digest))
        })?;
        let Some(data) = chunk::decode(&value) else {
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

    /// Re-reads and re-hashes every stored blob, removing those whose chunks
    /// fail their checks or whose bytes do not hash to their digest.
    /// `progress` hears of each blob checked (its size), and stops the scrub
    /// by returning false (it may also sleep, to bound the scrub's rate).
    pub fn scrub(&self, mut progress: impl FnMut(u64) -> bool) -> Result<Scrubbed, Error> {
        let mut report = Scrubbed::default();
        for item in self.db.iterator_cf(self.cf(CF_INDEX), IteratorMode::Start) {
            let (key, value) = item?;
            let (Some(digest), Some(entry)) = (digest_of_index_key(&key), IndexEntry::decode(&value)) else {
                continue;
            };
            let blob = Blob { digest, blob_id: entry.blob_id };
            let mut hasher = crate::digest::Hasher::new(digest.function);
            let mut offset = 0;
            let outcome = loop {
                if offset >= digest.size {
                    break Ok(());
                }
                match self.read_at(&blob, offset) {
                    Ok(data) => {
                        hasher.update(&data);
                        offset += data.len() as u64;
                    }
                    Err(e) => break Err(e),
                }
            };
            match outcome {
                Ok(()) => {
                    let actual = hasher.finish();
                    if actual != digest
                        && let Error::Removed(_) =
                            self.remove_corrupt(&blob, format!("its bytes hash to {actual}"))
                    {
                        report.removed += 1;
                    }
                }
                Err(Error::Removed(_)) => report.removed += 1,
                // Evicted meanwhile: not checked.
                Err(Error::Vanished(_)) => continue,
                Err(e) => return Err(e),
            }
            report.blobs += 1;
            report.bytes += digest.size;
            if !progress(digest.size) {
                break;
            }
        }
        Ok(report)
    }

    /// Removes a blob found corrupt on disk, so that it is never served and
    /// clients upload it again: the error says NOT_FOUND either way. Only
    /// the copy found corrupt goes: a blob stored again since is kept.
    pub fn remove_corrupt(&self, blob: &Blob, detail: String) -> Error {
        let digest = &blob.digest;
        tracing::warn!(digest = %digest, "removing a corrupt blob: {detail}");
        let removed = (|| -> Result<bool, Error> {
            let _guard = self.stripe(digest);
            let Some(entry) = self.get_entry(digest)?.filter(|e| e.blob_id == blob.blob_id) else {
                return Ok(false);
            };
            let mut batch = WriteBatch::default();
            let file = self.delete_blob(&mut batch, digest, &entry);
            // Nothing left to copy to the object store.
            let queued = self.unqueue(&mut batch, &queue_blob_key(digest))?;
            self.write_deleting(batch, file.as_slice())?;
            self.count_queued(-i64::from(queued.is_some()), -(queued.map_or(0, |v| v.bytes) as i64));
            Ok(true)
        })();
        match removed {
            Ok(true) => {
                self.corrupt_blobs.fetch_add(1, Ordering::Relaxed);
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
    /// counters) to `batch`. Returns the blob id of its file, if it has one,
    /// to delete once the batch is written (see [`Store::write_deleting`]).
    fn delete_blob(&self, batch: &mut WriteBatch, digest: &Digest, entry: &IndexEntry) -> Option<u64> {
        batch.delete_cf(self.cf(CF_INDEX), index_key(digest));
        batch.delete_cf(self.cf(CF_LRU), lru_key(entry.atime, digest));
        batch.delete_range_cf(
            self.cf(CF_CHUNKS),
            chunk_key(entry.blob_id, 0),
            chunk_key(entry.blob_id + 1, 0),
        );
        self.count_stored(batch, -(entry.stored as i64));
        self.count_blobs(batch, -1, -(digest.size as i64));
        self.has_file(digest.size).then_some(entry.blob_id)
    }

    /// The stored chunk that holds `offset`, encoded as the chunk codec wrote
    /// it, with its start and how many bytes of the blob it holds: for copying
    /// a blob to another tier without compressing it again. Checked first.
    pub fn encoded_chunk_at(&self, blob: &Blob, offset: u64) -> Result<(u64, Vec<u8>, u64), Error> {
        let (start, value) = self.chunk_of(blob, offset)?.ok_or_else(|| {
            Error::Vanished(format!("blob {} has no chunk at offset {offset}", blob.digest))
        })?;
        match chunk::content_len(&value) {
            Some(held) if start + held > offset => Ok((start, value, held)),
            Some(_) => Err(self.remove_corrupt(blob, format!("a gap at offset {offset}"))),
            None => Err(self.remove_corrupt(blob, format!("the chunk at offset {start} fails its check"))),
        }
    }

    /// The chunk of a present blob that holds `offset`: a chunk RocksDB finds
    /// corrupt (its own checksums) gets the blob removed, like one failing ours.
    fn chunk_of(&self, blob: &Blob, offset: u64) -> Result<Option<(u64, Vec<u8>)>, Error> {
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
    fn resolve(&self, blob_id: u64, value: Vec<u8>) -> Result<Vec<u8>, Error> {
        if !chunk::is_file_ref(&value) {
            return Ok(value);
        }
        let Some((pos, len)) = chunk::file_ref_of(&value) else {
            return Err(Error::Corrupt(format!(
                "a reference to the file of blob id {blob_id} fails its check"
            )));
        };
        self.files.read(blob_id, pos, len).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof => {
                Error::Corrupt(format!("the file of blob id {blob_id} lacks {len} bytes at {pos}: {e}"))
            }
            _ => Error::File(e),
        })
    }

    /// The stored chunk of `blob_id` that holds `offset`, with its start offset.
    fn chunk_at(&self, blob_id: u64, offset: u64) -> Result<Option<(u64, Vec<u8>)>, Error> {
        let cf = self.cf(CF_CHUNKS);
        // Sequential reads ask for chunk starts: one point lookup.
        if let Some(v) = self.db.get_cf(cf, chunk_key(blob_id, offset))? {
            return Ok(Some((offset, self.resolve(blob_id, v)?)));
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(chunk_key(blob_id, 0));
        opts.set_iterate_upper_bound(chunk_key(blob_id + 1, 0));
        let mut it = self.db.raw_iterator_cf_opt(cf, opts);
        it.seek_for_prev(chunk_key(blob_id, offset));
        it.status()?;
        match (it.key().and_then(split_chunk_key), it.value()) {
            (Some((_, start)), Some(v)) => Ok(Some((start, self.resolve(blob_id, v.to_vec())?))),
            _ => Ok(None),
        }
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

    /// All chunks of a present blob, in order, with their offsets. RocksDB
    /// finding one corrupt gets the blob removed, as in `chunk_of`.
    fn chunks_of(&self, blob: &Blob) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(chunk_key(blob.blob_id, 0));
        opts.set_iterate_upper_bound(chunk_key(blob.blob_id, PROGRESS_OFFSET));
        let mut chunks = Vec::new();
        for item in self.db.iterator_cf_opt(self.cf(CF_CHUNKS), opts, IteratorMode::Start) {
            match item {
                Ok((key, value)) => {
                    if let Some((_, start)) = split_chunk_key(&key) {
                        match self.resolve(blob.blob_id, value.into_vec()) {
                            Ok(value) => chunks.push((start, value)),
                            Err(Error::Corrupt(detail)) => return Err(self.remove_corrupt(blob, detail)),
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                    return Err(self.remove_corrupt(blob, format!("RocksDB: {e}")));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(chunks)
    }

    /// Stores whole blobs (a BatchUpdateBlobs): verifies each against its
    /// digest, then makes all new ones visible in one atomic write.
    pub fn put_blobs(&self, blobs: &[NewBlob]) -> Vec<Result<Written, Error>> {
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
        if let Err(e) = self.store_verified(blobs, &mut results) {
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

    fn store_verified(&self, blobs: &[NewBlob], results: &mut [Result<Written, Error>]) -> Result<(), Error> {
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
        self.admit_queued(candidates.iter().map(|&i| blobs[i].digest.size).sum())?;
        let mut admitted = self.admit(bytes)?;
        // Blob files written for this batch: deleted again unless the batch
        // makes them a stored blob's.
        let mut filed = Vec::new();
        let stored = self.store_prepared(blobs, &candidates, results, &mut admitted, &mut filed);
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
    ) -> Result<Vec<u64>, Error> {
        let now = now_ms();
        let mut prepared = Vec::with_capacity(candidates.len());
        for &i in candidates {
            let NewBlob { digest, data, frames } = &blobs[i];
            let blob_id = self.allocate_blob_id();
            let mut file = match self.has_file(digest.size) {
                true => {
                    filed.push(blob_id);
                    Some(self.files.writer(blob_id, 0).map_err(|e| self.file_error(e))?)
                }
                false => None,
            };
            let mut chunks = Vec::new();
            let mut stored = 0;
            for (n, part) in data.chunks(self.options.chunk_size).enumerate() {
                let offset = (n * self.options.chunk_size) as u64;
                let level = self.options.zstd_level;
                let range = offset..offset + part.len() as u64;
                // Frames are in order: a binary search finds the one starting here.
                let frame = frames.binary_search_by_key(&offset, |(r, _)| r.start).ok().map(|i| &frames[i]);
                let mut value = match frame {
                    Some((r, frame)) if *r == range => chunk::encode_frame(frame, part, level),
                    _ => chunk::encode(part, level),
                };
                stored += value.len() as u64;
                if let Some(file) = &mut file {
                    let at = file.append(&self.files, &value).map_err(|e| self.file_error(e))?;
                    value = chunk::file_ref(at, value.len());
                }
                chunks.push((chunk_key(blob_id, offset), value));
            }
            match file {
                Some(file) => {
                    // The index entry must never point at bytes a crash could lose.
                    file.sync().map_err(|e| self.file_error(e))?;
                    admitted.release(self.room_for(digest.size));
                }
                None => admitted.release(self.room_for(digest.size).saturating_sub(stored)),
            }
            let entry = IndexEntry { blob_id, stored, atime: now };
            prepared.push((i, *digest, entry, chunks));
        }
        let _guards = self.lock_stripes(prepared.iter().map(|(_, d, _, _)| d));
        let mut batch = WriteBatch::default();
        let (mut queued, mut queued_bytes) = (0, 0);
        let mut ids = Vec::with_capacity(prepared.len());
        for (i, digest, entry, chunks) in prepared {
            // Another writer may have stored it since the check above.
            if self.get_entry(&digest)?.is_some() {
                results[i] = Ok(Written::AlreadyPresent);
                continue;
            }
            for (key, value) in chunks {
                batch.put_cf(self.cf(CF_CHUNKS), key, value);
            }
            self.add_entry(&mut batch, &digest, &entry);
            self.count_stored(&mut batch, entry.stored as i64);
            if self.queues() {
                self.queue_blob(&mut batch, &digest);
                (queued, queued_bytes) = (queued + 1, queued_bytes + digest.size as i64);
            }
            ids.push(entry.blob_id);
        }
        self.write(batch)?;
        self.count_queued(queued, queued_bytes);
        Ok(ids)
    }

    /// Whether a blob of `size` bytes is kept in a file of its own.
    fn has_file(&self, size: u64) -> bool {
        size >= files::MIN_SIZE
    }

    /// The most bytes a blob of `size` takes on disk once stored: its bytes
    /// (stored raw if they do not compress), each chunk's seal, and the last
    /// block of its file.
    fn room_for(&self, size: u64) -> u64 {
        let chunks = size.div_ceil(self.options.chunk_size as u64).max(1);
        size + chunks * chunk::SEAL_LEN + if self.has_file(size) { 4096 } else { 0 }
    }

    /// A blob file error: a full disk is a full cache, refused like one.
    fn file_error(&self, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::StorageFull => {
                self.rejected_writes.fetch_add(1, Ordering::Relaxed);
                Error::Full { estimate: self.disk_estimate(), limit: self.hard_limit.load(Ordering::Relaxed) }
            }
            _ => Error::File(e),
        }
    }

    /// Adds a new index entry to `batch`, with its place in the eviction
    /// order, and counts the blob.
    fn add_entry(&self, batch: &mut WriteBatch, digest: &Digest, entry: &IndexEntry) {
        batch.put_cf(self.cf(CF_INDEX), index_key(digest), entry.encode());
        batch.put_cf(self.cf(CF_LRU), lru_key(entry.atime, digest), []);
        self.count_blobs(batch, 1, digest.size as i64);
    }

    /// Adds a change of the blob counters to `batch`.
    fn count_blobs(&self, batch: &mut WriteBatch, blobs: i64, bytes: i64) {
        batch.merge_cf(self.cf(CF_CHUNKS), BLOBS_KEY, usage_delta(blobs));
        batch.merge_cf(self.cf(CF_CHUNKS), LOGICAL_KEY, usage_delta(bytes));
    }

    /// Adds a change of the stored-bytes counter to `batch`.
    fn count_stored(&self, batch: &mut WriteBatch, delta: i64) {
        batch.merge_cf(self.cf(CF_CHUNKS), USAGE_KEY, usage_delta(delta));
    }

    /// Writes access times recorded since the last call into the index and
    /// the eviction order, one batch per lock stripe. A crash may lose the
    /// last interval's refreshes, nothing else.
    pub fn flush_access_times(&self) -> Result<usize, Error> {
        let mut by_stripe: Vec<Vec<(Digest, u64)>> = vec![Vec::new(); STRIPES];
        {
            let mut accessed = self.accessed.lock().unwrap_or_else(|e| e.into_inner());
            for (digest, atime) in accessed.drain() {
                by_stripe[stripe_of(&digest)].push((digest, atime));
            }
        }
        let mut updated = 0;
        for (stripe, accessed) in by_stripe.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            // Under the lock, so an eviction cannot slip between read and write.
            let _guard = self.stripes[stripe].lock().unwrap_or_else(|e| e.into_inner());
            let mut batch = WriteBatch::default();
            for (digest, atime) in accessed {
                if let Some(mut entry) = self.get_entry(digest)?
                    && entry.atime < *atime
                {
                    batch.delete_cf(self.cf(CF_LRU), lru_key(entry.atime, digest));
                    entry.atime = *atime;
                    batch.put_cf(self.cf(CF_INDEX), index_key(digest), entry.encode());
                    batch.put_cf(self.cf(CF_LRU), lru_key(*atime, digest), []);
                    updated += 1;
                }
            }
            self.write(batch)?;
        }
        Ok(updated + self.flush_result_access_times()?)
    }

    /// Writes every memtable out to files (what a clean close does), so
    /// that no write-ahead log file is needed any more.
    pub fn flush(&self) -> Result<(), Error> {
        let mut first_error = None;
        for name in COLUMN_FAMILIES {
            if let Err(e) = self.db.flush_cf(self.cf(name)) {
                first_error.get_or_insert(e);
            }
        }
        // The default column family holds the layout version.
        if let Err(e) = self.db.flush() {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }
}

impl Drop for Store {
    /// A clean close flushes the memtables, so the next open has no WAL to
    /// replay (a crash replays at most max_total_wal_size of it).
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("could not flush the memtables at close: {e}");
        }
    }
}

/// Re-keys the action cache of a layout version 1 directory (its keys ended
/// in the action's size), in batches; a crash midway is finished on the next
/// open, since re-keyed keys are told apart from old ones.
fn upgrade_from_v1(db: &DB) -> Result<(), Error> {
    let cf = cf_handle(db, CF_AC);
    let mut batch = WriteBatch::default();
    let mut moved = 0usize;
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (key, value) = item?;
        if let Some(new_key) = ac_key_from_v1(&key) {
            batch.delete_cf(cf, &key);
            batch.put_cf(cf, new_key, value);
            moved += 1;
        }
        if batch.len() >= 10_000 {
            db.write(std::mem::take(&mut batch))?;
        }
    }
    batch.put(LAYOUT_KEY, LAYOUT_VERSION_2);
    db.write(batch)?;
    tracing::info!("upgraded the data directory to layout version 2 ({moved} action cache keys)");
    Ok(())
}

/// Times every action result of a layout version 2 directory as used now,
/// gives it a place in the eviction order, and counts it in the stored
/// bytes, in batches; a crash midway is finished on the next open, since
/// timed values are told apart from old ones.
fn upgrade_from_v2(db: &DB) -> Result<(), Error> {
    db.put(LAYOUT_KEY, LAYOUT_UPGRADING_TO_3)?;
    let (ac, lru, chunks) = (cf_handle(db, CF_AC), cf_handle(db, CF_LRU), cf_handle(db, CF_CHUNKS));
    let now = now_ms();
    let mut batch = WriteBatch::default();
    let mut timed = 0usize;
    let mut counted = 0i64;
    for item in db.iterator_cf(ac, IteratorMode::Start) {
        let (key, value) = item?;
        let Some(old @ AcValue { atime: None, .. }) = AcValue::decode(&value) else {
            continue;
        };
        let value = AcValue { atime: Some(now), ..old }.encode();
        batch.put_cf(lru, lru_action_key(now, &key), []);
        counted += value.len() as i64;
        batch.put_cf(ac, &key, value);
        timed += 1;
        if batch.len() >= 10_000 {
            batch.merge_cf(chunks, USAGE_KEY, usage_delta(std::mem::take(&mut counted)));
            db.write(std::mem::take(&mut batch))?;
        }
    }
    batch.merge_cf(chunks, USAGE_KEY, usage_delta(counted));
    batch.put(LAYOUT_KEY, LAYOUT_VERSION);
    db.write(batch)?;
    tracing::info!(
        "upgraded the data directory to layout version 3 ({timed} action results timed for eviction)"
    );
    Ok(())
}

fn cf_handle<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name).expect("column families are created at open")
}

/// The size of the filesystem holding `path`, and its bytes free for an
/// unprivileged writer.
fn filesystem_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = stat.f_frsize as u64;
    Ok((stat.f_blocks as u64 * block, stat.f_bavail as u64 * block))
}

pub fn now_secs() -> u64 {
    now_ms() / 1000
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The digest a client declared, and the digest of what it sent.
#[derive(Debug)]
pub struct Mismatch {
    pub expected: Digest,
    pub actual: Digest,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data does not match its digest: declared {}, the bytes received hash to {}", .0.expected, .0.actual)]
    DigestMismatch(Box<Mismatch>),
    #[error("upload {0:?} is being written by another stream right now; retry when that stream ends")]
    UploadBusy(String),
    #[error(
        "write_offset {offset} does not continue upload {resource:?}, which has {committed} bytes committed: resume at QueryWriteStatus' committed_size, or start over at 0"
    )]
    BadOffset { resource: String, offset: u64, committed: u64 },
    #[error(
        "the cache is full: about {estimate} bytes on disk against a limit of {limit}; eviction is freeing space, retry shortly (or raise max_size)"
    )]
    Full { estimate: u64, limit: u64 },
    #[error(
        "{queued} bytes of writes are waiting to be copied to the object store, against a limit of {limit}: it is slow or unreachable; retry later (or raise s3_queue_size)"
    )]
    QueueFull { queued: u64, limit: u64 },
    #[error(
        "a blob of {bytes} bytes cannot fit in this cache: writes stop at {limit} bytes on disk (raise max_size, or give the data directory a larger disk)"
    )]
    TooLarge { bytes: u64, limit: u64 },
    #[error("cannot measure the data directory: {0}")]
    Measure(std::io::Error),
    #[error("cannot use a blob file: {0}")]
    File(std::io::Error),
    #[error("{0}")]
    Vanished(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Removed(String),
    #[error("{0}")]
    Open(String),
    #[error("the data directory {0} is in use by another process (another larder?)")]
    Locked(String),
    #[error("the batch could not be stored: {0}")]
    Batch(String),
    /// RocksDB found the disk full (eviction keeps writes off a full disk;
    /// should one slip through, it says so).
    #[error("RocksDB: {0}")]
    DiskFull(rocksdb::Error),
    #[error("RocksDB: {0}")]
    Db(rocksdb::Error),
}

impl From<rocksdb::Error> for Error {
    /// RocksDB tells a full disk only in its message (its status has a
    /// subcode for it, which the Rust binding does not expose): this is the
    /// one place that reads it.
    fn from(e: rocksdb::Error) -> Error {
        match e.kind() {
            rocksdb::ErrorKind::IOError if e.to_string().contains("No space left") => Error::DiskFull(e),
            _ => Error::Db(e),
        }
    }
}

#[cfg(test)]
mod tests;
