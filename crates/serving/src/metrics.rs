//! Prometheus text metrics: queries per interface with a latency histogram, and per-dataset
//! refresh and size figures read from the engine at scrape time (so they cannot drift).

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_core::results_cache::CacheStatus;
use strata_core::routing::{Route, RouteReason};
use strata_core::{Engine, Finished, Outcome};

const ROUTES: [Route; 4] = [Route::Local, Route::Forwarded, Route::Mixed, Route::Distributed];

const BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

/// Query counters and the latency histogram, updated once per finished query.
#[derive(Default)]
pub struct Metrics {
    ok: AtomicU64,
    error: AtomicU64,
    cancelled: AtomicU64,
    rows: AtomicU64,
    bytes: AtomicU64,
    /// Queries per latency bucket, each counted in the first bucket its latency fits (one
    /// atomic add per query, not one per bucket above it); summed up when rendered, as
    /// Prometheus's cumulative `le` buckets are.
    buckets: [AtomicU64; BUCKETS.len()],
    sum_micros: AtomicU64,
    /// Queries by (route, reason), indexed `route * reasons + reason`.
    routes: [AtomicU64; ROUTES.len() * RouteReason::ALL.len()],
    /// Results cache outcomes, in the order of `CacheStatus::ALL`.
    cache: [AtomicU64; CacheStatus::ALL.len()],
    /// Queries refused at admission (`limits.max_concurrent_queries`): HTTP 429.
    shed: AtomicU64,
    connections: Option<Arc<crate::connections::ConnectionGuard>>,
}

impl Metrics {
    /// Metrics hooked into the engine's query observer.
    pub fn install(engine: &Engine, connections: Arc<crate::connections::ConnectionGuard>) -> Arc<Self> {
        let metrics = Arc::new(Self { connections: Some(connections), ..Self::default() });
        let hook = Arc::clone(&metrics);
        engine.set_query_observer(Arc::new(move |finished| hook.record(finished)));
        metrics
    }

