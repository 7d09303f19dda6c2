//! The agent reads the host only through its configurable roots: pointed at a fake procfs and
//! cgroup tree built here, it reports exactly what those files say, and marks what is missing.

use std::path::Path;

use nodekeeper_tests::{Agent, sample};

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A procfs with two CPUs and no PSI (a kernel booted with psi=0).
fn fake_proc(root: &Path) {
    write(
        root,
        "stat",
        "cpu  300 0 200 10000 50 0 10 0 0 0\ncpu0 100 0 100 5000 25 0 5 0 0 0\ncpu1 200 0 100 5000 25 0 5 7 0 0\nintr 1\nctxt 2\nbtime 3\n",
    );
    write(
        root,
        "meminfo",
        "MemTotal:       16384000 kB\nMemFree:         1024000 kB\nMemAvailable:    8192000 kB\nBuffers:           10240 kB\nCached:          2048000 kB\nSwapCached:            0 kB\nSwapTotal:       1048576 kB\nSwapFree:         524288 kB\n",
    );
    write(root, "loadavg", "1.25 0.50 0.75 2/300 12345\n");
    write(
        root,
        "net/dev",
        "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n  eth0: 5000 50 1 2 0 0 0 0 6000 60 3 4 0 0 0 0\n",
    );
    write(root, "sys/fs/file-nr", "4096\t0\t9223372036854775807\n");
    write(
        root,
        "net/sockstat",
        "sockets: used 321\nTCP: inuse 12 orphan 1 tw 34 alloc 15 mem 2\nUDP: inuse 3 mem 1\nUDPLITE: inuse 0\nRAW: inuse 0\nFRAG: inuse 0 memory 0\n",
    );
    write(root, "sys/net/netfilter/nf_conntrack_count", "77\n");
    write(root, "sys/net/netfilter/nf_conntrack_max", "262144\n");
}

fn get(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} missing:\n{text}"))
}

#[test]
fn reports_exactly_what_the_fake_procfs_says() {
    let host = tempfile::tempdir().unwrap();
    fake_proc(&host.path().join("proc"));
    let agent = Agent::builder()
        .arg("--host-proc")
        .arg(host.path().join("proc").display().to_string())
        .start();
    let m = agent.metrics_text();
    // USER_HZ is 100: 100 ticks = 1 s.
    assert_eq!(
        get(
            &m,
            "nodekeeper_node_cpu_seconds_total",
            &[("cpu", "1"), ("mode", "user")]
        ),
        2.0
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_node_cpu_seconds_total",
            &[("cpu", "0"), ("mode", "idle")]
        ),
        50.0
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_node_cpu_seconds_total",
            &[("cpu", "1"), ("mode", "steal")]
        ),
        0.07
    );
    assert!(
        sample(&m, "nodekeeper_node_cpu_seconds_total", &[("cpu", "2")]).is_none(),
        "only two CPUs"
    );
    assert_eq!(
        get(&m, "nodekeeper_node_memory_total_bytes", &[]),
        16_384_000.0 * 1024.0
    );
    assert_eq!(
        get(&m, "nodekeeper_node_memory_available_bytes", &[]),
        8_192_000.0 * 1024.0
    );
    assert_eq!(
        get(&m, "nodekeeper_node_swap_free_bytes", &[]),
        524_288.0 * 1024.0
    );
    assert_eq!(get(&m, "nodekeeper_node_load1", &[]), 1.25);
    assert_eq!(get(&m, "nodekeeper_node_load15", &[]), 0.75);
    assert_eq!(
        get(
            &m,
            "nodekeeper_node_network_receive_bytes_total",
            &[("device", "eth0")]
        ),
        5000.0
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_node_network_transmit_drops_total",
            &[("device", "eth0")]
        ),
        4.0
    );
    assert_eq!(
        get(&m, "nodekeeper_node_file_descriptors_allocated", &[]),
        4096.0
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_node_sockets",
            &[("protocol", "tcp"), ("state", "time_wait")]
        ),
        34.0
    );
    assert_eq!(get(&m, "nodekeeper_node_conntrack_entries", &[]), 77.0);
    assert_eq!(
        get(&m, "nodekeeper_node_conntrack_entries_limit", &[]),
        262_144.0
    );
    // Missing sources are marked, not silently zero, and do not hide the rest.
    assert_eq!(
        get(
            &m,
            "nodekeeper_snapshot_source_unavailable",
            &[("source", "pressure")]
        ),
        1.0
    );
    assert!(sample(&m, "nodekeeper_node_pressure_some_seconds_total", &[]).is_none());
    assert!(
        get(
            &m,
            "nodekeeper_collect_errors_total",
            &[("source", "pressure")]
        ) >= 1.0
    );
}

#[test]
fn pressure_is_reported_when_the_kernel_has_it() {
    let host = tempfile::tempdir().unwrap();
    let proc = host.path().join("proc");
    fake_proc(&proc);
    let psi = "some avg10=0.00 avg60=0.00 avg300=0.00 total=1500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=500000\n";
    for r in ["cpu", "memory", "io"] {
        write(&proc, &format!("pressure/{r}"), psi);
    }
    let agent = Agent::builder()
        .arg("--host-proc")
        .arg(proc.display().to_string())
        .start();
    let m = agent.metrics_text();
    assert_eq!(
        get(
            &m,
            "nodekeeper_node_pressure_some_seconds_total",
            &[("resource", "io")]
        ),
        1.5
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_node_pressure_full_seconds_total",
            &[("resource", "memory")]
        ),
        0.5
    );
    assert!(
        sample(
            &m,
            "nodekeeper_snapshot_source_unavailable",
            &[("source", "pressure")]
        )
        .is_none()
    );
}

