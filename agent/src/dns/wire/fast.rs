//! The hand-written hot path of the wire format, as much as a caching forwarder needs and no
//! more (constants, header accessors and the name walker are `wire`'s): parse a client query
//! (header, one question, EDNS OPT), scan an upstream response (record TTL offsets, minimum
//! TTL, SOA negative TTL), patch a cached response for a client (ID, RD, question case, TTLs
//! decremented in place) and build error/truncated responses. No allocation on the hit path.
//!
//! Every read is bounds-checked; names are never *followed* through compression pointers (a
//! query's question may not contain one, and skipping a name stops at the first pointer), so
//! pointer loops cannot occur. Anything malformed is an error value, never a panic.

use super::{
    FLAG2_AA, FLAG2_OPCODE, FLAG2_QR, FLAG2_RD, FLAG2_TC, FLAG3_AD, FLAG3_CD, FLAG3_RA,
    FLAG3_RCODE, HEADER_LEN, MAX_UDP_ANSWER, MIN_UDP_PAYLOAD, OUR_UDP_PAYLOAD, Pointers, TYPE_A,
    TYPE_AAAA, TYPE_AXFR, TYPE_IXFR, TYPE_OPT, TYPE_SOA, name_end, rcode, u16_at, u32_at,
};

/// EDNS(0) as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub udp_payload: u16,
    pub dnssec_ok: bool,
    pub version: u8,
}

/// A parsed client query. Offsets index the buffer it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub recursion_desired: bool,
    /// End of the question name (exclusive); the name starts at `HEADER_LEN`.
    pub qname_end: usize,
    /// End of the question (name + type + class).
    pub question_end: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
    /// CD: the client validates itself and wants answers even when upstream validation fails.
    pub checking_disabled: bool,
    /// AD in the query: the client understands the AD bit (RFC 6840 5.7).
    pub authentic_data: bool,
}

impl Query {
    /// The largest response this client takes over UDP: its advertised size (512 without
    /// EDNS), never more than `MAX_UDP_ANSWER`.
    pub fn udp_limit(&self) -> usize {
        self.edns.map_or(MIN_UDP_PAYLOAD, |e| {
            usize::from(e.udp_payload).clamp(MIN_UDP_PAYLOAD, MAX_UDP_ANSWER)
        })
    }

    /// The cache key: EDNS presence, DO and CD bits (the upstream's answer differs with each:
    /// with CD a validating upstream answers what fails validation instead of SERVFAIL), type,
    /// class, then the question name lower-cased (wire format). Written into `out`.
    pub fn key_into(&self, buf: &[u8], out: &mut Vec<u8>) {
        out.clear();
        let flags = u8::from(self.edns.is_some())
            | (u8::from(self.edns.is_some_and(|e| e.dnssec_ok)) << 1)
            | (u8::from(self.checking_disabled) << 2);
        out.push(flags);
        out.extend_from_slice(&self.qtype.to_be_bytes());
        out.extend_from_slice(&self.qclass.to_be_bytes());
        out.extend(
            buf[HEADER_LEN..self.qname_end]
                .iter()
                .map(u8::to_ascii_lowercase),
        );
    }

    /// The question name in presentation form, lower case, no trailing dot ("" for the root).
    pub fn qname(&self, buf: &[u8]) -> String {
        let mut out = String::with_capacity(self.qname_end - HEADER_LEN);
        let mut i = HEADER_LEN;
        while i < self.qname_end {
            let len = usize::from(buf[i]);
            if len == 0 {
                break;
            }
            if !out.is_empty() {
                out.push('.');
            }
            for &b in &buf[i + 1..i + 1 + len] {
                let b = b.to_ascii_lowercase();
                if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                    out.push(char::from(b));
                } else {
                    out.push_str(&format!("\\{b:03}"));
                }
            }
            i += 1 + len;
        }
        out
    }
}

/// Why a query is not served normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not even a header, or a response: nothing sensible to answer.
    Drop(&'static str),
    /// Answer with this rcode (FORMERR, NOTIMP, BADVERS); `question` (its end) when the
    /// question was well formed, so the answer can echo it.
    Respond {
        rcode: u16,
        why: &'static str,
        question: Option<usize>,
    },
}

/// A resource record's fixed part.
struct RecordHeader {
    rtype: u16,
    class: u16,
    ttl_offset: usize,
    ttl: u32,
    rdata: usize,
    end: usize,
}

