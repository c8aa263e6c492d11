//! Progress of long work (a dataset's first load or a refresh, a replica's snapshot),
//! shared between the task doing it and whoever reports it: `/v1/datasets`, the log lines
//! written at a steady interval, and `strata status --watch`'s progress bars.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How often a long load logs how far it got.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The counters of one piece of work; idle between pieces.
#[derive(Debug, Default)]
pub struct WorkProgress {
    running: Mutex<Option<(&'static str, Instant)>>,
    rows: AtomicU64,
    bytes: AtomicU64,
    /// Rows expected in all, when the source can tell (Parquet footers; the platform for a
    /// replica's snapshot); 0 when it cannot.
    expected_rows: AtomicU64,
}

/// A snapshot of [`WorkProgress`], for reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgressReport {
    /// `load` (the first copy), `refresh`, or `snapshot` (a replica's full version).
    pub phase: &'static str,
    pub rows_read: u64,
    pub bytes_read: u64,
    pub elapsed_seconds: f64,
    pub rows_per_second: f64,
    /// Rows expected in all, when the source could tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_rows: Option<u64>,
    /// Time left at the current rate, when the total is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
}

impl WorkProgress {
    /// Starts a piece of work, forgetting the previous one's counts.
    pub fn start(&self, phase: &'static str, expected_rows: Option<u64>) {
        self.rows.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.expected_rows.store(expected_rows.unwrap_or(0), Ordering::Relaxed);
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some((phase, Instant::now()));
    }

    pub fn add(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The work ended (done or failed): nothing is reported until the next starts.
    pub fn finish(&self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// How far the running work got; `None` while idle.
    pub fn report(&self) -> Option<ProgressReport> {
        let (phase, started) = (*self.running.lock().unwrap_or_else(|p| p.into_inner()))?;
        let elapsed = started.elapsed().as_secs_f64();
        let rows = self.rows.load(Ordering::Relaxed);
        let rate = if elapsed > 0.0 { rows as f64 / elapsed } else { 0.0 };
        let expected = Some(self.expected_rows.load(Ordering::Relaxed)).filter(|n| *n > 0);
        let eta = expected.filter(|_| rate > 0.0).map(|total| total.saturating_sub(rows) as f64 / rate);
        Some(ProgressReport {
            phase,
            rows_read: rows,
            bytes_read: self.bytes.load(Ordering::Relaxed),
            elapsed_seconds: elapsed,
            rows_per_second: rate,
            expected_rows: expected,
            eta_seconds: eta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_while_running_with_rate_and_estimate() {
        let progress = WorkProgress::default();
        assert_eq!(progress.report(), None);
        progress.start("load", Some(1000));
        std::thread::sleep(Duration::from_millis(20));
        progress.add(250, 4096);
        let report = progress.report().expect("running");
        assert_eq!((report.phase, report.rows_read, report.bytes_read), ("load", 250, 4096));
        assert_eq!(report.expected_rows, Some(1000));
        assert!(report.rows_per_second > 0.0);
        // 750 rows left at the measured rate.
        let eta = report.eta_seconds.expect("eta");
        assert!((eta - 750.0 / report.rows_per_second).abs() < 1e-6, "{report:?}");
        progress.finish();
        assert_eq!(progress.report(), None);
        // A source that cannot tell its size: no estimate, and the counts start over.
        progress.start("refresh", None);
        let report = progress.report().expect("running");
        assert_eq!((report.rows_read, report.expected_rows, report.eta_seconds), (0, None, None));
    }
}
