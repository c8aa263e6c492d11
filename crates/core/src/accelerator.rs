//! The in-memory Arrow accelerator: a dataset's local copy as immutable snapshots.
//!
//! A refresh builds a complete new snapshot and swaps one `Arc`, so a query sees either the
//! old copy or the new one, never an empty or half-loaded table; queries already running
//! keep the snapshot they started with.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use crate::error::StrataError;

/// One immutable version of an accelerated dataset.
#[derive(Debug)]
pub struct Snapshot {
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    /// Arrow buffer memory held by the batches.
    pub bytes: usize,
    /// Increases by one with every change of content.
    pub version: u64,
    pub refreshed_at: SystemTime,
}

impl Snapshot {
    /// A snapshot over `batches`, with row and byte counts derived from them.
    pub fn new(batches: Vec<RecordBatch>, version: u64) -> Self {
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        let rows = batches.iter().map(RecordBatch::num_rows).sum();
        let bytes = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        Self { batches, rows, bytes, version, refreshed_at: SystemTime::now() }
    }
}

/// A table provider serving the current snapshot of one dataset.
#[derive(Debug)]
pub struct AcceleratedTable {
    name: String,
    schema: SchemaRef,
    current: RwLock<Option<Arc<Snapshot>>>,
}

impl AcceleratedTable {
    /// An accelerated table that is not loaded yet: queries fail with "still loading".
    pub fn new(name: impl Into<String>, schema: SchemaRef) -> Self {
        Self { name: name.into(), schema, current: RwLock::new(None) }
    }

    /// The snapshot queries read now, if the first load has finished.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes a new snapshot atomically.
    pub fn swap(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        let snapshot = Arc::new(snapshot);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&snapshot));
        snapshot
    }
}

#[async_trait]
impl TableProvider for AcceleratedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let snapshot = self.snapshot().ok_or_else(|| StrataError::DatasetUnavailable {
            name: self.name.clone(),
            reason: "its first load has not finished".into(),
        })?;
        // Spread batches round-robin so every core gets a share of the scan.
        let partitions = state.config().target_partitions().max(1).min(snapshot.batches.len().max(1));
        let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); partitions];
        for (i, batch) in snapshot.batches.iter().enumerate() {
            parts[i % partitions].push(batch.clone());
        }
        let source =
            MemorySourceConfig::try_new(&parts, Arc::clone(&self.schema), projection.cloned())?.with_limit(limit);
        Ok(datafusion::datasource::source::DataSourceExec::from_data_source(source))
    }
}
