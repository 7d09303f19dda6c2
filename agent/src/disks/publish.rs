//! Publishing prepared disks as local PersistentVolumes, and the pure rules of reclaim.
//!
//! One PV per prepared disk: a stable DNS-safe name from node + disk, the real capacity,
//! `local.path`, node affinity on `kubernetes.io/hostname`, reclaim policy Delete, and labels and
//! annotations that tie it to this node's incarnation (node UID) and the disk (by-id, serial).
//! Never edits or deletes a Bound PV.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume,
    PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::PrepareMode;

pub const LABEL_NODE: &str = "nodekeeper.io/node";
pub const LABEL_MODEL: &str = "nodekeeper.io/disk-model";
pub const LABEL_SERIAL: &str = "nodekeeper.io/disk-serial";
pub const ANNOTATION_NODE_UID: &str = "nodekeeper.io/node-uid";
pub const ANNOTATION_DISK: &str = "nodekeeper.io/disk";

/// What the publisher needs to know about a prepared disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedDisk {
    /// Stable identity: the by-id name, else the kernel name.
    pub id: String,
    pub model: String,
    pub serial: String,
    pub size_bytes: u64,
    pub mode: PrepareMode,
    /// Mount point (filesystem, raid0) or device path (block), as the host sees it.
    pub path: String,
}

/// `[a-z0-9-]` only, dashes collapsed, trimmed.
fn dns_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out.trim_matches('-').to_string()
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A stable, DNS-safe PV name of at most 63 characters: `nk-<node>-<disk>`, shortened with a
/// hash of the full pair when too long, so two disks never collide after truncation.
pub fn pv_name(node: &str, disk_id: &str) -> String {
    let full = format!("nk-{}-{}", dns_safe(node), dns_safe(disk_id));
    if full.len() <= 63 {
        return full;
    }
    let hash = format!(
        "{:012x}",
        fnv(&format!("{node}\0{disk_id}")) & 0xffff_ffff_ffff
    );
    let keep = 63 - hash.len() - 1;
    format!("{}-{hash}", full[..keep].trim_end_matches('-'))
}

/// A label value: at most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(s: &str) -> String {
    let v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    v.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

pub fn build_pv(
    node: &str,
    node_uid: &str,
    storage_class: &str,
    disk: &PublishedDisk,
) -> PersistentVolume {
    let mut pv = PersistentVolume::default();
    pv.metadata.name = Some(pv_name(node, &disk.id));
    pv.metadata.labels = Some(BTreeMap::from([
        (LABEL_NODE.to_string(), label_value(node)),
        (LABEL_MODEL.to_string(), label_value(&disk.model)),
        (LABEL_SERIAL.to_string(), label_value(&disk.serial)),
    ]));
    pv.metadata.annotations = Some(BTreeMap::from([
        (ANNOTATION_NODE_UID.to_string(), node_uid.to_string()),
        (ANNOTATION_DISK.to_string(), disk.id.clone()),
    ]));
    pv.spec = Some(PersistentVolumeSpec {
        capacity: Some(BTreeMap::from([(
            "storage".to_string(),
            Quantity(disk.size_bytes.to_string()),
        )])),
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        persistent_volume_reclaim_policy: Some("Delete".into()),
        storage_class_name: Some(storage_class.to_string()),
        volume_mode: Some(
            if disk.mode == PrepareMode::Block {
                "Block"
            } else {
                "Filesystem"
            }
            .into(),
        ),
        local: Some(LocalVolumeSource {
            path: disk.path.clone(),
            fs_type: None,
        }),
        node_affinity: Some(VolumeNodeAffinity {
            required: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "kubernetes.io/hostname".into(),
                        operator: "In".into(),
                        values: Some(vec![node.to_string()]),
                    }]),
                    match_fields: None,
                }],
            }),
        }),
        ..Default::default()
    });
    pv
}

/// What to do with an existing PV of this node, by the rules of issue 5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PvAction {
    /// Matches a prepared disk and this node incarnation: nothing to do.
    Keep,
    /// Released by its claim: wipe the disk, then delete and recreate the PV Available.
    Reclaim { disk: String },
    /// Available but its disk is gone, or it belongs to an earlier incarnation of the node.
    Delete { why: String },
    /// Bound, but its disk is gone or it is from an earlier incarnation: a Warning Event, never a delete.
    Warn { why: String },
}

