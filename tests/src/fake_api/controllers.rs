//! The small part of the control plane the fake simulates: graceful pod deletion (the kubelet
//! removing a terminating pod after its grace period) and the ReplicaSet controller replacing a
//! deleted pod on another node, which becomes Ready a little later. DaemonSet pods are never
//! recreated elsewhere.

use std::time::Duration;

use serde_json::{Value, json};

use super::pdb::controller_of;
use super::resources::Res;
use super::store::{ApiError, State, now_rfc3339};

/// Timing and placement of the simulated controllers.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// From a ReplicaSet pod's removal to its replacement's creation.
    pub replace_delay: Duration,
    /// From a replacement's creation to it turning Ready.
    pub ready_delay: Duration,
    /// `spec.nodeName` of replacement pods.
    pub other_node: String,
    /// The length of one second of a pod's grace period (tests scale it down).
    pub grace_second: Duration,
    /// From a write to the disruption controller's next PDB status update; `None` stops the
    /// controller (status is then only what tests write).
    pub pdb_lag: Option<Duration>,
    /// How long an entry of `status.disruptedPods` keeps its pod out of the healthy count when
    /// the pod is not deleted (the controller's `DeletionTimeout`, 2 minutes).
    pub disrupted_pod_timeout: Duration,
    /// Whether Node writes record `metadata.managedFields` (docs/fake-api-server.md section
    /// 4); `false` is a server that keeps none (or a proxy stripping them).
    pub managed_fields: bool,
}

/// Default disruption-controller lag: long enough that a client acting on a PDB's status races
/// a stale one, short enough that drains in tests are not slowed much.
pub const DEFAULT_PDB_LAG: Duration = Duration::from_millis(100);

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            replace_delay: Duration::from_millis(200),
            ready_delay: Duration::from_millis(500),
            other_node: "node-other".into(),
            grace_second: Duration::from_secs(1),
            pdb_lag: Some(DEFAULT_PDB_LAG),
            disrupted_pod_timeout: Duration::from_secs(120),
            managed_fields: true,
        }
    }
}

/// Delayed work scheduled by an operation.
#[derive(Debug, Clone)]
pub enum Followup {
    /// Remove a terminating pod (if it is still the same pod) after its grace period.
    FinalizePod {
        ns: String,
        name: String,
        uid: String,
        after: Duration,
    },
    /// Create a replacement pod for ReplicaSet `rs`.
    Replace { ns: String, rs: String },
    /// Mark a replacement pod Ready.
    MarkReady { ns: String, name: String },
}

impl Followup {
    pub fn delay(&self, cfg: &ControllerConfig) -> Duration {
        match self {
            Followup::FinalizePod { after, .. } => cfg.grace_second.mul_f64(after.as_secs_f64()),
            Followup::Replace { .. } => cfg.replace_delay,
            Followup::MarkReady { .. } => cfg.ready_delay,
        }
    }
}

