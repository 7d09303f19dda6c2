//! The patching-rotation scenario, shared by the drain tests and the kubectl-drain benchmark:
//! node-a runs 60 pods of 6 Deployments (ReplicaSets, 10 replicas each, every one behind a
//! PodDisruptionBudget of minAvailable 8), 2 DaemonSet pods, 1 mirror pod, 1 unreplicated pod,
//! 2 pods that are not Ready and 1 leader. Evicted ReplicaSet pods are recreated on node-other.

use std::path::PathBuf;
use std::time::Duration;

use crate::fake_api::{FakeApi, FakeApiBuilder, PdbLimit, PodSeed};

pub const NODE: &str = "node-a";
pub const DEPLOYMENTS: usize = 6;
pub const REPLICAS: usize = 10;
pub const NOT_READY: [&str; 2] = ["d0-0", "d1-0"];
pub const LEADER: &str = "d5-9";
pub const UNREPLICATED: &str = "debug-shell";

pub struct Scenario {
    pub api: FakeApi,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

/// Seeds the rotation scenario. `replace`/`ready` are the ReplicaSet controller's delays.
pub fn rotation(replace: Duration, ready: Duration) -> Scenario {
    rotation_on(
        FakeApi::builder().replace_delay(replace).ready_delay(ready),
        None,
    )
}

/// The rotation scenario on a fake configured by `builder` (lags, grace-second scale, field
/// validation); every pod gets `terminationGracePeriodSeconds: grace` when given.
pub fn rotation_on(builder: FakeApiBuilder, grace: Option<i64>) -> Scenario {
    let api = builder.other_node("node-other").start();
    api.add_node(NODE, &[("pool", "trino")]);
    api.add_node("node-other", &[]);
    for d in 0..DEPLOYMENTS {
        let app = format!("d{d}");
        let rs = format!("{app}-rs");
        api.add_replicaset(
            "apps",
            &rs,
            &[("app", &app)],
            REPLICAS as i64,
            &[("app", &app)],
        );
        for r in 0..REPLICAS {
            let name = format!("{app}-{r}");
            let mut seed = PodSeed::new(&name)
                .namespace("apps")
                .node(NODE)
                .label("app", &app)
                .replicaset(&rs);
            if NOT_READY.contains(&name.as_str()) {
                seed = seed.ready(false);
            }
            if name == LEADER {
                seed = seed.label("nodekeeper.io/role", "leader");
            }
            if let Some(g) = grace {
                seed = seed.grace_period(g);
            }
            api.add_pod(seed);
        }
    }
    api.add_pod(
        PodSeed::new("logs-node-a")
            .namespace("kube-system")
            .node(NODE)
            .daemonset("logs"),
    );
    api.add_pod(
        PodSeed::new("exporter-node-a")
            .namespace("kube-system")
            .node(NODE)
            .daemonset("exporter"),
    );
    api.add_pod(
        PodSeed::new("kube-proxy-node-a")
            .namespace("kube-system")
            .node(NODE)
            .mirror(),
    );
    api.add_pod(PodSeed::new(UNREPLICATED).namespace("default").node(NODE));
    // Budgets after the pods, so the audit starts from the real state.
    for d in 0..DEPLOYMENTS {
        let app = format!("d{d}");
        api.add_pdb(
            "apps",
            &format!("{app}-pdb"),
            &[("app", &app)],
            PdbLimit::MinAvailable(8),
            None,
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    Scenario {
        api,
        dir,
        kubeconfig,
    }
}

/// Names of the pods that must stay on the node after a drain (DaemonSet and mirror pods).
pub fn expected_remaining() -> Vec<String> {
    vec![
        "exporter-node-a".to_string(),
        "kube-proxy-node-a".into(),
        "logs-node-a".into(),
    ]
}

/// One pod behind a budget that can never allow its eviction (minAvailable 1 of 1): a drain of
/// node-a can only time out, naming `primary-pdb`.
pub fn unsatisfiable() -> Scenario {
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    api.add_replicaset(
        "db",
        "primary-rs",
        &[("app", "primary")],
        1,
        &[("app", "primary")],
    );
    api.add_pod(
        PodSeed::new("primary-0")
            .namespace("db")
            .node(NODE)
            .label("app", "primary")
            .replicaset("primary-rs"),
    );
    api.add_pdb(
        "db",
        "primary-pdb",
        &[("app", "primary")],
        PdbLimit::MinAvailable(1),
        None,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    Scenario {
        api,
        dir,
        kubeconfig,
    }
}

/// A rotation drain request: 120 s, unreplicated pods allowed (the scenario has one).
pub fn request(id: &str) -> nodekeeper::pb::DrainRequest {
    nodekeeper::pb::DrainRequest {
        id: id.into(),
        reason: "ami rotation".into(),
        requester: "orchestrator".into(),
        timeout: Some(prost_types::Duration {
            seconds: 120,
            nanos: 0,
        }),
        evict_unreplicated: true,
        ..Default::default()
    }
}

/// Every event of a Drain stream (sent with the test token) until the stream ends.
pub async fn drain_all(
    client: &mut nodekeeper::pb::node_agent_client::NodeAgentClient<tonic::transport::Channel>,
    req: nodekeeper::pb::DrainRequest,
) -> Vec<nodekeeper::pb::DrainEvent> {
    let mut stream = client
        .drain(crate::bearer(req))
        .await
        .expect("Drain accepted")
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await.expect("stream ok") {
        events.push(e);
    }
    events
}
