//! Real DNS peers for the DNS cache tests and benchmark: Debian's `unbound` serving test zones
//! authoritatively from zone files (`auth-zone`, so NXDOMAIN/NODATA carry the zone's SOA with the
//! negative TTL we set), optionally TCP only (`do-udp: no`: UDP is refused), and `dnsmasq` as a
//! stub-domain server. Every server listens on a loopback address and port the test picks, logs
//! each query it receives (so a test can tell a cache hit from a forwarded query) and is killed
//! on drop. Also: a `dig` wrapper that parses the answer, a raw DNS message builder for the
//! bad-input tests, and `/proc` readers for memory bounds.
//!
//! Servers, `dig` and sockets open in the calling thread's network namespace. The DNS tests call
//! everything here from inside a namespace of their own (`netns_pods::Netns::enter_fresh`), so
//! their 127.0.0.0/8 is that namespace's loopback, never the host's: this module never touches
//! the host's resolver, interfaces or rules.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::Proc;

// === loopback addresses and ports ===

/// A loopback address of its own for each call in this process (127.53.x.y, y never 0 or 255),
/// so servers never share an address even when the port allocator races (tests in namespaces of
/// their own cannot collide anyway; this keeps a test's own servers apart, and any caller
/// outside a namespace).
pub fn loopback_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // The process id spreads test binaries running at the same time over the third octet.
    let third = ((std::process::id() % 64) * 4 + (n / 250) % 4) as u8;
    Ipv4Addr::new(127, 53, third, (n % 250) as u8 + 2)
}

