//! Point-lookup latency through the tiers, measured in one run on this machine:
//! the sidecar answering from its replica, the same query forwarded by the sidecar to the
//! platform, the platform directly, and a bare tier-protocol `Health` call as the floor.
//!
//! `tier-bench [iterations] [rows]` (the tier binaries must be built next to it), and
//! `tier-bench ingest [batches] [rows-per-batch] [writers]`: edge ingest throughput over HTTP,
//! every batch fsynced before it is acknowledged, with the platform and its PostgreSQL sink up;
//! and `tier-bench restart [megabytes]`: an edge agent's time from restart to ready and to a
//! first answer with that much replica data on disk and the platform stopped, and its RSS;
//! and `tier-bench outage [seconds] [batches-per-second] [rows-per-batch]`: writers keep a
//! steady rate at the edge while the platform is down for that long, then the platform comes
//! back and the bench reports how long the edge takes to upload the backlog into PostgreSQL
//! (writes keep going during the catch-up).

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::parquet::arrow::ArrowWriter;
use futures::TryStreamExt;
use strata_integration_tests::tier::Tier;
use strata_proto::v1::HealthRequest;
use strata_proto::v1::tier_service_client::TierServiceClient;
use tonic::transport::Channel;

/// A Parquet file of `rows` rows `(id, v)`, `v` made from the id by `value`.
fn write_points(path: &std::path::Path, rows: i64, value: impl Fn(i64) -> String) {
    let schema =
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("v", DataType::Utf8, false)]));
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).expect("file"), schema.clone(), None).expect("writer");
    for start in (0..rows).step_by(65_536) {
        let ids: Vec<i64> = (start..(start + 65_536).min(rows)).collect();
        let values: Vec<String> = ids.iter().map(|i| value(*i)).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(values))],
        )
        .expect("batch");
        writer.write(&batch).expect("write");
    }
    writer.close().expect("close");
}

async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("uri").tcp_nodelay(true).connect().await.expect("connect")
}

async fn lookup(client: &mut FlightSqlServiceClient<Channel>, key: i64) -> usize {
    let info = client.execute(format!("SELECT v FROM points WHERE id = {key}"), None).await.expect("execute");
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let batches: Vec<RecordBatch> = client.do_get(ticket).await.expect("do_get").try_collect().await.expect("rows");
    batches.iter().map(RecordBatch::num_rows).sum()
}

fn summary(name: &str, mut samples: Vec<Duration>, floor: Option<f64>) -> f64 {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
    let (p50, p99) = (pick(0.5), pick(0.99));
    let ratio = floor.map(|f| format!("{:>6.1}x", p50 / f)).unwrap_or_else(|| "  base".into());
    println!("{name:<40} p50 {p50:>9.0} us   p99 {p99:>9.0} us   {ratio}");
    p50
}

