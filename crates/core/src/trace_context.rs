//! W3C trace context (`traceparent`, `tracestate`) in and out of a tier, so one trace
//! follows a query from the client through every tier it crosses to its source.
//!
//! Interfaces read the two values from request headers or the tier protocol's
//! `QueryContext` into [`TraceParent`]; the engine makes its query span a child of that
//! context; a tier that calls another writes the context of its *current* span, so the
//! callee's spans hang under the caller's call span, not under the client's.
//!
//! With no OpenTelemetry layer installed (telemetry off), spans carry no context: a tier
//! then passes the caller's context on unchanged, so a trace still links across it.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace context of a caller, as it arrived (both empty when it sent none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceParent {
    /// `version-traceid-parentid-flags`, e.g. `00-4bf9...-00f0...-01`.
    pub traceparent: String,
    /// Vendor entries carried along unchanged.
    pub tracestate: String,
}

impl TraceParent {
    pub fn new(traceparent: impl Into<String>, tracestate: impl Into<String>) -> Self {
        Self { traceparent: traceparent.into(), tracestate: tracestate.into() }
    }

    pub fn is_empty(&self) -> bool {
        self.traceparent.is_empty()
    }

    /// The trace id (32 hex digits) of a well-formed `traceparent`.
    pub fn trace_id(&self) -> Option<&str> {
        let mut parts = self.traceparent.split('-');
        let (_version, trace_id) = (parts.next()?, parts.next()?);
        (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace_id)
    }

    fn context(&self) -> opentelemetry::Context {
        let mut carrier = HashMap::with_capacity(2);
        carrier.insert("traceparent".to_string(), self.traceparent.clone());
        if !self.tracestate.is_empty() {
            carrier.insert("tracestate".to_string(), self.tracestate.clone());
        }
        TraceContextPropagator::new().extract(&carrier)
    }
}

/// Makes `span` a child of the caller's context, when the caller sent a valid one and
/// tracing is on. Call it before the span is first entered (its parent is fixed then).
pub fn adopt(span: &tracing::Span, caller: &TraceParent) {
    if caller.is_empty() {
        return;
    }
    let context = caller.context();
    if context.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed or the span is disabled:
        // then there is no trace to join.
        let _ = span.set_parent(context);
    }
}

/// The context to send to the next tier from inside `span`: the span's own when tracing is
/// on, otherwise `fallback` (the caller's), so the trace is not cut at a tier that does not
/// export.
pub fn outgoing(span: &tracing::Span, fallback: &TraceParent) -> TraceParent {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return fallback.clone();
    }
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    TraceParent {
        traceparent: carrier.remove("traceparent").unwrap_or_default(),
        tracestate: carrier.remove("tracestate").unwrap_or_default(),
    }
}

/// The trace id of `span` (32 hex digits) when tracing is on, else that of `fallback`.
pub fn trace_id(span: &tracing::Span, fallback: &TraceParent) -> Option<String> {
    outgoing(span, fallback).trace_id().map(str::to_string)
}

/// Makes the tasks DataFusion spawns for a plan (repartitions, merges, parallel file
/// reads) run inside the span that spawned them, so their source reads stay in the query's
/// trace. Process-wide; the first call wins, later ones do nothing.
pub fn propagate_into_datafusion_tasks() {
    let _ = datafusion::common::runtime::set_join_set_tracer(&SpanPropagation);
}

struct SpanPropagation;

type Erased = Box<dyn std::any::Any + Send>;

impl datafusion::common::runtime::JoinSetTracer for SpanPropagation {
    fn trace_future(
        &self,
        fut: futures::future::BoxFuture<'static, Erased>,
    ) -> futures::future::BoxFuture<'static, Erased> {
        use futures::FutureExt;
        use tracing::Instrument;
        fut.instrument(tracing::Span::current()).boxed()
    }

    fn trace_block(&self, f: Box<dyn FnOnce() -> Erased + Send>) -> Box<dyn FnOnce() -> Erased + Send> {
        let span = tracing::Span::current();
        Box::new(move || span.in_scope(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn trace_id_of_a_well_formed_traceparent() {
        assert_eq!(TraceParent::new(PARENT, "").trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(TraceParent::new("00-xyz-00f067aa0ba902b7-01", "").trace_id(), None);
        assert_eq!(TraceParent::new("garbage", "").trace_id(), None);
        assert_eq!(TraceParent::default().trace_id(), None);
    }

    #[test]
    fn without_a_tracing_layer_the_callers_context_passes_through() {
        let caller = TraceParent::new(PARENT, "vendor=1");
        let span = tracing::info_span!("query");
        adopt(&span, &caller);
        assert_eq!(outgoing(&span, &caller), caller);
        assert_eq!(outgoing(&span, &TraceParent::default()), TraceParent::default());
    }

    #[test]
    fn malformed_context_is_ignored_not_an_error() {
        // A careless client's header: the query runs, untraced.
        for bad in ["", "00-", "00-00000000000000000000000000000000-0000000000000000-01", "\u{0}\u{ff}"] {
            adopt(&tracing::info_span!("query"), &TraceParent::new(bad, "x"));
        }
    }
}
