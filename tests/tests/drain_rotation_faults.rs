//! The 60-pod rotation drain (tests/src/drain_scenario.rs) against a fake API server that
//! behaves like a busy, real one (issue #16): PDB status written by a lagging disruption
//! controller, pods that take their grace period to go, and injected faults on every kind of
//! call (429 with Retry-After, 503, 504, dropped watches, 410 Gone). The fake's own audit, taken
//! from the pods after every write, must show no budget ever below its minimum, and the drain
//! must complete with every pod but the DaemonSet and mirror pods gone.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use nodekeeper::pb::{drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::Agent;
use nodekeeper_tests::drain_scenario::{self, NODE, drain_all, request};
use nodekeeper_tests::fake_api::{FakeApi, Fault, FaultKind};

const FAST: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  concurrency: 8\n";

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

/// `n` times the same fault on `method path`, for plain requests or watches only.
fn inject(api: &FakeApi, method: &str, path: &str, watch: bool, kind: FaultKind, n: u32) {
    api.inject(Fault::on(method, path, kind).watch(watch).times(n));
}

/// Statuses answered to (non-watch) requests matching `method` and `path`.
fn statuses(api: &FakeApi, method: &str, path: &str, watch: bool) -> Vec<u16> {
    api.requests()
        .iter()
        .filter(|r| {
            r.method == method && r.path.contains(path) && r.query.contains("watch=true") == watch
        })
        .map(|r| r.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_60_pod_rotation_through_faults_breaks_no_budget_and_leaves_no_pod() {
    let s = drain_scenario::rotation_on(
        FakeApi::builder()
            .replace_delay(Duration::from_millis(200))
            .ready_delay(Duration::from_millis(500))
            .pdb_lag(Duration::from_millis(300))
            .grace_second(Duration::from_millis(100)),
        Some(5),
    );
    let agent = Agent::builder()
        .config(FAST)
        .with_token()
        .connected(&s.kubeconfig, NODE)
        .start();
    let mut c = NodeAgentClient::connect(agent.grpc_url())
        .await
        .expect("connect");
    let api = &s.api;
    let throttle = || FaultKind::TooManyRequests {
        retry_after_seconds: 1,
    };
    // Evictions: APF 429s, 503s, 504s, in that order, spread over the first dozen attempts.
    inject(api, "POST", "/eviction", false, throttle(), 4);
    inject(api, "POST", "/eviction", false, FaultKind::Unavailable, 4);
    inject(
        api,
        "POST",
        "/eviction",
        false,
        FaultKind::GatewayTimeout,
        4,
    );
    // The per-pod GETs that prove a pod gone.
    inject(
        api,
        "GET",
        "/api/v1/namespaces/apps/pods/",
        false,
        FaultKind::Unavailable,
        3,
    );
    inject(
        api,
        "GET",
        "/api/v1/namespaces/apps/pods/",
        false,
        FaultKind::GatewayTimeout,
        3,
    );
    inject(
        api,
        "GET",
        "/api/v1/namespaces/apps/pods/",
        false,
        throttle(),
        2,
    );
    // The Node state PATCHes (cordon, progress annotation).
    inject(
        api,
        "PATCH",
        "/api/v1/nodes/node-a",
        false,
        FaultKind::Unavailable,
        1,
    );
    inject(
        api,
        "PATCH",
        "/api/v1/nodes/node-a",
        false,
        FaultKind::GatewayTimeout,
        1,
    );
    inject(api, "PATCH", "/api/v1/nodes/node-a", false, throttle(), 1);
    // The pod LIST and the node's pod watch: a 503 on the LIST, watches that drop after a
    // second, and one 410 Gone on a watch resuming from an old resourceVersion.
    inject(api, "GET", "/api/v1/pods", false, FaultKind::Unavailable, 1);
    inject(
        api,
        "GET",
        "/api/v1/pods",
        true,
        FaultKind::DropWatchAfter(Duration::from_secs(1)),
        3,
    );
    inject(api, "GET", "/api/v1/pods", true, FaultKind::Expired, 1);

    let events = within(170, drain_all(&mut c, request("rot-faults"))).await;
    let last = events.last().expect("events");
    let Some(Event::Completed(status)) = &last.event else {
        panic!("drain did not complete: {last:?}")
    };
    assert_eq!(
        status.done.len(),
        drain_scenario::DEPLOYMENTS * drain_scenario::REPLICAS + 1
    );

    // Every pod but the DaemonSet and mirror pods is gone: not Terminating, gone.
    let mut left = api.pods_on(NODE);
    left.sort();
    assert_eq!(left, drain_scenario::expected_remaining());

    // The fake's audit: no budget below its minimum at any write, and the budgets were really
    // exercised (each went down to exactly its minimum at some point).
    assert!(
        api.pdb_violations().is_empty(),
        "a budget went below its minimum: {:?}",
        api.pdb_violations()
    );
    let audit = api.pdb_audit();
    for d in 0..drain_scenario::DEPLOYMENTS {
        let pdb = format!("apps/d{d}-pdb");
        assert!(
            audit
                .iter()
                .any(|a| a.pdb == pdb && a.healthy == a.desired_healthy),
            "{pdb} never reached its minimum: the drain did not press on it"
        );
    }
    // The budgets pushed back (429 with a DisruptionBudget cause) and the drain waited.
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::Blocked(b)) if b.budget.ends_with("-pdb"))),
        "no blocked event naming a budget"
    );

    // Every injected fault was met.
    let evictions = statuses(api, "POST", "/eviction", false);
    for code in [429, 503, 504] {
        assert!(evictions.contains(&code), "eviction: no {code}");
    }
    let gets = statuses(api, "GET", "/api/v1/namespaces/apps/pods/", false);
    for code in [429, 503, 504] {
        assert!(gets.contains(&code), "GET pod: no {code} in {gets:?}");
    }
    let patches = statuses(api, "PATCH", "/api/v1/nodes/node-a", false);
    for code in [429, 503, 504] {
        assert!(
            patches.contains(&code),
            "PATCH node: no {code} in {patches:?}"
        );
    }
    // Not asserted: whether the pod watch reached the armed 410. On merged main the watcher's
    // reconnects after the drops can all fall after the drain's end (open in #16);
    // no test asserts the agent through a 410 on its pod watch until that is fixed.
    let watch = statuses(api, "GET", "/api/v1/pods", true);
    eprintln!("pod watch statuses: {watch:?}");

    // Each pod was admitted for eviction exactly once (a fault answers before the store).
    let mut admitted: HashMap<String, usize> = HashMap::new();
    for r in api.requests() {
        if r.method == "POST" && r.path.ends_with("/eviction") && r.status == 201 {
            let pod = r.path.rsplit('/').nth(1).unwrap_or_default().to_string();
            *admitted.entry(pod).or_default() += 1;
        }
    }
    assert!(
        admitted.values().all(|n| *n == 1),
        "a pod was evicted twice: {admitted:?}"
    );
}
