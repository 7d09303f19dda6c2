//! ValidatingAdmissionPolicy (issue #19, docs/fake-api-server.md section 14): the policies
//! `manifests/base` ships, with their bindings, evaluated on every write a ServiceAccount makes
//! to a matching resource, with the CEL subset in [`super::cel`].
//!
//! Modelled: `matchConstraints.resourceRules` (apiGroups, operations, resources incl.
//! `resource/subresource`, `*`), `matchConditions` (all must be true), `variables` (in order,
//! as `variables.NAME`), `validations` (`expression`, `message`, `reason`), `failurePolicy`
//! (an evaluation error denies under `Fail`, is ignored under `Ignore`), bindings with
//! `validationActions: [Deny]` (a policy without a Deny binding is not enforced). Not modelled:
//! `paramKind`/params, `namespaceSelector`/`objectSelector`, `excludeResourceRules`,
//! `matchPolicy`, `auditAnnotations`, `messageExpression`, `Warn`/`Audit` actions.
//! The fake's admin is not subject to policies (the shipped policy matches the agent only).

use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};

use super::cel::{self, Env, Program};
use super::rbac::{Identity, shipped_objects};
use super::store::ApiError;

#[derive(Debug, Clone)]
struct MatchRule {
    api_groups: Vec<String>,
    operations: Vec<String>,
    resources: Vec<String>,
}

#[derive(Debug, Clone)]
struct Validation {
    program: Program,
    expression: String,
    message: String,
    reason: String,
}

#[derive(Debug, Clone)]
struct Policy {
    name: String,
    binding: String,
    fail_closed: bool,
    rules: Vec<MatchRule>,
    conditions: Vec<(String, Program)>,
    variables: Vec<(String, Program)>,
    validations: Vec<Validation>,
}

/// The enforced policies.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    policies: Vec<Policy>,
}

/// One write, as admission sees it.
pub struct Request<'a> {
    pub who: &'a Identity,
    /// CREATE, UPDATE (PUT and PATCH) or DELETE.
    pub operation: &'a str,
    pub api_group: &'a str,
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    /// The object after the write (None on DELETE).
    pub object: Option<&'a Value>,
    /// The object before the write (None on CREATE).
    pub old_object: Option<&'a Value>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn any(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

fn compile(src: &str, what: &str) -> Result<Program, String> {
    cel::parse(src).map_err(|e| format!("{what}: {e}"))
}

