//! The fake API server's disruption controller and eviction handler (docs/fake-api-server.md,
//! section 5): PDB status is computed asynchronously, a configurable lag after each change, and
//! the eviction handler decides from that status as kubernetes' eviction.go does, recording
//! each approved eviction in `status.disruptedPods` so two evictions racing the controller
//! cannot both take the last disruption.

use std::time::Duration;

use nodekeeper_tests::fake_api::{FakeApi, PdbLimit, PodSeed, Res};
use nodekeeper_tests::wait_for;
use serde_json::{Value, json};

/// One HTTP/1.1 request: status, response head (lowercased) and JSON body.
fn raw(api: &FakeApi, method: &str, path: &str, body: &Value) -> (u16, String, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&api.addr(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        code,
        head.to_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// POSTs a policy/v1 Eviction for `default/{pod}`.
fn evict(api: &FakeApi, pod: &str) -> (u16, String, Value) {
    let body = json!({"apiVersion": "policy/v1", "kind": "Eviction",
                      "metadata": {"name": pod, "namespace": "default"}});
    raw(
        api,
        "POST",
        &format!("/api/v1/namespaces/default/pods/{pod}/eviction"),
        &body,
    )
}

fn pdb_status(api: &FakeApi, name: &str) -> Value {
    api.get(Res::PodDisruptionBudgets, "default", name).unwrap()["status"].clone()
}

fn cause(body: &Value) -> String {
    body["details"]["causes"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Three Ready `app=web` pods under `minAvailable: 1` (two disruptions allowed).
fn three_web_pods(api: &FakeApi) {
    for p in ["w1", "w2", "w3"] {
        api.add_pod(PodSeed::new(p).node("node-a").label("app", "web"));
    }
    api.add_pdb(
        "default",
        "web",
        &[("app", "web")],
        PdbLimit::MinAvailable(1),
        None,
    );
}

/// The status lags the pods: with the controller paused a pod turning unready changes nothing
/// until the controller runs; with a lag the status catches up on its own.
#[test]
fn pdb_status_is_written_by_a_lagging_controller_not_by_each_write() {
    let api = FakeApi::builder().pdb_controller_paused().start();
    three_web_pods(&api);
    assert!(pdb_status(&api, "web").is_null(), "paused: no status yet");
    api.sync_pdbs();
    assert_eq!(pdb_status(&api, "web")["disruptionsAllowed"], 2);
    api.set_pod_ready("default", "w1", false);
    assert_eq!(
        pdb_status(&api, "web")["currentHealthy"],
        3,
        "the status must not follow the pod until the controller runs"
    );
    api.sync_pdbs();
    assert_eq!(pdb_status(&api, "web")["currentHealthy"], 2);

    let api = FakeApi::builder()
        .pdb_lag(Duration::from_millis(300))
        .start();
    three_web_pods(&api);
    assert_eq!(pdb_status(&api, "web")["currentHealthy"], 3);
    api.set_pod_ready("default", "w1", false);
    wait_for(
        Duration::from_secs(10),
        "the controller to catch up",
        || (pdb_status(&api, "web")["currentHealthy"] == 2).then_some(()),
    );
    assert_eq!(pdb_status(&api, "web")["disruptionsAllowed"], 1);
}

/// The handler trusts the status, as the API server does: a stale status that still allows a
/// disruption admits an eviction the pods no longer afford, and the fake's audit (computed from
/// the pods, not the status) records the violation. This is what makes "never broke a budget"
/// a property a test can fail.
#[test]
fn eviction_decides_from_status_and_the_audit_catches_a_stale_one() {
    let api = FakeApi::builder().pdb_controller_paused().start();
    for p in ["w1", "w2"] {
        api.add_pod(PodSeed::new(p).node("node-a").label("app", "web"));
    }
    api.add_pdb(
        "default",
        "web",
        &[("app", "web")],
        PdbLimit::MinAvailable(1),
        None,
    );
    api.sync_pdbs();
    assert_eq!(pdb_status(&api, "web")["disruptionsAllowed"], 1);
    // w2 dies; the controller has not noticed.
    api.set_pod_ready("default", "w2", false);
    let (code, _, _) = evict(&api, "w1");
    assert_eq!(code, 201, "the stale status allowed one disruption");
    let violations = api.pdb_violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].pdb, "default/web");
    assert_eq!(
        (violations[0].healthy, violations[0].desired_healthy),
        (0, 1)
    );

    // And the other way round: a status saying 0 refuses although the pods could afford it.
    let api = FakeApi::builder().pdb_controller_paused().start();
    three_web_pods(&api);
    api.set_pdb_status(
        "default",
        "web",
        json!({"observedGeneration": 1, "disruptionsAllowed": 0, "currentHealthy": 3,
               "desiredHealthy": 3, "expectedPods": 3}),
    );
    let (code, _, body) = evict(&api, "w1");
    assert_eq!(code, 429);
    assert_eq!(
        cause(&body),
        "The disruption budget web needs 3 healthy pods and has 3 currently"
    );
}

/// checkAndDecrement: each admitted eviction takes one disruption from the status at once and
/// records the pod in `disruptedPods`, so evictions that come faster than the controller cannot
/// overdraw the budget; the controller later drops the entries of pods being deleted and keeps
/// the others out of the healthy count.
#[test]
fn evictions_faster_than_the_controller_cannot_overdraw_a_budget() {
    let api = FakeApi::builder()
        .pdb_controller_paused()
        .grace_second(Duration::from_secs(3600))
        .start();
    for p in ["w1", "w2", "w3"] {
        api.add_pod(
            PodSeed::new(p)
                .node("node-a")
                .label("app", "web")
                .grace_period(30),
        );
    }
    api.add_pdb(
        "default",
        "web",
        &[("app", "web")],
        PdbLimit::MinAvailable(1),
        None,
    );
    api.sync_pdbs();
    assert_eq!(evict(&api, "w1").0, 201);
    let st = pdb_status(&api, "web");
    assert_eq!(st["disruptionsAllowed"], 1);
    assert!(st["disruptedPods"]["w1"].is_string(), "{st}");
    assert_eq!(evict(&api, "w2").0, 201);
    let (code, _, body) = evict(&api, "w3");
    assert_eq!(code, 429, "{body}");
    assert_eq!(
        pdb_status(&api, "web")["conditions"][0]["reason"],
        "InsufficientPods"
    );
    assert!(api.pdb_violations().is_empty());
    // The evicted pods are Terminating and marked as the eviction API's targets.
    let w1 = api.pod("default", "w1").unwrap();
    assert!(w1["metadata"]["deletionTimestamp"].is_string());
    assert!(
        w1["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "DisruptionTarget" && c["reason"] == "EvictionByEvictionAPI"),
        "{w1}"
    );
    // The controller sees them terminating: entries dropped, healthy 1, nothing allowed.
    api.sync_pdbs();
    let st = pdb_status(&api, "web");
    assert!(st["disruptedPods"].is_null(), "{st}");
    assert_eq!(
        (
            st["currentHealthy"].clone(),
            st["disruptionsAllowed"].clone()
        ),
        (json!(1), json!(0))
    );
}

/// An eviction approved by the budget whose delete then fails (the UID precondition names a
/// pod that was replaced under the same name) keeps its `disruptedPods` entry: the controller
/// keeps that pod out of the healthy count until the entry's timeout, as upstream.
#[test]
fn a_disrupted_pod_that_was_not_deleted_counts_unhealthy_until_the_timeout() {
    let api = FakeApi::builder()
        .pdb_controller_paused()
        .disrupted_pod_timeout(Duration::from_secs(2))
        .start();
    three_web_pods(&api);
    api.sync_pdbs();
    let body = json!({"apiVersion": "policy/v1", "kind": "Eviction",
                      "metadata": {"name": "w1", "namespace": "default"},
                      "deleteOptions": {"preconditions": {"uid": "not-the-uid"}}});
    let (code, _, _) = raw(
        &api,
        "POST",
        "/api/v1/namespaces/default/pods/w1/eviction",
        &body,
    );
    assert_eq!(code, 409);
    assert!(api.pod("default", "w1").is_some());
    api.sync_pdbs();
    let st = pdb_status(&api, "web");
    assert!(st["disruptedPods"]["w1"].is_string(), "{st}");
    assert_eq!(st["currentHealthy"], 2, "w1 is promised away: not healthy");
    wait_for(Duration::from_secs(10), "the entry to expire", || {
        api.sync_pdbs();
        pdb_status(&api, "web")["disruptedPods"]
            .is_null()
            .then_some(())
    });
    assert_eq!(pdb_status(&api, "web")["currentHealthy"], 3);
}

/// A PDB whose spec changed since the controller last saw it (`observedGeneration <
/// generation`) refuses evictions with eviction.go's "still being processed" 429, which carries
/// `Retry-After: 10` and a DisruptionBudget cause; a new PDB is in that state until the first
/// controller pass.
#[test]
fn a_budget_not_yet_observed_is_429_still_being_processed() {
    let api = FakeApi::builder().pdb_controller_paused().start();
    three_web_pods(&api);
    let (code, head, body) = evict(&api, "w1");
    assert_eq!(code, 429);
    assert!(head.contains("retry-after: 10"), "{head}");
    assert_eq!(body["details"]["retryAfterSeconds"], 10);
    assert_eq!(body["details"]["causes"][0]["reason"], "DisruptionBudget");
    assert_eq!(
        cause(&body),
        "The disruption budget web is still being processed by the server."
    );
    api.sync_pdbs();
    api.edit(Res::PodDisruptionBudgets, "default", "web", |pdb| {
        pdb["spec"]["minAvailable"] = json!(2)
    });
    assert_eq!(evict(&api, "w1").0, 429, "generation 2 not observed yet");
    api.sync_pdbs();
    assert_eq!(pdb_status(&api, "web")["observedGeneration"], 2);
    assert_eq!(evict(&api, "w1").0, 201);
}
