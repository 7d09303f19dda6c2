//! An in-memory fake Kubernetes API server for tests: plain HTTP on a loopback port, served by
//! its own thread and tokio runtime (so sync tests can use it), good enough for kube-rs clients
//! and real `kubectl` (`get`, `cordon`, `drain`). It models discovery, CRUD with
//! resourceVersions, selectors, watches, the patch flavours, the Eviction subresource with
//! PodDisruptionBudgets, graceful pod deletion and ReplicaSet replacement. See
//! `docs/fake-api-server.md` for the semantics and their Kubernetes references.
//!
//! ```no_run
//! use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
//! let api = FakeApi::start();
//! api.add_node("node-a", &[("zone", "a")]);
//! api.add_pod(PodSeed::new("web-1").node("node-a").label("app", "web"));
//! api.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"));
//! ```

pub mod admission;
pub mod cel;
mod controllers;
mod faults;
mod http;
pub mod managed;
mod patch;
mod pdb;
pub mod rbac;
mod resources;
mod selectors;
mod store;
mod table;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

pub use controllers::ControllerConfig;
pub use faults::{Fault, FaultKind, FieldValidation};
pub use patch::{json_patch, merge_patch};
pub use pdb::{Budget, scaled};
pub use resources::Res;
pub use selectors::{FieldSelector, LabelSelector};
pub use store::{PdbSample, RecordedRequest};

use store::Store;

/// Who controls a seeded pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    None,
    ReplicaSet(String),
    DaemonSet(String),
}

/// A pod to seed, built fluently: `PodSeed::new("web-1").node("node-a").label("app", "web")`.
#[derive(Debug, Clone)]
pub struct PodSeed {
    pub name: String,
    pub namespace: String,
    pub node: Option<String>,
    pub labels: Vec<(String, String)>,
    pub owner: Owner,
    pub ready: bool,
    pub mirror: bool,
    pub empty_dir: bool,
    pub priority: Option<i32>,
    pub grace_period: Option<i64>,
    pub annotations: Vec<(String, String)>,
    pub host_network: bool,
    pub finalizers: Vec<String>,
    /// `status.phase` when not Running (Pending, Succeeded, Failed).
    pub phase: Option<String>,
}

impl PodSeed {
    /// A Ready pod in `default`, unscheduled, unowned, with one container.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            node: None,
            labels: Vec::new(),
            owner: Owner::None,
            ready: true,
            mirror: false,
            empty_dir: false,
            priority: None,
            grace_period: None,
            annotations: Vec::new(),
            host_network: false,
            finalizers: Vec::new(),
            phase: None,
        }
    }
    /// `status.phase` other than Running (the eviction handler skips budgets for Pending,
    /// Succeeded and Failed pods).
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = Some(phase.into());
        self
    }
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }
    pub fn replicaset(mut self, rs: &str) -> Self {
        self.owner = Owner::ReplicaSet(rs.into());
        self
    }
    pub fn daemonset(mut self, ds: &str) -> Self {
        self.owner = Owner::DaemonSet(ds.into());
        self
    }
    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }
    /// A static pod's mirror (`kubernetes.io/config.mirror` annotation).
    pub fn mirror(mut self) -> Self {
        self.mirror = true;
        self
    }
    /// Adds an `emptyDir` volume.
    pub fn empty_dir(mut self) -> Self {
        self.empty_dir = true;
        self
    }
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = Some(p);
        self
    }
    /// `spec.terminationGracePeriodSeconds`: a DELETE without a grace period keeps the pod
    /// Terminating this long.
    pub fn grace_period(mut self, seconds: i64) -> Self {
        self.grace_period = Some(seconds);
        self
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.push((k.into(), v.into()));
        self
    }
    /// A `metadata.finalizers` entry: a deleted pod stays Terminating until it is removed.
    pub fn finalizer(mut self, f: &str) -> Self {
        self.finalizers.push(f.into());
        self
    }
    /// `spec.hostNetwork: true`: the pod shares the node's network namespace.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
}

/// A PodDisruptionBudget's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdbLimit {
    MinAvailable(i64),
    MinAvailablePercent(u32),
    MaxUnavailable(i64),
    MaxUnavailablePercent(u32),
}

