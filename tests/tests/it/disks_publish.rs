//! Local PVs against the fake Kubernetes API, with real loop devices prepared by the agent:
//! the PV field by field, idempotent across restarts, Released -> wiped -> Available again, a PV
//! deleted by hand -> the disk wiped before it is published again, PVs of an earlier node
//! incarnation and of vanished disks. Root only; loops are the test's own and detached on drop.

use std::path::Path;
use std::time::Duration;

use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::loopdev::LoopDevice;
use nodekeeper_tests::{Agent, require_root, require_tool, wait_for};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const LOOP_BYTES: u64 = 64 << 20;

fn can_run() -> bool {
    require_root()
        && require_tool("losetup")
        && require_tool("mkfs.ext4")
        && require_tool("wipefs")
        && require_tool("findmnt")
}

struct Scene {
    api: FakeApi,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    disk: LoopDevice,
}

impl Scene {
    fn new() -> Scene {
        let api = FakeApi::start();
        api.add_node(NODE, &[]);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let disk = LoopDevice::attach(&dir.path().join("disk.img"), LOOP_BYTES);
        Scene {
            api,
            dir,
            kubeconfig,
            disk,
        }
    }

    fn config(&self) -> String {
        format!(
            "metrics:\n  enabled: false\ndisks:\n  enabled: true\n  interval: 1s\n  devices: [{}]\n  minSizeBytes: 1048576\n  discoveryDir: {}\n  hostMountNamespace: false\n  storageClassName: fast-local\n",
            self.disk.name,
            self.mnt().display()
        )
    }

    fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }

    fn mount(&self) -> std::path::PathBuf {
        self.mnt().join(&self.disk.name)
    }

    fn agent(&self) -> Agent {
        self.agent_with("")
    }

    /// The agent with `extra` lines appended to the `disks:` section.
    fn agent_with(&self, extra: &str) -> Agent {
        Agent::builder()
            .config(&format!("{}{extra}", self.config()))
            .connected(&self.kubeconfig, NODE)
            .state_dir(&self.dir.path().join("state"))
            .start()
    }

    fn pv_name(&self) -> String {
        format!("nk-{NODE}-{}", self.disk.name)
    }

    fn wait_pv(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(Duration::from_secs(20), what, || {
            self.api.pv(&self.pv_name()).filter(|pv| pred(pv))
        })
    }
}

fn write_file(dir: &Path) {
    std::fs::write(dir.join("tenant-data"), b"secret of the last tenant").unwrap();
}

#[test]
fn a_prepared_disk_is_published_once_with_every_field_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let agent = s.agent();
    let pv = s.wait_pv("PV published", |_| true);
    let spec = &pv["spec"];
    assert_eq!(spec["capacity"]["storage"], LOOP_BYTES.to_string());
    assert_eq!(spec["volumeMode"], "Filesystem");
    assert_eq!(spec["persistentVolumeReclaimPolicy"], "Delete");
    assert_eq!(spec["storageClassName"], "fast-local");
    assert_eq!(spec["accessModes"], json!(["ReadWriteOnce"]));
    assert_eq!(spec["local"]["path"], s.mount().display().to_string());
    let term = &spec["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0];
    assert_eq!(
        (term["key"].as_str(), term["operator"].as_str()),
        (Some("kubernetes.io/hostname"), Some("In"))
    );
    assert_eq!(term["values"], json!([NODE]));
    assert_eq!(pv["metadata"]["labels"]["nodekeeper.io/node"], NODE);
    let node_uid = s.api.node(NODE).unwrap()["metadata"]["uid"].clone();
    assert_eq!(
        pv["metadata"]["annotations"]["nodekeeper.io/node-uid"],
        node_uid
    );
    assert_eq!(
        pv["metadata"]["annotations"]["nodekeeper.io/disk"],
        s.disk.name
    );

    // GetNode shows the disk, its decision and where it is mounted.
    let node = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = nodekeeper::pb::node_agent_client::NodeAgentClient::connect(agent.grpc_url())
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            c.get_node(nodekeeper::pb::GetNodeRequest {}),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
    });
    let disk = node
        .disks
        .iter()
        .find(|d| d.name == s.disk.name)
        .expect("the loop is listed in GetNode");
    assert!(
        disk.decision == "ours" || disk.decision == "candidate",
        "{disk:?}"
    );
    assert_eq!(disk.path, s.mount().display().to_string());
    assert_eq!(disk.size_bytes, LOOP_BYTES);

    // Idempotent: passes and a restart change nothing.
    let rv = pv["metadata"]["resourceVersion"].clone();
    std::thread::sleep(Duration::from_secs(2));
    drop(agent);
    let _again = s.agent();
    std::thread::sleep(Duration::from_secs(3));
    let pv = s.api.pv(&s.pv_name()).unwrap();
    assert_eq!(
        pv["metadata"]["resourceVersion"], rv,
        "the PV was rewritten"
    );
    assert_eq!(s.api.pvs().len(), 1);
}

