//! Adversary tests for issue #20, third round (after the 17 findings of adversary_issue20.rs and
//! adversary_issue20b.rs were fixed): attacks around the newest fixes (the slot marked at claim,
//! the Node recreated while returning, the guarded `done` write, a restart finding the drain
//! still running). Broke: `#[ignore = "adversary finding: ..."]`; held: a plain passing test.
//! Same harness as adversary_issue20b.rs (`crate::support::rotation`): the fake API server, one agent per node, a
//! boot-ID file per node that the test changes to "reboot" it, a 2 s slot lease.

use std::time::Duration;

use nodekeeper::pb;
use nodekeeper_tests::drain_scenario::drain_all;
use nodekeeper_tests::fake_api::{Fault, FaultKind, Res};
use nodekeeper_tests::{Agent, wait_for};
use serde_json::Value;

use crate::support::rotation::{
    Fleet, LOCK_NS, SLOT, client, completed, kill, node_b_stays_uncordoned, poll, rotation_request,
    within,
};

/// node-a's rotation drained, then node-a rebooted with its Node not Ready yet: the new agent
/// has taken the slot back and waits in `returning`.
async fn node_a_returning(fleet: &Fleet) -> Agent {
    let a = fleet.agent("node-a");
    let events = within(
        60,
        drain_all(&mut client(&a).await, rotation_request("rot-a", "node-a")),
    )
    .await;
    assert!(completed(&events), "{:?}", events.last());
    kill(a);
    fleet.set_ready("node-a", "False");
    std::fs::write(fleet.boot_id_path("node-a"), "boot-2\n").expect("boot id");
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(20), "returning", || {
            (fleet.maintenance("node-a")["state"] == "returning").then_some(())
        })
    });
    a
}

/// Attack (API timeouts on the return PATCH, "never leave a slot held forever"): node-a is back
/// from its reboot and `returning`; the Node turns Ready and the return sends its one guarded
/// PATCH (uncordon + `done`). The API server commits it but the answer never comes (a response
/// lost on the network, a load balancer's idle cut): here the fake holds the request and the
/// test applies exactly that PATCH to the Node meanwhile, as etcd would have. The agent's call
/// times out (10 s) and the step is retried from a fresh read, which shows `done`: the code
/// takes that for "the other process of this node finished the return: it released the slot"
/// and only stops renewing its guard. Nobody released the slot: it is marked, so it never
/// expires. node-b's rotation waits for as long as node-a's agent runs.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_done_patch_committed_but_unanswered_keeps_the_slot_held_forever() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let b = fleet.agent("node-b");
    let a = node_a_returning(&fleet).await;
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    // The next PATCH of node-a is the return's uncordon + `done`.
    fleet
        .api
        .inject(Fault::on("PATCH", "/api/v1/nodes/node-a", FaultKind::Hold).times(1));
    fleet.set_ready("node-a", "True");
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(20), "the done PATCH held", || {
            (fleet.api.held_total() >= 1).then_some(())
        })
    });
    // The held PATCH, committed: `done`, uncordoned, cordoned-at removed.
    fleet.api.edit(Res::Nodes, "", "node-a", |n| {
        let ann = &mut n["metadata"]["annotations"];
        let mut m: Value =
            serde_json::from_str(ann["nodekeeper.io/maintenance"].as_str().unwrap()).unwrap();
        m["state"] = Value::String("done".into());
        ann["nodekeeper.io/maintenance"] = Value::String(m.to_string());
        ann.as_object_mut()
            .unwrap()
            .remove("nodekeeper.io/cordoned-at");
        n["spec"].as_object_mut().unwrap().remove("unschedulable");
    });
    // Past the agent's API call timeout (10 s); the late answer is a 409 (stale version).
    tokio::time::sleep(Duration::from_secs(12)).await;
    fleet.api.release_held();
    assert!(!fleet.cordoned("node-a"), "node-a is back in service");
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    let done_b = tokio::time::timeout(Duration::from_secs(30), drain_b).await;
    assert!(
        done_b.is_ok(),
        "node-a is done and uncordoned, yet node-b's rotation still waits 30 s later: the slot \
         stays node-a's: {}",
        fleet.slot_lease()
    );
    let events = done_b.unwrap().expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    drop((a, b));
}

