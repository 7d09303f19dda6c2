//! Disk preparation against real loop devices (root): only blank disks are formatted, others'
//! bytes are untouched; our disks are re-mounted, never re-formatted; a disk zeroed behind the
//! agent's back is re-prepared and reported lost; a foreign filesystem is never ours; wipe's
//! refusals; block mode; the daemon loop and its metrics; raid0 inside a kernel VM.
//!
//! Safety: every device here is a loop device this test attached to a sparse temp file,
//! selected by exact kernel name (`disks.devices`), unmounted and detached by `Loop`'s Drop even
//! when the test fails; mounts live under a temp discovery dir.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nodekeeper_tests::{Agent, agent_bin, require_root, require_tool, sample, wait_for};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses filesystems under 300 MiB; sparse, so this costs no disk space.
const LOOP_BYTES: u64 = 512 * MIB;

// === fixtures ===

/// A loop device on a sparse temp file: unmounted and detached on drop.
struct Loop {
    dev: String,
    _file: tempfile::NamedTempFile,
}

impl Loop {
    fn new() -> Loop {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(LOOP_BYTES).expect("size the file");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file.path())
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup gave {dev:?}");
        Loop { dev, _file: file }
    }

    fn with_fs(tool: &str) -> Loop {
        let l = Loop::new();
        sh(&format!("{tool} -q {}", l.dev));
        l
    }

    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    /// The first and last MiB, byte for byte.
    fn edges(&self) -> (Vec<u8>, Vec<u8>) {
        let mut f = std::fs::File::open(&self.dev).expect("open loop");
        let mut head = vec![0u8; MIB as usize];
        f.read_exact(&mut head).expect("read head");
        let mut tail = vec![0u8; MIB as usize];
        f.seek(SeekFrom::Start(LOOP_BYTES - MIB)).expect("seek");
        f.read_exact(&mut tail).expect("read tail");
        (head, tail)
    }

    /// What EC2 stop/start does to instance store: every byte gone. `blkdiscard -z` zeroes
    /// the whole loop (fallocate on its backing file): inspection scans the whole device, so
    /// zeroing only the ends would leave the old filesystem's metadata mid-disk, as data.
    fn zero(&self) {
        sh(&format!(
            "blkdiscard -z {0} && blockdev --flushbufs {0}",
            self.dev
        ));
    }

    fn blkid(&self, tag: &str) -> String {
        sh(&format!("blkid -p -s {tag} -o value {} || true", self.dev))
            .trim()
            .to_string()
    }

    fn mount_points(&self) -> Vec<String> {
        sh(&format!("findmnt -rn -S {} -o TARGET || true", self.dev))
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Unmounts it here and waits until the kernel released it (a mount namespace copied by
    /// another suite's `ip netns exec` can hold it a moment longer: `unmount_and_release`).
    fn umount(&self) {
        nodekeeper_tests::loopdev::unmount_and_release(Path::new(&self.dev));
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for m in self.mount_points() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A state dir, a discovery dir and a config selecting the given loops.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new(loops: &[&Loop], extra: &str) -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        let names: Vec<&str> = loops.iter().map(|l| l.name()).collect();
        let yaml = format!(
            "disks:\n  devices: [{}]\n  minSizeBytes: 1048576\n  discoveryDir: {}\n  hostMountNamespace: false\n{extra}",
            names.join(", "),
            dir.path().join("mnt").display()
        );
        std::fs::write(dir.path().join("config.yaml"), yaml).expect("config");
        Scene { dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn mount_path(&self, key: &str) -> PathBuf {
        self.dir.path().join("mnt").join(key)
    }

    fn owned(&self) -> Value {
        let text =
            std::fs::read_to_string(self.state().join("disks/owned.json")).expect("owned.json");
        serde_json::from_str(&text).expect("owned.json parses")
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(agent_bin())
            .args(["disks"])
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("config.yaml"))
            .arg("--state-dir")
            .arg(self.state())
            .env("NODEKEEPER_LOG", "info,nodekeeper=debug")
            .output()
            .expect("run nodekeeper")
    }

    /// `disks prepare --json`: the report, asserting exit 0.
    fn prepare(&self) -> Value {
        let out = self.cli(&["prepare", "--json"]);
        assert!(
            out.status.success(),
            "disks prepare: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("report is JSON")
    }
}

fn outcome<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in report: {report}"))
}

fn can_run() -> bool {
    require_root()
        && require_tool("losetup")
        && require_tool("mkfs.ext4")
        && require_tool("mkfs.xfs")
        && require_tool("blkid")
        && require_tool("wipefs")
        && require_tool("findmnt")
}

// === tests ===

#[test]
fn prepare_formats_only_the_blank_loop_and_leaves_signed_ones_byte_identical_root() {
    if !can_run() {
        return;
    }
    let blank = Loop::new();
    let ext4 = Loop::with_fs("mkfs.ext4");
    let xfs = Loop::with_fs("mkfs.xfs");
    let scene = Scene::new(&[&blank, &ext4, &xfs], "");
    let (ext4_before, xfs_before) = (ext4.edges(), xfs.edges());

    let report = scene.prepare();

    assert_eq!(
        outcome(&report, blank.name())["action"],
        "formatted",
        "{report}"
    );
    assert_eq!(
        outcome(&report, ext4.name())["decision"],
        "has-data",
        "{report}"
    );
    assert_eq!(
        outcome(&report, xfs.name())["decision"],
        "has-data",
        "{report}"
    );
    assert_eq!(outcome(&report, ext4.name())["action"], "untouched");
    assert!(
        ext4.edges() == ext4_before,
        "the ext4 loop's first/last MiB changed"
    );
    assert!(
        xfs.edges() == xfs_before,
        "the xfs loop's first/last MiB changed"
    );
    assert!(ext4.mount_points().is_empty() && xfs.mount_points().is_empty());

    // The blank one: our marker on the disk, the same in owned.json, mounted where promised.
    let rec = &scene.owned()["disks"][blank.name()];
    assert_eq!(blank.blkid("TYPE"), "ext4");
    assert_eq!(blank.blkid("LABEL"), rec["label"].as_str().unwrap());
    assert_eq!(blank.blkid("UUID"), rec["uuid"].as_str().unwrap());
    assert!(rec["label"].as_str().unwrap().starts_with("nk-"));
    let path = scene.mount_path(blank.name());
    assert_eq!(blank.mount_points(), vec![path.display().to_string()]);
    let prepared = report["prepared"].as_array().unwrap();
    assert_eq!(prepared.len(), 1, "{report}");
    assert_eq!(prepared[0]["path"], path.display().to_string());
    assert_eq!(prepared[0]["mode"], "filesystem");
    assert_eq!(prepared[0]["sizeBytes"], LOOP_BYTES);
    let mount_opts = sh(&format!("findmnt -rn -S {} -o OPTIONS", blank.dev));
    assert!(mount_opts.contains("noatime"), "{mount_opts}");
}

#[test]
fn xfs_mode_formats_with_our_marker_root() {
    if !can_run() {
        return;
    }
    let blank = Loop::new();
    let scene = Scene::new(&[&blank], "  fsType: xfs\n");
    let report = scene.prepare();
    assert_eq!(
        outcome(&report, blank.name())["action"],
        "formatted",
        "{report}"
    );
    let rec = &scene.owned()["disks"][blank.name()];
    assert_eq!(blank.blkid("TYPE"), "xfs");
    assert_eq!(blank.blkid("LABEL"), rec["label"].as_str().unwrap());
    assert_eq!(blank.blkid("UUID"), rec["uuid"].as_str().unwrap());
    assert_eq!(blank.mount_points().len(), 1);
}

#[test]
fn restart_remounts_our_disk_with_its_files_and_never_reformats_root() {
    if !can_run() {
        return;
    }
    let blank = Loop::new();
    let scene = Scene::new(&[&blank], "");
    scene.prepare();
    let uuid = blank.blkid("UUID");
    let path = scene.mount_path(blank.name());
    std::fs::write(path.join("precious"), b"kept across restarts").unwrap();

    // Still mounted: nothing to do.
    let again = scene.prepare();
    assert_eq!(outcome(&again, blank.name())["decision"], "ours", "{again}");
    assert_eq!(outcome(&again, blank.name())["action"], "already-mounted");

    // A reboot (or agent restart after an unmount): mounted again, same filesystem.
    blank.umount();
    let after = scene.prepare();
    assert_eq!(outcome(&after, blank.name())["decision"], "ours", "{after}");
    assert_eq!(outcome(&after, blank.name())["action"], "mounted");
    assert_eq!(after["lost"].as_array().unwrap().len(), 0);
    assert_eq!(
        blank.blkid("UUID"),
        uuid,
        "re-formatted: the filesystem UUID changed"
    );
    assert_eq!(
        std::fs::read_to_string(path.join("precious")).expect("the file survived"),
        "kept across restarts"
    );
}

#[test]
fn owned_disk_zeroed_behind_our_back_is_reprepared_and_reported_lost_root() {
    if !can_run() {
        return;
    }
    let blank = Loop::new();
    let scene = Scene::new(&[&blank], "");
    scene.prepare();
    let old_uuid = blank.blkid("UUID");
    blank.umount();
    blank.zero();

    let report = scene.prepare();
    let lost = report["lost"].as_array().unwrap();
    assert_eq!(lost.len(), 1, "{report}");
    assert_eq!(lost[0]["key"], blank.name());
    assert!(lost[0]["message"].as_str().unwrap().contains("lost"));
    assert_eq!(outcome(&report, blank.name())["action"], "formatted");
    let new_uuid = blank.blkid("UUID");
    assert!(!new_uuid.is_empty() && new_uuid != old_uuid);
    assert_eq!(scene.owned()["disks"][blank.name()]["uuid"], new_uuid);
    assert_eq!(blank.mount_points().len(), 1);

    // Reported once: the next pass finds it ours again.
    let next = scene.prepare();
    assert_eq!(next["lost"].as_array().unwrap().len(), 0, "{next}");
}

#[test]
fn foreign_filesystem_on_a_recorded_disk_is_never_ours_root() {
    if !can_run() {
        return;
    }
    let blank = Loop::new();
    let scene = Scene::new(&[&blank], "");
    scene.prepare();
    blank.umount();
    // Someone else formats it: the state file still calls it ours, the disk says otherwise.
    sh(&format!("mkfs.ext4 -q -F -L theirs {}", blank.dev));
    let before = blank.edges();

    let report = scene.prepare();
    let o = outcome(&report, blank.name());
    assert_eq!(o["decision"], "has-data", "{report}");
    assert_eq!(o["action"], "untouched");
    assert_eq!(report["lost"].as_array().unwrap().len(), 0);
    assert!(
        blank.mount_points().is_empty(),
        "a foreign filesystem was mounted"
    );
    assert!(blank.edges() == before, "a foreign filesystem was written");
    assert_eq!(blank.blkid("LABEL"), "theirs");
}

#[test]
fn block_mode_publishes_the_raw_device_without_mkfs_root() {
    if !can_run() {
        return;
    }
    let blank = Loop::new();
    let scene = Scene::new(&[&blank], "  mode: block\n");
    let report = scene.prepare();
    assert_eq!(
        outcome(&report, blank.name())["action"],
        "published-raw",
        "{report}"
    );
    let prepared = report["prepared"].as_array().unwrap();
    assert_eq!(prepared.len(), 1);
    assert_eq!(prepared[0]["mode"], "block");
    assert_eq!(prepared[0]["path"], blank.dev);
    assert!(
        blank.edges().0.iter().all(|&b| b == 0),
        "block mode wrote to the disk"
    );
    assert!(blank.blkid("TYPE").is_empty());
    assert_eq!(scene.owned()["disks"][blank.name()]["mode"], "block");
    // The next pass knows it (state file + serial + size: block mode has no on-disk marker).
    let again = scene.prepare();
    assert_eq!(outcome(&again, blank.name())["decision"], "ours", "{again}");
    assert_eq!(again["lost"].as_array().unwrap().len(), 0);
}

/// `disks wipe` resolves by-id links under HostPaths.dev: the test builds a temp `/dev` whose
/// `disk/by-id/` link points at a loop device (loops have no by-id links of their own), so the
/// rule "only exact by-id paths listed in allowWipe" is exercised unchanged.
#[test]
fn wipe_refuses_unlisted_or_unconfirmed_disks_then_wipes_root() {
    if !can_run() {
        return;
    }
    let victim = Loop::with_fs("mkfs.ext4");
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev");
    std::fs::create_dir_all(dev.join("disk/by-id")).unwrap();
    std::os::unix::fs::symlink(&victim.dev, dev.join(victim.name())).unwrap();
    let by_id = format!("/dev/disk/by-id/nk-test-{}", victim.name());
    std::os::unix::fs::symlink(
        format!("../../{}", victim.name()),
        dev.join(format!("disk/by-id/nk-test-{}", victim.name())),
    )
    .unwrap();
    let other = "/dev/disk/by-id/nk-test-someone-else";
    let scene = Scene::new(&[&victim], &format!("  allowWipe: [{other}]\n"));
    let wipe = |allow: &str, confirm: &str| {
        std::fs::write(
            scene.dir.path().join("config.yaml"),
            format!("disks:\n  allowWipe: [{allow}]\n  hostMountNamespace: false\n"),
        )
        .unwrap();
        let out = Command::new(agent_bin())
            .args(["disks", "wipe", &by_id, "--confirm", confirm, "--host-dev"])
            .arg(&dev)
            .arg("--config")
            .arg(scene.dir.path().join("config.yaml"))
            .arg("--state-dir")
            .arg(scene.state())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let before = victim.edges();

    let (code, err) = wipe(other, &by_id);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("not listed in disks.allowWipe"), "{err}");
    assert!(victim.edges() == before);

    let (code, err) = wipe(&by_id, "/dev/disk/by-id/nk-test-typo");
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--confirm must repeat"), "{err}");
    assert!(victim.edges() == before);

    let mnt = dir.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!("mount {} {}", victim.dev, mnt.display()));
    let (code, err) = wipe(&by_id, &by_id);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("mounted"), "{err}");
    victim.umount();
    assert_eq!(victim.blkid("TYPE"), "ext4");

    let (code, err) = wipe(&by_id, &by_id);
    assert_eq!(code, Some(0), "{err}");
    assert!(victim.blkid("TYPE").is_empty(), "still has a signature");
    let (head, tail) = victim.edges();
    assert!(head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0));
}

