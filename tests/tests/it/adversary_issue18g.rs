//! Seventh adversary round against issue #18's promises (autoscaling signals): every value an
//! agent's scaler (or the aggregator over it) hands KEDA is exact for what it names (the
//! connections of the selected pods, counted once each), or an error naming why; never a
//! silently smaller or larger number, never another pod's connections. This round goes after
//! the newest rules (decisions #18-q and #18-r): which namespace's sockets are a pod's, how a
//! connection is told inbound (a listener accepting on its address and port, or the per-namespace
//! memory of connections once counted inbound), and the `topListeners` cut.
//!
//! A test marked `#[ignore = "adversary finding: ..."]` broke the promise (run it with
//! `--ignored` to see it fail); a plain test is an attack that held. The product code is not
//! changed here.
//!
//! Broke (open): sockets another pod's process made in web-1's namespace (setns and back) are
//! web-1's (7 for 4, api-1 0 for 3); the same through a thread left in web-1's namespace; a
//! namespace shared with a refused pod (#18-m) is not seen as shared (4 for 0); a drain's
//! remembered inbound connections are forgotten when the pod's namespace set changes (`*:8080` 0
//! for 5); a listener in one of a pod's namespaces makes another's outbound connections inbound
//! (0 for 3); an `IPV6_V6ONLY` `[::]:P` listener makes IPv4 outbound connections from port P
//! inbound (0 for 3); an outbound connection reusing a remembered queued child's 4-tuple is
//! inbound (0 for 1). Held: `accept_queue` with `topListeners: 1` and a port on two addresses;
//! the aggregator over an agent before #18-r beside a cut list.
//!
//! Each attack runs a connected agent (fake API server, fake kubelet cgroup tree, real Python
//! processes with real sockets in their own network namespaces: `unshare -n`, loopback only) and
//! asks its own KEDA scaler as KEDA does. The aggregator evaluates the agents' censuses with the
//! same `keda::query::evaluate`, so what breaks here breaks there too.

use crate::adversary_issue18f::agent_value;
use crate::support::aggregate::{self, ApiPod};
use crate::support::census_pods;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodekeeper::keda::coverage::PodPlacement;
use nodekeeper::pb;
use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
use nodekeeper_tests::{Proc, wait_for};
use tonic::Status;

const WAIT: Duration = Duration::from_secs(30);

// === harness ===

/// Runs `script` as a pod process in its own network namespace (loopback up) and waits for
/// its "ready" line.
fn pod_process(name: &str, script: &str, args: &[String], dir: &Path) -> Proc {
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "python3", "-c", script]).args(args);
    let proc = Proc::spawn(name, cmd, dir);
    wait_for(Duration::from_secs(20), &format!("{name} ready"), || {
        let log = proc.log_text();
        assert!(!log.contains("Traceback"), "{name} failed:\n{log}");
        log.contains("ready").then_some(())
    });
    proc
}

