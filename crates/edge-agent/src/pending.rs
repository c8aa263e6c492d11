//! The rows an edge wrote and the platform has not confirmed yet, as a table local queries
//! union in (read-your-writes).
//!
//! A write appends and a confirmation drops a prefix, both without touching the rest of the
//! backlog: during a long outage the cost of a write stays flat however many rows wait.
//! Small writes are coalesced into larger batches so a scan of a large backlog stays fast.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

/// Small writes are merged once this many rows wait in the tail.
const COALESCE_ROWS: usize = 8192;

/// Unconfirmed rows of one dataset, oldest first.
#[derive(Debug, Default)]
struct Rows {
    /// Coalesced batches, older than every batch of `tail`.
    chunks: VecDeque<RecordBatch>,
    tail: Vec<RecordBatch>,
    tail_rows: usize,
    /// (sequence number, rows) of every unconfirmed write, in order.
    writes: VecDeque<(u64, usize)>,
}

impl Rows {
    fn push(&mut self, seq: u64, batches: &[RecordBatch]) -> Result<(), arrow::error::ArrowError> {
        let rows = batches.iter().map(RecordBatch::num_rows).sum();
        self.writes.push_back((seq, rows));
        self.tail.extend(batches.iter().cloned());
        self.tail_rows += rows;
        if self.tail_rows >= COALESCE_ROWS {
            let merged = arrow::compute::concat_batches(&self.tail[0].schema(), &self.tail)?;
            self.chunks.push_back(merged);
            self.tail.clear();
            self.tail_rows = 0;
        }
        Ok(())
    }

    /// Drops the rows of every write up to and including `seq`.
    fn confirm_through(&mut self, seq: u64) {
        let mut drop_rows = 0;
        while let Some(&(_, rows)) = self.writes.front().filter(|(s, _)| *s <= seq) {
            drop_rows += rows;
            self.writes.pop_front();
        }
        while drop_rows > 0 {
            let (batch, in_tail) = match self.chunks.front_mut() {
                Some(chunk) => (chunk, false),
                None => match self.tail.first_mut() {
                    Some(batch) => (batch, true),
                    None => break,
                },
            };
            let n = batch.num_rows().min(drop_rows);
            let whole = n == batch.num_rows();
            if !whole {
                *batch = batch.slice(n, batch.num_rows() - n);
            }
            drop_rows -= n;
            match (in_tail, whole) {
                (false, true) => drop(self.chunks.pop_front()),
                (true, true) => drop(self.tail.remove(0)),
                _ => {}
            }
            if in_tail {
                self.tail_rows -= n;
            }
        }
    }

    fn batches(&self) -> Vec<RecordBatch> {
        self.chunks.iter().chain(&self.tail).cloned().collect()
    }
}

/// A writable dataset's unconfirmed rows.
#[derive(Debug)]
pub struct PendingTable {
    schema: SchemaRef,
    rows: Mutex<Rows>,
}

impl PendingTable {
    pub fn new(schema: SchemaRef) -> Arc<Self> {
        Arc::new(Self { schema, rows: Mutex::new(Rows::default()) })
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, Rows> {
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the rows of write `seq` (called in sequence order).
    pub fn push(&self, seq: u64, batches: &[RecordBatch]) -> Result<(), arrow::error::ArrowError> {
        self.rows().push(seq, batches)
    }

    /// Forgets the rows of every write the platform confirmed, up to `seq`.
    pub fn confirm_through(&self, seq: u64) {
        self.rows().confirm_through(seq);
    }

    /// Rows waiting for confirmation.
    pub fn len(&self) -> usize {
        self.rows().writes.iter().map(|(_, rows)| rows).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rows().writes.is_empty()
    }
}

#[async_trait]
impl TableProvider for PendingTable {
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
        let batches = self.rows().batches();
        strata_core::accelerator::memory_scan(state, &self.schema, &batches, projection, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(values: std::ops::Range<i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(values))]).expect("batch")
    }

    fn values(rows: &Rows) -> Vec<i64> {
        rows.batches()
            .iter()
            .flat_map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().expect("i64").values().to_vec())
            .collect()
    }

    #[test]
    fn confirming_drops_exactly_the_confirmed_writes_across_coalesced_chunks() {
        let mut rows = Rows::default();
        // 3000-row writes: every third write coalesces the tail into a chunk.
        for seq in 1..=7u64 {
            let start = (seq as i64 - 1) * 3000;
            rows.push(seq, &[batch(start..start + 3000)]).expect("push");
        }
        assert!(!rows.chunks.is_empty(), "small writes were coalesced");
        rows.confirm_through(2);
        assert_eq!(values(&rows), (6000..21_000).collect::<Vec<_>>());
        rows.confirm_through(5);
        assert_eq!(values(&rows), (15_000..21_000).collect::<Vec<_>>());
        rows.push(8, &[batch(21_000..21_010)]).expect("push");
        rows.confirm_through(7);
        assert_eq!(values(&rows), (21_000..21_010).collect::<Vec<_>>());
        rows.confirm_through(8);
        assert!(values(&rows).is_empty() && rows.writes.is_empty() && rows.tail_rows == 0);
    }
}
