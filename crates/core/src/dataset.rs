//! One dataset at run time: its source, its accelerated copy, refresh, and the status the
//! HTTP API reports. Each dataset is loaded by its own task so a slow or unreachable source
//! delays only itself.

use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant, SystemTime};

use arrow::array::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::common::Column;
use datafusion::logical_expr::{Expr, lit};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Mutex;
use tracing::{Instrument, info, info_span, warn};

use crate::accelerator::{AcceleratedTable, Snapshot};
use crate::config::{AccelerationConfig, DatasetConfig, RefreshMode};
use crate::error::{Result, StrataError};
use crate::progress::{LOG_INTERVAL, WorkProgress};
use crate::refresh;

/// What `/v1/datasets` says about one dataset.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetStatus {
    pub name: String,
    pub source: String,
    pub accelerated: bool,
    /// `connecting` (source not reached yet), `loading`, `ready`, or `federated` (queried live).
    pub state: &'static str,
    pub rows: Option<usize>,
    pub bytes: Option<usize>,
    pub version: Option<u64>,
    /// RFC 3339 time of the last successful refresh.
    pub last_refresh: Option<String>,
    pub last_refresh_duration_ms: Option<u64>,
    /// Rows the last refresh read from the source (an append refresh reads only new rows).
    pub last_fetched_rows: Option<usize>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Seconds since the copy was last refreshed successfully.
    pub staleness_seconds: Option<f64>,
    pub refresh_count: u64,
    pub refresh_errors: u64,
    pub refresh_seconds_total: f64,
    /// For a replica: what replication from the upstream has done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,
    /// The load, refresh or snapshot running now, how far it got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::progress::ProgressReport>,
    /// The keys the copy is indexed on, with the memory each index holds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub indexes: Vec<IndexStatus>,
}

/// One index of an accelerated copy.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IndexStatus {
    pub columns: Vec<String>,
    /// Memory it holds (0 until the first load).
    pub bytes: usize,
}

/// How a replica keeps up with its upstream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicationStatus {
    /// The subset kept (`where:`), if any.
    pub predicate: Option<String>,
    /// Full snapshots received (1 after the first load, more only when an increment is impossible).
    pub snapshots: u64,
    /// Incremental versions (appends) received.
    pub increments: u64,
    /// Arrow bytes received over the wire.
    pub bytes_received: u64,
    /// Whether the version stream from the upstream is open now.
    pub streaming: bool,
    /// Times the version stream broke and was resumed.
    pub interruptions: u64,
    /// The newest version the upstream advertises (its catalog, re-read every
    /// `upstream.catalog_interval`); with `version`, how far behind this copy is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_version: Option<u64>,
}

#[derive(Debug, Default)]
struct Progress {
    connected: bool,
    last_fetched_rows: Option<usize>,
    last_refresh_duration: Option<Duration>,
    last_error: Option<(String, SystemTime)>,
    refresh_count: u64,
    refresh_errors: u64,
    refresh_seconds_total: f64,
}

