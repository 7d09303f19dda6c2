//! Adversary findings against issue #18's promises (autoscaling signals): KEDA never gets a
//! silently smaller number, and the values it gets are exact. Each test is a scenario that
//! broke the promise; each now passes (docs/connections.md, safety case).
//!
//! Real agents count real pods in network namespaces (tests/support/census_pods.rs) and the
//! aggregator runs as `nodekeeper aggregate` against the fake API server.

use crate::support::aggregate::{Aggregator, FixedFleet, status_text, web_query};
use crate::support::census_pods;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use census_pods::{get_metrics, scaled_object, start_pods, wait_for_pool};
use nodekeeper::keda::coverage::{AgentCensus, AgentState, FleetCensus};
use nodekeeper::keda::query::Query;
use nodekeeper::keda::service::ScalerService;
use nodekeeper::keda_pb::{self, external_scaler_server::ExternalScaler as _};
use nodekeeper::pb;
use nodekeeper_tests::fake_api::{EndpointSeed, FakeApi, Fault, FaultKind, PodSeed};
use nodekeeper_tests::{Agent, require_root};

/// `established` summed over the `app=web` pods of namespace `shop`, optionally to `remote`.
fn web_value(addr: SocketAddr, extra: &[(&str, &str)]) -> Result<f64, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(get_metrics(&addr.to_string(), web_query("shop", extra)))
        .map(|m| m.metric_values[0].metric_value_float)
        .map_err(status_text)
}

// === pins: the 257th remote ===

/// pins.rs keeps at most 256 remotes pinned; a 257th distinct remote named by a query is
/// silently not pinned, so beyond `topRemotes` it stays folded into `*:other` and the query
/// reads 0 (the workload scales in) instead of its 3 connections or an error.
#[test]
fn adversary_the_257th_remote_named_by_queries_is_folded_and_reads_0_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let node = "node-a";
    api.add_node(node, &[]);
    let cgroup = dir.path().join("cgroup");
    let pods = start_pods(&api, &cgroup, dir.path(), node);
    // topRemotes 1: web-1's 3 queued connections to 8081 rank below its 4 to the database.
    let agent = Agent::builder()
        .connected(&kubeconfig, node)
        .config("metrics:\n  connections:\n    topRemotes: 1\n")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    wait_for_pool(&agent.api.to_string(), 10.0);
    // 256 ScaledObjects (or one hostile caller) name 256 distinct remotes the pods never use
    // (the pool remote pinned by wait_for_pool is one of the 256).
    for i in 1..=255u32 {
        let remote = format!("10.77.{}.{}:5432", i / 250, i % 250 + 1);
        assert_eq!(
            web_value(agent.api, &[("remote", &remote)]),
            Ok(0.0),
            "{remote}"
        );
    }
    // The 257th: a real pool of 3 connections beyond topRemotes. Refusing it (RESOURCE_EXHAUSTED
    // naming the remote and the limit) is an answer KEDA cannot mistake for a value; evicting a
    // pin every query still asks for could make that query's census fold its remote instead.
    let got = web_value(agent.api, &[("remote", "*:8081")]);
    assert!(
        got == Ok(3.0)
            || got
                .as_ref()
                .is_err_and(|e| e.starts_with("ResourceExhausted")
                    && e.contains("*:8081")
                    && e.contains("256 remotes")),
        "the 257th remote a query names must be counted exactly (or refused), never folded to \
         0; got {got:?}"
    );
    drop(pods);
}

// === the aggregator's pod watch ===

