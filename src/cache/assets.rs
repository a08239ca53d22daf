//! The Remote Asset API's records: which URIs (with qualifiers) name which
//! content in the CAS, and the downloads that make new ones.
//!
//! A record is an action result stored under a key derived from its URI and
//! qualifiers: its outputs are the content and what the pusher said the
//! content references. So records are stored, evicted, copied to the object
//! store and checked complete like any action result, and a record whose
//! content is gone is a miss.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;

use super::{Cache, Error, Inline, Lookup, Progress, blocking, own_upload};
use crate::digest::{Digest, Encoding, Function, FunctionHint};
use crate::download::{self, Downloader, Sri, SriHasher};
use crate::proto::reapi::{ActionResult, ExecutedActionMetadata, OutputDirectory, OutputFile};
use crate::store;

/// Downloads in progress at once; more wait for a turn, within their timeout.
const CONCURRENT_DOWNLOADS: usize = 16;

/// The `type_url` of a record's own fields in its action result.
const RECORD_TYPE: &str = "larder.dev/asset.Record";

/// The output path of a record's content.
const CONTENT: &str = "content";

/// Whether a URI names a file (FetchBlob, PushBlob) or a directory tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Directory,
}

/// A location to fetch from, with the headers its client asked to send to
/// it alone.
#[derive(Clone, Debug)]
pub struct Source {
    pub uri: String,
    pub headers: Vec<(String, String)>,
}

/// A Fetch request, as the service checked it.
pub struct Wanted {
    pub instance: String,
    pub kind: Kind,
    pub function: Function,
    pub sources: Vec<Source>,
    /// Headers for every source (a source's own come after them).
    pub headers: Vec<(String, String)>,
    /// Qualifiers that name the content along with the URI (sorted).
    pub qualifiers: Vec<(String, String)>,
    /// `checksum.sri`, checked against the content, never only trusted.
    pub sri: Option<Sri>,
    /// Qualifiers a record may match but a download cannot honour.
    pub unsupported: Vec<String>,
    /// Content recorded before this (ms since the epoch) is not accepted.
    pub oldest_ms: Option<i64>,
    pub timeout: Option<Duration>,
}

/// A Push request, as the service checked it.
pub struct Pushed {
    pub instance: String,
    pub kind: Kind,
    pub uris: Vec<String>,
    pub qualifiers: Vec<(String, String)>,
    pub content: Digest,
    pub blobs: Vec<Digest>,
    pub directories: Vec<Digest>,
    /// After this (ms since the epoch) the record is not served.
    pub expires_ms: Option<i64>,
}

/// A Fetch's answer.
pub enum Fetched {
    Found {
        uri: String,
        content: Digest,
        expires_ms: Option<i64>,
    },
    /// Why no URI gave the content, for the response's status: an error
    /// outside this server's control.
    Failed {
        uri: String,
        error: Error,
    },
}

/// What a record holds beside its outputs.
#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    /// When it was pushed, or its download began (ms since the epoch).
    #[prost(int64, tag = "1")]
    since_ms: i64,
    /// When it stops being served; 0: never.
    #[prost(int64, tag = "2")]
    expires_ms: i64,
}

/// Downloads: the client, where they are kept until stored, and who is
/// downloading what.
pub struct Downloads {
    downloader: Downloader,
    /// The data directory: a download is kept there, unnamed, until stored.
    dir: PathBuf,
    /// Each record key being fetched, so that clients asking at once cause
    /// one download.
    fetching: Mutex<HashMap<Digest, Weak<tokio::sync::Mutex<()>>>>,
    turns: tokio::sync::Semaphore,
    /// Largest download: `download_max_size`, within `max_blob_size`.
    max_size: u64,
}

impl Downloads {
    pub fn new(downloader: Downloader, dir: PathBuf, max_size: u64) -> Downloads {
        Downloads {
            downloader,
            dir,
            fetching: Mutex::new(HashMap::new()),
            turns: tokio::sync::Semaphore::new(CONCURRENT_DOWNLOADS),
            max_size,
        }
    }

