//! The size budget through the gRPC surface: `larder serve` with a small
//! max_size, written well past it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use larder::proto::reapi;
use tonic::Code;

const BUDGET: u64 = 64 << 20;

fn start(tmp: &Path, min_age: &str) -> TestServer {
    start_with(tmp, "64MiB", min_age)
}

fn start_with(tmp: &Path, max_size: &str, min_age: &str) -> TestServer {
    let config = tmp.join("larder.toml");
    std::fs::write(&config, format!("max_size = \"{max_size}\"\neviction_min_age = \"{min_age}\"\n"))
        .unwrap();
    TestServer::start(&tmp.join("data"), &["--config", config.to_str().unwrap()])
}

/// Writes `data` through ByteStream, retrying while the cache is full (for
/// at most two minutes: eviction that never catches up fails the test).
async fn write_retrying(c: &mut Clients, name: &str, data: &[u8]) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut refusals = 0;
    loop {
        match c.write(name, data, 256 << 10).await {
            Ok(_) => return refusals,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(Instant::now() < deadline, "still refused after {refusals} tries: {status:?}");
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("write failed: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_budgets_of_writes_stay_within_it_and_keep_the_hot_set() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "0s");
    let mut c = server.clients().await;
    // A hot set of 10 % of the budget, read again and again.
    let hot: Vec<Vec<u8>> = (0..25).map(|i| random_bytes(256 << 10, 1000 + i)).collect();
    for (i, h) in hot.iter().enumerate() {
        write_retrying(&mut c, &upload_name("", &format!("hot-{i}"), h), h).await;
    }
    let hot_digests: Vec<reapi::Digest> = hot.iter().map(|h| digest(h)).collect();
    let (mut written, mut peak, mut refusals, mut n) = (0u64, 0u64, 0, 0);
    while written < 3 * BUDGET {
        let data = random_bytes(512 << 10 | (n % 7) << 16, n as u64);
        refusals += write_retrying(&mut c, &upload_name("", &format!("cold-{n}"), &data), &data).await;
        written += data.len() as u64;
        n += 1;
        if n % 4 == 0 {
            for part in hot_digests.chunks(12) {
                let request = reapi::BatchReadBlobsRequest { digests: part.to_vec(), ..Default::default() };
                let read = c.cas.batch_read_blobs(request).await.unwrap().into_inner();
                let failed: Vec<_> =
                    read.responses.iter().filter(|r| r.status.as_ref().unwrap().code != 0).collect();
                assert!(failed.is_empty(), "hot blob lost: {:?}", failed[0].status);
            }
        }
        peak = peak.max(allocated(&server.dir));
    }
    eprintln!(
        "wrote {} MiB through a 64 MiB budget: peak {:.1} MiB on disk, {refusals} refusals",
        written >> 20,
        peak as f64 / (1 << 20) as f64
    );
    assert!(peak <= BUDGET + BUDGET / 10, "peak {peak} bytes on disk, budget {BUDGET}");
    assert!(c.find_missing(&hot_digests).await.is_empty(), "every hot blob is still present");
    for h in &hot {
        assert!(c.read(&read_name("", h), 0, 0).await.unwrap() == *h);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_the_hard_limit_fail_until_eviction_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing younger than 21 s (1.5 times the minimum age: eviction allows
    // for uses not written) may be evicted: the fill and the writes after
    // it (well under a second each here) must reach the limit long before
    // the first blob is old enough, even on a loaded machine.
    let server = start(tmp.path(), "14s");
    let mut c = server.clients().await;
    let first = random_bytes(1 << 20, 1);
    c.write(&upload_name("", "first", &first), &first, 1 << 20).await.unwrap();
    let mut fill = Vec::new();
    let refused = loop {
        assert!(fill.len() < 200, "never refused");
        let data = random_bytes(1 << 20, 10 + fill.len() as u64);
        match c.write(&upload_name("", &format!("fill-{}", fill.len()), &data), &data, 1 << 20).await {
            Ok(_) => fill.push(digest(&data)),
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("full"), "{}", refused.message());
    // Reads go on while writes are refused.
    assert_eq!(c.read(&read_name("", &first), 0, 0).await.unwrap(), first);
    // The disk estimate moves by a memtable's worth as RocksDB flushes, so a
    // write or two may still fit; 16 MiB cannot until eviction makes room,
    // which it does once blobs are old enough, without a restart.
    let start = Instant::now();
    let mut refusals = 0;
    for n in 0..16 {
        let data = random_bytes(1 << 20, 5000 + n);
        refusals += write_retrying(&mut c, &upload_name("", &format!("after-{n}"), &data), &data).await;
    }
    eprintln!("16 MiB accepted after {:?} and {refusals} refusals", start.elapsed());
    assert!(refusals > 0, "16 MiB past the hard limit were never refused");
    assert!(c.find_missing(&fill[..1]).await.len() == 1, "the least recently used blob was evicted");
    assert!(allocated(&server.dir) <= BUDGET + BUDGET / 10);
}

#[tokio::test]
async fn evicted_outputs_remove_their_action_results() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "0s");
    let mut c = server.clients().await;
    let output = random_bytes(100_000, 3);
    c.write(&upload_name("", "out", &output), &output, 1 << 20).await.unwrap();
    let action = digest(b"evicted action");
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "o".into(),
            digest: Some(digest(&output)),
            ..Default::default()
        }],
        ..Default::default()
    };
    c.put_action_result(&action, result).await;
    let get = reapi::GetActionResultRequest { action_digest: Some(action.clone()), ..Default::default() };
    c.ac.get_action_result(get.clone()).await.unwrap();
    // Push the output out with newer blobs.
    for n in 0..160 {
        let data = random_bytes(1 << 20, 100 + n);
        write_retrying(&mut c, &upload_name("", &format!("push-{n}"), &data), &data).await;
    }
    assert_eq!(c.find_missing(&[digest(&output)]).await.len(), 1, "the output was evicted");
    assert_code(c.ac.get_action_result(get.clone()).await, Code::NotFound);
    // Removed: even with the output back, the stale entry does not return.
    c.write(&upload_name("", "again", &output), &output, 1 << 20).await.unwrap();
    assert_code(c.ac.get_action_result(get).await, Code::NotFound);
}

