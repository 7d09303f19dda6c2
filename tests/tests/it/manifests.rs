//! The kustomize base in `manifests/base`: rendered with `kubectl kustomize`, validated against
//! the Kubernetes API schemas, its ConfigMap checked by the real agent binary, and the
//! DaemonSet, Service and RBAC invariants the agent depends on asserted on the rendered objects.
//!
//! Needs kubectl (with its built-in kustomize), Python with PyYAML (the rendered stream is turned
//! into JSON for the assertions; kubernetes-validate depends on PyYAML, so it is there wherever
//! that is) and, for the schema test, kubernetes-validate. Without them the tests skip, under
//! `NODEKEEPER_REQUIRE_TOOLS=1` they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;

use nodekeeper_tests::kustomize::{
    assert_strictly_valid, check_config, have_tools, render, yaml_documents,
};
use serde_json::{Value, json};

/// Kubernetes version the schemas are checked against: a supported release (kubernetes-validate
/// ships schemas for 1.25..=1.37) old enough that clusters still on it can install the base.
const NAMESPACE: &str = "nodekeeper-system";
const COMMON_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "nodekeeper"),
    ("app.kubernetes.io/part-of", "nodekeeper"),
];
/// What the downward API would put in NODE_NAME, for running check-config as the pod would.
const SAMPLE_NODE_NAME: &str = "ip-10-0-0-1.ec2.internal";

// === rendering ===

/// `kubectl kustomize manifests/base`, run once per test binary.
fn rendered_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| render("manifests/base"))
}

fn yaml_document(text: &str) -> Value {
    let mut docs = yaml_documents(text);
    assert_eq!(docs.len(), 1, "expected one YAML document:\n{text}");
    docs.remove(0)
}

/// The rendered base, with lookups that name what is missing.
struct Base {
    objects: Vec<Value>,
}

fn base() -> Base {
    Base {
        objects: yaml_documents(rendered_text()),
    }
}

impl Base {
    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    fn object(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("rendered base has no {kind} {name}"))
    }

    fn daemonset(&self) -> &Value {
        self.object("DaemonSet", "nodekeeper")
    }

    fn pod_spec(&self) -> &Value {
        get(self.daemonset(), "/spec/template/spec")
    }

    fn container(&self) -> &Value {
        let containers = array(self.pod_spec(), "/containers");
        containers
            .iter()
            .find(|c| c["name"] == "nodekeeper")
            .unwrap_or_else(|| panic!("no container named nodekeeper in {containers:?}"))
    }

    /// The generated ConfigMap (its name carries kustomize's content hash).
    fn config_map(&self) -> &Value {
        let maps: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == "ConfigMap")
            .collect();
        assert_eq!(maps.len(), 1, "expected one ConfigMap: {maps:?}");
        maps[0]
    }

    fn config_yaml(&self) -> &str {
        str_at(self.config_map(), "/data/config.yaml")
    }

    /// The container's env as name -> plain value; fieldRef entries are left out.
    fn plain_env(&self) -> BTreeMap<String, String> {
        array(self.container(), "/env")
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_string(),
                    e["value"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    /// The container's volumeMount at `mount_path` and the pod volume it mounts.
    fn mount(&self, mount_path: &str) -> (&Value, &Value) {
        let mount = array(self.container(), "/volumeMounts")
            .iter()
            .find(|m| m["mountPath"] == mount_path)
            .unwrap_or_else(|| panic!("no volumeMount at {mount_path}"));
        let volume = array(self.pod_spec(), "/volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume named {}", mount["name"]));
        (mount, volume)
    }
}

fn get<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer).unwrap_or_else(|| {
        panic!(
            "{pointer} is missing in {} {}",
            v["kind"].as_str().unwrap_or("object"),
            v["metadata"]["name"].as_str().unwrap_or("")
        )
    })
}

fn array<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    get(v, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{pointer} is not a list"))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    get(v, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string"))
}

// === the agent's view of the config ===

