//! `dns:` configuration: listeners, the node wiring (interface, rules, guard), upstream groups
//! and the cache. Defaults follow node-local-dns where it has one (169.254.20.10, 30 s max TTL,
//! TCP to the cluster DNS service), and are safe where it has none.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigDuration;

pub const DEFAULT_LISTEN_IP: &str = "169.254.20.10";
pub const DEFAULT_INTERFACE: &str = "nodekeeper-dns";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DnsConfig {
    /// Off by default: it changes the node's networking. The DaemonSet's config turns it on.
    pub enabled: bool,
    /// Addresses the cache answers on (UDP and TCP, port 53 unless `port` says otherwise).
    pub listen_ips: Vec<IpAddr>,
    /// Transparent mode: the kube-dns ClusterIP(s), also held by the cache, so pods resolve
    /// through it without a kubelet `--cluster-dns` change. Empty: link-local only.
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    /// UDP sockets per address (SO_REUSEPORT), so the kernel spreads queries over threads.
    pub udp_sockets: usize,
    pub node: NodeWiringConfig,
    pub upstreams: UpstreamsConfig,
    pub cache: CacheConfig,
    /// Per upstream query attempt.
    pub timeout: ConfigDuration,
    /// Queries waiting for an upstream at once; more are answered SERVFAIL at once.
    pub max_in_flight: usize,
    /// The part of `maxInFlight` one upstream group (the default, the cluster zones, one stub
    /// domain) may hold; more misses of that group are refused at once (stale or SERVFAIL).
    /// 0: half of `maxInFlight` (at least 1), so a dead group leaves the others room.
    pub max_in_flight_per_group: usize,
    /// On SIGTERM: keep answering (reporting not-ready) this long before tearing down.
    pub lame_duck: ConfigDuration,
    /// Randomise the case of upstream query names (DNS 0x20) against spoofing.
    pub randomize_case: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen_ips: vec![DEFAULT_LISTEN_IP.parse().expect("valid")],
            cluster_ips: Vec::new(),
            port: 53,
            udp_sockets: 2,
            node: NodeWiringConfig::default(),
            upstreams: UpstreamsConfig::default(),
            cache: CacheConfig::default(),
            timeout: ConfigDuration(Duration::from_secs(2)),
            max_in_flight: 2048,
            max_in_flight_per_group: 0,
            lame_duck: ConfigDuration(Duration::from_secs(5)),
            randomize_case: false,
        }
    }
}

impl DnsConfig {
    /// Upstream queries one group may have pending: `maxInFlightPerGroup`, or half of
    /// `maxInFlight` (at least 1) when unset.
    pub fn group_in_flight_share(&self) -> usize {
        match self.max_in_flight_per_group {
            0 => (self.max_in_flight / 2).max(1),
            n => n,
        }
    }

    /// Every address the cache listens on: link-local ones, then the ClusterIPs.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listen_ips
            .iter()
            .chain(&self.cluster_ips)
            .map(|ip| SocketAddr::new(*ip, self.port))
            .collect()
    }
}

/// Which firewall tool installs the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RulesBackend {
    /// nftables when kube-proxy runs in nftables mode (an nft table named `kube-proxy`), else
    /// iptables when any iptables works (legacy or nf_tables variant, picked like Kubernetes'
    /// iptables-wrapper), else nftables when `nft` works. See docs/dns.md.
    #[default]
    Auto,
    Iptables,
    Nftables,
    /// No rules (the node's own setup handles NOTRACK/ACCEPT, or tests).
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct NodeWiringConfig {
    /// Create the dummy interface holding the listen addresses (and remove it on teardown).
    /// `false`: the addresses must already be local (tests, custom setups).
    pub manage_interface: bool,
    pub interface: String,
    pub rules: RulesBackend,
    /// How often the interface, addresses and rules are checked and repaired.
    pub check_interval: ConfigDuration,
}

impl Default for NodeWiringConfig {
    fn default() -> Self {
        Self {
            manage_interface: true,
            interface: DEFAULT_INTERFACE.into(),
            rules: RulesBackend::Auto,
            check_interval: ConfigDuration(Duration::from_secs(10)),
        }
    }
}

/// How to reach an upstream group's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamProtocol {
    /// UDP, retried over TCP when the answer is truncated.
    #[default]
    Udp,
    /// TCP only (node-local-dns `force_tcp`): no conntrack UDP races, one reused connection.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct UpstreamGroup {
    /// `ip:port` or `ip` (port 53). Empty in `default`: the host's resolv.conf.
    pub servers: Vec<String>,
    /// Absent: TCP for the cluster group (node-local-dns `force_tcp`), UDP otherwise, so
    /// naming servers never silently changes the transport.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<UpstreamProtocol>,
}

