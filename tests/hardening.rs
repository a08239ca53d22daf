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
    eprintln!("2 million entries, three calls at once, and the REST form: peak RSS {} MiB", peak >> 20);
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
    eprintln!("a 256 MiB root, four GetTree calls and two GetActionResult: peak RSS {} MiB", peak >> 20);
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
    // Bounded, where it grew with every write (81 MiB); how close writes at
    // full speed keep to the budget itself is issue 16's.
    assert!(peak < 32 << 20, "the data directory peaked at {} MiB", peak >> 20);
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

/// A server whose config sets `toml` (besides the data directory).
fn server_with(toml: &str, extra: &[&str]) -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("larder.toml");
    std::fs::write(&config, toml).unwrap();
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let server = TestServer::start(&tmp.path().join("data"), &args);
    (tmp, server)
}

/// Reads until the server closes the connection; false if it is still open
/// after `wait`.
async fn closed_within(socket: &mut tokio::net::TcpStream, wait: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // an HTTP/2 server's SETTINGS, say
            Err(_) => return false,
        }
    }
}

/// Case 6: silent, half-sent and preface-only connections were all still
/// open after 65 s, and under `ulimit -n 256` idle sockets starved /healthz.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_cannot_starve_the_server() {
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("larder.toml");
    std::fs::write(&config, "header_timeout = \"2s\"\nidle_timeout = \"4s\"\n").unwrap();
    let log = tmp.path().join("larder.log");
    let server = TestServer::start_with_open_files(
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &log,
        256,
    );
    let mut sockets = Vec::new();
    // An HTTP/2 preface and an empty SETTINGS frame, then nothing.
    let preface = [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat();
    for i in 0..290 {
        let mut socket = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        match i % 3 {
            0 => {}
            1 => socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: larder\r\n").await.unwrap(),
            _ => socket.write_all(&preface).await.unwrap(),
        }
        sockets.push(socket);
    }
    // More sockets than the server may open: /healthz still answers, once
    // the silent ones are closed.
    let started = std::time::Instant::now();
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build().unwrap();
    let health = client.get(format!("http://{}/healthz", server.addr)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    eprintln!("/healthz answered after {:.1}s behind 290 idle sockets", started.elapsed().as_secs_f64());
    for (i, socket) in sockets.iter_mut().enumerate() {
        assert!(closed_within(socket, std::time::Duration::from_secs(60)).await, "socket {i} is still open");
    }
    // A connection that made a call is kept between calls for a while...
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("http://{}/healthz", server.addr)).send().await.unwrap().status(), 200);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("open files: up to 256"), "{log_text}");
    let noisy = log_text.lines().filter(|l| l.contains("cannot accept")).count();
    assert!(noisy <= 15, "{noisy} lines about accepting");
}

/// Case 9: a Write that stalls once held its partial upload forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_ended_and_its_bytes_kept_to_resume() {
    let toml = "header_timeout = \"2s\"\nidle_timeout = \"3s\"\npartial_upload_max_age = \"3s\"\n";
    let (_tmp, server) = server_with(toml, &[]);
    let mut c = server.clients().await;
    let data = random_bytes(300_000, 5);
    let name = upload_name("", "stalls", &data);
    // The first 100,000 bytes, then nothing, on a stream that stays open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for message in write_messages(&name, &data[..100_000], 0, 50_000, false) {
        tx.send(message).await.unwrap();
    }
    let started = std::time::Instant::now();
    let status = assert_code(
        c.bs.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await,
        Code::DeadlineExceeded,
    );
    assert!(status.message().contains("idle_timeout"), "{}", status.message());
    eprintln!("a stalled Write ended after {:.1}s", started.elapsed().as_secs_f64());
    drop(tx);
    // What arrived was kept: the client may resume...
    assert_eq!(c.query(&name).await, (100_000, false));
    // ...and, left alone, it expires like any partial upload.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while c.upload_status(&name).await.is_some() {
        assert!(std::time::Instant::now() < deadline, "the partial upload never expired");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // An HTTP PUT that stalls halfway is ended the same way.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let head = format!(
        "PUT /cas/{} HTTP/1.1\r\nHost: larder\r\nContent-Length: {}\r\n\r\n",
        digest(&data).hash,
        data.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&data[..1000]).await.unwrap();
    let mut reply = vec![0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(60), socket.read(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 504"), "{reply}");
}

/// Case 3: Read streams that are never read once pinned about 4 MiB each
/// (199 streams per connection on a 16 MiB blob: 881 MB for one connection,
/// 2.52 GB for three). Now a read holds about a chunk, all reads together
/// stay within max_inflight_bytes, and a client that takes nothing has its
/// connection closed after idle_timeout. The budget is half the default
/// here: with the default 256 MiB, all of it held left 44 MiB of the bound
/// for everything else, and a CI run measured exactly 300 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_reads_are_bounded_and_then_closed() {
    let config = "header_timeout = \"2s\"\nidle_timeout = \"6s\"\nmax_inflight_bytes = \"128MiB\"\n";
    let (_tmp, server) = server_with(config, &[]);
    let blob = random_bytes(16 << 20, 77);
    let mut c = server.clients().await;
    c.write(&upload_name("", "big", &blob), &blob, 1 << 20).await.unwrap();
    let name = read_name("", &blob);
    let mut streams = Vec::new();
    for _ in 0..3 {
        // A connection of its own, with HTTP/2's default 64 KiB windows: the
        // server can send little before it must wait on this client.
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let bs = larder::proto::bytestream::byte_stream_client::ByteStreamClient::new(channel);
        for _ in 0..199 {
            let (mut bs, name) = (bs.clone(), name.clone());
            streams.push(tokio::spawn(async move {
                let read = ReadRequest { resource_name: name, ..Default::default() };
                // Opened, and never read.
                let opened = bs.read(read).await;
                tokio::time::sleep(std::time::Duration::from_secs(120)).await;
                drop(opened);
            }));
        }
    }
    let mut peak = 0;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        peak = peak.max(server.peak_rss_bytes());
    }
    eprintln!("597 unread reads of a 16 MiB blob: peak RSS {} MiB", peak >> 20);
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);
    // Everyone else is still served.
    let mut fresh = server.clients().await;
    let small = b"served meanwhile".as_slice();
    assert_eq!(fresh.batch_update(&[small]).await, vec![0]);
    assert_eq!(fresh.read(&read_name("", small), 0, 0).await.unwrap(), small);
    for stream in streams {
        stream.abort();
    }
    assert_eq!(fresh.read(&name, 0, 0).await.unwrap(), blob);
}