/// Attack (Node deleted and recreated mid-drain, "a replaced node frees its slot"): node-a's
/// rotation is mid-drain (cordoned, a budget holds a pod; its slot marked at claim, #20-q) when
/// its Node object is deleted and registered again (a new UID, no annotations, schedulable).
/// The drain's next claim renewal finds no record and stops driving ("no longer recorded"),
/// dropping its slot guard without a release: the slot stays marked, so it never expires. The
/// replaced-node check runs only at agent start. node-a is back in service and no rotation
/// runs on it, yet node-b's rotation waits for as long as node-a's agent runs.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_node_recreated_mid_rotation_drain_keeps_the_slot_held_forever() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    fleet.pin("node-a");
    let a = fleet.agent("node-a");
    let b = fleet.agent("node-b");
    let mut ca = client(&a).await;
    let drain_a =
        tokio::spawn(async move { drain_all(&mut ca, rotation_request("rot-a", "node-a")).await });
    tokio::task::block_in_place(|| fleet.wait_evicting("node-a"));
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    let old_uid = fleet.api.node("node-a").unwrap()["metadata"]["uid"].clone();
    fleet.api.delete_node("node-a");
    fleet.api.add_node("node-a", &[]);
    assert_ne!(
        old_uid,
        fleet.api.node("node-a").unwrap()["metadata"]["uid"],
        "a new Node object"
    );
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    // The drain's claim is renewed every 5 s (ownerLease 15 s): well past that.
    let done_b = tokio::time::timeout(Duration::from_secs(40), drain_b).await;
    assert!(
        done_b.is_ok(),
        "node-a was replaced (new UID, schedulable, no drain) mid-rotation, yet node-b's rotation \
         still waits 40 s later: the slot stays node-a's: {} (node-a drain annotation: {})",
        fleet.slot_lease(),
        fleet.api.node("node-a").unwrap()["metadata"]["annotations"]["nodekeeper.io/drain"]
    );
    let events = done_b.unwrap().expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    drain_a.abort();
    drop((a, b));
}

/// Attack (kill -9 at a step boundary, then the reboot): a completed rotation drain writes
/// `drained` (with the boot ID) and then saves the drain's end. The node goes down between the
/// two (a SIGKILL, a power loss, a reboot by the patching tool racing the stream; an error
/// saving the end is only logged and leaves the same Node). After the reboot the Node says
/// `drained` (boot-1) and the drain still `evicting`. The new agent's return sees the rotation's
/// drain "running" and leaves it to the drain engine; the resumed drain completes again and
/// records `drained` with the new boot ID: the node then waits for a second reboot that nobody
/// will do, cordoned, holding its slot.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_reboot_before_the_drains_end_is_saved_waits_for_a_second_reboot() {
    let fleet = Fleet::new(&["node-a"]);
    let a = fleet.agent("node-a");
    let events = within(
        60,
        drain_all(&mut client(&a).await, rotation_request("rot-a", "node-a")),
    )
    .await;
    assert!(completed(&events), "{:?}", events.last());
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(10), "awaiting-reboot", || {
            (fleet.maintenance("node-a")["state"] == "awaiting-reboot").then_some(())
        })
    });
    kill(a);
    // The Node as the agent leaves it when it dies right after the `drained` write: the
    // maintenance record `drained`, the drain record not yet ended.
    fleet.api.edit(Res::Nodes, "", "node-a", |n| {
        let ann = &mut n["metadata"]["annotations"];
        let mut m: Value =
            serde_json::from_str(ann["nodekeeper.io/maintenance"].as_str().unwrap()).unwrap();
        m["state"] = Value::String("drained".into());
        ann["nodekeeper.io/maintenance"] = Value::String(m.to_string());
        let mut d: Value =
            serde_json::from_str(ann["nodekeeper.io/drain"].as_str().unwrap()).unwrap();
        d["phase"] = Value::String("evicting".into());
        ann["nodekeeper.io/drain"] = Value::String(d.to_string());
    });
    std::fs::write(fleet.boot_id_path("node-a"), "boot-2\n").expect("boot id");
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    let back = tokio::task::block_in_place(|| {
        poll(Duration::from_secs(40), || {
            (fleet.maintenance("node-a")["state"] == "done").then_some(())
        })
    });
    assert!(
        back.is_some(),
        "node-a rebooted after it was drained, yet its rotation is not done 40 s later: {} \
         (drain {}, cordoned {}, slot {})",
        fleet.maintenance("node-a"),
        fleet.api.node("node-a").unwrap()["metadata"]["annotations"]["nodekeeper.io/drain"],
        fleet.cordoned("node-a"),
        fleet.slot_lease()
    );
    assert!(!fleet.cordoned("node-a"));
    // The release follows the `done` write (and its Event): polled, not read at once.
    let released = tokio::task::block_in_place(|| {
        poll(Duration::from_secs(10), || {
            fleet.holder().is_none().then_some(())
        })
    });
    assert!(
        released.is_some(),
        "slot still held: {}",
        fleet.slot_lease()
    );
    drop(a);
}

