//! The resource table (which kinds the fake serves, under which group/version, namespaced or not)
//! and the discovery documents built from it: `/version`, `/api`, `/api/v1`, `/apis` and
//! `/apis/{group}/{version}`, in the legacy (non-aggregated) JSON form that kubectl and kube-rs
//! both accept.

use serde_json::{Value, json};

/// One served resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    Pods,
    Nodes,
    PersistentVolumes,
    Events,
    ReplicaSets,
    DaemonSets,
    PodDisruptionBudgets,
    Leases,
    EventsV1,
    EndpointSlices,
    Services,
    ConfigMaps,
}

/// Static facts about a resource type.
#[derive(Debug)]
pub struct ResInfo {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// `status` when the resource has a status subresource.
    pub has_status: bool,
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl Res {
    pub const ALL: [Res; 12] = [
        Res::Pods,
        Res::Nodes,
        Res::PersistentVolumes,
        Res::Events,
        Res::ReplicaSets,
        Res::DaemonSets,
        Res::PodDisruptionBudgets,
        Res::Leases,
        Res::EventsV1,
        Res::EndpointSlices,
        Res::Services,
        Res::ConfigMaps,
    ];

    pub fn info(self) -> &'static ResInfo {
        macro_rules! info {
            ($g:expr, $p:expr, $s:expr, $k:expr, $ns:expr, $short:expr, $status:expr) => {{
                static I: ResInfo = ResInfo {
                    group: $g,
                    version: "v1",
                    plural: $p,
                    singular: $s,
                    kind: $k,
                    namespaced: $ns,
                    short_names: $short,
                    has_status: $status,
                };
                &I
            }};
        }
        match self {
            Res::Pods => info!("", "pods", "pod", "Pod", true, &["po"], true),
            Res::Nodes => info!("", "nodes", "node", "Node", false, &["no"], true),
            Res::PersistentVolumes => info!(
                "",
                "persistentvolumes",
                "persistentvolume",
                "PersistentVolume",
                false,
                &["pv"],
                true
            ),
            Res::Events => info!("", "events", "event", "Event", true, &["ev"], false),
            Res::ReplicaSets => info!(
                "apps",
                "replicasets",
                "replicaset",
                "ReplicaSet",
                true,
                &["rs"],
                true
            ),
            Res::DaemonSets => info!(
                "apps",
                "daemonsets",
                "daemonset",
                "DaemonSet",
                true,
                &["ds"],
                true
            ),
            Res::PodDisruptionBudgets => info!(
                "policy",
                "poddisruptionbudgets",
                "poddisruptionbudget",
                "PodDisruptionBudget",
                true,
                &["pdb"],
                true
            ),
            Res::Leases => info!(
                "coordination.k8s.io",
                "leases",
                "lease",
                "Lease",
                true,
                &[],
                false
            ),
            Res::EventsV1 => info!(
                "events.k8s.io",
                "events",
                "event",
                "Event",
                true,
                &["ev"],
                false
            ),
            Res::Services => info!("", "services", "service", "Service", true, &["svc"], true),
            Res::ConfigMaps => info!(
                "",
                "configmaps",
                "configmap",
                "ConfigMap",
                true,
                &["cm"],
                false
            ),
            Res::EndpointSlices => info!(
                "discovery.k8s.io",
                "endpointslices",
                "endpointslice",
                "EndpointSlice",
                true,
                &[],
                false
            ),
        }
    }

    /// `apiVersion` of this resource's objects (`v1`, `apps/v1`, ...).
    pub fn api_version(self) -> String {
        let i = self.info();
        if i.group.is_empty() {
            i.version.to_string()
        } else {
            format!("{}/{}", i.group, i.version)
        }
    }

    /// `pods`, `replicasets.apps`: the form used in Status messages.
    pub fn qualified(self) -> String {
        let i = self.info();
        if i.group.is_empty() {
            i.plural.to_string()
        } else {
            format!("{}.{}", i.plural, i.group)
        }
    }

    /// The resource served under `group`/`version` with this plural name.
    pub fn lookup(group: &str, version: &str, plural: &str) -> Option<Res> {
        Res::ALL.into_iter().find(|r| {
            let i = r.info();
            i.group == group && i.version == version && i.plural == plural
        })
    }
}

/// The API groups besides the legacy core group, in discovery order.
const GROUPS: [&str; 5] = [
    "apps",
    "policy",
    "coordination.k8s.io",
    "events.k8s.io",
    "discovery.k8s.io",
];

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `GET /api`: APIVersions.
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]
    })
}

/// `GET /apis`: APIGroupList.
pub fn group_list() -> Value {
    let groups: Vec<Value> = GROUPS
        .iter()
        .map(|g| {
            let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/{group}`: APIGroup.
pub fn group(group: &str) -> Option<Value> {
    GROUPS.contains(&group).then(|| {
        let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group,
               "versions": [gv.clone()], "preferredVersion": gv})
    })
}

/// `GET /api/v1` or `/apis/{group}/{version}`: APIResourceList, with subresources
/// (`pods/eviction` names its group and version, which `kubectl drain` requires).
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in Res::ALL {
        let i = r.info();
        if i.group != group || i.version != version {
            continue;
        }
        resources.push(json!({
            "name": i.plural,
            "singularName": i.singular,
            "namespaced": i.namespaced,
            "kind": i.kind,
            "verbs": VERBS,
            "shortNames": i.short_names,
        }));
        if i.has_status {
            resources.push(json!({
                "name": format!("{}/status", i.plural),
                "singularName": "",
                "namespaced": i.namespaced,
                "kind": i.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r == Res::Pods {
            resources.push(json!({
                "name": "pods/eviction",
                "singularName": "",
                "namespaced": true,
                "group": "policy",
                "version": "v1",
                "kind": "Eviction",
                "verbs": ["create"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}
