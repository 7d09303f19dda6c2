//! Authentication and RBAC authorization (issue #19): bearer tokens name an identity, and a
//! ServiceAccount identity may only do what the Roles and ClusterRoles bound to it grant, loaded
//! from the rendered `manifests/base` (so the tests run the agent with the RBAC that ships).
//!
//! Tokens (the kubeconfig's `token:`):
//! - `fake-token` ([`ADMIN_TOKEN`]): cluster-admin (kubectl in tests, test tooling);
//! - `system:serviceaccount:NS:NAME@NODE` ([`service_account_token`]): that ServiceAccount, with
//!   the `authentication.kubernetes.io/node-name` extra a pod-bound token carries;
//! - no `Authorization` header: the admin too (kubectl sends no token over plain HTTP, and raw
//!   test requests carry none);
//! - any other token: 401 Unauthorized.
//!
//! Request attributes follow the API server's `RequestInfo`: verb from the method (GET on a name
//! -> get, on a collection -> list, with `watch=true` -> watch; POST -> create; PUT -> update;
//! PATCH -> patch; DELETE -> delete), resource and subresource (`pods/eviction`), namespace, and
//! name, which for list/watch comes from a `metadata.name=` field selector (that is how
//! `resourceNames` authorizes a single-object watch). Discovery paths need authentication only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

use crate::kustomize::{render, yaml_documents};

/// The token of the fake's cluster-admin (what `FakeApi::write_kubeconfig` writes).
pub const ADMIN_TOKEN: &str = "fake-token";
/// The agent's ServiceAccount, as the shipped manifests name it.
pub const AGENT_NAMESPACE: &str = "nodekeeper-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "nodekeeper";
const SA_PREFIX: &str = "system:serviceaccount:";

/// Every object of `kubectl kustomize manifests/base`, rendered once per process.
pub fn shipped_objects() -> &'static [Value] {
    static OBJECTS: OnceLock<Vec<Value>> = OnceLock::new();
    OBJECTS.get_or_init(|| yaml_documents(&render("manifests/base")))
}

/// The bearer token of ServiceAccount `ns/name` bound to a pod on `node`.
pub fn service_account_token(ns: &str, name: &str, node: &str) -> String {
    format!("{SA_PREFIX}{ns}:{name}@{node}")
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Admin,
    ServiceAccount {
        namespace: String,
        name: String,
        /// The `authentication.kubernetes.io/node-name` extra of a pod-bound token.
        node: String,
    },
}

impl Identity {
    /// The identity of a bearer token; `None`: 401.
    pub fn from_token(token: &str) -> Option<Identity> {
        if token == ADMIN_TOKEN {
            return Some(Identity::Admin);
        }
        let rest = token.strip_prefix(SA_PREFIX)?;
        let (sa, node) = rest.split_once('@')?;
        let (namespace, name) = sa.split_once(':')?;
        (!namespace.is_empty() && !name.is_empty() && !node.is_empty()).then(|| {
            Identity::ServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
                node: node.into(),
            }
        })
    }

    /// The user name the API server would print in a Forbidden message.
    pub fn user(&self) -> String {
        match self {
            Identity::Admin => "fake-admin".into(),
            Identity::ServiceAccount {
                namespace, name, ..
            } => format!("{SA_PREFIX}{namespace}:{name}"),
        }
    }
}

/// What a resource request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Attributes {
    /// `resource` or `resource/subresource`, as RBAC rules spell it.
    fn full_resource(&self) -> String {
        match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// The API server's Forbidden message for these attributes.
    pub fn forbidden_message(&self, user: &str) -> String {
        let object = match &self.name {
            Some(n) => format!("{} \"{n}\"", self.full_resource()),
            None => self.full_resource(),
        };
        let scope = match &self.namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".into(),
        };
        format!(
            "{object} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\"{scope}",
            self.verb,
            self.full_resource(),
            self.api_group
        )
    }
}

/// One PolicyRule, scoped to a namespace when it came from a Role.
#[derive(Debug, Clone)]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    resource_names: Vec<String>,
    namespace: Option<String>,
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

