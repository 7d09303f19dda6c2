//! The aggregator's test harness, shared by aggregate.rs, aggregate_auth.rs, aggregate_tls.rs
//! and the adversary rounds adversary_issue18{,b,c,d,e}.rs and adversary_issue19b.rs (issue #21:
//! once copied file to file):
//! - `Aggregator::builder()`: `nodekeeper aggregate` on free loopback ports, waited for until
//!   /readyz (the one readiness wait, `nodekeeper_tests::wait_ready`);
//! - clients: GetFleet and KEDA's GetMetrics in plaintext or over TLS (`Via`), with
//!   `authorization` headers;
//! - `FakeAgent`: a node agent answering GetMetrics with a census the test sets (and records the
//!   `authorization` headers it is sent);
//! - the coverage path without processes: a `FleetCensus` as the aggregator's summarize builds
//!   it (`fleet`, `fleet_of`), served by a `ScalerService` (`scaler_value`).
//!
//! It owns fixtures and clients; it never asserts a promise itself (the readiness wait and
//! `until` panic only on a timeout, naming what they waited for).

#![allow(dead_code)] // shared by several modules, none of which uses every part

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use nodekeeper::keda::coverage::{AgentCensus, AgentState, FleetCensus, PodPlacement};
use nodekeeper::keda::query::Query;
use nodekeeper::keda::service::{Census, PodSource, ScalerService};
use nodekeeper::keda_pb::{
    self, external_scaler_client::ExternalScalerClient, external_scaler_server::ExternalScaler as _,
};
use nodekeeper::pb::{self, aggregator_client::AggregatorClient, node_agent_server};
use nodekeeper_tests::pki::Pki;
use nodekeeper_tests::{Proc, agent_bin, free_port, http_get, loopback, sample};
use serde_json::{Value, json};
use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::census_pods::{POOL_REMOTE, scaled_object};

/// Every wait and call gives up after this: generous on a loaded 2-core machine, and past the
/// aggregator's 10 s first-bytes and TLS handshake timeouts.
pub const WAIT: Duration = Duration::from_secs(30);
/// The name KEDA verifies in the aggregator's certificate: the host of the ScaledObject's
/// scalerAddress.
pub const AGGREGATOR_NAME: &str = "nodekeeper-aggregator.nodekeeper-system.svc";
/// KEDA's client certificate CN, the one entry of --listen-client-names.
pub const KEDA: &str = "keda-operator";
/// The read token the aggregator's API is given.
pub const TOKEN: &str = "fleet-reader-0123456789abcdef";
/// The aggregator's log filter unless a test asks for more.
const LOG: &str = "info,nodekeeper=debug";

// === the aggregator process ===

/// A running `nodekeeper aggregate` on free loopback ports.
pub struct Aggregator {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

/// What a test varies in `nodekeeper aggregate`'s command line and environment.
pub struct AggregatorBuilder {
    name: String,
    args: Vec<OsString>,
    envs: Vec<(String, OsString)>,
    kubeconfig: Option<PathBuf>,
    log: String,
}

impl AggregatorBuilder {
    /// The process's name in its log and in failure messages ("aggregate" unless set).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<A: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = A>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, k: &str, v: impl AsRef<OsStr>) -> Self {
        self.envs.push((k.into(), v.as_ref().to_os_string()));
        self
    }

    pub fn envs(self, envs: &[(&str, &str)]) -> Self {
        envs.iter().fold(self, |b, (k, v)| b.env(k, v))
    }

    /// `--allow-anonymous`: for tests about the fan-out, not the API's credentials
    /// (aggregate_auth.rs and adversary_issue19b.rs test those).
    pub fn allow_anonymous(self) -> Self {
        self.arg("--allow-anonymous")
    }

    /// `--refresh 100ms --deadline 2s`: a fan-out fast enough for a test to watch change.
    pub fn fast(self) -> Self {
        self.args(["--refresh", "100ms", "--deadline", "2s"])
    }

    /// The cluster it reads (`KUBECONFIG`); none unless set.
    pub fn kubeconfig(mut self, kubeconfig: &Path) -> Self {
        self.kubeconfig = Some(kubeconfig.to_path_buf());
        self
    }

    /// `NODEKEEPER_LOG` ("info,nodekeeper=debug" unless set).
    pub fn log(mut self, filter: &str) -> Self {
        self.log = filter.into();
        self
    }

