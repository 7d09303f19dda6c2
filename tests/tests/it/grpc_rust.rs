//! The gRPC API through the generated tonic client: exact per-pod values from a fake cgroup v2
//! tree, and WatchMetrics request validation.

use std::time::Duration;

use nodekeeper::pb::{self, node_agent_client::NodeAgentClient};
use nodekeeper_tests::Agent;
use tonic::Code;
use tonic::transport::Channel;

const POD_UID: &str = nodekeeper_tests::cgroup::SAMPLE_POD_UID;
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn client(agent: &Agent) -> NodeAgentClient<Channel> {
    NodeAgentClient::connect(agent.grpc_url())
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", agent.grpc_url()))
}

/// A WatchMetrics request with the interval `seconds` + `nanos`, without naming prost-types.
fn watch_request(seconds: i64, nanos: i32) -> pb::WatchMetricsRequest {
    let mut req = pb::WatchMetricsRequest {
        interval: Some(Default::default()),
        exclude_pods: true,
        ..Default::default()
    };
    let interval = req.interval.as_mut().unwrap();
    interval.seconds = seconds;
    interval.nanos = nanos;
    req
}

#[tokio::test]
async fn get_metrics_reports_pod_values_from_the_cgroup_tree_exactly() {
    let cgroup = tempfile::tempdir().unwrap();
    nodekeeper_tests::cgroup::sample_tree(cgroup.path());
    let agent = Agent::builder()
        .arg("--host-cgroup")
        .arg(cgroup.path().to_str().unwrap())
        .start();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = client(&agent).await;
        let snap = c
            .get_metrics(pb::GetMetricsRequest {
                exclude_pods: false,
                ..Default::default()
            })
            .await
            .expect("GetMetrics")
            .into_inner();
        assert!(
            !snap.unavailable.iter().any(|u| u == "pods"),
            "pods reported unavailable: {:?}",
            snap.unavailable
        );
        assert_eq!(snap.pods.len(), 1, "{:#?}", snap.pods);
        let pod = &snap.pods[0];
        assert_eq!(pod.uid, POD_UID);
        assert_eq!(pod.qos_class, "burstable");
        assert_eq!(pod.namespace, "", "standalone: no pod watch");
        assert_eq!(pod.name, "");
        assert_eq!(pod.cpu_usage_seconds, 1.5);
        assert_eq!(pod.cpu_user_seconds, 1.0);
        assert_eq!(pod.cpu_system_seconds, 0.5);
        assert_eq!(pod.cpu_periods, 10);
        assert_eq!(pod.cpu_throttled_periods, 2);
        assert_eq!(pod.cpu_throttled_seconds, 0.3);
        assert_eq!(pod.memory_usage_bytes, 104_857_600);
        assert_eq!(pod.memory_working_set_bytes, 100_000_000);

        let without = c
            .get_metrics(pb::GetMetricsRequest {
                exclude_pods: true,
                ..Default::default()
            })
            .await
            .expect("GetMetrics(exclude_pods)")
            .into_inner();
        assert!(without.pods.is_empty(), "{:#?}", without.pods);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn negative_watch_interval_is_invalid_argument() {
    // One stream slot: a rejected request must not hold it.
    let agent = Agent::builder()
        .config("api:\n  maxWatchStreams: 1\n")
        .start();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = client(&agent).await;
        for (seconds, nanos) in [(-1, 0), (0, -500_000_000)] {
            let err = c
                .watch_metrics(watch_request(seconds, nanos))
                .await
                .expect_err("a negative interval must be rejected");
            assert_eq!(
                err.code(),
                Code::InvalidArgument,
                "interval {seconds}s {nanos}ns: {err:?}"
            );
            assert!(err.message().contains("interval"), "{err:?}");
        }
        let mut stream = c
            .watch_metrics(watch_request(1, 0))
            .await
            .expect("a valid WatchMetrics after rejected ones")
            .into_inner();
        let snap = stream
            .message()
            .await
            .expect("first snapshot")
            .expect("stream open");
        assert!(snap.collected_at.is_some());
        assert!(snap.pods.is_empty(), "exclude_pods was set");
    })
    .await
    .expect("test timed out");
}

/// Lists services over reflection v1: `Ok(names)`, or the status of the refused stream.
async fn reflection_services(agent: &Agent) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Endpoint::from_shared(agent.grpc_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream_once(req))
        .await?
        .into_inner();
    let answer = stream.message().await?.expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

fn tokio_stream_once<T: Send + 'static>(item: T) -> impl futures::Stream<Item = T> + Send {
    futures::stream::iter([item])
}

#[tokio::test]
async fn reflection_is_on_by_default_and_off_when_configured() {
    let agent = Agent::builder().start();
    let services = tokio::time::timeout(TEST_TIMEOUT, reflection_services(&agent))
        .await
        .unwrap()
        .expect("reflection on by default");
    assert!(
        services.iter().any(|s| s == "nodekeeper.v1.NodeAgent"),
        "{services:?}"
    );

    let agent = Agent::builder()
        .config("api:\n  reflection: false\n")
        .start();
    let refused = tokio::time::timeout(TEST_TIMEOUT, reflection_services(&agent))
        .await
        .unwrap()
        .expect_err("reflection answered with api.reflection: false");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    // The API itself is unaffected.
    client(&agent)
        .await
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("GetNode without reflection");
}

#[tokio::test]
async fn get_node_answers_from_the_node_watch_without_an_api_get_per_call() {
    use nodekeeper_tests::fake_api::FakeApi;
    let api = FakeApi::start();
    api.add_node("node-a", &[]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let agent = Agent::builder()
        .config("metrics:\n  enabled: false\n")
        .connected(&kubeconfig, "node-a")
        .start();
    let mut c = client(&agent).await;
    let node_gets = || {
        api.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/api/v1/nodes/node-a")
            .count()
    };
    // The first answer may come before the watch's first event; after it, none may GET.
    let deadline = std::time::Instant::now() + TEST_TIMEOUT;
    let mut node = c
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!node.unschedulable);
    let before = node_gets();
    for _ in 0..100 {
        node = c
            .get_node(pb::GetNodeRequest {})
            .await
            .unwrap()
            .into_inner();
    }
    assert!(!node.unschedulable);
    let gets = node_gets() - before;
    assert!(gets <= 1, "{gets} node GETs for 100 GetNode calls");

    // The watch follows the Node: a cordon made elsewhere (kubectl) shows up without a GET.
    api.set_node_unschedulable("node-a", true);
    loop {
        if c.get_node(pb::GetNodeRequest {})
            .await
            .unwrap()
            .into_inner()
            .unschedulable
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "GetNode never saw the cordon"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node_gets() - before <= 1, "GetNode fell back to GETs");
}
