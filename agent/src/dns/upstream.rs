//! The upstream forwarder: which group of servers owns a name (cluster zones, stub domains,
//! everything else), sending a client's query there with a fresh random ID (and optional DNS
//! 0x20 case), checking that the answer is the answer to it, TC -> TCP, failover between a
//! group's servers, their health (marked down after consecutive failures, probed back), one
//! pipelined TCP connection per server, and the `dns_upstream_*` metrics.
//!
//! Owns no cache and no client-facing state: the caller bounds in-flight queries, caches, and
//! rewrites the ID and question case of what this returns for its client. Never sends a query
//! to a loopback resolver from the host's resolv.conf (it would come back to us).

mod tcp;
mod udp;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::config::{DnsConfig, UpstreamProtocol, UpstreamsConfig, parse_server};
use super::kube_dns::{KubeDnsConfig, normalize_zone};
use super::resolv_conf::{self, ResolvConf};
use super::wire::{self, outgoing};
use crate::host::HostPaths;

/// Latency buckets: a node-local kube-dns answers in well under a millisecond, a remote
/// resolver in tens; the top buckets are the per-attempt timeout's range.
const LATENCY_BUCKETS: [f64; 13] = [
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Retransmission timeout of a server we have no RTT sample for yet (unbound starts unknown
/// servers at 376 ms): a lost datagram costs this much, not the whole `dns.timeout`.
const INITIAL_RTO: Duration = Duration::from_millis(300);
/// Never retransmit sooner: a loaded upstream's answers vary by tens of milliseconds, and a
/// too-eager retransmission doubles its load (unbound's infra-cache-min-rtt is 50 ms).
const MIN_RTO: Duration = Duration::from_millis(100);
/// Doublings of one query's retransmission timer (each retry of that query doubles its own
/// timer, RFC 6298 5.5, per query: names that never answer do not slow other names' tries).
const MAX_BACKOFF: u32 = 4;

/// How long past `dns.timeout` a query waits for its tries to end on their own timers (each
/// ends by the deadline; this only bounds one that would not).
const DEADLINE_GRACE: Duration = Duration::from_millis(50);

/// Group names as status and logs show them.
pub const CLUSTER_GROUP: &str = "cluster";
pub const DEFAULT_GROUP: &str = "default";

// === errors ===

/// Why forwarding (or building the forwarder) failed. `reason()` is the metrics label.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The group that owns the name has no servers (e.g. `upstreams.cluster.servers` unset).
    #[error("upstream group {group} has no servers")]
    NoServers { group: String },
    /// No valid answer within the attempt's timeout.
    #[error("upstream {server} did not answer in time")]
    Timeout { server: SocketAddr },
    /// Socket error: connection refused (ICMP port unreachable), reset, unreachable network.
    #[error("upstream {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// Answers came but none was the answer to our query (wrong ID or question, QR unset...):
    /// a broken server or a spoofing attempt.
    #[error("upstream {server}: {why}")]
    Malformed { server: SocketAddr, why: String },
    /// Every server tried failed; `last` is the last failure.
    #[error("every server of upstream group {group} failed (last: {last})")]
    AllFailed { group: String, last: String },
    /// A bad configuration value (building the forwarder), named by its field.
    #[error("{field}: {problem}")]
    Config { field: String, problem: String },
    /// A bad kube-dns ConfigMap key: `field` is the key (`stubDomains.<zone>[i]`...); the
    /// previous forwarding stays in place.
    #[error("kube-dns ConfigMap {field}: {problem}")]
    KubeDns { field: String, problem: String },
    /// The client's query cannot be forwarded as is (the caller should have answered FORMERR).
    #[error("query not forwarded: {why}")]
    BadQuery { why: &'static str },
}

impl UpstreamError {
    /// Short, low-cardinality label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::NoServers { .. } => "no_servers",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Io { .. } => "io",
            UpstreamError::Malformed { .. } => "malformed",
            UpstreamError::AllFailed { .. } => "all_failed",
            UpstreamError::Config { .. } => "config",
            UpstreamError::KubeDns { .. } => "kube_dns_config",
            UpstreamError::BadQuery { .. } => "bad_query",
        }
    }
}

/// One server of one group, for `nodekeeper dns status` and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    pub group: String,
    pub address: SocketAddr,
    pub protocol: UpstreamProtocol,
    pub healthy: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// Queries sent to this server (attempts, including TC retries' first half).
    pub queries: u64,
    /// Failed attempts: timeouts, errors, rejected answers, SERVFAIL and REFUSED.
    pub failures: u64,
}

// === metrics ===

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    upstream: String,
    protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    upstream: String,
    reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone)]
struct Metrics {
    latency: HistogramFamily<LatencyLabels>,
    failures: Family<ReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    reconnects: Family<ServerLabel, Counter>,
    healthy: Family<ServerLabel, Gauge>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            failures: Family::default(),
            rejected: Family::default(),
            reconnects: Family::default(),
            healthy: Family::default(),
        };
        registry.register_with_unit(
            "dns_upstream_request_duration",
            "Time from sending a query to an upstream server to its valid answer, by server and transport",
            Unit::Seconds,
            m.latency.clone(),
        );
        registry.register(
            "dns_upstream_failures",
            "Failed upstream attempts by server and reason (timeout, io, malformed, servfail, refused)",
            m.failures.clone(),
        );
        registry.register(
            "dns_upstream_rejected_responses",
            "Upstream datagrams dropped as not the answer to our query (id, question, qr, opcode, short): broken servers or spoofing",
            m.rejected.clone(),
        );
        registry.register(
            "dns_upstream_tcp_reconnects",
            "TCP connections to an upstream server opened after its first one",
            m.reconnects.clone(),
        );
        registry.register(
            "dns_upstream_healthy",
            "1 while an upstream server is used, 0 while it is skipped after consecutive failures",
            m.healthy.clone(),
        );
        m
    }
}

