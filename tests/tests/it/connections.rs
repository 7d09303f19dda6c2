//! The per-pod connection census against real sockets in real network namespaces standing in
//! for pods (`netns_pods`), found by the agent through a fake kubelet cgroup tree
//! (`cgroup::KubeletTree`) that lists the PIDs of the holder processes keeping those sockets.
//!
//! Each test first proves with `ss` (and the namespace's /proc/net/netstat) that the harness
//! built exactly what it asked for, then asserts the agent's exact counts per pod, state and
//! remote over gRPC `GetMetrics`, the `nodekeeper connections` CLI or /metrics. Every test needs
//! root and `ip` (namespaces, veth links, setns) and says so in its name.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use nodekeeper::metrics::connections::census::Fallback;
use nodekeeper::metrics::connections::{Census, NetnsReading, Source, SourcePreference, TcpState};
use nodekeeper::pb::{self, node_agent_client::NodeAgentClient};
use nodekeeper_tests::cgroup::{KubeletTree, Layout};
use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
use nodekeeper_tests::netns_pods::{Holder, Netns, SsTable, link, port_range, route_any_ip};
use nodekeeper_tests::{Agent, agent_bin, free_port, require_root, require_tool, sample, wait_for};
use serde_json::{Value, json};

const UID_A: &str = "0a0a0a0a-1111-4222-8333-444455556666";
const UID_B: &str = "0b0b0b0b-1111-4222-8333-444455556666";
const UID_C: &str = "0c0c0c0c-1111-4222-8333-444455556666";
const UID_E: &str = "0e0e0e0e-1111-4222-8333-444455556666";
/// The idle threshold the tests configure: silent connections cross it, ticking ones never do.
const IDLE_AFTER: &str = "1s";
/// How long a test waits after its holders are ready before reading: past IDLE_AFTER with a
/// margin, so every silent connection counts as idle.
const SETTLE: Duration = Duration::from_millis(1600);
/// Every gRPC call of these tests.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// The pod namespaces' own ephemeral range, unlike the host's, so the census must read theirs.
const POD_PORT_RANGE: (u16, u16) = (40000, 49999);

/// How a test's agent reads sockets: `metrics.connections.source`, whether `bpf(2)` is refused
/// (as a runtime's seccomp profile would), and the reader GetMetrics then reports.
#[derive(Debug, Clone, Copy)]
struct Reader {
    config: &'static str,
    deny_bpf: bool,
    reported: &'static str,
}

/// The agent's two exact readers: the one-pass BPF census, and the per-namespace sock_diag
/// census that `auto` falls back to when bpf() is refused. Every comparison with `ss` runs
/// through both, so the default reader and its fallback agree socket for socket.
#[cfg(target_arch = "x86_64")]
const READERS: [Reader; 2] = [
    Reader {
        config: "bpf",
        deny_bpf: false,
        reported: "bpf",
    },
    Reader {
        config: "auto",
        deny_bpf: true,
        reported: "sock_diag",
    },
];
/// No seccomp filter for this architecture here: the fallback's reader is configured instead.
#[cfg(not(target_arch = "x86_64"))]
const READERS: [Reader; 2] = [
    Reader {
        config: "bpf",
        deny_bpf: false,
        reported: "bpf",
    },
    Reader {
        config: "sockDiag",
        deny_bpf: false,
        reported: "sock_diag",
    },
];

fn can_run() -> bool {
    require_root() && require_tool("ip") && require_tool("ss")
}

/// Agent config: the fake kubelet tree, a fresh snapshot on every read, idleAfter 1s.
fn config(tree: &KubeletTree, extra: &str) -> String {
    format!(
        "hostPaths:\n  cgroup: {}\nmetrics:\n  maxSnapshotAge: 0s\n  connections:\n    idleAfter: {IDLE_AFTER}\n{extra}",
        tree.root().display()
    )
}

/// An agent on `tree` reading sockets as `reader` says.
fn agent_reading(tree: &KubeletTree, reader: Reader) -> Agent {
    let builder =
        Agent::builder().config(&config(tree, &format!("    source: {}\n", reader.config)));
    if reader.deny_bpf {
        #[cfg(target_arch = "x86_64")]
        return builder.pre_exec(deny_bpf).start();
    }
    builder.start()
}

/// GetMetrics (connections included, pods excluded) from a blocking test.
fn get_metrics(agent: &Agent) -> pb::MetricsSnapshot {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(RPC_TIMEOUT, async {
            let mut c = NodeAgentClient::connect(agent.grpc_url())
                .await
                .unwrap_or_else(|e| panic!("connect {}: {e}", agent.grpc_url()));
            c.get_metrics(pb::GetMetricsRequest {
                exclude_pods: true,
                exclude_connections: false,
                ..Default::default()
            })
            .await
            .expect("GetMetrics")
            .into_inner()
        })
        .await
        .expect("GetMetrics timed out")
    })
}

/// The census of pod `uid`, failing with the whole list when it is missing.
fn pod(snap: &pb::MetricsSnapshot, uid: &str) -> pb::PodConnections {
    snap.connections
        .iter()
        .find(|p| p.uid == uid)
        .cloned()
        .unwrap_or_else(|| panic!("no census for pod {uid}: {:#?}", snap.connections))
}

