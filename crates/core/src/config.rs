//! `strata.yaml`: one file per process, validated at start.
//!
//! Errors name the file, the field path and the line, because a process that refuses to
//! start must say exactly what to fix. `${VAR}` (or `${VAR:-default}`) is replaced from the
//! environment before parsing so secrets stay out of the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Result, StrataError};

/// The whole configuration of one Strata process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Region this process belongs to; datasets default to it.
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub datasets: Vec<DatasetConfig>,
    /// The platform endpoints a sidecar or edge agent forwards to and replicates from.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    /// Datasets a sidecar keeps a local copy of, replicated from its upstream platform.
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    /// Platforms of other regions, for datasets homed there (platform only).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Edge-agent settings: identity, local storage, writable datasets.
    #[serde(default)]
    pub edge: Option<EdgeConfig>,
    /// Replicas of this platform that run large queries together (platform only).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    #[serde(default)]
    pub results_cache: ResultsCacheConfig,
    /// Trace export (OpenTelemetry over OTLP/gRPC); off unless `otlp_endpoint` is set.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// API keys (stored hashed). When set, every request but `GET /health` must carry one,
    /// on every interface; without it a tier answers anyone (fine on loopback only).
    #[serde(default)]
    pub auth: Option<crate::auth::AuthConfig>,
    /// Which datasets each tenant's keys may read, and its share of the tier (with `auth:`).
    #[serde(default)]
    pub tenants: BTreeMap<String, crate::auth::TenantConfig>,
}

/// Where and how a tier exports its traces. Export never slows a query: finished spans go
/// into a bounded queue that a background task sends in batches; when the collector is
/// down or slow the queue fills and further spans are dropped and counted
/// (`strata_trace_spans_dropped_total`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, `http://host:4317`. Unset: no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// Share of traces started here that are kept, 0.0 to 1.0. A trace a caller started
    /// keeps the caller's decision (its `traceparent` flags), so a trace is never cut in two.
    pub sampling_ratio: f64,
    /// `service.name` of the spans; defaults to the tier (`platform`, `sidecar`, `edge`).
    pub service_name: Option<String>,
    /// More resource attributes (`deployment.environment: prod`); `strata.region` is added
    /// from `region:`.
    pub resource: BTreeMap<String, String>,
    /// Finished spans waiting to be sent; beyond it they are dropped and counted.
    pub queue_size: usize,
    /// Spans per export call.
    pub batch_size: usize,
    /// How often a partial batch is sent.
    #[serde(with = "duration")]
    pub export_interval: Duration,
    /// How long one export may take before its batch is given up (and counted as dropped).
    #[serde(with = "duration")]
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: None,
            resource: BTreeMap::new(),
            queue_size: 4096,
            batch_size: 512,
            export_interval: Duration::from_secs(1),
            export_timeout: Duration::from_secs(5),
        }
    }
}

/// Bounds of the results cache (answers of queries over local accelerated copies, valid
/// exactly as long as the snapshots they read are served).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsCacheConfig {
    /// Total bytes of cached answers; `0` turns the cache off. The bodies servers keep of
    /// them (a hit's JSON, not encoded again) take up to an eighth more.
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: ByteSize,
    /// Answers larger than this stream to their client and are not cached.
    #[serde(default = "default_cache_entry_bytes")]
    pub max_entry_bytes: ByteSize,
}

impl Default for ResultsCacheConfig {
    fn default() -> Self {
        Self { max_bytes: default_cache_bytes(), max_entry_bytes: default_cache_entry_bytes() }
    }
}

fn default_cache_bytes() -> ByteSize {
    ByteSize(256 << 20)
}

fn default_cache_entry_bytes() -> ByteSize {
    ByteSize(16 << 20)
}

/// What an edge agent keeps on its own disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Unique name of this agent: with a sequence number, the idempotency key of every batch it uploads.
    pub id: String,
    /// Where the ingest log lives; relative paths are relative to the config file.
    pub data_dir: PathBuf,
    /// Bound on the ingest log; writes beyond it are refused (back-pressure), never dropped.
    #[serde(default = "default_max_log_size")]
    pub max_log_size: ByteSize,
    /// Bound on the replicas kept on disk; a version that would exceed it is not stored (the
    /// previous one keeps serving) and the dataset reports the error.
    #[serde(default = "default_max_disk")]
    pub max_disk: ByteSize,
    /// Datasets apps may write into here; each must be `writable` on the platform.
    #[serde(default)]
    pub writable: Vec<String>,
}

fn default_max_disk() -> ByteSize {
    ByteSize(10 << 30)
}

fn default_max_log_size() -> ByteSize {
    ByteSize(1 << 30)
}

/// How a downstream tier reaches its platform, and how hard it tries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// One or more platform endpoints (`http://host:port`), balanced by power of two choices.
    pub endpoints: Vec<String>,
    /// Deadline of one upstream call (until its first response), retries included.
    #[serde(default = "default_call_timeout", with = "duration")]
    pub call_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Retries allowed, as a percentage of recent calls, on top of a small floor.
    #[serde(default = "default_retry_budget")]
    pub retry_budget_percent: f32,
    /// Consecutive failures that open an endpoint's circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker fails fast before it lets one probe call through.
    #[serde(default = "default_breaker_open_for", with = "duration")]
    pub breaker_open_for: Duration,
    /// How often the platform's dataset catalog is re-read.
    #[serde(default = "default_catalog_interval", with = "duration")]
    pub catalog_interval: Duration,
    /// This tier's API key for the platform (`${VAR}` keeps it out of the file).
    #[serde(default)]
    pub credential: Option<String>,
    /// A file holding this tier's API key (a mounted Secret): re-read when it changes, so a
    /// rotated key is used without a restart. Takes precedence over `credential`.
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// TLS to `https://` endpoints: the CA that signs their certificates, and this tier's
    /// own certificate for platforms that require one (mutual TLS).
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
}

