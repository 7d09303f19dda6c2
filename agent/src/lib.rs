//! nodekeeper: a per-node Kubernetes agent. See `docs/architecture.md` for the module map.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod api;
pub mod app;
pub mod bounds;
pub mod cli;
pub mod config;
pub mod disks;
pub mod dns;
pub mod drain;
pub mod host;
pub mod http;
pub mod keda;
pub mod kube;
pub mod listen;
pub mod metrics;
pub mod pod_cgroups;
pub mod runtime;
pub mod selector;
pub mod state_file;
pub mod sysctl;

/// Types generated from `proto/nodekeeper/v1/agent.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("nodekeeper.v1");
}

/// Types generated from `proto/keda/externalscaler.proto` (KEDA's external scaler protocol).
#[allow(clippy::all, missing_docs)]
pub mod keda_pb {
    tonic::include_proto!("externalscaler");
}
