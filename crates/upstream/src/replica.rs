//! A dataset replicated from the platform: subscribe from the version held, apply the full
//! snapshot or the appended rows of each new version, resume after any break. Replicas read
//! the platform's accelerated copy, never the source, so N sidecars add no source load.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use datafusion::common::DFSchema;
use datafusion::logical_expr::Expr;
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::Serializeable;
use futures::{StreamExt, TryStreamExt};
use strata_core::StrataError;
use strata_core::accelerator::{AcceleratedTable, Snapshot};
use strata_core::config::ReplicaConfig;
use strata_core::dataset::{DatasetStatus, ReplicationStatus};
use strata_core::progress::WorkProgress;
use strata_core::routing::QueryOptions;
use strata_proto::v1::{ArrowFrame, ChangeKind, SubscribeRequest, subscribe_event};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{info, warn};

use crate::client::UpstreamClient;
use crate::disk::{DiskStore, Manifest};
use crate::table::Origin;
use crate::wire;

#[derive(Debug, Default)]
struct Progress {
    status: ReplicationStatus,
    last_error: Option<(String, SystemTime)>,
}

/// One replicated dataset.
pub struct Replica {
    config: ReplicaConfig,
    table: Arc<AcceleratedTable>,
    /// The subset predicate, over unqualified columns.
    predicate: Option<Expr>,
    predicate_bytes: Bytes,
    progress: Mutex<Progress>,
    /// The version being received now, how far it got.
    work: WorkProgress,
    /// The upstream epoch the held version belongs to (0 = none).
    epoch: std::sync::atomic::AtomicU64,
    /// Where the copy is kept on disk (edge agents), with the manifest of the held version.
    store: Option<DiskStore>,
    manifest: Mutex<Option<Manifest>>,
    home_region: String,
}

/// The keys a replica indexes: the upstream's (one whose columns this copy lacks is
/// skipped with a warning: the platform may be a newer version) and the config's, which
/// must resolve (a typo is the operator's to fix).
fn index_keys(
    config: &ReplicaConfig,
    schema: &SchemaRef,
    upstream: &[Vec<String>],
) -> Result<Vec<strata_core::key_index::KeySpec>, StrataError> {
    use strata_core::key_index::KeySpec;
    let mut keys: Vec<KeySpec> = Vec::new();
    for columns in upstream {
        match KeySpec::resolve(columns, schema, &format!("upstream index of `{}`", config.name)) {
            Ok(key) if !keys.contains(&key) => keys.push(key),
            Ok(_) => {}
            Err(err) => tracing::warn!(dataset = %config.name, error = %err, "index not kept in the replica"),
        }
    }
    for (i, columns) in config.indexes.iter().enumerate() {
        let key = KeySpec::resolve(&columns.columns(), schema, &format!("replicas (`{}`).indexes[{i}]", config.name))?;
        if !keys.iter().any(|k| k.covers_exactly(&key.columns)) {
            keys.push(key);
        }
    }
    Ok(keys)
}

impl Replica {
    /// A replica of a dataset with `schema`; the `where:` predicate must plan against it.
    pub fn new(config: ReplicaConfig, schema: SchemaRef) -> Result<Self, StrataError> {
        Self::with_store(config, schema, None, String::new(), &[])
    }

