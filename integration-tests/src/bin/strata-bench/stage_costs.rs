//! What a distributed query's stages cost, read from its `EXPLAIN ANALYZE`
//! (`distributed_plan_with_metrics`, datafusion-distributed's plan with each node's metrics
//! per task): the bytes its network boundaries moved, and the CPU time (`elapsed_compute`)
//! of the coordinator's own stage against all stages together.

/// One query's figures.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StageCosts {
    /// Bytes every network boundary received (shuffles, coalesces, broadcasts), all tasks.
    pub bytes_moved: f64,
    /// CPU time of the operators in the coordinator's stage (the plan's head), ms.
    pub head_compute_ms: f64,
    /// CPU time of the operators in every stage, ms.
    pub total_compute_ms: f64,
}

/// Reads the figures from the plan text. A stage's header line (`Stage N ── tasks=...`, or
/// the head's `DistributedExec ──`) carries metrics gathered from its nodes again, so only
/// node lines are counted.
pub fn parse(plan: &str) -> StageCosts {
    let mut costs = StageCosts::default();
    let mut in_head = false;
    for line in plan.lines() {
        if line.contains("DistributedExec") && !line.contains("tasks=") {
            in_head = true;
            continue;
        }
        if line.contains(" Stage ") && line.contains("tasks=") {
            in_head = false;
            continue;
        }
        let compute: f64 = values(line, "elapsed_compute=").filter_map(duration_ms).sum();
        costs.total_compute_ms += compute;
        if in_head {
            costs.head_compute_ms += compute;
        }
        costs.bytes_moved += values(line, "bytes_transferred=").filter_map(bytes).sum::<f64>();
    }
    costs
}

/// The values of metric `name` on one line: `name=v` or, per task, `name={0:v, 1:w}`.
fn values<'a>(line: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    line.match_indices(name).flat_map(move |(at, _)| {
        let rest = &line[at + name.len()..];
        let listed = match rest.strip_prefix('{') {
            Some(map) => map.split('}').next().unwrap_or_default(),
            None => rest.split([',', ']']).next().unwrap_or_default(),
        };
        listed.split(", ").map(|v| v.split_once(':').map_or(v, |(_, value)| value).trim())
    })
}

/// `1.50s`, `2.25ms`, `3.00µs`, `400ns` (DataFusion's display of a duration) in ms.
fn duration_ms(text: &str) -> Option<f64> {
    for (unit, per_ms) in [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)] {
        if let Some(number) = text.strip_suffix(unit) {
            return number.parse::<f64>().ok().map(|n| n * per_ms);
        }
    }
    None
}

/// `12.5 MB` (DataFusion's display of a size, powers of 1024) in bytes.
fn bytes(text: &str) -> Option<f64> {
    let (number, unit) = text.split_once(' ')?;
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bytes_and_compute_per_stage_from_node_lines_only() {
        let plan = "┌───── DistributedExec ── elapsed_compute=9.00s\n\
            │ SortPreservingMergeExec, metrics=[elapsed_compute=1.50ms, output_rows=4]\n\
            │   NetworkCoalesceExec, metrics=[bytes_transferred={0:2.0 KB, 1:1.0 MB}, elapsed_compute={0:250.00µs}]\n\
            └──────────────────────────────────────────────────\n\
              ┌───── Stage 1 ── tasks=2, partitions=4 elapsed_compute={0:9.00s, 1:9.00s}\n\
              │ AggregateExec, metrics=[elapsed_compute={0:2.00s, 1:500ns}, output_rows={0:3, 1:1}]\n\
              └──────────────────────────────────────────────────\n";
        let costs = parse(plan);
        assert_eq!(costs.bytes_moved, 2048.0 + 1024.0 * 1024.0);
        assert!((costs.head_compute_ms - 1.75).abs() < 1e-9, "{costs:?}");
        assert!((costs.total_compute_ms - (1.75 + 2000.0 + 0.0005)).abs() < 1e-9, "{costs:?}");
        assert_eq!(parse("no metrics here"), StageCosts::default());
    }
}