/// The effective config the pod runs with: the ConfigMap file plus the DaemonSet's env.
fn effective_config(base: &Base) -> Value {
    let mut env = base.plain_env();
    env.insert("NODE_NAME".into(), SAMPLE_NODE_NAME.into());
    let o = check_config(base.config_yaml(), &env);
    assert!(
        o.status.success(),
        "check-config with the pod's env failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    yaml_document(&String::from_utf8_lossy(&o.stdout))
}

fn listen_port(config: &Value, pointer: &str) -> u16 {
    let addr: SocketAddr = str_at(config, pointer)
        .parse()
        .unwrap_or_else(|e| panic!("{pointer}: {e}"));
    addr.port()
}

// === tests ===

#[test]
fn rendered_base_passes_strict_schema_validation() {
    if !have_tools(&["kubernetes-validate"]) {
        return;
    }
    assert_strictly_valid("the base", rendered_text());
}

#[test]
fn rendered_base_has_each_object_labelled_in_the_namespace() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let mut kinds: Vec<(&str, &str)> = base
        .objects
        .iter()
        .map(|o| (str_at(o, "/kind"), str_at(o, "/metadata/name")))
        .collect();
    kinds.sort();
    let config_map = str_at(base.config_map(), "/metadata/name");
    assert!(
        config_map.starts_with("nodekeeper-config-"),
        "the generated ConfigMap carries a content hash: {config_map}"
    );
    let mut want = vec![
        ("ClusterRole", "nodekeeper"),
        ("ClusterRole", "nodekeeper-aggregator"),
        ("ClusterRoleBinding", "nodekeeper"),
        ("ClusterRoleBinding", "nodekeeper-aggregator"),
        ("ConfigMap", config_map),
        ("DaemonSet", "nodekeeper"),
        ("Deployment", "nodekeeper-aggregator"),
        ("Namespace", NAMESPACE),
        ("PodDisruptionBudget", "nodekeeper-aggregator"),
        ("Role", "nodekeeper-aggregator"),
        ("Role", "nodekeeper-drain-lock"),
        ("RoleBinding", "nodekeeper-aggregator"),
        ("RoleBinding", "nodekeeper-drain-lock"),
        ("Service", "nodekeeper"),
        ("Service", "nodekeeper-aggregator"),
        ("ServiceAccount", "nodekeeper"),
        ("ServiceAccount", "nodekeeper-aggregator"),
        ("StorageClass", "nodekeeper-local"),
        ("ValidatingAdmissionPolicy", "nodekeeper-own-node"),
        ("ValidatingAdmissionPolicyBinding", "nodekeeper-own-node"),
    ];
    want.sort();
    assert_eq!(kinds, want);
    for o in &base.objects {
        let kind = str_at(o, "/kind");
        // kustomize's schema does not know the admission policy kinds are cluster-scoped and
        // sets a namespace on them, which the API server clears on create.
        let namespaced = !matches!(
            kind,
            "Namespace"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "StorageClass"
                | "ValidatingAdmissionPolicy"
                | "ValidatingAdmissionPolicyBinding"
        );
        if namespaced {
            assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{kind} namespace");
        }
        for (k, v) in COMMON_LABELS {
            assert_eq!(o["metadata"]["labels"][k], v, "{kind} label {k}");
        }
    }
    let template_labels = get(base.daemonset(), "/spec/template/metadata/labels");
    for (k, v) in COMMON_LABELS {
        assert_eq!(template_labels[k], v, "pod template label {k}");
    }
}

#[test]
fn configmap_config_passes_check_config() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let yaml = base.config_yaml();
    // The file alone, as an operator would check it.
    let o = check_config(yaml, &BTreeMap::new());
    assert!(
        o.status.success(),
        "check-config rejected the ConfigMap's config.yaml ({}):\n{}\n---\n{yaml}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let file = yaml_document(yaml);
    assert!(
        file.get("hostPaths").is_none(),
        "host paths come from the DaemonSet's env, not config.yaml"
    );
    assert_eq!(file["kubernetes"]["mode"], "auto");
    assert_eq!(file["metrics"]["filesystems"], json!(["/"]));

    // And as the pod runs it: file + the DaemonSet's env.
    let effective = effective_config(&base);
    assert_eq!(effective["nodeName"], SAMPLE_NODE_NAME);
    assert_eq!(
        effective["hostPaths"],
        json!({
            "proc": "/host/proc",
            "sys": "/host/sys",
            "dev": "/host/dev",
            "rootfs": "/host/root",
            "cgroup": "/host/sys/fs/cgroup",
        })
    );
    assert_eq!(effective["stateDir"], "/var/lib/nodekeeper");
    assert_eq!(effective["kubernetes"]["mode"], "auto");
}

#[test]
fn container_runs_the_agent_on_the_mounted_config() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let c = base.container();
    assert_eq!(
        c["image"], "ghcr.io/nodekeeper/nodekeeper:0.1.0",
        "kustomization images: rewrites the placeholder"
    );
    assert_eq!(
        c["args"],
        json!([
            "run",
            "--config",
            "/etc/nodekeeper/config.yaml",
            "--log-format",
            "json"
        ])
    );
    let (mount, volume) = base.mount("/etc/nodekeeper");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        volume["configMap"]["name"],
        base.config_map()["metadata"]["name"],
        "the config volume uses the generated (hashed) ConfigMap"
    );
    assert!(
        base.config_map()["data"]["config.yaml"].is_string(),
        "--config names the ConfigMap key config.yaml"
    );
}

#[test]
fn daemonset_runs_in_the_host_namespaces_on_every_node() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let spec = base.pod_spec();
    assert_eq!(spec["hostNetwork"], true, "hostNetwork");
    assert_eq!(spec["hostPID"], true, "hostPID");
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(
        spec["tolerations"],
        json!([{ "operator": "Exists" }]),
        "tolerates every taint"
    );
    assert_eq!(spec["terminationGracePeriodSeconds"], 30);
    assert_eq!(spec["serviceAccountName"], "nodekeeper");
    base.object("ServiceAccount", "nodekeeper");
    assert_eq!(
        get(base.daemonset(), "/spec/updateStrategy"),
        &json!({
            "type": "RollingUpdate",
            // The successor binds the DNS addresses before the old pod leaves (SO_REUSEPORT) and
            // waits for the metrics and gRPC ports (exclusive).
            "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 },
        })
    );
}

