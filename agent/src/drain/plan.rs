//! The drain plan: which of the node's pods are evicted, in which order, and which stay.
//!
//! Pure: takes the pods as listed, returns the plan. Semantics follow `kubectl drain`
//! (DaemonSet and mirror pods stay; emptyDir and unreplicated pods are refused unless allowed),
//! plus ordering beyond it: pods that are not Ready go first (their eviction does not lower any
//! budget's healthy count and it unblocks budgets), leader pods go last, and within a class lower
//! priority goes before higher.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;

use crate::pb;
use crate::selector::Selector;

pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
pub const DEFAULT_LEADER_SELECTOR: &str = "nodekeeper.io/role=leader";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    pub leader_selector: Selector,
    /// kubectl's --skip-wait-for-delete-timeout: pods Terminating longer than this are left.
    pub skip_wait_for_delete: Option<std::time::Duration>,
}

/// True when `pod` has been Terminating for longer than `after` (kubectl's
/// `skipDeletedFilter`: such a pod is neither evicted nor waited for).
pub fn terminating_longer_than(pod: &Pod, after: Option<std::time::Duration>) -> bool {
    let (Some(after), Some(since)) = (after, pod.metadata.deletion_timestamp.as_ref()) else {
        return false;
    };
    let since: std::time::SystemTime = since.0.into();
    !after.is_zero() && since.elapsed().is_ok_and(|age| age > after)
}

