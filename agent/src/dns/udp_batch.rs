//! Batched UDP I/O for the listeners: one `recvmmsg` takes up to `BATCH` queued queries and one
//! `sendmmsg` sends their answers, so under load the cost of crossing into the kernel is paid
//! once per batch instead of twice per query (the largest share of a cache hit's cost). At low
//! load a batch is one datagram and this costs what `recvfrom`/`sendto` did.
//!
//! Uses nix's safe wrappers (the crate forbids `unsafe`). Their header arrays hold raw pointers
//! and so cannot live in a task across an `.await`; allocating them per call cost more than the
//! rest of a cache miss (6 KiB per call: glibc consolidates its free lists on every such
//! request), so each worker thread keeps its own, used only inside one synchronous call. The
//! receive headers are kept per address family: the kernel leaves the last sender's address
//! length in them, which is the right buffer size only for the same family.
//!
//! `recv_answers` does the same for the forwarder's connected upstream sockets.

use std::cell::RefCell;
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

thread_local! {
    static RECV_V4: RefCell<MultiHeaders<SockaddrStorage>> = RefCell::new(MultiHeaders::preallocate(BATCH, None));
    static RECV_V6: RefCell<MultiHeaders<SockaddrStorage>> = RefCell::new(MultiHeaders::preallocate(BATCH, None));
    static SEND: RefCell<MultiHeaders<SockaddrStorage>> = RefCell::new(MultiHeaders::preallocate(BATCH, None));
}

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
    /// Answers still queued from the previous batch are given up. `ipv6`: the socket's family.
    pub fn recv(&mut self, fd: RawFd, ipv6: bool) -> io::Result<usize> {
        self.replies.clear();
        self.sent = 0;
        self.received = 0;
        let (bufs, lens, cut, peers) = (
            &mut self.bufs,
            &mut self.lens,
            &mut self.cut,
            &mut self.peers,
        );
        let headers = if ipv6 { &RECV_V6 } else { &RECV_V4 };
        let n = headers.with_borrow_mut(|headers| -> io::Result<usize> {
            let mut chunks = bufs.chunks_mut(MAX_QUERY);
            let mut iovs: [[IoSliceMut; 1]; BATCH] = std::array::from_fn(|_| {
                [IoSliceMut::new(
                    chunks.next().expect("BATCH chunks of MAX_QUERY"),
                )]
            });
            let got = recvmmsg(fd, headers, &mut iovs, MsgFlags::MSG_DONTWAIT, None)?;
            let mut n = 0;
            for (i, m) in got.enumerate() {
                lens[i] = m.bytes;
                cut[i] = m.flags.contains(MsgFlags::MSG_TRUNC);
                peers[i] = m.address;
                n = i + 1;
            }
            Ok(n)
        })?;
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
        let iovs: [[IoSlice; 1]; BATCH] = std::array::from_fn(|k| {
            [IoSlice::new(
                todo.get(k).map_or(&[][..], |&i| &self.outs[i]),
            )]
        });
        let mut addrs = [None; BATCH];
        for (a, &i) in addrs.iter_mut().zip(todo) {
            *a = self.peers[i];
        }
        let no_control: [ControlMessage; 0] = [];
        // sendmmsg takes as many messages as there are addresses: the first todo.len().
        let n = SEND.with_borrow_mut(|headers| -> io::Result<usize> {
            Ok(sendmmsg(
                fd,
                headers,
                &iovs,
                &addrs[..todo.len()],
                no_control,
                MsgFlags::MSG_DONTWAIT,
            )?
            .count())
        })?;
        self.sent += n;
        Ok(n)
    }

    /// Gives up on the first answer left (its send failed).
    pub fn skip_one(&mut self) {
        self.sent = (self.sent + 1).min(self.replies.len());
    }
}

// === upstream answers ===

/// Upstream answers taken per system call by `recv_answers`.
pub const ANSWERS: usize = 4;
/// Largest UDP datagram.
const MAX_ANSWER: usize = 65_535;

thread_local! {
    /// `recv_answers`' buffers: every reader on this worker thread shares them, each only
    /// inside one synchronous call (a reader's own 64 KiB buffer cost as much per socket).
    static ANSWER_BUFS: RefCell<(Box<[u8]>, MultiHeaders<()>)> = RefCell::new((
        vec![0; ANSWERS * MAX_ANSWER].into_boxed_slice(),
        MultiHeaders::preallocate(ANSWERS, None),
    ));
}

/// Receives up to `ANSWERS` datagrams from a connected socket without blocking and hands each
/// to `each` (which must not call this again); `WouldBlock` when none is queued. Returns how
/// many came: fewer than `ANSWERS` means the queue was empty after them, which spares the
/// empty read that would otherwise be needed to learn it.
pub fn recv_answers(fd: RawFd, mut each: impl FnMut(&[u8])) -> io::Result<usize> {
    ANSWER_BUFS.with_borrow_mut(|(bufs, headers)| {
        let mut lens = [0usize; ANSWERS];
        let mut n = 0;
        {
            let mut chunks = bufs.chunks_mut(MAX_ANSWER);
            let mut iovs: [[IoSliceMut; 1]; ANSWERS] = std::array::from_fn(|_| {
                [IoSliceMut::new(
                    chunks.next().expect("ANSWERS chunks of MAX_ANSWER"),
                )]
            });
            let got = recvmmsg(fd, headers, &mut iovs, MsgFlags::MSG_DONTWAIT, None)?;
            for (i, m) in got.enumerate() {
                lens[i] = m.bytes;
                n = i + 1;
            }
        }
        for (i, &len) in lens[..n].iter().enumerate() {
            each(&bufs[i * MAX_ANSWER..i * MAX_ANSWER + len]);
        }
        Ok(n)
    })
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
            let n = b.recv(server.as_raw_fd(), ip == "::1").unwrap();
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
            let e = b.recv(server.as_raw_fd(), ip == "::1").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
    }

    #[test]
    fn answers_are_taken_several_per_call_until_the_queue_is_empty() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let to = client.local_addr().unwrap();
        let big = vec![9u8; 20_000];
        for k in 0..ANSWERS + 1 {
            let d = if k == 1 {
                big.clone()
            } else {
                vec![k as u8; 10]
            };
            server.send_to(&d, to).unwrap();
        }
        let mut seen = Vec::new();
        let fd = client.as_raw_fd();
        assert_eq!(
            recv_answers(fd, |a| seen.push(a.to_vec())).unwrap(),
            ANSWERS
        );
        assert_eq!(
            recv_answers(fd, |a| seen.push(a.to_vec())).unwrap(),
            1,
            "short: the queue is empty"
        );
        assert_eq!(seen.len(), ANSWERS + 1);
        assert_eq!(seen[1], big);
        for (k, a) in seen.iter().enumerate().filter(|(k, _)| *k != 1) {
            assert_eq!(a, &vec![k as u8; 10]);
        }
        let e = recv_answers(fd, |_| panic!("nothing queued")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
