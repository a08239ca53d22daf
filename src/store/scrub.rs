//! Scrubbing: re-reading and re-hashing every stored blob, and removing
//! those that fail (`larder scrub`, and the server's online scrub).

use rocksdb::IteratorMode;

use super::layout::*;
use super::{Blob, Error, Store};

/// What a scrub checked and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scrubbed {
    pub blobs: u64,
    pub bytes: u64,
    pub removed: u64,
}

impl Store {
    /// Re-reads and re-hashes every stored blob, removing those whose chunks
    /// fail their checks or whose bytes do not hash to their digest, and
    /// lists that lost a chunk.
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
            if entry.form.is_list() {
                // A list was hashed whole when it was made, and its chunks
                // are scrubbed as blobs: its references must still cover it,
                // each naming a stored chunk.
                let refs = self.refs_of(entry.blob_id)?;
                let mut gone = None;
                for (_, chunk, _) in &refs {
                    if self.get_entry(chunk)?.is_none() {
                        gone = Some(format!("chunk {chunk} is gone"));
                        break;
                    }
                }
                if !Store::refs_cover(&refs, digest.size) {
                    gone = Some("its references do not cover its bytes".into());
                }
                if let Some(detail) = gone
                    && let Error::Removed(_) = self.remove_corrupt(&blob, detail)
                {
                    report.removed += 1;
                }
                report.blobs += 1;
                if !progress(0) {
                    break;
                }
                continue;
            }
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
}
