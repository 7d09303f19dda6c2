//! The fleet lock: at most `slots` nodes drain at once across the cluster, enforced with
//! `coordination.k8s.io/v1` Leases, one per slot (`{namePrefix}{i}` in `namespace`).
//!
//! A slot is taken when its Lease is absent (create), has no holder, is held by this node
//! already (a restarted agent takes its own slot back), or has expired (`renewTime +
//! leaseDurationSeconds` is in the past: its holder crashed). Every take is a
//! resourceVersion-guarded PUT, so of two agents racing for the same slot exactly one wins (the
//! other gets a 409 and tries the next slot). The holder renews every `leaseDuration / 3` and
//! clears `holderIdentity` when its drain ends.
//!
//! A rotation (issue #20) keeps its slot from cordon to the node's return after its reboot: the
//! holder marks the Lease with `nodekeeper.io/return-by` (unix seconds) from the claim (#20-q),
//! and such a Lease stays held while its holder is set, renewed or not (nobody renews during the
//! reboot), whether its value parses or not (#20-n). A take from another holder drops that
//! holder's marks (#20-p). The agent that starts after the reboot takes it back (`reclaim`, the holder identity
//! is the node, not the process) and clears it once the node is back. A holder past its
//! return-by keeps the slot; a node waiting for it records a `MaintenanceOverdue` Event on the
//! holder's Node, once per wait.
//!
//! Only `release` frees a slot a guard holds: a dropped guard only stops renewing (the holder
//! identity is the node, so another guard of the same node may hold the same slot). Failed
//! renewals, marks and releases are retried. A marked slot no guard renews any more is freed
//! by the maintenance sweep once the node's rotation is over (`marked_slots`, `free_as_read`,
//! #20-s).
//!
//! Never takes a slot whose holder renewed within its lease duration, never deletes a Lease, and
//! never writes Leases outside its own names (it lists the namespace's Leases to find this
//! node's slot among all of them, one above a lowered `slots` included, #20-m). Expiry compares the holder's `renewTime` with this
//! node's clock, so clocks must agree to well within the lease duration (NTP does that).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigDuration;
use crate::kube::API_CALL_TIMEOUT;

/// One node at a time is the safe default for a rotation: capacity drops by one node only.
pub const DEFAULT_SLOTS: u32 = 1;
/// The agent's own namespace (the base manifests install there and grant Leases only there).
pub const DEFAULT_NAMESPACE: &str = "nodekeeper-system";
/// Kubernetes' own leader-election default is 15 s; 30 s tolerates a slow API server for two
/// renewals in a row, and a crashed holder's slot is free again half a minute later.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(30);
/// Slot Leases are `nodekeeper-drain-slot-0`, `-1`, ...
pub const DEFAULT_NAME_PREFIX: &str = "nodekeeper-drain-slot-";
/// First wait when every slot is held; doubles (with jitter) up to a third of the lease duration.
const WAIT_INITIAL: Duration = Duration::from_millis(500);
/// A 409 on release/renew means our read was stale: re-read and retry this many times.
const CONFLICT_RETRIES: u32 = 3;
/// On a slot Lease: the holder's node is being rebooted and should be back by then (unix s).
pub const RETURN_BY_ANNOTATION: &str = "nodekeeper.io/return-by";
/// On a slot Lease marked with a return-by: the holder Node's metadata.uid when it was marked.
/// A Node of the same name with another UID is a replacement: it frees the slot (#20-i).
pub const HOLDER_UID_ANNOTATION: &str = "nodekeeper.io/holder-uid";
/// A failed renewal (or return-by mark) is retried after this fraction of the renewal period:
/// a mark that did not land must land before the node goes down for its reboot.
const RETRY_DIVISOR: u32 = 4;
/// The shortest wait between two renewal attempts.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Release retries back off up to this: a marked slot that is never cleared is held forever.
const RELEASE_RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a release keeps retrying before it gives up (and says so: a marked slot then stays
/// held until a person clears it, an unmarked one frees when its lease expires).
const RELEASE_RETRY_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FleetLockConfig {
    /// Take a slot before cordoning; off by default (a single orchestrator may pace drains itself).
    pub enabled: bool,
    /// How many nodes may drain at once.
    pub slots: u32,
    /// Namespace of the slot Leases.
    pub namespace: String,
    /// How long a slot stays held without renewal (a crashed holder's slot frees after this).
    pub lease_duration: ConfigDuration,
    /// Slot `i` is the Lease `{namePrefix}{i}`.
    pub name_prefix: String,
}

impl Default for FleetLockConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            slots: DEFAULT_SLOTS,
            namespace: DEFAULT_NAMESPACE.to_string(),
            lease_duration: ConfigDuration(DEFAULT_LEASE_DURATION),
            name_prefix: DEFAULT_NAME_PREFIX.to_string(),
        }
    }
}

