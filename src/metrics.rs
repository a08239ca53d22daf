//! Prometheus metrics (prometheus-client, OpenMetrics text): calls by method
//! and code with their durations, bytes in and out, action cache hits, and
//! the store's figures, read when scraped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::Stats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The gRPC method, or the HTTP method and route.
    pub method: String,
    /// The gRPC code name, or the HTTP status.
    pub code: String,
}

/// A kind of object-store request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// head, get, put, delete or list.
    pub kind: &'static str,
}

/// How a Remote Asset Fetch was answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// `record` (pushed or fetched before), `checksum` (content the CAS
    /// held, named by checksum.sri), `downloaded`, or `failed`.
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    asset_fetches: Family<FetchLabels, Counter>,
    object_store_requests: Family<RequestLabels, Counter>,
    object_store_remembered: Counter,
    /// The trimmer's work: passes that deleted, objects and bytes deleted.
    object_store_trims: [Counter; 3],
    object_store_bytes: Gauge,
    asset_downloaded_bytes: Counter,
    calls: Family<CallLabels, Counter>,
    durations: Family<CallLabels, Histogram>,
    received: Counter,
    sent: Counter,
    ac_hits: Counter,
    ac_misses: Counter,
    tiers: TierCounters,
    store: StoreGauges,
}

/// The store's figures, set from [`Stats`] at each scrape.
#[derive(Default)]
struct StoreGauges {
    blobs: Gauge,
    logical_bytes: Gauge,
    stored_bytes: Gauge,
    disk_bytes: Gauge,
    max_size: Gauge,
    partial_uploads: Gauge,
    eviction_blocked: Gauge,
    memory_indexed: Gauge,
    rejected_writes: Counter,
    corrupt_blobs: Counter,
    evicted_blobs: Counter,
    evicted_bytes: Counter,
    pending_compaction_bytes: Gauge,
    write_stopped: Gauge,
    delayed_write_rate: Gauge,
    queued: Gauge,
    queued_bytes: Gauge,
    queue_limit: Gauge,
}

