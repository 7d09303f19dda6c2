//! The few wire-format operations the forwarder needs on the hot path, without decoding whole
//! messages: read the header and the question, give an outgoing query a fresh ID and (DNS 0x20)
//! a random name case, and check that a datagram is the answer to what was sent.
//!
//! Never rewrites anything but the ID and the question name's letter case of the query the
//! cache built (`wire::upstream_query`: its own header and OPT, never a client's options).

use super::{HEADER_LEN, Pointers, id, is_response, name_end, opcode, set_id, u16_at};

/// Compression pointers followed before a name is called a loop.
const MAX_POINTERS: usize = 32;

fn qdcount(msg: &[u8]) -> u16 {
    u16_at(msg, 4).unwrap_or_default()
}

/// A query ready to send: its bytes (with the ID and name case chosen for this upstream query)
/// and what the answer's question must be.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub bytes: Vec<u8>,
    /// Where the question name is in `bytes` (uncompressed, ends with its root label).
    name: std::ops::Range<usize>,
    qtype_class: [u8; 4],
    /// The name was sent with randomised case: the answer must echo it byte for byte.
    case_exact: bool,
}

impl Prepared {
    /// Copies a client's query, giving it a random ID and, with `randomize_case`, a random case
    /// for every letter of the question name.
    pub fn new(query: &[u8], randomize_case: bool) -> Result<Self, &'static str> {
        if query.len() < HEADER_LEN {
            return Err("shorter than a DNS header");
        }
        if is_response(query) {
            return Err("QR is set: not a query");
        }
        if qdcount(query) != 1 {
            return Err("QDCOUNT is not 1");
        }
        let end = name_end(query, HEADER_LEN, Pointers::Refuse)?;
        if end + 4 > query.len() {
            return Err("question is truncated");
        }
        let mut bytes = query.to_vec();
        set_id(&mut bytes, rand::random());
        if randomize_case {
            randomize_name_case(&mut bytes[HEADER_LEN..end]);
        }
        let mut qtype_class = [0; 4];
        qtype_class.copy_from_slice(&bytes[end..end + 4]);
        Ok(Self {
            bytes,
            name: HEADER_LEN..end,
            qtype_class,
            case_exact: randomize_case,
        })
    }

    #[cfg(test)]
    pub fn id(&self) -> u16 {
        id(&self.bytes)
    }

    /// The question name as sent (wire labels).
    pub fn name(&self) -> &[u8] {
        &self.bytes[self.name.clone()]
    }

    /// Checks that `resp` answers this query when it was sent with ID `sent_id`: long enough,
    /// QR set, same ID and opcode, exactly one question with the same type, class and name
    /// (byte for byte when the case was randomised, ASCII case-insensitively otherwise).
    pub fn validate(&self, resp: &[u8], sent_id: u16) -> Result<(), Rejected> {
        if resp.len() < HEADER_LEN {
            return Err(Rejected::Short);
        }
        if id(resp) != sent_id {
            return Err(Rejected::Id);
        }
        if !is_response(resp) {
            return Err(Rejected::NotResponse);
        }
        if opcode(resp) != opcode(&self.bytes) {
            return Err(Rejected::Opcode);
        }
        if qdcount(resp) != 1 {
            return Err(Rejected::Question);
        }
        let (name_ok, end) =
            name_matches(resp, HEADER_LEN, self.name(), self.case_exact).ok_or(Rejected::Short)?;
        if !name_ok {
            return Err(Rejected::Question);
        }
        match resp.get(end..end + 4) {
            Some(tc) if tc == self.qtype_class => Ok(()),
            Some(_) => Err(Rejected::Question),
            None => Err(Rejected::Short),
        }
    }
}

/// Why an upstream datagram was not accepted as the answer (a label of
/// `dns_upstream_rejected_responses_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Short,
    Id,
    NotResponse,
    Opcode,
    Question,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Short => "short",
            Rejected::Id => "id",
            Rejected::NotResponse => "qr",
            Rejected::Opcode => "opcode",
            Rejected::Question => "question",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Rejected::Short => "answer is truncated or shorter than its question",
            Rejected::Id => "answer has another query's ID",
            Rejected::NotResponse => "answer does not have QR set",
            Rejected::Opcode => "answer has another opcode",
            Rejected::Question => "answer's question is not the one sent",
        }
    }
}

