//! The Remote Asset API: Fetch (FetchBlob, FetchDirectory) and Push
//! (PushBlob, PushDirectory). Checks the request, sorts its qualifiers into
//! what names the content, what checks it and what goes to the origin, and
//! calls the cache.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Shared, ok_status, request_function, required_digest, rpc_status};
use crate::cache::{AssetKind, Fetched, Pushed, Source, Wanted};
use crate::digest::{Digest, Function, FunctionHint};
use crate::download::Sri;
use crate::proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse, PushBlobRequest,
    PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, Qualifier, fetch_server::Fetch,
    push_server::Push,
};
use crate::proto::reapi;

/// Qualifiers, sorted by what they do.
#[derive(Debug, Default)]
struct Qualifiers {
    /// They name the content along with the URI: part of a record's key.
    naming: Vec<(String, String)>,
    /// `checksum.sri`: checked against the content.
    sri: Option<Sri>,
    /// Headers for every URI (`http_header:NAME`).
    headers: Vec<(String, String)>,
    /// Headers for one URI, by its index (`http_header_url:N:NAME`).
    headers_of: HashMap<usize, Vec<(String, String)>>,
    /// Headers by URI (`bazel.auth_headers`, a JSON object of objects).
    headers_by_uri: HashMap<String, Vec<(String, String)>>,
    /// Naming qualifiers a download cannot honour.
    unsupported: Vec<String>,
}

/// Naming qualifiers that a download satisfies as it is: they tell the
/// content apart, and ask nothing of the bytes.
const NAMING: [&str; 2] = ["bazel.canonical_id", "resource_type"];

/// Most URIs in one request: each costs lookups (Bazel sends a handful of
/// mirrors).
const MAX_URIS: usize = 256;
/// Most bytes of all qualifiers' names and values together.
const MAX_QUALIFIER_BYTES: usize = 64 << 10;
/// Headers a client may not send to an origin: they would change what it
/// answers (a part, another encoding, another virtual host) under a record
/// every reader is served, or the framing of the request.
const REFUSED_HEADERS: [&str; 10] = [
    "host",
    "range",
    "if-range",
    "accept-encoding",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "expect",
];

fn check_header(qualifier: &str, header: &str) -> Result<(), Status> {
    if REFUSED_HEADERS.contains(&header.to_ascii_lowercase().as_str()) {
        return Err(Status::invalid_argument(format!(
            "qualifier {qualifier:?}: the header {header} would change what the origin sends under a shared record; it is not sent"
        )));
    }
    Ok(())
}

