//! Routing: every request on a port goes to health, metrics, the status
//! page, the gRPC services (by content type) or the HTTP face, once the
//! caller is let in; and every reply is observed.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tower::ServiceExt;

use super::access::{self, Refusal};
use super::{methods, observe};
use crate::auth::{Access, Auth};
use crate::budget::{Budget, Charged, Holding, Keep};
use crate::cache::Cache;
use crate::http::{HttpApi, HttpError, bytes_response, code_name, route_label};
use crate::metrics::Metrics;
use crate::proto::asset::fetch_server::FetchServer;
use crate::proto::asset::push_server::PushServer;
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::reapi::action_cache_server::ActionCacheServer;
use crate::proto::reapi::capabilities_server::CapabilitiesServer;
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use crate::service::{
    Shared, action_cache::ActionCacheService, asset::FetchService, asset::PushService,
    bytestream::ByteStreamService, capabilities::CapabilitiesService, cas::CasService,
};
use crate::status::Board;

/// The gRPC services, with message limits above the advertised batch size.
pub fn grpc_routes(shared: &Arc<Shared>) -> Routes {
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
    .add_service(
        FetchServer::new(FetchService::new(Arc::clone(shared)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .add_service(
        PushServer::new(PushService::new(Arc::clone(shared)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .prepare()
}

/// What serves requests once the store is open.
#[derive(Clone)]
pub struct Services {
    pub cache: Arc<Cache>,
    pub grpc: Routes,
    pub http: Arc<HttpApi>,
}

/// Which requests a port takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Everything.
    Main,
    /// Only /metrics and /healthz (`metrics_listen`).
    Metrics,
}

/// Every request on a port: gRPC by content type, the rest to HTTP. Health
/// and metrics answer from the start; the rest once the store is open.
#[derive(Clone)]
pub struct App {
    pub port: Port,
    /// The client's address, for throttling failed logins.
    pub peer: Option<IpAddr>,
    /// The calls in flight on this connection (see [`crate::idle`]).
    pub calls: Option<Arc<crate::idle::Calls>>,
    /// The bytes all calls in flight may hold.
    pub budget: Arc<Budget>,
    pub timeouts: crate::idle::Timeouts,
    /// The metrics port serves /metrics without credentials.
    pub public_metrics: bool,
    pub auth: Option<Arc<Auth>>,
    pub board: Arc<Board>,
    pub health: Routes,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<OnceLock<Services>>,
}

impl App {
    /// Answers one request; the connection counts it as a call in flight,
    /// and the budget what it holds, until its reply has been sent.
    pub async fn serve(&self, request: Request<Incoming>) -> Response<Body> {
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
                return access::refuse(grpc, Refusal::Status(status));
            }
            _ => {}
        }
        let label = || match grpc {
            true => methods::label(&path),
            false => route_label(&method, &path),
        };
        // Refusals count as calls too: an operator sees them in the metrics.
        let admitted = match access::authorize(self.auth.as_ref(), self.peer, &request, grpc).await {
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
                return access::refuse(grpc, refusal);
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
        // the call ends. An upload's stream is held a message (gRPC, as the
        // table says) or a frame (HTTP) at a time: the upload holds its own
        // buffers.
        let keep = match grpc {
            true => methods::find(&path).map_or(Keep::Everything, |m| m.body),
            false
                if matches!(
                    route_label(&method, &path).as_str(),
                    "PUT /cas" | "POST /upload/v1/media" | "PUT /upload/v1/media"
                ) =>
            {
                Keep::LastFrame
            }
            false => Keep::Everything,
        };
        let (stall, budget) = (self.timeouts.between_calls, Arc::clone(&self.budget));
        let request = request.map(|body| {
            let timed = crate::idle::Timed::new(body, stall);
            self.metrics.count_received(Charged::new(timed, budget, keep, Arc::clone(holding)))
        });
        if grpc {
            observe::observe_grpc(&self.metrics, label(), started, call(&services.grpc, request).await)
        } else {
            let response = services.http.handle(request).await;
            observe::observe_http(&self.metrics, &method, &path, started, response)
        }
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
                Bytes::from(self.metrics.render(&stats, services.cache.tier_requests())),
            ),
            Err(e) => HttpError::from(e).into_response(),
        }
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
