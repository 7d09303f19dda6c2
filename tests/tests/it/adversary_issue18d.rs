//! Fourth adversary round against issue #18's promises (autoscaling signals): KEDA never gets a
//! silently smaller number from `nodekeeper aggregate` or an agent's own scaler; every node
//! hosting a selected pod must have answered with a census naming every selected pod placed
//! there, from pod views that are synced and current, or the query is an error (or the
//! ScaledObject's explicit `minCoverage` / `lastKnownFor`); values are exact. Attacks around the
//! fixes of tests/tests/it/adversary_issue18.rs, adversary_issue18b.rs and adversary_issue18c.rs.
//!
//! A test marked `#[ignore = "adversary finding: ..."]` broke the promise (run it with
//! `--ignored` to see it fail); a plain test is an attack that held (none is ignored now). The product code is not
//! changed here.
//!
//! The `_as_root` attacks run a connected agent (fake API server, fake kubelet cgroup tree, real
//! processes and sockets) and ask its own KEDA scaler; the others drive the aggregator's coverage
//! path as its fan-out builds it (`PodPlacement::verify` against each agent's EndpointSlice node,
//! `FleetCensus` behind a `ScalerService`, asked as KEDA asks).
//!
//! Broke, fixed since (un-ignored): the one-pass BPF reader kept IPv4-mapped peers (`remote`
//! read 0 for a dual-stack client); a pod process in a private netns listed first stood for the
//! pod (decision #18-m); a hostNetwork pod's queued connections and TIME_WAIT sockets read 0
//! (decision #18-n); the agent's own scaler summed without a selected pod its census lacks (a
//! cgroup not found, a static pod; decisions #18-l, #18-o).
//! Held (plain): same names in two namespaces, minCoverage bounds, an agent in two slices with
//! different nodes, an agent replaced on its node, lastKnownFor after a restart, pins full.

// `Agent`: an agent as `summarize` leaves it (answered now, or missing without a last census).
use crate::support::aggregate::{
    FleetMember as Agent, WAIT, api_pod, census_pod, code, fleet_of as fleet, get_fleet_plaintext,
    keda_value, scaler_value, start_changeable_fake_agent, start_open_aggregator, until, web_query,
};
use crate::support::census_pods;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use census_pods::scaled_object;
use nodekeeper::aggregate::discovery::targets_from_slices;
use nodekeeper::keda::coverage::{AgentCensus, FleetCensus, PodPlacement};
use nodekeeper::keda::query::Query;
use nodekeeper::pb;
use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
use nodekeeper_tests::{Proc, free_port, wait_for};
use serde_json::json;
use tonic::Status;

// === the coverage path, as the aggregator's summarize builds it ===

/// `established` summed over the `app=web` pods of `ns` (plus `extra` metadata), as KEDA asks
/// the aggregator.
fn web_value(fleet: &Arc<FleetCensus>, ns: &str, extra: &[(&str, &str)]) -> Result<f64, Status> {
    scaler_value(fleet.clone(), web_query(ns, extra))
}

// === same names in two namespaces; namespace-scoped queries ===

/// `shop/web-1` runs on node-a, `shop2/web-1` (same name, same labels, another UID) on node-b.
/// node-a's agent answers; node-b's is down. Each query is scoped to its namespace: `shop`
/// needs only node-a (5), `shop2` needs node-b and is UNAVAILABLE. node-a's census naming
/// `shop2/web-1` (a confused or rogue agent; by UID or by name without one) is refused for its
/// node, so it can neither add to `shop2` nor stand in for node-b.
#[test]
fn adversary18d_same_pod_name_in_two_namespaces_is_scoped_per_query() {
    let placement = || {
        PodPlacement::from_pods(&[
            api_pod("shop", "web-1", "uid-shop", "node-a"),
            api_pod("shop2", "web-1", "uid-shop2", "node-b"),
        ])
    };
    let census = vec![
        census_pod("shop", "web-1", "uid-shop", 5),
        census_pod("shop2", "web-1", "uid-shop2", 40),
        census_pod("shop2", "web-1", "", 40),
    ];
    let f = Arc::new(fleet(
        placement(),
        vec![Agent::Answered("node-a", census), Agent::Missing("node-b")],
    ));
    assert_eq!(
        web_value(&f, "shop", &[]).map_err(|s| s.to_string()),
        Ok(5.0)
    );
    let shop2 = web_value(&f, "shop2", &[]);
    assert_eq!(
        code(&shop2),
        Some(tonic::Code::Unavailable),
        "shop2/web-1 runs on node-b, whose agent is down: {shop2:?}"
    );
    // With minCoverage the partial policy still never counts node-a's claim of shop2/web-1:
    // the only agent that matters is node-b's, and it is missing.
    let partial = web_value(&f, "shop2", &[("minCoverage", "1")]);
    assert_eq!(
        code(&partial),
        Some(tonic::Code::Unavailable),
        "{partial:?}"
    );
}