/// A filesystem that fills before the budget is reached: writes are refused
/// and then accepted again as eviction makes room, never an error, never a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_before_the_budget_is_handled_like_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(tmp.path(), 48 << 20) else { return };
    let small = disk.path.clone();
    // A 1 GiB budget on a 48 MiB disk.
    let mut server = start_with(&small, "1GiB", "0s");
    let mut c = server.clients().await;
    let mut refusals = 0;
    for n in 0..120 {
        let data = random_bytes(1 << 20, 7000 + n);
        refusals += write_retrying(&mut c, &upload_name("", &format!("disk-{n}"), &data), &data).await;
    }
    eprintln!("120 MiB written to a 48 MiB disk with {refusals} refusals");
    assert!(server.is_running());
    let last = random_bytes(1 << 20, 7119);
    assert_eq!(c.read(&read_name("", &last), 0, 0).await.unwrap(), last);
}

/// `data` with `places` runs of 64 KiB overwritten and one of 10 KiB
/// inserted, at places drawn from `seed`.
fn edit(data: &[u8], places: usize, seed: u64) -> Vec<u8> {
    let noise = random_bytes(places * (64 << 10) + (10 << 10) + 8 * places + 8, seed);
    let pick = |i: usize, below: usize| {
        u64::from_le_bytes(noise[i * 8..i * 8 + 8].try_into().unwrap()) as usize % below
    };
    let mut out = data.to_vec();
    for p in 0..places {
        let at = pick(p, out.len() - (64 << 10));
        let run = &noise[64 + p * (64 << 10)..64 + (p + 1) * (64 << 10)];
        out[at..at + (64 << 10)].copy_from_slice(run);
    }
    let at = pick(places, out.len());
    out.splice(at..at, noise[noise.len() - (10 << 10)..].iter().copied());
    out
}

/// Successive versions of a large file share most of their chunks: the
/// chunks a present version needs are never evicted before it, the budget
/// holds, and a version read again and again stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_sharing_chunks_stay_within_the_budget_and_read_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "0s");
    let mut c = server.clients().await;
    let hot = random_bytes(6 << 20, 1);
    write_retrying(&mut c, &upload_name("", "hot", &hot), &hot).await;
    let mut version = random_bytes(8 << 20, 2);
    let (mut versions, mut peak, mut checked) = (Vec::new(), 0u64, 0);
    for n in 0..80u64 {
        version = edit(&version, 5, 100 + n);
        write_retrying(&mut c, &upload_name("", &format!("v{n}"), &version), &version).await;
        versions.push(digest(&version));
        peak = peak.max(allocated(&server.dir));
        if n % 4 != 3 {
            continue;
        }
        // Every version still present reads back whole: none lost a chunk.
        let missing = c.find_missing(&versions).await;
        for d in versions.iter().filter(|d| !missing.contains(d)) {
            let name = format!("blobs/{}/{}", d.hash, d.size_bytes);
            let bytes = c.read(&name, 0, 0).await.unwrap();
            assert_eq!(digest(&bytes), *d, "a present version reads back whole");
            checked += 1;
        }
        // Read last, the hot blob is the most recently used.
        assert!(c.read(&read_name("", &hot), 0, 0).await.unwrap() == hot, "the hot blob reads back");
    }
    let missing = c.find_missing(&versions).await.len();
    eprintln!(
        "80 versions of 8 MiB through a 64 MiB budget: peak {:.1} MiB on disk, {missing} evicted, {checked} reads of present versions",
        peak as f64 / (1 << 20) as f64
    );
    assert!(missing > 20, "the budget evicted old versions ({missing})");
    assert!(peak <= BUDGET + BUDGET / 10, "peak {peak} bytes on disk, budget {BUDGET}");
}
