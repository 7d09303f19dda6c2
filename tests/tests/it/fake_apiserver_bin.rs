//! The runnable fake API server (`cargo run -p nodekeeper-tests --bin fake-apiserver`): a
//! differential check of one flow. Two instances seeded with the same rotation scenario and the
//! same injected eviction faults; one drained by real `kubectl drain`, the other by the agent in
//! connected mode. Both must leave node-a with the same pods (DaemonSet and mirror) and both
//! fakes' audits must show no budget violation.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodekeeper::pb::{drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::{self, NODE};
use nodekeeper_tests::{Agent, Proc, bearer, http_get, require_tool, wait_for};

/// Starts the binary seeded with the rotation and two APF 429s on evictions; waits for its
/// kubeconfig. Returns the process and the server's address.
fn fake(dir: &Path, name: &str) -> (Proc, std::net::SocketAddr) {
    let kubeconfig = dir.join(format!("{name}.kubeconfig"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fake-apiserver"));
    cmd.arg("--kubeconfig").arg(&kubeconfig).args([
        "--seed",
        "rotation",
        "--fault",
        "POST:/eviction:429:2",
    ]);
    let proc = Proc::spawn(name, cmd, dir);
    let text = wait_for(Duration::from_secs(20), "the fake's kubeconfig", || {
        std::fs::read_to_string(&kubeconfig).ok()
    });
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: http://"))
        .expect("server line")
        .parse()
        .expect("address");
    (proc, server)
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=20s")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `namespace/name` of the pods on node-a, sorted, as kubectl lists them.
fn pods_on_node(kubeconfig: &Path) -> Vec<String> {
    let out = kubectl(
        kubeconfig,
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            &format!("spec.nodeName={NODE}"),
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
        ],
    );
    let mut pods: Vec<String> = out.lines().map(str::to_string).collect();
    pods.sort();
    pods
}

fn audit_violations(addr: std::net::SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(addr, "/fake/audit").expect("audit");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(v["samples"].as_u64().unwrap() > 0, "{v}");
    v["violations"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_and_the_agent_drain_the_runnable_fake_to_the_same_end() {
    if !require_tool("kubectl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut k_proc, k_addr) = fake(dir.path(), "fake-kubectl");
    let (mut n_proc, n_addr) = fake(dir.path(), "fake-agent");
    let k_conf = dir.path().join("fake-kubectl.kubeconfig");
    let n_conf = dir.path().join("fake-agent.kubeconfig");
    assert_eq!(pods_on_node(&k_conf), pods_on_node(&n_conf), "same seed");
    assert_eq!(pods_on_node(&k_conf).len(), 60 + 4);

    // kubectl drain, untuned but for the flags the scenario needs.
    let started = Instant::now();
    kubectl(
        &k_conf,
        &[
            "drain",
            NODE,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            "--timeout=150s",
        ],
    );
    let by_kubectl = pods_on_node(&k_conf);
    eprintln!("kubectl drain: {:?}", started.elapsed());

    // The agent, connected to the other instance as node-a.
    let agent = Agent::builder()
        .config("metrics:\n  enabled: false\ndrain:\n  retryInitial: 200ms\n  retryMax: 2s\n")
        .with_token()
        .connected(&n_conf, NODE)
        .start();
    let mut c = NodeAgentClient::connect(agent.grpc_url()).await.unwrap();
    let mut req = drain_scenario::request("bin");
    req.delete_emptydir_data = true;
    let mut stream = c.drain(bearer(req)).await.unwrap().into_inner();
    let mut last = None;
    let ended = tokio::time::timeout(Duration::from_secs(150), async {
        while let Some(e) = stream.message().await.expect("stream") {
            last = Some(e);
        }
    })
    .await;
    assert!(ended.is_ok(), "the agent's drain did not end");
    assert!(
        matches!(last.and_then(|e| e.event), Some(Event::Completed(_))),
        "the agent's drain did not complete"
    );
    let by_agent = pods_on_node(&n_conf);

    assert_eq!(by_kubectl, by_agent, "both leave node-a with the same pods");
    let expected: Vec<String> = drain_scenario::expected_remaining()
        .iter()
        .map(|p| format!("kube-system/{p}"))
        .collect();
    assert_eq!(by_agent, expected);
    assert_eq!(audit_violations(k_addr), serde_json::json!([]));
    assert_eq!(audit_violations(n_addr), serde_json::json!([]));

    for p in [&mut k_proc, &mut n_proc] {
        p.signal("TERM");
        assert!(p.wait_exit(Duration::from_secs(10)).success());
    }
}
