//! Pods with known connections for the KEDA and aggregator tests: each pod is a Python process
//! in its own network namespace (`unshare -n`, loopback only) holding `pool` established
//! connections to its own listener on 127.0.0.1:5432 and `queued` connections waiting in the
//! accept queue of a listener on 127.0.0.1:8081 that never accepts; it is seeded in the fake
//! API (namespace, labels, node) and in a fake kubelet cgroup tree (its PID in the pod's
//! `cgroup.procs`), so a connected agent pointed at the tree counts and names it.
//!
//! Per pod, the census then has exactly `pool` connections in the pool to `127.0.0.1:5432` and
//! `queued` in the accept queue of port 8081. Needs root (network namespaces, setns).
//!
//! Also the KEDA side shared by tests/keda.rs and tests/aggregate.rs: the cases
//! tests/py/keda_check.py runs over the pods of `start_pods`, and a Rust scaler client.

#![allow(dead_code)] // shared by several modules, none of which uses every part

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use nodekeeper::keda_pb::{self, external_scaler_client::ExternalScalerClient};
use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
use nodekeeper_tests::{Proc, python, wait_for, workspace_root};
use serde_json::{Value, json};

pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The pool's remote, as the census names it.
pub const POOL_REMOTE: &str = "127.0.0.1:5432";
/// The listener whose accept queue fills.
pub const QUEUE_PORT: u16 = 8081;

const POD_SCRIPT: &str = r#"
import socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
pool, queued = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket()
srv.bind(("127.0.0.1", 5432))
srv.listen(256)
clients = [socket.create_connection(("127.0.0.1", 5432)) for _ in range(pool)]
accepted = [srv.accept()[0] for _ in range(pool)]
q = socket.socket()
q.bind(("127.0.0.1", 8081))
q.listen(64)
waiting = [socket.create_connection(("127.0.0.1", 8081)) for _ in range(queued)]
print("ready", flush=True)
time.sleep(3600)
"#;

/// One running pod; its process is killed on drop.
pub struct CensusPod {
    pub proc: Proc,
    pub uid: String,
}

/// Starts a pod `name` in namespace `ns` on `node` with `labels`, registers it in the fake API
/// and under `cgroup_root` (cgroupfs layout `kubepods/besteffort/pod<UID>`), and waits until its
/// connections are open.
#[allow(clippy::too_many_arguments)]
pub fn start(
    api: &FakeApi,
    cgroup_root: &Path,
    log_dir: &Path,
    node: &str,
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    pool: u32,
    queued: u32,
) -> CensusPod {
    let mut seed = PodSeed::new(name).namespace(ns).node(node);
    for (k, v) in labels {
        seed = seed.label(k, v);
    }
    let uid = api.add_pod(seed)["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-n", "python3", "-c", POD_SCRIPT])
        .arg(pool.to_string())
        .arg(queued.to_string());
    let proc = Proc::spawn(&format!("pod-{name}"), cmd, log_dir);
    wait_for(
        Duration::from_secs(20),
        &format!("pod {name} connected"),
        || {
            let log = proc.log_text();
            assert!(!log.contains("Traceback"), "pod {name} failed:\n{log}");
            log.contains("ready").then_some(())
        },
    );
    let dir = cgroup_root.join(format!("kubepods/besteffort/pod{uid}"));
    nodekeeper_tests::cgroup::pod_dir(&dir, "usage_usec 1000\n", 1000, "inactive_file 0\n");
    std::fs::write(dir.join("cgroup.procs"), format!("{}\n", proc.pid())).unwrap();
    CensusPod { proc, uid }
}

// === the KEDA side ===