/// Coverage follows the aggregator's pod watch, but nothing checks that the watch is current:
/// once it is dropped and every retry gets 503, the placement stays as it was. A web pod then
/// scheduled on node-c (where no agent is expected) is unknown to the aggregator, and KEDA gets
/// node-a's 10 as the whole sum instead of UNAVAILABLE naming node-c (what it gets with a
/// working watch: tests/aggregate.rs `only_agents_on_nodes_hosting_selected_pods_*`).
#[test]
fn adversary_a_stale_pod_watch_hides_a_node_hosting_selected_pods_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    for node in ["node-a", "node-c"] {
        api.add_node(node, &[]);
    }
    let cgroup = dir.path().join("cgroup-node-a");
    let pods = start_pods(&api, &cgroup, dir.path(), "node-a");
    let agent = Agent::builder()
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    wait_for_pool(&agent.api.to_string(), 10.0);
    let port = agent.api.port();
    api.add_endpoint_slice(
        "nodekeeper-system",
        "nodekeeper",
        &[("grpc", port)],
        &[EndpointSeed::new("127.0.0.1")
            .node("node-a")
            .pod("nodekeeper-node-a")],
    );
    let kubeconfig_env = kubeconfig.display().to_string();
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &[
            "--service",
            "nodekeeper-system/nodekeeper",
            "--deadline",
            "2s",
            "--refresh",
            "100ms",
        ],
        &[("KUBECONFIG", &kubeconfig_env)],
    );
    wait_for_pool(&agg.grpc.to_string(), 10.0);
    // The API server's pod watches end and every retry is refused (an overloaded or
    // restarting API server, a 503 from a proxy in front of it).
    api.inject(Fault::on("GET", "/api/v1/pods", FaultKind::Unavailable).always());
    api.end_watches("/api/v1/pods");
    std::thread::sleep(Duration::from_millis(500));
    // A web pod is scheduled on node-c, which has no agent (Pending agent, missing toleration).
    api.add_pod(
        PodSeed::new("web-3-node-c")
            .namespace("shop")
            .node("node-c")
            .label("app", "web"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let got = web_value(agg.grpc, &[("remote", census_pods::POOL_REMOTE)]);
    assert!(
        got.as_ref().is_err_and(|e| e.contains("Unavailable")),
        "node-c hosts a selected pod and nobody counted it: KEDA must get UNAVAILABLE (or the \
         aggregator must refuse to answer from a pod watch it cannot refresh), got {got:?}"
    );
    assert_eq!(
        agg.metric_line("nodekeeper_aggregate_pod_view_current ")
            .as_deref(),
        Some("nodekeeper_aggregate_pod_view_current 0")
    );
    drop(pods);
}

// === lastKnownFor and pins ===

/// `lastKnownFor` lets a missing agent's last census count, but that census may have been made
/// before the query's remote was pinned (folded into `*:other`): it then counts 0 for the
/// remote. Two nodes with 3 connections each to `*:8081`; node-b's agent stops after a GetFleet
/// made its last census without the pin; KEDA gets 3 instead of 6 (or an error).
#[test]
fn adversary_last_known_census_from_before_a_pin_counts_the_remote_as_0_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut pods = Vec::new();
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        api.add_node(node, &[]);
        let cgroup = dir.path().join(format!("cgroup-{node}"));
        pods.extend(start_pods(&api, &cgroup, dir.path(), node));
        let agent = Agent::builder()
            .connected(&kubeconfig, node)
            .config("metrics:\n  connections:\n    topRemotes: 1\n")
            .arg("--host-cgroup")
            .arg(cgroup.display().to_string())
            .start();
        wait_for_pool(&agent.api.to_string(), 10.0);
        agents.push(agent);
    }
    let list = format!("{},{}", agents[0].api, agents[1].api);
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &["--agents", &list, "--deadline", "2s", "--refresh", "100ms"],
        &[],
    );
    // Every agent answers a fan-out without pins (an operator's GetFleet; KEDA's pool query).
    wait_for_pool(&agg.grpc.to_string(), 20.0);
    let mut stopped = agents.remove(1);
    stopped.proc.signal("TERM");
    assert!(stopped.proc.wait_exit(Duration::from_secs(5)).success());
    std::thread::sleep(Duration::from_millis(300));
    // A ScaledObject on the queue port, accepting a missing agent's census up to 10 minutes old.
    let got = web_value(agg.grpc, &[("remote", "*:8081"), ("lastKnownFor", "600")]);
    assert!(
        got == Ok(6.0) || got.as_ref().is_err_and(|e| e.contains("Unavailable")),
        "node-b's last census was made before *:8081 was pinned (folded into *:other): it must \
         not count as 0; want 6 or UNAVAILABLE, got {got:?}"
    );
    drop(pods);
}