/// Attack (an API outage at the release, "failures of the API server never leave a slot held
/// forever"): node-a's return records `done` and uncordons, then releases its slot just as the
/// slot Lease becomes unreachable (503 on every GET/PUT of it: a control-plane upgrade, an etcd
/// hiccup). The release retries for RELEASE_RETRY_FOR (10 min), then gives up; it had stopped
/// renewing first. The slot is marked, so it never expires: once the API is back, node-b's
/// rotation still waits, for as long as node-a's agent runs (only a restart's
/// `free_slot_after_done` would free it). 11 minutes.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_ten_minute_outage_at_the_release_keeps_the_slot_held_forever() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let b = fleet.agent("node-b");
    let a = node_a_returning(&fleet).await;
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    fleet.api.inject(
        Fault::on(
            "",
            &format!("/namespaces/{LOCK_NS}/leases/{SLOT}"),
            FaultKind::Unavailable,
        )
        .always(),
    );
    fleet.set_ready("node-a", "True");
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(20), "rotation done", || {
            (fleet.maintenance("node-a")["state"] == "done").then_some(())
        })
    });
    assert!(!fleet.cordoned("node-a"), "node-a is back in service");
    // The outage lasts a little longer than the release's retries (10 min).
    tokio::time::sleep(Duration::from_secs(620)).await;
    fleet.api.clear_faults();
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    let done_b = tokio::time::timeout(Duration::from_secs(30), drain_b).await;
    assert!(
        done_b.is_ok(),
        "node-a is done and uncordoned and the API answers again, yet node-b's rotation still \
         waits 30 s later: the slot stays node-a's: {}",
        fleet.slot_lease()
    );
    let events = done_b.unwrap().expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    drop((a, b));
}

/// `nodekeeper maintenance status --json` for node-a, from the operator's kubeconfig.
fn status_of(fleet: &Fleet, node: &str) -> (Value, String) {
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(nodekeeper_tests::agent_bin());
        cmd.args(["maintenance", "status"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .arg("--kubeconfig")
            .arg(&fleet.kubeconfig)
            .arg(node)
            .output()
            .expect("run nodekeeper maintenance status");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let nodes: Value = serde_json::from_str(&run(true)).expect("json");
    (nodes[0].clone(), run(false))
}

/// Attack ("`nodekeeper maintenance status` shows only what is true now"): node-a's rotation is
/// `done` (back from its reboot, uncordoned, slot released). The record keeps the `returnBy` of
/// the reboot it came back from, and the fleet view prints it as the node's RETURN BY: a node
/// with no return pending shown with a deadline to return by (and, once that time passes, as
/// if it were late).
#[tokio::test(flavor = "multi_thread")]
async fn adversary_maintenance_status_shows_a_return_by_for_a_node_that_is_done() {
    let fleet = Fleet::new(&["node-a"]);
    let a = node_a_returning(&fleet).await;
    fleet.set_ready("node-a", "True");
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(20), "rotation done", || {
            (fleet.maintenance("node-a")["state"] == "done").then_some(())
        })
    });
    let (json, table) = status_of(&fleet, "node-a");
    assert_eq!(json["state"], "done");
    assert!(
        json["returnBy"] == 0,
        "a node whose rotation is done (no return pending) shown with a return-by: {json}\n{table}"
    );
    drop(a);
}

