//! The edge-agent's write path against a real platform and PostgreSQL sink: writes survive
//! a platform outage and a `kill -9` of the agent, and land in the sink exactly once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::{free_port, wait_until};

fn platform_config(pg: &PgServer) -> String {
    format!(
        "region: eu\ndatasets:\n  - name: readings\n    from: postgres:public.readings\n    params: {}\n    writable: true\n    acceleration: {{}}\n",
        pg.params_yaml()
    )
}

fn edge_config(platform: SocketAddr, data_dir: &std::path::Path, max_log: &str) -> String {
    format!(
        "region: eu\nupstream:\n  endpoints: [http://{platform}]\n  call_timeout: 1s\n  breaker_open_for: 200ms\nreplicas:\n  - name: readings\nedge:\n  id: edge-1\n  data_dir: {}\n  max_log_size: {max_log}\n  writable: [readings]\n",
        data_dir.display()
    )
}

async fn seed(pg: &PgServer) {
    pg.connect()
        .await
        .batch_execute(
            "CREATE TABLE readings (writer integer NOT NULL, n bigint NOT NULL, celsius double precision NOT NULL);
             INSERT INTO readings SELECT 0, g, 20.0 FROM generate_series(1, 10) g;",
        )
        .await
        .expect("seed");
}

fn addrs() -> (SocketAddr, SocketAddr) {
    let a = |p: u16| format!("127.0.0.1:{p}").parse().expect("addr");
    (a(free_port()), a(free_port()))
}

/// One NDJSON batch of `rows` rows for writer `w` starting at `n`.
fn batch(w: i64, n: i64, rows: i64) -> String {
    (0..rows).map(|k| format!("{{\"writer\": {w}, \"n\": {}, \"celsius\": {}.25}}\n", n + k, (n + k) % 40)).collect()
}

async fn post(client: &reqwest::Client, edge: SocketAddr, body: String) -> Result<(u16, String), String> {
    let r = client
        .post(format!("http://{edge}/v1/ingest/readings"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.unwrap_or_default()))
}

/// A platform on fixed addresses (so it can be restarted where the edge expects it) and an
/// edge agent with the given log bound, both ready.
async fn platform_and_edge(
    pg: &PgServer,
    max_log: &str,
) -> (Tier, Tier, String, tempfile::TempDir, SocketAddr, SocketAddr) {
    let (flight, http) = addrs();
    let platform = Tier::builder("platform-service").config(&platform_config(pg)).at(flight, http).start().await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let data = tempfile::tempdir().expect("data dir");
    let config = edge_config(flight, data.path(), max_log);
    let edge = Tier::start("edge-agent", &config).await;
    wait_loaded(&edge).await;
    (platform, edge, config, data, flight, http)
}

/// Waits until `edge` is ready and has loaded `readings` (an edge is ready before it
/// reaches the platform).
async fn wait_loaded(edge: &Tier) {
    edge.wait_ready(Duration::from_secs(30)).await;
    edge.wait_for(Duration::from_secs(30), "the edge to load readings", || async {
        edge.find_dataset("readings").await.filter(|d| d["state"] == "ready")
    })
    .await;
}