// === a pod whose census failed ===

fn web_pod(name: &str, established: u64, error: &str) -> pb::PodConnections {
    pb::PodConnections {
        namespace: "shop".into(),
        name: name.into(),
        labels: HashMap::from([("app".to_string(), "web".to_string())]),
        established,
        error: error.into(),
        ..Default::default()
    }
}

/// Both nodes answered, but node-b's web pod could not be counted (its census failed: the
/// namespace could not be entered, or `source: sockDiag` on a kernel refusing sock_diag).
/// keda::query::evaluate skips it and the scaler answers node-a's 40 as the sum, with only a
/// warn log: a silently smaller number, the thing coverage exists to prevent (node-b hosts a
/// selected pod and its value is unknown).
#[test]
fn adversary_a_selected_pod_whose_census_failed_is_left_out_of_the_sum() {
    let now = Instant::now();
    let fleet = FleetCensus {
        agents: vec![
            AgentCensus {
                name: "10.0.0.1:9741 (node-a)".into(),
                node: "node-a".into(),
                state: AgentState::Answered {
                    pods: Arc::new(vec![web_pod("web-1", 40, "")]),
                    at: now,
                },
            },
            AgentCensus {
                name: "10.0.0.2:9741 (node-b)".into(),
                node: "node-b".into(),
                state: AgentState::Answered {
                    pods: Arc::new(vec![web_pod(
                        "web-2",
                        0,
                        "cannot enter /proc/4242/ns/net: No such file or directory",
                    )]),
                    at: now,
                },
            },
        ],
        placement: None,
    };
    let scaler = ScalerService::new(
        Arc::new(FixedFleet(Arc::new(fleet))),
        Duration::from_secs(5),
        tokio_util::sync::CancellationToken::new(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(
        scaler.get_metrics(tonic::Request::new(keda_pb::GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(
                "shop",
                &[
                    ("metric", "established"),
                    ("target", "5"),
                    ("podSelector", "app=web"),
                ],
            )),
            metric_name: String::new(),
        })),
    );
    assert!(
        got.as_ref()
            .is_err_and(|s| s.code() == tonic::Code::Unavailable),
        "web-2's value is unknown: KEDA must get UNAVAILABLE, not web-1's 40 as the sum; got {:?}",
        got.map(|r| r.into_inner().metric_values)
    );
}

// === the agent's pod watch ===

/// An agent names its pods (namespace, labels) from its own pod watch; a pod its watch has not
/// seen is in the census by UID only, so no selector matches it. With the agent's watch dropped
/// and every retry refused (503), a new web pod with 5 connections on node-a is left out: the
/// aggregator's own (working) pod watch knows the pod is on node-a, node-a's agent answered, and
/// KEDA gets 10 instead of 15 (or an error), as does the agent's own scaler.
#[test]
fn adversary_a_pod_the_agents_stale_watch_has_not_named_is_left_out_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup-node-a");
    let mut pods = start_pods(&api, &cgroup, dir.path(), "node-a");
    let agent = Agent::builder()
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    wait_for_pool(&agent.api.to_string(), 10.0);
    api.add_endpoint_slice(
        "nodekeeper-system",
        "nodekeeper",
        &[("grpc", agent.api.port())],
        &[EndpointSeed::new("127.0.0.1")
            .node("node-a")
            .pod("nodekeeper-node-a")],
    );
    let kubeconfig_env = kubeconfig.display().to_string();
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &[
            "--service",
            "nodekeeper-system/nodekeeper",
            "--deadline",
            "2s",
            "--refresh",
            "100ms",
        ],
        &[("KUBECONFIG", &kubeconfig_env)],
    );
    wait_for_pool(&agg.grpc.to_string(), 10.0);
    // Only the agent's watch (field selector spec.nodeName) fails; the aggregator's
    // cluster-wide one keeps working.
    api.inject(
        Fault::on("GET", "/api/v1/pods", FaultKind::Unavailable)
            .query("fieldSelector")
            .always(),
    );
    api.end_watches("/api/v1/pods");
    std::thread::sleep(Duration::from_millis(500));
    pods.push(census_pods::start(
        &api,
        &cgroup,
        dir.path(),
        "node-a",
        "shop",
        "web-3-node-a",
        &[("app", "web")],
        5,
        0,
    ));
    std::thread::sleep(Duration::from_secs(2));
    for (who, addr) in [("aggregator", agg.grpc), ("agent", agent.api)] {
        let got = web_value(addr, &[("remote", census_pods::POOL_REMOTE)]);
        assert!(
            got == Ok(15.0) || got.as_ref().is_err_and(|e| e.contains("Unavailable")),
            "{who}: web-3 runs on node-a with 5 connections; want 15 or UNAVAILABLE, got {got:?}"
        );
    }
    drop(pods);
}

