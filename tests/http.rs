//! The HTTP face over HTTP/1.1 (and h2c): REAPI's REST/JSON mapping and
//! Bazel's HTTP cache protocol, against `larder serve`, next to gRPC.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use common::*;
use larder::proto::reapi;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn server() -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    (tmp, server)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().http1_only().build().unwrap()
}

fn sha256(data: &[u8]) -> String {
    digest(data).hash
}

/// A JSON digest, size as a string (int64) as the mapping writes it.
fn jd(data: &[u8]) -> Value {
    let d = digest(data);
    json!({"hash": d.hash, "sizeBytes": d.size_bytes.to_string()})
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> (StatusCode, Value) {
    let r = c.post(url).body(body.to_string()).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

async fn get(c: &reqwest::Client, url: String) -> (StatusCode, Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

/// Checks Google's JSON error form and returns its message.
fn error(status: StatusCode, body: &Value, code: u16, name: &str) -> String {
    assert_eq!(status.as_u16(), code, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["status"], name, "{body}");
    body["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn rest_blobs_routes_with_every_instance_form() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let blob = b"stored through REST".as_slice();
    let other = b"never stored".as_slice();

    for instance in ["", "main", "team/a/b"] {
        let (status, caps) = get(&c, format!("{base}/v2/{instance}/capabilities?alt=json")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(caps["cacheCapabilities"]["actionCacheUpdateCapabilities"]["updateEnabled"], true);
        assert!(caps["cacheCapabilities"]["digestFunctions"].as_array().unwrap().contains(&json!("SHA256")));
        assert_eq!(caps["cacheCapabilities"]["maxBatchTotalSizeBytes"], "4194304", "int64 as a string");
    }
    let update = json!({"requests": [{"digest": jd(blob), "data": B64.encode(blob)}]});
    let (status, body) = post(&c, format!("{base}/v2//blobs:batchUpdate?alt=json"), update).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["responses"][0]["status"], json!({}), "OK is the empty status");

    // Input forms the mapping allows: sizes as numbers, original field names.
    for body in [
        json!({"blobDigests": [jd(blob), jd(other)]}),
        json!({"blob_digests": [{"hash": sha256(blob), "size_bytes": blob.len()}, jd(other)]}),
    ] {
        for url in [format!("{base}/v2//blobs:findMissing"), format!("{base}/v2/a/b/blobs:findMissing")] {
            let (status, missing) = post(&c, url, body.clone()).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(missing, json!({"missingBlobDigests": [jd(other)]}));
        }
    }
    let (_, read) =
        post(&c, format!("{base}/v2/main/blobs:batchRead"), json!({"digests": [jd(blob), jd(other)]})).await;
    assert_eq!(read["responses"][0]["data"], B64.encode(blob));
    assert_eq!(read["responses"][1]["status"]["code"], 5, "NOT_FOUND for that blob only");
    // An enum given by name or number.
    for f in [json!("SHA256"), json!(1)] {
        let body = json!({"digests": [jd(blob)], "digestFunction": f});
        let (status, read) = post(&c, format!("{base}/v2//blobs:batchRead"), body).await;
        assert_eq!((status, &read["responses"][0]["data"]), (StatusCode::OK, &json!(B64.encode(blob))));
    }
}

#[tokio::test]
async fn rest_get_tree_pages() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let mut clients = server.clients().await;
    let leaves: Vec<reapi::Directory> = (0..3)
        .map(|i| reapi::Directory {
            files: vec![reapi::FileNode { name: format!("f{i}"), ..Default::default() }],
            ..Default::default()
        })
        .collect();
    let root = reapi::Directory {
        directories: leaves
            .iter()
            .enumerate()
            .map(|(i, d)| reapi::DirectoryNode {
                name: format!("d{i}"),
                digest: Some(digest(&d.encode_to_vec())),
            })
            .collect(),
        ..Default::default()
    };
    let encoded: Vec<Vec<u8>> = std::iter::once(&root).chain(&leaves).map(|d| d.encode_to_vec()).collect();
    let refs: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    assert!(clients.batch_update(&refs).await.iter().all(|c| *c == 0));
    let d = digest(&encoded[0]);
    let url = format!("{base}/v2/main/blobs/{}/{}:getTree?pageSize=2&alt=json", d.hash, d.size_bytes);
    let (status, page) = get(&c, url).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["directories"].as_array().unwrap().len(), 2);
    let token = page["nextPageToken"].as_str().unwrap().to_string();
    let url =
        format!("{base}/v2/main/blobs/{}/{}:getTree?pageSize=2&pageToken={token}", d.hash, d.size_bytes);
    let (_, rest) = get(&c, url).await;
    assert_eq!(rest["directories"].as_array().unwrap().len(), 2);
    assert!(rest.get("nextPageToken").is_none(), "the last page has no token: {rest}");
    let url = format!("{base}/v2/main/blobs/{}/{}:getTree", "ab".repeat(32), 5);
    let (status, body) = get(&c, url).await;
    error(status, &body, 404, "NOT_FOUND");
}

#[tokio::test]
async fn rest_action_results_round_trip_with_inlining() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let output = b"object code".as_slice();
    let stdout = b"compiled 1 file".as_slice();
    let mut clients = server.clients().await;
    assert_eq!(clients.batch_update(&[output, stdout]).await, vec![0, 0]);
    let action = digest(b"the action");
    let url = format!("{base}/v2/ci/actionResults/{}/{}", action.hash, action.size_bytes);
    let result = json!({
        "outputFiles": [{"path": "out/a.o", "digest": jd(output), "isExecutable": true}],
        "stdoutDigest": jd(stdout),
        "exitCode": 0,
    });
    let r = c.put(&url).body(result.to_string()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (status, got) = get(&c, format!("{url}?inlineStdout=true&inlineOutputFiles=out/a.o&alt=json")).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["stdoutRaw"], B64.encode(stdout));
    assert_eq!(got["outputFiles"][0]["contents"], B64.encode(output));
    assert_eq!(got["outputFiles"][0]["isExecutable"], true);
    // The same entry through gRPC; other instances do not see it.
    let grpc = reapi::GetActionResultRequest {
        instance_name: "ci".into(),
        action_digest: Some(action.clone()),
        ..Default::default()
    };
    let hit = clients.ac.get_action_result(grpc).await.unwrap().into_inner();
    assert_eq!(hit.output_files[0].path, "out/a.o");
    let (status, body) =
        get(&c, format!("{base}/v2/other/actionResults/{}/{}", action.hash, action.size_bytes)).await;
    error(status, &body, 404, "NOT_FOUND");
    // A result naming a blob that is not there is no hit.
    let missing = json!({"outputFiles": [{"path": "x", "digest": jd(b"absent")}]});
    let url2 = format!("{base}/v2/ci/actionResults/{}/7", sha256(b"action 2"));
    assert_eq!(c.put(&url2).body(missing.to_string()).send().await.unwrap().status(), StatusCode::OK);
    let (status, body) = get(&c, url2).await;
    assert!(error(status, &body, 404, "NOT_FOUND").contains("not in the CAS"));
}

#[tokio::test]
async fn rest_errors_are_precise() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let h = "ab".repeat(32);
    let (status, body) = post(&c, format!("{base}/v2//blobs:findMissing"), json!("not an object")).await;
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("JSON"));
    let r = c.post(format!("{base}/v2//blobs:batchRead")).body("{\"digests\": [").send().await.unwrap();
    let status = r.status();
    error(status, &r.json().await.unwrap(), 400, "INVALID_ARGUMENT");
    let (status, body) = get(&c, format!("{base}/v2//blobs:findMissing")).await;
    assert!(error(status, &body, 405, "METHOD_NOT_ALLOWED").contains("POST"));
    let r = c.delete(format!("{base}/v2/x/actionResults/{h}/1")).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "GET, PUT");
    let (status, body) = get(&c, format!("{base}/v2//nothing")).await;
    error(status, &body, 404, "NOT_FOUND");
    let (status, body) = get(&c, format!("{base}/elsewhere")).await;
    error(status, &body, 404, "NOT_FOUND");
    let (status, body) = get(&c, format!("{base}/v2//capabilities?alt=proto")).await;
    error(status, &body, 400, "INVALID_ARGUMENT");
    let bad_digest = json!({"blobDigests": [{"hash": "xyz", "sizeBytes": "1"}]});
    let (status, body) = post(&c, format!("{base}/v2//blobs:findMissing"), bad_digest).await;
    error(status, &body, 400, "INVALID_ARGUMENT");
    let (status, body) = get(&c, format!("{base}/v2/x/actionResults/{h}/1?inlineStdout=maybe")).await;
    error(status, &body, 400, "INVALID_ARGUMENT");
    let (status, body) = get(&c, format!("{base}/v2/team/blobs/x/capabilities")).await;
    error(status, &body, 400, "INVALID_ARGUMENT");
    // Over the batch limit: refused whole.
    let big = vec![7u8; 3 << 20];
    let update = json!({"requests": [
        {"digest": jd(&big), "data": B64.encode(&big)},
        {"digest": jd(&big[1..]), "data": B64.encode(&big[1..])},
    ]});
    let (status, body) = post(&c, format!("{base}/v2//blobs:batchUpdate"), update).await;
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("max_batch_total_size_bytes"));
    // A digest mismatch is that blob's status.
    let update = json!({"requests": [{"digest": jd(b"one"), "data": B64.encode(b"two")}]});
    let (_, body) = post(&c, format!("{base}/v2//blobs:batchUpdate"), update).await;
    assert_eq!(body["responses"][0]["status"]["code"], 3);
}

