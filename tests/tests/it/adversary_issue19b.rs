//! Adversary tests for issue #19, part b: the fleet aggregator's own API ("An aggregator that
//! trusts nobody by default", docs/grpc-api.md "The aggregator's own API", docs/install.md
//! "Security model"). The promise under attack: `nodekeeper aggregate` serves GetFleet and KEDA's
//! ExternalScaler only to authenticated callers by default (mTLS with a certificate of
//! `--listen-client-ca` named in `--listen-client-names`, and/or the bearer token of
//! `--listen-token-file`); anonymous service only with `--allow-anonymous` (loud); credential
//! files re-read on change, a bad rotation refused and the working set kept; the census read
//! from the agents counts only pods an agent's node hosts.
//!
//! One test per attack. An attack that held is a plain test; one that broke the promise is kept
//! `#[ignore = "adversary finding: ..."]` and fails when run with `--ignored`. The product code is
//! not changed here.
//!
//! Held (plain tests): anonymous reach is health only and nothing open carries the census;
//! near-miss tokens and header tricks; a wrong token beside a good certificate; forged,
//! expired, not-yet-valid, server-only, CA-as-leaf, leaf-signed and misnamed certificates;
//! spoiled token files (no hang, no opening, recovery); anonymous beside a credential and
//! `--check-config`; a connection flood (fd bound); slowloris handshakes; certificate swaps
//! racing handshakes; a rotated client CA; a rogue agent's census counted whatever node it
//! claims (broke, fixed by decisions #19-j).
//!
//! Broke and fixed by decision #19-i (now plain tests): a bad token rotation dropped the
//! working token; anonymous health Watch streams were unbounded; anonymous connections locked
//! KEDA out; the shipped aggregator read agents in clear text with the token that also opened
//! its own API (and a rogue endpoint was handed it); a stream opened with a rotated-away token
//! kept answering.

use crate::support::aggregate::{
    AGGREGATOR_NAME, KEDA, SERVING, TOKEN, Via, WAIT, bearer, channel, channel_from, get_fleet,
    health_check, keda_call, os, pool_query, served_subject, server_files, start_aggregator,
    start_fake_agent, start_recording_fake_agent, start_shared_fake_agent, with_auth,
};
use crate::support::census_pods;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use census_pods::POOL_REMOTE;
use nodekeeper::keda_pb::{self, external_scaler_client::ExternalScalerClient};
use nodekeeper::pb::{
    self, aggregator_client::AggregatorClient, node_agent_client::NodeAgentClient,
};
use nodekeeper_tests::fake_api::{EndpointSeed, FakeApi, PodSeed};
use nodekeeper_tests::pki::{Pki, SecretVolume};
use nodekeeper_tests::{
    agent_bin, free_port, http_get, loopback, raise_open_files_limit, require_tool, sample,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

// === the aggregator under attack ===

/// `nodekeeper aggregate ARGS --check-config` (or any run that must exit by itself).
fn run_to_exit(args: &[OsString], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("aggregate")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("KUBECONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the aggregator");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`aggregate {args:?}` did not exit by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// === clients ===

const NO_CERT: Via<'static> = Via::Tls {
    ca: "ca",
    identity: None,
};

fn as_keda(name: &str) -> Via<'_> {
    Via::Tls {
        ca: "ca",
        identity: Some(name),
    }
}

/// The web pool query KEDA would send.
fn pool_ref() -> keda_pb::ScaledObjectRef {
    pool_query(&[])
}

/// KEDA's GetMetrics of the web pool: its value.
fn keda_pool_value(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    pki: &Pki,
    via: Via<'_>,
) -> Result<f64, Status> {
    keda_call(rt, addr, pki, via, pool_ref()).map(|r| r.metric_values[0].metric_value_float)
}

/// A refusal in the TLS handshake (the certificate never authenticated anything), as tonic
/// reports it: the connection or the first call fails at the transport.
fn handshake_refused(r: &Result<pb::FleetStatus, Status>) -> bool {
    matches!(r, Err(e) if matches!(
        e.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    ))
}

// === certificates the Pki helper does not make ===

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

