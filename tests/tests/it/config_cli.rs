//! `nodekeeper check-config` and `run` against good and bad config files: exit codes and
//! messages that name the field.

use std::process::{Command, Output};

use nodekeeper_tests::{Agent, agent_bin, http_get};

fn check_config(yaml: &str, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, yaml).unwrap();
    Command::new(agent_bin())
        .arg("check-config")
        .arg(&file)
        .args(extra)
        .env_remove("NODE_NAME")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn good_file_prints_the_effective_config() {
    let o = check_config(
        "metrics:\n  listen: 127.0.0.1:9100\n",
        &["--api-listen", "127.0.0.1:9200"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("listen: 127.0.0.1:9100"), "{out}");
    assert!(
        out.contains("listen: 127.0.0.1:9200"),
        "flag overrides file: {out}"
    );
}

#[test]
fn env_vars_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, "nodeName: from-file\n").unwrap();
    let o = Command::new(agent_bin())
        .arg("check-config")
        .arg(&file)
        .env("NODE_NAME", "from-env")
        .env("NODEKEEPER_HOST_PROC", "/host/proc")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("nodeName: from-env"), "{out}");
    assert!(out.contains("proc: /host/proc"), "{out}");
}

#[test]
fn unknown_field_exits_64_naming_it() {
    let o = check_config("metrics:\n  enabled: true\n  colour: blue\n", &[]);
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(e.contains("metrics") && e.contains("colour"), "{e}");
}

#[test]
fn wrong_type_exits_64_naming_the_field() {
    let o = check_config("api:\n  maxWatchStreams: many\n", &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("api.maxWatchStreams"), "{}", stderr(&o));
}

#[test]
fn bad_address_names_field_and_value() {
    let o = check_config("metrics:\n  listen: abc\n", &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("metrics.listen: \"abc\" is not a socket address"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn out_of_range_values_are_all_reported() {
    let o = check_config(
        "shutdownTimeout: 5m\napi:\n  maxWatchStreams: 0\nmetrics:\n  filesystems: [relative]\n",
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    for field in [
        "shutdownTimeout",
        "api.maxWatchStreams",
        "metrics.filesystems[0]",
    ] {
        assert!(e.contains(field), "{field} missing from: {e}");
    }
}

#[test]
fn bad_flag_value_is_a_usage_error() {
    let o = check_config("", &["--metrics-listen", "nope"]);
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    assert!(stderr(&o).contains("--metrics-listen"), "{}", stderr(&o));
}

#[test]
fn unreadable_file_exits_66() {
    let o = Command::new(agent_bin())
        .args(["check-config", "/nonexistent/nodekeeper.yaml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(66));
    assert!(
        stderr(&o).contains("/nonexistent/nodekeeper.yaml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn run_with_bad_config_exits_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, "metrics:\n  maxSnapshotAge: forever\n").unwrap();
    let o = Command::new(agent_bin())
        .arg("run")
        .arg("--config")
        .arg(&file)
        .arg("--standalone")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("metrics.maxSnapshotAge"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn port_in_use_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = Command::new(agent_bin())
        .args([
            "run",
            "--standalone",
            "--metrics-listen",
            &addr,
            "--api-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&addr), "{}", stderr(&o));
}

#[test]
fn version_prints_version_and_revision() {
    let o = Command::new(agent_bin()).arg("version").output().unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(&format!("nodekeeper {} (", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}

#[test]
fn standalone_agent_serves_health_and_stops_on_sigterm() {
    let mut agent = Agent::builder().start();
    assert_eq!(http_get(agent.metrics, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(agent.metrics, "/readyz").unwrap().0, 200);
    agent.proc.signal("TERM");
    let status = agent.proc.wait_exit(std::time::Duration::from_secs(2));
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        agent.proc.log_text()
    );
    assert!(
        http_get(agent.metrics, "/healthz").is_err(),
        "listener closed after exit"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut agent = Agent::builder().arg("--log-format").arg("json").start();
    agent.proc.signal("TERM");
    assert!(
        agent
            .proc
            .wait_exit(std::time::Duration::from_secs(2))
            .success()
    );
    let log = agent.proc.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "start, ready and stop are logged:\n{log}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"nodekeeper starting\"")),
        "{log}"
    );
}
