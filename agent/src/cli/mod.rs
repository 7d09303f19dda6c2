//! The `nodekeeper` command line: the clap definitions, one module per command family, and
//! [`CliError`], the one error every command returns, with its exit code and how it is
//! reported. `main.rs` only parses, hands the [`Logging`] to the commands and dispatches here.
//!
//! Owns: argument parsing types, loading the config for a command ([`config::ConfigArgs`]),
//! the tokio runtimes the commands run on ([`runtime`]), exit codes. Never: capability logic;
//! each command calls the capability's own one-shot entry point and prints what it returns.
//!
//! Exit codes: 0 ok, 1 runtime failure, 64 bad config or usage (EX_USAGE), 66 config file
//! unreadable (EX_NOINPUT). The operator commands (`drain`, `cordon`, `uncordon`, `get-drain`,
//! `dns status`) use 0 completed, 1 failed / timed out / cancelled / refused, 2 usage (as
//! clap), 69 agent unreachable (EX_UNAVAILABLE), 75 the stream ended without a result, e.g. the
//! agent restarted: re-run the same command to re-attach (EX_TEMPFAIL).

pub mod agent;
pub mod aggregate;
pub mod config;
pub mod connections;
pub mod disks;
pub mod dns;
pub mod drain;
pub mod remote;
pub mod sysctl;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::api::client::ClientError;
use crate::config::{ConfigDuration, ConfigError};

/// A runtime failure (EXIT_FAILURE).
pub const EX_FAILURE: u8 = 1;
/// Operator commands: a usage error, as clap exits on bad flags.
pub const EX_CLI_USAGE: u8 = 2;
/// Bad config or usage (sysexits EX_USAGE).
pub const EX_USAGE: u8 = 64;
/// The config file is unreadable (sysexits EX_NOINPUT).
pub const EX_NOINPUT: u8 = 66;
/// The agent or the API server is unreachable (sysexits EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: u8 = 69;
/// Operator commands: the drain goes on but this stream ended without a result; re-attach.
pub const EX_TEMPFAIL: u8 = 75;

// === CLI definition ===

