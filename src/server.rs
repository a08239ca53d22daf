//! Wires the store and the services to a listener, and runs the background
//! maintenance tasks for as long as the server runs.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::metrics::Metrics;
use crate::status::Board;
use tower::ServiceExt;

use crate::auth::{Access, Auth, Caller, Htpasswd};
use crate::budget::{Budget, Charged, Holding, Keep};
use crate::cache::{self, Cache, Tier};
use crate::config::Config;
use crate::eviction;
use crate::http::{HttpApi, HttpError, bytes_response, code_name, route_label};
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::reapi::action_cache_server::ActionCacheServer;
use crate::proto::reapi::capabilities_server::CapabilitiesServer;
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use crate::service::{
    Shared, action_cache::ActionCacheService, bytestream::ByteStreamService,
    capabilities::CapabilitiesService, cas::CasService,
};
use crate::store::{self, Store};

/// How often access times recorded in memory are written to the index.
const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Ports bound, ready to serve; the store opens in [`Server::run`].
pub struct Server {
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
    auth: Option<Arc<Auth>>,
    /// The object store tier, if one is configured.
    tier: Option<Arc<Tier>>,
    config: Config,
}

/// How long a login may wait for a bcrypt check.
const BCRYPT_WAIT: Duration = Duration::from_secs(5);

/// How long a client may take over the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a wait for a locked data directory says so.
const LOCKED_NOTICE_EVERY: Duration = Duration::from_secs(5);

impl Server {
    /// Binds the listen addresses.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let tls = config.tls().map(|(cert, key, ca)| crate::tls::acceptor(cert, key, ca)).transpose()?;
        let auth = match config.htpasswd_file.as_os_str().is_empty() {
            true => None,
            false => Some(Arc::new(Auth::new(
                Htpasswd::load(&config.htpasswd_file).map_err(Error::Auth)?,
                config.allow_unauthenticated_reads,
            ))),
        };
        let writes = if config.s3_write_back { cache::Writes::Back } else { cache::Writes::Through };
        let tier = config.s3().map(|s| Tier::connect(&s, writes).map(Arc::new)).transpose()?;
        let listener = TcpListener::bind(config.listen).await.map_err(|e| Error::Bind(config.listen, e))?;
        let http_listener = bind_optional(config.http_listen).await?;
        let metrics_listener = bind_optional(config.metrics_listen).await?;
        Ok(Server { listener, http_listener, metrics_listener, tls, auth, tier, config })
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
        let Server { listener, http_listener, metrics_listener, tls, auth, tier, config } = self;
        let (mut health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::NotServing).await;
        let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let board = Board::new(
            addr(&listener),
            http_listener.as_ref().map(addr),
            metrics_listener.as_ref().map(addr),
            config.dir.clone(),
            tier.as_ref().map(|t| t.name().to_string()),
        );
        let app = App {
            port: Port::Main,
            peer: None,
            calls: None,
            budget: Budget::new(config.max_inflight_bytes.0, config.idle_timeout),
            timeouts: crate::idle::Timeouts {
                first_call: config.header_timeout,
                between_calls: config.idle_timeout,
            },
            public_metrics: config.public_metrics_port,
            auth,
            board: Arc::new(board),
            health: Routes::new(health_service).prepare(),
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(OnceLock::new()),
        };
        let mut opening = tokio::spawn(open_store(config.clone()));
        let mut open: Option<Running> = None;
        let mut ready = Some(ready);
        let connections = GracefulShutdown::new();
        let builder = connection_builder(&config);
        let open_files = raise_open_file_limit();
        let max_connections =
            config.max_connections.min(open_files.saturating_sub(RESERVED_FILES) as usize).max(16);
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
                            let running =
                                Running::start(store, tier.clone(), &config, &app.metrics, &app.board, &app.budget);
                            let _ = app.ready.set(running.services.clone());
                            for service in SERVICES.iter().chain([&""]) {
                                health.set_service_status(*service, ServingStatus::Serving).await;
                            }
                            open = Some(running);
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
                    None => serve_connection(&builder, watcher, app, stream).await,
                    Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(&builder, watcher, app, stream).await,
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
        for service in SERVICES.iter().chain([&""]) {
            health.clear_service_status(service).await;
        }
        // Stop accepting, then give in-flight calls the drain timeout to
        // finish; idle connections are closed at once.
        drop((listener, http_listener, metrics_listener));
        let drain = config.drain_timeout;
        if tokio::time::timeout(drain, connections.shutdown()).await.is_err() {
            tracing::warn!("calls still running after {drain:?}: stopping anyway");
        }
        if let Some(running) = open {
            running.stop().await;
        }
        result
    }
}