/// `spec.unhealthyPodEvictionPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnhealthyPolicy {
    IfHealthyBudget,
    AlwaysAllow,
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

/// Configures a fake before starting it.
#[derive(Debug, Clone, Default)]
pub struct FakeApiBuilder {
    config: ControllerConfig,
    validation: FieldValidation,
}

impl FakeApiBuilder {
    /// Delay before a deleted ReplicaSet pod is replaced (default 200 ms).
    pub fn replace_delay(mut self, d: Duration) -> Self {
        self.config.replace_delay = d;
        self
    }
    /// Delay before a replacement pod becomes Ready (default 500 ms).
    pub fn ready_delay(mut self, d: Duration) -> Self {
        self.config.ready_delay = d;
        self
    }
    /// Node replacement pods land on (default `node-other`).
    pub fn other_node(mut self, node: &str) -> Self {
        self.config.other_node = node.into();
        self
    }

    /// A server that keeps no `managedFields` (an old one, or behind a proxy stripping them):
    /// Node writes record none and drop what a patch sent.
    pub fn without_managed_fields(mut self) -> Self {
        self.config.managed_fields = false;
        self
    }

    /// How unknown body fields are answered when a request does not say (default Strict;
    /// a real server defaults to Warn).
    pub fn field_validation(mut self, mode: FieldValidation) -> Self {
        self.validation = mode;
        self
    }
    /// How long one second of a pod's grace period lasts (default 1 s): tests scale it down.
    pub fn grace_second(mut self, d: Duration) -> Self {
        self.config.grace_second = d;
        self
    }
    /// How long after a write the disruption controller updates PDB status (default 100 ms).
    pub fn pdb_lag(mut self, d: Duration) -> Self {
        self.config.pdb_lag = Some(d);
        self
    }
    /// No disruption controller: PDB status is what `set_pdb_status` / `sync_pdbs` write.
    pub fn pdb_controller_paused(mut self) -> Self {
        self.config.pdb_lag = None;
        self
    }
    /// The disruption controller's `DeletionTimeout` for `disruptedPods` entries (default 120 s).
    pub fn disrupted_pod_timeout(mut self, d: Duration) -> Self {
        self.config.disrupted_pod_timeout = d;
        self
    }

