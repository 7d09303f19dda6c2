//! The node's side of the patch-and-reboot rotation (issue #20): a state on the Node (annotation
//! `nodekeeper.io/maintenance`, JSON) that outlives the agent process and the reboot,
//!
//! ```text
//! draining -> drained -> awaiting-reboot -> rebooted -> returning -> done
//!     \-> failed (the drain did not complete)
//! ```
//!
//! with the boot ID (`/proc/sys/kernel/random/boot_id`) recorded when drained. The fleet-lock slot
//! taken before cordoning is kept from `drained` on (marked held across the reboot, lock.rs) and
//! released only at `done`, after the agent that starts on the rebooted node has seen the Node
//! Ready and itself ready, and has uncordoned (unless the request said to keep it cordoned).
//!
//! An agent restart without a reboot (same boot ID) changes nothing: the node still awaits its
//! reboot and the new agent keeps renewing the slot. Never uncordons a node it did not drain for a
//! rotation; never releases a slot before the node is back.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::lock::{self, FleetLockConfig, SlotGuard};
use super::state::unix;
use crate::config::ConfigDuration;
use crate::kube::API_CALL_TIMEOUT;
use crate::runtime::Health;

/// The Node annotation holding the maintenance record (JSON).
pub const ANNOTATION: &str = "nodekeeper.io/maintenance";
pub const DEFAULT_BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// A patch-and-reboot of an EC2 instance takes minutes; half an hour before anyone is told.
pub const DEFAULT_RETURN_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How often the return checks the Node's Ready condition and the agent's readiness.
const RETURN_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MaintenanceConfig {
    /// Where the boot ID is read (a file with one line); tests point it at a file they change.
    pub boot_id_path: PathBuf,
    /// How long a rotated node has, from drained to back, before `MaintenanceOverdue` Events.
    pub return_timeout: ConfigDuration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            boot_id_path: PathBuf::from(DEFAULT_BOOT_ID_PATH),
            return_timeout: ConfigDuration(DEFAULT_RETURN_TIMEOUT),
        }
    }
}

impl MaintenanceConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.boot_id_path.is_absolute() {
            out.push((
                "drain.maintenance.bootIdPath".into(),
                format!("{:?} is not an absolute path", self.boot_id_path),
            ));
        }
        let t = self.return_timeout.get();
        if t < Duration::from_secs(1) || t > Duration::from_secs(7 * 24 * 3600) {
            out.push((
                "drain.maintenance.returnTimeout".into(),
                format!("{} is out of range (1s..=7d)", self.return_timeout),
            ));
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Draining,
    Drained,
    AwaitingReboot,
    Rebooted,
    Returning,
    Done,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Draining => "draining",
            State::Drained => "drained",
            State::AwaitingReboot => "awaiting-reboot",
            State::Rebooted => "rebooted",
            State::Returning => "returning",
            State::Done => "done",
            State::Failed => "failed",
        }
    }
}

/// What a rotation drain asked for after the drain (DrainRequest.await_reboot and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// Uncordon once the node is back (false: DrainRequest.keep_cordoned).
    pub uncordon: bool,
    pub return_timeout_seconds: u64,
}

