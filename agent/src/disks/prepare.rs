//! Preparation: makes `Candidate` disks usable (mkfs + mount, raw block, or md RAID0 + mkfs +
//! mount), re-mounts disks that carry our marker, re-prepares and reports disks the state dir
//! calls ours that came back blank (EC2 stop/start), and wipes a disk on explicit request.
//!
//! Owns: the exec of mkfs/mdadm/mount/wipefs (each under a named timeout, in the host's mount
//! namespace when `disks.hostMountNamespace`), `<stateDir>/disks/owned.json` (through
//! `marker`), the disks capability loop, its metrics and the shared status a PV publisher reads.
//! Must never: write a disk that inspection did not call blank (`Candidate`) unless its on-disk
//! marker proves it ours; re-create a filesystem or array that carries our marker; wipe without
//! the operator's `--confirm` of a by-id path listed in `disks.allowWipe`.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::claim::Claim;
use super::inspect;
use super::marker::{self, OnDisk, OwnedDisk, OwnedStore};
use super::publish::PublishedDisk;
use super::{Decision, Disk, DisksConfig, FsType, PrepareMode, WipeMode};
use crate::host::exec::{self, Exec, ExecError};
use crate::host::mountinfo;
use crate::host::{HostPaths, Namespace, NamespaceError, in_namespace};
use crate::pb::HealthState;
use crate::runtime::Health;

/// mkfs of a multi-TB NVMe: xfs and lazily-initialised ext4 take seconds, but a slow or
/// throttled device (or ext4 options without lazy init) takes minutes. Discard is always off
/// (`-K`, `-E nodiscard`): discarding a whole instance-store disk is what takes tens of minutes.
pub const MKFS_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// mount replays a journal at most; a minute covers a large ext4 after an unclean stop.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// mdadm --create/--assemble writes or reads a 4 KiB superblock per member: seconds.
pub const MDADM_TIMEOUT: Duration = Duration::from_secs(120);
/// wipefs erases a few signature bytes; zeroing 2 MiB per MiB-setting is fast even on HDDs.
pub const WIPE_TIMEOUT: Duration = Duration::from_secs(120);
/// Lost-disk (and failed-disk) reports kept for the publisher's Events; older ones are dropped
/// (bounded).
const MAX_LOST_REPORTS: usize = 64;
/// The RAID0 array's state key and mount directory name.
pub const RAID_KEY: &str = "md-nodekeeper";
/// Bytes zeroed at each end of a device by `disks wipe`.
const WIPE_EDGE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// owned.json could not be read or written; nothing was formatted.
    #[error(transparent)]
    State(#[from] marker::MarkerError),
    /// Entering the host mount namespace failed (needs CAP_SYS_ADMIN and hostPID).
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// A host tool failed or could not be started.
    #[error("{tool} {target}: {error}")]
    Tool {
        tool: String,
        target: String,
        error: String,
    },
    /// A host tool did not finish within its named timeout (it was killed).
    #[error("{tool} {target}: no result after {after:?} (killed)")]
    Timeout {
        tool: String,
        target: String,
        after: Duration,
    },
    /// Reading or writing a host path failed.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: String },
    /// Discovery failed: nothing was prepared.
    #[error("discovery: {0}")]
    Discover(String),
    /// `disks wipe` refused: the message says which rule.
    #[error("{0}")]
    Refused(String),
    /// RAID0 members disagree (some ours, some blank or foreign): nothing was touched.
    #[error("raid0: {0}")]
    Raid(String),
    /// The exclusive claim before a write was refused (busy, re-bound, no longer blank):
    /// nothing was written.
    #[error(transparent)]
    Claim(#[from] super::claim::ClaimError),
}

impl PrepareError {
    /// Low-cardinality label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::State(_) => "state",
            Self::Namespace(_) => "namespace",
            Self::Tool { .. } => "tool_failed",
            Self::Timeout { .. } => "timeout",
            Self::Io { .. } => "io",
            Self::Discover(_) => "discover",
            Self::Refused(_) => "refused",
            Self::Raid(_) => "raid",
            Self::Claim(_) => "claim",
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> PrepareError + '_ {
    move |e| PrepareError::Io {
        path: path.to_path_buf(),
        error: e.to_string(),
    }
}

// === report ===

/// A disk (or the RAID0 array) that is ours and usable now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDisk {
    /// State key: by-id name, else kernel name; `md-nodekeeper` for the array.
    pub key: String,
    /// Kernel name (`nvme1n1`, `md127`).
    pub name: String,
    pub by_id: Option<String>,
    pub model: String,
    pub serial: String,
    pub size_bytes: u64,
    pub mode: PrepareMode,
    /// Host path: the mount point (filesystem, raid0) or the device (block: by-id when known).
    pub path: PathBuf,
    pub fs_type: Option<FsType>,
    pub label: Option<String>,
    pub uuid: Option<String>,
    /// raid0: the members' kernel names.
    pub members: Vec<String>,
    /// Formatted (or created) by this pass, as opposed to found ours and re-mounted.
    pub new: bool,
}

impl PreparedDisk {
    /// What the PV publisher needs.
    pub fn published(&self) -> PublishedDisk {
        PublishedDisk {
            id: self.key.clone(),
            model: self.model.clone(),
            serial: self.serial.clone(),
            size_bytes: self.size_bytes,
            mode: self.mode,
            path: self.path.display().to_string(),
        }
    }
}

/// A disk the state dir called ours that came back blank (instance store after stop/start):
/// re-prepared, and reported so the publisher can raise a Warning Event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LostDisk {
    pub key: String,
    pub name: String,
    pub by_id: Option<String>,
    /// Event-ready text.
    pub message: String,
}

/// A disk (or the array) this pass could not prepare: the pass went on with the others; the
/// publisher turns each into a `LocalDiskPrepareFailed` Warning Event on the Node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskFailure {
    pub key: String,
    pub name: String,
    /// `PrepareError::reason`: the `reason` label of `nodekeeper_disks_errors_total`.
    pub reason: &'static str,
    pub message: String,
}

/// One disk's outcome, for `disks prepare` output and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskOutcome {
    pub name: String,
    pub key: String,
    #[serde(flatten)]
    pub decision: Decision,
    /// What this pass did: `formatted`, `mounted`, `already-mounted`, `published-raw`,
    /// `untouched`, `failed: ...`.
    pub action: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepareReport {
    pub disks: Vec<DiskOutcome>,
    pub prepared: Vec<PreparedDisk>,
    pub lost: Vec<LostDisk>,
    /// (disk key, error) for disks that could not be prepared this pass.
    pub errors: Vec<(String, String)>,
    /// The same failures with their reason label, for metrics and Events.
    pub failures: Vec<DiskFailure>,
}

impl PrepareReport {
    /// Records a disk that could not be prepared; the pass goes on with the others.
    fn fail(&mut self, key: &str, name: &str, e: &PrepareError) {
        self.errors.push((key.to_string(), e.to_string()));
        self.failures.push(DiskFailure {
            key: key.to_string(),
            name: name.to_string(),
            reason: e.reason(),
            message: e.to_string(),
        });
    }
}

impl PrepareReport {
    /// A table for the one-shot command.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for d in &self.disks {
            let (decision, reason) = match &d.decision {
                Decision::Candidate => ("candidate", String::new()),
                Decision::Ours => ("ours", String::new()),
                Decision::NotSelected(r) => ("not-selected", r.clone()),
                Decision::InUse(r) => ("in-use", r.clone()),
                Decision::HasData(r) => ("has-data", r.clone()),
            };
            out.push_str(&format!(
                "{:<12} {:<13} {:<18} {}\n",
                d.name, decision, d.action, reason
            ));
        }
        for p in &self.prepared {
            out.push_str(&format!(
                "prepared {} ({:?}) -> {}\n",
                p.key,
                p.mode,
                p.path.display()
            ));
        }
        for l in &self.lost {
            out.push_str(&format!("LOST {}: {}\n", l.key, l.message));
        }
        for (k, e) in &self.errors {
            out.push_str(&format!("error {k}: {e}\n"));
        }
        out
    }
}

// === host access: namespace, paths, tools ===

/// How tools reach the host: in PID 1's mount namespace (a pod) or in our own (tests, or an
/// agent running directly on the host).
#[derive(Debug, Clone)]
pub struct HostAccess {
    pub paths: HostPaths,
    /// `<proc>/1/ns/mnt` when `disks.hostMountNamespace`.
    pub mount_ns: Option<PathBuf>,
    /// Host path of the discovery dir (as written in config).
    pub discovery_dir: PathBuf,
}

impl HostAccess {
    pub fn new(paths: &HostPaths, cfg: &DisksConfig) -> Self {
        Self {
            paths: paths.clone(),
            mount_ns: cfg.host_mount_namespace.then(|| paths.proc("1/ns/mnt")),
            discovery_dir: cfg.discovery_dir.clone(),
        }
    }

    /// The device node as the tools see it: the host's `/dev` inside its namespace, else
    /// HostPaths.dev.
    pub fn tool_dev(&self, name: &str) -> PathBuf {
        match self.mount_ns {
            Some(_) => Path::new("/dev").join(name),
            None => self.paths.dev.join(name),
        }
    }

    /// The mount point as the host sees it (what a PV's `local.path` names).
    pub fn host_mount_path(&self, key: &str) -> PathBuf {
        self.discovery_dir.join(key)
    }

    /// The mount point as the tools see it.
    pub fn tool_mount_path(&self, key: &str) -> PathBuf {
        match self.mount_ns {
            Some(_) => self.host_mount_path(key),
            None => self.paths.on_rootfs(&self.host_mount_path(key)),
        }
    }

