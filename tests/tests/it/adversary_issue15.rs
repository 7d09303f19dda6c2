//! Adversary findings against issue #15's promises (branch a15). Each test is an attack that
//! broke a promise when it was written; they are `#[ignore]`d so the suite stays green and
//! fail with `--ignored` until the promise is kept.

use std::net::SocketAddr;
use std::time::Duration;

use nodekeeper_tests::{Agent, wait_for};

/// A UDP socket bound to the cache's address and port with SO_REUSEPORT by python `script_tail`
/// (which gets `bound()`, making that socket, and `ADDR`, the cache's (ip, port), and must print
/// `bound` and keep the socket alive); returns
/// whether `nodekeeper_dns_foreign_sockets` reached 1 within 15 s, and what `ss` showed.
fn stranger_is_reported(name: &str, script_tail: &str) -> (bool, String) {
    use nodekeeper_tests::dns_peers::{
        Unbound, Upstreams, agent_dns_config, example_zone, free_dns_addr,
    };
    use nodekeeper_tests::netns_pods::Netns;
    use nodekeeper_tests::{Proc, python, sample};
    let _netns = Netns::enter_fresh(name);
    let zone = Unbound::serving(&[example_zone()]);
    let listen: SocketAddr = free_dns_addr();
    let up = Upstreams {
        default: Some(zone.addr),
        ..Default::default()
    };
    let config = agent_dns_config(listen, &up, "", "")
        .replace("rules: none}", "rules: none, checkInterval: 1s}");
    let agent = Agent::builder().config(&config).start();
    let foreign = || sample(&agent.metrics_text(), "nodekeeper_dns_foreign_sockets", &[]);
    wait_for(
        Duration::from_secs(10),
        "the check ran: no stranger",
        || (foreign() == Some(0.0)).then_some(()),
    );
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "import socket, time, ctypes, threading, array\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         def bound():\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         \x20   s.bind(('{}', {}))\n\
         \x20   return s\n\
         ADDR = ('{}', {})\n\
         {script_tail}\n",
        listen.ip(),
        listen.port(),
        listen.ip(),
        listen.port()
    );
    let mut cmd = std::process::Command::new(python());
    cmd.args(["-c", &script]);
    let stranger = Proc::spawn("stranger", cmd, dir.path());
    wait_for(Duration::from_secs(10), "the stranger bound", || {
        stranger.log_text().contains("bound").then_some(())
    });
    let ss = std::process::Command::new("ss")
        .args(["-uapnH"])
        .output()
        .expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout)
        .lines()
        .filter(|l| l.contains(&listen.to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    // A query sent now may land on the stranger: it is in the group.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut reported = false;
    while std::time::Instant::now() < deadline {
        if foreign() == Some(1.0) {
            reported = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(agent.proc.log_text().contains("nodekeeper"));
    drop(stranger);
    (reported, ss)
}

fn p4_tools() -> bool {
    use nodekeeper_tests::{require_root, require_tool};
    require_root() && require_tool("ip") && require_tool("unbound") && require_tool("ss")
}

/// P4: the stranger check trusts the process name. Any root process can call
/// `prctl(PR_SET_NAME, "nodekeeper")` (or be a binary named nodekeeper) and join the group
/// unreported.
#[test]
fn adversary_a_stranger_named_nodekeeper_is_not_reported_as_root() {
    if !p4_tools() {
        return;
    }
    let (reported, ss) = stranger_is_reported(
        "adv-comm",
        "libc.prctl(15, b'nodekeeper', 0, 0, 0)\n\
         s = bound()\n\
         print('bound', flush=True)\n\
         time.sleep(120)",
    );
    assert!(
        reported,
        "a socket of a python process calling itself nodekeeper was never reported; ss:\n{ss}"
    );
}

/// P4: the check skips sockets no process's fd table holds. A stranger binds, passes the socket
/// over a unix socketpair (SCM_RIGHTS) and closes its own fd: the socket sits in the pair's
/// queue, stays in the group and receives pods' queries, and the stranger can take it back
/// whenever it likes.
#[test]
fn adversary_a_stranger_socket_parked_in_flight_is_not_reported_as_root() {
    if !p4_tools() {
        return;
    }
    let (reported, ss) = stranger_is_reported(
        "adv-inflight",
        "s = bound()\n\
         a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         socket.send_fds(a, [b'x'], [s.fileno()])\n\
         s.close()\n\
         print('bound', flush=True)\n\
         time.sleep(120)",
    );
    assert!(
        reported,
        "a group member held in a unix socket's queue was never reported; ss:\n{ss}"
    );
}

/// P4: the check reads only `/proc/<pid>/fd`, the thread-group leader's fd table. A thread that
/// unshares its fd table (`unshare(CLONE_FILES)`) holds sockets no `/proc/<pid>/fd` shows
/// (they are in `/proc/<pid>/task/<tid>/fd`).
#[test]
fn adversary_a_stranger_socket_in_a_threads_private_fd_table_is_not_reported_as_root() {
    if !p4_tools() {
        return;
    }
    let (reported, ss) = stranger_is_reported(
        "adv-thread",
        "def hide():\n\
         \x20   assert libc.unshare(0x400) == 0, ctypes.get_errno()\n\
         \x20   s = bound()\n\
         \x20   print('bound', flush=True)\n\
         \x20   time.sleep(120)\n\
         t = threading.Thread(target=hide)\n\
         t.start()\n\
         t.join()",
    );
    assert!(
        reported,
        "a group member held in a thread's own fd table was never reported; ss:\n{ss}"
    );
}

/// P2: the anonymous health service decodes each request's message into memory before the
/// handler runs, up to tonic's 4 MiB limit, on every one of a connection's 64 streams and every
/// one of a client's 16 connections. A client that declares a 4 MiB message on each stream and
/// sends all of it but the last byte makes the agent hold 4 MiB x 64 x connections: it is
/// OOM-killed in the DaemonSet's 256 MiB memory cgroup. No credentials needed.
#[test]
fn adversary_unfinished_grpc_health_messages_oom_kill_the_agent() {
    use futures::StreamExt as _;
    use http_body::Frame;
    use nodekeeper_tests::memcg::{DAEMONSET_MEMORY_LIMIT, MemoryCgroup};
    use tonic::codegen::{Bytes, Service as _, http};

    const MESSAGE: usize = 4 * 1024 * 1024 - 64;
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = 60;
    let Some(group) = MemoryCgroup::require("adv-grpc-body", DAEMONSET_MEMORY_LIMIT) else {
        return;
    };
    let mut agent = Agent::builder().in_cgroup(&group).start();
    let url = agent.grpc_url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut calls = Vec::new();
        for _ in 0..CONNECTIONS {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .expect("connect");
            for _ in 0..STREAMS {
                // A gRPC frame header declaring MESSAGE bytes, then all of them but one, then
                // nothing (the body never ends).
                let mut head = vec![0u8];
                head.extend_from_slice(&(MESSAGE as u32).to_be_bytes());
                let chunks = std::iter::once(Bytes::from(head)).chain(
                    (0..(MESSAGE - 1) / 65536)
                        .map(|_| Bytes::from(vec![0x0a; 65536]))
                        .chain(std::iter::once(Bytes::from(vec![
                            0x0a;
                            (MESSAGE - 1) % 65536
                        ]))),
                );
                let body = http_body_util::StreamBody::new(
                    futures::stream::iter(
                        chunks.map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b))),
                    )
                    .chain(futures::stream::pending()),
                );
                let req = http::Request::builder()
                    .method("POST")
                    .uri(format!("{url}/grpc.health.v1.Health/Check"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(tonic::body::Body::new(body))
                    .unwrap();
                let mut ch = channel.clone();
                futures::future::poll_fn(|cx| ch.poll_ready(cx))
                    .await
                    .expect("ready");
                calls.push(tokio::spawn(ch.call(req)));
            }
        }
        // Let the bytes flow (about 1 GiB over loopback), then look.
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if group.oom_kills() > 0 {
                break;
            }
        }
        for c in calls {
            c.abort();
        }
    });
    let peak = group.peak_bytes();
    eprintln!(
        "unfinished health messages: cgroup peak {:.1} MiB, oom kills {}",
        peak as f64 / f64::from(1 << 20),
        group.oom_kills()
    );
    assert_eq!(group.oom_kills(), 0, "the agent was OOM-killed");
    assert!(
        agent.proc.alive(),
        "the agent died: {}",
        agent.proc.log_text()
    );
}

