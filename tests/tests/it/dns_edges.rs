//! The DNS cache at the edges where one node-wide cache serves many pods (issue #22): per-client
//! CD/AD/EDNS state, serve-stale when the upstream *answers* with a failure, and lost datagrams.
//! The agent binary runs as a cache in front of a scripted upstream: a UDP server in this test
//! process that answers like a validating resolver (SERVFAIL for a bogus name unless CD is set,
//! AD only when asked with AD or DO), echoes DNS cookies like a cookie-aware server, and can be
//! switched to SERVFAIL, REFUSED or dropping datagrams. Clients are `dig` (+cd, +adflag,
//! +cookie).
//!
//! Each test runs inside a network namespace of its own (`Netns::enter_fresh`), so the
//! upstream, the agent and dig live on that namespace's loopback; every test needs root and
//! says so in its name (`ip` and `dig` from tests/scripts/install-deps).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_tests::dns_peers::{DigOutput, Upstreams, agent_dns_config, dig, free_dns_addr};
use nodekeeper_tests::netns_pods::Netns;
use nodekeeper_tests::{Agent, require_root, require_tool, wait_for};

fn tools() -> bool {
    require_root() && require_tool("ip") && require_tool("dig")
}

// === the scripted upstream ===

/// A query the scripted upstream received: its name and bytes.
type Received = (String, Vec<u8>);

/// What the scripted upstream does with every query while set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Answer = 0,
    ServFail = 2,
    Refused = 5,
}

/// A UDP DNS server on its own thread, answering A queries as described in the module doc.
/// Names starting with `bogus` fail validation; names starting with `signed` validate; names
/// whose first label is a number get that TTL (else 300). Every query is counted by name.
struct Scripted {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Drop this many of the next datagrams without answering.
    drop_next: Arc<AtomicU32>,
    /// Answer every query this many milliseconds late (a slow upstream, not a failing one).
    delay_ms: Arc<AtomicU32>,
    /// The last byte of the address in A answers (192.0.2.x), to tell answers apart.
    address: Arc<AtomicU8>,
    log: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl Scripted {
    fn start() -> Scripted {
        let addr = free_dns_addr();
        let sock = UdpSocket::bind(addr).expect("bind the scripted upstream");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let s = Scripted {
            addr,
            mode: Arc::new(AtomicU8::new(Mode::Answer as u8)),
            drop_next: Arc::default(),
            delay_ms: Arc::default(),
            address: Arc::new(AtomicU8::new(66)),
            log: Arc::default(),
            stop: Arc::default(),
        };
        let (mode, drop_next, delay_ms, address, log, stop) = (
            s.mode.clone(),
            s.drop_next.clone(),
            s.delay_ms.clone(),
            s.address.clone(),
            s.log.clone(),
            s.stop.clone(),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let q = &buf[..n];
                let Some(name) = qname(q) else { continue };
                log.lock().unwrap().push((name.clone(), q.to_vec()));
                if drop_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
                    .is_ok()
                {
                    continue;
                }
                let answer = respond(
                    q,
                    &name,
                    mode.load(Ordering::SeqCst),
                    address.load(Ordering::SeqCst),
                );
                match delay_ms.load(Ordering::SeqCst) {
                    0 => {
                        let _ = sock.send_to(&answer, peer);
                    }
                    // Late, from a thread of its own: the other queries are not held up.
                    ms => {
                        let late = sock.try_clone().expect("clone the upstream socket");
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(u64::from(ms)));
                            let _ = late.send_to(&answer, peer);
                        });
                    }
                }
            }
        });
        s
    }

    fn set_mode(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::SeqCst);
    }

    fn queries_for(&self, name: &str) -> Vec<Vec<u8>> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, q)| q.clone())
            .collect()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The question name of a query, lower case, no trailing dot.
fn qname(q: &[u8]) -> Option<String> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(i)?);
        if len == 0 {
            return Some(labels.join("."));
        }
        labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
        i += 1 + len;
    }
}

/// The OPT record of a query: (start of its RDATA, RDLEN). Assumes it is the last record.
fn query_opt(q: &[u8]) -> Option<(usize, usize)> {
    if q[11] == 0 {
        return None;
    }
    let mut i = 12;
    while q[i] != 0 {
        i += 1 + usize::from(q[i]);
    }
    let opt = i + 1 + 4; // root label of the question, type, class
    let rdlen = usize::from(u16::from_be_bytes([q[opt + 9], q[opt + 10]]));
    Some((opt + 11, rdlen))
}

