//! `larder bench`: workloads against an embedded store (one fresh store per
//! combination of settings) or against any REAPI server, with figures as
//! ratios to the machine's own ceilings measured in the same run.

pub mod client;
// Shared as source with the tests and benches, which use parts the tool does not.
#[allow(dead_code)]
pub mod data;
pub mod measure;
pub mod report;
pub mod workload;
pub mod yardstick;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};

use client::{Client, Grpc};
use data::Data;
use larder::config::{ByteSize, Config, Flags};
use larder::digest::Digest;
use larder::store::eviction::Budget;
use larder::store::{Store, StoreOptions};
use measure::{Ceilings, ClientCpu, Latency, Process};
use report::{Phase, Report, Run, Yardstick};
use workload::{Outcome, Plan, Shape, Workload};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("verification failed: blob {0} is missing from the target, which stored it earlier in this run")]
    Missing(Digest),
    #[error("{0}")]
    Call(String),
    #[error("{0}")]
    Setup(String),
    #[error("the store: {0}")]
    Store(#[from] larder::store::Error),
    #[error("{0}")]
    Config(#[from] larder::config::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

#[derive(Subcommand)]
pub enum Target {
    /// Against an embedded store, one fresh store (in a temporary directory)
    /// per combination of the settings given; comma lists make a sweep, e.g.
    /// --zstd-level 0,1,3 --chunk-size 256KiB,1MiB.
    Store(StoreArgs),
    /// Against REAPI servers (larder or another), to compare them in one run:
    /// --endpoint grpc://127.0.0.1:9092,grpc://127.0.0.1:9094.
    Grpc(GrpcArgs),
    /// Serve a bare in-memory REAPI cache on the same tonic stack (SHA-256
    /// checked, no disk, blobs kept as they came, zstd frames too): the
    /// ceiling of any server on this machine, to bench beside larder with
    /// `bench grpc --endpoint`.
    Yardstick(YardstickArgs),
}

#[derive(Args)]
pub struct YardstickArgs {
    /// Address to serve on; port 0 picks a free port (printed).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9094")]
    pub listen: std::net::SocketAddr,
}

#[derive(Args)]
pub struct StoreArgs {
    /// Settings not swept come from this config file (else the defaults).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// zstd levels of stored chunks (0: uncompressed).
    #[arg(long, value_name = "LEVELS", value_delimiter = ',')]
    pub zstd_level: Vec<i32>,
    /// Chunk sizes, e.g. 256KiB,1MiB,4MiB.
    #[arg(long, value_name = "SIZES", value_delimiter = ',')]
    pub chunk_size: Vec<ByteSize>,
    /// Sizes from which uploads are deduplicated, e.g. 0,4MiB (0: off).
    #[arg(long, value_name = "SIZES", value_delimiter = ',')]
    pub dedup_min_size: Vec<ByteSize>,
    /// Large chunks in RocksDB's blob files (on) or in SST files (off).
    #[arg(long, value_name = "on|off", value_delimiter = ',')]
    pub blob_files: Vec<Switch>,
    /// fsync the write-ahead log on every commit.
    #[arg(long, value_name = "on|off", value_delimiter = ',')]
    pub sync_writes: Vec<Switch>,
    /// RocksDB block cache sizes.
    #[arg(long, value_name = "SIZES", value_delimiter = ',')]
    pub cache_size: Vec<ByteSize>,
    /// Size budgets to hold each store to, e.g. 256MiB,1GiB: eviction runs
    /// as in the server (with the config's watermarks and eviction_min_age),
    /// writes it refuses are sent again, and the report gives the peak disk
    /// of the write phase against the budget [default: no budget].
    #[arg(long, value_name = "SIZES", value_delimiter = ',')]
    pub max_size: Vec<ByteSize>,
    /// Where the temporary stores are made [default: the system's temporary
    /// directory]. Use a directory on the disk a real cache would use.
    #[arg(long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
    /// Run only this combination, in this process, and print its report as
    /// JSON: each combination runs in a process of its own, so that CPU time
    /// and peak memory are its alone.
    #[arg(long, hide = true)]
    pub only: Option<usize>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct GrpcArgs {
    /// Servers to run against, e.g. grpc://127.0.0.1:9092 (comma list).
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    pub endpoint: Vec<String>,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    pub instance: String,
    /// Measure this server process (CPU, peak RSS, disk writes) [default:
    /// the process listening on the endpoint's port, if on this machine].
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// The server's data directory, for disk bytes and space amplification.
    #[arg(long, value_name = "PATH")]
    pub server_dir: Option<PathBuf>,
    /// Run only the write phase (to read it later, elsewhere), only the
    /// read phase (of data written earlier with the same seed), or both.
    #[arg(long, value_enum, default_value_t = Phases::All)]
    pub phase: Phases,
    /// Also run every workload against a yardstick (a bare in-memory REAPI
    /// cache, started here as `larder bench yardstick`), before the servers
    /// given, and show their throughputs as fractions of its ones (xYS).
    #[arg(long)]
    pub yardstick: bool,
    /// Run everything this many times, each workload against every server
    /// in turn, so that figures that move from run to run show it; round n
    /// writes its own blobs (seed + n - 1) and is compared with the
    /// yardstick's same round.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// How blobs travel: as they are, or compressed with zstd (level 1) by
    /// the bench, as Bazel's --remote_cache_compression sends and takes
    /// them (ByteStream's compressed-blobs/zstd, batches' compressor
    /// fields). A server that offers no zstd gets blobs as they are, and
    /// its rows say so.
    #[arg(long, value_enum, default_value_t = Compressor::Identity)]
    pub compressor: Compressor,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compressor {
    Identity,
    Zstd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phases {
    Write,
    Read,
    All,
}

/// What to run and how to show it, for either target.
#[derive(Args, Clone)]
pub struct Common {
    /// Workloads (comma list).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "build")]
    pub workload: Vec<Workload>,
    /// What the data looks like (comma list); "mixed" is like build outputs.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "mixed")]
    pub data: Vec<Data>,
    /// Seed of every blob and call: the same seed repeats the same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Logical bytes each workload writes, about.
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    pub bytes: ByteSize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Fraction of the warm build's actions that miss (`build`).
    #[arg(long, default_value_t = 0.1)]
    pub miss_rate: f64,
    /// Size of each blob of the `large` workload.
    #[arg(long, value_name = "SIZE", default_value = "32MiB")]
    pub large_size: ByteSize,
    /// Print JSON instead of the table.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV instead of the table.
    #[arg(long)]
    pub csv: bool,
    /// Also write a chart of ingest speed against space amplification.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// What `larder bench` measures.
enum Measured {
    Store(StoreArgs),
    Grpc(GrpcArgs),
}

/// Runs `larder bench`: serves the yardstick, or measures and prints figures.
pub async fn main(target: Target) -> Result<(), Error> {
    let target = match target {
        Target::Yardstick(args) => return yardstick::serve(args.listen).await,
        Target::Store(args) => Measured::Store(args),
        Target::Grpc(args) => Measured::Grpc(args),
    };
    measure(target).await
}

async fn measure(target: Measured) -> Result<(), Error> {
    let common = match &target {
        Measured::Store(a) => a.common.clone(),
        Measured::Grpc(a) => a.common.clone(),
    };
    if !(0.0..=1.0).contains(&common.miss_rate) {
        return Err(Error::Setup(format!("--miss-rate {} must be between 0 and 1", common.miss_rate)));
    }
    if let Measured::Store(args) = &target
        && args.only.is_some()
    {
        let reports = bench_store(args).await?;
        println!("{}", serde_json::to_string(&reports).expect("reports serialize"));
        return Ok(());
    }
    let data = common.data.clone();
    let disk = match &target {
        Measured::Store(a) => Some(a.dir.clone().unwrap_or_else(std::env::temp_dir)),
        Measured::Grpc(a) => a.server_dir.clone(),
    };
    let ceilings = tokio::task::spawn_blocking(move || Ceilings::measure(&data, disk.as_deref()))
        .await
        .map_err(|e| Error::Setup(format!("measuring the ceilings failed: {e}")))?
        .map_err(|source| Error::Io { context: "cannot measure the disk's write speed".into(), source })?;
    let runs = match target {
        Measured::Store(args) => isolated(&args).await?,
        Measured::Grpc(args) => bench_grpc(&args).await?,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run = finish(Run { ceilings, cores, runs });
    if let Some(path) = &common.plot {
        std::fs::write(path, report::svg(&run))
            .map_err(|source| Error::Io { context: format!("cannot write {}", path.display()), source })?;
    }
    if common.json {
        println!("{}", serde_json::to_string_pretty(&run).expect("reports serialize"));
    } else if common.csv {
        print!("{}", report::csv(&run));
    } else {
        print!("{}", report::table(&run));
    }
    Ok(())
}

/// How a yardstick run is labelled and marked in its settings.
const YARDSTICK: &str = "yardstick";

/// Fills in the ratios to the ceilings, and to the yardstick's figures for
/// the same workload and data where it ran.
pub fn finish(mut run: Run) -> Run {
    let yardsticks: Vec<Report> = run
        .runs
        .iter()
        .filter(|r| r.settings.get("server").is_some_and(|s| s == YARDSTICK))
        .cloned()
        .collect();
    for r in &mut run.runs {
        let zstd = run.ceilings.zstd1_mbps.get(r.data.name()).copied();
        r.ingest_vs_sha256 = r.ingest_mbps.map(|v| v / run.ceilings.sha256_mbps);
        r.ingest_vs_zstd1 = r.ingest_mbps.zip(zstd).map(|(v, z)| v / z);
        r.read_vs_sha256 = r.read_mbps.map(|v| v / run.ceilings.sha256_mbps);
        let same = |y: &&Report| y.workload == r.workload && y.data == r.data && y.seed == r.seed;
        if let Some(y) = yardsticks.iter().find(same) {
            let fraction = |mine: Option<f64>, its: Option<f64>| mine.zip(its).map(|(m, y)| m / y);
            r.vs_yardstick = Yardstick {
                ingest: fraction(r.ingest_mbps, y.ingest_mbps),
                read: fraction(r.read_mbps, y.read_mbps),
                write_ops: fraction(r.write_ops_per_sec, y.write_ops_per_sec),
                read_ops: fraction(r.read_ops_per_sec, y.read_ops_per_sec),
            };
        }
    }
    run
}

/// One combination of store settings: a label naming what varies, the
/// settings, the store options, and the size budget to hold it to, if any.
type Combination = (String, BTreeMap<String, String>, StoreOptions, Option<u64>);

/// The store settings of each combination.
fn sweep(args: &StoreArgs, base: &StoreOptions) -> Vec<Combination> {
    fn or<T: Clone>(v: &[T], d: T) -> Vec<T> {
        if v.is_empty() { vec![d] } else { v.to_vec() }
    }
    let on = |s: Switch| s == Switch::On;
    let levels = or(&args.zstd_level, base.zstd_level);
    let chunks = or(&args.chunk_size, ByteSize(base.chunk_size as u64));
    let dedups = or(&args.dedup_min_size, ByteSize(base.dedup_min_size));
    let blob_files = or(&args.blob_files, if base.blob_files { Switch::On } else { Switch::Off });
    let syncs = or(&args.sync_writes, if base.sync_writes { Switch::On } else { Switch::Off });
    let caches = or(&args.cache_size, ByteSize(base.cache_size as u64));
    let budgets: Vec<Option<ByteSize>> = match args.max_size.is_empty() {
        true => vec![None],
        false => args.max_size.iter().copied().map(Some).collect(),
    };
    let mut out = Vec::new();
    // Every combination of the swept settings, in order.
    let grid = levels.iter().flat_map(|&level| dedups.iter().map(move |&dedup| (level, dedup)));
    for (level, dedup) in grid {
        for &chunk in &chunks {
            for &files in &blob_files {
                for &sync in &syncs {
                    for (&cache, &budget) in caches.iter().flat_map(|c| budgets.iter().map(move |b| (c, b))) {
                        let options = StoreOptions {
                            zstd_level: level,
                            dedup_min_size: dedup.0,
                            chunk_size: chunk.0 as usize,
                            blob_files: on(files),
                            sync_writes: on(sync),
                            cache_size: cache.0 as usize,
                            // No object store tier here: nothing to queue for.
                            queue_limit: 0,
                            max_size: budget.map_or(base.max_size, |b| b.0),
                            index_memory: base.index_memory,
                            use_resolution: base.use_resolution,
                        };
                        let mut settings: BTreeMap<String, String> = [
                            ("zstd_level", level.to_string()),
                            ("chunk_size", chunk.to_string()),
                            ("dedup_min_size", dedup.to_string()),
                            ("blob_files", on(files).to_string()),
                            ("sync_writes", on(sync).to_string()),
                            ("cache_size", cache.to_string()),
                        ]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect();
                        if let Some(budget) = budget {
                            settings.insert("max_size".into(), budget.to_string());
                        }
                        let mut label = Vec::new();
                        if levels.len() > 1 {
                            label.push(format!("zstd {level}"));
                        }
                        if chunks.len() > 1 {
                            label.push(format!("chunk {chunk}"));
                        }
                        if dedups.len() > 1 {
                            label.push(match dedup.0 {
                                0 => "dedup off".to_string(),
                                _ => format!("dedup from {dedup}"),
                            });
                        }
                        if blob_files.len() > 1 {
                            label.push(format!("blob files {}", if on(files) { "on" } else { "off" }));
                        }
                        if syncs.len() > 1 {
                            label.push(format!("sync {}", if on(sync) { "on" } else { "off" }));
                        }
                        if caches.len() > 1 {
                            label.push(format!("cache {cache}"));
                        }
                        if budgets.len() > 1 {
                            label.extend(budget.map(|b| format!("budget {b}")));
                        }
                        out.push((label.join(", "), settings, options, budget.map(|b| b.0)));
                    }
                }
            }
        }
    }
    out
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    // Drawn on stderr, and only when it is a terminal.
    indicatif::ProgressBar::new(len)
        .with_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} tasks, {elapsed} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        )
        .with_prefix(what.to_string())
}

fn shape(common: &Common, workload: Workload, data: Data, max_batch: u64) -> Shape {
    Shape {
        workload,
        data,
        seed: common.seed,
        bytes: common.bytes.0,
        miss_rate: common.miss_rate,
        large_size: common.large_size.0,
        max_batch,
    }
}

pub async fn bench_store(args: &StoreArgs) -> Result<Vec<Report>, Error> {
    let config = Config::load(args.config.as_deref(), Flags::default())?;
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)
        .map_err(|source| Error::Io { context: format!("cannot create {}", parent.display()), source })?;
    if measure::on_tmpfs(&parent) {
        tracing::warn!(
            "{} is in memory (tmpfs): disk figures will not mean much; give --dir on a real disk",
            parent.display()
        );
    }
    let mut reports = Vec::new();
    let mut index = 0;
    for (label, settings, options, max_size) in sweep(args, &config.store_options()) {
        let budget = max_size.map(|max_size| Budget { max_size, ..Budget::of(&config) });
        for &workload in &args.common.workload {
            for &data in &args.common.data {
                index += 1;
                if args.only.is_some_and(|only| only != index - 1) {
                    continue;
                }
                let shape = shape(&args.common, workload, data, config.limits.max_batch_size.0);
                let report =
                    store_run(&parent, &label, &settings, (options.clone(), budget), &shape, &args.common)
                        .await?;
                reports.push(report);
            }
        }
    }
    Ok(reports)
}

/// Runs each combination in a process of its own (this program again, with
/// --only), so that each is measured from a fresh start.
async fn isolated(args: &StoreArgs) -> Result<Vec<Report>, Error> {
    let config = Config::load(args.config.as_deref(), Flags::default())?;
    let runs =
        sweep(args, &config.store_options()).len() * args.common.workload.len() * args.common.data.len();
    let program = std::env::current_exe()
        .map_err(|source| Error::Io { context: "cannot find this program to run it again".into(), source })?;
    let mut reports = Vec::new();
    for index in 0..runs {
        let output = tokio::process::Command::new(&program)
            .args(std::env::args_os().skip(1))
            .args(["--only", &index.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .await
            .map_err(|source| Error::Io { context: format!("cannot run {}", program.display()), source })?;
        if !output.status.success() {
            return Err(Error::Setup(format!("run {} of {runs} failed ({})", index + 1, output.status)));
        }
        let mut one: Vec<Report> = serde_json::from_slice(&output.stdout)
            .map_err(|e| Error::Setup(format!("run {} of {runs} printed no report: {e}", index + 1)))?;
        reports.append(&mut one);
    }
    Ok(reports)
}

async fn store_run(
    parent: &Path,
    label: &str,
    settings: &BTreeMap<String, String>,
    (options, budget): (StoreOptions, Option<Budget>),
    shape: &Shape,
    common: &Common,
) -> Result<Report, Error> {
    let tmp = tempfile::Builder::new().prefix("larder-bench-").tempdir_in(parent).map_err(|source| {
        Error::Io { context: format!("cannot make a store in {}", parent.display()), source }
    })?;
    let dir = tmp.path().to_path_buf();
    let opened = dir.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open(&opened, options))
            .await
            .map_err(|e| Error::Setup(format!("opening the store failed: {e}")))??,
    );
    let plan = Arc::new(prepare(shape).await?);
    let client = Client::Store(Arc::clone(&store));
    let cpu = ClientCpu::default();
    let what = format!("{} {} {}", label, shape.workload.name(), shape.data.name());
    let bar = progress((plan.write.len() + plan.read.len()) as u64, what.trim());
    // Held to a budget, eviction runs as in the server, and the disk is
    // sampled like `du` through the write phase.
    let eviction = budget.map(|b| tokio::spawn(larder::store::eviction::run(Arc::clone(&store), b)));
    let sampler = budget.map(|_| measure::PeakDisk::start(dir.clone()));
    Process::Own.reset_peak_rss();
    let before = Process::Own.sample();
    let write = workload::run(&client, &plan, true, common.concurrency, &cpu, &bar).await;
    let peak_disk = sampler.map(measure::PeakDisk::finish);
    // Blobs evicted to keep the budget would be missing to the reads.
    let evicted = store.stats().map_or(0, |s| s.evicted_blobs);
    if evicted > 0 {
        tracing::warn!(
            "{what}: {evicted} blobs were evicted to keep to the budget; the read phase is skipped (it would find them missing)"
        );
    }
    let read = match write {
        Ok(_) if evicted == 0 => workload::run(&client, &plan, false, common.concurrency, &cpu, &bar).await,
        _ => Ok(Outcome::default()),
    };
    if let Some(eviction) = eviction {
        eviction.abort();
        let _ = eviction.await;
    }
    let (write, read) = (write?, read?);
    // Closed, the store is what it would be at rest: memtables flushed, the
    // write-ahead log they made obsolete deleted.
    drop(client);
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .map_err(|e| Error::Setup(format!("closing the store failed: {e}")))?;
    let after = Process::Own.sample();
    let disk = measure::dir_bytes(&dir)
        .map_err(|source| Error::Io { context: format!("cannot measure {}", dir.display()), source })?;
    bar.finish_and_clear();
    let mut report =
        report_of(String::from("store"), label, settings, shape, common, &plan, Some(write), Some(read));
    report.disk_bytes = Some(disk);
    report.max_size = budget.map(|b| b.max_size);
    report.peak_disk_bytes = peak_disk;
    report.space_amplification = Some(disk as f64 / report.logical_bytes.max(1) as f64);
    if let (Some(b), Some(a)) = (before, after) {
        let moved = (report.write.bytes_sent + report.read.bytes_received).max(1) as f64;
        report.cpu_seconds_per_gib =
            Some((a.cpu_seconds - b.cpu_seconds - cpu.seconds()).max(0.0) / moved * (1u64 << 30) as f64);
        report.write_amplification =
            Some((a.write_bytes - b.write_bytes) as f64 / report.logical_bytes.max(1) as f64);
    }
    report.peak_rss_bytes = Process::Own.peak_rss();
    Ok(report)
}

/// Plans a workload off the async threads (it digests every blob).
async fn prepare(shape: &Shape) -> Result<Plan, Error> {
    let shape = shape.clone();
    tokio::task::spawn_blocking(move || Plan::new(&shape))
        .await
        .map_err(|e| Error::Setup(format!("planning the workload failed: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn report_of(
    target: String,
    label: &str,
    settings: &BTreeMap<String, String>,
    shape: &Shape,
    common: &Common,
    plan: &Plan,
    write: Option<Outcome>,
    read: Option<Outcome>,
) -> Report {
    let phase = |o: &Option<Outcome>| {
        o.as_ref().map_or_else(Phase::default, |o| Phase {
            seconds: o.seconds,
            bytes_sent: o.sent,
            bytes_received: o.received,
            ops: o.ops,
        })
    };
    let (w, r) = (phase(&write), phase(&read));
    let per_sec = |amount: u64, p: &Phase| (p.seconds > 0.0 && amount > 0).then(|| amount as f64 / p.seconds);
    let mut by_call: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    let mut all = Vec::new();
    for (call, us) in write.iter().chain(read.iter()).flat_map(|o| &o.calls) {
        by_call.entry(call.name()).or_default().push(*us);
        all.push(*us);
    }
    Report {
        target,
        config: label.to_string(),
        settings: settings.clone(),
        workload: shape.workload,
        data: shape.data,
        seed: shape.seed,
        concurrency: common.concurrency,
        logical_bytes: plan.logical_bytes(),
        ingest_mbps: per_sec(w.bytes_sent, &w).map(|v| v / 1e6),
        read_mbps: per_sec(r.bytes_received, &r).map(|v| v / 1e6),
        write_ops_per_sec: per_sec(w.ops, &w),
        read_ops_per_sec: per_sec(r.ops, &r),
        latency: Latency::of(all),
        latency_by_call: by_call.into_iter().map(|(k, v)| (k.to_string(), Latency::of(v))).collect(),
        write: w,
        read: r,
        disk_bytes: None,
        space_amplification: None,
        max_size: None,
        peak_disk_bytes: None,
        write_amplification: None,
        cpu_seconds_per_gib: None,
        peak_rss_bytes: None,
        ingest_vs_sha256: None,
        ingest_vs_zstd1: None,
        read_vs_sha256: None,
        vs_yardstick: Yardstick::default(),
    }
}

/// A server under test: its client, batch limit, process and label.
struct Endpoint {
    url: String,
    client: Client,
    max_batch: u64,
    process: Option<Process>,
    label: String,
    is_yardstick: bool,
}

pub async fn bench_grpc(args: &GrpcArgs) -> Result<Vec<Report>, Error> {
    // Killed when the run ends, however it ends.
    let yardstick = match args.yardstick {
        true => Some(yardstick::spawn().await?),
        false => None,
    };
    let urls = yardstick.iter().map(|(_, url)| url).chain(&args.endpoint);
    let mut endpoints = Vec::new();
    for url in urls {
        let (grpc, max_batch) = Grpc::connect(url, &args.instance, args.compressor).await?;
        let zstd = grpc.zstd();
        if args.compressor == Compressor::Zstd && !zstd {
            eprintln!("{url} offers no zstd for ByteStream and batches: its blobs travel as they are");
        }
        let is_yardstick = yardstick.as_ref().is_some_and(|(_, y)| y == url);
        // The yardstick's process is this program's child: found by its port.
        let process = match is_yardstick {
            true => local_port(url).and_then(measure::listener_pid),
            false => args.server_pid.or_else(|| local_port(url).and_then(measure::listener_pid)),
        }
        .map(Process::Pid);
        let label = match (is_yardstick, args.endpoint.len() > 1 || yardstick.is_some()) {
            (true, _) => YARDSTICK.to_string(),
            (false, true) => url.clone(),
            (false, false) => String::new(),
        };
        let label = match (zstd, label.is_empty()) {
            (false, _) => label,
            (true, true) => "zstd transfers".to_string(),
            (true, false) => format!("{label}, zstd transfers"),
        };
        endpoints.push(Endpoint {
            url: url.clone(),
            client: Client::Grpc(Arc::new(grpc)),
            max_batch,
            process,
            label,
            is_yardstick,
        });
    }
    // Each workload runs against every server in turn, round after round,
    // so that what else the machine does at the time weighs on all of them
    // alike; a round writes blobs of its own (the seed plus the round).
    let mut reports = Vec::new();
    for round in 1..=args.rounds {
        let mut common = args.common.clone();
        common.seed = args.common.seed + u64::from(round - 1);
        for &workload in &args.common.workload {
            for &data in &args.common.data {
                for endpoint in &endpoints {
                    let shape = shape(&common, workload, data, endpoint.max_batch);
                    let mut report = run_endpoint(args, &common, endpoint, &shape).await?;
                    if args.rounds > 1 {
                        let comma = if report.config.is_empty() { "" } else { ", " };
                        report.config = format!("{}{comma}round {round}", report.config);
                        report.settings.insert("round".into(), round.to_string());
                    }
                    reports.push(report);
                }
            }
        }
    }
    Ok(reports)
}

/// One workload against one server: its report.
async fn run_endpoint(
    args: &GrpcArgs,
    common: &Common,
    endpoint: &Endpoint,
    shape: &Shape,
) -> Result<Report, Error> {
    let Endpoint { url, client, process, label, is_yardstick, .. } = endpoint;
    let (process, is_yardstick) = (*process, *is_yardstick);
    let plan = Arc::new(prepare(shape).await?);
    let tasks = match args.phase {
        Phases::Write => plan.write.len(),
        Phases::Read => plan.read.len(),
        Phases::All => plan.write.len() + plan.read.len(),
    };
    let what = format!("{} {} {}", label, shape.workload.name(), shape.data.name());
    let bar = progress(tasks as u64, what.trim());
    if args.phase != Phases::Read {
        fresh(client, &plan, shape.seed).await?;
    }
    let cpu = ClientCpu::default();
    let disk_before = args
        .server_dir
        .as_deref()
        .map(measure::dir_bytes)
        .transpose()
        .map_err(|source| Error::Io { context: "cannot measure --server-dir".into(), source })?;
    if let Some(p) = process {
        p.reset_peak_rss();
    }
    let before = process.and_then(Process::sample);
    let write = match args.phase {
        Phases::Read => None,
        _ => Some(workload::run(client, &plan, true, common.concurrency, &cpu, &bar).await?),
    };
    let read = match args.phase {
        Phases::Write => None,
        _ => Some(workload::run(client, &plan, false, common.concurrency, &cpu, &bar).await?),
    };
    let after = process.and_then(Process::sample);
    bar.finish_and_clear();
    let mut settings = BTreeMap::from([("endpoint".to_string(), url.clone())]);
    if is_yardstick {
        settings.insert("server".into(), YARDSTICK.into());
    }
    if matches!(client, Client::Grpc(g) if g.zstd()) {
        settings.insert("compressor".into(), "zstd".into());
    }
    let mut report = report_of(url.clone(), label, &settings, shape, common, &plan, write, read);
    if let (Some(dir), Some(before)) = (&args.server_dir, disk_before) {
        let after = measure::dir_bytes(dir)
            .map_err(|source| Error::Io { context: "cannot measure --server-dir".into(), source })?;
        report.disk_bytes = Some(after.saturating_sub(before));
        report.space_amplification =
            Some(after.saturating_sub(before) as f64 / report.logical_bytes.max(1) as f64);
    }
    if let (Some(b), Some(a)) = (before, after) {
        let moved = (report.write.bytes_sent + report.read.bytes_received).max(1) as f64;
        report.cpu_seconds_per_gib = Some((a.cpu_seconds - b.cpu_seconds) / moved * (1u64 << 30) as f64);
        let written = report.write.bytes_sent + report.read.bytes_sent;
        report.write_amplification =
            (written > 0).then(|| (a.write_bytes - b.write_bytes) as f64 / written as f64);
    }
    report.peak_rss_bytes = process.and_then(Process::peak_rss);
    Ok(report)
}

/// Refuses to write a workload the target already holds (from an earlier
/// run with the same seed): its figures would measure nothing.
async fn fresh(client: &Client, plan: &Plan, seed: u64) -> Result<(), Error> {
    let sample: Vec<Digest> = plan.blobs.iter().take(1000).map(|b| b.digest).collect();
    let missing = client.find_missing(sample.clone()).await?;
    if missing.len() < sample.len() {
        return Err(Error::Setup(format!(
            "the target already holds {} of this workload's first {} blobs (seed {seed}), from an earlier run: use another --seed, a fresh server, or --phase read to read them",
            sample.len() - missing.len(),
            sample.len()
        )));
    }
    Ok(())
}

/// The port of an endpoint on this machine (loopback or localhost).
fn local_port(endpoint: &str) -> Option<u16> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "0.0.0.0").then(|| port.parse().ok())?
}

/// The data generator's own tests: here, not in data.rs, which the tests
/// and benches include as source (and would run them again).
#[cfg(test)]
mod data_tests {
    use super::data::*;

    #[test]
    fn deterministic_per_seed() {
        assert_eq!(random_bytes(1000, 7), random_bytes(1000, 7));
        assert_ne!(random_bytes(1000, 7), random_bytes(1000, 8));
        assert_eq!(text_bytes(999, 3).len(), 999);
        assert_eq!(text_bytes(500, 3), text_bytes(500, 3));
    }

    #[test]
    fn content_is_the_same_whole_or_in_pieces() {
        for kind in [Kind::Random, Kind::Text, Kind::Binary] {
            let content = Content::new(kind, 5, 3 * BLOCK as u64 + 1234);
            let whole = content.bytes();
            assert_eq!(whole.len() as u64, content.size);
            assert_eq!(whole, content.bytes(), "{kind:?} is deterministic");
            let mut pieces = Vec::new();
            let mut at = 0;
            for len in [1, 70_000, 5, BLOCK, 200_000] {
                content.push(at, len, &mut pieces);
                at = (at + len as u64).min(content.size);
            }
            assert_eq!(pieces, whole, "{kind:?} pieces");
            assert_ne!(whole, Content { seed: 6, ..content }.bytes(), "{kind:?} differs by seed");
        }
    }

    #[test]
    fn a_version_is_the_one_before_edited_in_a_few_places() {
        let first = Content::new(Kind::Mixed, 9, 3 << 20);
        let (v1, v2) = (first.next_version(), first.next_version().next_version());
        let (a, b, c) = (first.bytes(), v1.bytes(), v2.bytes());
        assert_eq!((b.len() as u64, c.len() as u64), (v1.size, v2.size));
        assert!(b.len() > a.len(), "insertions grow it");
        assert_ne!(a, b);
        // About 1 % of the bytes change: all but a few percent of the new
        // version's 32-byte windows are somewhere in the old one.
        for (old, new) in [(&a, &b), (&b, &c)] {
            let windows: std::collections::HashSet<&[u8]> = old.windows(32).collect();
            let probes: Vec<&[u8]> = new.chunks_exact(32).collect();
            let shared = probes.iter().filter(|w| windows.contains(*w)).count();
            let share = shared as f64 / probes.len() as f64;
            assert!((0.97..0.995).contains(&share), "{share:.4} of the windows are shared");
        }
        let mut pieces = Vec::new();
        let mut at = 0;
        for len in [1, 70_000, 5, BLOCK, 1 << 20, 3 << 20] {
            v2.push(at, len, &mut pieces);
            at = (at + len as u64).min(v2.size);
        }
        assert_eq!(pieces, c, "a version is the same whole or in pieces");
    }

    /// The kinds compress as their names promise, at zstd level 1.
    #[test]
    fn kinds_compress_like_their_models() {
        let ratio = |kind| {
            let data = Content::new(kind, 1, 4 << 20).bytes();
            data.len() as f64 / zstd::bulk::compress(&data, 1).unwrap().len() as f64
        };
        let (random, text, binary) = (ratio(Kind::Random), ratio(Kind::Text), ratio(Kind::Binary));
        assert!(random < 1.01, "random compresses {random:.2}x");
        assert!((2.5..6.0).contains(&text), "text compresses {text:.2}x");
        assert!((1.5..3.0).contains(&binary), "binary compresses {binary:.2}x");
    }

    #[test]
    fn mixed_data_mixes_kinds_in_proportion() {
        let mut rng = Rng::new(3);
        let mut counts = [0; 3];
        for _ in 0..10_000 {
            counts[Data::Mixed.pick(&mut rng) as usize] += 1;
        }
        // Random, text, binary: 20 %, 35 %, 45 %.
        assert!((1_800..2_200).contains(&counts[0]), "{counts:?}");
        assert!((3_200..3_800).contains(&counts[1]), "{counts:?}");
        assert!((4_200..4_800).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn log_uniform_stays_in_range_and_spreads_by_magnitude() {
        let mut rng = Rng::new(9);
        let sizes: Vec<u64> = (0..20_000).map(|_| rng.log_uniform(100, 64 << 10)).collect();
        assert!(sizes.iter().all(|s| (100..=64 << 10).contains(s)));
        // 100 B to 64 KiB spans ~6.5 e-foldings; below 2.56 KiB is half of them.
        let below = sizes.iter().filter(|&&s| s < 2560).count();
        assert!((9_400..10_600).contains(&below), "{below} of 20000 below 2.5 KiB");
    }
}
