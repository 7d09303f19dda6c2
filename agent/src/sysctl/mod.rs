//! sysctl tuning: declarative profiles selected by node labels, validated before any write,
//! applied all-or-nothing, drift-corrected every interval, reverted when a key leaves every
//! matching profile.
//!
//! Flow: config profiles -> select by labels -> resolve (priority) -> validate (policy, shape,
//! range) -> apply (read, write, read back, roll back on failure; originals to the state dir) ->
//! every `interval`: re-read the config file (a ConfigMap update), re-resolve; revert keys that
//! left, re-apply drifted ones. Never writes a key that did not validate; never reverts on
//! shutdown (tuning must survive agent upgrades), only when a key leaves the profiles or on
//! `nodekeeper sysctl revert`.

pub mod apply;
pub mod dependants;
pub mod limits;
pub mod netns;
pub mod pods;
pub mod profile;
pub mod quarantine;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigDuration;
use crate::pb::{self, HealthState};
use crate::runtime::Health;
use apply::{ApplyError, OriginalsStore, Owner, Scope, SysctlFs};
use profile::{Desired, Profile};
use validate::{Policy, Rejection};

/// Drift is rare and cheap to check (a few small /proc reads): once a minute catches a stray
/// `sysctl -w` well before it matters, without waking the agent often.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
pub const CAPABILITY: &str = "sysctl";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SysctlConfig {
    pub enabled: bool,
    /// How often drift is checked and the config file re-read.
    pub interval: ConfigDuration,
    /// This node's labels for profile selection (until the Node watch lands, in every mode).
    pub node_labels: BTreeMap<String, String>,
    /// When non-empty, only keys matching one of these globs may be set.
    pub allow: Vec<String>,
    /// Extra denied key globs, on top of the built-in denylist.
    pub deny: Vec<String>,
    /// Built-in denylist entries to lift (e.g. `vm.nr_hugepages`).
    pub allow_dangerous: Vec<String>,
    /// Pods may ask for namespaced sysctls with the `nodekeeper.io/sysctls` annotation.
    pub pod_annotation: pods::PodAnnotationConfig,
    pub profiles: Vec<Profile>,
}

impl Default for SysctlConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: ConfigDuration(DEFAULT_INTERVAL),
            node_labels: BTreeMap::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            allow_dangerous: Vec::new(),
            pod_annotation: pods::PodAnnotationConfig::default(),
            profiles: Vec::new(),
        }
    }
}

impl SysctlConfig {
    pub fn policy(&self) -> Policy {
        Policy {
            deny: self.deny.clone(),
            allow_dangerous: self.allow_dangerous.clone(),
            allow: self.allow.clone(),
        }
    }

