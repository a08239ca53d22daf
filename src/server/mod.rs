//! The server: binds the ports, opens the store, accepts connections and
//! hands each to the router, and shuts down gracefully.
//!
//! - [`connection`]: one connection's HTTP/1.1 or HTTP/2, its limits and timeouts.
//! - [`router`]: which code answers a request.
//! - [`access`]: who may call.
//! - [`methods`]: the table of gRPC methods served.
//! - [`observe`]: metrics and a log line for every call.
//! - [`supervisor`]: the background tasks, started and stopped together.

mod access;
mod connection;
mod methods;
mod observe;
mod router;
mod supervisor;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::auth::{Auth, Htpasswd};
use crate::budget::Budget;
use crate::cache::{self, Cache, Tier};
use crate::config::Config;
use crate::download::Downloader;
use crate::http::HttpApi;
use crate::metrics::Metrics;
use crate::service::Shared;
use crate::status::Board;
use crate::store::{self, Store};
use connection::{AcceptErrors, accept, bind_optional};
use router::{App, Port, Services};
use supervisor::Supervisor;

/// How long a client may take over the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a wait for a locked data directory says so.
const LOCKED_NOTICE_EVERY: Duration = Duration::from_secs(5);

/// Ports bound, ready to serve; the store opens in [`Server::run`].
pub struct Server {
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
    auth: Option<Arc<Auth>>,
    /// The object store tier, if one is configured.
    tier: Option<Arc<Tier>>,
    /// FetchBlob's downloads, if download_allow lists any host.
    downloader: Option<Downloader>,
    config: Config,
}

impl Server {
    /// Binds the listen addresses.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let tls = config.tls().map(|(cert, key, ca)| crate::tls::acceptor(cert, key, ca)).transpose()?;
        let auth = match &config.auth.htpasswd_file {
            None => None,
            Some(file) => Some(Arc::new(Auth::new(
                Htpasswd::load(file).map_err(Error::Auth)?,
                config.auth.allow_unauthenticated_reads,
            ))),
        };
        let writes = if config.s3.write_back { cache::Writes::Back } else { cache::Writes::Through };
        let lookups = config.s3.lookup_timeout;
        let tier = config.s3().map(|s| Tier::connect(&s, writes, lookups).map(Arc::new)).transpose()?;
        let assets = &config.assets;
        let downloader = match assets.download_allow.is_empty() {
            true => None,
            false => Some(Downloader::new(crate::download::Settings {
                allow: assets.download_allow.clone(),
                credentials: assets.download_credentials.as_deref(),
                ca_file: assets.download_ca_file.as_deref(),
                timeout: assets.download_timeout,
            })?),
        };
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| Error::Bind(config.server.listen, e))?;
        let http_listener = bind_optional(config.server.http_listen).await?;
        let metrics_listener = bind_optional(config.server.metrics_listen).await?;
        Ok(Server { listener, http_listener, metrics_listener, tls, auth, tier, downloader, config })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The second, HTTP address, if one was configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_listener.as_ref().map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    /// The metrics address, if one was configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    /// Serves until `shutdown` completes, then lets in-flight calls finish
    /// and writes pending access times. The store opens meanwhile: until it
    /// is open, health checks answer NOT_SERVING and every other call
    /// UNAVAILABLE; `ready` runs once it is.
    pub async fn run(self, shutdown: impl Future<Output = ()>, ready: impl FnOnce()) -> Result<(), Error> {
        let Server { listener, http_listener, metrics_listener, tls, auth, tier, mut downloader, config } =
            self;
        let (mut health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::NotServing).await;
        let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let board = Board::new(
            addr(&listener),
            http_listener.as_ref().map(addr),
            metrics_listener.as_ref().map(addr),
            config.store.dir.clone(),
            tier.as_ref().map(|t| t.name().to_string()),
        );
        let app = App {
            port: Port::Main,
            peer: None,
            calls: None,
            budget: Budget::new(config.server.max_inflight_bytes.0, config.server.idle_timeout),
            timeouts: crate::idle::Timeouts {
                first_call: config.server.header_timeout,
                between_calls: config.server.idle_timeout,
            },
            public_metrics: config.auth.public_metrics_port,
            auth,
            board: Arc::new(board),
            health: Routes::new(health_service).prepare(),
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(OnceLock::new()),
        };
        let mut opening = tokio::spawn(open_store(config.clone()));
        let mut open: Option<Supervisor> = None;
        let mut ready = Some(ready);
        let connections = GracefulShutdown::new();
        let builder = connection::builder(&config);
        let open_files = connection::raise_open_file_limit();
        let max_connections = config
            .server
            .max_connections
            .min(open_files.saturating_sub(connection::RESERVED_FILES) as usize)
            .max(16);
        tracing::info!("open files: up to {open_files}; connections: up to {max_connections}");
        let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
        let mut accept_errors = AcceptErrors::default();
        let mut shutdown = std::pin::pin!(shutdown);
        // A slot for the next connection is taken before it is accepted: at
        // max_connections, new ones wait in the listen backlog (costing the
        // server no descriptor) until an open one closes.
        let mut slot: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let result = loop {
            let (accepted, port) = tokio::select! {
                free = Arc::clone(&slots).acquire_owned(), if slot.is_none() => {
                    slot = free.ok();
                    continue;
                }
                accepted = listener.accept(), if slot.is_some() => (accepted, Port::Main),
                accepted = accept(http_listener.as_ref()), if slot.is_some() => (accepted, Port::Main),
                accepted = accept(metrics_listener.as_ref()), if slot.is_some() => (accepted, Port::Metrics),
                opened = &mut opening, if open.is_none() => {
                    match opened.map_err(|e| Error::Store(store::Error::Open(e.to_string()))).and_then(|r| r) {
                        Ok(store) => {
                            let (services, supervisor) = start(&store, tier.clone(), downloader.take(), &config, &app);
                            let _ = app.ready.set(services);
                            for service in methods::services().into_iter().chain([""]) {
                                health.set_service_status(service, ServingStatus::Serving).await;
                            }
                            open = Some(supervisor);
                            if let Some(ready) = ready.take() {
                                ready();
                            }
                            continue;
                        }
                        Err(e) => break Err(e),
                    }
                }
                () = &mut shutdown => break Ok(()),
            };
            let (stream, peer) = match accepted {
                Ok((stream, peer)) => {
                    accept_errors.backoff = Duration::ZERO;
                    (stream, peer)
                }
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: keep serving the others, and back off
                    // while descriptors are short (idle connections close).
                    accept_errors.backoff =
                        (accept_errors.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    accept_errors.note(format_args!("cannot accept connections: {e}; retrying"));
                    tokio::time::sleep(accept_errors.backoff).await;
                    continue;
                }
            };
            let slot = slot.take().expect("accepted with a slot");
            // Small RPCs must not wait on Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            let calls = crate::idle::Calls::new();
            let stream = crate::idle::Watched::new(stream, Arc::clone(&calls), app.timeouts);
            let app = App { port, peer: Some(peer.ip()), calls: Some(calls), ..app.clone() };
            let (builder, watcher, tls) = (builder.clone(), connections.watcher(), tls.clone());
            // The handshake runs in the connection's task: a slow client
            // never holds up the accept loop.
            tokio::spawn(async move {
                let served = match tls {
                    None => connection::serve(&builder, watcher, app, stream).await,
                    Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => connection::serve(&builder, watcher, app, stream).await,
                        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}").into()),
                        Err(_) => Err(format!("TLS handshake took over {HANDSHAKE_TIMEOUT:?}").into()),
                    },
                };
                if let Err(e) = served {
                    tracing::debug!("connection ended: {e}");
                }
                drop(slot);
            });
        };
        opening.abort();
        // Ends Watch streams too: they would hold their connections open.
        for service in methods::services().into_iter().chain([""]) {
            health.clear_service_status(service).await;
        }
        // Stop accepting, then give in-flight calls the drain timeout to
        // finish; idle connections are closed at once.
        drop((listener, http_listener, metrics_listener));
        let drain = config.server.drain_timeout;
        if tokio::time::timeout(drain, connections.shutdown()).await.is_err() {
            tracing::warn!("calls still running after {drain:?}: stopping anyway");
        }
        if let Some(supervisor) = open {
            supervisor.stop().await;
        }
        result
    }
}

