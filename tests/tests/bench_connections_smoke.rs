//! Keeps `bench_connections` (nodekeeper's connection census vs an `ss -tan` loop vs the /proc
//! parser) from rotting: a small run (3 namespaces x 50 sockets) must exit 0, print a row per
//! reader with numeric cells, leave no namespace behind and not touch docs/benchmarks.md. The
//! timings are never asserted (they are measurements, not properties).

use std::process::{Command, Stdio};

use nodekeeper_tests::{require_root, require_tool, workspace_root};

fn bench_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nkbench-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn connections_benchmark_runs_small_and_reports_every_reader_as_root() {
    if !require_root() || !require_tool("ip") || !require_tool("ss") {
        return;
    }
    let docs = workspace_root().join("docs/benchmarks.md");
    let docs_before = std::fs::read(&docs).ok();
    let child = Command::new(env!("CARGO_BIN_EXE_bench_connections"))
        .args(["--namespaces", "3", "--pairs", "25", "--runs", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bench_connections");
    let pid = child.id();
    let out = child.wait_with_output().expect("bench_connections output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench_connections failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("3 network namespaces x 50 established sockets (150 sockets)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Every reader found all 150 established sockets"),
        "{stdout}"
    );
    for reader in [
        "nodekeeper census (sock_diag)",
        "nodekeeper /proc/net/tcp parser",
        "`ip netns exec NS ss -tan` loop",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {reader} |")))
            .unwrap_or_else(|| panic!("no row for {reader}:\n{stdout}"));
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 7, "{row}");
        for c in &cells[1..6] {
            let v: f64 = c.parse().unwrap_or_else(|_| panic!("cell {c:?} in {row}"));
            assert!(v.is_finite() && v >= 0.0, "cell {c:?} in {row}");
        }
    }
    let left: Vec<_> = bench_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("nkbench-{pid}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert_eq!(
        std::fs::read(&docs).ok(),
        docs_before,
        "a smoke run must not write docs/benchmarks.md"
    );
}

#[test]
fn connections_benchmark_rejects_bad_arguments_and_write_docs_with_small_sizes() {
    let bin = env!("CARGO_BIN_EXE_bench_connections");
    for args in [
        &["--namespaces", "0"][..],
        &["--bogus"][..],
        &["--pairs", "10", "--write-docs"][..],
    ] {
        let out = Command::new(bin).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
    }
}
