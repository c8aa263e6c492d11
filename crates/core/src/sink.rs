//! Edge writes applied to a platform dataset's PostgreSQL table, exactly once.
//!
//! Every batch carries an id (edge id, sequence). The id is recorded in
//! `strata_ingest_applied` in the same transaction as the rows, so a batch retried after a
//! crash between commit and acknowledgement finds its id and is not applied again.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tracing::{info, warn};

use crate::config::{DatasetConfig, SourceRef};
use crate::error::{Result, StrataError};

/// PostgreSQL allows 65535 parameters per statement.
const MAX_PARAMS: usize = 60_000;

/// What applying one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The id had been applied before; nothing was written this time.
    pub duplicate: bool,
    pub rows: u64,
}

/// The writer of one writable dataset's table.
pub struct PostgresSink {
    dataset: String,
    table: String,
    connection: String,
    client: Mutex<Option<tokio_postgres::Client>>,
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl PostgresSink {
    /// The sink of a `writable` PostgreSQL dataset.
    pub fn new(config: &DatasetConfig) -> Option<Self> {
        let SourceRef::Postgres { schema, table } = &config.from else { return None };
        if !config.writable {
            return None;
        }
        let table = match schema {
            Some(s) => format!("{}.{}", quote(s), quote(table)),
            None => quote(table),
        };
        Some(Self {
            dataset: config.name.clone(),
            table,
            connection: connection_string(&config.params),
            client: Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.connection, tokio_postgres::NoTls)
            .await
            .map_err(|e| self.error(format!("cannot connect: {e}")))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                warn!(error = %err, "sink connection closed");
            }
        });
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS strata_ingest_applied (
                    edge_id text NOT NULL, seq bigint NOT NULL, dataset text NOT NULL, rows bigint NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (edge_id, seq))",
            )
            .await
            .map_err(|e| self.error(format!("cannot create strata_ingest_applied: {e}")))?;
        Ok(client)
    }

    fn error(&self, message: String) -> StrataError {
        StrataError::Source { dataset: self.dataset.clone(), message }
    }

    /// Applies `batches` as batch `(edge_id, seq)` unless that id was applied before.
    pub async fn apply(&self, edge_id: &str, seq: u64, batches: &[RecordBatch]) -> Result<Applied> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.connect().await?);
        }
        let Some(client) = guard.as_mut() else { return Err(self.error("no connection".into())) };
        let outcome = self.apply_in(client, edge_id, seq, batches).await;
        if outcome.is_err() {
            // A failed transaction may leave the connection unusable: reconnect next time.
            *guard = None;
        }
        outcome
    }

    async fn apply_in(
        &self,
        client: &mut tokio_postgres::Client,
        edge_id: &str,
        seq: u64,
        batches: &[RecordBatch],
    ) -> Result<Applied> {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let seq_i64 =
            i64::try_from(seq).map_err(|_| StrataError::Plan(format!("batch sequence {seq} is too large")))?;
        let tx = client.transaction().await.map_err(|e| self.error(e.to_string()))?;
        let fresh = tx
            .execute(
                "INSERT INTO strata_ingest_applied (edge_id, seq, dataset, rows) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&edge_id, &seq_i64, &self.dataset, &(rows as i64)],
            )
            .await
            .map_err(|e| self.error(e.to_string()))?;
        if fresh == 0 {
            tx.rollback().await.map_err(|e| self.error(e.to_string()))?;
            info!(dataset = %self.dataset, edge_id, seq, "duplicate upload acknowledged, not applied again");
            return Ok(Applied { duplicate: true, rows: 0 });
        }
        for batch in batches.iter().filter(|b| b.num_rows() > 0) {
            let columns: Vec<String> = batch.schema().fields().iter().map(|f| quote(f.name())).collect();
            let width = columns.len().max(1);
            let per_statement = (MAX_PARAMS / width).max(1);
            let mut start = 0;
            while start < batch.num_rows() {
                let end = (start + per_statement).min(batch.num_rows());
                let mut values: Vec<Box<dyn ToSql + Sync + Send>> = Vec::with_capacity((end - start) * width);
                let mut tuples = Vec::with_capacity(end - start);
                for row in start..end {
                    let mut placeholders = Vec::with_capacity(width);
                    for column in batch.columns() {
                        values.push(to_sql(&ScalarValue::try_from_array(column, row)?)?);
                        placeholders.push(format!("${}", values.len()));
                    }
                    tuples.push(format!("({})", placeholders.join(", ")));
                }
                let statement =
                    format!("INSERT INTO {} ({}) VALUES {}", self.table, columns.join(", "), tuples.join(", "));
                let params: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| v.as_ref() as &(dyn ToSql + Sync)).collect();
                tx.execute(&statement, &params).await.map_err(|e| self.error(format!("insert failed: {e}")))?;
                start = end;
            }
        }
        tx.commit().await.map_err(|e| self.error(format!("commit failed: {e}")))?;
        Ok(Applied { duplicate: false, rows: rows as u64 })
    }
}

