//! ByteStream over HTTP, as Google's REST form of it has it
//! (`RestByteStream`): `GET /v1/media/{name}?alt=media` downloads a blob,
//! whole or a byte range (`Range: bytes=a-b`, `bytes=a-`, `bytes=-n`), and
//! `/upload/v1/media/{name}` uploads one in one request (`uploadType=media`
//! or `multipart`) or in a resumable session (`uploadType=resumable`, then
//! PUTs of chunks). Names are ByteStream resource names, their slashes
//! kept: `{instance}/blobs/{hash}/{size}` to read,
//! `{instance}/uploads/{uuid}/blobs/{hash}/{size}` to write.

use bytes::Bytes;
use futures::StreamExt;
use http::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HOST, LOCATION, RANGE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyStream, StreamBody};
use hyper::body::Frame;
use tonic::body::Body;
use tonic::{Code, Status};

use super::{HttpApi, HttpError, RequestBody, drain, json_response, multipart, percent_decode, read_body};
use crate::cache::{self, Progress, UploadState};
use crate::digest::{self, Digest, Encoding};

const OCTETS: &str = "application/octet-stream";

/// `GET /v1/media/{name}?alt=media`.
pub async fn download(
    api: &HttpApi,
    request: Request<RequestBody>,
    name: &str,
) -> Result<Response<Body>, HttpError> {
    let path = request.uri().path().to_string();
    if request.method() != Method::GET {
        return Err(HttpError::method(request.method(), &path, "GET"));
    }
    if query(&request, "alt") != Some("media") {
        return Err(HttpError::bad_request(
            "a media download needs ?alt=media: this route serves a blob's bytes, not its metadata",
        ));
    }
    let name = percent_decode(name, false)?;
    let resource = digest::parse_read_resource(&name).map_err(cache::Error::from)?;
    if resource.encoding != Encoding::Identity {
        return Err(HttpError::bad_request(format!(
            "{name:?} names compressed bytes: download {}blobs/… instead (HTTP clients ask for compression with Accept-Encoding)",
            name.split("compressed-blobs/").next().unwrap_or("")
        )));
    }
    let digest = resource.digest;
    let size = digest.size;
    let (start, end, partial) = match range(request.headers(), size)? {
        Some((start, end)) => (start, end, true),
        None => (0, size, false),
    };
    let pieces = api.shared.cache.read(digest, start, end, false).await?;
    let frames = pieces.map(|piece| piece.map(Frame::data).map_err(Status::from));
    let mut response = Response::new(Body::new(StreamBody::new(frames)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, http::HeaderValue::from_static(OCTETS));
    headers.insert(CONTENT_LENGTH, (end - start).into());
    headers.insert(ACCEPT_RANGES, http::HeaderValue::from_static("bytes"));
    if partial {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let range = format!("bytes {start}-{}/{size}", end - 1);
        response.headers_mut().insert(CONTENT_RANGE, range.parse().expect("digits and a dash"));
    }
    Ok(response)
}

/// The value of query parameter `key`, if given.
fn query<'a>(request: &'a Request<RequestBody>, key: &str) -> Option<&'a str> {
    request.uri().query()?.split('&').find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
}

/// `/upload/v1/media/{name}`: a simple (`uploadType=media`) or multipart
/// upload in one POST, the start of a resumable session
/// (`uploadType=resumable`), or a PUT to a session.
pub async fn upload(
    api: &HttpApi,
    request: Request<RequestBody>,
    name: &str,
) -> Result<Response<Body>, HttpError> {
    let path = request.uri().path().to_string();
    match (request.method().clone(), query(&request, "uploadType")) {
        (Method::POST, Some("media")) => {
            let (resource, body) = (write_resource(name)?, request.into_body());
            receive(api, &resource, Framing::Raw { skip: 0 }, body, 0, Ends::WithTheBlob).await?;
            Ok(stored(&resource.name))
        }
        (Method::POST, Some("multipart")) => {
            let resource = write_resource(name)?;
            let content_type = request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
            let boundary = multipart::boundary(content_type.unwrap_or("")).map_err(HttpError::bad_request)?;
            let framing = Framing::Multipart(multipart::Parser::new(&boundary));
            receive(api, &resource, framing, request.into_body(), 0, Ends::WithTheBlob).await?;
            Ok(stored(&resource.name))
        }
        (Method::POST, Some("resumable")) => start_session(api, request, name).await,
        (Method::POST, Some(other)) => Err(HttpError::bad_request(format!(
            "uploadType={other} is not a media upload: use media, multipart or resumable"
        ))),
        (Method::POST, None) => Err(HttpError::bad_request(
            "an upload needs uploadType=media (the body is the blob), multipart or resumable",
        )),
        (Method::PUT, _) => resume(api, request, name).await,
        (method, _) => Err(HttpError::method(&method, &path, "POST, PUT")),
    }
}

