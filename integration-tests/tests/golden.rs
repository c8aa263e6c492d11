//! Golden SQL (`integration-tests/slt/*.slt`): the same cases in-process and through every
//! tier over Flight SQL: a platform-service, an app-sidecar (local, forwarded and mixed
//! routes) and an edge-agent, as GreptimeDB runs its cases standalone and distributed.
//! Regenerate expected output with
//! `STRATA_SLT_COMPLETE=1 cargo test -p strata-integration-tests --test golden golden_sql_in_process`
//! (never by hand), and read the diff.

use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::TryStreamExt;
use sqllogictest::{DBOutput, DefaultColumnType};
use strata_core::{Config, Engine};
use strata_integration_tests::tier::Tier;
use strata_integration_tests::workspace_root;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SltError(String);

fn example_config() -> String {
    std::fs::read_to_string(workspace_root().join("examples/strata.yaml"))
        .expect("example config")
        .replace("file:data/", &format!("file:{}/examples/data/", workspace_root().display()))
}

fn to_output(batches: &[RecordBatch]) -> DBOutput<DefaultColumnType> {
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    let mut columns = 0;
    for batch in batches {
        columns = batch.num_columns();
        let formatters: Vec<_> =
            batch.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter")).collect();
        for row in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| {
                        let s = f.value(row).to_string();
                        if s.is_empty() { "(empty)".to_string() } else { s }
                    })
                    .collect(),
            );
        }
    }
    DBOutput::Rows { types: vec![DefaultColumnType::Any; columns], rows }
}

/// The engine in this process, no server involved.
struct InProcess(Engine);

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for InProcess {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let stream = self.0.execute(sql, Vec::new()).await.map_err(|e| SltError(e.to_string()))?;
        let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(|e| SltError(e.to_string()))?;
        Ok(to_output(&batches))
    }

    async fn shutdown(&mut self) {}
}

/// A live platform-service, over Flight SQL.
struct Live(std::sync::Arc<Tier>);

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for Live {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let batches = self.0.flight_query(sql).await.map_err(|e| SltError(e.message().to_string()))?;
        Ok(to_output(&batches))
    }

    async fn shutdown(&mut self) {}
}

fn slt_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(workspace_root().join("integration-tests/slt"))
        .expect("slt dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files");
    files
}

async fn in_process_engine() -> Engine {
    let config = Config::parse(&example_config(), "examples/strata.yaml").expect("config");
    let engine = Engine::new(&config).expect("engine");
    engine.start();
    tokio::time::timeout(Duration::from_secs(20), engine.wait_ready()).await.expect("engine ready");
    engine
}

#[tokio::test]
async fn golden_sql_in_process() {
    let engine = in_process_engine().await;
    for file in slt_files() {
        let engine = engine.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let engine = engine.clone();
            async move { Ok(InProcess(engine)) }
        });
        if std::env::var("STRATA_SLT_COMPLETE").is_ok() {
            runner
                .update_test_file(
                    &file,
                    " ",
                    sqllogictest::default_validator,
                    sqllogictest::default_normalizer,
                    sqllogictest::default_column_validator,
                )
                .await
                .expect("complete");
        } else {
            runner.run_file_async(&file).await.unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
    }
}

/// Runs every `.slt` file against `tier` over Flight SQL.
async fn run_through(tier: Tier) -> Tier {
    let tier = std::sync::Arc::new(tier);
    for file in slt_files() {
        let shared = std::sync::Arc::clone(&tier);
        let mut runner = sqllogictest::Runner::new(move || {
            let tier = std::sync::Arc::clone(&shared);
            async move { Ok(Live(tier)) }
        });
        runner
            .run_file_async(&file)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\nlogs:\n{}", file.display(), tier.logs()));
    }
    std::sync::Arc::into_inner(tier).expect("the runners are gone")
}

/// Queries `tier` answered by route (`local`, `forwarded`, `mixed`), from its `/metrics`.
async fn routes(tier: &Tier) -> std::collections::BTreeMap<String, u64> {
    let text = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    let mut routes = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("strata_query_routes_total{")) {
        let route = line.split("route=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
        let n: u64 = line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        *routes.entry(route.to_string()).or_insert(0) += n;
    }
    routes
}

async fn platform() -> Tier {
    let platform = Tier::start("platform-service", &example_config()).await;
    platform.wait_ready(Duration::from_secs(20)).await;
    platform
}

/// A tier below `platform` replicating `orders` (accelerated there) and not `customers`
/// (federated there): queries over orders answer locally, over customers are forwarded,
/// and joins of the two run mixed.
async fn downstream(binary: &str, platform: &Tier, extra: &str) -> Tier {
    let config = format!(
        "region: local\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: orders\n{extra}",
        platform.flight_addr
    );
    let tier = Tier::start(binary, &config).await;
    tier.wait_ready(Duration::from_secs(20)).await;
    tier.wait_for(Duration::from_secs(20), "the orders replica", || async {
        tier.find_dataset("orders").await.filter(|d| d["state"] == "ready")
    })
    .await;
    tier
}

#[tokio::test]
async fn golden_sql_through_a_platform() {
    run_through(platform().await).await;
}

#[tokio::test]
async fn golden_sql_through_a_sidecar_on_every_route() {
    let platform = platform().await;
    let sidecar = run_through(downstream("app-sidecar", &platform, "").await).await;
    let routes = routes(&sidecar).await;
    for route in ["local", "forwarded", "mixed"] {
        assert!(routes.get(route).is_some_and(|n| *n >= 20), "few {route} queries: {routes:?}");
    }
}

#[tokio::test]
async fn golden_sql_through_an_edge_agent() {
    let platform = platform().await;
    let data = tempfile::tempdir().expect("data dir");
    let edge = format!("edge:\n  id: golden-edge\n  data_dir: {}\n", data.path().display());
    let edge = run_through(downstream("edge-agent", &platform, &edge).await).await;
    let routes = routes(&edge).await;
    for route in ["local", "forwarded", "mixed"] {
        assert!(routes.get(route).is_some_and(|n| *n >= 20), "few {route} queries: {routes:?}");
    }
}
