//! The iptables backend: our rules carry `-m comment --comment nodekeeper-dns`; `*-save -t
//! raw|filter` is read back and parsed, and every change (deletes of stale rules, inserts of
//! missing ones) goes in one `*-restore --noflush` batch per family, so a table is never seen
//! half-changed. Rules without our comment are never parsed, deleted or reordered.

use std::net::IpAddr;

use super::exec::{self, ExecError};
use super::rules::{COMMENT, Chain, Dir, IptablesVariant, Proto, Rule, RuleChanges, Table, diff};

/// One of our rules as `*-save` printed it: the spec after `-A CHAIN` (fed back to `-D`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    pub table: Table,
    pub chain: String,
    pub spec: String,
    /// None: ours by its comment but not a shape we install (deleted as stale).
    pub rule: Option<Rule>,
}

fn table_name(t: Table) -> &'static str {
    match t {
        Table::Raw => "raw",
        Table::Filter => "filter",
    }
}

fn chain_name(c: Chain) -> &'static str {
    match c {
        Chain::Prerouting => "PREROUTING",
        Chain::Input => "INPUT",
        Chain::Output => "OUTPUT",
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Udp => "udp",
        Proto::Tcp => "tcp",
    }
}

/// The rule spec after `-I CHAIN` / `-A CHAIN`, in the form iptables-save prints.
pub fn spec(r: &Rule) -> String {
    let (addr, port) = match r.dir {
        Dir::To => ("-d", "--dport"),
        Dir::From => ("-s", "--sport"),
    };
    let len = if r.ip.is_ipv4() { 32 } else { 128 };
    let p = proto_name(r.proto);
    let target = match r.table {
        Table::Raw => "NOTRACK",
        Table::Filter => "ACCEPT",
    };
    format!(
        "{addr} {ip}/{len} -p {p} -m {p} {port} {n} -m comment --comment {COMMENT} -j {target}",
        ip = r.ip,
        n = r.port
    )
}

/// Our rules in `*-save` output (one or more tables).
pub fn parse_save(text: &str) -> Vec<Present> {
    let mut table = None;
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = match t.trim() {
                "raw" => Some(Table::Raw),
                "filter" => Some(Table::Filter),
                _ => None,
            };
            continue;
        }
        let (Some(table), Some(rest)) = (table, line.strip_prefix("-A ")) else {
            continue;
        };
        let tokens: Vec<&str> = rest.split_whitespace().collect();
        let ours = tokens
            .windows(2)
            .any(|w| w[0] == "--comment" && w[1].trim_matches('"') == COMMENT);
        if !ours {
            continue;
        }
        let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
        out.push(Present {
            table,
            chain: chain.to_string(),
            spec: spec.trim().to_string(),
            rule: parse_rule(table, chain, &tokens[1..]),
        });
    }
    out
}

fn parse_rule(table: Table, chain: &str, tokens: &[&str]) -> Option<Rule> {
    let chain = match chain {
        "PREROUTING" => Chain::Prerouting,
        "INPUT" => Chain::Input,
        "OUTPUT" => Chain::Output,
        _ => return None,
    };
    let (mut ip, mut dir, mut proto, mut port, mut target) = (None, None, None, None, None);
    let mut it = tokens.iter();
    while let Some(&t) = it.next() {
        let mut value = || it.next().copied();
        match t {
            "-d" | "-s" => {
                if ip.is_some() {
                    return None;
                }
                let v = value()?;
                let (addr, len) = v.split_once('/').unwrap_or((v, ""));
                let addr: IpAddr = addr.parse().ok()?;
                let full = if addr.is_ipv4() { "32" } else { "128" };
                if !len.is_empty() && len != full {
                    return None;
                }
                ip = Some(addr);
                dir = Some(if t == "-d" { Dir::To } else { Dir::From });
            }
            "-p" => {
                proto = Some(match value()? {
                    "udp" => Proto::Udp,
                    "tcp" => Proto::Tcp,
                    _ => return None,
                })
            }
            "--dport" | "--sport" => {
                let want = if t == "--dport" { Dir::To } else { Dir::From };
                if dir != Some(want) {
                    return None;
                }
                port = Some(value()?.parse().ok()?);
            }
            "-j" => target = Some(value()?),
            "-m" | "--comment" => {
                value()?;
            }
            _ => return None,
        }
    }
    let expected = match table {
        Table::Raw => "NOTRACK",
        Table::Filter => "ACCEPT",
    };
    if target != Some(expected) || (table == Table::Raw && chain == Chain::Input) {
        return None;
    }
    if table == Table::Filter && chain == Chain::Prerouting {
        return None;
    }
    Some(Rule {
        table,
        chain,
        ip: ip?,
        proto: proto?,
        dir: dir?,
        port: port?,
    })
}

