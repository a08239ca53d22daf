//! A hostile or careless client against `larder serve`: every case ends in a
//! precise refusal and a bounded cost, and the server keeps serving. (The
//! object store's hostile objects are in tests/s3.rs.)

mod common;

use common::*;
use larder::proto::bytestream::ReadRequest;
use larder::proto::reapi;
use tonic::Code;

fn server(extra: &[&str]) -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), extra);
    (tmp, server)
}

/// REAPI: the size is part of a digest. A result stored for one size of an
/// action is a miss for any other; Bazel's HTTP cache, which has no size,
/// still shares results with gRPC.
#[tokio::test]
async fn an_action_digest_with_the_wrong_size_is_a_miss() {
    let (_tmp, server) = server(&[]);
    let mut c = server.clients().await;
    let stdout = b"compiled".as_slice();
    assert_eq!(c.batch_update(&[stdout]).await, vec![0]);
    let action = digest(b"an action");
    let result = reapi::ActionResult { stdout_digest: Some(digest(stdout)), ..Default::default() };
    c.put_action_result(&action, result.clone()).await;
    let get =
        |d: reapi::Digest| reapi::GetActionResultRequest { action_digest: Some(d), ..Default::default() };
    assert_eq!(c.ac.get_action_result(get(action.clone())).await.unwrap().into_inner(), result);
    for size in [action.size_bytes + 1, action.size_bytes - 1, 0] {
        let wrong = reapi::Digest { size_bytes: size, ..action.clone() };
        assert_code(c.ac.get_action_result(get(wrong)).await, Code::NotFound);
    }

    // Bazel's HTTP cache names the action by hash alone: a hit either way.
    let http = reqwest::Client::new();
    let url = |hash: &str| format!("http://{}/ac/{hash}", server.addr);
    let got = http.get(url(&action.hash)).send().await.unwrap();
    assert_eq!(got.status(), 200);
    let other = digest(b"another action");
    let body = prost::Message::encode_to_vec(&result);
    assert_eq!(http.put(url(&other.hash)).body(body).send().await.unwrap().status(), 200);
    let hit = c.ac.get_action_result(get(other.clone())).await.unwrap().into_inner();
    assert_eq!(hit, result, "a result stored over HTTP has no size to differ");
}

#[tokio::test]
async fn uploads_are_neither_queried_unseen_nor_read() {
    let (_tmp, server) = server(&[]);
    let mut c = server.clients().await;
    let data = text_bytes(10_000, 1);
    let name = upload_name("", "never-started", &data);
    let status = assert_code(
        c.bs.query_write_status(larder::proto::bytestream::QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await,
        Code::NotFound,
    );
    assert!(status.message().contains("no upload"), "{}", status.message());

    assert!(c.write(&name, &data, 4096).await.is_ok());
    // The blob is stored, and its upload's name is still not a read name.
    for upload in [name.as_str(), &upload_name("team", "u1", &data)] {
        let read = ReadRequest { resource_name: upload.to_string(), ..Default::default() };
        let status = assert_code(c.bs.read(read).await, Code::InvalidArgument);
        assert!(status.message().contains("names an upload"), "{}", status.message());
    }
    assert_eq!(c.read(&read_name("", &data), 0, 0).await.unwrap(), data);
}

/// Case 2: a few megabytes of two-byte entries once cost a struct, a status
/// and a response each. Now they are counted on the wire and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_entry_counts_are_refused_before_they_are_decoded() {
    let (_tmp, server) = server(&[]);
    let c = server.clients().await;
    // 2 million empty digests: a 4 MB BatchReadBlobs, three at once.
    let reads = (0..3).map(|_| {
        let mut cas = c.cas.clone();
        let request = reapi::BatchReadBlobsRequest {
            digests: vec![reapi::Digest::default(); 2_000_000],
            ..Default::default()
        };
        tokio::spawn(async move { cas.batch_read_blobs(request).await })
    });
    for read in futures::future::join_all(reads).await {
        let status = assert_code(read.unwrap(), Code::InvalidArgument);
        assert!(status.message().contains("max_call_entries"), "{}", status.message());
    }
    // 4 million for FindMissingBlobs (8 MB), and a BatchUpdateBlobs.
    let mut cas = c.cas.clone();
    let find = reapi::FindMissingBlobsRequest {
        blob_digests: vec![reapi::Digest::default(); 4_000_000],
        ..Default::default()
    };
    let status = assert_code(cas.find_missing_blobs(find).await, Code::InvalidArgument);
    assert!(status.message().contains("max_call_entries"), "{}", status.message());
    let update = reapi::BatchUpdateBlobsRequest {
        requests: vec![Default::default(); 1_000_000],
        ..Default::default()
    };
    assert_code(cas.batch_update_blobs(update).await, Code::InvalidArgument);

    // The REST form: 600 KB of `{},`.
    let body = format!("{{\"digests\":[{}{{}}]}}", "{},".repeat(200_000));
    let url = format!("http://{}/v2/blobs:batchRead", server.addr);
    let response = reqwest::Client::new().post(url).body(body).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(text.contains("max_call_entries") && text.len() < 1000, "{text}");

    // Calls within the limit still work.
    let data = b"still serving".as_slice();
    assert_eq!(server.clients().await.batch_update(&[data]).await, vec![0]);
    let peak = server.peak_rss_bytes();
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);
}

