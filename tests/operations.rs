//! Running larder for a team: graceful drain and signals.

mod common;

use std::time::Duration;

use common::*;
use larder::proto::bytestream::WriteRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Starts a ByteStream write whose messages the test sends one by one.
async fn open_upload(
    c: &mut Clients,
) -> (mpsc::Sender<WriteRequest>, tokio::task::JoinHandle<Result<i64, tonic::Status>>) {
    let (tx, rx) = mpsc::channel(4);
    let mut bs = c.bs.clone();
    let call =
        tokio::spawn(async move { Ok(bs.write(ReceiverStream::new(rx)).await?.into_inner().committed_size) });
    (tx, call)
}

#[tokio::test]
async fn sigterm_lets_an_upload_in_flight_finish_then_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    let data = random_bytes(3 << 20, 1);
    let mut messages = write_messages(&upload_name("", "drain", &data), &data, 0, 1 << 20, true).into_iter();
    let (tx, call) = open_upload(&mut c).await;
    tx.send(messages.next().unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.is_running(), "waits for the call in flight");
    for m in messages {
        tx.send(m).await.unwrap();
    }
    assert_eq!(call.await.unwrap().unwrap(), data.len() as i64);
    let status = server.wait_for_exit(Duration::from_secs(20)).expect("exits once drained");
    assert!(status.success(), "{status:?}");
    // Stored for good.
    let server = TestServer::start(&dir, &[]);
    let mut c = server.clients().await;
    assert!(c.read(&read_name("", &data), 0, 0).await.unwrap() == data);
}

/// A server with an upload that never finishes, and SIGTERM sent.
async fn stuck_and_terminated(
    dir: &std::path::Path,
    drain: &str,
) -> (TestServer, mpsc::Sender<WriteRequest>) {
    let server = TestServer::start(dir, &["--drain-timeout", drain]);
    let mut c = server.clients().await;
    let (tx, _call) = open_upload(&mut c).await;
    let first = write_messages(&upload_name("", "stuck", b"never finished"), b"never", 0, 4, false).remove(0);
    tx.send(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.terminate();
    (server, tx)
}

#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_drain_timeout_bounds_the_wait() {
    let tmp = tempfile::tempdir().unwrap();
    // A 60 s drain: the second signal ends it.
    let (mut server, _upload) = stuck_and_terminated(&tmp.path().join("a"), "60s").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.is_running(), "waits for the stuck upload");
    server.terminate();
    let status = server.wait_for_exit(Duration::from_secs(10)).expect("the second signal exits at once");
    assert_eq!(status.code(), Some(130));

    // A 1 s drain: larder stops waiting and exits 0.
    let (mut server, _upload) = stuck_and_terminated(&tmp.path().join("b"), "1s").await;
    let status = server.wait_for_exit(Duration::from_secs(15)).expect("exits after the drain timeout");
    assert!(status.success(), "{status:?}");
}