impl UpstreamConfig {
    /// The resilience defaults with the given endpoints (a platform's peer connections).
    pub fn with_endpoints(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            call_timeout: default_call_timeout(),
            connect_timeout: default_connect_timeout(),
            retry_budget_percent: default_retry_budget(),
            breaker_failures: default_breaker_failures(),
            breaker_open_for: default_breaker_open_for(),
            catalog_interval: default_catalog_interval(),
            credential: None,
            credential_file: None,
            tls: None,
        }
    }
}

fn default_call_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_budget() -> f32 {
    20.0
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_open_for() -> Duration {
    Duration::from_millis(500)
}
fn default_catalog_interval() -> Duration {
    Duration::from_secs(5)
}

/// A dataset replicated from the platform into this tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub name: String,
    /// Keep only rows matching this SQL predicate (e.g. `region = 'eu'`); queries that may
    /// need other rows are forwarded.
    #[serde(default, rename = "where")]
    pub predicate: Option<String>,
    /// Caps the replication bandwidth of this dataset, so a large snapshot does not starve the app.
    #[serde(default)]
    pub max_rate: Option<ByteSize>,
    /// A local copy older than this (the platform unreachable, or its own copy stale) is
    /// served with a warning or refused, per `on_stale`.
    #[serde(default, with = "opt_duration")]
    pub max_staleness: Option<Duration>,
    #[serde(default)]
    pub on_stale: OnStale,
    /// Keys to index in the local copy, besides those the platform indexes (which it
    /// lists in its catalog and every replica indexes too).
    #[serde(default)]
    pub indexes: Vec<IndexKey>,
    /// As `acceleration.stale_while_revalidate`: after a new version of this replica
    /// arrives, cached answers of the one it replaced may be served this long while the
    /// new answer is computed.
    #[serde(default, with = "opt_duration")]
    pub stale_while_revalidate: Option<Duration>,
}

/// What a query gets from a copy older than `max_staleness`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStale {
    /// The rows, with a `strata-warning` saying how old they are.
    #[default]
    Warn,
    /// A clear error naming the dataset, its age and the limit.
    Refuse,
}

/// A platform serving another region.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub region: String,
    pub endpoint: String,
    /// This platform's API key for the peer; unset: the `upstream:` one, if any.
    #[serde(default)]
    pub credential: Option<String>,
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// TLS to an `https://` peer; unset: `upstream.tls`, if any.
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
}

/// `cluster:` (platform): the replicas of one platform run large queries over shared files
/// together, with datafusion-distributed. Each replica serves the worker side on its own
/// port and may coordinate any query it receives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Where this replica's worker service listens. Its own port, apart from the Flight one,
    /// so a network policy can admit only platform replicas to it.
    #[serde(default = "default_cluster_listen")]
    pub listen: SocketAddr,
    /// The URL the other replicas reach this one's worker service at
    /// (`http://${POD_IP}:50061`). Unset: `http://` and the bound `listen` address, which
    /// only works when `listen` is not a wildcard.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Worker URLs of the replicas (`http://host:port`), this one's among them or not.
    #[serde(default)]
    pub workers: Vec<String>,
    /// `host:port` whose addresses are the replicas (a Kubernetes headless Service),
    /// resolved every `refresh`.
    #[serde(default)]
    pub dns: Option<String>,
    /// How often `dns` is resolved again and workers of unknown version are asked theirs.
    #[serde(default = "default_cluster_refresh", with = "duration")]
    pub refresh: Duration,
    /// A query scanning at least this many bytes of files is distributed; smaller ones run
    /// on the replica that received them. The `strata-distribute: on|off` header decides
    /// for one query.
    #[serde(default = "default_distribute_above")]
    pub distribute_above: ByteSize,
    /// Bytes of files one task scans; a stage gets as many tasks as that makes (at most one
    /// per worker).
    #[serde(default = "default_bytes_per_task")]
    pub bytes_per_task: ByteSize,
    /// How long connecting to a worker may take before the query fails.
    #[serde(default = "default_cluster_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive to workers: a worker that answers no PING within this long (a frozen
    /// or partitioned replica) fails the queries that wait on it.
    #[serde(default = "default_cluster_keepalive", with = "duration")]
    pub keepalive: Duration,
    /// Largest message the worker service accepts (a plan fragment, a batch from a peer).
    #[serde(default = "default_cluster_message_size")]
    pub max_message_size: ByteSize,
    /// The version a worker must report to take part (workers of another build are left out
    /// during a rolling deploy). Unset: this build's.
    #[serde(default)]
    pub version: Option<String>,
    /// The key this replica sends to the other replicas' worker services (`${VAR}`).
    #[serde(default)]
    pub credential: Option<String>,
    /// A file holding that key (a mounted Secret), re-read when it changes.
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// With `auth:`, the tenant whose keys (or certificates) may call the worker service:
    /// the replicas' own. Every other key is refused there, whatever it may query.
    #[serde(default)]
    pub tenant: Option<String>,
    /// TLS between the replicas: the worker listener serves `server.tls` (its
    /// `client_ca_file` / `require_client_cert` too, for mutual TLS), and this replica
    /// connects to `https://` workers with these settings (the CA, its own certificate for
    /// mutual TLS, and `server_name` when the certificates name a Service rather than pods).
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
}

fn default_cluster_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50061))
}
fn default_cluster_refresh() -> Duration {
    Duration::from_secs(5)
}
fn default_distribute_above() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_bytes_per_task() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_cluster_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_cluster_keepalive() -> Duration {
    Duration::from_secs(5)
}
fn default_cluster_message_size() -> ByteSize {
    ByteSize(64 << 20)
}

