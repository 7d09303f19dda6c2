//! A KEDA ScaledObject's `scalerMetadata`, parsed into a typed query, and the one function that
//! evaluates a query over pods' connection census (`evaluate`), shared by the node agent and the
//! aggregator so both compute exactly the same value.
//!
//! Owns the metadata reference (docs/grpc-api.md "KEDA"): every key, its default and its check.
//! Unknown keys and bad values are refused with the field named, all of them at once. Never
//! defaults the pod selector to "all pods".

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::keda_pb::ScaledObjectRef;
use crate::pb;
use crate::selector::Selector;

/// Keys KEDA itself puts in `scalerMetadata` (the trigger's connection settings; KEDA passes the
/// whole trigger metadata through). Accepted and ignored, as are their `*FromEnv` forms.
const KEDA_KEYS: &[&str] = &[
    "scalerAddress",
    "enableTLS",
    "unsafeSsl",
    "caCert",
    "tlsCertFile",
    "tlsClientCert",
    "tlsClientKey",
];

/// nodekeeper's own keys, in the order the reference documents them.
const KEYS: &[&str] = &[
    "metric",
    "target",
    "activationTarget",
    "podNamespace",
    "podSelector",
    "remote",
    "port",
    "poolSize",
    "metricName",
    "minCoverage",
    "lastKnownFor",
];

/// Longest `lastKnownFor`: an hour-old census is no longer a signal to scale on.
const MAX_LAST_KNOWN_FOR: Duration = Duration::from_secs(3600);

/// Longest `metricName` accepted: KEDA prefixes it (`s0-`) and the HPA stores it in a label-sized
/// field of its status.
const MAX_METRIC_NAME: usize = 200;

/// What a query measures, summed over the selected pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Established TCP connections (to `remote` when set, else all).
    Established,
    /// 100 x established connections to `remote` (else every outbound pool) / `poolSize`, per pod.
    PoolUtilization,
    /// Connections waiting in listeners' accept queues (on `port` when set, else every listener).
    AcceptQueue,
    /// TCP sockets in TIME_WAIT.
    TimeWait,
    /// Established connections still open while the pod is terminating.
    OpenAfterDeletion,
    /// Local ports of the ephemeral range in use.
    EphemeralPorts,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::Established,
        Metric::PoolUtilization,
        Metric::AcceptQueue,
        Metric::TimeWait,
        Metric::OpenAfterDeletion,
        Metric::EphemeralPorts,
    ];

    /// The `metric` value that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Established => "established",
            Metric::PoolUtilization => "pool_utilization",
            Metric::AcceptQueue => "accept_queue",
            Metric::TimeWait => "time_wait",
            Metric::OpenAfterDeletion => "open_after_deletion",
            Metric::EphemeralPorts => "ephemeral_ports",
        }
    }

    fn parse(s: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// A `remote` filter: one pool's key as the census writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// An outbound pool, `10.0.0.5:5432` or `[fd00::1]:443` (normalised as the census prints it).
    Addr(SocketAddr),
    /// Inbound connections to one of the pod's listening ports, `*:8080`.
    Inbound(u16),
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Remote::Addr(a) => write!(f, "{a}"),
            Remote::Inbound(p) => write!(f, "*:{p}"),
        }
    }
}

/// One ScaledObject trigger's question, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub metric: Metric,
    /// The HPA's target (per replica with KEDA's default `AverageValue`).
    pub target: f64,
    /// IsActive is `value > activation_target`.
    pub activation_target: f64,
    /// Pods of this namespace only.
    pub namespace: String,
    pub selector: Selector,
    pub remote: Option<Remote>,
    /// `accept_queue`: only the listener on this port.
    pub port: Option<u16>,
    /// `pool_utilization`: the pool's size per pod.
    pub pool_size: Option<u64>,
    /// Stable and unique per (metric, namespace, selector, filters), or the user's override.
    pub metric_name: String,
    /// Which partial fleet answers this trigger accepts (the aggregator; an agent is always
    /// complete).
    pub coverage: CoveragePolicy,
}

/// How much of the fleet must be behind a value. The default, every expected agent answered
/// now, is the only one that never hands the HPA a smaller number than the truth; the two keys
/// trade that for availability, per ScaledObject.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoveragePolicy {
    /// `minCoverage`: percent of the expected agents that must be counted (default 100).
    pub min_percent: f64,
    /// `lastKnownFor`: an agent that does not answer is counted with its last census if that is
    /// at most this old (default: never).
    pub last_known_for: Option<Duration>,
}

impl Default for CoveragePolicy {
    fn default() -> Self {
        Self {
            min_percent: 100.0,
            last_known_for: None,
        }
    }
}

/// Bad `scalerMetadata`: every problem, each as (field, problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.0))]
pub struct QueryError(pub Vec<(String, String)>);

