//! Adversary tests for issue #20, second round (after the 11 findings of adversary_issue20.rs
//! were fixed): attacks around the fixes (cordoned-at as the proof of nodekeeper's cordon, the
//! return that stops at a running drain, the slot mark kept across the return). Broke:
//! `#[ignore = "adversary finding: ..."]`; held: a plain passing test. Same harness as
//! adversary_issue20.rs (`crate::support::rotation`): the fake API server, one agent per node, a boot-ID file per
//! node that the test changes to "reboot" it, a 2 s slot lease.

use std::time::Duration;

use nodekeeper_tests::drain_scenario::{drain_all, request};
use nodekeeper_tests::fake_api::{Fault, FaultKind, Res};
use nodekeeper_tests::{Agent, wait_for};
use serde_json::Value;

use crate::support::rotation::{
    AgentOpts, Fleet, LOCK_NS, SLOT, client, completed, kill, node_b_stays_uncordoned, poll,
    rotation_request, within,
};

/// Attack (#20-f, around the fix): `nodekeeper.io/cordoned-at` is the only proof that a cordon
/// is nodekeeper's, and `kubectl uncordon` does not remove it. node-a is drained by a rotation
/// and awaits its reboot; the operator uncordons it by hand, then cordons it again (kubectl
/// cordon: spec.unschedulable only, say for a hardware check). That cordon is the operator's;
/// the return after the reboot must leave it. It finds the stale cordoned-at and uncordons.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_the_return_uncordons_an_operator_cordon_made_after_a_kubectl_uncordon() {
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
    // kubectl uncordon, then kubectl cordon: neither touches annotations.
    fleet.api.edit(Res::Nodes, "", "node-a", |n| {
        n["spec"]["unschedulable"] = Value::Bool(false);
    });
    fleet.api.edit(Res::Nodes, "", "node-a", |n| {
        n["spec"]["unschedulable"] = Value::Bool(true);
    });
    let a = tokio::task::block_in_place(|| fleet.reboot(a, "node-a"));
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(30), "rotation done", || {
            (fleet.maintenance("node-a")["state"] == "done").then_some(())
        })
    });
    assert!(
        fleet.cordoned("node-a"),
        "the return uncordoned node-a, cordoned by an operator after they had uncordoned it: {}",
        fleet.api.node("node-a").unwrap()["metadata"]["annotations"]
    );
    drop(a);
}

/// Attack (#20-l, the gap after compaction): the return's replay of the Node's changes since
/// `drained` cannot help once etcd has compacted that history (410 Gone, about 5 minutes on a
/// default API server: most real reboots). node-a is drained by a rotation and awaits its
/// reboot; its agent is down (the reboot) when the operator runs `kubectl uncordon` then
/// `kubectl cordon` (the fields kubectl writes, under kubectl's own field manager: the fake
/// records managedFields as a real server does). Every replay watch gets 410. Held: the owner
/// of spec.unschedulable is kubectl, not nodekeeper, so the return leaves the node cordoned.
#[tokio::test(flavor = "multi_thread")]
async fn the_return_keeps_an_operator_cordon_made_while_no_agent_ran_after_compaction() {
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
    // The replay (a watch from the drained version, timeoutSeconds=10) finds its history
    // compacted; the agent's long-lived Node watch (timeoutSeconds=290) is left alone.
    fleet.api.inject(
        Fault::on("GET", "/api/v1/nodes", FaultKind::Expired)
            .watch(true)
            .query("timeoutSeconds=10")
            .always(),
    );
    let kc = kube::config::Kubeconfig::read_from(&fleet.kubeconfig).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
        kube::Api::all(kube::Client::try_from(cfg).expect("client"));
    let kubectl = kube::api::PatchParams {
        field_manager: Some("kubectl".into()),
        ..Default::default()
    };
    for unschedulable in [Value::Null, Value::Bool(true)] {
        let patch = serde_json::json!({"spec": {"unschedulable": unschedulable}});
        nodes
            .patch("node-a", &kubectl, &kube::api::Patch::Strategic(&patch))
            .await
            .expect("kubectl uncordon / cordon");
    }
    let a = tokio::task::block_in_place(|| fleet.reboot_stopped("node-a"));
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(30), "rotation done", || {
            (fleet.maintenance("node-a")["state"] == "done").then_some(())
        })
    });
    // Any replay (the managedFields already decide, so there may be none) found no history.
    let replays: Vec<_> = fleet
        .api
        .requests()
        .into_iter()
        .filter(|r| r.query.contains("timeoutSeconds=10") && r.query.contains("watch=true"))
        .collect();
    assert!(
        replays.iter().all(|r| r.watch_error == Some(410)),
        "the return's replay was not answered 410: {replays:?}"
    );
    let node = fleet.api.node("node-a").unwrap();
    assert!(
        fleet.cordoned("node-a"),
        "the return uncordoned node-a, cordoned by an operator (kubectl) while no agent ran: \
         managedFields {}",
        node["metadata"]["managedFields"]
    );
    drop(a);
}

