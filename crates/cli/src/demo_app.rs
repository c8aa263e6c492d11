//! `strata demo-app`: the application of the compose demo. It sits next to its sidecar (one
//! network namespace, as in a Kubernetes pod) and asks it a few queries in a loop over
//! localhost, logging one line per answer: where it ran (route and reason), the dataset
//! versions it read, the results-cache outcome, its latency and its row count. Failures are
//! logged and the loop goes on, which is how an application would see a tier outage.

#![allow(clippy::print_stdout)] // its log lines are its output

use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Flags of `strata demo-app`.
#[derive(clap::Args, Debug)]
pub struct DemoAppArgs {
    /// HTTP address of the tier to ask (the sidecar on localhost).
    #[arg(long, env = "STRATA_APP_TARGET", default_value = "127.0.0.1:8080")]
    pub http: String,
    /// Pause between rounds.
    #[arg(long, env = "STRATA_APP_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// A query to ask each round (repeat the flag for several); default: the demo's queries.
    #[arg(long = "sql")]
    pub queries: Vec<String>,
    /// Stop after this many rounds (default: run until stopped).
    #[arg(long)]
    pub rounds: Option<u64>,
}

/// The compose demo's questions: a local hit, a forward, a cross-region query and a mix.
const DEFAULT_QUERIES: &[&str] = &[
    "SELECT status, count(*) AS orders FROM orders GROUP BY status ORDER BY status",
    "SELECT count(*) AS eu_customers FROM customers WHERE region = 'eu'",
    "SELECT count(*) AS readings FROM readings",
    "SELECT carrier, count(*) AS shipments FROM shipments GROUP BY carrier ORDER BY carrier",
    "SELECT p.category, round(sum(o.amount), 2) AS revenue FROM orders o JOIN products p ON o.product_id = p.product_id GROUP BY p.category ORDER BY p.category",
];

pub fn main(args: DemoAppArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: DemoAppArgs) -> ExitCode {
    let queries: Vec<String> =
        if args.queries.is_empty() { DEFAULT_QUERIES.iter().map(|q| q.to_string()).collect() } else { args.queries };
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(30)).build() {
        Ok(client) => client,
        Err(err) => {
            eprintln!("error: cannot build an HTTP client: {err}");
            return ExitCode::FAILURE;
        }
    };
    let url = format!("http://{}/v1/sql", args.http);
    let mut round = 0u64;
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        round += 1;
        for sql in &queries {
            println!("{}", ask(&client, &url, sql).await);
        }
        if args.rounds.is_some_and(|n| round >= n) {
            return ExitCode::SUCCESS;
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = &mut stop => return ExitCode::SUCCESS,
        }
    }
}

/// One query, as one log line.
async fn ask(client: &reqwest::Client, url: &str, sql: &str) -> String {
    let started = Instant::now();
    let response = client.post(url).header("accept", "text/csv").body(sql.to_string()).send().await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let response = match response {
        Ok(response) => response,
        Err(err) => return format!("error ms={ms:.1} sql={sql:?} error={err:?}"),
    };
    let header = |name: &str| {
        response.headers().get(name).and_then(|v| v.to_str().ok()).map_or_else(|| "-".to_string(), str::to_string)
    };
    let (route, reason, versions, cache) =
        (header("strata-route"), header("strata-route-reason"), header("strata-versions"), header("strata-cache"));
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if status.is_success() {
        let rows = body.lines().count().saturating_sub(1);
        format!("ok route={route} reason={reason} versions={versions} cache={cache} ms={ms:.1} rows={rows} sql={sql:?}")
    } else {
        format!("error status={} ms={ms:.1} sql={sql:?} error={:?}", status.as_u16(), body.trim())
    }
}
