//! `strata-instructions`: point lookups through Strata's engine in this process and nothing
//! else, for `valgrind --tool=callgrind` to count. Instruction counts do not move with the
//! machine's noise, so they compare two commits where timings on a shared 2-core VM cannot.
//! `scripts/instructions.sh` runs it twice (few and many lookups) and reports the difference
//! per lookup, which leaves out start-up and loading the table.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use clap::Parser;
use datafusion::common::ScalarValue;
use datafusion::parquet::arrow::ArrowWriter;
use futures::StreamExt;

#[derive(Parser)]
struct Args {
    /// Rows in the table looked up.
    #[arg(long, default_value_t = 100_000)]
    rows: i64,
    /// Lookups to run after the warm-up.
    #[arg(long)]
    lookups: usize,
    /// Spell the key into the SQL text instead of binding it as a parameter.
    #[arg(long)]
    literal: bool,
    /// Declare `id` as the table's primary key, so lookups are answered from its index.
    #[arg(long)]
    indexed: bool,
    /// Instead of lookups, a dashboard's queries repeated: every counted one is a results
    /// cache hit (checked), so the count is what a hit costs the engine (with `--http`,
    /// what it costs the HTTP API).
    #[arg(long)]
    cached: bool,
    /// Send each lookup as `POST /v1/sql` through the tier's HTTP stack (routes, layers,
    /// handler, JSON answer) in this process, with the tiers' log subscriber installed: what
    /// the HTTP API adds to the engine's lookup, without sockets or hyper's connection.
    #[arg(long)]
    http: bool,
    /// Send `GET /health` through the same stack instead: the floor of `--http`.
    #[arg(long, conflicts_with_all = ["http", "cached", "flight_sql"])]
    health: bool,
    /// Ask each lookup as a Flight SQL client does (GetFlightInfo with the SQL, then DoGet
    /// of its ticket) through the tier's Flight gRPC service in this process: tonic's codec,
    /// the Flight SQL dispatch, the statement path and the Arrow IPC answer, without sockets
    /// or HTTP/2.
    #[arg(long, conflicts_with = "http")]
    flight_sql: bool,
}

/// What `--cached` repeats, in turn: aggregates and a top-10, 10 rows or fewer each.
const DASHBOARD: [&str; 4] = [
    "SELECT id % 10 AS bucket, count(*) AS n FROM points GROUP BY id % 10",
    "SELECT id, v FROM points ORDER BY id DESC LIMIT 10",
    "SELECT id % 10 AS bucket, max(v) AS top FROM points WHERE id < 1000 GROUP BY id % 10",
    "SELECT count(*) AS n FROM points WHERE id > 50",
];

/// Lookups before the counted ones, so plans and caches are warm in both runs alike.
const WARMUP: usize = 50;

// One thread: everything the engine does runs here, in the same order on every run.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rows > 0, "--rows must be positive");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("points.parquet");
    write_table(&path, args.rows)?;
    let config = strata_core::Config::parse(
        &format!(
            "region: eu\ndatasets:\n  - name: points\n    from: file:{}\n    acceleration: {{primary_key: [{}]}}\n",
            path.display(),
            if args.indexed { "id" } else { "" }
        ),
        "strata-instructions",
    )?;
    let engine = strata_core::Engine::new(&config)?;
    let _stop = engine.background().token().drop_guard();
    engine.start();
    tokio::time::timeout(Duration::from_secs(600), engine.wait_ready()).await.context("the table never loaded")?;
    if args.flight_sql {
        return flight_sql::run(&engine, &args).await;
    }
    match (args.http || args.health, args.cached) {
        (false, true) => return dashboard(&engine, args.lookups).await,
        (true, true) => return dashboard_over_http(&http_router(&engine), args.lookups).await,
        (true, false) => return over_http(&engine, &args).await,
        (false, false) => {}
    }
    for i in 0..WARMUP + args.lookups {
        let key = key(i, args.rows);
        let (sql, params) = if args.literal {
            (format!("SELECT v FROM points WHERE id = {key}"), Vec::new())
        } else {
            ("SELECT v FROM points WHERE id = $1".to_string(), vec![ScalarValue::Int64(Some(key))])
        };
        let mut stream = engine.execute(&sql, params).await?;
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            rows += batch?.num_rows();
        }
        anyhow::ensure!(rows == 1, "lookup of {key} returned {rows} rows");
    }
    let from_index = engine.index_lookups() as usize;
    let expected = if args.indexed { WARMUP + args.lookups } else { 0 };
    anyhow::ensure!(from_index == expected, "{from_index} lookups answered from the index, expected {expected}");
    Ok(())
}

/// The key of lookup `i`: spread over the table, each path's keys in the same order.
fn key(i: usize, rows: i64) -> i64 {
    (i as i64).wrapping_mul(7919).rem_euclid(rows)
}

