//! Turns one namespace's sockets into a pod's `pb::PodConnections`: counts by state, pools by
//! remote (top N + "other"), listeners, ephemeral ports, retransmits, RTT. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::{ConnectionsConfig, NetnsReading, Socket, TcpState};
use crate::pb;

#[derive(Default)]
struct Pool {
    established: u64,
    active: u64,
    idle: u64,
    retransmits: u64,
    rtt_sum_us: u64,
    rtt_count: u64,
}

impl Pool {
    fn absorb(&mut self, other: &Pool) {
        self.established += other.established;
        self.active += other.active;
        self.idle += other.idle;
        self.retransmits += other.retransmits;
        self.rtt_sum_us += other.rtt_sum_us;
        self.rtt_count += other.rtt_count;
    }

    fn into_pb(self, remote: String, remotes: u64) -> pb::ConnectionPool {
        pb::ConnectionPool {
            remote,
            established: self.established,
            active: self.active,
            idle: self.idle,
            retransmits: self.retransmits,
            rtt_mean_seconds: mean_seconds(self.rtt_sum_us, self.rtt_count),
            remotes,
        }
    }
}

/// Pools are keyed by the remote for outbound connections and by the local listening port for
/// inbound ones (clients of a server are many ephemeral remotes; the pool is the port).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum PoolKey {
    Inbound(u16),
    Outbound(SocketAddr),
}

impl PoolKey {
    fn label(self) -> String {
        match self {
            Self::Inbound(port) => format!("*:{port}"),
            Self::Outbound(addr) => addr.to_string(),
        }
    }
}

/// Summarises `reading`; with `owned`, only sockets whose inode is in it (hostNetwork pods).
/// The pool of outbound remotes beyond `topRemotes`.
pub const OTHER_OUTBOUND: &str = "other";
/// The pool of inbound ports beyond `topRemotes` (an inbound pool's name starts with `*:`).
pub const OTHER_INBOUND: &str = "*:other";

pub fn summarize(
    reading: &NetnsReading,
    owned: Option<&HashSet<u64>>,
    config: &ConnectionsConfig,
) -> pb::PodConnections {
    summarize_pinned(reading, owned, config, &BTreeSet::new())
}

/// The sockets of a hostNetwork pod in the host's namespace (decision #18-n): those whose inode
/// one of its processes holds, and the children of its listeners that no process holds yet (in
/// the accept queue, established or half-open; request sockets): inode 0, not TIME_WAIT, on a
/// local address one of its listeners binds. TIME_WAIT sockets have no owner and are not
/// attributed (the scaler refuses `time_wait` over a hostNetwork pod).
///
/// A queued child that another process's listener could hold as well (SO_REUSEPORT on the same
/// address, or a wildcard beside a specific address: `overlaps`) is counted to nobody: which
/// queue the kernel put it in is not visible (decision #18-q). Those are returned per port.
fn owned_sockets<'a>(
    reading: &'a NetnsReading,
    owned: &HashSet<u64>,
) -> (Vec<&'a super::Socket>, Vec<pb::UnattributedQueue>) {
    let held = |s: &super::Socket| s.inode != 0 && owned.contains(&s.inode);
    // Every listener of the namespace, and whether it is the pod's (a listener without an
    // inode is nobody's: another owner).
    let listeners: Vec<(SocketAddr, bool)> = reading
        .sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| (s.local, held(s)))
        .collect();
    let mut unattributed: BTreeMap<u16, pb::UnattributedQueue> = BTreeMap::new();
    let mut out = Vec::new();
    for s in &reading.sockets {
        if held(s) {
            out.push(s);
            continue;
        }
        if s.inode != 0 || matches!(s.state, TcpState::TimeWait | TcpState::Listen) {
            continue;
        }
        let (mut mine, mut others) = (0u32, 0u32);
        for (l, is_mine) in &listeners {
            if overlaps(l, &s.local) {
                if *is_mine {
                    mine += 1;
                } else {
                    others += 1;
                }
            }
        }
        match (mine, others) {
            (0, _) => {}
            (_, 0) => out.push(s),
            _ => {
                let port = s.local.port();
                let q = unattributed
                    .entry(port)
                    .or_insert_with(|| pb::UnattributedQueue {
                        port: u32::from(port),
                        ..Default::default()
                    });
                q.listeners = q.listeners.max(mine + others);
                q.queued += 1;
            }
        }
    }
    (out, unattributed.into_values().collect())
}

