//! Differential test of the hand-written fast path against hickory-proto's decoder: generated
//! queries (question name, type, class, header flags, EDNS presence, size, DO and version, extra
//! records, lying counts), a third of them mutated (a flipped byte, cut short, junk appended),
//! from a fixed seed so a failure repeats. Every verdict of `parse_query` must be one hickory's
//! decoding agrees with: an accepted query has hickory's ID, flags, question and EDNS; every
//! rejection names something hickory also sees (a response, another opcode, a zone transfer,
//! an EDNS version, a count, a compressed or undecodable question, a second or misplaced OPT).
//! The messages built by hand from a query's own bytes (`upstream_query`, `empty_response`,
//! `reject_response`) must decode in hickory as what they promise. Responses: `scan_response`
//! against hickory on generated answers (rcode with its OPT bits, TC, counts, TTLs) and their
//! mutations.

use hickory_proto::op::{Header, Message, MessageType, OpCode, Query as HQuery};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::{
    HEADER_LEN, Reject, TYPE_AXFR, TYPE_IXFR, TYPE_OPT, parse_query, rcode, scan_response,
};

/// How many messages each test generates: enough to reach every branch many times over, few
/// enough for a debug build to run in about a second.
const CASES: usize = 20_000;

/// xorshift64*: a deterministic generator (no proptest or seeded rand in the tree).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

fn label(rng: &mut Rng) -> Vec<u8> {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
    let len = match rng.below(20) {
        0 => 63,
        1 => 64,
        _ => 1 + rng.below(12),
    };
    (0..len)
        .map(|_| {
            if rng.percent(3) {
                rng.next() as u8
            } else {
                rng.pick(CHARS)
            }
        })
        .collect()
}

/// A query as a client might send it, valid or not in the ways listed in the module doc.
fn generate_query(rng: &mut Rng) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(rng.next() as u16).to_be_bytes());
    let opcode = if rng.percent(90) {
        0
    } else {
        rng.below(16) as u8
    };
    let qr = u8::from(rng.percent(5)) << 7;
    b.push(qr | (opcode << 3) | (rng.next() as u8 & 0x07));
    b.push(if rng.percent(80) {
        rng.next() as u8 & 0x30
    } else {
        rng.next() as u8
    });
    let qd: u16 = if rng.percent(94) {
        1
    } else {
        rng.pick(&[0, 2])
    };
    let an: u16 = u16::from(rng.percent(3));
    let ns: u16 = u16::from(rng.percent(3));
    b.extend_from_slice(&qd.to_be_bytes());
    b.extend_from_slice(&an.to_be_bytes());
    b.extend_from_slice(&ns.to_be_bytes());
    b.extend_from_slice(&[0, 0]); // ARCOUNT, set below
    let labels = match rng.below(30) {
        0 => vec![b"y".repeat(63); 4 + rng.below(2)],
        // 255 bytes on the wire, or one more.
        1 => vec![
            b"x".repeat(63),
            b"x".repeat(63),
            b"x".repeat(63),
            b"x".repeat(61 + rng.below(2)),
        ],
        _ => (0..rng.below(5)).map(|_| label(rng)).collect(),
    };
    for l in &labels {
        b.push(l.len() as u8);
        b.extend_from_slice(l);
    }
    if rng.percent(4) {
        b.extend_from_slice(&[0xC0, rng.pick(&[0, 12, 200])]);
    } else {
        b.push(0);
    }
    let qtype = rng.pick(&[1u16, 28, 5, 15, 16, 33, 255, 6, 2, 12, 65, 251, 252, 0]);
    let qtype = if rng.percent(5) {
        rng.next() as u16
    } else {
        qtype
    };
    let any = rng.next() as u16;
    let qclass = rng.pick(&[1u16, 1, 1, 3, 255, 254, any]);
    b.extend_from_slice(&qtype.to_be_bytes());
    b.extend_from_slice(&qclass.to_be_bytes());
    if qd == 2 {
        b.extend_from_slice(&[1, b'b', 0, 0, 1, 0, 1]);
    }
    for _ in 0..an + ns {
        a_record(&mut b);
    }
    let mut ar = 0u16;
    if rng.percent(60) {
        opt_record(rng, &mut b);
        ar += 1;
    }
    if rng.percent(8) {
        a_record(&mut b);
        ar += 1;
    }
    if rng.percent(4) {
        opt_record(rng, &mut b);
        ar += 1;
    }
    if rng.percent(4) {
        ar = ar.wrapping_add(rng.pick(&[1, u16::MAX]));
    }
    b[10..12].copy_from_slice(&ar.to_be_bytes());
    b
}

