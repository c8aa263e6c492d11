//! Seed inputs: one well-formed request of each kind a target takes, made by the same
//! encoders the clients and tiers use, so a fuzzer starts from inputs that reach deep into
//! each decoder instead of failing its first check. `examples/write_seeds.rs` writes them
//! to `fuzz/corpus/<target>/seed-*`; the corpus test replays them from here, always current.

use std::sync::Arc;

use arrow::array::{BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::ipc::writer::StreamWriter;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTables, CommandGetXdbcTypeInfo, CommandPreparedStatementQuery,
    CommandStatementIngest, CommandStatementQuery, CommandStatementUpdate, ProstMessageExt, TicketStatementQuery,
};
use arrow_flight::{Action, Criteria, Empty, FlightData, FlightDescriptor, HandshakeRequest, Ticket};
use base64::Engine as _;
use prost::Message;
use strata_core::routing::QueryOptions;
use strata_proto::v1::{
    ExecuteRequest, HealthRequest, IngestBatch, IngestRequest, ListDatasetsRequest, QueryContext, SqlQuery,
    SubscribeRequest, execute_request,
};

use crate::harness::harness;

/// A seed: the target it feeds, a file name, the bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub data: Vec<u8>,
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, name: &str, data: Vec<u8>| {
        seeds.push(Seed { target, name: format!("seed-{name}"), data });
    };
    for (name, text) in configs() {
        add("config", &name, text.into_bytes());
    }
    for (name, data) in flight_requests() {
        add("flight_sql", &name, data);
    }
    for (name, sql, params) in statements() {
        add("statement_handle", name, handle(sql, params.as_ref()));
    }
    add("ingest", "ipc", [vec![0], ipc(&[readings()])].concat());
    add("ingest", "csv", [&[1u8][..], b"id,site,at,value,ok\n1,north,2024-05-01T10:00:00Z,1.5,true\n2,,,,\n"].concat());
    add("ingest_log", "records", [vec![1], chunk(&log_body(1, "readings", &ipc(&[readings()])))].concat());
    add(
        "ingest_log",
        "uploaded",
        [&[3u8][..], b"1                   ", &chunk(&log_body(2, "readings", &ipc(&[readings()])))].concat(),
    );
    for (name, data) in tier_requests() {
        add("tier_protocol", &name, data);
    }
    for (name, sql) in shipped_queries() {
        add("shipped_plan", name, shipped_plan(sql));
    }
    seeds
}

/// The configs users start from: the example and the compose demo's.
fn configs() -> Vec<(String, String)> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    [
        "examples/strata.yaml",
        "deploy/compose/config/platform-eu.yaml",
        "deploy/compose/config/sidecar.yaml",
        "deploy/compose/config/edge.yaml",
    ]
    .iter()
    .filter_map(|path| {
        let text = std::fs::read_to_string(format!("{root}/{path}")).ok()?;
        // `${VAR}` must be set, and the fuzzing process sets none: give each a default.
        Some((path.replace(['/', '.'], "-"), with_defaults(&text)))
    })
    .collect()
}

