//! Issue #19: the fake API server authenticates bearer tokens and enforces the RBAC that
//! `manifests/base` ships on the agent's ServiceAccount (docs/fake-api-server.md section 13).
//! Requests are made with curl, so what is checked is the HTTP answer a client sees.

use std::process::Command;

use nodekeeper_tests::fake_api::rbac::{
    ADMIN_TOKEN, AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, Rbac, service_account_token,
};
use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
use nodekeeper_tests::kustomize::have_tools;
use nodekeeper_tests::require_tool;
use serde_json::{Value, json};

fn agent_token(node: &str) -> String {
    service_account_token(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, node)
}

/// `method path` with `token` (None: no Authorization header) and an optional JSON body:
/// (status, body as JSON or Null).
fn call(
    api: &FakeApi,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        let ct = if method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        cmd.args(["-H", &format!("Content-Type: {ct}"), "-d", &b.to_string()]);
    }
    cmd.arg(format!("{}{path}", api.url()));
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl wrote the status");
    (
        code.trim().parse().expect("status code"),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn seeded() -> FakeApi {
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    api.add_node("node-b", &[]);
    api.add_pod(PodSeed::new("web-a").node("node-a"));
    api.add_service("kube-system", "kube-dns", Some("10.96.0.10"));
    api.add_config_map("kube-system", "kube-dns", &[]);
    api.add_config_map("kube-system", "other", &[]);
    api
}

fn can_run() -> bool {
    have_tools(&[]) && require_tool("curl")
}

#[test]
fn requests_with_an_unknown_token_are_unauthorized() {
    if !require_tool("curl") {
        return;
    }
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    for token in [
        "not-a-token",
        "system:serviceaccount:x",
        "system:serviceaccount:a:b@",
    ] {
        let (code, body) = call(&api, Some(token), "GET", "/api/v1/nodes/node-a", None);
        assert_eq!(code, 401, "{token:?}: {body}");
        assert_eq!(body["reason"], "Unauthorized");
        let (code, _) = call(&api, Some(token), "GET", "/api/v1", None);
        assert_eq!(code, 401, "discovery needs authentication too");
    }
    // The admin: its token, or no header at all (kubectl over plain HTTP sends none).
    for token in [Some(ADMIN_TOKEN), None] {
        let (code, _) = call(&api, token, "GET", "/api/v1/nodes/node-a", None);
        assert_eq!(code, 200, "{token:?}");
    }
}

/// What the shipped ClusterRole and Role grant the agent answers as usual; everything else is
/// a 403 naming the user, verb, resource and scope, and is never applied.
#[test]
fn the_agent_identity_gets_exactly_the_shipped_rbac() {
    if !can_run() {
        return;
    }
    let api = seeded();
    let t = agent_token("node-a");
    let t = Some(t.as_str());
    let allowed: &[(&str, &str, Option<Value>)] = &[
        ("GET", "/api/v1", None),
        ("GET", "/api/v1/nodes/node-a", None),
        (
            "GET",
            "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-a",
            None,
        ),
        (
            "PATCH",
            "/api/v1/nodes/node-a",
            Some(json!({"metadata": {"annotations": {"nodekeeper.io/x": "1"}}})),
        ),
        (
            "GET",
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a",
            None,
        ),
        (
            "GET",
            "/api/v1/namespaces/kube-system/services/kube-dns",
            None,
        ),
        (
            "GET",
            "/api/v1/namespaces/kube-system/configmaps?fieldSelector=metadata.name%3Dkube-dns",
            None,
        ),
        (
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/nodekeeper-system/leases/slot-0",
            None,
        ),
    ];
    for (method, path, body) in allowed {
        let (code, answer) = call(&api, t, method, path, body.clone());
        assert!(
            code != 401 && code != 403,
            "{method} {path} refused: {code} {answer}"
        );
    }
    let refused: &[(&str, &str, Option<Value>, &str)] = &[
        (
            "DELETE",
            "/api/v1/namespaces/default/pods/web-a",
            None,
            "cannot delete resource \"pods\" in API group \"\" in the namespace \"default\"",
        ),
        (
            "PUT",
            "/api/v1/nodes/node-a",
            Some(json!({"metadata": {"name": "node-a"}})),
            "cannot update resource \"nodes\"",
        ),
        (
            "PATCH",
            "/api/v1/nodes/node-a/status",
            Some(json!({"status": {}})),
            "cannot patch resource \"nodes/status\"",
        ),
        (
            "GET",
            "/api/v1/namespaces/kube-system/services",
            None,
            "cannot list resource \"services\"",
        ),
        (
            "GET",
            "/api/v1/namespaces/kube-system/configmaps/other",
            None,
            "cannot get resource \"configmaps\"",
        ),
        (
            "GET",
            "/api/v1/namespaces/kube-system/configmaps?watch=true",
            None,
            "cannot watch resource \"configmaps\"",
        ),
        (
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/slot-0",
            None,
            "in the namespace \"default\"",
        ),
        (
            "DELETE",
            "/apis/coordination.k8s.io/v1/namespaces/nodekeeper-system/leases/slot-0",
            None,
            "cannot delete resource \"leases\"",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/secrets",
            None,
            "cannot list resource \"secrets\"",
        ),
        (
            "GET",
            "/apis/apps/v1/daemonsets",
            None,
            "cannot list resource \"daemonsets\" in API group \"apps\" at the cluster scope",
        ),
    ];
    for (method, path, body, says) in refused {
        let (code, answer) = call(&api, t, method, path, body.clone());
        assert_eq!(code, 403, "{method} {path}: {answer}");
        assert_eq!(answer["reason"], "Forbidden", "{answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("User \"system:serviceaccount:nodekeeper-system:nodekeeper\"")
                && message.contains(says),
            "{method} {path}: {message}"
        );
    }
    assert!(
        api.pod("default", "web-a").is_some(),
        "a refused delete is not applied"
    );
    // The admin token is not subject to the agent's rules.
    let (code, _) = call(
        &api,
        Some(ADMIN_TOKEN),
        "DELETE",
        "/api/v1/namespaces/default/pods/web-a",
        None,
    );
    assert_eq!(code, 200);
}

