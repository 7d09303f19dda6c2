//! Adversary tests for issue #20, fourth round: attacks on the newest code, the sweep of slots
//! left marked after a rotation (#20-s, `Maintenance::sweep_slots`) and the other frees of a
//! marked slot at agent start. Broke: `#[ignore = "adversary finding: ..."]`; held: a plain
//! passing test. Harness: `crate::support::rotation` (the fake API server, one agent per node, a
//! boot-ID file per node), with the slot's lease duration set per test.

use std::time::Duration;

use nodekeeper_tests::drain_scenario::drain_all;
use nodekeeper_tests::fake_api::{Fault, FaultKind};
use nodekeeper_tests::wait_for;
use serde_json::Value;

use crate::support::rotation::{Fleet, client, completed, never_both_cordoned, rotation_request};

const SLOT_PATH: &str = "/leases/nodekeeper-drain-slot-0";

/// node-a's rotation failed and left its slot marked (its release gave up, or the agent died
/// before it); the slot was last renewed `renewed_offset_secs` from now. node-b's rotation must
/// get the slot once the sweep frees it (one lease duration, 2 s, after the last renewal).
async fn a_left_slot_renewed_at(renewed_offset_secs: i64) {
    let fleet = Fleet::builder().lease_secs(2).start(&["node-a", "node-b"]);
    fleet.record_rotation("node-a", "failed");
    fleet
        .create_marked_slot("node-a", renewed_offset_secs)
        .await;
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    let b = tokio::task::block_in_place(|| fleet.agent("node-b"));
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    let done_b = tokio::time::timeout(Duration::from_secs(30), drain_b).await;
    assert!(
        done_b.is_ok(),
        "node-a's rotation failed and no agent renews its slot, yet node-b's rotation still waits \
         30 s later: the slot stays node-a's: {}",
        fleet.slot_lease()
    );
    let events = done_b.unwrap().expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    assert_eq!(fleet.holder().as_deref(), Some("node-b"));
    drop((a, b));
}

/// Control for the clock-skew attack below: a slot left marked by a failed rotation, last
/// renewed 10 s ago by a clock in step, is freed by the sweep and node-b's rotation gets it.
/// Held.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_left_marked_by_a_failed_rotation_is_freed_for_the_next_node() {
    a_left_slot_renewed_at(-10).await;
}

/// Attack (clock skew on renewTime, "the slot is always released afterwards"): the sweep frees a
/// slot left marked only when `renewTime + leaseDuration` is past by the agent's clock
/// (`lock::renewed_within_lease`). renewTime is written by the node's own clock: a node whose
/// clock ran ahead (an RTC a day off before NTP stepped it, a VM resumed with a wrong clock)
/// renewed its slot "tomorrow". Its rotation then fails and the release gives up (or the agent
/// dies first). The clock is corrected; no guard renews the slot any more, yet the sweep counts
/// it as renewed until tomorrow: node-b's rotation waits a day. (A marked slot never expires, so
/// nobody else frees it either.) Kubernetes' leader election avoids this by timing a lease from
/// when the observer saw its renewTime change, on its own clock, never from renewTime itself.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_a_slot_renewed_by_a_clock_running_ahead_is_held_until_that_time() {
    a_left_slot_renewed_at(24 * 3600).await;
}

