//! Bazel's HTTP cache protocol (`--remote_cache=http://…`), as bazel-remote
//! serves it: GET, HEAD and PUT of `/cas/{hash}` and `/ac/{hash}`, optionally
//! under an instance prefix. Blobs stream both ways through the cache; action
//! results are served only when complete, as over gRPC. The hash alone names
//! a blob or an action: its size is the stored one.

use bytes::Bytes;
use futures::StreamExt;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyStream, StreamBody};
use hyper::body::Frame;
use prost::Message;
use tonic::body::Body;
use tonic::{Code, Status};

use super::{HttpApi, HttpError, RequestBody, bytes_response, drain, percent_decode, read_body};
use crate::cache::{self, Inline, Lookup, Progress};
use crate::digest::{Digest, Encoding, FunctionHint};
use crate::proto::reapi::ActionResult;

#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    Cas,
    Ac,
}

/// `{instance/}{cas|ac}/{hash}`.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    instance: String,
    kind: Kind,
    hash: String,
}

impl Target {
    /// `/cas` or `/ac`, for metrics.
    pub fn route(&self) -> &'static str {
        match self.kind {
            Kind::Cas => "/cas",
            Kind::Ac => "/ac",
        }
    }

    pub fn parse(path: &str) -> Option<Target> {
        let mut parts = path.trim_start_matches('/').rsplitn(3, '/');
        let (hash, kind) = (parts.next()?, parts.next()?);
        let kind = match kind {
            "cas" => Kind::Cas,
            "ac" => Kind::Ac,
            _ => return None,
        };
        Some(Target { instance: parts.next().unwrap_or("").to_string(), kind, hash: hash.to_string() })
    }
}

const OCTETS: &str = "application/octet-stream";

pub async fn handle(
    api: &HttpApi,
    request: Request<RequestBody>,
    target: Target,
) -> Result<Response<Body>, HttpError> {
    let path = request.uri().path().to_string();
    let instance = percent_decode(&target.instance, false)?;
    crate::digest::check_instance(&instance).map_err(cache::Error::from)?;
    // The hash alone names the blob; its length tells the function.
    let named = Digest::parse(&target.hash, 0, FunctionHint::ByLength).map_err(cache::Error::from)?;
    let cache = &api.shared.cache;
    match (target.kind, request.method().clone()) {
        (Kind::Cas, method @ (Method::GET | Method::HEAD)) => {
            let found = cache.find_by_hash(named.function, named.hash().to_vec()).await?;
            let digest =
                found.ok_or_else(|| Status::not_found(format!("blob {} is not in the CAS", target.hash)))?;
            // zstd when the client accepts it, from the stored frames; its
            // length is known only once it is sent.
            let zstd = method == Method::GET && accepts_zstd(request.headers());
            let mut response = if method == Method::HEAD {
                Response::new(Body::empty())
            } else {
                let data = cache.read(digest, 0, digest.size, zstd).await?;
                let frames = data.map(|piece| piece.map(Frame::data).map_err(Status::from));
                Response::new(Body::new(StreamBody::new(frames)))
            };
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, http::HeaderValue::from_static(OCTETS));
            match zstd {
                true => headers.insert(CONTENT_ENCODING, http::HeaderValue::from_static("zstd")),
                false => headers.insert(CONTENT_LENGTH, digest.size.into()),
            };
            Ok(response)
        }
        (Kind::Cas, Method::PUT) => {
            let encoding = content_encoding(request.headers())?;
            let size = match encoding {
                Encoding::Identity => content_length(request.headers())?,
                Encoding::Zstd => digest_size(request.headers())?,
            };
            let digest = Digest::new(named.function, named.hash(), size).expect("the same function and hash");
            put_blob(api, digest, encoding, request.into_body()).await?;
            Ok(bytes_response(StatusCode::OK, OCTETS, Bytes::new()))
        }
        (Kind::Ac, Method::GET | Method::HEAD) if api.raw_ac => {
            let head = request.method() == Method::HEAD;
            let entry = cache.get_raw_entry(instance, named).await?.ok_or_else(|| {
                Status::not_found(format!(
                    "no /ac/ entry {} (stored unvalidated: disable_http_ac_validation)",
                    target.hash
                ))
            })?;
            let mut response = bytes_response(StatusCode::OK, OCTETS, entry);
            if head {
                *response.body_mut() = Body::empty();
            }
            Ok(response)
        }
        (Kind::Ac, Method::PUT) if api.raw_ac => {
            let body = read_body(request.into_body(), api.shared.max_message_size).await?;
            cache.put_raw_entry(instance, named, body).await?;
            Ok(bytes_response(StatusCode::OK, OCTETS, Bytes::new()))
        }
        (Kind::Ac, Method::GET | Method::HEAD) => {
            let head = request.method() == Method::HEAD;
            let result = match cache.get_action_result(instance, named, None, Inline::default()).await? {
                Lookup::Hit(result) => result,
                Lookup::Miss(why) => return Err(Status::not_found(why).into()),
            };
            let body = Bytes::from(result.encode_to_vec());
            let mut response = bytes_response(StatusCode::OK, OCTETS, body);
            if head {
                *response.body_mut() = Body::empty();
            }
            Ok(response)
        }
        (Kind::Ac, Method::PUT) => {
            let body = read_body(request.into_body(), api.shared.max_message_size).await?;
            crate::codec::check_entries::<ActionResult>(&body).map_err(cache::Error::from)?;
            let result = ActionResult::decode(body).map_err(|e| {
                HttpError::bad_request(format!("the body is not a serialized ActionResult protobuf: {e}"))
            })?;
            cache.put_action_result(instance, named, None, &result).await?;
            Ok(bytes_response(StatusCode::OK, OCTETS, Bytes::new()))
        }
        (_, method) => Err(HttpError::method(&method, &path, "GET, HEAD, PUT")),
    }
}

