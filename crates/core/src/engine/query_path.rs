//! The query path, one method per phase: **admit** (a slot among the queries in flight and
//! a time budget) -> **plan** (the cached logical plan and the values bound into it) ->
//! **route** (here, upstream, or mixed) -> **execute** (a running slot, the physical plan,
//! the results cache; or the forward). [`Engine::run`] strings them together under the
//! budget and wraps the answer in a [`QueryStream`] that enforces the limits while it streams.
//!
//! Admission lives here and in `QueryStream`, not in a tower layer, on purpose: a layer's
//! permit is released when the response starts, but a Flight answer streams long after
//! that, and an admitted query holds its slot until its last batch.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use datafusion::common::ScalarValue;
use datafusion::execution::{SendableRecordBatchStream, SessionState};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::DefaultPhysicalPlanner;
use tokio::sync::OwnedSemaphorePermit;
use tracing::field::Empty;
use tracing::{Instrument, debug_span, warn};

use super::Engine;
use crate::auth::Access;
use crate::error::{Result, StrataError};
use crate::plan_cache::CachedPlan;
use crate::query::{Finished, Outcome, QueryLabel, QueryObserver, QueryStream, StreamLimits, next_query_id};
use crate::read_only;
use crate::results_cache::{Answer, CacheControl, CacheStatus, Lookup, Revalidation, Staleness, TextKey};
use crate::routing::{ForwardQuery, QueryOptions, RouteInfo, Routing, SharedRouter, VersionRead, scanned_tables};

/// What a query asks to run.
enum QueryInput<'a> {
    /// Client SQL with its positional parameters.
    Sql { sql: &'a str, params: Vec<ScalarValue> },
    /// A plan another tier shipped here (a sub-plan of a mixed query).
    Plan(LogicalPlan),
}

/// A query let in by [`Engine::admit`].
struct Admission {
    id: u64,
    /// Its place among `limits.max_concurrent_queries`, held until its answer is streamed.
    permit: OwnedSemaphorePermit,
    /// Its place among its tenants' `max_concurrent_queries`, likewise.
    tenant_slots: Vec<OwnedSemaphorePermit>,
    started: Instant,
    /// The sooner of `limits.query_timeout` and the caller's deadline.
    budget: Duration,
    deadline: tokio::time::Instant,
    /// The same deadline on the wall clock, for the tier a query is forwarded to.
    wall_deadline: SystemTime,
}

/// A query after [`Engine::plan_query`].
struct Planned<'a> {
    input: PlannedInput<'a>,
    /// Calls only immutable functions: it may share the planning state and the results cache.
    deterministic: bool,
    /// The session state of a query that calls `now()`, stamped with its start time; the
    /// shared planning state serves every other.
    own_state: Option<SessionState>,
    /// [`crate::generation`] before planning: what its answer is remembered by text under.
    generation: u64,
}

enum PlannedInput<'a> {
    Sql {
        sql: &'a str,
        /// As the client sent them (a forward sends these with the SQL).
        params: Vec<ScalarValue>,
        cached: Arc<CachedPlan>,
        /// The values bound into the plan: the client's, or the literals taken out of its SQL.
        bound: Vec<ScalarValue>,
    },
    Shipped(LogicalPlan),
}

/// A statement's generic plan recognized as a key lookup (see [`Engine::index_lookup`]).
struct IndexLookup<'c> {
    lookup: &'c crate::key_lookup::KeyLookup,
    /// The local copy that answers it on a tier with a router, and the route of its answer.
    copy: Option<(Arc<crate::accelerator::AcceleratedTable>, RouteInfo)>,
}

/// A query that started answering: its stream, where it ran, and (when it runs here) its
/// running slot, released when the stream ends.
struct Started {
    stream: crate::encoded::Answer,
    info: RouteInfo,
    running_slot: Option<OwnedSemaphorePermit>,
    /// The results cache's answer the stream reads, when it reads one.
    cached: Option<Arc<crate::results_cache::CachedResult>>,
}

