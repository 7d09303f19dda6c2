//! bench_drain: the patching-rotation scenario (`drain_scenario::rotation`) drained by
//! `kubectl drain` and by nodekeeper against the fake Kubernetes API, in the same run with the
//! same controller delays, on the fake's harder settings (issue #16): PDB status written by a
//! lagging disruption controller and pods that take their grace period to go. Reports, per tool, the median over the runs of: wall time until
//! node-a holds only its DaemonSet and mirror pods, API requests by verb, and PodDisruptionBudget
//! minimum violations (must be 0 for both); plus the ratio nodekeeper / kubectl. No figure is
//! ever asserted.
//!
//! - kubectl: `kubectl drain node-a --ignore-daemonsets --delete-emptydir-data --force
//!   --timeout=10m`, untuned (it retries a refused eviction every 5 s: its real behaviour).
//!   Requests counted: every request from its start to its exit (discovery and its GET polling
//!   for deletions included).
//! - nodekeeper: an agent connected as node-a with the default drain config (only metrics off,
//!   and a bearer token because mutating RPCs need a credential), already running as it is on a
//!   real node (its pod watch has listed before the drain starts); the drain is `nodekeeper drain ADDR --evict-unreplicated --delete-emptydir-data
//!   --timeout 10m --json`. Wall time runs from the CLI's start. Requests counted: everything the
//!   agent sent from its own start-up (the LIST+WATCH of its node and pods, which replace polling)
//!   until the CLI exits, including its state-annotation PATCHes and Event POSTs.
//!
//! Usage: bench_drain [--write-docs]
//!   --write-docs  replace the section between the drain-bench markers in docs/benchmarks.md
//!                 (only with the default delays)
//! Environment:
//!   BENCH_RUNS       runs per tool, median reported (default 3)
//!   BENCH_REPLACE_MS ReplicaSet controller: delay before an evicted pod is replaced (default 200)
//!   BENCH_READY_MS   delay before a replacement becomes Ready (default 1000)
//!   BENCH_PDB_LAG_MS disruption controller: delay before PDB status follows a change (default 300)
//!   BENCH_GRACE_S    every pod's terminationGracePeriodSeconds (default 5)
//!   BENCH_GRACE_SECOND_MS how long one grace-period second lasts in the fake (default 100)
//!   NODEKEEPER_BIN   agent binary (default: the workspace's debug build)

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nodekeeper_tests::drain_scenario::{self, NODE, Scenario};
use nodekeeper_tests::fake_api::{FakeApi, RecordedRequest};
use nodekeeper_tests::{Agent, agent_bin, workspace_root};

const DEFAULT_RUNS: usize = 3;
/// A ReplicaSet controller on a healthy cluster creates the replacement within a few hundred ms.
const DEFAULT_REPLACE_MS: u64 = 200;
/// Scheduling, image present, a readiness probe passing on its first try: about a second.
const DEFAULT_READY_MS: u64 = 1000;
/// A disruption controller a little behind, as on a busy control plane (the value the 60-pod
/// fault test uses): evictions that race it are caught by the fake's audit.
const DEFAULT_PDB_LAG_MS: u64 = 300;
/// Pods that take a grace period to go, so both tools' waiting paths run.
const DEFAULT_GRACE_S: u64 = 5;
/// One grace second scaled down to 100 ms: a 5 s grace period lasts 0.5 s.
const DEFAULT_GRACE_SECOND_MS: u64 = 100;
/// Both tools get this deadline; the bench gives up on a run a minute after it.
const DRAIN_TIMEOUT: &str = "10m";
const RUN_LIMIT: Duration = Duration::from_secs(11 * 60);
/// How often the bench checks whether node-a is empty: the resolution of the wall times.
const POLL: Duration = Duration::from_millis(20);
const START: &str = "<!-- drain-bench:start -->";
const END: &str = "<!-- drain-bench:end -->";
const CMD: &str =
    "cargo build -p nodekeeper && cargo run -p nodekeeper-tests --bin bench_drain -- --write-docs";

/// One run's figures.
#[derive(Debug, Clone, Default)]
struct Run {
    seconds: f64,
    get: usize,
    list: usize,
    watch: usize,
    patch: usize,
    eviction: usize,
    refused: usize,
    other: usize,
    startup: usize,
    violations: usize,
}

impl Run {
    fn total(&self) -> usize {
        self.get + self.list + self.watch + self.patch + self.eviction + self.other
    }
}

