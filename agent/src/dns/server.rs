//! The query path: UDP and TCP listeners (SO_REUSEPORT, so a successor can bind the same
//! addresses before this process leaves), the cache fast path, coalesced upstream fetches,
//! prefetch, serve-stale and the answers for bad input.
//!
//! A UDP cache hit is answered on the socket's own task without spawning; everything that has
//! to wait for an upstream runs in its own task, so one slow upstream never stalls a socket.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::Shared;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::cache::{Cache, Entry, Lookup};
use super::config::DnsConfig;
use super::metrics::DnsMetrics;
use super::scrub::{self, Verdict};
use super::udp_batch::{BATCH, Batch};
use super::wire::{self, Query, Reject, rcode};

/// Where answers that are not cached come from (the `upstream::Forwarder`; a fake in tests).
pub trait Upstream: Send + Sync + 'static {
    /// Forwards one client query; the response's ID and question case are the upstream's.
    fn forward<'a>(
        &'a self,
        query: &'a [u8],
        qname: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>>;
    /// False when no upstream server is usable.
    fn any_healthy(&self) -> bool;
    /// The upstream group that owns `qname`: each group has its own share of `maxInFlight`.
    fn group_of(&self, _qname: &str) -> String {
        "default".into()
    }
}

/// The Internet class; everything else is refused locally.
const CLASS_IN: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// What one upstream fetch produced, shared by every query that waited for it.
#[derive(Clone)]
enum Outcome {
    /// The upstream's answer: cached, or (REFUSED without a stale entry, negative without SOA,
    /// other rcodes) made for this fetch only.
    Answer(Arc<Entry>),
    /// The upstream failed (timeout, network error, SERVFAIL, REFUSED, garbage, overload) and
    /// this entry, still fresh (a failed prefetch) or stale (RFC 8767), answers instead.
    Kept(Arc<Entry>),
    Failed,
}

impl Outcome {
    /// About the bytes of the answer it gives (the stored response plus room for the client's
    /// OPT), before it is written: what a TCP connection reserves of its queue for it.
    fn answer_len(&self) -> usize {
        match self {
            Self::Answer(e) | Self::Kept(e) => e.bytes.len() + ANSWER_SLACK,
            Self::Failed => ANSWER_SLACK,
        }
    }
}

/// What an answer may add to its stored response: the echoed question's case is the same
/// length, the client's OPT record (11 bytes, options never echoed) and slack.
const ANSWER_SLACK: usize = 64;

/// RFC 8767 5 "failure recheck": after a failed refresh, a stale entry is served at once for
/// this long before the upstream is asked again (the RFC suggests 30 s), so an outage costs each
/// name one timeout per interval, not one per query.
const FAILURE_RECHECK: Duration = Duration::from_secs(30);

/// An upstream fetch other queries for the same key can wait on: the leader's answer, or an
/// error when the leader went away without one.
type PendingFetch = Shared<oneshot::Receiver<Outcome>>;

/// A fetch in `DnsServer::in_flight`: its key, the key's hash (`Cache::hash`), its result.
type InFlightFetch = (Box<[u8]>, u64, PendingFetch);

/// A query the cache could not answer alone, as `answer_fast` left it: parsed once, its key
/// (in the caller's buffer) hashed once; the miss path works from these, never parsing or
/// hashing the query again.
#[derive(Clone)]
pub(crate) struct Miss {
    q: Query,
    hash: u64,
    /// The expired entry still inside its stale window that the lookup found, if any.
    stale: Option<Arc<Entry>>,
}

