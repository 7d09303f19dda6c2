//! The DNS wire format, in one place: one set of constants (header length, flags, types,
//! rcodes), one set of header accessors and one name walker, used by every part of the agent
//! that reads or writes DNS bytes.
//!
//! - `fast`: the hand-written hot path: parse a client query (header, one question, EDNS OPT),
//!   scan an upstream response for its TTL offsets, patch a cached answer for a client (ID,
//!   flags, question case, TTLs) and the fixed-shape answers made from a query's own bytes.
//!   A cache hit does no allocation and no full decode (decision #21-w).
//! - `outgoing`: what the forwarder does to a query it sends (fresh ID, 0x20 name case) and the
//!   check that a datagram answers it.
//! - `build`: every other message the agent sends (health probes, the node guard's query, the
//!   shutdown self-check), built with hickory-proto, never as byte literals.
//! - Full decoding of an upstream answer on the miss path (`dns::scrub`) uses hickory-proto.
//!
//! Must never panic on any input: every read is bounds-checked, malformed bytes are an error.
//! Names are never followed through compression pointers except by `outgoing`'s comparison,
//! which bounds the hops.

pub mod build;
pub(crate) mod fast;
pub mod outgoing;

#[cfg(test)]
mod differential;

pub use fast::*;

/// Header length (RFC 1035 4.1.1).
pub const HEADER_LEN: usize = 12;
/// Longest name on the wire (RFC 1035 2.3.4).
pub const MAX_NAME: usize = 255;
/// What a client without EDNS can receive over UDP.
pub const MIN_UDP_PAYLOAD: usize = 512;
/// The payload size we advertise in our own OPT records (DNS flag day 2020).
pub const OUR_UDP_PAYLOAD: u16 = 1232;
/// The largest UDP answer we send, whatever the client advertises: beyond it, TC and the
/// client retries over TCP (a 64 KiB datagram is fragmented, and fragments get lost/spoofed).
pub const MAX_UDP_ANSWER: usize = 4096;

// Header flag bits (RFC 1035 4.1.1, RFC 4035 3.2): byte 2 and byte 3 of the message.
const FLAG2_QR: u8 = 0x80;
const FLAG2_OPCODE: u8 = 0x78;
const FLAG2_AA: u8 = 0x04;
const FLAG2_TC: u8 = 0x02;
const FLAG2_RD: u8 = 0x01;
const FLAG3_RA: u8 = 0x80;
const FLAG3_AD: u8 = 0x20;
const FLAG3_CD: u8 = 0x10;
const FLAG3_RCODE: u8 = 0x0F;

pub const TYPE_A: u16 = 1;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;

pub mod rcode {
    pub const NOERROR: u16 = 0;
    pub const FORMERR: u16 = 1;
    pub const SERVFAIL: u16 = 2;
    pub const NXDOMAIN: u16 = 3;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    /// Extended (needs OPT): unsupported EDNS version.
    pub const BADVERS: u16 = 16;

    pub fn name(rcode: u16) -> &'static str {
        match rcode {
            NOERROR => "NOERROR",
            FORMERR => "FORMERR",
            SERVFAIL => "SERVFAIL",
            NXDOMAIN => "NXDOMAIN",
            NOTIMP => "NOTIMP",
            REFUSED => "REFUSED",
            BADVERS => "BADVERS",
            _ => "OTHER",
        }
    }
}

// === Header accessors: the caller has checked `msg.len() >= HEADER_LEN` ===

pub fn id(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[0], msg[1]])
}

pub fn set_id(msg: &mut [u8], id: u16) {
    msg[..2].copy_from_slice(&id.to_be_bytes());
}

pub fn is_response(msg: &[u8]) -> bool {
    msg[2] & FLAG2_QR != 0
}

pub fn opcode(msg: &[u8]) -> u8 {
    (msg[2] & FLAG2_OPCODE) >> 3
}

pub fn truncated(msg: &[u8]) -> bool {
    msg[2] & FLAG2_TC != 0
}

/// The header's 4-bit RCODE (without the OPT record's extension bits).
pub fn header_rcode(msg: &[u8]) -> u16 {
    u16::from(msg[3] & FLAG3_RCODE)
}

/// True when `msg` is a whole header with QR set and ID `id`: an answer to our query `id`.
pub fn answers_id(msg: &[u8], id: u16) -> bool {
    msg.len() >= HEADER_LEN && self::id(msg) == id && is_response(msg)
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(i)?,
        *b.get(i + 1)?,
        *b.get(i + 2)?,
        *b.get(i + 3)?,
    ]))
}

// === The name walker ===

/// What a name walk does at a compression pointer. It never follows one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pointers {
    /// A query's question: a pointer (or an extended label) is an error.
    Refuse,
    /// A record's owner: a pointer ends the name.
    End,
}

/// The offset just after the name at `at`; bounds-checked, at most `MAX_NAME` bytes, never
/// follows a pointer (so no loop). The error strings are metric labels (`dns::metrics`).
fn name_end(b: &[u8], mut at: usize, pointers: Pointers) -> Result<usize, &'static str> {
    let start = at;
    loop {
        let len = *b.get(at).ok_or("name runs past the end")?;
        match (len & 0xC0, pointers) {
            (0x00, _) => {
                at += 1 + usize::from(len);
                if at - start > MAX_NAME {
                    return Err("name longer than 255 bytes");
                }
                if len == 0 {
                    return Ok(at);
                }
            }
            (_, Pointers::Refuse) => return Err("compressed or extended label in the question"),
            (0xC0, Pointers::End) => {
                b.get(at + 1).ok_or("pointer runs past the end")?;
                return Ok(at + 2);
            }
            _ => return Err("extended label type"),
        }
    }
}
