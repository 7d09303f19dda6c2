//! The fake Kubernetes API server (`nodekeeper_tests::fake_api`) checked against the real
//! clients it stands in for: kubectl 1.32 (`get`, `cordon`, `drain` with PodDisruptionBudgets)
//! and kube-rs (field-selected list, watcher, merge patch, eviction), plus the semantics it
//! implements (selectors, PDB math, optimistic concurrency).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use nodekeeper_tests::fake_api::{
    Budget, FakeApi, Fault, FaultKind, FieldSelector, FieldValidation, LabelSelector, PdbLimit,
    PodSeed, Res, UnhealthyPolicy, json_patch, managed, merge_patch, scaled,
};
use nodekeeper_tests::{http_get, require_tool, wait_for};
use serde_json::{Value, json};

/// Output of one kubectl run.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs kubectl against `kubeconfig` (discovery cache in `dir`), killed after `limit`.
fn kubectl(kubeconfig: &Path, dir: &Path, args: &[&str], limit: Duration) -> Run {
    let out = dir.join("kubectl.out");
    let err = dir.join("kubectl.err");
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(dir.join("kube-cache"))
        .arg("--request-timeout=20s")
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn kubectl");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kubectl {args:?} did not finish within {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        ok: status.success(),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

struct Env {
    api: FakeApi,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

fn env(api: FakeApi) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    Env {
        api,
        dir,
        kubeconfig,
    }
}

impl Env {
    fn kubectl(&self, args: &[&str], limit: Duration) -> Run {
        kubectl(&self.kubeconfig, self.dir.path(), args, limit)
    }

    async fn client(&self) -> kube::Client {
        self.client_with_retry(true).await
    }

    /// kube 5 clients retry 429/503/504 by default (`Config::default_retry`).
    async fn client_with_retry(&self, retry: bool) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kube config");
        cfg.default_retry = retry;
        kube::Client::try_from(cfg).expect("kube client")
    }
}

fn name(v: &Value) -> String {
    v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Two nodes and a few pods on each.
fn basic() -> Env {
    let api = FakeApi::start();
    api.add_node("node-a", &[("zone", "a")]);
    api.add_node("node-b", &[("zone", "b")]);
    api.add_pod(PodSeed::new("web-1").node("node-a").label("app", "web"));
    api.add_pod(PodSeed::new("web-2").node("node-b").label("app", "web"));
    api.add_pod(
        PodSeed::new("dns-1")
            .namespace("kube-system")
            .node("node-a")
            .label("app", "dns"),
    );
    env(api)
}

// ---------------------------------------------------------------- kubectl

#[test]
fn kubectl_get_pods_wide_all_namespaces_shows_nodes() {
    if !require_tool("kubectl") {
        return;
    }
    let e = basic();
    let r = e.kubectl(
        &["get", "pods", "-o", "wide", "-A"],
        Duration::from_secs(30),
    );
    assert!(r.ok, "kubectl get failed: {}", r.stderr);
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["NAMESPACE", "NAME", "READY"], "{}", r.stdout);
    assert!(rows[0].contains(&"NODE"), "{}", r.stdout);
    let node_col = rows[0].iter().position(|c| *c == "NODE").unwrap();
    let mut seen: Vec<(String, String, String)> = rows[1..]
        .iter()
        .map(|r| (r[0].into(), r[1].into(), r[node_col].into()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("default".into(), "web-1".into(), "node-a".into()),
            ("default".into(), "web-2".into(), "node-b".into()),
            ("kube-system".into(), "dns-1".into(), "node-a".into()),
        ],
        "{}",
        r.stdout
    );
    // The same through a field selector, served by the fake.
    let r = e.kubectl(
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=node-b",
            "-o",
            "name",
        ],
        Duration::from_secs(30),
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "pod/web-2");
}

#[test]
fn kubectl_cordon_sets_unschedulable() {
    if !require_tool("kubectl") {
        return;
    }
    let e = basic();
    assert!(e.api.node("node-a").unwrap()["spec"]["unschedulable"].is_null());
    let r = e.kubectl(&["cordon", "node-a"], Duration::from_secs(30));
    assert!(r.ok, "cordon failed: {}", r.stderr);
    assert!(r.stdout.contains("node/node-a cordoned"), "{}", r.stdout);
    assert_eq!(e.api.node("node-a").unwrap()["spec"]["unschedulable"], true);
    assert!(e.api.node("node-b").unwrap()["spec"]["unschedulable"].is_null());
    let patch = e
        .api
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .expect("cordon PATCHes the node");
    assert_eq!(
        (patch.path.as_str(), patch.status),
        ("/api/v1/nodes/node-a", 200)
    );
    let r = e.kubectl(&["uncordon", "node-a"], Duration::from_secs(30));
    assert!(r.ok, "uncordon failed: {}", r.stderr);
    assert!(e.api.node("node-a").unwrap()["spec"]["unschedulable"].is_null());
}

