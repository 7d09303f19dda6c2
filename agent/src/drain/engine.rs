//! The drain controller: cordon/uncordon, starting (or re-attaching to) a drain, the eviction
//! loop, persistence on the Node, resume after a restart, Kubernetes Events.
//!
//! Every API call has a named timeout. Evictions go through `pods/eviction` only. A pod counts
//! as gone when the API returns 404 for it or a pod of that name with another UID (a
//! replacement with the same name does not count as the old one still running).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, ObjectMeta, Preconditions};
use kube::api::{ListParams, Patch, PostParams};
use kube::{Api, Client};
// The engine's clock is tokio's: the same monotonic clock in production, and the virtual one
// of paused-time unit tests (engine_tests.rs), so the fence and the progress-save interval
// move with the back-offs they are tested against.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lock;
use super::maintenance::{Maintenance, Rotation};
use super::owner::{self, Standing};
use super::plan::{self, Class, PlanOptions, PlannedPod};
use super::state::{self, Persisted};
use super::{DrainConfig, DrainError, DrainMetrics, DrainRun, STATE_ANNOTATION, is_terminal};
use crate::kube::API_CALL_TIMEOUT;
use crate::pb::{self, DrainPhase, drain_event::Event as Ev};

/// Attempts of a compare-and-swap write of the state annotation before giving up (each lost
/// race re-reads the Node: kubelet status updates also move its resourceVersion).
const CAS_ATTEMPTS: u32 = 10;

/// What a Drain request meets on the Node (owner.rs has the rule).
pub enum Claim {
    /// This process drives it: start it (or re-attach to it) with these parameters.
    Drive {
        params: DrainParams,
        done: HashSet<String>,
    },
    /// Another live agent process on this node drives this drain: follow the annotation.
    Follow(Persisted),
    /// The drain with this id ended before this process knew of it.
    Ended(Persisted),
}

/// How often the done list is persisted while evicting (always at phase changes and the end).
const PROGRESS_PERSIST_INTERVAL: Duration = Duration::from_secs(5);

/// How many times a non-eviction call is tried before its error ends the drain.
const CALL_ATTEMPTS: u32 = 8;
/// First wait after a transient failure; doubles up to `CALL_BACKOFF_MAX`.
const CALL_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const CALL_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A `Retry-After` longer than this is cut short: the drain's deadline matters more.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);

/// True for answers a busy or restarting API server gives that are worth asking again:
/// 429 (API Priority and Fairness), 500 without a known permanent cause, 503, 504, and
/// transport failures.
pub(super) fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// The server's `Retry-After` (carried as `details.retryAfterSeconds` in the Status).
fn retry_after(e: &kube::Error) -> Option<Duration> {
    match e {
        kube::Error::Api(s) => s
            .details
            .as_ref()
            .map(|d| d.retry_after_seconds)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(u64::from(s)).min(RETRY_AFTER_MAX)),
        _ => None,
    }
}

/// One non-eviction API call with a timeout, retried on transient failures with bounded
/// exponential backoff (honouring `Retry-After`): one 429, 503 or 504 must not fail a drain.
async fn call<T, F, Fut>(what: &str, mut f: F) -> Result<T, DrainError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut backoff = CALL_BACKOFF_INITIAL;
    let mut attempt = 1;
    loop {
        let err = match tokio::time::timeout(API_CALL_TIMEOUT, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if transient(&e) && attempt < CALL_ATTEMPTS => {
                let wait = retry_after(&e).unwrap_or_else(|| jitter(backoff));
                tracing::info!(call = what, attempt, error = %e, ?wait, "transient API error; retrying");
                wait
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) if attempt < CALL_ATTEMPTS => {
                tracing::info!(call = what, attempt, "API call timed out; retrying");
                jitter(backoff)
            }
            Err(_) => {
                return Err(DrainError::Timeout(format!(
                    "{what} took longer than {API_CALL_TIMEOUT:?} {CALL_ATTEMPTS} times"
                )));
            }
        };
        tokio::time::sleep(err).await;
        backoff = (backoff * 2).min(CALL_BACKOFF_MAX);
        attempt += 1;
    }
}

/// The validated parameters of a drain, as requested or resumed.
#[derive(Debug, Clone)]
pub struct DrainParams {
    pub id: String,
    pub reason: String,
    pub requester: String,
    /// Who was authenticated to start it (`cert:<name>`, `token:control`, `agent:imds`); the
    /// `requester` above is only what the caller asserted.
    pub principal: String,
    pub started: SystemTime,
    pub deadline: SystemTime,
    pub grace_period_seconds: Option<i64>,
    pub concurrency: u32,
    pub delete_emptydir_data: bool,
    pub evict_unreplicated: bool,
    pub leader_selector: String,
    /// kubectl's --skip-wait-for-delete-timeout.
    pub skip_wait_for_delete: Option<Duration>,
    /// A patch-and-reboot rotation: hold the slot after the drain until the node is back.
    pub rotation: Option<Rotation>,
    /// Never wait for a fleet-lock slot (a spot interruption: two minutes, no queueing).
    pub bypass_fleet_lock: bool,
}

impl DrainParams {
    /// The same parameters, started by `principal`.
    pub fn by(mut self, principal: &str) -> Self {
        self.principal = principal.to_string();
        self
    }

    fn persisted(&self, phase: DrainPhase, done: Vec<String>, error: String) -> Persisted {
        Persisted {
            id: self.id.clone(),
            reason: self.reason.clone(),
            requester: self.requester.clone(),
            principal: self.principal.clone(),
            started: state::unix(self.started),
            deadline: state::unix(self.deadline),
            phase: state::phase_name(phase),
            done,
            grace_period_seconds: self.grace_period_seconds,
            concurrency: self.concurrency,
            delete_emptydir_data: self.delete_emptydir_data,
            evict_unreplicated: self.evict_unreplicated,
            leader_selector: self.leader_selector.clone(),
            error,
            driver: String::new(),
            heartbeat: 0,
            cancel_requested: false,
            skip_wait_for_delete_seconds: self.skip_wait_for_delete.map(|d| d.as_secs()),
            rotation: self.rotation,
            bypass_fleet_lock: self.bypass_fleet_lock,
        }
    }

    fn from_persisted(p: &Persisted) -> Self {
        Self {
            id: p.id.clone(),
            reason: p.reason.clone(),
            requester: p.requester.clone(),
            principal: p.principal.clone(),
            started: state::from_unix(p.started),
            deadline: state::from_unix(p.deadline),
            grace_period_seconds: p.grace_period_seconds,
            concurrency: p.concurrency,
            delete_emptydir_data: p.delete_emptydir_data,
            evict_unreplicated: p.evict_unreplicated,
            leader_selector: p.leader_selector.clone(),
            skip_wait_for_delete: p.skip_wait_for_delete_seconds.map(Duration::from_secs),
            rotation: p.rotation,
            bypass_fleet_lock: p.bypass_fleet_lock,
        }
    }

    fn plan_options(&self) -> Result<PlanOptions, DrainError> {
        Ok(PlanOptions {
            delete_emptydir_data: self.delete_emptydir_data,
            evict_unreplicated: self.evict_unreplicated,
            leader_selector: plan::parse_leader_selector(&self.leader_selector)
                .map_err(DrainError::Invalid)?,
            skip_wait_for_delete: self.skip_wait_for_delete,
        })
    }
}

/// Where the drain learns that pods are gone without polling: this node's pod watch.
pub type PodWatch = Option<(crate::kube::PodStore, tokio::sync::watch::Receiver<u64>)>;

