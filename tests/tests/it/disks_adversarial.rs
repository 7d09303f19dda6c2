//! The disks capability attacked (root): every case builds a loop device that holds somebody's
//! data in a place the first and last MiB do not show, runs `nodekeeper disks prepare`, and
//! checks the sha256 of the WHOLE device before and after. The promise under attack: the agent
//! never writes a disk that holds data.
//!
//! Fixtures are written into the sparse backing file before it is attached (mkfs on a separate
//! image copied in with `dd conv=notrunc,sparse`, or bytes written at an offset), so no tool
//! ever runs on a device the test did not attach. Loops are detached by `LoopDevice`'s Drop,
//! mounts under the temp discovery dir removed with them, even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nodekeeper::disks::prepare::{HostAccess, Reclaimed, prepare_once, reclaim};
use nodekeeper::disks::{DisksConfig, PrepareMode};
use nodekeeper::host::HostPaths;
use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::loopdev::LoopDevice;
use nodekeeper_tests::{Agent, agent_bin, require_root, require_tool, wait_for};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// mkfs.xfs wants at least 300 MiB; sparse, so the size costs nothing.
const LOOP_BYTES: u64 = 512 * MIB;

fn can_run() -> bool {
    require_root()
        && [
            "losetup",
            "blockdev",
            "sha256sum",
            "dd",
            "mkfs.ext4",
            "mkfs.xfs",
            "blkid",
            "wipefs",
            "findmnt",
        ]
        .iter()
        .all(|t| require_tool(t))
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sha256 of every byte of the device, as it reads now (the device's page cache dropped first,
/// so a write through any path is seen).
fn sha256(dev: &LoopDevice) -> String {
    sh(&format!(
        "blockdev --flushbufs {0} && sha256sum {0}",
        dev.path.display()
    ))
    .split_whitespace()
    .next()
    .unwrap_or_default()
    .to_string()
}

fn write_at(file: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// A filesystem made by the real mkfs in its own image, copied into `disk` at `offset`: what a
/// partition at that offset looks like once its partition table is gone (`wipefs -a` on the
/// disk, `dd count=1`).
fn filesystem_at(dir: &Path, disk: &Path, offset: u64, mkfs: &str, fs_bytes: u64) {
    let part = dir.join("part.img");
    std::fs::File::create(&part)
        .unwrap()
        .set_len(fs_bytes)
        .unwrap();
    sh(&format!("{mkfs} {}", part.display()));
    sh(&format!(
        "dd if={} of={} bs=1M seek={} conv=notrunc,sparse status=none",
        part.display(),
        disk.display(),
        offset / MIB
    ));
    std::fs::remove_file(&part).unwrap();
}

/// A state dir, a discovery dir, a config selecting exactly one loop, and the backing file.
struct Attack {
    dir: tempfile::TempDir,
    disk: PathBuf,
}

impl Attack {
    fn new() -> Attack {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(LOOP_BYTES)
            .unwrap();
        Attack { dir, disk }
    }

    fn sized(bytes: u64) -> Attack {
        let a = Attack::new();
        std::fs::File::create(&a.disk)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        a
    }

    fn attach(&self) -> LoopDevice {
        LoopDevice::attach(&self.disk, 0)
    }

    fn config(&self, dev: &LoopDevice, extra: &str) -> PathBuf {
        let yaml = format!(
            "disks:\n  devices: [{}]\n  modelPatterns: []\n  minSizeBytes: 1048576\n  discoveryDir: {}\n  hostMountNamespace: false\n{extra}",
            dev.name,
            self.dir.path().join("mnt").display()
        );
        let p = self.dir.path().join("config.yaml");
        std::fs::write(&p, yaml).unwrap();
        p
    }

    /// `disks prepare --json` on exactly this loop; the report.
    fn prepare(&self, dev: &LoopDevice, extra: &str) -> Value {
        let out = Command::new(agent_bin())
            .args(["disks", "prepare", "--json", "--config"])
            .arg(self.config(dev, extra))
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .output()
            .expect("run nodekeeper");
        assert!(
            out.status.success(),
            "disks prepare: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("report is JSON")
    }

    /// The attack: prepare must call the disk `has-data` (reason starting with `reason`), leave
    /// it untouched, mount nothing, and every byte of the device must be the same afterwards.
    fn assert_untouched(&self, dev: &LoopDevice, extra: &str, reason: &str) {
        let before = sha256(dev);
        let report = self.prepare(dev, extra);
        let d = report["disks"]
            .as_array()
            .expect("disks")
            .iter()
            .find(|d| d["name"] == dev.name.as_str())
            .unwrap_or_else(|| panic!("{} not in {report:#}", dev.name))
            .clone();
        assert_eq!(d["decision"], "has-data", "{report:#}");
        assert_eq!(d["action"], "untouched", "{report:#}");
        let why = d["reason"].as_str().unwrap_or_default();
        assert!(why.starts_with(reason), "reason {why:?}, wanted {reason:?}");
        assert!(
            report["prepared"].as_array().is_none_or(|p| p.is_empty()),
            "{report:#}"
        );
        assert!(
            sh(&format!("findmnt -rn -S {} || true", dev.path.display()))
                .trim()
                .is_empty(),
            "the device was mounted"
        );
        assert_eq!(sha256(dev), before, "the device's bytes changed");
    }
}

// === 1. blank means blank over the whole device ===

#[test]
fn root_ext4_at_1mib_with_its_partition_table_lost_is_never_formatted() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    filesystem_at(a.dir.path(), &a.disk, MIB, "mkfs.ext4 -q -F", 64 * MIB);
    let dev = a.attach();
    a.assert_untouched(&dev, "", "has ext4 signature");
}

#[test]
fn root_ext4_at_100mib_with_its_partition_table_lost_is_never_formatted() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    filesystem_at(
        a.dir.path(),
        &a.disk,
        100 * MIB,
        "mkfs.ext4 -q -F",
        64 * MIB,
    );
    let dev = a.attach();
    a.assert_untouched(&dev, "", "has ext4 signature");
}

#[test]
fn root_xfs_at_1mib_is_never_formatted_even_without_the_cross_check() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    filesystem_at(a.dir.path(), &a.disk, MIB, "mkfs.xfs -q -f", 300 * MIB);
    let dev = a.attach();
    a.assert_untouched(&dev, "  crossCheck: false\n", "has xfs signature");
}

/// 66 MiB of data (no signature) starting at an unaligned offset past the first GiB: the
/// sparse scan's guarantee is that any run of non-zero bytes longer than its stride plus its
/// window (64 MiB + 64 KiB) is seen wherever it lies.
#[test]
fn root_raw_data_in_the_middle_of_the_disk_is_never_formatted() {
    if !can_run() {
        return;
    }
    let a = Attack::sized(1280 * MIB);
    let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    for m in 0..66 {
        write_at(&a.disk, 1100 * MIB + 12345 + m * MIB, &pattern);
    }
    let dev = a.attach();
    a.assert_untouched(
        &dev,
        "  crossCheck: false\n",
        "has data without a known signature",
    );
}

/// VMFS volume header (magic 0xc001d00d, little-endian) at 1 MiB, where VMware writes it; with
/// `crossCheck: false` blkid cannot save it: our own evidence must.
#[test]
fn root_vmfs_at_1mib_is_never_formatted_with_the_cross_check_off() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let mut header = vec![0u8; 512];
    header[0..4].copy_from_slice(&0xc001_d00du32.to_le_bytes());
    header[4..8].copy_from_slice(&14u32.to_le_bytes()); // volume version
    header[8..20].copy_from_slice(b"vmfs-volume!");
    write_at(&a.disk, MIB, &header);
    let dev = a.attach();
    a.assert_untouched(&dev, "  crossCheck: false\n", "has vmfs signature");
}