async fn sink_rows(pg: &PgServer) -> Vec<(i32, i64)> {
    let rows = pg.connect().await.query("SELECT writer, n FROM readings WHERE writer > 0", &[]).await.expect("query");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Waits until the edge has nothing left to upload and the sink holds at least
/// `expected_at_least` rows: from then on nothing more (no duplicate) can arrive.
async fn wait_drained(edge: &Tier, pg: &PgServer, expected_at_least: usize) {
    edge.wait_for(Duration::from_secs(120), "the edge to drain its log", || async {
        let (_, body) = edge.get_json("/v1/datasets").await;
        let empty = body["backlog"]["records"] == 0 && body["backlog"]["oldest_seconds"].is_null();
        (empty && sink_rows(pg).await.len() >= expected_at_least).then_some(())
    })
    .await
}

#[tokio::test]
async fn edge_writes_survive_an_outage_and_kill_9_and_land_exactly_once() {
    let pg = PgServer::start();
    seed(&pg).await;
    let (mut platform, mut edge, config, _data, flight, http) = platform_and_edge(&pg, "256MiB").await;

    // The platform goes away; apps keep writing, and read their own writes from the edge.
    platform.kill();
    let client = reqwest::Client::new();
    let (status, body) = post(&client, edge.http_addr, batch(9, 1, 3)).await.expect("write");
    assert_eq!(status, 200, "{body}");
    let acked: Arc<Mutex<HashSet<(i32, i64)>>> = Arc::new(Mutex::new((1..=3).map(|n| (9, n)).collect()));
    let (rows, route, _) = edge.routed("SELECT count(*) AS n FROM readings WHERE writer = 9", &[]).await;
    assert_eq!(rows[0]["n"], 3, "read-your-writes while the platform is down (route {route})");
    // The operator sees the write waiting, and for how long.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, listed) = edge.get_json("/v1/datasets").await;
    assert!(listed["backlog"]["records"].as_u64() >= Some(1), "{listed}");
    assert!(listed["backlog"]["oldest_seconds"].as_f64().is_some_and(|s| s >= 0.2), "upload lag: {listed}");

    // Concurrent writers; the agent is killed with SIGKILL in the middle and restarted.
    const WRITERS: i64 = 4;
    const BATCHES: i64 = 600;
    let target = Arc::new(Mutex::new(edge.http_addr));
    let in_flight_at_kill: Arc<Mutex<HashMap<i64, i64>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for w in 1..=WRITERS {
        let (client, acked, target, in_flight) =
            (client.clone(), Arc::clone(&acked), Arc::clone(&target), Arc::clone(&in_flight_at_kill));
        tasks.push(tokio::spawn(async move {
            let mut failures = 0;
            for b in 0..BATCHES {
                let n = b * 5 + 1;
                let addr = *target.lock().expect("lock");
                in_flight.lock().expect("lock").insert(w, n);
                match post(&client, addr, batch(w, n, 5)).await {
                    Ok((200, _)) => acked.lock().expect("lock").extend((n..n + 5).map(|k| (w as i32, k))),
                    Ok((status, body)) => panic!("write refused with {status}: {body}"),
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            failures
        }));
    }
    // Kill once a good share has been acknowledged (how long that takes depends on the machine).
    wait_until(Duration::from_secs(60), "300 acknowledged rows before the kill", || async {
        (acked.lock().expect("lock").len() >= 300).then_some(())
    })
    .await;
    edge.kill();
    let acked_before_kill = acked.lock().expect("lock").len();
    let edge = Tier::start("edge-agent", &config).await;
    *target.lock().expect("lock") = edge.http_addr;
    let mut lost_in_flight = 0;
    for t in tasks {
        lost_in_flight += t.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked_before_kill > 100 && acked.len() > acked_before_kill, "writes before and after the kill");

    // The platform returns: the log drains on its own, each batch applied once.
    let _platform = Tier::builder("platform-service").config(&platform_config(&pg)).at(flight, http).start().await;
    wait_drained(&edge, &pg, acked.len()).await;
    let sink = sink_rows(&pg).await;
    let distinct: HashSet<(i32, i64)> = sink.iter().copied().collect();
    assert_eq!(distinct.len(), sink.len(), "duplicates in the sink");
    let missing: Vec<_> = acked.difference(&distinct).take(5).collect();
    assert!(missing.is_empty(), "{} acknowledged rows lost, e.g. {missing:?}", acked.difference(&distinct).count());
    // Rows beyond the acknowledged ones can only be writes in flight when the agent died
    // (durable, but their answer never reached the writer): at most one batch per writer.
    let extra = distinct.difference(&acked).count();
    assert!(extra <= 5 * WRITERS as usize, "{extra} unacknowledged rows in the sink");
    assert!(lost_in_flight <= 2 * WRITERS as usize + 20, "{lost_in_flight} writes failed around the restart");

    // The edge's own view converges to the platform's.
    let expected = sink.len() as u64 + 10;
    edge.wait_for(Duration::from_secs(20), &format!("the edge's view to reach the sink's {expected} rows"), || async {
        let (rows, _, _) = edge.routed("SELECT count(*) AS n FROM readings", &[]).await;
        (rows[0]["n"].as_u64() == Some(expected)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_retried_upload_is_acknowledged_but_not_applied_twice() {
    use strata_proto::v1::tier_service_client::TierServiceClient;
    let pg = PgServer::start();
    seed(&pg).await;
    let platform = Tier::start("platform-service", &platform_config(&pg)).await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("writer", arrow::datatypes::DataType::Int32, false),
        arrow::datatypes::Field::new("n", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new("celsius", arrow::datatypes::DataType::Float64, false),
    ]));
    let rows = arrow::array::RecordBatch::try_new(
        schema.clone(),
        vec![
            std::sync::Arc::new(arrow::array::Int32Array::from(vec![7, 7])),
            std::sync::Arc::new(arrow::array::Int64Array::from(vec![1, 2])),
            std::sync::Arc::new(arrow::array::Float64Array::from(vec![1.5, 2.5])),
        ],
    )
    .expect("batch");
    let ipc = |rows: &arrow::array::RecordBatch| {
        let mut ipc = Vec::new();
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &schema).expect("writer");
        w.write(rows).expect("write");
        w.finish().expect("finish");
        drop(w);
        ipc
    };
    let upload = |batches: Vec<(u64, &arrow::array::RecordBatch)>| strata_proto::v1::IngestRequest {
        edge_id: "edge-7".into(),
        batches: batches
            .into_iter()
            .map(|(seq, rows)| strata_proto::v1::IngestBatch {
                seq,
                dataset: "readings".into(),
                batch: ipc(rows).into(),
            })
            .collect(),
        context: None,
    };
    let mut client = TierServiceClient::connect(format!("http://{}", platform.flight_addr)).await.expect("connect");
    // The first attempt is applied; its acknowledgement "is lost" (the platform could die
    // right after its commit), so the edge sends the same batch id again, this time grouped
    // with a batch that is new.
    let first = client.ingest(upload(vec![(41, &rows)])).await.expect("first").into_inner();
    let again = client.ingest(upload(vec![(41, &rows), (42, &rows.slice(0, 1))])).await.expect("retry").into_inner();
    assert_eq!((first.duplicates, first.rows), (0, 2));
    assert_eq!(
        (again.duplicates, again.rows),
        (1, 1),
        "the retried batch is recognised by its id, the new one applied"
    );
    assert_eq!(sink_rows(&pg).await.iter().filter(|(w, _)| *w == 7).count(), 3, "each batch applied exactly once");
    // The platform's accelerated copy saw them once too.
    assert_eq!(platform.rows("SELECT count(*) AS n FROM readings WHERE writer = 7").await[0]["n"], 3);
}

#[tokio::test]
async fn a_full_log_refuses_writes_with_a_clear_error_and_accepts_again_after_upload() {
    let pg = PgServer::start();
    seed(&pg).await;
    let (mut platform, edge, _config, _data, flight, http) = platform_and_edge(&pg, "24KiB").await;
    platform.kill();
    let client = reqwest::Client::new();
    let mut accepted = 0;
    let refusal = loop {
        let (status, body) = post(&client, edge.http_addr, batch(3, accepted * 5 + 1, 5)).await.expect("write");
        if status != 200 {
            break (status, body);
        }
        accepted += 1;
        assert!(accepted < 10_000, "the log bound is never enforced");
    };
    assert_eq!(refusal.0, 503, "{}", refusal.1);
    // Flight SQL bulk ingest meets the same bound, with the same clear error.
    let mut flight_client = edge.flight().await;
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("writer", arrow::datatypes::DataType::Int32, false),
        arrow::datatypes::Field::new("n", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new("celsius", arrow::datatypes::DataType::Float64, false),
    ]));
    let rows = arrow::array::RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(arrow::array::Int32Array::from(vec![4])),
            std::sync::Arc::new(arrow::array::Int64Array::from(vec![1])),
            std::sync::Arc::new(arrow::array::Float64Array::from(vec![1.0])),
        ],
    )
    .expect("batch");
    let command = arrow_flight::sql::CommandStatementIngest { table: "readings".into(), ..Default::default() };
    let err = flight_client
        .execute_ingest(command.clone(), futures::stream::iter([Ok(rows.clone())]))
        .await
        .expect_err("the log is full");
    assert!(err.to_string().contains("edge.max_log_size"), "{err}");
    assert!(refusal.1.contains("log_full") && refusal.1.contains("edge.max_log_size"), "{}", refusal.1);
    let _platform = Tier::builder("platform-service").config(&platform_config(&pg)).at(flight, http).start().await;
    wait_drained(&edge, &pg, accepted as usize * 5).await;
    let (status, body) = post(&client, edge.http_addr, batch(3, 1_000_000, 5)).await.expect("write");
    assert_eq!(status, 200, "accepted again once the log drained: {body}");
    let ingested =
        flight_client.execute_ingest(command, futures::stream::iter([Ok(rows)])).await.expect("Flight SQL ingest");
    assert_eq!(ingested, 1);
    wait_drained(&edge, &pg, accepted as usize * 5 + 6).await;
    assert_eq!(
        sink_rows(&pg).await.iter().filter(|(w, _)| *w == 4).count(),
        1,
        "the Flight SQL write reached the sink"
    );
}