// === minCoverage at its boundaries ===

/// minCoverage is a plain percent: "50%", "0", "-5", "abc", "101", "NaN" are refused naming the
/// field (never read as 0 or 100); "1e2" is 100. With one of two agents that matter counted (50
/// %), minCoverage 50 answers with node-a's share (the explicit partial policy), 50.0001 and
/// 100 are UNAVAILABLE.
#[test]
fn adversary18d_min_coverage_boundaries() {
    let base = |c: &str| {
        HashMap::from([
            ("metric".to_string(), "established".to_string()),
            ("target".to_string(), "5".to_string()),
            ("podSelector".to_string(), "app=web".to_string()),
            ("minCoverage".to_string(), c.to_string()),
        ])
    };
    for bad in [
        "50%", "0", "-5", "abc", "101", "NaN", "inf", "0x32", "1e-400",
    ] {
        let e = Query::from_metadata(&base(bad), "shop")
            .map(|q| q.coverage)
            .expect_err(bad)
            .to_string();
        assert!(e.contains("scalerMetadata.minCoverage:"), "{bad}: {e}");
    }
    let q = Query::from_metadata(&base("1e2"), "shop").unwrap();
    assert_eq!(q.coverage.min_percent, 100.0);

    let f = Arc::new(fleet(
        PodPlacement::from_pods(&[
            api_pod("shop", "web-1", "uid-1", "node-a"),
            api_pod("shop", "web-2", "uid-2", "node-b"),
        ]),
        vec![
            Agent::Answered("node-a", vec![census_pod("shop", "web-1", "uid-1", 5)]),
            Agent::Missing("node-b"),
        ],
    ));
    assert_eq!(
        web_value(&f, "shop", &[("minCoverage", "50")]).map_err(|s| s.to_string()),
        Ok(5.0)
    );
    for strict in ["50.0001", "100", "1e2"] {
        let got = web_value(&f, "shop", &[("minCoverage", strict)]);
        assert_eq!(
            code(&got),
            Some(tonic::Code::Unavailable),
            "{strict}: {got:?}"
        );
    }
    assert_eq!(
        code(&web_value(&f, "shop", &[])),
        Some(tonic::Code::Unavailable)
    );
}

// === EndpointSlice churn ===

/// An EndpointSlice as the Service's endpoint controller writes it.
fn slice(
    name: &str,
    endpoints: &[(&str, &str, &str)],
) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "nodekeeper-system",
                     "labels": {"kubernetes.io/service-name": "nodekeeper"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 9741}],
        "endpoints": endpoints.iter().map(|(ip, node, pod)| json!({
            "addresses": [ip],
            "nodeName": node,
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": "nodekeeper-system", "name": pod,
                          "uid": format!("uid-{pod}")},
        })).collect::<Vec<_>>(),
    }))
    .expect("an EndpointSlice")
}

