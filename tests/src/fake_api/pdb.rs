//! PodDisruptionBudgets: the disruption controller's status computation (run asynchronously, a
//! configurable lag after each change, by `Store::spawn_disruption_controller`), the truth-based
//! audit (run synchronously after every write), and the Eviction subresource, which decides from
//! the PDB's *status* as the API server's `pkg/registry/core/pod/storage/eviction.go` does.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::controllers;
use super::resources::Res;
use super::selectors::LabelSelector;
use super::store::{ApiError, PdbSample, State, now_rfc3339};

/// `MaxDisruptedPodSize` in eviction.go: more approved-but-unconfirmed evictions are refused.
pub const MAX_DISRUPTED_POD_SIZE: usize = 2000;

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

/// `metav1.LabelSelectorAsSelector`: a missing selector matches nothing, `{}` everything, a
/// malformed one nothing (eviction.go skips it).
fn selects(pdb: &Value, pod: &Value) -> bool {
    match pdb["spec"].get("selector") {
        None | Some(Value::Null) => false,
        Some(s) => LabelSelector::from_object(Some(s)).is_ok_and(|s| s.matches_object(pod)),
    }
}

/// Pods in the PDB's namespace matched by its selector.
pub fn pods_of<'a>(pdb: &Value, pods: &'a [Value]) -> Vec<&'a Value> {
    let ns = pdb["metadata"]["namespace"].as_str().unwrap_or_default();
    pods.iter()
        .filter(|p| p["metadata"]["namespace"] == ns && selects(pdb, p))
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

