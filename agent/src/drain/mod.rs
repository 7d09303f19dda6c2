//! Graceful drain for the OS-patching rotation, on command over gRPC: cordon, then evict the
//! node's pods through the Eviction API in order (not-Ready first, leaders last), retrying
//! PodDisruptionBudget refusals with backoff until the deadline, waiting for each pod's deletion
//! by UID, streaming progress, and persisting its state on the Node so a restarted agent resumes.
//!
//! Never deletes a pod directly (evictions only, so budgets are always honoured), never evicts
//! DaemonSet or mirror pods, never uncordons on its own.

pub mod engine;
pub mod imds;
pub mod lock;
pub mod maintenance;
pub mod owner;
pub mod plan;
pub mod rotate;
pub mod state;
pub mod status;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigDuration;
use crate::pb::{self, DrainPhase};

/// A rotation waits for the node anyway; an hour covers slow-terminating stateful pods.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// kubectl drain evicts everything at once; a few at a time keeps API and scheduler load even.
pub const DEFAULT_CONCURRENCY: u32 = 8;
/// First retry after a budget refusal; doubles up to the max, with jitter.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// kubectl retries every 5 s; capping at 10 s keeps the drain responsive once a replacement is Ready.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(10);
/// How often a pod whose deletion was not seen on the watch is checked with a GET.
pub const DEFAULT_DELETION_POLL: Duration = Duration::from_secs(5);
/// The Node annotation holding the drain's state (JSON).
pub const STATE_ANNOTATION: &str = "nodekeeper.io/drain";
/// Unix seconds at which nodekeeper cordoned the node (set with the cordon, removed with the
/// uncordon): `nodekeeper_node_cordoned_by_nodekeeper_seconds` counts from it, across agent
/// restarts and reboots, and a node cordoned by someone else counts 0.
pub const CORDONED_AT_ANNOTATION: &str = "nodekeeper.io/cordoned-at";
/// The field manager of every Node write of the drain capability (`fieldManager`): the API
/// server records it in `metadata.managedFields` as the owner of the fields it set, so the
/// return knows whether the cordon in place (`spec.unschedulable`) is still nodekeeper's
/// (docs/decisions.md #20-l).
pub const FIELD_MANAGER: &str = "nodekeeper";

/// Patch parameters of the drain capability's Node writes: field manager `FIELD_MANAGER`.
pub fn node_patch_params() -> kube::api::PatchParams {
    kube::api::PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}
pub const CAPABILITY: &str = "drain";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DrainConfig {
    /// Serve Cordon/Uncordon/Drain (connected mode only).
    pub enabled: bool,
    pub default_timeout: ConfigDuration,
    pub concurrency: u32,
    pub retry_initial: ConfigDuration,
    pub retry_max: ConfigDuration,
    pub deletion_poll: ConfigDuration,
    /// Equality selector of leader pods, evicted last, when a request gives none.
    pub leader_selector: String,
    /// At most N nodes draining at once across the cluster (Leases); off by default.
    pub fleet_lock: lock::FleetLockConfig,
    /// Drain on EC2 spot interruption and scheduled-maintenance notices (IMDSv2); off by default.
    pub imds: imds::ImdsConfig,
    /// How long a drain's driver keeps its claim on the Node without renewing it (renewed every
    /// third); another agent process on the node adopts the drain after that (owner.rs).
    pub owner_lease: ConfigDuration,
    /// The patch-and-reboot rotation's return (maintenance.rs).
    pub maintenance: maintenance::MaintenanceConfig,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_timeout: ConfigDuration(DEFAULT_TIMEOUT),
            concurrency: DEFAULT_CONCURRENCY,
            retry_initial: ConfigDuration(DEFAULT_RETRY_INITIAL),
            retry_max: ConfigDuration(DEFAULT_RETRY_MAX),
            deletion_poll: ConfigDuration(DEFAULT_DELETION_POLL),
            leader_selector: plan::DEFAULT_LEADER_SELECTOR.to_string(),
            fleet_lock: lock::FleetLockConfig::default(),
            imds: imds::ImdsConfig::default(),
            owner_lease: ConfigDuration(owner::DEFAULT_OWNER_LEASE),
            maintenance: maintenance::MaintenanceConfig::default(),
        }
    }
}

