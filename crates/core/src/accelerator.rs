//! The in-memory Arrow accelerator: a dataset's local copy as immutable snapshots.
//!
//! A refresh builds a complete new snapshot and swaps one `Arc`, so a query sees either the
//! old copy or the new one, never an empty or half-loaded table; queries already running
//! keep the snapshot they started with.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use crate::error::StrataError;
use crate::key_index::{KeyIndex, KeySpec};
use crate::zone_map::{BatchZone, ZoneMaps};
use crate::zone_scan::{PartitionZones, ZoneMappedSource};

/// One immutable version of an accelerated dataset.
#[derive(Debug)]
pub struct Snapshot {
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    /// Arrow buffer memory held by the batches.
    pub bytes: usize,
    /// Increases by one with every change of content.
    pub version: u64,
    /// What the results cache keys answers by: unique in this process and never reused for
    /// other content (a refresh that found nothing new keeps it, so cached answers stay good).
    pub id: u64,
    pub refreshed_at: SystemTime,
    /// Earlier versions this one only appended to, as (version, its batch count), oldest
    /// first: a subscriber holding one of them needs just the batches after that count.
    pub lineage: Vec<(u64, usize)>,
    /// Per-batch min/max, so scans skip the batches their filters rule out.
    pub zones: ZoneMaps,
    /// Hash indexes on the table's declared keys, built when the snapshot is published
    /// ([`AcceleratedTable::swap`]).
    pub indexes: Vec<Arc<KeyIndex>>,
}

/// How many earlier versions a snapshot remembers for incremental publishing.
const MAX_LINEAGE: usize = 256;

/// `batch` with every string/binary view column that holds data buffers it does not use
/// rewritten to hold only its own bytes. A Parquet reader's view arrays point into whole
/// decoded pages shared by many batches (short strings are inlined and need no buffer at
/// all); kept as they are, a copy would pin those pages, and a one-row answer sliced from it
/// would carry them onto the wire.
pub fn compact_views(batch: RecordBatch) -> RecordBatch {
    use arrow::array::{Array, ArrayRef, AsArray};
    use arrow::datatypes::DataType;
    /// Unused bytes a view column may keep before it is worth copying.
    const SLACK: usize = 64 * 1024;
    let wasteful = |col: &ArrayRef| match col.data_type() {
        DataType::Utf8View => {
            let a = col.as_string_view();
            a.data_buffers().iter().map(|b| b.len()).sum::<usize>() > a.total_buffer_bytes_used() * 2 + SLACK
        }
        DataType::BinaryView => {
            let a = col.as_binary_view();
            a.data_buffers().iter().map(|b| b.len()).sum::<usize>() > a.total_buffer_bytes_used() * 2 + SLACK
        }
        _ => false,
    };
    if !batch.columns().iter().any(wasteful) {
        return batch;
    }
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View if wasteful(c) => std::sync::Arc::new(c.as_string_view().gc()) as ArrayRef,
            DataType::BinaryView if wasteful(c) => std::sync::Arc::new(c.as_binary_view().gc()) as ArrayRef,
            _ => std::sync::Arc::clone(c),
        })
        .collect();
    RecordBatch::try_new(batch.schema(), columns).unwrap_or(batch)
}

/// `batch` copied into buffers of its own, each exactly as large as its rows need. Arrays
/// decoded from received IPC frames point into the transport's receive buffers, which are
/// larger than the rows and would stay allocated as long as a replica holds the batch
/// (measured: a replica's RSS at 1.5x its Arrow size). View columns are copied too: with
/// every string inlined, `gc` keeps the received views buffer, and so the whole frame.
pub fn owned_copy(batch: RecordBatch) -> RecordBatch {
    use arrow::array::{ArrayRef, AsArray, MutableArrayData, make_array};
    use arrow::datatypes::DataType;
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| {
            // Only the string bytes the rows use, in fresh buffers (views still copied below).
            let gc = match c.data_type() {
                DataType::Utf8View => std::sync::Arc::new(c.as_string_view().gc()) as ArrayRef,
                DataType::BinaryView => std::sync::Arc::new(c.as_binary_view().gc()) as ArrayRef,
                _ => std::sync::Arc::clone(c),
            };
            let data = gc.to_data();
            let mut copy = MutableArrayData::new(vec![&data], false, data.len());
            match copy.try_extend(0, 0, data.len()) {
                Ok(()) => make_array(copy.freeze()),
                Err(_) => gc,
            }
        })
        .collect();
    RecordBatch::try_new(batch.schema(), columns).unwrap_or(batch)
}

