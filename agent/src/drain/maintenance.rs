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
//! rotation, nor one nodekeeper did not cordon; never releases a slot before the node is back
//! (a replaced node, another Node UID under the same name, frees it), and never leaves one marked
//! after the rotation is over: a sweep frees it for the agent's lifetime (#20-s). Every step of the return
//! is a write guarded by the resourceVersion of the read it was decided on, so the two agent
//! processes of a node never both take it.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Patch;
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
/// A record write is tried this many times: a 503 must not end a rotation.
const WRITE_ATTEMPTS: u32 = 4;
/// First wait between write attempts (doubles): 200 ms + 400 ms + 800 ms, under two seconds.
const WRITE_RETRY: Duration = Duration::from_millis(200);
/// The replay of the Node's changes since it was drained (an uncordon nobody saw, #20-l): one
/// Node's changes over a reboot are a few dozen events; past this, the annotation is trusted.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(10);
/// While no slot Lease is marked for this node, how often the sweep looks anyway (besides the
/// end of every drain and return): one LIST of the slot Leases, cheap at any fleet size.
const SWEEP_IDLE: Duration = Duration::from_secs(300);
/// The sweep's back-off on API errors stops growing here: once the API answers again, a slot
/// left marked is freed within this (plus a lease duration), not after a long back-off.
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(10);

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
    /// The Node's resourceVersion when it was recorded `drained`: the return replays the
    /// Node's changes since then for an uncordon no agent saw (#20-l). Empty: not known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_version: String,
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
    /// Taking back, marking or freeing the fleet-lock slot failed (retried by the caller).
    #[error("maintenance: {0}")]
    Lock(#[from] lock::LockError),
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

fn is_conflict(e: &MaintenanceError) -> bool {
    matches!(e, MaintenanceError::Api(kube::Error::Api(s)) if s.code == 409)
}

fn now() -> u64 {
    unix(SystemTime::now())
}

/// The maintenance record on a Node, if any (an unreadable one is logged and treated as none).
pub(super) fn record_of(node: &Node) -> Option<Record> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION))
        .and_then(|t| match serde_json::from_str(t) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable {ANNOTATION} annotation");
                None
            }
        })
}

/// Whether nodekeeper cordoned this node (`nodekeeper.io/cordoned-at` on a cordoned Node): only
/// such a node is uncordoned by the return (#20-f).
fn cordoned_by_nodekeeper(node: &Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    cordoned
        && node
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(super::CORDONED_AT_ANNOTATION))
}

/// Whether `spec.unschedulable` is nodekeeper's per the API server's field ownership
/// (`metadata.managedFields`): every write records its manager as the owner of the fields it
/// changed, a write of the same value keeps the owner and a removal drops it, so after a
/// `kubectl uncordon` + `kubectl cordon` the owner is kubectl's manager whatever happened
/// while no agent watched (#20-l). `None` when the Node carries no managedFields (a server
/// that does not keep them, or strips them): unknown. A field with no owner is not nodekeeper's.
fn unschedulable_owned_by_nodekeeper(node: &Node) -> Option<bool> {
    let entries = node.metadata.managed_fields.as_ref()?;
    if entries.is_empty() {
        return None;
    }
    let owns = |fields: &serde_json::Value| !fields["f:spec"]["f:unschedulable"].is_null();
    Some(entries.iter().any(|e| {
        e.manager.as_deref() == Some(super::FIELD_MANAGER)
            && e.subresource.as_deref().unwrap_or_default().is_empty()
            && e.fields_v1.as_ref().is_some_and(|f| owns(&f.0))
    }))
}

/// The cordoned-at of a Node that is schedulable: a cordon of nodekeeper's that someone else
/// undid (nodekeeper's own uncordon removes the annotation in the same PATCH).
fn undone_cordon(node: &Node) -> Option<String> {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    if cordoned {
        return None;
    }
    node.metadata
        .annotations
        .as_ref()?
        .get(super::CORDONED_AT_ANNOTATION)
        .cloned()
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What the latest drain recorded on the Node (`nodekeeper.io/drain`) says of a rotation.
#[derive(Debug, PartialEq)]
enum Latest {
    /// It is this rotation's drain, completed: the rotation rules the node.
    Completed,
    /// It is this rotation's drain, still being driven (recorded `drained` just before the
    /// drain's own end is saved): the drain engine writes what comes next.
    Running,
    /// Another drain, or this one not completed, or none: the rotation no longer rules.
    Superseded(String),
}

fn latest_drain(node: &Node, record: &Record) -> Latest {
    let latest = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::STATE_ANNOTATION))
        .map(|t| super::state::Persisted::from_json(t));
    let rotation = &record.drain_id;
    match latest {
        None => Latest::Superseded(format!(
            "rotation {rotation}: no drain is recorded on the node any more"
        )),
        Some(Err(e)) => Latest::Superseded(format!("rotation {rotation}: {e}")),
        Some(Ok(p)) if p.id != *rotation => Latest::Superseded(format!(
            "rotation {rotation} was superseded by drain {:?} ({})",
            p.id, p.phase
        )),
        Some(Ok(p)) if p.phase() == crate::pb::DrainPhase::Completed => Latest::Completed,
        Some(Ok(p)) if !super::is_terminal(p.phase()) => Latest::Running,
        Some(Ok(p)) => Latest::Superseded(format!(
            "rotation {rotation}: its drain is recorded as {}",
            p.phase
        )),
    }
}

