//! Renders the latest resource snapshot as Prometheus metric families.
//!
//! Names follow Prometheus conventions: `nodekeeper_` prefix (from the registry), base units
//! (seconds, bytes), `_total` on counters. Label sets are bounded by what the node has: CPUs,
//! interfaces, configured mount points, pods.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::SnapshotCache;
use super::connections::OTHER_INBOUND;
use crate::pb;

type Labels = Vec<(&'static str, String)>;

/// Registered once; on each scrape encodes whatever snapshot the cache holds.
#[derive(Debug)]
pub struct SnapshotCollector(pub Arc<SnapshotCache>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.0.latest() {
            Some(snap) => encode_snapshot(&snap, &mut encoder),
            None => Ok(()),
        }
    }
}

/// One metric family of samples sharing a name, help, unit and type.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: Vec<(Labels, f64)>,
}

impl<'a> Family<'a> {
    fn counter(name: &'a str, help: &'a str, unit: Option<Unit>) -> Self {
        Self {
            name,
            help,
            unit,
            kind: MetricType::Counter,
            samples: Vec::new(),
        }
    }
    fn gauge(name: &'a str, help: &'a str, unit: Option<Unit>) -> Self {
        Self {
            name,
            help,
            unit,
            kind: MetricType::Gauge,
            samples: Vec::new(),
        }
    }
    fn add(&mut self, labels: Labels, value: f64) -> &mut Self {
        self.samples.push((labels, value));
        self
    }
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.samples.is_empty() {
            return Ok(());
        }
        let mut metric =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        for (labels, value) in &self.samples {
            // An empty label set would render as `name{}`; encode on the descriptor instead.
            if labels.is_empty() {
                self.encode_value(&mut metric, *value)?;
            } else {
                self.encode_value(&mut metric.encode_family(labels)?, *value)?;
            }
        }
        Ok(())
    }
    fn encode_value(&self, sample: &mut MetricEncoder, value: f64) -> Result<(), std::fmt::Error> {
        match self.kind {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, _, f64>(&value, None),
            _ => sample.encode_gauge(&value),
        }
    }
}

fn no_labels() -> Labels {
    Vec::new()
}

pub fn encode_snapshot(
    snap: &pb::MetricsSnapshot,
    enc: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut families: Vec<Family> = Vec::new();
    if let Some(node) = &snap.node {
        node_families(node, &mut families);
    }
    pod_families(&snap.pods, &mut families);
    connection_families(&snap.connections, &mut families);
    let mut unavailable = Family::gauge(
        "snapshot_source_unavailable",
        "1 for each snapshot source that could not be read in the last collection",
        None,
    );
    for source in &snap.unavailable {
        unavailable.add(vec![("source", source.clone())], 1.0);
    }
    families.push(unavailable);
    families.iter().try_for_each(|f| f.encode(enc))
}

