//! The drain fleet lock (`drain.fleetLock`) against the fake API server: two agents on two nodes
//! with one slot never drain at the same time and both finish; a slot held by a live node makes
//! a drain wait (PENDING, a Waiting event naming the holder, node untouched) until released; a
//! slot whose holder stopped renewing is taken over. Every test runs under a timeout.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use nodekeeper::pb::{self, DrainPhase, drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::request;
use nodekeeper_tests::fake_api::{FakeApi, PdbLimit, PodSeed, Res};
use nodekeeper_tests::{Agent, wait_for};
use serde_json::Value;
use tonic::transport::Channel;

const LOCK_NS: &str = "nodekeeper-system";
const SLOT: &str = "nodekeeper-drain-slot-0";
/// Pods per node, behind a budget that lets one go at a time: each drain takes a few seconds.
const PODS: usize = 4;

/// Fast retries, one slot, and a lease shorter than a drain, so a drain only keeps its slot by
/// renewing it.
const CONFIG: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  fleetLock:\n    enabled: true\n    slots: 1\n    leaseDuration: 2s\n";

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

struct Cluster {
    api: Arc<FakeApi>,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

/// node-a and node-b, each running `PODS` ReplicaSet pods behind a minAvailable PODS-1 budget;
/// replacements land on node-other and become Ready 700 ms later.
fn cluster() -> Cluster {
    let api = FakeApi::builder()
        .replace_delay(Duration::from_millis(100))
        .ready_delay(Duration::from_millis(700))
        .other_node("node-other")
        .start();
    for node in ["node-a", "node-b", "node-other"] {
        api.add_node(node, &[]);
    }
    for node in ["node-a", "node-b"] {
        let app = format!("app-{node}");
        api.add_replicaset(
            "apps",
            &app,
            &[("app", &app)],
            PODS as i64,
            &[("app", &app)],
        );
        for i in 0..PODS {
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
            PdbLimit::MinAvailable(PODS as i64 - 1),
            None,
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    Cluster {
        api: Arc::new(api),
        _dir: dir,
        kubeconfig,
    }
}

fn agent(kubeconfig: &Path, node: &str) -> Agent {
    Agent::builder()
        .config(CONFIG)
        .with_token()
        .connected(kubeconfig, node)
        .start()
}

async fn client(agent: &Agent) -> NodeAgentClient<Channel> {
    NodeAgentClient::connect(agent.grpc_url())
        .await
        .expect("connect")
}

/// Every event of a drain until its stream ends.
async fn drain_all(mut client: NodeAgentClient<Channel>, id: &str) -> Vec<pb::DrainEvent> {
    nodekeeper_tests::drain_scenario::drain_all(&mut client, request(id)).await
}

fn at(e: &pb::DrainEvent) -> SystemTime {
    e.at.expect("timestamped").try_into().expect("valid time")
}

fn completed(events: &[pb::DrainEvent]) -> bool {
    matches!(
        events.last().and_then(|e| e.event.as_ref()),
        Some(Event::Completed(_))
    )
}

/// [Planned, Completed]: from the moment the node was cordoned and planned to its end.
fn window(events: &[pb::DrainEvent]) -> (SystemTime, SystemTime) {
    let planned = events
        .iter()
        .find(|e| matches!(e.event, Some(Event::Planned(_))))
        .expect("a Planned event");
    (at(planned), at(events.last().expect("events")))
}

fn waiting(events: &[pb::DrainEvent]) -> Vec<pb::Waiting> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Waiting(w)) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

/// The drain phase persisted on the node's annotation, and whether it is cordoned.
fn node_state(node: &Value) -> (bool, String) {
    let cordoned = node["spec"]["unschedulable"] == true;
    let phase = node["metadata"]["annotations"]["nodekeeper.io/drain"]
        .as_str()
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| v["phase"].as_str().map(str::to_string))
        .unwrap_or_default();
    (cordoned, phase)
}

fn holder(api: &FakeApi) -> Option<String> {
    api.get(Res::Leases, LOCK_NS, SLOT)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

/// Pods whose successful evictions the API server logged, in order.
fn evicted(api: &FakeApi) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/eviction") && r.status < 300)
        .map(|r| r.path.rsplit('/').nth(1).unwrap_or_default().to_string())
        .collect()
}

async fn kube_client(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    kube::Client::try_from(cfg).expect("kube client")
}

/// Seeds the slot Lease as another node left it: `holder`, renewed `renewed_ago`.
async fn seed_slot(kubeconfig: &Path, holder: &str, renewed_ago: Duration, duration_s: i32) {
    let api: kube::Api<Lease> = kube::Api::namespaced(kube_client(kubeconfig).await, LOCK_NS);
    let renewed = k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::try_from(renewed_ago).expect("duration");
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(SLOT.into()),
            namespace: Some(LOCK_NS.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration_s),
            acquire_time: Some(MicroTime(renewed)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(3),
            ..Default::default()
        }),
    };
    api.create(&Default::default(), &lease)
        .await
        .expect("create slot lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_with_one_slot_never_drain_at_the_same_time_and_both_finish() {
    let c = cluster();
    let a = agent(&c.kubeconfig, "node-a");
    let b = agent(&c.kubeconfig, "node-b");

    // Sample both nodes and the slot every 10 ms for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handle = {
        let (stop, out, api) = (stop.clone(), samples.clone(), c.api.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let a = node_state(&api.node("node-a").expect("node-a"));
                let b = node_state(&api.node("node-b").expect("node-b"));
                out.lock().unwrap().push((a, b, holder(&api)));
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let (ca, cb) = (client(&a).await, client(&b).await);
    let (ea, eb) = within(120, async {
        tokio::join!(drain_all(ca, "rot-a"), drain_all(cb, "rot-b"))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    handle.join().expect("sampler");

    assert!(completed(&ea), "node-a did not complete: {:?}", ea.last());
    assert!(completed(&eb), "node-b did not complete: {:?}", eb.last());

    // From the streams: the two [cordoned+planned, completed] windows do not overlap, and the
    // second node waited for the first, naming it as the holder.
    let (wa, wb) = (window(&ea), window(&eb));
    let (first, second, second_events, first_node) = if wa.0 < wb.0 {
        (wa, wb, &eb, "node-a")
    } else {
        (wb, wa, &ea, "node-b")
    };
    assert!(
        first.1 <= second.0,
        "the drains overlapped: first {first:?}, second {second:?}"
    );
    let w = waiting(second_events);
    assert!(
        w.iter().any(|w| w.holders.contains(first_node)),
        "the second drain should have waited for {first_node}: {w:?}"
    );

    // From the API server: every eviction of one node's pods precedes every eviction of the
    // other's.
    let order = evicted(&c.api);
    assert_eq!(order.len(), 2 * PODS, "evictions: {order:?}");
    let first_prefix = format!("app-{first_node}-");
    assert!(
        order[..PODS].iter().all(|p| p.starts_with(&first_prefix)),
        "evictions interleaved: {order:?}"
    );

    // From the sampled states: never both nodes cordoned and mid-drain, and a node mid-drain
    // always held the slot (which a 2 s lease only allows if it was renewed).
    let samples = samples.lock().unwrap();
    assert!(samples.len() > 100, "too few samples: {}", samples.len());
    let draining = |s: &(bool, String)| s.0 && (s.1 == "cordoning" || s.1 == "evicting");
    let mut seen = [false, false];
    for (na, nb, h) in samples.iter() {
        assert!(
            !(draining(na) && draining(nb)),
            "both nodes draining at once: {na:?} {nb:?} slot held by {h:?}"
        );
        for (i, (n, name)) in [(na, "node-a"), (nb, "node-b")].into_iter().enumerate() {
            if draining(n) {
                seen[i] = true;
                assert_eq!(h.as_deref(), Some(name), "{name} drains without the slot");
            }
        }
    }
    assert_eq!(seen, [true, true], "the sampler saw both drains");
    // Released at the end: nobody holds the slot.
    wait_for(Duration::from_secs(5), "slot released", || {
        holder(&c.api).is_none().then_some(())
    });
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_held_by_a_live_node_makes_the_drain_wait_untouched_until_released() {
    let c = cluster();
    seed_slot(&c.kubeconfig, "node-live", Duration::ZERO, 3600).await;
    let a = agent(&c.kubeconfig, "node-a");
    let mut ca = client(&a).await;
    let drain = tokio::spawn(drain_all(ca.clone(), "rot-a"));

    // PENDING, waiting for node-live, and nothing done to the node.
    let status = within(20, async {
        loop {
            if let Ok(s) = ca.get_drain(pb::GetDrainRequest {}).await {
                break s.into_inner();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(status.phase(), DrainPhase::Pending);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = ca
        .get_drain(pb::GetDrainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.phase(), DrainPhase::Pending, "{status:?}");
    let (cordoned, _) = node_state(&c.api.node("node-a").unwrap());
    assert!(!cordoned, "node-a was cordoned without the slot");
    assert!(evicted(&c.api).is_empty());
    assert_eq!(holder(&c.api).as_deref(), Some("node-live"));
    let state = c.api.node("node-a").unwrap()["metadata"]["annotations"]["nodekeeper.io/drain"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        state.contains("\"phase\":\"pending\""),
        "the waiting drain is on the node: {state}"
    );

    // The agent dies while waiting: the next one resumes the same drain, still waiting.
    drain.abort();
    let mut a = a;
    a.proc.signal("KILL");
    a.proc.wait_exit(Duration::from_secs(5));
    let a2 = agent(&c.kubeconfig, "node-a");
    let mut ca = client(&a2).await;
    let status = within(20, async {
        loop {
            if let Ok(s) = ca.get_drain(pb::GetDrainRequest {}).await {
                break s.into_inner();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        (status.id.as_str(), status.phase()),
        ("rot-a", DrainPhase::Pending),
        "{status:?}"
    );
    let drain = tokio::spawn(drain_all(ca.clone(), "rot-a"));

    // The live holder releases: the drain takes the slot and completes.
    let mut lease = c.api.get(Res::Leases, LOCK_NS, SLOT).unwrap();
    lease["spec"]["holderIdentity"] = Value::Null;
    let api: kube::Api<Lease> = kube::Api::namespaced(kube_client(&c.kubeconfig).await, LOCK_NS);
    let lease: Lease = serde_json::from_value(lease).unwrap();
    api.replace(SLOT, &Default::default(), &lease)
        .await
        .expect("release");
    let events = within(60, drain).await.expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    let w = waiting(&events);
    assert_eq!(w.len(), 1, "one Waiting event per change of holders: {w:?}");
    assert_eq!(w[0].holders, format!("{SLOT}=node-live"));
    assert_eq!(w[0].lock, format!("{LOCK_NS}/nodekeeper-drain-slot-*"));
    wait_for(Duration::from_secs(5), "slot released", || {
        holder(&c.api).is_none().then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_whose_holder_stopped_renewing_is_taken_over() {
    let c = cluster();
    // node-dead renewed a minute ago with a 15 s lease: it crashed mid-drain.
    seed_slot(&c.kubeconfig, "node-dead", Duration::from_secs(60), 15).await;
    let a = agent(&c.kubeconfig, "node-a");
    let events = within(60, drain_all(client(&a).await, "rot-a")).await;
    assert!(completed(&events), "{:?}", events.last());
    assert!(
        waiting(&events).is_empty(),
        "an expired slot is free, not waited for"
    );
    // Released right after the drain's end is streamed.
    wait_for(Duration::from_secs(5), "slot released", || {
        holder(&c.api).is_none().then_some(())
    });
    let lease = c.api.get(Res::Leases, LOCK_NS, SLOT).unwrap();
    assert_eq!(
        lease["spec"]["leaseTransitions"], 4,
        "node-dead -> node-a is one transition: {lease}"
    );
    // The take was a PUT on the existing Lease (guarded by its resourceVersion), not a new one.
    let puts = c
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path.ends_with(&format!("/leases/{SLOT}")))
        .count();
    assert!(puts >= 2, "take and release are PUTs: {puts}");
}