/// The client cookie (8 bytes) of a query's COOKIE option, if any.
fn client_cookie(q: &[u8]) -> Option<Vec<u8>> {
    let (mut i, len) = query_opt(q)?;
    let end = i + len;
    while i + 4 <= end {
        let code = u16::from_be_bytes([q[i], q[i + 1]]);
        let olen = usize::from(u16::from_be_bytes([q[i + 2], q[i + 3]]));
        if code == 10 && olen >= 8 {
            return Some(q[i + 4..i + 12].to_vec());
        }
        i += 4 + olen;
    }
    None
}

fn respond(q: &[u8], name: &str, mode: u8, address: u8) -> Vec<u8> {
    let (ad_asked, cd) = (q[3] & 0x20 != 0, q[3] & 0x10 != 0);
    let opt = query_opt(q);
    let do_bit = opt.is_some_and(|(rdata, _)| q[rdata - 5] & 0x80 != 0);
    let question_end = {
        let mut i = 12;
        while q[i] != 0 {
            i += 1 + usize::from(q[i]);
        }
        i + 5
    };
    let mut r = q[..question_end].to_vec();
    r[2] = 0x84 | (q[2] & 0x01); // QR, AA (an authoritative-looking upstream), RD echoed
    let mut rcode = mode;
    if mode == Mode::Answer as u8 && name.starts_with("bogus") && !cd {
        rcode = Mode::ServFail as u8;
    }
    let ad = rcode == 0 && name.starts_with("signed") && (ad_asked || do_bit);
    r[3] = 0x80 | if ad { 0x20 } else { 0 } | if cd { 0x10 } else { 0 } | rcode;
    let (poison, looped) = (name.starts_with("poison"), name.starts_with("loop"));
    let answers = u16::from(rcode == 0) * if poison || looped { 2 } else { 1 };
    r[6..8].copy_from_slice(&answers.to_be_bytes());
    r[8..10].copy_from_slice(&[0, 0]);
    r[10..12].copy_from_slice(&u16::from(opt.is_some()).to_be_bytes());
    if rcode == 0 {
        let ttl: u32 = name
            .split('.')
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(300);
        if looped {
            // name CNAME x.loop.test, x.loop.test CNAME name.
            let target = b"\x01x\x04loop\x04test\x00";
            r.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&(target.len() as u16).to_be_bytes());
            let x = r.len();
            r.extend_from_slice(target);
            r.extend_from_slice(&[0xC0, x as u8, 0, 5, 0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&[0, 2, 0xC0, 12]);
        } else {
            r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&[0, 4, 192, 0, 2, address]);
        }
        if poison {
            // A record for a name nobody asked about.
            r.extend_from_slice(b"\x06victim\x04test\x00");
            r.extend_from_slice(&[0, 1, 0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&[0, 4, 192, 0, 2, 6]);
        }
    }
    if opt.is_some() {
        // Our OPT; a cookie-aware server echoes the client cookie with a server cookie.
        let cookie = client_cookie(q);
        let rdlen = cookie.as_ref().map_or(0u16, |_| 4 + 16);
        r.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0]);
        r.extend_from_slice(&rdlen.to_be_bytes());
        if let Some(c) = cookie {
            r.extend_from_slice(&[0, 10, 0, 16]);
            r.extend_from_slice(&c);
            r.extend_from_slice(&[0x5e; 8]);
        }
    }
    r
}

// === the cache ===

/// The agent as a cache on its own address forwarding only to `upstream` (UDP).
fn cache(upstream: &Scripted, cache_yaml: &str, extra_yaml: &str) -> (SocketAddr, Agent) {
    let listen = free_dns_addr();
    let up = Upstreams {
        default: Some(upstream.addr),
        ..Default::default()
    };
    let agent = Agent::builder()
        .config(&agent_dns_config(listen, &up, cache_yaml, extra_yaml))
        .start();
    wait_for(Duration::from_secs(10), "the cache answers", || {
        (dig(listen, &["ready.test", "A"]).status() == "NOERROR").then_some(())
    });
    (listen, agent)
}