    /// The mount point as this process sees it (statvfs).
    pub fn local_mount_path(&self, key: &str) -> PathBuf {
        self.paths.on_rootfs(&self.host_mount_path(key))
    }

    /// Runs `f` where the tools must run.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, PrepareError> + Send + 'static,
    ) -> Result<T, PrepareError> {
        match &self.mount_ns {
            Some(ns) => in_namespace(Namespace::Mount, ns, f)?,
            None => f(),
        }
    }

    /// The mounts of the namespace the tools mount in: the host's (PID 1 under the HostPaths
    /// proc root) when they enter it, else the agent's own, where they then run.
    fn mounts(&self) -> Vec<mountinfo::Mount> {
        let path = match self.mount_ns {
            Some(_) => self.paths.proc("1/mountinfo"),
            None => PathBuf::from("/proc/self/mountinfo"),
        };
        mountinfo::read(&path)
    }

    /// `major:minor` of a block device, from sysfs.
    fn dev_number(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.paths.sys(&format!("class/block/{name}/dev")))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Where the device is mounted (mount points in the tools' namespace), from mountinfo.
    pub fn mounts_of(&self, name: &str) -> Vec<PathBuf> {
        let Some(dev) = self.dev_number(name) else {
            return Vec::new();
        };
        self.mounts()
            .into_iter()
            .filter(|m| m.dev == dev)
            .map(|m| PathBuf::from(m.mount_point))
            .collect()
    }

    /// The kernel's partitions of disk `name` (`loop7p1`), read fresh from sysfs.
    fn partitions(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.paths.sys(&format!("block/{name}")))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("partition").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Devices stacked on `name` (`md127`), read fresh from sysfs.
    fn holders(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(self.paths.sys(&format!("block/{name}/holders")))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
        v.sort();
        v
    }

    fn size_of(&self, name: &str) -> u64 {
        std::fs::read_to_string(self.paths.sys(&format!("class/block/{name}/size")))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|sectors| sectors * 512)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member of the array owned.json records, as a regular file carrying our md superblock.
    fn recorded_raid_member(dir: &Path) -> (OwnedStore, Disk) {
        let dev = dir.join("loop9");
        let mut img = vec![0u8; 8 << 20];
        img[4096..4100].copy_from_slice(&0xa92b_4efc_u32.to_le_bytes());
        img[4096 + 16..4096 + 32].copy_from_slice(&[0x5a; 16]);
        img[4096 + 32..4096 + 47].copy_from_slice(b"host:nodekeeper");
        std::fs::write(&dev, &img).unwrap();
        let Ok(OnDisk::MdMember { array_uuid, .. }) = marker::read_marker(&dev) else {
            panic!("fixture is not an md member");
        };
        let mut store = OwnedStore::load(&dir.join("state")).unwrap();
        store.owned.disks.insert(
            RAID_KEY.into(),
            OwnedDisk {
                name: "md127".into(),
                by_id: None,
                serial: String::new(),
                size_bytes: 0,
                mode: PrepareMode::Raid0,
                fs_type: Some(FsType::Ext4),
                label: Some(marker::label_for(RAID_KEY)),
                uuid: None,
                mount_path: None,
                md_uuid: Some(array_uuid),
                members: vec!["loop9".into()],
                prepared: true,
            },
        );
        let disk = Disk {
            name: "loop9".into(),
            dev_path: dev,
            size_bytes: 8 << 20,
            ..Disk::default()
        };
        (store, disk)
    }

    #[test]
    fn switching_raid0_to_filesystem_or_block_refuses_the_members_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [PrepareMode::Filesystem, PrepareMode::Block] {
            let (mut store, disk) = recorded_raid_member(dir.path());
            let cfg = DisksConfig {
                mode,
                cross_check: false,
                discovery_dir: dir.path().join("mnt"),
                host_mount_namespace: false,
                ..DisksConfig::default()
            };
            let host = HostAccess::new(&HostPaths::under(dir.path()), &cfg);
            let before = std::fs::read(&disk.dev_path).unwrap();
            let decided = vec![(disk.clone(), Decision::HasData("has md signature".into()))];
            let report = prepare(&cfg, &host, &mut store, decided);
            assert!(report.prepared.is_empty(), "{report:#?}");
            let (key, error) = &report.errors[0];
            assert_eq!(key, "loop9");
            assert!(error.contains("disks.mode"), "{error}");
            assert!(error.contains(RAID_KEY), "{error}");
            assert!(report.disks[0].action.starts_with("failed"), "{report:#?}");
            assert_eq!(std::fs::read(&disk.dev_path).unwrap(), before);
            assert!(
                store.owned.disks.contains_key(RAID_KEY),
                "the record is kept"
            );
        }
    }

    #[test]
    fn a_raid_record_without_members_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, disk) = recorded_raid_member(dir.path());
        store.owned.disks.get_mut(RAID_KEY).unwrap().members.clear();
        let cfg = DisksConfig {
            mode: PrepareMode::Raid0,
            cross_check: false,
            discovery_dir: dir.path().join("mnt"),
            host_mount_namespace: false,
            ..DisksConfig::default()
        };
        let host = HostAccess::new(&HostPaths::under(dir.path()), &cfg);
        let decided = vec![(disk, Decision::HasData("has md signature".into()))];
        let report = prepare(&cfg, &host, &mut store, decided);
        assert!(report.prepared.is_empty(), "{report:#?}");
        assert!(
            report
                .errors
                .iter()
                .any(|(k, e)| k == RAID_KEY && e.contains("no members")),
            "{report:#?}"
        );
    }

    /// raid0 create (#14): every member is claimed and inspected again through its fd before
    /// anything is recorded or mdadm runs. A member written between the survey (both blank)
    /// and the create stops it: no record, no mdadm, not a byte written to either member.
    #[test]
    fn raid0_claims_every_member_before_recording_or_creating() {
        let dir = tempfile::tempdir().unwrap();
        let member = |name: &str| {
            let dev = dir.path().join(name);
            std::fs::write(&dev, vec![0u8; 8 << 20]).unwrap();
            Disk {
                name: name.into(),
                dev_path: dev,
                size_bytes: 8 << 20,
                ..Disk::default()
            }
        };
        let (a, b) = (member("loop21"), member("loop22"));
        // After the survey: someone's ext4 superblock magic on the second member.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&b.dev_path)
                .unwrap();
            f.write_all_at(&0xEF53u16.to_le_bytes(), 1080).unwrap();
        }
        let before = (
            std::fs::read(&a.dev_path).unwrap(),
            std::fs::read(&b.dev_path).unwrap(),
        );
        let cfg = DisksConfig {
            mode: PrepareMode::Raid0,
            cross_check: false,
            discovery_dir: dir.path().join("mnt"),
            host_mount_namespace: false,
            ..DisksConfig::default()
        };
        let host = HostAccess::new(&HostPaths::under(dir.path()), &cfg);
        let state = dir.path().join("state");
        let mut store = OwnedStore::load(&state).unwrap();
        let decided = vec![
            (a.clone(), Decision::Candidate),
            (b.clone(), Decision::Candidate),
        ];
        let report = prepare(&cfg, &host, &mut store, decided);
        assert!(report.prepared.is_empty(), "{report:#?}");
        assert!(
            report.errors.iter().any(|(k, e)| k == RAID_KEY
                && e.contains("loop22")
                && e.contains("no longer blank when claimed")),
            "{report:#?}"
        );
        assert_eq!(report.failures[0].reason, "claim");
        assert!(
            !store.owned.disks.contains_key(RAID_KEY),
            "recorded before the claims"
        );
        assert!(
            !OwnedStore::load(&state)
                .unwrap()
                .owned
                .disks
                .contains_key(RAID_KEY)
        );
        assert_eq!(
            (
                std::fs::read(&a.dev_path).unwrap(),
                std::fs::read(&b.dev_path).unwrap()
            ),
            before
        );
    }

    #[test]
    fn mkfs_never_discards_and_never_forces() {
        let (tool, args) = mkfs_args(FsType::Xfs, "nk-1", "u", &[], Path::new("/dev/x"));
        assert_eq!(tool, "mkfs.xfs");
        assert!(args.contains(&"-K".to_string()));
        assert!(!args.iter().any(|a| a == "-f"));
        let (_, args) = mkfs_args(
            FsType::Ext4,
            "nk-1",
            "u",
            &["-m0".into()],
            Path::new("/dev/x"),
        );
        assert!(args.windows(2).any(|w| w == ["-E", "nodiscard"]));
        assert!(!args.iter().any(|a| a == "-F"));
        assert_eq!(args.last().unwrap(), "/dev/x");
    }
}

