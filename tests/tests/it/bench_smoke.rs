//! Keeps `tests/bench/metrics_vs_node_exporter.sh` from rotting: a short run against the debug
//! agent must exit 0 and print both comparison tables. Only the shape of the report is checked;
//! the figures themselves are never asserted (they are timings on a shared machine).

use std::process::Command;

use nodekeeper_tests::{agent_bin, require_tool, workspace_root};

#[test]
fn metrics_benchmark_script_runs_and_reports_both_peers() {
    if !require_tool("prometheus-node-exporter")
        || !require_tool("curl")
        || !require_tool("python3")
    {
        return;
    }
    let root = workspace_root();
    let docs = root.join("docs/benchmarks.md");
    let docs_before = std::fs::read(&docs).ok();
    let out = Command::new("bash")
        .arg(root.join("tests/bench/metrics_vs_node_exporter.sh"))
        .current_dir(&root)
        .env("BENCH_IDLE_SECONDS", "2")
        .env("BENCH_SCRAPES", "10")
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

    let header = "| metric | nodekeeper | node_exporter | ratio (nodekeeper/node_exporter) |";
    assert_eq!(
        stdout.matches(header).count(),
        2,
        "one table for default collectors, one for comparable collectors:\n{stdout}"
    );
    assert!(stdout.contains("default collectors"), "{stdout}");
    assert!(stdout.contains("comparable collectors"), "{stdout}");
    for metric in [
        "idle RSS",
        "scrape latency mean",
        "scrape latency p50",
        "scrape latency p99",
        "bytes per scrape",
        "samples per scrape",
        "CPU over a 2s idle window",
    ] {
        let rows: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {metric}")))
            .collect();
        assert_eq!(rows.len(), 2, "{metric:?} row in both tables:\n{stdout}");
        for row in rows {
            // | metric | nodekeeper | node_exporter | ratio |: both peers' cells hold numbers.
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 4, "{row}");
            for cell in &cells[1..3] {
                assert!(cell.parse::<f64>().is_ok(), "peer cell {cell:?} in {row}");
            }
        }
    }
    assert!(stdout.contains("node_exporter, version"), "{stdout}");
    assert!(stdout.contains("Peers: nodekeeper "), "{stdout}");
    assert_eq!(
        std::fs::read(&docs).ok(),
        docs_before,
        "a smoke run must not write docs/benchmarks.md"
    );
}