impl UpstreamGroup {
    pub fn protocol_or(&self, default: UpstreamProtocol) -> UpstreamProtocol {
        self.protocol.unwrap_or(default)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct UpstreamsConfig {
    /// Zones answered by the cluster DNS service.
    pub cluster_zones: Vec<String>,
    /// The cluster DNS service (kube-dns ClusterIP); TCP by default.
    pub cluster: UpstreamGroup,
    /// Everything else; empty servers = the host's `/etc/resolv.conf` (under hostPaths.rootfs).
    pub default: UpstreamGroup,
    /// Zone -> servers, like kube-dns's `stubDomains`.
    pub stub_domains: BTreeMap<String, Vec<String>>,
    /// `namespace/name` of the kube-dns ConfigMap whose `stubDomains` and
    /// `upstreamNameservers` are honoured (connected mode); empty to ignore it.
    pub kube_dns_config_map: String,
    /// Connected mode, when `cluster.servers` is empty: `namespace/name` of the Service whose
    /// ClusterIP is the cluster upstream. Not kube-dns itself: in transparent mode its ClusterIP
    /// is held by the cache on this node, so a second Service selecting the same pods is used
    /// (like node-local-dns's kube-dns-upstream); the agent refuses a Service whose ClusterIP is
    /// one of `clusterIps`.
    pub cluster_service: String,
    /// A server that failed this many queries in a row is skipped until a probe succeeds.
    pub unhealthy_after: u32,
    /// How often unhealthy servers are probed (a `. NS` or zone SOA query) to bring them back.
    pub probe_interval: ConfigDuration,
}

/// Three timeouts in a row (6 s at the default timeout) is an outage, not a lost packet.
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
/// Short enough that a restarted kube-dns is used again within seconds, long enough that
/// probing a dead server costs nothing measurable.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

impl Default for UpstreamsConfig {
    fn default() -> Self {
        Self {
            cluster_zones: vec![
                "cluster.local".into(),
                "in-addr.arpa".into(),
                "ip6.arpa".into(),
            ],
            cluster: UpstreamGroup {
                servers: Vec::new(),
                protocol: None,
            },
            default: UpstreamGroup::default(),
            stub_domains: BTreeMap::new(),
            kube_dns_config_map: "kube-system/kube-dns".into(),
            cluster_service: "kube-system/kube-dns".into(),
            unhealthy_after: DEFAULT_UNHEALTHY_AFTER,
            probe_interval: ConfigDuration(DEFAULT_PROBE_INTERVAL),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CacheConfig {
    pub max_entries: usize,
    pub max_bytes: u64,
    /// Answers are kept at most this long (node-local-dns: 30 s), at least `minTtl`.
    pub max_ttl: ConfigDuration,
    pub min_ttl: ConfigDuration,
    /// NXDOMAIN/NODATA: the SOA's negative TTL (RFC 2308), capped by this.
    pub negative_max_ttl: ConfigDuration,
    /// SERVFAIL from upstream is cached this long at most.
    pub servfail_ttl: ConfigDuration,
    /// Refresh an entry asked for at least `prefetchHits` times once less than 10% of its TTL
    /// is left, so popular names never expire in front of a client.
    pub prefetch: bool,
    pub prefetch_hits: u32,
    /// RFC 8767: when every upstream fails, answer from expired entries with `staleTtl`.
    pub serve_stale: bool,
    pub stale_ttl: ConfigDuration,
    /// How long after expiry an entry may still be served stale.
    pub max_stale: ConfigDuration,
    /// RFC 8767 client-response timer: a client whose name has a stale entry waits at most this
    /// long for the refresh, then gets the stale answer while the refresh goes on. `0s`: stale
    /// at once, refreshed in the background. Takes effect only below `dns.timeout`.
    pub stale_answer_client_timeout: ConfigDuration,
}

/// RFC 8767 5 suggests 1.8 s (BIND's and unbound's default too): below the 2 s per-try
/// timeout of c-ares and dnspython and musl's 2.5 s retransmission, the shortest retry
/// intervals among common pod resolvers, and below our own 2 s `dns.timeout`.
pub const DEFAULT_STALE_ANSWER_CLIENT_TIMEOUT: Duration = Duration::from_millis(1800);

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_bytes: 64 << 20,
            max_ttl: ConfigDuration(Duration::from_secs(30)),
            min_ttl: ConfigDuration(Duration::ZERO),
            negative_max_ttl: ConfigDuration(Duration::from_secs(30)),
            servfail_ttl: ConfigDuration(Duration::from_secs(2)),
            prefetch: true,
            prefetch_hits: 3,
            serve_stale: true,
            stale_ttl: ConfigDuration(Duration::from_secs(30)),
            max_stale: ConfigDuration(Duration::from_secs(3600)),
            stale_answer_client_timeout: ConfigDuration(DEFAULT_STALE_ANSWER_CLIENT_TIMEOUT),
        }
    }
}

impl DnsConfig {
    /// (field under `dns`, problem) for every invalid value.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |f: &str, p: String| out.push((format!("dns.{f}"), p));
        if self.enabled && self.listen_ips.is_empty() && self.cluster_ips.is_empty() {
            bad("listenIps", "at least one address is needed".into());
        }
        if self.udp_sockets == 0 || self.udp_sockets > 64 {
            bad(
                "udpSockets",
                format!("{} is out of range (1..=64)", self.udp_sockets),
            );
        }
        if self.max_in_flight == 0 {
            bad("maxInFlight", "must be at least 1".into());
        }
        if self.max_in_flight_per_group > self.max_in_flight {
            bad(
                "maxInFlightPerGroup",
                format!(
                    "{} is more than maxInFlight ({}); 0 means half of it",
                    self.max_in_flight_per_group, self.max_in_flight
                ),
            );
        }
        let t = self.timeout.get();
        if t < Duration::from_millis(50) || t > Duration::from_secs(30) {
            bad("timeout", format!("{t:?} is out of range (50ms..=30s)"));
        }
        if self.lame_duck.get() > Duration::from_secs(60) {
            bad(
                "lameDuck",
                "more than 60s would outlive terminationGracePeriodSeconds".into(),
            );
        }
        let name = &self.node.interface;
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            bad(
                "node.interface",
                format!("{name:?} is not an interface name (1..=15 characters, no '/' or space)"),
            );
        }
        let c = &self.cache;
        if c.max_entries == 0 {
            bad("cache.maxEntries", "must be at least 1".into());
        }
        if c.max_bytes < 4096 {
            bad("cache.maxBytes", format!("{} is below 4096", c.max_bytes));
        }
        if c.min_ttl.get() > c.max_ttl.get() {
            bad("cache.minTtl", "is above cache.maxTtl".into());
        }
        let timer = c.stale_answer_client_timeout.get();
        if timer > Duration::from_secs(30) {
            bad(
                "cache.staleAnswerClientTimeout",
                format!("{timer:?} is out of range (0s..=30s)"),
            );
        }
        for (field, servers) in [
            ("upstreams.cluster.servers", &self.upstreams.cluster.servers),
            ("upstreams.default.servers", &self.upstreams.default.servers),
        ] {
            for (i, s) in servers.iter().enumerate() {
                if let Err(e) = parse_server(s) {
                    bad(&format!("{field}[{i}]"), e);
                }
            }
        }
        let u = &self.upstreams;
        if u.unhealthy_after == 0 || u.unhealthy_after > 1000 {
            bad(
                "upstreams.unhealthyAfter",
                format!("{} is out of range (1..=1000)", u.unhealthy_after),
            );
        }
        let p = u.probe_interval.get();
        if p < Duration::from_millis(100) || p > Duration::from_secs(300) {
            bad(
                "upstreams.probeInterval",
                format!("{p:?} is out of range (100ms..=5m)"),
            );
        }
        for (i, zone) in u.cluster_zones.iter().enumerate() {
            if let Err(e) = check_zone(zone) {
                bad(&format!("upstreams.clusterZones[{i}]"), e);
            }
        }
        for zone in u.stub_domains.keys() {
            if let Err(e) = check_zone(zone) {
                bad(&format!("upstreams.stubDomains.{zone}"), e);
            }
        }
        for (zone, servers) in &self.upstreams.stub_domains {
            if servers.is_empty() {
                bad(
                    &format!("upstreams.stubDomains.{zone}"),
                    "needs at least one server".into(),
                );
            }
            for (i, s) in servers.iter().enumerate() {
                if let Err(e) = parse_server(s) {
                    bad(&format!("upstreams.stubDomains.{zone}[{i}]"), e);
                }
            }
        }
        out
    }
}

