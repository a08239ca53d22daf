//! `larder bench`: every workload runs against an embedded store and a real
//! server, its figures come out in each format, and a server that returns a
//! wrong byte fails the run.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::TestServer;
use larder::proto::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use larder::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use larder::proto::reapi;
use larder::proto::reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use serde_json::Value;
use tonic::{Request, Response, Status, Streaming};

const ALL: &str = "build,large,small,find-missing";

/// Runs `larder bench` with the small settings these tests use (and 6 MiB
/// per workload unless `args` say otherwise); its JSON report's runs, or
/// what it printed on stderr when it failed.
async fn bench(args: Vec<String>) -> Result<Vec<Value>, String> {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_larder"))
            .arg("bench")
            .args(&args)
            .args(["--concurrency", "3", "--miss-rate", "0.2", "--large-size", "2MiB"])
            .args(["--data", "mixed", "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok(run["runs"].as_array().unwrap().clone())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn grpc(endpoint: &str, workloads: &str, seed: u64, phase: &str) -> Vec<String> {
    let seed = seed.to_string();
    strings(&[
        "grpc",
        "--endpoint",
        endpoint,
        "--workload",
        workloads,
        "--seed",
        &seed,
        "--phase",
        phase,
        "--bytes",
        "6MiB",
    ])
}

fn store(dir: &Path, workloads: &str, seed: u64, bytes: &str) -> Vec<String> {
    let seed = seed.to_string();
    let mut args = strings(&["store", "--workload", workloads, "--seed", &seed, "--bytes", bytes, "--dir"]);
    args.push(dir.display().to_string());
    args
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_against_an_embedded_store() {
    let tmp = tempfile::tempdir().unwrap();
    let reports = bench(store(tmp.path(), ALL, 1, "6MiB")).await.unwrap();
    assert_eq!(reports.len(), 4);
    for r in &reports {
        let what = r["workload"].to_string();
        assert!(
            number(&r["logical_bytes"]) >= (6 << 20) as f64,
            "{what}: {} logical bytes",
            r["logical_bytes"]
        );
        assert!(
            number(&r["write"]["bytes_sent"]) >= (6 << 20) as f64,
            "{what} wrote {}",
            r["write"]["bytes_sent"]
        );
        assert!(number(&r["ingest_mbps"]) > 0.0 && number(&r["write_ops_per_sec"]) > 0.0, "{what}");
        assert!(number(&r["disk_bytes"]) > 0.0 && number(&r["space_amplification"]) > 0.1, "{what}");
        assert!(r["write_amplification"].is_number() && r["cpu_seconds_per_gib"].is_number(), "{what}");
        assert!(number(&r["peak_rss_bytes"]) > (1 << 20) as f64, "{what}");
        let latency = &r["latency"];
        assert!(
            number(&latency["calls"]) > 0.0 && number(&latency["p50_us"]) <= number(&latency["p999_us"]),
            "{what}"
        );
        if r["workload"] == "find-missing" {
            assert_eq!(number(&r["read"]["bytes_received"]), 0.0);
            assert!(number(&r["read"]["ops"]) >= 4000.0, "{} digests looked up", r["read"]["ops"]);
            assert!(r["latency_by_call"].get("FindMissingBlobs").is_some());
        } else {
            // Everything written is read back (a warm build reads the hits).
            assert!(number(&r["read"]["bytes_received"]) > 0.0 && r["read_mbps"].is_number(), "{what}");
        }
    }
    let build = &reports[0];
    assert_eq!(build["workload"], "build");
    for call in
        ["FindMissingBlobs", "GetActionResult", "UpdateActionResult", "BatchUpdateBlobs", "BatchReadBlobs"]
    {
        assert!(build["latency_by_call"].get(call).is_some(), "the build made no {call} call");
    }
    // The temporary stores are gone.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// Held to a budget smaller than what it writes, the store evicts as the
/// server would, and the report gives the peak disk against the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_held_to_a_budget_reports_its_peak_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("larder.toml");
    std::fs::write(&config, "eviction_min_age = \"1s\"\n").unwrap();
    let mut args = store(&tmp.path().join("stores"), "large", 3, "64MiB");
    args.extend(strings(&["--config", config.to_str().unwrap(), "--max-size", "24MiB"]));
    let reports = bench(args).await.unwrap();
    let r = &reports[0];
    assert_eq!(number(&r["max_size"]), (24 << 20) as f64);
    let peak = number(&r["peak_disk_bytes"]);
    eprintln!("64 MiB written under a 24 MiB budget: peak disk {:.2}x the budget", peak / (24 << 20) as f64);
    assert!(peak > (12 << 20) as f64 && peak <= ((24 << 20) * 11 / 10) as f64, "peak disk {peak}");
    assert!(number(&r["ingest_mbps"]) > 0.0);
    assert_eq!(number(&r["read"]["ops"]), 0.0, "reads would find evicted blobs missing: skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_against_a_server_and_a_rerun_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    let endpoint = format!("grpc://{}", server.addr);
    let mut args = grpc(&endpoint, ALL, 7, "all");
    args.extend(strings(&["--server-dir", tmp.path().join("data").to_str().unwrap()]));
    let reports = bench(args).await.unwrap();
    assert_eq!(reports.len(), 4);
    for r in &reports {
        let what = r["workload"].to_string();
        assert!(
            r["ingest_mbps"].is_number() && number(&r["write"]["bytes_sent"]) >= (6 << 20) as f64,
            "{what}"
        );
        // The server is found by its port and measured.
        assert!(number(&r["cpu_seconds_per_gib"]) > 0.0, "{what}");
        assert!(number(&r["peak_rss_bytes"]) > (1 << 20) as f64);
        assert!(r["disk_bytes"].is_number());
    }

    // The same seed again would measure nothing: refused, with what to do.
    let again = bench(grpc(&endpoint, "small", 7, "all")).await;
    assert!(again.as_ref().is_err_and(|message| message.contains("another --seed")), "{again:?}");
    // Reading what an earlier run wrote is fine, and checks every byte.
    let read = bench(grpc(&endpoint, "large", 7, "read")).await.unwrap();
    assert_eq!(number(&read[0]["read"]["bytes_received"]), (6 << 20) as f64);
    assert!(read[0]["ingest_mbps"].is_null());
    // A seed nothing was written with: the reads find their blobs missing.
    let missing = bench(grpc(&endpoint, "large", 8, "read")).await;
    assert!(
        missing.as_ref().is_err_and(|message| message.contains("is missing from the target")),
        "{missing:?}"
    );
}

/// `bench grpc --yardstick` runs each workload against a yardstick it
/// starts, then against the server, round after round, and gives each of the
/// server's throughputs as a fraction of the yardstick's in the same round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_yardstick_runs_first_and_figures_are_fractions_of_its() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    let mut args = grpc(&format!("grpc://{}", server.addr), "small,large", 4, "all");
    args.extend(strings(&["--yardstick", "--rounds", "2"]));
    let reports = bench(args).await.unwrap();
    assert_eq!(reports.len(), 8, "two rounds of two workloads on two servers");
    for (n, pair) in reports.chunks(2).enumerate() {
        let (y, l) = (&pair[0], &pair[1]);
        let round = (n / 2 + 1).to_string();
        assert_eq!(
            (y["config"].as_str(), y["settings"]["server"].as_str(), y["settings"]["round"].as_str()),
            (Some(format!("yardstick, round {round}").as_str()), Some("yardstick"), Some(round.as_str()))
        );
        assert_eq!(l["settings"]["round"].as_str(), Some(round.as_str()));
        assert_eq!(y["workload"], l["workload"]);
        assert_eq!(y["workload"], if n % 2 == 0 { "small" } else { "large" });
        // Each round writes blobs of its own: the seed plus the round.
        let seed = (4 + n / 2) as f64;
        assert_eq!((number(&y["seed"]), number(&l["seed"])), (seed, seed));
        // Measured: its CPU (which /proc counts in 10 ms ticks: a small run
        // on an in-memory server may take none) and its peak RSS.
        assert!(y["cpu_seconds_per_gib"].is_number(), "the yardstick's process is measured");
        assert!(number(&y["peak_rss_bytes"]) > (1 << 20) as f64, "the yardstick's process is measured");
        for (figure, fraction) in [
            ("ingest_mbps", "ingest"),
            ("read_mbps", "read"),
            ("write_ops_per_sec", "write_ops"),
            ("read_ops_per_sec", "read_ops"),
        ] {
            assert_eq!(number(&y["vs_yardstick"][fraction]), 1.0);
            let expected = number(&l[figure]) / number(&y[figure]);
            let got = number(&l["vs_yardstick"][fraction]);
            assert!(got > 0.0 && (got - expected).abs() < 1e-9, "{fraction}: {got} against {expected}");
        }
    }
}

/// `--compressor zstd` sends and takes blobs as zstd where the server offers
/// it, as larder and the yardstick do: every byte is still checked, the rows
/// say so, and larder receives and sends fewer bytes than the blobs hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_transfers_move_compressed_bytes_and_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    let http = reqwest::Client::new();
    let metrics = format!("http://{}/metrics", server.addr);
    let wire = || async {
        let page = http.get(&metrics).send().await.unwrap().text().await.unwrap();
        let sample = |series: &str| -> f64 {
            let line = page.lines().find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')));
            line.unwrap_or_else(|| panic!("no {series} in:\n{page}")).parse().unwrap()
        };
        (sample("larder_received_bytes_total"), sample("larder_sent_bytes_total"))
    };
    let before = wire().await;
    let mut args = grpc(&format!("grpc://{}", server.addr), "build,small,large", 6, "all");
    args.extend(strings(&["--yardstick", "--compressor", "zstd"]));
    let reports = bench(args).await.unwrap();
    let after = wire().await;
    assert_eq!(reports.len(), 6, "three workloads on two servers");
    for r in &reports {
        assert_eq!(r["settings"]["compressor"], "zstd", "{r}");
        assert!(r["config"].as_str().unwrap().ends_with("zstd transfers"), "{r}");
    }
    let larder = reports.iter().filter(|r| r["settings"]["server"].is_null());
    let (written, read) = larder.fold((0.0, 0.0), |(w, r), report| {
        (w + number(&report["write"]["bytes_sent"]), r + number(&report["read"]["bytes_received"]))
    });
    // The mixed data compresses to about half; as they are, the bytes on
    // the wire would be more than the blobs hold.
    let (received, sent) = (after.0 - before.0, after.1 - before.1);
    assert!(received < 0.8 * written, "larder received {received} bytes for {written} written");
    assert!(sent < 0.8 * read, "larder sent {sent} bytes for {read} read");
}

/// A CAS that keeps blobs in memory and flips one bit of every blob it
/// returns (batch reads answered in reverse order).
#[derive(Clone, Default)]
struct Liar {
    blobs: Arc<Mutex<HashMap<String, Bytes>>>,
}

fn flipped(data: &Bytes) -> Bytes {
    let mut v = data.to_vec();
    let last = v.len() - 1;
    v[last] ^= 1;
    v.into()
}

#[tonic::async_trait]
impl ContentAddressableStorage for Liar {
    async fn find_missing_blobs(
        &self,
        r: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let blobs = self.blobs.lock().unwrap();
        let missing =
            r.into_inner().blob_digests.into_iter().filter(|d| !blobs.contains_key(&d.hash)).collect();
        Ok(Response::new(reapi::FindMissingBlobsResponse { missing_blob_digests: missing }))
    }

    async fn batch_update_blobs(
        &self,
        r: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        let mut blobs = self.blobs.lock().unwrap();
        let responses = r
            .into_inner()
            .requests
            .into_iter()
            .map(|q| {
                let digest = q.digest.unwrap();
                blobs.insert(digest.hash.clone(), q.data);
                reapi::batch_update_blobs_response::Response { digest: Some(digest), status: None }
            })
            .collect();
        Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        r: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        let blobs = self.blobs.lock().unwrap();
        // In reverse order, which REAPI allows: the bench must match answers
        // by digest to see the wrong bytes.
        let responses = r
            .into_inner()
            .digests
            .into_iter()
            .rev()
            .map(|d| reapi::batch_read_blobs_response::Response {
                data: flipped(&blobs[&d.hash]),
                digest: Some(d),
                status: None,
                compressor: 0,
            })
            .collect();
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream =
        Pin<Box<dyn futures::Stream<Item = Result<reapi::GetTreeResponse, Status>> + Send + 'static>>;

    async fn get_tree(
        &self,
        _: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented("no GetTree"))
    }

    async fn split_blob(
        &self,
        _: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("no SplitBlob"))
    }

    async fn splice_blob(
        &self,
        _: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("no SpliceBlob"))
    }
}

