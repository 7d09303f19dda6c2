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
         defaultTimeout: {default_timeout}\n  imds:\n    enabled: true\n    endpoint: {}\n    interval: 200ms\n",
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
    let s = setup("10m");
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
    let status = within(20, wait_phase(&mut c, DrainPhase::Completed)).await;
    assert_eq!(status.id, "imds-instance-event-0d59937288b749b32");
    assert_eq!(status.requester, "imds");
    assert!(status.reason.contains("system-reboot"), "{}", status.reason);
    let deadline = status.deadline.unwrap().seconds;
    let started = status.started_at.unwrap().seconds;
    assert_eq!(deadline - started, 600, "deadline = start + defaultTimeout");
    assert!((started - requested).abs() <= 2);
    assert_token_on_every_get(&s.imds);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_during_another_drain_starts_its_own_once_that_one_ends() {
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

    let at = unix(SystemTime::now()) + 120;
    let time = jiff::Timestamp::from_second(at).unwrap().to_string();
    s.imds.post_spot("terminate", &time);
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
    let id = format!("imds-spot-{time}");
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