fn render(problems: &[(String, String)]) -> String {
    problems
        .iter()
        .map(|(field, problem)| format!("scalerMetadata.{field}: {problem}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<QueryError> for tonic::Status {
    fn from(e: QueryError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

// === parsing ===

impl Query {
    /// Parses a ScaledObjectRef (its namespace is the default `podNamespace`).
    pub fn parse(r: &ScaledObjectRef) -> Result<Query, QueryError> {
        Self::from_metadata(&r.scaler_metadata, &r.namespace)
    }

    pub fn from_metadata(
        meta: &HashMap<String, String>,
        default_namespace: &str,
    ) -> Result<Query, QueryError> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut bad = |field: &str, problem: String| problems.push((field.to_string(), problem));
        // Sorted, so the message lists problems in a stable order.
        let mut meta: BTreeMap<&str, &str> =
            meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // KEDA resolves `<key>FromEnv: ENV_NAME` from the scale target's container env and sends
        // `<key>FromEnv: <value>` (and drops the key when the variable is unset): the value
        // stands for `<key>`, as for KEDA's own scalers.
        let from_env: Vec<(&str, &str, &str)> = meta
            .iter()
            .filter_map(|(k, v)| Some((*k, k.strip_suffix("FromEnv")?, *v)))
            .collect();
        for (key, base, value) in from_env {
            meta.remove(key);
            if KEDA_KEYS.contains(&base) {
                continue;
            }
            if !KEYS.contains(&base) {
                bad(
                    key,
                    format!(
                        "unknown key: {base:?} is not a key to resolve from the environment \
                         (known: {})",
                        KEYS.join(", ")
                    ),
                );
            } else if meta.contains_key(base) {
                bad(
                    key,
                    format!("{base} is set too: use {base} or {key}, not both"),
                );
            } else {
                meta.insert(base, value);
            }
        }
        for key in meta.keys() {
            if !KEYS.contains(key) && !KEDA_KEYS.contains(key) {
                bad(key, format!("unknown key (known: {})", KEYS.join(", ")));
            }
        }
        let get = |k: &str| meta.get(k).map(|v| v.trim());

        let metric = match get("metric") {
            None | Some("") => {
                bad("metric", format!("required, one of: {}", metric_names()));
                None
            }
            Some(m) => Metric::parse(m).or_else(|| {
                bad("metric", format!("{m:?} is not one of: {}", metric_names()));
                None
            }),
        };
        let target = match get("target") {
            None | Some("") => {
                bad("target", "required (a number > 0)".into());
                None
            }
            Some(t) => match parse_number(t) {
                Ok(v) if v > 0.0 => Some(v),
                Ok(_) => {
                    bad("target", format!("{t:?} must be > 0"));
                    None
                }
                Err(e) => {
                    bad("target", e);
                    None
                }
            },
        };
        let activation_target = match get("activationTarget") {
            None | Some("") => 0.0,
            Some(t) => match parse_number(t) {
                Ok(v) if v >= 0.0 => v,
                Ok(_) => {
                    bad("activationTarget", format!("{t:?} must be >= 0"));
                    0.0
                }
                Err(e) => {
                    bad("activationTarget", e);
                    0.0
                }
            },
        };
        let namespace = match get("podNamespace") {
            Some(ns) if !ns.is_empty() => {
                if !is_dns_label(ns) {
                    bad(
                        "podNamespace",
                        format!("{ns:?} is not a valid namespace name"),
                    );
                }
                ns.to_string()
            }
            _ => {
                if default_namespace.is_empty() {
                    bad(
                        "podNamespace",
                        "required when the ScaledObjectRef has no namespace".into(),
                    );
                }
                default_namespace.to_string()
            }
        };
        let selector = match get("podSelector") {
            None | Some("") => {
                bad(
                    "podSelector",
                    "required: a label selector of the workload's pods (e.g. app=web); \
                     nodekeeper never selects every pod by default"
                        .into(),
                );
                None
            }
            Some(s) => Selector::parse(s).map_err(|e| bad("podSelector", e)).ok(),
        };
        let remote = match get("remote") {
            None | Some("") => None,
            Some(r) => match parse_remote(r) {
                Ok(r) => Some(r),
                Err(e) => {
                    bad("remote", e);
                    None
                }
            },
        };
        let port = match get("port") {
            None | Some("") => None,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    bad("port", format!("{p:?} is not a port number (1-65535)"));
                    None
                }
            },
        };
        let pool_size = match get("poolSize") {
            None | Some("") => None,
            Some(p) => match p.parse::<u64>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    bad("poolSize", format!("{p:?} is not a whole number > 0"));
                    None
                }
            },
        };
        if let Some(m) = metric {
            if remote.is_some() && !matches!(m, Metric::Established | Metric::PoolUtilization) {
                bad(
                    "remote",
                    format!(
                        "only applies to metric established or pool_utilization, not {}",
                        m.name()
                    ),
                );
            }
            if port.is_some() && m != Metric::AcceptQueue {
                bad(
                    "port",
                    format!("only applies to metric accept_queue, not {}", m.name()),
                );
            }
            match (m, pool_size) {
                (Metric::PoolUtilization, None) if get("poolSize").is_none_or(str::is_empty) => {
                    bad(
                        "poolSize",
                        "required for metric pool_utilization (connections per pod at 100%)".into(),
                    );
                }
                (Metric::PoolUtilization, _) | (_, None) => {}
                (other, Some(_)) => bad(
                    "poolSize",
                    format!(
                        "only applies to metric pool_utilization, not {}",
                        other.name()
                    ),
                ),
            }
        }
        let min_percent = match get("minCoverage") {
            None | Some("") => 100.0,
            Some(c) => match parse_number(c) {
                Ok(v) if v > 0.0 && v <= 100.0 => v,
                Ok(_) => {
                    bad(
                        "minCoverage",
                        format!("{c:?} must be a percent of the expected agents, > 0 and <= 100"),
                    );
                    100.0
                }
                Err(e) => {
                    bad("minCoverage", e);
                    100.0
                }
            },
        };
        let last_known_for = match get("lastKnownFor") {
            None | Some("") => None,
            Some(t) => match t.parse::<u64>() {
                Ok(n) if n > 0 && n <= MAX_LAST_KNOWN_FOR.as_secs() => Some(Duration::from_secs(n)),
                _ => {
                    bad(
                        "lastKnownFor",
                        format!(
                            "{t:?} is not a whole number of seconds from 1 to {}",
                            MAX_LAST_KNOWN_FOR.as_secs()
                        ),
                    );
                    None
                }
            },
        };
        let metric_name = match get("metricName") {
            Some(n) if !n.is_empty() => {
                if !is_metric_name(n) {
                    bad(
                        "metricName",
                        format!(
                            "{n:?} is not a metric name (letters, digits, '-', '_', '.', \
                             starting with a letter or digit, at most {MAX_METRIC_NAME})"
                        ),
                    );
                }
                Some(n.to_string())
            }
            _ => None,
        };

        match (metric, target, selector) {
            (Some(metric), Some(target), Some(selector)) if problems.is_empty() => {
                let mut q = Query {
                    metric,
                    target,
                    activation_target,
                    namespace,
                    selector,
                    remote,
                    port,
                    pool_size,
                    metric_name: String::new(),
                    coverage: CoveragePolicy {
                        min_percent,
                        last_known_for,
                    },
                };
                q.metric_name = metric_name.unwrap_or_else(|| q.default_metric_name());
                Ok(q)
            }
            _ => Err(QueryError(problems)),
        }
    }

    /// `nodekeeper-<metric>-<namespace>-<hash>`: the hash (FNV-1a, stable across builds and
    /// platforms) covers everything that changes the value, so two triggers asking different
    /// questions never share a name and the same question always gets the same one.
    pub fn default_metric_name(&self) -> String {
        let identity = format!(
            "{}|{}|{}|{}|{}|{}",
            self.metric.name(),
            self.namespace,
            self.selector,
            self.remote
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            self.port.map(|p| p.to_string()).unwrap_or_default(),
            self.pool_size.map(|p| p.to_string()).unwrap_or_default(),
        );
        format!(
            "nodekeeper-{}-{}-{:08x}",
            self.metric.name().replace('_', "-"),
            self.namespace,
            fnv1a(identity.as_bytes()) as u32
        )
    }
}

