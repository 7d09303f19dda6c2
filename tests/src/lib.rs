//! Test harness for nodekeeper: starts the real agent binary, real peers (node_exporter,
//! Prometheus, Python gRPC clients) and cleans every one of them up on drop, even on failure.
//!
//! Tests that need a system tool call `require_tool`: without it they skip with a message, but
//! under `NODEKEEPER_REQUIRE_TOOLS=1` (set by `.ci/run`) a missing tool fails the test, so CI can
//! never pass by skipping.

pub mod cgroup;
pub mod drain_scenario;

pub mod dns_peers;
pub mod fake_api;
pub mod fake_imds;
pub mod kustomize;
pub mod loopdev;
pub mod memcg;
pub mod netns_pods;
pub mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Root of the workspace (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The agent binary: `NODEKEEPER_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NODEKEEPER_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    let bin = target.join("debug/nodekeeper");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p nodekeeper` first (or set NODEKEEPER_BIN)",
        bin.display()
    );
    // `cargo test -p nodekeeper-tests` does not rebuild another package's binary: a test would
    // silently run yesterday's agent (docs/decisions.md 14). Refuse a binary older than its sources.
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let root = workspace_root();
    let sources = [
        root.join("agent"),
        root.join("proto"),
        root.join("Cargo.lock"),
    ];
    if let (Some(built), Some((newest, path))) = (built, newest_source(&sources)) {
        assert!(
            newest <= built,
            "{} is older than {}: run `cargo build -p nodekeeper` first (or set NODEKEEPER_BIN)",
            bin.display(),
            path.display()
        );
    }
    bin
}

/// The most recently modified file under `paths` (files or directories; `target` skipped).
fn newest_source(paths: &[PathBuf]) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(modified) = meta.modified()
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, p));
        }
    }
    newest
}

/// True when `tool` is on PATH. Missing: skip (false) locally, panic in CI.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("NODEKEEPER_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!(
                "required tool {tool:?} is not installed (NODEKEEPER_REQUIRE_TOOLS=1): .ci/run installs it"
            );
        }
        eprintln!("SKIP: {tool} is not installed; install it (see .ci/run) to run this test");
    }
    found
}

/// True when running as root (namespaces, loop devices, mounts). Same skip/fail rule as tools.
pub fn require_root() -> bool {
    let root = nix_is_root();
    if !root {
        if std::env::var("NODEKEEPER_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("this test needs root (NODEKEEPER_REQUIRE_TOOLS=1)");
        }
        eprintln!("SKIP: this test needs root");
    }
    root
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind loopback")
        .local_addr()
        .expect("local addr")
        .port()
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A plain HTTP/1.0 GET: (status code, body). Enough for /metrics and health endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_get_with(addr, path, &[])
}

pub fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Polls `f` every 50 ms until it returns Some or `timeout` passes.
/// Runs a socket call again when a signal interrupted it. A read with a receive timeout
/// (SO_RCVTIMEO) is never restarted by the kernel (signal(7)), and in the one test binary other
/// tests' children send SIGCHLD to tokio's reaper, which can land on any thread: without this an
/// interrupted `recv_from` reads as "no answer".
pub fn uninterrupted<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

/// Raises this test process's soft limit on open files to its hard limit, once; the agents and
/// peers it spawns inherit it. A fresh Debian login (and so `sudo` from it) has a soft limit of
/// 1,024, below what the flood tests open (2,000 connections from one host): without this they
/// failed with EMFILE for a non-root user running test-all, while a root shell with 20,000 passed.
pub fn raise_open_files_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
            && soft < hard
            && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        {
            eprintln!("raising RLIMIT_NOFILE from {soft} to {hard}: {e}");
        }
    });
}

impl Proc {
    /// Spawns `cmd` with stdout+stderr to a log file in `dir`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        raise_open_files_limit();
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("create log");
        cmd.stdout(f.try_clone().expect("clone log"))
            .stderr(f)
            .stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill -{sig} {} failed", self.name);
    }

    /// Waits for exit; panics (after killing) when it does not exit in time.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent under test, on free loopback ports, standalone unless the test says otherwise.
pub struct Agent {
    pub proc: Proc,
    pub metrics: SocketAddr,
    pub api: SocketAddr,
    pub dir: tempfile::TempDir,
}

