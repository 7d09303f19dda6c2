//! `nodekeeper rotate`: one orchestrator-side walk of the patch-and-reboot rotation (issue #20)
//! over the nodes given, one node after another: Drain with `await_reboot` through the node's
//! agent (id `<prefix>/<node>`), then wait, reading the Node's `nodekeeper.io/maintenance`
//! record, until the node is back from its reboot and `done`. The reboot itself is the
//! patching tool's (SSM `AWS-RunPatchBaseline`, a shell step); `rotate` only waits for it.
//!
//! Resumable from the Nodes alone: a node whose record says this rotation's drain is `done` is
//! skipped, one past its drain (`drained` .. `returning`) is only waited for, and one still
//! draining is re-attached to with the same id (the agent replays its drain); so a `rotate`
//! killed at any point and run again cordons and uncordons each node exactly once.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};

use super::maintenance::{self, Record, State};
use crate::api::client::{self, ClientError, ConnectOptions};
use crate::kube::API_CALL_TIMEOUT;
use crate::pb;

/// How often the node's record is read while waiting for its return.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("{0} took longer than {API_CALL_TIMEOUT:?}")]
    Timeout(&'static str),
    /// The node's agent refused or the drain did not complete.
    #[error("node {node}: {source}")]
    Drain { node: String, source: ClientError },
    /// The rotation of this node ended `failed` (the node stays cordoned).
    #[error("node {node}: rotation {id} failed: {error}")]
    Failed {
        node: String,
        id: String,
        error: String,
    },
    /// The node did not come back in time.
    #[error("node {node}: not back from its reboot within {waited:?} (state {state})")]
    NotBack {
        node: String,
        state: String,
        waited: Duration,
    },
    /// No address for the node's agent.
    #[error("node {0}: no InternalIP and no --agent {0}=ADDR")]
    NoAddress(String),
}

/// What `rotate` does for each node.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// Drain ids are `<id_prefix>/<node>`: the same prefix re-attaches.
    pub id_prefix: String,
    /// `node=addr` overrides of the agent address (default: the node's InternalIP and `port`).
    pub agents: Vec<(String, String)>,
    pub port: u16,
    pub connect: ConnectOptions,
    pub reason: String,
    pub drain_timeout: Option<Duration>,
    pub keep_cordoned: bool,
    /// How long rotate waits for each node's return after its drain.
    pub return_wait: Duration,
    pub evict_unreplicated: bool,
    pub delete_emptydir_data: bool,
    pub poll: Duration,
}

async fn call<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, RotateError> {
    tokio::time::timeout(API_CALL_TIMEOUT, f)
        .await
        .map_err(|_| RotateError::Timeout(what))?
        .map_err(RotateError::from)
}

/// The node's maintenance record (None without one or unreadable) and its InternalIP.
async fn read(
    nodes: &Api<Node>,
    name: &str,
) -> Result<(Option<Record>, Option<String>), RotateError> {
    let node = call("GET node", nodes.get(name)).await?;
    let record = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(maintenance::ANNOTATION))
        .and_then(|t| serde_json::from_str(t).ok());
    let ip = node
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address);
    Ok((record, ip))
}