// === impl Server ===

/// One upstream address, shared by every group that lists it: one health state, one TCP
/// connection.
#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    label: String,
    tcp: tcp::TcpClient,
    udp: udp::UdpClient,
    healthy: AtomicBool,
    consecutive: AtomicU32,
    last_error: Mutex<Option<String>>,
    queries: AtomicU64,
    failures: AtomicU64,
    latency_udp: Histogram,
    latency_tcp: Histogram,
    reconnects: Counter,
    healthy_gauge: Gauge,
    rtt: Mutex<RttEstimate>,
    /// Distinct names whose queries got no answer from this server since its last answer
    /// (the health rule: `unhealthyAfter` of them in a row mark it down; one name retried
    /// many times counts once).
    silent_names: Mutex<Vec<String>>,
}

/// Smoothed round-trip time of one server (RFC 6298, as unbound's infra cache keeps per
/// server), from which each UDP try's retransmission timer starts. Only answers feed it: a
/// name that never answers (a dead domain behind the server) says nothing about the server's
/// round trip, so timeouts never raise it (issue #22 finding 3); the back-off is the query's.
#[derive(Debug, Clone, Copy, Default)]
struct RttEstimate {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimate {
    fn rto(&self) -> Duration {
        self.srtt
            .map_or(INITIAL_RTO, |s| (s + 4 * self.rttvar).max(MIN_RTO))
    }

    fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(rtt);
                self.rttvar = self.rttvar * 3 / 4 + diff / 4;
                self.srtt = Some(s * 7 / 8 + rtt / 8);
            }
        }
    }
}

/// How long one query waits after its try number `tries_before` (0 for the first) before it
/// adds another: the server's RTO doubled per earlier try of this query (capped), never more
/// than the budget left shared with the servers not yet asked.
fn retransmit_after(
    rto: Duration,
    tries_before: u32,
    left: Duration,
    not_yet_asked: u32,
) -> Duration {
    (rto * 2u32.pow(tries_before.min(MAX_BACKOFF))).min(left / not_yet_asked.max(1))
}

impl Server {
    fn new(addr: SocketAddr, m: &Metrics) -> Self {
        let label = addr.to_string();
        let lat = |protocol| {
            m.latency
                .get_or_create(&LatencyLabels {
                    upstream: label.clone(),
                    protocol,
                })
                .clone()
        };
        let server = ServerLabel {
            upstream: label.clone(),
        };
        let healthy_gauge = m.healthy.get_or_create(&server).clone();
        healthy_gauge.set(1);
        let (rejected, upstream) = (m.rejected.clone(), label.clone());
        let on_rejected: udp::OnRejected = Arc::new(move |why: outgoing::Rejected| {
            rejected
                .get_or_create(&ReasonLabels {
                    upstream: upstream.clone(),
                    reason: why.as_str(),
                })
                .inc();
        });
        Self {
            addr,
            tcp: tcp::TcpClient::new(addr),
            udp: udp::UdpClient::new(addr, on_rejected),
            healthy: AtomicBool::new(true),
            consecutive: AtomicU32::new(0),
            last_error: Mutex::new(None),
            queries: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency_udp: lat("udp"),
            latency_tcp: lat("tcp"),
            reconnects: m.reconnects.get_or_create(&server).clone(),
            healthy_gauge,
            label,
            rtt: Mutex::default(),
            silent_names: Mutex::default(),
        }
    }

    fn rto(&self) -> Duration {
        self.rtt.lock().expect("rtt lock").rto()
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The server answered (whatever the RCODE): it is reachable.
    fn reachable(&self) {
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
            self.silent_names.lock().expect("silent names lock").clear();
        }
        if !self.healthy.load(Ordering::Relaxed) && !self.healthy.swap(true, Ordering::Relaxed) {
            self.healthy_gauge.set(1);
            tracing::info!(upstream = %self.addr, "upstream server is healthy again");
        }
    }

    /// Counts a failed attempt; `health` failures (no valid answer) also count towards
    /// `unhealthy_after`.
    fn failed(&self, m: &Metrics, reason: &'static str, error: String, health: bool, after: u32) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        m.failures
            .get_or_create(&ReasonLabels {
                upstream: self.label.clone(),
                reason,
            })
            .inc();
        *self.last_error.lock().expect("last_error lock") = Some(error);
        if !health {
            self.reachable();
            return;
        }
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        self.judge(n, after);
    }

    /// A query for `qname` ended without any answer from this server (every try of it timed
    /// out). Counts towards `unhealthy_after` only when no other query timed out for the same
    /// name since the server last answered.
    fn silent(&self, m: &Metrics, qname: &str, error: String, after: u32) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        m.failures
            .get_or_create(&ReasonLabels {
                upstream: self.label.clone(),
                reason: "timeout",
            })
            .inc();
        *self.last_error.lock().expect("last_error lock") = Some(error);
        let name = qname.trim_end_matches('.').to_ascii_lowercase();
        let mut names = self.silent_names.lock().expect("silent names lock");
        if names.contains(&name) {
            return;
        }
        if names.len() < after as usize {
            names.push(name);
        }
        drop(names);
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        self.judge(n, after);
    }

    fn judge(&self, n: u32, after: u32) {
        if n >= after && self.healthy.swap(false, Ordering::Relaxed) {
            self.healthy_gauge.set(0);
            tracing::warn!(upstream = %self.addr, failures = n, "upstream server marked unhealthy; probing it until it answers");
        }
    }
}

// === routing ===

#[derive(Debug)]
struct Group {
    name: String,
    protocol: UpstreamProtocol,
    servers: Vec<Arc<Server>>,
    /// What a health probe asks: `(zone, SOA)` for zone groups, `("", NS)` for the default.
    probe: (String, RecordType),
}

