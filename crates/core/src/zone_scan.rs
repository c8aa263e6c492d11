//! The scan of an accelerated copy: DataFusion's memory scan, plus what the snapshot's zone
//! maps know about its batches.
//!
//! - **Bounds for the planner.** DataFusion's in-memory scan reports row counts and null
//!   counts but no column bounds, so the planner cannot estimate how many rows a join
//!   produces and keeps a join's sides as written. Over Parquet it reads the same bounds from
//!   the footers and swaps them: TPC-H Q18 built its hash table on 6M joined rows over an
//!   accelerated copy where over Parquet it builds on 57 (1.9x slower). This source folds
//!   the zones' min and max into the scan's statistics and, as Parquet does, leaves the
//!   byte size out, so join sides are weighed by estimated rows on both.
//! - **Batches a runtime filter rules out are not read.** A hash join, once its build side
//!   is in, knows which keys its probe side can match (their bounds, and their list when it
//!   is short); a TopK knows the value a row must beat. DataFusion offers such filters to the
//!   scan below; this source takes them and, each time one changes, checks them against the
//!   zones of its partition's batches, skipping those that cannot hold a matching row. A copy
//!   stored in key order (a refresh keeps the source's order) then reads only the batches of
//!   the keys the join looks for. Of the batches it reads, it drops the rows the filters
//!   rule out while they rule out most (see `RowFiltering`). The operator above still
//!   applies its filter to every row it gets, so skipping is only ever a saving.

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{ColumnStatistics, Result, Statistics};
use datafusion::config::ConfigOptions;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::{DataSource, OpenArgs};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::projection::ProjectionExprs;
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_expr_common::physical_expr::{snapshot_generation, snapshot_physical_expr};
use datafusion::physical_expr_common::sort_expr::LexOrdering;
use datafusion::physical_plan::DisplayFormatType;
use datafusion::physical_plan::coop::cooperative;
use datafusion::physical_plan::execution_plan::SchedulingType;
use datafusion::physical_plan::filter::batch_filter;
use datafusion::physical_plan::filter_pushdown::{FilterPushdownPropagation, PushedDown};
use datafusion::physical_plan::joins::HashTableLookupExpr;
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, MetricBuilder};
use futures::Stream;

use crate::zone_map::{BatchZone, ZoneStatistics};

/// The zones of the batches each partition of a scan reads, in the order it reads them.
#[derive(Debug)]
pub struct PartitionZones {
    /// The copy's schema, which the zones describe.
    pub table_schema: SchemaRef,
    pub partitions: Vec<Vec<Arc<BatchZone>>>,
}

/// A [`MemorySourceConfig`] whose statistics carry the bounds of the batches it reads and
/// which skips the batches a runtime filter rules out.
#[derive(Debug, Clone)]
pub struct ZoneMappedSource {
    inner: Arc<MemorySourceConfig>,
    /// Per column of the table (not of the projection): min and max of the scanned batches.
    columns: Arc<Vec<ColumnStatistics>>,
    /// Matches the inner scan's partitions batch for batch; `None` once they were rearranged.
    zones: Option<Arc<PartitionZones>>,
    /// Filters whose value arrives while the query runs (see the module's doc).
    runtime_filters: Vec<Arc<dyn PhysicalExpr>>,
    metrics: ExecutionPlanMetricsSet,
}

