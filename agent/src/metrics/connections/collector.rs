//! Which namespace belongs to which pod: pod cgroups -> PIDs -> `/proc/PID/ns/net`, each
//! namespace read once even when pods share it, hostNetwork pods narrowed to the sockets their
//! processes hold. Names, labels and deletion timestamps come from the pod watch when connected.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::census::Census;
use super::pins::PinnedRemotes;
use super::summary::{ConnId, summarize_remembering};
use super::{CensusError, ConnectionsConfig, NetnsReading, Source, socket_inodes};
use crate::host::HostPaths;
use crate::kube::PodMeta;
use crate::metrics::CollectError;
use crate::pb;
use crate::pod_cgroups::{self, PodNetns};

#[derive(Debug)]
pub struct ConnectionCollector {
    host: HostPaths,
    config: ConnectionsConfig,
    /// Remotes KEDA queries name: kept as their own pool beyond topRemotes.
    pins: Arc<PinnedRemotes>,
    /// The reader (BPF one pass, sock_diag, procfs), kept between collections; logs and counts
    /// its fallbacks.
    census: Census,
    /// Per namespace (its identity; a pod's union of several, their joined identities): the
    /// connections the last census counted inbound, so that they stay inbound after their
    /// listener closed (decision #18-r). Replaced each census: pruned to what is still open.
    inbound: Mutex<HashMap<String, HashSet<ConnId>>>,
}

/// The inbound connections remembered per namespace at most (a few MB: an identity is a few
/// dozen bytes). Beyond it the namespace's census is an error entry: which connections are
/// inbound is then unknown, not guessed (decision #18-r).
pub const MAX_REMEMBERED_INBOUND: usize = 1 << 16;

impl ConnectionCollector {
    pub fn new(host: HostPaths, config: ConnectionsConfig) -> Self {
        Self {
            census: Census::new(config.source),
            host,
            config,
            pins: Arc::default(),
            inbound: Mutex::default(),
        }
    }

    /// The reader, for its metrics.
    pub fn census(&self) -> &Census {
        &self.census
    }

    /// The pinned remotes every collection keeps apart.
    pub fn pins(&self) -> &Arc<PinnedRemotes> {
        &self.pins
    }

