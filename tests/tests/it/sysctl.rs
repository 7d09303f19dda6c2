//! sysctl tuning: against a temp /proc/sys tree (non-namespaced keys, rollback, drift, revert,
//! bad input) and, for namespaced keys, for real inside network namespaces created here. The
//! host's own values are read before and after and must not change.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nodekeeper_tests::{Agent, agent_bin, require_root, require_tool, sample, wait_for};

/// A fake procfs with a few sysctls, rooted at `dir/proc`.
struct FakeProc {
    dir: tempfile::TempDir,
}

impl FakeProc {
    fn new(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = Self { dir };
        for (key, value) in files {
            p.set(key, value);
        }
        p
    }
    fn proc(&self) -> PathBuf {
        self.dir.path().join("proc")
    }
    fn file(&self, key: &str) -> PathBuf {
        self.proc().join("sys").join(key.replace('.', "/"))
    }
    fn set(&self, key: &str, value: &str) {
        let f = self.file(key);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, format!("{value}\n")).unwrap();
    }
    /// Waits (5 s at most) until `key` reads `value`: the daemon acts within its 1 s interval.
    fn wait_value(&self, key: &str, value: &str) {
        wait_for(Duration::from_secs(5), &format!("{key} = {value}"), || {
            (self.get(key) == value).then_some(())
        });
    }

    fn get(&self, key: &str) -> String {
        std::fs::read_to_string(self.file(key))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
    /// A key whose writes fail like a read-only kernel knob (ENOSPC from /dev/full).
    fn rejecting(&self, key: &str) {
        let f = self.file(key);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("/dev/full", f).unwrap();
    }
    /// A key that accepts writes but keeps another value, like a clamping kernel (/dev/null
    /// reads back empty).
    fn clamping(&self, key: &str) {
        let f = self.file(key);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("/dev/null", f).unwrap();
    }
    /// Every regular file's contents, to prove nothing was written.
    fn snapshot(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        walk(&self.proc(), &mut out);
        out.sort();
        out
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_symlink() {
            continue;
        }
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
        }
    }
}

fn run_cli(action: &str, config: &str, fake: &FakeProc, extra: &[&str]) -> Output {
    cli_at(&fake.state(), fake, action, config, extra)
}