    fn record(&self, finished: Finished<'_>) {
        let Finished { outcome, rows, bytes, elapsed, route } = finished;
        if let Some(route) = route {
            let r = ROUTES.iter().position(|x| *x == route.route).unwrap_or(0);
            let why = RouteReason::ALL.iter().position(|x| *x == route.reason).unwrap_or(0);
            self.routes[r * RouteReason::ALL.len() + why].fetch_add(1, Ordering::Relaxed);
            if let Some(status) = route.cache {
                self.cache[CacheStatus::ALL.iter().position(|c| *c == status).unwrap_or(0)]
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let counter = match outcome {
            Outcome::Shed => {
                // Refused before it started: counted apart, not in the latency histogram.
                self.shed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Outcome::Ok => &self.ok,
            Outcome::Error => &self.error,
            Outcome::Cancelled => &self.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(bucket) = BUCKETS.iter().position(|bound| secs <= *bound) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The latency histogram, its buckets cumulative.
    fn render_durations(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP strata_query_duration_seconds Query latency from admission to the last batch.");
        let _ = writeln!(out, "# TYPE strata_query_duration_seconds histogram");
        let mut cumulative = 0;
        for (bucket, bound) in self.buckets.iter().zip(BUCKETS) {
            cumulative += get(bucket);
            let _ = writeln!(out, "strata_query_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = get(&self.ok) + get(&self.error) + get(&self.cancelled);
        let _ = writeln!(out, "strata_query_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "strata_query_duration_seconds_sum {}", get(&self.sum_micros) as f64 / 1e6);
        let _ = writeln!(out, "strata_query_duration_seconds_count {count}");
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, engine: &Engine) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP strata_queries_total Queries finished, by outcome.");
        let _ = writeln!(out, "# TYPE strata_queries_total counter");
        for (label, c) in [("ok", &self.ok), ("error", &self.error), ("cancelled", &self.cancelled)] {
            let _ = writeln!(out, "strata_queries_total{{outcome=\"{label}\"}} {}", get(c));
        }
        let _ = writeln!(
            out,
            "# HELP strata_queries_shed_total Queries refused at admission (limits.max_concurrent_queries)."
        );
        let _ = writeln!(out, "# TYPE strata_queries_shed_total counter");
        let _ = writeln!(out, "strata_queries_shed_total {}", get(&self.shed));
        if let Some(connections) = &self.connections {
            let _ = writeln!(out, "# HELP strata_connections_open Client connections open, over all listeners.");
            let _ = writeln!(out, "# TYPE strata_connections_open gauge");
            let _ = writeln!(out, "strata_connections_open {}", connections.open());
            let _ = writeln!(
                out,
                "# HELP strata_connections_refused_total Connections closed at accept (server.max_connections)."
            );
            let _ = writeln!(out, "# TYPE strata_connections_refused_total counter");
            let _ = writeln!(out, "strata_connections_refused_total {}", connections.refused());
            let _ = writeln!(
                out,
                "# HELP strata_connections_timed_out_total Connections closed by server.handshake_timeout or server.idle_timeout."
            );
            let _ = writeln!(out, "# TYPE strata_connections_timed_out_total counter");
            let _ = writeln!(out, "strata_connections_timed_out_total {}", connections.timed_out());
        }
        let _ = writeln!(
            out,
            "# HELP strata_queries_in_flight Queries admitted and not finished (limits.max_concurrent_queries bounds it)."
        );
        let _ = writeln!(out, "# TYPE strata_queries_in_flight gauge");
        let _ = writeln!(out, "strata_queries_in_flight {}", engine.queries_in_flight());
        let _ = writeln!(out, "# HELP strata_query_rows_total Rows returned by queries.");
        let _ = writeln!(out, "# TYPE strata_query_rows_total counter");
        let _ = writeln!(out, "strata_query_rows_total {}", get(&self.rows));
        let _ = writeln!(out, "# HELP strata_query_bytes_total Arrow bytes of the rows returned by queries.");
        let _ = writeln!(out, "# TYPE strata_query_bytes_total counter");
        let _ = writeln!(out, "strata_query_bytes_total {}", get(&self.bytes));
        self.render_durations(&mut out);

        let _ = writeln!(out, "# HELP strata_query_routes_total Queries by where they ran and why.");
        let _ = writeln!(out, "# TYPE strata_query_routes_total counter");
        for (r, route) in ROUTES.iter().enumerate() {
            for (w, reason) in RouteReason::ALL.iter().enumerate() {
                let n = get(&self.routes[r * RouteReason::ALL.len() + w]);
                if n > 0 {
                    let (route, reason) = (route.as_str(), reason.as_str());
                    let _ = writeln!(out, "strata_query_routes_total{{route=\"{route}\",reason=\"{reason}\"}} {n}");
                }
            }
        }

        let _ = writeln!(out, "# HELP strata_results_cache_total Queries the results cache could hold, by outcome.");
        let _ = writeln!(out, "# TYPE strata_results_cache_total counter");
        for (status, c) in CacheStatus::ALL.iter().zip(&self.cache) {
            let _ = writeln!(out, "strata_results_cache_total{{result=\"{}\"}} {}", status.as_str(), get(c));
        }
        if let Some((bytes, entries)) = engine.results_cache_size() {
            let _ = writeln!(out, "# HELP strata_results_cache_bytes Bytes of answers held by the results cache.");
            let _ = writeln!(out, "# TYPE strata_results_cache_bytes gauge");
            let _ = writeln!(out, "strata_results_cache_bytes {bytes}");
            let _ = writeln!(out, "# HELP strata_results_cache_entries Answers held by the results cache.");
            let _ = writeln!(out, "# TYPE strata_results_cache_entries gauge");
            let _ = writeln!(out, "strata_results_cache_entries {entries}");
        }

        let _ = writeln!(out, "# HELP strata_index_lookups_total Queries answered from a key index, unplanned.");
        let _ = writeln!(out, "# TYPE strata_index_lookups_total counter");
        let _ = writeln!(out, "strata_index_lookups_total {}", engine.index_lookups());

        if let Some((workers, retries)) = engine.cluster_status() {
            let _ = writeln!(
                out,
                "# HELP strata_cluster_workers Replicas taking tasks of distributed queries now (cluster:), this one included."
            );
            let _ = writeln!(out, "# TYPE strata_cluster_workers gauge");
            let _ = writeln!(out, "strata_cluster_workers {workers}");
            let _ = writeln!(
                out,
                "# HELP strata_distributed_retries_total Distributed queries run again after a worker failed before their first row."
            );
            let _ = writeln!(out, "# TYPE strata_distributed_retries_total counter");
            let _ = writeln!(out, "strata_distributed_retries_total {retries}");
        }

        let _ = writeln!(out, "# HELP strata_plan_cache_entries Plans kept by SQL text or shape.");
        let _ = writeln!(out, "# TYPE strata_plan_cache_entries gauge");
        let _ = writeln!(out, "strata_plan_cache_entries {}", engine.cached_plans());
        let _ =
            writeln!(out, "# HELP strata_plan_cache_bytes Bytes charged to the plan cache (limits.plan_cache_size).");
        let _ = writeln!(out, "# TYPE strata_plan_cache_bytes gauge");
        let _ = writeln!(out, "strata_plan_cache_bytes {}", engine.plan_cache_bytes());

        let datasets = engine.datasets();
        let families: [(&str, &str, &str); 6] = [
            ("strata_dataset_rows", "gauge", "Rows in the accelerated copy."),
            ("strata_dataset_bytes", "gauge", "Arrow memory of the accelerated copy."),
            ("strata_dataset_staleness_seconds", "gauge", "Age of the accelerated copy."),
            ("strata_refresh_total", "counter", "Refresh attempts."),
            ("strata_refresh_errors_total", "counter", "Failed refreshes."),
            ("strata_refresh_duration_seconds_total", "counter", "Time spent refreshing."),
        ];
        for (name, kind, help) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for d in &datasets {
                let value = match name {
                    "strata_dataset_rows" => d.rows.map(|v| v as f64),
                    "strata_dataset_bytes" => d.bytes.map(|v| v as f64),
                    "strata_dataset_staleness_seconds" => d.staleness_seconds,
                    "strata_refresh_total" => Some(d.refresh_count as f64),
                    "strata_refresh_errors_total" => Some(d.refresh_errors as f64),
                    _ => Some(d.refresh_seconds_total),
                };
                if let Some(v) = value {
                    let _ = writeln!(out, "{name}{{dataset=\"{}\"}} {v}", d.name);
                }
            }
        }
        render_replication(&mut out, &datasets);
        render_upstreams(&mut out, &engine.upstream_health());
        if let Some(writes) = engine.writes() {
            let _ = writeln!(
                out,
                "# HELP strata_edge_dead_letter_records Edge writes the platform refused for good, kept under data_dir/dead-letter."
            );
            let _ = writeln!(out, "# TYPE strata_edge_dead_letter_records gauge");
            for status in writes.dead_letters() {
                let _ = writeln!(
                    out,
                    "strata_edge_dead_letter_records{{dataset=\"{}\"}} {}",
                    status.dataset, status.records
                );
            }
            let backlog = writes.backlog();
            let _ = writeln!(
                out,
                "# HELP strata_edge_backlog_records Acknowledged edge writes not yet confirmed upstream."
            );
            let _ = writeln!(out, "# TYPE strata_edge_backlog_records gauge");
            let _ = writeln!(out, "strata_edge_backlog_records {}", backlog.records);
            let _ = writeln!(
                out,
                "# HELP strata_edge_backlog_bytes Size in the edge log of the writes not yet confirmed upstream."
            );
            let _ = writeln!(out, "# TYPE strata_edge_backlog_bytes gauge");
            let _ = writeln!(out, "strata_edge_backlog_bytes {}", backlog.bytes);
            let _ = writeln!(
                out,
                "# HELP strata_edge_upload_lag_seconds Age of the oldest edge write not yet confirmed upstream (0 when none waits)."
            );
            let _ = writeln!(out, "# TYPE strata_edge_upload_lag_seconds gauge");
            let _ = writeln!(out, "strata_edge_upload_lag_seconds {}", backlog.oldest_seconds.unwrap_or(0.0));
        }
        let traces = crate::telemetry::export_stats();
        let _ = writeln!(out, "# HELP strata_trace_spans_exported_total Spans sent to the OTLP collector.");
        let _ = writeln!(out, "# TYPE strata_trace_spans_exported_total counter");
        let _ = writeln!(out, "strata_trace_spans_exported_total {}", get(&traces.exported));
        let _ = writeln!(
            out,
            "# HELP strata_trace_spans_dropped_total Spans not sent: the export queue was full, or the collector failed or timed out."
        );
        let _ = writeln!(out, "# TYPE strata_trace_spans_dropped_total counter");
        let _ = writeln!(
            out,
            "strata_trace_spans_dropped_total{{reason=\"queue_full\"}} {}",
            get(&traces.dropped_queue_full)
        );
        let _ = writeln!(
            out,
            "strata_trace_spans_dropped_total{{reason=\"export_failed\"}} {}",
            get(&traces.dropped_export_failed)
        );
        let _ = writeln!(out, "# HELP strata_ready 1 once every accelerated dataset has loaded.");
        let _ = writeln!(out, "# TYPE strata_ready gauge");
        let _ = writeln!(out, "strata_ready {}", u8::from(engine.is_ready()));
        out
    }
}

/// One `# HELP` and `# TYPE` header.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Replicas: versions received, bytes, whether the stream is open, breaks, and how far
/// behind the upstream's newest version each copy is.
fn render_replication(out: &mut String, datasets: &[strata_core::dataset::DatasetStatus]) {
    let replicas: Vec<_> = datasets.iter().filter_map(|d| Some((d, d.replication.as_ref()?))).collect();
    family(out, "strata_replication_versions_total", "counter", "Versions a replica received, by kind.");
    for (d, r) in &replicas {
        for (kind, n) in [("snapshot", r.snapshots), ("increment", r.increments)] {
            let _ = writeln!(out, "strata_replication_versions_total{{dataset=\"{}\",kind=\"{kind}\"}} {n}", d.name);
        }
    }
    family(out, "strata_replication_bytes_total", "counter", "Arrow bytes a replica received.");
    for (d, r) in &replicas {
        let _ = writeln!(out, "strata_replication_bytes_total{{dataset=\"{}\"}} {}", d.name, r.bytes_received);
    }
    family(out, "strata_replication_streaming", "gauge", "1 while a replica's version stream is open.");
    for (d, r) in &replicas {
        let _ = writeln!(out, "strata_replication_streaming{{dataset=\"{}\"}} {}", d.name, u8::from(r.streaming));
    }
    family(out, "strata_replication_interruptions_total", "counter", "Times a replica's version stream broke.");
    for (d, r) in &replicas {
        let _ = writeln!(out, "strata_replication_interruptions_total{{dataset=\"{}\"}} {}", d.name, r.interruptions);
    }
    family(
        out,
        "strata_replica_version_lag",
        "gauge",
        "Versions the upstream advertises that a replica does not hold yet.",
    );
    for (d, r) in &replicas {
        if let Some(upstream) = r.upstream_version {
            let lag = upstream.saturating_sub(d.version.unwrap_or(0));
            let _ = writeln!(out, "strata_replica_version_lag{{dataset=\"{}\"}} {lag}", d.name);
        }
    }
}

/// Upstream endpoints: breaker state (one series per state, 1 for the current one) and the
/// retry budget's use.
fn render_upstreams(out: &mut String, upstreams: &[strata_core::routing::UpstreamHealth]) {
    family(
        out,
        "strata_upstream_breaker_state",
        "gauge",
        "Circuit breaker of an upstream endpoint: 1 for its current state.",
    );
    for u in upstreams {
        for state in ["closed", "open", "half_open"] {
            let _ = writeln!(
                out,
                "strata_upstream_breaker_state{{upstream=\"{}\",endpoint=\"{}\",state=\"{state}\"}} {}",
                u.upstream,
                u.endpoint,
                u8::from(u.breaker == state)
            );
        }
    }
    let mut seen = std::collections::BTreeMap::new();
    for u in upstreams {
        seen.insert(u.upstream.as_str(), (u.retries, u.retries_refused));
    }
    family(out, "strata_upstream_retries_total", "counter", "Upstream calls retried because they reached no server.");
    for (upstream, (retries, _)) in &seen {
        let _ = writeln!(out, "strata_upstream_retries_total{{upstream=\"{upstream}\"}} {retries}");
    }
    family(
        out,
        "strata_upstream_retries_refused_total",
        "counter",
        "Retries the retry budget (upstream.retry_budget_percent) refused.",
    );
    for (upstream, (_, refused)) in &seen {
        let _ = writeln!(out, "strata_upstream_retries_refused_total{{upstream=\"{upstream}\"}} {refused}");
    }
}

/// Requests refused for missing or invalid credentials, by interface (with `auth:`).
pub fn render_auth(out: &mut String, auth: &crate::auth::Authenticator) {
    family(
        out,
        "strata_auth_refused_total",
        "counter",
        "Requests refused for missing or invalid credentials, by interface.",
    );
    let (grpc, http) = auth.refused();
    let _ = writeln!(out, "strata_auth_refused_total{{interface=\"grpc\"}} {grpc}");
    let _ = writeln!(out, "strata_auth_refused_total{{interface=\"http\"}} {http}");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_latency_histogram_renders_cumulative_buckets() {
        let metrics = Metrics::default();
        for micros in [50, 90, 300, 2_000, 60_000_000] {
            let elapsed = Duration::from_micros(micros);
            metrics.record(Finished { outcome: Outcome::Ok, rows: 1, bytes: 8, elapsed, route: None });
        }
        metrics.record(Finished { outcome: Outcome::Error, rows: 0, bytes: 0, elapsed: Duration::ZERO, route: None });
        let mut out = String::new();
        metrics.render_durations(&mut out);
        let bucket = |le: &str| {
            let prefix = format!("strata_query_duration_seconds_bucket{{le=\"{le}\"}} ");
            out.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse::<u64>().ok())
        };
        // 0 s, 50 µs and 90 µs are within 0.0001; 300 µs within 0.0005; 2 ms within 0.0025;
        // 60 s only within +Inf.
        let expected =
            [("0.0001", 3), ("0.00025", 3), ("0.0005", 4), ("0.001", 4), ("0.0025", 5), ("30", 5), ("+Inf", 6)];
        for (le, count) in expected {
            assert_eq!(bucket(le), Some(count), "le={le}:\n{out}");
        }
        assert!(out.contains("strata_query_duration_seconds_count 6"), "{out}");
    }
}