impl FleetLockConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.slots == 0 || self.slots > 1000 {
            out.push((
                "drain.fleetLock.slots".into(),
                format!("{} is out of range (1..=1000)", self.slots),
            ));
        }
        if !is_dns_label(&self.namespace) {
            out.push((
                "drain.fleetLock.namespace".into(),
                format!("{:?} is not a namespace name (DNS label)", self.namespace),
            ));
        }
        let d = self.lease_duration.get();
        if d < Duration::from_secs(1) || d > Duration::from_secs(3600) || d.subsec_nanos() != 0 {
            out.push((
                "drain.fleetLock.leaseDuration".into(),
                format!(
                    "{} is out of range (whole seconds, 1s..=1h)",
                    self.lease_duration
                ),
            ));
        }
        // The longest name is the prefix plus the last slot's number; Lease names are DNS subdomains.
        let longest = format!("{}{}", self.name_prefix, self.slots.saturating_sub(1));
        if self.name_prefix.is_empty() || !is_dns_subdomain(&longest) {
            out.push((
                "drain.fleetLock.namePrefix".into(),
                format!(
                    "{:?} does not make valid Lease names (lowercase DNS subdomain: {longest:?})",
                    self.name_prefix
                ),
            ));
        }
        out
    }

    pub fn slot_name(&self, i: u32) -> String {
        format!("{}{i}", self.name_prefix)
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The Kubernetes API refused or failed a call (RBAC, a missing namespace, ...).
    #[error("fleet lock: kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("fleet lock: {0} took longer than {API_CALL_TIMEOUT:?}")]
    Timeout(String),
    /// The token was cancelled while waiting for a slot.
    #[error("fleet lock: cancelled while waiting for a slot")]
    Cancelled,
}

impl LockError {
    /// Low-cardinality label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            LockError::Api(_) => "api",
            LockError::Timeout(_) => "timeout",
            LockError::Cancelled => "cancelled",
        }
    }
}

async fn call<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, LockError> {
    match tokio::time::timeout(API_CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(LockError::Timeout(what.to_string())),
    }
}

/// A failure a busy or restarting API server gives, worth asking again (engine's rule, plus
/// this module's own call timeout).
fn retryable(e: &LockError) -> bool {
    match e {
        LockError::Api(e) => super::engine::transient(e),
        LockError::Timeout(_) => true,
        LockError::Cancelled => false,
    }
}

fn is_conflict(e: &LockError) -> bool {
    matches!(e, LockError::Api(kube::Error::Api(s)) if s.code == 409)
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Who holds a slot, for the `Waiting` event: `nodekeeper-drain-slot-0=node-a`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub slot: String,
    pub holder: String,
    /// The holder is being rebooted and is past its return-by time.
    pub overdue: bool,
}

fn unix_now() -> u64 {
    k8s_openapi::jiff::Timestamp::now().as_second().max(0) as u64
}

/// The return-by time of a slot held across its node's reboot.
pub fn return_by(lease: &Lease) -> Option<u64> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(RETURN_BY_ANNOTATION)?
        .parse()
        .ok()
}

/// Whether a slot Lease carries a return-by mark, readable or not. A mark that does not parse
/// (edited by hand: a date, a number past u64) still marks the slot as held across a reboot:
/// reading it as "no mark" would let the slot expire while its node is down (#20-n).
pub fn marked(lease: &Lease) -> bool {
    lease
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(RETURN_BY_ANNOTATION))
}

/// The holder of a Lease, when it is held by someone and has not expired (or is held across its
/// node's reboot, which never expires).
pub fn live_holder(lease: &Lease) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
    if marked(lease) {
        return Some(holder);
    }
    let last = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    let expires = last.0.as_second().saturating_add(duration);
    (expires >= k8s_openapi::jiff::Timestamp::now().as_second()).then_some(holder)
}

