//! How a client-side subcommand (`sql`, `status`, `trace-sink`) runs: on its own Tokio
//! runtime, with any error printed as `error: ...` (its causes joined, never a debug dump)
//! and exit code 1.

use std::future::Future;
use std::process::ExitCode;

/// Runs `work` on a current-thread runtime and turns its outcome into the exit code.
pub fn run(work: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
