//! `manifests/monitoring/`: the alerting rules (plain file and PrometheusRule), their promtool
//! unit tests, and the Grafana dashboard, whose every panel query promtool parses.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use nodekeeper_tests::kustomize::yaml_documents;
use nodekeeper_tests::{require_python_modules, require_tool, workspace_root};

const RULES: &str = "manifests/monitoring/nodekeeper-rules.yaml";
const PROMETHEUS_RULE: &str = "manifests/monitoring/prometheusrule.yaml";
const RULE_TESTS: &str = "manifests/monitoring/tests/rules-test.yaml";
const DASHBOARD: &str = "manifests/monitoring/grafana-dashboard.json";

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn one_yaml_document(path: &str) -> Value {
    let mut docs = yaml_documents(&read(path));
    assert_eq!(docs.len(), 1, "{path}: expected one YAML document");
    docs.remove(0)
}

fn promtool(args: &[&str]) -> String {
    let o = Command::new("promtool")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn alert_names(groups: &Value) -> BTreeSet<String> {
    groups
        .as_array()
        .expect("groups is a list")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules is a list"))
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn promtool_unit_tests_fire_each_alert_on_its_series() {
    if !require_tool("promtool") {
        return;
    }
    let out = promtool(&["test", "rules", RULE_TESTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_has_a_unit_test_that_expects_it_to_fire() {
    if !require_python_modules(&["yaml"]) {
        return;
    }
    let alerts = alert_names(&one_yaml_document(RULES)["groups"]);
    let tests = one_yaml_document(RULE_TESTS);
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .expect("tests is a list")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|a| a["alertname"].as_str().map(str::to_string))
        .collect();
    let untested: Vec<_> = alerts.difference(&fired).collect();
    assert!(
        untested.is_empty(),
        "alerts no test expects to fire: {untested:?}"
    );
    let unknown: Vec<_> = fired.difference(&alerts).collect();
    assert!(
        unknown.is_empty(),
        "tests expect alerts the rules lack: {unknown:?}"
    );
}

#[test]
fn promtool_accepts_the_rules_file() {
    if !require_tool("promtool") {
        return;
    }
    promtool(&["check", "rules", RULES]);
}

#[test]
fn prometheus_rule_holds_exactly_the_rules_file_groups() {
    if !require_python_modules(&["yaml"]) {
        return;
    }
    let plain = one_yaml_document(RULES);
    let cr = one_yaml_document(PROMETHEUS_RULE);
    assert_eq!(cr["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(cr["kind"], "PrometheusRule");
    assert_eq!(cr["metadata"]["namespace"], "nodekeeper");
    assert_eq!(
        cr["spec"]["groups"], plain["groups"],
        "{PROMETHEUS_RULE} and {RULES} differ: change both"
    );
}

fn dashboard_exprs() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "dashboard has no panels");
    let mut exprs = Vec::new();
    for p in panels {
        let title = p["title"].as_str().expect("panel title").to_string();
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("target expr").to_string();
            exprs.push((title.clone(), expr));
        }
    }
    exprs
}

/// Grafana's variables replaced by what they expand to, so promtool parses the real query.
fn expand_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$instance", ".+")
}

#[test]
fn every_dashboard_query_passes_promtool_as_a_recording_rule() {
    if !require_tool("promtool") {
        return;
    }
    let exprs = dashboard_exprs();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expanded = expand_grafana_variables(expr);
        assert!(!expanded.contains('$'), "unexpanded variable in {expr}");
        // JSON strings are valid YAML scalars: no quoting rules of our own.
        rules.push_str(&format!(
            "      - record: dashboard:panel_query_{i}\n        expr: {}\n",
            serde_json::to_string(&expanded).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&file, &rules).unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}\n{rules}"
    );
}

/// Every `"..."` string literal in the agent's sources: metric names are registered as such.
fn agent_string_literals() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, part) in text.split('"').enumerate() {
                    if i % 2 == 1 {
                        out.insert(part.to_string());
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&workspace_root().join("agent/src"), &mut out);
    out
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("nodekeeper_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// `nodekeeper_dns_cache_evictions_total` -> the registered name, `cache_evictions` (under the
/// `dns` sub-registry) or `dns_cache_evictions`; suffixes the encoder adds are dropped.
fn registered_candidates(metric: &str) -> Vec<String> {
    let mut base = metric.trim_start_matches("nodekeeper_");
    for suffix in ["_total", "_bucket", "_count", "_sum", "_info"] {
        if let Some(b) = base.strip_suffix(suffix) {
            base = b;
            break;
        }
    }
    let base_unitless = ["_seconds", "_bytes"]
        .iter()
        .find_map(|u| base.strip_suffix(u))
        .unwrap_or(base);
    let mut out = vec![base.to_string(), base_unitless.to_string()];
    if let Some(inner) = base.strip_prefix("dns_") {
        out.push(inner.to_string());
        out.push(base_unitless.trim_start_matches("dns_").to_string());
    }
    out
}

#[test]
fn rules_and_dashboard_use_only_metrics_the_agent_exports() {
    let literals = agent_string_literals();
    let mut names = metric_names(&read(RULES));
    names.extend(metric_names(&read(DASHBOARD)));
    assert!(names.len() > 10, "found only {names:?}");
    let unknown: Vec<_> = names
        .iter()
        .filter(|n| {
            !registered_candidates(n)
                .iter()
                .any(|c| literals.contains(c))
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics no agent source registers: {unknown:?}"
    );
}
