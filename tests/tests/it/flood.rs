//! Hostile traffic against the agent's listeners (issue #15): floods that need no credentials
//! must leave the agent alive, its memory bounded, and a legitimate client answered during the
//! flood. The agent runs standalone on loopback ports the test picks; flood sources are
//! loopback addresses (127.0.0.x) so per-peer caps can be told apart from the global one. The
//! RSS figures printed here are the ones in docs/configuration.md, "Listener bounds".

use std::net::SocketAddr;
use std::time::Duration;

use nodekeeper_tests::memcg::{DAEMONSET_MEMORY_LIMIT, MemoryCgroup};
use nodekeeper_tests::{Agent, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The agent's caps (agent/src/http.rs), restated: the test must fail if they are lifted.
const HTTP_MAX_CONNECTIONS: usize = 512;
const HTTP_MAX_PER_PEER: usize = 16;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{source}:0").parse().unwrap())?;
    s.connect(to).await
}

/// One GET from `source`; the status code.
async fn get_from(source: &str, to: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = connect_from(source, to).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {text:?}")))
}

/// True when the server closed `s` (EOF or reset) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// The agent's memory cgroup after a flood: never OOM-killed; its peak printed (the figures in
/// docs/configuration.md, "Listener bounds").
fn assert_not_oom_killed(group: &MemoryCgroup, flood: &str) {
    let peak = group.peak_bytes();
    println!(
        "{flood}: cgroup memory peak {:.1} MiB of the {} MiB limit",
        peak as f64 / f64::from(1 << 20),
        DAEMONSET_MEMORY_LIMIT >> 20
    );
    assert_eq!(group.oom_kills(), 0, "{flood}: the agent was OOM-killed");
    assert!(peak < DAEMONSET_MEMORY_LIMIT, "{flood}: peak {peak} bytes");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn half_open_http_requests_neither_kill_the_agent_nor_lock_out_a_scraper() {
    let Some(group) = MemoryCgroup::require("flood-http", DAEMONSET_MEMORY_LIMIT) else {
        return;
    };
    let mut agent = Agent::builder().in_cgroup(&group).start();
    let pid = agent.proc.pid();
    let to = agent.metrics;
    let before = rss_kib(pid);
    runtime().block_on(async {
        // 1. One host opens 2,000 half-open requests: it gets its per-peer share, the rest are
        //    closed at once.
        let mut flood = Vec::new();
        for _ in 0..2000 {
            if let Ok(mut s) = connect_from("127.0.0.1", to).await {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
                flood.push(s);
            }
        }
        let mut refused = 0;
        for s in flood.iter_mut() {
            if closed_within(s, Duration::from_millis(20)).await {
                refused += 1;
            }
        }
        assert!(
            refused >= 2000 - HTTP_MAX_PER_PEER,
            "only {refused} of 2000 connections from one host were turned away"
        );
        // 2. Many hosts fill the global cap with half-open requests.
        let mut held = Vec::new();
        for i in 0..(HTTP_MAX_CONNECTIONS * 2) {
            let source = format!("127.0.{}.{}", 1 + i / HTTP_MAX_PER_PEER / 200, 10 + (i / HTTP_MAX_PER_PEER) % 200);
            if let Ok(mut s) = connect_from(&source, to).await {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
                held.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at_cap = rss_kib(pid);
        eprintln!(
            "http flood: RSS {before} KiB before, {at_cap} KiB with every connection slot held half-open ({HTTP_MAX_CONNECTIONS} + {} turned away)",
            held.len().saturating_sub(HTTP_MAX_CONNECTIONS)
        );
        // 3. A scraper is answered during the flood: at once if its slot is free, else once
        //    the header-read timeout (5 s) frees the half-open slots.
        let status = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                if let Ok(code) = get_from("127.0.255.1", to, "/healthz").await {
                    return code;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("a legitimate client answered during the flood");
        assert_eq!(status, 200);
        // 4. The half-open requests that got a slot are closed by the header-read timeout.
        let mut still_open = 0;
        for s in held.iter_mut() {
            if !closed_within(s, Duration::from_secs(10)).await {
                still_open += 1;
            }
        }
        assert_eq!(still_open, 0, "half-open requests kept past the header-read timeout");
        assert!(
            at_cap < before + 64 * 1024,
            "RSS grew from {before} to {at_cap} KiB at the connection cap"
        );
    });
    assert!(agent.proc.alive(), "{}", agent.proc.log_text());
    wait_for(
        Duration::from_secs(5),
        "the agent answering after the flood",
        || matches!(nodekeeper_tests::http_get(to, "/healthz"), Ok((200, _))).then_some(()),
    );
    let after = rss_kib(pid);
    eprintln!("http flood: RSS {after} KiB after the flood closed");
    assert_not_oom_killed(&group, "http half-open flood");
}

// === listeners: SO_REUSEPORT only on DNS (issue #15 item 4) ===

#[tokio::test]
async fn metrics_and_grpc_listeners_refuse_a_second_bind_reuseport_or_not() {
    let a = nodekeeper::listen::tcp_exclusive("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = a.local_addr().unwrap();
    let in_use = |r: std::io::Result<tokio::net::TcpListener>| {
        r.err().map(|e| e.kind()) == Some(std::io::ErrorKind::AddrInUse)
    };
    assert!(
        in_use(nodekeeper::listen::tcp(addr)),
        "a SO_REUSEPORT stranger joined"
    );
    assert!(in_use(nodekeeper::listen::tcp_exclusive(addr)));
    assert!(std::net::TcpListener::bind(addr).is_err());
    // The agent's own ports, as it binds them.
    let agent = Agent::builder().start();
    for port in [agent.metrics, agent.api] {
        assert!(in_use(nodekeeper::listen::tcp(port)), "{port} joined");
    }
}

#[tokio::test]
async fn a_starting_agent_binds_once_its_predecessor_lets_go() {
    let old = nodekeeper::listen::tcp_exclusive("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = old.local_addr().unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(old);
    });
    let new = nodekeeper::listen::tcp_exclusive_when_free(addr, Duration::from_secs(20))
        .await
        .expect("bound after the predecessor closed");
    assert_eq!(new.local_addr().unwrap(), addr);
    release.await.unwrap();
    let e = nodekeeper::listen::tcp_exclusive_when_free(addr, Duration::from_millis(300))
        .await
        .expect_err("still held: gives up after the wait");
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
}

// === gRPC: idle connections and long-lived streams ===

/// The gRPC listener's caps (agent/src/api/mod.rs) and the default stream budget, restated.
const GRPC_MAX_CONNECTIONS: usize = 256;
const GRPC_MAX_PER_PEER: usize = 16;
const STREAM_BUDGET: usize = 64;

/// grpc.health.v1 Check over HTTP/2 from `source` (curl binds it): the HTTP status and the
/// response body (one gRPC frame: SERVING is `08 01`).
fn health_check_from(source: &str, to: SocketAddr) -> (String, Vec<u8>) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "--max-time",
            "5",
            "--interface",
            source,
        ])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["--data-binary", "@-", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("http://{to}/grpc.health.v1.Health/Check"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[0, 0, 0, 0, 0])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = out.stdout;
    let split = text.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    (
        String::from_utf8_lossy(&text[split..]).trim().to_string(),
        text[..split].to_vec(),
    )
}

#[test]
fn idle_grpc_connections_neither_kill_the_agent_nor_lock_out_a_client() {
    if !nodekeeper_tests::require_tool("curl") {
        return;
    }
    let Some(group) = MemoryCgroup::require("flood-grpc", DAEMONSET_MEMORY_LIMIT) else {
        return;
    };
    let mut agent = Agent::builder().in_cgroup(&group).start();
    let pid = agent.proc.pid();
    let to = agent.api;
    let before = rss_kib(pid);
    runtime().block_on(async {
        let mut one_host = Vec::new();
        for _ in 0..2000 {
            if let Ok(s) = connect_from("127.0.0.1", to).await {
                one_host.push(s);
            }
        }
        let mut refused = 0;
        for s in one_host.iter_mut() {
            if closed_within(s, Duration::from_millis(20)).await {
                refused += 1;
            }
        }
        assert!(
            refused >= 2000 - GRPC_MAX_PER_PEER,
            "only {refused} of 2000 idle connections from one host were turned away"
        );
        let mut many = Vec::new();
        for i in 0..(GRPC_MAX_CONNECTIONS * 2) {
            let source = format!("127.0.1.{}", 10 + i / GRPC_MAX_PER_PEER);
            if let Ok(s) = connect_from(&source, to).await {
                many.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at_cap = rss_kib(pid);
        eprintln!(
            "grpc idle flood: RSS {before} KiB before, {at_cap} KiB with every connection slot held idle"
        );
        // A client is answered during the flood (once the idle ones are closed at the latest).
        let answered = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (code, body) = health_check_from("127.0.255.1", to);
                if code == "200" && body.ends_with(&[0x08, 0x01]) {
                    return true;
                }
                if std::time::Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await
        .unwrap();
        assert!(answered, "no health answer during the idle flood");
        let mut still_open = 0;
        for s in many.iter_mut().chain(one_host.iter_mut()) {
            if !closed_within(s, Duration::from_secs(15)).await {
                still_open += 1;
            }
        }
        assert_eq!(still_open, 0, "idle connections kept past the first-bytes timeout");
        assert!(at_cap < before + 64 * 1024, "RSS {before} -> {at_cap} KiB");
    });
    assert!(agent.proc.alive(), "{}", agent.proc.log_text());
    assert_not_oom_killed(&group, "grpc idle connections");
}

#[test]
fn one_client_cannot_hold_every_stream_slot() {
    use nodekeeper::keda_pb::{self, external_scaler_client::ExternalScalerClient};
    let Some(group) = MemoryCgroup::require("flood-streams", DAEMONSET_MEMORY_LIMIT) else {
        return;
    };
    let mut agent = Agent::builder().in_cgroup(&group).start();
    let pid = agent.proc.pid();
    let before = rss_kib(pid);
    runtime().block_on(async {
        let mut c = ExternalScalerClient::connect(format!("http://{}", agent.api))
            .await
            .expect("connect");
        let spec = keda_pb::ScaledObjectRef {
            name: "web".into(),
            namespace: "shop".into(),
            scaler_metadata: [("metric", "established"), ("target", "5"), ("podSelector", "app=web")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let mut held = Vec::new();
        let mut exhausted = 0;
        for _ in 0..(STREAM_BUDGET * 4) {
            match c.stream_metric_spec(spec.clone()).await {
                Ok(s) => held.push(s),
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                    assert!(e.message().contains("per client address"), "{e:?}");
                    exhausted += 1;
                }
            }
        }
        eprintln!(
            "keda stream flood: {} streams held by one client, {exhausted} refused; RSS {before} -> {} KiB",
            held.len(),
            rss_kib(pid)
        );
        assert_eq!(held.len(), STREAM_BUDGET / 2, "one client holds at most half the budget");
        // The budget is shared: WatchMetrics from the same client is refused too...
        let mut agent_client =
            nodekeeper::pb::node_agent_client::NodeAgentClient::connect(format!("http://{}", agent.api))
                .await
                .unwrap();
        let e = agent_client
            .watch_metrics(nodekeeper::pb::WatchMetricsRequest::default())
            .await
            .expect_err("the hog's WatchMetrics");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // ...while unary calls still answer, and a closed stream frees its slot.
        c.get_metric_spec(spec.clone()).await.expect("unary during the flood");
        drop(held.pop());
        let mut ok = false;
        for _ in 0..50 {
            if c.stream_metric_spec(spec.clone()).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "a closed stream's slot never came back");
    });
    assert!(agent.proc.alive(), "{}", agent.proc.log_text());
    assert_not_oom_killed(&group, "keda streams");
}

// === DNS over TCP ===

/// The DNS TCP caps (agent/src/dns/server.rs), restated: the test must fail if they are lifted.
const DNS_TCP_MAX_CONNECTIONS: usize = 1024;
const DNS_TCP_MAX_PER_CLIENT: usize = 64;
/// The agent's 256 MiB limit (deploy/daemonset.yaml) with room to spare.
const DNS_FLOOD_RSS_LIMIT_KIB: u64 = 192 * 1024;

/// A connection from `source` that sends `burst` (pipelined queries) as far as the socket takes
/// it and then never reads. Its receive buffer is tiny, so the agent's answers back up at once.
async fn never_reading_dns_client(
    source: &str,
    to: SocketAddr,
    burst: &[u8],
) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.set_recv_buffer_size(4096)?;
    s.bind(format!("{source}:0").parse().unwrap())?;
    let s = s.connect(to).await?;
    let _ = s.try_write(burst);
    Ok(s)
}

/// Issue #15, finding 3: clients that send queries over TCP and never read their answers used
/// to hold every TCP slot for ever (writes had no timeout), so TCP-only and TC-retrying clients
/// on the node failed. Now one address gets at most its share, and answers that cannot be
/// written within the write timeout close the connection and free its slot.
#[test]
fn dns_tcp_clients_that_never_read_neither_pin_every_slot_nor_lock_out_a_client_as_root() {
    use nodekeeper_tests::dns_peers::{
        TYPE_A, Unbound, Upstreams, agent_dns_config, dig, example_zone, free_dns_addr,
        proc_status_kib, query_bytes,
    };
    use nodekeeper_tests::netns_pods::Netns;
    use nodekeeper_tests::{require_root, require_tool};
    if !(require_root() && require_tool("ip") && require_tool("dig") && require_tool("unbound")) {
        return;
    }
    let _netns = Netns::enter_fresh("flood-dns");
    // Small socket send buffers in this namespace (tcp_wmem is per namespace; the host's is
    // untouched), so a client that never reads blocks the agent's writes after a few answers
    // rather than after megabytes of kernel memory.
    let set = std::process::Command::new("sysctl")
        .args(["-w", "net.ipv4.tcp_wmem=4096 8192 16384"])
        .output()
        .expect("run sysctl");
    assert!(
        set.status.success(),
        "sysctl tcp_wmem in the test namespace: {set:?}"
    );
    let zone = Unbound::serving(&[example_zone()]);
    let listen = free_dns_addr();
    let up = Upstreams {
        default: Some(zone.addr),
        ..Default::default()
    };
    let Some(group) = MemoryCgroup::require("flood-dns-tcp", DAEMONSET_MEMORY_LIMIT) else {
        return;
    };
    let mut agent = Agent::builder()
        .in_cgroup(&group)
        .config(&agent_dns_config(listen, &up, "", ""))
        .start();
    // A legitimate TCP client on an address of its own; big.example.test is ~700 bytes.
    let legit = move || {
        dig(
            listen,
            &["-b", "127.0.0.1", "+tcp", "big.example.test", "A"],
        )
    };
    wait_for(
        Duration::from_secs(10),
        "the cache answers over TCP",
        || (legit().status() == "NOERROR").then_some(()),
    );
    let pid = agent.proc.pid();
    let before = proc_status_kib(pid, "VmRSS").expect("agent RSS");
    let burst: Vec<u8> = (0..400u16)
        .flat_map(|id| {
            let q = query_bytes(id, "big.example.test", TYPE_A);
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend(q);
            framed
        })
        .collect();
    runtime().block_on(async {
        // 1. One host opens 1,100 connections that never read: it gets its share, the rest are
        //    closed at once, and a client from another address is answered during the flood.
        let mut one_host = Vec::new();
        for _ in 0..1100 {
            if let Ok(s) = never_reading_dns_client("127.0.0.2", listen, &burst).await {
                one_host.push(s);
            }
        }
        let mut closed = 0;
        for s in one_host.iter_mut() {
            if closed_within(s, Duration::from_secs(2)).await {
                closed += 1;
            }
        }
        let served = one_host.len() - closed;
        assert!(
            served <= DNS_TCP_MAX_PER_CLIENT,
            "one address holds {served} of {} connections (cap {DNS_TCP_MAX_PER_CLIENT})",
            one_host.len()
        );
        let answer = tokio::task::spawn_blocking(legit).await.unwrap();
        assert_eq!(
            answer.status(),
            "NOERROR",
            "a TCP client from another address during a one-host flood:\n{}\nagent log:\n{}",
            answer.raw,
            agent.proc.log_text()
        );
        drop(one_host);

        // 2. Twenty hosts fill every slot with clients that never read: the write timeout
        //    frees the slots and the legitimate client is answered again.
        let mut many = Vec::new();
        for host in 1..=20 {
            for _ in 0..DNS_TCP_MAX_PER_CLIENT {
                if let Ok(s) = never_reading_dns_client(&format!("127.0.1.{host}"), listen, &burst).await {
                    many.push(s);
                }
            }
        }
        assert!(many.len() > DNS_TCP_MAX_CONNECTIONS, "{} connected", many.len());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let peak = proc_status_kib(pid, "VmRSS").expect("agent RSS");
        println!(
            "dns tcp flood: {} never-reading connections from 20 hosts, RSS {before} KiB -> {peak} KiB",
            many.len()
        );
        assert!(
            peak < DNS_FLOOD_RSS_LIMIT_KIB,
            "RSS {peak} KiB at the DNS TCP cap"
        );
        let answered = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let o = legit();
                if o.status() == "NOERROR" || std::time::Instant::now() > deadline {
                    return o;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .await
        .unwrap();
        assert_eq!(
            answered.status(),
            "NOERROR",
            "slots pinned by clients that never read are freed:\n{}\nagent log:\n{}",
            answered.raw,
            agent.proc.log_text()
        );
        drop(many);
    });
    assert!(agent.proc.alive(), "the agent survived the DNS TCP flood");
    assert_not_oom_killed(&group, "dns tcp never-reading clients");
}

// === faults at start ===

/// Issue #15, finding 5: with the API server unreachable the listeners came up ~20 s late (two
/// 10 s GETs before the bind). Now nothing waits for the API but readiness: the fake API server
/// holds every request unanswered, and /metrics, gRPC health and DNS answer while the agent's
/// API client has not had a single answer; readiness says "kubernetes: STARTING" until the API
/// answers, then the cluster upstream learnt from the kube-dns Service is used.
#[test]
fn listeners_serve_while_the_api_server_hangs_and_readiness_waits_for_its_first_answer() {
    use nodekeeper_tests::dns_peers::{
        Unbound, Upstreams, agent_dns_config, dig, example_zone, free_dns_addr,
    };
    use nodekeeper_tests::fake_api::{FakeApi, Fault, FaultKind};
    use nodekeeper_tests::{require_tool, sample};
    if !(require_tool("curl") && require_tool("dig") && require_tool("unbound")) {
        return;
    }
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    api.add_service("kube-system", "kube-dns", Some("10.96.0.10"));
    api.inject(Fault::on("", "/", FaultKind::Hold).always());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let zone = Unbound::serving(&[example_zone()]);
    let listen = free_dns_addr();
    let up = Upstreams {
        default: Some(zone.addr),
        ..Default::default()
    };
    // No cluster servers in config: the agent asks the API for the kube-dns Service.
    let agent = Agent::builder()
        .config(&agent_dns_config(listen, &up, "", ""))
        .connected(&kubeconfig, "node-a")
        .live_only()
        .start();
    // Served while the API client is provably still waiting for its first answer.
    let metrics = agent.metrics_text();
    let (grpc_status, grpc_body) = health_check_from("127.0.0.1", agent.api);
    let answer = wait_for(Duration::from_secs(10), "the DNS cache bound", || {
        let a = dig(listen, &["a.example.test", "A"]);
        (a.status() != "(no answer)").then_some(a)
    });
    let (ready_status, ready_body) = nodekeeper_tests::http_get(agent.metrics, "/readyz").unwrap();
    // Ordering, not a stopwatch: every listener answered before the agent gave up on any API
    // call (each is bounded by 10 s; the old start gave up on the Service GET, then bound).
    let log = agent.proc.log_text();
    for gave_up in ["timed out", "did not answer", "unreadable"] {
        assert!(
            !log.contains(gave_up),
            "the listeners answered only after an API call was abandoned:\n{log}"
        );
    }
    assert!(
        api.held_total() >= 1,
        "the agent never asked the API server"
    );
    assert!(
        api.requests().is_empty(),
        "the API server answered something: {:?}",
        api.requests()
    );
    assert_eq!(
        sample(
            &metrics,
            "nodekeeper_capability_state",
            &[("capability", "kubernetes"), ("state", "starting")]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(grpc_status, "200", "gRPC health answered");
    assert!(
        grpc_body.ends_with(&[0x08, 0x02]),
        "overall NOT_SERVING while the API is silent: {grpc_body:?}"
    );
    assert_eq!(answer.status(), "NOERROR", "DNS served: {}", answer.raw);
    assert_eq!(ready_status, 503, "{ready_body}");
    assert!(ready_body.contains("kubernetes"), "{ready_body}");

    // The API answers: ready, and the cluster upstream comes from the Service.
    api.release_held();
    wait_for(
        Duration::from_secs(20),
        "ready once the API answered",
        || {
            matches!(
                nodekeeper_tests::http_get(agent.metrics, "/readyz"),
                Ok((200, _))
            )
            .then_some(())
        },
    );
    wait_for(
        Duration::from_secs(20),
        "the cluster upstream from the kube-dns Service",
        || {
            let text = agent.metrics_text();
            sample(
                &text,
                "nodekeeper_dns_upstream_healthy",
                &[("upstream", "10.96.0.10:53")],
            )
            .map(|_| ())
        },
    );
    let (_, body) = health_check_from("127.0.0.1", agent.api);
    assert!(
        body.ends_with(&[0x08, 0x01]),
        "overall SERVING once ready: {body:?}"
    );
}

// === strangers in the DNS SO_REUSEPORT group ===

/// Issue #15, finding 4: DNS keeps SO_REUSEPORT (the hand-over needs it), so a root process can
/// join the cache's group and answer a share of pods' queries. The agent reports it: a python
/// process binds the cache's address and port with SO_REUSEPORT in the test's namespace, and
/// `nodekeeper_dns_foreign_sockets` goes to 1, equal to what `ss -uapn` shows for that port
/// (sockets not owned by nodekeeper), and back to 0 when it leaves.
#[test]
fn a_stranger_joining_the_dns_reuseport_group_is_reported_as_root() {
    use nodekeeper_tests::dns_peers::{
        Unbound, Upstreams, agent_dns_config, example_zone, free_dns_addr,
    };
    use nodekeeper_tests::netns_pods::Netns;
    use nodekeeper_tests::{Proc, python, require_root, require_tool, sample};
    if !(require_root() && require_tool("ip") && require_tool("unbound") && require_tool("ss")) {
        return;
    }
    let _netns = Netns::enter_fresh("dns-stranger");
    let api = nodekeeper_tests::fake_api::FakeApi::start();
    api.add_node("node-a", &[]);
    api.add_service("kube-system", "kube-dns", Some("10.96.0.10"));
    let api_dir = tempfile::tempdir().unwrap();
    let kubeconfig = api_dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let stranger_events = || {
        api.events()
            .into_iter()
            .filter(|e| e["reason"] == "DNSForeignSocket")
            .collect::<Vec<_>>()
    };
    let zone = Unbound::serving(&[example_zone()]);
    let listen = free_dns_addr();
    let up = Upstreams {
        default: Some(zone.addr),
        ..Default::default()
    };
    let config = agent_dns_config(listen, &up, "", "")
        .replace("rules: none}", "rules: none, checkInterval: 1s}");
    let agent = Agent::builder()
        .config(&config)
        .connected(&kubeconfig, "node-a")
        .start();
    let foreign = || sample(&agent.metrics_text(), "nodekeeper_dns_foreign_sockets", &[]);
    wait_for(
        Duration::from_secs(10),
        "the check ran: no stranger",
        || (foreign() == Some(0.0)).then_some(()),
    );
    // What ss sees on the cache's UDP address: sockets whose process is not nodekeeper.
    let ss_strangers = || {
        let out = std::process::Command::new("ss")
            .args(["-uapnH"])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(listen.to_string().as_str()))
            .filter(|l| !l.contains("\"nodekeeper\""))
            .count() as f64
    };
    assert_eq!(ss_strangers(), 0.0);
    assert!(stranger_events().is_empty(), "no stranger, no Event");

    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         s.bind(('{}', {}))\n\
         print('bound', flush=True)\n\
         time.sleep(120)\n",
        listen.ip(),
        listen.port()
    );
    let mut cmd = std::process::Command::new(python());
    cmd.args(["-c", &script]);
    let stranger = Proc::spawn("stranger", cmd, dir.path());
    wait_for(Duration::from_secs(10), "the stranger bound", || {
        stranger.log_text().contains("bound").then_some(())
    });
    wait_for(Duration::from_secs(15), "the stranger reported", || {
        (foreign() == Some(1.0)).then_some(())
    });
    assert_eq!(ss_strangers(), 1.0, "the differential: ss agrees");
    wait_for(Duration::from_secs(5), "the warning naming it", || {
        agent
            .proc
            .log_text()
            .contains(&format!("pid {}", stranger.pid()))
            .then_some(())
    });
    // One Warning Event on the Node naming the process, for the operator who never reads logs.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stranger_events().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(event) = stranger_events().into_iter().next() else {
        panic!(
            "no DNSForeignSocket Event; events: {:?}\nagent log:\n{}",
            api.events(),
            agent.proc.log_text()
        );
    };
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["involvedObject"]["name"], "node-a", "{event}");
    let message = event["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("pid {}", stranger.pid()))
            && message.contains(&listen.to_string()),
        "the Event names the stranger and the address: {event}"
    );
    drop(stranger);
    wait_for(Duration::from_secs(15), "the stranger gone", || {
        (foreign() == Some(0.0)).then_some(())
    });
}