    /// Starts it in `dir` and waits until /readyz is 200.
    pub fn start(self, dir: &Path) -> Aggregator {
        let (grpc, metrics) = (loopback(free_port()), loopback(free_port()));
        let mut cmd = Command::new(agent_bin());
        cmd.arg("aggregate")
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .args(&self.args)
            .env_remove("KUBECONFIG")
            .env("NODEKEEPER_LOG", &self.log);
        if let Some(k) = &self.kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn(&self.name, cmd, dir);
        nodekeeper_tests::wait_ready(&mut proc, metrics, "/readyz", "the aggregator");
        Aggregator {
            proc,
            grpc,
            metrics,
        }
    }
}

impl Aggregator {
    pub fn builder() -> AggregatorBuilder {
        AggregatorBuilder {
            name: "aggregate".into(),
            args: Vec::new(),
            envs: Vec::new(),
            kubeconfig: None,
            log: LOG.into(),
        }
    }

    /// `nodekeeper aggregate --allow-anonymous ARGS` named `name`, with `envs`: the fan-out's
    /// tests (aggregate.rs, adversary_issue18.rs).
    pub fn start(dir: &Path, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Aggregator {
        Aggregator::builder()
            .name(name)
            .allow_anonymous()
            .args(args)
            .envs(envs)
            .start(dir)
    }

    /// GetFleet in plaintext; panics on an error.
    pub fn fleet(&self) -> pb::FleetStatus {
        let rt = tokio::runtime::Runtime::new().unwrap();
        get_fleet_plaintext(&rt, self.grpc).expect("GetFleet")
    }

    pub fn metrics_text(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The value of the unlabelled sample `name` on /metrics.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.metrics, "/metrics").expect("GET /metrics");
        sample(&body, name, &[])
    }

    /// The line of /metrics that starts with `series` (name and labels).
    pub fn metric_line(&self, series: &str) -> Option<String> {
        let (_, body) = http_get(self.metrics, "/metrics").expect("GET /metrics");
        body.lines()
            .find(|l| l.starts_with(series))
            .map(str::to_string)
    }

