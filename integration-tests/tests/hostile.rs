//! Inputs a careless client or an attacker sends, against a live tier: shipped plans that
//! read files, Arrow messages that lie about their length, a few KB of SQL that nest deep,
//! constants of gigabytes, floods of distinct texts and of silent connections. After each,
//! the tier still answers `SELECT 1`, and its peak memory stays near where it started.

use std::time::{Duration, Instant};

use datafusion::prelude::{CsvReadOptions, SessionContext};
use strata_integration_tests::tier::Tier;
use strata_integration_tests::workspace_root;
use strata_proto::v1::tier_service_client::TierServiceClient;
use strata_proto::v1::{
    ExecuteRequest, IngestBatch, IngestRequest, QueryContext, SqlQuery, SubscribeRequest, execute_request,
};

fn config(extra: &str) -> String {
    let data = workspace_root().join("examples/data");
    format!(
        "{extra}datasets:\n  - name: customers\n    from: file:{}/customers.csv\n  - name: orders\n    from: file:{}/orders.ndjson\n    acceleration: {{refresh: full}}\n",
        data.display(),
        data.display()
    )
}

/// Peak resident memory of the process so far (VmHWM), in bytes.
fn peak_rss(tier: &Tier) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", tier.pid())).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") * 1024
}

async fn still_answers(tier: &Tier) {
    let (code, body) = tier.sql("SELECT 1 AS one").await;
    assert_eq!(code, 200, "{body}\n{}", tier.logs());
    assert_eq!(body[0]["one"], 1, "{body}");
}

async fn tier_client(tier: &Tier) -> TierServiceClient<tonic::transport::Channel> {
    TierServiceClient::connect(format!("http://{}", tier.flight_addr)).await.expect("tier client")
}

async fn execute_plan(tier: &Tier, plan: Vec<u8>) -> Result<usize, tonic::Status> {
    let request = ExecuteRequest { context: None, query: Some(execute_request::Query::Plan(plan.into())) };
    let mut frames = tier_client(tier).await.execute(request).await?.into_inner();
    let mut n = 0;
    while let Some(frame) = frames.message().await? {
        n += frame.data_body.len();
    }
    Ok(n)
}

/// The logical plan of `sql` in `ctx` as written (views and subqueries kept), as
/// datafusion-proto bytes with its default codec.
async fn plan_bytes(ctx: &SessionContext, sql: &str) -> Vec<u8> {
    let plan = ctx.sql(sql).await.expect("plan").into_unoptimized_plan();
    datafusion_proto::bytes::logical_plan_to_bytes(&plan).expect("encodes").to_vec()
}