/// managedFields as a real server keeps them for Updates (docs/fake-api-server.md): the owner
/// of spec.unschedulable is the manager that last changed it (fieldManager, else the
/// User-Agent's prefix), a write of the same value keeps it, a removal drops it. Driven by the
/// real kubectl: its cordon and uncordon PATCHes carry its own manager.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_cordon_takes_spec_unschedulable_from_a_field_manager() {
    if !require_tool("kubectl") {
        return;
    }
    let e = basic();
    let owners = |e: &Env| {
        managed::owners(
            &e.api.node("node-a").unwrap(),
            &["f:spec", "f:unschedulable"],
        )
    };
    let nodes: Api<Node> = Api::all(e.client().await);
    let cordon = json!({"spec": {"unschedulable": true}});
    let nk = PatchParams {
        field_manager: Some("nodekeeper".into()),
        ..Default::default()
    };
    nodes
        .patch("node-a", &nk, &Patch::Merge(&cordon))
        .await
        .expect("cordon");
    assert_eq!(owners(&e), ["nodekeeper"]);
    // kubectl cordon of a cordoned node writes nothing new: the owner stays.
    let r =
        tokio::task::block_in_place(|| e.kubectl(&["cordon", "node-a"], Duration::from_secs(30)));
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(owners(&e), ["nodekeeper"]);
    let r =
        tokio::task::block_in_place(|| e.kubectl(&["uncordon", "node-a"], Duration::from_secs(30)));
    assert!(r.ok, "{}", r.stderr);
    assert!(
        owners(&e).is_empty(),
        "{}",
        e.api.node("node-a").unwrap()["metadata"]
    );
    let r =
        tokio::task::block_in_place(|| e.kubectl(&["cordon", "node-a"], Duration::from_secs(30)));
    assert!(r.ok, "{}", r.stderr);
    let by = owners(&e);
    assert_eq!(by.len(), 1, "{by:?}");
    assert!(
        by[0].starts_with("kubectl"),
        "kubectl cordon's manager: {by:?}"
    );
    let patch = e
        .api
        .requests()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .expect("cordon PATCHes the node");
    eprintln!("kubectl cordon: manager {by:?}, query {:?}", patch.query);
    // The same value again through the agent's manager: still kubectl's.
    nodes
        .patch("node-a", &nk, &Patch::Merge(&cordon))
        .await
        .expect("cordon again");
    assert_eq!(owners(&e), by);
}

/// node-a runs: web (3 replicas, 2 here, PDB minAvailable 2), api (2 replicas, both here, PDB
/// maxUnavailable 1), a cache pod with an emptyDir, a DaemonSet pod and a mirror pod.
fn drain_scenario() -> Env {
    let api = FakeApi::start();
    for n in ["node-a", "node-b", "node-other"] {
        api.add_node(n, &[]);
    }
    api.add_replicaset("default", "web", &[("app", "web")], 3, &[("app", "web")]);
    api.add_replicaset("default", "api", &[("app", "api")], 2, &[("app", "api")]);
    api.add_replicaset(
        "default",
        "cache",
        &[("app", "cache")],
        1,
        &[("app", "cache")],
    );
    for (pod, node) in [
        ("web-a1", "node-a"),
        ("web-a2", "node-a"),
        ("web-b1", "node-b"),
    ] {
        api.add_pod(
            PodSeed::new(pod)
                .node(node)
                .label("app", "web")
                .replicaset("web"),
        );
    }
    for pod in ["api-a1", "api-a2"] {
        api.add_pod(
            PodSeed::new(pod)
                .node("node-a")
                .label("app", "api")
                .replicaset("api"),
        );
    }
    api.add_pod(
        PodSeed::new("cache-a1")
            .node("node-a")
            .label("app", "cache")
            .replicaset("cache")
            .empty_dir(),
    );
    api.add_pod(
        PodSeed::new("agent-a")
            .namespace("kube-system")
            .node("node-a")
            .label("ds", "agent")
            .daemonset("agent"),
    );
    api.add_pod(
        PodSeed::new("etcd-node-a")
            .namespace("kube-system")
            .node("node-a")
            .mirror(),
    );
    api.add_pdb(
        "default",
        "web",
        &[("app", "web")],
        PdbLimit::MinAvailable(2),
        None,
    );
    api.add_pdb(
        "default",
        "api",
        &[("app", "api")],
        PdbLimit::MaxUnavailable(1),
        None,
    );
    env(api)
}