fn metric_names() -> String {
    Metric::ALL.map(Metric::name).join(", ")
}

fn parse_number(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a number")),
    }
}

fn parse_remote(s: &str) -> Result<Remote, String> {
    if let Some(port) = s.strip_prefix("*:") {
        return match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(Remote::Inbound(p)),
            _ => Err(format!("{s:?}: {port:?} is not a port number (1-65535)")),
        };
    }
    let addr = s.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not IP:PORT ([IPv6]:PORT) or *:PORT for inbound connections")
    })?;
    // The census names peers without a scope id (BPF and sock_diag read none), so a
    // `[fe80::1%2]:p` would match no pool and read 0: refused rather than silently 0.
    if let SocketAddr::V6(v6) = addr
        && v6.scope_id() != 0
    {
        return Err(format!(
            "{s:?}: an IPv6 scope id (%{}) is not supported; the census names peers without one",
            v6.scope_id()
        ));
    }
    // The census names a dual-stack socket's IPv4-mapped peer by its IPv4 address
    // (`metrics::connections::ip_from_v6`), so `[::ffff:a.b.c.d]:p` is the pool `a.b.c.d:p`.
    let addr = match addr {
        SocketAddr::V6(v6) => {
            SocketAddr::new(crate::metrics::connections::ip_from_v6(*v6.ip()), v6.port())
        }
        SocketAddr::V4(_) => addr,
    };
    // No established TCP connection has such a peer, so no pool would ever match and the
    // query could only read 0 (adversary #18c): refused naming the field instead.
    if addr.port() == 0 {
        return Err(format!("{s:?}: port 0 is not a port number (1-65535)"));
    }
    let ip = addr.ip();
    let why = if ip.is_unspecified() {
        Some("the unspecified address (it means \"any\" when listening; no peer has it)")
    } else if ip.is_multicast() {
        Some("a multicast address (TCP has no multicast peers)")
    } else if matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address (TCP has no broadcast peers)")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(format!(
            "{s:?}: {why}; name a pod's peer IP:PORT, or *:PORT for inbound connections"
        ));
    }
    Ok(Remote::Addr(addr))
}

/// A namespace name: an RFC 1123 label.
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_metric_name(s: &str) -> bool {
    s.len() <= MAX_METRIC_NAME
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// 64-bit FNV-1a: tiny, and unlike std's hasher its output is fixed by definition.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// === evaluation ===

/// A query's value over a census, and what went into it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Evaluation {
    pub value: f64,
    /// Pods in the namespace whose labels matched the selector and whose census succeeded.
    pub matched: usize,
    /// Matching pods whose census failed (`error` set): skipped, their value unknown.
    pub failed: usize,
    /// Matching pods the metric cannot be attributed to (`time_wait` of a hostNetwork pod:
    /// TIME_WAIT sockets have no owner, decision #18-n): skipped, their value unknown.
    pub unattributable: usize,
    /// Matching hostNetwork pods whose value for this query lacks queued connections of a port
    /// they share with another process's listener (`unattributed_queues`, decision #18-q):
    /// skipped, their value unknown.
    pub unattributed_queued: usize,
    /// The most listeners sharing one such port (for the error's reason).
    pub shared_listeners: u32,
    /// Matching pods whose `accept_queue` on the query's `port` is not in the census: the pod
    /// has more listeners than `topListeners` and none kept is on that port (decision #18-r).
    pub beyond_top_listeners: usize,
}

/// Two disjoint sets of pods together (the aggregator sums agent by agent).
impl Evaluation {
    /// Every matching pod, whatever became of it (the "of N selected" in the scaler's errors).
    pub fn selected(&self) -> usize {
        self.matched
            + self.failed
            + self.unattributable
            + self.unattributed_queued
            + self.beyond_top_listeners
    }
}

impl std::ops::Add for Evaluation {
    type Output = Evaluation;

    fn add(self, other: Evaluation) -> Evaluation {
        Evaluation {
            value: self.value + other.value,
            matched: self.matched + other.matched,
            failed: self.failed + other.failed,
            unattributable: self.unattributable + other.unattributable,
            unattributed_queued: self.unattributed_queued + other.unattributed_queued,
            shared_listeners: self.shared_listeners.max(other.shared_listeners),
            beyond_top_listeners: self.beyond_top_listeners + other.beyond_top_listeners,
        }
    }
}

