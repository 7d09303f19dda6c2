//! The NodeLocal DNS cache end to end, against real upstreams from Debian: `unbound` serving
//! test zones authoritatively (one over UDP+TCP for the default group, one TCP-only for the
//! cluster zones) and `dnsmasq` for a stub domain, all on loopback addresses and ports the tests
//! pick. Clients are `dig`, `dnsperf` and raw sockets. Whether an answer came from the cache is
//! read from the upstream's own query log and from the agent's `/metrics`.
//!
//! Each test runs inside a network namespace of its own (`Netns::enter_fresh`: `ip netns add`,
//! then the test thread `setns`es into it): the upstreams, the agent, `dig`, `dnsperf`, the
//! `nodekeeper dns status` call and every in-process socket live there, on its loopback, never
//! on the host's interfaces, rules or resolver. So every test needs root and says so in its
//! name; `each_test_runs_in_a_namespace_of_its_own_as_root` checks the harness itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use nodekeeper_tests::dns_peers::{
    self, BIG_RRSET, CORP_DB_IP, DigOutput, Dnsmasq, NEGATIVE_TTL, RCODE_FORMERR, RCODE_NOTIMP,
    TYPE_A, Unbound, Upstreams, agent_dns_config, dig, free_dns_addr, msg_id, proc_status_kib,
    query_bytes, rcode, udp_exchange,
};
use nodekeeper_tests::netns_pods::{Netns, current_netns};
use nodekeeper_tests::{Agent, agent_bin, parse_samples, require_root, require_tool, wait_for};

// Metric families the tests read (docs/metrics.md).
const HITS: &str = "nodekeeper_dns_cache_hits_total";
const MISSES: &str = "nodekeeper_dns_cache_misses_total";
const ENTRIES: &str = "nodekeeper_dns_cache_entries";
const CACHE_BYTES: &str = "nodekeeper_dns_cache_size_bytes";
const STALE: &str = "nodekeeper_dns_cache_stale_served_total";
/// By `reason` and `action` (`dropped` or `answered`).
const MALFORMED: &str = "nodekeeper_dns_malformed_requests_total";

fn tools() -> bool {
    require_root()
        && require_tool("ip")
        && require_tool("dig")
        && require_tool("unbound")
        && require_tool("dnsmasq")
}

/// The agent's DNS cache in front of the three fixture upstreams.
struct Rig {
    listen: SocketAddr,
    default: Unbound,
    cluster: Unbound,
    stub: Dnsmasq,
    agent: Agent,
}

impl Rig {
    /// `cache_yaml`: lines under `dns.cache`; `extra_yaml`: lines under `dns`.
    fn start(cache_yaml: &str, extra_yaml: &str) -> Rig {
        let default = Unbound::serving(&[dns_peers::example_zone()]);
        let cluster =
            Unbound::serving_tcp_only(&[dns_peers::cluster_zone(), dns_peers::reverse_zone()]);
        let stub = Dnsmasq::corp_test();
        let listen = free_dns_addr();
        let up = Upstreams {
            default: Some(default.addr),
            cluster: Some(cluster.addr),
            corp_stub: Some(stub.addr),
        };
        let agent = Agent::builder()
            .config(&agent_dns_config(listen, &up, cache_yaml, extra_yaml))
            .start();
        // /readyz is 200 once every capability is up; the listener answers by then.
        let first = dig(listen, &["a.example.test", "A"]);
        assert_eq!(
            first.status(),
            "NOERROR",
            "the cache answers once ready:\n{}\nagent log:\n{}",
            first.raw,
            agent.proc.log_text()
        );
        Rig {
            listen,
            default,
            cluster,
            stub,
            agent,
        }
    }

    fn dig(&self, args: &[&str]) -> DigOutput {
        dig(self.listen, args)
    }

    /// Sum over every series of `family` on /metrics.
    fn metric(&self, family: &str) -> f64 {
        metric_sum(&self.agent.metrics_text(), family)
    }

