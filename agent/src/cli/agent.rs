//! `run` (the agent itself) and `version`.

use super::{CliError, Logging, RuntimeKind, config::ConfigArgs};
use crate::app::{self, AppError};

/// Why the agent stopped with an error (logged, exit 1).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("building the tokio runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    App(#[from] AppError),
}

/// `run`: loads the config, starts logging, builds the agent's runtime, calls `on_start`
/// (the binary's own threads, e.g. heap trimming) and runs [`app::run`] until SIGTERM/SIGINT.
pub fn run(args: ConfigArgs, logging: &Logging, on_start: impl FnOnce()) -> Result<(), CliError> {
    let config_file = args.config.clone();
    let config = args.load_and_log(logging)?;
    let runtime = super::runtime(RuntimeKind::Agent).map_err(AgentError::Runtime)?;
    on_start();
    runtime
        .block_on(app::run(config, config_file))
        .map_err(AgentError::from)?;
    Ok(())
}

/// `version`: the version and the git revision it was built from.
pub fn version() -> Result<(), CliError> {
    println!("nodekeeper {} ({})", app::VERSION, app::REVISION);
    Ok(())
}