fn record(b: &[u8], i: usize) -> Result<RecordHeader, &'static str> {
    let owner_end = name_end(b, i, Pointers::End)?;
    let rtype = u16_at(b, owner_end).ok_or("record header runs past the end")?;
    let class = u16_at(b, owner_end + 2).ok_or("record header runs past the end")?;
    let ttl = u32_at(b, owner_end + 4).ok_or("record header runs past the end")?;
    let rdlen = usize::from(u16_at(b, owner_end + 8).ok_or("record header runs past the end")?);
    let rdata = owner_end + 10;
    let end = rdata + rdlen;
    if end > b.len() {
        return Err("record data runs past the end");
    }
    Ok(RecordHeader {
        rtype,
        class,
        ttl_offset: owner_end + 4,
        ttl,
        rdata,
        end,
    })
}

/// Parses a client query. Only standard queries with exactly one question are served.
pub fn parse_query(b: &[u8]) -> Result<Query, Reject> {
    #[cfg(test)]
    crate::dns::counting::PARSES.with(|n| n.set(n.get() + 1));
    if b.len() < HEADER_LEN {
        return Err(Reject::Drop("shorter than a DNS header"));
    }
    if super::is_response(b) {
        return Err(Reject::Drop("a response, not a query"));
    }
    let count = |i| u16_at(b, i).unwrap_or_default();
    // The question, when there is exactly one and it is well formed: error answers echo it.
    let question = (count(4) == 1)
        .then(|| name_end(b, HEADER_LEN, Pointers::Refuse).ok())
        .flatten()
        .filter(|end| end + 4 <= b.len())
        .map(|end| end + 4);
    let respond = |rcode: u16, why: &'static str| Reject::Respond {
        rcode,
        why,
        question,
    };
    let formerr = |why: &'static str| respond(rcode::FORMERR, why);
    if super::opcode(b) != 0 {
        return Err(respond(rcode::NOTIMP, "opcode other than QUERY"));
    }
    if count(4) != 1 {
        return Err(formerr("QDCOUNT is not 1"));
    }
    if count(6) != 0 || count(8) != 0 {
        return Err(formerr("a query with answer or authority records"));
    }
    let qname_end = name_end(b, HEADER_LEN, Pointers::Refuse).map_err(formerr)?;
    let qtype = u16_at(b, qname_end).ok_or(formerr("question runs past the end"))?;
    let qclass = u16_at(b, qname_end + 2).ok_or(formerr("question runs past the end"))?;
    let question_end = qname_end + 4;
    let mut edns = None;
    let mut i = question_end;
    for _ in 0..count(10) {
        let rr = record(b, i).map_err(formerr)?;
        if rr.rtype == TYPE_OPT {
            if edns.is_some() {
                return Err(formerr("more than one OPT record"));
            }
            if rr.ttl_offset != i + 1 + 4 {
                return Err(formerr("OPT record with a non-root name"));
            }
            edns = Some(Edns {
                udp_payload: rr.class,
                dnssec_ok: rr.ttl & 0x8000 != 0,
                version: (rr.ttl >> 16) as u8,
            });
        }
        i = rr.end;
    }
    let query = Query {
        id: u16_at(b, 0).unwrap_or_default(),
        recursion_desired: b[2] & FLAG2_RD != 0,
        qname_end,
        question_end,
        qtype,
        qclass,
        edns,
        checking_disabled: b[3] & FLAG3_CD != 0,
        authentic_data: b[3] & FLAG3_AD != 0,
    };
    if edns.is_some_and(|e| e.version != 0) {
        return Err(respond(rcode::BADVERS, "EDNS version other than 0"));
    }
    if qtype == TYPE_AXFR || qtype == TYPE_IXFR {
        return Err(respond(rcode::NOTIMP, "zone transfers are not forwarded"));
    }
    Ok(query)
}

/// The answer to a rejected query: `rcode`, the question echoed when it was well formed
/// (`question` = its end), an OPT when the rcode needs one (BADVERS).
pub fn reject_response(query: &[u8], question: Option<usize>, rcode: u16, out: &mut Vec<u8>) {
    empty_response(query, None, rcode, false, out);
    if let Some(end) = question.filter(|&e| e <= query.len() && out.len() >= HEADER_LEN) {
        out[4..6].copy_from_slice(&1u16.to_be_bytes());
        out.splice(
            HEADER_LEN..HEADER_LEN,
            query[HEADER_LEN..end].iter().copied(),
        );
    }
}