/// `nodekeeper sysctl <action>` on the fake /proc with `state` as its state dir (shared with a
/// daemon), `config` written beside it.
fn cli_at(state: &Path, fake: &FakeProc, action: &str, config: &str, extra: &[&str]) -> Output {
    let file = state.with_extension("yaml");
    std::fs::write(&file, config).unwrap();
    Command::new(agent_bin())
        .args(["sysctl", action, "--config"])
        .arg(&file)
        .arg("--host-proc")
        .arg(fake.proc())
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const BASE_KEYS: &[(&str, &str)] = &[
    ("net.core.somaxconn", "4096"),
    ("net.ipv4.ip_local_port_range", "32768\t60999"),
    ("net.ipv4.tcp_tw_reuse", "2"),
    ("vm.swappiness", "60"),
    ("fs.file-max", "1000000"),
];

const HIGH_CONN: &str = "sysctl:\n  nodeLabels: {pool: trino}\n  profiles:\n    - name: base\n      sysctls:\n        vm.swappiness: 10\n        net.core.somaxconn: 1024\n    - name: trino\n      priority: 10\n      nodeSelector:\n        matchLabels: {pool: trino}\n      sysctls:\n        net.core.somaxconn: 8192\n        net/ipv4/ip_local_port_range: [1024, 65000]\n        fs.file-max: 2000000\n";

#[test]
fn plan_shows_current_desired_and_winning_profile_and_writes_nothing() {
    let fake = FakeProc::new(BASE_KEYS);
    let before = fake.snapshot();
    let o = run_cli("plan", HIGH_CONN, &fake, &[]);
    assert!(o.status.success(), "{}", out(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in {text}"))
            .to_string()
    };
    assert!(
        line("net.core.somaxconn").contains("4096") && line("net.core.somaxconn").contains("8192")
    );
    assert!(line("net.core.somaxconn").ends_with("trino "), "{text}");
    assert!(line("vm.swappiness").contains("base"), "{text}");
    assert!(
        line("net.ipv4.ip_local_port_range").contains("1024 65000"),
        "{text}"
    );
    assert_eq!(fake.snapshot(), before, "plan wrote something");
}

#[test]
fn apply_then_revert_restores_originals() {
    let fake = FakeProc::new(BASE_KEYS);
    let o = run_cli("apply", HIGH_CONN, &fake, &[]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(fake.get("net.core.somaxconn"), "8192");
    assert_eq!(fake.get("net.ipv4.ip_local_port_range"), "1024 65000");
    assert_eq!(fake.get("vm.swappiness"), "10");
    assert_eq!(fake.get("fs.file-max"), "2000000");
    assert_eq!(
        fake.get("net.ipv4.tcp_tw_reuse"),
        "2",
        "keys in no profile are untouched"
    );
    let originals = std::fs::read_to_string(fake.state().join("sysctl/originals.json")).unwrap();
    assert!(
        originals.contains("\"4096\"") && originals.contains("32768 60999"),
        "{originals}"
    );

    // A second apply changes nothing and keeps the first originals.
    let o = run_cli("apply", HIGH_CONN, &fake, &[]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("0 changed, 4 already set"),
        "{}",
        out(&o)
    );

    let o = run_cli("revert", HIGH_CONN, &fake, &[]);
    assert!(o.status.success(), "{}", out(&o));
    for (k, v) in BASE_KEYS {
        assert_eq!(fake.get(k), v.replace('\t', " "), "{k} restored");
    }
}

#[test]
fn a_refused_write_rolls_back_every_earlier_change() {
    let fake = FakeProc::new(BASE_KEYS);
    fake.rejecting("vm.zz_readonly");
    let config = "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.core.somaxconn: 8192\n        fs.file-max: 5000000\n        vm.zz_readonly: \"off\"\n";
    let o = run_cli("apply", config, &fake, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("vm.zz_readonly") && e.contains("2 earlier change(s) rolled back"),
        "{e}"
    );
    assert_eq!(fake.get("net.core.somaxconn"), "4096");
    assert_eq!(fake.get("fs.file-max"), "1000000");
    let originals = std::fs::read_to_string(fake.state().join("sysctl/originals.json")).unwrap();
    assert!(
        !originals.contains("somaxconn"),
        "rolled-back keys are not left recorded: {originals}"
    );
}

#[test]
fn a_value_the_kernel_does_not_keep_is_rolled_back() {
    let fake = FakeProc::new(BASE_KEYS);
    fake.clamping("vm.zz_clamped");
    let config = "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.core.somaxconn: 8192\n        vm.zz_clamped: x\n";
    let o = run_cli("apply", config, &fake, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the kernel kept"),
        "{}",
        out(&o)
    );
    assert_eq!(fake.get("net.core.somaxconn"), "4096");
}

#[test]
fn a_restore_that_fails_keeps_the_original_is_logged_by_key_and_exits_non_zero() {
    let fake = FakeProc::new(BASE_KEYS);
    fake.set("vm.zz_oneway", "0");
    let config = "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.core.somaxconn: 8192\n        vm.zz_oneway: 1\n";
    let o = run_cli("apply", config, &fake, &[]);
    assert!(o.status.success(), "{}", out(&o));
    // The key can no longer be written (a one-way knob, a module unloaded).
    std::fs::remove_file(fake.file("vm.zz_oneway")).unwrap();
    fake.rejecting("vm.zz_oneway");
    let o = run_cli("revert", config, &fake, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("restoring the original failed") && e.contains("vm.zz_oneway"),
        "the CLI logs the failure by key: {e}"
    );
    assert!(
        e.contains("originals kept in the journal for: vm.zz_oneway")
            && e.contains("(restored: net.core.somaxconn)"),
        "the error names what failed and what was restored: {e}"
    );
    assert_eq!(
        fake.get("net.core.somaxconn"),
        "4096",
        "every other key is restored"
    );
    let journal = std::fs::read_to_string(fake.state().join("sysctl/originals.json")).unwrap();
    assert!(
        journal.contains("vm.zz_oneway") && !journal.contains("somaxconn"),
        "only the unrestored key stays recorded: {journal}"
    );
}

#[test]
fn bad_input_is_rejected_with_profile_key_and_value_and_nothing_is_written() {
    let fake = FakeProc::new(BASE_KEYS);
    let before = fake.snapshot();
    let cases: &[(&str, &[&str])] = &[
        (
            "net.core.no_such_key: 1",
            &["profile \"p\"", "net.core.no_such_key", "no such key"],
        ),
        ("kernel.panic: 1", &["kernel.panic", "denylist"]),
        (
            "net.core.somaxconn: abc",
            &["net.core.somaxconn", "\"abc\" is not an integer"],
        ),
        (
            "net.ipv4.ip_local_port_range: \"60000 1024\"",
            &["ip_local_port_range", "below high port"],
        ),
        (
            "net.ipv4.tcp_tw_reuse: 7",
            &["tcp_tw_reuse", "out of range (0..=2)"],
        ),
    ];
    for (line, expect) in cases {
        // A good key beside the bad one: it must not be written either.
        let config = format!(
            "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        vm.swappiness: 1\n        {line}\n"
        );
        let o = run_cli("apply", &config, &fake, &[]);
        assert_eq!(o.status.code(), Some(64), "{line}: {}", out(&o));
        let e = String::from_utf8_lossy(&o.stderr);
        for x in *expect {
            assert!(e.contains(x), "{line}: {x:?} missing from {e}");
        }
        assert_eq!(fake.snapshot(), before, "{line}: something was written");
    }
    // A YAML boolean is not guessed at.
    let o = run_cli(
        "apply",
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.ipv4.ip_forward: true\n",
        &fake,
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("sysctl.profiles[0].sysctls.net.ipv4.ip_forward: true is a YAML boolean"),
        "{}",
        out(&o)
    );
    // Two profiles with one name: a config error, exit 64 before anything is read.
    let dup = "sysctl:\n  profiles:\n    - name: same\n      sysctls: {vm.swappiness: 1}\n    - name: same\n      sysctls: {fs.file-max: 2}\n";
    let o = run_cli("apply", dup, &fake, &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("sysctl.profiles[1].name: \"same\" is used by more than one profile"),
        "{}",
        out(&o)
    );
    assert_eq!(fake.snapshot(), before);
}

fn daemon(fake: &FakeProc, sysctl_yaml: &str) -> Agent {
    Agent::builder()
        .config(&format!("metrics:\n  enabled: false\n{sysctl_yaml}"))
        .arg("--host-proc")
        .arg(fake.proc().display().to_string())
        .start()
}

const DAEMON: &str = "sysctl:\n  enabled: true\n  interval: 1s\n  nodeLabels: {pool: trino}\n  profiles:\n    - name: trino\n      nodeSelector:\n        matchLabels: {pool: trino}\n      sysctls:\n        net.core.somaxconn: 8192\n";

#[test]
fn the_daemon_applies_then_corrects_drift_within_an_interval() {
    let fake = FakeProc::new(BASE_KEYS);
    let agent = daemon(&fake, DAEMON);
    fake.wait_value("net.core.somaxconn", "8192");
    fake.set("net.core.somaxconn", "128");
    fake.wait_value("net.core.somaxconn", "8192");
    let m = agent.metrics_text();
    assert_eq!(
        sample(
            &m,
            "nodekeeper_sysctl_drift_total",
            &[("key", "net.core.somaxconn")]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "nodekeeper_sysctl_managed_keys", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "nodekeeper_sysctl_applied",
            &[("key", "net.core.somaxconn"), ("profile", "trino")]
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn the_daemon_reverts_keys_that_leave_every_profile_on_config_change_and_relabel() {
    let fake = FakeProc::new(BASE_KEYS);
    let agent = daemon(&fake, DAEMON);
    fake.wait_value("net.core.somaxconn", "8192");

    // Relabel (standalone: labels come from config): the profile no longer matches.
    let config = agent.dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  enabled: false\n{}",
            DAEMON.replace("{pool: trino}\n  profiles", "{pool: web}\n  profiles")
        ),
    )
    .unwrap();
    fake.wait_value("net.core.somaxconn", "4096");

    // A new profile in the file takes effect the same way, and its removal reverts it.
    std::fs::write(&config, format!("metrics:\n  enabled: false\n{DAEMON}    - name: mem\n      sysctls:\n        vm.swappiness: 5\n")).unwrap();
    fake.wait_value("vm.swappiness", "5");
    std::fs::write(&config, format!("metrics:\n  enabled: false\n{DAEMON}")).unwrap();
    fake.wait_value("vm.swappiness", "60");
    // The counter is bumped after the write lands: poll it rather than read it once (a busy
    // machine showed the value restored and the counter still at 1).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let m = agent.metrics_text();
        if sample(&m, "nodekeeper_sysctl_reverts_total", &[]) == Some(2.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reverts_total never 2: {m}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_daemon_quarantines_a_key_it_cannot_revert_and_still_corrects_drift_on_the_rest() {
    let fake = FakeProc::new(BASE_KEYS);
    fake.set("vm.zz_oneway", "0");
    let with_oneway = format!("{DAEMON}        vm.zz_oneway: 1\n");
    let agent = daemon(&fake, &with_oneway);
    fake.wait_value("vm.zz_oneway", "1");
    fake.wait_value("net.core.somaxconn", "8192");
    // The key becomes impossible to write (like a one-way knob), then leaves the profile.
    std::fs::remove_file(fake.file("vm.zz_oneway")).unwrap();
    fake.rejecting("vm.zz_oneway");
    let config = agent.dir.path().join("config.yaml");
    std::fs::write(&config, format!("metrics:\n  enabled: false\n{DAEMON}")).unwrap();
    wait_for(Duration::from_secs(10), "vm.zz_oneway quarantined", || {
        let m = agent.metrics_text();
        sample(
            &m,
            "nodekeeper_sysctl_quarantined",
            &[("key", "vm.zz_oneway"), ("action", "restore")],
        )
        .filter(|v| *v == 1.0)
    });
    // Drift on another key is still corrected.
    fake.set("net.core.somaxconn", "128");
    fake.wait_value("net.core.somaxconn", "8192");
    let m = agent.metrics_text();
    assert!(
        sample(
            &m,
            "nodekeeper_sysctl_restore_failures_total",
            &[("key", "vm.zz_oneway")]
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    let journal =
        std::fs::read_to_string(agent.dir.path().join("state/sysctl/originals.json")).unwrap();
    assert!(
        journal.contains("vm.zz_oneway"),
        "its original stays recorded: {journal}"
    );
    let (status, body) = nodekeeper_tests::http_get(agent.metrics, "/readyz").unwrap();
    assert_eq!(
        status, 200,
        "one quarantined key does not take the agent (DNS, census) out of service: {body}"
    );
    // A CLI revert on the journal the daemon holds is refused, not interleaved with it.
    let o = Command::new(agent_bin())
        .args(["sysctl", "revert", "--host-proc"])
        .arg(fake.proc())
        .arg("--state-dir")
        .arg(agent.dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("held by another nodekeeper"),
        "{}",
        out(&o)
    );
    assert_eq!(fake.get("net.core.somaxconn"), "8192", "nothing reverted");
}

#[test]
fn the_daemon_keeps_the_last_good_values_when_the_new_config_is_invalid() {
    let fake = FakeProc::new(BASE_KEYS);
    let agent = daemon(&fake, DAEMON);
    fake.wait_value("net.core.somaxconn", "8192");
    let config = agent.dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  enabled: false\n{}",
            DAEMON.replace("8192", "lots")
        ),
    )
    .unwrap();
    wait_for(Duration::from_secs(5), "rejection counted", || {
        let m = agent.metrics_text();
        sample(
            &m,
            "nodekeeper_sysctl_errors_total",
            &[("reason", "rejected")],
        )
        .filter(|v| *v >= 1.0)
    });
    assert_eq!(
        fake.get("net.core.somaxconn"),
        "8192",
        "last good value kept"
    );
    let (status, body) = nodekeeper_tests::http_get(agent.metrics, "/readyz").unwrap();
    assert_eq!(
        status, 503,
        "a rejected profile set makes the agent not ready: {body}"
    );
}

// === real network namespaces ===

/// A network namespace that is deleted on drop, even when the test fails.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("nk-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
    fn read(&self, key: &str) -> String {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.0,
                "cat",
                &format!("/proc/sys/{}", key.replace('.', "/")),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The host's values of some keys, to show a namespace test left the host alone.
struct HostValues(Vec<(&'static str, String)>);

impl HostValues {
    /// [`HOST_KEYS`], the keys the namespace tests write.
    fn now() -> Self {
        Self::of(&HOST_KEYS)
    }
    fn of(keys: &[&'static str]) -> Self {
        HostValues(keys.iter().map(|k| (*k, host(k))).collect())
    }
    fn assert_unchanged(&self) {
        let keys: Vec<&'static str> = self.0.iter().map(|(k, _)| *k).collect();
        assert_eq!(self.0, Self::of(&keys).0, "host values unchanged");
    }
}

fn host(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn apply_in(ns: &Netns, config: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, config).unwrap();
    Command::new(agent_bin())
        .args(["sysctl", "apply", "--config"])
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--netns", &ns.path()])
        .output()
        .unwrap()
}

const NS_KEYS: [&str; 4] = [
    "net.core.somaxconn",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syn_retries",
    "vm.swappiness",
];

#[test]
fn namespaced_keys_are_applied_inside_a_real_netns_and_the_host_is_untouched() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::of(&NS_KEYS);
    let pod_a = Netns::new("sysctl-a");
    let pod_b = Netns::new("sysctl-b");
    let b_before = pod_b.read("net.core.somaxconn");
    let o = apply_in(
        &pod_a,
        "sysctl:\n  profiles:\n    - name: pod\n      sysctls:\n        net.core.somaxconn: 12345\n        net.ipv4.ip_local_port_range: [20000, 30000]\n",
    );
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(pod_a.read("net.core.somaxconn"), "12345");
    assert_eq!(pod_a.read("net.ipv4.ip_local_port_range"), "20000 30000");
    assert_eq!(
        pod_b.read("net.core.somaxconn"),
        b_before,
        "only the selected netns changed"
    );
    host_before.assert_unchanged();
}

#[test]
fn a_real_kernel_rejection_inside_a_netns_rolls_back_and_global_keys_are_refused() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::of(&NS_KEYS);
    let ns = Netns::new("sysctl-rb");
    let before = ns.read("net.core.somaxconn");
    // tcp_syn_retries is capped at 127 by the kernel (EINVAL); somaxconn sorts first and is written first.
    let o = apply_in(
        &ns,
        "sysctl:\n  profiles:\n    - name: pod\n      sysctls:\n        net.core.somaxconn: 23456\n        net.ipv4.tcp_syn_retries: 200\n",
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("tcp_syn_retries"),
        "{}",
        out(&o)
    );
    assert_eq!(
        ns.read("net.core.somaxconn"),
        before,
        "rolled back inside the netns"
    );

    // vm.* is global: setting it "inside" a netns would change the host, so it is refused.
    let o = apply_in(
        &ns,
        "sysctl:\n  profiles:\n    - name: pod\n      sysctls:\n        vm.swappiness: 1\n",
    );
    assert_eq!(o.status.code(), Some(64), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not per network namespace"),
        "{}",
        out(&o)
    );
    host_before.assert_unchanged();
}

#[test]
fn the_documented_example_validates_against_this_kernel() {
    // The worked example in docs/configuration.md must stay valid: plan it (read-only) on the real /proc.
    let doc =
        std::fs::read_to_string(nodekeeper_tests::workspace_root().join("docs/configuration.md"))
            .unwrap();
    let section = doc
        .split("### Worked example")
        .nth(1)
        .expect("worked example section");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("yaml block");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("example.yaml");
    std::fs::write(&file, yaml).unwrap();
    let o = Command::new(agent_bin())
        .args(["sysctl", "plan", "--config"])
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    if !Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists() {
        // Without the conntrack module the one conntrack key is unknown; that is the only allowed failure.
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("nf_conntrack_max") && e.lines().count() == 2,
            "{}",
            out(&o)
        );
        return;
    }
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("high-connections"),
        "{}",
        out(&o)
    );
}

#[tokio::test]
async fn get_node_reports_the_sysctl_state() {
    let fake = FakeProc::new(BASE_KEYS);
    let agent = daemon(&fake, DAEMON);
    fake.wait_value("net.core.somaxconn", "8192");
    fake.set("net.core.somaxconn", "1");
    fake.wait_value("net.core.somaxconn", "8192");
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        let mut client =
            nodekeeper::pb::node_agent_client::NodeAgentClient::connect(agent.grpc_url())
                .await
                .unwrap();
        client
            .get_node(nodekeeper::pb::GetNodeRequest {})
            .await
            .unwrap()
            .into_inner()
    })
    .await
    .expect("GetNode within 10 s");
    let sysctl = status.sysctl.expect("sysctl status present when enabled");
    assert_eq!(sysctl.profiles, ["trino"]);
    assert_eq!(sysctl.hash.len(), 16);
    assert_eq!(sysctl.error, "");
    assert_eq!(sysctl.keys.len(), 1);
    let key = &sysctl.keys[0];
    assert_eq!(
        (key.key.as_str(), key.value.as_str(), key.profile.as_str()),
        ("net.core.somaxconn", "8192", "trino")
    );
    assert_eq!(key.drift_corrections, 1);
    let cap = status
        .capabilities
        .iter()
        .find(|c| c.name == "sysctl")
        .expect("sysctl capability listed");
    assert_eq!(cap.state, nodekeeper::pb::HealthState::Serving as i32);
}

// === issue #17: side effects, per-namespace journal, denylist and use checks ===

/// Runs `nodekeeper sysctl ACTION --netns NS` with a state dir the caller keeps.
fn cli_in(ns: &str, action: &str, config: &str, state: &Path) -> Output {
    let file = state.with_extension("yaml");
    std::fs::write(&file, config).unwrap();
    Command::new(agent_bin())
        .args(["sysctl", action, "--config"])
        .arg(&file)
        .arg("--state-dir")
        .arg(state)
        .args(["--netns", ns])
        .output()
        .unwrap()
}

/// Every forwarding-related value of a namespace, by key.
fn forwarding(ns: &Netns) -> Vec<(String, String)> {
    let o = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sh", "-c"])
        .arg("cd /proc/sys/net && grep -H . ipv4/ip_forward ipv4/conf/*/forwarding ipv4/conf/all/accept_redirects ipv6/conf/*/forwarding")
        .output()
        .unwrap();
    let mut v: Vec<(String, String)> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.sort();
    assert!(v.len() >= 6, "{v:?}");
    v
}

fn ns_write(ns: &Netns, key: &str, value: &str) {
    let ok = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sh", "-c"])
        .arg(format!(
            "echo {value} > /proc/sys/{}",
            key.replace('.', "/")
        ))
        .status()
        .unwrap()
        .success();
    assert!(ok, "{key}={value}");
}

const HOST_KEYS: [&str; 5] = [
    "net.ipv4.ip_forward",
    "net.ipv4.conf.lo.forwarding",
    "net.ipv4.conf.all.accept_redirects",
    "net.core.somaxconn",
    "net.core.optmem_max",
];

#[test]
fn netns_a_failed_apply_of_ip_forward_puts_every_forwarding_key_back() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::now();
    let ns = Netns::new("sysctl-fwd");
    // An interface forwarding while the namespace does not: ip_forward=1 then 0 would clear it.
    ns_write(&ns, "net.ipv4.conf.lo.forwarding", "1");
    let before = forwarding(&ns);
    let dir = tempfile::tempdir().unwrap();
    // tcp_syn_retries is capped at 127 (EINVAL) and is written after ip_forward.
    let o = cli_in(
        &ns.path(),
        "apply",
        "sysctl:\n  profiles:\n    - name: pod\n      sysctls:\n        net.ipv4.ip_forward: 1\n        net.ipv4.tcp_syn_retries: 200\n",
        &dir.path().join("state"),
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("1 earlier change(s) rolled back"),
        "{}",
        out(&o)
    );
    assert_eq!(forwarding(&ns), before, "every conf.*.forwarding is back");
    host_before.assert_unchanged();
}

#[test]
fn netns_revert_restores_that_namespace_from_its_own_journal_and_never_the_host() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::now();
    let ns = Netns::new("sysctl-rv");
    let other = Netns::new("sysctl-rv-other");
    ns_write(&ns, "net.ipv4.conf.lo.forwarding", "1");
    let (fwd_before, somaxconn_before) = (forwarding(&ns), ns.read("net.core.somaxconn"));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = "sysctl:\n  profiles:\n    - name: pod\n      sysctls:\n        net.ipv4.ip_forward: 1\n        net.core.somaxconn: 12345\n";
    let o = cli_in(&ns.path(), "apply", config, &state);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(ns.read("net.ipv4.ip_forward"), "1");
    assert_eq!(ns.read("net.core.somaxconn"), "12345");
    let journals: Vec<_> = std::fs::read_dir(state.join("sysctl/netns"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(journals.len(), 1, "one journal for the namespace");
    assert!(
        !state.join("sysctl/originals.json").exists(),
        "nothing recorded for the host"
    );

    // A namespace nodekeeper never touched has no record: a clear error, non-zero, no change.
    let other_before = forwarding(&other);
    let o = cli_in(&other.path(), "revert", config, &state);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no sysctl record for network namespace"),
        "{}",
        out(&o)
    );
    assert_eq!(forwarding(&other), other_before);

    let o = cli_in(&ns.path(), "revert", config, &state);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("2 key(s) restored"),
        "{}",
        out(&o)
    );
    assert_eq!(forwarding(&ns), fwd_before, "forwarding keys as they were");
    assert_eq!(ns.read("net.core.somaxconn"), somaxconn_before);
    // Its record is spent: a second revert says so instead of claiming success.
    let o = cli_in(&ns.path(), "revert", config, &state);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    host_before.assert_unchanged();
}

#[test]
fn netns_the_hosts_own_namespace_is_refused_and_optmem_max_is_per_namespace() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::now();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = "sysctl:\n  profiles:\n    - name: pod\n      sysctls:\n        net.core.somaxconn: 777\n        net.core.optmem_max: 65536\n";
    for action in ["apply", "revert"] {
        let o = cli_in("/proc/self/ns/net", action, config, &state);
        assert_eq!(o.status.code(), Some(1), "{action}: {}", out(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("host's own network namespace"),
            "{action}: {}",
            out(&o)
        );
    }
    let ns = Netns::new("sysctl-optmem");
    let o = cli_in(&ns.path(), "apply", config, &state);
    let release = host("kernel.osrelease");
    let (major, minor) = {
        let mut it = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    if (major, minor) >= (6, 9) {
        assert!(o.status.success(), "{}", out(&o));
        assert_eq!(ns.read("net.core.optmem_max"), "65536");
    } else {
        assert_eq!(o.status.code(), Some(64), "global before 6.9: {}", out(&o));
    }
    host_before.assert_unchanged();
}

#[test]
fn plan_refuses_node_killing_weakening_and_one_way_settings_against_this_kernel() {
    // Read-only: `plan` against the real /proc, so the use checks see this machine's use.
    let cases = [
        "kernel.warn_limit: 1",
        "kernel.oops_limit: 1",
        "kernel.unprivileged_bpf_disabled: 0",
        "kernel.randomize_va_space: 0",
        "fs.suid_dumpable: 2",
        "kernel.perf_event_paranoid: -1",
        "kernel.usermodehelper.bset: \"0 0\"",
        // Not kernel.pid_max: its floor (301, the kernel's minimum) is refused only on a node running
        // over 150 tasks, so the case would depend on this machine; limits::tests covers it on a fake
        // /proc, and threads-max below goes through the same task-count check.
        "kernel.threads-max: 20",
        "fs.file-max: 10",
        "vm.max_map_count: 1",
        "vm.min_free_kbytes: 1000000000",
    ];
    let dir = tempfile::tempdir().unwrap();
    for line in cases {
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            format!("sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        {line}\n"),
        )
        .unwrap();
        let o = Command::new(agent_bin())
            .args(["sysctl", "plan", "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()
            .unwrap();
        let key = line.split(':').next().unwrap();
        assert_eq!(o.status.code(), Some(64), "{line}: {}", out(&o));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(key), "{line}: {e}");
        assert!(
            e.contains("denylist") || e.contains("in use now") || e.contains("of RAM"),
            "{line}: the reason is given: {e}"
        );
    }
    // Strict overcommit with a ratio of 0 (the commit limit is the swap alone): below what any
    // running node commits. (1% of RAM was above the 53 MB an idle 24 GiB VM commits.)
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        vm.overcommit_memory: 2\n        vm.overcommit_ratio: 0\n",
    )
    .unwrap();
    let o = Command::new(agent_bin())
        .args(["sysctl", "plan", "--config"])
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let swap_kb: i64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SwapTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    if swap_kb == 0 {
        assert_eq!(o.status.code(), Some(64), "{}", out(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("strict overcommit"),
            "{}",
            out(&o)
        );
    }
}

// === adversary (#17): attacks that break the promise; ignored so the suite stays green ===

#[test]
fn adversary_denylist_bypassed_by_a_leading_or_trailing_slash() {
    let fake = FakeProc::new(&[
        ("kernel.sysrq", "0"),
        ("kernel.panic", "0"),
        ("kernel.randomize_va_space", "2"),
    ]);
    // Each one names a denied key (or a refused value) by the same file under /proc/sys.
    fake.set("kernel.threads-max", "100000");
    std::fs::write(fake.proc().join("loadavg"), "0.00 0.00 0.00 1/5000 1\n").unwrap();
    let before = fake.snapshot();
    for key in [
        "/kernel/sysrq",
        "/kernel/panic",
        "kernel/randomize_va_space/",
        "kernel/threads-max/",
    ] {
        let config =
            format!("sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        '{key}': 1\n");
        let o = run_cli("apply", &config, &fake, &[]);
        assert_eq!(
            o.status.code(),
            Some(64),
            "{key}: must be refused with a reason, like its dotted spelling: {}",
            out(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("denylist")
                || String::from_utf8_lossy(&o.stderr).contains("in use now"),
            "{key}: {}",
            out(&o)
        );
    }
    assert_eq!(fake.snapshot(), before, "a denied key was written");
}

#[test]
fn adversary_concurrent_cli_applies_lose_an_original() {
    let fake = FakeProc::new(&[("vm.zz_a", "0"), ("vm.zz_b", "0")]);
    let write = |name: &str, key: &str| {
        let f = fake.dir.path().join(name);
        std::fs::write(
            &f,
            format!("sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        {key}: 1\n"),
        )
        .unwrap();
        f
    };
    let (a, b) = (write("a.yaml", "vm.zz_a"), write("b.yaml", "vm.zz_b"));
    let start = |config: &Path| {
        Command::new(agent_bin())
            .args(["sysctl", "apply", "--config"])
            .arg(config)
            .arg("--host-proc")
            .arg(fake.proc())
            .arg("--state-dir")
            .arg(fake.state())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    for round in 0..40 {
        fake.set("vm.zz_a", "0");
        fake.set("vm.zz_b", "0");
        let _ = std::fs::remove_dir_all(fake.state());
        let (mut pa, mut pb) = (start(&a), start(&b));
        // (Either may also fail outright: both write the same `originals.tmp`.)
        let _ = (pa.wait().unwrap(), pb.wait().unwrap());
        let o = run_cli("revert", "sysctl: {}\n", &fake, &[]);
        assert!(o.status.success(), "round {round}: {}", out(&o));
        assert_eq!(
            (fake.get("vm.zz_a"), fake.get("vm.zz_b")),
            ("0".into(), "0".into()),
            "round {round}: every key changed can be restored; revert said {}",
            out(&o)
        );
    }
}

#[test]
fn adversary_a_vanished_key_stops_drift_correction_of_the_rest() {
    let fake = FakeProc::new(BASE_KEYS);
    fake.set("net.ipv4.conf.eth9.rp_filter", "0");
    let config = format!("{DAEMON}        net.ipv4.conf.eth9.rp_filter: 2\n");
    let _agent = daemon(&fake, &config);
    fake.wait_value("net.core.somaxconn", "8192");
    fake.wait_value("net.ipv4.conf.eth9.rp_filter", "2");
    // The ENI is detached: its interface directory disappears from /proc/sys.
    std::fs::remove_dir_all(fake.proc().join("sys/net/ipv4/conf/eth9")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    fake.set("net.core.somaxconn", "128");
    fake.wait_value("net.core.somaxconn", "8192");
}

#[test]
fn adversary_the_daemon_erases_an_original_the_cli_recorded() {
    let fake = FakeProc::new(BASE_KEYS);
    let agent = daemon(&fake, DAEMON);
    fake.wait_value("net.core.somaxconn", "8192");
    let state = agent.dir.path().join("state");
    let cli = |action: &str, config: &str| cli_at(&state, &fake, action, config, &[]);
    let o = cli(
        "apply",
        "sysctl:\n  profiles:\n    - name: op\n      sysctls:\n        vm.swappiness: 7\n",
    );
    // Documented decision: the daemon holds the journal lock for its whole life, so the CLI
    // is refused and writes nothing, rather than recording an original the daemon would erase.
    assert!(!o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("held by another nodekeeper"),
        "{}",
        out(&o)
    );
    assert_eq!(fake.get("vm.swappiness"), "60", "nothing applied");
    // Drift on the daemon's key: it re-applies and rewrites the journal.
    fake.set("net.core.somaxconn", "128");
    fake.wait_value("net.core.somaxconn", "8192");
    std::thread::sleep(Duration::from_millis(300));
    let _dir = agent_stop(agent);
    let journal = std::fs::read_to_string(state.join("sysctl/originals.json")).unwrap_or_default();
    assert!(
        journal.contains("net.core.somaxconn") && journal.contains("4096"),
        "the daemon's original (somaxconn 4096) stays recorded: {journal}"
    );
    assert_eq!(
        fake.get("vm.swappiness"),
        "60",
        "the refused CLI changed nothing"
    );
}

#[test]
fn adversary_a_daemon_started_after_a_cli_apply_keeps_the_cli_original() {
    let fake = FakeProc::new(BASE_KEYS);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cli =
        |action: &str, config: &str, extra: &[&str]| cli_at(&state, &fake, action, config, extra);
    // The daemon is stopped: the CLI records vm.swappiness's original (60) in the journal.
    let o = cli(
        "apply",
        "sysctl:\n  profiles:\n    - name: op\n      sysctls:\n        vm.swappiness: 7\n",
        &[],
    );
    assert!(o.status.success(), "{}", out(&o));
    // The daemon starts on the same state dir, applies and rewrites the journal on drift.
    let agent = Agent::builder()
        .config(&format!("metrics:\n  enabled: false\n{DAEMON}"))
        .arg("--host-proc")
        .arg(fake.proc().display().to_string())
        .state_dir(&state)
        .start();
    fake.wait_value("net.core.somaxconn", "8192");
    fake.set("net.core.somaxconn", "128");
    fake.wait_value("net.core.somaxconn", "8192");
    std::thread::sleep(Duration::from_millis(300));
    let _dir = agent_stop(agent);
    let journal = std::fs::read_to_string(state.join("sysctl/originals.json")).unwrap_or_default();
    assert!(
        journal.contains("vm.swappiness") && journal.contains("60"),
        "the CLI's original of vm.swappiness (60) must stay recorded: {journal}"
    );
    assert_eq!(
        fake.get("vm.swappiness"),
        "7",
        "the daemon did not revert the CLI's key"
    );
    // With the daemon stopped, `sysctl revert` restores the CLI's key and leaves the daemon's;
    // `--all` restores those too.
    let o = cli("revert", "sysctl: {}\n", &[]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("1 key(s) the daemon applied left"),
        "{}",
        out(&o)
    );
    assert_eq!(fake.get("vm.swappiness"), "60");
    assert_eq!(fake.get("net.core.somaxconn"), "8192");
    let o = cli("revert", "sysctl: {}\n", &["--all"]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(fake.get("net.core.somaxconn"), "4096");
}

/// docs/install.md's uninstall, as written there (issue #13): its sysctl revert, run after its
/// step that stops the DaemonSet's agent, restores every key the agent applied. The doc's own
/// command line is run, with the node debug pod's `/host` (the node's /) mapped onto a fake node
/// whose /proc is the fake procfs and whose /var/lib/nodekeeper is the agent's state dir (the
/// DaemonSet's `state` hostPath). Run while the agent lives, the same command is refused: the
/// order the doc gave before.
#[test]
fn install_md_uninstall_reverts_every_key_the_agent_applied_once_the_daemonset_is_gone() {
    let root = nodekeeper_tests::workspace_root();
    let doc = std::fs::read_to_string(root.join("docs/install.md")).unwrap();
    let uninstall = doc
        .split("\n## Uninstall\n")
        .nth(1)
        .expect("docs/install.md has an Uninstall section")
        .split("\n## ")
        .next()
        .unwrap();
    // Shell lines, comments dropped, backslash continuations joined.
    let script = uninstall
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Uninstall section has a sh block");
    let commands: Vec<String> = script
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let position = |what: &str| {
        commands
            .iter()
            .position(|c| c.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` in the uninstall commands: {commands:#?}"))
    };
    assert!(
        position("delete daemonset nodekeeper") < position("nodekeeper sysctl revert"),
        "the revert must come after the DaemonSet is deleted: {commands:#?}"
    );
    assert!(
        position("nodekeeper sysctl revert") < position("delete -k"),
        "the revert needs the namespace (its debug pods) and comes before `delete -k`: {commands:#?}"
    );
    let daemonset = std::fs::read_to_string(root.join("manifests/base/daemonset.yaml")).unwrap();
    assert!(
        daemonset.contains(
            "- name: state\n          hostPath:\n            path: /var/lib/nodekeeper\n"
        ),
        "the fake node below keeps the agent's state where the DaemonSet does"
    );

    let fake = FakeProc::new(BASE_KEYS);
    let node = fake.dir.path();
    let state = node.join("var/lib/nodekeeper");
    let revert = &commands[position("nodekeeper sysctl revert")];
    let doc_args: Vec<String> = revert
        .split_whitespace()
        .skip_while(|w| *w != "/usr/bin/nodekeeper")
        .skip(1)
        .map(|w| match w.strip_prefix("/host/") {
            Some(on_node) => node.join(on_node).display().to_string(),
            None => w.to_string(),
        })
        .collect();
    assert_eq!(
        doc_args.get(..2),
        Some(&["sysctl".to_string(), "revert".to_string()][..]),
        "{revert}"
    );
    let run_doc_revert = || Command::new(agent_bin()).args(&doc_args).output().unwrap();

    // The DaemonSet's agent applies its profile on the node.
    let agent = Agent::builder()
        .config(&format!("metrics:\n  enabled: false\n{DAEMON}"))
        .arg("--host-proc")
        .arg(fake.proc().display().to_string())
        .state_dir(&state)
        .start();
    fake.wait_value("net.core.somaxconn", "8192");
    let o = run_doc_revert();
    assert!(
        !o.status.success() && out(&o).contains("held by another nodekeeper"),
        "the agent holds the journal while it runs: {}",
        out(&o)
    );
    assert_eq!(fake.get("net.core.somaxconn"), "8192");

    // Step 2: the DaemonSet is deleted, the agent stops (and leaves the values as tuned).
    let _dir = agent_stop(agent);
    assert_eq!(fake.get("net.core.somaxconn"), "8192");
    // Step 3: the doc's revert.
    let o = run_doc_revert();
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("net.core.somaxconn"), "{}", out(&o));
    for (key, original) in BASE_KEYS {
        assert_eq!(
            fake.get(key),
            original.split_whitespace().collect::<Vec<_>>().join(" "),
            "{key} back to its original"
        );
    }
}

/// Stops the daemon (dropping it) but keeps its temp dir for inspection.
fn agent_stop(agent: nodekeeper_tests::Agent) -> tempfile::TempDir {
    let nodekeeper_tests::Agent { dir, .. } = agent;
    dir
}

#[test]
fn adversary_netns_revert_after_two_applies_leaves_a_dependant_changed() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::now();
    let ns = Netns::new("adv-dep");
    let before = forwarding(&ns);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let o = cli_in(
        &ns.path(),
        "apply",
        "sysctl:\n  profiles:\n    - name: a\n      sysctls:\n        net.ipv4.conf.all.accept_redirects: 0\n",
        &state,
    );
    assert!(o.status.success(), "{}", out(&o));
    let o = cli_in(
        &ns.path(),
        "apply",
        "sysctl:\n  profiles:\n    - name: b\n      sysctls:\n        net.ipv4.ip_forward: 1\n",
        &state,
    );
    assert!(o.status.success(), "{}", out(&o));
    let o = cli_in(&ns.path(), "revert", "sysctl: {}\n", &state);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(
        forwarding(&ns),
        before,
        "every key back to its exact original"
    );
    host_before.assert_unchanged();
}

#[test]
fn adversary_netns_a_new_namespace_inherits_a_dead_ones_journal() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::now();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let identity = |ns: &Netns| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(ns.path()).unwrap();
        (m.dev(), m.ino())
    };
    // A pod's namespace is tuned, then the pod dies without a revert.
    let old = Netns::new("adv-old");
    let dead = identity(&old);
    let o = cli_in(
        &old.path(),
        "apply",
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.core.somaxconn: 12345\n",
        &state,
    );
    assert!(o.status.success(), "{}", out(&o));
    drop(old);
    // A new pod's namespace: the kernel hands out freed namespace inodes again (freed
    // asynchronously, so it may take a few namespaces).
    let mut new = None;
    let mut spares = Vec::new();
    for i in 0..50 {
        let ns = Netns::new(&format!("adv-new{i}"));
        if identity(&ns) == dead {
            new = Some(ns);
            break;
        }
        spares.push(ns);
    }
    let new = new.unwrap_or_else(|| {
        // Not reused in 50 tries: give the dead namespace's journal the new one's name, which is
        // exactly what a reuse leaves on disk.
        let new = spares.pop().expect("one namespace made");
        let name = |(dev, ino): (u64, u64)| state.join(format!("sysctl/netns/{dev}-{ino}.json"));
        std::fs::rename(name(dead), name(identity(&new))).unwrap();
        eprintln!("the kernel did not reuse the inode in 50 tries: reuse simulated by renaming");
        new
    });
    drop(spares);
    ns_write(&new, "net.core.somaxconn", "1000");
    let o = cli_in(
        &new.path(),
        "apply",
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.core.somaxconn: 2000\n",
        &state,
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("discarded the record of a dead network namespace"),
        "{}",
        out(&o)
    );
    let o = cli_in(&new.path(), "revert", "sysctl: {}\n", &state);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(
        new.read("net.core.somaxconn"),
        "1000",
        "the new namespace's own original, not the dead one's"
    );
    host_before.assert_unchanged();
}

#[test]
fn adversary_a_limit_below_current_inotify_use_is_not_refused() {
    // Read-only: `plan` against the real /proc while this user holds 4 inotify instances.
    let mut holder = Command::new(nodekeeper_tests::python())
        .args([
            "-c",
            "import ctypes,sys,time\nlibc=ctypes.CDLL(None)\nfds=[libc.inotify_init() for _ in range(4)]\nassert min(fds)>=0\nprint('ready',flush=True)\ntime.sleep(60)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        fs.inotify.max_user_instances: 1\n",
    )
    .unwrap();
    let o = Command::new(agent_bin())
        .args(["sysctl", "plan", "--config"])
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(line.trim(), "ready");
    assert_eq!(
        o.status.code(),
        Some(64),
        "a limit of 1 while 4 are in use must be refused with a reason: {}",
        out(&o)
    );
}

#[test]
fn adversary_netns_a_refused_vector_write_leaves_the_key_half_changed() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::now();
    let ns = Netns::new("adv-vec");
    let before = ns.read("net.ipv4.tcp_rmem");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // tcp_rmem's elements must be >= 1: the kernel stores 8192 and 100000, then refuses 0.
    let o = cli_in(
        &ns.path(),
        "apply",
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.ipv4.tcp_rmem: \"8192 100000 0\"\n",
        &state,
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let after_apply = ns.read("net.ipv4.tcp_rmem");
    let o = cli_in(&ns.path(), "revert", "sysctl: {}\n", &state);
    assert_eq!(
        (after_apply, ns.read("net.ipv4.tcp_rmem")),
        (before.clone(), before),
        "a failed apply leaves nothing changed, or revert puts it back: {}",
        out(&o)
    );
    host_before.assert_unchanged();
}

#[test]
fn adversary_netns_exec_journal_is_replayed_into_another_namespace() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::now();
    let (a, b) = (Netns::new("adv-exec-a"), Netns::new("adv-exec-b"));
    ns_write(&b, "net.core.somaxconn", "1000");
    let a_before = a.read("net.core.somaxconn");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.core.somaxconn: 12345\n",
    )
    .unwrap();
    let exec = |ns: &Netns, action: &str| {
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(agent_bin())
            .args(["sysctl", action, "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()
            .unwrap()
    };
    let o = exec(&a, "apply");
    assert!(o.status.success(), "{}", out(&o));
    // The operator reverts from another namespace (a later `kubectl exec`, another shell).
    let o = exec(&b, "revert");
    assert_eq!(
        b.read("net.core.somaxconn"),
        "1000",
        "a namespace nodekeeper never changed is left alone: {}",
        out(&o)
    );
    let o = exec(&a, "revert");
    assert_eq!(
        a.read("net.core.somaxconn"),
        a_before,
        "A can still be restored: {}",
        out(&o)
    );
    host_before.assert_unchanged();
}

#[test]
fn adversary_netns_exec_journal_is_replayed_into_a_namespace_that_reuses_the_inode() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::now();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.core.somaxconn: 12345\n",
    )
    .unwrap();
    let exec = |ns: &Netns, action: &str| {
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(agent_bin())
            .args(["sysctl", action, "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap()
    };
    let inode = |ns: &Netns| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(ns.path()).unwrap().ino()
    };
    // `ip netns exec A nodekeeper sysctl apply`, then A dies without a revert.
    let a = Netns::new("adv-exec-dead");
    let dead = inode(&a);
    let o = exec(&a, "apply");
    assert!(o.status.success(), "{}", out(&o));
    drop(a);
    let mut spares = Vec::new();
    let b = loop {
        let ns = Netns::new(&format!("adv-exec-new{}", spares.len()));
        if inode(&ns) == dead {
            break ns;
        }
        if spares.len() == 50 {
            // Not reused in 50 tries: point the journal at this namespace's inode, which is
            // exactly what a reuse makes of it.
            let journal = state.join("sysctl/originals.json");
            let text = std::fs::read_to_string(&journal).unwrap();
            let moved = text.replace(&format!("net:[{dead}]"), &format!("net:[{}]", inode(&ns)));
            assert_ne!(text, moved, "{text}");
            std::fs::write(&journal, moved).unwrap();
            eprintln!("the kernel did not reuse the inode in 50 tries: reuse simulated");
            break ns;
        }
        spares.push(ns);
    };
    drop(spares);
    ns_write(&b, "net.core.somaxconn", "1000");
    let o = exec(&b, "revert");
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("is gone"), "{}", out(&o));
    assert_eq!(
        b.read("net.core.somaxconn"),
        "1000",
        "a dead namespace's originals are not replayed in the one reusing its inode"
    );
    host_before.assert_unchanged();
}

/// Issue #15, finding 5: a corrupt `sysctl/originals.json` used to stop the whole agent, DNS
/// included. Now only the sysctl capability is degraded (health names the file and the error);
/// DNS answers, /metrics serves, /healthz stays 200 (kubelet must not restart the agent in a
/// loop over it), and nothing is written to the fake /proc.
#[test]
fn a_corrupt_originals_journal_degrades_only_sysctl_and_dns_keeps_serving_as_root() {
    use nodekeeper_tests::dns_peers::{
        Unbound, Upstreams, agent_dns_config, dig, example_zone, free_dns_addr,
    };
    use nodekeeper_tests::netns_pods::Netns;
    use nodekeeper_tests::{require_root, require_tool};
    if !(require_root() && require_tool("ip") && require_tool("dig") && require_tool("unbound")) {
        return;
    }
    let _netns = Netns::enter_fresh("sysctl-corrupt");
    let zone = Unbound::serving(&[example_zone()]);
    let listen = free_dns_addr();
    let up = Upstreams {
        default: Some(zone.addr),
        ..Default::default()
    };
    let fake = FakeProc::new(BASE_KEYS);
    std::fs::create_dir_all(fake.state().join("sysctl")).unwrap();
    std::fs::write(
        fake.state().join("sysctl/originals.json"),
        "{\"net.core.somax",
    )
    .unwrap();
    let config = format!("{}{DAEMON}", agent_dns_config(listen, &up, "", ""));
    let mut agent = Agent::builder()
        .config(&config)
        .state_dir(&fake.state())
        .arg("--host-proc")
        .arg(fake.proc().display().to_string())
        .live_only()
        .start();
    let answer = wait_for(Duration::from_secs(10), "DNS answers", || {
        let o = dig(listen, &["a.example.test", "A"]);
        (o.status() == "NOERROR").then_some(o)
    });
    assert_eq!(answer.data("A"), vec!["192.0.2.1"], "{}", answer.raw);
    let (live, _) = nodekeeper_tests::http_get(agent.metrics, "/healthz").unwrap();
    assert_eq!(live, 200, "the agent stays live");
    let (ready, why) = nodekeeper_tests::http_get(agent.metrics, "/readyz").unwrap();
    assert_eq!(ready, 503, "{why}");
    assert!(why.contains("sysctl"), "readyz names the capability: {why}");
    assert!(!why.contains("dns"), "dns is ready: {why}");
    let m = agent.metrics_text();
    assert_eq!(
        sample(
            &m,
            "nodekeeper_capability_state",
            &[("capability", "sysctl"), ("state", "degraded")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        agent.proc.log_text().contains("originals.json"),
        "the log names the file"
    );
    assert_eq!(
        fake.get("net.core.somaxconn"),
        "4096",
        "the profile (8192) is not applied without its journal"
    );
    assert!(agent.proc.alive());
}

#[test]
fn adversary_netns_ipv6_all_ignore_routes_with_linkdown_revert_leaves_interfaces_changed() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_keys = [
        "net.ipv6.conf.all.ignore_routes_with_linkdown",
        "net.ipv6.conf.default.ignore_routes_with_linkdown",
        "net.ipv6.conf.lo.ignore_routes_with_linkdown",
    ];
    let host_before = HostValues::of(&host_keys);
    let ns = Netns::new("sysctl-linkdown");
    // An interface set on its own; the kernel overwrites it on every write of conf.all
    // (addrconf_fixup_linkdown, like forwarding).
    ns_write(&ns, "net.ipv6.conf.lo.ignore_routes_with_linkdown", "1");
    let before: Vec<String> = host_keys.iter().map(|k| ns.read(k)).collect();
    assert_eq!(before, ["0", "0", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = "sysctl:\n  profiles:\n    - name: pod\n      sysctls:\n        net.ipv6.conf.all.ignore_routes_with_linkdown: 1\n";
    let o = cli_in(&ns.path(), "apply", config, &state);
    assert!(o.status.success(), "{}", out(&o));
    let o = cli_in(&ns.path(), "revert", config, &state);
    let after: Vec<String> = host_keys.iter().map(|k| ns.read(k)).collect();
    host_before.assert_unchanged();
    assert_eq!(
        after,
        before,
        "revert reported success but the kernel's side effect on conf.lo stays: {}",
        out(&o)
    );
}

#[test]
fn adversary_netns_the_hosts_namespace_is_accepted_when_the_cli_runs_in_another_namespace() {
    if !require_root() || !require_tool("ip") {
        return;
    }
    let host_before = HostValues::of(&["net.core.somaxconn"]);
    let ns = Netns::new("sysctl-hostns");
    // A process in the host's namespace (this test's own): its ns file is the host's namespace.
    let host_ns = format!("/proc/{}/ns/net", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    let want: i64 = host("net.core.somaxconn").parse::<i64>().unwrap() + 1;
    std::fs::write(
        &file,
        format!("sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        net.core.somaxconn: {want}\n"),
    )
    .unwrap();
    // `plan` only (it writes nothing): an `apply` here would write the host's somaxconn.
    let o = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(agent_bin())
        .args(["sysctl", "plan", "--config"])
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--netns", &host_ns])
        .output()
        .unwrap();
    host_before.assert_unchanged();
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("host's own network namespace"),
        "the host's namespace is refused as a --netns target wherever the CLI runs: {}",
        out(&o)
    );
}

#[test]
fn adversary_security_weakening_values_are_not_refused() {
    // Read-only: `plan` against the real /proc.
    let cases = [
        // NULL-pointer dereferences in the kernel become exploitable.
        "vm.mmap_min_addr: 0",
        // Hard-link and symlink races on world-writable dirs (CVE class the knobs exist for).
        "fs.protected_hardlinks: 0",
        // Every user may use userfaultfd (a standard kernel-exploit primitive).
        "vm.unprivileged_userfaultfd: 1",
        "fs.protected_symlinks: 0",
        // Every user reads the kernel log.
        "kernel.dmesg_restrict: 0",
        // Real-time tasks may starve the node.
        "kernel.sched_rt_runtime_us: -1",
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut accepted = Vec::new();
    for line in cases {
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            format!("sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        {line}\n"),
        )
        .unwrap();
        let o = Command::new(agent_bin())
            .args(["sysctl", "plan", "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()
            .unwrap();
        if o.status.code() != Some(64) {
            accepted.push(format!("{line}: {}", out(&o)));
        }
    }
    assert!(accepted.is_empty(), "not refused:\n{}", accepted.join("\n"));
}

#[test]
fn adversary_nr_open_below_current_fd_use_is_not_refused() {
    // Read-only: `plan` against the real /proc. This process holds fds up to ~300 while the
    // plan runs; fs.nr_open 64 (the kernel's minimum) caps every fd table below that.
    let held: Vec<std::fs::File> = (0..300)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "sysctl:\n  profiles:\n    - name: p\n      sysctls:\n        fs.nr_open: 64\n",
    )
    .unwrap();
    let o = Command::new(agent_bin())
        .args(["sysctl", "plan", "--config"])
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    drop(held);
    assert_eq!(
        o.status.code(),
        Some(64),
        "a limit below current use is refused: {}",
        out(&o)
    );
}

#[test]
fn adversary_a_limit_refused_after_use_grew_stops_drift_correction_of_the_rest() {
    let fake = FakeProc::new(BASE_KEYS);
    fake.set("fs.file-nr", "100\t0\t1000000");
    let agent = daemon(&fake, &format!("{DAEMON}        fs.file-max: 10000\n"));
    fake.wait_value("fs.file-max", "10000");
    fake.wait_value("net.core.somaxconn", "8192");
    // The node gets busy (9000 handles: 10000 is now below 2x the use), and something puts
    // fs.file-max back up: refusing to lower it again is right, for that key.
    fake.set("fs.file-nr", "9000\t0\t1000000");
    fake.set("fs.file-max", "1000000");
    // Drift on another key must still be corrected.
    fake.set("net.core.somaxconn", "128");
    wait_for(
        Duration::from_secs(6),
        "somaxconn drift corrected while fs.file-max is refused",
        || (fake.get("net.core.somaxconn") == "8192").then_some(()),
    );
    drop(agent);
}

#[test]
fn adversary_a_key_that_blocks_wedges_drift_correction_and_health() {
    let fake = FakeProc::new(BASE_KEYS);
    fake.set("vm.zz_slow", "0");
    let agent = daemon(&fake, &format!("{DAEMON}        vm.zz_slow: 1\n"));
    fake.wait_value("vm.zz_slow", "1");
    fake.wait_value("net.core.somaxconn", "8192");
    // The key starts blocking: opening it waits forever, like a write spinning on a held lock.
    std::fs::remove_file(fake.file("vm.zz_slow")).unwrap();
    let ok = Command::new("mkfifo")
        .arg(fake.file("vm.zz_slow"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo");
    fake.set("net.core.somaxconn", "128");
    let corrected = (0..120).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        fake.get("net.core.somaxconn") == "8192"
    });
    let health = nodekeeper_tests::http_get(agent.metrics, "/healthz");
    // Unblock the daemon's open (a writer/reader on the FIFO) before the agent is dropped.
    let fifo = fake.file("vm.zz_slow");
    let _ = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo);
    drop(agent);
    assert!(
        matches!(health, Ok((200, _))),
        "the agent stays live while one sysctl key blocks: {health:?}"
    );
    assert!(
        corrected,
        "drift on somaxconn is corrected while vm.zz_slow blocks"
    );
}