#[tonic::async_trait]
impl ByteStream for Liar {
    type ReadStream = Pin<Box<dyn futures::Stream<Item = Result<ReadResponse, Status>> + Send + 'static>>;

    async fn read(&self, r: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let name = r.into_inner().resource_name;
        let hash = name.split('/').nth(1).unwrap().to_string();
        let data = flipped(&self.blobs.lock().unwrap()[&hash]);
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(ReadResponse { data })]))))
    }

    async fn write(&self, r: Request<Streaming<WriteRequest>>) -> Result<Response<WriteResponse>, Status> {
        let mut stream = r.into_inner();
        let (mut name, mut data) = (String::new(), Vec::new());
        while let Some(m) = stream.message().await? {
            if name.is_empty() {
                name = m.resource_name;
            }
            data.extend_from_slice(&m.data);
        }
        let hash = name.split('/').nth(3).unwrap().to_string();
        let committed_size = data.len() as i64;
        self.blobs.lock().unwrap().insert(hash, data.into());
        Ok(Response::new(WriteResponse { committed_size }))
    }

    async fn query_write_status(
        &self,
        _: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("no QueryWriteStatus"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_returns_a_wrong_byte_fails_the_bench() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let liar = Liar::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                ContentAddressableStorageServer::new(liar.clone()).max_decoding_message_size(64 << 20),
            )
            .add_service(ByteStreamServer::new(liar))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    for workload in ["small", "large"] {
        match bench(grpc(&format!("grpc://{addr}"), workload, 3, "all")).await {
            Err(message) => {
                assert!(message.contains("the server returned wrong bytes"), "{workload}: {message}");
            }
            Ok(runs) => panic!("{workload}: wrong bytes were not caught: {runs:?}"),
        }
    }
    // It offers no zstd (it answers no GetCapabilities): asked for zstd,
    // the bench says so and sends and reads blobs as they are, checked.
    let mut args = grpc(&format!("grpc://{addr}"), "small", 4, "all");
    args.extend(strings(&["--compressor", "zstd"]));
    let message = bench(args).await.unwrap_err();
    assert!(message.contains("offers no zstd for ByteStream and batches"), "{message}");
    assert!(message.contains("the server returned wrong bytes"), "{message}");
}