/// Streams a PUT's body into the cache as an upload of its own. A body that
/// breaks off keeps what arrived (like a broken ByteStream write, though no
/// HTTP client resumes it); one that stalls is told so.
async fn put_blob(
    api: &HttpApi,
    digest: Digest,
    encoding: Encoding,
    body: RequestBody,
) -> Result<(), HttpError> {
    // Each PUT is an upload of its own: two clients may send the same blob at once.
    let key = cache::own_upload("http-put");
    let mut frames = BodyStream::new(body);
    // A blob found stored answers once the body is read (no more than the
    // blob can take), so that the connection carries the next request.
    let most = cache::max_wire_bytes(digest.size, encoding);
    let Some(mut upload) = api.shared.cache.begin_upload(key, digest, encoding, 0).await? else {
        drain(&mut frames, most).await;
        return Ok(());
    };
    loop {
        match frames.next().await {
            // Trailers carry no data.
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && upload.push(data).await? == Progress::AlreadyPresent
                {
                    drain(&mut frames, most.saturating_sub(upload.wire())).await;
                    return Ok(());
                }
            }
            // It broke off, or stalled (see `crate::idle::Timed`).
            Some(Err(status)) => {
                return match (upload.persist().await?, status.code()) {
                    (Progress::Continue, Code::DeadlineExceeded) => Err(status.into()),
                    _ => Ok(()),
                };
            }
            None => break,
        }
    }
    if upload.complete().await? == Progress::Continue {
        upload.commit().await?;
    }
    Ok(())
}

/// A CAS PUT must say how large it is: the size is part of the digest.
fn content_length(headers: &http::HeaderMap) -> Result<u64, HttpError> {
    let header = headers.get(CONTENT_LENGTH).ok_or_else(|| HttpError::Http {
        code: StatusCode::LENGTH_REQUIRED,
        message: "a CAS PUT needs a Content-Length header: the size is part of the blob's digest".into(),
        allow: None,
    })?;
    header
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| HttpError::bad_request(format!("Content-Length {header:?} is not a number")))
}

/// A compressed CAS PUT names the blob's size in `X-Digest-SizeBytes`, as
/// bazel-remote has it: `Content-Length` is the compressed body's.
fn digest_size(headers: &http::HeaderMap) -> Result<u64, HttpError> {
    let header = headers.get("x-digest-sizebytes").ok_or_else(|| {
        HttpError::bad_request(
            "a CAS PUT with Content-Encoding: zstd needs X-Digest-SizeBytes: the blob's uncompressed size",
        )
    })?;
    header
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| HttpError::bad_request(format!("X-Digest-SizeBytes {header:?} is not a number")))
}

/// The encoding of a CAS PUT's body: none, or zstd.
fn content_encoding(headers: &http::HeaderMap) -> Result<Encoding, HttpError> {
    match headers.get(CONTENT_ENCODING).map(|v| v.to_str().map(str::trim)) {
        None => Ok(Encoding::Identity),
        Some(Ok(e)) if e.eq_ignore_ascii_case("identity") => Ok(Encoding::Identity),
        Some(Ok(e)) if e.eq_ignore_ascii_case("zstd") => Ok(Encoding::Zstd),
        Some(other) => Err(HttpError::Http {
            code: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!("Content-Encoding {other:?} is not served: send the blob as it is, or as zstd"),
            allow: None,
        }),
    }
}

/// Whether `Accept-Encoding` lists zstd (and not with q=0).
fn accepts_zstd(headers: &http::HeaderMap) -> bool {
    headers.get_all(ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |item| {
            let mut parts = item.split(';').map(str::trim);
            let zstd = parts.next().is_some_and(|coding| coding.eq_ignore_ascii_case("zstd"));
            let refused =
                parts.any(|p| p.replace(' ', "").trim_start_matches("q=").parse::<f32>() == Ok(0.0));
            zstd && !refused
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// Any path is a cache target or is not; a target's parts come from
        /// the path, and its label is one of two.
        #[test]
        fn targets_parse_or_are_refused(path in crate::hostile::path(), length in crate::hostile::text()) {
            if let Some(t) = Target::parse(&path) {
                prop_assert!(path.contains(&t.hash) && path.contains(&t.instance));
                prop_assert!(matches!(t.route(), "/cas" | "/ac"));
                let _ = Digest::parse(&t.hash, 0, FunctionHint::ByLength);
            }
            let mut request = Request::new(());
            if let Ok(value) = http::HeaderValue::from_str(&length) {
                request.headers_mut().insert(CONTENT_LENGTH, value);
            }
            let _ = content_length(request.headers());
        }
    }

    #[test]
    fn targets_parse_from_the_tail() {
        let t = Target::parse("/cas/abc").unwrap();
        assert_eq!((t.instance.as_str(), t.kind, t.hash.as_str()), ("", Kind::Cas, "abc"));
        let t = Target::parse("/team/main/ac/abc").unwrap();
        assert_eq!((t.instance.as_str(), t.kind, t.hash.as_str()), ("team/main", Kind::Ac, "abc"));
        assert_eq!(Target::parse("/blobs/abc"), None);
        assert_eq!(Target::parse("/abc"), None);
    }
}
