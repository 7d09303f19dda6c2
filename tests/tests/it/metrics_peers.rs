//! Node resource metrics checked against real peers: values cross-checked with Debian's
//! prometheus-node-exporter reading the same kernel, the exposition linted by `promtool check
//! metrics`, and a real Prometheus server scraping the agent.

use std::process::Command;
use std::time::Duration;

use nodekeeper_tests::{
    Agent, Proc, free_port, http_get, loopback, require_tool, sample, wait_for,
};

/// Collections are not shared between scrapes here, so before/after scrapes bracket the peer's.
const NO_SNAPSHOT_REUSE: &str = "metrics:\n  maxSnapshotAge: 0s\n";

fn node_exporter(dir: &std::path::Path) -> (Proc, std::net::SocketAddr) {
    let addr = loopback(free_port());
    let mut cmd = Command::new("prometheus-node-exporter");
    cmd.arg(format!("--web.listen-address={addr}")).args([
        "--collector.disable-defaults",
        "--collector.cpu",
        "--collector.loadavg",
        "--collector.meminfo",
        "--collector.netdev",
        // Debian excludes lo by default; loopback is the one interface every test machine has.
        "--collector.netdev.device-exclude=^nodekeeper-no-such-device$",
        "--collector.filesystem",
        "--collector.filefd",
        "--collector.sockstat",
    ]);
    let proc = Proc::spawn("node_exporter", cmd, dir);
    wait_for(Duration::from_secs(10), "node_exporter to answer", || {
        http_get(addr, "/metrics").ok().filter(|(s, _)| *s == 200)
    });
    (proc, addr)
}

fn get(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").expect("scrape").1
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels)
        .unwrap_or_else(|| panic!("{name}{labels:?} missing from scrape:\n{text}"))
}

/// `peer` must lie between our readings taken just before and just after it (counters only
/// grow), with `slack` for the two exporters' rounding.
fn assert_bracketed(what: &str, before: f64, peer: f64, after: f64, slack: f64) {
    assert!(
        before - slack <= peer && peer <= after + slack,
        "{what}: node_exporter read {peer}, nodekeeper read {before} before and {after} after"
    );
}

