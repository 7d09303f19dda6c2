//! `nodekeeper aggregate` over real agents: three connected agents on different loopback ports,
//! each counting its own pods in real network namespaces (tests/support/census_pods.rs), one of
//! them NotReady in its EndpointSlice and still counted. The aggregator's KEDA answers are the
//! sums of all three (checked by the Python grpcio client of tests/py/keda_check.py); with one
//! stopped, KEDA gets UNAVAILABLE instead of a smaller sum unless the ScaledObject opts into
//! `minCoverage` or `lastKnownFor`, and GetFleet and /metrics count it. An agent slower than the
//! deadline is an error once, then its late census answers the next calls. SIGTERM ends an open
//! stream with OK. Without agents, KEDA gets UNAVAILABLE, not zero.

use crate::support::aggregate::{Aggregator, pool_query};
use crate::support::census_pods;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use census_pods::{
    CALL_TIMEOUT, cases, get_metrics, run_keda_check, scaled_object, start_pods, wait_for_pool,
};
use futures::StreamExt as _;
use nodekeeper::pb::{self};
use nodekeeper_tests::fake_api::{EndpointSeed, FakeApi, PodSeed};
use nodekeeper_tests::{
    Agent, agent_bin, free_port, loopback, require_python_modules, require_root, sample,
};
use tonic::Code;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const AGENTS_NS: &str = "nodekeeper-system";

/// The agent answering at `address`, by node, as GetFleet reports it.
fn by_address<'a>(fleet: &'a pb::FleetStatus, address: &str) -> &'a pb::FleetAgent {
    fleet
        .agents
        .iter()
        .find(|a| a.address == address)
        .unwrap_or_else(|| panic!("{address} not in {fleet:?}"))
}

/// The web pool's value (its connections to the database, 4 + 6 per node), plaintext.
fn pool_value(addr: SocketAddr, extra: &[(&str, &str)]) -> Result<f64, tonic::Status> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(get_metrics(&addr.to_string(), pool_query(extra)))
        .map(|m| m.metric_values[0].metric_value_float)
}

