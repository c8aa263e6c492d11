//! `strata health`: a container health check with no curl in the image. Asks a tier's HTTP
//! listener for `/health` (the process serves) or `/v1/ready` (it is ready for traffic) and
//! exits 0 on 200, 1 on anything else, printing why.

#![allow(clippy::print_stdout)] // this command's output is for the person or orchestrator reading it

use std::process::ExitCode;
use std::time::Duration;

/// Flags of `strata health`.
#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// The tier's HTTP address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: String,
    /// Check readiness (`/v1/ready`) instead of liveness (`/health`).
    #[arg(long)]
    pub ready: bool,
    /// Give up after this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// API key for `--ready` on tiers with `auth:` (`/health` needs none).
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The tier serves TLS (`server.tls`): check over https, trusting this CA certificate.
    #[arg(long, env = "STRATA_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

pub fn main(args: HealthArgs) -> ExitCode {
    let path = if args.ready { "/v1/ready" } else { "/health" };
    let scheme = if args.ca_file.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}{path}", args.http);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("unhealthy: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let client = crate::command::http_client(args.timeout, args.token.as_deref(), args.ca_file.as_deref())?;
        let response = client.get(&url).send().await?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Ok::<_, anyhow::Error>((status, body))
    });
    match outcome {
        Ok((status, _)) if status.is_success() => {
            println!("ok: {url} {status}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            println!("unhealthy: {url} answered {status}: {}", body.trim());
            ExitCode::FAILURE
        }
        Err(err) => {
            println!("unhealthy: {url}: {err}");
            ExitCode::FAILURE
        }
    }
}
