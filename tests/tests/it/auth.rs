//! Authentication of the gRPC API, end to end against the real agent: bearer tokens (missing,
//! wrong, right, rotated), read-only calls open or closed by config, control calls refused when
//! no credential is configured, and mTLS with certificates made by `openssl` (no client
//! certificate, one from another CA, one whose name is not allowed, the right one), from the
//! tonic client and from Python grpcio. Cordon runs against the fake Kubernetes API, so an
//! accepted call is seen on the Node. The token never reaches the agent's log.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nodekeeper::pb::{self, node_agent_client::NodeAgentClient};
use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::{Agent, Proc, python, require_python_modules, require_tool, workspace_root};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const NODE: &str = "node-a";
const TOKEN: &str = "nk-test-token-5f1d2c9e8a";
/// The client name the mTLS agents allow (the good client certificate's CN).
const CLIENT_NAME: &str = "orchestrator";

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test step timed out")
}

/// The fake API with node-a, and a kubeconfig for it.
struct Cluster {
    api: FakeApi,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

fn cluster() -> Cluster {
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    Cluster {
        api,
        kubeconfig,
        _dir: dir,
    }
}

impl Cluster {
    fn unschedulable(&self) -> bool {
        self.api.node(NODE).expect("node-a exists")["spec"]["unschedulable"]
            .as_bool()
            .unwrap_or(false)
    }
}

fn write_token(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

fn cordon_request() -> tonic::Request<pb::CordonRequest> {
    tonic::Request::new(pb::CordonRequest {
        reason: "auth test".into(),
        ..Default::default()
    })
}

fn with_bearer<T>(mut req: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    req.metadata_mut().insert("authorization", value);
    req
}

async fn plain_client(agent: &Agent) -> NodeAgentClient<Channel> {
    NodeAgentClient::connect(agent.grpc_url())
        .await
        .expect("connect")
}

fn assert_token_not_logged(agent: &Agent) {
    let log = agent.proc.log_text();
    assert!(
        !log.contains(TOKEN) && !log.contains("rotated-token"),
        "the token appears in the agent's log:\n{log}"
    );
}

// === bearer token, no TLS ===

#[tokio::test]
async fn bearer_token_guards_cordon_and_rotation_needs_no_restart() {
    let cluster = cluster();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = write_token(secrets.path(), TOKEN);
    let agent = Agent::builder()
        .config(&format!(
            "metrics:\n  enabled: false\napi:\n  auth:\n    tokenFile: {}\n",
            token_file.display()
        ))
        .connected(&cluster.kubeconfig, NODE)
        .start();
    let mut c = plain_client(&agent).await;

    let none = within(c.cordon(cordon_request())).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let wrong = within(c.cordon(with_bearer(cordon_request(), "nk-test-token-wrong")))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert!(!wrong.message().contains("nk-test-token"), "{wrong:?}");
    assert!(
        !cluster.unschedulable(),
        "a refused Cordon cordoned the node"
    );

    // Read-only calls are open by default.
    let node = within(c.get_node(pb::GetNodeRequest {}))
        .await
        .expect("GetNode without credentials")
        .into_inner();
    assert!(!node.unschedulable);

    let node = within(c.cordon(with_bearer(cordon_request(), TOKEN)))
        .await
        .expect("Cordon with the token")
        .into_inner();
    assert!(node.unschedulable);
    assert!(cluster.unschedulable(), "the Node is not unschedulable");

    // The Secret is rotated (kubelet swaps in a new file): the old token stops working, the new
    // one works, without a restart.
    let new = secrets.path().join("token.new");
    std::fs::write(&new, "rotated-token\n").unwrap();
    std::fs::rename(&new, &token_file).unwrap();
    let old = within(c.uncordon(with_bearer(
        tonic::Request::new(pb::UncordonRequest::default()),
        TOKEN,
    )))
    .await
    .unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated, "{old:?}");
    within(c.uncordon(with_bearer(
        tonic::Request::new(pb::UncordonRequest::default()),
        "rotated-token",
    )))
    .await
    .expect("Uncordon with the rotated token");
    assert!(!cluster.unschedulable());

    assert!(
        agent.proc.log_text().contains("gRPC call refused"),
        "refusals are logged"
    );
    assert_token_not_logged(&agent);
}

#[tokio::test]
async fn read_only_calls_need_the_token_when_open_read_only_is_false() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = write_token(secrets.path(), TOKEN);
    let agent = Agent::builder()
        .config(&format!(
            "api:\n  auth:\n    tokenFile: {}\n    openReadOnly: false\n",
            token_file.display()
        ))
        .start();
    let mut c = plain_client(&agent).await;
    let refused = within(c.get_node(pb::GetNodeRequest {})).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = within(c.get_metrics(pb::GetMetricsRequest {
        exclude_pods: true,
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    within(c.get_node(with_bearer(
        tonic::Request::new(pb::GetNodeRequest {}),
        TOKEN,
    )))
    .await
    .expect("GetNode with the token");
    assert_token_not_logged(&agent);
}

#[tokio::test]
async fn without_configured_credentials_control_calls_are_refused() {
    let cluster = cluster();
    let agent = Agent::builder()
        .config("metrics:\n  enabled: false\n")
        .connected(&cluster.kubeconfig, NODE)
        .start();
    let mut c = plain_client(&agent).await;
    let refused = within(c.cordon(with_bearer(cordon_request(), TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("not configured"), "{refused:?}");
    let refused = within(c.drain(pb::DrainRequest {
        id: "d1".into(),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(!cluster.unschedulable());
    within(c.get_node(pb::GetNodeRequest {}))
        .await
        .expect("GetNode stays open");
}

// === mTLS ===

/// A CA, a server certificate for localhost/127.0.0.1, and client certificates made by openssl.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pem(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    fn identity(&self, name: &str) -> Identity {
        Identity::from_pem(
            self.pem(&format!("{name}.crt")),
            self.pem(&format!("{name}.key")),
        )
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ca` and `other-ca`; `server` (SAN localhost, 127.0.0.1); `client` (CN orchestrator),
/// `intruder` (CN intruder, same CA) and `stranger` (CN orchestrator, other CA).
fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for ca in ["ca", "other-ca"] {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=nodekeeper test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ],
        );
    }
    let leaves = [
        (
            "server",
            "ca",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "ca",
            CLIENT_NAME,
            "subjectAltName=DNS:orchestrator.example\nextendedKeyUsage=clientAuth\n",
        ),
        (
            "intruder",
            "ca",
            "intruder",
            "extendedKeyUsage=clientAuth\n",
        ),
        (
            "stranger",
            "other-ca",
            CLIENT_NAME,
            "extendedKeyUsage=clientAuth\n",
        ),
    ];
    for (name, ca, cn, ext) in leaves {
        let ext_file = format!("{name}.ext");
        std::fs::write(
            d.join(&ext_file),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{ext}"),
        )
        .unwrap();
        openssl(
            d,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext_file,
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
    Pki { dir }
}

/// An agent connected to the fake API with server TLS, client CA, token and allowed names.
fn mtls_agent(cluster: &Cluster, pki: &Pki, token_file: &Path) -> Agent {
    Agent::builder()
        .config(&format!(
            "metrics:\n  enabled: false\napi:\n  auth:\n    tokenFile: {}\n    tls:\n      certFile: {}\n      keyFile: {}\n      clientCaFile: {}\n    allowedClientNames: [{CLIENT_NAME}]\n",
            token_file.display(),
            pki.path("server.crt").display(),
            pki.path("server.key").display(),
            pki.path("ca.crt").display(),
        ))
        .connected(&cluster.kubeconfig, NODE)
        .start()
}

/// A TLS channel that trusts `ca.crt`, with the client certificate `identity` when given.
async fn tls_client(
    agent: &Agent,
    pki: &Pki,
    identity: Option<&str>,
) -> Result<NodeAgentClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.pem("ca.crt")))
        .domain_name("localhost");
    if let Some(name) = identity {
        tls = tls.identity(pki.identity(name));
    }
    let channel = Endpoint::from_shared(format!("https://{}", agent.api))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(NodeAgentClient::new(channel))
}

#[tokio::test]
async fn mtls_client_certificates_are_checked_for_ca_and_name() {
    if !require_tool("openssl") {
        return;
    }
    let pki = make_pki();
    let cluster = cluster();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = write_token(secrets.path(), TOKEN);
    let agent = mtls_agent(&cluster, &pki, &token_file);

    // No client certificate, no token: TLS works, reads are open, Cordon is refused.
    let mut anonymous = within(tls_client(&agent, &pki, None))
        .await
        .expect("TLS without a client certificate connects");
    within(anonymous.get_node(pb::GetNodeRequest {}))
        .await
        .expect("GetNode over TLS without credentials");
    let refused = within(anonymous.cordon(cordon_request()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(!cluster.unschedulable());

    // A certificate from the right CA whose CN is not allowed.
    let mut intruder = within(tls_client(&agent, &pki, Some("intruder")))
        .await
        .expect("connect with the intruder certificate");
    let denied = within(intruder.cordon(cordon_request())).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("intruder"), "{denied:?}");
    assert!(!cluster.unschedulable());

    // The right certificate.
    let mut orchestrator = within(tls_client(&agent, &pki, Some("client")))
        .await
        .expect("connect with the client certificate");
    let node = within(orchestrator.cordon(cordon_request()))
        .await
        .expect("Cordon with the allowed client certificate")
        .into_inner();
    assert!(node.unschedulable);
    assert!(cluster.unschedulable());
    within(orchestrator.uncordon(pb::UncordonRequest::default()))
        .await
        .expect("Uncordon with the allowed client certificate");
    assert!(!cluster.unschedulable());

    // Token-only clients still connect to an mTLS agent (client certificates are optional).
    within(anonymous.cordon(with_bearer(cordon_request(), TOKEN)))
        .await
        .expect("Cordon with the token over TLS, no client certificate");
    assert!(cluster.unschedulable());
    assert_token_not_logged(&agent);
}

#[tokio::test]
async fn mtls_handshake_refuses_a_certificate_from_another_ca_and_plaintext() {
    if !require_tool("openssl") {
        return;
    }
    let pki = make_pki();
    let cluster = cluster();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = write_token(secrets.path(), TOKEN);
    let agent = mtls_agent(&cluster, &pki, &token_file);

    // Even with the right token, a connection presenting a certificate the client CA did not
    // sign is refused in the handshake: no call ever reaches the auth layer.
    let refused = match within(tls_client(&agent, &pki, Some("stranger"))).await {
        Err(e) => format!("connect: {e:?}"),
        Ok(mut c) => {
            let e = within(c.cordon(with_bearer(cordon_request(), TOKEN)))
                .await
                .expect_err("a certificate from another CA was accepted");
            // A transport failure (the server's `unknown_ca` alert, or the connection closed
            // by it, depending on which side reads first), never a status from the auth layer.
            assert!(
                !matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied),
                "not a handshake refusal: {e:?}"
            );
            assert!(
                std::error::Error::source(&e).is_some(),
                "no transport error: {e:?}"
            );
            format!("{e:?}")
        }
    };
    assert!(!cluster.unschedulable(), "refused: {refused}");

    // Plaintext to the TLS port gets nowhere either.
    if let Ok(mut c) = NodeAgentClient::connect(agent.grpc_url()).await {
        let e = within(c.get_node(pb::GetNodeRequest {}))
            .await
            .expect_err("plaintext accepted by a TLS agent");
        assert_ne!(e.code(), Code::Ok);
    }

    // The agent is still serving the right client.
    let mut orchestrator = within(tls_client(&agent, &pki, Some("client")))
        .await
        .expect("connect with the client certificate");
    within(orchestrator.cordon(cordon_request()))
        .await
        .expect("Cordon with the allowed client certificate");
    assert!(cluster.unschedulable());
}

#[test]
fn a_missing_certificate_file_fails_the_start_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "api:\n  auth:\n    tls:\n      certFile: /nonexistent/tls.crt\n      keyFile: /nonexistent/tls.key\n",
    )
    .unwrap();
    let out = Command::new(nodekeeper_tests::agent_bin())
        .args(["run", "--standalone", "--config"])
        .arg(&config)
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its certificate");
    assert!(
        stderr.contains("api.auth.tls.certFile") && stderr.contains("/nonexistent/tls.crt"),
        "{stderr}"
    );
}

// === Python grpcio over mTLS ===

/// Runs `grpc_check.py SCENARIO` over mTLS with the allowed client certificate and asserts it
/// reported success within `limit`.
fn grpc_check_over_mtls(scenario: &str, agent: &Agent, pki: &Pki, limit: Duration) {
    let mut cmd = Command::new(python());
    cmd.arg(workspace_root().join("tests/py/grpc_check.py"))
        .arg(scenario)
        .arg("--addr")
        .arg(agent.api.to_string())
        .arg("--tls-ca")
        .arg(pki.path("ca.crt"))
        .arg("--tls-cert")
        .arg(pki.path("client.crt"))
        .arg("--tls-key")
        .arg(pki.path("client.key"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let mut proc = Proc::spawn(&format!("grpc_check-{scenario}"), cmd, agent.dir.path());
    let status = proc.wait_exit(limit);
    let out = proc.log_text();
    assert!(
        status.success() && out.contains("\"ok\": true"),
        "grpc_check.py {scenario} failed ({status}):\n{out}\nagent log:\n{}",
        agent.proc.log_text()
    );
}

#[test]
fn python_grpcio_cordons_and_uncordons_over_mtls() {
    if !require_tool("openssl") || !require_python_modules(&["grpc", "grpc_tools"]) {
        return;
    }
    let pki = make_pki();
    let cluster = cluster();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = write_token(secrets.path(), TOKEN);
    let agent = mtls_agent(&cluster, &pki, &token_file);
    grpc_check_over_mtls("cordon-uncordon", &agent, &pki, Duration::from_secs(90));
    assert!(!cluster.unschedulable(), "left cordoned");
    // The script really went through both states on the Node: a cordon and an uncordon patch.
    let node_path = format!("/api/v1/nodes/{NODE}");
    let patches = cluster
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path == node_path && r.status == 200)
        .count();
    assert!(patches >= 2, "{patches} Node patches");
}

#[test]
fn python_grpcio_drives_a_full_drain_over_mtls() {
    if !require_tool("openssl") || !require_python_modules(&["grpc", "grpc_tools"]) {
        return;
    }
    let pki = make_pki();
    let s = nodekeeper_tests::drain_scenario::rotation(
        Duration::from_millis(200),
        Duration::from_millis(500),
    );
    let cluster = Cluster {
        api: s.api,
        kubeconfig: s.kubeconfig.clone(),
        _dir: s.dir,
    };
    let secrets = tempfile::tempdir().unwrap();
    let token_file = write_token(secrets.path(), TOKEN);
    let agent = mtls_agent(&cluster, &pki, &token_file);
    grpc_check_over_mtls("drain", &agent, &pki, Duration::from_secs(240));
    let mut left = cluster.api.pods_on(NODE);
    left.sort();
    assert_eq!(left, nodekeeper_tests::drain_scenario::expected_remaining());
    assert!(cluster.api.pdb_violations().is_empty());
}

// === authorization: roles, principals, rate limits (issue #19) ===

const READ_TOKEN: &str = "nk-read-token-0b7e41";

/// A connected agent with the control token, the read token and `extra` lines under `api.auth`,
/// keeping the agent's own default for reads (closed).
fn two_token_agent(cluster: &Cluster, secrets: &Path, extra: &str) -> Agent {
    let control = write_token(secrets, TOKEN);
    let read = secrets.join("read-token");
    std::fs::write(&read, READ_TOKEN).unwrap();
    Agent::builder()
        .config(&format!(
            "metrics:\n  enabled: false\napi:\n  auth:\n    tokenFile: {}\n    readTokenFile: {}\n{extra}",
            control.display(),
            read.display()
        ))
        .default_read_auth()
        .connected(&cluster.kubeconfig, NODE)
        .start()
}

fn drain_request(id: &str, requester: &str) -> pb::DrainRequest {
    pb::DrainRequest {
        id: id.into(),
        reason: "auth test".into(),
        requester: requester.into(),
        ..Default::default()
    }
}

/// The messages of the Events recorded on the fake API with `reason`.
fn event_messages(cluster: &Cluster, reason: &str) -> Vec<String> {
    cluster
        .api
        .events()
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| {
            e["message"]
                .as_str()
                .or(e["note"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn anonymous_get_metrics_is_refused_by_default_and_health_stays_open() {
    use nodekeeper::keda_pb::external_scaler_client::ExternalScalerClient;
    let secrets = tempfile::tempdir().unwrap();
    let read = secrets.path().join("read-token");
    std::fs::write(&read, READ_TOKEN).unwrap();
    let agent = Agent::builder()
        .config(&format!(
            "api:\n  auth:\n    readTokenFile: {}\n",
            read.display()
        ))
        .default_read_auth()
        .start();
    let mut c = plain_client(&agent).await;
    let metrics = || pb::GetMetricsRequest {
        exclude_pods: true,
        ..Default::default()
    };
    let refused = within(c.get_metrics(metrics())).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = within(c.get_node(pb::GetNodeRequest {})).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    within(c.get_metrics(with_bearer(tonic::Request::new(metrics()), READ_TOKEN)))
        .await
        .expect("GetMetrics with the read token");

    // KEDA's scaler is closed too unless opened.
    let mut keda = ExternalScalerClient::connect(agent.grpc_url())
        .await
        .unwrap();
    let refused = within(keda.get_metric_spec(nodekeeper::keda_pb::ScaledObjectRef::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // Health needs nothing.
    let channel = Endpoint::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    within(health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }))
    .await
    .expect("health is anonymous");

    // openKeda opens only KEDA's scaler.
    let agent = Agent::builder()
        .config("api:\n  auth:\n    openKeda: true\n")
        .default_read_auth()
        .start();
    let mut keda = ExternalScalerClient::connect(agent.grpc_url())
        .await
        .unwrap();
    let answer =
        within(keda.get_metric_spec(nodekeeper::keda_pb::ScaledObjectRef::default())).await;
    assert!(
        !matches!(&answer, Err(e) if matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied)),
        "KEDA refused with openKeda: {answer:?}"
    );
    let mut c = plain_client(&agent).await;
    let refused = within(c.get_metrics(metrics())).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}

#[tokio::test]
async fn a_read_credential_cannot_drain_or_cordon() {
    let cluster = cluster();
    let secrets = tempfile::tempdir().unwrap();
    let agent = two_token_agent(&cluster, secrets.path(), "");
    let mut c = plain_client(&agent).await;

    within(c.get_node(with_bearer(
        tonic::Request::new(pb::GetNodeRequest {}),
        READ_TOKEN,
    )))
    .await
    .expect("GetNode with the read token");
    let denied = within(c.drain(with_bearer(
        tonic::Request::new(drain_request("d-read", "patch-orchestrator")),
        READ_TOKEN,
    )))
    .await
    .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("token:read"), "{denied:?}");
    let denied = within(c.cordon(with_bearer(cordon_request(), READ_TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(!cluster.unschedulable(), "a read token cordoned the node");
    assert!(
        cluster.api.node(NODE).unwrap()["metadata"]["annotations"]["nodekeeper.io/drain"].is_null(),
        "a read token started a drain"
    );
    assert!(event_messages(&cluster, "DrainStarted").is_empty());

    // The control token may.
    within(c.cordon(with_bearer(cordon_request(), TOKEN)))
        .await
        .expect("Cordon with the control token");
    assert!(cluster.unschedulable());
    let log = agent.proc.log_text();
    assert!(log.contains("role_lacks_rpc"), "refusal not logged:\n{log}");
    assert!(!log.contains(READ_TOKEN), "the read token was logged");
}

#[tokio::test]
async fn a_client_certificate_can_call_only_what_its_role_allows() {
    if !require_tool("openssl") {
        return;
    }
    let pki = make_pki();
    let cluster = cluster();
    let agent = Agent::builder()
        .config(&format!(
            "metrics:\n  enabled: false\napi:\n  auth:\n    tls:\n      certFile: {}\n      keyFile: {}\n      clientCaFile: {}\n    clientRoles:\n      {CLIENT_NAME}: [cordon]\n      intruder: [read]\n",
            pki.path("server.crt").display(),
            pki.path("server.key").display(),
            pki.path("ca.crt").display(),
        ))
        .default_read_auth()
        .connected(&cluster.kubeconfig, NODE)
        .start();

    // `orchestrator` has role cordon: it cordons, it may not drain.
    let mut orchestrator = within(tls_client(&agent, &pki, Some("client")))
        .await
        .expect("connect with the client certificate");
    within(orchestrator.cordon(cordon_request()))
        .await
        .expect("Cordon with role cordon");
    assert!(cluster.unschedulable());
    let denied = within(orchestrator.drain(drain_request("d-cordon-role", "x")))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("cert:orchestrator"), "{denied:?}");
    let denied = within(orchestrator.cancel_drain(pb::CancelDrainRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // `intruder` has role read: it reads, it may not uncordon.
    let mut intruder = within(tls_client(&agent, &pki, Some("intruder")))
        .await
        .expect("connect with the intruder certificate");
    within(intruder.get_node(pb::GetNodeRequest {}))
        .await
        .expect("GetNode with role read");
    let denied = within(intruder.uncordon(pb::UncordonRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(cluster.unschedulable(), "role read uncordoned the node");

    // No certificate and no token: reads are closed.
    let mut anonymous = within(tls_client(&agent, &pki, None)).await.unwrap();
    let refused = within(anonymous.get_node(pb::GetNodeRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}

#[tokio::test]
async fn the_authenticated_principal_is_recorded_in_events_annotation_and_audit_log() {
    if !require_tool("openssl") {
        return;
    }
    let pki = make_pki();
    let cluster = cluster();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = write_token(secrets.path(), TOKEN);
    let agent = mtls_agent(&cluster, &pki, &token_file);
    let mut orchestrator = within(tls_client(&agent, &pki, Some("client")))
        .await
        .expect("connect with the client certificate");

    within(orchestrator.cordon(cordon_request()))
        .await
        .expect("Cordon");
    let cordoned = event_messages(&cluster, "Cordoned");
    assert!(
        cordoned.iter().any(|m| m.contains("cert:orchestrator")),
        "{cordoned:?}"
    );

    // The caller claims to be someone else in `requester`: the record names the certificate.
    let mut stream = within(orchestrator.drain(drain_request("d-principal", "not-me")))
        .await
        .expect("Drain")
        .into_inner();
    let mut last = None;
    while let Some(e) = within(stream.message()).await.expect("stream") {
        last = Some(e);
    }
    let last = last.expect("drain events");
    let Some(pb::drain_event::Event::Completed(status)) = last.event else {
        panic!("drain did not complete: {last:?}");
    };
    assert_eq!(status.principal, "cert:orchestrator");
    assert_eq!(status.requester, "not-me");
    let started = event_messages(&cluster, "DrainStarted");
    assert!(
        started
            .iter()
            .any(|m| m.contains("started by cert:orchestrator") && m.contains("not-me")),
        "{started:?}"
    );
    let annotation =
        cluster.api.node(NODE).unwrap()["metadata"]["annotations"]["nodekeeper.io/drain"]
            .as_str()
            .expect("drain annotation")
            .to_string();
    let persisted: serde_json::Value = serde_json::from_str(&annotation).unwrap();
    assert_eq!(persisted["principal"], "cert:orchestrator", "{annotation}");

    // The token holder is named as the token, not as anyone it claims to be.
    let mut anonymous = within(tls_client(&agent, &pki, None)).await.unwrap();
    within(anonymous.uncordon(with_bearer(
        tonic::Request::new(pb::UncordonRequest::default()),
        TOKEN,
    )))
    .await
    .expect("Uncordon with the token");
    let uncordoned = event_messages(&cluster, "Uncordoned");
    assert!(
        uncordoned.iter().any(|m| m.contains("token:control")),
        "{uncordoned:?}"
    );

    // One audit line per mutating call, naming the principal.
    let log = agent.proc.log_text();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("gRPC mutating call authorized"))
        .collect();
    assert_eq!(audit.len(), 3, "{audit:#?}");
    for (line, who, method) in [
        (audit[0], "cert:orchestrator", "/Cordon"),
        (audit[1], "cert:orchestrator", "/Drain"),
        (audit[2], "token:control", "/Uncordon"),
    ] {
        assert!(line.contains(who) && line.contains(method), "{line}");
    }
}

#[tokio::test]
async fn mutating_calls_are_rate_limited_per_principal() {
    let cluster = cluster();
    let secrets = tempfile::tempdir().unwrap();
    let agent = two_token_agent(
        &cluster,
        secrets.path(),
        "    rateLimit: {burst: 2, perMinute: 1}\n",
    );
    let mut c = plain_client(&agent).await;
    for _ in 0..2 {
        within(c.cordon(with_bearer(cordon_request(), TOKEN)))
            .await
            .expect("Cordon within the burst");
    }
    let limited = within(c.uncordon(with_bearer(
        tonic::Request::new(pb::UncordonRequest::default()),
        TOKEN,
    )))
    .await
    .unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert!(limited.message().contains("token:control"), "{limited:?}");
    assert!(cluster.unschedulable(), "a limited Uncordon went through");
    // Reads are not limited.
    for _ in 0..5 {
        within(c.get_node(with_bearer(
            tonic::Request::new(pb::GetNodeRequest {}),
            READ_TOKEN,
        )))
        .await
        .expect("GetNode is not rate-limited");
    }
}

// === the CLI over mTLS with a private CA (issue #19) ===

/// Runs the nodekeeper CLI to completion (at most `secs`): (exit code, stdout, stderr).
fn run_cli(args: &[&str], secs: u64) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(nodekeeper_tests::agent_bin())
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn nodekeeper");
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nodekeeper {args:?} did not exit within {secs}s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code(),
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&err).unwrap(),
    )
}

#[test]
fn the_cli_drains_over_mtls_with_a_private_ca() {
    if !require_tool("openssl") {
        return;
    }
    let pki = make_pki();
    let s = nodekeeper_tests::drain_scenario::rotation(
        Duration::from_millis(200),
        Duration::from_millis(500),
    );
    let cluster = Cluster {
        api: s.api,
        kubeconfig: s.kubeconfig.clone(),
        _dir: s.dir,
    };
    let secrets = tempfile::tempdir().unwrap();
    let token_file = write_token(secrets.path(), TOKEN);
    let agent = mtls_agent(&cluster, &pki, &token_file);
    let addr = agent.api.to_string();
    let (ca, cert, key) = (
        pki.path("ca.crt").display().to_string(),
        pki.path("client.crt").display().to_string(),
        pki.path("client.key").display().to_string(),
    );

    // Public roots do not know the private CA: the handshake fails, exit 69.
    let (code, _, stderr) = run_cli(&["cordon", &addr, "--cert", &cert, "--key", &key], 30);
    assert_eq!(code, Some(69), "{stderr}");
    // The agent's certificate does not name wrong.example.
    let (code, _, stderr) = run_cli(
        &[
            "cordon",
            &addr,
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--server-name",
            "wrong.example",
        ],
        30,
    );
    assert_eq!(code, Some(69), "{stderr}");
    // --cert without --key is a usage error.
    let (code, _, stderr) = run_cli(&["cordon", &addr, "--cacert", &ca, "--cert", &cert], 30);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!cluster.unschedulable(), "a refused CLI call cordoned");

    let (code, stdout, stderr) = run_cli(
        &[
            "drain",
            &addr,
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--server-name",
            "localhost",
            "--id",
            "cli-mtls",
            "--requester",
            "someone-else",
            "--evict-unreplicated",
            "--timeout",
            "2m",
            "--json",
        ],
        180,
    );
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let mut left = cluster.api.pods_on(NODE);
    left.sort();
    assert_eq!(left, nodekeeper_tests::drain_scenario::expected_remaining());
    let annotation =
        cluster.api.node(NODE).unwrap()["metadata"]["annotations"]["nodekeeper.io/drain"]
            .as_str()
            .expect("drain annotation")
            .to_string();
    assert!(
        annotation.contains("\"principal\":\"cert:orchestrator\""),
        "{annotation}"
    );
}
