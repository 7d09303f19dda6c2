//! Adversary tests for issue #19 (least privilege): each one is an attack that broke a promise
//! of docs/grpc-api.md (auth, TLS reload), kept `#[ignore]` until the code is fixed.
//!
//! The first two put a FIFO where a credential file was (the way any file under a hostPath or a
//! projected volume can be swapped). `stat` says length 0, so the size guard passes, and the
//! agent's `std::fs::read` then waits forever for a writer, inside an async task and while
//! holding the file's cache mutex: every later connection or credentialed call blocks a tokio
//! worker on that mutex until none is left, and the agent serves nothing, health included.
//!
//! The third asks the aggregator, with no credential, for what it collected from agents whose
//! reads are closed to all but the read token: the aggregator's own API had no auth layer. Fixed:
//! it now runs the agents' auth layer and refuses callers without a credential by default
//! (tests/tests/it/aggregate_auth.rs covers the configured credentials).

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodekeeper::pb::{self, node_agent_client::NodeAgentClient};
use nodekeeper_tests::pki::{Pki, SecretVolume};
use nodekeeper_tests::{Agent, TEST_TOKEN, bearer, http_get, require_tool};
use tonic::transport::{ClientTlsConfig, Endpoint};

async fn within<T>(step: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{step}: no answer within 20 s (the agent stopped answering)"))
}

/// Replaces `path` (through its symlinks, as a Secret volume's key) by a FIFO nobody writes.
fn swap_in_fifo(path: &Path) {
    let real = std::fs::canonicalize(path).expect("resolve the file");
    let tmp = real.with_extension("fifo-tmp");
    let ok = Command::new("mkfifo")
        .arg(&tmp)
        .status()
        .expect("run mkfifo")
        .success();
    assert!(ok, "mkfifo {}", tmp.display());
    std::fs::rename(&tmp, &real).expect("rename the FIFO over the file");
}

/// The agent's /healthz, answered within a few seconds (`None`: no answer).
fn healthz(agent: &Agent) -> Option<u16> {
    http_get(agent.metrics, "/healthz").ok().map(|(s, _)| s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversary_tls_cert_file_swapped_for_a_fifo_leaves_the_agent_serving_nothing() {
    if !require_tool("openssl") || !require_tool("mkfifo") {
        return;
    }
    let pki = Pki::new();
    pki.ca("ca-1")
        .server("server-one", "ca-1", "nodekeeper server one", "")
        .client("client-a", "ca-1", "orchestrator");
    let volume = SecretVolume::new(&[
        ("tls.crt", pki.pem("server-one.crt")),
        ("tls.key", pki.pem("server-one.key")),
        ("ca.crt", pki.pem("ca-1.crt")),
    ]);
    let agent = Agent::builder()
        .config(&format!(
            "api:\n  auth:\n    tls:\n      certFile: {}\n      keyFile: {}\n      clientCaFile: {}\n    clientRoles:\n      orchestrator: [read]\n",
            volume.path("tls.crt").display(),
            volume.path("tls.key").display(),
            volume.path("ca.crt").display(),
        ))
        .start();
    let connect = || async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(pki.certificate("ca-1"))
            .identity(pki.identity("client-a"))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://{}", agent.api))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?;
        NodeAgentClient::new(channel)
            .get_node(pb::GetNodeRequest {})
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .map(|_| ())
    };
    within("before the swap", connect())
        .await
        .expect("GetNode before the swap");

    // The promise: a bad new set leaves the previous certificate served.
    swap_in_fifo(&volume.path("tls.crt"));
    for attempt in 0..3 {
        let r = within("after tls.crt became a FIFO", connect()).await;
        assert!(
            r.is_ok(),
            "attempt {attempt}: new connections are no longer served after tls.crt became a FIFO: {r:?}"
        );
    }
    assert_eq!(
        healthz(&agent),
        Some(200),
        "/healthz no longer answers after tls.crt became a FIFO"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversary_token_file_swapped_for_a_fifo_leaves_the_agent_serving_nothing() {
    if !require_tool("mkfifo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TEST_TOKEN).unwrap();
    let agent = Agent::builder()
        .config(&format!(
            "api:\n  auth:\n    tokenFile: {}\n",
            token.display()
        ))
        .default_read_auth()
        .start();
    let call = || async {
        let mut c = NodeAgentClient::new(
            Endpoint::from_shared(agent.grpc_url())
                .unwrap()
                .timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        c.get_node(bearer(pb::GetNodeRequest {}))
            .await
            .map(|_| ())
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))
    };
    within("before the swap", call())
        .await
        .expect("GetNode with the token");

    // The promise: an unreadable token file refuses bearer tokens (UNAUTHENTICATED, "cannot
    // read its token file"), it does not stop the agent answering.
    swap_in_fifo(&token);
    for attempt in 0..3 {
        let r = within("after the token file became a FIFO", call()).await;
        let answered = match &r {
            Ok(()) => true,
            Err(e) => e.to_string().contains("Unauthenticated"),
        };
        assert!(
            answered,
            "attempt {attempt}: a credentialed call got no answer after the token file became a FIFO: {r:?}"
        );
    }
    assert_eq!(
        healthz(&agent),
        Some(200),
        "/healthz no longer answers after the token file became a FIFO"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversary_aggregator_serves_the_census_it_read_with_the_read_token_to_anyone() {
    use nodekeeper::pb::aggregator_client::AggregatorClient;
    use nodekeeper_tests::{Proc, agent_bin, free_port, loopback};
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("read-token");
    std::fs::write(&token, TEST_TOKEN).unwrap();
    // Reads closed: only the read token reads this agent.
    let agent = Agent::builder()
        .config(&format!(
            "api:\n  auth:\n    readTokenFile: {}\n",
            token.display()
        ))
        .default_read_auth()
        .start();
    let grpc = loopback(free_port());
    let mut cmd = Command::new(agent_bin());
    cmd.arg("aggregate")
        .args(["--agents", &agent.api.to_string(), "--refresh", "100ms"])
        .arg("--listen")
        .arg(grpc.to_string())
        .arg("--metrics-listen")
        .arg(loopback(free_port()).to_string())
        .arg("--token-file")
        .arg(&token)
        // The agent serves plaintext here (decision #19-i: a plaintext token needs the flag).
        .arg("--allow-plaintext-token")
        .env_remove("KUBECONFIG");
    let _aggregator = Proc::spawn("aggregate", cmd, dir.path());

    // A caller without any credential asks the aggregator instead of the agent.
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = AggregatorClient::connect(format!("http://{grpc}")).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut client = client.expect("the aggregator never listened");
    match within("GetFleet", client.get_fleet(pb::GetFleetRequest {})).await {
        Ok(fleet) => panic!(
            "an anonymous caller read the fleet (agent addresses, node names, pod counts) the \
             aggregator collected with the read token: {:?}",
            fleet.into_inner()
        ),
        Err(s) => assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}"),
    }
}