/// Decides about one of this node's PVs given the disks prepared now and the node's UID.
pub fn classify(pv: &PersistentVolume, node_uid: &str, prepared: &[PublishedDisk]) -> PvAction {
    let annotations = pv.metadata.annotations.clone().unwrap_or_default();
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let bound = phase == "Bound"
        || pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .is_some()
            && phase != "Released";
    let disk = annotations
        .get(ANNOTATION_DISK)
        .cloned()
        .unwrap_or_default();
    if annotations
        .get(ANNOTATION_NODE_UID)
        .is_some_and(|u| u != node_uid)
    {
        let why = format!(
            "PV from an earlier incarnation of this node (node UID {})",
            annotations[ANNOTATION_NODE_UID]
        );
        return if bound {
            PvAction::Warn { why }
        } else {
            PvAction::Delete { why }
        };
    }
    if !prepared.iter().any(|d| d.id == disk) {
        let why = format!("disk {disk} is gone");
        return if bound {
            PvAction::Warn { why }
        } else {
            PvAction::Delete { why }
        };
    }
    if phase == "Released" {
        return PvAction::Reclaim { disk };
    }
    PvAction::Keep
}

/// The disk a PV names (`nodekeeper.io/disk`).
fn disk_of(pv: &PersistentVolume) -> Option<String> {
    pv.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_DISK)
        .cloned()
}

/// `nodekeeper_disks_wipes_refused_total` reason: the PV whose release decided the wipe is
/// no longer Released (the admin made it Available again and a claim bound it).
pub const REFUSED_REBOUND: &str = "rebound";
/// `nodekeeper_disks_wipes_refused_total` reason: another PV of this node names the same disk
/// and is not Released (a duplicate, or a PV recreated by hand): its tenant's data is there.
pub const REFUSED_ANOTHER_PV: &str = "another_pv";

