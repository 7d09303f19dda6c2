//! `disks list|prepare|wipe`: what the agent finds and decides about each block device, and
//! the daemon's prepare round once.

use clap::Subcommand;

use super::{CliError, Logging, config::ConfigArgs};
use crate::disks::{prepare, report};

#[derive(Subcommand)]
pub enum DisksAction {
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

pub fn run(action: DisksAction, logging: &Logging) -> Result<(), CliError> {
    match action {
        DisksAction::List { config, json } => list(config, json),
        DisksAction::Prepare { config, json } => prepare(config, json, logging),
        DisksAction::Wipe {
            by_id,
            confirm,
            config,
        } => wipe(config, &by_id, &confirm, logging),
    }
}

/// `disks list`: reads only, logs nothing.
fn list(args: ConfigArgs, json: bool) -> Result<(), CliError> {
    use std::io::Write;
    let config = args.load()?;
    let disks = report::list(&config.disks, &config.host_paths)?;
    // A closed pipe (`| head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    if json {
        drop(writeln!(out, "{}", report::json(&disks)));
    } else {
        drop(write!(out, "{}", report::table(&disks)));
    }
    Ok(())
}

/// `disks prepare`: exit 1 when any disk failed (the report says which).
fn prepare(args: ConfigArgs, json: bool, logging: &Logging) -> Result<(), CliError> {
    let config = args.load_and_log(logging)?;
    let report = prepare::prepare_once(&config.disks, &config.host_paths, &config.state_dir)?;
    if json {
        println!("{}", serde_json::to_string(&report).expect("serializes"));
    } else {
        print!("{}", report.text());
    }
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(CliError::Reported)
    }
}

/// `disks wipe BY_ID --confirm BY_ID`: exit 64 when refused.
fn wipe(args: ConfigArgs, by_id: &str, confirm: &str, logging: &Logging) -> Result<(), CliError> {
    let config = args.load_and_log(logging)?;
    let out = prepare::wipe(
        &config.disks,
        &config.host_paths,
        &config.state_dir,
        by_id,
        confirm,
    )
    .map_err(CliError::DisksWipe)?;
    print!("{out}");
    Ok(())
}
