//! The firewall rules the cache needs, independent of the tool that installs them, and the
//! choice of that tool. Per listen IP and protocol (udp, tcp), as node-local-dns installs them:
//!
//! | table  | chain      | match                     | action  |
//! |--------|------------|---------------------------|---------|
//! | raw    | PREROUTING | `-d IP --dport PORT`      | NOTRACK |
//! | raw    | OUTPUT     | `-d IP --dport PORT`      | NOTRACK |
//! | raw    | OUTPUT     | `-s IP --sport PORT`      | NOTRACK |
//! | filter | INPUT      | `-d IP --dport PORT`      | ACCEPT  |
//! | filter | INPUT      | `-s IP --sport PORT`      | ACCEPT  |
//! | filter | OUTPUT     | `-d IP --dport PORT`      | ACCEPT  |
//! | filter | OUTPUT     | `-s IP --sport PORT`      | ACCEPT  |
//!
//! NOTRACK keeps DNS to the cache out of conntrack (no DNAT race, no table pressure, and the
//! nat table's kube-proxy DNAT for a ClusterIP never sees it); ACCEPT lets it past a
//! restrictive filter policy. Never decides anything about rules that are not ours.

use std::net::IpAddr;

use super::exec;
use crate::dns::config::RulesBackend;

/// The comment that marks an iptables rule as ours (no space: iptables-save prints it unquoted).
pub const COMMENT: &str = "nodekeeper-dns";
/// Our own nftables table (family inet: one table for IPv4 and IPv6).
pub const NFT_TABLE: &str = "nodekeeper_dns";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Raw,
    Filter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Chain {
    Prerouting,
    Input,
    Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Udp,
    Tcp,
}

/// `To`: destination IP and port (queries to the cache); `From`: source IP and port (answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    To,
    From,
}

/// One rule: raw rules NOTRACK, filter rules ACCEPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub table: Table,
    pub chain: Chain,
    pub ip: IpAddr,
    pub proto: Proto,
    pub dir: Dir,
    pub port: u16,
}

/// The (table, chain, direction) triples installed for every IP and protocol.
const SHAPE: [(Table, Chain, Dir); 7] = [
    (Table::Raw, Chain::Prerouting, Dir::To),
    (Table::Raw, Chain::Output, Dir::To),
    (Table::Raw, Chain::Output, Dir::From),
    (Table::Filter, Chain::Input, Dir::To),
    (Table::Filter, Chain::Input, Dir::From),
    (Table::Filter, Chain::Output, Dir::To),
    (Table::Filter, Chain::Output, Dir::From),
];

/// Every rule the cache needs for `ips` on `port`, sorted.
pub fn desired(ips: &[IpAddr], port: u16) -> Vec<Rule> {
    let mut out: Vec<Rule> = ips
        .iter()
        .flat_map(|&ip| {
            [Proto::Udp, Proto::Tcp].into_iter().flat_map(move |proto| {
                SHAPE.iter().map(move |&(table, chain, dir)| Rule {
                    table,
                    chain,
                    ip,
                    proto,
                    dir,
                    port,
                })
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What changed while bringing a backend's rules to the desired set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleChanges {
    /// Desired rules that were missing and were installed.
    pub added: u32,
    /// Rules of ours that were not desired (stale, duplicates, unparseable) and were deleted.
    pub removed: u32,
}

impl RuleChanges {
    pub fn total(self) -> u32 {
        self.added + self.removed
    }
}

/// Multiset difference: (desired rules missing from `present`, indexes of `present` entries to
/// delete: not desired, or a second copy of one).
pub(crate) fn diff<'a>(
    desired: &[Rule],
    present: impl IntoIterator<Item = Option<&'a Rule>>,
) -> (Vec<Rule>, Vec<usize>) {
    let mut wanted: std::collections::BTreeSet<Rule> = desired.iter().copied().collect();
    let mut delete = Vec::new();
    for (i, rule) in present.into_iter().enumerate() {
        match rule {
            Some(r) if wanted.remove(r) => {}
            _ => delete.push(i),
        }
    }
    (wanted.into_iter().collect(), delete)
}

// === backend choice ===

/// The iptables binaries of one variant: `iptables`, `iptables-legacy` or `iptables-nft`
/// (and the matching `ip6tables*`), and whether they drive the legacy (x_tables) kernel API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesVariant {
    pub v4: String,
    pub v6: String,
    /// Legacy tables are read only when `/proc/net/ip{,6}_tables_names` lists them: listing a
    /// legacy table that does not exist would create it.
    pub legacy: bool,
}

impl IptablesVariant {
    fn new(suffix: &str, legacy: bool) -> Self {
        Self {
            v4: format!("iptables{suffix}"),
            v6: format!("ip6tables{suffix}"),
            legacy,
        }
    }

    /// The variant `iptables{suffix}` when it runs: legacy unless `-V` says `nf_tables`
    /// (iptables before 1.8 prints no mode and is legacy).
    async fn installed(suffix: &str) -> Option<Self> {
        let version = exec::run(&format!("iptables{suffix}"), &["-V"], None)
            .await
            .ok()?;
        Some(Self::new(suffix, !version.contains("nf_tables")))
    }
}

/// The tool that installs the rules, once resolved from [`RulesBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Iptables(IptablesVariant),
    Nftables,
    None,
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Iptables(_) => "iptables",
            Backend::Nftables => "nftables",
            Backend::None => "none",
        }
    }
}

