//! Per-pod connection census: every TCP socket in each pod's network namespace, summarised into
//! states, connection pools by remote, listeners' accept queues, ephemeral ports, retransmits
//! and RTT (`pb::PodConnections`), for /metrics, GetMetrics and KEDA.
//!
//! TCP sockets are read by one BPF walk of the node's shared tables ([`bpf`], the default when
//! bpf() is allowed), else per namespace: namespaces are entered with `setns` on one dedicated
//! OS thread per census (never a tokio worker) and each is read through netlink `sock_diag`
//! (what `ss` uses) or, when the kernel refuses it, by parsing `/proc/thread-self/net/tcp*`.
//! [`census::Census`] picks the reader and reports its fallbacks. Reads only.

pub mod bpf;
pub mod census;
pub mod collector;
pub mod pins;
pub mod procfs;
pub mod sock_diag;
mod summary;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use census::{Census, CensusMetrics};
pub use collector::ConnectionCollector;
pub use summary::{OTHER_INBOUND, summarize, summarize_pinned};

use crate::config::ConfigDuration;

// === config ===

/// Which reader counts sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SourcePreference {
    /// The BPF one pass when bpf() is allowed, else per-namespace sock_diag, else procfs; every
    /// fallback is logged once with its reason and counted (docs/connections.md).
    #[default]
    Auto,
    /// The BPF one pass only: a node where it cannot run reports census errors, not another count.
    Bpf,
    SockDiag,
    Procfs,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConnectionsConfig {
    pub enabled: bool,
    pub source: SourcePreference,
    /// A connection with no data sent or received for this long counts as idle.
    pub idle_after: ConfigDuration,
    /// Connection pools (remotes) reported per pod; the rest are summed as "other". Bounds the
    /// series per pod on /metrics whatever the number of remotes.
    pub top_remotes: usize,
    /// Listening sockets reported per pod, largest accept queue first.
    pub top_listeners: usize,
}

/// Long enough that a pooled connection between requests is not idle, short enough that a pool
/// sized for a peak that passed shows as idle within a scrape or two.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(30);
const TOP_LIMIT: usize = 1000;

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            source: SourcePreference::Auto,
            idle_after: ConfigDuration(DEFAULT_IDLE_AFTER),
            top_remotes: 10,
            top_listeners: 10,
        }
    }
}

impl ConnectionsConfig {
    /// (field under `metrics.connections`, problem) for every invalid value.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.idle_after.get() < Duration::from_millis(100) {
            out.push((
                "metrics.connections.idleAfter".into(),
                format!("{:?} is below the 100ms floor", self.idle_after.get()),
            ));
        }
        for (field, v) in [
            ("topRemotes", self.top_remotes),
            ("topListeners", self.top_listeners),
        ] {
            if v == 0 || v > TOP_LIMIT {
                out.push((
                    format!("metrics.connections.{field}"),
                    format!("{v} is out of range (1..={TOP_LIMIT})"),
                ));
            }
        }
        out
    }
}

// === sockets ===

/// An IPv6 address as every reader names it: a dual-stack socket talking IPv4 shows its peer as
/// `::ffff:a.b.c.d`, reported as the IPv4 address `a.b.c.d` (decision #18-h), so a pool is one
/// pool whichever reader counted it. The one place this rule lives (sock_diag, procfs, BPF).
pub fn ip_from_v6(v6: Ipv6Addr) -> IpAddr {
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// Kernel TCP states (include/net/tcp_states.h), named as `ss` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
}

impl TcpState {
    pub fn from_kernel(n: u8) -> Option<Self> {
        Some(match n {
            1 => Self::Established,
            2 => Self::SynSent,
            // 12 is TCP_NEW_SYN_RECV, the request sockets of a listener: ss shows them as SYN-RECV.
            3 | 12 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::SynSent => "syn_sent",
            Self::SynRecv => "syn_recv",
            Self::FinWait1 => "fin_wait1",
            Self::FinWait2 => "fin_wait2",
            Self::TimeWait => "time_wait",
            Self::Close => "close",
            Self::CloseWait => "close_wait",
            Self::LastAck => "last_ack",
            Self::Listen => "listen",
            Self::Closing => "closing",
        }
    }
}

/// One TCP socket as either reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub state: TcpState,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Listeners: the accept queue length; others: bytes not yet read.
    pub rqueue: u32,
    /// Listeners (sock_diag only): the accept queue limit; others: bytes not yet acknowledged.
    pub wqueue: u32,
    /// 0 for TIME_WAIT and request sockets: they belong to no process.
    pub inode: u64,
    pub retransmits: u32,
    /// Smoothed RTT (sock_diag only).
    pub rtt_us: Option<u32>,
    /// Milliseconds since data was last sent or received, whichever is later (sock_diag only).
    pub last_data_ms: Option<u32>,
}

