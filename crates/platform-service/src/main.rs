//! `platform-service`: parse flags, load the config, serve until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use strata_serving::process::{self, TierArgs};

#[derive(Parser)]
#[command(name = "platform-service", version, about = "Strata platform tier")]
struct Args {
    #[command(flatten)]
    tier: TierArgs,
}

fn main() -> ExitCode {
    process::run(
        "platform-service",
        Args::parse().tier,
        strata_platform_service::validate,
        |config, shutdown| async move { strata_platform_service::start(&config, shutdown).await },
    )
}