/// Opens the store, waiting while another process holds the data directory
/// (a larder still draining, say).
async fn open_store(config: Config) -> Result<Arc<Store>, Error> {
    let options = config.store_options();
    let mut noticed: Option<std::time::Instant> = None;
    loop {
        let (dir, options) = (config.store.dir.clone(), options.clone());
        // The server alone starts or stops the queue for the object store:
        // other openers (`larder scrub`) leave it as it is.
        let opened = cache::blocking(move || {
            let store = Store::open(&dir, options)?;
            store.start_or_stop_queueing()?;
            Ok::<_, store::Error>(store)
        })
        .await;
        match opened {
            Ok(store) => return Ok(Arc::new(store)),
            Err(cache::Error::Store(store::Error::Locked(dir))) => {
                if noticed.is_none_or(|t| t.elapsed() >= LOCKED_NOTICE_EVERY) {
                    tracing::warn!(
                        "the data directory {dir} is in use by another process (another larder?): waiting for it; health checks answer NOT_SERVING meanwhile"
                    );
                    noticed = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(Error::Cache(e)),
        }
    }
}

/// Puts the open store to work: the cache over it, the services over the
/// cache, and the background tasks under their supervisor.
fn start(
    store: &Arc<Store>,
    tier: Option<Arc<Tier>>,
    downloader: Option<Downloader>,
    config: &Config,
    app: &App,
) -> (Services, Supervisor) {
    let limits = cache::Limits {
        directories: cache::DirectoryLimit::new(
            config.limits.max_directory_size.0,
            config.limits.max_call_entries,
        ),
        max_message_size: config.limits.max_message_size.0 as usize,
        max_blob_size: config.limits.max_blob_size.0,
    };
    let downloads = downloader.map(|downloader| {
        cache::Downloads::new(downloader, config.store.dir.clone(), config.assets.download_max_size.0)
    });
    let (metrics, budget) = (Arc::clone(&app.metrics), Arc::clone(&app.budget));
    let cache = Cache::new(Arc::clone(store), tier, metrics, budget, limits, downloads);
    let shared = Arc::new(Shared {
        cache: Arc::clone(&cache),
        max_batch_size: config.limits.max_batch_size.0,
        max_message_size: config.limits.max_message_size.0 as usize,
        max_entries: config.limits.max_call_entries,
    });
    crate::codec::set_max_entries(config.limits.max_call_entries);
    let supervisor = Supervisor::start(store, &cache, config, &app.metrics, &app.board);
    let services =
        Services { cache, grpc: router::grpc_routes(&shared), http: Arc::new(HttpApi::new(shared, config)) };
    (services, supervisor)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error("{0}")]
    Auth(String),
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error(transparent)]
    Download(#[from] crate::download::Error),
    #[error("cannot listen on {0}: {1} (is another server using the port? choose one with --listen)")]
    Bind(SocketAddr, std::io::Error),
}