// === P1: the dns-guard's read-back ===

fn ns_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig @10.96.0.10 probe.test` inside `ns`: the first A record, if any.
fn ask_cluster_ip(ns: &nodekeeper_tests::netns_pods::Netns) -> Option<String> {
    let out = ns
        .command("dig")
        .args(["+short", "+time=1", "+tries=1", "@10.96.0.10", "probe.test"])
        .output()
        .expect("dig");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .filter(|l| l.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_string)
}

fn dnsmasq_in(
    ns: &nodekeeper_tests::netns_pods::Netns,
    dir: &std::path::Path,
    name: &str,
    addrs: &str,
    answer: &str,
) -> nodekeeper_tests::Proc {
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        &format!("--listen-address={addrs}"),
        &format!("--address=/probe.test/{answer}"),
        &format!("--pid-file={}", dir.join(format!("{name}.pid")).display()),
        "--log-facility=-",
    ]);
    nodekeeper_tests::Proc::spawn(name, cmd, dir)
}

/// Rules carrying our comment in `prog-save`'s output inside `ns`.
fn our_rule_count(ns: &nodekeeper_tests::netns_pods::Netns, prog: &str) -> usize {
    ns_ok(&mut ns.command(&format!("{prog}-save")))
        .lines()
        .filter(|l| l.contains("--comment nodekeeper-dns"))
        .count()
}

/// P1: the guard reads back only the iptables variant it detects *now* (and the one its backend
/// resolved to, the same detection), not every variant installed. On a node with both
/// iptables-legacy and iptables-nft, the agent installed its rules with legacy (legacy tables,
/// no kubelet hint, nft empty); then something on the node used iptables-nft (one chain in
/// `ip filter`), so the guard's detection says nft. The cache is SIGKILLed: the guard removes
/// nothing, reads back the nft variant, logs "failed open, verified" and counts it, while all
/// 28 legacy NOTRACK rules stay and the node's DNS is black-holed.
#[test]
fn adversary_guard_claims_failed_open_while_legacy_rules_remain_as_root() {
    use nodekeeper_tests::netns_pods::Netns;
    use nodekeeper_tests::{Proc, agent_bin, require_root, require_tool};
    if !(require_root()
        && [
            "ip",
            "iptables-legacy",
            "iptables-nft",
            "nft",
            "dnsmasq",
            "dig",
        ]
        .iter()
        .all(|t| require_tool(t)))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("adv-variant");
    for a in ["10.0.0.53/32", "10.96.0.10/32", "169.254.20.10/32"] {
        ns_ok(ns.command("ip").args(["addr", "add", a, "dev", "lo"]));
    }
    // kube-proxy's DNAT, with legacy iptables (as on a node whose kube-proxy uses legacy).
    for p in ["udp", "tcp"] {
        ns_ok(ns.command("iptables-legacy").args([
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "10.96.0.10/32",
            "-p",
            p,
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "10.0.0.53:53",
        ]));
    }
    let _kube_dns = dnsmasq_in(&ns, dir.path(), "kube-dns", "10.0.0.53", "10.0.0.1");
    wait_for(Duration::from_secs(10), "kube-dns through the DNAT", || {
        (ask_cluster_ip(&ns).as_deref() == Some("10.0.0.1")).then_some(())
    });
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "dns:\n  listenIps: [\"169.254.20.10\"]\n  clusterIps: [\"10.96.0.10\"]\n  node:\n    manageInterface: false\n    rules: iptables\n    checkInterval: 1s\n",
    )
    .unwrap();
    let mut cache = dnsmasq_in(
        &ns,
        dir.path(),
        "cache",
        "169.254.20.10,10.96.0.10",
        "10.0.0.2",
    );
    ns_ok(
        ns.command(agent_bin().to_str().unwrap())
            .args(["dns-wiring", "setup", "--config"])
            .arg(&cfg),
    );
    assert_eq!(
        our_rule_count(&ns, "iptables-legacy"),
        28,
        "installed with legacy"
    );
    wait_for(Duration::from_secs(10), "the cache through NOTRACK", || {
        (ask_cluster_ip(&ns).as_deref() == Some("10.0.0.2")).then_some(())
    });
    // Another component of the node uses iptables-nft (a CNI, a host firewall).
    ns_ok(
        ns.command("iptables-nft")
            .args(["-t", "filter", "-N", "SOMEONE-ELSE"]),
    );

    let mut cmd = ns.command(agent_bin().to_str().unwrap());
    cmd.args(["dns-guard", "--config"])
        .arg(&cfg)
        .args(["--interval", "1s", "--failures", "3"])
        .env("NODEKEEPER_LOG", "info,nodekeeper=debug");
    let guard = Proc::spawn("guard", cmd, dir.path());
    std::thread::sleep(Duration::from_secs(4));
    cache.signal("KILL");
    cache.wait_exit(Duration::from_secs(5));
    // The documented window is interval x failures + probe timeout; give it three times that.
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let mut answered = false;
    while std::time::Instant::now() < deadline {
        if ask_cluster_ip(&ns).as_deref() == Some("10.0.0.1") {
            answered = true;
            break;
        }
    }
    let log = guard.log_text();
    let left = our_rule_count(&ns, "iptables-legacy");
    assert!(
        !(log.contains("failed open, verified") && left > 0),
        "the guard claimed a verified fail-open with {left} legacy rules of ours left:\n{log}"
    );
    assert!(
        answered,
        "kube-dns never answered after the cache's SIGKILL ({left} legacy rules left):\n{log}"
    );
}

// === P3: listeners with a bad state dir ===

/// P3: `state/sysctl/originals.json` is read with a blocking `read_to_string` on the start path,
/// before the HTTP and gRPC listeners are bound. When the path is a FIFO (a hostile or broken
/// state dir: nothing ever writes to it) the agent hangs at start: /healthz never answers, the
/// liveness probe restarts it forever, and DNS/metrics never serve. A regular corrupt file
/// degrades sysctl only (sysctl::a_corrupt_originals_journal_degrades_only_sysctl_...).
#[test]
fn adversary_a_fifo_as_the_sysctl_journal_keeps_every_listener_down() {
    use nodekeeper_tests::{Proc, agent_bin, free_port, http_get, loopback};
    let dir = tempfile::tempdir().unwrap();
    // A fake /proc/sys (never the host's).
    let proc = dir.path().join("proc");
    for (key, value) in [("net/core/somaxconn", "4096"), ("vm/swappiness", "60")] {
        let f = proc.join("sys").join(key);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, format!("{value}\n")).unwrap();
    }
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("sysctl")).unwrap();
    nix::unistd::mkfifo(
        &state.join("sysctl/originals.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "sysctl:\n  enabled: true\n  interval: 1s\n  profiles:\n    - name: base\n      sysctls:\n        net.core.somaxconn: 8192\n",
    )
    .unwrap();
    let metrics = loopback(free_port());
    let api = loopback(free_port());
    let mut cmd = std::process::Command::new(agent_bin());
    cmd.arg("run")
        .arg("--standalone")
        .env_remove("KUBECONFIG")
        .arg("--config")
        .arg(&config)
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .arg("--api-listen")
        .arg(api.to_string())
        .arg("--state-dir")
        .arg(&state)
        .arg("--host-proc")
        .arg(&proc)
        .env("NODEKEEPER_LOG", "info,nodekeeper=debug");
    let mut agent = Proc::spawn("nodekeeper", cmd, dir.path());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut live = None;
    while std::time::Instant::now() < deadline && agent.alive() {
        if let Ok((code, _)) = http_get(metrics, "/healthz") {
            live = Some(code);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = agent.log_text();
    assert_eq!(
        live,
        Some(200),
        "/healthz never answered in 20 s with a FIFO as the sysctl journal:\n{log}"
    );
}

// === P2: request heads just under hyper's buffer limit ===

/// hyper's HTTP/1 read buffer grows to ~408 KiB (`max_buf_size` default, 8 KiB + 100 x 4 KiB)
/// before a head is refused; the metrics server keeps that default. Each connection sends
/// `head_bytes` of one never-ending header line (no CRLF CRLF) and holds: the server buffers it
/// until the 5 s head timeout. Sources 127.0.N.M, 16 connections each (the per-peer cap).
async fn fat_heads(to: SocketAddr, connections: usize, head_bytes: usize) -> usize {
    use tokio::io::AsyncWriteExt as _;
    let mut filler = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    filler.resize(head_bytes, b'a');
    let mut held = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let source = format!("127.0.{}.{}", 1 + i / 16 / 200, 10 + (i / 16) % 200);
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let Ok(s) = s.connect(to).await else { continue };
        let filler = filler.clone();
        tasks.spawn(async move {
            let mut s = s;
            let _ = tokio::time::timeout(Duration::from_secs(4), s.write_all(&filler)).await;
            s
        });
    }
    while let Some(s) = tasks.join_next().await {
        held.push(s.unwrap());
    }
    let n = held.len();
    // Hold them until the server's head timeout would close them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(held);
    n
}

/// P1 through P2: the dns-guard serves its metrics on 0.0.0.0:9742 (the DaemonSet's
/// `--guard-metrics-listen`) with the same HTTP bounds as the agent (512 connections), but runs
/// in a 48 MiB memory limit. Fat unfinished heads OOM-kill the guard; a dead guard cannot fail
/// open when the cache dies afterwards (docs/dns.md, "Limits"). No credentials needed.
#[test]
fn adversary_fat_unfinished_http_heads_oom_kill_the_dns_guard_as_root() {
    use nodekeeper_tests::memcg::MemoryCgroup;
    use nodekeeper_tests::netns_pods::Netns;
    use nodekeeper_tests::{Proc, agent_bin, require_root};
    const GUARD_MEMORY_LIMIT: u64 = 48 << 20;
    if !require_root() {
        return;
    }
    let Some(group) = MemoryCgroup::require("adv-guard-heads", GUARD_MEMORY_LIMIT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("adv-guard-heads");
    ns_ok(
        ns.command("ip")
            .args(["addr", "add", "169.254.20.10/32", "dev", "lo"]),
    );
    // A cache that answers the probe: the guard just guards (no wiring to remove).
    let _cache = dnsmasq_in(&ns, dir.path(), "cache", "169.254.20.10", "10.0.0.2");
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "dns:\n  listenIps: [\"169.254.20.10\"]\n  node:\n    manageInterface: false\n    rules: none\n",
    )
    .unwrap();
    let metrics: SocketAddr = "127.0.0.1:19742".parse().unwrap();
    // Into the cgroup first: `ip netns exec` mounts a fresh /sys without the cgroup tree.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
        .arg(group.procs_file())
        .args(["ip", "netns", "exec", ns.name()])
        .arg(agent_bin())
        .args(["dns-guard", "--config"])
        .arg(&cfg)
        .args(["--guard-metrics-listen", &metrics.to_string()])
        .env("NODEKEEPER_LOG", "info")
        .env_remove("KUBECONFIG");
    let mut guard = Proc::spawn("guard", cmd, dir.path());
    let scrape = || {
        let out = ns
            .command("curl")
            .args([
                "-s",
                "--max-time",
                "2",
                &format!("http://{metrics}/metrics"),
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !scrape().contains("dns_guard_failopen_pending") {
        assert!(
            std::time::Instant::now() < deadline && guard.alive(),
            "the guard's metrics never answered:\n{}",
            guard.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = {
        let _in_ns = ns.enter();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Up to three waves: on a loaded machine one wave can arrive slower than the guard's
        // 5 s head timeout frees it.
        let mut sent = 0;
        for _ in 0..3 {
            sent = rt.block_on(fat_heads(metrics, 512, 400 * 1024));
            if group.oom_kills() > 0 {
                break;
            }
        }
        sent
    };
    let peak = group.peak_bytes();
    eprintln!(
        "guard fat heads: {sent} connections; cgroup peak {:.1} MiB of 48, oom kills {}",
        peak as f64 / f64::from(1 << 20),
        group.oom_kills()
    );
    assert_eq!(group.oom_kills(), 0, "the dns-guard was OOM-killed");
    assert!(guard.alive(), "the guard died: {}", guard.log_text());
}

/// P1, hostile flag values: `dns-guard --interval 0s` panics in tokio's `interval` ("`period`
/// must be non-zero") instead of refusing the flag by name; the sidecar then crash-loops and
/// nothing guards the node. Bad input must be a clear error naming the field.
#[test]
fn adversary_guard_interval_zero_panics_instead_of_naming_the_flag_as_root() {
    use nodekeeper_tests::netns_pods::Netns;
    use nodekeeper_tests::{agent_bin, require_root};
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("adv-guard-zero");
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "dns:\n  listenIps: [\"169.254.20.10\"]\n  node:\n    manageInterface: false\n    rules: none\n",
    )
    .unwrap();
    // Each hostile value is refused by the name of its flag, with EX_USAGE (64), as the
    // agent's config validation does.
    for (flag, value) in [
        ("--interval", "0s"),
        ("--probe-timeout", "0ms"),
        ("--failures", "0"),
        ("--interval", "2h"),
    ] {
        let out = ns
            .command("timeout")
            .args(["10"])
            .arg(agent_bin())
            .args(["dns-guard", "--config"])
            .arg(&cfg)
            .args([flag, value])
            .env_remove("KUBECONFIG")
            .output()
            .expect("run the guard");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "the guard panicked on {flag} {value}:\n{stderr}"
        );
        assert!(
            out.status.code() == Some(64) && stderr.contains(flag),
            "want a refusal (64) naming {flag} for {value}, got {}:\n{stderr}",
            out.status
        );
    }
}

/// Issue #15, 2c: a dual-stack IPv6 socket bound to `::ffff:<cache address>` on the DNS port
/// (SO_REUSEPORT) sits in the kernel's tables for the cache's IPv4 address, but /proc/net/udp6
/// lists it as an IPv6 address: the check compared it as one and never reported it.
#[test]
fn a_v4_mapped_ipv6_stranger_on_the_cache_address_is_reported_as_root() {
    if !p4_tools() {
        return;
    }
    let (reported, ss) = stranger_is_reported(
        "adv-mapped",
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         s.bind(('::ffff:' + ADDR[0], ADDR[1]))\n\
         print('bound', flush=True)\n\
         time.sleep(120)",
    );
    assert!(
        reported,
        "a v4-mapped dual-stack socket on the cache's address was never reported; ss:\n{ss}"
    );
}
