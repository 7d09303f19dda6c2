//! Pod-level sysctls: namespaced `net.*` keys applied inside the network namespaces of this
//! node's pods, selected by a profile's `podSelector` or (when allowed) by the pod's own
//! `nodekeeper.io/sysctls` annotation, for workloads that need them without kubelet's
//! unsafe-sysctl flag.
//!
//! A pod's namespace is found through its cgroup (pod UID -> PIDs -> `/proc/PID/ns/net`) and
//! entered on a dedicated thread. hostNetwork pods and any namespace that is the host's are
//! skipped: pod tuning never touches the node. Each pod is tuned once per desired set; its
//! namespace dies with it, so nothing is recorded for revert.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Pod;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};

use super::apply::{self, OriginalsStore, SysctlFs};
use super::profile::{self, Desired, Profile};
use super::{SysctlConfig, SysctlError, desired_hash, netns, validate};
use crate::host::HostPaths;
use crate::pod_cgroups;

/// The pod annotation a workload sets to ask for sysctls: `net.core.somaxconn=8192,net.ipv4.tcp_tw_reuse=1`.
pub const POD_ANNOTATION: &str = "nodekeeper.io/sysctls";

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PodAnnotationConfig {
    /// Honour `nodekeeper.io/sysctls` on pods. Off by default: it lets any workload on the node
    /// tune its own namespace within the policy below.
    pub enabled: bool,
    /// When non-empty, annotation keys must also match one of these globs (on top of the policy
    /// and the per-namespace rule).
    pub allow: Vec<String>,
}

/// Parses the annotation into a pseudo-profile that loses to every configured profile.
fn annotation_profile(pod: &Pod) -> Option<Result<Profile, String>> {
    let text = pod.metadata.annotations.as_ref()?.get(POD_ANNOTATION)?;
    let mut sysctls = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Some(Err(format!("{POD_ANNOTATION}: {pair:?} is not key=value")));
        };
        sysctls.insert(
            k.trim().to_string(),
            profile::SysctlValue(profile::SysctlValue::normalise(v)),
        );
    }
    let name = format!(
        "annotation:{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    Some(Ok(Profile {
        name,
        priority: i32::MIN,
        node_selector: None,
        pod_selector: Some(crate::selector::LabelSelector::default()),
        sysctls,
    }))
}

#[derive(Debug, Clone, Default)]
pub struct PodMetrics {
    pub applies: Family<Vec<(&'static str, &'static str)>, Counter>,
}

/// Applies pod-level sysctls to the pods that need them; remembers what each pod got.
#[derive(Debug, Default)]
pub struct PodTuner {
    /// Pod UID -> hash of the desired set last applied there.
    applied: HashMap<String, String>,
    pub metrics: PodMetrics,
}

impl PodTuner {
    pub fn new(metrics: PodMetrics) -> Self {
        Self {
            applied: HashMap::new(),
            metrics,
        }
    }

