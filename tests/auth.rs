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

/// A server with one user, whose password is hashed at bcrypt's lowest cost
/// (fast tests).
fn server(tmp: &std::path::Path, extra: &[&str]) -> TestServer {
    server_with_cost(tmp, extra, 4)
}

fn server_with_cost(tmp: &std::path::Path, extra: &[&str], cost: u32) -> TestServer {
    let file = tmp.join("htpasswd");
    std::fs::write(&file, format!("{USER}:{}\n", bcrypt::hash(PASSWORD, cost).unwrap())).unwrap();
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

    // Every HTTP route that stores is a write, whatever its method.
    let base = format!("http://{}", server.addr);
    let media = format!("{base}/v1/media/{}?alt=media", read_name("", b"other"));
    assert_eq!(http.get(&media).send().await.unwrap().status(), 200, "an anonymous media download");
    for (what, request) in [
        (
            "media",
            http.post(format!("{base}/upload/v1/media/{}?uploadType=media", upload_name("", "m", b"mine"))),
        ),
        (
            "multipart",
            http.post(format!(
                "{base}/upload/v1/media/{}?uploadType=multipart",
                upload_name("", "p", b"mine")
            )),
        ),
        (
            "resumable",
            http.post(format!(
                "{base}/upload/v1/media/{}?uploadType=resumable",
                upload_name("", "r", b"mine")
            )),
        ),
        (
            "resumable path",
            http.post(format!("{base}/resumable/upload/v1/media/{}", upload_name("", "s", b"mine"))),
        ),
        (
            "session",
            http.put(format!("{base}/upload/v1/media/{}", upload_name("", "t", b"mine")))
                .header("content-range", "bytes 0-3/4"),
        ),
        ("batchUpdate", http.post(format!("{base}/v2//blobs:batchUpdate"))),
        ("an unknown verb", http.post(format!("{base}/v2//blobs:spliceBlob"))),
    ] {
        let r = request.body("mine").send().await.unwrap();
        assert_eq!(r.status(), 403, "{what}: anonymous callers may not write");
    }
    let r = http
        .post(format!("{base}/v2//blobs:findMissing"))
        .body(r#"{"blobDigests": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "findMissing is a read");
    let mut c = server.clients().await;
    assert_eq!(c.find_missing(&[digest(b"mine")]).await.len(), 1, "nothing was stored");
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

/// A server whose one user's password is hashed at bcrypt's default cost
/// (12: about a quarter of a second a check here), as an operator's would be.
fn costly_server(tmp: &std::path::Path) -> TestServer {
    server_with_cost(tmp, &[], 12)
}

/// Floods the server with wrong passwords (`password(i)` for the i-th
/// request) from 40 concurrent clients until the returned flag is set.
fn flood(
    addr: &str,
    password: fn(u64) -> String,
) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, Vec<tokio::task::JoinHandle<Vec<u16>>>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = (0..40u64)
        .map(|t| {
            let (stop, url) = (stop.clone(), format!("http://{addr}/cas/{}", digest(b"x").hash));
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut codes = Vec::new();
                let mut i = t * 1_000_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http.get(&url).basic_auth(USER, Some(password(i))).send().await.unwrap();
                    codes.push(r.status().as_u16());
                    if r.status() == 429 {
                        assert!(r.headers().contains_key("retry-after"), "429 without Retry-After");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    i += 1;
                }
                codes
            })
        })
        .collect();
    (stop, tasks)
}

/// The time of a valid user's first login (a FindMissingBlobs), from `local`.
async fn first_login(addr: &str, local: std::net::IpAddr) -> std::time::Duration {
    let http = reqwest::Client::builder().local_address(local).build().unwrap();
    let url = format!("http://{addr}/cas/{}", digest(b"x").hash);
    let started = std::time::Instant::now();
    let r = http.get(&url).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(r.status(), 404, "a valid login: a plain miss");
    started.elapsed()
}