/// Rotates `nodes` in order; `say` gets one progress line per step.
pub async fn rotate(
    kube: &Client,
    nodes: &[String],
    opts: &RotateOptions,
    mut say: impl FnMut(&str),
) -> Result<(), RotateError> {
    let api: Api<Node> = Api::all(kube.clone());
    for (i, node) in nodes.iter().enumerate() {
        let id = format!("{}/{node}", opts.id_prefix);
        let step = format!("[{}/{}] {node}", i + 1, nodes.len());
        let (record, ip) = read(&api, node).await?;
        let ours = record.as_ref().filter(|r| r.drain_id == id);
        match ours.map(|r| r.state) {
            Some(State::Done) => {
                say(&format!("{step}: done already (rotation {id}); skipped"));
                continue;
            }
            Some(State::Failed) => {
                return Err(RotateError::Failed {
                    node: node.clone(),
                    id,
                    error: ours.map(|r| r.error.clone()).unwrap_or_default(),
                });
            }
            Some(
                s @ (State::Drained | State::AwaitingReboot | State::Rebooted | State::Returning),
            ) => {
                say(&format!(
                    "{step}: drained already ({}); waiting for its return",
                    s.as_str()
                ));
            }
            Some(State::Draining) | None => {
                let addr = opts
                    .agents
                    .iter()
                    .find(|(n, _)| n == node)
                    .map(|(_, a)| a.clone())
                    .or_else(|| ip.map(|ip| format!("{ip}:{}", opts.port)))
                    .ok_or_else(|| RotateError::NoAddress(node.clone()))?;
                say(&format!("{step}: draining through {addr} (id {id})"));
                match drain(node, &addr, &id, opts, &mut say).await {
                    Ok(()) => say(&format!("{step}: drained; awaiting its reboot")),
                    // The agent went away with the node (the patching tool rebooted it as soon
                    // as it was drained, before our stream got `completed`): the Node's record
                    // says whether the drain is over.
                    Err(
                        e @ RotateError::Drain {
                            source: ClientError::Incomplete(_),
                            ..
                        },
                    ) => {
                        let (record, _) = read(&api, node).await?;
                        let past_drain = record
                            .filter(|r| r.drain_id == id)
                            .is_some_and(|r| !matches!(r.state, State::Draining | State::Failed));
                        if !past_drain {
                            return Err(e);
                        }
                        say(&format!(
                            "{step}: drained (the agent's stream ended with the reboot); awaiting its return"
                        ));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        wait_done(&api, node, &id, opts, &step, &mut say).await?;
        say(&format!("{step}: done"));
    }
    Ok(())
}

async fn drain(
    node: &str,
    addr: &str,
    id: &str,
    opts: &RotateOptions,
    say: &mut impl FnMut(&str),
) -> Result<(), RotateError> {
    let err = |source| RotateError::Drain {
        node: node.to_string(),
        source,
    };
    let mut c = client::Client::connect_with(addr, &opts.connect)
        .await
        .map_err(err)?;
    let req = pb::DrainRequest {
        id: id.to_string(),
        reason: opts.reason.clone(),
        requester: client::default_requester(),
        timeout: opts
            .drain_timeout
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        node_name: node.to_string(),
        await_reboot: true,
        keep_cordoned: opts.keep_cordoned,
        evict_unreplicated: opts.evict_unreplicated,
        delete_emptydir_data: opts.delete_emptydir_data,
        ..Default::default()
    };
    let mut deleted = 0usize;
    c.drain(req, |e| {
        if let Some(pb::drain_event::Event::Deleted(_)) = e.event {
            deleted += 1;
        }
    })
    .await
    .map_err(err)?;
    say(&format!("{node}: {deleted} pods evicted in this attach"));
    Ok(())
}

async fn wait_done(
    api: &Api<Node>,
    node: &str,
    id: &str,
    opts: &RotateOptions,
    step: &str,
    say: &mut impl FnMut(&str),
) -> Result<(), RotateError> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let (record, _) = read(api, node).await?;
        let state = record
            .as_ref()
            .filter(|r| r.drain_id == id)
            .map_or("none", |r| r.state.as_str());
        if state != last {
            say(&format!("{step}: {state}"));
            last = state.to_string();
        }
        match state {
            "done" => return Ok(()),
            "failed" => {
                return Err(RotateError::Failed {
                    node: node.to_string(),
                    id: id.to_string(),
                    error: record.map(|r| r.error).unwrap_or_default(),
                });
            }
            _ => {}
        }
        if started.elapsed() > opts.return_wait {
            return Err(RotateError::NotBack {
                node: node.to_string(),
                state: state.to_string(),
                waited: opts.return_wait,
            });
        }
        tokio::time::sleep(opts.poll).await;
    }
}
