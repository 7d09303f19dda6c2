//! Batched UDP I/O for the listeners: one `recvmmsg` takes up to `BATCH` queued queries and one
//! `sendmmsg` sends their answers, so under load the cost of crossing into the kernel is paid
//! once per batch instead of twice per query (the largest share of a cache hit's cost). At low
//! load a batch is one datagram and this costs what `recvfrom`/`sendto` did.
//!
//! Uses nix's safe wrappers (the crate forbids `unsafe`). Their header arrays hold raw pointers
//! and so cannot live across an `.await` in a task: they are built per system call, a small
//! allocation amortised over the batch.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage, recvmmsg, sendmmsg,
};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Longest query accepted over UDP. Real queries are a few hundred bytes (EDNS padding goes
/// to 468); longer datagrams arrive cut short (MSG_TRUNC) and are dropped.
pub const MAX_QUERY: usize = 4096;

/// Receive buffers, the senders' addresses, and the answers to send back to them.
pub struct Batch {
    bufs: Box<[u8]>,
    lens: [usize; BATCH],
    cut: [bool; BATCH],
    peers: [Option<SockaddrStorage>; BATCH],
    received: usize,
    outs: Vec<Vec<u8>>,
    /// Slots whose `outs` entry is an answer to send, in order; `sent` of them are gone.
    replies: Vec<usize>,
    sent: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Self {
        Self {
            bufs: vec![0; BATCH * MAX_QUERY].into_boxed_slice(),
            lens: [0; BATCH],
            cut: [false; BATCH],
            peers: [None; BATCH],
            received: 0,
            outs: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            replies: Vec::with_capacity(BATCH),
            sent: 0,
        }
    }

    /// Receives up to `BATCH` datagrams without blocking; `WouldBlock` when none is queued.
    /// Answers still queued from the previous batch are given up.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.replies.clear();
        self.sent = 0;
        self.received = 0;
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut iovs: Vec<[IoSliceMut; 1]> = self
            .bufs
            .chunks_mut(MAX_QUERY)
            .map(|c| [IoSliceMut::new(c)])
            .collect();
        let got = recvmmsg(fd, &mut headers, &mut iovs, MsgFlags::MSG_DONTWAIT, None)?;
        let mut n = 0;
        for (i, m) in got.enumerate() {
            self.lens[i] = m.bytes;
            self.cut[i] = m.flags.contains(MsgFlags::MSG_TRUNC);
            self.peers[i] = m.address;
            n = i + 1;
        }
        self.received = n;
        Ok(n)
    }

    /// Datagram `i` of the last batch and the buffer for its answer (cleared); `None` when the
    /// datagram was longer than `MAX_QUERY`.
    pub fn slot(&mut self, i: usize) -> Option<(&[u8], &mut Vec<u8>)> {
        assert!(
            i < self.received,
            "slot {i} of a batch of {}",
            self.received
        );
        if self.cut[i] {
            return None;
        }
        let query = &self.bufs[i * MAX_QUERY..i * MAX_QUERY + self.lens[i]];
        let out = &mut self.outs[i];
        out.clear();
        Some((query, out))
    }

    /// The sender of datagram `i`.
    pub fn peer(&self, i: usize) -> Option<SocketAddr> {
        let p = self.peers[i].as_ref()?;
        p.as_sockaddr_in()
            .map(|a| SocketAddr::V4((*a).into()))
            .or_else(|| p.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into())))
    }

    /// Marks `outs[i]` as the answer to send to datagram `i`'s sender (if it has an address).
    pub fn reply(&mut self, i: usize) {
        if self.peers[i].is_some_and(|p| p.len() > 0) {
            self.replies.push(i);
        }
    }

    /// True while queued answers are left to send.
    pub fn pending(&self) -> bool {
        self.sent < self.replies.len()
    }

    /// Sends queued answers without blocking; returns how many went. `WouldBlock` when the
    /// socket buffer is full; any other error concerns the first answer left, which the caller
    /// skips with `skip_one`.
    pub fn send(&mut self, fd: RawFd) -> io::Result<usize> {
        let todo = &self.replies[self.sent..];
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(todo.len(), None);
        let iovs: Vec<[IoSlice; 1]> = todo
            .iter()
            .map(|&i| [IoSlice::new(&self.outs[i])])
            .collect();
        let addrs: Vec<Option<SockaddrStorage>> = todo.iter().map(|&i| self.peers[i]).collect();
        let no_control: [ControlMessage; 0] = [];
        let n = sendmmsg(
            fd,
            &mut headers,
            &iovs,
            &addrs,
            no_control,
            MsgFlags::MSG_DONTWAIT,
        )?
        .count();
        self.sent += n;
        Ok(n)
    }

    /// Gives up on the first answer left (its send failed).
    pub fn skip_one(&mut self) {
        self.sent = (self.sent + 1).min(self.replies.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_is_received_answered_to_each_sender_and_long_datagrams_are_flagged() {
        for ip in ["127.0.0.1", "::1"] {
            let server = std::net::UdpSocket::bind((ip, 0)).unwrap();
            let at = server.local_addr().unwrap();
            let clients: Vec<_> = (0..5)
                .map(|_| std::net::UdpSocket::bind((ip, 0)).unwrap())
                .collect();
            for (k, c) in clients.iter().enumerate() {
                c.send_to(&[k as u8; 10], at).unwrap();
            }
            clients[0].send_to(&vec![7u8; MAX_QUERY + 1], at).unwrap();
            let mut b = Batch::new();
            let n = b.recv(server.as_raw_fd()).unwrap();
            assert_eq!(n, 6);
            for (k, c) in clients.iter().enumerate() {
                assert_eq!(b.peer(k), Some(c.local_addr().unwrap()));
                let (q, out) = b.slot(k).unwrap();
                assert_eq!(q, &[k as u8; 10]);
                out.extend_from_slice(&[q[0] + 100; 3]);
                b.reply(k);
            }
            assert!(b.slot(5).is_none(), "longer than MAX_QUERY");
            assert_eq!(b.send(server.as_raw_fd()).unwrap(), 5);
            assert!(!b.pending());
            for (k, c) in clients.iter().enumerate() {
                let mut buf = [0u8; 16];
                let (m, from) = c.recv_from(&mut buf).unwrap();
                assert_eq!((&buf[..m], from), (&[k as u8 + 100; 3][..], at));
            }
            let e = b.recv(server.as_raw_fd()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
    }
}
