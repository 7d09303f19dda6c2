//! The Kubernetes API client and this node's identity.
//!
//! Decides standalone vs connected at start: `auto` connects when a kubeconfig or the in-cluster
//! environment is present and runs standalone otherwise; capabilities that need the API log once
//! that they are off. Never lists cluster-wide objects.

use crate::config::{Config, KubernetesMode};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// `kubernetes.mode: required` and no client configuration was found or it was unusable.
    #[error("kubernetes.mode is required but no API client could be configured: {0}")]
    Required(String),
    /// No node name in config, `NODE_NAME` or the host name.
    #[error("cannot tell this node's name: set nodeName or NODE_NAME ({0})")]
    NodeName(String),
}

/// A client when the API is configured, `None` in standalone mode.
pub async fn connect(mode: KubernetesMode) -> Result<Option<kube::Client>, KubeError> {
    if mode == KubernetesMode::Standalone {
        tracing::info!(
            "standalone mode (kubernetes.mode: standalone): the Kubernetes API is not used"
        );
        return Ok(None);
    }
    let attempt = async {
        let config = kube::Config::infer().await.map_err(|e| e.to_string())?;
        kube::Client::try_from(config).map_err(|e| e.to_string())
    };
    match (attempt.await, mode) {
        (Ok(client), _) => Ok(Some(client)),
        (Err(e), KubernetesMode::Required) => Err(KubeError::Required(e)),
        (Err(e), _) => {
            tracing::info!(reason = %e, "no kubeconfig or in-cluster environment: standalone mode, features that need the API are off");
            Ok(None)
        }
    }
}

/// Config's `nodeName` (flags and `NODE_NAME` land there), else the host name, lowercased as
/// the kubelet does by default.
pub fn node_name(config: &Config) -> Result<String, KubeError> {
    if let Some(name) = &config.node_name {
        return Ok(name.clone());
    }
    let host = nix::unistd::gethostname().map_err(|e| KubeError::NodeName(e.to_string()))?;
    let host = host.to_string_lossy().to_lowercase();
    if host.is_empty() {
        return Err(KubeError::NodeName("the host name is empty".into()));
    }
    Ok(host)
}