    /// One `PodConnections` per pod cgroup, sorted by UID. Blocking: spawns the census thread.
    pub fn collect(
        &self,
        meta: &HashMap<String, PodMeta>,
    ) -> Result<Vec<pb::PodConnections>, CollectError> {
        let Some(cgroups) = pod_cgroups::list(&self.host) else {
            return Err(CollectError::Unavailable {
                part: "connections",
                why: format!("no kubepods cgroup under {}", self.host.cgroup.display()),
            });
        };
        // Namespaces to read, deduplicated by identity; index 0 is the host's when needed.
        let mut paths: Vec<PathBuf> = Vec::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        let mut host_index = None;
        let mut plan = Vec::with_capacity(cgroups.len());
        for cg in &cgroups {
            let pids = pod_cgroups::pids(&cg.dir);
            let target = match pod_cgroups::classify_netns(&self.host, &pids) {
                PodNetns::Own { path, id } => {
                    let i = *by_id.entry(id.clone()).or_insert_with(|| {
                        paths.push(path);
                        paths.len() - 1
                    });
                    Target::Pod { index: i, id }
                }
                PodNetns::Host { id } => {
                    let i = *host_index.get_or_insert_with(|| {
                        // Our own namespace is the host's (the agent runs with hostNetwork).
                        paths.push(PathBuf::from("/proc/self/ns/net"));
                        paths.len() - 1
                    });
                    Target::Host { index: i, id, pids }
                }
                PodNetns::Several { own, host: None } => {
                    // Every namespace the pod's processes are in, each read once (decision
                    // #18-m): a socket lives in exactly one, so their union counts it once.
                    let mut indices = Vec::with_capacity(own.len());
                    let mut ids = Vec::with_capacity(own.len());
                    for (path, id) in own {
                        indices.push(*by_id.entry(id.clone()).or_insert_with(|| {
                            paths.push(path);
                            paths.len() - 1
                        }));
                        ids.push(id);
                    }
                    Target::Union {
                        indices,
                        id: ids.join(","),
                    }
                }
                PodNetns::Several {
                    own,
                    host: Some(host),
                } => {
                    let ids: Vec<_> = own.into_iter().map(|(_, id)| id).collect();
                    Target::Refused {
                        id: format!("{host},{}", ids.join(",")),
                        why: format!(
                            "the pod's processes are in the host's network namespace and in {}                              of their own ({}): not counted (decision #18-m)",
                            ids.len(),
                            ids.join(", ")
                        ),
                    }
                }
                PodNetns::NoProcess => Target::Missing,
            };
            plan.push((cg, target));
        }
        let shared = shared_namespaces(&plan);
        let (pinned, _) = self.pins.current();
        let readings = self.census.read(&paths).readings;
        let mut remembered = self
            .inbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = std::mem::take(&mut *remembered);
        let empty = HashSet::new();
        // Summarises one namespace (or union) keyed `key`, remembering its inbound connections;
        // an error entry when it has more than the cap.
        let mut summarize = |key: &str, r: &NetnsReading, owned: Option<&HashSet<u64>>| {
            let known = before.get(key).unwrap_or(&empty);
            let (pod, now) = summarize_remembering(r, owned, &self.config, &pinned, known);
            let slot = remembered.entry(key.to_string()).or_default();
            slot.extend(now);
            if slot.len() > MAX_REMEMBERED_INBOUND {
                return Err(format!(
                    "more than {MAX_REMEMBERED_INBOUND} inbound connections in network \
                     namespace {key}: which of its connections are inbound is not remembered \
                     beyond that (decision #18-r)"
                ));
            }
            Ok(pod)
        };
        let mut out = Vec::with_capacity(plan.len());
        for (cg, target) in plan {
            let mut pod = match target {
                // Processes of several pods in one namespace: none of them owns its connections.
                _ if shared.contains_key(&cg.uid) => {
                    let (id, others) = &shared[&cg.uid];
                    let names: Vec<String> = others
                        .iter()
                        .map(|uid| match meta.get(uid) {
                            Some(m) if !m.name.is_empty() => format!("{}/{}", m.namespace, m.name),
                            _ => format!("uid {uid}"),
                        })
                        .collect();
                    error_entry(
                        id.clone(),
                        format!(
                            "network namespace {id} shared with pod {}: its connections cannot \
                             be attributed to one pod (decision #18-r)",
                            names.join(", pod ")
                        ),
                    )
                }
                Target::Pod { index, id } => match &readings[index] {
                    Ok(r) => match summarize(&id, r, None) {
                        Ok(p) => pb::PodConnections { netns: id, ..p },
                        Err(e) => error_entry(id, e),
                    },
                    Err(e) => error_entry(id, e.to_string()),
                },
                Target::Host { index, id, pids } => match &readings[index] {
                    Ok(r) => {
                        let owned = socket_inodes(&self.host.proc, &pids);
                        match summarize(&id, r, Some(&owned)) {
                            Ok(p) => pb::PodConnections {
                                netns: id,
                                host_network: true,
                                udp_sockets: host_udp_sockets(&owned),
                                ..p
                            },
                            Err(e) => pb::PodConnections {
                                host_network: true,
                                ..error_entry(id, e)
                            },
                        }
                    }
                    Err(e) => pb::PodConnections {
                        host_network: true,
                        ..error_entry(id, e.to_string())
                    },
                },
                Target::Union { indices, id } => {
                    match union(&readings, &indices).and_then(|r| summarize(&id, &r, None)) {
                        Ok(p) => pb::PodConnections { netns: id, ..p },
                        Err(e) => error_entry(id, e),
                    }
                }
                Target::Refused { id, why } => error_entry(id, why),
                Target::Missing => error_entry(
                    String::new(),
                    "no live process in the pod's cgroup (starting or stopping)".into(),
                ),
            };
            pod.uid.clone_from(&cg.uid);
            if let Some(m) = meta.get(&cg.uid) {
                pod.namespace.clone_from(&m.namespace);
                pod.name.clone_from(&m.name);
                pod.labels = m.labels.clone();
                if let Some(ts) = &m.deletion_timestamp {
                    pod.deletion_timestamp = Some(*ts);
                    pod.open_after_deletion = pod.established;
                }
            }
            out.push(pod);
        }
        // A namespace not read this time (an error) keeps what it remembered.
        for (key, ids) in before {
            remembered.entry(key).or_insert(ids);
        }
        drop(remembered);
        out.extend(missing_cgroups(meta, &cgroups));
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        Ok(out)
    }
}