impl Qualifiers {
    fn parse(list: &[Qualifier], uris: usize) -> Result<Qualifiers, Status> {
        let bytes: usize = list.iter().map(|q| q.name.len() + q.value.len()).sum();
        if bytes > MAX_QUALIFIER_BYTES {
            return Err(Status::invalid_argument(format!(
                "the qualifiers hold {bytes} bytes, more than {MAX_QUALIFIER_BYTES}"
            )));
        }
        let mut seen = HashSet::new();
        let mut q = Qualifiers::default();
        let invalid =
            |name: &str, why: String| Status::invalid_argument(format!("qualifier {name:?}: {why}"));
        for Qualifier { name, value } in list {
            if !seen.insert(name.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "qualifier {name:?} is given twice: names must be unique"
                )));
            }
            if name == "checksum.sri" {
                q.sri = Some(value.parse().map_err(|e| invalid(name, e))?);
            } else if let Some(header) = name.strip_prefix("http_header:") {
                check_header(name, header)?;
                q.headers.push((header.to_string(), value.clone()));
            } else if let Some(rest) = name.strip_prefix("http_header_url:") {
                let (index, header) = rest
                    .split_once(':')
                    .and_then(|(i, h)| Some((i.parse::<usize>().ok()?, h)))
                    .ok_or_else(|| invalid(name, "write http_header_url:INDEX:NAME".into()))?;
                if index >= uris {
                    return Err(invalid(name, format!("there are {uris} URIs, numbered from 0")));
                }
                check_header(name, header)?;
                q.headers_of.entry(index).or_default().push((header.to_string(), value.clone()));
            } else if name == "bazel.auth_headers" {
                let parsed: HashMap<String, HashMap<String, String>> = serde_json::from_str(value)
                    .map_err(|e| invalid(name, format!("not a JSON object of header objects: {e}")))?;
                for (uri, headers) in parsed {
                    for header in headers.keys() {
                        check_header(name, header)?;
                    }
                    q.headers_by_uri.entry(uri).or_default().extend(headers);
                }
            } else {
                if !NAMING.contains(&name.as_str()) {
                    q.unsupported.push(name.clone());
                }
                q.naming.push((name.clone(), value.clone()));
            }
        }
        q.naming.sort();
        Ok(q)
    }

    /// The sources to fetch from: each URI with the headers meant for it
    /// alone (those for every URI stay in `headers`).
    fn sources(&mut self, uris: Vec<String>) -> Vec<Source> {
        uris.into_iter()
            .enumerate()
            .map(|(i, uri)| {
                let mut headers = self.headers_by_uri.remove(&uri).unwrap_or_default();
                headers.extend(self.headers_of.remove(&i).unwrap_or_default());
                Source { uri, headers }
            })
            .collect()
    }
}

fn check_uris(uris: &[String]) -> Result<(), Status> {
    if uris.is_empty() {
        return Err(Status::invalid_argument("uris is empty: give at least one URI"));
    }
    if uris.len() > MAX_URIS {
        return Err(Status::invalid_argument(format!(
            "uris lists {} URIs, more than {MAX_URIS}: give the mirrors worth trying",
            uris.len()
        )));
    }
    if uris.iter().any(String::is_empty) {
        return Err(Status::invalid_argument("uris holds an empty URI"));
    }
    Ok(())
}

/// Milliseconds since the epoch of a timestamp field, if set.
fn millis(t: Option<&pbjson_types::Timestamp>, field: &str) -> Result<Option<i64>, Status> {
    let Some(t) = t else { return Ok(None) };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Status::invalid_argument(format!("{field} has nanos {}, outside 0..1e9", t.nanos)));
    }
    Ok(Some(t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos / 1_000_000))))
}

