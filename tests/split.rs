//! SplitBlob and SpliceBlob (REAPI 2.12) against `larder serve`, over gRPC
//! and REST: splits are the chunks clients compute, every chunk is stored,
//! and a splice is verified before its blob becomes visible.

mod common;

use common::*;
use larder::cdc::Chunking;
use larder::proto::reapi::{
    self, GetCapabilitiesRequest, SpliceBlobRequest, SplitBlobRequest, chunking_function,
};
use serde_json::{Value, json};
use tonic::Code;

const FAST_CDC: i32 = chunking_function::Value::FastCdc2020 as i32;
const REP_MAX: i32 = chunking_function::Value::RepMaxCdc as i32;

/// A build-output-like blob: text with runs of noise.
fn blob(size: usize, seed: u64) -> Vec<u8> {
    let (text, noise) = (text_bytes(size, seed), random_bytes(size, seed + 1));
    text.chunks(8192)
        .zip(noise.chunks(8192))
        .flat_map(|(t, n)| [&t[..6144.min(t.len())], &n[..2048.min(n.len())]].concat())
        .take(size)
        .collect()
}

fn split(data: &[u8], function: i32) -> Vec<reapi::Digest> {
    let mut at = 0;
    Chunking::for_request(function)
        .split(data)
        .into_iter()
        .map(|length| {
            at += length;
            digest(&data[at - length..at])
        })
        .collect()
}

fn split_request(data: &[u8], function: i32) -> SplitBlobRequest {
    SplitBlobRequest { blob_digest: Some(digest(data)), chunking_function: function, ..Default::default() }
}

fn splice_request(data: &[u8], chunks: Vec<reapi::Digest>) -> SpliceBlobRequest {
    SpliceBlobRequest { blob_digest: Some(digest(data)), chunk_digests: chunks, ..Default::default() }
}

#[tokio::test]
async fn split_answers_the_chunks_clients_compute_and_stores_them() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    let mut c = server.clients().await;
    let caps = c.caps.get_capabilities(GetCapabilitiesRequest::default()).await.unwrap().into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert!(cache.split_blob_support && cache.splice_blob_support);
    let fast = cache.fast_cdc_2020_params.unwrap();
    assert_eq!((fast.avg_chunk_size_bytes, fast.seed), (512 << 10, 0));
    let rep = cache.rep_max_cdc_params.unwrap();
    assert_eq!((rep.min_chunk_size_bytes, rep.horizon_size_bytes), (256 << 10, 2 << 20));
    assert_eq!(caps.high_api_version.unwrap().minor, 12);

    let data = blob((9 << 20) + 4321, 3);
    c.write(&upload_name("", "big", &data), &data, 1 << 20).await.unwrap();
    for function in [FAST_CDC, REP_MAX] {
        let reply = c.cas.split_blob(split_request(&data, function)).await.unwrap().into_inner();
        assert_eq!(reply.chunking_function, function);
        let expected = split(&data, function);
        assert!(expected.len() > 5, "{} chunks", expected.len());
        assert_eq!(reply.chunk_digests, expected, "function {function}");
        assert!(c.find_missing(&expected).await.is_empty(), "every chunk is stored");
        let mut joined = Vec::new();
        for chunk in &expected {
            joined.extend(c.read(&format!("blobs/{}/{}", chunk.hash, chunk.size_bytes), 0, 0).await.unwrap());
        }
        assert!(joined == data, "the chunks concatenate to the blob");
    }
    // The server chooses when the client names no function it knows.
    let reply = c.cas.split_blob(split_request(&data, 0)).await.unwrap().into_inner();
    assert_eq!((reply.chunking_function, reply.chunk_digests), (FAST_CDC, split(&data, FAST_CDC)));
    // A blob shorter than a chunk is one chunk; the empty blob, none.
    let small = b"small blob".to_vec();
    c.batch_update(&[&small]).await;
    let reply = c.cas.split_blob(split_request(&small, FAST_CDC)).await.unwrap().into_inner();
    assert_eq!(reply.chunk_digests, vec![digest(&small)]);
    let reply = c.cas.split_blob(split_request(b"", REP_MAX)).await.unwrap().into_inner();
    assert!(reply.chunk_digests.is_empty());

    assert_code(c.cas.split_blob(split_request(b"never stored", FAST_CDC)).await, Code::NotFound);
    let no_digest = SplitBlobRequest::default();
    assert_code(c.cas.split_blob(no_digest).await, Code::InvalidArgument);
}

