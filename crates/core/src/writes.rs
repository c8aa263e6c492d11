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

    /// Writes the upstream refused for good, set aside and kept (by dataset).
    fn dead_letters(&self) -> Vec<DeadLetterStatus> {
        Vec::new()
    }

    /// Writes acknowledged here and not yet confirmed upstream.
    fn backlog(&self) -> Backlog {
        Backlog::default()
    }
}

/// Acknowledged writes waiting for the upstream: what an operator watches during an outage
/// (and a test waits on to know an upload has finished).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Backlog {
    /// Batches in the log not confirmed upstream.
    pub records: u64,
    /// Their size in the log, bytes.
    pub bytes: u64,
    /// Seconds since the oldest of them was accepted (the upload lag); `None` when none waits.
    pub oldest_seconds: Option<f64>,
}

/// Writes of one dataset that the upstream refused permanently, kept on disk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeadLetterStatus {
    pub dataset: String,
    /// Batches set aside.
    pub records: u64,
    pub rows: u64,
    /// The upstream's error for the latest of them.
    pub last_error: String,
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

/// Rows of a CSV body with a header line, mapped to `schema`'s columns by the header's
/// names (in any order, any case): a name that is no column, a column named twice, or a
/// non-nullable column left out is refused, naming it; nullable columns left out are NULL.
pub fn read_csv(body: &[u8], schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
    use std::sync::Arc;

    use arrow::datatypes::Schema;

    use crate::error::StrataError;
    let bad = |e: arrow::error::ArrowError| StrataError::InvalidRequest(format!("cannot read the CSV body: {e}"));
    let format = arrow::csv::reader::Format::default().with_header(true);
    let (header, _) = format.infer_schema(std::io::Cursor::new(body), Some(0)).map_err(bad)?;
    let mut positions = Vec::with_capacity(header.fields().len());
    for field in header.fields() {
        let name = field.name().trim();
        let Some((index, _)) = schema
            .fields()
            .find(name)
            .or_else(|| schema.fields().iter().enumerate().find(|(_, f)| f.name().eq_ignore_ascii_case(name)))
        else {
            let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(StrataError::InvalidRequest(format!(
                "the CSV header names `{name}`, which is not a column (columns: {})",
                columns.join(", ")
            )));
        };
        if positions.contains(&index) {
            return Err(StrataError::InvalidRequest(format!(
                "the CSV header names column `{}` twice",
                schema.field(index).name()
            )));
        }
        positions.push(index);
    }
    if let Some(missing) =
        schema.fields().iter().enumerate().find(|(i, f)| !f.is_nullable() && !positions.contains(i)).map(|(_, f)| f)
    {
        return Err(StrataError::InvalidRequest(format!(
            "the CSV header lacks column `{}`, which may not be NULL",
            missing.name()
        )));
    }
    // Read the columns in the order the body has them, then place each where the table has it.
    let file_schema = Arc::new(Schema::new(
        positions.iter().map(|i| schema.field(*i).clone().with_nullable(true)).collect::<Vec<_>>(),
    ));
    let reader =
        arrow::csv::ReaderBuilder::new(file_schema).with_header(true).build(std::io::Cursor::new(body)).map_err(bad)?;
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(bad)?;
        let columns = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, field)| match positions.iter().position(|p| *p == i) {
                Some(at) => Arc::clone(batch.column(at)),
                None => arrow::array::new_null_array(field.data_type(), batch.num_rows()),
            })
            .collect();
        batches.push(
            RecordBatch::try_new(Arc::clone(schema), columns)
                .map_err(|e| StrataError::InvalidRequest(format!("cannot read the CSV body: {e}")))?,
        );
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("sensor", DataType::Utf8, true),
            Field::new("value", DataType::Float64, true),
        ]))
    }

    #[test]
    fn csv_columns_are_mapped_by_header_name() {
        let batches = read_csv(b"value,sensor,id\n7.5,s1,42\n", &schema()).expect("csv");
        let batch = &batches[0];
        assert_eq!(batch.column(0).as_primitive::<Int64Type>(), &Int64Array::from(vec![42]));
        assert_eq!(batch.column(1).as_string::<i32>().value(0), "s1");
        assert_eq!(batch.column(2).as_primitive::<arrow::datatypes::Float64Type>().value(0), 7.5);
        // A nullable column left out is NULL.
        let batches = read_csv(b"id\n1\n", &schema()).expect("csv");
        assert!(batches[0].column(2).is_null(0));
    }

    #[test]
    fn unknown_repeated_and_missing_csv_columns_are_refused_by_name() {
        let err = read_csv(b"id,vaule\n1,2\n", &schema()).expect_err("unknown");
        assert!(err.to_string().contains("`vaule`"), "{err}");
        let err = read_csv(b"id,ID\n1,2\n", &schema()).expect_err("twice");
        assert!(err.to_string().contains("`id` twice"), "{err}");
        let err = read_csv(b"sensor,value\ns,1\n", &schema()).expect_err("missing");
        assert!(err.to_string().contains("lacks column `id`"), "{err}");
    }
}