// === 4. time of check, time of use: the claim ===

/// A `mkfs.ext4` first on PATH that plays the adversary once, then runs the real one: on its
/// first call it formats the OTHER loop (someone else's mkfs, mid-pass, after the agent's
/// survey called both blank) with a fixed UUID and records that loop's sha256.
fn adversary_mkfs(dir: &Path, a: &LoopDevice, b: &LoopDevice) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = sh("command -v mkfs.ext4").trim().to_string();
    let script = format!(
        r#"#!/bin/sh
# The device mkfs was handed (the last argument), resolved: /proc/self/fd/N or /dev/loopN.
for last; do :; done
me=$(readlink -f "$last")
if [ ! -e {done} ]; then
  touch {done}
  if [ "$me" = "{a}" ]; then victim={b}; else victim={a}; fi
  {real} -q -F -U 0badc0de-0000-4000-8000-000000000001 "$victim" >/dev/null 2>&1
  blockdev --flushbufs "$victim"
  echo "$victim" > {victim_file}
  sha256sum "$victim" | cut -d' ' -f1 > {hash_file}
fi
exec {real} "$@"
"#,
        done = dir.join("adversary-done").display(),
        a = a.path.display(),
        b = b.path.display(),
        victim_file = dir.join("victim").display(),
        hash_file = dir.join("victim.sha256").display(),
    );
    let p = bin.join("mkfs.ext4");
    std::fs::write(&p, script).unwrap();
    sh(&format!("chmod +x {}", p.display()));
    bin
}