/// Runs a host tool (through `host::exec`: no stdin, so it can never wait on a prompt; killed
/// with its process group after `timeout`); returns its stdout.
pub fn run_tool(
    program: &str,
    args: &[String],
    target: &Path,
    timeout: Duration,
) -> Result<String, PrepareError> {
    tracing::debug!(tool = program, ?args, "running");
    let fail = |error: String| PrepareError::Tool {
        tool: program.to_string(),
        target: target.display().to_string(),
        error,
    };
    Exec::new(program, timeout)
        .args(args)
        .run()
        .and_then(exec::Output::success)
        .map_err(|e| match e {
            ExecError::Timeout { .. } => PrepareError::Timeout {
                tool: program.to_string(),
                target: target.display().to_string(),
                after: timeout,
            },
            ExecError::Failed { status, stderr, .. } => fail(format!("{status}: {stderr}")),
            ExecError::NotFound { .. } => fail(format!("cannot start: {e}")),
            ExecError::Io { source, .. } => fail(source.to_string()),
        })
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn mkfs_args(
    fs: FsType,
    label: &str,
    uuid: &str,
    extra: &[String],
    dev: &Path,
) -> (String, Vec<String>) {
    // No force flag: mkfs.xfs refuses a device with any signature, a last safety net.
    let (tool, mut args) = match fs {
        FsType::Ext4 => (
            "mkfs.ext4",
            strings(&["-q", "-E", "nodiscard", "-L", label, "-U", uuid]),
        ),
        FsType::Xfs => (
            "mkfs.xfs",
            strings(&["-q", "-K", "-L", label, "-m", &format!("uuid={uuid}")]),
        ),
    };
    args.extend(extra.iter().cloned());
    args.push(dev.display().to_string());
    (tool.to_string(), args)
}

fn fs_name(fs: FsType) -> &'static str {
    match fs {
        FsType::Ext4 => "ext4",
        FsType::Xfs => "xfs",
    }
}

/// A symlink at `<discoveryDir>/<key>` (or the discovery dir itself) would make mount(8)
/// mount over the link's target and the agent publish that path (#14): refused, before mkfs.
/// Residual risk: a symlink planted between this check and mount(8) (a root-only race on a
/// directory only root writes).
fn refuse_symlinked_mount_point(dir: &Path) -> Result<(), PrepareError> {
    for p in [Some(dir), dir.parent()].into_iter().flatten() {
        if let Ok(m) = std::fs::symlink_metadata(p)
            && m.file_type().is_symlink()
        {
            let to = std::fs::read_link(p).unwrap_or_default();
            return Err(PrepareError::Refused(format!(
                "refusing to mount at {}: it is a symlink (to {}); the agent never mounts over a symlink's target",
                p.display(),
                to.display()
            )));
        }
    }
    Ok(())
}

/// mkdir + mount, in the tools' namespace.
fn mount(dev: &Path, dir: &Path, fs: FsType, options: &[String]) -> Result<(), PrepareError> {
    refuse_symlinked_mount_point(dir)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut args = strings(&["-t", fs_name(fs)]);
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.join(","));
    }
    args.push(dev.display().to_string());
    args.push(dir.display().to_string());
    run_tool("mount", &args, dev, MOUNT_TIMEOUT).map(|_| ())
}

// === classification: the marker on the disk decides ===

/// A disk after ownership was checked against owned.json and the device itself.
#[derive(Debug, Clone)]
pub struct Classified {
    pub disk: Disk,
    pub key: String,
    pub decision: Decision,
    /// The state dir called it ours (prepared) and it now reads blank.
    pub lost: bool,
}

/// Upgrades a disk to `Ours` only when its on-disk marker equals the recorded one; marks a
/// recorded disk that reads blank (`Candidate`) as lost; leaves everything else as inspection
/// decided (a foreign signature is never ours, whatever the state says).
pub fn classify(decided: Vec<(Disk, Decision)>, store: &OwnedStore) -> Vec<Classified> {
    let raid = store.owned.disks.get(RAID_KEY);
    decided
        .into_iter()
        .map(|(disk, decision)| {
            let key = marker::disk_key(&disk);
            let mut c = Classified {
                key: key.clone(),
                disk,
                decision,
                lost: false,
            };
            if matches!(c.decision, Decision::NotSelected(_)) {
                return c;
            }
            let on_disk = marker::read_marker(&c.disk.dev_path).unwrap_or(OnDisk::Other);
            let recorded = store.owned.disks.get(&key);
            let member_of = raid.filter(|r| r.members.contains(&key));
            let ours = match (recorded, member_of, &on_disk) {
                (Some(r), _, OnDisk::Filesystem { label, uuid, .. }) => {
                    r.label.as_deref() == Some(label.as_str())
                        && r.uuid.as_deref() == Some(uuid.as_str())
                }
                // Block mode carries no marker (the consumer owns every byte): the state file
                // plus the same serial and size identify it. See docs/disks.md.
                (Some(r), _, _) if r.mode == PrepareMode::Block => {
                    r.serial == c.disk.serial && r.size_bytes == c.disk.size_bytes
                }
                (_, Some(r), OnDisk::MdMember { array_uuid, name }) => {
                    r.md_uuid.as_deref() == Some(array_uuid.as_str())
                        && marker::is_our_md_name(name)
                }
                _ => false,
            };
            // The marker alone is not proof (#14): the rest of the disk must agree.
            let refused = match (ours, recorded, member_of) {
                (true, Some(r), _) if r.mode != PrepareMode::Block => {
                    ownership_refused(&c.disk, fs_name(r.fs_type.unwrap_or_default()), false)
                }
                (true, None, Some(_)) => ownership_refused(&c.disk, "md", true),
                _ => None,
            };
            let ours = ours && refused.is_none();
            if let Some(why) = refused {
                tracing::warn!(disk = %c.disk.name, key = %c.key, reason = %why,
                    "the state dir calls this disk ours and its marker matches, but the disk holds more: never written, not published");
                if !matches!(c.decision, Decision::InUse(_)) {
                    c.decision = Decision::HasData(format!(
                        "{why} (carries our marker, but a marker alone is not ownership)"
                    ));
                }
            }
            let was_prepared = recorded.is_some_and(|r| r.prepared) || member_of.is_some_and(|r| r.prepared);
            if ours {
                c.decision = Decision::Ours;
            } else if c.decision == Decision::Candidate && was_prepared {
                c.lost = true;
            } else if was_prepared {
                tracing::warn!(disk = %c.disk.name, key = %c.key, decision = ?c.decision,
                    "the state dir calls this disk ours but its marker does not match: left untouched");
            }
            c
        })
        .collect()
}

/// Why a disk whose marker matches the record is still not ours, or None. The one rule for
/// "ours": discovery finds it unused except for our own mount (no partitions; no holders but
/// our array for a RAID member) and inspection finds exactly one signature, the recorded one
/// (`kind`). A partition table written over an agent disk, a foreign superblock at the end, a
/// second filesystem's header: each adds a signature, so the disk is left alone.
fn ownership_refused(disk: &Disk, kind: &str, raid_member: bool) -> Option<String> {
    if !disk.partitions.is_empty() {
        return Some(format!("has partitions {}", disk.partitions.join(", ")));
    }
    if !raid_member && !disk.holders.is_empty() {
        return Some(format!("held by {}", disk.holders.join(", ")));
    }
    // Read-only, our probes only: the tools add findings only on disks our probes call blank.
    let opts = inspect::Options { cross_check: false };
    match inspect::inspect(&disk.dev_path, opts) {
        Err(e) => Some(format!("not inspectable: {e}")),
        Ok(ins) if ins.signatures.len() == 1 && ins.signatures[0].kind == kind => None,
        Ok(ins) => Some(ins.reason()),
    }
}

// === the pass ===

/// One pass over decided disks: prepare candidates, re-mount ours, re-prepare lost ones.
pub fn prepare(
    cfg: &DisksConfig,
    host: &HostAccess,
    store: &mut OwnedStore,
    decided: Vec<(Disk, Decision)>,
) -> PrepareReport {
    let classified = classify(decided, store);
    let mut report = PrepareReport::default();
    if cfg.mode == PrepareMode::Raid0 {
        prepare_raid0(cfg, host, store, &classified, &mut report);
    } else {
        for c in &classified {
            let action = match prepare_one(cfg, host, store, c, &mut report) {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(disk = %c.disk.name, error = %e, "preparing the disk failed; the pass goes on with the other disks");
                    report.fail(&c.key, &c.disk.name, &e);
                    format!("failed: {}", e.reason())
                }
            };
            report.disks.push(outcome(c, action));
        }
    }
    report
}

fn outcome(c: &Classified, action: impl Into<String>) -> DiskOutcome {
    DiskOutcome {
        name: c.disk.name.clone(),
        key: c.key.clone(),
        decision: c.decision.clone(),
        action: action.into(),
    }
}

fn lost_report(report: &mut PrepareReport, key: &str, name: &str, by_id: Option<String>) {
    let message = format!(
        "disk {key} ({name}) was prepared by this agent but is now blank: its data is lost \
         (instance store is wiped on stop/start); re-preparing it"
    );
    tracing::warn!(disk = name, key, "{message}");
    report.lost.push(LostDisk {
        key: key.to_string(),
        name: name.to_string(),
        by_id,
        message,
    });
}

