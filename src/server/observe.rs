//! Every reply is observed once it ends: counted in the metrics, and logged
//! if it failed (one line per failed call, none for successes; cache misses
//! at debug level, the client's mistakes at info, the server's troubles at
//! warn).

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Response, StatusCode};
use tonic::body::Body;
use tonic::{Code, Status};

use crate::http::{code_name, route_label};
use crate::metrics::Metrics;

/// A gRPC reply: its status is in the headers of a reply with no body,
/// else in the trailers of the stream.
pub fn observe_grpc(
    metrics: &Arc<Metrics>,
    method: String,
    started: Instant,
    response: Response<Body>,
) -> Response<Body> {
    let immediate = Status::from_header_map(response.headers());
    let recorder = Arc::clone(metrics);
    response.map(move |body| {
        Body::new(metrics.count_sent(body, move |trailers| {
            let status = immediate.or_else(|| trailers.and_then(Status::from_header_map));
            match status {
                Some(status) => {
                    log_grpc(&method, &status);
                    recorder.record_call(&method, code_name(status.code()), started);
                }
                // The client went away before the end.
                None => recorder.record_call(&method, code_name(Code::Cancelled), started),
            }
        }))
    })
}

/// An HTTP reply: its status is known at once; its duration at its end.
pub fn observe_http(
    metrics: &Arc<Metrics>,
    method: &Method,
    path: &str,
    started: Instant,
    response: Response<Body>,
) -> Response<Body> {
    log_http(method, path, response.status());
    let (route, code) = (route_label(method, path), response.status().as_u16().to_string());
    let recorder = Arc::clone(metrics);
    response.map(move |body| {
        Body::new(metrics.count_sent(body, move |_| recorder.record_call(&route, &code, started)))
    })
}

fn log_grpc(method: &str, status: &Status) {
    let (code, message) = (status.code(), status.message());
    // Recorded only when the message names a blob.
    let digest = digest_in(message);
    match code {
        Code::Ok => {}
        Code::NotFound => tracing::debug!(method, digest, ?code, message, "call failed"),
        Code::Internal | Code::DataLoss | Code::Unavailable | Code::ResourceExhausted | Code::Unknown => {
            tracing::warn!(method, digest, ?code, message, "call failed")
        }
        _ => tracing::info!(method, digest, ?code, message, "call failed"),
    }
}

fn log_http(method: &Method, path: &str, status: StatusCode) {
    let code = status.as_u16();
    match status {
        // 308 is how an upload session acknowledges a chunk.
        s if s.is_success() || s.is_redirection() => {}
        StatusCode::NOT_FOUND => tracing::debug!(%method, path, code, "request failed"),
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            tracing::warn!(%method, path, code, "request failed")
        }
        _ => tracing::info!(%method, path, code, "request failed"),
    }
}

/// The first `hash/size` in a message: how errors name their blob.
fn digest_in(message: &str) -> Option<&str> {
    message.split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == ':').find(|word| {
        word.split_once('/').is_some_and(|(hash, size)| {
            hash.len() >= 40
                && hash.bytes().all(|b| b.is_ascii_hexdigit())
                && !size.is_empty()
                && size.bytes().all(|b| b.is_ascii_digit())
        })
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// Log fields are taken from error messages, which quote client
        /// input: whatever they hold, a digest found is a part of them.
        #[test]
        fn digests_in_any_message(message in crate::hostile::path()) {
            if let Some(digest) = super::digest_in(&message) {
                prop_assert!(message.contains(digest));
            }
            prop_assert!(crate::server::methods::label(&message) == "other" || message.starts_with('/'));
        }
    }

    #[test]
    fn digests_are_found_in_messages() {
        let h = "ab".repeat(32);
        assert_eq!(super::digest_in(&format!("blob {h}/12 is not in the CAS")), Some(&*format!("{h}/12")));
        assert_eq!(super::digest_in(&format!("blob blake3:{h}/3 is gone")), Some(&*format!("{h}/3")));
        assert_eq!(super::digest_in("write_offset 5 does not follow"), None);
    }
}
