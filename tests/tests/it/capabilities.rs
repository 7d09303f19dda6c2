//! Issue #19: the agent container's Linux capabilities, as the rendered base DaemonSet grants
//! them (`drop: [ALL]` + `add: [...]`, read from `kubectl kustomize manifests/base`), are
//! enough for what the base enables and each one is needed. The real agent binary runs under
//! `setpriv` with exactly that bounding set (root's capabilities after exec are the bounding
//! set; `--no-new-privs` as `allowPrivilegeEscalation: false`), inside network namespaces the
//! tests create:
//! - the DNS cache in transparent mode (rules, port 53) on a read-only root filesystem,
//!   answering through the ClusterIP;
//! - each capability taken away in turn breaks the path that needs it: NET_BIND_SERVICE the
//!   cache's listener, NET_ADMIN the wiring, NET_RAW the wiring on a legacy-iptables node,
//!   SYS_ADMIN and SYS_PTRACE the per-pod connection census of another process's namespace.
//!
//! Never touches the host's interfaces, rules or mounts (the read-only root is a remount in a
//! private mount namespace). Every test needs root and says so in its name.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nodekeeper_tests::kustomize::{have_tools, render, yaml_documents};
use nodekeeper_tests::netns_pods::{Holder, Netns};
use nodekeeper_tests::{Proc, agent_bin, require_root, require_tool, wait_for};
use serde_json::{Value, json};

/// Each shipped capability and the path below that shows it is needed. A capability added to
/// the DaemonSet without a row here fails `every_shipped_capability_has_a_path_that_needs_it`.
const NEEDED_BY: [(&str, &str); 5] = [
    ("NET_ADMIN", "dns wiring: iptables/nftables rules"),
    ("NET_BIND_SERVICE", "the DNS cache's port 53"),
    ("NET_RAW", "dns wiring on a legacy-iptables node"),
    (
        "SYS_ADMIN",
        "setns into a pod's network namespace; also what lets the one-pass census load its BPF program",
    ),
    ("SYS_PTRACE", "opening another process's /proc/PID/ns/net"),
];

fn can_run(tools: &[&str]) -> bool {
    require_root()
        && have_tools(&[])
        && ["ip", "setpriv", "unshare", "nsenter"]
            .iter()
            .chain(tools)
            .all(|t| require_tool(t))
}

/// The `add` list of the base DaemonSet's `nodekeeper` container, as Linux names it
/// (`NET_ADMIN` -> `net_admin`), after checking that it drops everything else.
fn shipped_capabilities() -> BTreeSet<String> {
    let objects = yaml_documents(&render("manifests/base"));
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "nodekeeper")
        .expect("rendered base has the DaemonSet");
    let container = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "nodekeeper")
        .expect("container nodekeeper");
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], json!(["ALL"]), "{caps}");
    caps["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("name").to_ascii_lowercase())
        .collect()
}

fn without(caps: &BTreeSet<String>, cap: &str) -> BTreeSet<String> {
    let mut c = caps.clone();
    assert!(c.remove(cap), "{cap} is not in {caps:?}");
    c
}

/// `setpriv` arguments that exec the agent with exactly `caps` (and no_new_privs).
fn setpriv_args(caps: &BTreeSet<String>) -> Vec<String> {
    let bounding: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "--bounding-set".into(),
        bounding,
        "--inh-caps".into(),
        "-all".into(),
        "--ambient-caps".into(),
        "-all".into(),
        "--no-new-privs".into(),
        "--".into(),
        agent_bin().to_str().expect("utf-8 path").into(),
    ]
}

/// The agent in `ns` with exactly `caps`.
fn agent_with(ns: &Netns, caps: &BTreeSet<String>) -> Command {
    let mut cmd = ns.command("setpriv");
    cmd.args(setpriv_args(caps));
    cmd
}

