//! The one-pass TCP census (issue #18): one BPF program walks the node's shared TCP hash
//! tables once and tags every socket with its network namespace, instead of one sock_diag dump
//! (one walk of the same tables) per pod namespace. The agent's default reader when bpf() is
//! allowed (`metrics.connections.source: auto | bpf`); measured against the per-namespace
//! census and the `ss` loop by `bench_connections` (docs/benchmarks.md).
//!
//! The BPF side is agent/bpf/tcp_census.bpf.c, compiled by agent/bpf/build.sh into the
//! committed agent/bpf/tcp_census.bpf.o (so building the agent needs only Rust: no clang) and
//! loaded with aya (pure Rust: no libbpf or libelf to build or link). Its types are relocated
//! against the running kernel's BTF (CO-RE).
//!
//! [`OnePass::read_namespaces`] returns the same `NetnsReading`s as [`super::read_namespaces`]:
//! TCP sockets from the walk; UDP count, listen counters and the ephemeral range read per
//! namespace as the per-namespace reader does (setns into each, small /proc files). A namespace
//! created with `net.ipv4.tcp_child_ehash_entries` has a table of its own, walked from inside it.
//! Idleness: `tcp_info`'s last-data times are jiffies; the program emits them as jiffies and
//! the loader learns the kernel's HZ from two walks 200 ms apart (aya cannot resolve
//! `CONFIG_HZ` as a `__kconfig` extern).
//!
//! When BPF is not allowed (no CAP_BPF/CAP_PERFMON, seccomp, no BTF, kernel older than 5.17 for
//! `bpf_loop`), [`OnePass::load`] fails with the reason and the agent's reader
//! ([`super::census::Census`]) falls back to the per-namespace sock_diag census, logging and
//! counting why (the benchmark uses [`census_with_fallback`]).

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{
    CensusError, NetnsReading, Socket, Source, SourcePreference, TcpState, procfs, read_namespaces,
    sock_diag,
};
use aya::maps::{Array, MapData, RingBuf};
use aya::programs::Iter;
use aya::{Btf, Ebpf, EbpfLoader, include_bytes_aligned};

/// The committed object (agent/bpf/build.sh's output for tcp_census.bpf.c).
pub static OBJECT: &[u8] = include_bytes_aligned!("../../../bpf/tcp_census.bpf.o");
/// Where the committed object and its source live (from the workspace root), for the test
/// that they match.
pub const OBJECT_PATH: &str = "agent/bpf/tcp_census.bpf.o";

const PROGRAM: &str = "census_walk";
/// Size of `struct census_socket` in tcp_census.bpf.c (layout pinned there by static asserts:
/// netns 0, family 4, state 5, ports 6 and 8, queues 12 and 16, retransmits 20, srtt 24,
/// idle jiffies 28, inode 32, local 40, remote 56).
const RECORD: usize = 72;
/// Ring buffer record header (aya/kernel: 8 bytes).
const RECORD_HEADER: usize = 8;
const TCP_NEW_SYN_RECV: u8 = 12;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

// Indices of the STATS array (enum in tcp_census.bpf.c).
const STAT_SOCKETS: u32 = 0;
const STAT_DROPPED: u32 = 1;
const STAT_TRUNCATED: u32 = 2;
const STAT_FAULTS: u32 = 3;
const STAT_BUCKETS: u32 = 4;
const STAT_WALKS: u32 = 5;
const STAT_WALKER_NETNS: u32 = 6;
const STAT_MOVED: u32 = 7;
const STAT_JIFFIES: u32 = 8;
const STAT_KTIME_NS: u32 = 9;
const STAT_COUNT: u32 = 10;
/// The kernel's possible CONFIG_HZ values.
const HZ_CHOICES: [u64; 4] = [100, 250, 300, 1000];
/// Between the two calibration walks that tell HZ.
const HZ_CALIBRATION: std::time::Duration = std::time::Duration::from_millis(200);
/// Walks tried when sockets move between chains under the lockless walk.
const WALK_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum OnePassError {
    #[error("BPF one-pass census unavailable: {0}")]
    Unavailable(String),
    #[error("one-pass walk incomplete: {0}")]
    Incomplete(String),
    /// The ring buffer could not hold every socket of the node: a larger one may.
    #[error(
        "one-pass walk incomplete: ring buffer full for {capacity} sockets ({dropped} not emitted)"
    )]
    RingFull { capacity: usize, dropped: u64 },
    #[error(transparent)]
    Census(#[from] CensusError),
}