/// What the cache alone made of a query.
pub(crate) enum Fast {
    /// The answer is in `out`.
    Answered,
    /// Dropped (not a query at all).
    Dropped,
    /// Needs the upstream.
    Miss(Miss),
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct DnsServer {
    config: DnsConfig,
    cache: Cache,
    upstream: Arc<dyn Upstream>,
    /// Fetches under way, by their key's hash: later askers wait on them (coalescing).
    in_flight: Mutex<hashbrown::HashTable<InFlightFetch>>,
    fetch_slots: Semaphore,
    /// Upstream queries pending per upstream group, each at most `group_share`: a dead stub
    /// domain's misses hold their slots for the whole `dns.timeout`, and must not take the
    /// slots of every other group (issue #22 finding 7).
    group_in_flight: Mutex<std::collections::HashMap<String, usize>>,
    group_share: usize,
    /// UDP misses waiting in a task of their own (for an upstream fetch, their own or a
    /// coalesced one): `WAITERS_PER_FETCH` per `maxInFlight` slot. A flood of one name with a
    /// silent upstream would otherwise park a task per query for the whole `dns.timeout`
    /// (issue #15: ~1 KiB each, 40k queries a second).
    waiting_slots: Arc<Semaphore>,
    pub metrics: DnsMetrics,
}

/// UDP misses that may wait at once per `maxInFlight` upstream slot: room for coalesced
/// askers of the names being fetched (a popular name's expiry), not for a flood's backlog.
pub const WAITERS_PER_FETCH: usize = 4;

/// A UDP miss's place among `waiting_slots`, counted in `nodekeeper_dns_pending_queries`.
struct Waiting {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl DnsServer {
    pub fn new(config: DnsConfig, upstream: Arc<dyn Upstream>, metrics: DnsMetrics) -> Arc<Self> {
        let cache = Cache::new(config.cache.max_entries, config.cache.max_bytes);
        metrics.watch_cache(cache.counters.clone());
        Arc::new(Self {
            fetch_slots: Semaphore::new(config.max_in_flight),
            group_in_flight: Mutex::default(),
            group_share: config.group_in_flight_share(),
            waiting_slots: Arc::new(Semaphore::new(
                config.max_in_flight.saturating_mul(WAITERS_PER_FETCH),
            )),
            cache,
            upstream,
            in_flight: Mutex::new(hashbrown::HashTable::new()),
            metrics,
            config,
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn upstream_healthy(&self) -> bool {
        self.upstream.any_healthy()
    }

    /// Answers from the cache alone when it can. On a miss `key` holds the query's cache key
    /// and the returned `Miss` its parse and hash, for `answer_miss`.
    fn answer_fast(
        self: &Arc<Self>,
        query: &[u8],
        proto: Protocol,
        key: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Fast {
        let q = match wire::parse_query(query) {
            Ok(q) => q,
            Err(Reject::Drop(why)) => {
                self.metrics.dropped(why);
                return Fast::Dropped;
            }
            Err(Reject::Respond {
                rcode,
                why,
                question,
            }) => {
                self.metrics.malformed(why);
                wire::reject_response(query, question, rcode, out);
                self.metrics.request(proto, 0, rcode);
                return Fast::Answered;
            }
        };
        if q.qclass != CLASS_IN {
            // CHAOS (id.server, the fail-open guard's probe) and other classes are answered
            // here and at once: pods have no use for them upstream, and a liveness probe must
            // never wait on an upstream.
            wire::empty_response(query, Some(&q), rcode::REFUSED, false, out);
            self.metrics.request(proto, q.qtype, rcode::REFUSED);
            return Fast::Answered;
        }
        q.key_into(query, key);
        let hash = self.cache.hash(key);
        let now = Instant::now();
        let stale = match self.cache.lookup_hashed(key, hash, now) {
            Lookup::Fresh(entry) => {
                self.metrics.cache_hits.inc();
                entry.answer(query, &q, now, None, out);
                self.maybe_prefetch(&entry, key, hash, query, &q, now);
                self.finish(query, &q, proto, entry.rcode, out);
                return Fast::Answered;
            }
            Lookup::Stale(e) => Some(e),
            Lookup::Miss => None,
        };
        Fast::Miss(Miss { q, hash, stale })
    }

    /// The whole path for one query (`answer_fast`, then `answer_miss`): true when `out` holds
    /// the answer, false when the query is dropped.
    #[cfg(test)]
    async fn answer(self: &Arc<Self>, query: &[u8], proto: Protocol, out: &mut Vec<u8>) -> bool {
        let mut key = Vec::with_capacity(64);
        match self.answer_fast(query, proto, &mut key, out) {
            Fast::Answered => true,
            Fast::Dropped => false,
            Fast::Miss(miss) => {
                self.answer_miss(query, &key, miss, proto, out).await;
                true
            }
        }
    }

    /// A place for one more UDP miss to wait, or None when `WAITERS_PER_FETCH` x
    /// `maxInFlight` are waiting already.
    fn wait_slot(&self) -> Option<Waiting> {
        let permit = self.waiting_slots.clone().try_acquire_owned().ok()?;
        self.metrics.pending_queries.inc();
        Some(Waiting {
            _permit: permit,
            gauge: self.metrics.pending_queries.clone(),
        })
    }

    /// The answer to a miss that found no place to wait: SERVFAIL at once (a stale entry would
    /// need the upstream's failure to be served; overload is ours, not the upstream's).
    fn overloaded(&self, query: &[u8], q: &Query, proto: Protocol, out: &mut Vec<u8>) {
        self.metrics.overloaded.inc();
        wire::empty_response(query, Some(q), rcode::SERVFAIL, false, out);
        self.finish(query, q, proto, rcode::SERVFAIL, out);
    }

    /// The miss path, from what `answer_fast` found: a coalesced upstream fetch, then stale,
    /// then SERVFAIL. `key` is the query's cache key. (A UDP miss task does the same with
    /// `send_miss_answer`.)
    #[cfg(test)]
    async fn answer_miss(
        self: &Arc<Self>,
        query: &[u8],
        key: &[u8],
        miss: Miss,
        proto: Protocol,
        out: &mut Vec<u8>,
    ) {
        let q = miss.q;
        let outcome = self.miss_outcome(query, key, miss).await;
        self.render(query, &q, outcome, proto, out);
    }

    /// What answers a miss (`answer_miss` without writing the answer): a coalesced upstream
    /// fetch, or a stale entry.
    async fn miss_outcome(self: &Arc<Self>, query: &[u8], key: &[u8], miss: Miss) -> Outcome {
        let Miss { q, hash, stale } = miss;
        self.metrics.cache_misses.inc();
        let now = Instant::now();
        match stale {
            // The upstream failed for this name moments ago: stale at once (failure recheck).
            Some(e) if self.config.cache.serve_stale && e.recently_failed(now) => Outcome::Kept(e),
            // Boxed: this rarer path's timer and join handle would otherwise enlarge every
            // miss task past 1 KiB (#22-k).
            Some(e) if self.config.cache.serve_stale => {
                Box::pin(self.fetch_within_client_timer(key, hash, query, &q, e)).await
            }
            _ => self.fetch(key, hash, query, &q).await,
        }
    }

    /// Writes the answer `outcome` gives `query` into `out` (stale TTLs, or SERVFAIL).
    fn render(
        &self,
        query: &[u8],
        q: &Query,
        outcome: Outcome,
        proto: Protocol,
        out: &mut Vec<u8>,
    ) {
        let now = Instant::now();
        let rc = match outcome {
            Outcome::Answer(entry) => {
                entry.answer(query, q, now, None, out);
                entry.rcode
            }
            Outcome::Kept(entry) => {
                let stale = now >= entry.expires();
                if stale {
                    self.metrics.stale_served.inc();
                }
                let stale_ttl = self.config.cache.stale_ttl.get().as_secs() as u32;
                entry.answer(query, q, now, stale.then_some(stale_ttl), out);
                entry.rcode
            }
            Outcome::Failed => {
                wire::empty_response(query, Some(q), rcode::SERVFAIL, false, out);
                rcode::SERVFAIL
            }
        };
        self.finish(query, q, proto, rc, out);
    }

    /// RFC 8767 client-response timer: a client whose name has a stale entry waits for the
    /// refresh at most `staleAnswerClientTimeout`, then gets the stale entry. The refresh runs
    /// in a task of its own (only on this path: a stale entry in hand), so it goes on after the
    /// client is answered and fills the cache for the askers after it.
    async fn fetch_within_client_timer(
        self: &Arc<Self>,
        key: &[u8],
        hash: u64,
        query: &[u8],
        q: &Query,
        stale: Arc<Entry>,
    ) -> Outcome {
        let this = self.clone();
        let (key, query, q) = (key.to_vec(), query.to_vec(), *q);
        let refresh = tokio::spawn(async move { this.fetch(&key, hash, &query, &q).await });
        let timer = self.config.cache.stale_answer_client_timeout.get();
        match tokio::time::timeout(timer, refresh).await {
            Ok(Ok(outcome)) => outcome,
            // The refresh is slower than the timer (it goes on), or its task died.
            Ok(Err(_)) | Err(_) => Outcome::Kept(stale),
        }
    }

    /// Truncates a UDP answer the client cannot take, and counts the request.
    fn finish(&self, query: &[u8], q: &Query, proto: Protocol, rc: u16, out: &mut Vec<u8>) {
        if proto == Protocol::Udp && out.len() > q.udp_limit() {
            wire::empty_response(query, Some(q), rc, true, out);
            self.metrics.truncated.inc();
        }
        self.metrics.request(proto, q.qtype, rc);
    }

    fn maybe_prefetch(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        key: &[u8],
        hash: u64,
        query: &[u8],
        q: &Query,
        now: Instant,
    ) {
        let c = &self.config.cache;
        if !c.prefetch || entry.ttl < 10 {
            return;
        }
        let left = entry.expires().saturating_duration_since(now);
        if entry.hits.load(Ordering::Relaxed) < c.prefetch_hits
            || left * 10 > Duration::from_secs(u64::from(entry.ttl))
            || entry.prefetching.swap(true, Ordering::Relaxed)
        {
            return;
        }
        self.metrics.prefetches.inc();
        let this = self.clone();
        let (key, query, q) = (key.to_vec(), query.to_vec(), *q);
        tokio::spawn(async move {
            this.fetch(&key, hash, &query, &q).await;
        });
    }

    /// One upstream query per key at a time: the first asker fetches in its own task, later
    /// askers wait for its result. Every caller already runs in a task that nothing cancels
    /// (a UDP miss's, a prefetch's, a TCP connection's), so no task of its own is spawned for
    /// the fetch; if the leader is dropped anyway (runtime shutdown), waiters see the channel
    /// closed and fail (stale or SERVFAIL), and the next query starts a new fetch.
    async fn fetch(self: &Arc<Self>, key: &[u8], hash: u64, query: &[u8], q: &Query) -> Outcome {
        let leader = {
            let mut map = self.in_flight.lock().expect("not poisoned");
            match map.entry(hash, |(k, _, _)| **k == *key, |(_, h, _)| *h) {
                hashbrown::hash_table::Entry::Occupied(f) => {
                    self.metrics.coalesced.inc();
                    Err(f.get().2.clone())
                }
                hashbrown::hash_table::Entry::Vacant(v) => {
                    let (tx, rx) = oneshot::channel();
                    v.insert((key.into(), hash, rx.shared()));
                    Ok(tx)
                }
            }
        };
        let tx = match leader {
            Ok(tx) => tx,
            Err(waiting) => return waiting.await.unwrap_or(Outcome::Failed),
        };
        let mut entry = InFlight {
            server: self,
            key: Some((key, hash)),
        };
        let outcome = self.fetch_upstream(key, hash, query, q).await;
        // Cached (when cacheable) before the key leaves the map: a query arriving in between
        // finds one or the other.
        entry.remove();
        let _ = tx.send(outcome.clone());
        outcome
    }

    async fn fetch_upstream(&self, key: &[u8], hash: u64, query: &[u8], q: &Query) -> Outcome {
        let Ok(_slot) = self.fetch_slots.try_acquire() else {
            self.metrics.overloaded.inc();
            // Our own overload says nothing about the upstream: no failure mark.
            return self
                .keep(key, hash, false)
                .map_or(Outcome::Failed, Outcome::Kept);
        };
        let qname = q.qname(query);
        let Some(_group_slot) = self.group_slot(&qname) else {
            return self
                .keep(key, hash, false)
                .map_or(Outcome::Failed, Outcome::Kept);
        };
        self.metrics.in_flight.inc();
        let mut ours = Vec::with_capacity(q.question_end + 11);
        wire::upstream_query(query, q, &mut ours);
        let result = self.upstream.forward(&ours, &qname).await;
        self.metrics.in_flight.dec();
        let failed = || {
            self.keep(key, hash, true)
                .map_or(Outcome::Failed, Outcome::Kept)
        };
        let raw = match result {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(name = %qname, error = %e, "upstream failed");
                return failed();
            }
        };
        // Scanned twice: once as received (for the OPT and the extended rcode), once as stored
        // (scrubbed: only the question's answer chain is kept).
        let scanned = wire::scan_response(&raw).ok().and_then(|info| {
            // The answer's one copy (made by the upstream reader) becomes the entry's.
            let (bytes, verdict) = scrub::scrub(wire::into_cache(raw, &info));
            let stored = wire::scan_response(&bytes).ok()?;
            Some((info.rcode, bytes, stored, verdict))
        });
        let Some((rcode, mut bytes, info, verdict)) = scanned else {
            self.metrics.malformed("upstream response");
            return failed();
        };
        // RFC 2181 9: a truncated answer is incomplete; the forwarder retries a UDP one over
        // TCP, so one still truncated here (over TCP) is a failure, never cached or served.
        if info.truncated {
            tracing::debug!(name = %qname, "upstream answer truncated over TCP");
            self.metrics.malformed("upstream response truncated");
            return failed();
        }
        // Our scanner took its structure but a record does not decode (an A record of 3
        // bytes): garbage, not an answer to pass on (issue #22).
        if verdict == Verdict::Uncacheable(scrub::UNPARSABLE) {
            self.metrics.malformed(scrub::UNPARSABLE);
            return failed();
        }
        match verdict {
            Verdict::Clean => {}
            Verdict::Dropped(n) => {
                tracing::debug!(name = %qname, dropped = n, "records outside the answer chain");
                self.metrics.malformed(scrub::OUT_OF_CHAIN);
            }
            Verdict::Uncacheable(why) => {
                tracing::debug!(name = %qname, why, "upstream answer passed on, not cached");
                self.metrics.malformed(why);
            }
        }
        // RFC 8767: SERVFAIL and REFUSED are failures too; a servable entry wins over them
        // and is never replaced by them.
        if matches!(rcode, rcode::SERVFAIL | rcode::REFUSED)
            && let Some(kept) = self.keep(key, hash, true)
        {
            return Outcome::Kept(kept);
        }
        let c = &self.config.cache;
        let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        let (min_ttl, max_ttl) = (secs(c.min_ttl.get()), secs(c.max_ttl.get()));
        let negative_cap = |neg: u32| neg.min(secs(c.negative_max_ttl.get()));
        // None: a valid answer that is not cached.
        let ttl = match rcode {
            rcode::NOERROR if info.answers > 0 => {
                let cap = |t: u32| wire::effective_ttl(t).clamp(min_ttl, max_ttl);
                wire::rewrite_ttls(&mut bytes, &info.ttl_offsets, cap);
                let ttl = cap(info.min_answer_ttl.unwrap_or(0));
                // A CNAME chain ending in NODATA: the negative TTL (RFC 2308 5).
                Some(
                    info.negative_ttl
                        .map_or(ttl, |neg| ttl.min(negative_cap(neg))),
                )
            }
            // RFC 2308: without an SOA a negative answer is not cached. A CNAME chain ending in
            // NXDOMAIN lives no longer than its shortest CNAME either (RFC 2308 5).
            rcode::NOERROR | rcode::NXDOMAIN => info.negative_ttl.map(|neg| {
                let chain = info.min_answer_ttl.filter(|_| info.answers > 0);
                chain.map_or(negative_cap(neg), |t| {
                    negative_cap(neg).min(wire::effective_ttl(t).clamp(min_ttl, max_ttl))
                })
            }),
            rcode::SERVFAIL => Some(secs(c.servfail_ttl.get()).min(5)),
            _ => None,
        };
        if let Some(ttl) = ttl
            && info.negative_ttl.is_some()
            && rcode != rcode::SERVFAIL
        {
            wire::rewrite_ttls(&mut bytes, &info.ttl_offsets, |t| {
                wire::effective_ttl(t).min(ttl)
            });
        }
        let cacheable = ttl.is_some() && !matches!(verdict, Verdict::Uncacheable(_));
        let ttl = ttl.unwrap_or(0);
        let now = Instant::now();
        let stale_window = if c.serve_stale && rcode != rcode::SERVFAIL {
            c.max_stale.get()
        } else {
            Duration::ZERO
        };
        let entry = Arc::new(Entry {
            bytes: bytes.into(),
            ttl_offsets: info.ttl_offsets.into(),
            rcode,
            inserted: now,
            ttl,
            stale_until: now + Duration::from_secs(u64::from(ttl)) + stale_window,
            hits: Default::default(),
            prefetching: Default::default(),
            failed_until_ms: Default::default(),
        });
        if cacheable {
            // Stored unless too large for the cache; the answer to this query either way.
            self.cache.insert_hashed(key, hash, entry.clone());
        }
        Outcome::Answer(entry)
    }

    /// A place among the pending upstream queries of `qname`'s group, or None (counted) when
    /// the group holds its share already.
    fn group_slot(&self, qname: &str) -> Option<GroupSlot<'_>> {
        let group = self.upstream.group_of(qname);
        let mut held = self.group_in_flight.lock().expect("not poisoned");
        // Entries stay at 0 (one per group ever routed to; groups are configured): the group's
        // name is not copied again for every miss (#22-k).
        let n = match held.get_mut(&group) {
            Some(n) => n,
            None => held.entry(group.clone()).or_default(),
        };
        if *n >= self.group_share {
            drop(held);
            self.metrics.overloaded.inc();
            self.metrics
                .group_overloaded
                .get_or_create(&vec![("group", group)])
                .inc();
            return None;
        }
        *n += 1;
        Some(GroupSlot {
            server: self,
            group,
        })
    }

    /// The entry that answers instead when a fetch failed: a fresh one (a failed prefetch
    /// keeps it) or, with serve-stale, a stale one, then marked as failed (`mark`) so the next
    /// askers get it at once.
    fn keep(&self, key: &[u8], hash: u64, mark: bool) -> Option<Arc<Entry>> {
        let now = Instant::now();
        match self.cache.lookup_hashed(key, hash, now) {
            Lookup::Fresh(e) => Some(e),
            Lookup::Stale(e) if self.config.cache.serve_stale => {
                if mark {
                    e.mark_failed(now, FAILURE_RECHECK);
                }
                Some(e)
            }
            _ => None,
        }
    }
}

/// One pending upstream query of a group, given back when dropped.
struct GroupSlot<'a> {
    server: &'a DnsServer,
    group: String,
}

impl Drop for GroupSlot<'_> {
    fn drop(&mut self) {
        let mut held = self.server.group_in_flight.lock().expect("not poisoned");
        if let Some(n) = held.get_mut(&self.group) {
            *n -= 1;
        }
    }
}

/// A leader's key (and its hash) in `in_flight`, removed when it is done or dropped.
struct InFlight<'a> {
    server: &'a DnsServer,
    key: Option<(&'a [u8], u64)>,
}

impl InFlight<'_> {
    fn remove(&mut self) {
        if let Some((key, hash)) = self.key.take() {
            let mut map = self.server.in_flight.lock().expect("not poisoned");
            if let Ok(found) = map.find_entry(hash, |(k, _, _)| **k == *key) {
                let _ = found.remove();
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

// === listeners ===

/// A UDP socket sharing its port with a successor (SO_REUSEPORT).
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, ServerError> {
    crate::listen::udp(addr).map_err(|source| ServerError::Bind {
        proto: "udp",
        addr,
        source,
    })
}

pub fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    crate::listen::tcp(addr).map_err(|source| ServerError::Bind {
        proto: "tcp",
        addr,
        source,
    })
}

/// Batches drained before the socket task yields to the others on its worker.
const BATCHES_PER_TURN: usize = 8;

/// Hand-over: once the socket takes no new datagrams, it is read until nothing has come for
/// this long (datagrams the kernel steered to it just before still land in its queue).
const DRAIN_QUIET: Duration = Duration::from_millis(50);
/// Hand-over: the drain never takes longer than this, whatever keeps arriving. With
/// `MISSES_WAIT_MAX` it keeps the whole hand-over within 1 s, so the successor probe and the
/// teardown still fit the 2 s the config check (`dns.lameDuck` + 2 s <= `shutdownTimeout`)
/// allows after the lame duck.
const DRAIN_MAX: Duration = Duration::from_millis(300);
/// Hand-over: the longest wait for the misses still in flight to be answered; a miss slower
/// than this at shutdown loses its answer (its client retries and the successor answers).
const MISSES_WAIT_MAX: Duration = Duration::from_millis(700);
/// Hand-over: how often the drained socket checks whether its last misses were answered.
const MISSES_POLL: Duration = Duration::from_millis(10);

/// Serves one UDP socket until `token` is cancelled: a batch of queries per system call, hits
/// answered in place and sent back as a batch, misses handed to a task each. On cancellation it
/// hands over without losing a query (issue #22): it stops taking new datagrams (the kernel
/// steers them to the other sockets of the SO_REUSEPORT group, a successor's), answers what is
/// already queued, and waits for its misses' answers before the socket closes.
pub async fn serve_udp(server: Arc<DnsServer>, socket: UdpSocket, token: CancellationToken) {
    let socket = Arc::new(socket);
    let ipv6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut batch = Batch::new();
    let mut key = Vec::with_capacity(64);
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            r = socket.readable() => if let Err(e) = r {
                tracing::debug!(error = %e, "udp readable");
                continue;
            },
        }
        if serve_ready(&server, &socket, &mut batch, &mut key, ipv6).await {
            // A socket that never runs dry must not starve the miss tasks sharing its worker.
            tokio::task::yield_now().await;
        }
    }
    if let Err(e) = stop_receiving(&socket).await {
        tracing::warn!(error = %e, "dns udp socket could not leave its reuseport group; closing");
        return;
    }
    let draining = Instant::now();
    while draining.elapsed() < DRAIN_MAX {
        match tokio::time::timeout(DRAIN_QUIET, socket.readable()).await {
            Ok(Ok(())) => {
                serve_ready(&server, &socket, &mut batch, &mut key, ipv6).await;
            }
            _ => break,
        }
    }
    // Each miss task holds the socket to send its answer: wait for them (bounded), so the
    // socket is not closed under an answer still to come.
    let misses_done = Instant::now() + server.config.timeout.get().min(MISSES_WAIT_MAX);
    while Arc::strong_count(&socket) > 1 && Instant::now() < misses_done {
        tokio::time::sleep(MISSES_POLL).await;
    }
}

/// Takes the socket out of its SO_REUSEPORT group's choice for new datagrams without closing
/// it: a connected UDP socket only takes datagrams from its peer (here: itself, so none), and
/// the kernel's reuseport selection skips connected sockets. What is already queued stays
/// readable, and answers still go to each client's own address (sendmsg with an address).
async fn stop_receiving(socket: &UdpSocket) -> std::io::Result<()> {
    socket.connect(socket.local_addr()?).await
}

/// Reads and answers what the socket holds, up to `BATCHES_PER_TURN` batches; true when it
/// did not run dry.
async fn serve_ready(
    server: &Arc<DnsServer>,
    socket: &Arc<UdpSocket>,
    batch: &mut Batch,
    key: &mut Vec<u8>,
    ipv6: bool,
) -> bool {
    let fd = socket.as_raw_fd();
    for _ in 0..BATCHES_PER_TURN {
        let n = match recv_batch(socket, batch, fd, ipv6) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "udp recv");
                return false;
            }
        };
        if n == 0 {
            return false;
        }
        for i in 0..n {
            let peer = batch.peer(i);
            let Some((query, out)) = batch.slot(i) else {
                server.metrics.dropped("longer than 4096 bytes");
                continue;
            };
            match server.answer_fast(query, Protocol::Udp, key, out) {
                Fast::Answered => batch.reply(i),
                Fast::Dropped => {}
                Fast::Miss(miss) => {
                    let Some(peer) = peer else { continue };
                    let Some(waiting) = server.wait_slot() else {
                        server.overloaded(query, &miss.q, Protocol::Udp, out);
                        batch.reply(i);
                        continue;
                    };
                    let (server, socket) = (server.clone(), socket.clone());
                    let (query, key) = query_and_key(query, key);
                    let fut = async move {
                        let _waiting = waiting;
                        let (query, key) = query.split_at(key);
                        let q = miss.q;
                        let outcome = server.miss_outcome(query, key, miss).await;
                        if let Some(out) =
                            send_miss_answer(&server, &socket, peer, query, &q, outcome)
                        {
                            let _ = socket.send_to(&out, peer).await;
                        }
                    };
                    tokio::spawn(fut);
                }
            }
        }
        send_answers(socket, batch).await;
        if n < BATCH {
            return false;
        }
    }
    true
}

