//! `nodekeeper aggregate` over real agents: three connected agents on different loopback ports,
//! each counting its own pods in real network namespaces (tests/support/census_pods.rs), one of
//! them stopped. The aggregator's KEDA answers are the sums of the two that answer (checked by
//! the Python grpcio client of tests/py/keda_check.py), GetFleet and /metrics report the third
//! as missing, discovery through the fake API's EndpointSlices finds the same agents, and
//! SIGTERM ends an open stream with OK. Without agents, KEDA gets UNAVAILABLE, not zero.

#[path = "support/census_pods.rs"]
mod census_pods;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use census_pods::{
    CALL_TIMEOUT, cases, get_metrics, run_keda_check, scaled_object, start_pods, wait_for_pool,
};
use futures::StreamExt as _;
use nodekeeper::pb::{self, aggregator_client::AggregatorClient};
use nodekeeper_tests::fake_api::{EndpointSeed, FakeApi};
use nodekeeper_tests::{
    Agent, Proc, agent_bin, free_port, http_get, loopback, require_python_modules, require_root,
    sample,
};
use tonic::Code;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const AGENTS_NS: &str = "nodekeeper-system";

/// A running aggregator on free loopback ports.
struct Aggregator {
    proc: Proc,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

impl Aggregator {
    /// Starts `nodekeeper aggregate` with `args` and waits until /readyz is 200.
    fn start(dir: &Path, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Aggregator {
        let (grpc, metrics) = (loopback(free_port()), loopback(free_port()));
        let mut cmd = Command::new(agent_bin());
        cmd.arg("aggregate")
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .args(args)
            .env_remove("KUBECONFIG")
            .env("NODEKEEPER_LOG", "info,nodekeeper=debug");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn(name, cmd, dir);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(http_get(metrics, "/readyz"), Ok((200, _))) {
            assert!(
                proc.alive() && Instant::now() < deadline,
                "aggregator did not become ready; log:\n{}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Aggregator {
            proc,
            grpc,
            metrics,
        }
    }

    fn fleet(&self) -> pb::FleetStatus {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut c = AggregatorClient::connect(format!("http://{}", self.grpc))
                .await
                .unwrap();
            tokio::time::timeout(CALL_TIMEOUT, c.get_fleet(pb::GetFleetRequest {}))
                .await
                .expect("GetFleet in time")
                .unwrap()
                .into_inner()
        })
    }