impl DrainConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.concurrency == 0 || self.concurrency > 256 {
            out.push((
                "drain.concurrency".into(),
                format!("{} is out of range (1..=256)", self.concurrency),
            ));
        }
        if self.retry_initial.get() < Duration::from_millis(10)
            || self.retry_initial > self.retry_max
        {
            out.push((
                "drain.retryInitial".into(),
                format!(
                    "{} must be >= 10ms and <= drain.retryMax",
                    self.retry_initial
                ),
            ));
        }
        if self.default_timeout.get() < Duration::from_secs(1)
            || self.default_timeout.get() > Duration::from_secs(24 * 3600)
        {
            out.push((
                "drain.defaultTimeout".into(),
                format!("{} is out of range (1s..=24h)", self.default_timeout),
            ));
        }
        if self.deletion_poll.get() < Duration::from_millis(100) {
            out.push((
                "drain.deletionPoll".into(),
                format!("{} is below 100ms", self.deletion_poll),
            ));
        }
        if self.owner_lease.get() < Duration::from_secs(3)
            || self.owner_lease.get() > Duration::from_secs(600)
        {
            out.push((
                "drain.ownerLease".into(),
                format!("{} is out of range (3s..=10m)", self.owner_lease),
            ));
        }
        if let Err(e) = plan::parse_leader_selector(&self.leader_selector) {
            out.push(("drain.leaderSelector".into(), e));
        }
        out.extend(self.fleet_lock.problems());
        out.extend(self.imds.problems());
        out.extend(self.maintenance.problems());
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The request is malformed (empty id, bad selector, bad timeout).
    #[error("{0}")]
    Invalid(String),
    /// Another drain is running, or the node is draining and cannot be uncordoned.
    #[error("{0}")]
    Conflict(String),
    /// No drain with that id.
    #[error("{0}")]
    NotFound(String),
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("kubernetes API call timed out: {0}")]
    Timeout(String),
    /// An eviction the API server refused for good (RBAC, invalid, several budgets).
    #[error("{0}")]
    Evict(String),
}

impl From<DrainError> for tonic::Status {
    fn from(e: DrainError) -> Self {
        match e {
            DrainError::Invalid(m) => tonic::Status::invalid_argument(m),
            DrainError::Conflict(m) => tonic::Status::failed_precondition(m),
            DrainError::NotFound(m) => tonic::Status::not_found(m),
            DrainError::Api(e) => tonic::Status::unavailable(e.to_string()),
            DrainError::Timeout(m) => tonic::Status::deadline_exceeded(m),
            DrainError::Evict(m) => tonic::Status::failed_precondition(m),
        }
    }
}

// === metrics ===

#[derive(Debug, Clone)]
pub struct DrainMetrics {
    pub drains: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub duration: Histogram,
    pub evictions: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub retries: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub remaining: Gauge,
    pub lock: lock::LockMetrics,
}

impl DrainMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            drains: Family::default(),
            duration: Histogram::new([
                10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
            ]),
            evictions: Family::default(),
            retries: Family::default(),
            remaining: Gauge::default(),
            lock: lock::LockMetrics::register(registry),
        };
        registry.register(
            "drains",
            "Drains ended, by result (completed, failed, timed_out, cancelled)",
            m.drains.clone(),
        );
        registry.register_with_unit(
            "drain_duration",
            "Time from drain start to its end",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "drain_evictions",
            "Evictions by result (evicted, already_gone)",
            m.evictions.clone(),
        );
        registry.register(
            "drain_eviction_retries",
            "Eviction retries by reason (pdb, throttled, conflict, error)",
            m.retries.clone(),
        );
        registry.register(
            "drain_pods_remaining",
            "Pods the running drain still has to evict",
            m.remaining.clone(),
        );
        m
    }
}

// === the node's cordon and maintenance state, read from the node watch at scrape time ===

/// Exports `nodekeeper_node_cordoned_by_nodekeeper_seconds` and
/// `nodekeeper_maintenance_state{state}` from the Node as the agent's node watch last saw it:
/// no API call per scrape, and the values survive agent restarts (they live on the Node).
#[derive(Debug)]
pub struct NodeStateCollector(pub tokio::sync::watch::Receiver<Option<crate::kube::NodeInfo>>);

/// Every value of `maintenance_state`'s label; `none` when the Node has no record.
pub const MAINTENANCE_STATES: [&str; 8] = [
    "none",
    "draining",
    "drained",
    "awaiting-reboot",
    "rebooted",
    "returning",
    "done",
    "failed",
];

impl NodeStateCollector {
    /// Seconds since nodekeeper cordoned the node; 0 when it is schedulable or someone else
    /// cordoned it.
    fn cordoned_seconds(info: &crate::kube::NodeInfo, now: u64) -> f64 {
        let at = info
            .annotations
            .get(CORDONED_AT_ANNOTATION)
            .and_then(|t| t.parse::<u64>().ok());
        match at {
            Some(at) if info.unschedulable => now.saturating_sub(at) as f64,
            _ => 0.0,
        }
    }

    fn maintenance_state(info: &crate::kube::NodeInfo) -> &'static str {
        info.annotations
            .get(maintenance::ANNOTATION)
            .and_then(|t| serde_json::from_str::<maintenance::Record>(t).ok())
            .map_or("none", |r| r.state.as_str())
    }
}

