//! Field ownership (`metadata.managedFields`) of Node writes, as the API server's field
//! manager records it for an `Update` (POST, PUT, and every PATCH flavour but server-side
//! apply, recorded here too with `operation: Apply` yet without its conflict checks). It owns
//! the bookkeeping only: which manager last set each field; it never refuses a write.
//!
//! The algorithm is structured-merge-diff's `Updater.Update` (force, as for every Update):
//! compare the live object with the new one into added, modified and removed leaf fields;
//! every other manager loses the added and modified fields (ownership moves to the writer) and
//! the removed ones; the writer's entry gains the added and modified fields and loses the
//! removed ones; an entry left empty is dropped. A write that changes nothing (a field set to
//! the value it has) moves nothing: the owner stays. The writer's `time` is set only when its
//! write changed something (the `ManagedFieldsEntry.time` contract: not updated when another
//! manager takes a field over). Lists are atomic leaves (a real server keys associative
//! lists by `k:`/`v:`), empty maps are not tracked, and neither are `status` on the main
//! resource (the strategy drops it there) nor the server-set metadata.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A field path as fieldsV1 spells it: `["f:spec", "f:unschedulable"]`.
type Path = Vec<String>;

/// Metadata the server sets: never owned by a manager.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
];

/// The manager of a write: the `fieldManager` query parameter, else the User-Agent up to its
/// first `/` (the API server's `prefixFromUserAgent`: "kubectl/v1.31.0 (linux/amd64) ..." is
/// "kubectl"), else "unknown".
pub fn manager_of(field_manager: Option<&str>, user_agent: Option<&str>) -> String {
    if let Some(m) = field_manager.filter(|m| !m.is_empty()) {
        return m.to_string();
    }
    user_agent
        .and_then(|ua| ua.split('/').next())
        .filter(|p| !p.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

/// The leaf fields of `obj` a manager can own, with their values.
fn leaves(obj: &Value, subresource: Option<&str>) -> Vec<(Path, Value)> {
    let mut out = Vec::new();
    let Some(top) = obj.as_object() else {
        return out;
    };
    for (k, v) in top {
        let tracked = match k.as_str() {
            "apiVersion" | "kind" => false,
            "status" => subresource == Some("status"),
            _ => subresource != Some("status"),
        };
        if !tracked {
            continue;
        }
        if k == "metadata" {
            for (mk, mv) in v.as_object().into_iter().flatten() {
                if !SERVER_METADATA.contains(&mk.as_str()) {
                    walk(mv, vec!["f:metadata".into(), format!("f:{mk}")], &mut out);
                }
            }
        } else {
            walk(v, vec![format!("f:{k}")], &mut out);
        }
    }
    out
}

fn walk(v: &Value, path: Path, out: &mut Vec<(Path, Value)>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let mut p = path.clone();
                p.push(format!("f:{k}"));
                walk(c, p, out);
            }
        }
        Value::Null => {}
        other => out.push((path, other.clone())),
    }
}