/// A pod cgroup directory with the files the kubelet's cgroup v2 layout has.
fn fake_pod(dir: &Path, usage_usec: u64, current: u64, inactive_file: u64) {
    nodekeeper_tests::cgroup::pod_dir(
        dir,
        &format!(
            "usage_usec {usage_usec}\nuser_usec 1000\nsystem_usec 500\nnr_periods 40\nnr_throttled 4\nthrottled_usec 250000\n"
        ),
        current,
        &format!("anon 100\nfile 200\ninactive_file {inactive_file}\nactive_file 5\n"),
    );
}

#[test]
fn pods_from_both_cgroup_drivers() {
    let cg = tempfile::tempdir().unwrap();
    let r = cg.path();
    // systemd driver: guaranteed directly under kubepods.slice, others under their QoS slice.
    fake_pod(
        &r.join("kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice"),
        2_000_000,
        1000,
        100,
    );
    fake_pod(
        &r.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podaaaaaaaa_bbbb_cccc_dddd_eeeeeeeeeeee.slice"),
        3_000_000,
        5000,
        6000,
    );
    // cgroupfs driver.
    fake_pod(
        &r.join("kubepods/besteffort/pod99999999-8888-7777-6666-555555555555"),
        500_000,
        4096,
        96,
    );
    // Not pods: the QoS slices themselves and unrelated cgroups.
    std::fs::create_dir_all(r.join("kubepods.slice/kubepods-besteffort.slice")).unwrap();
    std::fs::create_dir_all(r.join("system.slice/podman.service")).unwrap();

    let agent = Agent::builder()
        .arg("--host-cgroup")
        .arg(r.display().to_string())
        .start();
    let m = agent.metrics_text();
    let g = "11111111-2222-3333-4444-555555555555";
    let b = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    let be = "99999999-8888-7777-6666-555555555555";
    assert_eq!(
        get(
            &m,
            "nodekeeper_pod_cpu_usage_seconds_total",
            &[("uid", g), ("qos_class", "guaranteed")]
        ),
        2.0
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_pod_cpu_usage_seconds_total",
            &[("uid", b), ("qos_class", "burstable")]
        ),
        3.0
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_pod_cpu_usage_seconds_total",
            &[("uid", be), ("qos_class", "besteffort")]
        ),
        0.5
    );
    assert_eq!(
        get(&m, "nodekeeper_pod_memory_working_set_bytes", &[("uid", g)]),
        900.0
    );
    // inactive_file above usage (racy reads) clamps to zero rather than wrapping.
    assert_eq!(
        get(&m, "nodekeeper_pod_memory_working_set_bytes", &[("uid", b)]),
        0.0
    );
    assert_eq!(
        get(&m, "nodekeeper_pod_memory_usage_bytes", &[("uid", be)]),
        4096.0
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_pod_cpu_cfs_throttled_periods_total",
            &[("uid", g)]
        ),
        4.0
    );
    assert_eq!(
        get(
            &m,
            "nodekeeper_pod_cpu_cfs_throttled_seconds_total",
            &[("uid", g)]
        ),
        0.25
    );
    let pods = nodekeeper_tests::parse_samples(&m)
        .into_iter()
        .filter(|(s, _)| s.starts_with("nodekeeper_pod_cpu_usage_seconds_total{"))
        .count();
    assert_eq!(pods, 3, "exactly the three pods:\n{m}");
}

#[test]
fn pods_switch_off() {
    let cg = tempfile::tempdir().unwrap();
    fake_pod(
        &cg.path()
            .join("kubepods/pod11111111-2222-3333-4444-555555555555"),
        1,
        1,
        0,
    );
    // Resource metrics and the connection census have a switch each.
    let agent = Agent::builder()
        .config("metrics:\n  pods: false\n")
        .arg("--host-cgroup")
        .arg(cg.path().display().to_string())
        .start();
    let m = agent.metrics_text();
    assert!(!m.contains("nodekeeper_pod_cpu"), "{m}");
    assert!(
        m.contains("nodekeeper_pod_connections_census_failed{"),
        "{m}"
    );
    let agent = Agent::builder()
        .config("metrics:\n  pods: false\n  connections:\n    enabled: false\n")
        .arg("--host-cgroup")
        .arg(cg.path().display().to_string())
        .start();
    let m = agent.metrics_text();
    assert!(!m.contains("nodekeeper_pod_"), "{m}");
}

#[test]
fn metrics_collection_switches_off_but_probes_stay() {
    let agent = Agent::builder()
        .config("metrics:\n  enabled: false\n")
        .start();
    let m = agent.metrics_text();
    assert!(!m.contains("nodekeeper_node_"), "{m}");
    assert!(
        m.contains("nodekeeper_capability_state{capability=\"metrics\",state=\"disabled\"} 1"),
        "{m}"
    );
    assert!(m.contains("nodekeeper_build_info{"), "{m}");
}