/// Reads our rules of one family (`iptables` or `ip6tables` program name). A legacy variant
/// reads only the tables that exist in this network namespace: `*-save -t` of a legacy table
/// that does not exist creates it (and one that does not exist holds nothing of ours).
pub async fn list(program: &str, legacy: bool) -> Result<Vec<Present>, ExecError> {
    let save = format!("{program}-save");
    let existing = if legacy {
        Some(legacy_tables(program.starts_with("ip6"))?)
    } else {
        None
    };
    let mut out = Vec::new();
    for t in ["raw", "filter"] {
        if existing
            .as_ref()
            .is_some_and(|names| !names.lines().any(|l| l.trim() == t))
        {
            continue;
        }
        out.extend(parse_save(&exec::run(&save, &["-t", t], None).await?));
    }
    Ok(out)
}

/// The legacy tables of one family instantiated here (procfs: reading it loads nothing); empty
/// when the file is absent (the x_tables modules are not loaded, so no legacy table exists).
fn legacy_tables(v6: bool) -> Result<String, ExecError> {
    let path = if v6 {
        "/proc/net/ip6_tables_names"
    } else {
        "/proc/net/ip_tables_names"
    };
    match std::fs::read_to_string(path) {
        Ok(names) => Ok(names),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(ExecError::Io {
            command: format!("read {path}"),
            source,
        }),
    }
}

/// The `*-restore --noflush` batch that deletes `delete` and inserts `add`; None when empty.
pub fn batch(present: &[Present], delete: &[usize], add: &[Rule]) -> Option<String> {
    if delete.is_empty() && add.is_empty() {
        return None;
    }
    let mut text = String::new();
    for table in [Table::Raw, Table::Filter] {
        let dels: Vec<&Present> = delete
            .iter()
            .map(|&i| &present[i])
            .filter(|p| p.table == table)
            .collect();
        let adds: Vec<&Rule> = add.iter().filter(|r| r.table == table).collect();
        if dels.is_empty() && adds.is_empty() {
            continue;
        }
        text.push_str(&format!("*{}\n", table_name(table)));
        for p in dels {
            text.push_str(&format!("-D {} {}\n", p.chain, p.spec));
        }
        // -I: before the node's own rules (a DROP policy or reject rule must not see DNS first).
        for r in adds {
            text.push_str(&format!("-I {} {}\n", chain_name(r.chain), spec(r)));
        }
        text.push_str("COMMIT\n");
    }
    Some(text)
}

/// Brings one family's rules of ours (`present`, just listed) to exactly `desired` (all of one
/// IP family), in one batch. A failed batch is an error whatever `desired` is: removing our
/// rules is what un-black-holes the node, so its failure must never read as success.
async fn apply(
    program: &str,
    present: &[Present],
    desired: &[Rule],
) -> Result<RuleChanges, ExecError> {
    let (add, delete) = diff(desired, present.iter().map(|p| p.rule.as_ref()));
    if let Some(text) = batch(present, &delete, &add) {
        let restore = format!("{program}-restore");
        exec::run(&restore, &["-w", "5", "--noflush"], Some(&text)).await?;
    }
    Ok(RuleChanges {
        added: add.len() as u32,
        removed: delete.len() as u32,
    })
}

/// True when a failed listing means this family cannot hold rules here at all: the tool is not
/// installed, or the kernel lacks the family (IPv6 disabled). Anything else (a timeout, a
/// permission error) could hide rules of ours, so it is an error.
fn family_absent(e: &ExecError) -> bool {
    match e {
        ExecError::NotFound { .. } => true,
        ExecError::Failed { stderr, .. } => {
            stderr.contains("Address family not supported")
                || stderr.contains("Protocol not supported")
        }
        _ => false,
    }
}