/// Registers `name` (namespace shop, node-a, `app=<app>`) in the API and puts `pid` in its pod
/// cgroup (cgroupfs layout); returns the pod's cgroup directory.
fn register_pod(api: &FakeApi, cgroup: &Path, name: &str, app: &str, pid: u32) -> PathBuf {
    let seed = PodSeed::new(name)
        .namespace("shop")
        .node("node-a")
        .label("app", app);
    let uid = api.add_pod(seed)["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let dir = cgroup.join(format!("kubepods/besteffort/pod{uid}"));
    nodekeeper_tests::cgroup::pod_dir(&dir, "usage_usec 1000\n", 1000, "inactive_file 0\n");
    std::fs::write(dir.join("cgroup.procs"), format!("{pid}\n")).unwrap();
    dir
}

/// Adds `pid` to the pod cgroup `dir` (a second process of the pod: a sidecar's, a sandboxed
/// helper's).
fn add_process(dir: &Path, pid: u32) {
    let procs = dir.join("cgroup.procs");
    let mut text = std::fs::read_to_string(&procs).unwrap();
    text.push_str(&format!("{pid}\n"));
    std::fs::write(procs, text).unwrap();
}

/// A connected agent on node-a reading `cgroup`, with `config` (YAML; empty for defaults: the
/// one-pass BPF census).
fn connected_agent(
    api: &FakeApi,
    dir: &Path,
    cgroup: &Path,
    config: &str,
) -> nodekeeper_tests::Agent {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    nodekeeper_tests::Agent::builder()
        .config(config)
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start()
}

/// Waits until the agent's pod view has synced and its scaler names a pod of `app` (neither
/// NOT_FOUND nor UNAVAILABLE for a pod view that has not named every pod yet) and returns its
/// answer; an answer still UNAVAILABLE after `WAIT` is returned as is.
fn settled_answer(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    app: &str,
    extra: &[(&str, &str)],
) -> Result<f64, Status> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = agent_value(rt, addr, app, extra);
        let waiting = match &got {
            Err(s) => s.code() == tonic::Code::NotFound || s.code() == tonic::Code::Unavailable,
            Ok(_) => false,
        };
        if !waiting || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Exact `want`, or UNAVAILABLE (the promise allows an error that names why); anything else is
/// a wrong number handed to KEDA.
fn exact_or_unavailable(got: &Result<f64, Status>, want: f64) -> bool {
    match got {
        Ok(v) => *v == want,
        Err(s) => s.code() == tonic::Code::Unavailable,
    }
}

/// Waits until the agent's /metrics (a fresh census when the last is older than
/// `maxSnapshotAge`) shows a listener series with `address`.
fn wait_for_listener(agent: &nodekeeper_tests::Agent, address: &str) {
    let label = format!("address=\"{address}\"");
    wait_for(WAIT, &format!("a census with listener {address}"), || {
        agent.metrics_text().contains(&label).then_some(())
    });
}

/// The network namespace identity of `pid` (`net:[inode]`).
fn netns_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .display()
        .to_string()
}

// === a socket made in another pod's namespace ===

/// A process in a namespace of its own that enters `argv[1]`'s network namespace (setns, as
/// `nsenter` does), opens 3 connections to 127.0.0.1:5432 there, and goes back to its own
/// namespace, keeping them (a socket lives in the namespace it was created in, whoever holds
/// it; a privileged sidecar, a CNI or mesh helper, a debugging tool). Prints "ready".
const BORROWING_POD: &str = r#"
import ctypes, os, socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
own = os.open("/proc/self/ns/net", os.O_RDONLY)
target = os.open(sys.argv[1], os.O_RDONLY)
if libc.setns(target, CLONE_NEWNET) != 0:
    raise OSError(ctypes.get_errno(), "setns into the neighbour")
conns = [socket.create_connection(("127.0.0.1", 5432)) for _ in range(3)]
if libc.setns(own, CLONE_NEWNET) != 0:
    raise OSError(ctypes.get_errno(), "setns back")
print("ready", flush=True)
time.sleep(3600)
"#;

/// Decision #18-r attributes a namespace to a pod by where its processes are
/// (`/proc/PID/ns/net`), and detects a namespace shared by pods the same way. A socket, though,
/// stays in the namespace it was created in: api-1's process enters web-1's namespace, opens 3
/// connections to web-1's database port, and returns to its own. Every process of each pod is
/// in its own namespace, so nothing is shared; web-1's census holds api-1's 3 client sockets
/// (`app=web` pool to 127.0.0.1:5432: 7 for web-1's 4) and api-1's holds none (0 for its 3).
/// The sockets' holders are visible (`/proc/PID/fd`, as for hostNetwork pods: #18-n).
#[test]
#[ignore = "adversary finding: sockets another pod's process created in web-1's namespace are web-1's (7 for 4; api-1 0 for 3)"]
fn adversary18g_sockets_made_in_a_neighbours_netns_are_counted_to_the_neighbour_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let web1 = census_pods::start(
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
    let web1_ns = format!("/proc/{}/ns/net", web1.proc.pid());
    let api1 = pod_process("api-1", BORROWING_POD, &[web1_ns], dir.path());
    register_pod(&api, &cgroup, "api-1", "api", api1.pid());
    // Harness: api-1's process is in a namespace of its own, not web-1's.
    assert_ne!(
        netns_of(api1.pid()),
        netns_of(web1.proc.pid()),
        "harness: api-1's process went back to its own namespace"
    );
    let agent = connected_agent(&api, dir.path(), &cgroup, "");
    let addr = agent.api.to_string();
    let pool = [
        ("metric", "established"),
        ("remote", census_pods::POOL_REMOTE),
    ];

    let web = settled_answer(&rt, &addr, "web", &pool);
    let api_pool = settled_answer(&rt, &addr, "api", &pool);
    assert!(
        exact_or_unavailable(&web, 4.0) && exact_or_unavailable(&api_pool, 3.0),
        "web-1 holds 4 connections to {} and api-1 holds 3 (made in web-1's namespace): KEDA \
         must get 4 for app=web and 3 for app=api (or UNAVAILABLE); got {web:?} and \
         {api_pool:?}",
        census_pods::POOL_REMOTE
    );
}

