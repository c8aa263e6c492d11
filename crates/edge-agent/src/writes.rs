//! Edge writes: durable in the local log before they are acknowledged (concurrent writers
//! share fsyncs), visible to local queries at once, and uploaded to the platform in order,
//! never before they are durable, until it confirms each batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use strata_core::StrataError;
use strata_core::config::EdgeConfig;
use strata_core::routing::QueryOptions;
use strata_core::writes::{LocalWrites, WriteReceipt};
use strata_proto::v1::{IngestBatch, IngestRequest};
use strata_upstream::{TierRouter, UpstreamClient, wire};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, info, warn};

use crate::dead_letter::DeadLetters;
use crate::log::{Entry, IngestLog, Recovery};
use crate::pending::PendingTable;

/// One upload carries at most this many batches ...
const MAX_UPLOAD_BATCHES: usize = 2048;
/// ... and at most about this many bytes of log records (a single larger batch goes alone).
const MAX_UPLOAD_BYTES: u64 = 8 << 20;

/// A write acknowledged and not yet confirmed upstream, with when it was accepted (the upload
/// lag is the age of the oldest).
struct Pending {
    entry: Entry,
    accepted: Instant,
}

/// The write path of one edge agent.
pub struct EdgeWrites {
    config: EdgeConfig,
    log: Arc<IngestLog>,
    router: Arc<TierRouter>,
    /// Written and not yet confirmed by the platform, in sequence order.
    pending: Arc<Mutex<VecDeque<Pending>>>,
    /// Per writable dataset, the pending rows as a table local queries union in.
    tables: Mutex<Vec<(String, Arc<PendingTable>)>>,
    wake: Notify,
    /// Batches the platform refused for good, kept aside so they block no later write.
    dead_letters: Arc<DeadLetters>,
}

/// Sleeps `backoff` (then doubles it, up to `max`) unless `shutdown` comes first; false
/// when it did and the caller should stop.
async fn back_off(backoff: &mut Duration, max: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(max);
    true
}

