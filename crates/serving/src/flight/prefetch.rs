//! Statements started at GetFlightInfo instead of at DoGet, on tiers with an upstream.
//!
//! A Flight SQL client asks GetFlightInfo, waits for the answer, then sends DoGet: one more
//! round trip before any row moves. When the query goes upstream, a sidecar that waited for
//! DoGet to call its platform would add that whole upstream call after the client's second
//! trip; started at GetFlightInfo, the two overlap. Tickets still carry the statement, so a
//! DoGet that finds no started run here (another replica answered GetFlightInfo, the run
//! expired or was evicted, the options differ) executes the statement as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use datafusion::common::ScalarValue;
use strata_core::query::QueryStream;
use strata_core::routing::QueryOptions;
use strata_core::{Engine, StrataError};
use tokio::task::JoinHandle;

/// Runs waiting for their DoGet at most, as a share of `limits.max_concurrent_queries`:
/// each holds an admission permit, and clients that never call DoGet must not take them all.
fn max_waiting(engine: &Engine) -> usize {
    (engine.limits().max_concurrent_queries / 4).clamp(1, 32)
}
/// A run whose DoGet has not come by then is cancelled (its permit and upstream call freed).
const EXPIRES_AFTER: Duration = Duration::from_secs(10);

/// What a run was started for: a DoGet takes it only when it asks exactly the same.
struct Request {
    sql: String,
    params: Vec<ScalarValue>,
    strong_consistency: bool,
    tenant: String,
}

impl Request {
    fn new(sql: &str, params: &[ScalarValue], options: &QueryOptions) -> Self {
        Self {
            sql: sql.to_string(),
            params: params.to_vec(),
            strong_consistency: options.strong_consistency,
            tenant: options.tenant.clone(),
        }
    }

    /// Whether a DoGet asks exactly this, compared in place (no copies on the DoGet path).
    fn matches(&self, sql: &str, params: &[ScalarValue], options: &QueryOptions) -> bool {
        self.sql == sql
            && self.params == params
            && self.strong_consistency == options.strong_consistency
            && self.tenant == options.tenant
    }
}

struct Waiting {
    request: Request,
    started: Instant,
    run: JoinHandle<Result<QueryStream, StrataError>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // A run nobody takes is cancelled, not left holding its permit until it ends.
        self.run.abort();
    }
}

/// Runs started by GetFlightInfo, by the id their ticket carries.
#[derive(Default)]
pub struct Prefetcher {
    waiting: Mutex<HashMap<u64, Waiting>>,
    next_id: AtomicU64,
}

impl Prefetcher {
    /// Starts `sql` in the background and returns the id for its ticket, or `None` when too
    /// many runs already wait.
    pub fn start(&self, engine: &Engine, sql: &str, params: Vec<ScalarValue>, options: &QueryOptions) -> Option<u64> {
        let request = Request::new(sql, &params, options);
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|_, w| w.started.elapsed() < EXPIRES_AFTER);
        if waiting.len() >= max_waiting(engine) {
            return None;
        }
        let (engine, sql, options) = (engine.clone(), sql.to_string(), options.clone());
        let run = tokio::spawn(async move { engine.execute_with(&sql, params, &options).await });
        // Ids are never reused; a guessed one is useless without the same statement.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        waiting.insert(id, Waiting { request, started: Instant::now(), run });
        Some(id)
    }

    /// The run started for ticket `id`, if it is still here and was started for exactly
    /// this statement and these options.
    pub async fn take(
        &self,
        id: u64,
        sql: &str,
        params: &[ScalarValue],
        options: &QueryOptions,
    ) -> Option<Result<QueryStream, StrataError>> {
        let mut found = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            match waiting.get(&id) {
                Some(w) if w.request.matches(sql, params, options) => waiting.remove(&id)?,
                _ => return None,
            }
        };
        let outcome = (&mut found.run).await;
        Some(outcome.unwrap_or_else(|e| Err(StrataError::Internal(format!("a prefetched query stopped: {e}")))))
    }

    /// Cancels run `id`: dropped, it gives its permit back (what expiry does to a run no
    /// DoGet takes).
    #[cfg(test)]
    fn cancel(&self, id: u64) {
        // Dropped (and so aborted) after the lock is released.
        let cancelled = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        drop(cancelled);
    }

    /// Runs waiting for their DoGet now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn engine() -> Engine {
        let config: strata_core::config::Config =
            strata_core::config::Config::parse("limits:\n  max_concurrent_queries: 4\n", "test").expect("config");
        Engine::new(&config).expect("engine")
    }

    async fn rows(stream: QueryStream) -> usize {
        let batches: Vec<_> = stream.try_collect().await.expect("rows");
        batches.iter().map(|b| b.num_rows()).sum()
    }

    #[tokio::test]
    async fn a_started_run_is_taken_once_and_only_for_the_same_statement() {
        let engine = engine();
        let prefetcher = Prefetcher::default();
        let options = QueryOptions::default();
        let sql = "SELECT * FROM (VALUES (1), (2), (3)) AS t(x)";
        let id = prefetcher.start(&engine, sql, Vec::new(), &options).expect("started");

        // Another statement or other options under the same id: not this run.
        assert!(prefetcher.take(id, "SELECT 1", &[], &options).await.is_none());
        let strong = QueryOptions { strong_consistency: true, ..QueryOptions::default() };
        assert!(prefetcher.take(id, sql, &[], &strong).await.is_none());

        let stream = prefetcher.take(id, sql, &[], &options).await.expect("taken").expect("ran");
        assert_eq!(rows(stream).await, 3);
        assert!(prefetcher.take(id, sql, &[], &options).await.is_none(), "a run is taken once");
    }

    #[tokio::test]
    async fn runs_never_taken_are_bounded_and_give_their_permit_back_when_cancelled() {
        let engine = engine();
        let prefetcher = Prefetcher::default();
        let options = QueryOptions::default();
        // A quarter of the 4 permits may wait for a DoGet.
        let id = prefetcher.start(&engine, "SELECT 1", Vec::new(), &options).expect("started");
        assert!(prefetcher.start(&engine, "SELECT 2", Vec::new(), &options).is_none(), "bounded");
        assert_eq!(prefetcher.waiting(), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The waiting run holds the fourth permit: a fourth open query is shed...
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(engine.execute("SELECT 1", Vec::new()).await.expect("admitted"));
        }
        assert!(matches!(engine.execute("SELECT 1", Vec::new()).await, Err(StrataError::Overloaded(_))));
        // ...until the run is cancelled, which frees its permit and its place.
        prefetcher.cancel(id);
        assert_eq!(prefetcher.waiting(), 0);
        assert_eq!(rows(engine.execute("SELECT 1", Vec::new()).await.expect("admitted")).await, 1);
        drop(open);
    }
}
