//! Local disks: find NVMe/SSD disks, never touch one that holds data, prepare them (mkfs and
//! mount, raw block, or RAID0) and publish each as a local PersistentVolume; wipe and republish
//! on release.
//!
//! Flow (one-way): `discover` (sysfs, by-id links, mountinfo: what exists and what is in use)
//! -> `inspect` (signatures on the device itself, cross-checked with blkid/wipefs) -> decision
//! per disk -> `prepare` (only for `Decision::Candidate` and `Decision::Ours`) -> `publish`
//! (PVs, connected mode) -> `reclaim`.
//!
//! The safety rule: any partition table, filesystem, RAID, LVM, LUKS or ZFS signature makes a
//! disk "not ours" and it is never written, unless its by-id path is in `disks.allowWipe` AND an
//! operator runs `nodekeeper disks wipe --confirm BY_ID`. Ownership is proven by a marker on the
//! disk itself (our filesystem label / UUID recorded in the state dir), never by the state dir
//! alone.

pub mod claim;
pub mod discover;
pub mod inspect;
pub mod marker;
pub mod prepare;
pub mod publish;
pub mod report;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigDuration;

/// Where prepared filesystems are mounted (host path), one directory per disk by-id name.
pub const DEFAULT_DISCOVERY_DIR: &str = "/mnt/nodekeeper/disks";
/// EC2 instance store NVMe and GCE local NVMe SSD models, as the kernel reports them.
pub const DEFAULT_MODEL_PATTERNS: &[&str] = &[
    "Amazon EC2 NVMe Instance Storage*",
    "nvme_card*",
    "EphemeralDisk*",
];
pub const CAPABILITY: &str = "disks";
/// Two independent probes (ours and util-linux's) must both call a disk blank: a bug in either
/// cannot alone get a disk with data formatted.
pub const DEFAULT_CROSS_CHECK: bool = true;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PrepareMode {
    /// mkfs + mount each disk; publish Filesystem PVs.
    #[default]
    Filesystem,
    /// Publish each raw device as a Block PV.
    Block,
    /// Stripe all selected disks into one md RAID0, mkfs + mount it; one Filesystem PV.
    Raid0,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FsType {
    #[default]
    Ext4,
    Xfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum WipeMode {
    /// Re-create the filesystem (fast; old data unreadable through the filesystem).
    #[default]
    Quick,
    /// blkdiscard the whole device when it supports discard, else fall back to zero.
    Discard,
    /// Overwrite the first and last `zeroMiB` MiB (signatures, superblocks, GPT backup).
    Zero,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DisksConfig {
    pub enabled: bool,
    /// Device model globs (sysfs `device/model`) that make a disk a candidate.
    pub model_patterns: Vec<String>,
    /// `/dev/disk/by-id/*` globs that make a disk a candidate.
    pub by_id_globs: Vec<String>,
    /// Kernel device names (e.g. `nvme1n1`, `loop7`) that are candidates regardless of model.
    pub devices: Vec<String>,
    /// Smaller disks are never candidates (bytes).
    pub min_size_bytes: u64,
    /// Kernel names, by-id paths or globs that are never candidates.
    pub exclude: Vec<String>,
    /// By-id paths that `nodekeeper disks wipe --confirm` may wipe despite a signature.
    pub allow_wipe: Vec<String>,
    pub mode: PrepareMode,
    pub fs_type: FsType,
    pub mkfs_options: Vec<String>,
    pub mount_options: Vec<String>,
    /// Host directory holding one mount point per prepared disk.
    pub discovery_dir: PathBuf,
    /// Enter PID 1's mount namespace (through HostPaths.proc) for mkfs/mount, as a pod must so
    /// the mounts are visible to the kubelet. Off when the agent already runs in the host's.
    pub host_mount_namespace: bool,
    pub storage_class_name: String,
    pub wipe_mode: WipeMode,
    pub zero_mib: u64,
    /// Rescan interval (new disks, vanished disks, released PVs).
    pub interval: ConfigDuration,
    /// Cross-check our own signature probes with util-linux `blkid -p` and `wipefs -n` when
    /// they are installed (their findings are added, never subtracted).
    pub cross_check: bool,
}

impl Default for DisksConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            model_patterns: DEFAULT_MODEL_PATTERNS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            by_id_globs: Vec::new(),
            devices: Vec::new(),
            min_size_bytes: 1 << 30,
            exclude: Vec::new(),
            allow_wipe: Vec::new(),
            mode: PrepareMode::Filesystem,
            fs_type: FsType::Ext4,
            mkfs_options: Vec::new(),
            mount_options: vec!["nodiscard".into(), "noatime".into()],
            discovery_dir: PathBuf::from(DEFAULT_DISCOVERY_DIR),
            host_mount_namespace: true,
            storage_class_name: "nodekeeper-local".into(),
            wipe_mode: WipeMode::Quick,
            zero_mib: 16,
            interval: ConfigDuration(std::time::Duration::from_secs(30)),
            cross_check: DEFAULT_CROSS_CHECK,
        }
    }
}

