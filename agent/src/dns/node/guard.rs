//! The fail-open guard (`nodekeeper dns-guard`, a sidecar container in the agent's pod): every
//! `interval` it sends one DNS query to the cache's first listen address; after `failures`
//! consecutive probes without an answer (each waits `probe_timeout`) it takes the transparent
//! wiring away ([`NodeWiring::fail_open`]: our rules, the ClusterIPs on the interface), so pods'
//! queries to the kube-dns ClusterIP reach kube-dns through kube-proxy again. It keeps probing
//! and keeps the rules off while the cache stays silent (a crash-looping agent re-installs
//! them); once the cache answers again it does nothing: the restarted agent's `setup` rewires.
//!
//! Any answer counts as alive (REFUSED, NOTIMP, SERVFAIL too): the guard judges the cache's
//! process, not its upstreams. It never installs anything.
//!
//! It never claims an open node it has not seen: "failed open" is logged only after
//! [`NodeWiring::fail_open`] read the rules and addresses back and found nothing of ours. A
//! failed attempt is logged as an error, counted, raises `dns_guard_failopen_pending` and is
//! retried with backoff ([`RETRY_BACKOFF_MAX`]) until it succeeds or the cache answers again.
//!
//! It never talks to the Kubernetes API (docs/decisions.md `#19-d`): it holds no credential,
//! so node root gains nothing by taking it over. What it does is reported by its metrics
//! (served on its own port, alerted on) and its log, never by Events.

use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dns::wire;

use super::NodeWiring;

/// Defaults of the `dns-guard` flags: together the fail-open window is
/// `interval x failures` (+ one probe timeout) = about 3.5 s.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Three in a row: one lost UDP packet or a GC pause must not fail the node open.
pub const DEFAULT_FAILURES: u32 = 3;
/// A cache answers a local query in well under a millisecond; 500 ms is a process that is gone
/// or wedged, and leaves room for the probe inside a 1 s interval.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The probe asks `id.server. CH TXT`: a name the cache answers itself without an upstream (any
/// rcode counts), so a dead upstream never looks like a dead cache.
pub const DEFAULT_PROBE_NAME: &str = "id.server";

/// A failed fail-open is retried after the probe interval, doubling up to this: soon enough
/// that a black-holed node recovers within seconds of the fault clearing, slow enough that a
/// persistent fault (a read-only lock path) does not run the firewall tools in a tight loop.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// After SIGTERM, a failing fail-open is retried this long before the guard gives up and exits
/// (inside the pod's 30 s termination grace, after the agent's lame duck).
pub const TERMINATING_RETRY_FOR: Duration = Duration::from_secs(15);

/// The guard's own metrics (served on `dns-guard --metrics-listen`).
#[derive(Debug, Clone, Default)]
pub struct GuardMetrics {
    /// 1 while the guard has decided to fail open but read-back still finds wiring of ours.
    pending: Gauge,
    failures: Counter,
    opened: Counter,
}

impl GuardMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dns_guard_failopen_pending",
            "1 while the cache is silent and failing open has not been verified (the node's DNS may be black-holed)",
            m.pending.clone(),
        );
        registry.register(
            "dns_guard_failopen_failures",
            "Fail-open attempts that failed or whose read-back still found rules or ClusterIPs of ours",
            m.failures.clone(),
        );
        registry.register(
            "dns_guard_failopen",
            "Times the guard failed open and verified it (nothing of ours left)",
            m.opened.clone(),
        );
        m
    }
}

