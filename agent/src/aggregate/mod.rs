//! `nodekeeper aggregate`: the cluster-wide aggregator, run as a Deployment. It finds every node
//! agent (the agents' headless Service's EndpointSlices, or a static list), fans out
//! `NodeAgent/GetMetrics` with deadlines, and serves KEDA's `externalscaler.ExternalScaler`
//! with fleet-wide sums (the same `keda::evaluate` as the agents), `nodekeeper.v1.Aggregator`
//! (every agent and whether it answered), grpc.health.v1 and reflection on `--listen`, and
//! `/metrics`, `/healthz`, `/readyz` on `--metrics-listen`.
//!
//! Owns its CLI flags, the wiring and the shutdown (SIGTERM: servers stop accepting, streams end
//! with OK, exit 0). `discovery` decides whom to call, `fanout` calls them. Never reads the host
//! and never writes to the Kubernetes API.

pub mod agent_tls;
pub mod api_auth;
pub mod discovery;
pub mod fanout;
pub mod pods;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::{Request, Response, Status};

use crate::config::{ConfigDuration, KubernetesMode};
use crate::keda::query::Query;
use crate::keda::service::{Census, PodSource, ScalerService, query_pins};
use crate::keda_pb::external_scaler_server::ExternalScalerServer;
use crate::pb::{self, HealthState, aggregator_server};
use crate::runtime::{Health, Supervisor};
use discovery::{Discovery, ServiceWatch};
use fanout::{AggregateMetrics, FanoutConfig, Fleet};
use pods::PodWatch;

/// KEDA's default pollingInterval is 30 s; a deadline far below it keeps one slow node from
/// delaying every ScaledObject, and a healthy agent answers from its cache in milliseconds.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);
/// Many ScaledObjects polled by KEDA at nearly the same time share one fan-out; 5 s is well
/// under KEDA's polling interval, so values are never staler than one poll.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
/// Connections opened at once: enough for a thousand nodes within a couple of deadlines, few
/// enough not to exhaust the aggregator's file descriptors or burst the node network.
pub const DEFAULT_MAX_CONCURRENCY: usize = 256;
/// Within the Deployment's terminationGracePeriodSeconds (30 s) with room to spare; servers stop
/// accepting at once, so this only bounds in-flight fan-outs.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The gRPC capability's health name (also the grpc.health.v1 service name).
const CAPABILITY: &str = "aggregate";

