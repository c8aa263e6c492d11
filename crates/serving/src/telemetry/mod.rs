//! Logs and traces, set up once per process for every binary: `tracing` events to stderr
//! (pretty or JSON) and, when `telemetry.otlp_endpoint` is set, spans exported over
//! OTLP/gRPC through tracing-opentelemetry.
//!
//! What is exported: the spans of Strata's own crates (queries and their phases, forwards
//! and upstream calls, source reads, refreshes, replication, edge uploads) at `debug` and
//! above, whatever `RUST_LOG` says for the logs; their events at `info` and above. Spans of
//! the libraries underneath (tonic, hyper, h2) are left out: they would outnumber the
//! query's own many times over and say little an operator can act on.

mod span_queue;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use strata_core::config::TelemetryConfig;
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use span_queue::ExportStats;
use span_queue::{Flusher, QueueSettings, SpanQueue};

/// Why trace export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint `{endpoint}`: {message}")]
pub struct TelemetryError {
    endpoint: String,
    message: String,
}

/// The process's export counters (one tracing subscriber per process); zero while tracing
/// is off, so the metrics exist either way.
pub fn export_stats() -> Arc<ExportStats> {
    static STATS: OnceLock<Arc<ExportStats>> = OnceLock::new();
    Arc::clone(STATS.get_or_init(Default::default))
}

/// What must outlive the serving: the exporter's queue, flushed at shutdown.
#[derive(Default)]
pub struct Telemetry {
    flusher: Option<Flusher>,
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still queued (the last queries' and the shutdown's own), for at most
    /// `timeout`: a collector that is gone must not hold the process.
    pub async fn shutdown(self, timeout: Duration) {
        if let Some(flusher) = &self.flusher
            && let Err(err) = flusher.flush(timeout).await
        {
            tracing::warn!(error = %err, "traces still queued at shutdown were not sent");
        }
        drop(self.provider);
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pretty" | "text" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format `{other}`: expected pretty or json")),
        }
    }
}

/// Installs the global subscriber with logs only; `RUST_LOG` overrides the default `info`.
pub fn init(format: LogFormat) {
    let _ = tracing_subscriber::registry().with(log_layer(format)).try_init();
}

/// Installs the global subscriber: logs, and the trace export `config` asks for. Must run
/// inside the Tokio runtime (the export task runs on it). `tier` is the default service
/// name, `region` a resource attribute.
pub fn init_with_traces(
    format: LogFormat,
    config: &TelemetryConfig,
    tier: &str,
    region: &str,
) -> Result<Telemetry, TelemetryError> {
    let Some(endpoint) = &config.otlp_endpoint else {
        init(format);
        return Ok(Telemetry::default());
    };
    let error = |message: String| TelemetryError { endpoint: endpoint.clone(), message };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(config.export_timeout)
        .build()
        .map_err(|e| error(e.to_string()))?;
    let service = config.service_name.clone().unwrap_or_else(|| tier.to_string());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("strata.region", region.to_string()))
        .with_attribute(KeyValue::new("strata.tier", tier.to_string()))
        .with_attributes(config.resource.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
        .build();
    opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
    let queue = SpanQueue::start(
        exporter,
        QueueSettings {
            queue_size: config.queue_size,
            batch_size: config.batch_size,
            interval: config.export_interval,
            timeout: config.export_timeout,
        },
        export_stats(),
    );
    let flusher = queue.flusher();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(queue)
        // A caller's sampling decision (its traceparent's flags) is kept; traces that
        // start here are sampled at the configured ratio.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("strata");
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::filter_fn(exported));
    let _ = tracing_subscriber::registry().with(log_layer(format)).with(traces).try_init();
    strata_core::trace_context::propagate_into_datafusion_tasks();
    tracing::info!(endpoint = %endpoint, ratio = config.sampling_ratio, "exporting traces over OTLP/gRPC");
    Ok(Telemetry { flusher: Some(flusher), provider: Some(provider) })
}

/// Strata's own spans at `debug` and up and their events at `info` and up; nothing of the
/// exporter itself (that would feed back into the queue it drains).
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    if !target.starts_with("strata") || target == "strata_telemetry" {
        return false;
    }
    let floor = if meta.is_span() { Level::DEBUG } else { Level::INFO };
    *meta.level() <= floor
}

/// Events to stderr, filtered by `RUST_LOG` (default `info`).
fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Pretty => layer.compact().with_filter(filter).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_current_span(true).with_filter(filter).boxed(),
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made. A tier registers them before it
/// starts listening: registered lazily (in a task polled after the listeners were up), a
/// SIGTERM that came right after the tier turned ready met the default action and killed it
/// without the drain, resetting its connections.
pub struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Registers the handlers now (needs a running tokio runtime).
    pub fn register() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self { term: signal(SignalKind::terminate())?, interrupt: signal(SignalKind::interrupt())? })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves at the first SIGTERM or SIGINT (Ctrl-C) after registration.
    pub async fn recv(self) {
        #[cfg(unix)]
        {
            let Self { mut term, mut interrupt } = self;
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT, caught from its first poll (see
/// [`ShutdownSignals`] for a process that must not miss one sent earlier).
pub async fn shutdown_signal() {
    match ShutdownSignals::register() {
        Ok(signals) => signals.recv().await,
        Err(_) => std::future::pending::<()>().await,
    }
}