/// What a recorded request was, by verb.
fn classify(r: &RecordedRequest, run: &mut Run) {
    let segs: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", _, rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => &[],
    };
    // Drop `namespaces/NS` in front of a namespaced resource.
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        r => r,
    };
    let watch = r
        .query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    match (r.method.as_str(), rest.len()) {
        ("POST", _) if r.path.ends_with("/eviction") => {
            run.eviction += 1;
            if r.status == 429 {
                run.refused += 1;
            }
        }
        // Discovery (/api, /apis/GROUP/VERSION, /version): no resource segment.
        ("GET", 0) => run.other += 1,
        ("GET", 1) if watch => run.watch += 1,
        ("GET", 1) => run.list += 1,
        ("GET", _) => run.get += 1,
        ("PATCH", _) => run.patch += 1,
        _ => run.other += 1,
    }
}

fn env_num(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name}={v:?} is not a positive integer")),
    }
}

/// The fake API's settings for one run.
#[derive(Debug, Clone, Copy)]
struct Fake {
    replace: Duration,
    ready: Duration,
    pdb_lag: Duration,
    grace_s: i64,
    grace_second: Duration,
}

impl Fake {
    fn scenario(&self) -> Scenario {
        drain_scenario::rotation_on(
            FakeApi::builder()
                .replace_delay(self.replace)
                .ready_delay(self.ready)
                .pdb_lag(self.pdb_lag)
                .grace_second(self.grace_second),
            Some(self.grace_s),
        )
    }
}

fn is_empty(s: &Scenario) -> bool {
    let mut left = s.api.pods_on(NODE);
    left.sort();
    left == drain_scenario::expected_remaining()
}