#[test]
fn root_a_second_disk_formatted_by_someone_else_mid_pass_is_never_overwritten() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let other = a.dir.path().join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(LOOP_BYTES)
        .unwrap();
    let (da, db) = (a.attach(), LoopDevice::attach(&other, 0));
    let bin = adversary_mkfs(a.dir.path(), &da, &db);
    let yaml = format!(
        "disks:\n  devices: [{}, {}]\n  modelPatterns: []\n  minSizeBytes: 1048576\n  discoveryDir: {}\n  hostMountNamespace: false\n",
        da.name,
        db.name,
        a.dir.path().join("mnt").display()
    );
    std::fs::write(a.dir.path().join("config.yaml"), yaml).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(agent_bin())
        .args(["disks", "prepare", "--json", "--config"])
        .arg(a.dir.path().join("config.yaml"))
        .arg("--state-dir")
        .arg(a.dir.path().join("state"))
        .env("PATH", path)
        .output()
        .expect("run nodekeeper");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let victim = std::fs::read_to_string(a.dir.path().join("victim"))
        .unwrap_or_else(|_| panic!("the adversary never ran: {report}"));
    let victim = victim.trim();
    let dev = if victim == da.path.display().to_string() {
        &da
    } else {
        &db
    };
    let theirs = std::fs::read_to_string(a.dir.path().join("victim.sha256")).unwrap();
    assert_eq!(
        sha256(dev),
        theirs.trim(),
        "their filesystem was overwritten: {report}"
    );
    assert_eq!(
        sh(&format!("blkid -p -s UUID -o value {victim}")).trim(),
        "0badc0de-0000-4000-8000-000000000001"
    );
    assert!(
        report.contains("no longer blank when claimed for writing"),
        "the refusal is reported: {report}"
    );
}

// === 3. one rule for "ours": discovery unused but for us, exactly one signature, ours ===

impl Attack {
    /// The agent prepares the disk (formatted, mounted, recorded), then "goes down": the disk
    /// is unmounted so the adversary can write to it, as happens across a node reboot.
    fn owned_then_down(&self, dev: &LoopDevice) {
        let report = self.prepare(dev, "");
        assert_eq!(
            report["prepared"].as_array().map(|p| p.len()),
            Some(1),
            "{report:#}"
        );
        dev.unmount_and_release();
    }

    /// The second pass must not call the disk ours: not published, not mounted, not one byte
    /// written; and the report says why (has-data or in-use, with the reason).
    fn assert_not_ours(&self, dev: &LoopDevice, reason_contains: &str) {
        let before = sha256(dev);
        let report = self.prepare(dev, "");
        let d = report["disks"]
            .as_array()
            .expect("disks")
            .iter()
            .find(|d| d["name"] == dev.name.as_str())
            .unwrap_or_else(|| panic!("{} not in {report:#}", dev.name))
            .clone();
        assert_ne!(d["decision"], "ours", "{report:#}");
        assert_eq!(d["action"], "untouched", "{report:#}");
        let why = d["reason"].as_str().unwrap_or_default();
        assert!(
            why.contains(reason_contains),
            "reason {why:?}, wanted it to name {reason_contains:?}"
        );
        assert!(
            report["prepared"].as_array().is_none_or(|p| p.is_empty()),
            "published: {report:#}"
        );
        assert!(
            sh(&format!("findmnt -rn -S {} || true", dev.path.display()))
                .trim()
                .is_empty(),
            "the device was mounted"
        );
        assert_eq!(sha256(dev), before, "the device's bytes changed");
    }
}

