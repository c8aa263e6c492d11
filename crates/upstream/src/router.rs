//! The routing of a tier with upstreams: a sidecar (upstream = its platform) or a platform
//! (upstreams = its peer regions). It keeps the upstream catalog registered as upstream
//! tables, runs replicas, and decides per query: local, forwarded, or mixed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use datafusion::common::tree_node::Transformed;
use datafusion::datasource::provider_as_source;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use strata_core::config::{ReplicaConfig, UpstreamConfig};
use strata_core::dataset::DatasetStatus;
use strata_core::routing::{
    CatalogEntry, ForwardQuery, QueryOptions, Route, RouteInfo, RouteReason, Router, Routing, VersionRead,
    scanned_tables,
};
use strata_core::{Engine, StrataError};
use strata_proto::v1::{ExecuteRequest, ListDatasetsRequest, SqlQuery, execute_request};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::client::UpstreamClient;
use crate::replica::Replica;
use crate::table::{Origin, UpstreamTable, WithLocalWrites};
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
        let client = UpstreamClient::new(&upstream.endpoints, upstream)?;
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
        for peer in peers {
            upstreams.push(Upstream {
                client: UpstreamClient::new(std::slice::from_ref(&peer.endpoint), settings)?,
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

    /// Reads the upstream's catalog now and then, registering new datasets and starting
    /// replicas. `first_catalog` holds readiness back until the first read succeeds.
    async fn sync_catalog(
        self: Arc<Self>,
        index: usize,
        interval: Duration,
        mut first_catalog: Option<strata_core::engine::ReadinessGuard>,
    ) {
        let mut first = true;
        let mut backoff = Duration::from_millis(100);
        loop {
            let upstream = &self.upstreams[index];
            let request = ListDatasetsRequest {
                context: Some(wire::context(&QueryOptions::default(), &self.origin.tier, &self.origin.region, None)),
            };
            let wait = match upstream.client.list_datasets(request).await {
                Ok(response) => {
                    self.apply_catalog(index, response.datasets);
                    if std::mem::take(&mut first) {
                        info!(upstream = %upstream.label, "upstream catalog loaded");
                        self.report_missing_replicas();
                        drop(first_catalog.take());
                    }
                    backoff = Duration::from_millis(100);
                    interval
                }
                Err(err) => {
                    warn!(upstream = %upstream.label, error = %err, "cannot read the upstream catalog");
                    backoff = (backoff * 2).min(interval);
                    backoff
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn apply_catalog(&self, index: usize, datasets: Vec<strata_proto::v1::DatasetInfo>) {
        let upstream = &self.upstreams[index];
        let local: HashSet<String> = self.engine.datasets().into_iter().map(|d| key(&d.name)).collect();
        for info in &datasets {
            let entry = match wire::catalog_entry(info) {
                Ok(entry) => entry,
                Err(err) => {
                    warn!(error = %err, "skipping an upstream dataset");
                    continue;
                }
            };
            let name = key(&entry.name);
            if upstream.only_region.as_ref().is_some_and(|r| *r != entry.home_region)
                || (local.contains(&name) && !self.replica_configs.iter().any(|r| key(&r.name) == name))
            {
                continue;
            }
            let mut remote = self.remote.write().unwrap_or_else(|p| p.into_inner());
            let known_schema = remote.get(&name).map(|r| Arc::clone(&r.entry.schema));
            if known_schema.as_ref().is_none_or(|s| s.fields() != entry.schema.fields()) {
                let table = UpstreamTable::new(
                    entry.name.clone(),
                    Arc::clone(&entry.schema),
                    upstream.client.clone(),
                    self.origin.clone(),
                );
                if let Err(err) = self.engine.register_table(&entry.name, Arc::new(table)) {
                    warn!(dataset = %entry.name, error = %err, "cannot register an upstream dataset");
                    continue;
                }
                if known_schema.is_some() {
                    warn!(dataset = %entry.name, "upstream schema changed; the local replica restarts");
                    self.replicas.write().unwrap_or_else(|p| p.into_inner()).remove(&name);
                }
            }
            self.start_replica(&name, &entry, index);
            remote.insert(name, Remote { entry, upstream: index });
        }
    }

    fn store(&self, name: &str) -> Option<crate::disk::DiskStore> {
        self.disk.as_ref().map(|(root, max)| crate::disk::DiskStore::new(root, &key(name), *max))
    }

    /// Registers and starts every replica found on disk, as the catalog saw it when stored.
    fn restore_from_disk(&self) {
        let Some(default) = self.default_upstream else { return };
        for config in &self.replica_configs {
            let Some(store) = self.store(&config.name) else { return };
            let (manifest, schema, batches) = match store.load() {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(err) => {
                    error!(dataset = %config.name, error = %err, "cannot restore the replica from disk; it will be copied again");
                    continue;
                }
            };
            let entry = CatalogEntry {
                name: config.name.clone(),
                schema: Arc::clone(&schema),
                home_region: manifest.home_region.clone(),
                version: manifest.version,
                rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
                refreshed_at: Some(std::time::UNIX_EPOCH + Duration::from_millis(manifest.refreshed_at_unix_ms)),
                accelerated: true,
                writable: None,
            };
            let table = UpstreamTable::new(
                entry.name.clone(),
                Arc::clone(&schema),
                self.upstreams[default].client.clone(),
                self.origin.clone(),
            );
            if let Err(err) = self.engine.register_table(&entry.name, Arc::new(table)) {
                warn!(dataset = %entry.name, error = %err, "cannot register a restored replica");
                continue;
            }
            let name = key(&entry.name);
            self.remote
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), Remote { entry: entry.clone(), upstream: default });
            match Replica::with_store(config.clone(), schema, Some(store), manifest.home_region.clone()) {
                Ok(replica) => {
                    let replica = Arc::new(replica);
                    replica.restore(manifest, batches);
                    let name_for_task = name.clone();
                    self.replicas.write().unwrap_or_else(|p| p.into_inner()).insert(name, Arc::clone(&replica));
                    let client = self.upstreams[default].client.clone();
                    let task = replica.run(client, self.origin.clone(), self.shutdown.child_token());
                    self.engine.background().spawn(format!("replica {name_for_task}"), task);
                }
                Err(err) => warn!(dataset = %entry.name, error = %err, "restored replica not started"),
            }
        }
    }

    /// A replica the platform does not list is a config mistake; say so once, by name.
    fn report_missing_replicas(&self) {
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        for (i, r) in self.replica_configs.iter().enumerate() {
            if !remote.contains_key(&key(&r.name)) {
                error!(
                    "replicas[{i}]: dataset `{}` is not in the platform's catalog; nothing to replicate (queries naming it fail as unknown tables)",
                    r.name
                );
            }
        }
    }

    fn start_replica(&self, name: &str, entry: &CatalogEntry, index: usize) {
        let Some(config) = self.replica_configs.iter().find(|r| key(&r.name) == name) else { return };
        let mut replicas = self.replicas.write().unwrap_or_else(|p| p.into_inner());
        if replicas.contains_key(name) {
            return;
        }
        if !entry.accelerated {
            warn!(dataset = %entry.name, "the platform does not accelerate this dataset, so it cannot be replicated; queries on it are forwarded");
            return;
        }
        let replica = match Replica::with_store(
            config.clone(),
            Arc::clone(&entry.schema),
            self.store(name),
            entry.home_region.clone(),
        ) {
            Ok(r) => Arc::new(r),
            Err(err) => {
                warn!(dataset = %entry.name, error = %err, "replica not started; queries on it are forwarded");
                return;
            }
        };
        replicas.insert(name.to_string(), Arc::clone(&replica));
        let client = self.upstreams[index].client.clone();
        let task = replica.run(client, self.origin.clone(), self.shutdown.child_token());
        self.engine.background().spawn(format!("replica {name}"), task);
    }

    /// Adds rows written here to every read of `dataset` (read-your-writes at an edge). Such
    /// queries always run here, so the local rows are never left out by a whole-query forward.
    pub fn add_local_writes(&self, dataset: &str, rows: Arc<dyn datafusion::catalog::TableProvider>) {
        self.local_writes.write().unwrap_or_else(|p| p.into_inner()).insert(key(dataset), rows);
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

    /// Why a scan of remote table `name` must go upstream whatever the query's filters say.
    fn forced_reason(&self, name: &str, r: &Remote, options: &QueryOptions) -> Option<(RouteReason, String)> {
        if r.entry.home_region != self.origin.region {
            Some((RouteReason::CrossRegion, format!("`{name}` is homed in region `{}`", r.entry.home_region)))
        } else if options.strong_consistency {
            Some((RouteReason::StrongConsistency, "the client asked for strong consistency".into()))
        } else {
            None
        }
    }
}

/// A route decision for one scan.
enum ScanRoute {
    Local(Arc<Replica>),
    Remote { reason: RouteReason, detail: String, forces_forward: bool },
}

fn check_hops(options: &QueryOptions) -> strata_core::Result<()> {
    if options.hops > MAX_HOPS {
        return Err(StrataError::Plan(format!("query crossed more than {MAX_HOPS} platforms; check `peers:`")));
    }
    Ok(())
}

#[async_trait]
impl Router for TierRouter {
    fn route(&self, plan: LogicalPlan, options: &QueryOptions, can_forward: bool) -> strata_core::Result<Routing> {
        check_hops(options)?;
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
        let local_writes = self.local_writes.read().unwrap_or_else(|p| p.into_inner());
        let mut with_local_writes = false;
        let mut stale_warning: Option<String> = None;
        let mut local_scans = 0usize;
        let mut remote_upstreams = HashSet::new();
        let mut first_miss: Option<(RouteReason, String)> = None;
        let mut forced: Option<(RouteReason, String)> = None;
        let mut versions: Vec<VersionRead> = Vec::new();
        let now = SystemTime::now();
        let age = |t: Option<SystemTime>| t.map_or(0, |t| now.duration_since(t).unwrap_or_default().as_millis() as u64);

        let plan = plan
            .transform_up_with_subqueries(|node| {
                let LogicalPlan::TableScan(mut scan) = node else { return Ok(Transformed::no(node)) };
                let name = match scan.table_name.schema() {
                    Some(s) if s != strata_core::engine::DEFAULT_SCHEMA => format!("{s}.{}", scan.table_name.table()),
                    _ => scan.table_name.table().to_string(),
                };
                let Some(r) = remote.get(&key(&name)) else {
                    local_scans += 1;
                    return Ok(Transformed::no(LogicalPlan::TableScan(scan)));
                };
                let decision = if let Some((reason, detail)) = self.forced_reason(&name, r, options) {
                    ScanRoute::Remote { reason, detail, forces_forward: true }
                } else {
                    match replicas.get(&key(&name)) {
                        None => ScanRoute::Remote {
                            reason: RouteReason::NotAccelerated,
                            detail: format!("`{name}` is not replicated here"),
                            forces_forward: false,
                        },
                        Some(replica) if replica.snapshot().is_none() => ScanRoute::Remote {
                            reason: RouteReason::ColdStart,
                            detail: format!("the first copy of `{name}` has not arrived yet"),
                            forces_forward: false,
                        },
                        Some(replica) if !replica.covers(&scan.filters) => ScanRoute::Remote {
                            reason: RouteReason::OutsideSubset,
                            detail: format!(
                                "the query may need rows of `{name}` outside the local subset `{}`",
                                replica.predicate_sql().unwrap_or_default()
                            ),
                            forces_forward: false,
                        },
                        Some(replica) => {
                            if let Some(message) = replica.staleness() {
                                match replica.on_stale() {
                                    strata_core::config::OnStale::Refuse => {
                                        return Err(datafusion::error::DataFusionError::External(Box::new(
                                            StrataError::DatasetUnavailable { name: name.clone(), reason: message },
                                        )));
                                    }
                                    strata_core::config::OnStale::Warn => stale_warning = Some(message),
                                }
                            }
                            ScanRoute::Local(Arc::clone(replica))
                        }
                    }
                };
                // Rows written here and not yet confirmed upstream are read along with the table.
                let with_local = match local_writes.get(&key(&name)) {
                    None => None,
                    Some(rows) => {
                        with_local_writes = true;
                        let base: Arc<dyn datafusion::catalog::TableProvider> = match &decision {
                            ScanRoute::Local(replica) => replica.table(),
                            ScanRoute::Remote { .. } => {
                                datafusion::catalog::default_table_source::source_as_provider(&scan.source)?
                            }
                        };
                        Some(provider_as_source(Arc::new(WithLocalWrites::new(base, Arc::clone(rows)))))
                    }
                };
                match decision {
                    ScanRoute::Local(replica) => {
                        local_scans += 1;
                        if let Some(s) = replica.snapshot() {
                            versions.push(VersionRead {
                                dataset: replica.name().to_string(),
                                version: s.version,
                                age_ms: age(Some(s.refreshed_at)),
                            });
                        }
                        scan.source = with_local.unwrap_or_else(|| provider_as_source(replica.table()));
                        Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                    }
                    ScanRoute::Remote { reason, detail, forces_forward } => {
                        if let Some(source) = with_local {
                            scan.source = source;
                        }
                        remote_upstreams.insert(r.upstream);
                        versions.push(VersionRead {
                            dataset: r.entry.name.clone(),
                            version: r.entry.version,
                            age_ms: age(r.entry.refreshed_at),
                        });
                        if forces_forward && forced.is_none() {
                            forced = Some((reason, detail));
                        } else if first_miss.is_none() {
                            first_miss = Some((reason, detail));
                        }
                        Ok(Transformed::no(LogicalPlan::TableScan(scan)))
                    }
                }
            })?
            .data;

        let Some((reason, detail)) = forced.clone().or(first_miss) else {
            let mut info = RouteInfo::local("every table is answered from this tier's copies");
            info.versions = versions;
            info.warning = stale_warning;
            return Ok(Routing::Run { plan, info });
        };
        let single_upstream = (local_scans == 0 && remote_upstreams.len() == 1)
            .then(|| remote_upstreams.iter().next().copied())
            .flatten();
        let target = match (forced.is_some(), self.default_upstream, single_upstream) {
            (true, Some(default), _) => Some(default),
            (_, _, Some(single)) => Some(single),
            _ => None,
        };
        match target {
            Some(upstream) if can_forward && !with_local_writes => Ok(Routing::Forward {
                info: RouteInfo {
                    route: Route::Forwarded,
                    reason,
                    detail,
                    versions: Vec::new(),
                    warning: None,
                    cache: None,
                },
                upstream,
            }),
            _ => Ok(Routing::Run {
                plan,
                info: RouteInfo { route: Route::Mixed, reason, detail, versions, warning: stale_warning, cache: None },
            }),
        }
    }

    /// Reads only the scanned names: no plan is cloned or rewritten. Certain only when every
    /// forced table goes to one upstream and no scanned table has unconfirmed local writes
    /// (those make the query run mixed here).
    fn forced_forward(
        &self,
        plan: &LogicalPlan,
        options: &QueryOptions,
    ) -> strata_core::Result<Option<(RouteInfo, usize)>> {
        check_hops(options)?;
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        let local_writes = self.local_writes.read().unwrap_or_else(|p| p.into_inner());
        let mut forced = None;
        let mut upstreams = HashSet::new();
        let mut unforced_scans = 0usize;
        for name in scanned_tables(plan) {
            if local_writes.contains_key(&key(&name)) {
                return Ok(None);
            }
            match remote.get(&key(&name)) {
                Some(r) => match self.forced_reason(&name, r, options) {
                    Some(reason) => {
                        upstreams.insert(r.upstream);
                        forced.get_or_insert(reason);
                    }
                    None => unforced_scans += 1,
                },
                None => unforced_scans += 1,
            }
        }
        let Some((reason, detail)) = forced else { return Ok(None) };
        let single_upstream = (unforced_scans == 0 && upstreams.len() == 1).then(|| upstreams.into_iter().next());
        let Some(upstream) = self.default_upstream.or(single_upstream.flatten()) else { return Ok(None) };
        let info =
            RouteInfo { route: Route::Forwarded, reason, detail, versions: Vec::new(), warning: None, cache: None };
        Ok(Some((info, upstream)))
    }

    async fn forward(
        &self,
        query: ForwardQuery<'_>,
        options: &QueryOptions,
        mut info: RouteInfo,
        upstream: usize,
        deadline: SystemTime,
    ) -> strata_core::Result<(SendableRecordBatchStream, RouteInfo)> {
        let upstream = self
            .upstreams
            .get(upstream)
            .ok_or_else(|| StrataError::Internal(format!("no upstream number {upstream}")))?;
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
        Ok((wire::decode_frames(frames, query.schema), info))
    }

    fn remote_catalog(&self) -> Vec<CatalogEntry> {
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<CatalogEntry> = remote.values().map(|r| r.entry.clone()).collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
    }

    fn replica_statuses(&self) -> Vec<DatasetStatus> {
        let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
        let label = self.default_upstream.map(|i| self.upstreams[i].label.clone()).unwrap_or_default();
        let mut statuses: Vec<DatasetStatus> = replicas.values().map(|r| r.status(&label)).collect();
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        statuses
    }
}
