//! TCP sockets of the calling thread's network namespace from netlink `sock_diag`
//! (`NETLINK_SOCK_DIAG`, `inet_diag_req_v2` dumps, with `tcp_info`): what `ss` uses, without the
//! text formatting. The socket must be created while the thread is in the namespace; the dump
//! can then be read from anywhere.
//!
//! Layouts are the kernel's UAPI (linux/netlink.h, linux/inet_diag.h, linux/tcp.h); netlink
//! fields are host byte order, ports and addresses network order. Every length is checked
//! before a field is read: a short message ends the parse with an error, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

use super::{Socket, TcpState};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_INFO: u16 = 2;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Every connection state, ESTABLISHED (1) to NEW_SYN_RECV (12), as `ss -a` asks. Not all bits:
/// bit 13 (TCP_BOUND_INACTIVE, Linux >= 6.7) makes every dump also walk the node-wide bind
/// hash for bound-but-unconnected sockets, which the census does not report.
const TCP_STATES: u32 = (1 << 13) - 2;

/// The kernel fills at most ~32 KiB per dump message batch; a larger buffer costs nothing.
const RECV_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// socket(NETLINK_SOCK_DIAG) failed: kernel without sock_diag, or seccomp.
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {0}")]
    Open(nix::Error),
    #[error("sock_diag {what} failed: {error}")]
    Io {
        what: &'static str,
        error: nix::Error,
    },
    /// The kernel answered the dump with an error (ENOENT: inet_diag/tcp_diag not loaded).
    #[error("sock_diag dump refused by the kernel: {0}")]
    Kernel(nix::Error),
    #[error("malformed sock_diag reply: {0}")]
    Malformed(&'static str),
}

/// A netlink socket bound to the calling thread's current network namespace.
pub struct DiagSocket(OwnedFd);

impl DiagSocket {
    pub fn open() -> Result<Self, SockDiagError> {
        socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )
        .map(Self)
        .map_err(SockDiagError::Open)
    }

    /// Appends every TCP socket (all states, IPv4 then IPv6) to `out`.
    ///
    /// Each dump walks the kernel's established hash, which is shared by every namespace on
    /// the node (unless `net.ipv4.tcp_child_ehash_entries` gives each its own), so a dump costs
    /// in proportion to the node's sockets, not the pod's. `in_use` (the namespace's sockstat)
    /// lets a family with no sockets be skipped: most pods have no IPv6 TCP sockets at all.
    pub fn dump_tcp(
        &self,
        buf: &mut Vec<u8>,
        out: &mut Vec<Socket>,
        in_use: Option<TcpInUse>,
    ) -> Result<(), SockDiagError> {
        let start = out.len();
        if in_use.is_none_or(|u| u.v4 > 0 || u.time_wait > 0) {
            self.request(1, AF_INET)?;
            self.read_dump(1, buf, out)?;
        }
        // TIME_WAIT is counted for both families together: the v4 dump tells how many are v4.
        let v4_time_wait = out[start..]
            .iter()
            .filter(|s| s.state == TcpState::TimeWait)
            .count() as u64;
        if in_use.is_none_or(|u| u.v6 > 0 || u.time_wait > v4_time_wait) {
            self.request(2, AF_INET6)?;
            self.read_dump(2, buf, out)?;
        }
        Ok(())
    }

    fn request(&self, seq: u32, family: u8) -> Result<(), SockDiagError> {
        let mut req = [0u8; NLMSG_HDRLEN + 56];
        let len = req.len() as u32;
        req[0..4].copy_from_slice(&len.to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req[8..12].copy_from_slice(&seq.to_ne_bytes());
        // inet_diag_req_v2: family, protocol, ext (bit INET_DIAG_INFO-1 asks for tcp_info), pad,
        // states, then a zeroed inet_diag_sockid (no filter).
        let body = &mut req[NLMSG_HDRLEN..];
        body[0] = family;
        body[1] = IPPROTO_TCP;
        body[2] = 1 << (INET_DIAG_INFO - 1);
        body[4..8].copy_from_slice(&TCP_STATES.to_ne_bytes());
        sendto(
            self.0.as_raw_fd(),
            &req,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|error| SockDiagError::Io {
            what: "send",
            error,
        })?;
        Ok(())
    }

    fn read_dump(
        &self,
        seq: u32,
        buf: &mut Vec<u8>,
        out: &mut Vec<Socket>,
    ) -> Result<(), SockDiagError> {
        buf.resize(RECV_BUFFER, 0);
        loop {
            let n = loop {
                match recv(self.0.as_raw_fd(), buf, MsgFlags::empty()) {
                    Err(nix::Error::EINTR) => continue,
                    r => {
                        break r.map_err(|error| SockDiagError::Io {
                            what: "recv",
                            error,
                        })?;
                    }
                }
            };
            if n == 0 {
                return Err(SockDiagError::Malformed(
                    "the dump ended without NLMSG_DONE",
                ));
            }
            if parse_batch(&buf[..n], seq, out)? {
                return Ok(());
            }
        }
    }
}