/// Someone's mkfs.xfs (its first KiB: the xfs superblock) over the start of an agent disk
/// while the agent was down; our ext4 superblock at 1 KiB is still there, marker and all.
#[test]
fn root_a_foreign_filesystem_written_onto_an_owned_disk_is_never_ours() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let dev = a.attach();
    a.owned_then_down(&dev);
    let xfs = a.dir.path().join("xfs.img");
    std::fs::File::create(&xfs)
        .unwrap()
        .set_len(300 * MIB)
        .unwrap();
    sh(&format!("mkfs.xfs -q -f {}", xfs.display()));
    sh(&format!(
        "dd if={} of={} bs=1024 count=1 conv=notrunc oflag=direct status=none",
        xfs.display(),
        dev.path.display()
    ));
    a.assert_not_ours(&dev, "xfs");
}

/// An operator partitioned an agent disk while the agent was down; sfdisk in script mode
/// (`--wipe never`) leaves our superblock at 1 KiB behind the new MBR.
#[test]
fn root_an_owned_disk_partitioned_while_the_agent_was_down_is_never_ours() {
    if !can_run() || !require_tool("sfdisk") {
        return;
    }
    let a = Attack::new();
    let dev = a.attach();
    a.owned_then_down(&dev);
    sh(&format!(
        "echo 'start=2048, type=83' | sfdisk -q --wipe never --no-reread --no-tell-kernel {}",
        dev.path.display()
    ));
    a.assert_not_ours(&dev, "mbr");
}

/// A foreign md superblock 1.0 (8 KiB before the end, 4 KiB aligned) on an agent disk: the
/// disk is somebody's RAID member now, whatever its start says.
#[test]
fn root_a_foreign_md_superblock_at_the_end_of_an_owned_disk_is_never_ours() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let dev = a.attach();
    a.owned_then_down(&dev);
    let off = ((LOOP_BYTES / 512 - 16) & !7) * 512;
    let mut sb = vec![0u8; 4096];
    sb[0..4].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
    sb[4..8].copy_from_slice(&1u32.to_le_bytes()); // major version
    sb[16..32].copy_from_slice(&[0x5a; 16]); // set_uuid: not ours
    sb[32..38].copy_from_slice(b"theirs");
    let img = a.dir.path().join("md-sb.bin");
    std::fs::write(&img, &sb).unwrap();
    sh(&format!(
        "dd if={} of={} bs=4096 seek={} conv=notrunc oflag=direct status=none",
        img.display(),
        dev.path.display(),
        off / 4096
    ));
    a.assert_not_ours(&dev, "md");
}

// === 4. small guards ===

/// A symlink planted at `<discoveryDir>/<key>` before the agent prepares the disk: the agent
/// must neither mount over the symlink's target nor format the disk it cannot mount safely.
#[test]
fn root_a_symlinked_mount_point_is_refused_and_the_disk_is_not_formatted() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let dev = a.attach();
    let target = a.dir.path().join("someone-elses-dir");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("precious"), b"theirs").unwrap();
    let mnt = a.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::os::unix::fs::symlink(&target, mnt.join(&dev.name)).unwrap();
    let before = sha256(&dev);
    let out = Command::new(agent_bin())
        .args(["disks", "prepare", "--json", "--config"])
        .arg(a.config(&dev, ""))
        .arg("--state-dir")
        .arg(a.dir.path().join("state"))
        .output()
        .expect("run nodekeeper");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        sh(&format!("findmnt -rn {} || true", target.display()))
            .trim()
            .is_empty(),
        "mounted over the symlink's target: {said}"
    );
    assert!(
        sh(&format!("findmnt -rn -S {} || true", dev.path.display()))
            .trim()
            .is_empty(),
        "the device was mounted: {said}"
    );
    assert_eq!(sha256(&dev), before, "the disk was formatted: {said}");
    assert!(said.contains("symlink"), "the refusal is reported: {said}");
    assert_eq!(
        std::fs::read(target.join("precious")).unwrap(),
        b"theirs".to_vec()
    );
}

// === reclaim under the same guards as formatting ===

