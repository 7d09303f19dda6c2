//! The agent's HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz` (live) and `/readyz`
//! (ready), on `metrics.listen`.
//!
//! Always runs, even with resource collection switched off, because kubelet probes need it.
//! Stops accepting when its token is cancelled; in-flight scrapes finish.
//!
//! Bounded against anonymous clients (it needs no credentials): at most [`MAX_CONNECTIONS`]
//! connections, [`MAX_CONNECTIONS_PER_PEER`] per source address (one flooding host cannot take
//! the slots of kubelet and Prometheus); a connection over either cap is closed at once, so it
//! never waits in the backlog ahead of a legitimate one. Request headers must arrive within
//! [`HEADER_READ_TIMEOUT`] (half-open requests cost a slot for at most that), and a kept-alive
//! connection is closed after [`MAX_CONNECTION_AGE`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::metrics::SnapshotCache;
use crate::runtime::Health;

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    /// `None` when resource collection is disabled: only the agent's own metrics are served.
    pub snapshots: Option<Arc<SnapshotCache>>,
    pub health: Health,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listen address could not be bound (in use, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Connections served at once. Each costs about 18 KiB while open (hyper's buffers, the task),
/// so the cap is ~9 MiB: far inside the agent's 256 MiB limit (docs/configuration.md,
/// "Listener bounds"), and far above what kubelet's probes and a few scrapers use.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections from one source address: kubelet probes one at a time, a Prometheus replica
/// keeps one or two; 16 leaves room for several on one host (a node IP) and no more.
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// The whole request head must arrive within this: a scraper sends it in one packet; a client
/// that trickles it is holding a slot.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A kept-alive connection is closed (gracefully, between requests) after this: Prometheus
/// reconnects every minute at worst; an idle hoarder cannot keep a slot forever.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// hyper's read buffer per connection holds the request head; its default grows to ~408 KiB
/// before a head is refused, so 512 connections sending fat unfinished heads cost ~200 MiB.
/// A scrape's or probe's head is under 1 KiB: a larger one is refused (431) and closed.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The caps one HTTP server applies (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct HttpBounds {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// hyper's `max_buf_size` (at least 8 KiB): the largest request head it buffers.
    pub max_head_bytes: usize,
}

impl HttpBounds {
    /// The agent's metrics and health endpoint: worst case 512 x (16 + ~18) KiB, ~17 MiB.
    pub const AGENT: Self = Self {
        max_connections: MAX_CONNECTIONS,
        max_connections_per_peer: MAX_CONNECTIONS_PER_PEER,
        max_head_bytes: MAX_HEAD_BYTES,
    };
    /// The dns-guard's `/metrics` (48 MiB memory limit; one or two Prometheus replicas scrape
    /// it, no probe): worst case 64 x (16 + ~18) KiB, ~2 MiB.
    pub const GUARD: Self = Self {
        max_connections: 64,
        max_connections_per_peer: 8,
        max_head_bytes: MAX_HEAD_BYTES,
    };
}

/// On shutdown, in-flight requests get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds the metrics port without SO_REUSEPORT, waiting for a predecessor to release it.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    crate::listen::tcp_exclusive_when_free(addr, crate::listen::PREDECESSOR_WAIT)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    token: CancellationToken,
) -> Result<(), HttpError> {
    serve_bounded(listener, router(state), HttpBounds::AGENT, token).await
}

/// Serves `app` over HTTP/1 with `bounds` and the module's timeouts until `token`; then
/// in-flight requests get [`DRAIN_TIMEOUT`].
pub async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: Router,
    bounds: HttpBounds,
    token: CancellationToken,
) -> Result<(), HttpError> {
    let peers =
        crate::bounds::PeerCaps::new(bounds.max_connections_per_peer, bounds.max_connections);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = token.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Some(slot) = peers.take(peer.ip()) else {
            tracing::debug!(%peer, "http: connection cap reached; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let token = token.clone();
        conns.spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(bounds.max_head_bytes.max(8192))
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        });
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_millis(500), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Serves only `/metrics` for `registry` (the dns-guard sidecar's endpoint) until `token`.
pub async fn serve_registry(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    token: CancellationToken,
) -> Result<(), HttpError> {
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let registry = registry.clone();
            async move { encode(&registry, &headers) }
        }),
    );
    serve_bounded(listener, app, HttpBounds::GUARD, token).await
}

/// OpenMetrics when the scraper asks for it (Prometheus does), the classic text format otherwise.
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn metrics(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(cache) = &s.snapshots {
        cache.get().await;
    }
    encode(&s.registry, &headers)
}

fn encode(registry: &Registry, headers: &HeaderMap) -> Response {
    let mut body = String::with_capacity(16 * 1024);
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) if wants_openmetrics(headers) => {
            ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response()
        }
        Ok(()) => {
            let body = crate::metrics::exposition::openmetrics_to_prometheus(&body);
            ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], body).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn healthz(State(s): State<AdminState>) -> Response {
    match s.health.live() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {why}\n")).into_response(),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}
