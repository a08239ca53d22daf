//! The status page (`GET /`, for a person in a browser) and the same as
//! JSON (`GET /status.json`): version, uptime, addresses, budget and use,
//! hit ratio, and recent throughput.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::metrics::Metrics;
use crate::store::Stats;

/// Throughput is sampled this often...
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// ...and this many samples are kept: the last ten minutes.
const SAMPLES: usize = 120;

/// What the page shows besides the store's figures.
pub struct Board {
    started: Instant,
    pub listen: String,
    pub http_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub dir: PathBuf,
    /// The object store tier, if any: endpoint and bucket.
    pub object_store: Option<String>,
    /// Bytes received and sent per second, oldest first.
    history: Mutex<VecDeque<(f64, f64)>>,
    last: Mutex<(Instant, u64, u64)>,
}

impl Board {
    pub fn new(
        listen: String,
        http_listen: Option<String>,
        metrics_listen: Option<String>,
        dir: PathBuf,
        object_store: Option<String>,
    ) -> Board {
        let now = Instant::now();
        Board {
            started: now,
            listen,
            http_listen,
            metrics_listen,
            dir,
            object_store,
            history: Mutex::new(VecDeque::with_capacity(SAMPLES)),
            last: Mutex::new((now, 0, 0)),
        }
    }

    /// Records the throughput since the last sample.
    pub fn sample(&self, metrics: &Metrics) {
        let (received, sent) = metrics.bytes_counts();
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let seconds = now.duration_since(last.0).as_secs_f64().max(0.001);
        let rates = ((received - last.1) as f64 / seconds, (sent - last.2) as f64 / seconds);
        *last = (now, received, sent);
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if history.len() == SAMPLES {
            history.pop_front();
        }
        history.push_back(rates);
    }

