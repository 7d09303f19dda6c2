//! Keeps `tests/bench/disks_vs_lsblk.sh` from rotting: a short run (4 loop devices, 2 timed
//! runs) against the debug agent must exit 0, print the comparison table with numbers in every
//! peer cell, leave no loop device of its own attached, and not touch docs/benchmarks.md. The
//! figures themselves are never asserted.

use std::process::Command;

use nodekeeper_tests::{agent_bin, require_root, require_tool, workspace_root};

/// Loop devices attached to a file under the benchmark's temp dirs.
fn bench_loops() -> Vec<String> {
    let out = Command::new("losetup")
        .arg("--list")
        .arg("--noheadings")
        .args(["--output", "NAME,BACK-FILE"])
        .output()
        .expect("losetup --list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("nk-disks-bench."))
        .map(str::to_string)
        .collect()
}

#[test]
fn root_disks_benchmark_script_runs_and_reports_every_row() {
    if !require_root()
        || ![
            "losetup",
            "lsblk",
            "blkid",
            "wipefs",
            "strace",
            "python3",
            "mkfs.ext4",
            "mkswap",
            "sgdisk",
            "sfdisk",
        ]
        .iter()
        .all(|t| require_tool(t))
    {
        return;
    }
    let root = workspace_root();
    let docs = root.join("docs/benchmarks.md");
    let docs_before = std::fs::read(&docs).ok();
    let out = Command::new("bash")
        .arg(root.join("tests/bench/disks_vs_lsblk.sh"))
        .current_dir(&root)
        .env("BENCH_DEVICES", "4")
        .env("BENCH_RUNS", "2")
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
    assert!(
        stdout.contains(
            "| metric | nodekeeper | nodekeeper, crossCheck off | lsblk + blkid | ratio | ratio, crossCheck off |"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("4 loop devices"), "{stdout}");
    for metric in [
        "wall time mean, ms",
        "wall time stddev, ms",
        "syscalls per run",
        "programs executed per run",
        "open/openat per run",
        "read/pread64 per run",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {metric}")))
            .unwrap_or_else(|| panic!("row {metric:?} missing:\n{stdout}"));
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 6, "{row}");
        for cell in &cells[1..4] {
            assert!(cell.parse::<f64>().is_ok(), "peer cell {cell:?} in {row}");
        }
    }
    // blank, ext4, swap, gpt: three with data, one candidate.
    assert!(
        stdout.contains("nodekeeper calls 3 of 4 devices has-data and 1 candidate"),
        "{stdout}"
    );
    assert!(stdout.contains("Peers: nodekeeper "), "{stdout}");
    assert!(stdout.contains("lsblk from util-linux"), "{stdout}");
    assert_eq!(
        bench_loops(),
        Vec::<String>::new(),
        "the script detaches its loop devices"
    );
    assert_eq!(
        std::fs::read(&docs).ok(),
        docs_before,
        "a smoke run must not write docs/benchmarks.md"
    );
}
