//! `/metrics` of every tier, read by Prometheus's own Python text parser: it must parse, use
//! Prometheus naming, and carry the series a dashboard and an autoscaler are built on.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use strata_integration_tests::tier::Tier;
use strata_integration_tests::workspace_root;

/// Sample name -> type, as `prometheus_client.parser` reads the tier's exposition.
async fn parsed_metrics(tier: &Tier) -> BTreeMap<String, String> {
    let text = reqwest::get(tier.url("/metrics")).await.expect("GET /metrics").text().await.expect("text");
    let python = std::env::var("STRATA_PYTHON").unwrap_or_else(|_| {
        panic!("STRATA_PYTHON is not set: run the tests with scripts/test.sh, which installs the Python parser")
    });
    let mut child = Command::new(python)
        .arg(workspace_root().join("integration-tests/python/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the parser");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write metrics");
    let out = child.wait_with_output().expect("parser");
    assert!(out.status.success(), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("parser output")
}

fn assert_has(found: &BTreeMap<String, String>, tier: &str, expected: &[(&str, &str)]) {
    let missing: Vec<_> = expected
        .iter()
        .filter(|(name, kind)| found.get(*name).map(String::as_str) != Some(*kind))
        .map(|(name, kind)| format!("{name} ({kind})"))
        .collect();
    assert!(missing.is_empty(), "{tier} /metrics lacks {missing:?}; it has {found:?}");
    // Prometheus naming: counters end in `_total`, and no name carries a non-base unit.
    for (name, kind) in found {
        if kind == "counter" {
            assert!(name.ends_with("_total") || name.ends_with("_created"), "{tier}: counter {name} lacks _total");
        }
        for unit in ["_ms", "_milliseconds", "_micros", "_kb", "_mb", "_minutes"] {
            assert!(!name.contains(unit), "{tier}: {name} is not in base units");
        }
    }
}

/// What every tier exports.
const EVERY_TIER: &[(&str, &str)] = &[
    ("strata_queries_total", "counter"),
    ("strata_query_routes_total", "counter"),
    ("strata_query_duration_seconds_bucket", "histogram"),
    ("strata_query_duration_seconds_sum", "histogram"),
    ("strata_query_rows_total", "counter"),
    ("strata_query_bytes_total", "counter"),
    ("strata_results_cache_total", "counter"),
    ("strata_queries_in_flight", "gauge"),
    ("strata_queries_shed_total", "counter"),
    ("strata_trace_spans_dropped_total", "counter"),
    ("strata_trace_spans_exported_total", "counter"),
    ("strata_dataset_staleness_seconds", "gauge"),
    ("strata_ready", "gauge"),
];

#[tokio::test]
async fn every_tier_exports_metrics_a_prometheus_parser_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("sites.csv"), "id,name\n1,north\n2,south\n").expect("csv");
    let platform = Tier::start(
        "platform-service",
        &format!(
            "region: eu\ndatasets:\n  - name: sites\n    from: file:{}/sites.csv\n    acceleration: {{}}\n",
            dir.path().display()
        ),
    )
    .await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let upstream =
        format!("region: eu\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: sites\n", platform.flight_addr);
    let sidecar = Tier::start("app-sidecar", &upstream).await;
    let edge_dir = dir.path().join("edge");
    let edge =
        Tier::start("edge-agent", &format!("{upstream}edge:\n  id: edge-m\n  data_dir: {}\n", edge_dir.display()))
            .await;
    for tier in [&platform, &sidecar, &edge] {
        tier.wait_ready(Duration::from_secs(30)).await;
        assert_eq!(tier.rows("SELECT name FROM sites WHERE id = 2").await.len(), 1);
    }

    let found = parsed_metrics(&platform).await;
    assert_has(
        &found,
        "platform",
        &[EVERY_TIER, &[("strata_refresh_total", "counter"), ("strata_refresh_duration_seconds_total", "counter")]]
            .concat(),
    );
    let replicas: &[(&str, &str)] = &[
        ("strata_replication_versions_total", "counter"),
        ("strata_replication_bytes_total", "counter"),
        ("strata_replication_interruptions_total", "counter"),
        ("strata_replication_streaming", "gauge"),
        ("strata_replica_version_lag", "gauge"),
        ("strata_upstream_breaker_state", "gauge"),
        ("strata_upstream_retries_total", "counter"),
        ("strata_upstream_retries_refused_total", "counter"),
    ];
    let sidecar_metrics = sidecar
        .wait_for(Duration::from_secs(20), "the replica's version lag", || async {
            let found = parsed_metrics(&sidecar).await;
            found.contains_key("strata_replica_version_lag").then_some(found)
        })
        .await;
    assert_has(&sidecar_metrics, "sidecar", &[EVERY_TIER, replicas].concat());
    let edge_metrics = edge
        .wait_for(Duration::from_secs(20), "the replica's version lag", || async {
            let found = parsed_metrics(&edge).await;
            found.contains_key("strata_replica_version_lag").then_some(found)
        })
        .await;
    assert_has(
        &edge_metrics,
        "edge",
        &[
            EVERY_TIER,
            replicas,
            &[
                ("strata_edge_backlog_records", "gauge"),
                ("strata_edge_backlog_bytes", "gauge"),
                ("strata_edge_upload_lag_seconds", "gauge"),
            ],
        ]
        .concat(),
    );
}