#[test]
fn daemonset_probes_hit_health_endpoints_on_the_metrics_port() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let c = base.container();
    let probe = |name: &str| {
        let p = get(c, &format!("/{name}/httpGet"));
        (p["path"].as_str(), p["port"].as_str())
    };
    assert_eq!(probe("livenessProbe"), (Some("/healthz"), Some("metrics")));
    assert_eq!(probe("readinessProbe"), (Some("/readyz"), Some("metrics")));
    if c.get("startupProbe").is_some() {
        assert_eq!(probe("startupProbe"), (Some("/healthz"), Some("metrics")));
    }
    for name in ["livenessProbe", "readinessProbe"] {
        let p = &c[name];
        let failure = p["failureThreshold"].as_u64().unwrap_or(3);
        let period = p["periodSeconds"].as_u64().unwrap_or(10);
        assert!(
            failure >= 2 && period >= 5,
            "{name}: one slow answer must not restart or unready the agent: {p}"
        );
    }
}

#[test]
fn container_ports_match_the_config_and_the_service() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let ports: BTreeMap<&str, u64> = array(base.container(), "/ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("port name"),
                p["containerPort"].as_u64().expect("containerPort"),
            )
        })
        .collect();
    assert_eq!(ports, BTreeMap::from([("grpc", 9741), ("metrics", 9740)]));

    let effective = effective_config(&base);
    assert_eq!(
        u64::from(listen_port(&effective, "/metrics/listen")),
        ports["metrics"],
        "metrics.listen vs the metrics containerPort"
    );
    assert_eq!(
        u64::from(listen_port(&effective, "/api/listen")),
        ports["grpc"],
        "api.listen vs the grpc containerPort"
    );

    let svc = base.object("Service", "nodekeeper");
    assert_eq!(svc["spec"]["clusterIP"], "None", "headless");
    let template_labels = get(base.daemonset(), "/spec/template/metadata/labels");
    let selector = get(svc, "/spec/selector").as_object().expect("selector");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            &template_labels[k], v,
            "Service selector {k} selects the pods"
        );
    }
    for (k, v) in get(base.daemonset(), "/spec/selector/matchLabels")
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&template_labels[k], v, "DaemonSet selector {k}");
    }
    let svc_ports: BTreeMap<&str, (&Value, &Value, &Value)> = array(svc, "/spec/ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("service port name"),
                (&p["port"], &p["targetPort"], &p["appProtocol"]),
            )
        })
        .collect();
    assert_eq!(
        svc_ports["metrics"],
        (&json!(9740), &json!("metrics"), &json!("http"))
    );
    assert_eq!(
        svc_ports["grpc"],
        (&json!(9741), &json!("grpc"), &json!("grpc"))
    );
}

#[test]
fn daemonset_env_and_mounts_give_the_agent_the_host() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let node_name = array(base.container(), "/env")
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME env");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
        "NODE_NAME from the downward API"
    );
    let env = base.plain_env();
    // (env var, where the agent looks, host path mounted there, read-only)
    let host = [
        // Read-only: the base leaves sysctl off; enabling it makes the mount writable
        // (docs/manifests.md "Enabling sysctl").
        ("NODEKEEPER_HOST_PROC", "/host/proc", "/proc", true),
        ("NODEKEEPER_HOST_SYS", "/host/sys", "/sys", true),
        ("NODEKEEPER_HOST_DEV", "/host/dev", "/dev", true),
        ("NODEKEEPER_HOST_ROOTFS", "/host/root", "/", true),
    ];
    for (var, mount_path, host_path, read_only) in host {
        assert_eq!(env.get(var).map(String::as_str), Some(mount_path), "{var}");
        let (mount, volume) = base.mount(mount_path);
        assert_eq!(volume["hostPath"]["path"], host_path, "{mount_path}");
        assert_eq!(
            mount["readOnly"] == true,
            read_only,
            "{mount_path} read-only: {read_only}"
        );
    }
    // cgroup v2 lives inside the /sys mount.
    assert_eq!(
        env.get("NODEKEEPER_HOST_CGROUP").map(String::as_str),
        Some("/host/sys/fs/cgroup")
    );
    let (root, _) = base.mount("/host/root");
    assert_eq!(
        root["mountPropagation"], "HostToContainer",
        "later host mounts show up under /host/root"
    );

    let (state, volume) = base.mount("/var/lib/nodekeeper");
    assert_eq!(
        volume["hostPath"],
        json!({ "path": "/var/lib/nodekeeper", "type": "DirectoryOrCreate" })
    );
    assert_ne!(state["readOnly"], true, "the state dir is written");
    let effective = effective_config(&base);
    assert_eq!(
        effective["stateDir"], state["mountPath"],
        "config stateDir is the state mount"
    );
}

#[test]
fn resources_request_cpu_and_memory_but_limit_only_memory() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let r = get(base.container(), "/resources");
    assert_eq!(r["requests"], json!({ "cpu": "50m", "memory": "64Mi" }));
    assert_eq!(
        r["limits"],
        json!({ "memory": "256Mi" }),
        "no CPU limit: throttling would stall the DNS path"
    );
}

