//! Discovery and inspection against real loop devices (root): one loop per signature the agent
//! must never touch, plus a blank one. `nodekeeper disks list --json` with `disks.devices` set
//! to exactly these loops must name each signature, call only the blank one a candidate, and
//! leave every device's first and last MiB byte-for-byte unchanged.
//!
//! Fixtures: the real tools write the signature (mkfs.ext4, mkfs.xfs, mkfs.btrfs, mkswap,
//! sgdisk, sfdisk, cryptsetup luksFormat on the backing file before it is attached; pvcreate on
//! the attached loop, as LVM wants a block device). Three are written by the test itself,
//! with the on-disk layout documented at each writer:
//! - md RAID member: `mdadm --create` needs the md driver, which this VM's kernel lacks, so an
//!   md 1.2 superblock (with a valid checksum) is written at 4 KiB;
//! - ZFS: no ZFS tools in Debian main, so uberblocks with the magic 0x00bab10c are written in
//!   the uberblock rings of the four vdev labels;
//! - random data: 1 MiB of pseudo-random bytes at the start, no known signature.
//!
//! No tool ever runs on a device the test did not attach.

use std::path::Path;
use std::process::{Command, Stdio};

use nodekeeper_tests::loopdev::LoopDevice;
use nodekeeper_tests::{agent_bin, require_root, require_tool};

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses filesystems under 300 MiB; the files are sparse, so this costs nothing.
const LOOP_SIZE: u64 = 320 * MIB;