/// The dashboard's queries, `calls` times after the warm-up, each a results cache hit.
async fn dashboard(engine: &strata_core::Engine, calls: usize) -> anyhow::Result<()> {
    for i in 0..WARMUP + calls {
        let mut stream = engine.execute(DASHBOARD[i % DASHBOARD.len()], Vec::new()).await?;
        let cache = stream.route().cache;
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            rows += batch?.num_rows();
        }
        anyhow::ensure!((1..=10).contains(&rows), "dashboard query {} returned {rows} rows", i % DASHBOARD.len());
        let warm = i >= DASHBOARD.len();
        anyhow::ensure!(
            !warm || cache == Some(strata_core::results_cache::CacheStatus::Hit),
            "call {i} was {cache:?}, not a results cache hit"
        );
    }
    Ok(())
}

/// The tier's HTTP routes and layers around `engine`, with the tiers' log subscriber
/// installed, called in this process (no sockets, no hyper connection).
fn http_router(engine: &strata_core::Engine) -> axum::Router {
    strata_serving::telemetry::init(strata_serving::telemetry::LogFormat::Pretty);
    let server = strata_core::config::ServerConfig::default();
    let connections = strata_serving::connections::ConnectionGuard::new(&server);
    let metrics = strata_serving::metrics::Metrics::install(engine, connections);
    let state =
        strata_serving::http::HttpState { engine: engine.clone(), metrics, draining: Arc::default(), auth: None };
    strata_serving::stack::http(state)
}

/// Sends call `i`'s `request` through `router`; its headers and whole body once it answered 200.
async fn send(
    router: &axum::Router,
    i: usize,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> anyhow::Result<(http::HeaderMap, bytes::Bytes)> {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let response = router.clone().oneshot(request).await?;
    anyhow::ensure!(response.status() == http::StatusCode::OK, "call {i} answered {}", response.status());
    let (parts, body) = response.into_parts();
    Ok((parts.headers, body.collect().await?.to_bytes()))
}

/// Lookups (`--http`, always as literal SQL, the way an HTTP client sends them) or health
/// checks (`--health`) through the tier's HTTP router, each answer read whole and checked.
async fn over_http(engine: &strata_core::Engine, args: &Args) -> anyhow::Result<()> {
    use bytes::Bytes;
    use http_body_util::Full;
    let router = http_router(engine);
    for i in 0..WARMUP + args.lookups {
        let key = key(i, args.rows);
        let request = match args.health {
            true => http::Request::get("/health").body(Full::new(Bytes::new()))?,
            false => http::Request::post("/v1/sql")
                .body(Full::new(Bytes::from(format!("SELECT v FROM points WHERE id = {key}"))))?,
        };
        let (_, body) = send(&router, i, request).await?;
        let expected = match args.health {
            true => r#"{"status":"ok"}"#.to_string(),
            false => format!(r#"[{{"v":"value-{key}"}}]"#),
        };
        anyhow::ensure!(body == expected.as_bytes(), "call {i} answered {:?}", String::from_utf8_lossy(&body));
    }
    let from_index = engine.index_lookups() as usize;
    let expected = if args.http && args.indexed { WARMUP + args.lookups } else { 0 };
    anyhow::ensure!(from_index == expected, "{from_index} lookups answered from the index, expected {expected}");
    Ok(())
}

fn write_table(path: &std::path::Path, rows: i64) -> anyhow::Result<()> {
    let schema =
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("v", DataType::Utf8, false)]));
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path)?, Arc::clone(&schema), None)?;
    for start in (0..rows).step_by(65_536) {
        let ids: Vec<i64> = (start..(start + 65_536).min(rows)).collect();
        writer.write(&RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(ids.iter().copied())),
                Arc::new(StringArray::from_iter_values(ids.iter().map(|i| format!("value-{i}")))),
            ],
        )?)?;
    }
    writer.close()?;
    Ok(())
}

/// The dashboard's queries as `POST /v1/sql` through the tier's HTTP router, `calls` times
/// after the warm-up, each answered from the results cache (its `strata-cache` header
/// checked): what a cache hit costs the HTTP API, for target 9's budget.
async fn dashboard_over_http(router: &axum::Router, calls: usize) -> anyhow::Result<()> {
    use strata_serving::route_headers::CACHE_HEADER;
    for i in 0..WARMUP + calls {
        let sql = DASHBOARD[i % DASHBOARD.len()];
        let request = http::Request::post("/v1/sql")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(sql.as_bytes())))?;
        let (headers, body) = send(router, i, request).await?;
        let cache = headers.get(CACHE_HEADER);
        // Read as a JSON array of anything: checked whole, but not built into values, so the
        // count is the server's part and not this check's.
        let rows: Vec<serde::de::IgnoredAny> = serde_json::from_slice(&body)?;
        anyhow::ensure!(
            (1..=10).contains(&rows.len()),
            "dashboard query {} returned {} rows",
            i % DASHBOARD.len(),
            rows.len()
        );
        let warm = i >= DASHBOARD.len();
        anyhow::ensure!(
            !warm || cache.is_some_and(|c| c.as_bytes().eq_ignore_ascii_case(b"hit")),
            "call {i} was {cache:?}, not a results cache hit"
        );
    }
    Ok(())
}

