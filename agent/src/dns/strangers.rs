//! Strangers in the DNS SO_REUSEPORT group (issue #15): the cache's sockets must use
//! SO_REUSEPORT for the rolling hand-over, so any root process on the host network can bind
//! the same address and port and receive a share of pods' queries. This check lists every UDP
//! socket and TCP listener bound exactly to one of the cache's addresses (`/proc/self/net/{udp,
//! udp6,tcp,tcp6}`, the agent's own network namespace), finds each one's process through
//! `<proc>/<pid>/fd` (socket inodes) and reports the ones whose process is not nodekeeper (the
//! agent or its successor): a gauge and a warning log naming them. It only reads.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The process name (`comm`) of the agent and of its successor during a hand-over.
const OUR_COMM: &str = "nodekeeper";
/// TCP state LISTEN in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// A socket bound to one of our addresses whose process is not nodekeeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stranger {
    pub addr: SocketAddr,
    pub protocol: &'static str,
    pub pid: u32,
    pub comm: String,
}

/// Parses `/proc/net/{udp,tcp}[6]`: each socket's local address, state and inode.
pub fn parse_proc_net(text: &str) -> Vec<(SocketAddr, String, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (ip_hex, port_hex) = f.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            // The kernel prints each 32-bit word of the network-order address as a native
            // integer, so native byte order turns it back.
            let word = |i: usize| -> Option<[u8; 4]> {
                Some(
                    u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16)
                        .ok()?
                        .to_ne_bytes(),
                )
            };
            let ip = match ip_hex.len() {
                8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
                32 => {
                    let mut b = [0u8; 16];
                    for i in 0..4 {
                        b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
                    }
                    IpAddr::V6(Ipv6Addr::from(b))
                }
                _ => return None,
            };
            let inode = f.get(9)?.parse().ok()?;
            Some((SocketAddr::new(ip, port), f.get(3)?.to_string(), inode))
        })
        .collect()
}

/// The strangers among the sockets bound exactly to `ours`, read through `proc` (the host's
/// /proc: the agent runs with hostPID). Sockets whose process cannot be found (closed since)
/// are skipped.
pub fn find(proc: &Path, ours: &[SocketAddr]) -> std::io::Result<Vec<Stranger>> {
    let mut wanted: HashMap<u64, (SocketAddr, &'static str)> = HashMap::new();
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
                wanted.insert(inode, (addr, protocol));
            }
        }
    }
    let mut strangers = Vec::new();
    if wanted.is_empty() {
        return Ok(strangers);
    }
    for entry in std::fs::read_dir(proc)?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Some(inode) = crate::metrics::connections::socket_inode(&fd.path()) else {
                continue;
            };
            let Some(&(addr, protocol)) = wanted.get(&inode) else {
                continue;
            };
            let comm = comm.get_or_insert_with(|| {
                std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default()
            });
            if comm != OUR_COMM {
                strangers.push(Stranger {
                    addr,
                    protocol,
                    pid,
                    comm: comm.clone(),
                });
            }
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
        let (p, o) = (proc.clone(), ours.clone());
        let found = tokio::task::spawn_blocking(move || find(&p, &o)).await;
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
            let who: Vec<String> = strangers
                .iter()
                .map(|s| format!("{} {} pid {} ({})", s.protocol, s.addr, s.pid, s.comm))
                .collect();
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
