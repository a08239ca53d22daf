//! Thin gRPC adapters over the store, one file per API. Each validates what
//! the client sent, runs store work on the blocking pool, and maps errors to
//! gRPC statuses here, in one place.

pub mod action_cache;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod http;
mod http_cache;
mod rest;

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use tonic::{Code, Status};

use crate::proto::{reapi, rpc};
use crate::{compression, digest, store};

/// What every service shares: the store and the limits clients are told about.
pub struct Shared {
    pub store: Arc<store::Store>,
    /// The object store tier behind the local one, if any.
    pub remote: Option<Arc<crate::remote::Remote>>,
    /// Writes are acknowledged once the local tier holds them; the
    /// replicator copies them to the object store.
    pub write_back: bool,
    /// Wakes the replicator (see `crate::replicate`).
    pub wake_replicator: Arc<tokio::sync::Notify>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Largest sum of blob sizes in one batch call (advertised).
    pub max_batch_size: u64,
    /// Largest gRPC message received or sent.
    pub max_message_size: usize,
    /// Most entries in one request (`max_call_entries`).
    pub max_entries: usize,
    /// The bytes calls in flight may hold, all together.
    pub budget: Arc<crate::budget::Budget>,
    /// What Directory and Tree blobs a call may read.
    pub directories: DirectoryLimit,
}

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
    pub fn check_size<M: prost::Name>(&self, digest: &digest::Digest) -> Result<(), Status> {
        if digest.size > self.max_size {
            let what = M::NAME;
            return Err(Status::failed_precondition(format!(
                "{what} {digest} is larger than max_directory_size ({} bytes): it is not read; raise the limit if such {what}s are real",
                self.max_size
            )));
        }
        Ok(())
    }

    /// A Directory or Tree blob, decoded; `None` if the local tier lacks it.
    pub fn read<M: prost::Message + prost::Name + Default>(
        &self,
        store: &store::Store,
        digest: &digest::Digest,
    ) -> Result<Option<M>, Status> {
        let what = M::NAME;
        self.check_size::<M>(digest)?;
        let Some(data) = store.read_all(digest)? else {
            return Ok(None);
        };
        if crate::codec::count_entries(&data, &M::full_name(), self.max_entries) > self.max_entries {
            return Err(Status::failed_precondition(format!(
                "{what} {digest} has more than {} entries: it is not decoded (max_directory_size allows one per 32 bytes)",
                self.max_entries
            )));
        }
        M::decode(data)
            .map(Some)
            .map_err(|e| Status::failed_precondition(format!("blob {digest} is not a {what}: {e}")))
    }
}

impl Shared {
    /// Refuses a call with more entries than `max_call_entries`, before any
    /// work per entry (the REST face decodes its JSON before this).
    pub fn check_entries(&self, entries: usize, what: &str) -> Result<(), Status> {
        if entries > self.max_entries {
            return Err(Status::invalid_argument(format!(
                "{what} lists {entries} entries, more than max_call_entries ({}): split it into smaller calls",
                self.max_entries
            )));
        }
        Ok(())
    }
}

/// Blobs copied between the tiers at once for one call.
const FETCHES_IN_FLIGHT: usize = 32;

impl Shared {
    /// Which of `digests` either tier holds: the local index first, then the
    /// object store for the local misses only. With the object store down,
    /// its blobs count as missing (clients upload them again).
    pub async fn present(
        &self,
        digests: Vec<digest::Digest>,
    ) -> Result<(Vec<digest::Digest>, Vec<bool>), Status> {
        let store = Arc::clone(&self.store);
        let (digests, mut present) = blocking(move || {
            let present = store.contains(&digests)?;
            Ok((digests, present))
        })
        .await?;
        if let Some(remote) = &self.remote {
            let misses: Vec<usize> = (0..digests.len()).filter(|&i| !present[i]).collect();
            let asked: Vec<digest::Digest> = misses.iter().map(|&i| digests[i]).collect();
            match remote.contains(&asked).await {
                Ok(found) => misses.iter().zip(found).for_each(|(&i, f)| present[i] = f),
                Err(e) => tracing::warn!("FindMissingBlobs answered from the local tier alone: {e}"),
            }
        }
        Ok((digests, present))
    }

