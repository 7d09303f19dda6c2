//! Where the cluster's pods run, for coverage: the aggregator's pod watch.
//!
//! A query's value depends only on the nodes hosting the pods it selects, so an agent that is
//! down on any other node must not fail it, and a pod on a node whose agent is down (or where no
//! agent is expected) must. Owns one cluster-wide pod watch (a kube-runtime reflector: one LIST
//! to sync, then WATCH events), each pod stripped to what placement needs (namespace, name,
//! labels, `spec.nodeName`, `status.phase`), and turning the store into a `PodPlacement` at
//! each fan-out. Until the watch has synced, while it re-lists (`Init` to `InitDone`), while a
//! re-watch goes unanswered past a short grace and while it is failing, the placement is not
//! current and every query is UNAVAILABLE (docs/decisions.md #18-e, #18-j, #18-k). Also
//! remembers the pods it saw deleted, so a deleted pod an agent still reports is not taken for
//! one the view is behind on (#18-l).

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use std::time::SystemTime;

use crate::keda::coverage::PodPlacement;
use crate::kube::WatchHealth;

/// The cluster's pods as the watch last saw them, and whether the watch is current.
pub struct PodWatch {
    store: Store<Pod>,
    health: WatchHealth,
    /// The pods it saw deleted lately: a census entry for one is not a pod the view is behind
    /// on (decision #18-l).
    deleted: crate::kube::DeletedPods,
    started: SystemTime,
}

impl PodWatch {
    /// Starts the watch (the task lives as long as the runtime). Each watch error is logged and
    /// counted in `errors`, and makes the placement not current until the next successful
    /// event (kube's watcher re-lists or re-watches with backoff).
    pub fn start(client: kube::Client, errors: Counter) -> Self {
        let health = WatchHealth::default();
        // A re-watch that hangs unanswered is not current after a short grace (#18-k).
        let api: kube::Api<Pod> =
            kube::Api::all(crate::kube::track_watches(client, health.clone()));
        let (store, writer) = reflector::store();
        let recorder = health.clone();
        let deleted = crate::kube::DeletedPods::default();
        let tombstones = deleted.clone();
        let config = watcher::Config::default().timeout(crate::kube::POD_WATCH_TIMEOUT_SECS);
        tokio::spawn(async move {
            let stream = watcher(api, config)
                .default_backoff()
                .modify(strip)
                .reflect(writer);
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    // A re-list (`Init`, after a 410 or a restart) is current only at its
                    // `InitDone`.
                    Ok(event) => {
                        recorder.record_event(&event);
                        tombstones.observe(&event);
                    }
                    Err(e) => {
                        recorder.record_error(&e);
                        errors.inc();
                        tracing::warn!(error = %e, "pod watch error; KEDA queries are UNAVAILABLE until it recovers (retrying with backoff)");
                    }
                }
            }
        });
        Self {
            store,
            health,
            deleted,
            started: SystemTime::now(),
        }
    }

    /// The placement of every pod; not current (every query UNAVAILABLE) before the first
    /// sync and while the watch is failing: a pod scheduled meanwhile on a node without an
    /// agent (or an agent that has not named it) would otherwise be silently left out.
    pub fn placement(&self) -> Arc<PodPlacement> {
        let since = |t: SystemTime| {
            let secs = t.elapsed().unwrap_or_default().as_secs_f64();
            format!("{secs:.0}s")
        };
        if self.store.wait_until_ready().now_or_never().is_none() {
            return Arc::new(PodPlacement::not_current(format!(
                "the aggregator's pod watch has not synced yet (started {} ago)",
                since(self.started)
            )));
        }
        let health = self.health.state();
        if let Some((failing_since, error)) = health.failing {
            return Arc::new(PodPlacement::not_current(format!(
                "the aggregator's pod watch has been failing for {} ({error}); last successful \
                 event {}",
                since(failing_since),
                health
                    .last_ok
                    .map_or("never".to_string(), |t| format!("{} ago", since(t)))
            )));
        }
        Arc::new(
            PodPlacement::from_pods(self.store.state().iter().map(|p| p.as_ref()))
                .with_deleted(self.deleted.uids()),
        )
    }
}

/// Keeps what placement reads: a cluster's pods are large (containers, managed fields, status
/// conditions) and the aggregator keeps all of them.
fn strip(pod: &mut Pod) {
    let m = &mut pod.metadata;
    m.managed_fields = None;
    // Only a static pod's mirror annotation: its cgroup (and census entry) has that UID.
    m.annotations = m
        .annotations
        .take()
        .and_then(|a| {
            a.into_iter()
                .find(|(k, _)| k == crate::kube::MIRROR_ANNOTATION)
        })
        .map(|kv| [kv].into());
    // Only a Node owner: it tells a real mirror pod from a forged annotation (decision #18-p).
    m.owner_references = m
        .owner_references
        .take()
        .map(|o| {
            o.into_iter()
                .filter(|r| r.kind == "Node")
                .collect::<Vec<_>>()
        })
        .filter(|o| !o.is_empty());
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    pod.spec = Some(PodSpec {
        node_name,
        ..Default::default()
    });
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    pod.status = Some(PodStatus {
        phase,
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strip_keeps_what_placement_reads() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                         "annotations": {"a": "b"}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }))
        .unwrap();
        strip(&mut pod);
        assert_eq!(
            serde_json::to_value(&pod).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
                "spec": {"containers": [], "nodeName": "node-a"},
                "status": {"phase": "Running"},
            })
        );
    }
}
