//! Compiles every .proto the agent serves (from the workspace's `proto/`), writes the descriptor
//! set that server reflection publishes, and records the git revision for `version`.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        proto_root.join("nodekeeper/v1/agent.proto"),
        proto_root.join("keda/externalscaler.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("nodekeeper_descriptor.bin"))
        .compile_protos(&protos, &[proto_root])?;

    // An image build passes NODEKEEPER_REVISION (no .git in its context); a checkout asks git.
    println!("cargo:rerun-if-env-changed=NODEKEEPER_REVISION");
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
