//! The tiers together: a platform per region and app-sidecars, as real processes. Routing
//! (local, cache misses, cross-region, mixed), replication by version, and the upstream
//! path's resilience when a platform dies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow_flight::Ticket;
use arrow_flight::flight_service_client::FlightServiceClient;
use futures::StreamExt;
use serde_json::Value;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::{free_port, wait_until, workspace_root};

/// The sample data of `examples/`, plus a small regions table and a us sensors table.
fn write_data(dir: &std::path::Path) {
    let examples = workspace_root().join("examples/data");
    std::fs::copy(examples.join("customers.csv"), dir.join("customers.csv")).expect("copy customers");
    std::fs::copy(examples.join("orders.ndjson"), dir.join("orders.ndjson")).expect("copy orders");
    std::fs::write(dir.join("regions.csv"), "region,label\neu,Europe\napac,Asia Pacific\nus,Americas\n")
        .expect("regions");
    let mut sensors = String::new();
    for i in 0..240 {
        sensors.push_str(&format!("{{\"sensor_id\": {}, \"celsius\": {}.5}}\n", i % 12, 10 + i % 17));
    }
    std::fs::write(dir.join("sensors.ndjson"), sensors).expect("sensors");
}

fn us_config(dir: &std::path::Path) -> String {
    format!(
        "region: us\ndatasets:\n  - name: sensors\n    from: file:{}/sensors.ndjson\n    acceleration: {{}}\n",
        dir.display()
    )
}

fn eu_config(dir: &std::path::Path, us: Option<SocketAddr>) -> String {
    let peers = us.map(|a| format!("peers:\n  - region: us\n    endpoint: http://{a}\n")).unwrap_or_default();
    let d = dir.display();
    format!(
        "region: eu\n{peers}datasets:\n  - name: customers\n    from: file:{d}/customers.csv\n    acceleration: {{}}\n  - name: orders\n    from: file:{d}/orders.ndjson\n    acceleration: {{}}\n  - name: regions\n    from: file:{d}/regions.csv\n"
    )
}

fn sidecar_config(upstreams: &[SocketAddr], extra_replica: &str) -> String {
    let endpoints: Vec<String> = upstreams.iter().map(|a| format!("http://{a}")).collect();
    format!(
        "region: eu\nupstream:\n  endpoints: [{}]\n  call_timeout: 2s\n  breaker_open_for: 300ms\n  catalog_interval: 1s\nreplicas:\n  - name: orders\n  - name: customers\n    where: \"region = 'eu'\"\n{extra_replica}",
        endpoints.join(", ")
    )
}

/// Waits until every replica of the sidecar has loaded.
async fn wait_replicas(sidecar: &Tier, names: &[&str]) {
    sidecar
        .wait_for(Duration::from_secs(30), &format!("replicas {names:?} to load"), || async {
            let (_, body) = sidecar.get_json("/v1/datasets").await;
            names
                .iter()
                .all(|n| {
                    body["datasets"]
                        .as_array()
                        .is_some_and(|ds| ds.iter().any(|d| d["name"] == *n && d["state"] == "ready"))
                })
                .then_some(())
        })
        .await
}