/// The disruption controller's computation for one PDB. `excluded` are pod names the eviction
/// handler has approved for deletion (`status.disruptedPods`) and that therefore no longer count
/// as healthy; the audit passes none (it measures what is true, not what was promised).
pub fn budget(state: &State, pdb: &Value, pods: &[&Value], excluded: &[String]) -> Budget {
    let ns = pdb["metadata"]["namespace"].as_str().unwrap_or_default();
    let spec = &pdb["spec"];
    let current_healthy = pods
        .iter()
        .filter(|p| is_ready(p) && !is_terminating(p))
        .filter(|p| {
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            !excluded.iter().any(|e| e == name)
        })
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

fn key_of(pdb: &Value) -> String {
    format!(
        "{}/{}",
        pdb["metadata"]["namespace"].as_str().unwrap_or_default(),
        pdb["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Records an audit sample for every PDB whose true (healthy, desired) pair changed: run after
/// every write, independent of the (lagging) status, so a violation cannot hide behind it.
pub fn audit(state: &mut State) {
    let pods = state.list(Res::Pods, None);
    for pdb in state.list(Res::PodDisruptionBudgets, None) {
        let b = budget(state, &pdb, &pods_of(&pdb, &pods), &[]);
        let key = key_of(&pdb);
        if state.pdb_last.get(&key) != Some(&(b.current_healthy, b.desired_healthy)) {
            state
                .pdb_last
                .insert(key.clone(), (b.current_healthy, b.desired_healthy));
            state.audit.push(PdbSample {
                time: SystemTime::now(),
                pdb: key,
                healthy: b.current_healthy,
                desired_healthy: b.desired_healthy,
            });
        }
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

/// `DisruptionAllowed` condition as `pdbhelper.UpdateDisruptionAllowedCondition` sets it.
fn allowed_condition(allowed: bool, generation: &Value, since: &Value) -> Value {
    json!({
        "type": "DisruptionAllowed",
        "status": if allowed { "True" } else { "False" },
        "reason": if allowed { "SufficientPods" } else { "InsufficientPods" },
        "message": "",
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

/// One pass of the disruption controller (`pkg/controller/disruption`): for every PDB, keeps the
/// `disruptedPods` entries of pods that still exist, are not terminating and whose deadline
/// (`timeout` after the eviction) has not passed, counts healthy pods without them, and writes
/// `status` with `observedGeneration`. Returns the earliest deadline of a kept entry, when the
/// controller must look again even if nothing changes.
pub fn sync_status(state: &mut State, timeout: Duration) -> Option<SystemTime> {
    let now = SystemTime::now();
    let pods = state.list(Res::Pods, None);
    let mut recheck: Option<SystemTime> = None;
    for pdb in state.list(Res::PodDisruptionBudgets, None) {
        let selected = pods_of(&pdb, &pods);
        let mut disrupted = serde_json::Map::new();
        if let Some(map) = pdb["status"]["disruptedPods"].as_object() {
            for (name, at) in map {
                let live = selected
                    .iter()
                    .any(|p| p["metadata"]["name"] == name.as_str() && !is_terminating(p));
                let deadline = at.as_str().and_then(parse_time).map(|t| t + timeout);
                if let (true, Some(deadline)) = (live, deadline)
                    && deadline > now
                {
                    recheck = Some(recheck.map_or(deadline, |r| r.min(deadline)));
                    disrupted.insert(name.clone(), at.clone());
                }
            }
        }
        let excluded: Vec<String> = disrupted.keys().cloned().collect();
        let b = budget(state, &pdb, &selected, &excluded);
        let generation = pdb["metadata"]["generation"].clone();
        let allowed = b.disruptions_allowed > 0;
        let old_cond = pdb["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "DisruptionAllowed"))
            .cloned()
            .unwrap_or(Value::Null);
        let since = if old_cond["status"] == if allowed { "True" } else { "False" } {
            old_cond["lastTransitionTime"].clone()
        } else {
            json!(now_rfc3339())
        };
        let mut status = json!({
            "observedGeneration": generation,
            "currentHealthy": b.current_healthy,
            "desiredHealthy": b.desired_healthy,
            "disruptionsAllowed": b.disruptions_allowed,
            "expectedPods": b.expected,
            "conditions": [allowed_condition(allowed, &generation, &since)],
        });
        if !disrupted.is_empty() {
            status["disruptedPods"] = Value::Object(disrupted);
        }
        if pdb["status"] != status {
            let mut updated = pdb.clone();
            updated["status"] = status;
            state.replace(Res::PodDisruptionBudgets, updated);
        }
    }
    recheck
}

fn too_many_requests(cause: String, retry_after: u64) -> ApiError {
    let mut e = ApiError::new(
        429,
        "TooManyRequests",
        "Cannot evict pod as it would violate the pod's disruption budget.",
    );
    let mut details = json!({"causes": [{"reason": "DisruptionBudget", "message": cause}]});
    if retry_after > 0 {
        details["retryAfterSeconds"] = json!(retry_after);
        e.retry_after = Some(retry_after);
    }
    e.details = Some(details);
    e
}

/// `createTooManyRequestsError`: the controller has not seen the PDB's current spec yet.
fn still_processing(name: &str) -> ApiError {
    too_many_requests(
        format!("The disruption budget {name} is still being processed by the server."),
        10,
    )
}

fn forbidden(name: &str, why: &str) -> ApiError {
    ApiError::new(
        403,
        "Forbidden",
        format!("poddisruptionbudgets.policy \"{name}\" is forbidden: {why}"),
    )
}

/// `checkAndDecrement`: refuses from the PDB's status, else takes one disruption and records the
/// pod in `disruptedPods` (a status write, kept even when the delete that follows fails, as on a
/// real server).
fn check_and_decrement(
    state: &mut State,
    pdb: &Value,
    pod_name: &str,
    dry_run: bool,
) -> Result<(), ApiError> {
    let name = pdb["metadata"]["name"].as_str().unwrap_or_default();
    let st = &pdb["status"];
    let observed = st["observedGeneration"].as_i64().unwrap_or(0);
    let generation = pdb["metadata"]["generation"].as_i64().unwrap_or(0);
    if observed < generation {
        return Err(still_processing(name));
    }
    let allowed = st["disruptionsAllowed"].as_i64().unwrap_or(0);
    if allowed < 0 {
        return Err(forbidden(name, "pdb disruptions allowed is negative"));
    }
    if st["disruptedPods"]
        .as_object()
        .is_some_and(|m| m.len() > MAX_DISRUPTED_POD_SIZE)
    {
        return Err(forbidden(
            name,
            "DisruptedPods map too big - too many evictions not confirmed by PDB controller",
        ));
    }
    if allowed == 0 {
        return Err(too_many_requests(
            format!(
                "The disruption budget {name} needs {} healthy pods and has {} currently",
                st["desiredHealthy"].as_i64().unwrap_or(0),
                st["currentHealthy"].as_i64().unwrap_or(0)
            ),
            0,
        ));
    }
    if dry_run {
        return Ok(());
    }
    let mut updated = pdb.clone();
    updated["status"]["disruptionsAllowed"] = json!(allowed - 1);
    if allowed - 1 == 0 {
        let generation = pdb["metadata"]["generation"].clone();
        updated["status"]["conditions"] =
            json!([allowed_condition(false, &generation, &json!(now_rfc3339()))]);
    }
    if !updated["status"]["disruptedPods"].is_object() {
        updated["status"]["disruptedPods"] = json!({});
    }
    updated["status"]["disruptedPods"][pod_name] = json!(now_rfc3339());
    state.replace(Res::PodDisruptionBudgets, updated);
    Ok(())
}

/// `propagateDryRun`: the request's `dryRun` query and the Eviction's `deleteOptions.dryRun`
/// must agree when both are given.
fn dry_run_of(body: &Value, query_dry_run: Option<&str>) -> Result<bool, ApiError> {
    let from_query: Vec<String> = query_dry_run
        .map(|q| q.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let from_body: Vec<String> = body["deleteOptions"]["dryRun"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if !from_query.is_empty() && !from_body.is_empty() && from_query != from_body {
        return Err(ApiError::new(
            500,
            "InternalError",
            format!(
                "Internal error occurred: Non-matching dry-run options in request and content: {from_query:?} and {from_body:?}"
            ),
        ));
    }
    let all = if from_body.is_empty() {
        from_query
    } else {
        from_body
    };
    Ok(all.iter().any(|d| d == "All"))
}

/// `getLatestPod` in `addConditionAndDeletePod`: the eviction's own precondition check, with its
/// own messages (the delete that follows would word them differently).
fn eviction_preconditions(pod: &Value, opts: &Value) -> Result<(), ApiError> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let conflict = |why: String| {
        let mut e = ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on Pod \"{name}\": {why}"),
        );
        e.details = Some(json!({"name": name, "kind": "Pod"}));
        e
    };
    let pre = &opts["preconditions"];
    let (uid, rv) = (&pod["metadata"]["uid"], &pod["metadata"]["resourceVersion"]);
    if let Some(want) = pre["uid"].as_str().filter(|u| !u.is_empty())
        && uid != want
    {
        return Err(conflict(format!(
            "the UID in the precondition ({want}) does not match the UID in record ({}). The object might have been deleted and then recreated",
            uid.as_str().unwrap_or_default()
        )));
    }
    if let Some(want) = pre["resourceVersion"].as_str().filter(|r| !r.is_empty())
        && rv != want
    {
        return Err(conflict(format!(
            "the ResourceVersion in the precondition ({want}) does not match the ResourceVersion in record ({}). The object might have been modified",
            rv.as_str().unwrap_or_default()
        )));
    }
    Ok(())
}

/// `addConditionAndDeletePod`: checks the preconditions, marks the pod `DisruptionTarget`
/// (reason `EvictionByEvictionAPI`) and deletes it with the Eviction's `deleteOptions`.
fn condition_and_delete(
    state: &mut State,
    ns: &str,
    name: &str,
    opts: &Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let success = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201});
    let pod = state
        .get(Res::Pods, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(Res::Pods, name))?;
    eviction_preconditions(&pod, opts)?;
    if dry_run {
        return Ok(success);
    }
    let marked = pod["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "DisruptionTarget"));
    let mut opts = opts.clone();
    if !marked {
        let mut updated = pod.clone();
        if !updated["status"]["conditions"].is_array() {
            updated["status"]["conditions"] = json!([]);
        }
        if let Some(c) = updated["status"]["conditions"].as_array_mut() {
            c.push(json!({"type": "DisruptionTarget", "status": "True",
                          "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting",
                          "lastTransitionTime": now_rfc3339()}));
        }
        let updated = state.replace(Res::Pods, updated);
        // We modified it ourselves: a resourceVersion precondition moves with it.
        if !opts["preconditions"]["resourceVersion"].is_null() {
            opts["preconditions"]["resourceVersion"] =
                updated["metadata"]["resourceVersion"].clone();
        }
    }
    controllers::delete_pod(state, ns, name, opts["gracePeriodSeconds"].as_i64(), &opts)?;
    Ok(success)
}

/// `POST .../pods/{name}/eviction`, following eviction.go's `Create`.
pub fn evict(
    state: &mut State,
    ns: &str,
    name: &str,
    body: &Value,
    query_dry_run: Option<&str>,
) -> Result<Value, ApiError> {
    if body["metadata"]["name"].as_str().unwrap_or_default() != name {
        return Err(ApiError::bad_request(
            "name in URL does not match name in Eviction object",
        ));
    }
    let dry_run = dry_run_of(body, query_dry_run)?;
    let opts = &body["deleteOptions"];
    let pod = state
        .get(Res::Pods, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(Res::Pods, name))?;
    // canIgnorePDB: terminal, pending or already terminating pods are not protected by budgets.
    let phase = pod["status"]["phase"].as_str().unwrap_or_default();
    if matches!(phase, "Succeeded" | "Failed" | "Pending") || is_terminating(&pod) {
        return condition_and_delete(state, ns, name, opts, dry_run);
    }
    let pdbs: Vec<Value> = state
        .list(Res::PodDisruptionBudgets, Some(ns))
        .into_iter()
        .filter(|pdb| selects(pdb, &pod))
        .collect();
    let pdb = match pdbs.as_slice() {
        [] => return condition_and_delete(state, ns, name, opts, dry_run),
        [one] => one,
        // Returned by the handler as a Status object with code 500 (no reason, no prefix).
        _ => {
            return Err(ApiError::new(
                500,
                "",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
    };
    if !is_ready(&pod) {
        let st = &pdb["status"];
        let always = pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow";
        let desired = st["desiredHealthy"].as_i64().unwrap_or(0);
        let healthy = st["currentHealthy"].as_i64().unwrap_or(0);
        // An unhealthy pod does not count as healthy: deleting it takes nothing from the budget.
        if always || (healthy >= desired && desired > 0) {
            return condition_and_delete(state, ns, name, opts, dry_run);
        }
    }
    check_and_decrement(state, pdb, name, dry_run)?;
    condition_and_delete(state, ns, name, opts, dry_run)
}
