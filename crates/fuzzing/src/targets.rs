//! The targets' bodies (see the table in the crate docs). Each returns normally for any
//! input a server must survive, and panics only for a finding.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow_flight::sql::{CommandPreparedStatementQuery, ProstMessageExt, TicketStatementQuery};
use arrow_flight::{FlightDescriptor, Ticket};
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use strata_core::routing::QueryOptions;

use crate::Outcome;
use crate::harness::{call, chunks, grpc_frame, harness, request_body};

/// Every Flight (SQL) method a client can call.
const FLIGHT_METHODS: &[&str] = &[
    "Handshake",
    "ListFlights",
    "GetFlightInfo",
    "PollFlightInfo",
    "GetSchema",
    "DoGet",
    "DoPut",
    "DoExchange",
    "DoAction",
    "ListActions",
];

/// Every RPC of the tier protocol.
const TIER_METHODS: &[&str] = &["ListDatasets", "Subscribe", "Execute", "Health", "Ingest"];

/// A subscription streams versions until the subscriber goes: it is dropped once it has
/// sent nothing for this long.
const SUBSCRIPTION_IDLE: Duration = Duration::from_millis(300);

/// A config file: parsing never panics, and a config that parses passes its own check and
/// builds an engine (or is refused by it with an error).
pub(crate) fn config(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else { return Outcome::Refused("not UTF-8".into()) };
    match strata_core::Config::parse(text, "fuzz.yaml") {
        Ok(config) => {
            if let Err(problem) = config.check() {
                panic!("a config that parsed fails its own check: {problem}");
            }
            match strata_core::Engine::new(&config) {
                Ok(_) => Outcome::Accepted,
                Err(e) => Outcome::Refused(e.to_string()),
            }
        }
        Err(e) => Outcome::Refused(e.to_string()),
    }
}

/// `[method, mode, body...]`: the body sent to one Flight SQL method (see [`request_body`]).
pub(crate) fn flight_sql(data: &[u8]) -> Outcome {
    let [method, mode, rest @ ..] = data else { return Outcome::Refused("too short".into()) };
    let path =
        format!("/arrow.flight.protocol.FlightService/{}", FLIGHT_METHODS[*method as usize % FLIGHT_METHODS.len()]);
    let h = harness();
    let service = strata_serving::flight::flight_server(h.engine.clone());
    h.runtime.block_on(call(service, &path, request_body(*mode, rest), None)).outcome()
}

/// A prepared-statement handle as a client sends it back: in GetFlightInfo's command and in
/// a DoGet ticket. Handles are stateless (they carry the SQL and parameters), so they are
/// exactly as trustworthy as any other client bytes.
pub(crate) fn statement_handle(data: &[u8]) -> Outcome {
    let h = harness();
    let service = strata_serving::flight::flight_server(h.engine.clone());
    let handle = Bytes::copy_from_slice(data);
    let command = CommandPreparedStatementQuery { prepared_statement_handle: handle.clone() }.as_any().encode_to_vec();
    let info = FlightDescriptor::new_cmd(command).encode_to_vec();
    let ticket = Ticket { ticket: TicketStatementQuery { statement_handle: handle }.as_any().encode_to_vec().into() };
    h.runtime.block_on(async {
        let path = "/arrow.flight.protocol.FlightService/";
        let info = call(service.clone(), &format!("{path}GetFlightInfo"), grpc_frame(&info).into(), None).await;
        let rows = call(service, &format!("{path}DoGet"), grpc_frame(&ticket.encode_to_vec()).into(), None).await;
        info.outcome().and(rows.outcome())
    })
}

/// The columns of the writable table an edge write goes into.
fn writable_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("site", DataType::Utf8, true),
        Field::new("at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new("value", DataType::Float64, true),
        Field::new("ok", DataType::Boolean, true),
    ]))
}

