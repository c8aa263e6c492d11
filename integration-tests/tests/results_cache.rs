//! The results cache: a repeated query over an accelerated copy is a HIT with the same rows;
//! after a refresh the next answer is fresh (never a stale hit); identical concurrent misses
//! run once; an answer larger than an entry streams uncached; answers read live from a
//! source are never cached.

use std::time::Duration;

use serde_json::Value;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;

const DASHBOARD: &str = "SELECT grp, count(*) AS n, sum(amount) AS total FROM sales GROUP BY grp ORDER BY grp";

async fn query(tier: &Tier, sql: &str) -> (Vec<Value>, String) {
    let (status, body, headers) = tier.sql_with(sql, &[]).await;
    assert_eq!(status, 200, "{body}");
    let cache = headers.get("strata-cache").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    (body.as_array().cloned().expect("rows"), cache)
}

fn counter(metrics: &str, result: &str) -> u64 {
    let prefix = format!("strata_results_cache_total{{result=\"{result}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn results_cache_hits_until_the_data_changes_and_coalesces_concurrent_misses() {
    let pg = PgServer::start();
    pg.connect()
        .await
        .batch_execute(
            "CREATE TABLE sales (id bigint PRIMARY KEY, grp int NOT NULL, amount double precision NOT NULL);
             INSERT INTO sales SELECT i, i % 10, i * 0.25 FROM generate_series(1, 200000) i;",
        )
        .await
        .expect("seed");
    let config = format!(
        "results_cache:\n  max_entry_bytes: 64KiB\ndatasets:\n  - name: sales\n    from: postgres:public.sales\n    params: {p}\n    acceleration: {{refresh: full}}\n  - name: live_sales\n    from: postgres:public.sales\n    params: {p}\n",
        p = pg.params_yaml()
    );
    let tier = Tier::start("platform-service", &config).await;
    tier.wait_ready(Duration::from_secs(30)).await;

    let (first, status) = query(&tier, DASHBOARD).await;
    assert_eq!(status, "MISS");
    let (again, status) = query(&tier, DASHBOARD).await;
    assert_eq!(status, "HIT");
    assert_eq!(first, again);
    // The key is the optimized plan, not the text: the same question spelled differently hits.
    let (respelled, status) = query(&tier, &DASHBOARD.to_lowercase().replace("group by grp", "GROUP  BY  grp")).await;
    assert_eq!((respelled, status.as_str()), (first.clone(), "HIT"));

    // A change of the data invalidates exactly: the next answer sees it.
    pg.connect().await.batch_execute("INSERT INTO sales VALUES (200001, 3, 1000.0)").await.expect("insert");
    let (code, _) = tier.post("/v1/datasets/sales/refresh").await;
    assert_eq!(code, 200);
    let (fresh, status) = query(&tier, DASHBOARD).await;
    assert_eq!(status, "MISS", "a refresh must never leave a stale hit");
    assert_eq!(fresh[3]["n"].as_i64(), first[3]["n"].as_i64().map(|n| n + 1));

    // Identical concurrent misses run once: after another refresh, 8 clients at once give one MISS.
    pg.connect().await.batch_execute("INSERT INTO sales VALUES (200002, 4, 1.0)").await.expect("insert");
    tier.post("/v1/datasets/sales/refresh").await;
    let before = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    let answers = futures::future::join_all((0..8).map(|_| query(&tier, DASHBOARD))).await;
    let after = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert_eq!(counter(&after, "MISS") - counter(&before, "MISS"), 1, "concurrent misses were not coalesced");
    assert_eq!(counter(&after, "HIT") - counter(&before, "HIT"), 7);
    assert!(
        answers
            .iter()
            .all(|(rows, _)| rows == &answers[0].0 && rows[4]["n"] == fresh[4]["n"].as_i64().map_or(0, |n| n + 1))
    );
    assert!(after.contains("strata_results_cache_bytes"), "{after}");

    // Larger than an entry (64 KiB here): streamed, complete, not cached.
    for _ in 0..2 {
        let (rows, status) = query(&tier, "SELECT id, amount FROM sales WHERE id <= 20000").await;
        assert_eq!((rows.len(), status.as_str()), (20_000, "BYPASS"));
    }
    // Read live from the source: never cached, it has no version to key by.
    let (_, status) = query(&tier, "SELECT count(*) AS n FROM live_sales").await;
    assert_eq!(status, "none");
}

#[tokio::test]
async fn results_cache_can_be_turned_off() {
    let dir = tempfile::tempdir().expect("dir");
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "a,b\n1,2\n3,4\n").expect("csv");
    let tier = Tier::start(
        "platform-service",
        &format!(
            "results_cache:\n  max_bytes: 0\ndatasets:\n  - name: t\n    from: file:{}\n    acceleration: {{}}\n",
            csv.display()
        ),
    )
    .await;
    tier.wait_ready(Duration::from_secs(30)).await;
    for _ in 0..2 {
        let (rows, status) = query(&tier, "SELECT sum(a) AS s FROM t").await;
        assert_eq!((rows[0]["s"].as_i64(), status.as_str()), (Some(4), "none"));
    }
}

#[tokio::test]
async fn cache_control_no_cache_gets_a_fresh_answer_and_leaves_the_entry() {
    let dir = tempfile::tempdir().expect("dir");
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "a,b\n1,2\n3,4\n").expect("csv");
    let tier = Tier::start(
        "platform-service",
        &format!("datasets:\n  - name: t\n    from: file:{}\n    acceleration: {{}}\n", csv.display()),
    )
    .await;
    tier.wait_ready(Duration::from_secs(30)).await;
    let sql = "SELECT sum(a) AS s FROM t";
    assert_eq!(query(&tier, sql).await.1, "MISS");
    assert_eq!(query(&tier, sql).await.1, "HIT");
    for directive in ["no-cache", "max-age=0, No-Store"] {
        let (status, body, headers) = tier.sql_with(sql, &[("cache-control", directive)]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body[0]["s"].as_i64(), Some(4));
        assert_eq!(headers.get("strata-cache").and_then(|v| v.to_str().ok()), Some("BYPASS"), "{directive}");
    }
    // The entry is still there for everyone else.
    assert_eq!(query(&tier, sql).await.1, "HIT");
}