/// What one walk of a table saw (the STATS array).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    pub sockets: u64,
    pub buckets: u64,
    /// Namespace inode of the table's walker (the reading thread's namespace).
    pub walker_netns: u64,
    /// jiffies and CLOCK_MONOTONIC nanoseconds when the walk started.
    pub jiffies: u64,
    pub ktime_ns: u64,
}

/// The loaded program, its ring buffer and counters; one walk at a time.
pub struct OnePass {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    /// The kernel's jiffies per second.
    hz: u64,
    /// Sockets the ring buffer was sized for (at least; it is a power of two in bytes).
    capacity: usize,
    /// Complete walks so far.
    walks: u64,
}

impl std::fmt::Debug for OnePass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnePass")
            .field("hz", &self.hz)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> OnePassError {
    OnePassError::Unavailable(format!("{what}: {e}"))
}

/// An error with its causes ("failed to create map: bpf_map_create failed: Operation not
/// permitted"): the cause is what tells an operator which permission is missing.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

impl OnePass {
    /// Loads and verifies the program; sizes the ring buffer for `max_sockets` records and
    /// learns the kernel's HZ.
    pub fn load(max_sockets: usize) -> Result<Self, OnePassError> {
        Self::load_sized(max_sockets, None)
    }

    /// `load`, reusing an `hz` learnt by an earlier load (a reload with a larger ring buffer
    /// skips the 200 ms calibration).
    pub fn load_sized(max_sockets: usize, hz: Option<u64>) -> Result<Self, OnePassError> {
        let btf = Btf::from_sys_fs().map_err(|e| unavailable("kernel BTF", e))?;
        let bytes = (max_sockets.max(1024) * (RECORD + RECORD_HEADER)).next_power_of_two();
        let size = u32::try_from(bytes).map_err(|_| unavailable("ring buffer", "too large"))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .map_max_entries("EVENTS", size)
            .load(OBJECT)
            .map_err(|e| unavailable("loading tcp_census.bpf.o", chain(&e)))?;
        let program: &mut Iter = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| unavailable("tcp_census.bpf.o", "no census_walk program"))?
            .try_into()
            .map_err(|e| unavailable("census_walk", e))?;
        program
            .load("bpf_map", &btf)
            .map_err(|e| unavailable("verifying census_walk", chain(&e)))?;
        let events = ebpf
            .take_map("EVENTS")
            .ok_or_else(|| unavailable("tcp_census.bpf.o", "no EVENTS map"))?;
        let events = RingBuf::try_from(events).map_err(|e| unavailable("EVENTS", e))?;
        let mut one_pass = Self {
            ebpf,
            events,
            hz: 0,
            capacity: bytes / (RECORD + RECORD_HEADER),
            walks: 0,
        };
        one_pass.hz = match hz {
            Some(hz) => hz,
            None => one_pass.learn_hz()?,
        };
        Ok(one_pass)
    }

    /// jiffies per second, from two walks (that keep no socket) HZ_CALIBRATION apart.
    fn learn_hz(&mut self) -> Result<u64, OnePassError> {
        let first = self.walk_retrying(&mut HashMap::new())?;
        std::thread::sleep(HZ_CALIBRATION);
        let second = self.walk_retrying(&mut HashMap::new())?;
        let ns = second.ktime_ns.saturating_sub(first.ktime_ns);
        let jiffies = second.jiffies.saturating_sub(first.jiffies);
        hz_from(jiffies, ns).ok_or_else(|| {
            unavailable(
                "the kernel's HZ",
                format!("{jiffies} jiffies in {ns} ns match none of {HZ_CHOICES:?}"),
            )
        })
    }

    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// Sockets one walk can emit before the ring buffer is full.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Complete walks of a TCP table since the load (its calibration included).
    pub fn walks(&self) -> u64 {
        self.walks
    }

    fn stats(&self) -> Result<Array<&MapData, u64>, OnePassError> {
        let map = self
            .ebpf
            .map("STATS")
            .ok_or_else(|| unavailable("tcp_census.bpf.o", "no STATS map"))?;
        Array::try_from(map).map_err(|e| unavailable("STATS", e))
    }

    /// Walks the table of the calling thread's network namespace once and adds every socket
    /// to `out` by namespace inode (sockets of namespaces not in `out` are dropped).
    pub fn walk(&mut self, out: &mut HashMap<u64, Vec<Socket>>) -> Result<WalkStats, OnePassError> {
        {
            let mut stats: Array<&mut MapData, u64> = Array::try_from(
                self.ebpf
                    .map_mut("STATS")
                    .ok_or_else(|| unavailable("tcp_census.bpf.o", "no STATS map"))?,
            )
            .map_err(|e| unavailable("STATS", e))?;
            for i in 0..STAT_COUNT {
                stats
                    .set(i, 0, 0)
                    .map_err(|e| unavailable("resetting STATS", e))?;
            }
        }
        let program: &mut Iter = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| unavailable("tcp_census.bpf.o", "no census_walk program"))?
            .try_into()
            .map_err(|e| unavailable("census_walk", e))?;
        let link = program
            .attach()
            .map_err(|e| unavailable("attaching census_walk", e))?;
        let link = program
            .take_link(link)
            .map_err(|e| unavailable("census_walk link", e))?;
        let mut iterator = link
            .into_file()
            .map_err(|e| unavailable("creating the iterator", e))?;
        // Reading runs the program (the walk happens in its last call); it prints nothing.
        let mut sink = Vec::new();
        iterator
            .read_to_end(&mut sink)
            .map_err(|e| unavailable("reading the iterator", e))?;
        drop(iterator);
        while let Some(item) = self.events.next() {
            if let Some((netns, socket)) = decode(&item, self.hz)
                && let Some(sockets) = out.get_mut(&netns)
            {
                sockets.push(socket);
            }
        }
        let stats = self.stats()?;
        let get = |i| stats.get(&i, 0).unwrap_or(0);
        let (dropped, truncated, faults, walks, moved) = (
            get(STAT_DROPPED),
            get(STAT_TRUNCATED),
            get(STAT_FAULTS),
            get(STAT_WALKS),
            get(STAT_MOVED),
        );
        if dropped > 0 && walks == 1 && truncated == 0 && faults == 0 && moved == 0 {
            return Err(OnePassError::RingFull {
                capacity: self.capacity,
                dropped,
            });
        }
        if walks != 1 || dropped > 0 || truncated > 0 || faults > 0 || moved > 0 {
            return Err(OnePassError::Incomplete(format!(
                "walks {walks}, sockets dropped (ring buffer full) {dropped}, chains truncated {truncated}, unreadable {faults}, chains left for another bucket (sockets moved during the walk) {moved}"
            )));
        }
        let done = WalkStats {
            sockets: get(STAT_SOCKETS),
            buckets: get(STAT_BUCKETS),
            walker_netns: get(STAT_WALKER_NETNS),
            jiffies: get(STAT_JIFFIES),
            ktime_ns: get(STAT_KTIME_NS),
        };
        self.walks += 1;
        Ok(done)
    }

    /// `walk`, again (from empty lists) when sockets moved under it, up to WALK_ATTEMPTS times.
    fn walk_retrying(
        &mut self,
        out: &mut HashMap<u64, Vec<Socket>>,
    ) -> Result<WalkStats, OnePassError> {
        let mut last = None;
        for _ in 0..WALK_ATTEMPTS {
            out.values_mut().for_each(Vec::clear);
            match self.walk(out) {
                Ok(stats) => return Ok(stats),
                // The same ring buffer would fill again.
                Err(e @ OnePassError::RingFull { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// The census of every namespace in `paths` (`/proc/PID/ns/net`), in their order: one walk
    /// of the shared table from the calling thread's namespace (the agent's: the host's), one
    /// walk inside each namespace that has a table of its own, and the small per-namespace
    /// files read as the agent reads them. Runs on a dedicated thread (setns).
    pub fn read_namespaces(
        &mut self,
        paths: &[PathBuf],
    ) -> Result<Vec<Result<NetnsReading, CensusError>>, OnePassError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.read_namespaces_here(paths))
                .join()
                .unwrap_or_else(|_| {
                    Err(OnePassError::Incomplete(
                        "the census thread panicked".into(),
                    ))
                })
        })
    }

    fn read_namespaces_here(
        &mut self,
        paths: &[PathBuf],
    ) -> Result<Vec<Result<NetnsReading, CensusError>>, OnePassError> {
        let inodes: Vec<Result<u64, CensusError>> = paths
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .map(|m| m.ino())
                    .map_err(|e| CensusError::Enter {
                        path: p.clone(),
                        error: e.to_string(),
                    })
            })
            .collect();
        let mut by_netns: HashMap<u64, Vec<Socket>> = inodes
            .iter()
            .filter_map(|i| i.as_ref().ok().map(|i| (*i, Vec::new())))
            .collect();
        let shared = self.walk_retrying(&mut by_netns)?;
        let mut out = Vec::with_capacity(paths.len());
        for (path, inode) in paths.iter().zip(inodes) {
            let reading = inode.and_then(|inode| {
                enter(path)?;
                let mut sockets = std::mem::take(by_netns.get_mut(&inode).expect("listed above"));
                // The walker's own namespace (the host's, for hostNetwork pods) was just walked:
                // its tcp_ehash_entries is positive too, but a second walk would be the node's.
                if inode != shared.walker_netns && has_own_table() {
                    // Its sockets are not in the shared table: walk its own (small) one here.
                    let mut own = HashMap::from([(inode, Vec::new())]);
                    self.walk_retrying(&mut own)
                        .map_err(|e| CensusError::Procfs {
                            path: "BPF walk of the namespace's own TCP table".into(),
                            error: e.to_string(),
                        })?;
                    sockets = own.remove(&inode).unwrap_or_default();
                }
                Ok(small_files(sockets))
            });
            out.push(reading);
        }
        Ok(out)
    }
}

