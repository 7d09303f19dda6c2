//! The drain's state as persisted on the Node (annotation `nodekeeper.io/drain`), so an agent
//! that restarts mid-drain resumes it: same id, same deadline, pods already done skipped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::pb::{self, DrainPhase};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Persisted {
    pub id: String,
    pub reason: String,
    pub requester: String,
    /// The authenticated principal that started it (empty in annotations older than #19).
    #[serde(default)]
    pub principal: String,
    /// Unix seconds.
    pub started: u64,
    pub deadline: u64,
    /// `DrainPhase` name without prefix: "cordoning", "evicting", "completed"...
    pub phase: String,
    /// UIDs of pods evicted and confirmed gone.
    pub done: Vec<String>,
    pub grace_period_seconds: Option<i64>,
    pub concurrency: u32,
    pub delete_emptydir_data: bool,
    pub evict_unreplicated: bool,
    pub leader_selector: String,
    #[serde(default)]
    pub error: String,
    /// The agent process driving this drain (`owner::instance_id`); empty in records written
    /// before drains had a single driver (adoptable at once).
    #[serde(default)]
    pub driver: String,
    /// Unix seconds of the driver's last renewal; 0 = released (adoptable at once).
    #[serde(default)]
    pub heartbeat: u64,
    /// Set by a CancelDrain that reached an agent process not driving the drain; the driver
    /// cancels when it sees it.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Seconds after which a Terminating pod is no longer waited for (kubectl's
    /// --skip-wait-for-delete-timeout); absent = always wait.
    #[serde(default)]
    pub skip_wait_for_delete_seconds: Option<u64>,
    /// A patch-and-reboot rotation (issue #20): what happens after the drain completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<super::maintenance::Rotation>,
    /// A spot interruption's drain: it never waits for a fleet-lock slot (issue #20).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bypass_fleet_lock: bool,
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn from_unix(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

pub fn phase_name(p: DrainPhase) -> String {
    p.as_str_name()
        .trim_start_matches("DRAIN_PHASE_")
        .to_lowercase()
}

pub fn phase_from_name(s: &str) -> DrainPhase {
    DrainPhase::from_str_name(&format!("DRAIN_PHASE_{}", s.to_uppercase()))
        .unwrap_or(DrainPhase::Unspecified)
}

impl Persisted {
    pub fn phase(&self) -> DrainPhase {
        phase_from_name(&self.phase)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serializes")
    }

    pub fn from_json(s: &str) -> Result<Self, String> {
        serde_json::from_str(s).map_err(|e| {
            format!(
                "{} annotation is not a drain state: {e}",
                super::STATE_ANNOTATION
            )
        })
    }

    pub fn status_header(&self) -> pb::DrainStatus {
        pb::DrainStatus {
            id: self.id.clone(),
            phase: self.phase() as i32,
            reason: self.reason.clone(),
            requester: self.requester.clone(),
            principal: self.principal.clone(),
            started_at: Some(from_unix(self.started).into()),
            deadline: Some(from_unix(self.deadline).into()),
            error: self.error.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_phases() {
        let p = Persisted {
            id: "rot-1".into(),
            reason: "ami".into(),
            requester: "orchestrator".into(),
            principal: "cert:orchestrator".into(),
            started: 100,
            deadline: 200,
            phase: phase_name(DrainPhase::Evicting),
            done: vec!["u1".into()],
            grace_period_seconds: Some(30),
            concurrency: 4,
            delete_emptydir_data: true,
            evict_unreplicated: false,
            leader_selector: "a=b".into(),
            error: String::new(),
            driver: "nodekeeper-x#1".into(),
            heartbeat: 150,
            cancel_requested: false,
            skip_wait_for_delete_seconds: Some(60),
            rotation: Some(crate::drain::maintenance::Rotation {
                uncordon: true,
                return_timeout_seconds: 600,
            }),
            bypass_fleet_lock: false,
        };
        assert_eq!(p.phase, "evicting");
        assert_eq!(Persisted::from_json(&p.to_json()).unwrap(), p);
        assert_eq!(p.phase(), DrainPhase::Evicting);
        assert!(Persisted::from_json("{}").is_err());
    }
}
