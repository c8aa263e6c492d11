//! Edge scenarios: ingest throughput with every batch fsynced before it is acknowledged,
//! an edge agent's restart with its replicas on disk and the platform unreachable, and an
//! outage during which writers keep their rate and the backlog is uploaded afterwards.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::try_wait_until;

use crate::report::{Figure, Scenario};

/// A throwaway PostgreSQL with an empty `readings` table, and a platform taking edge
/// writes into it.
async fn readings_sink() -> anyhow::Result<(PgServer, String)> {
    let pg = PgServer::start();
    pg.connect()
        .await
        .batch_execute(
            "CREATE TABLE readings (writer integer NOT NULL, n bigint NOT NULL, celsius double precision NOT NULL)",
        )
        .await?;
    let config = format!(
        "region: eu\ndatasets:\n  - name: readings\n    from: postgres:public.readings\n    params: {}\n    writable: true\n",
        pg.params_yaml()
    );
    Ok((pg, config))
}

fn edge_config(platform: std::net::SocketAddr, data: &std::path::Path, extra: &str) -> String {
    format!(
        "region: eu\nupstream:\n  endpoints: [http://{platform}]\n  call_timeout: 2s\nedge:\n  id: bench\n  data_dir: {}\n  writable: [readings]\n{extra}",
        data.display()
    )
}

/// `rows` readings of `writer` starting at `first`, as the NDJSON an app posts.
fn readings(writer: usize, first: usize, rows: usize) -> String {
    (first..first + rows).map(|n| format!("{{\"writer\": {writer}, \"n\": {n}, \"celsius\": 21.5}}\n")).collect()
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> anyhow::Result<()> {
    let response = client.post(url).header("content-type", "application/x-ndjson").body(body).send().await?;
    anyhow::ensure!(response.status().is_success(), "write refused: {}", response.text().await.unwrap_or_default());
    Ok(())
}

async fn sink_rows(pg: &PgServer) -> anyhow::Result<u64> {
    let n: i64 = pg.connect().await.query_one("SELECT count(*) FROM readings", &[]).await?.get(0);
    Ok(n as u64)
}

/// Waits until the sink holds at least `rows` rows; the moment it saw them.
async fn sink_holds(pg: &PgServer, rows: u64, timeout: Duration) -> anyhow::Result<Instant> {
    try_wait_until(timeout, || async { sink_rows(pg).await.ok().filter(|n| *n >= rows).map(|_| Instant::now()) })
        .await
        .ok_or_else(|| anyhow::anyhow!("the sink never held {rows} rows within {timeout:?}"))
}

/// Writes and fsyncs 4 KiB `count` times in a file under `dir`: how many durable appends a
/// second this disk takes one at a time, the rate an edge without group commit would get.
fn fsyncs_per_second(dir: &std::path::Path, count: usize) -> anyhow::Result<f64> {
    let mut file = std::fs::File::create(dir.join("fsync-probe"))?;
    let block = vec![7u8; 4096];
    let started = Instant::now();
    for _ in 0..count {
        file.write_all(&block)?;
        file.sync_data()?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// `writers` clients post `batches` batches of `rows` rows to an edge agent over HTTP;
/// each answer comes after the batch is fsynced in the edge's log.
pub async fn ingest(batches: usize, rows: usize, writers: usize) -> anyhow::Result<Scenario> {
    let (pg, platform_config) = readings_sink().await?;
    let platform = Tier::start("platform-service", &platform_config).await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let data = tempfile::tempdir()?;
    let edge = Tier::start("edge-agent", &edge_config(platform.flight_addr, data.path(), "")).await;
    edge.wait_ready(Duration::from_secs(30)).await;
    let baseline = fsyncs_per_second(data.path(), 200)?;

    let url = edge.url("/v1/ingest/readings");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = Vec::new();
            for b in (w..batches).step_by(writers) {
                let t = Instant::now();
                post(&client, &url, readings(w, b * rows, rows)).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let acknowledged = started.elapsed().as_secs_f64();
    let total = (batches * rows) as u64;
    let uploaded = sink_holds(&pg, total, Duration::from_secs(600)).await? - started;
    let rate = batches as f64 / acknowledged;
    Ok(Scenario {
        name: format!(
            "Edge ingest: {batches} batches x {rows} rows from {writers} writers, each fsynced before its answer"
        ),
        baseline: "one 4 KiB write + fdatasync at a time on the same disk".into(),
        results: Vec::new(),
        table: None,
        figures: vec![
            Figure::new("fdatasync'd 4 KiB appends, one at a time", baseline, "ops/s", Some(1.0)),
            Figure::new("acknowledged batches (group commit)", rate, "batches/s", Some(rate / baseline)),
            Figure::new("acknowledged rows", total as f64 / acknowledged, "rows/s", None),
            Figure::new("acknowledged write latency p50", median(latencies).as_secs_f64() * 1e3, "ms", None),
            Figure::new("every row in PostgreSQL after the first write", uploaded.as_secs_f64(), "s", None),
        ],
    })
}

/// A Parquet file of `rows` rows `(id, v)` with a 120-character distinct `v`, so the bytes
/// on disk are really there.
fn write_wide(path: &std::path::Path, rows: i64) -> anyhow::Result<()> {
    let schema =
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("v", DataType::Utf8, false)]));
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path)?, Arc::clone(&schema), None)?;
    for start in (0..rows).step_by(65_536) {
        let ids: Vec<i64> = (start..(start + 65_536).min(rows)).collect();
        let values: Vec<String> = ids.iter().map(|i| format!("{i:0>120}")).collect();
        let columns = vec![Arc::new(Int64Array::from(ids)) as _, Arc::new(StringArray::from(values)) as _];
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns)?)?;
    }
    writer.close()?;
    Ok(())
}

