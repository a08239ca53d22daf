//! Large blobs in files of their own, so that evicting one gives its space
//! back at once.
//!
//! A blob of at least [`MIN_SIZE`] keeps its encoded chunks back to back
//! in `files/{id % 256:02x}/{id:016x}`, named by its blob id; the chunks
//! column family holds, for each chunk, a reference to its place in the file
//! (see `chunk::file_ref`). Deleting the blob deletes its file: no garbage is
//! left for compaction to find later, and nothing live must be rewritten
//! first, which a full disk has no room for.
//!
//! The allocated bytes of all files are counted as they change (a `du` of
//! thousands of files every few hundred milliseconds would cost more than
//! the writes it measures), from one scan at open.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory of blob files inside the data directory.
pub const DIR: &str = "files";

/// Blobs of at least this many bytes have a file of their own: most bytes
/// are in such blobs, and a file (and its sync) per blob costs little next
/// to writing them. Smaller blobs stay in RocksDB, where a file each would
/// cost more than their bytes.
pub const MIN_SIZE: u64 = 256 << 10;

pub struct Files {
    dir: PathBuf,
    /// Allocated bytes of every file.
    bytes: AtomicU64,
}

/// The bytes a file takes on disk (its allocated blocks, which is what
/// `du` and a full disk count), not its length.
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.blocks() * 512
}

impl Files {
    /// Opens (creating) the blob files of a data directory, and counts them.
    pub fn open(data: &Path) -> io::Result<Files> {
        let dir = data.join(DIR);
        let mut bytes = 0;
        for shard in 0..=255u8 {
            let shard = dir.join(format!("{shard:02x}"));
            std::fs::create_dir_all(&shard)?;
            for entry in std::fs::read_dir(&shard)? {
                bytes += allocated(&entry?.metadata()?);
            }
        }
        Ok(Files { dir, bytes: AtomicU64::new(bytes) })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{:02x}/{id:016x}", id % 256))
    }

    /// Allocated bytes of all blob files.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn count(&self, before: u64, after: u64) {
        if after >= before {
            self.bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            let freed = before - after;
            let _ = self
                .bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(freed)));
        }
    }

    /// The blob ids that have a file.
    pub fn ids(&self) -> io::Result<Vec<u64>> {
        let mut ids = Vec::new();
        for shard in 0..=255u8 {
            for entry in std::fs::read_dir(self.dir.join(format!("{shard:02x}")))? {
                let name = entry?.file_name();
                // Anything else in here is not ours to judge: it is left alone.
                if let Some(id) = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// Opens the file of `id` for writing at `end`, creating it if need be;
    /// whatever lies past `end` (bytes a crash left unreferenced) is cut.
    pub fn writer(&self, id: u64, end: u64) -> io::Result<Writer> {
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).read(true).open(self.path(id))?;
        let before = allocated(&file.metadata()?);
        file.set_len(end)?;
        let blocks = allocated(&file.metadata()?);
        self.count(before, blocks);
        Ok(Writer { file, end, blocks })
    }

    /// `len` bytes of the file of `id` at `pos`. A file that is missing or
    /// shorter than that is reported as `NotFound` or `UnexpectedEof`.
    pub fn read(&self, id: u64, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut file = File::open(self.path(id))?;
        file.seek(SeekFrom::Start(pos))?;
        // Read into capacity as it is: zeroing a chunk first costs about
        // as much as reading it from the page cache.
        let mut out = Vec::with_capacity(len);
        file.take(len as u64).read_to_end(&mut out)?;
        match out.len() == len {
            true => Ok(out),
            false => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} bytes at {pos}, {len} expected", out.len()),
            )),
        }
    }

    /// Deletes the file of `id`, if there is one.
    pub fn remove(&self, id: u64) -> io::Result<()> {
        let path = self.path(id);
        let bytes = match std::fs::symlink_metadata(&path) {
            Ok(meta) => allocated(&meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {
                self.count(bytes, 0);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Appends encoded chunks to one blob file.
pub struct Writer {
    file: File,
    end: u64,
    /// Allocated bytes of the file, as last counted.
    blocks: u64,
}

impl Writer {
    /// Appends `value`, returning where it starts, and counts the blocks it
    /// took.
    pub fn append(&mut self, files: &Files, value: &[u8]) -> io::Result<u64> {
        let at = self.end;
        let written = self.file.write_all_at(value, at);
        // Counted even after a failure: a short write may have taken blocks.
        let blocks = allocated(&self.file.metadata()?);
        files.count(self.blocks, blocks);
        self.blocks = blocks;
        written?;
        self.end += value.len() as u64;
        Ok(at)
    }

    /// Makes what was appended durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_gets_exactly_the_bytes_asked_for_or_says_why_not() {
        let tmp = tempfile::tempdir().unwrap();
        let files = Files::open(tmp.path()).unwrap();
        let mut writer = files.writer(7, 0).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(writer.append(&files, &data).unwrap(), 0);
        assert_eq!(files.read(7, 1000, 150_000).unwrap(), data[1000..151_000]);
        assert_eq!(files.read(7, 0, 0).unwrap(), b"");
        let short = files.read(7, 100_000, 100_001).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof, "{short}");
        assert_eq!(files.read(8, 0, 1).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