/// Whether listener `l` may hold a child whose local address is `local`: same port, and the
/// listener's address or a wildcard (the kernel prefers a specific address over a wildcard only
/// when no device binding intervenes, which /proc does not show: both count).
fn overlaps(l: &SocketAddr, local: &SocketAddr) -> bool {
    l.port() == local.port() && (l.ip().is_unspecified() || l.ip() == local.ip())
}

/// A connection's identity from one census to the next: its socket inode, or its 4-tuple
/// (local, remote) when it has none (a child still in its listener's accept queue). One
/// namespace's identities only: 4-tuples repeat across namespaces (decision #18-r).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnId {
    Inode(u64),
    Tuple(SocketAddr, SocketAddr),
}

impl ConnId {
    pub fn of(s: &Socket) -> Self {
        if s.inode == 0 {
            Self::Tuple(s.local, s.remote)
        } else {
            Self::Inode(s.inode)
        }
    }
}

/// Whether a listener bound to `listener` accepts connections whose local address is `local`
/// (the port already matched): the same address, or a wildcard one. `0.0.0.0` accepts every
/// IPv4 address; `::` every address, IPv4 too (a dual-stack socket's IPv4 children read as
/// IPv4: `ip_from_v6`). An IPv4-mapped listener address already reads as IPv4.
fn accepts_on(listener: IpAddr, local: IpAddr) -> bool {
    match listener {
        IpAddr::V6(l) if l.is_unspecified() => true,
        IpAddr::V4(l) if l.is_unspecified() => local.is_ipv4(),
        l => l == local,
    }
}

/// `summarize`, keeping every pool whose remote is in `pinned` (`ip:port`, `*:PORT`) on its own
/// whatever its rank: the remotes KEDA queries name (pins.rs).
pub fn summarize_pinned(
    reading: &NetnsReading,
    owned: Option<&HashSet<u64>>,
    config: &ConnectionsConfig,
    pinned: &BTreeSet<String>,
) -> pb::PodConnections {
    summarize_remembering(reading, owned, config, pinned, &HashSet::new()).0
}

