//! Sysctl profiles: the config model, node selection, and resolution of the matching profiles
//! into one desired value per key (highest priority wins).
//!
//! Pure functions over config and labels; no host access.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Profile {
    pub name: String,
    /// Higher wins per key when several matching profiles set it. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Nodes this profile applies to; every node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// When set, the profile is applied inside the network namespace of every pod on a selected
    /// node whose labels match, instead of on the node; only per-namespace `net.*` keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Key (`net.core.somaxconn` or `net/core/somaxconn`) -> value.
    pub sysctls: BTreeMap<String, SysctlValue>,
}

/// A sysctl value as written in YAML: a string, a number, or a list of numbers (for vector keys
/// like `net.ipv4.ip_local_port_range: [1024, 65535]`). Stored normalised: tokens joined by one
/// space, the form the kernel echoes back (modulo tabs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlValue(pub String);

impl SysctlValue {
    pub fn normalise(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

impl fmt::Display for SysctlValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SysctlValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Int(i64),
            Str(String),
            List(Vec<i64>),
            Other(serde::de::IgnoredAny),
        }
        use serde::de::Error;
        let s = match Raw::deserialize(d)? {
            Raw::Int(i) => i.to_string(),
            Raw::Str(s) => s,
            Raw::List(l) => l.iter().map(i64::to_string).collect::<Vec<_>>().join(" "),
            Raw::Bool(b) => {
                return Err(D::Error::custom(format!(
                    "{b} is a YAML boolean; sysctls take numbers: write {} (or quote a string)",
                    u8::from(b)
                )));
            }
            Raw::Other(_) => {
                return Err(D::Error::custom(
                    "want a string, an integer or a list of integers",
                ));
            }
        };
        Ok(SysctlValue(SysctlValue::normalise(&s)))
    }
}

impl Serialize for SysctlValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// `net/core/somaxconn` or `net.core.somaxconn` -> (dotted name, path relative to /proc/sys).
/// The slash form exists for keys whose components contain dots (VLAN interfaces: `eth0.100`).
/// Leading and trailing slashes are trimmed once, here, so every check (denylist, value
/// refusals, use checks) sees the same dotted name as for the dotted spelling of the key.
pub fn key_path(key: &str) -> (String, String) {
    if key.contains('/') {
        let path = key.trim_matches('/');
        (path.replace('/', "."), path.to_string())
    } else {
        (key.to_string(), key.replace('.', "/"))
    }
}

/// One key's resolved desired value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Dotted name, for display, metrics and state.
    pub key: String,
    /// Path under `/proc/sys`.
    pub path: String,
    pub value: String,
    pub profile: String,
    pub priority: i32,
}

impl Profile {
    fn selects_node(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .as_ref()
            .is_none_or(|s| s.matches(node_labels))
    }
}

/// The node-level desired set: profiles without a podSelector that select this node.
pub fn resolve(
    profiles: &[Profile],
    labels: &BTreeMap<String, String>,
) -> Result<Vec<Desired>, Vec<String>> {
    resolve_among(
        profiles
            .iter()
            .filter(|p| p.pod_selector.is_none() && p.selects_node(labels)),
    )
}

/// One pod's desired set: podSelector profiles selecting this node and this pod.
pub fn resolve_for_pod<'a>(
    profiles: impl IntoIterator<Item = &'a Profile>,
    node_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> Result<Vec<Desired>, Vec<String>> {
    resolve_among(profiles.into_iter().filter(|p| {
        p.pod_selector
            .as_ref()
            .is_some_and(|s| s.matches(pod_labels))
            && p.selects_node(node_labels)
    }))
}

