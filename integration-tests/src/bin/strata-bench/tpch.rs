//! TPC-H: all 22 queries through the platform's Flight SQL on Arrow-accelerated tables,
//! against DataFusion in-process over the same Parquet files, and DuckDB over them when its
//! Python package can be installed.

use std::path::Path;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::TryStreamExt;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::workspace_root;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator, PartSuppGenerator,
    RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow, SupplierArrow,
};

use crate::paths::channel;
use crate::report::{Figure, Scenario, Table};

pub(crate) const TABLES: [&str; 8] =
    ["nation", "region", "part", "supplier", "partsupp", "customer", "orders", "lineitem"];

fn write_table(
    dir: &Path,
    name: &str,
    batches: impl Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>,
) -> anyhow::Result<()> {
    let mut batches = batches.peekable();
    let Some(Ok(first)) = batches.peek() else { anyhow::bail!("no rows generated for {name}") };
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(dir.join(format!("{name}.parquet")))?, first.schema(), None)?;
    for batch in batches {
        writer.write(&batch?)?;
    }
    writer.close()?;
    Ok(())
}

/// One generated TPC-H table's batches.
pub(crate) type Batches = Box<dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>>;

/// Generates the eight TPC-H tables at `scale`, handing each to `write` by name.
pub(crate) fn generate_with(
    scale: f64,
    mut write: impl FnMut(&str, Batches) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    write("nation", Box::new(NationArrow::new(NationGenerator::new(scale, 1, 1))))?;
    write("region", Box::new(RegionArrow::new(RegionGenerator::new(scale, 1, 1))))?;
    write("part", Box::new(PartArrow::new(PartGenerator::new(scale, 1, 1))))?;
    write("supplier", Box::new(SupplierArrow::new(SupplierGenerator::new(scale, 1, 1))))?;
    write("partsupp", Box::new(PartSuppArrow::new(PartSuppGenerator::new(scale, 1, 1))))?;
    write("customer", Box::new(CustomerArrow::new(CustomerGenerator::new(scale, 1, 1))))?;
    write("orders", Box::new(OrderArrow::new(OrderGenerator::new(scale, 1, 1))))?;
    write("lineitem", Box::new(LineItemArrow::new(LineItemGenerator::new(scale, 1, 1))))?;
    Ok(())
}

/// Writes the eight TPC-H tables at `scale` as Parquet files into `dir`.
fn generate(dir: &Path, scale: f64) -> anyhow::Result<()> {
    generate_with(scale, |name, batches| write_table(dir, name, batches))
}

pub(crate) fn queries() -> anyhow::Result<Vec<String>> {
    (1..=22)
        .map(|n| Ok(std::fs::read_to_string(workspace_root().join(format!("integration-tests/tpch/q{n:02}.sql")))?))
        .collect()
}

fn best(times: &[f64]) -> f64 {
    times.iter().copied().fold(f64::MAX, f64::min)
}

