//! The results cache: answers of queries that read only local accelerated copies, keyed by
//! the optimized plan and the exact snapshots it read.
//!
//! A snapshot is immutable and its id is never reused, so an entry can only be found while
//! every dataset it read still serves the same snapshot: a refresh, an append or a new
//! replica version changes the key, and there is no TTL to tune. Identical concurrent misses
//! run once (the others wait for that answer). Entries are bounded in bytes in total and
//! one by one; an answer too large for an entry streams to its client uncached.

use std::any::Any;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use serde::Serialize;

use crate::accelerator::AcceleratedTable;
use crate::config::ResultsCacheConfig;
use crate::error::{Result, StrataError};

/// Whether an answer came from the results cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CacheStatus {
    /// Served from a cached answer (or from the one execution of identical concurrent misses).
    Hit,
    /// Executed; the answer is now cached.
    Miss,
    /// Executed and not cached (too large).
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// One cached answer.
#[derive(Debug)]
pub struct CachedResult {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    bytes: usize,
}

/// What a collection that outgrew its entry hands back to the one client that ran it.
struct TooLarge {
    leader: Mutex<Option<SendableRecordBatchStream>>,
}

enum Failure {
    Query(StrataError),
    TooLarge(TooLarge),
}

/// What an answer is cached by: the optimized plan (compared structurally, not as text:
/// rendering a plan costs more than a point lookup) and the snapshots it read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    plan: LogicalPlan,
    snapshots: Vec<(String, u64)>,
    /// Who may share the answer: empty when tenancy is off, else the caller's tenants.
    scope: String,
}

/// The cache of one tier.
pub struct ResultsCache {
    entries: moka::future::Cache<CacheKey, Arc<CachedResult>>,
    max_entry_bytes: usize,
    /// Hashes of keys whose answers did not fit an entry: not collected again.
    too_large: Mutex<HashSet<u64>>,
    hasher: std::collections::hash_map::RandomState,
}

/// At most this many "too large" keys are remembered (then the set starts over).
const MAX_TOO_LARGE: usize = 4096;

impl ResultsCache {
    /// The cache described by `config`, or none when it is turned off (`max_bytes: 0`).
    pub fn new(config: &ResultsCacheConfig) -> Option<Self> {
        if config.max_bytes.0 == 0 {
            return None;
        }
        let entries = moka::future::Cache::builder()
            .max_capacity(config.max_bytes.0)
            // A key is charged its plan, literals included (a query with a 1 MB literal and a
            // one-row answer pinned its megabyte while charged a kilobyte). Weighed once, on
            // insertion: lookups do not walk the plan.
            .weigher(|key: &CacheKey, value: &Arc<CachedResult>| {
                let key_bytes = crate::plan_size::estimated_bytes(&key.plan);
                u32::try_from(key_bytes.saturating_add(value.bytes)).unwrap_or(u32::MAX)
            })
            .build();
        Some(Self {
            entries,
            max_entry_bytes: config.max_entry_bytes.as_usize(),
            too_large: Mutex::new(HashSet::new()),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    /// The key of optimized `plan`, if its answer may be cached: every table it scans is a
    /// local accelerated copy with a loaded snapshot (the caller checked, on the plan before
    /// optimization, that it is deterministic).
    pub fn key(&self, plan: &LogicalPlan, scope: String) -> Option<CacheKey> {
        let snapshots = snapshots_read(plan)?;
        Some(CacheKey { plan: plan.clone(), snapshots, scope })
    }

    /// The answer for `key`: cached, or produced by `run` once for all concurrent callers.
    /// `None` when the caller waited for an answer that turned out too large to share: it
    /// runs the query itself, uncached.
    pub async fn get_or_run<F>(&self, key: CacheKey, run: F) -> Result<Option<(SendableRecordBatchStream, CacheStatus)>>
    where
        F: std::future::Future<Output = Result<SendableRecordBatchStream>>,
    {
        let hash = self.hasher.hash_one(&key);
        if lock(&self.too_large).contains(&hash) {
            return Ok(Some((run.await?, CacheStatus::Bypass)));
        }
        let ran_here = std::sync::atomic::AtomicBool::new(false);
        let max = self.max_entry_bytes;
        let init = async {
            ran_here.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut stream = run.await.map_err(Failure::Query)?;
            let mut batches = Vec::new();
            let mut bytes = 0;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| Failure::Query(e.into()))?;
                bytes += batch.get_array_memory_size();
                batches.push(batch);
                if bytes > max {
                    // Hand what was read, and the rest, to this caller only.
                    let schema = stream.schema();
                    let rest = futures::stream::iter(batches.into_iter().map(Ok)).chain(stream);
                    let leader: SendableRecordBatchStream = Box::pin(RecordBatchStreamAdapter::new(schema, rest));
                    return Err(Failure::TooLarge(TooLarge { leader: Mutex::new(Some(leader)) }));
                }
            }
            Ok(Arc::new(CachedResult { schema: stream.schema(), batches, bytes }))
        };
        match self.entries.try_get_with(key, init).await {
            Ok(entry) => {
                let status = if ran_here.load(std::sync::atomic::Ordering::Relaxed) {
                    CacheStatus::Miss
                } else {
                    CacheStatus::Hit
                };
                let stream = futures::stream::iter(entry.batches.clone().into_iter().map(Ok));
                Ok(Some((Box::pin(RecordBatchStreamAdapter::new(Arc::clone(&entry.schema), stream)), status)))
            }
            Err(failure) => match failure.as_ref() {
                Failure::Query(err) => Err(StrataError::remote(err.kind(), err.to_string())),
                Failure::TooLarge(too_large) => {
                    let mut remembered = lock(&self.too_large);
                    if remembered.len() >= MAX_TOO_LARGE {
                        remembered.clear();
                    }
                    remembered.insert(hash);
                    drop(remembered);
                    let taken = lock(&too_large.leader).take();
                    Ok(taken.map(|stream| (stream, CacheStatus::Bypass)))
                }
            },
        }
    }

    /// Bytes held by cached answers now.
    pub fn bytes(&self) -> u64 {
        self.entries.weighted_size()
    }

    pub fn entries(&self) -> u64 {
        self.entries.entry_count()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// True when the plan calls only immutable functions: no `random()`, and no `now()` either
/// (the optimizer folds it into a literal, so its answer and its plan are only good once).
pub fn is_deterministic(plan: &LogicalPlan) -> bool {
    let mut deterministic = true;
    let _ = plan.apply_with_subqueries(|node| {
        for expr in node.expressions() {
            let _ = expr.apply(|e| {
                if matches!(e, Expr::ScalarFunction(f) if f.func.signature().volatility != Volatility::Immutable) {
                    deterministic = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        Ok(if deterministic { TreeNodeRecursion::Continue } else { TreeNodeRecursion::Stop })
    });
    deterministic
}

/// (table, snapshot id) of every scan, if all read loaded accelerated copies.
fn snapshots_read(plan: &LogicalPlan) -> Option<Vec<(String, u64)>> {
    let mut snapshots = Vec::new();
    let mut cacheable = true;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let snapshot = source_as_provider(&scan.source).ok().and_then(|p| {
                (p.as_ref() as &dyn Any).downcast_ref::<AcceleratedTable>().and_then(AcceleratedTable::snapshot)
            });
            match snapshot {
                Some(s) => snapshots.push((scan.table_name.to_string(), s.id)),
                None => {
                    cacheable = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    (cacheable && !snapshots.is_empty()).then_some(snapshots)
}
