//! The `larder` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use larder::config::{Config, Overrides};
use larder::server::Server;

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
    Serve(ServeArgs),
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
    /// Data directory [default: $XDG_CACHE_HOME/larder, else ~/.cache/larder].
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
    /// Size budget of the data directory, e.g. 10GiB [default: 10GiB].
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .compact()
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("larder: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let overrides = Overrides {
        listen: args.listen,
        http_listen: args.http_listen,
        dir: args.dir,
        max_size: args.max_size,
    };
    let config = Config::load(args.config.as_deref(), overrides).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let (dir, max_size) = (config.dir.clone(), config.max_size);
        let server = Server::bind(config).await.map_err(|e| e.to_string())?;
        // Scripts and tests read this line for the address (useful with port 0).
        println!(
            "larder {} serving REAPI on {} (data in {}, size budget {max_size})",
            env!("CARGO_PKG_VERSION"),
            server.local_addr(),
            dir.display()
        );
        server.run(shutdown_signal()).await.map_err(|e| e.to_string())
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight calls");
}
