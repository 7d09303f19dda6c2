//! Scrubbing an upstream answer before it is cached (issue #22): only records that belong to
//! the question's answer are kept, so an upstream (or a spoofer that got one datagram in)
//! cannot plant records for other names that every pod on the node is then served for maxTtl.
//!
//! The miss path is where a full parse pays for itself, so this uses hickory-proto's decoder
//! rather than the hand-written scanner of the hit path; it never runs on a hit. An answer
//! whose records are all owned by the question name (the common case: the owner is the
//! compression pointer to the question, nothing in the other sections) is proven clean by
//! `wire::owned_by_question` without decoding.
//!
//! The rules (as unbound's scrubber, for a forwarder):
//! - **answer**: a record is kept when its owner is the question name or a CNAME target
//!   reached from it (in any order) and its type is the question's, CNAME, or an RRSIG (a DO
//!   client's signatures); ANY keeps every type of those owners. A DNAME is kept when its
//!   owner is an ancestor of such a name (the CNAME synthesized from it carries the chain on).
//!   Any other type is dropped (unbound's "removing irrelevant RRset", issue #22 finding 8: an
//!   A record in an AAAA answer). A CNAME pointing back into the chain is a loop: the answer
//!   is passed to its asker but never cached.
//! - **authority**: SOA and NS records whose owner is an ancestor of (or equal to) a chain name
//!   name the zones of the answer; a record is kept when its owner is one of those zones or
//!   below one (DS, and the NSEC/NSEC3/RRSIG proofs of a DO client).
//! - **additional**: kept only for names a kept NS, MX or SRV record points to (glue).
//!
//! It must never add a record, change one that is kept, or reorder a section.

use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::wire;

/// What scrubbing did to an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to drop: the bytes are the upstream's (OPT, AA and trailing bytes aside).
    Clean,
    /// Records outside the answer chain were dropped; the message was re-encoded.
    Dropped(usize),
    /// Passed to its asker, never cached: the reason is the metric label.
    Uncacheable(&'static str),
}

/// Label for an answer hickory-proto cannot decode (our scanner accepted its structure).
pub const UNPARSABLE: &str = "upstream response does not parse";
/// Label for an answer whose CNAME chain loops.
pub const CNAME_LOOP: &str = "upstream CNAME loop";
/// Label for answers that lost records to scrubbing.
pub const OUT_OF_CHAIN: &str = "upstream records outside the answer chain";

/// Scrubs a response as the cache stores it (`wire::into_cache`): returns the bytes to store
/// (the same ones when clean) and what was done.
pub fn scrub(stored: Vec<u8>) -> (Vec<u8>, Verdict) {
    if wire::owned_by_question(&stored) {
        return (stored, Verdict::Clean);
    }
    let Ok(mut msg) = Message::from_vec(&stored) else {
        return (stored, Verdict::Uncacheable(UNPARSABLE));
    };
    let Some(question) = msg.queries.first() else {
        return (stored, Verdict::Uncacheable(UNPARSABLE));
    };
    let (keep_answers, chain, looped) =
        answer_chain(question.name(), question.query_type(), &msg.answers);
    let zones: Vec<Name> = msg
        .authorities
        .iter()
        .filter(|r| matches!(r.record_type(), RecordType::SOA | RecordType::NS))
        .filter(|r| chain.iter().any(|c| r.name.zone_of(c)))
        .map(|r| r.name.clone())
        .collect();
    let keep_authorities: Vec<bool> = msg
        .authorities
        .iter()
        .map(|r| zones.iter().any(|z| z.zone_of(&r.name)))
        .collect();
    let glue_targets: Vec<&Name> = kept(&msg.answers, &keep_answers)
        .chain(kept(&msg.authorities, &keep_authorities))
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(&ns.0),
            RData::MX(mx) => Some(&mx.exchange),
            RData::SRV(srv) => Some(&srv.target),
            _ => None,
        })
        .collect();
    let keep_additionals: Vec<bool> = msg
        .additionals
        .iter()
        .map(|r| glue_targets.contains(&&r.name))
        .collect();
    let dropped = [&keep_answers, &keep_authorities, &keep_additionals]
        .iter()
        .map(|k| k.iter().filter(|keep| !**keep).count())
        .sum::<usize>();
    if looped {
        return (stored, Verdict::Uncacheable(CNAME_LOOP));
    }
    if dropped == 0 {
        return (stored, Verdict::Clean);
    }
    retain(&mut msg.answers, &keep_answers);
    retain(&mut msg.authorities, &keep_authorities);
    retain(&mut msg.additionals, &keep_additionals);
    match msg.to_vec() {
        Ok(bytes) => (bytes, Verdict::Dropped(dropped)),
        Err(_) => (stored, Verdict::Uncacheable(UNPARSABLE)),
    }
}

