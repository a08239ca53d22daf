//! The HTTP face: routes requests to REAPI's REST/JSON mapping (under `/v2/`,
//! over the gRPC services' code) or Bazel's HTTP cache protocol (`/ac/`,
//! `/cas/`, over the cache), and writes every error in Google's JSON error
//! form.

mod bazel;
mod media;
mod multipart;
mod rest;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, BodyStream, Full, Limited};
use hyper::body::Incoming;

use crate::metrics::Counted;
use tokio::sync::oneshot;
use tonic::body::Body;
use tonic::{Code, Status};

use crate::service::Shared;
use crate::service::action_cache::ActionCacheService;
use crate::service::asset::{FetchService, PushService};
use crate::service::capabilities::CapabilitiesService;
use crate::service::cas::CasService;

/// Request bodies as the server hands them over: counted as they are read
/// (for metrics), held in the budget, and ended if the client stalls.
pub type Received = Counted<crate::budget::Charged<crate::idle::Timed<Incoming>>>;

/// A request body that hands itself back if it is dropped before its end.
/// An HTTP/1.1 client writes its whole body before it reads the answer: a
/// body left unread must be read (drained) before the answer, or the
/// connection closed after it (`Connection: close`), else the client's next
/// request on it fails.
pub struct RequestBody {
    inner: Option<Received>,
    ended: bool,
    unread: Option<oneshot::Sender<Received>>,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|inner| inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map(|inner| inner.size_hint()).unwrap_or_default()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let (false, Some(inner), Some(unread)) = (self.ended, self.inner.take(), self.unread.take())
            && !inner.is_end_stream()
        {
            let _ = unread.send(inner);
        }
    }
}

/// The most of an unread request body drained before an answer (more, and
/// the connection closes after it): as Go's net/http does, a little more.
const MAX_DRAIN: u64 = 4 << 20;