// === two agents on one node ===

/// Coverage and sums are per expected agent, never per node: when a node's agent is replaced
/// by a new pod with a new address (a `maxSurge` rollout of agents that are not hostNetwork, or
/// an EndpointSlice still listing the old pod), both endpoints answer with the same node's
/// census and KEDA gets the node's pods twice (20 instead of 10: a larger number that scales
/// the workload out).
#[test]
fn adversary_two_agents_on_one_node_are_summed_twice_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup-node-a");
    let pods = start_pods(&api, &cgroup, dir.path(), "node-a");
    let mut agents = Vec::new();
    for pod in ["nodekeeper-old", "nodekeeper-new"] {
        let agent = Agent::builder()
            .connected(&kubeconfig, "node-a")
            .arg("--host-cgroup")
            .arg(cgroup.display().to_string())
            .start();
        wait_for_pool(&agent.api.to_string(), 10.0);
        api.add_endpoint_slice(
            "nodekeeper-system",
            "nodekeeper",
            &[("grpc", agent.api.port())],
            &[EndpointSeed::new("127.0.0.1").node("node-a").pod(pod)],
        );
        agents.push(agent);
    }
    let kubeconfig_env = kubeconfig.display().to_string();
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &[
            "--service",
            "nodekeeper-system/nodekeeper",
            "--deadline",
            "2s",
            "--refresh",
            "100ms",
        ],
        &[("KUBECONFIG", &kubeconfig_env)],
    );
    std::thread::sleep(Duration::from_millis(500));
    let got = web_value(agg.grpc, &[("remote", census_pods::POOL_REMOTE)]);
    assert!(
        got == Ok(10.0) || got.is_err(),
        "node-a's web pool is 10 whichever of its two agents answers; got {got:?}"
    );
    assert_eq!(
        agg.metric_line("nodekeeper_aggregate_agents{state=\"duplicate\"}")
            .as_deref(),
        Some("nodekeeper_aggregate_agents{state=\"duplicate\"} 1")
    );
    drop(pods);
}

// === remotes in another spelling ===