/// A process in a namespace of its own whose second thread enters `argv[1]`'s network
/// namespace (setns changes only the calling thread) and opens 3 connections to 127.0.0.1:5432
/// there, staying in it; the thread group leader stays in the process's own namespace. Prints
/// "ready".
const THREAD_POD: &str = r#"
import ctypes, os, socket, subprocess, sys, threading, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
target = os.open(sys.argv[1], os.O_RDONLY)
def worker():
    if libc.setns(target, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns into the neighbour")
    conns = [socket.create_connection(("127.0.0.1", 5432)) for _ in range(3)]
    print("ready", flush=True)
    time.sleep(3600)
threading.Thread(target=worker, daemon=True).start()
time.sleep(3600)
"#;

/// Shared-namespace detection (#18-r) reads `/proc/PID/ns/net` of each PID in `cgroup.procs`:
/// the thread group leader's namespace. api-1's process keeps its leader in its own namespace
/// while a worker thread sits in web-1's (setns is per thread) with 3 connections there: web-1's
/// namespace is not seen as shared, its census holds api-1's 3 client sockets (`app=web` pool:
/// 7 for 4) and api-1's none (0 for 3). `/proc/PID/task/TID/ns/net` shows the thread's.
#[test]
#[ignore = "adversary finding: a pod's thread in web-1's namespace is not seen as sharing it (7 for 4; api-1 0 for 3)"]
fn adversary18g_a_thread_in_a_neighbours_netns_is_not_seen_as_sharing_it_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let web1 = census_pods::start(
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
    let web1_ns = format!("/proc/{}/ns/net", web1.proc.pid());
    let api1 = pod_process("api-1", THREAD_POD, &[web1_ns], dir.path());
    register_pod(&api, &cgroup, "api-1", "api", api1.pid());
    assert_ne!(
        netns_of(api1.pid()),
        netns_of(web1.proc.pid()),
        "harness: api-1's thread group leader is in its own namespace"
    );
    let agent = connected_agent(&api, dir.path(), &cgroup, "");
    let addr = agent.api.to_string();
    let pool = [
        ("metric", "established"),
        ("remote", census_pods::POOL_REMOTE),
    ];

    let web = settled_answer(&rt, &addr, "web", &pool);
    let api_pool = settled_answer(&rt, &addr, "api", &pool);
    assert!(
        exact_or_unavailable(&web, 4.0) && exact_or_unavailable(&api_pool, 3.0),
        "web-1 holds 4 connections to {} and api-1's thread holds 3 in web-1's namespace: KEDA \
         must get 4 for app=web and 3 for app=api (or UNAVAILABLE); got {web:?} and \
         {api_pool:?}",
        census_pods::POOL_REMOTE
    );
}

// === the inbound memory when the pod's namespaces change ===

/// A server pod: a listener on 127.0.0.1:8080 with 5 clients (in the pod) connected and
/// accepted; when the file argv[1] appears it closes the listener and keeps serving the 5 (a
/// graceful drain), then prints "closed".
const CLOSING_LISTENER_POD: &str = r#"
import os, socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
srv = socket.socket()
srv.bind(("127.0.0.1", 8080))
srv.listen(64)
clients = [socket.create_connection(("127.0.0.1", 8080)) for _ in range(5)]
served = [srv.accept()[0] for _ in range(5)]
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
srv.close()
print("closed", flush=True)
time.sleep(3600)
"#;

/// A sandboxed helper in a network namespace of its own (`unshare -n`: bubblewrap, a build
/// sandbox), with a listener on 127.0.0.1:7777 so that a census that read it shows. Prints
/// "ready".
const SANDBOX_HELPER: &str = r#"
import socket, subprocess, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
s = socket.socket()
s.bind(("127.0.0.1", 7777))
s.listen(8)
print("ready", flush=True)
time.sleep(3600)
"#;

/// The memory of connections once counted inbound (decision #18-r) is keyed by the pod's
/// namespace identity, and a pod in several namespaces is keyed by their joined identities. A
/// draining server (listener closed, 5 clients still served, remembered inbound) whose pod
/// starts a sandboxed helper in a namespace of its own (#18-m: the pod is now read as the union
/// of both) is looked up under a new key that remembers nothing: its 5 served connections become
/// outbound pools named by their clients. `*:8080` reads 0 for 5, and `pool_utilization` over
/// every outbound pool counts the 5 clients (10 % for 5 %).
#[test]
#[ignore = "adversary finding: the inbound memory is lost when the pod's namespace set changes (*:8080 0 for 5)"]
fn adversary18g_a_drain_forgets_its_inbound_connections_when_a_sandbox_starts_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let trigger = dir.path().join("close-listener");
    let pod = pod_process(
        "closing-listener",
        CLOSING_LISTENER_POD,
        &[trigger.display().to_string()],
        dir.path(),
    );
    let pod_dir = register_pod(&api, &cgroup, "web-1", "web", pod.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup, "");
    let addr = agent.api.to_string();
    let inbound = [("metric", "established"), ("remote", "*:8080")];
    let utilization = [("metric", "pool_utilization"), ("poolSize", "100")];

    let before = settled_answer(&rt, &addr, "web", &inbound);
    assert_eq!(
        before.map_err(|s| s.to_string()),
        Ok(5.0),
        "harness: 5 inbound"
    );
    std::fs::write(&trigger, b"").unwrap();
    wait_for(Duration::from_secs(20), "listener closed", || {
        pod.log_text().contains("closed").then_some(())
    });
    wait_for(WAIT, "a census without the listener", || {
        (!agent.metrics_text().contains("address=\"127.0.0.1:8080\"")).then_some(())
    });
    // Harness: the drain is remembered (decision #18-r's fix holds on its own).
    let drained = agent_value(&rt, &addr, "web", &inbound);
    assert_eq!(
        drained.map_err(|s| s.to_string()),
        Ok(5.0),
        "harness: 5 inbound after the listener closed"
    );

    let helper = pod_process("web-1-sandbox", SANDBOX_HELPER, &[], dir.path());
    add_process(&pod_dir, helper.pid());
    wait_for_listener(&agent, "127.0.0.1:7777");

    let after = agent_value(&rt, &addr, "web", &inbound);
    let util = agent_value(&rt, &addr, "web", &utilization);
    assert!(
        exact_or_unavailable(&after, 5.0) && exact_or_unavailable(&util, 5.0),
        "web-1 still serves its 5 clients on port 8080 and holds 5 outbound connections; its \
         sandbox has none: KEDA must get 5 inbound to *:8080 and 5 % utilisation (or \
         UNAVAILABLE); got {after:?} and {util:?}"
    );
}