fn connection_string(params: &BTreeMap<String, String>) -> String {
    if let Some(conn) = params.get("connection_string") {
        return conn.clone();
    }
    let mut parts = Vec::new();
    for (key, name) in
        [("host", "host"), ("port", "port"), ("user", "user"), ("password", "password"), ("db", "dbname")]
    {
        if let Some(v) = params.get(key) {
            parts.push(format!("{name}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")));
        }
    }
    parts.join(" ")
}

/// One Arrow value as a PostgreSQL parameter of the matching type.
fn to_sql(value: &ScalarValue) -> Result<Box<dyn ToSql + Sync + Send>> {
    use chrono::{DateTime, NaiveDate, Utc};
    let unsupported = || StrataError::NotSupported(format!("writing {} values to PostgreSQL", value.data_type()));
    Ok(match value {
        ScalarValue::Boolean(v) => Box::new(*v),
        ScalarValue::Int8(v) => Box::new(v.map(i16::from)),
        ScalarValue::Int16(v) => Box::new(*v),
        ScalarValue::Int32(v) => Box::new(*v),
        ScalarValue::Int64(v) => Box::new(*v),
        ScalarValue::UInt8(v) => Box::new(v.map(i16::from)),
        ScalarValue::UInt16(v) => Box::new(v.map(i32::from)),
        ScalarValue::UInt32(v) => Box::new(v.map(i64::from)),
        ScalarValue::Float32(v) => Box::new(*v),
        ScalarValue::Float64(v) => Box::new(*v),
        ScalarValue::Utf8(v) | ScalarValue::Utf8View(v) | ScalarValue::LargeUtf8(v) => Box::new(v.clone()),
        ScalarValue::Binary(v) | ScalarValue::LargeBinary(v) | ScalarValue::BinaryView(v) => Box::new(v.clone()),
        ScalarValue::Date32(v) => Box::new(
            v.map(|d| NaiveDate::from_num_days_from_ce_opt(d + 719_163))
                .map(|d| d.ok_or_else(unsupported))
                .transpose()?,
        ),
        ScalarValue::TimestampSecond(..)
        | ScalarValue::TimestampMillisecond(..)
        | ScalarValue::TimestampMicrosecond(..)
        | ScalarValue::TimestampNanosecond(..) => {
            let DataType::Timestamp(unit, tz) = value.data_type() else { return Err(unsupported()) };
            let micros = match value.cast_to(&DataType::Timestamp(TimeUnit::Microsecond, tz.clone()))? {
                ScalarValue::TimestampMicrosecond(v, _) => v,
                _ => return Err(unsupported()),
            };
            let _ = unit;
            let at = micros.map(|m| DateTime::<Utc>::from_timestamp_micros(m).ok_or_else(unsupported)).transpose()?;
            match tz {
                Some(_) => Box::new(at),
                None => Box::new(at.map(|t| t.naive_utc())),
            }
        }
        _ => return Err(unsupported()),
    })
}