/// Whether the slot still counts as held by `node` for another node's acquire: holder set and
/// either marked (never expires) or renewed within its lease.
fn slot_held_by(fleet: &Fleet, node: &str) -> bool {
    let Some(l) = fleet.api.get(Res::Leases, LOCK_NS, SLOT) else {
        return false;
    };
    let lease: k8s_openapi::api::coordination::v1::Lease =
        serde_json::from_value(l).expect("a Lease");
    nodekeeper::drain::lock::live_holder(&lease).as_deref() == Some(node)
}

/// Attack (a 503 on the fleet lock, "failures of the API server (503 ...) never ..."): one 503
/// on the slot Lease's GET when node-a's rotation asks for its slot (nobody holds it). The
/// Drain stream must still end `completed`: a single transient error is retried everywhere
/// else in a drain (#16: "one transient error does not fail a drain"). `lock::acquire` returns
/// the first API error of `try_slot`, and `drive` ends the drain `failed` with it.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_503_on_the_slot_lease_when_a_rotation_asks_for_it_fails_the_drain() {
    let fleet = Fleet::new(&["node-a"]);
    let a = fleet.agent("node-a");
    // After the agent's start-up look at the slot Leases (the sweep's LIST since #20-t), so the 503
    // lands on the drain's own request for its slot.
    let lease_path = format!("/namespaces/{LOCK_NS}/leases/{SLOT}");
    tokio::task::block_in_place(|| {
        wait_for(
            Duration::from_secs(20),
            "the start-up read of the slot",
            || {
                fleet
                    .api
                    .requests()
                    .iter()
                    .any(|r| {
                        r.method == "GET"
                            && (r.path.ends_with(&lease_path)
                                || r.path.ends_with(&format!("/namespaces/{LOCK_NS}/leases")))
                    })
                    .then_some(())
            },
        )
    });
    fleet.api.inject(Fault::on(
        "GET",
        &format!("/namespaces/{LOCK_NS}/leases/{SLOT}"),
        FaultKind::Unavailable,
    ));
    let events = within(
        60,
        drain_all(&mut client(&a).await, rotation_request("rot-a", "node-a")),
    )
    .await;
    assert!(
        completed(&events),
        "one 503 on the slot Lease ended node-a's rotation drain: {:?}",
        events.last()
    );
    drop(a);
}

/// node-a's rotation mid-drain (cordoned, its slot marked at claim, a budget holding a pod),
/// its agent then killed -9.
async fn node_a_killed_mid_rotation_drain(fleet: &Fleet, timeout_secs: i64) {
    fleet.pin("node-a");
    let a = fleet.agent("node-a");
    let mut ca = client(&a).await;
    let mut req = rotation_request("rot-a", "node-a");
    req.timeout = Some(prost_types::Duration {
        seconds: timeout_secs,
        nanos: 0,
    });
    let drain_a = tokio::spawn(async move {
        let _ = ca.drain(nodekeeper_tests::bearer(req)).await;
    });
    tokio::task::block_in_place(|| fleet.wait_evicting("node-a"));
    assert!(fleet.cordoned("node-a"));
    assert!(slot_held_by(fleet, "node-a"));
    drain_a.abort();
    kill(a);
}

