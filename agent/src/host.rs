//! Where the host's filesystems are, as seen from the agent.
//!
//! Every read of host state goes through `HostPaths`, so tests (and a DaemonSet that mounts the
//! host under `/host`) point the agent at other roots, as node_exporter's `--path.*` flags do.
//! This module never writes anything; `in_namespace` runs a closure inside one of the host's
//! namespaces (network for sysctl in pods, mount for disk preparation) on a dedicated thread.

pub mod exec;
pub mod mountinfo;

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

// === namespaces ===

/// A Linux namespace kind that `in_namespace` can enter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// `/proc/PID/ns/net`, `/run/netns/NAME`.
    Net,
    /// `/proc/PID/ns/mnt`: mounts made inside are the host's (visible to the kubelet).
    Mount,
}

impl Namespace {
    fn flags(self) -> nix::sched::CloneFlags {
        match self {
            Self::Net => nix::sched::CloneFlags::CLONE_NEWNET,
            Self::Mount => nix::sched::CloneFlags::CLONE_NEWNS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Net => "network",
            Self::Mount => "mount",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// The namespace file could not be opened.
    #[error("cannot open {} namespace {}: {error}", kind.name(), path.display())]
    Open {
        kind: Namespace,
        path: PathBuf,
        error: String,
    },
    /// setns(2) (or the unshare(CLONE_FS) a mount namespace needs first) failed: needs
    /// CAP_SYS_ADMIN.
    #[error("cannot enter {} namespace {}: {error}", kind.name(), path.display())]
    Enter {
        kind: Namespace,
        path: PathBuf,
        error: String,
    },
    #[error("the thread working in {} namespace {} panicked", kind.name(), path.display())]
    Panicked { kind: Namespace, path: PathBuf },
}

/// Runs `f` inside the namespace at `path`, on a fresh OS thread that exits afterwards.
///
/// setns(2) changes only the calling thread, so the tokio workers never change namespace. A
/// mount namespace can only be entered by a thread that does not share its filesystem attributes
/// (root, cwd) with the rest of the process, so that thread first unshares CLONE_FS. Child
/// processes spawned by `f` (mkfs, mount) inherit the thread's namespaces.
pub fn in_namespace<T, F>(kind: Namespace, path: &Path, f: F) -> Result<T, NamespaceError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = std::fs::File::open(path).map_err(|e| NamespaceError::Open {
        kind,
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    let owned = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name(format!("nodekeeper-ns-{}", kind.name()))
        .spawn(move || {
            let enter = |e: nix::Error| NamespaceError::Enter {
                kind,
                path: owned.clone(),
                error: e.to_string(),
            };
            if kind == Namespace::Mount {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(enter)?;
            }
            nix::sched::setns(&ns, kind.flags()).map_err(enter)?;
            Ok(f())
        })
        .expect("spawning a thread");
    handle.join().map_err(|_| NamespaceError::Panicked {
        kind,
        path: path.to_path_buf(),
    })?
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
