//! A real memory cgroup for one test: the agent runs inside it with the DaemonSet's limit, so a
//! flood that would exceed the limit gets it OOM-killed and the test sees it (`oom_kills`).
//!
//! cgroup v2 (a `memory` controller in `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`): a child
//! of the mount's root with `memory.max`; its `memory.events` `oom_kill` and `memory.peak`.
//! cgroup v1 (a `memory` hierarchy): a child of this process's own memory cgroup with
//! `memory.limit_in_bytes`; `memory.oom_control` `oom_kill` and `memory.max_usage_in_bytes`.
//! The group is removed on drop (after the processes in it ended); the host's own groups and
//! limits are never changed.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The DaemonSet's memory limit (manifests/base/daemonset.yaml).
pub const DAEMONSET_MEMORY_LIMIT: u64 = 256 << 20;

#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// A new group named `nodekeeper-test-<name>-<pid>` limited to `limit` bytes, or why not.
    pub fn create(name: &str, limit: u64) -> Result<Self, String> {
        let leaf = format!("nodekeeper-test-{name}-{}", std::process::id());
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let root = Path::new(root);
            let controllers = std::fs::read_to_string(root.join("cgroup.controllers"));
            if !controllers.is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) {
                continue;
            }
            // Children get the memory controller only when the root hands it down.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
            let dir = root.join(&leaf);
            std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            let group = Self { dir, v2: true };
            group.write("memory.max", &limit.to_string())?;
            // No swap: the limit is the limit, as on a node without swap.
            let _ = group.write("memory.swap.max", "0");
            return Ok(group);
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if !v1.join("memory.limit_in_bytes").exists() {
            return Err("no cgroup v2 memory controller and no cgroup v1 memory hierarchy".into());
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
                ctrls
                    .split(',')
                    .any(|c| c == "memory")
                    .then(|| path.trim_start_matches('/').to_string())
            })
            .unwrap_or_default();
        let dir = v1.join(own).join(&leaf);
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let group = Self { dir, v2: false };
        group.write("memory.limit_in_bytes", &limit.to_string())?;
        let _ = group.write("memory.memsw.limit_in_bytes", &limit.to_string());
        Ok(group)
    }

    /// `create`, or the skip/fail rule of `require_tool` when the machine cannot make one.
    pub fn require(name: &str, limit: u64) -> Option<Self> {
        match Self::create(name, limit) {
            Ok(g) => Some(g),
            Err(why) => {
                if std::env::var("NODEKEEPER_REQUIRE_TOOLS").as_deref() == Ok("1") {
                    panic!("a memory cgroup is needed (NODEKEEPER_REQUIRE_TOOLS=1): {why}");
                }
                eprintln!("SKIP: no memory cgroup for this test: {why}");
                None
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writing a PID here moves that process into the group.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// PIDs in the group now.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Processes the kernel OOM-killed in this group.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", self.dir.display()));
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no oom_kill line in {file}:\n{text}"))
    }

    /// The most memory charged to the group so far, in bytes.
    pub fn peak_bytes(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        let text = std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", self.dir.display()));
        text.trim().parse().expect("a byte count")
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.dir.join(file), value)
            .map_err(|e| format!("{}/{file} = {value}: {e}", self.dir.display()))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The processes in it are the test's own (the agent, killed when its Proc dropped);
        // a group can only be removed once empty.
        for pid in self.pids() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove the test cgroup {}", self.dir.display());
    }
}
