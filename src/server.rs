//! Wires the store and the services to a listener, and runs the background
//! maintenance tasks for as long as the server runs.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tonic::body::Body;
use tonic::service::Routes;
use tower::ServiceExt;

use crate::config::Config;
use crate::eviction;
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::reapi::action_cache_server::ActionCacheServer;
use crate::proto::reapi::capabilities_server::CapabilitiesServer;
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use crate::service::http::HttpApi;
use crate::service::{
    Shared, action_cache::ActionCacheService, bytestream::ByteStreamService,
    capabilities::CapabilitiesService, cas::CasService,
};
use crate::store::{self, Store, StoreOptions};

/// How often access times recorded in memory are written to the index.
const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// A store opened and its ports bound, ready to serve.
pub struct Server {
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    shared: Arc<Shared>,
    config: Config,
}

impl Server {
    /// Opens the data directory and binds the listen addresses.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let options = StoreOptions {
            chunk_size: config.chunk_size.0 as usize,
            zstd_level: config.zstd_level,
            sync_writes: config.sync_writes,
            max_size: config.max_size.0,
        };
        let dir = config.dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir, options))
            .await
            .map_err(|e| Error::Store(store::Error::Open(e.to_string())))??;
        let listener = TcpListener::bind(config.listen).await.map_err(|e| Error::Bind(config.listen, e))?;
        let http_listener = match config.http_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| Error::Bind(addr, e))?),
            None => None,
        };
        let shared = Arc::new(Shared {
            store: Arc::new(store),
            max_batch_size: config.max_batch_size.0,
            max_message_size: config.max_message_size.0 as usize,
        });
        Ok(Server { listener, http_listener, shared, config })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The second, HTTP address, if one was configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_listener.as_ref().map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    /// Serves until `shutdown` completes, then lets in-flight calls finish
    /// and writes pending access times.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Server { listener, http_listener, shared, config } = self;
        let store = Arc::clone(&shared.store);
        let maintenance = tokio::spawn(maintain(Arc::clone(&store), config.partial_upload_max_age));
        // Started after the listener is bound: any backlog is worked off while serving.
        let budget = eviction::Budget {
            max_size: config.max_size.0,
            high_watermark: config.eviction_high_watermark,
            low_watermark: config.eviction_low_watermark,
            min_age: config.eviction_min_age,
        };
        let eviction = tokio::spawn(eviction::run(Arc::clone(&store), budget));
        let app = App { grpc: grpc_routes(&shared), http: Arc::new(HttpApi::new(Arc::clone(&shared))) };
        let connections = GracefulShutdown::new();
        let builder = connection_builder();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                accepted = accept(http_listener.as_ref()) => accepted,
                () = &mut shutdown => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: keep serving the others.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small RPCs must not wait on Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let service = hyper::service::service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(app.serve(request).await) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
            let connection = connections.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("connection ended: {e}");
                }
            });
        }
        // Stop accepting, then give in-flight calls the drain timeout to
        // finish; idle connections are closed at once.
        drop((listener, http_listener));
        let drain = config.drain_timeout;
        if tokio::time::timeout(drain, connections.shutdown()).await.is_err() {
            tracing::warn!("calls still running after {drain:?}: stopping anyway");
        }
        maintenance.abort();
        eviction.abort();
        let flushed = tokio::task::spawn_blocking(move || store.flush_access_times()).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!("could not write access times at shutdown: {e}");
        }
        Ok(())
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// HTTP/1.1 and HTTP/2 (h2c), told apart by the connection preface. Fixed,
/// generous HTTP/2 windows avoid the stalls adaptive windows cause on large
/// streams.
fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(256 << 10);
    builder
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

/// Every request on a port: gRPC by content type, the rest to HTTP.
#[derive(Clone)]
struct App {
    grpc: Routes,
    http: Arc<HttpApi>,
}

impl App {
    async fn serve(&self, request: Request<Incoming>) -> Response<Body> {
        let grpc = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if grpc {
            match self.grpc.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        } else {
            self.http.handle(request).await
        }
    }
}

/// Periodic upkeep: access times to disk, stale partial uploads away.
async fn maintain(store: Arc<Store>, upload_max_age: Duration) {
    let expiry_every = (upload_max_age / 2).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut flush = tokio::time::interval(ACCESS_FLUSH_INTERVAL);
    let mut expire = tokio::time::interval(expiry_every);
    loop {
        tokio::select! {
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
    #[error("cannot listen on {0}: {1} (is another server using the port? choose one with --listen)")]
    Bind(SocketAddr, std::io::Error),
}
