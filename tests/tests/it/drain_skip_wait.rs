//! kubectl's `--skip-wait-for-delete-timeout` in the agent (issue #16): a pod that stays
//! Terminating (a finalizer nobody removes) is waited for only that long, then counted as done
//! as kubectl's waitForDelete does; a pod already Terminating for longer when the drain starts is
//! neither evicted nor waited for (kubectl's skipDeletedFilter). Without the option the drain
//! keeps waiting (drain_wire::a_pod_held_by_a_finalizer_is_never_counted_as_gone).

use std::time::Duration;

use nodekeeper::pb::{drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::{NODE, Scenario, request};
use nodekeeper_tests::fake_api::{FakeApi, PodSeed, Res};
use nodekeeper_tests::{Agent, bearer};
use serde_json::json;

const FAST: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n";

#[tokio::test(flavor = "multi_thread")]
async fn pods_terminating_longer_than_the_timeout_are_not_waited_for() {
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    api.add_replicaset("default", "web", &[("app", "web")], 2, &[("app", "web")]);
    // Held by a finalizer once evicted: Terminating forever.
    api.add_pod(
        PodSeed::new("held")
            .node(NODE)
            .label("app", "web")
            .replicaset("web")
            .finalizer("example.com/never"),
    );
    // Terminating for an hour already when the drain starts.
    api.add_pod(
        PodSeed::new("stuck")
            .node(NODE)
            .label("app", "web")
            .replicaset("web")
            .finalizer("example.com/never"),
    );
    api.edit(Res::Pods, "default", "stuck", |p| {
        p["metadata"]["deletionTimestamp"] = json!("2020-01-01T00:00:00Z");
        p["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let s = Scenario {
        api,
        dir,
        kubeconfig,
    };
    let agent = Agent::builder()
        .config(FAST)
        .with_token()
        .connected(&s.kubeconfig, NODE)
        .start();
    let mut c = NodeAgentClient::connect(agent.grpc_url()).await.unwrap();
    let mut req = request("skip");
    req.skip_wait_for_delete_timeout = Some(prost_types::Duration {
        seconds: 2,
        nanos: 0,
    });
    let mut stream = c.drain(bearer(req)).await.unwrap().into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(e) = stream.message().await.expect("stream") {
            events.push(e);
        }
    })
    .await
    .expect("the drain ended");
    let Some(Event::Completed(status)) = events.last().and_then(|e| e.event.clone()) else {
        panic!("not completed: {:?}", events.last())
    };
    // The stuck pod was left out of the plan; the held one was evicted and then not waited for.
    let planned = events
        .iter()
        .find_map(|e| match &e.event {
            Some(Event::Planned(p)) => Some(p.clone()),
            _ => None,
        })
        .expect("planned");
    assert!(
        planned.plan.iter().all(|p| p.name != "stuck"),
        "{planned:?}"
    );
    assert!(
        planned
            .skipped
            .iter()
            .any(|p| p.name == "stuck" && p.reason == "terminating-too-long"),
        "{planned:?}"
    );
    assert_eq!(status.done, ["default/held"]);
    let evictions: Vec<String> = s
        .api
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/eviction"))
        .map(|r| r.path.clone())
        .collect();
    assert!(
        evictions.iter().all(|p| !p.contains("/stuck/")),
        "{evictions:?}"
    );
    let held = s
        .api
        .pod("default", "held")
        .expect("still held by its finalizer");
    assert!(held["metadata"]["deletionTimestamp"].is_string());
}