/// A namespace's TCP sockets by family from `sockstat`/`sockstat6`: hashed sockets (listeners,
/// connections, orphans) per family, and TIME_WAIT for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInUse {
    pub v4: u64,
    pub v6: u64,
    pub time_wait: u64,
}

/// Parses a namespace's `sockstat` and `sockstat6` (`TCP: inuse 3 orphan 0 tw 2 ...`,
/// `TCP6: inuse 1`); also returns the UDP sockets of both (`UDP: inuse`, `UDP6: inuse`).
pub fn parse_sockstat(v4: &str, v6: &str) -> Option<(TcpInUse, u64)> {
    fn field(text: &str, line: &str, key: &str) -> Option<u64> {
        let rest = text.lines().find_map(|l| l.strip_prefix(line))?;
        let mut words = rest.split_whitespace();
        while let Some(w) = words.next() {
            if w == key {
                return words.next()?.parse().ok();
            }
        }
        None
    }
    let tcp = TcpInUse {
        v4: field(v4, "TCP:", "inuse")?,
        time_wait: field(v4, "TCP:", "tw")?,
        v6: field(v6, "TCP6:", "inuse")?,
    };
    let udp = field(v4, "UDP:", "inuse")? + field(v6, "UDP6:", "inuse")?;
    Some((tcp, udp))
}

