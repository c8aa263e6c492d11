//! What tracing costs a query: the same point lookups against four platforms serving the
//! same accelerated Parquet file, with trace export off, on (sampling 1.0, to a live OTLP
//! receiver in this process), on with the collector down (a closed port), and on with a
//! collector that accepts connections and never answers, side by side. The spans the last
//! two never delivered are read from the platforms' metrics.

use std::time::Duration;

use strata_integration_tests::otlp::OtlpReceiver;
use strata_integration_tests::tier::Tier;

use crate::measure::{Effort, Path, Watched, measure_side_by_side, with_ratios};
use crate::paths::{Flight, Query};
use crate::report::{Figure, Scenario};

pub async fn run(parquet: &std::path::Path, rows: i64, effort: Effort) -> anyhow::Result<Scenario> {
    let receiver = OtlpReceiver::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    // Accepts and holds every connection, reads nothing, answers nothing.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hung_addr = hung.local_addr()?;
    let _holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let platform = |telemetry: String| {
        format!(
            "region: eu\nlimits:\n  max_concurrent_queries: 256\ndatasets:\n  - name: points\n    from: file:{}\n    acceleration: {{}}\n{telemetry}",
            parquet.display()
        )
    };
    let export = |endpoint: &str| format!("telemetry:\n  otlp_endpoint: {endpoint}\n  sampling_ratio: 1.0\n");
    let off = Tier::start("platform-service", &platform(String::new())).await;
    let on = Tier::start("platform-service", &platform(export(&receiver.endpoint()))).await;
    let down = Tier::start("platform-service", &platform(export(&format!("http://{closed}")))).await;
    let hangs = Tier::start("platform-service", &platform(export(&format!("http://{hung_addr}")))).await;
    for tier in [&off, &on, &down, &hangs] {
        tier.wait_ready(Duration::from_secs(600)).await;
    }
    let query = Query::Lookup { rows };
    let flight = |tier: &Tier| Flight { addr: tier.flight_addr, query, strong: false };
    let (f_off, f_on, f_down, f_hangs) = (flight(&off), flight(&on), flight(&down), flight(&hangs));
    let paths: Vec<Path> = vec![
        ("tracing off", &f_off),
        ("tracing on, sampling 1.0", &f_on),
        ("tracing on, collector down", &f_down),
        ("tracing on, collector never answers", &f_hangs),
    ];
    let watched = [
        Watched::process("off", off.pid()),
        Watched::process("on", on.pid()),
        Watched::process("down", down.pid()),
        Watched::process("hangs", hangs.pid()),
    ];
    let results = measure_side_by_side(&paths, effort, 1, &watched).await?;
    let dropped = counter(&down, "strata_trace_spans_dropped_total").await?;
    let dropped_hung = counter(&hangs, "strata_trace_spans_dropped_total").await?;
    let exported = counter(&on, "strata_trace_spans_exported_total").await?;
    Ok(Scenario {
        name: format!("Tracing cost: Flight SQL point lookups over {rows} rows"),
        baseline: "tracing off".into(),
        results: with_ratios(results, "tracing off"),
        figures: vec![
            Figure::new("spans exported (tracing on)", exported, "spans", None),
            Figure::new("spans dropped (collector down)", dropped, "spans", None),
            Figure::new("spans dropped (collector never answers)", dropped_hung, "spans", None),
            Figure::new("spans the receiver holds", receiver.spans().len() as f64, "spans", None),
        ],
        table: None,
    })
}

/// The sum of a counter's series in a tier's `/metrics`.
async fn counter(tier: &Tier, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(tier.url("/metrics")).await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