/// Spawns `cmd`, polls until node-a is empty and the process has exited; the wall time to empty,
/// the index of the last request sent before the exit, and when the process started.
fn measure(s: &Scenario, mut cmd: Command, log: &Path) -> Result<(f64, usize, Instant), String> {
    let f = std::fs::File::create(log).map_err(|e| e.to_string())?;
    cmd.stdout(f.try_clone().map_err(|e| e.to_string())?)
        .stderr(f)
        .stdin(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let mut empty_at = None;
    loop {
        if empty_at.is_none() && is_empty(s) {
            empty_at = Some(start.elapsed());
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let end = s.api.requests().len();
            let logged = std::fs::read_to_string(log).unwrap_or_default();
            if !status.success() {
                return Err(format!("exited with {status}; output:\n{logged}"));
            }
            if empty_at.is_none() && is_empty(s) {
                empty_at = Some(start.elapsed());
            }
            let Some(t) = empty_at else {
                return Err(format!(
                    "exited 0 but node-a still holds {:?}; output:\n{logged}",
                    s.api.pods_on(NODE)
                ));
            };
            return Ok((t.as_secs_f64(), end, start));
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not finish within {RUN_LIMIT:?}"));
        }
        std::thread::sleep(POLL);
    }
}

/// From the request log: per budget (the scenario's `dN` apps, one budget each), when its first
/// and last eviction was admitted and how many were refused, in seconds from the tool's start.
/// Shows whether a tool works the budgets in parallel or one after another.
fn budget_timeline(requests: &[RecordedRequest], start: Instant) -> String {
    use std::collections::BTreeMap;
    // app -> (first admitted, last admitted, admitted, refused)
    let mut by_app: BTreeMap<String, (f64, f64, usize, usize)> = BTreeMap::new();
    for r in requests.iter().filter(|r| r.path.ends_with("/eviction")) {
        let pod = r.path.rsplit('/').nth(1).unwrap_or_default();
        let Some((app, _)) = pod.rsplit_once('-') else {
            continue;
        };
        let t = r.at.saturating_duration_since(start).as_secs_f64();
        let e = by_app
            .entry(app.to_string())
            .or_insert((f64::MAX, 0.0, 0, 0));
        if r.status == 429 {
            e.3 += 1;
        } else if r.status < 300 {
            e.0 = e.0.min(t);
            e.1 = e.1.max(t);
            e.2 += 1;
        }
    }
    let mut out = String::from(
        "bench_drain:   budget | first admitted s | last admitted s | admitted | 429\n",
    );
    for (app, (first, last, admitted, refused)) in by_app.iter().filter(|(a, _)| a.starts_with('d'))
    {
        out.push_str(&format!(
            "bench_drain:   {app} | {first:.1} | {last:.1} | {admitted} | {refused}\n"
        ));
    }
    out
}

fn tally(s: &Scenario, from: usize, to: usize, seconds: f64) -> Run {
    let mut run = Run {
        seconds,
        violations: s.api.pdb_violations().len(),
        ..Default::default()
    };
    for r in &s.api.requests()[from..to] {
        classify(r, &mut run);
    }
    run
}

fn kubectl_run(fake: Fake) -> Result<Run, String> {
    let s = fake.scenario();
    let mut cmd = Command::new("kubectl");
    cmd.args([
        "drain",
        NODE,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        &format!("--timeout={DRAIN_TIMEOUT}"),
        "--kubeconfig",
    ])
    .arg(&s.kubeconfig)
    // A fresh HOME: no discovery cache from an earlier run, nothing written to the real one.
    .env("HOME", s.dir.path());
    let from = s.api.requests().len();
    let (seconds, to, start) = measure(&s, cmd, &s.dir.path().join("kubectl.log"))
        .map_err(|e| format!("kubectl drain: {e}"))?;
    eprint!("{}", budget_timeline(&s.api.requests()[from..to], start));
    Ok(tally(&s, from, to, seconds))
}

fn nodekeeper_run(fake: Fake) -> Result<Run, String> {
    let s = fake.scenario();
    let token = s.dir.path().join("token");
    std::fs::write(&token, "bench-token\n").map_err(|e| e.to_string())?;
    let from = s.api.requests().len();
    let agent = Agent::builder()
        .config(&format!(
            "metrics:\n  enabled: false\napi:\n  auth:\n    tokenFile: {}\n",
            token.display()
        ))
        .connected(&s.kubeconfig, NODE)
        .start();
    // Already running as on a real node: its pod watch has listed (kube-runtime opens the
    // watch only after its LIST filled the store).
    let synced = Instant::now();
    while !s
        .api
        .requests()
        .iter()
        .any(|r| r.path == "/api/v1/pods" && r.query.contains("watch=true"))
    {
        if synced.elapsed() > Duration::from_secs(60) {
            return Err("the agent's pod watch did not open within 60 s".into());
        }
        std::thread::sleep(POLL);
    }
    let drain_from = s.api.requests().len();
    let mut cmd = Command::new(agent_bin());
    cmd.args([
        "drain",
        &agent.api.to_string(),
        "--id",
        "bench",
        "--evict-unreplicated",
        "--delete-emptydir-data",
        "--timeout",
        DRAIN_TIMEOUT,
        "--json",
        "--token-file",
    ])
    .arg(&token);
    let (seconds, to, start) = measure(&s, cmd, &s.dir.path().join("cli.log")).map_err(|e| {
        format!(
            "nodekeeper drain: {e}\nagent log:\n{}",
            agent.proc.log_text()
        )
    })?;
    eprint!(
        "{}",
        budget_timeline(&s.api.requests()[drain_from..to], start)
    );
    let mut run = tally(&s, from, to, seconds);
    run.startup = drain_from - from;
    Ok(run)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median of each column (violations: the worst run, which must be 0).
fn summary(runs: &[Run]) -> Vec<f64> {
    let col = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    vec![
        col(|r| r.seconds),
        col(|r| r.total() as f64),
        col(|r| r.get as f64),
        col(|r| r.list as f64),
        col(|r| r.watch as f64),
        col(|r| r.patch as f64),
        col(|r| r.eviction as f64),
        col(|r| r.refused as f64),
        col(|r| r.other as f64),
        runs.iter().map(|r| r.violations).max().unwrap_or(0) as f64,
    ]
}

fn cell(i: usize, v: f64) -> String {
    if i == 0 {
        format!("{v:.2}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn table(kubectl: &[Run], nodekeeper: &[Run]) -> String {
    let (k, n) = (summary(kubectl), summary(nodekeeper));
    let mut out = String::new();
    out.push_str(
        "| tool | wall time to empty, s | API requests | GET | LIST | WATCH | PATCH | POST eviction | of which 429 | other | PDB violations |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (name, row) in [("kubectl drain", &k), ("nodekeeper", &n)] {
        let cells: Vec<String> = row.iter().enumerate().map(|(i, v)| cell(i, *v)).collect();
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    }
    let ratios: Vec<String> = k
        .iter()
        .zip(&n)
        .take(k.len() - 1)
        .map(|(k, n)| {
            if *k == 0.0 {
                "-".to_string()
            } else {
                format!("{:.2}", n / k)
            }
        })
        .collect();
    out.push_str(&format!(
        "| ratio nodekeeper/kubectl | {} | - |\n",
        ratios.join(" | ")
    ));
    out
}

fn tool_version(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, kernel {}", kernel.trim())
}

/// The 1-minute load average: how busy the shared machine was (the bench never pins or waits
/// for an idle machine, so the report says how loaded it was).
fn load_1min() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn write_docs(section: &str) -> Result<(), String> {
    let path = workspace_root().join("docs/benchmarks.md");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (Some(a), Some(b)) = (text.find(START), text.find(END)) else {
        return Err(format!(
            "{} has no {START} ... {END} markers",
            path.display()
        ));
    };
    let updated = format!("{}{START}\n{section}{}", &text[..a], &text[b..]);
    std::fs::write(&path, updated).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    let mut write = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--write-docs" => write = true,
            "-h" | "--help" => {
                println!(
                    "usage: bench_drain [--write-docs]; see the module doc in tests/src/bin/bench_drain.rs"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("bench_drain: unknown argument {other:?} (see --help)");
                return ExitCode::from(64);
            }
        }
    }
    match run(write) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_drain: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(write: bool) -> Result<(), String> {
    let runs = env_num("BENCH_RUNS", DEFAULT_RUNS as u64)? as usize;
    let replace_ms = env_num("BENCH_REPLACE_MS", DEFAULT_REPLACE_MS)?;
    let ready_ms = env_num("BENCH_READY_MS", DEFAULT_READY_MS)?;
    let pdb_lag_ms = env_num("BENCH_PDB_LAG_MS", DEFAULT_PDB_LAG_MS)?;
    let grace_s = env_num("BENCH_GRACE_S", DEFAULT_GRACE_S)?;
    let grace_second_ms = env_num("BENCH_GRACE_SECOND_MS", DEFAULT_GRACE_SECOND_MS)?;
    let settings = (replace_ms, ready_ms, pdb_lag_ms, grace_s, grace_second_ms);
    let defaults = (
        DEFAULT_REPLACE_MS,
        DEFAULT_READY_MS,
        DEFAULT_PDB_LAG_MS,
        DEFAULT_GRACE_S,
        DEFAULT_GRACE_SECOND_MS,
    );
    if write && settings != defaults {
        return Err("--write-docs needs the default BENCH_* delays".into());
    }
    let fake = Fake {
        replace: Duration::from_millis(replace_ms),
        ready: Duration::from_millis(ready_ms),
        pdb_lag: Duration::from_millis(pdb_lag_ms),
        grace_s: grace_s as i64,
        grace_second: Duration::from_millis(grace_second_ms),
    };
    let load_before = load_1min();
    let (mut k, mut n) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        // Alternate which tool goes first, so a drift of the machine's load hits both alike.
        let order = if i % 2 == 1 { [0, 1] } else { [1, 0] };
        for tool in order {
            if tool == 0 {
                eprintln!("bench_drain: run {i}/{runs}: kubectl drain");
                let r = kubectl_run(fake)?;
                eprintln!("bench_drain:   {r:?}");
                k.push(r);
            } else {
                eprintln!("bench_drain: run {i}/{runs}: nodekeeper drain");
                let r = nodekeeper_run(fake)?;
                eprintln!("bench_drain:   {r:?}");
                n.push(r);
            }
        }
    }
    let startup = median(n.iter().map(|r| r.startup as f64).collect());
    let mut section = format!("<!-- generated by: {CMD} -->\n\n");
    section.push_str(&format!(
        "**Rotation scenario drained by kubectl and by nodekeeper** (median of {runs} runs each; \
         replace {replace_ms} ms, ready {ready_ms} ms, PDB status lag {pdb_lag_ms} ms, grace \
         period {grace_s} s of {grace_second_ms} ms each)\n\n"
    ));
    section.push_str(&table(&k, &n));
    section.push_str(&format!(
        "\nnodekeeper's requests are counted from the agent's own start-up ({startup:.0} of them \
         before the drain started), so they include the LIST and WATCH of its pod watch, the GET that \
         proves each evicted pod gone (a 404 or another UID; the watch only says when to look), \
         its state-annotation PATCHes on the Node (at phase changes, at most every 5 s while \
         evicting, and the owner heartbeat) and its Event POSTs (one DrainBlocked per budget); \
         kubectl's include its discovery and its GET polling for deletions. \"other\": \
         discovery, Event POSTs, PUT, DELETE. PDB violations: audit samples below a budget's \
         minimum, worst run.\n"
    ));
    section.push_str(&format!(
        "Peers: {} ({}); {} (default drain config, metrics off, `{}`).\n",
        tool_version(Command::new("kubectl").args(["version", "--client"])),
        "untuned: retries a 429 every 5 s",
        tool_version(Command::new(agent_bin()).arg("version")),
        agent_bin()
            .strip_prefix(workspace_root())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| agent_bin().display().to_string()),
    ));
    section.push_str(&format!(
        "Machine: {}; 1-minute load average {load_before} at the start, {} at the end. Date: {}.\n\n",
        machine(),
        load_1min(),
        jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC")
    ));
    print!("{section}");
    if write {
        write_docs(&section)?;
        eprintln!("bench_drain: wrote docs/benchmarks.md");
    }
    Ok(())
}
