//! The decision per block device, as `nodekeeper disks list` prints it and gRPC `GetNode` will
//! return it: discovery -> selection -> in-use checks -> inspection -> `Decision`.
//!
//! Owns the order of the checks and the rendering (table, JSON). Never writes a device: only
//! disks that are selected and not in use are opened, read-only, by `inspect`.
//! `Decision::Ours` is not produced here: `prepare` upgrades a `HasData` disk whose
//! `Inspection::filesystem` carries its marker.

use serde::Serialize;

use super::discover::{self, DiscoverError};
use super::inspect::{self, Inspection};
use super::{Decision, Disk, DisksConfig};
use crate::host::HostPaths;

/// One block device and what the agent decided about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskReport {
    #[serde(flatten)]
    pub disk: Disk,
    /// `decision` (`candidate`, `not-selected`, `in-use`, `has-data`) and `reason`.
    #[serde(flatten)]
    pub decision: Decision,
    /// Why config selected it (`listed in disks.devices`); None when not selected.
    pub selected_by: Option<String>,
    /// What inspection found; None when the disk was not inspected (not selected, in use).
    pub inspection: Option<Inspection>,
}

impl DiskReport {
    /// The reason column: the decision's reason, or for a candidate why it was picked.
    pub fn reason(&self) -> String {
        match &self.decision {
            Decision::NotSelected(r) | Decision::InUse(r) | Decision::HasData(r) => r.clone(),
            Decision::Candidate | Decision::Ours => {
                let why = self.selected_by.clone().unwrap_or_default();
                match &self.inspection {
                    Some(i) => format!("{why}; {}", i.reason()),
                    None => why,
                }
            }
        }
    }

    /// The decision column, as the JSON `decision` field spells it.
    pub fn decision_name(&self) -> &'static str {
        match self.decision {
            Decision::Candidate => "candidate",
            Decision::Ours => "ours",
            Decision::NotSelected(_) => "not-selected",
            Decision::InUse(_) => "in-use",
            Decision::HasData(_) => "has-data",
        }
    }
}

/// Discovers every block device and decides about each: the library side of `disks list`
/// and of gRPC `GetNode`. Blocking (sysfs reads, device reads, `blkid`/`wipefs` runs): call it
/// from `tokio::task::spawn_blocking` in async code.
pub fn list(cfg: &DisksConfig, host: &HostPaths) -> Result<Vec<DiskReport>, DiscoverError> {
    let scan = discover::scan(host)?;
    let opts = inspect::Options {
        cross_check: cfg.cross_check,
    };
    let mut out: Vec<DiskReport> = scan
        .disks
        .into_iter()
        .map(|disk| {
            let via = scan
                .holder_mounts
                .get(&disk.name)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            decide(cfg, disk, via, opts)
        })
        .collect();
    out.extend(scan.virtual_devices.into_iter().map(|disk| DiskReport {
        decision: Decision::NotSelected(format!(
            "virtual device ({}), never a disk",
            kind_of_virtual(&disk.name)
        )),
        disk,
        selected_by: None,
        inspection: None,
    }));
    out.sort_by_key(|a| natural_key(&a.disk.name));
    Ok(out)
}

/// The decision for one discovered disk. Order: selection, then in use, then inspection (only
/// a selected, unused disk is ever opened).
pub fn decide(
    cfg: &DisksConfig,
    disk: Disk,
    holder_mounts: &[(String, String)],
    opts: inspect::Options,
) -> DiskReport {
    let in_use = discover::in_use(&disk, holder_mounts);
    let selected_by = match discover::select(cfg, &disk) {
        Ok(why) => why,
        Err(why_not) => {
            // Not ours to consider; still say when it is in use, as lsblk would show.
            let reason = match in_use {
                Some(u) => format!("{why_not}; {u}"),
                None => why_not,
            };
            return DiskReport {
                disk,
                decision: Decision::NotSelected(reason),
                selected_by: None,
                inspection: None,
            };
        }
    };
    if let Some(u) = in_use {
        return DiskReport {
            disk,
            decision: Decision::InUse(u),
            selected_by: Some(selected_by),
            inspection: None,
        };
    }
    let (decision, inspection) = match inspect::inspect(&disk.dev_path, opts) {
        Ok(i) if i.is_blank() => (Decision::Candidate, Some(i)),
        Ok(i) => (Decision::HasData(i.reason()), Some(i)),
        // Could not look: treated as holding data, never as blank.
        Err(e) => (
            Decision::HasData(format!("not inspectable, treated as holding data: {e}")),
            None,
        ),
    };
    DiskReport {
        disk,
        decision,
        selected_by: Some(selected_by),
        inspection,
    }
}

