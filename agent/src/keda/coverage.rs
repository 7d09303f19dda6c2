//! Coverage: which part of the fleet stands behind a value the aggregator hands KEDA.
//!
//! The HPA scales a workload in whenever the value falls, so a sum over the agents that happened
//! to answer is worse than no value: KEDA applies the ScaledObject's `fallback` on an error, but
//! believes a smaller number. Owns `FleetCensus` (every expected agent: answered now, or missing
//! with its last census if any; and where the cluster's pods run, from the aggregator's pod
//! watch) and the one decision `FleetCensus::select` makes per query under its
//! `CoveragePolicy`: the pods to sum, or UNAVAILABLE naming the agents that are missing. With a
//! pod placement only the agents on nodes hosting a pod the query selects matter: an agent that
//! is down on a node without such a pod changes nothing in the sum, and a query that selects
//! no pod is NOT_FOUND whoever answered. Never fetches anything: the aggregator's fan-out
//! builds the census.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use tonic::Status;

use crate::keda::query::{CoveragePolicy, Query};
use crate::pb;

/// At most this many missing agents are named in an error (the rest are counted): a message
/// KEDA logs per poll must stay readable on a 1,000-node cluster.
const NAMED_IN_ERROR: usize = 5;

/// One expected agent as the last fan-out left it.
#[derive(Debug, Clone)]
pub struct AgentCensus {
    /// `host:port`, and the node when known (`address (node)` in messages).
    pub name: String,
    /// The node it runs on (its EndpointSlice's `nodeName`, else the node its census named);
    /// empty when unknown, and then it matters to every query.
    pub node: String,
    pub state: AgentState,
}

/// One scheduled pod as placement needs it.
#[derive(Debug, Clone)]
struct PlacedPod {
    uid: String,
    name: String,
    labels: HashMap<String, String>,
    node: String,
    /// Running and not terminating: it has its network namespace, so its node's census must
    /// name it.
    running: bool,
}

/// A selected pod its node's census must name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectedPod {
    pub uid: String,
    pub name: String,
}

/// Where the cluster's pods run, by namespace: each pod's identity, labels and node. Built from
/// the aggregator's pod watch at each fan-out; `not_current` when that watch has not synced or
/// is failing, and then no query can be answered from it.
#[derive(Debug, Clone, Default)]
pub struct PodPlacement {
    by_namespace: HashMap<String, Vec<PlacedPod>>,
    /// Every pod with a node (finished ones too), for `verify`.
    known: Vec<KnownPod>,
    /// Indexes into `known`.
    by_uid: HashMap<String, usize>,
    by_name: HashMap<(String, String), usize>,
    /// UIDs the pod watch saw deleted lately (`kube::DeletedPods`).
    deleted: std::collections::HashSet<String>,
    not_current: Option<String>,
}

/// The `source` of the entry `PodPlacement::verify` keeps in a census for a pod the pod view
/// does not know (and did not see deleted): it stands for an unknown value, never for a number
/// (decision #18-l).
pub const VIEW_BEHIND: &str = "unknown: pod view behind";

/// Whether `p` is `verify`'s stand-in for a pod the pod view does not know.
pub fn is_view_behind(p: &pb::PodConnections) -> bool {
    p.source == VIEW_BEHIND
}

/// Whether query `q` may select the pod `verify` could not name: its labels as the agent
/// reported them match, or are unknown (the agent could not name it either).
fn may_select(q: &Query, p: &pb::PodConnections) -> bool {
    is_view_behind(p)
        && (p.namespace.is_empty() || (p.namespace == q.namespace && q.selector.matches(&p.labels)))
}

/// A pod the API places on a node, as `verify` needs it.
#[derive(Debug, Clone)]
struct KnownPod {
    uid: String,
    namespace: String,
    name: String,
    labels: HashMap<String, String>,
    node: String,
}

/// Why `PodPlacement::verify` refused a pod an agent reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// The pod watch places it on another node (or on none yet).
    OtherNode,
    /// The pod watch knows no such pod (by UID, nor by namespace/name), nor saw it deleted:
    /// the watch may be behind (`verify` keeps a `VIEW_BEHIND` stand-in for it).
    Unknown,
    /// The pod watch saw it deleted, or the agent reports it terminating: not counted, and not
    /// a sign that the view is behind.
    Deleted,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::OtherNode => "other_node",
            Self::Unknown => "unknown",
            Self::Deleted => "deleted",
        }
    }
}

/// A pod of an agent's census that is not counted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ForeignPod {
    pub reason: Refusal,
    /// As the agent reported them.
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Where the pod watch places it (OtherNode; empty: not scheduled).
    pub placed_on: String,
}

impl std::fmt::Display for ForeignPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} (uid {:?}): ", self.namespace, self.name, self.uid)?;
        match self.reason {
            Refusal::OtherNode if self.placed_on.is_empty() => {
                f.write_str("the API has not scheduled it on any node")
            }
            Refusal::OtherNode => write!(f, "the API places it on node {}", self.placed_on),
            Refusal::Unknown => f.write_str(
                "the API knows no such pod (pod view behind, or a rogue agent): queries that may \
                 select it are UNAVAILABLE",
            ),
            Refusal::Deleted => f.write_str("deleted (terminating) in the API"),
        }
    }
}