impl ClusterConfig {
    /// The version workers report and must share: `version`, else this build's.
    pub fn version(&self) -> String {
        self.version.clone().unwrap_or_else(|| concat!("strata-", env!("CARGO_PKG_VERSION")).to_string())
    }

    fn validate(
        &self,
        auth: bool,
        tenants: &BTreeMap<String, crate::auth::TenantConfig>,
        server_tls: bool,
    ) -> std::result::Result<(), String> {
        if self.workers.is_empty() && self.dns.is_none() {
            return Err("cluster: list the replicas' worker URLs in `workers:` or name them in `dns:`".into());
        }
        for (i, url) in self.workers.iter().chain(&self.advertise).enumerate() {
            let field =
                if i < self.workers.len() { format!("cluster.workers[{i}]") } else { "cluster.advertise".into() };
            check_endpoint(url).map_err(|m| format!("{field}: {m}"))?;
            if url.starts_with("https://") != self.tls.is_some() {
                return Err(match &self.tls {
                    Some(_) => format!("{field}: `{url}`: with `cluster.tls` every worker URL is https://"),
                    None => format!(
                        "{field}: `{url}` is https://: set `cluster.tls` (the CA the workers' certificates chain to)"
                    ),
                });
            }
        }
        if let Some(tls) = &self.tls {
            tls.check("cluster")?;
            if !server_tls {
                return Err(
                    "cluster.tls: the worker listener serves `server.tls`; set it (the replicas' certificate and key)"
                        .into(),
                );
            }
        }
        if let Some(dns) = &self.dns
            && dns.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("cluster.dns: `{dns}` is not `host:port`"));
        }
        if self.advertise.is_none() && self.listen.ip().is_unspecified() {
            return Err(format!(
                "cluster.advertise: `listen: {}` is a wildcard address; set `advertise:` to the URL the other replicas reach this one at",
                self.listen
            ));
        }
        if self.refresh.is_zero() || self.connect_timeout.is_zero() || self.keepalive.is_zero() {
            return Err("cluster.refresh, cluster.connect_timeout and cluster.keepalive must be above zero".into());
        }
        if self.bytes_per_task.0 == 0 || self.max_message_size.0 < 1 << 20 {
            return Err("cluster.bytes_per_task must be above zero and cluster.max_message_size at least 1MiB".into());
        }
        if auth {
            let Some(tenant) = &self.tenant else {
                return Err("cluster.tenant: with `auth:`, name the tenant whose keys may call the worker service (the replicas' own)".into());
            };
            if !tenants.contains_key(tenant) {
                return Err(format!("cluster.tenant: `{tenant}` is not one of `tenants:`"));
            }
            // Known to each other by a key, or by their client certificates (mutual TLS).
            let certificate = self.tls.as_ref().is_some_and(|tls| tls.cert_file.is_some());
            if self.credential.is_none() && self.credential_file.is_none() && !certificate {
                return Err("cluster.credential: with `auth:`, the replicas need a key of `cluster.tenant` (or a client certificate in `cluster.tls`) to call each other".into());
            }
        }
        Ok(())
    }
}

fn default_region() -> String {
    "local".to_string()
}

/// Where the process listens. Port 0 picks a free port; the bound address is logged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub flight_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// How long in-flight queries may run after SIGTERM before the process exits anyway.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long the tier keeps accepting while reporting not-ready, so load
    /// balancers (a Kubernetes Service's endpoints) stop sending before the listeners close.
    /// 0 (the default) closes them at once.
    #[serde(with = "duration")]
    pub shutdown_delay: Duration,
    /// Open client connections over all listeners; a connection beyond it is closed at
    /// once (and logged). Keep it below the process's file descriptor limit.
    pub max_connections: usize,
    /// A new connection must send its first bytes (HTTP request line, HTTP/2 preface)
    /// within this time, or it is closed: silent connections cannot hold descriptors.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// A connection that sends and receives nothing for this long is closed; keep it above
    /// `limits.query_timeout` (a query writes nothing until its first rows).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// TLS on both listeners (Flight SQL / gRPC and HTTP); none: plaintext.
    pub tls: Option<ServerTlsConfig>,
}

/// A listener's certificate and, for mutual TLS, the CA its clients' certificates must chain
/// to. Every file is re-read when it changes, so a renewed certificate is served without a
/// restart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates that sign client certificates. With it, a client may present a
    /// certificate (verified against it; a tier then knows the caller by its subject).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse connections to the Flight / tier protocol listener without a valid client
    /// certificate (mutual TLS between tiers). The HTTP listener still answers probes
    /// without one (its routes need a key when `auth:` is on).
    #[serde(default)]
    pub require_client_cert: bool,
}

/// How a tier verifies its upstream's certificate and, for mutual TLS, which certificate it
/// presents. Used for `https://` endpoints; files are re-read when they change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM CA certificates the upstream's certificate must chain to.
    pub ca_file: PathBuf,
    /// This tier's own certificate chain and key, for platforms that require one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the upstream's certificate must carry, when not the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl ClientTlsConfig {
    fn check(&self, at: &str) -> std::result::Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(format!("{at}.tls: cert_file and key_file go together (a client certificate needs its key)"));
        }
        Ok(())
    }

    fn make_relative_to(&mut self, base: &Path) {
        for path in [Some(&mut self.ca_file), self.cert_file.as_mut(), self.key_file.as_mut()].into_iter().flatten() {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// `https://` endpoints need `tls:` (the CA to verify them), and `tls:` needs them.
fn check_tls_endpoints<'a>(
    at: &str,
    endpoints: impl IntoIterator<Item = &'a String>,
    tls: Option<&ClientTlsConfig>,
) -> std::result::Result<(), String> {
    for endpoint in endpoints {
        let https = endpoint.starts_with("https://");
        if https && tls.is_none() {
            return Err(format!(
                "{at}: `{endpoint}` is https but {at}.tls (the CA that signs its certificate) is not set"
            ));
        }
        if !https && tls.is_some() {
            return Err(format!("{at}: `{endpoint}` is not https but {at}.tls is set; use https://"));
        }
    }
    tls.map_or(Ok(()), |tls| tls.check(at))
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            flight_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            tls: None,
        }
    }
}

