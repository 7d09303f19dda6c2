//! Drain against a fake API server that behaves like a real, busy one (issue #16): the exact
//! eviction body on the wire under strict field validation, "gone" only by proof (graceful
//! termination, slow-to-sync watches, 409s), injected faults on every kind of call, stuck causes
//! reported at once. Every test runs under a timeout.

use std::future::Future;
use std::time::Duration;

use nodekeeper::pb::{self, drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::{NODE, Scenario, drain_all, request};
use nodekeeper_tests::fake_api::{FakeApi, Fault, FaultKind, PodSeed};
use nodekeeper_tests::{Agent, bearer};
use serde_json::{Value, json};
use tonic::transport::Channel;

const FAST: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  concurrency: 8\n";

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

fn scenario(api: FakeApi) -> Scenario {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    Scenario {
        api,
        dir,
        kubeconfig,
    }
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

fn uid(api: &FakeApi, ns: &str, name: &str) -> String {
    api.pod(ns, name).expect("pod")["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_eviction_body_on_the_wire_is_a_typed_policy_v1_eviction_with_grace_and_uid() {
    // Strict field validation (the fake's default): kube's `Api::evict` body, keyed
    // `delete_options`, would be a 400 here.
    let api = FakeApi::builder()
        .grace_second(Duration::from_millis(20))
        .start();
    api.add_node(NODE, &[]);
    api.add_replicaset("default", "web", &[("app", "web")], 1, &[("app", "web")]);
    api.add_pod(
        PodSeed::new("web-1")
            .node(NODE)
            .label("app", "web")
            .replicaset("web")
            .grace_period(30),
    );
    let web_uid = uid(&api, "default", "web-1");
    let s = scenario(api);
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let mut req = request("wire");
    req.grace_period_seconds = Some(7);
    let events = within(60, drain_all(&mut c, req)).await;
    assert!(
        matches!(events.last().unwrap().event, Some(Event::Completed(_))),
        "{:?}",
        events.last()
    );
    let posts: Vec<_> = s
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/eviction"))
        .collect();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(
        posts[0].path,
        "/api/v1/namespaces/default/pods/web-1/eviction"
    );
    assert_eq!(posts[0].status, 201);
    let body: Value = serde_json::from_str(&posts[0].body).expect("JSON body");
    assert_eq!(
        body,
        json!({
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": "web-1", "namespace": "default"},
            "deleteOptions": {"gracePeriodSeconds": 7, "preconditions": {"uid": web_uid}},
        })
    );
}

/// A ReplicaSet `web` of `n` pods on the node, each taking `grace` (scaled) seconds to go.
fn web_pods(api: &FakeApi, n: usize, grace: i64) {
    api.add_node(NODE, &[]);
    api.add_node("node-other", &[]);
    api.add_replicaset(
        "default",
        "web",
        &[("app", "web")],
        n as i64,
        &[("app", "web")],
    );
    for i in 0..n {
        api.add_pod(
            PodSeed::new(&format!("web-{i}"))
                .node(NODE)
                .label("app", "web")
                .replicaset("web")
                .grace_period(grace),
        );
    }
}

/// A drain of pods that take their grace period to go sends one GET per pod, the proof, when
/// its pod watch is synced: not a first GET right after the eviction, while the pod is
/// certainly still Terminating. (A `deletionPoll` far beyond the grace period, so no poll tick
/// adds a GET.)
#[tokio::test(flavor = "multi_thread")]
async fn a_synced_watch_spares_the_get_while_a_pod_is_still_terminating() {
    let api = FakeApi::builder()
        .grace_second(Duration::from_millis(100))
        .start();
    web_pods(&api, 4, 5);
    let s = scenario(api);
    let agent = Agent::builder()
        .config(&FAST.replace("deletionPoll: 200ms", "deletionPoll: 60s"))
        .with_token()
        .connected(&s.kubeconfig, NODE)
        .start();
    // Synced: kube-runtime opens the watch only after its LIST filled the store.
    nodekeeper_tests::wait_for(Duration::from_secs(30), "the agent's pod watch", || {
        s.api
            .requests()
            .iter()
            .any(|r| r.path == "/api/v1/pods" && r.query.contains("watch=true"))
            .then_some(())
    });
    let mut c = client(&agent).await;
    let events = within(60, drain_all(&mut c, request("one-get"))).await;
    assert!(
        matches!(events.last().unwrap().event, Some(Event::Completed(_))),
        "{:?}",
        events.last()
    );
    assert!(web_left(&s.api).is_empty());
    for i in 0..4 {
        let gets = statuses(&s.api, "GET", &format!("/namespaces/default/pods/web-{i}"));
        assert_eq!(gets, [404], "web-{i}: one GET, the one that proves it gone");
    }
}

/// The planned pods still present on the node (terminating or not).
fn web_left(api: &FakeApi) -> Vec<String> {
    let mut left: Vec<String> = api
        .pods_on(NODE)
        .into_iter()
        .filter(|n| n.starts_with("web-"))
        .collect();
    left.sort();
    left
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_drain_with_a_slow_to_sync_watch_completes_only_once_the_pods_are_gone() {
    // Pods take 20 s to terminate; the restarted agent's pod watch needs 12 s to sync (longer
    // than any API call timeout), so an empty, unsynced store must not count as "all gone".
    let api = FakeApi::start();
    web_pods(&api, 4, 20);
    let s = scenario(api);
    let mut first = agent(&s);
    let mut c = client(&first).await;
    let mut stream = within(10, c.drain(bearer(request("resume-slow"))))
        .await
        .unwrap()
        .into_inner();
    // Wait until every pod is Terminating, then kill the agent.
    within(30, async {
        loop {
            let terminating = s
                .api
                .pods()
                .iter()
                .filter(|p| {
                    p["spec"]["nodeName"] == NODE && !p["metadata"]["deletionTimestamp"].is_null()
                })
                .count();
            if terminating == 4 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), stream.message()).await;
        }
    })
    .await;
    first.proc.signal("KILL");
    first.proc.wait_exit(Duration::from_secs(5));
    s.api.inject(
        Fault::on(
            "GET",
            "/api/v1/pods",
            FaultKind::Delay(Duration::from_secs(12)),
        )
        .query("limit=")
        .watch(false),
    );
    let second = agent(&s);
    let mut c = client(&second).await;
    let events = within(90, drain_all(&mut c, request("resume-slow"))).await;
    let left_at_end = web_left(&s.api);
    let Some(Event::Completed(status)) = &events.last().unwrap().event else {
        panic!("{:?}", events.last())
    };
    assert!(
        left_at_end.is_empty(),
        "completed while {left_at_end:?} still ran (status {status:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_409_on_eviction_for_a_pod_that_still_exists_is_retried_not_taken_as_gone() {
    let api = FakeApi::start();
    web_pods(&api, 1, 0);
    api.inject(Fault::on(
        "POST",
        "/pods/web-0/eviction",
        FaultKind::Conflict,
    ));
    let s = scenario(api);
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let events = within(60, drain_all(&mut c, request("conflict"))).await;
    let left_at_end = web_left(&s.api);
    assert!(
        matches!(events.last().unwrap().event, Some(Event::Completed(_))),
        "{:?}",
        events.last()
    );
    assert!(
        left_at_end.is_empty(),
        "completed while {left_at_end:?} ran"
    );
    let statuses: Vec<u16> = s
        .api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/web-0/eviction"))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [409, 201], "evicted again after the 409");
}

/// Injects a 429 (with Retry-After), a 503 and a 504 for the next calls matching `method path`.
fn three_faults(api: &FakeApi, method: &str, path: &str) {
    for kind in [
        FaultKind::TooManyRequests {
            retry_after_seconds: 1,
        },
        FaultKind::Unavailable,
        FaultKind::GatewayTimeout,
    ] {
        api.inject(Fault::on(method, path, kind).watch(false));
    }
}

/// Statuses the fake answered for requests matching `method` and `path`.
fn statuses(api: &FakeApi, method: &str, path: &str) -> Vec<u16> {
    api.requests()
        .iter()
        .filter(|r| r.method == method && r.path.contains(path) && !r.query.contains("watch=true"))
        .map(|r| r.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_completes_through_a_429_a_503_and_a_504_on_every_kind_of_call() {
    let api = FakeApi::start();
    web_pods(&api, 2, 0);
    let s = scenario(api);
    let agent = agent(&s);
    let mut c = client(&agent).await;
    // After start-up, so the pod watch's own LIST does not take the LIST faults.
    three_faults(&s.api, "PATCH", "/api/v1/nodes/node-a");
    three_faults(&s.api, "GET", "/api/v1/pods");
    three_faults(&s.api, "GET", "/api/v1/namespaces/default/pods/web-");
    three_faults(&s.api, "POST", "/eviction");
    let events = within(90, drain_all(&mut c, request("faults"))).await;
    assert!(
        matches!(events.last().unwrap().event, Some(Event::Completed(_))),
        "{:?}",
        events.last()
    );
    assert!(web_left(&s.api).is_empty());
    for (method, path) in [
        ("PATCH", "/api/v1/nodes/node-a"),
        ("GET", "/api/v1/pods"),
        ("GET", "/api/v1/namespaces/default/pods/web-"),
        ("POST", "/eviction"),
    ] {
        let seen = statuses(&s.api, method, path);
        for code in [429, 503, 504] {
            assert!(
                seen.contains(&code),
                "{method} {path}: no {code} in {seen:?}"
            );
        }
    }
    // The eviction's 429 was API throttling, not a budget, and is reported as such.
    let throttled: Vec<&pb::Blocked> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Blocked(b)) => Some(b),
            _ => None,
        })
        .collect();
    assert!(
        throttled
            .iter()
            .any(|b| b.budget.is_empty() && b.message.contains("throttled by the API server")),
        "{throttled:?}"
    );
    let reasons: Vec<String> = s
        .api
        .events()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(String::from))
        .collect();
    assert!(reasons.iter().any(|r| r == "DrainThrottled"), "{reasons:?}");
    assert!(!reasons.iter().any(|r| r == "DrainBlocked"), "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_403_eviction_fails_the_drain_at_once_naming_the_cause() {
    let api = FakeApi::start();
    web_pods(&api, 1, 0);
    api.inject(
        Fault::on(
            "POST",
            "/eviction",
            FaultKind::Status {
                code: 403,
                reason: "Forbidden",
                message: "pods \"web-0\" is forbidden: User \"system:serviceaccount:nodekeeper-system:nodekeeper\" cannot create resource \"pods/eviction\"".into(),
            },
        )
        .always(),
    );
    let s = scenario(api);
    let agent = agent(&s);
    let mut c = client(&agent).await;
    // The deadline is 120 s; the answer must come long before it.
    let events = within(60, drain_all(&mut c, request("forbidden"))).await;
    let Some(Event::Failed(status)) = &events.last().unwrap().event else {
        panic!("{:?}", events.last())
    };
    assert!(
        status.error.contains("default/web-0") && status.error.contains("403 Forbidden"),
        "{}",
        status.error
    );
    assert_eq!(statuses(&s.api, "POST", "/eviction"), [403], "not retried");
    // No fallback: kubectl's --disable-eviction would DELETE a pod it may not evict, which
    // skips every budget. The pod stays, and the node stays cordoned after the failure.
    let deletes = statuses(&s.api, "DELETE", "/pods/");
    assert!(deletes.is_empty(), "a pod was deleted: {deletes:?}");
    assert_eq!(web_left(&s.api), ["web-0"]);
    assert_eq!(s.api.node(NODE).unwrap()["spec"]["unschedulable"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_under_two_budgets_fails_the_drain_at_once() {
    let api = FakeApi::start();
    web_pods(&api, 2, 0);
    for name in ["web-pdb", "web-pdb-2"] {
        api.add_pdb(
            "default",
            name,
            &[("app", "web")],
            nodekeeper_tests::fake_api::PdbLimit::MinAvailable(1),
            None,
        );
    }
    let s = scenario(api);
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let events = within(60, drain_all(&mut c, request("two-pdbs"))).await;
    let Some(Event::Failed(status)) = &events.last().unwrap().event else {
        panic!("{:?}", events.last())
    };
    assert!(
        status.error.contains("more than one PodDisruptionBudget"),
        "{}",
        status.error
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timed_out_drain_names_no_budget_that_stopped_blocking_and_replays_one_blocked_per_pod() {
    // `a-0` is blocked by a-pdb until a second `a` pod turns up elsewhere; `slow-0` then takes
    // longer than the deadline to terminate. The end must not blame a-pdb.
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    api.add_node("node-other", &[]);
    api.add_replicaset("default", "a", &[("app", "a")], 1, &[("app", "a")]);
    api.add_pod(
        PodSeed::new("a-0")
            .node(NODE)
            .label("app", "a")
            .replicaset("a"),
    );
    api.add_replicaset("default", "slow", &[("app", "slow")], 1, &[("app", "slow")]);
    api.add_pod(
        PodSeed::new("slow-0")
            .node(NODE)
            .label("app", "slow")
            .replicaset("slow")
            .grace_period(600),
    );
    api.add_pdb(
        "default",
        "a-pdb",
        &[("app", "a")],
        nodekeeper_tests::fake_api::PdbLimit::MinAvailable(1),
        None,
    );
    let s = scenario(api);
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let mut req = request("stale-error");
    req.timeout = Some(prost_types::Duration {
        seconds: 6,
        nanos: 0,
    });
    let mut stream = within(10, c.drain(bearer(req.clone())))
        .await
        .unwrap()
        .into_inner();
    let mut blocked = 0;
    while blocked < 3 {
        if let Some(Event::Blocked(_)) = within(30, stream.message()).await.unwrap().unwrap().event
        {
            blocked += 1;
        }
    }
    s.api.add_pod(
        PodSeed::new("a-elsewhere")
            .node("node-other")
            .label("app", "a"),
    );
    let mut last = None;
    while let Some(e) = within(30, stream.message()).await.unwrap() {
        last = Some(e);
    }
    let Some(Event::TimedOut(status)) = last.and_then(|e| e.event) else {
        panic!("not timed out")
    };
    assert!(s.api.pod("default", "a-0").is_none(), "a-0 was evicted");
    assert!(!status.error.contains("a-pdb"), "{}", status.error);
    assert!(
        status.done.iter().all(|d| d.contains('/')),
        "{:?}",
        status.done
    );
    // Re-attaching replays one `blocked` for a-0, not one per retry.
    let replay = within(30, drain_all(&mut c, req)).await;
    let replayed_blocked = replay
        .iter()
        .filter(|e| matches!(e.event, Some(Event::Blocked(_))))
        .count();
    assert_eq!(replayed_blocked, 1, "{replay:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_held_by_a_finalizer_is_never_counted_as_gone() {
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    api.add_replicaset("default", "web", &[("app", "web")], 1, &[("app", "web")]);
    api.add_pod(
        PodSeed::new("web-0")
            .node(NODE)
            .label("app", "web")
            .replicaset("web")
            .finalizer("example.com/keep"),
    );
    let s = scenario(api);
    let agent = agent(&s);
    let mut c = client(&agent).await;
    let mut req = request("finalizer");
    req.timeout = Some(prost_types::Duration {
        seconds: 3,
        nanos: 0,
    });
    let events = within(30, drain_all(&mut c, req)).await;
    assert!(
        matches!(events.last().unwrap().event, Some(Event::TimedOut(_))),
        "{:?}",
        events.last()
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event, Some(Event::Deleted(_)))),
        "a Terminating pod was reported deleted"
    );
    assert_eq!(web_left(&s.api), ["web-0"]);
    // Not forced away either: no DELETE (with or without gracePeriodSeconds=0) on any pod.
    let deletes = statuses(&s.api, "DELETE", "/pods/");
    assert!(deletes.is_empty(), "a pod was deleted: {deletes:?}");
}