/// The library's view of this machine, with `/dev` replaced by `dev` when given (a temp dir
/// whose `loopN` links to the loop and whose `disk/by-id/nk-test-loopN` links to `../../loopN`:
/// loops have no by-id links of their own).
fn host_for(
    a: &Attack,
    name: &str,
    dev: Option<&Path>,
    mode: PrepareMode,
) -> (DisksConfig, HostAccess) {
    let cfg = DisksConfig {
        devices: vec![name.to_string()],
        model_patterns: Vec::new(),
        min_size_bytes: MIB,
        discovery_dir: a.dir.path().join("mnt"),
        host_mount_namespace: false,
        mode,
        ..DisksConfig::default()
    };
    let mut paths = HostPaths::default();
    if let Some(dev) = dev {
        paths.dev = dev.to_path_buf();
    }
    let host = HostAccess::new(&paths, &cfg);
    (cfg, host)
}

fn fake_dev_with_by_id(a: &Attack, loop_dev: &LoopDevice) -> PathBuf {
    let dev = a.dir.path().join("dev");
    std::fs::create_dir_all(dev.join("disk/by-id")).unwrap();
    std::os::unix::fs::symlink(&loop_dev.path, dev.join(&loop_dev.name)).unwrap();
    std::os::unix::fs::symlink(
        format!("../../{}", loop_dev.name),
        dev.join(format!("disk/by-id/nk-test-{}", loop_dev.name)),
    )
    .unwrap();
    dev
}

/// The action `disks prepare` reports for the loop named `name`.
fn action_of(report: &Value, name: &str) -> String {
    report["disks"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .and_then(|d| d["action"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// MiB blocks of the device holding any non-zero byte.
fn nonzero_mib(dev: &LoopDevice) -> usize {
    use std::io::Read;
    sh(&format!("blockdev --flushbufs {}", dev.path.display()));
    let mut f = std::fs::File::open(&dev.path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut count = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return count;
        }
        count += usize::from(buf[..n].iter().any(|&b| b != 0));
    }
}

#[test]
fn root_a_reclaim_recorded_under_a_kernel_name_now_bound_to_another_disk_never_wipes_it() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let ours = a.attach();
    let name = ours.name.clone();
    let report = a.prepare(&ours, "");
    assert_eq!(action_of(&report, &ours.name), "formatted", "{report:#}");
    let theirs = a.dir.path().join("theirs.img");
    std::fs::File::create(&theirs)
        .unwrap()
        .set_len(LOOP_BYTES)
        .unwrap();
    sh(&format!("mkfs.ext4 -q -F {}", theirs.display()));
    write_at(&theirs, 200 * MIB, b"their data, far from both ends");
    // The loops come back in another order: the name the record holds is someone else's disk
    // (detached and re-attached back to back, so no other test's `losetup --find` takes it;
    // released first, or the detach is deferred and the name stays bound).
    ours.unmount_and_release();
    drop(ours);
    let victim = LoopDevice::attach_as(&theirs, &name);
    let before = sha256(&victim);
    let (cfg, host) = host_for(&a, &name, None, PrepareMode::Filesystem);
    let out = reclaim(&cfg, &host, &a.dir.path().join("state"), &name).expect("reclaim");
    assert!(
        matches!(&out, Reclaimed::NotOurs(r) if r.why.contains("marker") && r.reason == "not_ours"),
        "{out:?}"
    );
    assert_eq!(sha256(&victim), before, "the other disk was wiped");
}

#[test]
fn root_a_reclaim_of_an_owned_disk_that_now_holds_foreign_data_is_dropped() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let dev = a.attach();
    let report = a.prepare(&dev, "");
    assert_eq!(action_of(&report, &dev.name), "formatted", "{report:#}");
    dev.unmount_and_release();
    // Someone's md member superblock (1.0, at the end) while the agent was down.
    let mut sb = vec![0u8; 256];
    sb[..4].copy_from_slice(&0xa92b_4efc_u32.to_le_bytes());
    sb[4..8].copy_from_slice(&1u32.to_le_bytes());
    sb[16..32].copy_from_slice(&[0x42; 16]);
    let off = ((LOOP_BYTES / 512 - 16) & !7) * 512;
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dev.path)
        .unwrap()
        .write_all_at(&sb, off)
        .unwrap();
    let before = sha256(&dev);
    let (cfg, host) = host_for(&a, &dev.name, None, PrepareMode::Filesystem);
    let out = reclaim(&cfg, &host, &a.dir.path().join("state"), &dev.name).expect("reclaim");
    assert!(
        matches!(&out, Reclaimed::NotOurs(r) if r.why.contains("md") && r.reason == "not_ours"),
        "{out:?}"
    );
    assert_eq!(sha256(&dev), before, "a disk holding data was wiped");
}

