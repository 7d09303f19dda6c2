//! The OS-patching rotation (issue #20) against the fake API server: node-bound requests (a
//! call meant for another node is refused before anything is touched). Every step runs under a
//! timeout.

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodekeeper::pb::{self, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::request;
use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::{Agent, TEST_TOKEN, agent_bin, bearer};
use tonic::Code;
use tonic::transport::Channel;

const CONFIG: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n";

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

fn agent(kubeconfig: &Path, node: &str) -> Agent {
    Agent::builder()
        .config(CONFIG)
        .with_token()
        .connected(kubeconfig, node)
        .start()
}

async fn client(agent: &Agent) -> NodeAgentClient<Channel> {
    NodeAgentClient::connect(agent.grpc_url())
        .await
        .expect("connect")
}

/// Writes to Nodes and evictions the fake API server saw.
fn writes(api: &FakeApi) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| {
            r.method != "GET" && (r.path.contains("/nodes") || r.path.contains("/eviction"))
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

fn assert_refused(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
    assert!(e.message().starts_with(field), "{what}: {}", e.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_sent_to_the_wrong_node_is_refused_and_nothing_is_touched() {
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let a = agent(&kubeconfig, "node-a");
    let mut c = client(&a).await;
    let node = within(10, c.get_node(bearer(pb::GetNodeRequest {})))
        .await
        .expect("GetNode")
        .into_inner();
    let uid = api.node("node-a").expect("node-a")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    assert!(!uid.is_empty());
    assert_eq!(node.node_uid, uid, "GetNode reports the Node's uid");
    let before = writes(&api);

    // The orchestrator meant node-b (whose old address node-a now has): every mutating call
    // is refused, naming the field.
    let mut wrong = request("rot-b");
    wrong.node_name = "node-b".into();
    assert_refused(
        within(10, c.drain(bearer(wrong))).await,
        "node_name:",
        "drain",
    );
    let cordon = pb::CordonRequest {
        reason: "patch".into(),
        node_name: "node-b".into(),
        ..Default::default()
    };
    assert_refused(
        within(10, c.cordon(bearer(cordon))).await,
        "node_name:",
        "cordon",
    );
    let uncordon = pb::UncordonRequest {
        node_name: "node-b".into(),
        ..Default::default()
    };
    assert_refused(
        within(10, c.uncordon(bearer(uncordon))).await,
        "node_name:",
        "uncordon",
    );
    let cancel = pb::CancelDrainRequest {
        id: "rot-b".into(),
        node_name: "node-b".into(),
        ..Default::default()
    };
    assert_refused(
        within(10, c.cancel_drain(bearer(cancel))).await,
        "node_name:",
        "cancel",
    );
    // The right name with the uid of a Node that was deleted and re-created under that name.
    let mut stale = request("rot-a");
    stale.node_name = "node-a".into();
    stale.node_uid = "00000000-dead-beef-0000-000000000000".into();
    assert_refused(
        within(10, c.drain(bearer(stale))).await,
        "node_uid:",
        "drain with a stale uid",
    );
    let n = api.node("node-a").expect("node-a");
    assert_ne!(n["spec"]["unschedulable"], true, "refused calls cordoned");
    assert!(
        n["metadata"]["annotations"]["nodekeeper.io/drain"].is_null(),
        "refused drain recorded: {n}"
    );
    assert_eq!(writes(&api), before, "a refused call wrote to the API");
    assert!(
        within(10, c.get_drain(bearer(pb::GetDrainRequest {})))
            .await
            .is_err(),
        "no drain ran"
    );

    // The right name and uid: accepted.
    let cordon = pb::CordonRequest {
        reason: "patch".into(),
        node_name: "node-a".into(),
        node_uid: uid.clone(),
    };
    let status = within(10, c.cordon(bearer(cordon)))
        .await
        .expect("cordon of the right node")
        .into_inner();
    assert!(status.unschedulable);

    // The CLI: --node names the node it means; another node's agent refuses (exit 1) and the
    // node stays as it was.
    let token = dir.path().join("token");
    std::fs::write(&token, TEST_TOKEN).expect("write token");
    let out = Command::new(agent_bin())
        .args(["uncordon", &a.api.to_string(), "--token-file"])
        .arg(&token)
        .args(["--node", "node-b"])
        .output()
        .expect("run nodekeeper uncordon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("node_name:"), "{stderr}");
    assert_eq!(api.node("node-a").unwrap()["spec"]["unschedulable"], true);
    // Without --node the CLI binds the call to the node the agent reports: accepted.
    let out = Command::new(agent_bin())
        .args(["uncordon", &a.api.to_string(), "--token-file"])
        .arg(&token)
        .output()
        .expect("run nodekeeper uncordon");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(api.node("node-a").unwrap()["spec"]["unschedulable"], true);
}
