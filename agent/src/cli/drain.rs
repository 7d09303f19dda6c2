//! The drain family: `drain`, `cordon`, `uncordon`, `get-drain` through a node's agent, and
//! the rotation from the orchestrator's side: `rotate`, `maintenance status` (through the API
//! server, with the operator's own kubeconfig).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::{CliError, remote::AgentArgs};
use crate::api::client::{self, ClientError};
use crate::config::ConfigDuration;
use crate::drain::rotate::RotateOptions;
use crate::drain::status::{self, LockLocation};

// === drain, cordon, uncordon, get-drain ===

#[derive(Args)]
pub struct DrainArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// Unique per drain; re-running with the same id re-attaches to it.
    #[arg(long)]
    id: String,
    /// Why, recorded on the drain and in the node's Events.
    #[arg(long, default_value = "")]
    reason: String,
    /// Who asked (default: $USER@hostname).
    #[arg(long)]
    requester: Option<String>,
    /// The whole drain's deadline (250ms, 90s, 30m, 2h); the agent's default when absent.
    #[arg(long)]
    timeout: Option<ConfigDuration>,
    /// Overrides each pod's terminationGracePeriodSeconds.
    #[arg(long, value_name = "SECONDS")]
    grace_period: Option<i64>,
    /// Evictions in flight at once; the agent's default when absent.
    #[arg(long, value_name = "N")]
    concurrency: Option<u32>,
    /// Evict pods with emptyDir volumes (their data is lost).
    #[arg(long)]
    delete_emptydir_data: bool,
    /// Evict pods without a controller (they are not recreated).
    #[arg(long)]
    evict_unreplicated: bool,
    /// Equality selector of leader pods, evicted last (default: the agent's).
    #[arg(long, value_name = "SEL")]
    leader_selector: Option<String>,
    /// Print the plan without cordoning or evicting.
    #[arg(long)]
    dry_run: bool,
    /// Do not wait for pods Terminating for longer than this (kubectl's
    /// --skip-wait-for-delete-timeout), e.g. `2m`.
    #[arg(long, value_name = "DURATION")]
    skip_wait_for_delete_timeout: Option<ConfigDuration>,
    /// A patch-and-reboot rotation: after the drain the node keeps its fleet-lock slot until
    /// it is back from its reboot, then the agent uncordons it (docs/operations.md).
    #[arg(long)]
    await_reboot: bool,
    /// With --await-reboot: leave the node cordoned after its return.
    #[arg(long, requires = "await_reboot")]
    keep_cordoned: bool,
    /// With --await-reboot: how long the node has to come back before MaintenanceOverdue
    /// Events (default: the agent's drain.maintenance.returnTimeout).
    #[arg(long, value_name = "DURATION", requires = "await_reboot")]
    return_timeout: Option<ConfigDuration>,
    /// One JSON object per DrainEvent on stdout (proto3 JSON mapping), no progress bar.
    #[arg(long)]
    json: bool,
}

/// `drain`: streams the drain's progress (a progress bar, `--json` events or the
/// `--dry-run` plan) and prints its final status.
pub fn drain(a: DrainArgs) -> Result<(), CliError> {
    super::remote::call(drain_call(a))
}

fn proto_duration(d: Option<ConfigDuration>) -> Option<prost_types::Duration> {
    d.and_then(|t| prost_types::Duration::try_from(t.get()).ok())
}