/// The fully qualified names of the services served, for health checks.
const SERVICES: [&str; 4] = [
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "google.bytestream.ByteStream",
];

/// Opens the store, waiting while another process holds the data directory
/// (a larder still draining, say).
async fn open_store(config: Config) -> Result<Arc<Store>, Error> {
    let options = config.store_options();
    let mut noticed: Option<std::time::Instant> = None;
    loop {
        let (dir, options) = (config.dir.clone(), options.clone());
        // The server alone starts or stops the queue for the object store:
        // other openers (`larder scrub`) leave it as it is.
        let opened = tokio::task::spawn_blocking(move || {
            let store = Store::open(&dir, options)?;
            store.start_or_stop_queueing()?;
            Ok(store)
        })
        .await
        .map_err(|e| Error::Store(store::Error::Open(e.to_string())))?;
        match opened {
            Ok(store) => return Ok(Arc::new(store)),
            Err(store::Error::Locked(dir)) => {
                if noticed.is_none_or(|t| t.elapsed() >= LOCKED_NOTICE_EVERY) {
                    tracing::warn!(
                        "the data directory {dir} is in use by another process (another larder?): waiting for it; health checks answer NOT_SERVING meanwhile"
                    );
                    noticed = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(Error::Store(e)),
        }
    }
}

/// The open store with its services and background tasks.
struct Running {
    store: Arc<Store>,
    services: Services,
    maintenance: JoinHandle<()>,
    eviction: JoinHandle<()>,
    /// Copies queued writes to the object store tier, if there is one.
    replicator: Option<JoinHandle<()>>,
    /// Set at shutdown: the online scrub stops at the next blob.
    stopping: Arc<AtomicBool>,
}

impl Running {
    fn start(
        store: Arc<Store>,
        tier: Option<Arc<Tier>>,
        config: &Config,
        metrics: &Arc<Metrics>,
        board: &Arc<Board>,
        budget: &Arc<Budget>,
    ) -> Running {
        let limits = cache::Limits {
            directories: cache::DirectoryLimit::new(config.max_directory_size.0, config.max_call_entries),
            max_message_size: config.max_message_size.0 as usize,
        };
        let cache = Cache::new(Arc::clone(&store), tier, Arc::clone(metrics), Arc::clone(budget), limits);
        let shared = Arc::new(Shared {
            cache: Arc::clone(&cache),
            max_batch_size: config.max_batch_size.0,
            max_message_size: config.max_message_size.0 as usize,
            max_entries: config.max_call_entries,
        });
        crate::codec::set_max_entries(config.max_call_entries);
        let replicator = cache.replicator().map(tokio::spawn);
        let maintenance = tokio::spawn(maintain(
            Arc::clone(&store),
            config.partial_upload_max_age,
            Arc::clone(metrics),
            Arc::clone(board),
        ));
        let eviction = tokio::spawn(eviction::run(Arc::clone(&store), eviction::Budget::of(config)));
        let services = Services { cache, grpc: grpc_routes(&shared), http: Arc::new(HttpApi::new(shared)) };
        let stopping = Arc::new(AtomicBool::new(false));
        if config.scrub_rate.0 > 0 {
            tokio::spawn(scrub_online(Arc::clone(&store), config.scrub_rate.0, Arc::clone(&stopping)));
        }
        Running { store, services, maintenance, eviction, replicator, stopping }
    }

    /// Stops the background tasks and writes pending access times.
    async fn stop(self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.maintenance.abort();
        self.eviction.abort();
        if let Some(replicator) = self.replicator {
            replicator.abort();
        }
        let store = self.store;
        let flushed = tokio::task::spawn_blocking(move || store.flush_access_times()).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!("could not write access times at shutdown: {e}");
        }
    }
}

/// Serves one connection (plain or TLS) until it closes, or until a
/// graceful shutdown has let its calls finish.
async fn serve_connection<S>(
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

async fn bind_optional(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, Error> {
    match addr {
        Some(addr) => Ok(Some(TcpListener::bind(addr).await.map_err(|e| Error::Bind(addr, e))?)),
        None => Ok(None),
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Open files kept for RocksDB and the server itself: the rest may be connections.
const RESERVED_FILES: u64 = 128;
/// How often HTTP/2 connections are pinged, and how long a ping may go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Calls at once on one HTTP/2 connection.
const MAX_STREAMS: u32 = 200;

/// HTTP/1.1 and HTTP/2 (h2c), told apart by the connection preface. Fixed,
/// generous HTTP/2 windows avoid the stalls adaptive windows cause on large
/// streams; every wait on the client has a timeout.
fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(config.header_timeout);
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
fn raise_open_file_limit() -> u64 {
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
struct AcceptErrors {
    backoff: Duration,
    last_logged: Option<Instant>,
    since_logged: u64,
}

impl AcceptErrors {
    fn note(&mut self, what: std::fmt::Arguments<'_>) {
        self.since_logged += 1;
        if self.last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            tracing::warn!("{what} ({} times since the last notice)", self.since_logged);
            self.last_logged = Some(Instant::now());
            self.since_logged = 0;
        }
    }
}

/// The gRPC services, with message limits above the advertised batch size.
fn grpc_routes(shared: &Arc<Shared>) -> Routes {
    let limit = shared.max_message_size;
    Routes::new(
        CapabilitiesServer::new(CapabilitiesService::new(Arc::clone(shared)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .add_service(
        ContentAddressableStorageServer::new(CasService::new(Arc::clone(shared)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .add_service(
        ByteStreamServer::new(ByteStreamService::new(Arc::clone(shared)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .add_service(
        ActionCacheServer::new(ActionCacheService::new(Arc::clone(shared)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .prepare()
}

/// What serves requests once the store is open.
#[derive(Clone)]
struct Services {
    cache: Arc<Cache>,
    grpc: Routes,
    http: Arc<HttpApi>,
}

/// Which requests a port takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    /// Everything.
    Main,
    /// Only /metrics and /healthz (`metrics_listen`).
    Metrics,
}

/// Every request on a port: gRPC by content type, the rest to HTTP. Health
/// and metrics answer from the start; the rest once the store is open.
#[derive(Clone)]
struct App {
    port: Port,
    /// The client's address, for throttling failed logins.
    peer: Option<IpAddr>,
    /// The calls in flight on this connection (see [`crate::idle`]).
    calls: Option<Arc<crate::idle::Calls>>,
    /// The bytes all calls in flight may hold.
    budget: Arc<Budget>,
    timeouts: crate::idle::Timeouts,
    /// The metrics port serves /metrics without credentials.
    public_metrics: bool,
    auth: Option<Arc<Auth>>,
    board: Arc<Board>,
    health: Routes,
    metrics: Arc<Metrics>,
    ready: Arc<OnceLock<Services>>,
}

impl App {
    /// Answers one request; the connection counts it as a call in flight,
    /// and the budget what it holds, until its reply has been sent.
    async fn serve(&self, request: Request<Incoming>) -> Response<Body> {
        let in_flight = self.calls.as_ref().map(|calls| calls.begin());
        let holding = Holding::default();
        let response = self.answer(request, &holding).await;
        let calls = self.calls.clone();
        response.map(|body| Body::new(crate::idle::Sending::new(body, calls, (in_flight, holding))))
    }

    async fn answer(&self, request: Request<Incoming>, holding: &Holding) -> Response<Body> {
        let grpc = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let (method, path) = (request.method().clone(), request.uri().path().to_string());
        match (grpc, path.as_str()) {
            (true, p) if p.starts_with("/grpc.health.v1.Health/") => {
                return call(&self.health, request).await;
            }
            (false, "/healthz") => {
                let (code, text) = match self.ready.get() {
                    Some(_) => (StatusCode::OK, "ok\n"),
                    None => (StatusCode::SERVICE_UNAVAILABLE, "opening the store\n"),
                };
                return bytes_response(
                    code,
                    "text/plain; charset=utf-8",
                    Bytes::from_static(text.as_bytes()),
                );
            }
            // Prometheus may scrape the metrics port without credentials,
            // if the operator says so (`public_metrics_port`).
            (false, "/metrics") if self.port == Port::Metrics && self.public_metrics => {
                return self.metrics_page().await;
            }
            (false, "/metrics") => {}
            _ if self.port == Port::Metrics => {
                let status = Status::not_found("this port serves only /metrics and /healthz");
                return refuse(grpc, Refusal::Status(status));
            }
            _ => {}
        }
        let label = || match grpc {
            true => calls::method_label(&path),
            false => route_label(&method, &path),
        };
        // Refusals count as calls too: an operator sees them in the metrics.
        let admitted = match self.authorize(&request, grpc).await {
            Ok(_) if !grpc && path == "/metrics" => return self.metrics_page().await,
            Ok(access) => self.ready.get().map(|services| (services, access)).ok_or_else(|| {
                Refusal::Status(Status::unavailable("larder is still opening its store: retry shortly"))
            }),
            Err(refusal) => Err(refusal),
        };
        let (services, access) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let code = match (grpc, &refusal) {
                    (true, _) => code_name(refusal.code()).to_string(),
                    (false, Refusal::Throttled(_)) => StatusCode::TOO_MANY_REQUESTS.as_str().to_string(),
                    (false, _) => crate::http::http_code(refusal.code()).as_u16().to_string(),
                };
                self.metrics.record_call(&label(), &code, Instant::now());
                return refuse(grpc, refusal);
            }
        };
        if !grpc && matches!(path.as_str(), "/" | "/status.json") {
            return self.status_page(&services.cache, path == "/", access).await;
        }
        let started = Instant::now();
        // The services ask what the caller may do (Capabilities says it).
        let mut request = request;
        request.extensions_mut().insert(access);
        // A unary call's message is decoded whole: its body is held until
        // the call ends. An upload's stream is held a message (gRPC) or a
        // frame (HTTP) at a time: the upload holds its own buffers.
        let keep = match grpc {
            true if path == "/google.bytestream.ByteStream/Write" => Keep::Messages,
            false if method == http::Method::PUT && route_label(&method, &path) == "PUT /cas" => {
                Keep::LastFrame
            }
            _ => Keep::Everything,
        };
        let (stall, budget) = (self.timeouts.between_calls, Arc::clone(&self.budget));
        let request = request.map(|body| {
            let timed = crate::idle::Timed::new(body, stall);
            self.metrics.count_received(Charged::new(timed, budget, keep, Arc::clone(holding)))
        });
        if grpc {
            calls::observe_grpc(&self.metrics, label(), started, call(&services.grpc, request).await)
        } else {
            let response = services.http.handle(request).await;
            calls::observe_http(&self.metrics, &method, &path, started, response)
        }
    }

    /// Lets through callers with good credentials, and anonymous readers
    /// when allowed; refuses the rest. Says what the caller may do.
    async fn authorize<B>(&self, request: &Request<B>, grpc: bool) -> Result<Access, Refusal> {
        let Some(auth) = &self.auth else {
            return Ok(Access::ALL);
        };
        let header = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes().to_vec());
        let caller = match auth.users.check_quickly(header.as_deref()) {
            Some(caller) => caller,
            None => self.check_password(auth, header).await?,
        };
        let write = is_write(grpc, request.method(), request.uri().path());
        match caller {
            Caller::User(_) => Ok(Access { write: true, anonymous: false }),
            Caller::Anonymous if auth.anonymous_reads && !write => {
                Ok(Access { write: false, anonymous: true })
            }
            Caller::Anonymous if auth.anonymous_reads => Err(Refusal::Status(Status::permission_denied(
                "anonymous clients may only read here: send credentials (authorization: Basic) to write",
            ))),
            Caller::Anonymous => Err(Refusal::Status(Status::unauthenticated(
                "credentials required: send authorization: Basic with a user's password",
            ))),
            Caller::Refused => Err(Refusal::Status(Status::unauthenticated(
                "wrong credentials: check the user and password",
            ))),
        }
    }

    /// bcrypt's verdict on a password it has not seen. bcrypt is slow on
    /// purpose: at most two checks run at once, and callers with too many
    /// recent failures, or a password checked meanwhile, get no check
    /// (looked at before and after waiting their turn, so that a queue of
    /// them drains at once).
    async fn check_password(&self, auth: &Arc<Auth>, header: Option<Vec<u8>>) -> Result<Caller, Refusal> {
        let user = header.as_deref().and_then(crate::auth::user_of).unwrap_or_default();
        let throttled = || auth.throttle.wait(self.peer, &user).map(Refusal::Throttled);
        if let Some(refusal) = throttled() {
            return Err(refusal);
        }
        // The queue for bcrypt is bounded in time: a flood from many
        // addresses gets UNAVAILABLE, which clients retry, not a hang.
        let _permit = match tokio::time::timeout(BCRYPT_WAIT, auth.bcrypt.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(Refusal::Status(Status::unavailable("shutting down"))),
            Err(_) => {
                let status = Status::unavailable("too many logins to check at once: retry shortly");
                return Err(Refusal::Status(status));
            }
        };
        if let Some(refusal) = throttled() {
            return Err(refusal);
        }
        // The password may have been checked while this call waited (the
        // same wrong one, sent by 40 clients at once, is checked once).
        if let Some(caller) = auth.users.check_quickly(header.as_deref()) {
            return Ok(caller);
        }
        let checker = Arc::clone(auth);
        let caller = tokio::task::spawn_blocking(move || checker.users.check(header.as_deref()))
            .await
            .unwrap_or(Caller::Refused);
        if caller == Caller::Refused {
            auth.throttle.failed(self.peer, &user, auth.users.knows(&user));
        }
        Ok(caller)
    }

    /// The status page, as HTML or JSON. Anonymous callers are not shown
    /// the data directory or the object store's endpoint.
    async fn status_page(&self, cache: &Cache, html: bool, access: Access) -> Response<Body> {
        let stats = match cache.stats().await {
            Ok(stats) => stats,
            Err(e) => return HttpError::from(e).into_response(),
        };
        match html {
            true => bytes_response(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from(self.board.html(&stats, &self.metrics, access.anonymous)),
            ),
            false => crate::http::json_response(
                StatusCode::OK,
                self.board.json(&stats, &self.metrics, access.anonymous).to_string().into_bytes(),
            ),
        }
    }

    /// Prometheus' scrape: the metrics, with the store's figures as of now.
    async fn metrics_page(&self) -> Response<Body> {
        let Some(services) = self.ready.get() else {
            let status = Status::unavailable("larder is still opening its store: retry shortly");
            return HttpError::Status(status).into_response();
        };
        match services.cache.stats().await {
            Ok(stats) => bytes_response(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                Bytes::from(self.metrics.render(&stats)),
            ),
            Err(e) => HttpError::from(e).into_response(),
        }
    }
}

/// Why a call is not let in.
enum Refusal {
    Status(Status),
    /// Too many failed logins: try again after this long.
    Throttled(Duration),
}

impl Refusal {
    fn code(&self) -> tonic::Code {
        match self {
            Refusal::Status(status) => status.code(),
            Refusal::Throttled(_) => tonic::Code::Unauthenticated,
        }
    }
}

/// A refusal in the caller's protocol: a gRPC status, or Google's JSON error
/// (429 with Retry-After for a throttled login).
fn refuse(grpc: bool, refusal: Refusal) -> Response<Body> {
    let (status, retry_after) = match refusal {
        Refusal::Status(status) => (status, None),
        Refusal::Throttled(wait) => {
            let seconds = wait.as_secs().max(1);
            let message = format!(
                "too many failed logins from this address or for this user: retry in {seconds}s, with the right password"
            );
            (Status::unauthenticated(message), Some(seconds))
        }
    };
    match (grpc, retry_after) {
        (true, _) => status.into_http(),
        (false, None) => HttpError::Status(status).into_response(),
        (false, Some(seconds)) => {
            let code = StatusCode::TOO_MANY_REQUESTS;
            let mut response =
                HttpError::Http { code, message: status.message().to_string(), allow: None }.into_response();
            response.headers_mut().insert(http::header::RETRY_AFTER, seconds.into());
            response
        }
    }
}

/// Whether a call stores something: what anonymous readers may not do.
fn is_write(grpc: bool, method: &http::Method, path: &str) -> bool {
    match grpc {
        true => matches!(
            path,
            "/google.bytestream.ByteStream/Write"
                | "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
                | "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult"
        ),
        false => *method == http::Method::PUT || path.ends_with(":batchUpdate"),
    }
}

async fn call<B>(routes: &Routes, request: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    match routes.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Every reply is observed once it ends: counted in the metrics, and logged
/// if it failed (one line per failed call, none for successes; cache misses
/// at debug level, the client's mistakes at info, the server's troubles at
/// warn).
mod calls {
    use std::sync::Arc;
    use std::time::Instant;

    use http::{Method, Response, StatusCode};
    use tonic::body::Body;
    use tonic::{Code, Status};

    use crate::http::{code_name, route_label};
    use crate::metrics::Metrics;

    /// The methods served, for metric labels: anything else is "other", so
    /// that clients cannot grow the label set.
    const METHODS: [&str; 11] = [
        "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
        "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
        "/google.bytestream.ByteStream/Read",
        "/google.bytestream.ByteStream/Write",
        "/google.bytestream.ByteStream/QueryWriteStatus",
        "/grpc.health.v1.Health/Check",
    ];

    pub fn method_label(path: &str) -> String {
        METHODS.iter().find(|m| **m == path).map_or("other", |m| m).to_string()
    }

    /// A gRPC reply: its status is in the headers of a reply with no body,
    /// else in the trailers of the stream.
    pub fn observe_grpc(
        metrics: &Arc<Metrics>,
        method: String,
        started: Instant,
        response: Response<Body>,
    ) -> Response<Body> {
        let immediate = Status::from_header_map(response.headers());
        let recorder = Arc::clone(metrics);
        response.map(move |body| {
            Body::new(metrics.count_sent(body, move |trailers| {
                let status = immediate.or_else(|| trailers.and_then(Status::from_header_map));
                match status {
                    Some(status) => {
                        log_grpc(&method, &status);
                        recorder.record_call(&method, code_name(status.code()), started);
                    }
                    // The client went away before the end.
                    None => recorder.record_call(&method, code_name(Code::Cancelled), started),
                }
            }))
        })
    }

    /// An HTTP reply: its status is known at once; its duration at its end.
    pub fn observe_http(
        metrics: &Arc<Metrics>,
        method: &Method,
        path: &str,
        started: Instant,
        response: Response<Body>,
    ) -> Response<Body> {
        log_http(method, path, response.status());
        let (route, code) = (route_label(method, path), response.status().as_u16().to_string());
        let recorder = Arc::clone(metrics);
        response.map(move |body| {
            Body::new(metrics.count_sent(body, move |_| recorder.record_call(&route, &code, started)))
        })
    }

    fn log_grpc(method: &str, status: &Status) {
        let (code, message) = (status.code(), status.message());
        // Recorded only when the message names a blob.
        let digest = digest_in(message);
        match code {
            Code::Ok => {}
            Code::NotFound => tracing::debug!(method, digest, ?code, message, "call failed"),
            Code::Internal | Code::DataLoss | Code::Unavailable | Code::ResourceExhausted | Code::Unknown => {
                tracing::warn!(method, digest, ?code, message, "call failed")
            }
            _ => tracing::info!(method, digest, ?code, message, "call failed"),
        }
    }

    fn log_http(method: &Method, path: &str, status: StatusCode) {
        let code = status.as_u16();
        match status {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => tracing::debug!(%method, path, code, "request failed"),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                tracing::warn!(%method, path, code, "request failed")
            }
            _ => tracing::info!(%method, path, code, "request failed"),
        }
    }

    /// The first `hash/size` in a message: how errors name their blob.
    fn digest_in(message: &str) -> Option<&str> {
        message.split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == ':').find(|word| {
            word.split_once('/').is_some_and(|(hash, size)| {
                hash.len() >= 40
                    && hash.bytes().all(|b| b.is_ascii_hexdigit())
                    && !size.is_empty()
                    && size.bytes().all(|b| b.is_ascii_digit())
            })
        })
    }

    #[cfg(test)]
    mod tests {
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::hostile::config())]

            /// Log fields are taken from error messages, which quote client
            /// input: whatever they hold, a digest found is a part of them.
            #[test]
            fn digests_in_any_message(message in crate::hostile::path()) {
                if let Some(digest) = super::digest_in(&message) {
                    prop_assert!(message.contains(digest));
                }
                prop_assert!(super::method_label(&message) == "other" || message.starts_with('/'));
            }
        }

        #[test]
        fn digests_are_found_in_messages() {
            let h = "ab".repeat(32);
            assert_eq!(
                super::digest_in(&format!("blob {h}/12 is not in the CAS")),
                Some(&*format!("{h}/12"))
            );
            assert_eq!(super::digest_in(&format!("blob blake3:{h}/3 is gone")), Some(&*format!("{h}/3")));
            assert_eq!(super::digest_in("write_offset 5 does not follow"), None);
        }
    }
}

/// Scrubs the store pass after pass, at most `rate` bytes per second.
async fn scrub_online(store: Arc<Store>, rate: u64, stopping: Arc<AtomicBool>) {
    while !stopping.load(Ordering::Relaxed) {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stopping));
        let pass = tokio::task::spawn_blocking(move || {
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
            });
            (report, started.elapsed())
        })
        .await;
        match pass {
            Ok((Ok(r), took)) => tracing::info!(
                "scrub pass: checked {} blobs ({} bytes) in {took:.0?}, removed {} corrupt",
                r.blobs,
                r.bytes,
                r.removed
            ),
            Ok((Err(e), _)) => tracing::warn!("scrub pass failed: {e}"),
            Err(e) => tracing::warn!("scrub task failed: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Periodic upkeep: access times to disk, stale partial uploads away,
/// throughput samples for the status page.
async fn maintain(store: Arc<Store>, upload_max_age: Duration, metrics: Arc<Metrics>, board: Arc<Board>) {
    let expiry_every = (upload_max_age / 2).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut flush = tokio::time::interval(ACCESS_FLUSH_INTERVAL);
    let mut expire = tokio::time::interval(expiry_every);
    let mut sample = tokio::time::interval(crate::status::SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = sample.tick() => board.sample(&metrics),
            _ = flush.tick() => {
                let store = Arc::clone(&store);
                match tokio::task::spawn_blocking(move || store.flush_access_times()).await {
                    Ok(Err(e)) => tracing::warn!("could not write access times: {e}"),
                    Err(e) => tracing::warn!("access-time flush failed: {e}"),
                    Ok(Ok(_)) => {}
                }
            }
            _ = expire.tick() => {
                let store = Arc::clone(&store);
                match tokio::task::spawn_blocking(move || store.expire_uploads(upload_max_age)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!("deleted {n} partial uploads idle for over {upload_max_age:?}"),
                    Ok(Err(e)) => tracing::warn!("could not expire partial uploads: {e}"),
                    Err(e) => tracing::warn!("partial-upload expiry failed: {e}"),
                }
            }
        }
    }
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
    #[error("cannot listen on {0}: {1} (is another server using the port? choose one with --listen)")]
    Bind(SocketAddr, std::io::Error),
}
