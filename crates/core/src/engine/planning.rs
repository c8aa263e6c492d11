//! The plan phase of the query path: SQL text to a cached logical plan (parse within the
//! configured bounds, refuse writes, plan, remember), literal SQL sharing the plan of its
//! shape, and parameters bound into a plan optimized once per statement.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DfStatement;

use datafusion::common::TableReference;

use super::{Engine, PlannedQuery};
use crate::auth::Access;
use crate::error::{Result, StrataError};
use crate::literal_shapes::Skeleton;
use crate::plan_cache::CachedPlan;
use crate::read_only;
use crate::routing::QueryOptions;

impl Engine {
    /// Parses and plans one read-only statement for the caller of `options` without
    /// running it.
    pub async fn plan(&self, sql: &str, options: &QueryOptions) -> Result<PlannedQuery> {
        Ok(self.plan_cached(sql, &self.access(options)).await?.planned.clone())
    }

    /// The schema of the rows `sql` returns, from the plan its shape shares (see
    /// [`Engine::plan_for_text`]): what GetFlightInfo answers before the query runs.
    /// A text whose answer is cached answers with that answer's schema, unplanned, as the
    /// query it announces will.
    pub async fn result_schema(&self, sql: &str, options: &QueryOptions) -> Result<SchemaRef> {
        let access = self.access(options);
        if let Some(hit) = self.text_hit(sql, &[], options, &access) {
            return Ok(hit.schema());
        }
        Ok(Arc::clone(&self.plan_for_text(sql, &access).await?.0.planned.schema))
    }

    /// The schema of the answer the results cache holds for `sql` with `params` for the
    /// caller of `options`, found by its text: a query that will be answered from the cache
    /// needs neither planning nor an early start, and a Flight SQL GetFlightInfo can announce
    /// it at once. `None` when the text has no cached answer this caller may read.
    pub fn cached_schema(&self, sql: &str, params: &[ScalarValue], options: &QueryOptions) -> Option<SchemaRef> {
        self.text_hit(sql, params, options, &self.access(options)).map(|hit| hit.schema())
    }

    /// The plan of `sql` from the plan cache, planned now if it is not there or if a table
    /// it reads has been registered anew since (a reconnected source, a new replica). Plans
    /// are shared by every caller; what each may read is checked on every use.
    pub(super) async fn plan_cached(&self, sql: &str, access: &Access) -> Result<Arc<CachedPlan>> {
        if let Some(hit) = self.cached(sql).await {
            self.check_cached(access, &hit)?;
            return Ok(hit);
        }
        let statement = self.parse(sql, access)?;
        let planned = self.plan_and_cache(sql.to_string(), statement).await?;
        self.check_cached(access, &planned)?;
        Ok(planned)
    }

    /// A table the caller may not read fails exactly as one that does not exist, with
    /// DataFusion's own message, before anything else about the query is looked at (so a
    /// column error cannot tell that the table exists).
    fn check_references(&self, access: &Access, statement: &DfStatement) -> Result<()> {
        if !access.is_restricted() {
            return Ok(());
        }
        for reference in self.inner.planning.resolve_table_references(statement)? {
            self.check_table(access, &reference)?;
        }
        Ok(())
    }

    fn check_cached(&self, access: &Access, cached: &CachedPlan) -> Result<()> {
        if !access.is_restricted() {
            return Ok(());
        }
        cached.tables.iter().try_for_each(|(reference, _)| self.check_table(access, reference))
    }

    /// Refuses `reference` unless it names a dataset `access` grants (the catalog's
    /// `information_schema` lists every dataset, so it is refused to restricted callers).
    pub(super) fn check_table(&self, access: &Access, reference: &TableReference) -> Result<()> {
        let resolved = reference.clone().resolve(super::CATALOG, super::DEFAULT_SCHEMA);
        let name = if &*resolved.schema == super::DEFAULT_SCHEMA {
            resolved.table.to_string()
        } else {
            format!("{}.{}", resolved.schema, resolved.table)
        };
        let granted =
            &*resolved.catalog == super::CATALOG && &*resolved.schema != "information_schema" && access.allows(&name);
        if granted {
            return Ok(());
        }
        Err(datafusion::error::DataFusionError::Plan(format!("table '{resolved}' not found")).into())
    }

