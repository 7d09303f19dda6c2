//! The `nodekeeper` binary: parses the CLI and config, sets up logging, runs the library's app.
//! Exit codes: 0 ok, 1 runtime failure, 64 bad config or usage (EX_USAGE), 66 config file
//! unreadable (EX_NOINPUT). The operator commands (`drain`, `cordon`, `uncordon`, `get-drain`)
//! use 0 completed, 1 failed / timed out / cancelled / refused, 2 usage (as clap), 69 agent
//! unreachable (EX_UNAVAILABLE), 75 the stream ended without a result, e.g. the agent restarted:
//! re-run the same command to re-attach (EX_TEMPFAIL).

mod heap_trim;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use nodekeeper::api::client::{self, ClientError};
use nodekeeper::config::{Config, ConfigDuration, ConfigError, ListenAddr, Overrides};

const EX_USAGE: u8 = 64;
const EX_NOINPUT: u8 = 66;
/// Operator commands: a usage error, as clap exits on bad flags.
const EX_CLI_USAGE: u8 = 2;
const EX_UNAVAILABLE: u8 = 69;
/// Operator commands: the drain goes on but this stream ended without a result; re-attach.
const EX_TEMPFAIL: u8 = 75;

#[derive(Parser)]
#[command(name = "nodekeeper", version = nodekeeper::app::VERSION, about = "Per-node Kubernetes agent: resource metrics, sysctl tuning, local disks, NodeLocal DNS, graceful drain")]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "NODEKEEPER_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,nodekeeper=debug`).
    #[arg(long, global = true, default_value = "info", env = "NODEKEEPER_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the DaemonSet's command).
    Run(ConfigArgs),
    /// Validate a config file and print the effective config (file + flags + env) as YAML.
    CheckConfig {
        /// The YAML config file to check.
        file: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Plan, apply or revert sysctl profiles once, outside the daemon.
    Sysctl {
        #[command(subcommand)]
        action: SysctlAction,
    },
    /// Drain a node through its agent: cordon, evict in order, stream progress until done.
    Drain(DrainArgs),
    /// Mark a node unschedulable through its agent.
    Cordon {
        #[command(flatten)]
        agent: AgentArgs,
        /// Recorded in the node's Event.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Mark a node schedulable again (refused while a drain runs).
    Uncordon {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Print the current or last drain of a node.
    GetDrain {
        #[command(flatten)]
        agent: AgentArgs,
        /// Print the status as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Local disks: what the agent finds and decides about each block device.
    Disks {
        #[command(subcommand)]
        action: DisksAction,
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
        source: CensusSource,
        /// Connections without data for this long count as idle.
        #[arg(long, default_value = "30s")]
        idle_after: ConfigDuration,
        /// Pools reported per namespace; the rest are summed as "other".
        #[arg(long, default_value_t = 10)]
        top_remotes: usize,
    },
    /// Run the cluster-wide aggregator: KEDA's external scaler with fleet-wide sums.
    Aggregate(nodekeeper::aggregate::AggregateArgs),
    /// NodeLocal DNS node wiring once (interface, addresses, NOTRACK/ACCEPT rules), as the
    /// agent does around the cache; `teardown` un-wires a node by hand. Prints one JSON line.
    DnsWiring {
        #[command(subcommand)]
        action: DnsWiringAction,
    },
    /// The DNS fail-open guard, a sidecar in the agent's pod: probes the cache every interval
    /// and removes the transparent wiring when it stops answering (docs/dns.md).
    DnsGuard {
        #[command(flatten)]
        guard: nodekeeper::dns::node::cli::GuardArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// The NodeLocal DNS cache of a node, through its agent.
    Dns {
        #[command(subcommand)]
        action: DnsAction,
    },
    /// Walk nodes through the patch-and-reboot rotation from the orchestrator's side: drain
    /// each (await_reboot) through its agent, then wait until it is back from its reboot and
    /// done. Resumable: run it again with the same --id after a crash.
    Rotate(RotateArgs),
    /// The patch-and-reboot rotation across the fleet, read from the API server.
    Maintenance {
        #[command(subcommand)]
        action: MaintenanceAction,
    },
    /// Print the version and the git revision it was built from.
    Version,
}

#[derive(Args)]
struct RotateArgs {
    /// Nodes, rotated in this order (or --selector, by name).
    nodes: Vec<String>,
    /// Label selector of the nodes to rotate, e.g. `pool=trino`.
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Names this rotation: each node's drain id is ID/NODE; the same --id resumes.
    #[arg(long)]
    id: String,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the in-cluster account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A node's agent address (default: the node's InternalIP and --port).
    #[arg(long = "agent", value_name = "NODE=ADDR")]
    agents: Vec<String>,
    /// The agents' gRPC port.
    #[arg(long, default_value_t = 9741)]
    port: u16,
    /// File holding a bearer token for the agents.
    #[arg(long, env = "NODEKEEPER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Recorded on each drain and in the nodes' Events.
    #[arg(long, default_value = "patch rotation")]
    reason: String,
    /// Each drain's deadline (the agent's default when absent).
    #[arg(long)]
    timeout: Option<ConfigDuration>,
    /// How long to wait for each node's return after its drain.
    #[arg(long, default_value = "30m")]
    return_wait: ConfigDuration,
    /// Leave each node cordoned after its return.
    #[arg(long)]
    keep_cordoned: bool,
    /// Evict pods without a controller.
    #[arg(long)]
    evict_unreplicated: bool,
    /// Evict pods with emptyDir volumes.
    #[arg(long)]
    delete_emptydir_data: bool,
    /// How often a node's state is read while waiting for its return.
    #[arg(long, default_value = "2s")]
    poll: ConfigDuration,
}

/// `rotate`: 0 every node done; 1 a drain or rotation failed or a node did not come back;
/// 64 usage or an unusable kubeconfig; 69 the API server or an agent unreachable; 75 a drain's
/// stream broke (run the same command again to resume).
fn rotate(a: RotateArgs) -> ExitCode {
    use nodekeeper::drain::rotate::{RotateError, RotateOptions};
    let mut agents = Vec::new();
    for spec in &a.agents {
        match spec.split_once('=') {
            Some((n, addr)) if !n.is_empty() && !addr.is_empty() => {
                agents.push((n.to_string(), addr.to_string()))
            }
            _ => {
                eprintln!("nodekeeper: --agent {spec:?}: expected NODE=ADDR");
                return ExitCode::from(EX_USAGE);
            }
        }
    }
    if a.nodes.is_empty() == a.selector.is_none() {
        eprintln!("nodekeeper: rotate: name the nodes or give --selector (one of them)");
        return ExitCode::from(EX_USAGE);
    }
    let runtime = match operator_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let kube = match operator_kube_client(a.kubeconfig.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nodekeeper: {e:#}");
                return ExitCode::from(EX_USAGE);
            }
        };
        let nodes = match &a.selector {
            None => a.nodes.clone(),
            Some(sel) => {
                let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(kube.clone());
                match api
                    .list(&kube::api::ListParams::default().labels(sel))
                    .await
                {
                    Ok(l) => {
                        let mut n: Vec<String> = l
                            .items
                            .into_iter()
                            .filter_map(|n| n.metadata.name)
                            .collect();
                        n.sort();
                        n
                    }
                    Err(e) => {
                        eprintln!("nodekeeper: listing nodes: {e}");
                        return ExitCode::from(EX_UNAVAILABLE);
                    }
                }
            }
        };
        let opts = RotateOptions {
            id_prefix: a.id,
            agents,
            port: a.port,
            connect: client::ConnectOptions {
                token_file: a.token_file,
                ..Default::default()
            },
            reason: a.reason,
            drain_timeout: a.timeout.map(|d| d.get()),
            keep_cordoned: a.keep_cordoned,
            return_wait: a.return_wait.get(),
            evict_unreplicated: a.evict_unreplicated,
            delete_emptydir_data: a.delete_emptydir_data,
            poll: a.poll.get(),
        };
        let r = nodekeeper::drain::rotate::rotate(&kube, &nodes, &opts, |line| println!("{line}"))
            .await;
        match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nodekeeper: {e}");
                ExitCode::from(match &e {
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
                    _ => 1,
                })
            }
        }
    })
}

