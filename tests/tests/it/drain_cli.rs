//! The operator CLI (`nodekeeper drain|cordon|uncordon|get-drain`) against an agent connected to
//! the fake Kubernetes API: exit codes, JSON lines, the dry-run table, the budget named on a
//! timeout. Every command runs under a timeout.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nodekeeper_tests::drain_scenario::{self, NODE};
use nodekeeper_tests::{Agent, AgentBuilder, agent_bin, free_port};

/// Fast retries so scenarios take seconds, not minutes (as in tests/drain.rs).
const FAST: &str = "metrics:\n  enabled: false\ndrain:\n  retryInitial: 100ms\n  retryMax: 500ms\n  deletionPoll: 200ms\n  concurrency: 8\n";

/// The bearer token the agent accepts (mutating RPCs are refused without a credential).
const TOKEN: &str = "operator-token";

/// An agent connected as node-a that accepts `TOKEN`, and the token file the CLI sends.
fn agent(kubeconfig: &std::path::Path) -> (Agent, String) {
    agent_with(kubeconfig, Agent::builder(), "")
}

/// As `agent`, from a builder that already carries env (e.g. `POD_NAME`), with more `drain:`
/// settings (indented lines).
fn agent_with(
    kubeconfig: &std::path::Path,
    builder: AgentBuilder,
    drain_extra: &str,
) -> (Agent, String) {
    let token = kubeconfig.with_file_name("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write token");
    let agent = builder
        .config(&format!(
            "{FAST}{drain_extra}api:\n  auth:\n    tokenFile: {}\n",
            token.display()
        ))
        .connected(kubeconfig, NODE)
        .start();
    (agent, token.display().to_string())
}

/// Runs `nodekeeper ARGS` to completion, killing it after `secs`. Output goes to files, not
/// pipes, so a long event stream never blocks the CLI on a full pipe.
fn cli(args: &[&str], secs: u64) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(agent_bin())
        .args(args)
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn nodekeeper");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "nodekeeper {args:?} did not exit within {secs}s; stdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out).unwrap_or_default(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&out).expect("read stdout"),
        stderr: std::fs::read(&err).expect("read stderr"),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn drain_json_streams_events_and_empties_the_node_but_daemonset_and_mirror_pods() {
    let s = drain_scenario::rotation(Duration::from_millis(200), Duration::from_millis(500));
    let (agent, token) = agent(&s.kubeconfig);
    let addr = agent.api.to_string();
    let out = cli(
        &[
            "drain",
            &addr,
            "--token-file",
            &token,
            "--id",
            "cli-1",
            "--evict-unreplicated",
            "--timeout",
            "2m",
            "--json",
        ],
        150,
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(events[0]["planned"].is_object(), "{}", events[0]);
    let last = events.last().unwrap();
    assert_eq!(
        last["completed"]["phase"], "DRAIN_PHASE_COMPLETED",
        "{last}"
    );
    assert_eq!(last["drainId"], "cli-1");
    assert!(
        events.iter().any(|e| e["blocked"]["budget"]
            .as_str()
            .is_some_and(|b| b.ends_with("-pdb"))),
        "no blocked event naming a budget"
    );
    let mut left = s.api.pods_on(NODE);
    left.sort();
    assert_eq!(left, drain_scenario::expected_remaining());
    assert!(s.api.pdb_violations().is_empty());

    // get-drain reports the same drain, completed; the requester defaulted to $USER@hostname.
    let out = cli(&["get-drain", &addr, "--json"], 30);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["id"], "cli-1");
    assert_eq!(status["phase"], "DRAIN_PHASE_COMPLETED");
    assert!(
        status["requester"].as_str().unwrap().contains('@'),
        "{status}"
    );
}