#[test]
fn a_released_pv_is_wiped_then_published_again_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let _agent = s.agent();
    let first = s.wait_pv("PV published", |_| true);
    write_file(&s.mount());
    s.api
        .set_pv_phase(&s.pv_name(), "Bound", Some(("shop", "data-0")));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        s.mount().join("tenant-data").exists(),
        "a bound disk is never wiped"
    );
    s.api
        .set_pv_phase(&s.pv_name(), "Released", Some(("shop", "data-0")));
    let uid = first["metadata"]["uid"].clone();
    let second = s.wait_pv("PV recreated", |pv| pv["metadata"]["uid"] != uid);
    assert!(
        !s.mount().join("tenant-data").exists(),
        "the last tenant's data survived the reclaim"
    );
    assert!(
        second["spec"]["claimRef"].is_null(),
        "the new PV is Available: {second}"
    );
    // The reclaim's new UUID is what the disks task sees on its next passes (one owner of
    // ownership state, #14): the disk stays ours, so its PV is not deleted as "disk gone".
    std::thread::sleep(Duration::from_secs(4));
    let third = s
        .api
        .pv(&s.pv_name())
        .expect("the PV survives later passes");
    assert_eq!(third["metadata"]["uid"], second["metadata"]["uid"]);
    let owned: Value = serde_json::from_str(
        &std::fs::read_to_string(s.dir.path().join("state/disks/owned.json")).unwrap(),
    )
    .unwrap();
    let on_disk = std::process::Command::new("blkid")
        .args(["-p", "-s", "UUID", "-o", "value"])
        .arg(&s.disk.path)
        .output()
        .unwrap();
    assert_eq!(
        owned["disks"][&s.disk.name]["uuid"],
        String::from_utf8_lossy(&on_disk.stdout).trim(),
        "owned.json lost the reclaim's UUID"
    );
}

#[test]
fn a_pv_deleted_by_hand_is_not_republished_over_old_data_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let _agent = s.agent();
    let first = s.wait_pv("PV published", |_| true);
    write_file(&s.mount());
    s.api.delete_pv(&s.pv_name());
    let uid = first["metadata"]["uid"].clone();
    s.wait_pv("PV recreated", |pv| pv["metadata"]["uid"] != uid);
    assert!(
        !s.mount().join("tenant-data").exists(),
        "republished over the old tenant's data"
    );
}