#[test]
fn the_command_prints_json_csv_and_a_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let svg = tmp.path().join("sweep.svg");
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_larder"))
            .args(["bench", "store", "--bytes", "3MiB", "--workload", "small", "--dir"])
            .arg(tmp.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Not a terminal: no progress bar.
        assert!(!String::from_utf8_lossy(&out.stderr).contains("tasks"));
        String::from_utf8(out.stdout).unwrap()
    };

    let json: serde_json::Value =
        serde_json::from_str(&run(&["--json", "--plot", svg.to_str().unwrap()])).unwrap();
    assert_eq!(json["runs"][0]["workload"], "small");
    assert!(json["ceilings"]["sha256_mbps"].as_f64().unwrap() > 10.0);
    // The disk under --dir is measured too, and its probe file removed.
    assert!(json["ceilings"]["disk_write_mbps"].as_f64().unwrap() > 1.0, "{json}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file() && e.path() != svg)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(json["runs"][0]["ingest_vs_sha256"].as_f64().unwrap() > 0.0);
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.matches("<circle").count() >= 2, "{chart}");

    // A sweep: one row per setting, and the setting takes effect.
    let csv = run(&["--csv", "--zstd-level", "0,1", "--data", "text"]);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    let header: Vec<&str> = rows[0].split(',').collect();
    let column = |row: &str, name: &str| -> f64 {
        let at = header.iter().position(|h| *h == name).unwrap();
        row.split(',').nth(at).unwrap().parse().unwrap()
    };
    assert!(rows[1].contains("zstd 0") && rows[2].contains("zstd 1"), "{csv}");
    let (raw, zstd) = (column(rows[1], "space_amplification"), column(rows[2], "space_amplification"));
    assert!(zstd * 2.0 < raw, "text at zstd 1 takes {zstd:.2}x, uncompressed {raw:.2}x");

    let table = run(&[]);
    assert!(table.contains("ingest MB/s") && table.contains("one core hashes SHA-256"), "{table}");
    assert!(table.contains("its disk writes"), "{table}");
}