fn prepare_one(
    cfg: &DisksConfig,
    host: &HostAccess,
    store: &mut OwnedStore,
    c: &Classified,
    report: &mut PrepareReport,
) -> Result<String, PrepareError> {
    let disk = &c.disk;
    match &c.decision {
        Decision::Ours => {
            // `Ours` without a record of its own: a member of our raid0 array while
            // `disks.mode` says filesystem or block (a config change). Its data lives in the
            // array: refused, never panicked on, never re-formatted.
            let Some(rec) = store.owned.disks.get(&c.key).cloned() else {
                return Err(mode_switch_refused(cfg.mode, &c.key, PrepareMode::Raid0));
            };
            if !rec.prepared {
                // Our mkfs finished but the agent died before recording it (kill -9, node
                // crash): the disk proved itself ours, so the record is finished too, and a
                // later loss of the disk is reported as lost.
                let mut done = rec.clone();
                done.prepared = true;
                store.owned.disks.insert(c.key.clone(), done);
                store.persist()?;
            }
            let mut entry = prepared_entry(host, disk, &c.key, &rec, false);
            if rec.mode == PrepareMode::Block {
                report.prepared.push(entry);
                return Ok("published-raw".into());
            }
            let fs = rec.fs_type.unwrap_or(cfg.fs_type);
            let want = host.tool_mount_path(&c.key);
            let mounts = host.mounts_of(&disk.name);
            let action = if mounts.contains(&want) {
                "already-mounted"
            } else if let Some(elsewhere) = mounts.first() {
                tracing::warn!(disk = %disk.name, at = %elsewhere.display(), "our disk is mounted elsewhere; not mounting it again");
                entry.path = elsewhere.clone();
                "mounted-elsewhere"
            } else {
                let (dev, dir, opts) = (host.tool_dev(&disk.name), want, cfg.mount_options.clone());
                host.run(move || mount(&dev, &dir, fs, &opts))?;
                tracing::info!(disk = %disk.name, path = %entry.path.display(), "our disk re-mounted (not re-formatted)");
                "mounted"
            };
            report.prepared.push(entry);
            Ok(action.into())
        }
        Decision::Candidate => {
            if c.lost {
                lost_report(report, &c.key, &disk.name, disk.by_id.clone());
            }
            let mut rec = OwnedDisk {
                name: disk.name.clone(),
                by_id: disk.by_id.clone(),
                serial: disk.serial.clone(),
                size_bytes: disk.size_bytes,
                mode: cfg.mode,
                fs_type: None,
                label: None,
                uuid: None,
                mount_path: None,
                md_uuid: None,
                members: Vec::new(),
                prepared: false,
            };
            if cfg.mode == PrepareMode::Block {
                rec.prepared = true;
                store.owned.disks.insert(c.key.clone(), rec.clone());
                store.persist()?;
                report
                    .prepared
                    .push(prepared_entry(host, disk, &c.key, &rec, true));
                tracing::info!(disk = %disk.name, "disk published raw (block mode)");
                return Ok("published-raw".into());
            }
            // Held exclusively, checked to be the disk discovery saw and inspected again
            // through the fd, before anything is recorded or written (#14).
            let mut claim = Claim::take(
                &host.paths,
                disk,
                inspect::Options {
                    cross_check: cfg.cross_check,
                },
            )?;
            let label = marker::label_for(&c.key);
            let uuid = marker::new_uuid().map_err(io_err(Path::new("/dev/urandom")))?;
            rec.fs_type = Some(cfg.fs_type);
            rec.label = Some(label.clone());
            rec.uuid = Some(uuid.clone());
            rec.mount_path = Some(host.host_mount_path(&c.key));
            // Recorded before mkfs: a crash mid-mkfs leaves a record whose marker decides.
            store.owned.disks.insert(c.key.clone(), rec.clone());
            store.persist()?;
            let opts = FormatOptions {
                fs: cfg.fs_type,
                mkfs_options: cfg.mkfs_options.clone(),
                mount_options: cfg.mount_options.clone(),
            };
            format_claimed_and_mount(&opts, host, &mut claim, &disk.name, &c.key, &label, &uuid)?;
            drop(claim);
            rec.prepared = true;
            store.owned.disks.insert(c.key.clone(), rec.clone());
            store.persist()?;
            tracing::info!(disk = %disk.name, label, uuid, "disk formatted and mounted");
            report
                .prepared
                .push(prepared_entry(host, disk, &c.key, &rec, true));
            Ok("formatted".into())
        }
        _ => Ok("untouched".into()),
    }
}

/// `disks.mode` changed while a disk still holds what the old mode made: never re-purposed
/// silently (its data would go), reported with the way out.
fn mode_switch_refused(now: PrepareMode, key: &str, recorded: PrepareMode) -> PrepareError {
    let holder = match recorded {
        PrepareMode::Raid0 => format!("is a member of the agent's raid0 array {RAID_KEY}"),
        other => format!("holds the agent's {other:?} preparation"),
    };
    PrepareError::Refused(format!(
        "disks.mode is {now:?} but {key} {holder} (recorded in owned.json); left untouched: \
         set disks.mode back to {recorded:?}, or release its PV and run `nodekeeper disks wipe` \
         on it to re-purpose it"
    ))
}

fn format_and_mount(
    cfg: &DisksConfig,
    host: &HostAccess,
    name: &str,
    key: &str,
    label: &str,
    uuid: &str,
) -> Result<(), PrepareError> {
    let dev = host.tool_dev(name);
    let dir = host.tool_mount_path(key);
    let (tool, args) = mkfs_args(cfg.fs_type, label, uuid, &cfg.mkfs_options, &dev);
    let (fs, opts) = (cfg.fs_type, cfg.mount_options.clone());
    host.run(move || {
        run_tool(&tool, &args, &dev, MKFS_TIMEOUT)?;
        mount(&dev, &dir, fs, &opts)
    })
}

/// mkfs through the claim's `/proc/self/fd/N` (never a name that could be re-bound), then
/// mount. The exclusive open is released right before mkfs, which claims the device itself.
/// What mkfs and mount need: the filesystem (the config's for a new disk, the record's for a
/// reclaim) and the operator's options.
struct FormatOptions {
    fs: FsType,
    mkfs_options: Vec<String>,
    mount_options: Vec<String>,
}

fn format_claimed_and_mount(
    cfg: &FormatOptions,
    host: &HostAccess,
    claim: &mut Claim,
    name: &str,
    key: &str,
    label: &str,
    uuid: &str,
) -> Result<(), PrepareError> {
    let dev = claim.tool_path();
    let mount_dev = host.tool_dev(name);
    let dir = host.tool_mount_path(key);
    let (tool, args) = mkfs_args(cfg.fs, label, uuid, &cfg.mkfs_options, &dev);
    let (fs, opts) = (cfg.fs, cfg.mount_options.clone());
    claim.release_exclusive();
    host.run(move || {
        // Checked before mkfs too: a disk formatted but never mounted is a disk we wrote
        // for nothing.
        refuse_symlinked_mount_point(&dir)?;
        run_tool(&tool, &args, &dev, MKFS_TIMEOUT)?;
        mount(&mount_dev, &dir, fs, &opts)
    })
}

fn prepared_entry(
    host: &HostAccess,
    disk: &Disk,
    key: &str,
    rec: &OwnedDisk,
    new: bool,
) -> PreparedDisk {
    let path = match rec.mode {
        PrepareMode::Block => disk
            .by_id
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new("/dev").join(&disk.name)),
        _ => host.host_mount_path(key),
    };
    PreparedDisk {
        key: key.to_string(),
        name: disk.name.clone(),
        by_id: disk.by_id.clone(),
        model: disk.model.clone(),
        serial: disk.serial.clone(),
        size_bytes: disk.size_bytes,
        mode: rec.mode,
        path,
        fs_type: rec.fs_type,
        label: rec.label.clone(),
        uuid: rec.uuid.clone(),
        members: Vec::new(),
        new,
    }
}

// === raid0 ===

fn prepare_raid0(
    cfg: &DisksConfig,
    host: &HostAccess,
    store: &mut OwnedStore,
    classified: &[Classified],
    report: &mut PrepareReport,
) {
    // Disks the agent prepared in filesystem or block mode stay as they are (not added to
    // the array): reported, so the switch does not silently unpublish them.
    for c in classified {
        if let Some(rec) = store.owned.disks.get(&c.key)
            && c.decision == Decision::Ours
            && rec.mode != PrepareMode::Raid0
        {
            let e = mode_switch_refused(PrepareMode::Raid0, &c.key, rec.mode);
            report.fail(&c.key, &c.disk.name, &e);
        }
    }
    let result = raid0_inner(cfg, host, store, classified, report);
    let action = match &result {
        Ok(a) => a.clone(),
        Err(e) => {
            tracing::error!(error = %e, "raid0 preparation failed");
            report.fail(RAID_KEY, RAID_KEY, e);
            format!("failed: {}", e.reason())
        }
    };
    let members: Vec<String> = store
        .owned
        .disks
        .get(RAID_KEY)
        .map(|r| r.members.clone())
        .unwrap_or_default();
    for c in classified {
        let a = if members.contains(&c.key)
            && matches!(c.decision, Decision::Ours | Decision::Candidate)
        {
            format!("raid0 {action}")
        } else if c.decision == Decision::Candidate {
            "not-added".into()
        } else {
            "untouched".into()
        };
        report.disks.push(outcome(c, a));
    }
}

