//! Strangers in the DNS SO_REUSEPORT group (issue #15): the cache's sockets must use
//! SO_REUSEPORT for the rolling hand-over, so any root process on the host network can bind
//! the same address and port and receive a share of pods' queries. This check lists every UDP
//! socket and TCP listener bound exactly to one of the cache's addresses (`/proc/self/net/{udp,
//! udp6,tcp,tcp6}`, the agent's own network namespace) and identifies ours by what we hold,
//! never by a name a process can choose: a socket is ours when its inode is in this process's
//! fd table, or in the fd table of a process whose executable is the same file as ours (the
//! hand-over successor; same device and inode). Every other socket is a stranger, whether its
//! holder is found (any thread's fd table: `<pid>/task/<tid>/fd`, as a thread may unshare its
//! table) or not (a socket parked in a unix socket's queue, SCM_RIGHTS: "owner unknown").
//! A gauge, a warning log and an Event name them. It only reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// TCP state LISTEN in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// A socket bound to one of our addresses that neither this process nor a process running our
/// executable holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stranger {
    pub addr: SocketAddr,
    pub protocol: &'static str,
    /// A process holding it, None when no process's fd table does (held in flight).
    pub pid: Option<u32>,
    /// That process's name as it calls itself (informative only: anyone can choose it).
    pub comm: String,
}

impl std::fmt::Display for Stranger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(
                f,
                "{} {} pid {} ({})",
                self.protocol, self.addr, pid, self.comm
            ),
            None => write!(
                f,
                "{} {} owner unknown (held by no process's fd table: in flight over a unix socket?)",
                self.protocol, self.addr
            ),
        }
    }
}

/// Parses `/proc/net/{udp,tcp}[6]`: each socket's local address, state and inode. Addresses as
/// the connection metrics read them: a v4-mapped IPv6 address (`::ffff:a.b.c.d`, a dual-stack
/// socket) is the IPv4 address, since it takes that address's traffic (issue #15).
pub fn parse_proc_net(text: &str) -> Vec<(SocketAddr, String, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = crate::metrics::connections::procfs::parse_addr(f.get(1)?)?;
            let inode = f.get(9)?.parse().ok()?;
            Some((addr, f.get(3)?.to_string(), inode))
        })
        .collect()
}

/// Sockets bound exactly to one of `ours` (UDP, and TCP listeners), by inode, from `proc`'s
/// `self/net` files.
fn group_members(proc: &Path, ours: &[SocketAddr]) -> HashMap<u64, (SocketAddr, &'static str)> {
    let mut members = HashMap::new();
    for (file, protocol) in [
        ("udp", "udp"),
        ("udp6", "udp"),
        ("tcp", "tcp"),
        ("tcp6", "tcp"),
    ] {
        // A family the kernel lacks (IPv6 off) has no file.
        let Ok(text) = std::fs::read_to_string(proc.join("self/net").join(file)) else {
            continue;
        };
        for (addr, state, inode) in parse_proc_net(&text) {
            if ours.contains(&addr) && (protocol == "udp" || state == TCP_LISTEN) {
                members.insert(inode, (addr, protocol));
            }
        }
    }
    members
}

/// The executable of `<proc>/<pid>` as (device, inode): the file itself, whatever its name.
fn exe_identity(proc_pid: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(proc_pid.join("exe")).ok()?;
    Some((m.dev(), m.ino()))
}