/// What a cache needs to know about an upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseInfo {
    /// Including the extended bits from OPT.
    pub rcode: u16,
    pub truncated: bool,
    pub answers: u16,
    /// Offsets of the TTL field of every record but OPT, to decrement in place.
    pub ttl_offsets: Vec<u16>,
    /// Smallest TTL among the answer records (a TTL with the top bit set counts as 0).
    pub min_answer_ttl: Option<u32>,
    /// RFC 2308: min(SOA record TTL, SOA MINIMUM) of an SOA in the authority section.
    pub negative_ttl: Option<u32>,
    /// Where the OPT record is, if any: it belongs to the hop, not to the answer.
    pub opt: Option<std::ops::Range<usize>>,
    /// End of the last record: anything after it is trailing junk.
    pub end: usize,
}

/// RFC 2181 8: a TTL with the most significant bit set is treated as zero.
pub fn effective_ttl(ttl: u32) -> u32 {
    if ttl & 0x8000_0000 != 0 { 0 } else { ttl }
}

/// Scans a response: validates its structure and finds what the cache needs.
pub fn scan_response(b: &[u8]) -> Result<ResponseInfo, &'static str> {
    if b.len() < HEADER_LEN {
        return Err("shorter than a DNS header");
    }
    if !super::is_response(b) {
        return Err("not a response (QR unset)");
    }
    let count = |i| u16_at(b, i).unwrap_or_default();
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    let mut i = HEADER_LEN;
    for _ in 0..qd {
        i = name_end(b, i, Pointers::End)? + 4;
        if i > b.len() {
            return Err("question runs past the end");
        }
    }
    let mut info = ResponseInfo {
        rcode: super::header_rcode(b),
        truncated: super::truncated(b),
        answers: an,
        ttl_offsets: Vec::with_capacity(usize::from(an) + usize::from(ns) + usize::from(ar)),
        min_answer_ttl: None,
        negative_ttl: None,
        opt: None,
        end: i,
    };
    let sections = [(an, 0u8), (ns, 1), (ar, 2)];
    for (n, section) in sections {
        for _ in 0..n {
            let rr = record(b, i)?;
            if rr.rtype == TYPE_OPT {
                if section != 2 || info.opt.is_some() {
                    return Err("OPT outside the additional section or twice");
                }
                info.rcode |= u16::from(b[rr.ttl_offset]) << 4;
                info.opt = Some(i..rr.end);
            } else {
                let off = u16::try_from(rr.ttl_offset).map_err(|_| "response beyond 64 KiB")?;
                info.ttl_offsets.push(off);
                let ttl = effective_ttl(rr.ttl);
                if section == 0 {
                    info.min_answer_ttl =
                        Some(info.min_answer_ttl.map_or(ttl, |m: u32| m.min(ttl)));
                } else if section == 1 && rr.rtype == TYPE_SOA {
                    // SOA RDATA ends with five 32-bit fields; MINIMUM is the last.
                    let minimum = rr
                        .end
                        .checked_sub(4)
                        .filter(|m| *m >= rr.rdata + 20)
                        .and_then(|m| u32_at(b, m))
                        .ok_or("SOA record too short")?;
                    info.negative_ttl = Some(ttl.min(effective_ttl(minimum)));
                }
            }
            i = rr.end;
        }
    }
    info.end = i;
    Ok(info)
}

/// True when a stored response (`for_cache`) holds nothing but answers of the question's type
/// (A/AAAA, of the right size) owned by the question name itself (the owner is a compression
/// pointer to the question, as every upstream writes it) and nothing in authority or
/// additional: nothing to scrub, no chain to follow. Checked without decoding, so the common
/// miss skips the full parse.
pub fn owned_by_question(b: &[u8]) -> bool {
    let count = |i| u16_at(b, i).unwrap_or(u16::MAX);
    if count(4) != 1 || count(8) != 0 || count(10) != 0 {
        return false;
    }
    let Ok(question_end) = name_end(b, HEADER_LEN, Pointers::End).map(|i| i + 4) else {
        return false;
    };
    let qtype = u16_at(b, question_end - 4).unwrap_or(0);
    let mut i = question_end;
    for _ in 0..count(6) {
        if b.get(i..i + 2) != Some(&[0xC0, HEADER_LEN as u8][..]) {
            return false;
        }
        let Ok(rr) = record(b, i) else { return false };
        let size = rr.end - rr.rdata;
        if rr.rtype != qtype || !matches!((rr.rtype, size), (TYPE_A, 4) | (TYPE_AAAA, 16)) {
            return false;
        }
        i = rr.end;
    }
    i == b.len()
}

