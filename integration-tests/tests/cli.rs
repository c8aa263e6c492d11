//! The `strata` subcommands the container images rely on: `edge` runs the edge-agent,
//! `health` is the images' health check (exit 0/1, no curl in the image), and `check`
//! validates a config as the tier would (exit 64), which the deployment validation uses.

use std::process::{Command, Output};
use std::time::Duration;

use strata_integration_tests::tier::Tier;
use strata_integration_tests::{bin_dir, free_port, workspace_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn strata(args: &[&str]) -> Output {
    Command::new(bin_dir().join("strata")).args(args).output().expect("run strata")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test]
async fn strata_edge_runs_an_edge_agent_that_serves_its_replica_from_disk() {
    let customers = workspace_root().join("examples/data/customers.csv");
    let platform = Tier::start(
        "platform-service",
        &format!(
            "region: eu\ndatasets:\n  - name: customers\n    from: file:{}\n    acceleration: {{}}\n",
            customers.display()
        ),
    )
    .await;
    let data = tempfile::tempdir().expect("data dir");
    let edge = Tier::cli("edge")
        .config(&format!(
            "region: eu\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: customers\nedge:\n  id: cli-edge\n  data_dir: {}\n",
            platform.flight_addr,
            data.path().display()
        ))
        .start()
        .await;
    edge.wait_for(Duration::from_secs(30), "the edge's replica to load", || async {
        edge.find_dataset("customers").await.filter(|d| d["state"] == "ready")
    })
    .await;
    let (rows, route, _) = edge.routed("SELECT count(*) AS n FROM customers", &[]).await;
    assert_eq!(route, "local");
    assert_eq!(rows, platform.rows("SELECT count(*) AS n FROM customers").await);
    // An edge agent's replica is on disk, where only an edge puts it.
    assert!(data.path().join("replicas/customers/manifest.json").exists(), "no disk replica under the data dir");
}

#[tokio::test]
async fn strata_health_exits_0_only_when_the_tier_answers_200() {
    let tier = Tier::start("platform-service", "region: eu\n").await;
    tier.wait_ready(Duration::from_secs(20)).await;
    let addr = tier.http_addr.to_string();
    let live = strata(&["health", "--http", &addr]);
    assert!(live.status.success(), "{}", text(&live));
    let ready = strata(&["health", "--ready", "--http", &addr]);
    assert!(ready.status.success(), "{}", text(&ready));

    // Nothing listening.
    let closed = format!("127.0.0.1:{}", free_port());
    let refused = strata(&["health", "--http", &closed]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("unhealthy"), "{}", text(&refused));

    // A listener that answers 503 (a tier that is draining or not ready), and one that never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let unready = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready").await;
        }
    });
    let silent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent = silent_listener.local_addr().expect("addr").to_string();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent_listener.accept().await {
            sockets.push(socket);
        }
    });
    let (unready_out, silent_out) = tokio::task::spawn_blocking(move || {
        (
            strata(&["health", "--ready", "--http", &unready]),
            strata(&["health", "--http", &silent, "--timeout", "300ms"]),
        )
    })
    .await
    .expect("join");
    assert_eq!(unready_out.status.code(), Some(1), "{}", text(&unready_out));
    assert!(text(&unready_out).contains("503"), "{}", text(&unready_out));
    assert_eq!(silent_out.status.code(), Some(1), "{}", text(&silent_out));
    held.abort();
}

#[test]
fn strata_check_loads_a_config_as_the_tier_would() {
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path.display().to_string()
    };
    let edge = write(
        "edge.yaml",
        "region: eu\nupstream:\n  endpoints: [http://platform:50051]\nedge:\n  id: e1\n  data_dir: /var/lib/strata\n",
    );
    let ok = strata(&["check", "edge", "--config", &edge]);
    assert!(ok.status.success(), "{}", text(&ok));

    let misspelt = write("platform.yaml", "region: eu\nserver:\n  http_adr: 0.0.0.0:8080\n");
    let bad = strata(&["check", "platform", "--config", &misspelt]);
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad));
    assert!(text(&bad).contains("unknown field `http_adr`") && text(&bad).contains("line 3"), "{}", text(&bad));

    // A sidecar needs a platform to forward to; the same file is fine for a platform.
    let lonely = write("lonely.yaml", "region: eu\n");
    let sidecar = strata(&["check", "sidecar", "--config", &lonely]);
    assert_eq!(sidecar.status.code(), Some(64), "{}", text(&sidecar));
    assert!(text(&sidecar).contains("upstream"), "{}", text(&sidecar));
    assert!(strata(&["check", "platform", "--config", &lonely]).status.success());

    // An unset ${VAR} is named, as in a container whose Secret is missing.
    let secret = write(
        "secret.yaml",
        "datasets:\n  - name: t\n    from: postgres:public.t\n    params:\n      password: ${STRATA_TEST_UNSET_SECRET}\n",
    );
    let unset = strata(&["check", "platform", "--config", &secret]);
    assert_eq!(unset.status.code(), Some(64), "{}", text(&unset));
    assert!(text(&unset).contains("STRATA_TEST_UNSET_SECRET"), "{}", text(&unset));
}