/// Fallback of #20-l: on a server that keeps no managedFields, the cordon's owner is unknown and
/// the return goes by `cordoned-at` and the replay as before: a rotation with no one else's
/// cordon still ends uncordoned.
#[tokio::test(flavor = "multi_thread")]
async fn without_managed_fields_the_return_still_uncordons_its_own_cordon() {
    let fleet = Fleet::builder().without_managed_fields().start(&["node-a"]);
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
    assert!(
        fleet.api.node("node-a").unwrap()["metadata"]["managedFields"].is_null(),
        "this server keeps no managedFields"
    );
    let a = tokio::task::block_in_place(|| fleet.reboot(a, "node-a"));
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(30), "rotation done", || {
            (fleet.maintenance("node-a")["state"] == "done").then_some(())
        })
    });
    assert!(
        !fleet.cordoned("node-a"),
        "the return left node-a cordoned though nodekeeper cordoned it and no one else touched it"
    );
    drop(a);
}

/// Attack ("a later drain supersedes the return", "status shows only what is true now"): the
/// return, on finding a drain running on the node, returns from its step (`Running => return
/// Ok`). node-a is back from its reboot, `returning` (Node not Ready yet), when an
/// orchestrator's plain drain runs on it and completes; then the Node turns Ready. Held: the
/// record does not stay `returning` (the rotation is recorded as superseded).
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_finished_during_returning_ends_the_returning_record() {
    let fleet = Fleet::new(&["node-a"]);
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
    let mut later = request("later");
    later.node_name = "node-a".into();
    let events = within(60, drain_all(&mut client(&a).await, later)).await;
    assert!(completed(&events), "{:?}", events.last());
    fleet.set_ready("node-a", "True");
    // The return re-reads the Node every poll; give it well over that to notice.
    let settled = tokio::task::block_in_place(|| {
        poll(Duration::from_secs(15), || {
            (fleet.maintenance("node-a")["state"] != "returning").then_some(())
        })
    });
    assert!(
        settled.is_some(),
        "node-a's rotation still says `returning` 15 s after drain `later` completed on it \
         and the Node turned Ready: {} (drain {})",
        fleet.maintenance("node-a"),
        fleet.api.node("node-a").unwrap()["metadata"]["annotations"]["nodekeeper.io/drain"]
    );
    assert_eq!(
        fleet.maintenance("node-a")["state"],
        "failed",
        "the later drain superseded the rotation"
    );
    assert!(
        fleet.cordoned("node-a"),
        "the return uncordoned node-a after drain `later` superseded it"
    );
    drop(a);
}