/// Two slices of one Service list the same agent pod (the endpoint controller moves endpoints
/// between slices while rebalancing), one of them with a stale `nodeName` (node-b, while the
/// agent runs on node-a). Whichever slice wins, the aggregator must not count node-a's pods for
/// node-b nor leave node-a uncounted silently: the sum is either exact (11) or UNAVAILABLE.
#[test]
fn adversary18d_an_agent_listed_in_two_slices_with_different_nodes_is_exact_or_unavailable() {
    for order in [false, true] {
        let fresh = slice("nodekeeper-abc", &[("10.0.0.1", "node-a", "agent-a")]);
        let stale = slice(
            "nodekeeper-def",
            &[
                ("10.0.0.1", "node-b", "agent-a"),
                ("10.0.0.2", "node-b", "agent-b"),
            ],
        );
        let slices = if order {
            vec![stale.clone(), fresh.clone()]
        } else {
            vec![fresh.clone(), stale.clone()]
        };
        let targets = targets_from_slices(&slices, "grpc");
        let placement = || {
            PodPlacement::from_pods(&[
                api_pod("shop", "web-1", "uid-1", "node-a"),
                api_pod("shop", "web-2", "uid-2", "node-b"),
            ])
        };
        // Each target answers with its real node's census: 10.0.0.1 is node-a's agent.
        let agents = targets
            .iter()
            .map(|t| {
                let pods = if t.address.starts_with("10.0.0.1:") {
                    vec![census_pod("shop", "web-1", "uid-1", 5)]
                } else {
                    vec![census_pod("shop", "web-2", "uid-2", 6)]
                };
                Agent::Answered(t.node_name.as_str(), pods)
            })
            .collect();
        // Two answers for one node: the aggregator keeps one (the newest; both are "now"
        // here), so each of them is tried as the one kept.
        let f = fleet(placement(), agents);
        for keep_last in [false, true] {
            let mut by_node: HashMap<String, AgentCensus> = HashMap::new();
            for a in f.agents.clone() {
                if keep_last || !by_node.contains_key(&a.node) {
                    by_node.insert(a.node.clone(), a);
                }
            }
            let kept = Arc::new(FleetCensus {
                agents: by_node.into_values().collect(),
                placement: f.placement.clone(),
            });
            let got = web_value(&kept, "shop", &[]);
            assert!(
                matches!(got, Ok(v) if v == 11.0) || code(&got) == Some(tonic::Code::Unavailable),
                "targets {targets:?}, keep_last {keep_last}: KEDA must get 11 or UNAVAILABLE, \
                 got {got:?}"
            );
        }
    }
}

// === the agent's own scaler (root: real processes, sockets and a fake kubelet tree) ===

/// A pod's process in the host's network namespace (a hostNetwork pod): a listener on
/// 127.0.0.1:PORT that never accepts, and TW loopback connections it opened and closed first
/// (TIME_WAIT on its side). Prints "ready".
const HOST_NETWORK_POD: &str = r#"
import socket, sys, time
port, tw = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket()
srv.bind(("127.0.0.1", port))
srv.listen(64)
t = socket.socket()
t.bind(("127.0.0.1", 0))
t.listen(64)
for _ in range(tw):
    c = socket.create_connection(t.getsockname())
    s, _ = t.accept()
    c.close()
    assert s.recv(1) == b""
    s.close()
t.close()
print("ready", flush=True)
time.sleep(3600)
"#;

/// Clients (not a pod: no cgroup) in the host namespace: N connections to 127.0.0.1:PORT held.
const CLIENTS: &str = r#"
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
print("ready", flush=True)
time.sleep(3600)
"#;

fn python(name: &str, script: &str, args: &[String], dir: &Path) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]).args(args);
    let proc = Proc::spawn(name, cmd, dir);
    wait_for(Duration::from_secs(20), &format!("{name} ready"), || {
        let log = proc.log_text();
        assert!(!log.contains("Traceback"), "{name} failed:\n{log}");
        log.contains("ready").then_some(())
    });
    proc
}

