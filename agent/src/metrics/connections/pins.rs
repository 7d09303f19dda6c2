//! Remotes pinned by the KEDA queries that name them: such a remote keeps its own pool in every
//! pod's census whatever its rank, so a `remote` query is exact even when the pool is beyond
//! `topRemotes` (folded into `other`, it would read 0 and scale the workload in).
//!
//! Owns the set and its expiry: a remote stays pinned for `PIN_TTL` after a query last named
//! it (KEDA polls every 30 s by default, so a live ScaledObject keeps its pin; a deleted one
//! stops costing a pool after the TTL), and a generation that grows whenever a remote is newly
//! pinned, so a census or fan-out made before can be recognised and not used for it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a remote stays pinned after a query last named it: twenty default KEDA polls.
pub const PIN_TTL: Duration = Duration::from_secs(600);

/// At most this many remotes pinned at once: each is a pool per pod that holds connections to
/// it, so a flood of distinct remotes in queries cannot grow every census without bound.
pub const MAX_PINNED: usize = 256;

#[derive(Debug, Default)]
pub struct PinnedRemotes {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    last_asked: HashMap<String, Instant>,
    generation: u64,
}

impl PinnedRemotes {
    /// Pins `remotes` (refreshing their expiry). Returns the generation to wait for: greater
    /// than before when a remote was newly pinned.
    pub fn pin<S: AsRef<str>>(&self, remotes: &[S]) -> u64 {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("not poisoned");
        inner
            .last_asked
            .retain(|_, at| now.saturating_duration_since(*at) <= PIN_TTL);
        for r in remotes {
            let r = r.as_ref();
            if r.is_empty() {
                continue;
            }
            if let Some(at) = inner.last_asked.get_mut(r) {
                *at = now;
            } else if inner.last_asked.len() < MAX_PINNED {
                inner.last_asked.insert(r.to_string(), now);
                inner.generation += 1;
            }
        }
        inner.generation
    }

    /// The pinned remotes now, and their generation.
    pub fn current(&self) -> (BTreeSet<String>, u64) {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("not poisoned");
        inner
            .last_asked
            .retain(|_, at| now.saturating_duration_since(*at) <= PIN_TTL);
        (inner.last_asked.keys().cloned().collect(), inner.generation)
    }

    pub fn generation(&self) -> u64 {
        self.inner.lock().expect("not poisoned").generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_remote_raises_the_generation_a_known_one_does_not() {
        let p = PinnedRemotes::default();
        assert_eq!(p.pin(&["10.0.0.1:5432"]), 1);
        assert_eq!(p.pin(&["10.0.0.1:5432", ""]), 1);
        assert_eq!(p.pin(&["*:8080"]), 2);
        let (set, generation) = p.current();
        assert_eq!(generation, 2);
        assert_eq!(
            set.into_iter().collect::<Vec<_>>(),
            vec!["*:8080", "10.0.0.1:5432"]
        );
    }

    #[test]
    fn at_most_max_pinned() {
        let p = PinnedRemotes::default();
        let many: Vec<String> = (0..MAX_PINNED + 10)
            .map(|i| format!("10.0.0.1:{i}"))
            .collect();
        p.pin(&many);
        assert_eq!(p.current().0.len(), MAX_PINNED);
    }
}
