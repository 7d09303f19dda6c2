//! Validation of resolved sysctls before any write: the key exists, policy allows it, and the
//! value has the key's shape (and range, for keys whose limits we know).
//!
//! Reads `/proc/sys` (to learn each key's shape from its current value); never writes.

use super::profile::Desired;

/// Keys refused unless named in `sysctl.allowDangerous`: they crash or reboot the node on an
/// event (panic*, warn_limit, oops_limit), open a root shell path (core_pattern, modprobe,
/// usermodehelper), pin memory (hugepages), cannot be undone until reboot
/// (unprivileged_bpf_disabled = 1, modules_disabled) or are one-shot actions rather than
/// settings (drop_caches). docs/sysctl.md gives the reason for each.
pub const DEFAULT_DENYLIST: &[&str] = &[
    "kernel.panic*",
    "kernel.*_panic",
    "kernel.warn_limit",
    "kernel.oops_limit",
    "kernel.usermodehelper.*",
    "kernel.unprivileged_bpf_disabled",
    "kernel.sysrq",
    "kernel.core_pattern",
    "kernel.modprobe",
    "kernel.modules_disabled",
    "kernel.kexec_load_disabled",
    "kernel.poweroff_cmd",
    "kernel.hotplug",
    "vm.nr_hugepages*",
    "vm.nr_overcommit_hugepages",
    "vm.panic_on_oom",
    "vm.drop_caches",
    "vm.compact_memory",
    "fs.binfmt_misc.*",
];

/// (key, refused when the value satisfies this, why).
pub type DeniedValue = (&'static str, fn(i64) -> bool, &'static str);

/// Values refused unless the key is named in `sysctl.allowDangerous`: (key, refused when, why).
/// The key itself stays settable to its safe values.
pub const DENIED_VALUES: &[DeniedValue] = &[
    (
        "kernel.randomize_va_space",
        |v| v < 2,
        "below 2 turns address-space randomisation down for every process",
    ),
    (
        "fs.suid_dumpable",
        |v| v != 0,
        "lets setuid programs dump core, leaking their secrets to a file",
    ),
    (
        "kernel.perf_event_paranoid",
        |v| v < 2,
        "below 2 lets every user profile the kernel (1), CPU-wide events (0) or everything (-1)",
    ),
    (
        "kernel.yama.ptrace_scope",
        |v| v == 3,
        "3 cannot be undone until reboot",
    ),
    (
        "vm.mmap_min_addr",
        |v| v < 4096,
        "below 4096 lets a process map page zero, so kernel NULL-pointer bugs become exploitable",
    ),
    (
        "fs.protected_hardlinks",
        |v| v == 0,
        "0 reopens hard-link races on world-writable directories",
    ),
    (
        "fs.protected_symlinks",
        |v| v == 0,
        "0 reopens symlink races on world-writable sticky directories",
    ),
    (
        "vm.unprivileged_userfaultfd",
        |v| v != 0,
        "lets every user use userfaultfd, a standard kernel-exploit primitive",
    ),
    (
        "kernel.dmesg_restrict",
        |v| v == 0,
        "0 lets every user read the kernel log (kernel addresses, other tenants' messages)",
    ),
    (
        "kernel.sched_rt_runtime_us",
        |v| v == -1,
        "-1 lets real-time tasks take every CPU cycle and starve the node's own daemons",
    ),
];

/// Ranges for keys whose limits are known; others are checked for shape only. Vector keys check
/// every element against the range.
const KNOWN_RANGES: &[(&str, i64, i64)] = &[
    ("net.core.somaxconn", 1, i32::MAX as i64),
    ("net.core.netdev_max_backlog", 1, i32::MAX as i64),
    ("net.ipv4.tcp_max_syn_backlog", 1, i32::MAX as i64),
    ("net.ipv4.tcp_tw_reuse", 0, 2),
    ("net.ipv4.tcp_fin_timeout", 1, 3600),
    ("net.ipv4.ip_forward", 0, 1),
    ("net.ipv4.ip_local_port_range", 1, 65535),
    ("net.ipv4.tcp_keepalive_time", 1, 32767),
    ("net.ipv4.tcp_keepalive_intvl", 1, 32767),
    ("net.ipv4.tcp_keepalive_probes", 1, 127),
    ("net.netfilter.nf_conntrack_max", 1, i32::MAX as i64),
    // Linux >= 6.1: 0 (share the node's hash) or a per-namespace hash size, at most 16M.
    ("net.ipv4.tcp_child_ehash_entries", 0, 16_777_216),
    ("fs.file-max", 1, i64::MAX),
    ("fs.nr_open", 1, i32::MAX as i64),
    ("fs.inotify.max_user_watches", 1, i32::MAX as i64),
    ("fs.inotify.max_user_instances", 1, i32::MAX as i64),
    ("vm.swappiness", 0, 200),
    ("vm.max_map_count", 1, i32::MAX as i64),
    ("vm.overcommit_memory", 0, 2),
];

