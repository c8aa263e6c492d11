//! An OTLP/gRPC trace receiver in the test process: the collector stand-in the tiers export
//! to. It keeps every span it is sent, with its service, so a test can rebuild the trace.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio_util::sync::CancellationToken;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root.
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
}

/// The receiver; dropping it stops the server.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    stop: CancellationToken,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind OTLP receiver");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let service = TraceServiceServer::new(Collector { spans: Arc::clone(&spans) });
        let incoming = tokio_stream_from(listener);
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, until.cancelled_owned())
                .await;
        });
        Self { addr, spans, stop }
    }

    /// `http://addr`, for `telemetry.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans").clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The spans as an indented tree, roots first (a root's parent may be outside the set: the
/// client's own span), children in the order received.
pub fn span_tree(spans: &[ReceivedSpan]) -> String {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut out = String::new();
    fn walk(spans: &[ReceivedSpan], parent: &str, depth: usize, out: &mut String) {
        for s in spans.iter().filter(|s| s.parent_span_id == parent) {
            let mut shown: Vec<_> = s
                .attributes
                .iter()
                .filter(|(k, _)| {
                    !k.starts_with("code.")
                        && !k.starts_with("thread.")
                        && !matches!(k.as_str(), "busy_ns" | "idle_ns" | "target")
                })
                .map(|(k, v)| format!("{k}={}", v.chars().take(60).collect::<String>()))
                .collect();
            shown.sort();
            let _ = writeln!(out, "{}{} [{}] {} {}", "  ".repeat(depth), s.name, s.service, s.span_id, shown.join(" "));
            walk(spans, &s.span_id, depth + 1, out);
        }
    }
    let mut roots: Vec<&str> =
        spans.iter().filter(|s| !ids.contains(s.parent_span_id.as_str())).map(|s| s.parent_span_id.as_str()).collect();
    roots.dedup();
    for root in roots {
        let _ = writeln!(out, "(parent {})", if root.is_empty() { "none" } else { root });
        walk(spans, root, 1, &mut out);
    }
    out
}

struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
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
        self.spans.lock().expect("spans").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn value_of(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
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

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
