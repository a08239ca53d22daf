//! Bazel's HTTP cache protocol (`--remote_cache=http://…`), as bazel-remote
//! serves it: GET, HEAD and PUT of `/cas/{hash}` and `/ac/{hash}`, optionally
//! under an instance prefix. Blobs stream both ways through the ByteStream
//! code; action results go through the action cache code, completeness
//! check included.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyStream, StreamBody};
use hyper::body::Frame;
use prost::Message;
use tonic::Status;
use tonic::body::Body;

use super::action_cache::AnySize;
use super::blocking;
use super::http::{HttpApi, HttpError, RequestBody, bytes_response, percent_decode, read_body};
use crate::digest::{Digest, FunctionHint};
use crate::proto::bytestream::{ReadRequest, WriteRequest};
use crate::proto::reapi::{
    ActionResult, GetActionResultRequest, UpdateActionResultRequest, action_cache_server::ActionCache,
};

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
    crate::digest::check_instance(&instance).map_err(Status::from)?;
    // The hash alone names the blob; its length tells the function.
    let named = Digest::parse(&target.hash, 0, FunctionHint::ByLength).map_err(Status::from)?;
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    match (target.kind, request.method().clone()) {
        (Kind::Cas, method @ (Method::GET | Method::HEAD)) => {
            let store = Arc::clone(&api.shared.store);
            let mut found = blocking(move || store.find_by_hash(named.function, named.hash())).await?;
            if let (None, Some(remote)) = (found, &api.shared.remote) {
                // The size is in the object's header; a GET then reads it through.
                found = remote.find_by_hash(named.function, named.hash()).await.unwrap_or_else(|e| {
                    tracing::warn!("HTTP cache lookup answered from the local tier alone: {e}");
                    None
                });
            }
            let digest =
                found.ok_or_else(|| Status::not_found(format!("blob {} is not in the CAS", target.hash)))?;
            let mut response = if method == Method::HEAD {
                Response::new(Body::empty())
            } else {
                let resource =
                    format!("{prefix}blobs/{}/{}/{}", digest.function.name(), digest.hex(), digest.size);
                let read = ReadRequest { resource_name: resource, read_offset: 0, read_limit: 0 };
                let data = api.bytestream.read_stream(read).await?;
                Response::new(Body::new(StreamBody::new(data.map(|m| m.map(|m| Frame::data(m.data))))))
            };
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, http::HeaderValue::from_static(OCTETS));
            headers.insert(CONTENT_LENGTH, digest.size.into());
            Ok(response)
        }
        (Kind::Cas, Method::PUT) => {
            let size = content_length(request.headers())?;
            let digest = Digest::new(named.function, named.hash(), size).expect("the same function and hash");
            let resource = format!(
                "{prefix}uploads/http-{}/blobs/{}/{}/{size}",
                upload_id(),
                digest.function.name(),
                digest.hex()
            );
            let first = WriteRequest { resource_name: resource, ..Default::default() };
            api.bytestream.write_stream(first, write_requests(request.into_body())).await?;
            Ok(bytes_response(StatusCode::OK, OCTETS, Bytes::new()))
        }
        (Kind::Ac, Method::GET | Method::HEAD) => {
            let head = request.method() == Method::HEAD;
            let message = GetActionResultRequest {
                instance_name: instance,
                action_digest: Some(named.to_proto()),
                digest_function: named.function.to_wire() as i32,
                ..Default::default()
            };
            let mut request = tonic::Request::new(message);
            request.extensions_mut().insert(AnySize);
            let result = api.action_cache.get_action_result(request).await?;
            let body = Bytes::from(result.into_inner().encode_to_vec());
            let mut response = bytes_response(StatusCode::OK, OCTETS, body);
            if head {
                *response.body_mut() = Body::empty();
            }
            Ok(response)
        }
        (Kind::Ac, Method::PUT) => {
            let body = read_body(request.into_body(), api.shared.max_message_size).await?;
            crate::codec::check_entries::<ActionResult>(&body)?;
            let result = ActionResult::decode(body).map_err(|e| {
                HttpError::bad_request(format!("the body is not a serialized ActionResult protobuf: {e}"))
            })?;
            let message = UpdateActionResultRequest {
                instance_name: instance,
                action_digest: Some(named.to_proto()),
                action_result: Some(result),
                digest_function: named.function.to_wire() as i32,
                ..Default::default()
            };
            let mut request = tonic::Request::new(message);
            request.extensions_mut().insert(AnySize);
            api.action_cache.update_action_result(request).await?;
            Ok(bytes_response(StatusCode::OK, OCTETS, Bytes::new()))
        }
        (_, method) => Err(HttpError::method(&method, &path, "GET, HEAD, PUT")),
    }
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

/// Each PUT is an upload of its own: two clients may send the same blob at once.
fn upload_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", crate::store::now_ms(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The body as ByteStream write messages, the last one finishing the write.
/// A body that breaks off ends the stream with an error: a disconnect.
fn write_requests(body: RequestBody) -> impl Stream<Item = Result<WriteRequest, Status>> + Unpin + Send {
    let start = (BodyStream::new(body), 0i64, false);
    Box::pin(stream::unfold(start, |(mut frames, offset, ended)| async move {
        if ended {
            return None;
        }
        loop {
            let message = match frames.next().await {
                // Trailers carry no data.
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => Ok(WriteRequest { write_offset: offset, data, ..Default::default() }),
                    Err(_) => continue,
                },
                // It broke off, or stalled (see `crate::idle::Timed`).
                Some(Err(status)) => Err(status),
                None => Ok(WriteRequest { write_offset: offset, finish_write: true, ..Default::default() }),
            };
            let (next, ended) = match &message {
                Ok(m) => (offset + m.data.len() as i64, m.finish_write),
                Err(_) => (offset, true),
            };
            return Some((message, (frames, next, ended)));
        }
    }))
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
