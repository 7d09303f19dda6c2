//! The 60-pod rotation drain (tests/src/drain_scenario.rs) against a fake API server that
//! behaves like a busy, real one (issue #16): PDB status written by a lagging disruption
//! controller, pods that take their grace period to go, and injected faults on every kind of
//! call (429 with Retry-After, 503, 504, an API server restart mid-drain whose watch resumes drop
//! and then meet 410 Gone). The fake's own audit, taken
//! from the pods after every write, must show no budget ever below its minimum, and the drain
//! must complete with every pod but the DaemonSet and mirror pods gone.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use nodekeeper::pb::{drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::Agent;
use nodekeeper_tests::drain_scenario::{self, NODE, drain_all, request};
use nodekeeper_tests::fake_api::{FakeApi, Fault, FaultKind, RecordedRequest};

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

/// The `resourceVersion` parameter of a raw query.
fn resource_version(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
}

/// Pods admitted for eviction when the fake restarts the pod watches: by then evictions are
/// paced by the budgets, so the whole watch recovery falls inside the drain.
const ADMITTED_BEFORE_RESTART: usize = 12;

/// Waits until the drain is well under way (`ADMITTED_BEFORE_RESTART` pods admitted for
/// eviction, one of node-a's pods still Terminating), then restarts the fake's pod watches as an
/// API server restart does: the agent's watch, opened at its start and good for the watcher's
/// 290 s, ends; the next two resumes drop after 300 ms, the third meets a 410 "too old resource
/// version", and the watcher's relist LIST meets a 503. Returns how many pods were on node-a.
///
/// Faults armed at the test's start never reached the pod watch: they match new requests only,
/// and the agent's one watch outlived the drain.
async fn restart_pod_watches_mid_drain(api: &FakeApi) -> usize {
    loop {
        let admitted = api
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/eviction") && r.status == 201)
            .count();
        let terminating = api.pods().iter().any(|p| {
            p["spec"]["nodeName"] == NODE && p["metadata"]["deletionTimestamp"].is_string()
        });
        if admitted >= ADMITTED_BEFORE_RESTART && terminating {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_node = api.pods_on(NODE).len();
    inject(
        api,
        "GET",
        "/api/v1/pods",
        true,
        FaultKind::DropWatchAfter(Duration::from_millis(300)),
        2,
    );
    inject(api, "GET", "/api/v1/pods", true, FaultKind::Expired, 1);
    api.inject(
        Fault::on("GET", "/api/v1/pods", FaultKind::Unavailable)
            .watch(false)
            .query("limit="),
    );
    api.end_watches("/api/v1/pods");
    on_node
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
    // The drain's own pod LIST.
    inject(api, "GET", "/api/v1/pods", false, FaultKind::Unavailable, 1);

    let (events, on_node_at_restart) = within(170, async {
        tokio::join!(
            drain_all(&mut c, request("rot-faults")),
            restart_pod_watches_mid_drain(api)
        )
    })
    .await;
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
    // The agent's pod watch went through the restart: two resumes dropped, the third met the
    // 410, and the watcher relisted (its first LIST 503ed) and watched again, all before the
    // drain's last eviction.
    assert!(
        on_node_at_restart > drain_scenario::expected_remaining().len(),
        "the restart came after the drain"
    );
    let log = api.requests();
    let is_pod_watch =
        |r: &RecordedRequest| r.path == "/api/v1/pods" && r.query.contains("watch=true");
    let is_relist = |r: &RecordedRequest| {
        r.path == "/api/v1/pods" && !r.query.contains("watch=true") && r.query.contains("limit=")
    };
    let expired = log
        .iter()
        .position(|r| is_pod_watch(r) && r.watch_error == Some(410))
        .expect("no pod watch met the 410");
    let resumes: Vec<&RecordedRequest> =
        log[..=expired].iter().filter(|r| is_pod_watch(r)).collect();
    assert_eq!(
        resumes.len(),
        4,
        "the first watch and three resumes: {resumes:?}"
    );
    for r in &resumes[1..] {
        let rv = resource_version(&r.query);
        assert!(
            rv.is_some_and(|v| v != "0"),
            "a resume from the last seen version: {}",
            r.query
        );
    }
    let after: Vec<&RecordedRequest> = log[expired + 1..]
        .iter()
        .filter(|r| is_pod_watch(r) || is_relist(r))
        .collect();
    let relisted: Vec<(bool, u16)> = after
        .iter()
        .take(3)
        .map(|r| (is_relist(r), r.status))
        .collect();
    assert_eq!(
        relisted,
        [(true, 503), (true, 200), (false, 200)],
        "after the 410: LIST (503), LIST, watch: {after:?}"
    );
    let relist_at = expired
        + 1
        + log[expired + 1..]
            .iter()
            .position(|r| is_relist(r) && r.status == 200)
            .expect("relist");
    let last_eviction = log
        .iter()
        .rposition(|r| r.method == "POST" && r.path.ends_with("/eviction") && r.status == 201)
        .expect("evictions");
    assert!(
        relist_at < last_eviction,
        "the relist came after the drain's last eviction"
    );

    // Evictions only: a drain whose evictions fail must not fall back to deleting pods.
    let deletes = statuses(api, "DELETE", "/pods/", false);
    assert!(deletes.is_empty(), "pods were deleted: {deletes:?}");

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
