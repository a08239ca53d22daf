//! End-to-end gRPC figures of larder on this machine: `larder bench grpc`'s
//! workloads against an in-process server, next to the machine's own
//! ceilings measured in the same run.
//!
//!     cargo bench --bench grpc            (LARDER_BENCH_SCALE=4 for longer runs)

use larder::bench::data::Data;
use larder::bench::measure::Ceilings;
use larder::bench::report::{Run, table};
use larder::bench::workload::Workload;
use larder::bench::{Common, GrpcArgs, Phases, bench_grpc};
use larder::config::{ByteSize, Config, Overrides};
use larder::server::Server;

#[tokio::main]
async fn main() {
    let scale: u64 = std::env::var("LARDER_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let tmp = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        dir: Some(tmp.path().join("data")),
        max_size: Some("20GiB".into()),
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

    let data = vec![Data::Mixed, Data::Random];
    let args = GrpcArgs {
        endpoint: vec![format!("grpc://{addr}")],
        instance: String::new(),
        server_pid: None,
        server_dir: Some(tmp.path().join("data")),
        phase: Phases::All,
        common: Common {
            workload: vec![Workload::Build, Workload::Large, Workload::Small, Workload::FindMissing],
            data: data.clone(),
            seed: 1,
            bytes: ByteSize(scale * (256 << 20)),
            concurrency: 4,
            miss_rate: 0.1,
            large_size: ByteSize(32 << 20),
            json: false,
            csv: false,
            plot: None,
        },
    };
    let ceilings = tokio::task::spawn_blocking(move || Ceilings::measure(&data)).await.unwrap();
    let runs = bench_grpc(&args).await.unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The server runs in this process: its CPU and memory include the client's.
    print!("{}", table(&larder::bench::finish(Run { ceilings, cores, runs })));
}