/// Bounds on what one process accepts; exceeding any is a clear error, never a crash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    #[serde(with = "duration")]
    pub query_timeout: Duration,
    pub max_result_rows: u64,
    pub memory_limit: ByteSize,
    pub max_message_size: ByteSize,
    pub max_request_body: ByteSize,
    pub max_concurrent_queries: usize,
    /// Queries taking at least this long are logged at `info` with their SQL.
    #[serde(with = "duration")]
    pub slow_query: Duration,
    /// Longest SQL text accepted, on every interface.
    pub max_query_size: ByteSize,
    /// Deepest nesting of expressions and subqueries a statement may have (after `k = 1 OR
    /// k = 2 ...` chains are folded into IN lists): planning walks them recursively.
    pub max_expression_depth: usize,
    /// Longest IN list a statement may hold.
    pub max_in_list: usize,
    /// Most distinct parameters (`$1`, `?`) a statement may have (PostgreSQL's protocol
    /// allows 65,535).
    pub max_parameters: usize,
    /// Bytes the plan cache may hold (SQL texts and their plans); texts longer than 1/256
    /// of it are planned every time rather than cached.
    pub plan_cache_size: ByteSize,
    /// Version streams (replica subscriptions) a platform serves at once.
    pub max_subscribers: usize,
    /// Queries executing on this tier's cores at once; further admitted queries wait their
    /// turn (within their timeout). Queries forwarded whole to another tier do not count.
    /// Default: twice the number of cores.
    pub max_running_queries: Option<usize>,
}

impl LimitsConfig {
    /// `max_running_queries`, or its default.
    pub fn running_queries(&self) -> usize {
        self.max_running_queries
            .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            query_timeout: Duration::from_secs(30),
            max_result_rows: 1_000_000,
            memory_limit: ByteSize(1 << 30),
            max_message_size: ByteSize(16 << 20),
            max_request_body: ByteSize(1 << 20),
            max_concurrent_queries: 64,
            slow_query: Duration::from_secs(1),
            max_query_size: ByteSize(1 << 20),
            max_expression_depth: 1024,
            max_in_list: 65_536,
            max_parameters: 65_535,
            plan_cache_size: ByteSize(64 << 20),
            max_subscribers: 256,
            max_running_queries: None,
        }
    }
}

/// A named table clients can query, and where its rows come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub name: String,
    pub from: SourceRef,
    /// File format; inferred from the extension when absent.
    #[serde(default)]
    pub format: Option<FileFormat>,
    /// Connection parameters for database sources (host, port, user, password, db, sslmode).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub acceleration: Option<AccelerationConfig>,
    /// Accept rows written at edge agents into this dataset's PostgreSQL table (platform only),
    /// each edge batch applied exactly once.
    #[serde(default)]
    pub writable: bool,
}

impl DatasetConfig {
    /// The acceleration settings when acceleration is on.
    pub fn accelerated(&self) -> Option<&AccelerationConfig> {
        self.acceleration.as_ref().filter(|a| a.enabled)
    }

    /// The file format, from `format` or the path's extension.
    pub fn file_format(&self) -> Option<FileFormat> {
        match &self.from {
            SourceRef::File { path } => self.format.or_else(|| FileFormat::from_path(path)),
            SourceRef::Postgres { .. } => None,
        }
    }
}

/// `from:` of a dataset: `postgres:<schema.table>` or `file:<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    Postgres { schema: Option<String>, table: String },
    File { path: PathBuf },
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceRef::Postgres { schema: Some(s), table } => write!(f, "postgres:{s}.{table}"),
            SourceRef::Postgres { schema: None, table } => write!(f, "postgres:{table}"),
            SourceRef::File { path } => write!(f, "file:{}", path.display()),
        }
    }
}

