//! PodDisruptionBudget math (as the disruption controller computes it) and the Eviction
//! subresource (as the API server's eviction REST handler decides it).

use serde_json::{Value, json};

use super::controllers;
use super::resources::Res;
use super::selectors::LabelSelector;
use super::store::{ApiError, PdbSample, State};

/// The status numbers of one PDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Budget {
    pub expected: i64,
    pub desired_healthy: i64,
    pub current_healthy: i64,
    pub disruptions_allowed: i64,
}

/// `intstr` scaling: an int is itself; `"N%"` is N% of `total`, rounded up when `round_up`.
pub fn scaled(v: &Value, total: i64, round_up: bool) -> Result<i64, String> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    let s = v
        .as_str()
        .ok_or_else(|| format!("invalid int-or-string {v}"))?;
    let pct: i64 = s
        .strip_suffix('%')
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            format!(
                "invalid value for IntOrString: invalid type: string is not a percentage: {s:?}"
            )
        })?;
    let prod = pct * total;
    Ok(if round_up {
        (prod + 99) / 100
    } else {
        prod / 100
    })
}

/// Condition Ready=True.
pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

pub fn is_terminating(pod: &Value) -> bool {
    !pod["metadata"]["deletionTimestamp"].is_null()
}

/// The pod's controller owner reference, if any.
pub fn controller_of(pod: &Value) -> Option<&Value> {
    pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)
}

/// Pods in the PDB's namespace matched by its selector.
pub fn pods_of<'a>(pdb: &Value, pods: &'a [Value]) -> Vec<&'a Value> {
    let ns = pdb["metadata"]["namespace"].as_str().unwrap_or_default();
    let Ok(sel) = LabelSelector::from_object(pdb["spec"].get("selector")) else {
        return Vec::new();
    };
    pods.iter()
        .filter(|p| p["metadata"]["namespace"] == ns && sel.matches_object(p))
        .collect()
}

/// Expected pod count from the pods' controllers: each owning ReplicaSet's `spec.replicas` once;
/// pods without a (known) ReplicaSet count as one each.
fn expected_from_controllers(state: &State, ns: &str, pods: &[&Value]) -> i64 {
    let mut seen = Vec::new();
    let mut total = 0;
    for p in pods {
        let rs = controller_of(p)
            .filter(|o| o["kind"] == "ReplicaSet")
            .and_then(|o| o["name"].as_str())
            .and_then(|n| state.get(Res::ReplicaSets, ns, n).map(|rs| (n, rs)));
        match rs {
            Some((n, rs)) => {
                if !seen.contains(&n) {
                    seen.push(n);
                    total += rs["spec"]["replicas"].as_i64().unwrap_or(1);
                }
            }
            None => total += 1,
        }
    }
    total
}

/// The disruption controller's computation for one PDB.
pub fn budget(state: &State, pdb: &Value, pods: &[&Value]) -> Budget {
    let ns = pdb["metadata"]["namespace"].as_str().unwrap_or_default();
    let spec = &pdb["spec"];
    let current_healthy = pods
        .iter()
        .filter(|p| is_ready(p) && !is_terminating(p))
        .count() as i64;
    let (expected, desired) = if !spec["maxUnavailable"].is_null() {
        let expected = expected_from_controllers(state, ns, pods);
        let max_unavailable = scaled(&spec["maxUnavailable"], expected, true).unwrap_or(0);
        (expected, (expected - max_unavailable).max(0))
    } else if let Some(min) = spec["minAvailable"].as_i64() {
        (pods.len() as i64, min)
    } else if !spec["minAvailable"].is_null() {
        let expected = expected_from_controllers(state, ns, pods);
        (
            expected,
            scaled(&spec["minAvailable"], expected, true).unwrap_or(0),
        )
    } else {
        // Neither set: minAvailable defaults to 1 in policy/v1.
        (pods.len() as i64, 1)
    };
    Budget {
        expected,
        desired_healthy: desired,
        current_healthy,
        disruptions_allowed: (current_healthy - desired).max(0),
    }
}