#[test]
fn aggregator_counts_not_ready_agents_and_errors_instead_of_a_partial_sum_as_root() {
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
    // node-c's agent is NotReady (say its DNS upstreams are down) but its census answers: the
    // Service publishes not-ready addresses and the aggregator calls it like any other.
    for (i, node) in NODES.iter().enumerate() {
        let port = addresses[i].rsplit_once(':').unwrap().1.parse().unwrap();
        api.add_endpoint_slice(
            AGENTS_NS,
            "nodekeeper",
            &[("metrics", 9740), ("grpc", port)],
            &[EndpointSeed::new("127.0.0.1")
                .node(node)
                .pod(&format!("nodekeeper-{node}"))
                .ready(Some(i != 2))],
        );
    }
    // Another Service's endpoints are not called.
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
    // The aggregator as its own ServiceAccount, under the shipped Role (EndpointSlices only).
    let aggregator_kubeconfig = dir.path().join("kubeconfig-aggregator");
    api.write_kubeconfig(&aggregator_kubeconfig);
    let text = std::fs::read_to_string(&aggregator_kubeconfig)
        .unwrap()
        .replace(
            "token: fake-token\n",
            &format!(
                "token: {}\n",
                nodekeeper_tests::fake_api::rbac::service_account_token(
                    "nodekeeper-system",
                    "nodekeeper-aggregator",
                    "node-agg"
                )
            ),
        );
    std::fs::write(&aggregator_kubeconfig, text).unwrap();
    let kubeconfig_env = aggregator_kubeconfig.display().to_string();
    let discovered = Aggregator::start(
        dir.path(),
        "aggregate-service",
        &[&["--service", "nodekeeper-system/nodekeeper"][..], &common].concat(),
        &[("KUBECONFIG", &kubeconfig_env)],
    );

    // Every node answers: the sums of all three, the NotReady one included.
    for (name, agg) in [("static", &fixed), ("discovery", &discovered)] {
        wait_for_pool(&agg.grpc.to_string(), 30.0);
        run_keda_check(&agg.grpc.to_string(), &cases(3.0), dir.path());
        let fleet = agg.fleet();
        assert_eq!(
            (fleet.expected, fleet.answered, fleet.stale, fleet.missing),
            (3, 3, 0, 0),
            "{name}: {fleet:?}"
        );
        let c = by_address(&fleet, &addresses[2]);
        assert!(c.answered, "{name}: {c:?}");
        assert_eq!(c.ready, name == "static", "{name}: {c:?}");
    }
    // Issue #19: discovery ran as the aggregator's ServiceAccount, and its Role sufficed.
    let by_aggregator: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.user == "system:serviceaccount:nodekeeper-system:nodekeeper-aggregator")
        .collect();
    assert!(
        by_aggregator
            .iter()
            .any(|r| r.path.contains("endpointslices")),
        "{by_aggregator:?}"
    );
    for r in &by_aggregator {
        assert!(r.status != 401 && r.status != 403, "refused: {r:?}");
    }

    // node-b's agent goes away; its slice stays until Kubernetes notices, as in a real outage.
    let mut stopped = agents.remove(1);
    stopped.proc.signal("TERM");
    assert!(stopped.proc.wait_exit(Duration::from_secs(5)).success());
    std::thread::sleep(Duration::from_millis(300)); // past --refresh

    for (name, agg) in [("static", &fixed), ("discovery", &discovered)] {
        // Never the two-node sum (20): an error KEDA answers with the ScaledObject's fallback.
        let e = pool_value(agg.grpc, &[]).unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{name}: {e:?}");
        assert!(
            e.message()
                .contains("only 2 of 3 expected node agents counted")
                && e.message().contains(&addresses[1]),
            "{name}: {e:?}"
        );
        // Opting into a partial sum: at least 66% of the agents, or node-b's last census.
        assert_eq!(
            pool_value(agg.grpc, &[("minCoverage", "66")]).map_err(|e| format!("{e:?}")),
            Ok(20.0),
            "{name}"
        );
        assert!(
            pool_value(agg.grpc, &[("minCoverage", "67")]).is_err(),
            "{name}"
        );
        assert_eq!(
            pool_value(agg.grpc, &[("lastKnownFor", "600")]).map_err(|e| format!("{e:?}")),
            Ok(30.0),
            "{name}"
        );

        let fleet = agg.fleet();
        assert_eq!(
            (fleet.expected, fleet.answered, fleet.stale, fleet.missing),
            (3, 2, 1, 0),
            "{name}: {fleet:?}"
        );
        let b = by_address(&fleet, &addresses[1]);
        assert!(!b.answered && !b.error.is_empty(), "{name}: {b:?}");
        assert!(
            b.census_age.is_some(),
            "{name}: last census age missing: {b:?}"
        );
        if name == "discovery" {
            assert_eq!(b.node_name, "node-b", "{name}: {b:?}");
        }
        let text = agg.metrics_text();
        for (state, want) in [("answered", 2.0), ("stale", 1.0), ("missing", 0.0)] {
            assert_eq!(
                sample(&text, "nodekeeper_aggregate_agents", &[("state", state)]),
                Some(want),
                "{name} {state}:\n{text}"
            );
        }
        assert!(
            sample(&text, "nodekeeper_aggregate_agent_failures_total", &[]).unwrap_or(0.0) >= 1.0,
            "{name}:\n{text}"
        );
        let log = agg.proc.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(&addresses[1])),
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
            .stream_is_active(pool_query(&[("minCoverage", "50")]))
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

