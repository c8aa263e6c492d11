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

/// What applying a run of batches did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// Indexes (into the run) of the batches applied now; the others had been applied
    /// before and were skipped.
    pub fresh: Vec<usize>,
    pub rows: u64,
}

/// One edge batch: its sequence number and rows.
pub type EdgeBatch = (u64, Vec<RecordBatch>);

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

    /// Applies each batch of `run` (consecutive batches of `edge_id`) whose id was not
    /// applied before, all in one transaction.
    pub async fn apply(&self, edge_id: &str, run: &[EdgeBatch]) -> Result<Applied> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.connect().await?);
        }
        let Some(client) = guard.as_mut() else { return Err(self.error("no connection".into())) };
        let outcome = self.apply_in(client, edge_id, run).await;
        if outcome.is_err() {
            // A failed transaction may leave the connection unusable: reconnect next time.
            *guard = None;
        }
        outcome
    }

    async fn apply_in(&self, client: &mut tokio_postgres::Client, edge_id: &str, run: &[EdgeBatch]) -> Result<Applied> {
        let seqs = run
            .iter()
            .map(|(seq, _)| {
                i64::try_from(*seq).map_err(|_| StrataError::Plan(format!("batch sequence {seq} is too large")))
            })
            .collect::<Result<Vec<i64>>>()?;
        let counts: Vec<i64> =
            run.iter().map(|(_, batches)| batches.iter().map(RecordBatch::num_rows).sum::<usize>() as i64).collect();
        let tx = client.transaction().await.map_err(|e| self.error(e.to_string()))?;
        // The ids are recorded in the same transaction as the rows: a batch is applied
        // exactly when its id is new.
        let inserted = tx
            .query(
                "INSERT INTO strata_ingest_applied (edge_id, seq, dataset, rows)
                 SELECT $1, s, $2, r FROM unnest($3::bigint[], $4::bigint[]) AS t(s, r)
                 ON CONFLICT DO NOTHING RETURNING seq",
                &[&edge_id, &self.dataset, &seqs, &counts],
            )
            .await
            .map_err(|e| self.error(e.to_string()))?;
        let new_ids: std::collections::HashSet<i64> = inserted.iter().map(|row| row.get::<_, i64>(0)).collect();
        let fresh: Vec<usize> = (0..run.len()).filter(|i| new_ids.contains(&seqs[*i])).collect();
        if fresh.len() < run.len() {
            info!(dataset = %self.dataset, edge_id, skipped = run.len() - fresh.len(), "retried upload: batches applied before are not applied again");
        }
        let batches: Vec<&RecordBatch> =
            fresh.iter().flat_map(|i| run[*i].1.iter()).filter(|b| b.num_rows() > 0).collect();
        let rows = self.insert(&tx, &batches).await?;
        tx.commit().await.map_err(|e| self.error(format!("commit failed: {e}")))?;
        Ok(Applied { fresh, rows })
    }

    /// Inserts the rows of `batches` in as few statements as the parameter limit allows.
    async fn insert(&self, tx: &tokio_postgres::Transaction<'_>, batches: &[&RecordBatch]) -> Result<u64> {
        let Some(first) = batches.first() else { return Ok(0) };
        let columns: Vec<String> = first.schema().fields().iter().map(|f| quote(f.name())).collect();
        let width = columns.len().max(1);
        let per_statement = (MAX_PARAMS / width).max(1);
        let mut values: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut tuples: Vec<String> = Vec::new();
        let mut rows = 0u64;
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        for batch in batches {
            for row in 0..batch.num_rows() {
                let mut placeholders = Vec::with_capacity(width);
                for column in batch.columns() {
                    values.push(to_sql(&ScalarValue::try_from_array(column, row)?)?);
                    placeholders.push(format!("${}", values.len()));
                }
                tuples.push(format!("({})", placeholders.join(", ")));
                rows += 1;
                if tuples.len() == per_statement || rows as usize == total {
                    let statement =
                        format!("INSERT INTO {} ({}) VALUES {}", self.table, columns.join(", "), tuples.join(", "));
                    let params: Vec<&(dyn ToSql + Sync)> =
                        values.iter().map(|v| v.as_ref() as &(dyn ToSql + Sync)).collect();
                    tx.execute(&statement, &params).await.map_err(|e| self.error(format!("insert failed: {e}")))?;
                    drop(params);
                    values.clear();
                    tuples.clear();
                }
            }
        }
        Ok(rows)
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
