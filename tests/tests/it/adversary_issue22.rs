//! Adversary tests for issue #22 (NodeLocal DNS at the edges): each one is an attack that broke a
//! promise of docs/dns.md (kept `#[ignore]` until the code was fixed; all pass since branch f22,
//! docs/dns.md "Safety case").
//!
//! The agent runs as a cache in its own network namespace (`Netns::enter_fresh`) in front of a
//! scripted UDP upstream on a thread of this test (`Hostile`), which answers by the question's
//! first label:
//! - `cnnx...`: NXDOMAIN, the name CNAME `gone.<zone>` with TTL 1, and the zone's SOA (TTL and
//!   MINIMUM 60) in authority: a CNAME chain ending in NXDOMAIN, as a recursive resolver gives it;
//! - `slowN...`: an A record after N milliseconds (a slow upstream, not a failed one);
//! - `silent...`: never answered (a dead domain behind the upstream);
//! - `lose...`: the first datagram for the name is dropped, the next ones answered;
//! - `big...`: one TXT record of 230 strings of 255 bytes (a 58.9 KB answer);
//! - `tctcp...`: over UDP an empty answer with TC; over TCP (the same port) an A record with
//!   TC still set (a broken server, or a middlebox, truncating its TCP answer too);
//! - `short...`: an A record whose RDATA is 3 bytes (the structure scans, the record does not
//!   decode);
//! - anything else: an A record, TTL 300.
//!
//! Every answer (but `slowN`'s own delay) comes `base_delay` after the query, from a thread of
//! its own, so the other queries are not held up. Every query is logged by name.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_tests::dns_peers::{Upstreams, agent_dns_config, dig, encode_name, free_dns_addr};
use nodekeeper_tests::memcg::{DAEMONSET_MEMORY_LIMIT, MemoryCgroup};
use nodekeeper_tests::netns_pods::Netns;
use nodekeeper_tests::{Agent, require_root, require_tool, wait_for};

fn tools() -> bool {
    require_root() && require_tool("ip") && require_tool("dig")
}

struct Hostile {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Hostile {
    fn start(base_delay: Duration) -> Hostile {
        let addr = free_dns_addr();
        let sock = UdpSocket::bind(addr).expect("bind the scripted upstream");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let h = Hostile {
            addr,
            log: Arc::default(),
            stop: Arc::default(),
        };
        let (log, stop) = (h.log.clone(), h.stop.clone());
        let tcp = std::net::TcpListener::bind(addr).expect("bind the scripted upstream's TCP");
        let tcp_log = log.clone();
        std::thread::spawn(move || {
            for conn in tcp.incoming().flatten() {
                let log = tcp_log.clone();
                std::thread::spawn(move || serve_tcp_truncated(conn, &log));
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut lost: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let q = buf[..n].to_vec();
                let Some((labels, question_end)) = question(&q) else {
                    continue;
                };
                let name = labels.join(".");
                log.lock().unwrap().push(name.clone());
                let first = labels.first().cloned().unwrap_or_default();
                if first.starts_with("silent") {
                    continue;
                }
                if first.starts_with("lose") && !lost.contains(&name) {
                    lost.push(name);
                    continue;
                }
                let mut delay = base_delay;
                if let Some(ms) = first.strip_prefix("slow").and_then(|m| m.parse().ok()) {
                    delay = Duration::from_millis(ms);
                }
                let answer = respond(&q, question_end, &labels);
                let late = sock.try_clone().expect("clone the upstream socket");
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = late.send_to(&answer, peer);
                });
            }
        });
        h
    }

    fn queries_for(&self, name: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == name)
            .count()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers every framed query on `conn` with an A record and TC set.
fn serve_tcp_truncated(mut conn: TcpStream, log: &Mutex<Vec<String>>) {
    use std::io::Read;
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut q).is_err() {
            return;
        }
        let Some((labels, question_end)) = question(&q) else {
            return;
        };
        log.lock().unwrap().push(labels.join("."));
        let mut r = q[..question_end].to_vec();
        r[2] = 0x86 | (q[2] & 0x01); // QR, AA, TC
        r[3] = 0x80;
        r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
        record(&mut r, &[0xC0, 12], 1, 300, &[192, 0, 2, 55]);
        let mut framed = (r.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&r);
        if conn.write_all(&framed).is_err() {
            return;
        }
    }
}

/// The question's labels (lower case) and the offset after its type and class.
fn question(q: &[u8]) -> Option<(Vec<String>, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(i)?);
        if len == 0 {
            return Some((labels, i + 5)).filter(|(_, end)| *end <= q.len());
        }
        labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
        i += 1 + len;
    }
}

