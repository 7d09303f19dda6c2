//! The fan-out: `NodeAgent/GetMetrics` (without per-pod resources) to every target at once,
//! each under its own deadline, at most `max_concurrency` in flight, the result cached for
//! `refresh` so every KEDA call within that window shares one fan-out.
//!
//! Owns the per-agent gRPC channels (created lazily, reused, dropped when a target leaves), the
//! cached `FleetStatus` with every agent's outcome, and the aggregator's metrics. An agent that
//! does not answer in time is in the status as not answered, in the metrics and in the log; it
//! is never silently left out. Never retries within a fan-out: the next one is `refresh` away.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use crate::aggregate::discovery::{Discovery, Target};
use crate::api::client::{endpoint, read_token};
use crate::keda::service::CENSUS_SOURCE;
use crate::pb::{self, node_agent_client::NodeAgentClient};

type AgentClient =
    NodeAgentClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` when a token is configured. Shared by every agent's
/// channel, so a rotated token file reaches them all at the next fan-out.
#[derive(Clone, Default)]
pub struct BearerToken(Arc<std::sync::RwLock<Option<AsciiMetadataValue>>>);

impl BearerToken {
    fn set(&self, token: AsciiMetadataValue) {
        *self.0.write().expect("not poisoned") = Some(token);
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = self.0.read().expect("not poisoned").as_ref() {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// How the fan-out runs.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Each agent's GetMetrics (connect included) must answer within this.
    pub deadline: Duration,
    /// A fan-out result is reused this long.
    pub refresh: Duration,
    /// Bearer token file sent to the agents (re-read each fan-out, so rotation needs no restart).
    pub token_file: Option<PathBuf>,
    /// Agents called at once.
    pub max_concurrency: usize,
}

// === metrics ===

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The aggregator's own metrics, registered on the registry `/metrics` serves.
#[derive(Debug, Clone)]
pub struct AggregateMetrics {
    agents: Family<StateLabel, Gauge>,
    duration: Histogram,
    failures: Family<ReasonLabel, Counter>,
    discovery_errors: Counter,
}

impl AggregateMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            agents: Family::default(),
            // Loopback answers in a millisecond; the default 2 s deadline caps the top.
            duration: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]),
            failures: Family::default(),
            discovery_errors: Counter::default(),
        };
        registry.register(
            "aggregate_agents",
            "Node agents in the last fan-out, by whether they answered (answered, missing)",
            m.agents.clone(),
        );
        registry.register_with_unit(
            "aggregate_fanout_duration",
            "Time for one fan-out of GetMetrics to every node agent",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "aggregate_agent_failures",
            "Node agent calls that failed in a fan-out, by reason (deadline, unavailable, census, error)",
            m.failures.clone(),
        );
        registry.register(
            "aggregate_discovery_errors",
            "EndpointSlice lists that failed (the previous agent list was used)",
            m.discovery_errors.clone(),
        );
        m
    }
}

// === impl Fleet ===

/// One fan-out's outcome.
#[derive(Debug, Clone)]
pub struct FanoutResult {
    pub status: pb::FleetStatus,
    /// The connection census of every agent that answered.
    pub pods: Arc<Vec<pb::PodConnections>>,
    pub answered: usize,
}

struct Cached {
    at: Instant,
    result: Arc<FanoutResult>,
}

struct State {
    cached: Option<Cached>,
    clients: HashMap<String, AgentClient>,
    /// The last discovered targets, used when a discovery call fails.
    targets: Option<Vec<Target>>,
    /// Addresses missing in the last fan-out, so the warning is logged when the set changes.
    missing: BTreeSet<String>,
}

/// The cached fleet view; `get` fans out when the cache is older than `refresh`.
pub struct Fleet {
    discovery: Discovery,
    config: FanoutConfig,
    metrics: AggregateMetrics,
    token: BearerToken,
    /// Held across a fan-out so concurrent callers wait for one instead of starting their own.
    state: tokio::sync::Mutex<State>,
}

impl Fleet {
    pub fn new(discovery: Discovery, config: FanoutConfig, metrics: AggregateMetrics) -> Self {
        Self {
            discovery,
            config,
            metrics,
            token: BearerToken::default(),
            state: tokio::sync::Mutex::new(State {
                cached: None,
                clients: HashMap::new(),
                targets: None,
                missing: BTreeSet::new(),
            }),
        }
    }

    /// A fan-out result at most `refresh` old.
    pub async fn get(&self) -> Arc<FanoutResult> {
        let mut state = self.state.lock().await;
        if let Some(c) = &state.cached
            && c.at.elapsed() < self.config.refresh
        {
            return c.result.clone();
        }
        let result = Arc::new(self.fan_out(&mut state).await);
        state.cached = Some(Cached {
            at: Instant::now(),
            result: result.clone(),
        });
        result
    }

    async fn fan_out(&self, state: &mut State) -> FanoutResult {
        let started = Instant::now();
        let targets = match self.discovery.targets().await {
            Ok(t) => {
                state.targets = Some(t.clone());
                t
            }
            Err(e) => {
                self.metrics.discovery_errors.inc();
                tracing::warn!(error = %e, kind = e.kind(), "agent discovery failed; using the last known agents");
                state.targets.clone().unwrap_or_default()
            }
        };
        if let Some(path) = &self.config.token_file {
            match read_token(path) {
                Ok(t) => self.token.set(t),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read --token-file; using the last token read")
                }
            }
        }
        // Channels of agents that left are dropped; new ones connect lazily on first use.
        state
            .clients
            .retain(|addr, _| targets.iter().any(|t| &t.address == addr));
        let mut calls = Vec::with_capacity(targets.len());
        for t in &targets {
            let client = match state.clients.get(&t.address) {
                Some(c) => Ok(c.clone()),
                None => self.client(&t.address).inspect(|c| {
                    state.clients.insert(t.address.clone(), c.clone());
                }),
            };
            calls.push((t.clone(), client));
        }
        let deadline = self.config.deadline;
        let outcomes: Vec<(Target, Outcome)> = futures::stream::iter(calls)
            .map(|(t, client)| async move {
                let outcome = match client {
                    Ok(c) => call(c, deadline).await,
                    Err(e) => Outcome::failed("error", e, Duration::ZERO),
                };
                (t, outcome)
            })
            .buffer_unordered(self.config.max_concurrency.max(1))
            .collect()
            .await;
        let result = self.summarize(state, outcomes);
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    fn client(&self, address: &str) -> Result<AgentClient, String> {
        let ep = endpoint(address)
            .map_err(|e| e.to_string())?
            .connect_timeout(self.config.deadline);
        Ok(NodeAgentClient::with_interceptor(
            ep.connect_lazy(),
            self.token.clone(),
        ))
    }

    fn summarize(&self, state: &mut State, mut outcomes: Vec<(Target, Outcome)>) -> FanoutResult {
        outcomes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut pods = Vec::new();
        let mut agents = Vec::with_capacity(outcomes.len());
        let mut missing = BTreeSet::new();
        for (t, o) in outcomes {
            let latency = prost_types::Duration::try_from(o.latency).ok();
            // A node whose census failed sent no pods: as unknown as one that did not answer.
            let result = match o.result {
                Ok(snap) if snap.unavailable.iter().any(|s| s == CENSUS_SOURCE) => Err((
                    "census",
                    format!("the connection census failed on node {}", snap.node_name),
                )),
                r => r,
            };
            match result {
                Ok(snap) => {
                    agents.push(pb::FleetAgent {
                        address: t.address,
                        node_name: if snap.node_name.is_empty() {
                            t.node_name
                        } else {
                            snap.node_name.clone()
                        },
                        answered: true,
                        error: String::new(),
                        latency,
                        pods: snap.connections.len() as u32,
                    });
                    pods.extend(snap.connections);
                }
                Err((reason, error)) => {
                    self.metrics
                        .failures
                        .get_or_create(&ReasonLabel { reason })
                        .inc();
                    missing.insert(if t.node_name.is_empty() {
                        t.address.clone()
                    } else {
                        format!("{} ({})", t.address, t.node_name)
                    });
                    agents.push(pb::FleetAgent {
                        address: t.address,
                        node_name: t.node_name,
                        answered: false,
                        error,
                        latency,
                        pods: 0,
                    });
                }
            }
        }
        let answered = agents.iter().filter(|a| a.answered).count();
        self.metrics
            .agents
            .get_or_create(&StateLabel { state: "answered" })
            .set(answered as i64);
        self.metrics
            .agents
            .get_or_create(&StateLabel { state: "missing" })
            .set(missing.len() as i64);
        if missing != state.missing {
            if missing.is_empty() {
                tracing::info!(agents = answered, "every node agent answered again");
            } else {
                tracing::warn!(
                    missing = ?missing,
                    answered,
                    "node agents did not answer the fan-out; their pods are left out of the sums"
                );
            }
            state.missing = missing;
        }
        FanoutResult {
            status: pb::FleetStatus {
                collected_at: Some(SystemTime::now().into()),
                agents,
            },
            pods: Arc::new(pods),
            answered,
        }
    }
}

struct Outcome {
    latency: Duration,
    /// The snapshot, or (reason label, message).
    result: Result<pb::MetricsSnapshot, (&'static str, String)>,
}

impl Outcome {
    fn failed(reason: &'static str, error: String, latency: Duration) -> Self {
        Self {
            latency,
            result: Err((reason, error)),
        }
    }
}

async fn call(mut client: AgentClient, deadline: Duration) -> Outcome {
    let started = Instant::now();
    let req = pb::GetMetricsRequest {
        exclude_pods: true,
        exclude_connections: false,
    };
    let mut request = tonic::Request::new(req);
    // The agent sees the deadline too (grpc-timeout) and can stop early.
    request.set_timeout(deadline);
    match tokio::time::timeout(deadline, client.get_metrics(request)).await {
        Ok(Ok(r)) => Outcome {
            latency: started.elapsed(),
            result: Ok(r.into_inner()),
        },
        Ok(Err(s)) if s.code() == tonic::Code::DeadlineExceeded => Outcome::failed(
            "deadline",
            format!("no answer within {deadline:?}"),
            started.elapsed(),
        ),
        Ok(Err(s)) => {
            let reason = if s.code() == tonic::Code::Unavailable {
                "unavailable"
            } else {
                "error"
            };
            Outcome::failed(reason, status_text(&s), started.elapsed())
        }
        Err(_) => Outcome::failed(
            "deadline",
            format!("no answer within {deadline:?}"),
            started.elapsed(),
        ),
    }
}

/// The status with its transport cause ("connection refused"), which tonic keeps in `source`.
fn status_text(s: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}