/// The census of `paths` by one pass when BPF is allowed, else by today's per-namespace
/// sock_diag dumps; the second value says why the fallback was taken.
pub fn census_with_fallback(
    one_pass: Option<&mut OnePass>,
    load_error: Option<&OnePassError>,
    paths: &[PathBuf],
) -> (Vec<Result<NetnsReading, CensusError>>, Option<String>) {
    match one_pass.map(|o| o.read_namespaces(paths)) {
        Some(Ok(readings)) => (readings, None),
        Some(Err(e)) => (
            read_namespaces(paths, SourcePreference::SockDiag),
            Some(e.to_string()),
        ),
        None => (
            read_namespaces(paths, SourcePreference::SockDiag),
            Some(load_error.map_or_else(|| "not loaded".into(), ToString::to_string)),
        ),
    }
}

fn enter(path: &Path) -> Result<(), CensusError> {
    let err = |error: String| CensusError::Enter {
        path: path.to_path_buf(),
        error,
    };
    let ns = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| err(e.to_string()))
}

/// `net.ipv4.tcp_ehash_entries` of the current namespace is negative when it shares the
/// node's table (Linux 6.1+; absent before: always shared).
fn has_own_table() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_ehash_entries")
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok())
        .is_some_and(|n| n > 0)
}

