//! The second tier: an S3-compatible object store that larder nodes share.
//!
//! Layout (version 1), under the configured prefix:
//!
//! - `larder/v1/cas/{function}/{hash}`: a blob, as its stored chunks: the
//!   8 bytes `LARDER1\n`, the blob's size (u64, little-endian), then each chunk
//!   as its length (u32, little-endian) and the value larder's chunk codec
//!   wrote (zstd frame or raw bytes, CRC-32C, tag). Objects are copied from
//!   the local tier without being compressed again, and checked chunk by chunk
//!   and against the digest when read back: a corrupt or truncated object is
//!   treated as missing.
//! - `larder/v1/ac/{instance}/{function}/{hash}`: an action result: the 8
//!   bytes `LARDERA\n`, the CRC-32C of the rest (u32, little-endian), the
//!   ActionResult message. `{instance}` is the instance name in hex, `-` for
//!   none.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResult, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart,
};
use tokio::sync::mpsc;

use crate::digest::Digest;
use crate::store::{self, Store, chunk};

const BLOB_MAGIC: &[u8; 8] = b"LARDER1\n";
const AC_MAGIC: &[u8; 8] = b"LARDERA\n";
/// Blobs with more stored bytes than this go up as multipart uploads.
const MULTIPART_FROM: usize = 8 << 20;
/// Part size of multipart uploads (S3's minimum is 5 MiB).
const PART: usize = 8 << 20;
/// How long a copy waits for a reader streaming it to take a chunk.
const TEE_WAIT: Duration = Duration::from_secs(5);
/// Bytes of an object read per GET request.
const RANGE: u64 = 16 << 20;
/// Object-store calls in flight for one FindMissingBlobs.
const LOOKUPS_IN_FLIGHT: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object store is unavailable ({0}); the local tier keeps serving reads")]
    Unavailable(String),
    #[error("the object store holds a damaged {0}")]
    Damaged(String),
    #[error("{0}")]
    Local(#[from] store::Error),
    #[error("the object store is misconfigured: {0}")]
    Config(String),
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Error {
        // S3 answers that no retry mends reach us as generic errors, whose
        // text carries the HTTP status and S3's error code.
        let text = e.to_string();
        match e {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                Error::Config(format!("{e}: check the credentials and the bucket's permissions"))
            }
            _ if text.contains("NoSuchBucket") => {
                Error::Config(format!("{text}: the bucket does not exist; create it, or fix s3_bucket"))
            }
            _ if text.contains("403 Forbidden") || text.contains("401 Unauthorized") => {
                Error::Config(format!("{text}: check the credentials and the bucket's permissions"))
            }
            _ => Error::Unavailable(text),
        }
    }
}

/// Where the object store is and how to reach it.
#[derive(Clone, Debug)]
pub struct Settings {
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    pub path_style: bool,
    /// The largest action result accepted (`max_message_size`): a larger
    /// object is damaged.
    pub max_action_result: usize,
}

pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    max_action_result: usize,
    /// What it is, for messages: endpoint and bucket.
    pub name: String,
}

/// Credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with
/// AWS_SESSION_TOKEN), else the profile AWS_PROFILE (default "default") of
/// the shared credentials file (AWS_SHARED_CREDENTIALS_FILE, else
/// ~/.aws/credentials).
fn credentials() -> Option<(String, String, Option<String>)> {
    if let (Ok(id), Ok(secret)) = (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY"))
    {
        return Some((id, secret, std::env::var("AWS_SESSION_TOKEN").ok()));
    }
    let file = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".aws/credentials")))?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let text = std::fs::read_to_string(file).ok()?;
    let (mut id, mut secret, mut token, mut inside) = (None, None, None, false);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == profile;
        } else if inside && let Some((key, value)) = line.split_once('=') {
            let value = Some(value.trim().to_string());
            match key.trim() {
                "aws_access_key_id" => id = value,
                "aws_secret_access_key" => secret = value,
                "aws_session_token" => token = value,
                _ => {}
            }
        }
    }
    Some((id?, secret?, token))
}