fn node_families(n: &pb::NodeResources, out: &mut Vec<Family<'static>>) {
    let mut cpu = Family::counter(
        "node_cpu",
        "Seconds each CPU spent in each mode",
        Some(Unit::Seconds),
    );
    for c in &n.cpus {
        let modes = [
            ("user", c.user),
            ("nice", c.nice),
            ("system", c.system),
            ("idle", c.idle),
            ("iowait", c.iowait),
            ("irq", c.irq),
            ("softirq", c.softirq),
            ("steal", c.steal),
        ];
        for (mode, v) in modes {
            cpu.add(
                vec![("cpu", c.cpu.to_string()), ("mode", mode.to_string())],
                v,
            );
        }
    }
    out.push(cpu);

    if let Some(l) = &n.load {
        out.push(gauge1("node_load1", "1-minute load average", l.load1));
        out.push(gauge1("node_load5", "5-minute load average", l.load5));
        out.push(gauge1("node_load15", "15-minute load average", l.load15));
    }
    if let Some(m) = &n.memory {
        for (name, help, v) in [
            ("node_memory_total", "Total usable memory", m.total_bytes),
            (
                "node_memory_available",
                "Memory available for new work without swapping (MemAvailable)",
                m.available_bytes,
            ),
            ("node_memory_free", "Unused memory (MemFree)", m.free_bytes),
            ("node_memory_cached", "Page cache (Cached)", m.cached_bytes),
            (
                "node_memory_buffers",
                "Block device buffers (Buffers)",
                m.buffers_bytes,
            ),
            ("node_swap_total", "Total swap space", m.swap_total_bytes),
            ("node_swap_free", "Unused swap space", m.swap_free_bytes),
        ] {
            let mut f = Family::gauge(name, help, Some(Unit::Bytes));
            f.add(no_labels(), v as f64);
            out.push(f);
        }
    }
    if !n.pressure.is_empty() {
        let mut some = Family::counter(
            "node_pressure_some",
            "Seconds in which at least one task was stalled on the resource (PSI some)",
            Some(Unit::Seconds),
        );
        let mut full = Family::counter(
            "node_pressure_full",
            "Seconds in which all non-idle tasks were stalled on the resource (PSI full)",
            Some(Unit::Seconds),
        );
        for p in &n.pressure {
            some.add(vec![("resource", p.resource.clone())], p.some_seconds_total);
            if p.has_full {
                full.add(vec![("resource", p.resource.clone())], p.full_seconds_total);
            }
        }
        out.push(some);
        out.push(full);
    }

    let net = [
        (
            "node_network_receive",
            "Bytes received",
            Some(Unit::Bytes),
            0,
        ),
        ("node_network_receive_packets", "Packets received", None, 1),
        ("node_network_receive_errors", "Receive errors", None, 2),
        (
            "node_network_receive_drops",
            "Received packets dropped",
            None,
            3,
        ),
        (
            "node_network_transmit",
            "Bytes transmitted",
            Some(Unit::Bytes),
            4,
        ),
        (
            "node_network_transmit_packets",
            "Packets transmitted",
            None,
            5,
        ),
        ("node_network_transmit_errors", "Transmit errors", None, 6),
        (
            "node_network_transmit_drops",
            "Transmitted packets dropped",
            None,
            7,
        ),
    ];
    for (name, help, unit, idx) in net {
        let mut f = Family::counter(name, help, unit);
        for i in &n.interfaces {
            let v = [
                i.receive_bytes,
                i.receive_packets,
                i.receive_errors,
                i.receive_drops,
                i.transmit_bytes,
                i.transmit_packets,
                i.transmit_errors,
                i.transmit_drops,
            ][idx];
            f.add(vec![("device", i.name.clone())], v as f64);
        }
        out.push(f);
    }

    let fs_labels = |f: &pb::Filesystem| -> Labels {
        vec![
            ("mountpoint", f.mount_point.clone()),
            ("device", f.device.clone()),
            ("fstype", f.fs_type.clone()),
        ]
    };
    let mut size = Family::gauge("node_filesystem_size", "Filesystem size", Some(Unit::Bytes));
    let mut free = Family::gauge(
        "node_filesystem_free",
        "Free space, including root-reserved blocks",
        Some(Unit::Bytes),
    );
    let mut avail = Family::gauge(
        "node_filesystem_avail",
        "Space available to unprivileged users",
        Some(Unit::Bytes),
    );
    let mut files = Family::gauge("node_filesystem_files", "Inodes in total", None);
    let mut files_free = Family::gauge("node_filesystem_files_free", "Free inodes", None);
    for f in &n.filesystems {
        size.add(fs_labels(f), f.size_bytes as f64);
        free.add(fs_labels(f), f.free_bytes as f64);
        avail.add(fs_labels(f), f.avail_bytes as f64);
        files.add(fs_labels(f), f.files as f64);
        files_free.add(fs_labels(f), f.files_free as f64);
    }
    out.extend([size, free, avail, files, files_free]);

    if let Some(fd) = &n.file_descriptors {
        out.push(gauge1(
            "node_file_descriptors_allocated",
            "Allocated file handles",
            fd.allocated as f64,
        ));
        out.push(gauge1(
            "node_file_descriptors_maximum",
            "Maximum file handles (fs.file-max)",
            fd.maximum as f64,
        ));
    }
    if let Some(s) = &n.sockets {
        let mut sockets = Family::gauge(
            "node_sockets",
            "Sockets by protocol and state (/proc/net/sockstat)",
            None,
        );
        for (proto, state, v) in [
            ("all", "used", s.sockets_used),
            ("tcp", "inuse", s.tcp_in_use),
            ("tcp", "orphan", s.tcp_orphan),
            ("tcp", "time_wait", s.tcp_time_wait),
            ("tcp", "alloc", s.tcp_allocated),
            ("udp", "inuse", s.udp_in_use),
            ("tcp6", "inuse", s.tcp6_in_use),
            ("udp6", "inuse", s.udp6_in_use),
        ] {
            sockets.add(
                vec![
                    ("protocol", proto.to_string()),
                    ("state", state.to_string()),
                ],
                v as f64,
            );
        }
        out.push(sockets);
        let mut mem = Family::gauge(
            "node_socket_memory",
            "Memory used by socket buffers",
            Some(Unit::Bytes),
        );
        mem.add(
            vec![("protocol", "tcp".to_string())],
            s.tcp_memory_bytes as f64,
        );
        mem.add(
            vec![("protocol", "udp".to_string())],
            s.udp_memory_bytes as f64,
        );
        out.push(mem);
    }
    if let Some(c) = &n.conntrack {
        out.push(gauge1(
            "node_conntrack_entries",
            "Connection tracking entries in use",
            c.entries as f64,
        ));
        out.push(gauge1(
            "node_conntrack_entries_limit",
            "Connection tracking table size (nf_conntrack_max)",
            c.limit as f64,
        ));
    }
}