/// Recomputes every PDB's status, writes the ones that changed and records audit samples when a
/// PDB's (healthy, desired) pair changes.
pub fn reconcile(state: &mut State) {
    let pods = state.list(Res::Pods, None);
    for pdb in state.list(Res::PodDisruptionBudgets, None) {
        let b = budget(state, &pdb, &pods_of(&pdb, &pods));
        let key = format!(
            "{}/{}",
            pdb["metadata"]["namespace"].as_str().unwrap_or_default(),
            pdb["metadata"]["name"].as_str().unwrap_or_default()
        );
        if state.pdb_last.get(&key) != Some(&(b.current_healthy, b.desired_healthy)) {
            state
                .pdb_last
                .insert(key.clone(), (b.current_healthy, b.desired_healthy));
            state.audit.push(PdbSample {
                time: std::time::SystemTime::now(),
                pdb: key,
                healthy: b.current_healthy,
                desired_healthy: b.desired_healthy,
            });
        }
        let allowed = b.disruptions_allowed > 0;
        let status = json!({
            "observedGeneration": pdb["metadata"]["generation"],
            "currentHealthy": b.current_healthy,
            "desiredHealthy": b.desired_healthy,
            "disruptionsAllowed": b.disruptions_allowed,
            "expectedPods": b.expected,
            "conditions": [{
                "type": "DisruptionAllowed",
                "status": if allowed { "True" } else { "False" },
                "reason": if allowed { "SufficientPods" } else { "InsufficientPods" },
                "message": "",
                "observedGeneration": pdb["metadata"]["generation"],
                "lastTransitionTime": pdb["metadata"]["creationTimestamp"],
            }],
        });
        let changed = [
            "currentHealthy",
            "desiredHealthy",
            "disruptionsAllowed",
            "expectedPods",
        ]
        .iter()
        .any(|f| pdb["status"][f] != status[f]);
        if changed {
            let mut updated = pdb.clone();
            updated["status"] = status;
            state.replace(Res::PodDisruptionBudgets, updated);
        }
    }
}

fn too_many_requests(pdb: &Value, b: &Budget) -> ApiError {
    let name = pdb["metadata"]["name"].as_str().unwrap_or_default();
    let mut e = ApiError::new(
        429,
        "TooManyRequests",
        "Cannot evict pod as it would violate the pod's disruption budget.",
    );
    e.details = Some(json!({"causes": [{
        "reason": "DisruptionBudget",
        "message": format!(
            "The disruption budget {name} needs {} healthy pods and has {} currently",
            b.desired_healthy, b.current_healthy
        ),
    }]}));
    e
}

/// `POST .../pods/{name}/eviction`: deletes the pod when no PDB forbids it.
pub fn evict(state: &mut State, ns: &str, name: &str, body: &Value) -> Result<Value, ApiError> {
    if let Some(n) = body["metadata"]["name"].as_str()
        && n != name
    {
        return Err(ApiError::bad_request(
            "name in URL does not match name in Eviction object",
        ));
    }
    let pod = state
        .get(Res::Pods, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(Res::Pods, name))?;
    let opts = &body["deleteOptions"];
    let delete = |state: &mut State| {
        controllers::delete_pod(state, ns, name, opts["gracePeriodSeconds"].as_i64(), opts)?;
        Ok(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        )
    };
    // Terminal, pending or already terminating pods are not protected by budgets.
    let phase = pod["status"]["phase"].as_str().unwrap_or_default();
    if matches!(phase, "Succeeded" | "Failed" | "Pending") || is_terminating(&pod) {
        return delete(state);
    }
    let pods = state.list(Res::Pods, None);
    let pdbs: Vec<Value> = state
        .list(Res::PodDisruptionBudgets, Some(ns))
        .into_iter()
        .filter(|pdb| {
            LabelSelector::from_object(pdb["spec"].get("selector"))
                .is_ok_and(|s| s.matches_object(&pod))
        })
        .collect();
    let pdb = match pdbs.as_slice() {
        [] => return delete(state),
        [one] => one,
        _ => {
            let msg = "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.";
            let mut e = ApiError::new(
                500,
                "InternalError",
                format!("Internal error occurred: {msg}"),
            );
            e.details = Some(json!({"causes": [{"message": msg}]}));
            return Err(e);
        }
    };
    let b = budget(state, pdb, &pods_of(pdb, &pods));
    if !is_ready(&pod) {
        let always = pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow";
        if always || (b.current_healthy >= b.desired_healthy && b.desired_healthy > 0) {
            return delete(state);
        }
    }
    if b.disruptions_allowed <= 0 {
        return Err(too_many_requests(pdb, &b));
    }
    delete(state)
}
