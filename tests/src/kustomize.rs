//! Rendering kustomize directories with real `kubectl` and parsing the YAML stream (PyYAML's
//! safe loader), shared by the manifest and overlay tests.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{python, require_python_modules, require_tool, workspace_root};

/// kubectl and PyYAML, plus `extra`; false (skip) when one is missing. Prints which kubectl
/// renders (Debian's, a vendor's, or the PyPI wheel install-deps puts in the venv): kustomize
/// output differs between versions.
pub fn have_tools(extra: &[&str]) -> bool {
    let found = require_tool("kubectl")
        && extra.iter().all(|t| require_tool(t))
        && require_python_modules(&["yaml"]);
    if found {
        println!("kubectl: {}", kubectl_version());
    }
    found
}

/// `kubectl version --client` on one line, with the path it ran from; read once per process.
pub fn kubectl_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let path = Command::new("sh")
            .args(["-c", "command -v kubectl"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let version = Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " "))
            .unwrap_or_else(|e| format!("unknown ({e})"));
        format!("{} ({path})", version.trim())
    })
}

/// `kubectl kustomize <dir>` (relative to the workspace root).
pub fn render(dir: &str) -> String {
    let o = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(workspace_root())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        o.status.success(),
        "kubectl kustomize {dir} failed ({}):\n{}",
        kubectl_version(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("kustomize output is UTF-8")
}

/// Every document of a YAML stream, as JSON values.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    let mut child = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write YAML to python");
    let o = child.wait_with_output().expect("python output");
    assert!(
        o.status.success(),
        "YAML did not parse:\n{}\n---\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    match serde_json::from_slice(&o.stdout).expect("python printed JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// The Kubernetes version whose API schemas the rendered manifests must pass.
pub const KUBERNETES_VERSION: &str = "1.33.0";

/// Asserts that `kubernetes-validate --strict` accepts the rendered `yaml` (`what` names it).
pub fn assert_strictly_valid(what: &str, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let o = Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES_VERSION, "--quiet"])
        .arg(&file)
        .output()
        .expect("run kubernetes-validate");
    assert!(
        o.status.success(),
        "kubernetes-validate --strict -k {KUBERNETES_VERSION} rejected {what}:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `nodekeeper check-config` on `config_yaml`, with exactly `env` among the variables the agent
/// reads (nothing inherited from the test's own environment).
pub fn check_config(
    config_yaml: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, config_yaml).unwrap();
    let mut cmd = Command::new(crate::agent_bin());
    cmd.arg("check-config").arg(&file);
    for (k, _) in std::env::vars() {
        if k.starts_with("NODEKEEPER_") || k == "NODE_NAME" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env).output().expect("run nodekeeper check-config")
}
