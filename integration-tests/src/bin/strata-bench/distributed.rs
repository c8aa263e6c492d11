//! Platform replicas running one query together (`cluster:`): TPC-H over Parquet files on
//! one replica alone against three replicas distributing every query, in one run, and the
//! cost of having distribution on for a query too small to distribute.
//!
//! On a machine with few cores the three replicas share them, so this shows what
//! distribution costs (stages, shuffles over loopback, planning twice), not a speed-up.
//! Each query's `EXPLAIN ANALYZE` adds the bytes its stages moved and the coordinator's share
//! of its CPU time, from which the scenario projects the same plans onto N machines.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::report::{Figure, Scenario, Table};
use crate::stage_costs::{self, StageCosts};
use arrow::array::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use strata_integration_tests::free_port;
use strata_integration_tests::tier::Tier;

/// Files per table, so a scan can be shared out over the replicas.
const FILES: usize = 6;

/// Writes one table as `FILES` Parquet files under `dir/name/`.
fn write_table(dir: &Path, name: &str, batches: crate::tpch::Batches) -> anyhow::Result<()> {
    let table = dir.join(name);
    std::fs::create_dir_all(&table)?;
    let batches: Vec<RecordBatch> = batches.collect::<Result<_, _>>()?;
    let Some(first) = batches.first() else { anyhow::bail!("no rows generated for {name}") };
    let per_file = batches.len().div_ceil(FILES).max(1);
    for (i, chunk) in batches.chunks(per_file).enumerate() {
        let file = std::fs::File::create(table.join(format!("part-{i}.parquet")))?;
        let mut writer = ArrowWriter::try_new(file, first.schema(), None)?;
        for batch in chunk {
            writer.write(batch)?;
        }
        writer.close()?;
    }
    Ok(())
}

/// The datasets over the files (read live, not accelerated: only files are distributed),
/// results cache off so every round runs.
fn config(data: &Path, cluster: &str) -> String {
    let mut config = String::from(
        "region: eu\nlimits:\n  query_timeout: 600s\n  memory_limit: 8GiB\nresults_cache:\n  max_bytes: 0\ndatasets:\n",
    );
    for table in crate::tpch::TABLES {
        config.push_str(&format!(
            "  - name: {table}\n    from: file:{}/\n    format: parquet\n",
            data.join(table).display()
        ));
    }
    config.push_str(cluster);
    config
}

/// One query over HTTP: its time (ms), rows and `strata-route-detail`.
async fn timed(tier: &Tier, sql: &str) -> anyhow::Result<(f64, usize, String)> {
    let started = Instant::now();
    let (status, body, headers) = tier.sql_with(sql, &[]).await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(status == 200, "{status}: {body}");
    let detail = headers.get("strata-route-detail").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    Ok((ms, body.as_array().map_or(0, Vec::len), detail))
}

/// The stage costs of `sql` from its `EXPLAIN ANALYZE` on `tier` (zero for a query that
/// stays on one replica).
async fn stage_costs(tier: &Tier, sql: &str) -> anyhow::Result<StageCosts> {
    let (status, body, _) = tier.sql_with(&format!("EXPLAIN ANALYZE {sql}"), &[]).await;
    anyhow::ensure!(status == 200, "EXPLAIN ANALYZE: {status}: {body}");
    Ok(body
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["plan_type"] == "distributed_plan_with_metrics"))
        .and_then(|row| row["plan"].as_str())
        .map(stage_costs::parse)
        .unwrap_or_default())
}

/// One distributed query's figures, as the projection uses them.
struct QueryFigures {
    one_ms: f64,
    three_ms: f64,
    stages: f64,
    bytes_moved: f64,
    /// The coordinator's share of the query's operator CPU time.
    head_share: f64,
}

/// Network bandwidth the projection assumes between machines: 10 Gbit/s.
const BYTES_PER_MS: f64 = 1.25e9 / 1e3;

/// A query's time projected onto `machines` machines like this one: the coordinator's share
/// of its CPU time stays on one machine, the rest divides evenly; every stage boundary costs
/// what it measured here, and the bytes moved cross a 10 Gbit/s network. A model built from
/// this run's measurements, not a measurement.
fn projected_ms(query: &QueryFigures, per_stage_ms: f64, machines: f64) -> f64 {
    if query.stages == 0.0 {
        return query.one_ms;
    }
    query.one_ms * (query.head_share + (1.0 - query.head_share) / machines)
        + query.stages * per_stage_ms
        + query.bytes_moved / BYTES_PER_MS
}

fn best(times: &[f64]) -> f64 {
    times.iter().copied().fold(f64::MAX, f64::min)
}

fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

