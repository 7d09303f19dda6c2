//! Runs a closure inside another network namespace, on a dedicated thread (through
//! `crate::host::in_namespace`, shared with the disks capability's mount namespace).
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, and `/proc/sys/net` shows the namespace
//! of the thread that opens it; so the work runs on a fresh OS thread that enters the namespace
//! and exits afterwards. The tokio workers never change namespace.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`) could not be opened.
    #[error("cannot open network namespace {}: {error}", path.display())]
    Open { path: PathBuf, error: String },
    /// setns(2) failed (needs CAP_SYS_ADMIN).
    #[error("cannot enter network namespace {}: {error}", path.display())]
    Enter { path: PathBuf, error: String },
    #[error("the thread working in network namespace {} panicked", path.display())]
    Panicked { path: PathBuf },
}

pub fn in_netns<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    use crate::host::{Namespace, NamespaceError, in_namespace};
    in_namespace(Namespace::Net, path, f).map_err(|e| match e {
        NamespaceError::Open { path, error, .. } => NetnsError::Open { path, error },
        NamespaceError::Enter { path, error, .. } => NetnsError::Enter { path, error },
        NamespaceError::Panicked { path, .. } => NetnsError::Panicked { path },
    })
}

/// Keys that `/proc/sys` scopes per network namespace: everything under `net.` except the few
/// global ones (the unix socket limits are per-netns too, core rmem/wmem defaults are not).
pub fn is_namespaced(key: &str) -> bool {
    const GLOBAL_NET: &[&str] = &[
        "net.core.rmem_default",
        "net.core.rmem_max",
        "net.core.wmem_default",
        "net.core.wmem_max",
        "net.core.netdev_max_backlog",
        "net.core.optmem_max",
        "net.ipv4.tcp_mem",
        "net.ipv4.udp_mem",
    ];
    key.starts_with("net.") && !GLOBAL_NET.contains(&key)
}