#[test]
fn dry_run_prints_the_plan_and_leaves_the_node_schedulable() {
    let s = drain_scenario::rotation(Duration::from_millis(200), Duration::from_millis(500));
    let (agent, token) = agent(&s.kubeconfig);
    let out = cli(
        &[
            "drain",
            &agent.api.to_string(),
            "--token-file",
            &token,
            "--id",
            "dry",
            "--evict-unreplicated",
            "--dry-run",
        ],
        30,
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("NAMESPACE/NAME"), "{stdout}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"))
            .to_string()
    };
    assert!(row("apps/d0-0").contains("not-ready"));
    assert!(row(&format!("apps/{}", drain_scenario::LEADER)).contains("leader"));
    assert!(row(&format!("default/{}", drain_scenario::UNREPLICATED)).contains("regular"));
    assert!(
        stdout.contains("61 pods would be evicted; 3 stay on the node"),
        "{stdout}"
    );
    assert!(
        stdout.contains("kube-system/kube-proxy-node-a (mirror)"),
        "{stdout}"
    );
    assert_eq!(
        s.api.node(NODE).unwrap()["spec"]["unschedulable"],
        serde_json::Value::Null,
        "dry run cordoned"
    );
    assert_eq!(s.api.pods_on(NODE).len(), 64, "dry run evicted");
}

#[test]
fn a_drain_that_times_out_exits_1_naming_the_budget() {
    let stuck = drain_scenario::unsatisfiable();
    let (api, kubeconfig) = (&stuck.api, stuck.kubeconfig.clone());
    let (agent, token) = agent(&kubeconfig);
    let out = cli(
        &[
            "drain",
            &agent.api.to_string(),
            "--id",
            "stuck",
            "--timeout",
            "3s",
            "--token-file",
            &token,
        ],
        30,
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(stderr.contains("primary-pdb"), "{stderr}");
    // Without a terminal there is no bar, but the event lines are still printed.
    assert!(
        stdout.contains("blocked  db/primary-0 by primary-pdb"),
        "{stdout}"
    );
    assert_eq!(api.node(NODE).unwrap()["spec"]["unschedulable"], true);
}

#[test]
fn an_unreachable_agent_exits_69_and_a_bad_address_2() {
    let nobody = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["drain", &nobody, "--id", "x"],
        vec!["cordon", &nobody],
        vec!["get-drain", &nobody],
    ] {
        let out = cli(&args, 30);
        assert_eq!(
            out.status.code(),
            Some(69),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("unreachable"),
            "{}",
            text(&out.stderr)
        );
    }
    let out = cli(&["uncordon", "127.0.0.1"], 30);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = cli(&["drain", &nobody], 30);
    assert_eq!(out.status.code(), Some(2), "--id is required");
}

#[test]
fn cordon_and_uncordon_flip_unschedulable_and_send_the_token() {
    let s = drain_scenario::rotation(Duration::from_millis(200), Duration::from_millis(500));
    let (agent, token) = agent(&s.kubeconfig);
    let addr = format!("http://{}", agent.api);
    let token = token.as_str();

    // Without the token the agent refuses; the CLI says so and exits 1.
    let out = cli(&["cordon", &addr], 30);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Unauthenticated"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        s.api.node(NODE).unwrap()["spec"]["unschedulable"],
        serde_json::Value::Null
    );

    let out = cli(
        &[
            "cordon",
            &addr,
            "--reason",
            "kernel CVE",
            "--token-file",
            token,
        ],
        30,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("node node-a cordoned"));
    assert_eq!(s.api.node(NODE).unwrap()["spec"]["unschedulable"], true);

    let out = cli(&["uncordon", &addr, "--token-file", token], 30);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        s.api.node(NODE).unwrap()["spec"]["unschedulable"],
        serde_json::Value::Null
    );

    // An unreadable token file is a usage error, reported before connecting.
    let out = cli(&["cordon", &addr, "--token-file", "/nonexistent/token"], 30);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("/nonexistent/token"));
}