/// Matches `pattern` with `*` wildcards (any run of characters) against a dotted key.
pub fn glob_match(pattern: &str, key: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == key;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !key.starts_with(first) || key.len() < first.len() + last.len() || !key.ends_with(last) {
        return false;
    }
    let mut rest = &key[first.len()..key.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Policy: denylist (built-in plus configured, minus allowDangerous) and optional allowlist.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub deny: Vec<String>,
    pub allow_dangerous: Vec<String>,
    /// Empty: every key not denied is allowed.
    pub allow: Vec<String>,
}

impl Policy {
    /// The key is named in `allowDangerous`: built-in denials and use checks do not apply.
    pub fn lifted(&self, key: &str) -> bool {
        self.allow_dangerous.iter().any(|p| glob_match(p, key))
    }

    /// Why `value` is refused for `key` (a weakening or one-way value), or None.
    pub fn value_refusal(&self, key: &str, value: &str) -> Option<String> {
        let (_, refused, why) = DENIED_VALUES.iter().find(|(k, _, _)| *k == key)?;
        let v = value.trim().parse::<i64>().ok()?;
        (refused(v) && !self.lifted(key)).then(|| {
            format!("{v} is refused by the built-in denylist: {why}; list the key in sysctl.allowDangerous to permit it")
        })
    }

    /// Why `key` is refused, or None.
    pub fn refusal(&self, key: &str) -> Option<String> {
        let lifted = |k: &str| self.allow_dangerous.iter().any(|p| glob_match(p, k));
        if let Some(p) = DEFAULT_DENYLIST.iter().find(|p| glob_match(p, key))
            && !lifted(key)
        {
            return Some(format!(
                "is denied by the built-in denylist ({p}); list it in sysctl.allowDangerous to permit it"
            ));
        }
        if let Some(p) = self.deny.iter().find(|p| glob_match(p, key)) {
            return Some(format!("is denied by sysctl.deny ({p})"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|p| glob_match(p, key)) {
            return Some("is not in sysctl.allow".to_string());
        }
        None
    }
}

/// The value's problem given the key's current value (which tells its shape), or None.
pub fn value_problem(key: &str, current: &str, desired: &str) -> Option<String> {
    let cur: Vec<&str> = current.split_whitespace().collect();
    let want: Vec<&str> = desired.split_whitespace().collect();
    let numeric = !cur.is_empty() && cur.iter().all(|t| t.parse::<i64>().is_ok());
    if numeric {
        if want.len() != cur.len() {
            return Some(format!(
                "needs {} integer{} (like the current {current:?}), got {} value{}",
                cur.len(),
                if cur.len() == 1 { "" } else { "s" },
                want.len(),
                if want.len() == 1 { "" } else { "s" }
            ));
        }
        let mut ints = Vec::with_capacity(want.len());
        for t in &want {
            match t.parse::<i64>() {
                Ok(i) => ints.push(i),
                Err(_) => return Some(format!("{t:?} is not an integer")),
            }
        }
        if let Some((_, lo, hi)) = KNOWN_RANGES.iter().find(|(k, _, _)| *k == key)
            && let Some(bad) = ints.iter().find(|i| **i < *lo || **i > *hi)
        {
            return Some(format!("{bad} is out of range ({lo}..={hi})"));
        }
        if key == "net.ipv4.ip_local_port_range" && ints[0] >= ints[1] {
            return Some(format!(
                "low port {} must be below high port {}",
                ints[0], ints[1]
            ));
        }
    } else if want.is_empty() && !cur.is_empty() {
        return Some("is empty".to_string());
    }
    None
}

/// One reason a profile set cannot be applied, naming profile, key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub profile: String,
    pub key: String,
    pub value: String,
    pub problem: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "profile {:?}: {} = {:?}: {}",
            self.profile, self.key, self.value, self.problem
        )
    }
}

/// The problem of a key whose file does not exist.
pub const NO_SUCH_KEY: &str = "no such key on this kernel";