fn foreign_pv(name: &str, node_uid: &str, disk: &str, bound: bool) -> Value {
    let mut pv = json!({
        "metadata": {"name": name, "labels": {"nodekeeper.io/node": NODE},
                     "annotations": {"nodekeeper.io/node-uid": node_uid, "nodekeeper.io/disk": disk}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "local": {"path": "/mnt/x"},
                 "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "fast-local"},
        "status": {"phase": if bound { "Bound" } else { "Available" }},
    });
    if bound {
        pv["spec"]["claimRef"] = json!({"namespace": "db", "name": "data-db-0"});
    }
    pv
}

#[test]
fn pvs_of_an_earlier_incarnation_or_a_vanished_disk_are_deleted_if_free_and_flagged_if_bound_as_root()
 {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    s.api.add_pv(foreign_pv(
        "nk-old-free",
        "uid-of-the-old-node",
        "nvme-old-1",
        false,
    ));
    s.api.add_pv(foreign_pv(
        "nk-old-bound",
        "uid-of-the-old-node",
        "nvme-old-2",
        true,
    ));
    let node_uid = s.api.node(NODE).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    s.api
        .add_pv(foreign_pv("nk-gone-bound", &node_uid, "nvme-gone", true));
    let _agent = s.agent();
    s.wait_pv("own PV published", |_| true);
    wait_for(Duration::from_secs(20), "free old PV deleted", || {
        s.api.pv("nk-old-free").is_none().then_some(())
    });
    assert!(s.api.pv("nk-old-bound").is_some(), "a bound PV was deleted");
    assert!(
        s.api.pv("nk-gone-bound").is_some(),
        "a bound PV was deleted"
    );
    let warnings = wait_for(Duration::from_secs(20), "two orphan warnings", || {
        let w: Vec<String> = s
            .api
            .events()
            .iter()
            .filter(|e| e["reason"] == "LocalPVOrphaned")
            .filter_map(|e| e["message"].as_str().map(String::from))
            .collect();
        (w.len() == 2).then_some(w)
    });
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("nk-old-bound") && w.contains("earlier incarnation")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("nk-gone-bound") && w.contains("is gone")),
        "{warnings:?}"
    );
}

/// sha256 of every byte of the loop (its page cache dropped first).
fn sha256(dev: &LoopDevice) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "blockdev --flushbufs {0} && sha256sum {0}",
            dev.path.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Block mode on a loop (no by-id link, so no identity that can prove the disk is the one
/// published): the Released PV's owed wipe is dropped, not executed; counted in
/// `nodekeeper_disks_wipes_refused_total{reason="identity"}` (promtool-clean), reported once
/// as a `LocalDiskWipeRefused` Event; the PV is deleted and never published again over the
/// tenant's bytes, which stay as they were.
#[test]
fn a_dropped_wipe_is_counted_by_reason_reported_and_never_executed_as_root() {
    if !can_run() || !require_tool("promtool") {
        return;
    }
    let s = Scene::new();
    let agent = s.agent_with("  mode: block\n");
    let first = s.wait_pv("block PV published", |pv| {
        pv["spec"]["volumeMode"] == "Block"
    });
    let status = std::process::Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=1M",
            "count=4",
            "seek=8",
            "conv=notrunc",
            "status=none",
        ])
        .arg(format!("of={}", s.disk.path.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let before = sha256(&s.disk);
    s.api
        .set_pv_phase(&s.pv_name(), "Released", Some(("shop", "data-0")));
    let event = wait_for(Duration::from_secs(20), "LocalDiskWipeRefused", || {
        s.api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "LocalDiskWipeRefused")
    });
    let message = event["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&s.disk.name) && message.contains("(identity)"),
        "{event:#}"
    );
    wait_for(Duration::from_secs(20), "the Released PV deleted", || {
        s.api
            .pv(&s.pv_name())
            .is_none_or(|pv| pv["metadata"]["uid"] != first["metadata"]["uid"])
            .then_some(())
    });
    let text = wait_for(Duration::from_secs(10), "the refusal counted", || {
        let text = agent.metrics_text();
        text.lines()
            .any(|l| l.starts_with("nodekeeper_disks_wipes_refused_total{reason=\"identity\"} "))
            .then_some(text)
    });
    assert!(
        !text.contains("nodekeeper_disks_wipes_refused_total{reason=\"not_ours\"}"),
        "{text}"
    );
    nodekeeper_tests::assert_promtool_clean(&text);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        s.api.pv(&s.pv_name()).is_none(),
        "published again without a wipe"
    );
    assert_eq!(sha256(&s.disk), before, "the dropped wipe wrote the disk");
    assert_eq!(
        s.api
            .events()
            .iter()
            .filter(|e| e["reason"] == "LocalDiskWipeRefused")
            .count(),
        1,
        "one Event per disk and reason"
    );
}

