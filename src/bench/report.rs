//! A run's figures, and the forms they are shown in: a table for people,
//! JSON and CSV for scripts, an SVG chart for those who would rather look.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::data::Data;
use super::measure::{Ceilings, Latency};
use super::workload::Workload;

/// Figures of one configuration, workload and kind of data.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// "store" (embedded) or the gRPC endpoint.
    pub target: String,
    /// The settings that vary across the run, e.g. "zstd 3, chunk 1MiB".
    pub config: String,
    pub settings: BTreeMap<String, String>,
    pub workload: Workload,
    pub data: Data,
    pub seed: u64,
    pub concurrency: usize,
    /// Unique bytes of the blobs the workload stores.
    pub logical_bytes: u64,
    pub write: Phase,
    pub read: Phase,
    /// Logical MB/s of the write phase, and of the read phase.
    pub ingest_mbps: Option<f64>,
    pub read_mbps: Option<f64>,
    /// Blob-level operations per second in each phase (blobs stored or
    /// read, digests looked up, action results fetched or stored).
    pub write_ops_per_sec: Option<f64>,
    pub read_ops_per_sec: Option<f64>,
    /// Over every call of both phases, and per kind of call.
    pub latency: Latency,
    pub latency_by_call: BTreeMap<String, Latency>,
    /// Bytes on disk after the run (growth of --server-dir for gRPC).
    pub disk_bytes: Option<u64>,
    /// Disk bytes per logical byte.
    pub space_amplification: Option<f64>,
    /// The size budget the store was held to, and the most its directory
    /// took on disk (allocated blocks, sampled 10 times a second) while
    /// it was written.
    pub max_size: Option<u64>,
    pub peak_disk_bytes: Option<u64>,
    /// Bytes written to storage per logical byte stored.
    pub write_amplification: Option<f64>,
    /// The store's (or server's) CPU seconds per GiB moved (in plus out).
    pub cpu_seconds_per_gib: Option<f64>,
    /// Peak resident memory of the bench process (embedded store) or server.
    pub peak_rss_bytes: Option<u64>,
    /// Throughputs as fractions of this run's single-core ceilings.
    pub ingest_vs_sha256: Option<f64>,
    pub ingest_vs_zstd1: Option<f64>,
    pub read_vs_sha256: Option<f64>,
    /// Throughputs as fractions of the yardstick's, in the same run.
    #[serde(default)]
    pub vs_yardstick: Yardstick,
}

/// A run's throughputs as fractions of the yardstick's for the same
/// workload and data (`bench grpc --yardstick`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Yardstick {
    pub ingest: Option<f64>,
    pub read: Option<f64>,
    pub write_ops: Option<f64>,
    pub read_ops: Option<f64>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Phase {
    pub seconds: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub ops: u64,
}

/// Everything one `larder bench` printed.
#[derive(Debug, serde::Serialize)]
pub struct Run {
    pub ceilings: Ceilings,
    pub cores: usize,
    pub runs: Vec<Report>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.0}MiB", bytes as f64 / (1 << 20) as f64)
}

const COLUMNS: [&str; 21] = [
    "config",
    "workload",
    "data",
    "ingest MB/s",
    "xSHA",
    "xYS",
    "read MB/s",
    "xSHA",
    "xYS",
    "write ops/s",
    "xYS",
    "read ops/s",
    "xYS",
    "p50",
    "p99",
    "p99.9",
    "space amp",
    "peak disk/budget",
    "write amp",
    "CPU s/GiB",
    "peak RSS",
];

fn cells(r: &Report) -> [String; 21] {
    let ys = &r.vs_yardstick;
    [
        if r.config.is_empty() { r.target.clone() } else { r.config.clone() },
        r.workload.name().into(),
        r.data.name().into(),
        opt(r.ingest_mbps, 0),
        opt(r.ingest_vs_sha256, 2),
        opt(ys.ingest, 2),
        opt(r.read_mbps, 0),
        opt(r.read_vs_sha256, 2),
        opt(ys.read, 2),
        opt(r.write_ops_per_sec, 0),
        opt(ys.write_ops, 2),
        opt(r.read_ops_per_sec, 0),
        opt(ys.read_ops, 2),
        micros(r.latency.p50_us),
        micros(r.latency.p99_us),
        micros(r.latency.p999_us),
        opt(r.space_amplification, 2),
        match (r.peak_disk_bytes, r.max_size) {
            (Some(peak), Some(max)) => {
                format!("{}/{} = {:.2}", mib(peak), mib(max), peak as f64 / max as f64)
            }
            _ => "-".into(),
        },
        opt(r.write_amplification, 2),
        opt(r.cpu_seconds_per_gib, 2),
        r.peak_rss_bytes.map_or_else(|| "-".into(), mib),
    ]
}