/// The agent outside any test namespace (the census enters namespaces itself).
fn host_agent_with(caps: &BTreeSet<String>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(setpriv_args(caps));
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "({}) {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{cmd:?} failed {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The capability bits `caps` make in /proc/PID/status (CapEff).
fn mask(caps: &BTreeSet<String>) -> u64 {
    caps.iter()
        .map(|c| match c.as_str() {
            "net_bind_service" => 10,
            "net_admin" => 12,
            "net_raw" => 13,
            "sys_ptrace" => 19,
            "sys_admin" => 21,
            other => panic!("no bit number for {other}: add it"),
        })
        .fold(0u64, |m, bit| m | (1 << bit))
}

fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

// === a namespace wired like a node (as in dns_node.rs) ===

/// kube-dns at 10.0.0.53 behind `iptables_prog`'s DNAT for the ClusterIP 10.96.0.10, the
/// cache's addresses and the upstream's 10.0.0.54 on lo (no dummy link type on this kernel).
fn like_a_node(ns: &Netns, iptables_prog: &str) {
    for a in [
        "10.0.0.53/32",
        "10.0.0.54/32",
        "10.96.0.10/32",
        "169.254.20.10/32",
    ] {
        ok(ns.command("ip").args(["addr", "add", a, "dev", "lo"]));
    }
    for p in ["udp", "tcp"] {
        ok(ns.command(iptables_prog).args([
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "10.96.0.10/32",
            "-p",
            p,
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "10.0.0.53:53",
        ]));
    }
}

/// dnsmasq answering `probe.test` with `answer` on `addr`, in `ns`.
fn dnsmasq(ns: &Netns, dir: &Path, name: &str, addr: &str, answer: &str) -> Proc {
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        &format!("--listen-address={addr}"),
        &format!("--address=/probe.test/{answer}"),
        &format!("--pid-file={}", dir.join(format!("{name}.pid")).display()),
        "--log-facility=-",
    ]);
    Proc::spawn(name, cmd, dir)
}

