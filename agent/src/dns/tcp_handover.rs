//! TCP side of the rolling hand-over (issue #22): before an old agent closes a DNS listener,
//! new connections are steered to its successor's listener in the SO_REUSEPORT group, so that
//! closing it resets nothing. Closing a listener resets every connection still in its accept
//! queue (and every handshake under way on it) unless the host set `net.ipv4.tcp_migrate_req`;
//! unlike UDP (a connected socket leaves reuseport selection), a listening socket cannot leave
//! its group without closing. What it can do is install the group's selection program: a
//! classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`) returning the index of the socket that
//! gets each new connection.
//!
//! Must never: steer when the group is not exactly "us and one successor" (a stranger or a
//! second successor makes the index a guess), or leave a steering program that a later
//! successor inherits (every listener installs the neutral program when it binds).

use std::net::SocketAddr;
use std::os::fd::AsFd;

use nix::libc;
use nix::sys::socket::{setsockopt, sockopt::AttachReusePortCbpf};

use super::strangers::parse_proc_net;

/// `BPF_RET | BPF_K`: a one-instruction program returning its constant.
const BPF_RET_K: u16 = 0x06;

/// An index no group reaches: the kernel then picks by the connection's hash, as with no program.
const NEUTRAL: u32 = u32::MAX;

/// Installs `index` as the reuseport group's choice for every new connection (`None`: the
/// kernel's own hash choice). An index beyond the group's members also falls back to the hash.
pub fn select(listener: &impl AsFd, index: Option<u32>) -> std::io::Result<()> {
    let mut program = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: index.unwrap_or(NEUTRAL),
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    setsockopt(listener, AttachReusePortCbpf, &fprog).map_err(std::io::Error::from)
}

/// How many TCP listeners this network namespace has on exactly `addr` (its reuseport group).
pub fn listeners_on(addr: SocketAddr) -> std::io::Result<usize> {
    let file = if addr.is_ipv4() {
        "/proc/self/net/tcp"
    } else {
        "/proc/self/net/tcp6"
    };
    let text = std::fs::read_to_string(file)?;
    Ok(count_listeners(&text, addr))
}

/// `0A` is TCP_LISTEN in /proc/net/tcp.
fn count_listeners(proc_net_tcp: &str, addr: SocketAddr) -> usize {
    parse_proc_net(proc_net_tcp)
        .iter()
        .filter(|(a, state, _)| *a == addr && state == "0A")
        .count()
}

/// Steers new connections away from `listener` (ours, on `addr`) to its successor when the
/// group is exactly the two of us. Members keep the order they joined in, and a member
/// leaving moves the last one into its place, so in a group of two the one that joined after
/// us is at index 1. Returns whether it steered.
pub fn steer_to_successor(listener: &impl AsFd, addr: SocketAddr) -> std::io::Result<bool> {
    if listeners_on(addr)? != 2 {
        return Ok(false);
    }
    select(listener, Some(1))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listeners_on_the_exact_address_count() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 3D00007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1 0 100 0 0 10 0
   1: 3D00007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 102 1 0 100 0 0 10 0
   2: 3D00007F:0035 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0 100 0 0 10 0
   3: 3E00007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 104 1 0 100 0 0 10 0
";
        let addr: SocketAddr = "127.0.0.61:53".parse().unwrap();
        assert_eq!(
            count_listeners(text, addr),
            2,
            "not the connection, not .62"
        );
    }

    /// Two listeners in one group, the first steering to index 1: every new connection is
    /// accepted by the second, none by the first; the neutral program spreads them again.
    #[tokio::test]
    async fn steering_sends_every_new_connection_to_the_successor() {
        let first = crate::listen::tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = crate::listen::tcp(addr).unwrap();
        assert_eq!(listeners_on(addr).unwrap(), 2);
        let (first, second) = (first.into_std().unwrap(), second.into_std().unwrap());
        assert!(steer_to_successor(&first, addr).unwrap());
        let mut clients = Vec::new();
        let mut connect = |n| {
            for _ in 0..n {
                clients.push(std::net::TcpStream::connect(addr).unwrap());
            }
        };
        // Non-blocking listeners: accept until the queue is empty.
        let accepted = |l: &std::net::TcpListener| std::iter::from_fn(|| l.accept().ok()).count();
        connect(50);
        assert_eq!((accepted(&first), accepted(&second)), (0, 50));
        select(&first, None).unwrap();
        connect(50);
        let (a, b) = (accepted(&first), accepted(&second));
        assert_eq!(a + b, 50);
        assert!(a > 0 && b > 0, "spread by hash again: {a} and {b}");
    }
}
