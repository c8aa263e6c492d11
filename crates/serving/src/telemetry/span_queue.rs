//! The span processor between the tracing layer and the OTLP exporter: a bounded queue and
//! one background task that sends batches. A finished span is handed over with a
//! non-blocking `try_send`; when the queue is full (the collector down, slow or refusing)
//! it is dropped and counted, so a query never waits on telemetry. The SDK's own batch
//! processor also drops when full, but counts only for its shutdown log line; operators
//! need the count as a metric, while it happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{mpsc, oneshot};

/// Counters of the export pipeline, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub exported: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped because the collector refused them or did not answer within the timeout.
    pub dropped_export_failed: AtomicU64,
}

/// How the queue batches and how long one export may take.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    pub queue_size: usize,
    pub batch_size: usize,
    pub interval: Duration,
    pub timeout: Duration,
}

enum Message {
    Span(Box<SpanData>),
    /// Send what is queued, then answer.
    Flush(oneshot::Sender<()>),
}

/// The processor; cheap to clone the sender side, the task owns the exporter.
#[derive(Debug)]
pub struct SpanQueue {
    sender: mpsc::Sender<Message>,
    stats: Arc<ExportStats>,
}

impl SpanQueue {
    /// Starts the export task on the current Tokio runtime.
    pub fn start<E: SpanExporter + 'static>(exporter: E, settings: QueueSettings, stats: Arc<ExportStats>) -> Self {
        let (sender, receiver) = mpsc::channel(settings.queue_size);
        tokio::spawn(export_loop(exporter, receiver, settings, Arc::clone(&stats)));
        Self { sender, stats }
    }

    /// A handle that flushes the queue from async code (the tier's shutdown).
    pub fn flusher(&self) -> Flusher {
        Flusher { sender: self.sender.clone() }
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.sender.try_send(Message::Span(Box::new(span))).is_err() {
            self.stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Flushing blocks, and this is called from the SDK on any thread; the tier flushes
    /// through [`Flusher`] instead.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Flushes the queue from async code.
#[derive(Clone)]
pub struct Flusher {
    sender: mpsc::Sender<Message>,
}

impl Flusher {
    /// Sends every span queued so far; gives up after `timeout`.
    pub async fn flush(&self, timeout: Duration) -> OTelSdkResult {
        let (done, wait) = oneshot::channel();
        let sent = async {
            self.sender.send(Message::Flush(done)).await.map_err(|_| OTelSdkError::AlreadyShutdown)?;
            wait.await.map_err(|_| OTelSdkError::AlreadyShutdown)
        };
        tokio::time::timeout(timeout, sent).await.map_err(|_| OTelSdkError::Timeout(timeout))?
    }
}

async fn export_loop<E: SpanExporter>(
    exporter: E,
    mut receiver: mpsc::Receiver<Message>,
    settings: QueueSettings,
    stats: Arc<ExportStats>,
) {
    let mut batch = Vec::with_capacity(settings.batch_size);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut flushed = None;
        tokio::select! {
            message = receiver.recv() => match message {
                Some(Message::Span(span)) => {
                    batch.push(*span);
                    if batch.len() < settings.batch_size {
                        continue;
                    }
                }
                Some(Message::Flush(done)) => flushed = Some(done),
                None => {
                    send(&exporter, &mut batch, settings.timeout, &stats).await;
                    return;
                }
            },
            _ = tick.tick() => {}
        }
        send(&exporter, &mut batch, settings.timeout, &stats).await;
        if let Some(done) = flushed {
            let _ = done.send(());
        }
    }
}

async fn send<E: SpanExporter>(exporter: &E, batch: &mut Vec<SpanData>, timeout: Duration, stats: &ExportStats) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let count = spans.len() as u64;
    match tokio::time::timeout(timeout, exporter.export(spans)).await {
        Ok(Ok(())) => {
            stats.exported.fetch_add(count, Ordering::Relaxed);
        }
        Ok(Err(err)) => {
            stats.dropped_export_failed.fetch_add(count, Ordering::Relaxed);
            tracing::debug!(target: "strata_telemetry", spans = count, error = %err, "trace export failed");
        }
        Err(_) => {
            stats.dropped_export_failed.fetch_add(count, Ordering::Relaxed);
            tracing::debug!(target: "strata_telemetry", spans = count, ?timeout, "trace export timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
    use std::sync::Mutex;
    use std::time::SystemTime;

    #[derive(Debug, Default)]
    struct Recording {
        spans: Mutex<Vec<String>>,
        /// Never answers: a collector that accepted the connection and hangs.
        hang: bool,
    }

    /// The exporter half of a shared [`Recording`].
    #[derive(Debug)]
    struct Exporter(Arc<Recording>);

    impl SpanExporter for Exporter {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.0.hang {
                std::future::pending::<()>().await;
            }
            self.0.spans.lock().expect("spans").extend(batch.into_iter().map(|s| s.name.into_owned()));
            Ok(())
        }
    }

    fn span(name: &'static str) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(1),
                SpanId::from(1),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: name.into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    fn settings(queue_size: usize) -> QueueSettings {
        QueueSettings {
            queue_size,
            batch_size: 2,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn spans_are_exported_in_batches_and_on_flush() {
        let exporter = Arc::new(Recording::default());
        let stats = Arc::new(ExportStats::default());
        let queue = SpanQueue::start(Exporter(Arc::clone(&exporter)), settings(16), Arc::clone(&stats));
        for name in ["a", "b", "c"] {
            queue.on_end(span(name));
        }
        queue.flusher().flush(Duration::from_secs(5)).await.expect("flushed");
        assert_eq!(*exporter.spans.lock().expect("spans"), ["a", "b", "c"]);
        assert_eq!(stats.exported.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_collector_that_never_answers_costs_drops_not_waits() {
        let exporter = Arc::new(Recording { hang: true, ..Recording::default() });
        let stats = Arc::new(ExportStats::default());
        let queue = SpanQueue::start(Exporter(Arc::clone(&exporter)), settings(4), Arc::clone(&stats));
        // Far more than the queue holds: every call returns at once, the excess is counted.
        for _ in 0..1000 {
            queue.on_end(span("q"));
        }
        let dropped = stats.dropped_queue_full.load(Ordering::Relaxed);
        assert!(dropped >= 1000 - 4 - 2, "dropped {dropped}");
        // The batches that did go out time out and are counted too.
        let counted = || stats.dropped_export_failed.load(Ordering::Relaxed);
        for _ in 0..100 {
            if counted() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(counted() > 0);
        assert!(exporter.spans.lock().expect("spans").is_empty());
    }
}