#[tokio::main]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("ingest") => return ingest().await,
        Some("restart") => return restart().await,
        Some("outage") => return outage().await,
        _ => {}
    }
    let mut args = std::env::args().skip(1);
    let iterations: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rows: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("points.parquet");
    write_points(&path, rows, |i| format!("value-{i}"));

    let platform = Tier::start(
        "platform-service",
        &format!(
            "region: eu\ndatasets:\n  - name: points\n    from: file:{}\n    acceleration: {{}}\n",
            path.display()
        ),
    )
    .await;
    platform.wait_ready(Duration::from_secs(60)).await;
    let sidecar = Tier::start(
        "app-sidecar",
        &format!(
            "region: eu\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: points\n",
            platform.flight_addr
        ),
    )
    .await;
    sidecar.wait_ready(Duration::from_secs(60)).await;
    for _ in 0..600 {
        if sidecar.dataset("points").await["state"] == "ready" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut health = TierServiceClient::new(connect(platform.flight_addr).await);
    let mut local = FlightSqlServiceClient::new(connect(sidecar.flight_addr).await);
    let mut forwarded = FlightSqlServiceClient::new(connect(sidecar.flight_addr).await);
    forwarded.set_header("strata-consistency", "strong");
    let mut direct = FlightSqlServiceClient::new(connect(platform.flight_addr).await);

    println!("point lookup on {rows} rows, {iterations} iterations each, Flight SQL execute + DoGet");
    let mut floor = Vec::new();
    let (mut l, mut f, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations + 100 {
        let key = (i as i64 * 7919) % rows;
        let t = Instant::now();
        health.health(HealthRequest {}).await.expect("health");
        let floor_t = t.elapsed();
        let t = Instant::now();
        assert_eq!(lookup(&mut local, key).await, 1);
        let local_t = t.elapsed();
        let t = Instant::now();
        assert_eq!(lookup(&mut forwarded, key).await, 1);
        let forwarded_t = t.elapsed();
        let t = Instant::now();
        assert_eq!(lookup(&mut direct, key).await, 1);
        let direct_t = t.elapsed();
        if i >= 100 {
            floor.push(floor_t);
            l.push(local_t);
            f.push(forwarded_t);
            d.push(direct_t);
        }
    }
    let base = summary("tier-protocol Health round trip (floor)", floor, None);
    summary("sidecar, answered locally", l, Some(base));
    summary("sidecar, forwarded to the platform", f, Some(base));
    summary("platform directly", d, Some(base));
    let local_status = sidecar.dataset("points").await;
    println!("replica: version {} rows {}", local_status["version"], local_status["rows"]);
}

/// A throwaway PostgreSQL with an empty `readings` table, and the config of a platform that
/// takes edge writes into it.
async fn readings_sink() -> (strata_integration_tests::postgres::PgServer, String) {
    let pg = strata_integration_tests::postgres::PgServer::start();
    pg.connect()
        .await
        .batch_execute(
            "CREATE TABLE readings (writer integer NOT NULL, n bigint NOT NULL, celsius double precision NOT NULL)",
        )
        .await
        .expect("table");
    let config = format!(
        "region: eu\ndatasets:\n  - name: readings\n    from: postgres:public.readings\n    params: {}\n    writable: true\n",
        pg.params_yaml()
    );
    (pg, config)
}

async fn ingest() {
    let mut args = std::env::args().skip(2);
    let batches: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rows: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let writers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let (pg, platform_config) = readings_sink().await;
    let platform = Tier::start("platform-service", &platform_config).await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let data = tempfile::tempdir().expect("dir");
    let edge = Tier::start(
        "edge-agent",
        &format!(
            "region: eu\nupstream:\n  endpoints: [http://{}]\nedge:\n  id: bench\n  data_dir: {}\n  writable: [readings]\n",
            platform.flight_addr,
            data.path().display()
        ),
    )
    .await;
    edge.wait_ready(Duration::from_secs(30)).await;
    let url = edge.url("/v1/ingest/readings");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = Vec::new();
            for b in (w..batches).step_by(writers) {
                let body: String = (0..rows)
                    .map(|k| format!("{{\"writer\": {w}, \"n\": {}, \"celsius\": 21.5}}\n", b * rows + k))
                    .collect();
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .expect("post");
                assert_eq!(r.status().as_u16(), 200);
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("writer"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "edge ingest: {batches} batches x {rows} rows, {writers} writers, each acknowledged after its fsync (group commit): {:.0} batches/s, {:.0} rows/s",
        batches as f64 / elapsed,
        (batches * rows) as f64 / elapsed
    );
    summary("acknowledged write latency", latencies, None);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n: i64 = pg.connect().await.query_one("SELECT count(*) FROM readings", &[]).await.expect("count").get(0);
        if n as usize >= batches * rows {
            println!("all rows in the PostgreSQL sink {:.1} s after the first write", started.elapsed().as_secs_f64());
            break;
        }
        assert!(Instant::now() < deadline, "upload did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn outage() {
    let mut args = std::env::args().skip(2);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(600);
    let rate: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let rows: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let (pg, platform_config) = readings_sink().await;
    let mut platform = Tier::start("platform-service", &platform_config).await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let (flight, http) = (platform.flight_addr, platform.http_addr);
    let data = tempfile::tempdir().expect("dir");
    let edge = Tier::start(
        "edge-agent",
        &format!(
            "region: eu\nupstream:\n  endpoints: [http://{flight}]\n  call_timeout: 2s\nedge:\n  id: bench\n  data_dir: {}\n  writable: [readings]\n  max_log_size: 8GiB\n",
            data.path().display()
        ),
    )
    .await;
    edge.wait_ready(Duration::from_secs(30)).await;
    // The edge learns the dataset's columns from the platform's catalog once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while edge.sql("SELECT count(*) AS n FROM readings").await.0 != 200 {
        assert!(Instant::now() < deadline, "the edge never learned `readings`:\n{}", edge.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    platform.kill();
    let acknowledged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let url = edge.url("/v1/ingest/readings");
    let writer = {
        let (acknowledged, stop) = (Arc::clone(&acknowledged), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut b = 0usize;
            let mut latencies = Vec::new();
            let began = Instant::now();
            while !stop.is_cancelled() {
                tick.tick().await;
                let t = Instant::now();
                let body: String = (0..rows)
                    .map(|k| format!("{{\"writer\": 1, \"n\": {}, \"celsius\": 21.5}}\n", b * rows + k))
                    .collect();
                let r = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .expect("post");
                assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());
                acknowledged.fetch_add(rows as u64, std::sync::atomic::Ordering::SeqCst);
                latencies.push((began.elapsed(), t.elapsed()));
                b += 1;
            }
            latencies
        })
    };
    let outage_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let backlog = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    let log_bytes = walk(&data.path().join("ingest"));
    println!(
        "outage of {seconds} s at {rate} batches/s x {rows} rows: {backlog} rows ({} batches, {} MB of log) waiting",
        backlog / rows as u64,
        log_bytes / 1_000_000
    );
    let back = Instant::now();
    let platform = Tier::start_at("platform-service", &platform_config, flight, http).await;
    platform.wait_ready(Duration::from_secs(60)).await;
    let sink = pg.connect().await;
    let caught_up = loop {
        let n: i64 = sink.query_one("SELECT count(*) FROM readings", &[]).await.expect("count").get(0);
        if n as u64 >= backlog {
            break back.elapsed();
        }
        assert!(back.elapsed() < Duration::from_secs(3600), "catch-up did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.cancel();
    let latencies = writer.await.expect("writer");
    // Write latency must not grow with the backlog: compare the outage's first and last minute.
    let window = |from: f64, to: f64| {
        let mut w: Vec<Duration> = latencies
            .iter()
            .filter(|(at, _)| at.as_secs_f64() >= from && at.as_secs_f64() < to)
            .map(|(_, l)| *l)
            .collect();
        w.sort();
        w.get(w.len() / 2).copied().unwrap_or_default()
    };
    let minute = 60f64.min(seconds as f64 / 4.0);
    println!(
        "acknowledged write latency p50: {:.1} ms in the outage's first {minute:.0} s, {:.1} ms in its last {minute:.0} s",
        window(0.0, minute).as_secs_f64() * 1e3,
        window(seconds as f64 - minute, seconds as f64).as_secs_f64() * 1e3
    );
    let total = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n: i64 = sink.query_one("SELECT count(*) FROM readings", &[]).await.expect("count").get(0);
        if n as u64 == total {
            break;
        }
        assert!(n as u64 <= total, "the sink holds {n} rows, more than the {total} acknowledged");
        assert!(Instant::now() < deadline, "the sink holds {n} of {total} rows");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let distinct: i64 = sink.query_one("SELECT count(DISTINCT n) FROM readings", &[]).await.expect("distinct").get(0);
    assert_eq!(distinct as u64, total, "duplicates in the sink");
    println!(
        "platform back after {:.0} s: the {backlog}-row backlog was in PostgreSQL {:.1} s later ({:.0} rows/s while writes continued); {total} rows in the sink, no duplicates",
        back.duration_since(outage_started).as_secs_f64(),
        caught_up.as_secs_f64(),
        backlog as f64 / caught_up.as_secs_f64()
    );
}

/// Resident memory of a process from /proc, in MB: (heap and other anonymous, file-backed).
fn rss_mb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("RssAnon:"), field("RssFile:"))
}

async fn restart() {
    let megabytes: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("big.parquet");
    // Distinct values, so the bytes on disk are really there (no shared string buffers).
    let rows_per_mb = 1024 * 1024 / 144;
    write_points(&path, (megabytes * rows_per_mb) as i64, |i| format!("{i:0>120}"));
    let platform = Tier::start(
        "platform-service",
        &format!(
            "region: eu\nlimits:\n  memory_limit: 8GiB\n  max_message_size: 64MiB\ndatasets:\n  - name: big\n    from: file:{}\n    acceleration: {{}}\n",
            path.display()
        ),
    )
    .await;
    platform.wait_ready(Duration::from_secs(1800)).await;
    let data = dir.path().join("edge");
    let config = format!(
        "region: eu\nupstream:\n  endpoints: [http://{}]\n  call_timeout: 1s\nreplicas:\n  - name: big\nedge:\n  id: bench\n  data_dir: {}\n  max_disk: 100GiB\n",
        platform.flight_addr,
        data.display()
    );
    let mut edge = Tier::start("edge-agent", &config).await;
    let copied = Instant::now();
    loop {
        if edge.find_dataset("big").await.is_some_and(|d| d["state"] == "ready") {
            break;
        }
        assert!(copied.elapsed() < Duration::from_secs(3600), "replica never loaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let on_disk: u64 = walk(&data.join("replicas"));
    println!("replicated {} MB to the edge's disk in {:.1} s", on_disk / 1_000_000, copied.elapsed().as_secs_f64());
    edge.kill();
    let stop = std::process::Command::new("kill").arg("-STOP").arg(platform.pid().to_string()).status().expect("kill");
    assert!(stop.success());
    let started = Instant::now();
    let edge = Tier::start("edge-agent", &config).await;
    edge.wait_ready(Duration::from_secs(600)).await;
    let ready = started.elapsed();
    let rows = edge.rows("SELECT count(*) AS n FROM big").await;
    let answered = started.elapsed();
    let rss_idle = rss_mb(edge.pid());
    let _ = edge.rows("SELECT max(length(v)) AS m FROM big").await;
    let rss_scanned = rss_mb(edge.pid());
    let _ = std::process::Command::new("kill").arg("-CONT").arg(platform.pid().to_string()).status();
    println!(
        "restart with {} MB on disk, platform unreachable: ready in {:.2} s, first answer ({} rows) in {:.2} s",
        on_disk / 1_000_000,
        ready.as_secs_f64(),
        rows[0]["n"],
        answered.as_secs_f64()
    );
    println!(
        "RSS after restart: {} MB anonymous + {} MB file-backed; after a full scan: {} MB anonymous + {} MB file-backed (page cache)",
        rss_idle.0, rss_idle.1, rss_scanned.0, rss_scanned.1
    );
}

fn walk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