/// A lease spec held by `identity` from now, counting a transition when the holder changes.
fn held_by(previous: Option<&LeaseSpec>, identity: &str, duration: Duration) -> LeaseSpec {
    let same = previous.and_then(|s| s.holder_identity.as_deref()) == Some(identity);
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(duration.as_secs().min(i32::MAX as u64) as i32),
        acquire_time: if same {
            previous
                .and_then(|s| s.acquire_time.clone())
                .or(Some(now()))
        } else {
            Some(now())
        },
        renew_time: Some(now()),
        lease_transitions: Some(if same || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..previous.cloned().unwrap_or_default()
    }
}

/// Tries slot `name` once: `Ok(Ok(lease))` when taken, `Ok(Err(held))` when someone else holds
/// it (or won a race for it just now).
async fn try_slot(
    api: &Api<Lease>,
    cfg: &FleetLockConfig,
    name: &str,
    identity: &str,
) -> Result<Result<Lease, Held>, LockError> {
    let racing = || Held {
        slot: name.to_string(),
        holder: "(a racing agent)".to_string(),
        overdue: false,
    };
    // Two rounds: a 409 on create means another agent created it between our GET and POST.
    for _ in 0..2 {
        match call("GET lease", api.get_opt(name)).await? {
            None => {
                let lease = Lease {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.to_string()),
                        namespace: Some(cfg.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(held_by(None, identity, cfg.lease_duration.get())),
                };
                match call("POST lease", api.create(&PostParams::default(), &lease)).await {
                    Ok(l) => return Ok(Ok(l)),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            Some(lease) => {
                match live_holder(&lease) {
                    Some(h) if h != identity => {
                        if marked(&lease) && return_by(&lease).is_none() {
                            tracing::warn!(slot = %name, holder = %h, "fleet lock: the slot's return-by mark does not parse; it counts as held until its holder releases it (or a person clears holderIdentity)");
                        }
                        return Ok(Err(Held {
                            slot: name.to_string(),
                            holder: h,
                            overdue: return_by(&lease).is_some_and(|t| t < unix_now()),
                        }));
                    }
                    _ => {}
                }
                let mut next = lease.clone();
                let ours = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(identity);
                if !ours {
                    // A fresh take: the marks of an earlier holder (a hand-cleared holder keeps
                    // its return-by and holder-uid) are not this node's (#20-p).
                    set_return_by(&mut next, None);
                }
                next.spec = Some(held_by(
                    lease.spec.as_ref(),
                    identity,
                    cfg.lease_duration.get(),
                ));
                // `replace` sends metadata.resourceVersion: a stale read is a 409, not a steal.
                return match call(
                    "PUT lease",
                    api.replace(name, &PostParams::default(), &next),
                )
                .await
                {
                    Ok(l) => Ok(Ok(l)),
                    Err(e) if is_conflict(&e) => Ok(Err(racing())),
                    Err(e) => Err(e),
                };
            }
        }
    }
    Ok(Err(racing()))
}

// === metrics ===

/// The fleet lock as this node sees it (issue #20): how often and how long it waited for a slot,
/// and whether it holds one now (from cordon to return, across the reboot).
#[derive(Debug, Clone)]
pub struct LockMetrics {
    pub waits: Counter,
    pub wait_seconds: Histogram,
    pub held: Gauge,
}

impl LockMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            waits: Counter::default(),
            // From an instant slot to a rotation's worth of other nodes ahead.
            wait_seconds: Histogram::new([
                0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
            ]),
            held: Gauge::default(),
        };
        registry.register(
            "fleet_lock_waits",
            "Fleet-lock slot requests that found every slot held and had to wait",
            m.waits.clone(),
        );
        registry.register_with_unit(
            "fleet_lock_wait",
            "Time from asking for a fleet-lock slot to holding one (every request)",
            Unit::Seconds,
            m.wait_seconds.clone(),
        );
        registry.register(
            "fleet_lock_slot_held",
            "1 while this node holds a fleet-lock slot (a rotation: from cordon until it is back)",
            m.held.clone(),
        );
        m
    }
}

