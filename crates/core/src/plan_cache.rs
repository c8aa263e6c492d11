//! The plan cache: plans by SQL text (or by the shape of literal SQL, see
//! [`crate::parameterize`]), weighed in bytes against `limits.plan_cache_size`, so a repeated
//! or prepared statement is parsed and planned once. An entry remembers the providers it was
//! planned against; the engine uses it only while the catalog still serves those.

use std::sync::{Arc, OnceLock};

use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;

use crate::engine::PlannedQuery;
use crate::literal_shapes::Recipe;

pub(crate) type ProviderRef = Arc<dyn datafusion::catalog::TableProvider>;

/// What the plan cache keeps per SQL text.
pub(crate) struct CachedPlan {
    pub(crate) planned: PlannedQuery,
    /// The optimized generic plan of a deterministic statement (placeholders left in), set
    /// by its first run; executions bind their parameters into it. `None` when the optimizer
    /// refused the plan with its placeholders: it is not tried again.
    pub(crate) optimized: OnceLock<Option<LogicalPlan>>,
    /// The optimized generic plan as a key lookup, if it is one: an execution answers from
    /// the index with its values, without binding them into a plan (see `crate::key_lookup`).
    pub(crate) lookup: OnceLock<Option<crate::key_lookup::KeyLookup>>,
    /// Calls only immutable functions (see [`crate::results_cache::is_deterministic`]).
    pub(crate) deterministic: bool,
    /// The providers the plan reads: it is valid while the catalog still serves these.
    pub(crate) tables: Vec<(datafusion::common::TableReference, ProviderRef)>,
    /// The [`crate::generation`] at which `tables` were last found registered (`u64::MAX`:
    /// not yet), so the catalog is looked up again only after something changed.
    pub(crate) registered_at: std::sync::atomic::AtomicU64,
    /// Estimated bytes of the plan (its weight in the plan cache, with the text).
    bytes: usize,
}

impl CachedPlan {
    pub(crate) fn new(planned: PlannedQuery) -> Self {
        CachedPlan {
            tables: table_providers(&planned.plan),
            registered_at: std::sync::atomic::AtomicU64::new(u64::MAX),
            bytes: crate::plan_size::estimated_bytes(&planned.plan),
            deterministic: crate::results_cache::is_deterministic(&planned.plan),
            optimized: OnceLock::new(),
            lookup: OnceLock::new(),
            planned,
        }
    }

    /// True when `values` fill this plan's parameters with exactly the types it expects.
    pub(crate) fn binds(&self, values: &[ScalarValue]) -> bool {
        let fields = self.planned.parameters.fields();
        fields.len() == values.len()
            && fields.iter().zip(values).all(|(f, v)| crate::parameterize::binds_exactly(v, f.data_type()))
    }
}

/// Plans by text, and the shapes that could not be planned with placeholders.
pub(crate) struct PlanCache {
    plans: moka::sync::Cache<String, Arc<CachedPlan>, crate::FastHash>,
    /// Shapes of literal SQL that DataFusion could not plan with placeholders: their texts
    /// are planned as written without trying the shape again.
    refused_shapes: moka::sync::Cache<String, (), crate::FastHash>,
    /// How literal SQL of each skeleton binds its shape's plan without being parsed (see
    /// [`crate::literal_shapes`]).
    recipes: moka::sync::Cache<String, Arc<Recipe>, crate::FastHash>,
    max_text: usize,
}

impl PlanCache {
    /// A cache holding up to `max_bytes` of texts and plans.
    pub(crate) fn new(max_bytes: usize) -> Self {
        PlanCache {
            plans: moka::sync::Cache::builder()
                .max_capacity(max_bytes as u64)
                .weigher(|text: &String, plan: &Arc<CachedPlan>| plan_weight(text, plan))
                .build_with_hasher(crate::FastHash::default()),
            refused_shapes: moka::sync::Cache::builder()
                .max_capacity(max_bytes as u64 / 8)
                .weigher(|text: &String, _: &()| u32::try_from(text.len()).unwrap_or(u32::MAX))
                .build_with_hasher(crate::FastHash::default()),
            recipes: moka::sync::Cache::builder()
                .max_capacity(max_bytes as u64 / 8)
                .weigher(|skeleton: &String, recipe: &Arc<Recipe>| {
                    u32::try_from(recipe.bytes(skeleton)).unwrap_or(u32::MAX)
                })
                .build_with_hasher(crate::FastHash::default()),
            // Longest SQL text kept: 1/256 of the cache (256 KiB by default). Planning such a
            // text costs far more than its lookup saves, and a churn of megabyte entries left
            // the allocator holding several times the cache's bound (measured: 1,200 distinct
            // 900 KB queries, cache at its 64 MiB, RSS +480 MB).
            max_text: max_bytes / 256,
        }
    }

