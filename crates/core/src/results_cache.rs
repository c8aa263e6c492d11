//! The results cache: answers of queries that read only local accelerated copies, keyed by
//! the optimized plan and the exact snapshots it read.
//!
//! A snapshot is immutable and its id is never reused, so an entry can only be found while
//! every dataset it read still serves the same snapshot: a refresh, an append or a new
//! replica version changes the key, and there is no TTL to tune. Identical concurrent misses
//! run once (the others wait for that answer). Entries are bounded in bytes in total and
//! one by one; an answer too large for an entry streams to its client uncached.
//!
//! Staleness is opt-in, per dataset or per request. A dataset's `stale_while_revalidate`
//! lets the answer of the snapshot its new one replaced be served (STALE) for that long,
//! while the caller computes the new answer once in the background, so a refresh does not
//! send every client of a dashboard to the engine at the same moment. A request's
//! `Cache-Control: max-stale[=seconds]` accepts such an answer too; `only-if-cached` asks
//! for a cached answer or an error, never a query.

use std::any::Any;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use serde::Serialize;

use crate::accelerator::{AcceleratedTable, Replaced};
use crate::config::ResultsCacheConfig;
use crate::error::{Result, StrataError};
use crate::routing::VersionRead;

/// Whether an answer came from the results cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CacheStatus {
    /// Served from a cached answer (or from the one execution of identical concurrent misses).
    Hit,
    /// Executed; the answer is now cached.
    Miss,
    /// Executed and not cached (too large, or the client asked for a fresh answer).
    Bypass,
    /// Served from the answer of a snapshot that a newer one replaced, within the dataset's
    /// `stale_while_revalidate` or the request's `max-stale`.
    Stale,
}

impl CacheStatus {
    pub const ALL: [CacheStatus; 4] = [CacheStatus::Hit, CacheStatus::Miss, CacheStatus::Bypass, CacheStatus::Stale];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Bypass => "BYPASS",
            CacheStatus::Stale => "STALE",
        }
    }
}

/// What a request's `Cache-Control` header asks of the results cache (RFC 9111's request
/// directives that mean something here; the others are ignored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-cache` or `no-store`: the cache is neither read nor written for this query.
    pub no_cache: bool,
    /// `max-stale[=seconds]`: an answer up to this much staler than the data is acceptable
    /// (`Duration::MAX` for a bare `max-stale`).
    pub max_stale: Option<Duration>,
    /// `only-if-cached`: answer from the cache (fresh, or stale as allowed) or fail with
    /// `not_cached`; never run the query.
    pub only_if_cached: bool,
}

impl CacheControl {
    /// Parses a `Cache-Control` request header: directives separated by commas, names in
    /// any case. A `max-stale` whose value is not a number of seconds means any staleness,
    /// as a bare one does (the RFC's rule for a cache that cannot parse it is to treat the
    /// answer as stale, and the client said it accepts stale answers).
    pub fn parse(header: &str) -> Self {
        let mut control = Self::default();
        for directive in header.split(',') {
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store") {
                control.no_cache = true;
            } else if name.eq_ignore_ascii_case("only-if-cached") {
                control.only_if_cached = true;
            } else if name.eq_ignore_ascii_case("max-stale") {
                let seconds = value.and_then(|v| v.parse::<u64>().ok());
                control.max_stale = Some(seconds.map_or(Duration::MAX, Duration::from_secs));
            }
        }
        control
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

/// (table, snapshot id) of every table a plan scans, in plan order.
type SnapshotsRead = Vec<(String, u64)>;

/// What an answer is cached by: the optimized plan (compared structurally, not as text:
/// rendering a plan costs more than a point lookup) and the snapshots it read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    plan: LogicalPlan,
    snapshots: SnapshotsRead,
    /// Who may share the answer: empty when tenancy is off, else the caller's tenants.
    scope: String,
}

/// The same query whatever snapshots it reads: where the snapshots of its last stored
/// answer are found, for serving that answer stale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct QueryKey {
    plan: LogicalPlan,
    scope: String,
}

/// A cache key with what staleness each table it reads allows.
#[derive(Debug, Clone)]
pub struct Lookup {
    key: CacheKey,
    /// One per entry of `key.snapshots`, in the same order.
    tables: Vec<TableFreshness>,
}

#[derive(Debug, Clone)]
struct TableFreshness {
    dataset: String,
    replaced: Option<Replaced>,
    stale_while_revalidate: Option<Duration>,
}

/// How stale an answer served with [`CacheStatus::Stale`] is.
#[derive(Debug, Clone, PartialEq)]
pub struct Staleness {
    /// Since the oldest of the snapshots it read was replaced.
    pub stale_for: Duration,
    /// The versions it read, of the datasets it read an older version of.
    pub versions: Vec<VersionRead>,
}