// === a listener of another of the pod's namespaces ===

/// A pod process with a database listener on 127.0.0.1:5432 and 3 connections to it from
/// ephemeral ports; prints "ready" and the 3 client ports.
const POOL_POD: &str = r#"
import socket, subprocess, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
db = socket.socket()
db.bind(("127.0.0.1", 5432))
db.listen(64)
pool = [socket.create_connection(("127.0.0.1", 5432)) for _ in range(3)]
accepted = [db.accept()[0] for _ in range(3)]
print("ready", " ".join(str(c.getsockname()[1]) for c in pool), flush=True)
time.sleep(3600)
"#;

/// A sandboxed helper in a namespace of its own listening on `0.0.0.0:P` for each port P of
/// argv (its own services; port numbers are per namespace). Prints "ready".
const PORTS_HELPER: &str = r#"
import socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
ls = []
for p in sys.argv[1:]:
    s = socket.socket()
    s.bind(("0.0.0.0", int(p)))
    s.listen(8)
    ls.append(s)
print("ready", flush=True)
time.sleep(3600)
"#;

/// The client ports a `POOL_POD` printed.
fn printed_ports(proc: &Proc) -> Vec<String> {
    let log = proc.log_text();
    let line = log
        .lines()
        .find(|l| l.starts_with("ready"))
        .expect("ready line");
    line.split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// A pod read in several namespaces (#18-m) is summarised as one reading, their sockets
/// merged, and "a listener of the pod accepts on the local address and port" (#18-r) looks up
/// listeners of every namespace. Addresses and ports are per namespace: a sandboxed helper
/// listening on `0.0.0.0:P` in its own namespace, where P happens to be the source port of one
/// of the pod's pool connections in its main namespace, turns that outbound connection into an
/// inbound one. With the helper on the 3 pool connections' ports: the pool `127.0.0.1:5432`
/// reads 0 for 3, and `*:P` 1 for 0.
#[test]
#[ignore = "adversary finding: a listener in one of the pod's namespaces makes another namespace's outbound connections inbound (pool 0 for 3)"]
fn adversary18g_a_listener_in_another_of_the_pods_namespaces_makes_outbound_inbound_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let pod = pod_process("pool-pod", POOL_POD, &[], dir.path());
    let ports = printed_ports(&pod);
    assert_eq!(ports.len(), 3, "harness: 3 client ports");
    let pod_dir = register_pod(&api, &cgroup, "web-1", "web", pod.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup, "");
    let addr = agent.api.to_string();
    let pool = [
        ("metric", "established"),
        ("remote", census_pods::POOL_REMOTE),
    ];
    let before = settled_answer(&rt, &addr, "web", &pool);
    assert_eq!(
        before.map_err(|s| s.to_string()),
        Ok(3.0),
        "harness: 3 in the pool"
    );

    let helper = pod_process("web-1-sandbox", PORTS_HELPER, &ports, dir.path());
    add_process(&pod_dir, helper.pid());
    wait_for_listener(&agent, &format!("0.0.0.0:{}", ports[0]));

    let after = agent_value(&rt, &addr, "web", &pool);
    let remote = format!("*:{}", ports[0]);
    let phantom = agent_value(
        &rt,
        &addr,
        "web",
        &[("metric", "established"), ("remote", remote.as_str())],
    );
    assert!(
        exact_or_unavailable(&after, 3.0) && exact_or_unavailable(&phantom, 0.0),
        "web-1 holds 3 connections to {} and nobody is connected to its sandbox's listeners: \
         KEDA must get 3 and 0 on {remote} (or UNAVAILABLE); got {after:?} and {phantom:?}",
        census_pods::POOL_REMOTE
    );
}

