//! EC2 notices (`drain.imds`) against a fake IMDS and the fake API server: no notice, no drain;
//! a spot notice starts one drain (requester "imds") whose deadline is the notice's time minus
//! the safety margin, with the IMDSv2 token on every GET; a scheduled maintenance event far away
//! drains within the default timeout, and canceled events are ignored. Every test runs under a
//! timeout.

use std::future::Future;
use std::time::{Duration, SystemTime};

use nodekeeper::pb::{self, DrainPhase, node_agent_client::NodeAgentClient};
use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
use nodekeeper_tests::fake_imds::FakeImds;
use nodekeeper_tests::{Agent, wait_for};
use tonic::transport::Channel;

const NODE: &str = "node-a";

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

struct Setup {
    api: FakeApi,
    imds: FakeImds,
    agent: Agent,
    _dir: tempfile::TempDir,
}

/// node-a with two ReplicaSet pods (no budget: a drain takes about a second), a fake IMDS, and
/// the agent polling it every 200 ms.
fn setup(default_timeout: &str) -> Setup {
    setup_with(default_timeout, "2h", "")
}

/// `extra`: more `drain:` settings (YAML indented by two spaces).
fn setup_with(default_timeout: &str, lead_time: &str, extra: &str) -> Setup {
    let api = FakeApi::builder().other_node("node-other").start();
    api.add_node(NODE, &[]);
    api.add_node("node-other", &[]);
    api.add_replicaset("apps", "web", &[("app", "web")], 2, &[("app", "web")]);
    for i in 0..2 {
        api.add_pod(
            PodSeed::new(&format!("web-{i}"))
                .namespace("apps")
                .node(NODE)
                .label("app", "web")
                .replicaset("web"),
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let imds = FakeImds::start();
    let config = format!(
        "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  \
         defaultTimeout: {default_timeout}\n  imds:\n    enabled: true\n    endpoint: {}\n    interval: 200ms\n    \
         maintenanceLeadTime: {lead_time}\n{extra}",
        imds.url()
    );
    let agent = Agent::builder()
        .config(&config)
        .with_token()
        .connected(&kubeconfig, NODE)
        .start();
    Setup {
        api,
        imds,
        agent,
        _dir: dir,
    }
}

async fn client(agent: &Agent) -> NodeAgentClient<Channel> {
    NodeAgentClient::connect(agent.grpc_url())
        .await
        .expect("connect")
}

async fn get_drain(c: &mut NodeAgentClient<Channel>) -> Option<pb::DrainStatus> {
    match c.get_drain(pb::GetDrainRequest {}).await {
        Ok(s) => Some(s.into_inner()),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("GetDrain: {s}"),
    }
}

/// Waits until GetDrain shows a drain in `phase`.
async fn wait_phase(c: &mut NodeAgentClient<Channel>, phase: DrainPhase) -> pb::DrainStatus {
    loop {
        if let Some(s) = get_drain(c).await
            && s.phase() == phase
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn drain_started_events(api: &FakeApi) -> usize {
    api.events()
        .iter()
        .filter(|e| e["reason"] == "DrainStarted")
        .count()
}

/// Every GET carried a token the fake issued; returns how many polls there were.
fn assert_token_on_every_get(imds: &FakeImds) -> usize {
    let reqs = imds.requests();
    let gets: Vec<_> = reqs.iter().filter(|r| r.method == "GET").collect();
    assert!(
        reqs.iter().any(|r| r.method == "PUT" && r.status == 200),
        "no token was requested: {reqs:?}"
    );
    for r in &gets {
        assert!(r.token_valid, "a GET without a valid token: {r:?}");
    }
    gets.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_notice_no_drain_then_a_spot_notice_drains_once_by_its_deadline() {
    let s = setup("1h");
    let mut c = client(&s.agent).await;

    // Polled for a while with nothing to report: no drain, node untouched.
    wait_for(Duration::from_secs(10), "five polls", || {
        (s.imds
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/spot/instance-action"))
            .count()
            >= 5)
            .then_some(())
    });
    assert_eq!(get_drain(&mut c).await, None);
    let node = s.api.node(NODE).unwrap();
    assert!(node["spec"]["unschedulable"].is_null(), "{node}");
    assert!(node["metadata"]["annotations"]["nodekeeper.io/drain"].is_null());

    // Terminate in two minutes.
    let at = unix(SystemTime::now()) + 120;
    let time = jiff::Timestamp::from_second(at).unwrap().to_string();
    s.imds.post_spot("terminate", &time);
    let status = within(20, wait_phase(&mut c, DrainPhase::Completed)).await;
    assert_eq!(status.id, format!("imds-spot-{time}"));
    assert_eq!(status.requester, "imds");
    assert!(
        status.reason.contains("spot interruption"),
        "{}",
        status.reason
    );
    // Deadline: the notice's time minus the 15 s margin.
    let deadline = status.deadline.unwrap().seconds;
    assert!(
        (deadline - (at - 15)).abs() <= 1,
        "deadline {deadline}, want {}",
        at - 15
    );
    let node = s.api.node(NODE).unwrap();
    assert_eq!(node["spec"]["unschedulable"], true);
    assert!(
        node["metadata"]["annotations"]["nodekeeper.io/drain"]
            .as_str()
            .unwrap()
            .contains("\"requester\":\"imds\"")
    );
    assert!(s.api.pods_on(NODE).is_empty(), "{:?}", s.api.pods_on(NODE));

    // The notice stays posted: later polls re-see it and start nothing new.
    let polls = s.imds.requests().len();
    wait_for(Duration::from_secs(10), "five more polls", || {
        (s.imds.requests().len() >= polls + 10).then_some(())
    });
    let again = get_drain(&mut c).await.unwrap();
    assert_eq!(again.id, status.id);
    assert_eq!(again.phase(), DrainPhase::Completed);
    assert_eq!(drain_started_events(&s.api), 1);

    // IMDSv2: one session token, reused, on every GET.
    assert!(assert_token_on_every_get(&s.imds) >= 20);
    assert_eq!(s.imds.tokens_issued(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_maintenance_drains_within_the_default_timeout_and_canceled_events_do_not() {
    // A lead time of three days less 3 s: the event below is drained 3 s after it is seen.
    let s = setup_with("10m", "259197s", "");
    let mut c = client(&s.agent).await;
    let not_before = |secs_from_now: i64| {
        jiff::Timestamp::from_second(unix(SystemTime::now()) + secs_from_now)
            .unwrap()
            .strftime("%d %b %Y %H:%M:%S GMT")
            .to_string()
    };

    s.imds.post_event(
        "instance-reboot",
        "instance-event-canceled1",
        &not_before(3600),
        "canceled",
    );
    let polls = s.imds.requests().len();
    wait_for(Duration::from_secs(10), "five polls", || {
        (s.imds.requests().len() >= polls + 10).then_some(())
    });
    assert_eq!(get_drain(&mut c).await, None, "a canceled event drained");

    // Maintenance in three days: the 10 m default timeout is the shorter deadline.
    s.imds.post_event(
        "system-reboot",
        "instance-event-0d59937288b749b32",
        &not_before(3 * 86400),
        "active",
    );
    let requested = unix(SystemTime::now());
    // Not at once: for the first second (five polls) nothing drains.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        get_drain(&mut c).await,
        None,
        "drained before the lead time"
    );
    assert_ne!(s.api.node(NODE).unwrap()["spec"]["unschedulable"], true);
    let status = within(20, wait_phase(&mut c, DrainPhase::Completed)).await;
    assert_eq!(status.id, "imds-instance-event-0d59937288b749b32");
    assert_eq!(status.requester, "imds");
    assert!(status.reason.contains("system-reboot"), "{}", status.reason);
    let deadline = status.deadline.unwrap().seconds;
    let started = status.started_at.unwrap().seconds;
    assert_eq!(deadline - started, 600, "deadline = start + defaultTimeout");
    // Started at NotBefore - lead time (3 s after it was posted), not at once.
    assert!(
        (2..=5).contains(&(started - requested)),
        "started {}s after the notice",
        started - requested
    );
    assert_token_on_every_get(&s.imds);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_maintenance_notice_during_another_drain_starts_its_own_once_that_one_ends() {
    let s = setup("1h");
    // A pod no budget will ever let go: the orchestrator's drain keeps running.
    s.api.add_pod(
        PodSeed::new("pinned")
            .namespace("db")
            .node(NODE)
            .label("app", "pinned"),
    );
    s.api.add_pdb(
        "db",
        "pinned-pdb",
        &[("app", "pinned")],
        nodekeeper_tests::fake_api::PdbLimit::MinAvailable(1),
        None,
    );
    let mut c = client(&s.agent).await;
    let mut manual = nodekeeper_tests::drain_scenario::request("manual");
    manual.timeout = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    let _stream = within(10, c.drain(nodekeeper_tests::bearer(manual)))
        .await
        .unwrap();
    within(20, wait_phase(&mut c, DrainPhase::Evicting)).await;

    // A scheduled event inside its lead time (a spot notice would preempt: the test below).
    let not_before = jiff::Timestamp::from_second(unix(SystemTime::now()) + 3600)
        .unwrap()
        .strftime("%d %b %Y %H:%M:%S GMT")
        .to_string();
    s.imds.post_event(
        "system-reboot",
        "instance-event-late",
        &not_before,
        "active",
    );
    let polls = s.imds.requests().len();
    wait_for(
        Duration::from_secs(10),
        "several polls with the notice posted",
        || (s.imds.requests().len() >= polls + 10).then_some(()),
    );
    assert_eq!(
        get_drain(&mut c).await.unwrap().id,
        "manual",
        "a second drain started"
    );

    within(
        10,
        c.cancel_drain(nodekeeper_tests::bearer(pb::CancelDrainRequest {
            id: "manual".into(),
            ..Default::default()
        })),
    )
    .await
    .unwrap();
    let id = "imds-instance-event-late".to_string();
    let status = within(20, async {
        loop {
            if let Some(st) = get_drain(&mut c).await
                && st.id == id
            {
                break st;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(status.requester, "imds");
}

/// Seeds the only fleet-lock slot as held by a live `holder` (another node's rotation).
async fn seed_live_slot(kubeconfig: &std::path::Path, holder: &str) {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    let api: kube::Api<Lease> = kube::Api::namespaced(
        kube::Client::try_from(cfg).expect("client"),
        "nodekeeper-system",
    );
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("nodekeeper-drain-slot-0".into()),
            namespace: Some("nodekeeper-system".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(3600),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..Default::default()
        }),
    };
    api.create(&Default::default(), &lease)
        .await
        .expect("create slot lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_notice_skips_the_fleet_lock_and_preempts_a_waiting_rotation_drain() {
    let s = setup_with(
        "10m",
        "2h",
        "  fleetLock:\n    enabled: true\n    slots: 1\n    leaseDuration: 2s\n",
    );
    seed_live_slot(&s._dir.path().join("kubeconfig"), "node-live").await;
    let mut c = client(&s.agent).await;
    // The orchestrator's rotation drain queues behind node-live.
    let mut rotation = nodekeeper_tests::drain_scenario::request("rot-a");
    rotation.await_reboot = true;
    let rot = tokio::spawn({
        let mut c = c.clone();
        async move { nodekeeper_tests::drain_scenario::drain_all(&mut c, rotation).await }
    });
    let pending = within(20, wait_phase(&mut c, DrainPhase::Pending)).await;
    assert_eq!(pending.id, "rot-a");

    // Terminate in two minutes: the spot drain cancels the rotation and runs without a slot.
    let time = jiff::Timestamp::from_second(unix(SystemTime::now()) + 120)
        .unwrap()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    s.imds.post_spot("terminate", &time);
    let status = within(30, wait_phase(&mut c, DrainPhase::Completed)).await;
    assert_eq!(status.id, format!("imds-spot-{time}"));
    let events = within(10, rot).await.expect("rotation drain task");
    assert!(
        matches!(
            events.last().and_then(|e| e.event.as_ref()),
            Some(pb::drain_event::Event::Cancelled(_))
        ),
        "the rotation drain was preempted: {:?}",
        events.last()
    );
    let lease = s
        .api
        .get(
            nodekeeper_tests::fake_api::Res::Leases,
            "nodekeeper-system",
            "nodekeeper-drain-slot-0",
        )
        .expect("slot lease");
    assert_eq!(
        lease["spec"]["holderIdentity"], "node-live",
        "the spot drain neither waited for nor took the slot: {lease}"
    );
    assert_eq!(s.api.node(NODE).unwrap()["spec"]["unschedulable"], true);
}

/// The drain record on node-a.
fn drain_record(api: &FakeApi) -> serde_json::Value {
    let node = api.node(NODE).expect("node");
    serde_json::from_str(
        node["metadata"]["annotations"]["nodekeeper.io/drain"]
            .as_str()
            .expect("drain annotation"),
    )
    .expect("json")
}

/// Issue #16/#20: a notice's drain claims the Node exactly as a gRPC Drain does. Two agent
/// processes of node-a (a rollout's overlap) poll the same IMDS: one drives the spot drain, the
/// other follows the Node's record (no second driver, no `DrainFailed`); an orchestrator's Drain
/// on either is refused naming the notice's drain, its requester and its driver; the driver
/// SIGKILLed mid-drain and its container restarted, the drain goes on under one driver and
/// completes, the pinned pod admitted once.
#[tokio::test(flavor = "multi_thread")]
async fn an_imds_drain_claims_the_node_like_a_grpc_drain_on_both_agent_processes() {
    let api = FakeApi::builder().other_node("node-other").start();
    api.add_node(NODE, &[]);
    api.add_node("node-other", &[]);
    api.add_replicaset(
        "db",
        "pinned-rs",
        &[("app", "pinned")],
        1,
        &[("app", "pinned")],
    );
    api.add_pod(
        PodSeed::new("pinned-0")
            .namespace("db")
            .node(NODE)
            .label("app", "pinned")
            .replicaset("pinned-rs"),
    );
    // Never lets the pod go until the test relaxes it: the notice's drain keeps running.
    api.add_pdb(
        "db",
        "pinned-pdb",
        &[("app", "pinned")],
        nodekeeper_tests::fake_api::PdbLimit::MinAvailable(1),
        None,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let imds = FakeImds::start();
    let config = format!(
        "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  \
         ownerLease: 3s\n  imds:\n    enabled: true\n    endpoint: {}\n    interval: 200ms\n",
        imds.url()
    );
    let agent = |pod: &str| {
        Agent::builder()
            .config(&config)
            .with_token()
            .env("POD_NAME", pod)
            .connected(&kubeconfig, NODE)
            .start()
    };
    let mut procs = vec![
        (String::from("nodekeeper-old"), agent("nodekeeper-old")),
        (String::from("nodekeeper-new"), agent("nodekeeper-new")),
    ];

    let time = jiff::Timestamp::from_second(unix(SystemTime::now()) + 120)
        .unwrap()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let id = format!("imds-spot-{time}");
    imds.post_spot("terminate", &time);
    wait_for(
        Duration::from_secs(20),
        "the notice's drain evicting",
        || {
            let n = api.node(NODE)?;
            let rec = n["metadata"]["annotations"]["nodekeeper.io/drain"].as_str()?;
            rec.contains("\"phase\":\"evicting\"").then_some(())
        },
    );
    // Both processes have polled the notice many times since.
    let polls = imds.requests().len();
    wait_for(
        Duration::from_secs(10),
        "both pollers seeing the notice",
        || (imds.requests().len() >= polls + 20).then_some(()),
    );
    let rec = drain_record(&api);
    assert_eq!(rec["id"], id.as_str());
    assert_eq!(rec["requester"], "imds");
    assert_eq!(rec["principal"], "agent:imds");
    let driver = rec["driver"].as_str().unwrap().to_string();
    let driver_pod = driver.split('#').next().unwrap().to_string();
    assert!(
        procs.iter().any(|(pod, _)| *pod == driver_pod),
        "driver {driver}"
    );
    let failed: Vec<_> = api
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "DrainFailed")
        .collect();
    assert!(failed.is_empty(), "a second driver: {failed:?}");

    // The orchestrator's rotation drain, on either process: refused, naming the owner.
    for (pod, a) in &procs {
        let mut c = client(a).await;
        let refused = within(
            10,
            c.drain(nodekeeper_tests::bearer(
                nodekeeper_tests::drain_scenario::request("rot"),
            )),
        )
        .await
        .expect_err("refused while the notice's drain runs");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{pod}: {refused:?}"
        );
        for part in [
            format!("{id:?}"),
            "requester \"imds\"".to_string(),
            format!("driven by {driver}"),
            "\"rot\"".to_string(),
        ] {
            assert!(
                refused.message().contains(&part),
                "{pod}: {part} not in {refused:?}"
            );
        }
        // GetDrain on either answers with the notice's drain.
        let st = get_drain(&mut c).await.expect("a drain");
        assert_eq!(st.id, id);
        assert_eq!(st.requester, "imds");
    }

    // The driver dies mid-drain (SIGKILL) and its container restarts: one driver goes on.
    let at = procs.iter().position(|(p, _)| *p == driver_pod).unwrap();
    let (pod, mut killed) = procs.remove(at);
    killed.proc.signal("KILL");
    killed.proc.wait_exit(Duration::from_secs(10));
    procs.push((pod.clone(), agent(&pod)));
    wait_for(Duration::from_secs(20), "a new driver", || {
        let d = drain_record(&api)["driver"].as_str()?.to_string();
        (d != driver).then_some(d)
    });
    // The budget lets go: the drain completes.
    api.edit(
        nodekeeper_tests::fake_api::Res::PodDisruptionBudgets,
        "db",
        "pinned-pdb",
        |pdb| pdb["spec"]["minAvailable"] = serde_json::json!(0),
    );
    wait_for(
        Duration::from_secs(30),
        "the notice's drain completed",
        || (drain_record(&api)["phase"] == "completed").then_some(()),
    );
    assert_eq!(drain_record(&api)["id"], id.as_str());
    let admitted = api
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/pinned-0/eviction") && r.status == 201)
        .count();
    assert_eq!(admitted, 1);
    let failed: Vec<_> = api
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "DrainFailed")
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(api.pods_on(NODE).is_empty(), "{:?}", api.pods_on(NODE));
}
