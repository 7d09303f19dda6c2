//! Network namespaces standing in for pods, for the connection-census tests: RAII namespaces
//! (`ip netns add nk-...`, loopback up, deleted on drop even on panic), veth links between a
//! pod namespace and a "server" namespace on private 10.77.x.y/24 subnets, and holder processes
//! (`tests/py/conn_holder.py`) that open and keep a known set of sockets inside them. `ss` reads
//! a namespace back so a test can first prove the harness made exactly what it asked for.
//! `Netns::enter_fresh` moves the calling test thread into a namespace of its own for a whole
//! test (the DNS tests: servers, agent and clients all on 127.0.0.0/8 inside it).
//!
//! Never touches the host's interfaces, routes or firewall: links are created directly inside
//! the namespaces (`ip link add ... netns A ... peer ... netns B`). The only thing that ever runs
//! in the host namespace is a hostNetwork holder, and it binds loopback only, on high ports.
//!
//! ```no_run
//! use nodekeeper_tests::netns_pods::{Holder, Netns, link};
//! let srv = Netns::new("srv");
//! let pod = Netns::new("pod-a");
//! let (srv_ip, _pod_ip) = link(&srv, &pod, 0);
//! let _server = Holder::start(Some(&srv), &serde_json::json!({"serve": [{"addr": "0.0.0.0", "port": 5432}]}));
//! let client = Holder::start(Some(&pod), &serde_json::json!({"connect": [{"addr": srv_ip, "port": 5432, "count": 37}]}));
//! assert_eq!(pod.ss().established_to(&format!("{srv_ip}:5432")), 37);
//! # drop(client);
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::{python, workspace_root};

/// How long a holder may take to build its sockets (10k connections on a busy 2-core VM).
const HOLDER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Prefix of every namespace this harness creates: `nk-TAG-PID-N`.
const PREFIX: &str = "nk-";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `cmd`, panicking with its output when it fails.
fn run(cmd: &mut Command) -> Output {
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
    out
}

fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

// === impl Netns ===

