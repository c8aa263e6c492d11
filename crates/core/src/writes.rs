//! Writes accepted by a tier (edge agents): the hook the HTTP and Flight ingest endpoints
//! call, implemented by the tier that owns a durable log.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use serde::Serialize;

use crate::error::Result;

/// What a client gets back once its write is durable.
#[derive(Debug, Clone, Serialize)]
pub struct WriteReceipt {
    pub dataset: String,
    /// The batch's sequence number in this agent's log (its upload id, with the agent id).
    pub seq: u64,
    pub rows: u64,
}

/// Accepts rows into writable datasets; `write` returns only once they are durable.
#[async_trait]
pub trait LocalWrites: Send + Sync {
    /// The schema rows of `dataset` must have; an error names a dataset that is not writable here.
    fn schema(&self, dataset: &str) -> Result<SchemaRef>;

    async fn write(&self, dataset: &str, batches: Vec<RecordBatch>) -> Result<WriteReceipt>;
}

/// `batch` with exactly `schema` (same column names and types, in order; nullability and
/// metadata taken from `schema`), or an error naming the first column that differs.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef, dataset: &str) -> Result<RecordBatch> {
    use crate::error::StrataError;
    let got = batch.schema();
    let describe = |s: &arrow::datatypes::Schema| {
        s.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
    };
    let same = got.fields().len() == schema.fields().len()
        && got
            .fields()
            .iter()
            .zip(schema.fields())
            .all(|(g, e)| g.name() == e.name() && g.data_type() == e.data_type());
    if !same {
        return Err(StrataError::Plan(format!(
            "rows for `{dataset}` do not match its columns: expected ({}), got ({})",
            describe(schema),
            describe(&got)
        )));
    }
    RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
        .map_err(|e| StrataError::Plan(format!("rows for `{dataset}`: {e}")))
}
