//! 4 KiB blobs through REAPI's REST/JSON mapping next to the same through
//! gRPC, against one `larder serve` process, in one run: blobs per second
//! for batch updates and batch reads, and the server's CPU per blob. Then
//! 256 MiB blobs through ByteStream over HTTP (media) next to ByteStream
//! over gRPC: MB/s up and down, and the server's CPU per GiB.
//!
//!     cargo bench --bench http            (LARDER_BENCH_SCALE=4 for longer runs)

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::data::random_bytes;
use common::{Server, settle_disk};
use larder::digest::Digest;
use larder::proto::bytestream::byte_stream_client::ByteStreamClient;
use larder::proto::bytestream::{ReadRequest, WriteRequest};
use larder::proto::reapi::{
    self, BatchReadBlobsRequest, BatchUpdateBlobsRequest, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use tonic::transport::Channel;

const BLOB: usize = 4096;
/// Blobs per batch: just under the advertised 4 MiB batch limit.
const PER_BATCH: usize = 1000;

fn batches(seed: u64, count: usize) -> Vec<BatchUpdateBlobsRequest> {
    (0..count)
        .map(|b| BatchUpdateBlobsRequest {
            requests: (0..PER_BATCH)
                .map(|i| {
                    let data = Bytes::from(random_bytes(BLOB, seed + (b * PER_BATCH + i) as u64));
                    batch_update_blobs_request::Request {
                        digest: Some(Digest::of(&data).to_proto()),
                        data,
                        compressor: 0,
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect()
}

fn reads(updates: &[BatchUpdateBlobsRequest]) -> Vec<BatchReadBlobsRequest> {
    updates
        .iter()
        .map(|u| BatchReadBlobsRequest {
            digests: u.requests.iter().map(|r| r.digest.clone().unwrap()).collect(),
            ..Default::default()
        })
        .collect()
}

struct Figure {
    blobs_per_s: f64,
    cpu_us_per_blob: f64,
}

async fn measure<F: Future<Output = ()>>(server: &Server, blobs: usize, work: F) -> Figure {
    settle_disk();
    let (cpu, start) = (server.cpu_seconds(), Instant::now());
    work.await;
    let (elapsed, cpu) = (start.elapsed().as_secs_f64(), server.cpu_seconds() - cpu);
    Figure { blobs_per_s: blobs as f64 / elapsed, cpu_us_per_blob: cpu * 1e6 / blobs as f64 }
}

#[tokio::main]
async fn main() {
    let scale: usize = std::env::var("LARDER_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let count = 20 * scale;
    let blobs = count * PER_BATCH;
    let server = Server::start();
    let channel = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut grpc = ContentAddressableStorageClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let rest = reqwest::Client::builder().http1_only().build().unwrap();
    let base = format!("http://{}/v2/bench", server.addr);

    let grpc_updates = batches(1, count);
    let grpc_reads = reads(&grpc_updates);
    let rest_updates = batches(1 << 40, count);
    // JSON bodies are made before the clock starts: the server is measured.
    let rest_update_bodies: Vec<String> =
        rest_updates.iter().map(|u| serde_json::to_string(u).unwrap()).collect();
    let rest_read_bodies: Vec<String> =
        reads(&rest_updates).iter().map(|r| serde_json::to_string(r).unwrap()).collect();

    let grpc_update = measure(&server, blobs, async {
        for u in &grpc_updates {
            let r = grpc.batch_update_blobs(u.clone()).await.unwrap().into_inner();
            assert!(r.responses.iter().all(|r| r.status.as_ref().unwrap().code == 0));
        }
    })
    .await;
    let rest_update = measure(&server, blobs, async {
        for body in &rest_update_bodies {
            let r = rest.post(format!("{base}/blobs:batchUpdate")).body(body.clone()).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
    })
    .await;
    let grpc_read = measure(&server, blobs, async {
        for r in &grpc_reads {
            let r = grpc.batch_read_blobs(r.clone()).await.unwrap().into_inner();
            assert_eq!(r.responses.len(), PER_BATCH);
        }
    })
    .await;
    let rest_read = measure(&server, blobs, async {
        for body in &rest_read_bodies {
            let r = rest.post(format!("{base}/blobs:batchRead")).body(body.clone()).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
    })
    .await;
    // Every byte read back over REST is checked once, outside the clock.
    let r =
        rest.post(format!("{base}/blobs:batchRead")).body(rest_read_bodies[0].clone()).send().await.unwrap();
    let read: reapi::BatchReadBlobsResponse = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    for (got, sent) in read.responses.iter().zip(&rest_updates[0].requests) {
        assert_eq!(got.data, sent.data, "REST read back wrong bytes");
    }

    println!("{blobs} blobs of 4 KiB in batches of {PER_BATCH}, one call at a time, one server process:");
    println!("{:<28} {:>12} {:>18}", "", "blobs/s", "server CPU µs/blob");
    for (what, f) in [
        ("gRPC BatchUpdateBlobs", grpc_update),
        ("REST blobs:batchUpdate", rest_update),
        ("gRPC BatchReadBlobs", grpc_read),
        ("REST blobs:batchRead", rest_read),
    ] {
        println!("{what:<28} {:>12.0} {:>18.1}", f.blobs_per_s, f.cpu_us_per_blob);
    }
    println!();
    large(&server, channel_for(&server).await, &rest, scale).await;
}

async fn channel_for(server: &Server) -> Channel {
    Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap()
}

/// One large blob each way over ByteStream gRPC, then over media: a simple
/// upload, a resumable one in 16 MiB chunks, and downloads.
async fn large(server: &Server, channel: Channel, http: &reqwest::Client, scale: usize) {
    const MESSAGE: usize = 1 << 20;
    const CHUNK: usize = 16 << 20;
    let size = (256 * scale) << 20;
    let blobs: Vec<Bytes> = (0..3).map(|seed| Bytes::from(random_bytes(size, 70 + seed))).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    let name = |i: usize, kind: &str| format!("{kind}{}/{size}", digests[i].hex());
    let base = format!("http://{}", server.addr);
    let mut bs = ByteStreamClient::new(channel).max_decoding_message_size(64 << 20);
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut rows = Vec::new();
    let mut row = |what: &str, (elapsed, cpu): (f64, f64)| {
        rows.push(format!("{what:<40} {:>8.0} {:>20.2}", size as f64 / elapsed / 1e6, cpu / gib));
    };
    let clock = |server: &Server| (Instant::now(), server.cpu_seconds());
    let since = |server: &Server, (start, cpu): (Instant, f64)| {
        (start.elapsed().as_secs_f64(), server.cpu_seconds() - cpu)
    };

    // Messages are made before the clock starts.
    let messages: Vec<WriteRequest> = (0..size / MESSAGE)
        .map(|i| WriteRequest {
            resource_name: if i == 0 {
                format!("uploads/large/{}", name(0, "blobs/"))
            } else {
                String::new()
            },
            write_offset: (i * MESSAGE) as i64,
            finish_write: (i + 1) * MESSAGE >= size,
            data: blobs[0].slice(i * MESSAGE..(i + 1) * MESSAGE),
        })
        .collect();
    settle_disk();
    let t = clock(server);
    let r = bs.write(tokio_stream::iter(messages)).await.unwrap().into_inner();
    assert_eq!(r.committed_size as usize, size);
    row("ByteStream Write (gRPC, 1 MiB messages)", since(server, t));
    settle_disk();
    let t = clock(server);
    let request = ReadRequest { resource_name: name(0, "blobs/"), ..Default::default() };
    let mut stream = bs.read(request).await.unwrap().into_inner();
    let mut got = 0;
    while let Some(m) = stream.message().await.unwrap() {
        got += m.data.len();
    }
    assert_eq!(got, size);
    row("ByteStream Read (gRPC)", since(server, t));

    settle_disk();
    let t = clock(server);
    let url = format!("{base}/upload/v1/media/uploads/large/{}?uploadType=media", name(1, "blobs/"));
    let r = http.post(url).body(blobs[1].clone()).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    row("media upload (uploadType=media)", since(server, t));
    settle_disk();
    let t = clock(server);
    let start = format!("{base}/upload/v1/media/uploads/large/{}?uploadType=resumable", name(2, "blobs/"));
    let r = http.post(start).send().await.unwrap();
    let session = r.headers()["location"].to_str().unwrap().to_string();
    for at in (0..size).step_by(CHUNK) {
        let end = (at + CHUNK).min(size);
        let range = format!("bytes {at}-{}/{size}", end - 1);
        let r = http
            .put(&session)
            .header("content-range", range)
            .body(blobs[2].slice(at..end))
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 200 | 308), "{}", r.status());
    }
    row("media upload (resumable, 16 MiB chunks)", since(server, t));
    settle_disk();
    let t = clock(server);
    let mut r = http.get(format!("{base}/v1/media/{}?alt=media", name(1, "blobs/"))).send().await.unwrap();
    let mut got = 0;
    while let Some(chunk) = r.chunk().await.unwrap() {
        got += chunk.len();
    }
    assert_eq!(got, size);
    row("media download (alt=media)", since(server, t));

    println!("one {} MiB blob (random bytes) each way, one call at a time:", size >> 20);
    println!("{:<40} {:>8} {:>20}", "", "MB/s", "server CPU s/GiB");
    for row in rows {
        println!("{row}");
    }
}