impl Engine {
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
        let label = QueryLabel::of(sql);
        let span = query_span(&label, options);
        // Boxed: the query path's future is tens of KB (its planning and execution states),
        // and every move of it by value was a copy of all of it, on every query, cached
        // answers included (callgrind: most of a results cache hit's instructions).
        Box::pin(self.run(QueryInput::Sql { sql, params }, options, (span, label))).await
    }

    /// Runs a plan another tier shipped here (a sub-plan of a mixed query), under the same
    /// limits as SQL. It may only read.
    pub async fn execute_plan(&self, plan: LogicalPlan, options: &QueryOptions) -> Result<QueryStream> {
        read_only::check_plan(&plan)?;
        let label = QueryLabel::of(&plan.display().to_string());
        let span = query_span(&label, options);
        Box::pin(self.run(QueryInput::Plan(plan), options, (span, label))).await
    }

    /// Runs a plan shipped by another tier as datafusion-proto bytes.
    pub async fn execute_encoded_plan(&self, bytes: &[u8], options: &QueryOptions) -> Result<QueryStream> {
        let plan = crate::plan_codec::decode_plan(bytes, &self.inner.ctx, &self.inner.task_ctx)?;
        self.execute_plan(plan, options).await
    }

    /// The phases in order. Everything up to the first batch runs within the query's budget;
    /// the returned stream keeps to the same deadline while it streams.
    async fn run(
        &self,
        input: QueryInput<'_>,
        options: &QueryOptions,
        (span, label): (tracing::Span, QueryLabel),
    ) -> Result<QueryStream> {
        let observer = self.observer();
        let access = self.access(options);
        let admission = match self.admit(options, &access) {
            Ok(admission) => admission,
            Err(err) => {
                if let (StrataError::Overloaded(_) | StrataError::Throttled(_), Some(observer)) = (&err, &observer) {
                    observer(Finished::unanswered(Outcome::Shed, Duration::ZERO));
                }
                return Err(err);
            }
        };
        span.record("id", admission.id);
        // A span per phase (debug: exported when tracing is on, free when it is off).
        // Boxed, so that the timeout and span around it move a pointer, not its state.
        let start = Box::pin(async {
            // A repeated query whose answer is cached, with nothing it depends on changed:
            // answered before it is parsed, planned or routed.
            if let Some(started) = self.answer_by_text(&input, options, &access) {
                return Ok(started);
            }
            let planned = self.plan_query(input, &access).instrument(debug_span!("plan")).await?;
            // Read once: the route and its execution see the same router.
            let router = self.router();
            if !options.cache_control.only_if_cached
                && let Some(started) = self.answer_from_index(&planned, router.as_ref(), options)?
            {
                return Ok(started);
            }
            let routing = debug_span!("route").in_scope(|| self.route(&planned, router.as_ref(), options))?;
            // Boxed: executing holds the results cache, physical planning and distribution
            // states (tens of KB); inline, every query's future had room for them, copied
            // whole when it was boxed, key lookups and cached answers included.
            Box::pin(self.execute_routed(&planned, routing, router.as_ref(), options, &access, admission.wall_deadline))
                .instrument(debug_span!("execute"))
                .await
        });
        let tenant_memory_limits: Vec<String> =
            access.memory_budgets().iter().map(|b| format!("tenants.{}.memory_limit", b.tenant())).collect();
        let started = match tokio::time::timeout_at(admission.deadline, start.instrument(span.clone())).await {
            Ok(Ok(started)) => started,
            Ok(Err(err)) => {
                let err = crate::query::name_memory_limits(err, &tenant_memory_limits);
                let (sql, digest) = (&label.sql, label.digest_hex());
                span.in_scope(
                    || warn!(query_id = admission.id, sql, sql_digest = %digest, error = %err, "query rejected"),
                );
                if let Some(observer) = &observer {
                    observer(Finished::unanswered(Outcome::Error, admission.started.elapsed()));
                }
                return Err(err);
            }
            Err(_) => return Err(StrataError::Timeout(admission.budget)),
        };
        span.in_scope(|| tracing::debug!(route = %started.info, "routed"));
        let mut info = started.info;
        info.trace_id = crate::trace_context::trace_id(&span, &options.trace);
        let (max_rows, rows_limit) = match access
            .policies()
            .iter()
            .filter_map(|p| Some((p.max_result_rows?, p)))
            .min_by_key(|(rows, _)| *rows)
        {
            Some((rows, tenant)) if rows < self.inner.limits.max_result_rows => {
                (rows, format!("tenants.{}.max_result_rows", tenant.name).into())
            }
            _ => (self.inner.limits.max_result_rows, "limits.max_result_rows".into()),
        };
        let limits = StreamLimits {
            deadline: admission.deadline,
            timeout: admission.budget,
            max_rows,
            rows_limit,
            tenant_memory_limits,
            slow_query: self.inner.limits.slow_query,
        };
        Ok(QueryStream::new(
            admission.id,
            started.stream,
            admission.permit,
            limits,
            admission.started,
            (span, label),
            observer,
            info,
        )
        .with_running_slot(started.running_slot)
        .with_tenant_slots(admission.tenant_slots)
        .with_cached(started.cached))
    }

    /// Phase 1: a slot among `limits.max_concurrent_queries` (none free: shed at once, so a
    /// client retries elsewhere instead of queueing behind a burst) and the time budget.
    /// A tenant at its own `max_concurrent_queries` is refused the same way
    /// (RESOURCE_EXHAUSTED / 429), leaving the tier's other slots to other tenants.
    fn admit(&self, options: &QueryOptions, access: &Access) -> Result<Admission> {
        let limits = &self.inner.limits;
        let mut tenant_slots = Vec::new();
        for tenant in access.policies() {
            let Some(running) = &tenant.running else { continue };
            let Ok(slot) = Arc::clone(running).try_acquire_owned() else {
                return Err(StrataError::Throttled(format!(
                    "tenant `{}` already has {} queries running (tenants.{}.max_concurrent_queries); retry later",
                    tenant.name,
                    tenant.max_concurrent_queries.unwrap_or_default(),
                    tenant.name
                )));
            };
            tenant_slots.push(slot);
        }
        let Ok(permit) = Arc::clone(&self.inner.admission).try_acquire_owned() else {
            return Err(StrataError::Overloaded(limits.max_concurrent_queries));
        };
        let (now, clock) = (SystemTime::now(), tokio::time::Instant::now());
        let own = now + limits.query_timeout;
        // The caller's deadline as it was sent, so a tier this query is forwarded to never
        // gets a later one than the caller's.
        let wall_deadline = options.deadline.map_or(own, |caller| caller.min(own));
        let budget = wall_deadline.duration_since(now).unwrap_or_default();
        if budget.is_zero() {
            return Err(StrataError::Timeout(Duration::ZERO));
        }
        Ok(Admission {
            id: next_query_id(),
            permit,
            tenant_slots,
            started: Instant::now(),
            budget,
            deadline: clock + budget,
            wall_deadline,
        })
    }

    /// Phase 2: the logical plan from the plan cache (see `planning.rs`), with the values to
    /// bind into it, and whether it may share state and cached answers.
    /// A shipped plan is held to the caller's grants like SQL: the tier that shipped it is
    /// not trusted to have filtered.
    async fn plan_query<'a>(&self, input: QueryInput<'a>, access: &Access) -> Result<Planned<'a>> {
        let generation = crate::generation::current();
        let input = match input {
            QueryInput::Sql { sql, params } if params.is_empty() => {
                let (cached, bound) = self.plan_for_text(sql, access).await?;
                PlannedInput::Sql { sql, params, cached, bound }
            }
            QueryInput::Sql { sql, params } => {
                let cached = self.plan_cached(sql, access).await?;
                PlannedInput::Sql { sql, bound: params.clone(), params, cached }
            }
            QueryInput::Plan(plan) => {
                if access.is_restricted() {
                    for reference in scanned_references(&plan) {
                        self.check_table(access, &reference)?;
                    }
                }
                PlannedInput::Shipped(plan)
            }
        };
        let deterministic = match &input {
            PlannedInput::Sql { cached, .. } => cached.deterministic,
            PlannedInput::Shipped(plan) => crate::results_cache::is_deterministic(plan),
        };
        let own_state = (!deterministic).then(|| self.inner.ctx.state());
        Ok(Planned { input, deterministic, own_state, generation })
    }

    /// Phase 3: where the query runs. Without a router, here. A query the router must
    /// forward whatever its filters say (cross-region, strong consistency) is decided on the
    /// unoptimized plan and goes upstream as the client's SQL without being optimized here;
    /// any other is optimized first, because routing needs its filters pushed to the scans.
    fn route(&self, planned: &Planned<'_>, router: Option<&SharedRouter>, options: &QueryOptions) -> Result<Routing> {
        if let (PlannedInput::Sql { cached, .. }, Some(router)) = (&planned.input, router)
            && let Some((info, upstream)) = router.forced_forward(&cached.planned.plan, options)?
        {
            return Ok(Routing::Forward { info, upstream });
        }
        let state = planned.state(self);
        let (plan, can_forward) = match &planned.input {
            PlannedInput::Sql { cached, bound, .. } => {
                (self.optimized(cached, planned.deterministic, state, bound)?, true)
            }
            PlannedInput::Shipped(plan) => (state.optimize(plan)?, false),
        };
        match router {
            Some(router) => router.route(plan, options, can_forward),
            None => Ok(Routing::Run { plan, info: RouteInfo::local("every table is served by this tier") }),
        }
    }

    /// The context a query executes in: the shared one, or, for a tenant with a
    /// `memory_limit`, the same with its reservations charged to the tenant too (see
    /// [`crate::tenant_memory`]). Built once per combination of tenants (a context holds
    /// every function registry: too much to copy per query).
    fn task_context(&self, access: &Access) -> Result<Arc<datafusion::execution::TaskContext>> {
        let budgets = access.memory_budgets();
        if budgets.is_empty() {
            return Ok(Arc::clone(&self.inner.task_ctx));
        }
        let key = budgets.iter().map(|b| b.tenant()).collect::<Vec<_>>().join("\u{0}");
        let mut contexts = self.inner.tenant_contexts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ctx) = contexts.get(&key) {
            return Ok(Arc::clone(ctx));
        }
        let shared = &self.inner.task_ctx;
        let runtime = shared.runtime_env();
        let pool = crate::tenant_memory::TenantPool::new(budgets, Arc::clone(&runtime.memory_pool));
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::from_runtime_env(&runtime)
            .with_memory_pool(Arc::new(pool))
            .build_arc()?;
        let ctx = derived_task_context(shared, shared.session_config().clone(), runtime);
        contexts.insert(key, Arc::clone(&ctx));
        Ok(ctx)
    }

    /// Phase 4: starts the answer. Here: wait (within the deadline, first come first served)
    /// for a running slot, then answer from the results cache or plan physically and
    /// execute. Upstream: forward the client's SQL.
    async fn execute_routed(
        &self,
        planned: &Planned<'_>,
        routing: Routing,
        router: Option<&SharedRouter>,
        options: &QueryOptions,
        access: &Access,
        wall_deadline: SystemTime,
    ) -> Result<Started> {
        let (plan, mut info) = match routing {
            Routing::Run { plan, info } => (plan, info),
            Routing::Forward { info, upstream } => {
                let (PlannedInput::Sql { sql, params, cached, .. }, Some(router)) = (&planned.input, router) else {
                    return Err(StrataError::Internal("router asked to forward a sub-plan".into()));
                };
                let query = ForwardQuery { sql, params, schema: Arc::clone(&cached.planned.schema) };
                let (stream, info) = router.forward(query, options, info, upstream, wall_deadline).await?;
                return Ok(Started { stream, info, running_slot: None, cached: None });
            }
        };
        self.add_local_versions(&plan, &mut info);
        // A lookup by an indexed key: its rows from the index, no running slot to wait for
        // behind heavy queries, and no results cache (finding the rows costs less).
        if !options.cache_control.only_if_cached
            && let Some(lookup) = crate::key_lookup::KeyLookup::recognize(&plan)
            && let Some(batches) = lookup.answer()
        {
            return Ok(self.started_from_index(Arc::clone(lookup.schema()), batches, info));
        }
        let running_slot = Arc::clone(&self.inner.running).acquire_owned().await.ok();
        let state = planned.state(self);
        let task_ctx = self.task_context(access)?;
        // Large queries over files run over the platform's replicas (`cluster:`); how one
        // was distributed is known once it is planned, inside the results cache's miss.
        let distributed = std::sync::Mutex::new(None);
        // Boxed: physical planning and distribution are most of this phase's state, and the
        // results cache's fill moves the future it is given by value.
        let execute = || {
            Box::pin(async {
                let physical = self.physical_plan(&plan, state, planned.deterministic).await?;
                if let Some((stream, how)) =
                    self.run_distributed(&plan, &physical, state, &task_ctx, options.distribute).await?
                {
                    *distributed.lock().unwrap_or_else(|p| p.into_inner()) = Some(how);
                    return Ok(stream);
                }
                Ok(datafusion::physical_plan::execute_stream(physical, Arc::clone(&task_ctx))?)
            })
        };
        let mark_distributed = |info: &mut RouteInfo| {
            if let Some(how) = distributed.lock().unwrap_or_else(|p| p.into_inner()).take() {
                info.route = crate::routing::Route::Distributed;
                info.workers = Some(how.workers);
                info.detail = how.to_string();
            }
        };
        let control = options.cache_control;
        let cache = self.inner.results.as_ref().filter(|_| planned.deterministic);
        // The client asked for a fresh answer: neither read nor stored, and said so.
        let cache = match cache {
            Some(_) if control.no_cache => {
                info.cache = Some(CacheStatus::Bypass);
                None
            }
            cache => cache,
        };
        let scope = cache_scope(options, access);
        match cache.and_then(|c| Some((c, c.key(&plan, scope.clone())?))) {
            Some((cache, lookup)) => match cache.get_or_run(&lookup, control, execute()).await? {
                Answer::Fresh(stream, status, answer) => {
                    info.cache = Some(status);
                    if let Some(answer) = &answer {
                        self.remember_text(cache, planned, &scope, answer, &info, router);
                    }
                    mark_distributed(&mut info);
                    return Ok(Started { stream: stream.into(), info, running_slot, cached: answer });
                }
                Answer::Stale(stream, staleness, answer) => {
                    // The fresh answer is computed once, in the background, unless the
                    // client asked that nothing run for it.
                    if !control.only_if_cached
                        && let Some(claim) = cache.revalidation(&lookup)
                    {
                        self.revalidate(claim, lookup, plan.clone(), Arc::clone(&task_ctx), options.distribute);
                    }
                    report_stale(&mut info, &staleness);
                    return Ok(Started { stream: stream.into(), info, running_slot: None, cached: Some(answer) });
                }
                // Waited for an answer too large to share: run it here, uncached.
                Answer::RunHere => info.cache = Some(CacheStatus::Bypass),
            },
            None if control.only_if_cached => return Err(not_cacheable(control)),
            None => {}
        }
        let stream = execute().await?;
        mark_distributed(&mut info);
        Ok(Started { stream: stream.into(), info, running_slot, cached: None })
    }

    /// The answer to client SQL found by its text in the results cache (see
    /// [`ResultsCache::by_text`](crate::results_cache::ResultsCache::by_text)): no running
    /// slot, as for any cached answer.
    fn answer_by_text(&self, input: &QueryInput<'_>, options: &QueryOptions, access: &Access) -> Option<Started> {
        let QueryInput::Sql { sql, params } = input else { return None };
        let hit = self.text_hit(sql, params, options, access)?;
        let cached = Some(Arc::clone(hit.answer()));
        Some(Started { stream: hit.stream().into(), info: hit.info(), running_slot: None, cached })
    }

    /// The cached answer of `sql` with `params` for this caller, found by its text. Never
    /// for a client that asked for a fresh answer or for strong consistency (that route is
    /// decided on every query); a restricted caller's grants are checked as planning would.
    pub(super) fn text_hit(
        &self,
        sql: &str,
        params: &[ScalarValue],
        options: &QueryOptions,
        access: &Access,
    ) -> Option<crate::results_cache::TextHit> {
        let cache = self.inner.results.as_ref()?;
        if options.cache_control.no_cache || options.strong_consistency {
            return None;
        }
        let scope = cache_scope(options, access);
        let hit = cache.by_text(TextKey { sql, params, scope: &scope }, crate::generation::current())?;
        if access.is_restricted() && hit.tables().iter().any(|t| self.check_table(access, t).is_err()) {
            return None;
        }
        Some(hit)
    }

    /// Remembers a cached answer to client SQL by its text, for [`Engine::answer_by_text`].
    /// Not an answer that carries a warning (a replica past its max staleness: that is
    /// decided on every query).
    fn remember_text(
        &self,
        cache: &crate::results_cache::ResultsCache,
        planned: &Planned<'_>,
        scope: &str,
        answer: &Arc<crate::results_cache::CachedResult>,
        info: &RouteInfo,
        router: Option<&SharedRouter>,
    ) {
        let PlannedInput::Sql { sql, params, cached, .. } = &planned.input else { return };
        if info.warning.is_some() || info.route != crate::routing::Route::Local {
            return;
        }
        let expires = router.and_then(|r| r.local_route_expires(info));
        let tables = cached.tables.iter().map(|(reference, _)| reference.clone()).collect();
        let key = TextKey { sql, params, scope };
        cache.remember_text(key, planned.generation, answer, info, expires, tables);
    }

    /// Computes the fresh answer of a query whose stale answer was just served, in the
    /// background and into the results cache, within `limits.query_timeout` and a running
    /// slot like any query. Only deterministic plans are cached, and those are planned with
    /// the shared state, so nothing of the client's request is needed.
    fn revalidate(
        &self,
        claim: Revalidation,
        lookup: Lookup,
        plan: LogicalPlan,
        task_ctx: Arc<datafusion::execution::TaskContext>,
        distribute: Option<bool>,
    ) {
        let engine = self.clone();
        let timeout = self.inner.limits.query_timeout;
        let span = debug_span!("revalidate");
        let work = async move {
            let _claim = claim;
            let Some(cache) = engine.inner.results.as_ref() else { return };
            let _slot = Arc::clone(&engine.inner.running).acquire_owned().await;
            let state = &engine.inner.planning;
            let run = async {
                let physical = engine.physical_plan(&plan, state, true).await?;
                if let Some((stream, _)) =
                    engine.run_distributed(&plan, &physical, state, &task_ctx, distribute).await?
                {
                    return Ok(stream);
                }
                Ok(datafusion::physical_plan::execute_stream(physical, Arc::clone(&task_ctx))?)
            };
            match tokio::time::timeout(timeout, cache.fill(&lookup, run)).await {
                Ok(Ok(_)) => tracing::debug!("stale cached answer revalidated"),
                Ok(Err(err)) => warn!(error = %err, "revalidating a stale cached answer failed"),
                Err(_) => warn!(?timeout, "revalidating a stale cached answer ran past limits.query_timeout"),
            }
        };
        tokio::spawn(work.instrument(span));
    }

    /// A statement whose optimized generic plan is a key lookup: its rows from the index
    /// with the values the client sent or the literals taken out of its SQL, without binding
    /// them into a plan (see [`Engine::index_lookup`] for where). Otherwise the values
    /// decide the route (a replica may hold a subset), so the bound plan is routed first and
    /// answered from the index in [`Engine::execute_routed`].
    fn answer_from_index(
        &self,
        planned: &Planned<'_>,
        router: Option<&SharedRouter>,
        options: &QueryOptions,
    ) -> Result<Option<Started>> {
        let PlannedInput::Sql { cached, bound, .. } = &planned.input else { return Ok(None) };
        let Some(found) = self.index_lookup(cached, bound, planned.state(self), router, options)? else {
            return Ok(None);
        };
        let answer = match found.copy {
            None => found.lookup.answer_with(bound).map(|batches| {
                let mut info = RouteInfo::local("every table is served by this tier");
                // A key lookup reads one table: named by the lookup, not found by walking its plan.
                self.add_local_version(&crate::routing::dataset_name(found.lookup.table()), &mut info);
                (batches, info)
            }),
            Some((copy, info)) => found.lookup.answer_from(&copy, bound).map(|batches| (batches, info)),
        };
        Ok(answer.map(|(batches, info)| self.started_from_index(Arc::clone(found.lookup.schema()), batches, info)))
    }

    /// The key lookup a statement's optimized generic plan is, if it is one and `values`
    /// fill its parameters, with where it is answered: on a tier without a router every
    /// table is here (`copy` is `None`); on one with a router, only the local copy the router
    /// names as answering every value (a whole replica) does.
    fn index_lookup<'c>(
        &self,
        cached: &'c CachedPlan,
        values: &[ScalarValue],
        state: &SessionState,
        router: Option<&SharedRouter>,
        options: &QueryOptions,
    ) -> Result<Option<IndexLookup<'c>>> {
        if values.len() != cached.planned.parameters.fields().len() {
            return Ok(None);
        }
        let Some(generic) = super::planning::generic_plan(cached, cached.deterministic, state) else {
            return Ok(None);
        };
        let lookup = cached.lookup.get_or_init(|| crate::key_lookup::KeyLookup::recognize_generic(generic));
        let Some(lookup) = lookup.as_ref() else { return Ok(None) };
        let copy = match router {
            None => None,
            Some(router) => match router.whole_local_copy(lookup.table(), options)? {
                Some(copy) => Some(copy),
                None => return Ok(None),
            },
        };
        Ok(Some(IndexLookup { lookup, copy }))
    }

    /// What a Flight SQL GetFlightInfo announces for `sql` with `params`, planned once: the
    /// schema of its rows, and whether a local copy's key index will answer it (as
    /// [`Engine::answer_from_index`] answers): work so small that starting it early on
    /// another task costs more than it overlaps. A literal text resolved through its shape is
    /// remembered for the DoGet that runs it (see [`crate::announced`]).
    pub async fn announce(
        &self,
        sql: &str,
        params: &[ScalarValue],
        options: &QueryOptions,
    ) -> Result<(arrow::datatypes::SchemaRef, bool)> {
        let access = self.access(options);
        let (cached, values) = match params.is_empty() {
            true => self.plan_for_text(sql, &access).await?,
            false => (self.plan_cached(sql, &access).await?, params.to_vec()),
        };
        let router = self.router();
        let from_index = match self.index_lookup(&cached, &values, &self.inner.planning, router.as_ref(), options) {
            Ok(Some(found)) => match &found.copy {
                Some((copy, _)) => found.lookup.is_indexed_in(copy),
                None => found.lookup.is_indexed(),
            },
            _ => false,
        };
        let schema = Arc::clone(&cached.planned.schema);
        if params.is_empty() && !values.is_empty() {
            self.inner.announced.remember(sql, cached, values);
        }
        Ok((schema, from_index))
    }

    fn started_from_index(
        &self,
        schema: arrow::datatypes::SchemaRef,
        batches: Vec<arrow::array::RecordBatch>,
        info: RouteInfo,
    ) -> Started {
        self.inner.index_lookups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stream = datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(batches.into_iter().map(Ok)),
        );
        let stream: SendableRecordBatchStream = Box::pin(stream);
        Started { stream: stream.into(), info, running_slot: None, cached: None }
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
            self.add_local_version(&name, info);
        }
    }

    /// Adds the version and age of dataset `name`, if it is a configured one not listed yet.
    fn add_local_version(&self, name: &str, info: &mut RouteInfo) {
        let Some(dataset) = self.find(name) else { return };
        if info.versions.iter().any(|v| v.dataset.eq_ignore_ascii_case(name)) {
            return;
        }
        let (version, age_ms) = match dataset.snapshot() {
            Some(s) => (s.version, s.refreshed_at.elapsed().unwrap_or_default().as_millis() as u64),
            None => (0, 0),
        };
        info.versions.push(VersionRead { dataset: dataset.name().to_string(), version, age_ms });
    }

    fn observer(&self) -> Option<QueryObserver> {
        self.inner.observer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Who may share a cached answer: everyone when tenancy is off; a restricted caller's
/// answers are keyed by who asked, so entries never cross tenants.
fn cache_scope(options: &QueryOptions, access: &Access) -> String {
    match access.is_restricted() {
        true => format!("{}\u{0}{}", options.tenant, options.on_behalf_of),
        false => String::new(),
    }
}

/// A stale answer says so: status STALE, the versions it read, and a warning with how stale.
fn report_stale(info: &mut RouteInfo, staleness: &Staleness) {
    info.cache = Some(CacheStatus::Stale);
    info.stale_ms = Some(u64::try_from(staleness.stale_for.as_millis()).unwrap_or(u64::MAX));
    let mut replaced = Vec::new();
    for read in &staleness.versions {
        match info.versions.iter_mut().find(|v| v.dataset.eq_ignore_ascii_case(&read.dataset)) {
            Some(v) => {
                replaced.push(format!("`{}` version {} (now {})", read.dataset, read.version, v.version));
                *v = read.clone();
            }
            None => replaced.push(format!("`{}` version {}", read.dataset, read.version)),
        }
    }
    let warning = format!(
        "stale answer from the results cache: it read {}, replaced {:.1} s ago",
        replaced.join(", "),
        staleness.stale_for.as_secs_f64()
    );
    info.warning = Some(match info.warning.take() {
        Some(earlier) => format!("{earlier}; {warning}"),
        None => warning,
    });
}

/// Why `only-if-cached` could not be met by a query the results cache cannot hold.
fn not_cacheable(control: CacheControl) -> StrataError {
    let why = if control.no_cache {
        "the request also says no-cache"
    } else {
        "this query is not one the results cache holds (it reads a table that is not accelerated here, calls a volatile function, or the cache is off)"
    };
    StrataError::NotCached(format!("Cache-Control: only-if-cached, but {why}"))
}

impl Planned<'_> {
    fn state<'s>(&'s self, engine: &'s Engine) -> &'s SessionState {
        self.own_state.as_ref().unwrap_or(&engine.inner.planning)
    }
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
        [] => plan.downcast_ref::<DataSourceExec>().is_some_and(|s| {
            s.data_source().is::<MemorySourceConfig>() || s.data_source().is::<crate::zone_scan::ZoneMappedSource>()
        }),
        _ => false,
    }
}

