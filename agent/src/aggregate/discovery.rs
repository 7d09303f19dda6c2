//! Which node agents the aggregator calls: a static list (`--agents`), or every endpoint of the
//! agents' headless Service, read from its `discovery.k8s.io/v1` EndpointSlices
//! (`--service NAMESPACE/NAME`, port `--port-name`).
//!
//! Owns the EndpointSlice watch (label `kubernetes.io/service-name=NAME`, one namespace, a
//! kube-runtime reflector: one LIST to sync, then WATCH events, so a fan-out reads a local
//! store instead of listing, and a new node's agent is called from the next fan-out on) and
//! turning slices into targets: every endpoint, ready or not (an agent is
//! NotReady when any capability is degraded, e.g. its DNS upstreams, yet its census still
//! answers; the aggregator judges an agent by its answer), one target per pod even when a
//! dual-stack Service lists it in an IPv4 and an IPv6 slice. The targets are the *expected*
//! agents: one that does not answer lowers the fleet's coverage. Never watches or lists
//! anything else.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use prometheus_client::metrics::counter::Counter;

use crate::kube::API_CALL_TIMEOUT;

/// One agent to call.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// `host:port` (`[v6]:port` for IPv6).
    pub address: String,
    /// The EndpointSlice's `nodeName`; empty for static targets.
    pub node_name: String,
    /// The endpoint's `ready` condition (true for static targets). Reported, never a filter.
    pub ready: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The watch has not synced its first LIST within `API_CALL_TIMEOUT` (the API server is
    /// unreachable or refuses; the watch keeps retrying with backoff).
    #[error(
        "the EndpointSlices of service {namespace}/{name} are not synced after {API_CALL_TIMEOUT:?} \
         (see the log's endpointslice watch errors)"
    )]
    NotSynced { namespace: String, name: String },
    /// The watch task ended (only at shutdown).
    #[error("the EndpointSlice watch of service {namespace}/{name} stopped")]
    Stopped { namespace: String, name: String },
}

impl DiscoveryError {
    /// Low-cardinality label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotSynced { .. } => "not_synced",
            Self::Stopped { .. } => "stopped",
        }
    }
}

/// Where targets come from.
pub enum Discovery {
    Static(Vec<Target>),
    Service(ServiceWatch),
}

/// The agents' Service's EndpointSlices, kept by a reflector.
pub struct ServiceWatch {
    store: Store<EndpointSlice>,
    namespace: String,
    name: String,
    port_name: String,
}

impl ServiceWatch {
    /// Starts watching the slices of Service `namespace/name` (the task lives as long as the
    /// runtime). Each watch error is logged and counted in `errors`; the store keeps the last
    /// synced slices meanwhile, and the watcher re-lists with backoff after a desync.
    pub fn start(
        client: kube::Client,
        namespace: &str,
        name: &str,
        port_name: &str,
        errors: Counter,
    ) -> Self {
        let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, namespace);
        let config =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={name}"));
        let (store, writer) = reflector::store();
        let service = format!("{namespace}/{name}");
        tokio::spawn(async move {
            let stream = watcher(api, config)
                .default_backoff()
                .modify(|s| s.metadata.managed_fields = None)
                .reflect(writer);
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    errors.inc();
                    tracing::warn!(error = %e, %service, "endpointslice watch error; keeping the last agents, retrying with backoff");
                }
            }
        });
        Self {
            store,
            namespace: namespace.to_string(),
            name: name.to_string(),
            port_name: port_name.to_string(),
        }
    }

    /// The targets in the store, once it has synced (waits up to `API_CALL_TIMEOUT` for that).
    async fn targets(&self) -> Result<Vec<Target>, DiscoveryError> {
        match tokio::time::timeout(API_CALL_TIMEOUT, self.store.wait_until_ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(DiscoveryError::Stopped {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                });
            }
            Err(_) => {
                return Err(DiscoveryError::NotSynced {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                });
            }
        }
        Ok(targets_from_slices(&self.store.state(), &self.port_name))
    }
}

impl Discovery {
    /// Static targets from `host:port` strings, deduplicated and sorted.
    pub fn fixed(addresses: &[String]) -> Self {
        let mut targets: Vec<Target> = addresses
            .iter()
            .map(|a| Target {
                address: a.trim().to_string(),
                node_name: String::new(),
                ready: true,
            })
            .filter(|t| !t.address.is_empty())
            .collect();
        targets.sort();
        targets.dedup();
        Self::Static(targets)
    }

    /// The current targets, sorted by address.
    pub async fn targets(&self) -> Result<Vec<Target>, DiscoveryError> {
        match self {
            Self::Static(t) => Ok(t.clone()),
            Self::Service(watch) => watch.targets().await,
        }
    }
}