/// The publisher follows this node's PVs with a label-selected watch into a reflector store
/// (#14): the watch's first sync is the only LIST; the passes after it (interval 1 s) cost none,
/// and every PV list or watch names this node's label.
#[test]
fn passes_after_the_first_sync_cost_no_list_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let _agent = s.agent();
    s.wait_pv("PV published", |_| true);
    std::thread::sleep(Duration::from_secs(6));
    let reqs = s.api.requests();
    let pv_gets: Vec<_> = reqs
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/persistentvolumes")
        .collect();
    let lists = pv_gets
        .iter()
        .filter(|r| !r.query.contains("watch=true") && !r.query.contains("watch=1"))
        .count();
    assert_eq!(
        lists, 1,
        "one LIST (the watch's first sync), not one per pass: {pv_gets:#?}"
    );
    assert!(
        pv_gets.len() > lists,
        "the PVs are followed by a watch: {pv_gets:#?}"
    );
    assert!(
        pv_gets
            .iter()
            .all(|r| r.query.contains("labelSelector=nodekeeper.io") && r.query.contains(NODE)),
        "every PV request is narrowed to this node's label: {pv_gets:#?}"
    );
}

/// Adversary (#14): a second PV of this node naming the disk of a Bound PV (left over, or made
/// by hand) goes Released: the agent wipes the disk the Bound PV's tenant still has data on.
/// Nothing checks that the disk is not covered by another, Bound PV before the wipe.
#[test]
fn adversary_a_released_duplicate_pv_wipes_the_disk_of_a_bound_pv_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let agent = s.agent();
    s.wait_pv("PV published", |_| true);
    write_file(&s.mount());
    s.api
        .set_pv_phase(&s.pv_name(), "Bound", Some(("shop", "data-0")));
    std::thread::sleep(Duration::from_secs(2));
    let node_uid = s.api.node(NODE).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    s.api
        .add_pv(foreign_pv("nk-dup", &node_uid, &s.disk.name, false));
    s.api
        .set_pv_phase("nk-dup", "Released", Some(("old", "claim-0")));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        s.api.pv(&s.pv_name()).unwrap()["status"]["phase"],
        "Bound",
        "the tenant's PV is still Bound"
    );
    assert!(
        s.mount().join("tenant-data").exists(),
        "the disk of a Bound PV was wiped because another PV naming it was Released"
    );
    assert_wipe_refused(&s, &agent, "another_pv");
}

/// The refused wipe is reported: a `LocalDiskWipeRefused` Event naming the disk and `reason`,
/// and `nodekeeper_disks_wipes_refused_total{reason}` counted.
fn assert_wipe_refused(s: &Scene, agent: &Agent, reason: &str) {
    let event = wait_for(Duration::from_secs(10), "LocalDiskWipeRefused", || {
        s.api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "LocalDiskWipeRefused")
    });
    let message = event["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&s.disk.name) && message.contains(&format!("({reason})")),
        "{event:#}"
    );
    let series = format!("nodekeeper_disks_wipes_refused_total{{reason=\"{reason}\"}} ");
    wait_for(Duration::from_secs(10), "the refusal counted", || {
        agent
            .metrics_text()
            .lines()
            .any(|l| l.starts_with(&series))
            .then_some(())
    });
}