/// `--flight-sql`: each query as GetFlightInfo and DoGet through the tier's Flight service,
/// called as a tower service with gRPC-framed bodies (what HTTP/2 would carry).
mod flight_sql {
    use anyhow::Context;
    use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
    use arrow_flight::{FlightData, FlightDescriptor, FlightInfo};
    use bytes::{Buf, BufMut, Bytes};
    use http_body_util::{BodyExt, Full};
    use prost::Message;
    use tower::ServiceExt;

    use super::{Args, DASHBOARD, WARMUP, key};

    type Flight = arrow_flight::flight_service_server::FlightServiceServer<strata_serving::flight::StrataFlightService>;

    pub async fn run(engine: &strata_core::Engine, args: &Args) -> anyhow::Result<()> {
        strata_serving::telemetry::init(strata_serving::telemetry::LogFormat::Pretty);
        let service = strata_serving::flight::flight_server(engine.clone());
        for i in 0..WARMUP + args.lookups {
            let (sql, expected) = match args.cached {
                true => (DASHBOARD[i % DASHBOARD.len()].to_string(), None),
                false => {
                    let key = key(i, args.rows);
                    (format!("SELECT v FROM points WHERE id = {key}"), Some(format!("value-{key}")))
                }
            };
            let command = CommandStatementQuery { query: sql, transaction_id: None };
            let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
            let info: FlightInfo =
                unary(&service, "GetFlightInfo", &descriptor).await.with_context(|| format!("call {i}"))?;
            let ticket = info.endpoint.first().and_then(|e| e.ticket.clone()).context("no ticket")?;
            let (headers, messages) = call(&service, "DoGet", &ticket).await.with_context(|| format!("call {i}"))?;
            let data = messages.into_iter().map(FlightData::decode).collect::<Result<Vec<_>, _>>()?;
            let batches = arrow_flight::utils::flight_data_to_batches(&data)?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            match &expected {
                Some(value) => {
                    anyhow::ensure!(rows == 1, "lookup call {i} returned {rows} rows");
                    let batch = batches.iter().find(|b| b.num_rows() == 1).context("no row")?;
                    let found = arrow::util::display::array_value_to_string(batch.column(0), 0)?;
                    anyhow::ensure!(found == *value, "lookup call {i} answered {found:?}");
                }
                None => {
                    anyhow::ensure!((1..=10).contains(&rows), "dashboard call {i} returned {rows} rows");
                    let cache = headers.get(strata_serving::route_headers::CACHE_HEADER);
                    anyhow::ensure!(
                        i < DASHBOARD.len() || cache.is_some_and(|c| c.as_bytes().eq_ignore_ascii_case(b"hit")),
                        "call {i} was {cache:?}, not a results cache hit"
                    );
                }
            }
        }
        let from_index = engine.index_lookups() as usize;
        let expected = if args.indexed && !args.cached { WARMUP + args.lookups } else { 0 };
        anyhow::ensure!(from_index == expected, "{from_index} lookups answered from the index, expected {expected}");
        Ok(())
    }

    /// A unary call's one answer.
    async fn unary<T: Message + Default>(service: &Flight, method: &str, request: &impl Message) -> anyhow::Result<T> {
        let (_, messages) = call(service, method, request).await?;
        anyhow::ensure!(messages.len() == 1, "{method} answered {} messages", messages.len());
        Ok(T::decode(messages[0].clone())?)
    }

    /// Calls `method` with one request message; the answer's headers and messages, once its
    /// status said OK.
    async fn call(
        service: &Flight,
        method: &str,
        request: &impl Message,
    ) -> anyhow::Result<(http::HeaderMap, Vec<Bytes>)> {
        let message = request.encode_to_vec();
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.put_u8(0);
        framed.put_u32(u32::try_from(message.len())?);
        framed.extend_from_slice(&message);
        let request = http::Request::post(format!("/arrow.flight.protocol.FlightService/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(framed)))?;
        let response = service.clone().oneshot(request).await?;
        let (parts, body) = response.into_parts();
        let collected = body.collect().await?;
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| parts.headers.get("grpc-status"))
            .context("no grpc-status")?;
        anyhow::ensure!(status == "0", "{method} failed: {status:?} {:?}", collected.trailers());
        let mut body = collected.to_bytes();
        let mut messages = Vec::new();
        while body.has_remaining() {
            anyhow::ensure!(body.remaining() >= 5, "a truncated gRPC frame");
            let _compressed = body.get_u8();
            let len = body.get_u32() as usize;
            anyhow::ensure!(body.remaining() >= len, "a truncated gRPC message");
            messages.push(body.split_to(len));
        }
        Ok((parts.headers, messages))
    }
}