/// `summarize_pinned`, where an established connection is inbound when a listener of the pod
/// accepts on its local address and port, or when `inbound` (the identities of connections an
/// earlier census of this namespace counted inbound) holds it: a connection once inbound stays
/// inbound after its listener closed (a drain; decision #18-r). Also returns the identities of
/// the connections counted inbound now, for the next census.
pub fn summarize_remembering(
    reading: &NetnsReading,
    owned: Option<&HashSet<u64>>,
    config: &ConnectionsConfig,
    pinned: &BTreeSet<String>,
    inbound: &HashSet<ConnId>,
) -> (pb::PodConnections, HashSet<ConnId>) {
    let idle_ms = u32::try_from(config.idle_after.get().as_millis()).unwrap_or(u32::MAX);
    let (sockets, unattributed_queues): (Vec<_>, _) = match owned {
        None => (reading.sockets.iter().collect(), Vec::new()),
        Some(o) => owned_sockets(reading, o),
    };

    let mut states: BTreeMap<TcpState, u64> = BTreeMap::new();
    // Listening addresses by port: inbound is "a listener accepts on the local address and
    // port", not the port alone (an outbound connection may leave from a port the pod listens
    // on at another address).
    let mut listening: HashMap<u16, Vec<IpAddr>> = HashMap::new();
    let mut listeners = Vec::new();
    for s in &sockets {
        *states.entry(s.state).or_default() += 1;
        if s.state == TcpState::Listen {
            listening
                .entry(s.local.port())
                .or_default()
                .push(s.local.ip());
            listeners.push(pb::Listener {
                address: s.local.to_string(),
                port: u32::from(s.local.port()),
                accept_queue: u64::from(s.rqueue),
                // sock_diag and the BPF walk read the backlog; /proc/net/tcp has none.
                backlog: if reading.source != super::Source::Procfs {
                    u64::from(s.wqueue)
                } else {
                    0
                },
            });
        }
    }
    listeners.sort_by(|a, b| {
        b.accept_queue
            .cmp(&a.accept_queue)
            .then(a.port.cmp(&b.port))
            .then(a.address.cmp(&b.address))
    });
    // The figures over every listener, before the list is cut to topListeners. The cut keeps
    // every listener of each port it keeps, so a port's queue in the list is its whole queue
    // (decision #18-r).
    let listeners_total = listeners.len() as u64;
    let accept_queue_total: u64 = listeners.iter().map(|l| l.accept_queue).sum();
    if listeners.len() > config.top_listeners {
        let kept: HashSet<u32> = listeners[..config.top_listeners]
            .iter()
            .map(|l| l.port)
            .collect();
        let mut rank = 0;
        listeners.retain(|l| {
            rank += 1;
            rank <= config.top_listeners || kept.contains(&l.port)
        });
    }

    let (low, high) = reading.port_range.unwrap_or((0, 0));
    let mut ephemeral = HashSet::new();
    let mut pools: HashMap<PoolKey, Pool> = HashMap::new();
    let mut inbound_now = HashSet::new();
    let (mut retransmits, mut rtt_sum, mut rtt_count, mut rtt_max) = (0u64, 0u64, 0u64, 0u32);
    for s in &sockets {
        retransmits += u64::from(s.retransmits);
        if s.state != TcpState::Listen
            && (low..=high).contains(&s.local.port())
            && reading.port_range.is_some()
        {
            ephemeral.insert(s.local.port());
        }
        if s.state != TcpState::Established {
            continue;
        }
        let by_listener = listening
            .get(&s.local.port())
            .is_some_and(|ips| ips.iter().any(|&l| accepts_on(l, s.local.ip())));
        let remembered = !inbound.is_empty()
            && (inbound.contains(&ConnId::of(s))
                || inbound.contains(&ConnId::Tuple(s.local, s.remote)));
        let key = if by_listener || remembered {
            inbound_now.insert(ConnId::of(s));
            PoolKey::Inbound(s.local.port())
        } else {
            PoolKey::Outbound(s.remote)
        };
        let pool = pools.entry(key).or_default();
        pool.established += 1;
        pool.retransmits += u64::from(s.retransmits);
        match s.last_data_ms {
            Some(ms) if ms >= idle_ms => pool.idle += 1,
            // procfs cannot tell: counted as active.
            _ => pool.active += 1,
        }
        if let Some(rtt) = s.rtt_us {
            pool.rtt_sum_us += u64::from(rtt);
            pool.rtt_count += 1;
            rtt_sum += u64::from(rtt);
            rtt_count += 1;
            rtt_max = rtt_max.max(rtt);
        }
    }

    let mut ranked: Vec<(PoolKey, Pool)> = pools.into_iter().collect();
    ranked.sort_by(|(ka, a), (kb, b)| b.established.cmp(&a.established).then(ka.cmp(kb)));
    let mut out_pools = Vec::with_capacity(config.top_remotes + 2);
    // Beyond topRemotes, outbound pools fold into `other` and inbound ones into `*:other`, kept
    // apart so "every outbound pool" (pool_utilization without remote) never counts clients.
    let (mut other_out, mut other_in) = (Pool::default(), Pool::default());
    let (mut other_out_remotes, mut other_in_remotes) = (0, 0);
    for (i, (key, pool)) in ranked.into_iter().enumerate() {
        // Every inbound connection has its own client address:port.
        let (remotes, inbound) = match key {
            PoolKey::Inbound(_) => (pool.established, true),
            PoolKey::Outbound(_) => (1, false),
        };
        if i < config.top_remotes || (!pinned.is_empty() && pinned.contains(&key.label())) {
            out_pools.push(pool.into_pb(key.label(), remotes));
        } else if inbound {
            other_in.absorb(&pool);
            other_in_remotes += remotes;
        } else {
            other_out.absorb(&pool);
            other_out_remotes += remotes;
        }
    }
    if other_out_remotes > 0 {
        out_pools.push(other_out.into_pb(OTHER_OUTBOUND.into(), other_out_remotes));
    }
    if other_in_remotes > 0 {
        out_pools.push(other_in.into_pb(OTHER_INBOUND.into(), other_in_remotes));
    }

    let (listen_overflows, listen_drops) = reading.listen_counters.unwrap_or_default();
    let pod = pb::PodConnections {
        source: reading.source.name().into(),
        established: states.get(&TcpState::Established).copied().unwrap_or(0),
        tcp_states: states
            .into_iter()
            .map(|(s, n)| (s.name().to_string(), n))
            .collect(),
        pools: out_pools,
        listeners,
        // The namespace's counters: a hostNetwork pod shares them with the node.
        listen_overflows,
        listen_drops,
        ephemeral_ports_in_use: ephemeral.len() as u64,
        ephemeral_port_low: u32::from(low),
        ephemeral_port_high: u32::from(high),
        retransmits,
        rtt_mean_seconds: mean_seconds(rtt_sum, rtt_count),
        rtt_max_seconds: f64::from(rtt_max) / 1e6,
        udp_sockets: if owned.is_some() {
            0
        } else {
            reading.udp_sockets
        },
        unattributed_queues,
        accept_queue_total,
        listeners_total,
        ..Default::default()
    };
    (pod, inbound_now)
}

