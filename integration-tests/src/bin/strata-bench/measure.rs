//! Latency, throughput and CPU time of a scenario's paths, measured the same way and side
//! by side, so each path and its baseline see the same machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// CPU time each watched process spent per call at this concurrency: with the rate, how
    /// much of the machine a path's calls take, and whose CPU it is.
    pub cpu_per_call: Vec<ProcessCpu>,
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
    /// CPU time each watched tier process spent per sequential call of this path: where a
    /// path's time goes, and which process pays for it.
    pub cpu_per_call: Vec<ProcessCpu>,
}

/// A process (a tier, or the bench itself) whose CPU time the scenario charges to the calls
/// of each path.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    /// Whether the process's descendants count as part of it: PostgreSQL's backends are
    /// children of its postmaster, while the bench's children are the tiers, watched apiece.
    pub descendants: bool,
}

impl Watched {
    /// One process, its threads only.
    pub fn process(name: &str, pid: u32) -> Self {
        Self { name: name.into(), pid, descendants: false }
    }

    /// A process with every process under it.
    pub fn tree(name: &str, pid: u32) -> Self {
        Self { name: name.into(), pid, descendants: true }
    }

    fn cpu_ns(&self) -> u64 {
        cpu_ns(self.pid, self.descendants)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessCpu {
    pub process: String,
    pub us: f64,
}

/// Nanoseconds a process (and, with `descendants`, every process under it) has run on a
/// CPU, all threads together (`schedstat`, which unlike `stat`'s clock ticks is exact
/// enough to split among blocks of calls). A descendant that exits between two readings
/// takes its time with it, which the harness avoids by keeping its connections (and so
/// PostgreSQL's backends) open while it measures.
fn cpu_ns(pid: u32, descendants: bool) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    let mut ns = 0;
    for task in tasks.filter_map(Result::ok) {
        let path = task.path();
        let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        ns += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if descendants {
            let children = std::fs::read_to_string(path.join("children")).unwrap_or_default();
            ns += children.split_whitespace().filter_map(|c| c.parse().ok()).map(|c| cpu_ns(c, true)).sum::<u64>();
        }
    }
    ns
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

/// One path of a scenario: its name and how to connect to it.
pub type Path<'a> = (&'a str, &'a dyn ProbeFactory);

/// Blocks each path's sequential calls are split into; paths take turns block by block.
const LATENCY_BLOCKS: usize = 10;
/// Slices each throughput run is split into; paths take turns slice by slice.
const THROUGHPUT_SLICES: u32 = 3;
/// Call numbers each path owns: path `p` numbers its calls from `p * PATH_CALLS`, so no path
/// answers a lookup from a results cache another path (or its own warm-up) filled.
const PATH_CALLS: usize = 80_000;

/// Measures the paths side by side: latency at concurrency 1, then throughput at each
/// concurrency, with the paths taking turns in short blocks so that a noisy stretch of the
/// machine falls on all of them alike instead of on whichever path ran then.
/// Every call must return `expect` rows (a wrong answer is an error, not a fast result).
/// Paths `--paths` leaves out are not measured and do not appear in the result. The CPU time
/// of the `watch`ed processes during each path's sequential calls is charged to that path.
pub async fn measure_side_by_side(
    paths: &[Path<'_>],
    effort: Effort,
    expect: usize,
    watch: &[Watched],
) -> anyhow::Result<Vec<Measured>> {
    let paths: Vec<(usize, &Path)> = paths
        .iter()
        .enumerate()
        .map(|(p, path)| (p * PATH_CALLS, path))
        .filter(|(_, (name, _))| wanted(name))
        .collect();
    let check = |name: &str, i: usize, rows: usize| {
        anyhow::ensure!(rows == expect, "{name}: call {i} returned {rows} rows, expected {expect}");
        Ok(())
    };
    let mut probes = Vec::with_capacity(paths.len());
    for (first_call, (name, factory)) in &paths {
        let mut probe = factory.probe().await?;
        for i in 0..effort.warmup {
            check(name, i, probe.call(first_call + i).await?)?;
        }
        probes.push(probe);
    }
    let mut samples = vec![Vec::with_capacity(effort.iterations); paths.len()];
    let mut cpu = vec![vec![0u64; watch.len()]; paths.len()];
    let block = effort.iterations.div_ceil(LATENCY_BLOCKS).max(1);
    for first in (0..effort.iterations).step_by(block) {
        for (p, (first_call, (name, _))) in paths.iter().enumerate() {
            let before: Vec<u64> = watch.iter().map(Watched::cpu_ns).collect();
            for i in first..(first + block).min(effort.iterations) {
                let started = Instant::now();
                let rows = probes[p].call(first_call + effort.warmup + i).await?;
                samples[p].push(started.elapsed());
                check(name, i, rows)?;
            }
            for (w, before) in before.into_iter().enumerate() {
                cpu[p][w] += watch[w].cpu_ns().saturating_sub(before);
            }
        }
    }
    drop(probes);

    let mut throughput = vec![Vec::new(); paths.len()];
    let next_calls: Vec<_> = paths
        .iter()
        .map(|(first_call, _)| Arc::new(AtomicUsize::new(first_call + effort.warmup + effort.iterations)))
        .collect();
    for &workers in effort.concurrency {
        let mut pools = Vec::with_capacity(paths.len());
        for (_, (_, factory)) in &paths {
            let mut pool = Vec::with_capacity(workers);
            for _ in 0..workers {
                pool.push(factory.probe().await?);
            }
            pools.push(pool);
        }
        let mut totals = vec![(0usize, Duration::ZERO, vec![0u64; watch.len()]); paths.len()];
        for _ in 0..THROUGHPUT_SLICES {
            for (p, pool) in pools.iter_mut().enumerate() {
                let before: Vec<u64> = watch.iter().map(Watched::cpu_ns).collect();
                let (ops, took) =
                    run_concurrently(pool, &next_calls[p], effort.throughput_for / THROUGHPUT_SLICES, expect).await?;
                totals[p].0 += ops;
                totals[p].1 += took;
                for (w, before) in before.into_iter().enumerate() {
                    totals[p].2[w] += watch[w].cpu_ns().saturating_sub(before);
                }
            }
        }
        for (p, (ops, took, cpu)) in totals.into_iter().enumerate() {
            let ops_per_s = ops as f64 / took.as_secs_f64();
            let cpu_per_call = per_call(watch, &cpu, ops.max(1) as f64);
            throughput[p].push(Throughput { concurrency: workers, ops_per_s, cpu_per_call });
        }
    }

    Ok(paths
        .iter()
        .zip(samples.iter_mut().zip(throughput).zip(cpu))
        .map(|((_, (name, _)), ((samples, throughput), cpu))| {
            samples.sort();
            let cpu_per_call = per_call(watch, &cpu, samples.len().max(1) as f64);
            Measured {
                name: name.to_string(),
                samples: samples.len(),
                p50_us: percentile(samples, 0.5),
                p99_us: percentile(samples, 0.99),
                p999_us: percentile(samples, 0.999),
                throughput,
                p50_ratio: None,
                cpu_per_call,
            }
        })
        .collect())
}

/// Each watched process's CPU nanoseconds `ns` as microseconds per call of `calls`.
fn per_call(watch: &[Watched], ns: &[u64], calls: f64) -> Vec<ProcessCpu> {
    watch.iter().zip(ns).map(|(w, ns)| ProcessCpu { process: w.name.clone(), us: *ns as f64 / 1e3 / calls }).collect()
}

/// Every probe of `pool` calling in its own task for `window`, numbering calls from
/// `next_call`: (calls done, time taken). The probes (their connections) come back to the
/// pool for the next slice.
async fn run_concurrently(
    pool: &mut Vec<Box<dyn Probe>>,
    next_call: &Arc<AtomicUsize>,
    window: Duration,
    expect: usize,
) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    let until = started + window;
    let tasks: Vec<_> = pool
        .drain(..)
        .map(|mut probe| {
            let next_call = Arc::clone(next_call);
            tokio::spawn(async move {
                let mut done = 0usize;
                while Instant::now() < until {
                    let rows = probe.call(next_call.fetch_add(1, Ordering::Relaxed)).await?;
                    anyhow::ensure!(rows == expect, "call returned {rows} rows, expected {expect}");
                    done += 1;
                }
                Ok((probe, done))
            })
        })
        .collect();
    let mut ops = 0;
    for task in tasks {
        let (probe, done) = task.await??;
        pool.push(probe);
        ops += done;
    }
    Ok((ops, started.elapsed()))
}

/// Fills in every path's ratio to the baseline (the entry named `baseline`).
pub fn with_ratios(mut rows: Vec<Measured>, baseline: &str) -> Vec<Measured> {
    let base = rows.iter().find(|m| m.name == baseline).map(|m| m.p50_us);
    for row in &mut rows {
        row.p50_ratio = base.map(|b| row.p50_us / b);
    }
    rows
}