fn raid0_inner(
    cfg: &DisksConfig,
    host: &HostAccess,
    store: &mut OwnedStore,
    classified: &[Classified],
    report: &mut PrepareReport,
) -> Result<String, PrepareError> {
    if let Some(rec) = store.owned.disks.get(RAID_KEY).cloned() {
        if rec.members.is_empty() {
            return Err(PrepareError::Raid(format!(
                "{RAID_KEY} is recorded in owned.json with no members; not assembling or \
                 creating anything (needs an operator: see docs/disks.md)"
            )));
        }
        let members: Vec<&Classified> = classified
            .iter()
            .filter(|c| rec.members.contains(&c.key))
            .collect();
        let ours = members
            .iter()
            .filter(|c| c.decision == Decision::Ours)
            .count();
        let blank = members
            .iter()
            .filter(|c| c.decision == Decision::Candidate)
            .count();
        if ours == rec.members.len() {
            return raid0_reuse(cfg, host, &rec, &members, report);
        }
        if rec.prepared && blank == rec.members.len() {
            for c in &members {
                lost_report(report, &c.key, &c.disk.name, c.disk.by_id.clone());
            }
            store.owned.disks.remove(RAID_KEY);
            store.persist()?;
        } else if !rec.prepared && ours == 0 && blank == rec.members.len() {
            // A create that never completed: start over with the same blank disks.
            store.owned.disks.remove(RAID_KEY);
            store.persist()?;
        } else {
            return Err(PrepareError::Raid(format!(
                "{} of {} recorded members carry our array's superblock, {} are blank; \
                 not assembling or re-creating (needs an operator: see docs/disks.md)",
                ours,
                rec.members.len(),
                blank
            )));
        }
    }
    let candidates: Vec<&Classified> = classified
        .iter()
        .filter(|c| c.decision == Decision::Candidate)
        .collect();
    if candidates.is_empty() {
        return Ok("nothing-to-do".into());
    }
    // Every member held exclusively, checked to be the disk discovery saw and inspected again
    // through the fd before anything is recorded or written (#14): one member that is no
    // longer blank (or busy, or re-bound) stops the create, nothing written.
    let mut claims = claim_members(cfg, host, &candidates)?;
    let label = marker::label_for(RAID_KEY);
    let uuid = marker::new_uuid().map_err(io_err(Path::new("/dev/urandom")))?;
    let mut rec = OwnedDisk {
        name: String::new(),
        by_id: None,
        serial: String::new(),
        size_bytes: 0,
        mode: PrepareMode::Raid0,
        fs_type: Some(cfg.fs_type),
        label: Some(label.clone()),
        uuid: Some(uuid.clone()),
        mount_path: Some(host.host_mount_path(RAID_KEY)),
        md_uuid: None,
        members: candidates.iter().map(|c| c.key.clone()).collect(),
        prepared: false,
    };
    store.owned.disks.insert(RAID_KEY.into(), rec.clone());
    store.persist()?;
    // mdadm gets each member as `/proc/self/fd/N` of the claim's plain fd (never a name that
    // could be re-bound), and the exclusive opens are released right before it runs: mdadm
    // and the md driver claim the members exclusively themselves (EBUSY otherwise).
    let devs: Vec<PathBuf> = claims.iter().map(Claim::tool_path).collect();
    for c in &mut claims {
        c.release_exclusive();
    }
    let mut args = vec![
        "--create".to_string(),
        format!("/dev/md/{}", marker::MD_NAME),
        "--level=0".into(),
        format!("--raid-devices={}", devs.len()),
        "--metadata=1.2".into(),
        format!("--name={}", marker::MD_NAME),
    ];
    if devs.len() == 1 {
        args.push("--force".into()); // mdadm wants it for a one-disk array
    }
    args.extend(devs.iter().map(|d| d.display().to_string()));
    host.run(move || {
        run_tool(
            "mdadm",
            &args,
            Path::new("/dev/md/nodekeeper"),
            MDADM_TIMEOUT,
        )
    })?;
    let first = &candidates[0].disk;
    // The array holds exactly the devices we claimed (the plain fds kept every name bound).
    let md = md_device(host, &first.name)?;
    check_array_members(host, &md, &claims)?;
    let md_uuid = match marker::read_marker(&first.dev_path) {
        Ok(OnDisk::MdMember { array_uuid, .. }) => array_uuid,
        other => {
            return Err(PrepareError::Raid(format!(
                "after mdadm --create, {} shows no md superblock ({other:?})",
                first.name
            )));
        }
    };
    rec.md_uuid = Some(md_uuid.clone());
    store.owned.disks.insert(RAID_KEY.into(), rec.clone());
    store.persist()?;
    // The array exists and the md driver holds its members: the claims have done their job.
    drop(claims);
    format_and_mount(cfg, host, &md, RAID_KEY, &label, &uuid)?;
    rec.name = md.clone();
    rec.size_bytes = host.size_of(&md);
    rec.prepared = true;
    store.owned.disks.insert(RAID_KEY.into(), rec.clone());
    store.persist()?;
    tracing::info!(md = %md, md_uuid, members = ?rec.members, "raid0 created, formatted and mounted");
    report
        .prepared
        .push(raid_entry(host, &rec, &md, &candidates, true));
    Ok("created".into())
}

/// Claims every raid0 member (`Claim::take`: `O_EXCL`, identity, re-inspection through the
/// fd), all before the create; the first refusal is the pass's raid0 error.
fn claim_members(
    cfg: &DisksConfig,
    host: &HostAccess,
    members: &[&Classified],
) -> Result<Vec<Claim>, PrepareError> {
    let opts = inspect::Options {
        cross_check: cfg.cross_check,
    };
    members
        .iter()
        .map(|c| Claim::take(&host.paths, &c.disk, opts).map_err(PrepareError::from))
        .collect()
}

/// The md device's members (`<sys>/block/<md>/slaves/*/dev`) are exactly the claimed devices.
fn check_array_members(host: &HostAccess, md: &str, claims: &[Claim]) -> Result<(), PrepareError> {
    let dir = host.paths.sys(&format!("block/{md}/slaves"));
    let mut slaves: Vec<String> = std::fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("dev")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    let mut claimed: Vec<String> = claims.iter().filter_map(Claim::device_number).collect();
    slaves.sort();
    claimed.sort();
    if slaves != claimed {
        return Err(PrepareError::Raid(format!(
            "after mdadm --create, {md} holds {slaves:?}, not the claimed members {claimed:?}"
        )));
    }
    Ok(())
}

/// The md device stacked on a member (`md127`).
fn md_device(host: &HostAccess, member: &str) -> Result<String, PrepareError> {
    host.holders(member)
        .into_iter()
        .find(|h| h.starts_with("md"))
        .ok_or_else(|| PrepareError::Raid(format!("no md device holds {member}")))
}

fn raid0_reuse(
    cfg: &DisksConfig,
    host: &HostAccess,
    rec: &OwnedDisk,
    members: &[&Classified],
    report: &mut PrepareReport,
) -> Result<String, PrepareError> {
    let mut action = Vec::new();
    let md = match md_device(host, &members[0].disk.name) {
        Ok(md) => md,
        Err(_) => {
            let mut args = vec![
                "--assemble".to_string(),
                format!("/dev/md/{}", marker::MD_NAME),
            ];
            if let Some(u) = &rec.md_uuid {
                // mdadm prints array UUIDs as four colon-separated groups of 8 hex digits.
                let groups: Vec<&str> = (0..4).map(|i| &u[i * 8..i * 8 + 8]).collect();
                args.push(format!("--uuid={}", groups.join(":")));
            }
            args.extend(
                members
                    .iter()
                    .map(|c| host.tool_dev(&c.disk.name).display().to_string()),
            );
            host.run(move || {
                run_tool(
                    "mdadm",
                    &args,
                    Path::new("/dev/md/nodekeeper"),
                    MDADM_TIMEOUT,
                )
            })?;
            action.push("assembled");
            md_device(host, &members[0].disk.name)?
        }
    };
    let md_dev_local = host.paths.dev.join(&md);
    match marker::read_marker(&md_dev_local) {
        Ok(OnDisk::Filesystem { label, uuid, .. })
            if Some(&label) == rec.label.as_ref() && Some(&uuid) == rec.uuid.as_ref() => {}
        other => {
            return Err(PrepareError::Raid(format!(
                "array {md} is ours but its filesystem marker does not match ({other:?}); not formatting it"
            )));
        }
    }
    let want = host.tool_mount_path(RAID_KEY);
    let mounts = host.mounts_of(&md);
    if mounts.contains(&want) {
        action.push("already-mounted");
    } else if mounts.is_empty() {
        let (dev, fs, opts) = (
            host.tool_dev(&md),
            rec.fs_type.unwrap_or(cfg.fs_type),
            cfg.mount_options.clone(),
        );
        host.run(move || mount(&dev, &want, fs, &opts))?;
        action.push("mounted");
    } else {
        action.push("mounted-elsewhere");
    }
    report
        .prepared
        .push(raid_entry(host, rec, &md, members, false));
    Ok(action.join("+"))
}

fn raid_entry(
    host: &HostAccess,
    rec: &OwnedDisk,
    md: &str,
    members: &[&Classified],
    new: bool,
) -> PreparedDisk {
    PreparedDisk {
        key: RAID_KEY.into(),
        name: md.to_string(),
        by_id: None,
        model: "md raid0".into(),
        serial: rec.md_uuid.clone().unwrap_or_default(),
        size_bytes: host.size_of(md),
        mode: PrepareMode::Raid0,
        path: host.host_mount_path(RAID_KEY),
        fs_type: rec.fs_type,
        label: rec.label.clone(),
        uuid: rec.uuid.clone(),
        members: members.iter().map(|c| c.disk.name.clone()).collect(),
        new,
    }
}

// === wipe ===

