//! `strata status`: the datasets of one tier and of its upstream in one table (where each
//! is served, its source, rows, version, age, last refresh, last error, how far a replica
//! is behind), from the tier's `/v1/datasets`; with `--watch`, redrawn every interval, with
//! a progress bar for each load, refresh or snapshot under way.

#![allow(clippy::print_stdout)] // the table is this command's output

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::text_table::{age_cell, cell, table};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The tier's HTTP endpoint.
    #[arg(long, env = "STRATA_HTTP", default_value = "http://127.0.0.1:8080")]
    http: String,
    /// Redraw every `--interval` until interrupted, with progress bars.
    #[arg(long)]
    watch: bool,
    /// How often `--watch` redraws.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// API key, sent as `authorization: Bearer ...` (tiers with `auth:`).
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA certificate (PEM) an `https://` tier's certificate must chain to.
    #[arg(long, env = "STRATA_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
}

pub fn main(args: StatusArgs) -> ExitCode {
    crate::command::run(async move {
        run(args).await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn run(args: StatusArgs) -> Result<()> {
    let url = format!("{}/v1/datasets", args.http.trim_end_matches('/'));
    let client = crate::command::http_client(Duration::from_secs(10), args.token.as_deref(), args.ca_file.as_deref())?;
    if !args.watch {
        print!("{}", render(&fetch(&client, &url).await?));
        return Ok(());
    }
    let mut screen = Watch::new();
    loop {
        match fetch(&client, &url).await {
            Ok(body) => screen.draw(&body),
            Err(err) => screen.note(&format!("error: {err:#}")),
        }
        tokio::time::sleep(args.interval).await;
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Value> {
    let response = client.get(url).send().await.with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(anyhow!("{url} answered {status}"));
    }
    response.json().await.with_context(|| format!("{url} answered something that is not JSON"))
}

/// The table and, below it, one line per piece of work under way.
pub fn render(body: &Value) -> String {
    let mut out = datasets_table(body);
    if let Some(endpoints) = body["upstream_endpoints"].as_array() {
        for e in endpoints {
            out.push_str(&format!("upstream {}: breaker {}\n", cell(&e["endpoint"]), cell(&e["breaker"])));
        }
    }
    if let Some(backlog) = body.get("backlog") {
        out.push_str(&format!(
            "edge backlog: {} records, {} bytes not yet confirmed upstream\n",
            cell(&backlog["records"]),
            cell(&backlog["bytes"])
        ));
    }
    for (name, progress) in in_progress(body) {
        out.push_str(&format!("{name}: {}\n", progress_line(progress)));
    }
    out
}

fn datasets_table(body: &Value) -> String {
    let empty = Vec::new();
    let local = body["datasets"].as_array().unwrap_or(&empty);
    let upstream = body["upstream"].as_array().unwrap_or(&empty);
    let upstream_versions: HashMap<&str, u64> =
        upstream.iter().filter_map(|u| Some((u["name"].as_str()?, u["version"].as_u64()?))).collect();
    let mut rows: Vec<[String; 10]> = local
        .iter()
        .map(|d| {
            let name = cell(&d["name"]);
            let replica = d.get("replication").is_some_and(|r| !r.is_null());
            let lag = match (replica, upstream_versions.get(name.as_str()), d["version"].as_u64()) {
                (true, Some(up), held) => format!("{} versions", up.saturating_sub(held.unwrap_or(0))),
                _ => "-".into(),
            };
            [
                name,
                if replica { "replica" } else { "here" }.into(),
                cell(&d["source"]),
                yes_no(&d["accelerated"]),
                cell(&d["rows"]),
                cell(&d["version"]),
                age_cell(&d["staleness_seconds"]),
                cell(&d["last_refresh"]),
                d["last_error"].as_str().map_or("-".into(), |e| e.chars().take(50).collect()),
                lag,
            ]
        })
        .collect();
    for u in upstream {
        let name = cell(&u["name"]);
        if rows.iter().any(|r| r[0].eq_ignore_ascii_case(&name)) {
            continue;
        }
        rows.push([
            name,
            "upstream".into(),
            format!("region {}", cell(&u["home_region"])),
            yes_no(&u["accelerated"]),
            cell(&u["rows"]),
            cell(&u["version"]),
            age_cell(&u["age_seconds"]),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    if rows.is_empty() {
        return "no datasets\n".into();
    }
    table(
        &["dataset", "served", "source", "accelerated", "rows", "version", "age", "last refresh", "last error", "lag"],
        &rows,
    )
}

fn in_progress(body: &Value) -> Vec<(String, &Value)> {
    body["datasets"]
        .as_array()
        .map(|d| d.iter().filter(|d| d["progress"].is_object()).map(|d| (cell(&d["name"]), &d["progress"])).collect())
        .unwrap_or_default()
}

/// `load: 12000/50000 rows (24%), 3000 rows/s, 1.2 MB, eta 13s`
fn progress_line(p: &Value) -> String {
    let rows = p["rows_read"].as_u64().unwrap_or(0);
    let mut line = format!("{}: {rows}", cell(&p["phase"]));
    if let Some(total) = p["expected_rows"].as_u64() {
        line.push_str(&format!("/{total} rows ({:.0}%)", 100.0 * rows as f64 / total.max(1) as f64));
    } else {
        line.push_str(" rows");
    }
    line.push_str(&format!(
        ", {:.0} rows/s, {} bytes",
        p["rows_per_second"].as_f64().unwrap_or(0.0),
        p["bytes_read"].as_u64().unwrap_or(0)
    ));
    if let Some(eta) = p["eta_seconds"].as_f64() {
        line.push_str(&format!(", eta {}", humantime::format_duration(Duration::from_secs(eta.ceil() as u64))));
    }
    line
}

fn yes_no(v: &Value) -> String {
    if v.as_bool().unwrap_or(false) { "yes" } else { "no" }.into()
}

/// `--watch`: on a terminal, the table as the top line of indicatif's multi-progress and a
/// bar per piece of work under way; elsewhere (a pipe, a log), the plain rendering each time.
struct Watch {
    multi: Option<MultiProgress>,
    header: ProgressBar,
    bars: HashMap<String, ProgressBar>,
}

impl Watch {
    fn new() -> Self {
        let terminal = std::io::stdout().is_terminal();
        let multi = terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        let header = ProgressBar::hidden();
        header.set_style(ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
        let header = match &multi {
            Some(multi) => multi.add(header),
            None => header,
        };
        Self { multi, header, bars: HashMap::new() }
    }

    fn note(&self, message: &str) {
        match &self.multi {
            Some(_) => self.header.set_message(message.to_string()),
            None => println!("{message}"),
        }
    }

    fn draw(&mut self, body: &Value) {
        let Some(multi) = &self.multi else {
            println!("{}", render(body));
            return;
        };
        self.header.set_message(datasets_table(body).trim_end().to_string());
        let running = in_progress(body);
        self.bars.retain(|name, bar| {
            let keep = running.iter().any(|(n, _)| n == name);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for (name, progress) in running {
            let bar = self.bars.entry(name.clone()).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_prefix(name.clone());
                bar
            });
            let rows = progress["rows_read"].as_u64().unwrap_or(0);
            let template = match progress["expected_rows"].as_u64() {
                Some(total) => {
                    bar.set_length(total);
                    "{prefix:>12} {msg:9} [{bar:40}] {pos}/{len} rows {per_sec} eta {eta}"
                }
                None => "{prefix:>12} {msg:9} {spinner} {pos} rows {per_sec}",
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(cell(&progress["phase"]));
            bar.set_position(rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_for_the_tier_and_its_upstream() {
        let body = serde_json::json!({
            "datasets": [
                {"name": "orders", "source": "postgres:public.orders", "accelerated": true, "rows": 2000,
                 "version": 3, "staleness_seconds": 12.5, "last_refresh": "2026-12-05T08:00:00Z", "last_error": null,
                 "progress": {"phase": "refresh", "rows_read": 500, "bytes_read": 4096, "elapsed_seconds": 1.0,
                              "rows_per_second": 500.0, "expected_rows": 2000, "eta_seconds": 3.0}},
                {"name": "events", "source": "replica:http://platform:50051", "accelerated": true, "rows": 10,
                 "version": 2, "staleness_seconds": 1.0, "last_refresh": null, "last_error": null,
                 "replication": {"snapshots": 1, "increments": 1}}
            ],
            "upstream": [
                {"name": "events", "home_region": "eu", "accelerated": true, "version": 5, "rows": 13, "age_seconds": 0.5},
                {"name": "sensors", "home_region": "us", "accelerated": true, "version": 1, "rows": 240, "age_seconds": 30.0}
            ],
            "upstream_endpoints": [{"upstream": "platform", "endpoint": "http://platform:50051", "breaker": "closed"}]
        });
        let shown = render(&body);
        let lines: Vec<&str> = shown.lines().collect();
        assert!(lines[0].starts_with(" dataset | served"), "{shown}");
        assert!(lines.iter().any(|l| l.contains("orders") && l.contains("here") && l.contains("12s")), "{shown}");
        // The replica is 3 versions behind what its upstream advertises.
        assert!(
            lines.iter().any(|l| l.contains("events") && l.contains("replica") && l.ends_with("3 versions")),
            "{shown}"
        );
        assert!(
            lines.iter().any(|l| l.contains("sensors") && l.contains("upstream") && l.contains("region us")),
            "{shown}"
        );
        assert_eq!(lines.iter().filter(|l| l.contains("events")).count(), 1, "{shown}");
        assert!(shown.contains("upstream http://platform:50051: breaker closed"), "{shown}");
        assert!(shown.contains("orders: refresh: 500/2000 rows (25%), 500 rows/s, 4096 bytes, eta 3s"), "{shown}");
    }
}