fn states(p: &pb::PodConnections) -> BTreeMap<String, u64> {
    p.tcp_states.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// (remote, established, active, idle, remotes) of each pool, in the order reported.
fn pools(p: &pb::PodConnections) -> Vec<(String, u64, u64, u64, u64)> {
    p.pools
        .iter()
        .map(|x| (x.remote.clone(), x.established, x.active, x.idle, x.remotes))
        .collect()
}

fn listeners(p: &pb::PodConnections) -> Vec<(String, u32, u64, u64)> {
    p.listeners
        .iter()
        .map(|l| (l.address.clone(), l.port, l.accept_queue, l.backlog))
        .collect()
}

/// A pod namespace linked to `srv` on 10.77.`subnet`.0/24, with its own ephemeral port range.
fn pod_ns(tag: &str, srv: &Netns, subnet: u8) -> (Netns, String, String) {
    let ns = Netns::new(tag);
    ns.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", POD_PORT_RANGE.0, POD_PORT_RANGE.1),
    );
    let (srv_ip, pod_ip) = link(srv, &ns, subnet);
    (ns, srv_ip, pod_ip)
}

/// Pod A: purely outbound pools (37 to :5432 of which 10 active, 5 to :6379 of which 2 active),
/// 4 TIME_WAIT sockets, 3 UDP sockets. Returns the holders (server first) to keep alive.
fn pod_a(srv: &Netns, subnet: u8) -> (Netns, String, Vec<Holder>) {
    let (ns, srv_ip, _) = pod_ns("a", srv, subnet);
    let server = Holder::start(
        Some(srv),
        &json!({"serve": [{"addr": srv_ip, "port": 5432}, {"addr": srv_ip, "port": 6379}]}),
    );
    let client = Holder::start(
        Some(&ns),
        &json!({
            "connect": [
                {"addr": srv_ip, "port": 5432, "count": 37, "active": 10},
                {"addr": srv_ip, "port": 6379, "count": 5, "active": 2},
            ],
            "time_wait": 4,
            "udp": 3,
        }),
    );
    (ns, srv_ip, vec![server, client])
}

/// The harness made pod A as asked.
fn check_pod_a_harness(ss: &SsTable, srv_ip: &str) {
    assert_eq!(
        ss.tcp_states(),
        map(&[("established", 42), ("time_wait", 4)]),
        "{ss:#?}"
    );
    assert_eq!(ss.established_to(&format!("{srv_ip}:5432")), 37);
    assert_eq!(ss.established_to(&format!("{srv_ip}:6379")), 5);
    assert_eq!(ss.udp_count(), 3);
}

/// Pod B: three listeners (backlogs 2, 3, 4) that never accept, their accept queues filled to
/// the kernel's limit (backlog + 1) from the server namespace, and 3 more connects to :8080
/// dropped by the full queue (ListenOverflows 3).
fn pod_b(srv: &Netns, subnet: u8) -> (Netns, Vec<Holder>) {
    let (ns, _, pod_ip) = pod_ns("b", srv, subnet);
    let server = Holder::start(
        Some(&ns),
        &json!({"listen": [
            {"addr": "0.0.0.0", "port": 8080, "backlog": 2},
            {"addr": "0.0.0.0", "port": 8081, "backlog": 3},
            {"addr": "0.0.0.0", "port": 8082, "backlog": 4},
        ]}),
    );
    let clients = Holder::start(
        Some(srv),
        &json!({"fill": [
            {"addr": pod_ip, "port": 8080, "count": 3, "overflow": 3},
            {"addr": pod_ip, "port": 8081, "count": 4},
            {"addr": pod_ip, "port": 8082, "count": 5},
        ]}),
    );
    (ns, vec![server, clients])
}

fn check_pod_b_harness(ns: &Netns) {
    let ss = ns.ss();
    assert_eq!(
        ss.tcp_states(),
        map(&[("established", 12), ("listen", 3)]),
        "{ss:#?}"
    );
    let mut l = ss.listeners();
    l.sort();
    assert_eq!(
        l,
        vec![
            ("0.0.0.0:8080".into(), 3, 2),
            ("0.0.0.0:8081".into(), 4, 3),
            ("0.0.0.0:8082".into(), 5, 4),
        ],
        "ss: accept queue (Recv-Q) is backlog + 1 when full, Send-Q is the backlog"
    );
    assert_eq!(ns.tcp_ext("ListenOverflows"), 3);
    assert_eq!(ns.tcp_ext("ListenDrops"), 3);
}

// === the harness itself ===

#[test]
fn harness_holders_make_exactly_the_sockets_asked_for_as_root() {
    if !can_run() {
        return;
    }
    let srv = Netns::new("srv");
    let (a, srv_ip, _ha) = pod_a(&srv, 0);
    let (b, _hb) = pod_b(&srv, 1);
    check_pod_a_harness(&a.ss(), &srv_ip);
    check_pod_b_harness(&b);
    assert_eq!(port_range(&a), POD_PORT_RANGE);
    // Nothing leaked into the server namespace's view of the pods, and back.
    assert_eq!(srv.ss().tcp_states()["listen"], 2);
    let name = a.name().to_string();
    drop(a);
    assert!(
        !std::path::Path::new(&format!("/run/netns/{name}")).exists(),
        "the namespace is deleted on drop"
    );
}

