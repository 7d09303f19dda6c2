//! Second adversary round against issue #18's promises (autoscaling signals): KEDA never gets
//! a silently smaller number, and the values it gets are exact. Attacks around the fixes of
//! tests/adversary_issue18.rs. A test marked `#[ignore = "adversary finding: ..."]` broke the
//! promise (run it with `--ignored` to see it fail); a plain test is an attack that held.
//!
//! These attacks drive the aggregator's coverage path as `summarize` does: a `PodPlacement`
//! built from the pod watch's objects, each agent's census checked by `PodPlacement::verify`
//! against its EndpointSlice node, then `FleetCensus` behind a `ScalerService`, asked as KEDA
//! asks (GetMetrics).

use crate::support::aggregate::{
    self, Aggregator, ApiPod, fleet, is_unavailable, scaler_value, start_fake_agent, status_text,
    web_query,
};
use crate::support::census_pods;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use census_pods::scaled_object;
use k8s_openapi::api::core::v1::Pod;
use nodekeeper::keda::coverage::{AgentCensus, AgentState, FleetCensus, PodPlacement};
use nodekeeper::keda::query::{Query, evaluate};
use nodekeeper::kube::{WATCH_ANSWER_GRACE, WATCH_ANSWER_TIMEOUT};
use nodekeeper::pb;

/// A pod as the aggregator's pod watch stores it, in `shop`.
fn api_pod(name: &str, uid: &str, app: &str, node: &str, phase: &str, terminating: bool) -> Pod {
    let pod = ApiPod::new("shop", name, uid, node).app(app).phase(phase);
    if terminating { pod.terminating() } else { pod }.pod()
}

/// One pod of an agent's census in `shop`, labelled `app=<app>`, as the agent names it from its
/// own pod view (no census source named).
fn census_pod(name: &str, uid: &str, app: &str, established: u64) -> pb::PodConnections {
    pb::PodConnections {
        labels: HashMap::from([("app".to_string(), app.to_string())]),
        source: String::new(),
        ..aggregate::census_pod("shop", name, uid, established)
    }
}

/// `established` summed over the `app=web` pods of `shop`, as KEDA asks the aggregator.
fn web_value(fleet: FleetCensus, extra: &[(&str, &str)]) -> Result<f64, tonic::Status> {
    scaler_value(Arc::new(fleet), web_query("shop", extra))
}

// === a pod deleted and recreated with the same name (a StatefulSet's web-1) ===

/// StatefulSet pod shop/web-1 on node-a is deleted and recreated on node-a with a new UID
/// (uid-new, Running, 20 connections). node-a's agent's pod view lags: its census still names
/// the predecessor (uid-old, terminating, its last process gone: `error` set) and not uid-new
/// (its cgroup not listed yet, or listed by UID only and named after the predecessor's name).
/// The aggregator's watch knows only uid-new. `PodPlacement::verify` finds uid-old by
/// namespace/name, rewrites it to uid-new and keeps it; `incomplete` accepts it as naming
/// web-1 (by UID after the rewrite, and by name anyway); `evaluate` skips it as a terminating
/// pod whose census failed. node-a adds 0: KEDA gets node-b's 10 instead of 30 or UNAVAILABLE.
#[test]
fn adversary18b_a_recreated_pod_is_stood_for_by_its_terminating_predecessor() {
    let placement = PodPlacement::from_pods(&[
        api_pod("web-1", "uid-new", "web", "node-a", "Running", false),
        api_pod("web-2", "uid-2", "web", "node-b", "Running", false),
    ]);
    let mut predecessor = census_pod("web-1", "uid-old", "web", 0);
    predecessor.deletion_timestamp = Some(prost_types::Timestamp::default());
    predecessor.error = "no live process in the pod's cgroup (starting or stopping)".into();
    let f = fleet(
        placement,
        vec![
            ("node-a", vec![predecessor]),
            ("node-b", vec![census_pod("web-2", "uid-2", "web", 10)]),
        ],
    );
    let got = web_value(f, &[]);
    assert!(
        is_unavailable(&got),
        "node-a's census does not name uid-new (the running web-1): KEDA must get UNAVAILABLE, \
         not node-b's 10 as the sum; got {got:?}"
    );
}

