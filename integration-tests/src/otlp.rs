//! An OTLP/gRPC trace receiver in the test process: the collector stand-in the tiers export
//! to. It keeps every span it is sent, with its service, so a test can rebuild the trace.

use std::fmt::Write;
use std::net::SocketAddr;

pub use strata_serving::trace_sink::ReceivedSpan;
use strata_serving::trace_sink::TraceSink;
use tokio_util::sync::CancellationToken;

/// The receiver; dropping it stops the server.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    sink: TraceSink,
    stop: CancellationToken,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind OTLP receiver");
        let addr = listener.local_addr().expect("addr");
        let sink = TraceSink::new(1_000_000);
        let stop = CancellationToken::new();
        let service = sink.grpc_service();
        let incoming = tokio_stream_from(listener);
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, until.cancelled_owned())
                .await;
        });
        Self { addr, sink, stop }
    }

    /// `http://addr`, for `telemetry.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.sink.spans()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.sink.trace(trace_id)
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

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
