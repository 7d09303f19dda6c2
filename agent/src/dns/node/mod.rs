//! Node wiring for the DNS cache: the dummy interface holding the listen addresses
//! ([`iface`], netlink), the NOTRACK/ACCEPT rules ([`rules`], installed by [`iptables`] or
//! [`nftables`]), stale-rule cleanup, periodic check-and-repair, teardown, and the fail-open
//! [`guard`] that un-black-holes the node when the cache dies. See docs/dns.md, "Node wiring
//! and fail-open".
//!
//! Owns only what it marks as its own: the interface named `dns.node.interface`, iptables
//! rules carrying the `nodekeeper-dns` comment, and the nftables table `inet nodekeeper_dns`.
//! Never edits, reorders or deletes anything else.

pub mod cli;
pub mod exec;
pub mod guard;
pub mod iface;
pub mod iptables;
pub mod nftables;
pub mod rules;

use std::net::IpAddr;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::dns::config::{DnsConfig, RulesBackend};
use rules::{Backend, RuleChanges};

/// Why a wiring step failed. Each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// A netlink request about our interface failed (`op`: "create dummy link", "add address"...).
    #[error("interface {interface}: {op}: {detail}")]
    Interface {
        interface: String,
        op: &'static str,
        detail: String,
    },
    /// Opening the netlink socket failed.
    #[error("netlink socket: {0}")]
    Netlink(std::io::Error),
    /// A firewall tool failed, timed out or is missing.
    #[error("{backend} rules: {source}")]
    Rules {
        backend: &'static str,
        source: exec::ExecError,
    },
    /// `rules: auto` found neither a working iptables nor nft.
    #[error(
        "dns.node.rules: auto found neither iptables nor nft (install one, or set rules: none if the node's own setup installs NOTRACK/ACCEPT)"
    )]
    NoBackend,
    /// `dns.listenIps` and `dns.clusterIps` are both empty: nothing to wire or guard.
    #[error("dns.listenIps: no address to wire or guard")]
    NoAddress,
    /// The one-shot commands could not build their runtime.
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// Removal reported no error, but reading back (`*-save`, `nft list`, netlink) still finds
    /// wiring of ours: the node is not failed open.
    #[error(
        "read-back after removal still finds {rules} rule(s) of ours and ClusterIP(s) {addresses:?} on the interface"
    )]
    StillWired { rules: u32, addresses: Vec<IpAddr> },
}

impl WiringError {
    /// Short, low-cardinality label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            WiringError::Interface { .. } => "interface",
            WiringError::Netlink(_) => "netlink",
            WiringError::Rules { .. } => "rules",
            WiringError::NoBackend => "no_backend",
            WiringError::NoAddress => "no_address",
            WiringError::Runtime(_) => "runtime",
            WiringError::StillWired { .. } => "still_wired",
        }
    }
}

// === metrics ===

#[derive(Debug, Clone, Default)]
pub struct WiringMetrics {
    repairs: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl WiringMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dns_wiring_repairs",
            "Things `check` found missing or wrong and restored, by what (interface, link_up, address, rule)",
            m.repairs.clone(),
        );
        m
    }

    fn add(&self, what: &'static str, n: u32) {
        if n > 0 {
            self.repairs
                .get_or_create(&vec![("what", what)])
                .inc_by(u64::from(n));
        }
    }
}

// === impl NodeWiring ===

/// The interface, addresses and rules that make pods reach the cache.
#[derive(Debug)]
pub struct NodeWiring {
    interface: String,
    manage_interface: bool,
    configured: RulesBackend,
    port: u16,
    /// Every listen IP (link-local first, then ClusterIPs), without duplicates.
    ips: Vec<IpAddr>,
    /// The transparent-mode ClusterIPs: what the guard takes off the interface.
    cluster_ips: Vec<IpAddr>,
    backend: OnceCell<Backend>,
    metrics: WiringMetrics,
}

impl NodeWiring {
    pub fn new(config: &DnsConfig, registry: &mut Registry) -> Self {
        let mut ips: Vec<IpAddr> = Vec::new();
        for a in config.listen_addrs() {
            if !ips.contains(&a.ip()) {
                ips.push(a.ip());
            }
        }
        Self {
            interface: config.node.interface.clone(),
            manage_interface: config.node.manage_interface,
            configured: config.node.rules,
            port: config.port,
            ips,
            cluster_ips: config.cluster_ips.clone(),
            backend: OnceCell::new(),
            metrics: WiringMetrics::register(registry),
        }
    }

    /// The backend in use (resolved once, on first use).
    pub async fn backend(&self) -> Result<&Backend, WiringError> {
        self.backend
            .get_or_try_init(|| async {
                let b = rules::resolve(self.configured).await;
                if let Some(b) = &b {
                    tracing::info!(backend = b.name(), "dns wiring: rules backend");
                }
                b.ok_or(WiringError::NoBackend)
            })
            .await
    }