// === gRPC GetMetrics ===

#[test]
fn outbound_pools_time_wait_udp_and_idle_split_are_exact_per_pod_as_root() {
    if !can_run() {
        return;
    }
    for reader in READERS {
        let srv = Netns::new("srv");
        let (a, srv_ip, holders) = pod_a(&srv, 0);
        let tree = KubeletTree::new(Layout::SystemdV2);
        tree.add_pod("burstable", UID_A, &[holders[1].pid()]);
        let agent = agent_reading(&tree, reader);
        std::thread::sleep(SETTLE);

        let ss = a.ss();
        check_pod_a_harness(&ss, &srv_ip);
        let snap = get_metrics(&agent);
        let p = pod(&snap, UID_A);
        assert_eq!(p.error, "", "{p:#?}");
        assert_eq!(p.source, reader.reported, "{reader:?}");
        assert!(!p.host_network);
        assert_eq!(p.netns, a.id());
        assert_eq!(
            states(&p),
            map(&[("established", 42), ("time_wait", 4)]),
            "{p:#?}"
        );
        assert_eq!(p.established, 42);
        assert_eq!(
            pools(&p),
            vec![
                (format!("{srv_ip}:5432"), 37, 10, 27, 1),
                (format!("{srv_ip}:6379"), 5, 2, 3, 1),
            ],
            "(remote, established, active, idle, remotes), largest first; idleAfter {IDLE_AFTER}"
        );
        assert!(p.listeners.is_empty(), "{:?}", p.listeners);
        assert_eq!(p.udp_sockets, 3);
        assert_eq!(
            (p.ephemeral_port_low, p.ephemeral_port_high),
            (u32::from(POD_PORT_RANGE.0), u32::from(POD_PORT_RANGE.1)),
            "the pod namespace's own ip_local_port_range"
        );
        assert_eq!(
            p.ephemeral_ports_in_use,
            ss.ephemeral_ports_in_use(POD_PORT_RANGE.0, POD_PORT_RANGE.1),
            "distinct local ports in range of non-listening sockets (ss: {ss:#?})"
        );
        assert!(p.ephemeral_ports_in_use > 0);
        assert_eq!((p.listen_overflows, p.listen_drops), (0, 0));
        assert!(
            p.rtt_mean_seconds > 0.0 && p.rtt_max_seconds >= p.rtt_mean_seconds,
            "rtt mean {} max {}",
            p.rtt_mean_seconds,
            p.rtt_max_seconds
        );
        assert!(p.deletion_timestamp.is_none() && p.open_after_deletion == 0);
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("", ""),
            "standalone: no names"
        );
        assert_eq!(snap.connections.len(), 1, "one pod in the tree");

        // exclude_connections leaves them out.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let without = rt.block_on(async {
            let mut c = NodeAgentClient::connect(agent.grpc_url()).await.unwrap();
            c.get_metrics(pb::GetMetricsRequest {
                exclude_pods: true,
                exclude_connections: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        });
        assert!(without.connections.is_empty());
    }
}

#[test]
fn full_accept_queues_backlogs_and_listen_overflows_are_exact_as_root() {
    if !can_run() {
        return;
    }
    for reader in READERS {
        let srv = Netns::new("srv");
        let (b, holders) = pod_b(&srv, 1);
        let tree = KubeletTree::new(Layout::CgroupfsV2);
        tree.add_pod("guaranteed", UID_B, &[holders[0].pid()]);
        let agent = agent_reading(&tree, reader);
        std::thread::sleep(SETTLE);
        check_pod_b_harness(&b);

        let p = pod(&get_metrics(&agent), UID_B);
        assert_eq!(p.error, "", "{p:#?}");
        assert_eq!(p.source, reader.reported, "{reader:?}");
        assert_eq!(
            states(&p),
            map(&[("established", 12), ("listen", 3)]),
            "{p:#?}"
        );
        assert_eq!(
            listeners(&p),
            vec![
                ("0.0.0.0:8082".into(), 8082, 5, 4),
                ("0.0.0.0:8081".into(), 8081, 4, 3),
                ("0.0.0.0:8080".into(), 8080, 3, 2),
            ],
            "(address, port, accept_queue, backlog), largest queue first: a full queue holds backlog + 1"
        );
        assert_eq!(
            (p.listen_overflows, p.listen_drops),
            (3, 3),
            "one ListenOverflows (and ListenDrops) per SYN the full :8080 queue dropped"
        );
        // Connections waiting in the accept queues are inbound pools keyed by the local port; they
        // never sent a byte, so they are idle.
        let inbound: Vec<_> = pools(&p)
            .into_iter()
            .map(|(r, e, a, i, _)| (r, e, a, i))
            .collect();
        assert_eq!(
            inbound,
            vec![
                ("*:8082".into(), 5, 0, 5),
                ("*:8081".into(), 4, 0, 4),
                ("*:8080".into(), 3, 0, 3),
            ]
        );
        // proto: "Distinct remotes summed into this pool: 1, or more for "other" and inbound pools".
        let remotes: Vec<_> = p
            .pools
            .iter()
            .map(|x| (x.remote.clone(), x.remotes))
            .collect();
        assert_eq!(
            remotes,
            vec![
                ("*:8082".to_string(), 5),
                ("*:8081".to_string(), 4),
                ("*:8080".to_string(), 3),
            ],
            "an inbound pool sums its distinct remote address:port pairs (each client is one)"
        );
        assert_eq!(
            p.ephemeral_ports_in_use, 0,
            "only ports 8080-8082 are local"
        );
    }
}