/// The same, with the predecessor still counted (its netns not torn down yet: 3 lingering
/// connections): the census stands for the new web-1 with the old pod's 3, and KEDA gets
/// 13 instead of 30 (or UNAVAILABLE).
#[test]
fn adversary18b_a_recreated_pod_is_counted_with_its_predecessors_connections() {
    let placement = PodPlacement::from_pods(&[
        api_pod("web-1", "uid-new", "web", "node-a", "Running", false),
        api_pod("web-2", "uid-2", "web", "node-b", "Running", false),
    ]);
    let f = fleet(
        placement,
        vec![
            ("node-a", vec![census_pod("web-1", "uid-old", "web", 3)]),
            ("node-b", vec![census_pod("web-2", "uid-2", "web", 10)]),
        ],
    );
    let got = web_value(f, &[]);
    assert!(
        is_unavailable(&got),
        "node-a's census names uid-old, a pod the API no longer has, not uid-new: KEDA must \
         get UNAVAILABLE, not 13; got {got:?}"
    );
}

// === a pod rescheduled to another node with the same name ===

/// web-1 moves from node-a to node-b (same name, new UID). node-a's agent still reports the
/// old web-1 with 7 connections; node-b's agent has not named the new one yet. The old entry
/// must be refused (the API places web-1 on node-b) and node-b's census is incomplete:
/// UNAVAILABLE, not 7.
#[test]
fn adversary18b_a_pod_moved_to_another_node_is_not_counted_where_it_was() {
    let placement = PodPlacement::from_pods(&[api_pod(
        "web-1", "uid-new", "web", "node-b", "Running", false,
    )]);
    let (kept, refused) = placement.verify("node-a", &[census_pod("web-1", "uid-old", "web", 7)]);
    // Nothing counted: the unknown uid-old is only a value-less stand-in (decision #18-l).
    assert!(
        kept.iter().all(nodekeeper::keda::coverage::is_view_behind),
        "{kept:?}"
    );
    assert_eq!(refused.len(), 1, "{refused:?}");
    let f = fleet(
        placement,
        vec![
            ("node-a", vec![census_pod("web-1", "uid-old", "web", 7)]),
            ("node-b", vec![]),
        ],
    );
    let got = web_value(f, &[]);
    assert!(is_unavailable(&got), "got {got:?}");
}

// === labels changed on a running pod ===

/// web-2 is relabelled app=web -> app=batch (and api-1 app=api -> app=web); node-a's agent
/// still names both with their old labels. The aggregator's watch labels win both ways: the
/// value is api-1's 4 plus web-1's 5, never web-2's 100.
#[test]
fn adversary18b_stale_labels_in_a_census_do_not_move_pods_in_or_out_of_a_selection() {
    let placement = PodPlacement::from_pods(&[
        api_pod("web-1", "uid-1", "web", "node-a", "Running", false),
        api_pod("web-2", "uid-2", "batch", "node-a", "Running", false),
        api_pod("api-1", "uid-3", "web", "node-a", "Running", false),
    ]);
    let f = fleet(
        placement,
        vec![(
            "node-a",
            vec![
                census_pod("web-1", "uid-1", "web", 5),
                census_pod("web-2", "uid-2", "web", 100),
                census_pod("api-1", "uid-3", "api", 4),
            ],
        )],
    );
    assert_eq!(web_value(f, &[]).map_err(|s| s.to_string()), Ok(9.0));
}

// === Pending and terminating pods on a node without an answering agent ===

/// A Pending web pod on node-c (no agent there) and a terminating-but-Running one on node-d
/// (agent down): both nodes host selected pods whose values are unknown; UNAVAILABLE naming
/// them, not node-a's 5.
#[test]
fn adversary18b_pending_and_terminating_selected_pods_keep_their_nodes_expected() {
    for (pod, node) in [
        (
            api_pod("web-9", "uid-9", "web", "node-c", "Pending", false),
            "node-c",
        ),
        (
            api_pod("web-9", "uid-9", "web", "node-d", "Running", true),
            "node-d",
        ),
    ] {
        let placement = PodPlacement::from_pods(&[
            api_pod("web-1", "uid-1", "web", "node-a", "Running", false),
            pod,
        ]);
        let mut f = fleet(
            placement,
            vec![("node-a", vec![census_pod("web-1", "uid-1", "web", 5)])],
        );
        if node == "node-d" {
            f.agents.push(AgentCensus {
                name: "10.0.0.4:9741 (node-d)".into(),
                node: "node-d".into(),
                state: AgentState::Missing {
                    error: "Unavailable: connection refused".into(),
                    last_known: None,
                },
            });
        }
        let got = web_value(f, &[]);
        assert!(
            got.as_ref()
                .is_err_and(|s| s.code() == tonic::Code::Unavailable && s.message().contains(node)),
            "{node}: got {got:?}"
        );
    }
}

