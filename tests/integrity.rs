//! Bytes flipped under the store, on disk: never served, and scrubbed away.

mod common;

use std::path::Path;

use common::*;
use tonic::Code;

/// Flips one byte inside `data`'s stored copy, in whichever file of the data
/// directory holds it (RocksDB's, or the blob's own). Random data is stored
/// raw, so its bytes are there.
fn flip_on_disk(dir: &Path, data: &[u8]) {
    assert!(flip_in(dir, &data[50_000..50_064]), "the blob's bytes are in no file of {}", dir.display());
}

fn flip_in(dir: &Path, needle: &[u8]) -> bool {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if flip_in(&path, needle) {
                return true;
            }
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at + 32] ^= 0x01;
            std::fs::write(&path, bytes).unwrap();
            return true;
        }
    }
    false
}

#[tokio::test]
async fn corrupt_blobs_are_never_served_and_scrub_removes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (a, b, c) = (random_bytes(300_000, 1), random_bytes(300_000, 2), random_bytes(300_000, 3));
    let server = TestServer::start(&dir, &[]);
    let mut client = server.clients().await;
    for (name, data) in [("a", &a), ("b", &b), ("c", &c)] {
        client.write(&upload_name("", name, data), data, 64 << 10).await.unwrap();
    }
    drop(client);
    assert!(tokio::task::spawn_blocking(move || server.stop()).await.unwrap().success());
    flip_on_disk(&dir, &a);
    flip_on_disk(&dir, &b);

    let server = TestServer::start(&dir, &[]);
    let mut client = server.clients().await;
    let status = assert_code(client.read(&read_name("", &a), 0, 0).await, Code::NotFound);
    assert!(status.message().contains("corrupt"), "{}", status.message());
    assert_eq!(client.find_missing(&[digest(&a)]).await.len(), 1, "removed: clients upload it again");
    let metrics =
        reqwest::get(format!("http://{}/metrics", server.addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("larder_corrupt_blobs_removed_total 1"), "{metrics}");
    drop(client);
    assert!(tokio::task::spawn_blocking(move || server.stop()).await.unwrap().success());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(["scrub", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed} {}", String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("checked 2 blobs") && printed.contains("1 corrupt"), "{printed}");

    let server = TestServer::start(&dir, &[]);
    let mut client = server.clients().await;
    assert_eq!(client.find_missing(&[digest(&b), digest(&c)]).await, vec![digest(&b)]);
    assert!(client.read(&read_name("", &c), 0, 0).await.unwrap() == c);
}

#[tokio::test]
async fn the_online_scrub_finds_corruption_nobody_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (bad, good) = (random_bytes(300_000, 4), random_bytes(300_000, 5));
    let server = TestServer::start(&dir, &[]);
    let mut client = server.clients().await;
    for (name, data) in [("bad", &bad), ("good", &good)] {
        client.write(&upload_name("", name, data), data, 64 << 10).await.unwrap();
    }
    drop(client);
    assert!(tokio::task::spawn_blocking(move || server.stop()).await.unwrap().success());
    flip_on_disk(&dir, &bad);

    let server = TestServer::start(&dir, &["--scrub-rate", "100MiB"]);
    let metrics = format!("http://{}/metrics", server.addr);
    let mut removed = false;
    for _ in 0..600 {
        let page = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        if page.contains("larder_corrupt_blobs_removed_total 1") {
            removed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(removed, "the scrub removed the corrupt blob");
    let mut client = server.clients().await;
    assert_eq!(client.find_missing(&[digest(&bad), digest(&good)]).await, vec![digest(&bad)]);
}