fn phase_of(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

/// The API-side rule every wipe passes right before it runs (#14), on a fresh LIST of this
/// node's PVs (never the watch's cache): the PV whose release decided the wipe (`released_uid`,
/// none when the wipe was decided because the disk's PV vanished) is still Released or gone,
/// and no other PV naming `disk` is anything but Released.
pub fn wipe_allowed(
    disk: &str,
    released_uid: Option<&str>,
    fresh: &[PersistentVolume],
) -> Result<(), super::prepare::WipeRefused> {
    let names_disk = |pv: &&PersistentVolume| {
        pv.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_DISK))
            .is_some_and(|d| d == disk)
    };
    let refused = |reason, why: String| super::prepare::WipeRefused { reason, why };
    for pv in fresh.iter().filter(names_disk) {
        let name = pv.metadata.name.as_deref().unwrap_or_default();
        let phase = phase_of(pv);
        if phase == "Released" {
            continue;
        }
        let is_released_one = released_uid.is_some() && pv.metadata.uid.as_deref() == released_uid;
        return Err(if is_released_one {
            refused(
                REFUSED_REBOUND,
                format!(
                    "PV {name} is no longer Released (phase {phase:?}): it may hold a new tenant's data"
                ),
            )
        } else {
            refused(
                REFUSED_ANOTHER_PV,
                format!("PV {name} also names disk {disk} and is not Released (phase {phase:?})"),
            )
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(id: &str) -> PublishedDisk {
        PublishedDisk {
            id: id.into(),
            model: "Amazon EC2 NVMe Instance Storage".into(),
            serial: "AWS1A2B3C4D5E6F7".into(),
            size_bytes: 474_999_996_416,
            mode: PrepareMode::Filesystem,
            path: format!("/mnt/nodekeeper/disks/{id}"),
        }
    }

    #[test]
    fn names_are_stable_dns_safe_and_short() {
        assert_eq!(
            pv_name("ip-10-0-0-1.ec2.internal", "nvme-disk1"),
            "nk-ip-10-0-0-1-ec2-internal-nvme-disk1"
        );
        let long = pv_name(
            "ip-10-0-0-1.ec2.internal",
            "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1A2B3C4D5E6F7",
        );
        assert!(long.len() <= 63, "{long}");
        assert!(
            long.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{long}"
        );
        assert!(!long.ends_with('-') && long.starts_with("nk-"));
        let other = pv_name(
            "ip-10-0-0-1.ec2.internal",
            "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1A2B3C4D5E6F8",
        );
        assert_ne!(long, other, "truncation keeps names distinct");
        assert_eq!(
            long,
            pv_name(
                "ip-10-0-0-1.ec2.internal",
                "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1A2B3C4D5E6F7"
            )
        );
        assert_eq!(pv_name("node-a", "loop7"), "nk-node-a-loop7");
    }

    #[test]
    fn pv_has_capacity_affinity_class_and_identity() {
        let pv = build_pv("node-a", "uid-1", "nodekeeper-local", &disk("nvme-x"));
        let spec = pv.spec.unwrap();
        assert_eq!(spec.capacity.unwrap()["storage"].0, "474999996416");
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.local.unwrap().path, "/mnt/nodekeeper/disks/nvme-x");
        let term = &spec
            .node_affinity
            .unwrap()
            .required
            .unwrap()
            .node_selector_terms[0];
        assert_eq!(
            term.match_expressions.as_ref().unwrap()[0]
                .values
                .as_ref()
                .unwrap(),
            &["node-a"]
        );
        assert_eq!(
            pv.metadata.annotations.unwrap()[ANNOTATION_NODE_UID],
            "uid-1"
        );
        assert_eq!(
            pv.metadata.labels.unwrap()[LABEL_MODEL],
            "Amazon_EC2_NVMe_Instance_Storage"
        );
    }

    fn with_phase(mut pv: PersistentVolume, phase: &str) -> PersistentVolume {
        pv.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        pv
    }

    #[test]
    fn reclaim_rules() {
        let d = disk("nvme-x");
        let pv = build_pv("node-a", "uid-1", "c", &d);
        assert_eq!(
            classify(
                &with_phase(pv.clone(), "Available"),
                "uid-1",
                std::slice::from_ref(&d)
            ),
            PvAction::Keep
        );
        assert_eq!(
            classify(
                &with_phase(pv.clone(), "Released"),
                "uid-1",
                std::slice::from_ref(&d)
            ),
            PvAction::Reclaim {
                disk: "nvme-x".into()
            }
        );
        assert!(matches!(
            classify(&with_phase(pv.clone(), "Available"), "uid-1", &[]),
            PvAction::Delete { .. }
        ));
        assert!(matches!(
            classify(&with_phase(pv.clone(), "Bound"), "uid-1", &[]),
            PvAction::Warn { .. }
        ));
        assert!(matches!(
            classify(
                &with_phase(pv.clone(), "Available"),
                "uid-2",
                std::slice::from_ref(&d)
            ),
            PvAction::Delete { .. }
        ));
        assert!(matches!(
            classify(&with_phase(pv, "Bound"), "uid-2", &[d]),
            PvAction::Warn { .. }
        ));
    }

    fn pv_of(name: &str, uid: &str, disk_id: &str, phase: &str) -> PersistentVolume {
        let mut pv = with_phase(build_pv("node-a", "uid-1", "c", &disk(disk_id)), phase);
        pv.metadata.name = Some(name.into());
        pv.metadata.uid = Some(uid.into());
        pv
    }

    fn reason(r: Result<(), super::super::prepare::WipeRefused>) -> Option<&'static str> {
        r.err().map(|e| e.reason)
    }

    #[test]
    fn a_wipe_needs_its_pv_still_released_or_gone() {
        let released = pv_of("a", "u1", "nvme-x", "Released");
        assert_eq!(
            reason(wipe_allowed("nvme-x", Some("u1"), &[released])),
            None
        );
        assert_eq!(
            reason(wipe_allowed("nvme-x", Some("u1"), &[])),
            None,
            "gone"
        );
        for phase in ["Bound", "Available", "Pending", ""] {
            let again = pv_of("a", "u1", "nvme-x", phase);
            assert_eq!(
                reason(wipe_allowed("nvme-x", Some("u1"), &[again])),
                Some(REFUSED_REBOUND),
                "{phase}"
            );
        }
    }

    #[test]
    fn a_wipe_is_refused_while_another_pv_names_the_disk() {
        let released = pv_of("a", "u1", "nvme-x", "Released");
        let bound = pv_of("b", "u2", "nvme-x", "Bound");
        let other_disk = pv_of("c", "u3", "nvme-y", "Bound");
        let released_dup = pv_of("d", "u4", "nvme-x", "Released");
        assert_eq!(
            reason(wipe_allowed(
                "nvme-x",
                Some("u1"),
                &[released.clone(), bound.clone()]
            )),
            Some(REFUSED_ANOTHER_PV)
        );
        assert_eq!(
            reason(wipe_allowed("nvme-x", None, std::slice::from_ref(&bound))),
            Some(REFUSED_ANOTHER_PV),
            "a vanished PV's wipe, but the disk was published again by hand"
        );
        // Released duplicates and other disks' PVs hold no tenant of this disk.
        assert_eq!(
            reason(wipe_allowed(
                "nvme-x",
                Some("u1"),
                &[released, other_disk, released_dup]
            )),
            None
        );
        assert_eq!(
            reason(wipe_allowed(
                "nvme-x",
                None,
                &[pv_of("e", "u5", "nvme-x", "Available")]
            )),
            Some(REFUSED_ANOTHER_PV)
        );
    }
}

// === the publisher loop (connected mode) ===

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::api::{DeleteParams, PostParams};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::DisksConfig;
use super::prepare::{HostAccess, OWNED_FILE, Reclaimed, SharedDisksStatus};
use crate::host::HostPaths;
use crate::kube::API_CALL_TIMEOUT;
use crate::pb::HealthState;
use crate::runtime::Health;