/// Runs a fixture tool; panics with its output when it fails.
fn run(cmd: &str, args: &[&str], target: &Path) {
    let out = Command::new(cmd)
        .args(args)
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} {}: {}{}",
        target.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_stdin(cmd: &str, args: &[&str], target: &Path, input: &str) {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_at(file: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// md 1.2 superblock (struct mdp_superblock_1, little-endian) at 4 KiB of a `size`-byte
/// member: magic 0xa92b4efc at 0, major_version 1 at 4, set_uuid at 16, set_name at 32,
/// level (1) at 72, size at 80, raid_disks (2) at 92, data_offset at 128, data_size at 136,
/// super_offset (8 sectors) at 144, dev_number at 160, device_uuid at 168, events at 200,
/// sb_csum at 216, max_dev (2) at 220, dev_roles (u16 each) from 256. The checksum is the
/// kernel's calc_sb_1_csum: the u32 sum of the first 256 + 2*max_dev bytes with sb_csum zero,
/// folded to 32 bits.
fn md_superblock_1_2(size: u64) -> Vec<u8> {
    let mut sb = vec![0u8; 512];
    let put32 = |sb: &mut Vec<u8>, off: usize, v: u32| {
        sb[off..off + 4].copy_from_slice(&v.to_le_bytes());
    };
    let put64 = |sb: &mut Vec<u8>, off: usize, v: u64| {
        sb[off..off + 8].copy_from_slice(&v.to_le_bytes());
    };
    put32(&mut sb, 0, 0xa92b_4efc);
    put32(&mut sb, 4, 1);
    sb[16..32].copy_from_slice(&[0x5a; 16]);
    sb[32..40].copy_from_slice(b"nk-test0");
    put32(&mut sb, 72, 1);
    let data_offset = 2048u64;
    let data_size = size / 512 - data_offset;
    put64(&mut sb, 80, data_size);
    put32(&mut sb, 92, 2);
    put64(&mut sb, 128, data_offset);
    put64(&mut sb, 136, data_size);
    put64(&mut sb, 144, 8);
    put32(&mut sb, 160, 0);
    sb[168..184].copy_from_slice(&[0xa5; 16]);
    put64(&mut sb, 200, 1);
    let max_dev = 2u32;
    put32(&mut sb, 220, max_dev);
    sb[256..258].copy_from_slice(&0u16.to_le_bytes());
    sb[258..260].copy_from_slice(&1u16.to_le_bytes());
    let len = 256 + 2 * max_dev as usize;
    let mut sum: u64 = 0;
    for w in sb[..len].chunks(4) {
        sum += u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as u64;
    }
    put32(&mut sb, 216, ((sum & 0xffff_ffff) + (sum >> 32)) as u32);
    sb
}

/// ZFS: each vdev label is 256 KiB (L0 at 0, L1 at 256 KiB, L2 and L3 in the last 512 KiB);
/// its uberblock ring starts at 128 KiB into the label, one uberblock per 1 KiB slot (ashift 9),
/// each beginning with ub_magic 0x00bab10c (u64, host byte order) and ub_version at 8.
fn zfs_labels(file: &Path, size: u64) {
    const LABEL: u64 = 256 << 10;
    let mut ub = Vec::new();
    ub.extend_from_slice(&0x00ba_b10cu64.to_le_bytes());
    ub.extend_from_slice(&5000u64.to_le_bytes()); // ub_version: SPA_VERSION_FEATURES
    ub.extend_from_slice(&1u64.to_le_bytes()); // ub_txg
    for label in [0, LABEL, size - 2 * LABEL, size - LABEL] {
        for slot in 0..4 {
            write_at(file, label + (128 << 10) + slot * 1024, &ub);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), no known signature in them.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

struct Case {
    /// Fixture name, also the backing file's name.
    name: &'static str,
    /// Expected start of the reason (`has ext4 signature`), or None for the blank candidate.
    reason: Option<&'static str>,
    dev: LoopDevice,
}

fn tools_present() -> bool {
    require_root()
        && [
            "losetup",
            "blockdev",
            "mkfs.ext4",
            "mkfs.xfs",
            "mkfs.btrfs",
            "mkswap",
            "sgdisk",
            "sfdisk",
            "pvcreate",
            "cryptsetup",
            "blkid",
            "wipefs",
        ]
        .iter()
        .all(|t| require_tool(t))
}

/// Every fixture, attached. Format tools write the backing file before attaching; pvcreate
/// writes the attached loop (the exact path losetup printed).
fn fixtures(dir: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |name: &'static str,
                   reason: Option<&'static str>,
                   before: &dyn Fn(&Path),
                   after: &dyn Fn(&LoopDevice)| {
        let file = dir.join(format!("{name}.img"));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(LOOP_SIZE)
            .unwrap();
        before(&file);
        let dev = LoopDevice::attach(&file, LOOP_SIZE);
        after(&dev);
        cases.push(Case { name, reason, dev });
    };
    let none = |_: &LoopDevice| {};
    add(
        "ext4",
        Some("has ext4 signature"),
        &|f| run("mkfs.ext4", &["-q", "-F"], f),
        &none,
    );
    add(
        "xfs",
        Some("has xfs signature"),
        &|f| run("mkfs.xfs", &["-q", "-f"], f),
        &none,
    );
    add(
        "btrfs",
        Some("has btrfs signature"),
        &|f| run("mkfs.btrfs", &["-q", "-f"], f),
        &none,
    );
    add(
        "swap",
        Some("has swap signature"),
        &|f| run("mkswap", &[], f),
        &none,
    );
    add(
        "gpt",
        Some("has gpt signature"),
        &|f| run("sgdisk", &["-n", "1:2048:+16M", "-t", "1:8300"], f),
        &none,
    );
    // GPT whose primary header (LBA 1) was destroyed: the backup at the last LBA still counts.
    add(
        "gpt-backup-only",
        Some("has gpt signature"),
        &|f| {
            run("sgdisk", &["-n", "1:2048:+16M"], f);
            write_at(f, 512, &[0u8; 512]);
        },
        &none,
    );
    add(
        "mbr",
        Some("has mbr signature"),
        &|f| run_stdin("sfdisk", &["-q"], f, "label: dos\n,16M,83\n"),
        &none,
    );
    add("lvm", Some("has lvm2 signature"), &|_| {}, &|d| {
        run("pvcreate", &["-q", "-y", "-ff"], &d.path)
    });
    add(
        "luks",
        Some("has luks signature"),
        &|f| {
            let key = f.with_extension("key");
            std::fs::write(&key, b"nodekeeper-test-key").unwrap();
            let key_arg = format!("--key-file={}", key.display());
            run(
                "cryptsetup",
                &[
                    "luksFormat",
                    "--batch-mode",
                    "--type",
                    "luks2",
                    "--pbkdf",
                    "pbkdf2",
                    "--pbkdf-force-iterations",
                    "1000",
                    &key_arg,
                ],
                f,
            );
        },
        &none,
    );
    add(
        "md",
        Some("has md signature"),
        &|f| write_at(f, 4096, &md_superblock_1_2(LOOP_SIZE)),
        &none,
    );
    add(
        "zfs",
        Some("has zfs signature"),
        &|f| zfs_labels(f, LOOP_SIZE),
        &none,
    );
    add(
        "random",
        Some("has data without a known signature (non-zero data in the first MiB, from offset 0)"),
        &|f| write_at(f, 0, &random_bytes(MIB as usize)),
        &none,
    );
    add("blank", None, &|_| {}, &none);
    cases
}

fn disks_list(config: &Path) -> serde_json::Value {
    let out = Command::new(agent_bin())
        .args(["disks", "list", "--json", "--config"])
        .arg(config)
        .output()
        .expect("run nodekeeper disks list");
    assert!(
        out.status.success(),
        "disks list failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "disks list --json is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn config_for(dir: &Path, devices: &[&str], cross_check: bool) -> std::path::PathBuf {
    let list = devices
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ");
    // modelPatterns empty: nothing but the listed loops can be selected on this machine.
    let yaml = format!(
        "disks:\n  devices: [{list}]\n  modelPatterns: []\n  minSizeBytes: 1048576\n  crossCheck: {cross_check}\n"
    );
    let p = dir.join(format!("config-{cross_check}.yaml"));
    std::fs::write(&p, yaml).unwrap();
    p
}

#[test]
fn root_disks_list_names_every_signature_on_loop_devices_and_writes_nothing() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = fixtures(dir.path());
    let before: Vec<(Vec<u8>, Vec<u8>)> = cases.iter().map(|c| c.dev.ends(MIB)).collect();
    let names: Vec<&str> = cases.iter().map(|c| c.dev.name.as_str()).collect();

    // Both with the blkid/wipefs cross-check (default) and with our probes alone: every
    // signature must be found by our own probes.
    for cross_check in [true, false] {
        let report = disks_list(&config_for(dir.path(), &names, cross_check));
        let disks = report["disks"].as_array().expect("disks array");
        let mut candidates = Vec::new();
        for c in &cases {
            let d = disks
                .iter()
                .find(|d| d["name"] == c.dev.name.as_str())
                .unwrap_or_else(|| panic!("{} ({}) missing from {report:#}", c.dev.name, c.name));
            assert_eq!(d["sizeBytes"], LOOP_SIZE, "{}: {d:#}", c.name);
            assert_eq!(
                d["selectedBy"], "listed in disks.devices",
                "{}: {d:#}",
                c.name
            );
            match c.reason {
                None => {
                    assert_eq!(d["decision"], "candidate", "{}: {d:#}", c.name);
                    // A disk our probes call blank gets the second opinion.
                    let tools = d["inspection"]["crossCheckedWith"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    assert_eq!(
                        tools.len(),
                        if cross_check { 2 } else { 0 },
                        "{}: {d:#}",
                        c.name
                    );
                }
                Some(want) => {
                    assert_eq!(d["decision"], "has-data", "{}: {d:#}", c.name);
                    let reason = d["reason"].as_str().unwrap_or_default();
                    assert!(
                        reason.starts_with(want),
                        "{} (crossCheck {cross_check}): reason {reason:?} does not start with {want:?}",
                        c.name
                    );
                    // Our probes found it: the tools are not asked (they can only add
                    // findings, and one finding already makes the disk untouchable).
                    assert!(
                        !reason.contains("cross-checked"),
                        "{}: a disk our probes flagged is not cross-checked: {reason:?}",
                        c.name
                    );
                }
            }
            if d["decision"] == "candidate" {
                candidates.push(c.name);
            }
        }
        assert_eq!(candidates, ["blank"], "only the blank loop is a candidate");
        // The GPT fixture: both headers found by our probes.
        let gpt = &cases.iter().find(|c| c.name == "gpt").unwrap().dev.name;
        let gpt = disks.iter().find(|d| d["name"] == gpt.as_str()).unwrap();
        let details: Vec<&str> = gpt["inspection"]["signatures"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["detail"].as_str())
            .collect();
        assert!(
            details
                .iter()
                .any(|d| d.starts_with("primary header at LBA 1")),
            "{details:?}"
        );
        assert!(
            details
                .iter()
                .any(|d| d.starts_with("backup header at the last LBA")),
            "{details:?}"
        );
        // Devices not listed are never selected (the host's disks, other tests' loops).
        for d in disks {
            if !names.contains(&d["name"].as_str().unwrap_or_default()) {
                assert_eq!(d["decision"], "not-selected", "{d:#}");
            }
        }
        // The ext4 hook for prepare: type, label and UUID are reported.
        let ext4 = &cases.iter().find(|c| c.name == "ext4").unwrap().dev.name;
        let ext4 = disks.iter().find(|d| d["name"] == ext4.as_str()).unwrap();
        assert_eq!(ext4["inspection"]["filesystem"]["fsType"], "ext4");
        assert_eq!(
            ext4["inspection"]["filesystem"]["uuid"]
                .as_str()
                .unwrap()
                .len(),
            36
        );
    }

    // The table form, for the log: one row per device.
    let table = Command::new(agent_bin())
        .args(["disks", "list", "--config"])
        .arg(config_for(dir.path(), &names, true))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    eprintln!("{table}");
    for c in &cases {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("{} ", c.dev.name))),
            "{} in the table:\n{table}",
            c.dev.name
        );
    }

    for (c, (head, tail)) in cases.iter().zip(&before) {
        let (head2, tail2) = c.dev.ends(MIB);
        assert!(head == &head2, "{}: first MiB changed", c.name);
        assert!(tail == &tail2, "{}: last MiB changed", c.name);
    }
}

#[test]
fn root_a_mounted_loop_is_in_use_and_never_opened() {
    if !require_root() || !require_tool("losetup") || !require_tool("mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mounted.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run("mkfs.ext4", &["-q", "-F"], &file);
    let dev = LoopDevice::attach(&file, 64 * MIB);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run("mount", &[dev.path.to_str().unwrap()], &mnt);
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let report = disks_list(&config_for(dir.path(), &[&dev.name], true));
    let d = report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == dev.name.as_str())
        .unwrap()
        .clone();
    assert_eq!(d["decision"], "in-use", "{d:#}");
    assert_eq!(
        d["reason"],
        format!("mounted at {}", mnt.display()),
        "{d:#}"
    );
    assert!(
        d["inspection"].is_null(),
        "an in-use disk is not opened: {d:#}"
    );
}

#[test]
fn disks_list_refuses_bad_selection_config_naming_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(
        &config,
        "disks:\n  devices: [loop3, /dev/loop4]\n  exclude: [loop3]\n  allowWipe: [\"/dev/disk/by-id/nvme-*\"]\n",
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .args(["disks", "list", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing listed on bad config");
    for field in [
        "disks.devices[0]: \"loop3\" is also in disks.exclude",
        "disks.devices[1]: \"/dev/loop4\" must be a kernel device name",
        "disks.allowWipe[0]",
    ] {
        assert!(stderr.contains(field), "{field:?} in {stderr}");
    }
}
