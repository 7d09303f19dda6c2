//! Which reader counts a collection's TCP sockets (`metrics.connections.source`) and the
//! fallbacks between readers. `auto`: the one-pass BPF walk when bpf() is allowed, else the
//! per-namespace sock_diag dumps, else /proc/net/tcp. A fallback is never a smaller census:
//! an incomplete walk (ring buffer full, chain too long, sockets moved under it) is retried,
//! then that collection is read per namespace instead. Every fallback is logged once per reason
//! and counted (`nodekeeper_connections_census_fallbacks_total{reason}`); the reader used is
//! `nodekeeper_connections_census_source{source}`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::bpf::{OnePass, OnePassError};
use super::{CensusError, NetnsReading, Source, SourcePreference, read_namespaces};

/// First ring buffer: 64k sockets (8 MiB). Most nodes never need more.
pub const INITIAL_RING_SOCKETS: usize = 1 << 16;
/// Largest ring buffer (512k sockets, 64 MiB of the agent's memory limit): a node with more
/// TCP sockets is counted per namespace (reason `bpf_incomplete`; `bpf_unavailable`, for good,
/// when it already had more when the program was first loaded).
pub const MAX_RING_SOCKETS: usize = 1 << 19;

/// Why a collection was not read by the preferred reader (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// The program could not be loaded (no CAP_BPF/CAP_PERFMON, seccomp, no BTF, old kernel).
    BpfUnavailable,
    /// The walk could not see every socket; retried, then this collection read per namespace.
    BpfIncomplete,
    /// The kernel refused sock_diag in a namespace: its sockets were read from /proc/net/tcp.
    SockDiagUnavailable,
}

impl Fallback {
    pub const ALL: [Fallback; 3] = [
        Fallback::BpfUnavailable,
        Fallback::BpfIncomplete,
        Fallback::SockDiagUnavailable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::BpfUnavailable => "bpf_unavailable",
            Self::BpfIncomplete => "bpf_incomplete",
            Self::SockDiagUnavailable => "sock_diag_unavailable",
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// The census's own metrics; cloned handles share their values.
#[derive(Debug, Clone, Default)]
pub struct CensusMetrics {
    source: Family<Labels, Gauge>,
    fallbacks: Family<Labels, Counter>,
}

impl CensusMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections_census_source",
            "The reader of the last connection census (1) among bpf, sock_diag and procfs",
            self.source.clone(),
        );
        registry.register(
            "connections_census_fallbacks",
            "Connection censuses not read by the configured reader, by reason",
            self.fallbacks.clone(),
        );
        // Every series from the start: a fallback rate is 0, not absent, on a healthy node.
        for reason in Fallback::ALL {
            self.fallbacks
                .get_or_create(&vec![("reason", reason.name())])
                .inc_by(0);
        }
    }

    fn used(&self, used: Source) {
        for s in Source::ALL {
            self.source
                .get_or_create(&vec![("source", s.name())])
                .set(i64::from(s == used));
        }
    }

    fn fell_back(&self, why: Fallback) {
        self.fallbacks
            .get_or_create(&vec![("reason", why.name())])
            .inc();
    }

    /// The census_source gauge of `source` (for tests and the CLI).
    pub fn source_value(&self, source: Source) -> i64 {
        self.source
            .get_or_create(&vec![("source", source.name())])
            .get()
    }

    /// Fallbacks counted for `why`.
    pub fn fallbacks(&self, why: Fallback) -> u64 {
        self.fallbacks
            .get_or_create(&vec![("reason", why.name())])
            .get()
    }
}

enum BpfState {
    NotTried,
    Loaded(Box<OnePass>),
    /// Load failed; not retried (a permission or kernel feature does not appear at runtime).
    Unavailable(String),
}

/// Loads the program: (sockets the ring buffer holds, HZ already learnt).
pub type Loader = fn(usize, Option<u64>) -> Result<OnePass, OnePassError>;

/// The reader of every collection, keeping the loaded program between collections.
pub struct Census {
    pref: SourcePreference,
    bpf: Mutex<BpfState>,
    metrics: CensusMetrics,
    /// Fallback reasons already logged (once each).
    logged: Mutex<HashSet<Fallback>>,
    load: Loader,
    initial_ring: usize,
}

impl std::fmt::Debug for Census {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Census")
            .field("pref", &self.pref)
            .finish_non_exhaustive()
    }
}

/// One collection's readings (in the order of the paths) and the reader of their TCP sockets.
#[derive(Debug)]
pub struct CensusRun {
    pub readings: Vec<Result<NetnsReading, CensusError>>,
    pub source: Option<Source>,
}

