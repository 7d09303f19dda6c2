//! The cap on gRPC requests in flight across every connection (issue #15): a request holds a
//! slot from its headers until its handler answered, i.e. while its message is still arriving
//! and being decoded. Over the cap (in all, or for one client address) it is answered
//! RESOURCE_EXHAUSTED at once, so a client that starts thousands of requests and never finishes
//! their bodies cannot make the agent hold them all. Long-lived response streams are not
//! counted here (their handler returned); they have their own budget (`bounds::StreamBudget`:
//! WatchMetrics, KEDA's streams and grpc.health.v1 Watch).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::bounds::PeerCaps;

/// Requests in flight in all: each costs at most its message limit plus its headers and stream
/// state (~40 KiB), so ~40 MiB at the cap, well inside the DaemonSet's 256 MiB.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 1024;
/// Requests in flight from one client address: a busy orchestrator or aggregator needs far
/// fewer; four addresses at their share fill the cap, so one cannot.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 256;

/// Tower layer for `tonic::transport::Server::layer`.
#[derive(Clone, Debug)]
pub struct InFlightLayer(Arc<PeerCaps>);

impl InFlightLayer {
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self(PeerCaps::new(per_peer, total))
    }
}

impl Default for InFlightLayer {
    fn default() -> Self {
        Self::new(MAX_IN_FLIGHT_PER_PEER, MAX_IN_FLIGHT_REQUESTS)
    }
}

impl<S> tower_layer::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlight {
            inner,
            caps: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct InFlight<S> {
    inner: S,
    caps: Arc<PeerCaps>,
}

type BoxedResponse<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for InFlight<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxedResponse<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // No address (not a TCP connection): counted as one client.
        let ip =
            super::auth::peer_addr(&req).map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let Some(slot) = self.caps.take(ip) else {
            tracing::debug!(%ip, method = req.uri().path(), "grpc: in-flight request cap reached; refused");
            let status = tonic::Status::resource_exhausted(format!(
                "too many requests in flight ({} in all, {} per client address)",
                self.caps.total(),
                self.caps.per_peer()
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let answered = self.inner.call(req);
        Box::pin(async move {
            let response = answered.await;
            drop(slot);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codegen::Service as _;

    /// A service whose answers each wait for a permit of `open`: requests stay in flight.
    #[derive(Clone)]
    struct Held(Arc<tokio::sync::Semaphore>);

    impl tonic::codegen::Service<http::Request<()>> for Held {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxedResponse<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let open = self.0.clone();
            Box::pin(async move {
                open.acquire().await.expect("open").forget();
                Ok(http::Response::new(tonic::body::Body::empty()))
            })
        }
    }

    fn grpc_status(r: &http::Response<tonic::body::Body>) -> Option<String> {
        r.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn requests_over_the_cap_are_refused_at_once_and_slots_come_back() {
        use tower_layer::Layer as _;
        let open = Arc::new(tokio::sync::Semaphore::new(0));
        let mut svc = InFlightLayer::new(2, 2).layer(Held(open.clone()));
        let held: Vec<_> = (0..2).map(|_| svc.call(http::Request::new(()))).collect();
        let refused = svc.call(http::Request::new(())).await.unwrap();
        assert_eq!(
            grpc_status(&refused).as_deref(),
            Some("8"),
            "RESOURCE_EXHAUSTED"
        );
        open.add_permits(2);
        for r in futures::future::join_all(held).await {
            assert_eq!(grpc_status(&r.unwrap()), None, "answered by the service");
        }
        let again = svc.call(http::Request::new(()));
        open.add_permits(1);
        assert_eq!(
            grpc_status(&again.await.unwrap()),
            None,
            "a slot is free again"
        );
    }
}