    /// Open file descriptors of the aggregator process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory of the aggregator process, KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// Polls `f` until it returns `Some`, failing after `WAIT` with `what` and the aggregator's log.
pub fn until<T>(agg: &Aggregator, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; log:\n{}",
            agg.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn os(args: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// A TLS Secret volume's files: `ca.crt`, and `cert`'s certificate and `key`'s key.
pub fn secret_files(pki: &Pki, cert: &str, key: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("ca.crt", pki.pem("ca.crt")),
        ("tls.crt", pki.pem(&format!("{cert}.crt"))),
        ("tls.key", pki.pem(&format!("{key}.key"))),
    ]
}

/// The shipped shape of the aggregator's serving Secret: `name`'s certificate and key.
pub fn server_files(pki: &Pki, name: &str) -> Vec<(&'static str, Vec<u8>)> {
    secret_files(pki, name, name)
}

/// The PEM subject `openssl s_client` is served on a new connection.
pub fn served_subject(addr: SocketAddr) -> String {
    let out = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect"])
        .arg(addr.to_string())
        .args(["-servername", AGGREGATOR_NAME, "-alpn", "h2"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_default()
        .to_string()
}

// === clients ===

/// How a test client reaches the aggregator.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    Plaintext,
    /// TLS verifying the aggregator against `ca`, presenting the client certificate `identity`
    /// (`NAME.crt`, `NAME.key` in the Pki).
    Tls {
        ca: &'a str,
        identity: Option<&'a str>,
    },
}

/// A channel to `addr` through `via`, from the local address `local` when given.
pub async fn channel_from(
    addr: SocketAddr,
    pki: &Pki,
    via: Via<'_>,
    local: Option<IpAddr>,
) -> Result<Channel, Status> {
    let ep = match via {
        Via::Plaintext => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
        Via::Tls { ca, identity } => {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(pki.certificate(ca))
                .domain_name(AGGREGATOR_NAME);
            if let Some(name) = identity {
                tls = tls.identity(pki.identity(name));
            }
            Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
        }
    };
    tokio::time::timeout(
        WAIT,
        ep.connect_timeout(Duration::from_secs(5))
            .local_address(local)
            .connect(),
    )
    .await
    .map_err(|_| Status::deadline_exceeded("connect"))?
    .map_err(|e| Status::unavailable(format!("connect: {e:?}")))
}

pub async fn channel(addr: SocketAddr, pki: &Pki, via: Via<'_>) -> Result<Channel, Status> {
    channel_from(addr, pki, via, None).await
}

/// A request carrying each of `authorization` as an `authorization` header, in order.
pub fn with_auth<T>(msg: T, authorization: &[&str]) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    for a in authorization {
        req.metadata_mut()
            .append("authorization", a.parse().expect("a valid header value"));
    }
    req
}

/// `token` as an `authorization` header value.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// GetFleet through `via` with the `authorization` headers given.
pub fn get_fleet(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    pki: &Pki,
    via: Via<'_>,
    authorization: &[&str],
) -> Result<pb::FleetStatus, Status> {
    rt.block_on(async {
        let mut c = AggregatorClient::new(channel(addr, pki, via).await?);
        tokio::time::timeout(
            WAIT,
            c.get_fleet(with_auth(pb::GetFleetRequest {}, authorization)),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("GetFleet: no answer (the aggregator hung)"))?
        .map(tonic::Response::into_inner)
    })
}

/// GetFleet in plaintext, without credentials.
pub fn get_fleet_plaintext(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
) -> Result<pb::FleetStatus, Status> {
    rt.block_on(async {
        let mut c = AggregatorClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tokio::time::timeout(WAIT, c.get_fleet(pb::GetFleetRequest {}))
            .await
            .map_err(|_| Status::deadline_exceeded("GetFleet: no answer"))?
            .map(tonic::Response::into_inner)
    })
}

/// The query KEDA sends for `established` over the `app=web` pods of `ns`, plus `extra`
/// metadata.
pub fn web_query(ns: &str, extra: &[(&str, &str)]) -> keda_pb::ScaledObjectRef {
    let mut pairs = vec![
        ("metric", "established"),
        ("target", "5"),
        ("podSelector", "app=web"),
    ];
    pairs.extend_from_slice(extra);
    scaled_object(ns, &pairs)
}

/// The web pool's query (its connections to the database, `POOL_REMOTE`), plus `extra`.
pub fn pool_query(extra: &[(&str, &str)]) -> keda_pb::ScaledObjectRef {
    let mut pairs = vec![("remote", POOL_REMOTE)];
    pairs.extend_from_slice(extra);
    web_query("shop", &pairs)
}

/// Starts `nodekeeper aggregate --refresh 100ms --deadline 2s ARGS` with `envs`: the API's
/// credentials are the test's to give (aggregate_auth.rs, adversary_issue19b.rs).
pub fn start_aggregator(dir: &Path, args: &[OsString], envs: &[(&str, &str)]) -> Aggregator {
    Aggregator::builder()
        .fast()
        .args(args)
        .envs(envs)
        .start(dir)
}

/// Starts `nodekeeper aggregate --refresh 100ms --deadline 2s --allow-anonymous ARGS`, reading
/// the cluster of `kubeconfig` when given: the fan-out's adversary tests.
pub fn start_open_aggregator(dir: &Path, args: &[&str], kubeconfig: Option<&Path>) -> Aggregator {
    let b = Aggregator::builder().fast().allow_anonymous().args(args);
    match kubeconfig {
        Some(k) => b.kubeconfig(k),
        None => b,
    }
    .start(dir)
}

/// The gRPC health check of `service` ("" for the server) through `via`: its status.
pub fn health_check(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    pki: &Pki,
    via: Via<'_>,
    service: &str,
) -> Result<i32, Status> {
    rt.block_on(async {
        let mut c =
            tonic_health::pb::health_client::HealthClient::new(channel(addr, pki, via).await?);
        tokio::time::timeout(
            WAIT,
            c.check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("health"))?
        .map(|r| r.into_inner().status)
    })
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

/// KEDA's GetMetrics of `r` through `via`.
pub fn keda_call(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    pki: &Pki,
    via: Via<'_>,
    r: keda_pb::ScaledObjectRef,
) -> Result<keda_pb::GetMetricsResponse, Status> {
    rt.block_on(async {
        let mut c = ExternalScalerClient::new(channel(addr, pki, via).await?);
        let req = keda_pb::GetMetricsRequest {
            scaled_object_ref: Some(r),
            metric_name: String::new(),
        };
        tokio::time::timeout(WAIT, c.get_metrics(req))
            .await
            .map_err(|_| Status::deadline_exceeded("GetMetrics"))?
            .map(tonic::Response::into_inner)
    })
}

/// KEDA's GetMetrics of `r` in plaintext: its value.
pub fn keda_value(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    r: keda_pb::ScaledObjectRef,
) -> Result<f64, Status> {
    rt.block_on(async {
        let mut c = ExternalScalerClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let req = keda_pb::GetMetricsRequest {
            scaled_object_ref: Some(r),
            metric_name: String::new(),
        };
        tokio::time::timeout(WAIT, c.get_metrics(req))
            .await
            .map_err(|_| Status::deadline_exceeded("GetMetrics"))?
            .map(|r| r.into_inner().metric_values[0].metric_value_float)
    })
}

/// A status as "CODE: message", for values compared as strings.
pub fn status_text(e: Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

// === a fake node agent (honest or rogue) ===

/// A node agent that answers GetMetrics with the census in `snapshot` (changed by the test at
/// will); every other RPC is UNIMPLEMENTED.
#[derive(Clone)]
pub struct FakeAgent {
    snapshot: Arc<Mutex<pb::MetricsSnapshot>>,
    /// Every `authorization` header a caller sent it.
    seen: Arc<Mutex<Vec<String>>>,
}

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl node_agent_server::NodeAgent for FakeAgent {
    async fn get_node(
        &self,
        _: tonic::Request<pb::GetNodeRequest>,
    ) -> Result<tonic::Response<pb::NodeStatus>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn get_metrics(
        &self,
        req: tonic::Request<pb::GetMetricsRequest>,
    ) -> Result<tonic::Response<pb::MetricsSnapshot>, Status> {
        if let Some(a) = req.metadata().get("authorization") {
            let a = a.to_str().unwrap_or_default().to_string();
            self.seen.lock().expect("not poisoned").push(a);
        }
        let mut s = self.snapshot.lock().expect("not poisoned").clone();
        s.collected_at = Some(SystemTime::now().into());
        Ok(tonic::Response::new(s))
    }

    type WatchMetricsStream = BoxStream<pb::MetricsSnapshot>;

    async fn watch_metrics(
        &self,
        _: tonic::Request<pb::WatchMetricsRequest>,
    ) -> Result<tonic::Response<Self::WatchMetricsStream>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn cordon(
        &self,
        _: tonic::Request<pb::CordonRequest>,
    ) -> Result<tonic::Response<pb::NodeStatus>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn uncordon(
        &self,
        _: tonic::Request<pb::UncordonRequest>,
    ) -> Result<tonic::Response<pb::NodeStatus>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    type DrainStream = BoxStream<pb::DrainEvent>;

    async fn drain(
        &self,
        _: tonic::Request<pb::DrainRequest>,
    ) -> Result<tonic::Response<Self::DrainStream>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn get_drain(
        &self,
        _: tonic::Request<pb::GetDrainRequest>,
    ) -> Result<tonic::Response<pb::DrainStatus>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn cancel_drain(
        &self,
        _: tonic::Request<pb::CancelDrainRequest>,
    ) -> Result<tonic::Response<pb::DrainStatus>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
}

/// Serves a `FakeAgent` claiming `node_name` with `pods` on a free loopback port of `rt`.
pub fn start_fake_agent(
    rt: &tokio::runtime::Runtime,
    node_name: &str,
    pods: Vec<pb::PodConnections>,
) -> SocketAddr {
    start_changeable_fake_agent(rt, node_name, pods).0
}

/// [`start_fake_agent`], returning the snapshot it answers with, to change at will.
pub fn start_changeable_fake_agent(
    rt: &tokio::runtime::Runtime,
    node_name: &str,
    pods: Vec<pb::PodConnections>,
) -> (SocketAddr, Arc<Mutex<pb::MetricsSnapshot>>) {
    let snapshot = Arc::new(Mutex::new(pb::MetricsSnapshot {
        node_name: node_name.into(),
        connections: pods,
        ..Default::default()
    }));
    (start_shared_fake_agent(rt, snapshot.clone()), snapshot)
}

/// Serves a `FakeAgent` answering with whatever `snapshot` holds at each call.
pub fn start_shared_fake_agent(
    rt: &tokio::runtime::Runtime,
    snapshot: Arc<Mutex<pb::MetricsSnapshot>>,
) -> SocketAddr {
    start_recording_fake_agent(rt, snapshot, Arc::default())
}

/// [`start_shared_fake_agent`], recording the `authorization` headers it is sent in `seen`.
pub fn start_recording_fake_agent(
    rt: &tokio::runtime::Runtime,
    snapshot: Arc<Mutex<pb::MetricsSnapshot>>,
    seen: Arc<Mutex<Vec<String>>>,
) -> SocketAddr {
    let agent = FakeAgent { snapshot, seen };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the fake agent");
    let addr = listener.local_addr().unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    });
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(node_agent_server::NodeAgentServer::new(agent))
            .serve_with_incoming(incoming),
    );
    addr
}

// === the coverage path, as the aggregator's summarize builds it ===

/// A fixed fleet census, as the aggregator's fan-out hands it to the scaler.
pub struct FixedFleet(pub Arc<FleetCensus>);

impl PodSource for FixedFleet {
    fn census<'a>(&'a self, _q: &'a Query) -> BoxFuture<'a, Result<Census, Status>> {
        Box::pin(async move { Ok(Census::from_fleet(self.0.clone())) })
    }
}

/// A pod as the aggregator's pod watch stores it (stripped: name, namespace, uid, labels,
/// annotations, node, phase, deletionTimestamp): Running, `app=web` unless set.
pub struct ApiPod(Value);

impl ApiPod {
    pub fn new(ns: &str, name: &str, uid: &str, node: &str) -> Self {
        ApiPod(json!({
            "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": "Running"},
        }))
    }