impl std::str::FromStr for SourceRef {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}` is not a source: expected `postgres:<schema.table>` or `file:<path>`"))?;
        match kind {
            "postgres" => {
                let parts: Vec<&str> = rest.split('.').collect();
                match parts.as_slice() {
                    [table] if !table.is_empty() => Ok(SourceRef::Postgres { schema: None, table: table.to_string() }),
                    [schema, table] if !schema.is_empty() && !table.is_empty() => {
                        Ok(SourceRef::Postgres { schema: Some(schema.to_string()), table: table.to_string() })
                    }
                    _ => {
                        Err(format!("missing table in `{s}`: expected `postgres:<schema.table>` or `postgres:<table>`"))
                    }
                }
            }
            "file" if !rest.is_empty() => Ok(SourceRef::File { path: PathBuf::from(rest) }),
            "file" => Err(format!("missing path in `{s}`: expected `file:<path>`")),
            other => Err(format!("unknown source kind `{other}` in `{s}`: expected one of postgres, file")),
        }
    }
}

impl<'de> Deserialize<'de> for SourceRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| serde::de::Error::custom(format!("from: {e}")))
    }
}

/// File formats read through DataFusion's listing tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Parquet,
    Csv,
    #[serde(alias = "json")]
    Ndjson,
}

impl FileFormat {
    fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "parquet" => Some(Self::Parquet),
            "csv" => Some(Self::Csv),
            "json" | "ndjson" | "jsonl" => Some(Self::Ndjson),
            _ => None,
        }
    }
}

/// How a dataset is kept as a local copy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawAcceleration")]
pub struct AccelerationConfig {
    pub enabled: bool,
    pub engine: AccelerationEngine,
    pub refresh: RefreshMode,
    /// Refresh periodically; `None` refreshes only at start and on demand.
    pub refresh_interval: Option<Duration>,
    /// Column that orders rows in time (or a sequence) for `append` refresh and retention.
    pub time_column: Option<String>,
    /// Append refresh re-reads rows this far behind the newest one it has, so rows that
    /// arrive late with an older or equal timestamp are not missed; duplicates are dropped.
    pub append_overlap: Duration,
    /// Columns that identify a row, for de-duplicating the append overlap. Empty: the whole row.
    /// Also indexed, like an entry of `indexes`.
    pub primary_key: Vec<String>,
    /// Keys to keep a hash index on, each a column or a list of columns: a query that
    /// selects the rows whose key equals given values is answered from the index.
    pub indexes: Vec<IndexKey>,
    /// Rows older than this (by `time_column`) are dropped from the copy.
    pub retention: Option<Duration>,
    pub on_refresh_error: OnRefreshError,
    /// For this long after a refresh publishes a new version, the results cache may answer
    /// from the version it replaced while it computes the new answer once in the background
    /// (the answer says `strata-cache: STALE` and the versions it read). Unset: a new
    /// version is a miss for every cached query.
    pub stale_while_revalidate: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcceleration {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    engine: AccelerationEngine,
    #[serde(default)]
    refresh: RefreshMode,
    #[serde(default, with = "opt_duration")]
    refresh_interval: Option<Duration>,
    #[serde(default)]
    time_column: Option<String>,
    #[serde(default, with = "opt_duration")]
    append_overlap: Option<Duration>,
    #[serde(default)]
    primary_key: Vec<String>,
    #[serde(default)]
    indexes: Vec<IndexKey>,
    #[serde(default, with = "opt_duration")]
    retention: Option<Duration>,
    #[serde(default)]
    on_refresh_error: OnRefreshError,
    #[serde(default, with = "opt_duration")]
    stale_while_revalidate: Option<Duration>,
}

fn yes() -> bool {
    true
}

impl TryFrom<RawAcceleration> for AccelerationConfig {
    type Error = String;

    fn try_from(raw: RawAcceleration) -> std::result::Result<Self, String> {
        if raw.refresh == RefreshMode::Append && raw.time_column.is_none() {
            return Err("`refresh: append` needs `time_column` (the column that orders new rows)".into());
        }
        if raw.retention.is_some() && raw.time_column.is_none() {
            return Err("`retention` needs `time_column` (the column rows age by)".into());
        }
        if raw.refresh_interval == Some(Duration::ZERO) {
            return Err("`refresh_interval` must be greater than zero".into());
        }
        Ok(Self {
            enabled: raw.enabled,
            engine: raw.engine,
            refresh: raw.refresh,
            refresh_interval: raw.refresh_interval,
            time_column: raw.time_column,
            append_overlap: raw.append_overlap.unwrap_or(Duration::ZERO),
            primary_key: raw.primary_key,
            indexes: raw.indexes,
            retention: raw.retention,
            on_refresh_error: raw.on_refresh_error,
            stale_while_revalidate: raw.stale_while_revalidate,
        })
    }
}

/// The key of one index: `id`, or `[region, id]` for several columns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IndexKey {
    Column(String),
    Columns(Vec<String>),
}

impl IndexKey {
    pub fn columns(&self) -> Vec<String> {
        match self {
            Self::Column(c) => vec![c.clone()],
            Self::Columns(c) => c.clone(),
        }
    }
}

impl AccelerationConfig {
    /// Every key to index with where it is declared (for messages): the primary key, if
    /// any, then `indexes`, each once.
    pub fn index_keys(&self, dataset: &str) -> Vec<(String, Vec<String>)> {
        let mut keys: Vec<(String, Vec<String>)> = Vec::new();
        if !self.primary_key.is_empty() {
            keys.push((format!("datasets (`{dataset}`).acceleration.primary_key"), self.primary_key.clone()));
        }
        for (i, key) in self.indexes.iter().enumerate() {
            let columns = key.columns();
            if !keys.iter().any(|(_, k)| same_columns(k, &columns)) {
                keys.push((format!("datasets (`{dataset}`).acceleration.indexes[{i}]"), columns));
            }
        }
        keys
    }
}

/// The same column names in any order (case-insensitively, as SQL resolves them).
pub fn same_columns(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.iter().any(|y| x.eq_ignore_ascii_case(y)))
}

/// Where an accelerated copy lives. Only in-memory Arrow for now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelerationEngine {
    #[default]
    Arrow,
}

/// `full` replaces the copy atomically; `append` fetches only rows newer than the copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshMode {
    #[default]
    Full,
    Append,
}

/// What a failed refresh does to the copy being served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRefreshError {
    /// Keep serving the last good copy and report the error and the copy's age.
    #[default]
    KeepLastGood,
}

/// A byte count written as `1048576`, `512KiB`, `16MiB`, `1GiB` or `1GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// As `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("invalid size `{s}`: expected e.g. `512MiB`"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => return Err(format!("invalid size unit `{other}` in `{s}`: use B, KB, KiB, MB, MiB, GB or GiB")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration `{s}` ({e}): expected e.g. `30s`, `5m`, `1h 30m`"))
}