async fn drain_call(a: DrainArgs) -> Result<(), ClientError> {
    let mut c = a.agent.connect().await?;
    let req = crate::pb::DrainRequest {
        id: a.id,
        reason: a.reason,
        requester: a.requester.unwrap_or_else(client::default_requester),
        timeout: proto_duration(a.timeout),
        grace_period_seconds: a.grace_period,
        concurrency: a.concurrency.unwrap_or(0),
        delete_emptydir_data: a.delete_emptydir_data,
        evict_unreplicated: a.evict_unreplicated,
        leader_selector: a.leader_selector.unwrap_or_default(),
        dry_run: a.dry_run,
        skip_wait_for_delete_timeout: proto_duration(a.skip_wait_for_delete_timeout),
        // Filled in by the client: --node, else the node the agent reports.
        node_name: String::new(),
        node_uid: String::new(),
        await_reboot: a.await_reboot,
        keep_cordoned: a.keep_cordoned,
        return_timeout: proto_duration(a.return_timeout),
    };
    if a.json {
        let status = c
            .drain(req, |e| println!("{}", client::event_json(e)))
            .await?;
        if !a.dry_run {
            eprintln!("{}", client::status_text(&status));
        }
        return Ok(());
    }
    if a.dry_run {
        let mut plan = None;
        let result = c
            .drain(req, |e| {
                if let Some(crate::pb::drain_event::Event::Planned(s)) = &e.event {
                    plan = Some(s.clone());
                }
            })
            .await;
        if let Some(p) = &plan {
            print!("{}", client::plan_table(p));
        }
        return result.map(|_| ());
    }
    let mut progress = client::Progress::new();
    let result = c.drain(req, |e| progress.event(e)).await;
    progress.finish();
    let status = result?;
    println!("{}", client::status_text(&status));
    Ok(())
}

/// `cordon`: marks the node unschedulable, `reason` in its Event.
pub fn cordon(agent: AgentArgs, reason: String) -> Result<(), CliError> {
    super::remote::call(async move {
        let mut c = agent.connect().await?;
        let node = c.cordon(&reason).await?;
        println!("node {} cordoned", node.node_name);
        Ok(())
    })
}

/// `uncordon`: refused while a drain runs.
pub fn uncordon(agent: AgentArgs) -> Result<(), CliError> {
    super::remote::call(async move {
        let mut c = agent.connect().await?;
        let node = c.uncordon().await?;
        println!("node {} uncordoned", node.node_name);
        Ok(())
    })
}

/// `get-drain`: the current or last drain, as text or one JSON object.
pub fn get_drain(agent: AgentArgs, json: bool) -> Result<(), CliError> {
    super::remote::call(async move {
        let mut c = agent.connect().await?;
        let status = c.get_drain().await?;
        if json {
            println!("{}", client::status_json(&status));
        } else {
            println!("{}", client::status_text(&status));
        }
        Ok(())
    })
}

// === rotate ===

#[derive(Args)]
pub struct RotateArgs {
    /// Nodes, rotated in this order (or --selector, by name).
    nodes: Vec<String>,
    /// Label selector of the nodes to rotate, e.g. `pool=trino`.
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Names this rotation: each node's drain id is ID/NODE; the same --id resumes.
    #[arg(long)]
    id: String,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the in-cluster account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A node's agent address (default: the node's InternalIP and --port).
    #[arg(long = "agent", value_name = "NODE=ADDR")]
    agents: Vec<String>,
    /// The agents' gRPC port.
    #[arg(long, default_value_t = 9741)]
    port: u16,
    /// File holding a bearer token for the agents.
    #[arg(long, env = "NODEKEEPER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Recorded on each drain and in the nodes' Events.
    #[arg(long, default_value = "patch rotation")]
    reason: String,
    /// Each drain's deadline (the agent's default when absent).
    #[arg(long)]
    timeout: Option<ConfigDuration>,
    /// How long to wait for each node's return after its drain.
    #[arg(long, default_value = "30m")]
    return_wait: ConfigDuration,
    /// Leave each node cordoned after its return.
    #[arg(long)]
    keep_cordoned: bool,
    /// Evict pods without a controller.
    #[arg(long)]
    evict_unreplicated: bool,
    /// Evict pods with emptyDir volumes.
    #[arg(long)]
    delete_emptydir_data: bool,
    /// How often a node's state is read while waiting for its return.
    #[arg(long, default_value = "2s")]
    poll: ConfigDuration,
}