/// Checks `preconditions` (uid, resourceVersion) of DeleteOptions against `obj`.
pub fn check_preconditions(res: Res, obj: &Value, opts: &Value) -> Result<(), ApiError> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let pre = &opts["preconditions"];
    if let Some(uid) = pre["uid"].as_str()
        && obj["metadata"]["uid"] != uid
    {
        return Err(ApiError::conflict(
            res,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                obj["metadata"]["uid"].as_str().unwrap_or_default()
            ),
        ));
    }
    if let Some(rv) = pre["resourceVersion"].as_str()
        && obj["metadata"]["resourceVersion"] != rv
    {
        return Err(ApiError::conflict(
            res,
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                obj["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// Deletes a pod. A grace period > 0 (from the request, else the pod's
/// `terminationGracePeriodSeconds`, else 0) marks it terminating and removes it later.
/// Returns the pod as it is after the call.
pub fn delete_pod(
    state: &mut State,
    ns: &str,
    name: &str,
    grace: Option<i64>,
    opts: &Value,
) -> Result<Value, ApiError> {
    let pod = state
        .get(Res::Pods, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(Res::Pods, name))?;
    check_preconditions(Res::Pods, &pod, opts)?;
    let grace = grace
        .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(0)
        .max(0);
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if grace == 0 && !has_finalizers(&pod) {
        return Ok(remove_pod(state, ns, name).unwrap_or(pod));
    }
    if !pod["metadata"]["deletionTimestamp"].is_null() {
        return Ok(pod);
    }
    if grace == 0 {
        // Finalizers hold it: Terminating until the last one is removed.
        state.grace_over.insert(uid);
        let mut updated = pod.clone();
        updated["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        updated["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        return Ok(state.replace(Res::Pods, updated));
    }
    let mut updated = pod.clone();
    updated["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
    updated["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    let updated = state.replace(Res::Pods, updated);
    state.followups.push(Followup::FinalizePod {
        ns: ns.into(),
        name: name.into(),
        uid: pod["metadata"]["uid"].as_str().unwrap_or_default().into(),
        after: Duration::from_secs(grace as u64),
    });
    Ok(updated)
}

fn has_finalizers(pod: &Value) -> bool {
    pod["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// Removes the Terminating pods whose grace period is over once their last finalizer is gone
/// (run after every write, as the API server deletes such an object on the update that empties
/// `metadata.finalizers`).
pub fn release_finalized(state: &mut State) {
    if state.grace_over.is_empty() {
        return;
    }
    let ready: Vec<(String, String, String)> = state
        .list(Res::Pods, None)
        .iter()
        .filter(|p| {
            p["metadata"]["uid"]
                .as_str()
                .is_some_and(|u| state.grace_over.contains(u))
                && !has_finalizers(p)
        })
        .map(|p| {
            (
                p["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for (ns, name, uid) in ready {
        state.grace_over.remove(&uid);
        remove_pod(state, &ns, &name);
    }
}

/// Removes a pod for good and, when a ReplicaSet that still exists owns it, schedules a
/// replacement.
fn remove_pod(state: &mut State, ns: &str, name: &str) -> Option<Value> {
    let pod = state.remove(Res::Pods, ns, name)?;
    if let Some(owner) = controller_of(&pod)
        && owner["kind"] == "ReplicaSet"
        && let Some(rs) = owner["name"].as_str()
        && state.get(Res::ReplicaSets, ns, rs).is_some()
    {
        state.followups.push(Followup::Replace {
            ns: ns.into(),
            rs: rs.into(),
        });
    }
    Some(pod)
}

/// Runs one delayed follow-up.
pub fn run(state: &mut State, cfg: &ControllerConfig, fu: Followup) {
    match fu {
        Followup::FinalizePod { ns, name, uid, .. } => {
            let held = state
                .get(Res::Pods, &ns, &name)
                .filter(|p| p["metadata"]["uid"] == uid.as_str())
                .map(has_finalizers);
            match held {
                // The grace period is over, but finalizers hold the pod.
                Some(true) => {
                    state.grace_over.insert(uid);
                }
                Some(false) => {
                    remove_pod(state, &ns, &name);
                }
                None => {}
            }
        }
        Followup::Replace { ns, rs } => {
            if let Some(name) = create_replacement(state, cfg, &ns, &rs) {
                state.followups.push(Followup::MarkReady { ns, name });
            }
        }
        Followup::MarkReady { ns, name } => {
            if let Some(pod) = state.get(Res::Pods, &ns, &name).cloned() {
                state.replace(Res::Pods, with_readiness(pod, true));
            }
        }
    }
}

/// Sets phase Running and the Ready condition / container readiness.
pub fn with_readiness(mut pod: Value, ready: bool) -> Value {
    let s = if ready { "True" } else { "False" };
    pod["status"]["phase"] = json!("Running");
    pod["status"]["conditions"] = json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "ContainersReady", "status": s},
        {"type": "Ready", "status": s},
    ]);
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    pod["status"]["containerStatuses"] = containers
        .iter()
        .map(|c| {
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": ready,
                   "restartCount": 0, "started": true,
                   "state": {"running": {"startedAt": now_rfc3339()}}})
        })
        .collect();
    pod
}

/// A new pod from the ReplicaSet's template on the "other" node, not Ready yet.
fn create_replacement(
    state: &mut State,
    cfg: &ControllerConfig,
    ns: &str,
    rs_name: &str,
) -> Option<String> {
    let rs = state.get(Res::ReplicaSets, ns, rs_name)?.clone();
    let template = &rs["spec"]["template"];
    let name = format!("{rs_name}-{}", state.token(5));
    let mut spec = template["spec"].clone();
    spec["nodeName"] = json!(cfg.other_node);
    let pod = json!({
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": template["metadata"]["labels"],
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                "uid": rs["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": spec,
        "status": {"podIP": format!("10.244.9.{}", state.seq % 250 + 1)},
    });
    state
        .create(Res::Pods, with_readiness(pod, false))
        .ok()
        .map(|_| name)
}