/// Attack (the free of a left slot racing the next rotation's claim, "never two nodes draining
/// beyond `slots`"): node-a's rotation is `done` but its slot is still marked (the agent died
/// between recording `done` and releasing). The agent restarts: `free_slot_after_done` at start
/// decides from the Node read at the start of the step (done, no drain running) and then GETs
/// each slot and PUTs it freed, guarded only by the resourceVersion of that later GET. The
/// orchestrator starts node-a's next rotation at once: between the Node read and the slot's GET,
/// rot-2 claims, takes the slot (it is node-a's: reused, marks kept), marks it and cordons
/// node-a. The GET then reads rot-2's slot and the PUT frees it: node-b's rotation takes the
/// slot and cordons node-b while node-a is cordoned and draining. Made deterministic by holding
/// the agent's first GET of the slot (within the window) until rot-2 has cordoned; the lease
/// duration is the default's 30 s so the sweep (#20-s, which checks the renewal) stays out.
#[tokio::test(flavor = "multi_thread")]
async fn adversary_the_free_after_done_at_start_frees_the_next_rotations_slot() {
    let fleet = Fleet::builder().lease_secs(30).start(&["node-a", "node-b"]);
    fleet.pin("node-a");
    fleet.record_rotation("node-a", "done");
    fleet.create_marked_slot("node-a", 0).await;
    // node-a's agent's first read of the slot Leases at start (#20-t: the free at start is the
    // sweep's, which reads the Leases first, then the Node): held until rot-2 has cordoned.
    fleet.api.inject(
        Fault::on(
            "GET",
            "/namespaces/nodekeeper-system/leases",
            FaultKind::Hold,
        )
        .times(1),
    );
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(20), "the slot's GET held", || {
            (fleet.api.held_total() >= 1).then_some(())
        })
    });
    // The next rotation of node-a, at once (the agent's API calls time out after 10 s).
    let mut ca = client(&a).await;
    let drain_a =
        tokio::spawn(async move { drain_all(&mut ca, rotation_request("rot-2", "node-a")).await });
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(7), "rot-2 cordons node-a", || {
            fleet.cordoned("node-a").then_some(())
        })
    });
    fleet.api.release_held();
    tokio::task::block_in_place(|| fleet.wait_evicting("node-a"));
    assert!(fleet.cordoned("node-a"));
    let b = tokio::task::block_in_place(|| fleet.agent("node-b"));
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    never_both_cordoned(&fleet, 15, "node-a's rot-2 is draining").await;
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    drain_a.abort();
    drain_b.abort();
    drop((a, b));
}

/// Attack (the sweep racing the next rotation's claim): node-a's rotation failed and its slot
/// is left marked, unrenewed for longer than its lease. At start the sweep reads the slot,
/// then the Node (`failed`, no drain), and PUTs the slot freed: that PUT is held while the
/// orchestrator starts node-a's next rotation, which takes the slot (a renewal) and cordons.
/// The held PUT, answered late, carries the resourceVersion read before the take: a 409, the
/// slot stays rot-2's and node-b waits. Held.
#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_racing_the_next_rotations_claim_frees_nothing() {
    let fleet = Fleet::builder().lease_secs(2).start(&["node-a", "node-b"]);
    fleet.pin("node-a");
    fleet.record_rotation("node-a", "failed");
    fleet.create_marked_slot("node-a", -60).await;
    fleet
        .api
        .inject(Fault::on("PUT", SLOT_PATH, FaultKind::Hold).times(1));
    let b = tokio::task::block_in_place(|| fleet.agent("node-b"));
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(20), "the sweep's PUT held", || {
            (fleet.api.held_total() >= 1).then_some(())
        })
    });
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    let mut ca = client(&a).await;
    let drain_a =
        tokio::spawn(async move { drain_all(&mut ca, rotation_request("rot-2", "node-a")).await });
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(7), "rot-2 cordons node-a", || {
            fleet.cordoned("node-a").then_some(())
        })
    });
    fleet.api.release_held();
    tokio::task::block_in_place(|| fleet.wait_evicting("node-a"));
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    never_both_cordoned(&fleet, 10, "node-a's rot-2 is draining").await;
    assert_eq!(fleet.holder().as_deref(), Some("node-a"));
    assert!(!fleet.cordoned("node-b"));
    drain_a.abort();
    drain_b.abort();
    drop((a, b));
}