/// `rotate`: 0 every node done; 1 a drain or rotation failed or a node did not come back;
/// 64 usage or an unusable kubeconfig; 69 the API server or an agent unreachable; 75 a drain's
/// stream broke (run the same command again to resume).
pub fn rotate(a: RotateArgs) -> Result<(), CliError> {
    let mut agents = Vec::new();
    for spec in &a.agents {
        match spec.split_once('=') {
            Some((n, addr)) if !n.is_empty() && !addr.is_empty() => {
                agents.push((n.to_string(), addr.to_string()))
            }
            _ => {
                return Err(CliError::Usage(format!(
                    "--agent {spec:?}: expected NODE=ADDR"
                )));
            }
        }
    }
    if a.nodes.is_empty() == a.selector.is_none() {
        return Err(CliError::Usage(
            "rotate: name the nodes or give --selector (one of them)".into(),
        ));
    }
    super::block_on(async move {
        let kube = operator_kube_client(a.kubeconfig.as_deref()).await?;
        let nodes = match &a.selector {
            None => a.nodes.clone(),
            Some(sel) => {
                let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(kube.clone());
                let list = api
                    .list(&kube::api::ListParams::default().labels(sel))
                    .await
                    .map_err(CliError::ListNodes)?;
                let mut n: Vec<String> = list
                    .items
                    .into_iter()
                    .filter_map(|n| n.metadata.name)
                    .collect();
                n.sort();
                n
            }
        };
        let opts = RotateOptions {
            id_prefix: a.id,
            agents,
            port: a.port,
            connect: client::ConnectOptions {
                token_file: a.token_file,
                ..Default::default()
            },
            reason: a.reason,
            drain_timeout: a.timeout.map(|d| d.get()),
            keep_cordoned: a.keep_cordoned,
            return_wait: a.return_wait.get(),
            evict_unreplicated: a.evict_unreplicated,
            delete_emptydir_data: a.delete_emptydir_data,
            poll: a.poll.get(),
        };
        crate::drain::rotate::rotate(&kube, &nodes, &opts, |line| println!("{line}")).await?;
        Ok(())
    })
}

/// A client for the operator's own credentials: `--kubeconfig`, else kube's usual inference.
/// Unusable: a usage error (64) naming the flag.
async fn operator_kube_client(path: Option<&Path>) -> Result<kube::Client, CliError> {
    let config = match path {
        Some(p) => {
            let unusable = |e: &dyn std::error::Error| {
                CliError::Usage(format!("--kubeconfig {}: {}", p.display(), super::chain(e)))
            };
            let kc = kube::config::Kubeconfig::read_from(p).map_err(|e| unusable(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| unusable(&e))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| CliError::Usage(format!("no kubeconfig: {}", super::chain(&e))))?,
    };
    kube::Client::try_from(config)
        .map_err(|e| CliError::Usage(format!("kubernetes client: {}", super::chain(&e))))
}

// === maintenance status ===

#[derive(Subcommand)]
pub enum MaintenanceAction {
    /// Each node's rotation state (since, boot ID, return-by), whether nodekeeper cordoned it
    /// and since when, its drain, and the fleet-lock slot it holds. Reads only.
    Status(MaintenanceStatusArgs),
}

#[derive(Args)]
pub struct MaintenanceStatusArgs {
    /// Nodes to show (default: every node, or those matching --selector).
    nodes: Vec<String>,
    /// Label selector of the nodes to show, e.g. `pool=trino`.
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the in-cluster account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The agents' `drain.fleetLock.namespace`.
    #[arg(long, default_value = crate::drain::lock::DEFAULT_NAMESPACE)]
    lock_namespace: String,
    /// The agents' `drain.fleetLock.namePrefix`.
    #[arg(long, default_value = crate::drain::lock::DEFAULT_NAME_PREFIX)]
    lock_prefix: String,
    /// Print a JSON array, one object per node.
    #[arg(long)]
    json: bool,
}

/// `maintenance status`: exit 0, 1 for a node that does not exist, 64 for an unusable
/// kubeconfig, 69 when the API server fails.
pub fn maintenance(action: MaintenanceAction) -> Result<(), CliError> {
    let MaintenanceAction::Status(a) = action;
    super::block_on(async move {
        let client = operator_kube_client(a.kubeconfig.as_deref()).await?;
        let at = LockLocation {
            namespace: a.lock_namespace,
            name_prefix: a.lock_prefix,
        };
        let nodes = status::fleet(&client, &a.nodes, a.selector.as_deref(), &at).await?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&nodes).expect("serializes")
            );
        } else {
            print!("{}", status::table(&nodes));
        }
        Ok(())
    })
}