#[derive(Subcommand)]
enum MaintenanceAction {
    /// Each node's rotation state (since, boot ID, return-by), whether nodekeeper cordoned it
    /// and since when, its drain, and the fleet-lock slot it holds. Reads only.
    Status(MaintenanceStatusArgs),
}

#[derive(Args)]
struct MaintenanceStatusArgs {
    /// Nodes to show (default: every node, or those matching --selector).
    nodes: Vec<String>,
    /// Label selector of the nodes to show, e.g. `pool=trino`.
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the in-cluster account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The agents' `drain.fleetLock.namespace`.
    #[arg(long, default_value = nodekeeper::drain::lock::DEFAULT_NAMESPACE)]
    lock_namespace: String,
    /// The agents' `drain.fleetLock.namePrefix`.
    #[arg(long, default_value = nodekeeper::drain::lock::DEFAULT_NAME_PREFIX)]
    lock_prefix: String,
    /// Print a JSON array, one object per node.
    #[arg(long)]
    json: bool,
}

/// A client for the operator's own credentials: `--kubeconfig`, else kube's usual inference.
async fn operator_kube_client(path: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match path {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("--kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}", p.display()))?
        }
        None => kube::Config::infer().await.context("no kubeconfig")?,
    };
    kube::Client::try_from(config).context("kubernetes client")
}

