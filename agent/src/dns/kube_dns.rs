//! The kube-dns ConfigMap (`kube-system/kube-dns`) that node-local-dns and kube-dns honour:
//! `stubDomains` (a JSON object, zone -> [server]) and `upstreamNameservers` (a JSON array), so
//! a cluster moving from node-local-dns keeps its forwarding without new config.
//!
//! Parses, and watches the ConfigMap (`watch`): every change is applied by
//! `upstream::Forwarder::apply_kube_dns` within a watch event, a deleted ConfigMap reverts to
//! the agent's own config, and a change with a bad key is refused whole (the previous forwarding
//! stays). Every error names the key (and the zone or index) it is about. Other keys
//! (`federations`) are ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::config::{check_zone, parse_server};

pub const STUB_DOMAINS_KEY: &str = "stubDomains";
pub const UPSTREAM_NAMESERVERS_KEY: &str = "upstreamNameservers";
/// kube-dns allows at most three upstream nameservers (as resolv.conf does).
pub const MAX_UPSTREAM_NAMESERVERS: usize = 3;

/// The forwarding the ConfigMap asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeDnsConfig {
    /// Zone (lower-case, no trailing dot) -> servers.
    pub stub_domains: BTreeMap<String, Vec<SocketAddr>>,
    /// Replaces the default group's servers when not empty.
    pub upstream_nameservers: Vec<SocketAddr>,
}

/// A problem with one key: `(field, problem)`, the field being `stubDomains`,
/// `stubDomains.<zone>`, `stubDomains.<zone>[i]`, `upstreamNameservers` or `upstreamNameservers[i]`.
pub type KeyProblem = (String, String);

