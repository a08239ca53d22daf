//! Restarts, crashes and memory bounds of `larder serve` on one data directory.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use larder::proto::bytestream::{ReadRequest, WriteRequest};
use larder::proto::reapi;
use sha2::{Digest as _, Sha256};

#[tokio::test]
async fn an_upload_resumes_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let data = random_bytes(3_000_000, 21);
    let name = upload_name("", "restart", &data);
    let server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    let first = write_messages(&name, &data[..1_700_000], 0, 100_000, false);
    assert_eq!(c.bs.write(tokio_stream::iter(first)).await.unwrap().into_inner().committed_size, 1_700_000);
    let action = digest(b"an action");
    c.ac.update_action_result(reapi::UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(reapi::ActionResult { exit_code: 3, ..Default::default() }),
        ..Default::default()
    })
    .await
    .unwrap();
    server.kill();

    let server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    assert_eq!(c.query(&name).await, (1_700_000, false));
    let rest = write_messages(&name, &data, 1_700_000, 100_000, true);
    c.bs.write(tokio_stream::iter(rest)).await.unwrap();
    assert_eq!(c.read(&read_name("", &data), 0, 0).await.unwrap(), data);
    let request = reapi::GetActionResultRequest { action_digest: Some(action), ..Default::default() };
    assert_eq!(c.ac.get_action_result(request).await.unwrap().into_inner().exit_code, 3);
    drop(c);
    // Off the runtime: the client's connection task must run to answer the
    // server's goodbye, or the drain would wait for it.
    let status = tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
    assert!(status.success(), "SIGTERM exits cleanly");
}

#[tokio::test]
async fn stale_partial_uploads_expire() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("larder.toml");
    // Expiry counts whole seconds: 3 s leaves at least 2 s to query.
    std::fs::write(&config, "partial_upload_max_age = \"3s\"\n").unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &["--config", config.to_str().unwrap()]);
    let mut c = server.clients().await;
    let data = text_bytes(50_000, 1);
    let name = upload_name("", "stale", &data);
    let first = write_messages(&name, &data[..20_000], 0, 20_000, false);
    c.bs.write(tokio_stream::iter(first)).await.unwrap();
    assert_eq!(c.query(&name).await, (20_000, false));
    let mut expired = false;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if c.upload_status(&name).await.is_none() {
            expired = true;
            break;
        }
    }
    assert!(expired, "the partial upload was deleted after its max age");
}

/// Uploads `data` in three chunks (each in a batch), then splices it.
async fn splice(c: &mut Clients, data: &[u8]) -> Result<(), tonic::Status> {
    let cuts = [0, data.len() / 3, data.len() * 2 / 3, data.len()];
    let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
    for piece in &pieces {
        let request = reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(digest(piece)),
                data: piece.to_vec().into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        c.cas.batch_update_blobs(request).await?;
    }
    let request = reapi::SpliceBlobRequest {
        blob_digest: Some(digest(data)),
        chunk_digests: pieces.iter().map(|p| digest(p)).collect(),
        ..Default::default()
    };
    c.cas.splice_blob(request).await.map(|_| ())
}

/// What an upload of `data` commits while its stream stays open after
/// `sent` bytes: its whole 1 MiB storage chunks; or, for a blob cut into
/// content-defined chunks, every chunk with the largest chunk's worth of
/// bytes after its start (what a cut needs to see).
fn committed_while_open(data: &[u8], sent: u64) -> u64 {
    if (data.len() as u64) < 4 << 20 {
        return sent / (1 << 20) * (1 << 20);
    }
    let chunking = larder::store::Store::chunking();
    let mut end = 0;
    for len in chunking.split(data) {
        if sent - end < chunking.window() as u64 {
            break;
        }
        end += len as u64;
    }
    end
}