/// A key and CSR `NAME.key`, `NAME.csr` with subject `subj` (e.g. `/CN=x`), in the Pki dir.
fn csr(pki: &Pki, name: &str, subj: &str) {
    openssl(
        &pki.path(""),
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            subj,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
}

/// A certificate `NAME.crt` for subject `subj` signed by `issuer` (any `ISSUER.crt`/`.key` of the
/// Pki, CA or not) with the x509v3 extension lines `ext`, valid two days from now.
fn signed(pki: &Pki, name: &str, issuer: &str, subj: &str, ext: &str) {
    csr(pki, name, subj);
    let d = pki.path("");
    std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{issuer}.crt"),
            "-CAkey",
            &format!("{issuer}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// [`signed`] with explicit validity dates (`YYYYMMDDHHMMSSZ`), through `openssl ca`.
fn signed_dated(pki: &Pki, name: &str, issuer: &str, subj: &str, ext: &str, from: &str, to: &str) {
    csr(pki, name, subj);
    let d = pki.path("");
    std::fs::write(
        d.join("dated.cnf"),
        "[ca]\ndefault_ca = dated\n[dated]\ndatabase = dated-index.txt\nnew_certs_dir = .\n\
         serial = dated-serial.txt\ndefault_md = sha256\npolicy = any\nunique_subject = no\n\
         copy_extensions = none\n[any]\ncommonName = supplied\n",
    )
    .unwrap();
    if !d.join("dated-index.txt").exists() {
        std::fs::write(d.join("dated-index.txt"), "").unwrap();
        std::fs::write(d.join("dated-serial.txt"), "1000\n").unwrap();
    }
    std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        &d,
        &[
            "ca",
            "-batch",
            "-notext",
            "-config",
            "dated.cnf",
            "-cert",
            &format!("{issuer}.crt"),
            "-keyfile",
            &format!("{issuer}.key"),
            "-in",
            &format!("{name}.csr"),
            "-out",
            &format!("{name}.crt"),
            "-startdate",
            from,
            "-enddate",
            to,
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n";

fn base_pki() -> Pki {
    let pki = Pki::new();
    let san = format!("DNS:{AGGREGATOR_NAME}");
    pki.ca("ca")
        .ca("other-ca")
        .server("aggregator", "ca", "nodekeeper aggregator one", &san)
        .server("aggregator-next", "ca", "nodekeeper aggregator two", &san)
        .client("keda", "ca", KEDA)
        .client("intruder", "ca", "intruder");
    pki
}

/// TLS, client CA, `--listen-client-names keda-operator`, and (when given) the token file.
fn mtls_args(volume: &SecretVolume, token: Option<&Path>, agents: &str) -> Vec<OsString> {
    let mut a = os(&[
        &"--agents",
        &agents,
        &"--listen-cert",
        &volume.path("tls.crt"),
        &"--listen-key",
        &volume.path("tls.key"),
        &"--listen-client-ca",
        &volume.path("ca.crt"),
        &"--listen-client-names",
        &KEDA,
    ]);
    if let Some(t) = token {
        a.extend(os(&[&"--listen-token-file", &t]));
    }
    a
}

// === census pods for the fake agents (`crate::support::aggregate::FakeAgent`) ===

/// One pod of a census: `established` connections to the pool's remote.
fn census_pod(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    established: u64,
) -> pb::PodConnections {
    pb::PodConnections {
        uid: format!("uid-{ns}-{name}"),
        namespace: ns.into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        established,
        tcp_states: [("established".to_string(), established)].into(),
        pools: vec![pb::ConnectionPool {
            remote: POOL_REMOTE.into(),
            established,
            active: established,
            remotes: 1,
            ..Default::default()
        }],
        source: "sock_diag".into(),
        ..Default::default()
    }
}

// === attacks: what an anonymous caller reaches ===

/// Names only the census holds: none may reach a caller without a credential.
const SECRET_NS: &str = "secret-shop";
const SECRET_POD: &str = "secret-web-7f9c";
const SECRET_NODE: &str = "node-secret-a";

/// Attack: every RPC the aggregator serves (and one it does not), without any credential, over
/// TLS without a certificate and in plaintext; then look for the census in what stays open
/// (health Check and Watch, /metrics, /healthz, /readyz, the refusals' messages). Held: every
/// RPC but health is UNAUTHENTICATED before routing, health says SERVING and nothing else, and
/// no census name leaks.
#[test]
fn anonymous_callers_reach_health_only_and_nothing_open_leaks_the_census() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let agent = start_fake_agent(
        &rt,
        SECRET_NODE,
        vec![census_pod(SECRET_NS, SECRET_POD, &[("app", "web")], 3)],
    );
    let volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let agg = start_aggregator(
        dir.path(),
        &mtls_args(&volume, Some(&token), &agent.to_string()),
        &[],
    );
    // An authenticated fan-out first, so the census is in the aggregator's memory.
    let fleet = get_fleet(&rt, agg.grpc, &pki, as_keda("keda"), &[]).expect("KEDA reads");
    assert_eq!(fleet.answered, 1, "{fleet:?}");

    let fanouts = agg.metric("nodekeeper_aggregate_fanout_duration_seconds_count");
    assert!(fanouts >= Some(1.0), "{fanouts:?}");
    // Past --refresh (100ms): a call that got through would have to fan out again.
    std::thread::sleep(Duration::from_millis(300));
    let secret = |s: &str| {
        [SECRET_NS, SECRET_POD, SECRET_NODE]
            .iter()
            .any(|x| s.contains(x))
    };
    let mut refusals = Vec::new();
    rt.block_on(async {
        let ch = channel(agg.grpc, &pki, NO_CERT)
            .await
            .expect("TLS without a certificate");
        let mut agg_c = AggregatorClient::new(ch.clone());
        let mut keda = ExternalScalerClient::new(ch.clone());
        let mut node = NodeAgentClient::new(ch.clone());
        let calls: Vec<(&str, Result<(), Status>)> = vec![
            (
                "GetFleet",
                agg_c.get_fleet(pb::GetFleetRequest {}).await.map(drop),
            ),
            ("IsActive", keda.is_active(pool_ref()).await.map(drop)),
            (
                "GetMetricSpec",
                keda.get_metric_spec(pool_ref()).await.map(drop),
            ),
            (
                "GetMetrics",
                keda.get_metrics(keda_pb::GetMetricsRequest {
                    scaled_object_ref: Some(pool_ref()),
                    metric_name: String::new(),
                })
                .await
                .map(drop),
            ),
            (
                "StreamIsActive",
                keda.stream_is_active(pool_ref()).await.map(drop),
            ),
            (
                "StreamMetricSpec",
                keda.stream_metric_spec(pool_ref()).await.map(drop),
            ),
            // Not served by the aggregator: still judged before routing.
            (
                "NodeAgent/GetMetrics",
                node.get_metrics(pb::GetMetricsRequest::default())
                    .await
                    .map(drop),
            ),
            ("reflection v1", reflection_v1(ch.clone()).await),
            ("reflection v1alpha", reflection_v1alpha(ch.clone()).await),
        ];
        for (name, r) in calls {
            let e = r.expect_err(name);
            assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
            assert!(!secret(e.message()), "{name} leaks: {e:?}");
            refusals.push(format!("{name}: {}", e.message()));
        }
        // Health is open, and says SERVING, nothing more.
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        for service in ["", "aggregate"] {
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health is anonymous")
                .into_inner();
            assert_eq!(r.status, SERVING, "{service:?}");
        }
        let mut w = h
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health Watch is anonymous")
            .into_inner();
        let first = tokio::time::timeout(WAIT, w.message())
            .await
            .expect("a first health message")
            .expect("health message")
            .expect("one message");
        assert_eq!(first.status, SERVING);
    });
    // Plaintext to the TLS port gets nothing.
    let e = get_fleet(&rt, agg.grpc, &pki, Via::Plaintext, &[&bearer(TOKEN)]).unwrap_err();
    assert_ne!(e.code(), Code::Ok, "{e:?}");
    // The HTTP port is anonymous by design: it must not carry the census.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, body) = http_get(agg.metrics, path).expect(path);
        assert_eq!(status, 200, "{path}");
        assert!(!secret(&body), "{path} leaks the census:\n{body}");
    }
    // None of it cost a fan-out: only authenticated calls make the aggregator call the agents.
    assert_eq!(
        agg.metric("nodekeeper_aggregate_fanout_duration_seconds_count"),
        fanouts,
        "an anonymous call made the aggregator fan out"
    );
    eprintln!("refusals seen:\n{}", refusals.join("\n"));
}

async fn reflection_v1(ch: Channel) -> Result<(), Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut s = ServerReflectionClient::new(ch)
        .server_reflection_info(futures::stream::iter([req]))
        .await?
        .into_inner();
    s.message().await.map(drop)
}

async fn reflection_v1alpha(ch: Channel) -> Result<(), Status> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut s = ServerReflectionClient::new(ch)
        .server_reflection_info(futures::stream::iter([req]))
        .await?
        .into_inner();
    s.message().await.map(drop)
}

// === attacks: bearer tokens ===

/// Attack: near-miss tokens and header tricks against `--listen-token-file` (plaintext, token
/// only). Held: only the exact token (surrounding whitespace aside) under the `Bearer` scheme
/// reads GetFleet; a wrong first `authorization` header is refused even when a right one
/// follows.
#[test]
fn near_miss_tokens_and_header_tricks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(
        dir.path(),
        &os(&[&"--agents", &nobody, &"--listen-token-file", &token]),
        &[],
    );
    let fleet = |auth: &[&str]| get_fleet(&rt, agg.grpc, &pki, Via::Plaintext, auth);
    fleet(&[&bearer(TOKEN)]).expect("the token reads");
    fleet(&[&format!("bearer {TOKEN}")]).expect("the scheme is case-insensitive");

    let upper = TOKEN.to_uppercase();
    let mut flipped = TOKEN.to_string();
    flipped.replace_range(TOKEN.len() - 1.., "E");
    let basic = format!("Basic {TOKEN}");
    let refused: Vec<(&str, Vec<String>)> = vec![
        ("no header", vec![]),
        ("empty", vec![String::new()]),
        ("scheme only", vec!["Bearer".into()]),
        ("scheme and space", vec!["Bearer ".into()]),
        ("no scheme", vec![TOKEN.into()]),
        ("BEARER", vec![format!("BEARER {TOKEN}")]),
        ("Basic", vec![basic]),
        ("prefix", vec![bearer(&TOKEN[..TOKEN.len() - 1])]),
        ("one byte", vec![bearer(&TOKEN[..1])]),
        ("suffix", vec![bearer(&format!("{TOKEN}0"))]),
        ("token twice", vec![bearer(&format!("{TOKEN}{TOKEN}"))]),
        ("token, space, more", vec![bearer(&format!("{TOKEN} x"))]),
        ("case", vec![bearer(&upper)]),
        ("last byte", vec![bearer(&flipped)]),
        ("scheme without space", vec![format!("Bearer{TOKEN}")]),
        ("wrong then right", vec![bearer("guess"), bearer(TOKEN)]),
    ];
    for (what, headers) in &refused {
        let h: Vec<&str> = headers.iter().map(String::as_str).collect();
        let e = fleet(&h).expect_err(what);
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(
            !e.message().contains(TOKEN),
            "{what} echoes the token: {e:?}"
        );
    }
    // The token in any other header is no credential.
    let e = rt
        .block_on(async {
            let mut c = AggregatorClient::new(channel(agg.grpc, &pki, Via::Plaintext).await?);
            let mut req = tonic::Request::new(pb::GetFleetRequest {});
            for h in [
                "x-api-key",
                "token",
                "proxy-authorization",
                "x-forwarded-authorization",
            ] {
                req.metadata_mut().insert(h, bearer(TOKEN).parse().unwrap());
            }
            c.get_fleet(req).await
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        !agg.proc.log_text().contains(TOKEN),
        "the token reached the log"
    );
}

/// The bad things a token file can be turned into, and how.
const BAD_TOKEN_FILES: &[&str] = &[
    "emptied",
    "whitespace only",
    "8 KiB",
    "2 MiB",
    "a FIFO",
    "a directory",
    "a symlink loop",
    "a symlink to /dev/zero",
];

/// Puts the bad thing `what` where the token file `path` is (swapped in by rename where a file).
fn spoil_token_file(path: &Path, what: &str) {
    let tmp = path.with_extension("tmp");
    let swap = |content: &[u8]| {
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    };
    match what {
        "emptied" => swap(b""),
        "whitespace only" => swap(b"  \n\t \n"),
        "8 KiB" => swap(&vec![b'a'; 8 << 10]),
        "2 MiB" => swap(&vec![b'a'; 2 << 20]),
        "a FIFO" => {
            nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        "a directory" => {
            remove_token_file(path);
            std::fs::create_dir(path).unwrap();
        }
        "a symlink loop" => {
            remove_token_file(path);
            let other = path.with_extension("loop");
            let _ = std::fs::remove_file(&other);
            std::os::unix::fs::symlink(&other, path).unwrap();
            std::os::unix::fs::symlink(path, &other).unwrap();
        }
        "a symlink to /dev/zero" => {
            remove_token_file(path);
            std::os::unix::fs::symlink("/dev/zero", path).unwrap();
        }
        "removed" => remove_token_file(path),
        other => panic!("no such spoil: {other}"),
    }
}

fn remove_token_file(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// A good token file with `token`, swapped in by rename as kubelet would.
fn write_token_file(path: &Path, token: &str) {
    remove_token_file(path);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{token}\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Attack: the token file turned into each bad thing (emptied, whitespace, over 4 KiB, over the
/// 1 MiB stamp cap, FIFO, directory, symlink loop, /dev/zero, removed) under a running
/// aggregator. Held: nothing hangs (a bearer call is answered at once, health and KEDA's mTLS
/// keep working, the same process), no bad file is ever taken as a token, and a good token
/// swapped in afterwards reads without a restart and revokes the old one. Since decision
/// #19-i a bad file keeps the last good token (it used to refuse every bearer call: this test
/// asserted that until the fix), so the working token still reads while the file is bad.
#[test]
fn a_spoiled_token_file_never_hangs_never_opens_and_a_good_one_reads_again() {
    if !(require_tool("openssl") && require_tool("mkfifo")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let token = dir.path().join("token");
    write_token_file(&token, TOKEN);
    let nobody = loopback(free_port()).to_string();
    let mut agg = start_aggregator(dir.path(), &mtls_args(&volume, Some(&token), &nobody), &[]);
    let pid = agg.proc.pid();
    get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[&bearer(TOKEN)]).expect("the token reads");

    let spoils: Vec<&str> = BAD_TOKEN_FILES.iter().copied().chain(["removed"]).collect();
    for (i, what) in spoils.iter().enumerate() {
        spoil_token_file(&token, what);
        // A hang would be DEADLINE_EXCEEDED after WAIT; the last good token is kept (#19-i).
        get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[&bearer(TOKEN)])
            .unwrap_or_else(|e| panic!("{what}: the kept token: {e:?}"));
        // Nothing in the bad file is a token: not its bytes, not an empty string.
        for guess in ["", "aaaa", "a"] {
            let e = get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[&bearer(guess)]).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{what}, {guess:?}: {e:?}");
        }
        get_fleet(&rt, agg.grpc, &pki, as_keda("keda"), &[]).expect("KEDA's mTLS is unaffected");
        assert_eq!(
            health_check(&rt, agg.grpc, &pki, NO_CERT, "").expect(what),
            SERVING
        );
        assert!(
            matches!(http_get(agg.metrics, "/healthz"), Ok((200, _))),
            "{what}"
        );
        // A good token (a new one) swapped in: read at once, no restart.
        let next = format!("{TOKEN}-{i}");
        write_token_file(&token, &next);
        get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[&bearer(&next)])
            .unwrap_or_else(|e| panic!("after {what}, the new token: {e:?}"));
        let e = get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[&bearer(TOKEN)]).unwrap_err();
        assert_eq!(
            e.code(),
            Code::Unauthenticated,
            "after {what}, the old token: {e:?}"
        );
        write_token_file(&token, TOKEN);
        get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[&bearer(TOKEN)]).expect("restored");
    }
    assert!(agg.proc.alive());
    assert_eq!(agg.proc.pid(), pid);
}

