//! The blob store on RocksDB: the only code that knows column families and
//! key formats (see [`layout`]). Every method is synchronous and may block on
//! disk or CPU: async callers run them on the blocking pool.

mod actions;
mod blobs;
pub mod chunk;
mod disk;
mod evict;
pub mod eviction;
mod files;
mod layout;
mod lists;
mod present;
mod queue;
mod read;
mod scrub;
mod upgrade;
mod upload;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode,
    Options, WriteBatch, WriteOptions,
};

use crate::digest::Digest;
pub use actions::StoredResult;
pub use blobs::{Blob, Flushed, NewBlob, Written};
use disk::Admitted;
pub use evict::Evicted;
pub use layout::Form;
use layout::*;
pub use lists::{Chunks, Spliced};
pub use queue::{QueueEntry, Queued};
pub use scrub::Scrubbed;
pub use upload::Upload;

/// Tuning that callers choose; the layout itself is not configurable.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Uncompressed bytes per stored chunk.
    pub chunk_size: usize,
    /// zstd level of stored chunks; 0 stores them uncompressed.
    pub zstd_level: i32,
    /// Uploads of at least this many bytes are cut into content-defined
    /// chunks, each stored once (see `layout`, "Lists"); 0: none are.
    pub dedup_min_size: u64,
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
    /// Memory for the set of present blobs that answers FindMissingBlobs
    /// and places batch reads (see `present`); 0: every lookup asks RocksDB.
    pub index_memory: u64,
    /// A use moves a blob or an action result in the eviction order only if
    /// it comes at least this long after the use recorded, so that reading
    /// what was written or read moments ago writes nothing. Eviction counts
    /// a recorded use as lasting this long, so that none it skipped is
    /// missed (see [`Store::evict_lru`]). Zero records every use.
    pub use_resolution: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_size: 1 << 20,
            zstd_level: 1,
            dedup_min_size: 4 << 20,
            sync_writes: false,
            blob_files: true,
            cache_size: 32 << 20,
            max_size: 10 << 30,
            queue_limit: 0,
            index_memory: 256 << 20,
            use_resolution: std::time::Duration::ZERO,
        }
    }
}

pub struct Store {
    db: Arc<DB>,
    path: PathBuf,
    options: StoreOptions,
    next_blob_id: AtomicU64,
    /// Striped by digest: serializes "is it there? then write" for one digest,
    /// so racing writers never orphan chunks or overwrite a live entry.
    stripes: Box<[Mutex<()>]>,
    /// Uploads being written by a stream right now, by resource name.
    active_uploads: Mutex<HashSet<String>>,
    /// Blobs and action results used since the last access-time flush.
    accessed: blobs::Accessed,
    /// The digests of present blobs and their ids, in memory (see `present`).
    present: present::Present,
    /// Blobs of at least [`files::MIN_SIZE`], in files of their own.
    files: files::Files,
    /// The disk budget's running figures.
    disk: disk::Disk,
    /// Totals since the store opened, for metrics.
    totals: Totals,
    /// Entries in the queue for the object store, and the bytes they count.
    queued: queue::Count,
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
    /// Blobs in the in-memory set FindMissingBlobs answers from: fewer
    /// than `blobs` once `index_memory` is full.
    pub memory_indexed: u64,
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

/// Totals since the store opened, for metrics.
#[derive(Default)]
struct Totals {
    /// Writes refused at the hard limit (or a full queue).
    rejected_writes: AtomicU64,
    /// Blobs found corrupt and removed.
    corrupt_blobs: AtomicU64,
    /// What eviction removed.
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
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
        let (disk_size, _) = disk::filesystem_space(path).map_err(Error::Measure)?;
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
        // A bloom filter over the memtable's keys: a lookup of a digest the
        // index lacks (half of a FindMissingBlobs, typically) skips the
        // skip-list search, which profiling found the largest cost.
        index.set_memtable_whole_key_filtering(true);
        index.set_memtable_prefix_bloom_ratio(0.1);

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
            // Versions 4 and 5 only add blob files and lists: a version 3
            // directory has neither, a version 4 one no lists.
            Some(v) if v == LAYOUT_VERSION_3 || v == LAYOUT_VERSION_4 => {
                db.put(LAYOUT_KEY, LAYOUT_VERSION)?
            }
            Some(v) if v == LAYOUT_VERSION_1 => {
                upgrade::upgrade_from_v1(&db)?;
                upgrade::upgrade_from_v2(&db)?;
            }
            Some(v) if v == LAYOUT_VERSION_2 || v == LAYOUT_UPGRADING_TO_3 => upgrade::upgrade_from_v2(&db)?,
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
        let present = present::Present::new(options.index_memory);
        let store = Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
            options,
            next_blob_id: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            active_uploads: Mutex::new(HashSet::new()),
            accessed: blobs::Accessed::default(),
            present,
            files,
            disk: disk::Disk::new(),
            totals: Totals::default(),
            queued: queue::Count::default(),
        };
        store.count_blobs_if_uncounted()?;
        store.enter_present_blobs()?;
        store.remove_orphan_files()?;
        store.count_queue()?;
        store.measure_disk()?;
        store.next_blob_id.store(store.highest_blob_id()? + 1, Ordering::Relaxed);
        Ok(store)
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// [`StoreOptions::use_resolution`] in the milliseconds of access times.
    fn use_resolution_ms(&self) -> u64 {
        u64::try_from(self.options.use_resolution.as_millis()).unwrap_or(u64::MAX)
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

    fn stripe(&self, d: &Digest) -> MutexGuard<'_, ()> {
        self.stripes[stripe_of(d)].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stripes of all of `digests`, each once, taken in order (so that
    /// two callers never deadlock).
    fn lock_stripes<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) -> Vec<MutexGuard<'_, ()>> {
        let stripes: BTreeSet<usize> = digests.into_iter().map(stripe_of).collect();
        stripes.into_iter().map(|s| self.stripes[s].lock().unwrap_or_else(|e| e.into_inner())).collect()
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
            rejected_writes: self.totals.rejected_writes.load(Ordering::Relaxed),
            corrupt_blobs: self.totals.corrupt_blobs.load(Ordering::Relaxed),
            evicted_blobs: self.totals.evicted_blobs.load(Ordering::Relaxed),
            evicted_bytes: self.totals.evicted_bytes.load(Ordering::Relaxed),
            eviction_blocked: self.disk.eviction_blocked.load(Ordering::Relaxed),
            memory_indexed: self.present.len().0 as u64,
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

    /// Adds a change of the stored-bytes counter to `batch`.
    fn count_stored(&self, batch: &mut WriteBatch, delta: i64) {
        batch.merge_cf(self.cf(CF_CHUNKS), USAGE_KEY, usage_delta(delta));
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