/// Takes a free slot, waiting (with jittered backoff) while all are held. `on_wait` is called
/// with the current holders whenever they differ from the last report (first wait included).
pub async fn acquire(
    client: &Client,
    cfg: &FleetLockConfig,
    identity: &str,
    token: &CancellationToken,
    metrics: &LockMetrics,
    mut on_wait: impl FnMut(&[Held]),
) -> Result<SlotGuard, LockError> {
    let asked = std::time::Instant::now();
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let cap = (cfg.lease_duration.get() / 3).max(WAIT_INITIAL);
    let mut wait = WAIT_INITIAL;
    let mut reported: Option<Vec<Held>> = None;
    let mut overdue_reported = std::collections::HashSet::new();
    loop {
        let mut holders = Vec::new();
        // A transient API failure in this round (503, 429, a timeout): asked again after the
        // wait, never the end of the drain (adversary #20c).
        let mut failed: Option<LockError> = None;
        // A slot this node holds already (a second rotation of a node awaiting its reboot) is
        // reused: a node never holds two slots (#20-g).
        let mut order: Vec<String> = Vec::new();
        for i in 0..cfg.slots {
            let name = cfg.slot_name(i);
            // One slot: nothing to order (and no extra read).
            let ours = if cfg.slots > 1 {
                match call("GET lease", api.get_opt(&name)).await {
                    Ok(lease) => lease
                        .and_then(|l| l.spec?.holder_identity)
                        .is_some_and(|h| h == identity),
                    Err(e) if retryable(&e) => {
                        failed = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                false
            };
            if ours {
                order.insert(0, name);
            } else {
                order.push(name);
            }
        }
        let order = if failed.is_some() { Vec::new() } else { order };
        for name in order {
            let attempt = match try_slot(&api, cfg, &name, identity).await {
                Ok(attempt) => attempt,
                Err(e) if retryable(&e) => {
                    failed = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            };
            match attempt {
                Ok(lease) => {
                    tracing::info!(slot = %name, transitions = ?lease.spec.as_ref().and_then(|s| s.lease_transitions), "fleet lock: slot taken");
                    metrics.wait_seconds.observe(asked.elapsed().as_secs_f64());
                    return Ok(SlotGuard::start(
                        api,
                        name,
                        identity.to_string(),
                        cfg.lease_duration.get(),
                        metrics.held.clone(),
                    ));
                }
                Err(held) => {
                    if held.overdue && overdue_reported.insert(held.holder.clone()) {
                        tracing::warn!(slot = %held.slot, holder = %held.holder, "fleet lock: the holder did not come back from its reboot in time; it keeps the slot");
                        crate::kube::node_event(
                            client,
                            &held.holder,
                            "MaintenanceOverdue",
                            "Warning",
                            &format!(
                                "{} is past its return-by time after a reboot and still holds the fleet-lock slot {}; {identity} waits for it (clear the Lease's holderIdentity to free it)",
                                held.holder, held.slot
                            ),
                        )
                        .await;
                    }
                    holders.push(held)
                }
            }
        }
        if let Some(e) = failed {
            // The round saw only some slots: nothing to report to the waiting caller.
            tracing::warn!(error = %e, "fleet lock: the API failed while asking for a slot; asking again");
        } else {
            if reported.is_none() {
                metrics.waits.inc();
            }
            if reported.as_ref() != Some(&holders) {
                tracing::info!(holders = %describe(&holders), "fleet lock: every slot is held; waiting");
                on_wait(&holders);
                reported = Some(holders);
            }
        }
        tokio::select! {
            _ = token.cancelled() => return Err(LockError::Cancelled),
            _ = tokio::time::sleep(jitter(wait)) => {}
        }
        wait = (wait * 2).min(cap);
    }
}

/// `slot=holder, slot=holder`
pub fn describe(holders: &[Held]) -> String {
    holders
        .iter()
        .map(|h| format!("{}={}", h.slot, h.holder))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Full jitter in [d/2, d): agents waiting for the same slots do not poll in step.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
}

// === impl SlotGuard ===

/// A held slot, renewed in the background every `leaseDuration / 3` until released.
#[derive(Debug)]
pub struct SlotGuard {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// Turns true when a renewal finds another holder: the slot is gone.
    lost: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
    renewer: Option<tokio::task::JoinHandle<()>>,
    done: bool,
    /// `nodekeeper_fleet_lock_slot_held`: up while this guard holds its slot.
    held: Gauge,
    /// The return-by mark every renewal writes (held across the reboot), once set.
    mark: std::sync::Arc<std::sync::Mutex<Option<Mark>>>,
}

/// The mark of a slot held across its node's reboot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// Unix seconds by which the node should be back.
    pub return_by: u64,
    /// The holder Node's metadata.uid (empty: unknown).
    pub node_uid: String,
}

impl SlotGuard {
    fn start(
        api: Api<Lease>,
        name: String,
        identity: String,
        duration: Duration,
        held: Gauge,
    ) -> Self {
        held.inc();
        let stop = CancellationToken::new();
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let mark = std::sync::Arc::new(std::sync::Mutex::new(None));
        let renewer = tokio::spawn(renew_loop(
            api.clone(),
            name.clone(),
            identity.clone(),
            duration,
            stop.clone(),
            lost_tx,
            mark.clone(),
        ));
        Self {
            api,
            name,
            identity,
            lost,
            stop,
            renewer: Some(renewer),
            done: false,
            held,
            mark,
        }
    }

    /// Released, abandoned or dropped: this guard no longer counts as held.
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.held.dec();
        }
    }

    /// The slot's Lease name.
    pub fn slot(&self) -> &str {
        &self.name
    }

    /// Turns true when another node took the slot (renewals failed for longer than the lease
    /// duration); it never turns back.
    pub fn lost(&self) -> tokio::sync::watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Marks the slot as held across this node's reboot: it stays held, renewed or not, until
    /// `release` (by the agent that starts after the reboot). The mark is written now and by
    /// every renewal after, so an error here is retried by the renewals (every
    /// `leaseDuration / 12` while they fail) rather than lost (#20-g); the error is returned
    /// for the log.
    pub async fn hold_for_return(&self, mark: Mark) -> Result<(), LockError> {
        *self.mark.lock().expect("not poisoned") = Some(mark.clone());
        annotate(&self.api, &self.name, &self.identity, Some(&mark)).await
    }

    /// Removes the return-by mark (a superseded rotation): the slot is then an ordinary drain
    /// slot, held while someone renews it. Retried on conflicts; errors are returned.
    pub async fn unmark(&self) -> Result<(), LockError> {
        *self.mark.lock().expect("not poisoned") = None;
        annotate(&self.api, &self.name, &self.identity, None).await
    }

    /// Stops renewing and clears `holderIdentity`, so a waiting node takes the slot at once.
    /// A failed clear is retried with backoff (up to ten minutes): a marked slot never expires,
    /// so giving up at the first error would keep it held forever.
    pub async fn release(mut self) {
        self.finish();
        self.stop_renewing().await;
        let started = std::time::Instant::now();
        let mut wait = WAIT_INITIAL;
        loop {
            match clear(&self.api, &self.name, &self.identity).await {
                Ok(()) => {
                    tracing::info!(slot = %self.name, "fleet lock: slot released");
                    return;
                }
                Err(e) if started.elapsed() < RELEASE_RETRY_FOR => {
                    tracing::warn!(slot = %self.name, error = %e, ?wait, "fleet lock: could not release the slot; retrying");
                }
                Err(e) => {
                    tracing::error!(slot = %self.name, error = %e, "fleet lock: could not release the slot; this release gives up (an unmarked slot frees when its lease expires, a marked one is freed by the agent's sweep once the API answers, #20-s)");
                    return;
                }
            }
            tokio::time::sleep(jitter(wait)).await;
            wait = (wait * 2).min(RELEASE_RETRY_MAX);
        }
    }

    /// Stops renewing but keeps the holder (agent shutdown mid-drain): the restarted agent takes
    /// its own slot back, and if it never comes back the slot frees when the lease expires.
    pub async fn abandon(mut self) {
        self.finish();
        self.stop_renewing().await;
    }

    async fn stop_renewing(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.renewer.take() {
            let _ = h.await;
        }
    }
}

