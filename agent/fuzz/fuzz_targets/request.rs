//! The request path: arbitrary bytes as a client datagram (or TCP frame) go through
//! `parse_query`, and whatever the server would do with the result (cache key, name, UDP limit,
//! an error response) must neither panic nor produce a response our own scanner rejects.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodekeeper::dns::wire::{self, Reject};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    match wire::parse_query(data) {
        Ok(q) => {
            // Offsets index `data` and are ordered.
            assert!(wire::HEADER_LEN < q.qname_end, "{q:?}");
            assert!(q.qname_end < q.question_end && q.question_end <= data.len(), "{q:?}");
            let mut key = Vec::new();
            q.key_into(data, &mut key);
            assert!(key.len() <= 5 + 255, "cache key of {} bytes", key.len());
            let name = q.qname(data);
            assert!(name.len() <= 4 * 255, "{name:?}");
            assert!(q.udp_limit() >= 512);
            // A SERVFAIL and a truncated answer for it, as the server sends them.
            for (rcode, tc) in [(wire::rcode::SERVFAIL, false), (wire::rcode::NOERROR, true)] {
                wire::empty_response(data, Some(&q), rcode, tc, &mut out);
                let info = wire::scan_response(&out).expect("our own response scans");
                assert_eq!(info.rcode, rcode);
                assert_eq!(info.truncated, tc);
                assert!(out.len() <= q.udp_limit().max(512) + 11, "response fits the client");
            }
        }
        Err(Reject::Respond { rcode, .. }) => {
            wire::empty_response(data, None, rcode, false, &mut out);
            let info = wire::scan_response(&out).expect("our own error response scans");
            assert_eq!(info.rcode, rcode);
        }
        Err(Reject::Drop(_)) => {}
    }
});