#[test]
fn host_network_pod_counts_only_the_sockets_its_processes_hold_as_root() {
    if !can_run() {
        return;
    }
    for reader in READERS {
        // The test's own namespace is the host's: loopback only, a free high port.
        let port = free_port();
        let holder = Holder::start(
            None,
            &json!({
                "serve": [{"addr": "127.0.0.1", "port": port, "backlog": 64}],
                "connect": [{"addr": "127.0.0.1", "port": port, "count": 6}],
                "udp": 2,
            }),
        );
        let tree = KubeletTree::new(Layout::CgroupfsV1Pids);
        tree.add_pod("besteffort", UID_C, &[holder.pid()]);
        let agent = agent_reading(&tree, reader);
        // Other sockets of the host namespace that the pod does not hold: must not be counted.
        let _noise = std::net::TcpStream::connect(agent.metrics).unwrap();

        let p = pod(&get_metrics(&agent), UID_C);
        assert_eq!(p.error, "", "{p:#?}");
        assert_eq!(p.source, reader.reported, "{reader:?}");
        assert!(p.host_network, "{p:#?}");
        let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(p.netns, host_ns.to_string_lossy());
        assert_eq!(
            states(&p),
            map(&[("established", 12), ("listen", 1)]),
            "6 outbound + 6 accepted connections and the listener, nothing else of the host: {p:#?}"
        );
        let remotes: BTreeSet<_> = pools(&p).into_iter().map(|(r, e, ..)| (r, e)).collect();
        assert_eq!(
            remotes,
            BTreeSet::from([(format!("*:{port}"), 6), (format!("127.0.0.1:{port}"), 6)])
        );
        assert_eq!(
            listeners(&p),
            vec![(format!("127.0.0.1:{port}"), u32::from(port), 0, 64)]
        );
        assert_eq!(
            p.udp_sockets, 2,
            "the hostNetwork pod holds 2 UDP sockets (filtered by inode like TCP)"
        );
    }
}

#[test]
fn connected_agent_names_pods_and_reports_connections_open_after_deletion_as_root() {
    if !can_run() {
        return;
    }
    const NODE: &str = "node-a";
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    let live = api.add_pod(
        PodSeed::new("api-1")
            .namespace("shop")
            .node(NODE)
            .label("app", "api"),
    );
    let leaving = api.add_pod(
        PodSeed::new("api-2")
            .namespace("shop")
            .node(NODE)
            .label("app", "api")
            .grace_period(600),
    );
    let uid = |p: &Value| p["metadata"]["uid"].as_str().unwrap().to_string();
    let (live_uid, leaving_uid) = (uid(&live), uid(&leaving));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);

    let srv = Netns::new("srv");
    let (ns1, srv1, _) = pod_ns("live", &srv, 2);
    let (ns2, srv2, _) = pod_ns("leaving", &srv, 3);
    let _server = Holder::start(
        Some(&srv),
        &json!({"serve": [{"addr": srv1, "port": 5432}, {"addr": srv2, "port": 5432}]}),
    );
    let h1 = Holder::start(
        Some(&ns1),
        &json!({"connect": [{"addr": srv1, "port": 5432, "count": 3}]}),
    );
    let h2 = Holder::start(
        Some(&ns2),
        &json!({"connect": [{"addr": srv2, "port": 5432, "count": 4}]}),
    );
    let tree = KubeletTree::new(Layout::SystemdV1Memory);
    tree.add_pod("burstable", &live_uid, &[h1.pid()]);
    tree.add_pod("burstable", &leaving_uid, &[h2.pid()]);
    let agent = Agent::builder()
        .connected(&kubeconfig, NODE)
        .config(&config(&tree, ""))
        .start();

    let named = wait_for(Duration::from_secs(10), "pods named from the watch", || {
        let snap = get_metrics(&agent);
        (pod(&snap, &live_uid).name == "api-1").then_some(snap)
    });
    for (uid, name, n) in [(&live_uid, "api-1", 3), (&leaving_uid, "api-2", 4)] {
        let p = pod(&named, uid);
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", name));
        assert_eq!(
            p.labels.get("app").map(String::as_str),
            Some("api"),
            "{p:#?}"
        );
        assert_eq!(p.established, n);
        assert!(p.deletion_timestamp.is_none() && p.open_after_deletion == 0);
    }

    // DELETE with the pod's 600 s grace period: terminating, its pool still open.
    let (status, body) = http_request(api.addr(), "DELETE", "/api/v1/namespaces/shop/pods/api-2");
    assert!(status == 200 || status == 202, "DELETE: {status} {body}");
    let snap = wait_for(
        Duration::from_secs(10),
        "deletionTimestamp seen by the census",
        || {
            let snap = get_metrics(&agent);
            pod(&snap, &leaving_uid)
                .deletion_timestamp
                .is_some()
                .then_some(snap)
        },
    );
    let p = pod(&snap, &leaving_uid);
    assert_eq!(
        p.open_after_deletion, 4,
        "connections still open after the deletion timestamp: {p:#?}"
    );
    let live = pod(&snap, &live_uid);
    assert!(live.deletion_timestamp.is_none() && live.open_after_deletion == 0);

    // The pool drains: the holder closes its connections.
    h2.stop();
    wait_for(Duration::from_secs(10), "the drained pool", || {
        let p = pod(&get_metrics(&agent), &leaving_uid);
        (p.open_after_deletion == 0 || !p.error.is_empty()).then_some(())
    });
}

