//! The app-sidecar tier: runs beside one application, answers it over localhost from local
//! replicas of the platform's datasets, and forwards cache misses and cross-region queries
//! to the platform (see `strata-upstream` for the routing and resilience).

use strata_core::{Config, Engine, StrataError};
use strata_serving::process::Tier;
use strata_upstream::TierRouter;

/// The app-sidecar tier, as [`strata_serving::process::run`] starts it.
pub struct Sidecar;

impl Tier for Sidecar {
    const KIND: &'static str = "sidecar";

    /// Checks what only a sidecar needs: an upstream to replicate from and forward to.
    fn validate(config: &Config) -> Result<(), StrataError> {
        strata_upstream::validate_downstream(config, Sidecar::KIND)
    }

    /// The router and the replicas. Ready once the platform's catalog has been read
    /// (replicas load after, queries are forwarded meanwhile).
    async fn wire(engine: &Engine, config: &Config) -> Result<(), StrataError> {
        let Some(upstream) = &config.upstream else { unreachable!("validated before wiring") };
        let replicas = config.replicas.clone();
        TierRouter::for_sidecar(engine.clone(), Sidecar::KIND, upstream, replicas, engine.background().token())?;
        Ok(())
    }
}
