//! The kube-dns ConfigMap, watched: an agent connected to the fake API server forwards by the
//! ConfigMap's `stubDomains` and `upstreamNameservers` from start, follows every change within a
//! watch event, refuses a change with a bad key whole (naming the key, keeping the previous
//! forwarding), and reverts to its own config when the ConfigMap is deleted. Which server a
//! query reached is read from the servers' own query logs (dnsmasq as the stub/upstream server,
//! unbound as the configured default). Everything runs in a network namespace of its own.

use std::time::Duration;

use nodekeeper_tests::dns_peers::{
    self, CORP_DB_IP, Dnsmasq, Unbound, Upstreams, agent_dns_config, dig, free_dns_addr,
};
use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::netns_pods::Netns;
use nodekeeper_tests::{Agent, require_root, require_tool, wait_for};

const NODE: &str = "node-dns-1";

/// Queries `NAME` (a fresh one per try: an answer must not come from the cache) until `ok`
/// holds for it, or fails after 10 s naming `what`.
fn until(what: &str, mut try_name: impl FnMut(&str) -> bool) {
    let mut n = 0;
    wait_for(Duration::from_secs(10), what, || {
        n += 1;
        try_name(&format!("n{n}-{}", std::process::id())).then_some(())
    });
}

#[test]
fn the_kube_dns_config_map_is_followed_refused_when_bad_and_reverted_when_deleted_as_root() {
    if !require_root()
        || !["ip", "dig", "unbound", "dnsmasq"]
            .into_iter()
            .all(require_tool)
    {
        return;
    }
    let _netns = Netns::enter_fresh("dns-kube");
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);

    let default = Unbound::serving(&[dns_peers::example_zone()]);
    let stub = Dnsmasq::corp_test();
    let stub_domains = format!(r#"{{"corp.test": ["{}"]}}"#, stub.addr);
    api.add_config_map(
        "kube-system",
        "kube-dns",
        &[("stubDomains", stub_domains.as_str())],
    );
    let listen = free_dns_addr();
    let config = agent_dns_config(
        listen,
        &Upstreams {
            default: Some(default.addr),
            ..Default::default()
        },
        "",
        "",
    )
    .replace(
        "kubeDnsConfigMap: \"\"",
        "kubeDnsConfigMap: kube-system/kube-dns",
    );
    let agent = Agent::builder()
        .config(&config)
        .connected(&kubeconfig, NODE)
        .start();
    let log = || agent.proc.log_text();

    // From the first query: the ConfigMap's stub domain.
    let first = dig(listen, &["db.corp.test", "A"]);
    assert_eq!(
        first.data("A"),
        vec![CORP_DB_IP],
        "{}\n{}",
        first.raw,
        log()
    );
    assert_eq!(stub.queries_for("db.corp.test"), 1);

    // upstreamNameservers replaces the default group; corp.test is no stub domain any more,
    // so it goes there too (the same dnsmasq).
    let upstream = format!(r#"["{}"]"#, stub.addr);
    api.set_config_map_data(
        "kube-system",
        "kube-dns",
        &[("upstreamNameservers", upstream.as_str())],
    );
    until("example.test names to go to upstreamNameservers", |n| {
        let name = format!("{n}.example.test");
        dig(listen, &[&name, "A"]);
        stub.queries_for(&name) == 1 && default.queries_for(&name) == 0
    });

    // A change with one bad key is refused whole: the previous forwarding stays.
    api.set_config_map_data(
        "kube-system",
        "kube-dns",
        &[
            ("upstreamNameservers", r#"["not an address"]"#),
            ("stubDomains", "{}"),
        ],
    );
    wait_for(
        Duration::from_secs(10),
        "the refusal naming the key in the log",
        || log().contains("upstreamNameservers[0]").then_some(()),
    );
    assert!(log().contains("change refused"), "{}", log());
    let name = "after-bad.example.test";
    dig(listen, &[name, "A"]);
    assert_eq!(
        (stub.queries_for(name), default.queries_for(name)),
        (1, 0),
        "still the ConfigMap's upstream after a refused change"
    );

    // Deleted: back to the agent's own config (unbound for everything, no stub domain).
    api.delete_config_map("kube-system", "kube-dns");
    until("names to go to the configured default again", |n| {
        let name = format!("{n}.example.test");
        dig(listen, &[&name, "A"]);
        default.queries_for(&name) == 1 && stub.queries_for(&name) == 0
    });
    let name = "gone.corp.test";
    dig(listen, &[name, "A"]);
    assert_eq!(stub.queries_for(name), 0, "corp.test is no stub domain now");
    assert_eq!(default.queries_for(name), 1);
}