fn matches(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

impl Rule {
    fn allows(&self, a: &Attributes) -> bool {
        if let Some(ns) = &self.namespace
            && a.namespace.as_deref() != Some(ns.as_str())
        {
            return false;
        }
        matches(&self.verbs, &a.verb)
            && matches(&self.api_groups, &a.api_group)
            && matches(&self.resources, &a.full_resource())
            && (self.resource_names.is_empty()
                || a.name
                    .as_deref()
                    .is_some_and(|n| self.resource_names.iter().any(|r| r == n)))
    }
}

/// The RBAC rules of one ServiceAccount.
#[derive(Debug, Clone)]
pub struct Rbac {
    namespace: String,
    name: String,
    rules: Vec<Rule>,
}

impl Rbac {
    /// The rules that `objects` (Roles, ClusterRoles and their bindings, as rendered) grant to
    /// ServiceAccount `namespace/name`: ClusterRoleBindings grant cluster-wide, RoleBindings
    /// only in their own namespace (also when they reference a ClusterRole).
    pub fn from_objects(objects: &[Value], namespace: &str, name: &str) -> Rbac {
        let role = |kind: &str, role_name: &str, ns: Option<&str>| -> Option<&Value> {
            objects.iter().find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == role_name
                    && (kind == "ClusterRole" || o["metadata"]["namespace"].as_str() == ns)
            })
        };
        let mut rules = Vec::new();
        for b in objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
        {
            let binds_us = b["subjects"].as_array().is_some_and(|s| {
                s.iter().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == name
                        && s["namespace"] == namespace
                })
            });
            if !binds_us {
                continue;
            }
            let scope = (b["kind"] == "RoleBinding")
                .then(|| b["metadata"]["namespace"].as_str().unwrap_or("default"));
            let kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_name = b["roleRef"]["name"].as_str().unwrap_or_default();
            let Some(r) = role(kind, role_name, scope) else {
                continue; // a binding to a missing role grants nothing, as on a real server
            };
            for rule in r["rules"].as_array().into_iter().flatten() {
                rules.push(Rule {
                    api_groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    verbs: strings(&rule["verbs"]),
                    resource_names: strings(&rule["resourceNames"]),
                    namespace: scope.map(str::to_string),
                });
            }
        }
        Rbac {
            namespace: namespace.into(),
            name: name.into(),
            rules,
        }
    }

    /// The agent's RBAC from `kubectl kustomize manifests/base`, rendered once per process.
    pub fn shipped() -> Arc<Rbac> {
        Rbac::shipped_for(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)
    }

    /// The RBAC `manifests/base` grants ServiceAccount `namespace/name` (the agent's, the
    /// aggregator's; none for any other).
    pub fn shipped_for(namespace: &str, name: &str) -> Arc<Rbac> {
        static SHIPPED: Mutex<BTreeMap<(String, String), Arc<Rbac>>> = Mutex::new(BTreeMap::new());
        let mut cache = SHIPPED.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((namespace.to_string(), name.to_string()))
            .or_insert_with(|| Arc::new(Rbac::from_objects(shipped_objects(), namespace, name)))
            .clone()
    }

    /// Whether `who` may do `a`: the admin always; a ServiceAccount when these are its rules
    /// and one of them allows it; any other ServiceAccount never.
    pub fn allows(&self, who: &Identity, a: &Attributes) -> bool {
        match who {
            Identity::Admin => true,
            Identity::ServiceAccount {
                namespace, name, ..
            } => {
                *namespace == self.namespace
                    && *name == self.name
                    && self.rules.iter().any(|r| r.allows(a))
            }
        }
    }
}

/// The request's attributes (see the module doc). `segs` are the path's segments after
/// `/api/v1` or `/apis/{group}/{version}`.
pub fn attributes(
    method: &str,
    api_group: &str,
    segs: &[&str],
    field_selector: Option<&str>,
    watch: bool,
) -> Option<Attributes> {
    let (namespace, rest) = match segs {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, segs),
    };
    let (resource, name, subresource) = match rest {
        [r] => (r.to_string(), None, None),
        [r, n] => (r.to_string(), Some(n.to_string()), None),
        [r, n, s] => (r.to_string(), Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    let verb = match (method, name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    // As RequestInfo: a list/watch selecting one name by field is authorized as that name.
    let name = name.or_else(|| {
        field_selector.and_then(|fs| {
            fs.split(',').find_map(|term| {
                term.strip_prefix("metadata.name==")
                    .or_else(|| term.strip_prefix("metadata.name="))
                    .map(str::to_string)
            })
        })
    });
    Some(Attributes {
        verb: verb.into(),
        api_group: api_group.into(),
        resource,
        subresource,
        namespace,
        name,
    })
}
