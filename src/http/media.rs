//! ByteStream over HTTP, as Google's REST form of it has it
//! (`RestByteStream`): `GET /v1/media/{name}?alt=media` downloads a blob,
//! whole or a byte range (`Range: bytes=a-b`, `bytes=a-`, `bytes=-n`), and
//! `POST /upload/v1/media/{name}?uploadType=media` uploads one. Names are
//! ByteStream resource names, their slashes kept: `{instance}/blobs/{hash}/{size}`
//! to read, `{instance}/uploads/{uuid}/blobs/{hash}/{size}` to write.

use futures::StreamExt;
use http::header::{ACCEPT_RANGES, CONNECTION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyStream, StreamBody};
use hyper::body::Frame;
use tonic::body::Body;
use tonic::{Code, Status};

use super::{HttpApi, HttpError, RequestBody, json_response, percent_decode};
use crate::cache::{self, Progress};
use crate::digest::{self, Encoding};

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

/// `POST /upload/v1/media/{name}?uploadType=media`: the body is the blob
/// (zstd-compressed for a `compressed-blobs/zstd/` name). It streams into the
/// upload under that name, and is verified before it becomes visible; the
/// reply is a `Media` message naming it.
pub async fn upload(
    api: &HttpApi,
    request: Request<RequestBody>,
    name: &str,
) -> Result<Response<Body>, HttpError> {
    let path = request.uri().path().to_string();
    if request.method() != Method::POST {
        return Err(HttpError::method(request.method(), &path, "POST"));
    }
    match query(&request, "uploadType") {
        Some("media") => {}
        // TODO(issue 18): multipart and resumable uploads.
        Some(other) => {
            return Err(HttpError::bad_request(format!(
                "uploadType={other} is not served yet: send the blob as the body with uploadType=media"
            )));
        }
        None => return Err(HttpError::bad_request("an upload needs uploadType=media")),
    }
    let name = percent_decode(name, false)?;
    let resource = digest::parse_write_resource(&name).map_err(cache::Error::from)?;
    let cache = &api.shared.cache;
    let reply = |whole_body: bool| {
        let body = serde_json::json!({ "resourceName": name }).to_string().into_bytes();
        let mut response = json_response(StatusCode::OK, body);
        if !whole_body {
            // What is left of the body would come first on this connection.
            response.headers_mut().insert(CONNECTION, http::HeaderValue::from_static("close"));
        }
        Ok(response)
    };
    // A blob found stored answers before its body is read: the body is
    // read to its end (no more than the blob can take), or the connection
    // closes after the answer (an HTTP/1.1 client writes its whole body
    // before it reads the answer).
    let digest = resource.digest;
    let most = match resource.encoding {
        Encoding::Identity => digest.size,
        Encoding::Zstd => digest.size.saturating_add(digest.size / 8).saturating_add(1 << 20),
    };
    let mut frames = BodyStream::new(request.into_body());
    let Some(mut upload) = cache.begin_upload(name.clone(), digest, resource.encoding, 0).await? else {
        return reply(drain(&mut frames, most).await);
    };
    while let Some(frame) = frames.next().await {
        match frame {
            // Trailers carry no data.
            Ok(frame) => {
                if let Ok(data) = frame.into_data()
                    && upload.push(data).await? == Progress::AlreadyPresent
                {
                    let left = most.saturating_sub(upload.wire());
                    return reply(drain(&mut frames, left).await);
                }
            }
            // It broke off, or stalled (see `crate::idle::Timed`): what
            // arrived is kept under the name, as a ByteStream write's is.
            Err(status) => {
                return match (upload.persist().await?, status.code()) {
                    (Progress::Continue, Code::DeadlineExceeded) => Err(status.into()),
                    (Progress::Continue, _) => Err(Status::cancelled("the request body broke off").into()),
                    (Progress::AlreadyPresent, _) => reply(false),
                };
            }
        }
    }
    if upload.complete().await? == Progress::Continue {
        upload.commit().await?;
    }
    reply(true)
}

/// Reads what is left of a request body, up to `most` bytes; whether it
/// ended (a body that breaks off, or runs on past `most`, did not).
async fn drain(frames: &mut BodyStream<RequestBody>, most: u64) -> bool {
    let mut read = 0u64;
    while let Some(frame) = frames.next().await {
        match frame.map(|f| f.into_data()) {
            Ok(Ok(data)) => read += data.len() as u64,
            Ok(Err(_)) => {}
            Err(_) => return false,
        }
        if read > most {
            return false;
        }
    }
    true
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