    /// Malformed requests counted with `action` ("dropped" or "answered").
    fn malformed(&self, action: &str) -> f64 {
        parse_samples(&self.agent.metrics_text())
            .into_iter()
            .filter(|(series, _)| {
                series.starts_with(&format!("{MALFORMED}{{"))
                    && series.contains(&format!("action=\"{action}\""))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn log(&self) -> String {
        self.agent.proc.log_text()
    }
}

fn metric_sum(text: &str, family: &str) -> f64 {
    parse_samples(text)
        .into_iter()
        .filter(|(series, _)| series.split('{').next() == Some(family))
        .map(|(_, v)| v)
        .sum()
}

fn ttl_of(o: &DigOutput, rtype: &str) -> u32 {
    o.answer
        .iter()
        .find(|r| r.rtype == rtype)
        .unwrap_or_else(|| panic!("no {rtype} in the answer:\n{}", o.raw))
        .ttl
}

// === the namespace harness ===

/// `Netns::enter_fresh` isolates a test: a UDP socket bound inside is reachable from a thread
/// started inside but not from a thread left in the host namespace, a process spawned inside
/// sees only `lo`, and once the guard drops the thread is back in the host namespace and the
/// namespace is gone.
#[test]
fn each_test_runs_in_a_namespace_of_its_own_as_root() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host = current_netns();
    let links = |what: &str| -> Vec<String> {
        let out = Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip -o link");
        assert!(out.status.success(), "ip -o link ({what}) failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
            .collect()
    };
    let host_links = links("host");
    // A thread of the host namespace (started before entering: threads inherit the namespace
    // of the thread that starts them), sending to whatever port it is given.
    let (to_host, port_rx) = std::sync::mpsc::channel::<u16>();
    let host_sender = std::thread::spawn(move || {
        let port = port_rx.recv().expect("a port");
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind in the host namespace");
        s.connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // A connected UDP socket reports the port unreachable as ECONNREFUSED on recv.
        let _ = s.send(b"from the host");
        let reply =
            nodekeeper_tests::uninterrupted(|| s.recv(&mut [0u8; 64])).map_err(|e| e.kind());
        (current_netns(), reply)
    });

    let name;
    {
        let inside = Netns::enter_fresh("dns-harness");
        name = inside.netns().name().to_string();
        let here = current_netns();
        assert_eq!(here, inside.netns().id(), "the thread is in the namespace");
        assert_ne!(here, host);
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind inside");
        server
            .set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        let port = server.local_addr().unwrap().port();
        let mut buf = [0u8; 64];

        // The positive control: a thread started inside reaches the socket.
        std::thread::spawn(move || {
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.send_to(b"from inside", ("127.0.0.1", port)).unwrap();
            current_netns()
        })
        .join()
        .map(|ns| assert_eq!(ns, here, "a thread started inside is inside"))
        .unwrap();
        let (n, _) = nodekeeper_tests::uninterrupted(|| server.recv_from(&mut buf))
            .expect("the inside datagram arrives");
        assert_eq!(&buf[..n], b"from inside");

        // The host thread sends to the same port on its own loopback: nothing arrives here.
        to_host.send(port).unwrap();
        let (host_thread_ns, reply) = host_sender.join().unwrap();
        assert_eq!(
            host_thread_ns, host,
            "the host thread stayed in the host namespace"
        );
        let got = nodekeeper_tests::uninterrupted(|| server.recv_from(&mut buf));
        assert!(
            got.is_err(),
            "a datagram from the host namespace reached the namespace: {:?}",
            got.map(|(n, from)| (String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        );
        assert!(reply.is_err(), "the host thread got a reply: {reply:?}");
        eprintln!("host thread to 127.0.0.1:{port}: {reply:?}");

        // A child process spawned inside is inside: only `lo`, and the namespace's identity.
        assert_eq!(links("inside"), vec!["lo"], "host links: {host_links:?}");
        let child_ns = Command::new("readlink")
            .arg("/proc/self/ns/net")
            .output()
            .expect("readlink");
        assert_eq!(String::from_utf8_lossy(&child_ns.stdout).trim(), here);
    }
    assert_eq!(
        current_netns(),
        host,
        "the thread is back in the host namespace"
    );
    assert!(
        !std::path::Path::new("/run/netns").join(&name).exists(),
        "{name} was deleted"
    );
}

// === the fixtures themselves ===

/// The upstream fixtures answer as the other tests assume (checked without the agent): AA
/// answers, the SOA negative TTL, TC without EDNS, TCP only where it must be.
#[test]
fn upstream_fixtures_answer_as_the_tests_expect_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let up = Unbound::serving(&[dns_peers::example_zone()]);
    let a = dig(up.addr, &["a.example.test", "A"]);
    assert_eq!(a.data("A"), vec!["192.0.2.1"], "{}", a.raw);
    assert!(a.has_flag("aa"), "{}", a.raw);
    assert_eq!(ttl_of(&a, "A"), 300);
    let nx = dig(up.addr, &["nope.example.test", "A"]);
    assert_eq!(nx.status(), "NXDOMAIN", "{}", nx.raw);
    assert_eq!(nx.authority[0].rtype, "SOA");
    assert_eq!(nx.authority[0].ttl, NEGATIVE_TTL);
    let chain = dig(up.addr, &["c1.example.test", "A"]);
    assert_eq!(chain.data("CNAME").len(), 2, "{}", chain.raw);
    let big = dig(up.addr, &["+ignore", "+noedns", "big.example.test", "A"]);
    assert!(big.has_flag("tc"), "{}", big.raw);
    assert_eq!(up.queries_for("big.example.test"), 1, "{}", up.query_log());

    let tcp_only = Unbound::serving_tcp_only(&[dns_peers::cluster_zone()]);
    let udp = dig(tcp_only.addr, &["web.default.svc.cluster.local", "A"]);
    assert_eq!(udp.status, None, "UDP must be refused:\n{}", udp.raw);
    let tcp = dig(
        tcp_only.addr,
        &["+tcp", "web.default.svc.cluster.local", "A"],
    );
    assert_eq!(tcp.data("A"), vec!["10.96.0.10"], "{}", tcp.raw);

    let stub = Dnsmasq::corp_test();
    let db = dig(stub.addr, &["db.corp.test", "A"]);
    assert_eq!(db.data("A"), vec![CORP_DB_IP], "{}", db.raw);
    assert_eq!(stub.queries_for("db.corp.test"), 1);
}

// === answers ===

#[test]
fn a_aaaa_srv_ptr_and_cname_chains_resolve_through_the_cache_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let rig = Rig::start("", "");
    let a = rig.dig(&["a.example.test", "A"]);
    assert_eq!(a.data("A"), vec!["192.0.2.1"], "{}", a.raw);
    let aaaa = rig.dig(&["a.example.test", "AAAA"]);
    assert_eq!(aaaa.data("AAAA"), vec!["2001:db8::1"], "{}", aaaa.raw);
    let srv = rig.dig(&["_sip._udp.example.test", "SRV"]);
    assert_eq!(
        srv.data("SRV"),
        vec!["10 5 5060 a.example.test."],
        "{}",
        srv.raw
    );
    let chain = rig.dig(&["c1.example.test", "A"]);
    assert_eq!(
        chain.data("CNAME"),
        vec!["c2.example.test.", "c3.example.test."],
        "{}",
        chain.raw
    );
    assert_eq!(chain.data("A"), vec!["192.0.2.3"], "{}", chain.raw);
    // The cluster zones (PTR in 10.in-addr.arpa, SRV in cluster.local) come from the cluster
    // group.
    let ptr = rig.dig(&["-x", "10.96.0.10"]);
    assert_eq!(
        ptr.data("PTR"),
        vec!["web.default.svc.cluster.local."],
        "{}",
        ptr.raw
    );
    let ksrv = rig.dig(&["_http._tcp.web.default.svc.cluster.local", "SRV"]);
    assert_eq!(
        ksrv.data("SRV"),
        vec!["0 100 80 web.default.svc.cluster.local."],
        "{}",
        ksrv.raw
    );
    // Asked again: same answers, no new upstream query.
    let before = rig.default.queries_for("c1.example.test");
    let again = rig.dig(&["c1.example.test", "A"]);
    assert_eq!(again.data("A"), vec!["192.0.2.3"], "{}", again.raw);
    assert_eq!(rig.default.queries_for("c1.example.test"), before);
    // Case does not matter for the cache key; the answer echoes the question's case.
    let mixed = rig.dig(&["A.Example.TEST", "A"]);
    assert_eq!(mixed.data("A"), vec!["192.0.2.1"], "{}", mixed.raw);
    assert_eq!(
        rig.default.queries_for("a.example.test"),
        2,
        "A and AAAA once each:\n{}",
        rig.default.query_log()
    );
}

#[test]
fn nxdomain_and_nodata_are_cached_for_the_soa_negative_ttl_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let rig = Rig::start("", "");
    for (name, status) in [
        ("nope.example.test", "NXDOMAIN"),
        ("txtonly.example.test", "NOERROR"),
    ] {
        let first = rig.dig(&[name, "A"]);
        assert_eq!(first.status(), status, "{}", first.raw);
        assert!(first.answer.is_empty(), "negative answer:\n{}", first.raw);
        let soa = first
            .authority
            .iter()
            .find(|r| r.rtype == "SOA")
            .unwrap_or_else(|| panic!("the SOA comes with a negative answer:\n{}", first.raw));
        assert!(soa.ttl <= NEGATIVE_TTL, "{}", first.raw);
        assert_eq!(rig.default.queries_for(name), 1);
        let hits = rig.metric(HITS);
        std::thread::sleep(Duration::from_secs(2));
        let second = rig.dig(&[name, "A"]);
        assert_eq!(second.status(), status, "{}", second.raw);
        let soa2 = second
            .authority
            .iter()
            .find(|r| r.rtype == "SOA")
            .expect("SOA");
        assert!(
            soa2.ttl < soa.ttl && soa2.ttl < NEGATIVE_TTL,
            "the negative entry's TTL decrements ({} then {}):\n{}",
            soa.ttl,
            soa2.ttl,
            second.raw
        );
        assert_eq!(
            rig.default.queries_for(name),
            1,
            "within the negative TTL the cache answers:\n{}",
            rig.default.query_log()
        );
        assert!(rig.metric(HITS) > hits, "a cache hit is counted");
    }
    // Past the negative TTL (7 s from the first query) the cache asks again.
    std::thread::sleep(Duration::from_secs(u64::from(NEGATIVE_TTL) - 1));
    let third = rig.dig(&["nope.example.test", "A"]);
    assert_eq!(third.status(), "NXDOMAIN", "{}", third.raw);
    assert_eq!(rig.default.queries_for("nope.example.test"), 2);
}

#[test]
fn ttls_are_capped_at_max_ttl_and_decrement_between_queries_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let rig = Rig::start("maxTtl: 30s\nprefetch: false", "");
    // 300 s upstream -> at most 30 s; 5 s upstream stays 5 s.
    let capped = rig.dig(&["a.example.test", "AAAA"]);
    let t0 = ttl_of(&capped, "AAAA");
    assert!(
        (28..=30).contains(&t0),
        "TTL 300 capped at 30, got {t0}:\n{}",
        capped.raw
    );
    let short = rig.dig(&["short.example.test", "A"]);
    let s0 = ttl_of(&short, "A");
    assert!(
        (4..=5).contains(&s0),
        "TTL 5 kept, got {s0}:\n{}",
        short.raw
    );
    std::thread::sleep(Duration::from_secs(2));
    let t1 = ttl_of(&rig.dig(&["a.example.test", "AAAA"]), "AAAA");
    let s1 = ttl_of(&rig.dig(&["short.example.test", "A"]), "A");
    assert!(
        (t0 - 3..=t0 - 1).contains(&t1),
        "two queries 2 s apart: {t0} then {t1}"
    );
    assert!(
        (s0.saturating_sub(3)..=s0 - 1).contains(&s1),
        "two queries 2 s apart: {s0} then {s1}"
    );
    assert_eq!(rig.default.queries_for("short.example.test"), 1);
    // Once the 5 s TTL has run out, the next query goes upstream and the TTL starts again.
    std::thread::sleep(Duration::from_secs(4));
    let s2 = ttl_of(&rig.dig(&["short.example.test", "A"]), "A");
    assert!(s2 >= 4, "refreshed entry, got {s2}");
    assert_eq!(rig.default.queries_for("short.example.test"), 2);
}

#[test]
fn large_answers_are_truncated_over_udp_and_complete_over_tcp_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let rig = Rig::start("", "");
    // A client without EDNS (512 bytes) and one advertising 512: TC, and no partial RRset.
    for args in [
        &["+ignore", "+noedns", "big.example.test", "A"][..],
        &["+ignore", "+bufsize=512", "big.example.test", "A"][..],
    ] {
        let o = rig.dig(args);
        assert_eq!(o.status(), "NOERROR", "{}", o.raw);
        assert!(
            o.has_flag("tc"),
            "TC over UDP for a >512-byte answer ({args:?}):\n{}",
            o.raw
        );
        assert!(o.answer.len() < usize::from(BIG_RRSET), "{}", o.raw);
    }
    // dig retrying over TCP on TC (its default) and plain +tcp: the whole RRset.
    for args in [
        &["+notcp", "big.example.test", "A", "+noedns"][..],
        &["+tcp", "big.example.test", "A"][..],
    ] {
        let o = rig.dig(args);
        assert!(!o.has_flag("tc"), "{args:?}:\n{}", o.raw);
        assert_eq!(
            o.data("A").len(),
            usize::from(BIG_RRSET),
            "{args:?}:\n{}",
            o.raw
        );
    }
    // With a large enough EDNS buffer it fits in UDP.
    let edns = rig.dig(&["+ignore", "+bufsize=1232", "big.example.test", "A"]);
    assert!(!edns.has_flag("tc"), "{}", edns.raw);
    assert_eq!(edns.data("A").len(), usize::from(BIG_RRSET));
    // The cache key includes EDNS presence, so two fetches at most, each perhaps a UDP query
    // answered TC plus its TCP retry; asking everything again fetches nothing.
    let fetched = rig.default.queries_for("big.example.test");
    assert!(fetched <= 4, "{}", rig.default.query_log());
    for args in [
        &["+ignore", "+noedns", "big.example.test", "A"][..],
        &["+ignore", "+bufsize=512", "big.example.test", "A"][..],
        &["+tcp", "big.example.test", "A"][..],
        &["+tcp", "+noedns", "big.example.test", "A"][..],
    ] {
        rig.dig(args);
    }
    assert_eq!(
        rig.default.queries_for("big.example.test"),
        fetched,
        "the big answer is cached, not fetched per client:\n{}",
        rig.default.query_log()
    );
}