/// A port free for both UDP and TCP on `ip` right now.
pub fn free_dns_port(ip: Ipv4Addr) -> u16 {
    for _ in 0..100 {
        let udp = UdpSocket::bind((ip, 0)).expect("bind a loopback UDP socket");
        let port = udp.local_addr().expect("local addr").port();
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on {ip}");
}

/// A fresh loopback address and a free port on it.
pub fn free_dns_addr() -> SocketAddr {
    let ip = loopback_ip();
    SocketAddr::from((ip, free_dns_port(ip)))
}

// === zones ===

/// A zone file: `$ORIGIN`, an SOA whose TTL and minimum (the RFC 2308 negative TTL) are both
/// `negative_ttl`, an NS, and the records given as zone-file lines relative to the origin.
#[derive(Debug, Clone)]
pub struct Zone {
    pub origin: String,
    pub negative_ttl: u32,
    pub records: Vec<String>,
}

impl Zone {
    pub fn new(origin: &str, negative_ttl: u32) -> Zone {
        let origin = format!("{}.", origin.trim_end_matches('.'));
        Zone {
            origin,
            negative_ttl,
            records: Vec::new(),
        }
    }

    /// One zone-file line, e.g. `"a 300 IN A 192.0.2.1"`.
    pub fn record(mut self, line: &str) -> Zone {
        self.records.push(line.to_string());
        self
    }

    pub fn file_text(&self) -> String {
        let o = &self.origin;
        let n = self.negative_ttl;
        let mut s = format!(
            "$ORIGIN {o}\n$TTL 300\n@ {n} IN SOA ns.{o} hostmaster.{o} 1 3600 600 86400 {n}\n\
             @ 300 IN NS ns.{o}\nns 300 IN A 192.0.2.53\n"
        );
        for r in &self.records {
            s.push_str(r);
            s.push('\n');
        }
        s
    }
}

/// Addresses in `big.example.test` A: 40 x 16 bytes of answer, over 512 bytes, so a UDP answer
/// without EDNS (or with a 512-byte buffer) is truncated (TC).
pub const BIG_RRSET: u8 = 40;
/// The SOA TTL and minimum of every fixture zone: negative answers are cacheable this long.
pub const NEGATIVE_TTL: u32 = 7;

/// `example.test`, the default upstream's zone:
/// - `a` A 192.0.2.1 and AAAA 2001:db8::1, TTL 300 (above the cache's 30 s cap)
/// - `short` A 192.0.2.5, TTL 5 (below the cap: decrements from 5)
/// - `c1` CNAME `c2` CNAME `c3` A 192.0.2.3
/// - `_sip._udp` SRV 10 5 5060 `a.example.test.`
/// - `txtonly` TXT only (an A query is NODATA); `nope` does not exist (NXDOMAIN)
/// - `big` A x 40 (TC over UDP); `*.wild` A 192.0.2.200 (any number of distinct names)
pub fn example_zone() -> Zone {
    let mut z = Zone::new("example.test", NEGATIVE_TTL)
        .record("a 300 IN A 192.0.2.1")
        .record("a 300 IN AAAA 2001:db8::1")
        .record("short 5 IN A 192.0.2.5")
        .record("c1 300 IN CNAME c2")
        .record("c2 300 IN CNAME c3")
        .record("c3 300 IN A 192.0.2.3")
        .record("_sip._udp 300 IN SRV 10 5 5060 a.example.test.")
        .record("txtonly 300 IN TXT \"only a TXT here\"")
        .record("*.wild 300 IN A 192.0.2.200");
    for i in 1..=BIG_RRSET {
        z = z.record(&format!("big 300 IN A 192.0.2.{i}"));
    }
    z
}

/// `cluster.local`, the cluster upstream's zone (kube-dns stand-in): a Service and its SRV.
pub fn cluster_zone() -> Zone {
    Zone::new("cluster.local", NEGATIVE_TTL)
        .record("web.default.svc 30 IN A 10.96.0.10")
        .record("_http._tcp.web.default.svc 30 IN SRV 0 100 80 web.default.svc.cluster.local.")
}

/// `10.in-addr.arpa`, the cluster's reverse zone: 10.96.0.10 -> web.default.svc.cluster.local.
pub fn reverse_zone() -> Zone {
    Zone::new("10.in-addr.arpa", NEGATIVE_TTL)
        .record("10.0.96 30 IN PTR web.default.svc.cluster.local.")
}

// === unbound as an authoritative upstream ===

/// Debian's `unbound` answering `zones` authoritatively (AA) from zone files, logging every
/// query it receives. Started by `start`, killed on drop; `stop`/`start` keep the address.
pub struct Unbound {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    tcp_only: bool,
    proc: Option<Proc>,
}

impl Unbound {
    /// Serves `zones` over UDP and TCP on a fresh loopback address.
    pub fn serving(zones: &[Zone]) -> Unbound {
        Self::build(zones, false)
    }

    /// Serves `zones` over TCP only: UDP on its port is closed (a query is refused by ICMP).
    pub fn serving_tcp_only(zones: &[Zone]) -> Unbound {
        Self::build(zones, true)
    }

    fn build(zones: &[Zone], tcp_only: bool) -> Unbound {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_dns_addr();
        std::fs::write(
            dir.path().join("unbound.conf"),
            unbound_auth_config(dir.path(), addr, zones, tcp_only),
        )
        .expect("write unbound.conf");
        let mut u = Unbound {
            addr,
            dir,
            tcp_only,
            proc: None,
        };
        u.start();
        u
    }

    /// Starts (or restarts) the server and waits until it answers over TCP.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "unbound at {} already runs", self.addr);
        let mut cmd = Command::new("unbound");
        cmd.arg("-d")
            .arg("-c")
            .arg(self.dir.path().join("unbound.conf"));
        self.proc = Some(Proc::spawn("unbound", cmd, self.dir.path()));
        let addr = self.addr;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = dig(addr, &["+tcp", "+tries=1", "+time=1", "ns.", "A"]);
            if out.status.is_some() {
                break;
            }
            let alive = self.proc.as_mut().map(|p| p.alive()).unwrap_or(false);
            if !alive || Instant::now() > deadline {
                panic!(
                    "unbound at {addr} did not start; log:\n{}",
                    self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL): its port is closed, UDP queries are refused.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): queries are neither answered nor refused (timeouts).
    pub fn pause(&self) {
        self.proc.as_ref().expect("running").signal("STOP");
    }

    pub fn resume(&self) {
        self.proc.as_ref().expect("running").signal("CONT");
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    pub fn is_tcp_only(&self) -> bool {
        self.tcp_only
    }

    /// How many queries for `name` (absolute, trailing dot optional, any type) it has received.
    pub fn queries_for(&self, name: &str) -> usize {
        let name = format!(" {}. ", name.trim_end_matches('.').to_ascii_lowercase());
        std::fs::read_to_string(self.dir.path().join("queries.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains(&name))
            .count()
    }

    pub fn query_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("queries.log")).unwrap_or_default()
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        if let Some(p) = &self.proc {
            // A paused server must be resumed to die promptly on some kernels; harmless otherwise.
            let _ = Command::new("kill")
                .args(["-CONT", &p.pid().to_string()])
                .status();
        }
        self.stop();
    }
}

/// unbound.conf for an authoritative-only server: no recursion (`module-config: iterator`
/// with every query inside an auth-zone), one thread, query log, no chroot or privilege drop.
/// `test.` is one of unbound's default blocked local zones (RFC 6761); `nodefault` lifts it.
pub fn unbound_auth_config(dir: &Path, addr: SocketAddr, zones: &[Zone], tcp_only: bool) -> String {
    let d = dir.display();
    let mut conf = format!(
        "server:\n  interface: {ip}@{port}\n  port: {port}\n  do-ip6: no\n  do-udp: {udp}\n  \
         do-tcp: yes\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  \
         pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"{d}/queries.log\"\n  \
         log-queries: yes\n  verbosity: 0\n  do-daemonize: no\n  module-config: \"iterator\"\n  \
         num-threads: 1\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"test.\" nodefault\n  \
         local-zone: \"10.in-addr.arpa.\" nodefault\n  incoming-num-tcp: 100\n",
        ip = addr.ip(),
        port = addr.port(),
        udp = if tcp_only { "no" } else { "yes" },
    );
    for z in zones {
        let file = dir.join(format!("{}zone", z.origin));
        std::fs::write(&file, z.file_text()).expect("write zone file");
        conf.push_str(&format!(
            "auth-zone:\n  name: \"{}\"\n  zonefile: \"{}\"\n  for-downstream: yes\n  \
             for-upstream: no\n  fallback-enabled: no\n",
            z.origin,
            file.display()
        ));
    }
    conf
}

// === dnsmasq as a stub-domain server ===

/// Debian's `dnsmasq` answering `corp.test` from `--host-record`s, NXDOMAIN for other names in
/// it (`--local`), forwarding nothing, logging queries. Killed on drop.
pub struct Dnsmasq {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub proc: Proc,
}

/// `db.corp.test` A, as the stub-domain server answers it.
pub const CORP_DB_IP: &str = "192.0.2.77";

impl Dnsmasq {
    pub fn corp_test() -> Dnsmasq {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_dns_addr();
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-daemon",
            "--bind-interfaces",
            "--pid-file=",
            "--user=root",
            "--log-queries",
        ])
        .arg(format!("--listen-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg(format!(
            "--log-facility={}",
            dir.path().join("queries.log").display()
        ))
        // dnsmasq answers its own records with TTL 0 unless told otherwise: nothing to cache.
        .arg("--local-ttl=60")
        .arg(format!("--host-record=db.corp.test,{CORP_DB_IP}"))
        .arg("--local=/corp.test/");
        let mut proc = Proc::spawn("dnsmasq", cmd, dir.path());
        crate::wait_for(Duration::from_secs(10), "dnsmasq to answer", || {
            assert!(proc.alive(), "dnsmasq exited; log:\n{}", proc.log_text());
            dig(addr, &["+tries=1", "+time=1", "ready.corp.test", "A"])
                .status
                .map(|_| ())
        });
        Dnsmasq { addr, dir, proc }
    }

    pub fn queries_for(&self, name: &str) -> usize {
        let needle = format!("query[A] {} from", name.trim_end_matches('.'));
        std::fs::read_to_string(self.dir.path().join("queries.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }
}

// === the agent's dns: section ===

/// Where the cache under test forwards: the default group's server (UDP), the cluster group's
/// (TCP, for `cluster.local` and `10.in-addr.arpa`) and `corp.test`'s stub server.
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    pub default: Option<SocketAddr>,
    pub cluster: Option<SocketAddr>,
    pub corp_stub: Option<SocketAddr>,
}

/// The agent config (`dns:` only) for a cache on `listen`, no node wiring (the address is
/// already local: it is loopback), forwarding to `up`, with `cache_yaml` as extra lines under
/// `cache:` (one `key: value` per line) and `extra_yaml` as extra lines under `dns:`. No lame
/// duck period: these tests never hand over, and stopping should be quick.
pub fn agent_dns_config(
    listen: SocketAddr,
    up: &Upstreams,
    cache_yaml: &str,
    extra_yaml: &str,
) -> String {
    let servers = |a: Option<SocketAddr>| match a {
        Some(a) => format!("[\"{a}\"]"),
        None => "[]".into(),
    };
    let mut y = format!(
        "shutdownTimeout: 5s\ndns:\n  enabled: true\n  lameDuck: 0s\n  listenIps: [{ip}]\n  port: {port}\n  \
         node: {{manageInterface: false, rules: none}}\n  upstreams:\n    \
         default: {{servers: {default}, protocol: udp}}\n    \
         clusterZones: [cluster.local, 10.in-addr.arpa]\n    \
         cluster: {{servers: {cluster}, protocol: tcp}}\n    kubeDnsConfigMap: \"\"\n",
        ip = listen.ip(),
        port = listen.port(),
        default = servers(up.default),
        cluster = servers(up.cluster),
    );
    if let Some(stub) = up.corp_stub {
        y.push_str(&format!(
            "    stubDomains: {{\"corp.test\": [\"{stub}\"]}}\n"
        ));
    }
    y.push_str("  cache:\n");
    for l in cache_yaml.lines().filter(|l| !l.trim().is_empty()) {
        y.push_str(&format!("    {}\n", l.trim()));
    }
    if cache_yaml.trim().is_empty() {
        y.push_str("    maxTtl: 30s\n");
    }
    for l in extra_yaml.lines().filter(|l| !l.trim().is_empty()) {
        y.push_str(&format!("  {}\n", l.trim()));
    }
    y
}

// === dig ===

/// One record of a dig answer or authority section.
#[derive(Debug, Clone, PartialEq)]
pub struct Rr {
    pub name: String,
    pub ttl: u32,
    pub rtype: String,
    pub data: String,
}

/// What dig printed, parsed. `status` is None when no answer arrived (timeout, refused).
#[derive(Debug, Clone, Default)]
pub struct DigOutput {
    pub status: Option<String>,
    pub flags: Vec<String>,
    pub answer: Vec<Rr>,
    pub authority: Vec<Rr>,
    pub elapsed: Duration,
    pub raw: String,
}

impl DigOutput {
    pub fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// The data of every answer record of type `rtype`.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        self.answer
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect()
    }

    pub fn status(&self) -> &str {
        self.status.as_deref().unwrap_or("(no answer)")
    }
}

/// `dig @server -p port ARGS` (one try, 2 s unless ARGS say otherwise), parsed.
pub fn dig(server: SocketAddr, args: &[&str]) -> DigOutput {
    let start = Instant::now();
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+tries=1", "+time=2", "+nocookie"])
        .args(args)
        .output()
        .expect("run dig (dnsutils)");
    let elapsed = start.elapsed();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_dig(&raw, elapsed)
}

fn parse_dig(raw: &str, elapsed: Duration) -> DigOutput {
    let mut o = DigOutput {
        elapsed,
        raw: raw.to_string(),
        ..Default::default()
    };
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.split_once("status: ").map(|x| x.1) {
            o.status = rest.split(',').next().map(str::to_string);
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            let flags = rest.split(';').next().unwrap_or("");
            o.flags = flags.split_whitespace().map(str::to_string).collect();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";;") || line.trim().is_empty() {
            if line.trim().is_empty() {
                section = "";
            }
        } else if !line.starts_with(';') && !section.is_empty() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 4 {
                let rr = Rr {
                    name: f[0].to_string(),
                    ttl: f[1].parse().unwrap_or(u32::MAX),
                    rtype: f[3].to_string(),
                    data: f[4..].join(" "),
                };
                if section == "answer" {
                    o.answer.push(rr);
                } else {
                    o.authority.push(rr);
                }
            }
        }
    }
    o
}

