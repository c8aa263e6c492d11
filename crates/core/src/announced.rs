//! Literal texts a Flight SQL GetFlightInfo has just resolved to the plan of their shape and
//! their values, kept for the DoGet that follows.
//!
//! A Flight SQL client sends the same text twice: GetFlightInfo plans it to announce its
//! schema, and DoGet runs it. A literal text the plan cache does not hold by itself (a key
//! lookup with a new key each time) is resolved through its skeleton both times, and that
//! resolution was a tenth of a Flight SQL lookup's instructions (callgrind at `6264eb6`:
//! 11k of 137k, GetFlightInfo's and again DoGet's). Here GetFlightInfo's resolution is kept
//! and DoGet takes it, once.
//!
//! Nothing here is trusted beyond what the plan cache's own entries are: the plan kept is
//! one the plan cache handed out, and whoever takes it checks, as for any cached plan, that
//! its tables are still the catalog's and that the caller may read them. The memo is a
//! fixed number of slots chosen by the text's hash; a text that lands on a taken slot
//! replaces its entry, so a GetFlightInfo whose DoGet never comes costs one slot until the
//! next text lands there.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::common::ScalarValue;

use crate::plan_cache::CachedPlan;

/// Slots: more than the GetFlightInfo calls whose DoGet is on its way at once on a tier
/// serving a few dozen clients; a collision only costs the second call its skeleton.
const SLOTS: usize = 256;
/// Longest text kept. Key lookups are short; a long text's resolution is dwarfed by its
/// planning or execution, and the slots stay small (at most 256 x 2 KiB of text).
const MAX_TEXT: usize = 2048;

struct Entry {
    text: Box<str>,
    plan: Arc<CachedPlan>,
    values: Vec<ScalarValue>,
}

/// See the module documentation.
pub(crate) struct AnnouncedTexts {
    slots: Box<[Mutex<Option<Entry>>]>,
    /// Slots holding an entry: while none does, a lookup costs one atomic load, not a hash.
    held: AtomicUsize,
    hasher: crate::FastHash,
}

impl Default for AnnouncedTexts {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
            held: AtomicUsize::new(0),
            hasher: crate::FastHash::default(),
        }
    }
}

impl AnnouncedTexts {
    /// Keeps `text`'s plan and values for the next [`AnnouncedTexts::take`] of the same text.
    pub(crate) fn remember(&self, text: &str, plan: Arc<CachedPlan>, values: Vec<ScalarValue>) {
        if text.len() > MAX_TEXT {
            return;
        }
        let entry = Entry { text: text.into(), plan, values };
        let mut slot = self.slot(text).lock().unwrap_or_else(|p| p.into_inner());
        if slot.replace(entry).is_none() {
            self.held.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The plan and values remembered for exactly `text`, removed from the memo.
    pub(crate) fn take(&self, text: &str) -> Option<(Arc<CachedPlan>, Vec<ScalarValue>)> {
        if self.held.load(Ordering::Relaxed) == 0 || text.len() > MAX_TEXT {
            return None;
        }
        let mut slot = self.slot(text).lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|entry| &*entry.text != text) {
            return None;
        }
        let entry = slot.take()?;
        self.held.fetch_sub(1, Ordering::Relaxed);
        Some((entry.plan, entry.values))
    }

    /// Entries held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn slot(&self, text: &str) -> &Mutex<Option<Entry>> {
        &self.slots[self.hasher.hash_one(text) as usize % SLOTS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    async fn plan_of(sql: &str) -> Arc<CachedPlan> {
        let engine = crate::Engine::new(&Config::parse("region: eu\n", "test").expect("config")).expect("engine");
        let planned = engine.plan(sql, &crate::QueryOptions::default()).await.expect("planned");
        Arc::new(CachedPlan::new(planned))
    }

    #[tokio::test]
    async fn a_text_is_taken_once_and_only_by_the_same_text() {
        let memo = AnnouncedTexts::default();
        let plan = plan_of("SELECT $1 + 1").await;
        let values = vec![ScalarValue::Int64(Some(41))];
        assert!(memo.take("SELECT 41 + 1").is_none(), "nothing remembered yet");
        memo.remember("SELECT 41 + 1", Arc::clone(&plan), values.clone());
        assert!(memo.take("SELECT 42 + 1").is_none(), "another text is not this one's");
        let (taken, bound) = memo.take("SELECT 41 + 1").expect("remembered");
        assert!(Arc::ptr_eq(&taken, &plan));
        assert_eq!(bound, values);
        assert!(memo.take("SELECT 41 + 1").is_none(), "taken once");
        assert_eq!(memo.held(), 0);
    }

    #[tokio::test]
    async fn slots_bound_what_is_held_and_long_texts_are_not_kept() {
        let memo = AnnouncedTexts::default();
        let plan = plan_of("SELECT $1 + 1").await;
        for key in 0..(4 * SLOTS) {
            memo.remember(&format!("SELECT {key} + 1"), Arc::clone(&plan), vec![ScalarValue::Int64(Some(key as i64))]);
        }
        let held = memo.held();
        assert!(held <= SLOTS, "{held} entries held in {SLOTS} slots");
        let taken = (0..(4 * SLOTS)).filter(|key| memo.take(&format!("SELECT {key} + 1")).is_some()).count();
        assert_eq!(taken, held, "every held entry is its own text's");
        let long = format!("SELECT 1 + 1 /* {} */", "x".repeat(MAX_TEXT));
        memo.remember(&long, plan, Vec::new());
        assert!(memo.take(&long).is_none());
    }
}
