//! Loop devices for disk tests: a sparse backing file in a temp dir, attached with
//! `losetup --find --show`, detached on drop (even when the test panics).
//!
//! The only block devices a test may write are the ones this module attached: each test takes
//! the exact `/dev/loopN` that `losetup --show` printed and names only those kernel names in
//! `disks.devices`. This module never writes a device itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a filesystem may outlive its last mount in this namespace before a test gives up.
/// A process that entered a new mount namespace while the mount existed (`ip netns exec`,
/// `unshare -m`: the other suites on this shared machine) holds a private copy of it (this
/// host's mounts do not propagate), and with it the superblock: the device stays claimed, a
/// remount with other flags and every `O_EXCL` open fail with EBUSY until that process exits.
/// Those processes are test helpers that live seconds; a minute bounds the wait.
pub const RELEASE_DEADLINE: Duration = Duration::from_secs(60);

/// Unmounts every mount of `dev` in this mount namespace, then waits (at most
/// [`RELEASE_DEADLINE`]) until the kernel has let go of the device: an `O_RDONLY|O_EXCL` open
/// succeeds, as it must before the agent can claim the disk or a loop can be re-attached.
/// Only EBUSY is waited on; any other error, or the deadline, panics naming the processes whose
/// mount namespaces still hold the device.
pub fn unmount_and_release(dev: &Path) {
    for target in mount_points(dev) {
        let out = Command::new("umount")
            .arg(&target)
            .output()
            .expect("run umount");
        assert!(
            out.status.success(),
            "umount {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_released(dev);
}

/// Waits until `dev` can be opened exclusively (see [`unmount_and_release`]).
pub fn wait_released(dev: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let deadline = Instant::now() + RELEASE_DEADLINE;
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
            .open(dev)
        {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                assert!(
                    Instant::now() < deadline,
                    "{} still claimed {RELEASE_DEADLINE:?} after its last mount here was \
                     removed; mount namespaces still holding it: {:?}",
                    dev.display(),
                    holders_elsewhere(dev)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("open {} O_EXCL: {e}", dev.display()),
        }
    }
}

/// Mount points of `dev` in this mount namespace (`findmnt -S`).
fn mount_points(dev: &Path) -> Vec<String> {
    let out = Command::new("findmnt")
        .args(["-rn", "-o", "TARGET", "-S"])
        .arg(dev)
        .output()
        .expect("run findmnt");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `pid: mount point` of every process whose mount table still shows `dev` (by major:minor).
fn holders_elsewhere(dev: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(rdev) = std::fs::metadata(dev).map(|m| m.rdev()) else {
        return Vec::new();
    };
    let id = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(table) = std::fs::read_to_string(entry.path().join("mountinfo")) else {
            continue;
        };
        for line in table.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.get(2) == Some(&id.as_str()) {
                let pid = entry.file_name().to_string_lossy().into_owned();
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                found.push(format!("{pid} ({}): {}", comm.trim(), fields[4]));
            }
        }
    }
    found
}

/// A loop device attached to a backing file; detached on drop.
pub struct LoopDevice {
    /// `/dev/loopN`, as `losetup --show` printed it.
    pub path: PathBuf,
    /// Kernel name: `loopN`.
    pub name: String,
    pub backing: PathBuf,
}

impl LoopDevice {
    /// Creates a sparse `size_bytes` backing file at `backing` (unless it exists: then the file
    /// is attached as it is) and attaches it, without partition scanning.
    pub fn attach(backing: &Path, size_bytes: u64) -> LoopDevice {
        if !backing.exists() {
            let f = std::fs::File::create(backing).expect("create backing file");
            f.set_len(size_bytes).expect("size backing file");
        }
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup --find --show {}: {}",
            backing.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert!(
            name.starts_with("loop") && path.starts_with("/dev"),
            "losetup printed {path:?}, not a loop device"
        );
        LoopDevice {
            path,
            name,
            backing: backing.to_path_buf(),
        }
    }

    /// Attaches an existing backing file at exactly `/dev/<name>` (a free loop the test itself
    /// just detached): how a kernel name gets re-bound to another disk (EC2 stop/start, loops
    /// re-attached in another order).
    pub fn attach_as(backing: &Path, name: &str) -> LoopDevice {
        let path = PathBuf::from("/dev").join(name);
        let out = Command::new("losetup")
            .arg(&path)
            .arg(backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup {} {}: {}",
            path.display(),
            backing.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            path,
            name: name.to_string(),
            backing: backing.to_path_buf(),
        }
    }

    /// Unmounts the device everywhere in this namespace and waits until the kernel released it
    /// ([`unmount_and_release`]).
    pub fn unmount_and_release(&self) {
        unmount_and_release(&self.path);
    }

    /// The device's size in bytes, as the kernel sees it.
    pub fn size(&self) -> u64 {
        std::fs::read_to_string(format!("/sys/block/{}/size", self.name))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|s| s * 512)
            .unwrap_or(0)
    }

    /// The first and last `len` bytes as the device shows them now (page cache of the device
    /// dropped first, so writes through any path are seen).
    pub fn ends(&self, len: u64) -> (Vec<u8>, Vec<u8>) {
        use std::os::unix::fs::FileExt;
        let _ = Command::new("blockdev")
            .arg("--flushbufs")
            .arg(&self.path)
            .status();
        let f = std::fs::File::open(&self.path).expect("open loop device read-only");
        let size = self.size();
        let mut head = vec![0u8; len.min(size) as usize];
        f.read_exact_at(&mut head, 0).expect("read head");
        let tail_len = len.min(size);
        let mut tail = vec![0u8; tail_len as usize];
        f.read_exact_at(&mut tail, size - tail_len)
            .expect("read tail");
        (head, tail)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Anything the test (or the agent under test) mounted from it goes first.
        if let Ok(out) = Command::new("findmnt")
            .args(["-rn", "-o", "TARGET", "-S"])
            .arg(&self.path)
            .output()
        {
            for target in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
        let ok = Command::new("losetup")
            .arg("--detach")
            .arg(&self.path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("warning: losetup --detach {} failed", self.path.display());
        }
    }
}
