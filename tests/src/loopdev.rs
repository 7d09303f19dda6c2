//! Loop devices for disk tests: a sparse backing file in a temp dir, attached with
//! `losetup --find --show`, detached on drop (even when the test panics).
//!
//! The only block devices a test may write are the ones this module attached: each test takes
//! the exact `/dev/loopN` that `losetup --show` printed and names only those kernel names in
//! `disks.devices`. This module never writes a device itself.

use std::path::{Path, PathBuf};
use std::process::Command;

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