/// `base` with another session config and runtime (a tenant's memory pool, a distributed
/// query's coordinator session); its function registries are shared, not rebuilt.
pub(super) fn derived_task_context(
    base: &datafusion::execution::TaskContext,
    config: datafusion::prelude::SessionConfig,
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
) -> Arc<datafusion::execution::TaskContext> {
    Arc::new(datafusion::execution::TaskContext::new(
        base.task_id(),
        base.session_id(),
        config,
        base.scalar_functions().clone(),
        base.higher_order_functions().clone(),
        base.aggregate_functions().clone(),
        base.window_functions().clone(),
        runtime,
    ))
}

/// The span of one query, a child of the caller's trace context when it sent one. Its
/// route, rows and outcome are recorded as they become known (`QueryStream`). At debug
/// level: exported with traces (`telemetry`), free in a tier that only logs (see
/// [`QueryLabel`]).
fn query_span(label: &QueryLabel, options: &QueryOptions) -> tracing::Span {
    let span = debug_span!(
        "query",
        id = Empty,
        sql = &*label.sql,
        sql_digest = %label.digest_hex(),
        route = Empty,
        reason = Empty,
        versions = Empty,
        cache = Empty,
        rows = Empty,
        bytes = Empty,
        outcome = Empty,
    );
    crate::trace_context::adopt(&span, &options.trace);
    span
}