#[tokio::test]
async fn a_torn_log_tail_is_cut_off_on_restart_and_earlier_writes_still_upload() {
    let pg = PgServer::start();
    seed(&pg).await;
    let (mut platform, mut edge, config, data, flight, http) = platform_and_edge(&pg, "64MiB").await;
    platform.kill();
    let client = reqwest::Client::new();
    for b in 0..10 {
        assert_eq!(post(&client, edge.http_addr, batch(5, b * 5 + 1, 5)).await.expect("write").0, 200);
    }
    edge.kill();
    // A crash while the last record was being written: its final bytes never reached the disk.
    let segment = std::fs::read_dir(data.path().join("ingest"))
        .expect("log dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("segment");
    let len = std::fs::metadata(&segment).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&segment).expect("open").set_len(len - 9).expect("cut");
    let edge = Tier::start("edge-agent", &config).await;
    assert!(edge.logs().contains("torn tail"), "the truncation is reported:\n{}", edge.logs());
    let _platform = Tier::builder("platform-service").config(&platform_config(&pg)).at(flight, http).start().await;
    wait_drained(&edge, &pg, 45).await;
    let mut sink: Vec<i64> = sink_rows(&pg).await.into_iter().map(|(_, n)| n).collect();
    sink.sort();
    assert_eq!(sink, (1..=45).collect::<Vec<_>>(), "the nine intact batches, once each");
}