/// UDP count, listen counters and ephemeral range of the current namespace, read as the
/// agent's per-namespace reader reads them.
fn small_files(sockets: Vec<Socket>) -> NetnsReading {
    let read = |name: &str| std::fs::read_to_string(format!("{}/{name}", procfs::NET_DIR));
    let udp_sockets = match (read("sockstat"), read("sockstat6")) {
        (Ok(v4), Ok(v6)) => sock_diag::parse_sockstat(&v4, &v6),
        (Ok(v4), Err(_)) => sock_diag::parse_sockstat(&v4, "TCP6: inuse 0\nUDP6: inuse 0\n"),
        _ => None,
    }
    .map_or(0, |(_, udp)| udp);
    NetnsReading {
        source: Source::Bpf,
        sockets,
        udp_sockets,
        listen_counters: read("netstat")
            .ok()
            .and_then(|t| procfs::listen_counters(&t)),
        port_range: std::fs::read_to_string(procfs::PORT_RANGE)
            .ok()
            .and_then(|t| procfs::port_range(&t)),
        fallback_reason: None,
    }
}

/// The HZ_CHOICES value within 10% of `jiffies` per `ns`, if any.
pub fn hz_from(jiffies: u64, ns: u64) -> Option<u64> {
    if ns == 0 {
        return None;
    }
    let measured = jiffies as f64 * 1e9 / ns as f64;
    HZ_CHOICES
        .into_iter()
        .find(|hz| (measured - *hz as f64).abs() <= *hz as f64 * 0.1)
}