/// Adversary (#14): an owed wipe (its first attempt failed: the filesystem was busy) is executed
/// on a later pass without looking at the PV again. Meanwhile the admin made the Released PV
/// Available again and a new claim bound it and wrote data: the owed wipe destroys that data.
#[test]
fn adversary_an_owed_wipe_runs_after_its_pv_was_bound_again_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let agent = s.agent();
    s.wait_pv("PV published", |_| true);
    write_file(&s.mount());
    s.api
        .set_pv_phase(&s.pv_name(), "Bound", Some(("shop", "data-0")));
    std::thread::sleep(Duration::from_secs(2));
    // A process still has a file open on the disk: the reclaim's umount fails (EBUSY), the
    // wipe stays owed.
    let busy = std::fs::File::open(s.mount().join("tenant-data")).unwrap();
    s.api
        .set_pv_phase(&s.pv_name(), "Released", Some(("shop", "data-0")));
    let published = s.dir.path().join("state/disks/published.json");
    wait_for(Duration::from_secs(20), "the wipe owed", || {
        std::fs::read_to_string(&published)
            .ok()
            .filter(|t| t.contains("wipePending") && t.contains(&format!("\"{}\"", s.disk.name)))
            .and_then(|t| {
                let v: Value = serde_json::from_str(&t).ok()?;
                (!v["wipePending"].as_array()?.is_empty()).then_some(())
            })
    });
    assert!(s.mount().join("tenant-data").exists(), "nothing wiped yet");
    // The admin recovers the PV (claimRef cleared, bound to a new claim); the new tenant writes.
    s.api
        .set_pv_phase(&s.pv_name(), "Bound", Some(("shop", "data-1")));
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(s.mount().join("new-tenant"), b"the new tenant's data").unwrap();
    drop(busy);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(s.api.pv(&s.pv_name()).unwrap()["status"]["phase"], "Bound");
    assert!(
        s.mount().join("new-tenant").exists(),
        "the disk of a Bound PV was wiped by a wipe owed from its earlier Released phase"
    );
    assert_wipe_refused(&s, &agent, "rebound");
    let published: Value =
        serde_json::from_str(&std::fs::read_to_string(&published).unwrap()).unwrap();
    assert!(
        published["wipePending"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "the refused wipe is dropped, not owed for ever: {published:#}"
    );
}

// === state files that cannot be trusted (#14) ===

fn readyz(agent: &Agent) -> String {
    nodekeeper_tests::http_get(agent.metrics, "/readyz")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// Replaces `path` atomically with `bytes` (a temp file renamed over it, so a symlink in its
/// place is replaced, not written through): how an operator restores a state file.
fn restore(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("restore");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// What a crash, a full disk or a hand edit leaves in a state file's place, and a symlink to a
/// well-formed copy (not a record the agent wrote).
fn spoil(path: &Path, good: &[u8], how: &str) {
    let _ = std::fs::remove_file(path);
    match how {
        "empty" => std::fs::write(path, b"").unwrap(),
        "truncated" => std::fs::write(path, &good[..good.len() / 2]).unwrap(),
        "garbage" => std::fs::write(path, b"\x00\xffnot json at all{{").unwrap(),
        "symlink" => {
            let copy = path.with_extension("copy");
            std::fs::write(&copy, good).unwrap();
            std::os::unix::fs::symlink(&copy, path).unwrap();
        }
        _ => unreachable!("{how}"),
    }
}

fn wait_series(agent: &Agent, series: &str) {
    wait_for(Duration::from_secs(20), series, || {
        agent
            .metrics_text()
            .lines()
            .any(|l| l.starts_with(series))
            .then_some(())
    });
}

/// owned.json spoiled four ways while the agent runs: each one makes the disks capability
/// DEGRADED (`nodekeeper_disks_state_unreadable{file="owned.json"} 1`, one
/// `LocalDiskStateUnreadable` Event), the agent keeps serving (/metrics, the other
/// capabilities ready), and it recovers once the file is restored. While it is spoiled a
/// Released PV is neither wiped nor deleted, the spoiled bytes are never replaced; once
/// restored, the held-back wipe runs and the disk is published again.
#[test]
fn an_untrusted_owned_json_stops_every_wipe_and_publish_until_it_is_fixed_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let agent = s.agent();
    let first = s.wait_pv("PV published", |_| true);
    write_file(&s.mount());
    s.api
        .set_pv_phase(&s.pv_name(), "Bound", Some(("shop", "data-0")));
    let owned = s.dir.path().join("state/disks/owned.json");
    let good = std::fs::read(&owned).unwrap();
    for how in ["empty", "truncated", "garbage", "symlink"] {
        spoil(&owned, &good, how);
        let body = wait_for(Duration::from_secs(20), "disks DEGRADED", || {
            let body = readyz(&agent);
            body.contains("disks: HEALTH_STATE_DEGRADED")
                .then_some(body)
        });
        assert!(
            body.trim_start_matches("not ready: ")
                .split("; ")
                .all(|c| c.trim().starts_with("disks")),
            "{how}: only the disks capabilities are not ready: {body}"
        );
        wait_series(
            &agent,
            "nodekeeper_disks_state_unreadable{file=\"owned.json\"} 1",
        );
        restore(&owned, &good);
        wait_for(Duration::from_secs(20), "disks SERVING again", || {
            (!readyz(&agent).contains("disks")).then_some(())
        });
        wait_series(
            &agent,
            "nodekeeper_disks_state_unreadable{file=\"owned.json\"} 0",
        );
    }
    let event = wait_for(Duration::from_secs(20), "LocalDiskStateUnreadable", || {
        s.api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "LocalDiskStateUnreadable")
    });
    assert!(
        event["message"]
            .as_str()
            .unwrap_or_default()
            .contains("owned.json"),
        "{event:#}"
    );

    // Spoiled, and the tenant's PV is Released: nothing is wiped, nothing deleted.
    spoil(&owned, &good, "truncated");
    let spoiled = std::fs::read(&owned).unwrap();
    wait_for(Duration::from_secs(20), "publisher DEGRADED", || {
        readyz(&agent)
            .contains("disks-publisher: HEALTH_STATE_DEGRADED")
            .then_some(())
    });
    s.api
        .set_pv_phase(&s.pv_name(), "Released", Some(("shop", "data-0")));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        s.mount().join("tenant-data").exists(),
        "wiped while owned.json could not be trusted"
    );
    assert_eq!(
        s.api.pv(&s.pv_name()).unwrap()["metadata"]["uid"],
        first["metadata"]["uid"],
        "the Released PV was deleted while owned.json could not be trusted"
    );
    assert_eq!(
        std::fs::read(&owned).unwrap(),
        spoiled,
        "the spoiled file was replaced"
    );
    restore(&owned, &good);
    let uid = first["metadata"]["uid"].clone();
    s.wait_pv("PV recreated", |pv| pv["metadata"]["uid"] != uid);
    assert!(
        !s.mount().join("tenant-data").exists(),
        "the held-back wipe never ran"
    );
}