#[derive(Parser)]
#[command(name = "nodekeeper", version = crate::app::VERSION, about = "Per-node Kubernetes agent: resource metrics, sysctl tuning, local disks, NodeLocal DNS, graceful drain")]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "NODEKEEPER_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,nodekeeper=debug`).
    #[arg(long, global = true, default_value = "info", env = "NODEKEEPER_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent (the DaemonSet's command).
    Run(config::ConfigArgs),
    /// Validate a config file and print the effective config (file + flags + env) as YAML.
    CheckConfig {
        /// The YAML config file to check.
        file: PathBuf,
        #[command(flatten)]
        overrides: config::OverrideArgs,
    },
    /// Plan, apply or revert sysctl profiles once, outside the daemon.
    Sysctl {
        #[command(subcommand)]
        action: sysctl::SysctlAction,
    },
    /// Drain a node through its agent: cordon, evict in order, stream progress until done.
    Drain(drain::DrainArgs),
    /// Mark a node unschedulable through its agent.
    Cordon {
        #[command(flatten)]
        agent: remote::AgentArgs,
        /// Recorded in the node's Event.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Mark a node schedulable again (refused while a drain runs).
    Uncordon {
        #[command(flatten)]
        agent: remote::AgentArgs,
    },
    /// Print the current or last drain of a node.
    GetDrain {
        #[command(flatten)]
        agent: remote::AgentArgs,
        /// Print the status as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Local disks: what the agent finds and decides about each block device.
    Disks {
        #[command(subcommand)]
        action: disks::DisksAction,
    },
    /// Count the TCP/UDP sockets of network namespaces once, as the agent does per pod, and
    /// print one JSON object per namespace. Reads only; needs CAP_SYS_ADMIN (setns).
    Connections {
        /// A network namespace file: /run/netns/NAME, /proc/PID/ns/net.
        #[arg(long = "netns", value_name = "PATH", required = true)]
        netns: Vec<PathBuf>,
        /// How to read sockets: auto (the BPF one pass, else sock_diag, else /proc/net/tcp),
        /// bpf, sock-diag or procfs.
        #[arg(long, value_enum, default_value = "auto")]
        source: connections::CensusSource,
        /// Connections without data for this long count as idle.
        #[arg(long, default_value = "30s")]
        idle_after: ConfigDuration,
        /// Pools reported per namespace; the rest are summed as "other".
        #[arg(long, default_value_t = 10)]
        top_remotes: usize,
    },
    /// Run the cluster-wide aggregator: KEDA's external scaler with fleet-wide sums.
    Aggregate(crate::aggregate::AggregateArgs),
    /// NodeLocal DNS node wiring once (interface, addresses, NOTRACK/ACCEPT rules), as the
    /// agent does around the cache; `teardown` un-wires a node by hand. Prints one JSON line.
    DnsWiring {
        #[command(subcommand)]
        action: dns::DnsWiringAction,
    },
    /// The DNS fail-open guard, a sidecar in the agent's pod: probes the cache every interval
    /// and removes the transparent wiring when it stops answering (docs/dns.md).
    DnsGuard {
        #[command(flatten)]
        guard: crate::dns::node::cli::GuardArgs,
        #[command(flatten)]
        config: config::ConfigArgs,
    },
    /// The NodeLocal DNS cache of a node, through its agent.
    Dns {
        #[command(subcommand)]
        action: dns::DnsAction,
    },
    /// Walk nodes through the patch-and-reboot rotation from the orchestrator's side: drain
    /// each (await_reboot) through its agent, then wait until it is back from its reboot and
    /// done. Resumable: run it again with the same --id after a crash.
    Rotate(drain::RotateArgs),
    /// The patch-and-reboot rotation across the fleet, read from the API server.
    Maintenance {
        #[command(subcommand)]
        action: drain::MaintenanceAction,
    },
    /// Print the version and the git revision it was built from.
    Version,
}

// === Logging ===

/// The process's tracing subscriber, not yet installed: a command that logs calls
/// [`Logging::init`] once, after its config is valid (a config error keeps its own exit code,
/// and the read-only commands that never call it keep stderr free of log lines).
pub struct Logging {
    format: LogFormat,
    filter: String,
}

impl Logging {
    pub fn new(format: LogFormat, filter: &str) -> Self {
        Self {
            format,
            filter: filter.to_string(),
        }
    }

    /// Installs the global subscriber (stderr); a bad `--log-level` is a usage error (64).
    /// Called at most once per process.
    pub fn init(&self) -> Result<(), CliError> {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.filter).map_err(|e| {
            CliError::Usage(format!("--log-level {:?}: {}", self.filter, chain(&e)))
        })?;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match self.format {
            LogFormat::Json => builder.json().flatten_event(true).init(),
            LogFormat::Text => builder.init(),
        }
        Ok(())
    }
}

// === Runtimes ===

/// The tokio runtime a command runs on.
#[derive(Clone, Copy)]
pub enum RuntimeKind {
    /// A one-shot or operator command: one thread is plenty for a few calls.
    OneShot,
    /// The agent (`run`).
    Agent,
}

/// Most blocking threads the agent starts (host tools, file reads): a node agent's blocking
/// work is a handful of short calls at a time.
const AGENT_MAX_BLOCKING_THREADS: usize = 8;

/// Builds the runtime of `kind`: every runtime of the commands in `cli/` (`aggregate` and
/// `dns-wiring`/`dns-guard` still build theirs in their modules).
pub fn runtime(kind: RuntimeKind) -> std::io::Result<tokio::runtime::Runtime> {
    match kind {
        RuntimeKind::OneShot => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        RuntimeKind::Agent => {
            // A node agent shares the node with its workloads: two workers are plenty for its
            // I/O, and never more than the CPUs it may run on (affinity, cgroup quota): an
            // extra worker on the same CPU only adds context switches to every DNS answer.
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .max_blocking_threads(AGENT_MAX_BLOCKING_THREADS)
                .enable_all()
                .build()
        }
    }
}

// === CliError ===

