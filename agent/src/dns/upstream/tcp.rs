//! One persistent, pipelined TCP connection per upstream server (RFC 7766 6.2.1): queries are
//! written back to back by a writer task, a reader task hands each answer (2-byte length
//! framing) to the query with its ID, whatever order they come back in. A closed or broken
//! connection fails the queries on it and the next query reconnects; a connection with nothing
//! in flight for `IDLE_TIMEOUT` is closed.
//!
//! Never waits without a bound of its own making: at most `MAX_PIPELINED` queries are queued or
//! in flight per connection, and every wait here runs under the caller's per-attempt timeout.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::dns::wire;

/// A connection with nothing in flight this long is closed: CoreDNS closes idle clients after
/// 10 s by default and unbound after `tcp-idle-timeout` (30 s), so we reconnect rarely and never
/// hold a server's connection slot for nothing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Queries queued or in flight on one connection. Far below the 65,536 IDs, and more than a
/// single kube-dns pod answers at once; the caller's in-flight semaphore bounds the total.
pub const MAX_PIPELINED: usize = 1024;

/// Why a TCP exchange failed.
#[derive(Debug)]
pub enum TcpError {
    Io(io::Error),
    /// The connection closed (or broke) before our answer came.
    Closed,
    /// Every pipelining slot stayed taken for the whole attempt.
    QueueFull,
}

/// The connection to one server, opened on first use.
#[derive(Debug)]
pub struct TcpClient {
    addr: SocketAddr,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// Connections opened so far (the first is not a reconnect).
    opened: AtomicU64,
}

impl TcpClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            conn: tokio::sync::Mutex::new(None),
            opened: Default::default(),
        }
    }

    /// Sends `query` (whose ID this rewrites to one unique on the connection) and returns the
    /// answer with that ID, plus the ID used. `on_connect(reconnect)` is called for every new
    /// connection. A reused connection that turns out to be closed (the server timed it out
    /// just now) is retried once on a fresh one.
    pub async fn exchange(
        &self,
        query: &mut [u8],
        on_connect: impl Fn(bool),
    ) -> Result<(Vec<u8>, u16), TcpError> {
        for attempt in 0..2 {
            let (conn, fresh) = self.connection(&on_connect).await.map_err(TcpError::Io)?;
            match conn.exchange(query).await {
                Err(TcpError::Closed) if !fresh && attempt == 0 => continue,
                other => return other,
            }
        }
        Err(TcpError::Closed)
    }

    async fn connection(&self, on_connect: &impl Fn(bool)) -> io::Result<(Arc<Conn>, bool)> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot
            && !c.closed.is_cancelled()
        {
            return Ok((c.clone(), false));
        }
        let stream = TcpStream::connect(self.addr).await?;
        // Queries are small and latency-bound.
        stream.set_nodelay(true)?;
        let reconnect = self.opened.fetch_add(1, Ordering::Relaxed) > 0;
        on_connect(reconnect);
        let conn = Conn::spawn(stream, self.addr);
        *slot = Some(conn.clone());
        Ok((conn, true))
    }
}

impl Drop for TcpClient {
    fn drop(&mut self) {
        if let Some(c) = self.conn.get_mut().take() {
            c.closed.cancel();
        }
    }
}

// === impl Conn ===

#[derive(Debug)]
struct Conn {
    frames: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u16, oneshot::Sender<Vec<u8>>>>,
    slots: Semaphore,
    closed: CancellationToken,
}

impl Conn {
    fn spawn(stream: TcpStream, addr: SocketAddr) -> Arc<Self> {
        let (frames, rx) = mpsc::channel(MAX_PIPELINED);
        let conn = Arc::new(Self {
            frames,
            pending: Mutex::new(HashMap::new()),
            slots: Semaphore::new(MAX_PIPELINED),
            closed: CancellationToken::new(),
        });
        let (r, w) = stream.into_split();
        tokio::spawn(write_loop(w, rx, conn.closed.clone()));
        tokio::spawn(read_loop(r, conn.clone(), addr));
        conn
    }