/// Which answer records belong to the chain from `qname`, the chain's names, and whether a
/// CNAME points back into it. Records may come in any order, so this runs to a fixed point
/// (a chain is short: each round adds at least one record).
fn answer_chain(
    qname: &Name,
    qtype: RecordType,
    answers: &[Record],
) -> (Vec<bool>, Vec<Name>, bool) {
    let wanted = |t: RecordType| {
        t == qtype || qtype == RecordType::ANY || matches!(t, RecordType::CNAME | RecordType::RRSIG)
    };
    let mut keep = vec![false; answers.len()];
    let mut chain = vec![qname.clone()];
    let mut looped = false;
    let mut grew = true;
    while grew {
        grew = false;
        for (i, r) in answers.iter().enumerate() {
            if keep[i] {
                continue;
            }
            let owner = chain.iter().position(|c| *c == r.name);
            let dname_above =
                r.record_type() == RecordType::DNAME && chain.iter().any(|c| r.name.zone_of(c));
            if !dname_above && (owner.is_none() || !wanted(r.record_type())) {
                continue;
            }
            keep[i] = true;
            grew = true;
            if let (Some(at), RData::CNAME(target)) = (owner, &r.data) {
                match chain.iter().position(|c| *c == target.0) {
                    // Back to this name or one before it: a loop.
                    Some(seen) if seen <= at => looped = true,
                    Some(_) => {}
                    None => chain.push(target.0.clone()),
                }
            }
        }
    }
    (keep, chain, looped)
}

fn kept<'a>(records: &'a [Record], keep: &'a [bool]) -> impl Iterator<Item = &'a Record> {
    records
        .iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(r, _)| r)
}

