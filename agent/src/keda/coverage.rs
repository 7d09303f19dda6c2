//! Coverage: which part of the fleet stands behind a value the aggregator hands KEDA.
//!
//! The HPA scales a workload in whenever the value falls, so a sum over the agents that happened
//! to answer is worse than no value: KEDA applies the ScaledObject's `fallback` on an error, but
//! believes a smaller number. Owns `FleetCensus` (every expected agent: answered now, or missing
//! with its last census if any) and the one decision `FleetCensus::select` makes per query under
//! its `CoveragePolicy`: the pods to sum, or UNAVAILABLE naming the agents that are missing.
//! Never fetches anything: the aggregator's fan-out builds the census.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

use crate::keda::query::CoveragePolicy;
use crate::pb;

/// At most this many missing agents are named in an error (the rest are counted): a message
/// KEDA logs per poll must stay readable on a 1,000-node cluster.
const NAMED_IN_ERROR: usize = 5;

/// One expected agent as the last fan-out left it.
#[derive(Debug, Clone)]
pub struct AgentCensus {
    /// `host:port`, and the node when known (`address (node)` in messages).
    pub name: String,
    pub state: AgentState,
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
}

impl FleetCensus {
    /// The pods a query with `policy` may sum, one slice per counted agent, or UNAVAILABLE when
    /// fewer than `policy.min_percent` of the expected agents can be counted (an agent that did
    /// not answer counts through its last census only when `lastKnownFor` allows its age).
    pub fn select(&self, policy: &CoveragePolicy) -> Result<Vec<&[pb::PodConnections]>, Status> {
        self.select_at(policy, Instant::now())
    }

    fn select_at(
        &self,
        policy: &CoveragePolicy,
        now: Instant,
    ) -> Result<Vec<&[pb::PodConnections]>, Status> {
        if self.agents.is_empty() {
            return Err(Status::unavailable(
                "no node agent is expected (empty --agents, or the agents' Service has no \
                 endpoints): no census to sum",
            ));
        }
        let mut counted = Vec::with_capacity(self.agents.len());
        let mut missing = Vec::new();
        for a in &self.agents {
            match &a.state {
                AgentState::Answered { pods, .. } => counted.push(pods.as_slice()),
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
                        Some(pods) => counted.push(pods.as_slice()),
                        None => missing.push((
                            a,
                            error,
                            last_known
                                .as_ref()
                                .map(|(at, _)| now.saturating_duration_since(*at)),
                        )),
                    }
                }
            }
        }
        let expected = self.agents.len();
        let percent = 100.0 * counted.len() as f64 / expected as f64;
        if missing.is_empty() || percent >= policy.min_percent {
            return Ok(counted);
        }
        let mut named: Vec<String> = missing
            .iter()
            .take(NAMED_IN_ERROR)
            .map(|(a, error, age)| match age {
                Some(age) => format!("{}: {error} (last census {})", a.name, secs(*age)),
                None => format!("{}: {error}", a.name),
            })
            .collect();
        if missing.len() > NAMED_IN_ERROR {
            named.push(format!("and {} more", missing.len() - NAMED_IN_ERROR));
        }
        Err(Status::unavailable(format!(
            "only {} of {expected} expected node agents counted ({percent:.1}% < minCoverage \
             {}%): a partial sum would scale the workload in; missing: {}",
            counted.len(),
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
                    name: "10.0.0.1:9741 (node-a)".into(),
                    state: AgentState::Answered {
                        pods: pods(3),
                        at: now,
                    },
                },
                AgentCensus {
                    name: "10.0.0.2:9741 (node-b)".into(),
                    state: AgentState::Missing {
                        error: "connection refused".into(),
                        last_known: Some((now - Duration::from_secs(40), pods(2))),
                    },
                },
                AgentCensus {
                    name: "10.0.0.3:9741 (node-c)".into(),
                    state: AgentState::Answered {
                        pods: pods(1),
                        at: now,
                    },
                },
                AgentCensus {
                    name: "10.0.0.4:9741 (node-d)".into(),
                    state: AgentState::Answered {
                        pods: pods(1),
                        at: now,
                    },
                },
            ],
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
            .select_at(&CoveragePolicy::default(), now)
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
            counted(f.select_at(&policy(75.0, None), now)),
            vec![3, 1, 1]
        );
        assert!(f.select_at(&policy(75.1, None), now).is_err());
    }

    #[test]
    fn last_known_counts_a_missing_agent_only_while_young_enough() {
        let now = Instant::now();
        let f = fleet(now);
        assert_eq!(
            counted(f.select_at(&policy(100.0, Some(40)), now)),
            vec![3, 2, 1, 1]
        );
        let e = f.select_at(&policy(100.0, Some(39)), now).unwrap_err();
        assert!(e.message().contains("node-b"), "{e:?}");
    }

    #[test]
    fn no_expected_agent_is_unavailable_not_zero() {
        let e = FleetCensus::default()
            .select(&policy(1.0, Some(3600)))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn a_long_list_of_missing_agents_is_cut_and_counted() {
        let now = Instant::now();
        let agents = (0..8)
            .map(|i| AgentCensus {
                name: format!("agent-{i}"),
                state: AgentState::Missing {
                    error: "timeout".into(),
                    last_known: None,
                },
            })
            .collect();
        let e = FleetCensus { agents }
            .select_at(&CoveragePolicy::default(), now)
            .unwrap_err();
        assert!(
            e.message().contains("agent-4: timeout; and 3 more"),
            "{e:?}"
        );
        assert!(!e.message().contains("agent-5"), "{e:?}");
    }
}