/// What [`ResultsCache::get_or_run`] answered.
pub enum Answer {
    /// HIT, MISS or BYPASS.
    Fresh(SendableRecordBatchStream, CacheStatus),
    /// An earlier snapshot's answer.
    Stale(SendableRecordBatchStream, Staleness),
    /// The caller waited for an answer too large to share: it runs the query itself, uncached.
    RunHere,
}

/// The cache of one tier.
pub struct ResultsCache {
    entries: moka::future::Cache<CacheKey, Arc<CachedResult>>,
    /// The snapshots of the last answer stored for each query.
    latest: moka::sync::Cache<QueryKey, Arc<SnapshotsRead>>,
    max_entry_bytes: usize,
    /// Hashes of keys whose answers did not fit an entry: not collected again.
    too_large: Mutex<HashSet<u64>>,
    /// Hashes of keys being computed in the background after a stale answer: one at a time.
    revalidating: Arc<Mutex<HashSet<u64>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// Held while a fresh answer is computed in the background; another stale hit of the same
/// query does not start a second one.
pub struct Revalidation {
    hash: u64,
    running: Arc<Mutex<HashSet<u64>>>,
}

impl Drop for Revalidation {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.hash);
    }
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
        // Only plans are held here (the answers are the entries'): charged by their size.
        let latest = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes.0)
            .weigher(|key: &QueryKey, _: &Arc<SnapshotsRead>| {
                u32::try_from(crate::plan_size::estimated_bytes(&key.plan)).unwrap_or(u32::MAX)
            })
            .build();
        Some(Self {
            entries,
            latest,
            max_entry_bytes: config.max_entry_bytes.as_usize(),
            too_large: Mutex::new(HashSet::new()),
            revalidating: Arc::new(Mutex::new(HashSet::new())),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    /// The lookup of optimized `plan`, if its answer may be cached: every table it scans is
    /// a local accelerated copy with a loaded snapshot (the caller checked, on the plan
    /// before optimization, that it is deterministic).
    pub fn key(&self, plan: &LogicalPlan, scope: String) -> Option<Lookup> {
        let (snapshots, tables) = snapshots_read(plan)?;
        Some(Lookup { key: CacheKey { plan: plan.clone(), snapshots, scope }, tables })
    }

    /// The answer for `lookup`: cached (or, as `control` and the datasets allow, the answer
    /// of the snapshots the current ones replaced), or produced by `run` once for all
    /// concurrent callers. With `only-if-cached`, a miss is an error and nothing runs.
    pub async fn get_or_run<F>(&self, lookup: &Lookup, control: CacheControl, run: F) -> Result<Answer>
    where
        F: std::future::Future<Output = Result<SendableRecordBatchStream>>,
    {
        let key = &lookup.key;
        let cached = self.entries.get(key).await;
        if let Some(entry) = cached {
            return Ok(Answer::Fresh(entry.stream(), CacheStatus::Hit));
        }
        if let Some((entry, staleness)) = self.stale(lookup, control).await {
            return Ok(Answer::Stale(entry.stream(), staleness));
        }
        if control.only_if_cached {
            return Err(StrataError::NotCached(
                "the results cache holds no answer to this query (Cache-Control: only-if-cached)".into(),
            ));
        }
        self.fill(lookup, run).await
    }

    /// The answer for `lookup`: cached, or produced by `run` once for all concurrent callers
    /// and stored. Never a stale one: what a revalidation calls.
    pub async fn fill<F>(&self, lookup: &Lookup, run: F) -> Result<Answer>
    where
        F: std::future::Future<Output = Result<SendableRecordBatchStream>>,
    {
        let key = &lookup.key;
        let hash = self.hasher.hash_one(key);
        if lock(&self.too_large).contains(&hash) {
            return Ok(Answer::Fresh(run.await?, CacheStatus::Bypass));
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
        match self.entries.try_get_with(key.clone(), init).await {
            Ok(entry) => {
                let status = if ran_here.load(std::sync::atomic::Ordering::Relaxed) {
                    let query = QueryKey { plan: key.plan.clone(), scope: key.scope.clone() };
                    self.latest.insert(query, Arc::new(key.snapshots.clone()));
                    CacheStatus::Miss
                } else {
                    CacheStatus::Hit
                };
                Ok(Answer::Fresh(entry.stream(), status))
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
                    Ok(taken.map_or(Answer::RunHere, |stream| Answer::Fresh(stream, CacheStatus::Bypass)))
                }
            },
        }
    }

    /// The answer last stored for this query, if every snapshot it read is current or is
    /// the one the current replaced no longer ago than that table allows.
    async fn stale(&self, lookup: &Lookup, control: CacheControl) -> Option<(Arc<CachedResult>, Staleness)> {
        let allowed = |t: &TableFreshness| match (t.stale_while_revalidate, control.max_stale) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if lookup.tables.iter().all(|t| allowed(t).is_none()) {
            return None;
        }
        let key = &lookup.key;
        let query = QueryKey { plan: key.plan.clone(), scope: key.scope.clone() };
        let read = self.latest.get(&query)?;
        if *read == key.snapshots || read.len() != key.snapshots.len() {
            return None;
        }
        let now = SystemTime::now();
        let mut staleness = Staleness { stale_for: Duration::ZERO, versions: Vec::new() };
        for ((current, (name, id)), table) in key.snapshots.iter().zip(read.iter()).zip(&lookup.tables) {
            if current.0 != *name {
                return None;
            }
            if current.1 == *id {
                continue;
            }
            let replaced = table.replaced.filter(|r| r.id == *id)?;
            let stale_for = now.duration_since(replaced.at).unwrap_or_default();
            if stale_for > allowed(table)? {
                return None;
            }
            staleness.stale_for = staleness.stale_for.max(stale_for);
            let age_ms = now.duration_since(replaced.made_at).unwrap_or_default().as_millis() as u64;
            if !staleness.versions.iter().any(|v| v.dataset == table.dataset) {
                staleness.versions.push(VersionRead {
                    dataset: table.dataset.clone(),
                    version: replaced.version,
                    age_ms,
                });
            }
        }
        let old = CacheKey { plan: query.plan, snapshots: read.as_ref().clone(), scope: query.scope };
        let entry = self.entries.get(&old).await?;
        Some((entry, staleness))
    }

    /// Claims the background computation of `lookup`'s fresh answer after a stale one was
    /// served; `None` when one is already running.
    pub fn revalidation(&self, lookup: &Lookup) -> Option<Revalidation> {
        let hash = self.hasher.hash_one(&lookup.key);
        lock(&self.revalidating).insert(hash).then(|| Revalidation { hash, running: Arc::clone(&self.revalidating) })
    }

    /// Bytes held by cached answers now.
    pub fn bytes(&self) -> u64 {
        self.entries.weighted_size()
    }

    pub fn entries(&self) -> u64 {
        self.entries.entry_count()
    }
}

impl CachedResult {
    fn stream(&self) -> SendableRecordBatchStream {
        let stream = futures::stream::iter(self.batches.clone().into_iter().map(Ok));
        Box::pin(RecordBatchStreamAdapter::new(Arc::clone(&self.schema), stream))
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

/// (table, snapshot id) of every scan, with what each table allows of staleness, if all
/// read loaded accelerated copies.
fn snapshots_read(plan: &LogicalPlan) -> Option<(SnapshotsRead, Vec<TableFreshness>)> {
    let mut snapshots = Vec::new();
    let mut tables = Vec::new();
    let mut cacheable = true;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let provider = source_as_provider(&scan.source).ok();
            let table = provider.as_ref().and_then(|p| (p.as_ref() as &dyn Any).downcast_ref::<AcceleratedTable>());
            match table.and_then(|t| Some((t, t.snapshot()?))) {
                Some((table, snapshot)) => {
                    snapshots.push((scan.table_name.to_string(), snapshot.id));
                    tables.push(TableFreshness {
                        dataset: table.name().to_string(),
                        replaced: table.replaced(),
                        stale_while_revalidate: table.stale_while_revalidate(),
                    });
                }
                None => {
                    cacheable = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    (cacheable && !snapshots.is_empty()).then_some((snapshots, tables))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_reads_the_request_directives_that_matter_here() {
        for fresh in ["no-cache", "No-Store", "max-age=0, no-cache", " no-store ,private"] {
            assert!(CacheControl::parse(fresh).no_cache, "{fresh}");
        }
        for cached in ["", "max-age=60", "no-cachex", "private", "no-transform"] {
            assert_eq!(CacheControl::parse(cached), CacheControl::default(), "{cached}");
        }
        let stale = CacheControl::parse("max-stale=30, only-if-cached");
        assert_eq!(stale.max_stale, Some(Duration::from_secs(30)));
        assert!(stale.only_if_cached && !stale.no_cache);
        assert_eq!(CacheControl::parse("MAX-STALE").max_stale, Some(Duration::MAX));
        assert_eq!(CacheControl::parse("max-stale=\"5\"").max_stale, Some(Duration::from_secs(5)));
        // A value that is no number of seconds is read as "any staleness", as a bare one.
        assert_eq!(CacheControl::parse("max-stale=soon").max_stale, Some(Duration::MAX));
        assert_eq!(CacheControl::parse("max-stale=-1").max_stale, Some(Duration::MAX));
    }
}