// === an IPv6-only wildcard listener ===

/// A pod with a database listener on 127.0.0.1:5432 and 3 connections to it from ephemeral
/// ports; then, for each of those port numbers, an IPv6-only listener on `[::]:P`
/// (`IPV6_V6ONLY`: an IPv6 service; IPv4 and IPv6 ports are separate then, the bind is
/// allowed). Prints "ready" and the ports.
const V6ONLY_POD: &str = r#"
import socket, subprocess, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
db = socket.socket()
db.bind(("127.0.0.1", 5432))
db.listen(64)
pool = [socket.create_connection(("127.0.0.1", 5432)) for _ in range(3)]
accepted = [db.accept()[0] for _ in range(3)]
v6 = []
for c in pool:
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::", c.getsockname()[1]))
    s.listen(8)
    v6.append(s)
print("ready", " ".join(str(c.getsockname()[1]) for c in pool), flush=True)
time.sleep(3600)
"#;

/// #18-r reads a `[::]:P` listener as accepting on every address, IPv4 too (a dual-stack
/// socket's IPv4 children read as IPv4). An IPv6-only one (`IPV6_V6ONLY`, which sock_diag
/// reports as `INET_DIAG_SKV6ONLY`) accepts no IPv4 connection, so an IPv4 outbound connection
/// from port P is no client of it: without `SO_REUSEPORT` or any explicit bind (an ephemeral
/// port that an IPv6-only service also uses), the pod's 3 pool connections read as inbound.
/// The pool `127.0.0.1:5432` reads 0 for 3, `*:P` 1 for 0.
#[test]
#[ignore = "adversary finding: an IPV6_V6ONLY [::]:P listener makes IPv4 outbound connections from port P inbound (pool 0 for 3)"]
fn adversary18g_a_v6only_wildcard_listener_makes_ipv4_outbound_inbound_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let pod = pod_process("v6only-pod", V6ONLY_POD, &[], dir.path());
    let ports = printed_ports(&pod);
    assert_eq!(ports.len(), 3, "harness: 3 client ports");
    register_pod(&api, &cgroup, "web-1", "web", pod.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup, "");
    let addr = agent.api.to_string();

    // Harness: the database's 3 accepted connections are inbound to *:5432.
    let db = settled_answer(
        &rt,
        &addr,
        "web",
        &[("metric", "established"), ("remote", "*:5432")],
    );
    assert_eq!(db.map_err(|s| s.to_string()), Ok(3.0), "harness: 3 inbound");
    let pool = agent_value(
        &rt,
        &addr,
        "web",
        &[
            ("metric", "established"),
            ("remote", census_pods::POOL_REMOTE),
        ],
    );
    let remote = format!("*:{}", ports[0]);
    let phantom = agent_value(
        &rt,
        &addr,
        "web",
        &[("metric", "established"), ("remote", remote.as_str())],
    );
    assert!(
        exact_or_unavailable(&pool, 3.0) && exact_or_unavailable(&phantom, 0.0),
        "web-1 holds 3 IPv4 connections to {} and no IPv4 client can reach its IPv6-only \
         listeners: KEDA must get 3 and 0 on {remote} (or UNAVAILABLE); got {pool:?} and \
         {phantom:?}",
        census_pods::POOL_REMOTE
    );
}

