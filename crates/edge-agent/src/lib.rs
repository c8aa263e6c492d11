//! The edge-agent tier: a sidecar for unreliable networks. It replicates and forwards like
//! an app-sidecar (the same router) and accepts writes into `edge.writable` datasets: each
//! write is durable in a local log before it is acknowledged, visible to local queries at
//! once, and uploaded to the platform in order, applied there exactly once.

pub mod dead_letter;
pub mod log;
pub mod pending;
pub mod writes;

use std::sync::Arc;

use strata_core::{Config, Engine, StrataError};
use strata_serving::process::Tier;
use strata_upstream::TierRouter;

use crate::log::IngestLog;
use crate::writes::EdgeWrites;

/// The edge-agent tier, as [`strata_serving::process::run`] starts it.
pub struct Edge;

impl Tier for Edge {
    const KIND: &'static str = "edge";

    /// A sidecar's checks, plus the edge section.
    fn validate(config: &Config) -> Result<(), StrataError> {
        if config.edge.is_none() {
            return Err(StrataError::Config(
                "an edge agent needs `edge: {id: <unique name>, data_dir: <path>}` (its identity and where its log lives)"
                    .into(),
            ));
        }
        strata_upstream::validate_downstream(config, Edge::KIND)
    }

    /// Opens the log (repairing a torn tail), builds the router, and starts replication and
    /// the uploader.
    async fn wire(engine: &Engine, config: &Config) -> Result<(), StrataError> {
        let (Some(edge), Some(upstream)) = (config.edge.clone(), &config.upstream) else {
            unreachable!("validated before wiring")
        };
        let router = TierRouter::for_edge(
            engine.clone(),
            upstream,
            config.replicas.clone(),
            (edge.data_dir.join("replicas"), edge.max_disk.0),
            engine.background().token(),
        )?;
        let dir = edge.data_dir.join("ingest");
        let dead_dir = edge.data_dir.join("dead-letter");
        let max = edge.max_log_size.0;
        let (log, recovery, dead_letters) = tokio::task::spawn_blocking(move || {
            let (log, recovery) = IngestLog::open(&dir, max)?;
            Ok::<_, StrataError>((log, recovery, crate::dead_letter::DeadLetters::open(&dead_dir)?))
        })
        .await
        .map_err(|e| StrataError::Internal(format!("cannot open the ingest log: {e}")))??;
        if recovery.truncated_bytes > 0 {
            tracing::error!(
                bytes = recovery.truncated_bytes,
                "ingest log had a torn tail (a crash mid-write); it was cut off, every acknowledged write before it is intact"
            );
        }
        let client =
            router.default_client().cloned().ok_or_else(|| StrataError::Internal("edge without upstream".into()))?;
        let writes = EdgeWrites::new(edge, log, recovery, Arc::clone(&router), dead_letters);
        engine.set_writes(Arc::clone(&writes) as Arc<dyn strata_core::writes::LocalWrites>);
        let background = engine.background();
        let retry = Arc::clone(&writes).retry_dead_letters(client.clone(), background.token());
        background.spawn("edge dead-letter retry", retry);
        background.spawn("edge uploader", Arc::clone(&writes).upload(client, background.token()));
        Ok(())
    }
}