/// Attack: the same bad token files, asking whether the working token is kept (the promise:
/// "a bad rotation is refused and the working set kept", which the TLS files do). Broke: every
/// bad token file drops the working token at once, so every bearer caller (GetFleet from the
/// CLI) is UNAUTHENTICATED until someone repairs the Secret; the TLS set is kept in the same
/// situation. Fail-closed may be the intended design for tokens (an emptied Secret as a
/// revocation): then the docs should say so and the promise be narrowed.
#[test]
fn adversary_a_bad_token_rotation_keeps_the_working_token() {
    if !require_tool("mkfifo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    let token = dir.path().join("token");
    write_token_file(&token, TOKEN);
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(
        dir.path(),
        &os(&[&"--agents", &nobody, &"--listen-token-file", &token]),
        &[],
    );
    get_fleet(&rt, agg.grpc, &pki, Via::Plaintext, &[&bearer(TOKEN)]).expect("the token reads");
    let mut dropped = Vec::new();
    for what in BAD_TOKEN_FILES {
        spoil_token_file(&token, what);
        if let Err(e) = get_fleet(&rt, agg.grpc, &pki, Via::Plaintext, &[&bearer(TOKEN)]) {
            dropped.push(format!("{what}: {:?} {}", e.code(), e.message()));
        }
        write_token_file(&token, TOKEN);
        get_fleet(&rt, agg.grpc, &pki, Via::Plaintext, &[&bearer(TOKEN)]).expect("restored");
    }
    assert!(
        dropped.is_empty(),
        "the working token was dropped (not kept) when its file became:\n{}",
        dropped.join("\n")
    );
}

// === attacks: client certificates ===

/// Attack: client certificates that try to pass for KEDA's (`--listen-client-names
/// keda-operator`), presented to GetFleet. Held: only a certificate of the CA whose CN or DNS
/// SAN is exactly `keda-operator` gets in (as documented: CN or DNS SAN); the name elsewhere
/// (O, OU, URI or email SAN), in another case or as a prefix is PERMISSION_DENIED; a certificate
/// of another CA (name in CN or SAN), expired, not yet valid, for server auth only, a CA
/// certificate as a leaf, one signed by a client leaf of the CA (not a CA), and the
/// aggregator's own serving certificate all fail the TLS handshake.
#[test]
fn forged_expired_and_misnamed_client_certificates_are_refused() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let ext = |extra: &str| format!("{CLIENT_EXT}{extra}");
    // Accepted: the documented names.
    signed(
        &pki,
        "san-only",
        "ca",
        "/CN=intruder",
        &ext("subjectAltName=DNS:keda-operator\n"),
    );
    signed(
        &pki,
        "no-eku",
        "ca",
        "/CN=keda-operator",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
    );
    // PERMISSION_DENIED: the CA's, but not the listed name.
    signed(
        &pki,
        "org",
        "ca",
        "/O=keda-operator/OU=keda-operator/CN=intruder",
        CLIENT_EXT,
    );
    signed(
        &pki,
        "uri-san",
        "ca",
        "/CN=intruder",
        &ext(
            "subjectAltName=URI:spiffe://cluster/ns/keda/sa/keda-operator,URI:keda-operator,email:keda-operator@x\n",
        ),
    );
    signed(&pki, "upper", "ca", "/CN=KEDA-OPERATOR", CLIENT_EXT);
    signed(&pki, "dot", "ca", "/CN=keda-operator.", CLIENT_EXT);
    signed(&pki, "longer", "ca", "/CN=keda-operator-2", CLIENT_EXT);
    signed(&pki, "prefixed", "ca", "/CN=xkeda-operator", CLIENT_EXT);
    signed(
        &pki,
        "dns-longer",
        "ca",
        "/CN=intruder",
        &ext("subjectAltName=DNS:keda-operator.evil.example\n"),
    );
    // Handshake: not the CA's, not valid now, not for client auth, not a leaf, not by a CA.
    signed(
        &pki,
        "other-cn",
        "other-ca",
        "/CN=keda-operator",
        CLIENT_EXT,
    );
    signed(
        &pki,
        "other-san",
        "other-ca",
        "/CN=intruder",
        &ext("subjectAltName=DNS:keda-operator\n"),
    );
    signed_dated(
        &pki,
        "expired",
        "ca",
        "/CN=keda-operator",
        CLIENT_EXT,
        "20200101000000Z",
        "20200201000000Z",
    );
    signed_dated(
        &pki,
        "future",
        "ca",
        "/CN=keda-operator",
        CLIENT_EXT,
        "20990101000000Z",
        "20991231000000Z",
    );
    signed(
        &pki,
        "server-eku",
        "ca",
        "/CN=keda-operator",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:keda-operator\n",
    );
    signed(
        &pki,
        "ca-leaf",
        "ca",
        "/CN=keda-operator",
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,digitalSignature\nextendedKeyUsage=clientAuth\n",
    );
    // The intruder's own leaf (CA:FALSE) signs a keda-operator certificate; the chain is sent.
    signed(&pki, "by-leaf", "intruder", "/CN=keda-operator", CLIENT_EXT);
    let chain = [pki.pem("by-leaf.crt"), pki.pem("intruder.crt")].concat();
    std::fs::write(pki.path("by-leaf-chain.crt"), chain).unwrap();
    std::fs::copy(pki.path("by-leaf.key"), pki.path("by-leaf-chain.key")).unwrap();

    let volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(dir.path(), &mtls_args(&volume, None, &nobody), &[]);
    let fleet = |who: &str| get_fleet(&rt, agg.grpc, &pki, as_keda(who), &[]);

    let mut wrong = Vec::new();
    for who in ["keda", "san-only", "no-eku"] {
        if let Err(e) = fleet(who) {
            wrong.push(format!("{who}: should read, got {e:?}"));
        }
    }
    for who in [
        "intruder",
        "org",
        "uri-san",
        "upper",
        "dot",
        "longer",
        "prefixed",
        "dns-longer",
    ] {
        match fleet(who) {
            Err(e) if e.code() == Code::PermissionDenied => {
                assert!(
                    e.message().contains("--listen-client-names"),
                    "{who}: {e:?}"
                );
            }
            other => wrong.push(format!("{who}: should be PERMISSION_DENIED, got {other:?}")),
        }
    }
    for who in [
        "other-cn",
        "other-san",
        "expired",
        "future",
        "server-eku",
        "ca-leaf",
        "by-leaf-chain",
        "aggregator",
    ] {
        let r = fleet(who);
        if !handshake_refused(&r) {
            wrong.push(format!("{who}: should fail the handshake, got {r:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The refused handshakes cost the server nothing it keeps: KEDA still reads.
    fleet("keda").expect("KEDA after the forgeries");
}

/// Attack: a credential beside another one. Held: a header is judged when sent, so a wrong
/// token is refused even with KEDA's certificate; the token with an unlisted certificate reads
/// (the token authenticates); with a certificate and no token configured, a bearer header is
/// refused naming the certificate as the way in.
#[test]
fn a_wrong_token_beside_a_good_certificate_is_refused() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let token = dir.path().join("token");
    write_token_file(&token, TOKEN);
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(dir.path(), &mtls_args(&volume, Some(&token), &nobody), &[]);
    let e = get_fleet(&rt, agg.grpc, &pki, as_keda("keda"), &[&bearer("guess")]).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    get_fleet(&rt, agg.grpc, &pki, as_keda("intruder"), &[&bearer(TOKEN)])
        .expect("the token authenticates beside an unlisted certificate");
    let e = get_fleet(&rt, agg.grpc, &pki, as_keda("intruder"), &[]).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let certs_only = start_aggregator(dir.path(), &mtls_args(&volume, None, &nobody), &[]);
    let e = get_fleet(
        &rt,
        certs_only.grpc,
        &pki,
        as_keda("keda"),
        &[&bearer(TOKEN)],
    )
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("client certificate"), "{e:?}");
}

// === attacks: flags, environment and --check-config ===

/// What is tried, the args, the environment.
type Combo<'a> = (&'a str, Vec<OsString>, Vec<(&'a str, &'a str)>);

/// Attack: `--allow-anonymous` beside a credential, by flag and by environment, and
/// `--check-config` with flags that leave the API open, closed or half-configured. Held: every
/// combination of anonymous and a credential is refused at start; an explicit `false` in the
/// environment keeps the API closed; --check-config warns when the API is open to all or closed
/// to all; a bad credential file fails naming its flag.
#[test]
fn anonymous_never_combines_with_a_credential_and_check_config_says_what_is_open() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let token = dir.path().join("token");
    write_token_file(&token, TOKEN);
    let nobody = loopback(free_port()).to_string();
    let (cert, key, ca) = (
        pki.path("aggregator.crt"),
        pki.path("aggregator.key"),
        pki.path("ca.crt"),
    );
    let tls = os(&[&"--listen-cert", &cert, &"--listen-key", &key]);
    let agents = os(&[&"--agents", &nobody]);
    let all = |extra: &[OsString]| [agents.clone(), extra.to_vec()].concat();
    let token_s = token.display().to_string();
    let ca_s = ca.display().to_string();

    // Anonymous beside a credential: never starts, whichever way it is said.
    let combos: Vec<Combo> = vec![
        (
            "flag + token flag",
            all(&os(&[&"--allow-anonymous", &"--listen-token-file", &token])),
            vec![],
        ),
        (
            "flag + CA flag",
            all(&[
                tls.clone(),
                os(&[&"--allow-anonymous", &"--listen-client-ca", &ca]),
            ]
            .concat()),
            vec![],
        ),
        (
            "env + token flag",
            all(&os(&[&"--listen-token-file", &token])),
            vec![("NODEKEEPER_AGGREGATE_ALLOW_ANONYMOUS", "true")],
        ),
        (
            "flag + token env",
            all(&os(&[&"--allow-anonymous"])),
            vec![("NODEKEEPER_AGGREGATE_LISTEN_TOKEN_FILE", token_s.as_str())],
        ),
        (
            "env + CA env",
            all(&tls),
            vec![
                ("NODEKEEPER_AGGREGATE_ALLOW_ANONYMOUS", "1"),
                ("NODEKEEPER_AGGREGATE_LISTEN_CLIENT_CA", ca_s.as_str()),
            ],
        ),
    ];
    for (what, args, envs) in &combos {
        for check in [false, true] {
            let mut a = args.clone();
            if check {
                a.push("--check-config".into());
            }
            let o = run_to_exit(&a, envs);
            assert!(
                !o.status.success(),
                "{what} (check-config {check}) started: {}",
                text(&o)
            );
            assert!(
                text(&o).contains("--allow-anonymous"),
                "{what}: {}",
                text(&o)
            );
        }
    }

    // An explicit false in the environment: closed, and said so.
    let o = run_to_exit(
        &all(&os(&[&"--check-config"])),
        &[("NODEKEEPER_AGGREGATE_ALLOW_ANONYMOUS", "false")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("allowAnonymous: false") && out.contains("# WARNING: no credential"),
        "{out}"
    );
    let closed = start_aggregator(
        dir.path(),
        &agents,
        &[("NODEKEEPER_AGGREGATE_ALLOW_ANONYMOUS", "false")],
    );
    let e = get_fleet(&rt, closed.grpc, &pki, Via::Plaintext, &[]).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        closed.metric("nodekeeper_aggregate_api_anonymous"),
        Some(0.0)
    );

    // TLS but no credential: closed to all, and --check-config warns.
    let o = run_to_exit(&all(&[tls.clone(), os(&[&"--check-config"])].concat()), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("# WARNING: no credential"),
        "{}",
        text(&o)
    );
    // TLS and anonymous: open to all, and --check-config warns.
    let o = run_to_exit(
        &all(&[tls.clone(), os(&[&"--allow-anonymous", &"--check-config"])].concat()),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("# WARNING: --allow-anonymous"),
        "{}",
        text(&o)
    );
    // A token without TLS: said to travel in clear text.
    let o = run_to_exit(
        &all(&os(&[&"--listen-token-file", &token, &"--check-config"])),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("clear text"), "{}", text(&o));

    // Bad credential files: the start fails naming the flag.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let bad: Vec<(&str, Vec<OsString>)> = vec![
        (
            "--listen-token-file",
            all(&os(&[&"--listen-token-file", &empty])),
        ),
        (
            "--listen-client-ca",
            all(&[tls.clone(), os(&[&"--listen-client-ca", &empty])].concat()),
        ),
        (
            "--listen-key",
            all(&os(&[
                &"--listen-cert",
                &cert,
                &"--listen-key",
                &pki.path("keda.key"),
            ])),
        ),
        (
            "--listen-client-names",
            all(&[
                tls.clone(),
                os(&[
                    &"--listen-client-ca",
                    &ca,
                    &"--listen-client-names",
                    &"keda-operator,",
                ]),
            ]
            .concat()),
        ),
    ];
    for (flag, args) in &bad {
        for check in [false, true] {
            let mut a = args.clone();
            if check {
                a.push("--check-config".into());
            }
            let o = run_to_exit(&a, &[]);
            assert_eq!(o.status.code(), Some(64), "{flag}: {}", text(&o));
            assert!(text(&o).contains(flag), "{flag}: {}", text(&o));
        }
    }
    // An empty client-name list from the environment is refused, not read as "any name".
    let o = run_to_exit(
        &all(&[
            tls.clone(),
            os(&[&"--listen-client-ca", &ca, &"--check-config"]),
        ]
        .concat()),
        &[("NODEKEEPER_AGGREGATE_LISTEN_CLIENT_NAMES", "")],
    );
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("--listen-client-names"), "{}", text(&o));
}

