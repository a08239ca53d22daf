//! ByteStream Read, Write and QueryWriteStatus through a real tonic client
//! against `larder serve`, with every rule of the REAPI cache notes.

mod common;

use std::time::Duration;

use common::*;
use larder::proto::bytestream::{ReadRequest, WriteRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn server() -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    (tmp, server)
}

#[tokio::test]
async fn write_then_read_at_offsets_and_limits() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    // 5.3 MiB over 1 MiB chunks, half compressible, half not.
    let mut data = text_bytes(3 << 20, 7);
    data.extend(random_bytes((2 << 20) + 300_000, 7));
    let name = upload_name("", "u-1", &data);
    // Bazel sends 16 KiB messages.
    assert_eq!(c.write(&name, &data, 16 << 10).await.unwrap(), data.len() as i64);
    let read = read_name("", &data);
    assert_eq!(c.read(&read, 0, 0).await.unwrap(), data);

    // Offsets inside a chunk, across chunk ends, with limits.
    for (offset, limit) in [(1, 0), (1_048_575, 2), (1_048_577, 3 << 20), (5_000_000, 0), (123_457, 1)] {
        let end = if limit == 0 { data.len() } else { (offset + limit).min(data.len()) };
        let got = c.read(&read, offset as i64, limit as i64).await.unwrap();
        assert!(got == data[offset..end], "offset {offset} limit {limit}");
    }
    // Offset at the end: OK, no data. Past it or negative: OUT_OF_RANGE.
    assert!(c.read(&read, data.len() as i64, 0).await.unwrap().is_empty());
    assert_code(c.read(&read, data.len() as i64 + 1, 0).await, Code::OutOfRange);
    assert_code(c.read(&read, -1, 0).await, Code::OutOfRange);
    assert_code(c.read(&read, 0, -1).await, Code::InvalidArgument);
    assert_code(c.read(&read_name("", b"absent"), 0, 0).await, Code::NotFound);
    assert_code(c.read("blobs/nothex/3", 0, 0).await, Code::InvalidArgument);

    // Every response message stays far below a client's 4 MiB limit.
    let request = ReadRequest { resource_name: read.clone(), read_offset: 0, read_limit: 0 };
    let mut stream = c.bs.read(request).await.unwrap().into_inner();
    while let Some(message) = stream.message().await.unwrap() {
        assert!(message.data.len() <= 2 << 20);
    }
}

#[tokio::test]
async fn instances_and_metadata_in_resource_names() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = b"shared by all instances".to_vec();
    let name = format!("{}/some/metadata", upload_name("a/b", "u", &data));
    c.write(&name, &data, 1 << 20).await.unwrap();
    assert_eq!(c.read(&read_name("a/b", &data), 0, 0).await.unwrap(), data);
    assert_eq!(c.read(&read_name("other", &data), 0, 0).await.unwrap(), data, "the CAS is shared");
    let d = digest(&data);
    let compressed = format!("compressed-blobs/lz4/{}/{}", d.hash, d.size_bytes);
    assert_code(c.read(&compressed, 0, 0).await, Code::InvalidArgument);
}

#[tokio::test]
async fn the_empty_blob_always_exists() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let name = upload_name("", "e", b"");
    assert!(c.read(&read_name("", b""), 0, 0).await.unwrap().is_empty());
    assert_eq!(c.write(&name, b"", 1).await.unwrap(), 0);
    assert_eq!(c.query(&name).await, (0, true));
}

#[tokio::test]
async fn bad_writes_are_refused_and_store_nothing() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = text_bytes(100_000, 3);
    let name = upload_name("", "bad", &data);

    // No resource name on the first message.
    let mut messages = write_messages(&name, &data, 0, 10_000, true);
    messages[0].resource_name.clear();
    assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);
    // The hash does not match the bytes.
    let mut wrong = data.clone();
    wrong[500] ^= 1;
    let messages = write_messages(&name, &wrong, 0, 10_000, true);
    let err = assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);
    assert!(err.message().contains("hash"), "{}", err.message());
    // More bytes than declared.
    let mut longer = data.clone();
    longer.push(0);
    let messages = write_messages(&name, &longer, 0, 10_000, true);
    assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);
    // finish_write before all bytes.
    let messages = write_messages(&name, &data[..50_000], 0, 10_000, true);
    assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);
    // A write_offset that skips bytes.
    let mut messages = write_messages(&name, &data, 0, 10_000, true);
    messages[3].write_offset += 1;
    assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);
    // The resource name changes midway.
    let mut messages = write_messages(&name, &data, 0, 10_000, true);
    messages[2].resource_name = upload_name("", "other", &data);
    assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);
    // Data after finish_write.
    let mut messages = write_messages(&name, &data, 0, 10_000, true);
    messages.push(WriteRequest { write_offset: data.len() as i64, data: "x".into(), ..Default::default() });
    assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);
    // Not a write resource.
    let messages = write_messages(&read_name("", &data), &data, 0, 10_000, true);
    assert_code(c.bs.write(tokio_stream::iter(messages)).await, Code::InvalidArgument);

    assert_eq!(c.find_missing(&[digest(&data)]).await.len(), 1, "nothing was stored");
    assert_eq!(c.upload_status(&name).await, None, "no upload is kept");
    // And a correct upload still works afterwards.
    assert_eq!(c.write(&name, &data, 10_000).await.unwrap(), data.len() as i64);
}