/// `[format, body...]`: an edge write's body, Arrow IPC (format even) or CSV (odd), decoded
/// and conformed to the writable table as the edge does before logging it. What decodes
/// must be valid Arrow (a reader that accepts corrupt buffers hands later kernels
/// out-of-bounds offsets), and what conforms has exactly the table's columns.
pub(crate) fn ingest(data: &[u8]) -> Outcome {
    let [format, body @ ..] = data else { return Outcome::Refused("empty".into()) };
    let schema = writable_schema();
    let decoded = if format % 2 == 0 {
        strata_core::ipc::read_batches(body, 4 << 20, "limits.max_request_body")
    } else {
        strata_core::writes::read_csv(body, &schema)
    };
    let batches = match decoded {
        Ok(batches) => batches,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let mut outcome = Outcome::Accepted;
    for batch in &batches {
        assert_valid(batch);
        match strata_core::writes::conform(batch, &schema, "readings") {
            Ok(conformed) => {
                assert_eq!(conformed.schema().fields(), schema.fields(), "conformed columns");
                assert_eq!(conformed.num_rows(), batch.num_rows(), "conforming keeps every row");
                assert_valid(&conformed);
            }
            Err(e) => outcome = Outcome::Refused(e.to_string()),
        }
    }
    outcome
}

fn assert_valid(batch: &RecordBatch) {
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if let Err(e) = column.to_data().validate_full() {
            panic!("decoded column `{}` is not valid Arrow: {e}", field.name());
        }
    }
}

/// `[mode, ...]`: a segment of the edge's ingest log. Mode bit 0: the rest is the segment's
/// raw bytes (checksums must catch corruption), or records, each `[len u16 | body]`, framed
/// with correct magic, length and checksum (so the body decoding itself is reached). Mode
/// bit 1: the first 20 bytes are the `uploaded` marker file. Opening must succeed or refuse
/// with an error, and opening again right after must find the same records (the repair of
/// a torn tail is done once and for all).
pub(crate) fn ingest_log(data: &[u8]) -> Outcome {
    let [mode, rest @ ..] = data else { return Outcome::Refused("empty".into()) };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut rest = rest;
    if mode & 2 != 0 {
        let (uploaded, after) = rest.split_at(rest.len().min(20));
        std::fs::write(dir.path().join("uploaded"), uploaded).expect("write uploaded");
        rest = after;
    }
    let segment = if mode & 1 == 0 { rest.to_vec() } else { framed_records(rest) };
    std::fs::write(dir.path().join("00000000000000000001.log"), segment).expect("write segment");
    let first = match strata_edge_agent::log::IngestLog::open(dir.path(), 1 << 30) {
        Ok((_, first)) => first,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let seqs: Vec<u64> = first.pending.iter().map(|e| e.seq).collect();
    let (_, again) = strata_edge_agent::log::IngestLog::open(dir.path(), 1 << 30).expect("a repaired log opens again");
    assert_eq!(again.truncated_bytes, 0, "the first open left a torn tail behind");
    assert_eq!(again.pending.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs, "the same records on the second open");
    for entry in &first.pending {
        entry.batches.iter().for_each(assert_valid);
    }
    match first.pending.is_empty() {
        true => Outcome::Refused(format!("no intact record ({} bytes cut)", first.truncated_bytes)),
        false => Outcome::Accepted,
    }
}

/// Records with a correct header around each `[len u16 | body]` chunk of `rest`.
fn framed_records(rest: &[u8]) -> Vec<u8> {
    chunks(rest).filter_map(strata_edge_agent::log::frame_record).flatten().collect()
}

/// `[method, mode, body...]`: the body sent to one RPC of the tier protocol, as a sidecar,
/// an edge agent or a peer platform (or someone posing as one) sends it.
pub(crate) fn tier_protocol(data: &[u8]) -> Outcome {
    let [method, mode, rest @ ..] = data else { return Outcome::Refused("too short".into()) };
    let name = TIER_METHODS[*method as usize % TIER_METHODS.len()];
    let idle = (name == "Subscribe").then_some(SUBSCRIPTION_IDLE);
    let h = harness();
    let service = strata_serving::tier::tier_server(h.engine.clone(), "platform");
    h.runtime
        .block_on(call(service, &format!("/strata.v1.TierService/{name}"), request_body(*mode, rest), idle))
        .outcome()
}

/// A sub-plan another tier shipped (datafusion-proto bytes): decoded, checked to read only
/// this tier's datasets, and run to its end (or refused).
pub(crate) fn shipped_plan(data: &[u8]) -> Outcome {
    let h = harness();
    h.runtime.block_on(async {
        let run = async {
            let mut stream = match h.engine.execute_encoded_plan(data, &QueryOptions::default()).await {
                Ok(stream) => stream,
                Err(e) => return Outcome::Refused(e.to_string()),
            };
            while let Some(batch) = stream.next().await {
                if let Err(e) = batch {
                    return Outcome::Refused(e.to_string());
                }
            }
            Outcome::Accepted
        };
        tokio::time::timeout(Duration::from_secs(10), run).await.expect("a shipped plan ran past 10 s")
    })
}