fn signal(tier: &Tier, sig: &str) {
    let status =
        std::process::Command::new("kill").arg(format!("-{sig}")).arg(tier.pid().to_string()).status().expect("kill");
    assert!(status.success(), "kill -{sig}");
}

#[tokio::test]
async fn restarted_with_the_platform_unreachable_the_edge_serves_from_disk_then_catches_up_by_increment() {
    let pg = PgServer::start();
    pg.connect()
        .await
        .batch_execute(
            "CREATE TABLE events (id bigint NOT NULL, at timestamp NOT NULL);
             INSERT INTO events SELECT g, timestamp '2025-01-01' + g * interval '1 second' FROM generate_series(1, 3000) g;
             CREATE TABLE sites (site text NOT NULL);
             INSERT INTO sites VALUES ('north'), ('south');",
        )
        .await
        .expect("seed");
    let platform = Tier::start(
        "platform-service",
        &format!(
            "region: eu\ndatasets:\n  - name: events\n    from: postgres:public.events\n    params: {p}\n    acceleration: {{refresh: append, time_column: at}}\n  - name: sites\n    from: postgres:public.sites\n    params: {p}\n    acceleration: {{}}\n",
            p = pg.params_yaml()
        ),
    )
    .await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let data = tempfile::tempdir().expect("data dir");
    let config = format!(
        "region: eu\nupstream:\n  endpoints: [http://{}]\n  call_timeout: 1s\nreplicas:\n  - name: events\n    max_staleness: 1s\n  - name: sites\n    max_staleness: 1s\n    on_stale: refuse\nedge:\n  id: edge-2\n  data_dir: {}\n",
        platform.flight_addr,
        data.path().display()
    );
    let mut edge = Tier::start("edge-agent", &config).await;
    edge.wait_for(Duration::from_secs(30), "version 1 of events and sites", || async {
        let version = |d: Option<serde_json::Value>| d.map(|d| d["version"].clone());
        (version(edge.find_dataset("events").await) == Some(1.into())
            && version(edge.find_dataset("sites").await) == Some(1.into()))
        .then_some(())
    })
    .await;
    edge.kill();

    // While the agent is down the source grows and the platform refreshes (an append);
    // then the platform becomes unreachable (frozen, as behind a dead link).
    pg.connect()
        .await
        .batch_execute("INSERT INTO events SELECT g, timestamp '2025-01-01' + g * interval '1 second' FROM generate_series(3001, 3050) g")
        .await
        .expect("insert");
    assert_eq!(platform.post("/v1/datasets/events/refresh").await.1["version"], 2);
    signal(&platform, "STOP");

    let started = Instant::now();
    let edge = Tier::start("edge-agent", &config).await;
    edge.wait_ready(Duration::from_secs(10)).await;
    let ready_after = started.elapsed();
    // The copies on disk age past their 1 s max_staleness while the platform is away.
    edge.wait_for(Duration::from_secs(5), "the disk copies to pass max_staleness", || async {
        let stale = |d: Option<serde_json::Value>| d.is_some_and(|d| d["staleness_seconds"].as_f64() >= Some(1.0));
        (stale(edge.find_dataset("events").await) && stale(edge.find_dataset("sites").await)).then_some(())
    })
    .await;
    let (rows, route, headers) = {
        let (status, body, headers) = edge.sql_with("SELECT count(*) AS n FROM events", &[]).await;
        assert_eq!(status, 200, "{body}\n{}", edge.logs());
        (body, headers.get("strata-route").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string(), headers)
    };
    assert_eq!((rows[0]["n"].as_i64(), route.as_str()), (Some(3000), "local"), "answered from disk");
    let warning = headers.get("strata-warning").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(warning.contains("max_staleness"), "stale data is served with a warning: {warning:?}");
    let (status, body, _) = edge.sql_with("SELECT * FROM sites", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains("max_staleness"), "{body}");
    let events = edge.dataset("events").await;
    assert!(events["staleness_seconds"].as_f64().unwrap_or_default() >= 1.0, "{events}");
    assert!(ready_after < Duration::from_secs(10));

    // The link returns: replication resumes from the version on disk, by increment.
    signal(&platform, "CONT");
    let status = edge
        .wait_for(Duration::from_secs(20), "version 2 of events after the link returned", || async {
            edge.find_dataset("events").await.filter(|d| d["version"] == 2)
        })
        .await;
    assert_eq!(status["replication"]["snapshots"], 0, "no full re-copy: {status}");
    assert_eq!(status["replication"]["increments"], 1, "{status}");
    assert_eq!(edge.rows("SELECT count(*) AS n FROM events").await[0]["n"], 3050);
}