    pub fn reconcile(
        &mut self,
        config: &SysctlConfig,
        node_labels: &BTreeMap<String, String>,
        pods: &[std::sync::Arc<Pod>],
        host: &HostPaths,
    ) {
        let live: std::collections::HashSet<&str> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        self.applied.retain(|uid, _| live.contains(uid.as_str()));
        let has_pod_profiles = config.profiles.iter().any(|p| p.pod_selector.is_some());
        if !has_pod_profiles && !config.pod_annotation.enabled {
            return;
        }
        let cgroups: HashMap<String, pod_cgroups::PodCgroup> = pod_cgroups::list(host)
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.uid.clone(), c))
            .collect();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let host_network = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            if host_network || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let pod_name = format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            let desired = match self.desired_for(config, node_labels, pod) {
                Ok(d) if d.is_empty() => continue,
                Ok(d) => d,
                Err(e) => {
                    self.count_once(&uid, "rejected", &e, &pod_name);
                    continue;
                }
            };
            let hash = desired_hash(&desired);
            if self.applied.get(&uid) == Some(&hash) {
                continue;
            }
            // Not running yet (no cgroup or no process): the next round retries.
            let Some(cg) = cgroups.get(&uid) else {
                continue;
            };
            let Some((ns_path, ns_id)) = pod_cgroups::netns(host, cg) else {
                continue;
            };
            let (fs, policy, allowed) = (
                SysctlFs::new(&host.proc),
                config.policy(),
                config.pod_annotation.allow.clone(),
            );
            // Opened once and checked against the identity found through the cgroup: a PID
            // reused since then must not lead into another namespace.
            let entered = netns::NetnsHandle::open(&ns_path).and_then(|ns| {
                ns.expect_id(&ns_id)?;
                Ok(ns)
            });
            let outcome = entered.and_then(|ns| ns.run(move || -> Result<usize, SysctlError> {
                let release = fs.read("kernel/osrelease").unwrap_or_default();
                let rejections: Vec<String> =
                    validate::check(&desired, &policy, |d| fs.read(&d.path).ok())
                        .into_iter()
                        .map(|r| r.to_string())
                        .chain(annotation_refusals(&desired, &allowed))
                        .chain(desired.iter().filter(|d| !netns::is_namespaced_on(&d.key, &release)).map(|d| {
                            format!("profile {:?}: {} is not per network namespace on kernel {release}", d.profile, d.key)
                        }))
                        .collect();
                if !rejections.is_empty() {
                    return Err(SysctlError::Rejected(rejections));
                }
                let mut store = OriginalsStore::load(None, apply::Owner::Daemon)?;
                Ok(apply::apply(&fs, &desired, &mut store)?.changed.len())
            }))
            .map_err(SysctlError::from)
            .and_then(|r| r);
            match outcome {
                Ok(changed) => {
                    tracing::info!(pod = %pod_name, changed, "pod sysctls applied in its network namespace");
                    self.metrics
                        .applies
                        .get_or_create(&vec![("result", "applied")])
                        .inc();
                    self.applied.insert(uid, hash);
                }
                Err(e) => self.count_once(&uid, e.reason(), &e.to_string(), &pod_name),
            }
        }
    }

    /// Counts and logs a pod's failure once per desired set, so a bad pod does not spam.
    fn count_once(&mut self, uid: &str, reason: &'static str, error: &str, pod: &str) {
        let marker = format!("failed:{reason}:{error}");
        if self.applied.get(uid) != Some(&marker) {
            tracing::warn!(pod, error, "pod sysctls not applied");
            self.metrics
                .applies
                .get_or_create(&vec![("result", reason)])
                .inc();
            self.applied.insert(uid.to_string(), marker);
        }
    }

    fn desired_for(
        &self,
        config: &SysctlConfig,
        node_labels: &BTreeMap<String, String>,
        pod: &Pod,
    ) -> Result<Vec<Desired>, String> {
        let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
        let annotation = if config.pod_annotation.enabled {
            annotation_profile(pod).transpose()?
        } else {
            None
        };
        let desired = profile::resolve_for_pod(
            config.profiles.iter().chain(annotation.iter()),
            node_labels,
            &pod_labels,
        )
        .map_err(|e| e.join("; "))?;
        let global: Vec<String> = desired
            .iter()
            .filter(|d| !netns::is_namespaced(&d.key))
            .map(|d| {
                format!(
                    "profile {:?}: {} is not per network namespace",
                    d.profile, d.key
                )
            })
            .collect();
        if global.is_empty() {
            Ok(desired)
        } else {
            Err(global.join("; "))
        }
    }
}

/// Annotation-sourced keys outside `podAnnotation.allow` (when that list is set).
fn annotation_refusals(desired: &[Desired], allow: &[String]) -> Vec<String> {
    if allow.is_empty() {
        return Vec::new();
    }
    desired
        .iter()
        .filter(|d| {
            d.profile.starts_with("annotation:")
                && !allow.iter().any(|p| validate::glob_match(p, &d.key))
        })
        .map(|d| {
            format!(
                "profile {:?}: {} is not in sysctl.podAnnotation.allow",
                d.profile, d.key
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotation: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("web-1".into());
        p.metadata.namespace = Some("shop".into());
        p.metadata.annotations =
            Some([(POD_ANNOTATION.to_string(), annotation.to_string())].into());
        p
    }

    #[test]
    fn annotation_parses_into_a_lowest_priority_profile() {
        let p = annotation_profile(&pod(
            "net.core.somaxconn=8192, net.ipv4.ip_local_port_range=1024 65000",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(p.name, "annotation:shop/web-1");
        assert_eq!(p.priority, i32::MIN);
        assert_eq!(p.sysctls["net.ipv4.ip_local_port_range"].0, "1024 65000");
        assert!(
            annotation_profile(&pod("net.core.somaxconn"))
                .unwrap()
                .is_err()
        );
        assert!(annotation_profile(&Pod::default()).is_none());
    }

    #[test]
    fn global_keys_are_refused_for_pods() {
        let config = SysctlConfig {
            pod_annotation: PodAnnotationConfig {
                enabled: true,
                allow: vec![],
            },
            ..Default::default()
        };
        let e = PodTuner::default()
            .desired_for(&config, &BTreeMap::new(), &pod("vm.swappiness=1"))
            .unwrap_err();
        assert!(e.contains("not per network namespace"), "{e}");
    }
}
