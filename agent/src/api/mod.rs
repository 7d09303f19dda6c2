//! The gRPC surface on `api.listen`: `nodekeeper.v1.NodeAgent`, `grpc.health.v1.Health` (one
//! service name per capability, plus "" for the whole agent), server reflection, and KEDA's
//! `externalscaler.ExternalScaler` over this node's pods (when metrics are enabled).
//!
//! Every call passes `auth` first (TLS, client certificates, bearer token).
//!
//! Owns request validation and stream lifecycles. Streams end with status OK when the agent
//! shuts down. Never reaches into a capability's internals: it reads the shared `Health` and the
//! metrics `SnapshotCache`.

pub mod client;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as HealthApi, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

pub mod auth;
pub mod authz;
pub mod inflight;
pub mod server_tls;

use crate::config::{ApiConfig, DEFAULT_WATCH_INTERVAL};
use crate::keda::service::{AGENT_STREAM_POLL, ScalerService, SnapshotSource};
use crate::keda_pb::external_scaler_server::ExternalScalerServer;
use crate::metrics::SnapshotCache;
use crate::pb::{self, HealthState, node_agent_server};
use crate::runtime::Health;

/// The descriptor set that reflection publishes, written by build.rs.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("nodekeeper_descriptor");

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Reflection could not load a descriptor set (a build defect).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A TLS or token file in `api.auth` is missing or unusable.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

/// What the API reports about the agent itself.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub node_name: String,
    pub version: String,
    pub revision: String,
    pub kubernetes_connected: bool,
    pub started_at: SystemTime,
}

/// What the API reads from each capability; `None` when it is disabled (or needs the API).
#[derive(Default)]
pub struct Capabilities {
    pub snapshots: Option<Arc<SnapshotCache>>,
    pub sysctl: Option<crate::sysctl::SharedStatus>,
    pub drain: Option<Arc<crate::drain::engine::DrainController>>,
    pub disks: Option<crate::disks::prepare::SharedDisksStatus>,
    pub dns: Option<Arc<crate::dns::DnsHandle>>,
    /// This Node as the shared node watch last saw it (connected mode).
    pub node: Option<NodeWatch>,
}

/// The node watch's latest view of this Node; `None` until its first event.
pub type NodeWatch = tokio::sync::watch::Receiver<Option<crate::kube::NodeInfo>>;

#[derive(Clone)]
pub struct NodeAgentService {
    identity: Arc<AgentIdentity>,
    health: Health,
    snapshots: Option<Arc<SnapshotCache>>,
    sysctl: Option<crate::sysctl::SharedStatus>,
    drain: Option<Arc<crate::drain::engine::DrainController>>,
    disks: Option<crate::disks::prepare::SharedDisksStatus>,
    dns: Option<Arc<crate::dns::DnsHandle>>,
    node: Option<NodeWatch>,
    reflection: bool,
    min_watch_interval: Duration,
    streams: crate::bounds::StreamBudget,
    shutdown: CancellationToken,
}

impl NodeAgentService {
    pub fn new(
        identity: AgentIdentity,
        health: Health,
        capabilities: Capabilities,
        config: &ApiConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let Capabilities {
            snapshots,
            sysctl,
            drain,
            disks,
            dns,
            node,
        } = capabilities;
        Self {
            identity: Arc::new(identity),
            health,
            snapshots,
            sysctl,
            drain,
            disks,
            dns,
            node,
            reflection: config.reflection,
            min_watch_interval: config.min_watch_interval.get(),
            streams: crate::bounds::StreamBudget::new(config.max_watch_streams),
            shutdown,
        }
    }

