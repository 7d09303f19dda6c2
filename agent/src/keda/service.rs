//! `externalscaler.ExternalScaler`, KEDA's external scaler protocol, over any source of pods'
//! connection census: the node agent's `SnapshotCache` (this node's pods) or the aggregator's
//! fan-out (every node's).
//!
//! Owns request parsing (through `query`), the five RPCs and the stream lifecycles: a stream
//! sends the current answer at once, then again whenever it changes (polled every `poll`), and
//! ends with status OK when the process shuts down. Never collects on its own schedule beyond
//! that poll, and never caches values: the source decides how fresh a census is.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::keda::coverage::FleetCensus;
use crate::keda::query::{Evaluation, Query, evaluate};
use crate::keda_pb::{self as kpb, external_scaler_server::ExternalScaler};
use crate::metrics::SnapshotCache;
use crate::pb;

/// How often an open stream re-reads the census on the node agent: KEDA's own polling default
/// is 30 s, so 5 s is already six times more responsive, and it keeps a streaming ScaledObject
/// from making the agent census every namespace each second.
pub const AGENT_STREAM_POLL: Duration = Duration::from_secs(5);

/// The snapshot source that names the census in `MetricsSnapshot.unavailable` when it failed.
pub const CENSUS_SOURCE: &str = "connections";

// === census sources ===

/// Pods' connection census as one consumer sees it, without copying it out of its snapshot.
#[derive(Debug, Clone)]
pub struct Census(CensusInner);

#[derive(Debug, Clone)]
enum CensusInner {
    Snapshot(Arc<pb::MetricsSnapshot>),
    Pods(Arc<Vec<pb::PodConnections>>),
    Fleet(Arc<FleetCensus>),
}

impl Census {
    /// The `connections` of one node's snapshot.
    pub fn from_snapshot(snap: Arc<pb::MetricsSnapshot>) -> Self {
        Self(CensusInner::Snapshot(snap))
    }

    /// Pods gathered elsewhere (the aggregator's fan-out).
    pub fn from_pods(pods: Arc<Vec<pb::PodConnections>>) -> Self {
        Self(CensusInner::Pods(pods))
    }

    /// Every expected agent of the aggregator's fan-out: which of them count depends on each
    /// query's coverage policy.
    pub fn from_fleet(fleet: Arc<FleetCensus>) -> Self {
        Self(CensusInner::Fleet(fleet))
    }

    /// The pods query `q` sums, or UNAVAILABLE when too little of the fleet is behind them
    /// (keda::coverage). A single node's census is always complete.
    pub fn select(&self, q: &Query) -> Result<Vec<&[pb::PodConnections]>, Status> {
        match &self.0 {
            CensusInner::Snapshot(s) => Ok(vec![&s.connections]),
            CensusInner::Pods(p) => Ok(vec![p]),
            CensusInner::Fleet(f) => f.select(q),
        }
    }
}

/// Where the scaler reads pods from. An `Err` is returned to KEDA as is (UNAVAILABLE when the
/// census cannot be had right now).
pub trait PodSource: Send + Sync + 'static {
    /// The census `q` is answered from; a source that folds remotes beyond its top N keeps
    /// `q.remote` apart from now on (pins.rs).
    fn census<'a>(&'a self, q: &'a Query) -> BoxFuture<'a, Result<Census, Status>>;
}

/// The node agent's source: its snapshot cache (at most `metrics.maxSnapshotAge` old).
pub struct SnapshotSource(pub Arc<SnapshotCache>);

impl PodSource for SnapshotSource {
    fn census<'a>(&'a self, q: &'a Query) -> BoxFuture<'a, Result<Census, Status>> {
        Box::pin(async move { census_of(self.0.get_pinned(&query_pins(q)).await?) })
    }
}

/// The remotes `q` needs kept apart from `other` in the census.
pub fn query_pins(q: &Query) -> Vec<String> {
    q.remote.iter().map(ToString::to_string).collect()
}