impl Drop for SlotGuard {
    /// A guard dropped without `release` only stops renewing, as `abandon` does: never an
    /// implicit release (#20-g). Its holder stays; an unmarked slot frees when its lease
    /// expires, a marked one stays held for the node's return. The holder identity is the
    /// node, so another guard of this node may hold the same slot: clearing it here would free
    /// that one's slot too.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.finish();
        self.stop.cancel();
    }
}

async fn renew_loop(
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    stop: CancellationToken,
    lost: tokio::sync::watch::Sender<bool>,
    mark: std::sync::Arc<std::sync::Mutex<Option<Mark>>>,
) {
    let every = duration / 3;
    let retry = (every / RETRY_DIVISOR).max(RETRY_MIN);
    let mut next = every;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
        let want = mark.lock().expect("not poisoned").clone();
        match renew(&api, &name, &identity, duration, want.as_ref()).await {
            Ok(true) => {
                tracing::debug!(slot = %name, "fleet lock: renewed");
                next = every;
            }
            Ok(false) => {
                tracing::error!(slot = %name, "fleet lock: the slot was taken over (renewals failed for longer than the lease duration); evictions pause until a slot is held again");
                let _ = lost.send(true);
                return;
            }
            Err(e) => {
                tracing::warn!(slot = %name, error = %e, ?retry, "fleet lock: renewal failed; retrying");
                next = retry;
            }
        }
    }
}