pub struct AgentBuilder {
    config_yaml: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// Connected mode: this kubeconfig and node name instead of `--standalone`.
    kubeconfig: Option<(PathBuf, String)>,
    /// Require `TEST_TOKEN` on mutating gRPC calls (`--api-token-file`).
    token: bool,
    /// A state dir that outlives one agent (restart tests); a fresh one per agent otherwise.
    state_dir: Option<PathBuf>,
    /// Wait for `/healthz` rather than `/readyz` (an agent expected to start degraded).
    live_only: bool,
    /// Keep the agent's own default for `api.auth.openReadOnly` (closed) instead of opening
    /// reads; see `start`.
    default_read_auth: bool,
    /// Start the agent inside this cgroup (its `cgroup.procs`), before it allocates anything.
    cgroup_procs: Option<PathBuf>,
    /// Runs in the child between fork and exec (e.g. a seccomp filter the agent inherits).
    pre_exec: Option<fn() -> std::io::Result<()>>,
}

/// How long a started process may take to answer 200 on its probe. Generous: a liveness wait,
/// not a performance claim (the 2-core CI machine runs ~20 tests at once); a process that dies is
/// reported at once.
pub const READY_WAIT: Duration = Duration::from_secs(60);

/// Polls `probe` on `metrics` until it answers 200; panics naming `what`, whether it exited or
/// timed out, and its log.
pub fn wait_ready(proc: &mut Proc, metrics: SocketAddr, probe: &str, what: &str) {
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = http_get(metrics, probe) {
            return;
        }
        if !proc.alive() {
            panic!(
                "{what} exited before {probe} answered 200; log:\n{}",
                proc.log_text()
            );
        }
        if started.elapsed() > READY_WAIT {
            panic!(
                "{what} did not answer 200 on {probe} within {:?}; log:\n{}",
                READY_WAIT,
                proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The bearer token of agents started `.with_token()`.
pub const TEST_TOKEN: &str = "nodekeeper-test-token-7f3a9c";

/// Wraps a gRPC request with `authorization: Bearer TEST_TOKEN`.
pub fn bearer<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {TEST_TOKEN}").parse().expect("ascii"),
    );
    req
}

impl Agent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder {
            config_yaml: String::new(),
            args: Vec::new(),
            envs: Vec::new(),
            kubeconfig: None,
            token: false,
            state_dir: None,
            live_only: false,
            default_read_auth: false,
            cgroup_procs: None,
            pre_exec: None,
        }
    }

    pub fn metrics_text(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "/metrics status; body:\n{body}");
        body
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.api)
    }
}

impl AgentBuilder {
    /// YAML config file contents (defaults when never called).
    pub fn config(mut self, yaml: &str) -> Self {
        self.config_yaml = yaml.to_string();
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.envs.push((k.to_string(), v.into()));
        self
    }

    /// Keeps state in `dir` (so a second agent finds the first one's state).
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    /// Mutating gRPC calls need `TEST_TOKEN` (send it with `bearer(...)`).
    /// `start` returns once `/healthz` answers 200, ready or not (a capability degraded on
    /// purpose keeps `/readyz` at 503).
    pub fn live_only(mut self) -> Self {
        self.live_only = true;
        self
    }

    /// Keeps the agent's default read authorization (reads need a credential) even when the
    /// config does not mention `openReadOnly`.
    pub fn default_read_auth(mut self) -> Self {
        self.default_read_auth = true;
        self
    }

    /// Runs the agent inside `group` from its first instruction (a shell joins the group, then
    /// execs the agent: same PID), so all its memory is charged there.
    pub fn in_cgroup(mut self, group: &memcg::MemoryCgroup) -> Self {
        self.cgroup_procs = Some(group.procs_file());
        self
    }

    pub fn with_token(mut self) -> Self {
        self.token = true;
        self
    }

    /// Runs connected to the API server in `kubeconfig` (e.g. the fake API), as node `node`.
    /// A fake API's admin kubeconfig is turned into the agent's own identity (its
    /// ServiceAccount bound to `node`), so the fake enforces the shipped RBAC on it.
    pub fn connected(mut self, kubeconfig: &Path, node: &str) -> Self {
        self.kubeconfig = Some((kubeconfig.to_path_buf(), node.to_string()));
        self
    }

