//! The drain plan: which of the node's pods are evicted, in which order, and which stay.
//!
//! Pure: takes the pods as listed, returns the plan. Semantics follow `kubectl drain`
//! (DaemonSet and mirror pods stay; emptyDir and unreplicated pods are refused unless allowed),
//! plus ordering beyond it: pods that are not Ready go first (their eviction does not lower any
//! budget's healthy count and it unblocks budgets), leader pods go last, and within a class lower
//! priority goes before higher.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use crate::pb;
use crate::sysctl::profile::LabelSelector;

pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
pub const DEFAULT_LEADER_SELECTOR: &str = "nodekeeper.io/role=leader";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    NotReady,
    Regular,
    Leader,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotReady => "not-ready",
            Self::Regular => "regular",
            Self::Leader => "leader",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub class: Class,
    pub priority: i32,
}

impl PlannedPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn to_pb(&self) -> pb::PlannedPod {
        pb::PlannedPod {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            class: self.class.as_str().to_string(),
            priority: self.priority,
        }
    }

    pub fn pod_ref(&self) -> pb::PodRef {
        pb::PodRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// In eviction order.
    pub evict: Vec<PlannedPod>,
    /// (namespace/name, reason) of pods that stay.
    pub skipped: Vec<(String, String, String)>,
    /// Pods that block the drain unless the request allows them: (namespace/name, why).
    pub refused: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub delete_emptydir_data: bool,
    pub evict_unreplicated: bool,
    pub leader_selector: LabelSelector,
}

/// Parses `a=b,c=d` (equality-based, as the request's leader selector) into a selector.
pub fn parse_equality_selector(s: &str) -> Result<LabelSelector, String> {
    let mut match_labels = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once("==")
            .or_else(|| part.split_once('='))
            .ok_or_else(|| format!("leader_selector: {part:?} is not key=value"))?;
        if k.trim().is_empty() {
            return Err(format!("leader_selector: {part:?} has an empty key"));
        }
        match_labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    if match_labels.is_empty() {
        return Err("leader_selector: empty".into());
    }
    Ok(LabelSelector {
        match_labels,
        match_expressions: Vec::new(),
    })
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

pub fn plan(pods: &[Pod], opts: &PlanOptions) -> Plan {
    let mut out = Plan::default();
    for pod in pods {
        let m = &pod.metadata;
        let (ns, name) = (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        );
        let key = format!("{ns}/{name}");
        if m.annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
        {
            out.skipped.push((ns, name, "mirror".into()));
            continue;
        }
        let controller = m
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|r| r.controller == Some(true)));
        if controller.is_some_and(|c| c.kind == "DaemonSet") {
            out.skipped.push((ns, name, "daemonset".into()));
            continue;
        }
        // A pod already being deleted is still waited for, but never blocks on the rules below.
        let terminating = m.deletion_timestamp.is_some() || is_finished(pod);
        if !terminating {
            if controller.is_none() && !opts.evict_unreplicated {
                out.refused.push((key.clone(), "has no controller (set evict_unreplicated to evict it; it will not be recreated)".into()));
            }
            let empty_dir = pod
                .spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .is_some_and(|v| v.iter().any(|v| v.empty_dir.is_some()));
            if empty_dir && !opts.delete_emptydir_data {
                out.refused.push((
                    key,
                    "uses emptyDir (set delete_emptydir_data to evict it; the data is lost)".into(),
                ));
            }
        }
        let labels = m.labels.clone().unwrap_or_default();
        let class = if opts.leader_selector.matches(&labels) {
            Class::Leader
        } else if !is_ready(pod) {
            Class::NotReady
        } else {
            Class::Regular
        };
        out.evict.push(PlannedPod {
            namespace: ns,
            name,
            uid: m.uid.clone().unwrap_or_default(),
            class,
            priority: pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
        });
    }
    out.evict.sort_by(|a, b| {
        (a.class, a.priority, &a.namespace, &a.name).cmp(&(
            b.class,
            b.priority,
            &b.namespace,
            &b.name,
        ))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        EmptyDirVolumeSource, PodCondition, PodSpec, PodStatus, Volume,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    /// Pod::test("web-1").owner("ReplicaSet").ready(true)...
    struct P(Pod);
    impl P {
        fn new(name: &str) -> Self {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.metadata.namespace = Some("ns".into());
            p.metadata.uid = Some(format!("uid-{name}"));
            p.spec = Some(PodSpec::default());
            P(p).owner("ReplicaSet").ready(true)
        }
        fn owner(mut self, kind: &str) -> Self {
            self.0.metadata.owner_references = Some(vec![OwnerReference {
                kind: kind.into(),
                name: "o".into(),
                controller: Some(true),
                ..Default::default()
            }]);
            self
        }
        fn unowned(mut self) -> Self {
            self.0.metadata.owner_references = None;
            self
        }
        fn ready(mut self, ready: bool) -> Self {
            self.0.status = Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            self
        }
        fn leader(mut self) -> Self {
            self.0.metadata.labels =
                Some([("nodekeeper.io/role".to_string(), "leader".to_string())].into());
            self
        }
        fn mirror(mut self) -> Self {
            self.0.metadata.annotations =
                Some([(MIRROR_ANNOTATION.to_string(), "x".to_string())].into());
            self
        }
        fn priority(mut self, p: i32) -> Self {
            self.0.spec.as_mut().unwrap().priority = Some(p);
            self
        }
        fn empty_dir(mut self) -> Self {
            self.0.spec.as_mut().unwrap().volumes = Some(vec![Volume {
                name: "s".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]);
            self
        }
    }

    fn opts() -> PlanOptions {
        PlanOptions {
            delete_emptydir_data: false,
            evict_unreplicated: false,
            leader_selector: parse_equality_selector(DEFAULT_LEADER_SELECTOR).unwrap(),
        }
    }

    #[test]
    fn order_is_not_ready_then_regular_by_priority_then_leaders() {
        let pods = vec![
            P::new("leader").leader().0,
            P::new("high").priority(1000).0,
            P::new("low").priority(-5).0,
            P::new("sick").ready(false).priority(9999).0,
            P::new("ds").owner("DaemonSet").0,
            P::new("static").mirror().0,
        ];
        let plan = plan(&pods, &opts());
        let order: Vec<_> = plan.evict.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(order, ["sick", "low", "high", "leader"]);
        let skipped: Vec<_> = plan
            .skipped
            .iter()
            .map(|(_, n, r)| format!("{n}:{r}"))
            .collect();
        assert_eq!(skipped, ["ds:daemonset", "static:mirror"]);
        assert!(plan.refused.is_empty());
    }

    #[test]
    fn emptydir_and_unreplicated_pods_are_refused_unless_allowed() {
        let pods = vec![
            P::new("scratch").empty_dir().0,
            P::new("lonely").unowned().0,
        ];
        let p = plan(&pods, &opts());
        assert_eq!(p.refused.len(), 2);
        let allowed = PlanOptions {
            delete_emptydir_data: true,
            evict_unreplicated: true,
            ..opts()
        };
        assert!(plan(&pods, &allowed).refused.is_empty());
    }

    #[test]
    fn leader_selector_parses() {
        let s = parse_equality_selector("app=db, role==primary").unwrap();
        assert_eq!(s.match_labels.len(), 2);
        assert!(parse_equality_selector("nonsense").is_err());
        assert!(parse_equality_selector("").is_err());
    }
}
