//! The platform tier: federates sources, accelerates shared datasets once and serves every
//! app and team over Flight SQL and HTTP.

use strata_core::{Config, Engine, StrataError};
use strata_serving::{ServeError, Servers};
use tokio_util::sync::CancellationToken;

/// Why the platform could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Engine(#[from] StrataError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Builds the engine, starts loading datasets in the background and binds the servers.
/// Returns as soon as the listeners are bound; `Servers::wait` runs until `shutdown`.
pub async fn start(config: &Config, shutdown: CancellationToken) -> Result<Servers, PlatformError> {
    let engine = Engine::new(config)?;
    let servers = strata_serving::start(engine.clone(), &config.server, shutdown.clone()).await?;
    engine.start(shutdown);
    Ok(servers)
}