    /// Brings the blobs the local tier lacks in from the object store (a
    /// read-through). Blobs neither tier holds stay missing; an object store
    /// that is down makes this UNAVAILABLE.
    pub async fn fetch(&self, digests: &[digest::Digest]) -> Result<(), Status> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let store = Arc::clone(&self.store);
        let wanted = digests.to_vec();
        let present = blocking(move || store.contains(&wanted)).await?;
        let local = present.iter().filter(|&&p| p).count() as u64;
        let fetches: Vec<_> = digests
            .iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(d, _)| self.fetch_one(remote, *d, None))
            .collect();
        // In parallel: small blobs cost the object store's latency each.
        let found: Vec<bool> =
            futures::stream::iter(fetches).buffer_unordered(FETCHES_IN_FLIGHT).try_collect().await?;
        let remote_hits = found.iter().filter(|&&f| f).count() as u64;
        self.metrics.tier_reads(local, remote_hits, found.len() as u64 - remote_hits);
        Ok(())
    }

    /// Brings one blob the local tier lacks in from the object store,
    /// sending its chunks to `tee` as they are stored (see
    /// [`crate::remote::Remote::fetch_into`]); `false` if the object store
    /// lacks it. A damaged object is deleted, so that clients write it again.
    pub fn fetch_one(
        &self,
        remote: &Arc<crate::remote::Remote>,
        digest: digest::Digest,
        tee: Option<tokio::sync::mpsc::Sender<crate::remote::Piece>>,
    ) -> impl Future<Output = Result<bool, Status>> + Send + 'static {
        let (remote, store, metrics) =
            (Arc::clone(remote), Arc::clone(&self.store), Arc::clone(&self.metrics));
        async move {
            match remote.fetch_into(&store, digest, tee).await {
                Ok(found) => Ok(found),
                Err(crate::remote::Error::Damaged(what)) => {
                    metrics.tier_error(true);
                    tracing::warn!("deleted, to be written again: the object store held a damaged {what}");
                    let _ = remote.forget(&digest).await;
                    Ok(false)
                }
                Err(e) => {
                    metrics.tier_error(false);
                    Err(Status::from(e))
                }
            }
        }
    }

    /// Copies blobs just written to the local tier to the object store,
    /// [`FETCHES_IN_FLIGHT`] at a time; a result per blob. Write-through: a
    /// write is acknowledged only once both tiers hold it, and a failed copy
    /// stays queued for the replicator. Write-back: the queue holds them
    /// (blobs the local tier held already are queued to be checked), and
    /// the replicator is woken.
    pub async fn replicate(&self, written: Vec<(digest::Digest, store::Written)>) -> Vec<Result<(), Status>> {
        let all_done =
            |written: &[(digest::Digest, store::Written)]| written.iter().map(|_| Ok(())).collect();
        let Some(remote) = &self.remote else { return all_done(&written) };
        if self.write_back {
            let rewritten: Vec<digest::Digest> = written
                .iter()
                .filter(|(_, w)| *w == store::Written::AlreadyPresent)
                .map(|(d, _)| *d)
                .collect();
            if !rewritten.is_empty() {
                let store = Arc::clone(&self.store);
                if let Err(status) = blocking(move || store.recheck_blobs(&rewritten)).await {
                    tracing::warn!("could not queue blobs written again for a check: {}", status.message());
                }
            }
            self.wake_replicator.notify_one();
            return all_done(&written);
        }
        let copies = written.into_iter().map(|(digest, written)| self.copy_out(remote, digest, written));
        let results: Vec<Result<Option<digest::Digest>, Status>> =
            futures::stream::iter(copies).buffered(FETCHES_IN_FLIGHT).collect().await;
        // Off the queue in one write.
        let copied: Vec<digest::Digest> =
            results.iter().filter_map(|r| r.as_ref().ok().copied().flatten()).collect();
        if !copied.is_empty() {
            let store = Arc::clone(&self.store);
            if let Err(status) = blocking(move || store.dequeue_blobs(&copied)).await {
                // Still queued: the replicator copies them again, harmlessly.
                tracing::warn!("could not take copied blobs off the queue: {}", status.message());
            }
        }
        results.into_iter().map(|r| r.map(|_| ())).collect()
    }

    /// [`Shared::replicate`] of one blob.
    pub async fn replicate_one(&self, digest: digest::Digest, written: store::Written) -> Result<(), Status> {
        self.replicate(vec![(digest, written)]).await.pop().unwrap_or(Ok(()))
    }

    /// Copies one blob to the object store: `Some` if it was copied. A blob
    /// the local tier held already is copied if it is queued, or if the
    /// object store lacks it (it may predate the tier).
    async fn copy_out(
        &self,
        remote: &crate::remote::Remote,
        digest: digest::Digest,
        written: store::Written,
    ) -> Result<Option<digest::Digest>, Status> {
        if digest.is_empty_blob() {
            return Ok(None);
        }
        if written == store::Written::AlreadyPresent {
            let store = Arc::clone(&self.store);
            let queued = blocking(move || store.is_queued(&digest)).await?;
            if !queued && remote.contains(&[digest]).await?[0] {
                return Ok(None);
            }
        }
        if let Err(e) = remote.upload_from(&self.store, digest).await {
            self.metrics.tier_error(false);
            return Err(e.into());
        }
        self.metrics.tier_written(digest.size);
        Ok(Some(digest))
    }

    /// Copies an action result just stored locally to the object store, as
    /// [`Shared::replicate`] does a blob.
    pub async fn replicate_action_result(
        &self,
        instance: String,
        action: digest::Digest,
        result: Vec<u8>,
    ) -> Result<(), Status> {
        let Some(remote) = &self.remote else { return Ok(()) };
        if self.write_back {
            self.wake_replicator.notify_one();
            return Ok(());
        }
        if let Err(e) = remote.put_action_result(&instance, &action, &result).await {
            self.metrics.tier_error(false);
            return Err(e.into());
        }
        let store = Arc::clone(&self.store);
        blocking(move || store.dequeue_action_result(&instance, &action, Some(&result))).await
    }
}

