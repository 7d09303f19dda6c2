//! Node-wide resource readings from the host's procfs and filesystems.
//!
//! Each reader takes `HostPaths` and returns one part of `NodeResources`, or a `CollectError`
//! naming the source, so one unreadable file (a kernel without PSI, no conntrack module) costs
//! that part only. Reads only; never writes.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use procfs_core::{FromBufRead, FromRead};

use super::CollectError;
use crate::host::{HostPaths, mountinfo};
use crate::pb;

fn open(path: PathBuf, source: &'static str) -> Result<BufReader<std::fs::File>, CollectError> {
    std::fs::File::open(&path)
        .map(BufReader::new)
        .map_err(|e| CollectError::Read {
            part: source,
            path,
            error: e.to_string(),
        })
}

fn read_string(path: PathBuf, source: &'static str) -> Result<String, CollectError> {
    std::fs::read_to_string(&path).map_err(|e| CollectError::Read {
        part: source,
        path,
        error: e.to_string(),
    })
}

fn malformed(source: &'static str, path: PathBuf, error: impl ToString) -> CollectError {
    CollectError::Malformed {
        part: source,
        path,
        error: error.to_string(),
    }
}

/// Clock ticks per second for /proc/stat; USER_HZ is 100 on every Linux ABI, sysconf confirms.
pub fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Per-CPU time by mode from `/proc/stat`.
pub fn cpu_times(host: &HostPaths, ticks: f64) -> Result<Vec<pb::CpuTime>, CollectError> {
    const SRC: &str = "cpu";
    let path = host.proc("stat");
    let text = read_string(path.clone(), SRC)?;
    let mut cpus = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        // The aggregate line is "cpu  ..."; per-CPU lines are "cpuN ...".
        let Some((idx, fields)) = rest.split_once(' ') else {
            continue;
        };
        let Ok(cpu) = idx.parse::<u32>() else {
            continue;
        };
        let v: Vec<f64> = fields
            .split_whitespace()
            .map(|f| f.parse::<u64>().map(|t| t as f64 / ticks))
            .collect::<Result<_, _>>()
            .map_err(|e| malformed(SRC, path.clone(), e))?;
        if v.len() < 8 {
            return Err(malformed(
                SRC,
                path,
                format!("cpu{cpu} has {} fields, want at least 8", v.len()),
            ));
        }
        // Guest time is already included in user/nice; report it once, as node_exporter does.
        cpus.push(pb::CpuTime {
            cpu,
            user: v[0],
            nice: v[1],
            system: v[2],
            idle: v[3],
            iowait: v[4],
            irq: v[5],
            softirq: v[6],
            steal: v[7],
        });
    }
    if cpus.is_empty() {
        return Err(malformed(SRC, path, "no cpuN lines"));
    }
    Ok(cpus)
}

pub fn load_average(host: &HostPaths) -> Result<pb::LoadAverage, CollectError> {
    const SRC: &str = "load";
    let path = host.proc("loadavg");
    let l = procfs_core::LoadAverage::from_read(open(path.clone(), SRC)?)
        .map_err(|e| malformed(SRC, path, e))?;
    Ok(pb::LoadAverage {
        load1: l.one.into(),
        load5: l.five.into(),
        load15: l.fifteen.into(),
    })
}

/// `/proc/meminfo`. Parsed here rather than with procfs-core's `Meminfo`, which insists on ~20
/// fields we do not use and so fails on kernels (or test trees) that lack one of them.
pub fn memory(host: &HostPaths) -> Result<pb::Memory, CollectError> {
    const SRC: &str = "memory";
    let path = host.proc("meminfo");
    let text = read_string(path.clone(), SRC)?;
    let mut kib = std::collections::HashMap::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let value: u64 = match words.next().map(str::parse) {
            Some(Ok(v)) => v,
            _ => return Err(malformed(SRC, path, format!("line {line:?} has no number"))),
        };
        // Every size line is in kB; counts (HugePages_Total) have no unit and are not used here.
        if words.next() == Some("kB") {
            kib.insert(key, value * 1024);
        }
    }
    let field = |k: &str| kib.get(k).copied();
    let required =
        |k: &str| field(k).ok_or_else(|| malformed(SRC, path.clone(), format!("no {k} line")));
    let free = required("MemFree")?;
    Ok(pb::Memory {
        total_bytes: required("MemTotal")?,
        // Kernels before 3.14 lack MemAvailable; free is the honest lower bound then.
        available_bytes: field("MemAvailable").unwrap_or(free),
        free_bytes: free,
        cached_bytes: field("Cached").unwrap_or(0),
        buffers_bytes: field("Buffers").unwrap_or(0),
        swap_total_bytes: field("SwapTotal").unwrap_or(0),
        swap_free_bytes: field("SwapFree").unwrap_or(0),
    })
}