fn a_record(b: &mut Vec<u8>) {
    b.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
}

fn opt_record(rng: &mut Rng, b: &mut Vec<u8>) {
    if rng.percent(95) {
        b.push(0);
    } else {
        b.extend_from_slice(&[1, b'o', 0]);
    }
    b.extend_from_slice(&TYPE_OPT.to_be_bytes());
    let any = rng.next() as u16;
    let payload = rng.pick(&[0u16, 511, 512, 1232, 4096, 65_535, any]);
    b.extend_from_slice(&payload.to_be_bytes());
    let version = if rng.percent(90) { 0 } else { rng.next() as u8 };
    let do_bit = if rng.percent(50) { 0x80 } else { 0 };
    b.extend_from_slice(&[0, version, do_bit, 0]);
    match rng.below(10) {
        // A cookie option.
        0..=1 => b.extend_from_slice(&[0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]),
        // An option whose length runs past the record.
        2 => b.extend_from_slice(&[0, 4, 0, 10, 0, 20, 1, 2, 3, 4]),
        _ => b.extend_from_slice(&[0, 0]),
    }
}

/// A flipped byte, a cut, or junk at the end.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>) {
    match rng.below(3) {
        0 if !b.is_empty() => {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        1 => b.truncate(rng.below(b.len() + 1)),
        _ => b.extend((0..1 + rng.below(8)).map(|_| rng.next() as u8)),
    }
}

/// What hickory-proto reads in a message: the header, the questions (with whether the first
/// was written out in full at offset 12) and, separately, the records.
struct Hickory {
    header: Header,
    questions: Result<Vec<(HQuery, bool)>, String>,
    records: Result<Vec<Record>, String>,
}

fn hickory(b: &[u8]) -> Option<Hickory> {
    let mut d = BinDecoder::new(b);
    let header = Header::read(&mut d).ok()?;
    let mut questions = Vec::new();
    for _ in 0..header.counts.queries {
        let start = d.index();
        match HQuery::read(&mut d) {
            Ok(q) => {
                let literal = wire_name(q.name()).eq_ignore_ascii_case(&b[start..d.index() - 4]);
                questions.push((q, literal));
            }
            Err(e) => {
                return Some(Hickory {
                    header,
                    questions: Err(e.to_string()),
                    records: Err("after a bad question".into()),
                });
            }
        }
    }
    let c = header.counts;
    let total = usize::from(c.answers) + usize::from(c.authorities) + usize::from(c.additionals);
    let records = (0..total)
        .map(|_| Record::read(&mut d).map_err(|e| e.to_string()))
        .collect();
    Some(Hickory {
        header,
        questions: Ok(questions),
        records,
    })
}