/// `nodekeeper aggregate` flags; each also reads an env var.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregateArgs {
    /// gRPC address: externalscaler.ExternalScaler, nodekeeper.v1.Aggregator, health, reflection.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_LISTEN",
        default_value = "0.0.0.0:9743"
    )]
    pub listen: SocketAddr,
    /// HTTP address for /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_METRICS_LISTEN",
        default_value = "0.0.0.0:9744"
    )]
    pub metrics_listen: SocketAddr,
    /// Static agent list (host:port,...), instead of discovery through a Service.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_AGENTS",
        value_delimiter = ',',
        conflicts_with = "service",
        required_unless_present = "service"
    )]
    pub agents: Vec<String>,
    /// The agents' headless Service as NAMESPACE/NAME: its EndpointSlices' endpoints, ready or
    /// not, are the expected agents (followed by a watch).
    #[arg(long, env = "NODEKEEPER_AGGREGATE_SERVICE", value_parser = parse_service)]
    pub service: Option<ServiceRef>,
    /// The Service port (by name) the agents serve gRPC on.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_PORT_NAME", default_value = "grpc")]
    pub port_name: String,
    /// How long a fan-out waits for each agent's GetMetrics (e.g. 500ms, 2s); a slower census
    /// is kept and answers the next fan-out.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_DEADLINE", default_value = "2s")]
    pub deadline: ConfigDuration,
    /// How long one fan-out's result is reused by every caller.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_REFRESH", default_value = "5s")]
    pub refresh: ConfigDuration,
    /// File holding a bearer token sent to the agents (needed when their openReadOnly is false).
    /// Sent only over TLS (--cacert) unless --allow-plaintext-token.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Send --token-file's token to agents dialled without TLS: anyone on the path of a fan-out
    /// (or any endpoint of the agents' Service) reads it. For test clusters only.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_ALLOW_PLAINTEXT_TOKEN",
        requires = "token_file"
    )]
    pub allow_plaintext_token: bool,
    /// PEM CA bundle the agents' certificates must chain to; dials the agents over TLS.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_CACERT")]
    pub cacert: Option<PathBuf>,
    /// PEM client certificate presented to the agents (mTLS), with --key.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name verified in the agents' certificates (they are dialled by IP), e.g.
    /// nodekeeper.nodekeeper-system.svc.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Agents waited for at once.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_MAX_CONCURRENCY", default_value_t = DEFAULT_MAX_CONCURRENCY)]
    pub max_concurrency: usize,
    /// PEM certificate chain the aggregator's own API (--listen) serves TLS with, with
    /// --listen-key; re-read when it changes.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_LISTEN_CERT",
        requires = "listen_key"
    )]
    pub listen_cert: Option<PathBuf>,
    /// PEM private key of --listen-cert.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_LISTEN_KEY",
        requires = "listen_cert"
    )]
    pub listen_key: Option<PathBuf>,
    /// PEM CA bundle the callers' client certificates (KEDA's) must chain to (mTLS); needs
    /// --listen-cert. Re-read when it changes.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_LISTEN_CLIENT_CA",
        requires = "listen_cert"
    )]
    pub listen_client_ca: Option<PathBuf>,
    /// Client certificate names (subject CN or DNS SAN) accepted, e.g. keda-operator; none:
    /// every certificate of --listen-client-ca.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_LISTEN_CLIENT_NAMES",
        value_delimiter = ',',
        requires = "listen_client_ca"
    )]
    pub listen_client_names: Vec<String>,
    /// File holding a bearer token callers of the aggregator's API may present (GetFleet from
    /// the CLI or grpcurl; KEDA cannot send one). Re-read when it changes.
    #[arg(long, env = "NODEKEEPER_AGGREGATE_LISTEN_TOKEN_FILE")]
    pub listen_token_file: Option<PathBuf>,
    /// Serve GetFleet, KEDA's scaler and reflection to callers without any credential.
    #[arg(
        long,
        env = "NODEKEEPER_AGGREGATE_ALLOW_ANONYMOUS",
        conflicts_with_all = ["listen_client_ca", "listen_token_file"]
    )]
    pub allow_anonymous: bool,
    /// Check the flags and read every file, print the API's authentication, and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// `--service NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

fn parse_service(s: &str) -> Result<ServiceRef, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ServiceRef {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// A flag value is unusable (exit 64).
    #[error("{0}")]
    Usage(String),
    /// `--service` needs the Kubernetes API and none could be configured.
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error("building the tokio runtime: {0}")]
    Runtime(std::io::Error),
}

impl AggregateError {
    /// Low-cardinality label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Usage(_) => "usage",
            Self::Kube(_) => "kube",
            Self::Api(_) => "api",
            Self::Http(_) => "http",
            Self::Runtime(_) => "runtime",
        }
    }
}

// === the census source and the Aggregator service ===

/// KEDA's source on the aggregator: every expected agent's census; each query's coverage
/// policy decides whether the agents that answered are enough (keda::coverage).
pub struct FleetSource(pub Arc<Fleet>);

impl PodSource for FleetSource {
    fn census<'a>(&'a self, q: &'a Query) -> BoxFuture<'a, Result<Census, Status>> {
        Box::pin(async move {
            let fleet = self.0.get_pinned(&query_pins(q)).await?;
            Ok(Census::from_fleet(fleet.census.clone()))
        })
    }
}

/// `nodekeeper.v1.Aggregator`.
pub struct AggregatorService(pub Arc<Fleet>);

#[tonic::async_trait]
impl aggregator_server::Aggregator for AggregatorService {
    async fn get_fleet(
        &self,
        _req: Request<pb::GetFleetRequest>,
    ) -> Result<Response<pb::FleetStatus>, Status> {
        Ok(Response::new(self.0.get().await.status.clone()))
    }
}

// === run ===

/// Builds the runtime and runs until SIGTERM/SIGINT.
pub fn main(args: AggregateArgs) -> Result<(), AggregateError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The work is waiting on the network: two workers serve a large fleet.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AggregateError::Runtime)?;
    runtime.block_on(run(args))
}