    /// The figures for scripts; `anonymous` callers are not shown the data
    /// directory or the object store's endpoint.
    pub fn json(&self, stats: &Stats, metrics: &Metrics, anonymous: bool) -> Value {
        let (hits, misses) = metrics.action_cache_counts();
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptimeSeconds": self.started.elapsed().as_secs(),
            "listen": self.listen,
            "httpListen": self.http_listen,
            "metricsListen": self.metrics_listen,
            "dataDir": (!anonymous).then(|| self.dir.display().to_string()),
            "maxSizeBytes": stats.max_size,
            "diskBytes": stats.disk_bytes,
            "storedBytes": stats.stored_bytes,
            "logicalBytes": stats.logical_bytes,
            "blobs": stats.blobs,
            "partialUploads": stats.partial_uploads,
            "actionCache": {"hits": hits, "misses": misses, "hitRatio": ratio(hits, misses)},
            "evictedBlobs": stats.evicted_blobs,
            "rejectedWrites": stats.rejected_writes,
            "corruptBlobsRemoved": stats.corrupt_blobs,
            "objectStore": self.object_store.as_ref().map(|name| {
                let [local, remote, missing, written, errors] = metrics.tier_counts();
                let name = if anonymous { "(hidden from anonymous callers)" } else { name.as_str() };
                json!({"name": name, "localHits": local, "objectStoreHits": remote, "misses": missing,
                       "writtenBlobs": written, "errors": errors, "queued": stats.queued,
                       "queuedBytes": stats.queued_bytes, "queueLimitBytes": stats.queue_limit})
            }),
            "throughput": {
                "sampleSeconds": SAMPLE_EVERY.as_secs(),
                "receivedBytesPerSecond": history.iter().map(|(r, _)| r.round()).collect::<Vec<_>>(),
                "sentBytesPerSecond": history.iter().map(|(_, s)| s.round()).collect::<Vec<_>>(),
            },
        })
    }

    pub fn html(&self, stats: &Stats, metrics: &Metrics, anonymous: bool) -> String {
        let (hits, misses) = metrics.action_cache_counts();
        let history: Vec<(f64, f64)> =
            self.history.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        let used = stats.disk_bytes as f64 / stats.max_size.max(1) as f64;
        let hit_ratio = match ratio(hits, misses) {
            Some(r) => format!("{:.1} %", r * 100.0),
            None => "no lookups yet".into(),
        };
        let compression = match stats.stored_bytes {
            0 => "-".to_string(),
            stored => format!("{:.2}x", stats.logical_bytes as f64 / stored as f64),
        };
        let mut rows = String::new();
        let mut row = |name: &str, value: String| {
            let _ = write!(rows, "<tr><th>{}</th><td>{}</td></tr>", escape(name), escape(&value));
        };
        row("Version", env!("CARGO_PKG_VERSION").into());
        row("Up for", human_duration(self.started.elapsed()));
        row("Listening on", self.listen.clone());
        if let Some(addr) = &self.http_listen {
            row("HTTP also on", addr.clone());
        }
        if let Some(addr) = &self.metrics_listen {
            row("Metrics on", addr.clone());
        }
        if !anonymous {
            row("Data directory", self.dir.display().to_string());
        }
        row("Blobs", stats.blobs.to_string());
        row(
            "Stored",
            format!(
                "{} of blobs in {} ({compression})",
                bytes(stats.logical_bytes),
                bytes(stats.stored_bytes)
            ),
        );
        row("Partial uploads", stats.partial_uploads.to_string());
        row("Action cache hits", format!("{hit_ratio} ({hits} hits, {misses} misses)"));
        row(
            "Evicted",
            format!("{} blobs; {} writes refused at the limit", stats.evicted_blobs, stats.rejected_writes),
        );
        row("Corrupt blobs removed", stats.corrupt_blobs.to_string());
        if let Some(name) = &self.object_store {
            let name = if anonymous { "(hidden from anonymous callers)" } else { name.as_str() };
            let [local, remote, missing, written, errors] = metrics.tier_counts();
            row(
                "Object store",
                format!(
                    "{name}: reads {local} local, {remote} from the object store, {missing} in neither; {written} blobs copied to it; {errors} errors"
                ),
            );
            row(
                "Waiting for the object store",
                format!(
                    "{} blobs and action results, {} of at most {}",
                    stats.queued,
                    bytes(stats.queued_bytes),
                    bytes(stats.queue_limit)
                ),
            );
        }
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>larder</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 52em; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: .2em; }} .sub {{ color: #666; margin-top: 0; }}
table {{ border-collapse: collapse; width: 100%; }} th, td {{ text-align: left; padding: .3em .6em; border-bottom: 1px solid #eee; }}
th {{ width: 14em; color: #555; font-weight: 500; }}
.bar {{ background: #eee; height: 1.2em; border-radius: 3px; }} .fill {{ background: {color}; height: 100%; border-radius: 3px; }}
.legend span {{ margin-right: 1.5em; }} svg {{ background: #fafafa; border: 1px solid #eee; }}
</style></head><body>
<h1>larder</h1><p class="sub">a REAPI remote build cache · <a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></p>
<h2>Disk</h2>
<p>{disk} of the {budget} budget ({percent:.1} %)</p>
<div class="bar"><div class="fill" style="width: {width:.1}%"></div></div>
<h2>Throughput, last {minutes} minutes</h2>
{chart}
<p class="legend"><span style="color:#2a7ab9">■ received</span><span style="color:#d9822b">■ sent</span> peak {peak}/s</p>
<h2>Figures</h2>
<table>{rows}</table>
</body></html>
"#,
            color = if used > 0.9 { "#c0392b" } else { "#2a9d5c" },
            disk = bytes(stats.disk_bytes),
            budget = bytes(stats.max_size),
            percent = used * 100.0,
            width = (used * 100.0).min(100.0),
            minutes = SAMPLES as u64 * SAMPLE_EVERY.as_secs() / 60,
            chart = chart(&history),
            peak = bytes(history.iter().map(|(r, s)| r.max(*s)).fold(0.0, f64::max) as u64),
        )
    }
}

fn ratio(hits: u64, misses: u64) -> Option<f64> {
    (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64)
}

/// Two lines over the samples, in an inline SVG.
fn chart(history: &[(f64, f64)]) -> String {
    const W: f64 = 800.0;
    const H: f64 = 160.0;
    let peak = history.iter().map(|(r, s)| r.max(*s)).fold(1.0, f64::max);
    let line = |pick: fn(&(f64, f64)) -> f64| {
        let step = W / (SAMPLES - 1) as f64;
        let offset = (SAMPLES - history.len()) as f64 * step;
        history
            .iter()
            .enumerate()
            .map(|(i, sample)| {
                format!("{:.1},{:.1}", offset + i as f64 * step, H - pick(sample) / peak * (H - 10.0))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r##"<svg viewBox="0 0 {W} {H}" width="100%" height="{H}" role="img" aria-label="bytes per second">
<polyline fill="none" stroke="#2a7ab9" stroke-width="2" points="{}"/>
<polyline fill="none" stroke="#d9822b" stroke-width="2" points="{}"/>
</svg>"##,
        line(|(r, _)| *r),
        line(|(_, s)| *s)
    )
}

fn bytes(n: u64) -> String {
    crate::config::ByteSize(n).to_string()
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