/// The slot Leases that may hold this node's slot: `0..slots` of the current config and every
/// other `{namePrefix}{i}` Lease that exists, in slot order. A slot taken while `slots` was
/// higher (lowered by a config rollout mid-rotation) must still be found, or its mark keeps it
/// held forever (#20-m). Without RBAC to list Leases (an older Role), only `0..slots`.
async fn slot_names(api: &Api<Lease>, cfg: &FleetLockConfig) -> Result<Vec<String>, LockError> {
    let mut slots: std::collections::BTreeSet<u32> = (0..cfg.slots).collect();
    match call("LIST leases", api.list(&ListParams::default())).await {
        Ok(list) => slots.extend(
            list.items
                .iter()
                .filter_map(|l| slot_index(cfg, l.metadata.name.as_deref()?)),
        ),
        Err(LockError::Api(kube::Error::Api(s))) if s.code == 403 => {
            tracing::warn!(namespace = %cfg.namespace, "fleet lock: cannot list the slot Leases (RBAC: the Role lacks `list` on leases); only slots below drain.fleetLock.slots are searched for this node's slot");
        }
        Err(e) => return Err(e),
    }
    Ok(slots.into_iter().map(|i| cfg.slot_name(i)).collect())
}

/// The slot number of Lease `name`, when it is one of this config's slot names.
fn slot_index(cfg: &FleetLockConfig, name: &str) -> Option<u32> {
    let i: u32 = name.strip_prefix(cfg.name_prefix.as_str())?.parse().ok()?;
    (cfg.slot_name(i) == name).then_some(i)
}

/// The slot this node (`identity`) still holds, taken back and renewed from now on: after an
/// agent restart or the node's reboot. `None` when it holds none.
pub async fn reclaim(
    client: &Client,
    cfg: &FleetLockConfig,
    identity: &str,
    metrics: &LockMetrics,
) -> Result<Option<SlotGuard>, LockError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    for name in slot_names(&api, cfg).await? {
        if renew(&api, &name, identity, cfg.lease_duration.get(), None).await? {
            tracing::info!(slot = %name, "fleet lock: took this node's slot back");
            return Ok(Some(SlotGuard::start(
                api,
                name,
                identity.to_string(),
                cfg.lease_duration.get(),
                metrics.held.clone(),
            )));
        }
    }
    Ok(None)
}

/// Whether the Lease's holder renewed it within its lease duration: a live guard renews every
/// third of it, so a slot renewed this recently may belong to a drain or return that runs now
/// (in this process, the other agent process of the node, or one that just took it).
pub fn renewed_within_lease(lease: &Lease) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    let Some(last) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return false;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    last.0.as_second().saturating_add(duration) >= k8s_openapi::jiff::Timestamp::now().as_second()
}

/// The holder Node's UID recorded with a Lease's mark (#20-i), when there is one.
pub fn marked_uid(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(HOLDER_UID_ANNOTATION)
        .map(String::as_str)
        .filter(|u| !u.is_empty())
}

/// The slot Leases held by this node (`identity`) and marked across a reboot, as read now,
/// among every slot Lease (#20-m): one LIST, or a GET of each slot below `slots` when the
/// Role does not allow listing.
pub async fn marked_slots(
    client: &Client,
    cfg: &FleetLockConfig,
    identity: &str,
) -> Result<Vec<Lease>, LockError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let ours = |l: &Lease| {
        l.metadata
            .name
            .as_deref()
            .is_some_and(|n| slot_index(cfg, n).is_some())
            && l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(identity)
            && marked(l)
    };
    match call("LIST leases", api.list(&ListParams::default())).await {
        Ok(list) => Ok(list.items.into_iter().filter(ours).collect()),
        Err(LockError::Api(kube::Error::Api(s))) if s.code == 403 => {
            let mut out = Vec::new();
            for i in 0..cfg.slots {
                if let Some(l) = call("GET lease", api.get_opt(&cfg.slot_name(i))).await?
                    && ours(&l)
                {
                    out.push(l);
                }
            }
            Ok(out)
        }
        Err(e) => Err(e),
    }
}

