//! The OS-patching rotation's fleet (issue #20), shared by rotation.rs and the adversary rounds
//! adversary_issue20{,b,c,d}.rs (issue #21: once copied file to file): the fake API server, one
//! agent per node started on demand, a boot-ID file per node that a test changes to "reboot" the
//! node, one slot Lease shorter than a reboot (2 s unless the test says otherwise) so that only
//! the return-by mark keeps the slot across it.
//!
//! It owns the fixtures and the reads a test asserts on; it never asserts a promise itself
//! beyond the observation-window helpers named for the promise they check
//! (`node_b_stays_uncordoned`, `never_both_cordoned`).

#![allow(dead_code)] // shared by several modules, none of which uses every part

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nodekeeper::pb::{self, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::request;
use nodekeeper_tests::fake_api::{FakeApi, PdbLimit, PodSeed, Res};
use nodekeeper_tests::{Agent, AgentBuilder, wait_for};
use serde_json::Value;
use tonic::transport::Channel;

/// The drain settings every rotation agent runs with: fast retries and deletion polls, so a
/// drain of a few pods takes seconds, not minutes.
pub const CONFIG: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n";
pub const LOCK_NS: &str = "nodekeeper-system";
pub const SLOT: &str = "nodekeeper-drain-slot-0";
/// Pods per rotated node, behind a budget that lets one go at a time.
pub const PODS: usize = 3;
/// The slot lease: far shorter than a reboot, so only the return-by mark keeps the slot.
pub const LEASE_SECS: u64 = 2;
/// A return-by mark in 2100: a slot held across a reboot that never expires in a test.
pub const FAR_RETURN_BY: &str = "4102444800";

/// `f`, or a panic once `secs` pass.
pub async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

/// `f` until it gives a value or `timeout` passes (then `None`): for asserting with context.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub async fn client(agent: &Agent) -> NodeAgentClient<Channel> {
    NodeAgentClient::connect(agent.grpc_url())
        .await
        .expect("connect")
}

/// Kill -9: the agent dies with its node.
pub fn kill(agent: Agent) {
    let mut agent = agent;
    agent.proc.signal("KILL");
    agent.proc.wait_exit(Duration::from_secs(5));
}

/// A drain of `node` that awaits its reboot (a rotation's drain).
pub fn rotation_request(id: &str, node: &str) -> pb::DrainRequest {
    let mut r = request(id);
    r.node_name = node.into();
    r.await_reboot = true;
    r
}

pub fn last_event(events: &[pb::DrainEvent]) -> Option<&pb::drain_event::Event> {
    events.last().and_then(|e| e.event.as_ref())
}

/// Whether the Drain stream ended `completed`.
pub fn completed(events: &[pb::DrainEvent]) -> bool {
    matches!(
        last_event(events),
        Some(pb::drain_event::Event::Completed(_))
    )
}

// === agent options ===

/// What a rotation agent's config may vary: the fleet lock's slot count and the return timeout.
#[derive(Clone, Copy, Debug)]
pub struct AgentOpts {
    pub slots: u32,
    pub return_timeout: &'static str,
}

impl Default for AgentOpts {
    /// One slot; a return timeout (10 m) no test reaches unless it means to.
    fn default() -> Self {
        AgentOpts {
            slots: 1,
            return_timeout: "10m",
        }
    }
}

impl AgentOpts {
    pub fn slots(self, slots: u32) -> Self {
        AgentOpts { slots, ..self }
    }

    pub fn return_timeout(self, return_timeout: &'static str) -> Self {
        AgentOpts {
            return_timeout,
            ..self
        }
    }
}

// === impl Fleet ===

pub struct Fleet {
    pub api: FakeApi,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    /// The slot Lease's duration in the agents' config, in seconds.
    pub lease_secs: u64,
}

/// How `Fleet::builder` seeds the fleet.
pub struct FleetBuilder {
    pods: usize,
    managed_fields: bool,
    lease_secs: u64,
}

impl FleetBuilder {
    /// Pods per node (`PODS` unless set), behind a minAvailable pods-1 budget.
    pub fn pods(mut self, pods: usize) -> Self {
        self.pods = pods;
        self
    }

    /// A fake API server that drops `managedFields` (as some proxies and old servers do).
    pub fn without_managed_fields(mut self) -> Self {
        self.managed_fields = false;
        self
    }

    /// The slot Lease's duration (`LEASE_SECS` unless set).
    pub fn lease_secs(mut self, secs: u64) -> Self {
        self.lease_secs = secs;
        self
    }

