//! Discovery of block devices through HostPaths (sysfs, /dev/disk/by-id, host mountinfo) and the
//! selection rules of `disks.*`.
//!
//! Owns: what exists (`/sys/block`, `/sys/class/nvme`), what it is called (`/dev/disk/by-id`),
//! what is in use (host mountinfo, holders, partitions) and whether config selects it.
//! Never opens a device: reading the device itself is `inspect`'s job, and only for disks that
//! are selected and not in use. Never writes anything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::host::HostPaths;

use super::{Disk, DisksConfig};

/// Kernel name prefixes of virtual block devices that are never disks to prepare: RAM disks,
/// compressed swap, device-mapper and md targets (they are *holders* of disks), optical drives
/// and floppies. Loop devices are kept: they are how tests (and some operators) hand the agent a
/// disk, and an unbound loop has size 0 so it is never selected anyway.
pub const VIRTUAL_PREFIXES: &[&str] = &["ram", "zram", "dm-", "md", "sr", "fd"];

/// How deep holder chains (disk -> md -> dm -> ...) are followed when looking for mounts. Real
/// stacks are 2-3 deep; the bound keeps a malformed sysfs from looping.
const MAX_HOLDER_DEPTH: usize = 8;

/// Mount points named in a reason before "and N more".
const MAX_MOUNTS_IN_REASON: usize = 3;

/// The by-id link prefixes in order of preference: NVMe model+serial names, then NVMe EUI/NGUID,
/// then WWN (world-wide, survives moving the disk), then SCSI VPD names; anything else (ata-,
/// usb-, virtio-, ...) after them.
const BY_ID_PREFERENCE: &[&str] = &["nvme-eui.", "nvme-nvme.", "nvme-", "wwn-", "scsi-"];

/// Errors of discovery. Per-device problems (a device vanishing mid-scan, a missing attribute)
/// are not errors: the device is skipped or the attribute left at its default.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// `/sys/block` (under HostPaths.sys) cannot be listed: no sysfs, or the wrong root.
    #[error("reading {path}: {source}")]
    SysBlock {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DiscoverError {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            DiscoverError::SysBlock { .. } => "sys_block",
        }
    }
}

/// One mount from the host's mountinfo (`host::mountinfo`).
pub use crate::host::mountinfo::Mount;

/// Everything one scan found: the disks and the virtual devices skipped as never-disks.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub disks: Vec<Disk>,
    /// Virtual devices (`zram0`, `dm-0`...), named so a listing can show them.
    pub virtual_devices: Vec<Disk>,
    /// Why a disk is held by a stacked device that is mounted: kernel name -> "held by dm-0
    /// (mounted at /)". Computed here because it needs the holder graph.
    pub holder_mounts: std::collections::BTreeMap<String, Vec<(String, String)>>,
}

// === discovery ===

