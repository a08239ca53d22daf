//! Running larder for a team: graceful drain and signals, configuration
//! from the environment.

mod common;

use std::time::Duration;

use common::*;
use larder::proto::bytestream::WriteRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Starts a ByteStream write whose messages the test sends one by one.
async fn open_upload(
    c: &mut Clients,
) -> (mpsc::Sender<WriteRequest>, tokio::task::JoinHandle<Result<i64, tonic::Status>>) {
    let (tx, rx) = mpsc::channel(4);
    let mut bs = c.bs.clone();
    let call =
        tokio::spawn(async move { Ok(bs.write(ReceiverStream::new(rx)).await?.into_inner().committed_size) });
    (tx, call)
}

#[tokio::test]
async fn sigterm_lets_an_upload_in_flight_finish_then_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    let data = random_bytes(3 << 20, 1);
    let name = upload_name("", "drain", &data);
    let mut messages = write_messages(&name, &data, 0, 1 << 20, true).into_iter();
    let (tx, call) = open_upload(&mut c).await;
    tx.send(messages.next().unwrap()).await.unwrap();
    c.until_committed(&name, 1 << 20).await;
    server.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.is_running(), "waits for the call in flight");
    for m in messages {
        tx.send(m).await.unwrap();
    }
    assert_eq!(call.await.unwrap().unwrap(), data.len() as i64);
    let status = server.wait_for_exit(Duration::from_secs(20)).expect("exits once drained");
    assert!(status.success(), "{status:?}");
    // Stored for good.
    let server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    assert!(c.read(&read_name("", &data), 0, 0).await.unwrap() == data);
}

/// A server with an upload that never finishes, and SIGTERM sent.
async fn stuck_and_terminated(
    dir: &std::path::Path,
    drain: &str,
) -> (TestServer, mpsc::Sender<WriteRequest>) {
    let server = TestServer::start(dir, &["--drain-timeout", drain]);
    let mut c = server.clients().await;
    let (tx, _call) = open_upload(&mut c).await;
    let data = random_bytes(2 << 20, 2);
    let name = upload_name("", "stuck", &data);
    let first = write_messages(&name, &data, 0, 1 << 20, false).remove(0);
    tx.send(first).await.unwrap();
    c.until_committed(&name, 1 << 20).await;
    server.terminate();
    (server, tx)
}