/// Lists one family's rules of ours; None when the family cannot hold rules (see
/// [`family_absent`]) and none are wanted in it.
async fn list_family(
    program: &str,
    legacy: bool,
    wanted: bool,
) -> Result<Option<Vec<Present>>, ExecError> {
    match list(program, legacy).await {
        Ok(p) => Ok(Some(p)),
        Err(e) if !wanted && family_absent(&e) => {
            tracing::debug!(error = %e, "{program}: skipped (no address of this family)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Both families: IPv4 rules through `variant.v4`, IPv6 through `variant.v6`. A family with no
/// address to serve whose tool is missing or whose kernel family is off is skipped; every other
/// failure (listing or applying) is returned, also when nothing is desired (teardown, fail-open).
pub async fn reconcile_all(
    variant: &IptablesVariant,
    desired: &[Rule],
) -> Result<RuleChanges, ExecError> {
    let mut total = RuleChanges::default();
    for (program, v4) in [(&variant.v4, true), (&variant.v6, false)] {
        let want: Vec<Rule> = desired
            .iter()
            .filter(|r| r.ip.is_ipv4() == v4)
            .copied()
            .collect();
        let Some(present) = list_family(program, variant.legacy, !want.is_empty()).await? else {
            continue;
        };
        let c = apply(program, &present, &want).await?;
        total.added += c.added;
        total.removed += c.removed;
    }
    Ok(total)
}

/// How many rules of ours both families hold, read back with `*-save` (the fail-open proof).
pub async fn count_ours(variant: &IptablesVariant) -> Result<u32, ExecError> {
    let mut n = 0;
    for program in [&variant.v4, &variant.v6] {
        n += list_family(program, variant.legacy, false)
            .await?
            .map_or(0, |p| p.len() as u32);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::rules::desired;
    use super::*;

    const SAVE: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment nodekeeper-dns -j NOTRACK
-A PREROUTING -d 10.0.0.1/32 -p udp -m udp --dport 53 -j NOTRACK
-A OUTPUT -s 169.254.20.10/32 -p tcp -m tcp --sport 53 -m comment --comment nodekeeper-dns -j NOTRACK
-A OUTPUT -m comment --comment nodekeeper-dns -j NOTRACK
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment \"nodekeeper-dns\" -j ACCEPT
COMMIT
";

    #[test]
    fn save_output_parses_to_ours_only() {
        let p = parse_save(SAVE);
        assert_eq!(p.len(), 4, "{p:#?}");
        let ip: IpAddr = "169.254.20.10".parse().unwrap();
        assert_eq!(
            p[0].rule,
            Some(Rule {
                table: Table::Raw,
                chain: Chain::Prerouting,
                ip,
                proto: Proto::Udp,
                dir: Dir::To,
                port: 53
            })
        );
        assert_eq!(p[1].rule.unwrap().dir, Dir::From);
        assert_eq!(p[2].rule, None, "an unknown shape of ours is stale");
        assert_eq!(p[3].table, Table::Filter);
        assert!(p[3].rule.is_some());
    }

    #[test]
    fn rendered_specs_parse_back() {
        let ips: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()];
        for r in desired(&ips, 5353) {
            let line = format!(
                "*{}\n-A {} {}\n",
                table_name(r.table),
                chain_name(r.chain),
                spec(&r)
            );
            assert_eq!(parse_save(&line)[0].rule, Some(r), "{line}");
        }
    }

    #[test]
    fn batch_deletes_by_the_printed_spec_and_inserts_at_the_top() {
        let p = parse_save(SAVE);
        let add = vec![desired(&["169.254.20.10".parse().unwrap()], 53)[0]];
        let text = batch(&p, &[2], &add).unwrap();
        assert_eq!(
            text,
            "*raw\n-D OUTPUT -m comment --comment nodekeeper-dns -j NOTRACK\n-I PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment nodekeeper-dns -j NOTRACK\nCOMMIT\n"
        );
        assert_eq!(batch(&p, &[], &[]), None);
    }
}
