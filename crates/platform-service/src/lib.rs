//! The platform tier: federates sources, accelerates shared datasets once and serves every
//! app and team over Flight SQL, HTTP and the tier protocol; routes queries on datasets of
//! other regions to their home platform (`peers:`).

use strata_core::config::UpstreamConfig;
use strata_core::{Config, Engine, StrataError};
use strata_serving::process::Tier;
use strata_upstream::TierRouter;

/// The platform tier, as [`strata_serving::process::run`] starts it.
pub struct Platform;

impl Tier for Platform {
    const KIND: &'static str = "platform";

    /// Checks what only a platform needs: it replicates nothing, it has peers instead of an upstream.
    fn validate(config: &Config) -> Result<(), StrataError> {
        if !config.replicas.is_empty() {
            return Err(StrataError::Config(
                "replicas: a platform-service accelerates its own datasets; `replicas:` is for sidecars".into(),
            ));
        }
        Ok(())
    }

    /// With `peers:`, a router that sends queries on other regions' datasets to their home
    /// platform.
    async fn wire(engine: &Engine, config: &Config) -> Result<(), StrataError> {
        if !config.peers.is_empty() {
            let settings = config.upstream.clone().unwrap_or_else(|| UpstreamConfig::with_endpoints(Vec::new()));
            TierRouter::for_platform(engine.clone(), &config.peers, &settings, engine.background().token())?;
        }
        Ok(())
    }
}
