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

/// An HTTP client for a tier's API: every request carries `token` as `authorization: Bearer`
/// when one is given (`--token` / `STRATA_TOKEN`; needed on tiers with `auth:`).
pub fn http_client(timeout: std::time::Duration, token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| anyhow::anyhow!("--token: the key must be printable ASCII"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder().timeout(timeout).default_headers(headers).build()?)
}