/// The pods (by UID) that share a namespace of their own with another pod: the namespace's
/// identity and the other pods' UIDs. A namespace other than the host's that processes of
/// several pods are in has connections no one pod owns: counting it for each would count it
/// twice, for one a guess (decision #18-r). The host's namespace has its own rule (#18-n).
fn shared_namespaces(
    plan: &[(&pod_cgroups::PodCgroup, Target)],
) -> HashMap<String, (String, Vec<String>)> {
    let mut pods_in: HashMap<&str, Vec<&str>> = HashMap::new();
    for (cg, target) in plan {
        let ids: Vec<&str> = match target {
            Target::Pod { id, .. } => vec![id.as_str()],
            Target::Union { id, .. } => id.split(',').collect(),
            _ => Vec::new(),
        };
        for id in ids {
            let uids = pods_in.entry(id).or_default();
            if !uids.contains(&cg.uid.as_str()) {
                uids.push(&cg.uid);
            }
        }
    }
    let mut out: HashMap<String, (String, Vec<String>)> = HashMap::new();
    let mut ids: Vec<_> = pods_in.into_iter().filter(|(_, u)| u.len() > 1).collect();
    ids.sort();
    for (id, uids) in ids {
        for uid in &uids {
            out.entry((*uid).to_string()).or_insert_with(|| {
                let others = uids.iter().filter(|u| *u != uid).map(|u| u.to_string());
                (id.to_string(), others.collect())
            });
        }
    }
    out
}

/// An error entry for each pod of the view that must have a cgroup here (Running, not
/// terminating) and has none under any of its UIDs: its value is unknown, so a query selecting
/// it is UNAVAILABLE, never a sum without it (decision #18-o). Once per pod, named by its own UID.
fn missing_cgroups(
    meta: &HashMap<String, PodMeta>,
    cgroups: &[pod_cgroups::PodCgroup],
) -> Vec<pb::PodConnections> {
    let found: std::collections::HashSet<&str> = cgroups.iter().map(|c| c.uid.as_str()).collect();
    meta.iter()
        // A static pod is in the view under two UIDs: one entry, under its own.
        .filter(|(uid, m)| m.uids.first() == Some(*uid) && m.must_have_cgroup())
        .filter(|(_, m)| !m.uids.iter().any(|u| found.contains(u.as_str())))
        .map(|(uid, m)| pb::PodConnections {
            uid: uid.clone(),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            labels: m.labels.clone(),
            ..error_entry(
                String::new(),
                "Running on this node per the pod view, but no cgroup of the pod found (a \
                 cgroup layout the agent does not read, or one not created yet)"
                    .into(),
            )
        })
        .collect()
}

enum Target {
    Pod {
        index: usize,
        id: String,
    },
    Host {
        index: usize,
        id: String,
        pids: Vec<u32>,
    },
    /// Processes in several namespaces of their own: all of them (indices into the readings).
    Union {
        indices: Vec<usize>,
        id: String,
    },
    /// Processes in the host's namespace and in their own: an error entry naming why.
    Refused {
        id: String,
        why: String,
    },
    Missing,
}

/// The readings at `indices` as one: every socket of each (a socket lives in exactly one
/// namespace), UDP sockets and listen counters summed, the port range kept only where every
/// namespace has the same one. Any namespace unread is the pod's error (never a smaller census).
fn union(
    readings: &[Result<NetnsReading, CensusError>],
    indices: &[usize],
) -> Result<NetnsReading, String> {
    let mut parts = indices.iter().map(|&i| readings[i].as_ref());
    let first = parts
        .next()
        .ok_or_else(|| "no namespace".to_string())?
        .map_err(ToString::to_string)?;
    let mut out = first.clone();
    for part in parts {
        let r = part.map_err(ToString::to_string)?;
        out.sockets.extend(r.sockets.iter().cloned());
        out.udp_sockets += r.udp_sockets;
        out.listen_counters = out
            .listen_counters
            .zip(r.listen_counters)
            .map(|((o, d), (o2, d2))| (o + o2, d + d2));
        if out.port_range != r.port_range {
            out.port_range = None;
        }
        if r.source == Source::Procfs {
            out.source = Source::Procfs;
        }
        if out.fallback_reason.is_none() {
            out.fallback_reason.clone_from(&r.fallback_reason);
        }
    }
    Ok(out)
}