#[test]
fn kubectl_drain_waits_for_replacements_and_keeps_budgets() {
    if !require_tool("kubectl") {
        return;
    }
    let e = drain_scenario();
    let r = e.kubectl(
        &[
            "drain",
            "node-a",
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=60s",
        ],
        Duration::from_secs(90),
    );
    assert!(
        r.ok,
        "drain failed:\nstdout:\n{}\nstderr:\n{}",
        r.stdout, r.stderr
    );
    assert!(r.stdout.contains("node/node-a drained"), "{}", r.stdout);
    let mut left = e.api.pods_on("node-a");
    left.sort();
    assert_eq!(
        left,
        ["agent-a", "etcd-node-a"],
        "only DaemonSet and mirror pods stay"
    );
    assert_eq!(e.api.node("node-a").unwrap()["spec"]["unschedulable"], true);
    // Every evicted ReplicaSet pod is replaced on the other node (the last ones just after the
    // drain returned).
    wait_for(
        Duration::from_secs(10),
        "5 replacements on node-other",
        || (e.api.pods_on("node-other").len() == 5).then_some(()),
    );
    // Budgets forced at least one wait: 429s were answered and retried.
    let reqs = e.api.requests();
    let evictions: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.ends_with("/eviction"))
        .collect();
    assert!(evictions.iter().any(|r| r.status == 429), "{evictions:?}");
    assert_eq!(
        evictions.iter().filter(|r| r.status == 201).count(),
        5,
        "{evictions:?}"
    );
    assert!(
        e.api.pdb_violations().is_empty(),
        "violations: {:?}",
        e.api.pdb_violations()
    );
    let web = wait_for(Duration::from_secs(10), "web back to 3 healthy", || {
        let web = e.api.get(Res::PodDisruptionBudgets, "default", "web")?;
        (web["status"]["currentHealthy"] == 3).then_some(web)
    });
    assert_eq!(web["status"]["disruptionsAllowed"], 1, "{web}");
    assert!(
        e.api.pdb_violations().is_empty(),
        "violations after the replacements: {:?}",
        e.api.pdb_violations()
    );
}

#[test]
fn kubectl_drain_times_out_on_an_unsatisfiable_budget() {
    if !require_tool("kubectl") {
        return;
    }
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    api.add_replicaset("default", "solo", &[("app", "solo")], 1, &[("app", "solo")]);
    api.add_pod(
        PodSeed::new("solo-1")
            .node("node-a")
            .label("app", "solo")
            .replicaset("solo"),
    );
    api.add_pdb(
        "default",
        "solo",
        &[("app", "solo")],
        PdbLimit::MinAvailable(1),
        None,
    );
    let e = env(api);
    let started = Instant::now();
    let r = e.kubectl(
        &["drain", "node-a", "--ignore-daemonsets", "--timeout=5s"],
        Duration::from_secs(60),
    );
    assert!(!r.ok, "drain must fail:\n{}", r.stdout);
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(
        r.stderr.contains("disruption budget"),
        "kubectl shows the 429 message: {}",
        r.stderr
    );
    assert!(e.api.pod("default", "solo-1").is_some(), "the pod stays");
    assert!(e.api.pdb_violations().is_empty());
}

