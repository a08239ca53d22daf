//! Directory and Tree blobs, read and decoded for the calls that walk them
//! (GetTree, the completeness check of action results), within limits: they
//! are stored client bytes.

use std::sync::Arc;

use super::{Cache, Error, blocking};
use crate::digest::Digest;
use crate::proto::reapi::Directory;
use crate::store::Store;

/// The Directory and Tree blobs a call reads are stored client bytes: one
/// over `max_size` is refused unread, one with more than `max_entries`
/// entries undecoded (decoding costs a struct per entry).
#[derive(Clone, Copy, Debug)]
pub struct DirectoryLimit {
    pub max_size: u64,
    pub max_entries: usize,
}

impl DirectoryLimit {
    /// `max_directory_size`, with one entry per 32 bytes of it (or
    /// `max_call_entries`, if more).
    pub fn new(max_size: u64, max_call_entries: usize) -> DirectoryLimit {
        DirectoryLimit { max_size, max_entries: max_call_entries.max((max_size / 32) as usize) }
    }

    /// Refuses a Directory or Tree blob over `max_size`, from its digest.
    pub fn check_size<M: prost::Name>(&self, digest: &Digest) -> Result<(), Error> {
        if digest.size > self.max_size {
            let what = M::NAME;
            return Err(Error::Precondition(format!(
                "{what} {digest} is larger than max_directory_size ({} bytes): it is not read; raise the limit if such {what}s are real",
                self.max_size
            )));
        }
        Ok(())
    }

    /// A Directory or Tree blob, decoded; `None` if the local tier lacks it.
    pub fn read<M: prost::Message + prost::Name + Default>(
        &self,
        store: &Store,
        digest: &Digest,
    ) -> Result<Option<M>, Error> {
        let what = M::NAME;
        self.check_size::<M>(digest)?;
        let Some(data) = store.read_all(digest)? else {
            return Ok(None);
        };
        if crate::codec::count_entries(&data, &M::full_name(), self.max_entries) > self.max_entries {
            return Err(Error::Precondition(format!(
                "{what} {digest} has more than {} entries: it is not decoded (max_directory_size allows one per 32 bytes)",
                self.max_entries
            )));
        }
        M::decode(data)
            .map(Some)
            .map_err(|e| Error::Precondition(format!("blob {digest} is not a {what}: {e}")))
    }
}

impl Cache {
    /// Refuses a root Directory over the limit, before anything is read.
    pub fn check_directory(&self, root: &Digest) -> Result<(), Error> {
        self.limits.directories.check_size::<Directory>(root)
    }

    /// Whether the blob is present, read through from the object store if
    /// it can be (with the object store down, the local tier answers).
    pub async fn present(&self, digest: Digest) -> Result<bool, Error> {
        if let Err(e) = self.fetch(&[digest]).await {
            tracing::warn!("GetTree: {e}");
        }
        Ok(self.local(vec![digest]).await?.1[0])
    }

    /// Directories, decoded, in the order asked: `None` for one neither
    /// tier holds; an error for one over the limits (the caller decides
    /// whether it reaches it). Those the local tier lacks are read through
    /// from the object store first, in one parallel fetch.
    pub async fn directories(
        &self,
        digests: Vec<Digest>,
    ) -> Result<Vec<Result<Option<Directory>, Error>>, Error> {
        let limit = self.limits.directories;
        let read_all = |digests: Vec<Digest>| {
            let store = Arc::clone(&self.store);
            blocking(move || {
                let read = digests.iter().map(|d| limit.read::<Directory>(&store, d)).collect();
                Ok::<_, Error>((digests, read))
            })
        };
        let (digests, mut read): (Vec<Digest>, Vec<Result<Option<Directory>, Error>>) =
            read_all(digests).await?;
        let missing: Vec<usize> = (0..digests.len()).filter(|&i| matches!(read[i], Ok(None))).collect();
        if self.tier.is_none() || missing.is_empty() {
            return Ok(read);
        }
        let wanted: Vec<Digest> = missing.iter().map(|&i| digests[i]).collect();
        if let Err(e) = self.fetch(&wanted).await {
            tracing::warn!("GetTree: {e}");
            return Ok(read);
        }
        let (_, again) = read_all(wanted).await?;
        for (i, found) in missing.into_iter().zip(again) {
            read[i] = found;
        }
        Ok(read)
    }
}