/// A block device as discovered, before inspection.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Kernel name: `nvme1n1`, `loop7`.
    pub name: String,
    /// `/dev/<name>` under HostPaths.dev.
    pub dev_path: PathBuf,
    /// The most specific stable `/dev/disk/by-id/*` link, when there is one.
    pub by_id: Option<String>,
    /// Every whole-device `/dev/disk/by-id/*` link, most preferred first (selection and
    /// exclusion match any of them).
    pub by_id_links: Vec<String>,
    pub model: String,
    pub serial: String,
    pub size_bytes: u64,
    pub rotational: bool,
    pub logical_block_size: u64,
    pub physical_block_size: u64,
    /// Partitions the kernel knows (`nvme1n1p1`...).
    pub partitions: Vec<String>,
    /// Devices stacked on it (`/sys/block/X/holders`: md, dm/LVM).
    pub holders: Vec<String>,
    /// Mount points of the device or its partitions (host mountinfo).
    pub mounts: Vec<String>,
    /// It (or a partition) holds `/`.
    pub backs_root: bool,
}

/// Why a disk is or is not used, as `nodekeeper disks list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", content = "reason", rename_all = "kebab-case")]
pub enum Decision {
    /// Selected and blank: will be prepared.
    Candidate,
    /// Carries our marker: re-mounted, never re-formatted.
    Ours,
    /// Not selected by config (model, by-id, name, size), or excluded.
    NotSelected(String),
    /// In use: mounted, has holders, has partitions, backs `/`.
    InUse(String),
    /// Holds a signature (data): never written.
    HasData(String),
}

impl DisksConfig {
    /// Config-only problems as (field, problem).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.discovery_dir.is_absolute() {
            out.push((
                "disks.discoveryDir".into(),
                format!(
                    "{:?} is not an absolute path",
                    self.discovery_dir.display().to_string()
                ),
            ));
        }
        for (i, p) in self.allow_wipe.iter().enumerate() {
            if !p.starts_with("/dev/disk/by-id/") || p.contains('*') {
                out.push((format!("disks.allowWipe[{i}]"), format!("{p:?} must be an exact /dev/disk/by-id/ path (no globs: wiping is explicit)")));
            }
        }
        // The force flags would remove mkfs.xfs's refusal of a device with a signature, the
        // label and UUID flags our ownership marker (#14).
        for (i, o) in self.mkfs_options.iter().enumerate() {
            let flag = o.split('=').next().unwrap_or_default();
            let uuid_opt = o.contains("uuid=");
            if ["-f", "-F", "-L", "-U", "--force"].contains(&flag)
                || o.starts_with("-L")
                || o.starts_with("-U")
                || uuid_opt
            {
                out.push((
                    format!("disks.mkfsOptions[{i}]"),
                    format!("{o:?} is refused: force, label and UUID flags are the agent's (its safety net and ownership marker)"),
                ));
            }
        }
        for (i, d) in self.devices.iter().enumerate() {
            if d.contains('/') || d.is_empty() {
                out.push((
                    format!("disks.devices[{i}]"),
                    format!("{d:?} must be a kernel device name like nvme1n1"),
                ));
            }
        }
        // A device both selected and excluded by name is a contradiction worth refusing.
        for (i, d) in self.devices.iter().enumerate() {
            if self.exclude.iter().any(|e| e == d) {
                out.push((
                    format!("disks.devices[{i}]"),
                    format!("{d:?} is also in disks.exclude"),
                ));
            }
        }
        if self.interval.get() < std::time::Duration::from_secs(1) {
            out.push((
                "disks.interval".into(),
                format!("{} is below 1s", self.interval),
            ));
        }
        if self.wipe_mode == WipeMode::Zero && self.zero_mib == 0 {
            out.push((
                "disks.zeroMib".into(),
                "must be at least 1 with wipeMode: zero".into(),
            ));
        }
        if self.storage_class_name.is_empty() {
            out.push(("disks.storageClassName".into(), "must not be empty".into()));
        }
        out
    }
}

#[cfg(test)]
mod mkfs_options_tests {
    use super::*;

    #[test]
    fn mkfs_force_label_and_uuid_flags_are_refused_naming_the_field() {
        let cfg = DisksConfig {
            mkfs_options: [
                "-m0",
                "-F",
                "-f",
                "-Lmine",
                "-U",
                "-m",
                "uuid=1234",
                "-E",
                "lazy_itable_init=1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ..DisksConfig::default()
        };
        let fields: Vec<String> = cfg.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "disks.mkfsOptions[1]",
                "disks.mkfsOptions[2]",
                "disks.mkfsOptions[3]",
                "disks.mkfsOptions[4]",
                "disks.mkfsOptions[6]",
            ]
        );
    }
}