/// The terminal table, with the ceilings it is measured against.
pub fn table(run: &Run) -> String {
    let rows: Vec<[String; 21]> = run.runs.iter().map(cells).collect();
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).chain([COLUMNS[c].len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, row: &[&str]| {
        for (c, cell) in row.iter().enumerate() {
            // Text columns to the left, figures to the right.
            if c < 3 {
                let _ = write!(out, "{cell:<w$}  ", w = widths[c]);
            } else {
                let _ = write!(out, "{cell:>w$}  ", w = widths[c]);
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    };
    line(&mut out, &COLUMNS);
    for row in &rows {
        line(&mut out, &row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let zstd: Vec<String> =
        run.ceilings.zstd1_mbps.iter().map(|(d, v)| format!("{v:.0} MB/s on {d}")).collect();
    let disk = match run.ceilings.disk_write_mbps {
        Some(mbps) => format!("; its disk writes {mbps:.0} MB/s (sequential, synced)"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "\nmachine: {} cores; one core hashes SHA-256 at {:.0} MB/s and compresses zstd-1 at {}{disk}",
        run.cores,
        run.ceilings.sha256_mbps,
        zstd.join(", ")
    );
    out
}

pub fn csv(run: &Run) -> String {
    const HEADER: &str = "target,config,workload,data,seed,concurrency,logical_bytes,ingest_mbps,read_mbps,write_ops_per_sec,read_ops_per_sec,p50_us,p99_us,p999_us,disk_bytes,space_amplification,write_amplification,cpu_seconds_per_gib,peak_rss_bytes,ingest_vs_sha256,ingest_vs_zstd1,read_vs_sha256,sha256_mbps,zstd1_mbps,max_size,peak_disk_bytes,ingest_vs_yardstick,read_vs_yardstick,write_ops_vs_yardstick,read_ops_vs_yardstick";
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let num = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.4}"));
    let int = |v: Option<u64>| v.map_or_else(String::new, |v| v.to_string());
    let mut out = format!("{HEADER}\n");
    for r in &run.runs {
        let zstd = run.ceilings.zstd1_mbps.get(r.data.name()).copied();
        let fields = [
            quote(&r.target),
            quote(&r.config),
            r.workload.name().into(),
            r.data.name().into(),
            r.seed.to_string(),
            r.concurrency.to_string(),
            r.logical_bytes.to_string(),
            num(r.ingest_mbps),
            num(r.read_mbps),
            num(r.write_ops_per_sec),
            num(r.read_ops_per_sec),
            r.latency.p50_us.to_string(),
            r.latency.p99_us.to_string(),
            r.latency.p999_us.to_string(),
            int(r.disk_bytes),
            num(r.space_amplification),
            num(r.write_amplification),
            num(r.cpu_seconds_per_gib),
            int(r.peak_rss_bytes),
            num(r.ingest_vs_sha256),
            num(r.ingest_vs_zstd1),
            num(r.read_vs_sha256),
            format!("{:.1}", run.ceilings.sha256_mbps),
            num(zstd),
            int(r.max_size),
            int(r.peak_disk_bytes),
            num(r.vs_yardstick.ingest),
            num(r.vs_yardstick.read),
            num(r.vs_yardstick.write_ops),
            num(r.vs_yardstick.read_ops),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Ingest speed against space amplification, one point per report that has
/// both; the SHA-256 ceiling as a dashed line when it is in range.
pub fn svg(run: &Run) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 480.0, 70.0, 200.0, 40.0, 50.0);
    let points: Vec<(&Report, f64, f64)> =
        run.runs.iter().filter_map(|r| Some((r, r.space_amplification?, r.ingest_mbps?))).collect();
    let x_max = points.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
    let y_max = points.iter().map(|p| p.2).fold(1.0f64, f64::max) * 1.15;
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x = |v: f64| left + v / x_max * pw;
    let y = |v: f64| top + ph - v / y_max * ph;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="22" font-size="15">larder bench: ingest speed against space amplification</text>
<line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{b}" stroke="black"/>
<text x="{cx}" y="{xl}" text-anchor="middle">space amplification (disk bytes per logical byte)</text>
<text transform="translate(18 {cy}) rotate(-90)" text-anchor="middle">ingest MB/s</text>
"#,
        b = top + ph,
        r = left + pw,
        cx = left + pw / 2.0,
        xl = h - 12.0,
        cy = top + ph / 2.0,
    );
    for i in 0..=5 {
        let (xv, yv) = (x_max * i as f64 / 5.0, y_max * i as f64 / 5.0);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{xv:.2}</text><text x="{}" y="{}" text-anchor="end">{yv:.0}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##,
            x(xv),
            top + ph + 16.0,
            left - 6.0,
            y(yv) + 4.0,
            y(yv),
            left + pw,
            y(yv)
        );
    }
    let sha = run.ceilings.sha256_mbps;
    if sha < y_max {
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{yy}" x2="{}" y2="{yy}" stroke="gray" stroke-dasharray="6 4"/><text x="{}" y="{}" fill="gray">one core of SHA-256 ({sha:.0} MB/s)</text>"#,
            left + pw,
            left + 4.0,
            y(sha) - 4.0,
            yy = y(sha)
        );
    }
    const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let workloads: Vec<Workload> = {
        let mut w: Vec<Workload> = points.iter().map(|p| p.0.workload).collect();
        w.dedup();
        w.sort_by_key(|w| w.name());
        w.dedup();
        w
    };
    let colour = |w: Workload| COLOURS[workloads.iter().position(|&v| v == w).unwrap_or(0) % COLOURS.len()];
    for (r, sx, sy) in &points {
        let label = format!("{} {} {}", r.config, r.workload.name(), r.data.name());
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{}"><title>{}: {sy:.0} MB/s, {sx:.2}x</title></circle><text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
            x(*sx),
            y(*sy),
            colour(r.workload),
            escape(&label),
            x(*sx) + 7.0,
            y(*sy) + 3.0,
            escape(if r.config.is_empty() { &r.target } else { &r.config })
        );
    }
    for (i, workload) in workloads.iter().enumerate() {
        let ly = top + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<circle cx="{}" cy="{ly}" r="5" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            w - right + 40.0,
            colour(*workload),
            w - right + 50.0,
            ly + 4.0,
            workload.name()
        );
    }
    s.push_str("</svg>\n");
    s
}