impl Snapshot {
    /// A snapshot over `batches` (their view columns compacted, see [`compact_views`]), with
    /// row and byte counts derived from them.
    pub fn new(batches: Vec<RecordBatch>, version: u64) -> Self {
        Self::with_known_zones(batches.into_iter().map(compact_views).collect(), version, &[])
    }

    /// [`Snapshot::new`], taking the zone maps of leading batches from `known`.
    fn with_known_zones(batches: Vec<RecordBatch>, version: u64, known: &[Arc<BatchZone>]) -> Self {
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        let rows = batches.iter().map(RecordBatch::num_rows).sum();
        let bytes = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let zones = ZoneMaps::new(known);
        Self {
            batches,
            rows,
            bytes,
            version,
            id,
            refreshed_at: SystemTime::now(),
            lineage: Vec::new(),
            zones,
            indexes: Vec::new(),
        }
    }

    /// `previous` plus `added` rows as `version`, remembering that it only appended.
    pub fn appended(previous: &Snapshot, added: Vec<RecordBatch>, version: u64) -> Self {
        let mut batches = previous.batches.clone();
        batches.extend(added.into_iter().map(compact_views));
        let mut next = Self::with_known_zones(batches, version, previous.zones.zones());
        next.lineage = previous.lineage.clone();
        next.lineage.push((previous.version, previous.batches.len()));
        if next.lineage.len() > MAX_LINEAGE {
            next.lineage.drain(..next.lineage.len() - MAX_LINEAGE);
        }
        next
    }

    /// The same content as a new snapshot (a refresh that found nothing new), keeping the
    /// version, its lineage and its zone maps.
    pub fn confirmed(previous: &Snapshot) -> Self {
        let mut same = Self::with_known_zones(previous.batches.clone(), previous.version, previous.zones.zones());
        same.lineage = previous.lineage.clone();
        same.id = previous.id;
        same
    }

    /// Sets when this version was made (a replica keeps its upstream's time, so its age is honest).
    pub fn made_at(mut self, at: SystemTime) -> Self {
        self.refreshed_at = at;
        self
    }

    /// The index whose key is exactly `columns` (positions in the table's schema, any order).
    pub fn index_on(&self, columns: &[usize]) -> Option<&KeyIndex> {
        self.indexes.iter().map(Arc::as_ref).find(|i| i.spec().covers_exactly(columns))
    }

    /// The batches a holder of `version` lacks, if this snapshot only appended to it.
    pub fn appended_since(&self, version: u64) -> Option<&[RecordBatch]> {
        self.lineage.iter().find(|(v, _)| *v == version).map(|(_, count)| &self.batches[*count..])
    }
}

/// A table provider serving the current snapshot of one dataset.
#[derive(Debug)]
pub struct AcceleratedTable {
    name: String,
    schema: SchemaRef,
    current: RwLock<Option<Arc<Snapshot>>>,
    /// The current version, for subscribers waiting on the next one (0 = not loaded).
    changes: tokio::sync::watch::Sender<u64>,
    /// Random per copy: versions are only comparable within one epoch, so a subscriber that
    /// held versions of another process's copy (a restarted or a second platform) starts over.
    epoch: u64,
    /// The keys every snapshot is indexed on.
    keys: Vec<KeySpec>,
    /// The snapshot the current one replaced, for serving cached answers a little stale.
    replaced: RwLock<Option<Replaced>>,
    /// How long after a new snapshot the results cache may still answer from the one it
    /// replaced (while it computes the new answer): `stale_while_revalidate` in the config.
    stale_while_revalidate: Option<std::time::Duration>,
}