/// The rules come from the bound roles: a ClusterRole without `pods/eviction` makes the same
/// eviction a 403, and a ServiceAccount the roles are not bound to gets nothing.
#[test]
fn enforcement_follows_the_bound_roles() {
    if !can_run() {
        return;
    }
    let api = seeded();
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction",
                          "metadata": {"name": "web-a", "namespace": "default"}});
    let path = "/api/v1/namespaces/default/pods/web-a/eviction";
    let objects = vec![
        json!({"kind": "ClusterRole", "metadata": {"name": "reader"},
               "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
        json!({"kind": "ClusterRoleBinding", "metadata": {"name": "reader"},
               "roleRef": {"kind": "ClusterRole", "name": "reader"},
               "subjects": [{"kind": "ServiceAccount", "name": AGENT_SERVICE_ACCOUNT,
                             "namespace": AGENT_NAMESPACE}]}),
    ];
    api.set_rbac(Rbac::from_objects(
        &objects,
        AGENT_NAMESPACE,
        AGENT_SERVICE_ACCOUNT,
    ));
    let t = agent_token("node-a");
    let (code, answer) = call(&api, Some(&t), "POST", path, Some(eviction.clone()));
    assert_eq!(code, 403, "{answer}");
    let (code, _) = call(
        &api,
        Some(&t),
        "GET",
        "/api/v1/namespaces/default/pods/web-a",
        None,
    );
    assert_eq!(code, 200, "the rule it has");
    let stranger = service_account_token("default", "someone", "node-a");
    let (code, _) = call(
        &api,
        Some(&stranger),
        "GET",
        "/api/v1/namespaces/default/pods/web-a",
        None,
    );
    assert_eq!(code, 403, "no role is bound to default/someone");

    // The shipped rules grant the eviction.
    api.set_rbac((*Rbac::shipped()).clone());
    let (code, answer) = call(&api, Some(&t), "POST", path, Some(eviction));
    assert_eq!(code, 201, "{answer}");
}

// === the shipped ValidatingAdmissionPolicy (section 14) ===

/// A PV as the disks publisher makes it, for `node` (label and node affinity), optionally
/// pre-bound to a claim.
fn local_pv(name: &str, label_node: &str, affinity_node: &str, claim: bool) -> Value {
    let mut pv = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"nodekeeper.io/node": label_node}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "nodekeeper-local",
            "local": {"path": "/mnt/x"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [affinity_node]}
            ]}]}}
        }
    });
    if claim {
        pv["spec"]["claimRef"] = json!({"namespace": "tenant", "name": "data"});
    }
    pv
}

