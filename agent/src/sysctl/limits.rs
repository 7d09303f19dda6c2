//! Range checks relative to what the node uses right now, for limits that kill a node when set
//! below its current use (forks, file opens, mmaps start failing everywhere) or that take memory
//! away from it (`min_free_kbytes`, strict overcommit). Each is lifted by naming the key in
//! `sysctl.allowDangerous`.
//!
//! Reads procfs (`loadavg`, `meminfo`, `sys/fs/file-nr`, `PID/maps`, `PID/status`); never writes. A check that
//! cannot read the use it needs refuses the value rather than guess.

use super::apply::SysctlFs;
use super::profile::Desired;
use super::validate::{Policy, Rejection};

/// A lowered limit must stay at least this many times the current use: headroom for the
/// growth of the next minutes (a deploy, a burst of connections) on top of what runs now.
pub const USE_HEADROOM: i64 = 2;
/// `vm.min_free_kbytes` above this share of RAM (percent) is refused: the kernel's own default
/// is well under 1 %; reserving more starves the workloads and can OOM the node at once.
pub const MIN_FREE_MAX_PERCENT: i64 = 5;

/// What the node uses now, read lazily (a `maps` scan is only done when needed).
struct Use<'a> {
    fs: &'a SysctlFs,
}

impl Use<'_> {
    fn file(&self, name: &str) -> Result<String, String> {
        let path = self.fs.proc_file(name);
        std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read current use from {}: {e}", path.display()))
    }

    /// Tasks (threads) alive: the total in `/proc/loadavg`'s `running/total` field.
    fn tasks(&self) -> Result<i64, String> {
        let text = self.file("loadavg")?;
        text.split_whitespace()
            .nth(3)
            .and_then(|f| f.split_once('/'))
            .and_then(|(_, total)| total.parse().ok())
            .ok_or_else(|| format!("unexpected loadavg {text:?}"))
    }

    /// File handles allocated now (first field of `fs/file-nr`).
    fn open_files(&self) -> Result<i64, String> {
        let text = self.file("sys/fs/file-nr")?;
        text.split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("unexpected fs/file-nr {text:?}"))
    }

    /// A `/proc/meminfo` field, in kB.
    fn meminfo(&self, field: &str) -> Result<i64, String> {
        let text = self.file("meminfo")?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no {field} in meminfo"))
    }

    /// The most memory maps any process has now (lines of `/proc/PID/maps`).
    fn largest_map_count(&self) -> Result<i64, String> {
        let dir = self.fs.proc_file("");
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let mut seen_any = false;
        let mut largest = 0i64;
        for e in entries.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            // Processes exit while we scan: a vanished one simply does not count.
            if let Ok(text) = std::fs::read_to_string(e.path().join("maps")) {
                seen_any = true;
                largest = largest.max(text.lines().count() as i64);
            }
        }
        if seen_any {
            Ok(largest)
        } else {
            Err(format!("no readable PID/maps under {}", dir.display()))
        }
    }

    /// The largest fd table any process has now (`FDSize` in `/proc/PID/status`): the kernel
    /// never lets a table grow to `fs.nr_open` or past it, so a process that needed this many
    /// slots gets EMFILE on its next open beyond a lower limit.
    fn largest_fd_table(&self) -> Result<i64, String> {
        let dir = self.fs.proc_file("");
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let mut largest: Option<i64> = None;
        for e in entries.flatten() {
            if !e
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            // Processes exit while we scan: a vanished one simply does not count.
            let Ok(text) = std::fs::read_to_string(e.path().join("status")) else {
                continue;
            };
            let size = text
                .lines()
                .find_map(|l| l.strip_prefix("FDSize:"))
                .and_then(|v| v.trim().parse::<i64>().ok());
            if let Some(size) = size {
                largest = Some(largest.map_or(size, |l| l.max(size)));
            }
        }
        largest.ok_or_else(|| format!("no readable FDSize in PID/status under {}", dir.display()))
    }
}

/// inotify use of the user with the most: (instances, watches). Counted per open fd, so an
/// instance shared by several fds counts more than once (the safe side for a floor).
#[derive(Default)]
struct InotifyUse {
    instances: i64,
    watches: i64,
}

