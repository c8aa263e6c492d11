//! Joining the platform's cluster (`cluster:`): this replica's worker URL, the members it
//! may distribute over and the connections to them, handed to the engine, which returns
//! the worker the cluster listener serves (see `stack::worker_grpc`).

use std::net::SocketAddr;
use std::sync::Arc;

use strata_core::Engine;
use strata_core::config::ClusterConfig;
use strata_core::engine::Membership;
use strata_upstream::cluster::{Replicas, WorkerChannels};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::server::ServeError;

/// Finds the other replicas (once now, then every `cluster.refresh` until `stop`) and makes
/// `engine` distribute over them.
pub async fn join(
    engine: &Engine,
    config: &ClusterConfig,
    bound: SocketAddr,
    stop: CancellationToken,
) -> Result<datafusion_distributed::Worker, ServeError> {
    let failed = |message: String| ServeError::Server { what: "cluster", message };
    let advertised = config.advertise.clone().unwrap_or_else(|| format!("http://{bound}"));
    let self_url =
        url::Url::parse(&advertised).map_err(|e| failed(format!("cluster.advertise `{advertised}`: {e}")))?;
    let channels = WorkerChannels::new(config).map_err(|e| failed(e.to_string()))?;
    let members =
        Replicas::start(config, self_url.clone(), channels.clone(), stop).await.map_err(|e| failed(e.to_string()))?;
    info!(worker = %self_url, members = members.workers_now(), "joined the cluster");
    let membership = Membership { members, channels: Arc::new(channels), self_url };
    Ok(engine.enable_distribution(membership, config))
}