fn timestamp(ms: i64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn timeout(d: Option<&pbjson_types::Duration>) -> Result<Option<Duration>, Status> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err(Status::invalid_argument("timeout must be positive (or unset)"));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

/// The function of a Fetch's answer: the one asked for, SHA-256 if none.
fn fetch_function(instance: &str, function: i32) -> Result<Function, Status> {
    Ok(match request_function(instance, function)? {
        FunctionHint::Given(function) => function,
        FunctionHint::ByLength => Function::Sha256,
    })
}

/// The fields FetchBlobRequest and FetchDirectoryRequest share (two
/// generated types), moved into a [`FetchRequest`].
macro_rules! fetch_request {
    ($r:expr) => {{
        let r = $r;
        FetchRequest {
            instance_name: r.instance_name,
            timeout: r.timeout,
            oldest_content_accepted: r.oldest_content_accepted,
            uris: r.uris,
            qualifiers: r.qualifiers,
            digest_function: r.digest_function,
        }
    }};
}

/// What FetchBlob and FetchDirectory share.
struct FetchRequest {
    instance_name: String,
    timeout: Option<pbjson_types::Duration>,
    oldest_content_accepted: Option<pbjson_types::Timestamp>,
    uris: Vec<String>,
    qualifiers: Vec<Qualifier>,
    digest_function: i32,
}

/// The answer of a Fetch: status, URI, digest, expiry.
struct FetchAnswer {
    status: crate::proto::rpc::Status,
    uri: String,
    digest: Option<reapi::Digest>,
    expires_at: Option<pbjson_types::Timestamp>,
    digest_function: i32,
}

pub struct FetchService {
    shared: Arc<Shared>,
}

impl FetchService {
    pub fn new(shared: Arc<Shared>) -> Self {
        FetchService { shared }
    }

    async fn fetch(&self, request: FetchRequest, kind: AssetKind) -> Result<FetchAnswer, Status> {
        let function = fetch_function(&request.instance_name, request.digest_function)?;
        check_uris(&request.uris)?;
        self.shared.check_entries(request.uris.len() + request.qualifiers.len(), "the request")?;
        let mut qualifiers = Qualifiers::parse(&request.qualifiers, request.uris.len())?;
        let wanted = Wanted {
            instance: request.instance_name,
            kind,
            function,
            sources: qualifiers.sources(request.uris),
            headers: std::mem::take(&mut qualifiers.headers),
            qualifiers: std::mem::take(&mut qualifiers.naming),
            sri: qualifiers.sri,
            unsupported: qualifiers.unsupported,
            oldest_ms: millis(request.oldest_content_accepted.as_ref(), "oldest_content_accepted")?,
            timeout: timeout(request.timeout.as_ref())?,
        };
        let digest_function = function.to_wire() as i32;
        Ok(match self.shared.cache.fetch_asset(wanted).await? {
            Fetched::Found { uri, content, expires_ms } => FetchAnswer {
                status: ok_status(),
                uri,
                digest: Some(content.to_proto()),
                expires_at: expires_ms.map(timestamp),
                digest_function,
            },
            Fetched::Failed { uri, error } => FetchAnswer {
                status: rpc_status(&Status::from(error)),
                uri,
                digest: None,
                expires_at: None,
                digest_function,
            },
        })
    }
}

#[tonic::async_trait]
impl Fetch for FetchService {
    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        let answer = self.fetch(fetch_request!(request.into_inner()), AssetKind::Blob).await?;
        Ok(Response::new(FetchBlobResponse {
            status: Some(answer.status),
            uri: answer.uri,
            qualifiers: vec![],
            expires_at: answer.expires_at,
            blob_digest: answer.digest,
            digest_function: answer.digest_function,
        }))
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        let answer = self.fetch(fetch_request!(request.into_inner()), AssetKind::Directory).await?;
        Ok(Response::new(FetchDirectoryResponse {
            status: Some(answer.status),
            uri: answer.uri,
            qualifiers: vec![],
            expires_at: answer.expires_at,
            root_directory_digest: answer.digest,
            digest_function: answer.digest_function,
        }))
    }
}

/// The fields PushBlobRequest and PushDirectoryRequest share, moved into a
/// [`PushRequest`].
macro_rules! push_request {
    ($r:expr) => {{
        let r = $r;
        PushRequest {
            instance_name: r.instance_name,
            uris: r.uris,
            qualifiers: r.qualifiers,
            expire_at: r.expire_at,
            references_blobs: r.references_blobs,
            references_directories: r.references_directories,
            digest_function: r.digest_function,
        }
    }};
}

/// What PushBlob and PushDirectory share.
struct PushRequest {
    instance_name: String,
    uris: Vec<String>,
    qualifiers: Vec<Qualifier>,
    expire_at: Option<pbjson_types::Timestamp>,
    references_blobs: Vec<reapi::Digest>,
    references_directories: Vec<reapi::Digest>,
    digest_function: i32,
}

pub struct PushService {
    shared: Arc<Shared>,
}

impl PushService {
    pub fn new(shared: Arc<Shared>) -> Self {
        PushService { shared }
    }

