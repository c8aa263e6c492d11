//! Stateless statement handles: a handle carries the SQL (and bound parameters), so any
//! replica can execute it and nothing is parked in server memory between calls.

use arrow::array::RecordBatch;
use arrow::ipc::writer::StreamWriter;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use datafusion::common::ScalarValue;
use serde::{Deserialize, Serialize};
use tonic::Status;

/// What a prepared-statement handle or statement ticket carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatementHandle {
    /// Format version, so a handle from an older replica is rejected clearly.
    pub v: u8,
    pub sql: String,
    /// Bound parameters as a base64 Arrow IPC stream; one execution per row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// The run GetFlightInfo started for this ticket on the replica that answered it (see
    /// [`super::prefetch`]); without it, or elsewhere, DoGet executes the statement itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
}

impl StatementHandle {
    pub fn new(sql: impl Into<String>) -> Self {
        Self { v: 1, sql: sql.into(), params: None, run: None }
    }

    /// Attaches parameter rows from a client's DoPut.
    pub fn with_params(mut self, batches: &[RecordBatch]) -> Result<Self, Status> {
        let Some(first) = batches.first() else { return Ok(self) };
        let mut writer = StreamWriter::try_new(Vec::new(), &first.schema())
            .map_err(|e| Status::invalid_argument(format!("cannot encode parameters: {e}")))?;
        for batch in batches {
            writer.write(batch).map_err(|e| Status::invalid_argument(format!("cannot encode parameters: {e}")))?;
        }
        let bytes = writer.into_inner().map_err(|e| Status::internal(e.to_string()))?;
        self.params = Some(STANDARD.encode(bytes));
        Ok(self)
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, Status> {
        let handle: Self = serde_json::from_slice(bytes)
            .map_err(|e| Status::invalid_argument(format!("invalid statement handle: {e}")))?;
        if handle.v != 1 {
            return Err(Status::invalid_argument(format!("unsupported statement handle version {}", handle.v)));
        }
        Ok(handle)
    }

    /// One parameter list per bound row; a single empty list when nothing is bound.
    pub fn parameter_rows(&self) -> Result<Vec<Vec<ScalarValue>>, Status> {
        let Some(encoded) = &self.params else { return Ok(vec![Vec::new()]) };
        let bytes =
            STANDARD.decode(encoded).map_err(|e| Status::invalid_argument(format!("invalid parameters: {e}")))?;
        // The handle comes back from the client: its parameters are checked like any input.
        let batches = strata_core::ipc::read_batches(&bytes, bytes.len(), "the statement handle")
            .map_err(|e| Status::invalid_argument(format!("invalid parameters: {e}")))?;
        let mut rows = Vec::new();
        for batch in batches {
            for row in 0..batch.num_rows() {
                let values = batch
                    .columns()
                    .iter()
                    .map(|col| ScalarValue::try_from_array(col, row))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Status::invalid_argument(format!("invalid parameter value: {e}")))?;
                rows.push(values);
            }
        }
        if rows.is_empty() {
            rows.push(Vec::new());
        }
        Ok(rows)
    }
}

/// The plain-Flight ticket pyarrow users send: `{"sql": "..."}`.
#[derive(Debug, Deserialize)]
pub struct JsonTicket {
    pub sql: String,
}

impl JsonTicket {
    /// Parses a ticket that looks like a JSON object; `None` for Flight SQL tickets.
    pub fn parse(ticket: &[u8]) -> Option<Result<Self, Status>> {
        let first = ticket.iter().find(|b| !b.is_ascii_whitespace())?;
        (*first == b'{').then(|| {
            serde_json::from_slice(ticket).map_err(|e| {
                Status::invalid_argument(format!("invalid JSON ticket (expected {{\"sql\": \"...\"}}): {e}"))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn handle_round_trips_with_parameters() {
        let schema = Arc::new(Schema::new(vec![Field::new("$1", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2]))]).expect("batch");
        let handle = StatementHandle::new("select $1").with_params(&[batch]).expect("params");
        let decoded = StatementHandle::decode(&handle.encode()).expect("decode");
        assert_eq!(decoded.sql, "select $1");
        let rows = decoded.parameter_rows().expect("rows");
        assert_eq!(rows, vec![vec![ScalarValue::Int64(Some(1))], vec![ScalarValue::Int64(Some(2))]]);
    }

    #[test]
    fn json_ticket_is_recognised() {
        assert!(JsonTicket::parse(b"\x0a\x05abc").is_none());
        let t = JsonTicket::parse(br#" {"sql": "select 1"}"#).expect("json").expect("valid");
        assert_eq!(t.sql, "select 1");
        assert!(JsonTicket::parse(b"{nope").expect("json").is_err());
    }
}