    fn snapshots(&self) -> Result<&Arc<SnapshotCache>, Status> {
        self.snapshots.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "resource metrics are disabled on this node (metrics.enabled: false)",
            )
        })
    }

    fn drain(&self) -> Result<&Arc<crate::drain::engine::DrainController>, Status> {
        self.drain.as_ref().ok_or_else(|| {
            Status::failed_precondition("cordon and drain need the Kubernetes API: the agent runs standalone or drain.enabled is false")
        })
    }

    /// `spec.unschedulable` from the node watch; a GET only before the watch's first event
    /// (3,000 GetNode calls used to cost 3,000 GETs on the API server).
    async fn unschedulable(&self) -> Result<bool, Status> {
        if let Some(info) = self.node.as_ref().and_then(|n| n.borrow().clone()) {
            return Ok(info.unschedulable);
        }
        match &self.drain {
            Some(d) => Ok(d.unschedulable().await?),
            None => Ok(false),
        }
    }

    /// This Node's metadata.uid: from the node watch, else (before its first event) a GET.
    async fn node_uid(&self) -> Result<String, Status> {
        if let Some(info) = self.node.as_ref().and_then(|n| n.borrow().clone()) {
            return Ok(info.uid);
        }
        Ok(self.drain()?.node_uid().await?)
    }

    /// Refuses a node-bound request meant for another node (an orchestrator re-attaching to an
    /// address that a new instance reused): FAILED_PRECONDITION, before anything is touched.
    async fn check_target(&self, node_name: &str, node_uid: &str) -> Result<(), Status> {
        let mine = &self.identity.node_name;
        if !node_name.is_empty() && node_name != mine {
            return Err(Status::failed_precondition(format!(
                "node_name: this agent serves node {mine:?}, not {node_name:?}; refused (the address may now belong to another node)"
            )));
        }
        if !node_uid.is_empty() {
            let uid = self.node_uid().await?;
            if uid != node_uid {
                return Err(Status::failed_precondition(format!(
                    "node_uid: node {mine:?} has uid {uid:?}, not {node_uid:?}; refused (the node was re-created)"
                )));
            }
        }
        Ok(())
    }

    /// NodeStatus; `unschedulable` as given (just set by Cordon/Uncordon, which the watch may
    /// not have seen yet) or as the node watch last saw it.
    async fn node_status(&self, unschedulable: Option<bool>) -> Result<pb::NodeStatus, Status> {
        let id = &self.identity;
        let capabilities = self
            .health
            .snapshot()
            .into_iter()
            .map(|(name, h)| pb::CapabilityStatus {
                name: name.to_string(),
                state: h.state as i32,
                detail: h.detail,
            })
            .collect();
        Ok(pb::NodeStatus {
            node_name: id.node_name.clone(),
            version: id.version.clone(),
            revision: id.revision.clone(),
            kubernetes_connected: id.kubernetes_connected,
            capabilities,
            started_at: Some(id.started_at.into()),
            sysctl: self
                .sysctl
                .as_ref()
                .map(|s| s.read().expect("not poisoned").clone()),
            unschedulable: match unschedulable {
                Some(u) => u,
                None => self.unschedulable().await?,
            },
            disks: self
                .disks
                .as_ref()
                .map(|d| d.read().expect("not poisoned").to_pb())
                .unwrap_or_default(),
            dns: self.dns.as_ref().map(|d| d.status()),
            node_uid: self
                .node
                .as_ref()
                .and_then(|n| n.borrow().clone())
                .map(|i| i.uid)
                .unwrap_or_default(),
            drain: self
                .drain
                .as_ref()
                .and_then(|d| d.current())
                .map(|r| r.status()),
        })
    }

    /// The effective interval for a WatchMetrics request.
    pub fn watch_interval(
        &self,
        requested: Option<prost_types::Duration>,
    ) -> Result<Duration, Status> {
        let Some(d) = requested else {
            return Ok(DEFAULT_WATCH_INTERVAL.max(self.min_watch_interval));
        };
        let d = Duration::try_from(d)
            .map_err(|_| Status::invalid_argument("interval: must not be negative"))?;
        Ok(d.max(self.min_watch_interval))
    }
}

/// The snapshot without the parts a request excluded.
fn strip(
    snap: &pb::MetricsSnapshot,
    exclude_pods: bool,
    exclude_connections: bool,
) -> pb::MetricsSnapshot {
    let mut out = snap.clone();
    if exclude_pods {
        out.pods.clear();
    }
    if exclude_connections {
        out.connections.clear();
    }
    out
}

#[tonic::async_trait]
impl node_agent_server::NodeAgent for NodeAgentService {
    async fn get_node(
        &self,
        _req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(self.node_status(None).await?))
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::MetricsSnapshot>, Status> {
        let snap = self
            .snapshots()?
            .get_pinned(&req.get_ref().pinned_remotes)
            .await?;
        Ok(Response::new(strip(
            &snap,
            req.get_ref().exclude_pods,
            req.get_ref().exclude_connections,
        )))
    }

