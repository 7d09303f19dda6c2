//! Keys the daemon could not apply or restore, held out of the reconcile with exponential
//! backoff so one bad key (a one-way knob, an interface key of a detached ENI, a netfilter key
//! after a module unload, a value the kernel refuses) never wedges the rest: every other key
//! keeps being applied, reverted and drift-corrected every interval.
//!
//! Pure bookkeeping over an injected clock; never touches the host.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Longest wait between two attempts at a quarantined key: a key that recovers (the module is
/// loaded again, the interface is back) is picked up within the hour without hammering the
/// kernel or the logs in between.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// What failed for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Apply,
    Restore,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Self::Apply => "apply",
            Self::Restore => "restore",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub action: Action,
    pub error: String,
    /// Consecutive failures (1 after the first).
    pub failures: u32,
    pub retry_at: Instant,
}

#[derive(Debug, Default)]
pub struct Quarantine {
    entries: BTreeMap<String, Entry>,
}

/// Wait after the `failures`-th consecutive failure: 2, 4, 8... intervals, at most `MAX_BACKOFF`.
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
    interval.saturating_mul(factor).min(MAX_BACKOFF)
}

impl Quarantine {
    /// Records a failure; true when the key was not quarantined before (worth an Event).
    pub fn fail(
        &mut self,
        key: &str,
        action: Action,
        error: String,
        now: Instant,
        interval: Duration,
    ) -> bool {
        let failures = self.entries.get(key).map_or(0, |e| e.failures) + 1;
        let new = !self.entries.contains_key(key);
        self.entries.insert(
            key.to_string(),
            Entry {
                action,
                error,
                failures,
                retry_at: now + backoff(interval, failures),
            },
        );
        new
    }

    /// The key worked (or is no longer wanted anywhere): release it.
    pub fn clear(&mut self, key: &str) -> bool {
        self.entries.remove(key).is_some()
    }

    /// Quarantined and not yet due for another attempt.
    pub fn holds(&self, key: &str, now: Instant) -> bool {
        self.entries.get(key).is_some_and(|e| now < e.retry_at)
    }

    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// One line per key for the status and the health message.
    pub fn describe(&self, now: Instant) -> Vec<String> {
        self.entries
            .iter()
            .map(|(k, e)| {
                format!(
                    "{k}: {} failed {} time(s): {}; next attempt in {}s",
                    e.action.label(),
                    e.failures,
                    e.error,
                    e.retry_at.saturating_duration_since(now).as_secs()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_two_intervals_and_caps_at_an_hour() {
        let i = Duration::from_secs(60);
        assert_eq!(backoff(i, 1), Duration::from_secs(120));
        assert_eq!(backoff(i, 2), Duration::from_secs(240));
        assert_eq!(backoff(i, 5), Duration::from_secs(1920));
        assert_eq!(backoff(i, 6), MAX_BACKOFF);
        assert_eq!(backoff(i, 1000), MAX_BACKOFF);
    }

    #[test]
    fn a_key_is_held_until_due_and_released_on_success() {
        let (mut q, t0, i) = (
            Quarantine::default(),
            Instant::now(),
            Duration::from_secs(10),
        );
        assert!(q.fail("k", Action::Apply, "EINVAL".into(), t0, i));
        assert!(q.holds("k", t0 + i));
        assert!(!q.holds("k", t0 + 2 * i));
        assert!(!q.fail("k", Action::Apply, "EINVAL".into(), t0 + 2 * i, i));
        assert!(q.holds("k", t0 + 5 * i), "second failure waits 4 intervals");
        assert!(!q.holds("k", t0 + 6 * i));
        assert!(!q.holds("other", t0));
        assert!(q.clear("k"));
        assert!(!q.holds("k", t0));
    }
}