// === a 4-tuple remembered inbound, reused by an outbound connection ===

/// A pod whose client (127.0.0.1:40123, bound) waits in the accept queue of its listener on
/// 127.0.0.1:8080 (never accepted: no inode, remembered by its 4-tuple). When argv[1] appears
/// the pod closes both, listens on 127.0.0.1:40123 (the old client's address is now its
/// service's) and connects from 127.0.0.1:8080 (a fixed source port, free again) to it: one
/// outbound connection whose 4-tuple is the old queued child's. Prints "swapped".
const TUPLE_REUSE_POD: &str = r#"
import os, socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 8080))
srv.listen(8)
cli = socket.socket()
cli.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
cli.bind(("127.0.0.1", 40123))
cli.connect(("127.0.0.1", 8080))
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
srv.close()
cli.close()
svc = socket.socket()
svc.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
svc.bind(("127.0.0.1", 40123))
svc.listen(8)
out = socket.socket()
out.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
out.bind(("127.0.0.1", 8080))
out.connect(("127.0.0.1", 40123))
served = svc.accept()[0]
print("swapped", flush=True)
time.sleep(3600)
"#;

/// The memory keeps a queued child by its 4-tuple (it has no inode), replaced each census. A
/// new connection with the same 4-tuple opened between two censuses inherits "inbound", whichever
/// way it goes: the pod's one outbound connection to 127.0.0.1:40123 reads as inbound to
/// `*:8080` (no listener there any more): the pool reads 0 for 1, `*:8080` 1 for 0.
#[test]
#[ignore = "adversary finding: an outbound connection reusing a remembered queued child's 4-tuple is inbound (pool 0 for 1)"]
fn adversary18g_an_outbound_connection_reusing_a_remembered_4_tuple_is_inbound_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let trigger = dir.path().join("swap");
    let pod = pod_process(
        "tuple-reuse",
        TUPLE_REUSE_POD,
        &[trigger.display().to_string()],
        dir.path(),
    );
    register_pod(&api, &cgroup, "web-1", "web", pod.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup, "");
    let addr = agent.api.to_string();
    let inbound = [("metric", "established"), ("remote", "*:8080")];
    let pool = [("metric", "established"), ("remote", "127.0.0.1:40123")];

    // Harness: the queued child is inbound (and remembered by its 4-tuple).
    let before = settled_answer(&rt, &addr, "web", &inbound);
    assert_eq!(
        before.map_err(|s| s.to_string()),
        Ok(1.0),
        "harness: 1 queued inbound"
    );
    // No census between these two (collections are on demand): the swap happens between two.
    std::fs::write(&trigger, b"").unwrap();
    wait_for(Duration::from_secs(20), "swapped", || {
        let log = pod.log_text();
        assert!(!log.contains("Traceback"), "pod failed:\n{log}");
        log.contains("swapped").then_some(())
    });
    wait_for_listener(&agent, "127.0.0.1:40123");

    let out = agent_value(&rt, &addr, "web", &pool);
    let phantom = agent_value(&rt, &addr, "web", &inbound);
    assert!(
        exact_or_unavailable(&out, 1.0) && exact_or_unavailable(&phantom, 0.0),
        "web-1 holds 1 outbound connection to 127.0.0.1:40123 and nothing listens on 8080: KEDA \
         must get 1 and 0 on *:8080 (or UNAVAILABLE); got {out:?} and {phantom:?}"
    );
}