#[test]
fn cluster_role_grants_exactly_the_listed_verbs() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let role = base.object("ClusterRole", "nodekeeper");
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut by_name = 0;
    for rule in array(role, "/rules") {
        assert!(
            rule.get("nonResourceURLs").is_none(),
            "unexpected nonResourceURLs in {rule}"
        );
        // Only the DNS cache's reads are narrowed by name, and only to kube-dns's objects.
        if let Some(names) = rule.get("resourceNames") {
            assert_eq!(names, &json!(["kube-dns"]), "{rule}");
            let expected = match rule["resources"].as_array().map(Vec::as_slice) {
                Some([r]) if r == "services" => json!(["get"]),
                // Watched by name: list/watch with a metadata.name field selector.
                Some([r]) if r == "configmaps" => json!(["get", "list", "watch"]),
                _ => panic!("unexpected resources in a by-name rule: {rule}"),
            };
            assert_eq!(rule["verbs"], expected, "{rule}");
            by_name += 1;
            continue;
        }
        let strings = |field: &str| -> Vec<String> {
            array(rule, &format!("/{field}"))
                .iter()
                .map(|s| s.as_str().expect("string").to_string())
                .collect()
        };
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                granted
                    .entry((group.clone(), resource))
                    .or_default()
                    .extend(strings("verbs"));
            }
        }
    }
    let want: BTreeMap<(String, String), BTreeSet<String>> = [
        ("", "nodes", &["get", "list", "watch", "patch"][..]),
        ("", "pods", &["get", "list", "watch"]),
        ("", "pods/eviction", &["create"]),
        (
            "",
            "persistentvolumes",
            &["get", "list", "watch", "create", "delete"],
        ),
        ("", "events", &["create", "patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ]
    .into_iter()
    .map(|(g, r, verbs)| {
        (
            (g.to_string(), r.to_string()),
            verbs.iter().map(|v| v.to_string()).collect(),
        )
    })
    .collect();
    assert_eq!(granted, want);
    assert_eq!(by_name, 2, "the kube-dns Service and ConfigMap rules");

    let binding = base.object("ClusterRoleBinding", "nodekeeper");
    assert_eq!(
        binding["roleRef"],
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "nodekeeper" })
    );
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "nodekeeper", "namespace": NAMESPACE }])
    );
}

#[test]
fn drain_lock_role_grants_only_leases_in_the_agent_namespace() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let role = base.object("Role", "nodekeeper-drain-lock");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        role["rules"],
        json!([{
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "create", "update"],
        }])
    );
    let binding = base.object("RoleBinding", "nodekeeper-drain-lock");
    assert_eq!(binding["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        binding["roleRef"],
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "nodekeeper-drain-lock" })
    );
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "nodekeeper", "namespace": NAMESPACE }])
    );
}

// === the aggregator ===

/// True when a Service or matchLabels `selector` selects pods labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .expect("selector map")
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

/// A flag's default as `nodekeeper aggregate --help` prints it.
fn aggregate_default(flag: &str) -> String {
    let out = std::process::Command::new(nodekeeper_tests::agent_bin())
        .args(["aggregate", "--help"])
        .output()
        .expect("run nodekeeper aggregate --help");
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let at = help
        .find(&format!("--{flag} "))
        .unwrap_or_else(|| panic!("no --{flag} in:\n{help}"));
    let rest = &help[at..];
    let start = rest.find("[default: ").expect("a default") + "[default: ".len();
    rest[start..start + rest[start..].find(']').unwrap()].to_string()
}

