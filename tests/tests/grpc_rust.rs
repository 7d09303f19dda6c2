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