// === the topListeners cut with several listeners on a port ===

/// A pod with listeners that never accept: 127.0.0.1:9001 (3 queued), 127.0.0.2:9001 (1),
/// 127.0.0.1:9002 (2), 127.0.0.1:9003 (none). Prints "ready".
const CUT_LISTENERS_POD: &str = r#"
import socket, subprocess, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
keep = []
for host, port, queued in [("127.0.0.1", 9001, 3), ("127.0.0.2", 9001, 1),
                           ("127.0.0.1", 9002, 2), ("127.0.0.1", 9003, 0)]:
    s = socket.socket()
    s.bind((host, port))
    s.listen(64)
    keep.append(s)
    keep.extend(socket.create_connection((host, port)) for _ in range(queued))
print("ready", flush=True)
time.sleep(3600)
"#;

/// With `topListeners: 1` the list keeps 9001's largest queue and, per #18-r, 9001's other
/// listener too; `accept_queue` over every listener is the total (6), on 9001 both of its
/// listeners (4), on 9002 and 9003 (cut) UNAVAILABLE or exact (2, 0), on a port nobody listens
/// on UNAVAILABLE or 0. Never the kept list's sum (4) for the whole, never 3 for 9001.
#[test]
fn adversary18g_accept_queue_with_top_listeners_1_and_a_port_on_two_addresses_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let pod = pod_process("cut-listeners", CUT_LISTENERS_POD, &[], dir.path());
    register_pod(&api, &cgroup, "gw-1", "gw", pod.pid());
    let agent = connected_agent(
        &api,
        dir.path(),
        &cgroup,
        "metrics:\n  connections:\n    topListeners: 1\n",
    );
    let addr = agent.api.to_string();
    let q = |port: Option<&str>| {
        let mut extra = vec![("metric", "accept_queue")];
        if let Some(p) = port {
            extra.push(("port", p));
        }
        agent_value(&rt, &addr, "gw", &extra)
    };

    let every = settled_answer(&rt, &addr, "gw", &[("metric", "accept_queue")]);
    assert_eq!(
        every.as_ref().map_err(|s| s.to_string()),
        Ok(&6.0),
        "6 queued over every listener"
    );
    let kept = q(Some("9001"));
    assert_eq!(
        kept.as_ref().map_err(|s| s.to_string()),
        Ok(&4.0),
        "port 9001's two listeners hold 4"
    );
    let mut wrong = Vec::new();
    for (port, want) in [("9002", 2.0), ("9003", 0.0), ("9999", 0.0)] {
        let got = q(Some(port));
        if !exact_or_unavailable(&got, want) {
            wrong.push(format!("port {port}: {got:?} (want {want} or UNAVAILABLE)"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");
}

// === a namespace shared with a pod whose census is refused ===

/// #18-r finds a namespace shared by pods among the pods read in one namespace or a union of
/// their own (`collector::shared_namespaces` looks at `Target::Pod` and `Target::Union`). A pod
/// with processes in the host's namespace and in one of its own is refused (#18-m: an error
/// entry) and so is not in that look-up: api-1 holds 4 pool connections in its own namespace and
/// has a second process in the host's (a privileged helper); web-1's only process joined
/// api-1's namespace (`nsenter --net`). Nothing is seen as shared, and web-1 (which opened
/// nothing) is read as api-1's namespace: `app=web` gets api-1's 4 connections for 0.
#[test]
#[ignore = "adversary finding: a namespace shared with a refused pod is the other pod's (app=web 4 for 0)"]
fn adversary18g_a_netns_shared_with_a_refused_pod_is_counted_to_the_other_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let api1 = census_pods::start(
        &api,
        &cgroup,
        dir.path(),
        "node-a",
        "shop",
        "api-1",
        &[("app", "api")],
        4,
        0,
    );
    // api-1's second process, in the host's namespace (the test's, the agent's own).
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import time; print('ready', flush=True); time.sleep(3600)",
    ]);
    let host_helper = Proc::spawn("api-1-host-helper", cmd, dir.path());
    wait_for(Duration::from_secs(20), "api-1's host helper ready", || {
        host_helper.log_text().contains("ready").then_some(())
    });
    assert_eq!(
        netns_of(host_helper.pid()),
        netns_of(std::process::id()),
        "harness: the helper is in the host's namespace"
    );
    add_process(
        &cgroup.join(format!("kubepods/besteffort/pod{}", api1.uid)),
        host_helper.pid(),
    );
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{}/ns/net", api1.proc.pid()))
        .args(["python3", "-c"])
        .arg("import time; print('ready', flush=True); time.sleep(3600)");
    let web1 = Proc::spawn("web-1", cmd, dir.path());
    wait_for(Duration::from_secs(20), "web-1 ready", || {
        web1.log_text().contains("ready").then_some(())
    });
    register_pod(&api, &cgroup, "web-1", "web", web1.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup, "");
    let addr = agent.api.to_string();
    let pool = [
        ("metric", "established"),
        ("remote", census_pods::POOL_REMOTE),
    ];

    let web = settled_answer(&rt, &addr, "web", &pool);
    // Harness: api-1 itself is refused (processes in the host's namespace and its own).
    let refused = agent_value(&rt, &addr, "api", &pool);
    assert!(
        matches!(&refused, Err(s) if s.code() == tonic::Code::Unavailable),
        "harness: api-1 is UNAVAILABLE (#18-m); got {refused:?}"
    );
    assert!(
        exact_or_unavailable(&web, 0.0),
        "web-1 holds no connection (its process only joined api-1's namespace; api-1 holds the \
         4): KEDA must get 0 for app=web (or UNAVAILABLE); got {web:?}"
    );
}