/// A name in uncompressed wire form.
fn wire_name(n: &Name) -> Vec<u8> {
    let mut out = Vec::new();
    for l in n.iter() {
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
    out
}

fn check_query(b: &[u8]) -> Result<&'static str, String> {
    let ours = parse_query(b);
    let h = hickory(b);
    let Some(h) = h else {
        return match ours {
            Err(Reject::Drop(_)) if b.len() < HEADER_LEN => Ok("short"),
            // hickory refuses a header with an opcode it does not know; we answer NOTIMP.
            Err(Reject::Respond {
                rcode: rcode::NOTIMP,
                ..
            }) => Ok("unknown opcode"),
            Err(Reject::Drop(_)) if b[2] & 0x80 != 0 => Ok("response, unknown opcode"),
            other => Err(format!("hickory reads no header, we say {other:?}")),
        };
    };
    let m = h.header.metadata;
    let c = h.header.counts;
    let opts = h.records.as_ref().ok().map(|rs| {
        rs.iter()
            .enumerate()
            .filter(|(_, r)| r.record_type() == RecordType::OPT)
            .map(|(i, r)| (i, r.clone()))
            .collect::<Vec<_>>()
    });
    let first_question = h.questions.as_ref().ok().and_then(|qs| qs.first().cloned());
    match ours {
        Ok(q) => {
            if m.message_type != MessageType::Query || m.op_code != OpCode::Query {
                return Err(format!("accepted a {:?} {:?}", m.message_type, m.op_code));
            }
            if (c.queries, c.answers, c.authorities) != (1, 0, 0) {
                return Err(format!("accepted counts {c:?}"));
            }
            let Some((hq, literal)) = first_question else {
                return Err(format!(
                    "accepted a question hickory cannot read: {:?}",
                    h.questions.err()
                ));
            };
            if !literal {
                return Err("accepted a compressed question".into());
            }
            let ours_name = &b[HEADER_LEN..q.qname_end];
            if !wire_name(hq.name()).eq_ignore_ascii_case(ours_name) {
                return Err(format!(
                    "question name {ours_name:?} is hickory's {}",
                    hq.name()
                ));
            }
            if u16::from(hq.query_type()) != q.qtype || u16::from(hq.query_class()) != q.qclass {
                return Err(format!(
                    "type/class {}/{} vs {}/{}",
                    q.qtype,
                    q.qclass,
                    hq.query_type(),
                    hq.query_class()
                ));
            }
            if hq.name().iter().all(|l| {
                l.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(c))
            }) {
                // Plain labels, joined as they are (hickory's presentation escapes a leading
                // '-', ours does not: the name is a log and metric value, not a zone file).
                let want = hq
                    .name()
                    .iter()
                    .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join(".");
                if q.qname(b) != want {
                    return Err(format!("qname {} vs {want}", q.qname(b)));
                }
            }
            let flags = (
                q.id,
                q.recursion_desired,
                q.checking_disabled,
                q.authentic_data,
            );
            if flags
                != (
                    m.id,
                    m.recursion_desired,
                    m.checking_disabled,
                    m.authentic_data,
                )
            {
                return Err(format!("header {flags:?} vs hickory's {m:?}"));
            }
            if matches!(q.qtype, TYPE_AXFR | TYPE_IXFR) {
                return Err("accepted a zone transfer".into());
            }
            check_built(b, &q, hq.name())?;
            let Some(opts) = opts else {
                // Our parser walks the additional records' structure, never their data.
                return Ok("accepted; hickory cannot decode an additional record");
            };
            match (opts.as_slice(), q.edns) {
                ([], None) => Ok("accepted without EDNS"),
                ([(_, opt)], Some(e)) => {
                    let ttl = opt.ttl;
                    let theirs = (
                        u16::from(opt.dns_class),
                        ttl & 0x8000 != 0,
                        (ttl >> 16) as u8,
                    );
                    if !opt.name.is_root()
                        || theirs != (e.udp_payload.max(512), e.dnssec_ok, e.version)
                        || e.version != 0
                    {
                        return Err(format!("EDNS {e:?} vs hickory's {opt:?}"));
                    }
                    Ok("accepted with EDNS")
                }
                (opts, e) => Err(format!("EDNS {e:?} vs hickory's {opts:?}")),
            }
        }
        Err(Reject::Drop(why)) => {
            if m.message_type == MessageType::Response {
                Ok("dropped a response")
            } else {
                Err(format!("dropped ({why}) a query hickory reads"))
            }
        }
        Err(Reject::Respond {
            rcode: rc,
            why,
            question,
        }) => {
            let mut out = Vec::new();
            super::reject_response(b, question, rc, &mut out);
            let r = Message::from_vec(&out).map_err(|e| format!("our {why} answer: {e}"))?;
            let echoed = usize::from(question.is_some());
            if (
                r.metadata.id,
                u16::from(r.metadata.response_code),
                r.queries.len(),
            ) != (m.id, rc, echoed)
            {
                return Err(format!("our {why} answer reads as {r:?}"));
            }
            if let Some(end) = question {
                let Some((hq, true)) = &first_question else {
                    return Err(format!(
                        "echoes a question hickory does not read as one: {why}"
                    ));
                };
                if c.queries != 1 || end != HEADER_LEN + wire_name(hq.name()).len() + 4 {
                    return Err(format!("echoes the wrong question bytes: {why}"));
                }
            }
            let justified = match rc {
                rcode::NOTIMP => {
                    m.op_code != OpCode::Query
                        || first_question.as_ref().is_some_and(|(q, _)| {
                            matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR)
                        })
                }
                rcode::BADVERS => match &opts {
                    Some(o) => o.iter().any(|(_, r)| (r.ttl >> 16) as u8 != 0),
                    None => true,
                },
                rcode::FORMERR => {
                    (c.queries, c.answers, c.authorities) != (1, 0, 0)
                        || !matches!(first_question, Some((_, true)))
                        || match &opts {
                            Some(o) => o.len() > 1 || o.iter().any(|(_, r)| !r.name.is_root()),
                            // Hickory cannot read the records either.
                            None => true,
                        }
                }
                _ => false,
            };
            if justified {
                Ok("rejected, and hickory sees why")
            } else {
                Err(format!(
                    "rcode {rc} ({why}) for a query hickory reads as fine: {m:?} {c:?} {first_question:?} {opts:?}"
                ))
            }
        }
    }
}