fn check(o: &DigOutput, status: &str, agent: &Agent) {
    assert_eq!(
        o.status(),
        status,
        "{}\nagent log:\n{}",
        o.raw,
        agent.proc.log_text()
    );
}

// === per-client state ===

#[test]
fn cd_is_keyed_and_copied_ad_is_per_client_and_aa_is_cleared_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns-edges");
    let up = Scripted::start();
    let (listen, agent) = cache(&up, "", "");

    // A CD=1 asker gets the unvalidated answer (with CD), and it does not switch off
    // validation for the CD=0 askers after it.
    let cd = dig(listen, &["+cd", "bogus.test", "A"]);
    check(&cd, "NOERROR", &agent);
    assert!(cd.has_flag("cd"), "CD copied: {:?}", cd.flags);
    let plain = dig(listen, &["bogus.test", "A"]);
    check(&plain, "SERVFAIL", &agent);
    assert!(!plain.has_flag("cd"));
    let again = dig(listen, &["+cd", "bogus.test", "A"]);
    check(&again, "NOERROR", &agent);
    assert_eq!(
        up.queries_for("bogus.test").len(),
        2,
        "one upstream query per CD value, the third from the cache"
    );

    // AD: the first asker does not ask for it; a later one with +adflag gets it from the
    // cache, one without does not, and AA never comes from a cache.
    let no_ad = dig(listen, &["+noadflag", "signed.test", "A"]);
    check(&no_ad, "NOERROR", &agent);
    assert!(!no_ad.has_flag("ad"), "{:?}", no_ad.flags);
    let ad = dig(listen, &["+adflag", "signed.test", "A"]);
    assert!(
        ad.has_flag("ad"),
        "validated answer, client asked: {:?}",
        ad.flags
    );
    assert_eq!(
        up.queries_for("signed.test").len(),
        1,
        "answered from the cache"
    );
    let dnssec = dig(listen, &["+noadflag", "+dnssec", "signed.test", "A"]);
    assert!(
        dnssec.has_flag("ad"),
        "DO asks for AD too: {:?}",
        dnssec.flags
    );
    let unsigned = dig(listen, &["+adflag", "plain.test", "A"]);
    assert!(!unsigned.has_flag("ad"), "{:?}", unsigned.flags);
    for o in [&cd, &no_ad, &ad, &unsigned] {
        assert!(!o.has_flag("aa"), "AA cleared: {:?}", o.flags);
    }
}

#[test]
fn client_cookies_are_never_forwarded_nor_served_to_other_clients_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns-edges");
    let up = Scripted::start();
    let (listen, agent) = cache(&up, "", "");
    let first = dig(listen, &["+cookie=1111111111111111", "cookie.test", "A"]);
    check(&first, "NOERROR", &agent);
    let second = dig(listen, &["+cookie=2222222222222222", "cookie.test", "A"]);
    check(&second, "NOERROR", &agent);
    for o in [&first, &second] {
        assert!(!o.raw.to_lowercase().contains("mismatch"), "{}", o.raw);
        assert!(
            !o.raw.contains("5e5e5e5e"),
            "upstream's server cookie: {}",
            o.raw
        );
    }
    assert!(!second.raw.contains("1111111111111111"), "{}", second.raw);
    let sent = up.queries_for("cookie.test");
    assert_eq!(sent.len(), 1, "the second from the cache");
    assert_eq!(client_cookie(&sent[0]), None, "no client cookie upstream");
    assert_eq!(
        query_opt(&sent[0]).map(|o| o.1),
        Some(0),
        "our own OPT, no options"
    );
}

// === serve-stale ===