/// Attack (slot held from cordon to return, across restarts): node-a is back from its reboot
/// and `returning` (Node not Ready), its slot taken back unmarked-in-memory (`reclaim(None)`),
/// when its agent is killed -9 and stays down far past the 2 s lease. node-b's rotation must
/// keep waiting: node-a is still cordoned. Held: the renewals of the reclaimed guard never
/// remove the Lease's return-by mark, so the slot does not expire.
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_returning_keeps_the_slot_past_its_lease() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let a = fleet.agent("node-a");
    let b = fleet.agent("node-b");
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
    // Let a few renewals of the reclaimed guard land, then kill it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill(a);
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    // Observation window: three lease durations; node-b must stay uncordoned throughout.
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < deadline {
        assert!(
            !fleet.cordoned("node-b"),
            "node-b cordoned while node-a (cordoned, returning, agent down) holds the slot: {}",
            fleet.api.get(Res::Leases, LOCK_NS, SLOT).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    // node-a's agent comes back, the Node turns Ready: the return finishes and node-b goes.
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    fleet.set_ready("node-a", "True");
    let events = within(60, drain_b).await.expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    assert!(!fleet.cordoned("node-a"));
    drop((a, b));
}

/// Attack ("never leave a slot held forever", config rollout mid-rotation): with `slots: 2`
/// node-a's rotation takes `slot-1` (slot-0 is node-z's, out for its own reboot) and awaits its
/// reboot. Meanwhile the operator lowers `slots` to 1 (a config rollout restarts the agents).
/// The agent that starts after the reboot looks only at slots `0..1`: it does not find slot-1,
/// goes on "without one", completes the return and never releases slot-1, which is marked and
/// so never expires. slot-1 stays held by node-a forever, with node-a back in service.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_lowering_slots_mid_rotation_leaves_the_slot_held_forever() {
    let fleet = Fleet::new(&["node-a"]);
    fleet
        .hold_slot_for("nodekeeper-drain-slot-0", "node-z")
        .await;
    let agent = |slots: u32| fleet.agent_with("node-a", AgentOpts::default().slots(slots));
    let a = agent(2);
    let events = within(
        60,
        drain_all(&mut client(&a).await, rotation_request("rot-a", "node-a")),
    )
    .await;
    assert!(completed(&events), "{:?}", events.last());
    assert_eq!(
        fleet.slot_holder("nodekeeper-drain-slot-1").as_deref(),
        Some("node-a")
    );
    kill(a);
    std::fs::write(fleet.boot_id_path("node-a"), "boot-2\n").expect("boot id");
    let a = tokio::task::block_in_place(|| agent(1));
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(30), "rotation done", || {
            (fleet.maintenance("node-a")["state"] == "done").then_some(())
        })
    });
    assert!(!fleet.cordoned("node-a"), "node-a is back in service");
    let freed = tokio::task::block_in_place(|| {
        poll(Duration::from_secs(10), || {
            fleet
                .slot_holder("nodekeeper-drain-slot-1")
                .is_none()
                .then_some(())
        })
    });
    assert!(
        freed.is_some(),
        "node-a is back and uncordoned, yet still holds slot-1 (marked: it never expires): {}",
        fleet
            .api
            .get(Res::Leases, LOCK_NS, "nodekeeper-drain-slot-1")
            .unwrap()
    );
    drop(a);
}

/// node-a's rotation drained; node-a's agent is down for the reboot (killed, boot ID changed).
async fn node_a_rebooting(fleet: &Fleet) {
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
    std::fs::write(fleet.boot_id_path("node-a"), "boot-2\n").expect("boot id");
}

/// Attack (slot Lease edited by hand, huge values): while node-a is down for its reboot, a person
/// extends its return-by on the slot Lease (the overdue Event tells them the Lease is where the
/// slot lives) with a value that does not parse as u64 unix seconds: a date, or a number past
/// u64. `return_by` then reads "no mark" and the slot is an ordinary 2 s lease that nobody
/// renews: node-b takes it and cordons while node-a is still cordoned, out for its reboot.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_an_unparsable_return_by_frees_the_slot_during_the_reboot() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let b = fleet.agent("node-b");
    node_a_rebooting(&fleet).await;
    fleet.api.edit(Res::Leases, LOCK_NS, SLOT, |l| {
        l["metadata"]["annotations"]["nodekeeper.io/return-by"] =
            Value::String("99999999999999999999".into());
    });
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    node_b_stays_uncordoned(&fleet, 6, "return-by edited to a huge value").await;
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    drain_b.abort();
    drop(b);
}

/// Attack (409 storm on the return PATCH): node-a is back from its reboot and every Node PATCH
/// answers 409 for a while (the guarded return writes and the drain engine's). The slot must
/// stay node-a's throughout (node-b waits, never cordons) and, once the storm ends, the return
/// finishes and frees it: node-b's rotation then completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_409_storm_on_the_return_patch_neither_frees_nor_keeps_the_slot() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let b = fleet.agent("node-b");
    node_a_rebooting(&fleet).await;
    fleet
        .api
        .inject(Fault::on("PATCH", "/api/v1/nodes/node-a", FaultKind::Conflict).always());
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    node_b_stays_uncordoned(&fleet, 6, "node-a's return PATCHes all conflict").await;
    assert!(fleet.cordoned("node-a"));
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    fleet.api.clear_faults();
    let events = within(90, drain_b).await.expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    assert_eq!(fleet.maintenance("node-a")["state"], "done");
    assert!(!fleet.cordoned("node-a"));
    drop((a, b));
}

