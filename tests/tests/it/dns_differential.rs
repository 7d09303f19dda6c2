//! Differential test: the agent's DNS cache and a reference `unbound` configured as a plain
//! forwarder, both in front of the same authoritative upstream (`unbound` serving
//! `example.test` from a zone file), get the same few hundred generated queries (names, types,
//! letter case, EDNS sizes, DO, CD, UDP and TCP) and must answer alike: rcode, header flags,
//! answer records, OPT presence, TTL bounds. The intended differences are listed in
//! `INTENDED`, and nothing else may differ.
//!
//! Runs inside a network namespace of its own (root; `ip`, `dig` and `unbound` from
//! tests/scripts/install-deps).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use nodekeeper::dns::wire;
use nodekeeper_tests::dns_peers::{
    self, Unbound, Upstreams, agent_dns_config, dig, encode_name, free_dns_addr, udp_exchange,
};
use nodekeeper_tests::netns_pods::Netns;
use nodekeeper_tests::{Agent, Proc, require_root, require_tool, wait_for};

/// What the cache does on purpose and unbound does not, so the comparison leaves it out:
/// - TTL values: the cache caps them at `maxTtl` (30 s here); unbound passes 300 s on. Both are
///   checked against bounds instead (cache <= 30, unbound <= the zone's TTL).
/// - The authority and additional sections of positive answers (unbound's
///   `minimal-responses`); negative answers are compared on their SOA.
/// - The OPT record's payload size and options (each server advertises its own).
/// - A CNAME chain ending in NODATA (`c1` AAAA/TXT/SRV): unbound adds the SOA of the chain's
///   last name to the authority section; the cache passes on its upstream's answer (the
///   authoritative server sends the chain without an SOA), so only negative answers without a
///   chain are compared on their authority.
const INTENDED: &[&str] = &[
    "ttl values",
    "positive answers' authority/additional",
    "OPT size",
    "SOA after a CNAME chain to NODATA",
];

const MAX_TTL: u32 = 30;

/// The reference: unbound forwarding everything to `upstream`, no validation, no recursion.
fn unbound_forwarder(upstream: SocketAddr) -> (SocketAddr, Proc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_dns_addr();
    let d = dir.path().display();
    let conf = format!(
        "server:\n  interface: {ip}@{port}\n  port: {port}\n  do-ip6: no\n  username: \"\"\n  \
         chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  \
         logfile: \"{d}/unbound.log\"\n  verbosity: 0\n  do-daemonize: no\n  \
         module-config: \"iterator\"\n  num-threads: 1\n  access-control: 127.0.0.0/8 allow\n  \
         do-not-query-localhost: no\n  qname-minimisation: no\n  local-zone: \"test.\" nodefault\n\
         forward-zone:\n  name: \".\"\n  forward-addr: {uip}@{uport}\n",
        ip = addr.ip(),
        port = addr.port(),
        uip = upstream.ip(),
        uport = upstream.port(),
    );
    std::fs::write(dir.path().join("unbound.conf"), conf).unwrap();
    let mut cmd = Command::new("unbound");
    cmd.arg("-d").arg("-c").arg(dir.path().join("unbound.conf"));
    let proc = Proc::spawn("unbound-forwarder", cmd, dir.path());
    wait_for(
        Duration::from_secs(10),
        "the reference forwarder answers",
        || (dig(addr, &["a.example.test", "A"]).status() == "NOERROR").then_some(()),
    );
    (addr, proc, dir)
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    qtype: u16,
    /// None: no EDNS; Some((payload, DO)).
    edns: Option<(u16, bool)>,
    cd: bool,
    tcp: bool,
}

fn build(id: u16, c: &Case) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, if c.cd { 0x10 } else { 0 }, 0, 1, 0, 0, 0, 0, 0]);
    m.push(u8::from(c.edns.is_some()));
    encode_name(&mut m, &c.name);
    m.extend_from_slice(&c.qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    if let Some((payload, do_bit)) = c.edns {
        m.push(0);
        m.extend_from_slice(&41u16.to_be_bytes());
        m.extend_from_slice(&payload.to_be_bytes());
        m.extend_from_slice(&[0, 0, if do_bit { 0x80 } else { 0 }, 0, 0, 0]);
    }
    m
}

fn exchange(server: SocketAddr, msg: &[u8], tcp: bool) -> Vec<u8> {
    if !tcp {
        return udp_exchange(server, msg, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("no UDP answer from {server}"));
    }
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(&wire::tcp_frame(msg).unwrap()).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut out = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut out).unwrap();
    out
}

