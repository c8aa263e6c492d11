//! A running query's result stream, carrying the limits that apply while it streams:
//! the deadline (reaching it drops the plan, which cancels its tasks and frees the CPU),
//! the row limit, and the admission permit that counts it against the concurrency limit.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::{Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;
use tracing::{Span, debug, info, warn};

use crate::encoded::{Answer, Checked, IpcFrame};
use crate::error::StrataError;
use crate::results_cache::CachedResult;

static NEXT_QUERY_ID: AtomicU64 = AtomicU64::new(1);

/// What names a query in the events it logs and in its span: its text (the first 200
/// characters) and the text's digest. The `query` span is at debug level, so that a tier
/// logging at info does no work for it on every query (a tenth of a key lookup's CPU when
/// it was at info); the events a query logs at info and above carry these themselves.
#[derive(Debug)]
pub(crate) struct QueryLabel {
    pub sql: Box<str>,
    pub digest: u64,
}

impl QueryLabel {
    pub(crate) fn of(text: &str) -> Self {
        // A text of at most 200 bytes has at most 200 characters: not walked char by char.
        let sql = match text.len() > 200 {
            true => text.char_indices().nth(200).map_or(text, |(end, _)| &text[..end]),
            false => text,
        };
        Self { sql: sql.into(), digest: digest(text) }
    }

    /// The digest as logged: 16 hex digits.
    pub(crate) fn digest_hex(&self) -> DigestHex {
        DigestHex(self.digest)
    }
}

/// A [`QueryLabel`]'s digest, written as 16 hex digits.
pub(crate) struct DigestHex(u64);

impl std::fmt::Display for DigestHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// FNV-1a of the query text: a short stable key to group a statement's traces and logs by
/// (the same text gives the same digest on every tier and every release).
fn digest(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A process-unique id for logs and responses.
pub fn next_query_id() -> u64 {
    NEXT_QUERY_ID.fetch_add(1, Ordering::Relaxed)
}

/// How a finished query ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
    /// The client went away before the end.
    Cancelled,
    /// Refused at admission: `limits.max_concurrent_queries` were running.
    Shed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Shed => "shed",
        }
    }
}

/// What the observer learns of a query once it ended.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    pub outcome: Outcome,
    pub rows: u64,
    /// Arrow bytes of the batches returned (their in-memory size, not the wire encoding;
    /// for an answer passed on as another tier encoded it, its messages' bodies).
    pub bytes: u64,
    /// From admission to the end of the answer.
    pub elapsed: Duration,
    /// `None` for a query refused before it was routed.
    pub route: Option<&'a crate::routing::RouteInfo>,
}

impl Finished<'_> {
    /// A query that ended before it answered anything.
    pub fn unanswered(outcome: Outcome, elapsed: Duration) -> Finished<'static> {
        Finished { outcome, rows: 0, bytes: 0, elapsed, route: None }
    }
}