/// `dig @10.96.0.10 probe.test` from inside `ns`: the first A record, if any.
fn ask(ns: &Netns) -> Option<String> {
    let out = output(ns.command("dig").args([
        "+short",
        "+time=1",
        "+tries=1",
        "@10.96.0.10",
        "probe.test",
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .filter(|l| l.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_string)
}

/// The DNS cache in transparent mode (the ClusterIP too), iptables rules, upstream 10.0.0.54.
const DNS_CONFIG: &str = "shutdownTimeout: 2s
dns:
  enabled: true
  listenIps: [\"169.254.20.10\"]
  clusterIps: [\"10.96.0.10\"]
  lameDuck: 0s
  node: {manageInterface: false, rules: iptables, checkInterval: 1s}
  upstreams:
    clusterZones: []
    default: {servers: [\"10.0.0.54\"]}
";

/// `nodekeeper run --standalone` with the DNS cache in `ns`, with exactly `caps`, on a root
/// filesystem remounted read-only in a private mount namespace; only the state dir (a hostPath
/// in the pod) stays writable. `ip netns exec`, `unshare`, `sh` and `setpriv` all exec, so the
/// Proc's pid is the agent's.
fn dns_agent(ns: &Netns, dir: &Path, caps: &BTreeSet<String>) -> Proc {
    let cfg = dir.join("agent.yaml");
    std::fs::write(&cfg, DNS_CONFIG).expect("config");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let mut cmd = ns.command("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$NK_STATE\" \"$NK_STATE\" && mount -o remount,bind,ro / && exec setpriv \"$@\"",
        "sh",
    ])
    .args(setpriv_args(caps))
    .args(["run", "--standalone", "--config"])
    .arg(&cfg)
    .args([
        "--metrics-listen",
        "127.0.0.1:19740",
        "--api-listen",
        "127.0.0.1:19741",
        "--state-dir",
    ])
    .arg(&state)
    .env("NK_STATE", &state)
    .env("NODEKEEPER_LOG", "info,nodekeeper=debug")
    .env_remove("KUBECONFIG");
    Proc::spawn("agent", cmd, dir)
}

// === tests ===

#[test]
fn every_shipped_capability_has_a_path_that_needs_it() {
    if !have_tools(&[]) {
        return;
    }
    let shipped = shipped_capabilities();
    let proved: BTreeSet<String> = NEEDED_BY
        .iter()
        .map(|(c, _)| c.to_ascii_lowercase())
        .collect();
    assert_eq!(
        shipped, proved,
        "the DaemonSet's capabilities and the ones this file proves needed differ"
    );
}

/// With exactly the shipped set and a read-only root, the agent wires the node and answers
/// through the ClusterIP; its effective capabilities are the set and nothing more.
#[test]
fn the_shipped_capabilities_serve_dns_on_a_read_only_root_as_root() {
    if !can_run(&["iptables", "dnsmasq", "dig"]) {
        return;
    }
    let caps = shipped_capabilities();
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("caps-dns");
    like_a_node(&ns, "iptables");
    let _kube_dns = dnsmasq(&ns, dir.path(), "kube-dns", "10.0.0.53", "10.0.0.1");
    let _upstream = dnsmasq(&ns, dir.path(), "upstream", "10.0.0.54", "10.0.0.2");
    wait_for(Duration::from_secs(10), "kube-dns through the DNAT", || {
        (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
    });
    let agent = dns_agent(&ns, dir.path(), &caps);
    wait_for(
        Duration::from_secs(20),
        "the agent answering on the ClusterIP",
        || (ask(&ns).as_deref() == Some("10.0.0.2")).then_some(()),
    );
    assert_eq!(
        effective_capabilities(agent.pid()),
        mask(&caps),
        "the agent runs with exactly {caps:?}"
    );
    let probe = output(Command::new("nsenter").args([
        "-t",
        &agent.pid().to_string(),
        "-m",
        "touch",
        "/nodekeeper-ro-probe",
    ]));
    assert!(
        !probe.status.success()
            && String::from_utf8_lossy(&probe.stderr).contains("Read-only file system"),
        "the agent's root is not read-only: {}",
        text(&probe)
    );
    let log = agent.log_text();
    assert!(!log.contains("capability failed"), "{log}");
}

/// Without NET_BIND_SERVICE the cache cannot listen on port 53, says so, and installs no rule.
#[test]
fn net_bind_service_is_needed_for_the_dns_port_as_root() {
    if !can_run(&["iptables"]) {
        return;
    }
    let caps = without(&shipped_capabilities(), "net_bind_service");
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("caps-bind");
    like_a_node(&ns, "iptables");
    let agent = dns_agent(&ns, dir.path(), &caps);
    wait_for(Duration::from_secs(20), "the refused listener", || {
        agent
            .log_text()
            .contains("cannot listen on udp 169.254.20.10:53: Permission denied")
            .then_some(())
    });
    // Never steered at a cache that is not listening (issue #19, b19).
    let rules = output(&mut ns.command("iptables-save"));
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("nodekeeper-dns"),
        "rules installed for an unbound cache: {}",
        agent.log_text()
    );
}

/// Without NET_ADMIN no rule can be read or written (nf_tables here); with the set they are.
#[test]
fn net_admin_is_needed_for_the_dns_rules_as_root() {
    if !can_run(&["iptables"]) {
        return;
    }
    let caps = shipped_capabilities();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(&cfg, DNS_CONFIG).unwrap();
    let ns = Netns::new("caps-admin");
    like_a_node(&ns, "iptables");
    let refused = output(
        agent_with(&ns, &without(&caps, "net_admin"))
            .args(["dns-wiring", "setup", "--config"])
            .arg(&cfg),
    );
    assert!(
        !refused.status.success() && text(&refused).contains("Permission denied"),
        "{}",
        text(&refused)
    );
    let done = ok(agent_with(&ns, &caps)
        .args(["dns-wiring", "setup", "--config"])
        .arg(&cfg));
    assert!(done.contains("\"action\":\"setup\""), "{done}");
}

/// On a node whose kube-proxy uses legacy iptables, the wiring uses it too, and legacy
/// iptables opens a raw socket: without NET_RAW it cannot even read its tables.
#[test]
fn net_raw_is_needed_on_a_legacy_iptables_node_as_root() {
    if !can_run(&["iptables-legacy"]) {
        return;
    }
    let caps = shipped_capabilities();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(&cfg, DNS_CONFIG).unwrap();
    let ns = Netns::new("caps-raw");
    like_a_node(&ns, "iptables-legacy");
    let refused = output(
        agent_with(&ns, &without(&caps, "net_raw"))
            .args(["dns-wiring", "setup", "--config"])
            .arg(&cfg),
    );
    assert!(
        !refused.status.success() && text(&refused).contains("iptables-legacy"),
        "{}",
        text(&refused)
    );
    let done = ok(agent_with(&ns, &caps)
        .args(["dns-wiring", "setup", "--config"])
        .arg(&cfg));
    assert!(done.contains("\"action\":\"setup\""), "{done}");
    let rules = ok(&mut ns.command("iptables-legacy-save"));
    assert!(rules.contains("nodekeeper-dns"), "{rules}");
}

/// The per-pod census opens a pod process's /proc/PID/ns/net (a ptrace read: SYS_PTRACE, the
/// process runs with capabilities the agent lacks) and setns into it (SYS_ADMIN).
#[test]
fn sys_admin_and_sys_ptrace_are_needed_for_the_pod_census_as_root() {
    if !can_run(&[]) {
        return;
    }
    let caps = shipped_capabilities();
    let pod = Netns::new("caps-pod");
    let holder = Holder::start(
        Some(&pod),
        &json!({"serve": [{"addr": "127.0.0.1", "port": 5555}]}),
    );
    let netns = format!("/proc/{}/ns/net", holder.pid());
    let census = |caps: &BTreeSet<String>| -> (bool, Value) {
        let out = output(host_agent_with(caps).args(["connections", "--netns", &netns]));
        let v: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
        (out.status.success(), v[0].clone())
    };
    let (success, counted) = census(&caps);
    assert!(success, "{counted}");
    assert_eq!(
        counted["listeners"][0]["port"], 5555,
        "the pod's listener: {counted}"
    );
    for cap in ["sys_admin", "sys_ptrace"] {
        let (success, refused) = census(&without(&caps, cap));
        assert!(!success, "without {cap}: {refused}");
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot enter network namespace")),
            "without {cap}: {refused}"
        );
    }
}

/// The one-pass census (`metrics.connections.source` auto or bpf) loads a BPF tracing program
/// that reads kernel memory. The kernel allows that with CAP_BPF + CAP_PERFMON or with
/// CAP_SYS_ADMIN (bpf_capable(), perfmon_capable()), which the census already holds for setns:
/// the shipped set runs it and adds nothing for it (docs/decisions.md #18-i). Without
/// SYS_ADMIN the load is refused; BPF + PERFMON instead load it (the census then stops at setns).
#[test]
fn the_shipped_capabilities_run_the_one_pass_census_as_root() {
    if !can_run(&[]) {
        return;
    }
    let caps = shipped_capabilities();
    let pod = Netns::new("caps-bpf");
    let holder = Holder::start(
        Some(&pod),
        &json!({"serve": [{"addr": "127.0.0.1", "port": 5556}]}),
    );
    let netns = format!("/proc/{}/ns/net", holder.pid());
    let census = |caps: &BTreeSet<String>, source: &str| -> (bool, Value) {
        let out = output(host_agent_with(caps).args([
            "connections",
            "--source",
            source,
            "--netns",
            &netns,
        ]));
        let v: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
        (out.status.success(), v[0].clone())
    };
    for source in ["bpf", "auto"] {
        let (success, counted) = census(&caps, source);
        assert!(success, "{source}: {counted}");
        assert_eq!(counted["source"], "bpf", "{source}: {counted}");
        assert_eq!(counted["fallback_reason"], Value::Null, "{counted}");
        assert_eq!(counted["listeners"][0]["port"], 5556, "{counted}");
    }
    let no_admin = without(&caps, "sys_admin");
    let (success, refused) = census(&no_admin, "bpf");
    assert!(!success, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("BPF one-pass census unavailable")
                && e.contains("Operation not permitted")),
        "without sys_admin the program is refused: {refused}"
    );
    let mut narrow = no_admin;
    narrow.extend(["bpf".to_string(), "perfmon".to_string()]);
    let (_, loaded) = census(&narrow, "bpf");
    assert!(
        loaded["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot enter network namespace")),
        "bpf + perfmon load the program; setns still needs sys_admin: {loaded}"
    );
}