    pub fn start(self) -> FakeApi {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-api")
            .enable_all()
            .build()
            .expect("fake API runtime");
        let store = Store::new(rt.handle().clone(), self.config, self.validation);
        store.spawn_disruption_controller();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = http::router(Arc::clone(&store));
        let thread = std::thread::Builder::new()
            .name("fake-api".into())
            .spawn(move || {
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        r = axum::serve(l, app) => { if let Err(e) = r { eprintln!("fake API: {e}"); } }
                        _ = rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .expect("spawn fake API thread");
        FakeApi {
            store,
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }
}

/// One endpoint of a seeded EndpointSlice: `EndpointSeed::new("10.0.0.1").node("node-a")`.
#[derive(Debug, Clone)]
pub struct EndpointSeed {
    pub ip: String,
    pub node: Option<String>,
    /// The pod behind it (`targetRef`), if any.
    pub pod: Option<String>,
    /// `conditions.ready`; `None` leaves the condition out (clients read nil as ready).
    pub ready: Option<bool>,
}

impl EndpointSeed {
    pub fn new(ip: &str) -> Self {
        Self {
            ip: ip.to_string(),
            node: None,
            pod: None,
            ready: Some(true),
        }
    }

    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    pub fn pod(mut self, pod: &str) -> Self {
        self.pod = Some(pod.to_string());
        self
    }

    pub fn ready(mut self, ready: Option<bool>) -> Self {
        self.ready = ready;
        self
    }
}

/// A running fake API server; stops (and drops every open watch) on drop.
pub struct FakeApi {
    store: Arc<Store>,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Starts with the default controller timings.
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn builder() -> FakeApiBuilder {
        FakeApiBuilder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (cluster `fake`, dummy bearer token, namespace `default`) for kubectl and
    /// kube-rs.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user:\n    token: fake-token\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    /// A kubeconfig for this fake as the agent on `node`: its ServiceAccount
    /// (`nodekeeper-system/nodekeeper`) with the node claim, subject to the shipped RBAC.
    pub fn write_agent_kubeconfig(&self, path: &Path, node: &str) {
        self.write_kubeconfig(path);
        agent_kubeconfig(path, node, path);
    }

    /// Authorizes ServiceAccount requests with `rbac` instead of the shipped manifests' rules.
    pub fn set_rbac(&self, rbac: rbac::Rbac) {
        *self.store.rbac.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(rbac));
    }

    /// Admits ServiceAccount writes with `admission` instead of the shipped policies.
    pub fn set_admission(&self, admission: admission::Admission) {
        *self
            .store
            .admission
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(admission));
    }

    fn create(&self, res: Res, obj: Value) -> Value {
        self.store
            .mutate(|st| st.create(res, obj))
            .unwrap_or_else(|e| panic!("seeding {res:?}: {}", e.message))
    }

    /// A Ready node with an InternalIP and kubelet version.
    pub fn add_node(&self, name: &str, labels: &[(&str, &str)]) -> Value {
        let mut all = vec![("kubernetes.io/hostname", name)];
        all.extend_from_slice(labels);
        self.create(
            Res::Nodes,
            json!({
                "metadata": {"name": name, "labels": labels_json(&all)},
                "spec": {},
                "status": {
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                    "addresses": [{"type": "InternalIP", "address": "10.0.0.10"},
                                  {"type": "Hostname", "address": name}],
                    "nodeInfo": {"kubeletVersion": "v1.33.0"},
                },
            }),
        )
    }

    /// A pod; a DaemonSet owner is created when missing (kubectl drain looks it up).
    pub fn add_pod(&self, seed: PodSeed) -> Value {
        let ns = seed.namespace.clone();
        let owner = match &seed.owner {
            Owner::None => None,
            Owner::ReplicaSet(rs) => Some(("ReplicaSet", rs.clone(), Res::ReplicaSets)),
            Owner::DaemonSet(ds) => {
                if self.get(Res::DaemonSets, &ns, ds).is_none() {
                    self.add_daemonset(&ns, ds);
                }
                Some(("DaemonSet", ds.clone(), Res::DaemonSets))
            }
        };
        let labels: Vec<(&str, &str)> = seed
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut meta = json!({"name": seed.name, "namespace": ns, "labels": labels_json(&labels)});
        if let Some((kind, name, res)) = owner {
            let uid = self
                .get(res, &ns, &name)
                .map(|o| o["metadata"]["uid"].clone())
                .unwrap_or(json!(format!("missing-{name}")));
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind, "name": name,
                "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
        }
        if seed.mirror {
            meta["annotations"] = json!({"kubernetes.io/config.mirror": "fake-mirror-hash",
                                         "kubernetes.io/config.source": "file"});
            // The kubelet makes its Node the mirror pod's owner.
            if let Some(node) = &seed.node {
                meta["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Node",
                    "name": node, "uid": format!("node-uid-{node}"), "controller": true}]);
            }
        }
        for (k, v) in &seed.annotations {
            if !meta["annotations"].is_object() {
                meta["annotations"] = json!({});
            }
            meta["annotations"][k] = json!(v);
        }
        if !seed.finalizers.is_empty() {
            meta["finalizers"] = json!(seed.finalizers);
        }
        let mut spec =
            json!({"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]});
        if let Some(node) = &seed.node {
            spec["nodeName"] = json!(node);
        }
        if seed.empty_dir {
            spec["volumes"] = json!([{"name": "scratch", "emptyDir": {}}]);
            spec["containers"][0]["volumeMounts"] =
                json!([{"name": "scratch", "mountPath": "/scratch"}]);
        }
        if let Some(p) = seed.priority {
            spec["priority"] = json!(p);
        }
        if let Some(g) = seed.grace_period {
            spec["terminationGracePeriodSeconds"] = json!(g);
        }
        if seed.host_network {
            spec["hostNetwork"] = json!(true);
        }
        let ip = format!("10.244.0.{}", self.store.lock().seq % 250 + 2);
        let pod = json!({"metadata": meta, "spec": spec, "status": {"podIP": ip}});
        let mut pod = controllers::with_readiness(pod, seed.ready);
        if let Some(phase) = &seed.phase {
            pod["status"]["phase"] = json!(phase);
        }
        self.create(Res::Pods, pod)
    }

    /// A ReplicaSet selecting `selector` (matchLabels) with a template carrying `template_labels`.
    pub fn add_replicaset(
        &self,
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        replicas: i64,
        template_labels: &[(&str, &str)],
    ) -> Value {
        self.create(
            Res::ReplicaSets,
            json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": labels_json(selector)},
                    "template": {
                        "metadata": {"labels": labels_json(template_labels)},
                        "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
                    },
                },
                "status": {"replicas": replicas, "readyReplicas": replicas},
            }),
        )
    }

    pub fn add_daemonset(&self, ns: &str, name: &str) -> Value {
        self.create(
            Res::DaemonSets,
            json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {"selector": {"matchLabels": {"ds": name}},
                         "template": {"metadata": {"labels": {"ds": name}},
                                      "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]}}},
            }),
        )
    }

    /// A policy/v1 PodDisruptionBudget; seed the pods first, so the audit's first sample is the
    /// real starting point. Its status is computed at once (a seeded PDB is one the disruption
    /// controller has already observed) unless the controller is paused.
    pub fn add_pdb(
        &self,
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        limit: PdbLimit,
        policy: Option<UnhealthyPolicy>,
    ) -> Value {
        let mut spec = json!({"selector": {"matchLabels": labels_json(selector)}});
        match limit {
            PdbLimit::MinAvailable(n) => spec["minAvailable"] = json!(n),
            PdbLimit::MinAvailablePercent(p) => spec["minAvailable"] = json!(format!("{p}%")),
            PdbLimit::MaxUnavailable(n) => spec["maxUnavailable"] = json!(n),
            PdbLimit::MaxUnavailablePercent(p) => spec["maxUnavailable"] = json!(format!("{p}%")),
        }
        if let Some(p) = policy {
            spec["unhealthyPodEvictionPolicy"] = json!(match p {
                UnhealthyPolicy::IfHealthyBudget => "IfHealthyBudget",
                UnhealthyPolicy::AlwaysAllow => "AlwaysAllow",
            });
        }
        self.create(
            Res::PodDisruptionBudgets,
            json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
        );
        if self.store.config.pdb_lag.is_some() {
            self.store.sync_pdbs();
        }
        self.get(Res::PodDisruptionBudgets, ns, name)
            .expect("just created")
    }

    /// A `discovery.k8s.io/v1` EndpointSlice of Service `service`, as the EndpointSlice
    /// controller writes it: name `{service}-<random>`, label `kubernetes.io/service-name`,
    /// `addressType` IPv4 (IPv6 when the first endpoint's IP has a ':'), named TCP ports.
    pub fn add_endpoint_slice(
        &self,
        ns: &str,
        service: &str,
        ports: &[(&str, u16)],
        endpoints: &[EndpointSeed],
    ) -> Value {
        let v6 = endpoints.first().is_some_and(|e| e.ip.contains(':'));
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                let mut ep = json!({"addresses": [e.ip]});
                if let Some(r) = e.ready {
                    ep["conditions"] = json!({"ready": r, "serving": r, "terminating": false});
                }
                if let Some(n) = &e.node {
                    ep["nodeName"] = json!(n);
                }
                if let Some(p) = &e.pod {
                    let uid = self
                        .get(Res::Pods, ns, p)
                        .map(|o| o["metadata"]["uid"].clone())
                        .unwrap_or(json!(format!("uid-{p}")));
                    ep["targetRef"] =
                        json!({"kind": "Pod", "namespace": ns, "name": p, "uid": uid});
                }
                ep
            })
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|(name, port)| json!({"name": name, "port": port, "protocol": "TCP"}))
            .collect();
        self.create(
            Res::EndpointSlices,
            json!({
                "metadata": {
                    "generateName": format!("{service}-"),
                    "namespace": ns,
                    "labels": {"kubernetes.io/service-name": service,
                               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                },
                "addressType": if v6 { "IPv6" } else { "IPv4" },
                "endpoints": endpoints,
                "ports": ports,
            }),
        )
    }

    /// Runs the disruption controller once now (also when paused).
    pub fn sync_pdbs(&self) {
        self.store.sync_pdbs();
    }

    /// Writes a PDB's `status` as given (a paused controller keeps it), as kubernetes' eviction
    /// tests seed a fake clientset.
    pub fn set_pdb_status(&self, ns: &str, name: &str, status: Value) {
        self.edit(Res::PodDisruptionBudgets, ns, name, |pdb| {
            pdb["status"] = status
        });
    }

    /// Changes an object in place, as an outside writer would (one MODIFIED event; a `spec`
    /// change bumps `generation`).
    pub fn edit(&self, res: Res, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        self.store.mutate(|st| {
            let mut obj = st
                .get(res, ns, name)
                .cloned()
                .unwrap_or_else(|| panic!("{res:?} {ns}/{name} exists"));
            f(&mut obj);
            st.replace(res, obj);
        });
    }

    /// Flips a pod's Ready condition (as the kubelet would).
    pub fn set_pod_ready(&self, ns: &str, name: &str, ready: bool) {
        self.store.mutate(|st| {
            let pod = st.get(Res::Pods, ns, name).cloned().expect("pod exists");
            st.replace(Res::Pods, controllers::with_readiness(pod, ready));
        });
    }

    /// A PersistentVolume as given (cluster-scoped).
    /// A ClusterIP Service (`clusterIP` as given, `None` for a headless one).
    pub fn add_service(&self, ns: &str, name: &str, cluster_ip: Option<&str>) -> Value {
        self.create(
            Res::Services,
            json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "clusterIP": cluster_ip.unwrap_or("None"),
                    "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
                },
            }),
        )
    }

    pub fn add_config_map(&self, ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        self.create(
            Res::ConfigMaps,
            json!({"metadata": {"name": name, "namespace": ns}, "data": data}),
        )
    }

    /// Replaces a ConfigMap's `data`, as `kubectl apply` would (a MODIFIED watch event).
    pub fn set_config_map_data(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        self.store.mutate(|st| {
            let mut cm = st
                .get(Res::ConfigMaps, ns, name)
                .cloned()
                .expect("config map exists");
            cm["data"] = data
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect::<serde_json::Map<String, Value>>()
                .into();
            st.replace(Res::ConfigMaps, cm);
        });
    }

    /// Deletes a ConfigMap (a DELETED watch event).
    /// Deletes a Node for good (a replaced instance's old Node object); `add_node` with the same
    /// name then makes a new Node (another UID), as a replacement instance registering would.
    pub fn delete_node(&self, name: &str) {
        self.store.mutate(|st| st.remove(Res::Nodes, "", name));
    }

    /// Removes a pod at once (a DELETED watch event), as a force deletion (`--grace-period=0
    /// --force`) does while its containers may still run on the node.
    pub fn force_delete_pod(&self, ns: &str, name: &str) {
        self.store.mutate(|st| st.remove(Res::Pods, ns, name));
    }

    pub fn delete_config_map(&self, ns: &str, name: &str) {
        self.store.mutate(|st| st.remove(Res::ConfigMaps, ns, name));
    }

    pub fn add_pv(&self, pv: Value) -> Value {
        self.create(Res::PersistentVolumes, pv)
    }

    pub fn pv(&self, name: &str) -> Option<Value> {
        self.get(Res::PersistentVolumes, "", name)
    }

    pub fn pvs(&self) -> Vec<Value> {
        self.list(Res::PersistentVolumes)
    }

    /// Sets a PV's `status.phase`, and its `spec.claimRef` when bound to `claim` (namespace,
    /// name), as the PV controller does when a claim binds or is deleted (Released keeps the ref).
    pub fn set_pv_phase(&self, name: &str, phase: &str, claim: Option<(&str, &str)>) {
        self.store.mutate(|st| {
            let mut pv = st
                .get(Res::PersistentVolumes, "", name)
                .cloned()
                .expect("pv exists");
            pv["status"]["phase"] = json!(phase);
            if let Some((ns, claim)) = claim {
                pv["spec"]["claimRef"] =
                    json!({"kind": "PersistentVolumeClaim", "namespace": ns, "name": claim});
            }
            st.replace(Res::PersistentVolumes, pv);
        });
    }

    /// Deletes a PV outright, as `kubectl delete pv` by an operator would.
    pub fn delete_pv(&self, name: &str) {
        self.store
            .mutate(|st| st.remove(Res::PersistentVolumes, "", name));
    }

    /// Sets (or, with `None`, removes) a node label, as an external actor would.
    pub fn label_node(&self, name: &str, key: &str, value: Option<&str>) {
        self.store.mutate(|st| {
            let mut node = st.get(Res::Nodes, "", name).cloned().expect("node exists");
            match value {
                Some(v) => node["metadata"]["labels"][key] = json!(v),
                None => {
                    if let Some(m) = node["metadata"]["labels"].as_object_mut() {
                        m.remove(key);
                    }
                }
            }
            st.replace(Res::Nodes, node);
        });
    }

    /// Sets `spec.unschedulable` as a cordon by another client (kubectl) would.
    pub fn set_node_unschedulable(&self, name: &str, on: bool) {
        self.store.mutate(|st| {
            let mut node = st.get(Res::Nodes, "", name).cloned().expect("node exists");
            node["spec"]["unschedulable"] = json!(on);
            st.replace(Res::Nodes, node);
        });
    }

    /// Any object by resource, namespace (`""` for cluster-scoped) and name.
    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Value> {
        self.store.lock().get(res, ns, name).cloned()
    }

    /// All objects of a resource.
    pub fn list(&self, res: Res) -> Vec<Value> {
        self.store.lock().list(res, None)
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.get(Res::Nodes, "", name)
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        self.get(Res::Pods, ns, name)
    }

    pub fn pods(&self) -> Vec<Value> {
        self.list(Res::Pods)
    }

    /// Names of the pods whose `spec.nodeName` is `node`.
    pub fn pods_on(&self, node: &str) -> Vec<String> {
        self.pods()
            .into_iter()
            .filter(|p| p["spec"]["nodeName"] == node)
            .map(|p| {
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    /// core/v1 and events.k8s.io/v1 Events, in that order.
    pub fn events(&self) -> Vec<Value> {
        let mut out = self.list(Res::Events);
        out.extend(self.list(Res::EventsV1));
        out
    }

    /// Injects a fault: the next matching request(s) fail, slow down or lose their watch.
    pub fn inject(&self, fault: Fault) {
        self.store
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fault);
    }

    /// Ends every open watch whose path contains `path`, as an API server restart does: the
    /// clients resume from their last resourceVersion (arm `FaultKind::Expired` first to have
    /// that resume answered "too old resource version").
    pub fn end_watches(&self, path: &str) {
        let _ = self.store.watch_ends.send(path.to_string());
    }

    /// Lets every request held by a `Hold` fault (and any later one) be served.
    pub fn release_held(&self) {
        self.store.released.send_replace(true);
    }

    /// How many requests a `Hold` fault has held so far.
    pub fn held_total(&self) -> usize {
        self.store
            .held_total
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Removes every injected fault not yet used up.
    pub fn clear_faults(&self) {
        self.store
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.store.lock().requests.clone()
    }

    /// Every PDB health sample (one per change of a PDB's healthy or desired count).
    pub fn pdb_audit(&self) -> Vec<PdbSample> {
        self.store.lock().audit.clone()
    }

    /// Samples where a PDB had fewer healthy pods than it requires.
    pub fn pdb_violations(&self) -> Vec<PdbSample> {
        self.pdb_audit()
            .into_iter()
            .filter(|s| s.healthy < s.desired_healthy)
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies the kubeconfig at `from` to `to` with the fake's admin token replaced by the agent's
/// ServiceAccount token for `node` (section 13); any other kubeconfig is copied unchanged.
pub fn agent_kubeconfig(from: &Path, node: &str, to: &Path) {
    let text = std::fs::read_to_string(from)
        .unwrap_or_else(|e| panic!("read kubeconfig {}: {e}", from.display()));
    let token =
        rbac::service_account_token(rbac::AGENT_NAMESPACE, rbac::AGENT_SERVICE_ACCOUNT, node);
    let text = text.replace(
        &format!("token: {}\n", rbac::ADMIN_TOKEN),
        &format!("token: {token}\n"),
    );
    std::fs::write(to, text).unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", to.display()));
}