/// `nodekeeper disks wipe BY_ID --confirm BY_ID`: refuses unless BY_ID is listed in
/// `disks.allowWipe` and `confirm` repeats it exactly, and unless the device is unmounted and
/// unheld; then `wipefs -a` and zeroes the first and last MiB. The by-id link is resolved under
/// HostPaths.dev (so tests point it at a temp `/dev` with a by-id link to a loop device).
/// Removes the disk from owned.json: a wiped disk is blank, not lost.
pub fn wipe(
    cfg: &DisksConfig,
    paths: &HostPaths,
    state_dir: &Path,
    by_id: &str,
    confirm: &str,
) -> Result<String, PrepareError> {
    if !cfg.allow_wipe.iter().any(|a| a == by_id) {
        return Err(PrepareError::Refused(format!(
            "refusing to wipe {by_id}: it is not listed in disks.allowWipe (exact /dev/disk/by-id/ paths only)"
        )));
    }
    if confirm != by_id {
        return Err(PrepareError::Refused(format!(
            "refusing to wipe {by_id}: --confirm must repeat the by-id path exactly (got {confirm:?})"
        )));
    }
    let rel = by_id.strip_prefix("/dev/").unwrap_or(by_id);
    let link = paths.dev.join(rel);
    let target = std::fs::read_link(&link).map_err(|e| {
        PrepareError::Refused(format!(
            "refusing to wipe {by_id}: {} is not a by-id link ({e})",
            link.display()
        ))
    })?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.is_empty() || !paths.sys(&format!("block/{name}")).exists() {
        return Err(PrepareError::Refused(format!(
            "refusing to wipe {by_id}: it points at {:?}, which is not a whole disk in {}",
            target.display().to_string(),
            paths.sys("block").display()
        )));
    }
    let _lock = lock_disks(state_dir, false)?;
    let host = HostAccess::new(paths, cfg);
    // A mounted or held partition is as much in use as the disk (#14).
    for part in host.partitions(&name) {
        if let Some(m) = host.mounts_of(&part).first() {
            return Err(PrepareError::Refused(format!(
                "refusing to wipe {by_id} ({name}): its partition {part} is mounted at {}; unmount it first",
                m.display()
            )));
        }
        let holders = host.holders(&format!("{name}/{part}"));
        if !holders.is_empty() {
            return Err(PrepareError::Refused(format!(
                "refusing to wipe {by_id} ({name}): its partition {part} is held by {} (stop the array / volume first)",
                holders.join(", ")
            )));
        }
    }
    let mounts = host.mounts_of(&name);
    if !mounts.is_empty() {
        return Err(PrepareError::Refused(format!(
            "refusing to wipe {by_id} ({name}): mounted at {}; unmount it first",
            mounts[0].display()
        )));
    }
    let holders = host.holders(&name);
    if !holders.is_empty() {
        return Err(PrepareError::Refused(format!(
            "refusing to wipe {by_id} ({name}): held by {} (stop the array / volume first)",
            holders.join(", ")
        )));
    }
    let size = host.size_of(&name);
    let dev = host.tool_dev(&name);
    host.run(move || {
        run_tool(
            "wipefs",
            &["-a".into(), dev.display().to_string()],
            &dev,
            WIPE_TIMEOUT,
        )?;
        // O_EXCL: the kernel refuses while the disk or a partition is mounted or held, even
        // if that happened after the checks above.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
            .open(&dev)
            .map_err(io_err(&dev))?;
        let zeros = vec![0u8; WIPE_EDGE_BYTES as usize];
        let edge = WIPE_EDGE_BYTES.min(size);
        f.write_all(&zeros[..edge as usize]).map_err(io_err(&dev))?;
        if size > edge {
            f.seek(SeekFrom::Start(size - edge)).map_err(io_err(&dev))?;
            f.write_all(&zeros[..edge as usize]).map_err(io_err(&dev))?;
        }
        f.sync_all().map_err(io_err(&dev))
    })?;
    let mut store = OwnedStore::load(state_dir)?;
    let key = by_id.rsplit('/').next().unwrap_or(by_id).to_string();
    if store.owned.disks.remove(&key).is_some() || store.owned.disks.remove(&name).is_some() {
        store.persist()?;
    }
    tracing::warn!(by_id, disk = %name, "disk wiped on operator request");
    Ok(format!(
        "wiped {by_id} ({name}): signatures erased, first and last MiB zeroed\n"
    ))
}

// === the cross-process lock ===

/// An exclusive `flock` on `<stateDir>/disks/lock`: the daemon's passes and reclaims and the
/// CLI's `disks prepare` / `disks wipe` never act on disks at the same time (#14). Released
/// when dropped (or when the process dies: the kernel drops flocks with the fd).
#[derive(Debug)]
pub struct DisksLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

/// Takes the disks lock: waits for it when `wait`, else refuses at once (`disks wipe`: an
/// operator is told, not made to wait behind a multi-minute mkfs).
pub fn lock_disks(state_dir: &Path, wait: bool) -> Result<DisksLock, PrepareError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = state_dir.join("disks/lock");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let file = crate::state_file::open_lock(&path).map_err(io_err(&path))?;
    let arg = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(file, arg) {
        Ok(lock) => Ok(DisksLock(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(PrepareError::Refused(format!(
            "refusing: another nodekeeper (the daemon's disks pass or another `disks` command) \
             holds {}; try again when it is done",
            path.display()
        ))),
        Err((_, e)) => Err(PrepareError::Io {
            path,
            error: e.to_string(),
        }),
    }
}

// === survey: discovery + inspection ===

/// Discovers and decides every disk (`report::list`: selection, in-use rules, inspection).
pub fn survey(cfg: &DisksConfig, paths: &HostPaths) -> Result<Vec<(Disk, Decision)>, PrepareError> {
    let reports =
        super::report::list(cfg, paths).map_err(|e| PrepareError::Discover(e.to_string()))?;
    Ok(reports.into_iter().map(|r| (r.disk, r.decision)).collect())
}

/// One-shot `nodekeeper disks prepare`.
pub fn prepare_once(
    cfg: &DisksConfig,
    paths: &HostPaths,
    state_dir: &Path,
) -> Result<PrepareReport, PrepareError> {
    let _lock = lock_disks(state_dir, true)?;
    let mut store = OwnedStore::load(state_dir)?;
    let decided = survey(cfg, paths)?;
    let host = HostAccess::new(paths, cfg);
    Ok(prepare(cfg, &host, &mut store, decided))
}

// === metrics ===

#[derive(Debug, Clone, Default)]
pub struct DisksMetrics {
    decisions: Family<Vec<(&'static str, &'static str)>, Gauge>,
    capacity: Family<Vec<(&'static str, String)>, Gauge>,
    used: Family<Vec<(&'static str, String)>, Gauge>,
    prepared: Counter,
    lost: Counter,
    errors: Family<Vec<(&'static str, &'static str)>, Counter>,
    wipes_refused: Family<Vec<(&'static str, &'static str)>, Counter>,
    state_unreadable: Family<Vec<(&'static str, &'static str)>, Gauge>,
    pv_name_collisions: Gauge,
}

impl DisksMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "disks",
            "Disks by the last pass's decision (candidate, ours, not-selected, in-use, has-data)",
            m.decisions.clone(),
        );
        registry.register(
            "disk_capacity_bytes",
            "Size of each prepared disk (or the raid0 array), by state key",
            m.capacity.clone(),
        );
        registry.register(
            "disk_used_bytes",
            "Bytes used on each mounted prepared disk (statvfs), by state key",
            m.used.clone(),
        );
        registry.register(
            "disks_prepared",
            "Disks formatted, created or published raw by this agent",
            m.prepared.clone(),
        );
        registry.register(
            "disks_lost",
            "Disks the state dir called ours that came back blank (stop/start), re-prepared",
            m.lost.clone(),
        );
        registry.register(
            "disks_errors",
            "Failed preparation passes or disks, by reason",
            m.errors.clone(),
        );
        registry.register(
            "disks_wipes_refused",
            "Owed wipes dropped (nothing written) because the disk is no longer provably ours, by reason",
            m.wipes_refused.clone(),
        );
        registry.register(
            "disks_state_unreadable",
            "1 while a disks state file (owned.json, published.json) cannot be trusted: no disk is formatted, published or wiped",
            m.state_unreadable.clone(),
        );
        registry.register(
            "disks_pv_name_collisions",
            "Prepared disks not published because their PV name is taken by another disk's PV (ids equal once made DNS-safe)",
            m.pv_name_collisions.clone(),
        );
        m
    }

    /// Whether the state file `file` (`owned.json`, `published.json`) can be trusted now.
    pub fn state_unreadable(&self, file: &'static str, unreadable: bool) {
        self.state_unreadable
            .get_or_create(&vec![("file", file)])
            .set(i64::from(unreadable));
    }

    /// Disks left unpublished by a PV name collision on the publisher's last pass.
    pub fn pv_name_collisions(&self, disks: usize) {
        self.pv_name_collisions.set(disks as i64);
    }

    /// Counts an owed wipe that was dropped (the PV publisher's reclaim).
    pub fn wipe_refused(&self, refused: &WipeRefused) {
        self.wipes_refused
            .get_or_create(&vec![("reason", refused.reason)])
            .inc();
    }

    fn observe(&self, host: &HostAccess, report: &PrepareReport) {
        self.decisions.clear();
        for d in &report.disks {
            let label = match d.decision {
                Decision::Candidate => "candidate",
                Decision::Ours => "ours",
                Decision::NotSelected(_) => "not-selected",
                Decision::InUse(_) => "in-use",
                Decision::HasData(_) => "has-data",
            };
            self.decisions
                .get_or_create(&vec![("decision", label)])
                .inc();
        }
        self.capacity.clear();
        self.used.clear();
        for p in &report.prepared {
            if p.new {
                self.prepared.inc();
            }
            self.capacity
                .get_or_create(&vec![("disk", p.key.clone())])
                .set(p.size_bytes as i64);
            if p.mode != PrepareMode::Block {
                let local = host.local_mount_path(&p.key);
                if let Ok(s) = nix::sys::statvfs::statvfs(&local) {
                    let used = (s.blocks() - s.blocks_free()) * s.fragment_size();
                    self.used
                        .get_or_create(&vec![("disk", p.key.clone())])
                        .set(used as i64);
                }
            }
        }
        self.lost.inc_by(report.lost.len() as u64);
        for f in &report.failures {
            self.errors.get_or_create(&vec![("reason", f.reason)]).inc();
        }
    }
}

// === status and the capability loop ===

