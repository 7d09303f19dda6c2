//! Starts the enabled capabilities as tasks under one cancellation tree and stops them in order.
//!
//! Owns the health registry every capability reports into (read by /healthz, /readyz, gRPC
//! health and GetNode) and the shutdown sequence: SIGTERM/SIGINT cancels the root token, every
//! task sees its child token cancelled, and the runtime waits for them up to a deadline. A task
//! that ends with an error is logged and shown as FAILED in health; it never vanishes silently.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pb::HealthState;

pub type TaskError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityHealth {
    pub state: HealthState,
    pub detail: String,
}

/// Per-capability health, observable: a change wakes every subscriber (gRPC health mirrors it).
#[derive(Debug, Clone)]
pub struct Health {
    tx: watch::Sender<BTreeMap<&'static str, CapabilityHealth>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            tx: watch::channel(BTreeMap::new()).0,
        }
    }
}

impl Health {
    pub fn set(&self, capability: &'static str, state: HealthState, detail: impl Into<String>) {
        let detail = detail.into();
        self.tx.send_if_modified(|m| {
            let new = CapabilityHealth { state, detail };
            if m.get(capability) == Some(&new) {
                return false;
            }
            m.insert(capability, new);
            true
        });
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, CapabilityHealth> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<&'static str, CapabilityHealth>> {
        self.tx.subscribe()
    }

    /// Live: no capability has failed (a failed one needs a restart to recover).
    pub fn live(&self) -> Result<(), String> {
        let failed: Vec<_> = self
            .tx
            .borrow()
            .iter()
            .filter(|(_, h)| h.state == HealthState::Failed)
            .map(|(n, h)| format!("{n}: {}", h.detail))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// Ready: every enabled capability is serving.
    pub fn ready(&self) -> Result<(), String> {
        let waiting: Vec<_> = self
            .tx
            .borrow()
            .iter()
            .filter(|(_, h)| !matches!(h.state, HealthState::Serving | HealthState::Disabled))
            .map(|(n, h)| format!("{n}: {}", h.state.as_str_name()))
            .collect();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(waiting.join("; "))
        }
    }
}

/// The capability tasks and their shared shutdown token.
pub struct Supervisor {
    root: CancellationToken,
    tasks: JoinSet<()>,
    health: Health,
}

impl Supervisor {
    pub fn new(health: Health) -> Self {
        Self {
            root: CancellationToken::new(),
            tasks: JoinSet::new(),
            health,
        }
    }

    pub fn token(&self) -> CancellationToken {
        self.root.clone()
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Runs `make(child_token)` as the capability `name`. The task marks itself SERVING when it is
    /// ready (through `Health`); its end is recorded here.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, make: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        self.health.set(name, HealthState::Starting, "");
        let token = self.root.child_token();
        let fut = make(token.clone());
        let health = self.health.clone();
        self.tasks.spawn(async move {
            match fut.await {
                Ok(()) if token.is_cancelled() => health.set(name, HealthState::Stopped, ""),
                Ok(()) => {
                    tracing::error!(
                        capability = name,
                        "capability task ended without being asked to stop"
                    );
                    health.set(name, HealthState::Failed, "task ended unexpectedly");
                }
                Err(e) => {
                    tracing::error!(capability = name, error = %e, "capability failed");
                    health.set(name, HealthState::Failed, e.to_string());
                }
            }
        });
    }

    /// Waits for SIGTERM/SIGINT (or the token being cancelled elsewhere), then stops every task,
    /// giving them `deadline` in total. Returns the names of tasks that did not stop in time.
    pub async fn run_until_signal(mut self, deadline: Duration) -> Vec<&'static str> {
        let token = self.root.clone();
        tokio::select! {
            signal = shutdown_signal() => tracing::info!(signal, "shutting down"),
            _ = token.cancelled() => tracing::info!("shutting down (cancelled)"),
        }
        self.root.cancel();
        let tasks = &mut self.tasks;
        let drained = tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            let stuck: Vec<_> = self
                .health
                .snapshot()
                .into_iter()
                .filter(|(_, h)| {
                    !matches!(
                        h.state,
                        HealthState::Stopped | HealthState::Failed | HealthState::Disabled
                    )
                })
                .map(|(n, _)| n)
                .collect();
            tracing::warn!(
                ?stuck,
                ?deadline,
                "tasks did not stop in time; exiting anyway"
            );
            self.tasks.abort_all();
            return stuck;
        }
        Vec::new()
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failed_task_is_reported_not_lost() {
        let mut sup = Supervisor::new(Health::default());
        sup.spawn("broken", |_| async {
            Err::<(), TaskError>("disk on fire".into())
        });
        sup.spawn("fine", |token| async move {
            token.cancelled().await;
            Ok(())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let h = sup.health().clone();
        assert_eq!(h.snapshot()["broken"].state, HealthState::Failed);
        assert!(h.live().unwrap_err().contains("disk on fire"));
        sup.token().cancel();
        let stuck = tokio::time::timeout(
            Duration::from_secs(5),
            sup.run_until_signal(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert!(stuck.is_empty());
        assert_eq!(h.snapshot()["fine"].state, HealthState::Stopped);
    }

    #[tokio::test]
    async fn stuck_task_is_named_and_abandoned_at_the_deadline() {
        let mut sup = Supervisor::new(Health::default());
        sup.spawn("stuck", |_| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        sup.token().cancel();
        let stuck = sup.run_until_signal(Duration::from_millis(100)).await;
        assert_eq!(stuck, ["stuck"]);
    }

    #[test]
    fn readiness_waits_for_every_enabled_capability() {
        let h = Health::default();
        h.set("metrics", HealthState::Serving, "");
        h.set("dns", HealthState::Disabled, "");
        h.set("api", HealthState::Starting, "");
        assert!(h.ready().unwrap_err().contains("api"));
        h.set("api", HealthState::Serving, "");
        h.ready().unwrap();
        h.live().unwrap();
    }
}