/// Registers `seed` in the API and puts `pid` in its pod cgroup (cgroupfs layout); the UID.
fn pod_with_cgroup(api: &FakeApi, cgroup: &Path, seed: PodSeed, pid: u32) -> String {
    let uid = api.add_pod(seed)["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let dir = cgroup.join(format!("kubepods/besteffort/pod{uid}"));
    nodekeeper_tests::cgroup::pod_dir(&dir, "usage_usec 1000\n", 1000, "inactive_file 0\n");
    std::fs::write(dir.join("cgroup.procs"), format!("{pid}\n")).unwrap();
    uid
}

/// `metric` (with `extra`) over `app=<app>` in `shop`, asked of the agent's own scaler.
fn agent_value(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    app: &str,
    extra: &[(&str, &str)],
) -> Result<f64, Status> {
    let selector = format!("app={app}");
    let mut meta = vec![("target", "5"), ("podSelector", selector.as_str())];
    meta.extend_from_slice(extra);
    rt.block_on(census_pods::get_metrics(addr, scaled_object("shop", &meta)))
        .map(|r| r.metric_values[0].metric_value_float)
}

/// Established TCP sockets of the host namespace with local port `port` (`ss`).
fn ss_established_on(port: u16) -> usize {
    let out = Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// A connected agent on node-a reading `cgroup`.
fn connected_agent(api: &FakeApi, dir: &Path, cgroup: &Path) -> nodekeeper_tests::Agent {
    connected_agent_with(api, dir, cgroup, "")
}

/// `connected_agent` with config file `yaml`.
fn connected_agent_with(
    api: &FakeApi,
    dir: &Path,
    cgroup: &Path,
    yaml: &str,
) -> nodekeeper_tests::Agent {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    nodekeeper_tests::Agent::builder()
        .connected(&kubeconfig, "node-a")
        .config(yaml)
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start()
}

/// Waits until the agent's pod view has synced and its scaler names a pod of `app` (neither
/// NOT_FOUND nor UNAVAILABLE for an unsynced pod watch) and returns its answer.
fn first_answer(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    app: &str,
    extra: &[(&str, &str)],
) -> Result<f64, Status> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = agent_value(rt, addr, app, extra);
        let waiting = match &got {
            Err(s) => s.code() == tonic::Code::NotFound || s.message().contains("has not synced"),
            Ok(_) => false,
        };
        if !waiting {
            return got;
        }
        assert!(Instant::now() < deadline, "app={app} never named: {got:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A hostNetwork server pod (`gw-1`) whose listener has 5 established connections waiting in its
/// accept queue (it is overloaded: exactly when an autoscaler must see them). `ss` shows the 5
/// established sockets on its port; a pod with its own namespace has them counted in
/// `established` and in its inbound pool `*:PORT` (connections `full_accept_queues_...`). For a
/// hostNetwork pod the census keeps only sockets whose inode a pod process holds, and a
/// connection not yet accepted has no inode: `established` to `*:PORT` reads 0, with no error,
/// and KEDA scales the overloaded server in. (docs/connections.md names only TIME_WAIT and
/// request sockets as not attributable.)
#[test]
fn adversary18d_a_host_network_pods_queued_connections_are_not_counted_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let port = free_port();
    let pod = python(
        "gw-1",
        HOST_NETWORK_POD,
        &[port.to_string(), "0".into()],
        dir.path(),
    );
    let _clients = python(
        "clients",
        CLIENTS,
        &[port.to_string(), "5".into()],
        dir.path(),
    );
    assert_eq!(
        ss_established_on(port),
        5,
        "harness: 5 established connections wait in gw-1's accept queue"
    );
    pod_with_cgroup(
        &api,
        &cgroup,
        PodSeed::new("gw-1")
            .namespace("shop")
            .node("node-a")
            .label("app", "gw")
            .host_network(),
        pod.pid(),
    );
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();
    let inbound = format!("*:{port}");
    let queue = first_answer(
        &rt,
        &addr,
        "gw",
        &[("metric", "accept_queue"), ("port", &port.to_string())],
    );
    assert_eq!(
        queue.map_err(|s| s.to_string()),
        Ok(5.0),
        "the listener's queue is read (it is held by the pod)"
    );
    let got = agent_value(
        &rt,
        &addr,
        "gw",
        &[("metric", "established"), ("remote", &inbound)],
    );
    assert!(
        matches!(got, Ok(v) if v == 5.0) || code(&got) == Some(tonic::Code::Unavailable),
        "5 connections to gw-1's listener are established (in its accept queue): KEDA must get \
         5 or UNAVAILABLE for established {inbound}, never a silent smaller value; got {got:?}"
    );
}

/// A hostNetwork pod's own connections in TIME_WAIT (3, closed by the pod first) have no owner,
/// so the census reads `time_wait` 0 for it (a documented limit of the census, docs/connections.md
/// "Limits"). KEDA's `time_wait` metric over such a pod is then a silent 0, not an error: the
/// limit is not carried into the scaler (no refusal, no flag checked).
#[test]
fn adversary18d_time_wait_of_a_host_network_pod_reads_a_silent_zero_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let port = free_port();
    let pod = python(
        "tw-1",
        HOST_NETWORK_POD,
        &[port.to_string(), "3".into()],
        dir.path(),
    );
    let tw = Command::new("ss")
        .args(["-Htn", "state", "time-wait", "dst", "127.0.0.1"])
        .output()
        .expect("ss");
    let tw = String::from_utf8_lossy(&tw.stdout).lines().count();
    assert!(
        tw >= 3,
        "harness: tw-1's 3 loopback TIME_WAIT sockets, ss shows {tw}"
    );
    pod_with_cgroup(
        &api,
        &cgroup,
        PodSeed::new("tw-1")
            .namespace("shop")
            .node("node-a")
            .label("app", "tw")
            .host_network(),
        pod.pid(),
    );
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();
    let got = first_answer(&rt, &addr, "tw", &[("metric", "time_wait")]);
    assert!(
        matches!(got, Ok(v) if v >= 3.0) || code(&got) == Some(tonic::Code::Unavailable),
        "tw-1 closed 3 connections first (TIME_WAIT for 60 s): KEDA must get 3 or UNAVAILABLE \
         for time_wait, never a silent 0; got {got:?}"
    );
}

/// node-a runs web-1 (4 pool connections, its cgroup found) and web-2, Running on node-a per the
/// API and the agent's own (synced, current) pod view, whose cgroup the agent does not find
/// (a layout it does not read, a cgroup created late). The aggregator refuses exactly this
/// ("its census does not name selected pod shop/web-2"); the agent's own scaler must too. It
/// answers web-1's 4 instead.
#[test]
fn adversary18d_the_agents_scaler_sums_without_a_selected_pod_its_census_lacks_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
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
    // web-2: Running on node-a in the API, no cgroup the agent reads.
    api.add_pod(
        PodSeed::new("web-2")
            .namespace("shop")
            .node("node-a")
            .label("app", "web"),
    );
    // A probe added after web-2: once the scaler counts it, the pod view has web-2 as well.
    let _probe = pod("probe-1", "probe", 1);
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();
    let pool = [
        ("metric", "established"),
        ("remote", census_pods::POOL_REMOTE),
    ];
    let deadline = Instant::now() + WAIT;
    while !matches!(agent_value(&rt, &addr, "probe", &pool), Ok(v) if v == 1.0) {
        assert!(
            Instant::now() < deadline,
            "the probe never counted: {:?}",
            agent_value(&rt, &addr, "probe", &pool)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = agent_value(&rt, &addr, "web", &pool);
    assert!(
        matches!(got, Ok(v) if v > 4.0) || code(&got) == Some(tonic::Code::Unavailable),
        "web-2 runs on node-a (the agent's pod view has it) but the census does not name it: \
         KEDA must get UNAVAILABLE (as the aggregator answers), not web-1's 4; got {got:?}"
    );
}

/// web-1 (4 pool connections in its own network namespace) also runs a process in a private
/// network namespace of its own (a sandboxed helper: Chromium's sandbox, bubblewrap, a test
/// runner's `unshare -n`), listed before web-1's process in the pod's cgroup (cgroup v1 lists
/// PIDs sorted, v2 in attach order, container sub-cgroups in directory order: the pod does not
/// choose). The census reads the pod through "the first readable PID", assuming every process
/// shares the pod's namespace, so it counts the helper's empty namespace: KEDA gets 0 for the
/// pool, with no error, while web-1 holds 4 connections.
#[test]
fn adversary18d_a_pod_process_in_a_private_netns_hides_the_pods_connections_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let web_1 = census_pods::start(
        &api,
        &cgroup,
        dir.path(),
        "node-a",
        "shop",
        "web-1",
        &[("app", "web")],
        4,
        0,
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "sleep", "3600"]);
    let helper = Proc::spawn("sandboxed-helper", cmd, dir.path());
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    wait_for(
        Duration::from_secs(10),
        "the helper in its own netns",
        || {
            let (h, w) = (ns(helper.pid())?, ns(web_1.proc.pid())?);
            (h != w && Some(&h) != std::fs::read_link("/proc/self/ns/net").ok().as_ref())
                .then_some(())
        },
    );
    let procs = cgroup.join(format!("kubepods/besteffort/pod{}/cgroup.procs", web_1.uid));
    std::fs::write(&procs, format!("{}\n{}\n", helper.pid(), web_1.proc.pid())).unwrap();
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();
    let got = first_answer(
        &rt,
        &addr,
        "web",
        &[
            ("metric", "established"),
            ("remote", census_pods::POOL_REMOTE),
        ],
    );
    assert!(
        matches!(got, Ok(v) if v == 4.0) || code(&got) == Some(tonic::Code::Unavailable),
        "web-1 holds 4 connections to {}: KEDA must get 4 or UNAVAILABLE, never a silent 0 from \
         its helper's namespace; got {got:?}",
        census_pods::POOL_REMOTE
    );
}

