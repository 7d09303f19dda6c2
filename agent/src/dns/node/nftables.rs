//! The nftables backend: everything lives in our own table `inet nodekeeper_dns` (one table
//! for both families), with base chains at raw priority (NOTRACK) and filter priority
//! (ACCEPT). Setup and repair replace the whole table in one `nft -f` transaction; teardown
//! deletes it (also one transaction). Never touches another table.
//!
//! Limit: an `accept` in our table ends only our chain; a drop in another table's chain at the
//! same hook (an iptables-nft INPUT DROP policy) still drops. NOTRACK works regardless.

use std::collections::BTreeMap;

use super::exec::{self, ExecError};
use super::rules::{Chain, Dir, NFT_TABLE, Proto, Rule, RuleChanges, Table};

/// Our base chains: (name, hook, priority, the table/chain of the iptables model it holds).
const CHAINS: [(&str, &str, &str, Table, Chain); 4] = [
    (
        "raw_prerouting",
        "prerouting",
        "raw",
        Table::Raw,
        Chain::Prerouting,
    ),
    ("raw_output", "output", "raw", Table::Raw, Chain::Output),
    (
        "filter_input",
        "input",
        "filter",
        Table::Filter,
        Chain::Input,
    ),
    (
        "filter_output",
        "output",
        "filter",
        Table::Filter,
        Chain::Output,
    ),
];

fn chain_of(r: &Rule) -> &'static str {
    CHAINS
        .iter()
        .find(|c| c.3 == r.table && c.4 == r.chain)
        .map(|c| c.0)
        .expect("every rule's table/chain has a base chain")
}

/// A rule as `nft list` prints it: `ip daddr 169.254.20.10 udp dport 53 notrack`.
pub fn rule_text(r: &Rule) -> String {
    let family = if r.ip.is_ipv4() { "ip" } else { "ip6" };
    let (addr, port) = match r.dir {
        Dir::To => ("daddr", "dport"),
        Dir::From => ("saddr", "sport"),
    };
    let proto = match r.proto {
        Proto::Udp => "udp",
        Proto::Tcp => "tcp",
    };
    let verdict = match r.table {
        Table::Raw => "notrack",
        Table::Filter => "accept",
    };
    format!(
        "{family} {addr} {ip} {proto} {port} {n} {verdict}",
        ip = r.ip,
        n = r.port
    )
}