// === attacks: floods without a credential ===

/// Attack: a thousand TCP connections to the TLS port from one address that never send a byte.
/// Held: the connections over the per-address cap are closed at once, so the aggregator's file
/// descriptors stay bounded, and KEDA from another address is served throughout.
#[test]
fn a_connection_flood_without_credentials_stays_within_the_fd_bound() {
    if !require_tool("openssl") {
        return;
    }
    raise_open_files_limit();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(dir.path(), &mtls_args(&volume, None, &nobody), &[]);
    let baseline = agg.fds();
    let mut flood = Vec::new();
    let mut most = baseline;
    for _ in 0..1000 {
        if let Ok(s) = std::net::TcpStream::connect(agg.grpc) {
            flood.push(s);
        }
        most = most.max(agg.fds());
    }
    // Let the accept loop catch up with the backlog, then look again.
    let settled = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settled {
        most = most.max(agg.fds());
        std::thread::sleep(Duration::from_millis(20));
    }
    let bound = baseline + nodekeeper::api::MAX_CONNECTIONS_PER_PEER + 8;
    assert!(
        most <= bound,
        "{} connections from one address: the aggregator held {most} fds (baseline {baseline}, bound {bound})",
        flood.len()
    );
    // KEDA from another address gets through meanwhile.
    rt.block_on(async {
        let ch = channel_from(agg.grpc, &pki, as_keda("keda"), Some([127, 0, 0, 2].into()))
            .await
            .expect("KEDA connects from another address");
        AggregatorClient::new(ch)
            .get_fleet(pb::GetFleetRequest {})
            .await
            .expect("KEDA reads during the flood");
    });
    drop(flood);
}