#[tokio::test]
async fn shipped_plans_may_read_only_named_tables_of_the_catalog() {
    let tier = Tier::start("platform-service", &config("")).await;
    tier.wait_ready(Duration::from_secs(20)).await;
    let ctx = SessionContext::new();
    let options = CsvReadOptions::new().has_header(false).delimiter(b':').file_extension("");
    ctx.register_csv("passwd", "/etc/passwd", options).await.expect("register");
    // The same names as served tables do not help: a file scan is refused whatever its name.
    ctx.register_csv(
        "customers",
        "/etc/passwd",
        CsvReadOptions::new().has_header(false).delimiter(b':').file_extension(""),
    )
    .await
    .expect("register");
    let mut refused = Vec::new();
    for (leaf, sql) in [
        ("file scan", "SELECT * FROM passwd"),
        ("file scan named like a dataset", "SELECT * FROM customers"),
        ("values", "SELECT * FROM (VALUES (1), (2)) AS t(x)"),
        ("file scan in a scalar subquery", "SELECT (SELECT count(*) FROM passwd) AS n"),
    ] {
        let bytes = plan_bytes(&ctx, sql).await;
        let err = execute_plan(&tier, bytes).await.expect_err(leaf);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{leaf}: {err}");
        assert!(!err.message().contains("root:"), "{leaf} leaked file contents: {err}");
        refused.push((leaf, err.message().to_string()));
    }
    assert!(refused[0].1.contains("/etc/passwd") && refused[0].1.contains("refused"), "{refused:?}");

    // A view scan (the SQL planner inlines views, so build the node by hand) over a file.
    let inner = ctx.sql("SELECT * FROM passwd").await.expect("plan").into_unoptimized_plan();
    let view = datafusion::catalog::view::ViewTable::new(inner, None);
    let source = datafusion::datasource::provider_as_source(std::sync::Arc::new(view));
    let plan = datafusion::logical_expr::LogicalPlanBuilder::scan("customers", source, None)
        .expect("scan")
        .build()
        .expect("plan");
    let bytes = datafusion_proto::bytes::logical_plan_to_bytes(&plan).expect("encodes").to_vec();
    let err = execute_plan(&tier, bytes).await.expect_err("view");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(!err.message().contains("root:"), "{err}");

    // A CSV scan whose delimiter is empty made datafusion-proto panic while decoding.
    use prost::Message;
    let mut node =
        datafusion_proto::protobuf::LogicalPlanNode::decode(plan_bytes(&ctx, "SELECT * FROM passwd").await.as_slice())
            .expect("proto");
    let mut patched = false;
    patch_delimiters(&mut node, &mut patched);
    assert!(patched, "no CSV options found in the plan");
    let err = execute_plan(&tier, node.encode_to_vec()).await.expect_err("empty delimiter");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // Garbage bytes for a plan.
    let err = execute_plan(&tier, vec![0xff, 0xff, 0xff, 0x0f]).await.expect_err("garbage");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    still_answers(&tier).await;
}

/// Empties the delimiter of every CSV scan in a plan.
fn patch_delimiters(node: &mut datafusion_proto::protobuf::LogicalPlanNode, patched: &mut bool) {
    use datafusion_proto::protobuf::listing_table_scan_node::FileFormatType;
    use datafusion_proto::protobuf::logical_plan_node::LogicalPlanType;
    match node.logical_plan_type.as_mut() {
        Some(LogicalPlanType::ListingScan(scan)) => {
            if let Some(FileFormatType::Csv(csv)) = scan.file_format_type.as_mut()
                && let Some(options) = csv.options.as_mut()
            {
                options.delimiter.clear();
                *patched = true;
            }
        }
        Some(LogicalPlanType::Projection(p)) => {
            if let Some(input) = p.input.as_mut() {
                patch_delimiters(input, patched);
            }
        }
        _ => {}
    }
}

/// A valid Arrow IPC stream of one Int64 column `$1` with `values`, and where its record
/// batch message's metadata lies in the bytes (to be made to lie).
fn int64_ipc(values: Vec<Option<i64>>) -> (Vec<u8>, std::ops::Range<usize>) {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![Field::new("$1", DataType::Int64, true)]));
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from(values))]).expect("batch");
    let mut bytes = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &schema).expect("writer");
    writer.write(&batch).expect("write");
    writer.finish().expect("finish");
    drop(writer);
    let schema_len = i32::from_le_bytes(bytes[4..8].try_into().expect("4")) as usize;
    let at = 8 + schema_len;
    let meta_len = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4")) as usize;
    (bytes, at + 8..at + 8 + meta_len)
}

/// An Arrow IPC stream of one Int64 column whose record batch message claims a body of 2 GiB.
pub fn lying_ipc() -> Vec<u8> {
    let (mut bytes, meta) = int64_ipc(vec![Some(1), None, Some(3)]);
    let real = arrow::ipc::root_as_message(&bytes[meta.clone()]).expect("message").bodyLength();
    let offset = bytes[meta.clone()].windows(8).position(|w| w == real.to_le_bytes()).expect("field");
    bytes[meta.start + offset..meta.start + offset + 8].copy_from_slice(&(2i64 << 30).to_le_bytes());
    bytes
}