/// `maintenance status`: exit 0, 1 for a node that does not exist, 64 for an unusable
/// kubeconfig, 69 when the API server fails.
fn maintenance_status(a: MaintenanceStatusArgs) -> ExitCode {
    use nodekeeper::drain::status::{self, LockLocation, StatusError};
    let runtime = match operator_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let client = match operator_kube_client(a.kubeconfig.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nodekeeper: {e:#}");
                return ExitCode::from(EX_USAGE);
            }
        };
        let at = LockLocation {
            namespace: a.lock_namespace,
            name_prefix: a.lock_prefix,
        };
        match status::fleet(&client, &a.nodes, a.selector.as_deref(), &at).await {
            Ok(nodes) if a.json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&nodes).expect("serializes")
                );
                ExitCode::SUCCESS
            }
            Ok(nodes) => {
                print!("{}", status::table(&nodes));
                ExitCode::SUCCESS
            }
            Err(e @ StatusError::NoSuchNode(_)) => {
                eprintln!("nodekeeper: {e}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("nodekeeper: {e}");
                ExitCode::from(EX_UNAVAILABLE)
            }
        }
    })
}

#[derive(Subcommand)]
enum DnsWiringAction {
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
enum DnsAction {
    /// Cache size, hit ratio and upstream health.
    Status {
        #[command(flatten)]
        agent: AgentArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CensusSource {
    Auto,
    Bpf,
    SockDiag,
    Procfs,
}

/// Which agent to talk to, and how to authenticate.
#[derive(Args)]
struct AgentArgs {
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
    async fn connect(&self) -> Result<client::Client, ClientError> {
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

#[derive(Args)]
struct DrainArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// Unique per drain; re-running with the same id re-attaches to it.
    #[arg(long)]
    id: String,
    /// Why, recorded on the drain and in the node's Events.
    #[arg(long, default_value = "")]
    reason: String,
    /// Who asked (default: $USER@hostname).
    #[arg(long)]
    requester: Option<String>,
    /// The whole drain's deadline (250ms, 90s, 30m, 2h); the agent's default when absent.
    #[arg(long)]
    timeout: Option<ConfigDuration>,
    /// Overrides each pod's terminationGracePeriodSeconds.
    #[arg(long, value_name = "SECONDS")]
    grace_period: Option<i64>,
    /// Evictions in flight at once; the agent's default when absent.
    #[arg(long, value_name = "N")]
    concurrency: Option<u32>,
    /// Evict pods with emptyDir volumes (their data is lost).
    #[arg(long)]
    delete_emptydir_data: bool,
    /// Evict pods without a controller (they are not recreated).
    #[arg(long)]
    evict_unreplicated: bool,
    /// Equality selector of leader pods, evicted last (default: the agent's).
    #[arg(long, value_name = "SEL")]
    leader_selector: Option<String>,
    /// Print the plan without cordoning or evicting.
    #[arg(long)]
    dry_run: bool,
    /// Do not wait for pods Terminating for longer than this (kubectl's
    /// --skip-wait-for-delete-timeout), e.g. `2m`.
    #[arg(long, value_name = "DURATION")]
    skip_wait_for_delete_timeout: Option<nodekeeper::config::ConfigDuration>,
    /// A patch-and-reboot rotation: after the drain the node keeps its fleet-lock slot until
    /// it is back from its reboot, then the agent uncordons it (docs/operations.md).
    #[arg(long)]
    await_reboot: bool,
    /// With --await-reboot: leave the node cordoned after its return.
    #[arg(long, requires = "await_reboot")]
    keep_cordoned: bool,
    /// With --await-reboot: how long the node has to come back before MaintenanceOverdue
    /// Events (default: the agent's drain.maintenance.returnTimeout).
    #[arg(long, value_name = "DURATION", requires = "await_reboot")]
    return_timeout: Option<nodekeeper::config::ConfigDuration>,
    /// One JSON object per DrainEvent on stdout (proto3 JSON mapping), no progress bar.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DisksAction {
    /// Print every block device with the agent's decision and its reason. Reads only: sysfs,
    /// mountinfo, and the first and last MiB of selected, unused disks.
    List {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print `{"disks": [...]}` as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Discover, inspect and prepare once (mkfs + mount / raw / raid0), as the daemon does
    /// every interval. Exit 1 when any disk failed.
    Prepare {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Erase every signature on a disk listed in disks.allowWipe (its data is gone). Exit 64
    /// when refused.
    Wipe {
        /// The disk's /dev/disk/by-id/ path, exactly as listed in disks.allowWipe.
        by_id: String,
        /// Must repeat BY_ID.
        #[arg(long, value_name = "BY_ID")]
        confirm: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum SysctlAction {
    /// Print, per key, current -> desired and the winning profile. Writes nothing.
    Plan(SysctlArgs),
    /// Validate and apply the profiles once, all-or-nothing.
    Apply(SysctlArgs),
    /// Restore the keys `sysctl apply` changed to their recorded original values.
    Revert(RevertArgs),
}

#[derive(Args)]
struct RevertArgs {
    #[command(flatten)]
    sysctl: SysctlArgs,
    /// Also restore the keys the daemon applied (run it with the daemon stopped for good: a
    /// running daemon holds the journal and this is refused).
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct SysctlArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Work inside this network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`); only
    /// per-namespace `net.*` keys are allowed; originals are recorded per namespace and
    /// `revert --netns` restores them.
    #[arg(long)]
    netns: Option<PathBuf>,
}

#[derive(Args)]
struct ConfigArgs {
    /// YAML config file; defaults apply when absent.
    #[arg(long, short, env = "NODEKEEPER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: OverrideArgs,
}

/// Flags that override the config file; each also reads an env var.
#[derive(Args)]
struct OverrideArgs {
    /// This node's name (Kubernetes sets NODE_NAME from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Directory for state that must survive restarts.
    #[arg(long, env = "NODEKEEPER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// HTTP address for /metrics, /healthz, /readyz.
    #[arg(long, env = "NODEKEEPER_METRICS_LISTEN")]
    metrics_listen: Option<ListenAddr>,
    /// gRPC address.
    #[arg(long, env = "NODEKEEPER_API_LISTEN")]
    api_listen: Option<ListenAddr>,
    /// File holding the bearer token that mutating gRPC calls must present (api.auth.tokenFile).
    #[arg(long, env = "NODEKEEPER_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Never use the Kubernetes API, even when a kubeconfig is present.
    #[arg(long, env = "NODEKEEPER_STANDALONE")]
    standalone: bool,
    /// Host procfs root.
    #[arg(long, env = "NODEKEEPER_HOST_PROC")]
    host_proc: Option<PathBuf>,
    /// Host sysfs root.
    #[arg(long, env = "NODEKEEPER_HOST_SYS")]
    host_sys: Option<PathBuf>,
    /// Host /dev root.
    #[arg(long, env = "NODEKEEPER_HOST_DEV")]
    host_dev: Option<PathBuf>,
    /// Host root filesystem.
    #[arg(long, env = "NODEKEEPER_HOST_ROOTFS")]
    host_rootfs: Option<PathBuf>,
    /// Host cgroup v2 root.
    #[arg(long, env = "NODEKEEPER_HOST_CGROUP")]
    host_cgroup: Option<PathBuf>,
}

impl From<OverrideArgs> for Overrides {
    fn from(a: OverrideArgs) -> Self {
        Self {
            node_name: a.node_name,
            state_dir: a.state_dir,
            metrics_listen: a.metrics_listen,
            api_listen: a.api_listen,
            api_token_file: a.api_token_file,
            standalone: a.standalone,
            host_proc: a.host_proc,
            host_sys: a.host_sys,
            host_dev: a.host_dev,
            host_rootfs: a.host_rootfs,
            host_cgroup: a.host_cgroup,
        }
    }
}

fn load(file: Option<&std::path::Path>, overrides: OverrideArgs) -> Result<Config, ConfigError> {
    let mut config = Config::load(file)?;
    config.apply(overrides.into());
    config.validate()?;
    Ok(config)
}

fn config_exit(e: &ConfigError) -> ExitCode {
    eprintln!("nodekeeper: {e}");
    ExitCode::from(match e {
        ConfigError::Read { .. } => EX_NOINPUT,
        _ => EX_USAGE,
    })
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("--log-level {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!(
                "nodekeeper {} ({})",
                nodekeeper::app::VERSION,
                nodekeeper::app::REVISION
            );
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file, overrides } => match load(Some(&file), overrides) {
            Ok(config) => {
                print!("{}", config.to_yaml());
                ExitCode::SUCCESS
            }
            Err(e) => config_exit(&e),
        },
        Command::Sysctl { action } => {
            let (args, run): (SysctlArgs, SysctlCommand) = match action {
                SysctlAction::Plan(a) => (a, |c, t| nodekeeper::sysctl::plan_report(&c.sysctl, t)),
                SysctlAction::Apply(a) => (a, |c, t| nodekeeper::sysctl::apply_once(&c.sysctl, t)),
                SysctlAction::Revert(RevertArgs { sysctl, all: false }) => (sysctl, |_, t| {
                    nodekeeper::sysctl::revert_once(t, nodekeeper::sysctl::apply::Scope::Own)
                }),
                SysctlAction::Revert(RevertArgs { sysctl, all: true }) => (sysctl, |_, t| {
                    nodekeeper::sysctl::revert_once(t, nodekeeper::sysctl::apply::Scope::All)
                }),
            };
            let config = match load(args.config.config.as_deref(), args.config.overrides) {
                Ok(c) => c,
                Err(e) => return config_exit(&e),
            };
            // Rollback and revert failures are logged by key as they happen.
            if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
                eprintln!("nodekeeper: {e:#}");
                return ExitCode::from(EX_USAGE);
            }
            let target = nodekeeper::sysctl::Target {
                proc_root: config.host_paths.proc.clone(),
                state_dir: config.state_dir.join("sysctl"),
                netns: args.netns,
            };
            match run(&config, &target) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nodekeeper: {e}");
                    ExitCode::from(
                        if matches!(e, nodekeeper::sysctl::SysctlError::Rejected(_)) {
                            EX_USAGE
                        } else {
                            1
                        },
                    )
                }
            }
        }
        Command::Disks {
            action: action @ (DisksAction::Prepare { .. } | DisksAction::Wipe { .. }),
        } => disks(action, cli.log_format, &cli.log_level),
        Command::Drain(args) => operator(drain(args)),
        Command::Connections {
            netns,
            source,
            idle_after,
            top_remotes,
        } => {
            use nodekeeper::metrics::connections::{self, SourcePreference};
            let config = connections::ConnectionsConfig {
                source: match source {
                    CensusSource::Auto => SourcePreference::Auto,
                    CensusSource::Bpf => SourcePreference::Bpf,
                    CensusSource::SockDiag => SourcePreference::SockDiag,
                    CensusSource::Procfs => SourcePreference::Procfs,
                },
                idle_after,
                top_remotes,
                ..Default::default()
            };
            if let Some((field, problem)) = config.problems().into_iter().next() {
                eprintln!("error: {field}: {problem}");
                return ExitCode::from(2);
            }
            let readings = connections::Census::new(config.source)
                .read(&netns)
                .readings;
            let report: Vec<_> = netns
                .iter()
                .zip(&readings)
                .map(|(path, r)| connections::report_json(path, r, &config))
                .collect();
            println!("{}", serde_json::Value::Array(report));
            if readings.iter().all(Result::is_ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Cordon { agent, reason } => operator(async move {
            let mut c = agent.connect().await?;
            let node = c.cordon(&reason).await?;
            println!("node {} cordoned", node.node_name);
            Ok(())
        }),
        Command::Uncordon { agent } => operator(async move {
            let mut c = agent.connect().await?;
            let node = c.uncordon().await?;
            println!("node {} uncordoned", node.node_name);
            Ok(())
        }),
        Command::Dns {
            action: DnsAction::Status { agent },
        } => operator(async move {
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
        }),
        Command::Maintenance {
            action: MaintenanceAction::Status(args),
        } => maintenance_status(args),
        Command::Rotate(args) => rotate(args),
        Command::GetDrain { agent, json } => operator(async move {
            let mut c = agent.connect().await?;
            let status = c.get_drain().await?;
            if json {
                println!("{}", client::status_json(&status));
            } else {
                println!("{}", client::status_text(&status));
            }
            Ok(())
        }),
        Command::Disks {
            action: DisksAction::List { config, json },
        } => {
            let config = match load(config.config.as_deref(), config.overrides) {
                Ok(c) => c,
                Err(e) => return config_exit(&e),
            };
            use nodekeeper::disks::report;
            use std::io::Write;
            // A closed pipe (`| head`) is not an error worth a panic.
            let mut out = std::io::stdout().lock();
            match report::list(&config.disks, &config.host_paths) {
                Ok(r) if json => drop(writeln!(out, "{}", report::json(&r))),
                Ok(r) => drop(write!(out, "{}", report::table(&r))),
                Err(e) => {
                    eprintln!("nodekeeper: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Aggregate(args) => {
            if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
                eprintln!("nodekeeper: {e:#}");
                return ExitCode::from(EX_USAGE);
            }
            match nodekeeper::aggregate::main(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ nodekeeper::aggregate::AggregateError::Usage(_)) => {
                    eprintln!("nodekeeper: {e}");
                    ExitCode::from(EX_USAGE)
                }
                Err(e) => {
                    tracing::error!(error = %e, kind = e.kind(), "nodekeeper aggregate failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DnsWiring { action } => {
            use nodekeeper::dns::node::cli::{self as dns_cli, WiringOp};
            let (op, args) = match action {
                DnsWiringAction::Setup(a) => (WiringOp::Setup, a),
                DnsWiringAction::Check(a) => (WiringOp::Check, a),
                DnsWiringAction::Teardown(a) => (WiringOp::Teardown, a),
                DnsWiringAction::Hold(a) => (WiringOp::Hold, a),
            };
            let config = match load(args.config.as_deref(), args.overrides) {
                Ok(c) => c,
                Err(e) => return config_exit(&e),
            };
            if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
                eprintln!("nodekeeper: {e:#}");
                return ExitCode::from(EX_USAGE);
            }
            match dns_cli::wiring(op, &config.dns) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nodekeeper: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DnsGuard { guard, config } => {
            let config = match load(config.config.as_deref(), config.overrides) {
                Ok(c) => c,
                Err(e) => return config_exit(&e),
            };
            let problems = guard.problems();
            if !problems.is_empty() {
                return config_exit(&ConfigError::Invalid(problems));
            }
            if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
                eprintln!("nodekeeper: {e:#}");
                return ExitCode::from(EX_USAGE);
            }
            match nodekeeper::dns::node::cli::guard(&config, &guard) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, kind = e.kind(), "dns guard failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let config = match load(args.config.as_deref(), args.overrides) {
                Ok(c) => c,
                Err(e) => return config_exit(&e),
            };
            if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
                eprintln!("nodekeeper: {e:#}");
                return ExitCode::from(EX_USAGE);
            }
            match run(config, args.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "nodekeeper failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The small single-threaded runtime an operator command runs on; FAILURE (said) if it cannot
/// be built.
fn operator_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("nodekeeper: building the tokio runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Runs an operator command on a small runtime and maps its error to the exit code.
fn operator(f: impl std::future::Future<Output = Result<(), ClientError>>) -> ExitCode {
    let runtime = match operator_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodekeeper: {e}");
            ExitCode::from(match e {
                ClientError::BadAddress { .. }
                | ClientError::Token { .. }
                | ClientError::Tls { .. }
                | ClientError::Invalid(_) => EX_CLI_USAGE,
                ClientError::Unreachable { .. } => EX_UNAVAILABLE,
                ClientError::Refused { .. }
                | ClientError::DrainEnded(_)
                | ClientError::WouldFail(_) => 1,
                ClientError::Incomplete(_) => EX_TEMPFAIL,
            })
        }
    }
}

async fn drain(a: DrainArgs) -> Result<(), ClientError> {
    let mut c = a.agent.connect().await?;
    let req = nodekeeper::pb::DrainRequest {
        id: a.id,
        reason: a.reason,
        requester: a.requester.unwrap_or_else(client::default_requester),
        timeout: a
            .timeout
            .and_then(|t| prost_types::Duration::try_from(t.get()).ok()),
        grace_period_seconds: a.grace_period,
        concurrency: a.concurrency.unwrap_or(0),
        delete_emptydir_data: a.delete_emptydir_data,
        evict_unreplicated: a.evict_unreplicated,
        leader_selector: a.leader_selector.unwrap_or_default(),
        dry_run: a.dry_run,
        skip_wait_for_delete_timeout: a
            .skip_wait_for_delete_timeout
            .and_then(|t| prost_types::Duration::try_from(t.get()).ok()),
        // Filled in by the client: --node, else the node the agent reports.
        node_name: String::new(),
        node_uid: String::new(),
        await_reboot: a.await_reboot,
        keep_cordoned: a.keep_cordoned,
        return_timeout: a
            .return_timeout
            .and_then(|t| prost_types::Duration::try_from(t.get()).ok()),
    };
    if a.json {
        let status = c
            .drain(req, |e| println!("{}", client::event_json(e)))
            .await?;
        if a.dry_run {
            return Ok(());
        }
        eprintln!("{}", client::status_text(&status));
        return Ok(());
    }
    if a.dry_run {
        let mut plan = None;
        let result = c
            .drain(req, |e| {
                if let Some(nodekeeper::pb::drain_event::Event::Planned(s)) = &e.event {
                    plan = Some(s.clone());
                }
            })
            .await;
        if let Some(p) = &plan {
            print!("{}", client::plan_table(p));
        }
        return result.map(|_| ());
    }
    let mut progress = client::Progress::new();
    let result = c.drain(req, |e| progress.event(e)).await;
    progress.finish();
    let status = result?;
    println!("{}", client::status_text(&status));
    Ok(())
}

fn disks(action: DisksAction, format: LogFormat, filter: &str) -> ExitCode {
    use nodekeeper::disks::prepare;
    let (args, wipe, json) = match action {
        DisksAction::List { .. } => unreachable!("`disks list` is handled in main"),
        DisksAction::Prepare { config, json } => (config, None, json),
        DisksAction::Wipe {
            by_id,
            confirm,
            config,
        } => (config, Some((by_id, confirm)), false),
    };
    let config = match load(args.config.as_deref(), args.overrides) {
        Ok(c) => c,
        Err(e) => return config_exit(&e),
    };
    if let Err(e) = init_logging(format, filter) {
        eprintln!("nodekeeper: {e:#}");
        return ExitCode::from(EX_USAGE);
    }
    let (cfg, paths, state) = (&config.disks, &config.host_paths, &config.state_dir);
    if let Some((by_id, confirm)) = wipe {
        return match prepare::wipe(cfg, paths, state, &by_id, &confirm) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nodekeeper: {e}");
                ExitCode::from(if e.reason() == "refused" { EX_USAGE } else { 1 })
            }
        };
    }
    match prepare::prepare_once(cfg, paths, state) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report).expect("serializes"));
            } else {
                print!("{}", report.text());
            }
            if report.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("nodekeeper: {e}");
            ExitCode::FAILURE
        }
    }
}

type SysctlCommand =
    fn(&Config, &nodekeeper::sysctl::Target) -> Result<String, nodekeeper::sysctl::SysctlError>;

fn run(config: Config, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    // A node agent shares the node with its workloads: two workers are plenty for its I/O, and
    // never more than the CPUs it may run on (affinity, cgroup quota): an extra worker on the
    // same CPU only adds context switches to every DNS answer.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    heap_trim::spawn();
    runtime.block_on(nodekeeper::app::run(config, config_file))?;
    Ok(())
}
