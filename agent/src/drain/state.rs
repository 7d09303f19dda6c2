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

/// The last second of year 9999: later times in a record are corrupt (and would overflow
/// `SystemTime` arithmetic on some platforms).
pub const MAX_UNIX: u64 = 253_402_300_799;
/// A drain's timeout is at most 24 h (engine.rs `params`).
const MAX_DRAIN_SECONDS: u64 = 24 * 3600;
/// A rotation's return timeout is at most 7 days (as `drain.maintenance.returnTimeout`).
pub const MAX_RETURN_TIMEOUT_SECONDS: u64 = 7 * 24 * 3600;

/// Never panics: a time past `MAX_UNIX` is clamped (`Persisted::check` refuses such records).
pub fn from_unix(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s.min(MAX_UNIX))
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

    /// Parses and checks a record (#16-j): one that parses but holds out-of-range values is as
    /// corrupt as one that does not parse, and the error names the field.
    pub fn from_json(s: &str) -> Result<Self, String> {
        let p: Self = serde_json::from_str(s).map_err(|e| {
            format!(
                "{} annotation is not a drain state: {e}",
                super::STATE_ANNOTATION
            )
        })?;
        p.check()
            .map_err(|e| format!("{} annotation is corrupt: {e}", super::STATE_ANNOTATION))?;
        Ok(p)
    }

    /// The values a resumed drain computes with, in range; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        for (field, v) in [
            ("started", self.started),
            ("deadline", self.deadline),
            ("heartbeat", self.heartbeat),
        ] {
            if v > MAX_UNIX {
                return Err(format!(
                    "{field}: {v} is out of range (unix seconds <= {MAX_UNIX})"
                ));
            }
        }
        if self.deadline.saturating_sub(self.started) > MAX_DRAIN_SECONDS {
            return Err(format!(
                "deadline: {} is more than 24h after started ({})",
                self.deadline, self.started
            ));
        }
        if let Some(g) = self.grace_period_seconds.filter(|g| *g < 0) {
            return Err(format!("gracePeriodSeconds: {g} is negative"));
        }
        if self.concurrency > 256 {
            return Err(format!("concurrency: {} is above 256", self.concurrency));
        }
        if let Some(s) = self.skip_wait_for_delete_seconds.filter(|s| *s > MAX_UNIX) {
            return Err(format!("skipWaitForDeleteSeconds: {s} is out of range"));
        }
        if let Some(r) = self.rotation
            && !(1..=MAX_RETURN_TIMEOUT_SECONDS).contains(&r.return_timeout_seconds)
        {
            return Err(format!(
                "rotation.returnTimeoutSeconds: {} is out of range (1..={MAX_RETURN_TIMEOUT_SECONDS})",
                r.return_timeout_seconds
            ));
        }
        Ok(())
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

    #[test]
    fn out_of_range_values_are_refused_naming_the_field() {
        let ok = Persisted {
            id: "d".into(),
            reason: String::new(),
            requester: String::new(),
            principal: String::new(),
            started: 100,
            deadline: 200,
            phase: "evicting".into(),
            done: Vec::new(),
            grace_period_seconds: None,
            concurrency: 1,
            delete_emptydir_data: false,
            evict_unreplicated: false,
            leader_selector: String::new(),
            error: String::new(),
            driver: String::new(),
            heartbeat: 0,
            cancel_requested: false,
            skip_wait_for_delete_seconds: None,
            rotation: None,
            bypass_fleet_lock: false,
        };
        assert!(Persisted::from_json(&ok.to_json()).is_ok());
        type Corrupt = fn(&mut Persisted);
        let cases: [(&str, Corrupt); 6] = [
            ("deadline:", |p| p.deadline = u64::MAX),
            ("started:", |p| p.started = u64::MAX),
            ("deadline:", |p| p.deadline = p.started + 24 * 3600 + 1),
            ("gracePeriodSeconds:", |p| p.grace_period_seconds = Some(-1)),
            ("concurrency:", |p| p.concurrency = 100_000),
            ("rotation.returnTimeoutSeconds:", |p| {
                p.rotation = Some(crate::drain::maintenance::Rotation {
                    uncordon: true,
                    return_timeout_seconds: u64::MAX,
                })
            }),
        ];
        for (field, corrupt) in cases {
            let mut p = ok.clone();
            corrupt(&mut p);
            let err = Persisted::from_json(&p.to_json()).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
        assert!(from_unix(u64::MAX) > from_unix(MAX_UNIX - 1));
    }
}
