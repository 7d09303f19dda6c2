//! `connections --netns PATH...`: the per-pod socket census once, one JSON object per namespace.

use std::path::PathBuf;

use clap::ValueEnum;

use super::CliError;
use crate::config::ConfigDuration;
use crate::metrics::connections::{self, SourcePreference};

// `--source`: how to read sockets (no doc comment: clap would read it).
#[derive(Clone, Copy, ValueEnum)]
pub enum CensusSource {
    Auto,
    Bpf,
    SockDiag,
    Procfs,
}

impl From<CensusSource> for SourcePreference {
    fn from(s: CensusSource) -> Self {
        match s {
            CensusSource::Auto => Self::Auto,
            CensusSource::Bpf => Self::Bpf,
            CensusSource::SockDiag => Self::SockDiag,
            CensusSource::Procfs => Self::Procfs,
        }
    }
}

/// Prints a JSON array, one report per namespace (in `netns` order); exit 1 when any
/// namespace could not be read (its report says why), 2 for an unusable flag value.
pub fn run(
    netns: &[PathBuf],
    source: CensusSource,
    idle_after: ConfigDuration,
    top_remotes: usize,
) -> Result<(), CliError> {
    let config = connections::ConnectionsConfig {
        source: source.into(),
        idle_after,
        top_remotes,
        ..Default::default()
    };
    if let Some((field, problem)) = config.problems().into_iter().next() {
        return Err(CliError::Flag { field, problem });
    }
    let readings = connections::Census::new(config.source).read(netns).readings;
    let report: Vec<_> = netns
        .iter()
        .zip(&readings)
        .map(|(path, r)| connections::report_json(path, r, &config))
        .collect();
    println!("{}", serde_json::Value::Array(report));
    if readings.iter().all(Result::is_ok) {
        Ok(())
    } else {
        Err(CliError::Reported)
    }
}