#[test]
fn root_block_mode_reclaim_zeroes_every_byte_and_never_a_mounted_or_unidentified_disk() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let dev = a.attach();
    let state = a.dir.path().join("state");
    // Without a by-id identity, block mode is published but never wiped by kernel name.
    let (cfg, host) = host_for(&a, &dev.name, None, PrepareMode::Block);
    let report = prepare_once(&cfg, &host.paths, &state).expect("prepare");
    assert_eq!(report.prepared.len(), 1, "{report:?}");
    sh(&format!(
        "dd if=/dev/urandom of={} bs=1M count=8 seek=100 conv=notrunc status=none",
        dev.path.display()
    ));
    let before = sha256(&dev);
    let out = reclaim(&cfg, &host, &state, &dev.name).expect("reclaim");
    assert!(
        matches!(&out, Reclaimed::NotOurs(r) if r.why.contains("by-id") && r.reason == "identity"),
        "{out:?}"
    );
    assert_eq!(sha256(&dev), before);

    // With one: the tenant's data is zeroed, all of it.
    std::fs::remove_dir_all(&state).unwrap();
    sh(&format!(
        "dd if=/dev/zero of={} bs=1M count=8 seek=100 conv=notrunc status=none",
        dev.path.display()
    ));
    let fake_dev = fake_dev_with_by_id(&a, &dev);
    let (cfg, host) = host_for(&a, &dev.name, Some(&fake_dev), PrepareMode::Block);
    let report = prepare_once(&cfg, &host.paths, &state).expect("prepare");
    let key = format!("nk-test-{}", dev.name);
    assert_eq!(report.prepared[0].key, key, "{report:?}");
    sh(&format!(
        "dd if=/dev/urandom of={} bs=1M count={} conv=notrunc status=none",
        dev.path.display(),
        LOOP_BYTES / MIB
    ));
    assert_eq!(nonzero_mib(&dev), (LOOP_BYTES / MIB) as usize);
    let started = std::time::Instant::now();
    let out = reclaim(&cfg, &host, &state, &key).expect("reclaim");
    eprintln!(
        "block reclaim of {} MiB: {:?}",
        LOOP_BYTES / MIB,
        started.elapsed()
    );
    assert_eq!(out, Reclaimed::Wiped);
    assert_eq!(nonzero_mib(&dev), 0, "the previous tenant's data survived");

    // A tenant's filesystem, mounted on the host: not ours to wipe now. Its file is put in by
    // mkfs (`-d`) and it is mounted once, read-only (nothing the mount does changes a byte):
    // no write-then-remount, which fails with EBUSY whenever another suite's `ip netns exec`
    // copied the rw mount into its own namespace meanwhile (the superblock outlives our umount).
    let files = a.dir.path().join("tenant-files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("f"), b"in use").unwrap();
    sh(&format!(
        "mkfs.ext4 -q -F -d {} {}",
        files.display(),
        dev.path.display()
    ));
    let m = a.dir.path().join("tenant-mount");
    std::fs::create_dir_all(&m).unwrap();
    sh(&format!(
        "mount -o ro,noload {} {}",
        dev.path.display(),
        m.display()
    ));
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"in use".to_vec());
    let before = sha256(&dev);
    let out = reclaim(&cfg, &host, &state, &key).expect("reclaim");
    assert!(
        matches!(&out, Reclaimed::NotOurs(r) if r.why.contains("mounted") && r.reason == "in_use"),
        "{out:?}"
    );
    assert_eq!(sha256(&dev), before, "a mounted disk was wiped");
    dev.unmount_and_release();
}

// === one disk failing never stops the others ===