#[test]
fn aggregator_discovers_the_agents_through_their_headless_service_only() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let deploy = base.object("Deployment", "nodekeeper-aggregator");
    let pod_labels = get(deploy, "/spec/template/metadata/labels");
    assert!(selects(
        get(deploy, "/spec/selector/matchLabels"),
        pod_labels
    ));
    let container = &array(deploy, "/spec/template/spec/containers")[0];
    let args: Vec<&str> = array(container, "/args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    assert_eq!(args[0], "aggregate");
    let after = |flag: &str| {
        let i = args
            .iter()
            .position(|a| *a == flag)
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
        args[i + 1]
    };
    assert_eq!(after("--service"), "$(POD_NAMESPACE)/nodekeeper");
    let env = array(container, "/env");
    assert!(
        env.iter().any(|e| e["name"] == "POD_NAMESPACE"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"),
        "POD_NAMESPACE from the downward API: {env:?}"
    );

    // The Service it lists is the agents' headless one, with the port it asks for by name.
    let agents = base.object("Service", "nodekeeper");
    assert_eq!(agents["spec"]["clusterIP"], "None");
    // NotReady agents (a degraded capability) are still listed: expected, and called.
    assert_eq!(agents["spec"]["publishNotReadyAddresses"], true);
    let agent_pods = get(base.daemonset(), "/spec/template/metadata/labels");
    assert!(selects(get(agents, "/spec/selector"), agent_pods));
    let port = array(agents, "/spec/ports")
        .iter()
        .find(|p| p["name"] == after("--port-name"))
        .expect("the agents' Service has the port --port-name names");
    assert_eq!(port["port"], 9741);
    // Neither the agents' Service nor the DaemonSet selects an aggregator pod.
    assert!(!selects(get(agents, "/spec/selector"), pod_labels));
    assert!(!selects(
        get(base.daemonset(), "/spec/selector/matchLabels"),
        pod_labels
    ));

    // KEDA's address: the ClusterIP Service on the aggregator's --listen port.
    let svc = base.object("Service", "nodekeeper-aggregator");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert!(selects(get(svc, "/spec/selector"), pod_labels));
    assert!(!selects(get(svc, "/spec/selector"), agent_pods));
    let ports: BTreeMap<&str, u64> = array(container, "/ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, BTreeMap::from([("grpc", 9743), ("metrics", 9744)]));
    assert_eq!(aggregate_default("listen"), "0.0.0.0:9743");
    assert_eq!(aggregate_default("metrics-listen"), "0.0.0.0:9744");
    let grpc = array(svc, "/spec/ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("grpc port");
    assert_eq!(
        (&grpc["port"], &grpc["targetPort"], &grpc["appProtocol"]),
        (&json!(9743), &json!("grpc"), &json!("grpc"))
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    // An ordinary, unprivileged workload.
    let pod_spec = get(deploy, "/spec/template/spec");
    assert_eq!(pod_spec["securityContext"]["runAsNonRoot"], true);
    for host in ["hostNetwork", "hostPID"] {
        assert!(pod_spec.get(host).is_none(), "{host}");
    }
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
}

#[test]
fn aggregator_replicas_survive_one_disruption_on_different_nodes() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let deploy = base.object("Deployment", "nodekeeper-aggregator");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod_labels = get(deploy, "/spec/template/metadata/labels");
    let pdb = base.object("PodDisruptionBudget", "nodekeeper-aggregator");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(selects(get(pdb, "/spec/selector/matchLabels"), pod_labels));
    assert!(!selects(
        get(pdb, "/spec/selector/matchLabels"),
        get(base.daemonset(), "/spec/template/metadata/labels")
    ));
    let terms = array(
        deploy,
        "/spec/template/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution",
    );
    let keys: Vec<&str> = terms
        .iter()
        .map(|t| {
            assert!(selects(
                get(t, "/podAffinityTerm/labelSelector/matchLabels"),
                pod_labels
            ));
            str_at(t, "/podAffinityTerm/topologyKey")
        })
        .collect();
    assert_eq!(
        keys,
        vec!["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    );
}

#[test]
fn aggregator_reads_only_endpointslices_in_its_namespace_and_pods() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let deploy = base.object("Deployment", "nodekeeper-aggregator");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["serviceAccountName"],
        "nodekeeper-aggregator"
    );
    let role = base.object("Role", "nodekeeper-aggregator");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        role["rules"],
        json!([{
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["list", "watch"],
        }])
    );
    let binding = base.object("RoleBinding", "nodekeeper-aggregator");
    assert_eq!(
        binding["roleRef"],
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "nodekeeper-aggregator" })
    );
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "nodekeeper-aggregator", "namespace": NAMESPACE }])
    );
    // Cluster-wide: pods, read only (which nodes host a query's pods).
    let cluster_role = base.object("ClusterRole", "nodekeeper-aggregator");
    assert_eq!(
        cluster_role["rules"],
        json!([{ "apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"] }])
    );
    let cluster_binding = base.object("ClusterRoleBinding", "nodekeeper-aggregator");
    assert_eq!(
        cluster_binding["roleRef"],
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "nodekeeper-aggregator" })
    );
    assert_eq!(
        cluster_binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "nodekeeper-aggregator", "namespace": NAMESPACE }])
    );
    // The agents' ClusterRole does not grant the aggregator anything.
    let agent_binding = base.object("ClusterRoleBinding", "nodekeeper");
    assert!(
        !agent_binding["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "nodekeeper-aggregator")
    );
}

/// Both containers run iptables: legacy iptables must take the host's xtables lock (the one
/// kube-proxy takes, hostPath FileOrCreate as kube-proxy mounts it), and the guard's
/// read-only root filesystem gets a writable tmpfs at /run for whatever else the tools write
/// there (issue #15: without the lock mount `iptables-legacy-restore` exits 4 and the guard
/// cannot fail open).
#[test]
fn both_containers_share_the_hosts_xtables_lock() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let volumes = array(base.pod_spec(), "/volumes");
    let containers = array(base.pod_spec(), "/containers");
    for name in ["nodekeeper", "dns-guard"] {
        let c = containers
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"));
        let mount = array(c, "/volumeMounts")
            .iter()
            .find(|m| m["mountPath"] == "/run/xtables.lock")
            .unwrap_or_else(|| panic!("{name} does not mount /run/xtables.lock"));
        assert_ne!(
            mount["readOnly"], true,
            "{name}: the lock is taken read-write"
        );
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the lock's volume");
        assert_eq!(
            volume["hostPath"],
            json!({"path": "/run/xtables.lock", "type": "FileOrCreate"}),
            "{name}"
        );
    }
    let guard = containers
        .iter()
        .find(|c| c["name"] == "dns-guard")
        .unwrap();
    assert_eq!(guard["securityContext"]["readOnlyRootFilesystem"], true);
    let run = array(guard, "/volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == "/run")
        .expect("dns-guard: a writable /run");
    let volume = volumes.iter().find(|v| v["name"] == run["name"]).unwrap();
    assert_eq!(volume["emptyDir"]["medium"], "Memory", "a tmpfs");
}