/// A snapshot's census, or UNAVAILABLE when the snapshot says the census failed: no value is
/// better than a wrong zero, which would scale the workload in.
pub fn census_of(snap: Arc<pb::MetricsSnapshot>) -> Result<Census, Status> {
    if snap.unavailable.iter().any(|s| s == CENSUS_SOURCE) {
        return Err(Status::unavailable(format!(
            "the connection census failed on node {} (see the agent's log and \
             nodekeeper_snapshot_source_unavailable)",
            snap.node_name
        )));
    }
    if let Some(why) = pod_view_not_current(&snap) {
        return Err(Status::unavailable(format!(
            "node {}: {why}: a pod it has not named matches no selector, and a sum without it \
             would scale the workload in",
            snap.node_name
        )));
    }
    if let Some(why) = unnamed_pod(&snap) {
        return Err(Status::unavailable(format!(
            "node {}: {why}: its labels are unknown, so any query may select it, and a sum \
             without it would scale the workload in",
            snap.node_name
        )));
    }
    Ok(Census::from_snapshot(snap))
}

/// A census entry the agent's current pod view cannot name (decision #18-l): a pod whose cgroup
/// exists but whose API object the view has not delivered (its watch behind, or silent), nor
/// seen deleted. `None` when every entry is named, or standalone (no pod view names any).
pub fn unnamed_pod(snap: &pb::MetricsSnapshot) -> Option<String> {
    snap.pod_view.as_ref()?;
    let p = snap
        .connections
        .iter()
        .find(|p| p.namespace.is_empty() && p.deletion_timestamp.is_none())?;
    Some(format!(
        "the census has pod uid {:?} that the agent's pod view does not know (pod view behind: \
         a pod created since the watch's last event, or a silent watch)",
        p.uid
    ))
}

/// Why a snapshot's pods may be unnamed: its pod watch had not synced, or was failing, when
/// it was collected. `None` when current (or standalone: no pod watch, nothing to name pods).
pub fn pod_view_not_current(snap: &pb::MetricsSnapshot) -> Option<String> {
    let view = snap.pod_view.as_ref()?;
    if !view.synced {
        return Some("the agent's pod watch has not synced yet".into());
    }
    if !view.error.is_empty() {
        let since = view
            .failing_since
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| t.elapsed().ok())
            .map_or(String::new(), |d| format!(" for {:.0}s", d.as_secs_f64()));
        return Some(format!(
            "the agent's pod watch is failing{since} ({}): pod placement not current",
            view.error
        ));
    }
    None
}

// === impl ScalerService ===

/// The ExternalScaler implementation; cheap to clone.
#[derive(Clone)]
pub struct ScalerService {
    source: Arc<dyn PodSource>,
    poll: Duration,
    shutdown: CancellationToken,
    /// The agent's one budget for long-lived streams (shared with WatchMetrics); None: unbounded
    /// (the aggregator, which KEDA alone calls).
    streams: Option<crate::bounds::StreamBudget>,
}

impl ScalerService {
    /// `poll`: how often open streams re-read the source. `shutdown` ends them with OK.
    pub fn new(source: Arc<dyn PodSource>, poll: Duration, shutdown: CancellationToken) -> Self {
        Self {
            source,
            poll,
            shutdown,
            streams: None,
        }
    }

    /// Every StreamIsActive and StreamMetricSpec holds a slot of `budget` while open.
    pub fn with_stream_budget(mut self, budget: crate::bounds::StreamBudget) -> Self {
        self.streams = Some(budget);
        self
    }

    fn stream_slot<T>(&self, req: &Request<T>) -> Result<Option<crate::bounds::PeerSlot>, Status> {
        self.streams
            .as_ref()
            .map(|b| b.take(req.remote_addr().map(|a| a.ip())))
            .transpose()
    }

