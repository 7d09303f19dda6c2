//! The DNS cache's node wiring and fail-open guard against the real firewall tools, inside
//! network namespaces the tests create (never the host's interfaces, rules or resolver).
//!
//! Rules tests drive `nodekeeper dns-wiring setup|check|teardown|hold` with
//! `manageInterface: false` (this machine's kernel has no `dummy` link type) and read the
//! result back with `iptables-save`/`ip6tables-save`/`nft list table`. The guard test wires a
//! namespace like a node: a stand-in kube-dns (dnsmasq on 10.0.0.53), kube-proxy's DNAT for the
//! ClusterIP 10.96.0.10, and a stand-in cache (dnsmasq) holding 10.96.0.10 and 169.254.20.10
//! on `lo` behind our NOTRACK rules. The dummy interface itself (create, addresses, nodad,
//! repair, teardown) and the guard with a managed interface run in one boot of the kernel VM
//! (tests/scripts/kernel-vm + tests/scripts/dns-node-check.sh). Every test needs root and says
//! so in its name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::netns_pods::Netns;
use nodekeeper_tests::{Proc, agent_bin, require_root, require_tool, wait_for, workspace_root};
use serde_json::Value;

/// The guard flags the guard test runs with, and the window they promise.
const GUARD_INTERVAL: Duration = Duration::from_secs(1);
const GUARD_FAILURES: u32 = 3;

fn can_run(tools: &[&str]) -> bool {
    require_root() && tools.iter().all(|t| require_tool(t))
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_config(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).expect("write config");
    p
}

fn config(listen: &[&str], cluster: &[&str], rules: &str) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "dns:\n  listenIps: [{}]\n  clusterIps: [{}]\n  node:\n    manageInterface: false\n    rules: {rules}\n    checkInterval: 1s\n",
        list(listen),
        list(cluster)
    )
}

/// `nodekeeper dns-wiring ACTION --config F` inside `ns`: its JSON line.
fn wiring(ns: &Netns, action: &str, config: &Path) -> Value {
    let out = ok(ns
        .command(agent_bin().to_str().expect("utf-8 path"))
        .args(["dns-wiring", action, "--config"])
        .arg(config));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"))
}

/// Our rules as `PROG-save` prints them (`-A CHAIN ...`, by table), sorted.
fn ours(ns: &Netns, prog: &str) -> Vec<String> {
    let text = ok(&mut ns.command(&format!("{prog}-save")));
    let mut table = String::new();
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| {
            if let Some(t) = l.strip_prefix('*') {
                table = t.to_string();
            }
            l.contains("--comment nodekeeper-dns")
                .then(|| format!("{table} {l}"))
        })
        .collect();
    out.sort();
    out
}

/// The rules node-local-dns installs, per IP and protocol, as iptables-save prints them.
fn expected_iptables(ips: &[&str], port: u16) -> (Vec<String>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for ip in ips {
        let (len, out) = if ip.contains(':') {
            (128, &mut v6)
        } else {
            (32, &mut v4)
        };
        for p in ["udp", "tcp"] {
            for (table, chain, dir, target) in [
                ("raw", "PREROUTING", "d", "NOTRACK"),
                ("raw", "OUTPUT", "d", "NOTRACK"),
                ("raw", "OUTPUT", "s", "NOTRACK"),
                ("filter", "INPUT", "d", "ACCEPT"),
                ("filter", "INPUT", "s", "ACCEPT"),
                ("filter", "OUTPUT", "d", "ACCEPT"),
                ("filter", "OUTPUT", "s", "ACCEPT"),
            ] {
                out.push(format!(
                    "{table} -A {chain} -{dir} {ip}/{len} -p {p} -m {p} --{dir}port {port} -m comment --comment nodekeeper-dns -j {target}"
                ));
            }
        }
    }
    v4.sort();
    v6.sort();
    (v4, v6)
}

/// Chain -> sorted rule lines of `inet nodekeeper_dns`; None when the table does not exist.
fn nft_table(ns: &Netns) -> Option<BTreeMap<String, Vec<String>>> {
    let out = output(
        ns.command("nft")
            .args(["list", "table", "inet", "nodekeeper_dns"]),
    );
    if !out.status.success() {
        return None;
    }
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut chain = String::new();
    for l in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
        if let Some(c) = l.strip_prefix("chain ") {
            chain = c.trim_end_matches(" {").to_string();
            chains.entry(chain.clone()).or_default();
        } else if !l.is_empty() && l != "}" && !l.starts_with("table ") {
            chains.entry(chain.clone()).or_default().push(l.to_string());
        }
    }
    chains.values_mut().for_each(|v| v.sort());
    Some(chains)
}