/// PSI for cpu, memory and io; absent on kernels built without CONFIG_PSI or booted with psi=0.
pub fn pressure(host: &HostPaths) -> Result<Vec<pb::PressureStall>, CollectError> {
    const SRC: &str = "pressure";
    let mut out = Vec::with_capacity(3);
    for resource in ["cpu", "memory", "io"] {
        let path = host.proc(&format!("pressure/{resource}"));
        let text = read_string(path.clone(), SRC)?;
        out.push(parse_pressure(resource, &text).map_err(|e| malformed(SRC, path, e))?);
    }
    Ok(out)
}

fn parse_pressure(resource: &str, text: &str) -> Result<pb::PressureStall, String> {
    let mut p = pb::PressureStall {
        resource: resource.to_string(),
        ..Default::default()
    };
    let mut saw_some = false;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let kind = parts.next().unwrap_or_default();
        let (mut avg10, mut total) = (None, None);
        for kv in parts {
            match kv.split_once('=') {
                Some(("avg10", v)) => avg10 = v.parse::<f64>().ok(),
                Some(("total", v)) => total = v.parse::<u64>().ok(),
                _ => {}
            }
        }
        let (Some(avg10), Some(total)) = (avg10, total) else {
            return Err(format!("line {line:?} lacks avg10= or total="));
        };
        // total is in microseconds.
        let seconds = total as f64 / 1e6;
        match kind {
            "some" => {
                p.some_avg10 = avg10;
                p.some_seconds_total = seconds;
                saw_some = true;
            }
            "full" => {
                p.full_avg10 = avg10;
                p.full_seconds_total = seconds;
                p.has_full = true;
            }
            other => return Err(format!("unknown pressure kind {other:?}")),
        }
    }
    if !saw_some {
        return Err("no \"some\" line".into());
    }
    Ok(p)
}

/// Every interface in the host's network namespace (`/proc/net/dev`), sorted by name.
pub fn interfaces(host: &HostPaths) -> Result<Vec<pb::NetworkInterface>, CollectError> {
    const SRC: &str = "network";
    let path = host.proc("net/dev");
    let devs = procfs_core::net::InterfaceDeviceStatus::from_buf_read(open(path.clone(), SRC)?)
        .map_err(|e| malformed(SRC, path, e))?;
    let mut out: Vec<_> = devs
        .0
        .into_values()
        .map(|d| pb::NetworkInterface {
            name: d.name,
            receive_bytes: d.recv_bytes,
            receive_packets: d.recv_packets,
            receive_errors: d.recv_errs,
            receive_drops: d.recv_drop,
            transmit_bytes: d.sent_bytes,
            transmit_packets: d.sent_packets,
            transmit_errors: d.sent_errs,
            transmit_drops: d.sent_drop,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A mount table entry: (mount point, device, fs type).
type MountEntry = (String, String, String);

/// The host's mount table: PID 1's view (the host's, when the agent runs with hostPID),
/// falling back to our own.
fn mounts(host: &HostPaths) -> Result<Vec<MountEntry>, CollectError> {
    const SRC: &str = "filesystem";
    let text = read_string(host.proc("1/mounts"), SRC)
        .or_else(|_| read_string(host.proc("self/mounts"), SRC))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
            Some((
                mountinfo::unescape(mnt),
                dev.to_string(),
                fstype.to_string(),
            ))
        })
        .collect())
}

/// The mount that holds `path`: the last-mounted entry with the longest matching prefix.
fn mount_of<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table
        .iter()
        .enumerate()
        .filter(|(_, (mnt, _, _))| path.starts_with(mnt))
        .max_by_key(|(i, (mnt, _, _))| (mnt.len(), *i))
        .map(|(_, e)| e)
}

/// Size and free space of each configured mount point (host paths, resolved under rootfs).
pub fn filesystems(
    host: &HostPaths,
    mount_points: &[PathBuf],
) -> Result<Vec<pb::Filesystem>, CollectError> {
    const SRC: &str = "filesystem";
    let table = mounts(host).unwrap_or_default();
    let mut out = Vec::with_capacity(mount_points.len());
    for mp in mount_points {
        let on_rootfs = host.on_rootfs(mp);
        let st = nix::sys::statvfs::statvfs(&on_rootfs).map_err(|e| CollectError::Read {
            part: SRC,
            path: on_rootfs.clone(),
            error: e.to_string(),
        })?;
        let frsize = st.fragment_size() as u64;
        let (device, fs_type) = mount_of(&table, mp)
            .map(|(_, d, t)| (d.clone(), t.clone()))
            .unwrap_or_default();
        out.push(pb::Filesystem {
            mount_point: mp.display().to_string(),
            device,
            fs_type,
            size_bytes: st.blocks() as u64 * frsize,
            free_bytes: st.blocks_free() as u64 * frsize,
            avail_bytes: st.blocks_available() as u64 * frsize,
            files: st.files() as u64,
            files_free: st.files_free() as u64,
        });
    }
    Ok(out)
}