/// Issue #15: while the agent is dead only the guard knows the node's DNS is still black-holed,
/// so its own /metrics (`--guard-metrics-listen`) must be served on a declared port that the
/// headless Service exposes for scraping (the alert NodekeeperDnsGuardFailOpenPending reads it).
#[test]
fn the_dns_guard_serves_its_metrics_on_a_port_the_service_exposes() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let guard = array(base.pod_spec(), "/containers")
        .iter()
        .find(|c| c["name"] == "dns-guard")
        .expect("a dns-guard container");
    let args: Vec<&str> = array(guard, "/args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    let listen = args
        .iter()
        .position(|a| *a == "--guard-metrics-listen")
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("dns-guard args without --guard-metrics-listen: {args:?}"));
    let listen: std::net::SocketAddr = listen.parse().expect("an ip:port");
    let port = array(guard, "/ports")
        .iter()
        .find(|p| p["name"] == "guard-metrics")
        .expect("a guard-metrics containerPort");
    assert_eq!(port["containerPort"], json!(listen.port()));
    let agent_ports: Vec<&Value> = array(base.container(), "/ports")
        .iter()
        .map(|p| &p["containerPort"])
        .collect();
    assert!(
        !agent_ports.contains(&&json!(listen.port())),
        "the guard's port is not one of the agent's (hostNetwork: both bind on the node)"
    );
    // Its metrics and log are all it reports (#19-d): no Events, so no node name, no token.
    assert!(
        guard.get("env").is_none(),
        "dns-guard env: {}",
        guard["env"]
    );
    let svc = base.object("Service", "nodekeeper");
    let svc_port = array(svc, "/spec/ports")
        .iter()
        .find(|p| p["name"] == "guard-metrics")
        .expect("the Service exposes guard-metrics");
    assert_eq!(
        (
            &svc_port["port"],
            &svc_port["targetPort"],
            &svc_port["appProtocol"]
        ),
        (
            &json!(listen.port()),
            &json!("guard-metrics"),
            &json!("http")
        )
    );
}

/// Issue #19: the guard never gets a ServiceAccount token; the agent gets one through a
/// projected volume mounted in its container only.
#[test]
fn only_the_agent_container_gets_a_service_account_token() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let spec = base.pod_spec();
    assert_eq!(
        spec["automountServiceAccountToken"], false,
        "the token would be mounted in every container"
    );
    let token_dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let (mount, volume) = base.mount(token_dir);
    assert_eq!(mount["readOnly"], true);
    let sources = array(volume, "/projected/sources");
    assert!(
        sources
            .iter()
            .any(|s| s["serviceAccountToken"]["path"] == "token"),
        "{sources:?}"
    );
    assert!(
        sources
            .iter()
            .any(|s| s["configMap"]["name"] == "kube-root-ca.crt"),
        "the API server's CA: {sources:?}"
    );
    assert!(
        sources
            .iter()
            .any(|s| s["downwardAPI"]["items"][0]["path"] == "namespace"),
        "{sources:?}"
    );
    for c in array(spec, "/containers")
        .iter()
        .filter(|c| c["name"] != "nodekeeper")
    {
        let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
        assert!(
            !mounts.iter().any(|m| m["name"] == mount["name"]),
            "{} mounts the token",
            c["name"]
        );
    }
}

/// Issue #19: the shipped config serves no reflection and keeps reads closed: the agents
/// answer census calls only to the read token, which the aggregator (and nothing else in the
/// base) mounts from the same Secret and sends (`--token-file`). The agent's own default is
/// closed too.
#[test]
fn the_shipped_config_closes_reads_and_only_the_aggregator_holds_the_read_token() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let text = base.config_yaml();
    let config = nodekeeper::config::Config::from_yaml(text).expect("the shipped config parses");
    assert!(!config.api.reflection, "{text}");
    assert!(!config.api.auth.open_read_only, "{text}");
    assert!(!config.api.auth.open_keda, "{text}");
    let token_file = config
        .api
        .auth
        .read_token_file
        .as_deref()
        .expect("api.auth.readTokenFile is set");
    let (token_dir, key) = (
        token_file.parent().unwrap().to_str().unwrap(),
        token_file.file_name().unwrap().to_str().unwrap(),
    );
    // The Secret volume holding the key, as one pod spec mounts it in one container.
    let secret_behind = |spec: &Value, container: &Value| -> String {
        let mount = array(container, "/volumeMounts")
            .iter()
            .find(|m| m["mountPath"] == token_dir)
            .unwrap_or_else(|| panic!("{} mounts nothing at {token_dir}", container["name"]));
        assert_eq!(mount["readOnly"], true);
        let volume = array(spec, "/volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mounted volume");
        let items = array(volume, "/secret/items");
        assert!(
            items.iter().any(|i| i["path"] == key),
            "{key} is not in {volume:?}"
        );
        str_at(volume, "/secret/secretName").to_string()
    };
    let agent_secret = secret_behind(base.pod_spec(), base.container());
    let deploy = base.object("Deployment", "nodekeeper-aggregator");
    let agg_spec = get(deploy, "/spec/template/spec");
    let aggregator = &array(agg_spec, "/containers")[0];
    assert_eq!(secret_behind(agg_spec, aggregator), agent_secret);
    let args: Vec<&str> = array(aggregator, "/args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    let i = args
        .iter()
        .position(|a| *a == "--token-file")
        .unwrap_or_else(|| panic!("the aggregator sends no token: {args:?}"));
    assert_eq!(Path::new(args[i + 1]), token_file);
    // Not the guard: it never calls the agent's API.
    for c in array(base.pod_spec(), "/containers")
        .iter()
        .filter(|c| c["name"] != "nodekeeper")
    {
        let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
        assert!(
            !mounts.iter().any(|m| m["mountPath"] == token_dir),
            "{} mounts the read token",
            c["name"]
        );
    }
    assert!(
        !nodekeeper::config::Config::default()
            .api
            .auth
            .open_read_only
    );
}