mod duration {
    use serde::Deserialize;
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod opt_duration {
    use serde::Deserialize;
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse_duration(&s).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

impl Config {
    /// Reads, interpolates, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StrataError::Config(format!("cannot read config file {}: {e}", path.display())))?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        // Relative file sources are relative to the config file, not to the working directory.
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(edge) = &mut config.edge
            && edge.data_dir.is_relative()
        {
            edge.data_dir = base.join(&edge.data_dir);
        }
        if let Some(tls) = &mut config.server.tls {
            for path in
                [Some(&mut tls.cert_file), Some(&mut tls.key_file), tls.client_ca_file.as_mut()].into_iter().flatten()
            {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
        if let Some(cluster) = &mut config.cluster {
            if let Some(file) = cluster.credential_file.as_mut()
                && file.is_relative()
            {
                *file = base.join(&*file);
            }
            if let Some(tls) = cluster.tls.as_mut() {
                tls.make_relative_to(base);
            }
        }
        if let Some(tls) = config.upstream.as_mut().and_then(|u| u.tls.as_mut()) {
            tls.make_relative_to(base);
        }
        for tls in config.peers.iter_mut().filter_map(|p| p.tls.as_mut()) {
            tls.make_relative_to(base);
        }
        for ds in &mut config.datasets {
            if let SourceRef::File { path } = &mut ds.from
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
        }
        Ok(config)
    }

    /// Parses config text; `origin` names it in errors (usually the file path). Its size
    /// once YAML aliases are expanded is bounded first (see [`expanded_size_within`]).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let text = interpolate_env(text, |name| std::env::var(name).ok())
            .map_err(|e| StrataError::Config(format!("{origin}: {e}")))?;
        expanded_size_within(&text, MAX_EXPANDED_CONFIG_NODES)
            .map_err(|e| StrataError::Config(format!("{origin}: {e}")))?;
        let config: Config = serde_yaml::from_str(&text).map_err(|e| StrataError::Config(format!("{origin}: {e}")))?;
        config.validate().map_err(|e| StrataError::Config(format!("{origin}: {e}")))?;
        Ok(config)
    }

    /// Every check of a loaded config again, for a config changed after loading (flags
    /// applied over the file): the message names the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.validate()
    }

    /// Cross-field checks that a single field's parser cannot see.
    fn validate(&self) -> std::result::Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, ds) in self.datasets.iter().enumerate() {
            let at = format!("datasets[{i}] (`{}`)", ds.name);
            if ds.name.is_empty() || !ds.name.split('.').all(is_identifier) || ds.name.split('.').count() > 2 {
                return Err(format!(
                    "{at}.name: `{}` is not a valid dataset name (letters, digits, `_`, optionally `schema.table`)",
                    ds.name
                ));
            }
            if !seen.insert(ds.name.to_ascii_lowercase()) {
                return Err(format!("{at}.name: dataset `{}` is defined twice", ds.name));
            }
            match &ds.from {
                SourceRef::File { path } => {
                    if ds.file_format().is_none() {
                        return Err(format!(
                            "{at}.format: cannot infer the format of `{}` from its extension; set `format: parquet|csv|ndjson`",
                            path.display()
                        ));
                    }
                    if !ds.params.is_empty() {
                        return Err(format!("{at}.params: file sources take no connection params"));
                    }
                }
                SourceRef::Postgres { .. } => {
                    if ds.format.is_some() {
                        return Err(format!("{at}.format: only file sources have a format"));
                    }
                    for key in ds.params.keys() {
                        if !POSTGRES_PARAMS.contains(&key.as_str()) {
                            return Err(format!(
                                "{at}.params: unknown PostgreSQL parameter `{key}`; expected one of {}",
                                POSTGRES_PARAMS.join(", ")
                            ));
                        }
                    }
                    crate::source_tls::SourceTls::from_params(&ds.params).map_err(|e| format!("{at}.params.{e}"))?;
                }
            }
        }
        if let Some(upstream) = &self.upstream {
            if upstream.endpoints.is_empty() {
                return Err("upstream.endpoints: at least one platform endpoint is needed".into());
            }
            for (i, e) in upstream.endpoints.iter().enumerate() {
                check_endpoint(e).map_err(|m| format!("upstream.endpoints[{i}]: {m}"))?;
            }
            if !(0.0..=1000.0).contains(&upstream.retry_budget_percent) {
                return Err("upstream.retry_budget_percent must be between 0 and 1000".into());
            }
            if upstream.breaker_failures == 0 {
                return Err("upstream.breaker_failures must be at least 1".into());
            }
            check_tls_endpoints("upstream", &upstream.endpoints, upstream.tls.as_ref())?;
        }
        let mut replicas = std::collections::HashSet::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if self.upstream.is_none() {
                return Err(format!("replicas[{i}] (`{}`): replicas need an `upstream:` to replicate from", r.name));
            }
            if !replicas.insert(r.name.to_ascii_lowercase()) {
                return Err(format!("replicas[{i}].name: `{}` is replicated twice", r.name));
            }
            if seen.contains(&r.name.to_ascii_lowercase()) {
                return Err(format!("replicas[{i}].name: `{}` is also a local dataset", r.name));
            }
        }
        if let Some(edge) = &self.edge {
            if edge.id.is_empty() || !edge.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(format!("edge.id: `{}` must be letters, digits, `-` or `_`", edge.id));
            }
            if self.upstream.is_none() {
                return Err("edge: an edge agent needs `upstream:` (the platform it uploads to)".into());
            }
        }
        for (i, ds) in self.datasets.iter().enumerate() {
            if ds.writable && !matches!(ds.from, SourceRef::Postgres { .. }) {
                return Err(format!("datasets[{i}].writable: only PostgreSQL datasets accept edge writes"));
            }
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate(self.auth.is_some(), &self.tenants, self.server.tls.is_some())?;
        }
        for (i, p) in self.peers.iter().enumerate() {
            check_endpoint(&p.endpoint).map_err(|m| format!("peers[{i}].endpoint: {m}"))?;
            if p.region == self.region {
                return Err(format!("peers[{i}].region: `{}` is this platform's own region", p.region));
            }
            let tls = p.tls.as_ref().or(self.upstream.as_ref().and_then(|u| u.tls.as_ref()));
            check_tls_endpoints(&format!("peers[{i}]"), [&p.endpoint], tls)?;
        }
        let telemetry = &self.telemetry;
        if let Some(endpoint) = &telemetry.otlp_endpoint {
            check_endpoint(endpoint).map_err(|m| format!("telemetry.otlp_endpoint: {m}"))?;
        }
        if !(0.0..=1.0).contains(&telemetry.sampling_ratio) {
            return Err(format!("telemetry.sampling_ratio: {} is not between 0.0 and 1.0", telemetry.sampling_ratio));
        }
        if !(1..=1_000_000).contains(&telemetry.queue_size) {
            return Err("telemetry.queue_size must be between 1 and 1000000".into());
        }
        if telemetry.batch_size == 0 || telemetry.batch_size > telemetry.queue_size {
            return Err("telemetry.batch_size must be at least 1 and at most telemetry.queue_size".into());
        }
        if telemetry.export_interval.is_zero() || telemetry.export_timeout.is_zero() {
            return Err("telemetry.export_interval and telemetry.export_timeout must be above zero".into());
        }
        crate::auth::check(self.auth.as_ref(), &self.tenants)?;
        if let Some(tls) = &self.server.tls
            && tls.require_client_cert
            && tls.client_ca_file.is_none()
        {
            return Err("server.tls.require_client_cert: needs server.tls.client_ca_file (the CA client certificates must chain to)".into());
        }
        if self.limits.max_concurrent_queries == 0 {
            return Err("limits.max_concurrent_queries must be at least 1".into());
        }
        Ok(())
    }
}

