//! `app-sidecar`: parse flags, load the config, serve until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use strata_serving::process::{self, TierArgs};

#[derive(Parser)]
#[command(name = "app-sidecar", version, about = "Strata app-sidecar tier")]
struct Args {
    #[command(flatten)]
    tier: TierArgs,
}

fn main() -> ExitCode {
    process::run("app-sidecar", Args::parse().tier, strata_app_sidecar::validate, |config, shutdown| async move {
        strata_app_sidecar::start(&config, shutdown).await
    })
}