#[test]
fn stub_domains_go_to_their_own_server_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let rig = Rig::start("", "");
    let db = rig.dig(&["db.corp.test", "A"]);
    assert_eq!(db.data("A"), vec![CORP_DB_IP], "{}", db.raw);
    let missing = rig.dig(&["nothing.corp.test", "A"]);
    assert_eq!(missing.status(), "NXDOMAIN", "{}", missing.raw);
    assert_eq!(rig.stub.queries_for("db.corp.test"), 1);
    assert_eq!(
        rig.default.queries_for("db.corp.test"),
        0,
        "{}",
        rig.default.query_log()
    );
    assert_eq!(rig.cluster.queries_for("db.corp.test"), 0);
    rig.dig(&["db.corp.test", "A"]);
    assert_eq!(rig.stub.queries_for("db.corp.test"), 1, "cached");
}

#[test]
fn cluster_zones_go_to_a_tcp_only_upstream_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let rig = Rig::start("", "");
    assert!(rig.cluster.is_tcp_only());
    // UDP clients of the cache, TCP between the cache and the cluster upstream (its UDP is closed).
    let svc = rig.dig(&["web.default.svc.cluster.local", "A"]);
    assert_eq!(
        svc.data("A"),
        vec!["10.96.0.10"],
        "{}\nagent log:\n{}",
        svc.raw,
        rig.log()
    );
    let nx = rig.dig(&["missing.default.svc.cluster.local", "A"]);
    assert_eq!(nx.status(), "NXDOMAIN", "{}", nx.raw);
    assert_eq!(rig.cluster.queries_for("web.default.svc.cluster.local"), 1);
    assert_eq!(rig.default.queries_for("web.default.svc.cluster.local"), 0);
    // A burst of distinct cluster names over one upstream (connection reuse, pipelining).
    for i in 0..20 {
        let o = rig.dig(&[&format!("n{i}.default.svc.cluster.local"), "A"]);
        assert_eq!(o.status(), "NXDOMAIN", "{}", o.raw);
    }
}

