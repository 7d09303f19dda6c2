//! The agent's gRPC TLS files re-read without a restart (issue #19): a Secret volume updated
//! the way kubelet does it (new directory, `..data` symlink renamed over) changes the
//! certificate `openssl s_client` is served and the CA client certificates are checked
//! against, while a stream opened before the swap keeps running on its connection. A bad new
//! pair (a key that does not match, garbage) is refused: the log names the file, the metric
//! and the api health detail say so, and the previous certificate is still served.

use std::process::Command;
use std::time::Duration;

use nodekeeper::pb::{self, node_agent_client::NodeAgentClient};
use nodekeeper_tests::pki::{Pki, SecretVolume};
use nodekeeper_tests::{Agent, require_tool, sample};
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// The client certificates' CN: role read on the agent.
const CLIENT: &str = "orchestrator";

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test step timed out")
}

/// ca-1 signs server-one, server-two and client-a; ca-2 signs client-b. Both clients are CN
/// `orchestrator`.
fn pki() -> Pki {
    let pki = Pki::new();
    pki.ca("ca-1").ca("ca-2");
    pki.server("server-one", "ca-1", "nodekeeper server one", "")
        .server("server-two", "ca-1", "nodekeeper server two", "")
        .client("client-a", "ca-1", CLIENT)
        .client("client-b", "ca-2", CLIENT);
    pki
}

fn secret(pki: &Pki, cert: &str, key: &str, ca: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("tls.crt", pki.pem(&format!("{cert}.crt"))),
        ("tls.key", pki.pem(&format!("{key}.key"))),
        ("ca.crt", pki.pem(&format!("{ca}.crt"))),
    ]
}

/// What `openssl s_client` is shown: the server certificate's subject, and the CA names the
/// server asks client certificates from.
fn served(agent: &Agent) -> String {
    let out = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect"])
        .arg(agent.api.to_string())
        .args(["-servername", "localhost", "-alpn", "h2"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("subject=") || l.starts_with("CN = "))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn tls_client(
    agent: &Agent,
    pki: &Pki,
    identity: &str,
) -> Result<NodeAgentClient<Channel>, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(pki.certificate("ca-1"))
        .identity(pki.identity(identity))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", agent.api))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(NodeAgentClient::new(channel))
}

fn api_detail(node: &pb::NodeStatus) -> String {
    node.capabilities
        .iter()
        .find(|c| c.name == "api")
        .map(|c| c.detail.clone())
        .unwrap_or_default()
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&agent.metrics_text(), name, labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_and_ca_are_served_without_a_restart_and_bad_pairs_are_refused() {
    if !require_tool("openssl") {
        return;
    }
    let pki = pki();
    let mut volume = SecretVolume::new(&secret(&pki, "server-one", "server-one", "ca-1"));
    let mut agent = Agent::builder()
        .config(&format!(
            "api:\n  auth:\n    openReadOnly: false\n    tls:\n      certFile: {}\n      keyFile: {}\n      clientCaFile: {}\n    clientRoles:\n      {CLIENT}: [read]\n",
            volume.path("tls.crt").display(),
            volume.path("tls.key").display(),
            volume.path("ca.crt").display(),
        ))
        .start();
    let first = served(&agent);
    assert!(first.contains("nodekeeper server one"), "{first}");
    assert!(first.contains("nodekeeper test ca-1"), "{first}");

    // A connection opened before any swap, with a stream on it.
    let mut old = within(tls_client(&agent, &pki, "client-a"))
        .await
        .expect("connect with client-a");
    let mut stream = within(old.watch_metrics(pb::WatchMetricsRequest {
        interval: Some(Duration::from_secs(1).try_into().unwrap()),
        exclude_pods: true,
        exclude_connections: true,
    }))
    .await
    .expect("WatchMetrics")
    .into_inner();
    within(stream.message())
        .await
        .expect("first snapshot")
        .expect("stream open");

    // The certificate is rotated: new connections are served the new one at once.
    volume.update(&secret(&pki, "server-two", "server-two", "ca-1"));
    let now = served(&agent);
    assert!(now.contains("nodekeeper server two"), "{now}");
    assert_eq!(
        metric(
            &agent,
            "nodekeeper_api_tls_reloads_total",
            &[("result", "loaded")]
        ),
        1.0
    );
    // The old connection goes on with the session it negotiated.
    within(stream.message())
        .await
        .expect("the stream opened before the rotation ended")
        .expect("stream open");

    // A certificate with a key that is not its own: refused, naming the key file; the previous
    // certificate is still served, and the metric and the api health say so.
    volume.update(&secret(&pki, "server-one", "server-two", "ca-1"));
    let still = served(&agent);
    assert!(still.contains("nodekeeper server two"), "{still}");
    assert_eq!(metric(&agent, "nodekeeper_api_tls_files_refused", &[]), 1.0);
    let log = agent.proc.log_text();
    assert!(
        log.contains("refused") && log.contains("api.auth.tls.keyFile"),
        "{log}"
    );
    let mut c = within(tls_client(&agent, &pki, "client-a"))
        .await
        .expect("connect during the refusal");
    // The health detail follows within one file check (every 10 s).
    let mut detail = String::new();
    for _ in 0..200 {
        let node = within(c.get_node(pb::GetNodeRequest {}))
            .await
            .expect("GetNode during the refusal");
        detail = api_detail(&node.into_inner());
        if detail.contains("api.auth.tls.keyFile") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        detail.contains("api.auth.tls.keyFile") && detail.contains("tls.key"),
        "{detail:?}"
    );

    // Garbage in the certificate file: refused, naming the certificate file.
    let mut garbage = secret(&pki, "server-two", "server-two", "ca-1");
    garbage[0].1 = b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_vec();
    volume.update(&garbage);
    let still = served(&agent);
    assert!(still.contains("nodekeeper server two"), "{still}");
    assert!(agent.proc.log_text().contains("api.auth.tls.certFile"));
    assert_eq!(
        metric(
            &agent,
            "nodekeeper_api_tls_reloads_total",
            &[("result", "refused")]
        ),
        2.0
    );

    // The client CA is rotated (server-two stays): client-b (ca-2) gets in, a new connection
    // with client-a (ca-1) does not, and the refusal is cleared.
    volume.update(&secret(&pki, "server-two", "server-two", "ca-2"));
    let now = served(&agent);
    assert!(now.contains("nodekeeper test ca-2"), "{now}");
    assert_eq!(metric(&agent, "nodekeeper_api_tls_files_refused", &[]), 0.0);
    let mut b = within(tls_client(&agent, &pki, "client-b"))
        .await
        .expect("connect with client-b");
    within(b.get_node(pb::GetNodeRequest {}))
        .await
        .expect("GetNode with a certificate of the new CA");
    let refused = match within(tls_client(&agent, &pki, "client-a")).await {
        Err(e) => format!("{e:?}"),
        Ok(mut a) => {
            let e = within(a.get_node(pb::GetNodeRequest {}))
                .await
                .expect_err("a certificate of the old CA was accepted");
            // Refused in the handshake, never by the auth layer.
            assert!(
                !matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied),
                "{e:?}"
            );
            format!("{e:?}")
        }
    };
    assert!(!refused.is_empty());
    // The connection from before every swap is still up.
    within(stream.message())
        .await
        .expect("the first stream ended after the CA rotation")
        .expect("stream open");
    assert!(agent.proc.alive(), "the agent exited");
}