fn retain(records: &mut Vec<Record>, keep: &[bool]) {
    let mut k = keep.iter();
    records.retain(|_| *k.next().expect("one flag per record"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, CNAME, NS, SOA};
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn a(owner: &str, last: u8) -> Record {
        Record::from_rdata(name(owner), 300, RData::A(A::new(192, 0, 2, last)))
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
    }

    fn soa(zone: &str) -> Record {
        let rdata = SOA::new(
            name(&format!("ns.{zone}")),
            name("admin."),
            1,
            60,
            60,
            60,
            7,
        );
        Record::from_rdata(name(zone), 7, RData::SOA(rdata))
    }

    fn ns(zone: &str, host: &str) -> Record {
        Record::from_rdata(name(zone), 300, RData::NS(NS(name(host))))
    }

    /// A response to `qname A` with the given sections, as bytes the cache would store.
    fn response(qname: &str, answers: &[Record], auth: &[Record], add: &[Record]) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Response, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_query(Query::query(name(qname), RecordType::A));
        m.add_answers(answers.iter().cloned());
        m.add_authorities(auth.iter().cloned());
        m.add_additionals(add.iter().cloned());
        m.to_vec().unwrap()
    }

    fn owners(bytes: &[u8]) -> [Vec<String>; 3] {
        let m = Message::from_vec(bytes).unwrap();
        let names = |rs: &[Record]| rs.iter().map(|r| r.name.to_string()).collect();
        [
            names(&m.answers),
            names(&m.authorities),
            names(&m.additionals),
        ]
    }

    #[test]
    fn records_for_unrelated_owners_are_dropped_from_every_section() {
        let raw = response(
            "www.example.test.",
            &[a("www.example.test.", 1), a("victim.other.test.", 6)],
            &[
                ns("example.test.", "ns.example.test."),
                ns("other.test.", "ns.evil.test."),
            ],
            &[
                a("ns.example.test.", 2),
                a("ns.evil.test.", 6),
                a("bank.test.", 6),
            ],
        );
        let (bytes, verdict) = scrub(raw);
        assert_eq!(verdict, Verdict::Dropped(4));
        assert_eq!(
            owners(&bytes),
            [
                vec!["www.example.test.".to_string()],
                vec!["example.test.".to_string()],
                vec!["ns.example.test.".to_string()],
            ]
        );
        assert!(wire::scan_response(&bytes).is_ok(), "stored bytes scan");
    }

    #[test]
    fn a_cname_chain_is_kept_in_any_order_and_its_targets_may_own_records() {
        let raw = response(
            "www.example.test.",
            &[
                a("edge.cdn.test.", 9),
                cname("alias.example.test.", "edge.cdn.test."),
                cname("www.example.test.", "alias.example.test."),
            ],
            &[],
            &[],
        );
        let (bytes, verdict) = scrub(raw.clone());
        assert_eq!(verdict, Verdict::Clean);
        assert_eq!(bytes, raw, "untouched");
    }

    #[test]
    fn cname_loops_are_not_cacheable() {
        for answers in [
            vec![
                cname("a.loop.test.", "b.loop.test."),
                cname("b.loop.test.", "a.loop.test."),
            ],
            vec![cname("a.loop.test.", "a.loop.test.")],
            vec![
                cname("a.loop.test.", "b.loop.test."),
                cname("b.loop.test.", "c.loop.test."),
                cname("c.loop.test.", "b.loop.test."),
            ],
        ] {
            let (_, verdict) = scrub(response("a.loop.test.", &answers, &[], &[]));
            assert_eq!(verdict, Verdict::Uncacheable(CNAME_LOOP), "{answers:?}");
        }
    }

    #[test]
    fn negative_answers_keep_the_soa_of_their_zone_only() {
        // NODATA after a CNAME into another zone: that zone's SOA stays, a stranger's goes.
        let raw = response(
            "www.example.test.",
            &[cname("www.example.test.", "x.cdn.test.")],
            &[soa("cdn.test."), soa("evil.test.")],
            &[],
        );
        let (bytes, verdict) = scrub(raw);
        assert_eq!(verdict, Verdict::Dropped(1));
        assert_eq!(owners(&bytes)[1], vec!["cdn.test.".to_string()]);
        let info = wire::scan_response(&bytes).unwrap();
        assert_eq!(
            info.negative_ttl,
            Some(7),
            "the kept SOA still gives the negative TTL"
        );
    }

    #[test]
    fn answers_owned_by_the_question_are_clean_without_decoding() {
        let raw = response("www.example.test.", &[a("www.example.test.", 1)], &[], &[]);
        assert!(
            wire::owned_by_question(&raw),
            "hickory compresses to the question"
        );
        let with_stranger = response(
            "www.example.test.",
            &[a("www.example.test.", 1), a("other.test.", 2)],
            &[],
            &[],
        );
        assert!(!wire::owned_by_question(&with_stranger));
        let with_cname = response(
            "www.example.test.",
            &[cname("www.example.test.", "www.example.test.")],
            &[],
            &[],
        );
        assert!(
            !wire::owned_by_question(&with_cname),
            "a CNAME needs the chain"
        );
    }

    #[test]
    fn what_does_not_decode_is_not_cacheable() {
        // An A record with 3 bytes of RDATA: structurally sound, not an address.
        let mut raw = response("bad.test.", &[a("bad.test.", 1)], &[], &[]);
        let len = raw.len();
        raw[len - 6..len - 4].copy_from_slice(&3u16.to_be_bytes());
        raw.truncate(len - 1);
        assert!(
            wire::scan_response(&raw).is_ok(),
            "our scanner takes its structure"
        );
        assert!(
            !wire::owned_by_question(&raw),
            "the fast path checks A sizes"
        );
        let (_, verdict) = scrub(raw);
        assert_eq!(verdict, Verdict::Uncacheable(UNPARSABLE));
    }

    #[test]
    fn answer_records_of_another_type_than_the_question_are_dropped() {
        let mut m = Message::from_vec(&response(
            "www.example.test.",
            &[
                cname("www.example.test.", "edge.cdn.test."),
                a("edge.cdn.test.", 1),
                Record::from_rdata(
                    name("edge.cdn.test."),
                    300,
                    RData::AAAA(hickory_proto::rr::rdata::AAAA::new(
                        0x2001, 0xdb8, 0, 0, 0, 0, 0, 1,
                    )),
                ),
            ],
            &[],
            &[],
        ))
        .unwrap();
        m.queries[0].set_query_type(RecordType::AAAA);
        let raw = m.to_vec().unwrap();
        let (bytes, verdict) = scrub(raw);
        assert_eq!(
            verdict,
            Verdict::Dropped(1),
            "the A record of an AAAA answer"
        );
        let kept: Vec<RecordType> = Message::from_vec(&bytes)
            .unwrap()
            .answers
            .iter()
            .map(Record::record_type)
            .collect();
        assert_eq!(kept, vec![RecordType::CNAME, RecordType::AAAA]);
        // The fast path takes only the question's own type.
        let a_only = response("www.example.test.", &[a("www.example.test.", 1)], &[], &[]);
        let mut m = Message::from_vec(&a_only).unwrap();
        m.queries[0].set_query_type(RecordType::AAAA);
        let a_for_aaaa = m.to_vec().unwrap();
        assert!(!wire::owned_by_question(&a_for_aaaa));
        assert_eq!(scrub(a_for_aaaa).1, Verdict::Dropped(1));
        // ANY keeps every type of the question's owner.
        m.queries[0].set_query_type(RecordType::ANY);
        assert_eq!(scrub(m.to_vec().unwrap()).1, Verdict::Clean);
    }
}
