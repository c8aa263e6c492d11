//! Latency and throughput of one probe, measured the same way for a path and its baseline.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;

/// One way of answering the scenario's question (a tier path or a baseline). Each concurrent
/// worker owns one probe: its own connection, as a real client would.
#[async_trait]
pub trait Probe: Send {
    /// Runs iteration `i` and returns the rows it got back (checked by the caller).
    async fn call(&mut self, i: usize) -> anyhow::Result<usize>;
}

/// Makes a fresh probe (a new connection) per worker.
#[async_trait]
pub trait ProbeFactory: Sync {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>>;
}

/// How long and how hard to measure.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// Sequential calls measured for the latency percentiles (after a warm-up).
    pub iterations: usize,
    pub warmup: usize,
    /// How long each concurrent throughput run lasts.
    pub throughput_for: Duration,
    pub concurrency: &'static [usize],
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub concurrency: usize,
    pub ops_per_s: f64,
}

/// The figures of one path.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub name: String,
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub throughput: Vec<Throughput>,
    /// p50 of this path over the p50 of the scenario's baseline (same run).
    pub p50_ratio: Option<f64>,
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

/// Name fragments of the paths to measure (`--paths`); empty measures every path.
pub static ONLY_PATHS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn wanted(name: &str) -> bool {
    ONLY_PATHS.get().is_none_or(|only| only.is_empty() || only.iter().any(|o| name.contains(o.as_str())))
}

/// Measures `factory`'s probe: latency at concurrency 1, then throughput at each concurrency.
/// Every call must return `expect` rows (a wrong answer is an error, not a fast result).
/// A path `--paths` leaves out comes back with no samples and is dropped by [`with_ratios`].
pub async fn measure(
    name: &str,
    factory: &dyn ProbeFactory,
    effort: Effort,
    expect: usize,
) -> anyhow::Result<Measured> {
    if !wanted(name) {
        return Ok(Measured {
            name: name.to_string(),
            samples: 0,
            p50_us: f64::NAN,
            p99_us: f64::NAN,
            p999_us: f64::NAN,
            throughput: Vec::new(),
            p50_ratio: None,
        });
    }
    let mut probe = factory.probe().await?;
    let check = |i: usize, rows: usize| {
        anyhow::ensure!(rows == expect, "{name}: call {i} returned {rows} rows, expected {expect}");
        Ok(())
    };
    for i in 0..effort.warmup {
        check(i, probe.call(i).await?)?;
    }
    let mut samples = Vec::with_capacity(effort.iterations);
    for i in 0..effort.iterations {
        let started = Instant::now();
        let rows = probe.call(i).await?;
        samples.push(started.elapsed());
        check(i, rows)?;
    }
    drop(probe);
    samples.sort();
    let mut throughput = Vec::new();
    for &workers in effort.concurrency {
        let mut probes = Vec::with_capacity(workers);
        for _ in 0..workers {
            probes.push(factory.probe().await?);
        }
        let started = Instant::now();
        let until = started + effort.throughput_for;
        let tasks: Vec<_> = probes
            .into_iter()
            .enumerate()
            .map(|(w, mut probe)| {
                tokio::spawn(async move {
                    let mut done = 0usize;
                    while Instant::now() < until {
                        let rows = probe.call(w * 7919 + done).await?;
                        anyhow::ensure!(rows == expect, "call returned {rows} rows, expected {expect}");
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        let mut ops = 0;
        for task in tasks {
            ops += task.await??;
        }
        throughput.push(Throughput { concurrency: workers, ops_per_s: ops as f64 / started.elapsed().as_secs_f64() });
    }
    Ok(Measured {
        name: name.to_string(),
        samples: samples.len(),
        p50_us: percentile(&samples, 0.5),
        p99_us: percentile(&samples, 0.99),
        p999_us: percentile(&samples, 0.999),
        throughput,
        p50_ratio: None,
    })
}

/// Fills in every path's ratio to the baseline (the entry named `baseline`), leaving out
/// the paths that were not measured.
pub fn with_ratios(mut rows: Vec<Measured>, baseline: &str) -> Vec<Measured> {
    rows.retain(|m| m.samples > 0);
    let base = rows.iter().find(|m| m.name == baseline).map(|m| m.p50_us);
    for row in &mut rows {
        row.p50_ratio = base.map(|b| row.p50_us / b);
    }
    rows
}
