//! End-to-end gRPC throughput of larder on this machine, next to the
//! machine's own single-core SHA-256 speed measured in the same run.
//!
//!     cargo bench --bench grpc            (LARDER_BENCH_SCALE=4 for longer runs)

use std::time::{Duration, Instant};

use bytes::Bytes;
use larder::bench::data::random_bytes;
use larder::config::{Config, Overrides};
use larder::digest::Digest;
use larder::proto::bytestream::ReadRequest;
use larder::proto::bytestream::byte_stream_client::ByteStreamClient;
use larder::proto::reapi;
use larder::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use larder::server::Server;
use tonic::transport::Channel;

mod common;

use common::upload;

const MIB: usize = 1 << 20;

/// Build-output-like bytes: runs of structured text mixed with noise.
fn mixed(len: usize, seed: u64) -> Vec<u8> {
    let noise = random_bytes(len, seed);
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0;
    while out.len() < len {
        if noise[i] < 64 {
            out.extend_from_slice(&noise[i..(i + 48).min(len)]);
        } else {
            out.extend_from_slice(
                format!("symbol_{}:\n\tmov r{}, [rbp-{}]\n", noise[i] as u32 * 7, noise[i] % 16, i % 4096)
                    .as_bytes(),
            );
        }
        i += 1;
    }
    out.truncate(len);
    out
}

fn mbps(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn sha256_mbps() -> f64 {
    let data = random_bytes(64 * MIB, 99);
    let start = Instant::now();
    let mut total = 0;
    while start.elapsed() < Duration::from_secs(1) {
        std::hint::black_box(Digest::of(&data));
        total += data.len();
    }
    mbps(total, start.elapsed())
}

async fn read_blob(bs: &mut ByteStreamClient<Channel>, d: Digest) -> usize {
    let request =
        ReadRequest { resource_name: format!("blobs/{}/{}", d.hex(), d.size), ..Default::default() };
    let mut stream = bs.read(request).await.unwrap().into_inner();
    let mut total = 0;
    while let Some(m) = stream.message().await.unwrap() {
        total += m.data.len();
    }
    total
}

#[tokio::main]
async fn main() {
    let scale: usize = std::env::var("LARDER_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let tmp = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        dir: Some(tmp.path().join("data")),
        ..Overrides::default()
    };
    let config = Config::load(None, overrides).unwrap();
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addr();
    let (opened, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(server.run(std::future::pending(), move || {
        let _ = opened.send(());
    }));
    ready.await.unwrap();
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let bs = ByteStreamClient::new(channel.clone()).max_decoding_message_size(64 * MIB);
    let cas = ContentAddressableStorageClient::new(channel)
        .max_decoding_message_size(64 * MIB)
        .max_encoding_message_size(64 * MIB);

    let sha = tokio::task::spawn_blocking(sha256_mbps).await.unwrap();
    println!("machine: single-core SHA-256 {sha:.0} MB/s");

    for (kind, make) in [("random", random_bytes as fn(usize, u64) -> Vec<u8>), ("build-like", mixed)] {
        let blobs: Vec<Vec<u8>> =
            (0..4 * scale).map(|i| make(64 * MIB, i as u64 + 1000 * kind.len() as u64)).collect();
        let total: usize = blobs.iter().map(Vec::len).sum();
        // One stream at a time, then two at once.
        let start = Instant::now();
        let mut client = bs.clone();
        for (i, b) in blobs.iter().enumerate().take(blobs.len() / 2) {
            upload(&mut client, Digest::of(b), b, false, i).await;
        }
        let one = mbps(total / 2, start.elapsed());
        let start = Instant::now();
        let halves: Vec<Vec<Vec<u8>>> = vec![
            blobs[blobs.len() / 2..].iter().step_by(2).cloned().collect(),
            blobs[blobs.len() / 2 + 1..].iter().step_by(2).cloned().collect(),
        ];
        let tasks: Vec<_> = halves
            .into_iter()
            .enumerate()
            .map(|(t, mine)| {
                let mut client = bs.clone();
                tokio::spawn(async move {
                    for (i, b) in mine.iter().enumerate() {
                        upload(&mut client, Digest::of(b), b, false, 100 * (t + 1) + i).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let two = mbps(total / 2, start.elapsed());
        println!(
            "ingest 64 MiB blobs, {kind}: {one:.0} MB/s one stream ({:.2}x SHA-256), {two:.0} MB/s two streams ({:.2}x)",
            one / sha,
            two / sha
        );
        let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
        let start = Instant::now();
        let mut read = 0;
        for d in &digests {
            read += read_blob(&mut client, *d).await;
        }
        let r = mbps(read, start.elapsed());
        println!("read 64 MiB blobs, {kind}: {r:.0} MB/s one stream ({:.2}x SHA-256)", r / sha);
    }

    // Small blobs: 4 KiB, 500 per batch (2 MB), from two clients.
    let per_client = 20_000 * scale;
    let make_batches = |seed: u64| -> Vec<Vec<(reapi::Digest, Bytes)>> {
        (0..per_client / 500)
            .map(|b| {
                (0..500)
                    .map(|i| {
                        let data = Bytes::from(mixed(4096, seed * 1_000_000 + b as u64 * 1000 + i));
                        (Digest::of(&data).to_proto(), data)
                    })
                    .collect()
            })
            .collect()
    };
    let all: Vec<Vec<Vec<(reapi::Digest, Bytes)>>> = vec![make_batches(1), make_batches(2)];
    let start = Instant::now();
    let tasks: Vec<_> = all
        .iter()
        .cloned()
        .map(|batches| {
            let mut cas = cas.clone();
            tokio::spawn(async move {
                for batch in batches {
                    let requests = batch
                        .into_iter()
                        .map(|(digest, data)| reapi::batch_update_blobs_request::Request {
                            digest: Some(digest),
                            data,
                            compressor: 0,
                        })
                        .collect();
                    let r = cas
                        .batch_update_blobs(reapi::BatchUpdateBlobsRequest { requests, ..Default::default() })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(r.responses.iter().all(|r| r.status.as_ref().unwrap().code == 0));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let n = 2 * per_client;
    let up = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "BatchUpdateBlobs 4 KiB: {up:.0} blobs/s ({:.0} MB/s, {:.2}x SHA-256)",
        up * 4096.0 / 1e6,
        up * 4096.0 / 1e6 / sha
    );

    let start = Instant::now();
    let tasks: Vec<_> = all
        .iter()
        .cloned()
        .map(|batches| {
            let mut cas = cas.clone();
            tokio::spawn(async move {
                for batch in batches {
                    let digests = batch.into_iter().map(|(d, _)| d).collect();
                    let r = cas
                        .batch_read_blobs(reapi::BatchReadBlobsRequest { digests, ..Default::default() })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(r.responses.iter().all(|r| r.data.len() == 4096));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let down = n as f64 / start.elapsed().as_secs_f64();
    println!("BatchReadBlobs 4 KiB: {down:.0} blobs/s");

    let digests: Vec<reapi::Digest> = all.iter().flatten().flatten().map(|(d, _)| d.clone()).collect();
    let start = Instant::now();
    let mut cas2 = cas.clone();
    for part in digests.chunks(10_000) {
        let r = cas2
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                blob_digests: part.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.missing_blob_digests.is_empty());
    }
    println!("FindMissingBlobs: {:.0} digests/s", digests.len() as f64 / start.elapsed().as_secs_f64());
}