impl Remote {
    pub fn connect(settings: &Settings) -> Result<Remote, Error> {
        use object_store::aws::AmazonS3Builder;
        let (id, secret, token) = credentials().ok_or_else(|| {
            Error::Config(
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials"
                    .into(),
            )
        })?;
        // Virtual-hosted style: the bucket leads the endpoint's host name
        // (object_store takes an endpoint as given).
        let endpoint = match settings.endpoint.split_once("://") {
            Some((scheme, host)) if !settings.path_style => format!("{scheme}://{}.{host}", settings.bucket),
            _ => settings.endpoint.clone(),
        };
        let mut builder = AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_access_key_id(id)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(!settings.path_style)
            // A store that is down fails calls quickly: the local tier goes on.
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
                backoff: object_store::BackoffConfig::default(),
            })
            .with_client_options(
                // The options carry allow_http: set here, not before.
                object_store::ClientOptions::new()
                    .with_allow_http(settings.endpoint.starts_with("http://"))
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
        let store = builder.build().map_err(|e| Error::Config(e.to_string()))?;
        let prefix = settings.prefix.trim_matches('/').to_string();
        Ok(Remote {
            store: Arc::new(store),
            prefix,
            max_action_result: settings.max_action_result,
            name: format!("{} bucket {}", settings.endpoint, settings.bucket),
        })
    }

    fn path(&self, rest: String) -> Path {
        if self.prefix.is_empty() {
            Path::from(format!("larder/v1/{rest}"))
        } else {
            Path::from(format!("{}/larder/v1/{rest}", self.prefix))
        }
    }

    fn blob_path(&self, d: &Digest) -> Path {
        self.path(format!("cas/{}/{}", d.function.name(), d.hex()))
    }

    fn ac_path(&self, instance: &str, action: &Digest) -> Path {
        let instance = if instance.is_empty() { "-".to_string() } else { hex::encode(instance) };
        self.path(format!("ac/{instance}/{}/{}", action.function.name(), action.hex()))
    }

    /// Whether the bucket answers (one listing of larder's prefix).
    pub async fn check(&self) -> Result<(), Error> {
        self.store.list_with_delimiter(Some(&self.path(String::new()))).await?;
        Ok(())
    }

    /// Which of `digests` the object store holds, looked up in parallel.
    pub async fn contains(&self, digests: &[Digest]) -> Result<Vec<bool>, Error> {
        let lookups = digests.iter().map(|d| {
            // Owned: the futures borrow nothing, so the calls awaiting them stay Send.
            let (store, path) = (Arc::clone(&self.store), self.blob_path(d));
            async move {
                match store.head(&path).await {
                    Ok(meta) => Ok(meta.size >= 16),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(Error::from(e)),
                }
            }
        });
        let lookups: Vec<_> = lookups.collect();
        futures::stream::iter(lookups).buffered(LOOKUPS_IN_FLIGHT).try_collect().await
    }

    /// Copies a blob from the local tier, chunk by chunk as it is stored.
    pub async fn upload_from(&self, local: &Arc<Store>, digest: Digest) -> Result<(), Error> {
        let blob = {
            let local = Arc::clone(local);
            blocking(move || local.locate(&digest)).await?
        };
        let Some(blob) = blob else {
            return Err(Error::Local(store::Error::Vanished(format!(
                "blob {digest} is not in the local tier"
            ))));
        };
        let path = self.blob_path(&digest);
        let mut header = BytesMut::with_capacity(16);
        header.extend_from_slice(BLOB_MAGIC);
        header.extend_from_slice(&digest.size.to_le_bytes());
        let pending = vec![header.freeze()];
        let mut multipart: Option<WriteMultipart> = None;
        let copied = self.copy_out(local, blob, &path, pending, &mut multipart).await;
        if copied.is_err()
            && let Some(writer) = multipart
        {
            // Incomplete multipart uploads would otherwise stay in the bucket.
            let _ = writer.abort().await;
        }
        copied
    }

    async fn copy_out(
        &self,
        local: &Arc<Store>,
        blob: store::Blob,
        path: &Path,
        mut pending: Vec<Bytes>,
        multipart: &mut Option<WriteMultipart>,
    ) -> Result<(), Error> {
        let digest = blob.digest;
        let mut pending_len: usize = pending.iter().map(Bytes::len).sum();
        let mut offset = 0;
        while offset < digest.size {
            let (local, b) = (Arc::clone(local), blob);
            let (start, value, held) = blocking(move || local.encoded_chunk_at(&b, offset)).await?;
            if start != offset {
                return Err(Error::Local(store::Error::Corrupt(format!(
                    "blob {digest} has no chunk starting at {offset}"
                ))));
            }
            offset += held;
            pending_len += 4 + value.len();
            pending.push(Bytes::copy_from_slice(&(value.len() as u32).to_le_bytes()));
            pending.push(Bytes::from(value));
            if pending_len >= MULTIPART_FROM {
                let writer = match multipart {
                    Some(w) => w,
                    None => multipart.insert(WriteMultipart::new_with_chunk_size(
                        self.store.put_multipart(path).await?,
                        PART,
                    )),
                };
                // Few parts in flight: memory stays bounded (about a chunk).
                writer.wait_for_capacity(2).await?;
                for part in pending.drain(..) {
                    writer.put(part);
                }
                pending_len = 0;
            }
        }
        match multipart.take() {
            Some(mut writer) => {
                for part in pending {
                    writer.put(part);
                }
                if let Err(e) = writer.finish().await {
                    return Err(e.into());
                }
            }
            None => {
                self.store.put(path, PutPayload::from_iter(pending)).await?;
            }
        }
        Ok(())
    }

    /// Copies a blob into the local tier, checking every chunk and the
    /// digest; `false` if the object store lacks it (or holds it damaged).
    /// Each chunk is also sent to `tee`, if given, once it is stored: a
    /// reader can stream the blob while it arrives. (A blob another call is
    /// fetching already is waited for, and sends nothing.)
    pub async fn fetch_into(
        &self,
        local: &Arc<Store>,
        digest: Digest,
        tee: Option<mpsc::Sender<Piece>>,
    ) -> Result<bool, Error> {
        let resource = format!("remote-fetch/{}/{}", digest.function.name(), digest.hex());
        // Another call may be fetching it right now: wait for that one, and
        // if it failed, fetch again, so that this call gets its own answer
        // (UNAVAILABLE, say) rather than a missing blob.
        let (stream, upload) = loop {
            let Some(stream) = self.get_ranged(&self.blob_path(&digest)).await? else {
                return Ok(false);
            };
            let upload = {
                let local = Arc::clone(local);
                let resource = resource.clone();
                blocking(move || local.begin_copy(&resource, digest)).await
            };
            match upload {
                Ok(upload) => break (stream, upload),
                Err(Error::Local(store::Error::UploadBusy(_))) => {
                    drop(stream);
                    while local.upload_active(&resource) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let (local, d) = (Arc::clone(local), digest);
                    if blocking(move || local.contains(&[d])).await?[0] {
                        return Ok(true);
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let mut reader = Reader { buffer: BytesMut::new(), stream };
        let finished = match copy(&mut reader, upload, digest, tee).await {
            (Some(upload), Ok(())) => blocking(move || upload.finish()).await,
            (Some(upload), Err(e)) => {
                let _ = blocking(move || upload.discard()).await;
                return Err(e);
            }
            (None, result) => return result.map(|()| false),
        };
        match finished {
            Ok(_) => Ok(true),
            Err(Error::Local(store::Error::DigestMismatch(m))) => {
                Err(Error::Damaged(format!("object for {}: its bytes hash to {}", m.expected, m.actual)))
            }
            Err(e) => Err(e),
        }
    }

    /// An object's bytes, `RANGE` of them per request: the client's
    /// timeout then bounds each request, not the whole object. Later ranges
    /// must come from the same version of the object as the first (another
    /// node may write the blob again meanwhile, in other chunks). `None` if
    /// there is no such object.
    async fn get_ranged(
        &self,
        path: &Path,
    ) -> Result<Option<BoxStream<'static, object_store::Result<Bytes>>>, Error> {
        let range = |start: u64, end: u64| Some(GetRange::Bounded(start..end));
        let first = GetOptions { range: range(0, RANGE), ..GetOptions::default() };
        let first = match self.store.get_opts(path, first).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (size, version) = (first.meta.size, first.meta.e_tag.clone());
        let (store, path) = (Arc::clone(&self.store), path.clone());
        let rest = futures::stream::iter((RANGE..size).step_by(RANGE as usize))
            .then(move |start| {
                let (store, path) = (Arc::clone(&store), path.clone());
                let options = GetOptions {
                    range: range(start, size.min(start + RANGE)),
                    if_match: version.clone(),
                    ..GetOptions::default()
                };
                async move { store.get_opts(&path, options).await.map(GetResult::into_stream) }
            })
            .try_flatten();
        Ok(Some(first.into_stream().chain(rest).boxed()))
    }

    /// The blob stored under `hash`, found by its object's header (for
    /// clients that name blobs by hash alone, like Bazel's HTTP cache).
    pub async fn find_by_hash(
        &self,
        function: crate::digest::Function,
        hash: &[u8],
    ) -> Result<Option<Digest>, Error> {
        let Some(probe) = Digest::new(function, hash, 0) else { return Ok(None) };
        let head = match self.store.get_range(&self.blob_path(&probe), 0..16).await {
            Ok(head) => head,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match head.strip_prefix(BLOB_MAGIC).and_then(|s| s.first_chunk::<8>()) {
            Some(size) => Ok(Digest::new(function, hash, u64::from_le_bytes(*size))),
            None => Ok(None),
        }
    }

    /// Deletes a blob's object (one found damaged), so that clients are
    /// asked for the blob again.
    pub async fn forget(&self, digest: &Digest) -> Result<(), Error> {
        match self.store.delete(&self.blob_path(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_action_result(
        &self,
        instance: &str,
        action: &Digest,
        result: &[u8],
    ) -> Result<(), Error> {
        let mut object = Vec::with_capacity(result.len() + 12);
        object.extend_from_slice(AC_MAGIC);
        object.extend_from_slice(&crc32c::crc32c(result).to_le_bytes());
        object.extend_from_slice(result);
        self.store.put(&self.ac_path(instance, action), PutPayload::from(object)).await?;
        Ok(())
    }

    /// An action result, `None` if absent. An object larger than this node
    /// accepts (`max_message_size`) is not read, and is a miss here: other
    /// nodes may accept it.
    pub async fn get_action_result(&self, instance: &str, action: &Digest) -> Result<Option<Bytes>, Error> {
        let damaged = || Error::Damaged(format!("action result of {action}"));
        let object = match self.store.get(&self.ac_path(instance, action)).await {
            Ok(r) if r.meta.size > self.max_action_result as u64 + 12 => {
                tracing::warn!(
                    "the object store's action result of {action} is {} bytes, over max_message_size: a miss on this node",
                    r.meta.size
                );
                return Ok(None);
            }
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let rest = object.strip_prefix(AC_MAGIC).ok_or_else(damaged)?;
        let (crc, result) = rest.split_first_chunk::<4>().ok_or_else(damaged)?;
        if crc32c::crc32c(result) != u32::from_le_bytes(*crc) {
            return Err(damaged());
        }
        Ok(Some(object.slice(12..)))
    }

    /// Deletes an action result's object (one found damaged).
    pub async fn forget_action_result(&self, instance: &str, action: &Digest) -> Result<(), Error> {
        match self.store.delete(&self.ac_path(instance, action)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Runs store work on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, store::Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Local(store::Error::Batch(format!("a storage worker failed: {e}"))))?
        .map_err(Error::Local)
}

/// One chunk of a blob being fetched, as stored (`value`) and decoded.
pub struct Piece {
    /// Its offset in the blob.
    pub start: u64,
    pub data: Bytes,
    pub value: Bytes,
}

/// Copies a blob object's chunks into a local upload, checking each (on
/// the blocking pool: decompression and disk), and sends each to `tee`.
/// Gives the upload back.
async fn copy(
    reader: &mut Reader,
    mut upload: store::Upload,
    digest: Digest,
    mut tee: Option<mpsc::Sender<Piece>>,
) -> (Option<store::Upload>, Result<(), Error>) {
    let size = match reader.header().await {
        Ok(size) if size == digest.size => size,
        Ok(size) => {
            return (
                Some(upload),
                Err(Error::Damaged(format!("object for {digest}: it declares {size} bytes"))),
            );
        }
        Err(e) => return (Some(upload), Err(e)),
    };
    let mut held = 0;
    while held < size {
        let value = match reader.chunk().await {
            Ok(v) => v,
            Err(e) => return (Some(upload), Err(e)),
        };
        let stored = value.clone();
        let remaining = size - held;
        let worked = tokio::task::spawn_blocking(move || {
            let appended = match chunk::decode(&stored) {
                Some(data) if data.len() as u64 <= remaining => {
                    upload.append_encoded(&data, stored.to_vec()).map(|()| data).map_err(Error::Local)
                }
                Some(_) => Err(Error::Damaged(format!(
                    "object for {digest}: its chunks hold more than {size} bytes"
                ))),
                None => Err(Error::Damaged(format!("object for {digest}: a chunk fails its check"))),
            };
            (upload, appended)
        })
        .await;
        let appended;
        (upload, appended) = match worked {
            Ok(pair) => pair,
            // The upload went with the failed task; its record expires.
            Err(e) => {
                return (
                    None,
                    Err(Error::Local(store::Error::Batch(format!("a storage worker failed: {e}")))),
                );
            }
        };
        match appended {
            Ok(data) => {
                let start = held;
                held += data.len() as u64;
                // A reader that went away, or that is slower than the object
                // store, does not hold up the copy: it is sent no more.
                if let Some(sender) = &tee {
                    let sent =
                        tokio::time::timeout(TEE_WAIT, sender.send(Piece { start, data, value })).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        tee = None;
                    }
                }
            }
            Err(e) => return (Some(upload), Err(e)),
        }
    }
    (Some(upload), Ok(()))
}

/// Reads a blob object's records from its byte stream.
struct Reader {
    buffer: BytesMut,
    stream: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
}

impl Reader {
    /// At least `n` bytes buffered, or the object is truncated.
    async fn fill(&mut self, n: usize) -> Result<(), Error> {
        while self.buffer.len() < n {
            match self.stream.next().await {
                Some(part) => self.buffer.extend_from_slice(&part?),
                None => return Err(Error::Damaged("object: it is truncated".into())),
            }
        }
        Ok(())
    }

    async fn header(&mut self) -> Result<u64, Error> {
        self.fill(16).await?;
        let head = self.buffer.split_to(16);
        if &head[..8] != BLOB_MAGIC {
            return Err(Error::Damaged("object: not a larder blob object".into()));
        }
        Ok(u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")))
    }

    async fn chunk(&mut self) -> Result<Bytes, Error> {
        self.fill(4).await?;
        let len = u32::from_le_bytes(self.buffer[..4].try_into().expect("4 bytes")) as usize;
        // A chunk holds at most MAX_CHUNK_SIZE bytes, compressed or not (a
        // frame that cannot shrink them is stored raw).
        if len > chunk::MAX_CHUNK_SIZE + 1024 {
            return Err(Error::Damaged(format!("object: a chunk of {len} bytes")));
        }
        self.fill(4 + len).await?;
        let _ = self.buffer.split_to(4);
        Ok(self.buffer.split_to(len).freeze())
    }
}