    /// A replica kept on disk in `store` (restored from it by [`Replica::restore`]),
    /// indexed on `upstream_indexes` (the keys the platform indexes) and its own `indexes:`.
    pub fn with_store(
        config: ReplicaConfig,
        schema: SchemaRef,
        store: Option<DiskStore>,
        home_region: String,
        upstream_indexes: &[Vec<String>],
    ) -> Result<Self, StrataError> {
        let keys = index_keys(&config, &schema, upstream_indexes)?;
        let (predicate, predicate_bytes) = match &config.predicate {
            Some(sql) => {
                let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
                let expr = SessionContext::new().parse_sql_expr(sql, &df_schema).map_err(|e| {
                    StrataError::Config(format!(
                        "replicas (`{}`).where: `{sql}` is not a valid predicate: {e}",
                        config.name
                    ))
                })?;
                let bytes = expr.to_bytes()?;
                (Some(expr), bytes)
            }
            None => (None, Bytes::new()),
        };
        let progress = Progress {
            status: ReplicationStatus { predicate: config.predicate.clone(), ..Default::default() },
            last_error: None,
        };
        Ok(Self {
            table: Arc::new(
                AcceleratedTable::new(config.name.clone(), schema)
                    .with_indexes(keys)
                    .with_stale_while_revalidate(config.stale_while_revalidate),
            ),
            config,
            predicate,
            predicate_bytes,
            progress: Mutex::new(progress),
            work: WorkProgress::default(),
            epoch: std::sync::atomic::AtomicU64::new(0),
            store,
            manifest: Mutex::new(None),
            home_region,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Serves the copy stored on disk, if any, as the held version (before any upstream
    /// contact); replication then resumes from it.
    pub fn restore(&self, manifest: Manifest, batches: Vec<RecordBatch>) {
        let made_at = UNIX_EPOCH + Duration::from_millis(manifest.refreshed_at_unix_ms);
        self.table.swap(Snapshot::new(batches, manifest.version).made_at(made_at));
        self.epoch.store(manifest.epoch, std::sync::atomic::Ordering::SeqCst);
        info!(dataset = %self.name(), version = manifest.version, "replica restored from disk");
        *self.manifest.lock().unwrap_or_else(|p| p.into_inner()) = Some(manifest);
    }

    /// Why the held copy is too old to serve without comment, if it is.
    pub fn staleness(&self) -> Option<String> {
        let limit = self.config.max_staleness?;
        let age = self.snapshot()?.refreshed_at.elapsed().unwrap_or_default();
        (age > limit).then(|| {
            format!(
                "the local copy of `{}` is {}s old, over its max_staleness of {}s (is the platform reachable?)",
                self.name(),
                age.as_secs(),
                limit.as_secs()
            )
        })
    }

    /// When the copy served now passes its `max_staleness`, if it has one.
    pub fn stale_at(&self) -> Option<std::time::SystemTime> {
        Some(self.snapshot()?.refreshed_at + self.config.max_staleness?)
    }

    pub fn on_stale(&self) -> strata_core::config::OnStale {
        self.config.on_stale
    }

    /// The local copy queries read.
    pub fn table(&self) -> Arc<AcceleratedTable> {
        Arc::clone(&self.table)
    }

    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.table.snapshot()
    }

    pub fn predicate_sql(&self) -> Option<&str> {
        self.config.predicate.as_deref()
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when rows passing `filters` (a scan's pushed-down conjuncts) all lie inside the
    /// local subset. Conservative: anything it cannot prove is "no", and the query goes upstream.
    pub fn covers(&self, filters: &[Expr]) -> bool {
        self.predicate.as_ref().is_none_or(|predicate| crate::subset::covers(predicate, filters))
    }

    /// Keeps the local copy current until `shutdown`: subscribe from the version held,
    /// apply versions as they come, and on any break wait briefly and resume.
    pub async fn run(self: Arc<Self>, client: UpstreamClient, origin: Origin, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = self.follow(&client, &origin) => outcome,
            };
            self.progress().status.streaming = false;
            match outcome {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(err) => {
                    self.progress().status.interruptions += 1;
                    warn!(dataset = %self.name(), error = %err, retry_in_ms = backoff.as_millis() as u64, "replication interrupted");
                    self.progress().last_error = Some((err.to_string(), SystemTime::now()));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One subscription, until the stream ends or fails.
    async fn follow(&self, client: &UpstreamClient, origin: &Origin) -> Result<(), StrataError> {
        let held = self.snapshot().map_or(0, |s| s.version);
        let request = SubscribeRequest {
            dataset: self.config.name.clone(),
            from_version: held,
            predicate: self.predicate_bytes.clone(),
            context: Some(wire::context(&QueryOptions::default(), &origin.tier, &origin.region, None)),
            from_epoch: self.epoch.load(std::sync::atomic::Ordering::SeqCst),
        };
        let mut events = client.subscribe(request).await?;
        self.progress().status.streaming = true;
        let started = Instant::now();
        let mut streamed: u64 = 0;
        let schema = datafusion::catalog::TableProvider::schema(self.table.as_ref());
        let mut pending: Option<Incoming> = None;
        while let Some(event) = events.next().await {
            let event = event.map_err(|s| wire::status_error(&s))?;
            match event.event {
                Some(subscribe_event::Event::Begin(begin)) => {
                    let phase = if begin.kind == ChangeKind::Snapshot as i32 { "snapshot" } else { "increment" };
                    self.work.start(phase, Some(begin.rows).filter(|n| *n > 0));
                    pending = Some(Incoming::begin(begin, Arc::clone(&schema)));
                }
                Some(subscribe_event::Event::Data(frame)) => {
                    let Some(incoming) = pending.as_mut() else {
                        return Err(StrataError::Protocol("replication: data before a version began".into()));
                    };
                    let size = frame.size() as u64;
                    self.work.add(frame_rows(&frame), size);
                    streamed += size;
                    self.progress().status.bytes_received += size;
                    if !incoming.push(frame).await
                        && let Some(incoming) = pending.take()
                    {
                        // The decoder stopped on an error: that error ends the subscription.
                        incoming.finish().await?;
                        return Err(StrataError::Internal("replication: the frame decoder stopped".into()));
                    }
                    self.throttle(started, streamed).await;
                }
                Some(subscribe_event::Event::End(end)) => {
                    let Some(incoming) = pending.take() else {
                        return Err(StrataError::Protocol("replication: a version ended before it began".into()));
                    };
                    if incoming.begin.version != end.version {
                        return Err(StrataError::Protocol("replication: version markers do not match".into()));
                    }
                    let span = tracing::info_span!(
                        "replicate",
                        dataset = %self.name(),
                        version = incoming.begin.version,
                        kind = incoming.begin.kind,
                        frames = incoming.frames,
                    );
                    let applied = async {
                        let (begin, batches) = incoming.finish().await?;
                        self.apply(begin, batches).await
                    }
                    .instrument(span)
                    .await;
                    self.work.finish();
                    applied?;
                }
                Some(subscribe_event::Event::Heartbeat(_)) | None => {}
            }
        }
        Ok(())
    }

    /// Sleeps as needed to keep the stream under `max_rate`.
    async fn throttle(&self, started: Instant, streamed: u64) {
        let Some(rate) = self.config.max_rate.filter(|r| r.0 > 0) else { return };
        let due = Duration::from_secs_f64(streamed as f64 / rate.0 as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Publishes a received version (decoded and copied into buffers of its own).
    async fn apply(&self, begin: strata_proto::v1::VersionBegin, batches: Vec<RecordBatch>) -> Result<(), StrataError> {
        let schema = datafusion::catalog::TableProvider::schema(self.table.as_ref());
        let made_at = UNIX_EPOCH + Duration::from_millis(begin.refreshed_at_unix_ms.max(0) as u64);
        let kind = ChangeKind::try_from(begin.kind).unwrap_or(ChangeKind::Unspecified);
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let epoch = begin.epoch;
        match kind {
            ChangeKind::Snapshot => {
                let batches = self.persist(&schema, batches, epoch, begin.version, made_at, false)?;
                // Counted before it is published (a swap cannot fail), and `status` reads
                // the version before the counts: a status that shows a version has counted it.
                self.progress().status.snapshots += 1;
                self.table.swap(Snapshot::new(batches, begin.version).made_at(made_at));
                self.epoch.store(epoch, std::sync::atomic::Ordering::SeqCst);
            }
            ChangeKind::Append => {
                let same_epoch = self.epoch.load(std::sync::atomic::Ordering::SeqCst) == epoch;
                let Some(current) = self.snapshot().filter(|s| same_epoch && s.version == begin.base_version) else {
                    return Err(StrataError::Protocol(format!(
                        "replication: an increment on version {} arrived, but this replica holds another; resubscribing",
                        begin.base_version
                    )));
                };
                let batches = self.persist(&schema, batches, epoch, begin.version, made_at, true)?;
                self.progress().status.increments += 1;
                self.table.swap(Snapshot::appended(&current, batches, begin.version).made_at(made_at));
            }
            ChangeKind::Unspecified => {
                return Err(StrataError::Protocol("replication: a version of unknown kind arrived".into()));
            }
        }
        self.progress().last_error = None;
        info!(dataset = %self.name(), version = begin.version, ?kind, rows, "replica updated");
        Ok(())
    }

    /// Writes a version to the disk store (when there is one) and returns its rows as read
    /// back memory-mapped; without a store, the rows as they are.
    fn persist(
        &self,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
        epoch: u64,
        version: u64,
        made_at: SystemTime,
        append: bool,
    ) -> Result<Vec<RecordBatch>, StrataError> {
        let Some(store) = &self.store else { return Ok(batches) };
        let mut held = self.manifest.lock().unwrap_or_else(|p| p.into_inner());
        let files = match (append, held.as_ref()) {
            (true, Some(m)) => m.files.clone(),
            _ => Vec::new(),
        };
        let manifest = Manifest {
            epoch,
            version,
            refreshed_at_unix_ms: made_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
            home_region: self.home_region.clone(),
            files,
            indexes: self.table.key_names(),
        };
        let (manifest, mapped) = store.write(schema, &batches, manifest)?;
        *held = Some(manifest);
        Ok(mapped)
    }

    /// The replica's status for `/v1/datasets`.
    pub fn status(&self, upstream: &str) -> DatasetStatus {
        // The version first: `apply` counts a version before it publishes it.
        let snapshot = self.snapshot();
        let progress = self.progress();
        let rfc3339 = |t: SystemTime| {
            chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        DatasetStatus {
            name: self.config.name.clone(),
            source: format!("replica:{upstream}"),
            accelerated: true,
            state: if snapshot.is_some() { "ready" } else { "loading" },
            rows: snapshot.as_ref().map(|s| s.rows),
            bytes: snapshot.as_ref().map(|s| s.bytes),
            version: snapshot.as_ref().map(|s| s.version),
            last_refresh: snapshot.as_ref().map(|s| rfc3339(s.refreshed_at)),
            last_refresh_duration_ms: None,
            last_fetched_rows: None,
            last_error: progress.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_at: progress.last_error.as_ref().map(|(_, t)| rfc3339(*t)),
            staleness_seconds: snapshot.as_ref().map(|s| s.refreshed_at.elapsed().unwrap_or_default().as_secs_f64()),
            refresh_count: progress.status.snapshots + progress.status.increments,
            refresh_errors: 0,
            refresh_seconds_total: 0.0,
            replication: Some(progress.status.clone()),
            progress: self.work.report(),
            indexes: self.table.index_status(snapshot.as_deref()),
        }
    }
}

/// A version being received. Its frames are decoded and copied into buffers of their own
/// as they arrive, on a task of their own (so decoding overlaps receiving), and each frame
/// is dropped once decoded: the new version is held once, as its batches, not also as the
/// frames it came in (a 1 GB snapshot used to need 2 GB more while it was applied).
struct Incoming {
    begin: strata_proto::v1::VersionBegin,
    frames: usize,
    sender: Option<futures::channel::mpsc::Sender<Result<ArrowFrame, tonic::Status>>>,
    decoded: Option<tokio::task::JoinHandle<Result<Vec<RecordBatch>, StrataError>>>,
}

/// Frames received but not yet decoded, at most: the subscription waits beyond that.
const FRAMES_IN_FLIGHT: usize = 8;

impl Incoming {
    fn begin(begin: strata_proto::v1::VersionBegin, schema: SchemaRef) -> Self {
        let (sender, frames) = futures::channel::mpsc::channel(FRAMES_IN_FLIGHT);
        let decoded = tokio::spawn(async move {
            let batches = wire::decode_frames(frames, schema).map_ok(strata_core::accelerator::owned_copy);
            Ok(batches.try_collect::<Vec<_>>().await?)
        });
        Self { begin, frames: 0, sender: Some(sender), decoded: Some(decoded) }
    }

    /// Hands a frame to the decoder; false when the decoder has stopped (on an error).
    async fn push(&mut self, frame: ArrowFrame) -> bool {
        use futures::SinkExt;
        self.frames += 1;
        match self.sender.as_mut() {
            Some(sender) => sender.send(Ok(frame)).await.is_ok(),
            None => false,
        }
    }

    /// Every batch of the version, once its last frame is decoded; or why decoding failed.
    async fn finish(mut self) -> Result<(strata_proto::v1::VersionBegin, Vec<RecordBatch>), StrataError> {
        self.sender = None;
        let Some(decoded) = self.decoded.take() else {
            return Err(StrataError::Internal("replication: a version was finished twice".into()));
        };
        let batches = decoded
            .await
            .map_err(|e| StrataError::Internal(format!("replication: the frame decoder failed: {e}")))??;
        Ok((std::mem::take(&mut self.begin), batches))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // A version abandoned half-way (the subscription broke) stops decoding.
        if let Some(decoded) = &self.decoded {
            decoded.abort();
        }
    }
}

/// Rows of one Arrow IPC frame, from its flatbuffer header (the body is not decoded here).
fn frame_rows(frame: &ArrowFrame) -> u64 {
    arrow::ipc::root_as_message(&frame.data_header)
        .ok()
        .and_then(|m| m.header_as_record_batch())
        .map_or(0, |b| b.length().max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn a_bad_predicate_names_the_replica() {
        let schema = Arc::new(Schema::new(vec![Field::new("region", DataType::Utf8, true)]));
        let config = ReplicaConfig {
            name: "orders".into(),
            predicate: Some("nope = 1".into()),
            max_rate: None,
            max_staleness: None,
            on_stale: Default::default(),
            indexes: Vec::new(),
            stale_while_revalidate: None,
        };
        let err = Replica::new(config, schema).err().expect("must fail").to_string();
        assert!(err.contains("orders") && err.contains("nope"), "{err}");
    }
}
