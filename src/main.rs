//! The `larder` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod bench;

use larder::config::{Config, LogFormat, Overrides};
use larder::server::Server;
use larder::store::Store;

#[derive(Parser)]
#[command(name = "larder", version, about = "A remote build cache (REAPI v2 over gRPC) on RocksDB")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the cache: Bazel, Buck2, Pants and other REAPI clients connect
    /// with --remote_cache=grpc://ADDR:PORT.
    Serve(Box<ServeArgs>),
    /// Re-hash every stored blob and remove those that do not match their
    /// digest (or whose chunks fail their checksums). Offline: stop the
    /// server first.
    Scrub(ScrubArgs),
    /// Measure storage settings (an embedded store) or any REAPI server
    /// (gRPC) on workloads like a build's, checking every byte read back.
    /// Prints a table (or --json, --csv) with figures as ratios to this
    /// machine's SHA-256 and zstd speeds, measured in the same run.
    Bench {
        #[command(subcommand)]
        target: Box<bench::Target>,
    },
}

#[derive(Args)]
struct ScrubArgs {
    /// Config file (TOML), for the data directory and store settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory [default: from the config, else $XDG_CACHE_HOME/larder].
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Config file (TOML); see config/larder.toml for every key.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:9092]. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// A second address for HTTP clients (the main one serves them too).
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<String>,
    /// An address serving only /metrics and /healthz (the main one serves them too).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<String>,
    /// Data directory [default: $XDG_CACHE_HOME/larder, else ~/.cache/larder].
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
    /// Size budget of the data directory, e.g. 10GiB [default: 10GiB].
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// At shutdown, how long in-flight calls may run on, e.g. 30s [default: 30s].
    #[arg(long, value_name = "DURATION")]
    drain_timeout: Option<String>,
    /// TLS certificate chain (PEM) for every port; needs --tls-key.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// htpasswd file of bcrypt entries (htpasswd -B): clients must authenticate.
    #[arg(long, value_name = "FILE")]
    htpasswd: Option<PathBuf>,
    /// With --htpasswd: anonymous clients may read; writes need credentials.
    #[arg(long)]
    allow_unauthenticated_reads: bool,
    /// With --htpasswd: the metrics port (--metrics-listen) serves /metrics
    /// without credentials, for Prometheus.
    #[arg(long)]
    public_metrics_port: bool,
    /// Re-hash stored blobs in the background at this many bytes per second,
    /// e.g. 20MiB [default: 0, off].
    #[arg(long, value_name = "SIZE")]
    scrub_rate: Option<String>,
    /// S3-compatible object store shared by larder nodes as a second tier,
    /// e.g. http://127.0.0.1:7480 (credentials: AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, or AWS_PROFILE).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Bucket of the object store tier.
    #[arg(long, value_name = "NAME")]
    s3_bucket: Option<String>,
    /// Key prefix in the bucket, for sharing it with other data.
    #[arg(long, value_name = "PREFIX")]
    s3_prefix: Option<String>,
    /// Region of the object store [default: us-east-1].
    #[arg(long, value_name = "REGION")]
    s3_region: Option<String>,
    /// Acknowledge writes once the local tier holds them, and copy them to
    /// the object store from a persistent queue in the background (default:
    /// write-through, acknowledged once both tiers hold them).
    #[arg(long)]
    s3_write_back: bool,
    /// Most bytes of writes that may wait for the object store; beyond it,
    /// writes are refused with RESOURCE_EXHAUSTED [default: 2GiB, at most
    /// half of --max-size].
    #[arg(long, value_name = "SIZE")]
    s3_queue_size: Option<String>,
    /// Log format on stderr: compact (for people) or json (for collectors) [default: compact].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
}

