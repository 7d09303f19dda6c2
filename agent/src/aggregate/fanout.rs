//! The fan-out: `NodeAgent/GetMetrics` (without per-pod resources) to every expected agent at
//! once, each waited for up to the deadline, at most `max_concurrency` waited for at a time, the
//! result cached for `refresh` so every KEDA call within that window shares one fan-out.
//!
//! Each agent's call is single-flight and detached from the fan-out that started it: a census
//! slower than the deadline keeps running (up to `CALL_LIMIT`), is stored when it arrives and
//! answers the next fan-out (a "late" answer, reported with its age), instead of being dropped
//! and started over by every caller. An agent never has two calls in flight.
//!
//! Owns the per-agent gRPC channels (created lazily, reused, dropped when a target leaves), each
//! agent's call in flight and last census, the cached `FleetStatus` with every agent's outcome,
//! and the aggregator's metrics. An agent that does not answer in time is in the status as not
//! answered, in the metrics and in the log, and lowers the coverage every KEDA answer is checked
//! against (keda::coverage); it is never silently left out.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt as _, StreamExt as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use crate::aggregate::agent_tls::{AgentTls, Reload};
use crate::aggregate::discovery::{Discovery, Target};
use crate::aggregate::pods::PodWatch;
use crate::api::client::{endpoint, read_token};
use crate::keda::coverage::{
    AgentCensus, AgentState, FleetCensus, ForeignPod, LastKnown, PodPlacement, is_view_behind,
};
use crate::keda::service::{CENSUS_SOURCE, pod_view_not_current};
use crate::metrics::connections::pins::{PinnedRemotes, PinsFull};
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

/// A detached call gives up after this: KEDA's default pollingInterval, so a census still
/// running after a whole poll is reported as too slow (reason `timeout`) instead of piling up.
pub const CALL_LIMIT: Duration = Duration::from_secs(30);

/// A late answer (a census that arrived after its fan-out's deadline) serves the next fan-out
/// only if at most this old: one KEDA polling interval, so it is never older than the poll
/// before.
pub const LATE_ANSWER_MAX_AGE: Duration = Duration::from_secs(30);

/// How the fan-out runs.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// How long a fan-out waits for each agent's GetMetrics (connect included); a call still
    /// running then goes on in the background and answers the next fan-out.
    pub deadline: Duration,
    /// A fan-out result is reused this long.
    pub refresh: Duration,
    /// Bearer token file sent to the agents (re-read each fan-out, so rotation needs no restart).
    pub token_file: Option<PathBuf>,
    /// Agents waited for at once.
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
    late_answers: Counter,
    discovery_errors: Counter,
    tls_reloads: Family<ResultLabel, Counter>,
    pod_view_current: Gauge,
    foreign_pods: Family<ReasonLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl AggregateMetrics {
    /// The counter the EndpointSlice watch adds its errors to.
    pub fn discovery_errors(&self) -> Counter {
        self.discovery_errors.clone()
    }

    /// `pod_watch`: the aggregator watches pods (`--service`); only then is
    /// `aggregate_pod_view_current` exported.
    pub fn register(registry: &mut Registry, pod_watch: bool) -> Self {
        let m = Self {
            agents: Family::default(),
            // Loopback answers in a millisecond; a fan-out lasts at most a few deadlines.
            duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
            ]),
            failures: Family::default(),
            late_answers: Counter::default(),
            discovery_errors: Counter::default(),
            tls_reloads: Family::default(),
            pod_view_current: Gauge::default(),
            foreign_pods: Family::default(),
        };
        if pod_watch {
            registry.register(
                "aggregate_pod_view_current",
                "1 when the aggregator's pod watch has synced and is not failing; 0 otherwise, \
                 and then every KEDA query is UNAVAILABLE (pod placement not current)",
                m.pod_view_current.clone(),
            );
            registry.register(
                "aggregate_foreign_pods",
                "Pods an agent reported that the aggregator does not count, each counted when an \
                 agent starts reporting it, by reason: other_node (the pod watch places it on \
                 another node than the agent's EndpointSlice names) or unknown (no such pod)",
                m.foreign_pods.clone(),
            );
        }
        registry.register(
            "aggregate_agents",
            "Expected node agents in the last fan-out: answered, stale (no answer, a last census \
             held), missing (nothing known) or duplicate (another agent on the same node is \
             counted instead)",
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
            "Node agents without an answer in a fan-out, by reason (timeout, unavailable, census, pins, pod_view, error)",
            m.failures.clone(),
        );
        registry.register(
            "aggregate_late_answers",
            "Agent censuses that arrived after the fan-out's deadline (kept for the next fan-out; \
             a steady rate means --deadline is below the census time)",
            m.late_answers.clone(),
        );
        registry.register(
            "aggregate_discovery_errors",
            "Errors of the EndpointSlice and pod watches, and fan-outs before the EndpointSlice \
             watch had synced (the last agents and pods known were used)",
            m.discovery_errors.clone(),
        );
        registry.register(
            "aggregate_tls_reloads",
            "Changed TLS files for the agents (--cacert, --cert, --key) read again, by result: \
             loaded (new connections use them) or refused (the previous ones stay in use)",
            m.tls_reloads.clone(),
        );
        m
    }
}

