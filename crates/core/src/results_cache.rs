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
//!
//! A server may keep the body it rendered of a cached answer (a whole JSON answer over
//! HTTP, say) with it ([`CachedResult::keep_rendering`]), so that the next hit sends those
//! bytes instead of encoding the same rows again: for a small answer, encoding was a fifth of
//! a hit's instructions.

use std::any::Any;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{ScalarValue, TableReference};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use serde::Serialize;

use crate::FastHash;
use crate::accelerator::{AcceleratedTable, Replaced};
use crate::config::ResultsCacheConfig;
use crate::error::{Result, StrataError};
use crate::routing::{RouteInfo, VersionRead};

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
pub struct CachedResult {
    /// Unique among the answers of one process: what its renderings are kept by.
    id: u64,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    bytes: usize,
    renderings: Arc<Renderings>,
}

impl std::fmt::Debug for CachedResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedResult").field("id", &self.id).field("bytes", &self.bytes).finish_non_exhaustive()
    }
}

/// Bodies that servers rendered of cached answers, by (answer id, format). Bounded on its
/// own and charged by size: an eighth of the cache's `max_bytes`, no body larger than an
/// entry may be. Not a part of the answer's entry (whose weight is fixed when it is
/// stored): a body outlives its answer only until it is evicted, found by nobody since
/// answer ids are never reused.
struct Renderings {
    bodies: moka::sync::Cache<(u64, &'static str), Bytes, FastHash>,
    max_body: usize,
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
    /// HIT, MISS or BYPASS, with the cached answer itself when there is one (to remember
    /// it by the query's text: [`ResultsCache::remember_text`]).
    Fresh(SendableRecordBatchStream, CacheStatus, Option<Arc<CachedResult>>),
    /// An earlier snapshot's answer, and that answer itself.
    Stale(SendableRecordBatchStream, Staleness, Arc<CachedResult>),
    /// The caller waited for an answer too large to share: it runs the query itself, uncached.
    RunHere,
}

/// A query as its client sent it: what [`ResultsCache::by_text`] finds an answer by
/// before the query is planned.
#[derive(Clone, Copy)]
pub struct TextKey<'a> {
    pub sql: &'a str,
    pub params: &'a [ScalarValue],
    /// Who may share the answer, as in [`CacheKey`].
    pub scope: &'a str,
}

/// What a query text was last answered with from the cache, and what that depends on.
struct TextEntry {
    sql: String,
    params: Vec<ScalarValue>,
    scope: String,
    /// [`crate::generation`] read before the query was planned: while it is unchanged the
    /// text plans, routes and reads exactly as it did.
    generation: u64,
    /// When the route stops holding by time alone (a replica passing its max staleness).
    expires: Option<SystemTime>,
    /// The answer, while the cache still holds it under its plan key.
    answer: Weak<CachedResult>,
    /// The route of the answer, and when it was made (the versions' ages grow from there).
    info: RouteInfo,
    made_at: SystemTime,
    /// The tables the plan reads: a restricted caller's grants are checked on every use.
    tables: Vec<TableReference>,
}

/// An answer found by [`ResultsCache::by_text`].
pub struct TextHit {
    entry: Arc<TextEntry>,
    answer: Arc<CachedResult>,
}

impl TextHit {
    /// The tables the answer was read from.
    pub fn tables(&self) -> &[TableReference] {
        &self.entry.tables
    }

    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.answer.schema)
    }

    pub fn stream(&self) -> SendableRecordBatchStream {
        self.answer.stream()
    }

    /// The cached answer itself.
    pub fn answer(&self) -> &Arc<CachedResult> {
        &self.answer
    }

    /// The route the answer was made on, as a HIT, its versions aged to now.
    pub fn info(&self) -> RouteInfo {
        let mut info = self.entry.info.clone();
        info.cache = Some(CacheStatus::Hit);
        let since = SystemTime::now().duration_since(self.entry.made_at).unwrap_or_default();
        let since_ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
        for read in &mut info.versions {
            read.age_ms = read.age_ms.saturating_add(since_ms);
        }
        info
    }
}

