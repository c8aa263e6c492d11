//! The two server stacks of a tier, each built in one function, outermost layer first, with
//! why each layer sits where it does.
//!
//! What is *not* a layer, on purpose: query admission (`limits.max_concurrent_queries`), the
//! running-slot queue and the query timeout live in `Engine::run` and `QueryStream`. A tower
//! concurrency limit or timeout is released when the handler returns its response, which for
//! a streamed answer is when the first bytes go out; the engine holds its permit until the
//! last batch has been sent (or the client went away), so a slow reader still counts.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use strata_core::Engine;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::auth::{Authenticator, GrpcAuthLayer};
use crate::connections::GuardedListener;
use crate::http::{HttpState, router};
use crate::server::ServeError;
use crate::tls::ServerTls;

/// Streams one HTTP/2 connection may have open at once (a client multiplexing more waits).
pub const HTTP2_MAX_STREAMS: u32 = 256;
/// Bytes of headers (gRPC metadata) one request may carry.
pub const HTTP2_MAX_HEADER_BYTES: u32 = 16 << 10;
/// Streams a client may reset before the server has accepted them; past it, GOAWAY.
pub const HTTP2_MAX_PENDING_RESETS: usize = 32;

/// A tonic server with the transport bounds every gRPC listener shares. Dead clients are
/// detected (keepalive), so their queries are cancelled and their permits freed; HTTP/2
/// abuse is bounded: streams one connection may hold open, headers a call may send
/// (metadata), and streams a client may open and reset before the server answers
/// (CVE-2023-44487, rapid reset: past it the connection gets GOAWAY). Connection admission,
/// nodelay and the handshake and idle timeouts are the listener's (`GuardedListener`).
fn hardened_grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(HTTP2_MAX_STREAMS))
        .http2_max_header_list_size(Some(HTTP2_MAX_HEADER_BYTES))
        .http2_max_pending_accept_reset_streams(Some(HTTP2_MAX_PENDING_RESETS))
}

/// The gRPC stack on the Flight listener: Flight SQL, the tier protocol and reflection.
/// Returns the server future, which runs until `stop` and then lets open streams finish.
pub fn grpc(
    engine: &Engine,
    tier: &'static str,
    auth: Option<Arc<Authenticator>>,
    listener: GuardedListener,
    tls: Option<(Arc<ServerTls>, Duration)>,
    stop: CancellationToken,
) -> Result<impl Future<Output = Result<(), ServeError>> + Send + 'static, ServeError> {
    let reflection_error =
        |e: tonic_reflection::server::Error| ServeError::Server { what: "reflection", message: e.to_string() };
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(strata_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(reflection_error)?;
    // Older clients (grpcurl before 1.9, Python's grpcio-reflection) speak v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(strata_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(reflection_error)?;
    let router = hardened_grpc_server()
        // 1. Request span (outermost): every call is in a span naming its method, so the
        //    layers and handlers below log inside it, failures included.
        .layer(TraceLayer::new_for_grpc().make_span_with(
            |request: &axum::http::Request<_>| tracing::debug_span!("grpc", method = %request.uri().path()),
        ))
        // 2. Authentication (API keys; the caller's tenant marked on the call), before any
        //    handler sees the call. Absent without `auth:`.
        .layer(tower::util::option_layer(auth.map(GrpcAuthLayer::new)))
        // 3. W3C trace context is read from the metadata by the handlers (it travels in the
        //    tier protocol's QueryContext too), inside the request span.
        // 4. Message size bounds are per service (`limits.max_message_size`, below); query
        //    admission, queueing and timeouts are the engine's (see the module docs).
        .add_service(crate::flight::flight_server(engine.clone()))
        .add_service(crate::tier::tier_server(engine.clone(), tier))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let failed = |e: tonic::transport::Error| ServeError::Server { what: "flight", message: e.to_string() };
    // 0. Transport: TLS handshakes (each in its own task) before HTTP/2, when configured.
    let serve: futures::future::BoxFuture<'static, Result<(), ServeError>> = match tls {
        Some((tls, handshake_timeout)) => {
            let incoming = crate::tls::incoming(listener, tls, handshake_timeout);
            Box::pin(async move {
                router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await.map_err(failed)
            })
        }
        None => Box::pin(async move {
            router.serve_with_incoming_shutdown(listener.into_incoming(), stop.cancelled_owned()).await.map_err(failed)
        }),
    };
    Ok(serve)
}

/// The cluster's worker service on its own listener (`cluster.listen`): plan fragments
/// from the other replicas in, their rows out. The same HTTP/2 bounds as the Flight
/// listener; messages bounded by `cluster.max_message_size`; with `auth:`, only keys of
/// `cluster.tenant` get past the first layer.
pub fn worker_grpc(
    worker: datafusion_distributed::Worker,
    max_message_size: usize,
    auth: Option<GrpcAuthLayer>,
    listener: GuardedListener,
    tls: Option<(Arc<ServerTls>, Duration)>,
    stop: CancellationToken,
) -> impl Future<Output = Result<(), ServeError>> + Send + 'static {
    let router = hardened_grpc_server()
        .layer(TraceLayer::new_for_grpc().make_span_with(
            |request: &axum::http::Request<_>| tracing::debug_span!("worker", method = %request.uri().path()),
        ))
        .layer(tower::util::option_layer(auth))
        .add_service(
            worker
                .into_worker_server()
                .max_decoding_message_size(max_message_size)
                .max_encoding_message_size(max_message_size),
        );
    let failed = |e: tonic::transport::Error| ServeError::Server { what: "worker", message: e.to_string() };
    async move {
        match tls {
            Some((tls, handshake_timeout)) => {
                let incoming = crate::tls::incoming(listener, tls, handshake_timeout);
                router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await.map_err(failed)
            }
            None => router
                .serve_with_incoming_shutdown(listener.into_incoming(), stop.cancelled_owned())
                .await
                .map_err(failed),
        }
    }
}

/// The HTTP stack on the HTTP listener: the routes of `crate::http`, layered.
pub fn http(state: HttpState) -> Router {
    let body_limit = state.engine.limits().max_request_body.as_usize();
    let auth = state.auth.clone();
    let routes = router(state)
        // Innermost first in axum's `layer` order, so read from the bottom up:
        // 4. Bodies (SQL text, ingested rows) bounded by `limits.max_request_body` before a
        //    handler buffers them; headers are bounded by the connection loop
        //    (`server.handshake_timeout`), admission and timeouts by the engine.
        .layer(DefaultBodyLimit::max(body_limit));
    // 3. W3C trace context from `traceparent` is read by the handlers, inside the request span.
    // 2. Authentication (`Authorization: Bearer`, `x-api-key`), except `/health`; absent
    //    without `auth:`.
    let routes = match auth {
        Some(auth) => routes.layer(axum::middleware::from_fn_with_state(auth, crate::auth::http_middleware)),
        None => routes,
    };
    // 1. Request span (outermost): method and path on everything logged below.
    routes.layer(TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
            tracing::debug_span!("http", method = %request.method(), path = %request.uri().path())
        }))
}