// === upstream failure ===

#[test]
fn serve_stale_answers_expired_names_and_servfails_uncached_names_quickly_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    // Entries expire after 1 s; each upstream attempt times out after 500 ms.
    let mut rig = Rig::start(
        "maxTtl: 1s\nserveStale: true\nstaleTtl: 30s\nmaxStale: 1h\nprefetch: false",
        "timeout: 500ms",
    );
    let warm = rig.dig(&["a.example.test", "A"]);
    assert_eq!(warm.data("A"), vec!["192.0.2.1"]);
    std::thread::sleep(Duration::from_millis(1500));
    // Bound: timeout x attempts (one server, at most 2 tries) plus a second of slack.
    const TIMEOUT_MS: u64 = 500;
    const ATTEMPTS: u64 = 2;
    let bound = Duration::from_millis(TIMEOUT_MS * ATTEMPTS + 1000);

    // Frozen upstream (SIGSTOP): queries time out.
    rig.default.pause();
    let stale = rig.dig(&["+time=5", "a.example.test", "A"]);
    assert_eq!(
        stale.data("A"),
        vec!["192.0.2.1"],
        "served stale:\n{}\nagent log:\n{}",
        stale.raw,
        rig.log()
    );
    let ttl = ttl_of(&stale, "A");
    assert!(
        (1..=30).contains(&ttl),
        "stale answers carry a small TTL, got {ttl}"
    );
    assert!(
        stale.elapsed < bound + Duration::from_millis(300),
        "stale answer took {:?}",
        stale.elapsed
    );
    let t = Instant::now();
    let uncached = rig.dig(&["+time=5", "never-seen.wild.example.test", "A"]);
    assert_eq!(uncached.status(), "SERVFAIL", "{}", uncached.raw);
    assert!(
        t.elapsed() < bound + Duration::from_millis(300),
        "SERVFAIL took {:?}",
        t.elapsed()
    );
    assert!(rig.metric(STALE) >= 1.0, "stale answers are counted");
    rig.default.resume();

    // Dead upstream (killed: UDP refused): the same, sooner.
    rig.default.stop();
    std::thread::sleep(Duration::from_millis(1200));
    let stale = rig.dig(&["+time=5", "a.example.test", "A"]);
    assert_eq!(stale.data("A"), vec!["192.0.2.1"], "{}", stale.raw);
    let t = Instant::now();
    let uncached = rig.dig(&["+time=5", "other.wild.example.test", "A"]);
    assert_eq!(uncached.status(), "SERVFAIL", "{}", uncached.raw);
    assert!(t.elapsed() < bound, "SERVFAIL took {:?}", t.elapsed());

    // Upstream back: fresh answers again (SERVFAIL is not cached for long).
    rig.default.start();
    wait_for(
        Duration::from_secs(10),
        "fresh answers after the upstream is back",
        || {
            let o = rig.dig(&["other.wild.example.test", "A"]);
            (o.status() == "NOERROR").then_some(())
        },
    );
}