/// A manager's fields from its fieldsV1: every leaf of the nested map (a `.` marks the map
/// itself and is kept as its path).
fn decode(fields: &Value) -> BTreeSet<Path> {
    fn go(v: &Value, path: &Path, out: &mut BTreeSet<Path>) {
        let Some(m) = v.as_object() else { return };
        for (k, c) in m {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            let mut p = path.clone();
            p.push(k.clone());
            if c.as_object().is_some_and(Map::is_empty) {
                out.insert(p);
            } else {
                go(c, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    go(fields, &Vec::new(), &mut out);
    out
}

fn encode(set: &BTreeSet<Path>) -> Value {
    let mut root = json!({});
    for path in set {
        let mut at = &mut root;
        for k in path {
            at = at
                .as_object_mut()
                .expect("fieldsV1 nodes are maps")
                .entry(k.clone())
                .or_insert_with(|| json!({}));
        }
    }
    root
}

/// Records the write of `new` over `old` (None: a create) by `manager` in `new`'s
/// `metadata.managedFields`, starting from the entries `new` carries (the live object's, or
/// the ones a client sent, as a real server honours them).
pub fn track(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    operation: &str,
    subresource: Option<&str>,
    now: &str,
) {
    let before: std::collections::BTreeMap<Path, Value> = old
        .map(|o| leaves(o, subresource).into_iter().collect())
        .unwrap_or_default();
    let after: std::collections::BTreeMap<Path, Value> =
        leaves(new, subresource).into_iter().collect();
    let changed: BTreeSet<Path> = after
        .iter()
        .filter(|(p, v)| before.get(*p) != Some(*v))
        .map(|(p, _)| p.clone())
        .collect();
    let removed: BTreeSet<Path> = before
        .keys()
        .filter(|p| !after.contains_key(*p))
        .cloned()
        .collect();
    let sub = subresource.unwrap_or_default();
    let mut entries: Vec<Value> = new["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let is_writer = |e: &Value| {
        e["manager"] == manager
            && e["operation"] == operation
            && e["subresource"].as_str().unwrap_or_default() == sub
    };
    if !entries.iter().any(is_writer) {
        let mut e = json!({"manager": manager, "operation": operation,
            "apiVersion": new["apiVersion"].clone(), "fieldsType": "FieldsV1", "fieldsV1": {}});
        if !sub.is_empty() {
            e["subresource"] = json!(sub);
        }
        entries.push(e);
    }
    let mut kept = Vec::new();
    for mut e in entries {
        let mut set = decode(&e["fieldsV1"]);
        let writer = is_writer(&e);
        // Removed fields leave every owner; changed ones move to the writer. A field of
        // another subresource's manager is never in this write's compare.
        set.retain(|p| !removed.contains(p));
        if writer {
            set.extend(changed.iter().cloned());
            if !changed.is_empty() || !removed.is_empty() {
                e["time"] = json!(now);
            }
        } else {
            set.retain(|p| !changed.contains(p));
        }
        if set.is_empty() {
            continue;
        }
        e["fieldsV1"] = encode(&set);
        kept.push(e);
    }
    if let Some(m) = new["metadata"].as_object_mut() {
        if kept.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(kept));
        }
    }
}

/// The managers owning `path` (fieldsV1 keys, e.g. `["f:spec", "f:unschedulable"]`).
pub fn owners(obj: &Value, path: &[&str]) -> Vec<String> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            decode(&e["fieldsV1"])
                .iter()
                .any(|p| p.iter().map(String::as_str).eq(path.iter().copied()))
        })
        .filter_map(|e| e["manager"].as_str().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(unschedulable: Option<bool>) -> Value {
        let mut n = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "a", "resourceVersion": "1", "labels": {"zone": "a"}},
            "spec": {}, "status": {"phase": "x"}});
        if let Some(u) = unschedulable {
            n["spec"]["unschedulable"] = json!(u);
        }
        n
    }

    fn write(old: &Value, mut new: Value, manager: &str) -> Value {
        new["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
        track(Some(old), &mut new, manager, "Update", None, "t");
        new
    }

    const U: &[&str] = &["f:spec", "f:unschedulable"];

    #[test]
    fn ownership_moves_to_the_last_writer_and_a_removed_field_leaves_its_owner() {
        let n0 = node(None);
        let n1 = write(&n0, node(Some(true)), "nodekeeper");
        assert_eq!(owners(&n1, U), ["nodekeeper"]);
        // The same value again: a no-op keeps the owner.
        let n2 = write(&n1, node(Some(true)), "kubectl");
        assert_eq!(owners(&n2, U), ["nodekeeper"]);
        // kubectl uncordon removes the field: no owner.
        let n3 = write(&n2, node(None), "kubectl");
        assert!(owners(&n3, U).is_empty(), "{}", n3["metadata"]);
        let n4 = write(&n3, node(Some(true)), "kubectl");
        assert_eq!(owners(&n4, U), ["kubectl"]);
        // Set to false by one manager, then true by another: moves.
        let n5 = write(&n4, node(Some(false)), "nodekeeper");
        let n6 = write(&n5, node(Some(true)), "kubectl");
        assert_eq!(owners(&n6, U), ["kubectl"]);
        assert!(owners(&n6, &["f:status", "f:phase"]).is_empty());
    }

    #[test]
    fn the_manager_is_the_field_manager_else_the_user_agent_prefix() {
        assert_eq!(manager_of(Some("nodekeeper"), Some("kube/1")), "nodekeeper");
        assert_eq!(
            manager_of(None, Some("kubectl/v1.31.0 (linux/amd64) kubernetes/abc")),
            "kubectl"
        );
        assert_eq!(manager_of(Some(""), None), "unknown");
    }
}