thread_local! {
    /// The buffer UDP miss answers are written in and sent from (`send_miss_answer`): one per
    /// worker thread instead of one per miss (#22-k).
    static MISS_OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `MISS_OUT` is given back to the allocator after an answer longer than this (a rare large
/// one), so a worker thread does not hold up to 64 KiB for ever.
const MISS_OUT_KEEP: usize = 4096;

/// Writes a UDP miss's answer in the thread's buffer and sends it at once; when the socket's
/// buffer is full, returns a copy to send once it has room.
fn send_miss_answer(
    server: &DnsServer,
    socket: &UdpSocket,
    peer: SocketAddr,
    query: &[u8],
    q: &Query,
    outcome: Outcome,
) -> Option<Vec<u8>> {
    MISS_OUT.with_borrow_mut(|out| {
        server.render(query, q, outcome, Protocol::Udp, out);
        let later = match socket.try_send_to(out, peer) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(out.clone()),
            Ok(_) | Err(_) => None,
        };
        if out.capacity() > MISS_OUT_KEEP {
            *out = Vec::new();
        }
        later
    })
}

/// Receives a batch; 0 when nothing was queued. A batch that came back short (fewer than
/// `BATCH` datagrams) emptied the queue, so the socket's read readiness is cleared with it:
/// otherwise the next turn would find the socket "ready" and pay an empty `recvmmsg` to learn
/// it is not. At a moderate load every datagram wakes the loop alone, and that empty read was
/// a third of a cache hit's system calls (issue #22, decision #22-j). tokio clears readiness
/// only when the closure says `WouldBlock`, and then only if no new readiness event came
/// since the read began (it compares the driver's ticks): a datagram queued after the short
/// read raises a new edge-triggered event, so none is left unread.
fn recv_batch(
    socket: &UdpSocket,
    batch: &mut Batch,
    fd: std::os::fd::RawFd,
    ipv6: bool,
) -> std::io::Result<usize> {
    let mut got = 0;
    let r = socket.try_io(Interest::READABLE, || {
        got = batch.recv(fd, ipv6)?;
        if got < BATCH {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match r {
        Ok(()) => Ok(got),
        // Short or empty: readiness cleared; what came is served.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(got),
        Err(e) => Err(e),
    }
}

/// A miss task's one allocation: the query and its cache key in one buffer, and where the key
/// starts (split it back with `split_at`).
fn query_and_key(query: &[u8], key: &[u8]) -> (Vec<u8>, usize) {
    let mut both = Vec::with_capacity(query.len() + key.len());
    both.extend_from_slice(query);
    both.extend_from_slice(key);
    (both, query.len())
}

/// Sends a batch's answers, waiting while the socket buffer is full; an answer the kernel
/// refuses (an unreachable client) is skipped.
async fn send_answers(socket: &UdpSocket, batch: &mut Batch) {
    let fd = socket.as_raw_fd();
    while batch.pending() {
        match socket.try_io(Interest::WRITABLE, || batch.send(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "udp send");
                batch.skip_one();
            }
        }
    }
}

/// Idle TCP connections are closed after this (RFC 7766 suggests seconds, not minutes).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// A connection whose answers cannot be written for this long is closed: a client that sends
/// queries and never reads would otherwise hold its slot for ever (issue #15).
const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once (the client retries or uses UDP).
const TCP_CONNECTIONS: usize = 1024;
/// Connections served at once per client address, so one host cannot take every slot.
const TCP_CONNECTIONS_PER_CLIENT: usize = 64;

/// Hand-over: once new connections go to the successor, the listener is accepted from until
/// nothing has come for this long (connections the kernel queued on it just before).
const TCP_ACCEPT_QUIET: Duration = Duration::from_millis(50);
/// Hand-over: the accept drain never takes longer than this.
const TCP_ACCEPT_MAX: Duration = Duration::from_millis(300);
/// Hand-over: a connection's next query must come within this of the previous one; then it is
/// closed (its answers written first). RFC 7766 clients retry on a new connection.
const TCP_HANDOVER_IDLE: Duration = Duration::from_millis(100);
/// Hand-over: connections read no query after this (answers still written); with the accept
/// drain, reading ends within the 1 s the UDP hand-over takes (see `DRAIN_MAX`). The listener
/// then waits up to `dns.timeout` more for the answers still owed (a miss read last).
const TCP_HANDOVER_MAX: Duration = Duration::from_millis(600);

/// Hand-over: beyond `dns.timeout`, for a miss's answer to be written once it is known.
const TCP_ANSWER_MARGIN: Duration = Duration::from_millis(100);

/// Pause after a transient accept error (EMFILE...), so it is not retried in a busy loop.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Accept errors that say nothing about the listener (a connection reset before it was
/// accepted, out of fds or memory): the next accept may work.
fn accept_error_is_transient(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(
            Errno::ECONNABORTED
                | Errno::ECONNRESET
                | Errno::EMFILE
                | Errno::ENFILE
                | Errno::ENOBUFS
                | Errno::ENOMEM
                | Errno::EINTR
                | Errno::EAGAIN
                | Errno::EPROTO
                | Errno::EPERM
        )
    ) || e.raw_os_error().is_none()
}

/// Accepts TCP connections until `token` is cancelled; each is served until idle or closed.
/// Returns early when the listener fails for good (see `accept_error_is_transient`).
/// A connection over its client's share or over the total is closed as soon as it is accepted.
/// On cancellation it hands over without resetting a connection (issue #22): new connections
/// are steered to the successor's listener (`tcp_handover`), those the kernel already queued
/// here are accepted and served, and the accepted ones are served until their client goes
/// quiet and every query read is answered (up to `dns.timeout` after the last read), before
/// the listener's task ends.
pub async fn serve_tcp(server: Arc<DnsServer>, listener: TcpListener, token: CancellationToken) {
    // A steering program a predecessor left on the group must not pick the listeners.
    if let Err(e) = super::tcp_handover::select(&listener, None) {
        tracing::debug!(error = %e, "dns tcp: reset the reuseport selection");
    }
    let caps = crate::bounds::PeerCaps::new(TCP_CONNECTIONS_PER_CLIENT, TCP_CONNECTIONS);
    let connections = Arc::new(());
    let serve = |stream, peer: SocketAddr| {
        let Some(slot) = caps.take(peer.ip()) else {
            tracing::debug!(%peer, "dns tcp connection over its cap: closed");
            return;
        };
        let (server, token, held) = (server.clone(), token.clone(), connections.clone());
        tokio::spawn(async move {
            let _slot = (slot, held);
            serve_tcp_connection(server, stream, token).await;
        });
    };
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => serve(stream, peer),
                Err(e) if accept_error_is_transient(&e) => {
                    tracing::debug!(error = %e, "tcp accept");
                    // Out of fds or memory: give the connections a moment to end.
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
                // The listener itself is gone (destroyed with `ss -K`, EINVAL; a bad fd):
                // ending lets the cache stop steering pods at a port nobody accepts on.
                Err(e) => {
                    tracing::error!(error = %e, "dns tcp listener failed; it stops");
                    return;
                }
            },
        }
    }
    let handover = Instant::now();
    match listener.local_addr() {
        Ok(addr) => match super::tcp_handover::steer_to_successor(&listener, addr) {
            Ok(true) => tracing::debug!(%addr, "dns tcp: new connections go to the successor"),
            Ok(false) => {}
            Err(e) => tracing::warn!(%addr, error = %e, "dns tcp: cannot steer to the successor"),
        },
        Err(e) => tracing::debug!(error = %e, "dns tcp: listener address"),
    }
    while handover.elapsed() < TCP_ACCEPT_MAX {
        match tokio::time::timeout(TCP_ACCEPT_QUIET, listener.accept()).await {
            Ok(Ok((stream, peer))) => serve(stream, peer),
            Ok(Err(e)) => tracing::debug!(error = %e, "tcp accept"),
            Err(_) => break,
        }
    }
    drop(listener);
    // Every connection reads its last query by `TCP_ACCEPT_MAX + TCP_HANDOVER_MAX`; the answer
    // to a miss read then comes within `dns.timeout` (the upstream's deadline): the
    // connections still owing one are waited for that long (issue #22 finding 5), the others
    // are gone by then.
    let done = handover
        + TCP_ACCEPT_MAX
        + TCP_HANDOVER_MAX
        + server.config.timeout.get()
        + TCP_ANSWER_MARGIN;
    while Arc::strong_count(&connections) > 1 && Instant::now() < done {
        tokio::time::sleep(MISSES_POLL).await;
    }
}

