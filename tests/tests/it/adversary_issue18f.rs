//! Sixth adversary round against issue #18's promises (autoscaling signals): every value an
//! agent's scaler (or the aggregator over it) hands KEDA is exact for what it names, or an
//! error naming why; never a silently smaller or larger number. Earlier rounds
//! (tests/tests/it/adversary_issue18*.rs) went after pod views, coverage and remotes' spelling;
//! this one goes after how one pod's sockets become the census's values: the listeners a query
//! sums (`accept_queue`), and how a connection is told inbound (`*:PORT`) from outbound.
//!
//! A test marked `#[ignore = "adversary finding: ..."]` broke the promise (run it with
//! `--ignored` to see it fail); a plain test is an attack that held. The product code is not
//! changed here.
//!
//! Broke (open): `accept_queue` beyond `topListeners` (10 for 11, 0 for the 11th port); a closed
//! listener's served clients (`*:8080` 0 for 5, `pool_utilization` 10 for 5); an outbound
//! connection from a port the pod listens on elsewhere (0 for 3, and 3 on `*:7000` for 0); two
//! selected pods with processes in one namespace (8 for 4). Held: IPv6 `remote` spellings.
//!
//! Each attack runs a connected agent (fake API server, fake kubelet cgroup tree, a real Python
//! process with real sockets in its own network namespace: `unshare -n`, loopback only) and asks
//! its own KEDA scaler as KEDA does. The aggregator evaluates the agents' censuses with the same
//! `keda::query::evaluate`, so what breaks here breaks there too.

use crate::support::census_pods;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use census_pods::scaled_object;
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
/// cgroup (cgroupfs layout).
fn register_pod(api: &FakeApi, cgroup: &Path, name: &str, app: &str, pid: u32) {
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
}

/// A connected agent on node-a reading `cgroup` (default config: the one-pass BPF census).
fn connected_agent(api: &FakeApi, dir: &Path, cgroup: &Path) -> nodekeeper_tests::Agent {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    nodekeeper_tests::Agent::builder()
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start()
}

/// `metric` (with `extra`) over `app=<app>` in `shop`, asked of the agent's own scaler.
pub(crate) fn agent_value(
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
            Err(s) => {
                s.code() == tonic::Code::NotFound
                    || s.message().contains("has not synced")
                    || s.message().contains("does not know")
            }
            Ok(_) => false,
        };
        if !waiting {
            return got;
        }
        assert!(Instant::now() < deadline, "app={app} never named: {got:?}");
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

// === accept_queue over more listeners than topListeners ===

/// A pod with `n` listeners on 127.0.0.1:9001.. that never accept, each with one connection
/// waiting in its accept queue (an overloaded server with several ports: HTTP, gRPC, admin,
/// metrics, one per tenant...). Prints "ready".
const MANY_LISTENERS_POD: &str = r#"
import socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
n = int(sys.argv[1])
listeners, waiting = [], []
for i in range(n):
    s = socket.socket()
    s.bind(("127.0.0.1", 9001 + i))
    s.listen(64)
    listeners.append(s)
    waiting.append(socket.create_connection(("127.0.0.1", 9001 + i)))
print("ready", flush=True)
time.sleep(3600)
"#;

/// `accept_queue` is documented as "connections waiting in listeners' accept queues (on `port`
/// when set, else every listener)". The census keeps only the `topListeners` (default 10)
/// largest queues per pod (summary.rs truncates `listeners`), and `evaluate` sums what is left:
/// with 11 listeners each holding 1 queued connection, KEDA gets 10 for "every listener", and 0
/// for the port whose listener was cut (ties sort by port, so the highest goes), with no error.
/// Unlike `remote`, a `port` is not pinned.
#[test]
fn adversary18f_accept_queue_beyond_top_listeners_reads_smaller_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let pod = pod_process(
        "many-listeners",
        MANY_LISTENERS_POD,
        &["11".to_string()],
        dir.path(),
    );
    register_pod(&api, &cgroup, "gw-1", "gw", pod.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();

    // Harness: the first listener's queue is read.
    let first = first_answer(
        &rt,
        &addr,
        "gw",
        &[("metric", "accept_queue"), ("port", "9001")],
    );
    assert_eq!(
        first.map_err(|s| s.to_string()),
        Ok(1.0),
        "harness: one connection queued on 9001"
    );

    let every = agent_value(&rt, &addr, "gw", &[("metric", "accept_queue")]);
    let last = agent_value(
        &rt,
        &addr,
        "gw",
        &[("metric", "accept_queue"), ("port", "9011")],
    );
    assert!(
        exact_or_unavailable(&every, 11.0) && exact_or_unavailable(&last, 1.0),
        "gw-1 has 11 listeners with 1 connection queued each: KEDA must get 11 over every \
         listener and 1 on port 9011 (or UNAVAILABLE); got {every:?} and {last:?}"
    );
}