#[test]
fn values_agree_with_node_exporter() {
    if !require_tool("prometheus-node-exporter") {
        return;
    }
    let agent = Agent::builder().config(NO_SNAPSHOT_REUSE).start();
    let (_ne, ne_addr) = node_exporter(agent.dir.path());

    let ours_before = get(agent.metrics);
    let theirs = get(ne_addr);
    let ours_after = get(agent.metrics);

    // Memory total is fixed: exact.
    assert_eq!(
        value(&ours_before, "nodekeeper_node_memory_total_bytes", &[]),
        value(&theirs, "node_memory_MemTotal_bytes", &[])
    );
    // Available memory moves a little between reads: within 2 %.
    let ours = value(&ours_before, "nodekeeper_node_memory_available_bytes", &[]);
    let peer = value(&theirs, "node_memory_MemAvailable_bytes", &[]);
    assert!(
        (ours - peer).abs() <= peer * 0.02,
        "MemAvailable: ours {ours}, node_exporter {peer}"
    );

    // CPU seconds per CPU and mode: counters, bracketed (0.05 s slack for tick rounding).
    let cpus = (0..64).take_while(|c| {
        sample(
            &theirs,
            "node_cpu_seconds_total",
            &[("cpu", &c.to_string())],
        )
        .is_some()
    });
    let mut checked = 0;
    for cpu in cpus {
        for mode in ["user", "system", "idle", "iowait", "softirq"] {
            let labels = [("cpu", cpu.to_string()), ("mode", mode.to_string())];
            let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_bracketed(
                &format!("cpu{cpu} {mode}"),
                value(&ours_before, "nodekeeper_node_cpu_seconds_total", &l),
                value(&theirs, "node_cpu_seconds_total", &l),
                value(&ours_after, "nodekeeper_node_cpu_seconds_total", &l),
                0.05,
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "no CPUs compared");

    // Loopback traffic grows with every scrape: bracketed exactly.
    for (ours_name, peer_name) in [
        (
            "nodekeeper_node_network_receive_bytes_total",
            "node_network_receive_bytes_total",
        ),
        (
            "nodekeeper_node_network_transmit_packets_total",
            "node_network_transmit_packets_total",
        ),
    ] {
        assert_bracketed(
            peer_name,
            value(&ours_before, ours_name, &[("device", "lo")]),
            value(&theirs, peer_name, &[("device", "lo")]),
            value(&ours_after, ours_name, &[("device", "lo")]),
            0.0,
        );
    }

    // Load average is recomputed every 5 s by the kernel; both read the same file.
    let ours = value(&ours_before, "nodekeeper_node_load1", &[]);
    let peer = value(&theirs, "node_load1", &[]);
    assert!(
        (ours - peer).abs() <= 0.3,
        "load1: ours {ours}, node_exporter {peer}"
    );

    // Filesystem size of / is fixed: exact.
    assert_eq!(
        value(
            &ours_before,
            "nodekeeper_node_filesystem_size_bytes",
            &[("mountpoint", "/")]
        ),
        value(
            &theirs,
            "node_filesystem_size_bytes",
            &[("mountpoint", "/")]
        )
    );

    let ours = value(
        &ours_before,
        "nodekeeper_node_file_descriptors_allocated",
        &[],
    );
    let peer = value(&theirs, "node_filefd_allocated", &[]);
    assert!(
        (ours - peer).abs() <= 256.0,
        "filefd: ours {ours}, node_exporter {peer}"
    );
    assert_eq!(
        value(
            &ours_before,
            "nodekeeper_node_file_descriptors_maximum",
            &[]
        ),
        value(&theirs, "node_filefd_maximum", &[])
    );
}

#[test]
fn exposition_passes_promtool_without_warnings() {
    if !require_tool("promtool") {
        return;
    }
    let cgroup = tempfile::tempdir().unwrap();
    let pod = cgroup
        .path()
        .join("kubepods/besteffort/pod0f0e0d0c-0b0a-4999-8888-777766665555");
    std::fs::create_dir_all(&pod).unwrap();
    std::fs::write(
        pod.join("cpu.stat"),
        "usage_usec 10\nuser_usec 5\nsystem_usec 5\n",
    )
    .unwrap();
    std::fs::write(pod.join("memory.current"), "4096\n").unwrap();
    let agent = Agent::builder()
        .arg("--host-cgroup")
        .arg(cgroup.path().display().to_string())
        .start();
    let text = agent.metrics_text();
    assert!(
        text.contains("nodekeeper_pod_cpu_usage_seconds_total{"),
        "pod metrics present:\n{text}"
    );

    nodekeeper_tests::assert_promtool_clean(&text);
}

#[test]
fn openmetrics_is_served_when_asked_for() {
    let agent = Agent::builder().start();
    let (status, body) = nodekeeper_tests::http_get_with(
        agent.metrics,
        "/metrics",
        &[("Accept", "application/openmetrics-text;version=1.0.0")],
    )
    .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    assert!(body.contains("# TYPE nodekeeper_build info"), "{body}");
    let plain = agent.metrics_text();
    assert!(
        !plain.contains("# EOF") && plain.contains("# TYPE nodekeeper_build_info gauge"),
        "{plain}"
    );
}

#[test]
fn prometheus_scrapes_the_agent() {
    if !require_tool("prometheus") {
        return;
    }
    let agent = Agent::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: nodekeeper\n    static_configs:\n      - targets: ['{}']\n",
            agent.metrics
        ),
    )
    .unwrap();
    let web = loopback(free_port());
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"));
    let prom = Proc::spawn("prometheus", cmd, dir.path());

    let query = |q: &str| -> Option<serde_json::Value> {
        let (status, body) = http_get(web, &format!("/api/v1/query?query={q}")).ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    };
    let up = wait_for(
        Duration::from_secs(30),
        "Prometheus to record up{job=\"nodekeeper\"} == 1",
        || {
            let v = query("up%7Bjob%3D%22nodekeeper%22%7D")?;
            let value = v["data"]["result"][0]["value"][1].as_str()?.to_string();
            (value == "1").then_some(value)
        },
    );
    assert_eq!(up, "1");
    let mem = query("nodekeeper_node_memory_total_bytes").expect("query answers");
    let result = mem["data"]["result"].as_array().expect("result array");
    assert_eq!(result.len(), 1, "one series: {mem}");
    let bytes: f64 = result[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(bytes > 0.0, "{mem}; prometheus log:\n{}", prom.log_text());
}
