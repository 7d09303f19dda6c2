//! Rolling hand-over of the DNS cache, as a DaemonSet update with `maxSurge: 1` does it: a
//! second agent binds the same addresses (SO_REUSEPORT) while the first still serves, the first
//! gets SIGTERM (lame duck, then it closes its sockets), and a client querying steadily through
//! all of it loses no query. Real agents, a real dnsmasq upstream, all inside a network
//! namespace of the test's own (`Netns::enter_fresh`, so the test needs root), on its loopback.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nodekeeper_tests::netns_pods::Netns;
use nodekeeper_tests::{Agent, Proc, free_port, require_root, require_tool, sample};

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Sends one query at a time (each from a fresh socket, as stub resolvers do) until stopped;
/// counts queries sent and answers with the right ID received within a second.
fn steady_client(
    server: SocketAddr,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut i: u16 = 0;
        while !stop.load(Ordering::SeqCst) {
            i = i.wrapping_add(1);
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            // Every tenth name repeats (cache hits); the rest are misses sent upstream.
            let name = if i.is_multiple_of(10) {
                "hot.handover.test".to_string()
            } else {
                format!("n{i}.handover.test")
            };
            socket.send_to(&query(i, &name), server).unwrap();
            sent.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 512];
            let answered = loop {
                match socket.recv_from(&mut buf) {
                    Ok((n, _)) if n >= 2 && buf[0..2] == i.to_be_bytes() => break true,
                    Ok(_) => continue,
                    Err(_) => break false,
                }
            };
            if !answered {
                lost.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

#[test]
fn a_rolling_handover_loses_no_query_as_root() {
    if !require_root() || !require_tool("ip") || !require_tool("dnsmasq") {
        return;
    }
    let _netns = Netns::enter_fresh("dns-ho");
    let dir = tempfile::tempdir().unwrap();
    let upstream = SocketAddr::from(([127, 0, 0, 62], free_port()));
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--local-ttl=5",
        "--address=/handover.test/10.9.9.9",
    ])
    .arg(format!("--listen-address={}", upstream.ip()))
    .arg(format!("--port={}", upstream.port()));
    let _dnsmasq = Proc::spawn("dnsmasq", cmd, dir.path());
    let cache = SocketAddr::from(([127, 0, 0, 61], free_port()));
    let config = format!(
        "shutdownTimeout: 10s
dns:
  enabled: true
  listenIps: [{}]
  port: {}
  lameDuck: 2s
  node: {{manageInterface: false, rules: none}}
  upstreams:
    clusterZones: []
    default: {{servers: [\"{upstream}\"]}}
",
        cache.ip(),
        cache.port()
    );
    let mut old = Agent::builder().config(&config).start();

    let (stop, sent, lost) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let client = steady_client(cache, stop.clone(), sent.clone(), lost.clone());
    std::thread::sleep(Duration::from_secs(1));
    let new = Agent::builder().config(&config).start();
    std::thread::sleep(Duration::from_secs(1));
    old.proc.signal("TERM");
    assert!(old.proc.wait_exit(Duration::from_secs(15)).success());
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();

    let (sent, lost) = (sent.load(Ordering::SeqCst), lost.load(Ordering::SeqCst));
    assert!(sent > 200, "the client kept querying: {sent} sent");
    assert_eq!(lost, 0, "{lost} of {sent} queries lost in the hand-over");
    // Only the successor is left, and it served.
    let answered = sample(
        &new.metrics_text(),
        "nodekeeper_dns_requests_total",
        &[("protocol", "udp")],
    )
    .unwrap_or(0.0);
    assert!(answered > 0.0, "the successor answered queries");
    assert!(
        old.proc.log_text().contains("a successor answers"),
        "the old agent saw its successor and left the wiring: {}",
        old.proc.log_text()
    );
}