impl Use<'_> {
    /// Scans `PID/fd` for `anon_inode:inotify` and `PID/fdinfo/FD` for its `inotify wd:` lines;
    /// the kernel's limits are per user (real uid, which owns `/proc/PID`).
    fn inotify(&self) -> Result<InotifyUse, String> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.fs.proc_file("");
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let mut per_user: std::collections::BTreeMap<u32, InotifyUse> = Default::default();
        for e in entries.flatten() {
            if !e
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            // Processes exit while we scan: a vanished one simply does not count.
            let (Ok(meta), Ok(fds)) = (e.metadata(), std::fs::read_dir(e.path().join("fd"))) else {
                continue;
            };
            for fd in fds.flatten() {
                let is_inotify = std::fs::read_link(fd.path())
                    .is_ok_and(|t| t.as_os_str() == "anon_inode:inotify");
                if !is_inotify {
                    continue;
                }
                let info = std::fs::read_to_string(e.path().join("fdinfo").join(fd.file_name()))
                    .unwrap_or_default();
                let user = per_user.entry(meta.uid()).or_default();
                user.instances += 1;
                user.watches += info
                    .lines()
                    .filter(|l| l.starts_with("inotify wd:"))
                    .count() as i64;
            }
        }
        Ok(per_user
            .into_values()
            .fold(InotifyUse::default(), |a, u| InotifyUse {
                instances: a.instances.max(u.instances),
                watches: a.watches.max(u.watches),
            }))
    }

    /// Connections tracked now (`net/netfilter/nf_conntrack_count`).
    fn conntrack(&self) -> Result<i64, String> {
        let path = "net/netfilter/nf_conntrack_count";
        let text = self
            .fs
            .read(path)
            .map_err(|e| format!("cannot read current use from {path}: {e}"))?;
        text.trim()
            .parse()
            .map_err(|_| format!("unexpected {path} {text:?}"))
    }
}

/// Problems with limits in `desired` relative to the node's current use.
pub fn check(desired: &[Desired], policy: &Policy, fs: &SysctlFs) -> Vec<Rejection> {
    let node = Use { fs };
    let value = |key: &str| -> Option<i64> {
        desired
            .iter()
            .find(|d| d.key == key)
            .map(|d| d.value.clone())
            .or_else(|| fs.read(&key.replace('.', "/")).ok())
            .and_then(|v| v.trim().parse().ok())
    };
    let lowered = |d: &Desired, want: i64| {
        fs.read(&d.path)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .is_none_or(|current| want < current)
    };
    let mut out = Vec::new();
    for d in desired {
        if policy.lifted(&d.key) {
            continue;
        }
        let Ok(want) = d.value.trim().parse::<i64>() else {
            continue;
        };
        let floor = |what: &str, used: Result<i64, String>| -> Option<String> {
            match used {
                Err(e) => Some(e),
                Ok(n) if want < n.saturating_mul(USE_HEADROOM) => Some(format!(
                    "{want} is below {USE_HEADROOM}x the {n} {what} in use now; lift with sysctl.allowDangerous"
                )),
                Ok(_) => None,
            }
        };
        let problem = match d.key.as_str() {
            "kernel.pid_max" | "kernel.threads-max" if lowered(d, want) => {
                floor("tasks (threads)", node.tasks())
            }
            "fs.file-max" if lowered(d, want) => floor("file handles", node.open_files()),
            "fs.nr_open" if lowered(d, want) => floor(
                "fd table slots of the largest process",
                node.largest_fd_table(),
            ),
            "vm.max_map_count" if lowered(d, want) => floor(
                "memory maps of the largest process",
                node.largest_map_count(),
            ),
            "fs.inotify.max_user_instances" if lowered(d, want) => floor(
                "inotify instances of the busiest user",
                node.inotify().map(|u| u.instances),
            ),
            "fs.inotify.max_user_watches" if lowered(d, want) => floor(
                "inotify watches of the busiest user",
                node.inotify().map(|u| u.watches),
            ),
            "net.netfilter.nf_conntrack_max" | "net.nf_conntrack_max" if lowered(d, want) => {
                floor("tracked connections", node.conntrack())
            }
            "vm.min_free_kbytes" => match node.meminfo("MemTotal") {
                Err(e) => Some(e),
                Ok(total) if want > total * MIN_FREE_MAX_PERCENT / 100 => Some(format!(
                    "{want} kB is more than {MIN_FREE_MAX_PERCENT}% of the {total} kB of RAM; lift with sysctl.allowDangerous"
                )),
                Ok(_) => None,
            },
            "vm.overcommit_memory" | "vm.overcommit_ratio" | "vm.overcommit_kbytes"
                if value("vm.overcommit_memory") == Some(2) =>
            {
                strict_overcommit_problem(
                    &node,
                    value("vm.overcommit_ratio"),
                    value("vm.overcommit_kbytes"),
                )
            }
            _ => None,
        };
        if let Some(problem) = problem {
            out.push(Rejection {
                profile: d.profile.clone(),
                key: d.key.clone(),
                value: d.value.clone(),
                problem,
            });
        }
    }
    out
}

