//! Where the cluster's pods run, for coverage: the aggregator's pod watch.
//!
//! A query's value depends only on the nodes hosting the pods it selects, so an agent that is
//! down on any other node must not fail it, and a pod on a node whose agent is down (or where no
//! agent is expected) must. Owns one cluster-wide pod watch (a kube-runtime reflector: one LIST
//! to sync, then WATCH events), each pod stripped to what placement needs (namespace, name,
//! labels, `spec.nodeName`, `status.phase`), and turning the store into a `PodPlacement` at
//! each fan-out. Until the watch has synced there is no placement and every expected agent
//! matters (never fewer than with a placement).

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;

use crate::keda::coverage::PodPlacement;

/// The cluster's pods as the watch last saw them.
pub struct PodWatch {
    store: Store<Pod>,
}

impl PodWatch {
    /// Starts the watch (the task lives as long as the runtime). Each watch error is logged and
    /// counted in `errors`; the store keeps the last synced pods meanwhile.
    pub fn start(client: kube::Client, errors: Counter) -> Self {
        let api: kube::Api<Pod> = kube::Api::all(client);
        let (store, writer) = reflector::store();
        tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(strip)
                .reflect(writer);
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    errors.inc();
                    tracing::warn!(error = %e, "pod watch error; keeping the last pods, retrying with backoff");
                }
            }
        });
        Self { store }
    }

    /// The placement of every pod, or `None` before the first sync.
    pub fn placement(&self) -> Option<Arc<PodPlacement>> {
        self.store.wait_until_ready().now_or_never()?.ok()?;
        Some(Arc::new(PodPlacement::from_pods(
            self.store.state().iter().map(|p| p.as_ref()),
        )))
    }
}

/// Keeps what placement reads: a cluster's pods are large (containers, managed fields, status
/// conditions) and the aggregator keeps all of them.
fn strip(pod: &mut Pod) {
    let m = &mut pod.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.owner_references = None;
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
