//! `strata`: run a tier (`platform`, `sidecar`, `edge`), the one-command tiered demo (`demo`),
//! the compose demo's application (`demo-app`), a container health check (`health`), the
//! SQL client (`sql`), or the dataset status of a tier and its upstream (`status`).
//!
//! The container image holds this one binary with every tier as a subcommand: the tiers share
//! one engine, so four binaries would ship that engine four times (each is most of the size).

mod certs;
mod command;
mod demo;
mod demo_app;
mod health;
mod keygen;
mod sql;
mod status;
mod text_table;
mod trace_sink;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strata_app_sidecar::Sidecar;
use strata_edge_agent::Edge;
use strata_platform_service::Platform;
use strata_serving::process::{self, Allocator, TierArgs};

#[global_allocator]
static ALLOCATOR: Allocator = process::ALLOCATOR;

#[derive(Parser)]
#[command(name = "strata", version, about = "Strata: a tiered SQL runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start two regional platforms and an app-sidecar on localhost with sample data, show
    /// a local hit, a cache miss and a cross-region query, and keep running until Ctrl-C.
    Demo,
    /// Run a platform-service.
    Platform(TierArgs),
    /// Run an app-sidecar.
    Sidecar(TierArgs),
    /// Run an edge-agent.
    Edge(TierArgs),
    /// Load and validate a tier's config file without serving: exit 0 when the tier could
    /// start on it, 64 with the error (file, field, line) otherwise.
    Check {
        /// The tier whose config it is.
        #[arg(value_enum)]
        tier: TierKind,
        /// Config file.
        #[arg(long, env = "STRATA_CONFIG", default_value = "strata.yaml")]
        config: PathBuf,
    },
    /// Check a tier's HTTP health (`/health`) or readiness (`--ready`): exit 0 when it answers
    /// 200, 1 otherwise. For container health checks (the image has no curl).
    Health(health::HealthArgs),
    /// The compose demo's application: ask a tier a few queries in a loop and log where each
    /// answer came from and how long it took.
    DemoApp(demo_app::DemoAppArgs),
    /// A SQL client over Flight SQL to any tier: a REPL, or one-shot with -c / -f / stdin.
    Sql(sql::SqlArgs),
    /// The datasets of a tier and of its upstream in one table; `--watch` redraws it with
    /// progress bars for loads, refreshes and snapshots under way.
    Status(status::StatusArgs),
    /// An OTLP/gRPC trace receiver that shows the spans it was sent at `GET /v1/spans`: the
    /// compose demo's collector stand-in.
    TraceSink(trace_sink::TraceSinkArgs),
    /// Print a new API key and the hash to put in `auth.keys[].hash` (the key is shown once;
    /// only its hash belongs in the config).
    Keygen,
    /// Make a private CA and certificates signed by it for a set of tiers (TLS and mutual
    /// TLS in demos and test clusters; the CA's key is not kept).
    Certs(certs::CertsArgs),
}

/// The tiers, as `strata check` names them (the same words as their subcommands).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TierKind {
    Platform,
    Sidecar,
    Edge,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo => demo::main(),
        Command::Platform(args) => process::run::<Platform>(args),
        Command::Sidecar(args) => process::run::<Sidecar>(args),
        Command::Edge(args) => process::run::<Edge>(args),
        Command::Check { tier, config } => match tier {
            TierKind::Platform => process::check::<Platform>(&config),
            TierKind::Sidecar => process::check::<Sidecar>(&config),
            TierKind::Edge => process::check::<Edge>(&config),
        },
        Command::Health(args) => health::main(args),
        Command::DemoApp(args) => demo_app::main(args),
        Command::Sql(args) => sql::main(args),
        Command::Status(args) => status::main(args),
        Command::TraceSink(args) => trace_sink::main(args),
        Command::Keygen => keygen::main(),
        Command::Certs(args) => certs::main(args),
    }
}