fn record(out: &mut Vec<u8>, owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) {
    out.extend_from_slice(owner);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
}

fn wire_name(name: &str) -> Vec<u8> {
    let mut m = Vec::new();
    encode_name(&mut m, name);
    m
}

fn respond(q: &[u8], question_end: usize, labels: &[String]) -> Vec<u8> {
    let first = labels.first().map(String::as_str).unwrap_or("");
    let zone = labels[labels.len().saturating_sub(2)..].join(".");
    let mut r = q[..question_end].to_vec();
    r[2] = 0x84 | (q[2] & 0x01);
    r[3] = 0x80;
    let (mut an, mut ns) = (0u16, 0u16);
    let at_question = [0xC0, 12];
    if first.starts_with("cnnx") {
        r[3] = 0x83; // NXDOMAIN
        record(
            &mut r,
            &at_question,
            5,
            1,
            &wire_name(&format!("gone.{zone}")),
        );
        let mut soa = wire_name(&format!("ns.{zone}"));
        soa.extend(wire_name(&format!("hostmaster.{zone}")));
        for v in [1u32, 3600, 600, 86400, 60] {
            soa.extend_from_slice(&v.to_be_bytes());
        }
        record(&mut r, &wire_name(&zone), 6, 60, &soa);
        (an, ns) = (1, 1);
    } else if first.starts_with("short") {
        record(&mut r, &at_question, 1, 300, &[192, 0, 2]);
        an = 1;
    } else if first.starts_with("tctcp") {
        r[2] |= 0x02; // TC, nothing else: the client should ask over TCP
    } else if first.starts_with("big") {
        let mut txt = Vec::new();
        for _ in 0..230 {
            txt.push(255);
            txt.extend_from_slice(&[b'x'; 255]);
        }
        record(&mut r, &at_question, 16, 300, &txt);
        an = 1;
    } else if !labels.is_empty() {
        record(&mut r, &at_question, 1, 300, &[192, 0, 2, 1]);
        an = 1;
    }
    r[6..8].copy_from_slice(&an.to_be_bytes());
    r[8..10].copy_from_slice(&ns.to_be_bytes());
    r[10..12].copy_from_slice(&0u16.to_be_bytes());
    r
}

/// The agent as a cache forwarding only to `up` (UDP).
fn cache(
    up: &Hostile,
    cache_yaml: &str,
    extra_yaml: &str,
    group: Option<&MemoryCgroup>,
) -> (SocketAddr, Agent) {
    let listen = free_dns_addr();
    let ups = Upstreams {
        default: Some(up.addr),
        ..Default::default()
    };
    let mut builder =
        Agent::builder().config(&agent_dns_config(listen, &ups, cache_yaml, extra_yaml));
    if let Some(g) = group {
        builder = builder.in_cgroup(g);
    }
    let agent = builder.start();
    wait_for(Duration::from_secs(10), "the cache answers", || {
        (dig(listen, &["ready.adv.test", "A"]).status() == "NOERROR").then_some(())
    });
    (listen, agent)
}

/// RFC 2308 5 (and docs/dns.md "Caching the answer"): a CNAME chain ending in NXDOMAIN is cached
/// for min(the chain's TTLs, the negative TTL). The NXDOMAIN arm takes the SOA's negative TTL
/// alone, so a CNAME with TTL 1 is served from the cache for the negative TTL (30 s here), its
/// TTL counting down to 0 and staying there: the upstream is not asked again when it expired.
#[test]
fn adversary_a_cname_chain_to_nxdomain_is_not_cached_past_its_cname_ttl_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-cnnx");
    let up = Hostile::start(Duration::ZERO);
    let (listen, agent) = cache(&up, "maxTtl: 30s\nserveStale: false", "", None);
    let first = dig(listen, &["cnnx.adv.test", "A"]);
    assert_eq!(first.status(), "NXDOMAIN", "{}", first.raw);
    // The CNAME's TTL (1 s) is over: the answer must come from the upstream again.
    std::thread::sleep(Duration::from_millis(2500));
    let second = dig(listen, &["cnnx.adv.test", "A"]);
    assert_eq!(second.status(), "NXDOMAIN", "{}", second.raw);
    assert_eq!(
        up.queries_for("cnnx.adv.test"),
        2,
        "asked once, then served from the cache 2.5 s later although the chain's CNAME had \
         TTL 1:\n{}\nagent log:\n{}",
        second.raw,
        agent.proc.log_text()
    );
}