/// Attack: slowloris TLS handshakes, 16 connections from one address (its whole share) each
/// sending the first bytes of a ClientHello and then nothing. Held: a client from another
/// address is served at once (handshakes run on their own tasks), and the server closes every
/// stalled handshake within its handshake timeout, so the address gets its share back.
#[test]
fn slowloris_tls_handshakes_are_closed_and_never_block_other_callers() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(dir.path(), &mtls_args(&volume, None, &nobody), &[]);
    let mut stalled: Vec<std::net::TcpStream> = (0..nodekeeper::api::MAX_CONNECTIONS_PER_PEER)
        .map(|_| {
            use std::io::Write as _;
            let mut s = std::net::TcpStream::connect(agg.grpc).expect("connect");
            // A TLS handshake record header announcing 512 bytes, then two of them.
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                .unwrap();
            s
        })
        .collect();
    // Served one handshake after another, KEDA would wait 16 x 10 s, past WAIT.
    rt.block_on(async {
        let ch = channel_from(agg.grpc, &pki, as_keda("keda"), Some([127, 0, 0, 2].into()))
            .await
            .expect("KEDA connects while handshakes stall");
        AggregatorClient::new(ch)
            .get_fleet(pb::GetFleetRequest {})
            .await
            .expect("KEDA reads while handshakes stall");
    });
    for (i, s) in stalled.iter_mut().enumerate() {
        use std::io::Read as _;
        let deadline = std::time::Instant::now() + WAIT;
        let mut buf = [0u8; 64];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match s.read(&mut buf) {
                // Closed (an alert may come first: read until the end).
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                // A read with SO_RCVTIMEO is not restarted after a signal handler (signal(7)):
                // in the one test binary, other tests' child processes end with SIGCHLD, which
                // tokio's process reaper handles. Ask again until the deadline.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted && !left.is_zero() => {}
                Err(e) => panic!("stalled handshake {i} still open after {WAIT:?}: {e}"),
            }
        }
    }
    // The address has its share back.
    get_fleet(&rt, agg.grpc, &pki, as_keda("keda"), &[]).expect("the same address again");
}