impl KubeDnsConfig {
    /// Parses the ConfigMap's `data`. All problems are reported, each naming its key.
    pub fn parse(data: &BTreeMap<String, String>) -> Result<Self, Vec<KeyProblem>> {
        let mut out = KubeDnsConfig::default();
        let mut problems = Vec::new();
        if let Some(text) = data.get(STUB_DOMAINS_KEY).filter(|t| !t.trim().is_empty()) {
            match serde_json::from_str::<BTreeMap<String, Vec<String>>>(text) {
                Err(e) => problems.push((
                    STUB_DOMAINS_KEY.to_string(),
                    format!("not a JSON object of zone -> [server]: {e}"),
                )),
                Ok(stubs) => {
                    for (zone, servers) in stubs {
                        let field = format!("{STUB_DOMAINS_KEY}.{zone}");
                        if let Err(e) = check_zone(&zone) {
                            problems.push((field.clone(), e));
                            continue;
                        }
                        if servers.is_empty() {
                            problems.push((field.clone(), "needs at least one server".into()));
                        }
                        let mut addrs = Vec::new();
                        for (i, s) in servers.iter().enumerate() {
                            match parse_server(s) {
                                Ok(a) => addrs.push(a),
                                Err(e) => problems.push((format!("{field}[{i}]"), e)),
                            }
                        }
                        out.stub_domains.insert(normalize_zone(&zone), addrs);
                    }
                }
            }
        }
        if let Some(text) = data
            .get(UPSTREAM_NAMESERVERS_KEY)
            .filter(|t| !t.trim().is_empty())
        {
            match serde_json::from_str::<Vec<String>>(text) {
                Err(e) => problems.push((
                    UPSTREAM_NAMESERVERS_KEY.to_string(),
                    format!("not a JSON array of servers: {e}"),
                )),
                Ok(servers) => {
                    if servers.len() > MAX_UPSTREAM_NAMESERVERS {
                        problems.push((
                            UPSTREAM_NAMESERVERS_KEY.to_string(),
                            format!(
                                "{} servers; kube-dns allows at most {MAX_UPSTREAM_NAMESERVERS}",
                                servers.len()
                            ),
                        ));
                    }
                    for (i, s) in servers.iter().enumerate() {
                        match parse_server(s) {
                            Ok(a) => out.upstream_nameservers.push(a),
                            Err(e) => {
                                problems.push((format!("{UPSTREAM_NAMESERVERS_KEY}[{i}]"), e))
                            }
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

/// Lower-case, without the trailing dot: how zones are compared.
pub fn normalize_zone(zone: &str) -> String {
    zone.strip_suffix('.').unwrap_or(zone).to_ascii_lowercase()
}

/// Watches the ConfigMap `namespace/name` (one object: a `metadata.name` field selector, which
/// RBAC's `resourceNames` can authorize) and hands its `data` to `apply` on every change, an
/// empty map when it does not exist or is deleted. The same data is never applied twice in a
/// row (watch restarts relist it); `applied` is what the caller already applied. Backs off with
/// kube-runtime's default on errors; ends when `token` is cancelled.
pub async fn watch(
    client: kube::Client,
    namespaced_name: String,
    applied: Option<BTreeMap<String, String>>,
    apply: impl Fn(&BTreeMap<String, String>) + Send + 'static,
    token: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt, watcher};

    let Some((ns, name)) = namespaced_name.split_once('/') else {
        tracing::error!(config_map = %namespaced_name, "dns.upstreams.kubeDnsConfigMap is not namespace/name; not watched");
        return;
    };
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut last = applied;
    // During a (re)list: whether the object was in it.
    let mut listed = false;
    let mut apply_if_changed = |data: BTreeMap<String, String>| {
        if last.as_ref() != Some(&data) {
            apply(&data);
            last = Some(data);
        }
    };
    loop {
        let event = tokio::select! {
            _ = token.cancelled() => return,
            next = stream.next() => match next {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, config_map = %namespaced_name, "kube-dns ConfigMap watch error; retrying with backoff");
                    continue;
                }
                None => return,
            },
        };
        match event {
            watcher::Event::Init => listed = false,
            watcher::Event::InitApply(cm) | watcher::Event::Apply(cm) => {
                listed = true;
                apply_if_changed(cm.data.unwrap_or_default());
            }
            watcher::Event::InitDone if !listed => apply_if_changed(BTreeMap::new()),
            watcher::Event::InitDone => {}
            watcher::Event::Delete(_) => apply_if_changed(BTreeMap::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stub_domains_and_upstreams_parse() {
        let c = KubeDnsConfig::parse(&data(&[
            (
                "stubDomains",
                r#"{"Acme.Local.": ["1.2.3.4"], "corp.example": ["10.0.0.1:5353", "fd00::1"]}"#,
            ),
            ("upstreamNameservers", r#"["8.8.8.8", "8.8.4.4"]"#),
            ("federations", r#"{"x": "y"}"#),
        ]))
        .unwrap();
        assert_eq!(
            c.stub_domains["acme.local"],
            vec!["1.2.3.4:53".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            c.stub_domains["corp.example"],
            vec![
                "10.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(
            c.upstream_nameservers,
            vec![
                "8.8.8.8:53".parse::<SocketAddr>().unwrap(),
                "8.8.4.4:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn empty_or_missing_keys_mean_nothing() {
        assert_eq!(
            KubeDnsConfig::parse(&data(&[])).unwrap(),
            KubeDnsConfig::default()
        );
        assert_eq!(
            KubeDnsConfig::parse(&data(&[("stubDomains", " "), ("upstreamNameservers", "")]))
                .unwrap(),
            KubeDnsConfig::default()
        );
    }

    #[test]
    fn errors_name_the_key() {
        let fields = |pairs: &[(&str, &str)]| -> Vec<String> {
            KubeDnsConfig::parse(&data(pairs))
                .unwrap_err()
                .into_iter()
                .map(|(f, _)| f)
                .collect()
        };
        assert_eq!(fields(&[("stubDomains", "[1,2]")]), vec!["stubDomains"]);
        assert_eq!(
            fields(&[("upstreamNameservers", r#"{"a": 1}"#)]),
            vec!["upstreamNameservers"]
        );
        assert_eq!(
            fields(&[
                ("stubDomains", r#"{"a.b": ["1.2.3.4", "nope"], "c.d": []}"#),
                ("upstreamNameservers", r#"["1.1.1.1", "x"]"#),
            ]),
            vec![
                "stubDomains.a.b[1]",
                "stubDomains.c.d",
                "upstreamNameservers[1]"
            ]
        );
        assert_eq!(
            fields(&[(
                "upstreamNameservers",
                r#"["1.1.1.1","1.1.1.2","1.1.1.3","1.1.1.4"]"#
            )]),
            vec!["upstreamNameservers"]
        );
    }
}