/// The response as a cache stores it: without the upstream's OPT record (EDNS is per hop: its
/// options, cookies included, are the upstream's conversation with us, and each client gets an
/// OPT built for it), without trailing bytes, and with AA cleared (an answer from a cache is
/// never authoritative). The result must be scanned again for its offsets. The miss path uses
/// [`into_cache`], which does the same in place; this copy stays as its reference in the tests.
#[cfg(test)]
pub fn for_cache(b: &[u8], info: &ResponseInfo) -> Vec<u8> {
    let mut out = Vec::with_capacity(info.end);
    match &info.opt {
        Some(opt) => {
            out.extend_from_slice(&b[..opt.start]);
            out.extend_from_slice(&b[opt.end..info.end]);
            let ar = u16_at(&out, 10).unwrap_or(1).saturating_sub(1);
            out[10..12].copy_from_slice(&ar.to_be_bytes());
        }
        None => out.extend_from_slice(&b[..info.end]),
    }
    out[2] &= !FLAG2_AA;
    out
}

/// `for_cache` on the received answer itself, without a copy: the one allocation the
/// upstream reader made for it becomes the cache entry's (issue #22, #22-k).
pub fn into_cache(mut b: Vec<u8>, info: &ResponseInfo) -> Vec<u8> {
    match &info.opt {
        Some(opt) => {
            b.copy_within(opt.end..info.end, opt.start);
            b.truncate(info.end - (opt.end - opt.start));
            let ar = u16_at(&b, 10).unwrap_or(1).saturating_sub(1);
            b[10..12].copy_from_slice(&ar.to_be_bytes());
        }
        None => b.truncate(info.end),
    }
    b[2] &= !FLAG2_AA;
    b
}

/// Our query to an upstream for a client's `q`: its own header (RD, AD to learn whether the
/// upstream validated, the client's CD, which is in the cache key), the client's question, and
/// our own OPT when the client used EDNS (our payload size, the client's DO, no options): a
/// client's EDNS options are never forwarded. The ID is set by the forwarder.
pub fn upstream_query(query: &[u8], q: &Query, out: &mut Vec<u8>) {
    out.clear();
    let cd = if q.checking_disabled { FLAG3_CD } else { 0 };
    out.extend_from_slice(&[0, 0, FLAG2_RD, FLAG3_AD | cd, 0, 1, 0, 0, 0, 0, 0]);
    out.push(u8::from(q.edns.is_some()));
    out.extend_from_slice(&query[HEADER_LEN..q.question_end]);
    if let Some(e) = q.edns {
        push_opt(out, e.dnssec_ok, 0);
    }
}