/// The strangers among the sockets bound exactly to `ours`, read through `proc` (the host's
/// /proc: the agent runs with hostPID). The scan reads every process's fd tables, which takes
/// seconds on a node with many processes and fds: it stops with `Interrupted` as soon as `stop`
/// is cancelled, so it never holds up the agent's shutdown (the runtime waits for blocking tasks).
pub fn find(
    proc: &Path,
    ours: &[SocketAddr],
    stop: &CancellationToken,
) -> std::io::Result<Vec<Stranger>> {
    let members = group_members(proc, ours);
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let me = proc.join("self");
    let mine: std::collections::HashSet<u64> =
        crate::metrics::connections::socket_inodes_in(&me.join("fd")).collect();
    let our_exe = exe_identity(&me);
    let mut unaccounted: HashMap<u64, (SocketAddr, &'static str)> = members
        .into_iter()
        .filter(|(inode, _)| !mine.contains(inode))
        .collect();
    if unaccounted.is_empty() {
        return Ok(Vec::new());
    }
    // Every holder of each remaining socket, in any thread's fd table.
    let mut holders: HashMap<u64, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir(proc)?.flatten() {
        if stop.is_cancelled() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "stopped: the agent is shutting down",
            ));
        }
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let mut tables = vec![entry.path().join("fd")];
        if let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) {
            tables.extend(tasks.flatten().map(|t| t.path().join("fd")));
        }
        for table in tables {
            for inode in crate::metrics::connections::socket_inodes_in(&table) {
                if unaccounted.contains_key(&inode) {
                    let pids = holders.entry(inode).or_default();
                    if !pids.contains(&pid) {
                        pids.push(pid);
                    }
                }
            }
        }
    }
    // Our successor (or predecessor) runs the same executable file: its sockets are ours.
    let ours_exe =
        |pid: u32| our_exe.is_some() && exe_identity(&proc.join(pid.to_string())) == our_exe;
    unaccounted.retain(|inode, _| {
        !holders
            .get(inode)
            .is_some_and(|pids| pids.iter().any(|&p| ours_exe(p)))
    });
    // A socket we closed since the first read is no longer in the group: not a stranger.
    let still = group_members(proc, ours);
    unaccounted.retain(|inode, _| still.contains_key(inode));
    let mut strangers = Vec::new();
    for (inode, (addr, protocol)) in unaccounted {
        match holders.get(&inode) {
            Some(pids) => strangers.extend(pids.iter().map(|&pid| {
                Stranger {
                    addr,
                    protocol,
                    pid: Some(pid),
                    comm: std::fs::read_to_string(proc.join(pid.to_string()).join("comm"))
                        .map(|c| c.trim().to_string())
                        .unwrap_or_default(),
                }
            })),
            None => strangers.push(Stranger {
                addr,
                protocol,
                pid: None,
                comm: String::new(),
            }),
        }
    }
    strangers.sort_by_key(|s| (s.addr, s.protocol, s.pid));
    strangers.dedup();
    Ok(strangers)
}

/// `nodekeeper_dns_foreign_sockets`.
#[derive(Debug, Clone, Default)]
pub struct StrangerMetrics {
    foreign: Gauge,
}

impl StrangerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dns_foreign_sockets",
            "Sockets bound to the DNS cache's addresses (UDP, TCP listeners) by a process that is not nodekeeper: it receives a share of pods' queries",
            m.foreign.clone(),
        );
        m
    }
}

/// Reason of the Warning Event recorded on the Node when a stranger joins the DNS group.
pub const REASON_FOREIGN_SOCKET: &str = "DNSForeignSocket";

