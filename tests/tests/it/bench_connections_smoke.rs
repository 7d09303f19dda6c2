//! Keeps `bench_connections` (nodekeeper's connection census vs an `ss -tan` loop vs the /proc
//! parser) from rotting: a small run (3 namespaces x 50 sockets) must exit 0, print a row per
//! reader with numeric cells, leave no namespace behind and not touch docs/benchmarks.md. The
//! timings are never asserted (they are measurements, not properties). Also: the one-pass BPF
//! census (issue #18) agrees with sock_diag and `ss` socket for socket, falls back with its
//! reason when bpf() is refused, and its committed object is its source's build.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nodekeeper::config::ConfigDuration;
use nodekeeper::metrics::connections::bpf::{OnePass, OnePassError, census_with_fallback};
use nodekeeper::metrics::connections::{
    ConnectionsConfig, NetnsReading, SourcePreference, TcpState, read_namespaces, summarize,
};
use nodekeeper_tests::netns_pods::{Holder, Netns, link};
use nodekeeper_tests::{require_root, require_tool, workspace_root};
use serde_json::json;

fn bench_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nkbench-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes the `nkbench-PID-*` namespaces whose PID is no longer running: left by a benchmark or
/// a test process that was killed (SIGKILL skips every cleanup). Never one of a live process:
/// every test of this binary shares one PID, and a benchmark may be running beside it.
fn sweep_dead_bench_namespaces() {
    for name in bench_namespaces() {
        let Some(pid) = name
            .strip_prefix("nkbench-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn namespaces_of_dead_benchmark_runs_are_swept_and_live_ones_kept_as_root() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let dead = format!("nkbench-{dead_pid}-0");
    let live = format!("nkbench-{}-sweeptest", std::process::id());
    for name in [&dead, &live] {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
    }
    sweep_dead_bench_namespaces();
    let left = bench_namespaces();
    let _ = Command::new("ip").args(["netns", "del", &live]).status();
    let _ = Command::new("ip").args(["netns", "del", &dead]).status();
    assert!(
        !left.contains(&dead),
        "{dead} (pid {dead_pid} is dead) was kept"
    );
    assert!(left.contains(&live), "{live} (this process) was swept");
}

#[test]
fn connections_benchmark_runs_small_and_reports_every_reader_as_root() {
    if !require_root() || !require_tool("ip") || !require_tool("ss") {
        return;
    }
    sweep_dead_bench_namespaces();
    let docs = workspace_root().join("docs/benchmarks.md");
    let docs_before = std::fs::read(&docs).ok();
    let child = Command::new(env!("CARGO_BIN_EXE_bench_connections"))
        .args(["--namespaces", "3", "--pairs", "25", "--runs", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bench_connections");
    let pid = child.id();
    let out = child.wait_with_output().expect("bench_connections output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench_connections failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("3 network namespaces x 50 established sockets (150 sockets)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Every reader found all 150 established sockets"),
        "{stdout}"
    );
    for reader in [
        "nodekeeper census (sock_diag)",
        "nodekeeper /proc/net/tcp parser",
        // Not the "UNAVAILABLE: sock_diag fallback" row: root on a BTF kernel loads it.
        "one-pass BPF census (one walk of the node's tables)",
        "`ip netns exec NS ss -tan` loop",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {reader} |")))
            .unwrap_or_else(|| panic!("no row for {reader}:\n{stdout}"));
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 9, "{row}");
        for c in cells[1..6].iter().chain(&cells[7..8]) {
            let v: f64 = c.parse().unwrap_or_else(|_| panic!("cell {c:?} in {row}"));
            assert!(v.is_finite() && v >= 0.0, "cell {c:?} in {row}");
        }
    }
    let left: Vec<_> = bench_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("nkbench-{pid}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert_eq!(
        std::fs::read(&docs).ok(),
        docs_before,
        "a smoke run must not write docs/benchmarks.md"
    );
}

#[test]
fn connections_benchmark_rejects_bad_arguments_and_write_docs_with_small_sizes() {
    let bin = env!("CARGO_BIN_EXE_bench_connections");
    for args in [
        &["--namespaces", "0"][..],
        &["--bogus"][..],
        &["--pairs", "10", "--write-docs"][..],
    ] {
        let out = Command::new(bin).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
    }
}

// === the one-pass BPF census (issue #18) ===

/// (state, local, remote) of every TCP socket of a reading, sorted: what both readers must agree
/// on socket for socket (queues of active connections move between two reads).
fn socket_set(r: &NetnsReading) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = r
        .sockets
        .iter()
        .map(|s| {
            (
                s.state.name().to_string(),
                s.local.to_string(),
                s.remote.to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// (remote, established, active, idle) of each pool, idle after 1 s.
fn pools(r: &NetnsReading) -> Vec<(String, u64, u64, u64)> {
    let config = ConnectionsConfig {
        idle_after: ConfigDuration(std::time::Duration::from_secs(1)),
        ..ConnectionsConfig::default()
    };
    summarize(r, None, &config)
        .pools
        .iter()
        .map(|p| (p.remote.clone(), p.established, p.active, p.idle))
        .collect()
}

fn state_counts(r: &NetnsReading) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for s in &r.sockets {
        *m.entry(s.state.name().to_string()).or_default() += 1;
    }
    m
}

/// Listeners as (local, accept queue, backlog), sorted.
fn listener_queues(r: &NetnsReading) -> Vec<(String, u32, u32)> {
    let mut v: Vec<_> = r
        .sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| (s.local.to_string(), s.rqueue, s.wqueue))
        .collect();
    v.sort();
    v
}

/// A namespace created from inside `parent` (whose `tcp_child_ehash_entries` is set), so it
/// has a TCP hash table of its own; deleted on drop.
struct OwnTableNetns(String);

impl OwnTableNetns {
    fn new(parent: &Netns) -> Self {
        sweep_dead_bench_namespaces();
        let name = format!("nkbench-{}-owntable", std::process::id());
        let status = Command::new("nsenter")
            .arg(format!("--net={}", parent.path().display()))
            .args(["ip", "netns", "add", &name])
            .status()
            .expect("nsenter");
        assert!(
            status.success(),
            "nsenter ... ip netns add {name}: {status}"
        );
        let ns = OwnTableNetns(name);
        let up = Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success());
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for OwnTableNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `bench_connections --hold NETNS PAIRS`: PAIRS loopback pairs and a listener in NETNS until
/// its stdin closes.
fn loopback_pairs(netns: &std::path::Path, pairs: usize) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench_connections"))
        .args(["--hold", &netns.display().to_string(), &pairs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

#[test]
fn one_pass_bpf_census_equals_sock_diag_and_ss_socket_for_socket_as_root() {
    if !require_root()
        || !require_tool("ip")
        || !require_tool("ss")
        || !require_tool("nsenter")
        || !require_tool("python3")
    {
        return;
    }
    // srv: a served port and a listener that never accepts (its queue fills); pod: outbound
    // pools, IPv6 loopback connections and their listener, TIME_WAIT, UDP; own: a namespace with
    // its own TCP table (tcp_child_ehash_entries), walked separately.
    let srv = Netns::new("bpsrv");
    let pod = Netns::new("bppod");
    let (srv_ip, _) = link(&srv, &pod, 91);
    let _server = Holder::start(
        Some(&srv),
        &json!({"serve": [{"addr": srv_ip, "port": 5432}],
                "listen": [{"addr": srv_ip, "port": 7000, "backlog": 3}]}),
    );
    let _client = Holder::start(
        Some(&pod),
        &json!({"serve": [{"addr": "::1", "port": 6000}],
                "connect": [{"addr": srv_ip, "port": 5432, "count": 37, "active": 10},
                            {"addr": "::1", "port": 6000, "count": 3}],
                "fill": [{"addr": srv_ip, "port": 7000, "count": 4}],
                "time_wait": 4, "udp": 2}),
    );
    let parent = Netns::new("bpparent");
    parent.sysctl("net.ipv4.tcp_child_ehash_entries", "128");
    let own = OwnTableNetns::new(&parent);
    let mut own_holder = loopback_pairs(&own.path(), 20);

    // Silent connections become idle (idleAfter 1 s) while active ones tick every 100 ms.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let paths = vec![srv.path(), pod.path(), own.path()];
    let mut one_pass = OnePass::load(65_536).expect("the one-pass census loads as root");
    let bpf = one_pass.read_namespaces(&paths).expect("one-pass census");
    let diag = read_namespaces(&paths, SourcePreference::SockDiag);
    let ss_own = {
        let out = Command::new("ip")
            .args(["netns", "exec", &own.0, "ss", "-tanH"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The holder exits (closing its sockets) when its stdin closes.
    drop(own_holder.stdin.take());
    let _ = own_holder.wait();

    for (i, (b, d)) in bpf.iter().zip(&diag).enumerate() {
        let b = b
            .as_ref()
            .unwrap_or_else(|e| panic!("one pass, {:?}: {e}", paths[i]));
        let d = d
            .as_ref()
            .unwrap_or_else(|e| panic!("sock_diag, {:?}: {e}", paths[i]));
        assert!(!b.sockets.is_empty(), "{:?}: no socket", paths[i]);
        assert_eq!(socket_set(b), socket_set(d), "{:?}", paths[i]);
        assert_eq!(listener_queues(b), listener_queues(d), "{:?}", paths[i]);
        assert_eq!(b.udp_sockets, d.udp_sockets, "{:?}", paths[i]);
        assert_eq!(pools(b), pools(d), "{:?}: pools (active/idle)", paths[i]);
    }
    let pod_pools = pools(bpf[1].as_ref().unwrap());
    assert!(
        pod_pools.contains(&(format!("{srv_ip}:5432"), 37, 10, 27)),
        "37 to :5432, 10 active, 27 idle: {pod_pools:?}"
    );
    let (b_srv, b_pod) = (bpf[0].as_ref().unwrap(), bpf[1].as_ref().unwrap());
    assert_eq!(state_counts(b_srv), srv.ss().tcp_states(), "srv vs ss");
    assert_eq!(state_counts(b_pod), pod.ss().tcp_states(), "pod vs ss");
    // The harness made what was asked (so the equalities above are not about empty sets).
    assert_eq!(state_counts(b_pod).get("time_wait"), Some(&4));
    assert_eq!(
        listener_queues(b_srv)
            .iter()
            .find(|l| l.0.ends_with(":7000"))
            .map(|l| (l.1, l.2)),
        Some((4, 3)),
        "the never-accepting listener's full queue"
    );
    assert!(
        b_pod.sockets.iter().any(|s| s.local.is_ipv6()),
        "IPv6 sockets"
    );
    let b_own = bpf[2].as_ref().unwrap();
    assert_eq!(state_counts(b_own).get("established"), Some(&40));
    let ss_own_established = ss_own.lines().filter(|l| l.starts_with("ESTAB")).count();
    assert_eq!(ss_own_established, 40, "ss in the own-table namespace");
}

/// Refuses `bpf(2)` with EPERM in the calling thread only (and threads it starts): what a
/// seccomp profile or a missing CAP_BPF does to the agent.
#[cfg(target_arch = "x86_64")]
fn deny_bpf_in_this_thread() {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        f(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        f(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        f(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        f(JEQ_K, 0, 1, libc::SYS_bpf as u32),
        f(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
        f(RET_K, 0, 0, RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prctl with a filter that outlives the call; both act on this thread only.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const libc::sock_fprog),
            0,
            "PR_SET_SECCOMP: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn without_bpf_the_one_pass_census_says_why_and_falls_back_to_sock_diag_as_root() {
    if !require_root() || !require_tool("ip") || !require_tool("ss") || !require_tool("python3") {
        return;
    }
    let pod = Netns::new("bpdeny");
    let _holder = Holder::start(
        Some(&pod),
        &json!({"serve": [{"addr": "127.0.0.1", "port": 6001}],
                "connect": [{"addr": "127.0.0.1", "port": 6001, "count": 5}]}),
    );
    let paths = vec![pod.path()];
    // aya probes the kernel's BPF features once per process and keeps the answer: probed first
    // from the thread below, bpf() refused, every later load in this (shared, one-binary) test
    // process would get maps created without the features the object needs and fail with EINVAL.
    // Probe them here, where bpf() works; the thread's load still fails at its first bpf().
    drop(OnePass::load(65_536).expect("the one-pass census loads as root"));
    let (load_error, readings, reason) = std::thread::spawn(move || {
        deny_bpf_in_this_thread();
        let err = OnePass::load(1024).expect_err("bpf() refused: the load must fail");
        let (readings, reason) = census_with_fallback(None, Some(&err), &paths);
        (err, readings, reason)
    })
    .join()
    .unwrap();
    assert!(
        matches!(load_error, OnePassError::Unavailable(_)),
        "{load_error:?}"
    );
    let reason = reason.expect("the fallback names its reason");
    assert!(reason.contains("unavailable"), "{reason}");
    let r = readings[0].as_ref().expect("sock_diag fallback reading");
    assert_eq!(state_counts(r), pod.ss().tcp_states());
    assert_eq!(state_counts(r).get("established"), Some(&10));
}

#[test]
fn the_committed_bpf_object_is_the_build_script_output_of_its_source() {
    if !require_tool("clang") || !require_tool("llvm-strip") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tcp_census.bpf.o");
    let status = Command::new(workspace_root().join("agent/bpf/build.sh"))
        .arg(&out)
        .status()
        .expect("agent/bpf/build.sh");
    assert!(status.success(), "agent/bpf/build.sh: {status}");
    let built = std::fs::read(&out).unwrap();
    assert!(
        built == nodekeeper::metrics::connections::bpf::OBJECT,
        "agent/bpf/tcp_census.bpf.o is not what agent/bpf/build.sh makes of tcp_census.bpf.c \
         (run agent/bpf/build.sh and commit the object; same clang as CI's Debian 12: {})",
        String::from_utf8_lossy(
            &Command::new("clang")
                .arg("--version")
                .output()
                .unwrap()
                .stdout
        )
        .lines()
        .next()
        .unwrap_or("")
    );
}
