//! The HTTP API: `POST /v1/sql` (streamed JSON, CSV or Arrow IPC), health, readiness,
//! dataset status and on-demand refresh, and Prometheus metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{StreamExt, stream};
use serde_json::json;
use strata_core::results_cache::CachedResult;
use strata_core::{Engine, StrataError};

use crate::metrics::Metrics;
use crate::status;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    /// Set on shutdown so load balancers stop sending traffic before the process exits.
    pub draining: Arc<AtomicBool>,
    /// The keys every route but `/health` requires (none without `auth:`).
    pub auth: Option<Arc<crate::auth::Authenticator>>,
}

/// The HTTP routes; `crate::stack::http` puts the layers around them.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/ready", get(ready))
        .route("/v1/datasets", get(datasets))
        .route("/v1/datasets/{name}/refresh", post(refresh))
        .route("/v1/sql", post(sql))
        .route("/v1/ingest/{dataset}", post(ingest))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// What the caller of `headers` may read and do (its tenant was marked by the
/// authentication layer).
fn access(state: &HttpState, headers: &HeaderMap) -> strata_core::auth::Access {
    state.engine.access(&crate::route_headers::options(headers))
}

/// The operator endpoints answer only tenants marked `operator: true` (when `auth:` is on).
/// The refusal to send, when the caller may not use `what`.
fn unless_operator(state: &HttpState, headers: &HeaderMap, what: &str) -> Option<Response> {
    let forbidden = || error_response(&StrataError::Forbidden(format!("{what} needs a key of an operator tenant")));
    (!access(state, headers).is_operator()).then(forbidden)
}

async fn ready(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let draining = state.draining.load(Ordering::Relaxed);
    let ready = state.engine.is_ready() && !draining;
    let access = access(&state, &headers);
    let pending: Vec<String> = state
        .engine
        .datasets()
        .into_iter()
        .filter(|d| d.accelerated && d.version.is_none() && access.allows(&d.name))
        .map(|d| d.name)
        .collect();
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(json!({"ready": ready, "draining": draining, "pending": pending}))).into_response()
}

/// A tenant sees its datasets only; the edge's dead letters and backlog and the upstream
/// endpoints are for operators.
async fn datasets(State(state): State<HttpState>, headers: HeaderMap) -> impl IntoResponse {
    let access = access(&state, &headers);
    let operator = access.is_operator();
    let visible: Vec<_> = state.engine.datasets().into_iter().filter(|d| access.allows(&d.name)).collect();
    let mut body = json!({"region": state.engine.region(), "datasets": visible});
    if let Some(writes) = state.engine.writes().filter(|_| operator) {
        body["dead_letter"] = json!(writes.dead_letters());
        body["backlog"] = json!(writes.backlog());
    } else if operator {
        body["dead_letter"] = json!([]);
    }
    // What the upstream tiers advertise, so one call shows a tier and its upstream.
    let upstream: Vec<_> = state
        .engine
        .upstream_catalog()
        .iter()
        .filter(|e| access.allows(&e.name))
        .map(|e| {
            json!({
                "name": e.name,
                "home_region": e.home_region,
                "accelerated": e.accelerated,
                "version": e.version,
                "rows": e.rows,
                "age_seconds": e.refreshed_at.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64()),
            })
        })
        .collect();
    if !upstream.is_empty() {
        body["upstream"] = json!(upstream);
    }
    if !upstream.is_empty() && operator {
        body["upstream_endpoints"] = state
            .engine
            .upstream_health()
            .iter()
            .map(|u| json!({"upstream": u.upstream, "endpoint": u.endpoint, "breaker": u.breaker}))
            .collect();
    }
    axum::Json(body)
}

async fn refresh(State(state): State<HttpState>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if !access(&state, &headers).allows(&name) {
        return error_response(&StrataError::UnknownDataset(name));
    }
    if let Some(refused) = unless_operator(&state, &headers, "a refresh on demand") {
        return refused;
    }
    match state.engine.refresh(&name).await {
        Ok(status) => axum::Json(status).into_response(),
        Err(err) => error_response(&err),
    }
}