/// UDP sockets of the host namespace whose inode the pod holds. `/proc/self/net` is the main
/// thread's namespace, the host's (the agent runs with hostNetwork).
fn host_udp_sockets(owned: &std::collections::HashSet<u64>) -> u64 {
    ["udp", "udp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/self/net/{f}")).ok())
        .map(|t| {
            super::procfs::socket_inodes(&t)
                .filter(|i| owned.contains(i))
                .count() as u64
        })
        .sum()
}

fn error_entry(netns: String, error: String) -> pb::PodConnections {
    pb::PodConnections {
        netns,
        error,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, phase: &str, uids: &[&str]) -> PodMeta {
        PodMeta {
            namespace: "shop".into(),
            name: name.into(),
            labels: HashMap::from([("app".into(), "web".into())]),
            phase: Some(phase.into()),
            uids: uids.iter().map(ToString::to_string).collect(),
            ..Default::default()
        }
    }

    fn cgroup(uid: &str) -> pod_cgroups::PodCgroup {
        pod_cgroups::PodCgroup {
            uid: uid.into(),
            qos: "besteffort",
            dir: PathBuf::new(),
        }
    }

    /// As `kube::pod_meta` keys the view: every pod under each of its UIDs.
    fn view(pods: &[PodMeta]) -> HashMap<String, PodMeta> {
        pods.iter()
            .flat_map(|m| m.uids.iter().map(move |u| (u.clone(), m.clone())))
            .collect()
    }

    #[test]
    fn a_namespace_of_its_own_shared_by_pods_is_none_of_theirs() {
        let (a, b, c, d, e) = (
            cgroup("ua"),
            cgroup("ub"),
            cgroup("uc"),
            cgroup("ud"),
            cgroup("ue"),
        );
        let pod = |id: &str| Target::Pod {
            index: 0,
            id: id.into(),
        };
        let plan = vec![
            (&a, pod("net:[1]")),
            // b's processes are in 1 and in 2: sharing 1 with a.
            (
                &b,
                Target::Union {
                    indices: vec![0, 1],
                    id: "net:[1],net:[2]".into(),
                },
            ),
            (&c, pod("net:[3]")),
            // hostNetwork pods share the host's namespace by design (#18-n).
            (
                &d,
                Target::Host {
                    index: 2,
                    id: "net:[0]".into(),
                    pids: vec![],
                },
            ),
            (
                &e,
                Target::Host {
                    index: 2,
                    id: "net:[0]".into(),
                    pids: vec![],
                },
            ),
        ];
        let shared = shared_namespaces(&plan);
        let mut got: Vec<_> = shared.iter().collect();
        got.sort();
        assert_eq!(
            got,
            [
                (
                    &"ua".to_string(),
                    &("net:[1]".to_string(), vec!["ub".to_string()])
                ),
                (
                    &"ub".to_string(),
                    &("net:[1]".to_string(), vec!["ua".to_string()])
                ),
            ]
        );
    }

    #[test]
    fn only_a_running_pod_without_a_cgroup_under_any_of_its_uids_is_an_error_entry() {
        let mut terminating = meta("web-5", "Running", &["u5"]);
        terminating.deletion_timestamp = Some(prost_types::Timestamp::default());
        let v = view(&[
            meta("web-1", "Running", &["u1"]),
            meta("web-2", "Running", &["u2"]),
            // A static pod: its cgroup has the mirror annotation's UID.
            meta("web-s", "Running", &["api-uid", "hash"]),
            meta("job-1", "Succeeded", &["u3"]),
            meta("web-4", "Pending", &["u4"]),
            terminating,
        ]);
        let got = missing_cgroups(&v, &[cgroup("u1"), cgroup("hash")]);
        assert_eq!(got.len(), 1, "{got:?}");
        let p = &got[0];
        assert_eq!((p.uid.as_str(), p.name.as_str()), ("u2", "web-2"));
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
        assert!(p.error.contains("no cgroup"), "{}", p.error);

        // A static pod without its cgroup: one entry, under its own UID.
        let got = missing_cgroups(&v, &[cgroup("u1"), cgroup("u2")]);
        let names: Vec<_> = got
            .iter()
            .map(|p| (p.uid.as_str(), p.name.as_str()))
            .collect();
        assert_eq!(names, [("api-uid", "web-s")]);
    }
}