pub async fn run(args: AggregateArgs) -> Result<(), AggregateError> {
    let (deadline, refresh) = (args.deadline.get(), args.refresh.get());
    if deadline.is_zero() {
        return Err(AggregateError::Usage("--deadline: must be > 0".into()));
    }
    if args.max_concurrency == 0 {
        return Err(AggregateError::Usage(
            "--max-concurrency: must be > 0".into(),
        ));
    }
    if let Some(path) = &args.token_file {
        crate::api::client::read_token(path)
            .map_err(|e| AggregateError::Usage(format!("--token-file: {e}")))?;
    }
    let tls = if args.cacert.is_some() || args.cert.is_some() || args.server_name.is_some() {
        let options = crate::api::client::ConnectOptions {
            token_file: None,
            cacert: args.cacert.clone(),
            cert: args.cert.clone(),
            key: args.key.clone(),
            server_name: args.server_name.clone(),
        };
        Some(agent_tls::AgentTls::load(options).map_err(|e| AggregateError::Usage(e.to_string()))?)
    } else {
        None
    };
    if let Some(problem) = api_auth::plaintext_token_problem(&args) {
        return Err(AggregateError::Usage(problem));
    }
    if let Some(warning) = api_auth::plaintext_token_warning(&args) {
        tracing::warn!(allow_plaintext_token = true, "{warning}");
    }
    if let Some(problem) = api_auth::problems(&args).into_iter().next() {
        return Err(AggregateError::Usage(problem));
    }
    let mut registry = prometheus_client::registry::Registry::with_prefix("nodekeeper");
    // The API's own credentials: read now, so a bad file fails the start naming its flag.
    let server_auth = crate::api::auth::ServerAuth::load_as(
        &api_auth::auth_config(&args),
        &mut registry,
        api_auth::AGGREGATOR_FIELDS,
    )
    .map_err(|e| AggregateError::Usage(e.to_string()))?;
    if args.check_config {
        print!("{}", api_auth::describe(&args));
        return Ok(());
    }
    let anonymous = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    registry.register(
        "aggregate_api_anonymous",
        "1 when the aggregator's API answers callers without a credential (--allow-anonymous)",
        anonymous.clone(),
    );
    anonymous.set(i64::from(args.allow_anonymous));
    if let Some(warning) = api_auth::open_warning(&args) {
        tracing::warn!(allow_anonymous = args.allow_anonymous, "{warning}");
    }
    let metrics = AggregateMetrics::register(&mut registry, args.service.is_some());
    let mut pods = None;
    let discovery = match &args.service {
        Some(svc) => {
            let client = crate::kube::connect(KubernetesMode::Required)
                .await?
                .expect("Required mode returns a client or an error");
            pods = Some(PodWatch::start(client.clone(), metrics.discovery_errors()));
            Discovery::Service(ServiceWatch::start(
                client,
                &svc.namespace,
                &svc.name,
                &args.port_name,
                metrics.discovery_errors(),
            ))
        }
        None => {
            let d = Discovery::fixed(&args.agents);
            if let Discovery::Static(t) = &d {
                for t in t {
                    match &tls {
                        Some(tls) => tls.endpoint(&t.address).map(drop),
                        None => crate::api::client::endpoint(&t.address).map(drop),
                    }
                    .map_err(|e| AggregateError::Usage(format!("--agents: {e}")))?;
                }
            }
            d
        }
    };

    let health = Health::default();
    let mut supervisor = Supervisor::new(health.clone());
    let mut fleet = Fleet::new(
        discovery,
        FanoutConfig {
            deadline,
            refresh,
            token_file: args.token_file.clone(),
            max_concurrency: args.max_concurrency,
        },
        metrics,
    );
    if let Some(tls) = tls {
        fleet = fleet.with_tls(tls);
    }
    if let Some(pods) = pods {
        fleet = fleet.with_pod_watch(pods);
    }
    let fleet = Arc::new(fleet);

    // Bind before spawning: a port in use is a start failure.
    let grpc_listener = crate::api::bind(args.listen).await?;
    let http_listener = crate::http::bind(args.metrics_listen).await?;
    tracing::info!(
        grpc = %grpc_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        metrics = %http_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        agents = ?args.agents,
        service = ?args.service.as_ref().map(|s| format!("{}/{}", s.namespace, s.name)),
        ?deadline,
        ?refresh,
        api_tls = args.listen_cert.is_some(),
        api_client_ca = args.listen_client_ca.is_some(),
        api_token = args.listen_token_file.is_some(),
        allow_anonymous = args.allow_anonymous,
        "nodekeeper aggregator starting"
    );

    let admin = crate::http::AdminState {
        registry: Arc::new(registry),
        snapshots: None,
        health: health.clone(),
    };
    let h = health.clone();
    supervisor.spawn("http", move |token| async move {
        h.set("http", HealthState::Serving, "");
        crate::http::serve(http_listener, admin, token).await?;
        Ok(())
    });

    let h = health.clone();
    supervisor.spawn(CAPABILITY, move |token| async move {
        let (reflection_v1, reflection_v1alpha) = (
            crate::api::reflection_v1()?,
            crate::api::reflection_v1alpha()?,
        );
        // The agents' one budget for long-lived streams (KEDA's and anonymous health Watch
        // alike), half of it per address, and their HTTP/2 stream cap per connection.
        let streams = crate::bounds::StreamBudget::new(crate::config::DEFAULT_MAX_WATCH_STREAMS);
        let scaler =
            ScalerService::new(Arc::new(FleetSource(fleet.clone())), refresh, token.clone())
                .with_stream_budget(streams.clone());
        let (health_service, mirror) = crate::api::health_service(h.clone(), &token, Some(streams));
        h.set(CAPABILITY, HealthState::Serving, "");
        // Every call passes the agent's auth layer (credentials by default, health anonymous)
        // and connection caps; TLS files are re-read on change as on the agents.
        let admissions = server_auth.layer.admissions();
        let router = crate::api::server_builder()
            .layer(crate::api::api_layers(server_auth.layer))
            .add_service(ExternalScalerServer::new(scaler))
            .add_service(aggregator_server::AggregatorServer::new(AggregatorService(
                fleet,
            )))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let result = crate::api::serve_router(
            router,
            grpc_listener,
            server_auth.tls,
            admissions,
            h,
            CAPABILITY,
            token,
        )
        .await;
        mirror.abort();
        result.map_err(crate::api::ApiError::from)?;
        Ok(())
    });

    let stuck = supervisor.run_until_signal(SHUTDOWN_TIMEOUT).await;
    if stuck.is_empty() {
        tracing::info!("nodekeeper aggregator stopped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AggregateArgs,
    }

    fn parse(args: &[&str]) -> Result<AggregateArgs, String> {
        Cli::try_parse_from(std::iter::once("aggregate").chain(args.iter().copied()))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let a = parse(&["--agents", "10.0.0.1:9741,10.0.0.2:9741"]).unwrap();
        assert_eq!(a.listen, "0.0.0.0:9743".parse().unwrap());
        assert_eq!(a.metrics_listen, "0.0.0.0:9744".parse().unwrap());
        assert_eq!(a.agents, vec!["10.0.0.1:9741", "10.0.0.2:9741"]);
        assert_eq!(a.deadline.get(), DEFAULT_DEADLINE);
        assert_eq!(a.refresh.get(), DEFAULT_REFRESH);
        assert_eq!(a.port_name, "grpc");
        assert_eq!(a.max_concurrency, DEFAULT_MAX_CONCURRENCY);
    }

    #[test]
    fn service_is_namespace_slash_name() {
        let a = parse(&[
            "--service",
            "nodekeeper-system/nodekeeper",
            "--deadline",
            "500ms",
        ])
        .unwrap();
        assert_eq!(
            a.service,
            Some(ServiceRef {
                namespace: "nodekeeper-system".into(),
                name: "nodekeeper".into()
            })
        );
        assert_eq!(a.deadline.get(), Duration::from_millis(500));
        for bad in ["nodekeeper", "/x", "ns/", "a/b/c"] {
            let e = parse(&["--service", bad]).unwrap_err();
            assert!(e.contains("is not NAMESPACE/NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_api_needs_a_credential_unless_anonymous_is_asked_for() {
        let agents = ["--agents", "a:1"];
        let a = parse(&agents).unwrap();
        assert!(!a.allow_anonymous && !api_auth::has_credential(&a));
        let c = api_auth::auth_config(&a);
        assert!(!c.open_read_only && !c.open_keda, "{c:?}");
        let w = api_auth::open_warning(&a).expect("no credential is warned about");
        assert!(
            w.contains("refuse every caller") && w.contains("--allow-anonymous"),
            "{w}"
        );

        let a = parse(&[&agents[..], &["--allow-anonymous"]].concat()).unwrap();
        let c = api_auth::auth_config(&a);
        assert!(c.open_read_only && c.open_keda, "{c:?}");
        assert!(
            api_auth::describe(&a).contains("allowAnonymous: true\n# WARNING: --allow-anonymous")
        );

        let a = parse(
            &[
                &agents[..],
                &[
                    "--listen-cert",
                    "/tls/tls.crt",
                    "--listen-key",
                    "/tls/tls.key",
                    "--listen-client-ca",
                    "/tls/ca.crt",
                    "--listen-client-names",
                    "keda-operator,ops",
                    "--listen-token-file",
                    "/t/token",
                ],
            ]
            .concat(),
        )
        .unwrap();
        let c = api_auth::auth_config(&a);
        assert_eq!(
            c.tls.as_ref().and_then(|t| t.client_ca_file.as_deref()),
            Some(std::path::Path::new("/tls/ca.crt"))
        );
        assert_eq!(
            c.client_roles["keda-operator"],
            [crate::api::authz::Role::Read]
        );
        assert_eq!(
            c.read_token_file.as_deref(),
            Some(std::path::Path::new("/t/token"))
        );
        assert_eq!(c.token_file, None, "the aggregator serves no mutating call");
        assert!(api_auth::open_warning(&a).is_none());
        assert!(!api_auth::describe(&a).contains("WARNING"));

        // Anonymous beside a credential is a contradiction; a CA needs the server certificate.
        for bad in [
            &["--allow-anonymous", "--listen-token-file", "/t"][..],
            &["--listen-client-ca", "/ca"][..],
            &["--listen-cert", "/c"][..],
            &["--listen-client-names", "keda"][..],
        ] {
            assert!(parse(&[&agents[..], bad].concat()).is_err(), "{bad:?}");
        }
        let a = parse(
            &[
                &agents[..],
                &[
                    "--listen-cert",
                    "/c",
                    "--listen-key",
                    "/k",
                    "--listen-client-ca",
                    "/ca",
                    "--listen-client-names",
                    "a,,b",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            api_auth::problems(&a),
            ["--listen-client-names: entry 1 is empty"]
        );
    }

    /// Decision #19-i: the agents' token goes out in clear text only when asked for.
    #[test]
    fn a_token_to_the_agents_needs_tls_or_the_plaintext_flag() {
        let plain = parse(&["--agents", "a:1", "--token-file", "/t"]).unwrap();
        let p = api_auth::plaintext_token_problem(&plain).expect("refused");
        assert!(
            p.starts_with("--token-file") && p.contains("--allow-plaintext-token"),
            "{p}"
        );
        let tls = parse(&["--agents", "a:1", "--token-file", "/t", "--cacert", "/ca"]).unwrap();
        assert_eq!(api_auth::plaintext_token_problem(&tls), None);
        assert!(api_auth::describe(&tls).contains("agents:\n  tls: true\n"));
        let allowed = parse(&[
            "--agents",
            "a:1",
            "--token-file",
            "/t",
            "--allow-plaintext-token",
        ])
        .unwrap();
        assert_eq!(api_auth::plaintext_token_problem(&allowed), None);
        let d = api_auth::describe(&allowed);
        assert!(
            d.contains("allowPlaintextToken: true")
                && d.contains("# WARNING: --allow-plaintext-token"),
            "{d}"
        );
        assert!(parse(&["--agents", "a:1", "--allow-plaintext-token"]).is_err());
    }

    #[test]
    fn agents_or_service_exactly_one() {
        assert!(parse(&[]).unwrap_err().contains("--agents"));
        let both = parse(&["--agents", "a:1", "--service", "ns/n"]).unwrap_err();
        assert!(both.contains("cannot be used with"), "{both}");
    }
}