/// The drain recorded on node-a ended (any terminal phase): its phase.
fn drain_phase(fleet: &Fleet, node: &str) -> String {
    fleet.api.node(node).expect("node")["metadata"]["annotations"]["nodekeeper.io/drain"]
        .as_str()
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .and_then(|d| d["phase"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Attack (kill -9 mid-drain, the slot marked at claim, #20-q; "never leave a slot held
/// forever"): node-a's rotation drain is mid-drain when its agent is killed; the agent comes
/// back after the drain's deadline (a crash loop's back-off). The resumed drain times out at
/// once, before it takes its slot back, so its end releases nothing; the return, started at
/// the same moment, read the drain still running and left it to the engine. The rotation is
/// `failed` and its slot stays marked, held by node-a, for ever.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_rotation_drain_resumed_past_its_deadline_keeps_its_marked_slot() {
    let fleet = Fleet::new(&["node-a"]);
    node_a_killed_mid_rotation_drain(&fleet, 15).await;
    // Down past the drain's deadline (15 s from its start).
    tokio::time::sleep(Duration::from_secs(16)).await;
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(30), "the resumed drain ended", || {
            matches!(
                drain_phase(&fleet, "node-a").as_str(),
                "timed_out" | "failed" | "cancelled"
            )
            .then_some(())
        })
    });
    let freed = tokio::task::block_in_place(|| {
        poll(Duration::from_secs(15), || {
            (!slot_held_by(&fleet, "node-a")).then_some(())
        })
    });
    assert!(
        freed.is_some(),
        "node-a's rotation drain ended ({}; rotation {}) yet its slot is still held 15 s later: {}",
        drain_phase(&fleet, "node-a"),
        fleet.maintenance("node-a"),
        fleet.slot_lease()
    );
    drop(a);
}

/// Attack (kill -9 mid-drain, then a 503 on the lock): as above, but the agent comes back at
/// once and the resumed drain's first read of the slot Lease gets a 503 (with the return's own
/// read of it, a few). If that ends the resumed drain before it holds its slot again, the
/// slot marked at claim is released by nobody.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_503_on_the_slot_when_a_rotation_drain_resumes_keeps_its_marked_slot() {
    let fleet = Fleet::new(&["node-a"]);
    node_a_killed_mid_rotation_drain(&fleet, 120).await;
    fleet.api.inject(
        Fault::on(
            "GET",
            &format!("/namespaces/{LOCK_NS}/leases/{SLOT}"),
            FaultKind::Unavailable,
        )
        .times(3),
    );
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    // Either the resumed drain goes on (the pod stays pinned: evicting, the slot held, fine)
    // or it ended: then its slot must be let go of.
    let ended = tokio::task::block_in_place(|| {
        poll(Duration::from_secs(20), || {
            matches!(
                drain_phase(&fleet, "node-a").as_str(),
                "timed_out" | "failed" | "cancelled"
            )
            .then_some(())
        })
    });
    if ended.is_some() {
        let freed = tokio::task::block_in_place(|| {
            poll(Duration::from_secs(15), || {
                (!slot_held_by(&fleet, "node-a")).then_some(())
            })
        });
        assert!(
            freed.is_some(),
            "node-a's resumed rotation drain ended ({}; rotation {}) yet its slot is still held \
             15 s later: {}",
            drain_phase(&fleet, "node-a"),
            fleet.maintenance("node-a"),
            fleet.slot_lease()
        );
    }
    drop(a);
}

/// Attack (a second rotate with another id, "a later drain supersedes the return"): node-a is
/// back from its reboot and `returning` (Node not Ready) when an orchestrator's new rotation
/// `rot-2` (another id: a second `nodekeeper rotate` run) reaches it. The new rotation takes
/// the slot node-a already holds and supersedes the return: once the Node is Ready, node-a is
/// not uncordoned and the slot is not released (node-b still waits): it awaits the reboot of
/// `rot-2`; after that reboot the return of `rot-2` uncordons node-a and frees the slot, and
/// node-b's rotation completes. Held.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_rotation_while_returning_keeps_the_slot_until_its_own_return() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let b = fleet.agent("node-b");
    let a = node_a_returning(&fleet).await;
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    let events = within(
        60,
        drain_all(&mut client(&a).await, rotation_request("rot-2", "node-a")),
    )
    .await;
    assert!(completed(&events), "{:?}", events.last());
    fleet.set_ready("node-a", "True");
    node_b_stays_uncordoned(
        &fleet,
        5,
        "node-a drained again by rot-2, its reboot to come",
    )
    .await;
    assert_eq!(fleet.maintenance("node-a")["drainId"], "rot-2");
    assert_eq!(fleet.maintenance("node-a")["state"], "awaiting-reboot");
    assert_eq!(fleet.maintenance("node-a")["bootId"], "boot-2");
    assert!(fleet.cordoned("node-a"));
    assert!(slot_held_by(&fleet, "node-a"), "{}", fleet.slot_lease());
    // rot-2's reboot: node-a returns, then node-b goes.
    kill(a);
    std::fs::write(fleet.boot_id_path("node-a"), "boot-3\n").expect("boot id");
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    let events = within(60, drain_b).await.expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    assert_eq!(fleet.maintenance("node-a")["state"], "done");
    assert!(!fleet.cordoned("node-a"));
    drop((a, b));
}

