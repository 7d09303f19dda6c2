//! The gRPC API checked from another implementation: Python grpcio with stubs generated from
//! `proto/` at run time (`tests/py/grpc_check.py`). Covers NodeAgent, grpc.health.v1,
//! reflection v1 and the WatchMetrics stream lifecycle (interval floor, stream limit, a clean
//! OK end on SIGTERM).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nodekeeper_tests::{Agent, Proc, python, require_python_modules, workspace_root};

const MODULES: &[&str] = &["grpc", "grpc_tools", "grpc_health", "grpc_reflection"];
const POD_UID: &str = nodekeeper_tests::cgroup::SAMPLE_POD_UID;

fn script() -> PathBuf {
    workspace_root().join("tests/py/grpc_check.py")
}

fn script_cmd(agent: &Agent, scenario: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .arg(scenario)
        .arg("--addr")
        .arg(agent.api.to_string())
        .args(extra)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    cmd
}

/// Runs one scenario to completion; returns its exit status and combined output.
fn run_scenario(agent: &Agent, scenario: &str, extra: &[&str]) -> (ExitStatus, String) {
    let name = format!("grpc_check-{scenario}");
    let mut proc = Proc::spawn(&name, script_cmd(agent, scenario, extra), agent.dir.path());
    let status = proc.wait_exit(Duration::from_secs(90));
    (status, proc.log_text())
}

fn assert_scenario_passes(agent: &mut Agent, scenario: &str, extra: &[&str]) {
    let (status, out) = run_scenario(agent, scenario, extra);
    assert!(
        status.success(),
        "grpc_check.py {scenario} failed ({status}):\n{out}\nagent log:\n{}",
        agent.proc.log_text()
    );
    assert!(out.contains("\"ok\": true"), "no success result:\n{out}");
    assert!(agent.proc.alive(), "agent died:\n{}", agent.proc.log_text());
}

#[test]
fn python_client_sees_node_metrics_health_and_reflection() {
    if !require_python_modules(MODULES) {
        return;
    }
    let mut agent = Agent::builder().start();
    assert_scenario_passes(
        &mut agent,
        "basic",
        &["--expect-version", env!("CARGO_PKG_VERSION")],
    );
}

/// Opens a stream with `scenario` (a `*-until-end` one), sends the agent SIGTERM once the first
/// message arrived, and expects the stream to end with OK and the agent to exit 0 within 2 s.
fn sigterm_ends_stream_with_ok(scenario: &str) {
    let mut agent = Agent::builder().start();
    let mut cmd = script_cmd(&agent, scenario, &[]);
    let err_log = agent.dir.path().join(format!("{scenario}.stderr"));
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn python");
    let stdout = child.stdout.take().unwrap();
    // Killed and reaped on drop, whatever happens below.
    let mut script = Proc {
        child,
        name: format!("grpc_check-{scenario}"),
        log: err_log,
    };

    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!(
                "{scenario}: no first message ({e}); script stderr:\n{}",
                script.log_text()
            )
        });
    assert_eq!(first, r#"{"event": "first"}"#);

    agent.proc.signal("TERM");
    let signalled = Instant::now();
    let agent_status = agent.proc.wait_exit(Duration::from_secs(2));
    let agent_took = signalled.elapsed();
    let script_status = script.wait_exit(Duration::from_secs(10));
    reader.join().unwrap();
    let lines: Vec<String> = rx.try_iter().collect();
    assert!(
        script_status.success(),
        "{scenario}: the stream did not end with OK ({script_status}); stdout:\n{}\nstderr:\n{}\nagent log:\n{}",
        lines.join("\n"),
        script.log_text(),
        agent.proc.log_text()
    );
    assert!(
        lines.iter().any(|l| l.contains(r#""status": "OK""#)),
        "{lines:?}"
    );
    assert!(
        agent_status.success(),
        "agent exit {agent_status} {agent_took:?} after SIGTERM; log:\n{}",
        agent.proc.log_text()
    );
    let log = agent.proc.log_text();
    assert!(
        !log.contains("did not stop in time"),
        "an open stream held the shutdown until the deadline; log:\n{log}"
    );
}

#[test]
fn sigterm_ends_an_open_watch_stream_with_ok_and_the_agent_exits_0() {
    if !require_python_modules(MODULES) {
        return;
    }
    sigterm_ends_stream_with_ok("watch-until-end");
}

#[test]
fn sigterm_ends_an_open_health_watch_with_ok_and_the_agent_exits_0() {
    if !require_python_modules(MODULES) {
        return;
    }
    sigterm_ends_stream_with_ok("health-watch-until-end");
}

#[test]
fn watch_interval_below_the_minimum_is_raised_to_it() {
    if !require_python_modules(MODULES) {
        return;
    }
    let mut agent = Agent::builder().start();
    assert_scenario_passes(&mut agent, "interval-floor", &[]);
}

#[test]
fn exclude_pods_drops_the_pods_that_are_otherwise_listed() {
    if !require_python_modules(MODULES) {
        return;
    }
    let cgroup = tempfile::tempdir().unwrap();
    nodekeeper_tests::cgroup::sample_tree(cgroup.path());
    let mut agent = Agent::builder()
        .arg("--host-cgroup")
        .arg(cgroup.path().to_str().unwrap())
        .start();
    assert_scenario_passes(&mut agent, "exclude-pods", &["--expect-pod-uid", POD_UID]);
}

#[test]
fn watch_streams_beyond_the_limit_are_resource_exhausted() {
    if !require_python_modules(MODULES) {
        return;
    }
    let mut agent = Agent::builder()
        .config("api:\n  maxWatchStreams: 1\n")
        .start();
    assert_scenario_passes(&mut agent, "max-streams", &[]);
}

/// Python's own reflection client (grpcio-reflection speaks v1alpha only), with no .proto and no
/// generated stub: resolves NodeAgent, calls GetNode and decodes a WatchMetrics message from the
/// reflected descriptors alone (`tests/py/reflection_client.py`).
#[test]
fn python_reflection_v1alpha_client_calls_get_node_and_decodes_watch_metrics() {
    if !require_python_modules(&["grpc", "grpc_reflection"]) {
        return;
    }
    let mut agent = Agent::builder().start();
    let mut cmd = Command::new(python());
    cmd.arg(workspace_root().join("tests/py/reflection_client.py"))
        .arg("--addr")
        .arg(agent.api.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let mut proc = Proc::spawn("reflection_client", cmd, agent.dir.path());
    let status = proc.wait_exit(Duration::from_secs(90));
    let out = proc.log_text();
    assert!(
        status.success(),
        "reflection_client.py failed ({status}):\n{out}\nagent log:\n{}",
        agent.proc.log_text()
    );
    assert!(out.contains("\"ok\": true"), "no success result:\n{out}");
    assert!(
        out.contains("\"metrics\": \"HEALTH_STATE_SERVING\""),
        "GetNode decoded without capabilities:\n{out}"
    );
    assert!(
        out.contains("\"collectedAt\""),
        "WatchMetrics decoded without collected_at:\n{out}"
    );
    assert!(agent.proc.alive(), "agent died:\n{}", agent.proc.log_text());
}