fn gauge1(name: &'static str, help: &'static str, v: f64) -> Family<'static> {
    let mut f = Family::gauge(name, help, None);
    f.add(no_labels(), v);
    f
}

fn pod_families(pods: &[pb::PodResources], out: &mut Vec<Family<'static>>) {
    if pods.is_empty() {
        return;
    }
    let labels = |p: &pb::PodResources| -> Labels {
        vec![
            ("uid", p.uid.clone()),
            ("namespace", p.namespace.clone()),
            ("pod", p.name.clone()),
            ("qos_class", p.qos_class.clone()),
        ]
    };
    let mut cpu = Family::counter(
        "pod_cpu_usage",
        "CPU time used by the pod's cgroup",
        Some(Unit::Seconds),
    );
    let mut periods = Family::counter(
        "pod_cpu_cfs_periods",
        "CFS enforcement periods elapsed",
        None,
    );
    let mut throttled = Family::counter(
        "pod_cpu_cfs_throttled_periods",
        "CFS periods in which the pod was throttled",
        None,
    );
    let mut throttled_s = Family::counter(
        "pod_cpu_cfs_throttled",
        "Time the pod was throttled",
        Some(Unit::Seconds),
    );
    let mut ws = Family::gauge(
        "pod_memory_working_set",
        "Memory usage minus inactive file pages (what the kubelet evicts on)",
        Some(Unit::Bytes),
    );
    let mut usage = Family::gauge(
        "pod_memory_usage",
        "Memory charged to the pod's cgroup (memory.current)",
        Some(Unit::Bytes),
    );
    for p in pods {
        cpu.add(labels(p), p.cpu_usage_seconds);
        periods.add(labels(p), p.cpu_periods as f64);
        throttled.add(labels(p), p.cpu_throttled_periods as f64);
        throttled_s.add(labels(p), p.cpu_throttled_seconds);
        ws.add(labels(p), p.memory_working_set_bytes as f64);
        usage.add(labels(p), p.memory_usage_bytes as f64);
    }
    out.extend([cpu, periods, throttled, throttled_s, ws, usage]);
}