/// Attack (kill -9 at a step boundary: between the claim and its mark): node-a's rotation waits
/// for the slot (node-z holds it); node-z lets go, node-a takes the slot and its next write
/// (the `draining` record, before the mark and the cordon) hangs; node-a's agent is killed
/// there. node-a is not cordoned, so its unmarked slot may expire: node-b's rotation asks for
/// it, and node-a's agent comes back and resumes its rotation drain, asking too. Whichever
/// wins drains and awaits its reboot; the other waits uncordoned. Never two cordoned. Held.
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_between_the_claim_and_its_mark_never_cordons_two() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    fleet.hold_slot_for(SLOT, "node-z").await;
    let a = fleet.agent("node-a");
    let b = fleet.agent("node-b");
    let mut ca = client(&a).await;
    // node-a waits for the slot once its drain says so (a `waiting` event): its claim and its
    // `pending` write are done, so the next PATCH of node-a is the one after its take of the
    // slot (waiting only for the recorded `pending` could hold the second of those instead).
    let (waiting_tx, waiting) = tokio::sync::oneshot::channel();
    let drain_a = tokio::spawn(async move {
        let mut stream = ca
            .drain(nodekeeper_tests::bearer(rotation_request(
                "rot-a", "node-a",
            )))
            .await
            .expect("drain")
            .into_inner();
        let mut waiting_tx = Some(waiting_tx);
        while let Ok(Some(ev)) = stream.message().await {
            if matches!(ev.event, Some(pb::drain_event::Event::Waiting(_)))
                && let Some(tx) = waiting_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    within(20, waiting)
        .await
        .expect("node-a waits for the slot");
    assert_eq!(drain_phase(&fleet, "node-a"), "pending");
    fleet
        .api
        .inject(Fault::on("PATCH", "/api/v1/nodes/node-a", FaultKind::Hold).times(1));
    fleet.api.edit(Res::Leases, LOCK_NS, SLOT, |l| {
        l["spec"].as_object_mut().unwrap().remove("holderIdentity");
        l["metadata"]["annotations"] = serde_json::json!({});
    });
    tokio::task::block_in_place(|| {
        wait_for(
            Duration::from_secs(20),
            "node-a's write after its claim held",
            || (fleet.api.held_total() >= 1).then_some(()),
        )
    });
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    drain_a.abort();
    kill(a);
    assert!(!fleet.cordoned("node-a"));
    let both = |fleet: &Fleet| fleet.cordoned("node-a") && fleet.cordoned("node-b");
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    // Whichever of the two rotations takes the expired slot (node-b's, or node-a's resumed
    // one) drains and awaits its reboot; the other waits. Never both cordoned.
    let window = std::time::Instant::now() + Duration::from_secs(25);
    while std::time::Instant::now() < window {
        assert!(
            !both(&fleet),
            "node-a and node-b both cordoned: {}",
            fleet.slot_lease()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let holder = fleet.holder().expect("a holder");
    assert!(
        fleet.cordoned(&holder),
        "{holder} holds the slot: {}",
        fleet.slot_lease()
    );
    assert_eq!(fleet.maintenance(&holder)["state"], "awaiting-reboot");
    drain_b.abort();
    drop((a, b));
}