/// Appends an OPT record of ours: our payload size, extended rcode bits, version 0, DO as given.
fn push_opt(out: &mut Vec<u8>, dnssec_ok: bool, rcode: u16) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&OUR_UDP_PAYLOAD.to_be_bytes());
    out.push((rcode >> 4) as u8);
    out.push(0);
    out.extend_from_slice(&(if dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Gives a response made by `for_cache` the OPT record this client gets (when it sent one).
pub fn add_client_opt(out: &mut Vec<u8>, q: &Query, rcode: u16) {
    let Some(e) = q.edns else { return };
    if out.len() < HEADER_LEN {
        return;
    }
    push_opt(out, e.dnssec_ok, rcode);
    let ar = u16_at(out, 10).unwrap_or_default().saturating_add(1);
    out[10..12].copy_from_slice(&ar.to_be_bytes());
}

/// Sets every TTL at `offsets` to `f(old)`.
pub fn rewrite_ttls(b: &mut [u8], offsets: &[u16], f: impl Fn(u32) -> u32) {
    for &off in offsets {
        let i = usize::from(off);
        if let Some(field) = b.get_mut(i..i + 4) {
            let old = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
            field.copy_from_slice(&f(old).to_be_bytes());
        }
    }
}

/// Makes a stored response the answer to `query`: its ID, its RD and CD bits (RFC 4035
/// 3.2.2), its question's case, AA cleared, and AD kept only when this client asked with AD or
/// DO (RFC 6840 5.8) and the upstream had set it. The stored response's question has the same
/// name (case-folded), so the same length.
pub fn adopt(response: &mut [u8], query: &[u8], q: &Query) {
    response[0..2].copy_from_slice(&q.id.to_be_bytes());
    response[2] =
        (response[2] & !(FLAG2_RD | FLAG2_AA)) | if q.recursion_desired { FLAG2_RD } else { 0 };
    let wants_ad = q.authentic_data || q.edns.is_some_and(|e| e.dnssec_ok);
    let ad = if wants_ad { response[3] & FLAG3_AD } else { 0 };
    let cd = if q.checking_disabled { FLAG3_CD } else { 0 };
    response[3] = (response[3] & !(FLAG3_AD | FLAG3_CD)) | ad | cd;
    if response.len() >= q.qname_end {
        response[HEADER_LEN..q.qname_end].copy_from_slice(&query[HEADER_LEN..q.qname_end]);
    }
}

/// `msg` with its 2-byte length prefix for DNS over TCP (RFC 1035 4.2.2); `None` when it is
/// longer than 65,535 bytes and cannot be framed.
pub fn tcp_frame(msg: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(msg.len()).ok()?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    Some(framed)
}

/// A response with no records and `rcode` (and TC when `truncated`), echoing the question when
/// the query had a parseable one, with an OPT record when the client sent one.
pub fn empty_response(
    query: &[u8],
    q: Option<&Query>,
    rcode: u16,
    truncated: bool,
    out: &mut Vec<u8>,
) {
    out.clear();
    let id = u16_at(query, 0).unwrap_or_default();
    let rd = query.get(2).map_or(0, |f| f & FLAG2_RD);
    out.extend_from_slice(&id.to_be_bytes());
    let opcode_bits = query.get(2).map_or(0, |f| f & FLAG2_OPCODE);
    let tc = if truncated { FLAG2_TC } else { 0 };
    out.push(FLAG2_QR | opcode_bits | tc | rd);
    // RA, CD copied from the query (RFC 4035 3.2.2), rcode.
    let cd = query.get(3).map_or(0, |f| f & FLAG3_CD);
    out.push(FLAG3_RA | cd | (rcode as u8 & FLAG3_RCODE));
    let qd = u16::from(q.is_some());
    let ar = u16::from(q.is_some_and(|q| q.edns.is_some()) || rcode > 0xF);
    for c in [qd, 0, 0, ar] {
        out.extend_from_slice(&c.to_be_bytes());
    }
    if let Some(q) = q {
        out.extend_from_slice(&query[HEADER_LEN..q.question_end]);
    }
    if ar == 1 {
        // OPT: root name, type, our payload size, extended rcode + version 0 + DO echoed.
        let do_bit = q.and_then(|q| q.edns).is_some_and(|e| e.dnssec_ok);
        push_opt(out, do_bit, rcode);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name` (dotted) of `qtype`, optionally with an OPT record.
    pub fn query(id: u16, name: &str, qtype: u16, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            b.push(label.len() as u8);
            b.extend_from_slice(label.as_bytes());
        }
        b.push(0);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        if let Some((payload, do_bit)) = edns {
            b.push(0);
            b.extend_from_slice(&TYPE_OPT.to_be_bytes());
            b.extend_from_slice(&payload.to_be_bytes());
            b.extend_from_slice(&[0, 0, if do_bit { 0x80 } else { 0 }, 0, 0, 0]);
        }
        b
    }

    /// A response to `q`: `answers` A records with the given TTLs (compressed owner), then an
    /// SOA in authority when `soa` = (ttl, minimum).
    pub fn response(q: &[u8], rcode: u16, answer_ttls: &[u32], soa: Option<(u32, u32)>) -> Vec<u8> {
        let parsed = parse_query(q).unwrap();
        // This parse is the test upstream's, not the server's: uncounted.
        crate::dns::counting::PARSES.with(|n| n.set(n.get() - 1));
        let mut b = q[..parsed.question_end].to_vec();
        b[2] |= 0x80;
        b[3] = 0x80 | rcode as u8;
        b[6..8].copy_from_slice(&(answer_ttls.len() as u16).to_be_bytes());
        b[8..10].copy_from_slice(&u16::from(soa.is_some()).to_be_bytes());
        b[10..12].copy_from_slice(&0u16.to_be_bytes());
        for (i, ttl) in answer_ttls.iter().enumerate() {
            b.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
            b.extend_from_slice(&ttl.to_be_bytes());
            b.extend_from_slice(&[0, 4, 10, 0, 0, i as u8]);
        }
        if let Some((ttl, minimum)) = soa {
            b.extend_from_slice(&[0xC0, 12, 0, 6, 0, 1]);
            b.extend_from_slice(&ttl.to_be_bytes());
            b.extend_from_slice(&(2u16 + 2 + 20).to_be_bytes());
            b.extend_from_slice(&[0xC0, 12, 0xC0, 12]); // MNAME, RNAME
            for v in [1u32, 7200, 3600, 86400, minimum] {
                b.extend_from_slice(&v.to_be_bytes());
            }
        }
        b
    }

    #[test]
    fn tcp_frames_carry_the_length_and_oversized_messages_are_refused() {
        assert_eq!(tcp_frame(&[7, 8, 9]), Some(vec![0, 3, 7, 8, 9]));
        assert_eq!(
            tcp_frame(&vec![0; 65_535]).map(|f| f[..2].to_vec()),
            Some(vec![0xff, 0xff])
        );
        assert_eq!(tcp_frame(&vec![0; 65_536]), None);
    }

    #[test]
    fn queries_parse_with_and_without_edns() {
        let q = query(0xBEEF, "WwW.Example.COM", 1, None);
        let p = parse_query(&q).unwrap();
        assert_eq!((p.id, p.qtype, p.qclass, p.edns), (0xBEEF, 1, 1, None));
        assert!(p.recursion_desired);
        assert_eq!(p.qname(&q), "www.example.com");
        assert_eq!(p.udp_limit(), 512);
        let q = query(1, "a.b", 28, Some((4096, true)));
        let p = parse_query(&q).unwrap();
        assert_eq!(
            p.edns,
            Some(Edns {
                udp_payload: 4096,
                dnssec_ok: true,
                version: 0
            })
        );
        assert_eq!(p.udp_limit(), 4096);
    }

    #[test]
    fn cache_keys_fold_case_and_separate_edns_and_do() {
        let mut k1 = Vec::new();
        let mut k2 = Vec::new();
        let a = query(1, "Example.COM", 1, None);
        let b = query(2, "example.com", 1, None);
        parse_query(&a).unwrap().key_into(&a, &mut k1);
        parse_query(&b).unwrap().key_into(&b, &mut k2);
        assert_eq!(k1, k2);
        let c = query(3, "example.com", 1, Some((1232, true)));
        parse_query(&c).unwrap().key_into(&c, &mut k2);
        assert_ne!(k1, k2);
        let d = query(3, "example.com", 28, None);
        parse_query(&d).unwrap().key_into(&d, &mut k2);
        assert_ne!(k1, k2);
    }

    #[test]
    fn bad_queries_are_rejected_with_the_right_answer() {
        assert!(matches!(parse_query(&[0; 5]), Err(Reject::Drop(_))));
        let mut resp = query(1, "a", 1, None);
        resp[2] |= 0x80;
        assert!(matches!(parse_query(&resp), Err(Reject::Drop(_))));
        let mut notify = query(1, "a", 1, None);
        notify[2] |= 4 << 3;
        assert_eq!(rcode_of(parse_query(&notify)), Some(rcode::NOTIMP));
        let mut two = query(1, "a", 1, None);
        two[5] = 2;
        assert_eq!(rcode_of(parse_query(&two)), Some(rcode::FORMERR));
        let mut zero = query(1, "a", 1, None);
        zero[5] = 0;
        assert_eq!(rcode_of(parse_query(&zero)), Some(rcode::FORMERR));
        // A compression pointer (a loop onto itself) in the question.
        let mut looped = query(1, "a", 1, None)[..12].to_vec();
        looped.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(rcode_of(parse_query(&looped)), Some(rcode::FORMERR));
        // Truncated inside the question.
        let q = query(1, "example.com", 1, None);
        for cut in 12..q.len() {
            assert_eq!(
                rcode_of(parse_query(&q[..cut])),
                Some(rcode::FORMERR),
                "cut {cut}"
            );
        }
        // A 64-byte label and a name over 255 bytes.
        let long = query(1, &"x".repeat(64), 1, None);
        assert_eq!(rcode_of(parse_query(&long)), Some(rcode::FORMERR));
        let name = vec!["y".repeat(63); 5].join(".");
        assert_eq!(
            rcode_of(parse_query(&query(1, &name, 1, None))),
            Some(rcode::FORMERR)
        );
        // EDNS version 1 and two OPT records.
        let mut v1 = query(1, "a", 1, Some((1232, false)));
        let opt_ttl = v1.len() - 6;
        v1[opt_ttl + 1] = 1;
        assert_eq!(rcode_of(parse_query(&v1)), Some(rcode::BADVERS));
        let mut two_opt = query(1, "a", 1, Some((1232, false)));
        let opt = two_opt[two_opt.len() - 11..].to_vec();
        two_opt.extend_from_slice(&opt);
        two_opt[11] = 2;
        assert_eq!(rcode_of(parse_query(&two_opt)), Some(rcode::FORMERR));
        assert_eq!(
            rcode_of(parse_query(&query(1, "a", TYPE_AXFR, None))),
            Some(rcode::NOTIMP)
        );
    }

    fn rcode_of(r: Result<Query, Reject>) -> Option<u16> {
        match r {
            Err(Reject::Respond { rcode, .. }) => Some(rcode),
            _ => None,
        }
    }

    #[test]
    fn responses_scan_ttls_and_soa_negative_ttl() {
        let q = query(7, "example.com", 1, None);
        let r = response(&q, 0, &[300, 60], None);
        let info = scan_response(&r).unwrap();
        assert_eq!(info.rcode, 0);
        assert_eq!(info.min_answer_ttl, Some(60));
        assert_eq!(info.ttl_offsets.len(), 2);
        let nx = response(&q, 3, &[], Some((900, 7)));
        let info = scan_response(&nx).unwrap();
        assert_eq!(
            (info.rcode, info.negative_ttl, info.min_answer_ttl),
            (3, Some(7), None)
        );
        for cut in 0..r.len() {
            assert!(scan_response(&r[..cut]).is_err(), "cut {cut}");
        }
        assert!(scan_response(&q).is_err(), "a query is not a response");
    }

    #[test]
    fn adopt_and_ttl_rewrite_make_a_cached_answer_the_clients() {
        let q = query(7, "example.com", 1, None);
        let mut r = response(&q, 0, &[300], None);
        let info = scan_response(&r).unwrap();
        rewrite_ttls(&mut r, &info.ttl_offsets, |t| t.min(30));
        let client = query(0x4242, "ExAmPlE.com", 1, None);
        let cq = parse_query(&client).unwrap();
        adopt(&mut r, &client, &cq);
        assert_eq!(&r[0..2], &[0x42, 0x42]);
        assert_eq!(&r[12..cq.qname_end], &client[12..cq.qname_end]);
        let off = usize::from(info.ttl_offsets[0]);
        assert_eq!(u32::from_be_bytes(r[off..off + 4].try_into().unwrap()), 30);
    }

    #[test]
    fn error_responses_echo_the_question_and_opt() {
        let q = query(9, "a.test", 1, Some((1232, true)));
        let p = parse_query(&q).unwrap();
        let mut out = Vec::new();
        empty_response(&q, Some(&p), rcode::SERVFAIL, false, &mut out);
        let info = scan_response(&out).unwrap();
        assert_eq!(info.rcode, rcode::SERVFAIL);
        assert_eq!(&out[12..p.question_end], &q[12..p.question_end]);
        assert_eq!(out.len(), p.question_end + 11);
        empty_response(&q, Some(&p), rcode::BADVERS, false, &mut out);
        assert_eq!(scan_response(&out).unwrap().rcode, rcode::BADVERS);
        empty_response(
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            None,
            rcode::FORMERR,
            true,
            &mut out,
        );
        let info = scan_response(&out).unwrap();
        assert!(info.truncated);
        assert_eq!(info.rcode, rcode::FORMERR);
    }
    #[test]
    fn error_answers_to_rejected_queries_echo_a_well_formed_question() {
        let mut v1 = query(0x5151, "a.test", 1, Some((1232, false)));
        let opt_ttl = v1.len() - 6;
        v1[opt_ttl + 1] = 1;
        let mut notify = query(2, "b.test", 1, None);
        notify[2] |= 4 << 3;
        let axfr = query(3, "c.test", TYPE_AXFR, None);
        for (q, rc) in [
            (v1, rcode::BADVERS),
            (notify, rcode::NOTIMP),
            (axfr, rcode::NOTIMP),
        ] {
            let Err(Reject::Respond {
                rcode, question, ..
            }) = parse_query(&q)
            else {
                panic!("rejected")
            };
            assert_eq!(rcode, rc);
            let mut out = Vec::new();
            reject_response(&q, question, rcode, &mut out);
            let info = scan_response(&out).unwrap();
            assert_eq!(info.rcode, rc);
            assert_eq!(&out[4..6], &[0, 1], "QDCOUNT 1");
            let end = question.unwrap();
            assert_eq!(
                &out[HEADER_LEN..end],
                &q[HEADER_LEN..end],
                "question echoed"
            );
            assert_eq!(&out[0..2], &q[0..2]);
        }
        // Two questions: nothing to echo.
        let mut two = query(1, "a", 1, None);
        two[5] = 2;
        let Err(Reject::Respond { question, .. }) = parse_query(&two) else {
            panic!("rejected")
        };
        assert_eq!(question, None);
    }

    #[test]
    fn udp_limit_is_the_clients_size_capped_at_4096() {
        let big = query(1, "a", 1, Some((65_535, false)));
        assert_eq!(parse_query(&big).unwrap().udp_limit(), MAX_UDP_ANSWER);
        let small = query(1, "a", 1, Some((100, false)));
        assert_eq!(parse_query(&small).unwrap().udp_limit(), MIN_UDP_PAYLOAD);
    }

    #[test]
    fn upstream_queries_are_ours_with_the_clients_question_do_and_cd() {
        let mut client = query(0x4444, "ExAmple.test", 1, Some((4096, true)));
        client[2] &= !0x01; // RD clear: we still ask for recursion
        client[3] |= 0x10; // CD
        let len = client.len();
        client[len - 2..].copy_from_slice(&6u16.to_be_bytes());
        client.extend_from_slice(&[0, 99, 0, 2, 7, 7]); // an option of the client's
        let q = parse_query(&client).unwrap();
        let mut ours = Vec::new();
        upstream_query(&client, &q, &mut ours);
        let p = parse_query(&ours).unwrap();
        assert!(p.recursion_desired && p.checking_disabled && p.authentic_data);
        assert_eq!(
            p.edns,
            Some(Edns {
                udp_payload: OUR_UDP_PAYLOAD,
                dnssec_ok: true,
                version: 0
            })
        );
        assert_eq!(ours.len(), q.question_end + 11, "no options");
        assert_eq!(
            &ours[HEADER_LEN..p.question_end],
            &client[HEADER_LEN..q.question_end]
        );
        let mut k1 = Vec::new();
        let mut k2 = Vec::new();
        q.key_into(&client, &mut k1);
        let plain = query(1, "example.test", 1, Some((4096, true)));
        parse_query(&plain).unwrap().key_into(&plain, &mut k2);
        assert_ne!(k1, k2, "CD is in the key");
    }

    #[test]
    fn stored_responses_lose_their_opt_aa_and_trailing_bytes() {
        let q = query(7, "example.com", 1, Some((1232, false)));
        let mut r = response(&q, 0, &[300], None);
        r[2] |= 0x04;
        r[11] = 1;
        r.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 1, 0, 0, 0, 0, 4, 0, 10, 0, 0]);
        r.extend_from_slice(&[1, 2, 3]);
        let info = scan_response(&r).unwrap();
        assert_eq!(info.rcode, 16, "extended rcode from OPT");
        let stored = for_cache(&r, &info);
        let again = scan_response(&stored).unwrap();
        assert_eq!((again.opt, again.end), (None, stored.len()));
        assert_eq!(&stored[10..12], &[0, 0]);
        assert_eq!(stored[2] & 0x04, 0, "AA cleared");
        assert_eq!(again.ttl_offsets.len(), 1);
        assert_eq!(
            into_cache(r.clone(), &info),
            stored,
            "in place: the same bytes"
        );
        // Without an OPT: only the trailing bytes and AA go.
        let mut plain = response(&q, 0, &[300], None);
        plain[2] |= 0x04;
        plain.extend_from_slice(&[9, 9]);
        let info = scan_response(&plain).unwrap();
        assert_eq!(into_cache(plain.clone(), &info), for_cache(&plain, &info));
    }

    #[test]
    fn top_bit_ttls_count_as_zero() {
        let q = query(7, "example.com", 1, None);
        let r = response(&q, 0, &[0x8000_0010, 60], None);
        assert_eq!(scan_response(&r).unwrap().min_answer_ttl, Some(0));
        assert_eq!(effective_ttl(0x8000_0010), 0);
        assert_eq!(effective_ttl(0x7fff_ffff), 0x7fff_ffff);
    }
}