#[test]
fn a_stream_broken_by_an_agent_restart_exits_75_asking_to_reattach() {
    let stuck = drain_scenario::unsatisfiable();
    let (api, kubeconfig) = (&stuck.api, stuck.kubeconfig.clone());
    let (agent, token) = agent(&kubeconfig);
    let addr = agent.api.to_string();
    let out = std::thread::scope(|scope| {
        let follower = scope.spawn(|| {
            cli(
                &[
                    "drain",
                    &addr,
                    "--id",
                    "restarted",
                    "--timeout",
                    "120s",
                    "--token-file",
                    &token,
                ],
                60,
            )
        });
        nodekeeper_tests::wait_for(Duration::from_secs(30), "the drain evicting", || {
            api.node(NODE)?["metadata"]["annotations"]["nodekeeper.io/drain"]
                .as_str()?
                .contains("\"evicting\"")
                .then_some(())
        });
        agent.proc.signal("KILL");
        follower.join().expect("cli thread")
    });
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("re-attach"), "{stderr}");
}

/// The drain's driver on the Node record (`nodekeeper.io/drain`), once the drain is evicting.
fn evicting_driver(api: &nodekeeper_tests::fake_api::FakeApi) -> Option<String> {
    let record: serde_json::Value = serde_json::from_str(
        api.node(NODE)?["metadata"]["annotations"]["nodekeeper.io/drain"].as_str()?,
    )
    .ok()?;
    (record["phase"] == "evicting")
        .then(|| record["driver"].as_str().unwrap_or_default().to_string())
}

/// A short owner lease, so a stalled driver loses its drain in seconds.
const LEASE: &str = "  ownerLease: 3s\n";

/// A driver that stalls past the owner lease (SIGSTOP) loses the drain to the other agent
/// process on the node (a rollout's new pod). The drain goes on there, so the CLI following the
/// old process must say "re-attach" (75), not "failed" (1), and the drain must stay running on
/// the Node (the old process records no end); the old process then stands by and adopts the
/// drain back when the new one stalls in turn.
#[test]
fn a_driver_that_loses_the_drain_to_the_other_process_exits_75_asking_to_reattach() {
    let stuck = drain_scenario::unsatisfiable();
    let (api, kubeconfig) = (&stuck.api, stuck.kubeconfig.clone());
    let (old, token) = agent_with(
        &kubeconfig,
        Agent::builder().env("POD_NAME", "nodekeeper-old"),
        LEASE,
    );
    let addr = old.api.to_string();
    let out = std::thread::scope(|scope| {
        let follower = scope.spawn(|| {
            cli(
                &[
                    "drain",
                    &addr,
                    "--id",
                    "stalled",
                    "--timeout",
                    "120s",
                    "--token-file",
                    &token,
                ],
                90,
            )
        });
        nodekeeper_tests::wait_for(Duration::from_secs(30), "the old process driving", || {
            evicting_driver(api)
                .filter(|d| d.contains("nodekeeper-old"))
                .map(|_| ())
        });
        let (new, _) = agent_with(
            &kubeconfig,
            Agent::builder().env("POD_NAME", "nodekeeper-new"),
            LEASE,
        );
        old.proc.signal("STOP");
        nodekeeper_tests::wait_for(Duration::from_secs(30), "the new process adopting", || {
            evicting_driver(api)
                .filter(|d| d.contains("nodekeeper-new"))
                .map(|_| ())
        });
        old.proc.signal("CONT");
        let out = follower.join().expect("cli thread");
        // The old process now stands by: when the new one stalls in turn, it adopts back.
        new.proc.signal("STOP");
        nodekeeper_tests::wait_for(
            Duration::from_secs(30),
            "the old process adopting back",
            || {
                evicting_driver(api)
                    .filter(|d| d.contains("nodekeeper-old"))
                    .map(|_| ())
            },
        );
        new.proc.signal("CONT");
        out
    });
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("took over") && stderr.contains("re-attach"),
        "{stderr}"
    );
    // Losing the drain is no reason to uncordon: the node stays cordoned.
    assert_eq!(api.node(NODE).unwrap()["spec"]["unschedulable"], true);
}