#[tokio::test]
async fn writing_an_existing_blob_finishes_at_once() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = random_bytes(3 << 20, 9);
    c.write(&upload_name("", "first", &data), &data, 1 << 20).await.unwrap();
    // Only the first message, never finished: the server answers anyway.
    let (tx, rx) = mpsc::channel(4);
    let name = upload_name("", "second", &data);
    tx.send(write_messages(&name, &data, 0, 1 << 20, false).remove(0)).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), c.bs.write(ReceiverStream::new(rx)))
        .await
        .expect("answered without waiting for the rest")
        .unwrap();
    assert_eq!(response.into_inner().committed_size, data.len() as i64);
    assert_eq!(c.query(&name).await, (data.len() as i64, true));
    drop(tx);
}

#[tokio::test]
async fn a_broken_upload_resumes_at_the_committed_size() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = random_bytes((4 << 20) + 12_345, 11);
    let name = upload_name("", "resume", &data);
    assert_eq!(c.upload_status(&name).await, None, "unknown uploads are NOT_FOUND");

    // The client goes away mid-stream, without finish_write.
    let (tx, rx) = mpsc::channel(64);
    let half = 2_500_000;
    for m in write_messages(&name, &data[..half], 0, 64 << 10, false) {
        tx.send(m).await.unwrap();
    }
    let mut bs = c.bs.clone();
    let call = tokio::spawn(async move { bs.write(ReceiverStream::new(rx)).await });
    let mut committed = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        committed = c.query(&name).await.0;
        if committed >= (2 << 20) {
            break;
        }
    }
    assert!(committed >= 2 << 20, "full chunks are committed while the stream runs: {committed}");
    call.abort(); // the connection's stream is reset
    drop(tx);
    let mut committed_after = committed;
    for _ in 0..100 {
        committed_after = c.query(&name).await.0;
        if committed_after == half as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(committed_after, half as i64, "everything received is kept on disconnect");

    // Resuming at another offset is refused; at the committed size it works.
    let wrong = write_messages(&name, &data, 1000, 64 << 10, true);
    assert_code(c.bs.write(tokio_stream::iter(wrong)).await, Code::InvalidArgument);
    let rest = write_messages(&name, &data, half, 64 << 10, true);
    let done = c.bs.write(tokio_stream::iter(rest)).await.unwrap().into_inner();
    assert_eq!(done.committed_size, data.len() as i64);
    assert_eq!(c.query(&name).await, (data.len() as i64, true));
    assert_eq!(c.read(&read_name("", &data), 0, 0).await.unwrap(), data);
}

#[tokio::test]
async fn a_stream_ending_without_finish_write_can_be_continued() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = text_bytes(300_000, 5);
    let name = upload_name("", "halfclose", &data);
    let first = write_messages(&name, &data[..100_000], 0, 30_000, false);
    let response = c.bs.write(tokio_stream::iter(first)).await.unwrap().into_inner();
    assert_eq!(response.committed_size, 100_000);
    assert_eq!(c.query(&name).await, (100_000, false));
    let rest = write_messages(&name, &data, 100_000, 30_000, true);
    c.bs.write(tokio_stream::iter(rest)).await.unwrap();
    assert_eq!(c.read(&read_name("", &data), 0, 0).await.unwrap(), data);
}

#[tokio::test]
async fn one_stream_at_a_time_per_upload() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    // A whole chunk first: the server stores it while the stream is open.
    let data = random_bytes(3 << 20, 13);
    let name = upload_name("", "busy", &data);
    let (tx, rx) = mpsc::channel(8);
    tx.send(write_messages(&name, &data[..1 << 20], 0, 1 << 20, false).remove(0)).await.unwrap();
    let mut bs = c.bs.clone();
    let first = tokio::spawn(async move { bs.write(ReceiverStream::new(rx)).await });
    c.until_committed(&name, 1 << 20).await;
    let second = write_messages(&name, &data, 0, 1 << 20, true);
    assert_code(c.bs.write(tokio_stream::iter(second)).await, Code::Aborted);
    for m in write_messages(&name, &data, 1 << 20, 1 << 20, true) {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    assert_eq!(first.await.unwrap().unwrap().into_inner().committed_size, data.len() as i64);
}
