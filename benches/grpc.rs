//! End-to-end gRPC figures of larder on this machine: `larder bench grpc`'s
//! workloads against a server in this process, next to the machine's own
//! ceilings measured in the same run. The bench client is the real
//! `larder bench` binary, in a process of its own, so that the server's CPU
//! and memory are measured apart from the client's.
//!
//!     cargo bench --bench grpc            (LARDER_BENCH_SCALE=4 for longer runs)

use std::process::Command;

use larder::config::{Config, Flags};
use larder::server::Server;

#[tokio::main]
async fn main() {
    let scale: u64 = std::env::var("LARDER_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let tmp = tempfile::tempdir().unwrap();
    let flags = Flags::default()
        .with("listen", "127.0.0.1:0")
        .with("dir", tmp.path().join("data").display().to_string())
        .with("max_size", "20GiB");
    let config = Config::load(None, flags).unwrap();
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addr();
    let (opened, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(server.run(std::future::pending(), move || {
        let _ = opened.send(());
    }));
    ready.await.unwrap();

    let data_dir = tmp.path().join("data");
    let bytes = format!("{}MiB", scale * 256);
    let status = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_larder"))
            .args(["bench", "grpc", "--endpoint", &format!("grpc://{addr}")])
            .args(["--server-pid", &std::process::id().to_string(), "--server-dir"])
            .arg(&data_dir)
            .args(["--workload", "build,large,small,find-missing", "--data", "mixed,random"])
            .args(["--seed", "1", "--bytes", &bytes, "--concurrency", "4", "--miss-rate", "0.1"])
            .args(["--large-size", "32MiB"])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "larder bench failed: {status}");
}
