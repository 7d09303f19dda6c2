//! Issue #15, 2d: grpc.health.v1 `Health/Watch` streams live as long as their client wants, like
//! WatchMetrics and KEDA's streams, but were not counted in the stream budget: one anonymous
//! client could open them until `max_concurrent_streams` per connection times the connection
//! cap. Now they take a slot of the one budget (`api.maxWatchStreams`, half of it per client
//! address): the client's share and then RESOURCE_EXHAUSTED, memory bounded.

use std::time::Duration;

use nodekeeper_tests::Agent;
use nodekeeper_tests::memcg::{DAEMONSET_MEMORY_LIMIT, MemoryCgroup};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// `api.maxWatchStreams`' default (agent/src/config.rs), restated: one address gets half.
const STREAM_BUDGET: usize = 64;

fn rss_kib(pid: u32) -> u64 {
    nodekeeper_tests::dns_peers::proc_status_kib(pid, "VmRSS").expect("agent RSS")
}

#[test]
fn health_watch_streams_take_the_stream_budget_and_one_client_gets_its_share() {
    let Some(group) = MemoryCgroup::require("flood-health-watch", DAEMONSET_MEMORY_LIMIT) else {
        return;
    };
    let mut agent = Agent::builder().in_cgroup(&group).start();
    let pid = agent.proc.pid();
    let before = rss_kib(pid);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", agent.api))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let mut c = HealthClient::new(channel);
        let mut held = Vec::new();
        let mut exhausted = 0;
        for _ in 0..(STREAM_BUDGET * 4) {
            // Bounded wait: uncounted streams stop at the connection's HTTP/2 stream limit,
            // where the next call would queue in the client for ever.
            let call = c.watch(HealthCheckRequest::default());
            let Ok(result) = tokio::time::timeout(Duration::from_secs(5), call).await else {
                break;
            };
            match result {
                Ok(s) => held.push(s.into_inner()),
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                    assert!(e.message().contains("per client address"), "{e:?}");
                    exhausted += 1;
                }
            }
        }
        let at_cap = rss_kib(pid);
        println!(
            "health watch flood: {} streams held by one client, {exhausted} refused; RSS {before} -> {at_cap} KiB",
            held.len()
        );
        assert_eq!(
            held.len(),
            STREAM_BUDGET / 2,
            "one client holds at most half the stream budget"
        );
        assert!(at_cap < before + 32 * 1024, "RSS {before} -> {at_cap} KiB");
        // The same budget as WatchMetrics: the hog's WatchMetrics is refused too.
        let mut agent_client = nodekeeper::pb::node_agent_client::NodeAgentClient::connect(
            format!("http://{}", agent.api),
        )
        .await
        .unwrap();
        let e = agent_client
            .watch_metrics(nodekeeper::pb::WatchMetricsRequest::default())
            .await
            .expect_err("the hog's WatchMetrics");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // Check still answers, and a dropped Watch gives its slot back.
        c.check(HealthCheckRequest::default())
            .await
            .expect("Check during the flood");
        drop(held.pop());
        let mut again = false;
        for _ in 0..50 {
            if c.watch(HealthCheckRequest::default()).await.is_ok() {
                again = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(again, "a dropped Watch stream's slot never came back");
    });
    assert!(agent.proc.alive(), "{}", agent.proc.log_text());
    assert_eq!(group.oom_kills(), 0, "OOM-killed by Watch streams");
}