/// A zone name: dotted labels of 1..=63 characters, at most 253 in all, a trailing dot allowed,
/// not the root (that is what `upstreams.default` is for).
pub fn check_zone(zone: &str) -> Result<(), String> {
    let z = zone.strip_suffix('.').unwrap_or(zone);
    if z.is_empty() {
        return Err("the root zone is `upstreams.default`, not a zone here".into());
    }
    if z.len() > 253
        || z.split('.').any(|l| {
            l.is_empty() || l.len() > 63 || l.bytes().any(|b| b.is_ascii_whitespace() || b == b'\\')
        })
    {
        return Err(format!("{zone:?} is not a domain name"));
    }
    Ok(())
}

/// `10.0.0.10`, `10.0.0.10:5353`, `fd00::10`, `[fd00::10]:5353` -> a socket address.
pub fn parse_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not an IP address or ip:port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_enabled_with_every_other_field_at_its_default_is_a_valid_config() {
        let config = crate::config::Config::from_yaml("dns: {enabled: true}").unwrap();
        assert_eq!(config.problems(), Vec::new());
    }

    #[test]
    fn defaults_are_valid_and_problems_name_the_field() {
        assert!(DnsConfig::default().problems().is_empty());
        let mut c = DnsConfig::default();
        c.upstreams.default.servers = vec!["8.8.8.8".into(), "nope".into()];
        c.cache.min_ttl = ConfigDuration(Duration::from_secs(60));
        c.node.interface = "way-too-long-interface".into();
        let fields: Vec<String> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            vec![
                "dns.node.interface",
                "dns.cache.minTtl",
                "dns.upstreams.default.servers[1]"
            ]
        );
    }

    #[test]
    fn the_group_share_is_half_of_max_in_flight_by_default_and_never_more_than_it() {
        let mut c = DnsConfig::default();
        assert_eq!(c.group_in_flight_share(), 1024);
        c.max_in_flight = 1;
        assert_eq!(c.group_in_flight_share(), 1, "at least one");
        c.max_in_flight_per_group = 2;
        let fields: Vec<String> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, vec!["dns.maxInFlightPerGroup"]);
        c.max_in_flight = 8;
        assert!(c.problems().is_empty());
        assert_eq!(c.group_in_flight_share(), 2);
    }

    #[test]
    fn naming_cluster_servers_keeps_tcp_unless_a_protocol_is_given() {
        let c: DnsConfig =
            serde_saphyr::from_str("upstreams:\n  cluster:\n    servers: [10.0.0.10]\n").unwrap();
        assert_eq!(
            c.upstreams.cluster.protocol_or(UpstreamProtocol::Tcp),
            UpstreamProtocol::Tcp
        );
        assert_eq!(
            c.upstreams.default.protocol_or(UpstreamProtocol::Udp),
            UpstreamProtocol::Udp
        );
        let c: DnsConfig = serde_saphyr::from_str(
            "upstreams:\n  cluster:\n    servers: [10.0.0.10]\n    protocol: udp\n",
        )
        .unwrap();
        assert_eq!(
            c.upstreams.cluster.protocol_or(UpstreamProtocol::Tcp),
            UpstreamProtocol::Udp
        );
    }

    #[test]
    fn servers_parse_with_and_without_port() {
        assert_eq!(
            parse_server("10.0.0.10").unwrap(),
            "10.0.0.10:53".parse().unwrap()
        );
        assert_eq!(
            parse_server("[fd00::1]:5353").unwrap(),
            "[fd00::1]:5353".parse().unwrap()
        );
        assert_eq!(
            parse_server("fd00::1").unwrap(),
            "[fd00::1]:53".parse().unwrap()
        );
        assert!(parse_server("dns.example").is_err());
    }

    #[test]
    fn upstream_health_and_zones_are_validated() {
        let mut c = DnsConfig::default();
        c.upstreams.unhealthy_after = 0;
        c.upstreams.probe_interval = ConfigDuration(Duration::from_millis(10));
        c.upstreams.cluster_zones.push("bad..zone".into());
        c.upstreams
            .stub_domains
            .insert(".".into(), vec!["10.0.0.1".into()]);
        let fields: Vec<String> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            vec![
                "dns.upstreams.unhealthyAfter",
                "dns.upstreams.probeInterval",
                "dns.upstreams.clusterZones[3]",
                "dns.upstreams.stubDomains..",
            ]
        );
        assert!(check_zone("corp.example.").is_ok());
    }
}