/// A named network namespace, deleted (with every socket and link in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `nk-TAG-PID-N` with loopback up. Namespaces left behind by a test process that was
    /// killed (SIGKILL skips Drop) are swept first.
    pub fn new(tag: &str) -> Netns {
        sweep_stale();
        let name = format!("{PREFIX}{tag}-{}-{}", std::process::id(), next_id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`: a path that `setns` accepts, like `/proc/PID/ns/net`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// The namespace's identity as the kernel names it, `net:[INODE]`.
    pub fn id(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(self.path())
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path().display()))
            .ino();
        format!("net:[{ino}]")
    }

    /// A command run inside the namespace (`ip netns exec NAME PROGRAM`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Sets a namespaced sysctl (`net.ipv4.ip_local_port_range`, `net.core.somaxconn`...).
    pub fn sysctl(&self, key: &str, value: &str) {
        run(self
            .command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]));
    }

    /// The TCP and UDP sockets in the namespace as `ss -tuanH` sees them.
    pub fn ss(&self) -> SsTable {
        let out = run(self.command("ss").args(["-tuanH"]));
        SsTable::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// The namespace's `TcpExt` counter `name` (e.g. "ListenOverflows") from its
    /// /proc/net/netstat, read by a process inside it.
    pub fn tcp_ext(&self, name: &str) -> u64 {
        let out = run(self.command("cat").arg("/proc/net/netstat"));
        tcp_ext(&String::from_utf8_lossy(&out.stdout), name)
            .unwrap_or_else(|| panic!("TcpExt {name} not in /proc/net/netstat"))
    }

    /// Moves the calling thread into the namespace (`setns(CLONE_NEWNET)`) until the guard
    /// drops, which moves it back to where it was. Only this thread moves: sockets it opens,
    /// threads it starts and processes it spawns from now on live in the namespace (they
    /// inherit the namespace of the thread that creates them); other threads, and threads or
    /// pools created before, stay where they are. Drop the guard before the namespace (see
    /// [`Netns::enter_fresh`], which gets that order right).
    pub fn enter(&self) -> EnteredNetns {
        let home = std::fs::File::open(THREAD_NETNS)
            .unwrap_or_else(|e| panic!("open {THREAD_NETNS}: {e}"));
        let target = std::fs::File::open(self.path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()));
        nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
        let entered = EnteredNetns {
            home,
            name: self.name.clone(),
            _this_thread: PhantomData,
        };
        assert_eq!(
            current_netns(),
            self.id(),
            "this thread is in {} after setns",
            self.name
        );
        entered
    }

    /// A fresh namespace (`nk-TAG-PID-N`, loopback up) with the calling thread inside it, for
    /// a test that runs entirely in a network namespace of its own: everything it starts on
    /// 127.0.0.0/8 (servers, the agent, clients) is invisible to the host and to other tests.
    /// Make it the test's first local, so it drops last: the test's processes are killed while
    /// the namespace still exists, then the thread goes home, then the namespace is deleted.
    pub fn enter_fresh(tag: &str) -> InNetns {
        let ns = Netns::new(tag);
        let entered = ns.enter();
        InNetns {
            _entered: entered,
            ns,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// The calling thread's own network namespace link (`/proc/thread-self/ns/net`): which
/// namespace this thread is in (the process's, `/proc/self`, is the main thread's).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// The calling thread's network namespace as the kernel names it, `net:[INODE]` (comparable
/// with [`Netns::id`]).
pub fn current_netns() -> String {
    std::fs::read_link(THREAD_NETNS)
        .unwrap_or_else(|e| panic!("readlink {THREAD_NETNS}: {e}"))
        .to_string_lossy()
        .into_owned()
}

// === impl EnteredNetns ===

/// The calling thread inside a [`Netns`] (from [`Netns::enter`]); dropping it moves the thread
/// back to the namespace it came from. Not `Send`: it must drop on the thread that entered.
#[derive(Debug)]
pub struct EnteredNetns {
    /// The namespace the thread was in before (an open `/proc/thread-self/ns/net`).
    home: std::fs::File,
    name: String,
    _this_thread: PhantomData<*const ()>,
}

impl Drop for EnteredNetns {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(&self.home, nix::sched::CloneFlags::CLONE_NEWNET) {
            let msg = format!("setns back out of {}: {e}", self.name);
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// A fresh namespace with the calling thread inside it ([`Netns::enter_fresh`]). On drop the
/// thread leaves first, then the namespace is deleted (fields drop in declaration order).
#[derive(Debug)]
pub struct InNetns {
    _entered: EnteredNetns,
    ns: Netns,
}

impl InNetns {
    pub fn netns(&self) -> &Netns {
        &self.ns
    }
}

/// `TcpExt: NAME` from /proc/net/netstat text (a header line of names, then one of values).
pub fn tcp_ext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines();
    while let Some(head) = lines.next() {
        let values = lines.next()?;
        if !head.starts_with("TcpExt:") {
            continue;
        }
        let i = head.split_whitespace().position(|n| n == name)?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

/// Deletes `nk-*-PID-N` namespaces whose creating process is gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let mut parts = rest.rsplitn(3, '-');
        let (_n, pid) = (parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A veth link between `server` and `pod` on subnet 10.77.`subnet`.0/24: the server side gets
/// .1, the pod side (named eth0, as in a pod) .2. Returns (server address, pod address).
pub fn link(server: &Netns, pod: &Netns, subnet: u8) -> (String, String) {
    let srv_if = format!("nkv{}", next_id());
    ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        &pod.name,
        "type",
        "veth",
        "peer",
        "name",
        &srv_if,
        "netns",
        &server.name,
    ]);
    let (srv_ip, pod_ip) = (format!("10.77.{subnet}.1"), format!("10.77.{subnet}.2"));
    ip(&[
        "-n",
        &server.name,
        "addr",
        "add",
        &format!("{srv_ip}/24"),
        "dev",
        &srv_if,
    ]);
    ip(&["-n", &server.name, "link", "set", &srv_if, "up"]);
    ip(&[
        "-n",
        &pod.name,
        "addr",
        "add",
        &format!("{pod_ip}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &pod.name, "link", "set", "eth0", "up"]);
    (srv_ip, pod_ip)
}

/// Makes every address of `prefix` (e.g. "10.78.0.0/16") reach `server` from `pod` over their
/// link, and `server` accept connections to any of them (a `local` route: AnyIP), so one
/// listener on 0.0.0.0 there answers 65k distinct remote addresses.
pub fn route_any_ip(server: &Netns, pod: &Netns, server_ip: &str, prefix: &str) {
    ip(&["-n", &pod.name, "route", "add", prefix, "via", server_ip]);
    ip(&[
        "-n",
        &server.name,
        "route",
        "add",
        "local",
        prefix,
        "dev",
        "lo",
    ]);
}

// === impl Holder ===

/// A `conn_holder.py` process holding sockets (see the script for the spec). Killed on drop.
pub struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Holder {
    /// Starts a holder inside `ns` (None: in this process's own namespace, i.e. the host's, for
    /// a hostNetwork pod: loopback only) and waits for its "ready".
    pub fn start(ns: Option<&Netns>, spec: &serde_json::Value) -> Holder {
        let script = workspace_root().join("tests/py/conn_holder.py");
        let mut cmd = match ns {
            Some(ns) => ns.command(&python()),
            None => Command::new(python()),
        };
        cmd.arg(script).arg(spec.to_string());
        Holder::spawn(cmd, &format!("{spec}"))
    }

    fn spawn(mut cmd: Command, what: &str) -> Holder {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("holder.log");
        let err = std::fs::File::create(&log).expect("holder log");
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(err);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn holder {what}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("holder stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more: keep draining so the holder never blocks.
                    continue;
                }
            }
        });
        let mut holder = Holder {
            child,
            stdin,
            log,
            _dir: dir,
        };
        match rx.recv_timeout(HOLDER_READY_TIMEOUT) {
            Ok(line) if line == "ready" => holder,
            Ok(line) => {
                let _ = holder.child.wait();
                panic!("holder {what}: {line}\n{}", holder.log_text())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = holder.child.wait();
                panic!(
                    "holder {what}: exited ({status:?}) before ready\n{}",
                    holder.log_text()
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "holder {what}: not ready within {HOLDER_READY_TIMEOUT:?}\n{}",
                holder.log_text()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Closes stdin (the holder exits on its own, closing every socket it holds) and reaps it.
    pub fn stop(mut self) {
        self.stdin.take();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === impl SsTable ===

/// One socket as `ss -tuanH` prints it; TCP states renamed to the census's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsSocket {
    /// "tcp" or "udp".
    pub proto: String,
    /// "established", "time_wait", "listen", "syn_sent", ... (for UDP: ss's own word, "unconn").
    pub state: String,
    pub recv_q: u64,
    pub send_q: u64,
    pub local: String,
    pub peer: String,
}

impl SsSocket {
    pub fn local_port(&self) -> u16 {
        port_of(&self.local)
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0)
}

/// A namespace's sockets as `ss` saw them.
#[derive(Debug, Clone, Default)]
pub struct SsTable {
    pub sockets: Vec<SsSocket>,
}

/// ss's state words -> the census's (`tcp_states` keys).
pub fn state_name(ss_state: &str) -> String {
    match ss_state {
        "ESTAB" => "established",
        "TIME-WAIT" => "time_wait",
        "LISTEN" => "listen",
        "SYN-SENT" => "syn_sent",
        "SYN-RECV" => "syn_recv",
        "FIN-WAIT-1" => "fin_wait1",
        "FIN-WAIT-2" => "fin_wait2",
        "CLOSE-WAIT" => "close_wait",
        "LAST-ACK" => "last_ack",
        "CLOSING" => "closing",
        "CLOSE" | "UNCONN" => "close",
        other => return other.to_ascii_lowercase(),
    }
    .to_string()
}

impl SsTable {
    pub fn parse(text: &str) -> SsTable {
        let sockets = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 6 {
                    return None;
                }
                Some(SsSocket {
                    proto: f[0].to_string(),
                    state: state_name(f[1]),
                    recv_q: f[2].parse().ok()?,
                    send_q: f[3].parse().ok()?,
                    local: f[4].to_string(),
                    peer: f[5].to_string(),
                })
            })
            .collect();
        SsTable { sockets }
    }

    pub fn tcp(&self) -> impl Iterator<Item = &SsSocket> {
        self.sockets.iter().filter(|s| s.proto == "tcp")
    }

    /// TCP sockets by census state name.
    pub fn tcp_states(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for s in self.tcp() {
            *m.entry(s.state.clone()).or_default() += 1;
        }
        m
    }

    pub fn udp_count(&self) -> u64 {
        self.sockets.iter().filter(|s| s.proto == "udp").count() as u64
    }

    /// Established TCP connections whose peer is `remote` ("10.77.0.1:5432").
    pub fn established_to(&self, remote: &str) -> u64 {
        self.tcp()
            .filter(|s| s.state == "established" && s.peer == remote)
            .count() as u64
    }

    /// Established TCP connections by peer address:port.
    pub fn established_by_peer(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for s in self.tcp().filter(|s| s.state == "established") {
            *m.entry(s.peer.clone()).or_default() += 1;
        }
        m
    }

    /// Listening sockets: (local address, accept queue = Recv-Q, backlog = Send-Q).
    pub fn listeners(&self) -> Vec<(String, u64, u64)> {
        self.tcp()
            .filter(|s| s.state == "listen")
            .map(|s| (s.local.clone(), s.recv_q, s.send_q))
            .collect()
    }

    /// Distinct local ports in `low..=high` of non-listening TCP sockets: the census's
    /// `ephemeral_ports_in_use`.
    pub fn ephemeral_ports_in_use(&self, low: u16, high: u16) -> u64 {
        let ports: std::collections::BTreeSet<u16> = self
            .tcp()
            .filter(|s| s.state != "listen")
            .map(SsSocket::local_port)
            .filter(|p| (low..=high).contains(p))
            .collect();
        ports.len() as u64
    }
}

/// The namespace's `net.ipv4.ip_local_port_range` as (low, high).
pub fn port_range(ns: &Netns) -> (u16, u16) {
    let out = run(ns
        .command("cat")
        .arg("/proc/sys/net/ipv4/ip_local_port_range"));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|p| p.parse().expect("port"));
    (it.next().expect("low"), it.next().expect("high"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_parse_into_census_states() {
        let t = SsTable::parse(
            "tcp   LISTEN    3      2      0.0.0.0:8080       0.0.0.0:*\n\
             tcp   ESTAB     0      0      10.77.0.2:40001    10.77.0.1:5432\n\
             tcp   TIME-WAIT 0      0      127.0.0.1:40002    127.0.0.1:39999\n\
             udp   UNCONN    0      0      127.0.0.1:5353     0.0.0.0:*\n",
        );
        assert_eq!(t.listeners(), vec![("0.0.0.0:8080".to_string(), 3, 2)]);
        assert_eq!(t.established_to("10.77.0.1:5432"), 1);
        assert_eq!(t.tcp_states()["time_wait"], 1);
        assert_eq!(t.udp_count(), 1);
        assert_eq!(t.ephemeral_ports_in_use(40000, 40999), 2);
    }

    #[test]
    fn tcp_ext_reads_the_named_counter() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 3 4\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(tcp_ext(text, "ListenOverflows"), Some(3));
        assert_eq!(tcp_ext(text, "ListenDrops"), Some(4));
        assert_eq!(tcp_ext(text, "Nope"), None);
    }
}