/// Lists every block device under `<sys>/block`, fills `Disk` for each, sorted by name.
pub fn scan(host: &HostPaths) -> Result<Scan, DiscoverError> {
    let block = host.sys("block");
    let entries = std::fs::read_dir(&block).map_err(|source| DiscoverError::SysBlock {
        path: block.clone(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mounts = read_mountinfo(host);
    let links = by_id_links(host);
    let mut out = Scan::default();
    for name in names {
        let sys = block.join(&name);
        let mut disk = read_disk(host, &sys, &name, &links);
        if is_virtual(&name) {
            out.virtual_devices.push(disk);
            continue;
        }
        let devs = device_numbers(&sys, &disk.partitions);
        let own: Vec<&Mount> = mounts
            .iter()
            .filter(|m| mount_matches(m, &devs, &name, &disk.partitions))
            .collect();
        disk.mounts = own.iter().map(|m| m.mount_point.clone()).collect();
        dedup_keep_order(&mut disk.mounts);
        let through_holders = holder_mounts(&block, &disk.holders, &mounts);
        disk.backs_root =
            disk.mounts.iter().any(|m| m == "/") || through_holders.iter().any(|(_, m)| m == "/");
        if !through_holders.is_empty() {
            out.holder_mounts.insert(name.clone(), through_holders);
        }
        out.disks.push(disk);
    }
    Ok(out)
}

/// True for kernel names that are virtual devices, never disks (see `VIRTUAL_PREFIXES`).
pub fn is_virtual(name: &str) -> bool {
    VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn read_disk(host: &HostPaths, sys: &Path, name: &str, links: &[(String, String)]) -> Disk {
    let attr = |rel: &str| read_trimmed(&sys.join(rel));
    let num = |rel: &str| attr(rel).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    // NVMe namespaces (`nvme1n1`) carry model and serial on their controller: `device/` is a
    // link to it; `/sys/class/nvme/nvme1` is the same controller by name.
    let controller = nvme_controller(name).map(|c| host.sys("class/nvme").join(c));
    let from_device_or_ctrl = |file: &str| {
        attr(&format!("device/{file}"))
            .or_else(|| {
                controller
                    .as_ref()
                    .and_then(|c| read_trimmed(&c.join(file)))
            })
            .unwrap_or_default()
    };
    let mut partitions: Vec<String> = std::fs::read_dir(sys)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("partition").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    partitions.sort();
    let mut holders: BTreeSet<String> = list_dir(&sys.join("holders")).into_iter().collect();
    for p in &partitions {
        holders.extend(list_dir(&sys.join(p).join("holders")));
    }
    let mut own_links: Vec<String> = links
        .iter()
        .filter(|(_, target)| target == name)
        .map(|(link, _)| format!("/dev/disk/by-id/{link}"))
        .collect();
    own_links.sort_by_key(|l| by_id_rank(l));
    Disk {
        name: name.to_string(),
        dev_path: host.dev.join(name),
        by_id: own_links.first().cloned(),
        by_id_links: own_links,
        model: from_device_or_ctrl("model"),
        serial: from_device_or_ctrl("serial"),
        size_bytes: num("size").saturating_mul(512),
        rotational: attr("queue/rotational").as_deref() == Some("1"),
        logical_block_size: num("queue/logical_block_size"),
        physical_block_size: num("queue/physical_block_size"),
        partitions,
        holders: holders.into_iter().collect(),
        mounts: Vec::new(),
        backs_root: false,
    }
}

/// `nvme1n1` -> `nvme1` (the controller that usually carries the namespace); None otherwise.
fn nvme_controller(name: &str) -> Option<String> {
    let rest = name.strip_prefix("nvme")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    (!digits.is_empty() && rest[digits.len()..].starts_with('n')).then(|| format!("nvme{digits}"))
}

/// Rank of a by-id path: lower is preferred (see `BY_ID_PREFERENCE`), then by name.
fn by_id_rank(link: &str) -> (usize, String) {
    let base = link.rsplit('/').next().unwrap_or(link);
    // `nvme-<model>_<serial>` is the readable name; the EUI/NGUID forms are ranked after it
    // because they are opaque, but all NVMe names rank before wwn-/scsi-.
    let rank = if base.starts_with("nvme-eui.") || base.starts_with("nvme-nvme.") {
        1
    } else if base.starts_with("nvme-") {
        0
    } else {
        BY_ID_PREFERENCE
            .iter()
            .position(|p| base.starts_with(p))
            .unwrap_or(BY_ID_PREFERENCE.len())
    };
    (rank, base.to_string())
}

/// `(link name, kernel name it resolves to)` for every whole-device link in
/// `<dev>/disk/by-id`. Links to partitions (`-partN`) are left out. Targets are resolved by
/// reading the link (`../../nvme1n1`), not by following it, so a fake /dev in a temp dir works.
fn by_id_links(host: &HostPaths) -> Vec<(String, String)> {
    let dir = host.dev.join("disk/by-id");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let link = e.file_name().to_string_lossy().into_owned();
        if link.contains("-part") {
            continue;
        }
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        // A relative target resolves against the by-id dir; only its last component (the
        // kernel name in /dev) matters.
        let resolved = if target.is_absolute() {
            target
        } else {
            dir.join(target)
        };
        if let Some(name) = resolved.file_name() {
            out.push((link, name.to_string_lossy().into_owned()));
        }
    }
    out
}

/// `major:minor` of the device and of each partition.
fn device_numbers(sys: &Path, partitions: &[String]) -> Vec<String> {
    std::iter::once(sys.join("dev"))
        .chain(partitions.iter().map(|p| sys.join(p).join("dev")))
        .filter_map(|p| read_trimmed(&p))
        .collect()
}

fn mount_matches(m: &Mount, devs: &[String], name: &str, partitions: &[String]) -> bool {
    if devs.contains(&m.dev) {
        return true;
    }
    // btrfs (and other multi-device filesystems) show an anonymous 0:N device number; the
    // source still names the device.
    let source = m.source.strip_prefix("/dev/").unwrap_or("");
    !source.is_empty() && (source == name || partitions.iter().any(|p| p == source))
}

/// Mounts reached through holders (disk -> md127 -> dm-0 mounted at /): `(holder, mount point)`.
fn holder_mounts(block: &Path, holders: &[String], mounts: &[Mount]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut frontier: Vec<(String, usize)> = holders.iter().map(|h| (h.clone(), 1)).collect();
    while let Some((h, depth)) = frontier.pop() {
        if depth > MAX_HOLDER_DEPTH || !seen.insert(h.clone()) {
            continue;
        }
        let sys = block.join(&h);
        let parts: Vec<String> = std::fs::read_dir(&sys)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("partition").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let devs = device_numbers(&sys, &parts);
        for m in mounts
            .iter()
            .filter(|m| mount_matches(m, &devs, &h, &parts))
        {
            out.push((h.clone(), m.mount_point.clone()));
        }
        for next in list_dir(&sys.join("holders")) {
            frontier.push((next, depth + 1));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The host's mounts (`host::mountinfo::read_host`: PID 1's, else our own). Unreadable both:
/// no mounts are known, and the caller still never writes a device without inspecting it.
pub fn read_mountinfo(host: &HostPaths) -> Vec<Mount> {
    crate::host::mountinfo::read_host(host)
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn list_dir(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn dedup_keep_order(v: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    v.retain(|x| seen.insert(x.clone()));
}

// === selection ===

/// Whether config selects the disk: `Ok(why)` or `Err(why not)`. Exclusion and size win over
/// every selector; a disk of size 0 (no medium, an unbound loop device) is never selected.
pub fn select(cfg: &DisksConfig, disk: &Disk) -> Result<String, String> {
    if let Some(e) = cfg.exclude.iter().find(|e| excluded_by(e, disk)) {
        return Err(format!("excluded by config (disks.exclude: {e})"));
    }
    if disk.size_bytes == 0 {
        return Err("size 0 (no medium, or an unbound loop device)".into());
    }
    if disk.size_bytes < cfg.min_size_bytes {
        return Err(format!(
            "smaller than disks.minSizeBytes ({} < {})",
            human_size(disk.size_bytes),
            human_size(cfg.min_size_bytes)
        ));
    }
    if cfg.devices.contains(&disk.name) {
        return Ok("listed in disks.devices".into());
    }
    if let Some(p) = cfg
        .model_patterns
        .iter()
        .find(|p| !disk.model.is_empty() && glob(p, &disk.model))
    {
        return Ok(format!("model matches disks.modelPatterns {p:?}"));
    }
    for g in &cfg.by_id_globs {
        if disk.by_id_links.iter().any(|l| link_matches(g, l)) {
            return Ok(format!("by-id link matches disks.byIdGlobs {g:?}"));
        }
    }
    Err(if disk.model.is_empty() {
        "not selected by config (not in disks.devices, no by-id glob matches)".into()
    } else {
        format!(
            "not selected by config (model {:?} matches no disks.modelPatterns)",
            disk.model
        )
    })
}

/// An exclude entry: a kernel name, a by-id path or link name, or a glob over either.
fn excluded_by(e: &str, disk: &Disk) -> bool {
    glob(e, &disk.name) || disk.by_id_links.iter().any(|l| link_matches(e, l))
}

/// A by-id glob with a `/` matches the full path; without, the link's name.
fn link_matches(pattern: &str, link: &str) -> bool {
    if pattern.contains('/') {
        glob(pattern, link)
    } else {
        glob(pattern, link.rsplit('/').next().unwrap_or(link))
    }
}

/// Why a selected disk is in use, or None: backs `/`, mounted, held (md/LVM/dm), partitioned.
pub fn in_use(disk: &Disk, holder_mounts: &[(String, String)]) -> Option<String> {
    if disk.backs_root {
        if disk.mounts.iter().any(|m| m == "/") {
            return Some("backs / (mounted at /)".into());
        }
        if let Some((h, _)) = holder_mounts.iter().find(|(_, m)| m == "/") {
            return Some(format!("backs / (through {h})"));
        }
    }
    if !disk.mounts.is_empty() {
        return Some(format!("mounted at {}", list_some(&disk.mounts)));
    }
    if !holder_mounts.is_empty() {
        let (h, _) = &holder_mounts[0];
        let points: Vec<String> = holder_mounts.iter().map(|(_, m)| m.clone()).collect();
        return Some(format!("held by {h} (mounted at {})", list_some(&points)));
    }
    if !disk.holders.is_empty() {
        return Some(format!(
            "held by {} (md/LVM/device-mapper)",
            disk.holders.join(", ")
        ));
    }
    if !disk.partitions.is_empty() {
        return Some(format!("has partitions {}", disk.partitions.join(", ")));
    }
    None
}

fn list_some(v: &[String]) -> String {
    if v.len() <= MAX_MOUNTS_IN_REASON {
        v.join(", ")
    } else {
        format!(
            "{} and {} more",
            v[..MAX_MOUNTS_IN_REASON].join(", "),
            v.len() - MAX_MOUNTS_IN_REASON
        )
    }
}

/// Shell-style glob: `*` any run, `?` one character, everything else literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Sizes as lsblk prints them: binary units, one decimal below 10 (`512B`, `1.5G`, `320M`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "K", "M", "G", "T", "P", "E"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else if v < 10.0 && v.fract() >= 0.05 {
        format!("{v:.1}{}", UNITS[u])
    } else {
        format!("{}{}", v.round() as u64, UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(
            "Amazon EC2 NVMe Instance Storage*",
            "Amazon EC2 NVMe Instance Storage"
        ));
        assert!(glob(
            "nvme-*_AWS*",
            "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS123"
        ));
        assert!(glob("loop?", "loop7"));
        assert!(!glob("loop?", "loop17"));
        assert!(!glob("nvme*", "sda"));
        assert!(glob("*", ""));
    }

    #[test]
    fn sizes_like_lsblk() {
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(320 << 20), "320M");
        assert_eq!(human_size(1536 << 20), "1.5G");
        assert_eq!(human_size(256 << 30), "256G");
    }

    #[test]
    fn nvme_controller_names() {
        assert_eq!(nvme_controller("nvme1n1").as_deref(), Some("nvme1"));
        assert_eq!(nvme_controller("nvme12n3").as_deref(), Some("nvme12"));
        assert_eq!(nvme_controller("nvme1"), None);
        assert_eq!(nvme_controller("sda"), None);
    }
}