    /// Config-only problems as (field, problem): names, selectors, keys, interval.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.interval.get() < Duration::from_secs(1)
            || self.interval.get() > Duration::from_secs(3600)
        {
            out.push((
                "sysctl.interval".into(),
                format!("{} is out of range (1s..=1h)", self.interval),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, p) in self.profiles.iter().enumerate() {
            let field = format!("sysctl.profiles[{i}]");
            if p.name.trim().is_empty() {
                out.push((format!("{field}.name"), "must not be empty".into()));
            } else if !seen.insert(p.name.as_str()) {
                out.push((
                    format!("{field}.name"),
                    format!("{:?} is used by more than one profile", p.name),
                ));
            }
            if let Some(sel) = &p.node_selector {
                for problem in sel.problems() {
                    out.push((format!("{field}.nodeSelector"), problem));
                }
            }
            if let Some(sel) = &p.pod_selector {
                for problem in sel.problems() {
                    out.push((format!("{field}.podSelector"), problem));
                }
                for key in p.sysctls.keys() {
                    let (dotted, _) = profile::key_path(key);
                    if !netns::is_namespaced(&dotted) {
                        out.push((
                            format!("{field}.sysctls"),
                            format!("{key:?} is not per network namespace; a podSelector profile can only set net.* keys"),
                        ));
                    }
                }
            }
            for key in p.sysctls.keys() {
                let (_, path) = profile::key_path(key);
                let bad = path.is_empty()
                    || path
                        .split('/')
                        .any(|c| c.is_empty() || c == "." || c == "..");
                if bad || key.chars().any(char::is_whitespace) {
                    out.push((
                        format!("{field}.sysctls"),
                        format!("{key:?} is not a sysctl key"),
                    ));
                }
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// Profiles conflict or a value failed validation; nothing was written.
    #[error("sysctl profiles rejected, nothing written:\n{}", .0.iter().map(|r| format!("  {r}")).collect::<Vec<_>>().join("\n"))]
    Rejected(Vec<String>),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// `revert --netns` for a namespace nodekeeper holds no record of.
    #[error("no sysctl record for network namespace {netns} ({id}) in {}: nodekeeper applied nothing there, or its record is gone (a record of a dead namespace that had this inode is discarded); nothing was changed", journal.display())]
    NoRecord {
        netns: String,
        id: String,
        journal: PathBuf,
    },
}

impl SysctlError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Rejected(_) => "rejected",
            Self::Apply(e) => e.reason(),
            Self::Netns(_) => "netns",
            Self::NoRecord { .. } => "no_record",
        }
    }
}

/// The desired keys for these labels, validated against the host; `Rejected` lists every problem.
pub fn plan(
    config: &SysctlConfig,
    labels: &BTreeMap<String, String>,
    fs: &SysctlFs,
) -> Result<Vec<Desired>, SysctlError> {
    let (desired, rejections) = plan_with_rejections(config, labels, fs)?;
    if rejections.is_empty() {
        Ok(desired)
    } else {
        Err(SysctlError::Rejected(
            rejections.iter().map(ToString::to_string).collect(),
        ))
    }
}

/// The desired keys and every problem found with them (for callers that can act per key).
fn plan_with_rejections(
    config: &SysctlConfig,
    labels: &BTreeMap<String, String>,
    fs: &SysctlFs,
) -> Result<(Vec<Desired>, Vec<Rejection>), SysctlError> {
    let desired = profile::resolve(&config.profiles, labels).map_err(SysctlError::Rejected)?;
    let policy = config.policy();
    let mut rejections: Vec<Rejection> =
        validate::check(&desired, &policy, |d| fs.read(&d.path).ok());
    rejections.extend(limits::check(&desired, &policy, fs));
    Ok((desired, rejections))
}

/// FNV-1a over the sorted desired set: stable across builds, for the status hash.
pub fn desired_hash(desired: &[Desired]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for d in desired {
        for b in d
            .key
            .bytes()
            .chain([b'='])
            .chain(d.value.bytes())
            .chain([b'\n'])
        {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

// === metrics ===

#[derive(Debug, Clone, Default)]
pub struct SysctlMetrics {
    drift: Family<Vec<(&'static str, String)>, Counter>,
    errors: Family<Vec<(&'static str, &'static str)>, Counter>,
    reverts: Counter,
    managed: Gauge,
    applied: Family<Vec<(&'static str, String)>, Gauge>,
    quarantined: Family<Vec<(&'static str, String)>, Gauge>,
    restore_failures: Family<Vec<(&'static str, String)>, Counter>,
    pod_applies: pods::PodMetrics,
}

impl SysctlMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "sysctl_drift",
            "Keys found changed behind the agent's back and re-applied, by key",
            m.drift.clone(),
        );
        registry.register(
            "sysctl_errors",
            "Failed reconciles, by reason (rejected, write_failed, not_accepted...)",
            m.errors.clone(),
        );
        registry.register(
            "sysctl_reverts",
            "Keys restored to their original value",
            m.reverts.clone(),
        );
        registry.register(
            "sysctl_pod_applies",
            "Pod network namespaces tuned, by result (applied, rejected, write_failed, netns...)",
            m.pod_applies.applies.clone(),
        );
        registry.register(
            "sysctl_applied",
            "1 for each key the agent holds at a profile's value, with the winning profile",
            m.applied.clone(),
        );
        registry.register(
            "sysctl_quarantined",
            "1 for each key held out of reconciling after it could not be applied or restored, by key and action",
            m.quarantined.clone(),
        );
        registry.register(
            "sysctl_restore_failures",
            "Restores of an original (revert or rollback) that failed, by key; the original stays recorded",
            m.restore_failures.clone(),
        );
        registry.register(
            "sysctl_managed_keys",
            "Keys the agent currently holds at a profile's value",
            m.managed.clone(),
        );
        m
    }
}

// === impl Reconciler ===

/// Shared with the gRPC API (GetNode).
pub type SharedStatus = Arc<RwLock<pb::SysctlStatus>>;

/// Where the capability gets its config each round: the file (re-read, so a ConfigMap update
/// takes effect) or the config it started with when there is no file.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    Fixed(Box<SysctlConfig>),
}

impl ConfigSource {
    fn load(&self) -> Result<SysctlConfig, String> {
        match self {
            Self::Fixed(c) => Ok((**c).clone()),
            Self::File(path) => {
                let config = crate::config::Config::load(Some(path)).map_err(|e| e.to_string())?;
                config.validate().map_err(|e| e.to_string())?;
                Ok(config.sysctl)
            }
        }
    }
}

pub struct Reconciler {
    pub fs: SysctlFs,
    pub store: OriginalsStore,
    pub metrics: SysctlMetrics,
    pub status: SharedStatus,
    /// The last desired set that was applied, re-checked for drift.
    applied: Vec<Desired>,
    drift_counts: BTreeMap<String, u64>,
    pods: pods::PodTuner,
    quarantine: quarantine::Quarantine,
    /// Messages for Node Events (a key newly quarantined, or released), drained by `run`.
    events: Vec<(&'static str, &'static str, String)>,
}

impl Reconciler {
    pub fn new(
        fs: SysctlFs,
        store: OriginalsStore,
        metrics: SysctlMetrics,
        status: SharedStatus,
    ) -> Self {
        let pods = pods::PodTuner::new(metrics.pod_applies.clone());
        Self {
            fs,
            store,
            metrics,
            status,
            applied: Vec::new(),
            drift_counts: BTreeMap::new(),
            pods,
            quarantine: quarantine::Quarantine::default(),
            events: Vec::new(),
        }
    }

    /// Pod-level profiles and annotations for this node's pods (connected mode only).
    pub fn reconcile_pods(
        &mut self,
        config: &SysctlConfig,
        node_labels: &BTreeMap<String, String>,
        pods: &[Arc<k8s_openapi::api::core::v1::Pod>],
        host: &crate::host::HostPaths,
    ) {
        self.pods.reconcile(config, node_labels, pods, host);
    }

    /// One round: resolve, validate, revert what left, apply what changed, correct drift.
    pub fn reconcile(
        &mut self,
        config: &SysctlConfig,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), SysctlError> {
        self.reconcile_at(config, labels, Instant::now())
    }

    /// [`Self::reconcile`] at a given time (quarantine backoff is measured against it).
    pub fn reconcile_at(
        &mut self,
        config: &SysctlConfig,
        labels: &BTreeMap<String, String>,
        now: Instant,
    ) -> Result<(), SysctlError> {
        let result = self.reconcile_inner(config, labels, now);
        if let Err(e) = &result {
            self.status.write().expect("not poisoned").error = e.to_string();
            self.metrics
                .errors
                .get_or_create(&vec![("reason", e.reason())])
                .inc();
        }
        result
    }

    /// Keys held out of reconciling, one line each (empty when all is well).
    pub fn quarantined(&self) -> Vec<String> {
        self.quarantine.describe(Instant::now())
    }

    /// Node Events to record: (reason, type, message).
    pub fn take_events(&mut self) -> Vec<(&'static str, &'static str, String)> {
        std::mem::take(&mut self.events)
    }

    fn quarantine_key(
        &mut self,
        key: &str,
        action: quarantine::Action,
        error: String,
        now: Instant,
        interval: Duration,
    ) {
        tracing::error!(key, action = action.label(), %error, "sysctl key quarantined: every other key is still reconciled; retrying with backoff");
        if self
            .quarantine
            .fail(key, action, error.clone(), now, interval)
        {
            self.events.push((
                "SysctlQuarantined",
                "Warning",
                format!(
                    "sysctl {key}: {} failed ({error}); held out with backoff, every other key is still reconciled",
                    action.label()
                ),
            ));
        }
    }

    fn reconcile_inner(
        &mut self,
        config: &SysctlConfig,
        labels: &BTreeMap<String, String>,
        now: Instant,
    ) -> Result<(), SysctlError> {
        let interval = config.interval.get();
        let (desired, rejections) = plan_with_rejections(config, labels, &self.fs)?;
        // A key this daemon applied (or holds in quarantine) whose file vanished since (its
        // interface was removed), or that a use check now refuses (the node got busier), is
        // quarantined like a refused write, not a reason to stop reconciling the rest of a set
        // that was valid; anything else rejects the set.
        let use_refused: BTreeSet<String> = if rejections.is_empty() {
            BTreeSet::new()
        } else {
            limits::check(&desired, &config.policy(), &self.fs)
                .into_iter()
                .map(|r| r.key)
                .collect()
        };
        let (vanished, rejected): (Vec<Rejection>, Vec<Rejection>) =
            rejections.into_iter().partition(|r| {
                (r.problem == validate::NO_SUCH_KEY || use_refused.contains(&r.key))
                    && (self.applied.iter().any(|d| d.key == r.key)
                        || self.quarantine.entries().contains_key(&r.key))
            });
        if !rejected.is_empty() {
            return Err(SysctlError::Rejected(
                rejected.iter().map(ToString::to_string).collect(),
            ));
        }
        for r in vanished {
            if !self.quarantine.holds(&r.key, now) {
                self.quarantine_key(
                    &r.key,
                    quarantine::Action::Apply,
                    format!("{}: {}", r.key, r.problem),
                    now,
                    interval,
                );
            }
        }
        let keep: BTreeSet<String> = desired.iter().map(|d| d.key.clone()).collect();
        let hold: BTreeSet<String> = self
            .quarantine
            .entries()
            .keys()
            .filter(|k| self.quarantine.holds(k, now))
            .cloned()
            .collect();
        // Keys that left: restore each one on its own; a key that fails is quarantined, and
        // nothing stops the apply below. Only the daemon's own entries: a key a `sysctl apply`
        // recorded is the CLI's to revert.
        let reverted = apply::revert(&self.fs, &mut self.store, &keep, &hold, Scope::Own)?;
        for key in &reverted.restored {
            tracing::info!(
                key,
                "sysctl left every matching profile: original value restored"
            );
            self.metrics.reverts.inc();
            self.release(key);
        }
        for (key, error) in reverted.failed {
            self.metrics
                .restore_failures
                .get_or_create(&vec![("key", key.clone())])
                .inc();
            self.quarantine_key(&key, quarantine::Action::Restore, error, now, interval);
        }

        let mut active: Vec<Desired> = desired
            .iter()
            .filter(|d| !self.quarantine.holds(&d.key, now))
            .cloned()
            .collect();
        if active == self.applied {
            for (d, actual) in apply::drifted(&self.fs, &active) {
                tracing::warn!(key = %d.key, found = %actual, restoring = %d.value, "sysctl drift: re-applying");
                self.metrics
                    .drift
                    .get_or_create(&vec![("key", d.key.clone())])
                    .inc();
                *self.drift_counts.entry(d.key.clone()).or_default() += 1;
            }
        }
        // All-or-nothing per attempt; the key the kernel refuses is quarantined and the rest
        // is applied without it (each pass drops one key, so this ends).
        let report = loop {
            match apply::apply(&self.fs, &active, &mut self.store) {
                Ok(report) => break report,
                Err(e) => {
                    for line in e.unrestored() {
                        let key = line.split_once(": ").map_or(line.as_str(), |(k, _)| k);
                        self.metrics
                            .restore_failures
                            .get_or_create(&vec![("key", key.to_string())])
                            .inc();
                    }
                    let Some(key) = e.key().map(str::to_string) else {
                        return Err(e.into());
                    };
                    self.metrics
                        .errors
                        .get_or_create(&vec![("reason", e.reason())])
                        .inc();
                    self.quarantine_key(
                        &key,
                        quarantine::Action::Apply,
                        e.to_string(),
                        now,
                        interval,
                    );
                    active.retain(|d| d.key != key);
                }
            }
        };
        for (key, old, new) in &report.changed {
            tracing::info!(key, old, new, "sysctl applied");
        }
        for d in &active {
            self.release(&d.key);
        }
        // A quarantined key no profile wants and no journal holds has nothing left to retry.
        let stale: Vec<String> = self
            .quarantine
            .entries()
            .keys()
            .filter(|k| !keep.contains(*k) && !self.store.originals.keys.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            self.release(&key);
        }

        self.metrics.managed.set(active.len() as i64);
        self.metrics.applied.clear();
        for d in &active {
            self.metrics
                .applied
                .get_or_create(&vec![
                    ("key", d.key.clone()),
                    ("profile", d.profile.clone()),
                ])
                .set(1);
        }
        self.metrics.quarantined.clear();
        for (key, entry) in self.quarantine.entries() {
            self.metrics
                .quarantined
                .get_or_create(&vec![
                    ("key", key.clone()),
                    ("action", entry.action.label().to_string()),
                ])
                .set(1);
        }
        let mut profiles: Vec<String> = active.iter().map(|d| d.profile.clone()).collect();
        profiles.sort();
        profiles.dedup();
        let quarantined = self.quarantine.describe(now);
        *self.status.write().expect("not poisoned") = pb::SysctlStatus {
            profiles,
            hash: desired_hash(&active),
            keys: active
                .iter()
                .map(|d| pb::SysctlKey {
                    key: d.key.clone(),
                    value: d.value.clone(),
                    profile: d.profile.clone(),
                    drift_corrections: self.drift_counts.get(&d.key).copied().unwrap_or(0),
                })
                .collect(),
            error: if quarantined.is_empty() {
                String::new()
            } else {
                format!("quarantined: {}", quarantined.join("; "))
            },
        };
        self.applied = active;
        Ok(())
    }

    /// The key works again (or is gone): out of quarantine, with an Event when it was in.
    fn release(&mut self, key: &str) {
        if self.quarantine.clear(key) {
            tracing::info!(key, "sysctl key out of quarantine");
            self.events.push((
                "SysctlReleased",
                "Normal",
                format!("sysctl {key}: applied or restored again, out of quarantine"),
            ));
        }
    }
}

/// Annotations on the Node that tell operators (and `kubectl get node -o yaml`) what is applied.
pub const ANNOTATION_PROFILES: &str = "nodekeeper.io/sysctl-profiles";
pub const ANNOTATION_HASH: &str = "nodekeeper.io/sysctl-hash";

/// This node in the API: its watched labels select profiles, its annotations carry the status.
pub struct NodeBinding {
    pub client: kube::Client,
    pub name: String,
    pub info: tokio::sync::watch::Receiver<Option<crate::kube::NodeInfo>>,
}

/// This node's pods (from the shared pod watch) and where the host's files are, for pod-level
/// profiles.
pub struct PodBinding {
    pub store: crate::kube::PodStore,
    pub changed: tokio::sync::watch::Receiver<u64>,
    pub host: crate::host::HostPaths,
}

/// The capability task: reconcile now, every interval, and whenever the Node's labels change,
/// until cancelled.
pub async fn run(
    source: ConfigSource,
    mut reconciler: Reconciler,
    mut node: Option<NodeBinding>,
    mut pods: Option<PodBinding>,
    health: Health,
    token: CancellationToken,
) -> Result<(), crate::runtime::TaskError> {
    let mut last_config: Option<SysctlConfig> = None;
    let mut annotated: Option<(String, String)> = None;
    if let Some(n) = node.as_mut() {
        // Profiles select on the Node's labels: wait for the first sync before touching anything.
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = n.info.wait_for(Option::is_some) => { r?; }
        }
    }
    loop {
        let config = match source.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "config file unreadable or invalid; keeping the last good sysctl config");
                last_config.clone().ok_or(e)?
            }
        };
        let labels = match &node {
            Some(n) => n
                .info
                .borrow()
                .as_ref()
                .map(|i| i.labels.clone())
                .unwrap_or_default(),
            None => config.node_labels.clone(),
        };
        // The pass reads and writes files (each bounded by `apply::KEY_IO_DEADLINE`, so a pass
        // still takes seconds when keys block): on the blocking pool, never on an async worker,
        // where it would stall every task queued there (/healthz, DNS, the census) with it.
        let (back, outcome, config, labels) = tokio::task::spawn_blocking(move || {
            let outcome = reconciler.reconcile(&config, &labels);
            (reconciler, outcome, config, labels)
        })
        .await?;
        reconciler = back;
        let events = reconciler.take_events();
        if let Some(n) = &node {
            for (reason, kind, message) in &events {
                crate::kube::node_event(&n.client, &n.name, reason, kind, message).await;
            }
        }
        match outcome {
            Ok(()) => {
                // A quarantined key is reported (message, metric, Event) but keeps the agent
                // ready: readiness gates DNS and the census Service, which one sysctl must not.
                let quarantined = reconciler.quarantined();
                let message = if quarantined.is_empty() {
                    String::new()
                } else {
                    format!("quarantined: {}", quarantined.join("; "))
                };
                health.set(CAPABILITY, HealthState::Serving, message);
                if let Some(n) = &node {
                    let status = reconciler.status.read().expect("not poisoned").clone();
                    let want = (status.profiles.join(","), status.hash);
                    if annotated.as_ref() != Some(&want) {
                        let patch = [
                            (ANNOTATION_PROFILES, Some(want.0.clone())),
                            (ANNOTATION_HASH, Some(want.1.clone())),
                        ];
                        match crate::kube::annotate_node(&n.client, &n.name, &patch).await {
                            Ok(()) => annotated = Some(want),
                            Err(e) => {
                                tracing::warn!(error = %e, "annotating the node with the sysctl status failed; retrying next round")
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "sysctl reconcile failed");
                health.set(CAPABILITY, HealthState::Degraded, e.to_string());
            }
        }
        let (reconciler_back, config) = match &pods {
            Some(p) => {
                let (state, host) = (p.store.state(), p.host.clone());
                tokio::task::spawn_blocking(move || {
                    reconciler.reconcile_pods(&config, &labels, &state, &host);
                    (reconciler, config)
                })
                .await?
            }
            None => (reconciler, config),
        };
        reconciler = reconciler_back;
        let interval = config.interval.get();
        last_config = Some(config);
        let pods_changed = async {
            match pods.as_mut() {
                Some(p) => {
                    if p.changed.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let relabelled = async {
            match node.as_mut() {
                Some(n) => {
                    if n.info.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
            _ = relabelled => tracing::info!("node labels changed: re-selecting sysctl profiles"),
            _ = pods_changed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_problems_name_the_field() {
        let c: SysctlConfig = serde_saphyr::from_str(
            "profiles:\n  - name: a\n    sysctls: {net.core.somaxconn: 1}\n  - name: a\n    sysctls: {'net/../x': 1}\n    nodeSelector:\n      matchExpressions: [{key: k, operator: In}]\ninterval: 100ms\n",
        )
        .unwrap();
        let fields: Vec<_> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "sysctl.interval",
                "sysctl.profiles[1].name",
                "sysctl.profiles[1].nodeSelector",
                "sysctl.profiles[1].sysctls"
            ]
        );
    }

    #[test]
    fn values_accept_numbers_strings_and_lists() {
        let c: SysctlConfig = serde_saphyr::from_str(
            "profiles:\n  - name: a\n    sysctls:\n      net.core.somaxconn: 4096\n      net.ipv4.ip_local_port_range: [1024, 65535]\n      net.ipv4.tcp_rmem: \"4096  87380 16777216\"\n",
        )
        .unwrap();
        let s = &c.profiles[0].sysctls;
        assert_eq!(s["net.core.somaxconn"].0, "4096");
        assert_eq!(s["net.ipv4.ip_local_port_range"].0, "1024 65535");
        assert_eq!(s["net.ipv4.tcp_rmem"].0, "4096 87380 16777216");
    }

    /// A reconciler over a temp /proc/sys tree, journal in the temp dir.
    fn reconciler(files: &[(&str, &str)]) -> (tempfile::TempDir, Reconciler) {
        let dir = tempfile::tempdir().unwrap();
        for (path, v) in files {
            let p = dir.path().join("sys").join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        }
        let store =
            OriginalsStore::load(Some(dir.path().join("state/originals.json")), Owner::Daemon)
                .unwrap();
        let r = Reconciler::new(
            SysctlFs::new(dir.path()),
            store,
            SysctlMetrics::default(),
            SharedStatus::default(),
        );
        (dir, r)
    }

    fn profile_config(sysctls: &str) -> SysctlConfig {
        serde_saphyr::from_str(&format!(
            "interval: 10s\nprofiles:\n  - name: p\n    sysctls: {{{sysctls}}}\n"
        ))
        .unwrap()
    }

    const TEN: Duration = Duration::from_secs(10);

    #[test]
    fn a_refused_key_is_quarantined_with_backoff_while_the_rest_is_applied_and_kept() {
        let (_d, mut r) = reconciler(&[("net/core/somaxconn", "4096\n"), ("vm/zz", "0\n")]);
        r.fs.faults.lock().unwrap().insert("vm/zz".into(), 0);
        let config = profile_config("net.core.somaxconn: 8192, vm.zz: 1");
        let labels = BTreeMap::new();
        let t0 = Instant::now();
        r.reconcile_at(&config, &labels, t0).unwrap();
        assert_eq!(r.fs.read("net/core/somaxconn").unwrap(), "8192");
        let failures = |r: &Reconciler| r.quarantine.entries()["vm.zz"].failures;
        assert_eq!(failures(&r), 1);
        let events = r.take_events();
        assert_eq!(events.len(), 1);
        assert!(
            events[0].2.contains("vm.zz") && events[0].2.contains("injected"),
            "{events:?}"
        );
        assert!(
            r.status
                .read()
                .unwrap()
                .error
                .contains("quarantined: vm.zz")
        );

        // One interval later the refused key is not tried again, the rest stays applied and
        // drift on it is still corrected.
        r.fs.write("net/core/somaxconn", "128").unwrap();
        r.reconcile_at(&config, &labels, t0 + TEN).unwrap();
        assert_eq!(failures(&r), 1, "not retried before its backoff");
        assert_eq!(r.fs.read("net/core/somaxconn").unwrap(), "8192");
        // Due after 2 intervals: tried, fails, next wait 4 intervals; no second Event.
        r.reconcile_at(&config, &labels, t0 + 2 * TEN).unwrap();
        assert_eq!(failures(&r), 2);
        assert_eq!(
            r.fs.read("net/core/somaxconn").unwrap(),
            "8192",
            "no flapping"
        );
        r.reconcile_at(&config, &labels, t0 + 5 * TEN).unwrap();
        assert_eq!(failures(&r), 2);
        assert!(r.take_events().is_empty());
        // The kernel takes it again: applied at the next due round, released, Event.
        r.fs.faults.lock().unwrap().clear();
        r.reconcile_at(&config, &labels, t0 + 6 * TEN).unwrap();
        assert_eq!(r.fs.read("vm/zz").unwrap(), "1");
        assert!(r.quarantine.entries().is_empty());
        assert_eq!(r.take_events()[0].0, "SysctlReleased");
        assert_eq!(r.status.read().unwrap().error, "");
    }

    #[test]
    fn a_key_that_cannot_be_restored_does_not_stop_drift_correction_and_stays_recorded() {
        let (d, mut r) = reconciler(&[("net/core/somaxconn", "4096\n"), ("vm/zz", "0\n")]);
        let labels = BTreeMap::new();
        let t0 = Instant::now();
        r.reconcile_at(
            &profile_config("net.core.somaxconn: 8192, vm.zz: 1"),
            &labels,
            t0,
        )
        .unwrap();
        assert_eq!(r.fs.read("vm/zz").unwrap(), "1");
        // vm.zz leaves the profile but cannot be written back (a one-way knob).
        r.fs.faults.lock().unwrap().insert("vm/zz".into(), 0);
        let config = profile_config("net.core.somaxconn: 8192");
        r.fs.write("net/core/somaxconn", "128").unwrap();
        r.reconcile_at(&config, &labels, t0 + TEN).unwrap();
        assert_eq!(
            r.fs.read("net/core/somaxconn").unwrap(),
            "8192",
            "drift corrected"
        );
        assert_eq!(
            r.quarantine.entries()["vm.zz"].action,
            quarantine::Action::Restore
        );
        let journal =
            OriginalsStore::load_unlocked(Some(d.path().join("state/originals.json"))).unwrap();
        assert_eq!(journal.originals.keys["vm.zz"].1, "0", "original kept");
        // Once writable, restored at the next due round and forgotten.
        r.fs.faults.lock().unwrap().clear();
        r.reconcile_at(&config, &labels, t0 + 3 * TEN).unwrap();
        assert_eq!(r.fs.read("vm/zz").unwrap(), "0");
        assert!(r.quarantine.entries().is_empty());
        assert!(!r.store.originals.keys.contains_key("vm.zz"));
    }

    #[test]
    fn hash_is_stable_and_order_sensitive_to_content_only() {
        let d = |k: &str, v: &str| Desired {
            key: k.into(),
            path: k.replace('.', "/"),
            value: v.into(),
            profile: "p".into(),
            priority: 0,
        };
        let a = desired_hash(&[d("a.b", "1"), d("c.d", "2")]);
        assert_eq!(a, desired_hash(&[d("a.b", "1"), d("c.d", "2")]));
        assert_ne!(a, desired_hash(&[d("a.b", "1"), d("c.d", "3")]));
        assert_eq!(a.len(), 16);
    }
}

// === one-shot commands (`nodekeeper sysctl plan|apply|revert`) ===

/// Where a one-shot command works: the host or another network namespace (only per-namespace
/// `net.*` keys). Originals are journalled either way: the host's in
/// `<stateDir>/sysctl/originals.json`, a namespace's in `<stateDir>/sysctl/netns/<dev>-<inode>.json`
/// (its identity while it lives), so `revert --netns` restores exactly that namespace.
#[derive(Debug, Clone)]
pub struct Target {
    pub proc_root: PathBuf,
    /// `<stateDir>/sysctl`.
    pub state_dir: PathBuf,
    pub netns: Option<PathBuf>,
}

impl Target {
    /// Where `config` keeps sysctl state: its host procfs, `<stateDir>/sysctl`; in `netns`
    /// when given. The daemon's journal is this target's [`Target::host_journal`] too.
    pub fn new(config: &crate::config::Config, netns: Option<PathBuf>) -> Self {
        Self {
            proc_root: config.host_paths.proc.clone(),
            state_dir: config.state_dir.join("sysctl"),
            netns,
        }
    }

    pub fn host_journal(&self) -> PathBuf {
        self.state_dir.join("originals.json")
    }

    /// The journal of the namespace `ns` (see [`netns::NetnsHandle::key`]).
    pub fn netns_journal(&self, ns: &netns::NetnsHandle) -> PathBuf {
        self.state_dir
            .join("netns")
            .join(format!("{}.json", ns.key()))
    }
}

/// The `--netns` namespace a one-shot command works in.
struct InNetns {
    /// As given on the command line.
    path: PathBuf,
    /// `net:[inode]`.
    id: String,
    /// Read inside the namespace: what its journal must have been recorded in.
    identity: netns::NetnsIdentity,
}

/// Runs `f` with the target's sysctl tree and journal path, inside the target namespace (opened
/// once, entered through that fd, identity checked) when there is one.
fn in_target<T: Send + 'static>(
    target: &Target,
    f: impl FnOnce(SysctlFs, PathBuf, Option<InNetns>) -> Result<T, SysctlError> + Send + 'static,
) -> Result<T, SysctlError> {
    let fs = SysctlFs::new(&target.proc_root);
    match &target.netns {
        None => f(fs, target.host_journal(), None),
        Some(path) => {
            let ns = netns::NetnsHandle::open(path)?;
            let journal = target.netns_journal(&ns);
            let (path, id) = (path.clone(), ns.id());
            ns.run(move || {
                let identity = netns::current_identity()?;
                f(fs, journal, Some(InNetns { path, id, identity }))
            })?
        }
    }
}

/// Loads the target's journal for the CLI: the host's bound to the namespace the command runs
/// in, a namespace's bound to that namespace's lifetime identity (a dead namespace's record is
/// discarded: returned for the command's output).
fn load_cli_journal(
    journal: PathBuf,
    ns: Option<&InNetns>,
) -> Result<(OriginalsStore, Option<apply::Originals>), SysctlError> {
    let mut store = OriginalsStore::load(Some(journal), Owner::Cli)?;
    let discarded = match ns {
        None => {
            bind_host_journal(&mut store)?;
            None
        }
        Some(ns) => store.bind_to_netns_identity(&ns.identity)?,
    };
    Ok((store, discarded))
}

/// The output line for a discarded record of a dead namespace.
fn discarded_line(dead: &apply::Originals) -> String {
    format!(
        "discarded the record of a dead network namespace that had this inode ({} key(s), never applied here)\n",
        dead.keys.len()
    )
}

fn refuse_global_keys_in_netns(
    fs: &SysctlFs,
    in_netns: bool,
    desired: &[Desired],
) -> Result<(), SysctlError> {
    if !in_netns {
        return Ok(());
    }
    let release = fs.read("kernel/osrelease").unwrap_or_default();
    let global: Vec<String> = desired
        .iter()
        .filter(|d| !netns::is_namespaced_on(&d.key, &release))
        .map(|d| {
            format!(
                "profile {:?}: {} is not per network namespace on kernel {release:?}; refusing to set it from inside one",
                d.profile, d.key
            )
        })
        .collect();
    if global.is_empty() {
        Ok(())
    } else {
        Err(SysctlError::Rejected(global))
    }
}

/// The host journal belongs to the namespace the CLI runs in (`ip netns exec A nodekeeper ...`
/// records A's inode and cookie): a later command from another namespace, or from a new one that
/// reuses A's inode, is refused instead of replaying A's originals there.
fn bind_host_journal(store: &mut OriginalsStore) -> Result<(), SysctlError> {
    match std::fs::read_link("/proc/thread-self/ns/net") {
        Ok(id) => {
            let identity = netns::current_identity()?;
            Ok(store.bind_to_netns(&id.to_string_lossy(), &identity)?)
        }
        Err(_) => Ok(()),
    }
}

/// Per key: current -> desired and the winning profile. Writes nothing.
pub fn plan_report(config: &SysctlConfig, target: &Target) -> Result<String, SysctlError> {
    let config = config.clone();
    in_target(target, move |fs, _, ns| {
        let desired = plan(&config, &config.node_labels, &fs)?;
        refuse_global_keys_in_netns(&fs, ns.is_some(), &desired)?;
        let mut out = format!(
            "{:<40} {:<24} {:<24} {}\n",
            "KEY", "CURRENT", "DESIRED", "PROFILE"
        );
        for d in &desired {
            let current = fs.read(&d.path).unwrap_or_default();
            let mark = if current == d.value {
                "(unchanged)"
            } else {
                ""
            };
            out.push_str(&format!(
                "{:<40} {:<24} {:<24} {} {mark}\n",
                d.key, current, d.value, d.profile
            ));
        }
        Ok(out)
    })
}

/// Validates and applies once, all-or-nothing; returns a line per change.
pub fn apply_once(config: &SysctlConfig, target: &Target) -> Result<String, SysctlError> {
    let config = config.clone();
    in_target(target, move |fs, journal, ns| {
        let desired = plan(&config, &config.node_labels, &fs)?;
        refuse_global_keys_in_netns(&fs, ns.is_some(), &desired)?;
        let (mut store, discarded) = load_cli_journal(journal, ns.as_ref())?;
        let report = apply::apply(&fs, &desired, &mut store)?;
        let mut out = discarded.as_ref().map(discarded_line).unwrap_or_default();
        for (key, old, new) in &report.changed {
            out.push_str(&format!("{key}: {old} -> {new}\n"));
        }
        out.push_str(&format!(
            "{} changed, {} already set\n",
            report.changed.len(),
            report.unchanged
        ));
        Ok(out)
    })
}

/// Restores the originals recorded for the target (the host, or the `--netns` namespace from
/// its own journal): the CLI's entries, or every entry with [`Scope::All`] (the daemon's too,
/// for when it is stopped for good). A namespace without a record (or only a dead namespace's)
/// is an error; a key that cannot be restored is named in the error and stays recorded.
pub fn revert_once(target: &Target, scope: Scope) -> Result<String, SysctlError> {
    in_target(target, move |fs, journal, ns| {
        let no_record = |ns: &InNetns, journal: PathBuf| SysctlError::NoRecord {
            netns: ns.path.display().to_string(),
            id: ns.id.clone(),
            journal,
        };
        if let Some(ns) = &ns
            && !journal.exists()
        {
            return Err(no_record(ns, journal));
        }
        let (mut store, discarded) = load_cli_journal(journal.clone(), ns.as_ref())?;
        if let (Some(ns), Some(_)) = (&ns, &discarded) {
            return Err(no_record(ns, journal));
        }
        let none = BTreeSet::new();
        let report = apply::revert(&fs, &mut store, &none, &none, scope)?;
        if ns.is_some() && store.originals.keys.is_empty() {
            // Nothing left to restore in a namespace that dies with its pod: drop the record.
            let _ = std::fs::remove_file(&journal);
        }
        if !report.failed.is_empty() {
            let mut lines: Vec<String> = report
                .failed
                .iter()
                .map(|(k, e)| format!("{k}: {e}"))
                .collect();
            if !report.restored.is_empty() {
                lines.push(format!("(restored: {})", report.restored.join(", ")));
            }
            return Err(ApplyError::Revert(lines).into());
        }
        let mut out = format!(
            "{} key(s) restored: {}\n",
            report.restored.len(),
            report.restored.join(", ")
        );
        if report.others > 0 {
            out.push_str(&format!(
                "{} key(s) the daemon applied left as they are (it reverts them when they leave its profiles; `revert --all` restores them too)\n",
                report.others
            ));
        }
        Ok(out)
    })
}
