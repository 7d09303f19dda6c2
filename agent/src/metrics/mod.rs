//! Node resource metrics: one snapshot type (`pb::MetricsSnapshot`) collected from the host's
//! procfs, filesystems and cgroup tree, shared by /metrics and the gRPC API.
//!
//! Collection happens on demand and is coalesced: readers within `maxSnapshotAge` of the last
//! collection share it, and concurrent readers wait for one collection instead of each doing
//! their own. An idle agent therefore reads nothing. This module never writes to the host.

pub mod connections;
pub mod exposition;
pub mod node;
pub mod pods;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::config::MetricsConfig;
use crate::host::HostPaths;
use crate::pb;

/// Why one source of the snapshot could not be read. The rest of the snapshot is still served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectError {
    /// The file or directory could not be opened or read.
    #[error("{part}: cannot read {}: {error}", path.display())]
    Read {
        part: &'static str,
        path: PathBuf,
        error: String,
    },
    /// It was read but is not in the format the kernel documents.
    #[error("{part}: {} is malformed: {error}", path.display())]
    Malformed {
        part: &'static str,
        path: PathBuf,
        error: String,
    },
    /// The node does not have this source at all (no PSI, no kubepods cgroup).
    #[error("{part}: {why}")]
    Unavailable { part: &'static str, why: String },
}

impl CollectError {
    /// The snapshot part that failed; low cardinality, used as a metric label.
    pub fn source_name(&self) -> &'static str {
        match self {
            Self::Read { part, .. }
            | Self::Malformed { part, .. }
            | Self::Unavailable { part, .. } => part,
        }
    }
}

// === impl ResourceCollector ===

/// Reads one snapshot from the host. Blocking file I/O: call from `spawn_blocking`.
#[derive(Debug)]
pub struct ResourceCollector {
    host: HostPaths,
    node_name: String,
    filesystems: Vec<PathBuf>,
    pods: bool,
    clock_ticks: f64,
    page_size: u64,
    /// This node's pods from the API, to name pod UIDs; `None` in standalone mode.
    pod_store: Option<crate::kube::PodStore>,
    /// Whether that pod watch is current (reported in each snapshot's `pod_view`).
    pod_view: crate::kube::WatchHealth,
    /// The pods that watch saw deleted: a census entry for one is named as deleted, not left
    /// unnamed (decision #18-l).
    deleted_pods: crate::kube::DeletedPods,
    /// The per-pod socket census; `None` when metrics.connections is disabled.
    connections: Option<connections::ConnectionCollector>,
}