/// What the disks capability knows now; the PV publisher and the API read it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DisksStatus {
    /// Passes completed.
    pub passes: u64,
    pub disks: Vec<DiskOutcome>,
    pub prepared: Vec<PreparedDisk>,
    /// Recent lost-disk reports (bounded), oldest first, for Events.
    pub lost: Vec<LostDisk>,
    /// Lost reports ever made: the publisher emits Events for entries past the count it saw.
    pub lost_total: u64,
    /// Recent disks that could not be prepared (bounded), oldest first, for Events.
    pub failures: Vec<DiskFailure>,
    /// Failure reports ever made (as `lost_total`).
    pub failures_total: u64,
    pub error: String,
    /// owned.json could not be trusted on the last pass (the error): nothing is formatted,
    /// published, deleted or wiped until a pass reads it again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
}

/// The `file` label of `nodekeeper_disks_state_unreadable` for `<stateDir>/disks/owned.json`.
pub const OWNED_FILE: &str = "owned.json";

pub type SharedDisksStatus = Arc<RwLock<DisksStatus>>;

/// What the disks capability runs with.
pub struct DisksTask {
    pub cfg: DisksConfig,
    pub paths: HostPaths,
    pub state_dir: PathBuf,
    pub metrics: DisksMetrics,
    pub status: SharedDisksStatus,
    /// Held during a pass; the PV publisher holds it while wiping.
    pub disk_ops: Arc<tokio::sync::Mutex<()>>,
}

/// The disks capability: every `disks.interval`, discover -> inspect -> prepare.
pub async fn run(
    task: DisksTask,
    health: Health,
    token: CancellationToken,
) -> Result<(), crate::runtime::TaskError> {
    let DisksTask {
        cfg,
        paths,
        state_dir,
        metrics,
        status,
        disk_ops,
    } = task;
    let host = HostAccess::new(&paths, &cfg);
    // owned.json is read every pass: one that cannot be trusted (empty, truncated, garbage, a
    // symlink) fails that pass only (nothing formatted, health DEGRADED, reported), and the
    // first pass after it is fixed recovers; the task never ends over it.
    let mut interval = tokio::time::interval(cfg.interval.get());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = interval.tick() => {}
        }
        let (c, p, h, sd) = (cfg.clone(), paths.clone(), host.clone(), state_dir.clone());
        // The PV publisher wipes disks under the same lock: a pass never sees a half-wiped disk.
        let _ops = disk_ops.lock().await;
        let pass = tokio::task::spawn_blocking(move || {
            // The CLI's `disks prepare`/`wipe` take the same flock. owned.json is read fresh
            // under it: one owner of ownership state, the file (a reclaim's new UUID, a
            // `disks wipe`'s removal are never overwritten by a stale in-memory copy).
            let _lock = lock_disks(&sd, true)?;
            let mut store = OwnedStore::load(&sd)?;
            survey(&c, &p).map(|decided| prepare(&c, &h, &mut store, decided))
        })
        .await;
        let result = match pass {
            Ok(r) => r,
            Err(e) => return Err(format!("disks pass panicked: {e}").into()),
        };
        let mut st = status.write().expect("not poisoned");
        st.passes += 1;
        match result {
            Ok(report) => {
                st.state_error = None;
                metrics.state_unreadable(OWNED_FILE, false);
                metrics.observe(&host, &report);
                st.lost_total += report.lost.len() as u64;
                st.lost.extend(report.lost.iter().cloned());
                let excess = st.lost.len().saturating_sub(MAX_LOST_REPORTS);
                st.lost.drain(..excess);
                st.failures_total += report.failures.len() as u64;
                st.failures.extend(report.failures.iter().cloned());
                let excess = st.failures.len().saturating_sub(MAX_LOST_REPORTS);
                st.failures.drain(..excess);
                st.error = report
                    .errors
                    .iter()
                    .map(|(k, e)| format!("{k}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                if st.error.is_empty() {
                    health.set(
                        super::CAPABILITY,
                        HealthState::Serving,
                        format!("{} prepared", report.prepared.len()),
                    );
                } else {
                    health.set(super::CAPABILITY, HealthState::Degraded, st.error.clone());
                }
                st.disks = report.disks;
                st.prepared = report.prepared;
            }
            Err(e) => {
                if matches!(e, PrepareError::State(_)) {
                    // The publisher reads this: no PV is published, deleted or wiped while the
                    // ownership record cannot be trusted; it raises the Event.
                    st.state_error = Some(e.to_string());
                    metrics.state_unreadable(OWNED_FILE, true);
                }
                tracing::error!(error = %e, "disks pass failed");
                metrics
                    .errors
                    .get_or_create(&vec![("reason", e.reason())])
                    .inc();
                st.error = e.to_string();
                health.set(super::CAPABILITY, HealthState::Degraded, e.to_string());
            }
        }
    }
}

// === reclaim ===

/// What a reclaim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reclaimed {
    /// Wiped per `disks.wipeMode` and still ours (filesystem modes: a new UUID recorded).
    Wiped,
    /// The disk is no longer provably ours (gone, re-bound, foreign, in use): nothing was
    /// written; the owed wipe is dropped and reported, never executed.
    NotOurs(WipeRefused),
}

/// Why an owed wipe was dropped (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WipeRefused {
    /// Low-cardinality label of `nodekeeper_disks_wipes_refused_total`: `not_recorded` (no
    /// ownership record), `gone` (no disk under its key), `identity` (not provably the disk
    /// recorded: by-id, serial, size, a re-bound name), `in_use` (mounted elsewhere,
    /// partitioned, held), `not_ours` (the marker or the single-signature rule fails); the
    /// publisher adds `rebound` and `another_pv` (`publish::wipe_allowed`).
    pub reason: &'static str,
    /// What an operator reads (log, Event).
    pub why: String,
}

impl WipeRefused {
    fn new(reason: &'static str, why: impl Into<String>) -> Self {
        Self {
            reason,
            why: why.into(),
        }
    }
}

impl std::fmt::Display for WipeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Where a recorded disk is now, by its key only: the by-id name when it had one (kernel
/// names move across reboots and EC2 stop/start), else the kernel name it was keyed by, which
/// the on-disk proof must then back. Never the record's kernel name as a fallback.
fn locate(disks: &[Disk], key: &str, rec: &OwnedDisk) -> Result<Disk, WipeRefused> {
    let found = disks.iter().find(|d| marker::disk_key(d) == key);
    let gone = |why: String| WipeRefused::new("gone", why);
    match (found, &rec.by_id) {
        (Some(d), _) => Ok(d.clone()),
        (None, Some(by_id)) => Err(gone(format!("{by_id} no longer resolves to a disk"))),
        (None, None) => Err(gone(format!(
            "no disk is keyed {key} now (it had no by-id link)"
        ))),
    }
}

/// Zeroes `[off, off + len)` through `f`: the kernel's write-zeroes (`fallocate` ZERO_RANGE
/// on a block device = BLKZEROOUT: the device guarantees zeroes, fast on NVMe/loop), else a
/// plain overwrite (regular files, devices without write-zeroes).
fn zero_range(f: &std::fs::File, dev: &Path, off: u64, len: u64) -> Result<(), PrepareError> {
    use nix::fcntl::{FallocateFlags, fallocate};
    if len == 0 {
        return Ok(());
    }
    let is_block = f
        .metadata()
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    if is_block
        && fallocate(
            f,
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
        .is_ok()
    {
        return f.sync_all().map_err(io_err(dev));
    }
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 4 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off + done)
            .map_err(io_err(dev))?;
        done += n as u64;
    }
    f.sync_all().map_err(io_err(dev))
}

/// Zeroes `bytes` at the start and the end of the device: signatures, superblocks, GPT backup.
fn zero_edges(f: &std::fs::File, dev: &Path, size: u64, bytes: u64) -> Result<(), PrepareError> {
    let edge = bytes.min(size);
    zero_range(f, dev, 0, edge)?;
    if size > edge {
        zero_range(f, dev, size - edge, edge)?;
    }
    Ok(())
}