/// What is compared: rcode, flags (QR AA TC RD RA AD CD), sorted answer data, the authority's
/// record types of a negative answer, OPT present.
#[derive(Debug, PartialEq)]
struct Shape {
    rcode: u16,
    flags: [bool; 7],
    answers: Vec<String>,
    negative_authority: Vec<String>,
    opt: bool,
}

fn shape(answer: &[u8]) -> (Shape, Vec<u32>) {
    let info = wire::scan_response(answer).expect("answer scans");
    let m = Message::from_vec(answer).expect("answer decodes");
    let bit = |byte: usize, mask: u8| answer[byte] & mask != 0;
    let mut answers: Vec<String> = m
        .answers
        .iter()
        .map(|r| format!("{} {}", r.data.record_type(), r.data))
        .collect();
    answers.sort();
    let negative_authority = if answers.is_empty() {
        m.authorities
            .iter()
            .map(|r| r.data.record_type().to_string())
            .collect()
    } else {
        Vec::new()
    };
    let ttls = info
        .ttl_offsets
        .iter()
        .map(|&o| {
            let o = usize::from(o);
            u32::from_be_bytes(answer[o..o + 4].try_into().unwrap())
        })
        .collect();
    (
        Shape {
            rcode: info.rcode,
            flags: [
                bit(2, 0x80),
                bit(2, 0x04),
                bit(2, 0x02),
                bit(2, 0x01),
                bit(3, 0x80),
                bit(3, 0x20),
                bit(3, 0x10),
            ],
            answers,
            negative_authority,
            opt: info.opt.is_some(),
        },
        ttls,
    )
}

fn cases() -> Vec<Case> {
    let names = [
        "a",
        "short",
        "c1",
        "_sip._udp",
        "txtonly",
        "nope",
        "x.wild",
        "big",
    ];
    let types = [1u16, 28, 16, 33];
    let mut out = Vec::new();
    for (i, n) in names.iter().enumerate() {
        for t in types {
            for upper in [false, true] {
                for edns in [None, Some((1232, true)), Some((4096, false))] {
                    for cd in [false, true] {
                        let name = format!("{n}.example.test");
                        let name = if upper {
                            name.to_ascii_uppercase()
                        } else {
                            name
                        };
                        let tcp = (i + usize::from(t) + usize::from(cd)) % 5 == 0;
                        out.push(Case {
                            name,
                            qtype: t,
                            edns,
                            cd,
                            tcp,
                        });
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_cache_answers_like_a_reference_unbound_forwarder_as_root() {
    if !(require_root() && require_tool("ip") && require_tool("dig") && require_tool("unbound")) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-diff");
    let auth = Unbound::serving(&[dns_peers::example_zone()]);
    let (reference, _ref_proc, _ref_dir) = unbound_forwarder(auth.addr);
    let listen = free_dns_addr();
    let up = Upstreams {
        default: Some(auth.addr),
        ..Default::default()
    };
    let agent = Agent::builder()
        .config(&agent_dns_config(listen, &up, "", ""))
        .start();
    wait_for(Duration::from_secs(10), "the cache answers", || {
        (dig(listen, &["a.example.test", "A"]).status() == "NOERROR").then_some(())
    });
    let started = Instant::now();
    let cases = cases();
    let mut differences = Vec::new();
    // Each case twice: the second time the cache answers from memory.
    for round in 0..2 {
        for (i, c) in cases.iter().enumerate() {
            let q = build(i as u16, c);
            let (ours, our_ttls) = shape(&exchange(listen, &q, c.tcp));
            let (theirs, _) = shape(&exchange(reference, &q, c.tcp));
            if ours != theirs {
                differences.push(format!(
                    "round {round} {c:?}:\n  ours   {ours:?}\n  theirs {theirs:?}"
                ));
            }
            if let Some(t) = our_ttls.iter().find(|&&t| t > MAX_TTL) {
                differences.push(format!("round {round} {c:?}: TTL {t} over maxTtl"));
            }
        }
    }
    eprintln!(
        "{} queries x 2 rounds compared in {:?}; intended differences left out: {INTENDED:?}",
        cases.len(),
        started.elapsed()
    );
    assert!(
        differences.is_empty(),
        "{} differences:\n{}\nagent log:\n{}",
        differences.len(),
        differences.join("\n"),
        agent.proc.log_text()
    );
}