/// Name -> group, rebuilt whole when the kube-dns ConfigMap changes.
#[derive(Debug)]
struct Routes {
    groups: Vec<Arc<Group>>,
    /// Zone (lower-case, no trailing dot) -> index in `groups`.
    zones: HashMap<String, usize>,
    default: usize,
}

impl Routes {
    /// The group of the longest zone that is `qname` or a label-wise suffix of it.
    fn group_for(&self, qname: &str) -> &Arc<Group> {
        let name = qname.strip_suffix('.').unwrap_or(qname);
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        let mut rest = name;
        while !rest.is_empty() {
            if let Some(&i) = self.zones.get(rest) {
                return &self.groups[i];
            }
            rest = match rest.find('.') {
                Some(dot) => &rest[dot + 1..],
                None => "",
            };
        }
        &self.groups[self.default]
    }
}

// === impl Forwarder ===

/// Forwards queries to upstream groups; see the module doc.
#[derive(Debug)]
pub struct Forwarder {
    base: UpstreamsConfig,
    /// The default group's servers from config or the host's resolv.conf.
    default_servers: Vec<SocketAddr>,
    timeout: Duration,
    randomize_case: bool,
    unhealthy_after: u32,
    probe_interval: Duration,
    routes: RwLock<Arc<Routes>>,
    /// Every server object in use, by address, so a rebuild keeps health and connections.
    servers: Mutex<HashMap<SocketAddr, Arc<Server>>>,
    /// What was learnt from the API after the start (issue #15: no API call before the
    /// listeners bind): the cluster group's servers from its Service and the kube-dns
    /// ConfigMap last applied. A rebuild starts from config plus these.
    learnt: Mutex<Learnt>,
    metrics: Metrics,
}

/// See [`Forwarder::learnt`].
#[derive(Debug, Default)]
struct Learnt {
    cluster_servers: Option<Vec<SocketAddr>>,
    kube_dns: KubeDnsConfig,
}

impl Forwarder {
    /// Builds groups from config: cluster zones -> `upstreams.cluster`, stub domains, everything
    /// else -> `upstreams.default` or, when its servers are empty, the non-loopback nameservers
    /// of `<hostPaths.rootfs>/etc/resolv.conf`. Metrics are registered on `registry`.
    pub fn new(
        config: &DnsConfig,
        host: &HostPaths,
        registry: &mut Registry,
    ) -> Result<Arc<Self>, UpstreamError> {
        let u = &config.upstreams;
        let field_err = |field: String, problem: String| UpstreamError::Config {
            field: format!("dns.{field}"),
            problem,
        };
        let parse_all = |field: &str,
                         servers: &[String]|
         -> Result<Vec<SocketAddr>, UpstreamError> {
            servers
                .iter()
                .enumerate()
                .map(|(i, s)| parse_server(s).map_err(|e| field_err(format!("{field}[{i}]"), e)))
                .collect()
        };
        let mut default_servers = parse_all("upstreams.default.servers", &u.default.servers)?;
        if default_servers.is_empty() {
            default_servers = host_nameservers(host)?;
        }
        // Parse the rest now so a bad value fails the build, not the first query.
        parse_all("upstreams.cluster.servers", &u.cluster.servers)?;
        for (zone, servers) in &u.stub_domains {
            parse_all(&format!("upstreams.stubDomains.{zone}"), servers)?;
        }
        if u.cluster.servers.is_empty() && !u.cluster_zones.is_empty() {
            tracing::warn!(
                zones = ?u.cluster_zones,
                "dns.upstreams.cluster.servers is empty: queries in the cluster zones fail (SERVFAIL)"
            );
        }
        let fwd = Arc::new(Self {
            base: u.clone(),
            default_servers,
            timeout: config.timeout.get(),
            randomize_case: config.randomize_case,
            unhealthy_after: u.unhealthy_after.max(1),
            probe_interval: u.probe_interval.get(),
            routes: RwLock::new(Arc::new(Routes {
                groups: Vec::new(),
                zones: HashMap::new(),
                default: 0,
            })),
            servers: Mutex::new(HashMap::new()),
            learnt: Mutex::new(Learnt::default()),
            metrics: Metrics::register(registry),
        });
        fwd.rebuild();
        Ok(fwd)
    }