#[tokio::test]
async fn rest_over_h2c() {
    let (_tmp, server) = server();
    let c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = c.get(format!("http://{}/v2//capabilities", server.addr)).send().await.unwrap();
    assert_eq!((r.status(), r.version()), (StatusCode::OK, reqwest::Version::HTTP_2));
}

#[tokio::test]
async fn bazel_http_cache_cas_and_ac() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let blob = text_bytes(3 << 20, 1);
    let url = format!("{base}/cas/{}", sha256(&blob));
    assert_eq!(c.get(&url).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(c.put(&url).body(blob.clone()).send().await.unwrap().status(), StatusCode::OK);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["content-length"], blob.len().to_string().as_str());
    assert!(r.bytes().await.unwrap() == blob);
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], blob.len().to_string().as_str());
    // The empty blob exists; a PUT is verified before it is visible.
    let r = c.get(format!("{base}/cas/{}", sha256(b""))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let wrong = format!("{base}/cas/{}", sha256(b"declared"));
    let r = c.put(&wrong).body("other bytes").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(c.head(&wrong).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    // Without Content-Length (a chunked body) the size is unknown.
    let chunks = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"x"))]);
    let r =
        c.put(format!("{base}/cas/{}", sha256(b"x"))).body(reqwest::Body::wrap_stream(chunks)).send().await;
    assert_eq!(r.unwrap().status(), StatusCode::LENGTH_REQUIRED);
    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(
        (r.status(), r.headers()["allow"].to_str().unwrap()),
        (StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD, PUT")
    );
    let r = c.get(format!("{base}/cas/not-a-hash")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Action results: serialized protos, checked for completeness, per instance.
    let output = b"linked binary".as_slice();
    assert_eq!(
        c.put(format!("{base}/cas/{}", sha256(output))).body(output).send().await.unwrap().status(),
        StatusCode::OK
    );
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "bin".into(),
            digest: Some(digest(output)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let ac = format!("{base}/team/ac/{}", sha256(b"action"));
    let r = c.put(&ac).body(result.encode_to_vec()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got = c.get(&ac).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(reapi::ActionResult::decode(got).unwrap(), result);
    assert_eq!(
        c.get(format!("{base}/ac/{}", sha256(b"action"))).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let r = c.put(&ac).body("\u{ff}garbage").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let dangling = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "x".into(),
            digest: Some(digest(b"gone")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let ac2 = format!("{base}/ac/{}", sha256(b"action 2"));
    c.put(&ac2).body(dangling.encode_to_vec()).send().await.unwrap();
    assert_eq!(c.get(&ac2).send().await.unwrap().status(), StatusCode::NOT_FOUND);
}

/// zstd on Bazel's HTTP cache, as bazel-remote serves it: a PUT with
/// `Content-Encoding: zstd` names its size in `X-Digest-SizeBytes`; a GET
/// with `Accept-Encoding: zstd` gets a zstd body.
#[tokio::test]
async fn bazel_http_cache_speaks_zstd() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let blob = text_bytes((2 << 20) + 3, 7);
    let url = format!("{base}/cas/{}", sha256(&blob));
    let compressed = zstd::bulk::compress(&blob, 3).unwrap();
    let put = |body: Vec<u8>, size: Option<usize>, encoding: &str| {
        let mut request = c.put(&url).header("content-encoding", encoding).body(body);
        if let Some(size) = size {
            request = request.header("x-digest-sizebytes", size.to_string());
        }
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(put(compressed.clone(), None, "zstd").await, StatusCode::BAD_REQUEST, "no size");
    assert_eq!(put(compressed.clone(), Some(blob.len() - 1), "zstd").await, StatusCode::BAD_REQUEST);
    assert_eq!(put(blob.clone(), None, "gzip").await, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(c.head(&url).send().await.unwrap().status(), StatusCode::NOT_FOUND, "nothing stored");
    assert_eq!(put(compressed, Some(blob.len()), "zstd").await, StatusCode::OK);

    let r = c.get(&url).header("accept-encoding", "gzip, zstd").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-encoding"], "zstd");
    let body = r.bytes().await.unwrap();
    assert!(body.len() < blob.len() / 2, "compressed: {} bytes", body.len());
    assert!(zstd::stream::decode_all(&body[..]).unwrap() == blob);
    for accept in ["gzip", "zstd;q=0"] {
        let r = c.get(&url).header("accept-encoding", accept).send().await.unwrap();
        assert!(!r.headers().contains_key("content-encoding"), "{accept}");
        assert!(r.bytes().await.unwrap() == blob, "{accept}");
    }
}

/// With `disable_http_ac_validation`, /ac/ takes any bytes (ccache's
/// entries), kept apart from the action cache gRPC serves.
#[tokio::test]
async fn unvalidated_http_ac_entries_are_kept_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &["--disable-http-ac-validation"]);
    let (c, base) = (http(), format!("http://{}", server.addr));
    let entry = b"\xffccache entry, not a protobuf".to_vec();
    let key = sha256(b"ccache key");
    let url = format!("{base}/team/ac/{key}");
    assert_eq!(c.get(&url).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(c.put(&url).body(entry.clone()).send().await.unwrap().status(), StatusCode::OK);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap() == entry);
    assert_eq!(c.head(&url).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(c.get(format!("{base}/ac/{key}")).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    // gRPC does not see it, and its results do not show through /ac/.
    let mut g = server.clients().await;
    let action = reapi::Digest { hash: key.clone(), size_bytes: 10 };
    let lookup = reapi::GetActionResultRequest {
        instance_name: "team".into(),
        action_digest: Some(action.clone()),
        ..Default::default()
    };
    assert_code(g.ac.get_action_result(lookup.clone()).await, tonic::Code::NotFound);
    g.put_action_result(&action, reapi::ActionResult { exit_code: 3, ..Default::default() }).await;
    let r = c.get(format!("{base}/ac/{key}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "gRPC's results stay apart");
    assert!(c.get(&url).send().await.unwrap().bytes().await.unwrap() == entry);
}

#[tokio::test]
async fn a_blob_written_over_one_protocol_reads_over_the_others() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let mut g = server.clients().await;
    let (a, b, d) = (b"via gRPC".as_slice(), b"via Bazel HTTP".as_slice(), b"via REST".as_slice());
    g.write(&upload_name("", "u", a), a, 4).await.unwrap();
    c.put(format!("{base}/cas/{}", sha256(b))).body(b).send().await.unwrap();
    let update = json!({"requests": [{"digest": jd(d), "data": B64.encode(d)}]});
    post(&c, format!("{base}/v2//blobs:batchUpdate"), update).await;
    for blob in [a, b, d] {
        assert_eq!(g.read(&read_name("", blob), 0, 0).await.unwrap(), blob, "gRPC");
        let got = c.get(format!("{base}/cas/{}", sha256(blob))).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(got, blob, "Bazel HTTP");
        let (_, read) = post(&c, format!("{base}/v2//blobs:batchRead"), json!({"digests": [jd(blob)]})).await;
        assert_eq!(read["responses"][0]["data"], B64.encode(blob), "REST");
    }
}

#[tokio::test]
async fn a_separate_http_port_serves_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &["--http-listen", "127.0.0.1:0"]);
    let http_addr = server.address("HTTP also");
    let c = http();
    let blob = b"one store behind both ports".as_slice();
    c.put(format!("http://{http_addr}/cas/{}", sha256(blob))).body(blob).send().await.unwrap();
    let got = c.get(format!("http://{}/cas/{}", server.addr, sha256(blob))).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap(), blob);
}

#[tokio::test]
async fn a_2_gib_http_put_and_get_stream_in_bounded_memory() {
    let (_tmp, server) = server();
    let c = http();
    const SIZE: usize = 2 << 30;
    const PART: usize = 4 << 20;
    // 512 copies of one part: the hash is computed as they are made.
    let blob = |seed| {
        let part = Bytes::from(random_bytes(PART, seed));
        let mut hasher = larder::digest::Hasher::new(larder::digest::Function::Sha256);
        for _ in 0..SIZE / PART {
            hasher.update(&part);
        }
        let body =
            futures::stream::iter((0..SIZE / PART).map(move |_| Ok::<_, std::io::Error>(part.clone())));
        (hasher.finish().hex(), reqwest::Body::wrap_stream(body))
    };
    let read_all = |url: String| {
        let request = c.get(url);
        async move {
            let mut r = request.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let mut got = 0;
            while let Some(chunk) = r.chunk().await.unwrap() {
                got += chunk.len();
            }
            got
        }
    };
    // Bazel's HTTP cache.
    let (hash, body) = blob(3);
    let url = format!("http://{}/cas/{hash}", server.addr);
    let r = c.put(&url).header("content-length", SIZE).body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(read_all(url).await, SIZE);
    // ByteStream over HTTP.
    let (hash, body) = blob(4);
    let base = format!("http://{}", server.addr);
    let url = format!("{base}/upload/v1/media/uploads/big/blobs/{hash}/{SIZE}?uploadType=media");
    let r = c.post(&url).header("content-length", SIZE).body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(read_all(format!("{base}/v1/media/blobs/{hash}/{SIZE}?alt=media")).await, SIZE);
    let rss = server.peak_rss_bytes();
    assert!(rss < 200 << 20, "peak RSS {} MiB", rss >> 20);
}

/// ByteStream downloads over HTTP (`GET /v1/media/{name}?alt=media`):
/// whole and in byte ranges, in every instance form, of a blob uploaded
/// over gRPC; and every refusal in Google's error form.
#[tokio::test]
async fn media_downloads_whole_and_in_ranges() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let mut g = server.clients().await;
    // Spans several stored chunks, and ends inside one.
    let data = random_bytes((3 << 20) + 12_345, 21);
    g.write(&upload_name("", "media", &data), &data, 1 << 20).await.unwrap();
    let media =
        |instance: &str, data: &[u8]| format!("{base}/v1/media/{}?alt=media", read_name(instance, data));
    let download = |url: String, range: Option<&str>| {
        let mut request = c.get(url);
        if let Some(range) = range {
            request = request.header("range", range);
        }
        async move {
            let r = request.send().await.unwrap();
            let (status, headers) = (r.status(), r.headers().clone());
            (status, headers, r.bytes().await.unwrap())
        }
    };

    let (status, headers, body) = download(media("", &data), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], data.len().to_string().as_str());
    assert_eq!(headers["accept-ranges"], "bytes");
    assert!(body == data, "the whole blob, byte for byte");

    let size = data.len() as u64;
    let cases = [
        ("bytes=0-0", 0, 1),
        ("bytes=1048570-2097160", 1_048_570, 2_097_161),
        ("bytes=3000000-", 3_000_000, size),
        ("bytes=-100", size - 100, size),
        // The client's last chunk asks past the end: clipped.
        ("bytes=3145000-9999999", 3_145_000, size),
    ];
    for (range, start, end) in cases {
        let (status, headers, body) = download(media("", &data), Some(range)).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(headers["content-range"], format!("bytes {start}-{}/{size}", end - 1).as_str(), "{range}");
        assert!(body == data[start as usize..end as usize], "{range}");
    }
    // A range at or past the end: 416, with the size.
    let (status, headers, _) = download(media("", &data), Some(&format!("bytes={size}-"))).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers["content-range"], format!("bytes */{size}").as_str());

    // The empty blob, in every instance form: whole, and 416 for any range.
    for instance in ["", "team", "team/a"] {
        let (status, _, body) = download(media(instance, b""), None).await;
        assert_eq!((status, body.len()), (StatusCode::OK, 0), "{instance:?}");
        let (status, headers, _) = download(media(instance, b""), Some("bytes=0-")).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{instance:?}");
        assert_eq!(headers["content-range"], "bytes */0");
    }
    // A blob uploaded under an instance is read there (the CAS is shared).
    let (status, _, body) = download(media("team/a", &data), Some("bytes=-5")).await;
    assert_eq!((status, &body[..]), (StatusCode::PARTIAL_CONTENT, &data[data.len() - 5..]));

    // Refusals.
    let (status, body) = get(&c, media("", b"never stored")).await;
    error(status, &body, 404, "NOT_FOUND");
    let (status, body) = get(&c, format!("{base}/v1/media/{}", read_name("", &data))).await;
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("alt=media"));
    let (status, body) = get(&c, format!("{base}/v1/media/blobs/nothex/3?alt=media")).await;
    error(status, &body, 400, "INVALID_ARGUMENT");
    let (status, body) = get(&c, format!("{base}/v1/media/{}?alt=media", upload_name("", "u", &data))).await;
    error(status, &body, 400, "INVALID_ARGUMENT");
    let r = c.delete(media("", &data)).send().await.unwrap();
    assert_eq!((r.status(), r.headers()["allow"].to_str().unwrap()), (StatusCode::METHOD_NOT_ALLOWED, "GET"));
}

