//! Authentication from an htpasswd file, for gRPC and HTTP alike, and the
//! anonymous-read mode.

mod common;

use base64::Engine;
use common::*;
use larder::proto::reapi;
use tonic::Code;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

fn server(tmp: &std::path::Path, extra: &[&str]) -> TestServer {
    let file = tmp.join("htpasswd");
    std::fs::write(&file, format!("{USER}:{}\n", bcrypt::hash(PASSWORD, 4).unwrap())).unwrap();
    let mut args = vec!["--htpasswd", file.to_str().unwrap()];
    args.extend(extra);
    TestServer::start(&tmp.join("data"), &args)
}

fn with_auth<T>(message: T, authorization: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.parse().unwrap());
    }
    request
}

fn update(data: &[u8]) -> reapi::BatchUpdateBlobsRequest {
    reapi::BatchUpdateBlobsRequest {
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: Some(digest(data)),
            data: bytes::Bytes::copy_from_slice(data),
            compressor: 0,
        }],
        ..Default::default()
    }
}

fn find(data: &[u8]) -> reapi::FindMissingBlobsRequest {
    reapi::FindMissingBlobsRequest { blob_digests: vec![digest(data)], ..Default::default() }
}

#[tokio::test]
async fn every_call_needs_good_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server(tmp.path(), &[]);
    let mut c = server.clients().await;
    let good = basic(USER, PASSWORD);
    for bad in [None, Some(basic(USER, "wrong")), Some(basic("mallory", PASSWORD)), Some("Bearer x".into())] {
        let status = assert_code(
            c.cas.find_missing_blobs(with_auth(find(b"x"), bad.as_deref())).await,
            Code::Unauthenticated,
        );
        assert!(!status.message().contains(PASSWORD), "passwords are never echoed");
    }
    c.cas.batch_update_blobs(with_auth(update(b"blob"), Some(&good))).await.unwrap();
    let missing = c.cas.find_missing_blobs(with_auth(find(b"blob"), Some(&good))).await.unwrap();
    assert!(missing.into_inner().missing_blob_digests.is_empty());

    let http = reqwest::Client::new();
    let url = format!("http://{}/cas/{}", server.addr, digest(b"blob").hash);
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"larder\"");
    assert_eq!(http.get(&url).basic_auth(USER, Some("wrong")).send().await.unwrap().status(), 401);
    let r = http.get(&url).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.bytes().await.unwrap().as_ref()), (200, b"blob".as_slice()));
    // Health needs no credentials; metrics do, and the refusals are counted.
    assert_eq!(http.get(format!("http://{}/healthz", server.addr)).send().await.unwrap().status(), 200);
    let metrics_url = format!("http://{}/metrics", server.addr);
    assert_eq!(http.get(&metrics_url).send().await.unwrap().status(), 401);
    let metrics = http.get(&metrics_url).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    let refused = r#"larder_calls_total{method="/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",code="UNAUTHENTICATED"} 4"#;
    assert!(metrics.contains(refused), "{metrics}");
    assert!(metrics.contains(r#"larder_calls_total{method="GET /cas",code="401"} 2"#), "{metrics}");
}

#[tokio::test]
async fn anonymous_clients_may_read_but_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server(tmp.path(), &["--allow-unauthenticated-reads"]);
    let mut c = server.clients().await;
    let good = basic(USER, PASSWORD);
    c.cas.batch_update_blobs(with_auth(update(b"shared"), Some(&good))).await.unwrap();
    let missing = c.cas.find_missing_blobs(with_auth(find(b"shared"), None)).await.unwrap();
    assert!(missing.into_inner().missing_blob_digests.is_empty(), "anonymous reads work");
    assert_eq!(c.read(&read_name("", b"shared"), 0, 0).await.unwrap(), b"shared");
    assert_code(c.cas.batch_update_blobs(with_auth(update(b"mine"), None)).await, Code::PermissionDenied);
    assert_code(c.write(&upload_name("", "u", b"mine"), b"mine", 2).await, Code::PermissionDenied);
    let bad = basic(USER, "wrong");
    assert_code(c.cas.find_missing_blobs(with_auth(find(b"x"), Some(&bad))).await, Code::Unauthenticated);

    let http = reqwest::Client::new();
    let url = format!("http://{}/cas/{}", server.addr, digest(b"other").hash);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 404, "an anonymous read: a plain miss");
    assert_eq!(http.put(&url).body("other").send().await.unwrap().status(), 403);
    let r = http.put(&url).basic_auth(USER, Some(PASSWORD)).body("other").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
}

#[test]
fn htpasswd_files_without_bcrypt_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("htpasswd");
    std::fs::write(&file, "bob:{SHA}fEqNCco3Yq9h5ZUglD3CZJT4lBs=\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(["serve", "--listen", "127.0.0.1:0", "--htpasswd", file.to_str().unwrap(), "--dir"])
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("htpasswd -B"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