/// docs/dns.md: "a slow upstream is not a failed one" and the whole exchange stays within
/// `dns.timeout`. An upstream answering every query 1.5 s late (inside the 2 s timeout) gets the
/// query retransmitted at 100, 300, 700 ms... with a new ID each time, each earlier ID forgotten,
/// so every answer arrives for an ID no longer pending: the client gets SERVFAIL (and the
/// already slow upstream got five queries for one).
#[test]
fn adversary_an_upstream_answering_within_the_timeout_is_not_a_servfail_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-slow");
    let up = Hostile::start(Duration::ZERO);
    let (listen, agent) = cache(&up, "", "timeout: 2s", None);
    let slow = dig(listen, &["+time=5", "slow1500.adv.test", "A"]);
    assert_eq!(
        slow.status(),
        "NOERROR",
        "the upstream answered every one of its {} queries 1.5 s later, within dns.timeout \
         (2 s):\n{}\nagent log:\n{}",
        up.queries_for("slow1500.adv.test"),
        slow.raw,
        agent.proc.log_text()
    );
}

/// docs/dns.md "Retransmission": one lost datagram costs about one retransmission timeout, not a
/// SERVFAIL. The RTO is kept per server and doubled on every timeout, whatever the name: a few
/// names the upstream never answers (a dead domain behind kube-dns) push it to 16x, and as no
/// answer came since, the next healthy name's first try waits the whole `dns.timeout`: its lost
/// datagram is never retransmitted. The upstream answers in 150 ms (so 16 x RTO > 2 s).
#[test]
fn adversary_dead_names_do_not_cost_other_names_their_retransmission_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-rto");
    let up = Hostile::start(Duration::from_millis(150));
    let (listen, agent) = cache(&up, "", "timeout: 2s", None);
    // Control: with no dead names about, a lost datagram is retransmitted and answered.
    let control = dig(listen, &["+time=5", "lose0.adv.test", "A"]);
    assert_eq!(control.status(), "NOERROR", "{}", control.raw);
    assert_eq!(up.queries_for("lose0.adv.test"), 2, "retransmitted once");
    // Pods ask for a few names of a dead domain: each times out (SERVFAIL after 2 s).
    let dead: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                dig(listen, &["+time=4", &format!("silent{i}.dead.test"), "A"])
            })
        })
        .collect();
    for d in dead {
        assert_eq!(d.join().unwrap().status(), "SERVFAIL");
    }
    let after = dig(listen, &["+time=5", "lose1.adv.test", "A"]);
    assert_eq!(
        after.status(),
        "NOERROR",
        "a healthy name's lost datagram was sent {} time(s) within dns.timeout after other \
         names timed out:\n{}\nagent log:\n{}",
        up.queries_for("lose1.adv.test"),
        after.raw,
        agent.proc.log_text()
    );
}