/// A rotation's drain completed and its `drained` record is written: what `awaiting_reboot`
/// needs next.
#[derive(Debug)]
pub struct Drained {
    record: Record,
    node_uid: String,
    node_version: String,
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
    /// The Node's metadata.uid when the return first read it: another UID later is a Node
    /// deleted and registered again (#20-o).
    node_uid: Mutex<Option<String>>,
    /// Wakes the sweep of marked slots left behind (`sweep_slots`): a drain or return ended.
    recheck: tokio::sync::Notify,
    /// Per slot Lease, what the sweep last saw of it (holder, renewTime, resourceVersion) and
    /// when it first saw that, on this process's monotonic clock (#20-t).
    seen: Mutex<std::collections::HashMap<String, (Observed, std::time::Instant)>>,
}

/// A slot Lease's holder, renewTime and resourceVersion as the sweep read them (#20-t).
type Observed = (Option<String>, Option<String>, Option<String>);

/// What one pass of `sweep_slots` found.
#[derive(Debug, PartialEq)]
enum Sweep {
    /// No slot Lease is held marked by this node (any left were freed).
    Clean,
    /// A marked slot of this node remains: its rotation is not over, or it was renewed within
    /// its lease (a guard may run), or it changed under the free: looked at again shortly.
    Pending,
}

/// Whether the Node records a drain that has not ended (or a record that does not read: a
/// drain may run).
fn drain_running(node: &Node) -> bool {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::STATE_ANNOTATION))
        .is_some_and(|t| {
            super::state::Persisted::from_json(t).map_or(true, |p| !super::is_terminal(p.phase()))
        })
}

