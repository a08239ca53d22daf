//! ContentAddressableStorage: FindMissingBlobs, the batch calls and GetTree.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    DirectoryLimit, READ_MESSAGE_SIZE, Shared, blocking, ok_status, request_function, required_digest,
    rpc_status,
};
use crate::compression::{self, Decoder};
use crate::digest::{Digest, Encoding, FunctionHint};
use crate::proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
    Directory, FindMissingBlobsRequest, FindMissingBlobsResponse, GetTreeRequest, GetTreeResponse,
    batch_read_blobs_response, batch_update_blobs_request, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage,
};
use crate::store::{NewBlob, Store};

pub struct CasService {
    shared: Arc<Shared>,
}

impl CasService {
    pub fn new(shared: Arc<Shared>) -> Self {
        CasService { shared }
    }

    /// Refuses batches over the advertised limit (sums saturate: declared
    /// sizes come from the client).
    fn check_batch_size(&self, sizes: impl Iterator<Item = u64>, what: &str) -> Result<(), Status> {
        let total = sizes.fold(0u64, u64::saturating_add);
        if total > self.shared.max_batch_size {
            return Err(Status::invalid_argument(format!(
                "{what} totals {total} bytes, over max_batch_total_size_bytes ({}): send large blobs through ByteStream",
                self.shared.max_batch_size
            )));
        }
        Ok(())
    }
}

/// GetTree pages hold at most this many directories when the client sets no page size.
const DEFAULT_TREE_PAGE: usize = 10_000;

