//! How cost grows with the table: a point lookup, a GROUP BY, a full refresh and a sidecar's
//! first replication of the `points` table at several sizes (1M, 10M and 50M rows by
//! default), as a table with each measure's log-log slope, and as a log-log plot (PNG).
//!
//! Each size gets its own platform, accelerating a Parquet file with `id` as its primary key,
//! and a sidecar replicating it with its results cache off, so every call is answered by the
//! engine. A size's tiers are stopped before the next size starts, so the largest has the
//! machine's memory to itself; a size the machine has too little memory for is left out and
//! said so.

use std::path::Path;
use std::time::{Duration, Instant};

use strata_integration_tests::tier::Tier;

use crate::measure::{Effort, Measured, Watched, measure_side_by_side};
use crate::paths::{Flight, FlightPrepared, Http, Query};
use crate::points::{platform_config, replicating_sidecar, rss_bytes, settled_rss, write_parquet};
use crate::report::{Scenario, Table};

/// How hard to measure at each size.
pub struct Growth<'a> {
    pub sizes: &'a [i64],
    pub lookup: Effort,
    pub aggregate: Effort,
    /// Full refreshes timed at each size (the fastest is reported).
    pub refreshes: usize,
    /// Where the plot goes; `None` leaves it out.
    pub png: Option<&'a Path>,
}

/// What one size measured.
struct AtSize {
    rows: i64,
    lookup_http: Measured,
    lookup_flight: Measured,
    aggregate: Measured,
    refresh: Duration,
    replication: Duration,
    platform_rss: u64,
    sidecar_rss: u64,
}

/// Memory a size needs, generously: the platform holds its copy, the key index and, during
/// a refresh, the next version; the sidecar its replica and the version it is applying
/// (about 45 bytes of Arrow a row, each held up to twice in both processes).
const BYTES_PER_ROW: u64 = 250;

