//! Adversary tests for issue #16 (drain): each one is an attack that broke a promise of
//! docs/operations.md's drain sections, kept `#[ignore]` until the code is fixed.
//!
//! The check they share: a watcher samples the Node's drain annotation and the pods it names
//! every few milliseconds and records any moment the drain says `completed` while one of those
//! pods still exists on the node (promise P1).

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodekeeper::pb::{drain_event::Event, node_agent_client::NodeAgentClient};
use nodekeeper_tests::drain_scenario::{NODE, drain_all};
use nodekeeper_tests::fake_api::{FakeApi, Fault, FaultKind, PodSeed, Res};
use nodekeeper_tests::{Agent, wait_for};

const FAST: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  concurrency: 4\n";

async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test step timed out")
}

/// A fake with node-a, node-other and one ReplicaSet `web-rs` in `default`.
fn cluster() -> (FakeApi, tempfile::TempDir, std::path::PathBuf) {
    let api = FakeApi::builder()
        .other_node("node-other")
        .replace_delay(Duration::from_millis(200))
        .ready_delay(Duration::from_millis(300))
        .start();
    api.add_node(NODE, &[]);
    api.add_node("node-other", &[]);
    api.add_replicaset("default", "web-rs", &[("app", "web")], 3, &[("app", "web")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    (api, dir, kubeconfig)
}

fn web(name: &str) -> PodSeed {
    PodSeed::new(name)
        .node(NODE)
        .label("app", "web")
        .replicaset("web-rs")
}

fn agent(kubeconfig: &std::path::Path) -> Agent {
    Agent::builder()
        .config(FAST)
        .with_token()
        .connected(kubeconfig, NODE)
        .start()
}

fn request(id: &str, timeout_secs: i64) -> nodekeeper::pb::DrainRequest {
    nodekeeper::pb::DrainRequest {
        id: id.into(),
        reason: "adversary".into(),
        requester: "adversary".into(),
        timeout: Some(prost_types::Duration {
            seconds: timeout_secs,
            nanos: 0,
        }),
        evict_unreplicated: true,
        ..Default::default()
    }
}

/// The drain phase recorded on node-a, if any.
fn recorded_phase(api: &FakeApi) -> Option<String> {
    let node = api.node(NODE)?;
    let text = node["metadata"]["annotations"]["nodekeeper.io/drain"].as_str()?;
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v["phase"].as_str().map(str::to_string)
}

/// Evictable pods of node-a (neither DaemonSet nor mirror pods), by name.
fn evictable_on_node(api: &FakeApi) -> Vec<String> {
    api.pods()
        .iter()
        .filter(|p| p["spec"]["nodeName"] == NODE)
        .filter(|p| p["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null())
        .filter(|p| {
            !p["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|o| o.iter().any(|r| r["kind"] == "DaemonSet"))
        })
        .map(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Attack: the eviction subresource answers 404 while the pod still exists (an API server
/// whose routes are not installed yet during startup, a proxy in front of it that lost the
/// route). A 404 from the eviction POST is not a GET of the pod: nothing proves it gone.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_eviction_404_is_taken_as_gone_while_the_pod_runs() {
    let (api, _dir, kubeconfig) = cluster();
    api.add_pod(web("web-0"));
    api.inject(
        Fault::on(
            "POST",
            "/eviction",
            FaultKind::Status {
                code: 404,
                reason: "NotFound",
                message: "the server could not find the requested resource".into(),
            },
        )
        .always(),
    );
    let agent = agent(&kubeconfig);
    let mut c = NodeAgentClient::connect(agent.grpc_url()).await.unwrap();
    let events = within(60, drain_all(&mut c, request("evict-404", 8))).await;
    let last = events.last().expect("events");
    if matches!(&last.event, Some(Event::Completed(_))) {
        assert!(
            evictable_on_node(&api).is_empty(),
            "the drain reported completed while {:?} still run on {NODE}",
            evictable_on_node(&api)
        );
    }
}

/// Attack: a pod lands on the node after the drain listed it (a pod tolerating every taint,
/// `operator: Exists`, which the scheduler places on a cordoned node; or one created with
/// `spec.nodeName` set). The drain lists once, so it reports completed while that pod runs.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_pod_arriving_after_the_plan_is_left_running_at_completed() {
    let (api, _dir, kubeconfig) = cluster();
    // Terminating for 3 s once evicted: the window in which the late pod arrives.
    api.add_pod(web("web-0").grace_period(3));
    let agent = agent(&kubeconfig);
    let mut c = NodeAgentClient::connect(agent.grpc_url()).await.unwrap();
    let drain = tokio::spawn(async move { drain_all(&mut c, request("late-pod", 30)).await });
    within(20, async {
        while !api
            .pod("default", "web-0")
            .is_some_and(|p| p["metadata"]["deletionTimestamp"].is_string())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    api.add_pod(web("web-late"));
    let events = within(60, drain).await.expect("drain task");
    let last = events.last().expect("events");
    if matches!(&last.event, Some(Event::Completed(_))) {
        assert!(
            evictable_on_node(&api).is_empty(),
            "the drain reported completed while {:?} still run on {NODE}",
            evictable_on_node(&api)
        );
    }
}

/// Attack: a corrupt (or hostile) drain annotation whose `done` list names a pod that still
/// runs. The agent resumes the drain at start and trusts `done`: that pod is never evicted and
/// the drain completes while it runs. The LIST after a restart already leaves out pods that are
/// gone, so `done` can only ever hide a live one.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_resume_trusts_a_done_list_naming_a_live_pod() {
    let (api, _dir, kubeconfig) = cluster();
    let pod = api.add_pod(web("web-0"));
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let now = unix_now();
    let record = serde_json::json!({
        "id": "resumed", "reason": "rotation", "requester": "orchestrator",
        "principal": "cert:orchestrator", "started": now, "deadline": now + 60,
        "phase": "evicting", "done": [uid], "gracePeriodSeconds": null, "concurrency": 1,
        "deleteEmptydirData": false, "evictUnreplicated": true,
        "leaderSelector": "nodekeeper.io/role=leader", "error": "", "driver": "", "heartbeat": 0,
        "cancelRequested": false,
    });
    api.edit(Res::Nodes, "", NODE, |n| {
        n["spec"]["unschedulable"] = serde_json::json!(true);
        n["metadata"]["annotations"] =
            serde_json::json!({ "nodekeeper.io/drain": record.to_string() });
    });
    let _agent = agent(&kubeconfig);
    let phase = wait_for(Duration::from_secs(30), "the resumed drain to end", || {
        recorded_phase(&api).filter(|p| p != "evicting" && p != "cordoning" && p != "pending")
    });
    if phase == "completed" {
        assert!(
            evictable_on_node(&api).is_empty(),
            "the resumed drain recorded completed while {:?} still run on {NODE}",
            evictable_on_node(&api)
        );
    }
}

/// Attack: a drain annotation whose `deadline` is out of range (u64::MAX unix seconds: a corrupt
/// or hostile write, any principal that may patch the Node can make it). Resuming it must refuse
/// the record naming the field; instead `SystemTime + Duration` overflows and the drain
/// capability panics, so the agent never becomes ready (and cannot be asked to cancel or drain).
#[tokio::test(flavor = "multi_thread")]
async fn adversary_out_of_range_deadline_in_the_annotation_panics_the_agent() {
    let (api, _dir, kubeconfig) = cluster();
    api.add_pod(web("web-0"));
    let now = unix_now();
    let record = serde_json::json!({
        "id": "corrupt", "reason": "", "requester": "", "started": now, "deadline": u64::MAX,
        "phase": "evicting", "done": [], "gracePeriodSeconds": null, "concurrency": 1,
        "deleteEmptydirData": false, "evictUnreplicated": true,
        "leaderSelector": "nodekeeper.io/role=leader", "driver": "", "heartbeat": 0,
    });
    api.edit(Res::Nodes, "", NODE, |n| {
        n["metadata"]["annotations"] =
            serde_json::json!({ "nodekeeper.io/drain": record.to_string() });
    });
    // Agent::start panics when /readyz never answers 200 within 20 s or the process dies.
    let mut agent = agent(&kubeconfig);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.proc.alive(), "agent died:\n{}", agent.proc.log_text());
}

/// Accepted PATCHes of node-a's `spec.unschedulable`: true for a cordon, false for an uncordon.
fn cordon_log(api: &FakeApi) -> Vec<bool> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.status < 300 && r.body.contains("unschedulable"))
        .filter(|r| r.path.ends_with(&format!("/nodes/{NODE}")))
        .map(|r| r.body.contains("\"unschedulable\":true"))
        .collect()
}

/// Attack: a patch-and-reboot rotation completes (the node awaits its reboot), then another
/// drain is started on the node and fails (a pod whose finalizer never goes: timed out). When
/// the node reboots, the agent finishes the first rotation's return and uncordons: after a
/// failed drain, on its own (P4). The maintenance record of a superseded rotation still rules.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_failed_drain_after_a_rotation_is_uncordoned_by_the_reboot() {
    let (api, dir, kubeconfig) = cluster();
    api.add_pod(web("web-0"));
    let boot_id = dir.path().join("boot_id");
    std::fs::write(&boot_id, "boot-1\n").unwrap();
    let config = format!(
        "{FAST}  maintenance:\n    bootIdPath: {}\n    returnTimeout: 10m\n",
        boot_id.display()
    );
    let start = || {
        Agent::builder()
            .config(&config)
            .with_token()
            .connected(&kubeconfig, NODE)
            .start()
    };
    let mut first = start();
    let mut c = NodeAgentClient::connect(first.grpc_url()).await.unwrap();
    let mut rotation = request("rotation-1", 30);
    rotation.await_reboot = true;
    let events = within(60, drain_all(&mut c, rotation)).await;
    assert!(
        matches!(
            events.last().and_then(|e| e.event.as_ref()),
            Some(Event::Completed(_))
        ),
        "the rotation drain did not complete: {:?}",
        events.last()
    );

    // A second drain, which cannot complete: a pod with a finalizer that never goes.
    api.add_pod(web("web-stuck").finalizer("example.com/never"));
    let second = match within(10, c.drain(nodekeeper_tests::bearer(request("drain-2", 3)))).await {
        Ok(s) => s.into_inner(),
        // Refused while the rotation awaits its reboot: the attack does not apply.
        Err(_) => return,
    };
    let mut second = second;
    let mut last = None;
    while let Some(e) = within(30, second.message()).await.expect("stream") {
        last = e.event;
    }
    assert!(
        !matches!(last, Some(Event::Completed(_))),
        "the second drain completed: {last:?}"
    );
    assert_eq!(
        cordon_log(&api).last(),
        Some(&true),
        "cordoned after the failed drain"
    );

    // The reboot: the agent dies with the node, a new boot ID, a new agent.
    first.proc.signal("KILL");
    first.proc.wait_exit(Duration::from_secs(5));
    std::fs::write(&boot_id, "boot-2\n").unwrap();
    let _second_agent = start();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        api.node(NODE).unwrap()["spec"]["unschedulable"],
        true,
        "the node was uncordoned after drain-2 failed (cordon log {:?})",
        cordon_log(&api)
    );
}

/// Successful eviction POSTs (201) in the fake's request log.
fn admitted(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/eviction") && r.status == 201)
        .count()
}

/// Attack: the driving agent process stalls past the owner lease (SIGSTOP: a CPU-starved or
/// frozen container), the node's other agent process adopts the drain, and the drain is then
/// cancelled through it. When the stalled process wakes up (SIGCONT) it finds a terminal record,
/// which its renewal does not treat as "taken over": it writes itself back as the driver of the
/// cancelled drain and keeps evicting pods. Two processes drove the drain, and a cancelled drain
/// went on evicting (P4).
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_stalled_driver_resurrects_a_drain_cancelled_after_its_adoption() {
    let (api, _dir, kubeconfig) = cluster();
    for i in 0..6 {
        api.add_pod(web(&format!("web-{i}")).grace_period(2));
    }
    let config = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  concurrency: 1\n  ownerLease: 3s\n";
    let start = |pod: &str| {
        Agent::builder()
            .config(config)
            .with_token()
            .env("POD_NAME", pod)
            .connected(&kubeconfig, NODE)
            .start()
    };
    let old = start("nk-old");
    let mut a = NodeAgentClient::connect(old.grpc_url()).await.unwrap();
    let _stream_a = a
        .drain(nodekeeper_tests::bearer(request("stall", 120)))
        .await
        .expect("drain accepted")
        .into_inner();
    within(20, async {
        while admitted(&api) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The rollout's new process starts while the old one drives: it stands by to adopt.
    let new = start("nk-new");
    let mut b = NodeAgentClient::connect(new.grpc_url()).await.unwrap();
    old.proc.signal("STOP");
    let driver = |api: &FakeApi| -> String {
        api.node(NODE)
            .and_then(|n| {
                n["metadata"]["annotations"]["nodekeeper.io/drain"]
                    .as_str()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                    .and_then(|v| v["driver"].as_str().map(str::to_string))
            })
            .unwrap_or_default()
    };
    within(30, async {
        while !driver(&api).starts_with("nk-new#") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Cancelled through the process that now drives it.
    b.cancel_drain(nodekeeper_tests::bearer(
        nodekeeper::pb::CancelDrainRequest {
            id: "stall".into(),
            ..Default::default()
        },
    ))
    .await
    .expect("cancel");
    within(20, async {
        while recorded_phase(&api).as_deref() != Some("cancelled") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Let an in-flight eviction of the new process land before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_cancel = admitted(&api);
    old.proc.signal("CONT");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let phase = recorded_phase(&api);
    let after = admitted(&api);
    assert!(
        after == at_cancel && phase.as_deref() == Some("cancelled"),
        "after the cancel: {} more pods evicted, recorded phase {phase:?}, driver {}",
        after - at_cancel,
        driver(&api)
    );
}

/// Attack: one renewal of the driver's claim hangs (an HTTP request the API server never
/// answers: the agent's call gives up only after its 10 s timeout). The claim expires after the
/// owner lease, the node's other agent process adopts the drain and drives it, while the first
/// process, which never learned it lost the claim, goes on evicting until its renewal finally
/// fails. Two processes drive the node's drain at once (P4): evictions are not fenced by the
/// claim's lease.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_hung_claim_renewal_gives_two_drivers_at_once() {
    let (api, _dir, kubeconfig) = cluster();
    for i in 0..16 {
        api.add_pod(web(&format!("web-{i:02}")).grace_period(1));
    }
    let config = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  concurrency: 2\n  ownerLease: 3s\n";
    let start = |pod: &str| {
        Agent::builder()
            .config(config)
            .with_token()
            .env("POD_NAME", pod)
            .connected(&kubeconfig, NODE)
            .start()
    };
    let old = start("nk-old");
    let mut a = NodeAgentClient::connect(old.grpc_url()).await.unwrap();
    let mut stream_a = a
        .drain(nodekeeper_tests::bearer(request("hung", 120)))
        .await
        .expect("drain accepted")
        .into_inner();
    // Every event the old process streams, with when it arrived.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(e)) = stream_a.message().await {
            log.lock().unwrap().push((std::time::Instant::now(), e));
        }
    });
    within(20, async {
        while admitted(&api) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _new = start("nk-new");
    // The old process's next write of the Node (its claim renewal) gets no answer.
    api.inject(Fault::on("PATCH", &format!("/api/v1/nodes/{NODE}"), FaultKind::Hold).times(1));
    let driver = |api: &FakeApi| -> String {
        api.node(NODE)
            .and_then(|n| {
                n["metadata"]["annotations"]["nodekeeper.io/drain"]
                    .as_str()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                    .and_then(|v| v["driver"].as_str().map(str::to_string))
            })
            .unwrap_or_default()
    };
    within(30, async {
        while !driver(&api).starts_with("nk-new#") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let adopted = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    api.release_held();
    reader.abort();
    let late: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at > adopted + Duration::from_millis(500))
        .filter_map(|(_, e)| match &e.event {
            Some(Event::Evicting(p)) => Some(p.name.clone()),
            _ => None,
        })
        .collect();
    assert!(
        late.is_empty(),
        "the old process went on evicting {late:?} after the new one adopted the drain"
    );
}
