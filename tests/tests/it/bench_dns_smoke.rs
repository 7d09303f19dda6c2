//! Keeps `tests/bench/dns_vs_peers.sh` from rotting: a tiny run (2 s of hits, a few thousand
//! mixed and missed queries, a 1 s latency run) of every cache (the debug agent, unbound,
//! dnsmasq, dnsdist, kresd) must exit 0, print the three phase tables with a number in every
//! throughput cell and the ratio row, and not touch docs/benchmarks.md. The figures themselves
//! are never asserted. The script runs inside a network namespace of the test's own
//! (`Netns::enter_fresh`, so the test needs root): every cache, the upstream and dnsperf use that
//! namespace's loopback.

use std::process::Command;

use nodekeeper_tests::netns_pods::Netns;
use nodekeeper_tests::{agent_bin, require_root, require_tool, workspace_root};

const CACHES: [&str; 5] = ["nodekeeper", "unbound", "dnsmasq", "dnsdist", "kresd"];

#[test]
fn dns_benchmark_script_runs_and_reports_every_cache_as_root() {
    if !require_root()
        || ![
            "ip", "dnsperf", "unbound", "dnsmasq", "dnsdist", "kresd", "dig", "taskset", "python3",
        ]
        .iter()
        .all(|t| require_tool(t))
    {
        return;
    }
    // The script, every cache, the upstream and dnsperf run in a namespace of their own.
    let _netns = Netns::enter_fresh("dns-bench");
    let root = workspace_root();
    let docs = root.join("docs/benchmarks.md");
    let docs_before = std::fs::read(&docs).ok();
    let out = Command::new("bash")
        .arg(root.join("tests/bench/dns_vs_peers.sh"))
        .current_dir(&root)
        .env("BENCH_SECONDS", "2")
        .env("BENCH_NAMES", "100")
        .env("BENCH_MIXED_QUERIES", "5000")
        .env("BENCH_MISS_QUERIES", "1000")
        .env("BENCH_LATENCY_QPS", "1000")
        .env("BENCH_LATENCY_SECONDS", "1")
        .env("BENCH_LATENCY_RUNS", "2")
        .env("BENCH_FIXED_QPS", "500")
        .env("BENCH_FIXED_SECONDS", "1")
        .env("BENCH_NO_BUILD", "1")
        .env("NODEKEEPER_BIN", agent_bin())
        .output()
        .expect("run the benchmark script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "benchmark script failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );

    let header = "| cache | QPS | server CPU, s | queries per CPU-second | mean latency, ms | p99 latency, ms | lost | peak RSS, MiB |";
    assert_eq!(
        stdout.matches(header).count(),
        3,
        "one table per phase (hits, mixed, misses):\n{stdout}"
    );
    for title in [
        "**All cache hits",
        "**Mixed: 90% hits, 10% misses",
        "**All misses",
        "**CPU per query at fixed offered loads",
    ] {
        assert!(stdout.contains(title), "{title}:\n{stdout}");
    }
    for cache in CACHES {
        let rows: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {cache} |")))
            .collect();
        assert_eq!(rows.len(), 4, "{cache} in every table:\n{stdout}");
        // The fixed-load table: CPU us per query (n/a below one tick) and lost, hits and misses.
        let fixed: Vec<&str> = rows[3]
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        assert_eq!(fixed.len(), 5, "{}", rows[3]);
        for i in [1, 3] {
            assert!(
                fixed[i].parse::<f64>().is_ok() || fixed[i] == "n/a",
                "{}",
                rows[3]
            );
        }
        for i in [2, 4] {
            assert!(fixed[i].parse::<u64>().is_ok(), "lost in {}", rows[3]);
        }
        for row in &rows[..3] {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 8, "{row}");
            // QPS, CPU, lost and RSS are always numbers; q/CPU-s may be n/a below one tick.
            for i in [1, 2, 6, 7] {
                assert!(
                    cells[i].parse::<f64>().is_ok(),
                    "cell {i} {:?} in {row}",
                    cells[i]
                );
            }
            assert!(
                cells[3].parse::<f64>().is_ok() || cells[3] == "n/a",
                "{row}"
            );
        }
    }
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("| ratio nodekeeper / best peer |"))
            .count(),
        4,
        "{stdout}"
    );
    assert!(stdout.contains("Peers: nodekeeper "), "{stdout}");
    assert!(stdout.contains("dnsperf 2."), "{stdout}");
    assert_eq!(
        std::fs::read(&docs).ok(),
        docs_before,
        "a smoke run must not write docs/benchmarks.md"
    );
}