/// Allocated and maximum file handles (`/proc/sys/fs/file-nr`).
pub fn file_descriptors(host: &HostPaths) -> Result<pb::FileDescriptors, CollectError> {
    const SRC: &str = "filefd";
    let path = host.proc("sys/fs/file-nr");
    let text = read_string(path.clone(), SRC)?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| malformed(SRC, path.clone(), e))?;
    match f[..] {
        [allocated, _unused, maximum] => Ok(pb::FileDescriptors { allocated, maximum }),
        _ => Err(malformed(
            SRC,
            path,
            format!("want 3 numbers, got {}", f.len()),
        )),
    }
}

/// Socket counts from `/proc/net/sockstat` (and sockstat6 when IPv6 is on).
pub fn sockets(host: &HostPaths, page_size: u64) -> Result<pb::SocketSummary, CollectError> {
    const SRC: &str = "sockstat";
    let text = read_string(host.proc("net/sockstat"), SRC)?;
    let mut s = pb::SocketSummary::default();
    let v4 = parse_sockstat(&text);
    let get = |t: &std::collections::HashMap<(String, String), u64>, p: &str, k: &str| {
        t.get(&(p.to_string(), k.to_string())).copied().unwrap_or(0)
    };
    s.sockets_used = get(&v4, "sockets", "used");
    s.tcp_in_use = get(&v4, "TCP", "inuse");
    s.tcp_orphan = get(&v4, "TCP", "orphan");
    s.tcp_time_wait = get(&v4, "TCP", "tw");
    s.tcp_allocated = get(&v4, "TCP", "alloc");
    // "mem" is in pages.
    s.tcp_memory_bytes = get(&v4, "TCP", "mem") * page_size;
    s.udp_in_use = get(&v4, "UDP", "inuse");
    s.udp_memory_bytes = get(&v4, "UDP", "mem") * page_size;
    if let Ok(text6) = read_string(host.proc("net/sockstat6"), SRC) {
        let v6 = parse_sockstat(&text6);
        s.tcp6_in_use = get(&v6, "TCP6", "inuse");
        s.udp6_in_use = get(&v6, "UDP6", "inuse");
    }
    Ok(s)
}

fn parse_sockstat(text: &str) -> std::collections::HashMap<(String, String), u64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        let Some((proto, rest)) = line.split_once(':') else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        for pair in words.chunks(2) {
            if let [k, v] = pair
                && let Ok(v) = v.parse()
            {
                out.insert((proto.to_string(), k.to_string()), v);
            }
        }
    }
    out
}

/// Conntrack table usage; `None` when the nf_conntrack module is not loaded.
pub fn conntrack(host: &HostPaths) -> Result<Option<pb::Conntrack>, CollectError> {
    const SRC: &str = "conntrack";
    let count_path = host.proc("sys/net/netfilter/nf_conntrack_count");
    if !count_path.exists() {
        return Ok(None);
    }
    let read_u64 = |p: PathBuf| -> Result<u64, CollectError> {
        read_string(p.clone(), SRC)?
            .trim()
            .parse()
            .map_err(|e| malformed(SRC, p, e))
    };
    Ok(Some(pb::Conntrack {
        entries: read_u64(count_path)?,
        limit: read_u64(host.proc("sys/net/netfilter/nf_conntrack_max"))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_parses_some_and_full() {
        let p = parse_pressure(
            "io",
            "some avg10=1.50 avg60=0.00 avg300=0.00 total=2500000\nfull avg10=0.25 avg60=0.00 avg300=0.00 total=1000000\n",
        )
        .unwrap();
        assert_eq!(p.some_seconds_total, 2.5);
        assert_eq!(p.full_seconds_total, 1.0);
        assert_eq!(p.some_avg10, 1.5);
        assert!(p.has_full);
        assert!(parse_pressure("cpu", "some avg10=x\n").is_err());
        assert!(parse_pressure("cpu", "").is_err());
    }

    #[test]
    fn sockstat_parses_pairs() {
        let t = parse_sockstat(
            "sockets: used 123\nTCP: inuse 5 orphan 1 tw 7 alloc 9 mem 3\nUDP: inuse 2 mem 1\n",
        );
        assert_eq!(t[&("TCP".to_string(), "tw".to_string())], 7);
        assert_eq!(t[&("sockets".to_string(), "used".to_string())], 123);
    }

    #[test]
    fn mount_lookup_prefers_longest_then_latest() {
        let table = vec![
            ("/".to_string(), "/dev/vda".to_string(), "ext4".to_string()),
            (
                "/var".to_string(),
                "/dev/vdb".to_string(),
                "xfs".to_string(),
            ),
            ("/var".to_string(), "tmpfs".to_string(), "tmpfs".to_string()),
        ];
        assert_eq!(mount_of(&table, Path::new("/var/lib")).unwrap().1, "tmpfs");
        assert_eq!(
            mount_of(&table, Path::new("/variable")).unwrap().1,
            "/dev/vda"
        );
        assert_eq!(mountinfo::unescape("/mnt/a\\040b"), "/mnt/a b");
    }
}