/// published.json (which disks owe a wipe before they are published again) truncated while
/// the agent was down, and the tenant's PV deleted by hand meanwhile: read as empty, the disk
/// would be published again over the tenant's file. The publisher stays DEGRADED
/// (`nodekeeper_disks_state_unreadable{file="published.json"} 1`, a `LocalDiskStateUnreadable`
/// Event), publishes nothing and leaves the file as it is; restored, it wipes, then publishes.
#[test]
fn an_untrusted_published_json_never_publishes_over_old_data_and_recovers_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    {
        let _agent = s.agent();
        s.wait_pv("PV published", |_| true);
        write_file(&s.mount());
    }
    s.api.delete_pv(&s.pv_name());
    let published = s.dir.path().join("state/disks/published.json");
    let good = std::fs::read(&published).unwrap();
    for how in ["garbage", "symlink", "empty", "truncated"] {
        spoil(&published, &good, how);
        let agent = Agent::builder()
            .config(&s.config())
            .connected(&s.kubeconfig, NODE)
            .state_dir(&s.dir.path().join("state"))
            .live_only()
            .start();
        wait_for(Duration::from_secs(20), "publisher DEGRADED", || {
            readyz(&agent)
                .contains("disks-publisher: HEALTH_STATE_DEGRADED")
                .then_some(())
        });
        wait_series(
            &agent,
            "nodekeeper_disks_state_unreadable{file=\"published.json\"} 1",
        );
        std::thread::sleep(Duration::from_secs(3));
        assert!(s.api.pv(&s.pv_name()).is_none(), "{how}: published again");
        assert!(
            s.mount().join("tenant-data").exists(),
            "{how}: wiped on an untrusted record"
        );
        if how == "truncated" {
            let spoiled = std::fs::read(&published).unwrap();
            assert_eq!(spoiled, &good[..good.len() / 2], "the file was replaced");
            restore(&published, &good);
            s.wait_pv("PV recreated", |_| true);
            assert!(
                !s.mount().join("tenant-data").exists(),
                "published again over the old tenant's data"
            );
            wait_for(Duration::from_secs(20), "publisher SERVING", || {
                (!readyz(&agent).contains("disks-publisher")).then_some(())
            });
        }
    }
    let events: Vec<Value> = s
        .api
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "LocalDiskStateUnreadable")
        .collect();
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("published.json"))),
        "{events:#?}"
    );
}

