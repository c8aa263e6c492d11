//! `edge-agent`: parse flags, load the config, serve until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use strata_serving::process::{self, TierArgs};

#[derive(Parser)]
#[command(name = "edge-agent", version, about = "Strata edge-agent tier")]
struct Args {
    #[command(flatten)]
    tier: TierArgs,
}

fn main() -> ExitCode {
    process::run("edge-agent", Args::parse().tier, strata_edge_agent::validate, |config, shutdown| async move {
        strata_edge_agent::start(&config, shutdown).await
    })
}
