//! The engine: one DataFusion session over every dataset and what the tiers share around
//! it. Its parts live in submodules: the query path in phases (`query_path.rs`), the plan
//! phase and plan cache use (`planning.rs`), and the dataset tasks and readiness
//! (`lifecycle.rs`).

mod distribution;
mod lifecycle;
mod planning;
mod query_path;

pub use distribution::{ClusterMembers, Membership};
pub use lifecycle::ReadinessGuard;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::execution::SessionState;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use tokio::sync::{Semaphore, watch};

use crate::accelerator::AcceleratedTable;
use crate::background::Background;
use crate::config::{Config, LimitsConfig};
use crate::dataset::{Dataset, DatasetStatus};
use crate::error::{Result, StrataError};
use crate::ingest::EdgeIngest;
use crate::plan_cache::PlanCache;
use crate::query::QueryObserver;
use crate::routing::{CatalogEntry, SharedRouter};
use crate::source::SourceConnector;

/// Catalog name clients see.
pub const CATALOG: &str = "strata";
/// Schema of datasets whose name has no `schema.` prefix.
pub const DEFAULT_SCHEMA: &str = "public";

/// The shared query engine of every tier. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Readiness held back by one piece of start-up work; see [`Engine::hold_readiness`].
#[must_use = "readiness is released when the guard drops"]
struct Inner {
    ctx: SessionContext,
    datasets: Vec<Arc<Dataset>>,
    limits: LimitsConfig,
    region: String,
    admission: Arc<Semaphore>,
    /// Queries executing here at once (`limits.max_running_queries`); admitted queries past
    /// it wait their turn. Sharing the cores among every admitted query made a burst of 64
    /// one-second queries each take 32 s on two cores, and all of them time out.
    running: Arc<Semaphore>,
    ready: watch::Sender<bool>,
    connector: SourceConnector,
    observer: std::sync::RwLock<Option<QueryObserver>>,
    router: std::sync::RwLock<Option<SharedRouter>>,
    /// Start-up work outside the datasets (a sidecar's first catalog read) that readiness waits for.
    pending_startup: std::sync::atomic::AtomicUsize,
    background: Background,
    /// Edge uploads into `writable` datasets (platform).
    ingest: EdgeIngest,
    /// The local write path, on tiers that accept writes (edge agents).
    writes: std::sync::RwLock<Option<Arc<dyn crate::writes::LocalWrites>>>,
    /// Answers of queries over local copies (none when `results_cache.max_bytes` is 0).
    results: Option<crate::results_cache::ResultsCache>,
    /// Plans by SQL text or shape: a repeated or prepared statement is parsed and planned once.
    plans: PlanCache,
    /// Literal texts GetFlightInfo resolved for the DoGet that follows (see [`crate::announced`]).
    announced: crate::announced::AnnouncedTexts,
    /// One session state for planning, shared instead of cloned per query (a clone copies
    /// every function registry); the catalog inside it is shared with `ctx`.
    planning: SessionState,
    /// The planning state without physical optimizer rules (see [`Engine::physical_plan`]).
    planning_without_physical_rules: SessionState,
    /// Likewise the execution context every query runs in.
    task_ctx: Arc<datafusion::execution::TaskContext>,
    /// The execution contexts of tenants with a `memory_limit`, by the tenants charged.
    tenant_contexts: std::sync::Mutex<std::collections::HashMap<String, Arc<datafusion::execution::TaskContext>>>,
    /// Tenants and their grants (enforced when `auth:` is configured).
    tenancy: crate::auth::Tenancy,
    /// Queries answered from an index by the key-lookup fast path.
    index_lookups: std::sync::atomic::AtomicU64,
    /// The platform's replicas, when queries may be distributed over them (`cluster:`).
    distribution: std::sync::RwLock<Option<Arc<distribution::Distribution>>>,
}

/// A planned query: its logical plan and what a client needs before executing it.
#[derive(Clone)]
pub struct PlannedQuery {
    pub plan: LogicalPlan,
    /// Schema of the result rows.
    pub schema: SchemaRef,
    /// One field per positional parameter (`$1`, `$2`, ...), typed where DataFusion can infer it.
    pub parameters: SchemaRef,
}