/// `POST /resumable/upload/v1/media/{name}`: the start of a resumable
/// session, on the path discovery documents give that protocol.
pub async fn resumable(
    api: &HttpApi,
    request: Request<RequestBody>,
    name: &str,
) -> Result<Response<Body>, HttpError> {
    if request.method() != Method::POST {
        let path = request.uri().path().to_string();
        return Err(HttpError::method(request.method(), &path, "POST"));
    }
    start_session(api, request, name).await
}

/// A decoded upload name, and what it names.
struct WriteResource {
    name: String,
    digest: Digest,
    encoding: Encoding,
}

fn write_resource(raw: &str) -> Result<WriteResource, HttpError> {
    let name = percent_decode(raw, false)?;
    let resource = digest::parse_write_resource(&name).map_err(cache::Error::from)?;
    Ok(WriteResource { name, digest: resource.digest, encoding: resource.encoding })
}

/// The upload a resumable session names: `blobs/` only, as a zstd stream
/// cannot resume at the uncompressed offset a session commits.
fn session_resource(raw: &str) -> Result<WriteResource, HttpError> {
    let resource = write_resource(raw)?;
    if resource.encoding != Encoding::Identity {
        return Err(HttpError::bad_request(format!(
            "{:?} names compressed bytes, which a session cannot resume (it commits uncompressed bytes): upload blobs/… resumably, or send compressed bytes whole with uploadType=media",
            resource.name
        )));
    }
    Ok(resource)
}

/// The reply to a finished upload: a `Media` message naming it.
fn stored(name: &str) -> Response<Body> {
    let body = serde_json::json!({ "resourceName": name }).to_string().into_bytes();
    json_response(StatusCode::OK, body)
}

/// Starts a resumable session. The session is the upload name itself
/// (it carries the client's UUID), so it is kept by the store's persistent
/// uploads and outlives a restart: the `Location` is `/upload/v1/media/{name}`
/// on this server, absolute, as clients require.
async fn start_session(
    api: &HttpApi,
    request: Request<RequestBody>,
    name: &str,
) -> Result<Response<Body>, HttpError> {
    let resource = session_resource(name)?;
    let size = resource.digest.size;
    if let Some(declared) = request.headers().get("x-upload-content-length") {
        let declared = declared.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok());
        if declared != Some(size) {
            return Err(HttpError::bad_request(format!(
                "X-Upload-Content-Length is {declared:?}, but {:?} names a blob of {size} bytes",
                resource.name
            )));
        }
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(HOST).and_then(|h| h.to_str().ok()))
        .ok_or_else(|| HttpError::bad_request("a resumable session needs a Host header to name its URI"))?
        .to_string();
    let scheme = request.uri().scheme_str().unwrap_or(api.scheme).to_string();
    // The start may carry the `Media` metadata: it is not needed.
    read_body(request.into_body(), 64 << 10).await?;
    let location = format!("{scheme}://{authority}/upload/v1/media/{name}?uploadType=resumable");
    let mut response = empty(StatusCode::OK);
    let location = http::HeaderValue::from_str(&location)
        .map_err(|_| HttpError::bad_request("the Host header cannot be part of a session URI"))?;
    response.headers_mut().insert(LOCATION, location);
    Ok(response)
}

/// A PUT to a session: a chunk (`Content-Range: bytes a-b/total`), or a
/// status query (`Content-Range: bytes */total`, no body). Both answer 308
/// with the committed `Range` until the blob is stored, then 200.
async fn resume(
    api: &HttpApi,
    request: Request<RequestBody>,
    name: &str,
) -> Result<Response<Body>, HttpError> {
    let resource = session_resource(name)?;
    let size = resource.digest.size;
    let chunk = content_range(request.headers(), size)?;
    let state = api.shared.cache.upload_state(resource.name.clone(), resource.digest).await?;
    let committed = match state {
        UploadState::Complete => {
            let mut frames = BodyStream::new(request.into_body());
            drain(&mut frames, size).await;
            return Ok(stored(&resource.name));
        }
        UploadState::Committed(n) => n,
        UploadState::Unknown => 0,
    };
    // A query of a session holding every byte (an empty blob's, say)
    // finishes it, as a last chunk would.
    let first = match chunk {
        Some(first) => first,
        None if committed == size => committed,
        None => return Ok(incomplete(committed)),
    };
    if first > committed {
        return Err(HttpError::bad_request(format!(
            "the chunk starts at byte {first}, past the {committed} bytes committed: query the session (Content-Range: bytes */{size}) and send from there"
        )));
    }
    let framing = Framing::Raw { skip: committed - first };
    match receive(api, &resource, framing, request.into_body(), committed, Ends::Anywhere).await? {
        Received::Stored => Ok(stored(&resource.name)),
        Received::Partial(committed) => Ok(incomplete(committed)),
    }
}