impl From<crate::remote::Error> for Status {
    fn from(e: crate::remote::Error) -> Status {
        use crate::remote::Error::*;
        match e {
            Unavailable(_) => Status::unavailable(format!("{e}; retry when it is back")),
            Damaged(_) => Status::not_found(e.to_string()),
            Local(e) => Status::from(e),
            Config(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

/// Largest data payload in one ByteStream ReadResponse: well under the 4 MiB
/// that clients accept by default.
pub const READ_MESSAGE_SIZE: usize = 1 << 20;

/// Runs store work on the blocking pool, keeping the async runtime free.
pub async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, store::Error> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("a storage worker failed: {e}")))?
        .map_err(Status::from)
}

impl From<store::Error> for Status {
    fn from(e: store::Error) -> Status {
        use store::Error::*;
        let code = match &e {
            DigestMismatch(_) | BadOffset { .. } => Code::InvalidArgument,
            UploadBusy(_) => Code::Aborted,
            Vanished(_) | Removed(_) => Code::NotFound,
            Corrupt(_) => Code::DataLoss,
            Full { .. } | QueueFull { .. } | TooLarge { .. } => Code::ResourceExhausted,
            // Eviction keeps writes off a full disk; should one slip through, say so.
            Db(e) if e.to_string().contains("No space left") => Code::ResourceExhausted,
            Open(_) | Locked(_) => Code::Unavailable,
            Batch(_) | Db(_) | Measure(_) | File(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<compression::Error> for Status {
    fn from(e: compression::Error) -> Status {
        match e {
            compression::Error::Setup(_) => Status::internal(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

impl From<digest::Error> for Status {
    fn from(e: digest::Error) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

/// A `google.rpc.Status` for per-item results in batch responses.
pub fn rpc_status(status: &Status) -> rpc::Status {
    rpc::Status { code: status.code() as i32, message: status.message().to_string(), details: vec![] }
}

pub fn ok_status() -> rpc::Status {
    rpc::Status::default()
}

/// Validates the instance name and digest function common to REAPI requests.
pub fn request_function(instance: &str, function: i32) -> Result<digest::FunctionHint, Status> {
    digest::check_instance(instance)?;
    Ok(digest::Function::from_request(function)?)
}

/// A required digest field.
pub fn required_digest(
    d: Option<&reapi::Digest>,
    field: &str,
    function: digest::FunctionHint,
) -> Result<digest::Digest, Status> {
    digest::Digest::from_optional(d, function)?
        .ok_or_else(|| Status::invalid_argument(format!("{field} is required")))
}