    fn desired(&self) -> Vec<rules::Rule> {
        rules::desired(&self.ips, self.port)
    }

    /// Brings the chosen backend's rules of ours to exactly `desired` in one batch per family.
    async fn reconcile_rules(&self, desired: &[rules::Rule]) -> Result<RuleChanges, WiringError> {
        let backend = self.backend().await?;
        let err = |source| WiringError::Rules {
            backend: backend.name(),
            source,
        };
        match backend {
            Backend::Iptables(v) => iptables::reconcile_all(v, desired).await.map_err(err),
            // Nothing desired: the table goes (one transaction), not just its rules.
            Backend::Nftables if desired.is_empty() => nftables::remove()
                .await
                .map(|removed| RuleChanges { added: 0, removed })
                .map_err(err),
            Backend::Nftables => nftables::reconcile(desired).await.map_err(err),
            Backend::None => Ok(RuleChanges::default()),
        }
    }

    /// Removes rules of ours from every place other than the backend in use: our nftables
    /// table, and every installed iptables variant (legacy and nf_tables) but the one in use.
    /// A place whose tool is not installed is skipped. Every place is tried; the count removed
    /// and the first failure are returned (setup logs it, fail-open and teardown fail on it).
    async fn remove_elsewhere(&self) -> (u32, Option<WiringError>) {
        let chosen = self.backend().await.ok();
        let mut removed = 0;
        let mut first_error = None;
        if !matches!(chosen, Some(Backend::Nftables)) && rules::nft_tables().await.is_some() {
            match nftables::remove().await {
                Ok(n) => removed += n,
                Err(source) => {
                    first_error.get_or_insert(WiringError::Rules {
                        backend: "nftables",
                        source,
                    });
                }
            }
        }
        for v in rules::iptables_variants().await {
            if matches!(chosen, Some(Backend::Iptables(c)) if *c == v) {
                continue;
            }
            match iptables::reconcile_all(&v, &[]).await {
                Ok(c) => removed += c.removed,
                Err(source) => {
                    first_error.get_or_insert(WiringError::Rules {
                        backend: "iptables",
                        source,
                    });
                }
            }
        }
        (removed, first_error)
    }

    /// Idempotent. Removes stale rules of ours (from a crashed earlier run: rules in the
    /// backend not in use, rules for addresses no longer configured, duplicates), creates the
    /// dummy interface `node.interface` (when `manageInterface`) with every listen address,
    /// then installs the missing rules. Stale deletes and inserts go in one atomic batch, so a
    /// restart never opens a window without NOTRACK.
    pub async fn setup(&self) -> Result<(), WiringError> {
        let backend = self.backend().await?.name();
        let (other, failed) = self.remove_elsewhere().await;
        if let Some(e) = failed {
            // Stale rules elsewhere do not stop the cache: the next setup tries again.
            tracing::warn!(error = %e, "dns wiring: removing rules of ours outside the backend in use");
        }
        let iface = if self.manage_interface {
            Some(
                iface::Netlink::connect(&self.interface)?
                    .ensure(&self.ips)
                    .await?,
            )
        } else {
            None
        };
        let changes = self.reconcile_rules(&self.desired()).await?;
        tracing::info!(
            backend,
            interface = %self.interface,
            managed = self.manage_interface,
            addresses = ?self.ips,
            rules_added = changes.added,
            stale_rules_removed = changes.removed + other,
            interface_created = iface.as_ref().is_some_and(|r| r.created),
            "dns wiring: set up"
        );
        Ok(())
    }

    /// Re-checks the interface, its addresses and the rules; restores anything missing and
    /// removes anything stale. Returns how many things it fixed (also counted in
    /// `dns_wiring_repairs_total{what}`).
    pub async fn check(&self) -> Result<u32, WiringError> {
        let mut total = 0;
        if self.manage_interface {
            let r = iface::Netlink::connect(&self.interface)?
                .ensure(&self.ips)
                .await?;
            let addrs = r.addresses_added + r.addresses_removed;
            self.metrics.add("interface", u32::from(r.created));
            self.metrics.add("link_up", u32::from(r.brought_up));
            self.metrics.add("address", addrs);
            total += u32::from(r.created) + u32::from(r.brought_up) + addrs;
        }
        let c = self.reconcile_rules(&self.desired()).await?;
        self.metrics.add("rule", c.total());
        total += c.total();
        if total > 0 {
            tracing::warn!(
                repairs = total,
                rules_added = c.added,
                rules_removed = c.removed,
                "dns wiring: restored missing or changed wiring"
            );
        }
        Ok(total)
    }