/// Issue #19: the shipped aggregator's own API serves TLS with a client CA and a token, never
/// anonymously: its args, run with `--check-config` against real files laid out as the
/// mounted Secret volumes (a CA, the serving certificate, the token), read every file and
/// report no open API; the files come from the Secrets the Deployment mounts.
#[test]
fn the_shipped_aggregator_serves_tls_with_a_client_ca_and_no_anonymous_api() {
    if !have_tools(&["openssl"]) {
        return;
    }
    let base = base();
    let deploy = base.object("Deployment", "nodekeeper-aggregator");
    let spec = get(deploy, "/spec/template/spec");
    let container = &array(spec, "/containers")[0];
    let args: Vec<&str> = array(container, "/args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    assert!(!args.contains(&"--allow-anonymous"), "{args:?}");
    let env = container["env"].as_array().cloned().unwrap_or_default();
    assert!(
        !env.iter()
            .any(|e| e["name"] == "NODEKEEPER_AGGREGATE_ALLOW_ANONYMOUS"),
        "{env:?}"
    );
    let after = |flag: &str| {
        let i = args
            .iter()
            .position(|a| *a == flag)
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
        args[i + 1]
    };
    assert_eq!(after("--listen-client-names"), "keda-operator");
    // Each file is a key of a Secret mounted read-only.
    let secret_of = |file: &str| -> String {
        let path = Path::new(file);
        let mount = array(container, "/volumeMounts")
            .iter()
            .find(|m| path.parent() == Some(Path::new(m["mountPath"].as_str().unwrap())))
            .unwrap_or_else(|| panic!("nothing mounted at {file}"));
        assert_eq!(mount["readOnly"], true, "{mount:?}");
        let volume = array(spec, "/volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mounted volume");
        let key = path.file_name().unwrap().to_str().unwrap();
        assert!(
            array(volume, "/secret/items")
                .iter()
                .any(|i| i["path"] == key),
            "{key} not in {volume:?}"
        );
        str_at(volume, "/secret/secretName").to_string()
    };
    for flag in ["--listen-cert", "--listen-key", "--listen-client-ca"] {
        assert_eq!(
            secret_of(after(flag)),
            "nodekeeper-aggregator-tls",
            "{flag}"
        );
    }
    // Its own token, never the agents' read token (decision #19-i: it used to be the same).
    assert_eq!(
        secret_of(after("--listen-token-file")),
        "nodekeeper-aggregator-token"
    );
    assert_eq!(secret_of(after("--token-file")), "nodekeeper-read-token");
    // The agents are read over TLS with its own client certificate.
    for flag in ["--cacert", "--cert", "--key"] {
        assert_eq!(
            secret_of(after(flag)),
            "nodekeeper-aggregator-client-tls",
            "{flag}"
        );
    }

    // The same args against files where the Secrets would put them.
    let pki = nodekeeper_tests::pki::Pki::new();
    pki.ca("ca").server(
        "aggregator",
        "ca",
        "nodekeeper aggregator",
        "DNS:nodekeeper-aggregator.nodekeeper-system.svc",
    );
    pki.client("aggregator-client", "ca", "nodekeeper-aggregator");
    let root = tempfile::tempdir().unwrap();
    let mounted = |file: &str| {
        root.path()
            .join(file.strip_prefix('/').expect("an absolute path"))
    };
    for (flag, from) in [
        ("--listen-cert", "aggregator.crt"),
        ("--listen-key", "aggregator.key"),
        ("--listen-client-ca", "ca.crt"),
        ("--cacert", "ca.crt"),
        ("--cert", "aggregator-client.crt"),
        ("--key", "aggregator-client.key"),
    ] {
        let to = mounted(after(flag));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(pki.path(from), to).unwrap();
    }
    for flag in ["--listen-token-file", "--token-file"] {
        let token = mounted(after(flag));
        std::fs::create_dir_all(token.parent().unwrap()).unwrap();
        std::fs::write(&token, format!("0123456789abcdef-{flag}")).unwrap();
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with('/') {
                mounted(a).display().to_string()
            } else {
                a.replace("$(POD_NAMESPACE)", NAMESPACE)
            }
        })
        .collect();
    let out = std::process::Command::new(nodekeeper_tests::agent_bin())
        .args(&args)
        .arg("--check-config")
        .env_remove("KUBECONFIG")
        .output()
        .expect("run nodekeeper aggregate --check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("allowAnonymous: false"), "{stdout}");
    assert!(
        stdout.contains("clientNames: [\"keda-operator\"]"),
        "{stdout}"
    );
    assert!(!stdout.contains("WARNING"), "{stdout}");
}

// === least privilege (issue #19) ===

/// Each container's added Linux capabilities, on top of `drop: [ALL]`. The base enables
/// metrics, the DNS cache and drain (sysctl and disks are off); tests/tests/it/capabilities.rs
/// runs those paths with exactly the agent's set and shows each capability is needed.
const CONTAINER_CAPABILITIES: [(&str, &[&str]); 2] = [
    (
        "nodekeeper",
        &[
            "NET_ADMIN",
            "NET_BIND_SERVICE",
            "NET_RAW",
            "SYS_ADMIN",
            "SYS_PTRACE",
        ],
    ),
    ("dns-guard", &["NET_ADMIN", "NET_RAW"]),
];

/// The container named `name` in the pod spec.
fn container_named<'a>(spec: &'a Value, name: &str) -> &'a Value {
    array(spec, "/containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The `add` list of a container's capabilities, sorted.
fn added_capabilities(container: &Value) -> BTreeSet<String> {
    container["securityContext"]["capabilities"]["add"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c.as_str().expect("capability name").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Issue #19: no container is privileged in the base; each drops every capability and adds
/// back only its own list, runs on a read-only root filesystem, and cannot gain privileges
/// through setuid binaries.
#[test]
fn each_container_drops_all_capabilities_and_adds_only_its_own() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let spec = base.pod_spec();
    let names: BTreeSet<&str> = array(spec, "/containers")
        .iter()
        .map(|c| c["name"].as_str().expect("container name"))
        .collect();
    let expected_names: BTreeSet<&str> = CONTAINER_CAPABILITIES.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, expected_names, "a new container needs its own row");
    for (name, caps) in CONTAINER_CAPABILITIES {
        let c = container_named(spec, name);
        let sc = &c["securityContext"];
        assert_ne!(sc["privileged"], true, "{name} is privileged");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}: writable root");
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{name}: setuid binaries could gain privileges"
        );
        assert_eq!(
            sc["capabilities"]["drop"],
            json!(["ALL"]),
            "{name} must drop every capability first"
        );
        let want: BTreeSet<String> = caps.iter().map(|c| c.to_string()).collect();
        assert_eq!(added_capabilities(c), want, "{name}'s capabilities");
        // The API server refuses allowPrivilegeEscalation: false next to "CAP_SYS_ADMIN"
        // (literally spelled); the schema check cannot see that rule.
        assert!(
            !added_capabilities(c).iter().any(|c| c.starts_with("CAP_")),
            "{name}: capabilities are spelled without CAP_"
        );
    }
    // The census opens other processes' /proc/PID/ns/net: a ptrace read, which the runtime's
    // default AppArmor profile allows only between its own peers.
    assert_eq!(
        container_named(spec, "nodekeeper")["securityContext"]["appArmorProfile"],
        json!({ "type": "Unconfined" })
    );
}

