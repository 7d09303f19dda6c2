//! Third adversary round against issue #18's promises (autoscaling signals): KEDA never gets a
//! silently smaller number from `nodekeeper aggregate`; every node hosting a selected pod must
//! have answered with a census naming every selected pod placed there, from pod views that are
//! synced and current, or the query is an error. Attacks around the fixes of
//! tests/adversary_issue18.rs and tests/adversary_issue18b.rs (#18-j, #18-k).
//!
//! A test marked `#[ignore = "adversary finding: ..."]` broke the promise (run it with
//! `--ignored` to see it fail); a plain test is an attack that held. The product code is not
//! changed here.
//!
//! The first attacks drive the aggregator's coverage path as `summarize` does (a
//! `PodPlacement` from the pod watch's objects, each census checked by `PodPlacement::verify`
//! against its EndpointSlice node, `FleetCensus` behind a `ScalerService`, asked as KEDA asks);
//! the others run `nodekeeper aggregate` against fake agents (and the fake API server).
//!
//! Broke, fixed since (plain now): two `--agents` claiming one node name, one dropped; an
//! answering agent without a node raises `minCoverage`; a pod named twice counted twice;
//! `remote` values no connection can have read 0; a pod an agent names that the aggregator's
//! lagging or silent (answered, then black-holed) pod watch does not know was dropped, and the
//! agent's own silent pod watch left a new pod unnamed and out of its sum (both UNAVAILABLE
//! naming the pod now, decision #18-l). Decision #18-l's other side (plain): a pod the API
//! deleted that an agent still reports is left out, not UNAVAILABLE.
//! Held (plain): a Pending pod that serves is counted; a pod the agent left unnamed is named by
//! the aggregator's view; a census above the message limit is UNAVAILABLE naming its agent.

use crate::support::aggregate::{
    self, ApiPod, FixedFleet, WAIT, fleet, get_fleet_plaintext, is_unavailable, keda_value,
    scaler_value, start_changeable_fake_agent, start_open_aggregator, until, web_query,
};
use crate::support::census_pods;

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use census_pods::scaled_object;
use k8s_openapi::api::core::v1::Pod;
use nodekeeper::keda::coverage::{AgentCensus, AgentState, FleetCensus, PodPlacement};
use nodekeeper::keda::query::Query;
use nodekeeper::keda::service::ScalerService;
use nodekeeper::keda_pb::{self, external_scaler_server::ExternalScaler as _};
use nodekeeper::pb::{self};
use nodekeeper_tests::fake_api::{EndpointSeed, FakeApi, PodSeed};
use tonic::Status;

// === the coverage path, as the aggregator's summarize builds it ===

/// An `app=web` pod of `shop` as the aggregator's pod watch stores it.
fn api_pod(name: &str, uid: &str, node: &str, phase: &str) -> Pod {
    ApiPod::new("shop", name, uid, node).phase(phase).pod()
}

/// One `app=web` pod of `shop` in an agent's census as the agent names it from its own pod view.
fn census_pod(name: &str, uid: &str, established: u64) -> pb::PodConnections {
    aggregate::census_pod("shop", name, uid, established)
}

/// `established` summed over the `app=web` pods of `shop`, as KEDA asks the aggregator.
fn web_value(fleet: FleetCensus) -> Result<f64, Status> {
    scaler_value(Arc::new(fleet), web_query("shop", &[]))
}

// === the aggregator's pod view behind an agent's ===