/// Wipes a disk we own so the next tenant of its PV sees nothing of the last one, under the
/// same guards as formatting (#14): found by its key only (by-id; never a recorded kernel
/// name), proven ours on disk (the one rule of `classify`: marker equal to the record, no
/// partitions, no foreign holders, exactly one signature; block mode: see
/// `block_ownership_refused`), claimed `O_EXCL` and proven again through the fd, then erased
/// through the fd and, in filesystem modes, given a new filesystem through `/proc/self/fd/N`.
/// Filesystem and raid0 modes: the first and last MiB (`quick`, `discard` then
/// `blkdiscard`) or `zeroMib` MiB (`zero`) are zeroed, then our label and a new UUID (recorded
/// before mkfs). Block mode: the whole device is zeroed (the tenant owned every byte).
pub fn reclaim(
    cfg: &DisksConfig,
    host: &HostAccess,
    state_dir: &Path,
    key: &str,
) -> Result<Reclaimed, PrepareError> {
    let _lock = lock_disks(state_dir, true)?;
    let mut store = OwnedStore::load(state_dir)?;
    let Some(mut rec) = store.owned.disks.get(key).cloned() else {
        return Ok(Reclaimed::NotOurs(WipeRefused::new(
            "not_recorded",
            format!("{key} is not recorded as ours"),
        )));
    };
    let scan =
        super::discover::scan(&host.paths).map_err(|e| PrepareError::Discover(e.to_string()))?;
    // The device to wipe and the disk whose ownership proves it.
    let disk = if key == RAID_KEY {
        match raid_device(host, &scan, &store, &rec) {
            Ok(d) => d,
            Err(why) => return Ok(Reclaimed::NotOurs(why)),
        }
    } else {
        let disk = match locate(&scan.disks, key, &rec) {
            Ok(d) => d,
            Err(why) => return Ok(Reclaimed::NotOurs(why)),
        };
        let refused = if rec.mode == PrepareMode::Block {
            block_ownership_refused(&disk, &rec)
        } else {
            let c = classify(
                vec![(disk.clone(), Decision::HasData("reclaim".into()))],
                &store,
            );
            match c.first().map(|c| &c.decision) {
                Some(Decision::Ours) => None,
                Some(Decision::InUse(r)) => Some(WipeRefused::new("in_use", r.clone())),
                Some(Decision::HasData(r)) if r != "reclaim" => {
                    Some(WipeRefused::new("not_ours", r.clone()))
                }
                _ => Some(WipeRefused::new(
                    "not_ours",
                    "its marker does not match the record",
                )),
            }
        };
        if let Some(r) = refused {
            let why = format!("{} ({key}): {}", disk.name, r.why);
            return Ok(Reclaimed::NotOurs(WipeRefused { why, ..r }));
        }
        disk
    };
    let name = disk.name.clone();
    let ours_at = host.tool_mount_path(key);
    let mounts = host.mounts_of(&name);
    if let Some(other) = mounts.iter().find(|m| **m != ours_at) {
        return Ok(Reclaimed::NotOurs(WipeRefused::new(
            "in_use",
            format!(
                "{name} ({key}) is mounted at {} (not the agent's mount point)",
                other.display()
            ),
        )));
    }
    if rec.mode == PrepareMode::Block {
        let mut claim = match Claim::take_owned(&host.paths, &disk, |_| Ok(())) {
            Ok(c) => c,
            Err(super::claim::ClaimError::Identity { what, .. }) => {
                return Ok(Reclaimed::NotOurs(WipeRefused::new(
                    "identity",
                    format!("{name} ({key}): {what}"),
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let dev = disk.dev_path.clone();
        if let Some(f) = claim.exclusive_file() {
            zero_range(f, &dev, 0, disk.size_bytes)?;
        }
        claim.release_exclusive();
        tracing::info!(disk = key, device = %name, "block disk zeroed for its next tenant");
        return Ok(Reclaimed::Wiped);
    }
    let fs = rec.fs_type.unwrap_or(cfg.fs_type);
    if !mounts.is_empty() {
        let (dir, dev) = (ours_at.clone(), host.tool_dev(&name));
        host.run(move || {
            run_tool("umount", &[dir.display().to_string()], &dev, MOUNT_TIMEOUT).map(|_| ())
        })?;
    }
    // Proven again through the claimed fd: the marker we recorded, and nothing else.
    let (want_label, want_uuid, kind) = (rec.label.clone(), rec.uuid.clone(), fs_name(fs));
    let prove = |f: &std::fs::File| -> Result<(), super::claim::ClaimError> {
        let not_ours = |reason: String| super::claim::ClaimError::NotOurs {
            disk: name.clone(),
            reason,
        };
        let mut head = vec![0u8; 8192];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut head, 0)
            .map_err(|e| not_ours(format!("read: {e}")))?;
        match marker::parse_marker(&head) {
            OnDisk::Filesystem { label, uuid, .. }
                if Some(&label) == want_label.as_ref() && Some(&uuid) == want_uuid.as_ref() => {}
            other => return Err(not_ours(format!("marker {other:?}"))),
        }
        let ins =
            inspect::inspect_file(f, &disk.dev_path, inspect::Options { cross_check: false })?;
        if ins.signatures.len() == 1 && ins.signatures[0].kind == kind {
            Ok(())
        } else {
            Err(not_ours(ins.reason()))
        }
    };
    let mut claim = match Claim::take_owned(&host.paths, &disk, prove) {
        Ok(c) => c,
        Err(e @ super::claim::ClaimError::NotOurs { .. }) => {
            return Ok(Reclaimed::NotOurs(WipeRefused::new(
                "not_ours",
                e.to_string(),
            )));
        }
        Err(e @ super::claim::ClaimError::Identity { .. }) => {
            return Ok(Reclaimed::NotOurs(WipeRefused::new(
                "identity",
                e.to_string(),
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let zero_bytes = if cfg.wipe_mode == WipeMode::Zero {
        cfg.zero_mib << 20
    } else {
        WIPE_EDGE_BYTES
    };
    if let Some(f) = claim.exclusive_file() {
        zero_edges(f, &disk.dev_path, disk.size_bytes, zero_bytes)?;
    }
    let label = rec.label.clone().unwrap_or_else(|| marker::label_for(key));
    let uuid = marker::new_uuid().map_err(io_err(Path::new("/dev/urandom")))?;
    // Recorded before mkfs: a crash mid-mkfs leaves a blank disk, reported lost, re-prepared.
    rec.uuid = Some(uuid.clone());
    rec.label = Some(label.clone());
    store.owned.disks.insert(key.to_string(), rec);
    store.persist()?;
    if cfg.wipe_mode == WipeMode::Discard {
        // blkdiscard claims the device itself; through the fd, never the name.
        claim.release_exclusive();
        let dev = claim.tool_path();
        let _ = host.run(move || {
            run_tool(
                "blkdiscard",
                &[dev.display().to_string()],
                &dev,
                WIPE_TIMEOUT,
            )
        });
    }
    let opts = FormatOptions {
        fs,
        mkfs_options: cfg.mkfs_options.clone(),
        mount_options: cfg.mount_options.clone(),
    };
    format_claimed_and_mount(&opts, host, &mut claim, &name, key, &label, &uuid)?;
    drop(claim);
    tracing::info!(disk = key, device = %name, mode = ?cfg.wipe_mode, "disk wiped for its next tenant");
    Ok(Reclaimed::Wiped)
}

/// Block mode has no marker on the disk (the tenant owns every byte), so a block disk is
/// ours to wipe only by a recorded by-id identity (#14): the record has a by-id link, the disk
/// found under it has the recorded serial and size, and nothing uses it (no partitions,
/// holders or mounts). A block disk recorded without a by-id link (loop, some virtio disks)
/// is never wiped by the agent.
fn block_ownership_refused(disk: &Disk, rec: &OwnedDisk) -> Option<WipeRefused> {
    if rec.by_id.is_none() || disk.by_id != rec.by_id {
        return Some(WipeRefused::new(
            "identity",
            "block mode: no recorded by-id identity to prove the disk is the one published \
             (never wiped by kernel name)",
        ));
    }
    if disk.serial != rec.serial || disk.size_bytes != rec.size_bytes {
        return Some(WipeRefused::new(
            "identity",
            format!(
                "block mode: serial/size {:?}/{} differ from the record {:?}/{}",
                disk.serial, disk.size_bytes, rec.serial, rec.size_bytes
            ),
        ));
    }
    let in_use = |why: String| Some(WipeRefused::new("in_use", why));
    if !disk.partitions.is_empty() {
        return in_use(format!("has partitions {}", disk.partitions.join(", ")));
    }
    if !disk.holders.is_empty() {
        return in_use(format!("held by {}", disk.holders.join(", ")));
    }
    if let Some(m) = disk.mounts.first() {
        return in_use(format!("mounted at {m}"));
    }
    None
}

/// The array's md device, found through its members' keys (never a member key used as a
/// kernel name), as a `Disk` for the claim; every member must still be ours.
fn raid_device(
    host: &HostAccess,
    scan: &super::discover::Scan,
    store: &OwnedStore,
    rec: &OwnedDisk,
) -> Result<Disk, WipeRefused> {
    let mut members = Vec::new();
    for m in &rec.members {
        let d = scan
            .disks
            .iter()
            .find(|d| marker::disk_key(d) == *m)
            .ok_or_else(|| WipeRefused::new("gone", format!("raid0 member {m} is gone")))?;
        members.push((d.clone(), Decision::HasData("reclaim".into())));
    }
    let classified = classify(members, store);
    if let Some(c) = classified.iter().find(|c| c.decision != Decision::Ours) {
        return Err(WipeRefused::new(
            "not_ours",
            format!("raid0 member {} is no longer ours", c.key),
        ));
    }
    let first = classified.first().ok_or_else(|| {
        WipeRefused::new(
            "not_recorded",
            format!("{RAID_KEY} is recorded with no members"),
        )
    })?;
    let gone = |why: String| WipeRefused::new("gone", why);
    let md = md_device(host, &first.disk.name).map_err(|e| gone(e.to_string()))?;
    scan.virtual_devices
        .iter()
        .find(|d| d.name == md)
        .cloned()
        .ok_or_else(|| gone(format!("{md} is not in sysfs")))
}

impl DisksStatus {
    /// The status as the gRPC API reports it.
    pub fn to_pb(&self) -> Vec<crate::pb::DiskStatus> {
        self.disks
            .iter()
            .map(|d| {
                let (decision, reason) = match &d.decision {
                    Decision::Candidate => ("candidate", String::new()),
                    Decision::Ours => ("ours", String::new()),
                    Decision::NotSelected(r) => ("not-selected", r.clone()),
                    Decision::InUse(r) => ("in-use", r.clone()),
                    Decision::HasData(r) => ("has-data", r.clone()),
                };
                let prepared = self.prepared.iter().find(|p| p.key == d.key);
                crate::pb::DiskStatus {
                    name: d.name.clone(),
                    key: d.key.clone(),
                    decision: decision.into(),
                    reason,
                    action: d.action.clone(),
                    path: prepared
                        .map(|p| p.path.display().to_string())
                        .unwrap_or_default(),
                    size_bytes: prepared.map(|p| p.size_bytes).unwrap_or_default(),
                }
            })
            .collect()
    }
}