/// Under `vm.overcommit_memory = 2` every allocation past the commit limit fails: refuse a
/// limit below what is already committed (plus a tenth), which would fail nearly every fork
/// and malloc on the node at once.
fn strict_overcommit_problem(
    node: &Use,
    ratio: Option<i64>,
    kbytes: Option<i64>,
) -> Option<String> {
    let read = || -> Result<(i64, i64, i64), String> {
        Ok((
            node.meminfo("MemTotal")?,
            node.meminfo("SwapTotal")?,
            node.meminfo("Committed_AS")?,
        ))
    };
    let (total, swap, committed) = match read() {
        Ok(v) => v,
        Err(e) => return Some(e),
    };
    let limit = match kbytes {
        Some(k) if k > 0 => k + swap,
        _ => total * ratio.unwrap_or(50) / 100 + swap,
    };
    let needed = committed + committed / 10;
    (limit < needed).then(|| {
        format!(
            "strict overcommit (vm.overcommit_memory = 2) would cap commitments at {limit} kB, below the {committed} kB committed now (+10%); lift with sysctl.allowDangerous"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(files: &[(&str, &str)]) -> (tempfile::TempDir, SysctlFs) {
        let dir = tempfile::tempdir().unwrap();
        for (path, v) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        }
        let fs = SysctlFs::new(dir.path());
        (dir, fs)
    }

    pub(super) fn want(key: &str, value: &str) -> Desired {
        Desired {
            key: key.into(),
            path: key.replace('.', "/"),
            value: value.into(),
            profile: "p".into(),
            priority: 0,
        }
    }

    const MEMINFO: &str =
        "MemTotal:        8000000 kB\nSwapTotal:             0 kB\nCommitted_AS:    6000000 kB\n";

    fn problems(fs: &SysctlFs, d: &[Desired]) -> Vec<String> {
        check(d, &Policy::default(), fs)
            .into_iter()
            .map(|r| format!("{} {}", r.key, r.problem))
            .collect()
    }

    #[test]
    fn limits_below_current_use_are_refused_and_raising_is_not_checked() {
        let (_d, fs) = node(&[
            ("loadavg", "0.1 0.2 0.3 2/1500 999\n"),
            ("sys/kernel/pid_max", "4194304\n"),
            ("sys/kernel/threads-max", "60000\n"),
            ("sys/fs/file-max", "1000000\n"),
            ("sys/fs/file-nr", "20000 0 1000000\n"),
        ]);
        let p = problems(
            &fs,
            &[
                want("kernel.pid_max", "2000"),
                want("kernel.threads-max", "3000"),
                want("fs.file-max", "30000"),
            ],
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("kernel.pid_max 2000 is below 2x the 1500 tasks"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("fs.file-max 30000 is below 2x the 20000 file handles"),
            "{p:?}"
        );
        // Raising a limit never needs the use: a tree without loadavg still passes.
        let (_d, bare) = node(&[("sys/kernel/pid_max", "32768\n")]);
        assert!(problems(&bare, &[want("kernel.pid_max", "4194304")]).is_empty());
        // Lowering without a readable use is refused, not guessed.
        assert!(
            problems(&bare, &[want("kernel.pid_max", "1000")])[0]
                .contains("cannot read current use")
        );
        // Lifted: no check.
        let lifted = Policy {
            allow_dangerous: vec!["kernel.pid_max".into()],
            ..Default::default()
        };
        assert!(check(&[want("kernel.pid_max", "1000")], &lifted, &bare).is_empty());
    }

    #[test]
    fn min_free_and_strict_overcommit_are_checked_against_ram_and_commitments() {
        let (_d, fs) = node(&[
            ("meminfo", MEMINFO),
            ("sys/vm/overcommit_memory", "0\n"),
            ("sys/vm/overcommit_ratio", "50\n"),
            ("sys/vm/overcommit_kbytes", "0\n"),
            ("sys/vm/min_free_kbytes", "67584\n"),
        ]);
        assert!(problems(&fs, &[want("vm.min_free_kbytes", "400000")]).is_empty());
        assert!(
            problems(&fs, &[want("vm.min_free_kbytes", "400001")])[0]
                .contains("5% of the 8000000 kB")
        );
        // Ratio 50 of 8 GB = 4 GB < 6 GB committed: everything would fail.
        let p = problems(&fs, &[want("vm.overcommit_memory", "2")]);
        assert!(p[0].contains("cap commitments at 4000000 kB"), "{p:?}");
        // With a ratio that leaves room it passes.
        assert!(
            problems(
                &fs,
                &[
                    want("vm.overcommit_memory", "2"),
                    want("vm.overcommit_ratio", "100")
                ]
            )
            .is_empty()
        );
        assert!(problems(&fs, &[want("vm.overcommit_memory", "1")]).is_empty());
    }

    #[test]
    fn max_map_count_is_checked_against_the_largest_process() {
        let (_d, fs) = node(&[
            ("sys/vm/max_map_count", "65530\n"),
            ("42/maps", &"x\n".repeat(300)),
            ("43/maps", "x\n"),
        ]);
        assert!(
            problems(&fs, &[want("vm.max_map_count", "599")])[0].contains("the 300 memory maps")
        );
        assert!(problems(&fs, &[want("vm.max_map_count", "600")]).is_empty());
    }

    #[test]
    fn nr_open_is_checked_against_the_largest_fd_table() {
        let (_d, fs) = node(&[
            ("sys/fs/nr_open", "1048576\n"),
            ("42/status", "Name:\tbusy\nFDSize:\t512\nGroups:\n"),
            ("43/status", "Name:\tidle\nFDSize:\t64\n"),
        ]);
        assert!(
            problems(&fs, &[want("fs.nr_open", "1023")])[0]
                .contains("the 512 fd table slots of the largest process")
        );
        assert!(problems(&fs, &[want("fs.nr_open", "1024")]).is_empty());
        // No readable status: refused rather than guessed.
        let (_d, empty) = node(&[("sys/fs/nr_open", "1048576\n")]);
        assert!(problems(&empty, &[want("fs.nr_open", "64")])[0].contains("no readable FDSize"));
    }
}

#[cfg(test)]
mod use_checks {
    use super::tests::want;
    use super::*;

    #[test]
    fn conntrack_max_below_the_tracked_connections_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let netfilter = dir.path().join("sys/net/netfilter");
        std::fs::create_dir_all(&netfilter).unwrap();
        std::fs::write(netfilter.join("nf_conntrack_max"), "262144\n").unwrap();
        std::fs::write(netfilter.join("nf_conntrack_count"), "50000\n").unwrap();
        let fs = SysctlFs::new(dir.path());
        let low = check(
            &[want("net.netfilter.nf_conntrack_max", "60000")],
            &Policy::default(),
            &fs,
        );
        assert_eq!(low.len(), 1, "{low:?}");
        assert!(
            low[0].problem.contains("2x the 50000 tracked connections"),
            "{low:?}"
        );
        let enough = check(
            &[want("net.netfilter.nf_conntrack_max", "100000")],
            &Policy::default(),
            &fs,
        );
        assert!(enough.is_empty(), "{enough:?}");
    }
}