#[tokio::test]
async fn splice_is_verified_before_its_blob_is_visible() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    let data = blob((6 << 20) + 99, 5);
    let chunks = split(&data, REP_MAX);
    // Upload the chunks, as a client that splits would (each fits a batch).
    let mut at = 0;
    for chunk in &chunks {
        let end = at + chunk.size_bytes as usize;
        assert_eq!(c.batch_update(&[&data[at..end]]).await, [0]);
        at = end;
    }
    // Out of order: the bytes do not hash to the blob.
    let mut swapped = chunks.clone();
    swapped.swap(0, 1);
    let refused = assert_code(c.cas.splice_blob(splice_request(&data, swapped)).await, Code::InvalidArgument);
    assert!(refused.message().contains("hash to"), "{}", refused.message());
    assert_eq!(c.find_missing(&[digest(&data)]).await.len(), 1, "nothing visible");
    // Sizes that do not add up, a missing chunk, no blob digest.
    let refused = assert_code(
        c.cas.splice_blob(splice_request(&data, chunks[1..].to_vec())).await,
        Code::InvalidArgument,
    );
    assert!(refused.message().contains("add up to"), "{}", refused.message());
    let mut missing = chunks.clone();
    missing[2] = digest(&random_bytes(chunks[2].size_bytes as usize, 77));
    let absent = missing[2].hash.clone();
    let refused = assert_code(c.cas.splice_blob(splice_request(&data, missing)).await, Code::NotFound);
    assert!(refused.message().contains(&absent), "{}", refused.message());
    let no_blob = SpliceBlobRequest { chunk_digests: chunks.clone(), ..Default::default() };
    assert_code(c.cas.splice_blob(no_blob).await, Code::InvalidArgument);

    let reply = c.cas.splice_blob(splice_request(&data, chunks.clone())).await.unwrap().into_inner();
    assert_eq!(reply.blob_digest, Some(digest(&data)));
    // Read back at several offsets, then again after a restart.
    reads_back(&mut c, &data, &chunks).await;
    drop(server);
    let server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    reads_back(&mut c, &data, &chunks).await;
    // The empty blob splices from no chunks.
    c.cas.splice_blob(splice_request(b"", vec![])).await.unwrap();
}

/// Reads `data` back at several offsets; splicing it again is a no-op.
async fn reads_back(c: &mut Clients, data: &[u8], chunks: &[reapi::Digest]) {
    let name = read_name("", data);
    for offset in [0usize, 1, 262_143, 3 << 20, data.len() - 1] {
        let got = c.read(&name, offset as i64, 70_000).await.unwrap();
        assert!(got == data[offset..(offset + 70_000).min(data.len())], "offset {offset}");
    }
    c.cas.splice_blob(splice_request(data, chunks.to_vec())).await.unwrap();
}

#[tokio::test]
async fn split_and_splice_over_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    let mut g = server.clients().await;
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let base = format!("http://{}/v2/team", server.addr);
    let data = blob((3 << 20) + 7, 9);
    g.write(&upload_name("team", "r", &data), &data, 1 << 20).await.unwrap();
    let d = digest(&data);
    let r = http
        .get(format!("{base}/blobs/{}/{}:splitBlob?chunkingFunction=FAST_CDC_2020", d.hash, d.size_bytes))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["chunkingFunction"], "FAST_CDC_2020");
    let chunks = reply["chunkDigests"].as_array().unwrap().clone();
    let expected: Vec<Value> = split(&data, FAST_CDC)
        .iter()
        .map(|c| json!({"hash": c.hash, "sizeBytes": c.size_bytes.to_string()}))
        .collect();
    assert_eq!(chunks, expected);
    let body = json!({"blobDigest": {"hash": d.hash, "sizeBytes": d.size_bytes.to_string()}, "chunkDigests": chunks});
    let r = http.post(format!("{base}/blobs:spliceBlob")).body(body.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["blobDigest"]["hash"], d.hash.as_str());
    let r = http.get(format!("{base}/blobs/{}/5:splitBlob", "00".repeat(32))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = http.post(format!("{base}/blobs/{}/5:splitBlob", d.hash)).send().await.unwrap();
    assert_eq!(r.status(), 405);
}