/// Attack (a sweep during an API outage, then recovery, "the slot is always released
/// afterwards"): node-a's rotation failed and left its slot marked and unrenewed; node-a's
/// agent starts while every request on the slot Leases answers 503 for 25 s (long enough for
/// the sweep's back-off to reach its 10 s ceiling). Once the API answers again, the sweep frees
/// the slot within its back-off and a lease duration: node-b's rotation, asked after the
/// outage, completes within 30 s. Held.
#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_frees_a_left_slot_after_an_api_outage_ends() {
    let fleet = Fleet::builder().lease_secs(2).start(&["node-a", "node-b"]);
    fleet.record_rotation("node-a", "failed");
    fleet.create_marked_slot("node-a", -60).await;
    fleet.api.inject(
        Fault::on(
            "",
            "/namespaces/nodekeeper-system/leases",
            FaultKind::Unavailable,
        )
        .always(),
    );
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    let b = tokio::task::block_in_place(|| fleet.agent("node-b"));
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        fleet.holder().as_deref(),
        Some("node-a"),
        "nothing freed yet"
    );
    fleet.api.clear_faults();
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    let done_b = tokio::time::timeout(Duration::from_secs(30), drain_b).await;
    assert!(
        done_b.is_ok(),
        "the API answers again, yet node-b's rotation still waits 30 s later: {}",
        fleet.slot_lease()
    );
    let events = done_b.unwrap().expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    drop((a, b));
}

/// Attack (the boot-ID file unreadable after the reboot, "a reboot is recognised exactly once;
/// uncordoned only by nodekeeper's return"): node-a's rotation drained (boot-1) and the node
/// rebooted, but the new agent cannot read its boot-ID file (a hostPath not mounted yet, a
/// permission change). The return must neither take the reboot for granted nor give the slot
/// up: node-a stays cordoned, its slot held, no `done`; node-b's rotation waits. Once the file
/// reads (boot-2) the return goes on: `done`, uncordoned, node-b gets the slot. Held.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_boot_id_after_the_reboot_keeps_the_slot_until_it_reads() {
    let fleet = Fleet::builder().lease_secs(2).start(&["node-a", "node-b"]);
    let boot_a = fleet.dir.path().join("node-a.boot_id");
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    let b = tokio::task::block_in_place(|| fleet.agent("node-b"));
    let events = tokio::time::timeout(
        Duration::from_secs(60),
        drain_all(&mut client(&a).await, rotation_request("rot-a", "node-a")),
    )
    .await
    .expect("node-a's rotation drain");
    assert!(completed(&events), "{:?}", events.last());
    let mut a = a;
    a.proc.signal("KILL");
    a.proc.wait_exit(Duration::from_secs(5));
    std::fs::remove_file(&boot_a).expect("remove boot id");
    let a = tokio::task::block_in_place(|| fleet.agent("node-a"));
    let mut cb = client(&b).await;
    let drain_b =
        tokio::spawn(async move { drain_all(&mut cb, rotation_request("rot-b", "node-b")).await });
    // Several 2 s leases and sweep periods.
    never_both_cordoned(&fleet, 10, "node-a's boot ID unreadable after its reboot").await;
    assert!(fleet.cordoned("node-a"));
    assert_eq!(
        fleet.holder().as_deref(),
        Some("node-a"),
        "{}",
        fleet.slot_lease()
    );
    let state = |fleet: &Fleet| {
        fleet.api.node("node-a").expect("node")["metadata"]["annotations"]
            ["nodekeeper.io/maintenance"]
            .as_str()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .map(|m| m["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_ne!(state(&fleet), "done");
    std::fs::write(&boot_a, "boot-2\n").expect("boot id");
    let events = tokio::time::timeout(Duration::from_secs(60), drain_b)
        .await
        .expect("node-b's rotation after node-a's return")
        .expect("drain task");
    assert!(completed(&events), "{:?}", events.last());
    assert_eq!(state(&fleet), "done");
    assert!(!fleet.cordoned("node-a"));
    drop((a, b));
}