impl ResourceCollector {
    pub fn new(host: HostPaths, node_name: String, config: &MetricsConfig) -> Self {
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as u64);
        let connections = config.connections.enabled.then(|| {
            connections::ConnectionCollector::new(host.clone(), config.connections.clone())
        });
        Self {
            host,
            node_name,
            filesystems: config.filesystems.clone(),
            pods: config.pods,
            clock_ticks: node::clock_ticks(),
            page_size,
            pod_store: None,
            pod_view: Default::default(),
            deleted_pods: Default::default(),
            connections,
        }
    }

    /// Names pods (namespace, name) from this node's pod watch.
    pub fn with_pod_store(
        mut self,
        store: crate::kube::PodStore,
        health: crate::kube::WatchHealth,
        deleted: crate::kube::DeletedPods,
    ) -> Self {
        self.pod_store = Some(store);
        self.pod_view = health;
        self.deleted_pods = deleted;
        self
    }

    /// The census reader's metrics (source, fallbacks); `None` when metrics.connections is
    /// disabled.
    pub fn census_metrics(&self) -> Option<&connections::CensusMetrics> {
        self.connections.as_ref().map(|c| c.census().metrics())
    }

    /// The pod watch's state, read before the census so a pod view that turns current during
    /// the collection is not claimed for it.
    fn pod_view(&self) -> Option<pb::PodView> {
        let store = self.pod_store.as_ref()?;
        let synced =
            futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok());
        let h = self.pod_view.state();
        Some(pb::PodView {
            synced,
            last_event: h.last_ok.map(Into::into),
            error: h
                .failing
                .as_ref()
                .map(|(_, e)| e.clone())
                .unwrap_or_default(),
            failing_since: h.failing.map(|(t, _)| t.into()),
        })
    }

    /// The census's pinned remotes; `None` when metrics.connections is disabled.
    pub fn pins(&self) -> Option<&Arc<connections::pins::PinnedRemotes>> {
        self.connections.as_ref().map(|c| c.pins())
    }

    pub fn collect(&self) -> (pb::MetricsSnapshot, Vec<CollectError>) {
        let mut errors = Vec::new();
        fn ok<T>(errors: &mut Vec<CollectError>, r: Result<T, CollectError>) -> Option<T> {
            r.map_err(|e| errors.push(e)).ok()
        }
        let pod_view = self.pod_view();
        let e = &mut errors;
        let h = &self.host;
        let node = pb::NodeResources {
            cpus: ok(e, node::cpu_times(h, self.clock_ticks)).unwrap_or_default(),
            load: ok(e, node::load_average(h)),
            memory: ok(e, node::memory(h)),
            pressure: ok(e, node::pressure(h)).unwrap_or_default(),
            interfaces: ok(e, node::interfaces(h)).unwrap_or_default(),
            filesystems: ok(e, node::filesystems(h, &self.filesystems)).unwrap_or_default(),
            file_descriptors: ok(e, node::file_descriptors(h)),
            sockets: ok(e, node::sockets(h, self.page_size)),
            conntrack: ok(e, node::conntrack(h)).flatten(),
        };
        let mut pods = if self.pods {
            ok(e, pods::pods(h)).unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut meta = self
            .pod_store
            .as_ref()
            .map(crate::kube::pod_meta)
            .unwrap_or_default();
        // A deleted pod's cgroup outlives its API object for a moment: marked deleted (no
        // longer a member of any selection, as the aggregator, which cannot place it, refuses
        // it), not left unnamed, which would read as a pod view behind (decision #18-l).
        for (uid, m) in self.deleted_pods.metas() {
            meta.entry(uid).or_insert(crate::kube::PodMeta {
                deletion_timestamp: m.deletion_timestamp,
                ..Default::default()
            });
        }
        for p in &mut pods {
            if let Some(m) = meta.get(&p.uid) {
                p.namespace.clone_from(&m.namespace);
                p.name.clone_from(&m.name);
            }
        }
        let connections = self
            .connections
            .as_ref()
            .and_then(|c| ok(e, c.collect(&meta)))
            .unwrap_or_default();
        let mut unavailable: Vec<String> =
            errors.iter().map(|e| e.source_name().to_string()).collect();
        unavailable.dedup();
        let snapshot = pb::MetricsSnapshot {
            collected_at: Some(SystemTime::now().into()),
            node_name: self.node_name.clone(),
            node: Some(node),
            pods,
            unavailable,
            connections,
            pod_view,
        };
        (snapshot, errors)
    }
}

// === impl SnapshotCache ===

/// Metrics about collection itself.
#[derive(Debug, Clone)]
pub struct CollectMetrics {
    duration: Histogram,
    errors: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl CollectMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            // Up to 10 s: a census of 100 pods x 1k sockets on a shared TCP hash takes ~2.3 s.
            duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            errors: Family::default(),
        };
        registry.register_with_unit(
            "collect_duration",
            "Time to collect one node resource snapshot",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "collect_errors",
            "Snapshot sources that could not be read, by source",
            m.errors.clone(),
        );
        m
    }
}

/// The latest snapshot, refreshed on demand when older than `max_age`.
#[derive(Debug)]
pub struct SnapshotCache {
    collector: Arc<ResourceCollector>,
    max_age: Duration,
    /// Held across a refresh so concurrent readers wait for one collection.
    refresh: tokio::sync::Mutex<Option<(Instant, Arc<pb::MetricsSnapshot>)>>,
    /// Read synchronously by the Prometheus encoder.
    latest: RwLock<Option<Arc<pb::MetricsSnapshot>>>,
    /// The pins generation the cached snapshot was collected with (pins.rs).
    cached_pins: std::sync::atomic::AtomicU64,
    metrics: CollectMetrics,
    logged_sources: std::sync::Mutex<std::collections::HashSet<&'static str>>,
}

impl SnapshotCache {
    pub fn new(collector: ResourceCollector, max_age: Duration, metrics: CollectMetrics) -> Self {
        Self {
            collector: Arc::new(collector),
            max_age,
            refresh: tokio::sync::Mutex::new(None),
            latest: RwLock::new(None),
            cached_pins: Default::default(),
            metrics,
            logged_sources: Default::default(),
        }
    }

    /// A snapshot at most `max_age` old. The collection runs on its own task: a caller that gives
    /// up (a gRPC deadline) leaves it running and its snapshot cached for the next caller,
    /// instead of dropping a census that already cost its CPU time and starting over.
    pub async fn get(self: &Arc<Self>) -> Arc<pb::MetricsSnapshot> {
        self.get_at_least(0).await
    }