/// The query's value: the metric summed over the pods it selects. Pods whose census failed are
/// skipped and counted in `failed` (unless terminating: see the body). Pure: the agent and the aggregator both call it.
pub fn evaluate(q: &Query, pods: &[pb::PodConnections]) -> Evaluation {
    let mut out = Evaluation::default();
    for pod in pods {
        if pod.namespace != q.namespace || !q.selector.matches(&pod.labels) {
            continue;
        }
        if !pod.error.is_empty() {
            // A terminating pod that cannot be counted (its last process gone, its namespace
            // with it) holds nothing it will keep: left out, not unknown (decisions #18-f).
            if pod.deletion_timestamp.is_none() {
                out.failed += 1;
            }
            continue;
        }
        if q.metric == Metric::TimeWait && pod.host_network {
            // Its TIME_WAIT sockets are among the host's, owned by no process: a count would
            // be 0 or someone else's (decision #18-n).
            out.unattributable += 1;
            continue;
        }
        if let Some(listeners) = shared_queue(q, pod) {
            // Queued connections counted to nobody: the pod's value lacks some of them
            // (decision #18-q).
            out.unattributed_queued += 1;
            out.shared_listeners = out.shared_listeners.max(listeners);
            continue;
        }
        if q.metric == Metric::AcceptQueue && port_beyond_top_listeners(q, pod) {
            out.beyond_top_listeners += 1;
            continue;
        }
        out.matched += 1;
        out.value += pod_value(q, pod);
    }
    out
}

/// The most listeners sharing a port whose unattributed queued connections `q`'s value over
/// `pod` would lack, or None when the value is exact. Queued children are inbound connections
/// to the shared port: outbound pools and listeners' accept queues (each listener's own) do not
/// hold them; the rest (established, the port's inbound pool, ephemeral ports in use,
/// open_after_deletion) may.
fn shared_queue(q: &Query, pod: &pb::PodConnections) -> Option<u32> {
    let port = match (q.metric, &q.remote) {
        (Metric::AcceptQueue | Metric::TimeWait, _) => return None,
        (Metric::PoolUtilization, None) | (_, Some(Remote::Addr(_))) => return None,
        (_, Some(Remote::Inbound(p))) => Some(u32::from(*p)),
        (Metric::Established | Metric::OpenAfterDeletion | Metric::EphemeralPorts, None) => None,
    };
    pod.unattributed_queues
        .iter()
        .filter(|u| u.queued > 0 && port.is_none_or(|p| u.port == p))
        .map(|u| u.listeners)
        .max()
}

fn pod_value(q: &Query, pod: &pb::PodConnections) -> f64 {
    let remote = q.remote.as_ref().map(ToString::to_string);
    let to_remote = |r: &str| pool_established(pod, |p| p == r);
    match q.metric {
        Metric::Established => match &remote {
            Some(r) => to_remote(r),
            None => pod.established as f64,
        },
        Metric::PoolUtilization => {
            let established = match &remote {
                Some(r) => to_remote(r),
                // Every outbound pool: inbound ones ("*:PORT", and "*:other" beyond topRemotes)
                // are not the pod's pool.
                None => pool_established(pod, |p| !p.starts_with("*:")),
            };
            let size = q.pool_size.unwrap_or(1).max(1) as f64;
            100.0 * established / size
        }
        // Over every listener: the census's total when its list was cut (decision #18-r). On a
        // port: the list keeps every listener of a port it names (`port_beyond_top_listeners`
        // refuses the others).
        Metric::AcceptQueue if q.port.is_none() && listeners_cut(pod) => {
            pod.accept_queue_total as f64
        }
        Metric::AcceptQueue => pod
            .listeners
            .iter()
            .filter(|l| q.port.is_none_or(|p| l.port == u32::from(p)))
            .map(|l| l.accept_queue as f64)
            .sum(),
        Metric::TimeWait => pod.tcp_states.get("time_wait").copied().unwrap_or(0) as f64,
        Metric::OpenAfterDeletion => pod.open_after_deletion as f64,
        Metric::EphemeralPorts => pod.ephemeral_ports_in_use as f64,
    }
}

/// The census's listener list was cut to `topListeners` (an agent before #18-r sends no
/// `listeners_total`: its list is read as whole, as it did).
fn listeners_cut(pod: &pb::PodConnections) -> bool {
    pod.listeners_total > pod.listeners.len() as u64
}

/// The query names a port no listener of the cut list is on: its listener, if any, is among
/// those cut, its queue unknown.
fn port_beyond_top_listeners(q: &Query, pod: &pb::PodConnections) -> bool {
    q.port.is_some_and(|p| {
        listeners_cut(pod) && !pod.listeners.iter().any(|l| l.port == u32::from(p))
    })
}

