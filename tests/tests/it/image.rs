//! The container image, built from `images/` offline and checked by `tests/scripts/build-image`
//! (images/README.md, "Built and checked offline in CI"): a Debian rootfs unpacked from packages
//! (cached under target/image-cache), imported with podman, the runtime stage built on it with
//! buildah, exported and checked under chroot.
//!
//! Needs root, podman, buildah and apt-get; skips without them, fails under
//! `NODEKEEPER_REQUIRE_TOOLS=1`. Uses the agent binary the suite runs (`agent_bin()`, the debug
//! build) unless `NODEKEEPER_IMAGE_PROFILE=release` is set, which makes the script build it.

use std::process::Command;

use nodekeeper_tests::{agent_bin, require_root, require_tool, workspace_root};

#[test]
fn image_builds_offline_and_carries_every_program_the_agent_runs() {
    if !(require_root()
        && require_tool("podman")
        && require_tool("buildah")
        && require_tool("apt-get")
        && require_tool("chroot"))
    {
        return;
    }
    let root = workspace_root();
    let cache = root.join("target/image-cache");
    let mut cmd = Command::new(root.join("tests/scripts/build-image"));
    cmd.current_dir(&root).env("NODEKEEPER_IMAGE_CACHE", &cache);
    // The suite's own build, unless a profile is asked for (the script then builds it).
    let profile = match std::env::var("NODEKEEPER_IMAGE_PROFILE") {
        Ok(p) => {
            cmd.env("NODEKEEPER_IMAGE_PROFILE", &p)
                .env_remove("NODEKEEPER_BIN");
            p
        }
        Err(_) => {
            cmd.env("NODEKEEPER_BIN", agent_bin());
            "debug".into()
        }
    };
    let o = cmd.output().expect("run tests/scripts/build-image");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    // Shown with --nocapture: the size and timings.
    println!("{stdout}");
    assert!(
        o.status.success(),
        "build-image failed ({}):\n{stdout}\n{stderr}",
        o.status
    );

    let report = std::fs::read_to_string(cache.join("report.txt")).expect("report.txt");
    let lines: Vec<&str> = report.lines().collect();
    assert!(
        !lines.iter().any(|l| l.starts_with("FAIL")),
        "a check failed:\n{report}"
    );
    let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    for check in [
        "OK entrypoint cmd user labels",
        "OK nodekeeper version: nodekeeper ",
        "OK agent execs in image: ",
        "OK libraries resolve for ",
        "OK no shell",
        "SIZE image=",
        "DONE ",
    ] {
        assert!(has(check), "missing check {check:?} in:\n{report}");
    }
    // Every tool of images/README.md's table was run in the image.
    let readme = std::fs::read_to_string(root.join("images/README.md")).unwrap();
    let table = readme
        .split("<!-- tools -->")
        .nth(1)
        .and_then(|t| t.split("<!-- /tools -->").next())
        .expect("images/README.md has the tools table");
    let tools: Vec<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .collect();
    assert!(tools.len() >= 6, "tools table parsed: {tools:?}");
    for t in &tools {
        assert!(
            has(&format!("OK tool {t}: ")),
            "{t} was not run in the image:\n{report}"
        );
    }
    // The size stays that of an agent plus a few tools, not of a distribution.
    let size: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("SIZE image="))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("image size");
    let rest: u64 = lines
        .iter()
        .find_map(|l| l.split("rootfs_without_agent=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("rootfs size");
    assert!(
        rest < 40 << 20,
        "the image without the agent is {rest} bytes (> 40 MiB): did a dependency drag a distribution in?"
    );
    eprintln!("image size: {} MiB ({profile} binary)", size >> 20);
}