/// kill -9 while many uploads run: afterwards every blob reported present
/// reads back byte-identical, and every interrupted upload resumes or starts
/// over cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_uploads_loses_nothing_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = TestServer::start(&dir, &[]);
    // Blobs under 256 KiB live in RocksDB, larger ones in files of their
    // own: both must survive the kill.
    let blobs: Vec<Vec<u8>> = (0..48)
        .map(|i| match i % 4 {
            0 => random_bytes(10_000_000 + i * 7_919, i as u64),
            1 => random_bytes(1_500_000 + i * 7_919, i as u64),
            2 => random_bytes(200_000 + i * 1_000, i as u64),
            _ => text_bytes(900_000 + i * 31, i as u64),
        })
        .collect();
    let mut tasks = Vec::new();
    for worker in 0..6 {
        let addr = server.addr.clone();
        let mine: Vec<(usize, Vec<u8>)> =
            blobs.iter().cloned().enumerate().filter(|(i, _)| i % 6 == worker).collect();
        tasks.push(tokio::spawn(async move {
            let mut c = Clients::connect(&addr).await;
            for (i, data) in mine {
                let _ = c.write(&upload_name("", &format!("crash-{i}"), &data), &data, 64 << 10).await;
            }
        }));
    }
    // Blobs made by SpliceBlob of chunks uploaded in batches, then split,
    // one after another until the kill: splices, splits (which store their
    // chunks) and cut uploads are all under way when it comes.
    let spliced = |i: usize| random_bytes(4_500_000 + i * 4_099, 200 + i as u64);
    let started = Arc::new(AtomicUsize::new(0));
    {
        let (addr, started) = (server.addr.clone(), Arc::clone(&started));
        tasks.push(tokio::spawn(async move {
            let mut c = Clients::connect(&addr).await;
            for i in 0..200 {
                started.store(i + 1, Ordering::SeqCst);
                let data = spliced(i);
                if splice(&mut c, &data).await.is_err() {
                    return;
                }
                let request =
                    reapi::SplitBlobRequest { blob_digest: Some(digest(&data)), ..Default::default() };
                if c.cas.split_blob(request).await.is_err() {
                    return;
                }
            }
        }));
    }
    // Uploads the test holds open midway, of a few sizes: whole blobs, and
    // blobs of dedup_min_size or more, cut into chunks as they arrive.
    let held: Vec<Vec<u8>> = [3_500_000, 3_900_000, 12_000_000, 13_000_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| random_bytes(n, 100 + i as u64))
        .collect();
    let mut held_streams = Vec::new();
    let mut c = server.clients().await;
    for (i, data) in held.iter().enumerate() {
        let name = upload_name("", &format!("held-{i}"), data);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        for m in write_messages(&name, &data[..(3 << 20) + 1000], 0, 64 << 10, false) {
            tx.send(m).await.unwrap();
        }
        let mut bs = c.bs.clone();
        held_streams.push((
            tx,
            tokio::spawn(async move { bs.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await }),
        ));
    }
    let mut before = Vec::new();
    for (i, data) in held.iter().enumerate() {
        let name = upload_name("", &format!("held-{i}"), data);
        let expected = committed_while_open(data, 3 << 20) as i64;
        let mut committed = 0;
        for _ in 0..200 {
            committed = c.query(&name).await.0;
            if committed == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(committed, expected, "held upload {i} committed its full chunks");
        before.push(committed);
    }
    // And a few of the background uploads finished.
    let digests: Vec<reapi::Digest> = blobs.iter().map(|b| digest(b)).collect();
    for _ in 0..500 {
        if blobs.len() - c.find_missing(&digests).await.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    for t in tasks {
        let _ = t.await;
    }
    drop(held_streams);

    let server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    for (i, data) in held.iter().enumerate() {
        let (after, complete) = c.query(&upload_name("", &format!("held-{i}"), data)).await;
        assert!(!complete);
        // Chunks (or, in a blob's file, their references) and progress go
        // through the WAL together.
        assert_eq!(after, before[i], "upload {i} keeps all it committed");
    }
    let all: Vec<(String, &Vec<u8>)> = blobs
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("crash-{i}"), b))
        .chain(held.iter().enumerate().map(|(i, b)| (format!("held-{i}"), b)))
        .collect();
    let digests: Vec<reapi::Digest> = all.iter().map(|(_, b)| digest(b)).collect();
    let missing = c.find_missing(&digests).await;
    let (mut present, mut resumed, mut restarted) = (0, 0, 0);
    for (i, (uuid, data)) in all.iter().enumerate() {
        if !missing.contains(&digests[i]) {
            present += 1;
            assert!(c.read(&read_name("", data), 0, 0).await.unwrap() == **data, "{uuid} reads back intact");
            continue;
        }
        let name = upload_name("", uuid, data);
        let (committed, complete) = c.query(&name).await;
        assert!(!complete);
        // Resume where it stopped, or (every second time) start over from zero.
        let from = if committed > 0 && resumed <= restarted { committed as usize } else { 0 };
        if from > 0 {
            resumed += 1
        } else {
            restarted += 1
        }
        let messages = write_messages(&name, data, from, 64 << 10, true);
        let done = c.bs.write(tokio_stream::iter(messages)).await.unwrap().into_inner();
        assert_eq!(done.committed_size, data.len() as i64);
        assert!(c.read(&read_name("", data), 0, 0).await.unwrap() == **data, "{uuid} after retry");
    }
    // A splice is one atomic write: present and intact, or absent and made
    // again from its chunks.
    let (tried, mut made) = (started.load(Ordering::SeqCst), 0);
    for data in (0..tried).map(spliced) {
        if c.find_missing(&[digest(&data)]).await.is_empty() {
            made += 1;
        } else {
            splice(&mut c, &data).await.expect("spliced again after the kill");
        }
        assert!(c.read(&read_name("", &data), 0, 0).await.unwrap() == data, "a spliced blob reads back");
    }
    eprintln!(
        "after kill -9: {present} present, {resumed} resumed, {restarted} started over, {made} of {tried} spliced"
    );
    assert!(tried >= 2, "splices and splits ran until the kill");
    assert!(present > 0, "some uploads finished before the kill");
    assert!(resumed > 0 && restarted > 0, "interrupted uploads resumed and started over");
}