    /// Forwards one client query (wire bytes, any ID) to the group owning `qname` and returns
    /// the upstream's answer bytes unchanged (its ID and question case are upstream's; the
    /// caller restores its client's). The whole exchange stays within `dns.timeout`: servers
    /// are tried in order, healthy ones only while any is healthy. Over UDP, when a try has no
    /// answer after its server's retransmission timeout (smoothed RTT, 300 ms before the first
    /// sample; doubled per earlier try of this query, never more than the time left shared
    /// with the servers not yet tried) the query is sent again to the next server (or the same
    /// one, when it is alone) with a new ID; every earlier try stays pending, so whichever
    /// valid answer comes first, before the deadline, is taken (a slow server is not a failed
    /// one). A socket error, rejected answer, SERVFAIL or REFUSED rules a server out for this
    /// query; a server asked and silent until the deadline has failed this name (`silent`).
    /// When every server failed but one answered SERVFAIL/REFUSED, that answer is returned
    /// (Ok): the caller decides between it and a stale entry by its RCODE.
    pub async fn forward(&self, query: &[u8], qname: &str) -> Result<Vec<u8>, UpstreamError> {
        let deadline = Instant::now() + self.timeout;
        let routes = self.routes();
        let group = routes.group_for(qname);
        if group.servers.is_empty() {
            return Err(UpstreamError::NoServers {
                group: group.name.clone(),
            });
        }
        let prepared = Arc::new(
            outgoing::Prepared::new(query, self.randomize_case)
                .map_err(|why| UpstreamError::BadQuery { why })?,
        );
        let any_healthy = group.servers.iter().any(|s| s.is_healthy());
        let servers: Vec<&Arc<Server>> = group
            .servers
            .iter()
            .filter(|s| !any_healthy || s.is_healthy())
            .collect();
        let udp = group.protocol == UpstreamProtocol::Udp;
        // Ruled out for this query (answered with an error, or unreachable), asked at all, and
        // left without an answer past a retransmission timer.
        // One allocation for the three (#22-k).
        let mut flags = vec![false; 3 * servers.len()];
        let (out, rest) = flags.split_at_mut(servers.len());
        let (asked, overdue) = rest.split_at_mut(servers.len());
        let mut next = 0;
        let mut sent = 0u32;
        let mut last: Option<String> = None;
        let mut error_answer: Option<Vec<u8>> = None;
        // Every try stays pending until the query ends (answer or deadline): a retransmission
        // adds a try, it never throws one away, so a late answer to an earlier try (a slow
        // upstream, not a failed one) is taken (issue #22 finding 2; unbound does the same).
        // Each try ends by `deadline` on its own timer, so the loop ends when they have.
        let mut tries = FuturesUnordered::new();
        let prepared = &prepared;
        let mut send_now = true;
        let mut retransmit_at = deadline;
        let mut latest: Option<usize> = None;
        // One timer for both the retransmission and the guard past the deadline (a timer per
        // purpose was one more timer-wheel entry per miss; issue #22, #22-j): it is set to the
        // retransmission while time is left, then to the deadline plus its grace.
        let grace_end = deadline + DEADLINE_GRACE;
        let timer = tokio::time::sleep_until(retransmit_at.into());
        tokio::pin!(timer);
        let mut timer_at = Some(retransmit_at);
        let answered = loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if send_now && !left.is_zero() {
                send_now = false;
                let pick = (0..servers.len())
                    .map(|j| (next + j) % servers.len())
                    .find(|&k| !out[k]);
                // Every server answered with an error or is unreachable: what a try still
                // pending would bring is no better (RFC 8767: the caller may serve stale).
                let Some(k) = pick else { break None };
                next = k + 1;
                let server: &Server = servers[k];
                let not_yet_asked = asked.iter().filter(|a| !**a).count() as u32;
                asked[k] = true;
                latest = Some(k);
                server.queries.fetch_add(1, Ordering::Relaxed);
                let protocol = group.protocol;
                tries.push(
                    async move { (k, self.attempt(server, protocol, prepared, deadline).await) },
                );
                retransmit_at = if udp {
                    now + retransmit_after(server.rto(), sent, left, not_yet_asked)
                } else {
                    deadline
                };
                sent += 1;
            }
            if tries.is_empty() {
                break None;
            }
            let wake_at = if left.is_zero() {
                grace_end
            } else {
                retransmit_at
            };
            if timer_at != Some(wake_at) {
                timer_at = Some(wake_at);
                timer.as_mut().reset(wake_at.into());
            }
            tokio::select! {
                done = tries.next() => {
                    let Some((k, result)) = done else { continue };
                    let server = servers[k];
                    match result {
                        Ok(answer) => {
                            let reason = match wire::header_rcode(&answer) {
                                wire::rcode::SERVFAIL => "servfail",
                                wire::rcode::REFUSED => "refused",
                                _ => {
                                    server.reachable();
                                    break Some((k, answer));
                                }
                            };
                            if out[k] {
                                continue;
                            }
                            let e = format!(
                                "upstream {} answered {}",
                                server.addr,
                                reason.to_uppercase()
                            );
                            server.failed(
                                &self.metrics,
                                reason,
                                e.clone(),
                                false,
                                self.unhealthy_after,
                            );
                            last = Some(e);
                            error_answer.get_or_insert(answer);
                            out[k] = true;
                            send_now = true;
                        }
                        // At the deadline: counted once per query below (`silent`).
                        Err(UpstreamError::Timeout { .. }) => {}
                        // A server already ruled out is counted once per query.
                        Err(_) if out[k] => {}
                        Err(e) => {
                            let text = e.to_string();
                            server.failed(
                                &self.metrics,
                                e.reason(),
                                text.clone(),
                                true,
                                self.unhealthy_after,
                            );
                            tracing::debug!(group = %group.name, error = %text, "upstream attempt failed");
                            last = Some(text);
                            out[k] = true;
                            send_now = true;
                        }
                    }
                }
                // Each try ends by the deadline on its own; the grace only guards against one
                // that would not.
                _ = timer.as_mut() => {
                    if timer_at == Some(grace_end) {
                        break None;
                    }
                    if let Some(k) = latest {
                        overdue[k] = true;
                    }
                    send_now = true;
                    // Fired: the next turn sets it again (a new retransmission, or the grace).
                    timer_at = None;
                }
            }
        };
        drop(tries);
        // Asked, neither answered nor ruled out, and left past a retransmission timer (or to
        // the deadline): silent for this name.
        for (k, server) in servers.iter().enumerate() {
            let silent = match &answered {
                Some((by, _)) => *by != k && overdue[k],
                None => asked[k],
            };
            if silent && !out[k] {
                let e = UpstreamError::Timeout {
                    server: server.addr,
                }
                .to_string();
                server.silent(&self.metrics, qname, e.clone(), self.unhealthy_after);
                last.get_or_insert(e);
            }
        }
        if let Some((_, answer)) = answered {
            return Ok(answer);
        }
        if let Some(answer) = error_answer {
            return Ok(answer);
        }
        Err(UpstreamError::AllFailed {
            group: group.name.clone(),
            last: last.unwrap_or_default(),
        })
    }

    /// Per server of each group: group, address, protocol, health, failures, counters.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        let routes = self.routes();
        let mut out = Vec::new();
        for g in &routes.groups {
            for s in &g.servers {
                out.push(UpstreamStatus {
                    group: g.name.clone(),
                    address: s.addr,
                    protocol: g.protocol,
                    healthy: s.is_healthy(),
                    consecutive_failures: s.consecutive.load(Ordering::Relaxed),
                    last_error: s.last_error.lock().expect("last_error lock").clone(),
                    queries: s.queries.load(Ordering::Relaxed),
                    failures: s.failures.load(Ordering::Relaxed),
                });
            }
        }
        out
    }

    /// False when every server of every group is unhealthy (or there is none at all).
    pub fn any_healthy(&self) -> bool {
        self.routes()
            .groups
            .iter()
            .flat_map(|g| &g.servers)
            .any(|s| s.is_healthy())
    }

    /// The name of the group that owns `qname` (`cluster`, `default`, or the stub domain).
    pub fn group_of(&self, qname: &str) -> String {
        self.routes().group_for(qname).name.clone()
    }

    /// Applies a kube-dns ConfigMap's `stubDomains` and `upstreamNameservers` on top of the
    /// config: its upstreams replace the default group's servers when not empty, its stub
    /// domains are merged (the ConfigMap wins for a zone in both). Each call replaces the
    /// previous ConfigMap's effect (an empty map reverts to the config). On a parse error
    /// nothing changes and the error names the key.
    pub fn apply_kube_dns(&self, data: &BTreeMap<String, String>) -> Result<(), UpstreamError> {
        let parsed = KubeDnsConfig::parse(data).map_err(|problems| {
            let mut it = problems.into_iter();
            let (field, mut problem) = it.next().expect("an error has a problem");
            for (f, p) in it {
                problem.push_str(&format!("; {f}: {p}"));
            }
            UpstreamError::KubeDns { field, problem }
        })?;
        tracing::info!(
            stub_domains = parsed.stub_domains.len(),
            upstream_nameservers = parsed.upstream_nameservers.len(),
            "applied the kube-dns ConfigMap"
        );
        self.learnt.lock().expect("learnt lock").kube_dns = parsed;
        self.rebuild();
        Ok(())
    }

    /// The cluster group's servers, learnt from its Service once the API answered (config's
    /// `upstreams.cluster.servers` was empty). Until then cluster zones answer SERVFAIL.
    pub fn set_cluster_servers(&self, servers: Vec<SocketAddr>) {
        self.learnt.lock().expect("learnt lock").cluster_servers = Some(servers);
        self.rebuild();
    }

    /// Probes unhealthy servers every `upstreams.probeInterval` until `token` is cancelled: a
    /// `. NS` query for the default group, `<zone> SOA` for zone groups, over the group's
    /// protocol. Any valid answer (whatever its RCODE) marks the server healthy again.
    pub async fn run_probes(self: Arc<Self>, token: CancellationToken) {
        let mut tick = tokio::time::interval(self.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let routes = self.routes();
            let mut seen = HashSet::new();
            let probes: Vec<_> = routes
                .groups
                .iter()
                .flat_map(|g| g.servers.iter().map(move |s| (g, s)))
                // Every server, healthy or not: an idle node must notice dead upstreams
                // (readiness) without waiting for client queries to fail.
                .filter(|(_, s)| seen.insert(s.addr))
                .map(|(g, s)| self.probe(g, s))
                .collect();
            if probes.is_empty() {
                continue;
            }
            tokio::select! {
                _ = token.cancelled() => return,
                _ = futures::future::join_all(probes) => {}
            }
        }
    }

    async fn probe(&self, group: &Group, server: &Arc<Server>) {
        let query = wire::build::probe_query(&group.probe.0, group.probe.1);
        let prepared = Arc::new(
            outgoing::Prepared::new(&query, false).expect("probe queries are well-formed"),
        );
        let deadline = Instant::now() + self.timeout;
        match self
            .attempt(server, group.protocol, &prepared, deadline)
            .await
        {
            Ok(_) => server.reachable(),
            Err(e) => {
                tracing::debug!(upstream = %server.addr, error = %e, "upstream probe failed");
                server.failed(
                    &self.metrics,
                    "probe",
                    e.to_string(),
                    true,
                    self.unhealthy_after,
                );
            }
        }
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes.read().expect("routes lock").clone()
    }

    /// Builds the routes from the config plus `kube` (the ConfigMap's part), reusing server
    /// objects by address and forgetting servers no group lists any more.
    fn rebuild(&self) {
        let u = &self.base;
        let learnt = self.learnt.lock().expect("learnt lock");
        let kube = &learnt.kube_dns;
        let mut known = self.servers.lock().expect("servers lock");
        let mut used = HashSet::new();
        let mut server = |addr: SocketAddr| {
            used.insert(addr);
            known
                .entry(addr)
                .or_insert_with(|| Arc::new(Server::new(addr, &self.metrics)))
                .clone()
        };
        let parse = |servers: &[String]| -> Vec<SocketAddr> {
            // Validated in `new`.
            servers
                .iter()
                .filter_map(|s| parse_server(s).ok())
                .collect()
        };
        let mut groups = Vec::new();
        let mut zones = HashMap::new();

        let default_addrs = if kube.upstream_nameservers.is_empty() {
            self.default_servers.clone()
        } else {
            kube.upstream_nameservers.clone()
        };
        groups.push(Arc::new(Group {
            name: DEFAULT_GROUP.into(),
            protocol: u.default.protocol_or(UpstreamProtocol::Udp),
            servers: default_addrs.into_iter().map(&mut server).collect(),
            probe: (String::new(), RecordType::NS),
        }));
        if !u.cluster_zones.is_empty() {
            let cluster_zones: Vec<String> =
                u.cluster_zones.iter().map(|z| normalize_zone(z)).collect();
            groups.push(Arc::new(Group {
                name: CLUSTER_GROUP.into(),
                protocol: u.cluster.protocol_or(UpstreamProtocol::Tcp),
                servers: learnt
                    .cluster_servers
                    .clone()
                    .unwrap_or_else(|| parse(&u.cluster.servers))
                    .into_iter()
                    .map(&mut server)
                    .collect(),
                probe: (cluster_zones[0].clone(), RecordType::SOA),
            }));
            for z in cluster_zones {
                zones.insert(z, groups.len() - 1);
            }
        }
        let mut stubs: BTreeMap<String, Vec<SocketAddr>> = u
            .stub_domains
            .iter()
            .map(|(z, s)| (normalize_zone(z), parse(s)))
            .collect();
        stubs.extend(kube.stub_domains.clone());
        for (zone, addrs) in stubs {
            groups.push(Arc::new(Group {
                name: zone.clone(),
                // Stub domains are usually corporate resolvers: UDP, TC -> TCP, as resolv.conf.
                protocol: UpstreamProtocol::Udp,
                servers: addrs.into_iter().map(&mut server).collect(),
                probe: (zone.clone(), RecordType::SOA),
            }));
            zones.insert(zone, groups.len() - 1);
        }
        known.retain(|addr, s| {
            let keep = used.contains(addr);
            if !keep {
                self.metrics.healthy.remove(&ServerLabel {
                    upstream: s.label.clone(),
                });
            }
            keep
        });
        *self.routes.write().expect("routes lock") = Arc::new(Routes {
            groups,
            zones,
            default: 0,
        });
    }

    // --- one attempt at one server ---

    /// One try: UDP (and TCP when the answer is truncated) or TCP, until `deadline`. Returns a
    /// validated answer, whatever its RCODE.
    async fn attempt(
        &self,
        server: &Server,
        protocol: UpstreamProtocol,
        p: &Arc<outgoing::Prepared>,
        deadline: Instant,
    ) -> Result<Vec<u8>, UpstreamError> {
        if protocol == UpstreamProtocol::Tcp {
            return self.tcp_attempt(server, p, deadline).await;
        }
        let started = Instant::now();
        let wait = deadline.saturating_duration_since(started);
        let answer = match server.udp.exchange(p, wait).await {
            Ok(answer) => answer,
            Err(udp::UdpError::Io(source)) => {
                return Err(UpstreamError::Io {
                    server: server.addr,
                    source,
                });
            }
            Err(udp::UdpError::Timeout { rejected: None }) => {
                return Err(UpstreamError::Timeout {
                    server: server.addr,
                });
            }
            Err(udp::UdpError::Timeout {
                rejected: Some(why),
            }) => {
                return Err(UpstreamError::Malformed {
                    server: server.addr,
                    why: format!("{} (and no valid answer in time)", why.describe()),
                });
            }
        };
        let rtt = started.elapsed();
        server.latency_udp.observe(rtt.as_secs_f64());
        server.rtt.lock().expect("rtt lock").sample(rtt);
        if wire::truncated(&answer) {
            return self.tcp_attempt(server, p, deadline).await;
        }
        Ok(answer)
    }

    async fn tcp_attempt(
        &self,
        server: &Server,
        p: &outgoing::Prepared,
        deadline: Instant,
    ) -> Result<Vec<u8>, UpstreamError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let started = Instant::now();
        let mut query = p.bytes.clone();
        let on_connect = |reconnect: bool| {
            if reconnect {
                server.reconnects.inc();
            }
        };
        let (answer, id) = match tokio::time::timeout(
            timeout,
            server.tcp.exchange(&mut query, on_connect),
        )
        .await
        {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    server: server.addr,
                });
            }
            Ok(Err(e)) => {
                let source = match e {
                    tcp::TcpError::Io(e) => e,
                    tcp::TcpError::Closed => io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "TCP connection closed before the answer",
                    ),
                    tcp::TcpError::QueueFull => io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "too many queries pipelined on the TCP connection",
                    ),
                };
                return Err(UpstreamError::Io {
                    server: server.addr,
                    source,
                });
            }
            Ok(Ok(r)) => r,
        };
        if let Err(why) = p.validate(&answer, id) {
            self.metrics
                .rejected
                .get_or_create(&ReasonLabels {
                    upstream: server.label.clone(),
                    reason: why.as_str(),
                })
                .inc();
            return Err(UpstreamError::Malformed {
                server: server.addr,
                why: why.describe().into(),
            });
        }
        server.latency_tcp.observe(started.elapsed().as_secs_f64());
        // RFC 2181 9: a truncated answer is incomplete. Over TCP there is nothing larger to
        // ask with: this server failed this query (never cached, never served).
        if wire::truncated(&answer) {
            return Err(UpstreamError::Malformed {
                server: server.addr,
                why: "answer truncated (TC) over TCP".into(),
            });
        }
        Ok(answer)
    }
}

