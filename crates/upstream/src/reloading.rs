//! A value built from files and rebuilt when any of them changes, for everything a tier
//! reads from files it must pick up without a restart: TLS certificates and keys on both
//! sides of a connection, and a tier's own API key. The files' modification times are looked
//! at most once a second, when the value is asked for; a rebuild that fails (a renewal
//! written one file at a time, a key that does not fit) keeps the last good value and says
//! so in the log.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

/// How often at most the files' modification times are looked at.
pub const RECHECK: Duration = Duration::from_secs(1);

type Build<T> = Box<dyn Fn() -> Result<T, String> + Send + Sync>;

/// A value rebuilt from `paths` when they change.
pub struct Reloading<T> {
    paths: Vec<PathBuf>,
    build: Build<T>,
    /// Logged when a change was loaded, and when one was not (the last good value stays).
    loaded: &'static str,
    kept: &'static str,
    state: Mutex<Loaded<T>>,
}

struct Loaded<T> {
    value: Arc<T>,
    stamps: Vec<Option<SystemTime>>,
    checked: Instant,
}

impl<T> Reloading<T> {
    /// Builds the value once (its error is the caller's to report) and keeps `build` for
    /// the changes to come.
    pub fn new(
        paths: Vec<PathBuf>,
        loaded: &'static str,
        kept: &'static str,
        build: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let value = Arc::new(build()?);
        let stamps = stamps(&paths);
        Ok(Self {
            paths,
            build: Box::new(build),
            loaded,
            kept,
            state: Mutex::new(Loaded { value, stamps, checked: Instant::now() }),
        })
    }

    /// The current value, rebuilt first if a file changed since it was built.
    pub fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let now = stamps(&self.paths);
            if now != state.stamps {
                match (self.build)() {
                    Ok(value) => {
                        info!(file = %self.paths[0].display(), "{}", self.loaded);
                        state.value = Arc::new(value);
                        state.stamps = now;
                    }
                    Err(message) => warn!(%message, "{}", self.kept),
                }
            }
        }
        Arc::clone(&state.value)
    }
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}
