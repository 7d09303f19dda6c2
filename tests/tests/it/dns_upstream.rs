//! The upstream forwarder (`nodekeeper::dns::upstream::Forwarder`) against real DNS servers
//! started by each test on its own 127.0.0.x address and a free high port (never port 53, never
//! the host's resolver): dnsmasq (UDP answers, TC at 512 bytes, failover, health) and unbound
//! (a TCP-only group, pipelined out of order over one connection), plus tiny in-test UDP
//! responders that answer with the wrong ID or question, as a spoofer would.
//!
//! Each test runs inside a network namespace of its own (`Netns::enter_fresh` moves the test
//! thread in; `#[tokio::test]`'s runtime runs on that thread, so the forwarder's sockets, the
//! servers and `ss` are all in the namespace, on its loopback). So every test needs root and
//! says so in its name; `dnsmasq`, `unbound` and `ss` come from tests/scripts/install-deps.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use nodekeeper::config::ConfigDuration;
use nodekeeper::dns::DnsConfig;
use nodekeeper::dns::config::UpstreamProtocol;
use nodekeeper::dns::upstream::{Forwarder, UpstreamError, UpstreamStatus};
use nodekeeper::host::HostPaths;
use nodekeeper_tests::netns_pods::Netns;
use nodekeeper_tests::{Proc, require_root, require_tool, sample};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Every test's bound: each is designed to take well under a second or two.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a started server may take to answer its first query.
const SERVER_START: Duration = Duration::from_secs(5);

// === fixtures ===

/// Root (each test runs in a network namespace of its own), `ip` and `tools`.
fn can_run(tools: &[&str]) -> bool {
    require_root() && require_tool("ip") && tools.iter().all(|t| require_tool(t))
}

/// A port free for both UDP and TCP on `ip`.
fn free_port_on(ip: &str) -> u16 {
    loop {
        let tcp = TcpListener::bind((ip, 0)).expect("bind tcp");
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// A query without EDNS (so a UDP answer is limited to 512 bytes).
fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 7;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn a_records(answer: &[u8]) -> Vec<String> {
    let m = Message::from_vec(answer).expect("answer decodes");
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.to_string()),
            _ => None,
        })
        .collect()
}

/// Waits until a UDP query to `server` gets any answer.
fn wait_answering(server: SocketAddr, proc: &Proc) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let q = query("ready.test.", RecordType::A);
    let started = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        let _ = sock.send_to(&q, server);
        if nodekeeper_tests::uninterrupted(|| sock.recv_from(&mut buf)).is_ok() {
            return;
        }
        assert!(
            started.elapsed() < SERVER_START,
            "{} at {server} did not answer within {SERVER_START:?}; log:\n{}",
            proc.name,
            proc.log_text()
        );
    }
}

/// dnsmasq serving only its command line's records on `server` (no resolv.conf, no hosts, no
/// upstream: other names are REFUSED).
fn dnsmasq(server: SocketAddr, dir: &Path, records: &[String]) -> Proc {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--log-queries",
        "--log-facility=-",
    ])
    .arg(format!("--listen-address={}", server.ip()))
    .arg(format!("--port={}", server.port()))
    .args(records);
    let p = Proc::spawn(&format!("dnsmasq-{}", server.port()), cmd, dir);
    wait_answering(server, &p);
    p
}