/// ByteStream uploads over HTTP (`POST /upload/v1/media/{name}?uploadType=media`):
/// verified before they become visible, under any instance, in either
/// encoding, and read back over gRPC.
#[tokio::test]
async fn media_uploads_are_verified_then_visible_over_grpc() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let mut g = server.clients().await;
    let post = |name: &str, query: &str, body: Vec<u8>| {
        let request = c.post(format!("{base}/upload/v1/media/{name}{query}")).body(body);
        async move {
            let r = request.send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let data = random_bytes((2 << 20) + 777, 31);
    for instance in ["", "team/a"] {
        let name = upload_name(instance, "simple", &data);
        let (status, body) = post(&name, "?alt=json&uploadType=media", data.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["resourceName"], name.as_str());
        assert!(g.read(&read_name(instance, &data), 0, 0).await.unwrap() == data, "{instance:?}");
    }
    // Compressed: the body is a zstd stream of the blob.
    let text = text_bytes(300_000, 4);
    let d = digest(&text);
    let name = format!("uploads/z/compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes);
    let (status, body) = post(&name, "?uploadType=media", zstd::bulk::compress(&text, 3).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(g.read(&read_name("", &text), 0, 0).await.unwrap() == text);

    // Bytes that do not hash to the name, too few, too many: 400, and
    // nothing becomes visible.
    let named = random_bytes(5000, 7);
    let name = upload_name("", "bad", &named);
    let cases = [
        ("other bytes", random_bytes(5000, 8)),
        ("too few", named[..4000].to_vec()),
        ("too many", [&named[..], b"x"].concat()),
    ];
    for (i, (what, body)) in cases.into_iter().enumerate() {
        // Each under a name of its own: a refused upload is deleted in the background.
        let (status, body) =
            post(&upload_name("", &format!("bad{i}"), &named), "?uploadType=media", body).await;
        error(status, &body, 400, "INVALID_ARGUMENT");
        assert_eq!(g.find_missing(&[digest(&named)]).await.len(), 1, "{what}: invisible");
    }
    // Refusals.
    let (status, body) = post(&name, "", named.clone()).await;
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("uploadType"));
    let (status, body) = post(&name, "?uploadType=chunked", named.clone()).await;
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("media, multipart or resumable"));
    let (status, body) = post(&name, "?uploadType=multipart", named.clone()).await;
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("multipart/related"));
    let (status, body) = post(&read_name("", &named), "?uploadType=media", named.clone()).await;
    error(status, &body, 400, "INVALID_ARGUMENT");
    let r = c.get(format!("{base}/upload/v1/media/{name}?uploadType=media")).send().await.unwrap();
    assert_eq!(
        (r.status(), r.headers()["allow"].to_str().unwrap()),
        (StatusCode::METHOD_NOT_ALLOWED, "POST, PUT")
    );
}