/// Queries of one TCP connection answered at once; a client pipelining more waits for a slot
/// (the kernel's socket buffer then holds its further queries).
const TCP_PIPELINE: usize = 64;
/// Answer bytes one TCP connection may hold queued (written by us, not yet taken by the
/// kernel); past this it reads no further query until its client reads (issue #22 finding 4:
/// 60 connections pipelining a cached 59 KB answer held 64 copies each). An answer larger than
/// this still goes, alone. 32 KiB is hundreds of ordinary answers, so pipelining clients that
/// read never wait on it.
const TCP_QUEUED_BYTES: usize = 32 * 1024;
/// The kernel send buffer asked for each accepted connection (Linux doubles it): a client that
/// never reads pins this much kernel memory, charged to our memory cgroup, instead of the up
/// to 4 MiB send-buffer autotuning grows to; a 64 KiB answer still fits in one go.
const TCP_SNDBUF: usize = 32 * 1024;
/// `out` buffers larger than this are not kept between queries of a connection (a 64 KiB
/// answer once would otherwise stay with an idle connection).
const TCP_KEEP_BUFFER: usize = 4096;

/// One framed answer queued on a connection, holding its share of `TCP_QUEUED_BYTES` until
/// the writer has handed it to the kernel.
struct Queued {
    framed: Vec<u8>,
    _held: tokio::sync::OwnedSemaphorePermit,
}