/// The snapshot a newer one replaced: what a stale cached answer read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replaced {
    /// Its [`Snapshot::id`].
    pub id: u64,
    pub version: u64,
    /// When it was made (its age on an answer).
    pub made_at: SystemTime,
    /// When the newer snapshot took its place: how stale an answer from it is.
    pub at: SystemTime,
}

impl AcceleratedTable {
    /// An accelerated table that is not loaded yet: queries fail with "still loading".
    pub fn new(name: impl Into<String>, schema: SchemaRef) -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded randomly per instance: a cheap unique id without a rand dependency.
        let epoch = std::collections::hash_map::RandomState::new().build_hasher().finish().max(1);
        Self {
            name: name.into(),
            schema,
            current: RwLock::new(None),
            changes: tokio::sync::watch::channel(0).0,
            epoch,
            keys: Vec::new(),
            replaced: RwLock::new(None),
            stale_while_revalidate: None,
        }
    }

    /// The same table, whose cached answers may be served up to `window` after a new
    /// snapshot replaced the one they read (see [`crate::results_cache`]).
    pub fn with_stale_while_revalidate(mut self, window: Option<std::time::Duration>) -> Self {
        self.stale_while_revalidate = window;
        self
    }

    pub fn stale_while_revalidate(&self) -> Option<std::time::Duration> {
        self.stale_while_revalidate
    }

    /// The snapshot the current one replaced, and when.
    pub fn replaced(&self) -> Option<Replaced> {
        *self.replaced.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same table with every snapshot indexed on `keys` (see [`crate::key_index`]).
    pub fn with_indexes(mut self, keys: Vec<KeySpec>) -> Self {
        self.keys = keys;
        self
    }

    /// Each key's columns and the memory its index holds in `snapshot`.
    pub fn index_status(&self, snapshot: Option<&Snapshot>) -> Vec<crate::dataset::IndexStatus> {
        self.keys
            .iter()
            .zip(self.key_names())
            .map(|(key, columns)| crate::dataset::IndexStatus {
                columns,
                bytes: snapshot.and_then(|s| s.index_on(&key.columns)).map_or(0, KeyIndex::bytes),
            })
            .collect()
    }

    /// The same keys as column names.
    pub fn key_names(&self) -> Vec<Vec<String>> {
        self.keys.iter().map(|k| k.columns.iter().map(|&c| self.schema.field(c).name().clone()).collect()).collect()
    }

    pub fn schema_ref(&self) -> &SchemaRef {
        &self.schema
    }

    /// The snapshot queries read now, if the first load has finished.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes a new snapshot atomically, indexed on the table's keys first (an index
    /// is copied and extended from the current snapshot's when the new one only appended).
    pub fn swap(&self, mut snapshot: Snapshot) -> Arc<Snapshot> {
        if !self.keys.is_empty() {
            let previous = self.snapshot();
            let previous = previous.as_deref().map(|p| (p.batches.as_slice(), p.indexes.as_slice()));
            match crate::key_index::indexes_for(&self.keys, &snapshot.batches, previous) {
                Ok(indexes) => snapshot.indexes = indexes,
                Err(err) => tracing::warn!(dataset = %self.name, error = %err, "serving without its indexes"),
            }
        }
        let snapshot = Arc::new(snapshot);
        let previous = self.current.write().unwrap_or_else(|p| p.into_inner()).replace(Arc::clone(&snapshot));
        if let Some(previous) = previous.filter(|p| p.id != snapshot.id) {
            let replaced = Replaced {
                id: previous.id,
                version: previous.version,
                made_at: previous.refreshed_at,
                at: SystemTime::now(),
            };
            *self.replaced.write().unwrap_or_else(|p| p.into_inner()) = Some(replaced);
        }
        crate::generation::advance();
        self.changes.send_replace(snapshot.version);
        snapshot
    }

    /// The epoch versions of this copy belong to (never 0).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Notified with the version after every swap.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[async_trait]
impl TableProvider for AcceleratedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Filters prune batches by their zone maps; DataFusion still applies them to the rows.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let snapshot = self.snapshot().ok_or_else(|| StrataError::DatasetUnavailable {
            name: self.name.clone(),
            reason: "its first load has not finished".into(),
        })?;
        if filters.is_empty() {
            let bounds = snapshot.zones.column_statistics(&self.schema, &snapshot.batches, None);
            let zones = snapshot.zones.zones();
            return bounded_scan(state, &self.schema, &snapshot.batches, zones, projection, limit, bounds);
        }
        let keep = snapshot.zones.keep(state, &self.schema, &snapshot.batches, filters);
        let bounds = snapshot.zones.column_statistics(&self.schema, &snapshot.batches, Some(&keep));
        let zones = snapshot.zones.zones();
        let kept = |i: usize| keep.get(i).copied().unwrap_or(false);
        let batches: Vec<RecordBatch> =
            snapshot.batches.iter().enumerate().filter(|(i, _)| kept(*i)).map(|(_, b)| b.clone()).collect();
        let zones: Vec<Arc<BatchZone>> =
            zones.iter().enumerate().filter(|(i, _)| kept(*i)).map(|(_, z)| Arc::clone(z)).collect();
        bounded_scan(state, &self.schema, &batches, &zones, projection, limit, bounds)
    }
}