impl Engine {
    /// Builds the engine; does no I/O. Call [`Engine::start`] to connect and load datasets.
    pub fn new(config: &Config) -> Result<Self> {
        let limits = config.limits.clone();
        // Spilling is off: a query that outgrows the memory pool fails with ResourcesExhausted
        // instead of filling the disk behind the operator's back.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_limit.as_usize(), 1.0)
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
            .build_arc()?;
        let session = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, DEFAULT_SCHEMA)
            .with_create_default_catalog_and_schema(true)
            .with_information_schema(true)
            .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()));
        // The distributed planner cannot place an uncorrelated scalar subquery executed by the
        // physical plan, so on a replica of a cluster the optimizer rewrites them into joins
        // (as DataFusion did before it could execute them), for every query alike.
        let mut session = session;
        if config.cluster.is_some() {
            session.options_mut().optimizer.enable_physical_uncorrelated_scalar_subquery = false;
        }
        let pool = Arc::clone(&runtime.memory_pool);
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_config(session)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(crate::cooperative_joins::CooperativeJoins))
            .build();
        let ctx = SessionContext::new_with_state(state);
        crate::bounded_functions::register(&ctx, pool);
        let catalog = ctx.catalog(CATALOG).ok_or_else(|| StrataError::Internal("default catalog missing".into()))?;
        for ds in &config.datasets {
            if let Some((schema, _)) = ds.name.split_once('.')
                && catalog.schema(schema).is_none()
            {
                catalog.register_schema(schema, Arc::new(MemorySchemaProvider::new()))?;
            }
        }
        let datasets: Vec<Arc<Dataset>> = config.datasets.iter().cloned().map(|c| Arc::new(Dataset::new(c))).collect();
        let (ready, _) = watch::channel(false);
        Ok(Self {
            inner: Arc::new(Inner {
                datasets,
                admission: Arc::new(Semaphore::new(limits.max_concurrent_queries)),
                running: Arc::new(Semaphore::new(config.limits.running_queries())),
                limits,
                region: config.region.clone(),
                ready,
                connector: SourceConnector::default(),
                observer: std::sync::RwLock::new(None),
                router: std::sync::RwLock::new(None),
                pending_startup: std::sync::atomic::AtomicUsize::new(0),
                background: Background::default(),
                ingest: EdgeIngest::new(config),
                writes: std::sync::RwLock::new(None),
                results: crate::results_cache::ResultsCache::new(&config.results_cache),
                plans: PlanCache::new(config.limits.plan_cache_size.as_usize()),
                announced: Default::default(),
                planning: ctx.state(),
                planning_without_physical_rules: datafusion::execution::SessionStateBuilder::new_from_existing(
                    ctx.state(),
                )
                .with_physical_optimizer_rules(Vec::new())
                .build(),
                task_ctx: ctx.task_ctx(),
                tenant_contexts: Default::default(),
                tenancy: crate::auth::Tenancy::new(config.auth.as_ref(), &config.tenants),
                index_lookups: std::sync::atomic::AtomicU64::new(0),
                distribution: std::sync::RwLock::new(None),
                ctx,
            }),
        })
    }

    /// What the caller of `options` may read: everything without `auth:`, else the
    /// datasets granted to its tenant (and to the tenant another tier carried for).
    pub fn access(&self, options: &crate::routing::QueryOptions) -> crate::auth::Access {
        self.inner.tenancy.access(&options.tenant, &options.on_behalf_of)
    }

    /// Installs the router that sends queries upstream (sidecars, edge agents, platforms with peers).
    pub fn set_router(&self, router: SharedRouter) {
        *self.inner.router.write().unwrap_or_else(|p| p.into_inner()) = Some(router);
    }

    /// True on tiers that may send queries upstream (sidecars, edge agents, platforms with peers).
    pub fn has_router(&self) -> bool {
        self.router().is_some()
    }

    fn router(&self) -> Option<SharedRouter> {
        self.inner.router.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Registers (or replaces) a table under `name` (`table` or `schema.table`).
    pub fn register_table(&self, name: &str, provider: Arc<dyn datafusion::catalog::TableProvider>) -> Result<()> {
        let catalog =
            self.inner.ctx.catalog(CATALOG).ok_or_else(|| StrataError::Internal("default catalog missing".into()))?;
        let (schema, table) = name.split_once('.').unwrap_or((DEFAULT_SCHEMA, name));
        let schema_provider = match catalog.schema(schema) {
            Some(s) => s,
            None => {
                let s: Arc<dyn datafusion::catalog::SchemaProvider> = Arc::new(MemorySchemaProvider::new());
                catalog.register_schema(schema, Arc::clone(&s))?;
                s
            }
        };
        schema_provider.deregister_table(table)?;
        schema_provider.register_table(table.to_string(), provider)?;
        crate::generation::advance();
        Ok(())
    }

    /// Installs the local write path (edge agents).
    pub fn set_writes(&self, writes: Arc<dyn crate::writes::LocalWrites>) {
        *self.inner.writes.write().unwrap_or_else(|p| p.into_inner()) = Some(writes);
    }

    /// The local write path, if this tier accepts writes.
    pub fn writes(&self) -> Option<Arc<dyn crate::writes::LocalWrites>> {
        self.inner.writes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies consecutive batches an edge agent uploaded, each exactly once per
    /// `(edge_id, seq)`: into the dataset's PostgreSQL table and, when accelerated, its
    /// local copy (see [`crate::ingest`]).
    pub async fn apply_ingest(
        &self,
        edge_id: &str,
        batches: Vec<(u64, String, Vec<arrow::array::RecordBatch>)>,
    ) -> Result<crate::sink::Applied> {
        self.inner.ingest.apply(edge_id, batches, |name| self.find(name)).await
    }

    /// The accelerated copy of a configured dataset, for publishing it downstream.
    pub fn accelerated_table(&self, name: &str) -> Option<Arc<AcceleratedTable>> {
        self.find(name).and_then(|d| d.accelerated_table())
    }

    fn find(&self, name: &str) -> Option<&Arc<Dataset>> {
        self.inner.datasets.iter().find(|d| d.name().eq_ignore_ascii_case(name))
    }

    /// Every dataset this tier can answer for: its own (homed in its region) and those it
    /// knows from upstream or peers.
    pub fn catalog(&self) -> Vec<CatalogEntry> {
        let mut entries: Vec<CatalogEntry> = self
            .inner
            .datasets
            .iter()
            .filter_map(|d| {
                let schema = d.provider()?.schema();
                let snapshot = d.snapshot();
                Some(CatalogEntry {
                    name: d.name().to_string(),
                    home_region: self.inner.region.clone(),
                    version: snapshot.as_ref().map_or(0, |s| s.version),
                    rows: snapshot.as_ref().map_or(0, |s| s.rows as u64),
                    refreshed_at: snapshot.as_ref().map(|s| s.refreshed_at),
                    accelerated: d.config.accelerated().is_some(),
                    writable: Some(self.inner.ingest.accepts(d.name())),
                    indexes: d.accelerated_table().map(|t| t.key_names()).unwrap_or_default(),
                    schema,
                })
            })
            .collect();
        if let Some(router) = self.router() {
            for entry in router.remote_catalog() {
                if !entries.iter().any(|e| e.name.eq_ignore_ascii_case(&entry.name)) {
                    entries.push(entry);
                }
            }
        }
        entries
    }

    /// The datasets this tier's upstreams advertise (empty without upstreams).
    pub fn upstream_catalog(&self) -> Vec<CatalogEntry> {
        self.router().map(|router| router.remote_catalog()).unwrap_or_default()
    }

    /// Queries admitted and not yet finished (streaming their answer included): the load
    /// figure an autoscaler divides by replicas, which CPU misses for queries waiting on I/O.
    pub fn queries_in_flight(&self) -> usize {
        self.inner.limits.max_concurrent_queries.saturating_sub(self.inner.admission.available_permits())
    }

    /// The results cache, if on: (bytes held, entries).
    pub fn results_cache_size(&self) -> Option<(u64, u64)> {
        self.inner.results.as_ref().map(|c| (c.bytes(), c.entries()))
    }

    /// Queries answered from an index without planning them physically (metrics).
    pub fn index_lookups(&self) -> u64 {
        self.inner.index_lookups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Plans in the plan cache: one per SQL text, or per shape for literal SQL (metrics).
    pub fn cached_plans(&self) -> u64 {
        self.inner.plans.entries()
    }

    /// Bytes charged to the plan cache (see [`PlanCache`]).
    pub fn plan_cache_bytes(&self) -> u64 {
        self.inner.plans.bytes()
    }

    /// Region this engine serves.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// The configured limits.
    pub fn limits(&self) -> &LimitsConfig {
        &self.inner.limits
    }

    /// The DataFusion session, for catalog introspection (Flight SQL metadata commands).
    pub fn session(&self) -> &SessionContext {
        &self.inner.ctx
    }

    /// Registers a callback run once per finished query (metrics).
    pub fn set_query_observer(&self, observer: QueryObserver) {
        *self.inner.observer.write().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    /// Status of every dataset, in config order, then the replicated ones.
    /// The upstream endpoints this tier calls, with their breakers (empty on a platform
    /// without peers).
    pub fn upstream_health(&self) -> Vec<crate::routing::UpstreamHealth> {
        self.router().map(|router| router.upstream_health()).unwrap_or_default()
    }

    pub fn datasets(&self) -> Vec<DatasetStatus> {
        let mut statuses: Vec<DatasetStatus> = self.inner.datasets.iter().map(|d| d.status()).collect();
        if let Some(router) = self.router() {
            statuses.extend(router.replica_statuses());
        }
        statuses
    }
}