/// A 2 GiB blob up and down: the server's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_gib_blob_streams_in_bounded_memory() {
    const SIZE: usize = 2 << 30;
    const PIECE: usize = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    let mut c = server.clients().await;
    // The same pseudo-random pieces twice: once to hash, once to send.
    let piece = |i: usize| random_bytes(PIECE, i as u64 + 1);
    let mut hasher = Sha256::new();
    for i in 0..SIZE / PIECE {
        hasher.update(piece(i));
    }
    let hash = hex::encode(hasher.finalize());
    let name = format!("uploads/big/blobs/{hash}/{SIZE}");
    let messages = (0..SIZE / PIECE).map(move |i| WriteRequest {
        resource_name: if i == 0 { name.clone() } else { String::new() },
        write_offset: (i * PIECE) as i64,
        finish_write: i == SIZE / PIECE - 1,
        data: piece(i).into(),
    });
    let response = c.bs.write(tokio_stream::iter(messages)).await.unwrap().into_inner();
    assert_eq!(response.committed_size, SIZE as i64);
    let after_write = server.peak_rss_bytes();

    let request =
        ReadRequest { resource_name: format!("blobs/{hash}/{SIZE}"), read_offset: 0, read_limit: 0 };
    let mut stream = c.bs.read(request).await.unwrap().into_inner();
    let (mut hasher, mut total) = (Sha256::new(), 0);
    while let Some(message) = stream.message().await.unwrap() {
        total += message.data.len();
        hasher.update(&message.data);
    }
    assert_eq!(total, SIZE);
    assert_eq!(hex::encode(hasher.finalize()), hash);
    let peak = server.peak_rss_bytes();
    eprintln!(
        "2 GiB blob: server peak RSS {} MiB after write, {} MiB after read",
        after_write >> 20,
        peak >> 20
    );
    assert!(peak < 200 << 20, "server peak RSS {} MiB", peak >> 20);
}
