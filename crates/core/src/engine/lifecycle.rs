//! A tier's life outside queries: the per-dataset background task (connect, first load,
//! refresh on its interval) and readiness, which waits for that first load and for every
//! start-up guard (see [`Engine::hold_readiness`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::Engine;
use crate::background::Background;
use crate::dataset::{Dataset, DatasetStatus};
use crate::error::{Result, StrataError};

/// Readiness held back by one piece of start-up work; see [`Engine::hold_readiness`].
#[must_use = "readiness is released when the guard drops"]
pub struct ReadinessGuard {
    engine: Engine,
}

impl Drop for ReadinessGuard {
    fn drop(&mut self) {
        self.engine.inner.pending_startup.fetch_sub(1, Ordering::SeqCst);
        self.engine.update_readiness();
    }
}

impl Engine {
    /// Starts one background task per dataset: connect (retrying), first load, then refresh
    /// on its interval, until the background is stopped (see [`Engine::background`]).
    pub fn start(&self) {
        for dataset in &self.inner.datasets {
            let engine = self.clone();
            let dataset = Arc::clone(dataset);
            let stop = self.inner.background.token();
            let span = info_span!("dataset", name = %dataset.name());
            let name = format!("dataset {}", dataset.name());
            self.inner.background.spawn(name, async move { engine.maintain(dataset, stop).await }.instrument(span));
        }
        self.update_readiness();
    }

    /// This tier's background work (refresh, catalog sync, replication, upload): stopped only
    /// after the servers have drained (`strata_serving::Servers::wait`).
    pub fn background(&self) -> &Background {
        &self.inner.background
    }

    /// Holds readiness back while the returned guard lives: start-up work outside the
    /// datasets (a sidecar's first catalog read) takes one and drops it when done. Dropping is
    /// the only way to release it, so a task that fails, returns early or panics cannot leave
    /// the tier unready forever, and none can release twice.
    pub fn hold_readiness(&self) -> ReadinessGuard {
        self.inner.pending_startup.fetch_add(1, Ordering::SeqCst);
        ReadinessGuard { engine: self.clone() }
    }

    /// True once start-up work is done (see `update_readiness`). Never turns back to false.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Waits until [`Engine::is_ready`].
    pub async fn wait_ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Refreshes one accelerated dataset now and returns its new status.
    pub async fn refresh(&self, name: &str) -> Result<DatasetStatus> {
        let dataset = self.find(name).ok_or_else(|| StrataError::UnknownDataset(name.to_string()))?;
        let status = dataset.refresh(&self.inner.ctx).await?;
        self.update_readiness();
        Ok(status)
    }

    async fn maintain(&self, dataset: Arc<Dataset>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let max_backoff = Duration::from_secs(10);
        // Connect, then load once, retrying both with backoff: a source that is down at start
        // delays this dataset only.
        loop {
            let step = async {
                if !dataset.is_connected() {
                    dataset.connect(&self.inner.ctx, &self.inner.connector).await?;
                    info!("source connected");
                }
                if dataset.config.accelerated().is_some() {
                    dataset.refresh(&self.inner.ctx).await?;
                }
                Ok::<_, StrataError>(())
            };
            let outcome = step.await;
            if !dataset.tried.swap(true, Ordering::Relaxed) {
                self.update_readiness();
            }
            match outcome {
                Ok(()) => break,
                Err(err) => {
                    warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "dataset not available yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
        self.update_readiness();
        let Some(interval) = dataset.refresh_interval() else { return };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            // Failures are recorded in the dataset status; the last good copy keeps serving.
            let _ = dataset.refresh(&self.inner.ctx).await;
        }
    }

    /// Ready once start-up work is done: every dataset's source has been tried once (a
    /// federated source that is down does not hold readiness back) and every accelerated
    /// dataset has loaded.
    fn update_readiness(&self) {
        if self.inner.pending_startup.load(Ordering::SeqCst) > 0 {
            return;
        }
        let loaded = self
            .inner
            .datasets
            .iter()
            .all(|d| d.tried.load(Ordering::Relaxed) && (d.config.accelerated().is_none() || d.is_loaded()));
        if loaded {
            self.inner.ready.send_if_modified(|ready| !std::mem::replace(ready, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::engine::Engine;

    #[tokio::test]
    async fn readiness_waits_for_every_start_up_guard_and_only_for_them() {
        let config = Config::parse("region: eu\n", "test").expect("config");
        let engine = Engine::new(&config).expect("engine");
        let catalog_a = engine.hold_readiness();
        let catalog_b = engine.hold_readiness();
        engine.start();
        assert!(!engine.is_ready(), "two start-up tasks pending");
        drop(catalog_a);
        assert!(!engine.is_ready(), "one start-up task pending");
        // A task that ends without success (an early return, a panic) drops its guard too.
        let failed = tokio::spawn(async move {
            let _guard = catalog_b;
            panic!("start-up task failed");
        });
        assert!(failed.await.is_err());
        assert!(engine.is_ready(), "no dataset and no start-up task left");
        assert_eq!(engine.queries_in_flight(), 0);
    }
}