    async fn exchange(&self, query: &mut [u8]) -> Result<(Vec<u8>, u16), TcpError> {
        let _slot = tokio::select! {
            s = self.slots.acquire() => s.map_err(|_| TcpError::Closed)?,
            _ = self.closed.cancelled() => return Err(TcpError::Closed),
        };
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut pending = self.pending.lock().expect("pending lock");
            if self.closed.is_cancelled() {
                return Err(TcpError::Closed);
            }
            // Fewer than MAX_PIPELINED of 65,536 IDs are taken: this ends after a try or two.
            let id = loop {
                let id: u16 = rand::random();
                if !pending.contains_key(&id) {
                    break id;
                }
            };
            pending.insert(id, tx);
            id
        };
        // Forget the ID however this ends (answer, timeout dropping this future, close).
        let _guard = PendingGuard { conn: self, id };
        wire::set_id(query, id);
        let frame = wire::tcp_frame(query).ok_or_else(|| {
            TcpError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "query longer than 65535",
            ))
        })?;
        // A slot was free, so there is room in the channel: this never waits.
        self.frames
            .try_send(frame)
            .map_err(|_| TcpError::QueueFull)?;
        tokio::select! {
            r = rx => r.map(|answer| (answer, id)).map_err(|_| TcpError::Closed),
            _ = self.closed.cancelled() => Err(TcpError::Closed),
        }
    }

    fn close(&self) {
        self.closed.cancel();
        // Dropping the senders wakes every waiting query with Closed.
        self.pending.lock().expect("pending lock").clear();
    }
}

struct PendingGuard<'a> {
    conn: &'a Conn,
    id: u16,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.conn
            .pending
            .lock()
            .expect("pending lock")
            .remove(&self.id);
    }
}

/// Writes frames as they come, flushing when no more are queued (so a burst of queries goes
/// out in few segments).
async fn write_loop(w: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>, closed: CancellationToken) {
    let mut w = BufWriter::new(w);
    loop {
        let frame = tokio::select! {
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
            _ = closed.cancelled() => break,
        };
        if w.write_all(&frame).await.is_err() {
            break;
        }
        let mut ok = true;
        while let Ok(f) = rx.try_recv() {
            if w.write_all(&f).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok || w.flush().await.is_err() {
            break;
        }
    }
    closed.cancel();
    let _ = w.into_inner().shutdown().await;
}

/// Reads answers and hands each to its query; closes on EOF, error, a bad frame, or idleness.
async fn read_loop(mut r: OwnedReadHalf, conn: Arc<Conn>, addr: SocketAddr) {
    let why = loop {
        let mut len = [0u8; 2];
        let read = tokio::select! {
            res = tokio::time::timeout(IDLE_TIMEOUT, r.read_exact(&mut len)) => res,
            _ = conn.closed.cancelled() => break "closed",
        };
        match read {
            Err(_) => {
                if conn.pending.lock().expect("pending lock").is_empty() {
                    break "idle";
                }
                // Queries are waiting: their own timeouts decide, not idleness.
                continue;
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break "closed by the server",
            Ok(Err(_)) => break "read error",
            Ok(Ok(_)) => {}
        }
        let n = u16::from_be_bytes(len) as usize;
        if n < wire::HEADER_LEN {
            break "answer shorter than a header";
        }
        let mut buf = vec![0u8; n];
        let body = tokio::select! {
            res = r.read_exact(&mut buf) => res,
            _ = conn.closed.cancelled() => break "closed",
        };
        if body.is_err() {
            break "read error";
        }
        let id = wire::id(&buf);
        let waiter = conn.pending.lock().expect("pending lock").remove(&id);
        match waiter {
            Some(tx) => {
                let _ = tx.send(buf);
            }
            // An answer after its query timed out: harmless.
            None => tracing::debug!(upstream = %addr, id, "TCP answer for no waiting query"),
        }
    };
    tracing::debug!(upstream = %addr, why, "upstream TCP connection closed");
    conn.close();
}
