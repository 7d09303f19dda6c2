//! Per-pod CPU and memory from the kubelet's cgroup v2 hierarchy (found by `pod_cgroups`).
//!
//! A pod whose cgroup vanishes between listing and reading (it was just deleted) is skipped,
//! not reported as an error. Reads only.

use std::path::Path;

use super::CollectError;
use crate::host::HostPaths;
use crate::pb;
use crate::pod_cgroups;

/// Every pod cgroup found, sorted by UID.
pub fn pods(host: &HostPaths) -> Result<Vec<pb::PodResources>, CollectError> {
    let Some(cgroups) = pod_cgroups::list(host) else {
        // Not a Kubernetes node (or cgroup v1 only): there are no pods to report.
        return Err(CollectError::Unavailable {
            part: "pods",
            why: format!("no kubepods cgroup under {}", host.cgroup.display()),
        });
    };
    let mut out = Vec::with_capacity(cgroups.len());
    for cg in cgroups {
        push_pod(&mut out, &cg.dir, cg.uid, cg.qos);
    }
    Ok(out)
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