/// Forwards TCP connections to `upstream`, holding every byte coming back for `delay`: an agent
/// whose census takes `delay` longer, as the aggregator sees it.
fn slow_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(upstream) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut c2, &mut s2));
            let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = server.read(&mut buf) {
                    if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
            std::thread::spawn(move || {
                for (at, bytes) in rx {
                    std::thread::sleep((at + delay).saturating_duration_since(Instant::now()));
                    if client.write_all(&bytes).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

#[test]
fn a_census_slower_than_the_deadline_is_an_error_then_answers_the_next_call_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut pods = Vec::new();
    let mut agents = Vec::new();
    for node in &NODES[..2] {
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
    // node-b answers 1.5 s late against a 500 ms deadline.
    let slow = slow_proxy(agents[1].api, Duration::from_millis(1500));
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &[
            "--agents",
            &format!("{},{slow}", agents[0].api),
            "--deadline",
            "500ms",
            "--refresh",
            "100ms",
        ],
        &[],
    );
    // The first call cannot have node-b's census: an error, never node-a's 10 alone.
    let e = pool_value(agg.grpc, &[]).unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&slow.to_string()) && e.message().contains("deadline"),
        "{e:?}"
    );
    // The call went on without its caller; its census answers the next call, which starts the
    // following census at once, so every call spaced by more than the census time answers.
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(2000));
        assert_eq!(
            pool_value(agg.grpc, &[]).map_err(|e| format!("{e:?}")),
            Ok(20.0),
            "round {round}"
        );
    }
    let fleet = agg.fleet();
    let b = by_address(&fleet, &slow.to_string());
    let age = b.census_age.expect("a late answer has an age");
    assert!(age.seconds > 0 || age.nanos > 0, "{b:?}");
    let text = agg.metrics_text();
    assert_eq!(
        sample(
            &text,
            "nodekeeper_aggregate_agent_failures_total",
            &[("reason", "timeout")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "nodekeeper_aggregate_late_answers_total", &[]).unwrap_or(0.0) >= 3.0,
        "{text}"
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
        // The API's own credentials are read at start, the error naming the flag.
        (
            &[
                "--agents",
                "127.0.0.1:1",
                "--listen-token-file",
                "/nonexistent/token",
            ][..],
            "--listen-token-file",
        ),
        (
            &[
                "--agents",
                "127.0.0.1:1",
                "--listen-cert",
                "/nonexistent/tls.crt",
                "--listen-key",
                "/nonexistent/tls.key",
            ][..],
            "--listen-cert",
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

/// The EndpointSlice requests `api` has seen: (LISTs, WATCHes).
fn slice_requests(api: &FakeApi) -> (usize, usize) {
    let reqs: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET"
                && r.path == "/apis/discovery.k8s.io/v1/namespaces/nodekeeper-system/endpointslices"
        })
        .collect();
    let watches = reqs
        .iter()
        .filter(|r| r.query.contains("watch=true"))
        .count();
    (reqs.len() - watches, watches)
}

#[test]
fn endpoint_slices_are_watched_not_listed_per_fan_out_and_a_new_agent_is_seen_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    // Agents that never answer: GetFleet still lists every expected one, which is all this
    // test needs to see what discovery found.
    let seed = |i: usize| {
        let port = free_port();
        api.add_endpoint_slice(
            AGENTS_NS,
            "nodekeeper",
            &[("grpc", port)],
            &[EndpointSeed::new("127.0.0.1")
                .node(NODES[i])
                .pod(&format!("nodekeeper-{}", NODES[i]))],
        );
        format!("127.0.0.1:{port}")
    };
    let mut first: Vec<String> = (0..2).map(seed).collect();
    first.sort();
    let kubeconfig_env = kubeconfig.display().to_string();
    let agg = Aggregator::start(
        dir.path(),
        "aggregate-service",
        &[
            "--service",
            "nodekeeper-system/nodekeeper",
            "--deadline",
            "200ms",
            "--refresh",
            "50ms",
        ],
        &[("KUBECONFIG", &kubeconfig_env)],
    );
    // Five fan-outs (each past --refresh): the slices come from the watch's store.
    for _ in 0..5 {
        let fleet = agg.fleet();
        let mut got: Vec<&str> = fleet.agents.iter().map(|a| a.address.as_str()).collect();
        got.sort();
        assert_eq!(got, first, "{fleet:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (lists, watches) = slice_requests(&api);
    assert_eq!(
        lists, 1,
        "one LIST for the watch's first sync, none per fan-out"
    );
    assert!(watches >= 1, "no EndpointSlice watch: {:?}", api.requests());

    // A new node's agent appears without a restart.
    let third = seed(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fleet = agg.fleet();
        if fleet.agents.iter().any(|a| a.address == third) {
            assert_eq!(fleet.expected, 3, "{fleet:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{third} never discovered: {fleet:?}\n{}",
            agg.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        slice_requests(&api).0,
        1,
        "the new slice came from the watch"
    );
}

#[test]
fn only_agents_on_nodes_hosting_selected_pods_decide_coverage_from_the_pod_watch_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    // node-a hosts the web pods (pool 4 + 6) and an api pod; node-b only an api pod.
    let mut pods = Vec::new();
    let mut agents = Vec::new();
    for node in &NODES[..2] {
        api.add_node(node, &[]);
        let cgroup = dir.path().join(format!("cgroup-{node}"));
        if *node == "node-a" {
            pods.extend(start_pods(&api, &cgroup, dir.path(), node));
        } else {
            pods.push(census_pods::start(
                &api,
                &cgroup,
                dir.path(),
                node,
                "shop",
                "api-1-node-b",
                &[("app", "api")],
                2,
                0,
            ));
        }
        let agent = Agent::builder()
            .connected(&kubeconfig, node)
            .arg("--host-cgroup")
            .arg(cgroup.display().to_string())
            .start();
        agents.push(agent);
    }
    wait_for_pool(&agents[0].api.to_string(), 10.0);
    let addresses: Vec<String> = agents.iter().map(|a| a.api.to_string()).collect();
    for (i, node) in NODES[..2].iter().enumerate() {
        let port = addresses[i].rsplit_once(':').unwrap().1.parse().unwrap();
        api.add_endpoint_slice(
            AGENTS_NS,
            "nodekeeper",
            &[("grpc", port)],
            &[EndpointSeed::new("127.0.0.1")
                .node(node)
                .pod(&format!("nodekeeper-{node}"))],
        );
    }
    let kubeconfig_env = kubeconfig.display().to_string();
    let agg = Aggregator::start(
        dir.path(),
        "aggregate-service",
        &[
            "--service",
            "nodekeeper-system/nodekeeper",
            "--deadline",
            "1s",
            "--refresh",
            "100ms",
        ],
        &[("KUBECONFIG", &kubeconfig_env)],
    );
    wait_for_pool(&agg.grpc.to_string(), 10.0);
    let api_query = |agg: &Aggregator| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(get_metrics(
            &agg.grpc.to_string(),
            scaled_object(
                "shop",
                &[
                    ("metric", "established"),
                    ("target", "5"),
                    ("podSelector", "app=api"),
                ],
            ),
        ))
    };

    // node-b's agent stops: node-b hosts no web pod, so the web pool is still exact...
    let mut stopped = agents.remove(1);
    stopped.proc.signal("TERM");
    assert!(stopped.proc.wait_exit(Duration::from_secs(5)).success());
    std::thread::sleep(Duration::from_millis(300)); // past --refresh
    assert_eq!(
        pool_value(agg.grpc, &[]).map_err(|e| format!("{e:?}")),
        Ok(10.0),
        "node-b hosts no web pod: its outage changes nothing"
    );
    assert_eq!(agg.fleet().missing + agg.fleet().stale, 1);
    // ...while a query over the api pods, one of them on node-b, is an error naming it.
    let e = api_query(&agg).unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&addresses[1]) && e.message().contains("only 1 of 2"),
        "{e:?}"
    );
    // A selector matching no pod is NOT_FOUND, whoever is missing.
    let e = pool_value(agg.grpc, &[("podSelector", "app=nothing")]).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // A web pod scheduled onto node-b (known from the pod watch, no restart): node-b matters
    // now, and the web pool is an error instead of 10 without node-b's share.
    api.add_pod(
        PodSeed::new("web-3-node-b")
            .namespace("shop")
            .node("node-b")
            .label("app", "web"),
    );
    // And one on node-c, where no agent is expected at all.
    api.add_pod(
        PodSeed::new("web-4-node-c")
            .namespace("shop")
            .node("node-c")
            .label("app", "web"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pool_value(agg.grpc, &[]) {
            Err(e) if e.code() == Code::Unavailable => {
                let m = e.message();
                assert!(m.contains(&addresses[1]), "{e:?}");
                assert!(
                    m.contains("node node-c: hosts selected pods but no node agent is expected"),
                    "{e:?}"
                );
                assert!(m.contains("only 1 of 3"), "{e:?}");
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "the pod watch never made node-b and node-c matter: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The aggregator's pod watch: cluster-wide, one LIST to sync.
    let pod_lists = api
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET"
                && r.path == "/api/v1/pods"
                && !r.query.contains("watch=true")
                // The agents watch their own node's pods.
                && !r.query.contains("fieldSelector")
        })
        .count();
    assert_eq!(pod_lists, 1, "{:?}", api.requests());
    drop(pods);
}

#[test]
fn a_remote_beyond_top_remotes_named_by_a_query_is_counted_exactly_as_root() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let node = NODES[0];
    api.add_node(node, &[]);
    let cgroup = dir.path().join("cgroup");
    let pods = start_pods(&api, &cgroup, dir.path(), node);
    // topRemotes 1: web-1's 3 connections waiting on port 8081 (outbound 127.0.0.1:8081,
    // inbound *:8081) rank below its 4 to the database, so they fold into `other`/`*:other`
    // unless a query pins them.
    let agent = Agent::builder()
        .connected(&kubeconfig, node)
        .config("metrics:\n  connections:\n    topRemotes: 1\n")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    let agg = Aggregator::start(
        dir.path(),
        "aggregate",
        &[
            "--agents",
            &agent.api.to_string(),
            "--deadline",
            "5s",
            "--refresh",
            "100ms",
        ],
        &[],
    );
    let value = |addr: SocketAddr, remote: &str| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(get_metrics(
            &addr.to_string(),
            scaled_object(
                "shop",
                &[
                    ("metric", "established"),
                    ("target", "5"),
                    ("podSelector", "app=web"),
                    ("remote", remote),
                ],
            ),
        ))
        .map(|m| m.metric_values[0].metric_value_float)
        .map_err(|e| format!("{e:?}"))
    };
    // Wait until the pod watch has named the pods (the web pool is 4 + 6).
    let deadline = Instant::now() + Duration::from_secs(30);
    while value(agent.api, census_pods::POOL_REMOTE) != Ok(10.0) {
        assert!(Instant::now() < deadline, "the agent never named its pods");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Through the aggregator (the pin travels in GetMetricsRequest.pinned_remotes), then on the
    // agent itself: 3 connections stay 3, the first time they are asked for and after.
    for round in 0..2 {
        assert_eq!(
            value(agg.grpc, "*:8081"),
            Ok(3.0),
            "aggregator, round {round}"
        );
        assert_eq!(
            value(agent.api, "127.0.0.1:8081"),
            Ok(3.0),
            "agent, round {round}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(pods);
}
