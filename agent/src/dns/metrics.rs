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

#[derive(Debug, Clone)]
pub struct DnsMetrics {
    requests: Family<Labels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub stale_served: Counter,
    pub prefetches: Counter,
    pub coalesced: Counter,
    pub overloaded: Counter,
    pub truncated: Counter,
    pub in_flight: Gauge,
    malformed: Family<Labels, Counter>,
    cache: Arc<OnceLock<Arc<CacheCounters>>>,
}

impl DnsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            stale_served: Counter::default(),
            prefetches: Counter::default(),
            coalesced: Counter::default(),
            overloaded: Counter::default(),
            truncated: Counter::default(),
            in_flight: Gauge::default(),
            malformed: Family::default(),
            cache: Arc::default(),
        };
        let r = registry.sub_registry_with_prefix("dns");
        r.register(
            "requests",
            "Queries answered, by protocol, query type and response code",
            m.requests.clone(),
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
            "Misses answered SERVFAIL at once because dns.maxInFlight upstream queries were pending",
            m.overloaded.clone(),
        );
        r.register(
            "truncated",
            "UDP answers too large for the client, sent with TC so it retries over TCP",
            m.truncated.clone(),
        );
        r.register("in_flight", "Upstream queries pending", m.in_flight.clone());
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
        self.requests
            .get_or_create(&vec![
                ("protocol", proto.name()),
                ("type", qtype_name(qtype)),
                ("rcode", rcode::name(rc)),
            ])
            .inc();
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
    "upstream response",
];

pub fn qtype_name(t: u16) -> &'static str {
    match t {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        0 => "none",
        _ => "other",
    }
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
