//! Per-pod CPU and memory from the kubelet's cgroup v2 hierarchy.
//!
//! Handles both kubelet cgroup drivers:
//! - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice`
//! - cgroupfs: `kubepods/burstable/pod<uid>`
//!
//! Guaranteed pods sit directly under the root. Reads only; a pod whose cgroup vanishes between
//! listing and reading (it was just deleted) is skipped, not reported as an error.

use std::path::Path;

use super::CollectError;
use crate::host::HostPaths;
use crate::pb;

const QOS_CLASSES: [&str; 2] = ["burstable", "besteffort"];

/// Every pod cgroup found, sorted by UID.
pub fn pods(host: &HostPaths) -> Result<Vec<pb::PodResources>, CollectError> {
    let mut out = Vec::new();
    let mut saw_root = false;
    for root in ["kubepods.slice", "kubepods"] {
        let root = host.cgroup(root);
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        saw_root = true;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(uid) = pod_uid(&name) {
                push_pod(&mut out, &entry.path(), uid, "guaranteed");
            } else if let Some(qos) = qos_of(&name) {
                let Ok(children) = std::fs::read_dir(entry.path()) else {
                    continue;
                };
                for child in children.flatten() {
                    if let Some(uid) = pod_uid(&child.file_name().to_string_lossy()) {
                        push_pod(&mut out, &child.path(), uid, qos);
                    }
                }
            }
        }
    }
    if !saw_root {
        // Not a Kubernetes node (or cgroup v1 only): there are no pods to report.
        return Err(CollectError::Unavailable {
            part: "pods",
            why: format!("no kubepods cgroup under {}", host.cgroup.display()),
        });
    }
    out.sort_by(|a, b| a.uid.cmp(&b.uid));
    Ok(out)
}

/// `kubepods-burstable.slice` or `burstable` -> "burstable".
fn qos_of(dir: &str) -> Option<&'static str> {
    let base = dir.strip_suffix(".slice").unwrap_or(dir);
    let base = base.strip_prefix("kubepods-").unwrap_or(base);
    QOS_CLASSES.into_iter().find(|q| *q == base)
}

/// `kubepods-burstable-pod1234_abcd.slice` or `pod1234-abcd` -> the pod UID with dashes.
fn pod_uid(dir: &str) -> Option<String> {
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

fn push_pod(out: &mut Vec<pb::PodResources>, dir: &Path, uid: String, qos: &str) {
    let Some(cpu) = read_flat_keyed(&dir.join("cpu.stat")) else {
        return;
    };
    let usage = read_u64(&dir.join("memory.current"));
    let inactive_file = read_flat_keyed(&dir.join("memory.stat"))
        .and_then(|m| m.get("inactive_file").copied())
        .unwrap_or(0);
    let micros = |k: &str| cpu.get(k).copied().unwrap_or(0) as f64 / 1e6;
    let usage = usage.unwrap_or(0);
    out.push(pb::PodResources {
        uid,
        namespace: String::new(),
        name: String::new(),
        qos_class: qos.to_string(),
        cpu_usage_seconds: micros("usage_usec"),
        cpu_user_seconds: micros("user_usec"),
        cpu_system_seconds: micros("system_usec"),
        cpu_periods: cpu.get("nr_periods").copied().unwrap_or(0),
        cpu_throttled_periods: cpu.get("nr_throttled").copied().unwrap_or(0),
        cpu_throttled_seconds: micros("throttled_usec"),
        memory_working_set_bytes: usage.saturating_sub(inactive_file),
        memory_usage_bytes: usage,
    });
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// cgroup v2 "flat keyed" files: `key value` per line.
fn read_flat_keyed(path: &Path) -> Option<std::collections::HashMap<String, u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect(),
    )
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
}
