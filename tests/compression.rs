//! zstd on the wire: `compressed-blobs/zstd/` ByteStream reads and writes,
//! and compressed batch calls, through a real tonic client.

mod common;

use std::io::Write as _;

use bytes::Bytes;
use common::*;
use larder::digest::Function;
use larder::proto::bytestream::{ReadRequest, WriteRequest};
use larder::proto::reapi::{self, compressor::Value as Compressor};
use tonic::Code;

const MIB: usize = 1 << 20;

fn server() -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    (tmp, server)
}

/// One zstd frame, the way streaming clients (Bazel) write them: no content
/// size, no checksum.
fn frame(data: &[u8], level: i32) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), level).unwrap();
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn unzstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::decode_all(data).unwrap()
}

fn zstd_upload(uuid: &str, data: &[u8]) -> String {
    let d = digest(data);
    format!("uploads/{uuid}/compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes)
}

fn zstd_read_name(data: &[u8]) -> String {
    let d = digest(data);
    format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes)
}

/// A compressed write's messages: the first offset counts uncompressed
/// bytes, later ones add the compressed bytes sent since (REAPI's rule).
fn zstd_messages(
    name: &str,
    compressed: &[u8],
    first_offset: usize,
    chunk: usize,
    finish: bool,
) -> Vec<WriteRequest> {
    let parts: Vec<&[u8]> = compressed.chunks(chunk).collect();
    let mut sent = 0;
    let mut messages = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        messages.push(WriteRequest {
            resource_name: if i == 0 { name.to_string() } else { String::new() },
            write_offset: (first_offset + sent) as i64,
            finish_write: finish && i + 1 == parts.len(),
            data: Bytes::copy_from_slice(part),
        });
        sent += part.len();
    }
    messages
}

async fn write_zstd(
    c: &mut Clients,
    name: &str,
    compressed: &[u8],
    chunk: usize,
) -> Result<i64, tonic::Status> {
    let messages = zstd_messages(name, compressed, 0, chunk, true);
    Ok(c.bs.write(tokio_stream::iter(messages)).await?.into_inner().committed_size)
}

/// A BatchUpdateBlobs of (digest, data as sent, compressor).
fn batch_request<const N: usize>(
    blobs: [(reapi::Digest, Vec<u8>, Compressor); N],
) -> reapi::BatchUpdateBlobsRequest {
    let requests = blobs
        .into_iter()
        .map(|(digest, data, compressor)| reapi::batch_update_blobs_request::Request {
            digest: Some(digest),
            data: Bytes::from(data),
            compressor: compressor as i32,
        })
        .collect();
    reapi::BatchUpdateBlobsRequest { requests, ..Default::default() }
}

/// The status codes of a BatchUpdateBlobs.
async fn batch_update<const N: usize>(
    c: &mut Clients,
    blobs: [(reapi::Digest, Vec<u8>, Compressor); N],
) -> Vec<i32> {
    let response = c.cas.batch_update_blobs(batch_request(blobs)).await.unwrap().into_inner();
    response.responses.iter().map(|r| r.status.as_ref().unwrap().code).collect()
}

#[tokio::test]
async fn capabilities_advertise_zstd() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let caps = c.caps.get_capabilities(reapi::GetCapabilitiesRequest::default()).await.unwrap().into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(cache.supported_compressors, vec![Compressor::Zstd as i32]);
    assert_eq!(cache.supported_batch_update_compressors, vec![Compressor::Zstd as i32]);
    let high = caps.high_api_version.unwrap();
    assert!((high.major, high.minor) >= (2, 8), "compression, digest_function and BLAKE3: {high:?}");
}

#[tokio::test]
async fn multi_frame_uploads_read_back_in_every_encoding() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    // 3.5 MiB in frames of assorted sizes: one exactly a stored chunk (1 MiB),
    // small ones, and one spanning two chunks; messages cut across frames.
    let data = text_bytes(3 * MIB + MIB / 2, 1);
    let cuts = [0, MIB, MIB + 1000, MIB + 300_000, 3 * MIB, data.len()];
    let compressed: Vec<u8> = cuts.windows(2).flat_map(|w| frame(&data[w[0]..w[1]], 3)).collect();
    let name = zstd_upload("multi", &data);
    let committed = write_zstd(&mut c, &name, &compressed, 100_000).await.unwrap();
    assert_eq!(committed, compressed.len() as i64, "committed_size counts the compressed bytes sent");

    assert!(c.read(&read_name("", &data), 0, 0).await.unwrap() == data);
    let whole = c.read(&zstd_read_name(&data), 0, 0).await.unwrap();
    assert!(unzstd(&whole) == data);
    assert!(whole.len() < data.len() / 3, "stored frames are sent compressed: {} bytes", whole.len());
    // From the middle of a chunk: a stream of the bytes from there on.
    for offset in [1, MIB / 2 + 123, MIB, 2 * MIB + 7, data.len() - 1, data.len()] {
        let tail = c.read(&zstd_read_name(&data), offset as i64, 0).await.unwrap();
        assert!(unzstd(&tail) == data[offset..], "offset {offset}");
    }
    let err = c.read(&zstd_read_name(&data), data.len() as i64 + 1, 0).await;
    assert_code(err, Code::OutOfRange);
    let err = c.read(&zstd_read_name(&data), 0, 10).await;
    let status = assert_code(err, Code::InvalidArgument);
    assert!(status.message().contains("read_limit"), "{}", status.message());
}