// === bad input ===

/// Sends `msg`: Some(rcode) when answered (the ID must be echoed), None when dropped.
fn udp_outcome(listen: SocketAddr, msg: &[u8]) -> Option<u8> {
    let reply = udp_exchange(listen, msg, Duration::from_millis(700))?;
    if msg.len() >= 2 {
        assert_eq!(msg_id(&reply), msg_id(msg), "a reply echoes the query ID");
    }
    assert!(reply[2] & 0x80 != 0, "a reply has QR set: {reply:?}");
    rcode(&reply)
}

#[test]
fn malformed_queries_get_formerr_or_notimp_or_are_dropped_and_counted_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let rig = Rig::start("", "");
    let l = rig.listen;
    let dropped_before = rig.malformed("dropped");
    let mut dropped = 0;
    let mut drop_or = |outcome: Option<u8>, allowed: &[u8], what: &str| match outcome {
        None => dropped += 1,
        Some(rc) => assert!(allowed.contains(&rc), "{what}: rcode {rc}"),
    };

    // Truncated headers.
    for len in [0usize, 1, 2, 5, 11] {
        let q = query_bytes(0x1111, "a.example.test", TYPE_A);
        drop_or(
            udp_outcome(l, &q[..len]),
            &[RCODE_FORMERR],
            &format!("{len}-byte header"),
        );
    }
    // Header saying one question, no question.
    let q = query_bytes(0x2222, "a.example.test", TYPE_A);
    drop_or(
        udp_outcome(l, &q[..12]),
        &[RCODE_FORMERR],
        "missing question",
    );
    // Question cut inside the name and inside type/class.
    drop_or(udp_outcome(l, &q[..16]), &[RCODE_FORMERR], "name cut");
    drop_or(
        udp_outcome(l, &q[..q.len() - 2]),
        &[RCODE_FORMERR],
        "class cut",
    );
    // Compression pointer pointing at itself, and two pointers pointing at each other.
    let mut self_loop = q[..12].to_vec();
    self_loop.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    drop_or(
        udp_outcome(l, &self_loop),
        &[RCODE_FORMERR],
        "pointer to itself",
    );
    let mut pair = q[..12].to_vec();
    pair.extend_from_slice(&[1, b'x', 0xc0, 16, 1, b'y', 0xc0, 12, 0, 1, 0, 1]);
    drop_or(udp_outcome(l, &pair), &[RCODE_FORMERR], "pointer loop");
    // A forward pointer past the end; a label longer than 63; a name longer than 255.
    let mut fwd = q[..12].to_vec();
    fwd.extend_from_slice(&[0xc0, 200, 0, 1, 0, 1]);
    drop_or(
        udp_outcome(l, &fwd),
        &[RCODE_FORMERR],
        "pointer past the end",
    );
    let mut long_label = q[..12].to_vec();
    long_label.push(64);
    long_label.extend_from_slice(&[b'a'; 64]);
    long_label.extend_from_slice(&[0, 0, 1, 0, 1]);
    drop_or(
        udp_outcome(l, &long_label),
        &[RCODE_FORMERR],
        "64-byte label",
    );
    let mut long_name = q[..12].to_vec();
    for _ in 0..5 {
        long_name.push(60);
        long_name.extend_from_slice(&[b'b'; 60]);
    }
    long_name.extend_from_slice(&[0, 0, 1, 0, 1]);
    drop_or(
        udp_outcome(l, &long_name),
        &[RCODE_FORMERR],
        "305-byte name",
    );
    // Over 512 bytes over UDP without EDNS: a query followed by 700 bytes of junk.
    let mut oversized = query_bytes(0x3333, "a.example.test", TYPE_A);
    oversized[11] = 0; // ARCOUNT 0: no OPT record
    oversized.extend(std::iter::repeat_n(0xab, 700));
    drop_or(
        udp_outcome(l, &oversized),
        &[RCODE_FORMERR, 0],
        "oversized UDP query",
    );
    // A response sent to the cache is never answered (no reflection loops).
    let mut response = query_bytes(0x4444, "a.example.test", TYPE_A);
    response[2] |= 0x80;
    assert_eq!(
        udp_outcome(l, &response),
        None,
        "a response must be dropped"
    );
    dropped += 1;

    // Strict ones: wrong opcode -> NOTIMP; QDCOUNT 0 or 2 -> FORMERR.
    for opcode in [1u8, 2, 4, 5, 15] {
        let mut m = query_bytes(0x5500 + u16::from(opcode), "a.example.test", TYPE_A);
        m[2] = (m[2] & 0x87) | (opcode << 3);
        assert_eq!(udp_outcome(l, &m), Some(RCODE_NOTIMP), "opcode {opcode}");
    }
    let mut none = query_bytes(0x6600, "a.example.test", TYPE_A);
    none[5] = 0;
    assert_eq!(
        udp_outcome(l, &none[..12]),
        Some(RCODE_FORMERR),
        "QDCOUNT 0"
    );
    let mut two = query_bytes(0x6601, "a.example.test", TYPE_A);
    two[5] = 2;
    let second = query_bytes(0, "b.example.test", TYPE_A);
    two.extend_from_slice(&second[12..]);
    assert_eq!(udp_outcome(l, &two), Some(RCODE_FORMERR), "QDCOUNT 2");

    // TCP: a frame announcing 65535 bytes followed by 70 KiB; a frame cut short; a zero frame.
    for (what, bytes) in [
        ("64 KiB frame then more", {
            let mut b = vec![0xff, 0xff];
            b.extend(std::iter::repeat_n(0x5a, 70 * 1024));
            b
        }),
        ("frame cut short", vec![0x01, 0x00, 0xde, 0xad]),
        ("zero-length frame", vec![0x00, 0x00]),
    ] {
        let mut s = TcpStream::connect(l).expect("connect over TCP");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        // The server answers FORMERR or closes; either way the read ends (no hang).
        let t = Instant::now();
        let _ = s.read_to_end(&mut sink);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{what}: the connection hung"
        );
    }

    assert!(rig.agent.proc.log_text().len() < 50 << 20);
    let counted = rig.malformed("dropped") - dropped_before;
    assert!(
        counted >= f64::from(dropped),
        "{dropped} datagrams got no reply, {counted} counted as dropped malformed"
    );
    let ok = rig.dig(&["a.example.test", "A"]);
    assert_eq!(
        ok.data("A"),
        vec!["192.0.2.1"],
        "still answers:\n{}",
        ok.raw
    );
}