    fn metrics_text(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// The agent answering at `address`, by node, as GetFleet reports it.
fn by_address<'a>(fleet: &'a pb::FleetStatus, address: &str) -> &'a pb::FleetAgent {
    fleet
        .agents
        .iter()
        .find(|a| a.address == address)
        .unwrap_or_else(|| panic!("{address} not in {fleet:?}"))
}

#[test]
fn aggregator_sums_the_answering_agents_and_reports_the_stopped_one_as_root() {
    if !require_root() || !require_python_modules(&["grpc", "grpc_tools"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut pods = Vec::new();
    let mut agents = Vec::new();
    for node in NODES {
        api.add_node(node, &[]);
        let cgroup = dir.path().join(format!("cgroup-{node}"));
        pods.extend(start_pods(&api, &cgroup, dir.path(), node));
        let agent = Agent::builder()
            .connected(&kubeconfig, node)
            .arg("--host-cgroup")
            .arg(cgroup.display().to_string())
            .start();
        wait_for_pool(&agent.api.to_string(), 10.0);
        agents.push(agent);
    }
    let addresses: Vec<String> = agents.iter().map(|a| a.api.to_string()).collect();

    // node-c's agent goes away; its slice stays until Kubernetes notices, as in a real outage.
    let mut stopped = agents.pop().unwrap();
    stopped.proc.signal("TERM");
    assert!(stopped.proc.wait_exit(Duration::from_secs(5)).success());
    for (i, node) in NODES.iter().enumerate() {
        let port = addresses[i].rsplit_once(':').unwrap().1.parse().unwrap();
        api.add_endpoint_slice(
            AGENTS_NS,
            "nodekeeper",
            &[("metrics", 9740), ("grpc", port)],
            &[EndpointSeed::new("127.0.0.1")
                .node(node)
                .pod(&format!("nodekeeper-{node}"))],
        );
    }
    // Neither a not-ready agent nor another Service's endpoints are called.
    let dead = free_port();
    api.add_endpoint_slice(
        AGENTS_NS,
        "nodekeeper",
        &[("grpc", dead)],
        &[EndpointSeed::new("127.0.0.1")
            .node("node-d")
            .pod("nodekeeper-node-d")
            .ready(Some(false))],
    );
    let node_a_port: u16 = addresses[0].rsplit_once(':').unwrap().1.parse().unwrap();
    api.add_endpoint_slice(
        AGENTS_NS,
        "other",
        &[("grpc", node_a_port)],
        &[EndpointSeed::new("127.0.0.1").node("node-a").pod("other-a")],
    );

    let common = ["--deadline", "1s", "--refresh", "200ms"];
    let fixed = Aggregator::start(
        dir.path(),
        "aggregate-static",
        &[&["--agents", &addresses.join(",")][..], &common].concat(),
        &[],
    );
    let kubeconfig_env = kubeconfig.display().to_string();
    let discovered = Aggregator::start(
        dir.path(),
        "aggregate-service",
        &[&["--service", "nodekeeper-system/nodekeeper"][..], &common].concat(),
        &[("KUBECONFIG", &kubeconfig_env)],
    );

    for (name, agg) in [("static", &fixed), ("discovery", &discovered)] {
        // Two nodes' pods, each web pool 4 + 6: the stopped node's pods are not counted.
        wait_for_pool(&agg.grpc.to_string(), 20.0);
        run_keda_check(&agg.grpc.to_string(), &cases(2.0), dir.path());

        let fleet = agg.fleet();
        assert_eq!(fleet.agents.len(), 3, "{name}: {fleet:?}");
        for (i, node) in NODES.iter().enumerate() {
            let a = by_address(&fleet, &addresses[i]);
            // A silent agent's node is known only from its EndpointSlice.
            let want_node = if i == 2 && name == "static" { "" } else { node };
            assert_eq!(a.node_name, want_node, "{name}: {a:?}");
            if i < 2 {
                assert!(a.answered && a.error.is_empty(), "{name}: {a:?}");
                assert_eq!(a.pods, 3, "{name}: {a:?}");
                assert!(a.latency.is_some(), "{name}: {a:?}");
            } else {
                assert!(!a.answered, "{name}: the stopped agent answered? {a:?}");
                assert!(!a.error.is_empty(), "{name}: no reason given: {a:?}");
                assert_eq!(a.pods, 0);
            }
        }
        let text = agg.metrics_text();
        assert_eq!(
            sample(
                &text,
                "nodekeeper_aggregate_agents",
                &[("state", "answered")]
            ),
            Some(2.0),
            "{name}:\n{text}"
        );
        assert_eq!(
            sample(
                &text,
                "nodekeeper_aggregate_agents",
                &[("state", "missing")]
            ),
            Some(1.0),
            "{name}:\n{text}"
        );
        assert!(
            sample(&text, "nodekeeper_aggregate_agent_failures_total", &[]).unwrap_or(0.0) >= 1.0,
            "{name}:\n{text}"
        );
        assert!(
            sample(
                &text,
                "nodekeeper_aggregate_fanout_duration_seconds_count",
                &[]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "{name}:\n{text}"
        );
        let log = agg.proc.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(&addresses[2])),
            "{name}: no warning naming the missing agent:\n{log}"
        );
    }
    // Discovery asked for the Service's slices only, by label.
    assert!(
        api.requests().iter().any(|r| r.path
            == "/apis/discovery.k8s.io/v1/namespaces/nodekeeper-system/endpointslices"
            && r.query
                .contains("kubernetes.io%2Fservice-name%3Dnodekeeper")),
        "{:?}",
        api.requests()
    );

    // SIGTERM: an open StreamIsActive ends with OK and the aggregator exits 0.
    let mut fixed = fixed;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = nodekeeper::keda_pb::external_scaler_client::ExternalScalerClient::connect(
            format!("http://{}", fixed.grpc),
        )
        .await
        .unwrap();
        let mut stream = c
            .stream_is_active(scaled_object(
                "shop",
                &[
                    ("metric", "established"),
                    ("target", "5"),
                    ("podSelector", "app=web"),
                ],
            ))
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(CALL_TIMEOUT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(first.result);
        fixed.proc.signal("TERM");
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stream ended after SIGTERM");
        assert!(end.is_none(), "ended with {end:?} instead of OK");
    });
    let status = fixed.proc.wait_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        fixed.proc.log_text()
    );
    drop(pods);
}

#[test]
fn with_no_agent_answering_keda_gets_unavailable_and_get_fleet_names_each() {
    let dir = tempfile::tempdir().unwrap();
    let dead: Vec<String> = (0..2).map(|_| loopback(free_port()).to_string()).collect();
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &["--agents", &dead.join(","), "--deadline", "500ms"],
        &[],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(get_metrics(
            &agg.grpc.to_string(),
            scaled_object(
                "shop",
                &[
                    ("metric", "established"),
                    ("target", "5"),
                    ("podSelector", "app=web"),
                ],
            ),
        ))
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    for d in &dead {
        assert!(e.message().contains(d.as_str()), "{d} not named: {e:?}");
    }
    let fleet = agg.fleet();
    assert_eq!(fleet.agents.len(), 2);
    assert!(
        fleet
            .agents
            .iter()
            .all(|a| !a.answered && !a.error.is_empty())
    );
}

#[test]
fn bad_flags_exit_64_naming_the_flag() {
    for (args, want) in [
        (
            &["--agents", "127.0.0.1:1", "--deadline", "0s"][..],
            "--deadline",
        ),
        (&["--agents", "127.0.0.1"][..], "--agents"),
        (
            &["--agents", "127.0.0.1:1", "--max-concurrency", "0"][..],
            "--max-concurrency",
        ),
    ] {
        let out = Command::new(agent_bin())
            .arg("aggregate")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