impl Census {
    pub fn new(pref: SourcePreference) -> Self {
        Self {
            pref,
            bpf: Mutex::new(BpfState::NotTried),
            metrics: CensusMetrics::default(),
            logged: Mutex::default(),
            load: OnePass::load_sized,
            initial_ring: INITIAL_RING_SOCKETS,
        }
    }

    /// Replaces how the program is loaded and the first ring buffer's size (tests: a refused
    /// bpf(), a ring buffer too small for the node).
    pub fn with_loader(mut self, load: Loader, initial_ring: usize) -> Self {
        self.load = load;
        self.initial_ring = initial_ring;
        self
    }

    pub fn metrics(&self) -> &CensusMetrics {
        &self.metrics
    }

    /// Sockets the loaded program's ring buffer holds; `None` before a load or when refused.
    pub fn ring_capacity(&self) -> Option<usize> {
        match &*self.bpf.lock().unwrap_or_else(|e| e.into_inner()) {
            BpfState::Loaded(o) => Some(o.capacity()),
            _ => None,
        }
    }

    /// Complete walks of a TCP table by the loaded program (load calibration included);
    /// `None` before a load or when refused.
    pub fn walks(&self) -> Option<u64> {
        match &*self.bpf.lock().unwrap_or_else(|e| e.into_inner()) {
            BpfState::Loaded(o) => Some(o.walks()),
            _ => None,
        }
    }

    /// The census of `paths` (`/proc/PID/ns/net`, `/run/netns/NAME`), in their order. Blocking.
    pub fn read(&self, paths: &[PathBuf]) -> CensusRun {
        if paths.is_empty() {
            return CensusRun {
                readings: Vec::new(),
                source: None,
            };
        }
        let readings = match self.pref {
            SourcePreference::SockDiag | SourcePreference::Procfs => {
                read_namespaces(paths, self.pref)
            }
            SourcePreference::Bpf => match self.one_pass(paths) {
                Ok(readings) => readings,
                Err((fallback, why)) => {
                    self.log_once(fallback, &why, "no census: source is bpf");
                    paths
                        .iter()
                        .map(|_| Err(CensusError::Bpf(why.clone())))
                        .collect()
                }
            },
            SourcePreference::Auto => match self.one_pass(paths) {
                Ok(readings) => readings,
                Err((fallback, why)) => {
                    self.metrics.fell_back(fallback);
                    self.log_once(fallback, &why, "counting sockets per namespace instead");
                    let mut readings = read_namespaces(paths, SourcePreference::Auto);
                    for r in readings.iter_mut().flatten() {
                        r.fallback_reason.get_or_insert_with(|| why.clone());
                    }
                    readings
                }
            },
        };
        let mut source = None;
        let mut procfs_fallback = None;
        for r in readings.iter().flatten() {
            source = Some(match (source, r.source) {
                // A namespace read from /proc (sock_diag refused) names the whole collection.
                (Some(Source::Procfs), _) | (_, Source::Procfs) => Source::Procfs,
                (_, s) => s,
            });
            if r.source == Source::Procfs && self.pref == SourcePreference::Auto {
                procfs_fallback = r.fallback_reason.clone();
            }
        }
        if let Some(why) = procfs_fallback {
            self.metrics.fell_back(Fallback::SockDiagUnavailable);
            self.log_once(
                Fallback::SockDiagUnavailable,
                &why,
                "counting sockets from /proc/net/tcp (no idle/backlog/RTT)",
            );
        }
        if let Some(s) = source {
            self.metrics.used(s);
        }
        CensusRun { readings, source }
    }