/// Why a command failed: each says what went wrong and what to do next.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Config(#[from] larder::config::Error),
    #[error(transparent)]
    Server(#[from] larder::server::Error),
    #[error("the data directory {0} is in use (a running larder?): stop it, then scrub")]
    Busy(String),
    #[error(transparent)]
    Store(larder::store::Error),
    #[error(transparent)]
    Bench(#[from] bench::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

impl From<larder::store::Error> for Failure {
    fn from(e: larder::store::Error) -> Failure {
        match e {
            larder::store::Error::Locked(dir) => Failure::Busy(dir),
            e => Failure::Store(e),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Scrub(args) => scrub(args),
        Command::Bench { target } => run_bench(*target),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("larder: {failure}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let overrides = Overrides {
        listen: args.listen,
        http_listen: args.http_listen,
        metrics_listen: args.metrics_listen,
        dir: args.dir,
        max_size: args.max_size,
        drain_timeout: args.drain_timeout,
        log_format: args.log_format,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_client_ca: args.tls_client_ca,
        htpasswd_file: args.htpasswd,
        allow_unauthenticated_reads: args.allow_unauthenticated_reads.then_some(true),
        public_metrics_port: args.public_metrics_port.then_some(true),
        scrub_rate: args.scrub_rate,
        s3_endpoint: args.s3_endpoint,
        s3_bucket: args.s3_bucket,
        s3_prefix: args.s3_prefix,
        s3_region: args.s3_region,
        s3_write_back: args.s3_write_back.then_some(true),
        s3_queue_size: args.s3_queue_size,
    };
    let config = Config::load(args.config.as_deref(), overrides)?;
    init_logs(config.log_format);
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::Runtime)?;
    let served = runtime.block_on(async {
        let (dir, max_size, drain) = (config.dir.clone(), config.max_size, config.drain_timeout);
        let server = Server::bind(config).await?;
        let (addr, http, metrics) = (server.local_addr(), server.http_addr(), server.metrics_addr());
        let version = env!("CARGO_PKG_VERSION");
        // Scripts and tests read these lines for the address (useful with
        // port 0): the second one says the store is open.
        println!("larder {version} listening on {addr}, opening the store in {}", dir.display());
        let ready = move || {
            let http = http.map(|a| format!(", HTTP also on {a}")).unwrap_or_default()
                + &metrics.map(|a| format!(", metrics on {a}")).unwrap_or_default();
            println!(
                "larder {version} serving REAPI on {addr} (data in {}, size budget {max_size}{http})",
                dir.display()
            );
        };
        server.run(shutdown_signal(drain), ready).await.map_err(Failure::from)
    });
    // The store is closed (its memtables flushed) as the last tasks holding
    // it end; anything stuck past this, such as an open abandoned while a
    // WAL replayed, must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(10));
    served
}

fn scrub(args: ScrubArgs) -> Result<(), Failure> {
    let overrides = Overrides { dir: args.dir, ..Overrides::default() };
    let config = Config::load(args.config.as_deref(), overrides)?;
    init_logs(config.log_format);
    let store = Store::open(&config.dir, config.store_options())?;
    let stats = store.stats()?;
    // Drawn on stderr, and only when it is a terminal.
    let bar = indicatif::ProgressBar::new(stats.logical_bytes).with_style(
        indicatif::ProgressStyle::with_template(
            "scrub {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template"),
    );
    let started = std::time::Instant::now();
    let report = store.scrub(|size| {
        bar.inc(size);
        true
    })?;
    bar.finish_and_clear();
    println!(
        "scrub: checked {} blobs ({} bytes) in {:.1}s in {}: {} corrupt, removed",
        report.blobs,
        report.bytes,
        started.elapsed().as_secs_f64(),
        config.dir.display(),
        report.removed
    );
    Ok(())
}

fn run_bench(target: bench::Target) -> Result<(), Failure> {
    init_logs(LogFormat::Compact);
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::Runtime)?;
    Ok(runtime.block_on(bench::main(target))?)
}

/// Logs go to stderr, at the level RUST_LOG sets (info by default): a compact
/// line each for people, or a JSON object each for collectors.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Compact => logs.compact().init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

/// Completes on the first SIGINT or SIGTERM; a second one exits at once,
/// without waiting for in-flight calls.
async fn shutdown_signal(drain: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!(
        "shutting down: in-flight calls have {drain:?} to finish (drain_timeout); a second signal exits at once"
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("larder: second signal: exiting without waiting for in-flight calls");
        std::process::exit(130);
    });
}