    async fn cordon(
        &self,
        req: Request<pb::CordonRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let principal = principal_name(&req);
        self.check_target(&req.get_ref().node_name, &req.get_ref().node_uid)
            .await?;
        self.drain()?
            .cordon(&req.get_ref().reason, &principal)
            .await?;
        Ok(Response::new(self.node_status(Some(true)).await?))
    }

    async fn uncordon(
        &self,
        req: Request<pb::UncordonRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        self.check_target(&req.get_ref().node_name, &req.get_ref().node_uid)
            .await?;
        self.drain()?.uncordon(&principal_name(&req)).await?;
        Ok(Response::new(self.node_status(Some(false)).await?))
    }

    type DrainStream = ReceiverStream<Result<pb::DrainEvent, Status>>;

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<Self::DrainStream>, Status> {
        let controller = self.drain()?.clone();
        let principal = principal_name(&req);
        let req = req.into_inner();
        self.check_target(&req.node_name, &req.node_uid).await?;
        let params = controller.params(&req)?.by(&principal);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        if req.dry_run {
            let planned = controller.dry_run(&params).await?;
            let event = pb::DrainEvent {
                at: Some(SystemTime::now().into()),
                drain_id: params.id.clone(),
                event: Some(pb::drain_event::Event::Planned(planned)),
            };
            tx.send(Ok(event)).await.ok();
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let (params, done) = match controller.claim(params).await? {
            crate::drain::engine::Claim::Drive { params, done } => (params, done),
            // The other agent process on this node drives it (a rollout overlap): follow the
            // Node's record until it ends, then send its final event.
            crate::drain::engine::Claim::Follow(p) | crate::drain::engine::Claim::Ended(p) => {
                let shutdown = self.shutdown.clone();
                tokio::spawn(follow(controller, p, tx, shutdown));
                return Ok(Response::new(ReceiverStream::new(rx)));
            }
        };
        let run = controller.start(params, done)?;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let (history, mut live) = run.attach();
            let mut ended = false;
            for e in history {
                ended |= crate::drain::is_final_event(&e);
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if ended || run.finished() && run.attach().0.iter().any(crate::drain::is_final_event) {
                return;
            }
            if run.is_handed_over() {
                let _ = tx.send(Err(run.handed_over_status())).await;
                return;
            }
            if run.finished() {
                // A drain resumed only as a record (it ended before this agent started).
                let status = run.status();
                let event = pb::DrainEvent {
                    at: Some(SystemTime::now().into()),
                    drain_id: run.id.clone(),
                    event: Some(final_event(status)),
                };
                let _ = tx.send(Ok(event)).await;
                return;
            }
            loop {
                tokio::select! {
                    // Events emitted before a hand-over reach the client before its error.
                    biased;
                    e = live.recv() => match e {
                        Ok(e) => {
                            let last = crate::drain::is_final_event(&e);
                            if tx.send(Ok(e)).await.is_err() || last {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = run.handed_over() => {
                        let _ = tx.send(Err(run.handed_over_status())).await;
                        return;
                    }
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_drain(
        &self,
        _req: Request<pb::GetDrainRequest>,
    ) -> Result<Response<pb::DrainStatus>, Status> {
        match self.drain()?.status().await? {
            Some(status) => Ok(Response::new(status)),
            None => Err(Status::not_found("no drain has run on this node")),
        }
    }

    async fn cancel_drain(
        &self,
        req: Request<pb::CancelDrainRequest>,
    ) -> Result<Response<pb::DrainStatus>, Status> {
        self.check_target(&req.get_ref().node_name, &req.get_ref().node_uid)
            .await?;
        Ok(Response::new(
            self.drain()?.cancel(&req.get_ref().id).await?,
        ))
    }

    type WatchMetricsStream = ReceiverStream<Result<pb::MetricsSnapshot, Status>>;

    async fn watch_metrics(
        &self,
        req: Request<pb::WatchMetricsRequest>,
    ) -> Result<Response<Self::WatchMetricsStream>, Status> {
        let cache = self.snapshots()?.clone();
        let peer = req.remote_addr().map(|a| a.ip());
        let req = req.into_inner();
        let interval = self.watch_interval(req.interval)?;
        // One budget with the KEDA streams, at most half of it per client address.
        let permit = self.streams.take(peer)?;
        // One slot: a slow reader delays its own next snapshot instead of queueing many.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    _ = ticks.tick() => {
                        let snap = cache.fresh().await;
                        if tx.send(Ok(strip(&snap, req.exclude_pods, req.exclude_connections))).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The authenticated caller the auth layer attached to `req` (never the message's `requester`).
fn principal_name<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<auth::Principal>()
        .map_or_else(|| "unknown".to_string(), |p| p.name.clone())
}

/// The stream-ending event for a drain that already ended.
fn final_event(status: pb::DrainStatus) -> pb::drain_event::Event {
    use pb::drain_event::Event;
    match status.phase() {
        pb::DrainPhase::Completed => Event::Completed(status),
        pb::DrainPhase::TimedOut => Event::TimedOut(status),
        pb::DrainPhase::Cancelled => Event::Cancelled(status),
        _ => Event::Failed(status),
    }
}

fn serving_status(state: HealthState) -> ServingStatus {
    match state {
        HealthState::Serving => ServingStatus::Serving,
        HealthState::Unspecified => ServingStatus::Unknown,
        _ => ServingStatus::NotServing,
    }
}

/// grpc.health.v1 whose Watch streams end with status OK at shutdown, like WatchMetrics.
/// tonic-health's never end on their own, so one open Watch held the graceful shutdown until the
/// runtime's deadline, and its client saw UNAVAILABLE instead of a clean end.
/// Watch streams live as long as their client wants, like WatchMetrics: they take a slot of the
/// same budget (issue #15), when the server has one.
pub(crate) struct ShutdownAwareHealth {
    inner: HealthService,
    shutdown: CancellationToken,
    streams: Option<crate::bounds::StreamBudget>,
}

type HealthWatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HealthApi for ShutdownAwareHealth {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(req).await
    }

    type WatchStream = HealthWatchStream;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use futures::StreamExt as _;
        let slot = match &self.streams {
            Some(budget) => Some(budget.take(req.remote_addr().map(|a| a.ip()))?),
            None => None,
        };
        let stream = self.inner.watch(req).await?.into_inner();
        let until = self.shutdown.clone().cancelled_owned();
        // The slot lives in the stream, so it comes back when the stream is dropped.
        let stream = stream.take_until(until).map(move |item| {
            let _held = &slot;
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Keeps grpc.health.v1 in step with `Health` until shutdown, then reports NOT_SERVING.
async fn mirror_health(
    health: Health,
    reporter: tonic_health::server::HealthReporter,
    token: CancellationToken,
) {
    let mut rx = health.subscribe();
    loop {
        let current = rx.borrow_and_update().clone();
        for (name, h) in &current {
            reporter
                .set_service_status(*name, serving_status(h.state))
                .await;
        }
        let overall = if health.ready().is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", overall).await;
        tokio::select! {
            _ = token.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
        }
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

// === connection bounds ===

/// Connections at once: each idle one costs ~15 KiB (issue #15), so ~4 MiB at the cap; an
/// orchestrator, KEDA (or the aggregator) and a few operators need a handful.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections from one source address (over either cap: closed at once).
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// TLS connections that presented no verified client certificate, at once: half the slots, so
/// a flood without credentials never takes the places of certified callers (KEDA; issue #19).
pub const MAX_UNCERTIFIED_CONNECTIONS: usize = MAX_CONNECTIONS / 2;
/// A TLS connection without a verified client certificate is closed unless it makes an
/// admitted call (a credential, or a call the config opens; health does not count) within
/// this: a real caller calls at once, an idle one only holds a place.
pub const UNADMITTED_TIMEOUT: Duration = Duration::from_secs(10);
/// A new connection must send its first bytes (the HTTP/2 preface or a TLS hello) within this,
/// or it is closed: a client connects to talk.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams in flight per connection (unset, hyper allows ~unbounded: issue #15 saw
/// 28,000 KEDA streams over 8 connections).
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// Pings on a quiet connection, and how long the answer may take before it is closed: a peer
/// that vanished stops holding its slot and streams within 40 s.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request message decoded (tonic's default is 4 MiB, buffered before the handler
/// runs: issue #15 OOM-killed the agent with unfinished 4 MiB health checks). Every request of
/// NodeAgent, KEDA and reflection is a few hundred bytes (names, a reason, a few selectors).
pub const MAX_REQUEST_MESSAGE: usize = 16 * 1024;
/// A health check names one service: a few dozen bytes.
pub const MAX_HEALTH_MESSAGE: usize = 1024;
/// HTTP/2 receive windows: how much request data a stream, and a whole connection, may send
/// before the agent has consumed it (hyper's default is 1 MiB each). Requests are tiny, so a
/// small window costs nothing; responses are governed by the client's windows.
pub const HTTP2_STREAM_WINDOW: u32 = 64 * 1024;
pub const HTTP2_CONNECTION_WINDOW: u32 = 128 * 1024;
/// Request headers per stream (hyper's default, made explicit): a bearer token and gRPC's own
/// headers fit in a few KiB.
pub const HTTP2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// An accepted connection holding its place in the connection caps until it closes.
struct CappedConn {
    inner: tokio::net::TcpStream,
    _slot: crate::bounds::PeerSlot,
    /// Set for a TLS connection without a verified client certificate until its first
    /// admitted call; its read fails once the deadline passes before that.
    uncertified: Option<Uncertified>,
}

/// An uncertified connection's place in [`MAX_UNCERTIFIED_CONNECTIONS`] and its deadline.
struct Uncertified {
    _slot: crate::bounds::PeerSlot,
    admitted: auth::Admission,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl CappedConn {
    /// Counts this connection (no verified client certificate) against `caps` and starts its
    /// [`UNADMITTED_TIMEOUT`]; false when the uncertified places are all taken (close it).
    fn uncertified(
        &mut self,
        caps: &Arc<crate::bounds::PeerCaps>,
        admissions: &auth::Admissions,
    ) -> bool {
        let Ok(peer) = self.inner.peer_addr() else {
            return false;
        };
        let Some(slot) = caps.take(peer.ip()) else {
            tracing::debug!(%peer, "grpc: no place for a connection without a client certificate; closed");
            return false;
        };
        self.uncertified = Some(Uncertified {
            _slot: slot,
            admitted: admissions.watch(peer),
            deadline: Box::pin(tokio::time::sleep(UNADMITTED_TIMEOUT)),
        });
        true
    }
}

impl tonic::transport::server::Connected for CappedConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::Connected::connect_info(&self.inner)
    }
}

impl tokio::io::AsyncRead for CappedConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(u) = &mut this.uncertified {
            if u.admitted.is_admitted() {
                // Admitted: it no longer counts as uncertified, and stays.
                this.uncertified = None;
            } else if u.deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!(
                    "grpc: a connection without a client certificate made no admitted call; closed"
                );
                return std::task::Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
            }
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CappedConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts on `listener` until `token`. A connection over a cap is closed at once (never
/// queued ahead of a legitimate one); one that sends nothing within [`FIRST_BYTES_TIMEOUT`] is
/// closed; the rest pass `handshake` (TLS, or nothing) in their own task and go to tonic, each
/// holding its slot until it closes.
fn capped_incoming<C, H, F>(
    listener: tokio::net::TcpListener,
    token: CancellationToken,
    handshake: H,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<C>>
where
    C: Send + 'static,
    H: Fn(CappedConn) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Option<C>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshake = Arc::new(handshake);
    let caps = crate::bounds::PeerCaps::new(MAX_CONNECTIONS_PER_PEER, MAX_CONNECTIONS);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = token.cancelled() => return,
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "grpc: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = caps.take(peer.ip()) else {
                tracing::debug!(%peer, "grpc: connection cap reached; closed");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let handshake = handshake.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.peek(&mut first)).await
                    && n > 0
                    && let Some(conn) = handshake(CappedConn {
                        inner: stream,
                        _slot: slot,
                        uncertified: None,
                    })
                    .await
                {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Binds the gRPC port without SO_REUSEPORT, waiting for a predecessor to release it.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ApiError> {
    crate::listen::tcp_exclusive_when_free(addr, crate::listen::PREDECESSOR_WAIT)
        .await
        .map_err(|source| ApiError::Bind { addr, source })
}

/// grpc.health.v1 mirroring `health` until `token` is cancelled (then "" is NOT_SERVING and
/// open Watch streams end with OK), its Watch streams counted in `streams` when given. Shared
/// by the agent and the aggregator; abort the returned task once the server stopped.
pub(crate) fn health_service(
    health: Health,
    token: &CancellationToken,
    streams: Option<crate::bounds::StreamBudget>,
) -> (
    HealthServer<ShutdownAwareHealth>,
    tokio::task::JoinHandle<()>,
) {
    let reporter = HealthReporter::new();
    let service = HealthServer::new(ShutdownAwareHealth {
        inner: HealthService::from_health_reporter(reporter.clone()),
        shutdown: token.clone(),
        streams,
    })
    .max_decoding_message_size(MAX_HEALTH_MESSAGE);
    let mirror = tokio::spawn(mirror_health(health, reporter, token.clone()));
    (service, mirror)
}

use tonic_reflection::server::{v1 as reflection_v1, v1alpha as reflection_v1alpha};

/// Server reflection over this crate's services and health, protocol v1 (current grpcurl).
pub fn reflection_v1()
-> Result<reflection_v1::ServerReflectionServer<impl reflection_v1::ServerReflection>, ApiError> {
    Ok(reflection_builder().build_v1()?)
}

/// The same in protocol v1alpha, for the clients that speak only it: Python's grpcio-reflection,
/// grpcui, Postman, older grpcurl.
pub fn reflection_v1alpha() -> Result<
    reflection_v1alpha::ServerReflectionServer<impl reflection_v1alpha::ServerReflection>,
    ApiError,
> {
    Ok(reflection_builder().build_v1alpha()?)
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Serves until `token` is cancelled; open streams are ended by the same token.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: NodeAgentService,
    health: Health,
    auth: auth::ServerAuth,
    token: CancellationToken,
) -> Result<(), ApiError> {
    // Off in the shipped manifests: reflection maps the API for anyone who can connect.
    let (reflection_v1, reflection_v1alpha) = if service.reflection {
        (
            Some(reflection_v1()?.max_decoding_message_size(MAX_REQUEST_MESSAGE)),
            Some(reflection_v1alpha()?.max_decoding_message_size(MAX_REQUEST_MESSAGE)),
        )
    } else {
        (None, None)
    };
    // KEDA's scaler reads the same snapshot cache as GetMetrics; without metrics it is absent
    // (UNIMPLEMENTED), as there is nothing to scale on.
    let scaler = service.snapshots.clone().map(|cache| {
        ExternalScalerServer::new(
            ScalerService::new(
                Arc::new(SnapshotSource(cache)),
                AGENT_STREAM_POLL.max(service.min_watch_interval),
                token.clone(),
            )
            .with_stream_budget(service.streams.clone()),
        )
        .max_decoding_message_size(MAX_REQUEST_MESSAGE)
    });
    let (health_service, mirror) =
        health_service(health.clone(), &token, Some(service.streams.clone()));
    let admissions = auth.layer.admissions();
    let router = server_builder()
        .layer(api_layers(auth.layer))
        .add_service(
            node_agent_server::NodeAgentServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_MESSAGE),
        )
        .add_optional_service(scaler)
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha);
    let result = serve_router(router, listener, auth.tls, admissions, health, "api", token).await;
    mirror.abort();
    Ok(result?)
}

/// The HTTP/2 limits every gRPC server of this crate runs with (the agent's and the
/// aggregator's): streams per connection, keepalive, flow-control windows, header list size.
pub(crate) fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .http2_adaptive_window(Some(false))
        .http2_max_header_list_size(HTTP2_MAX_HEADER_LIST)
}

/// The layers every gRPC server of this crate runs its calls through (the agent's and the
/// aggregator's): the in-flight cap outermost (a refused request costs no auth work), then
/// authentication and authorization.
pub(crate) type ApiLayers = tower_layer::Stack<
    tower_layer::Stack<auth::AuthLayer, inflight::InFlightLayer>,
    tower_layer::Identity,
>;

pub(crate) fn api_layers(
    auth: auth::AuthLayer,
) -> tower_layer::Stack<auth::AuthLayer, inflight::InFlightLayer> {
    tower_layer::Stack::new(auth, inflight::InFlightLayer::default())
}

/// Serves `router` on `listener` until `token`: connections capped per peer and in all, over
/// `tls` when given (re-read on change, refusals in `capability`'s health detail).
pub(crate) async fn serve_router(
    router: tonic::transport::server::Router<ApiLayers>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<server_tls::ReloadingServerTls>>,
    admissions: auth::Admissions,
    health: Health,
    capability: &'static str,
    token: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    match tls {
        None => {
            let plain = |conn| std::future::ready(Some(conn));
            router
                .serve_with_incoming_shutdown(
                    capped_incoming(listener, token.clone(), plain),
                    token.cancelled_owned(),
                )
                .await
        }
        Some(tls) => {
            let watch = tokio::spawn(watch_tls_files(
                tls.clone(),
                health,
                capability,
                token.clone(),
            ));
            // A connection without a verified client certificate takes an uncertified place
            // too, and keeps it only by making an admitted call in time (issue #19).
            let uncertified =
                crate::bounds::PeerCaps::new(MAX_CONNECTIONS_PER_PEER, MAX_UNCERTIFIED_CONNECTIONS);
            let handshake = move |conn: CappedConn| {
                let (tls, uncertified, admissions) =
                    (tls.clone(), uncertified.clone(), admissions.clone());
                async move {
                    let mut stream = tls.accept(conn).await?;
                    let certified = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .is_some_and(|c| !c.is_empty());
                    if !certified && !stream.get_mut().0.uncertified(&uncertified, &admissions) {
                        return None;
                    }
                    Some(stream)
                }
            };
            let result = router
                .serve_with_incoming_shutdown(
                    capped_incoming(listener, token.clone(), handshake),
                    token.cancelled_owned(),
                )
                .await;
            watch.abort();
            result
        }
    }
}

/// Re-checks the TLS files every `server_tls::CHECK_INTERVAL` (connections check them too) and
/// keeps `capability`'s health detail naming a refused rotation. The capability stays
/// SERVING: the previous certificate still serves every call, and failing readiness on every
/// node at once for one bad Secret would take the whole fleet's agents out of rotation.
async fn watch_tls_files(
    tls: Arc<server_tls::ReloadingServerTls>,
    health: Health,
    capability: &'static str,
    token: CancellationToken,
) {
    loop {
        tls.refresh();
        let detail = match tls.refusal() {
            Some(why) => format!("TLS files refused, serving the previous certificate: {why}"),
            None => String::new(),
        };
        health.set(capability, HealthState::Serving, detail);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(server_tls::CHECK_INTERVAL) => {}
        }
    }
}

/// How often a follower re-reads the Node's drain record.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// Streams a drain driven by the other agent process on this node, from the Node's record: the
/// final event once it ends. If this process adopts it meanwhile, its own events take over.
async fn follow(
    controller: Arc<crate::drain::engine::DrainController>,
    record: crate::drain::state::Persisted,
    tx: tokio::sync::mpsc::Sender<Result<pb::DrainEvent, Status>>,
    shutdown: CancellationToken,
) {
    let id = record.id.clone();
    let mut last = record;
    loop {
        if crate::drain::is_terminal(last.phase()) {
            let event = pb::DrainEvent {
                at: Some(SystemTime::now().into()),
                drain_id: id.clone(),
                event: Some(final_event(last.status_header())),
            };
            let _ = tx.send(Ok(event)).await;
            return;
        }
        // A run handed over to the other process is not "adopted here": its events stopped.
        if let Some(run) = controller
            .current()
            .filter(|r| r.id == id && !r.is_handed_over())
        {
            // Adopted here: replay and follow this process's own events.
            let (history, mut live) = run.attach();
            for e in history {
                let end = crate::drain::is_final_event(&e);
                if tx.send(Ok(e)).await.is_err() || end {
                    return;
                }
            }
            loop {
                tokio::select! {
                    biased;
                    e = live.recv() => {
                        let Ok(e) = e else { return };
                        let end = crate::drain::is_final_event(&e);
                        if tx.send(Ok(e)).await.is_err() || end {
                            return;
                        }
                    }
                    _ = run.handed_over() => {
                        let _ = tx.send(Err(run.handed_over_status())).await;
                        return;
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        match controller.recorded(&id).await {
            Ok(Some(p)) => last = p,
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "following a drain: could not read the node"),
        }
    }
}
