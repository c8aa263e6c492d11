//! A tier's background work (dataset loads and refreshes, catalog syncs, replication, the
//! edge uploader), each task by name. It has its own stop signal, separate from the servers':
//! on shutdown the servers drain their in-flight queries first (which may still read replicas
//! or unconfirmed writes), and only then is the background stopped and awaited, with the
//! names of any task that did not stop in time logged.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A running background task and the name a slow shutdown reports it by.
type NamedTask = (String, JoinHandle<()>);

/// Named background tasks and the token that tells them to stop.
#[derive(Clone, Default)]
pub struct Background {
    stop: CancellationToken,
    tasks: Arc<Mutex<Vec<NamedTask>>>,
}

impl Background {
    /// The signal background tasks watch; cancelled by [`Background::shutdown`].
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `task` in the background under `name` (what a slow shutdown reports).
    pub fn spawn(&self, name: impl Into<String>, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Finished tasks (a replica that resubscribed, a one-off retry) need no tracking.
        tasks.retain(|(_, h)| !h.is_finished());
        tasks.push((name.into(), handle));
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|(_, h)| !h.is_finished()).count()
    }

    /// Tells every task to stop and waits up to `within` for them; the ones still running
    /// then are named in the log and aborted. Returns their names.
    pub async fn shutdown(&self, within: Duration) -> Vec<String> {
        let started = Instant::now();
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let count = tasks.len();
        let deadline = tokio::time::Instant::now() + within;
        let mut late = Vec::new();
        for (name, mut handle) in tasks {
            if tokio::time::timeout_at(deadline, &mut handle).await.is_err() {
                handle.abort();
                late.push(name);
            }
        }
        if late.is_empty() {
            info!(tasks = count, took = ?started.elapsed(), "shutdown: background tasks stopped");
        } else {
            warn!(tasks = count, late = ?late, within = ?within, "shutdown: background tasks did not stop in time; aborted");
        }
        late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_stops_what_watches_the_token_and_names_what_does_not() {
        let background = Background::default();
        let token = background.token();
        background.spawn("refresh orders", async move { token.cancelled().await });
        background.spawn("stuck uploader", std::future::pending());
        background.spawn("done already", async {});
        let late = background.shutdown(Duration::from_millis(100)).await;
        assert_eq!(late, vec!["stuck uploader".to_string()]);
        assert_eq!(background.running(), 0);
    }
}