// === inbound connections after the listener closed ===

/// A server pod: a listener on 127.0.0.1:8080 with 5 clients (in the pod) connected and
/// accepted; when the file argv[1] appears it closes the listener and keeps serving the 5 (a
/// graceful drain, or a proxy pausing its listener at maxconn), then prints "closed".
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

/// The census keys a connection as inbound (`*:PORT`) only while its local port is one the pod
/// listens on. A server that closes its listener and keeps serving its accepted connections (a
/// graceful drain, HAProxy pausing listeners at maxconn, a hot restart handing over the port)
/// has its 5 inbound connections re-keyed as outbound pools named by each client's
/// address:port: `*:8080` reads 0 (was 5) and `pool_utilization` over "every outbound pool"
/// (which docs/connections.md promises "never counts clients") counts the 5 clients, 10 instead
/// of 5 (the pod's own 5 client sockets to 127.0.0.1:8080 are its one real outbound pool).
#[test]
fn adversary18f_inbound_connections_after_the_listener_closes_are_read_as_outbound_as_root() {
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
    register_pod(&api, &cgroup, "web-1", "web", pod.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();
    let inbound = [("metric", "established"), ("remote", "*:8080")];
    let utilization = [("metric", "pool_utilization"), ("poolSize", "100")];

    // Harness: with the listener open, 5 inbound and 5 outbound (5 % of a pool of 100).
    let before = first_answer(&rt, &addr, "web", &inbound);
    assert_eq!(
        before.map_err(|s| s.to_string()),
        Ok(5.0),
        "harness: 5 inbound"
    );
    let util_before = agent_value(&rt, &addr, "web", &utilization);
    assert_eq!(
        util_before.map_err(|s| s.to_string()),
        Ok(5.0),
        "harness: 5 outbound of 100"
    );

    std::fs::write(&trigger, b"").unwrap();
    wait_for(Duration::from_secs(20), "listener closed", || {
        pod.log_text().contains("closed").then_some(())
    });
    // A census taken after the close: the listener's series is gone from /metrics.
    wait_for(WAIT, "a census without the listener", || {
        (!agent.metrics_text().contains("address=\"127.0.0.1:8080\"")).then_some(())
    });

    let after = agent_value(&rt, &addr, "web", &inbound);
    let util_after = agent_value(&rt, &addr, "web", &utilization);
    assert!(
        exact_or_unavailable(&after, 5.0) && exact_or_unavailable(&util_after, 5.0),
        "web-1 still serves its 5 clients on port 8080 and holds 5 outbound connections: KEDA \
         must get 5 inbound to *:8080 and 5 % utilisation of its outbound pools (or \
         UNAVAILABLE); got {after:?} and {util_after:?}"
    );
}

// === an outbound connection from a port the pod also listens on ===

/// A pod with a database listener on 127.0.0.1:5432 (its pool's server) and an admin listener
/// on 127.0.0.2:7000 that nobody connects to; its 3 pool connections are bound to source port
/// 7000 on 127.0.0.3..5 (explicit source binding: a multi-homed pod, a protocol with a fixed
/// source port). Prints "ready".
const SOURCE_PORT_POD: &str = r#"
import socket, subprocess, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
db = socket.socket()
db.bind(("127.0.0.1", 5432))
db.listen(64)
admin = socket.socket()
admin.bind(("127.0.0.2", 7000))
admin.listen(64)
pool = []
for i in range(3):
    c = socket.socket()
    c.bind(("127.0.0.%d" % (3 + i), 7000))
    c.connect(("127.0.0.1", 5432))
    pool.append(c)
accepted = [db.accept()[0] for _ in range(3)]
print("ready", flush=True)
time.sleep(3600)
"#;

/// The census tells inbound from outbound by the local port alone (summary.rs: "local port is
/// one of the pod's listening ports"), not by the listener's address: 3 outbound connections to
/// 127.0.0.1:5432 whose source port happens to be a port the pod listens on (on another
/// address) are counted as 3 inbound connections to `*:7000` (which has none), and the pool
/// `127.0.0.1:5432` reads 0 (it has 3).
#[test]
fn adversary18f_an_outbound_connection_from_a_listening_port_is_counted_inbound_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let pod = pod_process("source-port", SOURCE_PORT_POD, &[], dir.path());
    register_pod(&api, &cgroup, "web-1", "web", pod.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();

    // Harness: the database's 3 accepted connections are inbound to *:5432.
    let db_inbound = first_answer(
        &rt,
        &addr,
        "web",
        &[("metric", "established"), ("remote", "*:5432")],
    );
    assert_eq!(
        db_inbound.map_err(|s| s.to_string()),
        Ok(3.0),
        "harness: 3 inbound to 5432"
    );

    let pool = agent_value(
        &rt,
        &addr,
        "web",
        &[("metric", "established"), ("remote", "127.0.0.1:5432")],
    );
    let admin = agent_value(
        &rt,
        &addr,
        "web",
        &[("metric", "established"), ("remote", "*:7000")],
    );
    assert!(
        exact_or_unavailable(&pool, 3.0) && exact_or_unavailable(&admin, 0.0),
        "web-1 has 3 connections to 127.0.0.1:5432 and no client on its admin port 7000: KEDA \
         must get 3 and 0 (or UNAVAILABLE); got {pool:?} and {admin:?}"
    );
}

// === IPv6 pools spelled several ways ===

/// A pod whose pool is IPv6 (an IPv6-only cluster): a listener on [::1]:5432 and 4 connections
/// to it. Prints "ready".
const IPV6_POOL_POD: &str = r#"
import socket, subprocess, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
srv = socket.socket(socket.AF_INET6)
srv.bind(("::1", 5432))
srv.listen(64)
clients = [socket.create_connection(("::1", 5432)) for _ in range(4)]
accepted = [srv.accept()[0] for _ in range(4)]
print("ready", flush=True)
time.sleep(3600)
"#;

/// An IPv6 `remote` in any valid spelling (compressed, expanded, leading zeros, upper case) is
/// the census's one pool `[::1]:5432`: 4, never 0.
#[test]
fn adversary18f_an_ipv6_remote_in_any_spelling_reads_the_pool_as_root() {
    if !nodekeeper_tests::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let pod = pod_process("ipv6-pool", IPV6_POOL_POD, &[], dir.path());
    register_pod(&api, &cgroup, "web-1", "web", pod.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();

    let inbound = first_answer(
        &rt,
        &addr,
        "web",
        &[("metric", "established"), ("remote", "*:5432")],
    );
    assert_eq!(
        inbound.map_err(|s| s.to_string()),
        Ok(4.0),
        "harness: 4 inbound"
    );
    let mut wrong = Vec::new();
    for remote in [
        "[::1]:5432",
        "[0:0:0:0:0:0:0:1]:5432",
        "[0000::0001]:5432",
        "[::0:1]:5432",
    ] {
        let got = agent_value(
            &rt,
            &addr,
            "web",
            &[("metric", "established"), ("remote", remote)],
        );
        if !matches!(got, Ok(v) if v == 4.0) {
            wrong.push(format!("{remote}: {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "web-1 holds 4 connections to [::1]:5432: every spelling must read 4; got {wrong:?}"
    );
}

// === two selected pods in one network namespace ===

/// web-1 (4 connections to 127.0.0.1:5432, its own namespace) and web-2, a replica whose only
/// process runs in web-1's network namespace (`nsenter --net`: a privileged debugging or
/// capture helper attached to a neighbour, a sidecar that joins another pod's namespace).
/// Decision #18-m reads a pod in every namespace its processes are in, and reads a namespace
/// several pods share once per collection but reports it for each of them: the one namespace's 4
/// connections are web-1's and web-2's, and `app=web` sums 8 for 4 connections ("counted once
/// each" is the promise).
#[test]
fn adversary18f_two_selected_pods_in_one_netns_count_its_connections_twice_as_root() {
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
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{}/ns/net", web1.proc.pid()))
        .args(["python3", "-c"])
        .arg("import time; print('ready', flush=True); time.sleep(3600)");
    let helper = Proc::spawn("web-2-helper", cmd, dir.path());
    wait_for(Duration::from_secs(20), "web-2's helper ready", || {
        helper.log_text().contains("ready").then_some(())
    });
    register_pod(&api, &cgroup, "web-2", "web", helper.pid());
    let agent = connected_agent(&api, dir.path(), &cgroup);
    let addr = agent.api.to_string();

    // Until both pods are named (a pod the agent's view has not placed yet is UNAVAILABLE).
    let deadline = Instant::now() + WAIT;
    let got = loop {
        let got = first_answer(
            &rt,
            &addr,
            "web",
            &[
                ("metric", "established"),
                ("remote", census_pods::POOL_REMOTE),
            ],
        );
        let settled = !matches!(&got, Err(s) if s.code() == tonic::Code::Unavailable);
        if settled || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        exact_or_unavailable(&got, 4.0),
        "the pods of app=web hold 4 connections to {} between them (web-1's; web-2's helper \
         opened none): KEDA must get 4 (or UNAVAILABLE); got {got:?}",
        census_pods::POOL_REMOTE
    );
    // UNAVAILABLE names why (decision #18-r).
    if let Err(s) = &got {
        assert!(
            s.message().contains("shared with pod shop/web-"),
            "the answer must name the shared namespace: {s:?}"
        );
    }
}