/// Multipart uploads (`uploadType=multipart`) as Google's Python client
/// writes them (bare LF, a JSON part, then the media) and with CRLF: a
/// payload ending in `\r` is kept intact, and a malformed body stores nothing.
#[tokio::test]
async fn media_multipart_uploads_keep_their_bytes_exactly() {
    let (_tmp, server) = server();
    let (c, base) = (http(), format!("http://{}", server.addr));
    let mut g = server.clients().await;
    let post = |name: &str, boundary: &str, body: Vec<u8>| {
        let content_type = format!("multipart/related; boundary=\"{boundary}\"");
        let request = c
            .post(format!("{base}/upload/v1/media/{name}?alt=json&uploadType=multipart"))
            .header("content-type", content_type)
            .body(body);
        async move {
            let r = request.send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let boundary = "===============0123456789==";
    let lf_encoded = |name: &str, payload: &[u8], encoding: &str| {
        [
            format!("--{boundary}\nContent-Type: application/json\nMIME-Version: 1.0\n\n{{\"resourceName\": \"{name}\"}}\n--{boundary}\nContent-Type: application/octet-stream\nMIME-Version: 1.0\nContent-Transfer-Encoding: {encoding}\n\n").as_bytes(),
            payload,
            format!("\n--{boundary}--\n").as_bytes(),
        ]
        .concat()
    };
    let lf = |name: &str, payload: &[u8]| lf_encoded(name, payload, "binary");
    let mut cr = random_bytes((1 << 20) + 99, 41);
    cr.push(b'\r');
    let payloads = [cr, b"\r\n--not the boundary\r\n".to_vec(), Vec::new()];
    for (i, payload) in payloads.iter().enumerate() {
        let name = upload_name("team/a", &format!("m{i}"), payload);
        let (status, body) = post(&name, boundary, lf(&name, payload)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["resourceName"], name.as_str());
        assert!(g.read(&read_name("team/a", payload), 0, 0).await.unwrap() == *payload, "payload {i}");
    }
    // CRLF line ends, a preamble, no metadata part.
    let payload = text_bytes(100_000, 5);
    let name = upload_name("", "crlf", &payload);
    let body =
        [b"preamble\r\n--xyz\r\nContent-Type: text/plain\r\n\r\n".as_slice(), &payload, b"\r\n--xyz--\r\n"]
            .concat();
    let (status, body) = post(&name, "xyz", body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(g.read(&read_name("", &payload), 0, 0).await.unwrap() == payload);

    // No closing delimiter, a base64 part, bytes not matching the name:
    // 400, and nothing visible.
    let named = random_bytes(70_000, 42);
    let mut unclosed = lf("x", &named);
    unclosed.truncate(unclosed.len() - boundary.len() - 5);
    let mut other = named.clone();
    other[5] ^= 1;
    let cases = [
        ("unclosed", unclosed, "closing delimiter"),
        ("base64", lf_encoded("x", &named, "base64"), "as binary"),
        ("other bytes", lf("x", &other), "hash to"),
    ];
    for (i, (what, body, needle)) in cases.into_iter().enumerate() {
        let (status, body) = post(&upload_name("", &format!("bad{i}"), &named), boundary, body).await;
        let message = error(status, &body, 400, "INVALID_ARGUMENT");
        assert!(message.contains(needle), "{what}: {message}");
        assert_eq!(g.find_missing(&[digest(&named)]).await.len(), 1, "{what}: invisible");
    }
}

/// A client that sees 308 as an answer, not a redirect.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().http1_only().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// A PUT to an upload session: the status, the `Range` it acknowledges,
/// and the body.
async fn put_chunk(
    c: &reqwest::Client,
    url: &str,
    range: String,
    body: Vec<u8>,
) -> (u16, Option<String>, String) {
    let r = c.put(url).header("content-range", range).body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let acknowledged = r.headers().get("range").map(|v| v.to_str().unwrap().to_string());
    (status, acknowledged, r.text().await.unwrap())
}

/// Resumable uploads (`uploadType=resumable`): a 64 MiB blob in uneven
/// chunks, with a chunk that breaks off, one that overlaps what is
/// committed, and a restart of larder in the middle; status queries answer
/// exactly what the last 308 acknowledged.
#[tokio::test]
async fn media_resumable_uploads_resume_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = TestServer::start(&dir, &[]);
    let c = no_redirects();
    let data = random_bytes(64 << 20, 51);
    let size = data.len();
    let name = upload_name("team/a", "resumable", &data);

    // Started on Google's resumable path: an absolute session URI.
    let r = c
        .post(format!("http://{}/resumable/upload/v1/media/{name}?uploadType=resumable", server.addr))
        .header("x-upload-content-length", size.to_string())
        .header("x-upload-content-type", "application/octet-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, format!("http://{}/upload/v1/media/{name}?uploadType=resumable", server.addr));
    let path = location.split_once(&server.addr).unwrap().1.to_string();
    let query = format!("bytes */{size}");

    // Nothing committed: 308 without a Range.
    assert_eq!(put_chunk(&c, &location, query.clone(), vec![]).await, (308, None, String::new()));
    let first = 10_000_019;
    let (status, range, _) =
        put_chunk(&c, &location, format!("bytes 0-{}/{size}", first - 1), data[..first].to_vec()).await;
    assert_eq!((status, range.as_deref()), (308, Some(format!("bytes=0-{}", first - 1).as_str())));

    // A chunk that breaks off: what arrived is committed.
    let sent = 3_000_001;
    {
        let mut stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nhost: {}\r\ncontent-range: bytes {first}-{}/{size}\r\ncontent-length: {}\r\n\r\n",
            server.addr,
            size - 1,
            size - first
        );
        use tokio::io::AsyncWriteExt;
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&data[first..first + sent]).await.unwrap();
        stream.flush().await.unwrap();
    }
    let committed = first + sent;
    let acknowledged = format!("bytes=0-{}", committed - 1);
    // The broken chunk may still be on its way in: asked again until it is.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, range, _) = put_chunk(&c, &location, query.clone(), vec![]).await;
        if (status, range.as_deref()) == (308, Some(acknowledged.as_str())) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the broken chunk was not kept: {status} {range:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // larder restarts on the same data directory: the session is where it was.
    server.stop();
    let server = TestServer::start(&dir, &[]);
    let location = format!("http://{}{path}", server.addr);
    let (status, range, _) = put_chunk(&c, &location, query.clone(), vec![]).await;
    assert_eq!((status, range.as_deref()), (308, Some(acknowledged.as_str())));

    // A chunk past what is committed is refused; one that overlaps it is
    // taken from where the session stands.
    let (status, _, body) =
        put_chunk(&c, &location, format!("bytes {}-{}/{size}", committed + 1, committed + 9), vec![0; 9])
            .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(&format!("past the {committed} bytes committed")), "{body}");
    let mut at = committed - 1000;
    for length in [7 << 20, (20 << 20) - 5, 1, 12_345_678] {
        let end = at + length;
        let (status, range, body) =
            put_chunk(&c, &location, format!("bytes {at}-{}/{size}", end - 1), data[at..end].to_vec()).await;
        assert_eq!((status, range), (308, Some(format!("bytes=0-{}", end - 1))), "{body}");
        at = end;
    }
    let (status, range, body) =
        put_chunk(&c, &location, format!("bytes {at}-{}/{size}", size - 1), data[at..].to_vec()).await;
    assert_eq!((status, range), (200, None), "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["resourceName"], name.as_str());
    let (status, _, body) = put_chunk(&c, &location, query.clone(), vec![]).await;
    assert_eq!(status, 200, "a finished session answers 200: {body}");
    let mut g = server.clients().await;
    assert!(g.read(&read_name("team/a", &data), 0, 0).await.unwrap() == data, "read back over ByteStream");

    // The empty blob: a status query finishes it.
    let empty = upload_name("", "empty", b"");
    let base = format!("http://{}", server.addr);
    let r = c.post(format!("{base}/upload/v1/media/{empty}?uploadType=resumable")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let (status, _, body) = put_chunk(&c, &location, "bytes */0".into(), vec![]).await;
    assert_eq!(status, 200, "{body}");

    // Refusals.
    let other = upload_name("", "other", b"four");
    let r = c
        .post(format!("{base}/upload/v1/media/{other}?uploadType=resumable"))
        .header("x-upload-content-length", "5")
        .send()
        .await
        .unwrap();
    let (status, body) = (r.status(), r.json::<Value>().await.unwrap());
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("X-Upload-Content-Length"));
    let d = digest(b"four");
    let compressed = format!("uploads/z/compressed-blobs/zstd/{}/4", d.hash);
    let r = c.post(format!("{base}/upload/v1/media/{compressed}?uploadType=resumable")).send().await.unwrap();
    let (status, body) = (r.status(), r.json::<Value>().await.unwrap());
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("compressed"));
    let session = format!("{base}/upload/v1/media/{other}?uploadType=resumable");
    let r = c.put(&session).body("four").send().await.unwrap();
    let (status, body) = (r.status(), r.json::<Value>().await.unwrap());
    assert!(error(status, &body, 400, "INVALID_ARGUMENT").contains("Content-Range"));
    let (status, _, body) = put_chunk(&c, &session, "bytes 0-3/5".into(), b"four".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("total other than"), "{body}");
}

/// One HTTP/1.1 exchange on an open connection: writes the request while
/// reading the answer (the server may answer before it reads the body),
/// and returns its status, its head (lowercase) and its body.
async fn exchange(stream: &mut tokio::net::TcpStream, head: String, body: &[u8]) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut reader, mut writer) = stream.split();
    let write = async {
        // The server may close its end before it reads all of the body.
        let _ = writer.write_all(head.as_bytes()).await;
        let _ = writer.write_all(body).await;
    };
    let read = async {
        let mut answer = Vec::new();
        let mut buffer = vec![0u8; 64 << 10];
        let head_end = loop {
            if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = reader.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the connection closed before an answer");
            answer.extend_from_slice(&buffer[..n]);
        };
        let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while answer.len() < head_end + length {
            let n = reader.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the connection closed inside an answer");
            answer.extend_from_slice(&buffer[..n]);
        }
        let status = head[9..12].parse().unwrap();
        (status, head, answer[head_end..].to_vec())
    };
    let ((), answer) = tokio::join!(write, read);
    answer
}