pub type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let request = request.into_inner();
        self.shared.check_entries(request.blob_digests.len(), "FindMissingBlobs")?;
        let function = request_function(&request.instance_name, request.digest_function)?;
        let digests = request
            .blob_digests
            .iter()
            .map(|d| Digest::from_proto(d, function))
            .collect::<Result<Vec<_>, _>>()?;
        let (digests, present) = self.shared.present(digests).await?;
        let missing = digests.iter().zip(present).filter(|(_, p)| !p).map(|(d, _)| d.to_proto()).collect();
        Ok(Response::new(FindMissingBlobsResponse { missing_blob_digests: missing }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let request = request.into_inner();
        self.shared.check_entries(request.requests.len(), "BatchUpdateBlobs")?;
        let function = request_function(&request.instance_name, request.digest_function)?;
        // Clients batch by uncompressed size; a zstd blob may decompress to
        // its declared size, and no further.
        let logical = |r: &batch_update_blobs_request::Request| match r.compressor {
            c if c == compressor::Value::Zstd as i32 => {
                r.digest.as_ref().map_or(0, |d| u64::try_from(d.size_bytes).unwrap_or(0))
            }
            _ => r.data.len() as u64,
        };
        self.check_batch_size(request.requests.iter().map(logical), "the batch")?;
        let store = Arc::clone(&self.shared.store);
        let results = blocking(move || {
            // Validate (and decompress) each blob; the valid ones go to the store together.
            let mut decoder = None;
            let mut outcomes = Vec::with_capacity(request.requests.len());
            let mut valid = Vec::new();
            for r in request.requests {
                let checked = required_digest(r.digest.as_ref(), "digest", function)
                    .and_then(|d| incoming_blob(d, r.compressor, r.data, &mut decoder));
                let outcome = match checked {
                    Ok(blob) => {
                        valid.push(blob);
                        Ok(())
                    }
                    Err(status) => Err(status),
                };
                outcomes.push((r.digest, outcome));
            }
            let mut stored = valid.iter().map(|b| b.digest).zip(store.put_blobs(&valid));
            let results: Vec<_> = outcomes
                .into_iter()
                .map(|(digest, checked)| {
                    let result = checked.and_then(|()| {
                        let (d, written) = stored.next().expect("one result per valid blob");
                        written.map(|w| (d, w)).map_err(Status::from)
                    });
                    (digest, result)
                })
                .collect();
            Ok(results)
        })
        .await?;
        // Acknowledged once both tiers hold each blob (with write-through).
        let stored: Vec<_> = results.iter().filter_map(|(_, r)| r.as_ref().ok().copied()).collect();
        let mut replicated = self.shared.replicate(stored).await.into_iter();
        let responses = results
            .into_iter()
            .map(|(digest, result)| {
                let result = result.and_then(|_| replicated.next().expect("one result per stored blob"));
                let status = match result {
                    Ok(()) => ok_status(),
                    Err(status) => rpc_status(&status),
                };
                batch_update_blobs_response::Response { digest, status: Some(status) }
            })
            .collect();
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let request = request.into_inner();
        self.shared.check_entries(request.digests.len(), "BatchReadBlobs")?;
        let function = request_function(&request.instance_name, request.digest_function)?;
        let digests: Vec<Result<Digest, Status>> =
            request.digests.iter().map(|d| Digest::from_proto(d, function).map_err(Status::from)).collect();
        self.check_batch_size(digests.iter().flatten().map(|d| d.size), "the requested blobs")?;
        // The reply holds every blob read.
        let _held = self.shared.budget.hold(digests.iter().flatten().map(|d| d.size).sum()).await?;
        // IDENTITY is always acceptable; zstd when the client lists it.
        let zstd = request.acceptable_compressors.contains(&(compressor::Value::Zstd as i32));
        let wanted: Vec<Digest> = digests.iter().flatten().copied().collect();
        if let Err(status) = self.shared.fetch(&wanted).await {
            // The local tier still answers for what it holds.
            tracing::warn!("BatchReadBlobs: {}", status.message());
        }
        let store = Arc::clone(&self.shared.store);
        let responses = blocking(move || {
            let mut responses = Vec::with_capacity(digests.len());
            for (wire, digest) in request.digests.into_iter().zip(digests) {
                let read = digest.and_then(|d| {
                    let found = match zstd {
                        true => store.read_all_encoded(&d),
                        false => store.read_all(&d).map(|data| data.map(|data| (data, Encoding::Identity))),
                    };
                    found?.ok_or_else(|| Status::not_found(format!("blob {d} is not in the CAS")))
                });
                let (data, encoding, status) = match read {
                    Ok((data, encoding)) => (data, encoding, ok_status()),
                    Err(status) => (Bytes::new(), Encoding::Identity, rpc_status(&status)),
                };
                let compressor = match encoding {
                    Encoding::Identity => compressor::Value::Identity,
                    Encoding::Zstd => compressor::Value::Zstd,
                };
                responses.push(batch_read_blobs_response::Response {
                    digest: Some(wire),
                    data,
                    compressor: compressor as i32,
                    status: Some(status),
                });
            }
            Ok(responses)
        })
        .await?;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(&self, request: Request<GetTreeRequest>) -> Result<Response<TreeStream>, Status> {
        self.tree_page(request.into_inner(), usize::MAX).await.map(Response::new)
    }
}

impl CasService {
    /// GetTree: one page of the tree, as a stream of messages. The page
    /// ends early once it holds `max_bytes` of directories.
    pub async fn tree_page(&self, request: GetTreeRequest, max_bytes: usize) -> Result<TreeStream, Status> {
        let function = request_function(&request.instance_name, request.digest_function)?;
        let root = required_digest(request.root_digest.as_ref(), "root_digest", function)?;
        // Subdirectories use the root's function.
        let function = FunctionHint::Given(root.function);
        let skip = page_token(&request.page_token)?;
        let page_size = match request.page_size {
            n if n < 0 => {
                return Err(Status::invalid_argument(format!("page_size {n} is negative")));
            }
            0 => DEFAULT_TREE_PAGE,
            n => n as usize,
        };
        // Before anything is read, or fetched from the object store.
        let limit = self.shared.directories;
        limit.check_size::<Directory>(&root)?;
        let store = Arc::clone(&self.shared.store);
        if let Err(status) = self.shared.fetch(&[root]).await {
            tracing::warn!("GetTree: {}", status.message());
        }
        let root_present = {
            let store = Arc::clone(&store);
            blocking(move || store.contains(&[root])).await?[0]
        };
        if !root_present {
            return Err(Status::not_found(format!("root directory {root} is not in the CAS")));
        }
        let (tx, rx) = mpsc::channel(2);
        // Two messages queued and one being built (or a REST page).
        let held = self.shared.budget.hold(max_bytes.min(4 * READ_MESSAGE_SIZE) as u64).await?;
        // Directories the local tier lacks are read through from the object
        // store, a level at a time (the walk runs on a blocking thread).
        let (shared, runtime) = (Arc::clone(&self.shared), tokio::runtime::Handle::current());
        let fetch = move |missing: &[Digest]| {
            if let Err(status) = runtime.block_on(shared.fetch(missing)) {
                tracing::warn!("GetTree: {}", status.message());
            }
        };
        tokio::task::spawn_blocking(move || {
            let _held = held;
            let page = Page { skip, size: page_size, max_bytes };
            if let Err(status) = walk_tree(&store, root, function, page, limit, &tx, fetch) {
                // If the client is gone, nobody is waiting for the error either.
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)) as TreeStream)
    }
}

/// How many directories earlier pages listed: the token this server issued.
fn page_token(token: &str) -> Result<usize, Status> {
    match token {
        "" => Ok(0),
        token => token.parse().map_err(|_| {
            Status::invalid_argument(format!("page_token {token:?} was not issued by this server"))
        }),
    }
}

/// Checks one blob of a batch update, decompressing a zstd one (with the
/// batch's `decoder`, made on first use) and noting its frames.
fn incoming_blob(
    digest: Digest,
    encoding: i32,
    data: Bytes,
    decoder: &mut Option<Decoder>,
) -> Result<NewBlob, Status> {
    let (blob, arrived) = match compressor::Value::try_from(encoding) {
        Ok(compressor::Value::Identity) => (NewBlob::new(digest, data), "were sent"),
        Ok(compressor::Value::Zstd) => {
            let decoder = match decoder {
                Some(decoder) => decoder,
                None => decoder.insert(Decoder::new(0)?),
            };
            let out = compression::decompress(decoder, &data, digest.size)
                .map_err(|e| Status::invalid_argument(format!("blob {digest}: {e}")))?;
            (NewBlob { digest, data: out.data, frames: out.frames }, "is what the zstd data decompresses to")
        }
        Ok(other) => {
            return Err(Status::invalid_argument(format!(
                "compressor {} is not supported for batch updates (zstd is)",
                other.as_str_name()
            )));
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!("compressor {encoding} is not a known value")));
        }
    };
    if blob.data.len() as u64 != digest.size {
        return Err(Status::invalid_argument(format!(
            "digest {digest} declares {} bytes but {} {arrived}",
            digest.size,
            blob.data.len()
        )));
    }
    Ok(blob)
}