    /// The lock of one record key: held while its content is downloaded.
    fn lock(&self, key: Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        fetching.retain(|_, lock| lock.strong_count() > 0);
        if let Some(lock) = fetching.get(&key).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        fetching.insert(key, Arc::downgrade(&lock));
        lock
    }
}

/// Length-prefixed fields, so that no two lists encode alike.
fn fields<'a>(fields: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for s in fields {
        bytes.extend_from_slice(&(s.len() as u64).to_le_bytes());
        bytes.extend_from_slice(s.as_bytes());
    }
    bytes
}

/// The naming qualifiers of a request, hashed once for all its URIs.
fn naming(function: Function, qualifiers: &[(String, String)]) -> Digest {
    function.digest(&fields(qualifiers.iter().flat_map(|(n, v)| [n.as_str(), v.as_str()])))
}

/// The key of the record of `uri`: a digest of the kind, the URI and the
/// naming qualifiers' digest.
fn key(kind: Kind, uri: &str, naming: &Digest) -> Digest {
    let kind = match kind {
        Kind::Blob => "blob",
        Kind::Directory => "directory",
    };
    let mut bytes = b"larder asset record 2\n".to_vec();
    bytes.extend_from_slice(&fields([kind, uri]));
    bytes.extend_from_slice(naming.hash());
    naming.function.digest(&bytes)
}

/// A record as an action result.
fn to_result(
    kind: Kind,
    content: Digest,
    blobs: &[Digest],
    directories: &[Digest],
    record: Record,
) -> ActionResult {
    let file =
        |path: String, d: &Digest| OutputFile { path, digest: Some(d.to_proto()), ..Default::default() };
    let directory = |path: String, d: &Digest| OutputDirectory {
        path,
        root_directory_digest: Some(d.to_proto()),
        ..Default::default()
    };
    let mut result = ActionResult::default();
    match kind {
        Kind::Blob => result.output_files.push(file(CONTENT.into(), &content)),
        Kind::Directory => result.output_directories.push(directory(CONTENT.into(), &content)),
    }
    for (i, d) in blobs.iter().enumerate() {
        result.output_files.push(file(format!("references/blobs/{i}"), d));
    }
    for (i, d) in directories.iter().enumerate() {
        result.output_directories.push(directory(format!("references/directories/{i}"), d));
    }
    let own = pbjson_types::Any { type_url: RECORD_TYPE.into(), value: record.encode_to_vec().into() };
    result.execution_metadata =
        Some(ExecutedActionMetadata { auxiliary_metadata: vec![own], ..Default::default() });
    result
}

/// A record's content and fields, if `result` is one of `kind` (anyone may
/// write an action result under any key: anything else is a miss).
fn from_result(result: &ActionResult, kind: Kind, function: Function) -> Option<(Digest, Record)> {
    let proto = match kind {
        Kind::Blob => result.output_files.iter().find(|f| f.path == CONTENT)?.digest.as_ref()?,
        Kind::Directory => {
            result.output_directories.iter().find(|d| d.path == CONTENT)?.root_directory_digest.as_ref()?
        }
    };
    let content = Digest::from_proto(proto, FunctionHint::Given(function)).ok()?;
    let own =
        result.execution_metadata.as_ref()?.auxiliary_metadata.iter().find(|a| a.type_url == RECORD_TYPE)?;
    Some((content, Record::decode(own.value.as_ref()).ok()?))
}

impl Cache {
    /// Records that each of `pushed.uris` names its content, which must be
    /// in the CAS already.
    pub async fn push_asset(&self, pushed: Pushed) -> Result<(), Error> {
        let content = pushed.content;
        if !self.find_missing(vec![content]).await?.is_empty() {
            return Err(Error::Precondition(format!(
                "{content} is not in the CAS: upload it before pushing a record of it"
            )));
        }
        // 0 means never: an expiry at the epoch is one already past.
        let expires_ms = pushed.expires_ms.map_or(0, |ms| ms.max(1));
        let record = Record { since_ms: store::now_ms() as i64, expires_ms };
        let result = to_result(pushed.kind, content, &pushed.blobs, &pushed.directories, record);
        let naming = naming(content.function, &pushed.qualifiers);
        for uri in &pushed.uris {
            let key = key(pushed.kind, uri, &naming);
            self.put_action_result(pushed.instance.clone(), key, Some(key.size), &result).await?;
        }
        Ok(())
    }