// === the DNS server's view ===

impl super::server::Upstream for Forwarder {
    fn forward<'a>(
        &'a self,
        query: &'a [u8],
        qname: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>> {
        Box::pin(async move {
            Forwarder::forward(self, query, qname)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn any_healthy(&self) -> bool {
        Forwarder::any_healthy(self)
    }

    fn group_of(&self, qname: &str) -> String {
        Forwarder::group_of(self, qname)
    }
}

impl super::UpstreamStatus for Forwarder {
    fn upstreams(&self) -> Vec<crate::pb::DnsUpstream> {
        self.status()
            .into_iter()
            .map(|s| crate::pb::DnsUpstream {
                group: s.group,
                address: s.address.to_string(),
                protocol: match s.protocol {
                    UpstreamProtocol::Udp => "udp",
                    UpstreamProtocol::Tcp => "tcp",
                }
                .into(),
                healthy: s.healthy,
                queries: s.queries,
                failures: s.failures,
                last_error: s.last_error.unwrap_or_default(),
            })
            .collect()
    }
}

/// The host's resolv.conf nameservers, without loopback ones (a systemd-resolved stub or a
/// local dnsmasq would send our queries back to us, or to a resolver pods must not use).
fn host_nameservers(host: &HostPaths) -> Result<Vec<SocketAddr>, UpstreamError> {
    let path = host.rootfs.join("etc/resolv.conf");
    let field = "dns.upstreams.default.servers".to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| UpstreamError::Config {
        field: field.clone(),
        problem: format!(
            "empty, and the host's {} is unreadable: {e}",
            path.display()
        ),
    })?;
    let rc = ResolvConf::parse(&text);
    for why in &rc.ignored {
        tracing::warn!(path = %path.display(), "{why}");
    }
    let (local, usable): (Vec<_>, Vec<_>) =
        rc.nameservers.into_iter().partition(resolv_conf::is_local);
    if !local.is_empty() {
        tracing::info!(path = %path.display(), skipped = ?local, "skipping loopback nameservers of the host's resolv.conf (they would loop back)");
    }
    if usable.is_empty() {
        let skipped = if local.is_empty() {
            String::new()
        } else {
            format!(
                " (skipped loopback {}: a local stub resolver would send queries back through the cache; set dns.upstreams.default.servers, e.g. to the resolvers systemd-resolved uses)",
                local
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(UpstreamError::Config {
            field,
            problem: format!(
                "empty, and {} has no usable nameserver{skipped}",
                path.display()
            ),
        });
    }
    Ok(usable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_with_resolv(text: &str) -> (tempfile::TempDir, HostPaths) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/resolv.conf"), text).unwrap();
        let host = HostPaths::under(dir.path());
        (dir, host)
    }

    fn forwarder(config: &DnsConfig) -> Arc<Forwarder> {
        let (_dir, host) = host_with_resolv("nameserver 10.9.9.9\n");
        Forwarder::new(config, &host, &mut Registry::default()).unwrap()
    }

    fn config() -> DnsConfig {
        let mut c = DnsConfig::default();
        c.upstreams.cluster.servers = vec!["10.96.0.10".into()];
        c.upstreams
            .stub_domains
            .insert("corp.example".into(), vec!["10.1.0.1".into()]);
        c.upstreams
            .stub_domains
            .insert("dev.corp.example.".into(), vec!["10.2.0.1:5353".into()]);
        c
    }

    #[test]
    fn longest_zone_suffix_wins_label_wise() {
        let f = forwarder(&config());
        assert_eq!(
            f.group_of("kubernetes.default.svc.cluster.local"),
            "cluster"
        );
        assert_eq!(f.group_of("cluster.local"), "cluster");
        assert_eq!(f.group_of("cluster.local."), "cluster");
        assert_eq!(f.group_of("10.0.96.10.in-addr.arpa"), "cluster");
        // Not a label-wise suffix.
        assert_eq!(f.group_of("xcluster.local"), "default");
        assert_eq!(f.group_of("local"), "default");
        assert_eq!(f.group_of("example.com"), "default");
        assert_eq!(f.group_of(""), "default");
        assert_eq!(f.group_of("host.corp.example"), "corp.example");
        assert_eq!(f.group_of("a.b.dev.corp.example"), "dev.corp.example");
        assert_eq!(f.group_of("A.B.DEV.Corp.Example"), "dev.corp.example");
        assert_eq!(f.group_of("notdev.corp.example"), "corp.example");
    }

    #[test]
    fn groups_and_servers_from_config_and_resolv_conf() {
        let f = forwarder(&config());
        let st = f.status();
        let got: Vec<(String, String, UpstreamProtocol)> = st
            .iter()
            .map(|s| (s.group.clone(), s.address.to_string(), s.protocol))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "default".into(),
                    "10.9.9.9:53".into(),
                    UpstreamProtocol::Udp
                ),
                (
                    "cluster".into(),
                    "10.96.0.10:53".into(),
                    UpstreamProtocol::Tcp
                ),
                (
                    "corp.example".into(),
                    "10.1.0.1:53".into(),
                    UpstreamProtocol::Udp
                ),
                (
                    "dev.corp.example".into(),
                    "10.2.0.1:5353".into(),
                    UpstreamProtocol::Udp
                ),
            ]
        );
        assert!(st.iter().all(|s| s.healthy && s.queries == 0));
        assert!(f.any_healthy());
    }

    #[test]
    fn loopback_resolv_conf_nameservers_are_skipped_and_none_left_is_an_error() {
        let (_d, host) =
            host_with_resolv("nameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\n");
        let f = Forwarder::new(&DnsConfig::default(), &host, &mut Registry::default()).unwrap();
        let defaults: Vec<_> = f
            .status()
            .into_iter()
            .filter(|s| s.group == "default")
            .map(|s| s.address.to_string())
            .collect();
        assert_eq!(defaults, vec!["10.0.0.2:53"]);

        let (_d, host) = host_with_resolv("nameserver 127.0.0.53\noptions edns0 trust-ad\n");
        let e = Forwarder::new(&DnsConfig::default(), &host, &mut Registry::default()).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(&e, UpstreamError::Config { field, .. } if field == "dns.upstreams.default.servers")
        );
        assert!(
            text.contains("127.0.0.53") && text.contains("no usable nameserver"),
            "{text}"
        );

        let dir = tempfile::tempdir().unwrap();
        let e = Forwarder::new(
            &DnsConfig::default(),
            &HostPaths::under(dir.path()),
            &mut Registry::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unreadable"), "{e}");
    }

    #[test]
    fn cluster_servers_learnt_after_the_start_survive_a_kube_dns_change() {
        let mut c = config();
        c.upstreams.cluster.servers.clear();
        let f = forwarder(&c);
        let cluster = |f: &Forwarder| -> Vec<String> {
            f.status()
                .into_iter()
                .filter(|s| s.group == "cluster")
                .map(|s| s.address.to_string())
                .collect()
        };
        assert!(
            cluster(&f).is_empty(),
            "no cluster server before the API answered"
        );
        f.set_cluster_servers(vec!["10.96.0.10:53".parse().unwrap()]);
        assert_eq!(cluster(&f), vec!["10.96.0.10:53"]);
        // A ConfigMap applied afterwards rebuilds the groups: the learnt servers stay.
        let data: BTreeMap<String, String> = [(
            "upstreamNameservers".to_string(),
            r#"["8.8.8.8"]"#.to_string(),
        )]
        .into();
        f.apply_kube_dns(&data).unwrap();
        assert_eq!(cluster(&f), vec!["10.96.0.10:53"]);
        // And the ConfigMap stays when the servers are learnt again.
        f.set_cluster_servers(vec!["10.96.0.11:53".parse().unwrap()]);
        assert_eq!(cluster(&f), vec!["10.96.0.11:53"]);
        assert!(
            f.status()
                .iter()
                .any(|s| s.group == "default" && s.address.to_string() == "8.8.8.8:53")
        );
    }

    #[test]
    fn kube_dns_config_map_overrides_default_and_merges_stubs() {
        let f = forwarder(&config());
        let data: BTreeMap<String, String> = [
            (
                "stubDomains".to_string(),
                r#"{"acme.local": ["1.2.3.4"], "corp.example": ["10.1.0.9"]}"#.to_string(),
            ),
            (
                "upstreamNameservers".to_string(),
                r#"["8.8.8.8"]"#.to_string(),
            ),
        ]
        .into();
        f.apply_kube_dns(&data).unwrap();
        let by_group: BTreeMap<String, Vec<String>> =
            f.status().into_iter().fold(BTreeMap::new(), |mut m, s| {
                m.entry(s.group).or_default().push(s.address.to_string());
                m
            });
        assert_eq!(by_group["default"], vec!["8.8.8.8:53"]);
        assert_eq!(by_group["acme.local"], vec!["1.2.3.4:53"]);
        assert_eq!(by_group["corp.example"], vec!["10.1.0.9:53"]);
        assert_eq!(by_group["dev.corp.example"], vec!["10.2.0.1:5353"]);
        assert_eq!(f.group_of("x.acme.local"), "acme.local");

        // A bad ConfigMap changes nothing and names the key.
        let bad: BTreeMap<String, String> = [(
            "upstreamNameservers".to_string(),
            r#"["8.8.8.8", "nope"]"#.to_string(),
        )]
        .into();
        let e = f.apply_kube_dns(&bad).unwrap_err();
        assert!(
            matches!(&e, UpstreamError::KubeDns { field, .. } if field == "upstreamNameservers[1]"),
            "{e}"
        );
        assert_eq!(f.group_of("x.acme.local"), "acme.local");

        // An emptied ConfigMap reverts to the config.
        f.apply_kube_dns(&BTreeMap::new()).unwrap();
        assert_eq!(f.group_of("x.acme.local"), "default");
        assert!(
            f.status()
                .iter()
                .any(|s| s.group == "default" && s.address.to_string() == "10.9.9.9:53")
        );
    }

    #[test]
    fn retransmission_timeout_follows_the_smoothed_rtt_and_backs_off_per_query() {
        let mut rtt = RttEstimate::default();
        assert_eq!(rtt.rto(), INITIAL_RTO, "no sample yet");
        rtt.sample(Duration::from_millis(1));
        assert_eq!(rtt.rto(), MIN_RTO, "a fast server: the floor");
        for _ in 0..50 {
            rtt.sample(Duration::from_millis(200));
        }
        let rto = rtt.rto();
        assert!(
            rto >= Duration::from_millis(200) && rto < Duration::from_millis(300),
            "{rto:?}"
        );
        let long = Duration::from_secs(3600);
        assert_eq!(retransmit_after(rto, 0, long, 1), rto);
        assert_eq!(retransmit_after(rto, 1, long, 1), rto * 2);
        assert_eq!(retransmit_after(rto, 10, long, 1), rto * 16, "capped");
        assert_eq!(
            retransmit_after(rto, 10, Duration::from_millis(90), 3),
            Duration::from_millis(30),
            "never past the budget left, shared with the servers not yet asked"
        );
    }

    #[test]
    fn only_distinct_silent_names_mark_a_server_down_and_an_answer_resets_them() {
        let m = Metrics::register(&mut Registry::default());
        let s = Server::new("10.0.0.1:53".parse().unwrap(), &m);
        for _ in 0..10 {
            s.silent(&m, "dead.example", "timeout".into(), 3);
        }
        assert!(s.is_healthy(), "one name retried counts once");
        s.silent(&m, "Dead2.example.", "timeout".into(), 3);
        s.reachable();
        s.silent(&m, "dead3.example", "timeout".into(), 3);
        s.silent(&m, "dead4.example", "timeout".into(), 3);
        assert!(
            s.is_healthy(),
            "an answer in between starts the count again"
        );
        s.silent(&m, "dead.example", "timeout".into(), 3);
        assert!(!s.is_healthy(), "three distinct names in a row");
        assert_eq!(s.consecutive.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn empty_cluster_group_fails_fast() {
        let mut c = DnsConfig::default();
        c.upstreams.default.servers = vec!["10.0.0.1".into()];
        let f = forwarder(&c);
        let q = wire::build::probe_query("kubernetes.default.svc.cluster.local", RecordType::A);
        let e = f
            .forward(&q, "kubernetes.default.svc.cluster.local")
            .await
            .unwrap_err();
        assert!(
            matches!(e, UpstreamError::NoServers { ref group } if group == "cluster"),
            "{e}"
        );
        let e = f.forward(&q[..5], "example.com").await.unwrap_err();
        assert_eq!(e.reason(), "bad_query");
    }

    #[test]
    fn bad_servers_fail_the_build_naming_the_field() {
        let mut c = DnsConfig::default();
        c.upstreams.cluster.servers = vec!["10.0.0.1".into(), "kube-dns".into()];
        let (_d, host) = host_with_resolv("nameserver 10.0.0.2\n");
        let e = Forwarder::new(&c, &host, &mut Registry::default()).unwrap_err();
        assert!(
            matches!(&e, UpstreamError::Config { field, .. } if field == "dns.upstreams.cluster.servers[1]"),
            "{e}"
        );
    }
}
