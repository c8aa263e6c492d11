//! The routing of a tier with upstreams: a sidecar (upstream = its platform) or a platform
//! (upstreams = its peer regions). Two concerns share its state: keeping the upstream
//! catalog registered as upstream tables and its replicas running (`catalog_sync.rs`, in the
//! background), and deciding per query (`decide.rs`, on the query path): local, forwarded,
//! or mixed.

mod catalog_sync;
mod decide;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use datafusion::logical_expr::LogicalPlan;
use strata_core::config::{ReplicaConfig, UpstreamConfig};
use strata_core::dataset::DatasetStatus;
use strata_core::encoded::{Answer, EncodedAnswer};
use strata_core::routing::{CatalogEntry, ForwardQuery, QueryOptions, RouteInfo, Router, Routing, UpstreamHealth};
use strata_core::{Engine, StrataError};
use strata_proto::v1::{ExecuteRequest, SqlQuery, execute_request};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::UpstreamClient;
use crate::credential::Credential;
use crate::replica::Replica;
use crate::table::Origin;
use crate::tls::ClientTls;
use crate::wire;

/// Forwarding stops after this many platforms (a misconfigured peer loop fails, not spins).
const MAX_HOPS: u32 = 3;

/// One upstream this tier reaches: the platform of a sidecar, or a platform's peer region.
struct Upstream {
    client: UpstreamClient,
    label: String,
    /// Only datasets homed in this region are taken from its catalog (peers).
    only_region: Option<String>,
}

struct Remote {
    entry: CatalogEntry,
    upstream: usize,
}

/// The router of a tier with upstreams.
pub struct TierRouter {
    engine: Engine,
    origin: Origin,
    upstreams: Vec<Upstream>,
    /// The upstream that answers anything this tier cannot (a sidecar's platform).
    default_upstream: Option<usize>,
    remote: RwLock<HashMap<String, Remote>>,
    replica_configs: Vec<ReplicaConfig>,
    replicas: RwLock<HashMap<String, Arc<Replica>>>,
    /// Where replicas are kept on disk (edge agents) and the bound on their size; in memory when `None`.
    disk: Option<(std::path::PathBuf, u64)>,
    /// Rows written at this tier and not yet confirmed upstream, by dataset (edge agents).
    local_writes: RwLock<HashMap<String, Arc<dyn datafusion::catalog::TableProvider>>>,
    shutdown: CancellationToken,
}

fn key(name: &str) -> String {
    name.to_ascii_lowercase()
}

impl TierRouter {
    /// Sends one query to `upstream` (inside the `forward` span).
    async fn forward_to(
        &self,
        upstream: &Upstream,
        query: ForwardQuery<'_>,
        options: &QueryOptions,
        mut info: RouteInfo,
        deadline: SystemTime,
    ) -> strata_core::Result<(Answer, RouteInfo)> {
        let request = ExecuteRequest {
            context: Some(wire::context(options, &self.origin.tier, &self.origin.region, Some(deadline))),
            query: Some(execute_request::Query::Sql(SqlQuery {
                sql: query.sql.to_string(),
                params: wire::params_to_ipc(query.params)?,
            })),
        };
        let (metadata, frames) = upstream.client.execute(request, Some(deadline)).await?;
        if let Some(versions) = metadata.get(wire::VERSIONS_HEADER).and_then(|v| v.to_str().ok()) {
            info.versions = RouteInfo::parse_versions(versions);
        }
        // Left as the upstream encoded it: a Flight server passes it on untouched.
        let answer = EncodedAnswer::new(query.schema, wire::ipc_frames(frames), wire::decode_ipc_frames);
        Ok((Answer::Encoded(answer), info))
    }

