//! The answer cache: encoded responses keyed by (name case-folded, type, class, EDNS, DO),
//! bounded by entries and bytes, evicted by CLOCK (an entry hit since the hand last passed
//! survives a sweep, so hot names stay while one-off names go first), sharded so readers on
//! different names never contend.
//!
//! A hit copies the stored bytes and patches them (wire::adopt, TTLs decremented by the time
//! since insertion): no message is decoded or re-encoded.
//!
//! A key is hashed once per query (`Cache::hash`): the same hash picks the shard, finds the
//! slot in the shard's index and the fetch in the server's in-flight table.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::wire;

const SHARDS: usize = 32;

/// One cached response.
#[derive(Debug)]
pub struct Entry {
    /// The response as stored: TTLs already capped; ID and question case are the first asker's.
    pub bytes: Box<[u8]>,
    pub ttl_offsets: Box<[u16]>,
    pub rcode: u16,
    pub inserted: Instant,
    /// The TTL it was stored with (seconds): the entry is fresh until `inserted + ttl`.
    pub ttl: u32,
    /// Served stale (RFC 8767) until then.
    pub stale_until: Instant,
    pub hits: AtomicU32,
    /// A prefetch of this entry is in flight.
    pub prefetching: AtomicBool,
    /// Milliseconds after `inserted` until which the upstream is known to fail for this entry
    /// (0: not failed): RFC 8767's failure recheck, so askers get it stale at once meanwhile.
    pub failed_until_ms: AtomicU64,
}

impl Entry {
    pub fn expires(&self) -> Instant {
        self.inserted + Duration::from_secs(u64::from(self.ttl))
    }

    /// Records that refreshing this entry failed at `now`: until `now + recheck` it is served
    /// stale without asking the upstream again.
    pub fn mark_failed(&self, now: Instant, recheck: Duration) {
        let until = now.saturating_duration_since(self.inserted) + recheck;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX).max(1);
        self.failed_until_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether a refresh failed less than the recheck interval ago.
    pub fn recently_failed(&self, now: Instant) -> bool {
        let until = self.failed_until_ms.load(Ordering::Relaxed);
        until != 0 && now.saturating_duration_since(self.inserted).as_millis() < u128::from(until)
    }

    /// Writes the answer for `query` into `out`: stored bytes made the client's (`wire::adopt`:
    /// ID, RD, CD, AD, question case), TTLs decremented by the whole seconds elapsed or all set
    /// to `stale_ttl` when serving stale, and an OPT built for this client when it sent one.
    pub fn answer(
        &self,
        query: &[u8],
        q: &wire::Query,
        now: Instant,
        stale_ttl: Option<u32>,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.extend_from_slice(&self.bytes);
        wire::adopt(out, query, q);
        let elapsed = u32::try_from(now.saturating_duration_since(self.inserted).as_secs())
            .unwrap_or(u32::MAX);
        match stale_ttl {
            Some(stale) => wire::rewrite_ttls(out, &self.ttl_offsets, |_| stale),
            None if elapsed > 0 => {
                wire::rewrite_ttls(out, &self.ttl_offsets, |t| t.saturating_sub(elapsed))
            }
            None => {}
        }
        wire::add_client_opt(out, q, self.rcode);
    }

    /// What holding this entry under a key of `key_len` bytes costs the heap: the response,
    /// the TTL offsets, the `Arc<Entry>` itself, the key (stored once, in the slot: the index
    /// holds slot numbers), and the entry's share of the index and slot tables at their worst
    /// load, each allocation counted as the chunk the allocator hands out. Measured against a
    /// counting allocator in tests/tests/it/dns_cache_memory.rs.
    fn cost(&self, key_len: usize) -> u64 {
        heap(self.bytes.len())
            + heap(self.ttl_offsets.len() * 2)
            + heap(ARC_ENTRY)
            + heap(key_len)
            + INDEX_PER_ENTRY
            + SLOT_PER_ENTRY
    }
}

/// What the allocator takes for a request of `n` bytes: glibc's chunks carry an 8-byte header,
/// are 16-byte aligned and at least 32 bytes; nothing for an empty boxed slice.
fn heap(n: usize) -> u64 {
    if n == 0 {
        0
    } else {
        ((n + 8).div_ceil(16) * 16).max(32) as u64
    }
}

