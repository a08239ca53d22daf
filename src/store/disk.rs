//! The disk budget: what the data directory takes on disk (measured, plus
//! what was written since, plus what writes in progress have reserved), and
//! the hard limit above which writes are refused before they reach the disk.
//! Eviction (see `eviction`) keeps the measurement under the watermarks.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::layout::COLUMN_FAMILIES;
use super::{Error, Store, chunk};

/// The disk budget's running figures.
pub(super) struct Disk {
    /// Writes are refused while the disk use estimate is above this.
    hard_limit: AtomicU64,
    /// Bytes of RocksDB's files and memtables at the last measurement.
    measured: AtomicU64,
    /// Bytes written to RocksDB since that measurement began (some may be in it).
    pub(super) written_since: AtomicU64,
    /// Bytes admitted for writing and not yet written (see [`Store::reserve`]).
    reserved: AtomicU64,
    /// The largest write refused since eviction last looked: room it should
    /// make, although the write is not reserved.
    demand: AtomicU64,
    /// Whether the last eviction pass found the disk over its watermark and
    /// nothing old enough to evict.
    pub(super) eviction_blocked: AtomicBool,
}

impl Disk {
    pub(super) fn new() -> Disk {
        Disk {
            hard_limit: AtomicU64::new(u64::MAX),
            measured: AtomicU64::new(0),
            written_since: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            demand: AtomicU64::new(0),
            eviction_blocked: AtomicBool::new(false),
        }
    }
}

/// Bytes reserved for a write to RocksDB (see [`Store::reserve`]): counted
/// as being written until dropped (written, or failed), then as written since
/// the last measurement, which counts them for good only if it began after
/// that. Bytes the write put in blob files are counted there instead.
pub(super) struct Admitted<'a> {
    store: &'a Store,
    bytes: u64,
}

impl Admitted<'_> {
    /// Up to `bytes` of the reservation are not needed, or went to blob
    /// files, which count them already.
    pub(super) fn release(&mut self, bytes: u64) {
        let bytes = bytes.min(self.bytes);
        self.store.unreserve(bytes);
        self.bytes -= bytes;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.store.disk.written_since.fetch_add(self.bytes, Ordering::Relaxed);
        self.store.unreserve(self.bytes);
    }
}

impl Store {
    /// Measures the bytes the data directory takes on disk: the blocks
    /// allocated to every file RocksDB keeps there (SST and blob files, WAL,
    /// manifest, its log), plus what the memtables hold, plus the blob files
    /// (counted as they change), and restarts the estimate of writes since.
    pub fn measure_disk(&self) -> Result<u64, Error> {
        use std::os::unix::fs::MetadataExt;
        // Writes that end during the scan may be missing from it, and
        // writes in progress are: both stay in the estimate.
        let counted = self.disk.written_since.load(Ordering::Relaxed);
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
        self.disk.measured.store(total, Ordering::Relaxed);
        let _ = self
            .disk
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
        self.written_estimate() + self.disk.reserved.load(Ordering::Relaxed)
    }

    /// The disk estimate without the reserved bytes.
    pub(super) fn written_estimate(&self) -> u64 {
        self.disk.measured.load(Ordering::Relaxed)
            + self.disk.written_since.load(Ordering::Relaxed)
            + self.files.bytes()
    }

    /// The disk estimate plus the largest write refused since the last call:
    /// what eviction must make room for.
    pub fn disk_wanted(&self) -> u64 {
        self.disk_estimate() + self.disk.demand.swap(0, Ordering::Relaxed)
    }

    /// Records whether eviction found nothing old enough to evict while over
    /// its watermark; returns what it was.
    pub fn set_eviction_blocked(&self, blocked: bool) -> bool {
        self.disk.eviction_blocked.swap(blocked, Ordering::Relaxed)
    }

    /// Writes that would take the disk estimate above `limit` are refused
    /// with [`Error::Full`]; reads go on.
    pub fn set_hard_limit(&self, limit: u64) {
        self.disk.hard_limit.store(limit, Ordering::Relaxed);
    }

    /// Admits `bytes` of new data to RocksDB, or refuses them at the hard
    /// limit. The caller holds the admission while it writes them.
    pub(super) fn admit(&self, bytes: u64) -> Result<Admitted<'_>, Error> {
        self.reserve(bytes)?;
        Ok(Admitted { store: self, bytes })
    }

    /// Reserves room for `bytes` about to be written, or refuses them if the
    /// disk estimate with them (and every other reservation) would pass the
    /// hard limit. A refusal asks eviction to make that much room, unless
    /// the write could never fit.
    pub(super) fn reserve(&self, bytes: u64) -> Result<(), Error> {
        let limit = self.disk.hard_limit.load(Ordering::Relaxed);
        let written = self.written_estimate();
        let reserved = self.disk.reserved.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
            (written.saturating_add(r).saturating_add(bytes) <= limit).then_some(r + bytes)
        });
        match reserved {
            Ok(_) => Ok(()),
            Err(r) => {
                self.totals.rejected_writes.fetch_add(1, Ordering::Relaxed);
                if bytes > limit {
                    return Err(Error::TooLarge { bytes, limit });
                }
                self.disk.demand.fetch_max(bytes, Ordering::Relaxed);
                Err(Error::Full { estimate: written + r, limit })
            }
        }
    }

    /// Gives back reserved bytes: written (and counted where they went) or
    /// not needed.
    pub(super) fn unreserve(&self, bytes: u64) {
        let _ = self
            .disk
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| Some(r.saturating_sub(bytes)));
    }

    /// The most bytes a blob of `size` takes on disk once stored: its bytes
    /// (stored raw if they do not compress), each chunk's seal, and the last
    /// block of its file.
    pub(super) fn room_for(&self, size: u64) -> u64 {
        let chunks = size.div_ceil(self.options.chunk_size as u64).max(1);
        size + chunks * chunk::SEAL_LEN + if self.has_file(size) { 4096 } else { 0 }
    }

    /// A blob file error: a full disk is a full cache, refused like one.
    pub(super) fn file_error(&self, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::StorageFull => {
                self.totals.rejected_writes.fetch_add(1, Ordering::Relaxed);
                Error::Full {
                    estimate: self.disk_estimate(),
                    limit: self.disk.hard_limit.load(Ordering::Relaxed),
                }
            }
            _ => Error::File(e),
        }
    }
}

/// The size of the filesystem holding `path`, and its bytes free for an
/// unprivileged writer.
pub(super) fn filesystem_space(path: &Path) -> std::io::Result<(u64, u64)> {
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