/// Called once when a query stream ends.
pub type QueryObserver = std::sync::Arc<dyn Fn(Finished<'_>) + Send + Sync>;

/// The bounds a query streams under.
pub(crate) struct StreamLimits {
    pub deadline: tokio::time::Instant,
    pub timeout: Duration,
    pub max_rows: u64,
    /// The setting `max_rows` comes from, named in the error (borrowed: nearly always the
    /// tier's own `limits.max_result_rows`, not a string made per query).
    pub rows_limit: std::borrow::Cow<'static, str>,
    /// The memory limits the query runs under besides `limits.memory_limit` (its tenants'),
    /// named when an operator fails for memory without saying which pool refused it.
    pub tenant_memory_limits: Vec<String>,
    /// A query that takes longer is logged at `info` with its SQL; others at `debug` only
    /// (one line per query would cost more than a lookup's execution at high rates).
    pub slow_query: Duration,
}

/// Result batches of one query, streamed; never buffered whole.
pub struct QueryStream {
    id: u64,
    schema: SchemaRef,
    /// `None` once it ended (or its frames were taken by [`QueryStream::into_frames`]).
    inner: Option<Answer>,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    max_rows: u64,
    rows_limit: std::borrow::Cow<'static, str>,
    tenant_memory_limits: Vec<String>,
    slow_query: Duration,
    rows: u64,
    bytes: u64,
    started: Instant,
    /// The query's span: entered while the plan is polled (so spans of its operators and
    /// source reads are its children) and closed when the stream ends.
    span: Span,
    label: QueryLabel,
    outcome: Option<Outcome>,
    observer: Option<QueryObserver>,
    route: crate::routing::RouteInfo,
    _permit: OwnedSemaphorePermit,
    /// A slot of `limits.max_running_queries`, held while a query that runs here streams.
    _running: Option<OwnedSemaphorePermit>,
    /// Slots of its tenants' `max_concurrent_queries`, held until the answer ends.
    _tenant_slots: Vec<OwnedSemaphorePermit>,
    /// The results cache's answer this stream reads, when it reads one.
    cached: Option<Arc<CachedResult>>,
}

impl QueryStream {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        inner: Answer,
        permit: OwnedSemaphorePermit,
        limits: StreamLimits,
        started: Instant,
        (span, label): (Span, QueryLabel),
        observer: Option<QueryObserver>,
        route: crate::routing::RouteInfo,
    ) -> Self {
        span.record("route", route.route.as_str());
        span.record("reason", route.reason.as_str());
        // Formatted only for a span that records (most queries' is off).
        if !route.versions.is_empty() && !span.is_disabled() {
            span.record("versions", route.versions_header());
        }
        if let Some(cache) = route.cache {
            span.record("cache", cache.as_str());
        }
        Self {
            id,
            schema: inner.schema(),
            inner: Some(inner),
            deadline: Box::pin(tokio::time::sleep_until(limits.deadline)),
            timeout: limits.timeout,
            max_rows: limits.max_rows,
            rows_limit: limits.rows_limit,
            tenant_memory_limits: limits.tenant_memory_limits,
            slow_query: limits.slow_query,
            rows: 0,
            bytes: 0,
            started,
            span,
            label,
            outcome: None,
            observer,
            route,
            _permit: permit,
            _running: None,
            _tenant_slots: Vec::new(),
            cached: None,
        }
    }

    /// Marks the stream as made of `cached`, an answer of the results cache.
    pub(crate) fn with_cached(mut self, cached: Option<Arc<CachedResult>>) -> Self {
        self.cached = cached;
        self
    }

    /// The results cache's whole answer this stream yields, when it yields one: a server
    /// may send the body it kept of it ([`CachedResult::rendering`]) instead of encoding
    /// the batches again (it still reads the stream, which applies the query's limits and
    /// records its end).
    pub fn cached(&self) -> Option<&Arc<CachedResult>> {
        self.cached.as_ref()
    }

    /// Holds `slots` (of tenants' `max_concurrent_queries`) until the stream ends.
    pub(crate) fn with_tenant_slots(mut self, slots: Vec<OwnedSemaphorePermit>) -> Self {
        self._tenant_slots = slots;
        self
    }

    /// Holds `slot` (of `limits.max_running_queries`) until the stream ends.
    pub(crate) fn with_running_slot(mut self, slot: Option<OwnedSemaphorePermit>) -> Self {
        self._running = slot;
        self
    }

    /// The query id used in logs.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where the query ran and which dataset versions it read.
    pub fn route(&self) -> &crate::routing::RouteInfo {
        &self.route
    }

    /// Schema of every batch this stream yields.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn finish(&mut self, outcome: Outcome, error: Option<&StrataError>) {
        self.inner = None;
        if self.outcome.is_some() {
            return;
        }
        self.outcome = Some(outcome);
        let elapsed = self.started.elapsed();
        self.span.record("rows", self.rows);
        self.span.record("bytes", self.bytes);
        self.span.record("outcome", outcome.as_str());
        let _enter = self.span.enter();
        let (id, rows, ms) = (self.id, self.rows, elapsed.as_secs_f64() * 1e3);
        let (sql, digest, route) = (&self.label.sql, self.label.digest_hex(), self.route.route.as_str());
        match (outcome, error) {
            (Outcome::Ok, _) if elapsed >= self.slow_query => {
                info!(query_id = id, sql, sql_digest = %digest, route, rows, ms, "slow query finished")
            }
            (Outcome::Ok, _) => debug!(query_id = id, rows, ms, "query finished"),
            (_, Some(err)) => {
                warn!(query_id = id, sql, sql_digest = %digest, route, rows, ms, error = %err, "query failed")
            }
            (_, None) => {
                info!(query_id = id, sql, sql_digest = %digest, route, rows, ms, "query cancelled by the client")
            }
        }
        if let Some(observer) = &self.observer {
            observer(Finished { outcome, rows: self.rows, bytes: self.bytes, elapsed, route: Some(&self.route) });
        }
    }
}

/// `err` naming `tenant_limits` too when it is a memory failure that names only
/// `limits.memory_limit`: an operator that could not spill (no disk) reports no pool, so
/// the tenant's limit may be the one that refused it.
pub(crate) fn name_memory_limits(err: StrataError, tenant_limits: &[String]) -> StrataError {
    const SHARED: &str = "(limits.memory_limit)";
    if tenant_limits.is_empty() {
        return err;
    }
    let named =
        |msg: String| msg.replacen(SHARED, &format!("({} or limits.memory_limit)", tenant_limits.join(", ")), 1);
    match err {
        StrataError::ResourcesExhausted(msg) if msg.contains(SHARED) => StrataError::ResourcesExhausted(named(msg)),
        // The same failure as the results cache hands it to every query that waited on it.
        StrataError::Remote { kind: crate::error::ErrorKind::ResourcesExhausted, message }
            if message.contains(SHARED) =>
        {
            StrataError::Remote { kind: crate::error::ErrorKind::ResourcesExhausted, message: named(message) }
        }
        err => err,
    }
}