impl PodPlacement {
    /// Scheduled pods that may hold sockets: pods without a node yet and finished pods
    /// (Succeeded, Failed) have none, so their node's agent is not needed for them.
    pub fn from_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Self {
        let mut by_namespace: HashMap<String, Vec<_>> = HashMap::new();
        let (mut known, mut by_uid, mut by_name) = (Vec::new(), HashMap::new(), HashMap::new());
        let pods: Vec<&Pod> = pods.into_iter().collect();
        // A pod's own UID wins over any alias; an alias is a real mirror's and unambiguous
        // (decision #18-p), whatever the listing order.
        let aliases = crate::kube::mirror_aliases(pods.iter().copied());
        let mut aliased = Vec::new();
        for pod in pods {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let labels: HashMap<String, String> = pod
                .metadata
                .labels
                .as_ref()
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            if let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if !uid.is_empty() {
                    by_uid.insert(uid.clone(), known.len());
                }
                // A static pod's cgroup has the UID of its mirror's annotation.
                if let Some(mirror) =
                    crate::kube::mirror_alias(pod).filter(|a| aliases.contains(*a))
                {
                    aliased.push((mirror.to_string(), known.len()));
                }
                by_name.insert((ns.clone(), name.clone()), known.len());
                known.push(KnownPod {
                    uid,
                    namespace: ns.clone(),
                    name: name.clone(),
                    labels: labels.clone(),
                    node: node.clone().unwrap_or_default(),
                });
            }
            let (Some(node), Some(ns)) = (node, pod.metadata.namespace.clone()) else {
                continue;
            };
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
            by_namespace.entry(ns).or_default().push(PlacedPod {
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                labels,
                node,
                // A terminating pod may be gone from its node's census before the API says so.
                running: phase == Some("Running") && pod.metadata.deletion_timestamp.is_none(),
            });
        }
        by_uid.extend(aliased);
        Self {
            by_namespace,
            known,
            by_uid,
            by_name,
            deleted: Default::default(),
            not_current: None,
        }
    }

    /// The UIDs the pod watch saw deleted lately: `verify` refuses them as deleted instead of
    /// standing them in as unknown.
    pub fn with_deleted(mut self, uids: std::collections::HashSet<String>) -> Self {
        self.deleted = uids;
        self
    }

    /// The pods of `pods` (one agent's census) that the API places on `node`, the agent's node
    /// from its EndpointSlice, each with the namespace, name, UID and labels of the pod watch
    /// (a census cannot move a pod into a selection); and those refused. An entry with a UID is
    /// found by that UID only (a UID the watch does not know is refused, even if its
    /// namespace/name is a recreated pod's); an entry without a UID by namespace/name. A rogue or confused
    /// agent can then only misreport the pods of its own node. A pod the watch does not know
    /// (nor saw deleted, nor the agent reports terminating) is refused AND kept as a `VIEW_BEHIND`
    /// stand-in with no value and an `error`, the agent's namespace and labels: it is never
    /// added to a sum, and a query that may select it is UNAVAILABLE naming it (decision
    /// #18-l). Call only on a current placement: a not-current one knows no pod.
    pub fn verify(
        &self,
        node: &str,
        pods: &[pb::PodConnections],
    ) -> (Vec<pb::PodConnections>, Vec<ForeignPod>) {
        let mut kept: Vec<pb::PodConnections> = Vec::with_capacity(pods.len());
        let mut refused = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in pods {
            // An entry with a UID is that pod only: by namespace/name it could be a recreated
            // pod's dead predecessor standing for (and counted as) its successor.
            let found = if p.uid.is_empty() {
                self.by_name
                    .get(&(p.namespace.clone(), p.name.clone()))
                    .filter(|_| !p.namespace.is_empty() && !p.name.is_empty())
            } else {
                self.by_uid.get(&p.uid)
            }
            .map(|&i| &self.known[i]);
            let foreign = |reason, placed_on: &str| ForeignPod {
                reason,
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                placed_on: placed_on.to_string(),
            };
            match found {
                None if p.deletion_timestamp.is_some() || self.deleted.contains(&p.uid) => {
                    refused.push(foreign(Refusal::Deleted, ""))
                }
                None => {
                    refused.push(foreign(Refusal::Unknown, ""));
                    kept.push(pb::PodConnections {
                        uid: p.uid.clone(),
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        labels: p.labels.clone(),
                        error: "the aggregator's pod view does not know this pod (pod view \
                                behind): its value is unknown"
                            .into(),
                        source: VIEW_BEHIND.into(),
                        ..Default::default()
                    });
                }
                Some(k) if node.is_empty() || k.node != node => {
                    refused.push(foreign(Refusal::OtherNode, &k.node))
                }
                // One pod is counted once per census: a second entry for its UID (a buggy
                // agent reading its cgroup twice, a rogue one) is dropped (adversary #18c).
                Some(k) if !k.uid.is_empty() && !seen.insert(k.uid.clone()) => {}
                Some(k) => {
                    let mut p = p.clone();
                    p.uid.clone_from(&k.uid);
                    p.namespace.clone_from(&k.namespace);
                    p.name.clone_from(&k.name);
                    p.labels.clone_from(&k.labels);
                    kept.push(p);
                }
            }
        }
        (kept, refused)
    }

    /// A placement that cannot be trusted (`why`): every query answered from it is UNAVAILABLE.
    pub fn not_current(why: String) -> Self {
        Self {
            not_current: Some(why),
            ..Self::default()
        }
    }

    /// Why this placement is not current, if it is not.
    pub fn not_current_reason(&self) -> Option<&str> {
        self.not_current.as_deref()
    }

    /// The nodes hosting a pod `q` selects, each with the selected Running pods its census
    /// must name (a Pending pod may have no network namespace yet).
    pub fn selected_by_node(&self, q: &Query) -> BTreeMap<String, Vec<ExpectedPod>> {
        let mut out: BTreeMap<String, Vec<ExpectedPod>> = BTreeMap::new();
        for p in self
            .by_namespace
            .get(&q.namespace)
            .into_iter()
            .flatten()
            .filter(|p| q.selector.matches(&p.labels))
        {
            let expected = out.entry(p.node.clone()).or_default();
            if p.running {
                expected.push(ExpectedPod {
                    uid: p.uid.clone(),
                    name: p.name.clone(),
                });
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub enum AgentState {
    /// Its census, counted at `at`.
    Answered {
        pods: Arc<Vec<pb::PodConnections>>,
        at: Instant,
    },
    /// No census this time (`error` says why); the last census it sent, if any.
    Missing {
        error: String,
        last_known: Option<LastKnown>,
    },
}

/// A missing agent's last census.
#[derive(Debug, Clone)]
pub struct LastKnown {
    pub at: Instant,
    pub pods: Arc<Vec<pb::PodConnections>>,
    /// The remotes pinned when it was asked for: any other remote beyond topRemotes may be
    /// folded into `other` in it.
    pub pinned: Arc<Vec<String>>,
}

/// Every expected agent of one fan-out.
#[derive(Debug, Clone, Default)]
pub struct FleetCensus {
    pub agents: Vec<AgentCensus>,
    /// Where pods run (the aggregator's pod watch); `None`: no pod watch (`--agents`), and
    /// every expected agent matters to every query.
    pub placement: Option<Arc<PodPlacement>>,
}

/// A missing agent (or a node hosting selected pods without any agent) as an error names it.
struct Missing<'a> {
    name: &'a str,
    error: std::borrow::Cow<'a, str>,
    last_age: Option<Duration>,
}

/// Why an agent's census cannot stand for its node in query `q`: a selected pod whose census
/// failed, or a selected pod the placement puts on the node that the census does not name (an
/// entry with a UID by that UID only, one without by namespace/name) with labels the selector matches.
fn incomplete(q: &Query, pods: &[pb::PodConnections], expected: &[ExpectedPod]) -> Option<String> {
    let selected =
        |p: &pb::PodConnections| p.namespace == q.namespace && q.selector.matches(&p.labels);
    if let Some(p) = pods.iter().find(|p| may_select(q, p)) {
        let labels = if p.namespace.is_empty() {
            "its labels are unknown"
        } else {
            "its labels match"
        };
        return Some(format!(
            "its census names pod {}/{} (uid {:?}) that the aggregator's pod view does not know \
             ({labels}): pod view behind (a pod created since the watch's last event, or a \
             silent watch), its value is unknown",
            p.namespace, p.name, p.uid
        ));
    }
    let failed = |p: &pb::PodConnections| !p.error.is_empty() && p.deletion_timestamp.is_none();
    if let Some(p) = pods.iter().find(|p| selected(p) && failed(p)) {
        return Some(format!(
            "the census of selected pod {}/{} failed ({}): its value is unknown",
            p.namespace, p.name, p.error
        ));
    }
    // An entry with a UID names only that pod, never a same-name successor.
    let names = |p: &pb::PodConnections, e: &ExpectedPod| {
        if p.uid.is_empty() || e.uid.is_empty() {
            p.name == e.name
        } else {
            p.uid == e.uid
        }
    };
    let named = |e: &ExpectedPod| pods.iter().any(|p| selected(p) && names(p, e));
    expected.iter().find(|e| !named(e)).map(|e| {
        format!(
            "its census does not name selected pod {}/{} (the agent's pod view has not seen it \
             yet, or names it with other labels)",
            q.namespace, e.name
        )
    })
}

impl FleetCensus {
    /// The pods query `q` may sum, one slice per counted agent, or: UNAVAILABLE when the pod
    /// placement is not current; NOT_FOUND when the placement knows no pod `q` selects;
    /// UNAVAILABLE when fewer than `q.coverage.min_percent` of the agents that matter can be
    /// counted (an agent that did not answer counts through its last census only when
    /// `lastKnownFor` allows its age and the census was asked with `q.remote` pinned; an agent
    /// whose census is incomplete for `q` does not count). The agents that matter are those on
    /// nodes hosting a selected pod, plus agents whose node is unknown; without a placement,
    /// every expected agent.
    pub fn select(&self, q: &Query) -> Result<Vec<&[pb::PodConnections]>, Status> {
        if let Some(why) = self.placement.as_ref().and_then(|p| p.not_current_reason()) {
            return Err(Status::unavailable(format!(
                "pod placement not current: {why}; the nodes hosting the selected pods are \
                 unknown, and a sum without some of them would scale the workload in"
            )));
        }
        let selected = self.placement.as_ref().map(|p| p.selected_by_node(q));
        let unknown_selected = self.agents.iter().any(|a| names_unknown(q, a));
        if selected.as_ref().is_some_and(BTreeMap::is_empty) && !unknown_selected {
            return Err(Status::not_found(format!(
                "no pod in namespace {} matches podSelector {:?} (the aggregator's pod watch \
                 knows none)",
                q.namespace,
                q.selector.to_string()
            )));
        }
        self.select_at(q, selected.as_ref(), Instant::now())
    }

    fn select_at(
        &self,
        q: &Query,
        selected: Option<&BTreeMap<String, Vec<ExpectedPod>>>,
        now: Instant,
    ) -> Result<Vec<&[pb::PodConnections]>, Status> {
        let policy: &CoveragePolicy = &q.coverage;
        if self.agents.is_empty() {
            return Err(Status::unavailable(
                "no node agent is expected (empty --agents, or the agents' Service has no \
                 endpoints): no census to sum",
            ));
        }
        // With a placement, an agent without a node counts no pod (`verify` refuses them all)
        // and matters to no query: it must not raise the coverage (adversary #18c). Without
        // one (`--agents`) every expected agent matters.
        // An agent naming a pod q may select that the pod view does not know matters wherever
        // it runs: that pod may be the only selected one on its node (decision #18-l).
        let matters = |a: &AgentCensus| {
            selected.is_none_or(|n| !a.node.is_empty() && n.contains_key(&a.node))
                || names_unknown(q, a)
        };
        let expected_on = |a: &AgentCensus| -> &[ExpectedPod] {
            selected
                .and_then(|n| n.get(&a.node))
                .map_or(&[], Vec::as_slice)
        };
        let mut counted = Vec::with_capacity(self.agents.len());
        let mut counted_that_matter = 0usize;
        let mut missing = Vec::new();
        // Nodes hosting selected pods where no agent is expected: their pods cannot be counted.
        let without_agent: Vec<String> = selected
            .into_iter()
            .flat_map(BTreeMap::keys)
            .filter(|n| !self.agents.iter().any(|a| &a.node == *n))
            .map(|n| format!("node {n}"))
            .collect();
        for name in &without_agent {
            missing.push(Missing {
                name,
                error: "hosts selected pods but no node agent is expected there".into(),
                last_age: None,
            });
        }
        for a in &self.agents {
            match &a.state {
                AgentState::Answered { pods, .. } => {
                    match incomplete(q, pods, expected_on(a)) {
                        // Incomplete where it matters: its node's share is unknown.
                        Some(why) if matters(a) => missing.push(Missing {
                            name: &a.name,
                            error: why.into(),
                            last_age: None,
                        }),
                        _ => {
                            counted.push(pods.as_slice());
                            counted_that_matter += usize::from(matters(a));
                        }
                    }
                }
                // Down on a node without a selected pod: it had nothing to add.
                AgentState::Missing { .. } if !matters(a) => {}
                AgentState::Missing { error, last_known } => {
                    let young = |lk: &&LastKnown| {
                        policy
                            .last_known_for
                            .is_some_and(|max| now.saturating_duration_since(lk.at) <= max)
                    };
                    // A census asked before q's remote was pinned may hold it in `other`.
                    let pinned = |lk: &&LastKnown| {
                        q.remote
                            .as_ref()
                            .is_none_or(|r| lk.pinned.iter().any(|p| *p == r.to_string()))
                    };
                    let last_age = last_known
                        .as_ref()
                        .map(|lk| now.saturating_duration_since(lk.at));
                    match last_known.as_ref().filter(young) {
                        Some(lk) if !pinned(&lk) => missing.push(Missing {
                            name: &a.name,
                            error: format!(
                                "{error}; its last census was asked for before remote {} was \
                                 pinned (it may be folded into other)",
                                q.remote
                                    .as_ref()
                                    .map(ToString::to_string)
                                    .unwrap_or_default()
                            )
                            .into(),
                            last_age,
                        }),
                        Some(lk) => match incomplete(q, &lk.pods, expected_on(a)) {
                            Some(why) => missing.push(Missing {
                                name: &a.name,
                                error: format!("{error}; last census: {why}").into(),
                                last_age,
                            }),
                            None => {
                                counted.push(lk.pods.as_slice());
                                counted_that_matter += 1;
                            }
                        },
                        None => missing.push(Missing {
                            name: &a.name,
                            error: error.as_str().into(),
                            last_age,
                        }),
                    }
                }
            }
        }
        let expected = counted_that_matter + missing.len();
        let percent = 100.0 * counted_that_matter as f64 / expected.max(1) as f64;
        if missing.is_empty() || percent >= policy.min_percent {
            return Ok(counted);
        }
        let mut named: Vec<String> = missing
            .iter()
            .take(NAMED_IN_ERROR)
            .map(|m| match m.last_age {
                Some(age) => format!("{}: {} (last census {})", m.name, m.error, secs(age)),
                None => format!("{}: {}", m.name, m.error),
            })
            .collect();
        if missing.len() > NAMED_IN_ERROR {
            named.push(format!("and {} more", missing.len() - NAMED_IN_ERROR));
        }
        let which = if selected.is_some() {
            " (on nodes hosting the selected pods)"
        } else {
            ""
        };
        Err(Status::unavailable(format!(
            "only {counted_that_matter} of {expected} expected node agents counted{which} \
             ({percent:.1}% < minCoverage {}%): a partial sum would scale the workload in; \
             missing: {}",
            policy.min_percent,
            named.join("; ")
        )))
    }
}

/// Whether `a`'s census (its last one when it did not answer) names a pod `q` may select that
/// the pod view does not know.
fn names_unknown(q: &Query, a: &AgentCensus) -> bool {
    let pods = match &a.state {
        AgentState::Answered { pods, .. } => pods,
        AgentState::Missing {
            last_known: Some(lk),
            ..
        } => &lk.pods,
        AgentState::Missing { .. } => return false,
    };
    pods.iter().any(|p| may_select(q, p))
}

fn secs(d: Duration) -> String {
    format!("{:.1}s ago", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(n: usize) -> Arc<Vec<pb::PodConnections>> {
        Arc::new(vec![pb::PodConnections::default(); n])
    }

    fn web(name: &str, uid: &str) -> pb::PodConnections {
        pb::PodConnections {
            uid: uid.into(),
            namespace: "shop".into(),
            name: name.into(),
            labels: HashMap::from([("app".to_string(), "web".to_string())]),
            ..Default::default()
        }
    }

    /// node-a's census names web-node-a (placed()'s name for the web pod on node-a).
    fn fleet(now: Instant) -> FleetCensus {
        let mut node_a = vec![web("web-node-a", "")];
        node_a.extend(pods(2).iter().cloned());
        FleetCensus {
            agents: vec![
                AgentCensus {
                    node: "node-a".into(),
                    name: "10.0.0.1:9741 (node-a)".into(),
                    state: AgentState::Answered {
                        pods: Arc::new(node_a),
                        at: now,
                    },
                },
                AgentCensus {
                    node: "node-b".into(),
                    name: "10.0.0.2:9741 (node-b)".into(),
                    state: AgentState::Missing {
                        error: "connection refused".into(),
                        last_known: Some(LastKnown {
                            at: now - Duration::from_secs(40),
                            pods: pods(2),
                            pinned: Arc::default(),
                        }),
                    },
                },
                AgentCensus {
                    node: "node-c".into(),
                    name: "10.0.0.3:9741 (node-c)".into(),
                    state: AgentState::Answered {
                        pods: pods(1),
                        at: now,
                    },
                },
                AgentCensus {
                    node: "node-d".into(),
                    name: "10.0.0.4:9741 (node-d)".into(),
                    state: AgentState::Answered {
                        pods: pods(1),
                        at: now,
                    },
                },
            ],
            placement: None,
        }
    }

    fn policy(min_percent: f64, last_known_for: Option<u64>) -> CoveragePolicy {
        CoveragePolicy {
            min_percent,
            last_known_for: last_known_for.map(Duration::from_secs),
        }
    }

    fn counted(r: Result<Vec<&[pb::PodConnections]>, Status>) -> Vec<usize> {
        r.unwrap_or_else(|e| panic!("{e:?}"))
            .iter()
            .map(|p| p.len())
            .collect()
    }

    #[test]
    fn one_missing_agent_is_an_error_naming_it_by_default() {
        let now = Instant::now();
        let e = fleet(now)
            .select_at(&with(CoveragePolicy::default()), None, now)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let m = e.message();
        assert!(
            m.contains("only 3 of 4 expected node agents counted"),
            "{m}"
        );
        assert!(
            m.contains("10.0.0.2:9741 (node-b): connection refused (last census 40.0s ago)"),
            "{m}"
        );
    }

    #[test]
    fn min_coverage_accepts_a_partial_sum_at_or_above_it() {
        let now = Instant::now();
        let f = fleet(now);
        assert_eq!(
            counted(f.select_at(&with(policy(75.0, None)), None, now)),
            vec![3, 1, 1]
        );
        assert!(f.select_at(&with(policy(75.1, None)), None, now).is_err());
    }

    #[test]
    fn last_known_counts_a_missing_agent_only_while_young_enough() {
        let now = Instant::now();
        let f = fleet(now);
        assert_eq!(
            counted(f.select_at(&with(policy(100.0, Some(40))), None, now)),
            vec![3, 2, 1, 1]
        );
        let e = f
            .select_at(&with(policy(100.0, Some(39))), None, now)
            .unwrap_err();
        assert!(e.message().contains("node-b"), "{e:?}");
    }

    #[test]
    fn no_expected_agent_is_unavailable_not_zero() {
        let e = FleetCensus::default()
            .select_at(&with(policy(1.0, Some(3600))), None, Instant::now())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn a_long_list_of_missing_agents_is_cut_and_counted() {
        let now = Instant::now();
        let agents = (0..8)
            .map(|i| AgentCensus {
                node: String::new(),
                name: format!("agent-{i}"),
                state: AgentState::Missing {
                    error: "timeout".into(),
                    last_known: None,
                },
            })
            .collect();
        let e = FleetCensus {
            agents,
            placement: None,
        }
        .select_at(&with(CoveragePolicy::default()), None, now)
        .unwrap_err();
        assert!(
            e.message().contains("agent-4: timeout; and 3 more"),
            "{e:?}"
        );
        assert!(!e.message().contains("agent-5"), "{e:?}");
    }

    fn with(coverage: CoveragePolicy) -> Query {
        let mut q = query(&[]);
        q.coverage = coverage;
        q
    }

    fn query(extra: &[(&str, &str)]) -> Query {
        let mut meta: std::collections::HashMap<String, String> = [
            ("metric", "established"),
            ("target", "5"),
            ("podSelector", "app=web"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            meta.insert(k.to_string(), v.to_string());
        }
        Query::parse(&crate::keda_pb::ScaledObjectRef {
            name: "web".into(),
            namespace: "shop".into(),
            scaler_metadata: meta,
        })
        .unwrap()
    }

    fn placed(pods: &[(&str, &str, &str, &str)]) -> Option<Arc<PodPlacement>> {
        let pods: Vec<Pod> = pods
            .iter()
            .map(|(ns, app, node, phase)| {
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("{app}-{node}"), "namespace": ns,
                                 "labels": {"app": app}},
                    "spec": {"nodeName": node, "containers": []},
                    "status": {"phase": phase},
                }))
                .unwrap()
            })
            .collect();
        Some(Arc::new(PodPlacement::from_pods(&pods)))
    }

    #[test]
    fn with_a_placement_only_agents_hosting_selected_pods_matter() {
        let now = Instant::now();
        let mut f = fleet(now);
        // node-b (missing) hosts only api pods and a finished web pod; web pods run on a and c.
        f.placement = placed(&[
            ("shop", "web", "node-a", "Running"),
            ("shop", "web", "node-c", "Pending"),
            ("shop", "api", "node-b", "Running"),
            ("shop", "web", "node-b", "Succeeded"),
            ("other", "web", "node-b", "Running"),
        ]);
        assert_eq!(counted(f.select(&query(&[]))), vec![3, 1, 1]);
        let e = f.select(&query(&[("podSelector", "app=api")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            e.message()
                .contains("only 0 of 1 expected node agents counted (on nodes hosting")
                && e.message().contains("node-b"),
            "{e:?}"
        );
    }

    #[test]
    fn a_node_hosting_selected_pods_without_an_agent_is_missing() {
        let now = Instant::now();
        let mut f = fleet(now);
        f.placement = placed(&[
            ("shop", "web", "node-a", "Running"),
            ("shop", "web", "node-z", "Running"),
        ]);
        let e = f.select(&query(&[])).unwrap_err();
        assert!(
            e.message().contains("only 1 of 2")
                && e.message().contains(
                    "node node-z: hosts selected pods but no node agent is expected there"
                ),
            "{e:?}"
        );
        assert_eq!(
            counted(f.select(&query(&[("minCoverage", "50")]))),
            vec![3, 1, 1]
        );
    }

    #[test]
    fn a_selector_the_placement_does_not_match_is_not_found_whoever_is_missing() {
        let now = Instant::now();
        let mut f = fleet(now);
        f.placement = placed(&[("shop", "web", "node-a", "Running")]);
        let e = f
            .select(&query(&[("podSelector", "app=nothing")]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        // Without a placement (not synced yet) every expected agent matters.
        f.placement = None;
        let e = f.select(&query(&[])).unwrap_err();
        assert!(e.message().contains("only 3 of 4"), "{e:?}");
    }

    #[test]
    fn a_placement_that_is_not_current_makes_every_query_unavailable() {
        let mut f = fleet(Instant::now());
        f.placement = Some(Arc::new(PodPlacement::not_current(
            "the aggregator's pod watch has not synced yet (started 3s ago)".into(),
        )));
        for q in [
            query(&[]),
            query(&[("minCoverage", "1"), ("lastKnownFor", "600")]),
        ] {
            let e = f.select(&q).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable);
            assert!(
                e.message()
                    .starts_with("pod placement not current: the aggregator's pod watch"),
                "{e:?}"
            );
        }
    }

    fn placed_uid(pods: &[(&str, &str, &str)]) -> Option<Arc<PodPlacement>> {
        let pods: Vec<Pod> = pods
            .iter()
            .map(|(name, uid, node)| {
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "uid": uid, "namespace": "shop",
                                 "labels": {"app": "web"}},
                    "spec": {"nodeName": node, "containers": []},
                    "status": {"phase": "Running"},
                }))
                .unwrap()
            })
            .collect();
        Some(Arc::new(PodPlacement::from_pods(&pods)))
    }

    fn one_agent(pods: Vec<pb::PodConnections>) -> FleetCensus {
        FleetCensus {
            agents: vec![AgentCensus {
                node: "node-a".into(),
                name: "10.0.0.1:9741 (node-a)".into(),
                state: AgentState::Answered {
                    pods: Arc::new(pods),
                    at: Instant::now(),
                },
            }],
            placement: None,
        }
    }

    #[test]
    fn a_census_must_name_every_running_selected_pod_its_node_hosts() {
        // Named by UID (what the census keys pods on), else by name...
        let mut f = one_agent(vec![web("web-1", "uid-1"), web("other-name", "uid-2")]);
        f.placement = placed_uid(&[("web-1", "uid-1", "node-a"), ("web-2", "uid-2", "node-a")]);
        assert_eq!(counted(f.select(&query(&[]))), vec![2]);
        // ...a pod the census holds by UID only (its pod view has not named it) is not named...
        let mut unnamed = web("", "uid-2");
        unnamed.namespace.clear();
        unnamed.labels.clear();
        let mut f = one_agent(vec![web("web-1", "uid-1"), unnamed]);
        f.placement = placed_uid(&[("web-1", "uid-1", "node-a"), ("web-2", "uid-2", "node-a")]);
        let e = f.select(&query(&[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            e.message().contains(
                "10.0.0.1:9741 (node-a): its census does not name selected pod shop/web-2"
            ),
            "{e:?}"
        );
        // ...nor is one it has never seen; minCoverage still decides whether that is enough.
        let mut f = one_agent(vec![web("web-1", "uid-1")]);
        f.placement = placed_uid(&[("web-1", "uid-1", "node-a"), ("web-2", "uid-2", "node-a")]);
        assert!(f.select(&query(&[])).is_err());
        // A Pending pod may have no network namespace yet: not required.
        let mut f = one_agent(vec![web("web-1", "uid-1")]);
        let pending: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-2", "uid": "uid-2", "namespace": "shop",
                         "labels": {"app": "web"}},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Pending"},
        }))
        .unwrap();
        let mut pods: Vec<Pod> = vec![pending];
        pods.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-1", "uid": "uid-1", "namespace": "shop",
                             "labels": {"app": "web"}},
                "spec": {"nodeName": "node-a", "containers": []},
                "status": {"phase": "Running"},
            }))
            .unwrap(),
        );
        f.placement = Some(Arc::new(PodPlacement::from_pods(&pods)));
        assert_eq!(counted(f.select(&query(&[]))), vec![1]);
    }

    #[test]
    fn a_selected_pod_whose_census_failed_makes_its_agent_missing() {
        let mut failed = web("web-2", "uid-2");
        failed.error = "cannot enter /proc/42/ns/net".into();
        let f = one_agent(vec![web("web-1", "uid-1"), failed]);
        let e = f.select(&query(&[])).unwrap_err();
        assert!(
            e.message()
                .contains("the census of selected pod shop/web-2 failed (cannot enter"),
            "{e:?}"
        );
        // A failed pod the query does not select changes nothing.
        assert_eq!(
            counted(f.select(&query(&[("podSelector", "app=api")]))),
            vec![2]
        );
    }

    #[test]
    fn a_last_census_asked_before_the_remote_was_pinned_is_not_used() {
        let now = Instant::now();
        let last = |pinned: &[&str]| FleetCensus {
            agents: vec![AgentCensus {
                node: "node-b".into(),
                name: "10.0.0.2:9741 (node-b)".into(),
                state: AgentState::Missing {
                    error: "connection refused".into(),
                    last_known: Some(LastKnown {
                        at: now,
                        pods: pods(1),
                        pinned: Arc::new(pinned.iter().map(ToString::to_string).collect()),
                    }),
                },
            }],
            placement: None,
        };
        let q = query(&[("remote", "*:8081"), ("lastKnownFor", "600")]);
        let e = last(&[]).select(&q).unwrap_err();
        assert!(
            e.message()
                .contains("asked for before remote *:8081 was pinned"),
            "{e:?}"
        );
        assert_eq!(counted(last(&["*:8081"]).select(&q)), vec![1]);
        // A query without a remote needs no pin.
        assert_eq!(
            counted(last(&[]).select(&query(&[("lastKnownFor", "600")]))),
            vec![1]
        );
    }

    #[test]
    fn verify_counts_only_pods_the_api_places_on_the_agents_node() {
        let placement = placed_uid(&[("web-1", "u1", "node-a"), ("web-2", "u2", "node-b")]);
        let placement = placement.unwrap();
        let mut relabelled = web("web-1", "u1");
        // The census cannot move a pod into (or out of) a selection.
        relabelled.namespace = "elsewhere".into();
        relabelled.labels = HashMap::from([("app".to_string(), "api".to_string())]);
        let census = vec![
            relabelled,
            web("web-2", "u2"),
            web("web-ghost", "u9"),
            // No UID: found by namespace/name.
            web("web-1", ""),
            // A UID the view does not know, a name it does (a recreated pod's dead
            // predecessor): unknown, never counted as its same-name successor.
            web("web-1", "stale"),
        ];
        let (kept, refused) = placement.verify("node-a", &census);
        // The pods the view does not know stand in as unknown values (decision #18-l).
        let behind: Vec<&str> = kept
            .iter()
            .filter(|p| is_view_behind(p))
            .map(|p| p.uid.as_str())
            .collect();
        assert_eq!(behind, ["u9", "stale"]);
        let kept: Vec<(&str, &str, &str, Option<&String>)> = kept
            .iter()
            .filter(|p| !is_view_behind(p))
            .map(|p| {
                (
                    p.namespace.as_str(),
                    p.name.as_str(),
                    p.uid.as_str(),
                    p.labels.get("app"),
                )
            })
            .collect();
        let web = "web".to_string();
        // web-1 is named twice (by UID, then by name): counted once (adversary #18c).
        assert_eq!(kept, [("shop", "web-1", "u1", Some(&web))]);
        let refused: Vec<(Refusal, &str, &str)> = refused
            .iter()
            .map(|r| (r.reason, r.name.as_str(), r.placed_on.as_str()))
            .collect();
        assert_eq!(
            refused,
            [
                (Refusal::OtherNode, "web-2", "node-b"),
                (Refusal::Unknown, "web-ghost", ""),
                (Refusal::Unknown, "web-1", ""),
            ]
        );
        // An agent whose node is unknown counts nothing.
        let (kept, refused) = placement.verify("", &census[..1]);
        assert!(kept.is_empty() && refused.len() == 1);
    }

    #[test]
    fn a_pod_the_view_does_not_know_is_never_summed_and_makes_queries_that_may_select_it_unavailable()
     {
        let placement = placed_uid(&[("web-1", "uid-1", "node-a")]).unwrap();
        let fleet = |census: Vec<pb::PodConnections>, placement: &PodPlacement| {
            let (kept, _) = placement.verify("node-a", &census);
            let mut f = one_agent(kept);
            f.placement = Some(Arc::new(placement.clone()));
            f
        };
        let mut new = web("web-3", "uid-3");
        new.established = 50;
        // Reported with the selected labels: UNAVAILABLE naming it...
        let f = fleet(vec![web("web-1", "uid-1"), new.clone()], &placement);
        let e = f.select(&query(&[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            e.message().contains(
                "its census names pod shop/web-3 (uid \"uid-3\") that the aggregator's pod view \
                 does not know (its labels match): pod view behind"
            ),
            "{e:?}"
        );
        // ...minCoverage still decides (the agent is not counted, its stand-in adds nothing)...
        let two = placed_uid(&[("web-1", "uid-1", "node-a"), ("web-2", "uid-2", "node-c")]);
        let (kept, _) = two
            .as_ref()
            .unwrap()
            .verify("node-a", &[web("web-1", "uid-1"), new.clone()]);
        let mut f = one_agent(kept);
        f.agents.push(AgentCensus {
            node: "node-c".into(),
            name: "10.0.0.3:9741 (node-c)".into(),
            state: AgentState::Answered {
                pods: Arc::new(vec![web("web-2", "uid-2")]),
                at: Instant::now(),
            },
        });
        f.placement = two;
        assert!(f.select(&query(&[])).is_err());
        assert_eq!(counted(f.select(&query(&[("minCoverage", "50")]))), vec![1]);
        // ...a query it cannot select is answered...
        let mut api = web("api-1", "uid-4");
        api.labels = HashMap::from([("app".to_string(), "api".to_string())]);
        let f = fleet(vec![web("web-1", "uid-1"), api], &placement);
        assert_eq!(counted(f.select(&query(&[]))), vec![2]);
        // ...labels unknown (the agent could not name it either): any query may select it...
        let mut unnamed = web("", "uid-5");
        unnamed.namespace.clear();
        unnamed.labels.clear();
        let f = fleet(vec![web("web-1", "uid-1"), unnamed.clone()], &placement);
        let e = f.select(&query(&[])).unwrap_err();
        assert!(e.message().contains("(its labels are unknown)"), "{e:?}");
        // ...even on a node hosting no pod the view selects (a scale-out onto a new node).
        let e = fleet(
            vec![new.clone()],
            &placed_uid(&[("web-1", "uid-1", "node-b")]).unwrap(),
        )
        .select(&query(&[]))
        .unwrap_err();
        assert!(e.message().contains("shop/web-3"), "{e:?}");
        // A pod the watch saw deleted, or the agent reports terminating: left out, no error.
        let placement = (*placement)
            .clone()
            .with_deleted(["uid-5".to_string()].into());
        let f = fleet(vec![web("web-1", "uid-1"), unnamed], &placement);
        assert_eq!(counted(f.select(&query(&[]))), vec![1]);
        new.deletion_timestamp = Some(prost_types::Timestamp::default());
        let (kept, refused) = placement.verify("node-a", &[new]);
        assert!(kept.is_empty());
        assert_eq!(refused[0].reason, Refusal::Deleted);
    }

    #[test]
    fn a_static_pod_is_known_by_its_mirrors_annotation() {
        let mirror: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "etcd-node-a", "uid": "api-uid", "namespace": "kube-system",
                         "annotations": {crate::kube::MIRROR_ANNOTATION: "hash-uid"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
                                              "name": "node-a", "uid": "node-uid"}]},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap();
        let placement = PodPlacement::from_pods(&[mirror]);
        let (kept, refused) = placement.verify("node-a", &[web("", "hash-uid")]);
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(kept[0].name, "etcd-node-a");
    }
}