#[test]
fn a_flood_of_garbage_is_counted_and_the_cache_keeps_answering_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let mut rig = Rig::start("", "");
    let pid = rig.agent.proc.pid();
    let rss_before = proc_status_kib(pid, "VmRSS").expect("VmRSS");
    let dropped_before = rig.metric(MALFORMED);
    // 50,000 datagrams of 0..1500 pseudo-random bytes, from 4 sockets, as fast as they go.
    let senders: Vec<_> = (0..4u64)
        .map(|t| {
            let target = rig.listen;
            std::thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut buf = [0u8; 1500];
                for _ in 0..12_500 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = (x % 1500) as usize;
                    for (i, b) in buf[..len].iter_mut().enumerate() {
                        *b = (x >> ((i % 8) * 8)) as u8 ^ i as u8;
                    }
                    // Half of them keep a plausible header so parsing goes past it.
                    if x & 1 == 0 && len >= 12 {
                        buf[2] = 0x01;
                        buf[4..6].copy_from_slice(&[0, 1]);
                    }
                    let _ = s.send_to(&buf[..len], target);
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    assert!(rig.agent.proc.alive(), "the agent survived:\n{}", rig.log());
    let ok = wait_for(Duration::from_secs(5), "an answer after the flood", || {
        let o = rig.dig(&["a.example.test", "A"]);
        (o.status() == "NOERROR").then_some(o)
    });
    assert_eq!(ok.data("A"), vec!["192.0.2.1"]);
    let counted = rig.metric(MALFORMED) - dropped_before;
    assert!(
        counted > 1000.0,
        "garbage is counted as dropped malformed: {counted}"
    );
    let rss_after = proc_status_kib(pid, "VmRSS").expect("VmRSS");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

// === load ===

#[test]
fn ten_thousand_distinct_names_keep_the_cache_and_memory_bounded_as_root() {
    if !tools() || !require_tool("dnsperf") {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    const MAX_ENTRIES: f64 = 1000.0;
    const MAX_BYTES: f64 = 256.0 * 1024.0;
    let rig = Rig::start("maxEntries: 1000\nmaxBytes: 262144", "");
    let pid = rig.agent.proc.pid();
    let names = (0..10_000).map(|i| format!("n{i}.wild.example.test A"));
    let file = dns_peers::write_query_file(rig.agent.dir.path(), "names.txt", names);
    // Sample the cache size on /metrics while dnsperf runs.
    let metrics = rig.agent.metrics;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut max_entries, mut max_bytes, mut samples) = (0f64, 0f64, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((200, text)) = nodekeeper_tests::http_get(metrics, "/metrics") {
                    max_entries = max_entries.max(metric_sum(&text, ENTRIES));
                    max_bytes = max_bytes.max(metric_sum(&text, CACHE_BYTES));
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (max_entries, max_bytes, samples)
        })
    };
    let out = Command::new("dnsperf")
        .args([
            "-s",
            &rig.listen.ip().to_string(),
            "-p",
            &rig.listen.port().to_string(),
        ])
        .arg("-d")
        .arg(&file)
        .args(["-n", "1", "-c", "20", "-q", "1000", "-t", "5", "-l", "60"])
        .output()
        .expect("run dnsperf");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max_entries, max_bytes, samples) = sampler.join().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dnsperf failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let completed: u64 = report
        .lines()
        .find(|l| l.trim_start().starts_with("Queries completed:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'Queries completed' in:\n{report}"));
    assert!(
        completed >= 9_900,
        "10k distinct names answered (some loss allowed under load):\n{report}"
    );
    assert!(report.contains("NOERROR"), "{report}");
    assert!(samples > 0, "the cache size was sampled");
    assert!(
        max_entries > 0.0 && max_entries <= MAX_ENTRIES,
        "cache entries peaked at {max_entries}"
    );
    assert!(max_bytes <= MAX_BYTES, "cache bytes peaked at {max_bytes}");
    let text = rig.agent.metrics_text();
    assert!(metric_sum(&text, ENTRIES) <= MAX_ENTRIES);
    assert!(
        metric_sum(&text, MISSES) >= 9_900.0,
        "every distinct name was a miss"
    );
    let hwm = proc_status_kib(pid, "VmHWM").expect("VmHWM");
    assert!(hwm < 128 * 1024, "peak RSS {hwm} KiB with a 256 KiB cache");
    let ok = rig.dig(&["a.example.test", "A"]);
    assert_eq!(ok.data("A"), vec!["192.0.2.1"]);
}

