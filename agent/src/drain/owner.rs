//! One driver per node's drain, when two agent processes run on the node (a DaemonSet rollout
//! with `maxSurge: 1`: the old and the new pod overlap, both serving gRPC on the same port with
//! SO_REUSEPORT). The Node annotation is the single source of truth: it names the process that
//! drives the drain and when that process last renewed its claim. Every write of the annotation
//! is a compare-and-swap on the Node's resourceVersion (engine.rs), so two processes cannot both
//! believe they drive. This module holds the rule itself; it never talks to the API.
//!
//! The rule (docs/operations.md, "Two agents on one node"):
//! - a record driven by this process is `Mine`;
//! - a record with no driver (written before this rule), a released one (heartbeat 0), one
//!   driven from this same pod (a container restart: a pod runs one agent, so that process is
//!   dead), or one whose heartbeat is older than the owner lease is adoptable (`Free`);
//! - otherwise another live process drives it (`Live`): this process refuses to drive it,
//!   follows it for a same-id Drain, refuses other ids and Uncordon, and forwards CancelDrain
//!   through the annotation.

use std::time::Duration;

use super::state::Persisted;

/// How long a driver's claim lasts without renewal; it renews every third of it. Long enough
/// that an API server hiccup does not hand a drain over, short enough that a rollout's new agent
/// takes over a dead one's drain within seconds.
pub const DEFAULT_OWNER_LEASE: Duration = Duration::from_secs(15);

/// How long before its claim's lease ends a driver stops posting evictions (the fence, #16-k):
/// a third of the lease, the renewal period, so one late renewal pauses evictions before the
/// other agent process may adopt the drain.
pub fn fence_margin(lease: Duration) -> Duration {
    lease / 3
}

/// Where this process stands towards a recorded drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    Mine,
    Free,
    /// Driven by this other live process.
    Live(String),
}

/// This process's identity: the pod (`POD_NAME` from the downward API, else the host name) and
/// a per-process part, so a restarted container and a surge pod are told apart.
pub fn instance_id() -> String {
    let pod = std::env::var("POD_NAME")
        .ok()
        .filter(|p| !p.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "nodekeeper".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{pod}#{}.{nanos:09}", std::process::id())
}

fn pod_of(instance: &str) -> &str {
    instance.split('#').next().unwrap_or(instance)
}

/// The rule above, at `now` (unix seconds).
pub fn standing(record: &Persisted, me: &str, now: u64, lease: Duration) -> Standing {
    if record.driver == me {
        return Standing::Mine;
    }
    let released = record.driver.is_empty() || record.heartbeat == 0;
    let same_pod = pod_of(&record.driver) == pod_of(me);
    let expired = now.saturating_sub(record.heartbeat) > lease.as_secs();
    if released || same_pod || expired {
        Standing::Free
    } else {
        Standing::Live(record.driver.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(driver: &str, heartbeat: u64) -> Persisted {
        Persisted {
            id: "d".into(),
            reason: String::new(),
            requester: String::new(),
            principal: String::new(),
            started: 0,
            deadline: 0,
            phase: "evicting".into(),
            done: Vec::new(),
            grace_period_seconds: None,
            concurrency: 1,
            delete_emptydir_data: false,
            evict_unreplicated: false,
            leader_selector: String::new(),
            error: String::new(),
            driver: driver.into(),
            heartbeat,
            cancel_requested: false,
            skip_wait_for_delete_seconds: None,
            rotation: None,
            bypass_fleet_lock: false,
        }
    }

    #[test]
    fn a_live_driver_in_another_pod_keeps_its_drain_everything_else_is_adoptable() {
        let lease = Duration::from_secs(15);
        let me = "agent-new#20.1";
        assert_eq!(standing(&rec(me, 100), me, 100, lease), Standing::Mine);
        assert_eq!(
            standing(&rec("agent-old#10.1", 100), me, 110, lease),
            Standing::Live("agent-old#10.1".into())
        );
        // Heartbeat older than the lease: the old pod is gone or stuck.
        assert_eq!(
            standing(&rec("agent-old#10.1", 100), me, 116, lease),
            Standing::Free
        );
        // Released on shutdown.
        assert_eq!(
            standing(&rec("agent-old#10.1", 0), me, 101, lease),
            Standing::Free
        );
        // A record from before drivers existed.
        assert_eq!(standing(&rec("", 100), me, 101, lease), Standing::Free);
        // The same pod's previous container (a restart): that process is dead.
        assert_eq!(
            standing(&rec("agent-new#7.5", 100), me, 101, lease),
            Standing::Free
        );
        assert!(instance_id().contains('#'));
    }
}
