//! What an operator sees of long work and of a tier with its upstream: a slow first load
//! reports its progress in `/v1/datasets`, in the log and in `strata status`; `strata status`
//! shows a sidecar's replicas next to what its platform advertises.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::{bin_dir, wait_until};

fn status(tier: &Tier) -> String {
    let out = Command::new(bin_dir().join("strata"))
        .args(["status", "--http", &format!("http://{}", tier.http_addr)])
        .output()
        .expect("run strata status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_slow_first_load_reports_its_progress() {
    let pg = PgServer::start();
    // 12,000 rows that PostgreSQL produces at about 1,000 a second (pg_sleep's own overhead
    // dominates): the provider hands them over 4,000 at a time, so the load is seen part-way
    // for several seconds, longer than the 5 s between progress log lines.
    pg.connect()
        .await
        .batch_execute(
            "CREATE VIEW slow_rows AS
               SELECT g::bigint AS id, pg_sleep(0.0002)::text AS pad FROM generate_series(1, 12000) g",
        )
        .await
        .expect("view");
    let tier = Tier::start(
        "platform-service",
        &format!(
            "datasets:\n  - name: slow_rows\n    from: postgres:public.slow_rows\n    params: {}\n    acceleration: {{}}\n",
            pg.params_yaml()
        ),
    )
    .await;
    let progress: Value = wait_until(Duration::from_secs(30), "progress part-way through the load", || async {
        let dataset = tier.find_dataset("slow_rows").await?;
        let progress = dataset["progress"].clone();
        (dataset["state"] == "loading" && progress["rows_read"].as_u64().is_some_and(|n| n > 0)).then_some(progress)
    })
    .await;
    assert_eq!(progress["phase"], "load", "{progress}");
    assert!(progress["bytes_read"].as_u64().is_some_and(|b| b > 0), "{progress}");
    assert!(progress["rows_per_second"].as_f64().is_some_and(|r| r > 0.0), "{progress}");
    assert!(progress["rows_read"].as_u64() < Some(12_000), "{progress}");
    // PostgreSQL does not say how many rows a query will return: no made-up estimate.
    assert!(progress.get("expected_rows").is_none() && progress.get("eta_seconds").is_none(), "{progress}");
    let shown = status(&tier);
    assert!(shown.contains("slow_rows: load: ") && shown.contains(" rows/s"), "{shown}");

    tier.wait_ready(Duration::from_secs(60)).await;
    let done = tier.dataset("slow_rows").await;
    assert_eq!(done["rows"], 12_000);
    assert!(done.get("progress").is_none(), "no progress once loaded: {done}");
    // The load took several seconds: the log says how far it got at a steady interval.
    assert!(tier.logs().contains("reading the source"), "{}", tier.logs());
}

#[tokio::test]
async fn strata_status_shows_a_sidecar_with_its_platform() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("sites.csv"), "id,name\n1,north\n2,south\n").expect("csv");
    std::fs::write(dir.path().join("zones.csv"), "id\n1\n").expect("csv");
    let platform = Tier::start(
        "platform-service",
        &format!(
            "region: eu\ndatasets:\n  - name: sites\n    from: file:{0}/sites.csv\n    acceleration: {{}}\n  - name: zones\n    from: file:{0}/zones.csv\n",
            dir.path().display()
        ),
    )
    .await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let sidecar = Tier::start(
        "app-sidecar",
        &format!("region: eu\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: sites\n", platform.flight_addr),
    )
    .await;
    sidecar.wait_ready(Duration::from_secs(30)).await;
    let shown = sidecar
        .wait_for(Duration::from_secs(20), "the platform's catalog in the status", || async {
            let shown = status(&sidecar);
            shown.contains("zones").then_some(shown)
        })
        .await;
    let line = |name: &str| shown.lines().find(|l| l.starts_with(&format!(" {name} "))).unwrap_or_default().to_string();
    let sites = line("sites");
    assert!(sites.contains("| replica ") && sites.contains("| yes ") && sites.ends_with("| 0 versions"), "{shown}");
    let zones = line("zones");
    assert!(zones.contains("| upstream ") && zones.contains("region eu") && zones.contains("| no "), "{shown}");
    assert!(shown.contains(&format!("upstream http://{}: breaker closed", platform.flight_addr)), "{shown}");

    // `--watch` off a terminal (a pipe, a log): the plain table again every interval.
    let mut watch = std::process::Command::new(bin_dir().join("strata"))
        .args(["status", "--watch", "--interval", "200ms", "--http", &format!("http://{}", sidecar.http_addr)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run strata status --watch");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("watch output");
    let redrawn = String::from_utf8_lossy(&out.stdout).matches(" dataset | served").count();
    assert!(redrawn >= 3, "the table was drawn {redrawn} times in 1.5 s at a 200 ms interval");
}
