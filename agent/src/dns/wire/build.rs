//! Every DNS message the agent originates (not a client's query it forwards or answers): the
//! upstream health probes, the node guard's liveness query and the shutdown self-check. Built
//! with hickory-proto, so no message is a hand-written byte literal; none of them is on a
//! per-client-query path.

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};

/// A one-question query with `id`, class `class`, RD as given; no EDNS.
fn one_question(id: u16, name: Name, qtype: RecordType, class: DNSClass, rd: bool) -> Vec<u8> {
    let mut q = Query::query(name, qtype);
    q.set_query_class(class);
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = rd;
    m.add_query(q);
    m.to_vec().expect("a one-question query always encodes")
}

/// `name` (dotted, trailing dot optional, "" for the root) as a wire name; each label cut to
/// 63 bytes, the root when the whole is still not a valid name.
fn name_of(name: &str) -> Name {
    let labels = name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .map(|l| &l.as_bytes()[..l.len().min(63)]);
    let mut n = Name::from_labels(labels).unwrap_or_else(|_| Name::root());
    n.set_fqdn(true);
    n
}

/// A recursion-desired `IN` query for `name` and `qtype`, ID 0 (the forwarder sets it): the
/// health probes' `. NS` and `<zone> SOA`.
pub fn probe_query(name: &str, qtype: RecordType) -> Vec<u8> {
    one_question(0, name_of(name), qtype, DNSClass::IN, true)
}

/// The node guard's query: `name` class CH type TXT with `id`, no recursion desired (the cache
/// answers it itself or refuses it; either proves it is alive).
pub fn guard_query(id: u16, name: &str) -> Vec<u8> {
    one_question(id, name_of(name), RecordType::TXT, DNSClass::CH, false)
}

/// The shutdown self-check: `. IN NS`, recursion desired, with `id`.
pub fn self_check_query(id: u16) -> Vec<u8> {
    one_question(id, Name::root(), RecordType::NS, DNSClass::IN, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_queries_decode() {
        let m = Message::from_vec(&probe_query("", RecordType::NS)).unwrap();
        assert_eq!(m.queries[0].name(), &Name::root());
        assert!(m.metadata.recursion_desired);
        let m = Message::from_vec(&probe_query("cluster.local", RecordType::SOA)).unwrap();
        assert_eq!(m.queries[0].query_type(), RecordType::SOA);
        assert_eq!(m.queries[0].name().to_ascii(), "cluster.local.");
    }

    #[test]
    fn built_queries_are_byte_for_byte_what_the_hand_written_ones_were() {
        // The guard's CH TXT query and the self-check's ". NS" before #21-w.
        let q = guard_query(0xabcd, "id.server.");
        assert_eq!(&q[..12], &[0xab, 0xcd, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..], b"\x02id\x06server\x00\x00\x10\x00\x03");
        assert_eq!(
            self_check_query(0x1234),
            [
                0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1
            ]
        );
        // A 64-byte label is cut to 63, as before; an overlong name becomes the root.
        let long = guard_query(1, &format!("{}.x", "a".repeat(64)));
        assert_eq!(long[12], 63);
        assert_eq!(long.len(), 12 + 1 + 63 + 2 + 1 + 4);
        let huge = guard_query(1, &vec!["b".repeat(63); 5].join("."));
        assert_eq!(&huge[12..], b"\x00\x00\x10\x00\x03");
    }
}
