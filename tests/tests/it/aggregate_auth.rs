//! The aggregator's own API trusts nobody by default (issue #19): GetFleet and KEDA's scaler
//! hand out the census the aggregator read from the agents, so without a credential configured
//! they refuse every caller, and opening them takes `--allow-anonymous` (said in the log, a
//! metric and `--check-config`); health stays anonymous. With TLS and a client CA, KEDA's way
//! in is mTLS: the Python grpcio client of tests/py/keda_check.py, generated from upstream
//! externalscaler.proto and set up as KEDA's TriggerAuthentication sets it up (caCert,
//! tlsClientCert, tlsClientKey), gets the fleet's sums; a caller without a certificate, with
//! the right name from another CA, or with a certificate whose name is not listed is refused.
//! The bearer token reads GetFleet. The aggregator's certificate, rotated through a Secret
//! volume updated as kubelet does it, is served to new connections without a restart; a pair
//! that does not go together is refused and the working one kept; a token rewritten in place
//! with the same length and its old mtime is re-read.

use crate::support::aggregate::{
    AGGREGATOR_NAME, KEDA, SERVING, TOKEN, Via, WAIT, bearer, get_fleet, health_check, keda_call,
    os, pool_query, served_subject, server_files, start_aggregator,
};
use crate::support::census_pods;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use census_pods::{cases, run_keda_check_with, start_pods, wait_for_pool};
use nodekeeper::keda_pb::{self};
use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::pki::{Pki, SecretVolume};
use nodekeeper_tests::{
    Agent, agent_bin, free_port, loopback, require_python_modules, require_root, require_tool,
};
use tonic::Code;

/// KEDA's GetMetrics of the web pool through `via`.
fn keda_get_metrics(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    pki: &Pki,
    via: Via<'_>,
) -> Result<keda_pb::GetMetricsResponse, tonic::Status> {
    keda_call(rt, addr, pki, via, pool_query(&[]))
}

#[test]
fn the_aggregators_api_refuses_callers_without_credentials_unless_anonymous_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    let nobody = loopback(free_port()).to_string();

    // Default: no credential configured, so nobody is answered but health.
    let closed = start_aggregator(dir.path(), &os(&[&"--agents", &nobody]), &[]);
    let e = get_fleet(&rt, closed.grpc, &pki, Via::Plaintext, &[]).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("not configured on this aggregator")
            && e.message().contains("--listen-client-ca")
            && e.message().contains("--allow-anonymous"),
        "the refusal says what to set: {e:?}"
    );
    let e = keda_get_metrics(&rt, closed.grpc, &pki, Via::Plaintext).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        health_check(&rt, closed.grpc, &pki, Via::Plaintext, "")
            .expect("an anonymous health check is answered"),
        SERVING
    );
    assert_eq!(
        closed.metric("nodekeeper_aggregate_api_anonymous"),
        Some(0.0)
    );
    let log = closed.proc.log_text();
    assert!(
        log.contains("no credential is configured for the aggregator's API"),
        "{log}"
    );

    // Opened on purpose: answered, and said loudly.
    let open = start_aggregator(
        dir.path(),
        &os(&[&"--agents", &nobody, &"--allow-anonymous"]),
        &[],
    );
    let fleet = get_fleet(&rt, open.grpc, &pki, Via::Plaintext, &[]).expect("opened");
    assert_eq!(fleet.expected, 1, "{fleet:?}");
    assert_eq!(open.metric("nodekeeper_aggregate_api_anonymous"), Some(1.0));
    let log = open.proc.log_text();
    assert!(
        log.contains("WARN") && log.contains("--allow-anonymous: GetFleet, KEDA's scaler"),
        "{log}"
    );

    // --check-config says the same without serving.
    let out = Command::new(agent_bin())
        .args(["aggregate", "--agents", &nobody, "--allow-anonymous"])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--check-config")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("allowAnonymous: true") && stdout.contains("# WARNING: --allow-anonymous"),
        "{stdout}"
    );
}