/// The winning value per key among `profiles`; ties at equal priority with different values
/// are an error naming both profiles. Keys sorted by name.
fn resolve_among<'a>(
    profiles: impl IntoIterator<Item = &'a Profile>,
) -> Result<Vec<Desired>, Vec<String>> {
    let mut winners: BTreeMap<String, Desired> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for p in profiles {
        for (raw_key, value) in &p.sysctls {
            let (key, path) = key_path(raw_key);
            let candidate = Desired {
                key: key.clone(),
                path,
                value: value.0.clone(),
                profile: p.name.clone(),
                priority: p.priority,
            };
            match winners.get(&key) {
                None => {
                    winners.insert(key, candidate);
                }
                Some(w) if p.priority > w.priority => {
                    winners.insert(key, candidate);
                }
                Some(w) if p.priority == w.priority && w.value != candidate.value => conflicts.push(format!(
                    "profiles {:?} and {:?} both set {key} at priority {} to different values ({:?} vs {:?}); give one a higher priority",
                    w.profile, p.name, p.priority, w.value, candidate.value
                )),
                Some(_) => {}
            }
        }
    }
    if conflicts.is_empty() {
        Ok(winners.into_values().collect())
    } else {
        Err(conflicts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn profile(
        name: &str,
        priority: i32,
        selector: Option<LabelSelector>,
        kv: &[(&str, &str)],
    ) -> Profile {
        Profile {
            name: name.into(),
            priority,
            node_selector: selector,
            pod_selector: None,
            sysctls: kv
                .iter()
                .map(|(k, v)| (k.to_string(), SysctlValue(v.to_string())))
                .collect(),
        }
    }

    #[test]
    fn highest_priority_wins_and_unmatched_profiles_are_ignored() {
        let trino = LabelSelector {
            match_labels: labels(&[("pool", "trino")]),
            match_expressions: vec![],
        };
        let other = LabelSelector {
            match_labels: labels(&[("pool", "other")]),
            match_expressions: vec![],
        };
        let ps = vec![
            profile(
                "base",
                0,
                None,
                &[
                    ("net.core.somaxconn", "1024"),
                    ("net/ipv4/tcp_tw_reuse", "1"),
                ],
            ),
            profile("trino", 10, Some(trino), &[("net.core.somaxconn", "8192")]),
            profile("other", 99, Some(other), &[("net.core.somaxconn", "1")]),
        ];
        let d = resolve(&ps, &labels(&[("pool", "trino")])).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            (
                d[0].key.as_str(),
                d[0].value.as_str(),
                d[0].profile.as_str()
            ),
            ("net.core.somaxconn", "8192", "trino")
        );
        assert_eq!(
            (d[1].key.as_str(), d[1].path.as_str()),
            ("net.ipv4.tcp_tw_reuse", "net/ipv4/tcp_tw_reuse")
        );
    }

    #[test]
    fn equal_priority_conflict_names_both_profiles() {
        let ps = vec![
            profile("a", 5, None, &[("vm.swappiness", "10")]),
            profile("b", 5, None, &[("vm.swappiness", "60")]),
        ];
        let e = resolve(&ps, &labels(&[])).unwrap_err();
        assert!(
            e[0].contains("\"a\"") && e[0].contains("\"b\"") && e[0].contains("vm.swappiness"),
            "{e:?}"
        );
        // Same value at the same priority is not a conflict.
        let ps = vec![
            profile("a", 5, None, &[("vm.swappiness", "10")]),
            profile("b", 5, None, &[("vm.swappiness", "10")]),
        ];
        assert!(resolve(&ps, &labels(&[])).is_ok());
    }

    #[test]
    fn key_forms() {
        assert_eq!(
            key_path("net.core.somaxconn"),
            ("net.core.somaxconn".into(), "net/core/somaxconn".into())
        );
        assert_eq!(
            key_path("net/ipv4/conf/eth0.100/rp_filter"),
            (
                "net.ipv4.conf.eth0.100.rp_filter".into(),
                "net/ipv4/conf/eth0.100/rp_filter".into()
            )
        );
        for odd in ["/kernel/sysrq", "kernel/sysrq/", "/kernel/sysrq/"] {
            assert_eq!(
                key_path(odd),
                ("kernel.sysrq".into(), "kernel/sysrq".into()),
                "{odd}"
            );
        }
        assert_eq!(SysctlValue::normalise("1024\t 65535\n"), "1024 65535");
    }
}