// === the aggregator over an agent before #18-r beside a current one ===

/// A listener of a census entry.
fn listener(address: &str, port: u32, accept_queue: u64) -> pb::Listener {
    pb::Listener {
        address: address.into(),
        port,
        accept_queue,
        backlog: 64,
    }
}

/// The aggregator sums node-a's agent from before #18-r (no `accept_queue_total`, no
/// `listeners_total`: its list of 9001 (2) and 9002 (3) read whole, as before) and node-b's
/// current agent whose list was cut to 9001 (5) of 3 listeners holding 9 in all. Over every
/// listener: 5 + 9 = 14 (never 5 + 5); on 9001: 2 + 5 = 7; on 9002, cut on node-b: UNAVAILABLE
/// (never node-a's 3 alone).
#[test]
fn adversary18g_the_aggregator_sums_an_agent_before_18r_beside_a_cut_list_exactly() {
    let placement = PodPlacement::from_pods(&[
        ApiPod::new("shop", "web-1", "uid-1", "node-a").pod(),
        ApiPod::new("shop", "web-2", "uid-2", "node-b").pod(),
    ]);
    let mut old = aggregate::census_pod("shop", "web-1", "uid-1", 0);
    old.listeners = vec![
        listener("127.0.0.1:9002", 9002, 3),
        listener("127.0.0.1:9001", 9001, 2),
    ];
    let mut new = aggregate::census_pod("shop", "web-2", "uid-2", 0);
    new.listeners = vec![listener("127.0.0.1:9001", 9001, 5)];
    new.listeners_total = 3;
    new.accept_queue_total = 9;
    let fleet = Arc::new(aggregate::fleet(
        placement,
        vec![("node-a", vec![old]), ("node-b", vec![new])],
    ));
    let q = |port: Option<&str>| {
        let mut extra = vec![("metric", "accept_queue")];
        if let Some(p) = port {
            extra.push(("port", p));
        }
        aggregate::scaler_value(fleet.clone(), aggregate::web_query("shop", &extra))
    };
    assert_eq!(
        q(None).map_err(|s| s.to_string()),
        Ok(14.0),
        "every listener"
    );
    assert_eq!(
        q(Some("9001")).map_err(|s| s.to_string()),
        Ok(7.0),
        "port 9001"
    );
    let cut = q(Some("9002"));
    assert!(
        aggregate::is_unavailable(&cut),
        "port 9002 is among node-b's cut listeners: UNAVAILABLE, never node-a's 3; got {cut:?}"
    );
}
