//! The DNS capability's Prometheus families (`nodekeeper_dns_*`). Label values are bounded:
//! protocol (2), query type (a fixed list + "other"), rcode (a fixed list + "OTHER"), reasons
//! (static strings from the code).

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::cache::CacheCounters;
use super::server::Protocol;
use super::wire::rcode;

type Labels = Vec<(&'static str, &'static str)>;

/// Query types with a label of their own (`qtype_name`), in table order; the rest are "other".
const QTYPES: [(u16, &str); 14] = [
    (1, "A"),
    (2, "NS"),
    (5, "CNAME"),
    (6, "SOA"),
    (12, "PTR"),
    (15, "MX"),
    (16, "TXT"),
    (28, "AAAA"),
    (33, "SRV"),
    (35, "NAPTR"),
    (64, "SVCB"),
    (65, "HTTPS"),
    (255, "ANY"),
    (0, "none"),
];
/// Response codes with a label of their own, in table order; the rest are "OTHER".
const RCODES: [u16; 7] = [
    rcode::NOERROR,
    rcode::FORMERR,
    rcode::SERVFAIL,
    rcode::NXDOMAIN,
    rcode::NOTIMP,
    rcode::REFUSED,
    rcode::BADVERS,
];
const TYPE_SLOTS: usize = QTYPES.len() + 1;
const RCODE_SLOTS: usize = RCODES.len() + 1;

/// `dns_requests` by (protocol, type, rcode): the family's counters, looked up once per label
/// set and then kept here, so counting a query is an index and an atomic add instead of
/// building, hashing and locking a label set (a measurable share of a cache hit's cost).
#[derive(Debug, Clone)]
struct RequestCounters {
    family: Family<Labels, Counter>,
    slots: Arc<[OnceLock<Counter>]>,
}

impl RequestCounters {
    fn new() -> Self {
        Self {
            family: Family::default(),
            slots: (0..2 * TYPE_SLOTS * RCODE_SLOTS)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    fn inc(&self, proto: Protocol, qtype: u16, rc: u16) {
        let t = QTYPES
            .iter()
            .position(|&(v, _)| v == qtype)
            .unwrap_or(QTYPES.len());
        let r = RCODES.iter().position(|&v| v == rc).unwrap_or(RCODES.len());
        let p = match proto {
            Protocol::Udp => 0,
            Protocol::Tcp => 1,
        };
        self.slots[(p * TYPE_SLOTS + t) * RCODE_SLOTS + r]
            .get_or_init(|| {
                self.family
                    .get_or_create(&vec![
                        ("protocol", proto.name()),
                        ("type", qtype_name(qtype)),
                        ("rcode", rcode::name(rc)),
                    ])
                    .clone()
            })
            .inc();
    }
}

#[derive(Debug, Clone)]
pub struct DnsMetrics {
    requests: RequestCounters,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub stale_served: Counter,
    pub prefetches: Counter,
    pub coalesced: Counter,
    pub overloaded: Counter,
    /// Misses refused because their upstream group held its share of `maxInFlight`.
    pub group_overloaded: Family<Vec<(&'static str, String)>, Counter>,
    pub truncated: Counter,
    pub in_flight: Gauge,
    pub pending_queries: Gauge,
    malformed: Family<Labels, Counter>,
    cache: Arc<OnceLock<Arc<CacheCounters>>>,
}

impl DnsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: RequestCounters::new(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            stale_served: Counter::default(),
            prefetches: Counter::default(),
            coalesced: Counter::default(),
            overloaded: Counter::default(),
            group_overloaded: Family::default(),
            truncated: Counter::default(),
            in_flight: Gauge::default(),
            pending_queries: Gauge::default(),
            malformed: Family::default(),
            cache: Arc::default(),
        };
        let r = registry.sub_registry_with_prefix("dns");
        r.register(
            "requests",
            "Queries answered, by protocol, query type and response code",
            m.requests.family.clone(),
        );
        r.register(
            "cache_hits",
            "Queries answered from a fresh cache entry",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Queries that needed an upstream",
            m.cache_misses.clone(),
        );
        r.register(
            "cache_stale_served",
            "Answers served from an expired entry because every upstream failed (RFC 8767)",
            m.stale_served.clone(),
        );
        r.register(
            "cache_prefetches",
            "Popular entries refreshed shortly before they expired",
            m.prefetches.clone(),
        );
        r.register(
            "coalesced",
            "Misses that waited for an identical query already sent upstream",
            m.coalesced.clone(),
        );
        r.register(
            "overloaded",
            "Misses answered SERVFAIL at once because dns.maxInFlight upstream queries, or 4 x dns.maxInFlight waiting UDP misses, were pending",
            m.overloaded.clone(),
        );
        r.register(
            "group_overloaded",
            "Misses refused at once (stale or SERVFAIL) because their upstream group (default, cluster, a stub domain) held its share of dns.maxInFlight (dns.maxInFlightPerGroup), by group",
            m.group_overloaded.clone(),
        );
        r.register(
            "truncated",
            "UDP answers too large for the client, sent with TC so it retries over TCP",
            m.truncated.clone(),
        );
        r.register("in_flight", "Upstream queries pending", m.in_flight.clone());
        r.register(
            "pending_queries",
            "UDP misses waiting for an upstream answer (their own fetch or a coalesced one); at most 4 x dns.maxInFlight",
            m.pending_queries.clone(),
        );
        r.register(
            "malformed_requests",
            "Requests that were not plain queries, by reason and whether they were answered or dropped",
            m.malformed.clone(),
        );
        r.register_collector(Box::new(CacheCollector(m.cache.clone())));
        m
    }

    /// Exposes the cache's size and evictions.
    pub fn watch_cache(&self, counters: Arc<CacheCounters>) {
        let _ = self.cache.set(counters);
    }

    pub fn request(&self, proto: Protocol, qtype: u16, rc: u16) {
        self.requests.inc(proto, qtype, rc);
    }

    /// Not answered at all (not a query, cut short).
    pub fn dropped(&self, why: &'static str) {
        self.malformed
            .get_or_create(&vec![("reason", why), ("action", "dropped")])
            .inc();
    }

    /// Answered with an error rcode (or an upstream's answer we could not use).
    pub fn malformed(&self, why: &'static str) {
        self.malformed
            .get_or_create(&vec![("reason", why), ("action", "answered")])
            .inc();
    }

    /// Every malformed request, answered or dropped.
    pub fn dropped_total(&self) -> u64 {
        let mut total = 0;
        for action in ["dropped", "answered"] {
            // Families have no iteration; the reasons are few and static.
            for why in REASONS {
                if let Some(c) = self
                    .malformed
                    .get(&vec![("reason", *why), ("action", action)])
                {
                    total += c.get();
                }
            }
        }
        total
    }
}

/// Every reason string used with `dropped`/`malformed`, for `dropped_total`.
const REASONS: &[&str] = &[
    "shorter than a DNS header",
    "a response, not a query",
    "opcode other than QUERY",
    "QDCOUNT is not 1",
    "a query with answer or authority records",
    "name runs past the end",
    "compressed or extended label in the question",
    "name longer than 255 bytes",
    "question runs past the end",
    "record header runs past the end",
    "record data runs past the end",
    "pointer runs past the end",
    "extended label type",
    "more than one OPT record",
    "OPT record with a non-root name",
    "EDNS version other than 0",
    "zone transfers are not forwarded",
    "tcp message cut short",
    "longer than 4096 bytes",
    "upstream response",
    "upstream response truncated",
    super::scrub::UNPARSABLE,
    super::scrub::CNAME_LOOP,
    super::scrub::OUT_OF_CHAIN,
];

pub fn qtype_name(t: u16) -> &'static str {
    QTYPES
        .iter()
        .find(|&&(v, _)| v == t)
        .map_or("other", |&(_, name)| name)
}