#[tokio::test]
async fn a_replica_over_max_disk_is_not_stored_and_says_why_while_queries_still_answer() {
    let pg = PgServer::start();
    seed(&pg).await;
    pg.connect()
        .await
        .batch_execute("INSERT INTO readings SELECT 1, g, 1.5 FROM generate_series(1, 5000) g")
        .await
        .expect("rows");
    let platform = Tier::start("platform-service", &platform_config(&pg)).await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let data = tempfile::tempdir().expect("data dir");
    let config = edge_config(platform.flight_addr, data.path(), "1MiB")
        .replace("  max_log_size:", "  max_disk: 16KiB\n  max_log_size:");
    let edge = Tier::start("edge-agent", &config).await;
    edge.wait_ready(Duration::from_secs(30)).await;
    let status = edge
        .wait_for(Duration::from_secs(20), "an edge.max_disk error on readings", || async {
            edge.find_dataset("readings")
                .await
                .filter(|d| d["last_error"].as_str().is_some_and(|e| e.contains("edge.max_disk")))
        })
        .await;
    assert_eq!(status["state"], "loading", "nothing half-stored is served: {status}");
    let (rows, route, reason) = edge.routed("SELECT count(*) AS n FROM readings", &[]).await;
    assert_eq!((rows[0]["n"].as_i64(), route.as_str(), reason.as_str()), (Some(5010), "forwarded", "cold_start"));
}