/// Frees a slot Lease as read (`lease`): clears the holder and the marks with a PUT guarded by
/// the resourceVersion read, so a slot renewed or taken since is left alone (`Ok(false)`).
pub async fn free_as_read(
    client: &Client,
    cfg: &FleetLockConfig,
    lease: &Lease,
) -> Result<bool, LockError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let name = lease.metadata.name.clone().unwrap_or_default();
    let mut next = lease.clone();
    set_return_by(&mut next, None);
    next.spec = Some(LeaseSpec {
        holder_identity: None,
        renew_time: Some(now()),
        ..lease.spec.clone().unwrap_or_default()
    });
    match call(
        "PUT lease",
        api.replace(&name, &PostParams::default(), &next),
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets (or removes) the return-by mark on a slot this node holds.
async fn annotate(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    mark: Option<&Mark>,
) -> Result<(), LockError> {
    for _ in 0..CONFLICT_RETRIES {
        let Some(lease) = call("GET lease", api.get_opt(name)).await? else {
            return Ok(());
        };
        if lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            != Some(identity)
        {
            return Ok(());
        }
        let mut next = lease.clone();
        set_mark(&mut next, mark);
        match call(
            "PUT lease",
            api.replace(name, &PostParams::default(), &next),
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(LockError::Timeout(format!(
        "marking {name}: {CONFLICT_RETRIES} conflicts in a row"
    )))
}

fn set_return_by(lease: &mut Lease, return_by: Option<u64>) {
    let annotations = lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    match return_by {
        Some(t) => {
            annotations.insert(RETURN_BY_ANNOTATION.to_string(), t.to_string());
        }
        None => {
            annotations.remove(RETURN_BY_ANNOTATION);
            annotations.remove(HOLDER_UID_ANNOTATION);
        }
    }
}

fn set_mark(lease: &mut Lease, mark: Option<&Mark>) {
    set_return_by(lease, mark.map(|m| m.return_by));
    if let Some(m) = mark.filter(|m| !m.node_uid.is_empty()) {
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(HOLDER_UID_ANNOTATION.to_string(), m.node_uid.clone());
    }
}

/// One renewal: `Ok(false)` when another node holds the slot now. With `mark`, the renewal
/// (re)writes the return-by mark too.
async fn renew(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    duration: Duration,
    mark: Option<&Mark>,
) -> Result<bool, LockError> {
    for _ in 0..CONFLICT_RETRIES {
        let Some(lease) = call("GET lease", api.get_opt(name)).await? else {
            return Ok(false);
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        if holder != Some(identity) {
            return Ok(false);
        }
        let mut next = lease.clone();
        next.spec = Some(held_by(lease.spec.as_ref(), identity, duration));
        if mark.is_some() {
            set_mark(&mut next, mark);
        }
        match call(
            "PUT lease",
            api.replace(name, &PostParams::default(), &next),
        )
        .await
        {
            Ok(_) => return Ok(true),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(LockError::Timeout(format!(
        "renewal of {name}: {CONFLICT_RETRIES} conflicts in a row"
    )))
}

/// Clears `holderIdentity` if it is still ours.
async fn clear(api: &Api<Lease>, name: &str, identity: &str) -> Result<(), LockError> {
    for _ in 0..CONFLICT_RETRIES {
        let Some(lease) = call("GET lease", api.get_opt(name)).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(identity) {
            return Ok(());
        }
        let mut next = lease.clone();
        set_return_by(&mut next, None);
        next.spec = Some(LeaseSpec {
            holder_identity: None,
            renew_time: Some(now()),
            ..spec
        });
        match call(
            "PUT lease",
            api.replace(name, &PostParams::default(), &next),
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(LockError::Timeout(format!(
        "release of {name}: {CONFLICT_RETRIES} conflicts in a row"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> Lease {
        let t = k8s_openapi::jiff::Timestamp::now()
            - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago);
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: Some(MicroTime(t)),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_lease_is_live_until_renew_time_plus_duration() {
        assert_eq!(live_holder(&lease(Some("a"), 5, 30)), Some("a".into()));
        assert_eq!(live_holder(&lease(Some("a"), 31, 30)), None);
        assert_eq!(live_holder(&lease(None, 0, 30)), None);
        assert_eq!(live_holder(&lease(Some(""), 0, 30)), None);
    }

    #[test]
    fn a_slot_held_across_a_reboot_never_expires_while_its_holder_is_set() {
        let mut l = lease(Some("node-a"), 3600, 30);
        assert_eq!(live_holder(&l), None);
        // Renewed an hour ago with a 30 s lease, return-by long past: still held.
        set_return_by(&mut l, Some(1000));
        assert_eq!(return_by(&l), Some(1000));
        assert_eq!(live_holder(&l), Some("node-a".into()));
        l.spec.as_mut().unwrap().holder_identity = None;
        assert_eq!(live_holder(&l), None, "released: free");
        set_return_by(&mut l, None);
        assert_eq!(return_by(&l), None);
    }

    #[test]
    fn a_slot_counts_as_renewed_within_its_lease_duration_marked_or_not() {
        assert!(renewed_within_lease(&lease(Some("a"), 1, 30)));
        assert!(!renewed_within_lease(&lease(Some("a"), 31, 30)));
        let mut l = lease(Some("a"), 31, 30);
        set_return_by(&mut l, Some(1000));
        assert!(!renewed_within_lease(&l), "a mark is no renewal");
        assert_eq!(marked_uid(&l), None);
        set_mark(
            &mut l,
            Some(&Mark {
                return_by: 1000,
                node_uid: "uid-1".into(),
            }),
        );
        assert_eq!(marked_uid(&l), Some("uid-1"));
    }

    #[test]
    fn a_return_by_that_does_not_parse_still_holds_the_slot() {
        for bad in ["99999999999999999999", "2026-12-07T18:00:00Z", ""] {
            let mut l = lease(Some("node-a"), 3600, 30);
            l.metadata.annotations = Some(
                [(RETURN_BY_ANNOTATION.to_string(), bad.to_string())]
                    .into_iter()
                    .collect(),
            );
            assert_eq!(return_by(&l), None, "{bad:?}");
            assert!(marked(&l), "{bad:?}");
            assert_eq!(live_holder(&l), Some("node-a".into()), "{bad:?}");
        }
    }

    #[test]
    fn slot_names_are_the_prefix_and_a_canonical_number() {
        let cfg = FleetLockConfig::default();
        assert_eq!(slot_index(&cfg, "nodekeeper-drain-slot-0"), Some(0));
        assert_eq!(slot_index(&cfg, "nodekeeper-drain-slot-17"), Some(17));
        assert_eq!(slot_index(&cfg, "nodekeeper-drain-slot-01"), None);
        assert_eq!(slot_index(&cfg, "nodekeeper-drain-slot-+1"), None);
        assert_eq!(slot_index(&cfg, "nodekeeper-drain-slot-"), None);
        assert_eq!(slot_index(&cfg, "other-lease"), None);
    }

    #[test]
    fn a_mark_carries_the_node_uid_and_unmarking_removes_both() {
        let mut l = lease(Some("node-a"), 0, 30);
        set_mark(
            &mut l,
            Some(&Mark {
                return_by: 1000,
                node_uid: "uid-1".into(),
            }),
        );
        let a = l.metadata.annotations.clone().unwrap();
        assert_eq!(
            a.get(RETURN_BY_ANNOTATION).map(String::as_str),
            Some("1000")
        );
        assert_eq!(
            a.get(HOLDER_UID_ANNOTATION).map(String::as_str),
            Some("uid-1")
        );
        set_mark(&mut l, None);
        assert!(l.metadata.annotations.unwrap().is_empty());
    }

    #[test]
    fn taking_over_counts_a_transition_and_keeping_does_not() {
        let old = lease(Some("dead"), 100, 30).spec.unwrap();
        let taken = held_by(Some(&old), "me", Duration::from_secs(15));
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        let kept = held_by(Some(&taken), "me", Duration::from_secs(15));
        assert_eq!(kept.lease_transitions, Some(1));
    }

    #[test]
    fn config_problems_name_their_fields() {
        let bad = FleetLockConfig {
            enabled: true,
            slots: 0,
            namespace: "Bad_NS".into(),
            lease_duration: ConfigDuration(Duration::from_millis(1500)),
            name_prefix: "UPPER-".into(),
        };
        let fields: Vec<String> = bad.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "drain.fleetLock.slots",
                "drain.fleetLock.namespace",
                "drain.fleetLock.leaseDuration",
                "drain.fleetLock.namePrefix"
            ]
        );
        assert!(FleetLockConfig::default().problems().is_empty());
    }
}