#[tokio::test]
async fn plain_uploads_read_back_as_zstd_without_recompression() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    // Random bytes are stored raw, and wrapped in raw zstd blocks on the way out.
    let random = random_bytes(2 * MIB + 5000, 2);
    c.write(&upload_name("", "r", &random), &random, 64 << 10).await.unwrap();
    let read = c.read(&zstd_read_name(&random), 0, 0).await.unwrap();
    assert!(unzstd(&read) == random);
    assert!(read.len() < random.len() + random.len() / 1000, "raw blocks add little: {}", read.len());
    let read = c.read(&zstd_read_name(&random), 700_001, 0).await.unwrap();
    assert!(unzstd(&read) == random[700_001..]);

    // The empty blob, compressed: a valid stream of nothing.
    let empty = c.read(&zstd_read_name(b""), 0, 0).await.unwrap();
    assert!(!empty.is_empty() && unzstd(&empty).is_empty());
}

#[tokio::test]
async fn frames_that_fit_a_chunk_are_kept_as_sent() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = text_bytes(600_000, 3);
    // Level 19 compresses far better than the server's level 1: if the
    // server recompressed, the read would be larger.
    let sent = frame(&data, 19);
    let ours = zstd::bulk::compress(&data, 1).unwrap();
    assert!(sent.len() + 100 < ours.len());
    write_zstd(&mut c, &zstd_upload("keep", &data), &sent, 8192).await.unwrap();
    let read = c.read(&zstd_read_name(&data), 0, 0).await.unwrap();
    assert!(unzstd(&read) == data);
    assert!(
        read.len() <= sent.len() + 8,
        "the client's frame, plus a content size: {} vs {}",
        read.len(),
        sent.len()
    );
}

#[tokio::test]
async fn a_decompression_bomb_is_cut_off_and_stores_nothing() {
    let (tmp, server) = server();
    let mut c = server.clients().await;
    // 1 GiB of zeros in a few hundred KiB, declared as a 1000-byte blob.
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    let zeros = vec![0u8; 64 * MIB];
    for _ in 0..16 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < MIB);
    let fake = random_bytes(1000, 4);
    let name = zstd_upload("bomb", &fake);
    let status = assert_code(write_zstd(&mut c, &name, &bomb, 64 << 10).await, Code::InvalidArgument);
    assert!(status.message().contains("more than the declared"), "{}", status.message());
    assert_eq!(c.upload_status(&name).await, None, "the upload is gone");
    assert_eq!(c.find_missing(&[digest(&fake)]).await.len(), 1);
    assert!(server.peak_rss_bytes() < 200 * MIB as u64, "peak RSS {}", server.peak_rss_bytes());
    let on_disk: u64 = std::fs::read_dir(tmp.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk < 64 * MIB as u64, "{on_disk} bytes on disk");

    // In a batch: that blob fails, its neighbour is stored.
    let good = text_bytes(10_000, 5);
    let blobs = [(digest(&fake), bomb, Compressor::Zstd), (digest(&good), frame(&good, 1), Compressor::Zstd)];
    assert_eq!(batch_update(&mut c, blobs).await, vec![Code::InvalidArgument as i32, 0]);
}

#[tokio::test]
async fn bad_compressed_uploads_are_invalid_arguments() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = text_bytes(200_000, 6);
    let whole = frame(&data, 1);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("truncated", whole[..whole.len() - 10].to_vec(), ""),
        ("garbage", b"this is not zstd at all".to_vec(), "invalid"),
        ("other bytes", frame(&text_bytes(200_000, 7), 1), "does not match"),
        ("too few", frame(&data[..1000], 1), "declares"),
    ];
    for (what, compressed, message) in cases {
        let name = zstd_upload(what, &data);
        let status = assert_code(write_zstd(&mut c, &name, &compressed, 50_000).await, Code::InvalidArgument);
        assert!(status.message().contains(message), "{what}: {}", status.message());
        assert_eq!(c.upload_status(&name).await, None, "{what}: nothing kept");
    }
    assert_eq!(c.find_missing(&[digest(&data)]).await.len(), 1);
    let d = digest(&data);
    let name = format!("uploads/u/compressed-blobs/deflate/{}/{}", d.hash, d.size_bytes);
    let status = assert_code(write_zstd(&mut c, &name, &whole, 50_000).await, Code::InvalidArgument);
    assert!(status.message().contains("deflate"), "{}", status.message());
    // Compressed offsets: the second message must add the compressed bytes.
    let mut messages = zstd_messages(&zstd_upload("offsets", &data), &whole, 0, 1000, true);
    messages[1].write_offset = 999;
    assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);
}

