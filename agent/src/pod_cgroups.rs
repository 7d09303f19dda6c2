//! Finds pods on the host through the kubelet's cgroup hierarchy, and each pod's network
//! namespace through the processes in its cgroup.
//!
//! Handles both kubelet cgroup drivers:
//! - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice`
//! - cgroupfs: `kubepods/burstable/pod<uid>`
//!
//! on cgroup v2 (the hierarchy at the root) and on cgroup v1, where the same tree is repeated
//! under each controller (`pids/`, `memory/`, `cpu,cpuacct/`, `systemd/`): the first controller
//! that has it is used. Guaranteed pods sit directly under the root. Reads only.

use std::path::{Path, PathBuf};

use crate::host::HostPaths;

const QOS_CLASSES: [&str; 2] = ["burstable", "besteffort"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    pub uid: String,
    /// "guaranteed", "burstable" or "besteffort".
    pub qos: &'static str,
    pub dir: PathBuf,
}

/// Where a kubepods tree can start: v2 at the root, then v1 controllers. Controllers that
/// every kubelet enables (pids, memory, cpu) come before the named systemd hierarchy.
const HIERARCHIES: [&str; 5] = ["", "pids", "memory", "cpu,cpuacct", "systemd"];

/// Every pod cgroup, sorted by UID; `None` when there is no kubepods hierarchy at all (not a
/// Kubernetes node).
pub fn list(host: &HostPaths) -> Option<Vec<PodCgroup>> {
    HIERARCHIES.iter().find_map(|h| list_in(host, h))
}