/// A bodiless HTTP/1.0 request: (status, body).
fn http_request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer fake-token\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

#[test]
fn every_kubelet_cgroup_layout_leads_to_the_pod_namespace_as_root() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("layout");
    let holder = Holder::start(
        Some(&ns),
        &json!({"listen": [{"addr": "127.0.0.1", "port": 9000, "backlog": 7}], "udp": 1}),
    );
    for layout in Layout::ALL {
        for qos in ["guaranteed", "burstable"] {
            let tree = KubeletTree::new(layout);
            tree.add_pod(qos, UID_A, &[holder.pid()]);
            if matches!(layout, Layout::CgroupfsV1Pids) {
                // cgroup v1 repeats the tree under every controller: still one pod.
                let dup = tree
                    .root()
                    .join("memory")
                    .join(Layout::CgroupfsV2.pod_path(qos, UID_A))
                    .join("c1/cgroup.procs");
                std::fs::create_dir_all(dup.parent().unwrap()).unwrap();
                std::fs::write(&dup, format!("{}\n", holder.pid())).unwrap();
            }
            let agent = Agent::builder().config(&config(&tree, "")).start();
            let snap = get_metrics(&agent);
            assert_eq!(
                snap.connections.len(),
                1,
                "{layout:?}/{qos}: {:#?}",
                snap.connections
            );
            let p = pod(&snap, UID_A);
            assert_eq!(p.netns, ns.id(), "{layout:?}/{qos}: {p:#?}");
            assert_eq!(
                listeners(&p),
                vec![("127.0.0.1:9000".into(), 9000, 0, 7)],
                "{layout:?}/{qos}"
            );
            assert_eq!(p.udp_sockets, 1, "{layout:?}/{qos}");
        }
    }
}

// === bpf() refused: the agent falls back and says why ===

