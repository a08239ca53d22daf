//! The `larder` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod bench;

use larder::config::{Config, Flags, LogFormat};
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
    /// Every option of config/larder.toml, as a flag.
    #[command(flatten)]
    flags: Flags,
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
    limit_malloc_arenas();
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

/// One malloc arena per core, where glibc makes up to eight per core: a
/// thread that finds every arena busy gets one of its own, and tokio's
/// blocking threads (RocksDB's reads and writes) allocate what its workers
/// free, so each arena ends up holding free memory of its own. Fewer arenas
/// cost less CPU and peak RSS (README's fixed limits have the figures). An
/// operator's MALLOC_ARENA_MAX, or an arena_max in GLIBC_TUNABLES, is left
/// to decide.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    let chosen = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if !chosen {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: mallopt sets one of the allocator's parameters, and no
        // other thread is running yet.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, i32::try_from(cores).unwrap_or(i32::MAX)) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let config = Config::load(args.config.as_deref(), args.flags)?;
    init_logs(config.server.log_format, &config.warnings);
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::Runtime)?;
    let served = runtime.block_on(async {
        let (dir, max_size, drain) =
            (config.store.dir.clone(), config.store.max_size, config.server.drain_timeout);
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
    let flags = match args.dir {
        Some(dir) => Flags::default().with("dir", dir.display().to_string()),
        None => Flags::default(),
    };
    let config = Config::load(args.config.as_deref(), flags)?;
    init_logs(config.server.log_format, &config.warnings);
    let store = Store::open(&config.store.dir, config.store_options())?;
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
        config.store.dir.display(),
        report.removed
    );
    Ok(())
}

fn run_bench(target: bench::Target) -> Result<(), Failure> {
    init_logs(LogFormat::Compact, &[]);
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::Runtime)?;
    Ok(runtime.block_on(bench::main(target))?)
}

/// Logs go to stderr, at the level RUST_LOG sets (info by default): a compact
/// line each for people, or a JSON object each for collectors. What loading
/// the config warned about is logged first.
fn init_logs(format: LogFormat, warnings: &[String]) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Compact => logs.compact().init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    for warning in warnings {
        tracing::warn!("{warning}");
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
