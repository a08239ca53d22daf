//! The object-store client: an S3-compatible bucket that larder nodes
//! share, and the format of larder's objects in it. It knows nothing of the
//! local tier: the cache layer moves chunks between the two.
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
//! - The same path holds, for a blob the local tier keeps as a list of
//!   chunks, a list object: the 8 bytes `LARDERL\n`, the blob's size (u64,
//!   little-endian), the number of chunks (u32, little-endian), each chunk's
//!   digest as its function's key byte, its hash and its size (u64,
//!   little-endian), then the CRC-32C of all after the magic (u32,
//!   little-endian). Each chunk is a blob object of its own, sent once
//!   however many lists name it.
//! - `larder/v1/ac/{instance}/{function}/{hash}`: an action result: the 8
//!   bytes `LARDERA\n`, the CRC-32C of the rest (u32, little-endian), the
//!   ActionResult message. `{instance}` is the instance name in hex, `-` for
//!   none.
//! - `larder/v1/pack/{ms}-{id}`: small blobs written together, with an
//!   index of them (see [`pack`]).
//! - `larder/v1/used/{object}`: an empty object whose modification time is
//!   the last use of `larder/v1/{object}` (its own modification time counts
//!   as a use too), written at most once per `s3_touch_interval` by each
//!   node, when the bucket has a size budget. S3 cannot change an object's
//!   modification time without copying it.
//! - `larder/v1/trim/`: the trimmer's lease generations and clock probe
//!   (see [`lease`] and [`trim`]).

mod known;
mod lease;
pub mod pack;
pub mod trim;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResult, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart,
};

use tokio::sync::mpsc;

use crate::crc::{crc32c, crc32c_append};
use crate::digest::{Digest, Function};
use known::Known;

const BLOB_MAGIC: &[u8; 8] = b"LARDER1\n";
const AC_MAGIC: &[u8; 8] = b"LARDERA\n";
const LIST_MAGIC: &[u8; 8] = b"LARDERL\n";
/// Most chunks a list object names (a 2 GiB blob cut by the local tier has
/// about 4,000): a list of more goes up whole, and an object that declares
/// more is damaged, refused before anything is allocated for it.
pub const MAX_LIST_CHUNKS: usize = 1 << 18;
/// Blobs with more stored bytes than this go up as multipart uploads.
const MULTIPART_FROM: usize = 8 << 20;
/// Part size of multipart uploads (S3's minimum is 5 MiB).
const PART: usize = 8 << 20;
/// Bytes of an object read per GET request.
const RANGE: u64 = 16 << 20;
/// Object-store lookups (HEADs) in flight for one call...
const LOOKUPS_IN_FLIGHT: usize = 32;
/// ...and for all calls together.
const LOOKUPS_IN_FLIGHT_TOTAL: usize = 256;
/// Uses waiting to be recorded at most (a use beyond is recorded at its next).
const TOUCHES_QUEUED: usize = 16 * 1024;
/// Last-use markers written at once.
const TOUCHES_IN_FLIGHT: usize = 16;
/// Objects whose recent use each node remembers (8 bytes each).
const TOUCHED_ENTRIES: usize = 1 << 20;
/// Blobs found by a HEAD from this size on whose object is smaller than the
/// blob are read, if lists, to record uses of their chunks (the local tier
/// makes lists of blobs from dedup_min_size, 4 MiB; smaller lists come from
/// clients' splices, whose chunks are recorded when read).
const LIST_CHUNKS_TOUCHED_FROM: u64 = 1 << 20;

#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    #[error("the object store is unavailable ({0}); the local tier keeps serving reads")]
    Unavailable(String),
    #[error("the object store holds a damaged {0}")]
    Damaged(String),
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
    /// How long a blob known present is not asked about again.
    pub existence_ttl: Duration,
    /// Most blobs known present at once (8 bytes each); 0: none.
    pub existence_entries: usize,
    /// Most packed blobs indexed; 0: no packs written or read.
    pub pack_index_entries: usize,
    /// How this node keeps the bucket within a size budget, if it has one.
    pub trim: Option<trim::Trim>,
}

