//! `nodekeeper maintenance status`: the fleet view of the patch-and-reboot rotation (issue #20),
//! read from the API server with the operator's credentials (not through the agents): each
//! node's `nodekeeper.io/maintenance` record (state, since, boot ID, return-by, error), whether
//! nodekeeper cordoned it and since when (`nodekeeper.io/cordoned-at`), its drain
//! (`nodekeeper.io/drain`) and the fleet-lock slot it holds (the slot Leases' holders).
//!
//! Reads only: one LIST of Nodes (a label selector, or all) and one LIST of Leases in the lock's
//! namespace; never writes anything.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::{Api, Client};
use serde::Serialize;

use super::lock;
use super::maintenance::{self, Record};
use super::state::Persisted;
use crate::kube::API_CALL_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("{0} took longer than {API_CALL_TIMEOUT:?}")]
    Timeout(&'static str),
    /// A node named on the command line does not exist.
    #[error("node {0:?} not found")]
    NoSuchNode(String),
}

/// One node's maintenance, as the fleet view prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMaintenance {
    pub node: String,
    /// `spec.unschedulable`, whoever set it.
    pub cordoned: bool,
    /// Unix seconds nodekeeper cordoned it; absent when it is not cordoned by nodekeeper.
    pub cordoned_by_nodekeeper_since: Option<u64>,
    /// The rotation state (`draining` ... `done`, `failed`); absent without a record.
    pub state: Option<String>,
    /// Unix seconds the state was entered.
    pub since: Option<u64>,
    pub drain_id: String,
    pub boot_id: String,
    /// Unix seconds by which the node should be back from its reboot (0: not set).
    pub return_by: u64,
    pub error: String,
    /// The node's drain record: `id phase (requester)`.
    pub drain: String,
    /// The fleet-lock slot (Lease name) this node holds, if any.
    pub slot: Option<String>,
}

/// Where the slot Leases are (the agents' `drain.fleetLock`).
#[derive(Debug, Clone)]
pub struct LockLocation {
    pub namespace: String,
    pub name_prefix: String,
}

impl Default for LockLocation {
    fn default() -> Self {
        Self {
            namespace: lock::DEFAULT_NAMESPACE.into(),
            name_prefix: lock::DEFAULT_NAME_PREFIX.into(),
        }
    }
}

async fn call<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, StatusError> {
    tokio::time::timeout(API_CALL_TIMEOUT, f)
        .await
        .map_err(|_| StatusError::Timeout(what))?
        .map_err(StatusError::from)
}

