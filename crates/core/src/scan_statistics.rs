//! A scan of an accelerated copy that reports each column's min and max to the planner.
//!
//! DataFusion's in-memory scan reports row counts and null counts but no column bounds, so
//! the planner cannot estimate how many rows a join produces and keeps a join's sides as
//! written. Over Parquet it reads the same bounds from the footers and swaps them: TPC-H
//! Q18 built its hash table on 6M joined rows over an accelerated copy where over Parquet
//! it builds on 57 (1.9x slower). The snapshot's zone maps hold every batch's bounds; this
//! wrapper folds them into the scan's statistics and leaves everything else to the memory
//! scan it wraps.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{ColumnStatistics, Result, Statistics};
use datafusion::config::ConfigOptions;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::{DataSource, OpenArgs};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::projection::ProjectionExprs;
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_expr_common::sort_expr::LexOrdering;
use datafusion::physical_plan::DisplayFormatType;
use datafusion::physical_plan::execution_plan::SchedulingType;
use datafusion::physical_plan::filter_pushdown::FilterPushdownPropagation;

/// A [`MemorySourceConfig`] whose statistics carry the bounds of the batches it reads.
#[derive(Debug, Clone)]
pub struct BoundedMemorySource {
    inner: Arc<MemorySourceConfig>,
    /// Per column of the table (not of the projection): min and max of the scanned batches.
    columns: Arc<Vec<ColumnStatistics>>,
}

impl BoundedMemorySource {
    pub fn new(inner: MemorySourceConfig, columns: Arc<Vec<ColumnStatistics>>) -> Self {
        Self { inner: Arc::new(inner), columns }
    }

    /// The same bounds around another memory scan (the inner one re-projected, limited...).
    fn around(&self, inner: Arc<dyn DataSource>) -> Arc<dyn DataSource> {
        match inner.downcast_ref::<MemorySourceConfig>() {
            Some(memory) => Arc::new(Self { inner: Arc::new(memory.clone()), columns: Arc::clone(&self.columns) }),
            None => inner,
        }
    }
}

impl DataSource for BoundedMemorySource {
    fn open(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        self.inner.open(partition, context)
    }

    fn open_with_args(&self, args: OpenArgs) -> Result<SendableRecordBatchStream> {
        self.inner.open_with_args(args)
    }

    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.fmt_as(t, f)
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

    /// The memory scan's statistics (rows, bytes, null counts) with each projected column's
    /// bounds, for the whole scan; a single partition's are left as they are.
    fn partition_statistics(&self, partition: Option<usize>) -> Result<Arc<Statistics>> {
        let statistics = self.inner.partition_statistics(partition)?;
        if partition.is_some() {
            return Ok(statistics);
        }
        let projected: Vec<usize> = match self.inner.projection() {
            Some(projection) => projection.clone(),
            None => (0..self.columns.len()).collect(),
        };
        if projected.len() != statistics.column_statistics.len() {
            return Ok(statistics);
        }
        let mut statistics = Arc::unwrap_or_clone(statistics);
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

    fn try_pushdown_filters(
        &self,
        filters: Vec<Arc<dyn PhysicalExpr>>,
        config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn DataSource>>> {
        let mut propagation = self.inner.try_pushdown_filters(filters, config)?;
        propagation.updated_node = propagation.updated_node.map(|inner| self.around(inner));
        Ok(propagation)
    }

    fn with_preserve_order(&self, preserve_order: bool) -> Option<Arc<dyn DataSource>> {
        self.inner.with_preserve_order(preserve_order).map(|inner| self.around(inner))
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.inner.apply_expressions(f)
    }

    fn with_new_state(&self, state: Arc<dyn Any + Send + Sync>) -> Option<Arc<dyn DataSource>> {
        self.inner.with_new_state(state).map(|inner| self.around(inner))
    }

    fn create_sibling_state(&self, config: &ConfigOptions) -> Option<Arc<dyn Any + Send + Sync>> {
        self.inner.create_sibling_state(config)
    }
}
