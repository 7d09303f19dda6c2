//! The OS-patching rotation (issue #20) against the fake API server: node-bound requests (a
//! call meant for another node is refused before anything is touched), and the rotation itself:
//! the fleet-lock slot held from cordon to the node's return after its "reboot" (an agent
//! restart with a new boot ID), and kept by a node that never comes back. Every step runs under
//! a timeout. The fleet harness is `crate::support::rotation`, shared with the adversary rounds.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodekeeper::pb;
use nodekeeper_tests::drain_scenario::request;
use nodekeeper_tests::fake_api::{FakeApi, Res};
use nodekeeper_tests::{Agent, TEST_TOKEN, agent_bin, bearer, wait_for};
use serde_json::Value;
use tonic::Code;

use crate::support::rotation::{
    AgentOpts, CONFIG, Fleet, LOCK_NS, SLOT, client, kill, last_event, rotation_request, within,
};

fn agent(kubeconfig: &Path, node: &str) -> Agent {
    Agent::builder()
        .config(CONFIG)
        .with_token()
        .connected(kubeconfig, node)
        .start()
}

/// Writes to Nodes and evictions the fake API server saw.
fn writes(api: &FakeApi) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| {
            r.method != "GET" && (r.path.contains("/nodes") || r.path.contains("/eviction"))
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

fn assert_refused(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
    assert!(e.message().starts_with(field), "{what}: {}", e.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_sent_to_the_wrong_node_is_refused_and_nothing_is_touched() {
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let a = agent(&kubeconfig, "node-a");
    let mut c = client(&a).await;
    let node = within(10, c.get_node(bearer(pb::GetNodeRequest {})))
        .await
        .expect("GetNode")
        .into_inner();
    let uid = api.node("node-a").expect("node-a")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    assert!(!uid.is_empty());
    assert_eq!(node.node_uid, uid, "GetNode reports the Node's uid");
    let before = writes(&api);

    // The orchestrator meant node-b (whose old address node-a now has): every mutating call
    // is refused, naming the field.
    let mut wrong = request("rot-b");
    wrong.node_name = "node-b".into();
    assert_refused(
        within(10, c.drain(bearer(wrong))).await,
        "node_name:",
        "drain",
    );
    let cordon = pb::CordonRequest {
        reason: "patch".into(),
        node_name: "node-b".into(),
        ..Default::default()
    };
    assert_refused(
        within(10, c.cordon(bearer(cordon))).await,
        "node_name:",
        "cordon",
    );
    let uncordon = pb::UncordonRequest {
        node_name: "node-b".into(),
        ..Default::default()
    };
    assert_refused(
        within(10, c.uncordon(bearer(uncordon))).await,
        "node_name:",
        "uncordon",
    );
    let cancel = pb::CancelDrainRequest {
        id: "rot-b".into(),
        node_name: "node-b".into(),
        ..Default::default()
    };
    assert_refused(
        within(10, c.cancel_drain(bearer(cancel))).await,
        "node_name:",
        "cancel",
    );
    // The right name with the uid of a Node that was deleted and re-created under that name.
    let mut stale = request("rot-a");
    stale.node_name = "node-a".into();
    stale.node_uid = "00000000-dead-beef-0000-000000000000".into();
    assert_refused(
        within(10, c.drain(bearer(stale))).await,
        "node_uid:",
        "drain with a stale uid",
    );
    let n = api.node("node-a").expect("node-a");
    assert_ne!(n["spec"]["unschedulable"], true, "refused calls cordoned");
    assert!(
        n["metadata"]["annotations"]["nodekeeper.io/drain"].is_null(),
        "refused drain recorded: {n}"
    );
    assert_eq!(writes(&api), before, "a refused call wrote to the API");
    assert!(
        within(10, c.get_drain(bearer(pb::GetDrainRequest {})))
            .await
            .is_err(),
        "no drain ran"
    );

    // The right name and uid: accepted.
    let cordon = pb::CordonRequest {
        reason: "patch".into(),
        node_name: "node-a".into(),
        node_uid: uid.clone(),
    };
    let status = within(10, c.cordon(bearer(cordon)))
        .await
        .expect("cordon of the right node")
        .into_inner();
    assert!(status.unschedulable);

    // The CLI: --node names the node it means; another node's agent refuses (exit 1) and the
    // node stays as it was.
    let token = dir.path().join("token");
    std::fs::write(&token, TEST_TOKEN).expect("write token");
    let out = Command::new(agent_bin())
        .args(["uncordon", &a.api.to_string(), "--token-file"])
        .arg(&token)
        .args(["--node", "node-b"])
        .output()
        .expect("run nodekeeper uncordon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("node_name:"), "{stderr}");
    assert_eq!(api.node("node-a").unwrap()["spec"]["unschedulable"], true);
    // Without --node the CLI binds the call to the node the agent reports: accepted.
    let out = Command::new(agent_bin())
        .args(["uncordon", &a.api.to_string(), "--token-file"])
        .arg(&token)
        .output()
        .expect("run nodekeeper uncordon");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(api.node("node-a").unwrap()["spec"]["unschedulable"], true);
}

// === the rotation: slot held from cordon to return, across the "reboot" ===

#[tokio::test(flavor = "multi_thread")]
async fn a_three_node_rotation_with_one_slot_never_has_two_nodes_cordoned_across_the_reboots() {
    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
    let fleet = Fleet::new(&NODES);
    let mut agents: Vec<Option<Agent>> = NODES.iter().map(|n| Some(fleet.agent(n))).collect();

    // Rotation options without a rotation are a usage error naming the field.
    let mut c = client(agents[0].as_ref().unwrap()).await;
    let mut bad = request("bad");
    bad.keep_cordoned = true;
    let e = within(10, c.drain(bearer(bad))).await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("keep_cordoned:"), "{e}");

    // The orchestrator asks all three at once; the fleet lock paces them.
    let mut drains = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let mut c = client(agents[i].as_ref().unwrap()).await;
        let req = rotation_request(&format!("rot-{node}"), node);
        drains.push(tokio::spawn(async move {
            nodekeeper_tests::drain_scenario::drain_all(&mut c, req).await
        }));
    }

    // The patching step: each node that awaits its reboot is "rebooted" (agent killed, new
    // boot ID, new agent), until every node is done.
    let mut rebooted = [false; 3];
    within(150, async {
        loop {
            let mut all_done = true;
            for (i, node) in NODES.iter().enumerate() {
                let m = fleet.maintenance(node);
                match m["state"].as_str() {
                    // As an orchestrator: reboot once the drain's stream said `completed`.
                    Some("awaiting-reboot") if !rebooted[i] && drains[i].is_finished() => {
                        assert_eq!(m["bootId"], "boot-1", "{m}");
                        assert_eq!(
                            fleet.holder().as_deref(),
                            Some(*node),
                            "{node} awaits its reboot without the slot"
                        );
                        let old = agents[i].take().unwrap();
                        agents[i] = Some(tokio::task::block_in_place(|| fleet.reboot(old, node)));
                        rebooted[i] = true;
                        all_done = false;
                    }
                    Some("done") => {}
                    _ => all_done = false,
                }
            }
            if all_done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for d in drains {
        let events = within(30, d).await.expect("drain task");
        assert!(
            matches!(
                last_event(&events),
                Some(pb::drain_event::Event::Completed(_))
            ),
            "{:?}",
            events.last()
        );
    }
    assert_eq!(rebooted, [true; 3]);

    // From the API server's log: never two nodes cordoned at once, each cordoned once and
    // uncordoned once (after its reboot, by the new agent).
    let log = fleet.cordon_log();
    let mut cordoned: Vec<String> = Vec::new();
    for (node, on) in &log {
        if *on {
            assert!(
                cordoned.iter().all(|n| n == node),
                "{node} cordoned while {cordoned:?} still was; log: {log:?}"
            );
            cordoned.push(node.clone());
        } else {
            cordoned.retain(|n| n != node);
        }
    }
    assert!(
        cordoned.is_empty(),
        "left cordoned: {cordoned:?}; log: {log:?}"
    );
    for node in NODES {
        let ons = log.iter().filter(|(n, on)| n == node && *on).count();
        let offs = log.iter().filter(|(n, on)| n == node && !*on).count();
        assert_eq!((ons, offs), (1, 1), "{node}: {log:?}");
        let m = fleet.maintenance(node);
        assert_eq!(m["state"], "done", "{m}");
        assert_eq!(
            m["bootId"], "boot-1",
            "the boot ID recorded when drained: {m}"
        );
        assert_eq!(fleet.events(node, "Rebooted").len(), 1, "{node}");
        // Recorded right after the state.
        wait_for(Duration::from_secs(5), "MaintenanceDone Event", || {
            (fleet.events(node, "MaintenanceDone").len() == 1).then_some(())
        });
    }
    // Released after the last node's return.
    wait_for(Duration::from_secs(5), "slot released", || {
        fleet.holder().is_none().then_some(())
    });
    let lease = fleet.api.get(Res::Leases, LOCK_NS, SLOT).unwrap();
    assert!(
        lease["metadata"]["annotations"]["nodekeeper.io/return-by"].is_null(),
        "{lease}"
    );
    // The timeline, for the closing note: every cordon, uncordon, eviction and slot write
    // the API server accepted, in seconds from the first request.
    eprintln!("cordon log: {log:?}");
    let requests = fleet.api.requests();
    let start = requests.first().map(|r| r.at).unwrap();
    for r in requests.iter().filter(|r| r.status < 300) {
        let what = if r.method == "PATCH" && r.body.contains("\"unschedulable\":true") {
            "cordon"
        } else if r.method == "PATCH" && r.body.contains("unschedulable") {
            "uncordon"
        } else if r.method == "POST" && r.path.ends_with("/eviction") {
            "evict"
        } else if r.method != "GET" && r.path.contains("/leases/") {
            "slot write"
        } else {
            continue;
        };
        eprintln!(
            "timeline +{:>6.2}s {what:<10} {} ({})",
            r.at.duration_since(start).as_secs_f64(),
            r.path,
            r.user
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_never_comes_back_keeps_its_slot_and_raises_an_event() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let a = fleet.agent_with("node-a", AgentOpts::default().return_timeout("2s"));
    let b = fleet.agent_with("node-b", AgentOpts::default().return_timeout("2s"));
    let events = within(
        60,
        nodekeeper_tests::drain_scenario::drain_all(
            &mut client(&a).await,
            rotation_request("rot-a", "node-a"),
        ),
    )
    .await;
    assert!(
        matches!(
            last_event(&events),
            Some(pb::drain_event::Event::Completed(_))
        ),
        "{:?}",
        events.last()
    );
    assert_eq!(fleet.maintenance("node-a")["state"], "awaiting-reboot");
    // node-a goes down for its reboot and never comes back.
    kill(a);

    let mut cb = client(&b).await;
    let drain_b = tokio::spawn({
        let mut cb = cb.clone();
        async move {
            nodekeeper_tests::drain_scenario::drain_all(
                &mut cb,
                rotation_request("rot-b", "node-b"),
            )
            .await
        }
    });
    // node-b waits and raises the Event on node-a once node-a is past its return-by time.
    let overdue = tokio::task::block_in_place(|| {
        wait_for(
            Duration::from_secs(20),
            "MaintenanceOverdue on node-a",
            || {
                let e = fleet.events("node-a", "MaintenanceOverdue");
                (!e.is_empty()).then_some(e)
            },
        )
    });
    assert!(overdue[0].contains("node-b waits"), "{overdue:?}");
    // Well past the 2 s lease: node-a still holds the slot, node-b is untouched and pending.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    let status = within(10, cb.get_drain(bearer(pb::GetDrainRequest {})))
        .await
        .expect("GetDrain")
        .into_inner();
    assert_eq!(status.phase(), pb::DrainPhase::Pending, "{status:?}");
    assert_ne!(
        fleet.api.node("node-b").unwrap()["spec"]["unschedulable"],
        true
    );
    assert_eq!(
        fleet.events("node-a", "MaintenanceOverdue").len(),
        1,
        "one Event per wait"
    );
    drain_b.abort();
    drop(b);
}

/// Eviction POSTs the API server saw (accepted or not).
fn eviction_posts(api: &FakeApi) -> usize {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/eviction"))
        .count()
}

/// Rewrites the slot Lease as if `holder` had taken it (a renewal of ours failed for longer than
/// the lease), or frees it (`None`).
async fn set_slot_holder(kubeconfig: &Path, holder: Option<&str>) {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(kube::Client::try_from(cfg).expect("client"), LOCK_NS);
    for _ in 0..10 {
        let mut lease = api.get(SLOT).await.expect("slot lease");
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = holder.map(str::to_string);
        spec.lease_duration_seconds = Some(3600);
        spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        if api.replace(SLOT, &Default::default(), &lease).await.is_ok() {
            return;
        }
    }
    panic!("could not rewrite the slot lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_lost_mid_drain_pauses_evictions_until_a_slot_is_held_again() {
    let fleet = Fleet::builder().pods(8).start(&["node-a"]);
    let a = fleet.agent("node-a");
    let mut c = client(&a).await;
    let mut req = request("rot-a");
    req.node_name = "node-a".into();
    let mut stream = within(10, c.drain(bearer(req)))
        .await
        .expect("Drain accepted")
        .into_inner();
    let mut events = Vec::new();
    let mut stolen = false;
    let mut paused_at = None;
    while let Some(e) = within(60, stream.message()).await.expect("stream") {
        match &e.event {
            // The first pod is gone: node-thief takes the slot (as after our renewals failed).
            Some(pb::drain_event::Event::Deleted(_)) if !stolen => {
                set_slot_holder(&fleet.kubeconfig, Some("node-thief")).await;
                stolen = true;
            }
            Some(pb::drain_event::Event::Waiting(w))
                if w.holders.contains("lost mid-drain") && paused_at.is_none() =>
            {
                // Paused: for 2 s (three renewal periods) no eviction is posted at all.
                let posts = eviction_posts(&fleet.api);
                tokio::time::sleep(Duration::from_secs(2)).await;
                assert_eq!(
                    eviction_posts(&fleet.api),
                    posts,
                    "evicted while the slot was lost"
                );
                let status = within(10, c.get_drain(bearer(pb::GetDrainRequest {})))
                    .await
                    .expect("GetDrain")
                    .into_inner();
                assert_eq!(status.phase(), pb::DrainPhase::Evicting, "{status:?}");
                assert!(status.done.len() < 8, "{status:?}");
                paused_at = Some(posts);
                set_slot_holder(&fleet.kubeconfig, None).await;
            }
            _ => {}
        }
        events.push(e);
    }
    assert!(
        paused_at.is_some(),
        "the lost slot was never reported: {events:?}"
    );
    assert!(
        matches!(
            last_event(&events),
            Some(pb::drain_event::Event::Completed(_))
        ),
        "{:?}",
        events.last()
    );
    let waits: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::drain_event::Event::Waiting(w)) => Some(w.holders.clone()),
            _ => None,
        })
        .collect();
    assert!(
        waits.iter().any(|w| w.contains("node-thief")),
        "the wait named the new holder: {waits:?}"
    );
    assert!(
        eviction_posts(&fleet.api) > paused_at.unwrap(),
        "evictions resumed once the slot was free"
    );
    wait_for(Duration::from_secs(5), "slot released", || {
        fleet.holder().is_none().then_some(())
    });
}

// === metrics (issue #20) ===

/// A metric's value in `agent`'s /metrics (0 when absent), the text checked by promtool.
fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = agent.metrics_text();
    nodekeeper_tests::sample(&text, name, labels).unwrap_or(0.0)
}

fn maintenance_state(agent: &Agent) -> String {
    let text = agent.metrics_text();
    let on: Vec<&str> = nodekeeper::drain::MAINTENANCE_STATES
        .into_iter()
        .filter(|s| {
            nodekeeper_tests::sample(&text, "nodekeeper_maintenance_state", &[("state", s)])
                == Some(1.0)
        })
        .collect();
    assert_eq!(on.len(), 1, "one-hot: {on:?}\n{text}");
    on[0].to_string()
}

/// The rotation's metrics, each from its own node's agent: node-b rotates first (slot held,
/// cordoned, `awaiting-reboot`), node-a's rotation waits for the slot (a wait counted, not
/// cordoned), node-b's return frees it, node-a drains (the wait observed, slot held, cordoned
/// seconds rising); a human uncordoning node-a drops its cordon gauge to 0. Every exposition
/// passes `promtool check metrics`.
#[tokio::test(flavor = "multi_thread")]
async fn rotation_metrics_report_cordon_time_state_slot_waits_and_holds() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let a = fleet.agent("node-a");
    let b = fleet.agent("node-b");
    const CORDONED: &str = "nodekeeper_node_cordoned_by_nodekeeper_seconds";
    const HELD: &str = "nodekeeper_fleet_lock_slot_held";
    const WAITS: &str = "nodekeeper_fleet_lock_waits_total";
    for agent in [&a, &b] {
        nodekeeper_tests::assert_promtool_clean(&agent.metrics_text());
        assert_eq!(maintenance_state(agent), "none");
        assert_eq!(metric(agent, CORDONED, &[]), 0.0);
        assert_eq!(metric(agent, HELD, &[]), 0.0);
        assert_eq!(metric(agent, WAITS, &[]), 0.0);
    }

    let mut cb = client(&b).await;
    let events = within(60, async {
        nodekeeper_tests::drain_scenario::drain_all(
            &mut cb,
            rotation_request("rot-node-b", "node-b"),
        )
        .await
    })
    .await;
    assert!(
        matches!(
            last_event(&events),
            Some(pb::drain_event::Event::Completed(_))
        ),
        "{:?}",
        last_event(&events)
    );
    wait_for(
        Duration::from_secs(10),
        "node-b awaiting its reboot",
        || (maintenance_state(&b) == "awaiting-reboot").then_some(()),
    );
    assert_eq!(metric(&b, HELD, &[]), 1.0);
    assert_eq!(metric(&b, WAITS, &[]), 0.0, "the slot was free");
    wait_for(
        Duration::from_secs(10),
        "node-b's cordon time rising",
        || (metric(&b, CORDONED, &[]) >= 1.0).then_some(()),
    );
    nodekeeper_tests::assert_promtool_clean(&b.metrics_text());

    // node-a's rotation queues behind node-b's reboot.
    let mut ca = client(&a).await;
    let rot_a = tokio::spawn(async move {
        nodekeeper_tests::drain_scenario::drain_all(
            &mut ca,
            rotation_request("rot-node-a", "node-a"),
        )
        .await
    });
    wait_for(
        Duration::from_secs(10),
        "node-a waiting for the slot",
        || (metric(&a, WAITS, &[]) == 1.0).then_some(()),
    );
    assert_eq!(metric(&a, HELD, &[]), 0.0);
    assert_eq!(metric(&a, CORDONED, &[]), 0.0, "cordoned while waiting");
    assert_eq!(maintenance_state(&a), "none");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // node-b "reboots" and returns: done, uncordoned, slot released.
    let b = fleet.reboot(b, "node-b");
    wait_for(Duration::from_secs(30), "node-b done", || {
        (maintenance_state(&b) == "done").then_some(())
    });
    assert_eq!(metric(&b, CORDONED, &[]), 0.0);
    wait_for(Duration::from_secs(10), "node-b's slot let go", || {
        (metric(&b, HELD, &[]) == 0.0).then_some(())
    });
    nodekeeper_tests::assert_promtool_clean(&b.metrics_text());

    // node-a takes the slot, having waited over a second.
    let events = within(60, rot_a).await.expect("node-a's drain");
    assert!(
        matches!(
            last_event(&events),
            Some(pb::drain_event::Event::Completed(_))
        ),
        "{:?}",
        last_event(&events)
    );
    wait_for(
        Duration::from_secs(10),
        "node-a awaiting its reboot",
        || (maintenance_state(&a) == "awaiting-reboot").then_some(()),
    );
    assert_eq!(metric(&a, HELD, &[]), 1.0);
    assert_eq!(metric(&a, WAITS, &[]), 1.0);
    assert_eq!(
        metric(&a, "nodekeeper_fleet_lock_wait_seconds_count", &[]),
        1.0
    );
    assert!(metric(&a, "nodekeeper_fleet_lock_wait_seconds_sum", &[]) >= 1.0);
    wait_for(
        Duration::from_secs(10),
        "node-a's cordon time rising",
        || (metric(&a, CORDONED, &[]) >= 1.0).then_some(()),
    );
    nodekeeper_tests::assert_promtool_clean(&a.metrics_text());

    // Someone else uncordons node-a: it is no longer cordoned by nodekeeper.
    fleet.api.set_node_unschedulable("node-a", false);
    wait_for(
        Duration::from_secs(10),
        "node-a's cordon gauge at 0",
        || (metric(&a, CORDONED, &[]) == 0.0).then_some(()),
    );
}

// === `nodekeeper maintenance status` (issue #20) ===

/// Runs `nodekeeper maintenance status ARGS --kubeconfig K`: (exit code, stdout, stderr).
fn maintenance_status_cli(fleet: &Fleet, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_bin())
        .args(["maintenance", "status"])
        .args(args)
        .arg("--kubeconfig")
        .arg(&fleet.kubeconfig)
        .output()
        .expect("run nodekeeper maintenance status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fleet view from the Nodes' annotations and the slot Leases: node-b awaiting its reboot
/// (state, since, boot ID, return-by, slot holder, cordoned by nodekeeper since), node-a
/// cordoned by a human (not by nodekeeper, no state, no slot); a node that does not exist exits
/// 1 naming it.
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_status_shows_each_nodes_state_cordon_and_slot_from_the_api() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let b = fleet.agent("node-b");
    let mut cb = client(&b).await;
    let events = within(60, async {
        nodekeeper_tests::drain_scenario::drain_all(
            &mut cb,
            rotation_request("rot-node-b", "node-b"),
        )
        .await
    })
    .await;
    assert!(
        matches!(
            last_event(&events),
            Some(pb::drain_event::Event::Completed(_))
        ),
        "{:?}",
        last_event(&events)
    );
    wait_for(
        Duration::from_secs(10),
        "node-b awaiting its reboot",
        || (fleet.maintenance("node-b")["state"] == "awaiting-reboot").then_some(()),
    );
    fleet.api.set_node_unschedulable("node-a", true);
    let record = fleet.maintenance("node-b");
    let (code, stdout, stderr) = maintenance_status_cli(&fleet, &["--json"]);
    assert_eq!(code, 0, "{stderr}");
    let nodes: Vec<Value> = serde_json::from_str(&stdout).expect("a JSON array");
    let names: Vec<&str> = nodes.iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(names, ["node-a", "node-b", "node-other"]);
    let a = &nodes[0];
    assert_eq!(a["cordoned"], true);
    assert!(a["cordonedByNodekeeperSince"].is_null(), "{a}");
    assert!(a["state"].is_null(), "{a}");
    assert!(a["slot"].is_null(), "{a}");
    let b_row = &nodes[1];
    assert_eq!(b_row["cordoned"], true);
    assert!(
        b_row["cordonedByNodekeeperSince"].as_u64().unwrap() > 0,
        "{b_row}"
    );
    assert_eq!(b_row["state"], "awaiting-reboot");
    assert_eq!(b_row["since"], record["since"]);
    assert_eq!(b_row["drainId"], "rot-node-b");
    assert_eq!(b_row["bootId"], "boot-1");
    assert_eq!(b_row["returnBy"], record["returnBy"]);
    assert_eq!(b_row["slot"], SLOT);
    assert!(
        b_row["drain"]
            .as_str()
            .unwrap()
            .starts_with("rot-node-b completed"),
        "{b_row}"
    );

    // The table, for one node.
    let (code, stdout, stderr) = maintenance_status_cli(&fleet, &["node-b"]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("RETURN BY"),
        "{stdout}"
    );
    for part in ["node-b", "yes", "awaiting-reboot", "boot-1", SLOT] {
        assert!(lines[1].contains(part), "{part} missing: {stdout}");
    }

    let (code, _, stderr) = maintenance_status_cli(&fleet, &["node-zz"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("node \"node-zz\" not found"), "{stderr}");
}

// === `nodekeeper rotate` (issue #20) ===

/// `nodekeeper rotate node-a --id patch-1` driving node-a's agent, spawned.
fn rotate_cli(fleet: &Fleet, agent_addr: &str, token: &Path) -> std::process::Child {
    Command::new(agent_bin())
        .args(["rotate", "node-a", "--id", "patch-1", "--poll", "200ms"])
        .args(["--return-wait", "60s", "--agent"])
        .arg(format!("node-a={agent_addr}"))
        .arg("--token-file")
        .arg(token)
        .arg("--kubeconfig")
        .arg(&fleet.kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nodekeeper rotate")
}

/// The orchestrator's `rotate` SIGKILLed mid-drain; a second `rotate` with the same id
/// re-attaches to the node's drain, waits through the reboot (agent restart, new boot ID) and
/// the return, and exits 0; a third finds the node done and skips it. node-a is cordoned once
/// and uncordoned once in the fake's PATCH log.
#[tokio::test(flavor = "multi_thread")]
async fn rotate_killed_mid_drain_resumes_and_cordons_and_uncordons_exactly_once() {
    // Six pods, one at a time through their budget: the drain takes a few seconds.
    let fleet = Fleet::builder().pods(6).start(&["node-a"]);
    let a = fleet.agent("node-a");
    let token = fleet.dir.path().join("token");
    std::fs::write(&token, TEST_TOKEN).expect("write token");

    let mut first = rotate_cli(&fleet, &a.api.to_string(), &token);
    wait_for(
        Duration::from_secs(30),
        "node-a's rotation evicting",
        || {
            fleet
                .api
                .requests()
                .iter()
                .any(|r| r.path.ends_with("/eviction") && r.status == 201)
                .then_some(())
        },
    );
    first.kill().expect("SIGKILL rotate");
    let _ = first.wait();
    assert_ne!(
        fleet.maintenance("node-a")["state"],
        "awaiting-reboot",
        "killed too late: the drain was over"
    );

    let second = rotate_cli(&fleet, &a.api.to_string(), &token);
    wait_for(
        Duration::from_secs(60),
        "node-a awaiting its reboot",
        || (fleet.maintenance("node-a")["state"] == "awaiting-reboot").then_some(()),
    );
    // The patching tool reboots the node.
    let _a = fleet.reboot(a, "node-a");
    let out = tokio::task::spawn_blocking(move || second.wait_with_output())
        .await
        .expect("join")
        .expect("rotate output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("node-a: draining through"), "{stdout}");
    assert!(stdout.contains("[1/1] node-a: done"), "{stdout}");
    assert_eq!(fleet.maintenance("node-a")["state"], "done");
    assert_eq!(fleet.maintenance("node-a")["drainId"], "patch-1/node-a");
    assert_eq!(
        fleet.cordon_log(),
        [("node-a".to_string(), true), ("node-a".to_string(), false)],
        "cordoned and uncordoned exactly once"
    );
    // Each pod was admitted for eviction once across both rotate runs.
    let admitted = fleet
        .api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/eviction") && r.status == 201)
        .count();
    assert_eq!(admitted, 6);

    // Run again: nothing left to do.
    let out = tokio::task::spawn_blocking({
        let third = rotate_cli(&fleet, "127.0.0.1:1", &token);
        move || third.wait_with_output()
    })
    .await
    .expect("join")
    .expect("rotate output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("done already (rotation patch-1/node-a); skipped"),
        "{stdout}"
    );
    assert_eq!(fleet.cordon_log().len(), 2);
}
