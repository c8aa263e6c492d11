//! A tier as a process, written once for every tier binary and the `strata` CLI: flags with
//! env twins, config loading (exit 64 on a bad one), telemetry, the runtime, one stdout line
//! with the bound addresses, and SIGTERM handling.

// The bound addresses go to stdout on purpose: it is the binaries' interface to scripts.
#![allow(clippy::print_stdout)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use strata_core::config::UpstreamConfig;
use strata_core::{Config, StrataError};
use tokio_util::sync::CancellationToken;

use crate::server::Servers;
use crate::telemetry::{self, LogFormat};

/// Exit code for an unusable config (EX_USAGE), so supervisors do not restart-loop on it.
pub const EXIT_CONFIG: u8 = 64;

/// Every tier allocates through jemalloc: a refresh frees a whole source read's transient
/// buffers (decoded Parquet pages, IPC frames) at once, and glibc's malloc kept them
/// resident, so a loaded copy cost 1.4x its Arrow size. jemalloc's background thread
/// returns such memory within its decay time (`.cargo/config.toml` sets it).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The flags every tier takes.
#[derive(clap::Args, Debug, Clone)]
pub struct TierArgs {
    /// Config file.
    #[arg(long, env = "STRATA_CONFIG", default_value = "strata.yaml")]
    pub config: PathBuf,
    /// Overrides `server.flight_addr` (port 0 picks a free port).
    #[arg(long, env = "STRATA_FLIGHT_ADDR")]
    pub flight_addr: Option<SocketAddr>,
    /// Overrides `server.http_addr` (port 0 picks a free port).
    #[arg(long, env = "STRATA_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Overrides `upstream.endpoints` (comma-separated platform endpoints; sidecars).
    #[arg(long, env = "STRATA_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// Log format: pretty or json.
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
}

/// Loads the config with the flags applied, checks it with `validate`, and serves the tier
/// that `start` builds until SIGTERM.
pub fn run<S, F, E>(
    name: &'static str,
    args: TierArgs,
    validate: impl FnOnce(&Config) -> Result<(), StrataError>,
    start: S,
) -> ExitCode
where
    S: FnOnce(Config, CancellationToken) -> F,
    F: Future<Output = Result<Servers, E>>,
    E: std::fmt::Display,
{
    telemetry::init(args.log_format);
    let mut config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !args.upstream.is_empty() {
        match &mut config.upstream {
            Some(upstream) => upstream.endpoints = args.upstream.clone(),
            None => config.upstream = Some(UpstreamConfig::with_endpoints(args.upstream.clone())),
        }
    }
    if let Err(err) = validate(&config) {
        eprintln!("error: {}: {err}", args.config.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    config.server.flight_addr = args.flight_addr.unwrap_or(config.server.flight_addr);
    config.server.http_addr = args.http_addr.unwrap_or(config.server.http_addr);
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let servers = start(config, shutdown.clone()).await.map_err(|e| e.to_string())?;
        // One machine-readable line on stdout: tests and scripts read the bound ports here.
        println!("strata {name} listening flight={} http={}", servers.flight_addr, servers.http_addr);
        tokio::spawn(async move {
            telemetry::shutdown_signal().await;
            shutdown.cancel();
        });
        servers.wait().await.map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Loads and validates a config file exactly as [`run`] would, without serving: exit 0 when
/// the tier could start on it, [`EXIT_CONFIG`] with the error (file, field, line) otherwise.
/// For CI and for checking a rendered config before rolling it out.
pub fn check(name: &'static str, path: &Path, validate: impl FnOnce(&Config) -> Result<(), StrataError>) -> ExitCode {
    let outcome = Config::load(path)
        .map_err(|err| err.to_string())
        .and_then(|config| validate(&config).map_err(|err| format!("{}: {err}", path.display())));
    match outcome {
        Ok(()) => {
            println!("ok: {} is a valid {name} config", path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Stack of every runtime thread. Planning and optimizing walk a statement's expression
/// tree recursively; `limits.max_expression_depth` bounds the depth (default 1,024), and this
/// stack holds every walk of a statement well past it (measured: a 4,000-term `1+1+...`
/// plans and answers; tokio's default of 2 MiB overflowed and aborted at about 1,500). Only
/// the pages a thread touches are committed.
pub const THREAD_STACK_BYTES: usize = 64 << 20;

/// The multi-threaded runtime every tier runs on, with [`THREAD_STACK_BYTES`] stacks.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().thread_stack_size(THREAD_STACK_BYTES).build()
}