/// Which directories of a walk make one GetTree page.
#[derive(Clone, Copy)]
struct Page {
    /// Directories listed on earlier pages.
    skip: usize,
    /// Most directories on this page.
    size: usize,
    /// The page ends early once its directories take this many bytes (a
    /// REST reply is one body, not a stream of messages).
    max_bytes: usize,
}

/// Sends one GetTree page: directories breadth-first from `root`, starting
/// after the first `page.skip`, split into messages of about
/// [`READ_MESSAGE_SIZE`]. Missing subtrees are left out; each directory is
/// listed once. The page token is the count of directories listed before the
/// next page: the order is a function of the tree alone. A root that is not
/// a Directory, and any directory over `limit`, fail the call.
fn walk_tree(
    store: &Store,
    root: Digest,
    function: FunctionHint,
    page: Page,
    limit: DirectoryLimit,
    tx: &mpsc::Sender<Result<GetTreeResponse, Status>>,
    fetch: impl Fn(&[Digest]),
) -> Result<(), Status> {
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    // Asked of the object store already: each directory once.
    let mut fetched = HashSet::from([root]);
    let mut position = 0;
    let mut listed = 0;
    let mut message = Vec::new();
    let mut message_bytes = 0;
    let mut page_bytes = 0;
    let send = |directories, next_page_token| {
        // An error means the client went away: stop walking.
        tx.blocking_send(Ok(GetTreeResponse { directories, next_page_token })).is_ok()
    };
    while let Some(digest) = queue.pop_front() {
        let mut directory = limit.read::<Directory>(store, &digest)?;
        if directory.is_none() && fetched.insert(digest) {
            // It and every directory waiting after it, in one parallel fetch.
            let missing: Vec<Digest> =
                std::iter::once(digest).chain(queue.iter().copied().filter(|d| fetched.insert(*d))).collect();
            fetch(&missing);
            directory = limit.read::<Directory>(store, &digest)?;
        }
        let Some(directory) = directory else {
            continue;
        };
        for child in &directory.directories {
            if let Some(Ok(d)) = child.digest.as_ref().map(|d| Digest::from_proto(d, function))
                && seen.insert(d)
            {
                queue.push_back(d);
            }
        }
        position += 1;
        if position <= page.skip {
            continue;
        }
        let bytes = directory.encoded_len();
        message_bytes += bytes;
        page_bytes += bytes;
        message.push(directory);
        listed += 1;
        if listed == page.size || (page_bytes >= page.max_bytes && !queue.is_empty()) {
            let token = if queue.is_empty() { String::new() } else { position.to_string() };
            send(std::mem::take(&mut message), token);
            return Ok(());
        }
        if message_bytes >= READ_MESSAGE_SIZE {
            if !send(std::mem::take(&mut message), String::new()) {
                return Ok(());
            }
            message_bytes = 0;
        }
    }
    send(message, String::new());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// A page token is a count this server wrote, or INVALID_ARGUMENT.
        #[test]
        fn page_tokens_parse_or_are_refused(token in crate::hostile::text(), n in any::<usize>()) {
            match page_token(&token) {
                Ok(_) => prop_assert!(token.bytes().all(|b| b.is_ascii_digit() || b == b'+')),
                Err(status) => prop_assert_eq!(status.code(), tonic::Code::InvalidArgument),
            }
            prop_assert_eq!(page_token(&n.to_string()).unwrap(), n);
        }
    }
}