/// Case 4: GetTree and GetActionResult once read any blob whole as a
/// directory, and answered OK with an empty tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_blobs_are_capped_and_a_root_must_be_a_directory() {
    let (_tmp, server) = server(&[]);
    let mut c = server.clients().await;
    let large = vec![7u8; 256 << 20];
    c.write(&upload_name("", "large", &large), &large, 1 << 20).await.unwrap();
    let tree = |root: reapi::Digest| reapi::GetTreeRequest { root_digest: Some(root), ..Default::default() };
    let calls = (0..4).map(|_| {
        let (mut cas, request) = (c.cas.clone(), tree(digest(&large)));
        tokio::spawn(async move { cas.get_tree(request).await.map(|_| ()) })
    });
    for call in futures::future::join_all(calls).await {
        let status = assert_code(call.unwrap(), Code::FailedPrecondition);
        assert!(status.message().contains("max_directory_size"), "{}", status.message());
    }
    let action = digest(b"outputs a huge tree");
    let output = |tree: bool| reapi::OutputDirectory {
        path: "out".into(),
        tree_digest: tree.then(|| digest(&large)),
        root_directory_digest: (!tree).then(|| digest(&large)),
        ..Default::default()
    };
    for tree in [true, false] {
        let result = reapi::ActionResult { output_directories: vec![output(tree)], ..Default::default() };
        c.put_action_result(&action, result).await;
        let get = reapi::GetActionResultRequest { action_digest: Some(action.clone()), ..Default::default() };
        let status = assert_code(c.ac.get_action_result(get).await, Code::FailedPrecondition);
        assert!(status.message().contains("max_directory_size"), "{}", status.message());
    }
    let peak = server.peak_rss_bytes();
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);

    // A root that is not a Directory is an error, not an empty tree.
    // (Bytes that are no protobuf at all: prost skips unknown fields, so
    // much text would decode as some Directory.)
    let text = [0xffu8; 40].as_slice();
    assert_eq!(c.batch_update(&[text]).await, vec![0]);
    let mut stream = c.cas.get_tree(tree(digest(text))).await.unwrap().into_inner();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("is not a Directory"), "{}", status.message());
}

/// Case 5: action results once went around the size budget: all admitted,
/// never evicted, and every blob write refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_results_live_inside_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("larder.toml");
    std::fs::write(&config, "max_size = \"16MiB\"\neviction_min_age = \"0s\"\n").unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &["--config", config.to_str().unwrap()]);
    let mut c = server.clients().await;
    let (mut stored, mut refused, mut peak) = (0, 0, 0u64);
    for i in 0..80u32 {
        let result = reapi::ActionResult {
            stdout_raw: random_bytes(1 << 20, u64::from(i)).into(),
            ..Default::default()
        };
        let request = reapi::UpdateActionResultRequest {
            action_digest: Some(digest(&i.to_le_bytes())),
            action_result: Some(result),
            ..Default::default()
        };
        match c.ac.update_action_result(request).await {
            Ok(_) => stored += 1,
            Err(status) if status.code() == Code::ResourceExhausted => {
                refused += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(status) => panic!("UpdateActionResult: {status:?}"),
        }
        peak = peak.max(dir_bytes(&server.dir));
    }
    eprintln!(
        "80 results of 1 MiB: {stored} stored, {refused} refused, the directory peaked at {} MiB",
        peak >> 20
    );
    assert!(stored > 16, "eviction made room again and again: {stored} stored, {refused} refused");
    assert!(peak < 24 << 20, "the data directory peaked at {} MiB", peak >> 20);
    // Old results were evicted, not kept around the budget.
    let get = |i: u32| reapi::GetActionResultRequest {
        action_digest: Some(digest(&i.to_le_bytes())),
        ..Default::default()
    };
    assert_code(c.ac.get_action_result(get(0)).await, Code::NotFound);
    // And blobs are stored again once eviction has caught up.
    let blob = random_bytes(1 << 20, 999);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match c.write(&upload_name("", "after", &blob), &blob, 256 << 10).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "blob writes never came back: {status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(status) => panic!("write: {status:?}"),
        }
    }
    let metrics =
        reqwest::get(format!("http://{}/metrics", server.addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("larder_evicted_bytes_total"), "{metrics}");
}

/// Bytes of the files in a directory and its subdirectories.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
