//! Caps shared by the listeners that anonymous clients can reach (issue #15): connections per
//! source address and in all ([`PeerCaps`]), and the one budget for long-lived server-streaming
//! RPCs ([`StreamBudget`]). A slot is held by a guard and given back when it drops, so a task
//! or connection that ends for any reason frees its place.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open things (connections, streams) per source address, capped per address and in all.
#[derive(Debug)]
pub struct PeerCaps {
    per_peer: usize,
    total: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One place taken in a [`PeerCaps`]; given back on drop.
#[derive(Debug)]
pub struct PeerSlot {
    caps: Arc<PeerCaps>,
    ip: IpAddr,
}

impl PeerCaps {
    pub fn new(per_peer: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_peer: per_peer.max(1),
            total: total.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for `ip`, or None when it already holds its share or all places are taken.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut open = self.open.lock().expect("peer caps lock");
        let all: usize = open.values().sum();
        let mine = open.entry(ip).or_default();
        if *mine >= self.per_peer || all >= self.total {
            if *mine == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        Some(PeerSlot {
            caps: self.clone(),
            ip,
        })
    }

    pub fn per_peer(&self) -> usize {
        self.per_peer
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.caps.open.lock().expect("peer caps lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The one budget for server-streaming RPCs that live as long as the client wants
/// (`WatchMetrics`, KEDA's `StreamIsActive` and `StreamMetricSpec`, grpc.health.v1 `Watch`): `api.maxWatchStreams` in
/// all, at most half of it per client address, so one client cannot hold them all.
#[derive(Debug, Clone)]
pub struct StreamBudget(Arc<PeerCaps>);

impl StreamBudget {
    pub fn new(total: usize) -> Self {
        Self(PeerCaps::new(total.div_ceil(2), total))
    }

    /// A stream slot for `peer` (None: the peer address is unknown, counted as one peer), or
    /// RESOURCE_EXHAUSTED naming the bound that was hit.
    pub fn take(&self, peer: Option<IpAddr>) -> Result<PeerSlot, tonic::Status> {
        let ip = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        self.0.take(ip).ok_or_else(|| {
            tonic::Status::resource_exhausted(format!(
                "streaming RPC budget exhausted (api.maxWatchStreams: {} in all, {} per client address, shared by WatchMetrics, StreamIsActive, StreamMetricSpec and Health/Watch)",
                self.0.total(),
                self.0.per_peer()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_gets_its_share_and_slots_come_back_on_drop() {
        let caps = PeerCaps::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = caps.take(a).unwrap();
        let _a2 = caps.take(a).unwrap();
        assert!(caps.take(a).is_none(), "per-peer cap");
        let _b1 = caps.take(b).unwrap();
        assert!(caps.take(b).is_none(), "global cap");
        drop(a1);
        assert!(caps.take(b).is_some(), "a dropped slot is free again");
    }

    #[test]
    fn the_stream_budget_leaves_half_for_other_clients() {
        let budget = StreamBudget::new(4);
        let hog: IpAddr = "10.0.0.9".parse().unwrap();
        let held: Vec<_> = (0..2).map(|_| budget.take(Some(hog)).unwrap()).collect();
        let e = budget.take(Some(hog)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("api.maxWatchStreams"),
            "{}",
            e.message()
        );
        assert!(budget.take(Some("10.0.0.10".parse().unwrap())).is_ok());
        drop(held);
    }
}
