//! NodeLocal DNS cache: a caching forwarder on a link-local address (and optionally the
//! kube-dns ClusterIP), with the node wiring (dummy interface, NOTRACK/ACCEPT rules) that makes
//! pods reach it, and fail-open behaviour when it stops. See docs/dns.md.

pub mod config;
pub mod node;

pub use config::DnsConfig;

pub const CAPABILITY: &str = "dns";