// === IPv6 remotes with a zone ===

/// A link-local pool `[fe80::1%2]:5432` (scope id 2, as `ip -6 addr` shows for eth0) parses as
/// a SocketAddrV6 with that scope, and its display keeps `%2`; the census names peers without
/// a scope (`[fe80::1]:5432`: BPF and sock_diag read no scope id), so the query never matches
/// its 3 connections and reads 0 (the agent pins `[fe80::1%2]:5432`, which no socket matches
/// either). It must be normalised like the census, or refused naming `remote`.
#[test]
fn adversary18b_an_ipv6_remote_with_a_scope_id_is_accepted_and_reads_0() {
    let mut pod = census_pod("web-1", "uid-1", "web", 3);
    pod.pools = vec![pb::ConnectionPool {
        remote: "[fe80::1]:5432".into(),
        established: 3,
        active: 3,
        remotes: 1,
        ..Default::default()
    }];
    let r = scaled_object(
        "shop",
        &[
            ("metric", "established"),
            ("target", "5"),
            ("podSelector", "app=web"),
            ("remote", "[fe80::1%2]:5432"),
        ],
    );
    match Query::parse(&r) {
        Err(e) => assert!(e.to_string().contains("remote"), "{e}"),
        Ok(q) => assert_eq!(
            evaluate(&q, std::slice::from_ref(&pod)).value,
            3.0,
            "the pool to [fe80::1]:5432 is the pool to [fe80::1%2]:5432 (query remote {:?})",
            q.remote.map(|r| r.to_string())
        ),
    }
}

/// A named zone (`%eth0`) and a bracketless IPv6 are refused naming `remote`.
#[test]
fn adversary18b_ipv6_remotes_with_a_named_zone_or_no_brackets_are_refused() {
    for remote in [
        "[fe80::1%eth0]:5432",
        "fe80::1:5432",
        "[fd00::1]",
        "fd00::1",
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
            Ok(q) => panic!("{remote} accepted as {:?}", q.remote.map(|r| r.to_string())),
        }
    }
}

// === a watch 410 and a slow relist ===

/// `nodekeeper aggregate` over the Service's agents of the cluster of `kubeconfig`.
fn start_aggregator(dir: &std::path::Path, kubeconfig: &std::path::Path) -> Aggregator {
    Aggregator::builder()
        .allow_anonymous()
        .args(["--service", "nodekeeper-system/nodekeeper"])
        .args(["--deadline", "2s", "--refresh", "100ms"])
        .kubeconfig(kubeconfig)
        .log("info,nodekeeper=debug,kube_runtime=debug")
        .start(dir)
}

/// KEDA's GetMetrics for `established` over the `app=web` pods of `shop`, against `addr`.
fn keda_web_value(rt: &tokio::runtime::Runtime, addr: std::net::SocketAddr) -> Result<f64, String> {
    keda_value(rt, addr, &[])
}

/// [`keda_web_value`] with more scaler metadata.
fn keda_value(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    extra: &[(&str, &str)],
) -> Result<f64, String> {
    rt.block_on(census_pods::get_metrics(
        &addr.to_string(),
        web_query("shop", extra),
    ))
    .map(|m| m.metric_values[0].metric_value_float)
    .map_err(status_text)
}