    /// The one pass, loading the program on first use and growing its ring buffer when the
    /// node has more sockets than it holds. Err: why the collection must be read otherwise.
    fn one_pass(
        &self,
        paths: &[PathBuf],
    ) -> Result<Vec<Result<NetnsReading, CensusError>>, (Fallback, String)> {
        let mut state = self.bpf.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*state, BpfState::NotTried) {
            // Loading walks the node twice (to learn HZ): the first ring must hold the node.
            let mut ring = self.initial_ring;
            *state = loop {
                match (self.load)(ring, None) {
                    Ok(o) => break BpfState::Loaded(Box::new(o)),
                    Err(OnePassError::RingFull { capacity, .. }) if capacity < MAX_RING_SOCKETS => {
                        ring = (capacity * 2).min(MAX_RING_SOCKETS);
                    }
                    Err(e) => break BpfState::Unavailable(e.to_string()),
                }
            };
        }
        let one_pass = match &mut *state {
            BpfState::Loaded(o) => o,
            BpfState::Unavailable(why) => return Err((Fallback::BpfUnavailable, why.clone())),
            BpfState::NotTried => unreachable!("loaded above"),
        };
        loop {
            match one_pass.read_namespaces(paths) {
                Ok(readings) => return Ok(readings),
                Err(OnePassError::RingFull { capacity, .. }) if capacity < MAX_RING_SOCKETS => {
                    let bigger = (capacity * 2).min(MAX_RING_SOCKETS);
                    match (self.load)(bigger, Some(one_pass.hz())) {
                        Ok(o) => {
                            tracing::info!(
                                sockets = o.capacity(),
                                "connection census: ring buffer grown for the node's sockets"
                            );
                            **one_pass = o;
                        }
                        Err(e) => return Err((Fallback::BpfIncomplete, e.to_string())),
                    }
                }
                Err(e) => return Err((Fallback::BpfIncomplete, e.to_string())),
            }
        }
    }

    fn log_once(&self, why: Fallback, detail: &str, then: &str) {
        let first = self
            .logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(why);
        if first {
            tracing::warn!(
                reason = why.name(),
                detail,
                "connection census fallback: {then}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    fn refused(_: usize, _: Option<u64>) -> Result<OnePass, OnePassError> {
        Err(OnePassError::Unavailable(
            "loading tcp_census.bpf.o: bpf_map_create failed: Operation not permitted".into(),
        ))
    }

    /// Log lines written while `f` runs on this thread.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .finish();
        let value = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (value, text)
    }

    fn own() -> Vec<PathBuf> {
        vec![PathBuf::from("/proc/self/ns/net")]
    }

    fn can_setns() -> bool {
        // setns needs CAP_SYS_ADMIN: an unprivileged test run has nothing to check.
        std::fs::read_to_string("/proc/self/status").is_ok_and(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
                .unwrap_or(false)
        })
    }

    #[test]
    fn auto_without_bpf_counts_per_namespace_and_says_why_once_in_the_log_and_metrics() {
        if !can_setns() {
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let census = Census::new(SourcePreference::Auto).with_loader(refused, 1024);
        let ((first, second), log) = logged(|| (census.read(&own()), census.read(&own())));
        for run in [&first, &second] {
            let r = run.readings[0].as_ref().expect("sock_diag reading");
            assert_eq!(run.source, Some(Source::SockDiag));
            assert!(r.sockets.iter().any(|s| s.local.port() == port));
            assert!(
                r.fallback_reason
                    .as_deref()
                    .is_some_and(|w| w.contains("Operation not permitted")),
                "{:?}",
                r.fallback_reason
            );
        }
        let m = census.metrics();
        assert_eq!(
            m.fallbacks(Fallback::BpfUnavailable),
            2,
            "counted per collection"
        );
        assert_eq!(m.fallbacks(Fallback::BpfIncomplete), 0);
        assert_eq!(m.source_value(Source::SockDiag), 1);
        assert_eq!(m.source_value(Source::Bpf), 0);
        assert_eq!(
            log.matches("bpf_unavailable").count(),
            1,
            "logged once: {log}"
        );
        assert!(log.contains("Operation not permitted"), "{log}");
    }

    #[test]
    fn bpf_only_without_bpf_is_an_error_per_namespace_never_another_count() {
        let census = Census::new(SourcePreference::Bpf).with_loader(refused, 1024);
        let run = census.read(&own());
        let err = run.readings[0].as_ref().expect_err("no census");
        assert!(err.to_string().contains("Operation not permitted"), "{err}");
        assert_eq!(run.source, None);
        assert_eq!(census.metrics().fallbacks(Fallback::BpfUnavailable), 0);
    }

    #[test]
    fn auto_reads_with_the_one_pass_where_bpf_is_allowed() {
        if !can_setns() {
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let census = Census::new(SourcePreference::Auto);
        let run = census.read(&own());
        if census.metrics().fallbacks(Fallback::BpfUnavailable) > 0
            && std::env::var_os("NODEKEEPER_REQUIRE_TOOLS").is_none()
        {
            // A kernel or sandbox without BPF (CI requires it): the fallback test covers it.
            return;
        }
        assert_eq!(run.source, Some(Source::Bpf));
        let r = run.readings[0].as_ref().unwrap();
        assert_eq!(r.fallback_reason, None);
        assert!(
            r.sockets
                .iter()
                .any(|s| s.local.port() == port && s.state == super::super::TcpState::Listen)
        );
        assert_eq!(census.metrics().source_value(Source::Bpf), 1);
    }
}