/// unbound with a static zone `cluster.test` holding `n1..=n<names>.cluster.test` A records.
fn unbound(server: SocketAddr, dir: &Path, names: usize) -> Proc {
    let mut conf = format!(
        "server:\n  interface: {ip}@{port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  \
         directory: \"{dir}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 1\n  \
         log-queries: yes\n  access-control: 127.0.0.0/8 allow\n  do-ip6: no\n  num-threads: 1\n  \
         so-reuseport: no\n  module-config: \"iterator\"\n  local-zone: \"cluster.test.\" static\n  \
         local-data: \"cluster.test. 300 IN SOA ns.cluster.test. host.cluster.test. 1 3600 600 86400 30\"\n",
        ip = server.ip(),
        port = server.port(),
        dir = dir.display()
    );
    for i in 1..=names {
        conf.push_str(&format!(
            "  local-data: \"n{i}.cluster.test. 300 IN A 10.2.{}.{}\"\n",
            i / 256,
            i % 256
        ));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    let path = dir.join("unbound.conf");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new("unbound");
    cmd.arg("-d").arg("-c").arg(&path);
    let p = Proc::spawn("unbound", cmd, dir);
    wait_answering(server, &p);
    p
}

/// Test config: the given default servers, a short timeout, the cluster zone `cluster.test`.
fn config(default: &[SocketAddr], timeout_ms: u64) -> DnsConfig {
    let mut c = DnsConfig::default();
    c.upstreams.default.servers = default.iter().map(|a| a.to_string()).collect();
    c.upstreams.cluster_zones = vec!["cluster.test".into()];
    c.timeout = ConfigDuration(Duration::from_millis(timeout_ms));
    c
}

struct Fwd {
    fwd: Arc<Forwarder>,
    registry: Registry,
    _root: tempfile::TempDir,
}

impl Fwd {
    fn new(config: &DnsConfig) -> Fwd {
        let problems = config.problems();
        assert!(problems.is_empty(), "{problems:?}");
        // A host root whose resolv.conf is never used (every test names its servers).
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/resolv.conf"),
            "nameserver 192.0.2.1\n",
        )
        .unwrap();
        let mut registry = Registry::default();
        let fwd = Forwarder::new(config, &HostPaths::under(root.path()), &mut registry)
            .expect("forwarder builds");
        Fwd {
            fwd,
            registry,
            _root: root,
        }
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    fn status(&self, server: SocketAddr) -> UpstreamStatus {
        self.fwd
            .status()
            .into_iter()
            .find(|s| s.address == server)
            .unwrap_or_else(|| panic!("{server} is not in {:?}", self.fwd.status()))
    }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its bound")
}

// === tests ===

#[tokio::test]
async fn udp_answers_with_randomized_case_and_stub_domains_as_root() {
    if !can_run(&["dnsmasq"]) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-up");
    let dir = tempfile::tempdir().unwrap();
    let main = addr("127.0.0.101", free_port_on("127.0.0.101"));
    let stub = addr("127.0.0.102", free_port_on("127.0.0.102"));
    let _main = dnsmasq(
        main,
        dir.path(),
        &[
            "--address=/a.test/10.0.0.1".into(),
            "--address=/corp.test/10.0.0.8".into(),
        ],
    );
    let _stub = dnsmasq(stub, dir.path(), &["--address=/corp.test/10.0.0.9".into()]);
    let mut c = config(&[main], 1000);
    c.randomize_case = true;
    c.upstreams
        .stub_domains
        .insert("corp.test".into(), vec![stub.to_string()]);
    let f = Fwd::new(&c);

    bounded(async {
        let answer = f
            .fwd
            .forward(&query("www.a.test.", RecordType::A), "www.a.test")
            .await
            .unwrap();
        assert_eq!(a_records(&answer), vec!["10.0.0.1"]);
        // The answer's question is what went upstream: same name, case randomised (0x20).
        let m = Message::from_vec(&answer).unwrap();
        assert_eq!(m.queries[0].name().to_ascii().to_lowercase(), "www.a.test.");

        let answer = f
            .fwd
            .forward(&query("host.corp.test.", RecordType::A), "host.corp.test")
            .await
            .unwrap();
        assert_eq!(a_records(&answer), vec!["10.0.0.9"], "stub domain's server");
    })
    .await;

    let s = f.status(main);
    assert_eq!((s.group.as_str(), s.queries, s.failures), ("default", 1, 0));
    assert_eq!(f.status(stub).group, "corp.test");
    let text = f.metrics();
    let labels = [("upstream", main.to_string()), ("protocol", "udp".into())];
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        sample(
            &text,
            "dns_upstream_request_duration_seconds_count",
            &labels
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "dns_upstream_healthy",
            &[("upstream", &main.to_string())]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn tcp_only_group_pipelines_many_queries_over_one_connection_as_root() {
    if !can_run(&["unbound", "ss"]) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-up");
    const QUERIES: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = addr("127.0.0.103", free_port_on("127.0.0.103"));
    let ub = unbound(server, dir.path(), QUERIES);
    let mut c = config(&[addr("192.0.2.1", 53)], 2000);
    c.upstreams.cluster.servers = vec![server.to_string()];
    c.upstreams.cluster.protocol = Some(UpstreamProtocol::Tcp);
    let f = Fwd::new(&c);

    let answers = bounded(futures::future::join_all((1..=QUERIES).map(|i| {
        let fwd = f.fwd.clone();
        async move {
            let name = format!("n{i}.cluster.test");
            let a = fwd
                .forward(&query(&format!("{name}."), RecordType::A), &name)
                .await;
            (i, a)
        }
    })))
    .await;
    for (i, a) in answers {
        let a = a.unwrap_or_else(|e| panic!("n{i}: {e}"));
        assert_eq!(a_records(&a), vec![format!("10.2.{}.{}", i / 256, i % 256)]);
    }

    // One established connection from us to the server, all queries on it.
    let ss = Command::new("ss")
        .args(["-Htn", "state", "established", "dst", &server.to_string()])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert_eq!(ss.lines().count(), 1, "connections to {server}:\n{ss}");
    let s = f.status(server);
    assert_eq!(
        (s.group.as_str(), s.protocol, s.queries, s.failures),
        ("cluster", UpstreamProtocol::Tcp, QUERIES as u64, 0)
    );
    let text = f.metrics();
    let up = server.to_string();
    assert_eq!(
        sample(
            &text,
            "dns_upstream_request_duration_seconds_count",
            &[("upstream", &up), ("protocol", "tcp")]
        ),
        Some(QUERIES as f64)
    );
    assert_eq!(
        sample(
            &text,
            "dns_upstream_tcp_reconnects_total",
            &[("upstream", &up)]
        ),
        Some(0.0),
        "no reconnect was counted:\n{text}"
    );
    let log = ub.log_text();
    assert_eq!(log.matches(".cluster.test. A IN").count(), QUERIES, "{log}");
}

#[tokio::test]
async fn truncated_udp_answer_is_retried_over_tcp_as_root() {
    if !can_run(&["dnsmasq"]) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-up");
    let dir = tempfile::tempdir().unwrap();
    let server = addr("127.0.0.104", free_port_on("127.0.0.104"));
    // 60 A records: 986 bytes, over the 512 a query without EDNS may get over UDP.
    let records: Vec<String> = (1..=60)
        .map(|i| format!("--host-record=big.test,10.0.1.{i}"))
        .collect();
    let _dm = dnsmasq(server, dir.path(), &records);
    let f = Fwd::new(&config(&[server], 1000));

    let answer = bounded(
        f.fwd
            .forward(&query("big.test.", RecordType::A), "big.test"),
    )
    .await
    .unwrap();
    let m = Message::from_vec(&answer).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 60);
    let text = f.metrics();
    let up = server.to_string();
    for protocol in ["udp", "tcp"] {
        assert_eq!(
            sample(
                &text,
                "dns_upstream_request_duration_seconds_count",
                &[("upstream", &up), ("protocol", protocol)]
            ),
            Some(1.0),
            "{protocol}: {text}"
        );
    }
}

#[tokio::test]
async fn dead_and_silent_servers_fail_over_to_a_live_one_within_the_timeout_as_root() {
    if !can_run(&["dnsmasq"]) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-up");
    let dir = tempfile::tempdir().unwrap();
    // A closed port (ICMP port unreachable: refused at once) and a socket that never answers.
    let dead = addr("127.0.0.105", free_port_on("127.0.0.105"));
    let silent_sock = UdpSocket::bind("127.0.0.106:0").unwrap();
    let silent = silent_sock.local_addr().unwrap();
    let live = addr("127.0.0.107", free_port_on("127.0.0.107"));
    let _dm = dnsmasq(live, dir.path(), &["--address=/a.test/10.0.0.1".into()]);
    const TIMEOUT_MS: u64 = 300;
    let f = Fwd::new(&config(&[dead, silent, live], TIMEOUT_MS));

    let started = Instant::now();
    let answer = bounded(f.fwd.forward(&query("a.test.", RecordType::A), "a.test"))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(a_records(&answer), vec!["10.0.0.1"]);
    // The silent server waits its share of the budget (half: the live one is still to be
    // asked), and the whole query stays within dns.timeout.
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS / 2)
            && took < Duration::from_millis(TIMEOUT_MS + 200),
        "one timeout (the silent server) and one refusal: {took:?}"
    );
    let (d, s, l) = (f.status(dead), f.status(silent), f.status(live));
    assert_eq!((d.failures, s.failures, l.failures), (1, 1, 0));
    assert!(
        d.last_error.unwrap().contains("refused"),
        "dead: closed port"
    );
    assert!(s.last_error.unwrap().contains("did not answer in time"));
    let text = f.metrics();
    assert_eq!(
        sample(
            &text,
            "dns_upstream_failures_total",
            &[("upstream", &dead.to_string()), ("reason", "io")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "dns_upstream_failures_total",
            &[("upstream", &silent.to_string()), ("reason", "timeout")]
        ),
        Some(1.0)
    );
    // One failure each is below unhealthyAfter (3): all still healthy.
    assert!(f.fwd.status().iter().all(|s| s.healthy));
}

#[tokio::test]
async fn unhealthy_server_is_skipped_then_probed_back_as_root() {
    if !can_run(&["dnsmasq"]) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-up");
    let dir = tempfile::tempdir().unwrap();
    let first = addr("127.0.0.108", free_port_on("127.0.0.108"));
    let second = addr("127.0.0.109", free_port_on("127.0.0.109"));
    let _second = dnsmasq(second, dir.path(), &["--address=/a.test/10.0.0.2".into()]);
    let mut c = config(&[first, second], 500);
    c.upstreams.unhealthy_after = 2;
    c.upstreams.probe_interval = ConfigDuration(Duration::from_millis(200));
    let f = Fwd::new(&c);
    let q = query("a.test.", RecordType::A);

    bounded(async {
        for _ in 0..2 {
            let a = f.fwd.forward(&q, "a.test").await.unwrap();
            assert_eq!(a_records(&a), vec!["10.0.0.2"]);
        }
        let s = f.status(first);
        assert!(!s.healthy, "{s:?}");
        assert_eq!((s.consecutive_failures, s.queries), (2, 2));
        assert!(f.fwd.any_healthy());
        let text = f.metrics();
        assert_eq!(
            sample(
                &text,
                "dns_upstream_healthy",
                &[("upstream", &first.to_string())]
            ),
            Some(0.0)
        );

        // Skipped while the other is healthy.
        f.fwd.forward(&q, "a.test").await.unwrap();
        assert_eq!(f.status(first).queries, 2);
        assert_eq!(f.status(second).queries, 3);

        // It comes back: probes (`. NS`, which dnsmasq REFUSES: any valid answer counts).
        let token = CancellationToken::new();
        let probes = tokio::spawn(f.fwd.clone().run_probes(token.clone()));
        let _first = dnsmasq(first, dir.path(), &["--address=/a.test/10.0.0.1".into()]);
        let started = Instant::now();
        while !f.status(first).healthy {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "not probed back: {:?}",
                f.status(first)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let a = f.fwd.forward(&q, "a.test").await.unwrap();
        assert_eq!(
            a_records(&a),
            vec!["10.0.0.1"],
            "the first server is used again"
        );
        assert_eq!(
            sample(
                &f.metrics(),
                "dns_upstream_healthy",
                &[("upstream", &first.to_string())]
            ),
            Some(1.0)
        );
        token.cancel();
        probes.await.unwrap();
    })
    .await;
}

/// How a fake upstream mangles its answers.
#[derive(Clone, Copy)]
enum Spoof {
    /// Answer with ID + 1 only.
    WrongId,
    /// First a datagram with the wrong ID, then the real answer (a spoofer racing the server).
    WrongIdThenRight,
    /// Right ID, another name in the question.
    WrongQuestion,
    /// Right ID and question, QR unset.
    NoQr,
}

/// A UDP responder on `ip` answering every query (NOERROR, no records) mangled as `spoof` says.
async fn fake_upstream(ip: &str, spoof: Spoof) -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
    let at = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let mut answer = buf[..n].to_vec();
            answer[2] |= 0x80;
            let id = u16::from_be_bytes([answer[0], answer[1]]);
            let mut wrong = answer.clone();
            wrong[..2].copy_from_slice(&id.wrapping_add(1).to_be_bytes());
            match spoof {
                Spoof::WrongId => {
                    let _ = sock.send_to(&wrong, from).await;
                }
                Spoof::WrongIdThenRight => {
                    let _ = sock.send_to(&wrong, from).await;
                    let _ = sock.send_to(&answer, from).await;
                }
                Spoof::WrongQuestion => {
                    answer[13] ^= 0x01; // first letter of the name: 'a' -> 'b'
                    let _ = sock.send_to(&answer, from).await;
                }
                Spoof::NoQr => {
                    answer[2] &= 0x7f;
                    let _ = sock.send_to(&answer, from).await;
                }
            }
        }
    });
    at
}

