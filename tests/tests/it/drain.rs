//! Drain over gRPC against the fake Kubernetes API server: the rotation scenario end to end,
//! ordering, budgets never violated, deadline, resume after SIGKILL, idempotent re-attach,
//! refusals. Every test runs under a timeout.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use nodekeeper::pb::{self, DrainPhase, drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::{self, NODE, Scenario, drain_all, request};
use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
use nodekeeper_tests::{Agent, bearer, wait_for};
use tonic::transport::Channel;

/// Fast retries so scenarios take seconds, not minutes.
const FAST: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  concurrency: 8\n";

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

fn agent(s: &Scenario) -> Agent {
    Agent::builder()
        .config(FAST)
        .with_token()
        .connected(&s.kubeconfig, NODE)
        .start()
}

async fn client(agent: &Agent) -> NodeAgentClient<Channel> {
    NodeAgentClient::connect(agent.grpc_url())
        .await
        .expect("connect")
}

/// Index of each pod's first Evicting and its Deleted event.
fn timeline(events: &[pb::DrainEvent]) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let (mut evicting, mut deleted) = (HashMap::new(), HashMap::new());
    for (i, e) in events.iter().enumerate() {
        match &e.event {
            Some(Event::Evicting(p)) => {
                evicting.entry(p.name.clone()).or_insert(i);
            }
            Some(Event::Deleted(p)) => {
                deleted.insert(p.name.clone(), i);
            }
            _ => {}
        }
    }
    (evicting, deleted)
}