/// 308 with the committed bytes (no `Range` when there are none).
fn incomplete(committed: u64) -> Response<Body> {
    let mut response = empty(StatusCode::PERMANENT_REDIRECT);
    if committed > 0 {
        let range = format!("bytes=0-{}", committed - 1).parse().expect("digits and a dash");
        response.headers_mut().insert(RANGE, range);
    }
    response
}

/// An answer with no body.
fn empty(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = code;
    response.headers_mut().insert(CONTENT_LENGTH, 0.into());
    response
}

/// The first byte a session PUT carries, from its `Content-Range`: `None`
/// for a status query (`bytes */total`).
fn content_range(headers: &HeaderMap, size: u64) -> Result<Option<u64>, HttpError> {
    let value = headers.get(CONTENT_RANGE).ok_or_else(|| {
        HttpError::bad_request(format!(
            "a PUT to an upload session needs Content-Range: bytes a-b/{size} for a chunk, or bytes */{size} to ask what is committed"
        ))
    })?;
    let malformed = || {
        HttpError::bad_request(format!("Content-Range {value:?} is not bytes a-b/{size} or bytes */{size}"))
    };
    let spec = value.to_str().ok().and_then(|v| v.trim().strip_prefix("bytes ")).ok_or_else(malformed)?;
    let (range, total) = spec.split_once('/').ok_or_else(malformed)?;
    if total != "*" && total.parse::<u64>().ok() != Some(size) {
        return Err(HttpError::bad_request(format!(
            "Content-Range {value:?} gives a total other than the {size} bytes the name declares"
        )));
    }
    if range == "*" {
        return Ok(None);
    }
    let (a, b) = range.split_once('-').ok_or_else(malformed)?;
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) if a <= b && b < size => Ok(Some(a)),
        (Ok(_), Ok(_)) => Err(HttpError::bad_request(format!(
            "Content-Range {value:?} is not a range inside the blob's {size} bytes"
        ))),
        _ => Err(malformed()),
    }
}

/// How a body carries the blob's bytes.
enum Framing {
    /// The body is the bytes, after `skip` bytes the upload has already.
    Raw { skip: u64 },
    /// The body is a multipart message; its media part is the bytes.
    Multipart(multipart::Parser),
}

impl Framing {
    /// The blob's bytes in `data`, if any.
    fn take(&mut self, mut data: Bytes) -> Result<Option<Bytes>, String> {
        match self {
            Framing::Raw { skip } => {
                let skipped = (*skip).min(data.len() as u64);
                *skip -= skipped;
                let _ = data.split_to(skipped as usize);
                Ok(Some(data).filter(|d| !d.is_empty()))
            }
            Framing::Multipart(parser) => parser.push(&data),
        }
    }

    fn end(&self) -> Result<(), String> {
        match self {
            Framing::Raw { .. } => Ok(()),
            Framing::Multipart(parser) => parser.end(),
        }
    }
}

/// Where a body may end: with the blob (one-shot uploads), or anywhere
/// (a session's chunk).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ends {
    WithTheBlob,
    Anywhere,
}

/// What became of an upload's body.
enum Received {
    /// The blob is stored (by this body, or already).
    Stored,
    /// A session's chunk: this many bytes are committed, and kept.
    Partial(u64),
}

