//! The aggregator reads the agents over TLS with its own client certificate, and the agents
//! answer census calls only to credentials that carry role `read` (issue #19): an agent with
//! `openReadOnly: false` in a network namespace standing for the node, the aggregator beside
//! it, and a second namespace standing for any other pod on the network. From that pod a
//! census call without a certificate, with a certificate of the same CA whose name has no
//! role, or in plaintext is refused; the aggregator's succeeds. The aggregator's certificate
//! is rotated through a Secret volume updated as kubelet does it: a bad pair is refused and the
//! previous certificate stays in use; a good one is used by the next fan-out, without a
//! restart.

use crate::support::aggregate::{Aggregator, secret_files};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nodekeeper::pb::{
    self, aggregator_client::AggregatorClient, node_agent_client::NodeAgentClient,
};
use nodekeeper_tests::netns_pods::{Netns, link};
use nodekeeper_tests::pki::{Pki, SecretVolume};
use nodekeeper_tests::{Proc, agent_bin, free_port, loopback, require_root, require_tool, sample};
use tonic::Code;
use tonic::transport::{ClientTlsConfig, Endpoint};

/// The name every agent certificate carries, verified by the aggregator (`--server-name`):
/// agents are dialled by IP, so the name must not depend on it.
const AGENT_NAME: &str = "nodekeeper.nodekeeper-system.svc";
/// The aggregator's client certificate CN, role read on the agents.
const AGGREGATOR: &str = "nodekeeper-aggregator";
/// Every wait gives up after this: generous on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

fn pki() -> Pki {
    let pki = Pki::new();
    pki.ca("ca");
    pki.server(
        "agent",
        "ca",
        "nodekeeper agent",
        &format!("DNS:{AGENT_NAME}"),
    )
    .client("aggregator", "ca", AGGREGATOR)
    .client("aggregator-next", "ca", AGGREGATOR)
    .client("intruder", "ca", "intruder");
    pki
}

fn wait_ready(proc: &mut Proc, metrics: std::net::SocketAddr) {
    let name = proc.name.clone();
    nodekeeper_tests::wait_ready(proc, metrics, "/readyz", &name);
}

/// A standalone agent with reads closed, TLS, and role read for the aggregator's name only,
/// listening on every address of the node namespace.
fn start_agent(dir: &Path, pki: &Pki, port: u16) -> Proc {
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "api:\n  auth:\n    openReadOnly: false\n    tls:\n      certFile: {}\n      keyFile: {}\n      clientCaFile: {}\n    clientRoles:\n      {AGGREGATOR}: [read]\n",
            pki.path("agent.crt").display(),
            pki.path("agent.key").display(),
            pki.path("ca.crt").display(),
        ),
    )
    .unwrap();
    // A kubelet cgroup tree with one pod, so the standalone agent has a census to give.
    let cgroup = dir.join("cgroup");
    nodekeeper_tests::cgroup::sample_tree(&cgroup);
    let metrics = loopback(free_port());
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--standalone", "--config"])
        .arg(&config)
        .arg("--host-cgroup")
        .arg(&cgroup)
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .arg("--api-listen")
        .arg(format!("0.0.0.0:{port}"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env_remove("KUBECONFIG")
        .env("NODEKEEPER_LOG", "info,nodekeeper=debug");
    let mut proc = Proc::spawn("agent", cmd, dir);
    wait_ready(&mut proc, metrics);
    proc
}

/// The aggregator reading `agent` with the client credential in `creds`, checking the agent's
/// name `AGENT_NAME`; its own API opened (its credentials are aggregate_auth.rs's).
fn start_aggregator(dir: &Path, agent: &str, creds: &SecretVolume) -> Aggregator {
    Aggregator::builder()
        .args(["--agents", agent])
        .fast()
        .arg("--cacert")
        .arg(creds.path("ca.crt"))
        .arg("--cert")
        .arg(creds.path("tls.crt"))
        .arg("--key")
        .arg(creds.path("tls.key"))
        .args(["--server-name", AGENT_NAME])
        .allow_anonymous()
        .start(dir)
}

// === impl Aggregator: the one agent as its fan-out sees it ===

impl Aggregator {
    /// The one agent as the next fan-out sees it.
    fn agent(&self, rt: &tokio::runtime::Runtime) -> pb::FleetAgent {
        std::thread::sleep(Duration::from_millis(150));
        rt.block_on(async {
            let mut c = AggregatorClient::connect(format!("http://{}", self.grpc))
                .await
                .expect("connect to the aggregator");
            let fleet = tokio::time::timeout(WAIT, c.get_fleet(pb::GetFleetRequest {}))
                .await
                .expect("GetFleet in time")
                .expect("GetFleet")
                .into_inner();
            assert_eq!(fleet.agents.len(), 1, "{fleet:?}");
            fleet.agents[0].clone()
        })
    }

    /// Polls GetFleet until `want` holds for the agent.
    fn wait_agent(
        &self,
        rt: &tokio::runtime::Runtime,
        what: &str,
        want: impl Fn(&pb::FleetAgent) -> bool,
    ) -> pb::FleetAgent {
        let deadline = Instant::now() + WAIT;
        loop {
            let a = self.agent(rt);
            if want(&a) {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: last {a:?}; log:\n{}",
                self.proc.log_text()
            );
        }
    }

    fn tls_reloads(&self, result: &str) -> f64 {
        sample(
            &self.metrics_text(),
            "nodekeeper_aggregate_tls_reloads_total",
            &[("result", result)],
        )
        .unwrap_or(0.0)
    }
}

/// A census call (GetMetrics) made from inside `pod`, with the client certificate `identity`
/// (TLS without one when None; plaintext when `tls` is false).
fn census_from(
    pod: &Netns,
    pki: &Pki,
    agent: &str,
    tls: bool,
    identity: Option<&str>,
) -> Result<(), tonic::Status> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _inside = pod.enter();
            // Built after entering: its sockets are opened by this thread, in the pod.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let ep = if tls {
                    let mut config = ClientTlsConfig::new()
                        .ca_certificate(pki.certificate("ca"))
                        .domain_name(AGENT_NAME);
                    if let Some(name) = identity {
                        config = config.identity(pki.identity(name));
                    }
                    Endpoint::from_shared(format!("https://{agent}"))
                        .unwrap()
                        .tls_config(config)
                        .unwrap()
                } else {
                    Endpoint::from_shared(format!("http://{agent}")).unwrap()
                };
                let channel = ep
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
                let mut c = NodeAgentClient::new(channel);
                tokio::time::timeout(WAIT, c.get_metrics(pb::GetMetricsRequest::default()))
                    .await
                    .map_err(|_| tonic::Status::deadline_exceeded("GetMetrics"))?
                    .map(drop)
            })
        })
        .join()
        .expect("the pod thread panicked")
    })
}

