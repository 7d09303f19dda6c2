//! The DNS wire format, in one place.
//!
//! - `fast`: the hand-written hot path: parse a client query (header, one question, EDNS OPT),
//!   scan an upstream response for its TTL offsets, patch a cached answer for a client (ID,
//!   flags, question case, TTLs) and the fixed-shape answers built from a query's own bytes.
//!   Measured: a cache hit does no allocation and no full decode.
//! - `outgoing`: what the forwarder does to a query it sends (fresh ID, 0x20 name case) and the
//!   check that a datagram answers it.
//!
//! Must never panic on any input: every read is bounds-checked, malformed bytes are an error.

pub(crate) mod fast;
pub mod outgoing;

pub use fast::*;