/// Checks every `interval` until `token`; whenever the set of strangers changes to a non-empty
/// one, logs a warning and, with `events` (the API client and this Node's name), records a
/// `DNSForeignSocket` Warning Event: an operator looking at the Node sees who takes its queries.
pub async fn watch(
    proc: std::path::PathBuf,
    ours: Vec<SocketAddr>,
    metrics: StrangerMetrics,
    events: Option<(kube::Client, String)>,
    interval: Duration,
    token: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Vec<Stranger> = Vec::new();
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (p, o, stop) = (proc.clone(), ours.clone(), token.clone());
        let scan = tokio::task::spawn_blocking(move || find(&p, &o, &stop));
        let found = tokio::select! {
            // The scan sees the same token and ends at its next process.
            _ = token.cancelled() => return,
            found = scan => found,
        };
        let strangers = match found {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "dns: could not check for strangers on our addresses");
                continue;
            }
            Err(_) => continue,
        };
        metrics.foreign.set(strangers.len() as i64);
        if strangers != last && !strangers.is_empty() {
            let who: Vec<String> = strangers.iter().map(ToString::to_string).collect();
            tracing::warn!(strangers = ?who, "dns: another process is bound to the cache's address and port (SO_REUSEPORT): it receives a share of pods' queries");
            if let Some((client, node)) = &events {
                let message = format!(
                    "another process is bound to the DNS cache's address and port and receives a share of pods' queries: {}",
                    who.join(", ")
                );
                crate::kube::node_event(client, node, REASON_FOREIGN_SOCKET, "Warning", &message)
                    .await;
            }
        }
        last = strangers;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Issue #15, 2c: a dual-stack IPv6 socket bound to `::ffff:<cache address>` on the DNS
    /// port is in the kernel's tables for that IPv4 address: it is a member like any other.
    #[test]
    fn a_v4_mapped_ipv6_socket_on_our_address_is_a_group_member() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("self/net");
        std::fs::create_dir_all(&net).unwrap();
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n";
        // 127.0.15.1 as each /proc word prints it (native order of the network-order bytes).
        let v4 = format!("{:08X}", u32::from_ne_bytes([127, 0, 15, 1]));
        let mapped = format!(
            "{:08X}{:08X}{:08X}{v4}",
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff])
        );
        std::fs::write(
            net.join("udp"),
            format!("{header}   1: {v4}:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1001 2 0000000000000000 0\n"),
        )
        .unwrap();
        std::fs::write(
            net.join("udp6"),
            format!("{header}   2: {mapped}:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1002 2 0000000000000000 0\n"),
        )
        .unwrap();
        let ours: SocketAddr = "127.0.15.1:53".parse().unwrap();
        let members = group_members(dir.path(), &[ours]);
        assert_eq!(members.get(&1001), Some(&(ours, "udp")));
        assert_eq!(
            members.get(&1002),
            Some(&(ours, "udp")),
            "the v4-mapped socket: {members:?}"
        );
    }

    /// A cancelled scan stops before reading any process's fd table (b22 saw a shutdown wait
    /// 15 s for a scan of 100 processes x 1,000 fds).
    #[test]
    fn a_cancelled_scan_stops_before_reading_the_processes() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("self/net");
        std::fs::create_dir_all(&net).unwrap();
        std::fs::create_dir_all(dir.path().join("self/fd")).unwrap();
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n";
        let v4 = format!("{:08X}", u32::from_ne_bytes([127, 0, 15, 1]));
        std::fs::write(
            net.join("udp"),
            format!("{header}   1: {v4}:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1001 2 0000000000000000 0\n"),
        )
        .unwrap();
        // A process holding the socket: found while the scan runs.
        let fd = dir.path().join("4242/fd");
        std::fs::create_dir_all(&fd).unwrap();
        std::os::unix::fs::symlink("socket:[1001]", fd.join("3")).unwrap();
        let ours: SocketAddr = "127.0.15.1:53".parse().unwrap();
        let running = CancellationToken::new();
        let found = find(dir.path(), &[ours], &running).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, Some(4242));
        let stopped = CancellationToken::new();
        stopped.cancel();
        let err = find(dir.path(), &[ours], &stopped).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
    }

    #[test]
    fn proc_net_lines_give_address_state_and_inode() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   1: 0A14FEA9:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0\n";
        let want_ip = Ipv4Addr::from(u32::from_str_radix("0A14FEA9", 16).unwrap().to_ne_bytes());
        assert_eq!(
            parse_proc_net(udp),
            vec![(SocketAddr::new(want_ip.into(), 53), "07".to_string(), 4242)]
        );
        if cfg!(target_endian = "little") {
            assert_eq!(want_ip, Ipv4Addr::new(169, 254, 20, 10));
        }
    }
}
