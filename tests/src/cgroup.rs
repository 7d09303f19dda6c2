//! Fake kubelet cgroup v2 trees for `--host-cgroup`: pod directories with the files the agent
//! reads (cpu.stat, memory.current, memory.stat).

use std::path::Path;

/// A pod's cgroup directory with the given file contents.
pub fn pod_dir(dir: &Path, cpu_stat: &str, memory_current: u64, memory_stat: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cpu.stat"), cpu_stat).unwrap();
    std::fs::write(dir.join("memory.current"), format!("{memory_current}\n")).unwrap();
    std::fs::write(dir.join("memory.stat"), memory_stat).unwrap();
}

/// UID of the one pod in `sample_tree`.
pub const SAMPLE_POD_UID: &str = "6b8f0f6c-1f2e-4a5b-9c8d-0e1f2a3b4c5d";

/// A tree (systemd driver) with one burstable pod: 1.5 s CPU, 2 of 10 periods throttled for
/// 0.3 s, 100 MiB charged of which 4857600 bytes inactive file (working set 100000000).
pub fn sample_tree(root: &Path) {
    let dir = root.join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        SAMPLE_POD_UID.replace('-', "_")
    ));
    pod_dir(
        &dir,
        "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 10\nnr_throttled 2\nthrottled_usec 300000\n",
        104_857_600,
        "anon 90000000\nfile 14857600\nactive_file 10000000\ninactive_file 4857600\nshmem 0\n",
    );
}
