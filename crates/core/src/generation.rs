//! A process-wide count of the changes that can alter what a query text reads or where it
//! runs: a table registered or replaced, a snapshot published, a router's catalog, replicas
//! or local writes changed.
//!
//! The results cache finds a repeated query's answer by its text before planning it (see
//! [`crate::results_cache::ResultsCache::by_text`]); such a shortcut is sound only while
//! nothing the plan was made from has changed, and comparing one counter is what makes it
//! cheaper than planning. A change anywhere sends every text through the planner once more,
//! which then finds the answers of unchanged datasets under their plan keys as before: the
//! counter errs on the side of planning, never of serving a wrong answer.

use std::sync::atomic::{AtomicU64, Ordering};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The generation now. Read it before planning: a change while planning then makes what
/// was planned unusable as a shortcut.
pub fn current() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Records a change (call it after the change is visible to queries).
pub fn advance() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}
