//! Listening sockets. DNS listeners ([`tcp`], [`udp`]) set SO_REUSEPORT: during a DaemonSet
//! rollout with `maxSurge: 1` the new agent binds the same DNS addresses while the old one still
//! runs, and the kernel hands queries to whichever is listening, so no query is lost. The
//! metrics and gRPC listeners ([`tcp_exclusive`]) do not: any root process on the host network
//! could otherwise join their port and answer scrapes or RPCs (issue #15); a starting agent
//! instead waits for its predecessor to release them ([`tcp_exclusive_when_free`]).

use std::net::SocketAddr;
use std::time::Duration;

/// How long a starting agent waits for a predecessor (the old pod of a rolling update) to
/// release the metrics and gRPC ports: the old pod's lame duck and shutdown fit in its 30 s
/// termination grace; the rest is margin for kubelet to send SIGTERM.
pub const PREDECESSOR_WAIT: Duration = Duration::from_secs(45);
/// How often the port is tried again while it is in use.
const BIND_RETRY: Duration = Duration::from_millis(200);

/// A non-blocking TCP listener on `addr` for tokio, sharing its port (SO_REUSEPORT): DNS only.
pub fn tcp(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tcp_with(addr, true)
}

/// A non-blocking TCP listener on `addr` that no other socket can join (no SO_REUSEPORT): a
/// second bind of the port fails with EADDRINUSE, whatever options it sets.
pub fn tcp_exclusive(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tcp_with(addr, false)
}

/// [`tcp_exclusive`], retried while the port is in use, for up to `wait`; then the error.
pub async fn tcp_exclusive_when_free(
    addr: SocketAddr,
    wait: Duration,
) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut logged = false;
    loop {
        match tcp_exclusive(addr) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                if !logged {
                    tracing::info!(%addr, wait = ?wait, "port in use (a predecessor still serving?); waiting for it");
                    logged = true;
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
            r => return r,
        }
    }
}

fn tcp_with(addr: SocketAddr, reuse_port: bool) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    // SO_REUSEADDR only lets a restart bind over TIME_WAIT; on Linux it never lets two
    // listeners share a port.
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// A non-blocking UDP socket on `addr` for tokio.
pub fn udp(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    // Bursts of queries arrive faster than one task drains them: a larger buffer drops fewer.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn two_listeners_share_a_port_and_a_plain_one_cannot() {
        let a = super::tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let _b = super::tcp(addr).expect("a successor binds the same port");
        assert!(std::net::TcpListener::bind(addr).is_err());
        let u = super::udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let _v = super::udp(u.local_addr().unwrap()).unwrap();
    }
}