    pub fn app(mut self, app: &str) -> Self {
        self.0["metadata"]["labels"]["app"] = json!(app);
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.0["status"]["phase"] = json!(phase);
        self
    }

    /// Deleted, still terminating.
    pub fn terminating(mut self) -> Self {
        self.0["metadata"]["deletionTimestamp"] = json!("2026-12-07T16:00:00Z");
        self
    }

    pub fn annotations(mut self, annotations: Value) -> Self {
        self.0["metadata"]["annotations"] = annotations;
        self
    }

    pub fn pod(self) -> Pod {
        serde_json::from_value(self.0).expect("a Pod")
    }
}

/// A Running `app=web` pod as the pod watch stores it.
pub fn api_pod(ns: &str, name: &str, uid: &str, node: &str) -> Pod {
    ApiPod::new(ns, name, uid, node).pod()
}

/// One `app=web` pod of an agent's census as the agent names it from its own pod view.
pub fn census_pod(ns: &str, name: &str, uid: &str, established: u64) -> pb::PodConnections {
    pb::PodConnections {
        uid: uid.into(),
        namespace: ns.into(),
        name: name.into(),
        labels: HashMap::from([("app".to_string(), "web".to_string())]),
        established,
        tcp_states: HashMap::from([("established".to_string(), established)]),
        source: "sock_diag".into(),
        ..Default::default()
    }
}