/// The nodes named (all matching `selector` when none is named), sorted by name.
pub async fn fleet(
    client: &Client,
    names: &[String],
    selector: Option<&str>,
    at: &LockLocation,
) -> Result<Vec<NodeMaintenance>, StatusError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut lp = ListParams::default();
    if let Some(s) = selector {
        lp = lp.labels(s);
    }
    let listed = call("LIST nodes", nodes.list(&lp)).await?.items;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &at.namespace);
    // An absent namespace or no Leases yet: nobody holds a slot.
    let slots: BTreeMap<String, String> =
        match call("LIST leases", leases.list(&ListParams::default())).await {
            Ok(l) => l
                .items
                .into_iter()
                .filter_map(|l| {
                    let name = l.metadata.name.clone()?;
                    // An expired, unmarked Lease is free for any node to take: not held (#20-k).
                    let holder = lock::live_holder(&l)?;
                    name.starts_with(&at.name_prefix).then_some((holder, name))
                })
                .collect(),
            Err(StatusError::Api(kube::Error::Api(s))) if s.code == 404 => BTreeMap::new(),
            Err(e) => return Err(e),
        };
    let mut out: Vec<NodeMaintenance> = listed
        .iter()
        .map(|n| of(n, &slots))
        .filter(|m| names.is_empty() || names.contains(&m.node))
        .collect();
    for name in names {
        if !out.iter().any(|m| &m.node == name) {
            return Err(StatusError::NoSuchNode(name.clone()));
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

fn of(node: &Node, slots: &BTreeMap<String, String>) -> NodeMaintenance {
    let name = node.metadata.name.clone().unwrap_or_default();
    let empty = BTreeMap::new();
    let ann = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let record: Option<Record> = ann
        .get(maintenance::ANNOTATION)
        .and_then(|t| serde_json::from_str(t).ok());
    let drain = ann
        .get(super::STATE_ANNOTATION)
        .and_then(|t| Persisted::from_json(t).ok())
        .map(|p| format!("{} {} ({})", p.id, p.phase, p.requester))
        .unwrap_or_default();
    NodeMaintenance {
        cordoned,
        cordoned_by_nodekeeper_since: ann
            .get(super::CORDONED_AT_ANNOTATION)
            .and_then(|t| t.parse().ok())
            .filter(|_| cordoned),
        state: record.as_ref().map(|r| r.state.as_str().to_string()),
        since: record.as_ref().map(|r| r.since),
        drain_id: record
            .as_ref()
            .map(|r| r.drain_id.clone())
            .unwrap_or_default(),
        boot_id: record
            .as_ref()
            .map(|r| r.boot_id.clone())
            .unwrap_or_default(),
        // A done rotation's return-by is the deadline of a reboot it already came back from
        // (adversary #20c); a failed one may still hold its marked slot, so it keeps showing it.
        return_by: record
            .as_ref()
            .filter(|r| r.state != maintenance::State::Done)
            .map_or(0, |r| r.return_by),
        error: record.map(|r| r.error).unwrap_or_default(),
        drain,
        slot: slots.get(&name).cloned(),
        node: name,
    }
}

/// The earliest time shown as a date (2000-01-01T00:00:00Z): anything earlier is a bad value.
const EARLIEST_PLAUSIBLE: u64 = 946_684_800;
/// How far in the future a recorded time may be before it is shown as invalid rather than as a
/// date: the longest return-by a rotation can set (7 days) plus a day of clock skew.
const FUTURE_SLACK_SECS: u64 = super::state::MAX_RETURN_TIMEOUT_SECONDS + 24 * 3600;

/// A unix time for the table: a date within [2000-01-01, now + 8 days], `invalid (<raw>)`
/// otherwise (a hand edit, a hostile value, a clock far off), never a wrapped or future date.
fn when(t: Option<u64>) -> String {
    let now = k8s_openapi::jiff::Timestamp::now().as_second().max(0) as u64;
    when_at(t, now)
}

fn when_at(t: Option<u64>, now: u64) -> String {
    match t.filter(|t| *t > 0) {
        Some(t) if (EARLIEST_PLAUSIBLE..=now.saturating_add(FUTURE_SLACK_SECS)).contains(&t) => {
            i64::try_from(t)
                .ok()
                .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
                .map(|d| d.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| format!("invalid ({t})"))
        }
        Some(t) => format!("invalid ({t})"),
        None => "-".into(),
    }
}

/// A cordon time after now is flagged: nodekeeper cannot have cordoned in the future.
fn cordon_when(t: Option<u64>) -> String {
    let now = k8s_openapi::jiff::Timestamp::now().as_second().max(0) as u64;
    match t {
        Some(t) if t > now => format!("invalid (future: {t})"),
        _ => when_at(t, now),
    }
}

/// The human table: one line per node.
pub fn table(nodes: &[NodeMaintenance]) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut rows = vec![
        [
            "NODE",
            "CORDONED",
            "BY NODEKEEPER SINCE",
            "STATE",
            "SINCE",
            "BOOT ID",
            "SLOT",
            "RETURN BY",
            "DRAIN",
            "ERROR",
        ]
        .map(String::from),
    ];
    for n in nodes {
        rows.push([
            n.node.clone(),
            if n.cordoned { "yes" } else { "no" }.into(),
            cordon_when(n.cordoned_by_nodekeeper_since),
            n.state.clone().unwrap_or_else(|| "-".into()),
            when(n.since),
            dash(&n.boot_id),
            n.slot.clone().unwrap_or_else(|| "-".into()),
            when(Some(n.return_by)),
            dash(&n.drain),
            dash(&n.error),
        ]);
    }
    let widths: Vec<usize> = (0..10)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_outside_the_plausible_range_render_as_invalid() {
        let now = 1_800_000_000;
        assert_eq!(
            when_at(Some(u64::MAX), now),
            format!("invalid ({})", u64::MAX)
        );
        assert_eq!(when_at(Some(5), now), "invalid (5)");
        // A return-by a week ahead is a date; nine days ahead is not.
        assert_eq!(when_at(Some(now + 7 * 86400), now), "2027-01-22T08:00:00Z");
        assert_eq!(
            when_at(Some(now + 9 * 86400), now),
            format!("invalid ({})", now + 9 * 86400)
        );
        assert_eq!(when_at(Some(946_684_800), now), "2000-01-01T00:00:00Z");
        assert_eq!(when_at(None, now), "-");
        assert_eq!(when_at(Some(0), now), "-");
        assert!(cordon_when(Some(4_102_444_800)).starts_with("invalid (future"));
    }
}