/// A valid-looking Arrow IPC stream whose values buffer claims to run 1 MiB past the message
/// body: Arrow's reader panics on it (arrow-buffer's slice bounds assertion).
pub fn panicking_ipc() -> Vec<u8> {
    let (mut bytes, meta) = int64_ipc(vec![Some(1), Some(2), Some(3)]);
    // The values buffer's (offset, length) pair: three Int64 values, 24 bytes.
    let length = bytes[meta.clone()].windows(8).rposition(|w| w == 24i64.to_le_bytes()).expect("buffer length");
    bytes[meta.start + length..meta.start + length + 8].copy_from_slice(&(24i64 + (1 << 20)).to_le_bytes());
    bytes
}

#[tokio::test]
async fn a_decoder_panic_on_client_bytes_is_a_refusal_not_a_log_flood() {
    let tier = Tier::start("platform-service", &config("")).await;
    for _ in 0..20 {
        let query = SqlQuery { sql: "SELECT $1".into(), params: panicking_ipc().into() };
        let err = tier_client(&tier)
            .await
            .execute(ExecuteRequest { context: None, query: Some(execute_request::Query::Sql(query)) })
            .await
            .expect_err("malformed parameters");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        // Only the caught panic says this: the bytes reached Arrow's decoder and it panicked.
        assert!(err.message().contains("its decoder failed"), "{err}");
    }
    still_answers(&tier).await;
    let logs = tier.logs();
    assert!(!logs.contains("panicked at"), "a contained panic reached stderr outside the log:\n{logs}");
}

#[tokio::test]
async fn hostile_queries_get_clear_errors_and_leave_memory_near_its_baseline() {
    let tier = Tier::start(
        "platform-service",
        &config("limits:\n  memory_limit: 256MiB\n  plan_cache_size: 32MiB\n  max_query_size: 4MiB\n  max_request_body: 8MiB\n"),
    )
    .await;
    tier.wait_ready(Duration::from_secs(20)).await;
    still_answers(&tier).await;
    let baseline = peak_rss(&tier);

    // Lying Arrow lengths in tier-protocol parameters, four at once.
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut client = tier_client(&tier).await;
        calls.push(tokio::spawn(async move {
            let query = SqlQuery { sql: "SELECT $1".into(), params: lying_ipc().into() };
            client.execute(ExecuteRequest { context: None, query: Some(execute_request::Query::Sql(query)) }).await
        }));
    }
    for call in calls {
        let err = call.await.expect("join").expect_err("lying parameters");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains("claims a body of 2147483648 bytes"), "{err}");
    }
    // ... and in an edge upload (decoded before the platform looks at the dataset).
    let upload = IngestRequest {
        edge_id: "e".into(),
        batches: vec![IngestBatch { seq: 1, dataset: "orders".into(), batch: lying_ipc().into() }],
        context: None,
    };
    let err = tier_client(&tier).await.ingest(upload).await.expect_err("lying upload");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("claims a body"), "{err}");

    // Deep expressions: a clear error naming the limit; a long OR chain becomes an IN list.
    let sum = vec!["1"; 1500].join("+");
    let (code, body) = tier.sql(&format!("SELECT {sum}")).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("limits.max_expression_depth"), "{body}");
    let err = tier.flight_query(&format!("SELECT {sum}")).await.expect_err("deep over Flight");
    assert!(err.message().contains("limits.max_expression_depth"), "{err}");
    let or_chain: Vec<String> = (1..=600).map(|i| format!("customer_id = {i}")).collect();
    let rows = tier.rows(&format!("SELECT count(*) AS n FROM customers WHERE {}", or_chain.join(" OR "))).await;
    assert_eq!(rows[0]["n"], 200);
    let or_chain: Vec<String> = (1..=600).map(|i| format!("order_id = {i}")).collect();
    let rows = tier.rows(&format!("SELECT count(*) AS n FROM orders WHERE {}", or_chain.join(" OR "))).await;
    assert_eq!(rows[0]["n"], 600);

    // Constants of gigabytes, folded while planning: refused against the memory pool.
    for sql in
        ["SELECT repeat('x', 2000000000)", "SELECT array_repeat(1, 500000000)", "SELECT lpad('a', 2000000000, 'b')"]
    {
        let started = Instant::now();
        let (code, body) = tier.sql(sql).await;
        assert_eq!(code, 422, "{sql}: {body}");
        assert!(body["error"]["message"].as_str().unwrap_or_default().contains("limits.memory_limit"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(10), "{sql} took {:?}", started.elapsed());
    }

    // Distinct large texts do not pile up in the plan cache.
    // 300 texts of 100 KB, each cached with its plan (~200 KB), overflow the 32 MiB bound.
    for i in 0..300 {
        let filler = "x".repeat(100 << 10);
        let (code, body) = tier.sql(&format!("SELECT {i} AS i WHERE '{filler}' <> 'y'")).await;
        assert_eq!(code, 200, "{body}");
    }
    let metrics = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    let cached: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("strata_plan_cache_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("plan cache bytes");
    assert!(cached > 8 << 20, "large texts were not cached at all ({cached} bytes)");
    assert!(cached <= 32 << 20, "plan cache holds {cached} bytes over its 32 MiB bound");
    let (code, body) = tier.sql(&format!("SELECT 1 WHERE '{}' <> ''", "y".repeat(5 << 20))).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("limits.max_query_size"), "{body}");

    still_answers(&tier).await;
    let peak = peak_rss(&tier);
    assert!(peak < baseline + (400 << 20), "peak memory grew from {} MB to {} MB", baseline >> 20, peak >> 20);
    eprintln!("peak RSS: baseline {} MB, after the hostile inputs {} MB", baseline >> 20, peak >> 20);
}