/// Parses the leader selector in Kubernetes' string syntax (`a=b`, `a!=b`, `a in (x,y)`,
/// `a notin (x)`, `a`, `!a`, ANDed by commas), or refuses it naming the field.
pub fn parse_leader_selector(s: &str) -> Result<Selector, String> {
    Selector::parse(s).map_err(|e| format!("leader_selector: {e}"))
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
    let mut evict: Vec<(PlannedPod, String)> = Vec::new();
    for pod in pods {
        let m = &pod.metadata;
        let (ns, name) = (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        );
        let key = format!("{ns}/{name}");
        if terminating_longer_than(pod, opts.skip_wait_for_delete) {
            out.skipped.push((ns, name, "terminating-too-long".into()));
            continue;
        }
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
        // As kubectl: only an apps/v1 DaemonSet's pods stay (a custom resource that happens to
        // be called DaemonSet does not make its pods node-bound), and only while they run: a
        // finished one is removed like any finished pod (kubectl's "DS-managed terminated pod").
        if controller.is_some_and(|c| c.kind == "DaemonSet" && c.api_version == "apps/v1")
            && !is_finished(pod)
        {
            out.skipped.push((ns, name, "daemonset".into()));
            continue;
        }
        // As kubectl: only a finished pod escapes the rules below. A Terminating one still runs
        // and may never finish (finalizers), so its emptyDir data and lack of a controller
        // still count.
        if !is_finished(pod) {
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
        let labels: HashMap<String, String> =
            m.labels.clone().unwrap_or_default().into_iter().collect();
        let class = if opts.leader_selector.matches(&labels) {
            Class::Leader
        } else if !is_ready(pod) {
            Class::NotReady
        } else {
            Class::Regular
        };
        // The workload a budget usually covers: its controller (an unowned pod is its own).
        let workload = match controller {
            Some(c) => format!("{ns}/{}/{}", c.kind, c.name),
            None => format!("{ns}/{name}"),
        };
        evict.push((
            PlannedPod {
                namespace: ns,
                name,
                uid: m.uid.clone().unwrap_or_default(),
                class,
                priority: pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
            },
            workload,
        ));
    }
    out.evict = interleave_workloads(evict);
    out
}

/// Class, then priority, then round-robin across workloads: the first pod of each workload,
/// then the second of each, and so on (by name within a workload). With a few evictions in
/// flight, a name order would fill every slot with one workload's pods, all but its budget's
/// allowance refused and backing off while the other budgets sit idle (bench_drain showed the
/// budgets worked one after another: docs/benchmarks.md); interleaved, every budget is pressed
/// at once, as `kubectl drain` does by evicting everything in parallel.
fn interleave_workloads(mut evict: Vec<(PlannedPod, String)>) -> Vec<PlannedPod> {
    evict.sort_by(|(a, wa), (b, wb)| {
        (a.class, a.priority, wa, &a.namespace, &a.name).cmp(&(
            b.class,
            b.priority,
            wb,
            &b.namespace,
            &b.name,
        ))
    });
    let mut seen: HashMap<(Class, i32, String), usize> = HashMap::new();
    let mut ranked: Vec<(usize, PlannedPod, String)> = evict
        .into_iter()
        .map(|(p, w)| {
            let n = seen.entry((p.class, p.priority, w.clone())).or_default();
            *n += 1;
            (*n, p, w)
        })
        .collect();
    ranked.sort_by(|(ra, a, wa), (rb, b, wb)| {
        (a.class, a.priority, ra, wa).cmp(&(b.class, b.priority, rb, wb))
    });
    ranked.into_iter().map(|(_, p, _)| p).collect()
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
        fn owner(self, kind: &str) -> Self {
            self.owner_in("apps/v1", kind)
        }
        fn owner_in(self, api_version: &str, kind: &str) -> Self {
            self.owned_by(api_version, kind, "o")
        }
        fn owned_by(mut self, api_version: &str, kind: &str, name: &str) -> Self {
            self.0.metadata.owner_references = Some(vec![OwnerReference {
                api_version: api_version.into(),
                kind: kind.into(),
                name: name.into(),
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
        fn phase(mut self, phase: &str) -> Self {
            self.0.status.get_or_insert_with(Default::default).phase = Some(phase.into());
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
            leader_selector: parse_leader_selector(DEFAULT_LEADER_SELECTOR).unwrap(),
            skip_wait_for_delete: None,
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

    /// bench_drain's finding (docs/benchmarks.md): in name order, the 8 evictions in flight were
    /// all one workload's pods, one budget worked at a time.
    #[test]
    fn workloads_interleave_within_a_class_and_priority_so_every_budget_is_pressed_at_once() {
        let rs = |name: &str, owner: &str| P::new(name).owned_by("apps/v1", "ReplicaSet", owner);
        let pods = vec![
            rs("a-0", "a").0,
            rs("a-1", "a").0,
            rs("a-2", "a").0,
            rs("b-0", "b").0,
            rs("b-1", "b").0,
            rs("c-0", "c").0,
            P::new("lonely").unowned().0,
            rs("a-sick", "a").ready(false).0,
            rs("b-urgent", "b").priority(5).0,
        ];
        let plan = plan(
            &pods,
            &PlanOptions {
                evict_unreplicated: true,
                ..opts()
            },
        );
        let order: Vec<_> = plan.evict.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            order,
            [
                "a-sick", // not Ready first
                "a-0", "b-0", "c-0", "lonely", // then one of each workload
                "a-1", "b-1",      // the second of each
                "a-2",      // the third
                "b-urgent", // higher priority after lower, as before
            ]
        );
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
    fn leader_selector_takes_the_full_selector_syntax_or_is_refused() {
        let s = parse_leader_selector("app=db, role==primary").unwrap();
        assert_eq!(s.requirements().len(), 2);
        let labels = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let s = parse_leader_selector("role in (leader,primary),tier!=cache,!canary,zone").unwrap();
        assert!(s.matches(&labels(&[("role", "primary"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[
            ("role", "primary"),
            ("zone", "a"),
            ("canary", "")
        ])));
        assert!(!s.matches(&labels(&[
            ("role", "primary"),
            ("zone", "a"),
            ("tier", "cache")
        ])));
        assert!(!s.matches(&labels(&[("role", "replica"), ("zone", "a")])));
        let s = parse_leader_selector("role notin (replica)").unwrap();
        assert!(
            s.matches(&labels(&[])),
            "notin matches a pod without the key"
        );
        for bad in ["nonsense in", "a in (", "", "a=b,,=c", "a ~ b"] {
            let e = parse_leader_selector(bad).unwrap_err();
            assert!(e.starts_with("leader_selector:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn only_an_apps_v1_daemonset_keeps_its_pod() {
        let pods = vec![
            P::new("real").owner("DaemonSet").0,
            P::new("custom")
                .owner_in("apps.kruise.io/v1alpha1", "DaemonSet")
                .0,
        ];
        let p = plan(&pods, &opts());
        let evicted: Vec<_> = p.evict.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(evicted, ["custom"]);
        assert_eq!(p.skipped.len(), 1);
    }

    /// The promise "a drain never evicts DaemonSet or mirror pods", attacked with everything
    /// that puts other pods first or lets them through: not Ready, a leader label, emptyDir, no
    /// Ready condition at all, the highest priority, Terminating, and every option allowing
    /// evictions (a leader selector matching every pod). A finished DaemonSet pod is the one
    /// exception, as in kubectl.
    #[test]
    fn daemonset_and_mirror_pods_stay_whatever_else_they_are() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let terminating = |p: P| {
            let mut pod = p.0;
            pod.metadata.deletion_timestamp = Some(Time(Default::default()));
            pod
        };
        let no_status = |p: P| {
            let mut pod = p.0;
            pod.status = None;
            pod
        };
        let pods = vec![
            P::new("ds-sick").owner("DaemonSet").ready(false).0,
            P::new("ds-leader").owner("DaemonSet").leader().0,
            P::new("ds-scratch").owner("DaemonSet").empty_dir().0,
            P::new("ds-urgent").owner("DaemonSet").priority(i32::MAX).0,
            no_status(P::new("ds-new").owner("DaemonSet")),
            terminating(P::new("ds-going").owner("DaemonSet")),
            P::new("static-sick").mirror().ready(false).0,
            P::new("static-leader").mirror().leader().unowned().0,
            P::new("static-node-owned")
                .mirror()
                .owner_in("v1", "Node")
                .0,
            P::new("static-scratch").mirror().empty_dir().0,
            terminating(P::new("static-going").mirror()),
            P::new("static-done").mirror().phase("Succeeded").0,
            P::new("ds-done").owner("DaemonSet").phase("Failed").0,
        ];
        let everything = PlanOptions {
            delete_emptydir_data: true,
            evict_unreplicated: true,
            leader_selector: parse_leader_selector("!no-such-label").unwrap(),
            skip_wait_for_delete: None,
        };
        for opts in [opts(), everything] {
            let p = plan(&pods, &opts);
            let evicted: Vec<_> = p.evict.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(evicted, ["ds-done"], "only the finished DaemonSet pod goes");
            assert!(p.refused.is_empty(), "{:?}", p.refused);
            for pod in &pods[..pods.len() - 1] {
                let name = pod.metadata.name.as_deref().unwrap();
                assert_eq!(outcome(&p, name), Outcome::Stay, "{name}");
            }
        }
    }

    #[test]
    fn terminating_pods_still_count_for_emptydir_and_unreplicated_but_finished_ones_do_not() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let terminating = |p: P| {
            let mut pod = p.0;
            pod.metadata.deletion_timestamp = Some(Time(Default::default()));
            pod
        };
        let finished = |p: P| {
            let mut pod = p.0;
            pod.status.get_or_insert_with(Default::default).phase = Some("Succeeded".into());
            pod
        };
        let pods = vec![
            terminating(P::new("scratch").empty_dir()),
            terminating(P::new("lonely").unowned()),
            finished(P::new("done-scratch").empty_dir()),
            finished(P::new("done-lonely").unowned()),
        ];
        let p = plan(&pods, &opts());
        let mut refused: Vec<_> = p.refused.iter().map(|(k, _)| k.as_str()).collect();
        refused.sort();
        assert_eq!(refused, ["ns/lonely", "ns/scratch"]);
    }

    /// What the plan does with one pod.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Evict,
        Stay,
        Refuse,
    }

    fn outcome(p: &Plan, name: &str) -> Outcome {
        if p.refused.iter().any(|(k, _)| k == &format!("ns/{name}")) {
            Outcome::Refuse
        } else if p.evict.iter().any(|e| e.name == name) {
            Outcome::Evict
        } else {
            assert!(
                p.skipped.iter().any(|(_, n, _)| n == name),
                "{name} unplanned"
            );
            Outcome::Stay
        }
    }

    /// kubectl `pkg/cmd/drain/drain_test.go` `TestDrain`, the filter cases, ported by
    /// description: kubectl's `--force` is `evict_unreplicated`, `--delete-emptydir-data` is
    /// `delete_emptydir_data`. One deliberate difference: nodekeeper always behaves as
    /// `--ignore-daemonsets` (a running DaemonSet pod stays; kubectl without the flag refuses
    /// the drain), so "DS-managed pod" expects Stay where kubectl is fatal. "fail to list pods"
    /// is not a filter case (drain_wire covers API errors).
    #[test]
    fn kubectl_test_drain_filter_cases() {
        use Outcome::*;
        let rc = || P::new("bar").owner_in("v1", "ReplicationController");
        let ds = || P::new("bar").owner("DaemonSet");
        let job = || P::new("bar").owner_in("v1", "Job");
        let naked = || P::new("bar").unowned();
        // (description, pod, --force, --delete-emptydir-data, expected)
        let cases: Vec<(&str, P, bool, bool, Outcome)> = vec![
            ("RC-managed pod", rc(), false, false, Evict),
            ("DS-managed pod", ds(), false, false, Stay),
            (
                "DS-managed terminated pod",
                ds().phase("Succeeded"),
                false,
                false,
                Evict,
            ),
            ("orphaned DS-managed pod", naked(), false, false, Refuse),
            (
                "orphaned DS-managed pod with --force",
                naked(),
                true,
                false,
                Evict,
            ),
            (
                "DS-managed pod with --ignore-daemonsets",
                ds(),
                false,
                false,
                Stay,
            ),
            (
                "DS-managed pod with emptyDir with --ignore-daemonsets",
                ds().empty_dir(),
                false,
                false,
                Stay,
            ),
            (
                "Job-managed pod with local storage",
                job().empty_dir(),
                true,
                true,
                Evict,
            ),
            (
                "Job-managed terminated pod",
                job().empty_dir().phase("Succeeded"),
                false,
                false,
                Evict,
            ),
            ("RS-managed pod", P::new("bar"), false, false, Evict),
            ("naked pod", naked(), false, false, Refuse),
            ("naked pod with --force", naked(), true, false, Evict),
            (
                "pod with EmptyDir",
                naked().empty_dir(),
                true,
                false,
                Refuse,
            ),
            (
                "terminated pod with emptyDir",
                naked().empty_dir().phase("Failed"),
                false,
                false,
                Evict,
            ),
            (
                "pod with EmptyDir and --delete-emptydir-data",
                naked().empty_dir(),
                true,
                true,
                Evict,
            ),
        ];
        for (description, pod, force, emptydir, want) in cases {
            let o = PlanOptions {
                evict_unreplicated: force,
                delete_emptydir_data: emptydir,
                ..opts()
            };
            let p = plan(&[pod.0], &o);
            assert_eq!(outcome(&p, "bar"), want, "{description}: {p:?}");
        }
        // "empty node": nothing to do, nothing refused.
        let p = plan(&[], &opts());
        assert!(p.evict.is_empty() && p.skipped.is_empty() && p.refused.is_empty());
    }
}