pub async fn run(growth: Growth<'_>) -> anyhow::Result<Scenario> {
    if let Some(bad) = growth.sizes.iter().find(|&&rows| rows < 1) {
        anyhow::bail!("--growth-rows: {bad} is not a table size (each must be at least one row)");
    }
    let mut measured = Vec::new();
    let mut left_out = Vec::new();
    for &rows in growth.sizes {
        let available = mem_available();
        if rows as u64 * BYTES_PER_ROW > available {
            eprintln!(
                "growth: {rows} rows left out: needs about {} MB, {} MB available",
                rows as u64 * BYTES_PER_ROW / 1_000_000,
                available / 1_000_000
            );
            left_out.push(rows);
            continue;
        }
        measured.push(at_size(rows, &growth).await?);
    }
    anyhow::ensure!(!measured.is_empty(), "no size fits this machine's memory");

    let series: Vec<(&str, Vec<f64>)> = vec![
        ("point lookup, sidecar HTTP /v1/sql, p50 µs", measured.iter().map(|m| m.lookup_http.p50_us).collect()),
        (
            "point lookup, sidecar HTTP /v1/sql, sidecar CPU µs per call",
            measured.iter().map(|m| cpu_us(&m.lookup_http, "sidecar")).collect(),
        ),
        (
            "point lookup, sidecar Flight SQL prepared, p50 µs",
            measured.iter().map(|m| m.lookup_flight.p50_us).collect(),
        ),
        (
            "point lookup, sidecar HTTP /v1/sql, ops/s at 8 clients",
            measured.iter().map(|m| m.lookup_http.throughput.first().map_or(0.0, |t| t.ops_per_s)).collect(),
        ),
        (
            "aggregate (GROUP BY grp), sidecar Flight SQL, p50 ms",
            measured.iter().map(|m| m.aggregate.p50_us / 1e3).collect(),
        ),
        ("full refresh on the platform, ms", measured.iter().map(|m| m.refresh.as_secs_f64() * 1e3).collect()),
        (
            "sidecar start to replica loaded (first replication), ms",
            measured.iter().map(|m| m.replication.as_secs_f64() * 1e3).collect(),
        ),
        ("platform RSS, MB", measured.iter().map(|m| m.platform_rss as f64 / 1e6).collect()),
        ("sidecar RSS, MB", measured.iter().map(|m| m.sidecar_rss as f64 / 1e6).collect()),
    ];
    let rows: Vec<f64> = measured.iter().map(|m| m.rows as f64).collect();
    let mut columns: Vec<String> = measured.iter().map(|m| format!("{} rows", short_count(m.rows))).collect();
    columns.push("log-log slope".into());
    let table = Table {
        columns,
        rows: series
            .iter()
            .map(|(name, values)| {
                let mut cells: Vec<Option<f64>> = values.iter().copied().map(Some).collect();
                cells.push(slope(&rows, values));
                (name.to_string(), cells)
            })
            .collect(),
    };

    if let Some(png) = growth.png {
        // Times only, in one unit, on one logarithmic axis.
        let ms = |f: fn(&AtSize) -> f64| measured.iter().map(f).collect::<Vec<_>>();
        let times_ms = [
            ("point lookup, HTTP", ms(|m| m.lookup_http.p50_us / 1e3)),
            ("point lookup, Flight SQL prepared", ms(|m| m.lookup_flight.p50_us / 1e3)),
            ("aggregate (GROUP BY grp)", ms(|m| m.aggregate.p50_us / 1e3)),
            ("full refresh", ms(|m| m.refresh.as_secs_f64() * 1e3)),
            ("first replication", ms(|m| m.replication.as_secs_f64() * 1e3)),
        ];
        match plot(png, &rows, &times_ms) {
            Ok(()) => eprintln!("growth: plot written to {}", png.display()),
            Err(err) => eprintln!("growth: no plot: {err:#}"),
        }
    }

    let mut baseline = format!(
        "each measure at {} rows (the slope of its log-log line to the largest size: 0 does not grow, 1 grows in proportion)",
        short_count(measured[0].rows)
    );
    if !left_out.is_empty() {
        baseline.push_str(&format!(
            "; left out for lack of memory: {}",
            left_out.iter().map(|r| short_count(*r)).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(Scenario {
        name: format!(
            "How cost grows with the table: {} rows",
            measured.iter().map(|m| short_count(m.rows)).collect::<Vec<_>>().join(", ")
        ),
        baseline,
        results: Vec::new(),
        figures: Vec::new(),
        table: Some(table),
    })
}

async fn at_size(rows: i64, growth: &Growth<'_>) -> anyhow::Result<AtSize> {
    let dir = tempfile::tempdir()?;
    let parquet = dir.path().join("points.parquet");
    eprintln!("growth: {rows} rows: writing Parquet");
    let path = parquet.clone();
    tokio::task::spawn_blocking(move || write_parquet(&path, rows)).await??;

    eprintln!("growth: {rows} rows: platform loading");
    let platform = Tier::start("platform-service", &platform_config(&parquet, "{primary_key: [id]}")).await;
    let long = Duration::from_secs(3600);
    platform.wait_ready(long).await;
    // The refresh call answers once the new version is published.
    let mut refresh = Duration::MAX;
    for _ in 0..growth.refreshes.max(1) {
        let started = Instant::now();
        let (status, body) = platform.post("/v1/datasets/points/refresh").await;
        anyhow::ensure!(status == 200, "refresh of {rows} rows answered {status}: {body}");
        refresh = refresh.min(started.elapsed());
    }

    eprintln!("growth: {rows} rows: sidecar replicating");
    let (sidecar, replication) = replicating_sidecar(&platform, "results_cache:\n  max_bytes: 0\n", long).await?;

    let watched = [Watched::process("bench client", std::process::id()), Watched::process("sidecar", sidecar.pid())];
    eprintln!("growth: {rows} rows: lookups");
    let query = Query::Lookup { rows };
    let http = Http { url: sidecar.url("/v1/sql"), query };
    let prepared = FlightPrepared { addr: sidecar.flight_addr, query };
    let mut lookups = measure_side_by_side(
        &[("sidecar local (HTTP/1.1 keep-alive, /v1/sql)", &http), ("sidecar local (Flight SQL, prepared)", &prepared)],
        growth.lookup,
        1,
        &watched,
    )
    .await?
    .into_iter();
    let (Some(lookup_http), Some(lookup_flight)) = (lookups.next(), lookups.next()) else {
        anyhow::bail!("the lookup paths were not measured (--paths leaves them out?)");
    };
    eprintln!("growth: {rows} rows: aggregates");
    let aggregate = Flight { addr: sidecar.flight_addr, query: Query::Aggregate, strong: false };
    let aggregate = measure_side_by_side(
        &[("sidecar local (Flight SQL)", &aggregate)],
        growth.aggregate,
        1000.min(rows as usize),
        &watched,
    )
    .await?
    .into_iter()
    .next()
    .ok_or_else(|| anyhow::anyhow!("the aggregate path was not measured"))?;

    Ok(AtSize {
        rows,
        lookup_http,
        lookup_flight,
        aggregate,
        refresh,
        replication,
        platform_rss: settled_rss(platform.pid()).await + rss_bytes(platform.pid()).1,
        sidecar_rss: settled_rss(sidecar.pid()).await + rss_bytes(sidecar.pid()).1,
    })
}

fn cpu_us(measured: &Measured, process: &str) -> f64 {
    measured.cpu_per_call.iter().find(|c| c.process == process).map_or(0.0, |c| c.us)
}

/// The slope of the line through the first and last points on log-log axes: how a measure
/// grows with the rows (0: flat; 1: in proportion). `None` with fewer than two sizes.
fn slope(rows: &[f64], values: &[f64]) -> Option<f64> {
    let (&n0, &n1, &v0, &v1) = (rows.first()?, rows.last()?, values.first()?, values.last()?);
    (n1 > n0 && v0 > 0.0 && v1 > 0.0).then(|| (v1 / v0).ln() / (n1 / n0).ln())
}

/// 1000000 -> "1M", 20000 -> "20k".
fn short_count(n: i64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// Whether a log axis labels `v`: 1, 2 and 5 times a power of ten (the axis draws a line at
/// every tick; labels at all of them overlap).
fn round_tick(v: f64) -> bool {
    let mantissa = v / 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().any(|m| (mantissa - m).abs() < 1e-6 * m)
}

/// Available memory from /proc/meminfo (the whole of it where that cannot be read).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map_or(u64::MAX, |kb| kb * 1024)
}

/// TrueType fonts the plot's text can use: plotters draws glyphs itself (ab_glyph), from
/// font bytes it is given.
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// A log-log plot of each series (ms) against the rows, written as a PNG.
fn plot(png: &Path, rows: &[f64], series: &[(&str, Vec<f64>)]) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let font = FONTS.iter().find_map(|f| std::fs::read(f).ok()).ok_or_else(|| {
        anyhow::anyhow!("no TrueType font at {FONTS:?} for the labels (Debian: apt-get install fonts-dejavu-core)")
    })?;
    // plotters keeps registered fonts for the process's life.
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("the font file is not a TrueType font"))?;

    let positive = || series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| *v > 0.0);
    let (low, high) = positive().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    anyhow::ensure!(low <= high, "nothing to plot");
    let (first, last) = (rows.first().copied().unwrap_or(1.0), rows.last().copied().unwrap_or(1.0));

    let root = BitMapBackend::new(png, (1100, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("How cost grows with the table (log-log)", ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        // Room right of the largest size for the legend.
        .build_cartesian_2d((first / 2.0..last * 12.0).log_scale(), (low / 3.0..high * 3.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("rows in the table")
        .y_desc("time, ms")
        .x_label_formatter(&|n| if round_tick(*n) { short_count(*n as i64) } else { String::new() })
        .y_label_formatter(&|ms| if round_tick(*ms) { format!("{ms}") } else { String::new() })
        .label_style(("sans-serif", 16))
        .draw()?;
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK];
    for ((name, values), &color) in series.iter().zip(colors.iter().cycle()) {
        let points: Vec<(f64, f64)> =
            rows.iter().copied().zip(values.iter().copied()).filter(|(_, v)| *v > 0.0).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}