#[test]
fn daemon_prepares_remounts_and_reports_lost_disks_with_metrics_root() {
    if !can_run() {
        return;
    }
    let blank = Loop::new();
    let ext4 = Loop::with_fs("mkfs.ext4");
    let mnt = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&format!(
            "disks:\n  enabled: true\n  interval: 1s\n  devices: [{}, {}]\n  minSizeBytes: 1048576\n  discoveryDir: {}\n  hostMountNamespace: false\n",
            blank.name(),
            ext4.name(),
            mnt.path().display()
        ))
        .start();
    let key = blank.name().to_string();
    let path = mnt.path().join(&key);
    let m = agent.metrics_text();
    assert_eq!(
        sample(&m, "nodekeeper_disks_prepared_total", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "nodekeeper_disks", &[("decision", "has-data")]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "nodekeeper_disk_capacity_bytes", &[("disk", &key)]),
        Some(LOOP_BYTES as f64)
    );
    assert!(
        sample(&m, "nodekeeper_disk_used_bytes", &[("disk", &key)]).is_some(),
        "{m}"
    );
    std::fs::write(path.join("precious"), vec![7u8; 4 * MIB as usize]).unwrap();

    // Unmounted behind its back: the next pass mounts it again, files intact.
    blank.umount();
    wait_for(Duration::from_secs(20), "the disk re-mounted", || {
        (!blank.mount_points().is_empty()).then_some(())
    });
    assert_eq!(
        std::fs::read(path.join("precious")).unwrap().len(),
        4 * MIB as usize
    );
    // The mount is visible before the pass that made it publishes its metrics.
    let m = wait_for(Duration::from_secs(20), "decision=\"ours\" 1", || {
        let m = agent.metrics_text();
        (sample(&m, "nodekeeper_disks", &[("decision", "ours")]) == Some(1.0)).then_some(m)
    });
    assert_eq!(
        sample(&m, "nodekeeper_disks_prepared_total", &[]),
        Some(1.0),
        "re-formatted? {m}"
    );

    // Stop/start: the disk comes back blank -> re-prepared, counted as lost, logged at warn.
    blank.umount();
    blank.zero();
    wait_for(
        Duration::from_secs(20),
        "nodekeeper_disks_lost_total 1",
        || {
            let m = agent.metrics_text();
            (sample(&m, "nodekeeper_disks_lost_total", &[]) == Some(1.0)).then_some(())
        },
    );
    wait_for(Duration::from_secs(20), "the disk re-prepared", || {
        (!blank.mount_points().is_empty()).then_some(())
    });
    assert!(!path.join("precious").exists());
    let log = agent.proc.log_text();
    assert!(
        log.contains("WARN") && log.contains("is now blank"),
        "{log}"
    );
    drop(agent);
}