// === PV names that collide (#14) ===

/// Two disks whose ids differ only where a PV name cannot (`nk-test-A_1`, `nk-test-a-1`: the
/// same `nk-node-a-nk-test-a-1` once DNS-safe), block mode (by-id identity, so a wipe would
/// zero the whole device). The second disk's create gets 409: it is reported
/// (`LocalDiskPVNameCollision` Event naming both, `nodekeeper_disks_pv_name_collisions 1`,
/// publisher DEGRADED) and never recorded as published. Then the PV (the first disk's) is
/// deleted by hand: the first disk is wiped before anything is published again, and the
/// second disk, whose PV never existed, is never wiped because of it.
#[test]
fn colliding_pv_names_are_reported_and_never_wipe_the_other_disk_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let second = LoopDevice::attach(&s.dir.path().join("second.img"), LOOP_BYTES);
    // Loops have no by-id links: a temp /dev whose by-id names collide once DNS-safe.
    let dev = s.dir.path().join("dev");
    std::fs::create_dir_all(dev.join("disk/by-id")).unwrap();
    for (l, id) in [(&s.disk, "nk-test-A_1"), (&second, "nk-test-a-1")] {
        std::os::unix::fs::symlink(&l.path, dev.join(&l.name)).unwrap();
        std::os::unix::fs::symlink(
            format!("../../{}", l.name),
            dev.join(format!("disk/by-id/{id}")),
        )
        .unwrap();
    }
    let config = format!(
        "metrics:\n  enabled: false\nhostPaths:\n  dev: {}\ndisks:\n  enabled: true\n  interval: 1s\n  mode: block\n  devices: [{}, {}]\n  minSizeBytes: 1048576\n  discoveryDir: {}\n  hostMountNamespace: false\n",
        dev.display(),
        s.disk.name,
        second.name,
        s.mnt().display()
    );
    let agent = Agent::builder()
        .config(&config)
        .connected(&s.kubeconfig, NODE)
        .state_dir(&s.dir.path().join("state"))
        .live_only()
        .start();
    let name = format!("nk-{NODE}-nk-test-a-1");
    let first = wait_for(Duration::from_secs(20), "the PV", || s.api.pv(&name));
    let owner = first["metadata"]["annotations"]["nodekeeper.io/disk"]
        .as_str()
        .unwrap()
        .to_string();
    let (owner_dev, other_dev, other) = if owner == "nk-test-A_1" {
        (&s.disk, &second, "nk-test-a-1")
    } else {
        (&second, &s.disk, "nk-test-A_1")
    };
    let event = wait_for(Duration::from_secs(20), "LocalDiskPVNameCollision", || {
        s.api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "LocalDiskPVNameCollision")
    });
    let message = event["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(other) && message.contains(&owner) && message.contains(&name),
        "{event:#}"
    );
    wait_series(&agent, "nodekeeper_disks_pv_name_collisions 1");
    wait_for(Duration::from_secs(20), "publisher DEGRADED", || {
        readyz(&agent)
            .contains("disks-publisher: HEALTH_STATE_DEGRADED")
            .then_some(())
    });
    let published: Value = serde_json::from_str(
        &std::fs::read_to_string(s.dir.path().join("state/disks/published.json")).unwrap(),
    )
    .unwrap();
    assert!(
        published["pvs"].get(other).is_none(),
        "the colliding disk is recorded as published: {published:#}"
    );

    // Both disks carry bytes a wipe would zero; the owner's PV is deleted by hand.
    for d in [owner_dev, other_dev] {
        let status = std::process::Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=1M",
                "count=4",
                "seek=8",
                "conv=notrunc",
                "status=none",
            ])
            .arg(format!("of={}", d.path.display()))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let other_before = sha256(other_dev);
    s.api.delete_pv(&name);
    let uid = first["metadata"]["uid"].clone();
    wait_for(Duration::from_secs(30), "a PV published again", || {
        s.api.pv(&name).filter(|pv| pv["metadata"]["uid"] != uid)
    });
    wait_for(Duration::from_secs(20), "the owner wiped", || {
        (nonzero_mib(owner_dev) == 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        sha256(other_dev),
        other_before,
        "the disk whose id collides was wiped for the other disk's PV"
    );
    assert_eq!(s.api.pvs().len(), 1, "{:#?}", s.api.pvs());
}

/// MiB blocks of the device holding any non-zero byte.
fn nonzero_mib(dev: &LoopDevice) -> usize {
    use std::io::Read;
    let _ = std::process::Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&dev.path)
        .status();
    let mut f = std::fs::File::open(&dev.path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut count = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return count;
        }
        count += usize::from(buf[..n].iter().any(|&b| b != 0));
    }
}