/// `${NAME}` becomes `${NAME:-x}` (a config's secrets come from the environment), an API
/// key hash's default a well-formed hash.
fn with_defaults(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start..].find('}') else { break };
        let name = &rest[start + 2..start + len];
        out.push_str(&rest[..start]);
        if name.contains(":-") {
            out.push_str(&rest[start..=start + len]);
        } else if name.ends_with("_HASH") {
            // An API key's hash: it must look like one.
            out.push_str(&format!("${{{name}:-sha256:{}}}", "0".repeat(64)));
        } else {
            out.push_str(&format!("${{{name}:-x}}"));
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// A batch of the writable table the ingest targets conform to.
fn readings() -> RecordBatch {
    RecordBatch::try_from_iter(vec![
        ("id", Arc::new(Int64Array::from(vec![1, 2])) as _),
        ("site", Arc::new(StringArray::from(vec![Some("north"), None])) as _),
        (
            "at",
            Arc::new(TimestampMicrosecondArray::from(vec![Some(1_714_557_600_000_000), None]).with_timezone("UTC"))
                as _,
        ),
        ("value", Arc::new(Float64Array::from(vec![Some(1.5), None])) as _),
        ("ok", Arc::new(BooleanArray::from(vec![Some(true), None])) as _),
    ])
    .expect("a readings batch")
}

/// An Arrow IPC stream of `batches`.
fn ipc(batches: &[RecordBatch]) -> Vec<u8> {
    let mut writer = StreamWriter::try_new(Vec::new(), &batches[0].schema()).expect("an IPC writer");
    for batch in batches {
        writer.write(batch).expect("write a batch");
    }
    writer.into_inner().expect("the IPC stream")
}

/// The body of an ingest log record: `seq u64 | dataset length u16 | dataset | IPC`.
fn log_body(seq: u64, dataset: &str, ipc: &[u8]) -> Vec<u8> {
    strata_edge_agent::log::record_body(seq, dataset, ipc)
}

/// `[len u16 | bytes]`, the chunking the framed modes of the targets read.
fn chunk(bytes: &[u8]) -> Vec<u8> {
    [&(bytes.len() as u16).to_le_bytes()[..], bytes].concat()
}

/// Statements with their parameters, as clients prepare them.
fn statements() -> Vec<(&'static str, &'static str, Option<RecordBatch>)> {
    let id = RecordBatch::try_from_iter(vec![("$1", Arc::new(Int64Array::from(vec![7, 8])) as _)]).expect("params");
    vec![
        ("lookup", "SELECT * FROM orders WHERE order_id = $1", Some(id)),
        ("join", "SELECT c.name, sum(o.amount) FROM orders o JOIN customers c USING (customer_id) GROUP BY 1", None),
    ]
}

/// A statement handle as the server encodes it (JSON, parameters as base64 Arrow IPC).
fn handle(sql: &str, params: Option<&RecordBatch>) -> Vec<u8> {
    let mut handle = format!("{{\"v\":1,\"sql\":{}", json_string(sql));
    if let Some(params) = params {
        let encoded = base64::engine::general_purpose::STANDARD.encode(ipc(std::slice::from_ref(params)));
        handle.push_str(&format!(",\"params\":\"{encoded}\""));
    }
    handle.push('}');
    handle.into_bytes()
}

fn json_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `[method index, mode, body]` inputs of the `flight_sql` target (see its method list).
fn flight_requests() -> Vec<(String, Vec<u8>)> {
    const GET_FLIGHT_INFO: u8 = 2;
    let mut out = Vec::new();
    let mut one = |name: &str, method: u8, message: Vec<u8>| {
        out.push((name.to_string(), [vec![method, 1], message].concat()));
    };
    one(
        "handshake",
        0,
        HandshakeRequest { protocol_version: 0, payload: b"Basic dXNlcjpwYXNz".to_vec().into() }.encode_to_vec(),
    );
    one("list-flights", 1, Criteria { expression: Default::default() }.encode_to_vec());
    let commands: Vec<(&str, Vec<u8>)> = vec![
        (
            "query",
            CommandStatementQuery {
                query: "SELECT customer_id, count(*) FROM orders WHERE amount > 10 GROUP BY 1".into(),
                transaction_id: None,
            }
            .as_any()
            .encode_to_vec(),
        ),
        (
            "tables",
            CommandGetTables {
                catalog: None,
                db_schema_filter_pattern: Some("%".into()),
                table_name_filter_pattern: Some("ord%".into()),
                table_types: vec![],
                include_schema: true,
            }
            .as_any()
            .encode_to_vec(),
        ),
        ("schemas", CommandGetDbSchemas { catalog: None, db_schema_filter_pattern: None }.as_any().encode_to_vec()),
        ("catalogs", CommandGetCatalogs {}.as_any().encode_to_vec()),
        ("sql-info", CommandGetSqlInfo { info: vec![0, 1, 500] }.as_any().encode_to_vec()),
        ("xdbc", CommandGetXdbcTypeInfo { data_type: Some(4) }.as_any().encode_to_vec()),
        (
            "primary-keys",
            CommandGetPrimaryKeys { catalog: None, db_schema: None, table: "orders".into() }.as_any().encode_to_vec(),
        ),
    ];
    for (name, command) in &commands {
        one(&format!("info-{name}"), GET_FLIGHT_INFO, FlightDescriptor::new_cmd(command.clone()).encode_to_vec());
        one(&format!("poll-{name}"), 3, FlightDescriptor::new_cmd(command.clone()).encode_to_vec());
        if *name == "query" {
            one(&format!("schema-{name}"), 4, FlightDescriptor::new_cmd(command.clone()).encode_to_vec());
        }
    }
    let statement = TicketStatementQuery { statement_handle: handle("SELECT * FROM orders LIMIT 3", None).into() };
    one("get-statement", 5, Ticket { ticket: statement.as_any().encode_to_vec().into() }.encode_to_vec());
    one(
        "get-json-ticket",
        5,
        Ticket { ticket: br#"{"sql": "SELECT count(*) FROM customers"}"#.to_vec().into() }.encode_to_vec(),
    );
    let create = ActionCreatePreparedStatementRequest {
        query: "SELECT * FROM orders WHERE order_id = $1".into(),
        transaction_id: None,
    };
    one(
        "action-prepare",
        8,
        Action { r#type: "CreatePreparedStatement".into(), body: create.as_any().encode_to_vec().into() }
            .encode_to_vec(),
    );
    let close = ActionClosePreparedStatementRequest { prepared_statement_handle: handle("SELECT 1", None).into() };
    one(
        "action-close",
        8,
        Action { r#type: "ClosePreparedStatement".into(), body: close.as_any().encode_to_vec().into() }.encode_to_vec(),
    );
    one("action-session", 8, Action { r#type: "GetSessionOptions".into(), body: Default::default() }.encode_to_vec());
    one("list-actions", 9, Empty {}.encode_to_vec());
    // DoPut streams: a descriptor with the first message, then the Arrow messages.
    let params = statements().remove(0).2;
    let puts: Vec<(&str, Vec<u8>, RecordBatch)> = vec![
        (
            "put-params",
            CommandPreparedStatementQuery {
                prepared_statement_handle: handle("SELECT * FROM orders WHERE order_id = $1", None).into(),
            }
            .as_any()
            .encode_to_vec(),
            params.expect("lookup params"),
        ),
        (
            "put-update",
            CommandStatementUpdate { query: "INSERT INTO orders VALUES (1)".into(), transaction_id: None }
                .as_any()
                .encode_to_vec(),
            readings(),
        ),
        (
            "put-ingest",
            CommandStatementIngest { table: "readings".into(), ..Default::default() }.as_any().encode_to_vec(),
            readings(),
        ),
    ];
    for (name, command, batch) in puts {
        let mut body = vec![6, 2];
        for (i, mut data) in flight_data(&batch).into_iter().enumerate() {
            if i == 0 {
                data.flight_descriptor = Some(FlightDescriptor::new_cmd(command.clone()));
            }
            body.extend(chunk(&data.encode_to_vec()));
        }
        out.push((name.to_string(), body));
    }
    out
}

/// `batch` as Flight messages: its schema, then its data.
fn flight_data(batch: &RecordBatch) -> Vec<FlightData> {
    arrow_flight::utils::batches_to_flight_data(&batch.schema(), vec![batch.clone()]).expect("Flight messages")
}

/// `[method index, mode, body]` inputs of the `tier_protocol` target.
fn tier_requests() -> Vec<(String, Vec<u8>)> {
    let context = Some(QueryContext {
        origin_tier: "sidecar".into(),
        origin_region: "fuzz".into(),
        hops: 1,
        ..Default::default()
    });
    let sql = |text: &str| ExecuteRequest {
        context: context.clone(),
        query: Some(execute_request::Query::Sql(SqlQuery { sql: text.into(), params: Default::default() })),
    };
    let plan = ExecuteRequest {
        context: context.clone(),
        query: Some(execute_request::Query::Plan(
            shipped_plan("SELECT customer_id, amount FROM orders WHERE amount > 100").into(),
        )),
    };
    let ingest = IngestRequest {
        edge_id: "edge-1".into(),
        context: context.clone(),
        batches: vec![IngestBatch { seq: 1, dataset: "orders".into(), batch: ipc(&[readings()]).into() }],
    };
    let framed = |method: u8, message: Vec<u8>| [vec![method, 1], message].concat();
    vec![
        ("list".into(), framed(0, ListDatasetsRequest { context: context.clone() }.encode_to_vec())),
        (
            "subscribe".into(),
            framed(
                1,
                SubscribeRequest { dataset: "orders".into(), context: context.clone(), ..Default::default() }
                    .encode_to_vec(),
            ),
        ),
        (
            "execute-sql".into(),
            framed(2, sql("SELECT count(*) FROM orders o JOIN customers c USING (customer_id)").encode_to_vec()),
        ),
        ("execute-plan".into(), framed(2, plan.encode_to_vec())),
        ("health".into(), framed(3, HealthRequest {}.encode_to_vec())),
        ("ingest".into(), framed(4, ingest.encode_to_vec())),
    ]
}

/// Sub-plans of the shapes a sidecar ships (scans with filters and projections, partial
/// aggregates, joins between this tier's datasets).
fn shipped_queries() -> Vec<(&'static str, &'static str)> {
    vec![
        ("filter", "SELECT order_id, amount FROM orders WHERE amount BETWEEN 10 AND 20 AND status <> 'x'"),
        ("aggregate", "SELECT customer_id, count(*), avg(amount) FROM orders GROUP BY customer_id"),
        (
            "join",
            "SELECT a.order_id, b.amount FROM orders a JOIN orders b ON a.customer_id = b.customer_id WHERE a.amount > b.amount ORDER BY 2 DESC LIMIT 5",
        ),
    ]
}

/// `sql` planned by the fuzzing engine and encoded as a tier ships it.
fn shipped_plan(sql: &str) -> Vec<u8> {
    let h = harness();
    let planned = h.runtime.block_on(h.engine.plan(sql, &QueryOptions::default())).expect("a seed query plans");
    strata_core::plan_codec::encode_plan(&planned.plan).expect("a seed plan encodes").to_vec()
}