// ---------------------------------------------------------------- kube-rs

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_lists_pods_with_a_node_field_selector() {
    let e = basic();
    let client = e.client().await;
    let pods: Api<Pod> = Api::all(client);
    let list = within(
        "list",
        pods.list(&ListParams::default().fields("spec.nodeName=node-a")),
    )
    .await
    .expect("list");
    let mut names: Vec<String> = list
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["dns-1", "web-1"]);
    assert!(
        list.metadata
            .resource_version
            .is_some_and(|rv| rv.parse::<u64>().is_ok())
    );
    let req = e.api.requests().pop().unwrap();
    assert_eq!(
        (req.method.as_str(), req.path.as_str(), req.status),
        ("GET", "/api/v1/pods", 200)
    );
    assert!(
        req.query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{}",
        req.query
    );
    // An unsupported field is a 400, as on a real API server.
    let err = within(
        "bad list",
        pods.list(&ListParams::default().fields("spec.bogus=x")),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 400),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_watcher_on_one_node_sees_its_label_change() {
    use futures::StreamExt;
    let e = basic();
    let client = e.client().await;
    let nodes: Api<Node> = Api::all(client);
    let cfg = watcher::Config::default().fields("metadata.name=node-a");
    let mut stream = watcher(nodes, cfg).boxed();
    // Initial list: node-a only.
    let mut initial = Vec::new();
    within("initial list", async {
        while let Some(ev) = stream.next().await {
            match ev.expect("watch event") {
                watcher::Event::InitApply(n) => initial.push(n.metadata.name.unwrap()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(initial, ["node-a"]);
    e.api.label_node("node-b", "role", Some("ignored"));
    e.api.label_node("node-a", "role", Some("drained"));
    let changed = within("label change", async {
        loop {
            if let watcher::Event::Apply(n) = stream.next().await.unwrap().expect("event") {
                break n;
            }
        }
    })
    .await;
    assert_eq!(
        changed.metadata.name.as_deref(),
        Some("node-a"),
        "node-b is filtered out"
    );
    assert_eq!(
        changed
            .metadata
            .labels
            .unwrap()
            .get("role")
            .map(String::as_str),
        Some("drained")
    );
    let watch = e
        .api
        .requests()
        .into_iter()
        .find(|r| r.query.contains("watch=true"))
        .expect("a watch request");
    assert!(
        watch.query.contains("fieldSelector=metadata.name%3Dnode-a"),
        "{}",
        watch.query
    );
    assert!(watch.query.contains("resourceVersion="), "{}", watch.query);
}

/// Node names a watcher applies during its (re)list until `InitDone`, each error as `error: ..`.
async fn until_init_done(
    stream: &mut futures::stream::BoxStream<'static, watcher::Result<watcher::Event<Node>>>,
) -> Vec<String> {
    use futures::StreamExt;
    let mut seen = Vec::new();
    loop {
        match stream.next().await.expect("stream open") {
            Ok(watcher::Event::InitApply(n)) => seen.push(n.metadata.name.unwrap_or_default()),
            Ok(watcher::Event::InitDone) => break seen,
            Ok(_) => {}
            Err(err) => seen.push(format!("error: {err}")),
        }
    }
}

/// An API server restart ends open watches (only those named); a resume from a version the
/// server no longer has is answered as a real one does, 200 and an `ERROR` 410 event, on which
/// kube-rs's watcher relists (an HTTP 410 would only make it retry the same version).
#[tokio::test(flavor = "multi_thread")]
async fn kube_watcher_relists_after_a_restart_resumes_into_410() {
    use futures::StreamExt;
    let e = basic();
    let nodes: Api<Node> = Api::all(e.client().await);
    let cfg = watcher::Config::default().fields("metadata.name=node-a");
    let mut stream = watcher(nodes, cfg).boxed();
    assert_eq!(
        within("initial list", until_init_done(&mut stream)).await,
        ["node-a"]
    );
    let next_apply = async |stream: &mut futures::stream::BoxStream<'static, _>| loop {
        if let Ok(watcher::Event::Apply(_)) = stream.next().await.expect("stream open") {
            break;
        }
    };
    // A change arrives once the watch is open.
    e.api.label_node("node-a", "step", Some("1"));
    within("first change", next_apply(&mut stream)).await;

    // Ending the pod watches leaves the node watch open: the change arrives on it.
    e.api.end_watches("/api/v1/pods");
    e.api.label_node("node-a", "step", Some("2"));
    within("change on the same watch", next_apply(&mut stream)).await;
    let watches = |e: &Env| -> Vec<_> {
        e.api
            .requests()
            .into_iter()
            .filter(|r| r.query.contains("watch=true"))
            .collect()
    };
    assert_eq!(watches(&e).len(), 1, "the node watch was ended");

    // A restart of the node watches, whose resume meets a too-old version: relist.
    e.api
        .inject(Fault::on("GET", "/api/v1/nodes", FaultKind::Expired).watch(true));
    e.api.end_watches("/api/v1/nodes");
    let relisted = within("relist after 410", until_init_done(&mut stream)).await;
    assert!(
        relisted
            .first()
            .is_some_and(|s| s.contains("410") || s.contains("too old")),
        "the 410 reached the watcher as an error first: {relisted:?}"
    );
    assert_eq!(&relisted[1..], ["node-a"]);

    let log = e.api.requests();
    let expired = log
        .iter()
        .position(|r| r.watch_error == Some(410))
        .expect("a watch answered with an ERROR 410 event");
    assert_eq!(
        log[expired].status, 200,
        "a watch's 410 is an event, not a status"
    );
    let rv = log[expired]
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="));
    assert!(
        rv.is_some_and(|v| v != "0"),
        "the 410 answered a resume: {}",
        log[expired].query
    );
    assert!(
        log[expired + 1..].iter().any(|r| r.path == "/api/v1/nodes"
            && !r.query.contains("watch=true")
            && r.status == 200),
        "no LIST after the 410: {:?}",
        &log[expired..]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_merge_patch_sets_and_removes_a_node_annotation() {
    let e = basic();
    let nodes: Api<Node> = Api::all(e.client().await);
    let before = e.api.node("node-a").unwrap()["metadata"]["resourceVersion"].clone();
    let patched = within(
        "patch",
        nodes.patch(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"nodekeeper.io/drain": "running"}}})),
        ),
    )
    .await
    .expect("merge patch");
    assert_eq!(
        patched.metadata.annotations.unwrap()["nodekeeper.io/drain"],
        "running"
    );
    let node = e.api.node("node-a").unwrap();
    assert_eq!(
        node["metadata"]["annotations"]["nodekeeper.io/drain"],
        "running"
    );
    assert_ne!(node["metadata"]["resourceVersion"], before);
    within(
        "patch null",
        nodes.patch(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"nodekeeper.io/drain": null}}})),
        ),
    )
    .await
    .expect("merge patch null");
    assert!(
        e.api.node("node-a").unwrap()["metadata"]["annotations"]
            .get("nodekeeper.io/drain")
            .is_none()
    );
    let missing = within("404", nodes.get("nope")).await.unwrap_err();
    assert!(matches!(missing, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"));
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_eviction_blocked_by_a_budget_is_429() {
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    api.add_replicaset("default", "web", &[("app", "web")], 2, &[("app", "web")]);
    for p in ["web-1", "web-2"] {
        api.add_pod(
            PodSeed::new(p)
                .node("node-a")
                .label("app", "web")
                .replicaset("web"),
        );
    }
    api.add_pod(PodSeed::new("free").node("node-a").label("app", "free"));
    api.add_pdb(
        "default",
        "web-pdb",
        &[("app", "web")],
        PdbLimit::MinAvailable(2),
        None,
    );
    let e = env(api);
    // kube's default retry layer would keep re-sending the 429ed eviction (the API server sends
    // no Retry-After): see it happen, then ask without it.
    let retrying: Api<Pod> = Api::namespaced(e.client().await, "default");
    let r = tokio::time::timeout(Duration::from_secs(1), evict(&retrying, "web-1")).await;
    assert!(r.is_err(), "still retrying after 1s: {r:?}");
    let posts = |e: &Env| {
        e.api
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/web-1/eviction"))
            .count()
    };
    assert!(
        posts(&e) > 1,
        "the default retry layer re-sent the eviction"
    );
    let pods: Api<Pod> = Api::namespaced(e.client_with_retry(false).await, "default");
    let before = posts(&e);
    let err = within("evict", evict(&pods, "web-1")).await.unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err:?}");
    };
    assert_eq!(
        (status.code, status.reason.as_str()),
        (429, "TooManyRequests")
    );
    assert_eq!(
        status.message,
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    let cause = &status.details.unwrap().causes[0];
    assert_eq!(cause.reason, "DisruptionBudget");
    assert!(cause.message.contains("web-pdb"), "{}", cause.message);
    assert_eq!(posts(&e), before + 1, "answered once, not retried");
    assert!(e.api.pod("default", "web-1").is_some());
    // Not covered by a budget: evicted.
    within("evict free", evict(&pods, "free"))
        .await
        .expect("evict free");
    assert!(e.api.pod("default", "free").is_none());
    let missing = within("evict missing", evict(&pods, "nope"))
        .await
        .unwrap_err();
    assert!(matches!(missing, kube::Error::Api(s) if s.code == 404));
}

/// A typed `policy/v1` Eviction, posted as the agent does.
async fn evict(pods: &Api<Pod>, name: &str) -> Result<Value, kube::Error> {
    let body = Eviction {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        delete_options: None,
    };
    pods.create_subresource("eviction", name, &PostParams::default(), &body)
        .await
}

/// The upstream bug the agent works around: kube-core 5.0.0's `Request::evict` keys the
/// options `delete_options`. A strict server refuses it naming the field; a real server's
/// default (Warn) accepts it with a Warning header and ignores the options.
#[tokio::test(flavor = "multi_thread")]
async fn kube_evict_misspells_delete_options_strict_refuses_warn_warns() {
    for mode in [FieldValidation::Strict, FieldValidation::Warn] {
        let api = FakeApi::builder().field_validation(mode).start();
        api.add_node("node-a", &[]);
        api.add_pod(PodSeed::new("p").node("node-a").grace_period(30));
        let e = env(api);
        let pods: Api<Pod> = Api::namespaced(e.client_with_retry(false).await, "default");
        let ep = EvictParams {
            delete_options: Some(kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = within("kube evict", pods.evict("p", &ep)).await;
        let req = e.api.requests().pop().unwrap();
        assert!(req.body.contains("\"delete_options\""), "{}", req.body);
        match mode {
            FieldValidation::Strict => {
                let Err(kube::Error::Api(s)) = r else {
                    panic!("strict mode accepted {r:?}")
                };
                assert_eq!(s.code, 400);
                assert!(
                    s.message
                        .contains("strict decoding error: unknown field \"delete_options\""),
                    "{}",
                    s.message
                );
                assert!(e.api.pod("default", "p").is_some(), "nothing applied");
            }
            _ => {
                r.expect("warn mode accepts");
                // The grace period 0 was dropped with the unknown key: the pod's own 30 s apply.
                let pod = e.api.pod("default", "p").expect("still terminating");
                assert_eq!(pod["metadata"]["deletionGracePeriodSeconds"], 30);
            }
        }
    }
    // The Warning header itself, on the raw wire.
    let api = FakeApi::builder()
        .field_validation(FieldValidation::Warn)
        .start();
    api.add_node("node-a", &[]);
    api.add_pod(PodSeed::new("q").node("node-a"));
    let (code, headers, _) = raw_with_headers(
        &api,
        "POST",
        "/api/v1/namespaces/default/pods/q/eviction",
        "application/json",
        &json!({"metadata": {"name": "q"}, "delete_options": {}}),
    );
    assert_eq!(code, 201);
    assert!(
        headers.contains("warning: 299 - \"unknown field \\\"delete_options\\\"\""),
        "{headers}"
    );
    // The request's own fieldValidation=Strict wins over the server default.
    api.add_pod(PodSeed::new("r").node("node-a"));
    let (code, _, body) = raw_with_headers(
        &api,
        "POST",
        "/api/v1/namespaces/default/pods/r/eviction?fieldValidation=Strict",
        "application/json",
        &json!({"metadata": {"name": "r"}, "deleteOptions": {"preconditions": {"uuid": "x"}}}),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unknown field \"deleteOptions.preconditions.uuid\""),
        "{body}"
    );
}

// ---------------------------------------------------------------- semantics

#[test]
fn label_selector_grammar_and_matching() {
    let labels = json!({"app": "web", "tier": "front", "env": "prod"});
    let yes = [
        "",
        "app=web",
        "app==web",
        "app!=db",
        "missing!=x",
        "app in (web, db)",
        "tier notin (back)",
        "missing notin (x)",
        "env",
        "!missing",
        "app=web,tier in (front),!missing",
    ];
    for s in yes {
        assert!(
            LabelSelector::parse(s).unwrap().matches(&labels),
            "{s:?} should match"
        );
    }
    let no = [
        "app=db",
        "app!=web",
        "app in (db)",
        "env notin (prod)",
        "missing",
        "!env",
        "app=web,env=dev",
    ];
    for s in no {
        assert!(
            !LabelSelector::parse(s).unwrap().matches(&labels),
            "{s:?} should not match"
        );
    }
    for bad in [
        "app in web",
        "a b=c",
        "=x",
        "app=(",
        "app in (a",
        "appin (a)",
    ] {
        assert!(
            LabelSelector::parse(bad).is_err(),
            "{bad:?} should be rejected"
        );
    }
    // Object selectors: {} selects all, null selects nothing.
    assert!(
        LabelSelector::from_object(Some(&json!({})))
            .unwrap()
            .matches(&labels)
    );
    assert!(!LabelSelector::from_object(None).unwrap().matches(&labels));
    let expr = json!({"matchLabels": {"app": "web"},
                      "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]},
                                           {"key": "gone", "operator": "DoesNotExist"}]});
    assert!(
        LabelSelector::from_object(Some(&expr))
            .unwrap()
            .matches(&labels)
    );
}

#[test]
fn field_selectors_per_resource() {
    let pod = json!({"metadata": {"name": "p", "namespace": "ns"},
                     "spec": {"nodeName": "node-a"}, "status": {"phase": "Running"}});
    let m = |s: &str| FieldSelector::parse(s, Res::Pods).unwrap().matches(&pod);
    assert!(m("spec.nodeName=node-a"));
    assert!(m("spec.nodeName==node-a,metadata.name=p"));
    assert!(m("status.phase!=Succeeded,status.phase!=Failed"));
    assert!(!m("spec.nodeName=node-b"));
    assert!(!m("metadata.namespace!=ns"));
    assert!(FieldSelector::parse("spec.nodeName=x", Res::Nodes).is_err());
    assert!(FieldSelector::parse("bogus", Res::Pods).is_err());
    let node = json!({"metadata": {"name": "node-a"}, "spec": {}});
    assert!(
        FieldSelector::parse("spec.unschedulable=false", Res::Nodes)
            .unwrap()
            .matches(&node)
    );
}

#[test]
fn pdb_math_rounds_like_the_disruption_controller() {
    assert_eq!(scaled(&json!("50%"), 3, true), Ok(2));
    assert_eq!(scaled(&json!("50%"), 3, false), Ok(1));
    assert_eq!(scaled(&json!("34%"), 3, true), Ok(2));
    assert_eq!(scaled(&json!(4), 10, true), Ok(4));
    assert!(scaled(&json!("half"), 3, true).is_err());

    // maxUnavailable 34% of a 3-replica ReplicaSet rounds up to 2 -> desired 1, and a
    // not-Ready pod does not count as healthy.
    let api = FakeApi::start();
    api.add_replicaset("default", "web", &[("app", "web")], 3, &[("app", "web")]);
    for (p, ready) in [("w1", true), ("w2", true), ("w3", false)] {
        api.add_pod(
            PodSeed::new(p)
                .label("app", "web")
                .replicaset("web")
                .ready(ready),
        );
    }
    let check = |name: &str, limit: PdbLimit, want: Budget| {
        api.add_pdb("default", name, &[("app", "web")], limit, None);
        let s = &api.get(Res::PodDisruptionBudgets, "default", name).unwrap()["status"];
        let got = Budget {
            expected: s["expectedPods"].as_i64().unwrap(),
            desired_healthy: s["desiredHealthy"].as_i64().unwrap(),
            current_healthy: s["currentHealthy"].as_i64().unwrap(),
            disruptions_allowed: s["disruptionsAllowed"].as_i64().unwrap(),
        };
        assert_eq!(got, want, "{name}");
    };
    let b = |expected, desired_healthy, disruptions_allowed| Budget {
        expected,
        desired_healthy,
        current_healthy: 2,
        disruptions_allowed,
    };
    check("max34", PdbLimit::MaxUnavailablePercent(34), b(3, 1, 1));
    check("max1", PdbLimit::MaxUnavailable(1), b(3, 2, 0));
    check("min50", PdbLimit::MinAvailablePercent(50), b(3, 2, 0));
    check("min1", PdbLimit::MinAvailable(1), b(3, 1, 1));
}

/// Eviction of a not-Ready pod: AlwaysAllow lets it go; IfHealthyBudget only when the budget is
/// met. Two budgets on one pod are a 500.
#[test]
fn unhealthy_pod_eviction_policies_and_overlapping_budgets() {
    let api = FakeApi::start();
    api.add_pod(PodSeed::new("a1").label("app", "a").ready(false));
    api.add_pod(PodSeed::new("a2").label("app", "a"));
    api.add_pod(PodSeed::new("b1").label("app", "b").ready(false));
    api.add_pod(PodSeed::new("b2").label("app", "b"));
    api.add_pod(PodSeed::new("c1").label("app", "c"));
    api.add_pdb(
        "default",
        "a",
        &[("app", "a")],
        PdbLimit::MinAvailable(2),
        Some(UnhealthyPolicy::AlwaysAllow),
    );
    api.add_pdb(
        "default",
        "b",
        &[("app", "b")],
        PdbLimit::MinAvailable(2),
        Some(UnhealthyPolicy::IfHealthyBudget),
    );
    api.add_pdb(
        "default",
        "c1",
        &[("app", "c")],
        PdbLimit::MinAvailable(0),
        None,
    );
    api.add_pdb(
        "default",
        "c2",
        &[("app", "c")],
        PdbLimit::MinAvailable(0),
        None,
    );
    let post = |pod: &str| {
        let body = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": "default"}});
        raw(
            &api,
            "POST",
            &format!("/api/v1/namespaces/default/pods/{pod}/eviction"),
            "application/json",
            &body,
        )
    };
    assert_eq!(post("a1").0, 201);
    assert_eq!(post("b1").0, 429);
    let (code, body) = post("c1");
    assert_eq!(code, 500);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("more than one PodDisruptionBudget")
    );
    assert!(api.pod("default", "a1").is_none());
    assert!(api.pod("default", "b1").is_some());
}