/// Requests sent to the object store, by kind, lookups answered from what
/// this node knows, and the trimmer's work, since this node started.
#[derive(Default)]
pub struct Requests {
    pub head: AtomicU64,
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub delete: AtomicU64,
    pub list: AtomicU64,
    pub remembered: AtomicU64,
    /// Trim passes that deleted something, and what they deleted.
    pub trims: AtomicU64,
    pub trimmed_objects: AtomicU64,
    pub trimmed_bytes: AtomicU64,
    /// Bytes in the bucket at this node's last measurement (0: none yet).
    pub bucket_bytes: AtomicU64,
}

impl Requests {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (kind, count) for each kind of request, then lookups remembered.
    pub fn snapshot(&self) -> ([(&'static str, u64); 5], u64) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (
            [
                ("head", get(&self.head)),
                ("get", get(&self.get)),
                ("put", get(&self.put)),
                ("delete", get(&self.delete)),
                ("list", get(&self.list)),
            ],
            get(&self.remembered),
        )
    }
}

pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    max_action_result: usize,
    /// Blobs known present, not asked about again for a while.
    known: Arc<Known>,
    /// The packs this node knows, and the blobs they hold.
    packs: pack::Packs,
    /// Last uses waiting to be recorded, when the bucket has a size budget.
    touches: Option<Touches>,
    /// Turns for lookups, across calls.
    lookups: Arc<tokio::sync::Semaphore>,
    pub requests: Arc<Requests>,
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

impl Bucket {
    pub fn connect(settings: &Settings) -> Result<Bucket, Error> {
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
        let touches = settings.trim.as_ref().map(|t| {
            let (queue, pending) = mpsc::channel(TOUCHES_QUEUED);
            Touches {
                recent: Known::new(t.touch_interval, TOUCHED_ENTRIES),
                queue,
                pending: std::sync::Mutex::new(Some(pending)),
            }
        });
        Ok(Bucket {
            store: Arc::new(store),
            prefix,
            max_action_result: settings.max_action_result,
            known: Arc::new(Known::new(settings.existence_ttl, settings.existence_entries)),
            packs: pack::Packs::new(settings.existence_ttl, settings.pack_index_entries),
            touches,
            lookups: Arc::new(tokio::sync::Semaphore::new(LOOKUPS_IN_FLIGHT_TOTAL)),
            requests: Arc::new(Requests::default()),
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
        self.path(blob_object(d))
    }

    fn ac_path(&self, instance: &str, action: &Digest) -> Path {
        self.path(ac_object(instance, action))
    }

    /// The last-use marker of `object` (a path under `larder/v1/`).
    fn used_path(&self, object: &str) -> Path {
        self.path(format!("used/{object}"))
    }

    /// Records a use of each of `blobs` (reads, hits, blobs found present),
    /// unless this node did lately; `true` for those recorded now. Does
    /// nothing without a size budget. A full queue drops the record, to
    /// be made at the next use: a use is never worth waiting for.
    /// A blob in a pack this node knows is used through its pack.
    pub fn touch_blobs(&self, blobs: &[Digest]) -> Vec<bool> {
        if self.touches.is_none() {
            return vec![false; blobs.len()];
        }
        let packs = self.packs.find(blobs);
        blobs
            .iter()
            .zip(packs)
            .map(|(d, pack)| match pack {
                Some(pack) => self.touch_pack(&pack),
                None => !d.is_empty_blob() && self.touch_object(blob_object(d), known::fingerprint(d)),
            })
            .collect()
    }

    /// Records a use of an action result (a hit), as [`Bucket::touch_blobs`].
    pub fn touch_action_result(&self, instance: &str, action: &Digest) {
        let object = ac_object(instance, action);
        let f = known::fingerprint(action) ^ crc32c(object.as_bytes()) as u64;
        self.touch_object(object, f);
    }

    /// Records a use of `object` (a path under `larder/v1/`, whose
    /// fingerprint is `f`), unless this node did lately; `true` if queued.
    fn touch_object(&self, object: String, f: u64) -> bool {
        let Some(touches) = &self.touches else { return false };
        let fresh = touches.recent.insert_new(std::iter::once(f))[0];
        let sent = fresh && touches.queue.try_send(Touch::Marker(self.used_path(&object), f)).is_ok();
        if fresh && !sent {
            touches.recent.remove_fingerprint(f);
        }
        sent
    }

    /// Records what [`Bucket::touch_blobs`] queued, a few at a time,
    /// until aborted; `None` without a size budget (or when asked twice).
    pub fn toucher(self: &Arc<Self>) -> Option<impl Future<Output = ()> + Send + 'static + use<>> {
        let pending = self.touches.as_ref()?.pending.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let bucket = Arc::clone(self);
        Some(tokio_stream::wrappers::ReceiverStream::new(pending).for_each_concurrent(
            TOUCHES_IN_FLIGHT,
            move |touch| {
                let bucket = Arc::clone(&bucket);
                async move { bucket.record(touch).await }
            },
        ))
    }

    async fn record(&self, touch: Touch) {
        match touch {
            Touch::Marker(marker, fingerprint) => {
                Requests::count(&self.requests.put);
                if let Err(e) = self.store.put(&marker, PutPayload::default()).await {
                    tracing::debug!("could not record a use in {marker}: {e}");
                    // Recorded at the next use, then.
                    if let Some(touches) = &self.touches {
                        touches.recent.remove_fingerprint(fingerprint);
                    }
                }
            }
            Touch::Chunks(list) => match self.chunks_of(&list).await {
                Ok(Some(chunks)) => {
                    self.touch_blobs(&chunks);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("could not record a use of the chunks of {list}: {e}"),
            },
        }
    }

    /// The chunks of `digest`'s object, if it is a list object.
    async fn chunks_of(&self, digest: &Digest) -> Result<Option<Vec<Digest>>, Error> {
        let path = self.blob_path(digest);
        // Its header first: most objects are not lists, and may be large.
        Requests::count(&self.requests.get);
        match self.store.get_range(&path, 0..16).await {
            Ok(head) if head.starts_with(LIST_MAGIC) => {}
            Ok(_) | Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let Some(stream) = self.get_ranged(&path).await? else { return Ok(None) };
        let mut reader = BlobReader { buffer: BytesMut::new(), stream, max_chunk: 0 };
        match reader.header().await? {
            Header::List(size) if size == digest.size => Ok(Some(reader.list(size).await?)),
            _ => Ok(None),
        }
    }

    /// Whether small blobs go up in packs (and packs are read).
    pub fn packing(&self) -> bool {
        self.packs.enabled()
    }

    /// Whether the bucket answers (one listing of larder's prefix).
    pub async fn check(&self) -> Result<(), Error> {
        Requests::count(&self.requests.list);
        self.store.list_with_delimiter(Some(&self.path(String::new()))).await?;
        Ok(())
    }

    /// Which of `digests` the object store holds: those known present at
    /// once, the rest looked up in parallel (those found count as used: the
    /// caller relies on them). Lookups not answered by `deadline` count as
    /// absent (the client sends the blob again, which is always safe).
    pub async fn contains(&self, digests: &[Digest], deadline: Option<Instant>) -> Result<Vec<bool>, Error> {
        self.look_up(digests, deadline, true).await
    }

    /// Which of `digests` the object store holds, each asked about: for a
    /// check that must not trust memory (a client writing a blob again may
    /// know that the object store lost it).
    pub async fn contains_now(&self, digests: &[Digest]) -> Result<Vec<bool>, Error> {
        self.look_up(digests, None, false).await
    }

    async fn look_up(
        &self,
        digests: &[Digest],
        deadline: Option<Instant>,
        remembered: bool,
    ) -> Result<Vec<bool>, Error> {
        let mut present = vec![false; digests.len()];
        let mut asked = Vec::new();
        for (i, d) in digests.iter().enumerate() {
            if remembered && self.known.holds(d) {
                present[i] = true;
                Requests::count(&self.requests.remembered);
            } else {
                asked.push(i);
            }
        }
        // Packed blobs: a pack known present answers for its blobs, else
        // one HEAD of it does.
        let asked_digests: Vec<Digest> = asked.iter().map(|&i| digests[i]).collect();
        let held = self.packs_of(&asked_digests, deadline).await;
        let mut packs: std::collections::HashMap<u32, (pack::Held, Vec<usize>)> = Default::default();
        let mut objects = Vec::new();
        for (i, held) in asked.into_iter().zip(held) {
            match held {
                Some(held) if remembered && held.fresh => {
                    present[i] = true;
                    Requests::count(&self.requests.remembered);
                }
                Some(held) => packs.entry(held.pack).or_insert_with(|| (held, Vec::new())).1.push(i),
                None => objects.push(i),
            }
        }
        let pack_lookups = packs.into_values().map(|(held, blobs)| {
            async move {
                let _turn = self.lookups.acquire().await;
                let found = self.head_pack(&held).await?;
                Ok::<_, Error>(Found::Pack(blobs, found))
            }
            .boxed()
        });
        let object_lookups = objects.into_iter().map(|i| {
            // Owned: the futures borrow nothing, so the calls awaiting them stay Send.
            let (store, path) = (Arc::clone(&self.store), self.blob_path(&digests[i]));
            let (turns, requests) = (Arc::clone(&self.lookups), Arc::clone(&self.requests));
            async move {
                let _turn = turns.acquire_owned().await;
                Requests::count(&requests.head);
                match store.head(&path).await {
                    Ok(meta) => Ok(Found::Object(i, meta.size >= 16, meta.size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(Found::Object(i, false, 0)),
                    Err(e) => Err(Error::from(e)),
                }
            }
            .boxed()
        });
        let lookups: Vec<_> = pack_lookups.chain(object_lookups).collect();
        let mut answers = futures::stream::iter(lookups).buffer_unordered(LOOKUPS_IN_FLIGHT);
        loop {
            let answer = match deadline {
                None => answers.next().await,
                Some(deadline) => match tokio::time::timeout_at(deadline.into(), answers.next()).await {
                    Ok(answer) => answer,
                    Err(_) => break,
                },
            };
            let Some(answer) = answer else { break };
            let (i, found, stored) = match answer? {
                Found::Pack(blobs, found) => {
                    // A use of the pack was recorded by its HEAD.
                    for i in blobs {
                        present[i] = found;
                    }
                    continue;
                }
                Found::Object(i, found, stored) => (i, found, stored),
            };
            if found {
                present[i] = true;
                self.known.insert(&digests[i]);
                // The caller relies on it: a use, and of a list's chunks
                // too (an object much smaller than its blob may be a list).
                let d = &digests[i];
                if self.touch_blobs(std::slice::from_ref(d))[0]
                    && stored < d.size
                    && d.size >= LIST_CHUNKS_TOUCHED_FROM
                    && let Some(touches) = &self.touches
                {
                    let _ = touches.queue.try_send(Touch::Chunks(*d));
                }
            } else {
                self.known.remove(&digests[i]);
            }
        }
        Ok(present)
    }

    /// Starts writing a blob's object: its chunks, as the local tier
    /// stores them, follow through [`BlobWriter::push`].
    pub fn blob_writer(&self, digest: &Digest) -> BlobWriter {
        let mut header = BytesMut::with_capacity(16);
        header.extend_from_slice(BLOB_MAGIC);
        header.extend_from_slice(&digest.size.to_le_bytes());
        BlobWriter {
            bucket: Arc::clone(&self.store),
            digest: *digest,
            known: Arc::clone(&self.known),
            requests: Arc::clone(&self.requests),
            path: self.blob_path(digest),
            pending_len: header.len(),
            pending: vec![header.freeze()],
            multipart: None,
        }
    }

    /// A blob's object, for reading its chunks; `None` if there is none.
    /// A chunk over `max_chunk` bytes makes the object damaged.
    pub async fn blob_reader(&self, digest: &Digest, max_chunk: usize) -> Result<Option<BlobReader>, Error> {
        let stream = self.get_ranged(&self.blob_path(digest)).await?;
        if stream.is_some() {
            // Read through: present (a damaged object is forgotten when found
            // so), and used (a list's chunks too, as they are read).
            self.known.insert(digest);
            self.touch_blobs(std::slice::from_ref(digest));
        }
        Ok(stream.map(|stream| BlobReader { buffer: BytesMut::new(), stream, max_chunk }))
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
        Requests::count(&self.requests.get);
        let first = match self.store.get_opts(path, first).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (size, version) = (first.meta.size, first.meta.e_tag.clone());
        let (store, path, requests) = (Arc::clone(&self.store), path.clone(), Arc::clone(&self.requests));
        let rest = futures::stream::iter((RANGE..size).step_by(RANGE as usize))
            .then(move |start| {
                let (store, path) = (Arc::clone(&store), path.clone());
                Requests::count(&requests.get);
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
        if let Some(packed) = self.packs.find_by_hash(function, hash) {
            return Ok(Some(packed));
        }
        if self.packs.enabled()
            && self.list_new_packs(None).await
            && let Some(packed) = self.packs.find_by_hash(function, hash)
        {
            return Ok(Some(packed));
        }
        let Some(probe) = Digest::new(function, hash, 0) else { return Ok(None) };
        Requests::count(&self.requests.get);
        let head = match self.store.get_range(&self.blob_path(&probe), 0..16).await {
            Ok(head) => head,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let rest = head.strip_prefix(BLOB_MAGIC).or_else(|| head.strip_prefix(LIST_MAGIC));
        match rest.and_then(|s| s.first_chunk::<8>()) {
            Some(size) => Ok(Digest::new(function, hash, u64::from_le_bytes(*size))),
            None => Ok(None),
        }
    }

    /// Writes the list object of `digest`, the concatenation of `chunks`,
    /// whose objects the caller has written.
    pub async fn put_list(&self, digest: &Digest, chunks: &[Digest]) -> Result<(), Error> {
        Requests::count(&self.requests.put);
        self.store.put(&self.blob_path(digest), PutPayload::from(list_object(digest, chunks))).await?;
        self.known.insert(digest);
        Ok(())
    }

    /// Deletes a blob's object (one found damaged), so that clients are
    /// asked for the blob again.
    pub async fn forget(&self, digest: &Digest) -> Result<(), Error> {
        self.known.remove(digest);
        Requests::count(&self.requests.delete);
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
        object.extend_from_slice(&crc32c(result).to_le_bytes());
        object.extend_from_slice(result);
        Requests::count(&self.requests.put);
        self.store.put(&self.ac_path(instance, action), PutPayload::from(object)).await?;
        Ok(())
    }

    /// An action result, `None` if absent. An object larger than this node
    /// accepts (`max_message_size`) is not read, and is a miss here: other
    /// nodes may accept it.
    pub async fn get_action_result(&self, instance: &str, action: &Digest) -> Result<Option<Bytes>, Error> {
        let damaged = || Error::Damaged(format!("action result of {action}"));
        Requests::count(&self.requests.get);
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
        if crc32c(result) != u32::from_le_bytes(*crc) {
            return Err(damaged());
        }
        Ok(Some(object.slice(12..)))
    }

    /// Deletes an action result's object (one found damaged).
    pub async fn forget_action_result(&self, instance: &str, action: &Digest) -> Result<(), Error> {
        Requests::count(&self.requests.delete);
        match self.store.delete(&self.ac_path(instance, action)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Last uses waiting to be recorded as marker objects.
struct Touches {
    /// Objects whose use this node recorded lately (for `s3_touch_interval`).
    recent: Known,
    queue: mpsc::Sender<Touch>,
    /// The queue's other end, until the toucher takes it.
    pending: std::sync::Mutex<Option<mpsc::Receiver<Touch>>>,
}

/// What a lookup found: whether a pack holding these blobs is there, or
/// whether one blob's object is (and its size).
enum Found {
    Pack(Vec<usize>, bool),
    Object(usize, bool, u64),
}

/// A use to record.
enum Touch {
    /// Writes this marker; its object's fingerprint in `recent` (forgotten
    /// if the write fails, so that the next use records it).
    Marker(Path, u64),
    /// Records uses of the chunks of this blob's object, if it is a list:
    /// a list must not outlive its chunks, and a node that found the list
    /// by a HEAD does not know them.
    Chunks(Digest),
}

/// The path of a blob's object under `larder/v1/`.
fn blob_object(d: &Digest) -> String {
    format!("cas/{}/{}", d.function.name(), d.hex())
}

/// The path of an action result's object under `larder/v1/`.
fn ac_object(instance: &str, action: &Digest) -> String {
    let instance = if instance.is_empty() { "-".to_string() } else { hex::encode(instance) };
    format!("ac/{instance}/{}/{}", action.function.name(), action.hex())
}

/// Writes one blob object: the header, then each chunk as the local tier
/// stored it. Small objects go up in one PUT when finished; larger ones as a
/// multipart upload with few parts in flight, so memory stays about a part.
pub struct BlobWriter {
    bucket: Arc<dyn ObjectStore>,
    digest: Digest,
    /// Told once the object is written.
    known: Arc<Known>,
    requests: Arc<Requests>,
    path: Path,
    pending: Vec<Bytes>,
    pending_len: usize,
    multipart: Option<WriteMultipart>,
}

impl BlobWriter {
    /// Adds the next chunk, as the chunk codec wrote it.
    pub async fn push(&mut self, value: Vec<u8>) -> Result<(), Error> {
        self.pending_len += 4 + value.len();
        self.pending.push(Bytes::copy_from_slice(&(value.len() as u32).to_le_bytes()));
        self.pending.push(Bytes::from(value));
        if self.pending_len >= MULTIPART_FROM {
            let writer = match &mut self.multipart {
                Some(w) => w,
                None => self.multipart.insert(WriteMultipart::new_with_chunk_size(
                    self.bucket.put_multipart(&self.path).await?,
                    PART,
                )),
            };
            // Counted as a PUT per part (the multipart's own calls aside).
            Requests::count(&self.requests.put);
            writer.wait_for_capacity(2).await?;
            for part in self.pending.drain(..) {
                writer.put(part);
            }
            self.pending_len = 0;
        }
        Ok(())
    }

    /// Makes the object visible, whole.
    pub async fn finish(mut self) -> Result<(), Error> {
        match self.multipart.take() {
            Some(mut writer) => {
                for part in self.pending.drain(..) {
                    writer.put(part);
                }
                writer.finish().await?;
            }
            None => {
                let payload = PutPayload::from_iter(std::mem::take(&mut self.pending));
                Requests::count(&self.requests.put);
                self.bucket.put(&self.path, payload).await?;
            }
        }
        self.known.insert(&self.digest);
        Ok(())
    }

    /// Gives up: an incomplete multipart upload would otherwise stay in the bucket.
    pub async fn abort(mut self) {
        if let Some(writer) = self.multipart.take() {
            let _ = writer.abort().await;
        }
    }
}

/// The list object of `digest`, the concatenation of `chunks`.
fn list_object(digest: &Digest, chunks: &[Digest]) -> Vec<u8> {
    let mut object = Vec::with_capacity(24 + chunks.len() * 48);
    object.extend_from_slice(LIST_MAGIC);
    object.extend_from_slice(&digest.size.to_le_bytes());
    object.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for chunk in chunks {
        object.push(chunk.function as u8);
        object.extend_from_slice(chunk.hash());
        object.extend_from_slice(&chunk.size.to_le_bytes());
    }
    let crc = crc32c(&object[8..]);
    object.extend_from_slice(&crc.to_le_bytes());
    object
}

/// What a blob object holds: the blob's chunks, or the list of blobs it is
/// made of; with the blob's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    Chunks(u64),
    List(u64),
}

/// Reads a blob object's records from its byte stream.
pub struct BlobReader {
    buffer: BytesMut,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    max_chunk: usize,
}

impl BlobReader {
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

    /// What the object holds, from its header.
    pub async fn header(&mut self) -> Result<Header, Error> {
        self.fill(16).await?;
        let head = self.buffer.split_to(16);
        let size = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        match &head[..8] {
            magic if magic == BLOB_MAGIC => Ok(Header::Chunks(size)),
            magic if magic == LIST_MAGIC => Ok(Header::List(size)),
            _ => Err(Error::Damaged("object: not a larder blob object".into())),
        }
    }

    /// The chunks of a list object of `size` bytes, after its header: the
    /// count bounded before anything is allocated for it, the digests
    /// checked against the object's checksum and the sizes against `size`.
    pub async fn list(&mut self, size: u64) -> Result<Vec<Digest>, Error> {
        let damaged = |what: &str| Error::Damaged(format!("list object: {what}"));
        self.fill(4).await?;
        let count_bytes = self.buffer.split_to(4);
        let count = u32::from_le_bytes(count_bytes[..].try_into().expect("4 bytes")) as usize;
        if count > MAX_LIST_CHUNKS {
            return Err(damaged(&format!("it names {count} chunks")));
        }
        let mut crc = crc32c_append(crc32c(&size.to_le_bytes()), &count_bytes);
        // Grown as entries arrive: a count no bytes follow costs nothing.
        let (mut chunks, mut total) = (Vec::with_capacity(count.min(4096)), 0u64);
        for _ in 0..count {
            self.fill(1).await?;
            let function =
                Function::from_byte(self.buffer[0]).ok_or_else(|| damaged("an unknown function"))?;
            let len = 1 + function.hash_len() + 8;
            self.fill(len).await?;
            let entry = self.buffer.split_to(len);
            crc = crc32c_append(crc, &entry);
            let (hash, chunk_size) = entry[1..].split_at(function.hash_len());
            let chunk_size = u64::from_le_bytes(chunk_size.try_into().expect("8 bytes"));
            let digest =
                Digest::new(function, hash, chunk_size).ok_or_else(|| damaged("a malformed digest"))?;
            total = total.saturating_add(chunk_size);
            chunks.push(digest);
        }
        self.fill(4).await?;
        let stored = self.buffer.split_to(4);
        if u32::from_le_bytes(stored[..].try_into().expect("4 bytes")) != crc {
            return Err(damaged("it fails its checksum"));
        }
        if total != size {
            return Err(damaged(&format!("its chunks hold {total} bytes, not {size}")));
        }
        Ok(chunks)
    }

    /// The next chunk, as the chunk codec wrote it (not checked here).
    pub async fn chunk(&mut self) -> Result<Bytes, Error> {
        self.fill(4).await?;
        let len = u32::from_le_bytes(self.buffer[..4].try_into().expect("4 bytes")) as usize;
        // The length comes from the bucket: bounded before it is buffered.
        if len > self.max_chunk {
            return Err(Error::Damaged(format!("object: a chunk of {len} bytes")));
        }
        self.fill(4 + len).await?;
        let _ = self.buffer.split_to(4);
        Ok(self.buffer.split_to(len).freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reader of `object`, arriving in pieces of `piece` bytes.
    fn reader(object: &[u8], piece: usize) -> BlobReader {
        let parts: Vec<object_store::Result<Bytes>> =
            object.chunks(piece.max(1)).map(|p| Ok(Bytes::copy_from_slice(p))).collect();
        BlobReader {
            buffer: BytesMut::new(),
            stream: futures::stream::iter(parts).boxed(),
            max_chunk: 1 << 20,
        }
    }

    async fn read_list(object: &[u8], piece: usize) -> Result<(Header, Vec<Digest>), Error> {
        let mut r = reader(object, piece);
        let header = r.header().await?;
        let Header::List(size) = header else { return Ok((header, Vec::new())) };
        Ok((header, r.list(size).await?))
    }

    #[tokio::test]
    async fn list_objects_round_trip_and_any_change_is_damage() {
        let chunks: Vec<Digest> =
            Function::ALL.iter().map(|f| f.digest(format!("chunk {}", f.name()).as_bytes())).collect();
        let whole = Digest::of(b"the whole blob, of another size");
        let blob = Digest::new(whole.function, whole.hash(), chunks.iter().map(|c| c.size).sum()).unwrap();
        let object = list_object(&blob, &chunks);
        for piece in [1, 7, object.len()] {
            assert_eq!(read_list(&object, piece).await.unwrap(), (Header::List(blob.size), chunks.clone()));
        }
        for i in 8..object.len() {
            let mut bad = object.clone();
            bad[i] ^= 0x10;
            assert!(read_list(&bad, 64).await.is_err(), "byte {i} changed");
        }
        assert!(read_list(&object[..object.len() - 1], 64).await.is_err(), "truncated");
        let other = Digest::new(blob.function, blob.hash(), blob.size + 1).unwrap();
        assert!(read_list(&list_object(&other, &chunks), 64).await.is_err(), "sizes must add up");
    }

    proptest! {
        #![proptest_config(crate::hostile::config())]
        /// A list object is anyone's bytes: it parses, or is damaged, and
        /// never names more chunks than the limit.
        #[test]
        fn any_list_object_parses_or_is_damaged(rest in crate::hostile::bytes(), count in any::<u32>()) {
            let mut object = LIST_MAGIC.to_vec();
            object.extend_from_slice(&(rest.len() as u64).to_le_bytes());
            object.extend_from_slice(&count.to_le_bytes());
            object.extend_from_slice(&rest);
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            if let Ok((_, chunks)) = runtime.block_on(read_list(&object, 4096)) {
                prop_assert!(chunks.len() <= MAX_LIST_CHUNKS);
            }
        }
    }
}