/// The cache of one tier.
pub struct ResultsCache {
    entries: moka::future::Cache<CacheKey, Arc<CachedResult>>,
    /// Answers by query text (see [`ResultsCache::by_text`]), keyed by the text's hash.
    texts: moka::sync::Cache<u64, Arc<TextEntry>, FastHash>,
    /// The snapshots of the last answer stored for each query.
    latest: moka::sync::Cache<QueryKey, Arc<SnapshotsRead>>,
    renderings: Arc<Renderings>,
    max_entry_bytes: usize,
    /// Hashes of keys whose answers did not fit an entry: not collected again.
    too_large: Mutex<HashSet<u64>>,
    /// Hashes of keys being computed in the background after a stale answer: one at a time.
    revalidating: Arc<Mutex<HashSet<u64>>>,
    hasher: FastHash,
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

/// The id of the next answer stored ([`CachedResult`]).
static NEXT_ANSWER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
        // Texts hold no answers (only weak references to the entries'): an eighth of the
        // budget, charged by their size.
        let texts = moka::sync::Cache::builder()
            .max_capacity((config.max_bytes.0 / 8).max(1 << 20))
            .weigher(|_: &u64, entry: &Arc<TextEntry>| {
                let params: usize = entry.params.iter().map(ScalarValue::size).sum();
                let size = entry.sql.len() + entry.scope.len() + params + std::mem::size_of::<TextEntry>();
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .build_with_hasher(FastHash::default());
        // Rendered bodies duplicate answers the entries hold: an eighth of the budget.
        let bodies = moka::sync::Cache::builder()
            .max_capacity((config.max_bytes.0 / 8).max(1 << 20))
            .weigher(|_: &(u64, &'static str), body: &Bytes| u32::try_from(body.len()).unwrap_or(u32::MAX))
            .build_with_hasher(FastHash::default());
        let renderings = Arc::new(Renderings { bodies, max_body: config.max_entry_bytes.as_usize() });
        Some(Self {
            entries,
            texts,
            latest,
            renderings,
            max_entry_bytes: config.max_entry_bytes.as_usize(),
            too_large: Mutex::new(HashSet::new()),
            revalidating: Arc::new(Mutex::new(HashSet::new())),
            hasher: FastHash::default(),
        })
    }

    /// The lookup of optimized `plan`, if its answer may be cached: every table it scans is
    /// a local accelerated copy with a loaded snapshot (the caller checked, on the plan
    /// before optimization, that it is deterministic).
    pub fn key(&self, plan: &LogicalPlan, scope: String) -> Option<Lookup> {
        let (snapshots, tables) = snapshots_read(plan)?;
        Some(Lookup { key: CacheKey { plan: plan.clone(), snapshots, scope }, tables })
    }

    /// The answer last remembered for this text ([`ResultsCache::remember_text`]), if
    /// nothing it depends on changed since (`generation`, see [`crate::generation`]), its
    /// route has not expired and the answer is still cached. Costs a hash of the text and
    /// one comparison: no parsing, planning or routing. The caller checks a restricted
    /// caller's grants on [`TextHit::tables`].
    pub fn by_text(&self, key: TextKey<'_>, generation: u64) -> Option<TextHit> {
        let entry = self.texts.get(&self.text_hash(key))?;
        let same = entry.generation == generation
            && entry.sql == key.sql
            && entry.params.as_slice() == key.params
            && entry.scope == key.scope;
        if !same || entry.expires.is_some_and(|at| SystemTime::now() >= at) {
            return None;
        }
        let answer = entry.answer.upgrade()?;
        Some(TextHit { entry, answer })
    }

    /// Remembers that the text of `key`, planned at `generation`, was answered with
    /// `answer` on route `info` from `tables`.
    pub fn remember_text(
        &self,
        key: TextKey<'_>,
        generation: u64,
        answer: &Arc<CachedResult>,
        info: &RouteInfo,
        expires: Option<SystemTime>,
        tables: Vec<TableReference>,
    ) {
        let entry = TextEntry {
            sql: key.sql.to_string(),
            params: key.params.to_vec(),
            scope: key.scope.to_string(),
            generation,
            expires,
            answer: Arc::downgrade(answer),
            info: info.clone(),
            made_at: SystemTime::now(),
            tables,
        };
        self.texts.insert(self.text_hash(key), Arc::new(entry));
    }

    fn text_hash(&self, key: TextKey<'_>) -> u64 {
        self.hasher.hash_one((key.sql, key.params, key.scope))
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
            return Ok(Answer::Fresh(entry.stream(), CacheStatus::Hit, Some(entry)));
        }
        if let Some((entry, staleness)) = self.stale(lookup, control).await {
            return Ok(Answer::Stale(entry.stream(), staleness, entry));
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
            return Ok(Answer::Fresh(run.await?, CacheStatus::Bypass, None));
        }
        let ran_here = std::sync::atomic::AtomicBool::new(false);
        let max = self.max_entry_bytes;
        let renderings = Arc::clone(&self.renderings);
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
            Ok(Arc::new(CachedResult::new(renderings, stream.schema(), batches, bytes)))
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
                Ok(Answer::Fresh(entry.stream(), status, Some(entry)))
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
                    Ok(taken.map_or(Answer::RunHere, |stream| Answer::Fresh(stream, CacheStatus::Bypass, None)))
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

    /// Bytes held by cached answers and the bodies rendered of them, now.
    pub fn bytes(&self) -> u64 {
        self.entries.weighted_size() + self.renderings.bodies.weighted_size()
    }

    pub fn entries(&self) -> u64 {
        self.entries.entry_count()
    }
}

impl CachedResult {
    fn new(renderings: Arc<Renderings>, schema: SchemaRef, batches: Vec<RecordBatch>, bytes: usize) -> Self {
        let id = NEXT_ANSWER_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self { id, schema, batches, bytes, renderings }
    }

    /// The body a server rendered of this answer in `format` and kept, if it still is.
    pub fn rendering(&self, format: &'static str) -> Option<Bytes> {
        self.renderings.bodies.get(&(self.id, format))
    }

    /// Keeps `body`, this whole answer rendered in `format`, for the next request that
    /// finds the answer and asks for that format. A body larger than an entry may be is
    /// not kept.
    pub fn keep_rendering(&self, format: &'static str, body: Bytes) {
        if body.len() <= self.renderings.max_body {
            self.renderings.bodies.insert((self.id, format), body);
        }
    }

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
    use crate::config::ByteSize;

    #[test]
    fn an_answer_is_found_by_its_text_only_with_the_same_parameters_scope_and_generation() {
        let cache = ResultsCache::new(&ResultsCacheConfig::default()).expect("cache on");
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
            "s",
            arrow::datatypes::DataType::Int64,
            false,
        )]));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(arrow::array::Int64Array::from(vec![4]))])
            .expect("batch");
        let bytes = batch.get_array_memory_size();
        let answer = Arc::new(CachedResult::new(Arc::clone(&cache.renderings), schema, vec![batch], bytes));
        let mut info = RouteInfo::local("here");
        info.versions.push(VersionRead { dataset: "t".into(), version: 3, age_ms: 10 });
        let params = [ScalarValue::Int64(Some(7))];
        let key = TextKey { sql: "SELECT s FROM t WHERE k = $1", params: &params, scope: "" };
        let tables = vec![TableReference::bare("t")];
        cache.remember_text(key, 5, &answer, &info, None, tables);

        let hit = cache.by_text(key, 5).expect("the same text, parameters, scope and generation");
        assert_eq!(hit.tables(), [TableReference::bare("t")]);
        let found = hit.info();
        assert_eq!(found.cache, Some(CacheStatus::Hit));
        assert_eq!((found.versions[0].version, found.versions[0].age_ms >= 10), (3, true));

        assert!(cache.by_text(key, 6).is_none(), "something changed since: plan again");
        let other = [ScalarValue::Int64(Some(8))];
        assert!(cache.by_text(TextKey { params: &other, ..key }, 5).is_none());
        assert!(cache.by_text(TextKey { scope: "acme\u{0}", ..key }, 5).is_none());
        assert!(cache.by_text(TextKey { sql: "SELECT s FROM t WHERE k = $2", ..key }, 5).is_none());

        // A route that expires by time (a replica's max_staleness) is not used past it.
        let past = SystemTime::now() - Duration::from_secs(1);
        cache.remember_text(key, 5, &answer, &info, Some(past), Vec::new());
        assert!(cache.by_text(key, 5).is_none());
        // Nor an answer the cache no longer holds.
        cache.remember_text(key, 5, &answer, &info, None, Vec::new());
        drop(hit);
        drop(answer);
        assert!(cache.by_text(key, 5).is_none(), "an evicted answer is not served by its text");
    }

    #[test]
    fn a_rendering_is_kept_per_answer_and_format_counted_and_bounded() {
        let config = ResultsCacheConfig { max_bytes: ByteSize(64 << 20), max_entry_bytes: ByteSize(1000) };
        let cache = ResultsCache::new(&config).expect("cache on");
        let schema = Arc::new(arrow::datatypes::Schema::empty());
        let answer = |cache: &ResultsCache| CachedResult::new(Arc::clone(&cache.renderings), schema.clone(), vec![], 0);
        let (first, second) = (answer(&cache), answer(&cache));
        assert_eq!(first.rendering("json"), None, "nothing rendered yet");

        first.keep_rendering("json", Bytes::from_static(b"[{\"s\":4}]"));
        assert_eq!(first.rendering("json").as_deref(), Some(&b"[{\"s\":4}]"[..]));
        assert_eq!(first.rendering("csv"), None, "another format is rendered on its own");
        assert_eq!(second.rendering("json"), None, "another answer's body is not this one's");

        second.keep_rendering("json", Bytes::from(vec![b' '; 1001]));
        assert_eq!(second.rendering("json"), None, "larger than an entry may be: not kept");
        cache.renderings.bodies.run_pending_tasks();
        assert_eq!(cache.bytes(), 9, "the kept body is counted in the cache's bytes");
    }

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
