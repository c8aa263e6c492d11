//! The downstream side of the tier protocol, shared by sidecars, edge agents and platforms
//! with peers: a resilient upstream client (tower), tables that execute upstream, replicas
//! kept current by version, and the router that decides where each query runs.

pub mod breaker;
pub mod client;
pub mod cluster;
pub mod credential;
pub mod disk;
pub mod reloading;
pub mod replica;
pub mod router;
pub mod subset;
pub mod table;
pub mod tls;
pub mod wire;

pub use client::UpstreamClient;
pub use router::TierRouter;

/// What every tier with an upstream (sidecar, edge agent) needs from its config: `tier`
/// names it in the error.
pub fn validate_downstream(config: &strata_core::Config, tier: &str) -> Result<(), strata_core::StrataError> {
    if config.upstream.is_none() {
        return Err(strata_core::StrataError::Config(format!(
            "{tier} needs `upstream: {{endpoints: [http://platform:50051]}}` (the platform it replicates from and forwards to)"
        )));
    }
    if !config.peers.is_empty() {
        return Err(strata_core::StrataError::Config("peers: only a platform-service has peer regions".into()));
    }
    if config.cluster.is_some() {
        return Err(strata_core::StrataError::Config(
            "cluster: only platform-service replicas run queries together; a sidecar forwards large queries to them"
                .into(),
        ));
    }
    Ok(())
}