#[test]
fn keda_reaches_the_aggregator_over_mtls_and_callers_without_its_credential_are_refused_as_root() {
    if !(require_root()
        && require_tool("openssl")
        && require_python_modules(&["grpc", "grpc_tools"]))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    pki.ca("ca").ca("other-ca");
    let san = format!("DNS:{AGGREGATOR_NAME}");
    pki.server("aggregator", "ca", "nodekeeper aggregator one", &san)
        .server("aggregator-next", "ca", "nodekeeper aggregator two", &san)
        .client("keda", "ca", KEDA)
        .client("keda-forged", "other-ca", KEDA)
        .client("intruder", "ca", "intruder");

    // One node's agent with the census pods of tests/keda.rs.
    let api = FakeApi::start();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.add_node("node-a", &[]);
    let cgroup = dir.path().join("cgroup");
    let _pods = start_pods(&api, &cgroup, dir.path(), "node-a");
    let agent = Agent::builder()
        .connected(&kubeconfig, "node-a")
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    wait_for_pool(&agent.api.to_string(), 10.0);

    let mut volume = SecretVolume::new(&server_files(&pki, "aggregator"));
    let token = dir.path().join("fleet-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let agg = start_aggregator(
        dir.path(),
        &os(&[
            &"--agents",
            &agent.api.to_string(),
            &"--listen-cert",
            &volume.path("tls.crt"),
            &"--listen-key",
            &volume.path("tls.key"),
            &"--listen-client-ca",
            &volume.path("ca.crt"),
            &"--listen-client-names",
            &KEDA,
            &"--listen-token-file",
            &token,
        ]),
        &[],
    );
    let keda = Via::Tls {
        ca: "ca",
        identity: Some("keda"),
    };

    // KEDA's certificate: the fleet's sums.
    let m = keda_get_metrics(&rt, agg.grpc, &pki, keda).expect("KEDA over mTLS");
    assert_eq!(m.metric_values[0].metric_value_float, 10.0, "{m:?}");
    // The token reads GetFleet (the CLI's way); a wrong one does not.
    let fleet = get_fleet(
        &rt,
        agg.grpc,
        &pki,
        Via::Tls {
            ca: "ca",
            identity: None,
        },
        &[&bearer(TOKEN)],
    )
    .expect("GetFleet with the token");
    assert_eq!((fleet.expected, fleet.answered), (1, 1), "{fleet:?}");

    // Refused: no credential (GetFleet and KEDA), a wrong token, plaintext, the right name
    // from another CA, a name of the right CA that is not listed.
    let no_cert = Via::Tls {
        ca: "ca",
        identity: None,
    };
    let e = get_fleet(&rt, agg.grpc, &pki, no_cert, &[]).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = keda_get_metrics(&rt, agg.grpc, &pki, no_cert).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = get_fleet(
        &rt,
        agg.grpc,
        &pki,
        no_cert,
        &[&bearer("fleet-reader-guess")],
    )
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = keda_get_metrics(&rt, agg.grpc, &pki, Via::Plaintext).unwrap_err();
    assert!(
        !matches!(e.code(), Code::Ok | Code::PermissionDenied),
        "plaintext: {e:?}"
    );
    let forged = Via::Tls {
        ca: "ca",
        identity: Some("keda-forged"),
    };
    let e = keda_get_metrics(&rt, agg.grpc, &pki, forged).unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "a certificate of another CA must fail the handshake: {e:?}"
    );
    let intruder = Via::Tls {
        ca: "ca",
        identity: Some("intruder"),
    };
    let e = keda_get_metrics(&rt, agg.grpc, &pki, intruder).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("--listen-client-names"), "{e:?}");

    // KEDA's side of the wire: the grpcio client generated from upstream externalscaler.proto,
    // with the CA and client certificate KEDA's TriggerAuthentication gives it.
    let keda_tls = os(&[
        &"--cacert",
        &pki.path("ca.crt"),
        &"--cert",
        &pki.path("keda.crt"),
        &"--key",
        &pki.path("keda.key"),
        &"--server-name",
        &AGGREGATOR_NAME,
    ]);
    run_keda_check_with(&agg.grpc.to_string(), &cases(1.0), dir.path(), &keda_tls);

    // The certificate rotates without a restart: the next connection is served the new one.
    let pid = agg.proc.pid();
    assert!(
        served_subject(agg.grpc).contains("nodekeeper aggregator one"),
        "{}",
        served_subject(agg.grpc)
    );
    volume.update(&server_files(&pki, "aggregator-next"));
    let deadline = Instant::now() + WAIT;
    while !served_subject(agg.grpc).contains("nodekeeper aggregator two") {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never served: {}; log:\n{}",
            served_subject(agg.grpc),
            agg.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run_keda_check_with(&agg.grpc.to_string(), &cases(1.0), dir.path(), &keda_tls);
    assert_eq!(agg.proc.pid(), pid);
    assert_eq!(agg.metric("nodekeeper_api_tls_files_refused"), Some(0.0));
    let e = keda_get_metrics(&rt, agg.grpc, &pki, no_cert).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "after the rotation: {e:?}");

    // A rotation to a pair that does not go together is refused, naming the flag; the
    // working certificate stays served.
    let mut mismatched = server_files(&pki, "aggregator");
    mismatched[2] = ("tls.key", pki.pem("aggregator-next.key"));
    volume.update(&mismatched);
    let deadline = Instant::now() + WAIT;
    while agg.metric("nodekeeper_api_tls_files_refused") != Some(1.0) {
        let _ = served_subject(agg.grpc);
        assert!(Instant::now() < deadline, "{}", agg.proc.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served_subject(agg.grpc).contains("nodekeeper aggregator two"));
    assert!(agg.proc.log_text().contains("--listen-key"));
    keda_get_metrics(&rt, agg.grpc, &pki, keda).expect("KEDA through the refused rotation");

    // The token rewritten in place with one of the same length and its mtime put back
    // (utimensat): inode, size and mtime unchanged, the content not. The new token reads; the
    // old one no longer does (decision #19-h).
    let mtime = std::fs::metadata(&token).unwrap().modified().unwrap();
    let next = TOKEN.replace("0123", "9876");
    assert_eq!(next.len(), TOKEN.len());
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&token)
            .unwrap();
        f.write_all(next.as_bytes()).unwrap();
        f.set_modified(mtime).unwrap();
    }
    assert_eq!(
        std::fs::metadata(&token).unwrap().modified().unwrap(),
        mtime
    );
    let e = get_fleet(&rt, agg.grpc, &pki, no_cert, &[&bearer(TOKEN)]).unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "the old token still reads: {e:?}"
    );
    get_fleet(&rt, agg.grpc, &pki, no_cert, &[&bearer(&next)]).expect("the rewritten token");
}
