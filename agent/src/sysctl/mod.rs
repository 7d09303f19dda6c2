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
pub mod netns;
pub mod pods;
pub mod profile;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigDuration;
use crate::pb::{self, HealthState};
use crate::runtime::Health;
use apply::{ApplyError, OriginalsStore, SysctlFs};
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
}

impl SysctlError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Rejected(_) => "rejected",
            Self::Apply(e) => e.reason(),
            Self::Netns(_) => "netns",
        }
    }
}

/// The desired keys for these labels, validated against the host; `Rejected` lists every problem.
pub fn plan(
    config: &SysctlConfig,
    labels: &BTreeMap<String, String>,
    fs: &SysctlFs,
) -> Result<Vec<Desired>, SysctlError> {
    let desired = profile::resolve(&config.profiles, labels).map_err(SysctlError::Rejected)?;
    let rejections: Vec<Rejection> =
        validate::check(&desired, &config.policy(), |d| fs.read(&d.path).ok());
    if rejections.is_empty() {
        Ok(desired)
    } else {
        Err(SysctlError::Rejected(
            rejections.iter().map(ToString::to_string).collect(),
        ))
    }
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
        let result = self.reconcile_inner(config, labels);
        let mut status = self.status.write().expect("not poisoned");
        status.error = result
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        if let Err(e) = &result {
            self.metrics
                .errors
                .get_or_create(&vec![("reason", e.reason())])
                .inc();
        }
        result
    }

    fn reconcile_inner(
        &mut self,
        config: &SysctlConfig,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), SysctlError> {
        let desired = plan(config, labels, &self.fs)?;
        let keep: BTreeSet<String> = desired.iter().map(|d| d.key.clone()).collect();
        for key in apply::revert(&self.fs, &mut self.store, &keep)? {
            tracing::info!(
                key,
                "sysctl left every matching profile: original value restored"
            );
            self.metrics.reverts.inc();
        }
        if desired == self.applied {
            for (d, actual) in apply::drifted(&self.fs, &desired) {
                tracing::warn!(key = %d.key, found = %actual, restoring = %d.value, "sysctl drift: re-applying");
                self.metrics
                    .drift
                    .get_or_create(&vec![("key", d.key.clone())])
                    .inc();
                *self.drift_counts.entry(d.key.clone()).or_default() += 1;
            }
        }
        let report = apply::apply(&self.fs, &desired, &mut self.store)?;
        for (key, old, new) in &report.changed {
            tracing::info!(key, old, new, "sysctl applied");
        }
        self.metrics.managed.set(desired.len() as i64);
        self.metrics.applied.clear();
        for d in &desired {
            self.metrics
                .applied
                .get_or_create(&vec![
                    ("key", d.key.clone()),
                    ("profile", d.profile.clone()),
                ])
                .set(1);
        }
        let mut profiles: Vec<String> = desired.iter().map(|d| d.profile.clone()).collect();
        profiles.sort();
        profiles.dedup();
        *self.status.write().expect("not poisoned") = pb::SysctlStatus {
            profiles,
            hash: desired_hash(&desired),
            keys: desired
                .iter()
                .map(|d| pb::SysctlKey {
                    key: d.key.clone(),
                    value: d.value.clone(),
                    profile: d.profile.clone(),
                    drift_corrections: self.drift_counts.get(&d.key).copied().unwrap_or(0),
                })
                .collect(),
            error: String::new(),
        };
        self.applied = desired;
        Ok(())
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
        match reconciler.reconcile(&config, &labels) {
            Ok(()) => {
                health.set(CAPABILITY, HealthState::Serving, "");
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
        if let Some(p) = &pods {
            reconciler.reconcile_pods(&config, &labels, &p.store.state(), &p.host);
        }
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

/// Where a one-shot command works: the host (originals recorded in the state dir) or another
/// network namespace (only namespaced `net.*` keys; nothing recorded: it dies with its pod).
#[derive(Debug, Clone)]
pub struct Target {
    pub proc_root: PathBuf,
    pub state_file: PathBuf,
    pub netns: Option<PathBuf>,
}

fn in_target<T: Send + 'static>(
    target: &Target,
    f: impl FnOnce(SysctlFs, Option<PathBuf>) -> Result<T, SysctlError> + Send + 'static,
) -> Result<T, SysctlError> {
    let fs = SysctlFs::new(&target.proc_root);
    match &target.netns {
        None => f(fs, Some(target.state_file.clone())),
        Some(ns) => netns::in_netns(ns, move || f(fs, None))?,
    }
}

fn refuse_global_keys_in_netns(target: &Target, desired: &[Desired]) -> Result<(), SysctlError> {
    if target.netns.is_none() {
        return Ok(());
    }
    let global: Vec<String> = desired
        .iter()
        .filter(|d| !netns::is_namespaced(&d.key))
        .map(|d| {
            format!(
                "profile {:?}: {} is not per network namespace; refusing to set it from inside one",
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

/// Per key: current -> desired and the winning profile. Writes nothing.
pub fn plan_report(config: &SysctlConfig, target: &Target) -> Result<String, SysctlError> {
    let (config, t) = (config.clone(), target.clone());
    in_target(target, move |fs, _| {
        let desired = plan(&config, &config.node_labels, &fs)?;
        refuse_global_keys_in_netns(&t, &desired)?;
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
    let (config, t) = (config.clone(), target.clone());
    in_target(target, move |fs, state| {
        let desired = plan(&config, &config.node_labels, &fs)?;
        refuse_global_keys_in_netns(&t, &desired)?;
        let mut store = OriginalsStore::load(state)?;
        let report = apply::apply(&fs, &desired, &mut store)?;
        let mut out = String::new();
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

/// Restores every original recorded in the state dir.
pub fn revert_all(target: &Target) -> Result<String, SysctlError> {
    let fs = SysctlFs::new(&target.proc_root);
    let mut store = OriginalsStore::load(Some(target.state_file.clone()))?;
    let restored = apply::revert(&fs, &mut store, &BTreeSet::new())?;
    Ok(format!(
        "{} key(s) restored: {}\n",
        restored.len(),
        restored.join(", ")
    ))
}
