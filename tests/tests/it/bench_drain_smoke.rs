//! Keeps `bench_drain` (kubectl drain vs nodekeeper on the rotation scenario) from rotting: one
//! short run must exit 0, print a row per tool and report zero PDB violations for both. The
//! timings and request counts are never asserted (they are measurements, not properties).

use std::process::Command;

use nodekeeper_tests::{agent_bin, require_tool, workspace_root};

#[test]
fn drain_benchmark_runs_and_reports_both_tools_without_budget_violations() {
    if !require_tool("kubectl") {
        return;
    }
    let docs = workspace_root().join("docs/benchmarks.md");
    let docs_before = std::fs::read(&docs).ok();
    let out = Command::new(env!("CARGO_BIN_EXE_bench_drain"))
        .env("BENCH_RUNS", "1")
        // Replacements Ready sooner: kubectl's fixed 5 s retry still dominates its run.
        .env("BENCH_READY_MS", "200")
        .env("NODEKEEPER_BIN", agent_bin())
        .output()
        .expect("run bench_drain");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench_drain failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("| tool | wall time to empty, s | API requests |"),
        "{stdout}"
    );
    for tool in ["kubectl drain", "nodekeeper"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {tool} |")))
            .unwrap_or_else(|| panic!("no row for {tool}:\n{stdout}"));
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 11, "{row}");
        for c in &cells[1..] {
            assert!(c.parse::<f64>().is_ok(), "cell {c:?} in {row}");
        }
        assert_eq!(cells[10], "0", "{tool} broke a PodDisruptionBudget: {row}");
    }
    assert!(stdout.contains("| ratio nodekeeper/kubectl |"), "{stdout}");
    assert_eq!(
        std::fs::read(&docs).ok(),
        docs_before,
        "a smoke run must not write docs/benchmarks.md"
    );
}