    async fn push(
        &self,
        request: PushRequest,
        kind: AssetKind,
        content: Option<&reapi::Digest>,
        field: &str,
    ) -> Result<(), Status> {
        let hint = request_function(&request.instance_name, request.digest_function)?;
        check_uris(&request.uris)?;
        let entries = request.uris.len()
            + request.qualifiers.len()
            + request.references_blobs.len()
            + request.references_directories.len();
        self.shared.check_entries(entries, "the request")?;
        let content = required_digest(content, field, hint)?;
        // References use the content's function.
        let given = FunctionHint::Given(content.function);
        let parse = |list: &[reapi::Digest], field: &str| -> Result<Vec<Digest>, Status> {
            list.iter()
                .map(|d| {
                    Digest::from_proto(d, given)
                        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
                })
                .collect()
        };
        let qualifiers = Qualifiers::parse(&request.qualifiers, request.uris.len())?;
        let pushed = Pushed {
            instance: request.instance_name,
            kind,
            uris: request.uris,
            qualifiers: qualifiers.naming,
            content,
            blobs: parse(&request.references_blobs, "references_blobs")?,
            directories: parse(&request.references_directories, "references_directories")?,
            expires_ms: millis(request.expire_at.as_ref(), "expire_at")?,
        };
        Ok(self.shared.cache.push_asset(pushed).await?)
    }
}

#[tonic::async_trait]
impl Push for PushService {
    async fn push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        let mut r = request.into_inner();
        let content = r.blob_digest.take();
        self.push(push_request!(r), AssetKind::Blob, content.as_ref(), "blob_digest").await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        let mut r = request.into_inner();
        let content = r.root_directory_digest.take();
        self.push(push_request!(r), AssetKind::Directory, content.as_ref(), "root_directory_digest").await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str, value: &str) -> Qualifier {
        Qualifier { name: name.into(), value: value.into() }
    }

    #[test]
    fn qualifiers_sort_into_naming_checks_and_headers() {
        let list = [
            q("resource_type", "application/x-tar"),
            q("http_header:Accept", "*/*"),
            q("http_header_url:1:Authorization", "Bearer b"),
            q("bazel.auth_headers", r#"{"https://a/x": {"Authorization": "Bearer a"}}"#),
            q("bazel.canonical_id", "x-1.0"),
            q("vcs.commit", "abc"),
        ];
        let mut parsed = Qualifiers::parse(&list, 2).unwrap();
        assert_eq!(parsed.unsupported, ["vcs.commit"]);
        let naming: Vec<&str> = parsed.naming.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(naming, ["bazel.canonical_id", "resource_type", "vcs.commit"]);
        let sources = parsed.sources(vec!["https://a/x".into(), "https://b/x".into()]);
        assert_eq!(parsed.headers, [("Accept".to_string(), "*/*".to_string())], "for every URI");
        let names = |s: &Source| s.headers.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&sources[0]), ["Authorization"]);
        assert_eq!(sources[1].headers[0], ("Authorization".into(), "Bearer b".into()));
        for refused in ["http_header:Range", "http_header:HOST", "http_header_url:0:Accept-Encoding"] {
            assert!(Qualifiers::parse(&[q(refused, "x")], 2).is_err(), "{refused}");
        }
        let json = r#"{"https://a/x": {"Range": "bytes=0-9"}}"#;
        assert!(Qualifiers::parse(&[q("bazel.auth_headers", json)], 1).is_err());
        assert!(Qualifiers::parse(&[q("a", &"v".repeat(70_000))], 1).is_err(), "qualifiers are bounded");
        assert!(check_uris(&vec!["u".to_string(); 257]).is_err());
        let twice = Qualifiers::parse(&[q("a", "1"), q("a", "2")], 1).unwrap_err();
        assert!(twice.message().contains("twice"), "{twice:?}");
        assert!(Qualifiers::parse(&[q("http_header_url:2:A", "v")], 2).is_err());
        assert!(Qualifiers::parse(&[q("checksum.sri", "sha256-nope")], 1).is_err());
        assert!(Qualifiers::parse(&[q("bazel.auth_headers", "[1]")], 1).is_err());
    }
}
