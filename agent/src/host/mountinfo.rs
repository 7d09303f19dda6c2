//! Mount tables: `/proc/PID/mountinfo` split into fields by procfs-core's `MountInfo` parser
//! (the same crate the metrics readers use), with the kernel's octal escapes undone here, once,
//! for every reader (`\040` space, `\011` tab, `\012` newline, `\134` backslash): procfs-core
//! leaves them in.
//!
//! Reads only. A line procfs-core cannot parse is skipped, not fatal: one odd mount must not
//! hide every other mount from a caller deciding whether a disk is in use.

use std::path::Path;

use procfs_core::process::MountInfo;

use super::HostPaths;

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount's unique id (field 1).
    pub mount_id: i32,
    /// `major:minor` of the mounted device (0:N for btrfs and other virtual-dev filesystems).
    pub dev: String,
    /// Where it is mounted, unescaped.
    pub mount_point: String,
    /// The filesystem type (`ext4`).
    pub fs_type: String,
    /// The mount source (`/dev/nvme1n1p1`) as the kernel shows it, unescaped; empty for
    /// `none`.
    pub source: String,
}

/// Parses mountinfo text: `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| MountInfo::from_line(line).ok())
        .map(|m| Mount {
            mount_id: m.mnt_id,
            dev: m.majmin,
            mount_point: unescape(&m.mount_point.to_string_lossy()),
            fs_type: m.fs_type,
            source: m.mount_source.as_deref().map(unescape).unwrap_or_default(),
        })
        .collect()
}

/// The mounts in `path` (a mountinfo file); none when it is unreadable.
pub fn read(path: &Path) -> Vec<Mount> {
    std::fs::read_to_string(path)
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The host's mounts: PID 1's mountinfo under the HostPaths proc root (the host's mount
/// namespace when the agent runs with hostPID), falling back to our own when PID 1's is
/// unreadable. Unreadable both: no mounts are known.
pub fn read_host(paths: &HostPaths) -> Vec<Mount> {
    std::fs::read_to_string(paths.proc("1/mountinfo"))
        .or_else(|_| std::fs::read_to_string(paths.proc("self/mountinfo")))
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Undoes the kernel's `\ooo` octal escapes (mountinfo, /proc/mounts); anything else, including
/// a backslash not followed by three octal digits, is kept as is.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        match octal
            .then(|| u8::from_str_radix(&s[i + 1..i + 4], 8).ok())
            .flatten()
        {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(
            unescape("/mnt/t\\011ab\\012nl\\134bs"),
            "/mnt/t\tab\nnl\\bs"
        );
        assert_eq!(unescape("/mnt/plain"), "/mnt/plain");
        assert_eq!(unescape("/mnt/x\\"), "/mnt/x\\");
        assert_eq!(unescape("/mnt/x\\04"), "/mnt/x\\04");
        assert_eq!(unescape("/mnt/x\\089"), "/mnt/x\\089");
    }

    #[test]
    fn fields_escapes_and_sources() {
        let m = parse(
            "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n\
             40 22 0:45 / /mnt/with\\040space rw - btrfs /dev/loop3 rw\n\
             41 22 0:46 / /run/a\\134b rw master:3 propagate_from:2 - tmpfs none rw\n",
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_id, 22);
        assert_eq!(m[0].dev, "259:2");
        assert_eq!(m[0].mount_point, "/");
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[0].source, "/dev/nvme0n1p2");
        assert_eq!(m[1].mount_point, "/mnt/with space");
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fs_type, "btrfs");
        assert_eq!(m[2].mount_point, "/run/a\\b");
        assert_eq!(m[2].source, "");
    }

    #[test]
    fn a_broken_line_hides_no_other_mount() {
        let m = parse(
            "garbage\n\
             40 22 0:45 / /mnt/a rw - xfs /dev/loop3 rw\n\
             41 22 0:46 / /mnt/b rw no-separator-here\n",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, "/mnt/a");
    }

    #[test]
    fn the_host_table_is_read_under_the_proc_root_with_a_fallback_to_self() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::under(dir.path());
        assert!(read_host(&paths).is_empty());
        std::fs::create_dir_all(dir.path().join("proc/self")).unwrap();
        std::fs::write(
            dir.path().join("proc/self/mountinfo"),
            "7 1 7:3 / /self rw - ext4 /dev/loop3 rw\n",
        )
        .unwrap();
        assert_eq!(read_host(&paths)[0].mount_point, "/self");
        std::fs::create_dir_all(dir.path().join("proc/1")).unwrap();
        std::fs::write(
            dir.path().join("proc/1/mountinfo"),
            "8 1 7:4 / /host rw - ext4 /dev/loop4 rw\n",
        )
        .unwrap();
        assert_eq!(read_host(&paths)[0].mount_point, "/host");
    }
}