/// A 4 MiB tmpfs under the test's temp dir: a sparse backing file on it reads as zeros (a blank
/// candidate), but the loop driver's writes past 4 MiB fail with ENOSPC, so mkfs on the loop
/// gets a real I/O error ("Input/output error while writing out and closing file system").
/// Unmounted (lazily) on drop, after the loops on it are detached.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(at: &Path) -> SmallTmpfs {
        std::fs::create_dir_all(at).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size=4m nk-test-full {}",
            at.display()
        ));
        SmallTmpfs(at.to_path_buf())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn loop_number(dev: &LoopDevice) -> u32 {
    dev.name.trim_start_matches("loop").parse().unwrap_or(0)
}

const NODE: &str = "node-a";

#[test]
fn root_one_disk_failing_with_io_errors_never_stops_the_other_from_being_prepared_and_published() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let full = SmallTmpfs::mount(&a.dir.path().join("full"));
    let failing_img = full.0.join("failing.img");
    let mut failing = LoopDevice::attach(&failing_img, LOOP_BYTES);
    let mut healthy = a.attach();
    // The failing disk goes first in the pass (disks are prepared in kernel-name order), so a
    // failure that stopped the pass would leave the healthy one unprepared.
    if loop_number(&failing) > loop_number(&healthy) {
        let (first, second) = (healthy.name.clone(), failing.name.clone());
        drop(failing);
        drop(healthy);
        failing = LoopDevice::attach_as(&failing_img, &first);
        healthy = LoopDevice::attach_as(&a.disk, &second);
    }
    let blank = sha256(&healthy);
    assert_eq!(sha256(&failing), blank, "both start blank");
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    let kubeconfig = a.dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mnt = a.dir.path().join("mnt");
    let config = format!(
        "metrics:\n  enabled: false\ndisks:\n  enabled: true\n  interval: 1s\n  devices: [{}, {}]\n  modelPatterns: []\n  minSizeBytes: 1048576\n  discoveryDir: {}\n  hostMountNamespace: false\n",
        failing.name,
        healthy.name,
        mnt.display()
    );
    let agent = Agent::builder()
        .config(&config)
        .connected(&kubeconfig, NODE)
        .state_dir(&a.dir.path().join("state"))
        .start();
    let pv_of = |d: &LoopDevice| format!("nk-{NODE}-{}", d.name);
    wait_for(
        std::time::Duration::from_secs(60),
        "the healthy disk's PV",
        || api.pv(&pv_of(&healthy)),
    );
    let event = wait_for(
        std::time::Duration::from_secs(30),
        "a LocalDiskPrepareFailed Event for the failing disk",
        || {
            api.events()
                .into_iter()
                .find(|e| e["reason"] == "LocalDiskPrepareFailed")
        },
    );
    let message = event["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&failing.name) && message.contains("tool_failed"),
        "{event:#}"
    );
    assert_eq!(event["type"], "Warning", "{event:#}");
    let metrics = agent.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nodekeeper_disks_errors_total{reason=\"tool_failed\"} ")),
        "{metrics}"
    );
    // The failed disk holds what mkfs managed to write before the I/O errors: later passes
    // call it has-data and never write it again (its bytes are stable), and never publish it.
    let after_failure = sha256(&failing);
    assert_ne!(after_failure, blank, "mkfs wrote part of it before failing");
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        sha256(&failing),
        after_failure,
        "the failed disk was written again"
    );
    assert!(
        api.pv(&pv_of(&failing)).is_none(),
        "the failed disk was published"
    );
    assert_eq!(
        api.events()
            .iter()
            .filter(|e| e["reason"] == "LocalDiskPrepareFailed")
            .count(),
        1,
        "one Event per disk and reason"
    );
    // The healthy disk carries exactly our filesystem: the label and UUID owned.json records.
    let owned: Value = serde_json::from_str(
        &std::fs::read_to_string(a.dir.path().join("state/disks/owned.json")).unwrap(),
    )
    .unwrap();
    let rec = &owned["disks"][&healthy.name];
    assert_eq!(rec["prepared"], true, "{owned:#}");
    let on_disk = sh(&format!(
        "blkid -p -s LABEL -s UUID -o export {}",
        healthy.path.display()
    ));
    assert!(
        on_disk.contains(&format!("LABEL={}", rec["label"].as_str().unwrap()))
            && on_disk.contains(&format!("UUID={}", rec["uuid"].as_str().unwrap())),
        "{on_disk} vs {rec:#}"
    );
    assert_ne!(sha256(&healthy), blank, "the healthy disk was formatted");
    drop(agent);
}

