//! The agent connected to the fake Kubernetes API server: pod metrics named from the pod watch,
//! sysctl profiles selected by the watched Node's labels (relabel switches live), status
//! annotations on the Node, and pod-level sysctls inside real network namespaces standing in
//! for pods.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodekeeper_tests::fake_api::{FakeApi, PodSeed};
use nodekeeper_tests::{Agent, Proc, require_root, require_tool, sample, wait_for};

const NODE: &str = "node-a";

fn fake_with_node(labels: &[(&str, &str)]) -> (FakeApi, tempfile::TempDir, std::path::PathBuf) {
    let api = FakeApi::start();
    api.add_node(NODE, labels);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    (api, dir, kubeconfig)
}

#[test]
fn pod_metrics_carry_names_from_the_pod_watch() {
    let (api, dir, kubeconfig) = fake_with_node(&[]);
    let pod = api.add_pod(PodSeed::new("web-1").namespace("shop").node(NODE));
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    api.add_pod(PodSeed::new("elsewhere").node("node-b"));
    let cgroup = dir.path().join("cgroup");
    nodekeeper_tests::cgroup::pod_dir(
        &cgroup.join(format!("kubepods/burstable/pod{uid}")),
        "usage_usec 2000000\n",
        1000,
        "inactive_file 0\n",
    );
    let agent = Agent::builder()
        .connected(&kubeconfig, NODE)
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    let value = wait_for(Duration::from_secs(10), "pod named in metrics", || {
        sample(
            &agent.metrics_text(),
            "nodekeeper_pod_cpu_usage_seconds_total",
            &[("uid", &uid), ("namespace", "shop"), ("pod", "web-1")],
        )
    });
    assert_eq!(value, 2.0);
    // The watch asked only for this node's pods.
    let pod_queries: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/pods")
        .collect();
    assert!(!pod_queries.is_empty(), "the agent watched pods");
    // Issue #19: every request the agent made was as its ServiceAccount, under the shipped RBAC
    // (docs/fake-api-server.md section 13), and none was refused.
    for r in api.requests() {
        assert_eq!(
            r.user, "system:serviceaccount:nodekeeper-system:nodekeeper",
            "{r:?}"
        );
        assert!(r.status != 401 && r.status != 403, "refused: {r:?}");
    }
    for r in &pod_queries {
        assert!(
            r.query.contains("spec.nodeName%3Dnode-a") || r.query.contains("spec.nodeName=node-a"),
            "unfiltered pod query: {r:?}"
        );
    }
}

fn fake_sysctl(dir: &Path) -> std::path::PathBuf {
    let proc = dir.join("proc");
    for (key, value) in [("net/core/somaxconn", "4096"), ("vm/swappiness", "60")] {
        let f = proc.join("sys").join(key);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, format!("{value}\n")).unwrap();
    }
    proc
}

fn read(proc: &Path, key: &str) -> String {
    std::fs::read_to_string(proc.join("sys").join(key))
        .unwrap()
        .trim()
        .to_string()
}

const POOL_PROFILES: &str = "metrics:\n  enabled: false\nsysctl:\n  enabled: true\n  interval: 60s\n  profiles:\n    - name: trino\n      nodeSelector:\n        matchLabels: {pool: trino}\n      sysctls:\n        net.core.somaxconn: 8192\n    - name: web\n      nodeSelector:\n        matchLabels: {pool: web}\n      sysctls:\n        vm.swappiness: 10\n";