#[tokio::test]
async fn answers_with_wrong_id_question_or_qr_are_rejected_as_root() {
    if !can_run(&[]) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-up");
    let cases = [
        (Spoof::WrongId, "127.0.0.110", "another query's ID", "id"),
        (
            Spoof::WrongQuestion,
            "127.0.0.111",
            "question is not the one sent",
            "question",
        ),
        (Spoof::NoQr, "127.0.0.112", "QR set", "qr"),
    ];
    for (spoof, ip, why, reason) in cases {
        let server = fake_upstream(ip, spoof).await;
        let mut c = config(&[server], 200);
        c.upstreams.unhealthy_after = 1;
        let f = Fwd::new(&c);
        let e = bounded(f.fwd.forward(&query("a.test.", RecordType::A), "a.test"))
            .await
            .unwrap_err();
        assert!(matches!(e, UpstreamError::AllFailed { .. }), "{e}");
        assert!(e.to_string().contains(why), "{why}: {e}");
        let text = f.metrics();
        assert_eq!(
            sample(
                &text,
                "dns_upstream_rejected_responses_total",
                &[("upstream", &server.to_string()), ("reason", reason)]
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "dns_upstream_failures_total",
                &[("upstream", &server.to_string()), ("reason", "malformed")]
            ),
            Some(1.0)
        );
        // Its only server failed once with unhealthyAfter 1: nothing healthy is left.
        assert!(!f.fwd.any_healthy());
    }

    // A spoofed datagram ahead of the real answer is dropped and the real one accepted.
    let server = fake_upstream("127.0.0.113", Spoof::WrongIdThenRight).await;
    let f = Fwd::new(&config(&[server], 1000));
    let a = bounded(f.fwd.forward(&query("a.test.", RecordType::A), "a.test"))
        .await
        .unwrap();
    let m = Message::from_vec(&a).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(f.status(server).failures, 0);
}

