//! Two agent processes on one node, as during a DaemonSet rollout with `maxSurge: 1` (issue #16):
//! the Node annotation is the single source of truth for who drives the node's drain. The
//! process that does not drive it refuses a second drain and Uncordon, follows a same-id Drain,
//! answers GetDrain from the Node and forwards CancelDrain through it; when the driving process
//! shuts down it hands the drain over and the other adopts it, with no pod evicted twice and no
//! budget broken. Two real agent processes against one fake API server.

use std::future::Future;
use std::time::Duration;

use nodekeeper::pb::{self, DrainPhase, drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::{self, NODE, Scenario, request};
use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::{Agent, bearer};
use serde_json::Value;
use tonic::transport::Channel;

const CONFIG: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  concurrency: 4\n  ownerLease: 3s\n";

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

/// An agent process of the pod `pod` (POD_NAME, as the downward API sets it).
fn agent(s: &Scenario, pod: &str) -> Agent {
    Agent::builder()
        .config(CONFIG)
        .with_token()
        .env("POD_NAME", pod)
        .connected(&s.kubeconfig, NODE)
        .start()
}

async fn client(agent: &Agent) -> NodeAgentClient<Channel> {
    NodeAgentClient::connect(agent.grpc_url())
        .await
        .expect("connect")
}

/// The drain record on the Node.
fn record(api: &FakeApi) -> Value {
    let node = api.node(NODE).expect("node");
    serde_json::from_str(
        node["metadata"]["annotations"]["nodekeeper.io/drain"]
            .as_str()
            .expect("drain annotation"),
    )
    .expect("json")
}

async fn next_event(stream: &mut tonic::Streaming<pb::DrainEvent>) -> Option<pb::DrainEvent> {
    stream.message().await.expect("stream ok")
}

/// Reads a stream to its end.
async fn rest(stream: &mut tonic::Streaming<pb::DrainEvent>) -> Vec<pb::DrainEvent> {
    let mut out = Vec::new();
    while let Some(e) = next_event(stream).await {
        out.push(e);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_not_driving_refuses_a_second_drain_and_uncordon_follows_and_forwards_cancel() {
    // One pod under a budget that never allows its eviction: the drain runs until cancelled.
    let s = drain_scenario::unsatisfiable();
    let old = agent(&s, "nodekeeper-old");
    let mut a = client(&old).await;
    let mut stream_a = a
        .drain(bearer(request("rot")))
        .await
        .expect("drain accepted")
        .into_inner();
    within(30, async {
        while let Some(e) = next_event(&mut stream_a).await {
            if matches!(e.event, Some(Event::Blocked(_))) {
                break;
            }
        }
    })
    .await;

    // The rollout's new pod starts on the same node while the old one drives the drain.
    let new = agent(&s, "nodekeeper-new");
    let mut b = client(&new).await;
    let driver = record(&s.api)["driver"].as_str().unwrap().to_string();
    assert!(driver.starts_with("nodekeeper-old#"), "{driver}");

    let refused = b
        .drain(bearer(request("another")))
        .await
        .expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("\"rot\""), "{refused:?}");
    let refused = b
        .uncordon(bearer(pb::UncordonRequest::default()))
        .await
        .expect_err("uncordon refused while the other process drains");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let status = b
        .get_drain(bearer(pb::GetDrainRequest {}))
        .await
        .expect("get drain")
        .into_inner();
    assert_eq!(status.id, "rot");
    assert!(
        matches!(status.phase(), DrainPhase::Evicting | DrainPhase::Cordoning),
        "{status:?}"
    );
    // A same-id Drain on the new process follows the old one's drain.
    let mut follower = b
        .drain(bearer(request("rot")))
        .await
        .expect("re-attach on the other process")
        .into_inner();
    // Several renewals later the old process still drives: the new one did not take over.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(record(&s.api)["driver"].as_str().unwrap(), driver);

    // CancelDrain landing on the new process reaches the driver through the Node.
    b.cancel_drain(bearer(pb::CancelDrainRequest {
        id: "rot".into(),
        ..Default::default()
    }))
    .await
    .expect("cancel accepted");
    let events_a = within(30, rest(&mut stream_a)).await;
    assert!(
        matches!(
            events_a.last().and_then(|e| e.event.clone()),
            Some(Event::Cancelled(_))
        ),
        "{:?}",
        events_a.last()
    );
    let events_b = within(30, rest(&mut follower)).await;
    assert!(
        matches!(
            events_b.last().and_then(|e| e.event.clone()),
            Some(Event::Cancelled(_))
        ),
        "{events_b:?}"
    );
    assert_eq!(record(&s.api)["phase"], "cancelled");
    // Now either process may uncordon.
    b.uncordon(bearer(pb::UncordonRequest::default()))
        .await
        .expect("uncordon after the cancel");
    assert!(s.api.node(NODE).unwrap()["spec"]["unschedulable"].is_null());
    assert!(
        s.api.pod("db", "primary-0").is_some(),
        "the budget was kept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_hands_the_drain_from_the_old_agent_to_the_new_one_without_two_drivers() {
    let s = drain_scenario::rotation_on(
        FakeApi::builder()
            .replace_delay(Duration::from_millis(200))
            .ready_delay(Duration::from_millis(800))
            .grace_second(Duration::from_millis(100)),
        Some(3),
    );
    let mut old = agent(&s, "nodekeeper-old");
    let mut a = client(&old).await;
    let mut stream_a = a
        .drain(bearer(request("rollout")))
        .await
        .expect("drain accepted")
        .into_inner();
    // Some pods are gone when the rollout reaches this node.
    within(60, async {
        let mut deleted = 0;
        while let Some(e) = next_event(&mut stream_a).await {
            if matches!(e.event, Some(Event::Deleted(_))) {
                deleted += 1;
                if deleted == 10 {
                    break;
                }
            }
        }
    })
    .await;
    let new = agent(&s, "nodekeeper-new");
    let mut b = client(&new).await;
    let mut follower = b
        .drain(bearer(request("rollout")))
        .await
        .expect("re-attach on the new process")
        .into_inner();
    assert!(
        record(&s.api)["driver"]
            .as_str()
            .unwrap()
            .starts_with("nodekeeper-old#")
    );
    // The DaemonSet controller deletes the old pod: SIGTERM, graceful shutdown.
    old.proc.signal("TERM");
    old.proc.wait_exit(Duration::from_secs(20));

    let events = within(150, rest(&mut follower)).await;
    let last = events.last().expect("events");
    let Some(Event::Completed(status)) = &last.event else {
        panic!("drain did not complete on the new agent: {last:?}")
    };
    assert_eq!(status.id, "rollout");
    let rec = record(&s.api);
    assert_eq!(rec["phase"], "completed");
    assert!(
        rec["driver"]
            .as_str()
            .unwrap()
            .starts_with("nodekeeper-new#"),
        "{rec}"
    );
    let mut left = s.api.pods_on(NODE);
    left.sort();
    assert_eq!(left, drain_scenario::expected_remaining());
    assert!(
        s.api.pdb_violations().is_empty(),
        "{:?}",
        s.api.pdb_violations()
    );
    // One driver at a time: no pod was admitted for eviction twice.
    let mut admitted = std::collections::HashMap::<String, usize>::new();
    for r in s.api.requests() {
        if r.method == "POST" && r.path.ends_with("/eviction") && r.status == 201 {
            *admitted
                .entry(r.path.rsplit('/').nth(1).unwrap_or_default().to_string())
                .or_default() += 1;
        }
    }
    assert!(admitted.values().all(|n| *n == 1), "{admitted:?}");
    assert_eq!(
        admitted.len(),
        drain_scenario::DEPLOYMENTS * drain_scenario::REPLICAS + 1
    );
}