/// How a namespace's sockets were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The one-pass BPF walk (same fields as sock_diag: queues, backlog, RTT, idle).
    Bpf,
    SockDiag,
    Procfs,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Bpf, Source::SockDiag, Source::Procfs];

    pub fn name(self) -> &'static str {
        match self {
            Self::Bpf => "bpf",
            Self::SockDiag => "sock_diag",
            Self::Procfs => "procfs",
        }
    }
}

/// Everything read from one network namespace.
#[derive(Debug, Clone)]
pub struct NetnsReading {
    pub source: Source,
    pub sockets: Vec<Socket>,
    pub udp_sockets: u64,
    /// TcpExt ListenOverflows, ListenDrops; `None` when netstat was unreadable.
    pub listen_counters: Option<(u64, u64)>,
    pub port_range: Option<(u16, u16)>,
    /// Why the preferred reader (the BPF one pass, then sock_diag) was not used (Auto fell back).
    pub fallback_reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    #[error(transparent)]
    Namespace(#[from] crate::host::NamespaceError),
    #[error("cannot enter network namespace {}: {error}", path.display())]
    Enter { path: PathBuf, error: String },
    #[error(transparent)]
    SockDiag(#[from] sock_diag::SockDiagError),
    #[error("cannot read {path}: {error}")]
    Procfs { path: String, error: String },
    /// metrics.connections.source is bpf and the one pass could not count this collection.
    #[error("{0}")]
    Bpf(String),
}

/// Reads every namespace in `paths` (`/proc/PID/ns/net`, `/run/netns/NAME`) in turn, on one
/// dedicated thread that `setns`es into each; results are in the order of `paths`.
/// `pref` Bpf is read as Auto here: the one pass lives in [`Census`].
pub fn read_namespaces(
    paths: &[PathBuf],
    pref: SourcePreference,
) -> Vec<Result<NetnsReading, CensusError>> {
    if paths.is_empty() {
        return Vec::new();
    }
    let owned = paths.to_vec();
    let census = std::thread::Builder::new()
        .name("nodekeeper-census".into())
        .spawn(move || {
            let mut reader = Reader::new(pref);
            owned
                .iter()
                .map(|p| {
                    enter(p)?;
                    reader.read_current()
                })
                .collect::<Vec<_>>()
        })
        .expect("spawning a thread");
    census.join().unwrap_or_else(|_| {
        paths
            .iter()
            .map(|p| {
                Err(CensusError::Enter {
                    path: p.clone(),
                    error: "the census thread panicked".into(),
                })
            })
            .collect()
    })
}

fn enter(path: &Path) -> Result<(), CensusError> {
    let err = |error: String| CensusError::Enter {
        path: path.to_path_buf(),
        error,
    };
    let ns = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| err(e.to_string()))
}

/// Reads the calling thread's current namespace; keeps buffers across namespaces.
struct Reader {
    pref: SourcePreference,
    buf: Vec<u8>,
    /// Auto mode: sock_diag failed once with a reason that will not change (no kernel support).
    sock_diag_unavailable: Option<String>,
    /// Opens the netlink socket; a test swaps in a kernel that refuses it.
    open_diag: fn() -> Result<sock_diag::DiagSocket, sock_diag::SockDiagError>,
}

impl Reader {
    fn new(pref: SourcePreference) -> Self {
        Self {
            pref,
            buf: Vec::new(),
            sock_diag_unavailable: None,
            open_diag: sock_diag::DiagSocket::open,
        }
    }

