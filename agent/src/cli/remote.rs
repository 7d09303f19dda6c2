//! Talking to a node's agent over gRPC: which agent, how to authenticate, and checking that it
//! serves the node the operator meant. Used by the operator commands (`drain`, `cordon`,
//! `uncordon`, `get-drain`, `dns status`).

use std::path::PathBuf;

use clap::Args;

use crate::api::client::{self, ClientError};

/// Which agent to talk to, and how to authenticate.
#[derive(Args)]
pub struct AgentArgs {
    /// The agent's gRPC address: host:port (plain HTTP/2) or an http(s):// URL.
    #[arg(value_name = "ADDR")]
    addr: String,
    /// File holding a bearer token, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "NODEKEEPER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA bundle to verify the agent's certificate with (a private CA); implies TLS.
    #[arg(long, env = "NODEKEEPER_CACERT")]
    cacert: Option<PathBuf>,
    /// PEM client certificate for mTLS (with --key); implies TLS.
    #[arg(long, env = "NODEKEEPER_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "NODEKEEPER_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Name to verify the agent's certificate against instead of the dialled host; implies TLS.
    #[arg(long, env = "NODEKEEPER_SERVER_NAME")]
    server_name: Option<String>,
    /// The node this command is meant for: the agent refuses (exit 1) if it serves another
    /// node. Default: the node the agent reports (GetNode) just before the call.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// The node's metadata.uid (with --node): refused if the node was re-created.
    #[arg(long, value_name = "UID", requires = "node")]
    node_uid: Option<String>,
}

impl AgentArgs {
    /// A client of the agent, held to `--node`/`--node-uid` when given.
    pub async fn connect(&self) -> Result<client::Client, ClientError> {
        let options = client::ConnectOptions {
            token_file: self.token_file.clone(),
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            server_name: self.server_name.clone(),
        };
        let mut c = client::Client::connect_with(&self.addr, &options).await?;
        if let Some(node) = &self.node {
            c.expect_node(node, self.node_uid.as_deref().unwrap_or_default());
        }
        Ok(c)
    }
}

/// Runs an operator command's calls on a one-shot runtime; its [`ClientError`] becomes the
/// exit code (see the `cli` module doc).
pub fn call(
    f: impl std::future::Future<Output = Result<(), ClientError>>,
) -> Result<(), super::CliError> {
    super::block_on(async { Ok(f.await?) })
}