/// Attack: grpc.health.v1 Watch is anonymous by design; open hundreds of Watch streams from one
/// address without any credential. The agents bound these streams (api.maxWatchStreams, 64 in
/// all and half per address, RESOURCE_EXHAUSTED past it: issue #15) and cap HTTP/2 streams per
/// connection at 64. Broke: the aggregator serves health with no stream budget and no
/// per-connection stream cap (its router sets neither max_concurrent_streams nor the agents'
/// HTTP/2 limits), so every anonymous Watch stays open and its memory grows with them.
#[test]
fn adversary_anonymous_health_watch_streams_are_bounded_on_the_aggregator() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nobody = loopback(free_port()).to_string();
    // The default: no credential configured at all (health is anonymous whatever is set).
    let agg = start_aggregator(dir.path(), &os(&[&"--agents", &nobody]), &[]);
    let rss_before = agg.rss_kib();
    const CONNECTIONS: usize = 8;
    const PER_CONNECTION: usize = 100;
    let (open, refused, other, why) = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let ch = Endpoint::from_shared(format!("http://{}", agg.grpc))
                .unwrap()
                .connect()
                .await
                .expect("connect");
            for _ in 0..PER_CONNECTION {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
                tasks.push(tokio::spawn(async move {
                    let r = h
                        .watch(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        })
                        .await;
                    match r {
                        Ok(s) => {
                            let mut s = s.into_inner();
                            match s.message().await {
                                Ok(Some(_)) => Ok(s),
                                Ok(None) => Err(Status::ok("ended")),
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    }
                }));
            }
        }
        let (mut open, mut refused, mut other) = (Vec::new(), 0usize, Vec::new());
        let mut why = None;
        for t in tasks {
            match tokio::time::timeout(WAIT, t).await {
                Ok(Ok(Ok(s))) => open.push(s),
                Ok(Ok(Err(e))) if e.code() == Code::ResourceExhausted => {
                    refused += 1;
                    why.get_or_insert(e.message().to_string());
                }
                Ok(Ok(Err(e))) => other.push(format!("{e:?}")),
                Ok(Err(e)) => other.push(format!("task: {e}")),
                Err(_) => other.push("no first message".into()),
            }
        }
        (open, refused, other, why)
    });
    let rss_after = agg.rss_kib();
    eprintln!(
        "{} anonymous Watch streams open, {refused} refused, {} other; RSS {rss_before} KiB -> {rss_after} KiB",
        open.len(),
        other.len()
    );
    assert!(other.len() < 10, "unexpected answers: {other:?}");
    // The agents' bound from one address: half of api.maxWatchStreams (64).
    assert!(
        open.len() <= 32 && refused > 0,
        "{} anonymous health Watch streams held open from one address ({} requested; {refused} \
         refused during the burst: {why:?}); the aggregator's RSS went {rss_before} KiB -> \
         {rss_after} KiB",
        open.len(),
        CONNECTIONS * PER_CONNECTION
    );
    drop(open);
}

/// Attack: callers without any credential take every connection slot and keep it: 16 source
/// addresses x 16 TLS connections (the caps: 16 per address, 256 in all), each making one
/// refused call and then idling. Broke: a connection that finished its TLS handshake is never
/// closed for having no credential (no idle or unauthenticated deadline, no HTTP/2 keepalive on
/// the aggregator), so KEDA, with a valid certificate from another address, cannot connect for
/// as long as the anonymous connections stay.
#[test]
fn adversary_anonymous_connections_cannot_lock_keda_out() {
    if !require_tool("openssl") {
        return;
    }
    raise_open_files_limit();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(dir.path(), &mtls_args(&volume, None, &nobody), &[]);
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for a in 1..=16u8 {
            for _ in 0..nodekeeper::api::MAX_CONNECTIONS_PER_PEER {
                let local: IpAddr = [127, 0, 1, a].into();
                let Ok(ch) = channel_from(agg.grpc, &pki, NO_CERT, Some(local)).await else {
                    continue;
                };
                let mut c = AggregatorClient::new(ch.clone());
                if let Err(e) = c.get_fleet(pb::GetFleetRequest {}).await
                    && e.code() == Code::Unauthenticated
                {
                    held.push(ch);
                }
            }
        }
        held
    });
    eprintln!(
        "{} anonymous connections refused a call and stay open",
        held.len()
    );
    // Since the fix (#19-i) connections without a certificate get half the slots
    // (MAX_UNCERTIFIED_CONNECTIONS): the flood takes all of those, not 200 (this asserted
    // `>= 200` when the flood could take every slot).
    assert!(
        held.len() >= nodekeeper::api::MAX_UNCERTIFIED_CONNECTIONS,
        "the flood did not take the slots open to it: {}",
        held.len()
    );
    // KEDA, from its own address, with a valid certificate: polled past every server timeout.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = rt.block_on(async {
            let ch =
                channel_from(agg.grpc, &pki, as_keda("keda"), Some([127, 0, 0, 1].into())).await?;
            AggregatorClient::new(ch)
                .get_fleet(pb::GetFleetRequest {})
                .await
                .map(drop)
        });
        let Err(e) = r else { break };
        assert!(
            Instant::now() < deadline,
            "KEDA locked out for {WAIT:?} by {} anonymous connections: {e:?}",
            held.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(held);
}

// === attacks: rotation races ===

