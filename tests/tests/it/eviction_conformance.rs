//! The fake API server's eviction handler checked against kubernetes' own unit tests:
//! `pkg/registry/core/pod/storage/eviction_test.go` (read at kubernetes master, the version with
//! `unhealthyPodEvictionPolicy` and `addConditionAndDeletePod`). Each case below is ported by
//! name; upstream seeds PDB status through a fake clientset, so the fake's disruption controller
//! is paused and the status written by hand. Not ported: the cases driven by the upstream
//! `mockStore`'s scripted delete conflicts (t1-t5, t9, t10 of `TestEvictionIgnorePDB`), which
//! exercise the handler's internal retry loop, not what a client sees.

use std::time::Duration;

use nodekeeper_tests::fake_api::{FakeApi, PdbLimit, PodSeed, Res, UnhealthyPolicy};
use serde_json::{Value, json};

/// One HTTP/1.1 request: status and JSON body.
fn raw(api: &FakeApi, method: &str, path: &str, body: &Value) -> (u16, Value) {
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
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Upstream's `errToString`: message, reason, then each cause message not already a suffix.
fn err_to_string(code: u16, body: &Value) -> String {
    if code < 300 {
        return String::new();
    }
    let msg = body["message"].as_str().unwrap_or_default();
    let mut out = format!("{msg}: {}", body["reason"].as_str().unwrap_or_default());
    for c in body["details"]["causes"].as_array().into_iter().flatten() {
        let m = c["message"].as_str().unwrap_or_default();
        if !msg.ends_with(m) {
            out.push_str(&format!(": {m}"));
        }
    }
    out
}

const POLICIES: [Option<UnhealthyPolicy>; 3] = [
    None,
    Some(UnhealthyPolicy::IfHealthyBudget),
    Some(UnhealthyPolicy::AlwaysAllow),
];

/// Upstream's PDB `foo` in `default` (selector `a=true`, or `{}`), with `status` as given.
fn pdb(api: &FakeApi, empty_selector: bool, policy: Option<UnhealthyPolicy>, status: Value) {
    let sel: &[(&str, &str)] = if empty_selector {
        &[]
    } else {
        &[("a", "true")]
    };
    api.add_pdb("default", "foo", sel, PdbLimit::MinAvailable(0), policy);
    let mut status = status;
    status["observedGeneration"] = json!(1);
    api.set_pdb_status("default", "foo", status);
}

/// Upstream's `validNewPod` as far as eviction looks: labelled `a=true`, on node `foo`, Running
/// but without a Ready condition (so not healthy) unless `ready`.
fn pod(name: &str, phase: Option<&str>, ready: bool) -> PodSeed {
    let mut p = PodSeed::new(name)
        .node("foo")
        .label("a", "true")
        .ready(ready);
    if let Some(ph) = phase {
        p = p.phase(ph);
    }
    p
}

fn eviction(name: &str, delete_options: Value) -> Value {
    json!({"apiVersion": "policy/v1", "kind": "Eviction",
           "metadata": {"name": name, "namespace": "default"}, "deleteOptions": delete_options})
}

fn post(api: &FakeApi, url_name: &str, body: &Value) -> (u16, Value) {
    raw(
        api,
        "POST",
        &format!("/api/v1/namespaces/default/pods/{url_name}/eviction"),
        body,
    )
}

fn grace0() -> Value {
    json!({"gracePeriodSeconds": 0})
}

/// `TestEviction`: every case, under each unhealthy-pod policy the case lists.
#[test]
fn upstream_test_eviction() {
    struct Case {
        name: &'static str,
        allowed: i64,
        empty_selector: bool,
        non_matching: bool,
        bad_name_in_url: bool,
        phase: Option<&'static str>,
        pod: &'static str,
        expect_error: &'static str,
        /// Policies the case runs under (upstream `policies`; empty = all three).
        policies: &'static [Option<UnhealthyPolicy>],
    }
    const NOT_ALWAYS: &[Option<UnhealthyPolicy>] = &[None, Some(UnhealthyPolicy::IfHealthyBudget)];
    let budget_429 = "Cannot evict pod as it would violate the pod's disruption budget.: TooManyRequests: The disruption budget foo needs 0 healthy pods and has 0 currently";
    let base = Case {
        name: "",
        allowed: 0,
        empty_selector: false,
        non_matching: false,
        bad_name_in_url: false,
        phase: None,
        pod: "",
        expect_error: "",
        policies: &[],
    };
    let cases = [
        Case {
            name: "matching pdbs with no disruptions allowed, pod running",
            pod: "t1",
            expect_error: budget_429,
            policies: NOT_ALWAYS,
            ..base
        },
        Case {
            name: "matching pdbs with no disruptions allowed, pod pending",
            pod: "t2",
            phase: Some("Pending"),
            ..base
        },
        Case {
            name: "matching pdbs with no disruptions allowed, pod succeeded",
            pod: "t3",
            phase: Some("Succeeded"),
            ..base
        },
        Case {
            name: "matching pdbs with no disruptions allowed, pod failed",
            pod: "t4",
            phase: Some("Failed"),
            ..base
        },
        Case {
            name: "matching pdbs with disruptions allowed",
            pod: "t5",
            allowed: 1,
            ..base
        },
        Case {
            name: "non-matching pdbs",
            pod: "t6",
            non_matching: true,
            ..base
        },
        Case {
            name: "matching pdbs with disruptions allowed but bad name in Url",
            pod: "t7",
            allowed: 1,
            bad_name_in_url: true,
            expect_error: "name in URL does not match name in Eviction object: BadRequest",
            ..base
        },
        Case {
            name: "matching pdbs with no disruptions allowed, pod running, empty selector",
            pod: "t8",
            empty_selector: true,
            expect_error: budget_429,
            policies: NOT_ALWAYS,
            ..base
        },
    ];
    for policy in POLICIES {
        for c in &cases {
            if !c.policies.is_empty() && !c.policies.contains(&policy) {
                continue;
            }
            let label = format!("{} with {policy:?} policy", c.name);
            let api = FakeApi::builder().pdb_controller_paused().start();
            // Non-matching: upstream's PDB selects b=true, the pod is labelled a=true.
            let seed = pod(c.pod, c.phase, false);
            api.add_pod(seed);
            if c.non_matching {
                // Upstream: selector b=true against a pod labelled a=true.
                api.add_pdb(
                    "default",
                    "foo",
                    &[("b", "true")],
                    PdbLimit::MinAvailable(0),
                    policy,
                );
                api.set_pdb_status(
                    "default",
                    "foo",
                    json!({"observedGeneration": 1, "disruptionsAllowed": 0}),
                );
            } else {
                pdb(
                    &api,
                    c.empty_selector,
                    policy,
                    json!({"disruptionsAllowed": c.allowed}),
                );
            }
            let url = if c.bad_name_in_url {
                format!("{}bad-name", c.pod)
            } else {
                c.pod.to_string()
            };
            let (code, body) = post(&api, &url, &eviction(c.pod, grace0()));
            assert_eq!(
                err_to_string(code, &body),
                c.expect_error,
                "{label}: {body}"
            );
            if c.expect_error.is_empty() {
                assert!(
                    api.pod("default", c.pod).is_none(),
                    "{label}: expected to be deleted"
                );
            } else {
                assert!(api.pod("default", c.pod).is_some(), "{label}: must stay");
            }
        }
    }
}

/// `TestEvictionIgnorePDB`: the cases that do not depend on the upstream mock store's scripted
/// delete conflicts. `deleted` stands for upstream's `expectedDeleteCount` 1 vs 0.
#[test]
fn upstream_test_eviction_ignore_pdb() {
    struct Case {
        name: &'static str,
        status: Value,
        pod: &'static str,
        terminating: bool,
        ready: bool,
        empty_selector: bool,
        expect_error: &'static str,
        deleted: bool,
        policies: &'static [Option<UnhealthyPolicy>],
    }
    const ALWAYS: &[Option<UnhealthyPolicy>] = &[Some(UnhealthyPolicy::AlwaysAllow)];
    let cases = vec![
        Case {
            name: "matching pdbs with no disruptions allowed, pod terminating",
            status: json!({"disruptionsAllowed": 0}),
            pod: "t6",
            terminating: true,
            ready: false,
            empty_selector: false,
            expect_error: "",
            deleted: true,
            policies: &[],
        },
        Case {
            name: "matching pdbs with no disruptions allowed, pod running, pod healthy, unhealthy pod not ours",
            status: json!({"disruptionsAllowed": 0, "currentHealthy": 2, "desiredHealthy": 2}),
            pod: "t7",
            terminating: false,
            ready: true,
            empty_selector: false,
            expect_error: "Cannot evict pod as it would violate the pod's disruption budget.: TooManyRequests: The disruption budget foo needs 2 healthy pods and has 2 currently",
            deleted: false,
            policies: &[],
        },
        Case {
            name: "matching pdbs with disruptions allowed, pod running, pod healthy, healthy pod ours, deletes pod by honoring the PDB",
            status: json!({"disruptionsAllowed": 1, "currentHealthy": 3, "desiredHealthy": 3}),
            pod: "t8",
            terminating: false,
            ready: true,
            empty_selector: false,
            expect_error: "",
            deleted: true,
            policies: &[],
        },
        Case {
            name: "matching pdbs with no disruptions allowed, pod running, pod unhealthy, unhealthy pod ours",
            status: json!({"disruptionsAllowed": 0, "currentHealthy": 2, "desiredHealthy": 2}),
            pod: "t8",
            terminating: false,
            ready: false,
            empty_selector: false,
            expect_error: "",
            deleted: true,
            policies: &[],
        },
        Case {
            name: "matching pdbs with no disruptions allowed, pod running, pod unhealthy, unhealthy pod ours, skips the PDB check and deletes",
            status: json!({"disruptionsAllowed": 0}),
            pod: "t8",
            terminating: false,
            ready: false,
            empty_selector: false,
            expect_error: "",
            deleted: true,
            policies: ALWAYS,
        },
        Case {
            name: "matching pdbs with no disruptions allowed, pod running, pod healthy, empty selector, pod not deleted by honoring the PDB",
            status: json!({"disruptionsAllowed": 0, "currentHealthy": 3, "desiredHealthy": 3}),
            pod: "t11",
            terminating: false,
            ready: true,
            empty_selector: true,
            expect_error: "Cannot evict pod as it would violate the pod's disruption budget.: TooManyRequests: The disruption budget foo needs 3 healthy pods and has 3 currently",
            deleted: false,
            policies: &[],
        },
    ];
    for policy in [
        Some(UnhealthyPolicy::AlwaysAllow),
        None,
        Some(UnhealthyPolicy::IfHealthyBudget),
    ] {
        for c in &cases {
            if !c.policies.is_empty() && !c.policies.contains(&policy) {
                continue;
            }
            let label = format!("{} with {policy:?} policy", c.name);
            // A long grace period keeps a terminating pod visible: "deleted" is then the
            // second deletion the eviction asked for, seen as the pod staying Terminating.
            let api = FakeApi::builder()
                .pdb_controller_paused()
                .grace_second(Duration::from_secs(3600))
                .start();
            let mut seed = pod(c.pod, None, c.ready);
            if c.terminating {
                seed = seed.finalizer("example.com/hold");
            }
            api.add_pod(seed);
            pdb(&api, c.empty_selector, policy, c.status.clone());
            if c.terminating {
                // Upstream sets a deletionTimestamp on the pod; here a real DELETE does it.
                let (code, _) = raw(
                    &api,
                    "DELETE",
                    &format!("/api/v1/namespaces/default/pods/{}", c.pod),
                    &json!({}),
                );
                assert_eq!(code, 200, "{label}");
            }
            let requests_before = api.requests().len();
            let (code, body) = post(&api, c.pod, &eviction(c.pod, grace0()));
            assert_eq!(
                err_to_string(code, &body),
                c.expect_error,
                "{label}: {body}"
            );
            let after = api.pod("default", c.pod);
            if c.deleted {
                // Gone, or (finalizer) Terminating with the eviction's DisruptionTarget mark.
                if let Some(p) = after {
                    assert!(p["metadata"]["deletionTimestamp"].is_string(), "{label}");
                    assert!(
                        c.terminating,
                        "{label}: expected deletion, pod still there: {p}"
                    );
                }
            } else {
                let p = after.unwrap_or_else(|| panic!("{label}: must not be deleted"));
                assert!(p["metadata"]["deletionTimestamp"].is_null(), "{label}");
            }
            assert_eq!(api.requests().len(), requests_before + 1);
        }
    }
}

/// `TestEvictionDryRun`: with `dryRun: All` in the request options, the eviction's options, or
/// both, the eviction succeeds and nothing changes (pod there, budget untouched).
#[test]
fn upstream_test_eviction_dry_run() {
    let cases = [
        ("just request-options", true, json!({}), false),
        (
            "just eviction-options",
            false,
            json!({"dryRun": ["All"]}),
            false,
        ),
        ("both options", true, json!({"dryRun": ["All"]}), false),
        ("with pdbs", true, json!({"dryRun": ["All"]}), true),
    ];
    for (name, query, opts, with_pdb) in cases {
        let api = FakeApi::builder().pdb_controller_paused().start();
        api.add_pod(pod("foo", None, true));
        if with_pdb {
            pdb(&api, false, None, json!({"disruptionsAllowed": 1}));
        }
        let path = format!(
            "/api/v1/namespaces/default/pods/foo/eviction{}",
            if query { "?dryRun=All" } else { "" }
        );
        let (code, body) = raw(&api, "POST", &path, &eviction("foo", opts));
        assert_eq!(code, 201, "{name}: {body}");
        let p = api.pod("default", "foo").expect(name);
        assert!(p["metadata"]["deletionTimestamp"].is_null(), "{name}");
        if with_pdb {
            let st = &api
                .get(Res::PodDisruptionBudgets, "default", "foo")
                .unwrap()["status"];
            assert_eq!(st["disruptionsAllowed"], 1, "{name}");
            assert!(st["disruptedPods"].is_null(), "{name}");
        }
    }
    // propagateDryRun: the two must agree when both are given.
    let api = FakeApi::builder().pdb_controller_paused().start();
    api.add_pod(pod("foo", None, true));
    let (code, body) = raw(
        &api,
        "POST",
        "/api/v1/namespaces/default/pods/foo/eviction?dryRun=All",
        &eviction("foo", json!({"dryRun": ["Other"]})),
    );
    assert_eq!(code, 500, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Non-matching dry-run options")
    );
    assert!(api.pod("default", "foo").is_some());
}

/// `TestEvictionPDBStatus`: the eviction takes one disruption from the status; the condition
/// turns to InsufficientPods only when none is left.
#[test]
fn upstream_test_eviction_pdb_status() {
    let cases = [
        (
            "pdb status is updated after eviction",
            1,
            0,
            "InsufficientPods",
        ),
        (
            "condition reason is only updated if AllowedDisruptions becomes 0",
            3,
            2,
            "SufficientPods",
        ),
    ];
    for (name, allowed, want_allowed, want_reason) in cases {
        let api = FakeApi::builder().pdb_controller_paused().start();
        for p in ["foo-1", "foo-2"] {
            api.add_pod(pod(p, None, true));
        }
        pdb(
            &api,
            false,
            None,
            json!({"disruptionsAllowed": allowed, "conditions": [{"type": "DisruptionAllowed",
                   "reason": "SufficientPods", "status": "True"}]}),
        );
        let (code, body) = post(&api, "foo-1", &eviction("foo-1", json!({})));
        assert_eq!(code, 201, "{name}: {body}");
        let st = &api
            .get(Res::PodDisruptionBudgets, "default", "foo")
            .unwrap()["status"];
        assert_eq!(st["disruptionsAllowed"], want_allowed, "{name}");
        assert_eq!(st["conditions"][0]["reason"], want_reason, "{name}");
    }
}

/// `TestAddConditionAndDelete`: the eviction's own precondition checks and their messages.
#[test]
fn upstream_test_add_condition_and_delete() {
    /// The Eviction's deleteOptions, from the created pod.
    type Options = fn(&Value) -> Value;
    let cases: [(&str, bool, Options, &str); 6] = [
        ("simple", true, |_| json!({}), ""),
        ("missing", false, |_| json!({}), "not found"),
        (
            "valid uid",
            true,
            |p| json!({"preconditions": {"uid": p["metadata"]["uid"]}}),
            "",
        ),
        (
            "invalid uid",
            true,
            |p| json!({"preconditions": {"uid": format!("{}1", p["metadata"]["uid"].as_str().unwrap())}}),
            "The object might have been deleted and then recreated",
        ),
        (
            "valid resourceVersion",
            true,
            |p| json!({"preconditions": {"resourceVersion": p["metadata"]["resourceVersion"]}}),
            "",
        ),
        (
            "invalid resourceVersion",
            true,
            |p| json!({"preconditions": {"resourceVersion": format!("{}1", p["metadata"]["resourceVersion"].as_str().unwrap())}}),
            "The object might have been modified",
        ),
    ];
    for (name, initial, opts, expect_err) in cases {
        let api = FakeApi::builder().pdb_controller_paused().start();
        let created = if initial {
            api.add_pod(PodSeed::new("foo").node("foo"))
        } else {
            json!({})
        };
        let (code, body) = post(&api, "foo", &eviction("foo", opts(&created)));
        if expect_err.is_empty() {
            assert_eq!(code, 201, "{name}: {body}");
            let gone = api.pod("default", "foo");
            assert!(gone.is_none(), "{name}: {gone:?}");
        } else {
            assert!(code >= 400, "{name}: {body}");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(expect_err),
                "{name}: {body}"
            );
        }
    }
}