/// Refuses `bpf(2)` with EPERM in the calling process and what it execs: what a seccomp
/// profile does to the agent. Runs between fork and exec (no allocation, no panic).
#[cfg(target_arch = "x86_64")]
fn deny_bpf() -> std::io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        f(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        f(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        f(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        f(JEQ_K, 0, 1, libc::SYS_bpf as u32),
        f(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
        f(RET_K, 0, 0, RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prctl with a filter that outlives the call.
    let ok = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const libc::sock_fprog) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn without_bpf_the_agent_counts_with_sock_diag_and_says_why_in_metrics_and_log_as_root() {
    if !can_run() {
        return;
    }
    let srv = Netns::new("srv");
    let (a, srv_ip, holders) = pod_a(&srv, 0);
    let tree = KubeletTree::new(Layout::SystemdV2);
    tree.add_pod("burstable", UID_A, &[holders[1].pid()]);
    let refused = Agent::builder()
        .config(&config(&tree, ""))
        .pre_exec(deny_bpf)
        .start();
    let allowed = Agent::builder().config(&config(&tree, "")).start();
    std::thread::sleep(SETTLE);
    check_pod_a_harness(&a.ss(), &srv_ip);
    for (agent, reader) in [(&refused, "sock_diag"), (&allowed, "bpf")] {
        // Two collections: the fallback is counted per collection, logged once.
        for _ in 0..2 {
            let p = pod(&get_metrics(agent), UID_A);
            assert_eq!(
                (p.error.as_str(), p.source.as_str()),
                ("", reader),
                "{p:#?}"
            );
            assert_eq!(
                states(&p),
                map(&[("established", 42), ("time_wait", 4)]),
                "{reader}: {p:#?}"
            );
        }
        let text = agent.metrics_text();
        let gauge = |s: &str| {
            sample(
                &text,
                "nodekeeper_connections_census_source",
                &[("source", s)],
            )
        };
        assert_eq!(gauge(reader), Some(1.0), "{text}");
        assert_eq!(
            gauge(if reader == "bpf" { "sock_diag" } else { "bpf" }),
            Some(0.0)
        );
        let fallbacks = sample(
            &text,
            "nodekeeper_connections_census_fallbacks_total",
            &[("reason", "bpf_unavailable")],
        );
        if reader == "bpf" {
            assert_eq!(fallbacks, Some(0.0), "{text}");
        } else {
            assert!(fallbacks.is_some_and(|n| n >= 2.0), "{text}");
        }
    }
    let log = refused.proc.log_text();
    let lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains("connection census fallback"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once: {log}");
    assert!(
        lines[0].contains("bpf_unavailable") && lines[0].contains("Operation not permitted"),
        "the reason, with the kernel's answer: {}",
        lines[0]
    );
    assert!(
        !allowed
            .proc
            .log_text()
            .contains("connection census fallback"),
        "{}",
        allowed.proc.log_text()
    );
}

// === CLI and readers: bpf vs sock_diag vs procfs ===

fn cli(paths: &[std::path::PathBuf], source: &str) -> Vec<Value> {
    let mut cmd = Command::new(agent_bin());
    cmd.args([
        "connections",
        "--source",
        source,
        "--idle-after",
        IDLE_AFTER,
    ]);
    for p in paths {
        cmd.arg("--netns").arg(p);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "connections --source {source}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// What both readers can know: idle/active, backlog and RTT are sock_diag only (procfs reports
/// every connection active, backlog 0 and RTT 0).
fn comparable(report: &Value) -> Value {
    let mut v = report.clone();
    let o = v.as_object_mut().unwrap();
    for k in [
        "source",
        "fallback_reason",
        "rtt_mean_seconds",
        "rtt_max_seconds",
        // tcp_info total_retrans vs /proc's current retransmit count: both 0 here, but they
        // count different things.
        "retransmits",
    ] {
        o.remove(k);
    }
    for pool in o["pools"].as_array_mut().unwrap() {
        let p = pool.as_object_mut().unwrap();
        for k in ["active", "idle", "rtt_mean_seconds", "retransmits"] {
            p.remove(k);
        }
    }
    for l in o["listeners"].as_array_mut().unwrap() {
        l.as_object_mut().unwrap().remove("backlog");
    }
    v
}

#[test]
fn sock_diag_and_the_procfs_fallback_agree_on_the_same_namespaces_as_root() {
    if !can_run() {
        return;
    }
    let srv = Netns::new("srv");
    let (a, srv_ip, _ha) = pod_a(&srv, 0);
    let (b, _hb) = pod_b(&srv, 1);
    std::thread::sleep(SETTLE);
    let paths = vec![a.path(), b.path()];
    let diag = cli(&paths, "sock-diag");
    let procfs = cli(&paths, "procfs");
    check_pod_a_harness(&a.ss(), &srv_ip);
    check_pod_b_harness(&b);
    assert_eq!(diag.len(), 2);
    for (d, p) in diag.iter().zip(&procfs) {
        assert_eq!(d["source"], "sock_diag");
        assert_eq!(p["source"], "procfs");
        assert_eq!(d["error"], Value::Null, "{d}");
        assert_eq!(
            comparable(d),
            comparable(p),
            "sock_diag:\n{d:#}\nprocfs:\n{p:#}"
        );
    }
    // The numbers both agree on are the right ones.
    let a_diag = &diag[0];
    assert_eq!(a_diag["established"], 42);
    assert_eq!(
        a_diag["tcp_states"],
        json!({"established": 42, "time_wait": 4})
    );
    assert_eq!(a_diag["udp_sockets"], 3);
    assert_eq!(a_diag["pools"][0]["remote"], format!("{srv_ip}:5432"));
    assert_eq!(a_diag["pools"][0]["idle"], 27, "{a_diag:#}");
    assert_eq!(a_diag["pools"][0]["active"], 10);
    assert_eq!(
        procfs[0]["pools"][0]["active"], 37,
        "procfs: every connection counts as active"
    );
    let b_diag = &diag[1];
    assert_eq!(b_diag["listen_overflows"], 3);
    assert_eq!(b_diag["listeners"][0]["accept_queue"], 5);
    assert_eq!(b_diag["listeners"][0]["backlog"], 4);
    assert_eq!(
        procfs[1]["listeners"][0]["backlog"], 0,
        "procfs: backlog unknown"
    );
}

/// (state, local, remote, socket inode) of every socket, and each listener's queue and backlog:
/// what one reading must share with another socket for socket (the data queues of ticking
/// connections move between two reads).
type SocketKey = (String, String, String, u64, Option<(u32, u32)>);

fn socket_keys(r: &NetnsReading) -> BTreeMap<SocketKey, usize> {
    let mut out = BTreeMap::new();
    for s in &r.sockets {
        let listener = (s.state == TcpState::Listen).then_some((s.rqueue, s.wqueue));
        let key = (
            s.state.name().to_string(),
            s.local.to_string(),
            s.remote.to_string(),
            s.inode,
            listener,
        );
        *out.entry(key).or_default() += 1;
    }
    out
}

#[test]
fn the_one_pass_and_sock_diag_agree_socket_for_socket_as_root() {
    if !can_run() {
        return;
    }
    let srv = Netns::new("srv");
    let (a, srv_ip, _ha) = pod_a(&srv, 0);
    let (b, _hb) = pod_b(&srv, 1);
    std::thread::sleep(SETTLE);
    let paths = vec![a.path(), b.path(), srv.path()];
    check_pod_a_harness(&a.ss(), &srv_ip);
    check_pod_b_harness(&b);

    // The agent's reader, socket for socket.
    let one_pass = Census::new(SourcePreference::Bpf).read(&paths);
    let diag = Census::new(SourcePreference::SockDiag).read(&paths);
    assert_eq!(one_pass.source, Some(Source::Bpf));
    assert_eq!(diag.source, Some(Source::SockDiag));
    for ((o, d), path) in one_pass.readings.iter().zip(&diag.readings).zip(&paths) {
        let o = o.as_ref().unwrap_or_else(|e| panic!("bpf {path:?}: {e}"));
        let d = d
            .as_ref()
            .unwrap_or_else(|e| panic!("sock_diag {path:?}: {e}"));
        assert!(!o.sockets.is_empty(), "{path:?}");
        assert_eq!(socket_keys(o), socket_keys(d), "{path:?}");
        assert_eq!(
            (o.udp_sockets, o.listen_counters, o.port_range),
            (d.udp_sockets, d.listen_counters, d.port_range),
            "{path:?}"
        );
    }

    // The CLI: the same reports (RTT samples move between two reads).
    let bpf = cli(&paths, "bpf");
    let sock_diag = cli(&paths, "sock-diag");
    for (o, d) in bpf.iter().zip(&sock_diag) {
        assert_eq!(o["source"], "bpf", "{o}");
        assert_eq!(d["source"], "sock_diag");
        let without_rtt = |v: &Value| {
            let mut v = v.clone();
            let o = v.as_object_mut().unwrap();
            for k in ["source", "rtt_mean_seconds", "rtt_max_seconds"] {
                o.remove(k);
            }
            for pool in o["pools"].as_array_mut().unwrap() {
                pool.as_object_mut().unwrap().remove("rtt_mean_seconds");
            }
            v
        };
        assert_eq!(
            without_rtt(o),
            without_rtt(d),
            "bpf:\n{o:#}\nsock_diag:\n{d:#}"
        );
        assert!(o["rtt_mean_seconds"].as_f64().unwrap() > 0.0, "{o}");
    }
    assert_eq!(bpf[0]["pools"][0]["idle"], 27, "{:#}", bpf[0]);
    assert_eq!(bpf[1]["listeners"][0]["backlog"], 4, "{:#}", bpf[1]);
}

/// A node with more sockets than the ring buffer holds: the walk reports it full, the census
/// reloads the program with a ring twice as large and counts everything; never a smaller count
/// and no fallback.
#[test]
fn a_ring_buffer_too_small_for_the_node_grows_and_the_census_stays_exact_as_root() {
    if !can_run() {
        return;
    }
    let pod = Netns::new("ring");
    let _holder = Holder::start(
        Some(&pod),
        &json!({"serve": [{"addr": "127.0.0.1", "port": 7100, "backlog": 1024}],
                "connect": [{"addr": "127.0.0.1", "port": 7100, "count": 1000}]}),
    );
    assert_eq!(pod.ss().tcp_states()["established"], 2000);
    let paths = vec![pod.path()];
    // 1024 asked: a 128 KiB ring, 1638 sockets, fewer than this namespace alone holds.
    let census = Census::new(SourcePreference::Auto).with_loader(
        nodekeeper::metrics::connections::bpf::OnePass::load_sized,
        1024,
    );
    let run = census.read(&paths);
    assert_eq!(
        run.source,
        Some(Source::Bpf),
        "{:?}",
        run.readings[0].as_ref().map(|r| &r.fallback_reason)
    );
    let capacity = census.ring_capacity().expect("loaded");
    assert!(capacity >= 2 * 1638, "grown: {capacity}");
    let diag = Census::new(SourcePreference::SockDiag).read(&paths);
    let (o, d) = (
        run.readings[0].as_ref().unwrap(),
        diag.readings[0].as_ref().unwrap(),
    );
    assert_eq!(o.fallback_reason, None);
    assert_eq!(socket_keys(o), socket_keys(d));
    assert_eq!(o.sockets.len(), 2001);
    for reason in Fallback::ALL {
        assert_eq!(census.metrics().fallbacks(reason), 0, "{reason:?}");
    }
}

/// hostNetwork pods put the host's namespace in every census. Its sockets are the shared
/// table's, which the one pass has just walked from the host: one walk of the node per
/// collection, never a second one from inside the host namespace (the host's
/// `tcp_ehash_entries` is positive, like a namespace with a table of its own).
#[test]
fn the_host_namespace_costs_no_second_walk_of_the_node_as_root() {
    if !can_run() {
        return;
    }
    let pod = Netns::new("walks");
    let _holder = Holder::start(
        Some(&pod),
        &json!({"serve": [{"addr": "127.0.0.1", "port": 7200}]}),
    );
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let paths = vec![std::path::PathBuf::from("/proc/self/ns/net"), pod.path()];
    let census = Census::new(SourcePreference::Bpf);
    // The first read loads the program (its calibration walks count too).
    assert_eq!(census.read(&paths).source, Some(Source::Bpf));
    let before = census.walks().expect("loaded");
    let run = census.read(&paths);
    assert_eq!(
        census.walks().expect("loaded") - before,
        1,
        "one walk of the node for the host and the pod"
    );
    let listens = |r: &Result<NetnsReading, _>, port: u16| {
        r.as_ref().is_ok_and(|r: &NetnsReading| {
            r.sockets
                .iter()
                .any(|s| s.state == TcpState::Listen && s.local.port() == port)
        })
    };
    assert!(listens(&run.readings[0], host_port), "the host's listener");
    assert!(!listens(&run.readings[0], 7200), "not the pod's");
    assert!(listens(&run.readings[1], 7200), "the pod's listener");
}

// === cardinality and /metrics ===

/// Distinct `remote` label values among /metrics series of pod `uid`.
fn remote_labels(text: &str, uid: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&format!("uid=\"{uid}\"")))
        .filter_map(|l| {
            let rest = l.split_once("remote=\"")?.1;
            Some(rest.split_once('"')?.0.to_string())
        })
        .collect()
}

#[test]
fn ten_thousand_remotes_stay_within_top_remotes_plus_other_as_root() {
    if !can_run() {
        return;
    }
    const REMOTES: u64 = 10_000;
    const TOP: usize = 10;
    let srv = Netns::new("srv");
    let (e, srv_ip, _) = pod_ns("e", &srv, 4);
    route_any_ip(&srv, &e, &srv_ip, "10.78.0.0/16");
    let _server = Holder::start(
        Some(&srv),
        &json!({"rlimit": 30000, "serve": [{"addr": "0.0.0.0", "port": 7000, "backlog": 4096}]}),
    );
    let holder = Holder::start(
        Some(&e),
        &json!({"rlimit": 30000, "targets": {"prefix": "10.78", "count": REMOTES, "port": 7000}}),
    );
    let ss = e.ss();
    assert_eq!(ss.established_by_peer().len() as u64, REMOTES, "harness");
    let tree = KubeletTree::new(Layout::SystemdV2);
    tree.add_pod("burstable", UID_E, &[holder.pid()]);
    let agent = Agent::builder()
        .config(&config(&tree, &format!("    topRemotes: {TOP}\n")))
        .start();

    let p = pod(&get_metrics(&agent), UID_E);
    assert_eq!(p.established, REMOTES);
    assert_eq!(p.pools.len(), TOP + 1, "top {TOP} + other");
    for pool in &p.pools[..TOP] {
        assert_eq!((pool.established, pool.remotes), (1, 1), "{pool:?}");
        assert!(pool.remote.starts_with("10.78."), "{pool:?}");
    }
    let other = &p.pools[TOP];
    assert_eq!(other.remote, "other");
    assert_eq!(other.remotes, REMOTES - TOP as u64);
    assert_eq!(other.established, REMOTES - TOP as u64);
    assert_eq!(p.pools.iter().map(|x| x.established).sum::<u64>(), REMOTES);

    let text = agent.metrics_text();
    let labels = remote_labels(&text, UID_E);
    assert!(
        !labels.is_empty(),
        "no /metrics series with a remote label for pod {UID_E}"
    );
    assert!(
        labels.len() <= TOP + 1,
        "{} remote label values for one pod (at most topRemotes + 1 = {})",
        labels.len(),
        TOP + 1
    );
    assert!(labels.contains("other"), "{labels:?}");
    let pool_series = text
        .lines()
        .filter(|l| {
            l.starts_with("nodekeeper_pod_tcp_pool_connections{")
                && l.contains(&format!("uid=\"{UID_E}\""))
        })
        .count();
    assert!(
        pool_series > 0 && pool_series <= 2 * (TOP + 1),
        "{pool_series} pool series (active and idle per pool, at most {})",
        2 * (TOP + 1)
    );
    assert_eq!(
        sample(
            &text,
            "nodekeeper_pod_tcp_pool_remotes",
            &[("uid", UID_E), ("remote", "other")]
        ),
        Some((REMOTES - TOP as u64) as f64),
        "the other pool sums the remaining remotes on /metrics too"
    );
}

#[test]
fn connection_metrics_pass_promtool_as_root() {
    if !can_run() || !require_tool("promtool") {
        return;
    }
    let srv = Netns::new("srv");
    let (_a, _srv_ip, holders) = pod_a(&srv, 0);
    let (_b, hb) = pod_b(&srv, 1);
    let tree = KubeletTree::new(Layout::SystemdV2);
    tree.add_pod("burstable", UID_A, &[holders[1].pid()]);
    tree.add_pod("burstable", UID_B, &[hb[0].pid()]);
    let agent = Agent::builder().config(&config(&tree, "")).start();
    let text = agent.metrics_text();
    for uid in [UID_A, UID_B] {
        assert!(
            !remote_labels(&text, uid).is_empty(),
            "connection pool series for {uid} on /metrics:\n{text}"
        );
    }
    nodekeeper_tests::assert_promtool_clean(&text);
}