/// The answers of one TCP connection on their way to its writer: a byte budget
/// (`TCP_QUEUED_BYTES`) taken before an answer is written, given back once it is sent.
#[derive(Clone)]
struct AnswerQueue {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
}

impl AnswerQueue {
    /// Waits until the connection's budget has room for `len` bytes (all of it for an answer
    /// larger than the budget); None once the writer gave up.
    async fn reserve(&self, len: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = len.clamp(1, TCP_QUEUED_BYTES) as u32;
        tokio::select! {
            held = self.budget.clone().acquire_many_owned(n) => held.ok(),
            _ = self.tx.closed() => None,
        }
    }

    /// Frames and queues `out` under `held`; false once the writer gave up.
    async fn send(&self, out: &[u8], held: tokio::sync::OwnedSemaphorePermit) -> bool {
        // Our answers come from messages that were framed: they always fit.
        let Some(framed) = wire::tcp_frame(out) else {
            return true;
        };
        self.tx
            .send(Queued {
                framed,
                _held: held,
            })
            .await
            .is_ok()
    }
}

/// Serves one connection (RFC 7766 6.2.1.1): pipelined queries are answered concurrently and
/// each answer is written when ready, so a miss does not hold up the hits queued behind it
/// (answers carry the client's ID; clients match them, not their order). No query is read
/// while the connection's answers not yet sent take `TCP_QUEUED_BYTES` (a client that does not
/// read stops being read). Ends after `TCP_IDLE` without a query, on EOF, on a message that is
/// not a query; once `token` is cancelled (hand-over), after `TCP_HANDOVER_IDLE` without a
/// query or `TCP_HANDOVER_MAX` in all. Answers already being worked on are still written.
async fn serve_tcp_connection(
    server: Arc<DnsServer>,
    stream: tokio::net::TcpStream,
    token: CancellationToken,
) {
    if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(TCP_SNDBUF) {
        tracing::debug!(error = %e, "dns tcp: SO_SNDBUF");
    }
    let (mut reader, writer) = stream.into_split();
    let (tx, pending) = mpsc::channel::<Queued>(TCP_PIPELINE);
    let answers = AnswerQueue {
        tx,
        budget: Arc::new(Semaphore::new(TCP_QUEUED_BYTES)),
    };
    let writing = tokio::spawn(write_answers(writer, pending));
    let slots = Arc::new(Semaphore::new(TCP_PIPELINE));
    let mut buf = Vec::new();
    let mut key = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(TCP_KEEP_BUFFER);
    // When the hand-over began, as this connection first saw it.
    let mut handover: Option<Instant> = None;
    loop {
        if handover.is_none() && token.is_cancelled() {
            handover = Some(Instant::now());
        }
        // How long to wait for the next query: idle, or in the hand-over the client's next
        // query comes at once or not at all (a half-read length is lost only with the
        // connection it belonged to).
        let give_up = async {
            tokio::select! {
                _ = tokio::time::sleep(TCP_IDLE) => {}
                _ = token.cancelled() => {
                    let since = handover.map_or(Duration::ZERO, |t| t.elapsed());
                    let left = TCP_HANDOVER_MAX.saturating_sub(since);
                    tokio::time::sleep(TCP_HANDOVER_IDLE.min(left)).await;
                }
            }
        };
        let mut len = [0u8; 2];
        let read = tokio::select! {
            // The writer gave up (the client does not read): hang up now, not when idle.
            _ = answers.tx.closed() => break,
            _ = give_up => break,
            r = reader.read_exact(&mut len) => r,
        };
        if read.is_err() {
            break;
        }
        let n = usize::from(u16::from_be_bytes(len));
        buf.resize(n, 0);
        if !matches!(
            tokio::time::timeout(TCP_IDLE, reader.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) {
            server.metrics.dropped("tcp message cut short");
            break;
        }
        match server.answer_fast(&buf, Protocol::Tcp, &mut key, &mut out) {
            Fast::Answered => {
                // Waiting here for room is what stops reading a client that does not read.
                let Some(held) = answers.reserve(out.len() + 2).await else {
                    break;
                };
                if !answers.send(&out, held).await {
                    break;
                }
                if out.capacity() > TCP_KEEP_BUFFER {
                    out = Vec::with_capacity(TCP_KEEP_BUFFER);
                }
            }
            // Nothing sensible to say to a peer sending non-queries: hang up.
            Fast::Dropped => break,
            Fast::Miss(miss) => {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (server, answers) = (server.clone(), answers.clone());
                let (query, key) = query_and_key(&buf, &key);
                tokio::spawn(async move {
                    let _slot = slot;
                    let (query, key) = query.split_at(key);
                    let q = miss.q;
                    let outcome = server.miss_outcome(query, key, miss).await;
                    // Room first, then the answer's bytes: a miss waiting for its client to
                    // read holds only its entry (shared with the cache and its coalesced
                    // askers), not a copy of the answer.
                    let Some(held) = answers.reserve(outcome.answer_len() + 2).await else {
                        return;
                    };
                    let mut out = Vec::with_capacity(512);
                    server.render(query, &q, outcome, Protocol::Tcp, &mut out);
                    answers.send(&out, held).await;
                });
            }
        }
    }
    // The writer ends once every answer in the works is written (their senders dropped).
    drop(answers);
    let _ = writing.await;
}

/// Writes answers as they come, flushing when none is queued (a burst goes out in few segments).
async fn write_answers(
    writer: tokio::net::tcp::OwnedWriteHalf,
    mut pending: mpsc::Receiver<Queued>,
) {
    let mut writer = tokio::io::BufWriter::new(writer);
    let written = |r: Result<std::io::Result<()>, _>| matches!(r, Ok(Ok(())));
    while let Some(answer) = pending.recv().await {
        if !written(tokio::time::timeout(TCP_WRITE_TIMEOUT, writer.write_all(&answer.framed)).await)
        {
            return;
        }
        drop(answer);
        if pending.is_empty()
            && !written(tokio::time::timeout(TCP_WRITE_TIMEOUT, writer.flush()).await)
        {
            return;
        }
    }
    let _ = tokio::time::timeout(TCP_WRITE_TIMEOUT, writer.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigDuration;
    use crate::dns::wire::fast::tests::{query, response};
    use std::sync::atomic::AtomicU32;

    /// Answers A queries with one record (TTL from the name's first label when numeric), NXDOMAIN
    /// with an SOA for names starting with "nx", fails for "down", and counts calls. Like a
    /// validating upstream, "bogus" names are SERVFAIL unless the query has CD, and "signed"
    /// answers carry AD when the query asked with AD; "aa" answers are authoritative, "cookie"
    /// answers carry an OPT with a server cookie, "junk" answers trailing bytes, "cnamenodata"
    /// an answer plus an SOA (a CNAME chain to NODATA). While `fail_with` is set (an rcode), every
    /// query gets that rcode. The last query it received is kept.
    struct FakeUpstream {
        calls: AtomicU32,
        delay: Duration,
        up: std::sync::atomic::AtomicBool,
        fail_with: std::sync::atomic::AtomicU16,
        last_query: Mutex<Vec<u8>>,
    }

    impl Upstream for FakeUpstream {
        fn forward<'a>(
            &'a self,
            q: &'a [u8],
            qname: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                *self.last_query.lock().unwrap() = q.to_vec();
                tokio::time::sleep(self.delay).await;
                if !self.up.load(Ordering::SeqCst) || qname.starts_with("down") {
                    return Err("upstream down".into());
                }
                let (cd, ad) = (q[3] & 0x10 != 0, q[3] & 0x20 != 0);
                let fail = self.fail_with.load(Ordering::SeqCst);
                if fail != 0 {
                    return Ok(response(q, fail, &[], None));
                }
                if qname.starts_with("nx") {
                    return Ok(response(q, rcode::NXDOMAIN, &[], Some((900, 7))));
                }
                if qname.starts_with("bogus") && !cd {
                    return Ok(response(q, rcode::SERVFAIL, &[], None));
                }
                if qname.starts_with("cnamenx") {
                    return Ok(response(q, rcode::NXDOMAIN, &[2], Some((900, 60))));
                }
                if qname.starts_with("cnamenodata") {
                    return Ok(response(q, 0, &[300], Some((900, 7))));
                }
                let ttl = qname
                    .split('.')
                    .next()
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(300);
                let mut r = response(q, 0, &[ttl], None);
                if qname.starts_with("signed") && ad {
                    r[3] |= 0x20;
                }
                if qname.starts_with("aa") {
                    r[2] |= 0x04;
                }
                if qname.starts_with("cookie") {
                    // OPT with a COOKIE option: 8 client bytes + 8 server bytes.
                    r[11] = 1;
                    r.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 20, 0, 10, 0, 16]);
                    r.extend_from_slice(&[0xcc; 8]);
                    r.extend_from_slice(&[0x5e; 8]);
                }
                if qname.starts_with("poison") || qname.starts_with("loop") {
                    return Ok(chain_answer(q, qname));
                }
                if qname.starts_with("junk") {
                    r.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
                }
                Ok(r)
            })
        }
        fn any_healthy(&self) -> bool {
            self.up.load(Ordering::SeqCst)
        }
    }

    /// "poison" names: their A record plus one for `victim.test.` (an unrelated owner);
    /// "loop" names: a CNAME to `x.loop.test.` and one from there back to the name.
    fn chain_answer(q: &[u8], qname: &str) -> Vec<u8> {
        use hickory_proto::op::Message;
        use hickory_proto::rr::rdata::{A, CNAME};
        use hickory_proto::rr::{Name, RData, Record};
        let mut m = Message::from_vec(q).unwrap();
        m.metadata.message_type = hickory_proto::op::MessageType::Response;
        m.edns = None;
        let name = |s: &str| Name::from_ascii(s).unwrap();
        let a = |owner: &str| Record::from_rdata(name(owner), 60, RData::A(A::new(192, 0, 2, 1)));
        let fqdn = format!("{qname}.");
        if qname.starts_with("poison") {
            m.add_answer(a(&fqdn));
            m.add_answer(a("victim.test."));
        } else {
            let x = "x.loop.test.";
            m.add_answer(Record::from_rdata(
                name(&fqdn),
                60,
                RData::CNAME(CNAME(name(x))),
            ));
            m.add_answer(Record::from_rdata(
                name(x),
                60,
                RData::CNAME(CNAME(name(&fqdn))),
            ));
        }
        m.to_vec().unwrap()
    }

    fn server(delay: Duration) -> (Arc<DnsServer>, Arc<FakeUpstream>) {
        server_with(delay, |_| {})
    }

    fn server_with(
        delay: Duration,
        configure: impl FnOnce(&mut DnsConfig),
    ) -> (Arc<DnsServer>, Arc<FakeUpstream>) {
        let up = Arc::new(FakeUpstream {
            calls: AtomicU32::new(0),
            delay,
            up: true.into(),
            fail_with: Default::default(),
            last_query: Default::default(),
        });
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = DnsMetrics::register(&mut registry);
        let mut config = DnsConfig::default();
        config.cache.max_ttl = ConfigDuration(Duration::from_secs(30));
        configure(&mut config);
        (DnsServer::new(config, up.clone(), metrics), up)
    }

    fn ttl_of(answer: &[u8]) -> u32 {
        let info = wire::scan_response(answer).unwrap();
        let off = usize::from(info.ttl_offsets[0]);
        u32::from_be_bytes(answer[off..off + 4].try_into().unwrap())
    }

    #[tokio::test]
    async fn a_miss_is_fetched_capped_cached_and_then_answered_for_the_client() {
        let (s, up) = server(Duration::ZERO);
        let mut out = Vec::new();
        let q1 = query(0x1111, "300.Example.Test", 1, None);
        assert!(s.answer(&q1, Protocol::Udp, &mut out).await);
        assert_eq!(&out[0..2], &[0x11, 0x11]);
        assert_eq!(ttl_of(&out), 30, "300 capped to maxTtl");
        let q2 = query(0x2222, "300.example.test", 1, None);
        assert!(s.answer(&q2, Protocol::Udp, &mut out).await);
        assert_eq!(&out[0..2], &[0x22, 0x22]);
        assert_eq!(&out[12..30], &q2[12..30], "the second client's own case");
        assert_eq!(
            up.calls.load(Ordering::SeqCst),
            1,
            "second answer from the cache"
        );
        assert_eq!(s.metrics.cache_hits.get(), 1);
    }

    /// Issue #22 performance: a miss is parsed and its key hashed once, however many tables
    /// (cache lookup, in-flight map, cache insert) it meets; a hit likewise.
    #[tokio::test]
    async fn a_miss_is_parsed_once_and_its_key_hashed_once() {
        use crate::dns::counting::{HASHES, PARSES};
        let (s, up) = server(Duration::ZERO);
        let counts = || (PARSES.with(|n| n.get()), HASHES.with(|n| n.get()));
        let mut out = Vec::new();
        let mut work = |q: Vec<u8>| {
            let before = counts();
            let s = s.clone();
            let mut out = std::mem::take(&mut out);
            async move {
                assert!(s.answer(&q, Protocol::Udp, &mut out).await);
                let after = counts();
                (after.0 - before.0, after.1 - before.1)
            }
        };
        assert_eq!(
            work(query(1, "once.test", 1, None)).await,
            (1, 1),
            "a miss: (parses, hashes)"
        );
        assert_eq!(up.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            work(query(2, "once.test", 1, None)).await,
            (1, 1),
            "a hit: (parses, hashes)"
        );
        assert_eq!(
            up.calls.load(Ordering::SeqCst),
            1,
            "the second one was a hit"
        );
    }

    #[tokio::test]
    async fn identical_concurrent_misses_make_one_upstream_query() {
        let (s, up) = server(Duration::from_millis(100));
        let mut tasks = Vec::new();
        for id in 0..50u16 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                s.answer(&query(id, "same.test", 1, None), Protocol::Udp, &mut out)
                    .await;
                u16::from_be_bytes([out[0], out[1]])
            }));
        }
        for (id, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), id as u16);
        }
        assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dropped_leader_fails_its_waiters_and_the_next_query_fetches_again() {
        let (s, up) = server(Duration::from_millis(500));
        let leader = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                s.answer(&query(1, "gone.test", 1, None), Protocol::Udp, &mut out)
                    .await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                s.answer(&query(2, "gone.test", 1, None), Protocol::Udp, &mut out)
                    .await;
                out
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        leader.abort();
        let out = tokio::time::timeout(Duration::from_millis(200), waiter)
            .await
            .expect("the waiter is not left hanging")
            .unwrap();
        assert_eq!(wire::scan_response(&out).unwrap().rcode, rcode::SERVFAIL);
        assert!(s.in_flight.lock().unwrap().is_empty(), "the key is gone");
        let mut out = Vec::new();
        s.answer(&query(3, "gone.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(wire::scan_response(&out).unwrap().rcode, rcode::NOERROR);
        assert_eq!(up.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn pipelined_tcp_queries_are_answered_as_they_are_ready() {
        let (s, up) = server(Duration::from_millis(300));
        let mut out = Vec::new();
        s.answer(&query(1, "hit.test", 1, None), Protocol::Udp, &mut out)
            .await;
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve_tcp(s.clone(), listener, token.clone()));

        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A miss (300 ms upstream), then a hit, back to back on one connection.
        let mut both = wire::tcp_frame(&query(0x0101, "slow.test", 1, None)).unwrap();
        both.extend(wire::tcp_frame(&query(0x0202, "hit.test", 1, None)).unwrap());
        client.write_all(&both).await.unwrap();
        let started = Instant::now();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let mut len = [0u8; 2];
            client.read_exact(&mut len).await.unwrap();
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            client.read_exact(&mut msg).await.unwrap();
            ids.push((u16::from_be_bytes([msg[0], msg[1]]), started.elapsed()));
        }
        assert_eq!(
            ids[0].0, 0x0202,
            "the hit is not held up by the miss before it"
        );
        assert!(ids[0].1 < Duration::from_millis(200), "{ids:?}");
        assert_eq!(ids[1].0, 0x0101);
        assert_eq!(
            up.calls.load(Ordering::SeqCst),
            2,
            "hit.test warm-up and slow.test"
        );
        token.cancel();
    }

    #[tokio::test]
    async fn negative_answers_use_the_soa_ttl_and_failures_serve_stale_or_servfail() {
        let (s, up) = server(Duration::ZERO);
        let mut out = Vec::new();
        s.answer(&query(1, "nx.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(wire::scan_response(&out).unwrap().rcode, rcode::NXDOMAIN);
        s.answer(&query(2, "nx.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(up.calls.load(Ordering::SeqCst), 1, "NXDOMAIN cached");
        assert_eq!(ttl_of(&out), 7, "min(SOA TTL, MINIMUM)");

        // Warm a 1 s name, let it expire, take the upstream down: served stale with staleTtl.
        s.answer(&query(3, "1.warm.test", 1, None), Protocol::Udp, &mut out)
            .await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        up.up.store(false, Ordering::SeqCst);
        s.answer(&query(4, "1.warm.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(wire::scan_response(&out).unwrap().rcode, rcode::NOERROR);
        assert_eq!(ttl_of(&out), 30);
        assert_eq!(s.metrics.stale_served.get(), 1);
        s.answer(&query(5, "never.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(wire::scan_response(&out).unwrap().rcode, rcode::SERVFAIL);
    }

    #[tokio::test]
    async fn chaos_class_is_refused_locally_without_an_upstream() {
        let (s, up) = server(Duration::from_secs(10));
        let mut q = query(5, "id.server", 16, None);
        let class = q.len() - 2;
        q[class + 1] = 3; // CH
        let mut out = Vec::new();
        let answered = tokio::time::timeout(
            Duration::from_millis(100),
            s.answer(&q, Protocol::Udp, &mut out),
        )
        .await
        .expect("answered at once, not after the slow upstream");
        assert!(answered);
        assert_eq!(wire::scan_response(&out).unwrap().rcode, rcode::REFUSED);
        assert_eq!(up.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn bad_input_is_answered_or_dropped_and_counted() {
        let (s, _) = server(Duration::ZERO);
        let mut out = Vec::new();
        assert!(!s.answer(&[1, 2, 3], Protocol::Udp, &mut out).await);
        let mut two = query(1, "a.test", 1, None);
        two[5] = 2;
        assert!(s.answer(&two, Protocol::Udp, &mut out).await);
        assert_eq!(wire::scan_response(&out).unwrap().rcode, rcode::FORMERR);
        assert_eq!(s.metrics.dropped_total(), 2);
    }

    #[tokio::test]
    async fn large_answers_are_truncated_for_udp_clients_only() {
        let (s, _) = server(Duration::ZERO);
        let mut out = Vec::new();
        // 40 A records: 12 + 15 + 40 * 16 > 512.
        struct Big(usize);
        impl Upstream for Big {
            fn forward<'a>(
                &'a self,
                q: &'a [u8],
                _: &'a str,
            ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>> {
                Box::pin(async move { Ok(response(q, 0, &vec![60; self.0], None)) })
            }
            fn any_healthy(&self) -> bool {
                true
            }
        }
        let mut registry = prometheus_client::registry::Registry::default();
        let big = DnsServer::new(
            DnsConfig::default(),
            Arc::new(Big(40)),
            DnsMetrics::register(&mut registry),
        );
        big.answer(&query(1, "big.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert!(wire::scan_response(&out).unwrap().truncated);
        big.answer(
            &query(2, "big.test", 1, Some((4096, false))),
            Protocol::Udp,
            &mut out,
        )
        .await;
        assert!(
            !wire::scan_response(&out).unwrap().truncated,
            "EDNS 4096 takes it"
        );
        big.answer(&query(3, "big.test", 1, None), Protocol::Tcp, &mut out)
            .await;
        assert_eq!(wire::scan_response(&out).unwrap().answers, 40);
        drop(s);
        // 300 records (about 4.8 KB): over UDP never more than 4,096 bytes, whatever the client
        // advertises (65,535 here); TC, and the whole answer over TCP.
        let mut registry = prometheus_client::registry::Registry::default();
        let huge = DnsServer::new(
            DnsConfig::default(),
            Arc::new(Big(300)),
            DnsMetrics::register(&mut registry),
        );
        let q = query(4, "huge.test", 1, Some((65_535, false)));
        huge.answer(&q, Protocol::Udp, &mut out).await;
        assert!(
            wire::scan_response(&out).unwrap().truncated,
            "{} bytes",
            out.len()
        );
        assert!(out.len() <= wire::MAX_UDP_ANSWER);
        huge.answer(&q, Protocol::Tcp, &mut out).await;
        assert_eq!(wire::scan_response(&out).unwrap().answers, 300);
    }
    /// Header bits of an answer: (AA, AD, CD).
    fn aa_ad_cd(answer: &[u8]) -> (bool, bool, bool) {
        (
            answer[2] & 0x04 != 0,
            answer[3] & 0x20 != 0,
            answer[3] & 0x10 != 0,
        )
    }

    fn with_cd(mut q: Vec<u8>) -> Vec<u8> {
        q[3] |= 0x10;
        q
    }

    fn rcode_of(answer: &[u8]) -> u16 {
        wire::scan_response(answer).unwrap().rcode
    }

    #[tokio::test]
    async fn cd_is_part_of_the_key_and_copied_to_every_answer() {
        // CD=1 first: the unvalidated answer must not reach a CD=0 client.
        let (s, up) = server(Duration::ZERO);
        let mut out = Vec::new();
        s.answer(
            &with_cd(query(1, "bogus.test", 1, None)),
            Protocol::Udp,
            &mut out,
        )
        .await;
        assert_eq!(rcode_of(&out), rcode::NOERROR);
        assert!(aa_ad_cd(&out).2, "CD copied from the query");
        s.answer(&query(2, "bogus.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(
            rcode_of(&out),
            rcode::SERVFAIL,
            "CD=0 gets the validator's SERVFAIL"
        );
        assert!(!aa_ad_cd(&out).2, "CD clear for a CD=0 query");
        assert_eq!(
            up.calls.load(Ordering::SeqCst),
            2,
            "one upstream query per CD value"
        );
        // And in the other order: a cached SERVFAIL does not reach the CD=1 client.
        let (s, _) = server(Duration::ZERO);
        s.answer(&query(3, "bogus.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(rcode_of(&out), rcode::SERVFAIL);
        s.answer(
            &with_cd(query(4, "bogus.test", 1, None)),
            Protocol::Udp,
            &mut out,
        )
        .await;
        assert_eq!(rcode_of(&out), rcode::NOERROR);
        assert!(aa_ad_cd(&out).2);
        // The SERVFAIL answer to a CD query copies CD too.
        let (s, up) = server(Duration::ZERO);
        up.fail_with.store(rcode::SERVFAIL, Ordering::SeqCst);
        s.answer(
            &with_cd(query(5, "x.test", 1, None)),
            Protocol::Udp,
            &mut out,
        )
        .await;
        assert_eq!((rcode_of(&out), aa_ad_cd(&out).2), (rcode::SERVFAIL, true));
    }

    #[tokio::test]
    async fn ad_is_set_only_for_clients_that_ask_with_ad_or_do_and_aa_is_cleared() {
        let (s, up) = server(Duration::ZERO);
        let mut out = Vec::new();
        // First asker without AD or DO: the upstream is still asked with AD, so the cache
        // learns that the answer validated...
        s.answer(&query(1, "signed.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(
            aa_ad_cd(&out),
            (false, false, false),
            "no AD for this client"
        );
        assert_ne!(up.last_query.lock().unwrap()[3] & 0x20, 0, "asked with AD");
        // ...and a later client asking with AD gets it from the cache.
        let mut with_ad = query(2, "signed.test", 1, None);
        with_ad[3] |= 0x20;
        s.answer(&with_ad, Protocol::Udp, &mut out).await;
        assert_eq!(aa_ad_cd(&out), (false, true, false));
        assert_eq!(up.calls.load(Ordering::SeqCst), 1, "from the cache");
        // DO counts as asking (RFC 6840 5.8); an unvalidated answer never gets AD.
        s.answer(
            &query(3, "signed.test", 1, Some((1232, true))),
            Protocol::Udp,
            &mut out,
        )
        .await;
        assert!(aa_ad_cd(&out).1, "DO client gets AD");
        s.answer(&with_ad.clone(), Protocol::Udp, &mut out).await;
        let mut unsigned = query(4, "plain.test", 1, None);
        unsigned[3] |= 0x20;
        s.answer(&unsigned, Protocol::Udp, &mut out).await;
        assert!(!aa_ad_cd(&out).1, "not validated upstream: no AD");
        // AA from the upstream is cleared on the miss and on hits.
        for id in [5, 6] {
            s.answer(&query(id, "aa.test", 1, None), Protocol::Udp, &mut out)
                .await;
            assert!(!aa_ad_cd(&out).0, "AA cleared (query {id})");
        }
    }

    /// A query with EDNS carrying a COOKIE option with `client` as the client cookie.
    fn cookie_query(id: u16, name: &str, client: u8) -> Vec<u8> {
        let mut q = query(id, name, 1, Some((1232, false)));
        let len = q.len();
        q[len - 2..].copy_from_slice(&12u16.to_be_bytes());
        q.extend_from_slice(&[0, 10, 0, 8]);
        q.extend_from_slice(&[client; 8]);
        q
    }

    /// The OPT record's RDATA in an answer (its options).
    fn opt_rdata(answer: &[u8]) -> Vec<u8> {
        let info = wire::scan_response(answer).unwrap();
        let start = answer.len() - 11;
        assert_eq!(answer[start..start + 3], [0, 0, 41], "OPT last: {answer:?}");
        assert_eq!(info.opt.map(|o| o.start), Some(start), "exactly one OPT");
        answer[start + 11..].to_vec()
    }

    #[tokio::test]
    async fn client_edns_options_never_reach_the_upstream_and_cookies_never_reach_other_clients() {
        let (s, up) = server(Duration::ZERO);
        let mut out = Vec::new();
        s.answer(
            &cookie_query(1, "cookie.test", 0xAA),
            Protocol::Udp,
            &mut out,
        )
        .await;
        let sent = up.last_query.lock().unwrap().clone();
        let p = wire::parse_query(&sent).expect("our upstream query parses");
        assert_eq!(p.edns.map(|e| e.udp_payload), Some(wire::OUR_UDP_PAYLOAD));
        assert_eq!(sent.len(), p.question_end + 11, "our own OPT, no options");
        assert!(
            !sent.windows(8).any(|w| w == [0xAA; 8]),
            "client cookie not forwarded"
        );
        // The upstream's OPT (its server cookie) is not served: each client gets its own OPT.
        assert_eq!(opt_rdata(&out), Vec::<u8>::new());
        s.answer(
            &cookie_query(2, "cookie.test", 0xBB),
            Protocol::Udp,
            &mut out,
        )
        .await;
        assert_eq!(up.calls.load(Ordering::SeqCst), 1, "a hit");
        assert_eq!(opt_rdata(&out), Vec::<u8>::new());
        assert!(!out.windows(8).any(|w| w == [0x5e; 8] || w == [0xAA; 8]));
        // A client without EDNS gets no OPT from an entry fetched for one with EDNS.
        s.answer(&query(3, "cookie.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(wire::scan_response(&out).unwrap().opt, None);
    }

    #[tokio::test]
    async fn servfail_refused_and_timeouts_serve_stale_and_never_evict_it() {
        for (failure, name) in [
            (rcode::SERVFAIL, "1.sf.test"),
            (rcode::REFUSED, "1.rf.test"),
            (0, "1.to.test"),
        ] {
            let (s, up) = server(Duration::ZERO);
            let mut out = Vec::new();
            s.answer(&query(1, name, 1, None), Protocol::Udp, &mut out)
                .await;
            tokio::time::sleep(Duration::from_millis(1100)).await;
            match failure {
                0 => up.up.store(false, Ordering::SeqCst),
                rc => up.fail_with.store(rc, Ordering::SeqCst),
            }
            s.answer(&query(2, name, 1, None), Protocol::Udp, &mut out)
                .await;
            assert_eq!(rcode_of(&out), rcode::NOERROR, "stale after {failure}");
            assert_eq!(ttl_of(&out), 30, "staleTtl");
            assert_eq!(up.calls.load(Ordering::SeqCst), 2);
            // Failure recheck: the next asker gets stale at once, the upstream is not asked,
            // and the failure did not replace the entry.
            s.answer(&query(3, name, 1, None), Protocol::Udp, &mut out)
                .await;
            assert_eq!(
                rcode_of(&out),
                rcode::NOERROR,
                "still stale after {failure}"
            );
            assert_eq!(up.calls.load(Ordering::SeqCst), 2, "not asked again");
            assert_eq!(s.metrics.stale_served.get(), 2);
        }
    }

    #[tokio::test]
    async fn a_failed_prefetch_keeps_the_fresh_entry() {
        let (s, up) = server(Duration::ZERO);
        let mut out = Vec::new();
        s.answer(&query(1, "20.pf.test", 1, None), Protocol::Udp, &mut out)
            .await;
        up.fail_with.store(rcode::SERVFAIL, Ordering::SeqCst);
        let mut key = Vec::new();
        let q = query(2, "20.pf.test", 1, None);
        wire::parse_query(&q).unwrap().key_into(&q, &mut key);
        let p = wire::parse_query(&q).unwrap();
        s.fetch(&key, s.cache.hash(&key), &q, &p).await;
        s.answer(&q, Protocol::Udp, &mut out).await;
        assert_eq!(
            rcode_of(&out),
            rcode::NOERROR,
            "not replaced by the SERVFAIL"
        );
    }

    #[tokio::test]
    async fn top_bit_ttls_are_zero_and_cname_to_nodata_takes_the_negative_ttl() {
        let (s, _) = server(Duration::ZERO);
        let mut out = Vec::new();
        // 2^31 + 16: RFC 2181 8 says 0, so minTtl (0), not maxTtl (30).
        s.answer(
            &query(1, "2147483664.tb.test", 1, None),
            Protocol::Udp,
            &mut out,
        )
        .await;
        assert_eq!(ttl_of(&out), 0);
        s.answer(
            &query(2, "cnamenodata.test", 1, None),
            Protocol::Udp,
            &mut out,
        )
        .await;
        assert_eq!(
            ttl_of(&out),
            7,
            "min(SOA TTL, MINIMUM), not the CNAME's 300 capped"
        );
        let mut key = Vec::new();
        let q = query(3, "cnamenodata.test", 1, None);
        wire::parse_query(&q).unwrap().key_into(&q, &mut key);
        match s.cache.lookup(&key, Instant::now()) {
            Lookup::Fresh(e) => assert_eq!(e.ttl, 7),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_cname_chain_to_nxdomain_lives_no_longer_than_its_cnames() {
        let (s, _) = server(Duration::ZERO);
        let mut out = Vec::new();
        let q = query(1, "cnamenx.test", 1, None);
        s.answer(&q, Protocol::Udp, &mut out).await;
        assert_eq!(wire::scan_response(&out).unwrap().rcode, rcode::NXDOMAIN);
        assert_eq!(ttl_of(&out), 2, "the chain's TTL, not the negative 60");
        let mut key = Vec::new();
        wire::parse_query(&q).unwrap().key_into(&q, &mut key);
        match s.cache.lookup(&key, Instant::now()) {
            Lookup::Fresh(e) => assert_eq!(e.ttl, 2, "issue #22 finding 1"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn trailing_junk_from_the_upstream_is_dropped() {
        let (s, _) = server(Duration::ZERO);
        let mut out = Vec::new();
        s.answer(&query(1, "junk.test", 1, None), Protocol::Udp, &mut out)
            .await;
        let info = wire::scan_response(&out).unwrap();
        assert_eq!(info.end, out.len(), "nothing after the last record");
        assert!(!out.ends_with(&[0xde, 0xad, 0xbe, 0xef]));
    }

    #[tokio::test]
    async fn a_slow_refresh_answers_stale_after_the_client_timer_and_still_fills_the_cache() {
        // The upstream takes 400 ms (slow, not failing); the client timer is 100 ms.
        let (s, up) = server_with(Duration::from_millis(400), |c| {
            c.cache.stale_answer_client_timeout = ConfigDuration(Duration::from_millis(100));
        });
        let mut out = Vec::new();
        let q = query(1, "1.slow.test", 1, None);
        s.answer(&q, Protocol::Udp, &mut out).await;
        assert_eq!(ttl_of(&out), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        s.answer(&query(2, "1.slow.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(rcode_of(&out), rcode::NOERROR);
        assert_eq!(
            ttl_of(&out),
            30,
            "stale (staleTtl), not the refresh's TTL 1"
        );
        assert_eq!(s.metrics.stale_served.get(), 1);
        assert_eq!(up.calls.load(Ordering::SeqCst), 2, "the refresh was sent");
        // The refresh was not dropped with the client: it lands in the cache.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut key = Vec::new();
        wire::parse_query(&q).unwrap().key_into(&q, &mut key);
        assert!(
            matches!(s.cache.lookup(&key, Instant::now()), Lookup::Fresh(_)),
            "refreshed in the background"
        );
        s.answer(&query(3, "1.slow.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(ttl_of(&out), 1, "the refreshed answer");
        assert_eq!(up.calls.load(Ordering::SeqCst), 2, "from the cache");
    }

    #[tokio::test]
    async fn a_client_timer_of_zero_answers_stale_at_once_and_misses_still_wait() {
        let (s, up) = server_with(Duration::from_millis(300), |c| {
            c.cache.stale_answer_client_timeout = ConfigDuration(Duration::ZERO);
        });
        let mut out = Vec::new();
        // Nothing stale to give: a miss waits for the upstream, whatever the timer.
        s.answer(&query(1, "1.zero.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!((rcode_of(&out), ttl_of(&out)), (rcode::NOERROR, 1));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        s.answer(&query(2, "1.zero.test", 1, None), Protocol::Udp, &mut out)
            .await;
        assert_eq!(ttl_of(&out), 30, "stale at once");
        assert_eq!(up.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn records_outside_the_chain_are_not_served_and_cname_loops_are_not_cached() {
        use hickory_proto::op::Message;
        let (s, up) = server(Duration::ZERO);
        let mut out = Vec::new();
        for id in [1, 2] {
            s.answer(&query(id, "poison.test", 1, None), Protocol::Udp, &mut out)
                .await;
            let owners: Vec<String> = Message::from_vec(&out)
                .unwrap()
                .answers
                .iter()
                .map(|r| r.name.to_string())
                .collect();
            assert_eq!(owners, vec!["poison.test."], "query {id}");
        }
        assert_eq!(
            up.calls.load(Ordering::SeqCst),
            1,
            "the scrubbed answer is cached"
        );
        for id in [3, 4] {
            s.answer(&query(id, "loop.test", 1, None), Protocol::Udp, &mut out)
                .await;
            assert_eq!(rcode_of(&out), rcode::NOERROR, "passed to its asker");
        }
        assert_eq!(up.calls.load(Ordering::SeqCst), 3, "a loop is never cached");
        assert!(s.metrics.dropped_total() >= 3, "counted");
    }
}