/// P4 / docs/dns.md "Memory model": `memory.peak <= idle + 7/4 x maxBytes + 8 MiB` whatever the
/// answers and the TCP clients. A TCP connection queues up to 64 framed answers for a client
/// that does not read (and more in the socket), so 60 connections from one address (under the
/// 64 per address cap), each pipelining 200 queries for one cached 58.9 KB TXT answer and never
/// reading, make the agent hold hundreds of MB for one cache entry: far past the bound with
/// maxBytes 8 MiB (and past the DaemonSet's 256 MiB limit with 1,024 connections).
#[test]
fn adversary_tcp_clients_pipelining_a_large_answer_stay_within_the_memory_bound_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-tcpmem");
    let Some(group) = MemoryCgroup::require("adv22-tcpmem", DAEMONSET_MEMORY_LIMIT) else {
        return;
    };
    let up = Hostile::start(Duration::ZERO);
    let max_bytes: u64 = 8 << 20;
    let (listen, agent) = cache(
        &up,
        &format!("maxTtl: 30s\nmaxBytes: {max_bytes}"),
        "",
        Some(&group),
    );
    let big = dig(listen, &["+tcp", "big.adv.test", "TXT"]);
    assert_eq!(big.status(), "NOERROR", "{}", big.raw);
    let idle = group.peak_bytes();

    let mut query = vec![0, 0, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    encode_name(&mut query, "big.adv.test");
    query.extend_from_slice(&[0, 16, 0, 1]);
    let mut burst = Vec::new();
    for id in 0..200u16 {
        let mut q = query.clone();
        q[..2].copy_from_slice(&id.to_be_bytes());
        burst.extend_from_slice(&(q.len() as u16).to_be_bytes());
        burst.extend_from_slice(&q);
    }
    let clients: Vec<TcpStream> = (0..60)
        .map(|_| {
            let mut s = TcpStream::connect(listen).expect("connect to the cache");
            s.write_all(&burst).expect("send the pipelined queries");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let peak = group.peak_bytes();
    drop(clients);
    let bound = idle + max_bytes * 7 / 4 + (8 << 20);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "memory.peak {:.1} MiB, idle {:.1} MiB, bound {:.1} MiB",
        mib(peak),
        mib(idle),
        mib(bound)
    );
    assert!(
        peak <= bound,
        "memory.peak {:.1} MiB > idle {:.1} MiB + 7/4 x maxBytes + 8 MiB = {:.1} MiB \
         (oom kills {}), for one cached answer and 60 TCP clients that do not read\nagent log \
         tail:\n{}",
        mib(peak),
        mib(idle),
        mib(bound),
        group.oom_kills(),
        agent
            .proc
            .log_text()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// P6 / docs/dns.md "TCP hand-over": the old agent "serves the accepted connections to
/// completion ... writes every answer it owes, then closes", and the safety case says a
/// hand-over "drops no query asked on" a connection. But the listener's task waits for its
/// connections only 300 + 600 ms from the end of the lame duck, and then the agent exits: a
/// query asked during the lame duck whose miss takes longer (an upstream answering in 2.5 s,
/// `dns.timeout` 4 s) gets EOF instead of its answer, though it was asked, and read, on an open
/// connection of the old agent. (The adversary's 1.5 s upstream failed only through finding 2's
/// retransmissions, which threw away the late answer; 2.5 s ends past the 900 ms wait whatever
/// the forwarder does.)
#[test]
fn adversary_a_tcp_query_asked_before_the_handover_gets_its_answer_as_root() {
    use std::io::Read;
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-owed");
    let up = Hostile::start(Duration::ZERO);
    let listen = free_dns_addr();
    let ups = Upstreams {
        default: Some(up.addr),
        ..Default::default()
    };
    let config = agent_dns_config(listen, &ups, "", "timeout: 4s")
        .replace("shutdownTimeout: 5s", "shutdownTimeout: 10s")
        .replace("lameDuck: 0s", "lameDuck: 1s");
    let mut old = Agent::builder().config(&config).start();
    wait_for(Duration::from_secs(10), "the cache answers", || {
        (dig(listen, &["ready.adv.test", "A"]).status() == "NOERROR").then_some(())
    });
    // Connected to the old agent before the successor exists.
    let mut conn = TcpStream::connect(listen).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let new = Agent::builder().config(&config).start();
    wait_for(Duration::from_secs(10), "the successor answers", || {
        new.proc
            .log_text()
            .contains("dns cache serving")
            .then_some(())
    });
    old.proc.signal("TERM");
    // Asked in the lame duck (1 s), on a connection the old agent serves.
    std::thread::sleep(Duration::from_millis(100));
    let mut query = vec![0, 77, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    encode_name(&mut query, "slow2500.adv.test");
    query.extend_from_slice(&[0, 1, 0, 1]);
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    conn.write_all(&framed).expect("ask on the open connection");
    let started = std::time::Instant::now();
    let mut len = [0u8; 2];
    let answer = conn.read_exact(&mut len);
    let waited = started.elapsed();
    assert!(old.proc.wait_exit(Duration::from_secs(15)).success());
    assert!(
        answer.is_ok(),
        "the query asked on the old agent's open connection got {answer:?} after {waited:?} \
         instead of its answer\nold agent log:\n{}",
        old.proc.log_text()
    );
    drop(new);
}

/// P3: only complete answers are cached. RFC 2181 9: a reply with TC set is to be ignored and
/// asked again over TCP. A UDP answer with TC makes the forwarder ask over TCP, but a TCP answer
/// with TC still set is validated (ID, question), scanned and cached like a complete one (the
/// scan's `truncated` is never looked at), then served with TC from the cache to every client,
/// TCP clients included, for the answer's whole TTL: a UDP client's retry over TCP gets the same
/// truncated answer and the upstream is never asked again.
#[test]
fn adversary_a_truncated_answer_is_never_cached_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-tc");
    let up = Hostile::start(Duration::ZERO);
    let (listen, agent) = cache(&up, "", "", None);
    // Decision #22 (docs/dns.md "Truncated answers"): a TCP answer still truncated is a
    // failure: SERVFAIL without a stale entry, never the truncated records.
    let first = dig(listen, &["+tcp", "tctcp1.adv.test", "A"]);
    assert_eq!(first.status(), "SERVFAIL", "{}", first.raw);
    let asked = up.queries_for("tctcp1.adv.test");
    let second = dig(listen, &["+tcp", "tctcp1.adv.test", "A"]);
    assert!(
        up.queries_for("tctcp1.adv.test") > asked,
        "a TCP client got the truncated answer (flags {:?}) from the cache, the upstream not \
         asked again:\n{}\nagent log:\n{}",
        second.flags,
        second.raw,
        agent.proc.log_text()
    );
}

/// P5: "a dead upstream does not stall other names". `maxInFlight` is one budget for every
/// upstream group, and a query to a dead server holds its slot for the whole `dns.timeout`: a
/// pod asking unique names of a stub domain whose server is down (1,024 a second fill the
/// default 2,048 slots; one lookup with `ndots: 5` is up to 5 queries) takes every slot, and
/// every other pod's miss, for names whose upstream is healthy, is answered SERVFAIL at once
/// (overloaded). Here `maxInFlight: 8` and 12 names of the dead `corp.test`.
#[test]
fn adversary_a_dead_stub_server_does_not_starve_the_healthy_upstream_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-starve");
    let up = Hostile::start(Duration::ZERO);
    // A server that never reads: every query to it times out.
    let dead_addr = free_dns_addr();
    let _dead = UdpSocket::bind(dead_addr).expect("bind the dead stub server");
    let listen = free_dns_addr();
    let ups = Upstreams {
        default: Some(up.addr),
        corp_stub: Some(dead_addr),
        ..Default::default()
    };
    let agent = Agent::builder()
        .config(&agent_dns_config(
            listen,
            &ups,
            "",
            "timeout: 2s\nmaxInFlight: 8",
        ))
        .start();
    wait_for(Duration::from_secs(10), "the cache answers", || {
        (dig(listen, &["ready.adv.test", "A"]).status() == "NOERROR").then_some(())
    });
    let dead: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                dig(listen, &["+time=4", &format!("host{i}.corp.test"), "A"])
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let healthy = dig(listen, &["+time=4", "healthy.adv.test", "A"]);
    for d in dead {
        d.join().unwrap();
    }
    assert_eq!(
        healthy.status(),
        "NOERROR",
        "a name of the healthy default upstream (asked {} time(s)) while a stub domain's server \
         is down:\n{}\nagent log:\n{}",
        up.queries_for("healthy.adv.test"),
        healthy.raw,
        agent.proc.log_text()
    );
}

/// P3 / docs/dns.md "Scrubbing": every upstream answer is cut down to the question's answer
/// chain. The chain is decided by owner name only, never by type (nor class): an AAAA question
/// answered with an A record (or any other type) owned by the question name is kept, cached
/// and served as the AAAA answer to every pod (the cheap scan `owned_by_question` takes A and
/// AAAA records whatever the question's type). unbound's scrubber removes answer RRsets whose
/// type is neither the question's nor CNAME/DNAME (iter_scrub.c, "removing irrelevant RRset").
#[test]
fn adversary_answer_records_of_another_type_are_scrubbed_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-type");
    let up = Hostile::start(Duration::ZERO);
    let (listen, agent) = cache(&up, "", "", None);
    // The scripted upstream answers every question (AAAA here) with an A record.
    let aaaa = dig(listen, &["mixtype.adv.test", "AAAA"]);
    assert_eq!(aaaa.status(), "NOERROR", "{}", aaaa.raw);
    assert!(
        aaaa.answer.iter().all(|r| r.rtype == "AAAA"),
        "an AAAA question served records of another type: {:?}\n{}\nagent log:\n{}",
        aaaa.answer,
        aaaa.raw,
        agent.proc.log_text()
    );
}

/// The adversary's note: an answer our scanner accepts but whose record does not decode (an A
/// record of 3 bytes) was passed on to the client. It is garbage, not an answer: SERVFAIL (or
/// stale), never cached, and the upstream is asked again next time.
#[test]
fn adversary_an_undecodable_answer_is_a_failure_not_an_answer_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("adv22-short");
    let up = Hostile::start(Duration::ZERO);
    let (listen, agent) = cache(&up, "", "", None);
    let first = dig(listen, &["short.adv.test", "A"]);
    assert_eq!(
        first.status(),
        "SERVFAIL",
        "{}\nagent log:\n{}",
        first.raw,
        agent.proc.log_text()
    );
    let asked = up.queries_for("short.adv.test");
    let second = dig(listen, &["short.adv.test", "A"]);
    assert_eq!(second.status(), "SERVFAIL", "{}", second.raw);
    assert!(up.queries_for("short.adv.test") > asked, "not cached");
}