/// Why a rotation is over as the Node says (no drain running and no return to come), so a
/// slot still marked for this node is nobody's to release but the sweep's; `None` while a
/// drain runs or the rotation is between `drained` and `done`.
fn rotation_over(node: &Node) -> Option<String> {
    if drain_running(node) {
        return None;
    }
    match record_of(node) {
        None => Some("no rotation is recorded on the node".to_string()),
        Some(r) => match r.state {
            State::Done | State::Failed => {
                Some(format!("rotation {} is {}", r.drain_id, r.state.as_str()))
            }
            State::Draining => Some(format!(
                "rotation {}'s drain ended without completing",
                r.drain_id
            )),
            State::Drained | State::AwaitingReboot | State::Rebooted | State::Returning => None,
        },
    }
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
            node_uid: Mutex::new(None),
            recheck: tokio::sync::Notify::new(),
            seen: Mutex::new(std::collections::HashMap::new()),
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
        Ok(record_of(&node))
    }

    /// Writes the record (a merge PATCH), retried on errors up to WRITE_ATTEMPTS times.
    async fn write(&self, record: &Record) -> Result<Node, MaintenanceError> {
        let json = serde_json::to_string(record).expect("serializes");
        let patch = serde_json::json!({ "metadata": { "annotations": { ANNOTATION: json } } });
        let mut wait = WRITE_RETRY;
        let mut attempt = 1;
        loop {
            match call(
                "PATCH node",
                self.nodes().patch(
                    &self.node,
                    &super::node_patch_params(),
                    &Patch::Merge(&patch),
                ),
            )
            .await
            {
                Ok(node) => {
                    tracing::info!(state = record.state.as_str(), drain = %record.drain_id, "maintenance state");
                    return Ok(node);
                }
                Err(e) if attempt < WRITE_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "could not record the maintenance state; retrying");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
            attempt += 1;
        }
    }

    /// Writes the record over the Node as read (`seen`): a merge PATCH carrying `seen`'s
    /// resourceVersion, so of two agent processes of this node taking the same step exactly
    /// one succeeds, and a drain started since `seen` was read makes it fail (#20-j).
    /// With `uncordon`, the same PATCH uncordons. `Ok(false)` on a conflict: read again.
    async fn write_over(
        &self,
        seen: &Node,
        record: &Record,
        uncordon: bool,
    ) -> Result<bool, MaintenanceError> {
        let json = serde_json::to_string(record).expect("serializes");
        let mut patch = serde_json::json!({ "metadata": {
            "resourceVersion": seen.metadata.resource_version.clone().unwrap_or_default(),
            "annotations": { ANNOTATION: json },
        } });
        if uncordon {
            patch["metadata"]["annotations"][super::CORDONED_AT_ANNOTATION] =
                serde_json::Value::Null;
            patch["spec"] = serde_json::json!({ "unschedulable": null });
        }
        match call(
            "PATCH node",
            self.nodes().patch(
                &self.node,
                &super::node_patch_params(),
                &Patch::Merge(&patch),
            ),
        )
        .await
        {
            Ok(_) => {
                tracing::info!(state = record.state.as_str(), drain = %record.drain_id, uncordon, "maintenance state");
                Ok(true)
            }
            Err(e) if is_conflict(&e) => {
                tracing::debug!(
                    state = record.state.as_str(),
                    "maintenance: the node changed since it was read; reading it again"
                );
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn event(&self, reason: &str, kind: &str, message: &str) {
        crate::kube::node_event(&self.client, &self.node, reason, kind, message).await;
    }

    /// A rotation drain starts. Returns the Node's metadata.uid when the record was written
    /// (empty when it could not be), for the mark on the rotation's slot.
    pub async fn draining(&self, drain_id: &str, rotation: Rotation) -> String {
        let record = Record {
            state: State::Draining,
            drain_id: drain_id.to_string(),
            boot_id: self.boot_id().unwrap_or_default(),
            since: now(),
            return_by: 0,
            uncordon: rotation.uncordon,
            error: String::new(),
            node_version: String::new(),
        };
        match self.write(&record).await {
            Ok(node) => node.metadata.uid.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "could not record the maintenance state");
                String::new()
            }
        }
    }

    /// The rotation drain completed (its end not saved yet): reads the boot ID and records the
    /// node as `drained`. An error here (an unreadable boot ID, a PATCH failing every retry)
    /// means the rotation cannot go on: the caller ends the drain as failed, never as
    /// completed (#20-h), since no return would follow the reboot.
    pub async fn drained(
        &self,
        drain_id: &str,
        rotation: Rotation,
    ) -> Result<Drained, MaintenanceError> {
        let boot_id = self.boot_id()?;
        let record = Record {
            state: State::Drained,
            drain_id: drain_id.to_string(),
            boot_id,
            since: now(),
            return_by: now().saturating_add(rotation.return_timeout_seconds),
            uncordon: rotation.uncordon,
            error: String::new(),
            node_version: String::new(),
        };
        let node = self.write(&record).await?;
        Ok(Drained {
            record,
            node_uid: node.metadata.uid.unwrap_or_default(),
            node_version: node.metadata.resource_version.unwrap_or_default(),
        })
    }

    /// The drain's completion is saved: keep the slot (marked held across the reboot) and wait
    /// for the reboot. The caller hands over the slot it drained with.
    pub async fn awaiting_reboot(&self, drained: Drained, slot: Option<SlotGuard>) {
        let Drained {
            mut record,
            node_uid,
            node_version,
        } = drained;
        if let Some(guard) = slot {
            self.hold_slot(
                guard,
                lock::Mark {
                    return_by: record.return_by,
                    node_uid,
                },
            )
            .await;
        }
        record.state = State::AwaitingReboot;
        record.since = now();
        record.node_version = node_version;
        // `drained` already says what the return needs: a failure here is only logged.
        if let Err(e) = self.write(&record).await {
            tracing::warn!(error = %e, "could not record the node as awaiting its reboot (it stays `drained`, which the return handles the same)");
        }
        self.event(
            "AwaitingReboot",
            "Normal",
            &format!(
                "drain {} completed; the node keeps its fleet-lock slot until it is back from its reboot (boot ID {})",
                record.drain_id, record.boot_id
            ),
        )
        .await;
    }

    /// Keeps `guard` (marked) as this node's slot until the return. A guard kept before (an
    /// earlier rotation of this node that has not rebooted yet) stops renewing: the same slot
    /// is renewed by the new guard (acquire reuses a slot the node holds); another slot is
    /// released, a node never keeps two (#20-g).
    async fn hold_slot(&self, guard: SlotGuard, mark: lock::Mark) {
        if let Err(e) = guard.hold_for_return(mark).await {
            tracing::warn!(error = %e, "could not mark the fleet-lock slot as held across the reboot yet; every renewal retries it");
        }
        let name = guard.slot().to_string();
        let old = self.slot.lock().expect("not poisoned").replace(guard);
        if let Some(old) = old {
            if old.slot() == name {
                old.abandon().await;
            } else {
                old.release().await;
            }
        }
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
            node_version: String::new(),
        };
        if let Err(e) = self.write(&record).await {
            tracing::warn!(error = %e, "could not record the maintenance state");
        }
    }

    /// At agent start, for the agent's lifetime: carries a rotation on from where the Node's
    /// record says it is (the node's return after its reboot, or keeping the slot while the
    /// reboot has not happened yet), and forgets nodekeeper's cordons that someone else undid.
    /// Retries API failures; returns at shutdown, keeping the slot.
    pub async fn run(&self, health: Health, token: CancellationToken) {
        tokio::join!(
            self.carry_on(health, token.clone()),
            self.forget_undone_cordons(&token),
            self.sweep_slots(&token)
        );
    }

    /// A drain or a return ended (or let go of its slot): the sweep looks for a slot left
    /// marked for this node now.
    pub fn recheck_slots(&self) {
        self.recheck.notify_one();
    }

    /// For the agent's lifetime: the release of a rotation's slot is an obligation, not a
    /// one-shot step (#20-s). Whenever a slot Lease is held marked by this node while the Node
    /// says its rotation is over (`rotation_over`: done, failed, its drain ended, no rotation,
    /// or the Node registered again under another UID than the mark's) and the Lease was not
    /// renewed within its lease duration (no guard of a drain or return renews it), it is
    /// freed (a resourceVersion-guarded PUT: a slot renewed or taken meanwhile is left alone).
    /// Looked at from the start, after every drain and return, every lease duration while a
    /// marked slot of this node exists, and every `SWEEP_IDLE` otherwise; API errors are
    /// retried with back-off (up to `SWEEP_RETRY_MAX`) for as long as the agent runs.
    async fn sweep_slots(&self, token: &CancellationToken) {
        let Some(cfg) = &self.lock else {
            return;
        };
        let period = cfg.lease_duration.get().max(Duration::from_secs(1));
        let mut retry = RETURN_POLL;
        loop {
            let wait = match self.sweep(cfg).await {
                Ok(Sweep::Clean) => {
                    retry = RETURN_POLL;
                    SWEEP_IDLE
                }
                Ok(Sweep::Pending) => {
                    retry = RETURN_POLL;
                    period
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?retry, "fleet lock: could not look for a slot left marked for this node; retrying");
                    let w = retry;
                    retry = (retry * 2).min(SWEEP_RETRY_MAX);
                    w
                }
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = self.recheck.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass of `sweep_slots`.
    async fn sweep(&self, cfg: &FleetLockConfig) -> Result<Sweep, MaintenanceError> {
        let mine = lock::marked_slots(&self.client, cfg, &self.node).await?;
        if mine.is_empty() {
            return Ok(Sweep::Clean);
        }
        if self.slot.lock().expect("not poisoned").is_some() {
            // This process holds it for the node's return.
            return Ok(Sweep::Pending);
        }
        // The Node is read before the Leases are written: a drain that starts after this read
        // renews the slot first (acquire), which the guarded PUT below sees as a change.
        let node = call("GET node", self.nodes().get(&self.node)).await?;
        let uid = node.metadata.uid.clone().unwrap_or_default();
        let over = rotation_over(&node);
        let mut left = false;
        for lease in &mine {
            let name = lease.metadata.name.clone().unwrap_or_default();
            let replaced = lock::marked_uid(lease).is_some_and(|u| !uid.is_empty() && u != uid);
            let why = match (&over, replaced) {
                (Some(why), _) => why.clone(),
                (None, true) if !drain_running(&node) => {
                    "the Node was registered again (another UID than the mark's)".to_string()
                }
                _ => {
                    left = true;
                    continue;
                }
            };
            if self.renewed_lately(&name, lease) {
                left = true;
                continue;
            }
            if lock::free_as_read(&self.client, cfg, lease).await? {
                tracing::warn!(slot = %name, reason = %why, "fleet lock: released a slot still held marked for this node after its rotation was over");
            } else {
                left = true;
            }
        }
        Ok(if left { Sweep::Pending } else { Sweep::Clean })
    }

    /// Whether a slot Lease may still be renewed by a live guard (#20-t): judged as client-go's
    /// leader election does, by observation on this process's monotonic clock. The Lease counts
    /// as not renewed once its (holder, renewTime, resourceVersion) has been seen unchanged for
    /// its lease duration, or when its renewTime is already past by more than that (a renewTime
    /// in the future, written by a clock running ahead, never holds it longer).
    fn renewed_lately(&self, name: &str, lease: &Lease) -> bool {
        let spec = lease.spec.clone().unwrap_or_default();
        let observed: Observed = (
            spec.holder_identity.clone(),
            spec.renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0.to_string()),
            lease.metadata.resource_version.clone(),
        );
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        );
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock().expect("not poisoned");
        let since = match seen.get(name) {
            Some((o, at)) if *o == observed => *at,
            _ => {
                seen.insert(name.to_string(), (observed, now));
                now
            }
        };
        let unchanged_for_lease = now.duration_since(since) >= duration;
        lock::renewed_within_lease(lease) && !unchanged_for_lease
    }

    /// The rotation part of `run`.
    async fn carry_on(&self, health: Health, token: CancellationToken) {
        let mut wait = RETURN_POLL;
        loop {
            let stepped = self.step(&health, &token).await;
            // Whatever the step did with the slot (released, let go of, abandoned), the sweep
            // looks for one left marked (#20-s).
            self.recheck_slots();
            match stepped {
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

    /// One pass over the rotation, from a fresh read of the Node at every step. Each step is
    /// a write over the Node as read (`write_over`): when the other agent process of this node
    /// took the step first, or a drain started meanwhile, the write conflicts and the step is
    /// decided again from a new read.
    async fn step(
        &self,
        health: &Health,
        token: &CancellationToken,
    ) -> Result<(), MaintenanceError> {
        let mut replaced_checked = false;
        // Set once this process holds the slot back (or found none to take): not asked again.
        let mut reclaimed = false;
        // Whether the Node's changes since it was drained show it schedulable (replayed once).
        let mut undone: Option<bool> = None;
        let mut warned_fields = false;
        loop {
            let node = call("GET node", self.nodes().get(&self.node)).await?;
            let uid = node.metadata.uid.clone().unwrap_or_default();
            let recreated = {
                let mut seen = self.node_uid.lock().expect("not poisoned");
                let recreated = seen.as_ref().is_some_and(|s| *s != uid);
                *seen = Some(uid);
                recreated
            };
            if recreated {
                // The Node was deleted and registered again while the return ran (#20-o): the
                // node this slot was held for is gone, and the new one is in service. The slot
                // this process took back is released; marked ones of the old UID are freed.
                let held = self.slot.lock().expect("not poisoned").take();
                if let Some(guard) = held {
                    tracing::warn!(slot = %guard.slot(), "fleet lock: the Node was registered again (another UID) during the return; releasing the slot held for the earlier one");
                    guard.release().await;
                }
                replaced_checked = false;
                reclaimed = false;
            }
            if !replaced_checked {
                self.free_replaced_slot(&node).await?;
                replaced_checked = true;
            }
            let Some(mut record) = record_of(&node) else {
                return Ok(());
            };
            match record.state {
                State::Done | State::Failed => {
                    // The other process of this node finished (or gave up) the return: it
                    // released the slot; this one only stops renewing it.
                    let held = self.slot.lock().expect("not poisoned").take();
                    if let Some(guard) = held {
                        guard.abandon().await;
                    } else if record.state == State::Done {
                        self.free_slot_after_done(&node).await?;
                    }
                    return Ok(());
                }
                _ => {}
            }
            // `draining` with its drain ended (not running, not completed: the agent stopped
            // between saving the drain's end and recording `failed`) is superseded below: its
            // slot, marked from the claim (#20-q), is let go of.
            match latest_drain(&node, &record) {
                Latest::Completed if record.state == State::Draining => return Ok(()),
                Latest::Completed => {}
                Latest::Running => return Ok(()),
                Latest::Superseded(why) => {
                    // #16-l: a later drain (plain or rotation, failed or running) rules the
                    // node now. This rotation's return must not uncordon: the node stays as
                    // that drain left it.
                    tracing::warn!(drain = %record.drain_id, "{why}");
                    record.state = State::Failed;
                    record.since = now();
                    record.error = why.clone();
                    if !self.write_over(&node, &record, false).await? {
                        continue;
                    }
                    self.event(
                        "MaintenanceSuperseded",
                        "Warning",
                        &format!("{why}; the node is not uncordoned by nodekeeper"),
                    )
                    .await;
                    self.let_go_of_slot().await?;
                    return Ok(());
                }
            }
            match record.state {
                State::Drained | State::AwaitingReboot => {
                    let boot_id = self.boot_id()?;
                    if boot_id == record.boot_id {
                        // Restarted, not rebooted: keep holding the slot and wait for the reboot.
                        self.reclaim_slot(Some(lock::Mark {
                            return_by: record.return_by,
                            node_uid: node.metadata.uid.clone().unwrap_or_default(),
                        }))
                        .await?;
                        self.watch_overdue(&record, token).await;
                        return Ok(());
                    }
                    record.state = State::Rebooted;
                    record.since = now();
                    if !self.write_over(&node, &record, false).await? {
                        continue;
                    }
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
                State::Rebooted => {
                    // Take the slot back first, so it is renewed while the node returns. An
                    // error is retried (the step fails): never go on without the slot (#20-g).
                    if !reclaimed {
                        self.reclaim_slot(None).await?;
                        reclaimed = true;
                    }
                    record.state = State::Returning;
                    record.since = now();
                    self.write_over(&node, &record, false).await?;
                }
                State::Returning => {
                    if !reclaimed {
                        self.reclaim_slot(None).await?;
                        reclaimed = true;
                    }
                    let agent_ready = health.ready();
                    if !(node_ready(&node) && agent_ready.is_ok()) {
                        tracing::debug!(node_ready = node_ready(&node), agent = ?agent_ready, "maintenance: waiting for the node to be ready");
                        tokio::select! {
                            _ = token.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(RETURN_POLL) => {}
                        }
                        continue;
                    }
                    // Only a node nodekeeper cordoned is uncordoned: one an operator had
                    // cordoned before the drain stays cordoned (#20-f), and so does one
                    // uncordoned and cordoned again since by someone else while no agent
                    // watched (#20-l; replayed once). The decision, the latest-drain check
                    // above and the write are all over the same read.
                    // The proof is the owner of spec.unschedulable (managedFields): it
                    // survives any etcd compaction. The replay stays as a further check, and
                    // is the only one on a server without managedFields (then its failure
                    // trusts cordoned-at, with a warning).
                    let owner = unschedulable_owned_by_nodekeeper(&node);
                    if owner.is_none() && cordoned_by_nodekeeper(&node) && !warned_fields {
                        warned_fields = true;
                        tracing::warn!(
                            "the Node carries no managedFields; whether its cordon is still nodekeeper's rests on nodekeeper.io/cordoned-at and a replay of its changes"
                        );
                    }
                    if owner == Some(false) && cordoned_by_nodekeeper(&node) && !warned_fields {
                        warned_fields = true;
                        tracing::info!(
                            field_manager = super::FIELD_MANAGER,
                            "spec.unschedulable is owned by another field manager: the cordon in place is not nodekeeper's; leaving the node cordoned"
                        );
                    }
                    if undone.is_none() && cordoned_by_nodekeeper(&node) && owner != Some(false) {
                        undone = Some(
                            self.uncordoned_since(&record.node_version, &node, owner.is_none())
                                .await,
                        );
                    }
                    let ours = cordoned_by_nodekeeper(&node)
                        && owner != Some(false)
                        && undone != Some(true);
                    let uncordon = record.uncordon && ours;
                    record.state = State::Done;
                    record.since = now();
                    if !self.write_over(&node, &record, uncordon).await? {
                        continue;
                    }
                    self.event(
                        "MaintenanceDone",
                        "Normal",
                        &format!(
                            "rotation {} done: the node is Ready{}; fleet-lock slot released",
                            record.drain_id,
                            if uncordon {
                                " and uncordoned"
                            } else if !record.uncordon {
                                " (kept cordoned as requested)"
                            } else {
                                " (left cordoned: it was not cordoned by nodekeeper)"
                            }
                        ),
                    )
                    .await;
                    let held = self.slot.lock().expect("not poisoned").take();
                    if let Some(guard) = held {
                        guard.release().await;
                    }
                    return Ok(());
                }
                State::Draining | State::Done | State::Failed => return Ok(()),
            }
        }
    }

    /// Takes this node's slot back (after a restart or the reboot), marked with `mark` while
    /// the reboot is still to come. Errors are returned (the step is retried).
    async fn reclaim_slot(&self, mark: Option<lock::Mark>) -> Result<(), MaintenanceError> {
        let Some(cfg) = &self.lock else {
            return Ok(());
        };
        if self.slot.lock().expect("not poisoned").is_some() {
            return Ok(());
        }
        match lock::reclaim(&self.client, cfg, &self.node, &self.lock_metrics).await? {
            Some(guard) => {
                if let Some(m) = mark
                    && let Err(e) = guard.hold_for_return(m).await
                {
                    tracing::warn!(error = %e, "could not mark the slot as held across the reboot yet; every renewal retries it");
                }
                *self.slot.lock().expect("not poisoned") = Some(guard);
            }
            None => tracing::warn!(
                "maintenance: this node holds no fleet-lock slot any more (freed by hand?); going on without one"
            ),
        }
        Ok(())
    }

    /// A superseded rotation lets go of its slot: the return-by mark is removed and this
    /// process stops renewing. A later drain of this node that holds the slot (same holder
    /// identity) keeps renewing it; otherwise it frees when the lease expires.
    async fn let_go_of_slot(&self) -> Result<(), MaintenanceError> {
        if self.lock.is_none() {
            return Ok(());
        }
        self.reclaim_slot(None).await?;
        let held = self.slot.lock().expect("not poisoned").take();
        if let Some(guard) = held {
            if let Err(e) = guard.unmark().await {
                tracing::warn!(error = %e, "could not remove the return-by mark of a superseded rotation's slot");
            }
            guard.abandon().await;
        }
        Ok(())
    }

    /// Frees a slot still held (marked) for an earlier Node of this name: this Node has another
    /// UID, so it is a replacement and the node that was rebooting will never come back (#20-i).
    /// The sweep's path (#20-t): Leases read first, then the Node, then a PUT guarded by the
    /// Lease's resourceVersion, and only a slot not renewed within its lease: the sweep task is
    /// woken to do it.
    async fn free_replaced_slot(&self, _node: &Node) -> Result<(), MaintenanceError> {
        // One path for freeing a left slot: the sweep task does it (no second sweep racing it).
        self.recheck_slots();
        Ok(())
    }

    /// The rotation is `done` yet this node may still hold its slot marked: the agent died
    /// between recording `done` and releasing (a marked slot never expires). Freed by the
    /// sweep's path (#20-t): it reads the Leases before the Node, so a rotation that claims the
    /// slot meanwhile shows as a running drain or as a changed resourceVersion (409), never
    /// loses its slot.
    async fn free_slot_after_done(&self, _node: &Node) -> Result<(), MaintenanceError> {
        // One path for freeing a left slot: the sweep task does it (no second sweep racing it).
        self.recheck_slots();
        Ok(())
    }

    /// For the agent's lifetime, from a watch of this Node (every event, not a poll: a `kubectl
    /// uncordon` followed at once by a `kubectl cordon` shows only in the event between them):
    /// a Node seen schedulable while it carries `nodekeeper.io/cordoned-at` was uncordoned by
    /// someone else, so that annotation no longer proves the cordon in place is nodekeeper's;
    /// it is removed, and a later cordon by anyone else is never uncordoned by a return
    /// (#20-l). An uncordon and re-cordon made while no agent runs (during the reboot) is
    /// looked for by the return itself (`uncordoned_since`, docs/decisions.md #20-l).
    async fn forget_undone_cordons(&self, token: &CancellationToken) {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.node));
        let stream = watcher(self.nodes(), config)
            .default_backoff()
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        loop {
            let node = tokio::select! {
                _ = token.cancelled() => return,
                next = stream.next() => match next {
                    Some(Ok(node)) => node,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "maintenance: node watch error (retried with backoff)");
                        continue;
                    }
                    None => return,
                },
            };
            let Some(at) = undone_cordon(&node) else {
                continue;
            };
            if let Err(e) = self.forget_cordon(&at).await {
                tracing::warn!(error = %e, "could not remove the cordoned-at of a cordon someone else undid; a return may take a later cordon for nodekeeper's");
            }
        }
    }

    /// Whether the Node's changes from resourceVersion `from` up to `now` (as read) show it
    /// schedulable: someone uncordoned it after it was drained, while no agent watched (the
    /// reboot), and the cordon in place is not nodekeeper's (#20-l). Replayed with a watch from
    /// `from`; when that history is gone (410 after etcd compaction, minutes on a default API
    /// server), unreadable or too slow, the answer is `false`: the owner of `spec.unschedulable`
    /// (managedFields) decides, or, when the Node has none (`only_check`), `cordoned-at` is
    /// trusted as before (a warning).
    async fn uncordoned_since(&self, from: &str, now: &Node, only_check: bool) -> bool {
        use futures::StreamExt;
        use kube::api::WatchParams;
        use kube::core::WatchEvent;
        let (Ok(start), Some(Ok(target))) = (
            from.parse::<u64>(),
            now.metadata
                .resource_version
                .as_deref()
                .map(str::parse::<u64>),
        ) else {
            tracing::debug!(from, "maintenance: no Node version to replay changes from");
            return false;
        };
        if start >= target {
            return false;
        }
        let version = |n: &Node| {
            n.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={}", self.node))
            .timeout(REPLAY_TIMEOUT.as_secs() as u32);
        let replay = async {
            let stream = match self.nodes().watch(&wp, from).await {
                Ok(s) => s,
                Err(e) => return Err(e.to_string()),
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev.map_err(|e| e.to_string())? {
                    WatchEvent::Added(n) | WatchEvent::Modified(n) => {
                        let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
                        if !cordoned {
                            return Ok(true);
                        }
                        if version(&n) >= target {
                            return Ok(false);
                        }
                    }
                    WatchEvent::Deleted(_) => return Ok(false),
                    WatchEvent::Bookmark(b) => {
                        let at = b.metadata.resource_version.parse::<u64>().unwrap_or(0);
                        if at >= target {
                            return Ok(false);
                        }
                    }
                    WatchEvent::Error(s) => return Err(format!("{} ({})", s.message, s.code)),
                }
            }
            Err("the watch ended before the Node's current version".to_string())
        };
        match tokio::time::timeout(REPLAY_TIMEOUT, replay).await {
            Ok(Ok(true)) => {
                tracing::info!(
                    from,
                    "the node was uncordoned by someone else since it was drained; its cordon now is not nodekeeper's"
                );
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(e)) if only_check => {
                tracing::warn!(from, error = %e, "could not replay the Node's changes since it was drained; trusting nodekeeper.io/cordoned-at");
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(from, error = %e, "could not replay the Node's changes since it was drained; managedFields say the cordon is nodekeeper's");
                false
            }
            Err(_) => {
                tracing::warn!(
                    from,
                    only_check,
                    "replaying the Node's changes since it was drained took too long"
                );
                false
            }
        }
    }

    /// Removes `nodekeeper.io/cordoned-at` while it still reads `at` (a new cordon by
    /// nodekeeper writes a new time: that one stays). Guarded by the resourceVersion read.
    async fn forget_cordon(&self, at: &str) -> Result<(), MaintenanceError> {
        for _ in 0..WRITE_ATTEMPTS {
            let node = call("GET node", self.nodes().get(&self.node)).await?;
            let current = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(super::CORDONED_AT_ANNOTATION));
            if current.map(String::as_str) != Some(at) {
                return Ok(());
            }
            let patch = serde_json::json!({ "metadata": {
                "resourceVersion": node.metadata.resource_version.clone().unwrap_or_default(),
                "annotations": { super::CORDONED_AT_ANNOTATION: null },
            } });
            match call(
                "PATCH node",
                self.nodes().patch(
                    &self.node,
                    &super::node_patch_params(),
                    &Patch::Merge(&patch),
                ),
            )
            .await
            {
                Ok(_) => {
                    tracing::info!(
                        cordoned_at = at,
                        "the node was uncordoned by someone else; nodekeeper's cordon is forgotten (a later cordon is not nodekeeper's to undo)"
                    );
                    return Ok(());
                }
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(annotations: &[(&str, &str)], unschedulable: bool) -> Node {
        let mut n = Node::default();
        n.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(unschedulable),
            ..Default::default()
        });
        n
    }

    fn owned_by(entries: &[(&str, &str, serde_json::Value)]) -> Node {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
        let mut n = node(&[], true);
        n.metadata.managed_fields = Some(
            entries
                .iter()
                .map(|(manager, sub, fields)| ManagedFieldsEntry {
                    manager: Some(manager.to_string()),
                    operation: Some("Update".into()),
                    subresource: (!sub.is_empty()).then(|| sub.to_string()),
                    fields_v1: Some(FieldsV1(fields.clone())),
                    ..Default::default()
                })
                .collect(),
        );
        n
    }

    #[test]
    fn drain_the_cordon_is_nodekeepers_only_while_its_field_manager_owns_spec_unschedulable() {
        let cordon = serde_json::json!({"f:spec": {"f:unschedulable": {}}});
        let labels = serde_json::json!({"f:metadata": {"f:labels": {"f:a": {}}}});
        assert_eq!(unschedulable_owned_by_nodekeeper(&node(&[], true)), None);
        assert_eq!(unschedulable_owned_by_nodekeeper(&owned_by(&[])), None);
        assert_eq!(
            unschedulable_owned_by_nodekeeper(&owned_by(&[("nodekeeper", "", cordon.clone())])),
            Some(true)
        );
        assert_eq!(
            unschedulable_owned_by_nodekeeper(&owned_by(&[
                ("nodekeeper", "", labels.clone()),
                ("kubectl", "", cordon.clone())
            ])),
            Some(false),
            "kubectl cordon after kubectl uncordon"
        );
        assert_eq!(
            unschedulable_owned_by_nodekeeper(&owned_by(&[("nodekeeper", "", labels)])),
            Some(false),
            "no owner"
        );
        assert_eq!(
            unschedulable_owned_by_nodekeeper(&owned_by(&[("nodekeeper", "status", cordon)])),
            Some(false)
        );
    }

    #[test]
    fn only_a_node_cordoned_with_cordoned_at_counts_as_cordoned_by_nodekeeper() {
        let at = (super::super::CORDONED_AT_ANNOTATION, "1000");
        assert!(cordoned_by_nodekeeper(&node(&[at], true)));
        assert!(!cordoned_by_nodekeeper(&node(&[], true)), "kubectl cordon");
        assert!(
            !cordoned_by_nodekeeper(&node(&[at], false)),
            "uncordoned since"
        );
    }

    #[test]
    fn a_schedulable_node_with_cordoned_at_is_an_undone_cordon() {
        let at = (super::super::CORDONED_AT_ANNOTATION, "1000");
        assert_eq!(undone_cordon(&node(&[at], false)), Some("1000".into()));
        assert_eq!(undone_cordon(&node(&[at], true)), None, "still cordoned");
        assert_eq!(undone_cordon(&node(&[], false)), None);
    }

    #[test]
    fn the_latest_drain_decides_whether_a_rotation_still_rules() {
        let record = Record {
            state: State::Returning,
            drain_id: "rot-a".into(),
            boot_id: "b1".into(),
            since: 10,
            return_by: 20,
            uncordon: true,
            error: String::new(),
            node_version: String::new(),
        };
        let drain = |id: &str, phase: &str| {
            let json = serde_json::json!({
                "id": id, "reason": "", "requester": "", "started": 1, "deadline": 2,
                "phase": phase, "done": [], "concurrency": 1, "deleteEmptydirData": false,
                "evictUnreplicated": false, "leaderSelector": "",
            })
            .to_string();
            super::super::state::Persisted::from_json(&json).expect("a drain record");
            json
        };
        let with = |t: String| node(&[(super::super::STATE_ANNOTATION, t.as_str())], true);
        assert_eq!(
            latest_drain(&with(drain("rot-a", "completed")), &record),
            Latest::Completed
        );
        assert_eq!(
            latest_drain(&with(drain("rot-a", "evicting")), &record),
            Latest::Running
        );
        assert!(matches!(
            latest_drain(&with(drain("later", "evicting")), &record),
            Latest::Superseded(_)
        ));
        assert!(matches!(
            latest_drain(&with(drain("rot-a", "failed")), &record),
            Latest::Superseded(_)
        ));
        assert!(matches!(
            latest_drain(&node(&[], true), &record),
            Latest::Superseded(_)
        ));
    }

    #[test]
    fn drain_a_rotation_is_over_for_the_sweep_only_with_no_drain_running_and_no_return_to_come() {
        let rec = |state: State| {
            serde_json::to_string(&Record {
                state,
                drain_id: "rot-a".into(),
                boot_id: "b1".into(),
                since: 10,
                return_by: 20,
                uncordon: true,
                error: String::new(),
                node_version: String::new(),
            })
            .unwrap()
        };
        let drain = |phase: &str| {
            serde_json::json!({
                "id": "rot-a", "reason": "", "requester": "", "started": 1, "deadline": 2,
                "phase": phase, "done": [], "concurrency": 1, "deleteEmptydirData": false,
                "evictUnreplicated": false, "leaderSelector": "",
            })
            .to_string()
        };
        let with = |m: Option<State>, d: Option<&str>| {
            let (m, d) = (m.map(rec), d.map(drain));
            let mut a: Vec<(&str, &str)> = Vec::new();
            if let Some(m) = &m {
                a.push((ANNOTATION, m.as_str()));
            }
            if let Some(d) = &d {
                a.push((super::super::STATE_ANNOTATION, d.as_str()));
            }
            rotation_over(&node(&a, false))
        };
        assert!(with(None, None).is_some(), "no rotation");
        assert!(with(Some(State::Done), Some("completed")).is_some());
        assert!(with(Some(State::Failed), Some("timed_out")).is_some());
        assert!(with(Some(State::Draining), Some("timed_out")).is_some());
        assert!(with(Some(State::Draining), Some("evicting")).is_none());
        assert!(
            with(Some(State::Done), Some("pending")).is_none(),
            "a new drain"
        );
        assert!(with(None, Some("evicting")).is_none(), "a plain drain");
        for s in [
            State::Drained,
            State::AwaitingReboot,
            State::Rebooted,
            State::Returning,
        ] {
            assert!(with(Some(s), Some("completed")).is_none(), "{s:?}");
        }
        let corrupt = node(&[(super::super::STATE_ANNOTATION, "{")], false);
        assert!(
            rotation_over(&corrupt).is_none(),
            "an unreadable drain may run"
        );
    }

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
            node_version: String::new(),
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