/// Chains kubelet creates in the mangle table of the iptables variant the node uses (the
/// signal Kubernetes' own iptables-wrapper reads).
const KUBELET_HINTS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// Legacy iptables tables instantiated in this network namespace. Read from procfs, because
/// running `iptables-legacy-save` would itself load the legacy tables.
const LEGACY_TABLES: &str = "/proc/net/ip_tables_names";

/// Which iptables variant holds the node's rules. When both `iptables-legacy` and
/// `iptables-nft` exist: nft unless legacy tables exist here; if they do, the variant whose
/// mangle table has kubelet's hint chains, else legacy when nft holds no iptables table at all,
/// else nft (the Kubernetes iptables-wrapper's reasoning, without its side effects). Otherwise
/// plain `iptables` (the image's alternative). None when no iptables is installed.
pub async fn iptables_variant() -> Option<IptablesVariant> {
    let legacy = IptablesVariant::installed("-legacy").await;
    let nft = IptablesVariant::installed("-nft").await;
    if let (Some(legacy), Some(nft)) = (legacy, nft) {
        let legacy_tables = std::fs::read_to_string(LEGACY_TABLES).unwrap_or_default();
        if legacy_tables.trim().is_empty() {
            return Some(nft);
        }
        let hinted = |save: Result<String, exec::ExecError>| {
            save.map(|s| KUBELET_HINTS.iter().any(|h| s.contains(h)))
                .unwrap_or(false)
        };
        let legacy_hint = legacy_tables.lines().any(|t| t.trim() == "mangle")
            && hinted(exec::run("iptables-legacy-save", &["-t", "mangle"], None).await);
        let nft_listing = nft_tables().await.unwrap_or_default();
        let nft_hint = nft_listing.contains("table ip mangle")
            && hinted(exec::run("iptables-nft-save", &["-t", "mangle"], None).await);
        let nft_has_tables = nft_listing.lines().any(|l| l.starts_with("table ip "));
        return Some(if nft_hint || (!legacy_hint && nft_has_tables) {
            nft
        } else {
            legacy
        });
    }
    IptablesVariant::installed("").await
}

/// Every iptables variant installed, one per kernel API (legacy, nf_tables): where rules of
/// ours can be, whatever [`iptables_variant`] picks today. Removing and reading back all of
/// them is what makes a fail-open true on a node where both are in use (a legacy kube-proxy
/// and an nft CNI): the detection can change between the agent's setup and the guard's turn.
pub async fn iptables_variants() -> Vec<IptablesVariant> {
    let mut out: Vec<IptablesVariant> = Vec::new();
    for suffix in ["-legacy", "-nft", ""] {
        if let Some(v) = IptablesVariant::installed(suffix).await
            && !out.iter().any(|o| o.legacy == v.legacy)
        {
            out.push(v);
        }
    }
    out
}

/// True when `nft` runs and can list the ruleset; Some(tables listing) then.
pub async fn nft_tables() -> Option<String> {
    exec::run("nft", &["list", "tables"], None).await.ok()
}

/// Resolves the configured backend. `auto`: nftables when kube-proxy runs in nftables mode
/// (an nft table named `kube-proxy`), else iptables when any iptables works (legacy or
/// nf_tables variant: our ACCEPT rules then sit in the same filter chains as kube-proxy's and
/// the node's own, where they take effect), else nftables when `nft` works; None when nothing
/// works.
pub async fn resolve(configured: RulesBackend) -> Option<Backend> {
    match configured {
        RulesBackend::None => Some(Backend::None),
        RulesBackend::Nftables => Some(Backend::Nftables),
        RulesBackend::Iptables => Some(Backend::Iptables(
            iptables_variant()
                .await
                .unwrap_or_else(|| IptablesVariant::new("", false)),
        )),
        RulesBackend::Auto => {
            let tables = nft_tables().await;
            if tables.as_deref().is_some_and(kube_proxy_nft) {
                return Some(Backend::Nftables);
            }
            if let Some(v) = iptables_variant().await {
                return Some(Backend::Iptables(v));
            }
            tables.map(|_| Backend::Nftables)
        }
    }
}

/// `nft list tables` output names a kube-proxy table (`table ip kube-proxy`, `ip6`, `inet`).
fn kube_proxy_nft(listing: &str) -> bool {
    listing
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("kube-proxy"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fourteen_rules_per_ip() {
        let ips: Vec<IpAddr> = vec![
            "169.254.20.10".parse().unwrap(),
            "fd00::10".parse().unwrap(),
        ];
        let rules = desired(&ips, 53);
        assert_eq!(rules.len(), 28);
        assert_eq!(
            rules
                .iter()
                .filter(|r| r.table == Table::Raw && r.ip == ips[0])
                .count(),
            6
        );
    }

    #[test]
    fn diff_finds_missing_stale_and_duplicates() {
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        let old: IpAddr = "10.96.0.11".parse().unwrap();
        let want = desired(&[ip], 53);
        let stale = desired(&[old], 53)[0];
        let present = [
            Some(&want[0]),
            Some(&want[0]),
            None,
            Some(&stale),
            Some(&want[1]),
        ];
        let (missing, delete) = diff(&want, present);
        assert_eq!(missing.len(), want.len() - 2);
        assert_eq!(delete, vec![1, 2, 3]);
    }

    #[test]
    fn kube_proxy_table_is_recognised() {
        assert!(kube_proxy_nft("table ip filter\ntable ip kube-proxy\n"));
        assert!(!kube_proxy_nft(
            "table ip filter\ntable inet nodekeeper_dns\n"
        ));
    }
}