/// The record on the Node.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub state: State,
    pub drain_id: String,
    /// The boot ID when the node was drained: a different one at start means it rebooted.
    #[serde(default)]
    pub boot_id: String,
    /// Unix seconds the state was entered.
    pub since: u64,
    /// Unix seconds by which the node should be back (set when drained).
    #[serde(default)]
    pub return_by: u64,
    pub uncordon: bool,
    #[serde(default)]
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("maintenance: kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("maintenance: {0} took longer than {API_CALL_TIMEOUT:?}")]
    Timeout(&'static str),
    #[error("maintenance: reading the boot ID from {path}: {source}")]
    BootId {
        path: PathBuf,
        source: std::io::Error,
    },
}

async fn call<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, MaintenanceError> {
    match tokio::time::timeout(API_CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(MaintenanceError::Timeout(what)),
    }
}

fn now() -> u64 {
    unix(SystemTime::now())
}

/// The node's maintenance: its record on the Node and the fleet-lock slot kept across the
/// reboot.
pub struct Maintenance {
    client: Client,
    node: String,
    config: MaintenanceConfig,
    lock: Option<FleetLockConfig>,
    lock_metrics: lock::LockMetrics,
    /// The slot held from `drained` until `done` (or until this process stops).
    slot: Mutex<Option<SlotGuard>>,
}

impl Maintenance {
    pub fn new(
        client: Client,
        node: String,
        config: MaintenanceConfig,
        lock: Option<FleetLockConfig>,
        lock_metrics: lock::LockMetrics,
    ) -> Self {
        Self {
            client,
            node,
            config,
            lock,
            lock_metrics,
            slot: Mutex::new(None),
        }
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub fn boot_id(&self) -> Result<String, MaintenanceError> {
        std::fs::read_to_string(&self.config.boot_id_path)
            .map(|s| s.trim().to_string())
            .map_err(|source| MaintenanceError::BootId {
                path: self.config.boot_id_path.clone(),
                source,
            })
    }

    pub fn default_return_timeout(&self) -> Duration {
        self.config.return_timeout.get()
    }

    /// The record on the Node, if any (an unreadable one is logged and treated as none).
    pub async fn read(&self) -> Result<Option<Record>, MaintenanceError> {
        let node = call("GET node", self.nodes().get(&self.node)).await?;
        Ok(node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION))
            .and_then(|t| match serde_json::from_str(t) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unreadable {ANNOTATION} annotation");
                    None
                }
            }))
    }

    async fn write(&self, record: &Record) -> Result<(), MaintenanceError> {
        let json = serde_json::to_string(record).expect("serializes");
        let patch = serde_json::json!({ "metadata": { "annotations": { ANNOTATION: json } } });
        call(
            "PATCH node",
            self.nodes()
                .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
        tracing::info!(state = record.state.as_str(), drain = %record.drain_id, "maintenance state");
        Ok(())
    }

    async fn event(&self, reason: &str, kind: &str, message: &str) {
        crate::kube::node_event(&self.client, &self.node, reason, kind, message).await;
    }

    /// A rotation drain starts.
    pub async fn draining(&self, drain_id: &str, rotation: Rotation) {
        let record = Record {
            state: State::Draining,
            drain_id: drain_id.to_string(),
            boot_id: self.boot_id().unwrap_or_default(),
            since: now(),
            return_by: 0,
            uncordon: rotation.uncordon,
            error: String::new(),
        };
        if let Err(e) = self.write(&record).await {
            tracing::warn!(error = %e, "could not record the maintenance state");
        }
    }

    /// The rotation drain completed: record the boot ID, keep the slot (marked held across the
    /// reboot) and wait for the reboot. The caller hands over the slot it drained with.
    pub async fn drained(
        &self,
        drain_id: &str,
        rotation: Rotation,
        slot: Option<SlotGuard>,
    ) -> Result<(), MaintenanceError> {
        let boot_id = self.boot_id()?;
        let return_by = now().saturating_add(rotation.return_timeout_seconds);
        let mut record = Record {
            state: State::Drained,
            drain_id: drain_id.to_string(),
            boot_id,
            since: now(),
            return_by,
            uncordon: rotation.uncordon,
            error: String::new(),
        };
        self.write(&record).await?;
        if let Some(guard) = slot {
            if let Err(e) = guard.hold_for_return(return_by).await {
                tracing::warn!(error = %e, "could not mark the fleet-lock slot as held across the reboot; it frees if renewals stop");
            }
            *self.slot.lock().expect("not poisoned") = Some(guard);
        }
        record.state = State::AwaitingReboot;
        record.since = now();
        self.write(&record).await?;
        self.event(
            "AwaitingReboot",
            "Normal",
            &format!(
                "drain {drain_id} completed; the node keeps its fleet-lock slot until it is back from its reboot (boot ID {})",
                record.boot_id
            ),
        )
        .await;
        Ok(())
    }

    /// The rotation drain ended without completing: the node stays cordoned, the state says so.
    pub async fn failed(&self, drain_id: &str, rotation: Rotation, error: &str) {
        let record = Record {
            state: State::Failed,
            drain_id: drain_id.to_string(),
            boot_id: self.boot_id().unwrap_or_default(),
            since: now(),
            return_by: 0,
            uncordon: rotation.uncordon,
            error: error.to_string(),
        };
        if let Err(e) = self.write(&record).await {
            tracing::warn!(error = %e, "could not record the maintenance state");
        }
    }

    /// At agent start, for the agent's lifetime: carries a rotation on from where the Node's
    /// record says it is (the node's return after its reboot, or keeping the slot while the
    /// reboot has not happened yet). Retries API failures; returns at shutdown, keeping the slot.
    pub async fn run(&self, health: Health, token: CancellationToken) {
        let mut wait = RETURN_POLL;
        loop {
            match self.step(&health, &token).await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, ?wait, "maintenance: retrying"),
            }
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
        token.cancelled().await;
        // Shutdown (or the reboot itself): stop renewing, keep the holder; the agent that
        // starts next takes the slot back.
        let held = self.slot.lock().expect("not poisoned").take();
        if let Some(guard) = held {
            guard.abandon().await;
        }
    }

    async fn step(
        &self,
        health: &Health,
        token: &CancellationToken,
    ) -> Result<(), MaintenanceError> {
        let Some(mut record) = self.read().await? else {
            return Ok(());
        };
        if !matches!(record.state, State::Draining | State::Done | State::Failed)
            && let Some(why) = self.superseded(&record).await?
        {
            // #16-l: a later drain (plain or rotation, failed or running) rules the node now.
            // This rotation's return must not uncordon: the node stays as that drain left it.
            tracing::warn!(drain = %record.drain_id, "{why}");
            record.state = State::Failed;
            record.since = now();
            record.error = why.clone();
            self.write(&record).await?;
            self.event(
                "MaintenanceSuperseded",
                "Warning",
                &format!("{why}; the node is not uncordoned by nodekeeper"),
            )
            .await;
            return Ok(());
        }
        match record.state {
            State::Draining | State::Done | State::Failed => return Ok(()),
            State::Drained | State::AwaitingReboot => {
                let boot_id = self.boot_id()?;
                if boot_id == record.boot_id {
                    // Restarted, not rebooted: keep holding the slot and wait for the reboot.
                    self.reclaim_slot(Some(record.return_by)).await;
                    self.watch_overdue(&record, token).await;
                    return Ok(());
                }
                record.state = State::Rebooted;
                record.since = now();
                self.write(&record).await?;
                self.event(
                    "Rebooted",
                    "Normal",
                    &format!(
                        "back from the reboot of rotation {} (boot ID {} -> {boot_id})",
                        record.drain_id, record.boot_id
                    ),
                )
                .await;
            }
            State::Rebooted | State::Returning => {}
        }
        // Rebooted: take the slot back first, so it is renewed while the node returns.
        self.reclaim_slot(None).await;
        record.state = State::Returning;
        record.since = now();
        self.write(&record).await?;
        loop {
            let node_ready = self.node_ready().await?;
            let agent_ready = health.ready();
            if node_ready && agent_ready.is_ok() {
                break;
            }
            tracing::debug!(node_ready, agent = ?agent_ready, "maintenance: waiting for the node to be ready");
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                _ = tokio::time::sleep(RETURN_POLL) => {}
            }
        }
        if record.uncordon {
            let patch = serde_json::json!({
                "metadata": { "annotations": { super::CORDONED_AT_ANNOTATION: null } },
                "spec": { "unschedulable": null },
            });
            call(
                "PATCH node",
                self.nodes()
                    .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        }
        record.state = State::Done;
        record.since = now();
        self.write(&record).await?;
        self.event(
            "MaintenanceDone",
            "Normal",
            &format!(
                "rotation {} done: the node is Ready{}; fleet-lock slot released",
                record.drain_id,
                if record.uncordon {
                    " and uncordoned"
                } else {
                    " (kept cordoned as requested)"
                }
            ),
        )
        .await;
        let held = self.slot.lock().expect("not poisoned").take();
        if let Some(guard) = held {
            guard.release().await;
        }
        Ok(())
    }

    /// Takes this node's slot back (after a restart or the reboot), marked with `return_by`
    /// while the reboot is still to come.
    async fn reclaim_slot(&self, return_by: Option<u64>) {
        let Some(cfg) = &self.lock else {
            return;
        };
        if self.slot.lock().expect("not poisoned").is_some() {
            return;
        }
        match lock::reclaim(&self.client, cfg, &self.node, &self.lock_metrics).await {
            Ok(Some(guard)) => {
                if let Some(t) = return_by
                    && let Err(e) = guard.hold_for_return(t).await
                {
                    tracing::warn!(error = %e, "could not mark the slot as held across the reboot");
                }
                *self.slot.lock().expect("not poisoned") = Some(guard);
            }
            Ok(None) => tracing::warn!(
                "maintenance: this node holds no fleet-lock slot any more (freed by hand?); going on without one"
            ),
            Err(e) => tracing::warn!(error = %e, "maintenance: could not take the slot back"),
        }
    }

    /// Before the reboot: one `MaintenanceOverdue` Event once the return-by time has passed.
    async fn watch_overdue(&self, record: &Record, token: &CancellationToken) {
        let left = record.return_by.saturating_sub(now());
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(left)) => {}
        }
        self.event(
            "MaintenanceOverdue",
            "Warning",
            &format!(
                "rotation {}: the node was drained but has not rebooted by its return-by time; it keeps its fleet-lock slot",
                record.drain_id
            ),
        )
        .await;
    }

    /// Why this rotation's record no longer rules the node, if so: the drain recorded on the
    /// Node (`nodekeeper.io/drain`, always the latest one) is another drain, or did not
    /// complete, or is missing or unreadable (no proof it completed).
    async fn superseded(&self, record: &Record) -> Result<Option<String>, MaintenanceError> {
        let node = call("GET node", self.nodes().get(&self.node)).await?;
        let latest = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::STATE_ANNOTATION))
            .map(|t| super::state::Persisted::from_json(t));
        let rotation = &record.drain_id;
        Ok(match latest {
            None => Some(format!(
                "rotation {rotation}: no drain is recorded on the node any more"
            )),
            Some(Err(e)) => Some(format!("rotation {rotation}: {e}")),
            Some(Ok(p)) if p.id != *rotation => Some(format!(
                "rotation {rotation} was superseded by drain {:?} ({})",
                p.id, p.phase
            )),
            Some(Ok(p)) if p.phase() != crate::pb::DrainPhase::Completed => Some(format!(
                "rotation {rotation}: its drain is recorded as {}",
                p.phase
            )),
            Some(Ok(_)) => None,
        })
    }

    async fn node_ready(&self) -> Result<bool, MaintenanceError> {
        let node = call("GET node", self.nodes().get(&self.node)).await?;
        Ok(node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_names_its_states_in_kebab_case_and_round_trips() {
        let r = Record {
            state: State::AwaitingReboot,
            drain_id: "rot-a".into(),
            boot_id: "b1".into(),
            since: 10,
            return_by: 20,
            uncordon: true,
            error: String::new(),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"state\":\"awaiting-reboot\""), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), r);
        for s in [
            State::Draining,
            State::Drained,
            State::AwaitingReboot,
            State::Rebooted,
            State::Returning,
            State::Done,
            State::Failed,
        ] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
    }

    #[test]
    fn config_problems_name_their_fields() {
        let bad = MaintenanceConfig {
            boot_id_path: PathBuf::from("relative/boot_id"),
            return_timeout: ConfigDuration(Duration::ZERO),
        };
        let fields: Vec<String> = bad.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "drain.maintenance.bootIdPath",
                "drain.maintenance.returnTimeout"
            ]
        );
        assert!(MaintenanceConfig::default().problems().is_empty());
    }
}