/// [`memory_scan`] that reports the columns' bounds to the planner and skips batches by
/// runtime filters (see [`crate::zone_scan`]).
fn bounded_scan(
    state: &dyn Session,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    zones: &[Arc<BatchZone>],
    projection: Option<&Vec<usize>>,
    limit: Option<usize>,
    bounds: Arc<Vec<datafusion::common::ColumnStatistics>>,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    let partitions = partition_count(state, batches.len());
    let source = memory_source(schema, batches, partitions, projection, limit)?;
    // Zones not (yet) known for every batch: the scan does without them.
    let zones = PartitionZones {
        table_schema: Arc::clone(schema),
        partitions: if zones.len() == batches.len() { round_robin(zones, partitions) } else { Vec::new() },
    };
    Ok(datafusion::datasource::source::DataSourceExec::from_data_source(ZoneMappedSource::new(source, bounds, zones)))
}

/// A scan over batches held in memory, spread round-robin so every core gets a share (each
/// partition reads its batches in the snapshot's order).
pub fn memory_scan(
    state: &dyn Session,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    projection: Option<&Vec<usize>>,
    limit: Option<usize>,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    let source = memory_source(schema, batches, partition_count(state, batches.len()), projection, limit)?;
    Ok(datafusion::datasource::source::DataSourceExec::from_data_source(source))
}

/// One partition per core, but no more than there are batches.
fn partition_count(state: &dyn Session, batches: usize) -> usize {
    state.config().target_partitions().max(1).min(batches.max(1))
}

/// `items` dealt into `partitions` lists in turn, each keeping their order.
fn round_robin<T: Clone>(items: &[T], partitions: usize) -> Vec<Vec<T>> {
    let mut parts: Vec<Vec<T>> = vec![Vec::new(); partitions.max(1)];
    let count = parts.len();
    for (i, item) in items.iter().enumerate() {
        parts[i % count].push(item.clone());
    }
    parts
}