/// `loop2` before `loop10`: the name split into its text and its number.
fn natural_key(name: &str) -> (String, u64, String) {
    let split = name
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(name.len());
    let (text, rest) = name.split_at(split);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (
        text.to_string(),
        digits.parse().unwrap_or(0),
        rest[digits.len()..].to_string(),
    )
}

fn kind_of_virtual(name: &str) -> &'static str {
    match name {
        n if n.starts_with("zram") => "compressed RAM",
        n if n.starts_with("ram") => "RAM disk",
        n if n.starts_with("dm-") => "device-mapper",
        n if n.starts_with("md") => "md RAID",
        n if n.starts_with("sr") => "optical drive",
        _ => "floppy",
    }
}

// === rendering ===

/// A table like lsblk's: NAME, BY-ID, MODEL, SIZE, DECISION, REASON.
pub fn table(reports: &[DiskReport]) -> String {
    let rows: Vec<[String; 6]> = reports
        .iter()
        .map(|r| {
            [
                r.disk.name.clone(),
                r.disk
                    .by_id
                    .as_deref()
                    .map(|l| l.trim_start_matches("/dev/disk/by-id/").to_string())
                    .unwrap_or_else(|| "-".into()),
                if r.disk.model.is_empty() {
                    "-".into()
                } else {
                    r.disk.model.clone()
                },
                discover::human_size(r.disk.size_bytes),
                r.decision_name().to_string(),
                r.reason(),
            ]
        })
        .collect();
    let header = ["NAME", "BY-ID", "MODEL", "SIZE", "DECISION", "REASON"];
    let mut width = header.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 6]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 5 {
                l.push_str(c);
            } else if i == 3 {
                // Sizes right-aligned, as lsblk does.
                l.push_str(&format!("{c:>w$}  ", w = width[i]));
            } else {
                l.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
    }
    out
}