/// Attack: the serving certificate's Secret swapped back and forth as fast as the filesystem
/// allows while KEDA and a token caller open new connections (each handshake racing a swap, the
/// files read mid-swap). Held: every call through a new connection succeeds (a half-swapped
/// set is refused and the working one kept), no credential check is skipped (a caller without a
/// credential stays refused during the race), and once the swaps stop the last set is served
/// with no refusal left.
#[test]
fn certificate_swaps_racing_handshakes_never_fail_a_caller_or_open_the_api() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    let volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let token = dir.path().join("token");
    write_token_file(&token, TOKEN);
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(dir.path(), &mtls_args(&volume, Some(&token), &nobody), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let one = server_files(&pki, "aggregator");
    let two = server_files(&pki, "aggregator-next");
    let swapper = {
        let (stop, swaps) = (stop.clone(), swaps.clone());
        let mut volume = volume;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = swaps.fetch_add(1, Ordering::Relaxed);
                volume.update(if n % 2 == 0 { &two } else { &one });
            }
            // End on the second set.
            volume.update(&two);
            volume
        })
    };
    let mut failures = Vec::new();
    for i in 0..120 {
        let r = if i % 3 == 0 {
            get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[&bearer(TOKEN)])
        } else {
            get_fleet(&rt, agg.grpc, &pki, as_keda("keda"), &[])
        };
        if let Err(e) = r {
            failures.push(format!("call {i}: {e:?}"));
        }
        if i % 10 == 0 {
            let e = get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[]);
            assert!(
                matches!(&e, Err(e) if e.code() == Code::Unauthenticated),
                "an anonymous call during the race: {e:?}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _volume = swapper.join().expect("swapper");
    eprintln!(
        "{} swaps raced 120 handshakes; failures: {}",
        swaps.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let deadline = Instant::now() + WAIT;
    while !(served_subject(agg.grpc).contains("nodekeeper aggregator two")
        && agg.metric("nodekeeper_api_tls_files_refused") == Some(0.0))
    {
        assert!(
            Instant::now() < deadline,
            "after the race: served {:?}, refused {:?}",
            served_subject(agg.grpc),
            agg.metric("nodekeeper_api_tls_files_refused")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    get_fleet(&rt, agg.grpc, &pki, as_keda("keda"), &[]).expect("KEDA after the race");
}

// === attacks: a rogue agent ===

/// Attack: a rogue node agent (any process answering on an endpoint of the agents' Service, or
/// an agent on a compromised node) reports, besides its node's own pods, a pod the pod watch
/// places on another node and a pod that exists nowhere, both labelled as the web pool, and
/// names itself after the other node. The honest agent on node-a reports web-1's 4 connections.
/// Was broken: the aggregator summed whatever each agent reported (selecting by the
/// agent-reported namespace and labels) and took the agent's self-reported node name over its
/// EndpointSlice's: KEDA was handed 4 + 50 + 100 instead of 4. Fixed (#19-j): an agent's node
/// is its EndpointSlice's, and a pod counts only if the pod watch places it on that node, with
/// the pod watch's namespace and labels; the others are refused, listed in GetFleet and
/// counted in nodekeeper_aggregate_foreign_pods_total.
#[test]
fn adversary_a_rogue_agent_cannot_count_another_nodes_pods() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    for node in ["node-a", "node-b"] {
        api.add_node(node, &[]);
    }
    // The censuses carry the API's UIDs, as real agents read them from the kubelet's cgroups
    // (a census entry with a UID matches only that UID, decision #18-j).
    let uid_of = |pod: serde_json::Value| pod["metadata"]["uid"].as_str().unwrap().to_string();
    let web_1 = uid_of(
        api.add_pod(
            PodSeed::new("web-1")
                .namespace("shop")
                .node("node-a")
                .label("app", "web"),
        ),
    );
    let api_1 = uid_of(
        api.add_pod(
            PodSeed::new("api-1")
                .namespace("shop")
                .node("node-b")
                .label("app", "api"),
        ),
    );
    let with_uid = |mut pod: pb::PodConnections, uid: &str| {
        pod.uid = uid.to_string();
        pod
    };
    let honest = start_fake_agent(
        &rt,
        "node-a",
        vec![with_uid(
            census_pod("shop", "web-1", &[("app", "web")], 4),
            &web_1,
        )],
    );
    let rogue = start_fake_agent(
        &rt,
        "node-a",
        vec![
            with_uid(census_pod("shop", "api-1", &[("app", "api")], 1), &api_1),
            with_uid(census_pod("shop", "web-1", &[("app", "web")], 50), &web_1),
            census_pod("shop", "web-ghost", &[("app", "web")], 100),
        ],
    );
    for (node, addr) in [("node-a", honest), ("node-b", rogue)] {
        api.add_endpoint_slice(
            "nodekeeper-system",
            "nodekeeper",
            &[("grpc", addr.port())],
            &[EndpointSeed::new("127.0.0.1")
                .node(node)
                .pod(&format!("nodekeeper-{node}"))],
        );
    }
    let kubeconfig_env = kubeconfig.display().to_string();
    let agg = start_aggregator(
        dir.path(),
        &os(&[
            &"--service",
            &"nodekeeper-system/nodekeeper",
            &"--allow-anonymous",
        ]),
        &[("KUBECONFIG", &kubeconfig_env)],
    );
    // Until both agents answered and the pod watch synced.
    let deadline = Instant::now() + WAIT;
    let fleet = loop {
        let r = get_fleet(&rt, agg.grpc, &pki, Via::Plaintext, &[]);
        // A ghost pod with the query's labels makes the query UNAVAILABLE (#18-l): wait for the
        // answer that names it (the pod watch synced), never a sum.
        if let Ok(f) = &r
            && f.answered == 2
            && keda_pool_value(&rt, agg.grpc, &pki, Via::Plaintext)
                .is_err_and(|s| s.message().contains("web-ghost"))
        {
            break f.clone();
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {r:?}\n{}",
            agg.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The rogue agent cannot add anything: web-1 is the API's pod on node-a, web-ghost is
    // unknown; since #18-l an unknown pod with the selected labels makes the query UNAVAILABLE
    // (the safe side: KEDA keeps its replicas or applies its fallback), never a larger sum.
    let answer = keda_pool_value(&rt, agg.grpc, &pki, Via::Plaintext);
    let value = match &answer {
        Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("web-ghost") => 4.0,
        other => panic!("KEDA got {other:?}, not UNAVAILABLE naming web-ghost"),
    };
    let rogue_node = fleet
        .agents
        .iter()
        .find(|a| a.address == rogue.to_string())
        .map(|a| a.node_name.clone());
    assert!(
        value == 4.0 && rogue_node.as_deref() == Some("node-b"),
        "KEDA got {value} for the web pool (web-1 on node-a has 4 connections); the rogue agent \
         of node-b is listed as node {rogue_node:?}"
    );
    let refused = &fleet
        .agents
        .iter()
        .find(|a| a.address == rogue.to_string())
        .expect("the rogue agent")
        .refused_pods;
    assert!(
        refused.len() == 2
            && refused
                .iter()
                .any(|r| r.starts_with("shop/web-1 ") && r.contains("node-a"))
            && refused.iter().any(|r| r.starts_with("shop/web-ghost ")),
        "GetFleet lists the rogue agent's refused pods: {refused:?}"
    );
    let (_, body) = http_get(agg.metrics, "/metrics").expect("GET /metrics");
    for reason in ["other_node", "unknown"] {
        assert_eq!(
            sample(
                &body,
                "nodekeeper_aggregate_foreign_pods_total",
                &[("reason", reason)]
            ),
            Some(1.0),
            "{reason}:\n{body}"
        );
    }
    let log = agg.proc.log_text();
    assert!(
        log.contains("web-ghost") && log.contains(&rogue.to_string()),
        "a warning names the agent and the pod:\n{log}"
    );
}

// === attacks: the shipped Deployment ===

/// The value after `flag` in the aggregator Deployment's args (manifests/base/aggregator.yaml).
fn shipped_arg(flag: &str) -> Option<String> {
    let yaml = std::fs::read_to_string(
        nodekeeper_tests::workspace_root().join("manifests/base/aggregator.yaml"),
    )
    .expect("read aggregator.yaml");
    let args: Vec<&str> = yaml
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("- "))
        .collect();
    let i = args.iter().position(|a| *a == flag)?;
    args.get(i + 1).map(|a| a.to_string())
}

/// Attack: sniff the node network. The promise: the aggregator reads the agents over TLS with
/// its own credential. Broke in the shipped Deployment: it dials every agent in plaintext
/// (no `--cacert`/`--server-name`) sending the shared read token (no `--cert`), and the same
/// token file is its own `--listen-token-file`: whoever captures one fan-out on the pod network
/// reads every agent and the aggregator's GetFleet and KEDA census. Decision #19-f accepted
/// cleartext because "the base cannot assume an issuer"; since #19-g the Deployment needs the
/// CA Secret nodekeeper-aggregator-tls anyway.
#[test]
fn adversary_the_shipped_aggregator_reads_agents_over_tls_with_its_own_credential() {
    let dialled_with_tls = shipped_arg("--cacert").is_some();
    let own_certificate = shipped_arg("--cert").is_some();
    let shared = shipped_arg("--token-file").is_some()
        && shipped_arg("--token-file") == shipped_arg("--listen-token-file");
    assert!(
        dialled_with_tls && own_certificate && !shared,
        "manifests/base/aggregator.yaml: agents dialled over TLS: {dialled_with_tls}; its own \
         client certificate: {own_certificate}; the token it sends in every fan-out is also \
         its own API's token: {shared} ({:?})",
        shipped_arg("--token-file")
    );
}

/// Attack: the client CA rotated away from under KEDA's certificate (a compromised CA replaced
/// by a new one). Held: new connections are verified against the new CA at once (the old CA's
/// certificate fails the handshake, the new CA's is accepted, no restart); a connection opened
/// before keeps its session, as documented ("KEDA keeps an open connection (and its session)
/// until it reconnects").
#[test]
fn a_rotated_client_ca_refuses_the_old_cas_certificates_on_new_connections() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    pki.client("keda-new-ca", "other-ca", KEDA);
    let mut volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let nobody = loopback(free_port()).to_string();
    let agg = start_aggregator(dir.path(), &mtls_args(&volume, None, &nobody), &[]);
    let kept = rt.block_on(async {
        let ch = channel(agg.grpc, &pki, as_keda("keda"))
            .await
            .expect("KEDA connects");
        let mut c = AggregatorClient::new(ch);
        c.get_fleet(pb::GetFleetRequest {})
            .await
            .expect("KEDA reads");
        c
    });
    assert!(handshake_refused(&get_fleet(
        &rt,
        agg.grpc,
        &pki,
        as_keda("keda-new-ca"),
        &[]
    )));

    // The Secret now carries the new CA (the serving certificate unchanged).
    let mut files = server_files(&pki, "aggregator");
    files[0] = ("ca.crt", pki.pem("other-ca.crt"));
    volume.update(&files);
    let deadline = Instant::now() + WAIT;
    while get_fleet(&rt, agg.grpc, &pki, as_keda("keda-new-ca"), &[]).is_err() {
        assert!(
            Instant::now() < deadline,
            "the new CA was never used: {}",
            agg.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = get_fleet(&rt, agg.grpc, &pki, as_keda("keda"), &[]);
    assert!(
        handshake_refused(&r),
        "the old CA's certificate on a new connection: {r:?}"
    );
    assert_eq!(agg.metric("nodekeeper_api_tls_files_refused"), Some(0.0));
    // Documented: the connection opened before keeps its session.
    let mut kept = kept;
    rt.block_on(kept.get_fleet(pb::GetFleetRequest {}))
        .expect("the open connection keeps its session (documented)");
}

// === attacks: a revoked credential's open stream ===

/// Attack: open KEDA's StreamIsActive with the bearer token, then rotate the token away (the
/// Secret updated: the old token is refused on every new call) and let the census change.
/// Broke: the stream opened with the revoked token keeps delivering the census' answers, for
/// as long as its holder keeps it open; the credential is checked only when a call starts.
#[test]
fn adversary_a_stream_opened_with_a_revoked_token_stops_answering() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    let census = Arc::new(std::sync::Mutex::new(pb::MetricsSnapshot {
        node_name: "node-a".into(),
        connections: vec![census_pod("shop", "web-1", &[("app", "web")], 4)],
        ..Default::default()
    }));
    let agent = start_shared_fake_agent(&rt, census.clone());
    let token = dir.path().join("token");
    write_token_file(&token, TOKEN);
    let agg = start_aggregator(
        dir.path(),
        &os(&[
            &"--agents",
            &agent.to_string(),
            &"--listen-token-file",
            &token,
        ]),
        &[],
    );
    let mut stream = rt.block_on(async {
        let mut c = ExternalScalerClient::new(
            channel(agg.grpc, &pki, Via::Plaintext)
                .await
                .expect("connect"),
        );
        let mut s = c
            .stream_is_active(with_auth(pool_ref(), &[&bearer(TOKEN)]))
            .await
            .expect("the token opens the stream")
            .into_inner();
        let first = tokio::time::timeout(WAIT, s.message())
            .await
            .expect("a first answer")
            .expect("an answer")
            .expect("one message");
        assert!(first.result, "4 connections: active");
        s
    });
    // The token is rotated away: refused on every new call from now on.
    write_token_file(&token, &format!("{TOKEN}-next"));
    let e = get_fleet(&rt, agg.grpc, &pki, Via::Plaintext, &[&bearer(TOKEN)]).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The census changes (the pool drains): does the revoked stream still learn it?
    census.lock().unwrap().connections = vec![census_pod("shop", "web-1", &[("app", "web")], 0)];
    let next = rt.block_on(async { tokio::time::timeout(WAIT, stream.message()).await });
    // Ended, refused, or silent: nothing more reaches the revoked holder.
    if let Ok(Ok(Some(answer))) = next {
        panic!(
            "the stream opened with the revoked token answered again: {answer:?} (the census \
             changed after the token was rotated away)"
        );
    }
}

/// The aggregator Deployment's container args, as shipped (manifests/base/aggregator.yaml).
fn shipped_args() -> Vec<String> {
    let yaml = std::fs::read_to_string(
        nodekeeper_tests::workspace_root().join("manifests/base/aggregator.yaml"),
    )
    .expect("read aggregator.yaml");
    let mut lines = yaml
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "args:")
        .skip(1)
        .filter(|l| !l.starts_with('#'));
    let mut args = Vec::new();
    while let Some(a) = lines.next().and_then(|l| l.strip_prefix("- ")) {
        args.push(a.to_string());
    }
    assert_eq!(
        args.first().map(String::as_str),
        Some("aggregate"),
        "{args:?}"
    );
    args
}

/// Attack: be an agent endpoint (a pod that joined the agents' Service, or anyone on the path
/// of a fan-out) and use what the aggregator sends. The aggregator runs with the shipped
/// Deployment's args (its Secrets laid out as files; the rogue endpoint as its only agent).
/// Broke: the aggregator dials the endpoint in plaintext and hands it the read token, and the
/// same token reads the aggregator's GetFleet: one fan-out gives an endpoint the fleet's census
/// and every agent's reads.
#[test]
fn adversary_a_rogue_endpoint_gets_no_credential_for_the_aggregator() {
    if !require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = base_pki();
    pki.client("aggregator-client", "ca", "nodekeeper-aggregator");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rogue = start_recording_fake_agent(&rt, Arc::default(), seen.clone());
    // The shipped args, with the rogue endpoint for the Service and files for the Secrets.
    let root = tempfile::tempdir().unwrap();
    let shipped = shipped_args();
    let mut args: Vec<OsString> = Vec::new();
    let mut i = 1;
    while i < shipped.len() {
        let (flag, value) = (shipped[i].as_str(), shipped.get(i + 1).map(String::as_str));
        match (flag, value) {
            ("--service", Some(_)) => args.extend(os(&[&"--agents", &rogue.to_string()])),
            ("--port-name", Some(_)) => {}
            (flag, Some(path)) if path.starts_with('/') => {
                let file = root.path().join(path.trim_start_matches('/'));
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                let content = match flag {
                    "--token-file" | "--listen-token-file" => format!("{TOKEN}\n").into_bytes(),
                    "--listen-cert" => pki.pem("aggregator.crt"),
                    "--listen-key" => pki.pem("aggregator.key"),
                    "--listen-client-ca" | "--cacert" => pki.pem("ca.crt"),
                    "--cert" => pki.pem("aggregator-client.crt"),
                    "--key" => pki.pem("aggregator-client.key"),
                    other => panic!("a shipped file flag this test does not know: {other}"),
                };
                std::fs::write(&file, content).unwrap();
                args.extend(os(&[&flag, &file]));
            }
            (flag, Some(v)) if !v.starts_with("--") => args.extend(os(&[&flag, &v])),
            (flag, _) => {
                args.push(flag.into());
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    let agg = start_aggregator(dir.path(), &args, &[]);
    // KEDA asks; the aggregator fans out to its agents: the rogue endpoint.
    let _ = get_fleet(&rt, agg.grpc, &pki, as_keda("keda"), &[]).expect("KEDA reads");
    let captured = seen.lock().unwrap().clone();
    let mut opened = Vec::new();
    for header in &captured {
        if let Ok(f) = get_fleet(&rt, agg.grpc, &pki, NO_CERT, &[header]) {
            opened.push(format!("{} agents", f.expected));
        }
    }
    assert!(
        opened.is_empty(),
        "the rogue endpoint was sent {} authorization header(s) in clear text, and with them \
         read the aggregator's GetFleet ({opened:?}); shipped args: {shipped:?}",
        captured.len()
    );
}