/// The publisher's health entry.
pub const HEALTH_NAME: &str = "disks-publisher";
/// The `file` label of `nodekeeper_disks_state_unreadable` for `<stateDir>/disks/published.json`.
pub const PUBLISHED_FILE: &str = "published.json";

/// This node's PVs as the watch last saw them.
type PvStore = kube::runtime::reflector::Store<PersistentVolume>;

/// A pass's view of this node's PVs: the watch's store and the UIDs this agent deleted.
struct PvView<'a> {
    store: &'a PvStore,
    deleted: &'a mut HashSet<String>,
}

impl PvView<'_> {
    /// The PVs the watch shows, minus those this agent deleted; forgets a deleted UID once
    /// the watch no longer shows it (the set stays as small as the watch's lag).
    fn current(&mut self) -> Vec<PersistentVolume> {
        let all: Vec<PersistentVolume> = self.store.state().iter().map(|p| (**p).clone()).collect();
        let shown: HashSet<&str> = all
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        self.deleted.retain(|uid| shown.contains(uid.as_str()));
        all.into_iter()
            .filter(|p| {
                p.metadata
                    .uid
                    .as_ref()
                    .is_none_or(|u| !self.deleted.contains(u))
            })
            .collect()
    }
}

/// What the publisher has done, kept in `<stateDir>/disks/published.json` (atomic replace):
/// which disks had a PV, and which disks must be wiped before they are published again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    /// Disk key -> PV name.
    pub pvs: BTreeMap<String, String>,
    /// Disks whose wipe is owed (recorded before wiping, cleared after): a wipe that fails or is
    /// interrupted is retried, never recorded as done.
    pub wipe_pending: BTreeSet<String>,
    /// Owed wipe -> UID of the Released PV that decided it (absent: its PV vanished). Checked
    /// against the API server right before the wipe runs: a PV bound again is never wiped (#14).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wipe_released_pv: BTreeMap<String, String>,
}

impl Published {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("disks/published.json")
    }

    pub fn load(state_dir: &Path) -> std::io::Result<Self> {
        match crate::state_file::read_to_string_no_symlink(&Self::path(state_dir)) {
            Ok(text) => serde_json::from_str(&text).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Records a wipe as owed, with the UID of the Released PV that decided it.
    fn owe_wipe(&mut self, disk: &str, released_uid: Option<&str>) {
        self.wipe_pending.insert(disk.to_string());
        match released_uid {
            Some(uid) => self
                .wipe_released_pv
                .insert(disk.to_string(), uid.to_string()),
            None => self.wipe_released_pv.remove(disk),
        };
    }

    /// A wipe done or dropped: no longer owed.
    fn settle_wipe(&mut self, disk: &str) {
        self.wipe_pending.remove(disk);
        self.wipe_released_pv.remove(disk);
    }

    pub fn persist(&self, state_dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let path = Self::path(state_dir);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let tmp = path.with_extension("tmp");
        let mut f = crate::state_file::create_fresh(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(self)
                .expect("serializes")
                .as_bytes(),
        )?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    }
}

/// Everything the publisher needs, built by the app in connected mode.
pub struct Publisher {
    pub client: kube::Client,
    pub node: String,
    pub node_info: tokio::sync::watch::Receiver<Option<crate::kube::NodeInfo>>,
    pub cfg: DisksConfig,
    pub paths: HostPaths,
    pub state_dir: PathBuf,
    pub status: SharedDisksStatus,
    /// Held while a disk is formatted or wiped, so the prepare pass and a reclaim never race.
    pub disk_ops: Arc<tokio::sync::Mutex<()>>,
    /// The disks capability's metrics (dropped wipes are counted here).
    pub metrics: super::prepare::DisksMetrics,
    /// The publisher's own entry ([`HEALTH_NAME`]): DEGRADED while a state file cannot be
    /// trusted or a disk is left unpublished by a PV name collision.
    pub health: Health,
}

async fn call<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(API_CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out after {API_CALL_TIMEOUT:?}")),
    }
}

impl Publisher {
    fn api(&self) -> kube::Api<PersistentVolume> {
        kube::Api::all(self.client.clone())
    }

