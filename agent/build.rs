//! Compiles every .proto the agent serves (from the workspace's `proto/`), writes the descriptor
//! set that server reflection publishes, and records the git revision for `version`.
//!
//! The .proto files are parsed by protox (pure Rust, the well-known types built in), so a machine
//! with only the Rust toolchain builds the agent: no system protobuf compiler is ever run.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a build script compiled in one checkout and copied with
    // its target/ to another would otherwise compile the first checkout's protos.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        proto_root.join("nodekeeper/v1/agent.proto"),
        proto_root.join("keda/externalscaler.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    // Imports (the well-known types) included: reflection clients resolve every type from it.
    let mut compiler = protox::Compiler::new([&proto_root])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(&protos)?;
    std::fs::write(
        out_dir.join("nodekeeper_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;

    // An image build passes NODEKEEPER_REVISION (no .git in its context); a checkout asks git,
    // again whenever HEAD moves (a commit, a checkout): otherwise `version` names a stale
    // revision until something else rebuilds this script.
    println!("cargo:rerun-if-env-changed=NODEKEEPER_REVISION");
    for path in git_files_naming_head() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let revision = std::env::var("NODEKEEPER_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
    println!(
        "cargo:rustc-env=NODEKEEPER_REVISION={}",
        revision.unwrap_or_else(|| "unknown".into())
    );
    Ok(())
}

/// HEAD, the branch ref it points to and packed-refs, as paths in this checkout's git directory
/// (worktrees have their own HEAD); the ones that exist.
fn git_files_naming_head() -> Vec<PathBuf> {
    let git_path = |name: &str| -> Option<PathBuf> {
        let out = Command::new("git")
            .args(["rev-parse", "--path-format=absolute", "--git-path", name])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let branch = Command::new("git")
        .args(["symbolic-ref", "-q", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    ["HEAD", "packed-refs"]
        .into_iter()
        .map(str::to_string)
        .chain(branch)
        .filter_map(|name| git_path(&name))
        .filter(|p| p.exists())
        .collect()
}