fn mean_seconds(sum_us: u64, count: u64) -> f64 {
    if count == 0 {
        0.0
    } else {
        sum_us as f64 / count as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Socket, Source};
    use super::*;
    use crate::config::ConfigDuration;

    fn sock(state: TcpState, local: &str, remote: &str) -> Socket {
        Socket {
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            rqueue: 0,
            wqueue: 0,
            inode: 1,
            retransmits: 0,
            rtt_us: Some(1000),
            last_data_ms: Some(0),
        }
    }

    fn reading(sockets: Vec<Socket>) -> NetnsReading {
        NetnsReading {
            source: Source::SockDiag,
            sockets,
            udp_sockets: 2,
            listen_counters: Some((3, 4)),
            port_range: Some((32768, 60999)),
            fallback_reason: None,
        }
    }

    #[test]
    fn pools_listeners_states_and_ports() {
        let mut s = Vec::new();
        for i in 0..37 {
            s.push(sock(
                TcpState::Established,
                &format!("10.0.0.2:{}", 40000 + i),
                "10.0.0.1:5432",
            ));
        }
        for i in 0..5 {
            let mut x = sock(
                TcpState::Established,
                &format!("10.0.0.2:{}", 41000 + i),
                "10.0.0.1:6379",
            );
            x.last_data_ms = Some(60_000);
            x.retransmits = 2;
            s.push(x);
        }
        let mut l = sock(TcpState::Listen, "0.0.0.0:8080", "0.0.0.0:0");
        l.rqueue = 4;
        l.wqueue = 3;
        s.push(l);
        s.push(sock(
            TcpState::Established,
            "10.0.0.2:8080",
            "10.9.9.9:50000",
        ));
        s.push(sock(
            TcpState::Established,
            "10.0.0.2:8080",
            "10.9.9.8:50001",
        ));
        s.push(sock(TcpState::TimeWait, "10.0.0.2:42000", "10.0.0.1:5432"));
        let p = summarize(&reading(s), None, &ConnectionsConfig::default());
        assert_eq!(p.established, 44);
        assert_eq!(p.tcp_states["established"], 44);
        assert_eq!(p.tcp_states["time_wait"], 1);
        assert_eq!(p.tcp_states["listen"], 1);
        let pools: Vec<_> = p
            .pools
            .iter()
            .map(|x| (x.remote.as_str(), x.established, x.active, x.idle))
            .collect();
        assert_eq!(
            pools,
            vec![
                ("10.0.0.1:5432", 37, 37, 0),
                ("10.0.0.1:6379", 5, 0, 5),
                ("*:8080", 2, 2, 0),
            ]
        );
        assert_eq!(p.pools[1].retransmits, 10);
        let remotes: Vec<_> = p.pools.iter().map(|x| x.remotes).collect();
        assert_eq!(remotes, vec![1, 1, 2], "an inbound pool counts its clients");
        assert_eq!(p.listeners.len(), 1);
        assert_eq!(
            (p.listeners[0].accept_queue, p.listeners[0].backlog),
            (4, 3)
        );
        // 37 + 5 outbound + 1 TIME_WAIT in the range; 8080 is not.
        assert_eq!(p.ephemeral_ports_in_use, 43);
        assert_eq!(
            (p.listen_overflows, p.listen_drops, p.udp_sockets),
            (3, 4, 2)
        );
        assert!((p.rtt_mean_seconds - 0.001).abs() < 1e-9);
    }

    #[test]
    fn remotes_beyond_top_n_are_summed_as_other() {
        let s: Vec<_> = (0..10_000u32)
            .map(|i| {
                sock(
                    TcpState::Established,
                    &format!("10.0.0.2:{}", 30000 + (i % 30000)),
                    &format!("10.{}.{}.{}:443", i >> 16, (i >> 8) & 255, i & 255),
                )
            })
            .collect();
        let config = ConnectionsConfig {
            top_remotes: 10,
            ..Default::default()
        };
        let p = summarize(&reading(s), None, &config);
        assert_eq!(p.pools.len(), 11);
        let other = p.pools.last().unwrap();
        assert_eq!(other.remote, "other");
        assert_eq!((other.remotes, other.established), (9_990, 9_990));
    }

    #[test]
    fn inbound_and_outbound_beyond_top_n_fold_into_separate_pools() {
        // One listener on 5432 with 3 clients, one on 6432 with 2; outbound: 4 to one remote,
        // 1 to another. Top 1: the 4 outbound; the rest fold by direction.
        let mut s = vec![
            sock(TcpState::Listen, "10.0.0.2:5432", "0.0.0.0:0"),
            sock(TcpState::Listen, "10.0.0.2:6432", "0.0.0.0:0"),
        ];
        for i in 0..3 {
            s.push(sock(
                TcpState::Established,
                "10.0.0.2:5432",
                &format!("10.0.1.{i}:4000"),
            ));
        }
        for i in 0..2 {
            s.push(sock(
                TcpState::Established,
                "10.0.0.2:6432",
                &format!("10.0.2.{i}:4000"),
            ));
        }
        for i in 0..4 {
            s.push(sock(
                TcpState::Established,
                &format!("10.0.0.2:{}", 40000 + i),
                "10.9.9.9:443",
            ));
        }
        s.push(sock(
            TcpState::Established,
            "10.0.0.2:41000",
            "10.9.9.8:443",
        ));
        let config = ConnectionsConfig {
            top_remotes: 1,
            ..Default::default()
        };
        let p = summarize(&reading(s), None, &config);
        let pools: Vec<(&str, u64, u64)> = p
            .pools
            .iter()
            .map(|p| (p.remote.as_str(), p.established, p.remotes))
            .collect();
        assert_eq!(
            pools,
            vec![("10.9.9.9:443", 4, 1), ("other", 1, 1), ("*:other", 5, 5)]
        );
    }

    #[test]
    fn pinned_remotes_keep_their_own_pool_beyond_top_n() {
        let mut s = vec![sock(TcpState::Listen, "10.0.0.2:5432", "0.0.0.0:0")];
        for i in 0..3 {
            s.push(sock(
                TcpState::Established,
                "10.0.0.2:5432",
                &format!("10.0.1.{i}:4000"),
            ));
        }
        for i in 0..4 {
            s.push(sock(
                TcpState::Established,
                &format!("10.0.0.2:{}", 40000 + i),
                "10.9.9.9:443",
            ));
        }
        s.push(sock(
            TcpState::Established,
            "10.0.0.2:41000",
            "10.9.9.8:443",
        ));
        let config = ConnectionsConfig {
            top_remotes: 1,
            ..Default::default()
        };
        let pinned: BTreeSet<String> = ["10.9.9.8:443", "*:5432", "10.7.7.7:1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = summarize_pinned(&reading(s), None, &config, &pinned);
        let pools: Vec<(&str, u64)> = p
            .pools
            .iter()
            .map(|p| (p.remote.as_str(), p.established))
            .collect();
        // Nothing is left to fold: no `other` pools; a pinned remote without connections has
        // no pool (a query reads 0 for it, which is then the truth).
        assert_eq!(
            pools,
            vec![("10.9.9.9:443", 4), ("*:5432", 3), ("10.9.9.8:443", 1)]
        );
    }

    #[test]
    fn owned_filter_keeps_only_the_pods_sockets_and_no_time_wait() {
        let mut mine = sock(TcpState::Established, "10.0.0.2:40000", "10.0.0.1:80");
        mine.inode = 7;
        let mut tw = sock(TcpState::TimeWait, "10.0.0.2:40001", "10.0.0.1:80");
        tw.inode = 0;
        let theirs = sock(TcpState::Established, "10.0.0.2:40002", "10.0.0.1:80");
        let owned = HashSet::from([7]);
        let p = summarize(
            &reading(vec![mine, tw, theirs]),
            Some(&owned),
            &ConnectionsConfig::default(),
        );
        assert_eq!(p.established, 1);
        assert_eq!(p.tcp_states.len(), 1);
        assert_eq!(p.udp_sockets, 0, "host UDP sockets are not the pod's");
    }

    #[test]
    fn the_listener_list_keeps_every_listener_of_a_kept_port_and_the_totals() {
        // Port 9001 on two addresses (queues 5 and 1), 9002..9004 with 3, 2, 0. Top 2: 9001's
        // first and 9002; 9001's second stays too, 9003 and 9004 are cut.
        let l = |local: &str, q| {
            let mut s = sock(TcpState::Listen, local, "0.0.0.0:0");
            s.rqueue = q;
            s
        };
        let config = ConnectionsConfig {
            top_listeners: 2,
            ..Default::default()
        };
        let p = summarize(
            &reading(vec![
                l("127.0.0.1:9001", 5),
                l("127.0.0.2:9001", 1),
                l("127.0.0.1:9002", 3),
                l("127.0.0.1:9003", 2),
                l("127.0.0.1:9004", 0),
            ]),
            None,
            &config,
        );
        let kept: Vec<_> = p.listeners.iter().map(|l| l.address.as_str()).collect();
        assert_eq!(kept, ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.2:9001"]);
        assert_eq!((p.listeners_total, p.accept_queue_total), (5, 11));
    }

    #[test]
    fn inbound_is_a_listener_accepting_on_the_local_address_and_port() {
        let s = vec![
            sock(TcpState::Listen, "127.0.0.2:7000", "0.0.0.0:0"),
            sock(TcpState::Listen, "0.0.0.0:8080", "0.0.0.0:0"),
            sock(TcpState::Listen, "[::]:9090", "[::]:0"),
            // Outbound from port 7000 on another address: the pool of its remote.
            sock(TcpState::Established, "127.0.0.3:7000", "127.0.0.1:5432"),
            // Inbound to the listener's own address.
            sock(TcpState::Established, "127.0.0.2:7000", "127.0.0.9:40000"),
            // 0.0.0.0 accepts IPv4 only; :: accepts both (IPv4 children read as IPv4).
            sock(TcpState::Established, "10.0.0.2:8080", "10.0.0.9:40000"),
            sock(TcpState::Established, "[fd00::2]:8080", "[fd00::9]:40000"),
            sock(TcpState::Established, "10.0.0.2:9090", "10.0.0.9:40001"),
            sock(TcpState::Established, "[fd00::2]:9090", "[fd00::9]:40001"),
        ];
        let p = summarize(&reading(s), None, &ConnectionsConfig::default());
        let mut pools: Vec<_> = p
            .pools
            .iter()
            .map(|x| (x.remote.as_str(), x.established))
            .collect();
        pools.sort();
        assert_eq!(
            pools,
            [
                ("*:7000", 1),
                ("*:8080", 1),
                ("*:9090", 2),
                ("127.0.0.1:5432", 1),
                ("[fd00::9]:40000", 1),
            ]
        );
    }

    #[test]
    fn a_connection_once_inbound_stays_inbound_after_its_listener_closed() {
        let mut served = sock(TcpState::Established, "127.0.0.1:8080", "127.0.0.1:40000");
        served.inode = 11;
        let mut queued = sock(TcpState::Established, "127.0.0.1:8080", "127.0.0.1:40001");
        queued.inode = 0;
        let client = sock(TcpState::Established, "127.0.0.1:40002", "127.0.0.1:8080");
        let config = ConnectionsConfig::default();
        let none = BTreeSet::new();
        let listener = sock(TcpState::Listen, "127.0.0.1:8080", "0.0.0.0:0");
        let (p, known) = summarize_remembering(
            &reading(vec![
                listener,
                served.clone(),
                queued.clone(),
                client.clone(),
            ]),
            None,
            &config,
            &none,
            &HashSet::new(),
        );
        assert_eq!(p.pools.len(), 2, "{:?}", p.pools);
        assert_eq!(
            known,
            HashSet::from([
                ConnId::Inode(11),
                ConnId::Tuple(queued.local, queued.remote)
            ])
        );

        // The listener closed; the queued child was accepted since (it has an inode now): both
        // stay inbound; the remembered set holds only what is still open.
        queued.inode = 12;
        let (p, known) =
            summarize_remembering(&reading(vec![served, queued]), None, &config, &none, &known);
        let pools: Vec<_> = p
            .pools
            .iter()
            .map(|x| (x.remote.as_str(), x.established))
            .collect();
        assert_eq!(pools, [("*:8080", 2)]);
        assert_eq!(known, HashSet::from([ConnId::Inode(11), ConnId::Inode(12)]));

        // Not remembered and no listener: outbound (the documented limit).
        let (p, known) = summarize_remembering(
            &reading(vec![client]),
            None,
            &config,
            &none,
            &HashSet::new(),
        );
        assert_eq!(p.pools[0].remote, "127.0.0.1:8080");
        assert!(known.is_empty());
    }

    #[test]
    fn a_host_network_pods_accept_queue_children_are_its_own_but_not_time_wait() {
        let mut listener = sock(TcpState::Listen, "0.0.0.0:8080", "0.0.0.0:0");
        listener.inode = 7;
        let child = |state, local: &str| {
            let mut s = sock(state, local, "10.0.0.9:50000");
            s.inode = 0;
            s
        };
        let mut other_listener = sock(TcpState::Listen, "127.0.0.1:9090", "0.0.0.0:0");
        other_listener.inode = 8;
        let owned = HashSet::from([7]);
        let p = summarize(
            &reading(vec![
                listener,
                child(TcpState::Established, "10.0.0.2:8080"),
                child(TcpState::Established, "127.0.0.1:8080"),
                child(TcpState::SynRecv, "10.0.0.2:8080"),
                // Not attributable: TIME_WAIT, another process's listener's queue.
                child(TcpState::TimeWait, "10.0.0.2:8080"),
                other_listener,
                child(TcpState::Established, "127.0.0.1:9090"),
            ]),
            Some(&owned),
            &ConnectionsConfig::default(),
        );
        assert_eq!(p.established, 2);
        assert_eq!(p.tcp_states.get("syn_recv"), Some(&1));
        assert_eq!(p.tcp_states.get("time_wait"), None);
        assert_eq!(p.listeners.len(), 1);
    }

    #[test]
    fn queued_children_of_a_port_shared_with_another_listener_are_nobodys() {
        // Pods a (listener inode 7) and b (8) share 127.0.0.1:8080 with SO_REUSEPORT; a host
        // process (9) listens on 0.0.0.0:9090 beside pod a's 127.0.0.1:9090.
        let listener = |local: &str, inode| {
            let mut s = sock(TcpState::Listen, local, "0.0.0.0:0");
            s.inode = inode;
            s
        };
        let child = |state, local: &str, inode| {
            let mut s = sock(state, local, "10.0.0.9:50000");
            s.inode = inode;
            s
        };
        let mut s = vec![
            listener("127.0.0.1:8080", 7),
            listener("127.0.0.1:8080", 8),
            listener("127.0.0.1:9090", 7),
            listener("0.0.0.0:9090", 9),
        ];
        s.extend((0..6).map(|_| child(TcpState::Established, "127.0.0.1:8080", 0)));
        s.push(child(TcpState::SynRecv, "127.0.0.1:8080", 0));
        // Accepted: held by one pod's process, exact.
        s.push(child(TcpState::Established, "127.0.0.1:8080", 70));
        s.push(child(TcpState::Established, "127.0.0.1:8080", 80));
        // The wildcard overlaps 127.0.0.1:9090 but not 10.0.0.2:9090 (the host's alone).
        s.push(child(TcpState::Established, "127.0.0.1:9090", 0));
        s.push(child(TcpState::Established, "10.0.0.2:9090", 0));
        let r = reading(s);
        let config = ConnectionsConfig::default();
        let a = summarize(&r, Some(&HashSet::from([7, 70])), &config);
        let b = summarize(&r, Some(&HashSet::from([8, 80])), &config);
        let queues = |p: &pb::PodConnections| -> Vec<(u32, u32, u64)> {
            p.unattributed_queues
                .iter()
                .map(|q| (q.port, q.listeners, q.queued))
                .collect()
        };
        assert_eq!((a.established, b.established), (1, 1), "only the accepted");
        assert_eq!(a.tcp_states.get("syn_recv"), None);
        assert_eq!(queues(&a), vec![(8080, 2, 7), (9090, 2, 1)]);
        assert_eq!(queues(&b), vec![(8080, 2, 7)]);
        // The host process's summary is not a pod's: nothing is filtered, nothing flagged.
        assert!(summarize(&r, None, &config).unattributed_queues.is_empty());
    }

    #[test]
    fn a_shared_port_without_queued_children_stays_exact() {
        let mut s = Vec::new();
        for (inode, accepted) in [(7, 70), (8, 80)] {
            let mut l = sock(TcpState::Listen, "0.0.0.0:8080", "0.0.0.0:0");
            l.inode = inode;
            s.push(l);
            for _ in 0..3 {
                let mut c = sock(TcpState::Established, "10.0.0.2:8080", "10.0.0.9:5000");
                c.inode = accepted;
                s.push(c);
            }
        }
        // A TIME_WAIT child has no owner: never counted, never a reason to refuse.
        let mut tw = sock(TcpState::TimeWait, "10.0.0.2:8080", "10.0.0.9:5001");
        tw.inode = 0;
        s.push(tw);
        let r = reading(s);
        let p = summarize(
            &r,
            Some(&HashSet::from([7, 70])),
            &ConnectionsConfig::default(),
        );
        assert_eq!(p.established, 3);
        assert!(p.unattributed_queues.is_empty(), "{p:?}");
    }

    #[test]
    fn procfs_readings_report_unknown_backlog_and_idleness_as_active() {
        let mut l = sock(TcpState::Listen, "0.0.0.0:80", "0.0.0.0:0");
        l.wqueue = 0;
        let mut e = sock(TcpState::Established, "10.0.0.2:40000", "10.0.0.1:80");
        e.last_data_ms = None;
        e.rtt_us = None;
        let mut r = reading(vec![l, e]);
        r.source = Source::Procfs;
        let config = ConnectionsConfig {
            idle_after: ConfigDuration(std::time::Duration::from_secs(1)),
            ..Default::default()
        };
        let p = summarize(&r, None, &config);
        assert_eq!(p.source, "procfs");
        assert_eq!(p.listeners[0].backlog, 0);
        assert_eq!((p.pools[0].active, p.pools[0].idle), (1, 0));
        assert_eq!(p.rtt_mean_seconds, 0.0);
    }
}