fn expected_nft(ips: &[&str], port: u16) -> BTreeMap<String, Vec<String>> {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let headers = [
        ("raw_prerouting", "prerouting", "raw"),
        ("raw_output", "output", "raw"),
        ("filter_input", "input", "filter"),
        ("filter_output", "output", "filter"),
    ];
    for (name, hook, prio) in headers {
        chains.entry(name.into()).or_default().push(format!(
            "type filter hook {hook} priority {prio}; policy accept;"
        ));
    }
    for ip in ips {
        let fam = if ip.contains(':') { "ip6" } else { "ip" };
        for p in ["udp", "tcp"] {
            for (chain, dir, verdict) in [
                ("raw_prerouting", "d", "notrack"),
                ("raw_output", "d", "notrack"),
                ("raw_output", "s", "notrack"),
                ("filter_input", "d", "accept"),
                ("filter_input", "s", "accept"),
                ("filter_output", "d", "accept"),
                ("filter_output", "s", "accept"),
            ] {
                chains.entry(chain.into()).or_default().push(format!(
                    "{fam} {dir}addr {ip} {p} {dir}port {port} {verdict}"
                ));
            }
        }
    }
    chains.values_mut().for_each(|v| v.sort());
    chains
}

fn repairs(v: &Value) -> u64 {
    v["repairs"].as_u64().expect("repairs")
}

