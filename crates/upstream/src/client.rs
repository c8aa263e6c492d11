//! The resilient client of one tier's upstream (its platform endpoints, or a peer region).
//!
//! Calls are domain requests run through one tower stack, outermost first:
//! - `Timeout`: no call waits longer than `call_timeout` for its first response;
//! - `Retry` with a `TpsBudget`: calls that never reached a server are retried on another
//!   pick, within a budget so an outage does not multiply the load;
//! - `Buffer`: makes the balancer shareable across tasks;
//! - p2c `Balance` over `PendingRequests` load: power of two choices among ready endpoints;
//! - per endpoint, a circuit breaker: an open breaker makes its endpoint not-ready, so the
//!   balancer routes around it, and when every breaker is open calls fail at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use strata_core::StrataError;
use strata_core::config::UpstreamConfig;
use strata_proto::v1::tier_service_client::TierServiceClient;
use strata_proto::v1::{
    ArrowFrame, ExecuteRequest, HealthRequest, HealthResponse, IngestRequest, IngestResponse, ListDatasetsRequest,
    ListDatasetsResponse, SubscribeEvent, SubscribeRequest,
};
use tonic::Streaming;
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::{Policy, Retry};
use tower::timeout::Timeout;
use tower::{BoxError, Service, ServiceExt};
use tracing::Instrument;

use crate::breaker::Breaker;
use crate::credential::Credential;
use crate::tls::{ClientTls, TlsConnector};
use crate::wire::{self, is_unreachable, status_error};

/// HTTP/2 flow-control window (per stream and per connection) and frame size of upstream calls.
const STREAM_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;

/// Largest message accepted from an upstream (Arrow frames of big batches).
const MAX_MESSAGE: usize = 64 << 20;

/// One upstream call and which attempt of it this is. Cheap to clone (bytes are shared), so
/// it can be retried.
#[derive(Clone, Debug)]
struct Call {
    rpc: Rpc,
    /// 1 for the first try; the retry policy counts up.
    attempt: u32,
}

#[derive(Clone, Debug)]
enum Rpc {
    List(ListDatasetsRequest),
    Subscribe(SubscribeRequest),
    Execute(ExecuteRequest, Option<Duration>),
    Health,
    Ingest(IngestRequest),
}

impl From<Rpc> for Call {
    fn from(rpc: Rpc) -> Self {
        Self { rpc, attempt: 1 }
    }
}

impl Rpc {
    fn name(&self) -> &'static str {
        match self {
            Rpc::List(_) => "ListDatasets",
            Rpc::Subscribe(_) => "Subscribe",
            Rpc::Execute(..) => "Execute",
            Rpc::Health => "Health",
            Rpc::Ingest(_) => "Ingest",
        }
    }
}

enum Reply {
    List(ListDatasetsResponse),
    Subscribe(Streaming<SubscribeEvent>),
    Execute(MetadataMap, Streaming<ArrowFrame>),
    Health(HealthResponse),
    Ingest(IngestResponse),
}

/// Raised by the client itself when every endpoint's breaker is open.
#[derive(Debug, thiserror::Error)]
#[error("circuit breaker open for every upstream endpoint ({endpoints}); last error: {last_error}")]
struct AllOpen {
    endpoints: String,
    last_error: String,
}