    /// Removes our rules (from every backend present) and the interface with its addresses
    /// (when managed), then reads back that they are gone ([`WiringError::StillWired`] when
    /// not). Idempotent.
    pub async fn teardown(&self) -> Result<(), WiringError> {
        let rules = self.remove_rules().await?;
        let deleted = if self.manage_interface {
            iface::Netlink::connect(&self.interface)?.delete().await?
        } else {
            false
        };
        self.verify_gone().await?;
        tracing::info!(rules_removed = rules, interface_deleted = deleted, interface = %self.interface, "dns wiring: torn down (read back: nothing of ours left)");
        Ok(())
    }

    /// The guard's action when the cache is silent: removes our rules and takes the
    /// ClusterIPs off the interface, so queries to a ClusterIP are DNATed by kube-proxy to
    /// kube-dns again. The link-local address stays (a client of it gets a fast ICMP error,
    /// not a route out of the node). Succeeds only when reading back the rules (every backend)
    /// and the interface finds nothing of ours left; returns how many things it removed (0:
    /// already open).
    pub async fn fail_open(&self) -> Result<u32, WiringError> {
        let mut removed = self.remove_rules().await?;
        if self.manage_interface && !self.cluster_ips.is_empty() {
            removed += iface::Netlink::connect(&self.interface)?
                .remove_addresses(&self.cluster_ips)
                .await?;
        }
        self.verify_gone().await?;
        Ok(removed)
    }

    /// Reads back every backend present and the interface: Ok only when no rule of ours and
    /// no ClusterIP (managed interface) is left.
    async fn verify_gone(&self) -> Result<(), WiringError> {
        let rules = self.rules_left().await?;
        let addresses = if self.manage_interface && !self.cluster_ips.is_empty() {
            iface::Netlink::connect(&self.interface)?
                .holding(&self.cluster_ips)
                .await?
        } else {
            Vec::new()
        };
        if rules > 0 || !addresses.is_empty() {
            return Err(WiringError::StillWired { rules, addresses });
        }
        Ok(())
    }

    /// Rules of ours in the backend in use and in every other backend installed (each iptables
    /// variant, our nftables table).
    async fn rules_left(&self) -> Result<u32, WiringError> {
        let err = |backend: &'static str| move |source| WiringError::Rules { backend, source };
        let mut variants = rules::iptables_variants().await;
        if let Ok(Backend::Iptables(v)) = self.backend().await
            && !variants.contains(v)
        {
            variants.push(v.clone());
        }
        let mut n = 0;
        for v in &variants {
            n += iptables::count_ours(v).await.map_err(err("iptables"))?;
        }
        let nft_in_use = matches!(self.backend().await, Ok(Backend::Nftables));
        if nft_in_use || rules::nft_tables().await.is_some() {
            // A table of ours, even empty, still holds base chains: count it as one thing left.
            n += match nftables::count_ours().await {
                Ok(None) => 0,
                Ok(Some(k)) => k.max(1),
                Err(exec::ExecError::NotFound { .. }) if !nft_in_use => 0,
                Err(e) => return Err(err("nftables")(e)),
            };
        }
        Ok(n)
    }

    /// Removes our rules from the backend in use and from every other place they can be; all
    /// places are tried even when one fails (each rule gone is one less black hole), then the
    /// first failure is returned.
    async fn remove_rules(&self) -> Result<u32, WiringError> {
        let mine = match self.reconcile_rules(&[]).await {
            Ok(c) => Ok(c.removed),
            // No tool at all: nothing of ours can be installed either.
            Err(WiringError::NoBackend) => Ok(0),
            Err(e) => Err(e),
        };
        let (elsewhere, failed) = self.remove_elsewhere().await;
        match (mine, failed) {
            (Err(e), _) | (Ok(_), Some(e)) => Err(e),
            (Ok(n), None) => Ok(n + elsewhere),
        }
    }

    /// Runs `check` every `interval` until `cancel`; failures are logged and retried.
    pub async fn maintain(&self, interval: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.check().await {
                tracing::warn!(error = %e, kind = e.kind(), "dns wiring: check failed");
            }
        }
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    pub fn addresses(&self) -> &[IpAddr] {
        &self.ips
    }
}

// === impl Wiring for NodeWiring ===

/// The DNS capability drives the wiring through this trait (errors as text, as it logs them).
impl crate::dns::Wiring for NodeWiring {
    fn setup(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { NodeWiring::setup(self).await.map_err(|e| e.to_string()) })
    }

    fn check(&self) -> futures::future::BoxFuture<'_, Result<u32, String>> {
        Box::pin(async move { NodeWiring::check(self).await.map_err(|e| e.to_string()) })
    }

    fn teardown(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { NodeWiring::teardown(self).await.map_err(|e| e.to_string()) })
    }
}