/// Reads every file under `dir` once: the floor for loading the same bytes at start.
fn read_all(dir: &std::path::Path) -> anyhow::Result<Duration> {
    fn visit(dir: &std::path::Path, buffer: &mut [u8]) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.metadata()?.is_dir() {
                visit(&entry.path(), buffer)?;
            } else {
                let mut file = std::fs::File::open(entry.path())?;
                while std::io::Read::read(&mut file, buffer)? > 0 {}
            }
        }
        Ok(())
    }
    let started = Instant::now();
    visit(dir, &mut vec![0u8; 1 << 20])?;
    Ok(started.elapsed())
}

/// An edge agent with `megabytes` of replica on disk restarts while its platform is
/// unreachable (SIGSTOP): time to ready and to a first answer, and its memory.
pub async fn restart(megabytes: usize) -> anyhow::Result<Scenario> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big.parquet");
    write_wide(&path, (megabytes * (1024 * 1024 / 144)) as i64)?;
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
    try_wait_until(Duration::from_secs(3600), || async {
        edge.find_dataset("big").await.filter(|d| d["state"] == "ready")
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("the replica never loaded"))?;
    let copy_time = copied.elapsed();
    let on_disk = strata_upstream::disk::dir_bytes(&data.join("replicas"));
    edge.kill();
    let read_floor = read_all(&data.join("replicas"))?;

    let signal = |sig: &str| std::process::Command::new("kill").arg(sig).arg(platform.pid().to_string()).status();
    anyhow::ensure!(signal("-STOP")?.success(), "cannot stop the platform");
    let started = Instant::now();
    let edge = Tier::start("edge-agent", &config).await;
    edge.wait_ready(Duration::from_secs(600)).await;
    let ready = started.elapsed();
    let rows = edge.rows("SELECT count(*) AS n FROM big").await;
    let answered = started.elapsed();
    let (anon, file) = crate::points::rss_bytes(edge.pid());
    let (anon, file) = (anon as f64 / 1e6, file as f64 / 1e6);
    signal("-CONT")?;
    anyhow::ensure!(rows[0]["n"].as_u64().is_some_and(|n| n > 0), "no rows after the restart: {rows:?}");
    let mb = on_disk as f64 / 1e6;
    let floor = read_floor.as_secs_f64();
    Ok(Scenario {
        name: format!("Edge restart with {mb:.0} MB of replica on disk, platform unreachable"),
        baseline: "reading the same replica files once (page cache warm)".into(),
        results: Vec::new(),
        table: None,
        figures: vec![
            Figure::new("read the replica files", floor, "s", Some(1.0)),
            Figure::new("restart to ready", ready.as_secs_f64(), "s", Some(ready.as_secs_f64() / floor)),
            Figure::new("restart to first answer", answered.as_secs_f64(), "s", Some(answered.as_secs_f64() / floor)),
            Figure::new("first copy from the platform", mb / copy_time.as_secs_f64(), "MB/s", None),
            Figure::new("RSS after restart, anonymous", anon, "MB", None),
            Figure::new("RSS after restart, file-backed", file, "MB", None),
        ],
    })
}