fn pool_established(pod: &pb::PodConnections, want: impl Fn(&str) -> bool) -> f64 {
    pod.pools
        .iter()
        .filter(|p| want(&p.remote))
        .map(|p| p.established as f64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn query(pairs: &[(&str, &str)]) -> Query {
        Query::from_metadata(&meta(pairs), "shop").unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        Query::from_metadata(&meta(pairs), "shop")
            .expect_err("must be refused")
            .to_string()
    }

    /// A pod with the census fields the metrics read.
    struct PodSeed(pb::PodConnections);

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> PodSeed {
        PodSeed(pb::PodConnections {
            uid: format!("uid-{name}"),
            namespace: ns.into(),
            name: name.into(),
            labels: meta(labels),
            ..Default::default()
        })
    }

    impl PodSeed {
        fn pool(mut self, remote: &str, established: u64) -> Self {
            self.0.pools.push(pb::ConnectionPool {
                remote: remote.into(),
                established,
                active: established,
                remotes: 1,
                ..Default::default()
            });
            self.0.established += established;
            self.0
                .tcp_states
                .insert("established".into(), self.0.established);
            self
        }
        fn listener(mut self, port: u32, accept_queue: u64) -> Self {
            self.0.listeners.push(pb::Listener {
                address: format!("0.0.0.0:{port}"),
                port,
                accept_queue,
                backlog: 128,
            });
            self
        }
        fn time_wait(mut self, n: u64) -> Self {
            self.0.tcp_states.insert("time_wait".into(), n);
            self
        }
        fn terminating(mut self, open: u64) -> Self {
            self.0.deletion_timestamp = Some(prost_types::Timestamp::default());
            self.0.open_after_deletion = open;
            self
        }
        fn ephemeral(mut self, n: u64) -> Self {
            self.0.ephemeral_ports_in_use = n;
            self
        }
        fn failed(mut self) -> Self {
            self.0.error = "network namespace vanished".into();
            self
        }
        fn done(self) -> pb::PodConnections {
            self.0
        }
    }

    const WEB: &[(&str, &str)] = &[("app", "web"), ("tier", "front")];

    /// Two web pods and their neighbours: another app, another namespace, a failed census.
    fn fleet() -> Vec<pb::PodConnections> {
        vec![
            pod("shop", "web-1", WEB)
                .pool("10.0.0.5:5432", 30)
                .pool("10.0.0.6:6379", 4)
                .pool("*:8080", 12)
                .listener(8080, 3)
                .listener(9090, 1)
                .time_wait(7)
                .ephemeral(40)
                .done(),
            pod("shop", "web-2", WEB)
                .pool("10.0.0.5:5432", 10)
                .pool("*:8080", 2)
                .listener(8080, 5)
                .time_wait(2)
                .ephemeral(11)
                .terminating(9)
                .done(),
            pod("shop", "api-1", &[("app", "api")])
                .pool("10.0.0.5:5432", 100)
                .listener(8080, 50)
                .time_wait(100)
                .done(),
            pod("other", "web-9", WEB)
                .pool("10.0.0.5:5432", 1000)
                .listener(8080, 500)
                .done(),
            pod("shop", "web-3", WEB)
                .pool("10.0.0.5:5432", 77)
                .failed()
                .done(),
        ]
    }

    fn value(pairs: &[(&str, &str)]) -> Evaluation {
        evaluate(&query(pairs), &fleet())
    }

    #[test]
    fn established_sums_matching_pods_in_the_namespace_and_skips_failed_ones() {
        let e = value(&[
            ("metric", "established"),
            ("target", "50"),
            ("podSelector", "app=web"),
        ]);
        assert_eq!(e.value, (30 + 4 + 12 + 10 + 2) as f64);
        assert_eq!((e.matched, e.failed), (2, 1));
    }

    #[test]
    fn established_to_one_remote_and_to_an_inbound_port() {
        let to_db = value(&[
            ("metric", "established"),
            ("target", "50"),
            ("podSelector", "app=web"),
            ("remote", "10.0.0.5:5432"),
        ]);
        assert_eq!(to_db.value, 40.0);
        let inbound = value(&[
            ("metric", "established"),
            ("target", "50"),
            ("podSelector", "app=web"),
            ("remote", "*:8080"),
        ]);
        assert_eq!(inbound.value, 14.0);
        let nobody = value(&[
            ("metric", "established"),
            ("target", "50"),
            ("podSelector", "app=web"),
            ("remote", "10.9.9.9:1"),
        ]);
        assert_eq!(nobody.value, 0.0);
    }

    #[test]
    fn pool_utilization_is_percent_of_pool_size_summed_per_pod() {
        let e = value(&[
            ("metric", "pool_utilization"),
            ("target", "80"),
            ("podSelector", "app=web"),
            ("remote", "10.0.0.5:5432"),
            ("poolSize", "20"),
        ]);
        // web-1: 30/20 = 150 %, web-2: 10/20 = 50 %.
        assert_eq!(e.value, 200.0);
        let outbound = value(&[
            ("metric", "pool_utilization"),
            ("target", "80"),
            ("podSelector", "app=web"),
            ("poolSize", "10"),
        ]);
        // Outbound pools only: web-1 30+4, web-2 10; inbound *:8080 is not a pool.
        assert_eq!(outbound.value, 440.0);
        // Beyond topRemotes: outbound `other` counts, inbound `*:other` (clients) does not.
        let folded = pod("shop", "web-1", WEB)
            .pool("10.0.0.5:5432", 6)
            .pool("other", 3)
            .pool("*:other", 9)
            .done();
        let q = query(&[
            ("metric", "pool_utilization"),
            ("target", "80"),
            ("podSelector", "app=web"),
            ("poolSize", "10"),
        ]);
        assert_eq!(evaluate(&q, &[folded]).value, 90.0);
    }

    #[test]
    fn accept_queue_over_every_listener_or_one_port() {
        let all = value(&[
            ("metric", "accept_queue"),
            ("target", "5"),
            ("podSelector", "app=web"),
        ]);
        assert_eq!(all.value, 9.0);
        let port = value(&[
            ("metric", "accept_queue"),
            ("target", "5"),
            ("podSelector", "app=web"),
            ("port", "8080"),
        ]);
        assert_eq!(port.value, 8.0);
    }

    #[test]
    fn accept_queue_of_a_cut_listener_list_is_the_total_or_unavailable_by_port() {
        // 12 listeners counted, 2 kept (8080 and 9090): 30 queued over all of them.
        let mut cut = pod("shop", "gw-1", WEB)
            .listener(8080, 7)
            .listener(9090, 5)
            .done();
        cut.listeners_total = 12;
        cut.accept_queue_total = 30;
        let q = |extra: Option<(&str, &str)>| {
            let mut m = vec![
                ("metric", "accept_queue"),
                ("target", "5"),
                ("podSelector", "app=web"),
            ];
            m.extend(extra);
            query(&m)
        };
        let e = evaluate(&q(None), std::slice::from_ref(&cut));
        assert_eq!((e.value, e.matched), (30.0, 1), "every listener: the total");
        let e = evaluate(&q(Some(("port", "9090"))), std::slice::from_ref(&cut));
        assert_eq!((e.value, e.matched), (5.0, 1), "a kept port: its listeners");
        let e = evaluate(&q(Some(("port", "9011"))), std::slice::from_ref(&cut));
        assert_eq!(
            (e.value, e.matched, e.beyond_top_listeners),
            (0.0, 0, 1),
            "a port not kept: unknown, never 0"
        );
        // A whole list (or an agent before #18-r: no listeners_total): the list's sum, and a
        // port without a listener is 0.
        let whole = pod("shop", "gw-2", WEB).listener(8080, 7).done();
        let e = evaluate(&q(Some(("port", "9011"))), std::slice::from_ref(&whole));
        assert_eq!((e.value, e.matched, e.beyond_top_listeners), (0.0, 1, 0));
        assert_eq!(evaluate(&q(None), &[whole]).value, 7.0);
    }

    #[test]
    fn time_wait_open_after_deletion_and_ephemeral_ports() {
        let sel = ("podSelector", "app=web");
        assert_eq!(
            value(&[("metric", "time_wait"), ("target", "1"), sel]).value,
            9.0
        );
        assert_eq!(
            value(&[("metric", "open_after_deletion"), ("target", "1"), sel]).value,
            9.0
        );
        assert_eq!(
            value(&[("metric", "ephemeral_ports"), ("target", "1"), sel]).value,
            51.0
        );
    }

    #[test]
    fn time_wait_of_a_host_network_pod_is_unattributable_not_zero() {
        let mut host = pod("shop", "gw-1", WEB).time_wait(0).listener(80, 5).done();
        host.host_network = true;
        let own = pod("shop", "web-1", WEB).time_wait(2).done();
        let pods = [host, own];
        let q = query(&[
            ("metric", "time_wait"),
            ("target", "1"),
            ("podSelector", "app=web"),
        ]);
        let e = evaluate(&q, &pods);
        assert_eq!((e.value, e.matched, e.unattributable), (2.0, 1, 1));
        // Other metrics of a hostNetwork pod are attributed (its sockets and queued children).
        let q = query(&[
            ("metric", "accept_queue"),
            ("target", "1"),
            ("podSelector", "app=web"),
        ]);
        let e = evaluate(&q, &pods);
        assert_eq!((e.value, e.matched, e.unattributable), (5.0, 2, 0));
    }

    #[test]
    fn a_host_network_pods_shared_port_queue_is_unattributable_where_it_counts() {
        // gw-1 shares port 80 (3 listeners) with queued connections counted to nobody; it
        // has 4 accepted on 80, 2 outbound to 10.0.0.5:5432 and 5 in its own accept queue.
        let mut host = pod("shop", "gw-1", WEB)
            .pool("*:80", 4)
            .pool("10.0.0.5:5432", 2)
            .listener(80, 5)
            .done();
        host.host_network = true;
        host.unattributed_queues.push(pb::UnattributedQueue {
            port: 80,
            listeners: 3,
            queued: 6,
        });
        let pods = [
            host.clone(),
            pod("shop", "web-1", WEB).pool("*:80", 1).done(),
        ];
        let eval = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("target", "1"), ("podSelector", "app=web")];
            pairs.extend_from_slice(extra);
            let e = evaluate(&query(&pairs), &pods);
            (
                e.value,
                e.matched,
                e.unattributed_queued,
                e.shared_listeners,
            )
        };
        for unknown in [
            vec![("metric", "established")],
            vec![("metric", "established"), ("remote", "*:80")],
            vec![
                ("metric", "pool_utilization"),
                ("remote", "*:80"),
                ("poolSize", "4"),
            ],
            vec![("metric", "ephemeral_ports")],
            vec![("metric", "open_after_deletion")],
        ] {
            assert_eq!(eval(&unknown).2, 1, "{unknown:?}");
            assert_eq!(eval(&unknown).3, 3, "{unknown:?}");
            assert_eq!(eval(&unknown).1, 1, "{unknown:?}: only web-1 is summed");
        }
        // Exact: outbound pools, another inbound port, each listener's own accept queue.
        assert_eq!(
            eval(&[("metric", "established"), ("remote", "10.0.0.5:5432")]),
            (2.0, 2, 0, 0)
        );
        assert_eq!(
            eval(&[("metric", "pool_utilization"), ("poolSize", "2")]),
            (100.0, 2, 0, 0)
        );
        assert_eq!(
            eval(&[("metric", "established"), ("remote", "*:81")]),
            (0.0, 2, 0, 0)
        );
        assert_eq!(eval(&[("metric", "accept_queue")]), (5.0, 2, 0, 0));
        // No queued connections left: exact again.
        host.unattributed_queues.clear();
        let pods = [host];
        let e = evaluate(
            &query(&[
                ("metric", "established"),
                ("target", "1"),
                ("podSelector", "app=web"),
            ]),
            &pods,
        );
        assert_eq!((e.value, e.matched, e.unattributed_queued), (6.0, 1, 0));
    }

    #[test]
    fn selectors_narrow_and_the_namespace_defaults_to_the_scaled_object() {
        let sel = |s| value(&[("metric", "time_wait"), ("target", "1"), ("podSelector", s)]);
        assert_eq!(sel("app in (web,api)").value, 109.0);
        assert_eq!(sel("app notin (web)").value, 100.0);
        assert_eq!(sel("tier").value, 9.0);
        assert_eq!(sel("!tier").value, 100.0);
        assert_eq!(sel("app=web,tier!=front").value, 0.0);
        let other = value(&[
            ("metric", "time_wait"),
            ("target", "1"),
            ("podSelector", "app=web"),
            ("podNamespace", "other"),
        ]);
        assert_eq!((other.value, other.matched), (0.0, 1));
        let q = query(&[
            ("metric", "accept_queue"),
            ("target", "1"),
            ("podSelector", "app=web"),
            ("podNamespace", "other"),
        ]);
        assert_eq!(evaluate(&q, &fleet()).value, 500.0);
    }

    #[test]
    fn pods_without_a_namespace_never_match() {
        // Standalone agents cannot name pods: such pods are never counted for a workload.
        let mut pods = fleet();
        for p in &mut pods {
            p.namespace.clear();
        }
        let e = evaluate(
            &query(&[
                ("metric", "established"),
                ("target", "1"),
                ("podSelector", "app=web"),
            ]),
            &pods,
        );
        assert_eq!((e.value, e.matched, e.failed), (0.0, 0, 0));
    }

    #[test]
    fn defaults_and_keda_keys() {
        let q = query(&[
            ("metric", "established"),
            ("target", "12.5"),
            ("podSelector", "app=web"),
            (
                "scalerAddress",
                "nodekeeper-aggregator.nodekeeper-system.svc:9743",
            ),
            ("unsafeSsl", "false"),
            ("caCertFromEnv", "resolved"),
        ]);
        assert_eq!(q.target, 12.5);
        assert_eq!(q.activation_target, 0.0);
        assert_eq!(q.namespace, "shop");
        assert_eq!((q.remote.clone(), q.port, q.pool_size), (None, None, None));
        assert!(
            q.metric_name.starts_with("nodekeeper-established-shop-"),
            "{}",
            q.metric_name
        );
        let named = query(&[
            ("metric", "established"),
            ("target", "1"),
            ("podSelector", "app=web"),
            ("metricName", "db-connections"),
        ]);
        assert_eq!(named.metric_name, "db-connections");
        assert_eq!(q.coverage, CoveragePolicy::default());
        let partial = query(&[
            ("metric", "established"),
            ("target", "1"),
            ("podSelector", "app=web"),
            ("minCoverage", "90"),
            ("lastKnownFor", "120"),
        ]);
        assert_eq!(
            partial.coverage,
            CoveragePolicy {
                min_percent: 90.0,
                last_known_for: Some(Duration::from_secs(120)),
            }
        );
        // The policy decides which answers are accepted, not the value: the name stays.
        assert_eq!(
            partial.metric_name,
            query(&[
                ("metric", "established"),
                ("target", "1"),
                ("podSelector", "app=web")
            ])
            .metric_name
        );
    }

    #[test]
    fn from_env_keys_are_resolved_as_keda_sends_them() {
        // KEDA sends `targetFromEnv: <the env var's value>`: it stands for `target`.
        let q = query(&[
            ("metric", "established"),
            ("targetFromEnv", "40"),
            ("podSelectorFromEnv", "app=web"),
        ]);
        assert_eq!(
            (q.target, q.selector.to_string()),
            (40.0, "app=web".to_string())
        );
        assert_eq!(
            q,
            query(&[
                ("metric", "established"),
                ("target", "40"),
                ("podSelector", "app=web")
            ])
        );
        let e = error(&[
            ("metric", "established"),
            ("target", "5"),
            ("targetFromEnv", "40"),
            ("podSelector", "app=web"),
            ("passwordFromEnv", "x"),
        ]);
        assert!(
            e.contains("scalerMetadata.targetFromEnv: target is set too: use target or targetFromEnv, not both"),
            "{e}"
        );
        assert!(
            e.contains(
                "scalerMetadata.passwordFromEnv: unknown key: \"password\" is not a key to resolve"
            ),
            "{e}"
        );
        // A resolved value is checked like any other.
        let e = error(&[
            ("metric", "established"),
            ("targetFromEnv", "abc"),
            ("podSelector", "a=b"),
        ]);
        assert!(
            e.contains("scalerMetadata.target: \"abc\" is not a number"),
            "{e}"
        );
    }

    #[test]
    fn default_metric_name_is_stable_and_differs_per_question() {
        let base = [
            ("metric", "established"),
            ("target", "5"),
            ("podSelector", "app=web,tier=front"),
        ];
        let a = query(&base);
        let reordered = query(&[
            ("metric", "established"),
            ("target", "99"),
            ("podSelector", "tier=front, app==web"),
        ]);
        assert_eq!(
            a.metric_name, reordered.metric_name,
            "target and spelling do not change it"
        );
        // FNV-1a of "established|shop|app=web,tier=front|||" (checked with Python); a change here
        // renames every ScaledObject's metric.
        assert_eq!(a.metric_name, "nodekeeper-established-shop-ee435ee1");
        let mut others = vec![
            query(&[
                ("metric", "established"),
                ("target", "5"),
                ("podSelector", "app=api,tier=front"),
            ])
            .metric_name,
            query(&[
                ("metric", "established"),
                ("target", "5"),
                ("podSelector", "app=web,tier=front"),
                ("remote", "10.0.0.5:5432"),
            ])
            .metric_name,
            query(&[
                ("metric", "established"),
                ("target", "5"),
                ("podSelector", "app=web,tier=front"),
                ("podNamespace", "shop2"),
            ])
            .metric_name,
            query(&[
                ("metric", "time_wait"),
                ("target", "5"),
                ("podSelector", "app=web,tier=front"),
            ])
            .metric_name,
        ];
        others.push(a.metric_name.clone());
        let n = others.len();
        others.sort();
        others.dedup();
        assert_eq!(others.len(), n, "{others:?}");
    }

    #[test]
    fn remote_is_normalised_as_the_census_prints_it() {
        let q = query(&[
            ("metric", "established"),
            ("target", "1"),
            ("podSelector", "app=web"),
            ("remote", "[fd00:0::1]:443"),
        ]);
        assert_eq!(q.remote.unwrap().to_string(), "[fd00::1]:443");
        // An IPv4-mapped peer is named by its IPv4 address in the census (sock_diag.rs).
        for mapped in ["[::ffff:127.0.0.1]:5432", "[::FFFF:7f00:1]:5432"] {
            let q = query(&[
                ("metric", "established"),
                ("target", "1"),
                ("podSelector", "app=web"),
                ("remote", mapped),
            ]);
            assert_eq!(q.remote.unwrap().to_string(), "127.0.0.1:5432", "{mapped}");
        }
    }

    #[test]
    fn activation_target_decides_is_active() {
        let q = query(&[
            ("metric", "time_wait"),
            ("target", "1"),
            ("activationTarget", "9"),
            ("podSelector", "app=web"),
        ]);
        assert_eq!(q.activation_target, 9.0);
    }

    #[test]
    fn bad_metadata_names_the_field() {
        let sel = ("podSelector", "app=web");
        for (pairs, want) in [
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    ("minCoverage", "0"),
                    sel,
                ],
                r#"scalerMetadata.minCoverage: "0" must be a percent of the expected agents, > 0 and <= 100"#,
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    ("minCoverage", "0.9x"),
                    sel,
                ],
                r#"scalerMetadata.minCoverage: "0.9x" is not a number"#,
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    ("minCoverage", "101"),
                    sel,
                ],
                r#"scalerMetadata.minCoverage: "101" must be a percent"#,
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    ("lastKnownFor", "30s"),
                    sel,
                ],
                r#"scalerMetadata.lastKnownFor: "30s" is not a whole number of seconds from 1 to 3600"#,
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    ("lastKnownFor", "3601"),
                    sel,
                ],
                r#"scalerMetadata.lastKnownFor: "3601" is not a whole number of seconds"#,
            ),
            (
                vec![("metric", "established"), ("target", "abc"), sel],
                r#"scalerMetadata.target: "abc" is not a number"#,
            ),
            (
                vec![("metric", "established"), ("target", "0"), sel],
                r#"scalerMetadata.target: "0" must be > 0"#,
            ),
            (
                vec![("metric", "established"), ("target", "NaN"), sel],
                "scalerMetadata.target: \"NaN\" is not a number",
            ),
            (
                vec![("metric", "established"), sel],
                "scalerMetadata.target: required",
            ),
            (
                vec![("target", "1"), sel],
                "scalerMetadata.metric: required, one of: established, pool_utilization",
            ),
            (
                vec![("metric", "sockets"), ("target", "1"), sel],
                r#"scalerMetadata.metric: "sockets" is not one of"#,
            ),
            (
                vec![("metric", "established"), ("target", "1")],
                "scalerMetadata.podSelector: required",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    ("podSelector", "app in (a"),
                ],
                "scalerMetadata.podSelector: \"app in (a\": unclosed",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    sel,
                    ("activationTarget", "-1"),
                ],
                "scalerMetadata.activationTarget: \"-1\" must be >= 0",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    sel,
                    ("remote", "db:5432"),
                ],
                "scalerMetadata.remote: \"db:5432\" is not IP:PORT",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    sel,
                    ("remote", "*:0"),
                ],
                "scalerMetadata.remote: \"*:0\"",
            ),
            (
                vec![
                    ("metric", "time_wait"),
                    ("target", "1"),
                    sel,
                    ("remote", "10.0.0.1:1"),
                ],
                "scalerMetadata.remote: only applies to metric established or pool_utilization, not time_wait",
            ),
            (
                vec![
                    ("metric", "accept_queue"),
                    ("target", "1"),
                    sel,
                    ("port", "http"),
                ],
                "scalerMetadata.port: \"http\" is not a port number",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    sel,
                    ("port", "80"),
                ],
                "scalerMetadata.port: only applies to metric accept_queue",
            ),
            (
                vec![("metric", "pool_utilization"), ("target", "80"), sel],
                "scalerMetadata.poolSize: required for metric pool_utilization",
            ),
            (
                vec![
                    ("metric", "pool_utilization"),
                    ("target", "80"),
                    sel,
                    ("poolSize", "2.5"),
                ],
                "scalerMetadata.poolSize: \"2.5\" is not a whole number > 0",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    sel,
                    ("poolSize", "5"),
                ],
                "scalerMetadata.poolSize: only applies to metric pool_utilization",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    sel,
                    ("podNamespace", "Bad_NS"),
                ],
                "scalerMetadata.podNamespace: \"Bad_NS\" is not a valid namespace name",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    sel,
                    ("metricName", "a b"),
                ],
                "scalerMetadata.metricName: \"a b\" is not a metric name",
            ),
            (
                vec![
                    ("metric", "established"),
                    ("target", "1"),
                    sel,
                    ("treshold", "5"),
                ],
                "scalerMetadata.treshold: unknown key (known: metric, target",
            ),
        ] {
            let e = error(&pairs);
            assert!(e.contains(want), "{pairs:?}:\n got  {e}\n want {want}");
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let e = error(&[("metric", "nope"), ("target", "x"), ("colour", "red")]);
        for field in ["metric", "target", "podSelector", "colour"] {
            assert!(
                e.contains(&format!("scalerMetadata.{field}:")),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn no_namespace_anywhere_is_refused() {
        let e = Query::from_metadata(
            &meta(&[
                ("metric", "established"),
                ("target", "1"),
                ("podSelector", "app=web"),
            ]),
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("scalerMetadata.podNamespace: required"), "{e}");
    }

    #[test]
    fn query_errors_are_invalid_argument() {
        let status: tonic::Status = Query::from_metadata(&meta(&[]), "shop").unwrap_err().into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("scalerMetadata.metric"));
    }
}
