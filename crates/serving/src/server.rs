//! Starting and stopping a tier's servers: listeners are bound first (so the bound
//! addresses are known at once, even for port 0), `/health` answers immediately, and on
//! shutdown readiness drops before the listeners stop and in-flight queries drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use strata_core::Engine;
use strata_core::auth::{AuthConfig, KeyStore};
use strata_core::config::{ClusterConfig, ServerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::connections::GuardedListener;
use crate::http::HttpState;
use crate::metrics::Metrics;
use crate::tls::ServerTls;

/// Why the servers could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} server failed: {message}")]
    Server { what: &'static str, message: String },
}

/// Running Flight SQL and HTTP servers of one process.
pub struct Servers {
    pub flight_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The cluster's worker service, on platforms with `cluster:`.
    pub worker_addr: Option<SocketAddr>,
    draining: Arc<AtomicBool>,
    tasks: JoinSet<Result<(), ServeError>>,
    background: strata_core::background::Background,
    shutdown: CancellationToken,
    grace: Duration,
}

/// Binds both listeners and starts serving `engine` until `shutdown` is cancelled. The
/// Flight listener also serves the tier protocol (`strata.v1.TierService`) and gRPC
/// reflection; `tier` names this process's tier in health answers. With `auth`, every
/// request but `GET /health` must carry a key (see [`crate::auth`]).
pub async fn start(
    engine: Engine,
    server: &ServerConfig,
    cluster: Option<&ClusterConfig>,
    auth: Option<&AuthConfig>,
    tier: &'static str,
    shutdown: CancellationToken,
) -> Result<Servers, ServeError> {
    let auth = match auth {
        Some(config) => Some(crate::auth::Authenticator::new(
            KeyStore::new(config).map_err(|message| ServeError::Server { what: "auth", message })?,
        )),
        None => {
            warn_if_exposed(server);
            None
        }
    };
    let (flight_listener, flight_addr) = bind("flight", server.flight_addr).await?;
    let (http_listener, http_addr) = bind("http", server.http_addr).await?;

    let background = engine.background().clone();
    let connections = crate::connections::ConnectionGuard::new(server);
    let metrics = Metrics::install(&engine, Arc::clone(&connections));
    let draining = Arc::new(AtomicBool::new(false));
    let stop_accepting = CancellationToken::new();
    let mut tasks = JoinSet::new();

    // Connections are admitted (and set to nodelay) by the process-wide guard.
    // TLS: gRPC speaks HTTP/2 only; the HTTP listener either.
    let tls_error = |message| ServeError::Server { what: "tls", message };
    let (grpc_tls, http_tls) = match &server.tls {
        Some(files) => (
            Some(ServerTls::new(files, &[b"h2"], files.require_client_cert).map_err(tls_error)?),
            Some(ServerTls::new(files, &[b"h2", b"http/1.1"], false).map_err(tls_error)?),
        ),
        None => (None, None),
    };
    let grpc = crate::stack::grpc(
        &engine,
        tier,
        auth.clone(),
        GuardedListener::new(flight_listener, Arc::clone(&connections)),
        grpc_tls.map(|tls| (tls, server.handshake_timeout)),
        stop_accepting.clone(),
    )?;
    tasks.spawn(grpc);
    let worker_addr = match cluster {
        Some(cluster) => {
            let (listener, addr) = bind("cluster worker", cluster.listen).await?;
            let worker = crate::cluster::join(&engine, cluster, addr, stop_accepting.clone()).await?;
            let auth = match (&auth, &cluster.tenant) {
                (Some(auth), Some(tenant)) => Some(crate::auth::GrpcAuthLayer::only(Arc::clone(auth), tenant)),
                _ => None,
            };
            let listener = GuardedListener::new(listener, Arc::clone(&connections));
            let max_message = cluster.max_message_size.as_usize();
            // The replicas' TLS is the server's (`cluster.tls` is the client side).
            let tls = match (&server.tls, &cluster.tls) {
                (Some(files), Some(_)) => Some((
                    ServerTls::new(files, &[b"h2"], files.require_client_cert).map_err(tls_error)?,
                    server.handshake_timeout,
                )),
                _ => None,
            };
            tasks.spawn(crate::stack::worker_grpc(worker, max_message, auth, listener, tls, stop_accepting.clone()));
            Some(addr)
        }
        None => None,
    };
    let app = crate::stack::http(HttpState { engine, metrics, draining: Arc::clone(&draining), auth: auth.clone() });
    let stop = stop_accepting.clone();
    let header_read_timeout = server.handshake_timeout;
    tasks.spawn(serve_http(GuardedListener::new(http_listener, connections), app, header_read_timeout, http_tls, stop));

    info!(%flight_addr, %http_addr, worker = ?worker_addr, "serving");
    // Shutdown order: report not-ready first, keep serving for `shutdown_delay` while load
    // balancers notice, then stop accepting (see `wait`).
    let flag = Arc::clone(&draining);
    let stop = stop_accepting.clone();
    let delay = server.shutdown_delay;
    tokio::spawn(async move {
        shutdown.cancelled().await;
        flag.store(true, Ordering::Relaxed);
        if !delay.is_zero() {
            info!(delay = ?delay, "shutdown: reporting not ready; still accepting while load balancers notice");
            tokio::time::sleep(delay).await;
        }
        stop.cancel();
    });
    Ok(Servers {
        flight_addr,
        http_addr,
        worker_addr,
        draining,
        tasks,
        background,
        shutdown: stop_accepting,
        grace: server.shutdown_grace,
    })
}

/// Binds `addr` (port 0 picks a free one) and returns the listener with the address it got.
async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let error = |source| ServeError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}