fn list_in(host: &HostPaths, hierarchy: &str) -> Option<Vec<PodCgroup>> {
    let mut out = Vec::new();
    let mut saw_root = false;
    for root in ["kubepods.slice", "kubepods"] {
        let dir = if hierarchy.is_empty() {
            root.to_string()
        } else {
            format!("{hierarchy}/{root}")
        };
        let Ok(entries) = std::fs::read_dir(host.cgroup(&dir)) else {
            continue;
        };
        saw_root = true;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(uid) = pod_uid(&name) {
                out.push(PodCgroup {
                    uid,
                    qos: "guaranteed",
                    dir: entry.path(),
                });
            } else if let Some(qos) = qos_of(&name) {
                let Ok(children) = std::fs::read_dir(entry.path()) else {
                    continue;
                };
                for child in children.flatten() {
                    if let Some(uid) = pod_uid(&child.file_name().to_string_lossy()) {
                        out.push(PodCgroup {
                            uid,
                            qos,
                            dir: child.path(),
                        });
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.uid.cmp(&b.uid));
    saw_root.then_some(out)
}

/// `kubepods-burstable.slice` or `burstable` -> "burstable".
fn qos_of(dir: &str) -> Option<&'static str> {
    let base = dir.strip_suffix(".slice").unwrap_or(dir);
    let base = base.strip_prefix("kubepods-").unwrap_or(base);
    QOS_CLASSES.into_iter().find(|q| *q == base)
}

/// `kubepods-burstable-pod1234_abcd.slice` or `pod1234-abcd` -> the pod UID with dashes.
pub fn pod_uid(dir: &str) -> Option<String> {
    let base = dir.strip_suffix(".slice").unwrap_or(dir);
    let idx = base.rfind("pod")?;
    // "pod" must start the name or follow a dash (systemd naming), so "mypodcast" is not a pod.
    if idx != 0 && !base[..idx].ends_with('-') {
        return None;
    }
    let uid = base[idx + 3..].replace('_', "-");
    let looks_like_uid = uid.len() >= 8 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    looks_like_uid.then_some(uid)
}

/// PIDs in the pod's cgroup and its container sub-cgroups (the sandbox's pause process first
/// in kubelet layouts; a member may still sit in a namespace of its own: [`classify_netns`]).
pub fn pids(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    out
}

/// The pod's network namespace as `<proc>/<pid>/ns/net`, with its identity (the link target,
/// `net:[inode]`). `None` when no live process is found, when its processes are in several
/// namespaces, or when the namespace is the host's
/// (hostNetwork pods): callers must never treat the host namespace as a pod's. "The host's" is
/// PID 1's namespace and also our own (the agent runs with hostNetwork), so an unreadable PID 1
/// cannot make the host's namespace look like a pod's.
pub fn netns(host: &HostPaths, cg: &PodCgroup) -> Option<(PathBuf, String)> {
    match classify_netns(host, &pids(&cg.dir)) {
        PodNetns::Own { path, id } => Some((path, id)),
        // Several: no one namespace is the pod's to tune (decision #18-m).
        PodNetns::Host { .. } | PodNetns::Several { .. } | PodNetns::NoProcess => None,
    }
}

/// Where a pod's processes live, network-wise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetns {
    /// A namespace of its own: `<proc>/PID/ns/net` and its identity `net:[inode]`.
    Own { path: PathBuf, id: String },
    /// The host's namespace (hostNetwork).
    Host { id: String },
    /// Processes in more than one namespace (a sandboxed helper's `unshare -n`, bubblewrap):
    /// every distinct namespace of its own, in the order first seen (decision #18-m), and
    /// `host` when some process is in the host's namespace too.
    Several {
        own: Vec<(PathBuf, String)>,
        host: Option<String>,
    },
    /// No live process whose namespace could be read, or the host's namespace is unknown.
    NoProcess,
}

/// Classifies the namespaces of every readable one of `pids` (one `readlink` each: a pod's
/// PIDs are few). Not "the first PID": a process may sit in a private namespace of its own,
/// listed before the pod's (decision #18-m), so each distinct namespace is reported once.
pub fn classify_netns(host: &HostPaths, pids: &[u32]) -> PodNetns {
    let host_ns: Vec<PathBuf> = [host.proc("1/ns/net"), PathBuf::from("/proc/self/ns/net")]
        .iter()
        .filter_map(|p| std::fs::read_link(p).ok())
        .collect();
    if host_ns.is_empty() {
        // Without knowing the host's namespace no pod namespace can be told apart from it.
        return PodNetns::NoProcess;
    }
    let mut own: Vec<(PathBuf, String)> = Vec::new();
    let mut in_host = None;
    for pid in pids {
        let path = host.proc(&format!("{pid}/ns/net"));
        let Ok(id) = std::fs::read_link(&path) else {
            continue;
        };
        let name = id.to_string_lossy().into_owned();
        if host_ns.contains(&id) {
            in_host.get_or_insert(name);
        } else if !own.iter().any(|(_, n)| *n == name) {
            own.push((path, name));
        }
    }
    match (own.len(), in_host) {
        (0, None) => PodNetns::NoProcess,
        (0, Some(id)) => PodNetns::Host { id },
        (1, None) => {
            let (path, id) = own.remove(0);
            PodNetns::Own { path, id }
        }
        (_, host) => PodNetns::Several { own, host },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_from_both_drivers() {
        assert_eq!(
            pod_uid("kubepods-burstable-pod6b8f0f6c_1f2e_4a5b_9c8d_0e1f2a3b4c5d.slice").as_deref(),
            Some("6b8f0f6c-1f2e-4a5b-9c8d-0e1f2a3b4c5d")
        );
        assert_eq!(
            pod_uid("pod6b8f0f6c-1f2e-4a5b-9c8d-0e1f2a3b4c5d").as_deref(),
            Some("6b8f0f6c-1f2e-4a5b-9c8d-0e1f2a3b4c5d")
        );
        assert_eq!(pod_uid("kubepods-burstable.slice"), None);
        assert_eq!(pod_uid("mypodcast"), None);
        assert_eq!(pod_uid("pod"), None);
        assert_eq!(qos_of("kubepods-besteffort.slice"), Some("besteffort"));
        assert_eq!(qos_of("burstable"), Some("burstable"));
        assert_eq!(qos_of("system.slice"), None);
    }

    #[test]
    fn cgroup_v1_trees_are_found_under_a_controller() {
        let root = tempfile::tempdir().unwrap();
        let host = HostPaths {
            cgroup: root.path().to_path_buf(),
            ..HostPaths::default()
        };
        assert_eq!(list(&host), None);
        let uid = "6b8f0f6c-1f2e-4a5b-9c8d-0e1f2a3b4c5d";
        for ctrl in ["pids", "memory"] {
            std::fs::create_dir_all(
                root.path()
                    .join(format!("{ctrl}/kubepods/burstable/pod{uid}")),
            )
            .unwrap();
        }
        let pods = list(&host).unwrap();
        assert_eq!(
            pods.len(),
            1,
            "one controller's tree, not one per controller"
        );
        assert_eq!(pods[0].uid, uid);
        assert_eq!(pods[0].qos, "burstable");
        assert!(pods[0].dir.starts_with(root.path().join("pids")));
    }

    #[test]
    fn host_namespace_processes_are_classified_as_host() {
        let me = std::process::id();
        let host = HostPaths::default();
        assert!(matches!(
            classify_netns(&host, &[me]),
            PodNetns::Host { .. }
        ));
        assert_eq!(classify_netns(&host, &[]), PodNetns::NoProcess);
        assert_eq!(classify_netns(&host, &[u32::MAX]), PodNetns::NoProcess);
    }

    #[test]
    fn every_namespace_of_the_pods_processes_is_reported_once_not_the_first_pids() {
        let root = tempfile::tempdir().unwrap();
        let host = HostPaths {
            proc: root.path().to_path_buf(),
            ..HostPaths::default()
        };
        let link = |pid: u32, target: &str| {
            let dir = root.path().join(format!("{pid}/ns"));
            std::fs::create_dir_all(&dir).unwrap();
            std::os::unix::fs::symlink(target, dir.join("net")).unwrap();
        };
        link(1, "net:[1]");
        link(10, "net:[20]"); // a sandboxed helper, listed first
        link(11, "net:[30]"); // the pod's pause process
        link(12, "net:[30]");
        link(13, "net:[1]"); // a process in the host's namespace
        let own = |pid: u32, id: &str| (root.path().join(format!("{pid}/ns/net")), id.to_string());
        assert_eq!(
            classify_netns(&host, &[11, 12]),
            PodNetns::Own {
                path: own(11, "net:[30]").0,
                id: "net:[30]".into()
            }
        );
        assert_eq!(
            classify_netns(&host, &[10, 11, 12, u32::MAX]),
            PodNetns::Several {
                own: vec![own(10, "net:[20]"), own(11, "net:[30]")],
                host: None
            }
        );
        assert_eq!(
            classify_netns(&host, &[13, 11]),
            PodNetns::Several {
                own: vec![own(11, "net:[30]")],
                host: Some("net:[1]".into())
            }
        );
        assert_eq!(
            classify_netns(&host, &[13]),
            PodNetns::Host {
                id: "net:[1]".into()
            }
        );
    }

    #[test]
    fn pids_are_gathered_from_container_subcgroups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cri-containerd-abc.scope")).unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        std::fs::write(
            dir.path().join("cri-containerd-abc.scope/cgroup.procs"),
            "42\n43\n",
        )
        .unwrap();
        assert_eq!(pids(dir.path()), vec![42, 43]);
    }
}