    /// `nodes`, each running its pods (ReplicaSet `app-<node>`) behind its budget; replacements
    /// land on node-other and become Ready 500 ms later. Every node boots "boot-1".
    pub fn start(self, nodes: &[&str]) -> Fleet {
        let mut builder = FakeApi::builder()
            .replace_delay(Duration::from_millis(100))
            .ready_delay(Duration::from_millis(500))
            .other_node("node-other");
        if !self.managed_fields {
            builder = builder.without_managed_fields();
        }
        let api = builder.start();
        api.add_node("node-other", &[]);
        let dir = tempfile::tempdir().expect("tempdir");
        let pods = self.pods;
        for node in nodes {
            api.add_node(node, &[]);
            let app = format!("app-{node}");
            api.add_replicaset(
                "apps",
                &app,
                &[("app", &app)],
                pods as i64,
                &[("app", &app)],
            );
            for i in 0..pods {
                api.add_pod(
                    PodSeed::new(&format!("{app}-{i}"))
                        .namespace("apps")
                        .node(node)
                        .label("app", &app)
                        .replicaset(&app),
                );
            }
            api.add_pdb(
                "apps",
                &format!("{app}-pdb"),
                &[("app", &app)],
                PdbLimit::MinAvailable(pods as i64 - 1),
                None,
            );
            std::fs::write(dir.path().join(format!("{node}.boot_id")), "boot-1\n")
                .expect("write boot id");
        }
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        Fleet {
            api,
            dir,
            kubeconfig,
            lease_secs: self.lease_secs,
        }
    }
}

impl Fleet {
    pub fn builder() -> FleetBuilder {
        FleetBuilder {
            pods: PODS,
            managed_fields: true,
            lease_secs: LEASE_SECS,
        }
    }

    /// `nodes`, each with `PODS` pods; see `FleetBuilder::start`.
    pub fn new(nodes: &[&str]) -> Fleet {
        Fleet::builder().start(nodes)
    }

    pub fn boot_id_path(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.boot_id"))
    }

    /// The agent config of `node`: `CONFIG` with the fleet lock and the maintenance (boot-ID
    /// file, return timeout) on.
    pub fn config(&self, node: &str, opts: AgentOpts) -> String {
        rotation_config(
            &self.boot_id_path(node),
            opts.slots,
            self.lease_secs,
            opts.return_timeout,
        )
    }

    /// An agent of `node` ready to start (a test may add env or args first).
    pub fn agent_builder(&self, node: &str, opts: AgentOpts) -> AgentBuilder {
        Agent::builder()
            .config(&self.config(node, opts))
            .with_token()
            .connected(&self.kubeconfig, node)
    }

    pub fn agent_with(&self, node: &str, opts: AgentOpts) -> Agent {
        self.agent_builder(node, opts).start()
    }

    /// `node`'s agent with `AgentOpts::default()`.
    pub fn agent(&self, node: &str) -> Agent {
        self.agent_with(node, AgentOpts::default())
    }

    /// The "reboot": the node's agent dies with the node, the node comes back with a new boot
    /// ID, and a new agent starts on it.
    pub fn reboot(&self, agent: Agent, node: &str) -> Agent {
        kill(agent);
        self.reboot_stopped(node)
    }

    /// The node comes back from a reboot during which its agent was already stopped.
    pub fn reboot_stopped(&self, node: &str) -> Agent {
        std::fs::write(self.boot_id_path(node), "boot-2\n").expect("write boot id");
        self.agent(node)
    }

    /// The node's maintenance record, parsed (`Null` when there is none).
    pub fn maintenance(&self, node: &str) -> Value {
        self.api.node(node).expect("node")["metadata"]["annotations"]["nodekeeper.io/maintenance"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null)
    }

    /// Records node `node`'s last rotation `rot-1` as `state` (ended: no drain record).
    pub fn record_rotation(&self, node: &str, state: &str) {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let record = serde_json::json!({
            "state": state, "drainId": "rot-1", "bootId": "boot-0", "since": since,
            "returnBy": 0, "uncordon": true, "error": "",
        });
        self.api.edit(Res::Nodes, "", node, |n| {
            n["metadata"]["annotations"]["nodekeeper.io/maintenance"] =
                Value::String(record.to_string());
        });
    }

    pub fn cordoned(&self, node: &str) -> bool {
        self.api.node(node).expect("node")["spec"]["unschedulable"] == true
    }

    /// Slot 0's holder (`None` when free).
    pub fn holder(&self) -> Option<String> {
        self.slot_holder(SLOT)
    }

    /// The holder of slot Lease `slot` (`None` when free or absent).
    pub fn slot_holder(&self, slot: &str) -> Option<String> {
        self.api
            .get(Res::Leases, LOCK_NS, slot)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
            .filter(|h| !h.is_empty())
    }

    /// Slot 0's Lease, for failure messages (`Null` when absent).
    pub fn slot_lease(&self) -> Value {
        self.api
            .get(Res::Leases, LOCK_NS, SLOT)
            .unwrap_or(Value::Null)
    }

