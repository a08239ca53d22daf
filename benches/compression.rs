//! zstd on the wire against identity: ingest speed and server CPU seconds per
//! GiB, for uploads and reads, on build-output-like and random data. The
//! server is the real `larder serve` in its own process, so its CPU time is
//! read from /proc apart from the client's.
//!
//!     cargo bench --bench compression       (LARDER_BENCH_SCALE=4 for longer runs)

use std::io::Write as _;
use std::time::{Duration, Instant};

use common::data::{random_bytes, text_bytes};
use larder::digest::Digest;
use larder::proto::bytestream::ReadRequest;
use larder::proto::bytestream::byte_stream_client::ByteStreamClient;
use tonic::transport::Channel;

mod common;

use common::{Server, settle_disk, upload};

const MIB: usize = 1 << 20;

/// Build-output-like bytes: text runs (symbols, paths) mixed with binary noise.
fn build_like(len: usize, seed: u64) -> Vec<u8> {
    let text = text_bytes(len, seed);
    let noise = random_bytes(len, seed + 1);
    // Alternate 3 KiB of text with 1 KiB of noise: about 2.4x with zstd-1.
    text.chunks(4096)
        .zip(noise.chunks(4096))
        .flat_map(|(t, n)| [&t[..t.len().min(3072)], &n[..n.len().min(1024)]].concat())
        .take(len)
        .collect()
}

fn mbps(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

/// Single-core MB/s of `f` over `data`, run for about a second.
fn ceiling(data: &[u8], mut f: impl FnMut(&[u8])) -> f64 {
    let start = Instant::now();
    let mut total = 0;
    while start.elapsed() < Duration::from_secs(1) {
        f(data);
        total += data.len();
    }
    mbps(total, start.elapsed())
}

/// How a client compresses a blob for the wire.
type Compress = fn(&[u8]) -> Vec<u8>;

/// One zstd frame per blob, as Bazel writes it (streaming, no content size).
fn one_frame(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// One frame per 1 MiB (the server's chunk size): frames the server keeps.
fn chunk_frames(data: &[u8]) -> Vec<u8> {
    data.chunks(MIB).flat_map(one_frame).collect()
}

/// Reads a blob; returns the bytes on the wire.
async fn read(bs: &mut ByteStreamClient<Channel>, digest: Digest, zstd: bool) -> Vec<u8> {
    let kind = if zstd { "compressed-blobs/zstd" } else { "blobs" };
    let request = ReadRequest {
        resource_name: format!("{kind}/{}/{}", digest.hex(), digest.size),
        ..Default::default()
    };
    let mut stream = bs.read(request).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        out.extend_from_slice(&m.data);
    }
    out
}

struct Row {
    what: String,
    mbps: f64,
    cpu_per_gib: f64,
    wire_ratio: f64,
}

#[tokio::main]
async fn main() {
    let scale: usize = std::env::var("LARDER_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let sample = build_like(64 * MIB, 1);
    let sha = ceiling(&sample, |d| {
        std::hint::black_box(Digest::of(d));
    });
    let zstd1 = ceiling(&sample[..16 * MIB], |d| {
        std::hint::black_box(zstd::bulk::compress(d, 1).unwrap());
    });
    println!("machine: single-core SHA-256 {sha:.0} MB/s, zstd-1 on build-like data {zstd1:.0} MB/s");
    println!(
        "build-like data compresses {:.2}x at zstd-1",
        sample.len() as f64 / zstd::bulk::compress(&sample, 1).unwrap().len() as f64
    );

    let mut rows = Vec::new();
    for (kind, make) in [("build-like", build_like as fn(usize, u64) -> Vec<u8>), ("random", random_bytes)] {
        // Large blobs: 32 MiB each; small blobs: 256 KiB each, the same total.
        for (size, count) in [(32 * MIB, 8 * scale), (256 << 10, 1024 * scale)] {
            let label = format!("{kind}, {} KiB blobs", size >> 10);
            // Each encoding gets its own fresh server and its own blobs.
            let encodings: [(&str, Option<Compress>); 3] = [
                ("identity", None),
                ("zstd, one frame per blob", Some(one_frame)),
                ("zstd, one frame per MiB", Some(chunk_frames)),
            ];
            for (e, (encoding, compress)) in encodings.into_iter().enumerate() {
                if size <= MIB && e == 2 {
                    continue; // the same as one frame per blob
                }
                let server = Server::start();
                let channel =
                    Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
                let mut bs = ByteStreamClient::new(channel).max_decoding_message_size(64 * MIB);
                let blobs: Vec<Vec<u8>> = (0..count).map(|i| make(size, (e * 100_000 + i) as u64)).collect();
                let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
                let wires: Vec<Vec<u8>> =
                    blobs.iter().map(|b| compress.map_or_else(|| b.clone(), |f| f(b))).collect();
                let total: usize = blobs.iter().map(Vec::len).sum();
                let wire_total: usize = wires.iter().map(Vec::len).sum();

                settle_disk();
                let (cpu, start) = (server.cpu_seconds(), Instant::now());
                for (i, (d, w)) in digests.iter().zip(&wires).enumerate() {
                    upload(&mut bs, *d, w, compress.is_some(), i).await;
                }
                let (elapsed, cpu) = (start.elapsed(), server.cpu_seconds() - cpu);
                let gib = total as f64 / (1u64 << 30) as f64;
                rows.push(Row {
                    what: format!("upload {label}, {encoding}"),
                    mbps: mbps(total, elapsed),
                    cpu_per_gib: cpu / gib,
                    wire_ratio: wire_total as f64 / total as f64,
                });

                // Reads: once per encoding that makes sense after this upload.
                if e == 0 {
                    for zstd in [false, true] {
                        settle_disk();
                        let (cpu, start) = (server.cpu_seconds(), Instant::now());
                        let mut wire = 0;
                        for d in &digests {
                            wire += read(&mut bs, *d, zstd).await.len();
                        }
                        let (elapsed, cpu) = (start.elapsed(), server.cpu_seconds() - cpu);
                        let check = read(&mut bs, digests[0], zstd).await;
                        let check = if zstd { zstd::stream::decode_all(&check[..]).unwrap() } else { check };
                        assert!(check == blobs[0], "read back wrong bytes");
                        rows.push(Row {
                            what: format!("read {label}, {}", if zstd { "zstd" } else { "identity" }),
                            mbps: mbps(total, elapsed),
                            cpu_per_gib: cpu / gib,
                            wire_ratio: wire as f64 / total as f64,
                        });
                    }
                }
            }
        }
    }
    println!();
    println!(
        "{:<58} {:>8} {:>9} {:>12} {:>10}",
        "workload (MB/s of uncompressed bytes)", "MB/s", "xSHA-256", "CPU s/GiB", "wire/data"
    );
    for r in rows {
        println!(
            "{:<58} {:>8.0} {:>9.2} {:>12.2} {:>10.2}",
            r.what,
            r.mbps,
            r.mbps / sha,
            r.cpu_per_gib,
            r.wire_ratio
        );
    }
}