#[test]
fn iptables_rules_setup_check_teardown_in_a_netns_as_root() {
    if !can_run(&["ip", "iptables-save", "ip6tables-save"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns-ipt");
    let ips = ["169.254.20.10", "10.96.0.10", "fd00:10:96::a"];
    let cfg = write_config(
        dir.path(),
        "c.yaml",
        &config(&ips[..1], &ips[1..], "iptables"),
    );
    // A rule of the node's own, which nothing of ours may touch.
    ok(ns.command("iptables").args([
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-d",
        "10.96.0.10/32",
        "-p",
        "udp",
        "-j",
        "NOTRACK",
    ]));
    let foreign = ok(ns.command("iptables").args(["-t", "raw", "-S"]));
    assert!(foreign.contains("-A PREROUTING -d 10.96.0.10/32 -p udp -j NOTRACK"));
    let (v4, v6) = expected_iptables(&ips, 53);
    assert_eq!(v4.len(), 28);

    let out = wiring(&ns, "setup", &cfg);
    assert_eq!(out["backend"], "iptables", "{out}");
    assert_eq!(ours(&ns, "iptables"), v4);
    assert_eq!(ours(&ns, "ip6tables"), v6);
    let raw = ok(ns.command("iptables").args(["-t", "raw", "-S"]));
    assert_eq!(raw.matches("nodekeeper-dns").count(), 12, "{raw}");

    // Idempotent.
    wiring(&ns, "setup", &cfg);
    assert_eq!(ours(&ns, "iptables"), v4);
    assert_eq!(ours(&ns, "ip6tables"), v6);
    assert_eq!(repairs(&wiring(&ns, "check", &cfg)), 0);

    // A deleted rule (and one per family) is restored by check; a duplicate is removed.
    ok(ns.command("iptables").args([
        "-t",
        "raw",
        "-D",
        "PREROUTING",
        "-d",
        "10.96.0.10/32",
        "-p",
        "udp",
        "-m",
        "udp",
        "--dport",
        "53",
        "-m",
        "comment",
        "--comment",
        "nodekeeper-dns",
        "-j",
        "NOTRACK",
    ]));
    ok(ns.command("ip6tables").args([
        "-D",
        "INPUT",
        "-d",
        "fd00:10:96::a/128",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "53",
        "-m",
        "comment",
        "--comment",
        "nodekeeper-dns",
        "-j",
        "ACCEPT",
    ]));
    ok(ns.command("iptables").args([
        "-A",
        "OUTPUT",
        "-s",
        "169.254.20.10/32",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--sport",
        "53",
        "-m",
        "comment",
        "--comment",
        "nodekeeper-dns",
        "-j",
        "ACCEPT",
    ]));
    assert_eq!(ours(&ns, "iptables").len(), 28);
    assert_eq!(repairs(&wiring(&ns, "check", &cfg)), 3);
    assert_eq!(ours(&ns, "iptables"), v4);
    assert_eq!(ours(&ns, "ip6tables"), v6);
    assert_eq!(repairs(&wiring(&ns, "check", &cfg)), 0);

    // Teardown removes every rule of ours, twice in a row, and nothing else.
    wiring(&ns, "teardown", &cfg);
    wiring(&ns, "teardown", &cfg);
    assert!(ours(&ns, "iptables").is_empty());
    assert!(ours(&ns, "ip6tables").is_empty());
    assert_eq!(
        ok(ns.command("iptables").args(["-t", "raw", "-S"])),
        foreign
    );
}

#[test]
fn nftables_table_setup_check_teardown_in_a_netns_as_root() {
    if !can_run(&["ip", "nft", "iptables-save"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns-nft");
    let ips = ["169.254.20.10", "10.96.0.10", "fd00:10:96::a"];
    let cfg = write_config(
        dir.path(),
        "c.yaml",
        &config(&ips[..1], &ips[1..], "nftables"),
    );
    // Stale iptables rules of ours from a run under the iptables backend go away.
    let old = write_config(dir.path(), "old.yaml", &config(&ips[..1], &[], "iptables"));
    wiring(&ns, "setup", &old);
    assert_eq!(ours(&ns, "iptables").len(), 14);

    let out = wiring(&ns, "setup", &cfg);
    assert_eq!(out["backend"], "nftables", "{out}");
    let want = expected_nft(&ips, 53);
    assert_eq!(nft_table(&ns), Some(want.clone()));
    assert!(
        ours(&ns, "iptables").is_empty(),
        "stale iptables rules survived"
    );
    wiring(&ns, "setup", &cfg);
    assert_eq!(nft_table(&ns), Some(want.clone()));
    assert_eq!(repairs(&wiring(&ns, "check", &cfg)), 0);

    // Delete one rule by its handle: check restores it (and only reports that one).
    let listing = ok(ns.command("nft").args([
        "-a",
        "list",
        "chain",
        "inet",
        "nodekeeper_dns",
        "raw_prerouting",
    ]));
    let handle = listing
        .lines()
        .find(|l| l.contains("ip daddr 10.96.0.10 udp dport 53 notrack"))
        .and_then(|l| l.rsplit("handle ").next())
        .expect("the rule's handle")
        .trim()
        .to_string();
    ok(ns.command("nft").args([
        "delete",
        "rule",
        "inet",
        "nodekeeper_dns",
        "raw_prerouting",
        "handle",
        &handle,
    ]));
    assert_ne!(nft_table(&ns), Some(want.clone()));
    assert_eq!(repairs(&wiring(&ns, "check", &cfg)), 1);
    assert_eq!(nft_table(&ns), Some(want.clone()));

    // The whole table deleted behind our back: every rule is restored.
    ok(ns
        .command("nft")
        .args(["delete", "table", "inet", "nodekeeper_dns"]));
    assert_eq!(repairs(&wiring(&ns, "check", &cfg)), 42);
    assert_eq!(nft_table(&ns), Some(want));

    wiring(&ns, "teardown", &cfg);
    wiring(&ns, "teardown", &cfg);
    assert_eq!(nft_table(&ns), None);
}

#[test]
fn sigkilled_wiring_owner_then_setup_leaves_exactly_one_set_as_root() {
    if !can_run(&["ip", "iptables-save", "ip6tables-save"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns-kill");
    // The crashed run held another ClusterIP; the new one must not keep its rules.
    let first = write_config(
        dir.path(),
        "first.yaml",
        &config(&["169.254.20.10"], &["10.96.0.11"], "iptables"),
    );
    let second = write_config(
        dir.path(),
        "second.yaml",
        &config(&["169.254.20.10"], &["10.96.0.10"], "iptables"),
    );
    let mut holder = hold(&ns, dir.path(), "hold", &first);
    assert_eq!(
        ours(&ns, "iptables"),
        expected_iptables(&["169.254.20.10", "10.96.0.11"], 53).0
    );
    holder.signal("KILL");
    holder.wait_exit(Duration::from_secs(5));
    assert_eq!(ours(&ns, "iptables").len(), 28, "SIGKILL left the rules");

    wiring(&ns, "setup", &second);
    assert_eq!(
        ours(&ns, "iptables"),
        expected_iptables(&["169.254.20.10", "10.96.0.10"], 53).0
    );
    // A second crash and restart under the same config: still exactly one set.
    let mut holder = hold(&ns, dir.path(), "hold2", &second);
    holder.signal("KILL");
    holder.wait_exit(Duration::from_secs(5));
    wiring(&ns, "setup", &second);
    assert_eq!(
        ours(&ns, "iptables"),
        expected_iptables(&["169.254.20.10", "10.96.0.10"], 53).0
    );

    // SIGTERM, unlike SIGKILL, tears down.
    let mut holder = hold(&ns, dir.path(), "hold3", &second);
    holder.signal("TERM");
    assert!(holder.wait_exit(Duration::from_secs(10)).success());
    assert!(ours(&ns, "iptables").is_empty());
}

/// `nodekeeper dns-wiring hold` in `ns` (setup, then a check every interval; teardown on
/// SIGTERM), once it reports ready.
fn hold(ns: &Netns, dir: &Path, name: &str, config: &Path) -> Proc {
    let mut cmd = ns.command(agent_bin().to_str().unwrap());
    cmd.args(["dns-wiring", "hold", "--config"]).arg(config);
    let holder = Proc::spawn(name, cmd, dir);
    wait_for(Duration::from_secs(20), "hold ready", || {
        holder.log_text().contains("\"ready\":true").then_some(())
    });
    holder
}

/// dnsmasq answering `probe.test` with `answer` on `addrs` (comma-separated), in `ns`.
fn dnsmasq(ns: &Netns, dir: &Path, name: &str, addrs: &str, answer: &str) -> Proc {
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        &format!("--listen-address={addrs}"),
        &format!("--address=/probe.test/{answer}"),
        &format!("--pid-file={}", dir.join(format!("{name}.pid")).display()),
        "--log-facility=-",
    ]);
    Proc::spawn(name, cmd, dir)
}

/// Wires `ns` like a node: kube-dns at 10.0.0.53 behind kube-proxy's DNAT for the ClusterIP
/// 10.96.0.10; the cache's addresses (and `extra` ones) local on lo (no dummy link type on this
/// kernel).
fn like_a_node(ns: &Netns, extra: &[&str]) {
    for a in ["10.0.0.53/32", "10.96.0.10/32", "169.254.20.10/32"]
        .iter()
        .chain(extra)
    {
        ok(ns.command("ip").args(["addr", "add", a, "dev", "lo"]));
    }
    for p in ["udp", "tcp"] {
        ok(ns.command("iptables").args([
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

/// `dig @10.96.0.10 probe.test` from inside `ns`: the first A record, if any.
fn ask(ns: &Netns) -> Option<String> {
    let out = output(ns.command("dig").args([
        "+short",
        "+time=1",
        "+tries=1",
        "@10.96.0.10",
        "probe.test",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .filter(|l| l.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_string)
}

#[test]
fn guard_fails_open_when_the_cache_is_sigkilled_in_a_netns_as_root() {
    if !can_run(&["ip", "iptables-save", "dnsmasq", "dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns-guard");
    like_a_node(&ns, &[]);
    let _kube_dns = dnsmasq(&ns, dir.path(), "kube-dns", "10.0.0.53", "10.0.0.1");
    // Without the cache's wiring, the ClusterIP reaches kube-dns through the DNAT.
    wait_for(Duration::from_secs(10), "kube-dns through the DNAT", || {
        (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
    });
    let cfg = write_config(
        dir.path(),
        "c.yaml",
        &config(&["169.254.20.10"], &["10.96.0.10"], "iptables"),
    );
    let mut cache = dnsmasq(
        &ns,
        dir.path(),
        "cache",
        "169.254.20.10,10.96.0.10",
        "10.0.0.2",
    );
    wiring(&ns, "setup", &cfg);
    wait_for(Duration::from_secs(10), "the cache through NOTRACK", || {
        (ask(&ns).as_deref() == Some("10.0.0.2")).then_some(())
    });

    let mut cmd = ns.command(agent_bin().to_str().unwrap());
    cmd.args(["dns-guard", "--config"])
        .arg(&cfg)
        .args([
            "--interval",
            "1s",
            "--failures",
            &GUARD_FAILURES.to_string(),
        ])
        .env("NODEKEEPER_LOG", "info,nodekeeper=debug");
    let mut guard = Proc::spawn("guard", cmd, dir.path());
    // While the cache answers, the guard leaves everything alone.
    std::thread::sleep(GUARD_INTERVAL * (GUARD_FAILURES + 1));
    assert_eq!(ours(&ns, "iptables").len(), 28, "{}", guard.log_text());
    assert_eq!(ask(&ns).as_deref(), Some("10.0.0.2"));

    cache.signal("KILL");
    cache.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    let window = GUARD_INTERVAL * GUARD_FAILURES + Duration::from_secs(1);
    wait_for(window + Duration::from_secs(10), "kube-dns again", || {
        (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
    });
    let took = killed.elapsed();
    eprintln!("fail-open: kube-dns answers {took:?} after the SIGKILL (window {window:?})");
    assert!(
        took <= window,
        "kube-dns answered only after {took:?}, beyond interval x failures + 1 s = {window:?}\n{}",
        guard.log_text()
    );
    assert!(
        ours(&ns, "iptables").is_empty(),
        "rules left after failing open"
    );
    // The guard logs after its teardown returns: under load the line can trail the answers.
    wait_for(
        Duration::from_secs(5),
        "the guard to log failing open",
        || guard.log_text().contains("failed open").then_some(()),
    );

    // The cache restarts: the guard does nothing; the agent's setup rewires.
    let _cache = dnsmasq(
        &ns,
        dir.path(),
        "cache2",
        "169.254.20.10,10.96.0.10",
        "10.0.0.2",
    );
    wiring(&ns, "setup", &cfg);
    wait_for(Duration::from_secs(10), "the restarted cache", || {
        (ask(&ns).as_deref() == Some("10.0.0.2")).then_some(())
    });
    std::thread::sleep(GUARD_INTERVAL * (GUARD_FAILURES + 1));
    assert_eq!(ours(&ns, "iptables").len(), 28, "{}", guard.log_text());
    wait_for(
        Duration::from_secs(5),
        "the guard to log the cache answering again",
        || guard.log_text().contains("answers again").then_some(()),
    );

    // SIGTERM while the cache (a successor, here) answers: the guard exits and keeps the wiring.
    guard.signal("TERM");
    assert!(guard.wait_exit(Duration::from_secs(15)).success());
    assert_eq!(ours(&ns, "iptables").len(), 28);
    assert!(
        guard.log_text().contains("leaving the wiring"),
        "{}",
        guard.log_text()
    );
}

/// The dummy interface needs a kernel with the `dummy` link type, which this machine's lacks:
/// tests/scripts/dns-node-check.sh runs in one boot of tests/scripts/kernel-vm and checks the
/// interface (create, NOARP/up, /32 /128 nodad addresses, repair, stale address, SIGKILL then
/// setup, teardown) and the guard with a managed interface (the ClusterIP taken off it).
#[test]
fn dummy_interface_and_guard_in_a_kernel_vm() {
    if !can_run(&[
        "qemu-system-x86_64",
        "busybox",
        "iptables-save",
        "dnsmasq",
        "dig",
    ]) {
        return;
    }
    let root = workspace_root();
    let out = output(
        Command::new(root.join("tests/scripts/kernel-vm"))
            .arg(format!(
                "NODEKEEPER_BIN={} bash tests/scripts/dns-node-check.sh",
                agent_bin().display()
            ))
            .current_dir(&root),
    );
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "dns node check failed in the VM:\n{text}"
    );
    assert!(text.contains("DNS NODE OK"), "{text}");
}

/// The real agent in transparent mode instead of a stand-in cache: it wires the namespace
/// itself, answers through its own upstream (10.0.0.54, which says 10.0.0.2) while kube-dns
/// behind the ClusterIP's DNAT says 10.0.0.1. SIGKILL the agent: the guard fails open and the
/// ClusterIP reaches kube-dns again within interval x failures + 1 s.
#[test]
fn sigkilled_agent_in_transparent_mode_fails_open_to_kube_dns_as_root() {
    if !can_run(&["ip", "iptables-save", "dnsmasq", "dig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns-agent");
    like_a_node(&ns, &["10.0.0.54/32"]);
    let _kube_dns = dnsmasq(&ns, dir.path(), "kube-dns", "10.0.0.53", "10.0.0.1");
    let _upstream = dnsmasq(&ns, dir.path(), "upstream", "10.0.0.54", "10.0.0.2");
    wait_for(Duration::from_secs(10), "kube-dns through the DNAT", || {
        (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
    });
    let cfg = write_config(
        dir.path(),
        "agent.yaml",
        "shutdownTimeout: 10s
dns:
  enabled: true
  listenIps: [\"169.254.20.10\"]
  clusterIps: [\"10.96.0.10\"]
  lameDuck: 0s
  node: {manageInterface: false, rules: iptables, checkInterval: 1s}
  upstreams:
    clusterZones: []
    default: {servers: [\"10.0.0.54\"]}
",
    );
    let mut cmd = ns.command(agent_bin().to_str().unwrap());
    cmd.args(["run", "--standalone", "--config"])
        .arg(&cfg)
        .args([
            "--metrics-listen",
            "127.0.0.1:19740",
            "--api-listen",
            "127.0.0.1:19741",
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .env("NODEKEEPER_LOG", "info,nodekeeper=debug");
    let mut agent = Proc::spawn("agent", cmd, dir.path());
    wait_for(
        Duration::from_secs(20),
        "the agent answering on the ClusterIP",
        || (ask(&ns).as_deref() == Some("10.0.0.2")).then_some(()),
    );
    assert_eq!(ours(&ns, "iptables").len(), 28, "{}", agent.log_text());

    let mut cmd = ns.command(agent_bin().to_str().unwrap());
    cmd.args(["dns-guard", "--config"])
        .arg(&cfg)
        .args([
            "--interval",
            "1s",
            "--failures",
            &GUARD_FAILURES.to_string(),
        ])
        .env("NODEKEEPER_LOG", "info,nodekeeper=debug");
    let guard = Proc::spawn("guard", cmd, dir.path());
    std::thread::sleep(GUARD_INTERVAL * (GUARD_FAILURES + 1));
    assert_eq!(
        ask(&ns).as_deref(),
        Some("10.0.0.2"),
        "the guard leaves a live agent alone: {}",
        guard.log_text()
    );

    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    let window = GUARD_INTERVAL * GUARD_FAILURES + Duration::from_secs(1);
    wait_for(window + Duration::from_secs(10), "kube-dns again", || {
        (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
    });
    let took = killed.elapsed();
    eprintln!(
        "fail-open after a SIGKILLed agent: kube-dns answers {took:?} later (window {window:?})"
    );
    assert!(
        took <= window,
        "kube-dns answered only after {took:?}, beyond {window:?}\n{}",
        guard.log_text()
    );
    assert!(
        ours(&ns, "iptables").is_empty(),
        "rules left after failing open"
    );

    // A restarted agent removes nothing twice and leaves exactly one set of rules.
    let mut cmd = ns.command(agent_bin().to_str().unwrap());
    cmd.args(["run", "--standalone", "--config"])
        .arg(&cfg)
        .args([
            "--metrics-listen",
            "127.0.0.1:19742",
            "--api-listen",
            "127.0.0.1:19743",
            "--state-dir",
        ])
        .arg(dir.path().join("state"));
    let _agent = Proc::spawn("agent2", cmd, dir.path());
    wait_for(Duration::from_secs(20), "the restarted agent", || {
        (ask(&ns).as_deref() == Some("10.0.0.2")).then_some(())
    });
    assert_eq!(ours(&ns, "iptables").len(), 28);
}

// === the guard with a read-only root filesystem (issue #15) ===

/// Which rules backend a fault test wires with.
#[derive(Clone, Copy, Debug)]
enum Fw {
    /// `rules: iptables` on a node whose rules live in legacy iptables (kube-proxy's DNAT is
    /// installed with `iptables-legacy`, so the variant detection picks legacy).
    Legacy,
    Nftables,
}

/// Wires `ns` like a node whose kube-proxy uses `iptables_prog` for the ClusterIP's DNAT.
fn like_a_node_with(ns: &Netns, iptables_prog: &str) {
    for a in ["10.0.0.53/32", "10.96.0.10/32", "169.254.20.10/32"] {
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

/// How many rules of ours `fw` holds in `ns`.
fn rules_of_ours(ns: &Netns, fw: Fw) -> usize {
    match fw {
        Fw::Legacy => ours(ns, "iptables-legacy").len(),
        Fw::Nftables => nft_table(ns)
            .map(|t| {
                t.values()
                    .flatten()
                    .filter(|l| !l.starts_with("type "))
                    .count()
            })
            .unwrap_or(0),
    }
}

/// The guard as the DaemonSet runs it: its root filesystem read-only, modelled by a read-only
/// tmpfs over /run in a private mount namespace (where iptables-legacy creates its lock). The
/// agent binary is exec'd, so the Proc's pid is the guard's (for `nsenter -m`).
fn guard_with_read_only_run(
    ns: &Netns,
    dir: &Path,
    cfg: &Path,
    metrics: &str,
    kubeconfig: Option<&Path>,
) -> Proc {
    let mut cmd = ns.command("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs -o ro,size=64k tmpfs /run && exec \"$0\" \"$@\"",
    ])
    .arg(agent_bin())
    .args(["dns-guard", "--config"])
    .arg(cfg)
    .args([
        "--interval",
        "1s",
        "--failures",
        &GUARD_FAILURES.to_string(),
        "--guard-metrics-listen",
        metrics,
    ])
    .env("NODEKEEPER_LOG", "info,nodekeeper=debug")
    .env_remove("KUBECONFIG");
    if let Some(kubeconfig) = kubeconfig {
        cmd.env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", GUARD_NODE);
    }
    Proc::spawn("guard", cmd, dir)
}

/// The node name the read-only-root tests give the guard (NODE_NAME): it must not use it.
const GUARD_NODE: &str = "node-guard";

/// One sample of the guard's /metrics, scraped from inside `ns`.
fn guard_metric(ns: &Netns, addr: &str, name: &str) -> Option<f64> {
    let out = output(ns.command("curl").args([
        "-s",
        "--max-time",
        "2",
        &format!("http://{addr}/metrics"),
    ]));
    nodekeeper_tests::sample(&String::from_utf8_lossy(&out.stdout), name, &[])
}

/// SIGKILL of the cache with the guard's /run read-only. Legacy iptables cannot create its
/// lock there: the removal fails, and the guard must report it (log, pending metric) and
/// retry, never claim it failed open; once /run is writable a retry removes every rule and
/// kube-dns answers. nftables needs no lock: it fails open within the window.
fn guard_fails_open_with_a_read_only_root(fw: Fw) {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns-guard-ro");
    let (prog, rules) = match fw {
        Fw::Legacy => ("iptables-legacy", "iptables"),
        Fw::Nftables => ("iptables", "nftables"),
    };
    like_a_node_with(&ns, prog);
    let _kube_dns = dnsmasq(&ns, dir.path(), "kube-dns", "10.0.0.53", "10.0.0.1");
    wait_for(Duration::from_secs(10), "kube-dns through the DNAT", || {
        (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
    });
    let cfg = write_config(
        dir.path(),
        "c.yaml",
        &config(&["169.254.20.10"], &["10.96.0.10"], rules),
    );
    let mut cache = dnsmasq(
        &ns,
        dir.path(),
        "cache",
        "169.254.20.10,10.96.0.10",
        "10.0.0.2",
    );
    let w = wiring(&ns, "setup", &cfg);
    assert_eq!(rules_of_ours(&ns, fw), 28, "{w} ({fw:?})");
    wait_for(Duration::from_secs(10), "the cache through NOTRACK", || {
        (ask(&ns).as_deref() == Some("10.0.0.2")).then_some(())
    });
    let metrics = "127.0.0.1:19749";
    // The API server lives in the node's namespace (its thread is started from inside it), so
    // the guard could reach it on loopback there; the test reads its request log in-process.
    let api = {
        let _in_ns = ns.enter();
        FakeApi::start()
    };
    api.add_node(GUARD_NODE, &[]);
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let guard = guard_with_read_only_run(&ns, dir.path(), &cfg, metrics, Some(&kubeconfig));
    wait_for(Duration::from_secs(10), "the guard's metrics", || {
        guard_metric(&ns, metrics, "nodekeeper_dns_guard_failopen_pending")
    });
    std::thread::sleep(GUARD_INTERVAL * (GUARD_FAILURES + 1));
    assert_eq!(rules_of_ours(&ns, fw), 28, "{}", guard.log_text());

    cache.signal("KILL");
    cache.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    let window = GUARD_INTERVAL * GUARD_FAILURES + Duration::from_secs(1);
    if let Fw::Legacy = fw {
        // The removal fails (no lock file on a read-only /run): retried and reported.
        wait_for(
            window + Duration::from_secs(15),
            "two failed fail-open attempts",
            || {
                let n = guard_metric(&ns, metrics, "nodekeeper_dns_guard_failopen_failures_total")?;
                (n >= 2.0).then_some(())
            },
        );
        let log = guard.log_text();
        assert!(log.contains("failing open failed"), "{log}");
        assert!(
            !log.contains("failed open, verified"),
            "claimed success:\n{log}"
        );
        assert_eq!(
            guard_metric(&ns, metrics, "nodekeeper_dns_guard_failopen_pending"),
            Some(1.0),
            "{log}"
        );
        assert_eq!(
            rules_of_ours(&ns, fw),
            28,
            "the rules really are still there"
        );
        assert_eq!(
            ask(&ns),
            None,
            "the node is black-holed while the rules stay"
        );
        // The fault goes away (an operator fixes the mount): the next retry removes them.
        ok(Command::new("nsenter")
            .args(["-t", &guard.pid().to_string(), "-m"])
            .args(["mount", "-o", "remount,rw", "/run"]));
        wait_for(Duration::from_secs(20), "kube-dns after the fault", || {
            (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
        });
    } else {
        wait_for(window + Duration::from_secs(10), "kube-dns again", || {
            (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
        });
        let took = killed.elapsed();
        assert!(
            took <= window,
            "kube-dns after {took:?} > {window:?}\n{}",
            guard.log_text()
        );
        // Reading back every iptables variant never instantiates a legacy table (listing one
        // would create it).
        assert_eq!(
            ok(ns.command("cat").arg("/proc/net/ip_tables_names")),
            "",
            "the guard's read-back created legacy tables"
        );
    }
    assert_eq!(rules_of_ours(&ns, fw), 0, "{}", guard.log_text());
    wait_for(Duration::from_secs(5), "the verified fail-open log", || {
        guard
            .log_text()
            .contains("failed open, verified")
            .then_some(())
    });
    assert_eq!(
        guard_metric(&ns, metrics, "nodekeeper_dns_guard_failopen_pending"),
        Some(0.0)
    );
    // Issue #19 (#19-d): the guard never calls the API server, even with a kubeconfig and
    // NODE_NAME at hand: it holds no credential in the manifests and reports through its
    // metrics and log only.
    let calls: Vec<String> = api
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        calls.is_empty(),
        "the guard called the API server: {calls:?}"
    );
}

#[test]
fn guard_on_legacy_iptables_with_a_read_only_root_retries_and_reports_until_open_as_root() {
    if !can_run(&[
        "ip",
        "iptables-legacy-save",
        "dnsmasq",
        "dig",
        "unshare",
        "nsenter",
        "curl",
    ]) {
        return;
    }
    guard_fails_open_with_a_read_only_root(Fw::Legacy);
}

#[test]
fn guard_on_nftables_with_a_read_only_root_fails_open_as_root() {
    if !can_run(&["ip", "nft", "dnsmasq", "dig", "unshare", "curl"]) {
        return;
    }
    guard_fails_open_with_a_read_only_root(Fw::Nftables);
}

// === never steer pods at a cache that is not bound (issue #19, b19) ===

/// `/readyz` of an agent inside `ns`: (ready, body).
fn readyz(ns: &Netns, addr: &str) -> (bool, String) {
    let out = output(ns.command("curl").args([
        "-s",
        "-w",
        "\n%{http_code}",
        "--max-time",
        "2",
        &format!("http://{addr}/readyz"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (text.trim_end().ends_with("200"), text)
}

/// The cache's address is held by a plain UDP socket (no SO_REUSEPORT): the agent cannot
/// listen. Its rules must never steer the node's DNS there: kube-dns keeps answering through
/// the ClusterIP, no rule of ours is installed (stale ones of a crashed run are removed), and
/// readiness is false (dns DEGRADED, whose detail and the log name the address and the cause. Once the address is
/// free, the agent's retry binds, installs the rules and the cache answers.
#[test]
fn unbindable_cache_address_leaves_pods_on_kube_dns_then_binds_on_retry_as_root() {
    if !can_run(&["ip", "iptables-save", "dnsmasq", "dig", "curl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns-unbound");
    like_a_node(&ns, &["10.0.0.54/32"]);
    let _kube_dns = dnsmasq(&ns, dir.path(), "kube-dns", "10.0.0.53", "10.0.0.1");
    let _upstream = dnsmasq(&ns, dir.path(), "upstream", "10.0.0.54", "10.0.0.2");
    wait_for(Duration::from_secs(10), "kube-dns through the DNAT", || {
        (ask(&ns).as_deref() == Some("10.0.0.1")).then_some(())
    });
    let cfg = write_config(
        dir.path(),
        "agent.yaml",
        "shutdownTimeout: 10s
dns:
  enabled: true
  listenIps: [\"169.254.20.10\"]
  clusterIps: [\"10.96.0.10\"]
  lameDuck: 0s
  node: {manageInterface: false, rules: iptables, checkInterval: 1s}
  upstreams:
    clusterZones: []
    default: {servers: [\"10.0.0.54\"]}
",
    );
    // A crashed earlier run left its rules: they must go too, or the ClusterIP is a black hole.
    let _ = wiring(&ns, "setup", &cfg);
    assert_eq!(ours(&ns, "iptables").len(), 28);
    let mut squat = ns.command(&nodekeeper_tests::python());
    squat.args([
        "-c",
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.96.0.10',53))\nprint('bound',flush=True)\ntime.sleep(600)",
    ]);
    let mut squatter = Proc::spawn("squatter", squat, dir.path());
    wait_for(Duration::from_secs(10), "the squatter bound", || {
        squatter.log_text().contains("bound").then_some(())
    });

    let mut cmd = ns.command(agent_bin().to_str().unwrap());
    cmd.args(["run", "--standalone", "--config"])
        .arg(&cfg)
        .args([
            "--metrics-listen",
            "127.0.0.1:19750",
            "--api-listen",
            "127.0.0.1:19751",
            "--state-dir",
        ])
        .arg(dir.path().join("state"));
    let agent = Proc::spawn("agent", cmd, dir.path());
    let body = wait_for(Duration::from_secs(20), "readyz: dns degraded", || {
        let (ready, body) = readyz(&ns, "127.0.0.1:19750");
        (!ready && body.contains("dns: HEALTH_STATE_DEGRADED")).then_some(body)
    });
    let log = wait_for(Duration::from_secs(10), "the bind error logged", || {
        let log = agent.log_text();
        log.contains("dns cache cannot listen").then_some(log)
    });
    assert!(
        log.contains("10.96.0.10:53")
            && log.contains("Address already in use")
            && log.contains("node wiring removed"),
        "the error must name the address and the cause (readyz: {body}): {log}"
    );
    assert!(
        ours(&ns, "iptables").is_empty(),
        "rules installed while the cache is not bound: {}",
        agent.log_text()
    );
    // Across a few retries: never steered, kube-dns answers every time.
    for _ in 0..3 {
        assert_eq!(
            ask(&ns).as_deref(),
            Some("10.0.0.1"),
            "{}",
            agent.log_text()
        );
        assert!(ours(&ns, "iptables").is_empty());
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(!readyz(&ns, "127.0.0.1:19750").0);

    squatter.signal("KILL");
    squatter.wait_exit(Duration::from_secs(5));
    wait_for(
        Duration::from_secs(40),
        "the agent bound on retry, answering on the ClusterIP",
        || (ask(&ns).as_deref() == Some("10.0.0.2")).then_some(()),
    );
    assert_eq!(ours(&ns, "iptables").len(), 28, "{}", agent.log_text());
    wait_for(Duration::from_secs(10), "ready once bound", || {
        readyz(&ns, "127.0.0.1:19750").0.then_some(())
    });
}

/// `probe.test` over TCP through the kube-dns ClusterIP: the answer's address, or None.
fn ask_tcp(ns: &Netns) -> Option<String> {
    let out = output(ns.command("dig").args([
        "+short",
        "+tcp",
        "+time=1",
        "+tries=1",
        "@10.96.0.10",
        "probe.test",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .filter(|l| l.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_string)
}

/// Issue #15, 2e: a listener that dies after the first bind (here the kernel destroys the
/// cache's TCP listeners, `ss -K`, and accept fails with EINVAL) left the rules steering pods'
/// TCP queries at a port nobody accepted on, for ever. Now the cache notices the listener's end,
/// closes the others and binds all of them again (or, when that fails, removes its rules): TCP
/// queries through the ClusterIP are answered again.
#[test]
fn a_dns_listener_that_dies_is_bound_again_and_tcp_through_the_cluster_ip_answers_as_root() {
    if !can_run(&["ip", "iptables-save", "dnsmasq", "dig", "ss"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns-listener-dies");
    like_a_node(&ns, &["10.0.0.54/32"]);
    let _kube_dns = dnsmasq(&ns, dir.path(), "kube-dns", "10.0.0.53", "10.0.0.1");
    let _upstream = dnsmasq(&ns, dir.path(), "upstream", "10.0.0.54", "10.0.0.2");
    let cfg = write_config(
        dir.path(),
        "agent.yaml",
        "shutdownTimeout: 10s
dns:
  enabled: true
  listenIps: [\"169.254.20.10\"]
  clusterIps: [\"10.96.0.10\"]
  lameDuck: 0s
  node: {manageInterface: false, rules: iptables, checkInterval: 1s}
  upstreams:
    clusterZones: []
    default: {servers: [\"10.0.0.54\"]}
",
    );
    let mut cmd = ns.command(agent_bin().to_str().unwrap());
    cmd.args(["run", "--standalone", "--config"])
        .arg(&cfg)
        .args([
            "--metrics-listen",
            "127.0.0.1:19750",
            "--api-listen",
            "127.0.0.1:19751",
            "--state-dir",
        ])
        .arg(dir.path().join("state"));
    let agent = Proc::spawn("agent", cmd, dir.path());
    wait_for(
        Duration::from_secs(20),
        "the cache answers TCP on the ClusterIP",
        || (ask_tcp(&ns).as_deref() == Some("10.0.0.2")).then_some(()),
    );
    // The kernel destroys the cache's TCP listeners (never kube-dns's on 10.0.0.53).
    for addr in ["10.96.0.10:53", "169.254.20.10:53"] {
        ok(ns.command("ss").args(["-K", "-tln", "src", addr]));
    }
    let answer = wait_for(
        Duration::from_secs(30),
        "TCP through the ClusterIP answered again",
        || ask_tcp(&ns),
    );
    assert!(
        agent.log_text().contains("a dns listener died"),
        "the death is logged: {}",
        agent.log_text()
    );
    assert!(
        answer == "10.0.0.2" || answer == "10.0.0.1",
        "answered by the cache or kube-dns: {answer}"
    );
    assert_eq!(
        ask(&ns).as_deref(),
        Some("10.0.0.2"),
        "UDP through the rebound cache: {}",
        agent.log_text()
    );
    let listening = ok(ns.command("ss").args(["-tlnH", "src", "10.96.0.10:53"]));
    assert!(
        listening.contains("LISTEN"),
        "the TCP listener is bound again: {listening:?}\n{}",
        agent.log_text()
    );
}