#[derive(Debug)]
struct CacheCollector(Arc<OnceLock<Arc<CacheCounters>>>);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.0.get() else {
            return Ok(());
        };
        let entries = ConstGauge::new(c.entries.load(Ordering::Relaxed) as i64);
        entries.encode(encoder.encode_descriptor(
            "cache_entries",
            "Answers in the cache",
            None,
            entries.metric_type(),
        )?)?;
        let bytes = ConstGauge::new(c.bytes.load(Ordering::Relaxed) as i64);
        bytes.encode(encoder.encode_descriptor(
            "cache_size_bytes",
            "Bytes the cache holds (answers, keys, bookkeeping)",
            None,
            bytes.metric_type(),
        )?)?;
        let evictions = ConstCounter::new(c.evictions.load(Ordering::Relaxed));
        evictions.encode(encoder.encode_descriptor(
            "cache_evictions",
            "Entries evicted to stay within dns.cache.maxEntries/maxBytes",
            None,
            evictions.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn requests_are_counted_per_label_set_with_unknown_types_and_rcodes_folded() {
        let mut registry = Registry::default();
        let m = DnsMetrics::register(&mut registry);
        for _ in 0..3 {
            m.request(Protocol::Udp, 1, rcode::NOERROR);
        }
        m.request(Protocol::Tcp, 1, rcode::NOERROR);
        m.request(Protocol::Udp, 28, rcode::NXDOMAIN);
        // Two unknown types and two unknown rcodes land in one series each.
        m.request(Protocol::Udp, 99, rcode::NOERROR);
        m.request(Protocol::Udp, 100, rcode::NOERROR);
        m.request(Protocol::Udp, 1, 9);
        m.request(Protocol::Udp, 1, 10);
        let text = exposition(&registry);
        for (labels, n) in [
            (r#"protocol="udp",type="A",rcode="NOERROR""#, 3),
            (r#"protocol="tcp",type="A",rcode="NOERROR""#, 1),
            (r#"protocol="udp",type="AAAA",rcode="NXDOMAIN""#, 1),
            (r#"protocol="udp",type="other",rcode="NOERROR""#, 2),
            (r#"protocol="udp",type="A",rcode="OTHER""#, 2),
        ] {
            let line = format!("dns_requests_total{{{labels}}} {n}");
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert_eq!(text.matches("dns_requests_total{").count(), 5, "{text}");
        assert_eq!(qtype_name(65), "HTTPS");
        assert_eq!(qtype_name(0), "none");
        assert_eq!(qtype_name(4242), "other");
    }
}