/// Scale-out: web-3 (uid-3) starts on node-a with 50 connections. node-a's agent (its own pod
/// watch, narrow and quick) names it; the aggregator's cluster-wide pod watch has not delivered
/// web-3 yet (two independent watches: one lags; or its stream went silent, see the end-to-end
/// attack below). The aggregator's view is "current" (synced, not failing), so `verify` refuses
/// web-3 as unknown, `selected_by_node` does not expect it, and KEDA gets web-1's 5 instead of
/// 55, with no error: a pod an agent names with the selected labels that the aggregator does not
/// know proves the aggregator's view is behind, and must make the query UNAVAILABLE (or be
/// counted), not vanish.
#[test]
fn adversary18c_a_new_pod_the_aggregators_view_has_not_seen_is_dropped_silently() {
    let placement = PodPlacement::from_pods(&[api_pod("web-1", "uid-1", "node-a", "Running")]);
    let census = vec![
        census_pod("web-1", "uid-1", 5),
        census_pod("web-3", "uid-3", 50),
    ];
    let (_, refused) = placement.verify("node-a", &census);
    assert_eq!(refused.len(), 1, "web-3 is refused as unknown: {refused:?}");
    let got = web_value(fleet(placement, vec![("node-a", census)]));
    assert!(
        matches!(got, Ok(v) if v == 55.0) || is_unavailable(&got),
        "node-a's agent names selected pod web-3 (50 connections) that the aggregator's pod \
         view does not know yet: KEDA must get 55 or UNAVAILABLE, not a smaller sum; got {got:?}"
    );
}

/// A pod the API still reports Pending (the kubelet's status update lags) that already serves:
/// its node's census names it with 7 connections. It is known and placed on node-a, so it is
/// counted (7), not dropped for its phase.
#[test]
fn adversary18c_a_pending_pod_that_already_serves_is_counted() {
    let placement = PodPlacement::from_pods(&[
        api_pod("web-1", "uid-1", "node-a", "Pending"),
        api_pod("web-2", "uid-2", "node-b", "Running"),
    ]);
    let got = web_value(fleet(
        placement,
        vec![
            ("node-a", vec![census_pod("web-1", "uid-1", 7)]),
            ("node-b", vec![census_pod("web-2", "uid-2", 3)]),
        ],
    ));
    assert_eq!(got.map_err(|s| s.to_string()), Ok(10.0));
}

/// A census naming one pod twice (same UID: an agent reading the pod's cgroup under two
/// paths, or a rogue agent) must not count it twice: values are exact. `verify` keeps both
/// entries and `evaluate` sums both: KEDA gets 10. Not smaller (the direction that scales in),
/// but not exact either, and it takes only a buggy or rogue agent on the pod's own node.
#[test]
fn adversary18c_a_pod_named_twice_in_a_census_is_counted_once() {
    let placement = PodPlacement::from_pods(&[api_pod("web-1", "uid-1", "node-a", "Running")]);
    let got = web_value(fleet(
        placement,
        vec![(
            "node-a",
            vec![
                census_pod("web-1", "uid-1", 5),
                census_pod("web-1", "uid-1", 5),
            ],
        )],
    ));
    assert!(
        matches!(got, Ok(v) if v == 5.0) || is_unavailable(&got),
        "web-1 has 5 connections; got {got:?}"
    );
}

// === end to end: `nodekeeper aggregate` and fake agents ===

/// KEDA's GetMetrics of `established` over the `app=web` pods of `shop`.
fn keda_web_value(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Result<f64, Status> {
    keda_value(rt, addr, web_query("shop", &[]))
}

// === two agents claiming one node with a static agent list ===

/// `--agents A,B` (no Service, no pod watch): A on node-a names web-1 (10 connections); B runs on
/// another machine whose agent was started with the same node name (a cloned VM's hostname, a
/// copied NODE_NAME) and names web-2 (20). The aggregator keeps "one census per node" by the
/// node each census claims: B's census supersedes A's (or A's B's) and KEDA gets 10 or 20
/// instead of 30, with no error. The two censuses name disjoint pods, so they are not one node
/// listed twice; without a pod view the aggregator cannot tell which is right and must fail
/// the query (or sum both), not drop one.
#[test]
fn adversary18c_static_agents_claiming_one_node_name_are_not_silently_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, _) = start_changeable_fake_agent(&rt, "node-a", vec![census_pod("web-1", "uid-1", 10)]);
    let (b, _) = start_changeable_fake_agent(&rt, "node-a", vec![census_pod("web-2", "uid-2", 20)]);
    let agents = format!("{a},{b}");
    let agg = start_open_aggregator(dir.path(), &["--agents", &agents], None);
    until(&agg, "both agents answered", || {
        get_fleet_plaintext(&rt, agg.grpc)
            .ok()
            .filter(|f| f.answered + f.duplicates >= 2 && f.agents.iter().all(|a| a.answered))
    });
    let got = keda_web_value(&rt, agg.grpc);
    assert!(
        matches!(got, Ok(v) if v == 30.0) || is_unavailable(&got),
        "web-1 (10) and web-2 (20) run on two machines whose agents both claim node-a: KEDA \
         must get 30 or UNAVAILABLE, not one machine's share; got {got:?}; fleet: {:?}",
        get_fleet_plaintext(&rt, agg.grpc)
    );
}