/// The messages built by hand from an accepted query's bytes (the query to an upstream, an
/// error answer) read in hickory as what they promise.
fn check_built(b: &[u8], q: &super::Query, qname: &Name) -> Result<(), String> {
    let same_question = |m: &Message| {
        m.queries.len() == 1
            && m.queries[0].name() == qname
            && wire_name(m.queries[0].name()) == b[HEADER_LEN..q.qname_end]
            && u16::from(m.queries[0].query_type()) == q.qtype
            && u16::from(m.queries[0].query_class()) == q.qclass
    };
    let mut up = Vec::new();
    super::upstream_query(b, q, &mut up);
    let m = Message::from_vec(&up).map_err(|e| format!("our upstream query: {e}"))?;
    let edns = m.edns.as_ref().map(|e| {
        let no_options = e.options().as_ref().is_empty();
        (
            e.max_payload(),
            e.flags().dnssec_ok,
            e.version(),
            no_options,
        )
    });
    let want = q
        .edns
        .map(|e| (super::OUR_UDP_PAYLOAD, e.dnssec_ok, 0, true));
    let flags = (m.metadata.recursion_desired, m.metadata.authentic_data);
    if !same_question(&m)
        || m.metadata.message_type != MessageType::Query
        || flags != (true, true)
        || m.metadata.checking_disabled != q.checking_disabled
        || edns != want
    {
        return Err(format!("our upstream query reads as {m:?}"));
    }
    let mut out = Vec::new();
    super::empty_response(b, Some(q), rcode::SERVFAIL, true, &mut out);
    let m = Message::from_vec(&out).map_err(|e| format!("our SERVFAIL: {e}"))?;
    let meta = &m.metadata;
    if !same_question(&m)
        || (meta.id, meta.message_type, meta.truncation) != (q.id, MessageType::Response, true)
        || u16::from(meta.response_code) != rcode::SERVFAIL
        || m.edns.is_some() != q.edns.is_some()
    {
        return Err(format!("our SERVFAIL reads as {m:?}"));
    }
    Ok(())
}

/// Runs `check` on `CASES` messages from `generate` (`mutated` percent of them mutated), from
/// `seed`; panics with the case and its bytes on the first disagreement, and unless every verdict
/// in `must_reach` came up often (or the comparison proves little).
fn differential(
    seed: u64,
    generate: fn(&mut Rng) -> Vec<u8>,
    mutated: usize,
    check: fn(&[u8]) -> Result<&'static str, String>,
    must_reach: &[&str],
) {
    let mut rng = Rng(seed);
    let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
    for case in 0..CASES {
        let mut b = generate(&mut rng);
        if rng.percent(mutated) {
            mutate(&mut rng, &mut b);
        }
        match check(&b) {
            Ok(what) => *outcomes.entry(what).or_default() += 1,
            Err(e) => panic!("case {case}: {e}\nbytes: {b:02x?}"),
        }
    }
    for what in must_reach {
        let n = outcomes.get(what).copied().unwrap_or(0);
        assert!(n > 100, "{what}: {outcomes:?}");
    }
}