// === kill -9 mid-mkfs ===

/// A `mkfs.ext4` first on PATH that records its pid and then, `partial`: writes 1 MiB of what
/// a dying mke2fs leaves (bitmaps, inode tables past the first MiB; no superblock yet), or
/// `finished`: runs the real mkfs to the end; then says it is ready and waits to be killed
/// with the agent (a container kill takes both).
fn dying_mkfs(dir: &Path, mode: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = sh("command -v mkfs.ext4").trim().to_string();
    let script = format!(
        r#"#!/bin/sh
for last; do :; done
echo $$ > {pid}
if [ "{mode}" = partial ]; then
  dd if=/dev/urandom of="$last" bs=64K count=16 seek=32 conv=notrunc status=none
else
  {real} "$@"
fi
blockdev --flushbufs "$last"
touch {ready}
exec sleep 600
"#,
        pid = dir.join("mkfs.pid").display(),
        ready = dir.join("mkfs.ready").display(),
    );
    let p = bin.join("mkfs.ext4");
    std::fs::write(&p, script).unwrap();
    sh(&format!("chmod +x {}", p.display()));
    bin
}

/// `disks prepare` killed (-9, with its mkfs) mid-format, then run again: what the disk holds
/// and the record it left.
fn killed_mid_mkfs(a: &Attack, dev: &LoopDevice, mode: &str) -> Value {
    let bin = dying_mkfs(a.dir.path(), mode);
    let mut agent = Command::new(agent_bin())
        .args(["disks", "prepare", "--json", "--config"])
        .arg(a.config(dev, ""))
        .arg("--state-dir")
        .arg(a.dir.path().join("state"))
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run nodekeeper");
    let ready = a.dir.path().join("mkfs.ready");
    wait_for(std::time::Duration::from_secs(60), "mkfs running", || {
        ready.exists().then_some(())
    });
    agent.kill().unwrap();
    agent.wait().unwrap();
    let pid = std::fs::read_to_string(a.dir.path().join("mkfs.pid")).unwrap();
    sh(&format!("kill -9 {}", pid.trim()));
    let owned = std::fs::read_to_string(a.dir.path().join("state/disks/owned.json")).unwrap();
    let owned: Value = serde_json::from_str(&owned).unwrap();
    assert_eq!(
        owned["disks"][&dev.name]["prepared"], false,
        "recorded before mkfs, not finished: {owned:#}"
    );
    owned
}

/// Killed after mkfs wrote part of its metadata: the restarted agent finds data it cannot
/// prove is ours (no marker) and leaves the disk alone, byte for byte, unpublished, with its
/// record kept (`prepared: false`) for an operator (`disks wipe`).
#[test]
fn root_a_disk_whose_mkfs_was_killed_half_way_is_left_alone() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let dev = a.attach();
    killed_mid_mkfs(&a, &dev, "partial");
    a.assert_untouched(&dev, "", "has data");
    let owned: Value = serde_json::from_str(
        &std::fs::read_to_string(a.dir.path().join("state/disks/owned.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(owned["disks"][&dev.name]["prepared"], false, "{owned:#}");
}

/// Killed after its mkfs finished but before the agent recorded it and mounted: the disk
/// carries our marker and nothing else, so the restarted agent finishes the job (mounted,
/// recorded `prepared: true`), with the filesystem mkfs made (same UUID), never a second mkfs.
#[test]
fn root_a_disk_whose_agent_was_killed_after_mkfs_is_finished_not_reformatted() {
    if !can_run() {
        return;
    }
    let a = Attack::new();
    let dev = a.attach();
    let owned = killed_mid_mkfs(&a, &dev, "finished");
    let uuid = owned["disks"][&dev.name]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let report = a.prepare(&dev, "");
    assert_eq!(action_of(&report, &dev.name), "mounted", "{report:#}");
    assert_eq!(
        sh(&format!("blkid -p -s UUID -o value {}", dev.path.display())).trim(),
        uuid
    );
    let owned: Value = serde_json::from_str(
        &std::fs::read_to_string(a.dir.path().join("state/disks/owned.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(owned["disks"][&dev.name]["prepared"], true, "{owned:#}");
}
