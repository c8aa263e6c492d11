//! `platform-service`: parse flags, load the config, serve until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use strata_serving::process::{self, Allocator, TierArgs};

#[global_allocator]
static ALLOCATOR: Allocator = process::ALLOCATOR;

#[derive(Parser)]
#[command(name = "platform-service", version, about = "Strata platform tier")]
struct Args {
    #[command(flatten)]
    tier: TierArgs,
}

fn main() -> ExitCode {
    process::run::<strata_platform_service::Platform>(Args::parse().tier)
}
