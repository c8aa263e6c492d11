//! The app-sidecar tier: runs beside one application, answers it over localhost from local
//! replicas of the platform's datasets, and forwards cache misses and cross-region queries
//! to the platform (see `strata-upstream` for the routing and resilience).

use strata_core::{Config, Engine, StrataError};
use strata_serving::Servers;
use strata_serving::process::{StartError, Tier};
use strata_upstream::TierRouter;
use tokio_util::sync::CancellationToken;

/// The app-sidecar tier, as [`strata_serving::process::run`] starts it.
pub struct Sidecar;

impl Tier for Sidecar {
    const KIND: &'static str = "sidecar";

    /// Checks what only a sidecar needs: an upstream to replicate from and forward to.
    fn validate(config: &Config) -> Result<(), StrataError> {
        strata_upstream::validate_downstream(config, Sidecar::KIND)
    }

    /// Builds the engine and the router, binds the servers and starts replication. Ready once
    /// the platform's catalog has been read (replicas load after, queries are forwarded meanwhile).
    async fn start(config: Config, shutdown: CancellationToken) -> Result<Servers, StartError> {
        Self::validate(&config)?;
        let engine = Engine::new(&config)?;
        let Some(upstream) = &config.upstream else { unreachable!("validated above") };
        TierRouter::for_sidecar(
            engine.clone(),
            Sidecar::KIND,
            upstream,
            config.replicas.clone(),
            engine.background().token(),
        )?;
        let servers = strata_serving::start(engine.clone(), &config.server, Sidecar::KIND, shutdown.clone()).await?;
        engine.start();
        Ok(servers)
    }
}