/// A lost datagram is sent again after the server's retransmission timeout (300 ms before any
/// RTT sample) and answered within `dns.timeout`; a silent server is asked again and again but
/// never past `dns.timeout`.
#[tokio::test]
async fn a_lost_datagram_is_retransmitted_within_the_timeout_as_root() {
    if !can_run(&[]) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-up");
    let sock = tokio::net::UdpSocket::bind(("127.0.0.114", 0))
        .await
        .unwrap();
    let server = sock.local_addr().unwrap();
    let received = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = received.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                continue; // the first datagram is lost
            }
            let mut answer = buf[..n].to_vec();
            answer[2] |= 0x80;
            let _ = sock.send_to(&answer, from).await;
        }
    });
    let f = Fwd::new(&config(&[server], 1500));
    let a = bounded(f.fwd.forward(&query("a.test.", RecordType::A), "a.test"))
        .await
        .expect("answered after a retransmission");
    let m = Message::from_vec(&a).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        received.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "sent twice"
    );
    assert_eq!(f.status(server).queries, 2);

    let silent_sock = UdpSocket::bind("127.0.0.115:0").unwrap();
    let silent = silent_sock.local_addr().unwrap();
    const TIMEOUT_MS: u64 = 1000;
    let f = Fwd::new(&config(&[silent], TIMEOUT_MS));
    let started = Instant::now();
    let e = bounded(f.fwd.forward(&query("a.test.", RecordType::A), "a.test"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, UpstreamError::AllFailed { .. }), "{e}");
    assert!(
        took < Duration::from_millis(TIMEOUT_MS + 200),
        "never past dns.timeout: {took:?}"
    );
    // 300 ms, then 600 ms (doubled), then what is left.
    assert_eq!(f.status(silent).queries, 3, "retransmitted");
}

