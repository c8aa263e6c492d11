//! Bad SQL, writes, unknown tables and every limit give a clear error with the right
//! status, and the server answers the next query.

use std::time::Duration;

use strata_integration_tests::tier::Tier;
use strata_integration_tests::workspace_root;

fn config(limits: &str) -> String {
    let data = workspace_root().join("examples/data");
    format!(
        "limits:\n{limits}\ndatasets:\n  - name: customers\n    from: file:{}/customers.csv\n  - name: orders\n    from: file:{}/orders.ndjson\n    acceleration: {{refresh: full}}\n",
        data.display(),
        data.display()
    )
}

async fn expect_error(tier: &Tier, sql: &str, status: u16, kind: &str, needle: &str) {
    let (code, body) = tier.sql(sql).await;
    assert_eq!(code, status, "`{sql}` -> {body}");
    assert_eq!(body["error"]["kind"], kind, "`{sql}` -> {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "`{sql}`: expected `{needle}` in `{message}`");
    // The server is still fine.
    assert_eq!(tier.rows("SELECT count(*) AS n FROM customers").await[0]["n"], 200);
}

#[tokio::test]
async fn bad_queries_get_clear_errors_and_the_server_keeps_answering() {
    let tier =
        Tier::start("platform-service", &config("  max_result_rows: 1000\n  query_timeout: 2s\n  memory_limit: 32MiB"))
            .await;
    tier.wait_ready(Duration::from_secs(20)).await;

    expect_error(&tier, "SELEC * FROM customers", 400, "parse", "Line: 1, Column: 1").await;
    expect_error(&tier, "SELECT name FROM customers WHERE", 400, "parse", "found: EOF").await;
    expect_error(&tier, "SELECT * FROM no_such_table", 400, "plan", "no_such_table").await;
    expect_error(&tier, "SELECT no_such_column FROM customers", 400, "plan", "no_such_column").await;
    expect_error(&tier, "CREATE TABLE t AS SELECT 1", 403, "read_only", "CREATE TABLE").await;
    expect_error(&tier, "INSERT INTO customers VALUES (1, 'x', 'eu', '2024-01-01')", 403, "read_only", "INSERT").await;
    expect_error(&tier, "DROP TABLE customers", 403, "read_only", "DROP TABLE").await;
    expect_error(
        &tier,
        "SELECT * FROM orders CROSS JOIN customers",
        422,
        "resources_exhausted",
        "limits.max_result_rows",
    )
    .await;
    expect_error(
        &tier,
        "SELECT count(*) FROM generate_series(1, 100000000000) a",
        504,
        "timeout",
        "limits.query_timeout",
    )
    .await;
    expect_error(
        &tier,
        "SELECT value FROM generate_series(1, 20000000) ORDER BY value DESC LIMIT 5 OFFSET 10000000",
        422,
        "resources_exhausted",
        "limits.memory_limit",
    )
    .await;

    // Flight SQL: an error, then a good query on the same connection.
    let mut client = tier.flight().await;
    let err = client.execute("SELECT * FROM nope".to_string(), None).await.expect_err("unknown table");
    assert!(err.to_string().contains("nope"), "{err}");
    let info = client.execute("SELECT 41 + 1 AS answer".to_string(), None).await.expect("good query after error");
    assert_eq!(info.endpoint.len(), 1);
    let err = tier.flight_query("DELETE FROM customers").await.expect_err("DML");
    assert!(err.message().contains("read-only"), "{err}");

    let text = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(text.contains("strata_queries_total{outcome=\"error\"}"), "{text}");
    assert!(text.contains("strata_dataset_rows{dataset=\"orders\"} 2000"), "{text}");
}

#[tokio::test]
async fn over_the_concurrency_limit_queries_are_shed_with_429() {
    let tier = Tier::start("platform-service", &config("  max_concurrent_queries: 1\n  query_timeout: 3s")).await;
    let spawn_slow = || {
        let url = tier.url("/v1/sql");
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .body("SELECT count(*) FROM generate_series(1, 100000000000)")
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let mut slow = spawn_slow();
    // Wait until the slow query holds the only slot.
    let mut shed = None;
    for _ in 0..200 {
        if slow.is_finished() {
            // Our probe took the slot first and the slow query was the one shed: start it again.
            assert_eq!(slow.await.expect("join").expect("response"), 429);
            slow = spawn_slow();
            continue;
        }
        let (code, body) = tier.sql("SELECT 1").await;
        if code == 429 {
            shed = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = shed.expect("a second query was shed while the first ran");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("limits.max_concurrent_queries"), "{body}");
    // The autoscaling gauge counts the query holding the slot, and nothing else.
    assert_eq!(in_flight(&tier).await, 1);
    assert_eq!(slow.await.expect("join").expect("response"), 504);
    // The gauge drops when the answer's stream ends, a moment after the client saw it.
    tier.wait_for(Duration::from_secs(2), "a finished query to leave the in-flight gauge", || async {
        (in_flight(&tier).await == 0).then_some(())
    })
    .await;
    assert_eq!(tier.rows("SELECT 1 AS one").await[0]["one"], 1);
    // Shed queries are counted (they were invisible in /metrics).
    let text = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    let shed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("strata_queries_shed_total "))
        .and_then(|v| v.parse().ok())
        .expect("strata_queries_shed_total");
    assert!(shed >= 1, "{text}");
}

async fn in_flight(tier: &Tier) -> u64 {
    let text = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("strata_queries_in_flight "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no strata_queries_in_flight in {text}"))
}

#[tokio::test]
async fn http_formats_health_and_graceful_exit() {
    let mut tier = Tier::start("platform-service", &config("  max_result_rows: 100000")).await;
    tier.wait_ready(Duration::from_secs(20)).await;
    let client = reqwest::Client::new();
    let csv = client
        .post(tier.url("/v1/sql"))
        .header("accept", "text/csv")
        .body("SELECT customer_id, name FROM customers ORDER BY customer_id LIMIT 2")
        .send()
        .await
        .expect("csv")
        .text()
        .await
        .expect("text");
    assert_eq!(csv, "customer_id,name\n1,Customer 001\n2,Customer 002\n");
    let arrow_bytes = client
        .post(tier.url("/v1/sql"))
        .header("accept", "application/vnd.apache.arrow.stream")
        .body("SELECT order_id FROM orders ORDER BY order_id")
        .send()
        .await
        .expect("arrow")
        .bytes()
        .await
        .expect("bytes");
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow_bytes), None).expect("ipc");
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 2000);
    // An empty result is still valid JSON.
    assert_eq!(tier.rows("SELECT * FROM customers WHERE customer_id < 0").await.len(), 0);
    // A small answer goes out whole, with its length; one larger than what is held back
    // before the headers (1 MiB of Arrow) streams, chunked, in every format.
    let big = "SELECT value, 'a label for row ' || value AS label FROM generate_series(1, 90000) ORDER BY value";
    for accept in ["application/json", "text/csv", "application/vnd.apache.arrow.stream"] {
        let small = client.post(tier.url("/v1/sql")).header("accept", accept).body("SELECT 1 AS one");
        let small = small.send().await.expect("small");
        assert!(small.headers().contains_key("content-length"), "{accept}: {:?}", small.headers());
        let response = client.post(tier.url("/v1/sql")).header("accept", accept).body(big).send().await.expect("big");
        assert_eq!(response.status(), 200, "{accept}");
        assert!(!response.headers().contains_key("content-length"), "{accept} streamed: {:?}", response.headers());
        let bytes = response.bytes().await.expect("bytes");
        let (rows, last) = match accept {
            "application/json" => {
                let rows: Vec<serde_json::Value> = serde_json::from_slice(&bytes).expect("json");
                (rows.len(), rows.last().map(|r| r["label"].to_string()).unwrap_or_default())
            }
            "text/csv" => {
                let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
                (text.lines().count() - 1, text.lines().last().unwrap_or_default().to_string())
            }
            _ => {
                let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).expect("ipc");
                (reader.map(|b| b.expect("batch").num_rows()).sum(), "a label for row 90000".to_string())
            }
        };
        assert_eq!(rows, 90_000, "{accept}");
        assert!(last.contains("a label for row 90000"), "{accept}: {last}");
    }
    let (code, datasets) = tier.get_json("/v1/datasets").await;
    assert_eq!(code, 200);
    let orders = &datasets["datasets"][1];
    assert_eq!(orders["rows"], 2000);
    assert_eq!(orders["state"], "ready");
    assert_eq!(tier.terminate(), Some(0), "SIGTERM exits cleanly");
    // Shutdown runs in order: drain the servers, then stop the background work (the datasets'
    // refresh tasks), then exit.
    let logs = tier.logs();
    let step = |text: &str| logs.find(text).unwrap_or_else(|| panic!("no `{text}` in the log:\n{logs}"));
    let steps =
        [step("draining in-flight requests"), step("in-flight requests drained"), step("background tasks stopped")];
    assert!(steps.is_sorted(), "shutdown steps out of order: {steps:?}\n{logs}");
    assert!(logs.trim_end().ends_with("stopped"), "the last line says the process stopped:\n{logs}");
    assert!(logs.contains("tasks=2"), "both datasets' refresh tasks were tracked and stopped:\n{logs}");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_query() {
    // One slot and a long timeout: the next query can only run if the abandoned one was
    // really cancelled (its plan dropped, its permit freed) rather than left running.
    let tier = Tier::start("platform-service", &config("  max_concurrent_queries: 1\n  query_timeout: 120s")).await;
    let abandoned = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client")
        .post(tier.url("/v1/sql"))
        .body("SELECT count(*) FROM generate_series(1, 100000000000)")
        .send()
        .await;
    assert!(abandoned.is_err(), "the slow query should not have finished");
    tier.wait_for(Duration::from_secs(5), "the abandoned query to release the only slot", || async {
        (tier.sql("SELECT 1 AS one").await.0 == 200).then_some(())
    })
    .await;
    let text = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(text.contains("strata_queries_total{outcome=\"cancelled\"} 1"), "{text}");
}