/// An `Arc<Entry>` allocation: two reference counts and the entry.
const ARC_ENTRY: usize = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Entry>();
/// The index's share per entry: a hash table bucket (a slot number) and its control byte, at the lowest load the table reaches under churn (7/32: when its deleted slots run out
/// while it is more than half full it doubles, so a table of n entries can hold 32n/7 buckets;
/// measured: charging 7/16 left the heap 5% over maxBytes after 100,000 inserts).
const INDEX_PER_ENTRY: u64 = ((std::mem::size_of::<usize>() + 1) * 32).div_ceil(7) as u64;
/// The slot vector's share per entry: one slot, twice over right after the vector doubled.
const SLOT_PER_ENTRY: u64 = 2 * std::mem::size_of::<Option<Slot>>() as u64;

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Expired but within `stale_until`: usable only when upstreams fail.
    Stale(Arc<Entry>),
    Miss,
}

struct Slot {
    key: Box<[u8]>,
    /// `Cache::hash(key)`, kept so the index can grow without hashing keys again.
    hash: u64,
    entry: Arc<Entry>,
    referenced: AtomicBool,
}

#[derive(Default)]
struct Shard {
    /// Slot numbers by their key's hash; the key itself lives once, in the slot.
    index: hashbrown::HashTable<usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    hand: usize,
    bytes: u64,
}

impl Shard {
    /// The slot holding `key`.
    fn find(&self, key: &[u8], hash: u64) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| slots[i].as_ref().is_some_and(|s| &*s.key == key))
            .copied()
    }

    fn remove_slot(&mut self, i: usize) -> Option<Slot> {
        let slot = self.slots[i].take()?;
        if let Ok(found) = self.index.find_entry(slot.hash, |&j| j == i) {
            found.remove();
        }
        self.bytes -= slot.entry.cost(slot.key.len());
        self.free.push(i);
        Some(slot)
    }

    /// CLOCK: clears reference bits until it finds an unreferenced entry, evicts it.
    fn evict_one(&mut self) -> bool {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let i = self.hand;
            self.hand = (self.hand + 1) % n.max(1);
            if let Some(slot) = &self.slots[i] {
                if slot.referenced.swap(false, Ordering::Relaxed) {
                    continue;
                }
                self.remove_slot(i);
                return true;
            }
        }
        false
    }
}

/// Cache-wide counters, read by the metrics.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub evictions: AtomicU64,
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct Cache {
    shards: Box<[RwLock<Shard>]>,
    hasher: foldhash::fast::RandomState,
    /// Per shard; they sum to at most the configured bounds.
    max_entries: Box<[usize]>,
    max_bytes: Box<[u64]>,
    pub counters: Arc<CacheCounters>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.counters.entries.load(Ordering::Relaxed))
            .finish()
    }
}

impl Cache {
    pub fn new(max_entries: usize, max_bytes: u64) -> Self {
        // Fewer shards for tiny caches, so every shard can hold something and the sum of the
        // shards' bounds never exceeds the configured one.
        let shards = SHARDS.min(max_entries.max(1));
        let split = |total: u64, i: usize| {
            total / shards as u64 + u64::from((i as u64) < total % shards as u64)
        };
        Self {
            shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            max_entries: (0..shards)
                .map(|i| split(max_entries as u64, i) as usize)
                .collect(),
            max_bytes: (0..shards).map(|i| split(max_bytes, i)).collect(),
            counters: Arc::default(),
        }
    }

    /// The key's hash, computed once per query and passed to `lookup_hashed`,
    /// `insert_hashed` and the server's in-flight table.
    pub fn hash(&self, key: &[u8]) -> u64 {
        #[cfg(test)]
        super::counting::HASHES.with(|n| n.set(n.get() + 1));
        self.hasher.hash_one(key)
    }

    /// The shard from bits the index does not use for its buckets (their low bits) nor its
    /// control bytes (the top 7), so a shard's keys still spread over its whole table.
    fn shard_of(&self, hash: u64) -> usize {
        ((hash >> 32) as usize) % self.shards.len()
    }

    #[cfg(test)]
    fn shard_index(&self, key: &[u8]) -> usize {
        self.shard_of(self.hash(key))
    }

    pub fn lookup(&self, key: &[u8], now: Instant) -> Lookup {
        self.lookup_hashed(key, self.hash(key), now)
    }