#[tokio::test]
async fn silent_connections_are_bounded_and_timed_out() {
    let tier = Tier::start(
        "platform-service",
        &config("server:\n  flight_addr: 127.0.0.1:0\n  http_addr: 127.0.0.1:0\n  max_connections: 40\n  handshake_timeout: 1s\n"),
    )
    .await;
    tier.wait_ready(Duration::from_secs(20)).await;
    let mut silent = Vec::new();
    for i in 0..100 {
        let addr = if i % 2 == 0 { tier.http_addr } else { tier.flight_addr };
        silent.push(std::net::TcpStream::connect(addr).expect("connect"));
    }
    // Past the handshake timeout every silent connection is closed, and queries answer again.
    tier.wait_for(Duration::from_secs(10), "a query answered while silent connections are held", || async {
        let answered = reqwest::Client::new()
            .post(tier.url("/v1/sql"))
            .body("SELECT 1 AS one")
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        answered.then_some(())
    })
    .await;
    assert!(tier.flight_query("SELECT 1").await.is_ok());
    let metrics = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    let value = |name: &str| -> u64 {
        metrics.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    assert!(value("strata_connections_refused_total ") >= 60, "{metrics}");
    assert!(value("strata_connections_timed_out_total ") >= 1, "{metrics}");
    assert!(tier.logs().contains("server.max_connections (40)"), "{}", tier.logs());
    drop(silent);

    // A client that trickles its request headers is closed by the header-read timeout.
    let trickled = async {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(tier.http_addr).await.expect("connect");
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.expect("start");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(8) {
            if stream.write_all(b"X").await.is_err() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    };
    let closed_after = trickled.await.expect("a trickling client kept its connection for 8 s");
    assert!(closed_after < Duration::from_secs(5), "closed after {closed_after:?}");

    // A query that answers after the handshake timeout, on a fresh connection, is not cut off.
    let started = Instant::now();
    let (code, body) = tier.sql("SELECT sum(value) AS s FROM generate_series(1, 600000000)").await;
    assert_eq!(code, 200, "{body}");
    eprintln!("slow query on a fresh connection answered after {:?}", started.elapsed());
}

#[tokio::test]
async fn version_streams_are_capped_and_caller_deadlines_are_kept() {
    let tier = Tier::start("platform-service", &config("limits:\n  max_subscribers: 2\n")).await;
    tier.wait_ready(Duration::from_secs(20)).await;
    let subscribe = || SubscribeRequest { dataset: "orders".into(), ..SubscribeRequest::default() };
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(tier_client(&tier).await.subscribe(subscribe()).await.expect("subscribe").into_inner());
    }
    let err = tier_client(&tier).await.subscribe(subscribe()).await.expect_err("third stream");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("limits.max_subscribers"), "{err}");
    drop(open);

    // A forwarded query whose caller's deadline is near ends by then, not at our 30 s timeout.
    let deadline = std::time::SystemTime::now() + Duration::from_millis(500);
    let context = QueryContext {
        deadline_unix_ms: deadline.duration_since(std::time::UNIX_EPOCH).expect("epoch").as_millis() as u64,
        ..QueryContext::default()
    };
    let query =
        SqlQuery { sql: "SELECT count(*) FROM generate_series(1, 100000000000)".into(), params: Default::default() };
    let started = Instant::now();
    let outcome = async {
        let mut frames = tier_client(&tier)
            .await
            .execute(ExecuteRequest { context: Some(context), query: Some(execute_request::Query::Sql(query)) })
            .await?
            .into_inner();
        while frames.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let err = outcome.expect_err("past the caller's deadline");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    still_answers(&tier).await;
}

#[tokio::test]
async fn http2_abuse_oversized_headers_and_long_lists_are_refused_and_the_tier_answers() {
    let tier = Tier::start("platform-service", &config("")).await;
    tier.wait_ready(Duration::from_secs(20)).await;

    // Rapid reset (CVE-2023-44487): open streams and reset them at once, as fast as the
    // client can, on several connections. Each stream costs the server a task that is
    // cancelled at once; streams reset before the server took them count toward a GOAWAY.
    // The tier must keep answering with its memory near where it was.
    let before = peak_rss(&tier);
    let mut opened = 0;
    for _ in 0..4 {
        opened += rapid_reset(tier.flight_addr, 5_000).await;
    }
    assert!(opened > 1_000, "only {opened} streams could be opened");
    still_answers(&tier).await;
    let grown = peak_rss(&tier).saturating_sub(before);
    assert!(grown < 200 << 20, "peak memory grew {} MiB under {opened} reset streams", grown >> 20);

    // Metadata far over the header bound is refused; the connection's next call works.
    let mut flight = tier.flight().await;
    flight.set_header("x-padding", "x".repeat(64 << 10));
    assert!(flight.execute("SELECT 1".into(), None).await.is_err(), "64 KiB of metadata accepted");
    still_answers(&tier).await;
    // HTTP/1.1 headers past the buffer bound.
    let response = reqwest::Client::new()
        .post(tier.url("/v1/sql"))
        .header("x-padding", "x".repeat(100 << 10))
        .body("SELECT 1")
        .send()
        .await;
    assert!(response.map(|r| !r.status().is_success()).unwrap_or(true), "100 KiB of headers accepted");
    still_answers(&tier).await;

    // An IN list over limits.max_in_list, and too many parameters.
    let list: Vec<String> = (0..70_000).map(|i| i.to_string()).collect();
    let (code, body) = tier.sql(&format!("SELECT count(*) FROM orders WHERE order_id IN ({})", list.join(","))).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("limits.max_in_list"), "{body}");
    let params: Vec<String> = (1..=70_000).map(|i| format!("${i}")).collect();
    let (code, body) = tier.sql(&format!("SELECT {}", params.join(","))).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("limits.max_parameters"), "{body}");
    still_answers(&tier).await;
}

/// Opens up to `count` HTTP/2 streams on one connection, resetting each at once; returns
/// how many were opened before the server closed the connection.
async fn rapid_reset(addr: std::net::SocketAddr, count: usize) -> usize {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let mut opened = 0;
    for _ in 0..count {
        let Ok(ready) = client.clone().ready().await else { break };
        client = ready;
        let request = http::Request::post("/arrow.flight.protocol.FlightService/DoGet")
            .header("content-type", "application/grpc")
            .body(())
            .expect("request");
        let Ok((_, mut stream)) = client.send_request(request, false) else { break };
        stream.send_reset(h2::Reason::CANCEL);
        opened += 1;
    }
    drop(client);
    driver.abort();
    opened
}