/// An HTTP/1.1 client that asks for a large blob and takes nothing: hyper
/// stops reading while it writes a reply, so only the write side can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_that_takes_nothing_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_tmp, server) = server_with("header_timeout = \"2s\"\nidle_timeout = \"3s\"\n", &[]);
    let blob = random_bytes(16 << 20, 78);
    let url = format!("http://{}/cas/{}", server.addr, digest(&blob).hash);
    assert_eq!(reqwest::Client::new().put(&url).body(blob.clone()).send().await.unwrap().status(), 200);
    let mut socket = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let request = format!("GET /cas/{} HTTP/1.1\r\nHost: larder\r\n\r\nX", digest(&blob).hash);
    socket.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    // Whatever the socket buffers held, and then the end: not the blob.
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(60), socket.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the connection was never closed");
    assert!(received.len() < blob.len(), "the whole blob was sent: the stalled reply was not ended");
}

/// `max_blob_size` is advertised (max_cas_blob_size_bytes) and every upload
/// path refuses a larger blob with INVALID_ARGUMENT, storing none of it.
#[tokio::test]
async fn uploads_over_max_blob_size_are_refused_on_every_path() {
    let (_tmp, server) = server(&["--max-blob-size", "1MiB"]);
    let mut c = server.clients().await;
    let caps = c.caps.get_capabilities(reapi::GetCapabilitiesRequest::default()).await.unwrap().into_inner();
    assert_eq!(caps.cache_capabilities.unwrap().max_cas_blob_size_bytes, 1 << 20);
    let (big, small) = (random_bytes((1 << 20) + 1, 90), random_bytes(1 << 20, 91));

    let refused =
        assert_code(c.write(&upload_name("", "big", &big), &big, 256 << 10).await, Code::InvalidArgument);
    assert!(refused.message().contains("max_blob_size"), "{}", refused.message());
    assert_eq!(c.batch_update(&[&big, &small]).await, [Code::InvalidArgument as i32, 0]);
    let http = reqwest::Client::new();
    let url = format!("http://{}/cas/{}", server.addr, digest(&big).hash);
    assert_eq!(http.put(&url).body(big.clone()).send().await.unwrap().status(), 400);
    let media =
        format!("http://{}/upload/v1/media/{}?uploadType=media", server.addr, upload_name("", "m", &big));
    assert_eq!(http.post(&media).body(big.clone()).send().await.unwrap().status(), 400);
    // Spliced from chunks that are each small enough.
    let (head, tail) = big.split_at(600_000);
    assert_eq!(c.batch_update(&[head, tail]).await, [0, 0]);
    let splice = reapi::SpliceBlobRequest {
        blob_digest: Some(digest(&big)),
        chunk_digests: vec![digest(head), digest(tail)],
        ..Default::default()
    };
    assert_code(c.cas.splice_blob(splice).await, Code::InvalidArgument);
    assert_eq!(c.find_missing(&[digest(&big)]).await.len(), 1, "nothing stored");
    assert!(c.find_missing(&[digest(&small)]).await.is_empty(), "a blob at the limit is stored");
}
