//! The text files the kernel keeps per network namespace, read through `/proc/thread-self/net`
//! (the calling thread's namespace, which `setns` changed; `/proc/self/net` would show the main
//! thread's): TCP sockets from `tcp`/`tcp6` (the fallback when sock_diag is unavailable), UDP
//! socket counts, TcpExt listen counters from `netstat`, and `ip_local_port_range`.
//!
//! `/proc/net/tcp` cannot tell idle from active connections, a listener's backlog limit or RTT:
//! those stay unknown (`None`/0) in a procfs census.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Socket, TcpState};

/// The per-namespace files, relative to the agent's own procfs (always `/proc`: `thread-self`
/// names the reading thread, so the host's procfs mount is not needed here).
pub const NET_DIR: &str = "/proc/thread-self/net";
pub const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Appends the sockets listed in one `/proc/net/tcp` or `tcp6` text. Lines that do not parse
/// are skipped and counted in the return value.
pub fn parse_tcp(text: &str, out: &mut Vec<Socket>) -> usize {
    let mut bad = 0;
    for line in text.lines().skip(1) {
        match parse_tcp_line(line) {
            Some(Some(s)) => out.push(s),
            Some(None) => {}
            None => bad += 1,
        }
    }
    bad
}

/// `Some(None)` for a socket in a state we do not report.
fn parse_tcp_line(line: &str) -> Option<Option<Socket>> {
    // sl local rem st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let mut f = line.split_ascii_whitespace();
    let _sl = f.next()?;
    let local = parse_addr(f.next()?)?;
    let remote = parse_addr(f.next()?)?;
    let state = u8::from_str_radix(f.next()?, 16).ok()?;
    let (tx, rx) = f.next()?.split_once(':')?;
    let _timer = f.next()?;
    let retransmits = u32::from_str_radix(f.next()?, 16).ok()?;
    let _uid = f.next()?;
    let _timeout = f.next()?;
    let inode: u64 = f.next()?.parse().ok()?;
    let Some(state) = TcpState::from_kernel(state) else {
        return Some(None);
    };
    Some(Some(Socket {
        state,
        local,
        remote,
        // For a listener rx_queue is the accept queue length, as sock_diag's rqueue.
        rqueue: u32::from_str_radix(rx, 16).ok()?,
        wqueue: u32::from_str_radix(tx, 16).ok()?,
        inode,
        retransmits,
        rtt_us: None,
        last_data_ms: None,
    }))
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6): each 32-bit word printed as the native-endian
/// integer holding the network-order bytes; the port in host order. A v4-mapped IPv6 address is
/// returned as the IPv4 address (also what `dns::strangers` matches against the cache's).
pub fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            super::ip_from_v6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Inodes of the sockets listed in a `/proc/net/udp` or `udp6` text (10th column).
pub fn socket_inodes(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_ascii_whitespace().nth(9)?.parse().ok())
}

/// Sockets listed in a `/proc/net/udp` or `udp6` text (every line but the header).
pub fn count_lines(text: &str) -> u64 {
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count() as u64
}

/// `TcpExt` ListenOverflows and ListenDrops from a `/proc/net/netstat` text (header line of
/// names, then a line of values, per group).
pub fn listen_counters(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        let Some(names) = names.strip_prefix("TcpExt:") else {
            continue;
        };
        let values = values.strip_prefix("TcpExt:")?;
        let mut overflows = None;
        let mut drops = None;
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            match n {
                "ListenOverflows" => overflows = v.parse().ok(),
                "ListenDrops" => drops = v.parse().ok(),
                _ => {}
            }
        }
        return Some((overflows?, drops?));
    }
    None
}

/// `32768\t60999` -> (32768, 60999).
pub fn port_range(text: &str) -> Option<(u16, u16)> {
    let mut f = text.split_whitespace();
    let low = f.next()?.parse().ok()?;
    let high = f.next()?.parse().ok()?;
    (low <= high).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real lines from a 6.x kernel (little-endian).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000004 00:00000000 00000000     0        0 41235 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000002  1000        0 41240 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:9C41 0100007F:1F90 06 00000000:00000000 03:000016C5 00000000     0        0 0 3 0000000000000000
   3: garbage
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5001 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100000A:0050 0000000000000000FFFF00000200000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 5002 1 0000000000000000 20 4 30 10 -1
   2: 000080FE00000000FF57A5FEC64B5EFE:01BB 00000000000000000000000001000000:D431 01 00000010:00000000 00:00000000 00000000     0        0 5003 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn tcp_lines_become_sockets() {
        let mut out = Vec::new();
        assert_eq!(parse_tcp(TCP, &mut out), 1, "the garbage line is counted");
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].state, TcpState::Listen);
        assert_eq!(out[0].local, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(
            out[0].rqueue, 4,
            "a listener's rx_queue is its accept queue"
        );
        assert_eq!(out[1].state, TcpState::Established);
        assert_eq!(out[1].local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(out[1].remote, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((out[1].retransmits, out[1].inode), (2, 41240));
        assert_eq!(out[2].state, TcpState::TimeWait);
        assert_eq!(out[2].inode, 0);
    }

    #[test]
    fn tcp6_lines_and_mapped_addresses() {
        let mut out = Vec::new();
        assert_eq!(parse_tcp(TCP6, &mut out), 0);
        assert_eq!(out[0].local, "[::]:8080".parse().unwrap());
        assert_eq!(out[1].local, "10.0.0.1:80".parse().unwrap());
        assert_eq!(out[1].remote, "10.0.0.2:50000".parse().unwrap());
        assert_eq!(out[2].remote, "[::1]:54321".parse().unwrap());
        assert_eq!(
            out[2].local,
            "[fe80::fea5:57ff:fe5e:4bc6]:443"
                .parse::<SocketAddr>()
                .unwrap()
        );
        assert_eq!(out[2].wqueue, 16);
    }

    #[test]
    fn netstat_port_range_and_udp() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 12 14\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(listen_counters(netstat), Some((12, 14)));
        assert_eq!(listen_counters("IpExt: A\nIpExt: 1\n"), None);
        assert_eq!(port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(port_range("9 1"), None);
        assert_eq!(count_lines("header\n  0: a\n  1: b\n"), 2);
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  123: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 17205 2 0000000000000000 0
";
        assert_eq!(socket_inodes(udp).collect::<Vec<_>>(), vec![17205]);
    }
}