async fn metrics(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(refused) = unless_operator(&state, &headers, "/metrics") {
        return refused;
    }
    let mut text = state.metrics.render(&state.engine);
    if let Some(auth) = &state.auth {
        crate::metrics::render_auth(&mut text, auth);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// A JSON error body with the error kind and its message.
pub fn error_response(err: &StrataError) -> Response {
    let body = json!({"error": {"kind": status::kind(err), "message": err.to_string()}});
    (status::to_http(err), axum::Json(body)).into_response()
}

/// The id of the query that made an answer, as its logs and span name it.
const QUERY_ID_HEADER: axum::http::HeaderName = axum::http::HeaderName::from_static("strata-query-id");

/// Result bytes held back before the status line is sent.
const RESPONSE_HEAD_BYTES: usize = 1 << 20;

#[derive(Clone, Copy)]
enum Format {
    Json,
    Csv,
    Arrow,
}

impl Format {
    fn from_accept(headers: &HeaderMap) -> Self {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
        if accept.contains("application/vnd.apache.arrow.stream") {
            Format::Arrow
        } else if accept.contains("text/csv") {
            Format::Csv
        } else {
            Format::Json
        }
    }

    /// What a body rendered in this format is kept under with a cached answer.
    fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Arrow => "arrow",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// `POST /v1/ingest/{dataset}`: rows as Arrow IPC stream, NDJSON or CSV (with header), by
/// Content-Type. Answers once the rows are durable.
async fn ingest(
    State(state): State<HttpState>,
    axum::extract::Path(dataset): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(writes) = state.engine.writes() else {
        return error_response(&StrataError::NotSupported(
            "this tier accepts no writes; write to an edge-agent".into(),
        ));
    };
    if !access(&state, &headers).allows(&dataset) {
        return error_response(&StrataError::UnknownDataset(dataset));
    }
    let schema = match writes.schema(&dataset) {
        Ok(s) => s,
        Err(err) => return error_response(&err),
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let max_body = state.engine.limits().max_request_body.as_usize();
    let batches = match decode_rows(content_type, schema, body, max_body) {
        Ok(b) => b,
        Err(err) => return error_response(&err),
    };
    match writes.write(&dataset, batches).await {
        Ok(receipt) => axum::Json(receipt).into_response(),
        Err(err) => error_response(&err),
    }
}

fn decode_rows(
    content_type: &str,
    schema: arrow::datatypes::SchemaRef,
    body: Bytes,
    max_body: usize,
) -> Result<Vec<arrow::array::RecordBatch>, StrataError> {
    let bad = |format: &str, e: arrow::error::ArrowError| {
        StrataError::InvalidRequest(format!("cannot read the {format} body: {e}"))
    };
    if content_type.starts_with("application/vnd.apache.arrow.stream") {
        strata_core::ipc::read_batches(&body, max_body, "limits.max_request_body")
    } else if content_type.starts_with("text/csv") {
        strata_core::writes::read_csv(&body, &schema)
    } else if content_type.starts_with("application/x-ndjson") || content_type.starts_with("application/json") {
        // Strict: a key that is no column (`vaule` for `value`) is refused, not stored as NULL.
        let reader = arrow::json::ReaderBuilder::new(schema)
            .with_strict_mode(true)
            .build(std::io::Cursor::new(body))
            .map_err(|e| bad("NDJSON", e))?;
        reader.collect::<Result<Vec<_>, _>>().map_err(|e| bad("NDJSON", e))
    } else {
        Err(StrataError::InvalidRequest(format!(
            "unsupported Content-Type `{content_type}`: use application/vnd.apache.arrow.stream, application/x-ndjson or text/csv"
        )))
    }
}

async fn sql(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(sql) = std::str::from_utf8(&body) else {
        return error_response(&StrataError::Parse("request body is not valid UTF-8".into()));
    };
    let format = Format::from_accept(&headers);
    let options = crate::route_headers::options(&headers);
    let mut results = match state.engine.execute_with(sql, Vec::new(), &options).await {
        Ok(s) => s,
        Err(err) => return error_response(&err),
    };
    let schema = results.schema();
    // The answer's headers are made now, from the route the stream holds (not a copy of it
    // kept for later: its strings were copied on every answer).
    let mut headers = HeaderMap::with_capacity(12);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    headers.insert(QUERY_ID_HEADER, HeaderValue::from(results.id()));
    crate::route_headers::insert(&mut headers, results.route());
    // Hold back the first rows (up to a small budget) before sending headers, so errors found
    // early (almost all of them, row limits on modest results included) get a proper status
    // code rather than a truncated 200. Larger results then stream.
    let mut head = Vec::new();
    let mut held = 0usize;
    let mut complete = false;
    while held < RESPONSE_HEAD_BYTES {
        match results.next().await {
            Some(Ok(batch)) => {
                held += batch.get_array_memory_size();
                head.push(batch);
            }
            Some(Err(err)) => return error_response(&err),
            None => {
                complete = true;
                break;
            }
        }
    }
    let body = if complete {
        // The whole answer is here: one body with its length, written at once (most
        // answers; a stream would cost a chunk, and its framing, per batch).
        match whole_body(format, &schema, &head, results.cached()) {
            Ok(bytes) => Body::from(bytes),
            Err(err) => return error_response(&StrataError::from(err)),
        }
    } else {
        let mut encoder = match Encoder::new(format, &schema) {
            Ok(e) => e,
            Err(err) => return error_response(&StrataError::from(err)),
        };
        let opening = encoder.take();
        let encoder = Arc::new(std::sync::Mutex::new(encoder));
        let for_batches = Arc::clone(&encoder);
        let body = stream::once(async move { Ok::<_, StrataError>(opening) })
            .chain(stream::iter(head.into_iter().map(Ok)).chain(results).map(move |item| {
                let batch = item?;
                let mut enc = for_batches.lock().map_err(|_| StrataError::Internal("encoder poisoned".into()))?;
                Ok(enc.batch(&batch)?)
            }))
            .chain(stream::once(async move {
                let mut enc = encoder.lock().map_err(|_| StrataError::Internal("encoder poisoned".into()))?;
                Ok(enc.close()?)
            }));
        Body::from_stream(body)
    };
    let mut response = Response::new(body);
    *response.headers_mut() = headers;
    response
}

/// A whole answer's body in `format`: the one kept with the results cache's answer it was
/// read from, or encoded now (and kept with that answer for the next hit). The rows were
/// still read from the query's stream, so its limits and accounting applied.
fn whole_body(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    cached: Option<&Arc<CachedResult>>,
) -> Result<Bytes, arrow::error::ArrowError> {
    if let Some(body) = cached.and_then(|answer| answer.rendering(format.name())) {
        return Ok(body);
    }
    let body = Encoder::new(format, schema)?.whole(batches)?;
    if let Some(answer) = cached {
        answer.keep_rendering(format.name(), body.clone());
    }
    Ok(body)
}

/// What a whole JSON answer's buffer starts with: a lookup's row or a dashboard's few fit.
const WHOLE_JSON_CAPACITY: usize = 1024;

/// Rows as a JSON array of objects, nulls written out (`"v":null`), as every JSON answer is.
fn json_array_writer(out: Vec<u8>) -> arrow::json::Writer<Vec<u8>, arrow::json::writer::JsonArray> {
    arrow::json::WriterBuilder::new().with_explicit_nulls(true).build::<_, arrow::json::writer::JsonArray>(out)
}

/// Turns batches into the bytes of one response format, one chunk per batch.
struct Encoder {
    kind: EncoderKind,
    buffer: Vec<u8>,
}

enum EncoderKind {
    /// `wrote_row` decides whether the next row needs a separating comma.
    Json {
        wrote_row: bool,
    },
    Csv,
    Arrow(Box<arrow::ipc::writer::StreamWriter<Vec<u8>>>),
}

impl Encoder {
    /// An encoder whose first [`Encoder::take`] yields the opening bytes (`[`, the CSV
    /// header, or the Arrow schema message), so even an empty result is well formed.
    fn new(format: Format, schema: &SchemaRef) -> Result<Self, arrow::error::ArrowError> {
        let mut buffer = Vec::new();
        let kind = match format {
            Format::Json => {
                buffer.push(b'[');
                EncoderKind::Json { wrote_row: false }
            }
            Format::Csv => {
                let empty = RecordBatch::new_empty(Arc::clone(schema));
                arrow::csv::WriterBuilder::new().with_header(true).build(&mut buffer).write(&empty)?;
                EncoderKind::Csv
            }
            Format::Arrow => {
                EncoderKind::Arrow(Box::new(arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)?))
            }
        };
        let mut encoder = Self { kind, buffer };
        encoder.drain_writer();
        Ok(encoder)
    }

    fn drain_writer(&mut self) {
        if let EncoderKind::Arrow(writer) = &mut self.kind {
            self.buffer.append(writer.get_mut());
        }
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.buffer))
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<Bytes, arrow::error::ArrowError> {
        match &mut self.kind {
            EncoderKind::Json { wrote_row } => {
                if batch.num_rows() > 0 {
                    let mut writer = json_array_writer(Vec::new());
                    writer.write(batch)?;
                    writer.finish()?;
                    let array = writer.into_inner();
                    // `[{..},{..}]` -> `{..},{..}`, joined to earlier batches with a comma.
                    if array.len() > 2 {
                        if *wrote_row {
                            self.buffer.push(b',');
                        }
                        self.buffer.extend_from_slice(&array[1..array.len() - 1]);
                        *wrote_row = true;
                    }
                }
            }
            EncoderKind::Csv => {
                arrow::csv::WriterBuilder::new().with_header(false).build(&mut self.buffer).write(batch)?;
            }
            EncoderKind::Arrow(writer) => writer.write(batch)?,
        }
        self.drain_writer();
        Ok(self.take())
    }

    /// Every batch of an answer, from the opening bytes to the closing ones, as one buffer.
    fn whole(mut self, batches: &[RecordBatch]) -> Result<Bytes, arrow::error::ArrowError> {
        if let EncoderKind::Json { .. } = self.kind {
            // One JSON array writer for the whole answer: no writer, buffer and copy per
            // batch (most of what a small answer's encoding cost besides the values).
            let mut writer = json_array_writer(Vec::with_capacity(WHOLE_JSON_CAPACITY));
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            return Ok(Bytes::from(writer.into_inner()));
        }
        let mut all = Vec::from(self.take());
        for batch in batches {
            all.extend_from_slice(&self.batch(batch)?);
        }
        all.extend_from_slice(&self.close()?);
        Ok(Bytes::from(all))
    }

    fn close(&mut self) -> Result<Bytes, arrow::error::ArrowError> {
        match &mut self.kind {
            EncoderKind::Json { .. } => self.buffer.push(b']'),
            EncoderKind::Csv => {}
            EncoderKind::Arrow(writer) => writer.finish()?,
        }
        self.drain_writer();
        Ok(self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    /// Batches with nulls, an empty batch between two full ones, and characters JSON escapes.
    fn answer() -> (SchemaRef, Vec<RecordBatch>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
            Field::new("x", DataType::Float64, true),
        ]));
        let batch = |ids: Vec<i64>, vs: Vec<Option<&str>>, xs: Vec<Option<f64>>| {
            let columns: Vec<arrow::array::ArrayRef> = vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(vs)),
                Arc::new(Float64Array::from(xs)),
            ];
            RecordBatch::try_new(Arc::clone(&schema), columns).expect("batch")
        };
        let batches = vec![
            batch(vec![1, 2], vec![Some("a \"quoted\"\n"), None], vec![Some(0.5), None]),
            batch(vec![], vec![], vec![]),
            batch(vec![3], vec![Some("é")], vec![Some(-1e21)]),
        ];
        (schema, batches)
    }

    /// The bytes of an answer sent as a stream: the opening, a chunk per batch, the closing.
    fn streamed(format: Format, schema: &SchemaRef, batches: &[RecordBatch]) -> Vec<u8> {
        let mut encoder = Encoder::new(format, schema).expect("encoder");
        let mut out = Vec::from(encoder.take());
        for batch in batches {
            out.extend_from_slice(&encoder.batch(batch).expect("batch"));
        }
        out.extend_from_slice(&encoder.close().expect("close"));
        out
    }

    #[test]
    fn a_whole_answer_is_the_same_bytes_as_the_streamed_one() {
        let (schema, batches) = answer();
        for format in [Format::Json, Format::Csv, Format::Arrow] {
            for take in 0..=batches.len() {
                let part = &batches[..take];
                let whole = Encoder::new(format, &schema).expect("encoder").whole(part).expect("whole");
                assert_eq!(whole.as_ref(), streamed(format, &schema, part).as_slice(), "{} batches", part.len());
            }
        }
        let json = Encoder::new(Format::Json, &schema).expect("encoder").whole(&batches).expect("whole");
        let rows: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
        assert_eq!(rows[1], serde_json::json!({"id": 2, "v": null, "x": null}), "nulls written out");
        assert_eq!(rows.as_array().map(Vec::len), Some(3));
        let none = Encoder::new(Format::Json, &schema).expect("encoder").whole(&[]).expect("whole");
        assert_eq!(none.as_ref(), b"[]");
    }
}