/// A static pod's kubelet UID (the cgroup's `pod<UID>`): the hash of its manifest, 32 hex digits,
/// which the mirror pod in the API carries as its `kubernetes.io/config.mirror` annotation (the
/// mirror's own `metadata.uid` is the API server's).
const STATIC_POD_HASH: &str = "6f1c2a9b8e7d4c3b2a1f0e9d8c7b6a59";

/// A realistic trigger of the finding above: web-s is a static pod (kubelet manifest) on node-a,
/// labelled app=web like web-1. Its cgroup is `pod<manifest hash>`; the API knows it as its
/// mirror pod, with another UID. The census names pods by cgroup UID, so web-s's 6 connections
/// are never named; the agent's own scaler, which does not check that the census names every
/// selected pod of its pod view, answers web-1's 4. (The aggregator refuses the same census:
/// "its census does not name selected pod shop/web-s", for as long as the static pod runs.)
#[test]
fn adversary18d_a_static_pods_connections_are_left_out_by_the_agents_scaler_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let start = |ns: &str, name: &str, app: &str, pool: u32| {
        census_pods::start(
            &api,
            &cgroup,
            dir.path(),
            "node-a",
            ns,
            name,
            &[("app", app)],
            pool,
            0,
        )
    };
    let _web_1 = start("shop", "web-1", "web", 4);
    // web-s's process (6 connections), first registered as an unrelated pod, then moved to the
    // cgroup a static pod gets: `pod<manifest hash>`.
    let web_s = start("scratch", "web-s-process", "none", 6);
    let besteffort = cgroup.join("kubepods/besteffort");
    std::fs::rename(
        besteffort.join(format!("pod{}", web_s.uid)),
        besteffort.join(format!("pod{STATIC_POD_HASH}")),
    )
    .unwrap();
    api.add_pod(
        PodSeed::new("web-s-node-a")
            .namespace("shop")
            .node("node-a")
            .label("app", "web")
            .mirror()
            .annotation("kubernetes.io/config.mirror", STATIC_POD_HASH),
    );
    let _probe = start("shop", "probe-1", "probe", 1);
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();
    let pool = [
        ("metric", "established"),
        ("remote", census_pods::POOL_REMOTE),
    ];
    let deadline = Instant::now() + WAIT;
    while !matches!(agent_value(&rt, &addr, "probe", &pool), Ok(v) if v == 1.0) {
        assert!(
            Instant::now() < deadline,
            "the probe never counted: {:?}",
            agent_value(&rt, &addr, "probe", &pool)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = agent_value(&rt, &addr, "web", &pool);
    assert!(
        matches!(got, Ok(v) if v == 10.0) || code(&got) == Some(tonic::Code::Unavailable),
        "web-1 (4) and the static pod web-s (6) run on node-a: KEDA must get 10 or UNAVAILABLE, \
         not 4; got {got:?}"
    );
}

/// A pod in its own namespace whose client is a dual-stack (AF_INET6) socket, as a JVM's by
/// default: 4 connections to `::ffff:127.0.0.1:5432` (an IPv4 server, a listener on `[::]:5432`
/// in the pod). Prints "ready".
const DUAL_STACK_POD: &str = r#"
import socket, subprocess, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", 5432))
srv.listen(64)
clients = []
for _ in range(4):
    c = socket.socket(socket.AF_INET6)
    c.connect(("::ffff:127.0.0.1", 5432))
    clients.append(c)
accepted = [srv.accept()[0] for _ in range(4)]
print("ready", flush=True)
time.sleep(3600)
"#;

/// The docs promise that a dual-stack socket's IPv4-mapped peer is named by its IPv4 address
/// (`remote` `10.0.3.7:5432` and `[::ffff:10.0.3.7]:5432` are the same pool), and the query
/// parser normalises to the IPv4 form. The sock_diag and procfs readers normalise; the one-pass
/// BPF reader (the default) keeps `[::ffff:127.0.0.1]:5432`, so a JVM pod's pool to its
/// database reads 0 through the default reader, with no error.
#[test]
fn adversary18d_an_ipv4_mapped_peer_is_one_pool_through_every_reader_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let mut wrong = Vec::new();
    for source in ["sockDiag", "bpf"] {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let api = FakeApi::start();
        api.add_node("node-a", &[]);
        let cgroup = dir.path().join("cgroup");
        let mut cmd = Command::new("unshare");
        cmd.args(["-n", "python3", "-c", DUAL_STACK_POD]);
        let pod = Proc::spawn("dual-stack-pod", cmd, dir.path());
        wait_for(Duration::from_secs(20), "dual-stack pod ready", || {
            let log = pod.log_text();
            assert!(!log.contains("Traceback"), "pod failed:\n{log}");
            log.contains("ready").then_some(())
        });
        pod_with_cgroup(
            &api,
            &cgroup,
            PodSeed::new("jvm-1")
                .namespace("shop")
                .node("node-a")
                .label("app", "jvm"),
            pod.pid(),
        );
        let agent = connected_agent_with(
            &api,
            dir.path(),
            &cgroup,
            &format!("metrics:\n  connections:\n    source: {source}\n"),
        );
        let addr = agent.api.to_string();
        let inbound = first_answer(
            &rt,
            &addr,
            "jvm",
            &[("metric", "established"), ("remote", "*:5432")],
        );
        assert_eq!(
            inbound.map_err(|s| s.to_string()),
            Ok(4.0),
            "{source}: harness, 4 inbound connections"
        );
        for remote in ["127.0.0.1:5432", "[::ffff:127.0.0.1]:5432"] {
            let got = agent_value(
                &rt,
                &addr,
                "jvm",
                &[("metric", "established"), ("remote", remote)],
            );
            if !(matches!(got, Ok(v) if v == 4.0) || code(&got) == Some(tonic::Code::Unavailable)) {
                wrong.push(format!("{source} remote {remote}: {got:?}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "jvm-1 holds 4 connections to ::ffff:127.0.0.1:5432 (the pool 127.0.0.1:5432): KEDA must \
         get 4 or UNAVAILABLE through every reader; got {wrong:?}"
    );
}

// === lastKnownFor across an aggregator restart (end to end, fake agents) ===

/// `established` over `app=web` in `shop` with `lastKnownFor: 3600`, as KEDA asks `addr`.
fn keda_last_known(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
) -> Result<f64, Status> {
    keda_value(rt, addr, web_query("shop", &[("lastKnownFor", "3600")]))
}

/// node-b's agent answered (web-2: 6), then its census fails. The aggregator that saw it counts
/// its last census under `lastKnownFor` (4 + 6 = 10). An aggregator restarted meanwhile (a
/// rollout, an OOM kill) has never seen node-b's census: it must not answer 4 (node-a alone),
/// but UNAVAILABLE until node-b answers. Held: last censuses live in memory only.
#[test]
fn adversary18d_last_known_for_does_not_survive_an_aggregator_restart_as_a_smaller_sum() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, _) =
        start_changeable_fake_agent(&rt, "node-a", vec![census_pod("shop", "web-1", "uid-1", 4)]);
    let (b, b_snapshot) =
        start_changeable_fake_agent(&rt, "node-b", vec![census_pod("shop", "web-2", "uid-2", 6)]);
    let agents = format!("{a},{b}");
    let first = start_open_aggregator(dir.path(), &["--agents", &agents], None);
    until(&first, "KEDA gets 10", || {
        keda_last_known(&rt, first.grpc).ok().filter(|v| *v == 10.0)
    });
    b_snapshot.lock().unwrap().unavailable = vec!["connections".into()];
    // The first aggregator now counts node-b through its last census (the policy at work).
    until(&first, "node-b missing, counted by its last census", || {
        get_fleet_plaintext(&rt, first.grpc)
            .ok()
            .filter(|f| f.stale == 1)
            .and_then(|_| keda_last_known(&rt, first.grpc).ok())
            .filter(|v| *v == 10.0)
    });
    drop(first);
    let second = start_open_aggregator(dir.path(), &["--agents", &agents], None);
    let fleet = until(&second, "a fan-out with node-b's census failing", || {
        get_fleet_plaintext(&rt, second.grpc)
            .ok()
            .filter(|f| f.answered == 1 && f.missing + f.stale == 1)
    });
    let got = keda_last_known(&rt, second.grpc);
    assert_eq!(
        code(&got),
        Some(tonic::Code::Unavailable),
        "the restarted aggregator has no census of node-b: KEDA must get UNAVAILABLE, not 4; got \
         {got:?}; fleet {fleet:?}"
    );
}

// === pins full under a burst of distinct remotes (end to end, fake agent) ===

/// `established` to `remote` over `app=web` in `shop`, as KEDA asks `addr`.
fn keda_remote(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    remote: &str,
) -> Result<f64, Status> {
    keda_value(rt, addr, web_query("shop", &[("remote", remote)]))
}

/// A burst of ScaledObjects naming 256 distinct remotes within a minute fills the aggregator's
/// pins (256, none idle for 2 minutes). The next new remote cannot be pinned: its pool may be
/// folded into `other`, so it must be refused (RESOURCE_EXHAUSTED naming the remote), never
/// read as a folded 0; the database pool pinned first keeps its exact value (7).
#[test]
fn adversary18d_a_burst_of_distinct_remotes_is_refused_not_read_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = "10.0.0.5:5432";
    let web = pb::PodConnections {
        pools: vec![pb::ConnectionPool {
            remote: db.into(),
            established: 7,
            ..Default::default()
        }],
        ..census_pod("shop", "web-1", "uid-1", 7)
    };
    let (a, _) = start_changeable_fake_agent(&rt, "node-a", vec![web]);
    let agg = start_open_aggregator(dir.path(), &["--agents", &a.to_string()], None);
    until(&agg, "KEDA gets the db pool's 7", || {
        keda_remote(&rt, agg.grpc, db).ok().filter(|v| *v == 7.0)
    });
    let mut refused = None;
    for i in 0..300u32 {
        let remote = format!("10.1.{}.{}:80", i / 200, i % 200 + 1);
        match keda_remote(&rt, agg.grpc, &remote) {
            Ok(v) => assert!(
                i < 255 && v == 0.0,
                "remote #{i} {remote}: no pod holds a connection to it, and only 255 more fit \
                 beside the db pool; got {v}"
            ),
            Err(s) => {
                refused = Some((i, remote, s));
                break;
            }
        }
    }
    let (i, remote, status) = refused.expect("the 257th remote is refused");
    assert_eq!(i, 255, "255 fit beside the db pool: {status:?}");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(&remote), "{status:?}");
    assert_eq!(
        keda_remote(&rt, agg.grpc, db).map_err(|s| s.to_string()),
        Ok(7.0)
    );
}