    /// Follows this node's PVs (label `nodekeeper.io/node=<node>`) with a watch into a
    /// reflector store: one LIST when the watch starts (and again only when the API server
    /// expires its resourceVersion), never one per pass (#14). Cancelled with `token`.
    fn watch_pvs(&self, token: CancellationToken) -> PvStore {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, reflector, watcher};
        let (reader, writer) = reflector::store();
        let config =
            watcher::Config::default().labels(&format!("{LABEL_NODE}={}", label_value(&self.node)));
        let api = self.api();
        tokio::spawn(async move {
            let stream = watcher(api, config)
                .default_backoff()
                .modify(|pv| pv.metadata.managed_fields = None)
                .reflect(writer)
                .touched_objects();
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    next = stream.next() => match next {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::warn!(error = %e, "PV watch error; retrying with backoff"),
                        None => break,
                    },
                }
            }
        });
        reader
    }

    /// Publishes and reclaims until cancelled, every `disks.interval`.
    pub async fn run(mut self, token: CancellationToken) -> Result<(), crate::runtime::TaskError> {
        let mut warned: HashSet<String> = HashSet::new();
        // published.json says which disks must be wiped before they are published again: one
        // that cannot be trusted is never replaced by an empty record (that would publish over
        // a tenant's data). Nothing is done until it reads; it is retried every interval and
        // left as it is for an operator.
        let mut published = loop {
            match Published::load(&self.state_dir) {
                Ok(p) => break p,
                Err(e) => {
                    let error = format!("{}: {e}", Published::path(&self.state_dir).display());
                    self.state_unreadable(PUBLISHED_FILE, &error, &mut warned)
                        .await;
                }
            }
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.cfg.interval.get()) => {}
            }
        };
        self.metrics.state_unreadable(PUBLISHED_FILE, false);
        let mut lost_seen = 0u64;
        let mut failures_seen = 0u64;
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = self.node_info.wait_for(Option::is_some) => { r?; }
        }
        let pvs = self.watch_pvs(token.child_token());
        // The first pass needs the store synced: deciding on an empty store would republish
        // (and wipe) every disk whose PV it has not seen yet.
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = pvs.wait_until_ready() => {
                if let Err(e) = r {
                    return Err(format!("PV watch ended before its first sync: {e}").into());
                }
            }
        }
        let mut deleted = HashSet::new();
        let mut tick = tokio::time::interval(self.cfg.interval.get());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let seen = (&mut lost_seen, &mut failures_seen);
            let view = PvView {
                store: &pvs,
                deleted: &mut deleted,
            };
            match self.pass(&mut published, &mut warned, seen, view).await {
                Ok(None) => self.health.set(HEALTH_NAME, HealthState::Serving, ""),
                Ok(Some(problem)) => self.health.set(HEALTH_NAME, HealthState::Degraded, problem),
                Err(e) => {
                    tracing::warn!(error = %e, "publishing local PVs failed; retrying next pass")
                }
            }
        }
    }

    async fn pass(
        &self,
        published: &mut Published,
        warned: &mut HashSet<String>,
        (lost_seen, failures_seen): (&mut u64, &mut u64),
        mut view: PvView<'_>,
    ) -> Result<Option<String>, String> {
        let node_uid = self
            .node_info
            .borrow()
            .as_ref()
            .map(|i| i.uid.clone())
            .unwrap_or_default();
        let (prepared, lost, lost_total, passes, failures, failures_total, state_error) = {
            let st = self.status.read().expect("not poisoned");
            (
                st.prepared
                    .iter()
                    .map(|p| p.published())
                    .collect::<Vec<_>>(),
                st.lost.clone(),
                st.lost_total,
                st.passes,
                st.failures.clone(),
                st.failures_total,
                st.state_error.clone(),
            )
        };
        if passes == 0 {
            return Ok(None); // Nothing surveyed yet: deleting PVs of "gone" disks now would be wrong.
        }
        // owned.json cannot be trusted: the disks task's view of what is ours is stale or empty,
        // and every wipe needs it. Nothing is published, deleted or wiped until it reads again.
        if let Some(error) = state_error {
            return Ok(Some(
                self.state_unreadable(OWNED_FILE, &error, warned).await,
            ));
        }
        // A lost disk (blank after EC2 stop/start) is reported, not hidden.
        if lost_total > *lost_seen {
            let new = (lost_total - *lost_seen) as usize;
            for l in lost.iter().rev().take(new) {
                crate::kube::node_event(
                    &self.client,
                    &self.node,
                    "LocalDiskLost",
                    "Warning",
                    &l.message,
                )
                .await;
            }
            *lost_seen = lost_total;
        }
        // A disk that could not be prepared is reported, once per disk and reason (a disk
        // failing the same way every pass is one Event, not one per interval); the other
        // disks were prepared and are published below.
        if failures_total > *failures_seen {
            let new = (failures_total - *failures_seen) as usize;
            for f in failures.iter().rev().take(new).rev() {
                if warned.insert(format!("prepare-failed {} {}", f.key, f.reason)) {
                    crate::kube::node_event(
                        &self.client,
                        &self.node,
                        "LocalDiskPrepareFailed",
                        "Warning",
                        &format!(
                            "disk {} ({}) could not be prepared ({}): {}; it is not published, the node's other disks are",
                            f.key, f.name, f.reason, f.message
                        ),
                    )
                    .await;
                }
            }
            *failures_seen = failures_total;
        }
        // Owed wipes first: nothing is published over old data. One that fails stays owed and
        // the pass goes on (its disk is not published meanwhile); one whose disk is no longer
        // provably ours is dropped and reported, never executed (#14).
        for key in published.wipe_pending.clone() {
            let released_uid = published.wipe_released_pv.get(&key).cloned();
            if self
                .wipe(&key, released_uid.as_deref(), warned)
                .await
                .is_some()
            {
                published.settle_wipe(&key);
                published
                    .persist(&self.state_dir)
                    .map_err(|e| e.to_string())?;
            }
        }
        // The watch's view, minus the PVs this agent already deleted that the watch has not
        // caught up with (handled once, never again: a Released PV's disk is wiped once).
        let pvs = view.current();
        // PV name -> the disk it names: a prepared disk whose name another disk's PV holds is
        // a collision (ids equal once DNS-safe), never "published".
        let holders: HashMap<String, String> = pvs
            .iter()
            .filter_map(|pv| Some((pv.metadata.name.clone()?, disk_of(pv)?)))
            .collect();
        let mut collisions: Vec<String> = Vec::new();
        let mut have: HashSet<String> = HashSet::new();
        for pv in &pvs {
            let name = pv.metadata.name.clone().unwrap_or_default();
            match classify(pv, &node_uid, &prepared) {
                PvAction::Keep => {
                    have.insert(
                        pv.metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(ANNOTATION_DISK).cloned())
                            .unwrap_or_default(),
                    );
                }
                PvAction::Reclaim { disk } => {
                    let uid = pv.metadata.uid.as_deref();
                    published.owe_wipe(&disk, uid);
                    published
                        .persist(&self.state_dir)
                        .map_err(|e| e.to_string())?;
                    let Some(outcome) = self.wipe(&disk, uid, warned).await else {
                        continue; // still owed: retried next pass, the other PVs go on
                    };
                    published.settle_wipe(&disk);
                    // Wiped, or dropped because the disk is no longer provably ours: either
                    // way this Released PV is done, unless the API server says it is not
                    // Released any more (the watch lags): a PV bound again is never deleted.
                    // A dropped disk keeps its `pvs` entry, so it is never published again
                    // without a wipe.
                    if outcome != WipeOutcome::Refused(REFUSED_REBOUND) {
                        self.delete_pv(pv, view.deleted).await?;
                    }
                    if outcome == WipeOutcome::Wiped {
                        published.pvs.remove(&disk);
                    }
                    published
                        .persist(&self.state_dir)
                        .map_err(|e| e.to_string())?;
                    tracing::info!(pv = %name, disk, "released PV reclaimed: disk wiped, PV to be recreated");
                }
                PvAction::Delete { why } => {
                    self.delete_pv(pv, view.deleted).await?;
                    tracing::info!(pv = %name, why, "deleted an available PV");
                }
                PvAction::Warn { why } => {
                    if warned.insert(name.clone()) {
                        crate::kube::node_event(
                            &self.client,
                            &self.node,
                            "LocalPVOrphaned",
                            "Warning",
                            &format!("PV {name} is bound but {why}; left alone"),
                        )
                        .await;
                        tracing::warn!(pv = %name, why, "bound PV left alone");
                    }
                }
            }
        }
        for disk in &prepared {
            if have.contains(&disk.id) || published.wipe_pending.contains(&disk.id) {
                continue;
            }
            let pv_name = build_pv(&self.node, &node_uid, &self.cfg.storage_class_name, disk)
                .metadata
                .name
                .unwrap_or_default();
            if published.pvs.contains_key(&disk.id) {
                // It had a PV. The watch does not show one naming it: ask the API server for
                // that one name (a wipe is never decided on a stale watch).
                let holder = match holders.get(&pv_name) {
                    Some(d) => Some(d.clone()),
                    None => self.disk_named_by(&pv_name).await?,
                };
                if holder.as_deref() == Some(disk.id.as_str()) {
                    // The watch has not caught up with a PV this agent just created: it is there.
                    continue;
                }
                // Gone without being Released (deleted by hand), or its name now held by
                // another disk's PV (a collision, #14): whatever a pod wrote is still there, so
                // wipe before publishing again.
                published.owe_wipe(&disk.id, None);
                published
                    .persist(&self.state_dir)
                    .map_err(|e| e.to_string())?;
                let wiped = self.wipe(&disk.id, None, warned).await;
                if wiped.is_some() {
                    published.settle_wipe(&disk.id);
                    published
                        .persist(&self.state_dir)
                        .map_err(|e| e.to_string())?;
                }
                if wiped != Some(WipeOutcome::Wiped) {
                    continue;
                }
                tracing::warn!(disk = %disk.id, "its PV vanished without being released: wiped before republishing");
            }
            // Its name held by another disk's PV: never published (nor recorded as published).
            if let Some(other) = holders.get(&pv_name).filter(|d| **d != disk.id) {
                let other = other.clone();
                collisions.push(
                    self.name_collision(published, disk, &pv_name, &other, warned)
                        .await?,
                );
                continue;
            }
            let pv = build_pv(&self.node, &node_uid, &self.cfg.storage_class_name, disk);
            let name = pv.metadata.name.clone().unwrap_or_default();
            match tokio::time::timeout(
                API_CALL_TIMEOUT,
                self.api().create(&PostParams::default(), &pv),
            )
            .await
            {
                Ok(Ok(_)) => tracing::info!(pv = %name, disk = %disk.id, "local PV published"),
                Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                    // Taken: by our own PV the watch has not shown yet, or by another disk's.
                    match self.disk_named_by(&name).await? {
                        Some(d) if d == disk.id => {}
                        Some(other) => {
                            collisions.push(
                                self.name_collision(published, disk, &name, &other, warned)
                                    .await?,
                            );
                            continue;
                        }
                        None => continue, // gone again (or not ours to read): next pass
                    }
                }
                Ok(Err(e)) => return Err(format!("POST persistentvolume {name}: {e}")),
                Err(_) => return Err(format!("POST persistentvolume {name}: timed out")),
            }
            published.pvs.insert(disk.id.clone(), name);
            published
                .persist(&self.state_dir)
                .map_err(|e| e.to_string())?;
        }
        self.metrics.pv_name_collisions(collisions.len());
        Ok((!collisions.is_empty()).then(|| collisions.join("; ")))
    }

    /// Reports a state file that cannot be trusted (metric, health detail, log and one Event
    /// per file and error); returns the health detail.
    async fn state_unreadable(
        &self,
        file: &'static str,
        error: &str,
        warned: &mut HashSet<String>,
    ) -> String {
        self.metrics.state_unreadable(file, true);
        let detail = format!(
            "{file} cannot be trusted ({error}): no local PV is published, deleted or wiped \
             until it is fixed; the file is left as it is"
        );
        self.health
            .set(HEALTH_NAME, HealthState::Degraded, detail.clone());
        if warned.insert(format!("state {file} {error}")) {
            tracing::error!(
                file,
                error,
                "disks state file cannot be trusted; publishing and reclaim paused"
            );
            crate::kube::node_event(
                &self.client,
                &self.node,
                "LocalDiskStateUnreadable",
                "Warning",
                &detail,
            )
            .await;
        }
        detail
    }

    /// A prepared disk whose PV name is held by `other`'s PV (their ids are equal once made
    /// DNS-safe): not published, and not recorded as published, so no wipe is ever owed for
    /// it because of `other`'s PV (a hand-deleted PV names `other`, never this disk). Reported
    /// once per disk (Event, log); counted per pass; returns the health detail.
    async fn name_collision(
        &self,
        published: &mut Published,
        disk: &PublishedDisk,
        pv_name: &str,
        other: &str,
        warned: &mut HashSet<String>,
    ) -> Result<String, String> {
        // Reached with a `pvs` entry only right after the disk was wiped (its own PV gone).
        if published.pvs.remove(&disk.id).is_some() {
            published
                .persist(&self.state_dir)
                .map_err(|e| e.to_string())?;
        }
        let detail = format!(
            "disk {} is not published: PV name {pv_name} is held by the PV of disk {other} \
             (their ids are equal once made DNS-safe); exclude one of them (disks.exclude)",
            disk.id
        );
        if warned.insert(format!("collision {} {other}", disk.id)) {
            tracing::error!(disk = %disk.id, other, pv = pv_name, "PV name collision: disk not published");
            crate::kube::node_event(
                &self.client,
                &self.node,
                "LocalDiskPVNameCollision",
                "Warning",
                &detail,
            )
            .await;
        }
        Ok(detail)
    }

    /// Deletes one of this node's PVs (gone already counts as done) and remembers its UID, so a
    /// watch that has not caught up yet never makes the agent act on it twice.
    async fn delete_pv(
        &self,
        pv: &PersistentVolume,
        deleted: &mut HashSet<String>,
    ) -> Result<(), String> {
        let name = pv.metadata.name.clone().unwrap_or_default();
        // Only the PV that was decided on: one recreated under the same name is left alone.
        let params = DeleteParams {
            preconditions: pv.metadata.uid.clone().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match tokio::time::timeout(API_CALL_TIMEOUT, self.api().delete(&name, &params)).await {
            Ok(Ok(_)) => {}
            // Gone already, or replaced by another PV of that name (UID precondition failed).
            Ok(Err(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => {}
            Ok(Err(e)) => return Err(format!("DELETE persistentvolume {name}: {e}")),
            Err(_) => return Err(format!("DELETE persistentvolume {name}: timed out")),
        }
        if let Some(uid) = &pv.metadata.uid {
            deleted.insert(uid.clone());
        }
        Ok(())
    }

    /// The disk the PV `name` names now (None: no such PV): one GET of one object, only before
    /// a wipe decided because a PV is missing from the watch's view (a stale view must never
    /// trigger a wipe).
    async fn disk_named_by(&self, name: &str) -> Result<Option<String>, String> {
        call("GET persistentvolume", self.api().get_opt(name))
            .await
            .map(|pv| pv.as_ref().and_then(disk_of))
    }

    /// A fresh LIST of this node's PVs from the API server (not the watch's cache), for the
    /// check right before a wipe.
    async fn list_fresh(&self) -> Result<Vec<PersistentVolume>, String> {
        let params = kube::api::ListParams::default()
            .labels(&format!("{LABEL_NODE}={}", label_value(&self.node)));
        call("LIST persistentvolumes", self.api().list(&params))
            .await
            .map(|l| l.items)
    }

    /// Wipes a disk per `disks.wipeMode`, holding the disk lock: `Some(Wiped)`,
    /// `Some(Refused(reason))` dropped (a fresh LIST shows the PV that decided the wipe
    /// (`released_uid`) bound again, or another PV naming the disk not Released; or the disk is
    /// no longer provably ours: nothing written; a `LocalDiskWipeRefused` Warning Event on the
    /// Node, once per disk and reason), `None` failed (logged, the wipe stays owed and is
    /// retried next pass).
    async fn wipe(
        &self,
        key: &str,
        released_uid: Option<&str>,
        warned: &mut HashSet<String>,
    ) -> Option<WipeOutcome> {
        let guard = self.disk_ops.lock().await;
        // Asked under the disk lock, right before the wipe: the window for a rebind between
        // this answer and the erase is one API round trip, not a pass interval.
        let fresh = match self.list_fresh().await {
            Ok(pvs) => pvs,
            Err(e) => {
                tracing::warn!(disk = key, error = %e, "cannot confirm the PVs before wiping; retried next pass, not published meanwhile");
                return None;
            }
        };
        if let Err(refused) = wipe_allowed(key, released_uid, &fresh) {
            drop(guard);
            return Some(self.refuse(key, refused, warned).await);
        }
        let (cfg, paths, state_dir, owned_key) = (
            self.cfg.clone(),
            self.paths.clone(),
            self.state_dir.clone(),
            key.to_string(),
        );
        let result = tokio::task::spawn_blocking(move || {
            let host = HostAccess::new(&paths, &cfg);
            super::prepare::reclaim(&cfg, &host, &state_dir, &owned_key).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("wipe task failed: {e}")));
        drop(guard);
        match result {
            Ok(Reclaimed::Wiped) => Some(WipeOutcome::Wiped),
            Ok(Reclaimed::NotOurs(refused)) => Some(self.refuse(key, refused, warned).await),
            Err(e) => {
                tracing::warn!(disk = key, error = %e, "wiping the disk failed; retried next pass, not published meanwhile");
                None
            }
        }
    }

    /// Reports a dropped wipe: counted by reason, logged, one Event per disk and reason.
    async fn refuse(
        &self,
        key: &str,
        refused: super::prepare::WipeRefused,
        warned: &mut HashSet<String>,
    ) -> WipeOutcome {
        self.metrics.wipe_refused(&refused);
        let (reason, why) = (refused.reason, refused.why);
        tracing::warn!(
            reason,
            disk = key,
            why,
            "wipe dropped: the disk or its PV is no longer provably free to erase; nothing written"
        );
        if warned.insert(format!("wipe-refused {key}: {reason}")) {
            crate::kube::node_event(
                &self.client,
                &self.node,
                "LocalDiskWipeRefused",
                "Warning",
                &format!("disk {key} was not wiped ({reason}): {why}; no new PV is published for it without a wipe"),
            )
            .await;
        }
        WipeOutcome::Refused(reason)
    }
}

/// What became of a wipe that ran to a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WipeOutcome {
    Wiped,
    /// Dropped, nothing written; the `nodekeeper_disks_wipes_refused_total` reason.
    Refused(&'static str),
}
