//! One connection: HTTP/1.1 or HTTP/2 (h2c), with the limits and timeouts
//! every connection gets, served until it closes or a graceful shutdown has
//! let its calls finish; and the accept loop's helpers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::net::{TcpListener, TcpStream};

use super::Error;
use super::router::App;
use crate::config::Config;

/// Serves one connection (plain or TLS) until it closes, or until a
/// graceful shutdown has let its calls finish.
pub async fn serve<S>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    app: App,
    stream: S,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(app.serve(request).await) }
    });
    watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
}

pub async fn bind_optional(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, Error> {
    match addr {
        Some(addr) => Ok(Some(TcpListener::bind(addr).await.map_err(|e| Error::Bind(addr, e))?)),
        None => Ok(None),
    }
}

pub async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Open files kept for RocksDB and the server itself: the rest may be connections.
pub const RESERVED_FILES: u64 = 128;
/// How often HTTP/2 connections are pinged, and how long a ping may go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Calls at once on one HTTP/2 connection.
const MAX_STREAMS: u32 = 200;

/// HTTP/1.1 and HTTP/2 (h2c), told apart by the connection preface. Fixed,
/// generous HTTP/2 windows avoid the stalls adaptive windows cause on large
/// streams; every wait on the client has a timeout.
pub fn builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(config.server.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(256 << 10);
    builder
}

/// Raises the soft limit on open files to the hard limit (each connection
/// takes one), and returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// Failed accepts (out of descriptors, say): backed off, and logged at most
/// once every few seconds, so that a flood cannot fill the log.
#[derive(Default)]
pub struct AcceptErrors {
    pub backoff: Duration,
    last_logged: Option<Instant>,
    since_logged: u64,
}

impl AcceptErrors {
    pub fn note(&mut self, what: std::fmt::Arguments<'_>) {
        self.since_logged += 1;
        if self.last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            tracing::warn!("{what} ({} times since the last notice)", self.since_logged);
            self.last_logged = Some(Instant::now());
            self.since_logged = 0;
        }
    }
}
