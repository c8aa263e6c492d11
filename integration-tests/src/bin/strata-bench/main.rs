//! `strata-bench`: starts the real tier binaries on localhost and measures each scenario
//! against its baseline in the same run (see docs/performance.md for the latest figures).
//!
//! `strata-bench` runs everything at full size (1M-row tables, TPC-H SF1, 1 GB transfer);
//! `strata-bench --quick` runs the same code on small data with few iterations, which CI
//! uses to keep the harness working (it never asserts on times).

#![allow(clippy::print_stdout)]

mod bulk;
mod delay_relay;
mod distributed;
mod edge;
mod growth;
mod measure;
mod netns;
mod paths;
mod points;
mod report;
mod security_cost;
mod stage_costs;
mod tpch;
mod tracing_cost;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::measure::Effort;
use crate::report::Report;

#[derive(Parser)]
#[command(about = "Strata's benchmark harness: tier paths against their baselines, side by side")]
struct Args {
    /// Small data and few iterations: checks the harness, the figures mean little.
    #[arg(long)]
    quick: bool,
    /// Scenarios to run (comma separated): lookup, aggregate, dashboard, footprint, netns,
    /// tracing, security, bulk, tpch, distributed, edge-ingest, edge-restart, edge-outage,
    /// growth. `netns` needs root; without it the scenario is skipped with the reason.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lookup,aggregate,dashboard,footprint,netns,tracing,security,bulk,tpch,distributed,edge-ingest,edge-restart,edge-outage,growth"
    )]
    only: Vec<String>,
    /// Measure only the paths whose names contain one of these (comma separated), for
    /// profiling one path; a scenario's baseline is left out too unless named.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Where to write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// MiB of Arrow the bulk scenario moves (default: 1024, or 16 with `--quick`).
    #[arg(long)]
    bulk_mib: Option<u64>,
    /// Table sizes the growth scenario measures (default: 1M, 10M and 50M rows, or 10k and
    /// 100k with `--quick`); a size the machine lacks the memory for is left out.
    #[arg(long, value_delimiter = ',')]
    growth_rows: Vec<i64>,
    /// Where the growth scenario writes its log-log plot (default: docs/performance-growth.png,
    /// none with `--quick`).
    #[arg(long)]
    growth_png: Option<PathBuf>,
    /// TPC-H scale factor of the tpch and distributed scenarios (default: 1, or 0.01 with
    /// `--quick`).
    #[arg(long)]
    scale: Option<f64>,
    /// Rounds of each TPC-H query, the best reported (default: 3, or 1 with `--quick`).
    #[arg(long)]
    rounds: Option<usize>,
    /// Python with the `duckdb` package, for TPC-H's DuckDB column.
    #[arg(long, env = "STRATA_BENCH_PYTHON")]
    python: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    measure::ONLY_PATHS.set(args.paths.clone()).ok();
    let wants = |name: &str| args.only.iter().any(|o| o == name);
    let (rows, lookups, bulk_bytes, scale, rounds) =
        if args.quick { (20_000, 200, 16 << 20, 0.01, 1) } else { (1_000_000, 5_000, 1 << 30, 1.0, 3) };
    let (scale, rounds) = (args.scale.unwrap_or(scale), args.rounds.unwrap_or(rounds).max(1));
    anyhow::ensure!(scale > 0.0 && scale.is_finite(), "--scale {scale}: a TPC-H scale factor is a positive number");
    let lookup_effort = Effort {
        iterations: lookups,
        warmup: lookups / 10,
        throughput_for: Duration::from_millis(if args.quick { 200 } else { 3000 }),
        concurrency: &[1, 8, 64],
    };
    let aggregate_effort = Effort { iterations: lookups / 50, warmup: 2, ..lookup_effort };
    let dashboard_effort = Effort { iterations: lookups / 10, warmup: 8, ..lookup_effort };

    let mut scenarios = Vec::new();
    // A scenario that fails is reported and the others still run.
    let mut keep = |name: &str, outcome: anyhow::Result<report::Scenario>| match outcome {
        Ok(scenario) => {
            println!("{}", scenario_markdown(&scenario));
            scenarios.push(scenario);
        }
        Err(err) => eprintln!("{name} failed: {err:#}"),
    };
    if ["lookup", "aggregate", "dashboard", "footprint", "netns", "tracing", "security"].iter().any(|s| wants(s)) {
        eprintln!("setting up {rows} rows in PostgreSQL, a platform and a sidecar");
        let points = points::Points::start(rows).await?;
        if wants("footprint") {
            keep("footprint", points.footprint().await);
        }
        if wants("lookup") {
            eprintln!("point lookups");
            keep("lookup", points.lookup(lookup_effort).await);
        }
        if wants("aggregate") {
            eprintln!("aggregates");
            keep("aggregate", points.aggregate(aggregate_effort).await);
        }
        if wants("dashboard") {
            eprintln!("dashboard, results cache on and off");
            keep("dashboard", points.dashboard(dashboard_effort).await);
        }
        if wants("netns") {
            eprintln!("point lookups across an emulated network hop");
            keep("emulated hop", netns::run(&points.parquet, rows, lookup_effort).await);
        }
        if wants("tracing") {
            eprintln!("tracing off, on, and on with the collector down");
            keep("tracing", tracing_cost::run(&points.parquet, rows, lookup_effort).await);
        }
        if wants("security") {
            eprintln!("API keys and TLS off and on");
            keep("security", security_cost::run(&points.parquet, rows, lookup_effort).await);
        }
    }
    if wants("bulk") {
        eprintln!("bulk transfer");
        keep("bulk", bulk::run(args.bulk_mib.map_or(bulk_bytes, |mib| mib << 20)).await);
    }
    if wants("edge-ingest") {
        eprintln!("edge ingest");
        let (batches, rows) = if args.quick { (200, 50) } else { (10_000, 100) };
        keep("edge-ingest", edge::ingest(batches, rows, 4).await);
    }
    if wants("edge-restart") {
        eprintln!("edge restart with its replica on disk");
        keep("edge-restart", edge::restart(if args.quick { 8 } else { 512 }).await);
    }
    if wants("edge-outage") {
        eprintln!("edge outage and catch-up");
        let (seconds, rate) = if args.quick { (4, 50) } else { (120, 100) };
        keep("edge-outage", edge::outage(seconds, rate, 100).await);
    }
    if wants("growth") {
        let sizes = match (&args.growth_rows[..], args.quick) {
            ([], true) => vec![10_000, 100_000],
            ([], false) => vec![1_000_000, 10_000_000, 50_000_000],
            (sizes, _) => sizes.to_vec(),
        };
        eprintln!("how cost grows: {sizes:?} rows");
        let png = args.growth_png.clone().or_else(|| {
            (!args.quick).then(|| strata_integration_tests::workspace_root().join("docs/performance-growth.png"))
        });
        let growth = growth::Growth {
            sizes: &sizes,
            lookup: Effort { iterations: lookups / 2, warmup: lookups / 20, concurrency: &[8], ..lookup_effort },
            aggregate: Effort {
                iterations: if args.quick { 4 } else { 20 },
                warmup: 1,
                concurrency: &[],
                ..lookup_effort
            },
            refreshes: if args.quick { 1 } else { 2 },
            png: png.as_deref(),
        };
        keep("growth", growth::run(growth).await);
    }
    if wants("tpch") {
        eprintln!("TPC-H SF{scale}");
        keep("tpch", tpch::run(scale, rounds, args.python.as_deref()).await);
    }
    if wants("distributed") {
        eprintln!("TPC-H SF{scale} over Parquet, one replica and three");
        keep("distributed", distributed::run(scale, rounds, if args.quick { 50 } else { 500 }).await);
    }

    let report = Report {
        commit: git_commit(),
        profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        quick: args.quick,
        machine: report::machine(),
        scenarios,
    };
    println!("## All scenarios\n\n{}", report.markdown());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

fn scenario_markdown(scenario: &report::Scenario) -> String {
    Report {
        commit: String::new(),
        profile: "",
        quick: false,
        machine: String::new(),
        scenarios: vec![scenario.clone()],
    }
    .markdown()
    .lines()
    .skip(1)
    .collect::<Vec<_>>()
    .join("\n")
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(strata_integration_tests::workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
