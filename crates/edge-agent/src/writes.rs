//! Edge writes: durable in the local log before they are acknowledged, visible to local
//! queries at once, and uploaded to the platform in order until it confirms each batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use strata_core::StrataError;
use strata_core::accelerator::{AcceleratedTable, Snapshot};
use strata_core::config::EdgeConfig;
use strata_core::routing::QueryOptions;
use strata_core::writes::{LocalWrites, WriteReceipt};
use strata_proto::v1::IngestRequest;
use strata_upstream::{TierRouter, UpstreamClient, wire};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::log::{Entry, IngestLog, Recovery};

/// The write path of one edge agent.
pub struct EdgeWrites {
    config: EdgeConfig,
    log: Arc<IngestLog>,
    router: Arc<TierRouter>,
    /// Written and not yet confirmed by the platform, in sequence order.
    pending: Arc<Mutex<VecDeque<Entry>>>,
    /// Per writable dataset, the pending rows as a table local queries union in.
    tables: Mutex<Vec<(String, Arc<AcceleratedTable>)>>,
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EdgeWrites {
    pub fn new(config: EdgeConfig, log: IngestLog, recovery: Recovery, router: Arc<TierRouter>) -> Arc<Self> {
        let writes = Arc::new(Self {
            config,
            log: Arc::new(log),
            router,
            pending: Arc::new(Mutex::new(recovery.pending.into_iter().collect())),
            tables: Mutex::new(Vec::new()),
            wake: Notify::new(),
        });
        let datasets: Vec<String> = lock(&writes.pending).iter().map(|e| e.dataset.clone()).collect();
        for dataset in datasets {
            let schema = lock(&writes.pending)
                .iter()
                .find(|e| e.dataset == dataset)
                .and_then(|e| e.batches.first().map(|b| b.schema()));
            if let Some(schema) = schema {
                writes.table(&dataset, schema);
            }
        }
        writes
    }

    fn writable(&self, dataset: &str) -> Option<&String> {
        self.config.writable.iter().find(|w| w.eq_ignore_ascii_case(dataset))
    }

    /// The pending-rows table of `dataset`, created (and hooked into routing) on first use.
    fn table(&self, dataset: &str, schema: SchemaRef) -> Arc<AcceleratedTable> {
        let mut tables = lock(&self.tables);
        if let Some((_, t)) = tables.iter().find(|(n, _)| n.eq_ignore_ascii_case(dataset)) {
            return Arc::clone(t);
        }
        let table = Arc::new(AcceleratedTable::new(dataset, schema));
        tables.push((dataset.to_string(), Arc::clone(&table)));
        drop(tables);
        self.rebuild(dataset);
        self.router.add_local_writes(dataset, Arc::clone(&table) as Arc<dyn datafusion::catalog::TableProvider>);
        table
    }

    /// Makes the pending table of `dataset` hold exactly its unconfirmed rows.
    fn rebuild(&self, dataset: &str) {
        let Some(table) =
            lock(&self.tables).iter().find(|(n, _)| n.eq_ignore_ascii_case(dataset)).map(|(_, t)| Arc::clone(t))
        else {
            return;
        };
        let batches: Vec<RecordBatch> = lock(&self.pending)
            .iter()
            .filter(|e| e.dataset.eq_ignore_ascii_case(dataset))
            .flat_map(|e| e.batches.iter().cloned())
            .collect();
        let version = table.snapshot().map_or(1, |s| s.version + 1);
        table.swap(Snapshot::new(batches, version));
    }

    /// Ships pending batches in order until `shutdown`, retrying each until the platform confirms it.
    pub async fn upload(self: Arc<Self>, client: UpstreamClient, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let next = lock(&self.pending).front().cloned();
            let Some(entry) = next else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.wake.notified() => continue,
                }
            };
            let request = match self.request(&entry) {
                Ok(r) => r,
                Err(err) => {
                    warn!(seq = entry.seq, error = %err, "cannot encode a pending batch");
                    return;
                }
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = client.ingest(request) => outcome,
            };
            match outcome {
                Ok(response) => {
                    let log = Arc::clone(&self.log);
                    let seq = entry.seq;
                    match tokio::task::spawn_blocking(move || log.confirm(seq)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => {
                            warn!(seq, error = %err, "cannot record the upload; it will be retried (and not applied twice)")
                        }
                        Err(err) => warn!(seq, error = %err, "upload bookkeeping task failed"),
                    }
                    {
                        let mut pending = lock(&self.pending);
                        if pending.front().is_some_and(|e| e.seq == seq) {
                            pending.pop_front();
                        }
                    }
                    self.rebuild(&entry.dataset);
                    if response.duplicate {
                        info!(seq, "upload was a retry of an applied batch");
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(err) => {
                    warn!(seq = entry.seq, error = %err, retry_in_ms = backoff.as_millis() as u64, "upload failed; kept in the log");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn request(&self, entry: &Entry) -> Result<IngestRequest, StrataError> {
        let schema =
            entry.batches.first().map(|b| b.schema()).ok_or_else(|| StrataError::Internal("empty batch".into()))?;
        Ok(IngestRequest {
            edge_id: self.config.id.clone(),
            seq: entry.seq,
            dataset: entry.dataset.clone(),
            batch: wire::batches_to_ipc(&schema, &entry.batches)?,
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
        if let Some((_, t)) = lock(&self.tables).iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Ok(datafusion::catalog::TableProvider::schema(t.as_ref()));
        }
        self.router.upstream_schema(name).ok_or_else(|| StrataError::DatasetUnavailable {
            name: name.clone(),
            reason: "its columns are not known until the platform's catalog has been read once".into(),
        })
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
        // Appending and queueing under one lock keeps the upload order the log order.
        let seq = tokio::task::spawn_blocking(move || {
            let mut pending = lock(&pending);
            let entry = log.append(&n, &b)?;
            let seq = entry.seq;
            pending.push_back(entry);
            Ok::<_, StrataError>(seq)
        })
        .await
        .map_err(|e| StrataError::Internal(format!("write task failed: {e}")))??;
        self.rebuild(&name);
        drop(table);
        self.wake.notify_one();
        Ok(WriteReceipt { dataset: name, seq, rows })
    }
}