    /// The config file: the test's YAML, with reads opened (`api.auth.openReadOnly: true`)
    /// unless the test set `openReadOnly` itself or asked for `default_read_auth`. The tests
    /// of every other area read metrics and node state anonymously, as agents did before
    /// issue #19 closed reads by default; tests/tests/it/auth.rs tests the closed default.
    fn config_text(&self) -> String {
        if self.default_read_auth || self.config_yaml.contains("openReadOnly") {
            return self.config_yaml.clone();
        }
        match nodekeeper::config::Config::from_yaml(&self.config_yaml) {
            Ok(mut c) => {
                c.api.auth.open_read_only = true;
                c.to_yaml()
            }
            // A config the agent will refuse: pass it on untouched so the agent names the
            // problem.
            Err(_) => self.config_yaml.clone(),
        }
    }

    /// Starts the agent and waits until /readyz answers 200.
    /// `hook` runs in the agent's process before it execs: async-signal-safe calls only
    /// (a seccomp filter, as a container runtime's profile).
    pub fn pre_exec(mut self, hook: fn() -> std::io::Result<()>) -> Self {
        self.pre_exec = Some(hook);
        self
    }

    pub fn start(self) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, self.config_text()).expect("write config");
        let metrics = loopback(free_port());
        let api = loopback(free_port());
        let mut cmd = match &self.cgroup_procs {
            None => Command::new(agent_bin()),
            Some(procs) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
                    .arg(procs)
                    .arg(agent_bin());
                sh
            }
        };
        cmd.arg("run").arg("--config").arg(&config);
        match &self.kubeconfig {
            None => {
                cmd.arg("--standalone").env_remove("KUBECONFIG");
            }
            Some((kubeconfig, node)) => {
                let as_agent = dir.path().join("kubeconfig");
                fake_api::agent_kubeconfig(kubeconfig, node, &as_agent);
                cmd.env("KUBECONFIG", as_agent).arg("--node-name").arg(node);
            }
        }
        if self.token {
            let token_file = dir.path().join("api-token");
            std::fs::write(&token_file, TEST_TOKEN).expect("write token");
            cmd.arg("--api-token-file").arg(token_file);
        }
        cmd.arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--api-listen")
            .arg(api.to_string())
            .arg("--state-dir")
            .arg(
                self.state_dir
                    .clone()
                    .unwrap_or_else(|| dir.path().join("state")),
            )
            .args(&self.args)
            .env("NODEKEEPER_LOG", "info,nodekeeper=debug");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(hook) = self.pre_exec {
            // SAFETY: the hook is documented to make async-signal-safe calls only.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, hook);
            }
        }
        let mut proc = Proc::spawn("nodekeeper", cmd, dir.path());
        let probe = if self.live_only {
            "/healthz"
        } else {
            "/readyz"
        };
        wait_ready(&mut proc, metrics, probe, "the agent");
        Agent {
            proc,
            metrics,
            api,
            dir,
        }
    }
}

/// `promtool check metrics` accepts `text` with no error and no warning.
pub fn assert_promtool_clean(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool failed: {report}");
    assert!(report.trim().is_empty(), "promtool warnings: {report}");
}

/// Parses Prometheus text into (metric name with labels as written, value) samples.
pub fn parse_samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the first sample whose series starts with `name` and contains every `label="value"`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse_samples(text).into_iter().find_map(|(series, v)| {
        let (n, rest) = series.split_once('{').unwrap_or((&series, ""));
        (n == name
            && labels
                .iter()
                .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\""))))
        .then_some(v)
    })
}

/// Python interpreter for the grpcio checks: `NODEKEEPER_PYTHON` or `python3`.
pub fn python() -> String {
    std::env::var("NODEKEEPER_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// True when the Python modules are importable (same skip/fail rule as tools).
pub fn require_python_modules(modules: &[&str]) -> bool {
    if !require_tool(&python()) {
        return false;
    }
    let code = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let ok = Command::new(python())
        .args(["-c", &code])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("NODEKEEPER_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!(
                "Python modules {modules:?} missing (NODEKEEPER_REQUIRE_TOOLS=1): .ci/run installs them"
            );
        }
        eprintln!("SKIP: Python modules {modules:?} are not installed");
    }
    ok
}

#[cfg(test)]
mod agent_bin_tests {
    use super::newest_source;

    #[test]
    fn the_newest_source_is_found_and_target_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("src/old.rs");
        let new = dir.path().join("src/deep/new.rs");
        let built = dir.path().join("target/debug/nodekeeper");
        for p in [&old, &new, &built] {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "x").unwrap();
        }
        let t = |secs| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let set = |p: &std::path::Path, secs| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t(secs))
                .unwrap()
        };
        set(&old, 1_000);
        set(&new, 2_000);
        set(&built, 3_000);
        let (when, path) = newest_source(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!((when, path), (t(2_000), new));
    }
}