fn assert_denied(code: u16, answer: &Value, says: &str) {
    assert_eq!(code, 403, "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(
            "ValidatingAdmissionPolicy 'nodekeeper-own-node' with binding 'nodekeeper-own-node' denied request: "
        ) && message.contains(says),
        "{message}"
    );
}

/// Issue #19: with node A's agent identity, patching node B is refused and patching node A
/// succeeds; the refused patch is not applied.
#[test]
fn the_agent_of_node_a_patches_only_node_a() {
    if !can_run() {
        return;
    }
    let api = seeded();
    let t = agent_token("node-a");
    let cordon = json!({"spec": {"unschedulable": true}});
    let (code, answer) = call(
        &api,
        Some(&t),
        "PATCH",
        "/api/v1/nodes/node-a",
        Some(cordon.clone()),
    );
    assert_eq!(code, 200, "{answer}");
    let (code, answer) = call(
        &api,
        Some(&t),
        "PATCH",
        "/api/v1/nodes/node-b",
        Some(cordon.clone()),
    );
    assert_denied(code, &answer, "the agent may change only its own Node");
    assert_ne!(
        api.node("node-b").expect("node-b")["spec"]["unschedulable"],
        true,
        "the refused cordon was applied"
    );
    // The same call as node B's agent succeeds.
    let t_b = agent_token("node-b");
    let (code, answer) = call(
        &api,
        Some(&t_b),
        "PATCH",
        "/api/v1/nodes/node-b",
        Some(cordon),
    );
    assert_eq!(code, 200, "{answer}");
}

/// Issue #19: node A's agent creates and deletes only PVs of node A: a PV labelled or pinned
/// to node B, or pre-bound to a claim, is refused, and so is deleting node B's PV.
#[test]
fn the_agent_of_node_a_creates_and_deletes_only_node_a_pvs() {
    if !can_run() {
        return;
    }
    let api = seeded();
    let t = agent_token("node-a");
    let path = "/api/v1/persistentvolumes";
    let (code, answer) = call(
        &api,
        Some(&t),
        "POST",
        path,
        Some(local_pv("pv-a", "node-a", "node-a", false)),
    );
    assert_eq!(code, 201, "{answer}");
    for (pv, says) in [
        (
            local_pv("pv-1", "node-b", "node-b", false),
            "labelled nodekeeper.io/node with its own node",
        ),
        (
            local_pv("pv-2", "node-a", "node-b", false),
            "pinned to its own node",
        ),
        (local_pv("pv-3", "node-a", "node-a", true), "pre-bind"),
    ] {
        let (code, answer) = call(&api, Some(&t), "POST", path, Some(pv));
        assert_denied(code, &answer, says);
    }
    let mut unpinned = local_pv("pv-4", "node-a", "node-a", false);
    unpinned["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeAffinity");
    let (code, answer) = call(&api, Some(&t), "POST", path, Some(unpinned));
    assert_denied(code, &answer, "pinned to its own node");

    // Node B's PV, created by its own agent; node A's agent may not delete it.
    let t_b = agent_token("node-b");
    let (code, answer) = call(
        &api,
        Some(&t_b),
        "POST",
        path,
        Some(local_pv("pv-b", "node-b", "node-b", false)),
    );
    assert_eq!(code, 201, "{answer}");
    let (code, answer) = call(
        &api,
        Some(&t),
        "DELETE",
        "/api/v1/persistentvolumes/pv-b",
        None,
    );
    assert_denied(code, &answer, "only PersistentVolumes of its own node");
    let (code, _) = call(
        &api,
        Some(&t_b),
        "GET",
        "/api/v1/persistentvolumes/pv-b",
        None,
    );
    assert_eq!(code, 200, "the refused delete was applied");
    let (code, answer) = call(
        &api,
        Some(&t),
        "DELETE",
        "/api/v1/persistentvolumes/pv-a",
        None,
    );
    assert_eq!(code, 200, "{answer}");
}