#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_drain_timeout_bounds_the_wait() {
    let tmp = tempfile::tempdir().unwrap();
    // A 60 s drain: the second signal ends it.
    let (mut server, _upload) = stuck_and_terminated(&tmp.path().join("a"), "60s").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.is_running(), "waits for the stuck upload");
    // The listener closes once the first signal is handled; a second signal
    // sent before that could merge with the first.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&server.addr).is_ok() {
        assert!(std::time::Instant::now() < deadline, "still accepting connections while draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.terminate();
    let status = server.wait_for_exit(Duration::from_secs(10)).expect("the second signal exits at once");
    assert_eq!(status.code(), Some(130));

    // A 1 s drain: larder stops waiting and exits 0.
    let (mut server, _upload) = stuck_and_terminated(&tmp.path().join("b"), "1s").await;
    let status = server.wait_for_exit(Duration::from_secs(15)).expect("exits after the drain timeout");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn health_answers_from_the_start_and_serves_once_the_store_opens() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let first = TestServer::start(&dir, &[]);
    // A second larder on the same directory listens, but cannot open the
    // store while the first holds it.
    let mut second = TestServer::spawn(&dir, &[]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", second.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let check = |service: &str| HealthCheckRequest { service: service.to_string() };
    let http = reqwest::Client::new();
    let healthz = format!("http://{}/healthz", second.addr);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = health.check(check("")).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    assert_eq!(http.get(&healthz).send().await.unwrap().status(), 503);
    let mut c = second.clients().await;
    let request = larder::proto::reapi::FindMissingBlobsRequest::default();
    assert_code(c.cas.find_missing_blobs(request).await, tonic::Code::Unavailable);
    let r = http.get(format!("http://{}/v2//capabilities", second.addr)).send().await.unwrap();
    assert_eq!(r.status(), 503);

    // The first one stops: the second opens the store and serves.
    let status = tokio::task::spawn_blocking(move || first.stop()).await.unwrap();
    assert!(status.success());
    let mut second = tokio::task::spawn_blocking(move || {
        second.wait_until_serving();
        second
    })
    .await
    .unwrap();
    for service in
        ["", "build.bazel.remote.execution.v2.ContentAddressableStorage", "google.bytestream.ByteStream"]
    {
        let status = health.check(check(service)).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    assert_eq!(http.get(&healthz).send().await.unwrap().status(), 200);
    assert_eq!(c.find_missing(&[digest(b"x")]).await.len(), 1);
    assert!(second.is_running());
}

#[tokio::test]
async fn failed_calls_get_one_log_line_each_and_successes_none() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("larder.log");
    let server = TestServer::start_logging(&tmp.path().join("data"), &["--log-format", "json"], "info", &log);
    let mut c = server.clients().await;
    // Successes, and a cache miss: no lines.
    let data = b"logged blob".as_slice();
    c.write(&upload_name("", "ok", data), data, 4).await.unwrap();
    c.read(&read_name("", data), 0, 0).await.unwrap();
    assert_code(c.read(&read_name("", b"missing"), 0, 0).await, tonic::Code::NotFound);
    // Two failures: a malformed digest, and bytes that do not match theirs.
    let bad = larder::proto::reapi::Digest { hash: "xyz".into(), size_bytes: 1 };
    let request =
        larder::proto::reapi::FindMissingBlobsRequest { blob_digests: vec![bad], ..Default::default() };
    assert_code(c.cas.find_missing_blobs(request).await, tonic::Code::InvalidArgument);
    let wrong = upload_name("", "bad", b"declared bytes");
    assert_code(c.write(&wrong, b"other bytes!!!", 4).await, tonic::Code::InvalidArgument);
    // Over HTTP: a miss (no line), and malformed JSON (a line).
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);
    http.get(format!("{base}/cas/{}", digest(b"absent").hash)).send().await.unwrap();
    http.post(format!("{base}/v2//blobs:findMissing")).body("{").send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("failed"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(
        lines[0]["method"],
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
    );
    assert_eq!(lines[0]["code"], "InvalidArgument");
    assert_eq!(lines[1]["method"], "/google.bytestream.ByteStream/Write");
    let declared = digest(b"declared bytes");
    assert_eq!(lines[1]["digest"], format!("{}/{}", declared.hash, declared.size_bytes));
    assert_eq!(
        (lines[2]["path"].as_str(), lines[2]["code"].as_u64()),
        (Some("/v2//blobs:findMissing"), Some(400))
    );
    assert!(lines.iter().all(|l| l["level"] == "INFO"), "{text}");
}

/// The value of one sample of an OpenMetrics page, by its exact name and labels.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{page}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_calls_bytes_hits_and_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &["--metrics-listen", "127.0.0.1:0"]);
    let metrics_addr = server.address("metrics");
    let http = reqwest::Client::new();
    let scrape = || async {
        let r = http.get(format!("http://{}/metrics", server.addr)).send().await.unwrap();
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
        r.text().await.unwrap()
    };
    let before = scrape().await;
    let mut c = server.clients().await;
    let data = random_bytes(200_000, 1);
    c.write(&upload_name("", "m", &data), &data, 64 << 10).await.unwrap();
    c.read(&read_name("", &data), 0, 0).await.unwrap();
    c.find_missing(&[digest(b"absent")]).await;
    let action = digest(b"action");
    let get = larder::proto::reapi::GetActionResultRequest {
        action_digest: Some(action.clone()),
        ..Default::default()
    };
    assert_code(c.ac.get_action_result(get.clone()).await, tonic::Code::NotFound);
    let update = larder::proto::reapi::UpdateActionResultRequest {
        action_digest: Some(action),
        action_result: Some(Default::default()),
        ..Default::default()
    };
    c.ac.update_action_result(update).await.unwrap();
    c.ac.get_action_result(get).await.unwrap();
    http.get(format!("http://{}/cas/{}", server.addr, digest(b"nope").hash)).send().await.unwrap();
    // Made-up routes must not grow the label set.
    http.post(format!("http://{}/v2//blobs:madeUp12345", server.addr)).send().await.unwrap();
    let after = scrape().await;
    assert!(!after.contains("madeUp12345"), "{after}");
    assert_eq!(sample(&after, r#"larder_calls_total{method="POST /v2/other",code="404"}"#), 1.0);

    let find = r#"larder_calls_total{method="/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",code="OK"}"#;
    assert_eq!(sample(&after, find), 1.0);
    let write = r#"larder_calls_total{method="/google.bytestream.ByteStream/Write",code="OK"}"#;
    assert_eq!(sample(&after, write), 1.0);
    let miss = r#"larder_calls_total{method="/build.bazel.remote.execution.v2.ActionCache/GetActionResult",code="NOT_FOUND"}"#;
    assert_eq!(sample(&after, miss), 1.0);
    assert_eq!(sample(&after, r#"larder_calls_total{method="GET /cas",code="404"}"#), 1.0);
    let read_count =
        r#"larder_call_duration_seconds_count{method="/google.bytestream.ByteStream/Read",code="OK"}"#;
    assert_eq!(sample(&after, read_count), 1.0);
    assert!(
        sample(&after, "larder_received_bytes_total")
            >= sample(&before, "larder_received_bytes_total") + 200_000.0
    );
    assert!(
        sample(&after, "larder_sent_bytes_total") >= sample(&before, "larder_sent_bytes_total") + 200_000.0
    );
    assert_eq!(sample(&after, "larder_action_cache_hits_total"), 1.0);
    assert_eq!(sample(&after, "larder_action_cache_misses_total"), 1.0);
    assert_eq!(sample(&after, "larder_blobs"), 1.0);
    assert_eq!(sample(&after, "larder_memory_indexed_blobs"), 1.0);
    assert_eq!(sample(&after, "larder_logical_bytes"), 200_000.0);
    assert!(sample(&after, "larder_disk_bytes") > 0.0);
    for name in ["larder_rejected_writes_total", "larder_evicted_blobs_total", "larder_partial_uploads"] {
        assert_eq!(sample(&after, name), 0.0, "{name}");
    }
    sample(&after, "larder_rocksdb_pending_compaction_bytes");
    sample(&after, "larder_rocksdb_write_stopped");

    // The metrics port serves metrics and health, not the cache.
    let r = http.get(format!("http://{metrics_addr}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(http.get(format!("http://{metrics_addr}/healthz")).send().await.unwrap().status(), 200);
    let r = http.get(format!("http://{metrics_addr}/cas/{}", digest(&data).hash)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn the_status_page_and_its_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = TestServer::start(&dir, &["--max-size", "1GiB"]);
    let mut c = server.clients().await;
    let data = text_bytes(100_000, 1);
    c.write(&upload_name("", "s", &data), &data, 64 << 10).await.unwrap();
    let get = larder::proto::reapi::GetActionResultRequest {
        action_digest: Some(digest(b"no such action")),
        ..Default::default()
    };
    assert_code(c.ac.get_action_result(get).await, tonic::Code::NotFound);
    let http = reqwest::Client::new();
    let status: serde_json::Value =
        http.get(format!("http://{}/status.json", server.addr)).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["listen"], server.addr);
    assert_eq!(status["dataDir"], dir.display().to_string());
    assert_eq!(status["maxSizeBytes"], 1u64 << 30);
    assert_eq!((status["blobs"].as_u64(), status["logicalBytes"].as_u64()), (Some(1), Some(100_000)));
    assert!(status["storedBytes"].as_u64().unwrap() < 100_000, "text compresses");
    assert_eq!(status["actionCache"], serde_json::json!({"hits": 0, "misses": 1, "hitRatio": 0.0}));
    assert!(status["throughput"]["sentBytesPerSecond"].is_array());
    let page = http.get(format!("http://{}/", server.addr)).send().await.unwrap();
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let page = page.text().await.unwrap();
    for expected in ["<svg", "Data directory", &dir.display().to_string(), "1 misses", "of the 1GiB budget"] {
        assert!(page.contains(expected), "{expected:?} in the page");
    }
}

/// Container platforms inject variables such as LARDER_PORT and
/// LARDER_SERVICE_HOST for a service named larder: larder still starts, says
/// it ignores them, and reads its own variables as ever.
#[tokio::test]
async fn unknown_larder_variables_are_warned_about_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [
        ("LARDER_PORT".to_string(), "tcp://10.0.0.7:9092".to_string()),
        ("LARDER_SERVICE_HOST".to_string(), "10.0.0.7".to_string()),
        ("LARDER_MAX_BATCH_SIZE".to_string(), "2MiB".to_string()),
    ];
    let server = TestServer::start_with_env(&tmp.path().join("data"), &[], &env);
    let mut c = server.clients().await;
    let caps =
        c.caps.get_capabilities(larder::proto::reapi::GetCapabilitiesRequest::default()).await.unwrap();
    let advertised = caps.into_inner().cache_capabilities.unwrap().max_batch_total_size_bytes;
    assert_eq!(advertised, 2 << 20, "LARDER_MAX_BATCH_SIZE took effect");
    let log = server.log();
    for variable in ["LARDER_PORT", "LARDER_SERVICE_HOST"] {
        assert!(log.contains(&format!("ignoring the environment variable {variable}")), "{log}");
    }
    assert!(!log.contains("LARDER_MAX_BATCH_SIZE"), "{log}");
}