/// One `struct census_socket` (tcp_census.bpf.c) -> (namespace inode, socket); `hz` converts
/// its idle time (jiffies) to milliseconds.
pub fn decode(b: &[u8], hz: u64) -> Option<(u64, Socket)> {
    if b.len() < RECORD {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let netns = u64::from(u32_at(0));
    let family = b[4];
    let kernel_state = b[5];
    // from_kernel maps request sockets (TCP_NEW_SYN_RECV) to SYN_RECV, as sock_diag and ss.
    let state = TcpState::from_kernel(kernel_state)?;
    let local_port = u16_at(6);
    let remote_port = u16::from_be(u16_at(8));
    let (rqueue, wqueue, retransmits, srtt8) = (u32_at(12), u32_at(16), u32_at(20), u32_at(24));
    let idle_jiffies = u64::from(u32_at(28));
    let inode = u64::from_le_bytes(b[32..40].try_into().ok()?);
    let addr = |o: usize| -> Option<IpAddr> {
        match family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
            ))),
            // ::ffff:a.b.c.d is the IPv4 peer, as sock_diag and procfs name it (#18-h).
            AF_INET6 => Some(super::ip_from_v6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&b[o..o + 16]).ok()?,
            ))),
            _ => None,
        }
    };
    let full = kernel_state != TCP_NEW_SYN_RECV && state != TcpState::TimeWait;
    Some((
        netns,
        Socket {
            state,
            local: SocketAddr::new(addr(40)?, local_port),
            remote: SocketAddr::new(addr(56)?, remote_port),
            rqueue,
            wqueue,
            inode,
            retransmits,
            rtt_us: (full && state != TcpState::Listen).then_some(srtt8 >> 3),
            // As tcp_info's last_data_sent/recv (jiffies_to_msecs), the later of the two.
            last_data_ms: (full && state != TcpState::Listen && hz > 0)
                .then(|| u32::try_from(idle_jiffies * 1000 / hz).unwrap_or(u32::MAX)),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(family: u8, state: u8) -> Vec<u8> {
        let mut b = vec![0u8; RECORD];
        b[0..4].copy_from_slice(&4026532000u32.to_le_bytes());
        b[4] = family;
        b[5] = state;
        b[6..8].copy_from_slice(&8080u16.to_le_bytes());
        b[8..10].copy_from_slice(&54321u16.to_be_bytes());
        b[12..16].copy_from_slice(&7u32.to_le_bytes());
        b[24..28].copy_from_slice(&(1000u32 << 3).to_le_bytes());
        b[28..32].copy_from_slice(&500u32.to_le_bytes());
        b[32..40].copy_from_slice(&99u64.to_le_bytes());
        b[40..44].copy_from_slice(&[10, 0, 0, 1]);
        b[56..60].copy_from_slice(&[10, 0, 0, 2]);
        b
    }

    #[test]
    fn decodes_an_ipv4_established_socket_with_ports_in_their_byte_orders() {
        let (netns, s) = decode(&record(AF_INET, 1), 250).unwrap();
        assert_eq!(netns, 4026532000);
        assert_eq!(s.state, TcpState::Established);
        assert_eq!(s.local, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(s.remote, "10.0.0.2:54321".parse().unwrap());
        assert_eq!((s.rqueue, s.inode, s.rtt_us), (7, 99, Some(1000)));
        // 500 jiffies at HZ 250: two seconds without data.
        assert_eq!(s.last_data_ms, Some(2000));
    }

    #[test]
    fn hz_is_the_nearest_kernel_value_within_ten_percent() {
        assert_eq!(hz_from(50, 200_000_000), Some(250));
        assert_eq!(hz_from(201, 200_000_000), Some(1000));
        assert_eq!(hz_from(61, 200_000_000), Some(300));
        assert_eq!(hz_from(40, 200_000_000), None);
        assert_eq!(hz_from(50, 0), None);
    }

    #[test]
    fn request_sockets_are_syn_recv_and_time_wait_has_no_rtt() {
        assert_eq!(
            decode(&record(AF_INET, TCP_NEW_SYN_RECV), 250)
                .unwrap()
                .1
                .state,
            TcpState::SynRecv
        );
        let time_wait = decode(&record(AF_INET, 6), 250).unwrap().1;
        assert_eq!((time_wait.rtt_us, time_wait.last_data_ms), (None, None));
    }

    #[test]
    fn short_records_unknown_families_and_states_are_refused() {
        assert!(decode(&record(AF_INET, 1)[..RECORD - 1], 250).is_none());
        assert!(decode(&record(1, 1), 250).is_none());
        assert!(decode(&record(AF_INET, 99), 250).is_none());
    }

    #[test]
    fn ipv6_addresses_take_all_sixteen_bytes() {
        let mut b = record(AF_INET6, 1);
        b[40..56].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        b[56..72].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        let (_, s) = decode(&b, 250).unwrap();
        assert_eq!(s.local, "[::1]:8080".parse().unwrap());
        assert_eq!(s.remote, "[fd00::2]:54321".parse().unwrap());
    }

    #[test]
    fn ipv4_mapped_addresses_are_the_ipv4_peer_as_in_every_reader() {
        let mut b = record(AF_INET6, 1);
        b[40..56].copy_from_slice(&"::ffff:10.0.3.1".parse::<Ipv6Addr>().unwrap().octets());
        b[56..72].copy_from_slice(&"::ffff:10.0.3.7".parse::<Ipv6Addr>().unwrap().octets());
        let (_, s) = decode(&b, 250).unwrap();
        assert_eq!(s.local, "10.0.3.1:8080".parse().unwrap());
        assert_eq!(s.remote, "10.0.3.7:54321".parse().unwrap());
    }
}