/// `larder bench yardstick` serves a bare in-memory cache: every workload
/// that needs no GetTree runs against it and reads back every byte, and it
/// refuses bytes that do not match their digest.
#[tokio::test]
async fn the_yardstick_serves_the_workloads_and_checks_uploads() {
    use std::io::{BufRead, BufReader};
    /// The yardstick's process, killed however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_larder"))
            .args(["bench", "yardstick", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("serving REAPI on ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    {
        let endpoint = format!("grpc://{addr}");
        let reports = bench(grpc(&endpoint, "build,large,small,find-missing", 3, "all")).await.unwrap();
        assert_eq!(reports.len(), 4);
        let mut cas = reapi::content_addressable_storage_client::ContentAddressableStorageClient::connect(
            format!("http://{addr}"),
        )
        .await
        .unwrap();
        let data = Bytes::from_static(b"checked");
        let mut wrong = common::digest(&data);
        wrong.hash = common::digest(b"other").hash;
        let request = reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(wrong),
                data,
                compressor: 0,
            }],
            ..Default::default()
        };
        let reply = cas.batch_update_blobs(request).await.unwrap().into_inner();
        assert_eq!(reply.responses[0].status.as_ref().unwrap().code, tonic::Code::InvalidArgument as i32);

        // zstd through ByteStream: a blob past the 64 MiB a message holds is
        // checked as it decodes; a frame that decodes to more than the size
        // it is sent as is refused.
        let bytestream = larder::proto::bytestream::byte_stream_client::ByteStreamClient::connect(format!(
            "http://{addr}"
        ))
        .await
        .unwrap();
        let big = vec![7u8; 65 << 20];
        let frame = Bytes::from(zstd::bulk::compress(&big, 1).unwrap());
        let write = |d: reapi::Digest, frame: Bytes| {
            let name = format!("uploads/a/compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes);
            let message =
                WriteRequest { resource_name: name, write_offset: 0, finish_write: true, data: frame };
            let mut bytestream = bytestream.clone();
            async move { bytestream.write(futures::stream::iter([message])).await }
        };
        let committed = write(common::digest(&big), frame.clone()).await.unwrap().into_inner().committed_size;
        assert_eq!(committed, frame.len() as i64);
        let name = format!("compressed-blobs/zstd/{}/{}", common::digest(&big).hash, big.len());
        let mut read =
            bytestream.clone().read(ReadRequest { resource_name: name, ..Default::default() }).await.unwrap();
        let mut back = Vec::new();
        while let Some(m) = read.get_mut().message().await.unwrap() {
            back.extend_from_slice(&m.data);
        }
        assert!(zstd::bulk::decompress(&back, big.len()).unwrap() == big);
        let small = &big[..1 << 20];
        let refused = write(common::digest(small), frame).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    }
}