/// Checks one platform endpoint (`http://host:port`); the message says what is wrong with it.
pub fn check_endpoint(endpoint: &str) -> std::result::Result<(), String> {
    let rest = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"));
    match rest {
        Some(hostport) if hostport.contains(':') && !hostport.ends_with(':') => Ok(()),
        _ => Err(format!("`{endpoint}` is not an endpoint: expected `http://host:port`")),
    }
}

/// Connection parameters a PostgreSQL source accepts.
pub const POSTGRES_PARAMS: &[&str] =
    &["host", "port", "user", "password", "db", "sslmode", "sslrootcert", "connection_string", "pool_size"];

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces `${NAME}` and `${NAME:-default}`; an unset variable without default is an error
/// naming the variable and its line, since silently substituting "" hides a missing secret.
fn interpolate_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for (lineno, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("line {}: unterminated `${{` in environment reference", lineno + 1))?;
            let expr = &after[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            match (lookup(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "line {}: environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)",
                        lineno + 1
                    ));
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::parse(text, "strata.yaml") {
            Ok(_) => panic!("config should have been rejected:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = Config::parse(
            "region: eu\ndatasets:\n  - name: orders\n    from: postgres:public.orders\n    params: {host: localhost}\n    acceleration:\n      refresh: append\n      time_column: ts\n      refresh_interval: 10s\n",
            "t",
        )
        .expect("valid");
        assert_eq!(c.region, "eu");
        let acc = c.datasets[0].accelerated().expect("accelerated");
        assert_eq!(acc.refresh, RefreshMode::Append);
        assert_eq!(acc.refresh_interval, Some(Duration::from_secs(10)));
        assert_eq!(c.limits.max_result_rows, 1_000_000);
    }

    #[test]
    fn telemetry_is_off_by_default_and_checked_when_set() {
        let c = Config::parse("region: eu\n", "t").expect("valid");
        assert!(c.telemetry.otlp_endpoint.is_none());
        let c = Config::parse(
            "telemetry:\n  otlp_endpoint: http://collector:4317\n  sampling_ratio: 0.25\n  resource: {deployment.environment: prod}\n  export_timeout: 2s\n",
            "t",
        )
        .expect("valid");
        assert_eq!(c.telemetry.otlp_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(c.telemetry.export_timeout, Duration::from_secs(2));
        assert_eq!(c.telemetry.resource["deployment.environment"], "prod");
        let e = err("telemetry:\n  otlp_endpoint: collector:4317\n");
        assert!(e.contains("telemetry.otlp_endpoint") && e.contains("http://host:port"), "{e}");
        let e = err("telemetry:\n  sampling_ratio: 1.5\n");
        assert!(e.contains("telemetry.sampling_ratio: 1.5"), "{e}");
        let e = err("telemetry:\n  queue_size: 0\n");
        assert!(e.contains("telemetry.queue_size"), "{e}");
        let e = err("telemetry:\n  sample_ratio: 1\n");
        assert!(e.contains("unknown field `sample_ratio`") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn cluster_is_checked_field_by_field() {
        let ok =
            Config::parse("cluster:\n  workers: [http://10.0.0.1:50061, http://10.0.0.2:50061]\n", "t").expect("valid");
        let cluster = ok.cluster.expect("cluster");
        assert_eq!(cluster.distribute_above, ByteSize(256 << 20));
        assert_eq!(cluster.listen, default_cluster_listen());
        assert!(cluster.version().starts_with("strata-"));
        assert!(err("cluster: {}\n").contains("`workers:` or name them in `dns:`"));
        assert!(err("cluster:\n  workers: [10.0.0.1:50061]\n").contains("cluster.workers[0]"));
        assert!(err("cluster:\n  workers: [https://a:1]\n").contains("set `cluster.tls`"));
        let tls_without_server = err("cluster:\n  workers: [https://a:1]\n  tls: {ca_file: ca.pem}\n");
        assert!(tls_without_server.contains("serves `server.tls`"), "{tls_without_server}");
        assert!(err("cluster:\n  dns: strata-platform-peers\n").contains("cluster.dns"));
        let wildcard = err("cluster:\n  listen: 0.0.0.0:50061\n  dns: peers:50061\n");
        assert!(wildcard.contains("cluster.advertise"), "{wildcard}");
        let with_auth = "auth:\n  keys: [{id: k, tenant: replicas, hash: 'sha256:0000000000000000000000000000000000000000000000000000000000000000'}]\ntenants:\n  replicas: {datasets: []}\ncluster:\n  workers: [http://a:1]\n";
        assert!(err(with_auth).contains("cluster.tenant"), "{}", err(with_auth));
        let no_key = format!("{with_auth}  tenant: replicas\n");
        assert!(err(&no_key).contains("cluster.credential"), "{}", err(&no_key));
        let unknown = format!("{with_auth}  tenant: nobody\n  credential: k\n");
        assert!(err(&unknown).contains("`nobody` is not one of `tenants:`"));
        Config::parse(&format!("{with_auth}  tenant: replicas\n  credential: k\n"), "t").expect("valid with auth");
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let e = err("datasets:\n  - name: a\n    from: file:a.csv\n    acceleration:\n      enabeld: true\n");
        assert!(e.contains("strata.yaml"), "{e}");
        assert!(e.contains("unknown field `enabeld`"), "{e}");
        assert!(e.contains("line 5"), "{e}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let e = err("limits:\n  query_timeout: 5 parsecs\n");
        assert!(e.contains("invalid duration `5 parsecs`"), "{e}");
        assert!(e.contains("limits.query_timeout") || e.contains("line 2"), "{e}");
    }

    #[test]
    fn unknown_source_kind_is_explained() {
        let e = err("datasets:\n  - name: a\n    from: mysql:db.t\n");
        assert!(e.contains("datasets[0]: from: unknown source kind `mysql`"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn missing_table_is_explained() {
        let e = err("datasets:\n  - name: a\n    from: 'postgres:'\n");
        assert!(e.contains("missing table"), "{e}");
        let e = err("datasets:\n  - name: a\n");
        assert!(e.contains("missing field `from`"), "{e}");
    }

    #[test]
    fn append_without_time_column_is_rejected() {
        let e = err("datasets:\n  - name: a\n    from: file:a.csv\n    acceleration: {refresh: append}\n");
        assert!(e.contains("time_column"), "{e}");
    }

    #[test]
    fn duplicate_dataset_and_bad_size() {
        let e = err("datasets:\n  - {name: a, from: file:a.csv}\n  - {name: A, from: file:b.csv}\n");
        assert!(e.contains("defined twice"), "{e}");
        let e = err("limits:\n  memory_limit: 12 parsecs\n");
        assert!(e.contains("invalid size"), "{e}");
    }

    #[test]
    fn env_interpolation() {
        let looked = interpolate_env("a: ${X}\nb: ${Y:-dflt}\n", |n| (n == "X").then(|| "1".to_string()));
        assert_eq!(looked.expect("ok"), "a: 1\nb: dflt\n");
        let e = interpolate_env("a: 1\nb: ${NOPE}\n", |_| None).expect_err("unset");
        assert!(e.contains("line 2") && e.contains("NOPE"), "{e}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("16MiB".parse::<ByteSize>(), Ok(ByteSize(16 << 20)));
        assert_eq!("1GB".parse::<ByteSize>(), Ok(ByteSize(1_000_000_000)));
        assert!("1XB".parse::<ByteSize>().is_err());
    }
}

/// Values (scalars, sequence items, mapping entries) a config may hold once YAML aliases are
/// expanded: far above any real config, far below what a "billion laughs" file expands to.
const MAX_EXPANDED_CONFIG_NODES: usize = 100_000;

/// Refuses YAML whose aliases expand to more than `max` values. A 231 KB file of nested
/// aliases grew the process to 1.86 GB while being deserialized; counting the expanded
/// values without keeping any of them stops such a file after `max` steps.
fn expanded_size_within(text: &str, max: usize) -> std::result::Result<(), String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    struct Count<'a>(&'a std::cell::Cell<usize>, usize);

    impl Count<'_> {
        fn tick<E: serde::de::Error>(&self) -> std::result::Result<(), E> {
            self.0.set(self.0.get() + 1);
            if self.0.get() > self.1 {
                return Err(E::custom(format!(
                    "the config expands to more than {} values once its YAML aliases are resolved",
                    self.1
                )));
            }
            Ok(())
        }
    }

    impl<'de> DeserializeSeed<'de> for Count<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any YAML value")
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> std::result::Result<(), E> {
            self.tick()
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> std::result::Result<(), E> {
            self.tick()
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> std::result::Result<(), E> {
            self.tick()
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> std::result::Result<(), E> {
            self.tick()
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> std::result::Result<(), E> {
            self.tick()
        }
        fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<(), E> {
            self.tick()
        }
        fn visit_none<E: serde::de::Error>(self) -> std::result::Result<(), E> {
            self.tick()
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
            self.tick()?;
            d.deserialize_any(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            self.tick()?;
            while seq.next_element_seed(Count(self.0, self.1))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
            self.tick()?;
            while map.next_key_seed(Count(self.0, self.1))?.is_some() {
                map.next_value_seed(Count(self.0, self.1))?;
            }
            Ok(())
        }
        fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> std::result::Result<(), A::Error> {
            use serde::de::VariantAccess;
            self.tick()?;
            let ((), variant) = data.variant_seed(Count(self.0, self.1))?;
            variant.newtype_variant_seed(Count(self.0, self.1))
        }
    }

    let count = std::cell::Cell::new(0);
    for document in serde_yaml::Deserializer::from_str(text) {
        Count(&count, max).deserialize(document).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod alias_bound_tests {
    #[test]
    fn aliases_that_expand_past_the_bound_are_refused_quickly() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let err = super::Config::parse(&text, "laughs.yaml").expect_err("refused");
        assert!(err.to_string().contains("expands to more than 100000 values"), "{err}");
        // An ordinary config with an alias still parses.
        let ok = "limits: &l {max_result_rows: 10}\ndatasets: []\n";
        assert!(super::Config::parse(ok, "ok.yaml").is_ok());
    }
}