fn memory_source(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    partitions: usize,
    projection: Option<&Vec<usize>>,
    limit: Option<usize>,
) -> DfResult<MemorySourceConfig> {
    let parts = round_robin(batches, partitions);
    Ok(MemorySourceConfig::try_new(&parts, Arc::clone(schema), projection.cloned())?.with_limit(limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    /// 3 batches of 100 rows, ids 0..300 in order.
    fn table() -> Arc<AcceleratedTable> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, false),
        ]));
        let batches = (0..3)
            .map(|b| {
                let ids: Vec<i64> = (b * 100..b * 100 + 100).collect();
                let vs: Vec<String> = ids.iter().map(|i| format!("v{i}")).collect();
                RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(vs))],
                )
                .expect("batch")
            })
            .collect();
        let table = Arc::new(AcceleratedTable::new("t", schema));
        table.swap(Snapshot::new(batches, 1));
        table
    }

    #[test]
    fn a_new_snapshot_remembers_the_one_it_replaced_and_a_confirmed_one_keeps_its_identity() {
        let table = table();
        assert_eq!(table.replaced(), None);
        let first = table.snapshot().expect("loaded");
        // Nothing new: the same content keeps the id the results cache keys answers by.
        let confirmed = table.swap(Snapshot::confirmed(&first));
        assert_eq!((confirmed.id, confirmed.version), (first.id, 1));
        assert_eq!(table.replaced(), None, "a confirmation replaces nothing");
        let second = table.swap(Snapshot::new(first.batches[..1].to_vec(), 2));
        assert_ne!(second.id, first.id);
        let replaced = table.replaced().expect("replaced");
        // Its age counts from when it was last confirmed fresh.
        assert_eq!((replaced.id, replaced.version, replaced.made_at), (first.id, 1, confirmed.refreshed_at));
        assert!(replaced.at >= confirmed.refreshed_at);
    }

    async fn rows(ctx: &SessionContext, sql: &str) -> Vec<String> {
        let batches = ctx.sql(sql).await.expect("plan").collect().await.expect("run");
        arrow::util::pretty::pretty_format_batches(&batches)
            .expect("format")
            .to_string()
            .lines()
            .map(String::from)
            .collect()
    }

    #[tokio::test]
    async fn lookups_read_only_the_batch_holding_the_key() {
        let table = table();
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::clone(&table) as Arc<dyn TableProvider>).expect("register");
        let filter = datafusion::logical_expr::col("id").eq(datafusion::logical_expr::lit(150i64));
        let plan = table.scan(&ctx.state(), None, &[filter], None).await.expect("scan");
        let scanned = datafusion::physical_plan::collect(plan, ctx.task_ctx()).await.expect("collect");
        assert_eq!(scanned.iter().map(RecordBatch::num_rows).sum::<usize>(), 100, "one batch of three");

        // The filter still applies to the rows of the kept batches: answers are exact.
        assert_eq!(rows(&ctx, "SELECT v FROM t WHERE id = 150").await[3], "| v150 |");
        assert_eq!(rows(&ctx, "SELECT count(*) AS n FROM t WHERE id >= 95 AND id < 205").await[3], "| 110 |");
        assert_eq!(rows(&ctx, "SELECT count(*) AS n FROM t WHERE id = 1000").await[3], "| 0 |");
        assert_eq!(rows(&ctx, "SELECT count(*) AS n FROM t WHERE id % 100 = 0").await[3], "| 3 |");
    }

    /// How many batches the plan's accelerated scans skipped by runtime filters.
    /// The sum of the metric `name` over every operator of `plan`.
    fn metric(plan: &Arc<dyn ExecutionPlan>, name: &str) -> usize {
        let own = plan.metrics().and_then(|m| m.sum_by_name(name)).map_or(0, |v| v.as_usize());
        own + plan.children().into_iter().map(|child| metric(child, name)).sum::<usize>()
    }

    #[tokio::test]
    async fn a_join_reads_only_the_batches_holding_the_keys_its_build_side_found() {
        use datafusion::datasource::MemTable;
        // 200 batches of 100 rows, ids in order.
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let batches: Vec<RecordBatch> = (0..200)
            .map(|b| {
                let ids: Vec<i64> = (b * 100..b * 100 + 100).collect();
                let vs: Vec<i64> = ids.iter().map(|i| i * 10).collect();
                RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![Arc::new(Int64Array::from(ids)), Arc::new(Int64Array::from(vs))],
                )
                .expect("batch")
            })
            .collect();
        let wanted = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let keys =
            RecordBatch::try_new(Arc::clone(&wanted), vec![Arc::new(Int64Array::from(vec![150i64, 7_777, 19_999]))])
                .expect("keys");
        // `facts` over those batches joined with `wanted` holding `keys`: the plan run, and
        // its answer as a text table.
        let joined = |partitioned: bool, keys: RecordBatch, sql: &'static str| {
            let (schema, wanted, batches) = (Arc::clone(&schema), Arc::clone(&wanted), batches.clone());
            async move {
                let table = AcceleratedTable::new("facts", schema);
                table.swap(Snapshot::new(batches, 1));
                let ctx = context(partitioned);
                ctx.register_table("facts", Arc::new(table) as Arc<dyn TableProvider>).expect("register");
                let dim = MemTable::try_new(wanted, vec![vec![keys]]).expect("memtable");
                ctx.register_table("wanted", Arc::new(dim)).expect("register");
                let plan = ctx.sql(sql).await.expect("plan").create_physical_plan().await.expect("physical");
                let answer = datafusion::physical_plan::collect(Arc::clone(&plan), ctx.task_ctx()).await.expect("run");
                let text = arrow::util::pretty::pretty_format_batches(&answer).expect("format").to_string();
                (plan, text)
            }
        };
        for mode in ["CollectLeft", "Partitioned"] {
            let sql = "SELECT f.id, f.v FROM facts f JOIN wanted w ON f.id = w.id ORDER BY f.id";
            let (plan, text) = joined(mode == "Partitioned", keys.clone(), sql).await;
            let shown = datafusion::physical_plan::displayable(plan.as_ref()).indent(true).to_string();
            assert!(shown.contains(&format!("mode={mode}")), "{shown}");
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines[3..6], ["| 150   | 1500   |", "| 7777  | 77770  |", "| 19999 | 199990 |"], "{text}");
            // Three keys live in three batches: the other 197 are never read, also when the
            // join's filter routes each key to its hash partition's list (a CASE); of the
            // three read, only the three matching rows reach the join.
            let shown =
                datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref()).indent(true);
            assert_eq!(metric(&plan, "batches_skipped_by_runtime_filters"), 197, "{mode}: {shown}");
            assert_eq!(metric(&plan, "rows_removed_by_runtime_filters"), 297, "{mode}: {shown}");
        }

        // 1,000 keys (every tenth id of the first half): more than DataFusion lists, so the
        // filter looks keys up in the join's hash table. Its bounds still skip the second
        // half; its rows are left to the join, which answers the same.
        let many = Int64Array::from_iter_values((0..1_000).map(|i| i * 10));
        let keys = RecordBatch::try_new(Arc::clone(&wanted), vec![Arc::new(many)]).expect("keys");
        let sql = "SELECT count(*), sum(f.v) FROM facts f JOIN wanted w ON f.id = w.id";
        let (plan, text) = joined(false, keys, sql).await;
        assert!(text.contains("| 1000     | 49950000 |"), "{text}");
        let shown =
            datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref()).indent(true);
        assert!(shown.to_string().contains("hash_lookup"), "{shown}");
        assert_eq!(metric(&plan, "batches_skipped_by_runtime_filters"), 100, "{shown}");
        assert_eq!(metric(&plan, "rows_removed_by_runtime_filters"), 0, "{shown}");
    }

    /// A session whose hash joins build in one piece (`CollectLeft`, DataFusion's choice for
    /// small build sides) or split by key hash (`Partitioned`, its choice for large ones, and
    /// a runtime filter that is a `CASE` over the partitions).
    fn context(partitioned: bool) -> SessionContext {
        let mut config = datafusion::prelude::SessionConfig::new().with_target_partitions(4);
        if partitioned {
            let optimizer = &mut config.options_mut().optimizer;
            optimizer.hash_join_single_partition_threshold = 0;
            optimizer.hash_join_single_partition_threshold_rows = 0;
        }
        SessionContext::new_with_config(config)
    }

    /// Aggregates, sorts, windows, distincts, TopK and joins over a copy that skips batches by
    /// runtime filters answer exactly what DataFusion answers over the same batches as a
    /// plain memory table: random keys with runs that cross batch (and so partition)
    /// boundaries, random batch sizes, pruned and unpruned scans, joins with a few keys and
    /// with more than a pruning predicate lists, built whole or split by key hash.
    #[tokio::test]
    async fn a_copy_answers_as_a_plain_memory_table_of_the_same_batches() {
        use datafusion::datasource::MemTable;
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("x", DataType::Int64, true),
            // Ascends inside each batch, each batch starting anywhere.
            Field::new("y", DataType::Int64, false),
        ]));
        // A small deterministic generator (xorshift) keeps the test reproducible.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |below: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % below
        };
        for round in 0..12 {
            let mut key = 0i64;
            let mut batches = Vec::new();
            for _ in 0..(1 + next(12)) {
                let rows = 1 + next(300) as usize;
                let mut keys = Vec::with_capacity(rows);
                for _ in 0..rows {
                    key += next(3) as i64; // runs of equal keys, often across a boundary
                    keys.push(key);
                }
                let xs: Vec<Option<i64>> = (0..rows).map(|_| (next(10) != 0).then(|| next(1000) as i64)).collect();
                let mut y = next(200) as i64;
                let ys: Vec<i64> = (0..rows)
                    .map(|_| {
                        y += next(3) as i64;
                        y
                    })
                    .collect();
                batches.push(
                    RecordBatch::try_new(
                        Arc::clone(&schema),
                        vec![
                            Arc::new(Int64Array::from(keys)),
                            Arc::new(Int64Array::from(xs)),
                            Arc::new(Int64Array::from(ys)),
                        ],
                    )
                    .expect("batch"),
                );
            }
            let copy = AcceleratedTable::new("t", Arc::clone(&schema));
            copy.swap(Snapshot::new(batches.clone(), 1));
            // Every other round with joins split by key hash.
            let ctx = context(round % 2 == 1);
            ctx.register_table("t", Arc::new(copy) as Arc<dyn TableProvider>).expect("register");
            let plain = MemTable::try_new(Arc::clone(&schema), vec![batches]).expect("memtable");
            ctx.register_table("plain", Arc::new(plain)).expect("register");
            // Keys to join with: a few (the join's runtime filter lists them) or more than a
            // pruning predicate expands (only their bounds prune), some beyond the table's.
            let wanted = if round % 3 == 2 { 1500 } else { 1 + next(6) as usize };
            let dim_keys: Vec<i64> = (0..wanted).map(|_| next(key as u64 + 20) as i64).collect();
            let dim_w: Vec<i64> = (0..wanted as i64).collect();
            let dim_schema = Arc::new(Schema::new(vec![
                Field::new("k", DataType::Int64, false),
                Field::new("w", DataType::Int64, false),
            ]));
            let dim = RecordBatch::try_new(
                Arc::clone(&dim_schema),
                vec![Arc::new(Int64Array::from(dim_keys)), Arc::new(Int64Array::from(dim_w))],
            )
            .expect("dim");
            ctx.register_table("dim", Arc::new(MemTable::try_new(dim_schema, vec![vec![dim]]).expect("memtable")))
                .expect("register");
            let middle = key / 2;
            for query in [
                "SELECT k, count(*), sum(x), min(x) FROM {t} GROUP BY k ORDER BY k",
                "SELECT k, x FROM {t} ORDER BY k, x NULLS FIRST",
                "SELECT DISTINCT k FROM {t} ORDER BY k",
                "SELECT k, sum(x) OVER (ORDER BY k) AS running FROM {t} ORDER BY k, running",
                "SELECT k, x FROM {t} ORDER BY k DESC, x LIMIT 7",
                "SELECT k, count(*) FROM {t} WHERE k >= {middle} GROUP BY k ORDER BY k",
                "SELECT k % 5 AS b, count(*) FROM {t} GROUP BY k % 5 ORDER BY b",
                "SELECT y, count(*), max(k) FROM {t} GROUP BY y ORDER BY y",
                "SELECT y FROM {t} ORDER BY y",
                "SELECT y, count(*) OVER (ORDER BY y) AS c FROM {t} ORDER BY y, c",
                "SELECT x, count(*) FROM {t} GROUP BY x ORDER BY x NULLS FIRST",
                "SELECT d.k, d.x, dim.w FROM {t} JOIN dim ON d.k = dim.k ORDER BY d.k, d.x NULLS FIRST, dim.w",
                "SELECT count(*) FROM {t} WHERE d.k IN (SELECT k FROM dim)",
                "SELECT count(*) FROM {t} LEFT JOIN dim ON d.k = dim.k WHERE dim.w IS NULL",
                "SELECT dim.w, count(d.k) FROM dim LEFT JOIN {t} ON d.k = dim.k GROUP BY dim.w ORDER BY dim.w",
            ] {
                let query = query.replace("{middle}", &middle.to_string());
                // The same alias on both sides, so the headers match too.
                let expected = rows(&ctx, &query.replace("{t}", "plain AS d")).await;
                let got = rows(&ctx, &query.replace("{t}", "t AS d")).await;
                assert_eq!(got, expected, "round {round}: {query}");
            }
        }
    }

    /// A batch as a replica receives it: decoded from one IPC message, every column a slice
    /// of the message body.
    fn received(batch: &RecordBatch) -> RecordBatch {
        let mut bytes = Vec::new();
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema()).expect("writer");
        writer.write(batch).expect("write");
        writer.finish().expect("finish");
        drop(writer);
        let mut reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).expect("reader");
        reader.next().expect("one batch").expect("decode")
    }

    #[test]
    fn owned_copies_hold_their_rows_not_the_received_frame() {
        use arrow::array::{Float64Array, StringViewArray};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("amount", DataType::Float64, true),
            Field::new("short", DataType::Utf8View, false),
            Field::new("long", DataType::Utf8View, true),
        ]));
        let rows = 8192i64;
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows)),
                Arc::new((0..rows).map(|i| (i % 7 != 0).then_some(i as f64)).collect::<Float64Array>()),
                Arc::new(StringViewArray::from_iter_values((0..rows).map(|i| format!("v-{i}")))),
                Arc::new(
                    (0..rows)
                        .map(|i| (i % 5 != 0).then(|| format!("longer than twelve bytes {i}")))
                        .collect::<StringViewArray>(),
                ),
            ],
        )
        .expect("batch");
        let arrow_bytes = batch.get_array_memory_size();
        let decoded = received(&batch);
        // Every decoded column reports (and pins) the whole message body.
        assert!(decoded.get_array_memory_size() > 2 * arrow_bytes, "decoded columns share one body");

        let owned = owned_copy(decoded);
        assert_eq!(owned, batch, "same rows");
        let held = owned.get_array_memory_size();
        assert!(held <= arrow_bytes * 11 / 10, "owned copy holds {held} bytes for {arrow_bytes} bytes of Arrow");
    }

    #[test]
    fn view_columns_keep_only_their_own_bytes() {
        use arrow::array::{Array, AsArray, StringViewArray};
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8View, false)]));
        // 10,000 strings longer than the 12 bytes a view inlines, in one shared buffer.
        let long: StringViewArray =
            (0..10_000).map(|i| Some(format!("a string longer than twelve bytes {i}"))).collect();
        let whole = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(long)]).expect("batch");
        let buffer_bytes =
            |b: &RecordBatch| b.column(0).as_string_view().data_buffers().iter().map(|d| d.len()).sum::<usize>();

        // A one-row slice pinned every byte; compacted it holds its own string only.
        let one = compact_views(whole.slice(5, 1));
        assert_eq!(one.column(0).as_string_view().value(0), "a string longer than twelve bytes 5");
        assert!(buffer_bytes(&one) < 100, "{} bytes kept for one row", buffer_bytes(&one));

        // Short strings are inlined in their views: no buffer needs keeping at all.
        let short = StringViewArray::from_iter_values(["a", "bb"]);
        let padded = StringViewArray::try_new(
            short.views().clone(),
            vec![arrow::buffer::Buffer::from_vec(vec![0u8; 1 << 20])],
            None,
        )
        .expect("views");
        let short = compact_views(RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(padded)]).expect("batch"));
        assert_eq!(buffer_bytes(&short), 0);
        assert_eq!(short.column(0).as_string_view().value(1), "bb");

        // A column that uses its buffer is left alone (no copy).
        let kept = compact_views(whole.clone());
        assert!(Arc::ptr_eq(kept.column(0), whole.column(0)));
        assert_eq!(kept.column(0).len(), 10_000);
    }
}