// === the aggregator's pod watch answered, then silent ===

/// A TCP proxy to `upstream` whose connections can be frozen: a frozen connection stops
/// delivering the server's bytes to the client (a black-holed connection: a NAT entry or a
/// load balancer dropped it without a reset, an API server failed over). Connections opened
/// after a freeze are not frozen.
struct FreezingProxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl FreezingProxy {
    fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = conns.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                registry.lock().unwrap().push(frozen.clone());
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Frozen: the bytes are never delivered (the connection is dead to
                        // the client, which still holds it open).
                        while frozen.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { addr, conns }
    }

    fn freeze_existing(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.store(true, Ordering::SeqCst);
        }
    }
}

/// The aggregator's pod watch was answered and then went silent (its connection black-holed):
/// kube's watcher notices only after `timeoutSeconds` (120 s) plus 5 s, and until then
/// `track_watches` sees nothing unanswered and the view reads as current. web-2 starts on
/// node-a with 50 connections and node-a's agent names it: the aggregator refuses it as
/// unknown and KEDA gets web-1's 4 (no error) for up to two minutes after a scale-out.
#[test]
fn adversary18c_a_silent_aggregator_pod_watch_drops_a_new_pod_from_the_sum() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    let proxy = FreezingProxy::start(api.addr());
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let text = std::fs::read_to_string(&kubeconfig)
        .unwrap()
        .replace(&api.url(), &format!("http://{}", proxy.addr));
    std::fs::write(&kubeconfig, text).unwrap();
    api.add_node("node-a", &[]);
    let uid_of = |pod: serde_json::Value| pod["metadata"]["uid"].as_str().unwrap().to_string();
    let web = |name: &str| {
        PodSeed::new(name)
            .namespace("shop")
            .node("node-a")
            .label("app", "web")
    };
    let web_1 = uid_of(api.add_pod(web("web-1")));
    // The agent also names a probe pod the API does not have yet: once the aggregator stops
    // refusing it, its pod watch is open and delivering events.
    let probe = pb::PodConnections {
        labels: HashMap::from([("app".to_string(), "probe".to_string())]),
        ..census_pod("probe-1", "", 0)
    };
    let (agent, snapshot) = start_changeable_fake_agent(
        &rt,
        "node-a",
        vec![census_pod("web-1", &web_1, 4), probe.clone()],
    );
    api.add_endpoint_slice(
        "nodekeeper-system",
        "nodekeeper",
        &[("grpc", agent.port())],
        &[EndpointSeed::new("127.0.0.1")
            .node("node-a")
            .pod("nodekeeper-node-a")],
    );
    let agg = start_open_aggregator(
        dir.path(),
        &["--service", "nodekeeper-system/nodekeeper"],
        Some(&kubeconfig),
    );
    until(&agg, "KEDA gets web-1's 4", || {
        keda_web_value(&rt, agg.grpc).ok().filter(|v| *v == 4.0)
    });
    let refuses = |name: &str| {
        get_fleet_plaintext(&rt, agg.grpc).ok().is_some_and(|f| {
            f.agents.iter().any(|a| {
                a.refused_pods
                    .iter()
                    .any(|r| r.starts_with(&format!("shop/{name} ")))
            })
        })
    };
    assert!(
        refuses("probe-1"),
        "the probe is refused before the API has it"
    );
    api.add_pod(
        PodSeed::new("probe-1")
            .namespace("shop")
            .node("node-a")
            .label("app", "probe"),
    );
    until(&agg, "the pod watch delivers the probe", || {
        (!refuses("probe-1")).then_some(())
    });

    proxy.freeze_existing();
    let web_2 = uid_of(api.add_pod(web("web-2")));
    snapshot.lock().unwrap().connections = vec![
        census_pod("web-1", &web_1, 4),
        census_pod("web-2", &web_2, 50),
        probe,
    ];
    // The agent's census naming web-2 has reached the aggregator.
    until(&agg, "a fan-out reads the census naming web-2", || {
        refuses("web-2").then_some(())
    });
    // Every answer past the watch's 2 s grace (WATCH_ANSWER_GRACE) as well: the silence is not
    // a re-watch going unanswered, so that grace never ends it.
    let wrong = answers_for(silence_window(), || keda_web_value(&rt, agg.grpc), 54.0);
    assert!(
        wrong.is_empty(),
        "web-2 (50 connections) runs on node-a and node-a's agent names it; the aggregator's \
         pod watch is silent: KEDA must get 54 or UNAVAILABLE, never less; got {wrong:?}"
    );
}