/// raid0 needs the md driver, which this machine's kernel may lack: the check runs inside a
/// throwaway Debian-kernel VM (tests/scripts/kernel-vm) that sees this tree through an overlay.
#[test]
fn raid0_in_a_kernel_vm() {
    if !require_tool("qemu-system-x86_64") || !require_tool("mdadm") || !require_tool("busybox") {
        return;
    }
    let root = nodekeeper_tests::workspace_root();
    let bin = agent_bin();
    let out = Command::new(root.join("tests/scripts/kernel-vm"))
        .arg(format!(
            "NODEKEEPER_BIN={} bash tests/scripts/raid0-check.sh",
            bin.display()
        ))
        .current_dir(&root)
        .output()
        .expect("run kernel-vm");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "raid0 check failed in the VM:\n{text}"
    );
    assert!(text.contains("RAID0 OK"), "{text}");
}

/// Undoes what a test did outside `Loop` (a partition mount, a `losetup -P` loop), even when
/// it fails.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cmd in self.0.iter().rev() {
            let _ = Command::new("sh").args(["-c", cmd]).status();
        }
    }
}

#[test]
fn wipe_refuses_a_disk_with_a_mounted_partition_and_while_the_disks_lock_is_held_root() {
    if !can_run() || !require_tool("sfdisk") || !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(LOOP_BYTES)
        .unwrap();
    let dev_path = sh(&format!("losetup --find --show -P {}", img.display()))
        .trim()
        .to_string();
    let mut cleanup = Cleanup(vec![format!("losetup -d {dev_path}")]);
    let name = dev_path.trim_start_matches("/dev/").to_string();
    // sfdisk's re-read does not always reach a loop: partx adds what the kernel missed.
    sh(&format!(
        "printf ',64M\\n' | sfdisk -q {dev_path} && (partx -a {dev_path} 2>/dev/null || true)"
    ));
    let part = format!("{name}p1");
    wait_for(Duration::from_secs(10), "the partition in sysfs", || {
        Path::new(&format!("/sys/block/{name}/{part}"))
            .exists()
            .then_some(())
    });
    sh(&format!("mkfs.ext4 -q /dev/{part}"));
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    // Read-only: the mount itself never writes, so any change is the wipe's.
    sh(&format!("mount -o ro,noload /dev/{part} {}", m.display()));
    cleanup.0.push(format!("umount -l {}", m.display()));

    let dev = dir.path().join("dev");
    std::fs::create_dir_all(dev.join("disk/by-id")).unwrap();
    std::os::unix::fs::symlink(&dev_path, dev.join(&name)).unwrap();
    let by_id = format!("/dev/disk/by-id/nk-test-{name}");
    std::os::unix::fs::symlink(
        format!("../../{name}"),
        dev.join(format!("disk/by-id/nk-test-{name}")),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("disks:\n  allowWipe: [{by_id}]\n  hostMountNamespace: false\n"),
    )
    .unwrap();
    let state = dir.path().join("state");
    let wipe = || {
        let out = Command::new(agent_bin())
            .args(["disks", "wipe", &by_id, "--confirm", &by_id, "--host-dev"])
            .arg(&dev)
            .arg("--config")
            .arg(dir.path().join("config.yaml"))
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let sha = || {
        sh(&format!(
            "blockdev --flushbufs {dev_path} && sha256sum {dev_path}"
        ))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
    };
    let before = sha();
    let (code, err) = wipe();
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!("partition {part} is mounted")),
        "{err}"
    );
    sh(&format!("umount {}", m.display()));
    nodekeeper_tests::loopdev::wait_released(Path::new(&dev_path));
    assert_eq!(sha(), before, "a disk with a mounted partition was written");

    // The daemon's pass (or another CLI) holds the disks lock: refused, nothing written.
    std::fs::create_dir_all(state.join("disks")).unwrap();
    let lock = state.join("disks/lock");
    // Held the way the daemon holds it: an exclusive flock on the same file.
    let held = nix::fcntl::Flock::lock(
        std::fs::File::create(&lock).unwrap(),
        nix::fcntl::FlockArg::LockExclusive,
    )
    .map_err(|(_, e)| e)
    .unwrap();
    let (code, err) = wipe();
    drop(held);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("holds") && err.contains("disks/lock"), "{err}");
    assert_eq!(sha(), before, "wiped while the lock was held");

    // Neither in use nor locked: the operator's wipe goes through.
    let (code, err) = wipe();
    assert_eq!(code, Some(0), "{err}");
    assert_ne!(sha(), before);
}