// === impl Fleet ===

/// One fan-out's outcome.
#[derive(Debug, Clone)]
pub struct FanoutResult {
    pub status: pb::FleetStatus,
    /// Every expected agent's census (or why it has none), for coverage-checked KEDA answers.
    pub census: Arc<FleetCensus>,
}

struct Cached {
    at: Instant,
    /// The pins generation its calls were made with.
    pins: u64,
    result: Arc<FanoutResult>,
}

struct State {
    cached: Option<Cached>,
    clients: HashMap<String, AgentClient>,
    /// The last discovered targets, used when a discovery call fails.
    targets: Option<Vec<Target>>,
    /// Addresses not answered in the last fan-out, so the warning is logged when the set changes.
    missing: BTreeSet<String>,
    /// Per agent address, the pods of its census refused in the last fan-out, so each is
    /// logged and counted once when it appears.
    foreign: HashMap<String, BTreeSet<ForeignPod>>,
}

/// A call's result: the snapshot, or (reason label, message).
type CallResult = Result<Arc<pb::MetricsSnapshot>, (&'static str, String)>;

/// A detached call, awaited by every fan-out that needs it while it runs.
type InFlight = Shared<BoxFuture<'static, Arc<CallResult>>>;

/// The newest census an agent sent.
#[derive(Clone)]
struct LastCensus {
    at: Instant,
    snapshot: Arc<pb::MetricsSnapshot>,
    /// The pins generation the call asked with: it may fold remotes pinned later.
    pins: u64,
    /// The remotes pinned in that call (lastKnownFor counts it only for these).
    pinned: Arc<Vec<String>>,
    /// The call's duration.
    latency: Duration,
    /// Some fan-out has answered with it; an unserved one is a late answer for the next.
    served: bool,
}

/// Per agent: its call in flight and its last census. Survives fan-outs, dropped when the
/// agent leaves the targets.
#[derive(Default)]
struct AgentSlot {
    /// The call and the pins generation it asked with.
    in_flight: Option<(u64, InFlight)>,
    last: Option<LastCensus>,
}

type Slots = Arc<Mutex<HashMap<String, AgentSlot>>>;

/// What one fan-out learnt of one agent.
struct AgentOutcome {
    target: Target,
    /// The call's duration (for a late answer: the call that produced it).
    latency: Duration,
    result: Result<LastCensus, (&'static str, String)>,
    /// Set when not answered: the last census held, if any.
    last: Option<LastCensus>,
}

/// The cached fleet view; `get` fans out when the cache is older than `refresh`.
pub struct Fleet {
    discovery: Discovery,
    /// Where pods run (with `--service`), so only the agents hosting a query's pods decide it.
    pods: Option<PodWatch>,
    config: FanoutConfig,
    metrics: AggregateMetrics,
    token: BearerToken,
    /// TLS to the agents (`--cacert`, `--cert`, ...); plaintext when absent.
    tls: Option<AgentTls>,
    slots: Slots,
    /// Remotes KEDA queries name, sent to every agent so they are never folded into `other`.
    pins: PinnedRemotes,
    /// Held across a fan-out so concurrent callers wait for one instead of starting their own.
    state: tokio::sync::Mutex<State>,
}

impl Fleet {
    pub fn new(discovery: Discovery, config: FanoutConfig, metrics: AggregateMetrics) -> Self {
        Self {
            discovery,
            pods: None,
            config,
            metrics,
            token: BearerToken::default(),
            tls: None,
            slots: Arc::default(),
            pins: PinnedRemotes::default(),
            state: tokio::sync::Mutex::new(State {
                cached: None,
                clients: HashMap::new(),
                targets: None,
                missing: BTreeSet::new(),
                foreign: HashMap::new(),
            }),
        }
    }

    /// Coverage follows the pods: each query needs only the agents on nodes hosting its pods.
    pub fn with_pod_watch(mut self, pods: PodWatch) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Dials the agents over TLS with `tls`.
    pub fn with_tls(mut self, tls: AgentTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A fan-out result at most `refresh` old.
    pub async fn get(&self) -> Arc<FanoutResult> {
        self.get_pinned(&[] as &[&str])
            .await
            .expect("no remote to pin cannot exceed the limit")
    }

    /// `get`, with `remotes` pinned on every agent: a fan-out made before one of them was
    /// pinned is not used (its censuses may have folded it into `other`). Refused when the
    /// pins are full (pins.rs).
    pub async fn get_pinned<S: AsRef<str>>(
        &self,
        remotes: &[S],
    ) -> Result<Arc<FanoutResult>, PinsFull> {
        let wanted = if remotes.is_empty() {
            0
        } else {
            self.pins.pin(remotes)?
        };
        let mut state = self.state.lock().await;
        if let Some(c) = &state.cached
            && c.at.elapsed() < self.config.refresh
            && c.pins >= wanted
        {
            return Ok(c.result.clone());
        }
        let (pinned, generation) = self.pins.current();
        let pinned: Arc<Vec<String>> = Arc::new(pinned.into_iter().collect());
        let result = Arc::new(self.fan_out(&mut state, &pinned, generation).await);
        state.cached = Some(Cached {
            at: Instant::now(),
            pins: generation,
            result: result.clone(),
        });
        Ok(result)
    }

    async fn fan_out(
        &self,
        state: &mut State,
        pinned: &Arc<Vec<String>>,
        pins: u64,
    ) -> FanoutResult {
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
        if let Some(tls) = &self.tls {
            let reload = tls.refresh();
            if reload != Reload::Unchanged {
                let result = if reload == Reload::Loaded {
                    "loaded"
                } else {
                    "refused"
                };
                self.metrics
                    .tls_reloads
                    .get_or_create(&ResultLabel { result })
                    .inc();
            }
            if reload == Reload::Loaded {
                // New channels take the new files; calls in flight finish on the old ones.
                state.clients.clear();
            }
        }
        // Channels, calls and last censuses of agents that left are dropped; new channels
        // connect lazily on first use.
        state
            .clients
            .retain(|addr, _| targets.iter().any(|t| &t.address == addr));
        self.slots
            .lock()
            .expect("not poisoned")
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
        let outcomes: Vec<AgentOutcome> = futures::stream::iter(calls)
            .map(|(t, client)| self.agent_census(t, client, pinned, pins))
            .buffer_unordered(self.config.max_concurrency.max(1))
            .collect()
            .await;
        let result = self.summarize(state, outcomes);
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Counts and logs each pod an agent starts reporting that is refused (`foreign`: this
    /// fan-out's refusals by agent address), and keeps them for the next fan-out.
    fn note_foreign(&self, state: &mut State, foreign: HashMap<String, BTreeSet<ForeignPod>>) {
        for (address, refused) in &foreign {
            let before = state.foreign.get(address);
            for pod in refused
                .iter()
                .filter(|p| before.is_none_or(|b| !b.contains(p)))
            {
                self.metrics
                    .foreign_pods
                    .get_or_create(&ReasonLabel {
                        reason: pod.reason.label(),
                    })
                    .inc();
                tracing::warn!(
                    agent = %address,
                    pod = %format!("{}/{}", pod.namespace, pod.name),
                    uid = %pod.uid,
                    reason = pod.reason.label(),
                    "a node agent reports a pod its node does not host: not counted ({pod})"
                );
            }
        }
        state.foreign = foreign;
    }

    fn client(&self, address: &str) -> Result<AgentClient, String> {
        let ep = match &self.tls {
            Some(tls) => tls.endpoint(address),
            None => endpoint(address),
        }
        .map_err(|e| e.to_string())?
        .connect_timeout(self.config.deadline);
        Ok(NodeAgentClient::with_interceptor(
            ep.connect_lazy(),
            self.token.clone(),
        ))
    }

    /// One agent's census for this fan-out: a late answer no fan-out has used yet, or the call
    /// in flight (started now if none), waited for up to the deadline.
    async fn agent_census(
        &self,
        target: Target,
        client: Result<AgentClient, String>,
        pinned: &Arc<Vec<String>>,
        pins: u64,
    ) -> AgentOutcome {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                let last = self.last_census(&target.address);
                return AgentOutcome {
                    target,
                    latency: Duration::ZERO,
                    result: Err(("error", e)),
                    last,
                };
            }
        };
        let waiting = {
            let mut slots = self.slots.lock().expect("not poisoned");
            let slot = slots.entry(target.address.clone()).or_default();
            if let Some(last) = slot.last.as_mut()
                && !last.served
                && last.pins >= pins
                && last.at.elapsed() <= LATE_ANSWER_MAX_AGE
            {
                last.served = true;
                let late = last.clone();
                // Start the next census now, so the fan-out after this one finds it done.
                if slot.in_flight.is_none() {
                    slot.in_flight = Some((pins, self.spawn_call(&target, client, pinned, pins)));
                }
                return AgentOutcome {
                    target,
                    latency: late.latency,
                    result: Ok(late),
                    last: None,
                };
            }
            slot.in_flight
                .get_or_insert_with(|| (pins, self.spawn_call(&target, client, pinned, pins)))
                .clone()
        };
        let (call_pins, waiting) = waiting;
        let started = Instant::now();
        let deadline = self.config.deadline;
        match tokio::time::timeout(deadline, waiting).await {
            Ok(result) => match result.as_ref() {
                // Asked before a remote this fan-out needs was pinned: it may sit in `other`.
                // The next fan-out's call asks with it; until then the agent is not counted
                // (no last census either: it is as old as the pin).
                Ok(_) if call_pins < pins => AgentOutcome {
                    target,
                    latency: started.elapsed(),
                    result: Err((
                        "pins",
                        "the census was asked for before a remote a query names was pinned; \
                         the next fan-out asks with it"
                            .into(),
                    )),
                    last: None,
                },
                Ok(snapshot) => {
                    let mut slots = self.slots.lock().expect("not poisoned");
                    let served = slots.get_mut(&target.address).and_then(|s| {
                        let last = s.last.as_mut()?;
                        Arc::ptr_eq(&last.snapshot, snapshot).then(|| {
                            last.served = true;
                            last.clone()
                        })
                    });
                    let census = served.unwrap_or_else(|| LastCensus {
                        at: Instant::now(),
                        snapshot: snapshot.clone(),
                        pins: call_pins,
                        // The call's own pins are not known here (its slot is gone): no
                        // remote counts as pinned in it for lastKnownFor.
                        pinned: Arc::default(),
                        latency: started.elapsed(),
                        served: true,
                    });
                    AgentOutcome {
                        target,
                        latency: census.latency,
                        result: Ok(census),
                        last: None,
                    }
                }
                Err(e) => {
                    let last = self.last_census(&target.address);
                    AgentOutcome {
                        target,
                        latency: started.elapsed(),
                        result: Err(e.clone()),
                        last,
                    }
                }
            },
            Err(_) => {
                let last = self.last_census(&target.address);
                AgentOutcome {
                    target,
                    latency: started.elapsed(),
                    result: Err((
                        "timeout",
                        format!(
                            "no census within the {deadline:?} deadline (still collecting: a late \
                             census answers the next fan-out)"
                        ),
                    )),
                    last,
                }
            }
        }
    }

    fn last_census(&self, address: &str) -> Option<LastCensus> {
        self.slots
            .lock()
            .expect("not poisoned")
            .get(address)
            .and_then(|s| s.last.clone())
    }

    /// Starts the agent's call on its own task: it runs to the end (or `CALL_LIMIT`) whoever
    /// still waits, and stores a census in the agent's slot.
    fn spawn_call(
        &self,
        target: &Target,
        client: AgentClient,
        pinned: &Arc<Vec<String>>,
        pins: u64,
    ) -> InFlight {
        let slots = self.slots.clone();
        let pinned = pinned.clone();
        let address = target.address.clone();
        let deadline = self.config.deadline;
        let late_answers = self.metrics.late_answers.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = call(client, pinned.to_vec()).await;
            let latency = started.elapsed();
            let mut slots = slots.lock().expect("not poisoned");
            // Gone from the targets meanwhile: nobody will ask again.
            if let Some(slot) = slots.get_mut(&address) {
                slot.in_flight = None;
                if let Ok(snapshot) = &result {
                    if latency > deadline {
                        late_answers.inc();
                        tracing::warn!(
                            agent = %address,
                            ?latency,
                            ?deadline,
                            "a node agent's census arrived after the deadline; it answers the \
                             next fan-out (raise --deadline above the census time)"
                        );
                    }
                    slot.last = Some(LastCensus {
                        at: Instant::now(),
                        snapshot: snapshot.clone(),
                        pins,
                        pinned: pinned.clone(),
                        latency,
                        served: false,
                    });
                }
            }
            Arc::new(result)
        });
        async move {
            task.await
                .unwrap_or_else(|e| Arc::new(Err(("error", format!("the call task failed: {e}")))))
        }
        .boxed()
        .shared()
    }

    fn summarize(&self, state: &mut State, mut outcomes: Vec<AgentOutcome>) -> FanoutResult {
        outcomes.sort_by(|a, b| a.target.cmp(&b.target));
        let placement = self.pods.as_ref().map(PodWatch::placement);
        // With discovery through the Service an agent's node is its EndpointSlice's nodeName,
        // never what its census claims; a static list (`--agents`) has only the claim.
        let from_service = matches!(self.discovery, Discovery::Service(_));
        // Pods are checked against a current pod view only (otherwise every query is
        // UNAVAILABLE anyway).
        let verifier = placement
            .as_deref()
            .filter(|p| p.not_current_reason().is_none());
        let mut foreign: HashMap<String, BTreeSet<ForeignPod>> = HashMap::new();
        let now = Instant::now();
        let age =
            |at: Instant| prost_types::Duration::try_from(now.saturating_duration_since(at)).ok();
        let mut agents = Vec::with_capacity(outcomes.len());
        let mut census = Vec::with_capacity(outcomes.len());
        let mut missing = BTreeSet::new();
        let (mut stale, mut unknown) = (0usize, 0usize);
        for o in outcomes {
            let t = o.target;
            let latency = prost_types::Duration::try_from(o.latency).ok();
            let name = if t.node_name.is_empty() {
                t.address.clone()
            } else {
                format!("{} ({})", t.address, t.node_name)
            };
            match o.result {
                Ok(c) => {
                    let snap = &c.snapshot;
                    let node_name = if from_service || snap.node_name.is_empty() {
                        t.node_name
                    } else {
                        snap.node_name.clone()
                    };
                    let (pods, refused) = counted_pods(verifier, &node_name, &snap.connections);
                    agents.push(pb::FleetAgent {
                        address: t.address.clone(),
                        node_name,
                        answered: true,
                        error: String::new(),
                        latency,
                        pods: pods.iter().filter(|p| !is_view_behind(p)).count() as u32,
                        ready: t.ready,
                        census_age: age(c.at),
                        superseded_by: String::new(),
                        refused_pods: refused.iter().map(ToString::to_string).collect(),
                    });
                    foreign.insert(t.address, refused.into_iter().collect());
                    census.push(AgentCensus {
                        name,
                        node: agents
                            .last()
                            .map(|a| a.node_name.clone())
                            .unwrap_or_default(),
                        state: AgentState::Answered {
                            pods: Arc::new(pods),
                            at: c.at,
                        },
                    });
                }
                Err((reason, error)) => {
                    self.metrics
                        .failures
                        .get_or_create(&ReasonLabel { reason })
                        .inc();
                    if o.last.is_some() {
                        stale += 1;
                    } else {
                        unknown += 1;
                    }
                    missing.insert(name.clone());
                    // Without a node in discovery (`--agents`), the node its last census named.
                    let node_name = match &o.last {
                        Some(l) if !from_service && t.node_name.is_empty() => {
                            l.snapshot.node_name.clone()
                        }
                        _ => t.node_name,
                    };
                    let last_known = o.last.map(|l| {
                        let (pods, refused) =
                            counted_pods(verifier, &node_name, &l.snapshot.connections);
                        (l, pods, refused)
                    });
                    let refused = last_known
                        .as_ref()
                        .map(|(_, _, r)| r.clone())
                        .unwrap_or_default();
                    agents.push(pb::FleetAgent {
                        address: t.address.clone(),
                        node_name,
                        answered: false,
                        error: error.clone(),
                        latency,
                        pods: 0,
                        ready: t.ready,
                        census_age: last_known.as_ref().and_then(|(l, _, _)| age(l.at)),
                        superseded_by: String::new(),
                        refused_pods: refused.iter().map(ToString::to_string).collect(),
                    });
                    foreign.insert(t.address, refused.into_iter().collect());
                    census.push(AgentCensus {
                        name,
                        node: agents
                            .last()
                            .map(|a| a.node_name.clone())
                            .unwrap_or_default(),
                        state: AgentState::Missing {
                            error,
                            last_known: last_known.map(|(l, pods, _)| LastKnown {
                                at: l.at,
                                pods: Arc::new(pods),
                                pinned: l.pinned,
                            }),
                        },
                    });
                }
            }
        }
        // A static list has only each census's claim of its node: two answers claiming one
        // node that name different pods are two machines (a cloned hostname, a copied
        // NODE_NAME), not one node listed twice. Which one is that node is unknown, so neither
        // is counted and neither is dropped as a duplicate (adversary #18c).
        let conflicted = if from_service {
            BTreeSet::new()
        } else {
            conflicting_claims(&census)
        };
        for &i in &conflicted {
            let node = census[i].node.clone();
            let others: Vec<&str> = conflicted
                .iter()
                .filter(|&&j| j != i && census[j].node == node)
                .map(|&j| agents[j].address.as_str())
                .collect();
            let error = format!(
                "claims node {node} like {} but its census names other pods: two machines \
                 claim one node name, and which one is node {node} is unknown",
                others.join(", ")
            );
            agents[i].error.clone_from(&error);
            census[i].state = AgentState::Missing {
                error,
                last_known: None,
            };
        }
        let conflicted_names: BTreeSet<String> =
            conflicted.iter().map(|&i| census[i].name.clone()).collect();
        let duplicates = supersede_duplicates(&mut agents, &mut census, &conflicted);
        if duplicates > 0 || !conflicted.is_empty() {
            // Recount without the superseded agents: their node is covered by another.
            missing.clear();
            (stale, unknown) = (0, 0);
            for c in &census {
                if let AgentState::Missing { last_known, .. } = &c.state {
                    missing.insert(c.name.clone());
                    if conflicted_names.contains(&c.name) {
                        // It answered; its census is not counted.
                    } else if last_known.is_some() {
                        stale += 1;
                    } else {
                        unknown += 1;
                    }
                }
            }
        }
        let answered = census
            .iter()
            .filter(|c| matches!(c.state, AgentState::Answered { .. }))
            .count()
            + conflicted.len();
        // Without a current pod view nothing was checked: the refusals known stay as they were.
        if verifier.is_some() {
            self.note_foreign(state, foreign);
        }
        if let Some(p) = &placement {
            self.metrics
                .pod_view_current
                .set(i64::from(p.not_current_reason().is_none()));
        }
        for (label, n) in [
            ("answered", answered),
            ("stale", stale),
            ("missing", unknown),
            ("duplicate", duplicates),
        ] {
            self.metrics
                .agents
                .get_or_create(&StateLabel { state: label })
                .set(n as i64);
        }
        if missing != state.missing {
            if missing.is_empty() {
                tracing::info!(agents = answered, "every node agent answered again");
            } else {
                tracing::warn!(
                    missing = ?missing,
                    answered,
                    expected = agents.len(),
                    "node agents did not answer the fan-out; KEDA gets an error instead of a \
                     partial sum unless a ScaledObject sets minCoverage or lastKnownFor"
                );
            }
            state.missing = missing;
        }
        FanoutResult {
            status: pb::FleetStatus {
                collected_at: Some(SystemTime::now().into()),
                expected: census.len() as u32,
                answered: answered as u32,
                stale: stale as u32,
                missing: unknown as u32,
                duplicates: duplicates as u32,
                agents,
            },
            census: Arc::new(FleetCensus {
                agents: census,
                placement,
            }),
        }
    }
}

/// The pods of an agent's census to count, and those refused: with a current pod view
/// (`verifier`), only the pods it places on `node` (PodPlacement::verify); without one (`--agents`,
/// or a pod view not current, when no query is answered) every pod as reported.
fn counted_pods(
    verifier: Option<&PodPlacement>,
    node: &str,
    pods: &[pb::PodConnections],
) -> (Vec<pb::PodConnections>, Vec<ForeignPod>) {
    match verifier {
        Some(v) => v.verify(node, pods),
        // One UID counted once per census even unverified (adversary #18c).
        None => {
            let mut seen = std::collections::HashSet::new();
            let kept = pods
                .iter()
                .filter(|p| p.uid.is_empty() || seen.insert(p.uid.as_str()))
                .cloned()
                .collect();
            (kept, Vec::new())
        }
    }
}

/// The answered censuses (indices) that claim one node with others naming different pods
/// (by UID, else namespace/name).
fn conflicting_claims(census: &[AgentCensus]) -> BTreeSet<usize> {
    let mut by_node: HashMap<&str, Vec<(usize, BTreeSet<String>)>> = HashMap::new();
    for (i, c) in census.iter().enumerate() {
        if let AgentState::Answered { pods, .. } = &c.state
            && !c.node.is_empty()
        {
            let names = pods
                .iter()
                .map(|p| {
                    if p.uid.is_empty() {
                        format!("{}/{}", p.namespace, p.name)
                    } else {
                        p.uid.clone()
                    }
                })
                .collect();
            by_node.entry(c.node.as_str()).or_default().push((i, names));
        }
    }
    by_node
        .into_values()
        .filter(|g| g.iter().any(|(_, names)| *names != g[0].1))
        .flat_map(|g| g.into_iter().map(|(i, _)| i))
        .collect()
}

/// Keeps one census per node: two agents on one node (a rollout's old and new pod, an
/// EndpointSlice still listing the old one) count the same pods, and summing both would double
/// them. The newest census wins (an answer over a missing agent's last census); the others are
/// marked `superseded_by` in the status and left out of `census`. Returns how many were.
fn supersede_duplicates(
    agents: &mut [pb::FleetAgent],
    census: &mut Vec<AgentCensus>,
    conflicted: &BTreeSet<usize>,
) -> usize {
    // Higher is better: answered now, then the newest census held.
    let rank = |c: &AgentCensus| match &c.state {
        AgentState::Answered { at, .. } => (2, Some(*at)),
        AgentState::Missing {
            last_known: Some(lk),
            ..
        } => (1, Some(lk.at)),
        AgentState::Missing { .. } => (0, None),
    };
    let mut best: HashMap<&str, usize> = HashMap::new();
    for (i, c) in census.iter().enumerate() {
        if c.node.is_empty() || conflicted.contains(&i) {
            continue;
        }
        best.entry(c.node.as_str())
            .and_modify(|b| {
                if rank(c) > rank(&census[*b]) {
                    *b = i;
                }
            })
            .or_insert(i);
    }
    let keep: Vec<bool> = census
        .iter()
        .enumerate()
        .map(|(i, c)| c.node.is_empty() || conflicted.contains(&i) || best[c.node.as_str()] == i)
        .collect();
    let mut superseded = 0;
    for (i, c) in census.iter().enumerate() {
        if !keep[i] {
            let winner = best[c.node.as_str()];
            agents[i].superseded_by = agents[winner].address.clone();
            superseded += 1;
            // Per fan-out, so debug; the status and aggregate_agents{state="duplicate"} show it.
            tracing::debug!(
                agent = %c.name,
                counted = %census[winner].name,
                node = %c.node,
                "two node agents answer for one node; only the newest census is counted"
            );
        }
    }
    let mut i = 0;
    census.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    superseded
}

/// One GetMetrics call, bounded by `CALL_LIMIT`; a census the agent reports as failed is an
/// error (as unknown as no answer).
async fn call(mut client: AgentClient, pinned_remotes: Vec<String>) -> CallResult {
    let req = pb::GetMetricsRequest {
        exclude_pods: true,
        exclude_connections: false,
        pinned_remotes,
    };
    let mut request = tonic::Request::new(req);
    // The agent sees the limit too (grpc-timeout) and can stop early.
    request.set_timeout(CALL_LIMIT);
    let too_slow = || {
        (
            "timeout",
            format!("no census within {CALL_LIMIT:?}: too slow"),
        )
    };
    match tokio::time::timeout(CALL_LIMIT, client.get_metrics(request)).await {
        Ok(Ok(r)) => {
            let snap = r.into_inner();
            if snap.unavailable.iter().any(|s| s == CENSUS_SOURCE) {
                return Err((
                    "census",
                    format!("the connection census failed on node {}", snap.node_name),
                ));
            }
            // Pods its pod view has not named match no selector: the census is incomplete for
            // every query (an unsynced or failing pod watch).
            if let Some(why) = pod_view_not_current(&snap) {
                return Err(("pod_view", format!("node {}: {why}", snap.node_name)));
            }
            Ok(Arc::new(snap))
        }
        Ok(Err(s)) if s.code() == tonic::Code::DeadlineExceeded => Err(too_slow()),
        Ok(Err(s)) => {
            let reason = if s.code() == tonic::Code::Unavailable {
                "unavailable"
            } else {
                "error"
            };
            Err((reason, status_text(&s)))
        }
        Err(_) => Err(too_slow()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(address: &str, node: &str, state: AgentState) -> (pb::FleetAgent, AgentCensus) {
        (
            pb::FleetAgent {
                address: address.into(),
                node_name: node.into(),
                ..Default::default()
            },
            AgentCensus {
                name: address.into(),
                node: node.into(),
                state,
            },
        )
    }

    fn answered(at: Instant) -> AgentState {
        AgentState::Answered {
            pods: Arc::default(),
            at,
        }
    }

    fn missing() -> AgentState {
        AgentState::Missing {
            error: "connection refused".into(),
            last_known: None,
        }
    }

    #[test]
    fn one_census_per_node_the_newest_answer_wins() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(5);
        let (mut agents, mut census): (Vec<_>, Vec<_>) = [
            agent("10.0.0.1:9741", "node-a", answered(t0)),
            agent("10.0.0.2:9741", "node-a", answered(later)),
            agent("10.0.0.3:9741", "node-b", answered(t0)),
            agent("10.0.0.4:9741", "node-b", missing()),
            agent("10.0.0.5:9741", "", answered(t0)),
            agent("10.0.0.6:9741", "", missing()),
        ]
        .into_iter()
        .unzip();
        assert_eq!(
            supersede_duplicates(&mut agents, &mut census, &BTreeSet::new()),
            2
        );
        let kept: Vec<&str> = census.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            kept,
            [
                "10.0.0.2:9741",
                "10.0.0.3:9741",
                "10.0.0.5:9741",
                "10.0.0.6:9741"
            ]
        );
        let superseded: Vec<(&str, &str)> = agents
            .iter()
            .filter(|a| !a.superseded_by.is_empty())
            .map(|a| (a.address.as_str(), a.superseded_by.as_str()))
            .collect();
        assert_eq!(
            superseded,
            [
                ("10.0.0.1:9741", "10.0.0.2:9741"),
                ("10.0.0.4:9741", "10.0.0.3:9741")
            ]
        );
    }
}