/// Issue #19: the base leaves sysctl off, so nothing in the pod can write the host's /proc;
/// the host's /sys, /dev and root are read-only as before.
#[test]
fn host_filesystems_are_mounted_read_only_while_sysctl_is_off() {
    if !have_tools(&[]) {
        return;
    }
    let base = base();
    let config =
        nodekeeper::config::Config::from_yaml(base.config_yaml()).expect("shipped config parses");
    assert!(
        !config.sysctl.enabled,
        "sysctl on needs a writable /host/proc"
    );
    for path in ["/host/proc", "/host/sys", "/host/dev", "/host/root"] {
        let (mount, _) = base.mount(path);
        assert_eq!(mount["readOnly"], true, "{path} is writable");
    }
}

/// Issue #19: docs/manifests.md's capability table names exactly the capabilities each
/// container gets, each with its reason (a capability added without one fails here).
#[test]
fn the_capability_table_in_the_docs_matches_the_containers() {
    if !have_tools(&[]) {
        return;
    }
    let doc = std::fs::read_to_string(nodekeeper_tests::workspace_root().join("docs/manifests.md"))
        .expect("docs/manifests.md");
    let section = doc
        .split("### Linux capabilities")
        .nth(1)
        .expect("docs/manifests.md has a \"### Linux capabilities\" section");
    // Rows: | container | `CAP` | why | proved by |
    let mut documented: BTreeSet<(String, String)> = BTreeSet::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 4 || cells[0] == "Container" || cells[0].starts_with("---") {
            continue;
        }
        assert!(!cells[2].is_empty(), "no reason given: {line}");
        documented.insert((
            cells[0].trim_matches('`').into(),
            cells[1].trim_matches('`').into(),
        ));
    }
    let base = base();
    let mut shipped = BTreeSet::new();
    for c in array(base.pod_spec(), "/containers") {
        for cap in added_capabilities(c) {
            shipped.insert((c["name"].as_str().unwrap().to_string(), cap));
        }
    }
    assert_eq!(documented, shipped);
}
