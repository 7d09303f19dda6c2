//! The build needs only the Rust toolchain (issue #13): proto/ is compiled by protox inside the
//! build script, so no system protobuf compiler is installed, looked for or run.

use std::path::{Path, PathBuf};
use std::process::Command;

use nodekeeper_tests::workspace_root;

/// Files that build the agent or set up a machine for it: none may name protoc or its packages.
const BUILD_FILES: &[&str] = &[
    "agent/build.rs",
    "agent/Cargo.toml",
    "tests/scripts/install-deps",
    "tests/scripts/test-all",
    "tests/scripts/dev-run",
    "tests/scripts/build-image",
    "images/Dockerfile",
    "images/make-rootfs",
    "images/rootfs-packages",
    ".ci/run",
];

#[test]
fn build_files_name_no_protoc_or_its_packages() {
    let root = workspace_root();
    let mut offences = Vec::new();
    for file in BUILD_FILES {
        let text =
            std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_ascii_lowercase();
            if ["protoc", "protobuf-compiler", "libprotobuf"]
                .iter()
                .any(|word| lower.contains(word))
            {
                offences.push(format!("{file}:{}: {line}", n + 1));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "build files still name protoc:\n{}",
        offences.join("\n")
    );
}

/// The build script cargo compiled for the agent, newest first (a release or clippy build may
/// have left others).
fn agent_build_script() -> PathBuf {
    let build_dir = workspace_root().join("target/debug/build");
    let mut scripts: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&build_dir)
        .unwrap_or_else(|e| panic!("{}: {e}: build the workspace first", build_dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("nodekeeper-"))
        .map(|e| e.path().join("build-script-build"))
        .filter(|p| p.exists())
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    scripts.sort();
    scripts
        .pop()
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("no nodekeeper build script under {}", build_dir.display()))
}

/// Runs the real build script with PROTOC=/bin/false and a PATH holding no protoc (nor anything
/// else): it must still generate the Rust code and the reflection descriptor set.
#[test]
fn build_script_generates_the_api_with_protoc_unavailable() {
    let out = tempfile::tempdir().unwrap();
    let empty_path = tempfile::tempdir().unwrap();
    let o = Command::new(agent_build_script())
        .env_clear()
        .env("OUT_DIR", out.path())
        // Cargo sets it for every build script; the script reads it at run time.
        .env("CARGO_MANIFEST_DIR", workspace_root().join("agent"))
        .env("PATH", empty_path.path())
        .env("PROTOC", "/bin/false")
        .env("NODEKEEPER_REVISION", "test")
        .current_dir(workspace_root().join("agent"))
        .output()
        .expect("run the agent's build script");
    assert!(
        o.status.success(),
        "build script failed without protoc:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let generated = |name: &str| -> Vec<u8> {
        let path: &Path = &out.path().join(name);
        std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let agent_rs = String::from_utf8(generated("nodekeeper.v1.rs")).unwrap();
    assert!(
        agent_rs.contains("pub mod node_agent_server") && agent_rs.contains("WatchMetrics"),
        "nodekeeper.v1.rs lacks the NodeAgent server"
    );
    assert!(
        String::from_utf8(generated("externalscaler.rs"))
            .unwrap()
            .contains("pub mod external_scaler_server"),
        "externalscaler.rs lacks the scaler server"
    );
    // The descriptor set reflection serves carries the well-known types it imports (protox
    // ships them; protoc took them from libprotobuf-dev).
    let descriptors = generated("nodekeeper_descriptor.bin");
    for name in [
        "nodekeeper/v1/agent.proto",
        "keda/externalscaler.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/timestamp.proto",
    ] {
        assert!(
            descriptors
                .windows(name.len())
                .any(|w| w == name.as_bytes()),
            "descriptor set lacks {name}"
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("cargo:rustc-env=NODEKEEPER_REVISION=test"),
        "{stdout}"
    );
}

/// test-all's commands in order: the lines of the script that start with `cargo `.
fn test_all_cargo_commands() -> Vec<String> {
    let path = workspace_root().join("tests/scripts/test-all");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cargo "))
        .map(String::from)
        .collect()
}

/// On a fresh cargo home (a newcomer who ran dev-run first: only the Linux crates downloaded),
/// `cargo deny --offline` failed in `cargo metadata` on crates for other targets (found in a
/// fresh Debian 12 chroot, docs/benchmarks.md). test-all must fetch every locked crate first.
#[test]
fn test_all_fetches_every_locked_crate_before_the_offline_deny_check() {
    let commands = test_all_cargo_commands();
    let position = |prefix: &str| commands.iter().position(|c| c.starts_with(prefix));
    let deny = position("cargo deny --offline").expect("test-all runs cargo deny --offline");
    let fetch = position("cargo fetch --locked");
    assert!(
        fetch.is_some_and(|f| f < deny),
        "test-all must run `cargo fetch --locked` before `cargo deny --offline`: {commands:#?}"
    );
}

/// A sudo user's run of test-all (found in the fresh Debian 12 chroot, docs/benchmarks.md): a
/// non-root Debian user's PATH has no sbin directories, and the re-exec under sudo kept that PATH,
/// so the root run could not find root's tools (losetup, unbound, ...). test-all is run as
/// `nobody` with a `sudo` on PATH that prints the PATH it was handed and stops.
#[test]
fn test_all_under_sudo_keeps_roots_sbin_directories_on_path() {
    if !nodekeeper_tests::require_root() || !nodekeeper_tests::require_tool("setpriv") {
        return;
    }
    let bin = tempfile::tempdir().unwrap();
    let sudo = bin.path().join("sudo");
    std::fs::write(
        &sudo,
        "#!/bin/sh\nfor a; do case $a in PATH=*) echo \"$a\";; esac; done\n",
    )
    .unwrap();
    Command::new("chmod")
        .args(["-R", "a+rx"])
        .arg(bin.path())
        .status()
        .unwrap();
    let user_path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.path().display());
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(workspace_root().join("tests/scripts/test-all"))
        .env_clear()
        .env("PATH", &user_path)
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kept = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PATH="))
        .unwrap_or_else(|| panic!("test-all did not re-exec under sudo: {out:?}"));
    let dirs: Vec<&str> = kept.split(':').collect();
    for dir in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        assert!(
            dirs.contains(&dir),
            "{dir} missing from the PATH kept for root: {kept}"
        );
    }
    assert!(
        dirs.contains(&bin.path().to_str().unwrap()),
        "the user's own PATH (its cargo) is kept: {kept}"
    );
}
