//! The `nodekeeper` binary: parses the command line, hands the one `Logging` to the commands
//! that log, dispatches to `nodekeeper::cli` and turns its `CliError` into the exit code (the
//! codes are listed in the `cli` module doc). Everything else lives in the library.

mod heap_trim;

use std::process::ExitCode;

use clap::Parser;
use nodekeeper::cli::{
    self, Cli, Command, agent, aggregate, config, connections, disks, dns, drain, sysctl,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Installed by the commands that log, once their config is valid (see `cli::Logging`).
    let logging = cli::Logging::new(cli.log_format, &cli.log_level);
    let result = match cli.command {
        Command::Version => agent::version(),
        Command::Run(args) => agent::run(args, &logging, heap_trim::spawn),
        Command::CheckConfig { file, overrides } => config::check(&file, overrides),
        Command::Sysctl { action } => sysctl::run(action, &logging),
        Command::Disks { action } => disks::run(action, &logging),
        Command::Connections {
            netns,
            source,
            idle_after,
            top_remotes,
        } => connections::run(&netns, source, idle_after, top_remotes),
        Command::Aggregate(args) => aggregate::run(args, &logging),
        Command::DnsWiring { action } => dns::wiring(action, &logging),
        Command::DnsGuard { guard, config } => dns::guard(guard, config, &logging),
        Command::Dns {
            action: cli::dns::DnsAction::Status { agent },
        } => dns::status(agent),
        Command::Drain(args) => drain::drain(args),
        Command::Cordon { agent, reason } => drain::cordon(agent, reason),
        Command::Uncordon { agent } => drain::uncordon(agent),
        Command::GetDrain { agent, json } => drain::get_drain(agent, json),
        Command::Rotate(args) => drain::rotate(args),
        Command::Maintenance { action } => drain::maintenance(action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            e.report();
            ExitCode::from(e.exit_code())
        }
    }
}