#[tokio::test]
async fn after_sigterm_the_shutdown_delay_reports_not_ready_while_still_answering() {
    let mut tier =
        Tier::start("platform-service", "region: eu\nserver:\n  shutdown_delay: 3s\n  shutdown_grace: 5s\n").await;
    tier.wait_ready(Duration::from_secs(20)).await;
    tier.signal("TERM");
    // Load balancers see not-ready first, and queries still answer meanwhile.
    tier.wait_for(Duration::from_secs(2), "/v1/ready to report not ready", || async {
        (tier.get_json("/v1/ready").await.0 == 503).then_some(())
    })
    .await;
    let (code, body) = tier.sql("SELECT 1 AS one").await;
    assert_eq!(code, 200, "still answering during the delay: {body}");
    assert_eq!(tier.wait_exit(), Some(0));
    let logs = tier.logs();
    assert!(logs.contains("still accepting while load balancers notice"), "{logs}");
    let delay = logs.find("still accepting").expect("delay step");
    let drain = logs.find("listeners closed").expect("drain step");
    assert!(delay < drain, "the delay comes before the listeners close:\n{logs}");
}

/// A SIGTERM that arrives the moment a tier listens (a pod stopped right after it started)
/// is a graceful shutdown like any other: the signal handlers are in place before the
/// listeners. They were registered by a task polled after the listeners were up, and on a
/// loaded machine a SIGTERM in between met the default action (the tier died, its
/// connections reset: seen as a flaky `after_sigterm_...` test). A race: on an idle machine
/// this test passes without the fix too; it fails when the window is hit.
#[tokio::test]
async fn a_sigterm_right_after_start_drains_and_exits_0() {
    for _ in 0..5 {
        let mut tier = Tier::start("platform-service", "region: eu\n").await;
        tier.signal("TERM");
        assert_eq!(tier.wait_exit(), Some(0), "killed by the signal instead of draining:\n{}", tier.logs());
        assert!(tier.logs().contains("listeners closed"), "{}", tier.logs());
    }
}