/// Compares the (possibly compressed) name at `at` with the uncompressed wire name `want`;
/// returns whether it matched and where the name ends at `at`. None: truncated or a loop.
fn name_matches(msg: &[u8], mut at: usize, want: &[u8], case_exact: bool) -> Option<(bool, usize)> {
    let mut end = None;
    let mut w = 0;
    let mut ok = true;
    let mut hops = 0;
    loop {
        let len = *msg.get(at)? as usize;
        if len & 0xc0 == 0xc0 {
            let ptr = ((len & 0x3f) << 8) | *msg.get(at + 1)? as usize;
            end.get_or_insert(at + 2);
            hops += 1;
            if hops > MAX_POINTERS || ptr >= at {
                return None;
            }
            at = ptr;
            continue;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        let label = msg.get(at..at + 1 + len)?;
        match want.get(w..w + 1 + len) {
            Some(x) if ok => {
                ok = if case_exact {
                    x == label
                } else {
                    x.eq_ignore_ascii_case(label)
                }
            }
            _ => ok = false,
        }
        w += 1 + len;
        at += 1 + len;
        if len == 0 {
            return Some((ok && w == want.len(), end.unwrap_or(at)));
        }
    }
}

/// Flips each ASCII letter of the wire name's labels to a random case (the length bytes are
/// never letters' positions, so only label bytes change).
fn randomize_name_case(name: &mut [u8]) {
    let mut bits: u64 = rand::random();
    let mut used = 0;
    let mut i = 0;
    while i < name.len() {
        let len = name[i] as usize;
        let end = (i + 1 + len).min(name.len());
        for b in &mut name[i + 1..end] {
            if b.is_ascii_alphabetic() {
                if used == 64 {
                    bits = rand::random();
                    used = 0;
                }
                *b = if bits & 1 == 1 {
                    b.to_ascii_uppercase()
                } else {
                    b.to_ascii_lowercase()
                };
                bits >>= 1;
                used += 1;
            }
        }
        i += 1 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    /// The response upstream would send for `sent` (same ID and question), via hickory.
    fn answer_to(sent: &[u8]) -> Message {
        let q = Message::from_vec(sent).unwrap();
        let mut r = Message::response(q.metadata.id, q.metadata.op_code);
        r.metadata.message_type = MessageType::Response;
        r.add_queries(q.queries.clone());
        r
    }

    #[test]
    fn prepare_changes_only_the_id_and_keeps_the_question() {
        let q = query("www.Example.com.", RecordType::AAAA);
        let p = Prepared::new(&q, false).unwrap();
        assert_eq!(p.bytes[2..], q[2..]);
        let resp = answer_to(&p.bytes).to_vec().unwrap();
        assert_eq!(p.validate(&resp, p.id()), Ok(()));
    }

    #[test]
    fn randomized_case_keeps_the_name_case_insensitively() {
        let q = query(
            "a-very-long-name-with-many-letters.example.com.",
            RecordType::A,
        );
        let p = Prepared::new(&q, true).unwrap();
        assert!(p.name().eq_ignore_ascii_case(&q[12..q.len() - 4]));
        // 40 letters: the chance that all kept their case is 2^-40.
        assert_ne!(p.name(), &q[12..q.len() - 4]);
        let resp = answer_to(&p.bytes).to_vec().unwrap();
        assert_eq!(p.validate(&resp, p.id()), Ok(()));
        // An answer that lower-cased the name (a spoofer guessing) fails case-exact matching.
        let lower = answer_to(&q);
        let mut lower = lower.to_vec().unwrap();
        set_id(&mut lower, p.id());
        assert_eq!(p.validate(&lower, p.id()), Err(Rejected::Question));
    }

    #[test]
    fn wrong_id_question_or_qr_is_rejected() {
        let q = query("svc.cluster.local.", RecordType::A);
        let p = Prepared::new(&q, false).unwrap();
        let good = answer_to(&p.bytes).to_vec().unwrap();

        let mut wrong_id = good.clone();
        set_id(&mut wrong_id, p.id().wrapping_add(1));
        assert_eq!(p.validate(&wrong_id, p.id()), Err(Rejected::Id));

        let mut not_qr = good.clone();
        not_qr[2] &= 0x7f;
        assert_eq!(p.validate(&not_qr, p.id()), Err(Rejected::NotResponse));

        let mut other = answer_to(&query("svc.cluster.locak.", RecordType::A))
            .to_vec()
            .unwrap();
        set_id(&mut other, p.id());
        assert_eq!(p.validate(&other, p.id()), Err(Rejected::Question));

        let mut other_type = answer_to(&query("svc.cluster.local.", RecordType::AAAA))
            .to_vec()
            .unwrap();
        set_id(&mut other_type, p.id());
        assert_eq!(p.validate(&other_type, p.id()), Err(Rejected::Question));

        let mut opcode = good.clone();
        opcode[2] |= 4 << 3;
        assert_eq!(p.validate(&opcode, p.id()), Err(Rejected::Opcode));

        assert_eq!(
            p.validate(&good[..good.len() - 2], p.id()),
            Err(Rejected::Short)
        );
        assert_eq!(p.validate(&good[..5], p.id()), Err(Rejected::Short));
    }

    #[test]
    fn compressed_answer_questions_and_pointer_loops() {
        let q = query("a.b.", RecordType::A);
        let p = Prepared::new(&q, false).unwrap();
        // Hand-built answer whose question is a pointer to a name placed... before it is
        // impossible; a pointer to itself is a loop and must not hang.
        let mut looped = p.bytes[..12].to_vec();
        looped[2] |= 0x80;
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(p.validate(&looped, p.id()), Err(Rejected::Short));
    }

    #[test]
    fn malformed_client_queries_are_refused() {
        assert!(Prepared::new(&[0; 5], false).is_err());
        let mut q = query("a.b.", RecordType::A);
        q[5] = 2;
        assert_eq!(Prepared::new(&q, false).unwrap_err(), "QDCOUNT is not 1");
        let q = query("a.b.", RecordType::A);
        assert!(Prepared::new(&q[..q.len() - 1], false).is_err());
        let mut r = query("a.b.", RecordType::A);
        r[2] |= 0x80;
        assert!(Prepared::new(&r, false).is_err());
    }
}
