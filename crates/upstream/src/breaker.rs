//! A circuit breaker per upstream endpoint: after `failures` consecutive calls that never
//! reached a working server it opens and fails fast for `open_for`, then lets calls through
//! again as probes; the first success closes it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Probing: calls pass; a failure reopens at once, a success closes.
    HalfOpen,
}

/// One endpoint's breaker; shared by its service and the client's fail-fast check.
#[derive(Debug)]
pub struct Breaker {
    pub endpoint: String,
    state: Mutex<State>,
    last_error: Mutex<Option<String>>,
    failures_to_open: u32,
    open_for: Duration,
}

impl Breaker {
    pub fn new(endpoint: impl Into<String>, failures_to_open: u32, open_for: Duration) -> Self {
        Self {
            endpoint: endpoint.into(),
            state: Mutex::new(State::Closed { failures: 0 }),
            last_error: Mutex::new(None),
            failures_to_open: failures_to_open.max(1),
            open_for,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Ok` when a call may go out now (moving an expired open breaker to probing);
    /// otherwise the instant it will admit a probe.
    pub fn admit(&self) -> Result<(), Instant> {
        let mut state = self.state();
        match *state {
            State::Open { until } if Instant::now() < until => Err(until),
            State::Open { .. } => {
                *state = State::HalfOpen;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Open and not yet due for a probe.
    pub fn is_open(&self) -> bool {
        matches!(*self.state(), State::Open { until } if Instant::now() < until)
    }

    /// `closed`, `open` or `half_open`, for status pages.
    pub fn state_name(&self) -> &'static str {
        match *self.state() {
            State::Closed { .. } => "closed",
            State::Open { until } if Instant::now() < until => "open",
            _ => "half_open",
        }
    }

    pub fn success(&self) {
        *self.state() = State::Closed { failures: 0 };
    }

    pub fn failure(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        let mut state = self.state();
        let failures = match *state {
            State::Closed { failures } => failures + 1,
            State::HalfOpen => self.failures_to_open,
            State::Open { .. } => return,
        };
        *state = if failures >= self.failures_to_open {
            tracing::warn!(endpoint = %self.endpoint, error, open_for = ?self.open_for, "circuit breaker open");
            State::Open { until: Instant::now() + self.open_for }
        } else {
            State::Closed { failures }
        };
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, not tokio's paused clock: its `test-util` feature, enabled for tests only,
    // gave `cargo run -p strata-cli` another tokio than the test build, so whichever ran
    // second recompiled every crate above tokio (DataFusion included).
    #[tokio::test]
    async fn opens_after_consecutive_failures_and_probes_after_the_wait() {
        let b = Breaker::new("e", 2, Duration::from_millis(50));
        b.failure("refused");
        assert!(b.admit().is_ok(), "one failure keeps it closed");
        b.failure("refused");
        assert!(b.is_open());
        assert!(b.admit().is_err());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(b.admit().is_ok(), "due for a probe");
        assert_eq!(b.state_name(), "half_open");
        b.failure("still refused");
        assert!(b.is_open(), "a failed probe reopens at once");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(b.admit().is_ok());
        b.success();
        assert_eq!(b.state_name(), "closed");
        assert_eq!(b.last_error().as_deref(), Some("still refused"));
    }

    #[tokio::test]
    async fn a_success_resets_the_failure_count() {
        let b = Breaker::new("e", 2, Duration::from_secs(5));
        b.failure("x");
        b.success();
        b.failure("x");
        assert!(!b.is_open());
    }
}