/// Parses one recv()'s worth of netlink messages; true once NLMSG_DONE was seen.
pub(crate) fn parse_batch(
    mut data: &[u8],
    seq: u32,
    out: &mut Vec<Socket>,
) -> Result<bool, SockDiagError> {
    while data.len() >= NLMSG_HDRLEN {
        let len = u32_at(data, 0) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(SockDiagError::Malformed(
                "netlink message length out of bounds",
            ));
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let msg_seq = u32_at(data, 8);
        let payload = &data[NLMSG_HDRLEN..len];
        if msg_seq == seq {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(0..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or(SockDiagError::Malformed("short NLMSG_ERROR"))?;
                    if errno != 0 {
                        return Err(SockDiagError::Kernel(nix::Error::from_raw(-errno)));
                    }
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(s) = parse_socket(payload)? {
                        out.push(s);
                    }
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let advance = (len + 3) & !3;
        data = data.get(advance..).unwrap_or(&[]);
    }
    Ok(false)
}

/// One `inet_diag_msg` and its attributes.
fn parse_socket(p: &[u8]) -> Result<Option<Socket>, SockDiagError> {
    if p.len() < INET_DIAG_MSG_LEN {
        return Err(SockDiagError::Malformed("short inet_diag_msg"));
    }
    let Some(state) = TcpState::from_kernel(p[1]) else {
        return Ok(None);
    };
    let (local_ip, remote_ip) = match p[0] {
        AF_INET => (ipv4(&p[8..12]), ipv4(&p[24..28])),
        AF_INET6 => (ipv6(&p[8..24]), ipv6(&p[24..40])),
        _ => return Ok(None),
    };
    let sport = u16::from_be_bytes([p[4], p[5]]);
    let dport = u16::from_be_bytes([p[6], p[7]]);
    let mut s = Socket {
        state,
        local: SocketAddr::new(local_ip, sport),
        remote: SocketAddr::new(remote_ip, dport),
        rqueue: u32_at(p, 56),
        wqueue: u32_at(p, 60),
        inode: u64::from(u32_at(p, 68)),
        // inet_diag_msg.idiag_retrans: the current retransmit count, until tcp_info says more.
        retransmits: u32::from(p[3]),
        rtt_us: None,
        last_data_ms: None,
    };
    let mut attrs = &p[INET_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let akind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if alen < 4 || alen > attrs.len() {
            return Err(SockDiagError::Malformed("attribute length out of bounds"));
        }
        if akind == INET_DIAG_INFO {
            apply_tcp_info(&attrs[4..alen], &mut s);
        }
        attrs = attrs.get((alen + 3) & !3..).unwrap_or(&[]);
    }
    Ok(Some(s))
}

/// Reads the `struct tcp_info` fields we report; older kernels send a shorter struct, so each
/// field is taken only when present.
fn apply_tcp_info(info: &[u8], s: &mut Socket) {
    const LAST_DATA_SENT: usize = 44;
    const LAST_DATA_RECV: usize = 52;
    const RTT: usize = 68;
    const TOTAL_RETRANS: usize = 100;
    let field = |off: usize| (info.len() >= off + 4).then(|| u32_at(info, off));
    if let (Some(sent), Some(recv)) = (field(LAST_DATA_SENT), field(LAST_DATA_RECV)) {
        s.last_data_ms = Some(sent.min(recv));
    }
    s.rtt_us = field(RTT);
    if let Some(total) = field(TOTAL_RETRANS) {
        s.retransmits = total;
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn ipv4(b: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

fn ipv6(b: &[u8]) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    // Dual-stack sockets talking IPv4 show as ::ffff:a.b.c.d; report them as the IPv4 peer.
    super::ip_from_v6(Ipv6Addr::from(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u32, kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn diag_msg(state: u8, info: Option<&[u8]>) -> Vec<u8> {
        let mut p = vec![0u8; INET_DIAG_MSG_LEN];
        p[0] = AF_INET;
        p[1] = state;
        p[4..6].copy_from_slice(&40000u16.to_be_bytes());
        p[6..8].copy_from_slice(&5432u16.to_be_bytes());
        p[8..12].copy_from_slice(&[10, 0, 0, 2]);
        p[24..28].copy_from_slice(&[10, 0, 0, 1]);
        p[56..60].copy_from_slice(&7u32.to_ne_bytes());
        p[68..72].copy_from_slice(&999u32.to_ne_bytes());
        if let Some(info) = info {
            p.extend_from_slice(&((4 + info.len()) as u16).to_ne_bytes());
            p.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
            p.extend_from_slice(info);
        }
        p
    }

    #[test]
    fn parses_sockets_and_tcp_info_until_done() {
        let mut info = vec![0u8; 104];
        info[44..48].copy_from_slice(&5000u32.to_ne_bytes());
        info[52..56].copy_from_slice(&1200u32.to_ne_bytes());
        info[68..72].copy_from_slice(&250u32.to_ne_bytes());
        info[100..104].copy_from_slice(&3u32.to_ne_bytes());
        let mut batch = message(1, SOCK_DIAG_BY_FAMILY, &diag_msg(1, Some(&info)));
        batch.extend(message(1, SOCK_DIAG_BY_FAMILY, &diag_msg(10, None)));
        let mut out = Vec::new();
        assert!(!parse_batch(&batch, 1, &mut out).unwrap());
        assert!(parse_batch(&message(1, NLMSG_DONE, &[0; 4]), 1, &mut out).unwrap());
        assert_eq!(out.len(), 2);
        let s = &out[0];
        assert_eq!(s.state, TcpState::Established);
        assert_eq!(s.local, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(s.remote, "10.0.0.1:5432".parse().unwrap());
        assert_eq!((s.rqueue, s.inode), (7, 999));
        assert_eq!(s.last_data_ms, Some(1200));
        assert_eq!(s.rtt_us, Some(250));
        assert_eq!(s.retransmits, 3);
        assert_eq!(out[1].state, TcpState::Listen);
        assert_eq!(out[1].rtt_us, None);
    }

    #[test]
    fn short_tcp_info_keeps_what_is_there() {
        let info = vec![0u8; 60]; // a kernel older than rtt: only the last_data fields
        let mut out = Vec::new();
        parse_batch(
            &message(1, SOCK_DIAG_BY_FAMILY, &diag_msg(1, Some(&info))),
            1,
            &mut out,
        )
        .unwrap();
        assert_eq!(out[0].last_data_ms, Some(0));
        assert_eq!(out[0].rtt_us, None);
    }

    #[test]
    fn kernel_errors_and_garbage_are_errors_not_panics() {
        let err = message(1, NLMSG_ERROR, &(-2i32).to_ne_bytes());
        assert!(matches!(
            parse_batch(&err, 1, &mut Vec::new()),
            Err(SockDiagError::Kernel(nix::Error::ENOENT))
        ));
        let mut bad = message(1, SOCK_DIAG_BY_FAMILY, &diag_msg(1, None));
        bad[0] = 0xff; // length beyond the buffer
        assert!(parse_batch(&bad, 1, &mut Vec::new()).is_err());
        let short = message(1, SOCK_DIAG_BY_FAMILY, &[0u8; 10]);
        assert!(parse_batch(&short, 1, &mut Vec::new()).is_err());
        let mut attr = diag_msg(1, Some(&[0u8; 8]));
        attr[INET_DIAG_MSG_LEN] = 200; // attribute longer than the message
        assert!(parse_batch(&message(1, SOCK_DIAG_BY_FAMILY, &attr), 1, &mut Vec::new()).is_err());
        // Another request's messages are skipped.
        let mut out = Vec::new();
        parse_batch(
            &message(7, SOCK_DIAG_BY_FAMILY, &diag_msg(1, None)),
            1,
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn the_request_asks_for_every_connection_state_but_not_bound_inactive_sockets() {
        for state in 1..=12 {
            assert_ne!(TCP_STATES & (1 << state), 0, "state {state}");
        }
        assert_eq!(TCP_STATES & (1 << 13), 0, "would walk the bind hash");
    }

    #[test]
    fn sockstat_gives_tcp_per_family_and_udp() {
        let v4 = "sockets: used 11\nTCP: inuse 3 orphan 0 tw 2 alloc 5 mem 1\nUDP: inuse 4 mem 0\nUDPLITE: inuse 0\n";
        let v6 = "TCP6: inuse 1\nUDP6: inuse 2\nUDPLITE6: inuse 0\n";
        assert_eq!(
            parse_sockstat(v4, v6),
            Some((
                TcpInUse {
                    v4: 3,
                    v6: 1,
                    time_wait: 2
                },
                6
            ))
        );
        assert_eq!(parse_sockstat("garbage", v6), None);
    }

    #[test]
    fn v4_mapped_v6_addresses_are_reported_as_v4() {
        let mut b = [0u8; 16];
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(ipv6(&b), "10.1.2.3".parse::<IpAddr>().unwrap());
    }
}