/// The policy applies to the agent's ServiceAccount only (matchConditions): another identity
/// the RBAC allowed would not be limited by it; and a policy the fake cannot evaluate fails
/// closed, as `failurePolicy: Fail` does.
#[test]
fn the_policy_matches_the_agent_only_and_fails_closed() {
    if !can_run() {
        return;
    }
    use nodekeeper_tests::fake_api::admission::Admission;
    let api = seeded();
    let objects = vec![
        json!({"kind": "ValidatingAdmissionPolicy", "metadata": {"name": "p"},
               "spec": {"failurePolicy": "Fail",
                        "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                                 "operations": ["UPDATE"], "resources": ["nodes"]}]},
                        "validations": [{"expression": "object.metadata.nope == 'x'", "reason": "Forbidden"}]}}),
        json!({"kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": "b"},
               "spec": {"policyName": "p", "validationActions": ["Deny"]}}),
    ];
    api.set_admission(Admission::from_objects(&objects).expect("in the subset"));
    let t = agent_token("node-a");
    let (code, answer) = call(
        &api,
        Some(&t),
        "PATCH",
        "/api/v1/nodes/node-a",
        Some(json!({"metadata": {"labels": {"x": "y"}}})),
    );
    assert_eq!(code, 403, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("resulted in error"),
        "{answer}"
    );
    let (code, _) = call(
        &api,
        Some(ADMIN_TOKEN),
        "PATCH",
        "/api/v1/nodes/node-a",
        Some(json!({"metadata": {"labels": {"x": "y"}}})),
    );
    assert_eq!(code, 200, "the admin is not subject to policies");

    let outside = vec![
        json!({"kind": "ValidatingAdmissionPolicy", "metadata": {"name": "p"},
               "spec": {"validations": [{"expression": "object.spec.replicas + 1 > 2"}]}}),
        objects[1].clone(),
    ];
    let e = Admission::from_objects(&outside).unwrap_err();
    assert!(e.contains("validation"), "{e}");
}

/// `AgentBuilder::connected` hands the agent this rewrite of the fake's kubeconfig: the agent
/// talks as its ServiceAccount on its node, never as the fake's admin.
#[test]
fn the_agent_kubeconfig_carries_the_service_account_token_of_its_node() {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin");
    api.write_kubeconfig(&admin);
    let agent = dir.path().join("agent");
    nodekeeper_tests::fake_api::agent_kubeconfig(&admin, "node-a", &agent);
    let text = std::fs::read_to_string(&agent).unwrap();
    assert!(
        text.contains("token: system:serviceaccount:nodekeeper-system:nodekeeper@node-a\n"),
        "{text}"
    );
    assert!(!text.contains(ADMIN_TOKEN), "{text}");
    api.write_agent_kubeconfig(&admin, "node-b");
    assert!(
        std::fs::read_to_string(&admin)
            .unwrap()
            .contains("nodekeeper@node-b\n")
    );
}
