//! The run's results: Markdown tables for people, JSON for comparing commits.

use serde::Serialize;

use crate::measure::{Measured, ProcessCpu};

/// A single figure that is not a latency distribution (throughput, memory, time).
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// Against the scenario's baseline, where one applies.
    pub ratio: Option<f64>,
}

impl Figure {
    pub fn new(name: impl Into<String>, value: f64, unit: &str, ratio: Option<f64>) -> Self {
        Self { name: name.into(), value, unit: unit.into(), ratio }
    }
}

/// One scenario: paths measured side by side with the baseline, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub baseline: String,
    pub results: Vec<Measured>,
    pub figures: Vec<Figure>,
    /// A free-form table (per-query timings), when the scenario has one.
    pub table: Option<Table>,
}

/// Rows of named values under named columns; `None` where a value is missing.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<Option<f64>>)>,
}

/// Everything one run measured, and on what.
#[derive(Debug, Serialize)]
pub struct Report {
    pub commit: String,
    pub profile: &'static str,
    pub quick: bool,
    pub machine: String,
    pub scenarios: Vec<Scenario>,
}

fn ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "".into())
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "Commit `{}`, {} build{}, {}.\n",
            self.commit,
            self.profile,
            if self.quick { ", quick mode (small data, few iterations)" } else { "" },
            self.machine
        );
        for scenario in &self.scenarios {
            out.push_str(&format!("\n### {}\n\nBaseline: {}.\n\n", scenario.name, scenario.baseline));
            if !scenario.results.is_empty() {
                let concurrency: Vec<usize> = scenario.results[0].throughput.iter().map(|t| t.concurrency).collect();
                out.push_str("| path | p50 µs | p99 µs | p99.9 µs | p50 vs baseline |");
                for c in &concurrency {
                    out.push_str(&format!(" ops/s @{c} |"));
                }
                out.push_str("\n|---|---:|---:|---:|---:|");
                out.push_str(&"---:|".repeat(concurrency.len()));
                out.push('\n');
                for m in &scenario.results {
                    out.push_str(&format!(
                        "| {} | {:.0} | {:.0} | {:.0} | {} |",
                        m.name,
                        m.p50_us,
                        m.p99_us,
                        m.p999_us,
                        ratio(m.p50_ratio)
                    ));
                    for t in &m.throughput {
                        out.push_str(&format!(" {:.0} |", t.ops_per_s));
                    }
                    out.push('\n');
                }
                out.push_str(&cpu_markdown(&scenario.results));
            }
            if !scenario.figures.is_empty() {
                out.push_str("\n| figure | value | vs baseline |\n|---|---:|---:|\n");
                for f in &scenario.figures {
                    out.push_str(&format!("| {} | {:.2} {} | {} |\n", f.name, f.value, f.unit, ratio(f.ratio)));
                }
            }
            if let Some(table) = &scenario.table {
                out.push_str(&format!("\n| | {} |\n|---|", table.columns.join(" | ")));
                out.push_str(&"---:|".repeat(table.columns.len()));
                out.push('\n');
                for (name, values) in &table.rows {
                    let cells: Vec<String> =
                        values.iter().map(|v| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into())).collect();
                    out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
                }
            }
        }
        out
    }
}

/// The CPU time each watched tier process spent per sequential call, a row per path; empty
/// when the scenario watched no process.
fn cpu_markdown(results: &[Measured]) -> String {
    let Some(first) = results.iter().find(|m| !m.cpu_per_call.is_empty()) else { return String::new() };
    let processes: Vec<&str> = first.cpu_per_call.iter().map(|c| c.process.as_str()).collect();
    let mut out = format!(
        "\nCPU time per sequential call, µs (all threads of each process):\n\n| path | {} |\n|---|{}\n",
        processes.join(" | "),
        "---:|".repeat(processes.len())
    );
    for m in results {
        out.push_str(&format!("| {} | {} |\n", m.name, cells(&m.cpu_per_call)));
    }
    out.push_str(&loaded_cpu_markdown(results, &processes));
    out
}

/// Under load, the CPU per call of the first concurrency above one, and how many of the
/// machine's cores that path's calls kept busy (all watched processes, at the rate
/// measured): where the cores are full, throughput is what CPU per call allows.
fn loaded_cpu_markdown(results: &[Measured], processes: &[&str]) -> String {
    let Some(workers) = results.iter().flat_map(|m| &m.throughput).map(|t| t.concurrency).find(|&c| c > 1) else {
        return String::new();
    };
    let mut out = format!(
        "\nCPU time per call at {workers} clients, µs, and the cores the calls kept busy:\n\n| path | {} | cores busy |\n|---|{}---:|\n",
        processes.join(" | "),
        "---:|".repeat(processes.len())
    );
    for m in results {
        let Some(t) = m.throughput.iter().find(|t| t.concurrency == workers) else { continue };
        let busy = t.cpu_per_call.iter().map(|c| c.us).sum::<f64>() * t.ops_per_s / 1e6;
        out.push_str(&format!("| {} | {} | {busy:.2} |\n", m.name, cells(&t.cpu_per_call)));
    }
    out
}

/// A row's CPU cells, whole microseconds.
fn cells(cpu: &[ProcessCpu]) -> String {
    cpu.iter().map(|c| format!("{:.0}", c.us)).collect::<Vec<_>>().join(" | ")
}

/// "2 cores, 23 GiB, <cpu model>" from /proc.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kb: u64 = mem
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "{} cores, {} GiB, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        total_kb / (1 << 20),
        model.unwrap_or("unknown CPU")
    )
}