pub struct DrainController {
    client: Client,
    node: String,
    config: DrainConfig,
    metrics: DrainMetrics,
    pods: PodWatch,
    current: Mutex<Option<Arc<DrainRun>>>,
    /// Serialises writes of the state annotation.
    persist: tokio::sync::Mutex<()>,
    last_progress_save: Mutex<Option<Instant>>,
    /// Budgets a DrainBlocked Event was recorded for in the running drain: one Event per budget.
    blocked_events: Mutex<HashSet<String>>,
    /// Why each waiting pod waits (pod key -> reason): `status.error` is these, so it never
    /// names a budget that stopped blocking.
    blockers: Mutex<BTreeMap<String, String>>,
    shutdown: CancellationToken,
    /// This process, as named in the state annotation's `driver`.
    instance: String,
    /// The running drain's skip-wait-for-delete timeout (read by the gone check).
    skip_wait: Mutex<Option<Duration>>,
    /// The rotation's state on the Node and the slot kept across the reboot.
    maintenance: Arc<Maintenance>,
    /// True while the drain's fleet-lock slot is lost: no eviction is posted until it is back.
    paused: tokio::sync::watch::Sender<bool>,
    /// Held (read) by every eviction POST in flight: a pause takes it (write) before it says
    /// "paused", so no eviction reaches the API server after the stream said so.
    posting: tokio::sync::RwLock<()>,
    /// The fence (#16-k): evictions are posted only while `Instant::now()` is before this, the
    /// moment the last confirmed claim write was sent plus the owner lease minus a safety margin.
    /// `None`: no confirmed claim (before the first write, or after losing it).
    claim_until: tokio::sync::watch::Sender<Option<Instant>>,
}

impl DrainController {
    pub fn new(
        client: Client,
        node: String,
        config: DrainConfig,
        metrics: DrainMetrics,
        pods: PodWatch,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let maintenance = Arc::new(Maintenance::new(
            client.clone(),
            node.clone(),
            config.maintenance.clone(),
            config.fleet_lock.enabled.then(|| config.fleet_lock.clone()),
            metrics.lock.clone(),
        ));
        Arc::new(Self {
            paused: tokio::sync::watch::channel(false).0,
            posting: tokio::sync::RwLock::new(()),
            claim_until: tokio::sync::watch::channel(None).0,
            maintenance,
            client,
            node,
            config,
            metrics,
            pods,
            current: Mutex::new(None),
            persist: tokio::sync::Mutex::new(()),
            last_progress_save: Mutex::new(None),
            blocked_events: Mutex::new(HashSet::new()),
            blockers: Mutex::new(BTreeMap::new()),
            shutdown,
            instance: owner::instance_id(),
            skip_wait: Mutex::new(None),
        })
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// The node's rotation state (maintenance.rs), run for the agent's lifetime by app.rs.
    pub fn maintenance(&self) -> Arc<Maintenance> {
        self.maintenance.clone()
    }

    pub fn current(&self) -> Option<Arc<DrainRun>> {
        self.current.lock().expect("not poisoned").clone()
    }

    pub async fn unschedulable(&self) -> Result<bool, DrainError> {
        let node = call("GET node", || async { self.nodes().get(&self.node).await }).await?;
        Ok(node.spec.and_then(|s| s.unschedulable).unwrap_or(false))
    }

    /// This Node's metadata.uid, read from the API (node-bound requests before the node watch
    /// has seen the Node).
    pub async fn node_uid(&self) -> Result<String, DrainError> {
        let node = call("GET node", || async { self.nodes().get(&self.node).await }).await?;
        Ok(node.metadata.uid.unwrap_or_default())
    }

    /// Cordons for `principal` (the authenticated caller), named in the Event.
    pub async fn cordon(&self, reason: &str, principal: &str) -> Result<(), DrainError> {
        self.set_unschedulable(true).await?;
        self.event(
            "Cordoned",
            "Normal",
            &format!("cordoned by nodekeeper for {principal}: {reason}"),
        )
        .await;
        Ok(())
    }

    pub async fn uncordon(&self, principal: &str) -> Result<(), DrainError> {
        if let Some(run) = self.current().filter(|r| !r.finished()) {
            return Err(DrainError::Conflict(format!(
                "drain {:?} is running; cancel it before uncordoning",
                run.id
            )));
        }
        // The Node is the truth: a drain driven by the other agent process on this node (or
        // waiting to be adopted) forbids it too.
        if let (Some(p), _) = self.read_state().await?
            && !is_terminal(p.phase())
        {
            return Err(DrainError::Conflict(format!(
                "drain {:?} is running (driven by {}); cancel it before uncordoning",
                p.id,
                if p.driver.is_empty() {
                    "an earlier agent"
                } else {
                    &p.driver
                }
            )));
        }
        self.set_unschedulable(false).await?;
        self.event(
            "Uncordoned",
            "Normal",
            &format!("uncordoned by nodekeeper for {principal}"),
        )
        .await;
        Ok(())
    }

    /// Cordons (with `nodekeeper.io/cordoned-at`, in the same PATCH) or uncordons (removing it).
    /// A node already cordoned is left as it is: one this agent cordoned keeps its time (a
    /// resumed drain does not reset it), one cordoned by someone else gets no cordoned-at.
    async fn set_unschedulable(&self, on: bool) -> Result<(), DrainError> {
        if on {
            let node = call("GET node", || async { self.nodes().get(&self.node).await }).await?;
            // Already cordoned: by this agent (a resumed drain keeps its time) or by someone
            // else (kubectl cordon), whose cordon stays theirs: no cordoned-at is written, so
            // nodekeeper never uncordons it after a rotation (#20-f).
            let cordoned = node.spec.and_then(|s| s.unschedulable).unwrap_or(false);
            if cordoned {
                return Ok(());
            }
        }
        let at = on.then(|| state::unix(SystemTime::now()).to_string());
        let patch = serde_json::json!({
            "metadata": { "annotations": { super::CORDONED_AT_ANNOTATION: at } },
            "spec": { "unschedulable": if on { serde_json::json!(true) } else { serde_json::Value::Null } },
        });
        call("PATCH node", || async {
            self.nodes()
                .patch(
                    &self.node,
                    &super::node_patch_params(),
                    &Patch::Merge(&patch),
                )
                .await
        })
        .await?;
        Ok(())
    }

    /// A Kubernetes Event on this Node; failures are logged, never fatal.
    async fn event(&self, reason: &str, kind: &str, message: &str) {
        crate::kube::node_event(&self.client, &self.node, reason, kind, message).await;
    }

    async fn save(
        &self,
        params: &DrainParams,
        phase: DrainPhase,
        done: &[String],
        error: &str,
    ) -> Result<(), DrainError> {
        // Taken with the heartbeat, before any wait: the fence then ends no later than the
        // lease the other agent process reads from this write.
        let sent = Instant::now();
        let mut record = params.persisted(phase, done.to_vec(), error.to_string());
        record.driver = self.instance.clone();
        record.heartbeat = state::unix(SystemTime::now());
        let _guard = self.persist.lock().await;
        let cancel = self
            .cas(|cur| {
                // A claim write (#16-k): only over this drain's record, still unfinished and
                // still naming this process as its driver. Anything else (another process
                // adopted it, it was cancelled or completed meanwhile) means the claim is lost:
                // this process must not write over it.
                let Some(c) = cur else {
                    return Err(DrainError::Conflict(format!(
                        "drain {:?} is no longer recorded on the node",
                        record.id
                    )));
                };
                if c.id != record.id {
                    return Err(DrainError::Conflict(format!(
                        "the node now records drain {:?}, not {:?}",
                        c.id, record.id
                    )));
                }
                if c.driver != self.instance {
                    return Err(DrainError::Conflict(format!(
                        "drain {:?} is now driven by {}",
                        c.id, c.driver
                    )));
                }
                if is_terminal(c.phase()) {
                    return Err(DrainError::Conflict(format!(
                        "drain {:?} already ended ({})",
                        c.id, c.phase
                    )));
                }
                let mut new = record.clone();
                new.cancel_requested = c.cancel_requested;
                let cancel = new.cancel_requested;
                Ok((Some(new), cancel))
            })
            .await
            .inspect_err(|e| {
                if matches!(e, DrainError::Conflict(_)) {
                    self.claim_until.send_replace(None);
                }
            })?;
        if !is_terminal(phase) {
            self.confirm_claim(sent);
        }
        if cancel
            && !is_terminal(phase)
            && let Some(run) = self.current().filter(|r| r.id == params.id)
        {
            tracing::info!(id = %params.id, "cancel requested through the node (from the other agent process)");
            run.cancel.cancel();
        }
        Ok(())
    }

    /// A claim write sent at `sent` succeeded: evictions may go on until `sent` + lease - margin.
    fn confirm_claim(&self, sent: Instant) {
        let lease = self.config.owner_lease.get();
        let until = sent + lease.saturating_sub(owner::fence_margin(lease));
        self.claim_until.send_modify(|u| {
            if u.is_none_or(|cur| cur < until) {
                *u = Some(until);
            }
        });
    }

    /// Waits until this process holds a confirmed claim (#16-k) and returns how long it lasts.
    /// A renewal that failed, hung or lost the claim leaves the fence past: no eviction starts.
    async fn fenced(&self) -> Duration {
        let mut rx = self.claim_until.subscribe();
        loop {
            let until = *rx.borrow_and_update();
            if let Some(left) = until.and_then(|u| u.checked_duration_since(Instant::now()))
                && !left.is_zero()
            {
                return left;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    // === the Node annotation as the single source of truth ===

    /// The drain recorded on the Node (if readable) and the Node's resourceVersion.
    async fn read_state(&self) -> Result<(Option<Persisted>, String), DrainError> {
        let (record, rv) = self.read_record().await?;
        let record = record.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring an unreadable drain state annotation");
            None
        });
        Ok((record, rv))
    }

    /// The drain recorded on the Node, or why the record is unreadable or corrupt (#16-j).
    async fn read_record(&self) -> Result<(Result<Option<Persisted>, String>, String), DrainError> {
        let node = call("GET node", || async { self.nodes().get(&self.node).await }).await?;
        let rv = node.metadata.resource_version.clone().unwrap_or_default();
        let record = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATE_ANNOTATION))
            .map(|t| Persisted::from_json(t))
            .transpose();
        Ok((record, rv))
    }