/// One endpoint: a lazily connected channel behind its breaker.
struct EndpointService {
    client: TierServiceClient<InterceptedService<Channel, Credential>>,
    breaker: Arc<Breaker>,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Clone for EndpointService {
    fn clone(&self) -> Self {
        Self { client: self.client.clone(), breaker: Arc::clone(&self.breaker), wait: None }
    }
}

impl Service<Call> for EndpointService {
    type Response = Reply;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Reply, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match self.breaker.admit() {
                Ok(()) => {
                    self.wait = None;
                    return Poll::Ready(Ok(()));
                }
                // Not ready while open: the balancer picks another endpoint, and this one
                // wakes when a probe is due.
                Err(until) => {
                    let sleep = self.wait.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                    sleep.as_mut().reset(until);
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let mut client = self.client.clone();
        let breaker = Arc::clone(&self.breaker);
        // One span per attempt on one endpoint: a retried call shows each try and where it went.
        let span = tracing::debug_span!(
            "upstream_call",
            rpc = call.rpc.name(),
            attempt = call.attempt,
            endpoint = %breaker.endpoint,
            breaker = breaker.state_name(),
            error = tracing::field::Empty,
        );
        let recorded = span.clone();
        let call = async move {
            let result = match call.rpc {
                Rpc::List(req) => client.list_datasets(req).await.map(|r| Reply::List(r.into_inner())),
                Rpc::Subscribe(req) => client.subscribe(req).await.map(|r| Reply::Subscribe(r.into_inner())),
                Rpc::Execute(req, timeout) => {
                    let trace = req.context.as_ref().map(|c| (c.traceparent.clone(), c.tracestate.clone()));
                    let mut request = tonic::Request::new(req);
                    if let Some(timeout) = timeout {
                        request.set_timeout(timeout);
                    }
                    // The tiers read the context from the request; a proxy or service mesh
                    // between them reads the same W3C headers.
                    if let Some((parent, state)) = trace {
                        wire::insert_trace_headers(request.metadata_mut(), &parent, &state);
                    }
                    client.execute(request).await.map(|r| {
                        let (metadata, stream, _) = r.into_parts();
                        Reply::Execute(metadata, stream)
                    })
                }
                Rpc::Health => client.health(HealthRequest {}).await.map(|r| Reply::Health(r.into_inner())),
                Rpc::Ingest(req) => client.ingest(req).await.map(|r| Reply::Ingest(r.into_inner())),
            };
            match &result {
                Err(status) if is_unreachable(status) => breaker.failure(status.message()),
                _ => breaker.success(),
            }
            if let Err(status) = &result {
                recorded.record("error", tracing::field::display(status.code()));
            }
            result.map_err(|status| Box::new(status) as BoxError)
        };
        Box::pin(call.instrument(span))
    }
}

/// Retries calls that never reached a server, within the shared budget.
#[derive(Clone)]
struct RetryUnreachable {
    budget: Arc<TpsBudget>,
    breakers: Arc<Vec<Arc<Breaker>>>,
    attempts: u32,
    counts: Arc<RetryCounts>,
}

/// What the retry budget has been asked for, for metrics.
#[derive(Debug, Default)]
struct RetryCounts {
    retried: AtomicU64,
    refused: AtomicU64,
}

impl Policy<Call, Reply, BoxError> for RetryUnreachable {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _call: &mut Call, result: &mut Result<Reply, BoxError>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(err) => {
                let unreachable = err.downcast_ref::<tonic::Status>().is_some_and(is_unreachable);
                let all_open = self.breakers.iter().all(|b| b.is_open());
                let wanted = unreachable && !all_open && self.attempts < 3;
                if wanted && !self.budget.withdraw() {
                    self.counts.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                if wanted {
                    self.attempts += 1;
                    self.counts.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(attempt = self.attempts + 1, error = %err, "retrying an upstream call that reached no server");
                    Some(tokio::time::sleep(Duration::from_millis(10 * u64::from(self.attempts))))
                } else {
                    None
                }
            }
        }
    }

    /// The copy kept for the next attempt (tower clones before each try), numbered as such.
    fn clone_request(&mut self, call: &Call) -> Option<Call> {
        let mut next = call.clone();
        next.attempt += 1;
        Some(next)
    }
}

/// One endpoint is called directly. Several are balanced behind a buffer (the balancer is
/// not `Clone`), which costs every call a hop through the buffer's task.
type Endpoints = tower::util::Either<Buffer<Call, BoxFuture<'static, Result<Reply, BoxError>>>, EndpointService>;

type Stack = Timeout<Retry<RetryUnreachable, Endpoints>>;

/// A shareable client of one upstream; clones share connections, breakers and budget.
#[derive(Clone)]
pub struct UpstreamClient {
    stack: Stack,
    breakers: Arc<Vec<Arc<Breaker>>>,
    call_timeout: Duration,
    retries: Arc<RetryCounts>,
}

impl UpstreamClient {
    /// Builds the stack; connects lazily, so an unreachable platform does not fail start-up.
    /// Must run inside a Tokio runtime.
    /// Every call carries `credential` (this tier's API key), when it has one; `https://`
    /// endpoints are reached over TLS with `tls`.
    pub fn new(
        endpoints: &[String],
        config: &UpstreamConfig,
        credential: Credential,
        tls: Option<Arc<ClientTls>>,
    ) -> Result<Self, StrataError> {
        let mut services = Vec::new();
        let mut breakers = Vec::new();
        for endpoint in endpoints {
            let channel = Endpoint::from_shared(endpoint.clone())
                .map_err(|e| StrataError::Config(format!("upstream endpoint `{endpoint}`: {e}")))?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                // Replicas and forwarded answers are bulk Arrow streams: hyper's default 2 MiB
                // stream window and 16 KiB frames halve their rate (strata-bench's bulk scenario:
                // 1.02 against 1.90 GB/s with these). The connection window bounds what one
                // platform connection may buffer here.
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(STREAM_WINDOW)
                .max_frame_size(MAX_FRAME)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            let channel = match (&tls, endpoint.starts_with("https://")) {
                (Some(tls), true) => {
                    channel.connect_with_connector_lazy(TlsConnector::new(Arc::clone(tls), config.connect_timeout))
                }
                (None, true) => {
                    return Err(StrataError::Config(format!(
                        "upstream endpoint `{endpoint}` is https but no TLS settings (the CA) are configured"
                    )));
                }
                (_, false) => channel.connect_lazy(),
            };
            let breaker = Arc::new(Breaker::new(endpoint, config.breaker_failures, config.breaker_open_for));
            let client =
                TierServiceClient::with_interceptor(channel, credential.clone()).max_decoding_message_size(MAX_MESSAGE);
            breakers.push(Arc::clone(&breaker));
            services.push(EndpointService { client, breaker, wait: None });
        }
        let endpoints = if let [_] = services.as_slice()
            && let Some(only) = services.pop()
        {
            tower::util::Either::Right(only)
        } else {
            let services = services.into_iter().map(|s| PendingRequests::new(s, CompleteOnResponse::default()));
            let balance = Balance::new(ServiceList::new(services.collect::<Vec<_>>()));
            tower::util::Either::Left(Buffer::new(balance.map_future(|f| Box::pin(f) as BoxFuture<'static, _>), 1024))
        };
        let breakers = Arc::new(breakers);
        let policy = RetryUnreachable {
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 5, config.retry_budget_percent / 100.0)),
            breakers: Arc::clone(&breakers),
            attempts: 0,
            counts: Arc::default(),
        };
        let retries = Arc::clone(&policy.counts);
        let stack = Timeout::new(Retry::new(policy, endpoints), config.call_timeout);
        Ok(Self { stack, breakers, call_timeout: config.call_timeout, retries })
    }

    async fn call(&self, call: Call) -> Result<Reply, StrataError> {
        if self.breakers.iter().all(|b| b.is_open()) {
            return Err(all_open(&self.breakers));
        }
        self.dispatch(call).await.map_err(|err| self.error(err))
    }

    /// The stack's future, boxed outside any `async` block: proving `Send` for it inside
    /// one trips a higher-ranked lifetime limitation of rustc with tower's boxed errors.
    fn dispatch(&self, call: Call) -> BoxFuture<'static, Result<Reply, BoxError>> {
        Box::pin(self.stack.clone().oneshot(call))
    }

