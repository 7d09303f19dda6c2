//! `sysctl plan|apply|revert`: the profiles once, outside the daemon.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CliError, Logging, config::ConfigArgs};
use crate::sysctl::{self, Target, apply::Scope};

#[derive(Subcommand)]
pub enum SysctlAction {
    /// Print, per key, current -> desired and the winning profile. Writes nothing.
    Plan(SysctlArgs),
    /// Validate and apply the profiles once, all-or-nothing.
    Apply(SysctlArgs),
    /// Restore the keys `sysctl apply` changed to their recorded original values.
    Revert(RevertArgs),
}

#[derive(Args)]
pub struct RevertArgs {
    #[command(flatten)]
    sysctl: SysctlArgs,
    /// Also restore the keys the daemon applied (run it with the daemon stopped for good: a
    /// running daemon holds the journal and this is refused).
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
pub struct SysctlArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Work inside this network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`); only
    /// per-namespace `net.*` keys are allowed; originals are recorded per namespace and
    /// `revert --netns` restores them.
    #[arg(long)]
    netns: Option<PathBuf>,
}

/// Prints the command's report. Exit 64 when the profiles are rejected, 1 for other failures
/// (rollback and revert failures are logged by key as they happen).
pub fn run(action: SysctlAction, logging: &Logging) -> Result<(), CliError> {
    enum Op {
        Plan,
        Apply,
        Revert(Scope),
    }
    let (args, op) = match action {
        SysctlAction::Plan(a) => (a, Op::Plan),
        SysctlAction::Apply(a) => (a, Op::Apply),
        SysctlAction::Revert(RevertArgs { sysctl, all }) => (
            sysctl,
            Op::Revert(if all { Scope::All } else { Scope::Own }),
        ),
    };
    let config = args.config.load_and_log(logging)?;
    let target = Target::new(&config, args.netns);
    let out = match op {
        Op::Plan => sysctl::plan_report(&config.sysctl, &target)?,
        Op::Apply => sysctl::apply_once(&config.sysctl, &target)?,
        Op::Revert(scope) => sysctl::revert_once(&target, scope)?,
    };
    print!("{out}");
    Ok(())
}