pub async fn run(scale: f64, rounds: usize, small_queries: usize) -> anyhow::Result<Scenario> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_path_buf();
    let generate_dir = data.clone();
    tokio::task::spawn_blocking(move || {
        crate::tpch::generate_with(scale, |name, batches| write_table(&generate_dir, name, batches))
    })
    .await??;
    let queries = crate::tpch::queries()?;

    let alone = Tier::start("platform-service", &config(&data, "")).await;
    alone.wait_ready(Duration::from_secs(600)).await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let workers = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect::<Vec<_>>().join(", ");
    // A task per 64 MiB of files at SF1 (lineitem's stages get one task per replica), less
    // at smaller scales so that they are distributed too.
    let bytes_per_task = ((scale * f64::from(64u32 << 20)) as u64).max(256 << 10);
    let mut replicas = Vec::new();
    for port in ports.iter().rev() {
        let cluster = format!(
            "cluster:\n  listen: 127.0.0.1:{port}\n  workers: [{workers}]\n  distribute_above: 1MiB\n  bytes_per_task: {bytes_per_task}\n"
        );
        let replica = Tier::start("platform-service", &config(&data, &cluster)).await;
        replica.wait_ready(Duration::from_secs(600)).await;
        replicas.push(replica);
    }
    let coordinator = replicas.last().ok_or_else(|| anyhow::anyhow!("no replica"))?;

    let mut rows = Vec::new();
    let mut measured = Vec::new();
    let (mut total_alone, mut total_cluster) = (0.0, 0.0);
    for (i, sql) in queries.iter().enumerate() {
        let (mut alone_ms, mut cluster_ms, mut stages) = (Vec::new(), Vec::new(), 0.0);
        for _ in 0..rounds {
            let (ms, expected, _) = timed(&alone, sql).await?;
            alone_ms.push(ms);
            let (ms, got, detail) = timed(coordinator, sql).await?;
            cluster_ms.push(ms);
            anyhow::ensure!(got == expected, "Q{}: {got} rows distributed, {expected} on one replica", i + 1);
            stages = detail
                .split(" in ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
        let (a, c) = (best(&alone_ms), best(&cluster_ms));
        total_alone += a;
        total_cluster += c;
        let costs = if stages > 0.0 { stage_costs(coordinator, sql).await? } else { StageCosts::default() };
        let head_share =
            if costs.total_compute_ms > 0.0 { costs.head_compute_ms / costs.total_compute_ms } else { 1.0 };
        measured.push(QueryFigures { one_ms: a, three_ms: c, stages, bytes_moved: costs.bytes_moved, head_share });
        rows.push((
            format!("Q{:02}", i + 1),
            vec![Some(a), Some(c), Some(c / a), Some(stages), Some(costs.bytes_moved / 1e6), Some(head_share * 100.0)],
        ));
    }
    let bytes_moved: f64 = measured.iter().map(|m| m.bytes_moved).sum();
    rows.push((
        "total".into(),
        vec![
            Some(total_alone),
            Some(total_cluster),
            Some(total_cluster / total_alone),
            None,
            Some(bytes_moved / 1e6),
            None,
        ],
    ));
    // What a stage boundary cost here: the three replicas' extra time over the stages of
    // the queries that were distributed.
    let distributed = measured.iter().filter(|m| m.stages > 0.0);
    let (extra, stage_count) = distributed.fold((0.0, 0.0), |(e, n), m| (e + (m.three_ms - m.one_ms), n + m.stages));
    let per_stage_ms = if stage_count > 0.0 { (extra / stage_count).max(0.0) } else { 0.0 };
    let projection = |machines: f64| -> f64 { measured.iter().map(|m| projected_ms(m, per_stage_ms, machines)).sum() };

    // A query far below `distribute_above`, on a replica with `cluster:` and on one without.
    let small = "SELECT n_name FROM nation WHERE n_nationkey = 7";
    let (mut small_alone, mut small_cluster) = (Vec::new(), Vec::new());
    for _ in 0..small_queries {
        small_alone.push(timed(&alone, small).await?.0);
        small_cluster.push(timed(coordinator, small).await?.0);
    }
    let (p50_alone, p50_cluster) = (median(&mut small_alone), median(&mut small_cluster));
    Ok(Scenario {
        name: format!("Distributed TPC-H SF{scale} over Parquet: one replica vs three, best of {rounds}"),
        baseline: "one platform replica without `cluster:` over the same files".into(),
        results: Vec::new(),
        figures: vec![
            Figure::new("one replica, total", total_alone, "ms", Some(1.0)),
            Figure::new(
                "three replicas with `cluster:`, total",
                total_cluster,
                "ms",
                Some(total_cluster / total_alone),
            ),
            Figure::new("bytes moved between stages, all queries", bytes_moved / 1e6, "MB", None),
            Figure::new("cost of one stage boundary here (extra time / stages)", per_stage_ms, "ms", None),
            Figure::new(
                "projected total, 3 machines like this one (model)",
                projection(3.0),
                "ms",
                Some(projection(3.0) / total_alone),
            ),
            Figure::new(
                "projected total, 6 machines (model)",
                projection(6.0),
                "ms",
                Some(projection(6.0) / total_alone),
            ),
            Figure::new(
                "projected total, 12 machines (model)",
                projection(12.0),
                "ms",
                Some(projection(12.0) / total_alone),
            ),
            Figure::new("small query p50, no cluster", p50_alone, "ms", Some(1.0)),
            Figure::new("small query p50, cluster: on (stays local)", p50_cluster, "ms", Some(p50_cluster / p50_alone)),
        ],
        table: Some(Table {
            columns: vec![
                "one replica ms".into(),
                "three replicas ms".into(),
                "three / one".into(),
                "stages".into(),
                "MB moved".into(),
                "coordinator's % of CPU".into(),
            ],
            rows,
        }),
    })
}