    /// `get`, with `remotes` pinned (kept as their own pool beyond topRemotes) in the snapshot:
    /// a cached snapshot collected before one of them was pinned is not used. Refused when the
    /// pins are full (pins.rs): the value would not be exact.
    pub async fn get_pinned<S: AsRef<str>>(
        self: &Arc<Self>,
        remotes: &[S],
    ) -> Result<Arc<pb::MetricsSnapshot>, connections::pins::PinsFull> {
        let wanted = match self.collector.pins() {
            Some(p) if !remotes.is_empty() => p.pin(remotes)?,
            _ => 0,
        };
        Ok(self.get_at_least(wanted).await)
    }

    /// A snapshot at most `max_age` old, collected with at least pins generation `wanted`.
    async fn get_at_least(self: &Arc<Self>, wanted: u64) -> Arc<pb::MetricsSnapshot> {
        let this = self.clone();
        match tokio::spawn(async move { this.get_attached(wanted).await }).await {
            Ok(snap) => snap,
            Err(e) => {
                tracing::error!(error = %e, "snapshot task failed");
                self.latest().unwrap_or_default()
            }
        }
    }

    async fn get_attached(&self, pins: u64) -> Arc<pb::MetricsSnapshot> {
        let mut slot = self.refresh.lock().await;
        if let Some((at, snap)) = slot.as_ref()
            && at.elapsed() <= self.max_age
            && self.cached_pins.load(std::sync::atomic::Ordering::Acquire) >= pins
        {
            return snap.clone();
        }
        self.collect_into(&mut slot).await
    }

    /// A snapshot collected now, whatever the age of the cached one (WatchMetrics ticks).
    pub async fn fresh(&self) -> Arc<pb::MetricsSnapshot> {
        let mut slot = self.refresh.lock().await;
        // A collection that finished while we queued for the lock is fresh enough.
        if let Some((at, snap)) = slot.as_ref()
            && at.elapsed() < Duration::from_millis(50)
        {
            return snap.clone();
        }
        self.collect_into(&mut slot).await
    }

    async fn collect_into(
        &self,
        slot: &mut Option<(Instant, Arc<pb::MetricsSnapshot>)>,
    ) -> Arc<pb::MetricsSnapshot> {
        let collector = self.collector.clone();
        // Read before collecting: a pin added meanwhile may be missing from this snapshot.
        let pins = collector.pins().map_or(0, |p| p.generation());
        let started = Instant::now();
        let (snap, errors) = match tokio::task::spawn_blocking(move || collector.collect()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "resource collection panicked");
                return slot.as_ref().map(|(_, s)| s.clone()).unwrap_or_default();
            }
        };
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        for e in &errors {
            self.metrics
                .errors
                .get_or_create(&vec![("source", e.source_name())])
                .inc();
            // Log each failing source once: a kernel without PSI would otherwise log every scrape.
            if self
                .logged_sources
                .lock()
                .expect("not poisoned")
                .insert(e.source_name())
            {
                tracing::warn!(error = %e, "resource source unavailable; reported in snapshot.unavailable");
            }
        }
        let snap = Arc::new(snap);
        *slot = Some((Instant::now(), snap.clone()));
        self.cached_pins
            .store(pins, std::sync::atomic::Ordering::Release);
        *self.latest.write().expect("not poisoned") = Some(snap.clone());
        snap
    }

    pub fn latest(&self) -> Option<Arc<pb::MetricsSnapshot>> {
        self.latest.read().expect("not poisoned").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collection that blocks until the test writes `proc/stat` (a FIFO), then succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_collection_outlives_a_caller_that_gave_up_and_answers_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let stat = dir.path().join("proc/stat");
        std::fs::create_dir_all(stat.parent().unwrap()).unwrap();
        nix::unistd::mkfifo(&stat, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut config = MetricsConfig {
            pods: false,
            ..Default::default()
        };
        config.connections.enabled = false;
        let collector =
            ResourceCollector::new(HostPaths::under(dir.path()), "node-a".into(), &config);
        let mut registry = Registry::default();
        let cache = Arc::new(SnapshotCache::new(
            collector,
            Duration::from_secs(60),
            CollectMetrics::register(&mut registry),
        ));
        // The caller gives up while the collection waits on the FIFO.
        let gave_up = tokio::time::timeout(Duration::from_millis(200), cache.get()).await;
        assert!(gave_up.is_err(), "the collection should still be blocked");
        // Unblock it: the collection finishes without any caller.
        let writer = std::thread::spawn(move || {
            std::fs::write(
                &stat,
                "cpu  1 2 3 4 5 6 7 0 0 0\ncpu0 1 2 3 4 5 6 7 0 0 0\n",
            )
        });
        writer.join().unwrap().unwrap();
        // The next caller gets that snapshot (a new collection would block on the FIFO again).
        let snap = tokio::time::timeout(Duration::from_secs(10), cache.get())
            .await
            .expect("answered from the collection the first caller started");
        assert_eq!(snap.node_name, "node-a");
        assert!(cache.latest().is_some());
    }
}