// === kill -9 mid-reclaim (#14) ===

/// The agent killed (-9, with its mkfs) in the middle of reclaiming a Released PV's disk: the
/// first and last MiB zeroed (our marker gone with them), mkfs started, the tenant's file
/// still in the middle of the disk. The restarted agent cannot prove the disk is ours any more
/// (no marker; the rest is data), so it leaves it alone as documented: the owed wipe is dropped
/// and reported (`LocalDiskWipeRefused`, `not_ours`), not one byte written, the Released PV
/// deleted and no PV ever published for the half-wiped disk (nothing published twice).
#[test]
fn an_agent_killed_mid_reclaim_never_publishes_the_half_wiped_disk_as_root() {
    if !can_run() {
        return;
    }
    let s = Scene::new();
    let bin = s.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v mkfs.ext4"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let (armed, pid, ready) = (
        s.dir.path().join("armed"),
        s.dir.path().join("mkfs.pid"),
        s.dir.path().join("mkfs.ready"),
    );
    // Once armed, mkfs (the reclaim's) records its pid, says so and waits to be killed.
    std::fs::write(
        bin.join("mkfs.ext4"),
        format!(
            "#!/bin/sh\nif [ -e {armed} ]; then echo $$ > {pid}; touch {ready}; exec sleep 600; fi\nexec {real} \"$@\"\n",
            armed = armed.display(),
            pid = pid.display(),
            ready = ready.display(),
            real = real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("mkfs.ext4"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let agent = Agent::builder()
        .config(&s.config())
        .connected(&s.kubeconfig, NODE)
        .state_dir(&s.dir.path().join("state"))
        .env("PATH", path)
        .start();
    s.wait_pv("PV published", |_| true);
    std::fs::write(s.mount().join("tenant-data"), vec![0x5a; 4 << 20]).unwrap();
    s.api
        .set_pv_phase(&s.pv_name(), "Bound", Some(("shop", "data-0")));
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&armed, b"").unwrap();
    s.api
        .set_pv_phase(&s.pv_name(), "Released", Some(("shop", "data-0")));
    wait_for(Duration::from_secs(30), "the reclaim's mkfs", || {
        ready.exists().then_some(())
    });
    agent.proc.signal("KILL");
    drop(agent);
    let mkfs = std::fs::read_to_string(&pid).unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", mkfs.trim()])
            .status()
            .unwrap()
            .success()
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(s.dir.path().join("state/disks/published.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["wipePending"],
        json!([s.disk.name]),
        "the wipe is owed across the kill: {state:#}"
    );
    let before = sha256(&s.disk);

    let agent = s.agent();
    assert_wipe_refused(&s, &agent, "not_ours");
    wait_for(Duration::from_secs(20), "the Released PV deleted", || {
        s.api.pv(&s.pv_name()).is_none().then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        s.api.pvs().is_empty(),
        "published again: {:#?}",
        s.api.pvs()
    );
    assert_eq!(sha256(&s.disk), before, "the half-wiped disk was written");
}
