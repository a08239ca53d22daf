//! Eviction's cost to writers, and startup time on a large directory:
//!
//! - write latency (p50/p99) of 64 KiB blobs with eviction idle (a budget
//!   far above the data) and with eviction running flat out (a 64 MiB budget
//!   written many times over, eviction passes back to back);
//! - the time to open a data directory holding 1 M small blobs.
//!
//!     cargo bench --bench eviction        (LARDER_BENCH_BLOBS=200000 for a quicker run)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use data::random_bytes;
use larder::digest::Digest;
use larder::store::eviction::{Budget, pass};
use larder::store::{Error, NewBlob, Store, StoreOptions};

/// The bench tool's data generator, shared as source (it is not library API).
#[path = "../src/bench/data.rs"]
#[allow(dead_code)] // a part of it is used here
mod data;

fn blob(n: u64, len: usize) -> Bytes {
    random_bytes(len, n).into()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Writes `count` distinct 64 KiB blobs one at a time, retrying refusals;
/// returns sorted latencies (including retries) and the refusal count.
fn write_latencies(store: &Store, first: u64, count: u64) -> (Vec<Duration>, u64) {
    let mut latencies = Vec::with_capacity(count as usize);
    let mut refusals = 0;
    for n in first..first + count {
        let data = blob(n, 64 << 10);
        let d = Digest::of(&data);
        let start = Instant::now();
        loop {
            match store.put_blobs(&[NewBlob::new(d, data.clone())]).remove(0) {
                Ok(_) => break,
                Err(Error::Full { .. }) => {
                    refusals += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("write failed: {e}"),
            }
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    (latencies, refusals)
}

fn report(what: &str, (latencies, refusals): (Vec<Duration>, u64)) {
    println!(
        "write 64 KiB, {what}: p50 {:?}, p99 {:?}, max {:?} ({refusals} refusals at the hard limit)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let writes = 4000; // 250 MiB: four times the small budget

    let idle = Store::open(&tmp.path().join("idle"), StoreOptions::default()).unwrap();
    report("eviction idle", write_latencies(&idle, 0, writes));
    drop(idle);

    let options = StoreOptions { max_size: 64 << 20, ..StoreOptions::default() };
    let store = Arc::new(Store::open(&tmp.path().join("busy"), options).unwrap());
    let budget =
        Budget { max_size: 64 << 20, high_watermark: 0.9, low_watermark: 0.8, min_age: Duration::ZERO };
    let running = Arc::new(AtomicBool::new(true));
    let evictor = {
        let (store, running) = (Arc::clone(&store), Arc::clone(&running));
        std::thread::spawn(move || {
            let mut passes = 0u64;
            while running.load(Ordering::Relaxed) {
                pass(&store, budget).unwrap();
                passes += 1;
            }
            passes
        })
    };
    let result = write_latencies(&store, 1_000_000, writes);
    running.store(false, Ordering::Relaxed);
    let passes = evictor.join().unwrap();
    report(&format!("eviction flat out ({passes} passes)"), result);
    println!(
        "  disk after: {:.1} MiB of a 64 MiB budget",
        store.measure_disk().unwrap() as f64 / (1 << 20) as f64
    );
    drop(store);

    // A directory of many small blobs, then the time to open it.
    let count: u64 =
        std::env::var("LARDER_BENCH_BLOBS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let dir = tmp.path().join("many");
    let start = Instant::now();
    {
        let store = Store::open(&dir, StoreOptions::default()).unwrap();
        for batch in 0..count / 1000 {
            let blobs: Vec<NewBlob> = (0..1000)
                .map(|i| {
                    let data = blob(batch * 1000 + i + 10_000_000, 100);
                    NewBlob::new(Digest::of(&data), data)
                })
                .collect();
            assert!(store.put_blobs(&blobs).iter().all(Result::is_ok));
        }
        store.flush_access_times().unwrap();
    }
    println!("filled {count} blobs of 100 B in {:?}", start.elapsed());
    let start = Instant::now();
    let store = Store::open(&dir, StoreOptions::default()).unwrap();
    let opened = start.elapsed();
    let stored = store.stored_bytes().unwrap();
    println!(
        "opened a directory of {count} blobs in {opened:?} (stored bytes {stored}, read without a scan)"
    );
}