    /// The content the URIs of `wanted` name: from a record, from the CAS
    /// when `checksum.sri` names content it holds, else downloaded (when
    /// downloads are on), verified, stored and recorded.
    pub async fn fetch_asset(self: &Arc<Self>, wanted: Wanted) -> Result<Fetched, Error> {
        if let Some(found) = self.recorded(&wanted).await? {
            self.metrics.asset_fetch("record");
            return Ok(found);
        }
        if let Some(found) = self.held_by_checksum(&wanted).await? {
            self.metrics.asset_fetch("checksum");
            return Ok(found);
        }
        let first = wanted.sources.first().map(|s| s.uri.clone()).unwrap_or_default();
        let downloads = match (&self.downloads, wanted.kind) {
            (Some(downloads), Kind::Blob) => downloads,
            (_, kind) => {
                self.metrics.asset_fetch("failed");
                let why = match kind {
                    Kind::Blob => "downloads are off (download_allow is empty)",
                    Kind::Directory => "this server does not unpack directories from origins",
                };
                return Ok(Fetched::Failed {
                    uri: first,
                    error: Error::NotFound(format!("nothing was pushed for these URIs, and {why}")),
                });
            }
        };
        if !wanted.unsupported.is_empty() {
            return Err(Error::Invalid(format!(
                "qualifiers not supported for downloads: {}; nothing was pushed with them for these URIs",
                wanted.unsupported.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
            )));
        }
        let timeout = downloads.downloader.timeout(wanted.timeout);
        let deadline = Instant::now() + timeout;
        let timed_out = || Fetched::Failed {
            uri: first.clone(),
            error: Error::Download(download::Error::TimedOut(format!(
                "no download of {first} finished within {timeout:?}"
            ))),
        };
        // Clients asking for the same content at once wait for one download.
        let naming = naming(wanted.function, &wanted.qualifiers);
        let lock = downloads.lock(key(wanted.kind, &first, &naming));
        let Ok(_turn) = tokio::time::timeout_at(deadline.into(), lock.lock()).await else {
            return Ok(timed_out());
        };
        if let Some(found) = self.recorded(&wanted).await? {
            self.metrics.asset_fetch("record");
            return Ok(found);
        }
        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline.into(), downloads.turns.acquire()).await
        else {
            return Ok(timed_out());
        };
        let mut failed = None;
        for source in &wanted.sources {
            let since_ms = store::now_ms() as i64;
            match self.download(downloads, &wanted, source, deadline).await {
                Ok(content) => {
                    let record = Record { since_ms, expires_ms: 0 };
                    let result = to_result(Kind::Blob, content, &[], &[], record);
                    let key = key(Kind::Blob, &source.uri, &naming);
                    self.put_action_result(wanted.instance.clone(), key, Some(key.size), &result).await?;
                    self.metrics.asset_fetch("downloaded");
                    return Ok(Fetched::Found { uri: source.uri.clone(), content, expires_ms: None });
                }
                Err(e @ Error::Download(download::Error::Local(_))) => return Err(e),
                Err(error @ Error::Download(_)) => {
                    tracing::info!("FetchBlob: {error}");
                    failed = Some(Fetched::Failed { uri: source.uri.clone(), error });
                }
                Err(e) => return Err(e),
            }
        }
        self.metrics.asset_fetch("failed");
        Ok(failed.unwrap_or_else(timed_out))
    }

    /// The first usable record of the URIs, in their order: not expired,
    /// recent enough, complete, and matching `checksum.sri`.
    async fn recorded(&self, wanted: &Wanted) -> Result<Option<Fetched>, Error> {
        let now = store::now_ms() as i64;
        let naming = naming(wanted.function, &wanted.qualifiers);
        for source in &wanted.sources {
            let key = key(wanted.kind, &source.uri, &naming);
            let lookup = self.lookup(wanted.instance.clone(), key, Some(key.size), Inline::default()).await?;
            let Lookup::Hit(result) = lookup else { continue };
            let Some((content, record)) = from_result(&result, wanted.kind, wanted.function) else {
                continue;
            };
            let expired = record.expires_ms != 0 && record.expires_ms <= now;
            let too_old = wanted.oldest_ms.is_some_and(|oldest| record.since_ms < oldest);
            if expired || too_old {
                continue;
            }
            if let Some(sri) = &wanted.sri
                && !self.matches(content, sri).await?
            {
                continue;
            }
            let expires_ms = (record.expires_ms != 0).then_some(record.expires_ms);
            return Ok(Some(Fetched::Found { uri: source.uri.clone(), content, expires_ms }));
        }
        Ok(None)
    }

    /// Content in the CAS whose digest is the checksum a blob must have:
    /// whatever URI served it, it is the content asked for.
    async fn held_by_checksum(&self, wanted: &Wanted) -> Result<Option<Fetched>, Error> {
        let Some(hash) = wanted.sri.as_ref().and_then(|sri| sri.hash_for(wanted.function)) else {
            return Ok(None);
        };
        if wanted.kind != Kind::Blob {
            return Ok(None);
        }
        let found = self.find_by_hash(wanted.function, hash.to_vec()).await?;
        let uri = wanted.sources.first().map(|s| s.uri.clone()).unwrap_or_default();
        Ok(found.map(|content| Fetched::Found { uri, content, expires_ms: None }))
    }

    /// Whether stored content matches `sri`: by its digest when a checksum
    /// uses its function, else by hashing it again.
    async fn matches(&self, content: Digest, sri: &Sri) -> Result<bool, Error> {
        if let Some(hash) = sri.hash_for(content.function) {
            return Ok(hash == content.hash());
        }
        let mut hashers: Vec<SriHasher> = sri.algorithms().into_iter().map(SriHasher::new).collect();
        let mut pieces = self.read(content, 0, content.size, false).await?;
        while let Some(piece) = pieces.next().await {
            let piece = piece?;
            hashers.iter_mut().for_each(|h| h.update(&piece));
        }
        Ok(sri.matches(&hashers.into_iter().map(SriHasher::finish).collect::<Vec<_>>()))
    }

    /// Downloads `source` and stores it in the CAS, verified like any upload.
    async fn download(
        self: &Arc<Self>,
        downloads: &Downloads,
        wanted: &Wanted,
        source: &Source,
        deadline: Instant,
    ) -> Result<Digest, Error> {
        let limit = match self.limits.max_blob_size {
            0 => downloads.max_size,
            max => max.min(downloads.max_size),
        };
        let headers: Vec<(String, String)> = wanted.headers.iter().chain(&source.headers).cloned().collect();
        let one = download::One {
            uri: &source.uri,
            headers: &headers,
            function: wanted.function,
            sri: wanted.sri.as_ref(),
            limit,
            deadline,
        };
        let downloaded = downloads.downloader.download(one, &downloads.dir).await?;
        let content = downloaded.digest;
        self.metrics.asset_downloaded(content.size);
        self.store_file(Arc::new(downloaded.file), content).await?;
        Ok(content)
    }

    /// Uploads a file holding the blob `digest` to the CAS, a chunk at a time.
    async fn store_file(self: &Arc<Self>, file: Arc<std::fs::File>, digest: Digest) -> Result<(), Error> {
        let Some(mut upload) = self.begin_upload(own_upload("asset"), digest, Encoding::Identity, 0).await?
        else {
            return Ok(());
        };
        let piece = self.chunk_size() as u64;
        let mut offset = 0;
        while offset < digest.size {
            let (file, len) = (Arc::clone(&file), piece.min(digest.size - offset));
            let read = blocking(move || {
                let mut data = vec![0; len as usize];
                file.read_exact_at(&mut data, offset).map_err(download::Error::Local)?;
                Ok::<_, Error>(Bytes::from(data))
            });
            let data = match read.await {
                Ok(data) => data,
                Err(e) => return Err(upload.fail(e).await),
            };
            if upload.push(data).await? == Progress::AlreadyPresent {
                return Ok(());
            }
            offset += len;
        }
        if upload.complete().await? == Progress::AlreadyPresent {
            return Ok(());
        }
        upload.commit().await?;
        Ok(())
    }
}
