//! The config a command runs with: `--config` (or `NODEKEEPER_CONFIG`) plus the override
//! flags, loaded and validated in one place; and `check-config`.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{CliError, Logging};
use crate::config::{Config, ConfigError, ListenAddr, Overrides};

#[derive(Args)]
pub struct ConfigArgs {
    /// YAML config file; defaults apply when absent.
    #[arg(long, short, env = "NODEKEEPER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: OverrideArgs,
}

impl ConfigArgs {
    /// The validated config (file, then flags and env).
    pub fn load(self) -> Result<Config, CliError> {
        Ok(load(self.config.as_deref(), self.overrides)?)
    }

    /// [`ConfigArgs::load`], then starts logging: what every command that logs does first.
    pub fn load_and_log(self, logging: &Logging) -> Result<Config, CliError> {
        let config = self.load()?;
        logging.init()?;
        Ok(config)
    }
}

/// Flags that override the config file; each also reads an env var.
#[derive(Args)]
pub struct OverrideArgs {
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

fn load(file: Option<&Path>, overrides: OverrideArgs) -> Result<Config, ConfigError> {
    let mut config = Config::load(file)?;
    config.apply(overrides.into());
    config.validate()?;
    Ok(config)
}

/// `check-config FILE`: prints the effective config as YAML.
pub fn check(file: &Path, overrides: OverrideArgs) -> Result<(), CliError> {
    let config = load(Some(file), overrides)?;
    print!("{}", config.to_yaml());
    Ok(())
}
