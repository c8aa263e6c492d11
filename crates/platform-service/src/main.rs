//! `platform-service`: parse flags, load the config, serve until SIGTERM.

// The bound addresses go to stdout on purpose: it is this binary's interface to scripts.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use strata_core::Config;
use strata_serving::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Exit code for an unusable config (EX_USAGE), so supervisors do not restart-loop on it.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "platform-service", version, about = "Strata platform tier")]
struct Args {
    /// Config file.
    #[arg(long, env = "STRATA_CONFIG", default_value = "strata.yaml")]
    config: PathBuf,
    /// Overrides `server.flight_addr` (port 0 picks a free port).
    #[arg(long, env = "STRATA_FLIGHT_ADDR")]
    flight_addr: Option<SocketAddr>,
    /// Overrides `server.http_addr` (port 0 picks a free port).
    #[arg(long, env = "STRATA_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Log format: pretty or json.
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "pretty")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let mut config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    config.server.flight_addr = args.flight_addr.unwrap_or(config.server.flight_addr);
    config.server.http_addr = args.http_addr.unwrap_or(config.server.http_addr);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let servers = strata_platform_service::start(&config, shutdown.clone()).await?;
        // One machine-readable line on stdout: tests and scripts read the bound ports here.
        println!("strata platform-service listening flight={} http={}", servers.flight_addr, servers.http_addr);
        tokio::spawn(async move {
            telemetry::shutdown_signal().await;
            shutdown.cancel();
        });
        servers.wait().await?;
        Ok::<_, strata_platform_service::PlatformError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