/// `{"disks": [...]}`, one object per device (the `DiskReport` fields, camelCase).
pub fn json(reports: &[DiskReport]) -> String {
    serde_json::to_string_pretty(&serde_json::json!({ "disks": reports }))
        .expect("reports serialize")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use super::*;

    /// A fake host in a temp dir: sysfs block devices, /dev files, by-id links, mountinfo.
    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new(mountinfo: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            for d in ["sys/block", "sys/class/nvme", "dev/disk/by-id", "proc/1"] {
                std::fs::create_dir_all(dir.path().join(d)).unwrap();
            }
            std::fs::write(dir.path().join("proc/1/mountinfo"), mountinfo).unwrap();
            FakeHost { dir }
        }

        fn host(&self) -> HostPaths {
            HostPaths::under(self.dir.path())
        }

        fn write(&self, rel: &str, content: &str) {
            let p = self.dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }

        /// A whole disk: sysfs attributes and a zeroed 8 MiB /dev file.
        fn disk(&self, name: &str, dev: &str, model: &str, size_bytes: u64) -> &Self {
            let b = format!("sys/block/{name}");
            self.write(&format!("{b}/size"), &format!("{}\n", size_bytes / 512));
            self.write(&format!("{b}/dev"), &format!("{dev}\n"));
            self.write(&format!("{b}/queue/rotational"), "0\n");
            self.write(&format!("{b}/queue/logical_block_size"), "512\n");
            self.write(&format!("{b}/queue/physical_block_size"), "4096\n");
            std::fs::create_dir_all(self.dir.path().join(format!("{b}/holders"))).unwrap();
            if !model.is_empty() {
                self.write(&format!("{b}/device/model"), &format!("{model}   \n"));
                self.write(&format!("{b}/device/serial"), "AWS123\n");
            }
            let f = std::fs::File::create(self.dir.path().join("dev").join(name)).unwrap();
            f.set_len(8 << 20).unwrap();
            self
        }

        fn partition(&self, disk: &str, part: &str, dev: &str) -> &Self {
            let b = format!("sys/block/{disk}/{part}");
            self.write(&format!("{b}/partition"), "1\n");
            self.write(&format!("{b}/dev"), &format!("{dev}\n"));
            self
        }

        fn holder(&self, disk: &str, holder: &str, dev: &str) -> &Self {
            std::fs::create_dir_all(
                self.dir
                    .path()
                    .join(format!("sys/block/{disk}/holders/{holder}")),
            )
            .unwrap();
            self.write(&format!("sys/block/{holder}/dev"), &format!("{dev}\n"));
            self.write(&format!("sys/block/{holder}/size"), "16384\n");
            self
        }

        fn by_id(&self, link: &str, target: &str) -> &Self {
            symlink(
                format!("../../{target}"),
                self.dir.path().join("dev/disk/by-id").join(link),
            )
            .unwrap();
            self
        }

        fn dev_file(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join("dev").join(name)
        }
    }

    const GIB: u64 = 1 << 30;

    fn config(yaml_devices: &[&str], exclude: &[&str]) -> DisksConfig {
        DisksConfig {
            devices: yaml_devices.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            cross_check: false,
            ..DisksConfig::default()
        }
    }

    fn by_name<'a>(r: &'a [DiskReport], name: &str) -> &'a DiskReport {
        r.iter()
            .find(|d| d.disk.name == name)
            .unwrap_or_else(|| panic!("{name} in {r:#?}"))
    }

    fn fake_node() -> FakeHost {
        let h = FakeHost::new(
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n\
             30 22 259:7 / /var/lib/data rw shared:2 - xfs /dev/nvme3n1p1 rw\n\
             31 22 253:0 / /srv rw shared:3 - ext4 /dev/mapper/vg-srv rw\n\
             32 22 0:42 / /mnt/pool rw shared:4 - btrfs /dev/nvme5n1 rw\n",
        );
        let ec2 = "Amazon EC2 NVMe Instance Storage";
        h.disk("nvme0n1", "259:0", "Amazon Elastic Block Store", 100 * GIB)
            .partition("nvme0n1", "nvme0n1p1", "259:1")
            .by_id("nvme-Amazon_Elastic_Block_Store_vol0123", "nvme0n1")
            .by_id("nvme-Amazon_Elastic_Block_Store_vol0123-part1", "nvme0n1p1");
        // Two instance-store disks: one blank, one excluded by its by-id link.
        h.disk("nvme1n1", "259:2", ec2, 900 * GIB)
            .by_id("nvme-eui.0123", "nvme1n1")
            .by_id("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS111", "nvme1n1")
            .by_id("wwn-0x5000", "nvme1n1");
        h.disk("nvme2n1", "259:3", ec2, 900 * GIB)
            .by_id("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS222", "nvme2n1");
        // Instance store with a mounted partition, one held by LVM (mounted at /srv), one
        // btrfs-mounted (anonymous dev number, matched by source), one too small, one with data.
        h.disk("nvme3n1", "259:6", ec2, 900 * GIB)
            .partition("nvme3n1", "nvme3n1p1", "259:7");
        h.disk("nvme4n1", "259:8", ec2, 900 * GIB)
            .holder("nvme4n1", "dm-0", "253:0");
        h.disk("nvme5n1", "259:9", ec2, 900 * GIB);
        h.disk("nvme6n1", "259:10", ec2, GIB / 2);
        h.disk("nvme7n1", "259:11", ec2, 900 * GIB);
        // An NVMe namespace whose model is only on the controller (/sys/class/nvme).
        h.disk("nvme8n1", "259:12", "", 900 * GIB);
        h.write("sys/class/nvme/nvme8/model", "nvme_card-pd\n");
        h.write("sys/class/nvme/nvme8/serial", "GCE888\n");
        let mut data = std::fs::read(h.dev_file("nvme7n1")).unwrap();
        data[0..4].copy_from_slice(b"XFSB");
        std::fs::write(h.dev_file("nvme7n1"), data).unwrap();
        // Virtual devices and an unbound loop.
        h.disk("zram0", "252:0", "", GIB);
        h.disk("loop0", "7:0", "", 0);
        h
    }

    #[test]
    fn fake_sysfs_model_selection_exclusion_and_in_use_reasons() {
        let h = fake_node();
        let cfg = config(&[], &["nvme-Amazon_EC2_NVMe_Instance_Storage_AWS222"]);
        let r = list(&cfg, &h.host()).unwrap();
        let names: Vec<&str> = r.iter().map(|d| d.disk.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dm-0", "loop0", "nvme0n1", "nvme1n1", "nvme2n1", "nvme3n1", "nvme4n1", "nvme5n1",
                "nvme6n1", "nvme7n1", "nvme8n1", "zram0"
            ]
        );

        let root = by_name(&r, "nvme0n1");
        assert!(root.disk.backs_root);
        assert_eq!(root.disk.partitions, ["nvme0n1p1"]);
        assert_eq!(root.disk.mounts, ["/"]);
        assert!(
            matches!(&root.decision, Decision::NotSelected(m) if m.contains("matches no disks.modelPatterns") && m.ends_with("backs / (mounted at /)")),
            "{root:?}"
        );

        let blank = by_name(&r, "nvme1n1");
        assert_eq!(blank.decision, Decision::Candidate, "{blank:?}");
        // nvme-<model>_<serial> is preferred over EUI and WWN names.
        assert_eq!(
            blank.disk.by_id.as_deref(),
            Some("/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_AWS111")
        );
        assert_eq!(blank.disk.model, "Amazon EC2 NVMe Instance Storage");
        assert_eq!(blank.disk.serial, "AWS123");
        assert_eq!(blank.disk.size_bytes, 900 * GIB);
        assert_eq!(
            (
                blank.disk.logical_block_size,
                blank.disk.physical_block_size
            ),
            (512, 4096)
        );
        assert!(!blank.disk.rotational);
        assert!(
            blank
                .reason()
                .starts_with("model matches disks.modelPatterns")
        );

        assert_eq!(
            by_name(&r, "nvme2n1").decision,
            Decision::NotSelected(
                "excluded by config (disks.exclude: nvme-Amazon_EC2_NVMe_Instance_Storage_AWS222)"
                    .into()
            )
        );
        assert_eq!(
            by_name(&r, "nvme3n1").decision,
            Decision::InUse("mounted at /var/lib/data".into())
        );
        assert_eq!(
            by_name(&r, "nvme4n1").decision,
            Decision::InUse("held by dm-0 (mounted at /srv)".into())
        );
        assert_eq!(
            by_name(&r, "nvme5n1").decision,
            Decision::InUse("mounted at /mnt/pool".into())
        );
        assert!(
            matches!(&by_name(&r, "nvme6n1").decision, Decision::NotSelected(m) if m.starts_with("smaller than disks.minSizeBytes (512M < 1G)")),
            "{:?}",
            by_name(&r, "nvme6n1")
        );
        assert_eq!(
            by_name(&r, "nvme7n1").decision,
            Decision::HasData("has xfs signature".into())
        );
        let gce = by_name(&r, "nvme8n1");
        assert_eq!(
            (gce.disk.model.as_str(), gce.disk.serial.as_str()),
            ("nvme_card-pd", "GCE888")
        );
        assert_eq!(gce.decision, Decision::Candidate);
        assert!(
            matches!(&by_name(&r, "zram0").decision, Decision::NotSelected(m) if m.contains("virtual"))
        );
        assert!(
            matches!(&by_name(&r, "dm-0").decision, Decision::NotSelected(m) if m.contains("device-mapper"))
        );
        assert!(
            matches!(&by_name(&r, "loop0").decision, Decision::NotSelected(m) if m.starts_with("excluded") || m.starts_with("size 0"))
        );

        let t = table(&r);
        assert!(t.starts_with("NAME "), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("nvme1n1 ") && l.contains(" candidate ")),
            "{t}"
        );
    }

    #[test]
    fn holder_chain_backing_root_is_named() {
        let h = FakeHost::new("22 1 253:0 / / rw shared:1 - ext4 /dev/mapper/vg-root rw\n");
        h.disk(
            "nvme1n1",
            "259:2",
            "Amazon EC2 NVMe Instance Storage",
            900 * GIB,
        )
        .holder("nvme1n1", "md127", "9:127")
        .holder("md127", "dm-0", "253:0");
        let r = list(&config(&[], &[]), &h.host()).unwrap();
        let d = by_name(&r, "nvme1n1");
        assert!(d.disk.backs_root, "{d:?}");
        assert_eq!(d.decision, Decision::InUse("backs / (through dm-0)".into()));
    }

    #[test]
    fn devices_list_selects_by_name_and_glob_excludes_win() {
        let h = fake_node();
        let cfg = DisksConfig {
            model_patterns: Vec::new(),
            devices: vec!["nvme1n1".into(), "nvme2n1".into()],
            exclude: vec!["/dev/disk/by-id/wwn-*".into()],
            cross_check: false,
            ..DisksConfig::default()
        };
        let r = list(&cfg, &h.host()).unwrap();
        assert_eq!(
            by_name(&r, "nvme1n1").decision,
            Decision::NotSelected(
                "excluded by config (disks.exclude: /dev/disk/by-id/wwn-*)".into()
            )
        );
        let d2 = by_name(&r, "nvme2n1");
        assert_eq!(d2.decision, Decision::Candidate);
        assert_eq!(d2.selected_by.as_deref(), Some("listed in disks.devices"));
        assert!(matches!(
            &by_name(&r, "nvme7n1").decision,
            Decision::NotSelected(_)
        ));
        // by-id glob selection.
        let cfg = DisksConfig {
            model_patterns: Vec::new(),
            by_id_globs: vec!["nvme-Amazon_EC2_*_AWS222".into()],
            cross_check: false,
            ..DisksConfig::default()
        };
        let r = list(&cfg, &h.host()).unwrap();
        assert_eq!(by_name(&r, "nvme2n1").decision, Decision::Candidate);
        assert!(matches!(
            &by_name(&r, "nvme1n1").decision,
            Decision::NotSelected(_)
        ));
    }

    #[test]
    fn falls_back_to_self_mountinfo_and_json_has_decisions() {
        let h = FakeHost::new("");
        std::fs::remove_file(h.dir.path().join("proc/1/mountinfo")).unwrap();
        h.write(
            "proc/self/mountinfo",
            "22 1 259:2 / /data rw shared:1 - ext4 /dev/nvme1n1 rw\n",
        );
        h.disk(
            "nvme1n1",
            "259:2",
            "Amazon EC2 NVMe Instance Storage",
            900 * GIB,
        );
        let r = list(&config(&[], &[]), &h.host()).unwrap();
        assert_eq!(r[0].decision, Decision::InUse("mounted at /data".into()));
        let v: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        let d = &v["disks"][0];
        assert_eq!(d["name"], "nvme1n1");
        assert_eq!(d["decision"], "in-use");
        assert_eq!(d["reason"], "mounted at /data");
        assert_eq!(d["sizeBytes"], 900 * GIB);
        assert!(Path::new(d["devPath"].as_str().unwrap()).ends_with("dev/nvme1n1"));
    }

    #[test]
    fn unreadable_sysfs_is_an_error() {
        let h = HostPaths::under(Path::new("/nonexistent-nodekeeper"));
        let e = list(&DisksConfig::default(), &h).unwrap_err();
        assert_eq!(e.label(), "sys_block");
    }
}
