//! The agent's HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz` (live) and `/readyz`
//! (ready), on `metrics.listen`.
//!
//! Always runs, even with resource collection switched off, because kubelet probes need it.
//! Stops accepting when its token is cancelled; in-flight scrapes finish.

use std::net::SocketAddr;
use std::sync::Arc;

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

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    crate::listen::tcp(addr).map_err(|source| HttpError::Bind { addr, source })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    token: CancellationToken,
) -> Result<(), HttpError> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(token.cancelled_owned())
        .await
        .map_err(HttpError::Serve)
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
    axum::serve(listener, app)
        .with_graceful_shutdown(token.cancelled_owned())
        .await
        .map_err(HttpError::Serve)
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