/// What the object store tier did.
#[derive(Default)]
struct TierCounters {
    /// Blobs wanted for reading: found locally, brought in from the object
    /// store, or in neither.
    local_hits: Counter,
    remote_hits: Counter,
    misses: Counter,
    written_blobs: Counter,
    written_bytes: Counter,
    /// Calls that failed because the object store did not answer.
    errors: Counter,
    /// Objects found damaged (failing a check) and treated as missing.
    damaged: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("larder");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("calls", "Calls answered, by method and code", calls.clone());
        // 100 µs to about 100 s.
        let durations = Family::<CallLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 21))
        });
        registry.register(
            "call_duration_seconds",
            "Time from request to the end of the reply",
            durations.clone(),
        );
        let asset_fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "asset_fetches",
            "Remote Asset Fetch calls, by how they were answered",
            asset_fetches.clone(),
        );
        let object_store_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "object_store_requests",
            "Requests sent to the object store, by kind (a multipart upload counts a PUT per part)",
            object_store_requests.clone(),
        );
        let object_store_remembered = Counter::default();
        registry.register(
            "object_store_remembered",
            "Object-store lookups answered from what this node knows is there, without a request",
            object_store_remembered.clone(),
        );
        let object_store_trims = [Counter::default(), Counter::default(), Counter::default()];
        for (name, help, counter) in [
            ("object_store_trims", "Trim passes that deleted objects from the object store", 0),
            ("object_store_trimmed_objects", "Objects the trimmer deleted (their last-use markers aside)", 1),
            ("object_store_trimmed_bytes", "Bytes the trimmer deleted from the object store", 2),
        ] {
            registry.register(name, help, object_store_trims[counter].clone());
        }
        let object_store_bytes = Gauge::default();
        registry.register(
            "object_store_bytes",
            "Bytes in the object store at this node's last measurement (the trimming node measures; 0: not measured)",
            object_store_bytes.clone(),
        );
        let asset_downloaded_bytes = Counter::default();
        registry.register(
            "asset_downloaded_bytes",
            "Bytes FetchBlob downloaded from origins",
            asset_downloaded_bytes.clone(),
        );
        let (received, sent) = (Counter::default(), Counter::default());
        registry.register("received_bytes", "Request body bytes received", received.clone());
        registry.register("sent_bytes", "Reply body bytes sent", sent.clone());
        let (ac_hits, ac_misses) = (Counter::default(), Counter::default());
        registry.register("action_cache_hits", "Action results served", ac_hits.clone());
        registry.register(
            "action_cache_misses",
            "Action results asked for and not served (absent, or a referenced blob missing)",
            ac_misses.clone(),
        );
        let store = StoreGauges::default();
        let gauges: [(&str, &str, &Gauge); 14] = [
            ("blobs", "Blobs stored", &store.blobs),
            ("logical_bytes", "Uncompressed bytes of the blobs stored", &store.logical_bytes),
            (
                "stored_bytes",
                "Bytes the stored chunks of blobs and partial uploads take",
                &store.stored_bytes,
            ),
            ("disk_bytes", "Bytes of the data directory on disk", &store.disk_bytes),
            ("max_size_bytes", "The size budget of the data directory", &store.max_size),
            ("partial_uploads", "Partial uploads held for resuming", &store.partial_uploads),
            (
                "eviction_blocked",
                "1 while the disk is over its watermark and nothing is old enough to evict: writes are refused",
                &store.eviction_blocked,
            ),
            (
                "memory_indexed_blobs",
                "Blobs FindMissingBlobs finds in memory; fewer than larder_blobs once index_memory is full",
                &store.memory_indexed,
            ),
            (
                "rocksdb_pending_compaction_bytes",
                "RocksDB's estimate of bytes compaction must rewrite",
                &store.pending_compaction_bytes,
            ),
            ("rocksdb_write_stopped", "1 while RocksDB stops writes (a write stall)", &store.write_stopped),
            (
                "rocksdb_delayed_write_rate",
                "Bytes/s RocksDB slows writes to, 0 when not delayed",
                &store.delayed_write_rate,
            ),
            (
                "object_store_queued",
                "Blobs and action results waiting to be copied to the object store",
                &store.queued,
            ),
            (
                "object_store_queued_bytes",
                "Bytes waiting to be copied to the object store",
                &store.queued_bytes,
            ),
            (
                "object_store_queue_limit_bytes",
                "Most bytes that may wait; beyond it writes are refused",
                &store.queue_limit,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        let counters: [(&str, &str, &Counter); 4] = [
            (
                "rejected_writes",
                "Writes refused at the hard limit while eviction catches up",
                &store.rejected_writes,
            ),
            (
                "corrupt_blobs_removed",
                "Blobs found corrupt on disk (failing a checksum) and removed",
                &store.corrupt_blobs,
            ),
            ("evicted_blobs", "Blobs evicted to keep under the size budget", &store.evicted_blobs),
            ("evicted_bytes", "Stored bytes evicted", &store.evicted_bytes),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        let tiers = TierCounters::default();
        let tier_counters: [(&str, &str, &Counter); 7] = [
            ("local_tier_hits", "Blobs wanted for reading that the local tier held", &tiers.local_hits),
            (
                "object_store_hits",
                "Blobs the local tier lacked, read through from the object store",
                &tiers.remote_hits,
            ),
            ("object_store_misses", "Blobs wanted for reading that neither tier held", &tiers.misses),
            ("object_store_written_blobs", "Blobs copied to the object store", &tiers.written_blobs),
            (
                "object_store_written_bytes",
                "Logical bytes of blobs copied to the object store",
                &tiers.written_bytes,
            ),
            ("object_store_errors", "Object store calls that failed (unavailable)", &tiers.errors),
            ("object_store_damaged", "Damaged objects treated as missing", &tiers.damaged),
        ];
        for (name, help, counter) in tier_counters {
            registry.register(name, help, counter.clone());
        }
        Metrics {
            registry,
            asset_fetches,
            object_store_requests,
            object_store_remembered,
            object_store_trims,
            object_store_bytes,
            asset_downloaded_bytes,
            calls,
            durations,
            received,
            sent,
            ac_hits,
            ac_misses,
            tiers,
            store,
        }
    }
}

impl Metrics {
    pub fn record_call(&self, method: &str, code: &str, started: Instant) {
        let labels = CallLabels { method: method.to_string(), code: code.to_string() };
        self.calls.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    }

    /// A Fetch answered: see [`FetchLabels`] for the outcomes.
    pub fn asset_fetch(&self, outcome: &'static str) {
        self.asset_fetches.get_or_create(&FetchLabels { outcome }).inc();
    }

    pub fn asset_downloaded(&self, bytes: u64) {
        self.asset_downloaded_bytes.inc_by(bytes);
    }

    pub fn action_cache_lookup(&self, hit: bool) {
        if hit { &self.ac_hits } else { &self.ac_misses }.inc();
    }

    /// Reads of blobs: local hits, object store hits, misses in both.
    pub fn tier_reads(&self, local: u64, remote: u64, missing: u64) {
        self.tiers.local_hits.inc_by(local);
        self.tiers.remote_hits.inc_by(remote);
        self.tiers.misses.inc_by(missing);
    }

    pub fn tier_written(&self, bytes: u64) {
        self.tiers.written_blobs.inc();
        self.tiers.written_bytes.inc_by(bytes);
    }

    pub fn tier_error(&self, damaged: bool) {
        if damaged { &self.tiers.damaged } else { &self.tiers.errors }.inc();
    }

    /// Local hits, object store hits, misses, blobs written through, errors.
    pub fn tier_counts(&self) -> [u64; 5] {
        let t = &self.tiers;
        [t.local_hits.get(), t.remote_hits.get(), t.misses.get(), t.written_blobs.get(), t.errors.get()]
    }

    /// Action cache hits and misses so far.
    pub fn action_cache_counts(&self) -> (u64, u64) {
        (self.ac_hits.get(), self.ac_misses.get())
    }

    /// Bytes received and sent so far.
    pub fn bytes_counts(&self) -> (u64, u64) {
        (self.received.get(), self.sent.get())
    }

    /// The OpenMetrics text, with the store's figures as of now.
    pub fn render(&self, stats: &Stats, requests: Option<&crate::objstore::Requests>) -> String {
        if let Some(requests) = requests {
            let (kinds, remembered) = requests.snapshot();
            for (kind, total) in kinds {
                let counter = self.object_store_requests.get_or_create(&RequestLabels { kind });
                counter.inc_by(total.saturating_sub(counter.get()));
            }
            let counter = &self.object_store_remembered;
            counter.inc_by(remembered.saturating_sub(counter.get()));
            let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            let trims = [&requests.trims, &requests.trimmed_objects, &requests.trimmed_bytes];
            for (counter, total) in self.object_store_trims.iter().zip(trims) {
                counter.inc_by(get(total).saturating_sub(counter.get()));
            }
            self.object_store_bytes.set(i64::try_from(get(&requests.bucket_bytes)).unwrap_or(i64::MAX));
        }
        let g = &self.store;
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        g.blobs.set(as_i64(stats.blobs));
        g.logical_bytes.set(as_i64(stats.logical_bytes));
        g.stored_bytes.set(as_i64(stats.stored_bytes));
        g.disk_bytes.set(as_i64(stats.disk_bytes));
        g.max_size.set(as_i64(stats.max_size));
        g.partial_uploads.set(as_i64(stats.partial_uploads));
        g.eviction_blocked.set(i64::from(stats.eviction_blocked));
        g.memory_indexed.set(as_i64(stats.memory_indexed));
        g.pending_compaction_bytes.set(as_i64(stats.pending_compaction_bytes));
        g.write_stopped.set(i64::from(stats.write_stopped));
        g.delayed_write_rate.set(as_i64(stats.delayed_write_rate));
        g.queued.set(as_i64(stats.queued));
        g.queued_bytes.set(as_i64(stats.queued_bytes));
        g.queue_limit.set(as_i64(stats.queue_limit));
        // These mirror totals the store keeps.
        for (counter, total) in [
            (&g.rejected_writes, stats.rejected_writes),
            (&g.corrupt_blobs, stats.corrupt_blobs),
            (&g.evicted_blobs, stats.evicted_blobs),
            (&g.evicted_bytes, stats.evicted_bytes),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts the bytes of a request body as they are read.
    pub fn count_received<B>(self: &Arc<Self>, body: B) -> Counted<B> {
        Counted { inner: body, counter: self.received.clone(), done: None }
    }

    /// Counts the bytes of a reply body as they are sent, and calls `done`
    /// with its trailers (if any) once it ends.
    pub fn count_sent<B>(
        self: &Arc<Self>,
        body: B,
        done: impl FnOnce(Option<&http::HeaderMap>) + Send + 'static,
    ) -> Counted<B> {
        Counted { inner: body, counter: self.sent.clone(), done: Some(Box::new(done)) }
    }
}

type Done = Box<dyn FnOnce(Option<&http::HeaderMap>) + Send>;

/// A body whose data bytes are counted; `done` runs at its end.
pub struct Counted<B> {
    inner: B,
    counter: Counter,
    done: Option<Done>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.counter.inc_by(data.len() as u64);
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(done) = self.done.take()
                {
                    done(Some(trailers));
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(done) = self.done.take() {
                    done(None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    /// A reply dropped before its end (the client went away) still counts.
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(None);
        }
    }
}