// === an agent pod replaced on the same node mid-fan-out (end to end) ===

/// A rollout replaces node-a's agent: the EndpointSlices list the old pod and the new one (two
/// slices, two ports) for a while. The old agent's census names web-1 (4) and web-2 (6); the new
/// one's pod view is synced but behind and names web-1 only. One census per node counts (the
/// newest): whichever it is, KEDA must get 10 or UNAVAILABLE, never 4; and 10 once the new
/// agent names web-2 too.
#[test]
fn adversary18d_an_agent_replaced_on_its_node_never_yields_a_smaller_sum() {
    use nodekeeper_tests::fake_api::EndpointSeed;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let uid_of = |pod: serde_json::Value| pod["metadata"]["uid"].as_str().unwrap().to_string();
    let web = |name: &str| {
        PodSeed::new(name)
            .namespace("shop")
            .node("node-a")
            .label("app", "web")
    };
    let (u1, u2) = (
        uid_of(api.add_pod(web("web-1"))),
        uid_of(api.add_pod(web("web-2"))),
    );
    let both = vec![
        census_pod("shop", "web-1", &u1, 4),
        census_pod("shop", "web-2", &u2, 6),
    ];
    let (old, _) = start_changeable_fake_agent(&rt, "node-a", both.clone());
    let (new, new_snapshot) =
        start_changeable_fake_agent(&rt, "node-a", vec![census_pod("shop", "web-1", &u1, 4)]);
    for (addr, pod) in [(old, "nodekeeper-old"), (new, "nodekeeper-new")] {
        api.add_endpoint_slice(
            "nodekeeper-system",
            "nodekeeper",
            &[("grpc", addr.port())],
            &[EndpointSeed::new("127.0.0.1").node("node-a").pod(pod)],
        );
    }
    let agg = start_open_aggregator(
        dir.path(),
        &["--service", "nodekeeper-system/nodekeeper"],
        Some(&kubeconfig),
    );
    until(
        &agg,
        "both agents of node-a answer, one superseding the other",
        || {
            get_fleet_plaintext(&rt, agg.grpc)
                .ok()
                .filter(|f| f.agents.len() == 2 && f.duplicates == 1 && f.answered == 1)
        },
    );
    let web_value = |rt: &tokio::runtime::Runtime| {
        rt.block_on(census_pods::get_metrics(
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
        .map(|r| r.metric_values[0].metric_value_float)
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut wrong = Vec::new();
    while Instant::now() < deadline {
        let got = web_value(&rt);
        if !(matches!(got, Ok(v) if v == 10.0) || code(&got) == Some(tonic::Code::Unavailable)) {
            wrong.push(format!("{got:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        wrong.is_empty(),
        "web-1 (4) and web-2 (6) run on node-a: KEDA must get 10 or UNAVAILABLE; got {wrong:?}"
    );
    new_snapshot.lock().unwrap().connections = both;
    until(&agg, "KEDA gets 10 once the new agent names web-2", || {
        web_value(&rt).ok().filter(|v| *v == 10.0)
    });
}