/// Every endpoint of `slices` (ready or not: the Service sets `publishNotReadyAddresses`) on the
/// port named `port_name`, one per pod (or per address when an endpoint names no pod). IPv4 slices win over IPv6 ones for a dual-stack pod; FQDN slices
/// are skipped (the agents are pods, always addressed by IP).
pub fn targets_from_slices<S: Borrow<EndpointSlice>>(slices: &[S], port_name: &str) -> Vec<Target> {
    let mut slices: Vec<&EndpointSlice> = slices
        .iter()
        .map(Borrow::borrow)
        .filter(|s| matches!(s.address_type.as_str(), "IPv4" | "IPv6"))
        .collect();
    // "IPv4" < "IPv6": the IPv4 slice claims each pod first.
    slices.sort_by(|a, b| a.address_type.cmp(&b.address_type));
    let mut by_pod: BTreeMap<String, Target> = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| p.port)
        else {
            continue;
        };
        let v6 = slice.address_type == "IPv6";
        for ep in &slice.endpoints {
            // The API: "nil should be interpreted as true" for ready.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let Some(ip) = ep.addresses.first() else {
                continue;
            };
            let address = if v6 {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            };
            let key = ep
                .target_ref
                .as_ref()
                .and_then(|r| r.uid.clone().or_else(|| r.name.clone()))
                .unwrap_or_else(|| address.clone());
            by_pod.entry(key).or_insert(Target {
                address,
                node_name: ep.node_name.clone().unwrap_or_default(),
                ready,
            });
        }
    }
    let mut out: Vec<Target> = by_pod.into_values().collect();
    out.sort();
    out.dedup_by(|a, b| a.address == b.address);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("an EndpointSlice")
    }

    fn ep(ip: &str, node: &str, pod: &str, ready: Option<bool>) -> serde_json::Value {
        let mut e = json!({
            "addresses": [ip],
            "nodeName": node,
            "targetRef": {"kind": "Pod", "namespace": "nodekeeper-system", "name": pod, "uid": format!("uid-{pod}")},
        });
        if let Some(r) = ready {
            e["conditions"] = json!({"ready": r});
        }
        e
    }

    fn slices() -> Vec<EndpointSlice> {
        vec![
            slice(json!({
                "metadata": {"name": "nodekeeper-v6"},
                "addressType": "IPv6",
                "ports": [{"name": "grpc", "port": 9741}],
                "endpoints": [ep("fd00::1", "node-a", "agent-a", Some(true)),
                              ep("fd00::4", "node-d", "agent-d", None)],
            })),
            slice(json!({
                "metadata": {"name": "nodekeeper-abcde"},
                "addressType": "IPv4",
                "ports": [{"name": "metrics", "port": 9740}, {"name": "grpc", "port": 9741}],
                "endpoints": [ep("10.0.0.1", "node-a", "agent-a", Some(true)),
                              ep("10.0.0.2", "node-b", "agent-b", Some(false)),
                              ep("10.0.0.3", "node-c", "agent-c", None)],
            })),
            slice(json!({
                "metadata": {"name": "nodekeeper-fqdn"},
                "addressType": "FQDN",
                "ports": [{"name": "grpc", "port": 9741}],
                "endpoints": [{"addresses": ["agent.example.com"]}],
            })),
        ]
    }

    #[test]
    fn every_endpoint_on_the_named_port_one_per_pod_not_ready_included() {
        let t = targets_from_slices(&slices(), "grpc");
        let got: Vec<(&str, &str, bool)> = t
            .iter()
            .map(|t| (t.address.as_str(), t.node_name.as_str(), t.ready))
            .collect();
        assert_eq!(
            got,
            vec![
                // node-a is in both slices: its IPv4 address wins; node-b is not ready but still
                // an expected agent; node-c and node-d have no ready condition (nil means ready).
                ("10.0.0.1:9741", "node-a", true),
                ("10.0.0.2:9741", "node-b", false),
                ("10.0.0.3:9741", "node-c", true),
                ("[fd00::4]:9741", "node-d", true),
            ]
        );
    }

    #[test]
    fn slices_without_the_port_give_nothing() {
        assert!(targets_from_slices(&slices(), "dns").is_empty());
        let m = targets_from_slices(&slices(), "metrics");
        assert_eq!(m.len(), 3, "{m:?}");
    }

    #[test]
    fn static_targets_are_trimmed_deduplicated_and_sorted() {
        let Discovery::Static(t) = Discovery::fixed(&[
            "127.0.0.1:2".into(),
            " 127.0.0.1:1".into(),
            "127.0.0.1:2".into(),
            "".into(),
        ]) else {
            unreachable!()
        };
        let a: Vec<&str> = t.iter().map(|t| t.address.as_str()).collect();
        assert_eq!(a, vec!["127.0.0.1:1", "127.0.0.1:2"]);
    }
}