/// A minimal HTTP/1.1 client: (status, JSON body).
fn raw(api: &FakeApi, method: &str, path: &str, content_type: &str, body: &Value) -> (u16, Value) {
    let (code, _, body) = raw_with_headers(api, method, path, content_type, body);
    (code, body)
}

/// One HTTP/1.1 request: status, response head (lowercased) and JSON body.
fn raw_with_headers(
    api: &FakeApi,
    method: &str,
    path: &str,
    content_type: &str,
    body: &Value,
) -> (u16, String, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&api.addr(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
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

#[test]
fn put_with_a_stale_resource_version_is_a_conflict() {
    let api = FakeApi::start();
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "slot-0", "namespace": "kube-system"},
                       "spec": {"holderIdentity": "node-a"}});
    let base = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
    let (code, created) = raw(&api, "POST", base, "application/json", &lease);
    assert_eq!(code, 201);
    assert_eq!(
        raw(&api, "POST", base, "application/json", &lease).0,
        409,
        "AlreadyExists"
    );
    let mut mine = created.clone();
    mine["spec"]["holderIdentity"] = json!("node-b");
    let (code, updated) = raw(
        &api,
        "PUT",
        &format!("{base}/slot-0"),
        "application/json",
        &mine,
    );
    assert_eq!(code, 200);
    assert_ne!(
        updated["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
    assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
    // A second writer still holding the old resourceVersion loses.
    let mut theirs = created.clone();
    theirs["spec"]["holderIdentity"] = json!("node-c");
    let (code, status) = raw(
        &api,
        "PUT",
        &format!("{base}/slot-0"),
        "application/json",
        &theirs,
    );
    assert_eq!(code, 409);
    assert_eq!(status["reason"], "Conflict");
    let stored = api.get(Res::Leases, "kube-system", "slot-0").unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "node-b");
    // DELETE with a wrong uid precondition is refused too.
    let pre = json!({"preconditions": {"uid": "not-the-uid"}});
    assert_eq!(
        raw(
            &api,
            "DELETE",
            &format!("{base}/slot-0"),
            "application/json",
            &pre
        )
        .0,
        409
    );
    assert!(api.get(Res::Leases, "kube-system", "slot-0").is_some());
}