#[test]
fn the_fast_query_parser_agrees_with_hickory() {
    differential(
        0x5EED_0021,
        generate_query,
        33,
        check_query,
        &[
            "accepted without EDNS",
            "accepted with EDNS",
            "rejected, and hickory sees why",
            "dropped a response",
        ],
    );
}

/// An upstream's answer, encoded by hickory: A/CNAME answers with TTLs (some with the top bit
/// set), maybe an SOA in authority, maybe EDNS, any rcode, maybe TC.
fn generate_response(rng: &mut Rng) -> Vec<u8> {
    let name = |s: &str| Name::from_ascii(s).expect("valid");
    let mut m = Message::query();
    m.metadata.id = rng.next() as u16;
    m.metadata.message_type = MessageType::Response;
    m.metadata.truncation = rng.percent(10);
    m.metadata.response_code = hickory_proto::op::ResponseCode::from_low(rng.pick(&[0u8, 2, 3, 5]));
    m.add_query(HQuery::query(name("www.example.test."), RecordType::A));
    let ttl = |rng: &mut Rng| {
        let any = rng.next() as u32;
        rng.pick(&[0u32, 1, 30, 300, 86_400, 0x8000_0010, any])
    };
    for i in 0..rng.below(4) {
        let owner = rng.pick(&["www.example.test.", "other.test."]);
        let data = if rng.percent(20) {
            RData::CNAME(CNAME(name("edge.test.")))
        } else {
            RData::A(A::new(192, 0, 2, i as u8))
        };
        m.add_answer(Record::from_rdata(name(owner), ttl(rng), data));
    }
    if rng.percent(30) {
        let soa = SOA::new(
            name("ns.test."),
            name("admin.test."),
            1,
            60,
            60,
            60,
            ttl(rng),
        );
        m.add_authority(Record::from_rdata(
            name("example.test."),
            ttl(rng),
            RData::SOA(soa),
        ));
    }
    if rng.percent(50) {
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(1232);
        e.set_rcode_high(rng.pick(&[0u8, 0, 1]));
        m.edns = Some(e);
    }
    m.to_vec().expect("encodes")
}

fn check_response(b: &[u8]) -> Result<&'static str, String> {
    let ours = scan_response(b);
    let theirs = Message::from_vec(b);
    let (info, m) = match (ours, theirs) {
        (Ok(info), Ok(m)) => (info, m),
        (Err(_), Err(_)) => return Ok("both refuse"),
        (Err(_), Ok(m)) if m.metadata.message_type == MessageType::Query => {
            return Ok("a query is not a response");
        }
        // Our scanner walks the record structure only: data it never reads may be bad.
        (Ok(_), Err(_)) => return Ok("hickory cannot decode the data"),
        (Err(why), Ok(m)) => return Err(format!("we refuse ({why}) what hickory reads: {m:?}")),
    };
    let records = m.answers.len() + m.authorities.len() + m.additionals.len();
    let theirs = (
        u16::from(m.metadata.response_code),
        m.metadata.truncation,
        m.answers.len(),
        records,
    );
    let ours = (
        info.rcode,
        info.truncated,
        usize::from(info.answers),
        info.ttl_offsets.len(),
    );
    if ours != theirs || info.opt.is_some() != m.edns.is_some() {
        return Err(format!(
            "ours {ours:?} opt {:?}, hickory's {theirs:?} {:?}",
            info.opt, m.edns
        ));
    }
    let min = m.answers.iter().map(|r| super::effective_ttl(r.ttl)).min();
    if info.min_answer_ttl != min {
        return Err(format!("min TTL {:?} vs {min:?}", info.min_answer_ttl));
    }
    let negative = m.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(super::effective_ttl(r.ttl).min(super::effective_ttl(soa.minimum))),
        _ => None,
    });
    if info.negative_ttl != negative {
        return Err(format!(
            "negative TTL {:?} vs {negative:?}",
            info.negative_ttl
        ));
    }
    Ok("both read")
}

#[test]
fn the_response_scanner_agrees_with_hickory() {
    differential(
        0x5EED_2121,
        generate_response,
        50,
        check_response,
        &["both read", "both refuse"],
    );
}