#[tokio::test]
async fn csv_columns_map_by_header_and_unknown_keys_are_refused() {
    let pg = PgServer::start();
    seed(&pg).await;
    let (_platform, edge, _config, _data, _, _) = platform_and_edge(&pg, "64MiB").await;
    let client = reqwest::Client::new();
    let write = |content_type: &'static str, body: &'static str| {
        client
            .post(format!("http://{}/v1/ingest/readings", edge.http_addr))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    // The header lists the columns in another order than the table: values go by name.
    let response = write("text/csv", "celsius,n,writer\n7.5,42,9\n").await.expect("csv");
    assert_eq!(response.status().as_u16(), 200, "{}", response.text().await.unwrap_or_default());
    wait_drained(&edge, &pg, 1).await;
    let row = pg
        .connect()
        .await
        .query_one("SELECT writer, n, celsius FROM readings WHERE writer = 9", &[])
        .await
        .expect("the row");
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i64>(1), row.get::<_, f64>(2)), (9, 42, 7.5));

    for (content_type, body, needle) in [
        ("text/csv", "writer,n,vaule\n1,2,3\n", "`vaule`"),
        ("text/csv", "writer,celsius\n1,2\n", "lacks column `n`"),
        ("application/x-ndjson", "{\"writer\": 1, \"n\": 2, \"vaule\": 3}\n", "vaule"),
    ] {
        let response = write(content_type, body).await.expect("write");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(needle), "{body}: {text}");
    }
    // An Arrow stream whose message claims 2 GiB is refused without allocating it.
    let response = client
        .post(format!("http://{}/v1/ingest/readings", edge.http_addr))
        .header("content-type", "application/vnd.apache.arrow.stream")
        .body(crate::hostile::lying_ipc())
        .send()
        .await
        .expect("arrow");
    assert_eq!(response.status().as_u16(), 400);
    assert!(response.text().await.unwrap_or_default().contains("claims a body"));
    assert_eq!(sink_rows(&pg).await.len(), 1, "a refused write reached the sink");
}