// === CLI and health ===

#[test]
fn dns_status_prints_cache_size_hit_ratio_and_upstream_health_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns");
    let mut rig = Rig::start("", "");
    for _ in 0..3 {
        rig.dig(&["a.example.test", "A"]);
    }
    let status = || {
        let out = Command::new(agent_bin())
            .args(["dns", "status", &rig.agent.api.to_string()])
            .output()
            .expect("run nodekeeper dns status");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "dns status failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let text = status();
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("cache"), "{text}");
    assert!(lower.contains("hit"), "{text}");
    for up in [rig.default.addr, rig.cluster.addr, rig.stub.addr] {
        assert!(
            text.contains(&up.to_string()),
            "upstream {up} listed:\n{text}"
        );
    }
    let (code, body) = nodekeeper_tests::http_get(rig.agent.metrics, "/readyz").unwrap();
    assert_eq!(
        code, 200,
        "the dns capability is ready with its upstreams up: {body}"
    );
    // Every upstream down: /readyz reports the dns capability unhealthy.
    rig.default.stop();
    rig.cluster.stop();
    let _ = rig.stub.proc.child.kill();
    for i in 0..5 {
        rig.dig(&["+time=3", &format!("down{i}.wild.example.test"), "A"]);
    }
    wait_for(
        Duration::from_secs(30),
        "/readyz to report dns unhealthy",
        || {
            let (code, _) = nodekeeper_tests::http_get(rig.agent.metrics, "/readyz").ok()?;
            (code != 200).then_some(())
        },
    );
}
