//! The size budget as an operator sees it: the allocated blocks of every
//! file in the data directory, sampled like `du` many times a second while
//! clients write as fast as the server accepts.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use larder::proto::reapi;
use tonic::Code;

/// Samples the allocated bytes of a directory every 50 ms, keeping the peak.
struct Sampler {
    peak: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(dir: PathBuf) -> Sampler {
        let (peak, samples) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, samples, stop) = (Arc::clone(&peak), Arc::clone(&samples), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let bytes: u64 = allocated(&dir);
                    peak.fetch_max(bytes, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Sampler { peak, samples, stop, thread: Some(thread) }
    }

    /// The peak, and how many samples were taken.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (self.peak.load(Ordering::Relaxed), self.samples.load(Ordering::Relaxed))
    }
}

fn config(dir: &Path, max_size: &str, min_age: &str) -> PathBuf {
    let config = dir.join("larder.toml");
    std::fs::write(&config, format!("max_size = \"{max_size}\"\neviction_min_age = \"{min_age}\"\n"))
        .unwrap();
    config
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// What a writer did.
#[derive(Default)]
struct Tally {
    /// Digests and seeds of what was acknowledged.
    stored: Vec<(reapi::Digest, usize, u64)>,
    bytes: u64,
    refused: u64,
}

/// A blob of `len` bytes from `seed`, as the tests write them.
fn blob(len: usize, seed: u64) -> Vec<u8> {
    random_bytes(len, seed)
}

/// A tiny deterministic generator, so that every run writes the same mix.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// How long writers may be refused without a single write accepted: writes
/// that never come back fail the test rather than hang it.
const REFUSED_AT_MOST: Duration = Duration::from_secs(90);

/// Writes blobs of 1 to 8 MiB through ByteStream until `until` says stop,
/// retrying after a pause when refused; any other error fails the test.
async fn stream_writer(addr: String, writer: u64, mut until: impl FnMut(u64) -> bool) -> Tally {
    let mut c = Clients::connect(&addr).await;
    let mut tally = Tally::default();
    let mut state = 0x9e37_79b9_7f4a_7c15 ^ writer;
    let mut n = 0;
    let mut accepted = Instant::now();
    while !until(tally.bytes) {
        assert!(accepted.elapsed() < REFUSED_AT_MOST, "writes refused for {REFUSED_AT_MOST:?} on end");
        let len = (1 << 20) + (next(&mut state) % (7 << 20)) as usize;
        let seed = writer << 32 | n;
        let data = blob(len, seed);
        n += 1;
        match c.write(&upload_name("", &format!("w{writer}-{n}"), &data), &data, 256 << 10).await {
            Ok(_) => {
                tally.bytes += len as u64;
                tally.stored.push((digest(&data), len, seed));
                accepted = Instant::now();
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                tally.refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("ByteStream.Write: {status:?}"),
        }
    }
    tally
}

/// Writes batches of 4 to 64 KiB blobs with BatchUpdateBlobs until `until`
/// says stop.
async fn batch_writer(addr: String, writer: u64, mut until: impl FnMut(u64) -> bool) -> Tally {
    let mut c = Clients::connect(&addr).await;
    let mut tally = Tally::default();
    let mut state = 0x2545_f491_4f6c_dd1d ^ writer;
    let mut n = 0;
    let mut accepted = Instant::now();
    while !until(tally.bytes) {
        assert!(accepted.elapsed() < REFUSED_AT_MOST, "writes refused for {REFUSED_AT_MOST:?} on end");
        let blobs: Vec<(Vec<u8>, u64)> = (0..48)
            .map(|_| {
                n += 1;
                let seed = writer << 32 | n;
                (blob((4 << 10) + (next(&mut state) % (60 << 10)) as usize, seed), seed)
            })
            .collect();
        let data: Vec<&[u8]> = blobs.iter().map(|(b, _)| b.as_slice()).collect();
        let codes = c.batch_update(&data).await;
        let before = tally.stored.len();
        for ((b, seed), code) in blobs.iter().zip(codes) {
            match Code::from_i32(code) {
                Code::Ok => {
                    tally.bytes += b.len() as u64;
                    tally.stored.push((digest(b), b.len(), *seed));
                    accepted = Instant::now();
                }
                Code::ResourceExhausted => tally.refused += 1,
                other => panic!("BatchUpdateBlobs answered {other:?}"),
            }
        }
        if tally.stored.len() == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tally
}

/// Checks that every blob in `stored` that FindMissingBlobs calls present
/// reads back whole; returns how many were present.
async fn verify_present(c: &mut Clients, stored: &[(reapi::Digest, usize, u64)]) -> usize {
    let mut present = 0;
    for part in stored.chunks(1000) {
        let digests: Vec<reapi::Digest> = part.iter().map(|(d, _, _)| d.clone()).collect();
        let missing = c.find_missing(&digests).await;
        for (d, len, seed) in part.iter().filter(|(d, _, _)| !missing.contains(d)) {
            let data = c.read(&format!("blobs/{}/{}", d.hash, d.size_bytes), 0, 0).await;
            assert!(data.unwrap() == blob(*len, *seed), "blob {} reads back as written", d.hash);
            present += 1;
        }
    }
    present
}

/// Full-speed concurrent writers, three ByteStream and one batch, feed a
/// small budget three times its size while a hot set is read throughout:
/// the disk never goes past the budget by more than a tenth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_speed_writes_stay_within_the_budget() {
    const BUDGET: u64 = 128 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), "128MiB", "1s");
    let server = TestServer::start(&tmp.path().join("data"), &["--config", config.to_str().unwrap()]);
    let mut c = server.clients().await;
    // The hot set, about a tenth of the budget: large and small blobs.
    let large: Vec<Vec<u8>> = (0..4).map(|i| blob(2 << 20, 1 << 40 | i)).collect();
    for (i, data) in large.iter().enumerate() {
        c.write(&upload_name("", &format!("hot-{i}"), data), data, 1 << 20).await.unwrap();
    }
    let small: Vec<Vec<u8>> = (0..200).map(|i| blob(20 << 10, 2 << 40 | i)).collect();
    for part in small.chunks(50) {
        let part: Vec<&[u8]> = part.iter().map(Vec::as_slice).collect();
        assert!(c.batch_update(&part).await.iter().all(|code| *code == 0));
    }
    let sampler = Sampler::start(server.dir.clone());
    let started = Instant::now();
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let until = |written: Arc<AtomicU64>| {
        let mut last = 0;
        move |mine: u64| {
            written.fetch_add(mine - last, Ordering::Relaxed);
            last = mine;
            written.load(Ordering::Relaxed) >= 3 * BUDGET
        }
    };
    let mut writers = Vec::new();
    for w in 0..3 {
        writers.push(tokio::spawn(stream_writer(server.addr.clone(), w, until(Arc::clone(&written)))));
    }
    writers.push(tokio::spawn(batch_writer(server.addr.clone(), 9, until(Arc::clone(&written)))));
    // The hot set is read again and again while the writers run.
    let reader = {
        let (addr, done) = (server.addr.clone(), Arc::clone(&done));
        let (large, small) = (large.clone(), small.clone());
        tokio::spawn(async move {
            let mut c = Clients::connect(&addr).await;
            let digests: Vec<reapi::Digest> = small.iter().map(|b| digest(b)).collect();
            let mut rounds = 0;
            while !done.load(Ordering::Relaxed) {
                for data in &large {
                    assert!(
                        c.read(&read_name("", data), 0, 0).await.unwrap() == *data,
                        "a hot blob was lost"
                    );
                }
                let request = reapi::BatchReadBlobsRequest { digests: digests.clone(), ..Default::default() };
                let read = c.cas.batch_read_blobs(request).await.unwrap().into_inner();
                assert!(
                    read.responses.iter().all(|r| r.status.as_ref().unwrap().code == 0),
                    "a hot blob was lost"
                );
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            rounds
        })
    };
    let mut tally = Tally::default();
    for w in writers {
        let t = w.await.unwrap();
        (tally.bytes, tally.refused) = (tally.bytes + t.bytes, tally.refused + t.refused);
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let rounds = reader.await.unwrap();
    let (peak, samples) = sampler.finish();
    eprintln!(
        "{:.0} MiB acknowledged in {elapsed:.1?} ({:.0} MiB/s), {} refusals, {rounds} hot-set reads; \
         peak disk {:.1} MiB = {:.2}x the {} MiB budget ({samples} samples)",
        mib(tally.bytes),
        mib(tally.bytes) / elapsed.as_secs_f64(),
        tally.refused,
        mib(peak),
        peak as f64 / BUDGET as f64,
        BUDGET >> 20
    );
    assert!(samples >= 10 * elapsed.as_secs(), "sampled {samples} times in {elapsed:?}");
    assert!(
        peak <= BUDGET + BUDGET / 10,
        "peak {:.1} MiB on disk under a {} MiB budget",
        mib(peak),
        BUDGET >> 20
    );
    assert!(c.find_missing(&small.iter().map(|b| digest(b)).collect::<Vec<_>>()).await.is_empty());
}

/// A data directory on a small tmpfs under a much larger budget: writes are
/// refused with RESOURCE_EXHAUSTED while it is full, come back once blobs
/// are old enough to evict, and a restart on the full disk serves every
/// blob still present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_takes_writes_again_after_a_pause_and_restarts() {
    const DISK: u64 = 128 << 20;
    const MIN_AGE: Duration = Duration::from_secs(10);
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(tmp.path(), DISK) else { return };
    let small = disk.path.clone();
    let config = config(tmp.path(), "8GiB", "10s");
    let args = ["--config", config.to_str().unwrap()];
    let server = TestServer::start(&small.join("data"), &args);

    // Fill the disk at full speed, twice over.
    let written = Arc::new(AtomicU64::new(0));
    let until = |written: Arc<AtomicU64>| {
        let mut last = 0;
        move |mine: u64| {
            written.fetch_add(mine - last, Ordering::Relaxed);
            last = mine;
            written.load(Ordering::Relaxed) >= 2 * DISK
        }
    };
    let writers = vec![
        tokio::spawn(stream_writer(server.addr.clone(), 1, until(Arc::clone(&written)))),
        tokio::spawn(stream_writer(server.addr.clone(), 2, until(Arc::clone(&written)))),
        tokio::spawn(batch_writer(server.addr.clone(), 3, until(Arc::clone(&written)))),
    ];
    let mut stored = Vec::new();
    let mut refused = 0;
    for w in writers {
        let t = w.await.unwrap();
        stored.extend(t.stored);
        refused += t.refused;
    }
    eprintln!(
        "{:.0} MiB acknowledged on a {} MiB disk, {refused} refusals",
        mib(written.load(Ordering::Relaxed)),
        DISK >> 20
    );

    // Fill it until writes are refused.
    let mut c = server.clients().await;
    let mut n = 0;
    loop {
        let data = blob(4 << 20, 5 << 40 | n);
        n += 1;
        match c.write(&upload_name("", &format!("fill-{n}"), &data), &data, 1 << 20).await {
            Ok(_) => stored.push((digest(&data), data.len(), 5 << 40 | (n - 1))),
            Err(status) if status.code() == Code::ResourceExhausted => break,
            Err(status) => panic!("ByteStream.Write: {status:?}"),
        }
        assert!(n < 1000, "a {} MiB disk took 4 GiB without a refusal", DISK >> 20);
    }

    // After a pause, writes are taken again.
    let paused = Instant::now();
    let accepted = loop {
        let data = blob(4 << 20, 6 << 40 | n);
        n += 1;
        match c.write(&upload_name("", &format!("after-{n}"), &data), &data, 1 << 20).await {
            Ok(_) => break paused.elapsed(),
            Err(status) if status.code() == Code::ResourceExhausted => {}
            Err(status) => panic!("ByteStream.Write: {status:?}"),
        }
        assert!(
            paused.elapsed() < MIN_AGE + Duration::from_secs(30),
            "still refused after a pause of {:?}",
            paused.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("the first write after the pause was accepted after {accepted:.1?} (min age {MIN_AGE:?})");
    let present = verify_present(&mut c, &stored).await;
    eprintln!("{present} of {} acknowledged blobs still present, every one intact", stored.len());
    assert!(present > 0);

    // Full again, then a restart on the full disk.
    loop {
        let data = blob(4 << 20, 7 << 40 | n);
        n += 1;
        match c.write(&upload_name("", &format!("refill-{n}"), &data), &data, 1 << 20).await {
            Ok(_) => stored.push((digest(&data), data.len(), 7 << 40 | (n - 1))),
            Err(status) if status.code() == Code::ResourceExhausted => break,
            Err(status) => panic!("ByteStream.Write: {status:?}"),
        }
    }
    drop(c);
    assert!(server.stop().success());
    let server = TestServer::start(&small.join("data"), &args);
    let mut c = server.clients().await;
    let present = verify_present(&mut c, &stored).await;
    eprintln!("after a restart on the full disk, {present} blobs present, every one intact");
    assert!(present > 0);
}