/// An agent as `summarize` leaves it: answered now (its census verified against the placement
/// for its EndpointSlice node), or missing without a last census.
pub enum FleetMember<'a> {
    Answered(&'a str, Vec<pb::PodConnections>),
    Missing(&'a str),
}

/// The fleet `summarize` builds from `agents` (the i-th named 10.0.0.<i+1>:9741).
pub fn fleet_of(placement: PodPlacement, agents: Vec<FleetMember>) -> FleetCensus {
    let now = Instant::now();
    let agents = agents
        .into_iter()
        .enumerate()
        .map(|(i, a)| match a {
            FleetMember::Answered(node, pods) => {
                let (kept, _refused) = placement.verify(node, &pods);
                AgentCensus {
                    name: format!("10.0.0.{}:9741 ({node})", i + 1),
                    node: node.into(),
                    state: AgentState::Answered {
                        pods: Arc::new(kept),
                        at: now,
                    },
                }
            }
            FleetMember::Missing(node) => AgentCensus {
                name: format!("10.0.0.{}:9741 ({node})", i + 1),
                node: node.into(),
                state: AgentState::Missing {
                    error: "connection refused".into(),
                    last_known: None,
                },
            },
        })
        .collect();
    FleetCensus {
        agents,
        placement: Some(Arc::new(placement)),
    }
}

/// The fleet `summarize` builds when every agent `(node, census)` answered now.
pub fn fleet(placement: PodPlacement, agents: Vec<(&str, Vec<pb::PodConnections>)>) -> FleetCensus {
    let members = agents
        .into_iter()
        .map(|(node, pods)| FleetMember::Answered(node, pods))
        .collect();
    fleet_of(placement, members)
}

/// The value the aggregator's scaler answers KEDA for `r` over `fleet`.
pub fn scaler_value(fleet: Arc<FleetCensus>, r: keda_pb::ScaledObjectRef) -> Result<f64, Status> {
    let scaler = ScalerService::new(
        Arc::new(FixedFleet(fleet)),
        Duration::from_secs(5),
        tokio_util::sync::CancellationToken::new(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(
        scaler.get_metrics(tonic::Request::new(keda_pb::GetMetricsRequest {
            scaled_object_ref: Some(r),
            metric_name: String::new(),
        })),
    )
    .map(|r| r.into_inner().metric_values[0].metric_value_float)
}

pub fn code(got: &Result<f64, Status>) -> Option<tonic::Code> {
    got.as_ref().err().map(Status::code)
}

pub fn is_unavailable(got: &Result<f64, Status>) -> bool {
    code(got) == Some(tonic::Code::Unavailable)
}
