//! Rendering kustomize directories with real `kubectl` and parsing the YAML stream (PyYAML's
//! safe loader), shared by the manifest and overlay tests.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{python, require_python_modules, require_tool, workspace_root};

/// kubectl and PyYAML, plus `extra`; false (skip) when one is missing.
pub fn have_tools(extra: &[&str]) -> bool {
    require_tool("kubectl")
        && extra.iter().all(|t| require_tool(t))
        && require_python_modules(&["yaml"])
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
        "kubectl kustomize {dir} failed:\n{}",
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
