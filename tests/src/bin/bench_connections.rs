//! bench_connections: one full per-pod connection census by nodekeeper against `ss -tan` run in
//! each namespace through `ip netns exec` (what a script or a sidecar-less exporter would do),
//! and against nodekeeper's own /proc/net/tcp parser, over the same sockets in the same run.
//!
//! Setup: N network namespaces (`nkbench-PID-I`, loopback up), each with a holder process (this
//! binary re-executed with `--hold`) that enters the namespace and opens P loopback
//! client/server pairs, i.e. 2P established sockets, plus one listener. The holders stand in for
//! the pods: the census reads `/proc/HOLDER_PID/ns/net`, as the agent does for a pod. (The fds
//! live in one process per namespace because a container without CAP_SYS_RESOURCE cannot raise
//! RLIMIT_NOFILE past its hard limit, often 20k, below the 100k sockets of the default run.)
//!
//! Each run times, in an order that rotates from run to run:
//! - census: `read_namespaces(paths, SockDiag)` (one thread setns()ing into each namespace in
//!   turn, a netlink inet_diag dump with tcp_info) then `summarize` of each reading, in this
//!   process; CPU time from getrusage(RUSAGE_SELF) (the census thread included).
//! - procfs: the same with `SourcePreference::Procfs` (/proc/thread-self/net/tcp{,6}).
//! - one pass (issue #18): `nodekeeper::metrics::connections::bpf`, a BPF program that walks the node's
//!   shared TCP hash tables once and tags each socket with its namespace (plus one walk inside
//!   each namespace that has a table of its own), then the same small per-namespace files and
//!   `summarize`; CPU time from getrusage(RUSAGE_SELF) (in-kernel BPF time is the reading
//!   thread's system time). Loaded and verified once before the runs (load time reported
//!   apart). When BPF is not allowed the row is the sock_diag fallback, labelled so.
//! - ss loop: `ip netns exec NAME ss -tan` for each namespace in turn, output read in full; CPU
//!   time from getrusage(RUSAGE_CHILDREN) (ip, which execs ss).
//!
//! Reports the median over the runs of wall time and CPU time, CPU per 1k sockets and the
//! ratios to the ss loop. No figure is asserted; the bench only fails when a reader does not
//! find every socket. Namespaces and holders are removed on exit, on panic and on
//! SIGINT/SIGTERM/SIGHUP.
//!
//! Every namespace shares the kernel's one TCP established hash table by default, and a
//! sock_diag dump or a /proc/net/tcp read walks all of it, sockets of every other namespace
//! included: each reader's cost per namespace grows with the sockets of the whole node.
//! `--child-ehash N` creates the namespaces from a parent namespace whose
//! `net.ipv4.tcp_child_ehash_entries` is N (the host's setting is never changed), so they are
//! created with a TCP established hash table of their own.
//!
//! Usage: bench_connections [--namespaces N] [--pairs P] [--runs R] [--child-ehash N] [--skip-procfs] [--write-docs]
//!   --namespaces N  network namespaces (default 100)
//!   --pairs P       loopback client/server pairs per namespace (default 500: 1,000 sockets)
//!   --runs R        runs, median reported (default 5)
//!   --child-ehash N per-namespace established hash tables of N buckets (default: shared table)
//!   --skip-procfs   leave out the /proc/net/tcp parser (the slowest reader; not in issue #18's
//!                   comparison)
//!   --write-docs    replace the section between the connections-bench markers in
//!                   docs/benchmarks.md (only with the default sizes)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};
use nix::sys::signal::{SigSet, Signal};
use nodekeeper::metrics::connections::bpf::{OnePass, OnePassError, census_with_fallback};
use nodekeeper::metrics::connections::{
    CensusError, ConnectionsConfig, NetnsReading, SourcePreference, read_namespaces, summarize,
};
use nodekeeper_tests::workspace_root;