/// How long a drain waits for the client to send the rest of its body.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads an unread body to its end, if it is at most [`MAX_DRAIN`] more
/// bytes and comes within [`DRAIN_TIMEOUT`]; whether it did.
async fn drain_unread(body: Received) -> bool {
    if body.size_hint().upper().is_none_or(|rest| rest > MAX_DRAIN) {
        return false;
    }
    let drained = async {
        let mut frames = BodyStream::new(body);
        while let Some(frame) = frames.next().await {
            if frame.is_err() {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIMEOUT, drained).await.unwrap_or(false)
}

/// The cache, and the gRPC services the REST mapping calls in-process.
pub struct HttpApi {
    shared: Arc<Shared>,
    /// `https` when the server speaks TLS: URIs it hands out (an upload
    /// session's) name it.
    scheme: &'static str,
    /// Bazel's HTTP cache stores /ac/ bodies unchecked, apart from the
    /// action cache (`disable_http_ac_validation`).
    raw_ac: bool,
    cas: CasService,
    action_cache: ActionCacheService,
    capabilities: CapabilitiesService,
    fetch: FetchService,
    push: PushService,
}

impl HttpApi {
    pub fn new(shared: Arc<Shared>, config: &crate::config::Config) -> HttpApi {
        HttpApi {
            scheme: if config.tls().is_some() { "https" } else { "http" },
            raw_ac: config.server.disable_http_ac_validation,
            cas: CasService::new(Arc::clone(&shared)),
            action_cache: ActionCacheService::new(Arc::clone(&shared)),
            capabilities: CapabilitiesService::new(Arc::clone(&shared)),
            fetch: FetchService::new(Arc::clone(&shared)),
            push: PushService::new(Arc::clone(&shared)),
            shared,
        }
    }

    pub async fn handle(&self, request: Request<Received>) -> Response<Body> {
        let path = request.uri().path().to_string();
        // HTTP/2 ends a stream's unread body on its own.
        let (unread, mut left) = oneshot::channel();
        let http1 = request.version() <= Version::HTTP_11;
        let request = request.map(|inner| RequestBody {
            inner: Some(inner),
            ended: false,
            unread: http1.then_some(unread),
        });
        let mut response = self.route(request, &path).await.unwrap_or_else(HttpError::into_response);
        // The request is gone: here is its body, if it was left unread.
        if let Ok(body) = left.try_recv()
            && !drain_unread(body).await
        {
            response.headers_mut().insert(CONNECTION, http::HeaderValue::from_static("close"));
        }
        response
    }

    /// Hands the request to the route its path names; it is dropped by the
    /// time this returns.
    async fn route(&self, request: Request<RequestBody>, path: &str) -> Result<Response<Body>, HttpError> {
        if let Some(rest) = path.strip_prefix("/v2/") {
            rest::handle(self, request, rest).await
        } else if let Some(name) = path.strip_prefix("/v1/media/") {
            media::download(self, request, name).await
        } else if let Some(name) = path.strip_prefix("/upload/v1/media/") {
            media::upload(self, request, name).await
        } else if let Some(name) = path.strip_prefix("/resumable/upload/v1/media/") {
            media::resumable(self, request, name).await
        } else if let Some(rest) = path.strip_prefix("/v1/") {
            rest::assets(self, request, rest).await
        } else if let Some(target) = bazel::Target::parse(path) {
            bazel::handle(self, request, target).await
        } else {
            Err(HttpError::route(path))
        }
    }
}

/// A label for metrics naming the route, not the blob: `GET /cas`,
/// `POST /v2/blobs:batchUpdate`, `GET /v2/actionResults`.
pub fn route_label(method: &Method, path: &str) -> String {
    let route = if let Some(rest) = path.strip_prefix("/v2/") {
        let tail = rest.rsplit('/').next().unwrap_or("");
        match tail.split_once(':') {
            Some((
                _,
                verb @ ("findMissing" | "batchUpdate" | "batchRead" | "getTree" | "splitBlob" | "spliceBlob"),
            )) => {
                format!("/v2/blobs:{verb}")
            }
            _ if tail == "capabilities" => "/v2/capabilities".to_string(),
            _ if rest.contains("actionResults/") => "/v2/actionResults".to_string(),
            _ => "/v2/other".to_string(),
        }
    } else if path.starts_with("/v1/media/") {
        "/v1/media".to_string()
    } else if path.starts_with("/upload/v1/media/") || path.starts_with("/resumable/upload/v1/media/") {
        "/upload/v1/media".to_string()
    } else if let Some((_, verb @ ("fetchBlob" | "fetchDirectory" | "pushBlob" | "pushDirectory"))) =
        path.strip_prefix("/v1/").and_then(|rest| rest.rsplit_once("assets:"))
    {
        format!("/v1/assets:{verb}")
    } else if let Some(target) = bazel::Target::parse(path) {
        target.route().to_string()
    } else if matches!(path, "/healthz" | "/metrics") {
        path.to_string()
    } else {
        "other".to_string()
    };
    let method = match *method {
        Method::GET | Method::HEAD | Method::PUT | Method::POST | Method::DELETE => method.as_str(),
        _ => "OTHER",
    };
    format!("{method} {route}")
}

/// A failed HTTP request: a gRPC status from the shared service code, or a
/// rule of HTTP itself.
#[derive(Debug)]
pub enum HttpError {
    Status(Status),
    Http {
        code: StatusCode,
        message: String,
        allow: Option<&'static str>,
    },
    /// A byte range that starts at or past the end of a blob of `size` bytes.
    RangeNotSatisfiable {
        size: u64,
    },
}

impl From<Status> for HttpError {
    fn from(status: Status) -> HttpError {
        HttpError::Status(status)
    }
}

impl From<crate::cache::Error> for HttpError {
    fn from(e: crate::cache::Error) -> HttpError {
        HttpError::Status(e.into())
    }
}

impl HttpError {
    pub fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::Status(Status::invalid_argument(message))
    }

    pub fn route(path: &str) -> HttpError {
        HttpError::Http {
            code: StatusCode::NOT_FOUND,
            message: format!(
                "no route for {path:?}: larder serves REAPI's REST mapping under /v2/, ByteStream under /v1/media/ and /upload/v1/media/ (or /resumable/upload/v1/media/), the Remote Asset API at /v1/{{instance}}/assets:fetchBlob (and :fetchDirectory, :pushBlob, :pushDirectory), and Bazel's HTTP cache under /ac/ and /cas/"
            ),
            allow: None,
        }
    }

    pub fn method(method: &Method, path: &str, allow: &'static str) -> HttpError {
        HttpError::Http {
            code: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{method} is not allowed on {path:?}: use {allow}"),
            allow: Some(allow),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let range_of = match &self {
            HttpError::RangeNotSatisfiable { size } => Some(*size),
            _ => None,
        };
        let (code, status, message, allow) = match self {
            HttpError::Status(s) => {
                (http_code(s.code()), code_name(s.code()).to_string(), s.message().to_string(), None)
            }
            HttpError::Http { code, message, allow } => {
                let name = code.canonical_reason().unwrap_or("ERROR").to_uppercase().replace(' ', "_");
                (code, name, message, allow)
            }
            HttpError::RangeNotSatisfiable { size } => {
                let message = format!("the range starts at or past the end of the blob ({size} bytes)");
                (StatusCode::RANGE_NOT_SATISFIABLE, "OUT_OF_RANGE".to_string(), message, None)
            }
        };
        let body = serde_json::json!({
            "error": { "code": code.as_u16(), "message": message, "status": status }
        });
        let mut response = json_response(code, body.to_string().into_bytes());
        if code == StatusCode::UNAUTHORIZED {
            let challenge = http::HeaderValue::from_static("Basic realm=\"larder\"");
            response.headers_mut().insert(http::header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(allow) = allow {
            response.headers_mut().insert(ALLOW, http::HeaderValue::from_static(allow));
        }
        if let Some(size) = range_of {
            let range = format!("bytes */{size}").parse().expect("digits");
            response.headers_mut().insert(http::header::CONTENT_RANGE, range);
        }
        response
    }
}

/// The HTTP status of a gRPC code, as Google's APIs map them.
pub fn http_code(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The canonical name of a gRPC code (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pub fn json_response(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    bytes_response(code, "application/json; charset=utf-8", Bytes::from(body))
}

pub fn bytes_response(code: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let length = body.len();
    let mut response = Response::new(Body::new(Full::new(body)));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    headers.insert(CONTENT_LENGTH, length.into());
    response
}

/// A whole request body of at most `limit` bytes (JSON requests, action
/// results); larger ones are refused with 413 before they are read.
pub async fn read_body(body: RequestBody, limit: usize) -> Result<Bytes, HttpError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(HttpError::Http {
            code: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than {limit} bytes (max_message_size)"),
            allow: None,
        }),
        Err(e) => match e.downcast::<Status>() {
            // It broke off, or stalled (see `crate::idle::Timed`).
            Ok(status) => Err(HttpError::Status(*status)),
            Err(e) => Err(HttpError::Status(Status::cancelled(format!("the request body broke off: {e}")))),
        },
    }
}

/// Reads what is left of a request body, up to `most` bytes, so that the
/// connection can carry the client's next request. Past `most`, or if it
/// breaks off, the rest is left (and the connection closes after the answer).
pub async fn drain(frames: &mut BodyStream<RequestBody>, most: u64) {
    let mut read = 0u64;
    while let Some(Ok(frame)) = frames.next().await {
        if let Ok(data) = frame.into_data() {
            read += data.len() as u64;
        }
        if read > most {
            return;
        }
    }
}

/// Decodes `%XX` escapes (and `+` as a space in query strings).
pub fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, HttpError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(
                    byte.ok_or_else(|| HttpError::bad_request(format!("{s:?} has a malformed % escape")))?,
                );
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| HttpError::bad_request(format!("{s:?} is not UTF-8 once decoded")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// A metric label names a route from a fixed set, whatever the path:
        /// clients cannot grow the label set.
        #[test]
        fn labels_name_routes_from_a_fixed_set(path in crate::hostile::path(), post in any::<bool>()) {
            let method = if post { Method::POST } else { Method::GET };
            let label = route_label(&method, &path);
            let route = label.split_once(' ').map(|(_, r)| r).unwrap_or("");
            let known = [
                "/v2/blobs:findMissing", "/v2/blobs:batchUpdate", "/v2/blobs:batchRead", "/v2/blobs:getTree", "/v2/blobs:splitBlob", "/v2/blobs:spliceBlob",
                "/v2/capabilities", "/v2/actionResults", "/v2/other", "/v1/media", "/v1/assets:fetchBlob", "/v1/assets:fetchDirectory", "/v1/assets:pushBlob", "/v1/assets:pushDirectory", "/upload/v1/media", "/cas", "/ac", "/healthz", "/metrics", "other",
            ];
            prop_assert!(known.contains(&route), "{}", label);
        }
    }
}