/// Successful evictions per pod name, from the API server's request log.
fn evictions(api: &FakeApi) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in api.requests() {
        if r.method == "POST" && r.path.ends_with("/eviction") && (200..300).contains(&r.status) {
            let pod = r.path.rsplit('/').nth(1).unwrap_or_default().to_string();
            *out.entry(pod).or_default() += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rotation_scenario_drains_in_order_without_ever_breaking_a_budget() {
    let s = drain_scenario::rotation(Duration::from_millis(200), Duration::from_millis(500));
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let events = within(120, drain_all(&mut c, request("rot-1"))).await;

    let last = events.last().expect("events");
    let Some(Event::Completed(status)) = &last.event else {
        panic!("drain did not complete: {last:?}")
    };
    assert_eq!(status.phase(), DrainPhase::Completed);
    assert_eq!(
        status.done.len(),
        drain_scenario::DEPLOYMENTS * drain_scenario::REPLICAS + 1
    );

    // DaemonSet and mirror pods stayed; everything else left the node.
    let mut left = s.api.pods_on(NODE);
    left.sort();
    assert_eq!(left, drain_scenario::expected_remaining());
    assert!(
        s.api.pdb_violations().is_empty(),
        "a budget went below its minimum: {:?}",
        s.api.pdb_violations()
    );

    // Not-Ready pods went first, the leader last, after every other pod was gone.
    let (evicting, deleted) = timeline(&events);
    let first_regular = evicting
        .iter()
        .filter(|(n, _)| !drain_scenario::NOT_READY.contains(&n.as_str()))
        .map(|(_, i)| *i)
        .min()
        .unwrap();
    for sick in drain_scenario::NOT_READY {
        assert!(
            evicting[sick] < first_regular,
            "{sick} was not evicted first"
        );
    }
    let leader_at = evicting[drain_scenario::LEADER];
    let last_other_gone = deleted
        .iter()
        .filter(|(n, _)| n.as_str() != drain_scenario::LEADER)
        .map(|(_, i)| *i)
        .max()
        .unwrap();
    assert!(
        leader_at > last_other_gone,
        "the leader was evicted before every other pod was gone"
    );

    // Budgets made the drain wait for replacements, and it retried rather than failed.
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::Blocked(b)) if b.budget.ends_with("-pdb"))),
        "no blocked event naming a budget"
    );
    // Each pod was evicted exactly once.
    assert!(
        evictions(&s.api).values().all(|n| *n == 1),
        "a pod was evicted twice: {:?}",
        evictions(&s.api)
    );

    // The node stays cordoned, the state is on the node, Events were recorded.
    let node = s.api.node(NODE).unwrap();
    assert_eq!(node["spec"]["unschedulable"], true);
    let state: serde_json::Value = serde_json::from_str(
        node["metadata"]["annotations"]["nodekeeper.io/drain"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["phase"], "completed");
    let reasons: Vec<String> = s
        .api
        .events()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(String::from))
        .collect();
    for r in ["DrainStarted", "DrainBlocked", "DrainCompleted"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} Event: {reasons:?}");
    }
    let m = agent.metrics_text();
    assert_eq!(
        nodekeeper_tests::sample(&m, "nodekeeper_drains_total", &[("result", "completed")]),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsatisfiable_budget_times_out_naming_it_and_the_node_stays_cordoned() {
    let stuck = drain_scenario::unsatisfiable();
    let (api, kubeconfig) = (&stuck.api, stuck.kubeconfig.clone());
    let agent = Agent::builder()
        .config(FAST)
        .with_token()
        .connected(&kubeconfig, NODE)
        .start();
    let mut c = client(&agent).await;
    let mut req = request("stuck");
    req.timeout = Some(prost_types::Duration {
        seconds: 3,
        nanos: 0,
    });
    let events = within(30, drain_all(&mut c, req)).await;
    let Some(Event::TimedOut(status)) = &events.last().unwrap().event else {
        panic!("{:?}", events.last())
    };
    assert!(status.error.contains("primary-pdb"), "{}", status.error);
    assert_eq!(api.node(NODE).unwrap()["spec"]["unschedulable"], true);
    assert_eq!(api.pods_on(NODE), ["primary-0"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_killed_midway_resumes_from_the_node_and_evicts_no_pod_twice() {
    // Slow replacements keep the drain busy long enough to kill it midway.
    let s = drain_scenario::rotation(Duration::from_millis(300), Duration::from_millis(1500));
    let mut first = agent(&s);
    let mut c = client(&first).await;
    let mut stream = within(10, c.drain(bearer(request("rot-resume"))))
        .await
        .unwrap()
        .into_inner();
    let mut deleted = 0;
    while deleted < 5 {
        if let Some(Event::Deleted(_)) = within(60, stream.message()).await.unwrap().unwrap().event
        {
            deleted += 1;
        }
    }
    first.proc.signal("KILL");
    first.proc.wait_exit(Duration::from_secs(5));
    let before_restart = evictions(&s.api).len();

    let second = Agent::builder()
        .config(FAST)
        .with_token()
        .connected(&s.kubeconfig, NODE)
        .start();
    let mut c = client(&second).await;
    // The orchestrator re-attaches with the same id and sees the drain through.
    let events = within(120, drain_all(&mut c, request("rot-resume"))).await;
    let Some(Event::Completed(status)) = &events.last().unwrap().event else {
        panic!("{:?}", events.last())
    };
    assert_eq!(status.id, "rot-resume");
    let mut left = s.api.pods_on(NODE);
    left.sort();
    assert_eq!(left, drain_scenario::expected_remaining());
    let counts = evictions(&s.api);
    assert!(
        counts.len() > before_restart,
        "the second agent evicted the rest"
    );
    assert!(
        counts.values().all(|n| *n == 1),
        "a pod was evicted twice: {counts:?}"
    );
    assert!(s.api.pdb_violations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_id_is_refused_the_same_id_reattaches_and_uncordon_waits() {
    let s = drain_scenario::rotation(Duration::from_millis(300), Duration::from_millis(1000));
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let mut first = within(10, c.drain(bearer(request("one"))))
        .await
        .unwrap()
        .into_inner();
    within(10, first.message()).await.unwrap();

    let refused = within(10, c.drain(bearer(request("two"))))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    let refused = within(10, c.uncordon(bearer(pb::UncordonRequest::default())))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");

    // Re-attaching replays from the start (the plan first) and follows to the end.
    let events = within(120, drain_all(&mut c, request("one"))).await;
    assert!(
        matches!(events[0].event, Some(Event::Planned(_))),
        "{:?}",
        events[0]
    );
    assert!(matches!(
        events.last().unwrap().event,
        Some(Event::Completed(_))
    ));
    let status = within(10, c.get_drain(pb::GetDrainRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.id.as_str(), status.phase()),
        ("one", DrainPhase::Completed)
    );
    let node = within(10, c.uncordon(bearer(pb::UncordonRequest::default())))
        .await
        .unwrap()
        .into_inner();
    assert!(!node.unschedulable);
    assert_eq!(
        s.api.node(NODE).unwrap()["spec"]["unschedulable"],
        serde_json::Value::Null
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_plans_without_touching_and_refusals_fail_before_any_eviction() {
    let s = drain_scenario::rotation(Duration::from_millis(200), Duration::from_millis(500));
    s.api.add_pod(
        PodSeed::new("scratchy")
            .namespace("apps")
            .node(NODE)
            .replicaset("d0-rs")
            .label("x", "y")
            .empty_dir(),
    );
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let mut dry = request("dry");
    dry.dry_run = true;
    let events = within(30, drain_all(&mut c, dry)).await;
    let Some(Event::Planned(plan)) = &events[0].event else {
        panic!("{events:?}")
    };
    assert_eq!(events.len(), 1);
    let classes = nodekeeper::drain::engine::classes(plan);
    assert_eq!(classes["apps/d0-0"], "not-ready");
    assert_eq!(
        classes[&format!("apps/{}", drain_scenario::LEADER)],
        "leader"
    );
    assert_eq!(plan.skipped.len(), 3);
    assert!(
        plan.error.contains("scratchy") && plan.error.contains("emptyDir"),
        "{}",
        plan.error
    );
    assert_eq!(
        s.api.node(NODE).unwrap()["spec"]["unschedulable"],
        serde_json::Value::Null,
        "dry run cordoned"
    );

    // Without delete_emptydir_data the real drain fails before evicting anything.
    let events = within(30, drain_all(&mut c, request("refused"))).await;
    let Some(Event::Failed(status)) = &events.last().unwrap().event else {
        panic!("{:?}", events.last())
    };
    assert!(status.error.contains("apps/scratchy"), "{}", status.error);
    assert!(evictions(&s.api).is_empty(), "nothing may be evicted");

    // Bad requests name the field.
    let bad = within(
        10,
        c.drain(bearer(pb::DrainRequest {
            id: String::new(),
            ..Default::default()
        })),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("id:"), "{bad}");
    let mut bad_selector = request("sel");
    bad_selector.leader_selector = "role in".into();
    let bad = within(10, c.drain(bearer(bad_selector))).await.unwrap_err();
    assert!(bad.message().starts_with("leader_selector:"), "{bad}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cordon_and_cancel() {
    let s = drain_scenario::rotation(Duration::from_millis(300), Duration::from_millis(2000));
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let node = within(
        10,
        c.cordon(bearer(pb::CordonRequest {
            reason: "kernel CVE".into(),
            ..Default::default()
        })),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(node.unschedulable);
    let mut stream = within(10, c.drain(bearer(request("to-cancel"))))
        .await
        .unwrap()
        .into_inner();
    within(10, stream.message()).await.unwrap();
    let status = within(
        10,
        c.cancel_drain(bearer(pb::CancelDrainRequest {
            id: "to-cancel".into(),
            ..Default::default()
        })),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(status.id, "to-cancel");
    let mut last = None;
    while let Some(e) = within(30, stream.message()).await.unwrap() {
        last = Some(e);
    }
    assert!(matches!(last.unwrap().event, Some(Event::Cancelled(_))));
    wait_for(Duration::from_secs(5), "cancel persisted", || {
        let n = s.api.node(NODE)?;
        n["metadata"]["annotations"]["nodekeeper.io/drain"]
            .as_str()?
            .contains("\"cancelled\"")
            .then_some(())
    });
    // Cancelling backs the drain out, not the cordon: uncordoning is the caller's call.
    assert_eq!(s.api.node(NODE).unwrap()["spec"]["unschedulable"], true);
    let unknown = within(
        10,
        c.cancel_drain(bearer(pb::CancelDrainRequest {
            id: "nope".into(),
            ..Default::default()
        })),
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

/// Issue #15, finding 5: a drain persisted before a restart used to be abandoned when the API
/// server did not answer at start (one read, then "not resuming"). Now the resume is retried
/// with backoff until the API answers, and the drain finishes with nobody re-attaching.
#[tokio::test(flavor = "multi_thread")]
async fn a_persisted_drain_resumes_once_the_api_answers_again_without_anyone_reattaching() {
    use nodekeeper_tests::fake_api::{Fault, FaultKind};
    let s = drain_scenario::rotation(Duration::from_millis(300), Duration::from_millis(1500));
    let mut first = agent(&s);
    let mut c = client(&first).await;
    let mut stream = within(10, c.drain(bearer(request("rot-api-down"))))
        .await
        .unwrap()
        .into_inner();
    let mut deleted = 0;
    while deleted < 3 {
        if let Some(Event::Deleted(_)) = within(60, stream.message()).await.unwrap().unwrap().event
        {
            deleted += 1;
        }
    }
    first.proc.signal("KILL");
    first.proc.wait_exit(Duration::from_secs(5));
    drop(stream);
    // The node cannot be read for a while: more failures than one resume's own retries.
    s.api.inject(
        Fault::on(
            "GET",
            &format!("/api/v1/nodes/{NODE}"),
            FaultKind::Unavailable,
        )
        .watch(false)
        .times(30),
    );
    let second = Agent::builder()
        .config(FAST)
        .with_token()
        .connected(&s.kubeconfig, NODE)
        .live_only()
        .start();
    let finished = within(120, async {
        loop {
            let mut left = s.api.pods_on(NODE);
            left.sort();
            if left == drain_scenario::expected_remaining() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    finished.await;
    assert!(
        second
            .proc
            .log_text()
            .contains("resuming a drain persisted on the node"),
        "{}",
        second.proc.log_text()
    );
    let counts = evictions(&s.api);
    assert!(
        counts.values().all(|n| *n == 1),
        "a pod was evicted twice: {counts:?}"
    );
}