/// The census reports a dual-stack socket's IPv4-mapped peer as the IPv4 address
/// (sock_diag.rs), but a query's `remote: "[::ffff:127.0.0.1]:5432"` is accepted as is and
/// never matches: the 10 connections of that pool read 0 (the same reading on a live agent:
/// the adv18 probe got `Ok(0.0)` for it and `Ok(10.0)` for `127.0.0.1:5432`). It must be
/// normalised like the census, or refused naming `remote`.
#[test]
fn adversary_an_ipv4_mapped_remote_is_accepted_and_reads_0() {
    use nodekeeper::keda::query::evaluate;
    let pod = pb::PodConnections {
        namespace: "shop".into(),
        name: "web-1".into(),
        labels: HashMap::from([("app".to_string(), "web".to_string())]),
        established: 10,
        pools: vec![pb::ConnectionPool {
            remote: "127.0.0.1:5432".into(),
            established: 10,
            active: 10,
            remotes: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = scaled_object(
        "shop",
        &[
            ("metric", "established"),
            ("target", "5"),
            ("podSelector", "app=web"),
            ("remote", "[::ffff:127.0.0.1]:5432"),
        ],
    );
    match Query::parse(&r) {
        Err(e) => assert!(e.to_string().contains("remote"), "{e}"),
        Ok(q) => assert_eq!(
            evaluate(&q, std::slice::from_ref(&pod)).value,
            10.0,
            "the pool to 127.0.0.1:5432 is the pool to [::ffff:127.0.0.1]:5432"
        ),
    }
}

// === a restarted agent before its pod watch synced ===

/// A node agent answers census calls before its pod watch has synced (a restarted agent whose
/// LIST is slow: a loaded API server), so its pods are in the census by UID only and no
/// selector matches them; the aggregator counts node-b as answered and KEDA gets node-a's 10
/// as the whole sum instead of 20 (or UNAVAILABLE).
#[test]
fn adversary_a_restarted_agent_answers_before_its_pod_watch_synced_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut pods = Vec::new();
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        api.add_node(node, &[]);
        let cgroup = dir.path().join(format!("cgroup-{node}"));
        pods.extend(start_pods(&api, &cgroup, dir.path(), node));
        if node == "node-b" {
            // node-b's agent (re)starts while the API server takes 8 s to answer its LIST.
            api.inject(
                Fault::on(
                    "GET",
                    "/api/v1/pods",
                    FaultKind::Delay(Duration::from_secs(8)),
                )
                .query("node-b")
                .times(1),
            );
        }
        let agent = Agent::builder()
            .connected(&kubeconfig, node)
            .arg("--host-cgroup")
            .arg(cgroup.display().to_string())
            .start();
        agents.push(agent);
    }
    wait_for_pool(&agents[0].api.to_string(), 10.0);
    let list = format!("{},{}", agents[0].api, agents[1].api);
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &["--agents", &list, "--deadline", "2s", "--refresh", "100ms"],
        &[],
    );
    let got = web_value(agg.grpc, &[("remote", census_pods::POOL_REMOTE)]);
    assert!(
        got == Ok(20.0) || got.as_ref().is_err_and(|e| e.contains("Unavailable")),
        "node-b's agent cannot name its pods yet: want 20 or UNAVAILABLE, got {got:?}"
    );
    drop(pods);
}

/// The same hole without any failure: a (re)started aggregator answers KEDA before its
/// cluster-wide pod LIST has returned (slow on a large cluster; here 10 s). Until then there is
/// no placement and "every expected agent matters", but a node hosting selected pods where no
/// agent is expected is not known either: KEDA gets node-a's 10 instead of UNAVAILABLE naming
/// node-c (what the synced watch answers).
#[test]
fn adversary_before_the_pod_watch_synced_a_node_without_agent_is_left_out_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    for node in ["node-a", "node-c"] {
        api.add_node(node, &[]);
    }
    let cgroup = dir.path().join("cgroup-node-a");
    let pods = start_pods(&api, &cgroup, dir.path(), "node-a");
    api.add_pod(
        PodSeed::new("web-3-node-c")
            .namespace("shop")
            .node("node-c")
            .label("app", "web"),
    );
    let agent = Agent::builder()
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    wait_for_pool(&agent.api.to_string(), 10.0);
    api.add_endpoint_slice(
        "nodekeeper-system",
        "nodekeeper",
        &[("grpc", agent.api.port())],
        &[EndpointSeed::new("127.0.0.1")
            .node("node-a")
            .pod("nodekeeper-node-a")],
    );
    // Pod LISTs (not watches) now take 10 s: the agent's watch is already synced.
    api.inject(
        Fault::on(
            "GET",
            "/api/v1/pods",
            FaultKind::Delay(Duration::from_secs(10)),
        )
        .watch(false)
        .always(),
    );
    let kubeconfig_env = kubeconfig.display().to_string();
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &[
            "--service",
            "nodekeeper-system/nodekeeper",
            "--deadline",
            "2s",
            "--refresh",
            "100ms",
        ],
        &[("KUBECONFIG", &kubeconfig_env)],
    );
    let got = web_value(agg.grpc, &[("remote", census_pods::POOL_REMOTE)]);
    assert!(
        got.as_ref().is_err_and(|e| e.contains("Unavailable")),
        "node-c hosts a selected pod and has no agent: want UNAVAILABLE, got {got:?}"
    );
    drop(pods);
}