    /// `lookup` with the key's hash already known (`Cache::hash`).
    pub fn lookup_hashed(&self, key: &[u8], hash: u64, now: Instant) -> Lookup {
        let shard = self.shards[self.shard_of(hash)]
            .read()
            .expect("not poisoned");
        let Some(i) = shard.find(key, hash) else {
            return Lookup::Miss;
        };
        let Some(slot) = &shard.slots[i] else {
            return Lookup::Miss;
        };
        slot.referenced.store(true, Ordering::Relaxed);
        let entry = slot.entry.clone();
        drop(shard);
        if now < entry.expires() {
            entry.hits.fetch_add(1, Ordering::Relaxed);
            Lookup::Fresh(entry)
        } else if now < entry.stale_until {
            Lookup::Stale(entry)
        } else {
            Lookup::Miss
        }
    }

    /// Stores `entry` under `key`, replacing an older one, evicting until within bounds.
    /// An entry larger than a shard's byte budget is not stored.
    pub fn insert(&self, key: &[u8], entry: Arc<Entry>) {
        self.insert_hashed(key, self.hash(key), entry);
    }

    /// `insert` with the key's hash already known (`Cache::hash`).
    pub fn insert_hashed(&self, key: &[u8], hash: u64, entry: Arc<Entry>) {
        let cost = entry.cost(key.len());
        let i = self.shard_of(hash);
        let (max_entries, max_bytes) = (self.max_entries[i], self.max_bytes[i]);
        if cost > max_bytes {
            return;
        }
        let mut shard = self.shards[i].write().expect("not poisoned");
        let (entries_before, bytes_before) = (shard.index.len(), shard.bytes);
        let mut evicted = 0u64;
        if let Some(i) = shard.find(key, hash) {
            shard.remove_slot(i);
        }
        while shard.index.len() >= max_entries || shard.bytes + cost > max_bytes {
            if !shard.evict_one() {
                break;
            }
            evicted += 1;
        }
        let slot = Slot {
            key: key.into(),
            hash,
            entry,
            // New entries start unreferenced: a name asked once is the first to go.
            referenced: AtomicBool::new(false),
        };
        let slot_index = match shard.free.pop() {
            Some(free) => {
                shard.slots[free] = Some(slot);
                free
            }
            None => {
                shard.slots.push(Some(slot));
                shard.slots.len() - 1
            }
        };
        let Shard { index, slots, .. } = &mut *shard;
        index.insert_unique(hash, slot_index, |&j| {
            slots[j].as_ref().map_or(0, |s| s.hash)
        });
        shard.bytes += cost;
        let (entries_after, bytes_after) = (shard.index.len(), shard.bytes);
        drop(shard);
        let c = &self.counters;
        c.evictions.fetch_add(evicted, Ordering::Relaxed);
        adjust(&c.entries, entries_before as u64, entries_after as u64);
        adjust(&c.bytes, bytes_before, bytes_after);
    }

    pub fn len(&self) -> u64 {
        self.counters.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }
}