/// Every `yaml` example in docs/configuration.md loads with the real config loader, as the
/// tier it configures (an `edge:` section makes it an edge agent's, an `upstream:` a
/// sidecar's), so the reference cannot drift from the code.
#[test]
fn the_configuration_reference_examples_load() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/configuration.md")).expect("docs/configuration.md");
    let dir = tempfile::tempdir().expect("dir");
    let mut examples = 0;
    for (i, block) in doc.split("```yaml\n").skip(1).enumerate() {
        let yaml = block.split("```").next().expect("a closed code block");
        let tier = if yaml.contains("\nedge:") {
            "edge"
        } else if yaml.contains("\nupstream:") {
            "sidecar"
        } else {
            "platform"
        };
        let path = dir.path().join(format!("example-{i}.yaml"));
        std::fs::write(&path, yaml).expect("write example");
        let out = Command::new(bin_dir().join("strata"))
            .args(["check", tier, "--config"])
            .arg(&path)
            .env("PG_PASSWORD", "example")
            .env("STRATA_UPSTREAM_KEY", "strata_example")
            .env("STRATA_US_KEY", "strata_example")
            .env("STRATA_CLUSTER_KEY", "strata_example")
            .env("POD_IP", "10.0.0.3")
            .output()
            .expect("run strata check");
        assert!(out.status.success(), "example {i} of docs/configuration.md ({tier}):\n{yaml}\n{}", text(&out));
        examples += 1;
    }
    assert!(examples >= 4, "found only {examples} yaml examples in docs/configuration.md");
}

/// A platform serving a two-row `sites` table from a CSV file under `dir`.
async fn sites_platform(dir: &std::path::Path) -> Tier {
    std::fs::write(dir.join("sites.csv"), "id,name\n1,north\n2,south\n").expect("csv");
    let tier = Tier::start(
        "platform-service",
        &format!("datasets:\n  - name: sites\n    from: file:{}/sites.csv\n    acceleration: {{}}\n", dir.display()),
    )
    .await;
    tier.wait_ready(Duration::from_secs(30)).await;
    tier
}

#[tokio::test]
async fn strata_sql_in_a_terminal_answers_lists_datasets_and_marks_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier = sites_platform(dir.path()).await;
    let python = std::env::var("STRATA_PYTHON").unwrap_or_else(|_| {
        panic!("STRATA_PYTHON is not set: run the tests with scripts/test.sh, which installs pexpect")
    });
    let output = Command::new(python)
        .arg(workspace_root().join("integration-tests/python/sql_repl.py"))
        .arg(bin_dir().join("strata"))
        .arg(tier.flight_addr.to_string())
        .arg(tier.http_addr.to_string())
        .output()
        .expect("run the terminal session");
    eprintln!("{}", text(&output));
    assert!(output.status.success(), "{}\n{}", text(&output), String::from_utf8_lossy(&output.stderr));
}

#[tokio::test]
async fn strata_sql_one_shot_prints_csv_and_json_and_fails_with_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier = sites_platform(dir.path()).await;
    let endpoint = format!("http://{}", tier.flight_addr);
    let csv =
        strata(&["sql", "--endpoint", &endpoint, "--format", "csv", "-c", "SELECT id, name FROM sites ORDER BY id"]);
    assert!(csv.status.success(), "{}", text(&csv));
    assert_eq!(String::from_utf8_lossy(&csv.stdout), "id,name\n1,north\n2,south\n");
    let script = dir.path().join("q.sql");
    std::fs::write(&script, "-- two statements; one file\nSELECT count(*) AS n FROM sites;\nSELECT 'a;b' AS s;\n")
        .expect("sql");
    let json = strata(&["sql", "--endpoint", &endpoint, "--format", "json", "-f", script.to_str().expect("path")]);
    assert!(json.status.success(), "{}", text(&json));
    assert_eq!(String::from_utf8_lossy(&json.stdout), "{\"n\":2}\n{\"s\":\"a;b\"}\n");
    let failed = strata(&["sql", "--endpoint", &endpoint, "-c", "SELECT * FROM nowhere"]);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.starts_with("error: ") && stderr.contains("nowhere"), "{stderr}");
    assert!(!stderr.contains("Status {") && !stderr.contains("panicked"), "{stderr}");
    let unreachable = strata(&["sql", "--endpoint", &format!("http://127.0.0.1:{}", free_port()), "-c", "SELECT 1"]);
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot connect"), "{}", text(&unreachable));
}