// === raw messages (bad-input tests) ===

pub const TYPE_A: u16 = 1;

/// A query header + one question, RD set: `id`, opcode 0, QDCOUNT 1.
pub fn query_bytes(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00]); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QD=1 AN=0 NS=0 AR=0
    encode_name(&mut m, name);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes()); // IN
    m
}

pub fn encode_name(m: &mut Vec<u8>, name: &str) {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
}

/// The response code (low 4 bits of byte 3) of a DNS message.
pub fn rcode(msg: &[u8]) -> Option<u8> {
    msg.get(3).map(|b| b & 0x0f)
}

pub fn msg_id(msg: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.first()?, *msg.get(1)?]))
}

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;

/// Sends `msg` over UDP and waits up to `wait` for one reply.
pub fn udp_exchange(server: SocketAddr, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind client socket");
    s.set_read_timeout(Some(wait)).expect("timeout");
    s.send_to(msg, server).expect("send");
    let mut buf = vec![0u8; 65535];
    match crate::uninterrupted(|| s.recv_from(&mut buf)) {
        Ok((n, _)) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

// === /proc ===

/// A `Vm*:` line of /proc/PID/status in KiB (VmRSS, VmHWM).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Where a test can write generated inputs (dnsperf query files) next to its logs.
pub fn write_query_file(
    dir: &Path,
    name: &str,
    lines: impl IntoIterator<Item = String>,
) -> PathBuf {
    let path = dir.join(name);
    let mut text = String::new();
    for l in lines {
        text.push_str(&l);
        text.push('\n');
    }
    std::fs::write(&path, text).expect("write query file");
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dig_output_is_parsed() {
        let raw = ";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 4953\n\
                   ;; flags: qr aa rd ra; QUERY: 1, ANSWER: 0, AUTHORITY: 1, ADDITIONAL: 1\n\n\
                   ;; ANSWER SECTION:\nc1.example.test.\t300\tIN\tCNAME\tc2.example.test.\n\n\
                   ;; AUTHORITY SECTION:\nexample.test.\t\t7\tIN\tSOA\tns.example.test. h. 1 2 3 4 7\n";
        let o = parse_dig(raw, Duration::ZERO);
        assert_eq!(o.status(), "NXDOMAIN");
        assert!(o.has_flag("aa") && !o.has_flag("tc"));
        assert_eq!(o.data("CNAME"), vec!["c2.example.test."]);
        assert_eq!(o.authority[0].ttl, 7);
        assert_eq!(o.authority[0].rtype, "SOA");
    }

    #[test]
    fn loopback_ips_differ() {
        let a = loopback_ip();
        let b = loopback_ip();
        assert_ne!(a, b);
        assert!(a.is_loopback() && b.is_loopback());
    }
}
