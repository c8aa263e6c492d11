//! A minimal OTLP/gRPC trace receiver that keeps what it is sent in memory and shows it
//! over HTTP as JSON: the collector stand-in of the compose demo (`strata trace-sink`),
//! where Jaeger or the OpenTelemetry Collector cannot be fetched, and the receiver the
//! tracing tests run in-process. Not a trace store: it keeps the last `capacity` spans.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use serde::{Deserialize, Serialize};

/// One received span, flattened: ids in hex, the service from its resource.
#[derive(Debug, Clone, Serialize)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root.
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
}

/// The spans received, newest last, at most `capacity`.
#[derive(Clone)]
pub struct TraceSink {
    spans: Arc<Mutex<VecDeque<ReceivedSpan>>>,
    capacity: usize,
}

impl TraceSink {
    pub fn new(capacity: usize) -> Self {
        Self { spans: Arc::new(Mutex::new(VecDeque::new())), capacity: capacity.max(1) }
    }

    /// Every span held, oldest first.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.lock().iter().cloned().collect()
    }

    /// The spans of one trace (32 hex digits).
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.lock().iter().filter(|s| s.trace_id.eq_ignore_ascii_case(trace_id)).cloned().collect()
    }

    /// The OTLP trace service, to add to a tonic server.
    pub fn grpc_service(&self) -> TraceServiceServer<Self> {
        TraceServiceServer::new(self.clone())
    }

    /// `GET /v1/spans[?trace_id=...]` (JSON) and `GET /health`.
    pub fn http_router(&self) -> Router {
        Router::new().route("/v1/spans", get(list)).route("/health", get(|| async { "ok" })).with_state(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ReceivedSpan>> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keep(&self, received: Vec<ReceivedSpan>) {
        let mut spans = self.lock();
        spans.extend(received);
        let excess = spans.len().saturating_sub(self.capacity);
        spans.drain(..excess);
    }
}

#[derive(Deserialize)]
struct SpanFilter {
    trace_id: Option<String>,
}

async fn list(State(sink): State<TraceSink>, Query(filter): Query<SpanFilter>) -> axum::Json<Vec<ReceivedSpan>> {
    axum::Json(match filter.trace_id {
        Some(id) => sink.trace(&id),
        None => sink.spans(),
    })
}

#[tonic::async_trait]
impl TraceService for TraceSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .map(value_of)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span.attributes.iter().map(|kv| (kv.key.clone(), value_of(kv))).collect(),
                    });
                }
            }
        }
        tracing::debug!(spans = received.len(), "spans received");
        self.keep(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn value_of(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str) -> ReceivedSpan {
        ReceivedSpan {
            service: "s".into(),
            name: name.into(),
            trace_id: "ab".repeat(16),
            span_id: "cd".repeat(8),
            parent_span_id: String::new(),
            attributes: HashMap::new(),
        }
    }

    #[test]
    fn keeps_the_newest_spans_up_to_its_capacity() {
        let sink = TraceSink::new(2);
        sink.keep(vec![span("a"), span("b"), span("c")]);
        let names: Vec<String> = sink.spans().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(sink.trace(&"AB".repeat(16)).len(), 2);
        assert!(sink.trace("00").is_empty());
    }
}