#[test]
fn only_the_aggregator_reads_agents_over_tls_and_other_pods_are_refused_as_root() {
    if !(require_root() && require_tool("openssl") && require_tool("ip")) {
        return;
    }
    // First local: dropped last, after every process in it.
    let node = Netns::enter_fresh("aggtls-node");
    let pod = Netns::new("aggtls-pod");
    let (node_ip, _) = link(node.netns(), &pod, 91);
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let port = free_port();
    let mut agent = start_agent(dir.path(), &pki, port);
    let address = format!("{node_ip}:{port}");
    let mut volume = SecretVolume::new(&secret_files(&pki, "aggregator", "aggregator"));
    let agg = start_aggregator(dir.path(), &address, &volume);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The aggregator's census is answered.
    let a = agg.wait_agent(&rt, "the aggregator's census", |a| a.answered);
    assert!(a.error.is_empty(), "{a:?}");

    // Another pod: no certificate, a certificate whose name has no role, plaintext.
    let e = census_from(&pod, &pki, &address, true, None).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = census_from(&pod, &pki, &address, true, Some("intruder")).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("intruder"), "{e:?}");
    let e = census_from(&pod, &pki, &address, false, None).unwrap_err();
    assert!(
        !matches!(e.code(), Code::Ok | Code::PermissionDenied),
        "plaintext: {e:?}"
    );
    // The same pod with the aggregator's credential is answered: the network position grants
    // nothing, the credential does.
    census_from(&pod, &pki, &address, true, Some("aggregator"))
        .expect("the aggregator's certificate from another namespace");

    // A bad pair in the aggregator's Secret: refused, the previous certificate stays in use.
    volume.update(&secret_files(&pki, "aggregator", "intruder"));
    agg.wait_agent(&rt, "the bad pair refused", |_| {
        agg.tls_reloads("refused") >= 1.0
    });
    assert!(
        agg.agent(&rt).answered,
        "the refused pair replaced the good one"
    );
    assert!(agg.proc.log_text().contains("refused"));

    // A certificate whose name has no role on the agents is loaded and used by new
    // connections: the agent refuses it (so the rotation took effect without a restart).
    volume.update(&secret_files(&pki, "intruder", "intruder"));
    let a = agg.wait_agent(&rt, "the intruder certificate in use", |a| !a.answered);
    assert!(a.error.contains("intruder"), "{a:?}");

    // The next good certificate: answered again.
    volume.update(&secret_files(&pki, "aggregator-next", "aggregator-next"));
    agg.wait_agent(&rt, "the next certificate in use", |a| a.answered);
    assert_eq!(agg.tls_reloads("loaded"), 2.0);
    assert!(agent.alive(), "the agent exited: {}", agent.log_text());
}