/// The tables a plan scans, as referenced, subqueries included.
fn scanned_references(plan: &LogicalPlan) -> Vec<datafusion::common::TableReference> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut references = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            references.push(scan.table_name.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    references
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use async_trait::async_trait;
    use datafusion::datasource::MemTable;
    use futures::TryStreamExt;

    use super::*;
    use crate::config::Config;
    use crate::results_cache::CacheStatus;
    use crate::routing::{CatalogEntry, RouteReason, Router};

    /// An engine over `t(k, v)` with 100 rows, `v = 10 * k`.
    fn engine(config: &str) -> Engine {
        let engine = Engine::new(&Config::parse(config, "test").expect("config")).expect("engine");
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(0..100)),
                Arc::new(Int64Array::from_iter_values((0..100).map(|k| k * 10))),
            ],
        )
        .expect("batch");
        engine
            .register_table("t", Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table")))
            .expect("register");
        engine
    }

    fn sql(sql: &str) -> QueryInput<'_> {
        QueryInput::Sql { sql, params: Vec::new() }
    }

    #[tokio::test]
    async fn admit_sheds_past_the_concurrency_limit_and_refuses_a_spent_deadline() {
        let engine = engine("region: eu\nlimits:\n  max_concurrent_queries: 1\n");
        let first = engine.admit(&QueryOptions::default(), &Access::Everything).expect("a free slot");
        assert!(matches!(engine.admit(&QueryOptions::default(), &Access::Everything), Err(StrataError::Overloaded(1))));
        assert_eq!(engine.queries_in_flight(), 1);
        drop(first);

        let spent = QueryOptions { deadline: Some(SystemTime::now() - Duration::from_secs(1)), ..Default::default() };
        assert!(matches!(engine.admit(&spent, &Access::Everything), Err(StrataError::Timeout(d)) if d.is_zero()));
        let soon =
            QueryOptions { deadline: Some(SystemTime::now() + Duration::from_millis(500)), ..Default::default() };
        let admission = engine.admit(&soon, &Access::Everything).expect("admitted");
        assert!(admission.budget <= Duration::from_millis(500), "the caller's deadline bounds the budget");
        assert!(admission.wall_deadline <= soon.deadline.expect("deadline"));
    }

    #[tokio::test]
    async fn plan_phase_shares_one_plan_among_literal_queries_of_one_shape() {
        let engine = engine("region: eu\n");
        let three = engine.plan_query(sql("SELECT v FROM t WHERE k = 3"), &Access::Everything).await.expect("plan");
        let four = engine.plan_query(sql("SELECT v FROM t WHERE k = 4"), &Access::Everything).await.expect("plan");
        let (PlannedInput::Sql { cached: a, .. }, PlannedInput::Sql { cached: b, bound, .. }) =
            (&three.input, &four.input)
        else {
            panic!("SQL plans to SQL");
        };
        assert!(Arc::ptr_eq(a, b), "one plan for both texts");
        assert_eq!(bound, &[ScalarValue::Int64(Some(4))], "each binds its own literal");
        assert_eq!(engine.cached_plans(), 1);
        assert!(four.deterministic && four.own_state.is_none());

        let clock = engine.plan_query(sql("SELECT now() AS t0, v FROM t"), &Access::Everything).await.expect("plan");
        assert!(!clock.deterministic, "now() is not deterministic");
        assert!(clock.own_state.is_some(), "a query calling now() gets a state stamped with its start");

        let write = engine.plan_query(sql("DELETE FROM t"), &Access::Everything).await.err().expect("refused");
        assert!(matches!(write, StrataError::ReadOnly(ref kind) if kind == "DELETE"), "{write}");
    }

    #[tokio::test]
    async fn route_phase_without_a_router_runs_here() {
        let engine = engine("region: eu\n");
        let planned = engine.plan_query(sql("SELECT v FROM t WHERE k = 3"), &Access::Everything).await.expect("plan");
        match engine.route(&planned, engine.router().as_ref(), &QueryOptions::default()).expect("route") {
            Routing::Run { plan, info } => {
                assert_eq!(info.reason, RouteReason::Local);
                assert!(plan.display_indent().to_string().contains("k = Int64(3)"), "{}", plan.display_indent());
            }
            Routing::Forward { .. } => panic!("no router: nothing to forward to"),
        }
    }

    /// A router that forces every client query upstream and records what `route` was asked.
    #[derive(Default)]
    struct ForceUpstream {
        routed_as_forwardable: AtomicBool,
        routed: AtomicBool,
    }

    #[async_trait]
    impl Router for ForceUpstream {
        fn route(&self, plan: LogicalPlan, _: &QueryOptions, can_forward: bool) -> Result<Routing> {
            self.routed.store(true, Ordering::SeqCst);
            self.routed_as_forwardable.store(can_forward, Ordering::SeqCst);
            Ok(Routing::Run { plan, info: RouteInfo::local("test") })
        }
        fn forced_forward(&self, _: &LogicalPlan, _: &QueryOptions) -> Result<Option<(RouteInfo, usize)>> {
            let mut info = RouteInfo::local("strong consistency");
            info.reason = RouteReason::StrongConsistency;
            Ok(Some((info, 7)))
        }
        async fn forward(
            &self,
            _: ForwardQuery<'_>,
            _: &QueryOptions,
            _: RouteInfo,
            _: usize,
            _: SystemTime,
        ) -> Result<(crate::encoded::Answer, RouteInfo)> {
            Err(StrataError::Protocol("test upstream is down".into()))
        }
        fn remote_catalog(&self) -> Vec<CatalogEntry> {
            Vec::new()
        }
        fn replica_statuses(&self) -> Vec<crate::dataset::DatasetStatus> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn route_phase_forwards_a_forced_query_before_optimizing_and_keeps_shipped_plans_here() {
        let engine = engine("region: eu\n");
        let router = Arc::new(ForceUpstream::default());
        engine.set_router(router.clone());
        let planned = engine.plan_query(sql("SELECT v FROM t"), &Access::Everything).await.expect("plan");
        let routing = engine.route(&planned, engine.router().as_ref(), &QueryOptions::default()).expect("route");
        assert!(matches!(routing, Routing::Forward { upstream: 7, .. }));
        assert!(!router.routed.load(Ordering::SeqCst), "a forced forward is decided before optimizing");

        let shipped = planned_plan(&planned);
        let planned = engine.plan_query(QueryInput::Plan(shipped), &Access::Everything).await.expect("plan");
        assert!(matches!(
            engine.route(&planned, engine.router().as_ref(), &QueryOptions::default()).expect("route"),
            Routing::Run { .. }
        ));
        assert!(router.routed.load(Ordering::SeqCst));
        assert!(!router.routed_as_forwardable.load(Ordering::SeqCst), "a shipped plan may not be forwarded");

        // The execute phase forwards the client's SQL and reports the upstream's error.
        let err = engine.execute("SELECT v FROM t", Vec::new()).await.err().expect("upstream down");
        assert!(err.to_string().contains("test upstream is down"), "{err}");
    }

    fn planned_plan(planned: &Planned<'_>) -> LogicalPlan {
        match &planned.input {
            PlannedInput::Sql { cached, .. } => cached.planned.plan.clone(),
            PlannedInput::Shipped(plan) => plan.clone(),
        }
    }

    /// The one value of column `v` a query answers.
    async fn value_of(engine: &Engine, sql: &str) -> i64 {
        let batches: Vec<RecordBatch> =
            engine.execute(sql, Vec::new()).await.expect("ran").try_collect().await.expect("rows");
        let values: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().expect("v").values().to_vec())
            .collect();
        assert_eq!(values.len(), 1, "{sql}: {values:?}");
        values[0]
    }

    #[tokio::test]
    async fn a_text_announced_runs_with_its_resolution_unless_its_table_changed_in_between() {
        let engine = engine("region: eu\n");
        let options = QueryOptions::default();
        assert_eq!(value_of(&engine, "SELECT v FROM t WHERE k = 3").await, 30, "the shape learned");

        let (schema, _) = engine.announce("SELECT v FROM t WHERE k = 5", &[], &options).await.expect("announced");
        assert_eq!(schema.field(0).name(), "v");
        assert_eq!(engine.inner.announced.held(), 1, "kept for its DoGet");
        assert_eq!(value_of(&engine, "SELECT v FROM t WHERE k = 5").await, 50);
        assert_eq!(engine.inner.announced.held(), 0, "taken by it");

        // A table registered anew between the two calls: the kept plan reads the old one, so
        // the run resolves its text again, against the new table.
        engine.announce("SELECT v FROM t WHERE k = 6", &[], &options).await.expect("announced");
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![6])), Arc::new(Int64Array::from(vec![-6]))],
        )
        .expect("batch");
        engine
            .register_table("t", Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table")))
            .expect("register");
        assert_eq!(value_of(&engine, "SELECT v FROM t WHERE k = 6").await, -6, "read from the new table");
        assert_eq!(engine.inner.announced.held(), 0);

        // A prepared statement's parameters travel with it: nothing is kept for it.
        engine.announce("SELECT v FROM t WHERE k = $1", &[ScalarValue::Int64(Some(7))], &options).await.expect("ok");
        assert_eq!(engine.inner.announced.held(), 0);
    }

    #[tokio::test]
    async fn execute_phase_answers_repeats_from_the_results_cache_but_never_a_clock_query() {
        // The results cache holds answers over configured datasets (it knows their versions).
        let dir = tempfile::tempdir().expect("dir");
        let csv: String =
            std::iter::once("k,v\n".to_string()).chain((0..100).map(|k| format!("{k},{}\n", k * 10))).collect();
        std::fs::write(dir.path().join("t.csv"), csv).expect("csv");
        let config = format!(
            "region: eu\ndatasets:\n  - name: t\n    from: file:{}/t.csv\n    acceleration: {{}}\n",
            dir.path().display()
        );
        let engine = Engine::new(&Config::parse(&config, "test").expect("config")).expect("engine");
        engine.start();
        tokio::time::timeout(Duration::from_secs(20), engine.wait_ready()).await.expect("ready");
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let stream = engine.execute("SELECT sum(v) AS s FROM t WHERE k < 10", Vec::new()).await.expect("run");
            statuses.push(stream.route().cache);
            let batches: Vec<RecordBatch> = stream.try_collect().await.expect("rows");
            let sum = batches[0].column(0).as_any().downcast_ref::<Int64Array>().expect("int64").value(0);
            assert_eq!(sum, 450);
        }
        assert_eq!(statuses, [Some(CacheStatus::Miss), Some(CacheStatus::Hit)]);

        let clock = engine.execute("SELECT now() AS t0 FROM t LIMIT 1", Vec::new()).await.expect("run");
        assert_eq!(clock.route().cache, None, "an answer that depends on the clock is never cached");
        let versions = clock.route().versions.clone();
        assert_eq!(versions.len(), 1, "the answer names the version of t it read: {versions:?}");
        assert_eq!((versions[0].dataset.as_str(), versions[0].version), ("t", 1));
    }
}