impl Admission {
    /// The ValidatingAdmissionPolicies in `objects` that a binding enforces with Deny; an
    /// expression outside the CEL subset is an error naming it.
    pub fn from_objects(objects: &[Value]) -> Result<Admission, String> {
        let mut policies = Vec::new();
        for b in objects.iter().filter(|o| {
            o["kind"] == "ValidatingAdmissionPolicyBinding"
                && strings(&o["spec"]["validationActions"])
                    .iter()
                    .any(|a| a == "Deny")
        }) {
            let policy_name = b["spec"]["policyName"].as_str().unwrap_or_default();
            let Some(p) = objects.iter().find(|o| {
                o["kind"] == "ValidatingAdmissionPolicy" && o["metadata"]["name"] == policy_name
            }) else {
                continue;
            };
            let spec = &p["spec"];
            let named = |key: &str| -> Result<Vec<(String, Program)>, String> {
                spec[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        let name = c["name"].as_str().unwrap_or_default().to_string();
                        let src = c["expression"].as_str().unwrap_or_default();
                        Ok((name.clone(), compile(src, &format!("{key} {name}"))?))
                    })
                    .collect()
            };
            let validations = spec["validations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    let expression = v["expression"].as_str().unwrap_or_default().to_string();
                    Ok(Validation {
                        program: compile(&expression, "validation")?,
                        message: v["message"].as_str().unwrap_or_default().to_string(),
                        reason: v["reason"].as_str().unwrap_or("Invalid").to_string(),
                        expression,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            policies.push(Policy {
                name: policy_name.to_string(),
                binding: b["metadata"]["name"].as_str().unwrap_or_default().into(),
                fail_closed: spec["failurePolicy"].as_str() != Some("Ignore"),
                rules: spec["matchConstraints"]["resourceRules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| MatchRule {
                        api_groups: strings(&r["apiGroups"]),
                        operations: strings(&r["operations"]),
                        resources: strings(&r["resources"]),
                    })
                    .collect(),
                conditions: named("matchConditions")?,
                variables: named("variables")?,
                validations,
            });
        }
        Ok(Admission { policies })
    }

    /// The policies of `kubectl kustomize manifests/base`, loaded once per process.
    pub fn shipped() -> Arc<Admission> {
        static SHIPPED: OnceLock<Arc<Admission>> = OnceLock::new();
        SHIPPED
            .get_or_init(|| {
                Arc::new(
                    Admission::from_objects(shipped_objects())
                        .unwrap_or_else(|e| panic!("the shipped admission policy: {e}")),
                )
            })
            .clone()
    }

    /// Runs every matching policy on `req`: Err is the API server's refusal.
    pub fn admit(&self, req: &Request) -> Result<(), ApiError> {
        if *req.who == Identity::Admin {
            return Ok(());
        }
        let full = match req.subresource {
            Some(s) => format!("{}/{s}", req.resource),
            None => req.resource.to_string(),
        };
        let (username, extra) = match req.who {
            Identity::Admin => ("fake-admin".to_string(), json!({})),
            Identity::ServiceAccount { node, .. } => (
                req.who.user(),
                json!({"authentication.kubernetes.io/node-name": [node]}),
            ),
        };
        let mut env = Env::new();
        env.insert(
            "request".into(),
            json!({
                "operation": req.operation,
                "userInfo": {"username": username, "extra": extra},
                "resource": {"group": req.api_group, "version": "v1", "resource": req.resource},
                "subResource": req.subresource.unwrap_or_default(),
                "name": req.name,
                "namespace": req.namespace.unwrap_or_default(),
            }),
        );
        env.insert("object".into(), req.object.cloned().unwrap_or(Value::Null));
        env.insert(
            "oldObject".into(),
            req.old_object.cloned().unwrap_or(Value::Null),
        );
        for p in &self.policies {
            let matched = p.rules.iter().any(|r| {
                any(&r.api_groups, req.api_group)
                    && any(&r.operations, req.operation)
                    && any(&r.resources, &full)
            });
            if !matched {
                continue;
            }
            let denied = |message: String, reason: &str| -> ApiError {
                let (code, reason) = match reason {
                    "Forbidden" => (403, "Forbidden"),
                    "Unauthorized" => (401, "Unauthorized"),
                    _ => (422, "Invalid"),
                };
                ApiError::new(
                    code,
                    reason,
                    format!(
                        "ValidatingAdmissionPolicy '{}' with binding '{}' denied request: {message}",
                        p.name, p.binding
                    ),
                )
            };
            let failed = |what: &str, e: String| -> Result<(), ApiError> {
                if p.fail_closed {
                    Err(denied(
                        format!("{what} resulted in error: {e}"),
                        "Forbidden",
                    ))
                } else {
                    Ok(())
                }
            };
            let mut applies = true;
            for (name, c) in &p.conditions {
                match c.eval(&env).map(|v| v.as_bool()) {
                    Ok(Some(b)) => applies &= b,
                    Ok(None) => {
                        return failed(&format!("matchCondition {name}"), "not a bool".into());
                    }
                    Err(e) => return failed(&format!("matchCondition {name}"), e),
                }
            }
            if !applies {
                continue;
            }
            let mut vars = serde_json::Map::new();
            for (name, v) in &p.variables {
                env.insert("variables".into(), Value::Object(vars.clone()));
                match v.eval(&env) {
                    Ok(value) => {
                        vars.insert(name.clone(), value);
                    }
                    Err(e) => return failed(&format!("variable {name}"), e),
                }
            }
            env.insert("variables".into(), Value::Object(vars));
            for v in &p.validations {
                match v.program.eval(&env).map(|r| r.as_bool()) {
                    Ok(Some(true)) => {}
                    Ok(_) => {
                        let message = if v.message.is_empty() {
                            format!("failed expression: {}", v.expression)
                        } else {
                            v.message.clone()
                        };
                        return Err(denied(message, &v.reason));
                    }
                    Err(e) => return failed(&format!("expression '{}'", v.expression), e),
                }
            }
        }
        Ok(())
    }
}