/// Per-pod socket census. Series per pod are bounded by configuration, not by traffic: states
/// (11), pools (topRemotes + "other" + "*:other", x2 for active/idle), listeners (topListeners).
fn connection_families(pods: &[pb::PodConnections], out: &mut Vec<Family<'static>>) {
    if pods.is_empty() {
        return;
    }
    let pod = |p: &pb::PodConnections| -> Labels {
        vec![
            ("uid", p.uid.clone()),
            ("namespace", p.namespace.clone()),
            ("pod", p.name.clone()),
        ]
    };
    let with = |p: &pb::PodConnections, extra: &[(&'static str, String)]| -> Labels {
        let mut l = pod(p);
        l.extend(extra.iter().cloned());
        l
    };
    let mut states = Family::gauge(
        "pod_tcp_sockets",
        "TCP sockets in the pod's network namespace by state",
        None,
    );
    let mut pools = Family::gauge(
        "pod_tcp_pool_connections",
        "Established connections by remote (top N per pod, the rest as remote=\"other\"; inbound as *:PORT) and activity",
        None,
    );
    let mut pool_remotes = Family::gauge(
        "pod_tcp_pool_remotes",
        "Distinct remotes summed into a pool (more than 1 only for \"other\")",
        None,
    );
    let mut queue = Family::gauge(
        "pod_tcp_listen_queue",
        "Connections waiting in a listening socket's accept queue",
        None,
    );
    let mut backlog = Family::gauge(
        "pod_tcp_listen_backlog",
        "The accept queue's limit (listen backlog capped by somaxconn; 0 when unknown)",
        None,
    );
    let mut overflows = Family::counter(
        "pod_tcp_listen_overflows",
        "Times an accept queue was full (TcpExt ListenOverflows of the pod's namespace)",
        None,
    );
    let mut drops = Family::counter(
        "pod_tcp_listen_drops",
        "SYNs dropped by listeners (TcpExt ListenDrops of the pod's namespace)",
        None,
    );
    let mut ephemeral = Family::gauge(
        "pod_ephemeral_ports_in_use",
        "Local ports of the namespace's ip_local_port_range used by TCP sockets",
        None,
    );
    let mut range = Family::gauge(
        "pod_ephemeral_ports",
        "Size of the namespace's ip_local_port_range",
        None,
    );
    let mut retrans = Family::gauge(
        "pod_tcp_retransmitted_segments",
        "Segments retransmitted by the pod's current TCP sockets (falls as sockets close)",
        None,
    );
    let mut rtt = Family::gauge(
        "pod_tcp_rtt",
        "Smoothed RTT over established connections",
        Some(Unit::Seconds),
    );
    let mut udp = Family::gauge("pod_udp_sockets", "UDP sockets", None);
    let mut after_deletion = Family::gauge(
        "pod_tcp_open_after_deletion",
        "Established connections still open while the pod is terminating",
        None,
    );
    let mut unattributed = Family::gauge(
        "pod_tcp_unattributed_queued",
        "hostNetwork pods: connections queued on a port the pod shares with another process's listener, counted to nobody; the pod's socket states, its inbound pools, ephemeral ports, retransmits, RTT and open-after-deletion series are left out while any are (decision #18-q)",
        None,
    );
    let mut failed = Family::gauge(
        "pod_connections_census_failed",
        "1 when the pod's sockets could not be counted (see the agent's log or GetMetrics)",
        None,
    );
    for p in pods {
        if !p.error.is_empty() {
            failed.add(pod(p), 1.0);
            continue;
        }
        // Queued connections counted to nobody: every series that would lack them is left
        // out rather than exported smaller (decision #18-q); the rest is exact.
        let exact = p.unattributed_queues.is_empty();
        for q in &p.unattributed_queues {
            unattributed.add(with(p, &[("port", q.port.to_string())]), q.queued as f64);
        }
        let shared_pool = |remote: &str| {
            remote == OTHER_INBOUND
                || p.unattributed_queues
                    .iter()
                    .any(|q| remote.strip_prefix("*:") == Some(q.port.to_string().as_str()))
        };
        for (state, n) in p.tcp_states.iter().filter(|_| exact) {
            states.add(with(p, &[("state", state.clone())]), *n as f64);
        }
        for x in p.pools.iter().filter(|x| exact || !shared_pool(&x.remote)) {
            for (activity, n) in [("active", x.active), ("idle", x.idle)] {
                pools.add(
                    with(
                        p,
                        &[("remote", x.remote.clone()), ("activity", activity.into())],
                    ),
                    n as f64,
                );
            }
            pool_remotes.add(with(p, &[("remote", x.remote.clone())]), x.remotes as f64);
        }
        for l in &p.listeners {
            let labels = with(
                p,
                &[("address", l.address.clone()), ("port", l.port.to_string())],
            );
            queue.add(labels.clone(), l.accept_queue as f64);
            backlog.add(labels, l.backlog as f64);
        }
        overflows.add(pod(p), p.listen_overflows as f64);
        drops.add(pod(p), p.listen_drops as f64);
        if p.ephemeral_port_high >= p.ephemeral_port_low && p.ephemeral_port_high > 0 {
            range.add(
                pod(p),
                f64::from(p.ephemeral_port_high - p.ephemeral_port_low + 1),
            );
        }
        udp.add(pod(p), p.udp_sockets as f64);
        if !exact {
            continue;
        }
        ephemeral.add(pod(p), p.ephemeral_ports_in_use as f64);
        retrans.add(pod(p), p.retransmits as f64);
        rtt.add(with(p, &[("stat", "mean".into())]), p.rtt_mean_seconds);
        rtt.add(with(p, &[("stat", "max".into())]), p.rtt_max_seconds);
        if p.deletion_timestamp.is_some() {
            after_deletion.add(pod(p), p.open_after_deletion as f64);
        }
    }
    out.extend([
        states,
        pools,
        pool_remotes,
        queue,
        backlog,
        overflows,
        drops,
        ephemeral,
        range,
        retrans,
        rtt,
        udp,
        after_deletion,
        unattributed,
        failed,
    ]);
}

/// Rewrites prometheus-client's OpenMetrics text into the Prometheus text format 0.0.4 that
/// older scrapers, `promtool check metrics` and humans with curl expect: counter and info
/// families take their sample names (`_total`, `_info`), info becomes gauge, `# UNIT` and
/// `# EOF` go.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // HELP precedes TYPE; hold it until TYPE tells the family's real sample name.
    let mut pending_help: Option<(&str, &str)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (sample_name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some((help_name, help)) = pending_help.take()
                && help_name == name
            {
                out.push_str(&format!("# HELP {sample_name} {help}\n"));
            }
            out.push_str(&format!("# TYPE {sample_name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_units_and_total_suffix() {
        let snap = pb::MetricsSnapshot {
            node: Some(pb::NodeResources {
                cpus: vec![pb::CpuTime {
                    cpu: 0,
                    user: 1.5,
                    ..Default::default()
                }],
                memory: Some(pb::Memory {
                    total_bytes: 1024,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            pods: vec![pb::PodResources {
                uid: "u1".into(),
                cpu_usage_seconds: 2.0,
                ..Default::default()
            }],
            unavailable: vec!["pressure".into()],
            ..Default::default()
        };
        let mut registry = prometheus_client::registry::Registry::with_prefix("nodekeeper");
        registry.register_collector(Box::new(StaticSnapshot(snap)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("nodekeeper_node_cpu_seconds_total{cpu=\"0\",mode=\"user\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains("nodekeeper_node_memory_total_bytes 1024.0"),
            "{text}"
        );
        assert!(
            text.contains("nodekeeper_pod_cpu_usage_seconds_total{uid=\"u1\""),
            "{text}"
        );
        assert!(
            text.contains("nodekeeper_snapshot_source_unavailable{source=\"pressure\"} 1.0"),
            "{text}"
        );
    }

    #[test]
    fn connection_families_are_bounded_per_pod() {
        let pools = (0..10)
            .map(|i| pb::ConnectionPool {
                remote: format!("10.0.0.{i}:5432"),
                established: 3,
                active: 2,
                idle: 1,
                remotes: 1,
                ..Default::default()
            })
            .chain(std::iter::once(pb::ConnectionPool {
                remote: "other".into(),
                established: 9_990,
                active: 9_990,
                remotes: 9_990,
                ..Default::default()
            }))
            .collect();
        let snap = pb::MetricsSnapshot {
            connections: vec![
                pb::PodConnections {
                    uid: "u1".into(),
                    namespace: "shop".into(),
                    name: "api-0".into(),
                    tcp_states: [("established".to_string(), 10_020u64)].into(),
                    pools,
                    listeners: vec![pb::Listener {
                        address: "0.0.0.0:8080".into(),
                        port: 8080,
                        accept_queue: 4,
                        backlog: 3,
                    }],
                    listen_overflows: 2,
                    ..Default::default()
                },
                pb::PodConnections {
                    uid: "u2".into(),
                    error: "gone".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut registry = prometheus_client::registry::Registry::with_prefix("nodekeeper");
        registry.register_collector(Box::new(StaticSnapshot(snap)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let pool_series = text
            .lines()
            .filter(|l| l.starts_with("nodekeeper_pod_tcp_pool_connections{"))
            .count();
        assert_eq!(pool_series, 22, "11 pools x active/idle\n{text}");
        assert!(
            text.contains("remote=\"other\",activity=\"active\"} 9990"),
            "{text}"
        );
        assert!(
            text.contains("nodekeeper_pod_tcp_listen_overflows_total{uid=\"u1\""),
            "{text}"
        );
        assert!(
            text.contains("nodekeeper_pod_connections_census_failed{uid=\"u2\""),
            "{text}"
        );
    }

    #[test]
    fn a_pod_with_unattributed_queued_connections_exports_no_series_they_would_shrink() {
        let pod = |uid: &str, unattributed: Vec<pb::UnattributedQueue>| pb::PodConnections {
            uid: uid.into(),
            namespace: "ingress".into(),
            name: uid.into(),
            host_network: true,
            established: 5,
            tcp_states: [("established".to_string(), 5u64)].into(),
            pools: ["*:443", "*:other", "10.0.0.5:5432"]
                .iter()
                .map(|r| pb::ConnectionPool {
                    remote: r.to_string(),
                    established: 1,
                    active: 1,
                    remotes: 1,
                    ..Default::default()
                })
                .collect(),
            listeners: vec![pb::Listener {
                address: "0.0.0.0:443".into(),
                port: 443,
                accept_queue: 6,
                backlog: 128,
            }],
            ephemeral_ports_in_use: 3,
            unattributed_queues: unattributed,
            ..Default::default()
        };
        let snap = pb::MetricsSnapshot {
            connections: vec![
                pod(
                    "shared",
                    vec![pb::UnattributedQueue {
                        port: 443,
                        listeners: 2,
                        queued: 6,
                    }],
                ),
                pod("alone", vec![]),
            ],
            ..Default::default()
        };
        let mut registry = prometheus_client::registry::Registry::with_prefix("nodekeeper");
        registry.register_collector(Box::new(StaticSnapshot(snap)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series = |uid: &str| -> Vec<&str> {
            text.lines()
                .filter(|l| l.contains(&format!("uid=\"{uid}\"")))
                .map(|l| l.split('{').next().unwrap())
                .collect()
        };
        let shared = series("shared");
        for gone in [
            "nodekeeper_pod_tcp_sockets",
            "nodekeeper_pod_ephemeral_ports_in_use",
            "nodekeeper_pod_tcp_retransmitted_segments",
            "nodekeeper_pod_tcp_rtt_seconds",
        ] {
            assert!(!shared.contains(&gone), "{gone}\n{text}");
            assert!(series("alone").contains(&gone), "{gone}\n{text}");
        }
        assert!(
            text.contains("nodekeeper_pod_tcp_unattributed_queued{uid=\"shared\",namespace=\"ingress\",pod=\"shared\",port=\"443\"} 6"),
            "{text}"
        );
        assert!(!series("alone").contains(&"nodekeeper_pod_tcp_unattributed_queued"));
        // Outbound pools and the listener's own queue stay; inbound pools go.
        let pools: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nodekeeper_pod_tcp_pool_connections{uid=\"shared\""))
            .collect();
        assert_eq!(pools.len(), 2, "10.0.0.5:5432 active/idle\n{text}");
        assert!(pools.iter().all(|l| l.contains("10.0.0.5:5432")), "{text}");
        assert!(
            text.contains("nodekeeper_pod_tcp_listen_queue{uid=\"shared\""),
            "{text}"
        );
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP nk_build Agent version\n# TYPE nk_build info\nnk_build_info{version=\"1\"} 1\n# HELP nk_cpu_seconds CPU\n# TYPE nk_cpu_seconds counter\n# UNIT nk_cpu_seconds seconds\nnk_cpu_seconds_total{cpu=\"0\"} 1.5\n# HELP nk_load1 Load\n# TYPE nk_load1 gauge\nnk_load1 0.5\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP nk_build_info Agent version\n# TYPE nk_build_info gauge\nnk_build_info{version=\"1\"} 1\n# HELP nk_cpu_seconds_total CPU\n# TYPE nk_cpu_seconds_total counter\nnk_cpu_seconds_total{cpu=\"0\"} 1.5\n# HELP nk_load1 Load\n# TYPE nk_load1 gauge\nnk_load1 0.5\n"
        );
    }

    #[derive(Debug)]
    struct StaticSnapshot(pb::MetricsSnapshot);
    impl Collector for StaticSnapshot {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_snapshot(&self.0, &mut encoder)
        }
    }
}