    async fn evaluate(&self, q: &Query) -> Result<Evaluation, Status> {
        let census = self.source.census(q).await?;
        let selected = census.select(q)?;
        let e = selected
            .iter()
            .map(|pods| evaluate(q, pods))
            .fold(Evaluation::default(), |sum, e| sum + e);
        // A selected pod whose census failed has an unknown value: the sum without it is a
        // smaller number, which would scale the workload in (adversary #18 finding 4).
        if e.failed > 0 {
            // The first such pod's reason, so the answer says why (e.g. a shared namespace).
            let first = selected
                .iter()
                .flat_map(|pods| pods.iter())
                .find(|p| {
                    p.namespace == q.namespace
                        && q.selector.matches(&p.labels)
                        && !p.error.is_empty()
                        && p.deletion_timestamp.is_none()
                })
                .map(|p| {
                    let name = if p.name.is_empty() { &p.uid } else { &p.name };
                    format!("; {name}: {}", p.error)
                })
                .unwrap_or_default();
            return Err(Status::unavailable(format!(
                "{} of {} pods selected in namespace {} had a failed connection census: their \
                 value is unknown, and a sum without them would scale the workload in (see the \
                 pods' `error` in GetMetrics){first}",
                e.failed,
                e.selected(),
                q.namespace
            )));
        }
        // A metric the census cannot attribute to a selected pod is no value, not a zero.
        if e.unattributable > 0 {
            return Err(Status::unavailable(format!(
                "{} of {} pods selected in namespace {} use the host's network (hostNetwork): \
                 their {} cannot be attributed (TIME_WAIT sockets belong to no process; \
                 docs/connections.md, decision #18-n)",
                e.unattributable,
                e.selected(),
                q.namespace,
                q.metric.name()
            )));
        }
        // Connections queued on a port several listeners share are nobody's: a sum without
        // them would be smaller than the truth, one with them counted twice (decision #18-q).
        if e.unattributed_queued > 0 {
            return Err(Status::unavailable(format!(
                "{} of {} pods selected in namespace {} use the host's network (hostNetwork) and \
                 listen on a port with other processes (SO_REUSEPORT or an overlapping wildcard): \
                 queued connections of a port shared by {} listeners cannot be attributed, so \
                 their {} is unknown until those connections are accepted (docs/connections.md, \
                 decision #18-q)",
                e.unattributed_queued,
                e.selected(),
                q.namespace,
                e.shared_listeners,
                q.metric.name()
            )));
        }
        // A port whose listener the census did not keep: its queue is unknown, not a zero.
        if e.beyond_top_listeners > 0 {
            return Err(Status::unavailable(format!(
                "{} of {} pods selected in namespace {} have more listening sockets than \
                 metrics.connections.topListeners and none kept is on port {}: its accept queue \
                 is not in the census (raise topListeners; decision #18-r)",
                e.beyond_top_listeners,
                e.selected(),
                q.namespace,
                q.port.map_or_else(String::new, |p| p.to_string())
            )));
        }
        // No selected pod is no value, not a zero: a typo in the selector or namespace would
        // otherwise scale the workload to its minimum.
        if e.matched == 0 {
            return Err(Status::not_found(format!(
                "no pod in namespace {} matches podSelector {:?} (a pod is known once the \
                 agent's pod watch has it; a standalone agent knows none)",
                q.namespace,
                q.selector.to_string()
            )));
        }
        tracing::debug!(
            metric = %q.metric_name,
            value = e.value,
            matched = e.matched,
            failed = e.failed,
            "scaler query evaluated"
        );
        Ok(e)
    }

    fn metric_spec(q: &Query) -> kpb::GetMetricSpecResponse {
        kpb::GetMetricSpecResponse {
            metric_specs: vec![kpb::MetricSpec {
                metric_name: q.metric_name.clone(),
                // KEDA reads the float when > 0; the integer is for clients that predate it.
                target_size: (q.target.round() as i64).max(1),
                target_size_float: q.target,
            }],
        }
    }
}