    /// Events of `reason` about Node `node`: their messages.
    pub fn events(&self, node: &str, reason: &str) -> Vec<String> {
        self.api
            .events()
            .into_iter()
            .filter(|e| e["reason"] == reason && e["involvedObject"]["name"] == node)
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// (node, cordoned?) for every cordon and uncordon PATCH the API server accepted, in order.
    pub fn cordon_log(&self) -> Vec<(String, bool)> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.status < 300 && r.body.contains("unschedulable"))
            .filter_map(|r| {
                let node = r.path.rsplit('/').next()?.to_string();
                Some((node, r.body.contains("\"unschedulable\":true")))
            })
            .collect()
    }

    /// Sets Node `node`'s Ready condition to `ready` ("True", "False").
    pub fn set_ready(&self, node: &str, ready: &str) {
        self.api.edit(Res::Nodes, "", node, |n| {
            n["status"]["conditions"] = serde_json::json!([{"type": "Ready", "status": ready}]);
        });
    }

    /// Pins node `node` with a pod its budget keeps (minAvailable 1 of 1): a drain stays
    /// EVICTING.
    pub fn pin(&self, node: &str) {
        let app = format!("pinned-{node}");
        self.api
            .add_replicaset("apps", &app, &[("app", &app)], 1, &[("app", &app)]);
        self.api.add_pod(
            PodSeed::new(&format!("{app}-0"))
                .namespace("apps")
                .node(node)
                .label("app", &app)
                .replicaset(&app),
        );
        self.api.add_pdb(
            "apps",
            &format!("{app}-pdb"),
            &[("app", &app)],
            PdbLimit::MinAvailable(1),
            None,
        );
    }

    /// Waits for `node`'s drain to evict its pinned pod in vain (refused with 429).
    pub fn wait_evicting(&self, node: &str) {
        let eviction = format!("/pinned-{node}-0/eviction");
        wait_for(Duration::from_secs(30), &format!("{node} evicting"), || {
            self.api
                .requests()
                .iter()
                .any(|r| r.path.ends_with(&eviction) && r.status == 429)
                .then_some(())
        });
    }

    /// A slot Lease held by `holder`, marked as held across its reboot (never expires): another
    /// node of the fleet, out for its own rotation.
    pub async fn hold_slot_for(&self, slot: &str, holder: &str) {
        self.create_slot(slot, holder, &[("nodekeeper.io/return-by", FAR_RETURN_BY)])
            .await
    }

    /// A slot Lease as given (holder `""`: none), renewed now.
    pub async fn create_slot(&self, slot: &str, holder: &str, annotations: &[(&str, &str)]) {
        let annotations = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.put_slot(slot, holder, annotations, 0).await
    }

    /// Slot 0 held by `holder`, marked for its return (a return-by 10 minutes ahead and the
    /// holder Node's UID, as the claim marks it), last renewed at now + `renewed_offset_secs`
    /// (the holder's clock).
    pub async fn create_marked_slot(&self, holder: &str, renewed_offset_secs: i64) {
        let uid = self.api.node(holder).expect("node")["metadata"]["uid"]
            .as_str()
            .expect("uid")
            .to_string();
        let return_by = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let annotations = [
            ("nodekeeper.io/return-by".to_string(), return_by.to_string()),
            ("nodekeeper.io/holder-uid".to_string(), uid),
        ]
        .into();
        self.put_slot(SLOT, holder, annotations, renewed_offset_secs)
            .await
    }

    /// Creates slot Lease `slot` through the API (as an agent would), acquired and renewed at
    /// now + `renewed_offset_secs`, with the fleet's lease duration.
    async fn put_slot(
        &self,
        slot: &str,
        holder: &str,
        annotations: std::collections::BTreeMap<String, String>,
        renewed_offset_secs: i64,
    ) {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kube config");
        let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
            kube::Api::namespaced(kube::Client::try_from(cfg).expect("client"), LOCK_NS);
        let renewed = k8s_openapi::jiff::Timestamp::now()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(
                renewed_offset_secs,
            ))
            .expect("timestamp");
        let at = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(renewed);
        let lease = k8s_openapi::api::coordination::v1::Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(slot.into()),
                namespace: Some(LOCK_NS.into()),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some(holder.to_string()).filter(|h| !h.is_empty()),
                lease_duration_seconds: Some(self.lease_secs as i32),
                acquire_time: Some(at.clone()),
                renew_time: Some(at),
                ..Default::default()
            }),
        };
        api.create(&Default::default(), &lease)
            .await
            .expect("create lease");
    }
}

/// The config of a rotation agent whose boot ID is read from `boot_id`.
pub fn rotation_config(
    boot_id: &Path,
    slots: u32,
    lease_secs: u64,
    return_timeout: &str,
) -> String {
    format!(
        "{CONFIG}  fleetLock:\n    enabled: true\n    slots: {slots}\n    leaseDuration: {lease_secs}s\n  maintenance:\n    bootIdPath: {}\n    returnTimeout: {return_timeout}\n",
        boot_id.display()
    )
}

// === observation windows ===

/// node-b must stay uncordoned for `secs` (an observation window of several 2 s leases).
pub async fn node_b_stays_uncordoned(fleet: &Fleet, secs: u64, why: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        assert!(
            !fleet.cordoned("node-b"),
            "node-b cordoned while node-a is still cordoned ({why}); slot {}",
            fleet.slot_lease()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// node-a and node-b must never both be cordoned for `secs` (one slot).
pub async fn never_both_cordoned(fleet: &Fleet, secs: u64, why: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        assert!(
            !(fleet.cordoned("node-a") && fleet.cordoned("node-b")),
            "node-a and node-b both cordoned with one slot ({why}); slot {}",
            fleet.slot_lease()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