/// The aggregator's pod watch gets `410 Expired` (etcd compacted past its resourceVersion, a
/// routine event) and its relist LIST hangs (a loaded API server answering slowly). kube's
/// watcher emits `Init` *before* it sends the LIST, and pods.rs records any Ok event as the
/// watch being healthy again: the placement is "current" while the store still holds the
/// state from before the 410 for as long as the LIST takes (kube's client read timeout is
/// minutes). A web pod scheduled meanwhile on node-c (no agent there) is unknown and KEDA gets
/// node-a's 10 as the whole sum, instead of UNAVAILABLE naming node-c (what it gets with the
/// watch working, and with the watch failing: adversary_issue18.rs).
#[test]
fn adversary18b_a_pod_watch_relisting_after_410_reads_current_while_stale() {
    use nodekeeper_tests::fake_api::{Fault, FaultKind};
    let (got, pod_view) = pod_scheduled_while_the_aggregators_watch_is_stuck(|api| {
        // The next pod watch gets 410; every pod LIST after it hangs.
        api.inject(Fault::on("GET", "/api/v1/pods", FaultKind::Expired).watch(true));
        api.inject(
            Fault::on("GET", "/api/v1/pods", FaultKind::Hold)
                .watch(false)
                .always(),
        );
    });
    assert!(
        got.as_ref().is_err_and(|e| e.starts_with("Unavailable")),
        "the pod view is not current (its relist has not answered) and node-c hosts a selected \
         pod nobody counted: KEDA must get UNAVAILABLE, got {got:?} ({pod_view})"
    );
}

/// The aggregator's pod watch ends (an API server restart, a proxy's idle timeout: routine)
/// and its re-watch is accepted but never answered (an API server or a proxy in front of it
/// that hangs). A watch ending is not an error, and a hung request errs only at kube's client
/// read timeout (minutes): pods.rs recorded no error, so the placement read current while it
/// missed every change, and with a web pod scheduled meanwhile on node-c (no agent there) KEDA
/// got node-a's 10 as the whole sum. Fixed (#18-k): a watch request unanswered for longer than
/// `WATCH_ANSWER_GRACE` makes the view not current, so KEDA gets UNAVAILABLE naming node-c
/// (well before `WATCH_ANSWER_TIMEOUT` cuts the request: the helper's poll ends sooner).
#[test]
fn adversary18b_a_hung_pod_rewatch_reads_current_while_stale() {
    use nodekeeper_tests::fake_api::{Fault, FaultKind};
    let (got, pod_view) = pod_scheduled_while_the_aggregators_watch_is_stuck(|api| {
        api.inject(
            Fault::on("GET", "/api/v1/pods", FaultKind::Hold)
                .watch(true)
                .always(),
        );
    });
    assert!(
        got.as_ref().is_err_and(|e| e.starts_with("Unavailable")),
        "the pod watch has been hung since it ended and node-c hosts a selected pod nobody \
         counted: KEDA must get UNAVAILABLE, got {got:?} ({pod_view})"
    );
}

