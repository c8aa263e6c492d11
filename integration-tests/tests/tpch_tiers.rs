//! Differential TPC-H through the tiers: all 22 queries (SF 0.01) through a sidecar that
//! replicates some tables and forwards the rest (so most queries run as mixed plans with
//! shipped sub-plans), through the platform directly, and in-process DataFusion: all equal.

use std::sync::Arc;
use std::time::Duration;

use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::workspace_root;

use crate::tpch::{accelerated_dataset, differs, rows, tables};

/// Tables the sidecar keeps locally; the others are forwarded.
const REPLICATED: [&str; 5] = ["nation", "region", "supplier", "customer", "orders"];

#[tokio::test]
async fn tpch_through_a_sidecar_matches_the_platform_and_datafusion() {
    let tables = tables();
    let dir = tempfile::tempdir().expect("dir");
    let local = SessionContext::new();
    let mut platform_yaml = String::from("region: eu\nlimits:\n  query_timeout: 120s\ndatasets:\n");
    for (name, batches) in &tables {
        platform_yaml.push_str(&accelerated_dataset(dir.path(), name, batches));
        let table = MemTable::try_new(batches[0].schema(), vec![batches.clone()]).expect("memtable");
        local.register_table(*name, Arc::new(table)).expect("register");
    }
    let platform = Tier::start("platform-service", &platform_yaml).await;
    platform.wait_ready(Duration::from_secs(60)).await;
    let sidecar = Tier::sidecar_of(&platform, &REPLICATED, "120s").await;

    let mut failures = Vec::new();
    let mut routes = std::collections::BTreeMap::new();
    for n in 1..=22 {
        let sql = std::fs::read_to_string(workspace_root().join(format!("integration-tests/tpch/q{n:02}.sql")))
            .expect("query");
        let expected = rows(&local.sql(&sql).await.expect("plan").collect().await.expect("run"));
        for (label, tier) in [("platform", &platform), ("sidecar", &sidecar)] {
            if let Some(difference) = differs(tier, n, &sql, &expected).await {
                failures.push(format!("via {label}: {difference}"));
            }
        }
        let (_, _, headers) = sidecar.sql_with(&sql, &[]).await;
        let route = headers.get("strata-route").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
        *routes.entry(route).or_insert(0) += 1;
    }
    assert!(
        failures.is_empty(),
        "TPC-H through the tiers differs:\n{}\nsidecar log:\n{}",
        failures.join("\n"),
        sidecar.logs()
    );
    // The point of the exercise: shipped sub-plans, not only whole forwards.
    assert!(routes.get("mixed").copied().unwrap_or(0) >= 10, "routes: {routes:?}");
    assert!(routes.get("local").copied().unwrap_or(0) >= 2, "routes: {routes:?}");
    assert!(routes.get("forwarded").copied().unwrap_or(0) >= 3, "routes: {routes:?}");
}
