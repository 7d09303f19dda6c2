//! Where the host's filesystems are, as seen from the agent.
//!
//! Every read of host state goes through `HostPaths`, so tests (and a DaemonSet that mounts the
//! host under `/host`) point the agent at other roots, as node_exporter's `--path.*` flags do.
//! This module never writes anything.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HostPaths {
    /// The host's procfs (`/proc`): node-wide counters and, with hostPID, every process.
    pub proc: PathBuf,
    /// The host's sysfs (`/sys`).
    pub sys: PathBuf,
    /// The host's device nodes (`/dev`).
    pub dev: PathBuf,
    /// The host's root filesystem; host mount points are resolved beneath it.
    pub rootfs: PathBuf,
    /// The host's cgroup v2 hierarchy.
    pub cgroup: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            proc: "/proc".into(),
            sys: "/sys".into(),
            dev: "/dev".into(),
            rootfs: "/".into(),
            cgroup: "/sys/fs/cgroup".into(),
        }
    }
}

impl HostPaths {
    /// All roots rooted at one directory, laid out like a host (`root/proc`, `root/sys/fs/cgroup`...).
    pub fn under(root: &Path) -> Self {
        Self {
            proc: root.join("proc"),
            sys: root.join("sys"),
            dev: root.join("dev"),
            rootfs: root.to_path_buf(),
            cgroup: root.join("sys/fs/cgroup"),
        }
    }

    /// `(config field name, path)` for each root, for validation and status output.
    pub fn named(&self) -> [(&'static str, &Path); 5] {
        [
            ("proc", &self.proc),
            ("sys", &self.sys),
            ("dev", &self.dev),
            ("rootfs", &self.rootfs),
            ("cgroup", &self.cgroup),
        ]
    }

    pub fn proc(&self, rel: &str) -> PathBuf {
        self.proc.join(rel)
    }

    pub fn sys(&self, rel: &str) -> PathBuf {
        self.sys.join(rel)
    }

    pub fn cgroup(&self, rel: &str) -> PathBuf {
        self.cgroup.join(rel)
    }

    /// A host path (absolute, as the host sees it) resolved beneath `rootfs`.
    pub fn on_rootfs(&self, host_path: &Path) -> PathBuf {
        match host_path.strip_prefix("/") {
            Ok(rel) => self.rootfs.join(rel),
            Err(_) => self.rootfs.join(host_path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_resolve_beneath_rootfs() {
        let h = HostPaths::under(Path::new("/host"));
        assert_eq!(
            h.on_rootfs(Path::new("/var/lib")),
            PathBuf::from("/host/var/lib")
        );
        assert_eq!(h.on_rootfs(Path::new("/")), PathBuf::from("/host/"));
        assert_eq!(h.proc("stat"), PathBuf::from("/host/proc/stat"));
        assert_eq!(
            h.cgroup("kubepods.slice"),
            PathBuf::from("/host/sys/fs/cgroup/kubepods.slice")
        );
        assert_eq!(
            HostPaths::default().on_rootfs(Path::new("/var")),
            PathBuf::from("/var")
        );
    }
}
