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

use std::collections::{BTreeSet, HashMap};
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

/// A pod's labels and the node it runs on.
type PlacedPod = (HashMap<String, String>, String);

/// Where the cluster's pods run, by namespace: each pod's labels and node. Built from the
/// aggregator's pod watch at each fan-out.
#[derive(Debug, Clone, Default)]
pub struct PodPlacement {
    by_namespace: HashMap<String, Vec<PlacedPod>>,
}

impl PodPlacement {
    /// Scheduled pods that may hold sockets: pods without a node yet and finished pods
    /// (Succeeded, Failed) have none, so their node's agent is not needed for them.
    pub fn from_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Self {
        let mut by_namespace: HashMap<String, Vec<_>> = HashMap::new();
        for pod in pods {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let (Some(node), Some(ns)) = (node, pod.metadata.namespace.clone()) else {
                continue;
            };
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
            let labels = pod
                .metadata
                .labels
                .as_ref()
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            by_namespace.entry(ns).or_default().push((labels, node));
        }
        Self { by_namespace }
    }

    /// The nodes hosting a pod `q` selects.
    pub fn nodes_hosting(&self, q: &Query) -> BTreeSet<String> {
        self.by_namespace
            .get(&q.namespace)
            .into_iter()
            .flatten()
            .filter(|(labels, _)| q.selector.matches(labels))
            .map(|(_, node)| node.clone())
            .collect()
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
        last_known: Option<(Instant, Arc<Vec<pb::PodConnections>>)>,
    },
}

/// Every expected agent of one fan-out.
#[derive(Debug, Clone, Default)]
pub struct FleetCensus {
    pub agents: Vec<AgentCensus>,
    /// Where pods run (the aggregator's pod watch, once synced); `None`: unknown, and every
    /// expected agent matters to every query.
    pub placement: Option<Arc<PodPlacement>>,
}

/// A missing agent (or a node hosting selected pods without any agent) as an error names it.
struct Missing<'a> {
    name: &'a str,
    error: &'a str,
    last_age: Option<Duration>,
}

impl FleetCensus {
    /// The pods query `q` may sum, one slice per counted agent, or: NOT_FOUND when the pod
    /// placement knows no pod `q` selects; UNAVAILABLE when fewer than `q.coverage.min_percent`
    /// of the agents that matter can be counted (an agent that did not answer counts through its
    /// last census only when `lastKnownFor` allows its age). The agents that matter are those
    /// on nodes hosting a selected pod, plus agents whose node is unknown; without a placement,
    /// every expected agent.
    pub fn select(&self, q: &Query) -> Result<Vec<&[pb::PodConnections]>, Status> {
        let nodes = self.placement.as_ref().map(|p| p.nodes_hosting(q));
        if nodes.as_ref().is_some_and(BTreeSet::is_empty) {
            return Err(Status::not_found(format!(
                "no pod in namespace {} matches podSelector {:?} (the aggregator's pod watch \
                 knows none)",
                q.namespace,
                q.selector.to_string()
            )));
        }
        self.select_at(&q.coverage, nodes.as_ref(), Instant::now())
    }

    fn select_at(
        &self,
        policy: &CoveragePolicy,
        nodes: Option<&BTreeSet<String>>,
        now: Instant,
    ) -> Result<Vec<&[pb::PodConnections]>, Status> {
        if self.agents.is_empty() {
            return Err(Status::unavailable(
                "no node agent is expected (empty --agents, or the agents' Service has no \
                 endpoints): no census to sum",
            ));
        }
        let matters =
            |a: &AgentCensus| a.node.is_empty() || nodes.is_none_or(|n| n.contains(&a.node));
        let mut counted = Vec::with_capacity(self.agents.len());
        let mut counted_that_matter = 0usize;
        let mut missing = Vec::new();
        // Nodes hosting selected pods where no agent is expected: their pods cannot be counted.
        let without_agent: Vec<String> = nodes
            .into_iter()
            .flatten()
            .filter(|n| !self.agents.iter().any(|a| &a.node == *n))
            .map(|n| format!("node {n}"))
            .collect();
        for name in &without_agent {
            missing.push(Missing {
                name,
                error: "hosts selected pods but no node agent is expected there",
                last_age: None,
            });
        }
        for a in &self.agents {
            match &a.state {
                AgentState::Answered { pods, .. } => {
                    counted.push(pods.as_slice());
                    counted_that_matter += usize::from(matters(a));
                }
                // Down on a node without a selected pod: it had nothing to add.
                AgentState::Missing { .. } if !matters(a) => {}
                AgentState::Missing { error, last_known } => {
                    let usable = match (last_known, policy.last_known_for) {
                        (Some((at, pods)), Some(max))
                            if now.saturating_duration_since(*at) <= max =>
                        {
                            Some(pods)
                        }
                        _ => None,
                    };
                    match usable {
                        Some(pods) => {
                            counted.push(pods.as_slice());
                            counted_that_matter += 1;
                        }
                        None => missing.push(Missing {
                            name: &a.name,
                            error,
                            last_age: last_known
                                .as_ref()
                                .map(|(at, _)| now.saturating_duration_since(*at)),
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
        let which = if nodes.is_some() {
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

fn secs(d: Duration) -> String {
    format!("{:.1}s ago", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(n: usize) -> Arc<Vec<pb::PodConnections>> {
        Arc::new(vec![pb::PodConnections::default(); n])
    }

    fn fleet(now: Instant) -> FleetCensus {
        FleetCensus {
            agents: vec![
                AgentCensus {
                    node: "node-a".into(),
                    name: "10.0.0.1:9741 (node-a)".into(),
                    state: AgentState::Answered {
                        pods: pods(3),
                        at: now,
                    },
                },
                AgentCensus {
                    node: "node-b".into(),
                    name: "10.0.0.2:9741 (node-b)".into(),
                    state: AgentState::Missing {
                        error: "connection refused".into(),
                        last_known: Some((now - Duration::from_secs(40), pods(2))),
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
            .select_at(&CoveragePolicy::default(), None, now)
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
            counted(f.select_at(&policy(75.0, None), None, now)),
            vec![3, 1, 1]
        );
        assert!(f.select_at(&policy(75.1, None), None, now).is_err());
    }

    #[test]
    fn last_known_counts_a_missing_agent_only_while_young_enough() {
        let now = Instant::now();
        let f = fleet(now);
        assert_eq!(
            counted(f.select_at(&policy(100.0, Some(40)), None, now)),
            vec![3, 2, 1, 1]
        );
        let e = f
            .select_at(&policy(100.0, Some(39)), None, now)
            .unwrap_err();
        assert!(e.message().contains("node-b"), "{e:?}");
    }

    #[test]
    fn no_expected_agent_is_unavailable_not_zero() {
        let e = FleetCensus::default()
            .select_at(&policy(1.0, Some(3600)), None, Instant::now())
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
        .select_at(&CoveragePolicy::default(), None, now)
        .unwrap_err();
        assert!(
            e.message().contains("agent-4: timeout; and 3 more"),
            "{e:?}"
        );
        assert!(!e.message().contains("agent-5"), "{e:?}");
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
}
