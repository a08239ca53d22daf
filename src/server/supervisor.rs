//! The supervisor: the one owner of the background tasks. It starts them all
//! once the store is open (upkeep, eviction, the replicator, the online
//! scrub) and stops them all at shutdown, then writes the access times still
//! in memory. Dropped without `stop`, it aborts them (a `JoinSet` does).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::cache::{Cache, blocking};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::status::Board;
use crate::store::Store;
use crate::store::eviction;

/// How often access times recorded in memory are written to the index.
const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// The most a stop spends writing access times still in memory (a million
/// of them took over a minute): what is left is lost, as in a crash.
const STOP_FLUSH_TIME: Duration = Duration::from_secs(3);
/// Pause between two passes of the online scrub.
const SCRUB_PAUSE: Duration = Duration::from_secs(60);

pub struct Supervisor {
    store: Arc<Store>,
    tasks: JoinSet<()>,
    /// Set at shutdown: a scrub pass stops at the next blob (it runs on a
    /// blocking thread, which an abort does not reach).
    stopping: Arc<AtomicBool>,
}

impl Supervisor {
    pub fn start(
        store: &Arc<Store>,
        cache: &Arc<Cache>,
        config: &Config,
        metrics: &Arc<Metrics>,
        board: &Arc<Board>,
    ) -> Supervisor {
        let mut tasks = JoinSet::new();
        let stopping = Arc::new(AtomicBool::new(false));
        if let Some(tier_work) = cache.tier_work() {
            tasks.spawn(tier_work);
        }
        tasks.spawn(maintain(
            Arc::clone(store),
            config.store.partial_upload_max_age,
            Arc::clone(metrics),
            Arc::clone(board),
            Arc::clone(&stopping),
        ));
        tasks.spawn(eviction::run(Arc::clone(store), eviction::Budget::of(config)));
        if config.store.scrub_rate.0 > 0 {
            tasks.spawn(scrub_online(Arc::clone(store), config.store.scrub_rate.0, Arc::clone(&stopping)));
        }
        Supervisor { store: Arc::clone(store), tasks, stopping }
    }

    /// Stops every task and writes pending access times, for a few
    /// seconds at most.
    pub async fn stop(mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.tasks.shutdown().await;
        let store = Arc::clone(&self.store);
        let deadline = Instant::now() + STOP_FLUSH_TIME;
        match blocking(move || store.flush_access_times_while(&|| Instant::now() < deadline)).await {
            Ok(flushed) if flushed.left > 0 => tracing::info!(
                "stopped with {} access-time refreshes unwritten (the last {STOP_FLUSH_TIME:?} of the stop were spent on {}): those blobs keep their last written use",
                flushed.left,
                flushed.updated
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("could not write access times at shutdown: {e}"),
        }
    }
}

/// Scrubs the store pass after pass, at most `rate` bytes per second.
async fn scrub_online(store: Arc<Store>, rate: u64, stopping: Arc<AtomicBool>) {
    while !stopping.load(Ordering::Relaxed) {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stopping));
        let pass = blocking(move || {
            let started = Instant::now();
            let mut done = 0u64;
            let report = store.scrub(|size| {
                done += size;
                // Sleep off whatever runs ahead of the rate, in short steps
                // so that a shutdown never waits on it.
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                while let Some(ahead) = due.checked_sub(started.elapsed()) {
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    std::thread::sleep(ahead.min(Duration::from_millis(100)));
                }
                !stop.load(Ordering::Relaxed)
            })?;
            Ok::<_, crate::store::Error>((report, started.elapsed()))
        })
        .await;
        match pass {
            Ok((r, took)) => tracing::info!(
                "scrub pass: checked {} blobs ({} bytes) in {took:.0?}, removed {} corrupt",
                r.blobs,
                r.bytes,
                r.removed
            ),
            Err(e) => tracing::warn!("scrub pass failed: {e}"),
        }
        tokio::time::sleep(SCRUB_PAUSE).await;
    }
}

/// Periodic upkeep: access times to disk, stale partial uploads away,
/// throughput samples for the status page.
async fn maintain(
    store: Arc<Store>,
    upload_max_age: Duration,
    metrics: Arc<Metrics>,
    board: Arc<Board>,
    stopping: Arc<AtomicBool>,
) {
    let expiry_every = (upload_max_age / 2).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut flush = tokio::time::interval(ACCESS_FLUSH_INTERVAL);
    let mut expire = tokio::time::interval(expiry_every);
    let mut sample = tokio::time::interval(crate::status::SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = sample.tick() => board.sample(&metrics),
            _ = flush.tick() => {
                // A flush runs on a blocking thread, which an abort does not
                // reach: it stops at the next stripe once a stop begins.
                let (store, stopping) = (Arc::clone(&store), Arc::clone(&stopping));
                let flushed = blocking(move || store.flush_access_times_while(&|| !stopping.load(Ordering::Relaxed)));
                if let Err(e) = flushed.await {
                    tracing::warn!("could not write access times: {e}");
                }
            }
            _ = expire.tick() => {
                let store = Arc::clone(&store);
                match blocking(move || store.expire_uploads(upload_max_age)).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("deleted {n} partial uploads idle for over {upload_max_age:?}"),
                    Err(e) => tracing::warn!("could not expire partial uploads: {e}"),
                }
            }
        }
    }
}
