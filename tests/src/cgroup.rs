//! Fake kubelet cgroup trees for `--host-cgroup`: pod directories with the files the agent
//! reads (cpu.stat, memory.current, memory.stat), and `KubeletTree`, pods whose container
//! cgroups list the PIDs of real processes (cgroup v2 and v1 layouts, both drivers).

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

/// Where the kubelet puts pod cgroups: the cgroup driver (systemd slices or cgroupfs
/// directories) and, on cgroup v1, the controller hierarchy the agent reads PIDs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// v2, systemd driver: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<u_i_d>.slice`.
    SystemdV2,
    /// v2, cgroupfs driver: `kubepods/burstable/pod<uid>`.
    CgroupfsV2,
    /// v1, cgroupfs driver, pids controller: `pids/kubepods/burstable/pod<uid>`.
    CgroupfsV1Pids,
    /// v1, systemd driver, memory controller: `memory/kubepods.slice/.../kubepods-burstable-pod<u_i_d>.slice`.
    SystemdV1Memory,
}

impl Layout {
    pub const ALL: [Layout; 4] = [
        Layout::SystemdV2,
        Layout::CgroupfsV2,
        Layout::CgroupfsV1Pids,
        Layout::SystemdV1Memory,
    ];

    /// The pod's directory relative to the cgroup root; `qos` is "guaranteed", "burstable" or
    /// "besteffort" (guaranteed pods sit directly under kubepods).
    pub fn pod_path(self, qos: &str, uid: &str) -> std::path::PathBuf {
        let systemd = |prefix: &str| {
            let u = uid.replace('-', "_");
            if qos == "guaranteed" {
                format!("{prefix}kubepods.slice/kubepods-pod{u}.slice")
            } else {
                format!("{prefix}kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice")
            }
        };
        let cgroupfs = |prefix: &str| {
            if qos == "guaranteed" {
                format!("{prefix}kubepods/pod{uid}")
            } else {
                format!("{prefix}kubepods/{qos}/pod{uid}")
            }
        };
        std::path::PathBuf::from(match self {
            Layout::SystemdV2 => systemd(""),
            Layout::CgroupfsV2 => cgroupfs(""),
            Layout::CgroupfsV1Pids => cgroupfs("pids/"),
            Layout::SystemdV1Memory => systemd("memory/"),
        })
    }

    /// A container's sub-cgroup inside the pod directory, as the runtime names it.
    fn container_dir(self, n: usize) -> String {
        match self {
            Layout::SystemdV2 | Layout::SystemdV1Memory => {
                format!("cri-containerd-{n:064x}.scope")
            }
            Layout::CgroupfsV2 | Layout::CgroupfsV1Pids => format!("{n:064x}"),
        }
    }
}

/// A fake kubelet cgroup tree (for `hostPaths.cgroup` / `--host-cgroup`) mapping pod UIDs to the
/// PIDs of real processes, one container sub-cgroup per PID list, so the agent finds each pod's
/// network namespace through `/proc/PID/ns/net`.
pub struct KubeletTree {
    pub dir: tempfile::TempDir,
    pub layout: Layout,
    containers: std::cell::Cell<usize>,
}

impl KubeletTree {
    pub fn new(layout: Layout) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            layout,
            containers: std::cell::Cell::new(0),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Adds (or extends) pod `uid` with a container holding `pids`; the pod-level cgroup.procs
    /// stays empty, as the kubelet leaves it. On v2 the pod also gets the resource files the
    /// resource collector reads. Returns the pod directory.
    pub fn add_pod(&self, qos: &str, uid: &str, pids: &[u32]) -> std::path::PathBuf {
        let pod = self.root().join(self.layout.pod_path(qos, uid));
        if matches!(self.layout, Layout::SystemdV2 | Layout::CgroupfsV2) {
            pod_dir(&pod, "usage_usec 1000\n", 4096, "inactive_file 0\n");
        }
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::write(pod.join("cgroup.procs"), "").unwrap();
        let n = self.containers.get();
        self.containers.set(n + 1);
        let container = pod.join(self.layout.container_dir(n + 1));
        std::fs::create_dir_all(&container).unwrap();
        let procs: String = pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(container.join("cgroup.procs"), procs).unwrap();
        pod
    }
}
