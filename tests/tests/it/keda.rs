//! KEDA's external scaler on the node agent, checked from KEDA's side of the wire: pods in real
//! network namespaces with known connections (tests/support/census_pods.rs), named by a connected
//! agent's pod watch, and a Python grpcio client generated from proto/keda/externalscaler.proto
//! (tests/py/keda_check.py) asking ScaledObject-shaped questions. Also: a census that failed is
//! UNAVAILABLE (never a zero), the service is absent without metrics, and needs no credentials.

use crate::support::census_pods;

use std::path::{Path, PathBuf};

use census_pods::{cases, get_metrics, run_keda_check, scaled_object, start_pods, wait_for_pool};
use nodekeeper_tests::fake_api::FakeApi;
use nodekeeper_tests::{Agent, require_python_modules, require_root};
use tonic::Code;

const NODE: &str = "node-a";

fn fake_api(dir: &Path) -> (FakeApi, PathBuf) {
    let api = FakeApi::start();
    api.add_node(NODE, &[]);
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    (api, kubeconfig)
}

#[test]
fn keda_python_client_gets_metric_specs_values_and_field_errors_from_an_agent_as_root() {
    if !require_root() || !require_python_modules(&["grpc", "grpc_tools"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = fake_api(dir.path());
    let cgroup = dir.path().join("cgroup");
    let _pods = start_pods(&api, &cgroup, dir.path(), NODE);
    let agent = Agent::builder()
        .connected(&kubeconfig, NODE)
        .arg("--host-cgroup")
        .arg(cgroup.display().to_string())
        .start();
    let addr = agent.api.to_string();
    wait_for_pool(&addr, 10.0);
    run_keda_check(&addr, &cases(1.0), dir.path());
}

#[tokio::test]
async fn a_failed_census_is_unavailable_never_zero() {
    // No kubepods cgroup under --host-cgroup: the census cannot run on this node.
    let empty = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .arg("--host-cgroup")
        .arg(empty.path().display().to_string())
        .start();
    let e = get_metrics(
        &agent.api.to_string(),
        scaled_object(
            "shop",
            &[
                ("metric", "established"),
                ("target", "5"),
                ("podSelector", "app=web"),
            ],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("connection census failed"), "{e:?}");
}

#[tokio::test]
async fn bad_metadata_is_invalid_argument_before_any_census() {
    let agent = Agent::builder().start();
    let e = get_metrics(
        &agent.api.to_string(),
        scaled_object(
            "shop",
            &[
                ("metric", "established"),
                ("target", "-3"),
                ("podSelector", "app=web"),
            ],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "scalerMetadata.target: \"-3\" must be > 0");
}

#[tokio::test]
async fn the_scaler_needs_no_credentials_even_when_control_calls_do() {
    let agent = Agent::builder().with_token().start();
    let e = get_metrics(
        &agent.api.to_string(),
        scaled_object(
            "shop",
            &[
                ("metric", "established"),
                ("target", "x"),
                ("podSelector", "app=web"),
            ],
        ),
    )
    .await
    .unwrap_err();
    // Reached the scaler (its own validation answered), not refused by the auth layer.
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test]
async fn the_scaler_is_absent_when_metrics_are_disabled() {
    let agent = Agent::builder()
        .config("metrics:\n  enabled: false\n")
        .start();
    let e = get_metrics(
        &agent.api.to_string(),
        scaled_object(
            "shop",
            &[
                ("metric", "established"),
                ("target", "5"),
                ("podSelector", "app=web"),
            ],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
}