/// Case 7: 40 concurrent wrong passwords once delayed a valid user's first
/// login by 11.3 s (0.24 s idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_does_not_lock_out_valid_users() {
    let tmp = tempfile::tempdir().unwrap();
    let server = costly_server(tmp.path());
    let localhost: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    // The same wrong password over and over, from the valid user's address.
    let (stop, tasks) = flood(&server.addr, |_| "guess".to_string());
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let took = first_login(&server.addr, localhost).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let codes: Vec<u16> =
        futures::future::join_all(tasks).await.into_iter().flat_map(Result::unwrap).collect();
    eprintln!("repeated password: first login in {:.2}s during {} refusals", took.as_secs_f64(), codes.len());
    assert!(codes.iter().all(|c| *c == 401), "a repeated wrong password is simply refused");
    assert!(took < std::time::Duration::from_secs(3), "the first login took {took:?}");
    drop(server);

    // Passwords that change every time, from another address: that address
    // is throttled (429, Retry-After), the valid user's is not.
    let tmp = tempfile::tempdir().unwrap();
    let server = costly_server(tmp.path());
    let (stop, tasks) = flood(&server.addr, |i| format!("guess {i}"));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let took = first_login(&server.addr, "127.0.0.2".parse().unwrap()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let codes: Vec<u16> =
        futures::future::join_all(tasks).await.into_iter().flat_map(Result::unwrap).collect();
    let throttled = codes.iter().filter(|c| **c == 429).count();
    eprintln!(
        "changing passwords: first login in {:.2}s; {throttled} of {} attempts throttled",
        took.as_secs_f64(),
        codes.len()
    );
    assert!(throttled > codes.len() / 2, "{throttled} of {} throttled", codes.len());
    assert!(took < std::time::Duration::from_secs(3), "the first login took {took:?}");
}

/// Case 8: with auth, metrics and status pages need read access; anonymous
/// readers see no paths or endpoints; Capabilities tells each caller whether
/// it may write.
#[tokio::test]
async fn what_anonymous_readers_see_and_may_do() {
    let tmp = tempfile::tempdir().unwrap();
    let readers = server(tmp.path(), &["--allow-unauthenticated-reads"]);
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", readers.addr);
    let status: serde_json::Value = http.get(url("/status.json")).send().await.unwrap().json().await.unwrap();
    assert!(status["dataDir"].is_null(), "{status}");
    let page = http.get(url("/")).send().await.unwrap().text().await.unwrap();
    assert!(!page.contains(tmp.path().to_str().unwrap()), "the page shows the data directory");
    let status: serde_json::Value = http
        .get(url("/status.json"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(status["dataDir"].as_str().unwrap().contains(tmp.path().to_str().unwrap()), "{status}");
    assert_eq!(http.get(url("/metrics")).send().await.unwrap().status(), 200, "readers may read metrics");

    let mut c = readers.clients().await;
    let caps = |auth: Option<&str>| with_auth(reapi::GetCapabilitiesRequest::default(), auth);
    let anonymous = c.caps.get_capabilities(caps(None)).await.unwrap().into_inner();
    let update = |s: &reapi::ServerCapabilities| {
        s.cache_capabilities
            .as_ref()
            .unwrap()
            .action_cache_update_capabilities
            .as_ref()
            .unwrap()
            .update_enabled
    };
    assert!(!update(&anonymous), "anonymous callers may not update the action cache");
    let good = basic(USER, PASSWORD);
    assert!(update(&c.caps.get_capabilities(caps(Some(&good))).await.unwrap().into_inner()));
    let rest: serde_json::Value =
        http.get(url("/v2/capabilities")).send().await.unwrap().json().await.unwrap();
    // proto3 JSON leaves false out.
    let enabled = &rest["cacheCapabilities"]["actionCacheUpdateCapabilities"]["updateEnabled"];
    assert!(enabled.is_null() || *enabled == serde_json::json!(false), "{rest}");
    drop(readers);

    // Without anonymous reads, metrics need credentials on the main port; a
    // metrics port may be left open for Prometheus.
    let tmp = tempfile::tempdir().unwrap();
    let server = server(tmp.path(), &["--metrics-listen", "127.0.0.1:0", "--public-metrics-port"]);
    let metrics_port = format!("http://{}/metrics", server.address("metrics"));
    assert_eq!(http.get(&metrics_port).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("http://{}/metrics", server.addr)).send().await.unwrap().status(), 401);
    assert_eq!(http.get(format!("http://{}/status.json", server.addr)).send().await.unwrap().status(), 401);
}
