//! A tier as a process, written once for every tier binary and the `strata` CLI: flags with
//! env twins, config loading (exit 64 on a bad one), telemetry, the runtime, one stdout line
//! with the bound addresses, and SIGTERM handling.

// The bound addresses go to stdout on purpose: it is the binaries' interface to scripts.
#![allow(clippy::print_stdout)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use strata_core::config::{UpstreamConfig, check_endpoint};
use strata_core::{Config, Engine, StrataError};
use tokio_util::sync::CancellationToken;

use crate::server::{ServeError, Servers};
use crate::telemetry::{self, LogFormat};

/// Exit code for an unusable config (EX_USAGE), so supervisors do not restart-loop on it.
pub const EXIT_CONFIG: u8 = 64;

/// The allocator every tier binary declares as its `#[global_allocator]` (a library must not
/// choose it for the programs that link it): jemalloc. A refresh frees a whole source read's
/// transient buffers (decoded Parquet pages, IPC frames) at once, and glibc's malloc kept
/// them resident, so a loaded copy cost 1.4x its Arrow size. jemalloc's background thread
/// returns such memory within its decay time (`.cargo/config.toml` sets it).
pub type Allocator = tikv_jemallocator::Jemalloc;
/// The value for `static ALLOCATOR: Allocator = ALLOCATOR;`.
pub const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;

/// Why a tier could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] StrataError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// A tier as a process: what [`run`] and [`check`] need from the platform, the sidecar and
/// the edge agent, so each binary and the `strata` CLI start a tier the same way.
pub trait Tier {
    /// The tier's one name: the `strata` subcommand, the start line on stdout, the health
    /// answer, config errors.
    const KIND: &'static str;

    /// Checks what this tier needs of a loaded config beyond what every config needs.
    fn validate(config: &Config) -> Result<(), StrataError>;

    /// What only this tier adds to a new engine before it serves (routers, replicas, the
    /// edge's log and uploader); background work goes through `engine.background()`.
    fn wire(engine: &Engine, config: &Config) -> impl Future<Output = Result<(), StrataError>> + Send;
}

/// Starts a tier the same way for every tier: its checks, the engine, the tier's own wiring,
/// the listeners (bound before the datasets load, so `/health` answers at once), then the
/// datasets' background loads. The servers run until `shutdown`, drain, then stop the
/// background work (see [`Servers::wait`]).
pub async fn start<T: Tier>(config: &Config, shutdown: CancellationToken) -> Result<Servers, StartError> {
    T::validate(config)?;
    let engine = Engine::new(config)?;
    T::wire(&engine, config).await?;
    let servers = crate::server::start(
        engine.clone(),
        &config.server,
        config.cluster.as_ref(),
        config.auth.as_ref(),
        T::KIND,
        shutdown,
    )
    .await?;
    engine.start();
    Ok(servers)
}

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

/// The config a tier runs with: the file, then the flags over it, then every check (the
/// config's own and the tier's). A value given by flag is checked like one in the file and
/// named by its flag; the error is the one to print before exiting with [`EXIT_CONFIG`].
pub fn load_config<T: Tier>(args: &TierArgs) -> Result<Config, String> {
    let mut config = Config::load(&args.config).map_err(|err| err.to_string())?;
    for endpoint in &args.upstream {
        check_endpoint(endpoint).map_err(|m| format!("--upstream `{endpoint}`: {m}"))?;
    }
    if !args.upstream.is_empty() {
        match &mut config.upstream {
            Some(upstream) => upstream.endpoints = args.upstream.clone(),
            None => config.upstream = Some(UpstreamConfig::with_endpoints(args.upstream.clone())),
        }
    }
    config.server.flight_addr = args.flight_addr.unwrap_or(config.server.flight_addr);
    config.server.http_addr = args.http_addr.unwrap_or(config.server.http_addr);
    let file = args.config.display();
    // The file was checked as it loaded; an upstream given by flag changes what must hold.
    if !args.upstream.is_empty() {
        config.check().map_err(|err| format!("{file}: {err}"))?;
    }
    T::validate(&config).map_err(|err| format!("{file}: {err}"))?;
    Ok(config)
}

/// Loads the config with the flags applied, checks it, and serves the tier until SIGTERM.
pub fn run<T: Tier>(args: TierArgs) -> ExitCode {
    let config = match load_config::<T>(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let telemetry = telemetry::init_with_traces(args.log_format, &config.telemetry, T::KIND, &config.region)
            .map_err(|e| e.to_string())?;
        // Panics are logged like everything else; those a decoder of client bytes had
        // (caught: the request is refused) only at debug level.
        strata_core::contained_panic::install_hook();
        // Before any listener is up, so a SIGTERM soon after start still drains.
        let signals = telemetry::ShutdownSignals::register().map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
        let shutdown = CancellationToken::new();
        let servers = start::<T>(&config, shutdown.clone()).await.map_err(|e| e.to_string())?;
        // One machine-readable line on stdout: tests and scripts read the bound ports here.
        println!("strata {} listening flight={} http={}", T::KIND, servers.flight_addr, servers.http_addr);
        tokio::spawn(async move {
            signals.recv().await;
            shutdown.cancel();
        });
        let served = servers.wait().await.map_err(|e| e.to_string());
        telemetry.shutdown(Duration::from_secs(5)).await;
        served
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
pub fn check<T: Tier>(path: &Path) -> ExitCode {
    let args = TierArgs {
        config: path.to_path_buf(),
        flight_addr: None,
        http_addr: None,
        upstream: Vec::new(),
        log_format: LogFormat::Pretty,
    };
    match load_config::<T>(&args) {
        Ok(_) => {
            println!("ok: {} is a valid {} config", path.display(), T::KIND);
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
