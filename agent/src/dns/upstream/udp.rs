//! Shared UDP sockets per upstream server. A fresh socket per query (bind, connect, register,
//! close) cost more than the rest of a cache miss together; instead each server has `SOCKETS`
//! connected sockets on kernel-chosen random ports, each carrying many queries told apart by
//! random IDs, and each retired after `ROTATE_AFTER` queries so the source ports keep moving:
//! a blind spoofer still has to hit a port among the ephemeral range and an ID that is pending
//! on it. A retired socket stays open until its last query is answered or given up.
//!
//! One reader task per socket validates every datagram against the query pending under its ID
//! (`wire::outgoing::Prepared::validate`: QR, opcode, question) and hands the answer over; anything else
//! is counted as rejected and the query keeps waiting for the real answer until its timeout.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, oneshot};

use crate::dns::udp_batch::{ANSWERS, recv_answers};
use crate::dns::wire::{
    self,
    outgoing::{Prepared, Rejected},
};

/// Sockets per server in use at once.
pub const SOCKETS: usize = 4;
/// Queries one socket carries before it is replaced by one on a new random port.
pub const ROTATE_AFTER: u32 = 256;

thread_local! {
    /// `send_with_id`'s buffer: a query given its ID here, inside one synchronous send, instead
    /// of in a copy of its own per exchange (#22-k).
    static WITH_ID: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sends `query` with the ID `id` (what `UdpSocket::send` does, the copy made in a buffer of
/// the thread's, never held across an await).
async fn send_with_id(socket: &UdpSocket, query: &[u8], id: u16) -> io::Result<()> {
    loop {
        socket.writable().await?;
        let sent = WITH_ID.with_borrow_mut(|buf| {
            buf.clear();
            buf.extend_from_slice(query);
            wire::set_id(buf, id);
            socket.try_send(buf)
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Why one UDP exchange failed.
#[derive(Debug)]
pub enum UdpError {
    /// Opening the socket or sending failed, or the server refused (ICMP port unreachable).
    Io(io::Error),
    /// No valid answer within the timeout; `rejected` is the last datagram turned away for
    /// this query (or, for a wrong ID, on its socket while it waited).
    Timeout { rejected: Option<Rejected> },
}

/// Called with every datagram turned away (it counts `dns_upstream_rejected_responses`).
pub type OnRejected = Arc<dyn Fn(Rejected) + Send + Sync>;

/// The sockets of one server.
pub struct UdpClient {
    addr: SocketAddr,
    slots: Mutex<[Option<Arc<Sock>>; SOCKETS]>,
    next: AtomicUsize,
    on_rejected: OnRejected,
}

impl std::fmt::Debug for UdpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpClient")
            .field("addr", &self.addr)
            .finish()
    }
}

impl UdpClient {
    pub fn new(addr: SocketAddr, on_rejected: OnRejected) -> Self {
        Self {
            addr,
            slots: Mutex::new(Default::default()),
            next: AtomicUsize::new(0),
            on_rejected,
        }
    }

    /// Sends `p` with an ID unique on its socket and waits up to `timeout` for its valid
    /// answer.
    pub async fn exchange(
        &self,
        p: &Arc<Prepared>,
        timeout: Duration,
    ) -> Result<Vec<u8>, UdpError> {
        let sock = self.socket().map_err(UdpError::Io)?;
        let (tx, rx) = oneshot::channel();
        let id = sock.register(p.clone(), tx);
        // Forget the ID however this ends (answer, timeout, the caller dropping this future).
        let guard = Registered { sock: &sock, id };
        send_with_id(&sock.socket, &p.bytes, id)
            .await
            .map_err(UdpError::Io)?;
        let since = std::time::Instant::now();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer.map_err(UdpError::Io),
            // The reader ended (its socket broke): as good as no answer.
            Ok(Err(_)) | Err(_) => {
                let rejected = guard.forget().or_else(|| sock.wrong_id_since(since));
                Err(UdpError::Timeout { rejected })
            }
        }
    }

    /// A socket with room for another query: round robin over the slots, opening one where a
    /// slot is empty or its socket has carried `ROTATE_AFTER` queries.
    fn socket(&self) -> io::Result<Arc<Sock>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % SOCKETS;
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some(s) = &slots[i]
            && s.sent.fetch_add(1, Ordering::Relaxed) < ROTATE_AFTER
            && !s.broken.load(Ordering::Relaxed)
        {
            return Ok(s.clone());
        }
        if let Some(old) = slots[i].take() {
            old.retire();
        }
        let sock = Sock::open(self.addr)?;
        sock.sent.store(1, Ordering::Relaxed);
        tokio::spawn(read_loop(sock.clone(), self.on_rejected.clone()));
        slots[i] = Some(sock.clone());
        Ok(sock)
    }
}

impl Drop for UdpClient {
    fn drop(&mut self) {
        // The server is gone from every group: let the readers end with their last queries.
        for s in self.slots.get_mut().expect("slots lock").iter_mut() {
            if let Some(s) = s.take() {
                s.retire();
            }
        }
    }
}

type Answer = io::Result<Vec<u8>>;

#[derive(Debug)]
struct Waiter {
    query: Arc<Prepared>,
    tx: Option<oneshot::Sender<Answer>>,
    rejected: Option<Rejected>,
}

#[derive(Debug)]
struct Sock {
    socket: UdpSocket,
    pending: Mutex<HashMap<u16, Waiter>>,
    sent: AtomicU32,
    /// No new queries; the reader ends once nothing is pending.
    retired: AtomicBool,
    /// The reader ended on an error: replace this socket.
    broken: AtomicBool,
    /// Wakes the reader to check `retired` against `pending`.
    wake: Notify,
    /// When a datagram with an ID nobody waits for last came (a spoofer, or an answer that
    /// came after its query gave up).
    last_wrong_id: Mutex<Option<std::time::Instant>>,
}

impl Sock {
    fn open(addr: SocketAddr) -> io::Result<Arc<Self>> {
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(bind)?;
        // Connected: the kernel drops datagrams from any other address, and reports the
        // server's ICMP port unreachable as ECONNREFUSED.
        socket.connect(addr)?;
        socket.set_nonblocking(true)?;
        Ok(Arc::new(Self {
            socket: UdpSocket::from_std(socket)?,
            pending: Mutex::new(HashMap::new()),
            sent: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            wake: Notify::new(),
            last_wrong_id: Mutex::new(None),
        }))
    }

    /// Registers `query` under a random ID not pending on this socket.
    fn register(&self, query: Arc<Prepared>, tx: oneshot::Sender<Answer>) -> u16 {
        let mut pending = self.pending.lock().expect("pending lock");
        // The caller's in-flight bound keeps this far below 65,536 IDs: a try or two.
        let id = loop {
            let id: u16 = rand::random();
            if !pending.contains_key(&id) {
                break id;
            }
        };
        pending.insert(
            id,
            Waiter {
                query,
                tx: Some(tx),
                rejected: None,
            },
        );
        id
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn done(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
            && self.pending.lock().expect("pending lock").is_empty()
    }

    fn wrong_id_since(&self, since: std::time::Instant) -> Option<Rejected> {
        self.last_wrong_id
            .lock()
            .expect("wrong id lock")
            .filter(|&t| t >= since)
            .map(|_| Rejected::Id)
    }
}

/// Removes its query's entry when dropped.
struct Registered<'a> {
    sock: &'a Sock,
    id: u16,
}

impl Registered<'_> {
    /// Removes the entry now and returns why datagrams for it were turned away.
    fn forget(self) -> Option<Rejected> {
        self.take().and_then(|w| w.rejected)
    }

    /// Removes the entry; the reader of a retired socket is woken to see whether that was the
    /// last one (however the query ended: answer, timeout, or the caller going away).
    fn take(&self) -> Option<Waiter> {
        let w = self
            .sock
            .pending
            .lock()
            .expect("pending lock")
            .remove(&self.id);
        if w.is_some() && self.sock.retired.load(Ordering::Relaxed) {
            self.sock.wake.notify_one();
        }
        w
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.take();
    }
}

/// Receives datagrams and hands each valid answer to its query until the socket is retired
/// with nothing pending, or breaks (every pending query then fails with the error).
///
/// Several datagrams per `recvmmsg`; one that comes back short emptied the queue, and the
/// read readiness is cleared with it (the closure says `WouldBlock`; tokio keeps the readiness
/// if a new event came since the read began), so an answer costs no empty read (issue #22,
/// #22-j).
async fn read_loop(sock: Arc<Sock>, on_rejected: OnRejected) {
    let fd = sock.socket.as_raw_fd();
    loop {
        if sock.done() {
            return;
        }
        // READABLE and ERROR, as tokio's `recv`: an ICMP port unreachable raises only
        // EPOLLERR. A short batch says `WouldBlock`: `async_io` clears the readiness and waits
        // for the next datagram without an empty read; a full one returns to check `done`.
        let r = tokio::select! {
            r = sock.socket.async_io(Interest::READABLE | Interest::ERROR, || {
                let got = recv_answers(fd, |answer| hand_over(&sock, answer, &on_rejected))?;
                if got < ANSWERS {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            }) => r,
            _ = sock.wake.notified() => continue,
        };
        if let Err(e) = r {
            // ECONNREFUSED (port unreachable) and the like concern every query sent to this
            // server from this socket: fail them now rather than at their timeout.
            sock.broken.store(true, Ordering::Relaxed);
            let waiters: Vec<_> = sock.pending.lock().expect("pending lock").drain().collect();
            for (_, mut w) in waiters {
                if let Some(tx) = w.tx.take() {
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
            return;
        }
    }
}

/// Hands one datagram to the query pending under its ID, if it is that query's valid answer.
fn hand_over(sock: &Sock, answer: &[u8], on_rejected: &OnRejected) {
    if answer.len() < wire::HEADER_LEN {
        on_rejected(Rejected::Short);
        return;
    }
    let mut pending = sock.pending.lock().expect("pending lock");
    let Some(w) = pending.get_mut(&wire::id(answer)) else {
        drop(pending);
        *sock.last_wrong_id.lock().expect("wrong id lock") = Some(std::time::Instant::now());
        on_rejected(Rejected::Id);
        return;
    };
    match w.query.validate(answer, wire::id(answer)) {
        Ok(()) => {
            if let Some(tx) = w.tx.take() {
                // An exact-size copy: the answer may live long in the cache.
                let _ = tx.send(Ok(answer.to_vec()));
            }
        }
        Err(why) => {
            w.rejected = Some(why);
            drop(pending);
            on_rejected(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::RecordType;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicU32;

    /// A responder on loopback: answers every query after `delay` (QR set), in arrival order
    /// reversed per burst when `reverse`, and records the source ports it saw.
    async fn responder(delay: Duration, reverse: bool) -> (SocketAddr, Arc<Mutex<HashSet<u16>>>) {
        let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let at = sock.local_addr().unwrap();
        let ports = Arc::new(Mutex::new(HashSet::new()));
        let seen = ports.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let mut burst = Vec::new();
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                burst.push((buf[..n].to_vec(), from));
                while let Ok((n, from)) = sock.try_recv_from(&mut buf) {
                    burst.push((buf[..n].to_vec(), from));
                }
                if reverse {
                    burst.reverse();
                }
                for (mut q, from) in burst {
                    seen.lock().unwrap().insert(from.port());
                    q[2] |= 0x80;
                    let sock = sock.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = sock.send_to(&q, from).await;
                    });
                }
            }
        });
        (at, ports)
    }

    fn prepared(name: &str) -> Arc<Prepared> {
        Arc::new(Prepared::new(&wire::build::probe_query(name, RecordType::A), false).unwrap())
    }

    fn counting() -> (OnRejected, Arc<AtomicU32>) {
        let n = Arc::new(AtomicU32::new(0));
        let c = n.clone();
        (
            Arc::new(move |why| {
                assert_eq!(why, Rejected::Id);
                c.fetch_add(1, Ordering::SeqCst);
            }),
            n,
        )
    }

    #[tokio::test]
    async fn queries_share_a_few_sockets_whose_ports_rotate_and_retired_ones_close() {
        let (at, ports) = responder(Duration::ZERO, false).await;
        let (on_rejected, rejected) = counting();
        let client = UdpClient::new(at, on_rejected);
        let queries = 2 * SOCKETS * ROTATE_AFTER as usize;
        let mut weak = Vec::new();
        for i in 0..queries {
            let p = prepared(&format!("n{i}.test"));
            let answer = client.exchange(&p, Duration::from_secs(2)).await.unwrap();
            assert!(p.validate(&answer, wire::id(&answer)).is_ok());
            if i % ROTATE_AFTER as usize == 0 {
                let slots = client.slots.lock().unwrap();
                for s in slots.iter().flatten() {
                    if !weak
                        .iter()
                        .any(|w: &std::sync::Weak<Sock>| w.ptr_eq(&Arc::downgrade(s)))
                    {
                        weak.push(Arc::downgrade(s));
                    }
                }
            }
        }
        let ports = ports.lock().unwrap().len();
        assert!(
            (SOCKETS + 1..=2 * SOCKETS + 1).contains(&ports),
            "{queries} queries over {ports} source ports"
        );
        // Readers of retired sockets end with their last query: only the live ones remain.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let alive = weak.iter().filter(|w| w.strong_count() > 0).count();
        assert!(alive <= SOCKETS, "{alive} sockets still open");
        assert_eq!(rejected.load(Ordering::SeqCst), 0);
        drop(client);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(weak.iter().filter(|w| w.strong_count() > 0).count(), 0);
    }

    #[tokio::test]
    async fn a_retired_socket_whose_last_query_timed_out_closes() {
        // Never answers: every query times out.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (on_rejected, _) = counting();
        let client = UdpClient::new(silent.local_addr().unwrap(), on_rejected);
        let first: Vec<_> = {
            client
                .exchange(&prepared("first.test"), Duration::from_millis(1))
                .await
                .unwrap_err();
            let slots = client.slots.lock().unwrap();
            slots.iter().flatten().map(Arc::downgrade).collect()
        };
        // All at once: the first socket is retired while its queries still wait, and the last
        // of them ends by timing out.
        let queries: Vec<_> = (0..SOCKETS * ROTATE_AFTER as usize)
            .map(|i| prepared(&format!("t{i}.test")))
            .collect();
        let results = futures::future::join_all(
            queries
                .iter()
                .map(|p| client.exchange(p, Duration::from_millis(200))),
        )
        .await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(UdpError::Timeout { .. })))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].strong_count(),
            0,
            "the first socket was retired and its reader ended"
        );
    }

    #[tokio::test]
    async fn concurrent_queries_get_their_own_answers_in_any_order() {
        let (at, _) = responder(Duration::from_millis(20), true).await;
        let (on_rejected, rejected) = counting();
        let client = Arc::new(UdpClient::new(at, on_rejected));
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let p = prepared(&format!("c{i}.test"));
                    let answer = client.exchange(&p, Duration::from_secs(2)).await.unwrap();
                    p.validate(&answer, wire::id(&answer))
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
        assert_eq!(rejected.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_answer_after_the_timeout_is_counted_as_rejected_and_a_refusal_fails_fast() {
        let (at, _) = responder(Duration::from_millis(200), false).await;
        let (on_rejected, rejected) = counting();
        let client = UdpClient::new(at, on_rejected);
        let r = client
            .exchange(&prepared("late.test"), Duration::from_millis(50))
            .await;
        assert!(
            matches!(r, Err(UdpError::Timeout { rejected: None })),
            "{r:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rejected.load(Ordering::SeqCst), 1, "the late answer");

        // A closed port: ICMP port unreachable fails the query long before its timeout.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let (on_rejected, _) = counting();
        let client = UdpClient::new(addr, on_rejected);
        let started = std::time::Instant::now();
        let r = client
            .exchange(&prepared("refused.test"), Duration::from_secs(5))
            .await;
        assert!(
            matches!(&r, Err(UdpError::Io(e)) if e.kind() == io::ErrorKind::ConnectionRefused),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        // The broken socket is replaced: the next query is refused again, not stuck.
        let r = client
            .exchange(&prepared("again.test"), Duration::from_secs(5))
            .await;
        assert!(matches!(r, Err(UdpError::Io(_))), "{r:?}");
    }
}