/// Decision #18-l's other side: web-2 is force-deleted in the API while node-a's agent still
/// names it (its own view lags, its cgroup outlives the object for a moment). The aggregator's
/// pod watch saw the deletion, so web-2 is not a pod its view is behind on: left out (4), never
/// UNAVAILABLE (which every scale-in would otherwise flap KEDA to), never added (54).
#[test]
fn adversary18c_a_pod_the_aggregator_saw_deleted_is_left_out_not_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.add_node("node-a", &[]);
    let uid_of = |pod: serde_json::Value| pod["metadata"]["uid"].as_str().unwrap().to_string();
    let web = |name: &str| {
        PodSeed::new(name)
            .namespace("shop")
            .node("node-a")
            .label("app", "web")
    };
    let web_1 = uid_of(api.add_pod(web("web-1")));
    let web_2 = uid_of(api.add_pod(web("web-2")));
    let (agent, _snapshot) = start_changeable_fake_agent(
        &rt,
        "node-a",
        vec![
            census_pod("web-1", &web_1, 4),
            census_pod("web-2", &web_2, 50),
        ],
    );
    api.add_endpoint_slice(
        "nodekeeper-system",
        "nodekeeper",
        &[("grpc", agent.port())],
        &[EndpointSeed::new("127.0.0.1")
            .node("node-a")
            .pod("nodekeeper-node-a")],
    );
    let agg = start_open_aggregator(
        dir.path(),
        &["--service", "nodekeeper-system/nodekeeper"],
        Some(&kubeconfig),
    );
    until(&agg, "KEDA gets web-1's 4 and web-2's 50", || {
        keda_web_value(&rt, agg.grpc).ok().filter(|v| *v == 54.0)
    });
    api.force_delete_pod("shop", "web-2");
    let deleted = |f: &pb::FleetStatus| {
        f.agents.iter().any(|a| {
            a.refused_pods
                .iter()
                .any(|r| r.starts_with("shop/web-2 ") && r.contains("deleted"))
        })
    };
    until(&agg, "the aggregator refuses web-2 as deleted", || {
        get_fleet_plaintext(&rt, agg.grpc).ok().filter(deleted)
    });
    let end = Instant::now() + silence_window();
    while Instant::now() < end {
        let got = keda_web_value(&rt, agg.grpc).map_err(|s| s.to_string());
        assert_eq!(
            got,
            Ok(4.0),
            "web-2 was deleted in the API (the aggregator's watch saw it) but node-a's agent \
             still names it: KEDA gets web-1's 4"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long the silent-watch attacks keep asking: past `WATCH_ANSWER_GRACE` by a second.
fn silence_window() -> Duration {
    nodekeeper::kube::WATCH_ANSWER_GRACE + Duration::from_secs(1)
}

/// Asks `ask` for `window`; the answers that are neither `want` nor UNAVAILABLE.
fn answers_for(
    window: Duration,
    mut ask: impl FnMut() -> Result<f64, Status>,
    want: f64,
) -> Vec<Result<f64, String>> {
    let end = Instant::now() + window;
    let mut wrong = Vec::new();
    while Instant::now() < end {
        let got = ask();
        if !(matches!(got, Ok(v) if v == want) || is_unavailable(&got)) {
            wrong.push(got.map_err(|s| s.to_string()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wrong
}

// === minCoverage and agents without a node ===

/// `minCoverage: 60`: web-1 runs on node-a (agent down), web-2 on node-b (10 connections,
/// answered): 1 of the 2 nodes hosting selected pods is counted, 50% < 60%, UNAVAILABLE. A third
/// endpoint of the agents' Service has no `nodeName` (a hand-made Endpoints mirror, a slice
/// written by another controller): its agent matters to every query and answers, but every
/// pod of its census is refused (no node to place them on), so it adds nothing. It must not
/// raise the coverage either: counting it makes 2 of 3 (66.7% >= 60%) and KEDA gets node-b's
/// 10 alone.
#[test]
fn adversary18c_an_agent_without_a_node_does_not_raise_min_coverage() {
    let placement = PodPlacement::from_pods(&[
        api_pod("web-1", "uid-1", "node-a", "Running"),
        api_pod("web-2", "uid-2", "node-b", "Running"),
    ]);
    let mut f = fleet(
        placement,
        vec![
            ("node-b", vec![census_pod("web-2", "uid-2", 10)]),
            ("", vec![census_pod("web-1", "uid-1", 40)]),
        ],
    );
    f.agents.push(AgentCensus {
        name: "10.0.0.9:9741 (node-a)".into(),
        node: "node-a".into(),
        state: AgentState::Missing {
            error: "Unavailable: connection refused".into(),
            last_known: None,
        },
    });
    let scaler = ScalerService::new(
        Arc::new(FixedFleet(Arc::new(f))),
        Duration::from_secs(5),
        tokio_util::sync::CancellationToken::new(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt
        .block_on(
            scaler.get_metrics(tonic::Request::new(keda_pb::GetMetricsRequest {
                scaled_object_ref: Some(scaled_object(
                    "shop",
                    &[
                        ("metric", "established"),
                        ("target", "5"),
                        ("podSelector", "app=web"),
                        ("minCoverage", "60"),
                    ],
                )),
                metric_name: String::new(),
            })),
        )
        .map(|r| r.into_inner().metric_values[0].metric_value_float);
    assert!(
        is_unavailable(&got),
        "1 of the 2 nodes hosting selected pods is counted (50% < minCoverage 60%): KEDA must \
         get UNAVAILABLE, not node-b's 10; got {got:?}"
    );
}

// === a census larger than the gRPC message limit ===

/// node-b's agent answers a census of 5 MiB (one pod's label value of 5 MiB: huge metadata),
/// above tonic's 4 MiB decoding limit on the aggregator's client. The aggregator cannot read
/// it: node-b is missing and KEDA gets UNAVAILABLE naming it, never node-a's 10 alone.
#[test]
fn adversary18c_a_census_above_the_message_limit_is_an_error_not_a_smaller_sum() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, _) = start_changeable_fake_agent(&rt, "node-a", vec![census_pod("web-1", "uid-1", 10)]);
    let mut huge = census_pod("web-2", "uid-2", 20);
    huge.labels.insert("blob".to_string(), "x".repeat(5 << 20));
    let (b, _) = start_changeable_fake_agent(&rt, "node-b", vec![huge]);
    let agents = format!("{a},{b}");
    let agg = start_open_aggregator(dir.path(), &["--agents", &agents], None);
    let fleet = until(&agg, "node-a answered and node-b is known missing", || {
        get_fleet_plaintext(&rt, agg.grpc)
            .ok()
            .filter(|f| f.answered + f.missing + f.stale == 2 && f.answered >= 1)
    });
    let got = keda_web_value(&rt, agg.grpc);
    assert!(
        is_unavailable(&got) && got.as_ref().unwrap_err().message().contains(&b.to_string()),
        "node-b's census cannot be read: KEDA must get UNAVAILABLE naming {b}, not 10; got \
         {got:?}; fleet {fleet:?}"
    );
}

// === the agent's own pod watch answered, then silent ===

/// The pool query (`established` to POOL_REMOTE) over `selector` in `shop`, asked of `addr`.
fn pool_value(rt: &tokio::runtime::Runtime, addr: &str, selector: &str) -> Result<f64, Status> {
    rt.block_on(census_pods::get_metrics(
        addr,
        scaled_object(
            "shop",
            &[
                ("metric", "established"),
                ("target", "5"),
                ("podSelector", selector),
                ("remote", census_pods::POOL_REMOTE),
            ],
        ),
    ))
    .map(|r| r.metric_values[0].metric_value_float)
}

/// The agent's own scaler, its pod watch answered and then black-holed (as above, on the
/// agent's side): web-2 starts on the node (6 pool connections, its cgroup listed, its UID in
/// the census) but the agent's pod view never hears of it and reads as current for ~125 s.
/// web-2 matches no selector unnamed, and KEDA asking the agent gets web-1's 4, not 10 or
/// UNAVAILABLE.
#[test]
fn adversary18c_a_silent_agent_pod_watch_leaves_a_new_pod_out_of_the_agents_sum_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let proxy = FreezingProxy::start(api.addr());
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let text = std::fs::read_to_string(&kubeconfig)
        .unwrap()
        .replace(&api.url(), &format!("http://{}", proxy.addr));
    std::fs::write(&kubeconfig, text).unwrap();
    let cgroup = dir.path().join("cgroup");
    let pod = |name: &str, app: &str, pool: u32| {
        census_pods::start(
            &api,
            &cgroup,
            dir.path(),
            "node-a",
            "shop",
            name,
            &[("app", app)],
            pool,
            0,
        )
    };
    let _web_1 = pod("web-1", "web", 4);
    let agent = nodekeeper_tests::Agent::builder()
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    let addr = agent.api.to_string();
    census_pods::wait_for_pool(&addr, 4.0);
    // A probe pod: once the agent's scaler finds it, the agent's pod watch delivers events.
    let _probe = pod("probe-1", "probe", 1);
    let deadline = Instant::now() + WAIT;
    while !matches!(pool_value(&rt, &addr, "app=probe"), Ok(v) if v == 1.0) {
        assert!(
            Instant::now() < deadline,
            "the probe never counted: {:?}",
            pool_value(&rt, &addr, "app=probe")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    proxy.freeze_existing();
    let web_2 = pod("web-2", "web", 6);
    // The agent's census has web-2's connections (under its UID).
    let deadline = Instant::now() + WAIT;
    loop {
        let snap = rt.block_on(async {
            let mut c = nodekeeper::pb::node_agent_client::NodeAgentClient::connect(format!(
                "http://{addr}"
            ))
            .await
            .expect("connect");
            c.get_metrics(pb::GetMetricsRequest {
                exclude_pods: true,
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
        });
        if let Ok(s) = &snap
            && s.connections
                .iter()
                .any(|p| p.uid == web_2.uid && p.established > 0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the census never had web-2: {snap:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let wrong = answers_for(silence_window(), || pool_value(&rt, &addr, "app=web"), 10.0);
    assert!(
        wrong.is_empty(),
        "web-1 (4) and web-2 (6) run on node-a; the agent's pod watch is silent: KEDA must get \
         10 or UNAVAILABLE, never less; got {wrong:?}"
    );
}

/// Decision #18-l on the agent: web-2 is force-deleted in the API while its processes (and
/// cgroup, and 6 connections) are still on the node. The agent's pod watch saw the deletion, so
/// the census names web-2 as deleted (terminating) instead of leaving it unnamed: KEDA asking
/// the agent gets web-1's 4, not UNAVAILABLE (every scale-in would flap) and not 10.
#[test]
fn adversary18c_a_pod_the_agent_saw_deleted_is_left_out_not_unavailable_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let cgroup = dir.path().join("cgroup");
    let pod = |name: &str, pool: u32| {
        census_pods::start(
            &api,
            &cgroup,
            dir.path(),
            "node-a",
            "shop",
            name,
            &[("app", "web")],
            pool,
            0,
        )
    };
    let _web_1 = pod("web-1", 4);
    let _web_2 = pod("web-2", 6);
    let agent = nodekeeper_tests::Agent::builder()
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    let addr = agent.api.to_string();
    census_pods::wait_for_pool(&addr, 10.0);
    api.force_delete_pod("shop", "web-2");
    let deadline = Instant::now() + WAIT;
    while !matches!(pool_value(&rt, &addr, "app=web"), Ok(v) if v == 4.0) {
        assert!(
            Instant::now() < deadline,
            "web-2's deletion never left it out: {:?}",
            pool_value(&rt, &addr, "app=web")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past the agent's snapshot age: every census since names web-2 as deleted.
    let end = Instant::now() + silence_window();
    while Instant::now() < end {
        let got = pool_value(&rt, &addr, "app=web").map_err(|s| s.to_string());
        assert_eq!(
            got,
            Ok(4.0),
            "web-2 was deleted in the API (the agent's watch saw it); its processes still run"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The aggregator's side of the silent agent watch above: node-a's census has web-2 by UID only
/// (no namespace, name or labels: the agent's view never heard of it). The aggregator's own
/// (working) pod watch places uid-2 on node-a, so `verify` names it from the API and it is
/// counted: 4 + 6 = 10 through the aggregator.
#[test]
fn adversary18c_a_pod_the_agent_left_unnamed_is_named_by_the_aggregators_view() {
    let placement = PodPlacement::from_pods(&[
        api_pod("web-1", "uid-1", "node-a", "Running"),
        api_pod("web-2", "uid-2", "node-a", "Running"),
    ]);
    let unnamed = pb::PodConnections {
        namespace: String::new(),
        name: String::new(),
        labels: HashMap::new(),
        ..census_pod("", "uid-2", 6)
    };
    let got = web_value(fleet(
        placement,
        vec![("node-a", vec![census_pod("web-1", "uid-1", 4), unnamed])],
    ));
    assert_eq!(got.map_err(|s| s.to_string()), Ok(10.0));
}

// === remotes no connection can have ===

/// `remote` values no established TCP connection can have as its peer: the unspecified
/// address (`0.0.0.0:5432`, `[::]:5432`: a user meaning "port 5432 on any address"), port 0,
/// broadcast and multicast. No pool of the census ever has that key, so the query can only
/// read 0 and scale the workload in; like the scope id (decision #18-k's round, adversary
/// #18b), they must be refused naming `remote`. The pod has 3 connections to 10.0.0.5:5432.
#[test]
fn adversary18c_a_remote_no_connection_can_have_is_refused_not_read_as_0() {
    let mut pod = census_pod("web-1", "uid-1", 3);
    pod.pools = vec![pb::ConnectionPool {
        remote: "10.0.0.5:5432".into(),
        established: 3,
        active: 3,
        remotes: 1,
        ..Default::default()
    }];
    let mut accepted = Vec::new();
    for remote in [
        "0.0.0.0:5432",
        "[::]:5432",
        "10.0.0.5:0",
        "255.255.255.255:5432",
        "224.0.0.1:5432",
        "[ff02::1]:5432",
    ] {
        let r = scaled_object(
            "shop",
            &[
                ("metric", "established"),
                ("target", "5"),
                ("podSelector", "app=web"),
                ("remote", remote),
            ],
        );
        match Query::parse(&r) {
            Err(e) => assert!(e.to_string().contains("remote"), "{remote}: {e}"),
            Ok(q) => accepted.push(format!(
                "{remote} reads {}",
                nodekeeper::keda::query::evaluate(&q, std::slice::from_ref(&pod)).value
            )),
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted, each reading 0 whatever the pods do: {accepted:?}"
    );
}
