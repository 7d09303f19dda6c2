//! `aggregate`: the cluster-wide aggregator (KEDA's external scaler with fleet-wide sums).

use super::{CliError, Logging};
use crate::aggregate::{self, AggregateArgs};

/// Starts logging and runs the aggregator until SIGTERM/SIGINT: exit 64 for a bad flag
/// value, 1 when it fails (logged).
pub fn run(args: AggregateArgs, logging: &Logging) -> Result<(), CliError> {
    logging.init()?;
    Ok(aggregate::main(args)?)
}