    /// The plan for SQL sent without parameters, and the values to bind into it. A query
    /// whose comparison literals can be taken out (see [`crate::parameterize`]) shares the
    /// cached plan of its shape and binds its own literals, when each has exactly the type
    /// the plan expects; any other is planned as written.
    pub(super) async fn plan_for_text(
        &self,
        sql: &str,
        access: &Access,
    ) -> Result<(Arc<CachedPlan>, Vec<ScalarValue>)> {
        // Resolved a moment ago by this text's GetFlightInfo: its DoGet skips the skeleton.
        if let Some((announced, values)) = self.inner.announced.take(sql)
            && self.still_registered(&announced).await
        {
            self.check_cached(access, &announced)?;
            return Ok((announced, values));
        }
        if let Some(hit) = self.cached(sql).await {
            self.check_cached(access, &hit)?;
            return Ok((hit, Vec::new()));
        }
        // Placeholders of the client's own are never renumbered under a shape's.
        let skeleton = if sql.contains(['$', '?']) {
            None
        } else {
            crate::statement_bounds::check_size(sql, self.inner.limits.max_query_size.as_usize())?;
            Skeleton::of(sql)
        };
        if let Some(found) = self.plan_by_skeleton(skeleton.as_ref()).await {
            self.check_cached(access, &found.0)?;
            return Ok(found);
        }
        let statement = self.parse(sql, access)?;
        if let Some(shape) = crate::parameterize::parameterize(sql, &statement)
            && !self.inner.plans.is_refused_shape(&shape.key)
        {
            if let Some(skeleton) = skeleton
                && let Some(recipe) = skeleton.recipe(&shape)
            {
                self.inner.plans.learn_recipe(skeleton.key, recipe);
            }
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
                self.check_cached(access, &planned)?;
                return Ok((planned, shape.values));
            }
        }
        let planned = self.plan_and_cache(sql.to_string(), statement).await?;
        self.check_cached(access, &planned)?;
        Ok((planned, Vec::new()))
    }

    /// The plan of a literal text's shape and its values, found by the text's skeleton
    /// without parsing it (see [`crate::literal_shapes`]): the recipe of an earlier text of
    /// this skeleton, that shape's plan still cached, and values it binds exactly. The text
    /// was checked against the configured bounds when that earlier text was parsed: the
    /// same tokens but for literals that stay within the size checked here.
    async fn plan_by_skeleton(&self, skeleton: Option<&Skeleton<'_>>) -> Option<(Arc<CachedPlan>, Vec<ScalarValue>)> {
        let skeleton = skeleton?;
        let recipe = self.inner.plans.recipe(&skeleton.key)?;
        let values = skeleton.values(&recipe)?;
        let planned = self.cached(&recipe.shape_key).await?;
        planned.binds(&values).then_some((planned, values))
    }

    async fn cached(&self, key: &str) -> Option<Arc<CachedPlan>> {
        let hit = self.inner.plans.get(key)?;
        self.still_registered(&hit).await.then_some(hit)
    }

    /// Parses one statement within the configured bounds: its text's size, then (once
    /// `?` placeholders are numbered and OR chains folded) its nesting depth; then the
    /// tables it names against what the caller may read.
    fn parse(&self, sql: &str, access: &Access) -> Result<DfStatement> {
        let limits = &self.inner.limits;
        crate::statement_bounds::check_size(sql, limits.max_query_size.as_usize())?;
        let sql = crate::placeholders::number_positional(sql)?;
        let mut statement =
            self.inner.planning.sql_to_statement(&sql, &datafusion::common::config::Dialect::Generic)?;
        read_only::check_statement(&statement)?;
        crate::statement_bounds::bound_statement(&mut statement, limits.max_expression_depth)?;
        crate::statement_bounds::check_lists(&statement, limits.max_in_list, limits.max_parameters)?;
        self.check_references(access, &statement)?;
        Ok(statement)
    }

    async fn plan_and_cache(&self, key: String, statement: DfStatement) -> Result<Arc<CachedPlan>> {
        // Boxed: DataFusion's SQL planning future is large, and only a text the plan cache
        // misses needs it; inline, every query's future would hold room for it.
        Box::pin(async move {
            let entry = Arc::new(CachedPlan::new(self.plan_statement(statement).await?));
            self.inner.plans.insert(key, Arc::clone(&entry));
            Ok(entry)
        })
        .await
    }

    /// Whether the catalog still serves the providers `plan` was planned against. Each
    /// provider is looked up at most once per [`crate::generation`]: every registration
    /// advances it, so while it stands a plan found registered still is (looking the tables
    /// up was a twentieth of a key lookup's instructions, on every plan cache hit).
    async fn still_registered(&self, plan: &CachedPlan) -> bool {
        // Read before looking: a registration while looking makes the next use look again.
        let generation = crate::generation::current();
        if plan.registered_at.load(std::sync::atomic::Ordering::Acquire) == generation {
            return true;
        }
        for (name, provider) in &plan.tables {
            match self.inner.ctx.table_provider(name.clone()).await {
                Ok(current) if Arc::ptr_eq(&current, provider) => {}
                _ => return false,
            }
        }
        plan.registered_at.store(generation, std::sync::atomic::Ordering::Release);
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

    /// The optimized plan of a cached statement with `params` bound. A deterministic
    /// statement whose parameter types are all known is optimized once, placeholders and
    /// all, and each execution binds its values into that generic plan (as PostgreSQL does
    /// for prepared statements): a lookup by key skips the optimizer. Anything else, or a
    /// generic plan the optimizer refuses, is bound first and optimized per execution.
    pub(super) fn optimized(
        &self,
        cached: &CachedPlan,
        deterministic: bool,
        state: &SessionState,
        params: &[ScalarValue],
    ) -> Result<LogicalPlan> {
        let planned = &cached.planned;
        if let Some(optimized) = generic_plan(cached, deterministic, state) {
            return bind_parameters(optimized.clone(), &planned.parameters, params.to_vec());
        }
        Ok(state.optimize(&bind_parameters(planned.plan.clone(), &planned.parameters, params.to_vec())?)?)
    }
}

/// The optimized generic plan of a cached statement (placeholders left in), optimized on
/// first use; `None` when the statement is not deterministic, a parameter's type is
/// unknown, or the optimizer refused the plan with placeholders.
pub(super) fn generic_plan<'c>(
    cached: &'c CachedPlan,
    deterministic: bool,
    state: &SessionState,
) -> Option<&'c LogicalPlan> {
    let planned = &cached.planned;
    let generic = deterministic && planned.parameters.fields().iter().all(|f| f.data_type() != &DataType::Null);
    if !generic {
        return None;
    }
    cached.optimized.get_or_init(|| state.optimize(&planned.plan).ok()).as_ref()
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