impl prometheus_client::collector::Collector for NodeStateCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let info = self.0.borrow().clone();
        let now = state::unix(SystemTime::now());
        let seconds = info
            .as_ref()
            .map_or(0.0, |i| Self::cordoned_seconds(i, now));
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(seconds);
        let metric = encoder.encode_descriptor(
            "node_cordoned_by_nodekeeper",
            "Seconds since nodekeeper cordoned this node (0: schedulable, or cordoned by someone else)",
            Some(&Unit::Seconds),
            gauge.metric_type(),
        )?;
        gauge.encode(metric)?;
        let current = info.as_ref().map_or("none", Self::maintenance_state);
        let mut metric = encoder.encode_descriptor(
            "maintenance_state",
            "1 for the node's patch-and-reboot rotation state (nodekeeper.io/maintenance), 0 for the others",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for s in MAINTENANCE_STATES {
            let v: i64 = (s == current).into();
            metric.encode_family(&[("state", s)])?.encode_gauge(&v)?;
        }
        Ok(())
    }
}

// === the running drain ===

/// One drain: its status, every event so far (replayed to re-attaching clients), and a live feed.
#[derive(Debug)]
pub struct DrainRun {
    pub id: String,
    status: Mutex<pb::DrainStatus>,
    history: Mutex<Vec<pb::DrainEvent>>,
    tx: broadcast::Sender<pb::DrainEvent>,
    pub cancel: CancellationToken,
    /// Cancelled when another agent process on the node took this drain over: the drain goes
    /// on there, so this run's streams end with an error asking to re-attach, not a final event.
    handed_over: CancellationToken,
}

impl DrainRun {
    pub fn new(status: pb::DrainStatus) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(Self {
            id: status.id.clone(),
            status: Mutex::new(status),
            history: Mutex::new(Vec::new()),
            tx,
            cancel: CancellationToken::new(),
            handed_over: CancellationToken::new(),
        })
    }

    /// Records that another agent process drives this drain from now on (`why` in
    /// `status.error`) and ends every stream attached here with `ABORTED`.
    pub fn hand_over(&self, why: &str) {
        self.update(|s| s.error = why.to_string());
        self.handed_over.cancel();
    }

    pub fn is_handed_over(&self) -> bool {
        self.handed_over.is_cancelled()
    }

    /// Resolves once `hand_over` was called.
    pub async fn handed_over(&self) {
        self.handed_over.cancelled().await;
    }

    /// What a stream attached to a handed-over run ends with: not a final event (the drain has
    /// not ended), an error that tells the client to re-attach with the same id.
    pub fn handed_over_status(&self) -> tonic::Status {
        tonic::Status::aborted(format!(
            "drain {}: {}; re-attach with the same id",
            self.id,
            self.status().error
        ))
    }

    pub fn status(&self) -> pb::DrainStatus {
        self.status.lock().expect("not poisoned").clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut pb::DrainStatus)) -> pb::DrainStatus {
        let mut s = self.status.lock().expect("not poisoned");
        f(&mut s);
        s.clone()
    }

    pub fn finished(&self) -> bool {
        is_terminal(self.status().phase())
    }

    pub fn emit(&self, event: pb::drain_event::Event) {
        let e = pb::DrainEvent {
            at: Some(SystemTime::now().into()),
            drain_id: self.id.clone(),
            event: Some(event),
        };
        let mut h = self.history.lock().expect("not poisoned");
        // A pod blocked for an hour is retried hundreds of times: the replay keeps only its
        // latest `blocked`, so history stays bounded by the number of pods.
        if let Some(pb::drain_event::Event::Blocked(b)) = &e.event {
            h.retain(|old| {
                !matches!(&old.event, Some(pb::drain_event::Event::Blocked(o)) if o.pod == b.pod)
            });
        }
        h.push(e.clone());
        let _ = self.tx.send(e);
    }

    /// Events so far and a receiver for the rest, taken atomically so none is lost or doubled.
    pub fn attach(&self) -> (Vec<pb::DrainEvent>, broadcast::Receiver<pb::DrainEvent>) {
        let h = self.history.lock().expect("not poisoned");
        (h.clone(), self.tx.subscribe())
    }
}

pub fn is_terminal(phase: DrainPhase) -> bool {
    matches!(
        phase,
        DrainPhase::Completed | DrainPhase::Failed | DrainPhase::TimedOut | DrainPhase::Cancelled
    )
}

/// True for the events that end a drain's stream.
pub fn is_final_event(e: &pb::DrainEvent) -> bool {
    use pb::drain_event::Event;
    matches!(
        e.event,
        Some(Event::Completed(_) | Event::Failed(_) | Event::TimedOut(_) | Event::Cancelled(_))
    )
}