/// Answers sent before a request's body is read: a blob already stored
/// drains the body and keeps the connection, as does a refusal of a small
/// body; a refusal of a large body says `Connection: close`, so the client
/// does not send its next request into a closed connection.
#[tokio::test]
async fn early_answers_keep_or_close_the_connection_honestly() {
    let (_tmp, server) = server();
    let mut g = server.clients().await;
    let blob = random_bytes(2 << 20, 61);
    g.write(&upload_name("", "stored", &blob), &blob, 1 << 20).await.unwrap();
    let hash = sha256(&blob);
    let host = &server.addr;

    // Stored already: the PUT's body is drained, and the connection serves
    // the next request.
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let put = format!("PUT /cas/{hash} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n\r\n", blob.len());
    let (status, head, _) = exchange(&mut stream, put, &blob).await;
    assert_eq!(status, 200, "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let name = upload_name("", "again", &blob);
    let post = format!(
        "POST /upload/v1/media/{name}?uploadType=media HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n\r\n",
        blob.len()
    );
    let (status, head, _) = exchange(&mut stream, post, &blob).await;
    assert_eq!(status, 200, "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let get = format!("GET /cas/{hash} HTTP/1.1\r\nhost: {host}\r\n\r\n");
    let (status, _, body) = exchange(&mut stream, get, &[]).await;
    assert!(status == 200 && body == blob, "the same connection serves a third request");

    // Refused before its body is read: a body of a few MiB is drained
    // first, and the connection serves the next request; a larger one is
    // left, and the answer closes the connection.
    let refusals = [
        ("no route", "POST /no/such/route HTTP/1.1"),
        ("a malformed name", "POST /upload/v1/media/uploads/u/blobs/nothex/9?uploadType=media HTTP/1.1"),
        ("a wrong method", "POST /cas/00 HTTP/1.1"),
    ];
    for (what, request) in refusals {
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let head = format!("{request}\r\nhost: {host}\r\ncontent-length: {}\r\n\r\n", blob.len());
        let (status, head, _) = exchange(&mut stream, head, &blob).await;
        assert!(status >= 400, "{what}: {head}");
        assert!(!head.contains("connection: close"), "{what}: {head}");
        let get = format!("GET /cas/{hash} HTTP/1.1\r\nhost: {host}\r\n\r\n");
        let (status, _, body) = exchange(&mut stream, get, &[]).await;
        assert!(status == 200 && body == blob, "{what}: the connection serves the next request");
        // 64 MiB declared, none sent: answered at once, and closed.
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let head = format!("{request}\r\nhost: {host}\r\ncontent-length: {}\r\n\r\n", 64 << 20);
        let (status, head, _) = exchange(&mut stream, head, &[]).await;
        assert!(status >= 400, "{what}: {head}");
        assert!(head.contains("connection: close"), "{what}: {head}");
    }
    // A body read before it is refused leaves the connection open.
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let body = b"{not json";
    let head = format!(
        "POST /v2//blobs:findMissing HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let (status, head, _) = exchange(&mut stream, head, body).await;
    assert_eq!(status, 400, "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let get = format!("GET /cas/{hash} HTTP/1.1\r\nhost: {host}\r\n\r\n");
    let (status, _, _) = exchange(&mut stream, get, &[]).await;
    assert_eq!(status, 200);
}