/// Writers keep `rate` batches a second of `rows` rows at the edge while the platform is
/// down for `seconds`; then it returns and the backlog is uploaded as writes continue.
pub async fn outage(seconds: u64, rate: u64, rows: usize) -> anyhow::Result<Scenario> {
    let (pg, platform_config) = readings_sink().await?;
    let mut platform = Tier::start("platform-service", &platform_config).await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let (flight, http) = (platform.flight_addr, platform.http_addr);
    let data = tempfile::tempdir()?;
    let edge = Tier::start("edge-agent", &edge_config(flight, data.path(), "  max_log_size: 8GiB\n")).await;
    edge.wait_ready(Duration::from_secs(30)).await;
    // The edge learns the dataset's columns from the platform's catalog once.
    try_wait_until(Duration::from_secs(60), || async {
        (edge.sql("SELECT count(*) AS n FROM readings").await.0 == 200).then_some(())
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("the edge never learned `readings`"))?;
    platform.kill();

    let acknowledged = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let url = edge.url("/v1/ingest/readings");
    let writer = {
        let (acknowledged, stop) = (Arc::clone(&acknowledged), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut latencies = Vec::new();
            let began = Instant::now();
            let mut b = 0;
            while !stop.is_cancelled() {
                tick.tick().await;
                let t = Instant::now();
                post(&client, &url, readings(1, b * rows, rows)).await?;
                acknowledged.fetch_add(rows as u64, Ordering::SeqCst);
                latencies.push((began.elapsed(), t.elapsed()));
                b += 1;
            }
            anyhow::Ok(latencies)
        })
    };
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let backlog = acknowledged.load(Ordering::SeqCst);
    let log_mb = strata_upstream::disk::dir_bytes(&data.path().join("ingest")) as f64 / 1e6;
    let back = Instant::now();
    let platform = Tier::builder("platform-service").config(&platform_config).at(flight, http).start().await;
    platform.wait_ready(Duration::from_secs(60)).await;
    let caught_up = sink_holds(&pg, backlog, Duration::from_secs(3600)).await? - back;
    stop.cancel();
    let latencies = writer.await??;
    let total = acknowledged.load(Ordering::SeqCst);
    sink_holds(&pg, total, Duration::from_secs(600)).await?;
    let (in_sink, distinct): (i64, i64) = {
        let row = pg.connect().await.query_one("SELECT count(*), count(DISTINCT n) FROM readings", &[]).await?;
        (row.get(0), row.get(1))
    };
    anyhow::ensure!(
        in_sink as u64 == total && distinct as u64 == total,
        "{in_sink} rows, {distinct} distinct, {total} acknowledged"
    );
    // Write latency must not grow with the backlog: the outage's first and last windows.
    let window = seconds as f64 / 4.0;
    let latency_in = |from: f64, to: f64| {
        median(latencies.iter().filter(|(at, _)| (from..to).contains(&at.as_secs_f64())).map(|(_, l)| *l).collect())
    };
    let first = latency_in(0.0, window).as_secs_f64() * 1e3;
    let last = latency_in(seconds as f64 - window, seconds as f64).as_secs_f64() * 1e3;
    Ok(Scenario {
        name: format!("Edge outage of {seconds} s at {rate} batches/s x {rows} rows"),
        baseline: "acknowledged write latency in the outage's first quarter".into(),
        results: Vec::new(),
        table: None,
        figures: vec![
            Figure::new("write latency p50, first quarter of the outage", first, "ms", Some(1.0)),
            Figure::new("write latency p50, last quarter of the outage", last, "ms", Some(last / first)),
            Figure::new("backlog when the platform returned", backlog as f64, "rows", None),
            Figure::new("edge log holding it", log_mb, "MB", None),
            Figure::new("backlog in PostgreSQL after the platform returned", caught_up.as_secs_f64(), "s", None),
            Figure::new("upload rate while writes continued", backlog as f64 / caught_up.as_secs_f64(), "rows/s", None),
        ],
    })
}