#[test]
fn relabelling_the_node_switches_profiles_live_and_annotates_the_node() {
    let (api, dir, kubeconfig) = fake_with_node(&[("pool", "trino")]);
    let proc = fake_sysctl(dir.path());
    let _agent = Agent::builder()
        .config(POOL_PROFILES)
        .connected(&kubeconfig, NODE)
        .arg("--host-proc")
        .arg(proc.display().to_string())
        .start();
    wait_for(Duration::from_secs(10), "trino profile applied", || {
        (read(&proc, "net/core/somaxconn") == "8192").then_some(())
    });
    let annotations = wait_for(Duration::from_secs(10), "status annotations", || {
        let node = api.node(NODE)?;
        let a = node["metadata"]["annotations"].clone();
        (a["nodekeeper.io/sysctl-profiles"] == "trino").then_some(a)
    });
    assert_eq!(
        annotations["nodekeeper.io/sysctl-hash"]
            .as_str()
            .unwrap()
            .len(),
        16
    );

    // Relabel through the API: well within the 60 s interval, the watch switches profiles.
    api.label_node(NODE, "pool", Some("web"));
    wait_for(
        Duration::from_secs(10),
        "trino reverted, web applied",
        || {
            (read(&proc, "net/core/somaxconn") == "4096" && read(&proc, "vm/swappiness") == "10")
                .then_some(())
        },
    );
    wait_for(Duration::from_secs(10), "annotation follows", || {
        (api.node(NODE)?["metadata"]["annotations"]["nodekeeper.io/sysctl-profiles"] == "web")
            .then_some(())
    });
}

/// A process in a fresh network namespace standing in for a pod's sandbox.
struct FakePodNetns {
    name: String,
    proc: Option<Proc>,
}