/// The `nft -f` script that atomically replaces our table with one holding `rules` (the
/// leading `table` + `delete table` make the delete succeed whether or not it exists).
pub fn replace_script(rules: &[Rule]) -> String {
    let mut s = format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n"
    );
    for (name, hook, prio, _, _) in CHAINS {
        s.push_str(&format!(
            "  chain {name} {{\n    type filter hook {hook} priority {prio}; policy accept;\n"
        ));
        for r in rules.iter().filter(|r| chain_of(r) == name) {
            s.push_str(&format!("    {}\n", rule_text(r)));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// The script that deletes our table (no error when it is absent).
pub fn delete_script() -> String {
    format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
}

/// Chain name -> rule lines (whitespace-normalised) from `nft list table` output; chain
/// headers (`type ... hook ...`) are kept under the key `"<chain>#type"`.
pub fn parse_table(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut chain: Option<String> = None;
    for line in text.lines() {
        let l = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if l.is_empty() || l.starts_with("table ") || l == "}" {
            if l == "}" {
                chain = None;
            }
            continue;
        }
        if let Some(rest) = l.strip_prefix("chain ") {
            let name = rest.trim_end_matches('{').trim().to_string();
            out.entry(name.clone()).or_default();
            chain = Some(name);
            continue;
        }
        let Some(c) = &chain else { continue };
        let key = if l.starts_with("type ") {
            format!("{c}#type")
        } else {
            c.clone()
        };
        out.entry(key).or_default().push(l);
    }
    out
}

/// How far the listed table is from `rules`: (missing rules, unexpected lines, shape wrong).
fn compare(listed: &BTreeMap<String, Vec<String>>, rules: &[Rule]) -> (u32, u32, bool) {
    let mut missing = 0;
    let mut extra = 0;
    let mut shape_wrong = listed.keys().filter(|k| !k.contains('#')).count() != CHAINS.len();
    for (name, hook, prio, _, _) in CHAINS {
        let Some(lines) = listed.get(name) else {
            shape_wrong = true;
            missing += rules.iter().filter(|r| chain_of(r) == name).count() as u32;
            continue;
        };
        let header = format!("type filter hook {hook} priority {prio}; policy accept;");
        if listed.get(&format!("{name}#type")).map(|v| v.as_slice()) != Some(&[header][..]) {
            shape_wrong = true;
        }
        let mut have: Vec<&String> = lines.iter().collect();
        for r in rules.iter().filter(|r| chain_of(r) == name) {
            let want = rule_text(r);
            match have.iter().position(|l| **l == want) {
                Some(i) => {
                    have.swap_remove(i);
                }
                None => missing += 1,
            }
        }
        extra += have.len() as u32;
    }
    (missing, extra, shape_wrong)
}

/// Lists our table: None when it does not exist.
async fn list() -> Result<Option<String>, ExecError> {
    match exec::run("nft", &["list", "table", "inet", NFT_TABLE], None).await {
        Ok(text) => Ok(Some(text)),
        // "No such file or directory": the table is absent.
        Err(ExecError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Brings our table to exactly `rules`, replacing it in one transaction when anything differs.
pub async fn reconcile(rules: &[Rule]) -> Result<RuleChanges, ExecError> {
    let (missing, extra, shape_wrong) = match list().await? {
        Some(text) => compare(&parse_table(&text), rules),
        None => (rules.len() as u32, 0, true),
    };
    if missing > 0 || extra > 0 || shape_wrong {
        exec::run("nft", &["-f", "-"], Some(&replace_script(rules))).await?;
    }
    Ok(RuleChanges {
        added: missing,
        removed: extra,
    })
}

/// The number of rules a listing of our table holds.
fn rules_in(text: &str) -> u32 {
    parse_table(text)
        .iter()
        .filter(|(k, _)| !k.contains('#'))
        .map(|(_, v)| v.len() as u32)
        .sum()
}

/// Deletes our table; the number of rules it held.
pub async fn remove() -> Result<u32, ExecError> {
    let Some(text) = list().await? else {
        return Ok(0);
    };
    exec::run("nft", &["-f", "-"], Some(&delete_script())).await?;
    Ok(rules_in(&text))
}

/// Whether our table exists, and how many rules it holds, read back with `nft list` (the
/// fail-open proof): None when it is gone.
pub async fn count_ours() -> Result<Option<u32>, ExecError> {
    Ok(list().await?.as_deref().map(rules_in))
}

#[cfg(test)]
mod tests {
    use super::super::rules::desired;
    use super::*;

    #[test]
    fn listing_of_the_replace_script_compares_equal() {
        let rules = desired(
            &[
                "169.254.20.10".parse().unwrap(),
                "fd00::10".parse().unwrap(),
            ],
            53,
        );
        // nft prints the table as the script wrote it (tabs instead of spaces, blank lines).
        let script = replace_script(&rules);
        let listing: String = script
            .lines()
            .skip(2)
            .map(|l| format!("\t{l}\n\n"))
            .collect();
        assert_eq!(compare(&parse_table(&listing), &rules), (0, 0, false));
        let fewer = &rules[1..];
        let listing_fewer: String = replace_script(fewer)
            .lines()
            .skip(2)
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(compare(&parse_table(&listing_fewer), &rules), (1, 0, false));
        assert_eq!(compare(&parse_table(&listing), fewer), (0, 1, false));
        assert!(compare(&BTreeMap::new(), &rules).2);
    }

    #[test]
    fn rule_text_is_what_nft_prints() {
        let r = desired(&["fd00::10".parse().unwrap()], 53)[0];
        assert_eq!(rule_text(&r), "ip6 daddr fd00::10 udp dport 53 notrack");
    }
}
