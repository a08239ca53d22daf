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

use super::{READ_MESSAGE_SIZE, Shared, invalid, ok_status, request_function, required_digest, rpc_status};
use crate::cache::{Cache, Incoming};
use crate::cdc::Chunking;
use crate::digest::{Digest, Encoding, FunctionHint};
use crate::proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetTreeRequest, GetTreeResponse, SpliceBlobRequest,
    SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse, batch_read_blobs_response,
    batch_update_blobs_request, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage,
};

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
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let missing = self.shared.cache.find_missing(digests).await?;
        let missing = missing.iter().map(Digest::to_proto).collect();
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
        // Each blob is checked as far as its encoding here; the cache
        // checks its bytes.
        let mut incoming = Vec::new();
        let checked: Vec<_> = request
            .requests
            .into_iter()
            .map(|r| {
                let blob = required_digest(r.digest.as_ref(), "digest", function).and_then(|digest| {
                    Ok(Incoming { digest, encoding: encoding(r.compressor)?, data: r.data })
                });
                (r.digest, blob.map(|blob| incoming.push(blob)))
            })
            .collect();
        let mut stored = self.shared.cache.write_blobs(incoming).await?.into_iter();
        let responses = checked
            .into_iter()
            .map(|(digest, checked)| {
                let result = checked.and_then(|()| {
                    stored.next().expect("one result per blob passed on").map_err(Status::from)
                });
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
            request.digests.iter().map(|d| Digest::from_proto(d, function).map_err(invalid)).collect();
        self.check_batch_size(digests.iter().flatten().map(|d| d.size), "the requested blobs")?;
        // IDENTITY is always acceptable; zstd when the client lists it.
        let zstd = request.acceptable_compressors.contains(&(compressor::Value::Zstd as i32));
        // Flattening gives no size hint: without room made first, the list
        // would grow by reallocating, a cost on every batch read.
        let mut wanted = Vec::with_capacity(digests.len());
        wanted.extend(digests.iter().flatten().copied());
        let mut read = self.shared.cache.read_blobs(wanted, zstd).await?.into_iter();
        let responses = request
            .digests
            .into_iter()
            .zip(digests)
            .map(|(wire, digest)| {
                let read = digest
                    .and_then(|_| read.next().expect("one result per valid digest").map_err(Status::from));
                let (data, encoding, status) = match read {
                    Ok((data, encoding)) => (data, encoding, ok_status()),
                    Err(status) => (Bytes::new(), Encoding::Identity, rpc_status(&status)),
                };
                let compressor = match encoding {
                    Encoding::Identity => compressor::Value::Identity,
                    Encoding::Zstd => compressor::Value::Zstd,
                };
                batch_read_blobs_response::Response {
                    digest: Some(wire),
                    data,
                    compressor: compressor as i32,
                    status: Some(status),
                }
            })
            .collect();
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = TreeStream;

    async fn split_blob(
        &self,
        request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        let request = request.into_inner();
        let function = request_function(&request.instance_name, request.digest_function)?;
        let blob = required_digest(request.blob_digest.as_ref(), "blob_digest", function)?;
        let chunking = Chunking::for_request(request.chunking_function);
        let chunks = self.shared.cache.split_blob(blob, &chunking).await?;
        Ok(Response::new(SplitBlobResponse {
            chunk_digests: chunks.iter().map(Digest::to_proto).collect(),
            chunking_function: chunking.wire() as i32,
            // Every list fits one reply (see `Cache::split_blob`).
            indirect_chunk_list: None,
        }))
    }

    async fn splice_blob(
        &self,
        request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        let request = request.into_inner();
        self.shared.check_entries(request.chunk_digests.len(), "SpliceBlob")?;
        let function = request_function(&request.instance_name, request.digest_function)?;
        let blob = required_digest(request.blob_digest.as_ref(), "blob_digest", function)?;
        // The chunks use the blob's function.
        let chunks = request
            .chunk_digests
            .iter()
            .map(|d| Digest::from_proto(d, FunctionHint::Given(blob.function)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        self.shared.cache.splice_blob(blob, chunks).await?;
        Ok(Response::new(SpliceBlobResponse { blob_digest: Some(blob.to_proto()) }))
    }

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
        let cache = Arc::clone(&self.shared.cache);
        cache.check_directory(&root)?;
        if !cache.present(root).await? {
            return Err(Status::not_found(format!("root directory {root} is not in the CAS")));
        }
        let (tx, rx) = mpsc::channel(2);
        // Two messages queued and one being built (or a REST page).
        let held = cache.hold(max_bytes.min(4 * READ_MESSAGE_SIZE) as u64).await?;
        tokio::spawn(async move {
            let _held = held;
            let page = Page { skip, size: page_size, max_bytes };
            if let Err(status) = walk_tree(&cache, root, function, page, &tx).await {
                // If the client is gone, nobody is waiting for the error either.
                let _ = tx.send(Err(status)).await;
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

/// The encoding of one blob of a batch update.
fn encoding(compressor: i32) -> Result<Encoding, Status> {
    match compressor::Value::try_from(compressor) {
        Ok(compressor::Value::Identity) => Ok(Encoding::Identity),
        Ok(compressor::Value::Zstd) => Ok(Encoding::Zstd),
        Ok(other) => Err(Status::invalid_argument(format!(
            "compressor {} is not supported for batch updates (zstd is)",
            other.as_str_name()
        ))),
        Err(_) => Err(Status::invalid_argument(format!("compressor {compressor} is not a known value"))),
    }
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

/// Directories read from the cache at once: up to this many, or this many
/// declared bytes (each is read whole).
const WALK_BATCH: usize = 1024;
const WALK_BATCH_BYTES: u64 = 4 << 20;

/// Sends one GetTree page: directories breadth-first from `root`, starting
/// after the first `page.skip`, split into messages of about
/// [`READ_MESSAGE_SIZE`]. Missing subtrees are left out; each directory is
/// listed once. The page token is the count of directories listed before the
/// next page: the order is a function of the tree alone. A root that is not
/// a Directory, and any directory over the limits, fail the call.
///
/// The directories waiting at the front of the queue are read together (and
/// read through from the object store together): the order is the same as
/// one at a time, since children join the queue behind them.
async fn walk_tree(
    cache: &Cache,
    root: Digest,
    function: FunctionHint,
    page: Page,
    tx: &mpsc::Sender<Result<GetTreeResponse, Status>>,
) -> Result<(), Status> {
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    let mut position = 0;
    let mut listed = 0;
    let mut message = Vec::new();
    let mut message_bytes = 0;
    let mut page_bytes = 0;
    while !queue.is_empty() {
        let (mut batch, mut bytes) = (Vec::new(), 0u64);
        while let Some(&next) = queue.front()
            && (batch.is_empty()
                || (batch.len() < WALK_BATCH && bytes.saturating_add(next.size) <= WALK_BATCH_BYTES))
        {
            batch.push(next);
            bytes = bytes.saturating_add(next.size);
            queue.pop_front();
        }
        let directories = cache.directories(batch).await?;
        let count = directories.len();
        for (i, directory) in directories.into_iter().enumerate() {
            let Some(directory) = directory? else {
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
            // Whether any directory is left to walk: in this batch, or queued.
            let more = i + 1 < count || !queue.is_empty();
            if listed == page.size || (page_bytes >= page.max_bytes && more) {
                let token = if more { position.to_string() } else { String::new() };
                let _ = tx.send(Ok(GetTreeResponse { directories: message, next_page_token: token })).await;
                return Ok(());
            }
            if message_bytes >= READ_MESSAGE_SIZE {
                let directories = std::mem::take(&mut message);
                let sent = tx.send(Ok(GetTreeResponse { directories, next_page_token: String::new() })).await;
                // An error means the client went away: stop walking.
                if sent.is_err() {
                    return Ok(());
                }
                message_bytes = 0;
            }
        }
    }
    let _ = tx.send(Ok(GetTreeResponse { directories: message, next_page_token: String::new() })).await;
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
