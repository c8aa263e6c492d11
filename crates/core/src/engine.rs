//! The engine: one DataFusion session over every dataset, the read-only query path with
//! its limits, and the background tasks that connect sources and refresh accelerations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::ScalarValue;
use datafusion::execution::SessionState;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::DefaultPhysicalPlanner;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::accelerator::AcceleratedTable;
use crate::background::Background;
use crate::config::{Config, LimitsConfig};
use crate::dataset::{Dataset, DatasetStatus};
use crate::error::{Result, StrataError};
use crate::ingest::EdgeIngest;
use crate::plan_cache::{CachedPlan, PlanCache, ProviderRef};
use crate::query::{QueryObserver, QueryStream, next_query_id};
use crate::read_only;
use crate::routing::{
    CatalogEntry, ForwardQuery, QueryOptions, RouteInfo, Routing, SharedRouter, VersionRead, scanned_tables,
};
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
pub struct ReadinessGuard {
    engine: Engine,
}

impl Drop for ReadinessGuard {
    fn drop(&mut self) {
        self.engine.inner.pending_startup.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.engine.update_readiness();
    }
}

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
    /// One session state for planning, shared instead of cloned per query (a clone copies
    /// every function registry); the catalog inside it is shared with `ctx`.
    planning: SessionState,
    /// The planning state without physical optimizer rules (see [`Engine::physical_plan`]).
    planning_without_physical_rules: SessionState,
    /// Likewise the execution context every query runs in.
    task_ctx: Arc<datafusion::execution::TaskContext>,
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
        let pool = Arc::clone(&runtime.memory_pool);
        let ctx = SessionContext::new_with_config_rt(session, runtime);
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
                planning: ctx.state(),
                planning_without_physical_rules: datafusion::execution::SessionStateBuilder::new_from_existing(
                    ctx.state(),
                )
                .with_physical_optimizer_rules(Vec::new())
                .build(),
                task_ctx: ctx.task_ctx(),
                ctx,
            }),
        })
    }

    /// Starts one background task per dataset: connect (retrying), first load, then refresh
    /// on its interval, until the background is stopped (see [`Engine::background`]).
    pub fn start(&self) {
        for dataset in &self.inner.datasets {
            let engine = self.clone();
            let dataset = Arc::clone(dataset);
            let stop = self.inner.background.token();
            let span = info_span!("dataset", name = %dataset.name());
            let name = format!("dataset {}", dataset.name());
            self.inner.background.spawn(name, async move { engine.maintain(dataset, stop).await }.instrument(span));
        }
        self.update_readiness();
    }

    /// This tier's background work (refresh, catalog sync, replication, upload): stopped only
    /// after the servers have drained (`strata_serving::Servers::wait`).
    pub fn background(&self) -> &Background {
        &self.inner.background
    }

    /// Holds readiness back while the returned guard lives: start-up work outside the
    /// datasets (a sidecar's first catalog read) takes one and drops it when done. Dropping is
    /// the only way to release it, so a task that fails, returns early or panics cannot leave
    /// the tier unready forever, and none can release twice.
    pub fn hold_readiness(&self) -> ReadinessGuard {
        self.inner.pending_startup.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ReadinessGuard { engine: self.clone() }
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
                    schema,
                    home_region: self.inner.region.clone(),
                    version: snapshot.as_ref().map_or(0, |s| s.version),
                    rows: snapshot.as_ref().map_or(0, |s| s.rows as u64),
                    refreshed_at: snapshot.as_ref().map(|s| s.refreshed_at),
                    accelerated: d.config.accelerated().is_some(),
                    writable: Some(self.inner.ingest.accepts(d.name())),
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

    async fn maintain(&self, dataset: Arc<Dataset>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let max_backoff = Duration::from_secs(10);
        // Connect, then load once, retrying both with backoff: a source that is down at start
        // delays this dataset only.
        loop {
            let step = async {
                if !dataset.is_connected() {
                    dataset.connect(&self.inner.ctx, &self.inner.connector).await?;
                    info!("source connected");
                }
                if dataset.config.accelerated().is_some() {
                    dataset.refresh(&self.inner.ctx).await?;
                }
                Ok::<_, StrataError>(())
            };
            let outcome = step.await;
            if !dataset.tried.swap(true, std::sync::atomic::Ordering::Relaxed) {
                self.update_readiness();
            }
            match outcome {
                Ok(()) => break,
                Err(err) => {
                    warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "dataset not available yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
        self.update_readiness();
        let Some(interval) = dataset.refresh_interval() else { return };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            // Failures are recorded in the dataset status; the last good copy keeps serving.
            let _ = dataset.refresh(&self.inner.ctx).await;
        }
    }

    /// Ready once start-up work is done: every dataset's source has been tried once (a
    /// federated source that is down does not hold readiness back) and every accelerated
    /// dataset has loaded.
    fn update_readiness(&self) {
        if self.inner.pending_startup.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return;
        }
        let loaded = self.inner.datasets.iter().all(|d| {
            d.tried.load(std::sync::atomic::Ordering::Relaxed) && (d.config.accelerated().is_none() || d.is_loaded())
        });
        if loaded {
            self.inner.ready.send_if_modified(|ready| !std::mem::replace(ready, true));
        }
    }

    /// True once start-up work is done (see `update_readiness`). Never turns back to false.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Queries admitted and not yet finished (streaming their answer included): the load
    /// figure an autoscaler divides by replicas, which CPU misses for queries waiting on I/O.
    pub fn queries_in_flight(&self) -> usize {
        self.inner.limits.max_concurrent_queries.saturating_sub(self.inner.admission.available_permits())
    }

    /// Waits until [`Engine::is_ready`].
    pub async fn wait_ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// The results cache, if on: (bytes held, entries).
    pub fn results_cache_size(&self) -> Option<(u64, u64)> {
        self.inner.results.as_ref().map(|c| (c.bytes(), c.entries()))
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
    pub fn datasets(&self) -> Vec<DatasetStatus> {
        let mut statuses: Vec<DatasetStatus> = self.inner.datasets.iter().map(|d| d.status()).collect();
        if let Some(router) = self.router() {
            statuses.extend(router.replica_statuses());
        }
        statuses
    }

    /// Runs a plan shipped by another tier as datafusion-proto bytes.
    pub async fn execute_encoded_plan(&self, bytes: &[u8], options: &QueryOptions) -> Result<QueryStream> {
        let plan = crate::plan_codec::decode_plan(bytes, &self.inner.ctx, &self.inner.task_ctx)?;
        self.execute_plan(plan, options).await
    }

    /// Refreshes one accelerated dataset now and returns its new status.
    pub async fn refresh(&self, name: &str) -> Result<DatasetStatus> {
        let dataset = self
            .inner
            .datasets
            .iter()
            .find(|d| d.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| StrataError::UnknownDataset(name.to_string()))?;
        let status = dataset.refresh(&self.inner.ctx).await?;
        self.update_readiness();
        Ok(status)
    }

    /// Parses and plans one read-only statement without running it.
    pub async fn plan(&self, sql: &str) -> Result<PlannedQuery> {
        Ok(self.plan_cached(sql).await?.planned.clone())
    }

    /// The schema of the rows `sql` returns, from the plan its shape shares (see
    /// [`Engine::plan_for_text`]): what GetFlightInfo answers before the query runs.
    pub async fn result_schema(&self, sql: &str) -> Result<SchemaRef> {
        Ok(Arc::clone(&self.plan_for_text(sql).await?.0.planned.schema))
    }

    /// The plan of `sql` from the plan cache, planned now if it is not there or if a table
    /// it reads has been registered anew since (a reconnected source, a new replica).
    async fn plan_cached(&self, sql: &str) -> Result<Arc<CachedPlan>> {
        if let Some(hit) = self.cached(sql).await {
            return Ok(hit);
        }
        let statement = self.parse(sql)?;
        self.plan_and_cache(sql.to_string(), statement).await
    }

    /// The plan for SQL sent without parameters, and the values to bind into it. A query
    /// whose comparison literals can be taken out (see [`crate::parameterize`]) shares the
    /// cached plan of its shape and binds its own literals, when each has exactly the type
    /// the plan expects; any other is planned as written.
    async fn plan_for_text(&self, sql: &str) -> Result<(Arc<CachedPlan>, Vec<ScalarValue>)> {
        if let Some(hit) = self.cached(sql).await {
            return Ok((hit, Vec::new()));
        }
        let statement = self.parse(sql)?;
        if let Some(shape) = crate::parameterize::parameterize(sql, &statement)
            && !self.inner.plans.is_refused_shape(&shape.key)
        {
            let planned = match self.cached(&shape.key).await {
                Some(hit) => Some(hit),
                None => match self.plan_and_cache(shape.key.clone(), shape.statement).await {
                    Ok(planned) => Some(planned),
                    Err(_) => {
                        self.inner.plans.refuse_shape(shape.key);
                        None
                    }
                },
            };
            if let Some(planned) = planned.filter(|p| p.binds(&shape.values)) {
                return Ok((planned, shape.values));
            }
        }
        Ok((self.plan_and_cache(sql.to_string(), statement).await?, Vec::new()))
    }

    async fn cached(&self, key: &str) -> Option<Arc<CachedPlan>> {
        let hit = self.inner.plans.get(key)?;
        self.still_registered(&hit.tables).await.then_some(hit)
    }

    /// Parses one statement within the configured bounds: its text's size, then (once
    /// `?` placeholders are numbered and OR chains folded) its nesting depth.
    fn parse(&self, sql: &str) -> Result<DfStatement> {
        let limits = &self.inner.limits;
        crate::statement_bounds::check_size(sql, limits.max_query_size.as_usize())?;
        let sql = crate::placeholders::number_positional(sql)?;
        let mut statement =
            self.inner.planning.sql_to_statement(&sql, &datafusion::common::config::Dialect::Generic)?;
        read_only::check_statement(&statement)?;
        crate::statement_bounds::bound_statement(&mut statement, limits.max_expression_depth)?;
        Ok(statement)
    }

    async fn plan_and_cache(&self, key: String, statement: DfStatement) -> Result<Arc<CachedPlan>> {
        let entry = Arc::new(CachedPlan::new(self.plan_statement(statement).await?));
        self.inner.plans.insert(key, Arc::clone(&entry));
        Ok(entry)
    }

    async fn still_registered(&self, tables: &[(datafusion::common::TableReference, ProviderRef)]) -> bool {
        for (name, provider) in tables {
            match self.inner.ctx.table_provider(name.clone()).await {
                Ok(current) if Arc::ptr_eq(&current, provider) => {}
                _ => return false,
            }
        }
        true
    }

    async fn plan_statement(&self, statement: DfStatement) -> Result<PlannedQuery> {
        let state = &self.inner.planning;
        let plan = state.statement_to_plan(statement).await.map_err(|e| self.explain_plan_error(e.into()))?;
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let parameters = parameter_schema(&plan)?;
        Ok(PlannedQuery { plan, schema, parameters })
    }

    /// A planning error about a table that is configured but not loaded says so.
    fn explain_plan_error(&self, err: StrataError) -> StrataError {
        if let StrataError::Plan(msg) = &err
            && msg.contains("not found")
        {
            for dataset in &self.inner.datasets {
                let name = dataset.name().to_ascii_lowercase();
                let lower = msg.to_ascii_lowercase();
                if !dataset.is_connected()
                    && (lower.contains(&format!(".{name}'")) || lower.contains(&format!("'{name}'")))
                {
                    return StrataError::DatasetUnavailable {
                        name: dataset.name().to_string(),
                        reason: dataset.unavailable_reason(),
                    };
                }
            }
        }
        err
    }

    /// Runs one read-only query with positional parameters, under every configured limit.
    pub async fn execute(&self, sql: &str, params: Vec<ScalarValue>) -> Result<QueryStream> {
        self.execute_with(sql, params, &QueryOptions::default()).await
    }

    /// [`Engine::execute`] with the caller's options (consistency, tenant, trace context).
    pub async fn execute_with(
        &self,
        sql: &str,
        params: Vec<ScalarValue>,
        options: &QueryOptions,
    ) -> Result<QueryStream> {
        let span = info_span!("query", id = tracing::field::Empty, sql = %truncate(sql, 200));
        self.run(QueryInput::Sql { sql, params }, options, span).await
    }

    /// Runs a plan another tier shipped here (a sub-plan of a mixed query), under the same
    /// limits as SQL. It may only read.
    pub async fn execute_plan(&self, plan: LogicalPlan, options: &QueryOptions) -> Result<QueryStream> {
        read_only::check_plan(&plan)?;
        let span = info_span!("query", id = tracing::field::Empty, plan = %truncate(&plan.display().to_string(), 200));
        self.run(QueryInput::Plan(plan), options, span).await
    }

    async fn run(&self, input: QueryInput<'_>, options: &QueryOptions, span: tracing::Span) -> Result<QueryStream> {
        let limits = &self.inner.limits;
        let observer = self.inner.observer.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Set by a query that runs here once it has a running slot (see `Inner::running`).
        let mut running_slot = None;
        let Ok(permit) = Arc::clone(&self.inner.admission).try_acquire_owned() else {
            if let Some(observer) = &observer {
                observer(crate::query::Outcome::Shed, 0, Duration::ZERO, None);
            }
            return Err(StrataError::Overloaded(limits.max_concurrent_queries));
        };
        let id = next_query_id();
        span.record("id", id);
        let started = Instant::now();
        // The sooner of our own timeout and the caller's deadline (a forwarding tier's).
        let mut budget = limits.query_timeout;
        if let Some(caller) = options.deadline {
            let left = caller.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            if left.is_zero() {
                return Err(StrataError::Timeout(Duration::ZERO));
            }
            budget = budget.min(left);
        }
        let deadline = tokio::time::Instant::now() + budget;
        let wall_deadline = std::time::SystemTime::now() + budget;
        let start = async {
            // The values bound into the plan: the client's, or the literals taken out of its SQL.
            let (cached, bound) = match &input {
                QueryInput::Sql { sql, params } if params.is_empty() => {
                    let (cached, literals) = self.plan_for_text(sql).await?;
                    (Some(cached), literals)
                }
                QueryInput::Sql { sql, params } => (Some(self.plan_cached(sql).await?), params.clone()),
                QueryInput::Plan(_) => (None, Vec::new()),
            };
            let deterministic = match (&cached, &input) {
                (Some(cached), _) => cached.deterministic,
                (None, QueryInput::Plan(plan)) => crate::results_cache::is_deterministic(plan),
                (None, QueryInput::Sql { .. }) => false,
            };
            // The shared planning state serves every deterministic query; one that calls
            // `now()` gets a state of its own, stamped with its start time.
            let own_state;
            let state: &SessionState = if deterministic {
                &self.inner.planning
            } else {
                own_state = self.inner.ctx.state();
                &own_state
            };
            // A query the router must forward whatever its filters say (cross-region, strong
            // consistency) goes upstream as the client's SQL, without optimizing it here.
            if let (QueryInput::Sql { sql, params }, Some(cached), Some(router)) = (&input, &cached, self.router())
                && let Some((info, upstream)) = router.forced_forward(&cached.planned.plan, options)?
            {
                let schema = Arc::clone(&cached.planned.schema);
                return router
                    .forward(ForwardQuery { sql, params, schema }, options, info, upstream, wall_deadline)
                    .await;
            }
            let (plan, schema, forward) = match (&input, &cached) {
                (QueryInput::Sql { .. }, Some(cached)) => {
                    let schema = Arc::clone(&cached.planned.schema);
                    (self.optimized(cached, deterministic, state, &bound)?, schema, true)
                }
                (QueryInput::Plan(plan), _) => {
                    let schema = Arc::new(plan.schema().as_arrow().clone());
                    (state.optimize(plan)?, schema, false)
                }
                (QueryInput::Sql { .. }, None) => return Err(StrataError::Internal("SQL without a plan".into())),
            };
            let routing = match self.router() {
                Some(router) => router.route(plan, options, forward)?,
                None => Routing::Run { plan, info: RouteInfo::local("every table is served by this tier") },
            };
            match routing {
                Routing::Run { plan, mut info } => {
                    self.add_local_versions(&plan, &mut info);
                    // Wait (within the deadline, first come first served) for one of the
                    // slots that share this tier's cores.
                    running_slot = Arc::clone(&self.inner.running).acquire_owned().await.ok();
                    // Already optimized (routing needs the pushed-down filters): plan it physically
                    // without a second optimizer pass.
                    let execute = || async {
                        let physical = self.physical_plan(&plan, state, deterministic).await?;
                        Ok(datafusion::physical_plan::execute_stream(physical, Arc::clone(&self.inner.task_ctx))?)
                    };
                    let cache = self.inner.results.as_ref().filter(|_| deterministic);
                    if let Some((cache, key)) = cache.and_then(|c| Some((c, c.key(&plan)?))) {
                        match cache.get_or_run(key, execute()).await? {
                            Some((stream, status)) => {
                                info.cache = Some(status);
                                return Ok((stream, info));
                            }
                            // Waited for an answer too large to share: run it here, uncached.
                            None => info.cache = Some(crate::results_cache::CacheStatus::Bypass),
                        }
                    }
                    Ok::<_, StrataError>((execute().await?, info))
                }
                Routing::Forward { info, upstream } => {
                    let (QueryInput::Sql { sql, params }, Some(router)) = (&input, self.router()) else {
                        return Err(StrataError::Internal("router asked to forward a sub-plan".into()));
                    };
                    router.forward(ForwardQuery { sql, params, schema }, options, info, upstream, wall_deadline).await
                }
            }
        };
        let (stream, route) = match tokio::time::timeout_at(deadline, start.instrument(span.clone())).await {
            Ok(Ok(started)) => started,
            Ok(Err(err)) => {
                span.in_scope(|| warn!(error = %err, "query rejected"));
                if let Some(observer) = &observer {
                    observer(crate::query::Outcome::Error, 0, started.elapsed(), None);
                }
                return Err(err);
            }
            Err(_) => return Err(StrataError::Timeout(budget)),
        };
        span.in_scope(|| tracing::debug!(route = %route, "routed"));
        let running_slot = running_slot.take();
        Ok(QueryStream::new(
            id,
            stream,
            permit,
            crate::query::StreamLimits {
                deadline,
                timeout: budget,
                max_rows: limits.max_result_rows,
                slow_query: limits.slow_query,
            },
            started,
            span,
            observer,
            route,
        )
        .with_running_slot(running_slot))
    }

    /// The optimized plan of a cached statement with `params` bound. A deterministic
    /// statement whose parameter types are all known is optimized once, placeholders and
    /// all, and each execution binds its values into that generic plan (as PostgreSQL does
    /// for prepared statements): a lookup by key skips the optimizer. Anything else, or a
    /// generic plan the optimizer refuses, is bound first and optimized per execution.
    fn optimized(
        &self,
        cached: &CachedPlan,
        deterministic: bool,
        state: &SessionState,
        params: &[ScalarValue],
    ) -> Result<LogicalPlan> {
        let planned = &cached.planned;
        let generic = deterministic && planned.parameters.fields().iter().all(|f| f.data_type() != &DataType::Null);
        if generic {
            let optimized = cached.optimized.get_or_init(|| state.optimize(&planned.plan).ok());
            if let Some(optimized) = optimized {
                return bind_parameters(optimized.clone(), &planned.parameters, params.to_vec());
            }
        }
        Ok(state.optimize(&bind_parameters(planned.plan.clone(), &planned.parameters, params.to_vec())?)?)
    }

    /// The physical plan of optimized `plan`. The physical optimizer's rules place
    /// repartitions, sorts and coalesces and push work into file scans; a plan that only
    /// projects, filters and limits one in-memory scan of a single partition (a lookup the
    /// zone maps narrowed to one batch) needs none of them, and running them costs more than
    /// the lookup itself. Such a plan runs as the planner made it; any other is optimized
    /// as usual.
    async fn physical_plan(
        &self,
        plan: &LogicalPlan,
        state: &SessionState,
        deterministic: bool,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !deterministic {
            return Ok(state.query_planner().create_physical_plan(plan, state).await?);
        }
        let bare = &self.inner.planning_without_physical_rules;
        let initial = bare.query_planner().create_physical_plan(plan, bare).await?;
        if runs_as_planned(initial.as_ref()) {
            return Ok(initial);
        }
        Ok(DefaultPhysicalPlanner::default().optimize_physical_plan(initial, state, |_, _| {})?)
    }

    /// Adds the version and age of every configured dataset the plan reads here.
    fn add_local_versions(&self, plan: &LogicalPlan, info: &mut RouteInfo) {
        for name in scanned_tables(plan) {
            let Some(dataset) = self.find(&name) else { continue };
            if info.versions.iter().any(|v| v.dataset.eq_ignore_ascii_case(&name)) {
                continue;
            }
            let (version, age_ms) = match dataset.snapshot() {
                Some(s) => (s.version, s.refreshed_at.elapsed().unwrap_or_default().as_millis() as u64),
                None => (0, 0),
            };
            info.versions.push(VersionRead { dataset: dataset.name().to_string(), version, age_ms });
        }
    }
}

enum QueryInput<'a> {
    Sql { sql: &'a str, params: Vec<ScalarValue> },
    Plan(LogicalPlan),
}

/// True for a single-partition chain of projections, filters and limits over one in-memory
/// scan: a plan no physical optimizer rule needs to change for it to run correctly.
fn runs_as_planned(plan: &dyn ExecutionPlan) -> bool {
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::datasource::source::DataSourceExec;
    if plan.properties().output_partitioning().partition_count() != 1 {
        return false;
    }
    let chain = matches!(plan.name(), "ProjectionExec" | "FilterExec" | "GlobalLimitExec" | "LocalLimitExec");
    match plan.children().as_slice() {
        [child] if chain => runs_as_planned(child.as_ref()),
        [] => plan.downcast_ref::<DataSourceExec>().is_some_and(|s| s.data_source().is::<MemorySourceConfig>()),
        _ => false,
    }
}

fn parameter_schema(plan: &LogicalPlan) -> Result<SchemaRef> {
    let types = plan.get_parameter_types()?;
    let mut names: Vec<&String> = types.keys().collect();
    names.sort_by_key(|n| (n.trim_start_matches('$').parse::<u32>().unwrap_or(u32::MAX), n.to_string()));
    let fields: Vec<Field> = names
        .into_iter()
        .map(|name| Field::new(name.as_str(), types[name].clone().unwrap_or(DataType::Null), true))
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

/// Substitutes positional parameters, casting each value to the type the plan expects
/// (clients send 64-bit integers for a 32-bit column, for example).
fn bind_parameters(plan: LogicalPlan, expected: &Schema, params: Vec<ScalarValue>) -> Result<LogicalPlan> {
    if expected.fields().is_empty() && params.is_empty() {
        return Ok(plan);
    }
    if params.len() != expected.fields().len() {
        return Err(StrataError::Plan(format!(
            "the query has {} parameter(s) but {} value(s) were bound",
            expected.fields().len(),
            params.len()
        )));
    }
    let values = params
        .into_iter()
        .zip(expected.fields())
        .map(|(value, field)| match field.data_type() {
            DataType::Null => Ok(value),
            target if value.data_type() == *target => Ok(value),
            target => value.cast_to(target).map_err(|e| {
                StrataError::Plan(format!(
                    "parameter {}: cannot use {} as {target}: {e}",
                    field.name(),
                    value.data_type()
                ))
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(plan.with_param_values(values)?)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_waits_for_every_start_up_guard_and_only_for_them() {
        let config = Config::parse("region: eu\n", "test").expect("config");
        let engine = Engine::new(&config).expect("engine");
        let catalog_a = engine.hold_readiness();
        let catalog_b = engine.hold_readiness();
        engine.start();
        assert!(!engine.is_ready(), "two start-up tasks pending");
        drop(catalog_a);
        assert!(!engine.is_ready(), "one start-up task pending");
        // A task that ends without success (an early return, a panic) drops its guard too.
        let failed = tokio::spawn(async move {
            let _guard = catalog_b;
            panic!("start-up task failed");
        });
        assert!(failed.await.is_err());
        assert!(engine.is_ready(), "no dataset and no start-up task left");
        assert_eq!(engine.queries_in_flight(), 0);
    }
}