#[test]
fn patches_json_merge_and_watch_stream() {
    let mut doc = json!({"a": {"b": 1, "c": [1, 2]}, "d": "x"});
    merge_patch(&mut doc, &json!({"a": {"b": null, "e": true}, "d": "y"}));
    assert_eq!(doc, json!({"a": {"c": [1, 2], "e": true}, "d": "y"}));
    json_patch(
        &mut doc,
        &json!([{"op": "add", "path": "/a/c/-", "value": 3},
                {"op": "replace", "path": "/d", "value": "z"},
                {"op": "remove", "path": "/a/e"},
                {"op": "add", "path": "/metadata~1x", "value": 1}]),
    )
    .unwrap();
    assert_eq!(
        doc,
        json!({"a": {"c": [1, 2, 3]}, "d": "z", "metadata/x": 1})
    );
    assert!(
        json_patch(
            &mut doc,
            &json!([{"op": "replace", "path": "/nope", "value": 1}])
        )
        .is_err()
    );

    // A watch from a resourceVersion replays later changes, filtered, then times out.
    let api = FakeApi::start();
    let n = api.add_node("node-a", &[]);
    api.add_node("node-b", &[]);
    let rv = n["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    api.label_node("node-a", "x", Some("1"));
    api.label_node("node-b", "x", Some("1"));
    let (code, body) = http_get(
        api.addr(),
        &format!("/api/v1/nodes?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3Dnode-a&timeoutSeconds=1"),
    )
    .unwrap();
    assert_eq!(code, 200);
    let events: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{body}");
    assert_eq!(events[0]["type"], "MODIFIED");
    assert_eq!(name(&events[0]["object"]), "node-a");
    wait_for(Duration::from_secs(5), "requests recorded", || {
        (api.requests().len() == 1).then_some(())
    });
}

#[test]
fn finalizers_hold_a_deleted_pod_until_the_last_is_removed() {
    let api = FakeApi::builder()
        .grace_second(Duration::from_millis(20))
        .start();
    api.add_node("node-a", &[]);
    api.add_pod(
        PodSeed::new("held")
            .node("node-a")
            .finalizer("example.com/keep"),
    );
    api.add_pod(
        PodSeed::new("graceful")
            .node("node-a")
            .grace_period(2)
            .finalizer("example.com/keep"),
    );
    for p in ["held", "graceful"] {
        let (code, _) = raw(
            &api,
            "DELETE",
            &format!("/api/v1/namespaces/default/pods/{p}"),
            "application/json",
            &json!({}),
        );
        assert_eq!(code, 200);
    }
    // Past both grace periods (0 and 2 x 20 ms), both are still there, Terminating.
    std::thread::sleep(Duration::from_millis(300));
    for p in ["held", "graceful"] {
        let pod = api.pod("default", p).expect("held by its finalizer");
        assert!(!pod["metadata"]["deletionTimestamp"].is_null(), "{p}");
    }
    for p in ["held", "graceful"] {
        let (code, _) = raw(
            &api,
            "PATCH",
            &format!("/api/v1/namespaces/default/pods/{p}"),
            "application/merge-patch+json",
            &json!({"metadata": {"finalizers": null}}),
        );
        assert_eq!(code, 200);
        assert!(
            api.pod("default", p).is_none(),
            "{p} gone with its last finalizer"
        );
    }
}