/// Without `auth:` a tier answers anyone who can reach it: fine on loopback (a sidecar beside
/// its app), not on a shared network, so a listener on any other address is called out.
fn warn_if_exposed(server: &ServerConfig) {
    for (what, addr) in [("flight", server.flight_addr), ("http", server.http_addr)] {
        if !addr.ip().is_loopback() {
            warn!(
                listener = what,
                %addr,
                "NO AUTHENTICATION: this tier listens on a non-loopback address without `auth:`; anyone who can reach {addr} can query every dataset. Configure `auth:` keys (strata keygen) or listen on 127.0.0.1"
            );
        }
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` until `stop`, then lets open connections finish
/// their requests. Each request's headers must arrive within `header_read_timeout`
/// (`server.handshake_timeout`): a client trickling them byte by byte cannot hold a
/// connection (axum's own server loop sets no timer, so it had no such bound). With `tls`,
/// each connection's handshake runs in the connection's own task, within the same bound.
async fn serve_http(
    mut listener: GuardedListener,
    app: axum::Router,
    header_read_timeout: Duration,
    tls: Option<Arc<ServerTls>>,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout).max_buf_size(HTTP1_MAX_BUF);
    // The same HTTP/2 bounds as the gRPC listener (see `stack.rs`).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(crate::stack::HTTP2_MAX_STREAMS)
        .max_header_list_size(crate::stack::HTTP2_MAX_HEADER_BYTES)
        .max_pending_accept_reset_streams(crate::stack::HTTP2_MAX_PENDING_RESETS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.next() => accepted,
            _ = stop.cancelled() => break,
        };
        let (app, builder, watcher, tls) = (app.clone(), Arc::clone(&builder), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            // A client that goes away or times out ends its own connection; nothing to report.
            match tls {
                None => serve_connection(&builder, io, app, watcher).await,
                Some(tls) => match crate::tls::accept(&tls, io, header_read_timeout).await {
                    Ok(io) => serve_connection(&builder, io, app, watcher).await,
                    Err(err) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                },
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

async fn serve_connection<I>(
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    io: I,
    app: axum::Router,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    let service = TowerToHyperService::new(app);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
    // A request's body is handed from hyper's dispatcher to the handler within this task:
    // see `self_wake` for why those hand-overs must not go through the scheduler.
    let _ = crate::self_wake::repoll_on_self_wake(watcher.watch(connection)).await;
}

/// Bytes an HTTP/1.1 connection buffers (a request line and headers beyond it are refused).
const HTTP1_MAX_BUF: usize = 64 << 10;

/// How long background tasks (refresh, replication, upload) get to stop once the servers
/// have drained: each watches its stop signal at every wait, so they stop at once unless a
/// source or upstream call is in flight.
const BACKGROUND_STOP: Duration = Duration::from_secs(5);

impl Servers {
    /// Serves until shutdown, then stops in order, each step logged with its duration:
    /// readiness already reports false (load balancers stop sending; `server.shutdown_delay`
    /// gives them time to notice while the listeners still accept), listeners stop accepting,
    /// in-flight requests get `server.shutdown_grace` to finish, and only then is the
    /// background work (which those requests may still read from) stopped and awaited.
    /// Nothing is left to flush: edge writes are fsynced before they are acknowledged and
    /// replica manifests are replaced atomically.
    pub async fn wait(mut self) -> Result<(), ServeError> {
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            Some(result) = self.tasks.join_next() => {
                self.draining.store(true, Ordering::Relaxed);
                self.shutdown.cancel();
                flatten(result)?;
            }
        }
        info!(grace = ?self.grace, "shutdown: not ready, listeners closed; draining in-flight requests");
        let started = std::time::Instant::now();
        let drain = async {
            while let Some(result) = self.tasks.join_next().await {
                flatten(result)?;
            }
            Ok::<_, ServeError>(())
        };
        match tokio::time::timeout(self.grace, drain).await {
            Ok(result) => {
                result?;
                info!(took = ?started.elapsed(), "shutdown: in-flight requests drained");
            }
            Err(_) => warn!(grace = ?self.grace, "shutdown: grace period over; abandoning requests still in flight"),
        }
        self.background.shutdown(BACKGROUND_STOP).await;
        info!("stopped");
        Ok(())
    }
}

fn flatten(result: Result<Result<(), ServeError>, tokio::task::JoinError>) -> Result<(), ServeError> {
    result.map_err(|e| ServeError::Server { what: "task", message: e.to_string() })?
}