/// Moves a counter by `after - before`, which may be negative.
fn adjust(counter: &AtomicU64, before: u64, after: u64) {
    if after >= before {
        counter.fetch_add(after - before, Ordering::Relaxed);
    } else {
        counter.fetch_sub(before - after, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::fast::tests::{query, response};

    fn entry(ttl: u32, now: Instant) -> Entry {
        let q = query(1, "a.test", 1, None);
        let r = response(&q, 0, &[ttl], None);
        let info = wire::scan_response(&r).unwrap();
        Entry {
            bytes: r.into(),
            ttl_offsets: info.ttl_offsets.into(),
            rcode: 0,
            inserted: now,
            ttl,
            stale_until: now + Duration::from_secs(u64::from(ttl) + 60),
            hits: AtomicU32::new(0),
            prefetching: AtomicBool::new(false),
            failed_until_ms: AtomicU64::new(0),
        }
    }

    #[test]
    fn fresh_then_stale_then_gone() {
        let cache = Cache::new(100, 1 << 20);
        let t0 = Instant::now();
        cache.insert(b"k", Arc::new(entry(10, t0)));
        assert!(matches!(cache.lookup(b"k", t0), Lookup::Fresh(_)));
        assert!(matches!(
            cache.lookup(b"k", t0 + Duration::from_secs(11)),
            Lookup::Stale(_)
        ));
        assert!(matches!(
            cache.lookup(b"k", t0 + Duration::from_secs(100)),
            Lookup::Miss
        ));
        assert!(matches!(cache.lookup(b"other", t0), Lookup::Miss));
    }

    #[test]
    fn answers_decrement_ttls_and_serve_stale_with_the_stale_ttl() {
        let t0 = Instant::now();
        let e = entry(30, t0);
        let client = query(0x7777, "A.test", 1, None);
        let q = wire::parse_query(&client).unwrap();
        let mut out = Vec::new();
        let ttl = |out: &[u8]| {
            let off = usize::from(e.ttl_offsets[0]);
            u32::from_be_bytes(out[off..off + 4].try_into().unwrap())
        };
        e.answer(
            &client,
            &q,
            t0 + Duration::from_millis(2500),
            None,
            &mut out,
        );
        assert_eq!(ttl(&out), 28);
        assert_eq!(&out[0..2], &[0x77, 0x77]);
        e.answer(
            &client,
            &q,
            t0 + Duration::from_secs(500),
            Some(30),
            &mut out,
        );
        assert_eq!(ttl(&out), 30);
        e.answer(&client, &q, t0 + Duration::from_secs(500), None, &mut out);
        assert_eq!(ttl(&out), 0, "never negative");
    }

    #[test]
    fn bounded_by_entries_and_bytes_and_hot_names_survive() {
        let cache = Cache::new(SHARDS * 4, 1 << 30);
        let t0 = Instant::now();
        // One hot name per shard (the hash is seeded per process: pick names by their shard),
        // so every shard has room for its hot name next to the churn of cold ones.
        let mut hot: Vec<Vec<u8>> = vec![Vec::new(); SHARDS];
        for i in 0.. {
            let k = format!("hot{i}").into_bytes();
            let slot = &mut hot[cache.shard_index(&k)];
            if slot.is_empty() {
                *slot = k;
            }
            if hot.iter().all(|k| !k.is_empty()) {
                break;
            }
        }
        for k in &hot {
            cache.insert(k, Arc::new(entry(300, t0)));
        }
        for i in 0..10_000 {
            for k in &hot {
                assert!(matches!(cache.lookup(k, t0), Lookup::Fresh(_)) || i > 0);
                let _ = cache.lookup(k, t0);
            }
            cache.insert(format!("cold{i}").as_bytes(), Arc::new(entry(300, t0)));
            assert!(cache.len() <= (SHARDS * 4) as u64);
        }
        let kept = hot
            .iter()
            .filter(|k| matches!(cache.lookup(k, t0), Lookup::Fresh(_)))
            .count();
        assert_eq!(kept, SHARDS, "hot names kept");
        assert!(cache.counters.evictions.load(Ordering::Relaxed) > 9_000);

        let small = Cache::new(1_000_000, 64 * 1024);
        for i in 0..10_000 {
            small.insert(format!("n{i}").as_bytes(), Arc::new(entry(300, t0)));
        }
        assert!(small.bytes() <= 64 * 1024, "{} bytes", small.bytes());
        assert!(small.len() < 10_000);
    }

    #[test]
    fn the_bounds_are_exact_whatever_the_shard_count() {
        let t0 = Instant::now();
        for max in [1usize, 5, 31, 33, 1000] {
            let cache = Cache::new(max, 1 << 30);
            for i in 0..5 * max + 50 {
                cache.insert(format!("n{i}").as_bytes(), Arc::new(entry(300, t0)));
                assert!(cache.len() <= max as u64, "{} > {max}", cache.len());
            }
            assert!(
                cache.len() >= (max as u64) * 3 / 4,
                "{} of {max} used",
                cache.len()
            );
        }
    }

    #[test]
    fn replacing_an_entry_keeps_counts_right() {
        let cache = Cache::new(100, 1 << 20);
        let t0 = Instant::now();
        cache.insert(b"k", Arc::new(entry(10, t0)));
        cache.insert(b"k", Arc::new(entry(20, t0)));
        assert_eq!(cache.len(), 1);
        match cache.lookup(b"k", t0) {
            Lookup::Fresh(e) => assert_eq!(e.ttl, 20),
            other => panic!("{other:?}"),
        }
    }
}
