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
/// when one is given (`--token` / `STRATA_TOKEN`; needed on tiers with `auth:`), and `https://`
/// tiers are verified against the CA in `ca_file` (`--ca-file` / `STRATA_CA_FILE`).
pub fn http_client(
    timeout: std::time::Duration,
    token: Option<&str>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| anyhow::anyhow!("--token: the key must be printable ASCII"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder().timeout(timeout).default_headers(headers);
    if let Some(ca_file) = ca_file {
        let pem = std::fs::read(ca_file).map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", ca_file.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| anyhow::anyhow!("--ca-file {}: not a PEM certificate: {e}", ca_file.display()))?;
        builder = builder.add_root_certificate(ca);
    }
    Ok(builder.build()?)
}

/// A gRPC channel to a tier's Flight endpoint: plaintext for `http://`, TLS verified against
/// `ca_file` for `https://`.
pub async fn flight_channel(
    endpoint: &str,
    ca_file: Option<&std::path::Path>,
    connect_timeout: std::time::Duration,
) -> anyhow::Result<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(endpoint.to_string())
        .map_err(|_| {
            anyhow::anyhow!("`{endpoint}` is not an endpoint: expected http://host:port or https://host:port")
        })?
        .connect_timeout(connect_timeout);
    if !endpoint.starts_with("https://") {
        return Ok(channel.connect().await?);
    }
    let ca_file = ca_file
        .ok_or_else(|| anyhow::anyhow!("{endpoint} is https: give the CA that signs its certificate with --ca-file"))?;
    let files = strata_core::config::ClientTlsConfig {
        ca_file: ca_file.to_path_buf(),
        cert_file: None,
        key_file: None,
        server_name: None,
    };
    let tls = strata_upstream::tls::ClientTls::new(&files, "--ca-file")?;
    Ok(channel.connect_with_connector(strata_upstream::tls::TlsConnector::new(tls, connect_timeout)).await?)
}