#[tokio::test]
async fn a_write_the_platform_refuses_for_good_is_set_aside_and_blocks_nothing() {
    let pg = PgServer::start();
    seed(&pg).await;
    pg.connect().await.batch_execute("CREATE TABLE notes (id bigint NOT NULL, body text)").await.expect("notes table");
    let platform_yaml = |notes_writable: bool| {
        format!(
            "{}  - name: notes\n    from: postgres:public.notes\n    params: {}\n    writable: {notes_writable}\n",
            platform_config(&pg),
            pg.params_yaml()
        )
    };
    let (flight, http) = addrs();
    let mut platform = Tier::builder("platform-service").config(&platform_yaml(true)).at(flight, http).start().await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let data = tempfile::tempdir().expect("data dir");
    let config = edge_config(flight, data.path(), "64MiB")
        .replace("writable: [readings]", "writable: [readings, notes]")
        .replace("  call_timeout: 1s\n", "  call_timeout: 1s\n  catalog_interval: 500ms\n");
    let edge = Tier::start("edge-agent", &config).await;
    wait_loaded(&edge).await;
    let client = reqwest::Client::new();
    let note = |id: i64| {
        client
            .post(format!("http://{}/v1/ingest/notes", edge.http_addr))
            .header("content-type", "application/x-ndjson")
            .body(format!("{{\"id\": {id}, \"body\": \"hello\"}}\n"))
            .send()
    };

    // While the platform is away, a note and then readings are acknowledged; it comes back
    // no longer accepting notes.
    platform.kill();
    let response = note(1).await.expect("note");
    assert_eq!(response.status().as_u16(), 200, "{}", response.text().await.unwrap_or_default());
    let (status, body) = post(&client, edge.http_addr, batch(5, 1, 3)).await.expect("readings");
    assert_eq!(status, 200, "{body}");
    let mut platform = Tier::builder("platform-service").config(&platform_yaml(false)).at(flight, http).start().await;

    // The refused note does not hold the readings back, and is kept, reported and counted.
    wait_drained(&edge, &pg, 3).await;
    let (_, datasets) = edge.get_json("/v1/datasets").await;
    let letters = datasets["dead_letter"].as_array().cloned().unwrap_or_default();
    assert_eq!(letters.len(), 1, "{datasets}");
    assert_eq!((letters[0]["dataset"].as_str(), letters[0]["rows"].as_u64()), (Some("notes"), Some(1)), "{datasets}");
    assert!(letters[0]["last_error"].as_str().unwrap_or_default().contains("notes"), "{datasets}");
    let kept: Vec<_> = std::fs::read_dir(data.path().join("dead-letter"))
        .expect("dead-letter area")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".notes.arrows"))
        .collect();
    assert_eq!(kept.len(), 1);
    let metrics = reqwest::get(edge.url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("strata_edge_dead_letter_records{dataset=\"notes\"} 1"), "{metrics}");

    // Now that the platform says so, a new note is refused before it is acknowledged.
    // Until the edge reads the platform's new catalog it cannot know: notes it acknowledges
    // meanwhile are kept like the first one, and must arrive too.
    let acknowledged_meanwhile = std::sync::atomic::AtomicUsize::new(0);
    let refusal = edge
        .wait_for(Duration::from_secs(30), "the edge to refuse notes", || async {
            let response = note(2).await.expect("note");
            match response.status().as_u16() {
                501 => Some(response.text().await.unwrap_or_default()),
                200 => {
                    acknowledged_meanwhile.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    None
                }
                status => panic!("note answered {status}: {}", response.text().await.unwrap_or_default()),
            }
        })
        .await;
    assert!(refusal.contains("does not accept edge writes"), "{refusal}");
    let meanwhile = acknowledged_meanwhile.load(std::sync::atomic::Ordering::SeqCst);

    // The platform's config is fixed and the agent restarted: the kept note is delivered,
    // once, and the dead-letter area is empty.
    platform.kill();
    let _platform = Tier::builder("platform-service").config(&platform_yaml(true)).at(flight, http).start().await;
    let mut edge = edge;
    assert_eq!(edge.terminate(), Some(0));
    let edge = Tier::start("edge-agent", &config).await;
    let expected: Vec<i64> = std::iter::once(1).chain(std::iter::repeat_n(2, meanwhile)).collect();
    let ids = edge
        .wait_for(Duration::from_secs(60), "the kept notes to arrive", || async {
            let notes = pg.connect().await.query("SELECT id FROM notes ORDER BY id", &[]).await.expect("notes");
            (notes.len() >= expected.len()).then(|| notes.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>())
        })
        .await;
    assert_eq!(ids, expected, "each kept note arrives exactly once");
    edge.wait_for(Duration::from_secs(10), "an empty dead-letter area and backlog", || async {
        let (_, body) = edge.get_json("/v1/datasets").await;
        (body["dead_letter"].as_array().is_some_and(|a| a.is_empty()) && body["backlog"]["records"] == 0).then_some(())
    })
    .await;
    let count: i64 = pg.connect().await.query_one("SELECT count(*) FROM notes", &[]).await.expect("count").get(0);
    assert_eq!(count as usize, expected.len(), "nothing is left to upload, and each note is there once");
}
