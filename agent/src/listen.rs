//! Listening sockets with SO_REUSEPORT: during a DaemonSet rollout with `maxSurge: 1` the new
//! agent binds the same ports (metrics, gRPC, DNS) while the old one still runs, and the kernel
//! hands new connections to whichever is listening. Only sockets that also set SO_REUSEPORT
//! (and belong to the same user) can share a port; anything else still gets EADDRINUSE.

use std::net::SocketAddr;

/// A non-blocking TCP listener on `addr` for tokio.
pub fn tcp(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_port(true)?;
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