/// Runs every query `rounds` times each way and reports the best time per query (ms).
pub async fn run(scale: f64, rounds: usize, python: Option<&Path>) -> anyhow::Result<Scenario> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_path_buf();
    let generate_dir = data.clone();
    tokio::task::spawn_blocking(move || generate(&generate_dir, scale)).await??;
    let queries = queries()?;

    // The results cache is off: this compares query execution, and every round after the
    // first would otherwise be a cache hit.
    let mut config = String::from(
        "region: eu\nlimits:\n  query_timeout: 600s\n  memory_limit: 12GiB\nresults_cache:\n  max_bytes: 0\ndatasets:\n",
    );
    for table in TABLES {
        config.push_str(&format!(
            "  - name: {table}\n    from: file:{}\n    acceleration: {{}}\n",
            data.join(format!("{table}.parquet")).display()
        ));
    }
    let platform = Tier::start("platform-service", &config).await;
    platform.wait_ready(Duration::from_secs(1800)).await;
    let mut client = arrow_flight::sql::client::FlightSqlServiceClient::new(channel(platform.flight_addr).await?);

    let ctx = SessionContext::new();
    for table in TABLES {
        let path = data.join(format!("{table}.parquet"));
        ctx.register_parquet(table, path.to_str().unwrap_or_default(), ParquetReadOptions::default()).await?;
    }

    let mut rows = Vec::new();
    let (mut total_platform, mut total_datafusion) = (0.0, 0.0);
    for (i, sql) in queries.iter().enumerate() {
        let (mut platform_ms, mut datafusion_ms) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let started = Instant::now();
            let local: Vec<RecordBatch> = ctx.sql(sql).await?.collect().await?;
            datafusion_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            let info = client.execute(sql.clone(), None).await?;
            let mut remote = 0usize;
            for endpoint in info.endpoint {
                let ticket = endpoint.ticket.ok_or_else(|| anyhow::anyhow!("no ticket"))?;
                let batches: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
                remote += batches.iter().map(RecordBatch::num_rows).sum::<usize>();
            }
            platform_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let expected: usize = local.iter().map(RecordBatch::num_rows).sum();
            anyhow::ensure!(
                remote == expected,
                "Q{}: the platform returned {remote} rows, DataFusion {expected}",
                i + 1
            );
        }
        let (p, d) = (best(&platform_ms), best(&datafusion_ms));
        total_platform += p;
        total_datafusion += d;
        rows.push((format!("Q{:02}", i + 1), vec![Some(p), Some(d), Some(p / d)]));
    }

    let duckdb = match python {
        Some(python) => duckdb_times(python, &data, rounds).await,
        None => Err(anyhow::anyhow!("no Python given")),
    };
    let mut columns = vec!["platform ms".to_string(), "DataFusion ms".into(), "platform / DataFusion".into()];
    let mut figures = vec![
        Figure::new("DataFusion in-process over Parquet, total", total_datafusion, "ms", Some(1.0)),
        Figure::new(
            "platform (Flight SQL, accelerated), total",
            total_platform,
            "ms",
            Some(total_platform / total_datafusion),
        ),
    ];
    let mut total_row = vec![Some(total_platform), Some(total_datafusion), Some(total_platform / total_datafusion)];
    match duckdb {
        Ok(times) => {
            columns.push("DuckDB ms".into());
            for (row, t) in rows.iter_mut().zip(&times) {
                row.1.push(Some(*t));
            }
            let total: f64 = times.iter().sum();
            total_row.push(Some(total));
            figures.push(Figure::new("DuckDB over Parquet, total", total, "ms", Some(total / total_datafusion)));
        }
        Err(err) => eprintln!("DuckDB column left out: {err:#}"),
    }
    rows.push(("total".into(), total_row));
    Ok(Scenario {
        name: format!("TPC-H SF{scale}, 22 queries, best of {rounds}"),
        baseline: "DataFusion in-process over the same Parquet files".into(),
        results: Vec::new(),
        figures,
        table: Some(Table { columns, rows }),
    })
}

/// Best time per query (ms) of DuckDB over the Parquet files, from its Python package.
async fn duckdb_times(python: &Path, data: &Path, rounds: usize) -> anyhow::Result<Vec<f64>> {
    let script = r#"
import json, sys, time
import duckdb
data, rounds, queries = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
con = duckdb.connect()
for t in ["nation", "region", "part", "supplier", "partsupp", "customer", "orders", "lineitem"]:
    con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{data}/{t}.parquet')")
best = []
for path in queries:
    sql = open(path).read()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = con.execute(sql)
        (result.to_arrow_table if hasattr(result, "to_arrow_table") else result.fetch_arrow_table)()
        times.append((time.perf_counter() - started) * 1e3)
    best.append(min(times))
print(json.dumps(best))
"#;
    let files: Vec<String> = (1..=22)
        .map(|n| workspace_root().join(format!("integration-tests/tpch/q{n:02}.sql")).display().to_string())
        .collect();
    let output = tokio::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(data)
        .arg(rounds.to_string())
        .args(files)
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "DuckDB run failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(serde_json::from_slice(&output.stdout)?)
}
