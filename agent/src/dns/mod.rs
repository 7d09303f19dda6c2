//! NodeLocal DNS cache: a caching forwarder on a link-local address (and optionally the
//! kube-dns ClusterIP), with the node wiring (dummy interface, NOTRACK/ACCEPT rules) that makes
//! pods reach it, and fail-open behaviour when it stops. See docs/dns.md.
//!
//! Lifecycle: bring up the addresses -> bind every listener (SO_REUSEPORT; on failure the
//! rules stay out, so pods keep kube-dns, and binding is retried with backoff) -> install the
//! rules that steer pods here -> serve, re-checking the
//! wiring and upstream health every `node.checkInterval` -> on shutdown keep answering for
//! `lameDuck` while reporting not ready, close the listeners, and tear the wiring down unless
//! a successor already answers on the same addresses (rolling update with maxSurge).

pub mod cache;
pub mod config;
pub mod kube_dns;
pub mod metrics;
pub mod node;
pub mod resolv_conf;
pub mod scrub;
pub mod server;
pub mod strangers;
pub mod tcp_handover;
pub mod udp_batch;
pub mod upstream;
pub mod wire;

/// Per-thread counts of the work done per query, for the tests that pin "once per query"
/// (a current-thread runtime runs a whole miss on the test's thread).
#[cfg(test)]
pub(crate) mod counting {
    use std::cell::Cell;