/// Why a command failed: each variant knows its exit code ([`CliError::exit_code`]) and how it
/// is reported ([`CliError::report`]): most print `nodekeeper: <error>` on stderr; the
/// long-running commands (`run`, `aggregate`, `dns-guard`) log theirs through tracing.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The config file is unreadable (66) or invalid (64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A flag's value or a kubeconfig the command cannot use (64); the message names the flag.
    #[error("{0}")]
    Usage(String),
    /// A flag clap accepted but the command refuses, reported as clap reports its own
    /// (`error: <flag>: <problem>`, exit 2).
    #[error("{field}: {problem}")]
    Flag { field: String, problem: String },
    /// The tokio runtime could not be built (1).
    #[error("building the tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// The command printed its outcome, which was a failure (1); nothing more to say.
    #[error("the command failed")]
    Reported,
    /// An operator command's call to an agent (2, 69, 1 or 75, see the module doc).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The agent itself (`run`) failed; logged (1).
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    /// `rotate` (1, 64, 69 or 75, see [`drain::rotate`]).
    #[error(transparent)]
    Rotate(#[from] crate::drain::rotate::RotateError),
    /// `rotate --selector`: the API server did not list the nodes (69).
    #[error("listing nodes: {0}")]
    ListNodes(kube::Error),
    /// `maintenance status`: 1 for a node that does not exist, else 69.
    #[error(transparent)]
    MaintenanceStatus(#[from] crate::drain::status::StatusError),
    /// `sysctl`: 64 when the profiles are rejected, else 1.
    #[error(transparent)]
    Sysctl(#[from] crate::sysctl::SysctlError),
    /// `disks list` (1).
    #[error(transparent)]
    DisksList(#[from] crate::disks::discover::DiscoverError),
    /// `disks prepare` (1).
    #[error(transparent)]
    DisksPrepare(#[from] crate::disks::prepare::PrepareError),
    /// `disks wipe`: 64 when refused, else 1.
    #[error(transparent)]
    DisksWipe(crate::disks::prepare::PrepareError),
    /// `dns-wiring` (1).
    #[error(transparent)]
    DnsWiring(crate::dns::node::WiringError),
    /// `dns-guard` failed while guarding; logged (1).
    #[error(transparent)]
    DnsGuard(crate::dns::node::WiringError),
    /// `aggregate`: 64 for a bad flag value (printed), else logged (1).
    #[error(transparent)]
    Aggregate(#[from] crate::aggregate::AggregateError),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        use crate::drain::rotate::RotateError;
        match self {
            Self::Config(ConfigError::Read { .. }) => EX_NOINPUT,
            Self::Config(_) | Self::Usage(_) => EX_USAGE,
            Self::Flag { .. } => EX_CLI_USAGE,
            Self::Runtime(_) | Self::Reported | Self::Agent(_) => EX_FAILURE,
            Self::Client(e) => match e {
                ClientError::BadAddress { .. }
                | ClientError::Token { .. }
                | ClientError::Tls { .. }
                | ClientError::Invalid(_) => EX_CLI_USAGE,
                ClientError::Unreachable { .. } => EX_UNAVAILABLE,
                ClientError::Refused { .. }
                | ClientError::DrainEnded(_)
                | ClientError::WouldFail(_) => EX_FAILURE,
                ClientError::Incomplete(_) => EX_TEMPFAIL,
            },
            Self::Rotate(e) => match e {
                RotateError::Drain {
                    source: ClientError::Incomplete(_),
                    ..
                } => EX_TEMPFAIL,
                RotateError::Drain {
                    source: ClientError::Unreachable { .. },
                    ..
                }
                | RotateError::Api(_)
                | RotateError::Timeout(_) => EX_UNAVAILABLE,
                RotateError::Drain {
                    source:
                        ClientError::BadAddress { .. }
                        | ClientError::Token { .. }
                        | ClientError::Tls { .. }
                        | ClientError::Invalid(_),
                    ..
                } => EX_USAGE,
                _ => EX_FAILURE,
            },
            Self::ListNodes(_) => EX_UNAVAILABLE,
            Self::MaintenanceStatus(crate::drain::status::StatusError::NoSuchNode(_)) => EX_FAILURE,
            Self::MaintenanceStatus(_) => EX_UNAVAILABLE,
            Self::Sysctl(crate::sysctl::SysctlError::Rejected(_)) => EX_USAGE,
            Self::Sysctl(_) => EX_FAILURE,
            Self::DisksList(_) => EX_FAILURE,
            Self::DisksPrepare(_) => EX_FAILURE,
            Self::DisksWipe(e) if e.reason() == "refused" => EX_USAGE,
            Self::DisksWipe(_) => EX_FAILURE,
            Self::DnsWiring(_) | Self::DnsGuard(_) => EX_FAILURE,
            Self::Aggregate(crate::aggregate::AggregateError::Usage(_)) => EX_USAGE,
            Self::Aggregate(_) => EX_FAILURE,
        }
    }

    /// Tells the operator: on stderr, or through tracing for the commands that log.
    pub fn report(&self) {
        match self {
            Self::Reported => {}
            Self::Flag { .. } => eprintln!("error: {self}"),
            Self::Agent(e) => tracing::error!(error = chain(e), "nodekeeper failed"),
            Self::DnsGuard(e) => tracing::error!(error = %e, kind = e.kind(), "dns guard failed"),
            Self::Aggregate(e @ crate::aggregate::AggregateError::Usage(_)) => {
                eprintln!("nodekeeper: {e}")
            }
            Self::Aggregate(e) => {
                tracing::error!(error = %e, kind = e.kind(), "nodekeeper aggregate failed")
            }
            _ => eprintln!("nodekeeper: {self}"),
        }
    }
}

/// `e` and every error under it, `: `-separated (what `anyhow`'s `{:#}` prints).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// Runs `f` on a one-shot runtime.
pub fn block_on<T>(
    f: impl std::future::Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    runtime(RuntimeKind::OneShot)
        .map_err(CliError::Runtime)?
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::prepare::PrepareError;
    use crate::drain::rotate::RotateError;

    #[test]
    fn the_clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn an_unreadable_config_exits_66_an_invalid_one_64() {
        let read = CliError::from(ConfigError::Read {
            path: "/nonexistent".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        let parse = CliError::from(ConfigError::Parse {
            field: "sysctl.enabled".into(),
            problem: "not a bool".into(),
        });
        assert_eq!(read.exit_code(), EX_NOINPUT);
        assert_eq!(parse.exit_code(), EX_USAGE);
        assert_eq!(parse.to_string(), "sysctl.enabled: not a bool");
    }

    #[test]
    fn a_bad_agent_address_is_usage_2_for_operator_commands_but_64_for_rotate() {
        let bad = || ClientError::BadAddress {
            addr: "x".into(),
            why: "no port".into(),
        };
        assert_eq!(CliError::Client(bad()).exit_code(), EX_CLI_USAGE);
        let in_rotate = RotateError::Drain {
            node: "n1".into(),
            source: bad(),
        };
        assert_eq!(CliError::Rotate(in_rotate).exit_code(), EX_USAGE);
    }

    #[test]
    fn a_broken_drain_stream_exits_75_to_re_attach() {
        let broken = || ClientError::Incomplete("agent restarted".into());
        assert_eq!(CliError::Client(broken()).exit_code(), EX_TEMPFAIL);
        let in_rotate = RotateError::Drain {
            node: "n1".into(),
            source: broken(),
        };
        assert_eq!(CliError::Rotate(in_rotate).exit_code(), EX_TEMPFAIL);
        let unreachable = ClientError::Unreachable {
            addr: "a:1".into(),
            detail: "refused".into(),
        };
        assert_eq!(CliError::Client(unreachable).exit_code(), EX_UNAVAILABLE);
    }

    #[test]
    fn a_refused_wipe_exits_64_a_refused_prepare_1() {
        let refused = || PrepareError::Refused("not in disks.allowWipe".into());
        assert_eq!(CliError::DisksWipe(refused()).exit_code(), EX_USAGE);
        assert_eq!(CliError::DisksPrepare(refused()).exit_code(), EX_FAILURE);
    }

    #[test]
    fn a_refused_flag_is_reported_as_clap_does_with_exit_2() {
        let e = CliError::Flag {
            field: "--idle-after".into(),
            problem: "must be at least 100ms".into(),
        };
        assert_eq!(e.exit_code(), EX_CLI_USAGE);
        assert_eq!(e.to_string(), "--idle-after: must be at least 100ms");
    }

    #[test]
    fn chain_names_every_cause_as_anyhow_did() {
        let e = agent::AgentError::Runtime(std::io::Error::other("no threads"));
        assert_eq!(chain(&e), "building the tokio runtime: no threads");
    }

    #[test]
    fn a_bad_log_level_is_a_usage_error_naming_the_flag() {
        let e = Logging::new(LogFormat::Text, "nodekeeper=loud")
            .init()
            .unwrap_err();
        assert_eq!(e.exit_code(), EX_USAGE);
        assert!(
            e.to_string()
                .starts_with("--log-level \"nodekeeper=loud\": "),
            "{e}"
        );
    }
}