/// A routine end of the aggregator's pod watch (the API server's `timeoutSeconds`, a restart)
/// with a prompt re-watch must not flap KEDA to UNAVAILABLE: every query from the watch's end
/// until twice `WATCH_ANSWER_GRACE` after the re-watch was answered gets node-a's 10. Then a
/// web pod scheduled on node-c (no agent) makes it UNAVAILABLE: the re-watch really resumed.
#[test]
fn a_routine_pod_rewatch_does_not_flap_keda_to_unavailable() {
    use nodekeeper_tests::fake_api::PodSeed;
    let scene = AggregatorScene::start();
    let (rt, api, agg) = (&scene.rt, &scene.api, &scene.agg);
    let pod_watches = || {
        api.requests()
            .iter()
            .filter(|r| r.path == "/api/v1/pods" && r.query.contains("watch=true"))
            .count()
    };
    let before = pod_watches();
    api.end_watches("/api/v1/pods");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rewatched = None;
    loop {
        let got = keda_web_value(rt, agg.grpc);
        assert_eq!(
            got,
            Ok(10.0),
            "a routine re-watch flapped KEDA (re-watch answered: {rewatched:?}); log:\n{}",
            agg.proc.log_text()
        );
        if rewatched.is_none() && pod_watches() > before {
            rewatched = Some(Instant::now());
        }
        if rewatched.is_some_and(|t| t.elapsed() > WATCH_ANSWER_GRACE * 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the aggregator never re-watched pods; log:\n{}",
            agg.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    api.add_pod(
        PodSeed::new("web-3")
            .namespace("shop")
            .node("node-c")
            .label("app", "web"),
    );
    let got = keda_until_not_10(rt, agg.grpc, Duration::from_secs(20));
    assert!(
        got.as_ref()
            .is_err_and(|e| e.starts_with("Unavailable") && e.contains("node-c")),
        "the resumed watch delivers web-3 on node-c (no agent): want UNAVAILABLE naming \
         node-c, got {got:?}"
    );
}

/// Asks KEDA until its answer is no longer node-a's 10 or `within` passed; the last answer.
fn keda_until_not_10(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    within: Duration,
) -> Result<f64, String> {
    let deadline = Instant::now() + within;
    loop {
        let got = keda_web_value(rt, addr);
        if got != Ok(10.0) || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fake API with nodes node-a and node-c and web-1 (app=web, shop) on node-a, node-a's fake
/// agent answering web-1 with 10, and an aggregator watching pods that KEDA has got 10 from.
struct AggregatorScene {
    agg: Aggregator,
    api: nodekeeper_tests::fake_api::FakeApi,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl AggregatorScene {
    fn start() -> Self {
        use nodekeeper_tests::fake_api::{EndpointSeed, FakeApi, PodSeed};
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let api = FakeApi::start();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        for node in ["node-a", "node-c"] {
            api.add_node(node, &[]);
        }
        api.add_pod(
            PodSeed::new("web-1")
                .namespace("shop")
                .node("node-a")
                .label("app", "web"),
        );
        let agent = start_fake_agent(&rt, "node-a", vec![census_pod("web-1", "", "web", 10)]);
        api.add_endpoint_slice(
            "nodekeeper-system",
            "nodekeeper",
            &[("grpc", agent.port())],
            &[EndpointSeed::new("127.0.0.1")
                .node("node-a")
                .pod("nodekeeper-node-a")],
        );
        let agg = start_aggregator(dir.path(), &kubeconfig);
        let deadline = Instant::now() + Duration::from_secs(20);
        while keda_web_value(&rt, agg.grpc) != Ok(10.0) {
            assert!(
                Instant::now() < deadline,
                "the aggregator never answered 10: {:?}\n{}",
                keda_web_value(&rt, agg.grpc),
                agg.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            agg,
            api,
            rt,
            _dir: dir,
        }
    }
}

/// node-a's (fake) agent answers web-1 with 10; the aggregator watches pods; `faults` are
/// injected and the pod watches ended; once a pods request is held, web-3 is scheduled on
/// node-c (no agent). Returns KEDA's answer once it is no longer 10 (or, if it still is,
/// `WATCH_ANSWER_GRACE` plus 2 s after the hold, which is less than `WATCH_ANSWER_TIMEOUT`:
/// only a view judged not current, not a cut request, can change it) and the pod_view_current
/// metric.
fn pod_scheduled_while_the_aggregators_watch_is_stuck(
    faults: impl FnOnce(&nodekeeper_tests::fake_api::FakeApi),
) -> (Result<f64, String>, String) {
    use nodekeeper_tests::fake_api::PodSeed;
    let scene = AggregatorScene::start();
    let (rt, api, agg) = (&scene.rt, &scene.api, &scene.agg);
    faults(api);
    api.end_watches("/api/v1/pods");
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.held_total() == 0 {
        assert!(
            Instant::now() < deadline,
            "the aggregator sent no pods request to hold; log:\n{}",
            agg.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A web pod is scheduled on node-c, which has no agent.
    api.add_pod(
        PodSeed::new("web-3")
            .namespace("shop")
            .node("node-c")
            .label("app", "web"),
    );
    let within = WATCH_ANSWER_GRACE + Duration::from_secs(2);
    assert!(within < WATCH_ANSWER_TIMEOUT);
    let got = keda_until_not_10(rt, agg.grpc, within);
    let pod_view = nodekeeper_tests::http_get(agg.metrics, "/metrics")
        .map(|(_, b)| {
            b.lines()
                .filter(|l| l.starts_with("nodekeeper_aggregate_pod_view_current"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    api.clear_faults();
    api.release_held();
    (got, pod_view)
}

/// The node agent's own pod watch (field selector spec.nodeName) gets `410 Expired` and its
/// relist LIST hangs: kube's watcher emits `Init` before the LIST, kube.rs `watch_pods` records
/// it as healthy, and the census's `pod_view` says synced and not failing. A web pod started
/// meanwhile on node-a with 5 connections is in the census by UID only (its pod view has not
/// seen it), so no selector matches it: the agent's own scaler answers 10 instead of 15 or
/// UNAVAILABLE (the aggregator, whose own watch works, refuses: node-a's census does not name
/// web-3). The same as adversary_issue18.rs's stale-watch finding, through the one event the
/// fix counts as recovery.
#[test]
fn adversary18b_an_agents_pod_watch_relisting_after_410_reads_current_while_stale_as_root() {
    use nodekeeper_tests::fake_api::{Fault, FaultKind};
    if !nodekeeper_tests::require_root() {
        return;
    }
    // Only the agent's watch (field selector spec.nodeName): 410, then every LIST hangs.
    a_pod_started_while_the_agents_watch_is_stuck(|api| {
        api.inject(
            Fault::on("GET", "/api/v1/pods", FaultKind::Expired)
                .query("fieldSelector")
                .watch(true),
        );
        api.inject(
            Fault::on("GET", "/api/v1/pods", FaultKind::Hold)
                .query("fieldSelector")
                .watch(false)
                .always(),
        );
    });
}

/// The node agent's own pod watch ends and its re-watch is accepted but never answered (#18-k,
/// as `adversary18b_a_hung_pod_rewatch_reads_current_while_stale` for the aggregator): the
/// agent's pod view is not current once the re-watch is unanswered past `WATCH_ANSWER_GRACE`,
/// so web-3, started meanwhile, makes its scaler and the aggregator answer UNAVAILABLE, not 10.
#[test]
fn an_agents_hung_pod_rewatch_is_not_current_as_root() {
    use nodekeeper_tests::fake_api::{Fault, FaultKind};
    if !nodekeeper_tests::require_root() {
        return;
    }
    a_pod_started_while_the_agents_watch_is_stuck(|api| {
        api.inject(
            Fault::on("GET", "/api/v1/pods", FaultKind::Hold)
                .query("fieldSelector")
                .watch(true)
                .always(),
        );
    });
}

/// node-a's real agent (web-1, web-2: 10 connections to the pool) and an aggregator; `faults`
/// are injected and the pod watches ended; once the agent's pods request is held, web-3 starts
/// on node-a with 5 connections. Both the agent's scaler and the aggregator must answer 15 or
/// UNAVAILABLE once web-3 is in the agent's census.
fn a_pod_started_while_the_agents_watch_is_stuck(
    faults: impl FnOnce(&nodekeeper_tests::fake_api::FakeApi),
) {
    use nodekeeper_tests::fake_api::{EndpointSeed, FakeApi};
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup-node-a");
    let mut pods = census_pods::start_pods(&api, &cgroup, dir.path(), "node-a");
    let agent = nodekeeper_tests::Agent::builder()
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    census_pods::wait_for_pool(&agent.api.to_string(), 10.0);
    api.add_endpoint_slice(
        "nodekeeper-system",
        "nodekeeper",
        &[("grpc", agent.api.port())],
        &[EndpointSeed::new("127.0.0.1")
            .node("node-a")
            .pod("nodekeeper-node-a")],
    );
    let agg = start_aggregator(dir.path(), &kubeconfig);
    census_pods::wait_for_pool(&agg.grpc.to_string(), 10.0);
    faults(&api);
    api.end_watches("/api/v1/pods");
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.held_total() == 0 {
        assert!(
            Instant::now() < deadline,
            "the agent's pods request was not held; log:\n{}",
            agent.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let held_at = Instant::now();
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
    // The agent's census lists web-3's cgroup (by UID) once its snapshot is refreshed; and its
    // pod view says not current (at once for a re-list, after WATCH_ANSWER_GRACE for a hung
    // re-watch), or that never came within the grace plus 2 s (less than the 10 s cut of an
    // unanswered watch request, which would make it not current by another path).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snap = rt.block_on(async {
            let mut c = nodekeeper::pb::node_agent_client::NodeAgentClient::connect(format!(
                "http://{}",
                agent.api
            ))
            .await
            .expect("connect");
            c.get_metrics(pb::GetMetricsRequest {
                exclude_pods: true,
                exclude_connections: false,
                pinned_remotes: vec![],
            })
            .await
            .expect("GetMetrics")
            .into_inner()
        });
        let not_current = snap.pod_view.as_ref().is_some_and(|v| !v.error.is_empty());
        if snap.connections.len() >= 3
            && (not_current || held_at.elapsed() > WATCH_ANSWER_GRACE + Duration::from_secs(2))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web-3 never in the census: {:?}",
            snap.connections
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let remote = [("remote", census_pods::POOL_REMOTE)];
    let got_agg = keda_value(&rt, agg.grpc, &remote);
    let got_agent = keda_value(&rt, agent.api, &remote);
    api.clear_faults();
    api.release_held();
    for (who, got) in [("aggregator", got_agg), ("agent", got_agent)] {
        assert!(
            got == Ok(15.0) || got.as_ref().is_err_and(|e| e.starts_with("Unavailable")),
            "{who}: web-3 runs on node-a with 5 connections; want 15 or UNAVAILABLE, got {got:?}"
        );
    }
    drop(pods);
}

// === lastKnownFor against a placement that moved on ===

/// node-b's agent is down; `lastKnownFor: 60` lets its last census (web-2: 10) count. Since
/// that census, web-4 was scheduled on node-b and runs: the last census cannot name it, so it
/// cannot stand for node-b. UNAVAILABLE naming node-b, not 15.
#[test]
fn adversary18b_a_last_census_older_than_a_pod_scheduled_since_does_not_count() {
    use nodekeeper::keda::coverage::LastKnown;
    let placement = PodPlacement::from_pods(&[
        api_pod("web-1", "uid-1", "web", "node-a", "Running", false),
        api_pod("web-2", "uid-2", "web", "node-b", "Running", false),
        api_pod("web-4", "uid-4", "web", "node-b", "Running", false),
    ]);
    let (last, _) = placement.verify("node-b", &[census_pod("web-2", "uid-2", "web", 10)]);
    let mut f = fleet(
        placement,
        vec![("node-a", vec![census_pod("web-1", "uid-1", "web", 5)])],
    );
    f.agents.push(AgentCensus {
        name: "10.0.0.2:9741 (node-b)".into(),
        node: "node-b".into(),
        state: AgentState::Missing {
            error: "Unavailable: connection refused".into(),
            last_known: Some(LastKnown {
                at: Instant::now() - Duration::from_secs(5),
                pods: Arc::new(last),
                pinned: Arc::default(),
            }),
        },
    });
    let got = web_value(f, &[("lastKnownFor", "60")]);
    assert!(
        got.as_ref()
            .is_err_and(|s| s.code() == tonic::Code::Unavailable
                && s.message().contains("node-b")
                && s.message().contains("web-4")),
        "got {got:?}"
    );
}

// === a census larger than the gRPC message limit ===

/// A node with many pods and large labels sends a census over tonic's 4 MiB decoding limit
/// (here 6 MB: 2000 pods with 3 KB of labels each). The aggregator cannot decode it: node-a
/// must be missing (UNAVAILABLE naming it), never counted as an empty census.
#[test]
fn adversary18b_a_census_over_the_grpc_message_limit_is_unavailable_not_0() {
    use nodekeeper_tests::fake_api::{EndpointSeed, FakeApi, PodSeed};
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.add_node("node-a", &[]);
    api.add_pod(
        PodSeed::new("web-1")
            .namespace("shop")
            .node("node-a")
            .label("app", "web"),
    );
    let mut census = vec![census_pod("web-1", "", "web", 10)];
    for i in 0..2000 {
        let mut p = census_pod(&format!("batch-{i}"), &format!("uid-b{i}"), "batch", 1);
        p.labels.insert("blob".into(), "x".repeat(3000));
        census.push(p);
    }
    let agent = start_fake_agent(&rt, "node-a", census);
    api.add_endpoint_slice(
        "nodekeeper-system",
        "nodekeeper",
        &[("grpc", agent.port())],
        &[EndpointSeed::new("127.0.0.1")
            .node("node-a")
            .pod("nodekeeper-node-a")],
    );
    let agg = start_aggregator(dir.path(), &kubeconfig);
    let got = keda_web_value(&rt, agg.grpc);
    eprintln!("census over the limit: {got:?}");
    assert!(
        got == Ok(10.0)
            || got
                .as_ref()
                .is_err_and(|e| e.starts_with("Unavailable") && e.contains("node-a")),
        "want node-a's 10 or UNAVAILABLE naming node-a, got {got:?}\n{}",
        agg.proc.log_text()
    );
}