/// Attack (`slots: 2` with three nodes): all three nodes start a rotation at once. At most two
/// may ever be cordoned: the third waits while the first two await their reboots (well past the
/// 2 s lease, nobody renewing), and goes once one of them is back. Held.
#[tokio::test(flavor = "multi_thread")]
async fn slots_2_with_three_nodes_never_cordons_three() {
    let nodes = ["node-a", "node-b", "node-c"];
    let fleet = Fleet::new(&nodes);
    let agent = |node: &str| fleet.agent_with(node, AgentOpts::default().slots(2));
    let mut agents: Vec<Option<Agent>> = nodes.iter().map(|n| Some(agent(n))).collect();
    let mut drains = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = client(agents[i].as_ref().unwrap()).await;
        let req = rotation_request(&format!("rot-{node}"), node);
        drains.push(Some(tokio::spawn(
            async move { drain_all(&mut c, req).await },
        )));
    }
    let cordoned = |fleet: &Fleet| nodes.iter().filter(|n| fleet.cordoned(n)).count();
    // Two rotations complete (their nodes await the reboot); watch the count all along.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut done = Vec::new();
    while done.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "two rotations done");
        assert!(cordoned(&fleet) <= 2, "three nodes cordoned with slots: 2");
        for (i, d) in drains.iter_mut().enumerate() {
            if d.as_ref().is_some_and(|d| d.is_finished()) {
                let events = d.take().unwrap().await.expect("drain task");
                assert!(completed(&events), "{:?}", events.last());
                done.push(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both down for their reboots; the third keeps waiting well past the lease.
    for &i in &done {
        kill(agents[i].take().unwrap());
    }
    let waiting = (0..3).find(|i| !done.contains(i)).unwrap();
    let window = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < window {
        assert!(
            !fleet.cordoned(nodes[waiting]),
            "{} cordoned while {} and {} await their reboots with slots: 2",
            nodes[waiting],
            nodes[done[0]],
            nodes[done[1]]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The first one is back: the third goes, still never three cordoned.
    let back = done[0];
    std::fs::write(fleet.boot_id_path(nodes[back]), "boot-2\n").expect("boot id");
    agents[back] = Some(agent(nodes[back]));
    let third = drains[waiting].take().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !third.is_finished() {
        assert!(std::time::Instant::now() < deadline, "third rotation done");
        assert!(cordoned(&fleet) <= 2, "three nodes cordoned with slots: 2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = third.await.expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    assert_eq!(fleet.maintenance(nodes[back])["state"], "done");
    drop(agents);
}

/// Attack (Node deleted and recreated, "a replaced node frees its slot"): node-a is back from its
/// reboot and `returning` (Node not Ready) when its Node object is deleted and registered again
/// (a new UID, no annotations, schedulable: the kubelet re-registering after the cloud's node
/// controller removed it). The replacement check runs only when the return starts; the return
/// then reads no record and stops, while the slot it took back stays in memory and is renewed
/// for the agent's lifetime: held long after the node is back in service.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_node_recreated_while_returning_keeps_the_slot_for_the_agents_lifetime() {
    let fleet = Fleet::new(&["node-a"]);
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
    let old_uid = fleet.api.node("node-a").unwrap()["metadata"]["uid"].clone();
    fleet.api.delete_node("node-a");
    fleet.api.add_node("node-a", &[]);
    let new_uid = fleet.api.node("node-a").unwrap()["metadata"]["uid"].clone();
    assert_ne!(old_uid, new_uid, "a new Node object");
    assert!(!fleet.cordoned("node-a"));
    let freed = tokio::task::block_in_place(|| {
        poll(Duration::from_secs(15), || {
            fleet.holder().is_none().then_some(())
        })
    });
    assert!(
        freed.is_some(),
        "node-a (a new, schedulable Node) still holds the slot 15 s after it was re-registered: {}",
        fleet.api.get(Res::Leases, LOCK_NS, SLOT).unwrap()
    );
    drop(a);
}

/// Attack (slot Lease edited by hand, as the MaintenanceOverdue Event says: "clear the Lease's
/// holderIdentity to free it"): node-a never came back; the operator clears the holder and
/// leaves the annotations. node-b takes the slot, and the take keeps node-a's return-by and
/// holder-uid marks (`next = lease.clone()`). node-b's drain is held up by a budget when its
/// agent restarts: the restart's replaced-node check sees a mark with another UID than node-b's
/// and frees node-b's slot mid-drain (holder cleared: leaseTransitions 1 -> 2 as node-b's
/// resumed drain takes it again). For that moment the slot is free while node-b is cordoned: a
/// waiting node-c that polls then takes it and cordons (two nodes with `slots: 1`); here the
/// free itself is asserted, which does not depend on who wins that race.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_slot_taken_after_a_hand_cleared_holder_inherits_the_old_mark() {
    let fleet = Fleet::new(&["node-b"]);
    fleet
        .create_slot(
            SLOT,
            "",
            &[
                ("nodekeeper.io/return-by", "1796000000"),
                (
                    "nodekeeper.io/holder-uid",
                    "uid-of-node-a-that-never-came-back",
                ),
            ],
        )
        .await;
    fleet.pin("node-b");
    let b = fleet.agent("node-b");
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    tokio::task::block_in_place(|| fleet.wait_evicting("node-b"));
    let transitions = |fleet: &Fleet| {
        fleet.api.get(Res::Leases, LOCK_NS, SLOT).unwrap()["spec"]["leaseTransitions"].clone()
    };
    assert_eq!(fleet.holder().as_deref(), Some("node-b"));
    let before = transitions(&fleet);
    // node-b's agent restarts (a config rollout) mid-drain; node-b stays cordoned throughout.
    drain_b.abort();
    kill(b);
    let b = tokio::task::block_in_place(|| fleet.agent("node-b"));
    // Observation window: the restarted agent's start-up checks and the resumed drain.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(fleet.cordoned("node-b"));
    assert_eq!(
        transitions(&fleet),
        before,
        "node-b's slot changed hands across its agent's restart mid-drain (freed, then taken \
         again): {}",
        fleet.api.get(Res::Leases, LOCK_NS, SLOT).unwrap()
    );
    drop(b);
}

/// Attack ("the slot is held from cordon to return, across agent restarts"): node-b's rotation
/// is mid-drain (cordoned, a budget holds one pod) when its agent dies and takes longer than the
/// lease to come back (a crash loop's back-off, an image pull after a rollout: the default lease
/// is 30 s). The rotation's slot is unmarked until `awaiting-reboot`, so it expires like a plain
/// drain's (docs/operations.md says so for plain drains): node-c's rotation takes it and cordons
/// while node-b is still cordoned, two nodes out with `slots: 1`.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_an_agent_down_mid_rotation_drain_past_the_lease_frees_the_slot() {
    let fleet = Fleet::new(&["node-b", "node-c"]);
    fleet.pin("node-b");
    let b = fleet.agent("node-b");
    let c = fleet.agent("node-c");
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    tokio::task::block_in_place(|| fleet.wait_evicting("node-b"));
    drain_b.abort();
    kill(b);
    let mut cc = client(&c).await;
    let drain_c =
        tokio::spawn(async move { drain_all(&mut cc, rotation_request("rot-c", "node-c")).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < deadline {
        assert!(
            !(fleet.cordoned("node-b") && fleet.cordoned("node-c")),
            "node-b (mid-rotation, agent down) and node-c both cordoned with slots: 1; slot {}",
            fleet.api.get(Res::Leases, LOCK_NS, SLOT).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drain_c.abort();
    drop(c);
}

/// Attack (operator uncordon during `awaiting-reboot`): the operator puts node-a back in service
/// by hand before its reboot. The slot stays node-a's (node-b waits: the reboot is still to
/// come), and after the reboot the return records `done`, leaves node-a schedulable and frees
/// the slot: node-b's rotation completes. Held.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_uncordon_while_awaiting_reboot_keeps_the_slot_until_the_return() {
    let fleet = Fleet::new(&["node-a", "node-b"]);
    let b = fleet.agent("node-b");
    let a = fleet.agent("node-a");
    let events = within(
        60,
        drain_all(&mut client(&a).await, rotation_request("rot-a", "node-a")),
    )
    .await;
    assert!(completed(&events), "{:?}", events.last());
    fleet.api.edit(Res::Nodes, "", "node-a", |n| {
        n["spec"]["unschedulable"] = Value::Bool(false);
    });
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    node_b_stays_uncordoned(
        &fleet,
        4,
        "node-a uncordoned by hand, its reboot still to come",
    )
    .await;
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    let a = tokio::task::block_in_place(|| fleet.reboot(a, "node-a"));
    let events = within(60, drain_b).await.expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    assert_eq!(fleet.maintenance("node-a")["state"], "done");
    assert!(!fleet.cordoned("node-a"));
    drop((a, b));
}