#[test]
fn servfail_and_refused_serve_stale_and_the_next_asker_gets_it_at_once_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns-edges");
    let up = Scripted::start();
    let (listen, agent) = cache(
        &up,
        "maxTtl: 1s\nserveStale: true\nstaleTtl: 30s\nmaxStale: 1h\nprefetch: false",
        "",
    );
    for (mode, name) in [(Mode::ServFail, "sf.test"), (Mode::Refused, "rf.test")] {
        up.set_mode(Mode::Answer);
        check(&dig(listen, &[name, "A"]), "NOERROR", &agent);
        std::thread::sleep(Duration::from_millis(1500));
        up.set_mode(mode);
        let stale = dig(listen, &[name, "A"]);
        check(&stale, "NOERROR", &agent);
        assert_eq!(stale.data("A"), vec!["192.0.2.66"]);
        assert_eq!(stale.answer[0].ttl, 30, "staleTtl: {}", stale.raw);
        let asked = up.queries_for(name).len();
        // The failure did not replace the entry, and the next asker does not wait for the
        // upstream again (failure recheck).
        let next = dig(listen, &[name, "A"]);
        check(&next, "NOERROR", &agent);
        assert_eq!(
            up.queries_for(name).len(),
            asked,
            "{mode:?}: not asked again"
        );
    }
    // Without a stale entry the failure reaches the client.
    up.set_mode(Mode::ServFail);
    check(&dig(listen, &["never.test", "A"]), "SERVFAIL", &agent);
    up.set_mode(Mode::Refused);
    check(&dig(listen, &["never2.test", "A"]), "REFUSED", &agent);
}

#[test]
fn a_slow_upstream_gets_the_client_stale_data_after_the_client_timer_and_the_refresh_lands_as_root()
{
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns-edges");
    let up = Scripted::start();
    // Timer 300 ms; the upstream will take 1.2 s, within the 3 s dns.timeout (slow, not failed).
    let (listen, agent) = cache(
        &up,
        "maxTtl: 30s\nserveStale: true\nstaleTtl: 30s\nprefetch: false\n\
         staleAnswerClientTimeout: 300ms",
        "timeout: 3s",
    );
    // TTL 2 (the name's first label): warm, then let it expire.
    let name = "2.slow.test";
    let warm = dig(listen, &[name, "A"]);
    check(&warm, "NOERROR", &agent);
    assert_eq!(warm.data("A"), vec!["192.0.2.66"]);
    std::thread::sleep(Duration::from_millis(2500));

    up.address.store(77, Ordering::SeqCst);
    up.delay_ms.store(1200, Ordering::SeqCst);
    let stale = dig(listen, &[name, "A"]);
    check(&stale, "NOERROR", &agent);
    assert_eq!(
        stale.data("A"),
        vec!["192.0.2.66"],
        "the stale answer, not the slow refresh: {}",
        stale.raw
    );
    assert_eq!(stale.answer[0].ttl, 30, "staleTtl: {}", stale.raw);
    // Sent, and retransmitted while slow (the RTO is far below 1.2 s).
    assert!(up.queries_for(name).len() >= 2, "the refresh was sent");

    // The refresh was not abandoned with the client: once the upstream answers, the new
    // address is in the cache (TTL 2), served without another upstream query.
    up.delay_ms.store(0, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1600));
    let sent = up.queries_for(name).len();
    let fresh = dig(listen, &[name, "A"]);
    check(&fresh, "NOERROR", &agent);
    assert_eq!(fresh.data("A"), vec!["192.0.2.77"], "{}", fresh.raw);
    assert!(fresh.answer[0].ttl <= 2, "{}", fresh.raw);
    assert_eq!(up.queries_for(name).len(), sent, "from the cache");
}

// === scrubbing ===

#[test]
fn records_for_unrelated_owners_are_not_served_and_cname_loops_are_not_cached_as_root() {
    if !tools() {
        return;
    }
    let _netns = Netns::enter_fresh("dns-edges");
    let up = Scripted::start();
    let (listen, agent) = cache(&up, "", "");
    for _ in 0..2 {
        let o = dig(listen, &["poison.test", "A"]);
        check(&o, "NOERROR", &agent);
        assert_eq!(o.data("A"), vec!["192.0.2.66"], "{}", o.raw);
        assert!(
            !o.raw.contains("victim"),
            "unrelated owner served: {}",
            o.raw
        );
    }
    assert_eq!(
        up.queries_for("poison.test").len(),
        1,
        "scrubbed, then cached"
    );

    for _ in 0..2 {
        let o = dig(listen, &["loop.test", "A"]);
        check(&o, "NOERROR", &agent);
        assert_eq!(
            o.data("CNAME"),
            vec!["x.loop.test.", "loop.test."],
            "{}",
            o.raw
        );
    }
    assert_eq!(
        up.queries_for("loop.test").len(),
        2,
        "a CNAME loop is passed on, never cached"
    );
}