    /// The entry for `key`, if cached (whether its tables are still registered is the
    /// caller's check).
    pub(crate) fn get(&self, key: &str) -> Option<Arc<CachedPlan>> {
        self.plans.get(key)
    }

    /// Keeps `plan` under `key`, unless the text is too large to be worth keeping (it is
    /// planned each time it comes).
    pub(crate) fn insert(&self, key: String, plan: Arc<CachedPlan>) {
        if key.len() <= self.max_text {
            self.plans.insert(key, plan);
        }
    }

    pub(crate) fn is_refused_shape(&self, key: &str) -> bool {
        self.refused_shapes.contains_key(key)
    }

    /// Remembers a shape the planner refused with placeholders.
    pub(crate) fn refuse_shape(&self, key: String) {
        if key.len() <= self.max_text {
            self.refused_shapes.insert(key, ());
        }
    }

    /// The recipe of literal SQL with this skeleton, if one was learned.
    pub(crate) fn recipe(&self, skeleton: &str) -> Option<Arc<Recipe>> {
        self.recipes.get(skeleton)
    }

    /// Remembers how texts of `skeleton` bind their shape (not for a text too large to keep).
    pub(crate) fn learn_recipe(&self, skeleton: String, recipe: Recipe) {
        if skeleton.len() <= self.max_text {
            self.recipes.insert(skeleton, Arc::new(recipe));
        }
    }

    pub(crate) fn entries(&self) -> u64 {
        self.plans.run_pending_tasks();
        self.plans.entry_count()
    }

    /// Bytes charged: each entry's text and estimated plan size.
    pub(crate) fn bytes(&self) -> u64 {
        self.plans.run_pending_tasks();
        self.plans.weighted_size()
    }
}

/// What a plan cache entry is charged against `limits.plan_cache_size`: its SQL text, which
/// the cache keeps as the key, and its plan (see [`crate::plan_size`]).
fn plan_weight(text: &str, plan: &CachedPlan) -> u32 {
    u32::try_from(text.len().saturating_add(plan.bytes)).unwrap_or(u32::MAX)
}

/// Every table the plan scans, with the provider it was planned against.
fn table_providers(plan: &LogicalPlan) -> Vec<(datafusion::common::TableReference, ProviderRef)> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut tables = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = datafusion::catalog::default_table_source::source_as_provider(&scan.source)
        {
            tables.push((scan.table_name.clone(), provider));
        }
        Ok(TreeNodeRecursion::Continue)
    });
    tables
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::Schema;
    use datafusion::logical_expr::LogicalPlanBuilder;

    use super::*;

    fn plan() -> Arc<CachedPlan> {
        let plan = LogicalPlanBuilder::empty(true).build().expect("plan");
        let empty = Arc::new(Schema::empty());
        Arc::new(CachedPlan::new(PlannedQuery { plan, schema: Arc::clone(&empty), parameters: empty }))
    }

    #[test]
    fn keeps_plans_by_text_and_charges_their_bytes_but_not_oversized_texts() {
        let cache = PlanCache::new(256 * 1024);
        cache.insert("SELECT 1".into(), plan());
        assert!(cache.get("SELECT 1").is_some());
        assert_eq!(cache.entries(), 1);
        assert!(cache.bytes() >= "SELECT 1".len() as u64);
        // 1/256 of the cache is the longest text kept.
        let long = format!("SELECT 1 -- {}", "x".repeat(1024));
        cache.insert(long.clone(), plan());
        assert!(cache.get(&long).is_none());
        cache.refuse_shape("SELECT $1".into());
        assert!(cache.is_refused_shape("SELECT $1"));
        cache.refuse_shape(long.clone());
        assert!(!cache.is_refused_shape(&long));
    }

    #[test]
    fn a_plan_binds_only_values_of_the_exact_parameter_types() {
        let entry = plan();
        assert!(entry.binds(&[]));
        assert!(!entry.binds(&[ScalarValue::Int64(Some(1))]), "no parameter to bind");
    }
}
