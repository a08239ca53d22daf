//! Wires the store and the services to a listener, and runs the background
//! maintenance tasks for as long as the server runs.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::eviction;
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::reapi::action_cache_server::ActionCacheServer;
use crate::proto::reapi::capabilities_server::CapabilitiesServer;
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use crate::service::{
    Shared, action_cache::ActionCacheService, bytestream::ByteStreamService,
    capabilities::CapabilitiesService, cas::CasService,
};
use crate::store::{self, Store, StoreOptions};

/// How often access times recorded in memory are written to the index.
const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// How long in-flight calls may run on after a shutdown signal.
/// TODO(#8): configurable drain timeout, and a second signal exits at once.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A store opened and a port bound, ready to serve.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    config: Config,
}

impl Server {
    /// Opens the data directory and binds the listen address.
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
        let shared = Arc::new(Shared {
            store: Arc::new(store),
            max_batch_size: config.max_batch_size.0,
            max_message_size: config.max_message_size.0 as usize,
        });
        Ok(Server { listener, shared, config })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then lets in-flight calls finish
    /// and writes pending access times.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Server { listener, shared, config } = self;
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
        let limit = shared.max_message_size;
        // Small RPCs must not wait on Nagle's algorithm; fixed, generous HTTP/2
        // windows avoid the stalls adaptive windows cause on large streams.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (draining_tx, draining) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            shutdown.await;
            let _ = draining_tx.send(());
        };
        let serve = tonic::transport::Server::builder()
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(256 << 10)
            .add_service(
                CapabilitiesServer::new(CapabilitiesService::new(Arc::clone(&shared)))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                ContentAddressableStorageServer::new(CasService::new(Arc::clone(&shared)))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                ByteStreamServer::new(ByteStreamService::new(Arc::clone(&shared)))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                ActionCacheServer::new(ActionCacheService::new(Arc::clone(&shared)))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .serve_with_incoming_shutdown(incoming, shutdown);
        // In-flight calls get DRAIN_TIMEOUT to finish; idle clients that keep
        // their connections open must not hold the shutdown up.
        let result = tokio::select! {
            result = serve => result,
            _ = async { if draining.await.is_ok() { tokio::time::sleep(DRAIN_TIMEOUT).await } else { std::future::pending().await } } => {
                tracing::warn!("calls still running after {DRAIN_TIMEOUT:?}: stopping anyway");
                Ok(())
            }
        };
        maintenance.abort();
        eviction.abort();
        let flushed = tokio::task::spawn_blocking(move || store.flush_access_times()).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!("could not write access times at shutdown: {e}");
        }
        result.map_err(Error::Serve)
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
    #[error("the gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
}