#[tokio::test]
async fn kube_dns_config_map_redirects_the_default_group_as_root() {
    if !can_run(&["dnsmasq"]) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-up");
    let dir = tempfile::tempdir().unwrap();
    let configured = addr("127.0.0.114", free_port_on("127.0.0.114"));
    let from_map = addr("127.0.0.115", free_port_on("127.0.0.115"));
    let stub = addr("127.0.0.116", free_port_on("127.0.0.116"));
    let _a = dnsmasq(
        configured,
        dir.path(),
        &["--address=/a.test/10.0.0.1".into()],
    );
    let _b = dnsmasq(from_map, dir.path(), &["--address=/a.test/10.0.0.2".into()]);
    let _c = dnsmasq(stub, dir.path(), &["--address=/acme.test/10.0.0.3".into()]);
    let f = Fwd::new(&config(&[configured], 1000));
    let data = BTreeMap::from([
        (
            "upstreamNameservers".to_string(),
            format!("[\"{from_map}\"]"),
        ),
        (
            "stubDomains".to_string(),
            format!("{{\"acme.test\": [\"{stub}\"]}}"),
        ),
    ]);
    f.fwd.apply_kube_dns(&data).unwrap();
    bounded(async {
        let a = f
            .fwd
            .forward(&query("a.test.", RecordType::A), "a.test")
            .await
            .unwrap();
        assert_eq!(a_records(&a), vec!["10.0.0.2"]);
        let a = f
            .fwd
            .forward(&query("x.acme.test.", RecordType::A), "x.acme.test")
            .await
            .unwrap();
        assert_eq!(a_records(&a), vec!["10.0.0.3"]);
    })
    .await;
    // The configured server left every group: its healthy gauge is gone.
    let text = f.metrics();
    assert_eq!(
        sample(
            &text,
            "dns_upstream_healthy",
            &[("upstream", &configured.to_string())]
        ),
        None
    );
}