pub fn scaled_object(ns: &str, pairs: &[(&str, &str)]) -> keda_pb::ScaledObjectRef {
    keda_pb::ScaledObjectRef {
        name: "web".into(),
        namespace: ns.into(),
        scaler_metadata: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

pub async fn get_metrics(
    addr: &str,
    r: keda_pb::ScaledObjectRef,
) -> Result<keda_pb::GetMetricsResponse, tonic::Status> {
    let mut c = ExternalScalerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    tokio::time::timeout(
        CALL_TIMEOUT,
        c.get_metrics(keda_pb::GetMetricsRequest {
            scaled_object_ref: Some(r),
            metric_name: String::new(),
        }),
    )
    .await
    .expect("answered in time")
    .map(tonic::Response::into_inner)
}

/// Runs keda_check.py with `cases` against `addr`; panics with its output on failure.
pub fn run_keda_check(addr: &str, cases: &Value, dir: &Path) {
    run_keda_check_with(addr, cases, dir, &[]);
}

/// [`run_keda_check`] with more keda_check.py arguments (its TLS options).
pub fn run_keda_check_with(addr: &str, cases: &Value, dir: &Path, extra: &[std::ffi::OsString]) {
    let file = dir.join("keda-cases.json");
    std::fs::write(&file, serde_json::to_vec_pretty(cases).unwrap()).unwrap();
    let mut cmd = std::process::Command::new(python());
    cmd.arg(workspace_root().join("tests/py/keda_check.py"))
        .arg("--addr")
        .arg(addr)
        .arg("--cases")
        .arg(&file)
        .args(extra)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let mut proc = Proc::spawn("keda_check", cmd, dir);
    let status = proc.wait_exit(Duration::from_secs(120));
    let out = proc.log_text();
    assert!(status.success(), "keda_check.py failed ({status}):\n{out}");
    assert!(out.contains("\"ok\": true"), "no success line:\n{out}");
}

const SCALER_ADDRESS: &str = "nodekeeper-aggregator.nodekeeper-system.svc:9743";

/// The cases keda_check.py runs against a census of web-1 (pool 4, queue 3), web-2 (pool 6) and
/// api-1 (pool 9) in namespace shop; `scale` multiplies every expected connection count (the
/// aggregator sees the same pods on more nodes).
pub fn cases(scale: f64) -> Value {
    let base = |extra: &[(&str, &str)]| {
        let mut m = json!({"scalerAddress": SCALER_ADDRESS, "podSelector": "app=web"});
        for (k, v) in extra {
            m[k] = json!(v);
        }
        m
    };
    json!([
        {"name": "web pool to the database", "namespace": "shop",
         "metadata": base(&[("metric", "established"), ("target", "5"), ("remote", POOL_REMOTE)]),
         "value": 10.0 * scale, "active": true},
        {"name": "inbound to the database listener", "namespace": "shop",
         "metadata": base(&[("metric", "established"), ("target", "5"), ("remote", "*:5432")]),
         "value": 10.0 * scale},
        {"name": "set-based selector over both apps", "namespace": "shop",
         "metadata": base(&[("metric", "established"), ("target", "5"), ("remote", POOL_REMOTE),
                            ("podSelector", "app in (web,api)"), ("metricName", "shop-db-conns")]),
         "value": 19.0 * scale},
        {"name": "pool utilization", "namespace": "shop",
         "metadata": base(&[("metric", "pool_utilization"), ("target", "80"), ("remote", POOL_REMOTE),
                            ("poolSize", "8")]),
         // web-1 4/8 = 50 %, web-2 6/8 = 75 % per node.
         "value": 125.0 * scale, "active": true},
        {"name": "accept queue on one port", "namespace": "shop",
         "metadata": base(&[("metric", "accept_queue"), ("target", "2"),
                            ("port", &QUEUE_PORT.to_string()), ("activationTarget", "1000")]),
         "value": 3.0 * scale, "active": false},
        {"name": "pods of another namespace", "namespace": "shop",
         "metadata": base(&[("metric", "established"), ("target", "5"), ("remote", POOL_REMOTE),
                            ("podNamespace", "other")]),
         "error": "NOT_FOUND", "message": "no pod in namespace other matches podSelector",
         "rpcs": ["GetMetrics", "IsActive"]},
        {"name": "target not a number", "namespace": "shop",
         "metadata": base(&[("metric", "established"), ("target", "abc")]),
         "error": "INVALID_ARGUMENT", "message": "scalerMetadata.target: \"abc\" is not a number"},
        {"name": "no pod selector", "namespace": "shop",
         "metadata": {"metric": "established", "target": "5"},
         "error": "INVALID_ARGUMENT", "message": "scalerMetadata.podSelector: required"},
        {"name": "unknown metric", "namespace": "shop",
         "metadata": base(&[("metric", "sockets"), ("target", "5")]),
         "error": "INVALID_ARGUMENT", "message": "scalerMetadata.metric: \"sockets\" is not one of"},
        {"name": "misspelt key", "namespace": "shop",
         "metadata": base(&[("metric", "established"), ("target", "5"), ("poolsize", "8")]),
         "error": "INVALID_ARGUMENT", "message": "scalerMetadata.poolsize: unknown key"},
        {"name": "pool utilization without a pool size", "namespace": "shop",
         "metadata": base(&[("metric", "pool_utilization"), ("target", "80")]),
         "error": "INVALID_ARGUMENT", "message": "scalerMetadata.poolSize: required"},
    ])
}

/// The three pods of `cases` on `node`, registered in `api` and under `cgroup`.
pub fn start_pods(api: &FakeApi, cgroup: &Path, log_dir: &Path, node: &str) -> Vec<CensusPod> {
    let web = &[("app", "web")][..];
    vec![
        start(
            api,
            cgroup,
            log_dir,
            node,
            "shop",
            &format!("web-1-{node}"),
            web,
            4,
            3,
        ),
        start(
            api,
            cgroup,
            log_dir,
            node,
            "shop",
            &format!("web-2-{node}"),
            web,
            6,
            0,
        ),
        start(
            api,
            cgroup,
            log_dir,
            node,
            "shop",
            &format!("api-1-{node}"),
            &[("app", "api")],
            9,
            0,
        ),
    ]
}

/// Waits until `addr`'s scaler sees the web pool at `want` (the pod watch has named the pods).
pub fn wait_for_pool(addr: &str, want: f64) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = scaled_object(
        "shop",
        &[
            ("metric", "established"),
            ("target", "5"),
            ("podSelector", "app=web"),
            ("remote", POOL_REMOTE),
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = rt.block_on(get_metrics(addr, r.clone()));
        if let Ok(m) = &got
            && m.metric_values[0].metric_value_float == want
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the scaler at {addr} never reported {want}: last {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
