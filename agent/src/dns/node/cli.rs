//! The one-shot wiring commands (`nodekeeper dns-wiring setup|check|teardown|hold`) and the
//! guard sidecar's entry point (`nodekeeper dns-guard`). They build a small runtime, a
//! [`NodeWiring`] from the config's `dns:` section, and run; `nodekeeper::cli::dns` parses and maps errors.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::guard::{self, GuardSettings};
use super::{NodeWiring, WiringError};
use crate::config::ConfigDuration;
use crate::dns::DnsConfig;

/// What `dns-wiring` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WiringOp {
    Setup,
    Check,
    Teardown,
    /// Setup, check every `dns.node.checkInterval`, teardown on SIGTERM/SIGINT (what the agent
    /// does around the cache; lets tests SIGKILL a wiring owner).
    Hold,
}

/// `dns-guard` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct GuardArgs {
    /// How often the cache is probed.
    #[arg(long, default_value = "1s")]
    pub interval: ConfigDuration,
    /// Consecutive unanswered probes before failing open.
    #[arg(long, default_value_t = guard::DEFAULT_FAILURES)]
    pub failures: u32,
    /// How long one probe waits for the answer.
    #[arg(long, default_value = "500ms")]
    pub probe_timeout: ConfigDuration,
    /// After SIGTERM, keep guarding this long before the last decision (default: the config's
    /// dns.lameDuck + 1s).
    #[arg(long)]
    pub grace: Option<ConfigDuration>,
    /// The name probed (class CH, type TXT).
    #[arg(long, default_value = guard::DEFAULT_PROBE_NAME)]
    pub probe_name: String,
    /// Serve the guard's own metrics (`/metrics`: fail-open pending, failures) here (not
    /// `--metrics-listen`: that is the agent's port, in the same config).
    #[arg(long)]
    pub guard_metrics_listen: Option<std::net::SocketAddr>,
}

/// The longest `--interval`, `--probe-timeout` and `--grace`: a guard that waits longer is not
/// guarding (the fail-open window is documented in seconds).
const MAX_GUARD_DURATION: Duration = Duration::from_secs(3600);

impl GuardArgs {
    /// Flag values the guard cannot run with, each naming its flag: a zero interval or probe
    /// timeout (tokio's interval panics on zero; a zero timeout fails every probe and opens a
    /// healthy node), zero failures, or a duration over an hour.
    pub fn problems(&self) -> Vec<crate::config::FieldError> {
        let mut out = Vec::new();
        let mut bad = |field: &str, problem: String| {
            out.push(crate::config::FieldError {
                field: field.to_string(),
                problem,
            })
        };
        for (flag, value, zero_ok) in [
            ("--interval", Some(self.interval), false),
            ("--probe-timeout", Some(self.probe_timeout), false),
            ("--grace", self.grace, true),
        ] {
            let Some(value) = value else { continue };
            if value.get().is_zero() && !zero_ok {
                bad(flag, "must be greater than zero".to_string());
            } else if value.get() > MAX_GUARD_DURATION {
                bad(
                    flag,
                    format!(
                        "{value} is longer than {}",
                        ConfigDuration(MAX_GUARD_DURATION)
                    ),
                );
            }
        }
        if self.failures == 0 {
            bad("--failures", "must be at least 1".to_string());
        }
        out
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, WiringError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WiringError::Runtime)
}

/// A token cancelled on SIGTERM or SIGINT.
fn on_signal() -> Result<CancellationToken, WiringError> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).map_err(WiringError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(WiringError::Runtime)?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        t.cancel();
    });
    Ok(token)
}

/// Runs one wiring operation; returns the JSON line to print.
pub fn wiring(op: WiringOp, dns: &DnsConfig) -> Result<String, WiringError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let w = NodeWiring::new(dns, &mut registry);
    runtime()?.block_on(async {
        let backend = w.backend().await.map(|b| b.name()).unwrap_or("none");
        let (action, repairs) = match op {
            WiringOp::Setup => ("setup", w.setup().await.map(|()| 0)?),
            WiringOp::Check => ("check", w.check().await?),
            WiringOp::Teardown => ("teardown", w.teardown().await.map(|()| 0)?),
            WiringOp::Hold => {
                let cancel = on_signal()?;
                w.setup().await?;
                println!(
                    "{}",
                    serde_json::json!({"action": "hold", "ready": true, "pid": std::process::id()})
                );
                w.maintain(dns.node.check_interval.get(), cancel).await;
                w.teardown().await?;
                ("hold", 0)
            }
        };
        Ok(serde_json::json!({
            "action": action,
            "repairs": repairs,
            "backend": backend,
            "interface": w.interface(),
            "addresses": w.addresses(),
        })
        .to_string())
    })
}

/// The guard sidecar: runs until SIGTERM/SIGINT plus its grace period. Never connects to the
/// Kubernetes API, whatever `kubernetes.mode` says.
pub fn guard(config: &crate::config::Config, args: &GuardArgs) -> Result<(), WiringError> {
    let dns = &config.dns;
    let target = *dns.listen_addrs().first().ok_or(WiringError::NoAddress)?;
    let settings = GuardSettings {
        target,
        interval: args.interval.get(),
        failures: args.failures,
        probe_timeout: args.probe_timeout.get(),
        grace: args
            .grace
            .map(ConfigDuration::get)
            .unwrap_or_else(|| dns.lame_duck.get() + Duration::from_secs(1)),
        probe_name: args.probe_name.clone(),
    };
    let mut registry = prometheus_client::registry::Registry::with_prefix("nodekeeper");
    let w = NodeWiring::new(dns, &mut registry);
    let metrics = guard::GuardMetrics::register(&mut registry);
    let registry = std::sync::Arc::new(registry);
    runtime()?.block_on(async {
        let cancel = on_signal()?;
        // No API client at all: the guard holds no credential and reports through its
        // metrics and log only (docs/decisions.md #19-d).
        if let Some(addr) = args.guard_metrics_listen {
            // Bound in its own task: waiting for a predecessor's port must not delay guarding.
            let (registry, token) = (registry.clone(), cancel.clone());
            tokio::spawn(async move {
                let served = match crate::listen::tcp_exclusive_when_free(
                    addr,
                    crate::listen::PREDECESSOR_WAIT,
                )
                .await
                {
                    Ok(listener) => crate::http::serve_registry(listener, registry, token)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(format!("cannot listen on {addr}: {e}")),
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "dns guard: metrics server stopped");
                }
            });
        }
        guard::run(&w, &settings, &metrics, cancel).await;
        Ok(())
    })
}