#[tokio::test]
async fn sidecar_routes_each_query_and_answers_like_the_platform() {
    let dir = tempfile::tempdir().expect("dir");
    write_data(dir.path());
    let us = Tier::start("platform-service", &us_config(dir.path())).await;
    us.wait_ready(Duration::from_secs(20)).await;
    let eu = Tier::start("platform-service", &eu_config(dir.path(), Some(us.flight_addr))).await;
    eu.wait_ready(Duration::from_secs(20)).await;
    let sidecar = Tier::start("app-sidecar", &sidecar_config(&[eu.flight_addr], "")).await;
    sidecar.wait_ready(Duration::from_secs(20)).await;
    wait_replicas(&sidecar, &["orders", "customers"]).await;

    let cases: [(&str, &str, &str); 6] = [
        (
            "SELECT status, count(*) AS n, round(sum(amount), 2) AS total FROM orders GROUP BY status ORDER BY status",
            "local",
            "local",
        ),
        ("SELECT customer_id, name FROM customers WHERE region = 'eu' ORDER BY customer_id", "local", "local"),
        ("SELECT region, count(*) AS n FROM customers GROUP BY region ORDER BY region", "forwarded", "outside_subset"),
        ("SELECT count(*) AS n FROM regions", "forwarded", "not_accelerated"),
        (
            "SELECT sensor_id, count(*) AS n, max(celsius) AS top FROM sensors GROUP BY sensor_id ORDER BY sensor_id",
            "forwarded",
            "cross_region",
        ),
        (
            "SELECT r.label, count(*) AS n FROM orders o JOIN customers c ON o.customer_id = c.customer_id JOIN regions r ON r.region = c.region WHERE c.region = 'eu' GROUP BY r.label ORDER BY r.label",
            "mixed",
            "not_accelerated",
        ),
    ];
    for (sql, route, reason) in cases {
        let (rows, got_route, got_reason) = sidecar.routed(sql, &[]).await;
        assert_eq!((got_route.as_str(), got_reason.as_str()), (route, reason), "route of `{sql}`");
        let home = if sql.contains("sensors") { &us } else { &eu };
        assert_eq!(rows, home.rows(sql).await, "`{sql}` through the sidecar differs from its home platform");
        assert!(!rows.is_empty(), "`{sql}` returned nothing");
    }

    // A wrong answer is the worst outcome: outside the subset, the complete answer, not the eu rows.
    let (rows, route, _) = sidecar.routed("SELECT count(*) AS n FROM customers", &[]).await;
    assert_eq!(route, "forwarded");
    assert_eq!(rows[0]["n"], 200, "every customer, not only the 68 replicated eu ones");
    let (rows, route, _) = sidecar.routed("SELECT count(*) AS n FROM customers WHERE region = 'eu'", &[]).await;
    assert_eq!((rows[0]["n"].as_i64(), route.as_str()), (Some(68), "local"));

    // Strong consistency goes to the home platform even though a local copy exists.
    let (_, route, reason) = sidecar.routed("SELECT count(*) FROM orders", &[("strata-consistency", "strong")]).await;
    assert_eq!((route.as_str(), reason.as_str()), ("forwarded", "strong_consistency"));

    // Freshness: the versions read and their age.
    let (_, _, headers) = sidecar.sql_with("SELECT count(*) FROM orders", &[]).await;
    let versions = headers.get("strata-versions").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(versions.starts_with("orders=1@"), "versions header: {versions}");

    // Flight clients see the route in the response headers and the first message's app_metadata.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", sidecar.flight_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut flight = FlightServiceClient::new(channel);
    let ticket = Ticket::new(r#"{"sql": "SELECT count(*) FROM regions"}"#);
    let response = flight.do_get(ticket).await.expect("do_get");
    assert_eq!(response.metadata().get("strata-route").and_then(|v| v.to_str().ok()), Some("forwarded"));
    let mut stream = response.into_inner();
    let first = stream.next().await.expect("a message").expect("ok");
    let meta: Value = serde_json::from_slice(&first.app_metadata).expect("app_metadata is JSON");
    assert_eq!((meta["route"].as_str(), meta["reason"].as_str()), (Some("forwarded"), Some("not_accelerated")));

    // Every route is counted.
    let metrics = reqwest::get(sidecar.url("/metrics")).await.expect("metrics").text().await.expect("text");
    for line in [
        r#"strata_query_routes_total{route="local",reason="local"}"#,
        r#"strata_query_routes_total{route="forwarded",reason="outside_subset"}"#,
        r#"strata_query_routes_total{route="forwarded",reason="cross_region"}"#,
        r#"strata_query_routes_total{route="mixed",reason="not_accelerated"}"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    // Cold start: a sidecar whose copy is still arriving forwards, and still answers right.
    let slow =
        sidecar_config(&[eu.flight_addr], "").replace("  - name: orders\n", "  - name: orders\n    max_rate: 2KiB\n");
    let cold = Tier::start("app-sidecar", &slow).await;
    cold.wait_ready(Duration::from_secs(20)).await;
    let sql = "SELECT count(*) AS n FROM orders";
    let (rows, route, reason) = cold.routed(sql, &[]).await;
    assert_eq!((route.as_str(), reason.as_str()), ("forwarded", "cold_start"));
    assert_eq!(rows, eu.rows(sql).await);
}

#[tokio::test]
async fn replication_sends_increments_and_resumes_after_a_restart_without_touching_the_source() {
    let pg = PgServer::start();
    let client = pg.connect().await;
    client
        .batch_execute(
            "CREATE TABLE events (id bigint NOT NULL, at timestamp NOT NULL, kind text NOT NULL);
             INSERT INTO events SELECT g, timestamp '2025-01-01' + g * interval '1 second', 'k' || (g % 7)
               FROM generate_series(1, 5000) g;",
        )
        .await
        .expect("seed");
    let platform_config = format!(
        "region: eu\ndatasets:\n  - name: events\n    from: postgres:public.events\n    params: {}\n    acceleration:\n      refresh: append\n      time_column: at\n      primary_key: [id]\n",
        pg.params_yaml()
    );
    let platform = Tier::start("platform-service", &platform_config).await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let scans = || async {
        let row = pg
            .connect()
            .await
            .query_one("SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'events'", &[])
            .await
            .expect("stats");
        row.get::<_, i64>(0)
    };
    // PostgreSQL publishes a backend's statistics a little after its transactions end:
    // take the count once it has settled on the platform's first load.
    let scans_before = settled(scans, 1).await;

    let sidecar_yaml =
        format!("region: eu\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: events\n", platform.flight_addr);
    let mut sidecar = Tier::start("app-sidecar", &sidecar_yaml).await;
    let second = Tier::start("app-sidecar", &sidecar_yaml).await;
    wait_replicas(&sidecar, &["events"]).await;
    wait_replicas(&second, &["events"]).await;
    let first = sidecar.dataset("events").await;
    assert_eq!(first["version"], 1);
    assert_eq!(first["replication"]["snapshots"], 1);
    let snapshot_bytes = first["replication"]["bytes_received"].as_u64().expect("bytes");
    assert!(snapshot_bytes > 50_000, "the snapshot carries the rows: {first}");

    // New rows at the source: the platform refreshes, the sidecar receives only the increment.
    client
        .batch_execute(
            "INSERT INTO events SELECT g, timestamp '2025-01-01' + g * interval '1 second', 'new' FROM generate_series(5001, 5010) g",
        )
        .await
        .expect("insert");
    let (status, refreshed) = platform.post("/v1/datasets/events/refresh").await;
    assert_eq!(status, 200, "{refreshed}");
    assert_eq!(refreshed["version"], 2);
    let status = converge(&sidecar, 2).await;
    assert_eq!(status["replication"]["snapshots"], 1, "no second snapshot: {status}");
    assert_eq!(status["replication"]["increments"], 1, "{status}");
    let increment_bytes = status["replication"]["bytes_received"].as_u64().expect("bytes") - snapshot_bytes;
    assert!(increment_bytes * 20 < snapshot_bytes, "increment {increment_bytes} B vs snapshot {snapshot_bytes} B");
    let (rows, route, _) = sidecar.routed("SELECT count(*) AS n, count(DISTINCT id) AS ids FROM events", &[]).await;
    assert_eq!(route, "local");
    assert_eq!((rows[0]["n"].as_i64(), rows[0]["ids"].as_i64()), (Some(5010), Some(5010)));

    // The primary key is indexed on the platform, and the replica indexes it too (the
    // platform's catalog says so); the increment's rows are in the index.
    for (tier, name) in [(&platform, "platform"), (&sidecar, "sidecar")] {
        let indexes = tier.dataset("events").await["indexes"].clone();
        assert_eq!(indexes[0]["columns"], serde_json::json!(["id"]), "{name}: {indexes}");
        assert!(indexes[0]["bytes"].as_u64().is_some_and(|b| b >= 4 * 5010), "{name}: {indexes}");
    }
    let before = sidecar.metric("strata_index_lookups_total").await;
    for id in [1, 5000, 5005, 5010, 5011] {
        let (rows, route, _) = sidecar.routed(&format!("SELECT id, kind FROM events WHERE id = {id}"), &[]).await;
        assert_eq!(route, "local");
        let want = match id {
            5001..=5010 => serde_json::json!([{"id": id, "kind": "new"}]),
            5011 => serde_json::json!([]),
            _ => serde_json::json!([{"id": id, "kind": format!("k{}", id % 7)}]),
        };
        assert_eq!(serde_json::json!(rows), want, "id {id}");
    }
    assert_eq!(
        sidecar.metric("strata_index_lookups_total").await - before,
        5,
        "each lookup answered from the replica's index"
    );

    // Killed while following the stream; the source changes meanwhile; a new sidecar process resumes.
    sidecar.kill();
    client
        .batch_execute(
            "INSERT INTO events SELECT g, timestamp '2025-01-01' + g * interval '1 second', 'later' FROM generate_series(5011, 5030) g",
        )
        .await
        .expect("insert");
    assert_eq!(platform.post("/v1/datasets/events/refresh").await.1["version"], 3);
    let restarted = Tier::start("app-sidecar", &sidecar_yaml).await;
    converge(&restarted, 3).await;
    let (rows, route, _) = restarted.routed("SELECT count(*) AS n FROM events WHERE kind = 'later'", &[]).await;
    assert_eq!((rows[0]["n"].as_i64(), route.as_str()), (Some(20), "local"));
    converge(&second, 3).await;
    assert_eq!(
        second.dataset("events").await["replication"]["snapshots"],
        1,
        "the running sidecar got increments only"
    );

    // The sidecars read the platform's copy: the source saw only the platform's refreshes
    // (each one index or sequential scan at most), not one query per sidecar.
    let source_scans = settled(scans, scans_before + 2).await - scans_before;
    assert!(source_scans <= 2, "{source_scans} scans of the source for 2 refreshes and 3 sidecars");
}

/// Waits until the sidecar holds `version` of `events` and returns its status.
async fn converge(sidecar: &Tier, version: u64) -> Value {
    sidecar
        .wait_for(Duration::from_secs(20), &format!("version {version} of events"), || async {
            sidecar.find_dataset("events").await.filter(|d| d["version"] == version)
        })
        .await
}

/// A counter read from PostgreSQL's statistics once it reaches `at_least` and then holds
/// still for half a second (statistics are published a little after the work).
async fn settled<F: std::future::Future<Output = i64>>(read: impl Fn() -> F, at_least: i64) -> i64 {
    let last = std::cell::Cell::new(None);
    wait_until(Duration::from_secs(20), &format!("a settled count of at least {at_least}"), || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = read().await;
        let previous = last.replace(Some(now));
        (now >= at_least && previous == Some(now)).then_some(now)
    })
    .await
}

/// Outcomes of a load loop, readable while it runs.
#[derive(Default)]
struct Tally {
    ok: std::sync::atomic::AtomicU64,
    errors: std::sync::Mutex<Vec<(Duration, u16, String)>>,
}

impl Tally {
    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn errors(&self) -> Vec<(Duration, u16, String)> {
        self.errors.lock().expect("tally").clone()
    }
}

/// Runs `sql` through the sidecar in a loop until `stop`, tallying outcomes.
fn load(sidecar: &Arc<Tier>, sql: &'static str, stop: &Arc<AtomicBool>) -> (Arc<Tally>, tokio::task::JoinHandle<()>) {
    let (sidecar, stop) = (Arc::clone(sidecar), Arc::clone(stop));
    let tally = Arc::new(Tally::default());
    let counts = Arc::clone(&tally);
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let (status, body, _) = sidecar.sql_with(sql, &[]).await;
            if status == 200 {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.errors.lock().expect("tally").push((started.elapsed(), status, body.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (tally, task)
}

#[tokio::test]
async fn platform_outage_keeps_local_answers_fails_forwarded_fast_and_recovers() {
    let dir = tempfile::tempdir().expect("dir");
    write_data(dir.path());
    let flight: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let config = eu_config(dir.path(), None);
    let mut platform = Tier::builder("platform-service").config(&config).at(flight, http).start().await;
    platform.wait_ready(Duration::from_secs(20)).await;
    let sidecar = Arc::new(Tier::start("app-sidecar", &sidecar_config(&[flight], "")).await);
    sidecar.wait_ready(Duration::from_secs(20)).await;
    wait_replicas(&sidecar, &["orders", "customers"]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (local, local_task) = load(&sidecar, "SELECT count(*) FROM orders WHERE status = 'paid'", &stop);
    let (forwarded, forwarded_task) = load(&sidecar, "SELECT count(*) FROM regions", &stop);
    wait_until(Duration::from_secs(10), "local and forwarded answers before the outage", || async {
        (local.ok() >= 10 && forwarded.ok() >= 3).then_some(())
    })
    .await;
    platform.kill();
    let local_before = local.ok();
    wait_until(Duration::from_secs(10), "forwarded failures and local answers during the outage", || async {
        (forwarded.errors().len() >= 5 && local.ok() >= local_before + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    local_task.await.expect("join");
    forwarded_task.await.expect("join");
    let local_errors = local.errors();
    assert!(local_errors.is_empty(), "local queries failed: {:?}", &local_errors[..1]);
    for (took, status, body) in &forwarded.errors() {
        assert_eq!(*status, 503, "{body}");
        assert!(body.contains("upstream unavailable"), "{body}");
        assert!(*took < Duration::from_secs(2), "a forwarded query waited {took:?}, past upstream.call_timeout");
    }

    // Back on the same address: forwarded queries recover without a sidecar restart.
    let platform = Tier::builder("platform-service").config(&config).at(flight, http).start().await;
    platform.wait_ready(Duration::from_secs(20)).await;
    // Within 2 s: the breaker's open period (300 ms here) and one probe, not a reconnect storm.
    sidecar
        .wait_for(Duration::from_secs(2), "forwarded queries to recover after the platform returned", || async {
            (sidecar.sql_with("SELECT count(*) FROM regions", &[]).await.0 == 200).then_some(())
        })
        .await;
    let (rows, route, _) = sidecar.routed("SELECT count(*) AS n FROM regions", &[]).await;
    assert_eq!((rows[0]["n"].as_i64(), route.as_str()), (Some(3), "forwarded"));

    // The restarted platform's versions are a new epoch (its version 1 is not the old
    // version 1): replication resumes on its own and takes a fresh snapshot.
    sidecar
        .wait_for(Duration::from_secs(10), "a fresh snapshot of orders after the restart", || async {
            (sidecar.dataset("orders").await["replication"]["snapshots"] == 2).then_some(())
        })
        .await;
    drop(platform);
}

#[tokio::test]
async fn with_two_platform_endpoints_killing_one_loses_no_forwarded_query() {
    let dir = tempfile::tempdir().expect("dir");
    write_data(dir.path());
    let config = eu_config(dir.path(), None);
    let mut first = Tier::start("platform-service", &config).await;
    let second = Tier::start("platform-service", &config).await;
    first.wait_ready(Duration::from_secs(20)).await;
    second.wait_ready(Duration::from_secs(20)).await;
    let sidecar =
        Arc::new(Tier::start("app-sidecar", &sidecar_config(&[first.flight_addr, second.flight_addr], "")).await);
    sidecar.wait_ready(Duration::from_secs(20)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4).map(|_| load(&sidecar, "SELECT count(*) FROM regions", &stop)).collect();
    let answered = || workers.iter().map(|(tally, _)| tally.ok()).sum::<u64>();
    wait_until(Duration::from_secs(10), "forwarded answers from both platforms", || async {
        (answered() >= 20).then_some(())
    })
    .await;
    first.kill();
    let before_kill = answered();
    wait_until(Duration::from_secs(10), "forwarded answers from the surviving platform", || async {
        (answered() >= before_kill + 40).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let ok = answered();
    let mut errors = Vec::new();
    for (tally, task) in workers {
        task.await.expect("join");
        errors.extend(tally.errors());
    }
    // Only a query already streaming from the killed platform can be lost: at most one per worker.
    assert!(errors.len() <= 4, "{} forwarded queries lost: {:?}", errors.len(), errors.first());
    assert!(ok > 40, "forwarded queries kept being answered by the other platform: {ok}");
}

/// Runs a prepared statement once per bound key, as ADBC does, returning each answer's
/// pretty-printed rows and its `strata-route` header.
async fn prepared_lookups(tier: &Tier, sql: &str, keys: &[(&str, i64)]) -> Vec<(String, String)> {
    use arrow::datatypes::{DataType, Field, Schema};
    let mut client = tier.flight().await;
    let mut statement = client.prepare(sql.to_string(), None).await.expect("prepare");
    let mut answers = Vec::new();
    for (region, id) in keys {
        let schema = Arc::new(Schema::new(vec![
            Field::new("$1", DataType::Utf8, false),
            Field::new("$2", DataType::Int64, false),
        ]));
        let params = arrow::array::RecordBatch::try_new(
            schema,
            vec![
                Arc::new(arrow::array::StringArray::from(vec![*region])),
                Arc::new(arrow::array::Int64Array::from(vec![*id])),
            ],
        )
        .expect("params");
        statement.set_parameters(params).expect("bind");
        let info = statement.execute().await.expect("execute");
        let ticket = info.endpoint[0].ticket.clone().expect("ticket");
        let mut stream = client.do_get(ticket).await.expect("do_get");
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            batches.push(batch.expect("batch"));
        }
        let route = stream.headers().get("strata-route").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        answers.push((arrow::util::pretty::pretty_format_batches(&batches).expect("format").to_string(), route));
    }
    answers
}

#[tokio::test]
async fn prepared_statements_route_each_execution_by_its_bound_values() {
    let dir = tempfile::tempdir().expect("dir");
    write_data(dir.path());
    let eu = Tier::start("platform-service", &eu_config(dir.path(), None)).await;
    eu.wait_ready(Duration::from_secs(20)).await;
    let sidecar = Tier::start("app-sidecar", &sidecar_config(&[eu.flight_addr], "")).await;
    sidecar.wait_ready(Duration::from_secs(20)).await;
    wait_replicas(&sidecar, &["orders", "customers"]).await;

    // The sidecar keeps only the eu customers: an eu key is inside the subset and answered
    // here; the same statement bound to an apac key needs the platform. The plan is made
    // once; each execution is routed on its own values.
    let sql = "SELECT name FROM customers WHERE region = $1 AND customer_id = $2";
    let keys = [("eu", 1), ("apac", 2), ("eu", 1), ("eu", 2)];
    let answers = prepared_lookups(&sidecar, sql, &keys).await;
    let direct = prepared_lookups(&eu, sql, &keys).await;
    let routes: Vec<&str> = answers.iter().map(|(_, route)| route.as_str()).collect();
    assert_eq!(routes, ["local", "forwarded", "local", "local"]);
    assert!(answers[0].0.contains("Customer 001"), "{}", answers[0].0);
    assert!(answers[1].0.contains("Customer 002"), "{}", answers[1].0);
    assert!(!answers[3].0.contains("Customer"), "customer 2 is not in eu: {}", answers[3].0);
    for ((got, _), (want, _)) in answers.iter().zip(&direct) {
        assert_eq!(got, want, "the sidecar answers like the platform");
    }
}