impl ZoneMappedSource {
    pub fn new(inner: MemorySourceConfig, columns: Arc<Vec<ColumnStatistics>>, zones: PartitionZones) -> Self {
        let zones = Some(Arc::new(zones)).filter(|z| same_layout(&inner, z));
        Self {
            inner: Arc::new(inner),
            columns,
            zones,
            runtime_filters: Vec::new(),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The same bounds, zones and filters around another memory scan (the inner one
    /// re-projected, limited...); the zones only while its partitions hold the same batches.
    fn around(&self, inner: Arc<dyn DataSource>) -> Arc<dyn DataSource> {
        match inner.downcast_ref::<MemorySourceConfig>() {
            Some(memory) => Arc::new(Self {
                inner: Arc::new(memory.clone()),
                zones: self.zones.clone().filter(|z| same_layout(memory, z)),
                ..self.clone()
            }),
            None => inner,
        }
    }

    /// A stream that skips batches by the runtime filters, where there are filters to apply
    /// and nothing else (a row limit) stands in the way.
    fn pruned(&self, partition: usize) -> Option<SendableRecordBatchStream> {
        if self.runtime_filters.is_empty() || self.inner.fetch().is_some() {
            return None;
        }
        let zones = self.zones.as_ref()?;
        let batches = self.inner.partitions().get(partition)?.clone();
        let partition_zones = zones.partitions.get(partition)?.clone();
        let skipped = MetricBuilder::new(&self.metrics).counter("batches_skipped_by_runtime_filters", partition);
        let removed = MetricBuilder::new(&self.metrics).counter("rows_removed_by_runtime_filters", partition);
        let stream = RuntimePruned {
            schema: self.projected_schema(),
            projection: self.inner.projection().clone(),
            batches,
            zones: ZoneStatistics::new(Arc::clone(&zones.table_schema), partition_zones),
            next: 0,
            filters: self.runtime_filters.clone(),
            generation: 0,
            keep: None,
            rows: RowFiltering::default(),
            skipped,
            removed,
        };
        Some(Box::pin(cooperative(stream)))
    }

    fn projected_schema(&self) -> SchemaRef {
        let table = self.inner.original_schema();
        match self.inner.projection() {
            Some(projection) => Arc::new(table.project(projection).unwrap_or_else(|_| (*table).clone())),
            None => table,
        }
    }
}

/// Whether `zones` describes `memory`'s partitions batch for batch.
fn same_layout(memory: &MemorySourceConfig, zones: &PartitionZones) -> bool {
    memory.partitions().len() == zones.partitions.len()
        && memory.partitions().iter().zip(&zones.partitions).all(|(batches, zones)| batches.len() == zones.len())
}

impl DataSource for ZoneMappedSource {
    fn open(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        match self.pruned(partition) {
            Some(stream) => Ok(stream),
            None => self.inner.open(partition, context),
        }
    }

    fn open_with_args(&self, args: OpenArgs) -> Result<SendableRecordBatchStream> {
        match self.pruned(args.partition) {
            Some(stream) => Ok(stream),
            None => self.inner.open_with_args(args),
        }
    }

    fn metrics(&self) -> ExecutionPlanMetricsSet {
        self.metrics.clone()
    }

    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.fmt_as(t, f)?;
        if !self.runtime_filters.is_empty() && !matches!(t, DisplayFormatType::TreeRender) {
            let filters: Vec<String> = self.runtime_filters.iter().map(|f| f.to_string()).collect();
            write!(f, ", runtime_filters=[{}]", filters.join(", "))?;
        }
        Ok(())
    }

    fn repartitioned(
        &self,
        target_partitions: usize,
        repartition_file_min_size: usize,
        output_ordering: Option<LexOrdering>,
    ) -> Result<Option<Arc<dyn DataSource>>> {
        Ok(self
            .inner
            .repartitioned(target_partitions, repartition_file_min_size, output_ordering)?
            .map(|inner| self.around(inner)))
    }

    fn output_partitioning(&self) -> Partitioning {
        self.inner.output_partitioning()
    }

    fn eq_properties(&self) -> EquivalenceProperties {
        self.inner.eq_properties()
    }

    fn scheduling_type(&self) -> SchedulingType {
        self.inner.scheduling_type()
    }

    /// The memory scan's statistics (rows, null counts; no byte size) with each projected
    /// column's bounds, for the whole scan; a single partition's get no bounds.
    fn partition_statistics(&self, partition: Option<usize>) -> Result<Arc<Statistics>> {
        let mut statistics = Arc::unwrap_or_clone(self.inner.partition_statistics(partition)?);
        // No byte size, as over Parquet: the planner then weighs a join's sides by their
        // estimated rows. With the copy's exact in-memory bytes it built TPC-H Q12's join on
        // all 1.5M orders (37.8 MB) rather than the 1.2M estimated rows of filtered
        // lineitem (43.8 MB of 219 MB); 31k of those rows pass.
        statistics.total_byte_size = Precision::Absent;
        if partition.is_some() {
            return Ok(Arc::new(statistics));
        }
        let projected: Vec<usize> = match self.inner.projection() {
            Some(projection) => projection.clone(),
            None => (0..self.columns.len()).collect(),
        };
        if projected.len() != statistics.column_statistics.len() {
            return Ok(Arc::new(statistics));
        }
        for (column, table_column) in statistics.column_statistics.iter_mut().zip(projected) {
            if let Some(bounds) = self.columns.get(table_column) {
                column.min_value = bounds.min_value.clone();
                column.max_value = bounds.max_value.clone();
            }
        }
        Ok(Arc::new(statistics))
    }

    fn with_fetch(&self, limit: Option<usize>) -> Option<Arc<dyn DataSource>> {
        self.inner.with_fetch(limit).map(|inner| self.around(inner))
    }

    fn fetch(&self) -> Option<usize> {
        self.inner.fetch()
    }

    fn try_swapping_with_projection(&self, projection: &ProjectionExprs) -> Result<Option<Arc<dyn DataSource>>> {
        Ok(self.inner.try_swapping_with_projection(projection)?.map(|inner| self.around(inner)))
    }

    /// Keeps the runtime filters among `filters` to skip batches with, and reports every
    /// filter as not pushed down: the operator that offered it still applies it to the rows.
    /// (Static filters were already used by the scan itself, against the logical plan.)
    fn try_pushdown_filters(
        &self,
        filters: Vec<Arc<dyn PhysicalExpr>>,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn DataSource>>> {
        let runtime: Vec<Arc<dyn PhysicalExpr>> =
            filters.iter().filter(|f| snapshot_generation(f) != 0).cloned().collect();
        let propagation = FilterPushdownPropagation::with_parent_pushdown_result(vec![PushedDown::No; filters.len()]);
        if runtime.is_empty() || self.zones.is_none() {
            return Ok(propagation);
        }
        let mut with_filters = self.clone();
        with_filters.runtime_filters.extend(runtime);
        Ok(propagation.with_updated_node(Arc::new(with_filters)))
    }

    fn with_preserve_order(&self, preserve_order: bool) -> Option<Arc<dyn DataSource>> {
        self.inner.with_preserve_order(preserve_order).map(|inner| self.around(inner))
    }

    /// The runtime filters too: a hash join computes its filter only when it finds the
    /// filter's expression among those of its probe side's plan.
    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        for filter in &self.runtime_filters {
            if f(filter)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        self.inner.apply_expressions(f)
    }

    fn with_new_state(&self, state: Arc<dyn Any + Send + Sync>) -> Option<Arc<dyn DataSource>> {
        self.inner.with_new_state(state).map(|inner| self.around(inner))
    }

    fn create_sibling_state(&self, config: &ConfigOptions) -> Option<Arc<dyn Any + Send + Sync>> {
        self.inner.create_sibling_state(config)
    }
}

/// One partition's batches, each read only if the runtime filters, as they are when it is
/// reached, may match a row of it.
struct RuntimePruned {
    /// The projected schema the stream yields.
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    batches: Vec<RecordBatch>,
    zones: ZoneStatistics,
    next: usize,
    filters: Vec<Arc<dyn PhysicalExpr>>,
    /// The filters' generation `keep` was computed for (0: not yet).
    generation: u64,
    /// Which batches may match, by the filters' last value; `None` keeps them all.
    keep: Option<Vec<bool>>,
    rows: RowFiltering,
    skipped: Count,
    removed: Count,
}

/// Rows of a kept batch the filters rule out are dropped too, while the filters drop many.
///
/// Why: a join's build side that a runtime filter thinned is built from fewer rows, so its
/// own runtime filter lists fewer keys and skips more batches further down. In TPC-H Q18
/// the `IN (subquery)` join's 57 orders keep 48 of orders' 192 batches, 389k rows; dropping
/// the other rows leaves orders ⋈ lineitem a build side of 57 rows, whose key list then
/// skips all but a few dozen of lineitem's 742 batches. Where a filter lets most rows
/// through (a join whose build side holds most keys), evaluating it is wasted work the
/// operator above repeats, so it stops after a trial; and a join filter that looks keys up
/// in the join's hash table (a build side of more than 150 keys per partition, DataFusion's
/// `hash_join_inlist_pushdown_max_distinct_values`) is not evaluated at all: hashing every
/// scanned row for it cost more than the join's own probe saved (TPC-H Q04, 1.74x slower).
#[derive(Debug, Default)]
struct RowFiltering {
    /// The filters, as they are now, cheap enough to check on every row.
    filters: Vec<Arc<dyn PhysicalExpr>>,
    /// Rows checked and rows let through since the filters last changed.
    checked: usize,
    passed: usize,
    /// Set once the trial showed the filters let through most rows, or one failed.
    stopped: bool,
}

/// Rows a row filter is tried on before its selectivity decides whether it goes on.
const ROW_FILTER_TRIAL_ROWS: usize = 32 * 1024;

impl RowFiltering {
    /// Row filtering by those of `filters` (snapshots) that hold no hash table lookup.
    fn of(filters: &[Arc<dyn PhysicalExpr>]) -> Self {
        let cheap = |filter: &Arc<dyn PhysicalExpr>| {
            !filter.exists(|e| Ok(e.downcast_ref::<HashTableLookupExpr>().is_some())).unwrap_or(true)
        };
        Self { filters: filters.iter().filter(|f| cheap(f)).cloned().collect(), ..Self::default() }
    }

    /// Whether the rows are still worth checking.
    fn active(&self) -> bool {
        !self.filters.is_empty()
            && !self.stopped
            && (self.checked < ROW_FILTER_TRIAL_ROWS || self.passed * 2 <= self.checked)
    }
}

impl RuntimePruned {
    /// Recomputes which batches may match when a filter changed since the last check.
    fn refresh(&mut self) {
        let generation = self.filters.iter().fold(0u64, |sum, f| sum.wrapping_add(snapshot_generation(f)));
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        // The filters as they are now: static expressions, read without a lock per batch.
        let now: Vec<Arc<dyn PhysicalExpr>> =
            self.filters.iter().filter_map(|f| snapshot_physical_expr(Arc::clone(f)).ok()).collect();
        self.rows = RowFiltering::of(&now);
        let mut keep: Option<Vec<bool>> = None;
        for filter in now {
            let Some(matching) = self.zones.matching(filter, &self.schema) else { continue };
            keep = Some(match keep {
                Some(so_far) => so_far.iter().zip(matching).map(|(a, b)| *a && b).collect(),
                None => matching,
            });
        }
        self.keep = keep;
    }

    /// `batch` without the rows the filters rule out (while that is worth it; see
    /// [`RowFiltering`]); `None` when none is left.
    fn filter_rows(&mut self, batch: RecordBatch) -> Option<RecordBatch> {
        if !self.rows.active() {
            return Some(batch);
        }
        let before = batch.num_rows();
        let mut kept = batch.clone();
        for filter in &self.rows.filters {
            match batch_filter(&kept, filter) {
                Ok(filtered) => kept = filtered,
                Err(err) => {
                    // Only a saving: the operator above applies the filter itself.
                    tracing::debug!(%err, "a runtime filter could not be evaluated on a scanned batch");
                    self.rows.stopped = true;
                    return Some(batch);
                }
            }
        }
        self.rows.checked += before;
        self.rows.passed += kept.num_rows();
        self.removed.add(before - kept.num_rows());
        (kept.num_rows() > 0).then_some(kept)
    }
}

impl Stream for RuntimePruned {
    type Item = Result<RecordBatch>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while this.next < this.batches.len() {
            let index = this.next;
            this.next += 1;
            this.refresh();
            if this.keep.as_ref().is_some_and(|keep| !keep.get(index).copied().unwrap_or(true)) {
                this.skipped.add(1);
                continue;
            }
            let batch = &this.batches[index];
            let batch = match &this.projection {
                Some(projection) => match batch.project(projection) {
                    Ok(batch) => batch,
                    Err(err) => return Poll::Ready(Some(Err(err.into()))),
                },
                None => batch.clone(),
            };
            match this.filter_rows(batch) {
                Some(batch) => return Poll::Ready(Some(Ok(batch))),
                None => continue,
            }
        }
        Poll::Ready(None)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.batches.len() - self.next))
    }
}

impl RecordBatchStream for RuntimePruned {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}