/// Whether the platform's refusal of an upload is final: retrying the same batch can only
/// be refused again (the dataset does not take edge writes there, or not these columns).
/// Anything else (unreachable, overloaded, its database down) is retried.
fn refused_for_good(err: &StrataError) -> bool {
    use strata_core::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::NotSupported
            | ErrorKind::UnknownDataset
            | ErrorKind::Plan
            | ErrorKind::InvalidRequest
            | ErrorKind::ReadOnly
            | ErrorKind::Parse
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EdgeWrites {
    pub fn new(
        config: EdgeConfig,
        log: IngestLog,
        recovery: Recovery,
        router: Arc<TierRouter>,
        dead_letters: DeadLetters,
    ) -> Arc<Self> {
        let writes = Arc::new(Self {
            dead_letters: Arc::new(dead_letters),
            config,
            log: Arc::new(log),
            router,
            pending: Arc::new(Mutex::new(VecDeque::new())),
            tables: Mutex::new(Vec::new()),
            wake: Notify::new(),
        });
        for entry in recovery.pending {
            if let Some(schema) = entry.batches.first().map(|b| b.schema()) {
                let table = writes.table(&entry.dataset, schema);
                if let Err(err) = table.push(entry.seq, &entry.batches) {
                    warn!(seq = entry.seq, error = %err, "a recovered write cannot be shown to local queries");
                }
            }
            // Its first acceptance was before the restart; the lag counts from when this
            // process took it over (the log keeps no wall time per record).
            lock(&writes.pending).push_back(Pending { entry, accepted: Instant::now() });
        }
        writes
    }

    fn writable(&self, dataset: &str) -> Option<&String> {
        self.config.writable.iter().find(|w| w.eq_ignore_ascii_case(dataset))
    }

    /// The pending-rows table of `dataset`, created (and hooked into routing) on first use.
    fn table(&self, dataset: &str, schema: SchemaRef) -> Arc<PendingTable> {
        let mut tables = lock(&self.tables);
        if let Some((_, t)) = tables.iter().find(|(n, _)| n.eq_ignore_ascii_case(dataset)) {
            return Arc::clone(t);
        }
        let table = PendingTable::new(schema);
        tables.push((dataset.to_string(), Arc::clone(&table)));
        drop(tables);
        self.router.add_local_writes(dataset, Arc::clone(&table) as Arc<dyn datafusion::catalog::TableProvider>);
        table
    }

    /// The oldest pending batches that are durable, as many as one upload carries (only
    /// the oldest one when `alone`).
    fn next_upload(&self, alone: bool) -> Vec<Entry> {
        let durable = self.log.synced_through();
        let pending = lock(&self.pending);
        let mut group = Vec::new();
        let mut bytes = 0;
        for entry in pending.iter().map(|p| &p.entry).take_while(|e| e.seq <= durable) {
            let full = alone || group.len() == MAX_UPLOAD_BATCHES || bytes + entry.bytes > MAX_UPLOAD_BYTES;
            if !group.is_empty() && full {
                break;
            }
            bytes += entry.bytes;
            group.push(entry.clone());
        }
        group
    }

    /// Forgets every write up to `seq` once the platform confirmed it.
    fn confirmed_through(&self, seq: u64) {
        let mut pending = lock(&self.pending);
        while pending.front().is_some_and(|p| p.entry.seq <= seq) {
            pending.pop_front();
        }
        for (_, table) in lock(&self.tables).iter() {
            table.confirm_through(seq);
        }
    }

    /// Ships pending batches in order until `shutdown`, retrying each group until the
    /// platform confirms it. A group the platform refuses for good is sent again one batch
    /// at a time, so the batch it refuses is found and set aside (see [`DeadLetters`]) and
    /// the writes after it, to this dataset or others, go on.
    pub async fn upload(self: Arc<Self>, client: UpstreamClient, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut alone = false;
        loop {
            let group = self.next_upload(alone);
            let Some(last) = group.last().map(|e| e.seq) else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.wake.notified() => continue,
                }
            };
            let first = group[0].seq;
            // One span per upload batch; the platform's ingest span is its child.
            let span =
                tracing::info_span!("edge_upload", first, last, batches = group.len(), rows = tracing::field::Empty);
            let request = match span.in_scope(|| self.request(&group)) {
                Ok(r) => r,
                Err(err) => {
                    warn!(first, last, error = %err, "cannot encode pending batches");
                    return;
                }
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = client.ingest(request).instrument(span.clone()) => outcome,
            };
            if let Ok(response) = &outcome {
                span.record("rows", response.rows);
            }
            drop(span);
            match outcome {
                Ok(response) => {
                    alone = false;
                    self.settle(last).await;
                    debug!(first, last, rows = response.rows, "uploaded");
                    if response.duplicates > 0 {
                        info!(
                            first,
                            last,
                            duplicates = response.duplicates,
                            "upload retried batches the platform had applied"
                        );
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(err) if refused_for_good(&err) && group.len() > 1 => {
                    info!(first, last, error = %err, "the platform refused an upload; sending its batches one at a time");
                    alone = true;
                }
                Err(err) if refused_for_good(&err) => {
                    let entry = &group[0];
                    let (letters, kept) = (Arc::clone(&self.dead_letters), entry.clone());
                    let reason = err.to_string();
                    match tokio::task::spawn_blocking(move || letters.store(&kept, &reason)).await {
                        Ok(Ok(())) => {
                            warn!(
                                seq = entry.seq,
                                dataset = %entry.dataset,
                                error = %err,
                                "the platform refused a write for good; it is kept in the dead-letter area and later writes go on"
                            );
                            alone = false;
                            self.settle(entry.seq).await;
                        }
                        _ => {
                            // Not set aside: it stays first in the log and is tried again.
                            warn!(seq = entry.seq, error = %err, "cannot set a refused write aside; retrying");
                            if !back_off(&mut backoff, Duration::from_secs(1), &shutdown).await {
                                return;
                            }
                        }
                    }
                }
                Err(err) => {
                    warn!(first, last, error = %err, retry_in_ms = backoff.as_millis() as u64, "upload failed; kept in the log");
                    if !back_off(&mut backoff, Duration::from_secs(1), &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Records that every batch up to `last` is settled (applied by the platform, or set
    /// aside): the log forgets them and local queries stop showing them as pending.
    async fn settle(&self, last: u64) {
        let log = Arc::clone(&self.log);
        match tokio::task::spawn_blocking(move || log.confirm(last)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(last, error = %err, "cannot record the upload; it will be retried (and not applied twice)")
            }
            Err(err) => warn!(last, error = %err, "upload bookkeeping task failed"),
        }
        self.confirmed_through(last);
    }

    /// Sends every batch of the dead-letter area once more, each alone with its original
    /// sequence number, retrying while the platform is unreachable: after a restart with the
    /// platform's config fixed they are delivered (at most once: the platform keeps every
    /// applied id); one still refused stays where it is.
    pub async fn retry_dead_letters(self: Arc<Self>, client: UpstreamClient, shutdown: CancellationToken) {
        let letters = Arc::clone(&self.dead_letters);
        let stored = match tokio::task::spawn_blocking(move || letters.stored()).await {
            Ok(Ok(stored)) => stored,
            Ok(Err(err)) => return warn!(error = %err, "cannot read the dead-letter area"),
            Err(err) => return warn!(error = %err, "dead-letter task failed"),
        };
        for entry in stored {
            let mut backoff = Duration::from_millis(200);
            loop {
                let request = match self.request(std::slice::from_ref(&entry)) {
                    Ok(r) => r,
                    Err(err) => {
                        warn!(seq = entry.seq, error = %err, "cannot encode a dead-lettered write");
                        break;
                    }
                };
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    outcome = client.ingest(request) => outcome,
                };
                match outcome {
                    Ok(_) => {
                        let (letters, done) = (Arc::clone(&self.dead_letters), entry.clone());
                        match tokio::task::spawn_blocking(move || letters.remove(&done)).await {
                            Ok(Ok(())) => {
                                info!(seq = entry.seq, dataset = %entry.dataset, "a dead-lettered write was accepted")
                            }
                            _ => warn!(seq = entry.seq, "a dead-lettered write was accepted but its file stays"),
                        }
                        break;
                    }
                    Err(err) if refused_for_good(&err) => {
                        debug!(seq = entry.seq, error = %err, "a dead-lettered write is still refused");
                        break;
                    }
                    Err(_) => {
                        if !back_off(&mut backoff, Duration::from_secs(5), &shutdown).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    fn request(&self, group: &[Entry]) -> Result<IngestRequest, StrataError> {
        let batches = group
            .iter()
            .map(|entry| {
                let schema = entry
                    .batches
                    .first()
                    .map(|b| b.schema())
                    .ok_or_else(|| StrataError::Internal("empty batch".into()))?;
                Ok(IngestBatch {
                    seq: entry.seq,
                    dataset: entry.dataset.clone(),
                    batch: wire::batches_to_ipc(&schema, &entry.batches)?,
                })
            })
            .collect::<Result<Vec<_>, StrataError>>()?;
        Ok(IngestRequest {
            edge_id: self.config.id.clone(),
            batches,
            context: Some(wire::context(&QueryOptions::default(), "edge", "", None)),
        })
    }

    /// Batches written and not yet confirmed.
    pub fn pending(&self) -> usize {
        lock(&self.pending).len()
    }
}

#[async_trait]
impl LocalWrites for EdgeWrites {
    fn schema(&self, dataset: &str) -> Result<SchemaRef, StrataError> {
        let Some(name) = self.writable(dataset) else {
            return Err(StrataError::NotSupported(format!(
                "dataset `{dataset}` is not writable here (edge.writable: {:?})",
                self.config.writable
            )));
        };
        // Refused here, before anything is acknowledged, when the platform says it takes no
        // edge writes into this dataset.
        if self.router.upstream_writable(name) == Some(false) {
            return Err(StrataError::NotSupported(format!(
                "dataset `{name}` is in edge.writable, but the platform does not accept edge writes to it \
                 (set `writable: true` on its dataset there)"
            )));
        }
        if let Some((_, t)) = lock(&self.tables).iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Ok(datafusion::catalog::TableProvider::schema(t.as_ref()));
        }
        self.router.upstream_schema(name).ok_or_else(|| StrataError::DatasetUnavailable {
            name: name.clone(),
            reason: "its columns are not known until the platform's catalog has been read once".into(),
        })
    }

    fn dead_letters(&self) -> Vec<strata_core::writes::DeadLetterStatus> {
        self.dead_letters.statuses()
    }

    fn backlog(&self) -> strata_core::writes::Backlog {
        let pending = lock(&self.pending);
        strata_core::writes::Backlog {
            records: pending.len() as u64,
            bytes: pending.iter().map(|p| p.entry.bytes).sum(),
            oldest_seconds: pending.front().map(|p| p.accepted.elapsed().as_secs_f64()),
        }
    }

    async fn write(&self, dataset: &str, batches: Vec<RecordBatch>) -> Result<WriteReceipt, StrataError> {
        let schema = self.schema(dataset)?;
        let name = self.writable(dataset).cloned().unwrap_or_else(|| dataset.to_string());
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        if batches.is_empty() {
            return Err(StrataError::Plan("the write holds no rows".into()));
        }
        let batches =
            batches.iter().map(|b| strata_core::writes::conform(b, &schema, &name)).collect::<Result<Vec<_>, _>>()?;
        let rows = batches.iter().map(RecordBatch::num_rows).sum::<usize>() as u64;
        let table = self.table(&name, schema);
        let (log, pending) = (Arc::clone(&self.log), Arc::clone(&self.pending));
        let (n, b) = (name.clone(), batches);
        // Appending and queueing under one lock keeps the upload order the log order, and a
        // write is visible locally before the uploader can confirm (and drop) it.
        let seq = tokio::task::spawn_blocking(move || {
            let seq = {
                let mut pending = lock(&pending);
                let entry = log.append_unsynced(&n, &b)?;
                let seq = entry.seq;
                if let Err(err) = table.push(seq, &entry.batches) {
                    warn!(seq, error = %err, "a write cannot be shown to local queries");
                }
                pending.push_back(Pending { entry, accepted: Instant::now() });
                seq
            };
            // Acknowledged only once durable; concurrent writers share one fsync.
            log.sync_through(seq)?;
            Ok::<_, StrataError>(seq)
        })
        .await
        .map_err(|e| StrataError::Internal(format!("write task failed: {e}")))??;
        self.wake.notify_one();
        Ok(WriteReceipt { dataset: name, seq, rows })
    }
}
