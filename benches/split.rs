//! SplitBlob and SpliceBlob against one `larder serve` process, in one run:
//! calls per second and MB/s for 1 MiB and 256 MiB blobs, with each chunking
//! function, and the chunkers alone on this machine for scale.
//!
//!     cargo bench --bench split            (LARDER_BENCH_SCALE=4 for longer runs)

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::data::{random_bytes, text_bytes};
use common::{Server, settle_disk, upload};
use larder::cdc::Chunking;
use larder::digest::Digest;
use larder::proto::bytestream::byte_stream_client::ByteStreamClient;
use larder::proto::reapi::{
    SpliceBlobRequest, SplitBlobRequest, chunking_function,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use tonic::transport::Channel;

/// Build-output-like bytes: text runs with binary noise.
fn build_like(len: usize, seed: u64) -> Vec<u8> {
    let (text, noise) = (text_bytes(len, seed), random_bytes(len, seed + 1));
    text.chunks(4096)
        .zip(noise.chunks(4096))
        .flat_map(|(t, n)| [&t[..t.len().min(3072)], &n[..n.len().min(1024)]].concat())
        .take(len)
        .collect()
}

#[tokio::main]
async fn main() {
    let scale: usize = std::env::var("LARDER_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let functions = [
        ("FastCDC 2020", chunking_function::Value::FastCdc2020 as i32),
        ("RepMaxCDC", chunking_function::Value::RepMaxCdc as i32),
    ];
    println!("the chunkers alone, one core, on a 64 MiB build-like buffer:");
    let data = build_like(64 << 20, 1);
    for (name, function) in functions {
        let chunking = Chunking::for_request(function);
        let start = Instant::now();
        let chunks = chunking.split(&data).len();
        let mbps = data.len() as f64 / start.elapsed().as_secs_f64() / 1e6;
        println!("  {name:<14} {mbps:>8.0} MB/s  ({chunks} chunks)");
    }

    let server = Server::start();
    let channel = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut cas = ContentAddressableStorageClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let mut bs = ByteStreamClient::new(channel);
    println!();
    println!(
        "{:<14} {:>10} {:>7} {:>10} {:>9} {:>10} {:>9}",
        "function", "blob", "calls", "split/s", "MB/s", "splice/s", "MB/s"
    );
    let mut n = 0;
    for (size, calls) in [(1 << 20, 40 * scale), (256 << 20, scale)] {
        for (name, function) in functions {
            // Distinct blobs, stored before the clock starts.
            let blobs: Vec<Bytes> =
                (0..calls).map(|i| Bytes::from(build_like(size, 100 + (n * 1000 + i) as u64))).collect();
            n += 1;
            for blob in &blobs {
                upload(&mut bs, Digest::of(blob), blob, false, n * 1000 + blob.len() % 997).await;
            }
            settle_disk();
            let start = Instant::now();
            let mut splits = Vec::new();
            for blob in &blobs {
                let request = SplitBlobRequest {
                    blob_digest: Some(Digest::of(blob).to_proto()),
                    chunking_function: function,
                    ..Default::default()
                };
                splits.push(cas.split_blob(request).await.unwrap().into_inner().chunk_digests);
            }
            let split_secs = start.elapsed().as_secs_f64();
            // Splicing a stored blob is answered at once: splice new blobs,
            // the same chunks with the first one moved to the end.
            let rotated: Vec<(Digest, Vec<_>)> = blobs
                .iter()
                .zip(&splits)
                .map(|(blob, chunks)| {
                    let first = chunks[0].size_bytes as usize;
                    let data = [&blob[first..], &blob[..first]].concat();
                    let mut chunks = chunks.clone();
                    chunks.rotate_left(1);
                    (Digest::of(&data), chunks)
                })
                .collect();
            let start = Instant::now();
            for (digest, chunks) in rotated {
                let request = SpliceBlobRequest {
                    blob_digest: Some(digest.to_proto()),
                    chunk_digests: chunks,
                    ..Default::default()
                };
                cas.splice_blob(request).await.unwrap();
            }
            let splice_secs = start.elapsed().as_secs_f64();
            let mib = size >> 20;
            println!(
                "{name:<14} {:>6} MiB {calls:>7} {:>10.1} {:>9.0} {:>10.1} {:>9.0}",
                mib,
                calls as f64 / split_secs,
                (calls * size) as f64 / split_secs / 1e6,
                calls as f64 / splice_secs,
                (calls * size) as f64 / splice_secs / 1e6,
            );
        }
    }
}
