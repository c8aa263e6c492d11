#![allow(clippy::print_stdout)] // this command talks to a person

//! `strata demo`: the tiered deployment on one machine, as real processes. Two regional
//! platforms (eu with customers and orders, us with sensors) and an eu app-sidecar that
//! replicates orders and the eu customers, then a few queries through the sidecar showing
//! where each one ran and how long it took.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CUSTOMERS: &str = include_str!("../../../examples/data/customers.csv");
const ORDERS: &str = include_str!("../../../examples/data/orders.ndjson");

pub fn main() -> ExitCode {
    let runtime = match strata_serving::process::runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A tier process started by the demo; killed when dropped.
struct Process {
    name: &'static str,
    child: Child,
    flight: String,
    http: String,
}

async fn spawn(name: &'static str, subcommand: &str, config: &Path, log: &Path) -> Result<Process> {
    let exe = std::env::current_exe().context("cannot find the strata executable")?;
    let log_file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut child = Command::new(exe)
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .args(["--flight-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start the {name}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .with_context(|| format!("the {name} did not start within 30 s (log: {})", log.display()))??
        .with_context(|| format!("the {name} exited at start (log: {})", log.display()))?;
    let field = |key: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string).context("unexpected start line")
    };
    let (flight, http) = (field("flight=")?, field("http=")?);
    Ok(Process { name, child, flight, http })
}

async fn wait_ready(client: &reqwest::Client, process: &Process) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("http://{}/v1/ready", process.http)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the {} did not become ready within 60 s", process.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    std::fs::write(dir.join(name), text).with_context(|| format!("cannot write {name}"))
}

/// Hourly readings of 20 sensors over two days, homed in region us.
fn sensors() -> String {
    let mut out = String::new();
    for hour in 0..48u32 {
        for sensor in 1..=20u32 {
            let celsius = 15.0 + f64::from((sensor * 7 + hour * 3) % 150) / 10.0;
            out.push_str(&format!(
                "{{\"sensor_id\": {sensor}, \"site\": \"site-{}\", \"celsius\": {celsius:.1}, \"read_at\": \"2025-03-{:02}T{:02}:00:00\"}}\n",
                sensor % 4,
                1 + hour / 24,
                hour % 24
            ));
        }
    }
    out
}

async fn run() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("strata-demo-").tempdir().context("cannot create a temp dir")?;
    let d = dir.path();
    write(d, "customers.csv", CUSTOMERS)?;
    write(d, "orders.ndjson", ORDERS)?;
    write(d, "sensors.ndjson", &sensors())?;
    write(
        d,
        "us.yaml",
        "region: us\ndatasets:\n  - name: sensors\n    from: file:sensors.ndjson\n    acceleration: {refresh_interval: 1m}\n",
    )?;

    println!("Strata tiered demo (files in {})\n", d.display());
    let client = reqwest::Client::new();
    let us = spawn("us platform", "platform", &d.join("us.yaml"), &d.join("us.log")).await?;
    write(
        d,
        "eu.yaml",
        &format!(
            "region: eu\npeers:\n  - region: us\n    endpoint: http://{}\ndatasets:\n  - name: customers\n    from: file:customers.csv\n    acceleration: {{refresh_interval: 1m}}\n  - name: orders\n    from: file:orders.ndjson\n    acceleration: {{refresh_interval: 1m}}\n",
            us.flight
        ),
    )?;
    let eu = spawn("eu platform", "platform", &d.join("eu.yaml"), &d.join("eu.log")).await?;
    write(
        d,
        "sidecar.yaml",
        &format!(
            "region: eu\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: orders\n  - name: customers\n    where: \"region = 'eu'\"\n",
            eu.flight
        ),
    )?;
    let sidecar = spawn("eu app-sidecar", "sidecar", &d.join("sidecar.yaml"), &d.join("sidecar.log")).await?;
    for p in [&us, &eu, &sidecar] {
        wait_ready(&client, p).await?;
    }
    // Replicas load right after readiness; give them a moment so the local hits are local.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replicas_loaded(&client, &sidecar).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let queries = [
        (
            "local hit: orders is replicated in full",
            "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status",
        ),
        (
            "local hit: inside the replicated subset",
            "SELECT count(*) AS eu_customers FROM customers WHERE region = 'eu'",
        ),
        (
            "cache miss: rows outside the subset",
            "SELECT region, count(*) AS n FROM customers GROUP BY region ORDER BY region",
        ),
        (
            "cross-region: sensors lives in us",
            "SELECT site, round(avg(celsius), 2) AS avg_c FROM sensors GROUP BY site ORDER BY site",
        ),
        (
            "mixed: local orders joined with all customers",
            "SELECT c.region, round(sum(o.amount), 2) AS revenue FROM orders o JOIN customers c ON o.customer_id = c.customer_id GROUP BY c.region ORDER BY c.region",
        ),
    ];
    for (title, sql) in queries {
        // The first run warms connections; the second is the one reported.
        let _ = query(&client, &sidecar, sql).await;
        let started = Instant::now();
        let (headers, body) = query(&client, &sidecar, sql).await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        println!("== {title}\n   {sql}");
        println!(
            "   route: {} ({}) in {ms:.1} ms; versions read: {}",
            header("strata-route"),
            header("strata-route-reason"),
            header("strata-versions")
        );
        for line in body.lines().take(6) {
            println!("   {line}");
        }
        println!();
    }

    println!("Endpoints (Ctrl-C stops everything):");
    for p in [&sidecar, &eu, &us] {
        println!("  {:<15} Flight SQL grpc://{}   HTTP http://{}", p.name, p.flight, p.http);
    }
    println!(
        "\nTry: curl -si -d \"SELECT * FROM orders LIMIT 3\" http://{}/v1/sql | grep -i strata-route\n     cargo run -p strata-cli -- sql --endpoint http://{} --http http://{}",
        sidecar.http, sidecar.flight, sidecar.http
    );
    tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
    println!("stopping");
    for mut p in [sidecar, eu, us] {
        let _ = p.child.kill().await;
    }
    Ok(())
}

async fn replicas_loaded(client: &reqwest::Client, sidecar: &Process) -> bool {
    let Ok(r) = client.get(format!("http://{}/v1/datasets", sidecar.http)).send().await else { return false };
    let Ok(v) = r.json::<serde_json::Value>().await else { return false };
    let datasets = v.get("datasets").and_then(|d| d.as_array()).cloned().unwrap_or_default();
    datasets.len() >= 2 && datasets.iter().all(|d| d.get("state").and_then(|s| s.as_str()) == Some("ready"))
}

async fn query(client: &reqwest::Client, tier: &Process, sql: &str) -> Result<(reqwest::header::HeaderMap, String)> {
    let response = client
        .post(format!("http://{}/v1/sql", tier.http))
        .header("accept", "text/csv")
        .body(sql.to_string())
        .send()
        .await
        .context("query failed")?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.context("cannot read the answer")?;
    if !status.is_success() {
        bail!("query failed ({status}): {body}");
    }
    Ok((headers, body))
}
