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

/// When the set is full, a pin not asked for within this long (four default KEDA polls) may be
/// evicted, least recently asked first, to make room for a new one: a ScaledObject that still
/// polls refreshes its pin far more often, a deleted one frees its slot before `PIN_TTL`.
pub const PIN_IDLE_EVICT: Duration = Duration::from_secs(120);

/// A query's remote cannot be pinned: `MAX_PINNED` remotes are pinned and each was asked for
/// within `PIN_IDLE_EVICT`. Its pool may be folded into `other`, so it has no exact value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "remote {remote} cannot be pinned: {limit} remotes are already pinned (the limit), each asked \
     for by a query within the last {}s; beyond topRemotes its pool would be folded into \
     `other` and read 0",
    PIN_IDLE_EVICT.as_secs()
)]
pub struct PinsFull {
    pub remote: String,
    pub limit: usize,
}

impl From<PinsFull> for tonic::Status {
    fn from(e: PinsFull) -> Self {
        tonic::Status::resource_exhausted(e.to_string())
    }
}

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
    /// than before when a remote was newly pinned. All or nothing: when the new remotes do not
    /// fit even after evicting idle pins, nothing changes and the error names the first.
    pub fn pin<S: AsRef<str>>(&self, remotes: &[S]) -> Result<u64, PinsFull> {
        self.pin_at(remotes, Instant::now())
    }

    fn pin_at<S: AsRef<str>>(&self, remotes: &[S], now: Instant) -> Result<u64, PinsFull> {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner
            .last_asked
            .retain(|_, at| now.saturating_duration_since(*at) <= PIN_TTL);
        let mut new: Vec<&str> = remotes
            .iter()
            .map(AsRef::as_ref)
            .filter(|r| !r.is_empty() && !inner.last_asked.contains_key(*r))
            .collect();
        new.sort_unstable();
        new.dedup();
        let free = MAX_PINNED.saturating_sub(inner.last_asked.len());
        if new.len() > free {
            let mut idle: Vec<(Instant, String)> = inner
                .last_asked
                .iter()
                .filter(|(_, at)| now.saturating_duration_since(**at) > PIN_IDLE_EVICT)
                .map(|(r, at)| (*at, r.clone()))
                .collect();
            let need = new.len() - free;
            if idle.len() < need {
                return Err(PinsFull {
                    remote: new[0].to_string(),
                    limit: MAX_PINNED,
                });
            }
            idle.sort();
            for (_, r) in idle.into_iter().take(need) {
                inner.last_asked.remove(&r);
            }
        }
        for r in remotes.iter().map(AsRef::as_ref).filter(|r| !r.is_empty()) {
            inner.last_asked.insert(r.to_string(), now);
        }
        if !new.is_empty() {
            inner.generation += 1;
        }
        Ok(inner.generation)
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
        assert_eq!(p.pin(&["10.0.0.1:5432"]), Ok(1));
        assert_eq!(p.pin(&["10.0.0.1:5432", ""]), Ok(1));
        assert_eq!(p.pin(&["*:8080"]), Ok(2));
        let (set, generation) = p.current();
        assert_eq!(generation, 2);
        assert_eq!(
            set.into_iter().collect::<Vec<_>>(),
            vec!["*:8080", "10.0.0.1:5432"]
        );
    }

    fn many(n: usize, port: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.{i}.1:{port}")).collect()
    }

    #[test]
    fn a_full_set_refuses_a_new_remote_naming_the_limit_and_changes_nothing() {
        let p = PinnedRemotes::default();
        let now = Instant::now();
        assert_eq!(p.pin_at(&many(MAX_PINNED, 1), now), Ok(1));
        let e = p
            .pin_at(&["10.9.9.9:1", "10.0.0.1:1"], now + PIN_IDLE_EVICT)
            .unwrap_err();
        assert_eq!(e.remote, "10.9.9.9:1");
        assert!(e.to_string().contains("256 remotes"), "{e}");
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::ResourceExhausted
        );
        let (set, generation) = p.current();
        assert_eq!((set.len(), generation), (MAX_PINNED, 1));
        assert!(!set.contains("10.9.9.9:1"));
        // Already pinned remotes are still refreshed when the set is full.
        assert_eq!(p.pin_at(&["10.0.5.1:1"], now + PIN_IDLE_EVICT), Ok(1));
    }

    #[test]
    fn a_full_set_evicts_the_least_recently_asked_idle_pin() {
        let p = PinnedRemotes::default();
        let t0 = Instant::now();
        p.pin_at(&many(MAX_PINNED - 1, 1), t0).unwrap();
        let later = t0 + Duration::from_secs(60);
        p.pin_at(&["10.8.8.8:1"], later).unwrap();
        // Refresh all but 10.0.7.1:1 at t0 + 100s; at t0 + 121s it alone is idle.
        let refreshed: Vec<String> = many(MAX_PINNED - 1, 1)
            .into_iter()
            .filter(|r| r != "10.0.7.1:1")
            .collect();
        p.pin_at(&refreshed, t0 + Duration::from_secs(100)).unwrap();
        let at = t0 + PIN_IDLE_EVICT + Duration::from_secs(1);
        assert_eq!(p.pin_at(&["10.9.9.9:1"], at), Ok(3));
        let set = p.current().0;
        assert!(set.contains("10.9.9.9:1") && !set.contains("10.0.7.1:1"));
        assert!(set.contains("10.8.8.8:1"));
        assert!(p.pin_at(&["10.9.9.10:1"], at).is_err());
    }
}