/// A configured dataset and, once its source is reached, its provider.
pub struct Dataset {
    pub config: DatasetConfig,
    source: StdMutex<Option<Arc<dyn TableProvider>>>,
    accelerated: StdMutex<Option<Arc<AcceleratedTable>>>,
    progress: StdMutex<Progress>,
    /// The load or refresh running now.
    work: WorkProgress,
    /// Serializes refreshes of this dataset (interval and on-demand).
    refresh_lock: Mutex<()>,
    /// Set after the first attempt to connect (and load), successful or not; readiness waits for it.
    pub(crate) tried: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Dataset {
    pub fn new(config: DatasetConfig) -> Self {
        Self {
            config,
            source: StdMutex::new(None),
            accelerated: StdMutex::new(None),
            progress: StdMutex::new(Progress::default()),
            work: WorkProgress::default(),
            refresh_lock: Mutex::new(()),
            tried: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The provider queries use: the accelerated copy, or the live source.
    pub fn provider(&self) -> Option<Arc<dyn TableProvider>> {
        if self.config.accelerated().is_some() {
            lock(&self.accelerated).clone().map(|t| t as Arc<dyn TableProvider>)
        } else {
            lock(&self.source).clone()
        }
    }

    /// Appends rows written elsewhere (edge uploads already committed to the source) to the
    /// accelerated copy, as a new version, so readers and replicas see them without waiting
    /// for the next refresh. Serialized with refreshes.
    pub async fn append_rows(&self, batches: Vec<RecordBatch>) {
        let Some(table) = self.accelerated_table() else { return };
        let _guard = self.refresh_lock.lock().await;
        if let Some(current) = table.snapshot() {
            let version = current.version + 1;
            table.swap(Snapshot::appended(&current, batches, version));
        }
    }

    /// The accelerated copy, once the source is connected.
    pub fn accelerated_table(&self) -> Option<Arc<AcceleratedTable>> {
        lock(&self.accelerated).clone()
    }

    /// The current accelerated snapshot, if any.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        lock(&self.accelerated).as_ref().and_then(|t| t.snapshot())
    }

    /// True once the source has been reached and the dataset registered.
    pub fn is_connected(&self) -> bool {
        lock(&self.source).is_some()
    }

    /// True once the dataset can answer queries.
    pub fn is_loaded(&self) -> bool {
        match self.config.accelerated() {
            Some(_) => self.snapshot().is_some(),
            None => lock(&self.source).is_some(),
        }
    }

    /// Why the dataset cannot answer yet, for error messages.
    pub fn unavailable_reason(&self) -> String {
        let progress = lock(&self.progress);
        match (&progress.last_error, progress.connected) {
            (Some((err, _)), _) => err.clone(),
            (None, false) => "its source has not been reached yet".into(),
            (None, true) => "its first load has not finished".into(),
        }
    }

    /// Opens the source and registers the dataset's provider in `ctx`.
    pub async fn connect(&self, ctx: &SessionContext, connector: &crate::source::SourceConnector) -> Result<()> {
        let source = match connector.open(ctx, &self.config).await {
            Ok(source) => source,
            Err(err) => {
                self.record_error(&err);
                return Err(err);
            }
        };
        let provider: Arc<dyn TableProvider> = if let Some(acc) = self.config.accelerated() {
            let schema = source.schema();
            let keys = acc
                .index_keys(self.name())
                .iter()
                .map(|(what, columns)| crate::key_index::KeySpec::resolve(columns, &schema, what))
                .collect::<Result<Vec<_>>>();
            let keys = match keys {
                Ok(keys) => keys,
                Err(err) => {
                    self.record_error(&err);
                    return Err(err);
                }
            };
            let table = Arc::new(
                AcceleratedTable::new(self.name(), schema)
                    .with_indexes(keys)
                    .with_stale_while_revalidate(acc.stale_while_revalidate),
            );
            *lock(&self.accelerated) = Some(Arc::clone(&table));
            table
        } else {
            Arc::clone(&source)
        };
        *lock(&self.source) = Some(source);
        lock(&self.progress).connected = true;
        ctx.register_table(self.name(), provider)?;
        crate::generation::advance();
        Ok(())
    }

    /// Refreshes the accelerated copy from the source. On failure the last good copy keeps
    /// serving and the error is recorded with its time.
    pub async fn refresh(&self, ctx: &SessionContext) -> Result<DatasetStatus> {
        let Some(acc) = self.config.accelerated().cloned() else {
            return Err(StrataError::NotSupported(format!("dataset `{}` is not accelerated", self.name())));
        };
        let (Some(source), Some(table)) = (lock(&self.source).clone(), lock(&self.accelerated).clone()) else {
            return Err(StrataError::DatasetUnavailable {
                name: self.name().to_string(),
                reason: self.unavailable_reason(),
            });
        };
        let _guard = self.refresh_lock.lock().await;
        let started = Instant::now();
        let span = info_span!("refresh", dataset = %self.name(), mode = ?acc.refresh);
        let phase = if table.snapshot().is_some() { "refresh" } else { "load" };
        let outcome = self.refresh_once(ctx, &acc, source, &table, phase).instrument(span).await;
        self.work.finish();
        let outcome = outcome.map_err(|err| match err {
            // Anything that fails while reading the source is the source's failure (503), with
            // the dataset named, not an internal error.
            StrataError::Execution(message) => StrataError::Source { dataset: self.name().to_string(), message },
            other => other,
        });
        let elapsed = started.elapsed();
        {
            let mut p = lock(&self.progress);
            p.refresh_count += 1;
            p.refresh_seconds_total += elapsed.as_secs_f64();
            p.last_refresh_duration = Some(elapsed);
            match &outcome {
                Ok(fetched) => {
                    p.last_fetched_rows = Some(*fetched);
                    p.last_error = None;
                }
                Err(err) => {
                    p.refresh_errors += 1;
                    p.last_error = Some((err.to_string(), SystemTime::now()));
                }
            }
        }
        match outcome {
            Ok(fetched) => {
                info!(dataset = %self.name(), fetched, ms = elapsed.as_millis() as u64, "refreshed");
                Ok(self.status())
            }
            Err(err) => {
                warn!(dataset = %self.name(), error = %err, "refresh failed; serving the last good copy");
                Err(err)
            }
        }
    }

    /// Returns how many rows were read from the source.
    async fn refresh_once(
        &self,
        ctx: &SessionContext,
        acc: &AccelerationConfig,
        source: Arc<dyn TableProvider>,
        table: &AcceleratedTable,
        phase: &'static str,
    ) -> Result<usize> {
        let read = |filter| {
            Read { ctx, source: Arc::clone(&source), filter, progress: &self.work, phase, dataset: self.name() }.run()
        };
        let previous = table.snapshot();
        let next_version = previous.as_ref().map_or(1, |s| s.version + 1);
        let time_column = acc.time_column.as_deref();
        // Rows added by an append refresh, when it only appended (published as an increment).
        let mut appended: Option<Vec<RecordBatch>> = None;
        let (mut batches, fetched, changed) = match (acc.refresh, &previous, time_column) {
            (RefreshMode::Append, Some(prev), Some(tc)) => match refresh::watermark(&prev.batches, tc)? {
                None => {
                    let batches = read(None).await?;
                    let n = count(&batches);
                    (batches, n, true)
                }
                Some(mark) => {
                    let cutoff = refresh::shift_back(&mark, acc.append_overlap)?;
                    let column = Expr::Column(Column::new_unqualified(tc));
                    let fetched = read(Some(column.gt_eq(lit(cutoff.clone())))).await?;
                    let n = count(&fetched);
                    let tail = refresh::keep_since(&prev.batches, tc, &cutoff)?;
                    let schema = table.schema();
                    let mut batches = prev.batches.clone();
                    let added = refresh::new_rows(&schema, &tail, &fetched, &acc.primary_key)?;
                    let changed = added.is_some();
                    appended = Some(added.iter().cloned().collect());
                    batches.extend(added);
                    (batches, n, changed)
                }
            },
            _ => {
                let batches = read(None).await?;
                let n = count(&batches);
                (batches, n, true)
            }
        };
        let mut changed = changed;
        if let (Some(retention), Some(tc)) = (acc.retention, time_column) {
            let data_type = table
                .schema()
                .field_with_name(tc)
                .map_err(|_| {
                    StrataError::Config(format!("dataset `{}`: time_column `{tc}` is not a column", self.name()))
                })?
                .data_type()
                .clone();
            let cutoff = refresh::age_cutoff(&data_type, retention, SystemTime::now())?;
            let before = count(&batches);
            batches = refresh::keep_since(&batches, tc, &cutoff)?;
            if count(&batches) != before {
                changed = true;
                appended = None;
            }
        }
        if let (true, Some(added), Some(prev)) = (changed, appended, &previous) {
            table.swap(Snapshot::appended(prev, added, next_version));
        } else if changed || previous.is_none() {
            table.swap(Snapshot::new(batches, next_version));
        } else if let Some(prev) = previous {
            // Nothing new: keep the version, but record that the copy was confirmed fresh.
            table.swap(Snapshot::confirmed(&prev));
        }
        Ok(fetched)
    }

    fn record_error(&self, err: &StrataError) {
        let mut p = lock(&self.progress);
        p.last_error = Some((err.to_string(), SystemTime::now()));
    }

    /// The dataset's status for the HTTP API and metrics.
    pub fn status(&self) -> DatasetStatus {
        let snapshot = self.snapshot();
        let p = lock(&self.progress);
        let accelerated = self.config.accelerated().is_some();
        let state = match (accelerated, p.connected, snapshot.is_some()) {
            (_, false, _) => "connecting",
            (true, true, false) => "loading",
            (true, true, true) => "ready",
            (false, true, _) => "federated",
        };
        DatasetStatus {
            name: self.config.name.clone(),
            source: self.config.from.to_string(),
            accelerated,
            state,
            rows: snapshot.as_ref().map(|s| s.rows),
            bytes: snapshot.as_ref().map(|s| s.bytes),
            version: snapshot.as_ref().map(|s| s.version),
            last_refresh: snapshot.as_ref().map(|s| rfc3339(s.refreshed_at)),
            last_refresh_duration_ms: p.last_refresh_duration.map(|d| d.as_millis() as u64),
            last_fetched_rows: p.last_fetched_rows,
            last_error: p.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_at: p.last_error.as_ref().map(|(_, t)| rfc3339(*t)),
            staleness_seconds: snapshot.as_ref().map(|s| s.refreshed_at.elapsed().unwrap_or_default().as_secs_f64()),
            refresh_count: p.refresh_count,
            refresh_errors: p.refresh_errors,
            refresh_seconds_total: p.refresh_seconds_total,
            replication: None,
            progress: self.work.report(),
            indexes: self.accelerated_table().map(|t| t.index_status(snapshot.as_deref())).unwrap_or_default(),
        }
    }

    /// How often the background task refreshes, if at all.
    pub fn refresh_interval(&self) -> Option<Duration> {
        self.config.accelerated().and_then(|a| a.refresh_interval)
    }
}

fn count(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// One read of a dataset's source for a load or refresh.
struct Read<'a> {
    ctx: &'a SessionContext,
    source: Arc<dyn TableProvider>,
    filter: Option<Expr>,
    progress: &'a WorkProgress,
    phase: &'static str,
    dataset: &'a str,
}

impl Read<'_> {
    /// Reads the source through DataFusion so the filter is pushed into the source's own
    /// query, counting rows and bytes as they arrive (with the total when the plan's
    /// statistics know it: Parquet footers do, PostgreSQL does not) and logging how far it
    /// got every [`LOG_INTERVAL`].
    ///
    /// The scan's partitions are read in parallel, each in its own task, and their batches
    /// kept in the source's order: partition after partition, each in its own order (a
    /// file's partitions are consecutive ranges of it, read without work stealing). A file
    /// written in key or time order so becomes a copy in that order, whose batches each
    /// cover a narrow range of the key (what zone maps and runtime filters skip by), and a
    /// load is the same copy every time; merged as they arrived, the partitions' batches
    /// interleaved.
    async fn run(self) -> Result<Vec<RecordBatch>> {
        let mut df = self.ctx.read_table(self.source)?;
        if let Some(filter) = self.filter {
            df = df.filter(filter)?;
        }
        // Each partition reads its own range of the files: with work stealing (DataFusion's
        // default) a partition that finishes early takes row groups from another's range,
        // and the order across partitions is lost.
        let task_ctx = df.task_ctx();
        let mut session = task_ctx.session_config().clone();
        session.options_mut().execution.enable_file_stream_work_stealing = false;
        let task_ctx = Arc::new(task_ctx.with_session_config(session));
        let plan = df.create_physical_plan().await?;
        let expected = {
            use datafusion::physical_plan::{StatisticsArgs, StatisticsContext};
            let stats = StatisticsContext::default().compute(plan.as_ref(), &StatisticsArgs::new()).ok();
            stats.and_then(|s| s.num_rows.get_value().map(|n| *n as u64))
        };
        self.progress.start(self.phase, expected);
        let streams = datafusion::physical_plan::execute_stream_partitioned(plan, task_ctx)?;
        let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); streams.len()];
        let (sender, mut arrived) = tokio::sync::mpsc::channel(2 * streams.len().max(1));
        // Dropped on return (an error, a cancelled refresh): the readers stop with it.
        let mut readers = datafusion::common::runtime::JoinSet::new();
        for (partition, mut stream) in streams.into_iter().enumerate() {
            let sender = sender.clone();
            readers.spawn(async move {
                while let Some(batch) = stream.next().await {
                    let failed = batch.is_err();
                    if sender.send((partition, batch)).await.is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(sender);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + LOG_INTERVAL, LOG_INTERVAL);
        loop {
            tokio::select! {
                next = arrived.recv() => match next {
                    Some((partition, batch)) => {
                        let batch = batch?;
                        self.progress.add(batch.num_rows() as u64, batch.get_array_memory_size() as u64);
                        parts[partition].push(batch);
                    }
                    None => {
                        // Every reader has ended; one that panicked ended without its rows.
                        while let Some(joined) = readers.join_next().await {
                            joined.map_err(|e| StrataError::Internal(format!("a reader of the source failed: {e}")))?;
                        }
                        return Ok(parts.into_iter().flatten().collect());
                    }
                },
                _ = tick.tick() => {
                    if let Some(p) = self.progress.report() {
                        info!(
                            dataset = %self.dataset,
                            phase = p.phase,
                            rows = p.rows_read,
                            bytes = p.bytes_read,
                            rows_per_second = p.rows_per_second.round(),
                            expected_rows = p.expected_rows,
                            eta_seconds = p.eta_seconds.map(f64::round),
                            "reading the source"
                        );
                    }
                }
            }
        }
    }
}
