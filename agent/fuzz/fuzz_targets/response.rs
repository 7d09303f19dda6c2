//! The upstream side of the hit path: arbitrary bytes as an upstream response go through
//! `scan_response`; an accepted one is stored in the cache as the server stores it and served
//! back to a client whose query is the response's own question (adopt, TTL rewrite, stale TTL),
//! and the served bytes must scan again with the same record layout.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nodekeeper::dns::cache::{Cache, Entry, Lookup};
use nodekeeper::dns::wire;

fuzz_target!(|data: &[u8]| {
    let Ok(info) = wire::scan_response(data) else {
        return;
    };
    for &off in &info.ttl_offsets {
        assert!(usize::from(off) + 4 <= data.len(), "TTL offset {off} past the end");
    }
    // The client query: this response's header and first question, as a query.
    let mut query = data.to_vec();
    query[2] &= 0x7f; // QR off
    query[3] &= 0xf0;
    query[6..12].fill(0); // AN, NS, AR = 0
    let Ok(q) = wire::parse_query(&query) else {
        return;
    };
    query.truncate(q.question_end);
    // Stored as the server stores it: without OPT, trailing bytes and AA.
    let bytes = wire::for_cache(data, &info);
    let stored = wire::scan_response(&bytes).expect("a stored response scans");
    let now = Instant::now();
    let cache = Cache::new(4, 4096);
    let mut key = Vec::new();
    q.key_into(&query, &mut key);
    cache.insert(
        &key,
        Arc::new(Entry {
            bytes: bytes.clone().into(),
            ttl_offsets: stored.ttl_offsets.clone().into(),
            rcode: info.rcode,
            inserted: now,
            ttl: info.min_answer_ttl.or(info.negative_ttl).unwrap_or(0).min(30),
            stale_until: now + Duration::from_secs(3600),
            hits: Default::default(),
            prefetching: Default::default(),
            failed_until_ms: Default::default(),
        }),
    );
    let later = now + Duration::from_secs(7);
    let entry = match cache.lookup(&key, later) {
        Lookup::Fresh(e) | Lookup::Stale(e) => e,
        Lookup::Miss => return,
    };
    let mut out = Vec::new();
    for stale in [None, Some(30)] {
        entry.answer(&query, &q, later, stale, &mut out);
        // The query has no OPT, so neither has the answer.
        assert_eq!(out.len(), bytes.len());
        let again = wire::scan_response(&out).expect("a served answer scans");
        assert_eq!(again.ttl_offsets, stored.ttl_offsets);
    }
});