fn parse(r: Option<&kpb::ScaledObjectRef>) -> Result<Query, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("scaledObjectRef: required"))?;
    Ok(Query::parse(r)?)
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl ExternalScaler for ScalerService {
    async fn is_active(
        &self,
        req: Request<kpb::ScaledObjectRef>,
    ) -> Result<Response<kpb::IsActiveResponse>, Status> {
        let q = parse(Some(req.get_ref()))?;
        let e = self.evaluate(&q).await?;
        Ok(Response::new(kpb::IsActiveResponse {
            result: e.value > q.activation_target,
        }))
    }

    type StreamIsActiveStream = Stream<kpb::IsActiveResponse>;

    async fn stream_is_active(
        &self,
        req: Request<kpb::ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let q = parse(Some(req.get_ref()))?;
        let slot = self.stream_slot(&req)?;
        // One slot: an answer waits for a slow reader instead of piling up.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = None;
            loop {
                let next = tokio::select! {
                    _ = this.shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    e = this.evaluate(&q) => e,
                };
                match next {
                    Ok(e) => {
                        let active = e.value > q.activation_target;
                        if last != Some(active) {
                            last = Some(active);
                            let msg = kpb::IsActiveResponse { result: active };
                            if tx.send(Ok(msg)).await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(status) => {
                        // KEDA re-opens the stream with backoff; ending beats a silent stall.
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
                tokio::select! {
                    _ = this.shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(this.poll) => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_metric_spec(
        &self,
        req: Request<kpb::ScaledObjectRef>,
    ) -> Result<Response<kpb::GetMetricSpecResponse>, Status> {
        let q = parse(Some(req.get_ref()))?;
        Ok(Response::new(Self::metric_spec(&q)))
    }

    async fn get_metrics(
        &self,
        req: Request<kpb::GetMetricsRequest>,
    ) -> Result<Response<kpb::GetMetricsResponse>, Status> {
        let req = req.into_inner();
        let q = parse(req.scaled_object_ref.as_ref())?;
        let e = self.evaluate(&q).await?;
        // KEDA asks by the name GetMetricSpec gave (older releases with their `sN-` prefix);
        // the value is the same whatever the name, so answer under the name asked for.
        let metric_name = if req.metric_name.is_empty() {
            q.metric_name.clone()
        } else {
            req.metric_name
        };
        Ok(Response::new(kpb::GetMetricsResponse {
            metric_values: vec![kpb::MetricValue {
                metric_name,
                metric_value: e.value.round() as i64,
                metric_value_float: e.value,
            }],
        }))
    }

    type StreamMetricSpecStream = Stream<kpb::GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        req: Request<kpb::ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        // The spec depends on the metadata alone, which cannot change within one stream: it is
        // sent once, and the stream stays open (as KEDA expects) until either side ends it.
        let spec = Self::metric_spec(&parse(Some(req.get_ref()))?);
        let slot = self.stream_slot(&req)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if tx.send(Ok(spec)).await.is_err() {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tx.closed() => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use futures::StreamExt as _;

    use super::*;

    /// A census the test changes at will; `None` answers UNAVAILABLE.
    #[derive(Default)]
    struct FakeSource(Mutex<Option<Vec<pb::PodConnections>>>);

    impl FakeSource {
        fn set(&self, pods: Option<Vec<pb::PodConnections>>) {
            *self.0.lock().unwrap() = pods;
        }
    }

    impl PodSource for Arc<FakeSource> {
        fn census<'a>(&'a self, _q: &'a Query) -> BoxFuture<'a, Result<Census, Status>> {
            let pods = self.0.lock().unwrap().clone();
            Box::pin(async move {
                pods.map(|p| Census::from_pods(Arc::new(p)))
                    .ok_or_else(|| Status::unavailable("no census"))
            })
        }
    }

    fn web_pod(established: u64) -> pb::PodConnections {
        pb::PodConnections {
            uid: "u1".into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            labels: HashMap::from([("app".to_string(), "web".to_string())]),
            established,
            ..Default::default()
        }
    }

    fn scaled_object(extra: &[(&str, &str)]) -> kpb::ScaledObjectRef {
        let mut meta: HashMap<String, String> = [
            ("metric", "established"),
            ("target", "10"),
            ("activationTarget", "2"),
            ("podSelector", "app=web"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            meta.insert(k.to_string(), v.to_string());
        }
        kpb::ScaledObjectRef {
            name: "web".into(),
            namespace: "shop".into(),
            scaler_metadata: meta,
        }
    }

    fn service(poll: Duration) -> (ScalerService, Arc<FakeSource>, CancellationToken) {
        let source = Arc::new(FakeSource::default());
        let token = CancellationToken::new();
        let svc = ScalerService::new(Arc::new(source.clone()), poll, token.clone());
        (svc, source, token)
    }

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn unary_calls_answer_from_the_census() {
        let (svc, source, _token) = service(Duration::from_millis(10));
        source.set(Some(vec![web_pod(7)]));
        let spec = svc
            .get_metric_spec(Request::new(scaled_object(&[])))
            .await
            .unwrap()
            .into_inner();
        let name = spec.metric_specs[0].metric_name.clone();
        assert!(name.starts_with("nodekeeper-established-shop-"), "{name}");
        assert_eq!(spec.metric_specs[0].target_size_float, 10.0);
        assert_eq!(spec.metric_specs[0].target_size, 10);

        let metrics = svc
            .get_metrics(Request::new(kpb::GetMetricsRequest {
                scaled_object_ref: Some(scaled_object(&[])),
                metric_name: name.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            metrics.metric_values,
            vec![kpb::MetricValue {
                metric_name: name,
                metric_value: 7,
                metric_value_float: 7.0
            }]
        );
        let active = |svc: ScalerService| async move {
            svc.is_active(Request::new(scaled_object(&[])))
                .await
                .unwrap()
                .into_inner()
                .result
        };
        assert!(active(svc.clone()).await);
        source.set(Some(vec![web_pod(2)]));
        assert!(
            !active(svc.clone()).await,
            "2 is not above activationTarget 2"
        );
    }

    #[tokio::test]
    async fn bad_metadata_and_a_missing_ref_are_invalid_argument() {
        let (svc, source, _token) = service(Duration::from_millis(10));
        source.set(Some(vec![]));
        let e = svc
            .get_metrics(Request::new(kpb::GetMetricsRequest {
                scaled_object_ref: Some(scaled_object(&[("target", "abc")])),
                metric_name: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message()
                .contains(r#"scalerMetadata.target: "abc" is not a number"#)
        );
        let e = svc
            .get_metrics(Request::new(kpb::GetMetricsRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("scaledObjectRef"), "{e:?}");
        let e = svc
            .stream_is_active(Request::new(scaled_object(&[("metric", "x")])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn an_unavailable_census_is_passed_on() {
        let (svc, _source, _token) = service(Duration::from_millis(10));
        let e = svc
            .is_active(Request::new(scaled_object(&[])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn stream_is_active_sends_now_then_only_changes_and_ends_ok_on_shutdown() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let (svc, source, token) = service(Duration::from_millis(20));
            source.set(Some(vec![web_pod(5)]));
            let mut stream = svc
                .stream_is_active(Request::new(scaled_object(&[])))
                .await
                .unwrap()
                .into_inner();
            assert!(stream.next().await.unwrap().unwrap().result);
            // Several polls with the same answer send nothing.
            let quiet = tokio::time::timeout(Duration::from_millis(150), stream.next()).await;
            assert!(quiet.is_err(), "unchanged answer was re-sent: {quiet:?}");
            source.set(Some(vec![web_pod(0)]));
            assert!(!stream.next().await.unwrap().unwrap().result);
            source.set(Some(vec![web_pod(3)]));
            assert!(stream.next().await.unwrap().unwrap().result);
            token.cancel();
            assert!(
                stream.next().await.is_none(),
                "ends without an error status"
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn stream_is_active_ends_with_the_error_when_the_census_fails() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let (svc, source, _token) = service(Duration::from_millis(20));
            source.set(Some(vec![web_pod(5)]));
            let mut stream = svc
                .stream_is_active(Request::new(scaled_object(&[])))
                .await
                .unwrap()
                .into_inner();
            assert!(stream.next().await.unwrap().unwrap().result);
            source.set(None);
            let e = stream.next().await.unwrap().unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable);
            assert!(stream.next().await.is_none());
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn stream_metric_spec_sends_the_spec_and_stays_open_until_shutdown() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let (svc, _source, token) = service(Duration::from_millis(20));
            let mut stream = svc
                .stream_metric_spec(Request::new(scaled_object(&[("metricName", "web-conns")])))
                .await
                .unwrap()
                .into_inner();
            let spec = stream.next().await.unwrap().unwrap();
            assert_eq!(spec.metric_specs[0].metric_name, "web-conns");
            let open = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
            assert!(open.is_err(), "the stream must stay open: {open:?}");
            token.cancel();
            assert!(stream.next().await.is_none());
        })
        .await
        .unwrap();
    }

    #[test]
    fn a_snapshot_from_a_pod_view_not_synced_or_failing_is_unavailable() {
        let snap = |view: Option<pb::PodView>| {
            Arc::new(pb::MetricsSnapshot {
                node_name: "node-a".into(),
                connections: vec![web_pod(1)],
                pod_view: view,
                ..Default::default()
            })
        };
        let e = census_of(snap(Some(pb::PodView::default()))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            e.message()
                .contains("node node-a: the agent's pod watch has not synced yet"),
            "{e:?}"
        );
        let failing = pb::PodView {
            synced: true,
            error: "503 Service Unavailable".into(),
            failing_since: Some(std::time::SystemTime::now().into()),
            ..Default::default()
        };
        let e = census_of(snap(Some(failing))).unwrap_err();
        assert!(
            e.message().contains("pod watch is failing for 0s (503"),
            "{e:?}"
        );
        // Synced and current, or standalone (no pod watch): answered.
        let current = pb::PodView {
            synced: true,
            ..Default::default()
        };
        assert!(census_of(snap(Some(current))).is_ok());
        assert!(census_of(snap(None)).is_ok());
    }

    #[test]
    fn a_snapshot_whose_census_failed_is_unavailable_not_zero() {
        let failed = Arc::new(pb::MetricsSnapshot {
            node_name: "node-a".into(),
            unavailable: vec![CENSUS_SOURCE.into()],
            ..Default::default()
        });
        let e = census_of(failed).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("node-a"), "{e:?}");
        let ok = Arc::new(pb::MetricsSnapshot {
            unavailable: vec!["pressure".into()],
            connections: vec![web_pod(1)],
            ..Default::default()
        });
        assert_eq!(
            census_of(ok)
                .unwrap()
                .select(&Query::parse(&scaled_object(&[])).unwrap())
                .unwrap()[0]
                .len(),
            1
        );
    }

    #[test]
    fn a_census_entry_the_current_pod_view_cannot_name_is_unavailable_unless_deleted() {
        let snap = |unnamed: pb::PodConnections, view: Option<pb::PodView>| {
            Arc::new(pb::MetricsSnapshot {
                node_name: "node-a".into(),
                connections: vec![web_pod(1), unnamed],
                pod_view: view,
                ..Default::default()
            })
        };
        let current = || {
            Some(pb::PodView {
                synced: true,
                ..Default::default()
            })
        };
        let unnamed = pb::PodConnections {
            uid: "uid-2".into(),
            established: 6,
            ..Default::default()
        };
        let e = census_of(snap(unnamed.clone(), current())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            e.message().contains(
                "node node-a: the census has pod uid \"uid-2\" that the agent's pod view does \
                 not know (pod view behind"
            ),
            "{e:?}"
        );
        // One the view saw deleted is named as deleted: left out, as a terminating pod.
        let deleted = pb::PodConnections {
            deletion_timestamp: Some(std::time::SystemTime::now().into()),
            ..unnamed.clone()
        };
        assert!(census_of(snap(deleted, current())).is_ok());
        // Standalone: no pod view names any pod.
        assert!(census_of(snap(unnamed, None)).is_ok());
    }
}