    fn read_current(&mut self) -> Result<NetnsReading, CensusError> {
        let read = |name: &str| std::fs::read_to_string(format!("{}/{name}", procfs::NET_DIR));
        // sockstat is a few counters; /proc/net/udp would walk the node-wide UDP hash.
        let sockstat = match (read("sockstat"), read("sockstat6")) {
            (Ok(v4), Ok(v6)) => sock_diag::parse_sockstat(&v4, &v6),
            // No IPv6 in this kernel: no IPv6 sockets.
            (Ok(v4), Err(_)) => sock_diag::parse_sockstat(&v4, "TCP6: inuse 0\nUDP6: inuse 0\n"),
            _ => None,
        };
        let in_use = sockstat.map(|(tcp, _)| tcp);
        let mut sockets = Vec::new();
        let mut fallback_reason = None;
        let source = match self.pref {
            SourcePreference::Procfs => {
                read_procfs_tcp(&mut sockets)?;
                Source::Procfs
            }
            SourcePreference::SockDiag => {
                (self.open_diag)()?.dump_tcp(&mut self.buf, &mut sockets, in_use)?;
                Source::SockDiag
            }
            SourcePreference::Auto | SourcePreference::Bpf => {
                let tried = match &self.sock_diag_unavailable {
                    Some(why) => Err(why.clone()),
                    None => (self.open_diag)()
                        .and_then(|s| s.dump_tcp(&mut self.buf, &mut sockets, in_use))
                        .map_err(|e| {
                            let why = e.to_string();
                            if matches!(
                                e,
                                sock_diag::SockDiagError::Open(_)
                                    | sock_diag::SockDiagError::Kernel(_)
                            ) {
                                self.sock_diag_unavailable = Some(why.clone());
                            }
                            why
                        }),
                };
                match tried {
                    Ok(()) => Source::SockDiag,
                    Err(why) => {
                        sockets.clear();
                        read_procfs_tcp(&mut sockets)?;
                        fallback_reason = Some(why);
                        Source::Procfs
                    }
                }
            }
        };
        let udp_sockets = match sockstat {
            Some((_, udp)) => udp,
            None => ["udp", "udp6"]
                .iter()
                .filter_map(|f| read(f).ok())
                .map(|t| procfs::count_lines(&t))
                .sum(),
        };
        Ok(NetnsReading {
            source,
            sockets,
            udp_sockets,
            listen_counters: read("netstat")
                .ok()
                .and_then(|t| procfs::listen_counters(&t)),
            port_range: std::fs::read_to_string(procfs::PORT_RANGE)
                .ok()
                .and_then(|t| procfs::port_range(&t)),
            fallback_reason,
        })
    }
}

fn read_procfs_tcp(out: &mut Vec<Socket>) -> Result<(), CensusError> {
    for file in ["tcp", "tcp6"] {
        let path = format!("{}/{file}", procfs::NET_DIR);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                procfs::parse_tcp(&text, out);
            }
            // No IPv6 in this namespace (ipv6.disable=1): nothing to count.
            Err(e) if file == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(CensusError::Procfs {
                    path,
                    error: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// One namespace's census as the `nodekeeper connections` CLI prints it.
pub fn report_json(
    path: &Path,
    reading: &Result<NetnsReading, CensusError>,
    config: &ConnectionsConfig,
) -> serde_json::Value {
    use serde_json::json;
    let r = match reading {
        Ok(r) => r,
        Err(e) => return json!({"netns": path, "error": e.to_string()}),
    };
    let p = summarize(r, None, config);
    json!({
        "netns": path,
        "source": p.source,
        "fallback_reason": r.fallback_reason,
        "established": p.established,
        "tcp_states": p.tcp_states,
        "pools": p.pools.iter().map(|x| json!({
            "remote": x.remote, "established": x.established, "active": x.active,
            "idle": x.idle, "retransmits": x.retransmits, "remotes": x.remotes,
            "rtt_mean_seconds": x.rtt_mean_seconds,
        })).collect::<Vec<_>>(),
        "listeners": p.listeners.iter().map(|l| json!({
            "address": l.address, "port": l.port, "accept_queue": l.accept_queue, "backlog": l.backlog,
        })).collect::<Vec<_>>(),
        "udp_sockets": p.udp_sockets,
        "ephemeral_ports_in_use": p.ephemeral_ports_in_use,
        "ephemeral_port_range": [p.ephemeral_port_low, p.ephemeral_port_high],
        "listen_overflows": p.listen_overflows,
        "listen_drops": p.listen_drops,
        "retransmits": p.retransmits,
        "rtt_mean_seconds": p.rtt_mean_seconds,
        "rtt_max_seconds": p.rtt_max_seconds,
        "error": null,
    })
}

/// Socket inodes held open by `pids` (`<proc>/PID/fd/* -> socket:[N]`): attributes sockets of
/// the host namespace to a hostNetwork pod.
pub fn socket_inodes(proc_root: &Path, pids: &[u32]) -> HashSet<u64> {
    pids.iter()
        .flat_map(|pid| socket_inodes_in(&proc_root.join(format!("{pid}/fd"))))
        .collect()
}

/// Socket inodes in the fd table at `fd_dir` (`<pid>/fd` or `<pid>/task/<tid>/fd`); an
/// unreadable table (the process exited) holds none.
pub fn socket_inodes_in(fd_dir: &Path) -> impl Iterator<Item = u64> + use<> {
    std::fs::read_dir(fd_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| socket_inode(&fd.path()))
}

/// The socket inode an fd link (`<proc>/PID/fd/N -> socket:[N]`) points at; None for any
/// other file or a link gone since.
pub fn socket_inode(fd_link: &Path) -> Option<u64> {
    std::fs::read_link(fd_link)
        .ok()?
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_problems_name_the_field() {
        let c = ConnectionsConfig {
            top_remotes: 0,
            idle_after: ConfigDuration(Duration::from_millis(1)),
            ..Default::default()
        };
        let p = c.problems();
        assert!(p.iter().any(|(f, _)| f == "metrics.connections.topRemotes"));
        assert!(p.iter().any(|(f, _)| f == "metrics.connections.idleAfter"));
        assert!(ConnectionsConfig::default().problems().is_empty());
    }

    #[test]
    fn auto_falls_back_to_procfs_when_the_kernel_refuses_sock_diag_and_says_why() {
        fn refused() -> Result<sock_diag::DiagSocket, sock_diag::SockDiagError> {
            Err(sock_diag::SockDiagError::Open(nix::Error::EPROTONOSUPPORT))
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut auto = Reader::new(SourcePreference::Auto);
        auto.open_diag = refused;
        let r = auto.read_current().unwrap();
        assert_eq!(r.source, Source::Procfs);
        assert!(
            r.fallback_reason
                .as_deref()
                .unwrap()
                .contains("NETLINK_SOCK_DIAG"),
            "{:?}",
            r.fallback_reason
        );
        assert!(r.sockets.iter().any(|s| s.local.port() == port));
        assert!(
            auto.sock_diag_unavailable.is_some(),
            "not retried per namespace"
        );
        // Asked for sock_diag explicitly: an error, not a silent fallback.
        let mut strict = Reader::new(SourcePreference::SockDiag);
        strict.open_diag = refused;
        assert!(matches!(
            strict.read_current(),
            Err(CensusError::SockDiag(_))
        ));
    }

    #[test]
    fn own_namespace_is_read_and_finds_a_listener_we_open() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let own = PathBuf::from("/proc/self/ns/net");
        for pref in [SourcePreference::SockDiag, SourcePreference::Procfs] {
            let r = read_namespaces(std::slice::from_ref(&own), pref)
                .pop()
                .unwrap();
            let r = match r {
                Ok(r) => r,
                // setns needs CAP_SYS_ADMIN; an unprivileged test run has nothing to check.
                Err(CensusError::Enter { .. }) => return,
                Err(e) => panic!("{pref:?}: {e}"),
            };
            let listen = r
                .sockets
                .iter()
                .find(|s| s.state == TcpState::Listen && s.local.port() == port)
                .unwrap_or_else(|| panic!("{pref:?}: listener on {port} not found"));
            assert_eq!(
                listen.rqueue, 1,
                "{pref:?}: one connection waits in the queue"
            );
            assert!(
                r.sockets
                    .iter()
                    .any(|s| s.state == TcpState::Established && s.remote.port() == port),
                "{pref:?}"
            );
            assert!(r.port_range.is_some());
        }
    }
}
