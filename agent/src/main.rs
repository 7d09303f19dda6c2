//! The `nodekeeper` binary: parses the CLI and config, sets up logging, runs the library's app.
//! Exit codes: 0 ok, 1 runtime failure, 64 bad config or usage (EX_USAGE), 66 config file
//! unreadable (EX_NOINPUT).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use nodekeeper::config::{Config, ConfigError, ListenAddr, Overrides};

const EX_USAGE: u8 = 64;
const EX_NOINPUT: u8 = 66;

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
    /// Local disks: what the agent finds and decides about each block device.
    Disks {
        #[command(subcommand)]
        action: DisksAction,
    },
    /// Print the version and the git revision it was built from.
    Version,
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
}

#[derive(Subcommand)]
enum SysctlAction {
    /// Print, per key, current -> desired and the winning profile. Writes nothing.
    Plan(SysctlArgs),
    /// Validate and apply the profiles once, all-or-nothing.
    Apply(SysctlArgs),
    /// Restore every key the agent changed to its recorded original value.
    Revert(SysctlArgs),
}

#[derive(Args)]
struct SysctlArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Work inside this network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`); only
    /// per-namespace `net.*` keys are allowed and no originals are recorded.
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
                SysctlAction::Revert(a) => (a, |_, t| nodekeeper::sysctl::revert_all(t)),
            };
            let config = match load(args.config.config.as_deref(), args.config.overrides) {
                Ok(c) => c,
                Err(e) => return config_exit(&e),
            };
            let target = nodekeeper::sysctl::Target {
                proc_root: config.host_paths.proc.clone(),
                state_file: config.state_dir.join("sysctl/originals.json"),
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

type SysctlCommand =
    fn(&Config, &nodekeeper::sysctl::Target) -> Result<String, nodekeeper::sysctl::SysctlError>;

fn run(config: Config, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // A node agent shares the node with its workloads: two workers are plenty for its I/O.
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(nodekeeper::app::run(config, config_file))?;
    Ok(())
}