    fn error(&self, err: BoxError) -> StrataError {
        if err.is::<tower::timeout::error::Elapsed>() {
            return StrataError::UpstreamUnavailable(format!(
                "no upstream endpoint answered within {:?} (upstream.call_timeout)",
                self.call_timeout
            ));
        }
        match err.downcast::<tonic::Status>() {
            Ok(status) => {
                if self.breakers.iter().all(|b| b.is_open()) && is_unreachable(&status) {
                    all_open(&self.breakers)
                } else {
                    status_error(&status)
                }
            }
            Err(other) => match other.downcast::<AllOpen>() {
                Ok(all) => StrataError::UpstreamUnavailable(all.to_string()),
                Err(other) => StrataError::UpstreamUnavailable(other.to_string()),
            },
        }
    }

    pub async fn list_datasets(&self, request: ListDatasetsRequest) -> Result<ListDatasetsResponse, StrataError> {
        match self.call(Rpc::List(request).into()).await? {
            Reply::List(r) => Ok(r),
            _ => Err(StrataError::Internal("mismatched upstream reply".into())),
        }
    }

    /// Opens a version stream; failures after it opened arrive on the stream.
    pub async fn subscribe(&self, request: SubscribeRequest) -> Result<Streaming<SubscribeEvent>, StrataError> {
        match self.call(Rpc::Subscribe(request).into()).await? {
            Reply::Subscribe(s) => Ok(s),
            _ => Err(StrataError::Internal("mismatched upstream reply".into())),
        }
    }

    /// Runs a query upstream; the whole stream must finish by `deadline`.
    pub async fn execute(
        &self,
        request: ExecuteRequest,
        deadline: Option<SystemTime>,
    ) -> Result<(MetadataMap, Streaming<ArrowFrame>), StrataError> {
        let timeout = deadline.map(|d| d.duration_since(SystemTime::now()).unwrap_or(Duration::from_millis(1)));
        match self.call(Rpc::Execute(request, timeout).into()).await? {
            Reply::Execute(metadata, stream) => Ok((metadata, stream)),
            _ => Err(StrataError::Internal("mismatched upstream reply".into())),
        }
    }

    pub async fn health(&self) -> Result<HealthResponse, StrataError> {
        match self.call(Rpc::Health.into()).await? {
            Reply::Health(r) => Ok(r),
            _ => Err(StrataError::Internal("mismatched upstream reply".into())),
        }
    }

    /// Uploads one edge batch. Safe to retry: the platform applies each batch id once.
    pub async fn ingest(&self, request: IngestRequest) -> Result<IngestResponse, StrataError> {
        match self.call(Rpc::Ingest(request).into()).await? {
            Reply::Ingest(r) => Ok(r),
            _ => Err(StrataError::Internal("mismatched upstream reply".into())),
        }
    }

    /// Calls retried, and retries the budget refused, since start.
    pub fn retries(&self) -> (u64, u64) {
        (self.retries.retried.load(Ordering::Relaxed), self.retries.refused.load(Ordering::Relaxed))
    }

    /// (endpoint, breaker state, last error) of every endpoint.
    pub fn endpoints(&self) -> Vec<(String, &'static str, Option<String>)> {
        self.breakers.iter().map(|b| (b.endpoint.clone(), b.state_name(), b.last_error())).collect()
    }
}

fn all_open(breakers: &[Arc<Breaker>]) -> StrataError {
    let all = AllOpen {
        endpoints: breakers.iter().map(|b| b.endpoint.as_str()).collect::<Vec<_>>().join(", "),
        last_error: breakers.iter().find_map(|b| b.last_error()).unwrap_or_else(|| "none".into()),
    };
    StrataError::UpstreamUnavailable(all.to_string())
}
