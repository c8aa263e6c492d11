//! `strata`: run a tier (`platform`, `sidecar`) or the one-command tiered demo (`demo`).

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strata_serving::process::{self, TierArgs};

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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo => demo::main(),
        Command::Platform(args) => {
            process::run("platform-service", args, strata_platform_service::validate, |config, shutdown| async move {
                strata_platform_service::start(&config, shutdown).await
            })
        }
        Command::Sidecar(args) => {
            process::run("app-sidecar", args, strata_app_sidecar::validate, |config, shutdown| async move {
                strata_app_sidecar::start(&config, shutdown).await
            })
        }
    }
}