    /// Compare-and-swap on the state annotation: `decide` sees the current record and returns
    /// the one to write (or `None` to write nothing) and a result; the PATCH carries the Node's
    /// resourceVersion as a precondition, so a write that raced another one is decided again.
    async fn cas<T>(
        &self,
        mut decide: impl FnMut(Option<&Persisted>) -> Result<(Option<Persisted>, T), DrainError>,
    ) -> Result<T, DrainError> {
        for _ in 0..CAS_ATTEMPTS {
            let (cur, rv) = self.read_state().await?;
            let (new, out) = decide(cur.as_ref())?;
            let Some(new) = new else {
                return Ok(out);
            };
            let patch = serde_json::json!({ "metadata": {
                "resourceVersion": rv,
                "annotations": { STATE_ANNOTATION: new.to_json() } } });
            let wrote = call("PATCH node annotation", || async {
                self.nodes()
                    .patch(
                        &self.node,
                        &super::node_patch_params(),
                        &Patch::Merge(&patch),
                    )
                    .await
            })
            .await;
            match wrote {
                Ok(_) => return Ok(out),
                Err(DrainError::Api(kube::Error::Api(s))) if s.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(DrainError::Conflict(
            "the node's drain state kept changing while being written".into(),
        ))
    }

    fn now() -> u64 {
        state::unix(SystemTime::now())
    }

    /// Decides, against the Node, what a Drain request with `params` does in this process.
    pub async fn claim(&self, params: DrainParams) -> Result<Claim, DrainError> {
        let lease = self.config.owner_lease.get();
        let have = |id: &str| self.current().is_some_and(|r| r.id == id);
        let me = self.instance.clone();
        self.cas(|cur| {
            let fresh = || {
                let mut p = params.persisted(DrainPhase::Pending, Vec::new(), String::new());
                p.driver = me.clone();
                p.heartbeat = Self::now();
                p
            };
            let drive = |params: DrainParams, done: HashSet<String>| Claim::Drive { params, done };
            let Some(c) = cur else {
                return Ok((Some(fresh()), drive(params.clone(), HashSet::new())));
            };
            let same = c.id == params.id;
            if is_terminal(c.phase()) {
                return Ok(match (same, have(&c.id)) {
                    (true, true) => (None, drive(params.clone(), HashSet::new())),
                    (true, false) => (None, Claim::Ended(c.clone())),
                    (false, _) => (Some(fresh()), drive(params.clone(), HashSet::new())),
                });
            }
            match (owner::standing(c, &me, Self::now(), lease), same) {
                (Standing::Mine, true) => Ok((None, drive(params.clone(), HashSet::new()))),
                (Standing::Live(_), true) => Ok((None, Claim::Follow(c.clone()))),
                (Standing::Free, true) => {
                    // Adopt it: the recorded parameters and progress win over the request's.
                    let mut adopted = c.clone();
                    adopted.driver = me.clone();
                    adopted.heartbeat = Self::now();
                    let done = c.done.iter().cloned().collect();
                    Ok((Some(adopted), drive(DrainParams::from_persisted(c), done)))
                }
                // The refusal names the drain, who asked for it and who drives it, so an
                // orchestrator refused by an IMDS notice's drain knows why (issue #16/#20).
                (standing, false) => Err(DrainError::Conflict(format!(
                    "drain {:?} (requester {:?}) is running, {}; a second drain ({:?}) is refused",
                    c.id,
                    c.requester,
                    match standing {
                        Standing::Live(d) => format!("driven by {d}"),
                        Standing::Mine => format!("driven by {me}"),
                        Standing::Free => "its agent is gone and it is being adopted".into(),
                    },
                    params.id
                ))),
            }
        })
        .await
    }

    /// The drain's status as the Node records it, unless this process drives it (its own
    /// status is fresher). For GetDrain and GetNode on either agent process.
    pub async fn status(&self) -> Result<Option<pb::DrainStatus>, DrainError> {
        let local = self.current();
        if let Some(run) = local.as_ref().filter(|r| !r.finished()) {
            return Ok(Some(run.status()));
        }
        match self.read_state().await? {
            (Some(p), _) if local.as_ref().is_none_or(|r| r.id != p.id) => {
                Ok(Some(p.status_header()))
            }
            _ => Ok(local.map(|r| r.status())),
        }
    }

    /// The recorded drain with `id` (any, when empty), read from the Node: a follower's view.
    pub async fn recorded(&self, id: &str) -> Result<Option<Persisted>, DrainError> {
        Ok(self
            .read_state()
            .await?
            .0
            .filter(|p| id.is_empty() || p.id == id))
    }

    /// Renews this process's claim every third of the owner lease; returns when the claim is
    /// lost (another process adopted the drain). Also carries a CancelDrain that reached the
    /// other process (`save` cancels the run).
    async fn hold(&self, run: &DrainRun, params: &DrainParams, done: Arc<Mutex<HashSet<String>>>) {
        let every = self.config.owner_lease.get() / 3;
        loop {
            tokio::time::sleep(every).await;
            let list: Vec<String> = done.lock().expect("not poisoned").iter().cloned().collect();
            match self.save(params, run.status().phase(), &list, "").await {
                Ok(()) => {}
                Err(DrainError::Conflict(m)) => {
                    tracing::warn!(id = %params.id, "{m}; this process stops driving it");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the drain's claim"),
            }
        }
    }

    /// On shutdown: hands the drain over at once (heartbeat 0) instead of after the lease.
    async fn release(&self, params: &DrainParams) {
        let me = self.instance.clone();
        self.claim_until.send_replace(None);
        let released = self.cas(|cur| match cur {
            Some(c) if c.driver == me && c.id == params.id && !is_terminal(c.phase()) => {
                let mut r = c.clone();
                r.heartbeat = 0;
                Ok((Some(r), ()))
            }
            _ => Ok((None, ())),
        });
        if tokio::time::timeout(API_CALL_TIMEOUT, released)
            .await
            .is_err()
        {
            tracing::warn!(
                "could not release the drain on shutdown; the next agent adopts it after the lease"
            );
        }
    }

    /// CancelDrain landing on a process that does not drive the drain: recorded on the Node,
    /// where the driver picks it up within a third of the owner lease.
    async fn request_cancel(&self, id: &str) -> Result<pb::DrainStatus, DrainError> {
        let out = self
            .cas(|cur| match cur {
                Some(c) if (id.is_empty() || c.id == id) && !is_terminal(c.phase()) => {
                    let mut r = c.clone();
                    r.cancel_requested = true;
                    Ok((Some(r.clone()), Some(r.status_header())))
                }
                _ => Ok((None, None)),
            })
            .await?;
        out.ok_or_else(|| DrainError::NotFound(format!("no running drain with id {id:?}")))
    }

    /// Persists the done list at most every `PROGRESS_PERSIST_INTERVAL` while evicting: the
    /// list only saves a resumed drain some eviction calls (a pod already gone answers 404 and a
    /// same-name replacement fails the UID precondition), so it need not cost a PATCH per pod.
    async fn save_progress(&self, params: &DrainParams, done: &[String]) -> Result<(), DrainError> {
        {
            let mut last = self.last_progress_save.lock().expect("not poisoned");
            if last.is_some_and(|t| t.elapsed() < PROGRESS_PERSIST_INTERVAL) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        self.save(params, DrainPhase::Evicting, done, "").await
    }

    async fn list_pods(&self) -> Result<Vec<Pod>, DrainError> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        Ok(call("LIST pods", || api.list(&lp)).await?.items)
    }

    /// Validates a request into parameters.
    pub fn params(&self, req: &pb::DrainRequest) -> Result<DrainParams, DrainError> {
        if req.id.trim().is_empty() {
            return Err(DrainError::Invalid("id: must not be empty".into()));
        }
        let timeout = match &req.timeout {
            None => self.config.default_timeout.get(),
            Some(d) => Duration::try_from(*d)
                .map_err(|_| DrainError::Invalid("timeout: must not be negative".into()))?,
        };
        if timeout.is_zero() || timeout > Duration::from_secs(24 * 3600) {
            return Err(DrainError::Invalid(format!(
                "timeout: {timeout:?} is out of range (0s, 24h]"
            )));
        }
        if req.grace_period_seconds.is_some_and(|g| g < 0) {
            return Err(DrainError::Invalid(
                "grace_period_seconds: must not be negative".into(),
            ));
        }
        if req.concurrency > 256 {
            return Err(DrainError::Invalid(format!(
                "concurrency: {} is above 256",
                req.concurrency
            )));
        }
        let leader_selector = if req.leader_selector.is_empty() {
            self.config.leader_selector.clone()
        } else {
            req.leader_selector.clone()
        };
        plan::parse_leader_selector(&leader_selector).map_err(DrainError::Invalid)?;
        let skip_wait_for_delete = match &req.skip_wait_for_delete_timeout {
            None => None,
            Some(d) => Some(Duration::try_from(*d).map_err(|_| {
                DrainError::Invalid("skip_wait_for_delete_timeout: must not be negative".into())
            })?)
            .filter(|d| !d.is_zero()),
        };
        let rotation = if req.await_reboot {
            let return_timeout = match &req.return_timeout {
                None => self.maintenance.default_return_timeout(),
                Some(d) => Duration::try_from(*d).map_err(|_| {
                    DrainError::Invalid("return_timeout: must not be negative".into())
                })?,
            };
            if return_timeout < Duration::from_secs(1)
                || return_timeout.as_secs() > state::MAX_RETURN_TIMEOUT_SECONDS
            {
                return Err(DrainError::Invalid(format!(
                    "return_timeout: {return_timeout:?} is out of range [1s, 7d]"
                )));
            }
            Some(Rotation {
                uncordon: !req.keep_cordoned,
                return_timeout_seconds: return_timeout.as_secs(),
            })
        } else if req.keep_cordoned || req.return_timeout.is_some() {
            let field = if req.keep_cordoned {
                "keep_cordoned"
            } else {
                "return_timeout"
            };
            return Err(DrainError::Invalid(format!(
                "{field}: only applies with await_reboot: true"
            )));
        } else {
            None
        };
        let started = SystemTime::now();
        Ok(DrainParams {
            rotation,
            bypass_fleet_lock: false,
            id: req.id.clone(),
            reason: req.reason.clone(),
            requester: req.requester.clone(),
            principal: String::new(),
            started,
            deadline: started + timeout,
            grace_period_seconds: req.grace_period_seconds,
            concurrency: if req.concurrency == 0 {
                self.config.concurrency
            } else {
                req.concurrency
            },
            delete_emptydir_data: req.delete_emptydir_data,
            evict_unreplicated: req.evict_unreplicated,
            leader_selector,
            skip_wait_for_delete,
        })
    }

    /// The plan for a request, without touching anything.
    pub async fn dry_run(&self, params: &DrainParams) -> Result<pb::DrainStatus, DrainError> {
        let plan = plan::plan(&self.list_pods().await?, &params.plan_options()?);
        Ok(plan_status(params, DrainPhase::Unspecified, &plan))
    }

    /// Starts a drain, or returns the running (or last) one with the same id.
    pub fn start(
        self: &Arc<Self>,
        params: DrainParams,
        done: HashSet<String>,
    ) -> Result<Arc<DrainRun>, DrainError> {
        let mut current = self.current.lock().expect("not poisoned");
        if let Some(run) = current.as_ref() {
            if run.id == params.id {
                return Ok(run.clone());
            }
            if !run.finished() {
                return Err(DrainError::Conflict(format!(
                    "drain {:?} is running; a second drain ({:?}) is refused",
                    run.id, params.id
                )));
            }
        }
        let run = DrainRun::new(pb::DrainStatus {
            id: params.id.clone(),
            phase: DrainPhase::Pending as i32,
            reason: params.reason.clone(),
            requester: params.requester.clone(),
            principal: params.principal.clone(),
            started_at: Some(params.started.into()),
            deadline: Some(params.deadline.into()),
            ..Default::default()
        });
        *current = Some(run.clone());
        self.blocked_events.lock().expect("not poisoned").clear();
        self.blockers.lock().expect("not poisoned").clear();
        *self.last_progress_save.lock().expect("not poisoned") = None;
        *self.skip_wait.lock().expect("not poisoned") = params.skip_wait_for_delete;
        self.paused.send_replace(false);
        self.claim_until.send_replace(None);
        let (me, r) = (self.clone(), run.clone());
        tokio::spawn(async move { me.run(r, params, done).await });
        Ok(run)
    }

    pub async fn cancel(&self, id: &str) -> Result<pb::DrainStatus, DrainError> {
        match self.current() {
            Some(run) if (run.id == id || id.is_empty()) && !run.finished() => {
                run.cancel.cancel();
                Ok(run.status())
            }
            // Not driven here: the other agent process on this node may drive it.
            _ => match self.request_cancel(id).await {
                Err(DrainError::NotFound(m)) => match self.current() {
                    Some(run) if run.id == id || id.is_empty() => Ok(run.status()),
                    _ => Err(DrainError::NotFound(m)),
                },
                r => r,
            },
        }
    }

    /// At start: resumes a drain persisted on the Node by an earlier incarnation of the agent.
    pub async fn resume(self: &Arc<Self>) -> Result<Option<Arc<DrainRun>>, DrainError> {
        let persisted = match self.read_record().await?.0 {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => {
                // #16-j: a corrupt or hostile record is not resumed and never panics the agent;
                // the node stays as it is (cordoned or not) and a person is told why.
                tracing::error!(error = %e, "not resuming the drain recorded on the node");
                self.event(
                    "DrainStateCorrupt",
                    "Warning",
                    &format!("not resuming the drain recorded on the node: {e}; the node is left as it is"),
                )
                .await;
                return Ok(None);
            }
        };
        let persisted = self.drained_before_reboot(persisted).await?;
        if is_terminal(persisted.phase()) {
            // Remember the last drain so GetDrain and re-attaching orchestrators see its end.
            let run = DrainRun::new(persisted.status_header());
            *self.current.lock().expect("not poisoned") = Some(run.clone());
            return Ok(Some(run));
        }
        match self.claim(DrainParams::from_persisted(&persisted)).await? {
            Claim::Drive { params, done } => {
                tracing::info!(id = %params.id, done = done.len(), "resuming a drain persisted on the node");
                self.start(params, done).map(Some)
            }
            Claim::Follow(p) => {
                // The other agent process on this node (a rollout's old pod) drives it: adopt
                // it only once that process lets go (released on shutdown, or lease expired).
                tracing::info!(id = %p.id, driver = %p.driver, "a drain is driven by another agent process on this node; standing by to adopt it");
                let me = self.clone();
                tokio::spawn(async move { me.stand_by(p.id).await });
                Ok(None)
            }
            Claim::Ended(_) => Ok(None),
        }
    }

    /// A rotation drain recorded as running whose rotation is recorded `drained` (or
    /// `awaiting-reboot`) with another boot ID than this one: the drain completed and the node
    /// went down between the `drained` write and the save of the drain's end (a kill, a power
    /// loss, a reboot racing the stream), then rebooted. That reboot is the rotation's: the
    /// drain's end is recorded as completed now (never re-run: it would record `drained` with
    /// this boot ID and wait for a second reboot nobody will do), and the return goes on
    /// (#20-r). Returns the drain's record as it is now (ended or as it was).
    async fn drained_before_reboot(&self, persisted: Persisted) -> Result<Persisted, DrainError> {
        if persisted.rotation.is_none() || is_terminal(persisted.phase()) {
            return Ok(persisted);
        }
        let node = call("GET node", || async { self.nodes().get(&self.node).await }).await?;
        let Some(record) = super::maintenance::record_of(&node) else {
            return Ok(persisted);
        };
        let Ok(boot_id) = self.maintenance.boot_id() else {
            return Ok(persisted);
        };
        let drained = matches!(
            record.state,
            super::maintenance::State::Drained | super::maintenance::State::AwaitingReboot
        );
        if !drained
            || record.drain_id != persisted.id
            || record.boot_id.is_empty()
            || record.boot_id == boot_id
        {
            return Ok(persisted);
        }
        let completed = state::phase_name(DrainPhase::Completed);
        let ended = self
            .cas(|cur| match cur {
                Some(c) if c.id == persisted.id && !is_terminal(c.phase()) => {
                    let mut r = c.clone();
                    r.phase = completed.clone();
                    r.heartbeat = 0;
                    Ok((Some(r.clone()), Some(r)))
                }
                _ => Ok((None, cur.cloned())),
            })
            .await?;
        let Some(ended) = ended else {
            return Ok(persisted);
        };
        tracing::warn!(id = %persisted.id, boot_id = %record.boot_id, now = %boot_id, "the rotation's drain completed and the node rebooted before its end was saved; recorded as completed");
        self.event(
            "DrainCompleted",
            "Normal",
            &format!(
                "drain {} completed (its end recorded after the node's reboot: boot ID {} -> {boot_id})",
                persisted.id, record.boot_id
            ),
        )
        .await;
        Ok(ended)
    }

    /// Polls the Node until the drain `id` ends or its driver lets go, then adopts it.
    pub async fn stand_by(self: Arc<Self>, id: String) {
        let every = self.config.owner_lease.get() / 3;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let Ok(Some(p)) = self.recorded(&id).await else {
                continue;
            };
            if is_terminal(p.phase()) {
                return;
            }
            match self.claim(DrainParams::from_persisted(&p)).await {
                Ok(Claim::Drive { params, done }) => {
                    tracing::info!(id = %params.id, done = done.len(), "adopted the drain from the agent process that let it go");
                    if let Err(e) = self.start(params, done) {
                        tracing::warn!(error = %e, "could not start the adopted drain");
                    }
                    return;
                }
                Ok(Claim::Follow(_)) => {}
                Ok(Claim::Ended(_)) => return,
                Err(e) => tracing::warn!(error = %e, "could not read the drain's owner"),
            }
        }
    }

    async fn run(self: Arc<Self>, run: Arc<DrainRun>, params: DrainParams, done: HashSet<String>) {
        // However the run ends (released, handed over, its guard dropped), the sweep looks
        // for a slot left marked for this node (#20-s).
        let _recheck = RecheckSlots(self.maintenance.clone());
        let started = Instant::now();
        let done = Arc::new(Mutex::new(done));
        let remaining = params
            .deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // The fleet-lock slot, once `drive` holds one; released below whatever the outcome.
        let slot: SlotCell = Arc::new(Mutex::new(None));
        let outcome = tokio::select! {
            r = self.drive(&run, &params, done.clone(), slot.clone()) => r,
            _ = tokio::time::sleep(remaining) => Err(Outcome::TimedOut),
            _ = run.cancel.cancelled() => Err(Outcome::Cancelled),
            // Another agent process adopted the drain (this one stalled past the owner lease):
            // it drives from here; stop without recording an end.
            _ = self.hold(&run, &params, done.clone()) => {
                run.hand_over("another agent process on this node took over the drain");
                // Stand by as a follower does, to adopt it back if that process lets go.
                tokio::spawn(self.clone().stand_by(params.id.clone()));
                return;
            }
            // Agent shutdown: stop without recording an end, so the next agent resumes (and
            // takes its own slot back: the Lease keeps this node as holder until it expires).
            _ = self.shutdown.cancelled() => {
                self.release(&params).await;
                let held = slot.lock().expect("not poisoned").take();
                if let Some(guard) = held {
                    guard.abandon().await;
                }
                return;
            }
        };
        let done_list: Vec<String> = done.lock().expect("not poisoned").iter().cloned().collect();
        let (mut phase, mut error, mut result) = match outcome {
            Ok(()) => (DrainPhase::Completed, String::new(), "completed"),
            Err(Outcome::TimedOut) => {
                let blocker = run.status().error;
                let why = if blocker.is_empty() {
                    "deadline exceeded".to_string()
                } else {
                    format!("deadline exceeded; {blocker}")
                };
                (DrainPhase::TimedOut, why, "timed_out")
            }
            Err(Outcome::Cancelled) => {
                (DrainPhase::Cancelled, "cancelled".to_string(), "cancelled")
            }
            Err(Outcome::Failed(e)) => (DrainPhase::Failed, e, "failed"),
        };
        // A completed rotation records the node as drained (its boot ID) before the drain's end
        // is saved: when that fails, the drain ends as failed, never as a completed rotation
        // nobody would see return from its reboot (#20-h).
        let mut drained = None;
        if let Some(rotation) = params.rotation
            && phase == DrainPhase::Completed
        {
            match self.maintenance.drained(&params.id, rotation).await {
                Ok(d) => drained = Some(d),
                Err(e) => {
                    tracing::error!(error = %e, "could not record the node as drained for its reboot; the rotation fails");
                    phase = DrainPhase::Failed;
                    error = format!("could not record the node as drained for its reboot: {e}");
                    result = "failed";
                }
            }
        }
        // `done` stays the namespace/name list built while evicting (the UIDs are for the
        // annotation only).
        let status = run.update(|s| {
            s.phase = phase as i32;
            s.error = error.clone();
        });
        match self.save(&params, phase, &done_list, &error).await {
            Ok(()) => {}
            Err(DrainError::Conflict(m)) => {
                // The claim is lost (adopted, cancelled or ended through the other process):
                // that record rules; this process records nothing and stands by.
                tracing::warn!(id = %params.id, "{m}; this process stops driving it");
                run.hand_over("another agent process on this node took over the drain");
                tokio::spawn(self.clone().stand_by(params.id.clone()));
                return;
            }
            Err(e) => tracing::error!(error = %e, "could not persist the drain's end on the node"),
        }
        let (reason, kind) = match phase {
            DrainPhase::Completed => ("DrainCompleted", "Normal"),
            _ => ("DrainFailed", "Warning"),
        };
        self.event(
            reason,
            kind,
            &format!(
                "drain {} (started by {}) {result}{}",
                params.id,
                params.principal,
                if error.is_empty() {
                    String::new()
                } else {
                    format!(": {error}")
                }
            ),
        )
        .await;
        self.metrics
            .drains
            .get_or_create(&vec![("result", result)])
            .inc();
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.remaining.set(0);
        tracing::info!(id = %params.id, result, error, "drain ended");
        // A rotation keeps its slot from here until the node is back from its reboot; the
        // boot ID is recorded before the stream says `completed`, so an orchestrator that
        // reboots at once never reboots a node whose return nobody will notice.
        if let Some(rotation) = params.rotation {
            match drained {
                Some(d) => {
                    let held = slot.lock().expect("not poisoned").take();
                    self.maintenance.awaiting_reboot(d, held).await;
                }
                None => self.maintenance.failed(&params.id, rotation, &error).await,
            }
        }
        run.emit(match phase {
            DrainPhase::Completed => Ev::Completed(status),
            DrainPhase::TimedOut => Ev::TimedOut(status),
            DrainPhase::Cancelled => Ev::Cancelled(status),
            _ => Ev::Failed(status),
        });
        // After the end is persisted and streamed: the next node starts only once this one is done.
        let held = slot.lock().expect("not poisoned").take();
        if let Some(guard) = held {
            guard.release().await;
        }
    }

    async fn drive(
        &self,
        run: &Arc<DrainRun>,
        params: &DrainParams,
        done: Arc<Mutex<HashSet<String>>>,
        slot: SlotCell,
    ) -> Result<(), Outcome> {
        let fail = |e: DrainError| Outcome::Failed(e.to_string());
        if self.config.fleet_lock.enabled && !params.bypass_fleet_lock {
            // Recorded before waiting, so an agent restarted while waiting for a slot resumes
            // the same drain instead of forgetting it.
            let done_before: Vec<String> =
                done.lock().expect("not poisoned").iter().cloned().collect();
            self.save(params, DrainPhase::Pending, &done_before, "")
                .await
                .map_err(fail)?;
            let cfg = &self.config.fleet_lock;
            let lock_name = format!("{}/{}*", cfg.namespace, cfg.name_prefix);
            let guard = lock::acquire(
                &self.client,
                cfg,
                &self.node,
                &self.shutdown,
                &self.metrics.lock,
                |held| {
                    run.emit(Ev::Waiting(pb::Waiting {
                        lock: lock_name.clone(),
                        holders: lock::describe(held),
                    }))
                },
            )
            .await
            .map_err(|e| Outcome::Failed(e.to_string()))?;
            *slot.lock().expect("not poisoned") = Some(guard);
        }
        let mut node_uid = String::new();
        if let Some(rotation) = params.rotation {
            node_uid = self.maintenance.draining(&params.id, rotation).await;
            self.mark_rotation_slot(params, &slot, &node_uid).await;
        }
        run.update(|s| s.phase = DrainPhase::Cordoning as i32);
        let done_now = || {
            done.lock()
                .expect("not poisoned")
                .iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        self.save(params, DrainPhase::Cordoning, &done_now(), "")
            .await
            .map_err(fail)?;
        self.set_unschedulable(true).await.map_err(fail)?;
        self.event(
            "DrainStarted",
            "Normal",
            &format!(
                "drain {} started by {} (requester {:?}): {}",
                params.id, params.principal, params.requester, params.reason
            ),
        )
        .await;

        let opts = params.plan_options().map_err(fail)?;
        // Rounds (#16-h, #16-i): every round plans from a fresh LIST of the node's pods and
        // evicts every evictable pod in it, the ones in the annotation's `done` list included
        // (a UID that is listed exists: `done` is no proof). The drain completes only when a
        // LIST taken after the last eviction shows none; pods that landed meanwhile are evicted
        // in the next round, until none are left or the deadline.
        let mut round = 1u32;
        loop {
            let plan = plan::plan(&self.list_pods().await.map_err(fail)?, &opts);
            if round == 1 {
                let status = run.update(|s| {
                    let planned = plan_status(params, DrainPhase::Evicting, &plan);
                    s.phase = DrainPhase::Evicting as i32;
                    s.plan = planned.plan;
                    s.skipped = planned.skipped;
                });
                run.emit(Ev::Planned(status));
            }
            if !plan.refused.is_empty() {
                let list: Vec<String> = plan
                    .refused
                    .iter()
                    .map(|(p, why)| format!("{p} {why}"))
                    .collect();
                return Err(Outcome::Failed(format!(
                    "cannot drain: {}",
                    list.join("; ")
                )));
            }
            if round == 1 {
                self.save(params, DrainPhase::Evicting, &done_now(), "")
                    .await
                    .map_err(fail)?;
            }
            let todo = plan.evict;
            if todo.is_empty() {
                return Ok(());
            }
            if round > 1 {
                tracing::info!(id = %params.id, round, pods = todo.len(), "pods on the node after the last eviction; evicting them too");
                run.update(|s| {
                    for p in &todo {
                        let key = p.to_pb();
                        if !s.plan.iter().any(|q| q.uid == key.uid) {
                            s.plan.push(key);
                        }
                    }
                });
            }
            if round > 2 {
                // A pod that keeps coming back (a controller re-creating it here): do not spin
                // on the API; the deadline ends this.
                tokio::time::sleep(self.config.retry_initial.get()).await;
            }
            self.metrics.remaining.set(todo.len() as i64);
            // Evictions run while the slot is watched: a lost slot pauses them (keep_slot).
            tokio::select! {
                r = self.evict_all(run, params, done.clone(), todo) => r?,
                r = self.keep_slot(run, params, &slot, &node_uid) => r?,
            }
            round += 1;
        }
    }

    /// Watches the drain's slot: when another node took it (renewals failed past the lease),
    /// evictions pause (none is posted; the stream says why) until a slot is held again.
    /// Returns only on a lock error.
    async fn keep_slot(
        &self,
        run: &DrainRun,
        params: &DrainParams,
        slot: &SlotCell,
        node_uid: &str,
    ) -> Result<(), Outcome> {
        let cfg = &self.config.fleet_lock;
        let lock_name = format!("{}/{}*", cfg.namespace, cfg.name_prefix);
        loop {
            let watched = slot
                .lock()
                .expect("not poisoned")
                .as_ref()
                .map(|g| (g.lost(), g.slot().to_string()));
            let Some((mut lost, name)) = watched else {
                return std::future::pending().await;
            };
            let _ = lost.wait_for(|l| *l).await;
            self.paused.send_replace(true);
            // Posts already sent finish (each bounded by the API call timeout); every later one
            // sees the pause (tokio's RwLock queues new readers behind this writer).
            drop(self.posting.write().await);
            tracing::warn!(slot = %name, "fleet lock: slot lost mid-drain; evictions paused");
            run.emit(Ev::Waiting(pb::Waiting {
                lock: lock_name.clone(),
                holders: format!(
                    "{name} lost mid-drain (renewals failed past the lease); evictions paused"
                ),
            }));
            let old = slot.lock().expect("not poisoned").take();
            if let Some(g) = old {
                // Another node holds it now: stop renewing, never clear its holder.
                g.abandon().await;
            }
            let guard = lock::acquire(
                &self.client,
                cfg,
                &self.node,
                &self.shutdown,
                &self.metrics.lock,
                |held| {
                    run.emit(Ev::Waiting(pb::Waiting {
                        lock: lock_name.clone(),
                        holders: lock::describe(held),
                    }))
                },
            )
            .await
            .map_err(|e| Outcome::Failed(e.to_string()))?;
            tracing::info!(slot = %guard.slot(), "fleet lock: slot held again; evictions resume");
            *slot.lock().expect("not poisoned") = Some(guard);
            if params.rotation.is_some() {
                self.mark_rotation_slot(params, slot, node_uid).await;
            }
            self.paused.send_replace(false);
        }
    }

    /// A rotation's slot is marked held across a reboot from its claim, not only from
    /// `awaiting-reboot`: an agent down mid-drain for longer than the lease must not let a
    /// second node cordon (#20-q). The return-by is the drain's deadline plus the rotation's
    /// return timeout (`drained` moves it to now plus the return timeout). A drain that ends
    /// without completing releases the slot (marks and all); the restarted agent of one that
    /// never ends lets go of it (maintenance: `draining` with an ended drain).
    async fn mark_rotation_slot(&self, params: &DrainParams, slot: &SlotCell, node_uid: &str) {
        let Some(rotation) = params.rotation else {
            return;
        };
        let Some(guard) = slot.lock().expect("not poisoned").take() else {
            return;
        };
        let mark = lock::Mark {
            return_by: state::unix(params.deadline).saturating_add(rotation.return_timeout_seconds),
            node_uid: node_uid.to_string(),
        };
        if let Err(e) = guard.hold_for_return(mark).await {
            tracing::warn!(slot = %guard.slot(), error = %e, "could not mark the rotation's slot as held yet; every renewal retries it");
        }
        *slot.lock().expect("not poisoned") = Some(guard);
    }

    /// Waits while the drain's slot is lost.
    async fn unpaused(&self) {
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|p| !*p).await;
    }

    async fn evict_all(
        &self,
        run: &Arc<DrainRun>,
        params: &DrainParams,
        done: Arc<Mutex<HashSet<String>>>,
        todo: Vec<PlannedPod>,
    ) -> Result<(), Outcome> {
        let fail = |e: DrainError| Outcome::Failed(e.to_string());
        // Classes strictly in order: leaders only once every other pod is gone.
        for class in [Class::NotReady, Class::Regular, Class::Leader] {
            let batch: Vec<PlannedPod> =
                todo.iter().filter(|p| p.class == class).cloned().collect();
            let results: Vec<Result<(), DrainError>> = futures::stream::iter(batch)
                .map(|pod| {
                    let done = done.clone();
                    async move {
                        self.evict_and_wait(run, params, &pod).await?;
                        let list = {
                            let mut d = done.lock().expect("not poisoned");
                            d.insert(pod.uid.clone());
                            d.iter().cloned().collect::<Vec<_>>()
                        };
                        run.update(|s| s.done.push(pod.key()));
                        self.metrics.remaining.dec();
                        self.save_progress(params, &list).await
                    }
                })
                .buffer_unordered(params.concurrency.max(1) as usize)
                .collect()
                .await;
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                return Err(fail(e));
            }
        }
        Ok(())
    }

    /// Evicts one pod, retrying budget refusals with backoff, then waits until it is gone.
    async fn evict_and_wait(
        &self,
        run: &DrainRun,
        params: &DrainParams,
        pod: &PlannedPod,
    ) -> Result<(), DrainError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let body = eviction(pod, params.grace_period_seconds);
        let post_params = PostParams::default();
        let mut backoff = self.config.retry_initial.get();
        let mut attempt = 0u32;
        self.fenced().await;
        run.emit(Ev::Evicting(pod.pod_ref()));
        loop {
            // The fleet-lock slot was lost: no eviction until it is held again.
            self.unpaused().await;
            // No eviction without a confirmed claim; none outlives it on this side either.
            let claim_left = self.fenced().await;
            let posting = self.posting.read().await;
            if *self.paused.borrow() {
                continue;
            }
            attempt += 1;
            let post = api.create_subresource::<_, serde_json::Value>(
                "eviction",
                &pod.name,
                &post_params,
                &body,
            );
            let outcome = tokio::time::timeout(API_CALL_TIMEOUT.min(claim_left), post).await;
            drop(posting);
            let wait = match outcome {
                Ok(Ok(_)) => {
                    self.metrics
                        .evictions
                        .get_or_create(&vec![("result", "evicted")])
                        .inc();
                    break;
                }
                Ok(Err(kube::Error::Api(s)))
                    if s.code == 409 && !self.gone_per_api(&api, pod).await.unwrap_or(false) =>
                {
                    // A 409 proves nothing by itself (the server may have lost a race updating
                    // the budget): the pod with this UID still exists, so evict it again.
                    self.count_retry("conflict");
                    tracing::info!(pod = %pod.key(), message = %s.message, "eviction conflicted and the pod still exists; retrying");
                    jitter(backoff)
                }
                Ok(Err(kube::Error::Api(s)))
                    if s.code == 404 && !self.gone_per_api(&api, pod).await.unwrap_or(false) =>
                {
                    // A 404 from the eviction POST is not proof (#16-g): a proxy or an API server
                    // still installing its routes answers 404 for a pod that runs. Only a GET of
                    // the pod (404, or another UID) proves it gone; until then, evict it again.
                    self.count_retry("error");
                    tracing::warn!(pod = %pod.key(), message = %s.message, "eviction answered 404 but the pod still exists; retrying");
                    jitter(backoff)
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => {
                    // Gone already (404 confirmed by the GET above), or the name now belongs to
                    // another UID (a 409 from the UID precondition, confirmed by the GET above).
                    self.metrics
                        .evictions
                        .get_or_create(&vec![("result", "already_gone")])
                        .inc();
                    self.unblock(run, pod);
                    run.emit(Ev::Deleted(pod.pod_ref()));
                    return Ok(());
                }
                Ok(Err(kube::Error::Api(s)))
                    if s.code == 429
                        && is_budget_refusal(&s)
                        && attempt > 1
                        && self.gone_per_api(&api, pod).await.unwrap_or(false) =>
                {
                    // The budget refuses the old UID's eviction although that pod is gone (a
                    // same-name replacement now counts against the budget): retrying would wait
                    // for the deadline. From the second refusal on, one GET settles it.
                    tracing::info!(pod = %pod.key(), "budget refusal for a pod that is gone; counted as gone");
                    self.metrics
                        .evictions
                        .get_or_create(&vec![("result", "already_gone")])
                        .inc();
                    self.unblock(run, pod);
                    run.emit(Ev::Deleted(pod.pod_ref()));
                    return Ok(());
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 429 && is_budget_refusal(&s) => {
                    let budget = budget_name(&s);
                    self.count_retry("pdb");
                    // The server's Retry-After when it gives one (today's API servers give it on
                    // APF throttling, not on budget refusals; a proxy or a future server may).
                    let wait = retry_after(&kube::Error::Api(s.clone()))
                        .unwrap_or_else(|| jitter(backoff));
                    self.blocked(run, pod, &budget, &s.message, attempt, wait, "DrainBlocked")
                        .await;
                    wait
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 429 => {
                    // API Priority and Fairness: the server is busy, no budget is involved.
                    self.count_retry("throttled");
                    let wait = retry_after(&kube::Error::Api(s.clone()))
                        .unwrap_or_else(|| jitter(backoff));
                    self.blocked(
                        run,
                        pod,
                        "",
                        &format!(
                            "throttled by the API server (429, retry after {wait:?}): {}",
                            s.message
                        ),
                        attempt,
                        wait,
                        "DrainThrottled",
                    )
                    .await;
                    wait
                }
                Ok(Err(kube::Error::Api(s))) if is_permanent(&s) => {
                    // Retrying cannot help (RBAC, a malformed or invalid request, a pod under
                    // two budgets, a namespace being deleted): fail now, naming the cause.
                    if s.code == 403
                        && has_cause(&s, "NamespaceTerminating")
                        && self.terminating(&api, pod).await
                    {
                        // As kubectl: a pod already being deleted in a terminating namespace
                        // cannot be evicted, but it will go; wait for it.
                        break;
                    }
                    return Err(DrainError::Evict(format!(
                        "evicting {}: {} {}: {}",
                        pod.key(),
                        s.code,
                        s.reason,
                        s.message
                    )));
                }
                Ok(Err(e)) => {
                    self.count_retry("error");
                    tracing::warn!(pod = %pod.key(), error = %e, "eviction failed; retrying");
                    retry_after(&e).unwrap_or_else(|| jitter(backoff))
                }
                Err(_) => {
                    self.count_retry("error");
                    tracing::warn!(pod = %pod.key(), "eviction call timed out; retrying");
                    jitter(backoff)
                }
            };
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.config.retry_max.get());
        }
        self.unblock(run, pod);
        self.wait_gone(&api, pod).await?;
        run.emit(Ev::Deleted(pod.pod_ref()));
        Ok(())
    }

    fn count_retry(&self, reason: &'static str) {
        self.metrics
            .retries
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Records why `pod` waits: in `status.error` (only while it is true), on the stream, and as
    /// one Kubernetes Event per budget (or one for API throttling) per drain.
    #[allow(clippy::too_many_arguments)]
    async fn blocked(
        &self,
        run: &DrainRun,
        pod: &PlannedPod,
        budget: &str,
        message: &str,
        attempt: u32,
        wait: Duration,
        event_reason: &str,
    ) {
        let why = if budget.is_empty() {
            format!("{} {message}", pod.key())
        } else {
            format!("{} blocked by {budget}: {message}", pod.key())
        };
        let error = {
            let mut b = self.blockers.lock().expect("not poisoned");
            b.insert(pod.key(), why.clone());
            b.values().cloned().collect::<Vec<_>>().join("; ")
        };
        run.update(|st| st.error = error);
        let event_key = if budget.is_empty() {
            event_reason
        } else {
            budget
        };
        let first = self
            .blocked_events
            .lock()
            .expect("not poisoned")
            .insert(event_key.to_string());
        if first {
            self.event(event_reason, "Warning", &format!("evicting {why}"))
                .await;
        }
        run.emit(Ev::Blocked(pb::Blocked {
            pod: Some(pod.pod_ref()),
            budget: budget.to_string(),
            message: message.to_string(),
            attempt,
            retry_in: prost_types::Duration::try_from(wait).ok(),
        }));
    }

    /// `pod` no longer waits: its reason leaves `status.error`.
    fn unblock(&self, run: &DrainRun, pod: &PlannedPod) {
        let error = {
            let mut b = self.blockers.lock().expect("not poisoned");
            if b.remove(&pod.key()).is_none() {
                return;
            }
            b.values().cloned().collect::<Vec<_>>().join("; ")
        };
        run.update(|st| st.error = error);
    }

    /// True when the pod (this UID) exists and is already being deleted.
    async fn terminating(&self, api: &Api<Pod>, pod: &PlannedPod) -> bool {
        matches!(
            call("GET pod", || api.get_opt(&pod.name)).await,
            Ok(Some(p)) if p.metadata.uid.as_deref() == Some(pod.uid.as_str())
                && p.metadata.deletion_timestamp.is_some()
        )
    }

    /// Waits until no pod with this UID exists. Only a GET proves it (404, or the name now
    /// belongs to another UID): the pod watch is a wake-up hint, never the proof, because after
    /// a restart its store may not have synced yet and every pod is absent from an empty store.
    /// A GET that fails is retried at the next poll: waiting tolerates API errors.
    async fn wait_gone(&self, api: &Api<Pod>, pod: &PlannedPod) -> Result<(), DrainError> {
        let mut changes = self.pods.as_ref().map(|(_, rx)| rx.clone());
        let absent_from_watch = || {
            self.pods.as_ref().is_some_and(|(store, _)| {
                !store
                    .state()
                    .iter()
                    .any(|p| p.metadata.uid.as_deref() == Some(pod.uid.as_str()))
            })
        };
        let mut poll = tokio::time::interval(self.config.deletion_poll.get());
        poll.tick().await;
        // The first look is a GET unless the watch still shows the pod: a pod just evicted sits
        // out its grace period, and that GET would only ever say "still there" (one wasted GET
        // per pod). An empty or unsynced store (after a restart) shows nothing, so it GETs.
        let mut check = self.pods.is_none() || absent_from_watch();
        loop {
            if check {
                match self.gone_per_api(api, pod).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(pod = %pod.key(), error = %e, "could not check whether the pod is gone; checking again")
                    }
                }
            }
            check = match changes.as_mut() {
                Some(rx) => tokio::select! {
                    r = rx.changed() => {
                        if r.is_err() {
                            changes = None;
                        }
                        absent_from_watch()
                    }
                    _ = poll.tick() => true,
                },
                None => {
                    poll.tick().await;
                    true
                }
            };
        }
    }

    /// True when the API has no pod of that name with that UID.
    async fn gone_per_api(&self, api: &Api<Pod>, pod: &PlannedPod) -> Result<bool, DrainError> {
        Ok(match call("GET pod", || api.get_opt(&pod.name)).await? {
            None => true,
            Some(p) => {
                p.metadata.uid.as_deref() != Some(pod.uid.as_str())
                    // kubectl's --skip-wait-for-delete-timeout: Terminating for too long (a
                    // finalizer that never goes) counts as done, as kubectl's waitForDelete.
                    || plan::terminating_longer_than(&p, self.skip_wait_for_delete())
            }
        })
    }

    /// The running drain's --skip-wait-for-delete-timeout.
    fn skip_wait_for_delete(&self) -> Option<Duration> {
        *self.skip_wait.lock().expect("not poisoned")
    }
}

/// The `policy/v1` Eviction of one pod: its grace period (when the request gave one) and a UID
/// precondition, so a same-name replacement is never evicted in its place.
///
/// Posted with `create_subresource`, not kube's `Api::evict`: kube-core 5.0.0 (`Request::evict`)
/// serialises the options under the key `delete_options` and sends no apiVersion/kind, so a real
/// API server drops them as an unknown field (docs/operations.md, "Eviction on the wire").
pub fn eviction(pod: &PlannedPod, grace_period_seconds: Option<i64>) -> Eviction {
    Eviction {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            ..Default::default()
        },
        delete_options: Some(DeleteOptions {
            grace_period_seconds,
            preconditions: Some(Preconditions {
                uid: Some(pod.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        }),
    }
}

/// Wakes the maintenance sweep of marked slots when dropped (a drain run ended).
struct RecheckSlots(Arc<Maintenance>);

impl Drop for RecheckSlots {
    fn drop(&mut self) {
        self.0.recheck_slots();
    }
}

/// Where `drive` leaves the fleet-lock slot it took, for `run` to release.
type SlotCell = Arc<Mutex<Option<lock::SlotGuard>>>;

enum Outcome {
    TimedOut,
    Cancelled,
    Failed(String),
}

fn plan_status(params: &DrainParams, phase: DrainPhase, plan: &plan::Plan) -> pb::DrainStatus {
    pb::DrainStatus {
        id: params.id.clone(),
        phase: phase as i32,
        reason: params.reason.clone(),
        requester: params.requester.clone(),
        principal: params.principal.clone(),
        started_at: Some(params.started.into()),
        deadline: Some(params.deadline.into()),
        plan: plan.evict.iter().map(PlannedPod::to_pb).collect(),
        skipped: plan
            .skipped
            .iter()
            .map(|(ns, name, reason)| pb::SkippedPod {
                namespace: ns.clone(),
                name: name.clone(),
                reason: reason.clone(),
            })
            .collect(),
        done: Vec::new(),
        error: plan
            .refused
            .iter()
            .map(|(p, why)| format!("{p} {why}"))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// A 429 from a PodDisruptionBudget (a `DisruptionBudget` cause, or the eviction handler's
/// message), as opposed to API Priority and Fairness throttling.
fn is_budget_refusal(s: &kube::core::Status) -> bool {
    has_cause(s, "DisruptionBudget") || s.message.contains("disruption budget")
}

fn has_cause(s: &kube::core::Status, reason: &str) -> bool {
    s.details
        .as_ref()
        .is_some_and(|d| d.causes.iter().any(|c| c.reason == reason))
}

/// Eviction answers that no retry can change: 400, 401, 403, 405, 415, 422, and the eviction
/// handler's "more than one PodDisruptionBudget" 500.
fn is_permanent(s: &kube::core::Status) -> bool {
    matches!(s.code, 400 | 401 | 403 | 405 | 415 | 422)
        || (s.code == 500 && s.message.contains("more than one PodDisruptionBudget"))
}

/// The budget named in a 429's causes (reason DisruptionBudget), else the message.
fn budget_name(s: &kube::core::Status) -> String {
    let json = serde_json::to_value(s).unwrap_or_default();
    let causes = json
        .pointer("/details/causes")
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    // The API server's message reads "The disruption budget <name> needs N healthy pods...".
    let names: Vec<String> = causes
        .iter()
        .filter(|c| c["reason"] == "DisruptionBudget")
        .filter_map(|c| {
            let m = c["message"].as_str()?;
            let mut words = m.split_whitespace();
            words.by_ref().find(|w| *w == "budget");
            Some(words.next().unwrap_or(m).to_string())
        })
        .collect();
    if names.is_empty() {
        format!("PodDisruptionBudget ({})", s.message)
    } else {
        names.join(", ")
    }
}

/// Full jitter in [d/2, d): thousands of agents retrying the same budget do not line up.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let frac = 0.5 + (nanos % 1000) as f64 / 2000.0;
    d.mul_f64(frac)
}

/// Labels of a planned pod, for tests and status (namespace/name -> class).
pub fn classes(plan: &pb::DrainStatus) -> BTreeMap<String, String> {
    plan.plan
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.class.clone()))
        .collect()
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod engine_tests;