const DEFAULT_NAMESPACES: usize = 100;
const DEFAULT_PAIRS: usize = 500;
const DEFAULT_RUNS: usize = 5;
/// Holders on a busy 2-core VM: 100 of them open 100k sockets within this.
const HOLDER_READY_TIMEOUT: Duration = Duration::from_secs(60);
const START: &str = "<!-- connections-bench:start -->";
const END: &str = "<!-- connections-bench:end -->";
const CMD: &str = "cargo run --release -p nodekeeper-tests --bin bench_connections -- --write-docs";
const NS_PREFIX: &str = "nkbench-";
/// Census, procfs parser, one pass, ss loop.
const READERS: usize = 4;
const ONE_PASS_ROW: &str = "one-pass BPF census (one walk of the node's tables)";

/// Namespaces created so far, deleted by `cleanup` (Drop, panic or a signal).
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

// === holder (child) mode ===

/// `--hold NETNS_PATH PAIRS`: enter the namespace, open PAIRS loopback pairs, print "ready",
/// keep them until stdin closes.
fn hold(netns: &str, pairs: usize) -> Result<(), String> {
    let f = std::fs::File::open(netns).map_err(|e| format!("{netns}: {e}"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {netns}: {e}"))?;
    let need = (2 * pairs + 64) as u64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if soft < need {
        setrlimit(Resource::RLIMIT_NOFILE, need.min(hard), hard).map_err(|e| e.to_string())?;
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut keep: Vec<TcpStream> = Vec::with_capacity(2 * pairs);
    for i in 0..pairs {
        let c = TcpStream::connect(addr).map_err(|e| format!("connect #{i}: {e}"))?;
        let (s, _) = listener.accept().map_err(|e| format!("accept #{i}: {e}"))?;
        keep.push(c);
        keep.push(s);
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(keep);
    Ok(())
}

// === setup and cleanup ===

struct Holder {
    child: Child,
    ns: String,
}

/// Everything the bench created; removed on drop (also when unwinding from a panic).
struct World {
    holders: Vec<Holder>,
}

impl Drop for World {
    fn drop(&mut self) {
        for h in &mut self.holders {
            drop(h.child.stdin.take());
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
        cleanup();
    }
}

fn cleanup() {
    let names: Vec<String> =
        std::mem::take(&mut *NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()));
    for n in names {
        let _ = Command::new("ip")
            .args(["netns", "del", &n])
            .stderr(Stdio::null())
            .status();
    }
}

/// Blocks the termination signals in this thread (and so in every thread spawned after it) and
/// handles them on a dedicated thread: delete the namespaces, exit 130.
fn install_signal_cleanup() -> Result<(), String> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| format!("sigprocmask: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                eprintln!("bench_connections: {sig:?}: removing the namespaces");
                cleanup();
                std::process::exit(130);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn setup(namespaces: usize, pairs: usize, child_ehash: Option<usize>) -> Result<World, String> {
    let mut world = World {
        holders: Vec::new(),
    };
    // --child-ehash: the setting is per namespace and applies to namespaces created from it, so
    // the pod namespaces are created from inside a parent namespace of our own that carries it;
    // the host's own setting is never touched.
    let parent = match child_ehash {
        Some(n) => {
            let parent = format!("{NS_PREFIX}{}-parent", std::process::id());
            ip(&["netns", "add", &parent])?;
            NAMESPACES.lock().unwrap().push(parent.clone());
            ip(&[
                "netns",
                "exec",
                &parent,
                "sysctl",
                "-qw",
                &format!("net.ipv4.tcp_child_ehash_entries={n}"),
            ])
            .map_err(|e| format!("tcp_child_ehash_entries (kernel older than 6.1?): {e}"))?;
            Some(parent)
        }
        None => None,
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    for i in 0..namespaces {
        let name = format!("{NS_PREFIX}{}-{i}", std::process::id());
        match &parent {
            None => ip(&["netns", "add", &name])?,
            Some(parent) => {
                let status = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{parent}"))
                    .args(["ip", "netns", "add", &name])
                    .status()
                    .map_err(|e| format!("nsenter: {e}"))?;
                if !status.success() {
                    return Err(format!("nsenter ... ip netns add {name}: {status}"));
                }
            }
        }
        NAMESPACES.lock().unwrap().push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        let child = Command::new(&exe)
            .args(["--hold", &format!("/run/netns/{name}"), &pairs.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn holder: {e}"))?;
        world.holders.push(Holder { child, ns: name });
    }
    // Wait for every holder's "ready" (they build their sockets in parallel).
    let deadline = Instant::now() + HOLDER_READY_TIMEOUT;
    for h in &mut world.holders {
        let out = h.child.stdout.take().ok_or("holder stdout")?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            return Err(format!("holder in {} did not get ready: {line:?}", h.ns));
        }
        if Instant::now() > deadline {
            return Err(format!("holders not ready within {HOLDER_READY_TIMEOUT:?}"));
        }
    }
    Ok(world)
}

// === measurement ===

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    wall: f64,
    cpu: f64,
    /// The system (in-kernel) part of `cpu`: the same in a debug and a release build.
    sys: f64,
    /// Sockets the reader found (established, from its own output).
    established: u64,
}

/// (user + system, system) CPU seconds.
fn cpu_seconds(who: UsageWho) -> (f64, f64) {
    let u = getrusage(who).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    (t(u.user_time()) + t(u.system_time()), t(u.system_time()))
}

fn census(paths: &[PathBuf], pref: SourcePreference) -> Result<Sample, String> {
    timed_census(paths, &format!("{pref:?}"), |p| read_namespaces(p, pref))
}

/// The one-pass census, or the sock_diag fallback when BPF could not be loaded.
fn one_pass_census(
    paths: &[PathBuf],
    one_pass: &mut Result<OnePass, OnePassError>,
) -> Result<Sample, String> {
    let (loaded, load_error) = match one_pass {
        Ok(o) => (Some(o), None),
        Err(e) => (None, Some(&*e)),
    };
    let mut fell_back = None;
    let sample = timed_census(paths, "one pass", |p| {
        let (readings, why) = census_with_fallback(loaded, load_error, p);
        fell_back = why;
        readings
    })?;
    match fell_back {
        // Loaded but a walk failed (ring buffer full, ...): not a one-pass figure.
        Some(why) if one_pass.is_ok() => Err(format!("one-pass census failed: {why}")),
        _ => Ok(sample),
    }
}

fn timed_census(
    paths: &[PathBuf],
    name: &str,
    read: impl FnOnce(&[PathBuf]) -> Vec<Result<NetnsReading, CensusError>>,
) -> Result<Sample, String> {
    let config = ConnectionsConfig::default();
    let cpu0 = cpu_seconds(UsageWho::RUSAGE_SELF);
    let t0 = Instant::now();
    let readings = read(paths);
    let mut established = 0;
    for r in &readings {
        let r = r.as_ref().map_err(|e| format!("{name}: {e}"))?;
        established += summarize(r, None, &config).established;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(UsageWho::RUSAGE_SELF);
    Ok(Sample {
        wall,
        cpu: cpu1.0 - cpu0.0,
        sys: cpu1.1 - cpu0.1,
        established,
    })
}

fn ss_loop(names: &[String]) -> Result<Sample, String> {
    let cpu0 = cpu_seconds(UsageWho::RUSAGE_CHILDREN);
    let t0 = Instant::now();
    let mut established = 0;
    for n in names {
        let out = Command::new("ip")
            .args(["netns", "exec", n, "ss", "-tan"])
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("ip netns exec {n} ss: {e}"))?;
        if !out.status.success() {
            return Err(format!("ip netns exec {n} ss -tan: {}", out.status));
        }
        established += out
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| l.starts_with(b"ESTAB"))
            .count() as u64;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(UsageWho::RUSAGE_CHILDREN);
    Ok(Sample {
        wall,
        cpu: cpu1.0 - cpu0.0,
        sys: cpu1.1 - cpu0.1,
        established,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// (busy, total) jiffies of the whole machine from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

// === report ===

struct Row {
    name: &'static str,
    wall: f64,
    cpu: f64,
    sys: f64,
}

fn table(rows: &[Row], sockets: u64) -> String {
    let ss = rows.last().expect("ss row");
    let mut out = String::from(
        "| reader | wall time, ms | CPU time, ms | CPU per 1k sockets, ms | wall time ratio (reader/ss loop) | CPU ratio (reader/ss loop) | ss loop / reader, wall | in-kernel (system) CPU, ms | ss loop / reader, CPU |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let per_k = r.cpu * 1e3 / (sockets as f64 / 1e3);
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.3} | {:.3} | {:.3} | {:.1}x | {:.1} | {:.1}x |\n",
            r.name,
            r.wall * 1e3,
            r.cpu * 1e3,
            per_k,
            r.wall / ss.wall,
            if ss.cpu > 0.0 { r.cpu / ss.cpu } else { 0.0 },
            ss.wall / r.wall,
            r.sys * 1e3,
            if r.cpu > 0.0 { ss.cpu / r.cpu } else { 0.0 },
        ));
    }
    out
}

fn tool_version(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs ({model}), kernel {}", kernel.trim())
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

struct Args {
    namespaces: usize,
    pairs: usize,
    runs: usize,
    child_ehash: Option<usize>,
    skip_procfs: bool,
    write: bool,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        namespaces: DEFAULT_NAMESPACES,
        pairs: DEFAULT_PAIRS,
        runs: DEFAULT_RUNS,
        child_ehash: None,
        skip_procfs: false,
        write: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match arg.as_str() {
            "--namespaces" => a.namespaces = num("--namespaces")?,
            "--pairs" => a.pairs = num("--pairs")?,
            "--runs" => a.runs = num("--runs")?,
            "--child-ehash" => a.child_ehash = Some(num("--child-ehash")?),
            "--write-docs" => a.write = true,
            "--skip-procfs" => a.skip_procfs = true,
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if a.write
        && ((a.namespaces, a.pairs) != (DEFAULT_NAMESPACES, DEFAULT_PAIRS)
            || a.child_ehash.is_some()
            || a.skip_procfs)
    {
        return Err(
            "--write-docs needs the default --namespaces and --pairs, without --child-ehash or --skip-procfs".into(),
        );
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--hold") {
        let pairs = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(0);
        return match hold(args.get(1).map_or("", String::as_str), pairs) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: bench_connections [--namespaces N] [--pairs P] [--runs R] [--child-ehash N] [--skip-procfs] [--write-docs]; see the module doc in tests/src/bin/bench_connections.rs"
        );
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_connections: {e}");
            return ExitCode::from(64);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_connections: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (network namespaces, setns)".into());
    }
    install_signal_cleanup()?;
    let sockets = (args.namespaces * args.pairs * 2) as u64;
    eprintln!(
        "bench_connections: {} namespaces x {} established sockets ({sockets} in all), {} runs",
        args.namespaces,
        args.pairs * 2,
        args.runs
    );
    let t = Instant::now();
    let world = setup(args.namespaces, args.pairs, args.child_ehash)?;
    eprintln!(
        "bench_connections: sockets ready in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let paths: Vec<PathBuf> = world
        .holders
        .iter()
        .map(|h| PathBuf::from(format!("/proc/{}/ns/net", h.child.id())))
        .collect();
    let names: Vec<String> = world.holders.iter().map(|h| h.ns.clone()).collect();

    // The one-pass program: loaded and verified once, as an agent would at start.
    let t = Instant::now();
    let mut one_pass = OnePass::load(sockets as usize * 2 + 65_536);
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    match &one_pass {
        Ok(_) => eprintln!("bench_connections: one-pass BPF census loaded in {load_ms:.1} ms"),
        Err(e) => eprintln!("bench_connections: {e}; its row is the sock_diag fallback"),
    }

    // One warm-up of each (page cache for ip and ss, the kernel's socket tables).
    census(&paths, SourcePreference::SockDiag)?;
    if !args.skip_procfs {
        census(&paths, SourcePreference::Procfs)?;
    }
    one_pass_census(&paths, &mut one_pass)?;
    ss_loop(&names)?;

    let (busy0, total0) = machine_jiffies();
    let mut samples: [Vec<Sample>; READERS] = Default::default();
    for run in 0..args.runs {
        for k in 0..READERS {
            let which = (run + k) % READERS;
            if which == 1 && args.skip_procfs {
                continue;
            }
            let s = match which {
                0 => census(&paths, SourcePreference::SockDiag)?,
                1 => census(&paths, SourcePreference::Procfs)?,
                2 => one_pass_census(&paths, &mut one_pass)?,
                _ => ss_loop(&names)?,
            };
            if s.established != sockets {
                return Err(format!(
                    "reader {which} found {} established sockets, expected {sockets}",
                    s.established
                ));
            }
            samples[which].push(s);
        }
        eprintln!("bench_connections: run {}/{} done", run + 1, args.runs);
    }
    let (busy1, total1) = machine_jiffies();
    let busy = 100.0 * (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64;
    drop(world);

    let row = |name, s: &[Sample]| Row {
        name,
        wall: median(s.iter().map(|x| x.wall).collect()),
        cpu: median(s.iter().map(|x| x.cpu).collect()),
        sys: median(s.iter().map(|x| x.sys).collect()),
    };
    let one_pass_name = if one_pass.is_ok() {
        ONE_PASS_ROW
    } else {
        "one-pass BPF census UNAVAILABLE: sock_diag fallback"
    };
    let mut rows = vec![
        row("nodekeeper census (sock_diag)", &samples[0]),
        row("nodekeeper /proc/net/tcp parser", &samples[1]),
        row(one_pass_name, &samples[2]),
        row("`ip netns exec NS ss -tan` loop", &samples[3]),
    ];
    if args.skip_procfs {
        rows.remove(1);
    }
    let profile = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    let mut section = format!("<!-- generated by: {CMD} -->\n\n");
    let tables = match args.child_ehash {
        None => "one TCP hash table shared by all namespaces, the kernel default".to_string(),
        Some(n) => {
            format!("a TCP hash table of {n} buckets per namespace, tcp_child_ehash_entries")
        }
    };
    section.push_str(&format!(
        "**One census of {} network namespaces x {} established sockets ({sockets} sockets)** (median of {} runs; {tables}; ratio = reader / ss loop)\n\n",
        args.namespaces,
        args.pairs * 2,
        args.runs
    ));
    section.push_str(&table(&rows, sockets));
    match &one_pass {
        Ok(_) => section.push_str(&format!(
            "\nThe one-pass program was loaded and verified once before the runs, in {load_ms:.1} ms (not in the rows).\n"
        )),
        Err(e) => section.push_str(&format!("\nOne pass: {e}.\n")),
    }
    section.push_str(&format!(
        "\nEvery reader found all {sockets} established sockets in every run. The census and the parser include \
         `summarize` (pools, listeners, ephemeral ports) of every namespace; their CPU time is this \
         process's (getrusage RUSAGE_SELF), the ss loop's is its children's (RUSAGE_CHILDREN: `ip`, \
         which execs `ss`).\n"
    ));
    section.push_str(&format!(
        "Peers: {}; {}. nodekeeper: the `nodekeeper::metrics::connections` library in this \
         benchmark ({profile}).\n",
        tool_version(Command::new("ss").arg("-V")),
        tool_version(Command::new("ip").arg("-V")),
    ));
    section.push_str(&format!(
        "Machine: {}. Whole-machine CPU busy during the runs: {busy:.0}%.\nDate: {}.\n\n",
        machine(),
        jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC")
    ));
    print!("{section}");
    if args.write {
        write_docs(&section)?;
        eprintln!("bench_connections: wrote docs/benchmarks.md");
    }
    Ok(())
}
