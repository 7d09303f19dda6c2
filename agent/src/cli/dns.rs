//! The DNS family: `dns-wiring setup|check|teardown|hold` and the `dns-guard` sidecar (both
//! run [`crate::dns::node::cli`] with the config's `dns:` section), and `dns status` through a
//! node's agent.

use clap::Subcommand;

use super::{CliError, Logging, config::ConfigArgs, remote::AgentArgs};
use crate::api::client::{self, ClientError};
use crate::config::ConfigError;
use crate::dns::node::cli::{self as node_cli, GuardArgs, WiringOp};

#[derive(Subcommand)]
pub enum DnsWiringAction {
    /// Remove stale rules of ours, create the interface and addresses, install the rules.
    Setup(ConfigArgs),
    /// Restore anything missing; prints how many things were repaired.
    Check(ConfigArgs),
    /// Remove our rules and the interface.
    Teardown(ConfigArgs),
    /// Setup, check every dns.node.checkInterval, teardown on SIGTERM.
    Hold(ConfigArgs),
}

#[derive(Subcommand)]
pub enum DnsAction {
    /// Cache size, hit ratio and upstream health.
    Status {
        #[command(flatten)]
        agent: AgentArgs,
    },
}

/// `dns-wiring ACTION`: prints the operation's JSON line; exit 1 when it fails.
pub fn wiring(action: DnsWiringAction, logging: &Logging) -> Result<(), CliError> {
    let (op, args) = match action {
        DnsWiringAction::Setup(a) => (WiringOp::Setup, a),
        DnsWiringAction::Check(a) => (WiringOp::Check, a),
        DnsWiringAction::Teardown(a) => (WiringOp::Teardown, a),
        DnsWiringAction::Hold(a) => (WiringOp::Hold, a),
    };
    let config = args.load_and_log(logging)?;
    let line = node_cli::wiring(op, &config.dns).map_err(CliError::DnsWiring)?;
    println!("{line}");
    Ok(())
}

/// `dns-guard`: 64 for an unusable config or flag value (every one named), 1 when guarding
/// fails (logged).
pub fn guard(guard: GuardArgs, args: ConfigArgs, logging: &Logging) -> Result<(), CliError> {
    let config = args.load()?;
    let problems = guard.problems();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems).into());
    }
    logging.init()?;
    node_cli::guard(&config, &guard).map_err(CliError::DnsGuard)
}

/// `dns status ADDR`: the node's cache, or exit 1 when its dns capability is off.
pub fn status(agent: AgentArgs) -> Result<(), CliError> {
    super::remote::call(async move {
        let mut c = agent.connect().await?;
        let node = c.get_node().await?;
        match &node.dns {
            Some(s) => {
                print!("{}", client::dns_status_text(&node.node_name, s));
                Ok(())
            }
            None => Err(ClientError::Refused {
                code: tonic::Code::FailedPrecondition,
                message: format!("the dns capability is disabled on node {}", node.node_name),
            }),
        }
    })
}