    /// A sidecar's router: one upstream platform (with several endpoints) that answers
    /// everything not served locally.
    pub fn for_sidecar(
        engine: Engine,
        tier: &str,
        upstream: &UpstreamConfig,
        replicas: Vec<ReplicaConfig>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StrataError> {
        Self::downstream(engine, tier, upstream, replicas, None, shutdown)
    }

    /// An edge agent's router: a sidecar's, with replicas kept on disk under `disk`. Copies
    /// found there are served at once, before the platform is reachable, and readiness does
    /// not wait for the platform.
    pub fn for_edge(
        engine: Engine,
        upstream: &UpstreamConfig,
        replicas: Vec<ReplicaConfig>,
        disk: (std::path::PathBuf, u64),
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StrataError> {
        Self::downstream(engine, "edge", upstream, replicas, Some(disk), shutdown)
    }

    fn downstream(
        engine: Engine,
        tier: &str,
        upstream: &UpstreamConfig,
        replicas: Vec<ReplicaConfig>,
        disk: Option<(std::path::PathBuf, u64)>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StrataError> {
        let credential =
            Credential::new(upstream.credential.as_deref(), upstream.credential_file.as_deref(), "upstream")?;
        let tls = upstream.tls.as_ref().map(|t| ClientTls::new(t, "upstream.tls")).transpose()?;
        let client = UpstreamClient::new(&upstream.endpoints, upstream, credential, tls)?;
        let label = upstream.endpoints.join(",");
        Ok(Self::build(
            engine,
            tier,
            vec![Upstream { client, label, only_region: None }],
            Some(0),
            (replicas, disk),
            upstream.catalog_interval,
            shutdown,
        ))
    }

    /// A platform's router: one upstream per peer region, each serving only its own datasets.
    pub fn for_platform(
        engine: Engine,
        peers: &[strata_core::config::PeerConfig],
        settings: &UpstreamConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StrataError> {
        let mut upstreams = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            // The peer's own key, else this platform's `upstream:` one.
            let credential = match (&peer.credential, &peer.credential_file) {
                (None, None) => {
                    Credential::new(settings.credential.as_deref(), settings.credential_file.as_deref(), "upstream")?
                }
                (key, file) => Credential::new(key.as_deref(), file.as_deref(), &format!("peers[{i}]"))?,
            };
            let tls = match (&peer.tls, &settings.tls) {
                (Some(tls), _) => Some(ClientTls::new(tls, &format!("peers[{i}].tls"))?),
                (None, Some(tls)) => Some(ClientTls::new(tls, "upstream.tls")?),
                (None, None) => None,
            };
            upstreams.push(Upstream {
                client: UpstreamClient::new(std::slice::from_ref(&peer.endpoint), settings, credential, tls)?,
                label: format!("{} ({})", peer.region, peer.endpoint),
                only_region: Some(peer.region.clone()),
            });
        }
        Ok(Self::build(engine, "platform", upstreams, None, (Vec::new(), None), settings.catalog_interval, shutdown))
    }

    fn build(
        engine: Engine,
        tier: &str,
        upstreams: Vec<Upstream>,
        default_upstream: Option<usize>,
        (replica_configs, disk): (Vec<ReplicaConfig>, Option<(std::path::PathBuf, u64)>),
        catalog_interval: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let origin = Origin { tier: tier.to_string(), region: engine.region().to_string() };
        let router = Arc::new(Self {
            engine: engine.clone(),
            origin,
            upstreams,
            default_upstream,
            remote: RwLock::new(HashMap::new()),
            replica_configs,
            replicas: RwLock::new(HashMap::new()),
            disk,
            local_writes: RwLock::new(HashMap::new()),
            shutdown,
        });
        engine.set_router(Arc::clone(&router) as Arc<dyn Router>);
        router.restore_from_disk();
        // Readiness waits for the first catalog of every upstream, except at an edge, which
        // must come up (and serve its disk copies) while the platform is unreachable.
        for index in 0..router.upstreams.len() {
            let first_catalog = router.disk.is_none().then(|| engine.hold_readiness());
            let r = Arc::clone(&router);
            let name = format!("catalog sync {}", router.upstreams[index].label);
            engine
                .background()
                .spawn(name, async move { r.sync_catalog(index, catalog_interval, first_catalog).await });
        }
        router
    }

    /// Adds rows written here to every read of `dataset` (read-your-writes at an edge). Such
    /// queries always run here, so the local rows are never left out by a whole-query forward.
    pub fn add_local_writes(&self, dataset: &str, rows: Arc<dyn datafusion::catalog::TableProvider>) {
        self.local_writes.write().unwrap_or_else(|p| p.into_inner()).insert(key(dataset), rows);
        strata_core::generation::advance();
    }

    /// Whether the upstream accepts edge writes to `dataset`: `None` until its catalog has
    /// been read, or when the upstream does not say (an older platform).
    pub fn upstream_writable(&self, dataset: &str) -> Option<bool> {
        self.remote.read().unwrap_or_else(|p| p.into_inner()).get(&key(dataset)).and_then(|r| r.entry.writable)
    }

    /// The schema of an upstream dataset, once the catalog has been read.
    pub fn upstream_schema(&self, dataset: &str) -> Option<arrow::datatypes::SchemaRef> {
        self.remote.read().unwrap_or_else(|p| p.into_inner()).get(&key(dataset)).map(|r| Arc::clone(&r.entry.schema))
    }

    /// The upstream client to the default platform, for the tier's own calls (health).
    pub fn default_client(&self) -> Option<&UpstreamClient> {
        self.default_upstream.map(|i| &self.upstreams[i].client)
    }
}

#[async_trait]
impl Router for TierRouter {
    fn route(&self, plan: LogicalPlan, options: &QueryOptions, can_forward: bool) -> strata_core::Result<Routing> {
        self.decide(plan, options, can_forward)
    }

    /// Reads only the scanned names: no plan is cloned or rewritten. Certain only when every
    /// forced table goes to one upstream and no scanned table has unconfirmed local writes
    /// (those make the query run mixed here).
    fn forced_forward(
        &self,
        plan: &LogicalPlan,
        options: &QueryOptions,
    ) -> strata_core::Result<Option<(RouteInfo, usize)>> {
        self.decide_forced(plan, options)
    }

    fn whole_local_copy(
        &self,
        table: &datafusion::common::TableReference,
        options: &QueryOptions,
    ) -> strata_core::Result<Option<(Arc<strata_core::accelerator::AcceleratedTable>, RouteInfo)>> {
        self.decide_whole_copy(table, options)
    }

    async fn forward(
        &self,
        query: ForwardQuery<'_>,
        options: &QueryOptions,
        info: RouteInfo,
        upstream: usize,
        deadline: SystemTime,
    ) -> strata_core::Result<(Answer, RouteInfo)> {
        let upstream = self
            .upstreams
            .get(upstream)
            .ok_or_else(|| StrataError::Internal(format!("no upstream number {upstream}")))?;
        // The call upstream, as the parent of the spans the upstream tier makes for it.
        let span = tracing::info_span!("forward", upstream = %upstream.label, reason = info.reason.as_str());
        self.forward_to(upstream, query, options, info, deadline).instrument(span).await
    }

    fn local_route_expires(&self, info: &RouteInfo) -> Option<SystemTime> {
        let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
        info.versions.iter().filter_map(|read| replicas.get(&key(&read.dataset))?.stale_at()).min()
    }

    fn remote_catalog(&self) -> Vec<CatalogEntry> {
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<CatalogEntry> = remote.values().map(|r| r.entry.clone()).collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
    }

    fn replica_statuses(&self) -> Vec<DatasetStatus> {
        // The upstream's versions first, and that lock released: the catalog sync takes
        // `remote` and then `replicas`, so holding both here in the other order deadlocks.
        let upstream_versions: HashMap<String, u64> = {
            let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
            remote.iter().map(|(name, r)| (name.clone(), r.entry.version)).collect()
        };
        let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
        let label = self.default_upstream.map(|i| self.upstreams[i].label.clone()).unwrap_or_default();
        let mut statuses: Vec<DatasetStatus> = replicas
            .iter()
            .map(|(name, replica)| {
                let mut status = replica.status(&label);
                if let Some(replication) = status.replication.as_mut() {
                    replication.upstream_version = upstream_versions.get(name).copied();
                }
                status
            })
            .collect();
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        statuses
    }

    fn upstream_health(&self) -> Vec<UpstreamHealth> {
        let mut health = Vec::new();
        for upstream in &self.upstreams {
            let (retries, retries_refused) = upstream.client.retries();
            for (endpoint, breaker, _) in upstream.client.endpoints() {
                let upstream = upstream.only_region.clone().unwrap_or_else(|| "platform".to_string());
                health.push(UpstreamHealth { upstream, endpoint, breaker, retries, retries_refused });
            }
        }
        health
    }
}