#[tokio::test]
async fn compressed_uploads_resume_at_the_uncompressed_committed_size() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = text_bytes(5 * MIB, 8);
    let name = zstd_upload("resume", &data);
    // The stream breaks in the middle of a frame.
    let whole = frame(&data, 1);
    let first = zstd_messages(&name, &whole[..whole.len() / 2], 0, 64 << 10, false);
    c.bs.write(tokio_stream::iter(first)).await.unwrap();
    let (committed, complete) = c.query(&name).await;
    assert!(!complete && committed > 0 && (committed as usize) < data.len(), "committed {committed}");
    // Like Bazel: a new zstd stream of the rest, starting at that offset.
    let rest = frame(&data[committed as usize..], 1);
    let messages = zstd_messages(&name, &rest, committed as usize, 64 << 10, true);
    let response = c.bs.write(tokio_stream::iter(messages)).await.unwrap().into_inner();
    assert_eq!(response.committed_size, committed + rest.len() as i64);
    assert!(c.read(&read_name("", &data), 0, 0).await.unwrap() == data);
    assert_eq!(c.query(&name).await, (data.len() as i64, true));

    // Writing it again finds it stored: -1 for compressed uploads.
    let again = write_zstd(&mut c, &zstd_upload("again", &data), &whole, 64 << 10).await.unwrap();
    assert_eq!(again, -1);
}

#[tokio::test]
async fn batches_move_zstd_both_ways() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let text = text_bytes(300_000, 9);
    let random = random_bytes(20_000, 10);
    let multi = [frame(&text[..100], 1), frame(&text[100..], 5)].concat();
    let blobs = [
        (digest(&text), multi, Compressor::Zstd),
        (digest(&random), random.clone(), Compressor::Identity),
        (digest(b"deflated"), b"deflated".to_vec(), Compressor::Deflate),
    ];
    let codes = batch_update(&mut c, blobs).await;
    assert_eq!(codes, vec![0, 0, Code::InvalidArgument as i32]);

    let read = |acceptable: Vec<i32>| reapi::BatchReadBlobsRequest {
        digests: vec![digest(&text), digest(&random), digest(b"")],
        acceptable_compressors: acceptable,
        ..Default::default()
    };
    let plain = c.cas.batch_read_blobs(read(vec![])).await.unwrap().into_inner().responses;
    assert!(plain.iter().all(|r| r.compressor == Compressor::Identity as i32));
    assert!(plain[0].data == text && plain[1].data == random && plain[2].data.is_empty());

    let zstd =
        c.cas.batch_read_blobs(read(vec![Compressor::Zstd as i32])).await.unwrap().into_inner().responses;
    assert_eq!(zstd[0].compressor, Compressor::Zstd as i32);
    assert!(zstd[0].data.len() < text.len() / 3 && unzstd(&zstd[0].data) == text);
    // Stored raw: sent as it is, since IDENTITY is always acceptable.
    assert_eq!(zstd[1].compressor, Compressor::Identity as i32);
    assert!(zstd[1].data == random);
    assert!(zstd[2].status.as_ref().unwrap().code == 0 && zstd[2].data.is_empty());
}

#[tokio::test]
async fn blake3_blobs_travel_compressed() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = text_bytes(100_000, 11);
    let d = Function::Blake3.digest(&data).to_proto();
    let name = format!("uploads/b/compressed-blobs/zstd/blake3/{}/{}", d.hash, d.size_bytes);
    write_zstd(&mut c, &name, &frame(&data, 3), 10_000).await.unwrap();
    let read = ReadRequest {
        resource_name: format!("compressed-blobs/zstd/blake3/{}/{}", d.hash, d.size_bytes),
        ..Default::default()
    };
    let mut stream = c.bs.read(read).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        out.extend_from_slice(&m.data);
    }
    assert!(unzstd(&out) == data);
    // Not under SHA-256.
    assert_code(c.read(&zstd_read_name(&data), 0, 0).await, Code::NotFound);
}

#[tokio::test]
async fn huge_declared_sizes_cannot_slip_past_the_batch_limit() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    // Four blobs declaring 2^62 bytes each: a wrapping sum would be 0.
    let huge = |i: u8| reapi::Digest { hash: format!("{i:02x}").repeat(32), size_bytes: 1 << 62 };
    let blobs = [0, 1, 2, 3].map(|i| (huge(i), frame(b"tiny", 1), Compressor::Zstd));
    assert_code(c.cas.batch_update_blobs(batch_request(blobs)).await, Code::InvalidArgument);
    let request = reapi::BatchReadBlobsRequest { digests: vec![huge(1); 4], ..Default::default() };
    assert_code(c.cas.batch_read_blobs(request).await, Code::InvalidArgument);
    // One blob declaring a huge size: over the limit alone.
    let one = batch_request([(huge(9), frame(b"tiny", 1), Compressor::Zstd)]);
    assert_code(c.cas.batch_update_blobs(one).await, Code::InvalidArgument);
    assert_eq!(c.find_missing(&[digest(b"alive")]).await.len(), 1, "the server is still up");
}