impl FakePodNetns {
    fn new(tag: &str, dir: &Path) -> Self {
        let name = format!("nk-{tag}-{}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        // nsenter execs in place (ip netns exec forks), so the PID is the one inside the netns.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{name}"))
            .args(["sleep", "600"]);
        let proc = Proc::spawn(&name, cmd, dir);
        let me = Self {
            name,
            proc: Some(proc),
        };
        wait_for(Duration::from_secs(5), "pod process in its netns", || {
            let ns = std::fs::read_link(format!("/proc/{}/ns/net", me.pid())).ok()?;
            (ns != std::fs::read_link("/proc/self/ns/net").ok()?).then_some(())
        });
        me
    }
    fn pid(&self) -> u32 {
        self.proc.as_ref().unwrap().pid()
    }
    fn read(&self, key: &str) -> String {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "cat",
                &format!("/proc/sys/{}", key.replace('.', "/")),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

impl Drop for FakePodNetns {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn host_somaxconn() -> String {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .to_string()
}

/// Seeds a pod in the fake API and its cgroup directory, whose sandbox sub-cgroup holds `pid`.
fn seed_pod(api: &FakeApi, cgroup: &Path, seed: PodSeed, pid: u32) {
    let uid = api.add_pod(seed)["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let pod_dir = cgroup.join(format!("kubepods/besteffort/pod{uid}"));
    nodekeeper_tests::cgroup::pod_dir(&pod_dir, "usage_usec 1\n", 1, "inactive_file 0\n");
    // The sandbox process sits in a container sub-cgroup, as with containerd.
    std::fs::create_dir_all(pod_dir.join("sandbox")).unwrap();
    std::fs::write(pod_dir.join("sandbox/cgroup.procs"), format!("{pid}\n")).unwrap();
}

#[test]
fn pod_profiles_and_annotations_tune_only_the_selected_pods_network_namespaces_as_root() {
    if !require_root() || !require_tool("ip") || !require_tool("nsenter") {
        return;
    }
    let host_before = (host_somaxconn(), host_key("net/ipv4/tcp_keepalive_time"));
    let (api, dir, kubeconfig) = fake_with_node(&[]);
    let db = FakePodNetns::new("pod-db", dir.path());
    let web = FakePodNetns::new("pod-web", dir.path());
    let asks = FakePodNetns::new("pod-asks", dir.path());
    let greedy = FakePodNetns::new("pod-greedy", dir.path());
    let web_before = web.read("net.core.somaxconn");
    let greedy_before = greedy.read("net.ipv4.tcp_keepalive_time");
    let cgroup = dir.path().join("cgroup");
    seed_pod(
        &api,
        &cgroup,
        PodSeed::new("db-0").node(NODE).label("app", "db"),
        db.pid(),
    );
    seed_pod(
        &api,
        &cgroup,
        PodSeed::new("web-0").node(NODE).label("app", "web"),
        web.pid(),
    );
    seed_pod(
        &api,
        &cgroup,
        PodSeed::new("asks-0")
            .node(NODE)
            .annotation("nodekeeper.io/sysctls", "net.core.somaxconn=777"),
        asks.pid(),
    );
    // Asks for a key outside podAnnotation.allow: refused, nothing written.
    seed_pod(
        &api,
        &cgroup,
        PodSeed::new("greedy-0")
            .node(NODE)
            .annotation("nodekeeper.io/sysctls", "net.ipv4.tcp_keepalive_time=5"),
        greedy.pid(),
    );
    // A db-labelled hostNetwork pod whose process is in the host's namespace (this test's own):
    // it must never be tuned, or the host would be.
    seed_pod(
        &api,
        &cgroup,
        PodSeed::new("db-host")
            .node(NODE)
            .label("app", "db")
            .host_network(),
        std::process::id(),
    );
    // And a db pod that claims not to be hostNetwork but whose process is in the host namespace.
    seed_pod(
        &api,
        &cgroup,
        PodSeed::new("db-liar").node(NODE).label("app", "db"),
        std::process::id(),
    );
    let config = "sysctl:\n  enabled: true\n  podAnnotation:\n    enabled: true\n    allow: [\"net.core.*\"]\n  profiles:\n    - name: db-pods\n      podSelector:\n        matchLabels: {app: db}\n      sysctls:\n        net.core.somaxconn: 23456\n        net.ipv4.tcp_keepalive_time: 120\n";
    let agent = Agent::builder()
        .config(config)
        .connected(&kubeconfig, NODE)
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    wait_for(Duration::from_secs(10), "db pod tuned", || {
        (db.read("net.core.somaxconn") == "23456").then_some(())
    });
    assert_eq!(db.read("net.ipv4.tcp_keepalive_time"), "120");
    wait_for(Duration::from_secs(10), "annotated pod tuned", || {
        (asks.read("net.core.somaxconn") == "777").then_some(())
    });
    let m = wait_for(Duration::from_secs(10), "greedy pod refused", || {
        let m = agent.metrics_text();
        sample(
            &m,
            "nodekeeper_sysctl_pod_applies_total",
            &[("result", "rejected")],
        )
        .map(|_| m)
    });
    assert_eq!(
        greedy.read("net.ipv4.tcp_keepalive_time"),
        greedy_before,
        "refused pod untouched"
    );
    assert_eq!(
        web.read("net.core.somaxconn"),
        web_before,
        "unselected pod untouched"
    );
    assert_eq!(
        (host_somaxconn(), host_key("net/ipv4/tcp_keepalive_time")),
        host_before,
        "host untouched"
    );
    assert_eq!(
        sample(
            &m,
            "nodekeeper_sysctl_pod_applies_total",
            &[("result", "applied")]
        ),
        Some(2.0),
        "{m}"
    );
}

fn host_key(path: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_pod_profile_with_a_global_key_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "sysctl:\n  profiles:\n    - name: bad\n      podSelector:\n        matchLabels: {app: db}\n      sysctls:\n        vm.swappiness: 1\n",
    )
    .unwrap();
    let o = Command::new(nodekeeper_tests::agent_bin())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("sysctl.profiles[0].sysctls") && e.contains("not per network namespace"),
        "{e}"
    );
}

#[test]
fn a_quarantined_sysctl_key_is_reported_as_a_node_event_and_the_rest_is_applied() {
    let (api, dir, kubeconfig) = fake_with_node(&[("pool", "trino")]);
    let proc = fake_sysctl(dir.path());
    // A key the kernel refuses (writes fail like /dev/full).
    let refused = proc.join("sys/vm/zz_refused");
    std::os::unix::fs::symlink("/dev/full", &refused).unwrap();
    let _agent = Agent::builder()
        .config(&POOL_PROFILES.replace(
            "net.core.somaxconn: 8192\n",
            "net.core.somaxconn: 8192\n        vm.zz_refused: \"on\"\n",
        ))
        .connected(&kubeconfig, NODE)
        .arg("--host-proc")
        .arg(proc.display().to_string())
        .start();
    let event = wait_for(Duration::from_secs(10), "SysctlQuarantined event", || {
        api.events()
            .into_iter()
            .find(|e| e["reason"] == "SysctlQuarantined")
    });
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["involvedObject"]["name"], NODE);
    let message = event["message"].as_str().unwrap();
    assert!(message.contains("vm.zz_refused"), "{message}");
    assert_eq!(
        read(&proc, "net/core/somaxconn"),
        "8192",
        "the other key of the set is applied"
    );
}