impl QueryStream {
    /// The answer's IPC messages as another tier sent them (a forwarded query), for a server
    /// to pass on without decoding and encoding them again, under the same deadline and row
    /// limit; the stream itself for an answer made here, or one already read as batches.
    pub fn into_delivery(mut self) -> Delivery {
        match self.inner.take() {
            Some(Answer::Encoded(encoded)) => {
                Delivery::Frames(FramedAnswer { frames: encoded.into_checked(), query: self })
            }
            other => {
                self.inner = other;
                Delivery::Batches(self)
            }
        }
    }

    /// Counts what was streamed and refuses an answer past its row limit.
    fn tally(&mut self, rows: u64, bytes: u64) -> Result<(), StrataError> {
        self.rows += rows;
        self.bytes += bytes;
        if self.rows > self.max_rows {
            let err = StrataError::ResourcesExhausted(format!(
                "result exceeds the limit of {} rows ({})",
                self.max_rows, self.rows_limit
            ));
            return Err(self.fail(err));
        }
        Ok(())
    }

    /// Ends the query with `err`, which is returned to be streamed.
    fn fail(&mut self, err: StrataError) -> StrataError {
        let err = name_memory_limits(err, &self.tenant_memory_limits);
        self.finish(Outcome::Error, Some(&err));
        err
    }

    /// While the answer is pending: the timeout once the deadline passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<Option<StrataError>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            let err = StrataError::Timeout(self.timeout);
            self.finish(Outcome::Error, Some(&err));
            return Poll::Ready(Some(err));
        }
        Poll::Pending
    }
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch, StrataError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // An encoded answer read as batches: decoded from here on.
        if matches!(this.inner, Some(Answer::Encoded(_)))
            && let Some(encoded) = this.inner.take()
        {
            this.inner = Some(Answer::Batches(encoded.into_batches()));
        }
        let Some(Answer::Batches(inner)) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = this.span.in_scope(|| inner.poll_next_unpin(cx));
        match polled {
            Poll::Ready(Some(Ok(batch))) => {
                match this.tally(batch.num_rows() as u64, batch.get_array_memory_size() as u64) {
                    Ok(()) => Poll::Ready(Some(Ok(batch))),
                    Err(err) => Poll::Ready(Some(Err(err))),
                }
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(this.fail(StrataError::from(err))))),
            Poll::Ready(None) => {
                this.finish(Outcome::Ok, None);
                Poll::Ready(None)
            }
            Poll::Pending => this.poll_deadline(cx).map(|err| err.map(Err)),
        }
    }
}

/// How a query's answer can leave this tier: see [`QueryStream::into_delivery`].
pub enum Delivery {
    /// Another tier's messages, to pass on as they are.
    Frames(FramedAnswer),
    /// Batches, to encode.
    Batches(QueryStream),
}

/// A forwarded answer's IPC messages, passed on as the upstream sent them (see
/// [`crate::encoded`]): checked in order (a schema with the column types planned here
/// first), each record batch's rows (from its header) counted against the row limit, and
/// the query ends, as a [`QueryStream`] does, at its last message, its first error, its
/// deadline, or when dropped.
pub struct FramedAnswer {
    query: QueryStream,
    frames: Checked,
}

impl FramedAnswer {
    /// Where the query ran and which dataset versions it read.
    pub fn route(&self) -> &crate::routing::RouteInfo {
        &self.query.route
    }
}

impl Stream for FramedAnswer {
    type Item = Result<IpcFrame, StrataError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.query.outcome.is_some() {
            return Poll::Ready(None);
        }
        let polled = this.query.span.in_scope(|| this.frames.poll_next_unpin(cx));
        match polled {
            Poll::Ready(Some(Ok((frame, rows)))) => match this.query.tally(rows, frame.body.len() as u64) {
                Ok(()) => Poll::Ready(Some(Ok(frame))),
                Err(err) => Poll::Ready(Some(Err(err))),
            },
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(this.query.fail(err)))),
            Poll::Ready(None) => {
                this.query.finish(Outcome::Ok, None);
                Poll::Ready(None)
            }
            Poll::Pending => this.query.poll_deadline(cx).map(|err| err.map(Err)),
        }
    }
}

impl Drop for QueryStream {
    fn drop(&mut self) {
        if self.outcome.is_none() {
            self.finish(Outcome::Cancelled, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_keeps_the_first_200_characters_of_any_text() {
        let short = "SELECT * FROM t WHERE id = 1";
        assert_eq!(&*QueryLabel::of(short).sql, short);
        let ascii = "x".repeat(200);
        assert_eq!(&*QueryLabel::of(&ascii).sql, ascii);
        assert_eq!(QueryLabel::of(&"y".repeat(201)).sql.len(), 200);
        // 150 two-byte characters: 300 bytes, kept whole; 250 of them cut at a character.
        let wide = "é".repeat(150);
        assert_eq!(&*QueryLabel::of(&wide).sql, wide);
        let wider = "é".repeat(250);
        assert_eq!(QueryLabel::of(&wider).sql.chars().count(), 200);
        assert_eq!(QueryLabel::of(&wider).digest, QueryLabel::of(&wider).digest);
        assert_ne!(QueryLabel::of(&wider).digest, QueryLabel::of(&wide).digest, "the digest is of the whole text");
    }
}