    thread_local! {
        /// `wire::parse_query` calls on this thread.
        pub static PARSES: Cell<u64> = const { Cell::new(0) };
        /// `cache::Cache::hash` calls on this thread.
        pub static HASHES: Cell<u64> = const { Cell::new(0) };
    }
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

pub use config::DnsConfig;

use crate::pb::{self, HealthState};
use crate::runtime::Health;
use server::DnsServer;

pub const CAPABILITY: &str = "dns";

/// Brings the node's traffic to the cache and takes it away (`node::NodeWiring`).
pub trait Wiring: Send + Sync + 'static {
    /// What the listeners bind to (interface and addresses), without steering any traffic.
    fn prepare(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Idempotent; removes stale rules of earlier runs first.
    fn setup(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Stops steering traffic at the cache (rules out, ClusterIPs off); returns what it removed.
    fn fail_open(&self) -> BoxFuture<'_, Result<u32, String>>;
    /// Repairs what went missing; returns how many things it restored.
    fn check(&self) -> BoxFuture<'_, Result<u32, String>>;
    fn teardown(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Upstream servers as the status API shows them.
pub trait UpstreamStatus: Send + Sync + 'static {
    fn upstreams(&self) -> Vec<pb::DnsUpstream>;
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("node wiring: {0}")]
    Wiring(String),
}

/// First wait before binding the listeners again after a failure; doubles up to the max.
const BIND_RETRY_FIRST: Duration = Duration::from_secs(1);
const BIND_RETRY_MAX: Duration = Duration::from_secs(30);

/// The listeners, bound before anything is steered at them.
struct BoundSockets {
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
}

/// The running cache as the API sees it.
pub struct DnsHandle {
    pub server: Arc<DnsServer>,
    pub listen: Vec<SocketAddr>,
    pub upstreams: Option<Arc<dyn UpstreamStatus>>,
    lame_duck: AtomicBool,
}

impl DnsHandle {
    pub fn status(&self) -> pb::DnsStatus {
        let m = &self.server.metrics;
        let (hits, misses) = (m.cache_hits.get(), m.cache_misses.get());
        let cache = self.server.cache();
        pb::DnsStatus {
            listen: self.listen.iter().map(ToString::to_string).collect(),
            cache_entries: cache.len(),
            cache_bytes: cache.bytes(),
            hits,
            misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            stale_served: m.stale_served.get(),
            prefetches: m.prefetches.get(),
            evictions: cache.counters.evictions.load(Ordering::Relaxed),
            upstreams: self
                .upstreams
                .as_ref()
                .map(|u| u.upstreams())
                .unwrap_or_default(),
            lame_duck: self.lame_duck.load(Ordering::Relaxed),
        }
    }
}

pub struct DnsCapability {
    pub config: DnsConfig,
    pub handle: Arc<DnsHandle>,
    pub wiring: Option<Arc<dyn Wiring>>,
}

impl DnsCapability {
    pub fn new(
        config: DnsConfig,
        server: Arc<DnsServer>,
        upstreams: Option<Arc<dyn UpstreamStatus>>,
        wiring: Option<Arc<dyn Wiring>>,
    ) -> Self {
        let handle = Arc::new(DnsHandle {
            server,
            listen: config.listen_addrs(),
            upstreams,
            lame_duck: AtomicBool::new(false),
        });
        Self {
            config,
            handle,
            wiring,
        }
    }

    pub async fn run(self, health: Health, token: CancellationToken) -> Result<(), DnsError> {
        loop {
            let Some(sockets) = self.bind_until_bound(&health, &token).await? else {
                return Ok(());
            };
            if self.serve(sockets, &health, &token).await? {
                return Ok(());
            }
        }
    }

    /// Steers the node at `sockets` and serves them until `token` is cancelled (true, after the
    /// shutdown), or until one listener dies (false): a dead listener's port is a black hole
    /// for the pods steered at it, so the others stop too and the caller binds every listener
    /// again; where that fails, the rules go (issue #15, 2e).
    async fn serve(
        &self,
        sockets: BoundSockets,
        health: &Health,
        token: &CancellationToken,
    ) -> Result<bool, DnsError> {
        // Rules go in only now: steering pods at an address nobody answers is a black hole.
        if let Some(w) = &self.wiring {
            w.setup().await.map_err(DnsError::Wiring)?;
        }
        let serving = CancellationToken::new();
        let mut loops = tokio::task::JoinSet::new();
        for socket in sockets.udp {
            loops.spawn(server::serve_udp(
                self.handle.server.clone(),
                socket,
                serving.clone(),
            ));
        }
        for listener in sockets.tcp {
            loops.spawn(server::serve_tcp(
                self.handle.server.clone(),
                listener,
                serving.clone(),
            ));
        }
        tracing::info!(listen = ?self.handle.listen, "dns cache serving");
        let mut tick = tokio::time::interval(self.config.node.check_interval.get());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let died = loop {
            tokio::select! {
                _ = token.cancelled() => break None,
                _ = tick.tick() => self.check(health).await,
                Some(ended) = loops.join_next() => break Some(ended),
            }
        };
        let Some(ended) = died else {
            self.shut_down(health, serving, loops).await;
            return Ok(true);
        };
        let why = match ended {
            Ok(()) => "its socket failed".to_string(),
            Err(e) => format!("its task ended: {e}"),
        };
        tracing::error!(why = %why, "a dns listener died; binding every listener again");
        health.set(
            CAPABILITY,
            HealthState::Degraded,
            format!("a listener died ({why}); binding again"),
        );
        // Every socket closed before binding again; if the new bind fails, `bind_until_bound`
        // removes the rules (nobody answers then) and retries with backoff.
        serving.cancel();
        while loops.join_next().await.is_some() {}
        Ok(false)
    }

    /// Binds every listener, all or none. While that fails (port 53 refused without
    /// CAP_NET_BIND_SERVICE, the address held by a socket without SO_REUSEPORT, the address
    /// not assigned) the node is not steered here and the capability reports the cause;
    /// binding is retried with backoff. `None`: cancelled before binding.
    async fn bind_until_bound(
        &self,
        health: &Health,
        token: &CancellationToken,
    ) -> Result<Option<BoundSockets>, DnsError> {
        let mut wait = BIND_RETRY_FIRST;
        loop {
            if let Some(w) = &self.wiring {
                w.prepare().await.map_err(DnsError::Wiring)?;
            }
            let error = match self.bind_all() {
                Ok(sockets) => return Ok(Some(sockets)),
                Err(e) => e,
            };
            let wiring = self.stop_steering().await;
            tracing::error!(error = %error, wiring = %wiring, retry_in = ?wait, "dns cache cannot listen; pods are not steered to it");
            health.set(
                CAPABILITY,
                HealthState::Degraded,
                format!("{error}; {wiring}; retrying in {wait:?}"),
            );
            tokio::select! {
                _ = token.cancelled() => return Ok(None),
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(BIND_RETRY_MAX);
        }
    }

    /// Every listener bound, or the first error (what was bound is dropped again).
    fn bind_all(&self) -> Result<BoundSockets, server::ServerError> {
        let mut sockets = BoundSockets {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for addr in &self.handle.listen {
            for _ in 0..self.config.udp_sockets {
                sockets.udp.push(server::bind_udp(*addr)?);
            }
            sockets.tcp.push(server::bind_tcp(*addr)?);
        }
        Ok(sockets)
    }

    /// Takes the rules out while the cache cannot listen, unless something (a predecessor
    /// still in its lame duck) answers on the cache address: that traffic is served. Returns
    /// what happened, for the health detail.
    async fn stop_steering(&self) -> String {
        let Some(w) = &self.wiring else {
            return "no node wiring managed".into();
        };
        if let Some(addr) = self.handle.listen.first()
            && answers(*addr).await
        {
            return format!("{addr} answers (a predecessor): its node wiring stays");
        }
        match w.fail_open().await {
            Ok(_) => "node wiring removed: pods' DNS goes to kube-dns".into(),
            Err(e) => format!("removing the node wiring failed: {e}"),
        }
    }

    async fn check(&self, health: &Health) {
        let mut problems = Vec::new();
        if let Some(w) = &self.wiring {
            match w.check().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    restored = n,
                    "dns node wiring was changed behind our back; restored"
                ),
                Err(e) => problems.push(format!("node wiring: {e}")),
            }
        }
        if !self.handle.server.upstream_healthy() {
            problems.push("no upstream answers".into());
        }
        if problems.is_empty() {
            health.set(CAPABILITY, HealthState::Serving, "");
        } else {
            health.set(CAPABILITY, HealthState::Degraded, problems.join("; "));
        }
    }

    async fn shut_down(
        &self,
        health: &Health,
        serving: CancellationToken,
        mut loops: tokio::task::JoinSet<()>,
    ) {
        self.handle.lame_duck.store(true, Ordering::Relaxed);
        health.set(
            CAPABILITY,
            HealthState::Degraded,
            "lame duck: shutting down",
        );
        tracing::info!(lame_duck = ?self.config.lame_duck.get(), "dns cache: lame duck");
        tokio::time::sleep(self.config.lame_duck.get()).await;
        serving.cancel();
        while loops.join_next().await.is_some() {}
        let Some(w) = &self.wiring else {
            return;
        };
        // A successor bound with SO_REUSEPORT answers on our addresses: its traffic must stay.
        if let Some(addr) = self.handle.listen.first()
            && answers(*addr).await
        {
            tracing::info!(%addr, "a successor answers on the cache addresses; leaving the node wiring in place");
            return;
        }
        match w.teardown().await {
            Ok(()) => tracing::info!("dns node wiring removed"),
            Err(e) => tracing::error!(error = %e, "dns node wiring teardown failed"),
        }
    }
}

/// Whether anything answers a DNS query on `addr` within half a second.
pub async fn answers(addr: SocketAddr) -> bool {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
        return false;
    };
    let id = (std::process::id() as u16) ^ 0x5a5a;
    if socket
        .send_to(&wire::build::self_check_query(id), addr)
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 1500];
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok((n, from))) =
        tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
    {
        if from == addr && wire::answers_id(&buf[..n], id) {
            return true;
        }
    }
    false
}