/// Streams a body into the upload named by `resource`, from `offset` (a
/// session's committed bytes). It is verified before it becomes visible;
/// a body that ends before the blob does is kept for the next chunk if it
/// is a session's, and refused otherwise.
async fn receive(
    api: &HttpApi,
    resource: &WriteResource,
    mut framing: Framing,
    body: RequestBody,
    offset: u64,
    ends: Ends,
) -> Result<Received, HttpError> {
    let digest = resource.digest;
    let cache = &api.shared.cache;
    // A body answered before it is read is read to its end (no more than
    // the blob and its framing can take), so that the connection can carry
    // the client's next request.
    let most =
        cache::max_wire_bytes(digest.size, resource.encoding).saturating_add(multipart::MAX_FRAMING as u64);
    let mut frames = BodyStream::new(body);
    let begun = cache.begin_upload(resource.name.clone(), digest, resource.encoding, offset as i64).await?;
    let Some(mut upload) = begun else {
        drain(&mut frames, most).await;
        return Ok(Received::Stored);
    };
    while let Some(frame) = frames.next().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                // Trailers carry no data.
                Err(_) => continue,
            },
            // It broke off, or stalled (see `crate::idle::Timed`): what
            // arrived is kept under the name, as a ByteStream write's is.
            Err(status) => {
                return match (upload.persist().await?, status.code()) {
                    (Progress::Continue, Code::DeadlineExceeded) => Err(status.into()),
                    (Progress::Continue, _) => Err(Status::cancelled("the request body broke off").into()),
                    (Progress::AlreadyPresent, _) => Ok(Received::Stored),
                };
            }
        };
        let bytes = match framing.take(data) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => continue,
            Err(message) => return Err(upload.fail(cache::Error::Invalid(message)).await.into()),
        };
        if upload.push(bytes).await? == Progress::AlreadyPresent {
            drain(&mut frames, most.saturating_sub(upload.wire())).await;
            return Ok(Received::Stored);
        }
    }
    if let Err(message) = framing.end() {
        return Err(upload.fail(cache::Error::Invalid(message)).await.into());
    }
    if ends == Ends::Anywhere && upload.wire() < digest.size {
        return match upload.persist().await? {
            Progress::Continue => Ok(Received::Partial(upload.wire())),
            Progress::AlreadyPresent => Ok(Received::Stored),
        };
    }
    if upload.complete().await? == Progress::Continue {
        upload.commit().await?;
    }
    Ok(Received::Stored)
}

/// The byte range a `Range` header asks of a blob of `size` bytes, as
/// `start..end`; `None` for the whole blob (no header, or one this server
/// does not serve in part: several ranges, another unit). An end past the
/// blob is clipped; a range that starts at or past its end is 416.
fn range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, HttpError> {
    let Some(value) = headers.get(RANGE) else { return Ok(None) };
    let Some(spec) = value.to_str().ok().and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let unsatisfiable = || HttpError::RangeNotSatisfiable { size };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    let (start, end) = match spec.split_once('-') {
        // The last n bytes.
        Some(("", n)) => match number(n) {
            None => return Ok(None),
            Some(0) => return Err(unsatisfiable()),
            Some(n) => (size.saturating_sub(n), size),
        },
        Some((a, "")) => match number(a) {
            Some(a) => (a, size),
            None => return Ok(None),
        },
        Some((a, b)) => match (number(a), number(b)) {
            (Some(a), Some(b)) if a <= b => (a, b.saturating_add(1).min(size)),
            _ => return Ok(None),
        },
        None => return Ok(None),
    };
    if start >= size {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ask(value: &str, size: u64) -> Result<Option<(u64, u64)>, u64> {
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, value.parse().unwrap());
        range(&headers, size).map_err(|e| match e {
            HttpError::RangeNotSatisfiable { size } => size,
            _ => u64::MAX,
        })
    }

    #[test]
    fn ranges_as_clients_ask_them() {
        assert_eq!(ask("bytes=0-0", 10), Ok(Some((0, 1))));
        assert_eq!(ask("bytes=3-6", 10), Ok(Some((3, 7))));
        assert_eq!(ask("bytes=4-", 10), Ok(Some((4, 10))));
        assert_eq!(ask("bytes=-3", 10), Ok(Some((7, 10))));
        assert_eq!(ask("bytes=-30", 10), Ok(Some((0, 10))));
        // The client's last chunk asks past the end: clipped.
        assert_eq!(ask("bytes=8-100", 10), Ok(Some((8, 10))));
        // At or past the end: 416, which is how a client finishes an empty blob.
        assert_eq!(ask("bytes=10-20", 10), Err(10));
        assert_eq!(ask("bytes=0-99", 0), Err(0));
        assert_eq!(ask("bytes=-0", 10), Err(10));
        // Not served in part: the whole blob.
        for value in ["bytes=1-2,4-5", "items=0-1", "bytes=5-2", "bytes=x-", "bytes=-"] {
            assert_eq!(ask(value, 10), Ok(None), "{value}");
        }
    }

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// Any Range header is a range inside the blob, the whole blob, or 416.
        #[test]
        fn any_range_header_is_served_or_refused(value in crate::hostile::text(), size in 0u64..1 << 40) {
            let Ok(value) = http::HeaderValue::from_str(&value) else { return Ok(()) };
            let mut headers = HeaderMap::new();
            headers.insert(RANGE, value);
            match range(&headers, size) {
                Ok(Some((start, end))) => prop_assert!(start < end && end <= size),
                Ok(None) => {}
                Err(HttpError::RangeNotSatisfiable { size: s }) => prop_assert_eq!(s, size),
                Err(other) => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