/// Checks every desired key; `read` returns the key's current value (None: no such key).
pub fn check(
    desired: &[Desired],
    policy: &Policy,
    read: impl Fn(&Desired) -> Option<String>,
) -> Vec<Rejection> {
    let mut out = Vec::new();
    for d in desired {
        let reject = |problem: String| Rejection {
            profile: d.profile.clone(),
            key: d.key.clone(),
            value: d.value.clone(),
            problem,
        };
        if d.path.split('/').any(|c| c == ".." || c.is_empty()) {
            out.push(reject("is not a valid key".into()));
            continue;
        }
        if let Some(why) = policy
            .refusal(&d.key)
            .or_else(|| policy.value_refusal(&d.key, &d.value))
        {
            out.push(reject(why));
            continue;
        }
        let Some(current) = read(d) else {
            out.push(reject(NO_SUCH_KEY.into()));
            continue;
        };
        if let Some(problem) = value_problem(&d.key, &current, &d.value) {
            out.push(reject(problem));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("kernel.panic*", "kernel.panic_on_oops"));
        assert!(glob_match("kernel.*_panic", "kernel.softlockup_panic"));
        assert!(glob_match("net.*", "net.core.somaxconn"));
        assert!(!glob_match("kernel.panic*", "kernel.pid_max"));
        assert!(glob_match("vm.swappiness", "vm.swappiness"));
        assert!(!glob_match("a*b*c", "acb"));
    }

    #[test]
    fn policy_denies_dangerous_unless_lifted_and_honours_allowlist() {
        let p = Policy::default();
        assert!(
            p.refusal("kernel.panic")
                .unwrap()
                .contains("built-in denylist")
        );
        assert!(p.refusal("kernel.sysrq").is_some());
        assert!(p.refusal("net.core.somaxconn").is_none());
        let lifted = Policy {
            allow_dangerous: vec!["vm.nr_hugepages".into()],
            ..Default::default()
        };
        assert!(lifted.refusal("vm.nr_hugepages").is_none());
        let allow = Policy {
            allow: vec!["net.*".into()],
            ..Default::default()
        };
        assert!(
            allow
                .refusal("vm.swappiness")
                .unwrap()
                .contains("sysctl.allow")
        );
        assert!(allow.refusal("net.core.somaxconn").is_none());
        let deny = Policy {
            deny: vec!["net.ipv4.ip_forward".into()],
            ..Default::default()
        };
        assert!(
            deny.refusal("net.ipv4.ip_forward")
                .unwrap()
                .contains("sysctl.deny")
        );
    }

    #[test]
    fn node_killing_weakening_and_one_way_settings_are_denied_unless_lifted() {
        let p = Policy::default();
        for key in [
            "kernel.warn_limit",
            "kernel.oops_limit",
            "kernel.usermodehelper.bset",
            "kernel.unprivileged_bpf_disabled",
        ] {
            assert!(p.refusal(key).is_some(), "{key}");
        }
        for (key, bad, good) in [
            ("kernel.randomize_va_space", "0", "2"),
            ("fs.suid_dumpable", "2", "0"),
            ("kernel.perf_event_paranoid", "-1", "2"),
            ("kernel.yama.ptrace_scope", "3", "1"),
            ("vm.mmap_min_addr", "0", "4096"),
            ("vm.mmap_min_addr", "4095", "65536"),
            ("fs.protected_hardlinks", "0", "1"),
            ("fs.protected_symlinks", "0", "1"),
            ("vm.unprivileged_userfaultfd", "1", "0"),
            ("kernel.dmesg_restrict", "0", "1"),
            ("kernel.sched_rt_runtime_us", "-1", "950000"),
        ] {
            assert!(
                p.value_refusal(key, bad)
                    .unwrap()
                    .contains("built-in denylist"),
                "{key}"
            );
            assert!(p.value_refusal(key, good).is_none(), "{key}={good}");
        }
        let lifted = Policy {
            allow_dangerous: vec!["kernel.randomize_va_space".into()],
            ..Default::default()
        };
        assert!(
            lifted
                .value_refusal("kernel.randomize_va_space", "0")
                .is_none()
        );
    }

    #[test]
    fn value_shapes_and_ranges() {
        assert_eq!(
            value_problem("net.core.somaxconn", "4096", "abc").unwrap(),
            "\"abc\" is not an integer"
        );
        assert!(value_problem("net.core.somaxconn", "4096", "8192").is_none());
        assert!(
            value_problem("net.core.somaxconn", "4096", "0")
                .unwrap()
                .contains("out of range")
        );
        assert!(
            value_problem("net.ipv4.ip_local_port_range", "32768\t60999", "1024 65535").is_none()
        );
        assert!(
            value_problem("net.ipv4.ip_local_port_range", "32768\t60999", "60000 1024")
                .unwrap()
                .contains("below")
        );
        assert!(
            value_problem("net.ipv4.ip_local_port_range", "32768\t60999", "1024")
                .unwrap()
                .contains("needs 2 integers")
        );
        assert!(
            value_problem("net.ipv4.ip_local_port_range", "32768\t60999", "0 100")
                .unwrap()
                .contains("out of range")
        );
        assert!(
            value_problem(
                "net.ipv4.tcp_rmem",
                "4096 131072 6291456",
                "4096 262144 16777216"
            )
            .is_none()
        );
        assert!(value_problem("net.ipv4.tcp_child_ehash_entries", "0", "4096").is_none());
        assert!(
            value_problem("net.ipv4.tcp_child_ehash_entries", "0", "16777217")
                .unwrap()
                .contains("out of range")
        );
        assert!(value_problem("net.ipv4.tcp_congestion_control", "cubic", "bbr").is_none());
        assert!(value_problem("net.ipv4.tcp_congestion_control", "cubic", "").is_some());
    }
}