#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub target: SocketAddr,
    pub interval: Duration,
    pub failures: u32,
    pub probe_timeout: Duration,
    /// After SIGTERM: keep guarding this long (the agent's lame duck plus a margin), then probe
    /// once more and fail open only if nothing answers (no successor took over).
    pub grace: Duration,
    pub probe_name: String,
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// ICMP port unreachable (nothing bound) and other socket errors.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Sends one query to `target` and waits up to `timeout` for the matching response.
pub async fn probe(target: SocketAddr, timeout: Duration, name: &str) -> Result<(), ProbeError> {
    let bind: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let id = RandomState::new().hash_one(std::time::Instant::now()) as u16;
    let work = async {
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(target).await?;
        sock.send(&wire::build::guard_query(id, name)).await?;
        let mut buf = [0u8; 512];
        loop {
            let n = sock.recv(&mut buf).await?;
            if wire::answers_id(&buf[..n], id) {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

/// Guards until `shutdown`, then for `grace`, then decides once more (see [`GuardSettings`]).
pub async fn run(
    wiring: &NodeWiring,
    s: &GuardSettings,
    metrics: &GuardMetrics,
    shutdown: CancellationToken,
) {
    tracing::info!(target = %s.target, interval = ?s.interval, failures = s.failures, probe_timeout = ?s.probe_timeout, "dns guard: watching the cache");
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silent = 0u32;
    let mut opener = FailOpen::new(wiring, metrics, s.interval);
    let mut deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if deadline.is_none() => {
                tracing::info!(grace = ?s.grace, "dns guard: terminating; guarding through the agent's lame duck");
                deadline = Some(Instant::now() + s.grace);
                continue;
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => break,
            _ = tick.tick() => {}
        }
        match probe(s.target, s.probe_timeout, &s.probe_name).await {
            Ok(()) => {
                if silent >= s.failures {
                    tracing::info!(
                        after = silent,
                        "dns guard: the cache answers again; its setup re-installs the wiring"
                    );
                }
                silent = 0;
                opener.cache_answers();
            }
            Err(e) => {
                silent = silent.saturating_add(1);
                tracing::debug!(error = %e, silent, "dns guard: probe failed");
                if silent >= s.failures && opener.due() {
                    opener.attempt(silent).await;
                }
            }
        }
    }
    // Terminating: a successor (or the lame-ducking agent) that still answers keeps the wiring.
    for _ in 0..s.failures.max(1) {
        if probe(s.target, s.probe_timeout, &s.probe_name)
            .await
            .is_ok()
        {
            tracing::info!(
                "dns guard: the cache still answers (a successor serves); leaving the wiring"
            );
            opener.cache_answers();
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let give_up = Instant::now() + TERMINATING_RETRY_FOR;
    opener.retry_now();
    while !opener.attempt(s.failures).await {
        if Instant::now() >= give_up {
            tracing::error!(
                tried_for = ?TERMINATING_RETRY_FOR,
                "dns guard: exiting without having failed open; the node's DNS stays black-holed until the agent runs again"
            );
            return;
        }
        opener.wait_until_due().await;
        if probe(s.target, s.probe_timeout, &s.probe_name)
            .await
            .is_ok()
        {
            opener.cache_answers();
            return;
        }
    }
}

// === impl FailOpen ===

/// The guard's fail-open attempts: verified success, or an error logged, counted, reported as
/// pending and retried after a doubling backoff.
struct FailOpen<'a> {
    wiring: &'a NodeWiring,
    metrics: &'a GuardMetrics,
    /// Verified open (nothing of ours left at the last attempt).
    open: bool,
    base: Duration,
    backoff: Duration,
    next_try: Option<Instant>,
}

impl<'a> FailOpen<'a> {
    fn new(wiring: &'a NodeWiring, metrics: &'a GuardMetrics, base: Duration) -> Self {
        Self {
            wiring,
            metrics,
            open: false,
            base,
            backoff: base,
            next_try: None,
        }
    }

    /// The cache answers: nothing is black-holed; forget the failed attempts.
    fn cache_answers(&mut self) {
        self.open = false;
        self.retry_now();
        self.metrics.pending.set(0);
    }

    fn retry_now(&mut self) {
        self.backoff = self.base;
        self.next_try = None;
    }

    fn due(&self) -> bool {
        self.next_try.is_none_or(|t| Instant::now() >= t)
    }

    async fn wait_until_due(&self) {
        if let Some(t) = self.next_try {
            tokio::time::sleep_until(t).await;
        }
    }

    /// One attempt; true when read-back verified that nothing of ours is left. While verified
    /// open, each call re-checks (a crash-looping agent re-installs the rules).
    async fn attempt(&mut self, silent: u32) -> bool {
        match self.wiring.fail_open().await {
            Ok(removed) => {
                if !self.open || removed > 0 {
                    self.metrics.opened.inc();
                    tracing::warn!(
                        silent_probes = silent,
                        removed,
                        "dns guard: the cache does not answer; failed open, verified (read back: no rule or ClusterIP of ours left; queries go to kube-dns)"
                    );
                }
                self.open = true;
                self.metrics.pending.set(0);
                self.retry_now();
                true
            }
            Err(e) => {
                self.open = false;
                self.metrics.pending.set(1);
                self.metrics.failures.inc();
                tracing::error!(
                    error = %e,
                    kind = e.kind(),
                    silent_probes = silent,
                    retry_in = ?self.backoff,
                    "dns guard: failing open failed; the node's DNS stays black-holed until a retry succeeds"
                );
                self.next_try = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_BACKOFF_MAX);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_response_with_our_id_is_an_answer() {
        let q = wire::build::guard_query(0xabcd, "id.server.");
        assert!(!wire::answers_id(&q, 0xabcd));
        let mut a = q.clone();
        a[2] |= 0x80;
        assert!(wire::answers_id(&a, 0xabcd));
        assert!(!wire::answers_id(&a, 0xabce));
        assert!(!wire::answers_id(&a[..11], 0xabcd));
    }

    #[tokio::test]
    async fn probe_of_a_closed_port_fails_fast() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        drop(sock);
        let t = std::time::Instant::now();
        assert!(
            probe(addr, Duration::from_secs(2), "id.server")
                .await
                .is_err()
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
