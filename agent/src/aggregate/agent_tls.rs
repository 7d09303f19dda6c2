//! The aggregator's TLS to the node agents (`--cacert`, `--cert`, `--key`, `--server-name`):
//! the CA the agents' certificates must chain to, the aggregator's own client certificate
//! (its credential when the agents list it in `api.auth.clientRoles`), and the name verified
//! in the agents' certificates (agents are dialled by pod IP, so a name that does not depend on
//! node IPs, e.g. `nodekeeper.nodekeeper-system.svc`).
//!
//! The files are re-read when they change (checked once per fan-out, one `stat` each): a
//! loaded change drops the agent channels so the next calls connect with it, while calls in
//! flight finish on their old connections. A change that does not make a working config is
//! refused (logged with the flags and files, `nodekeeper_aggregate_tls_reloads_total
//! {result="refused"}`) and the previous config stays in use.

use std::path::Path;
use std::sync::Mutex;

use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::api::auth::FileStamp;
use crate::api::client::{ClientError, ConnectOptions, endpoint};

/// What a check of the files did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    /// A new config: channels made with the old one should be dropped.
    Loaded,
    Refused,
}

type Stamps = Vec<Option<FileStamp>>;

struct State {
    config: ClientTlsConfig,
    loaded: Stamps,
    refused: Option<Stamps>,
}

/// The client TLS config for the agents, rebuilt from its files when they change.
pub struct AgentTls {
    options: ConnectOptions,
    state: Mutex<State>,
}

impl AgentTls {
    /// Reads the files now: a bad one is a usage error at start.
    pub fn load(options: ConnectOptions) -> Result<Self, ClientError> {
        let loaded = stamps(&options);
        let config = build(&options)?;
        Ok(Self {
            options,
            state: Mutex::new(State {
                config,
                loaded,
                refused: None,
            }),
        })
    }

    /// Re-reads the files if one changed since the last load or refusal.
    pub fn refresh(&self) -> Reload {
        let now = stamps(&self.options);
        let mut state = self.state.lock().expect("not poisoned");
        if now == state.loaded || state.refused.as_ref() == Some(&now) {
            return Reload::Unchanged;
        }
        match build(&self.options) {
            Ok(config) => {
                tracing::info!(
                    cacert = ?self.options.cacert,
                    cert = ?self.options.cert,
                    "TLS files for the agents changed: loaded; new connections use them"
                );
                state.config = config;
                state.loaded = now;
                state.refused = None;
                Reload::Loaded
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "TLS files for the agents changed but are refused; the previous ones stay in use"
                );
                state.refused = Some(now);
                Reload::Refused
            }
        }
    }

    /// The endpoint of an agent at `address` (`host:port` or `https://…`) with the current
    /// config.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, ClientError> {
        if address.starts_with("http://") {
            return Err(ClientError::BadAddress {
                addr: address.to_string(),
                why: "http:// with TLS options; use host:port or https://".into(),
            });
        }
        let https = if address.contains("://") {
            address.to_string()
        } else {
            format!("https://{address}")
        };
        let config = self.state.lock().expect("not poisoned").config.clone();
        endpoint(&https)?
            .tls_config(config)
            .map_err(|e| tls_error(&self.options, e))
    }
}

fn stamps(options: &ConnectOptions) -> Stamps {
    [&options.cacert, &options.cert, &options.key]
        .into_iter()
        .map(|p| p.as_deref().and_then(|p: &Path| FileStamp::of(p).ok()))
        .collect()
}

/// The config the files describe, checked by building a connector with it (a key that does
/// not match its certificate, or a CA file that is not PEM, fails here, not at first connect).
fn build(options: &ConnectOptions) -> Result<ClientTlsConfig, ClientError> {
    let config = options.tls()?;
    Endpoint::from_static("https://agent.invalid:1")
        .tls_config(config.clone())
        .map_err(|e| tls_error(options, e))?;
    Ok(config)
}

fn tls_error(options: &ConnectOptions, e: tonic::transport::Error) -> ClientError {
    let files: Vec<String> = [&options.cacert, &options.cert, &options.key]
        .into_iter()
        .flatten()
        .map(|p| p.display().to_string())
        .collect();
    ClientError::Tls {
        flag: if options.cert.is_some() {
            "--cacert/--cert/--key"
        } else {
            "--cacert"
        },
        why: format!(
            "{} do not make a TLS config: {}",
            files.join(", "),
            crate::api::client::error_chain(&e)
        ),
    }
}
