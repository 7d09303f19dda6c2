//! A fake EC2 instance metadata service (IMDSv2 only) for tests: plain HTTP on a loopback port,
//! served by its own thread and tokio runtime, stopped on drop.
//!
//! `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds` (1..=21600) and returns
//! a fresh token; every GET needs a token it issued in `X-aws-ec2-metadata-token` (401
//! otherwise, as IMDS does with `HttpTokens: required`). Served documents:
//! `/latest/meta-data/spot/instance-action` (404 until `post_spot`) and
//! `/latest/meta-data/events/maintenance/scheduled` (`[]` until `post_event`). Every request is
//! recorded with the token header it carried.
//!
//! ```no_run
//! use nodekeeper_tests::fake_imds::FakeImds;
//! let imds = FakeImds::start();
//! imds.post_spot("terminate", "2026-11-23T12:00:00Z");
//! assert!(imds.requests().iter().all(|r| r.method != "GET" || r.token_valid));
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One request as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsRequest {
    pub method: String,
    pub path: String,
    /// `X-aws-ec2-metadata-token`, when sent.
    pub token: Option<String>,
    /// The token was one this fake issued.
    pub token_valid: bool,
    pub status: u16,
}

#[derive(Debug, Default)]
struct Inner {
    tokens: HashSet<String>,
    issued: u64,
    spot: Option<Value>,
    events: Vec<Value>,
    requests: Vec<ImdsRequest>,
}

/// A running fake IMDS.
pub struct FakeImds {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeImds {
    pub fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-imds")
            .enable_all()
            .build()
            .expect("fake IMDS runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-imds".into())
            .spawn(move || {
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        r = axum::serve(l, app) => { if let Err(e) = r { eprintln!("fake IMDS: {e}"); } }
                        _ = rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .expect("spawn fake IMDS thread");
        Self {
            inner,
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, for `drain.imds.endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Posts a spot interruption notice: `{"action": action, "time": time}` (time as RFC 3339).
    pub fn post_spot(&self, action: &str, time: &str) {
        self.inner.lock().unwrap().spot = Some(json!({"action": action, "time": time}));
    }

    pub fn clear_spot(&self) {
        self.inner.lock().unwrap().spot = None;
    }

    /// Adds a scheduled maintenance event; `not_before` as IMDS writes it
    /// (`21 Jan 2019 09:00:43 GMT`), `state` `active`, `completed` or `canceled`.
    pub fn post_event(&self, code: &str, event_id: &str, not_before: &str, state: &str) {
        let description = match state {
            "completed" => format!("[Completed] {code}"),
            "canceled" => format!("[Canceled] {code}"),
            _ => format!("scheduled {code}"),
        };
        self.inner.lock().unwrap().events.push(json!({
            "Code": code,
            "Description": description,
            "EventId": event_id,
            "NotBefore": not_before,
            "NotAfter": not_before,
            "State": state,
        }));
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<ImdsRequest> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.inner.lock().unwrap().issued
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let headers: HeaderMap = req.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut st = inner.lock().unwrap();
    let token = header("x-aws-ec2-metadata-token");
    let token_valid = token.as_ref().is_some_and(|t| st.tokens.contains(t));
    let (status, body) = match (method.as_str(), path.as_str()) {
        ("PUT", "/latest/api/token") => {
            match header("x-aws-ec2-metadata-token-ttl-seconds").and_then(|v| v.parse::<u32>().ok())
            {
                Some(ttl) if (1..=21600).contains(&ttl) => {
                    st.issued += 1;
                    let t = format!("fake-token-{}", st.issued);
                    st.tokens.insert(t.clone());
                    (StatusCode::OK, t)
                }
                _ => (StatusCode::BAD_REQUEST, "missing or invalid ttl".into()),
            }
        }
        ("GET", _) if !token_valid => (StatusCode::UNAUTHORIZED, String::new()),
        ("GET", "/latest/meta-data/spot/instance-action") => match &st.spot {
            Some(v) => (StatusCode::OK, v.to_string()),
            None => (StatusCode::NOT_FOUND, "Not Found".into()),
        },
        ("GET", "/latest/meta-data/events/maintenance/scheduled") => {
            (StatusCode::OK, Value::Array(st.events.clone()).to_string())
        }
        ("GET", _) => (StatusCode::NOT_FOUND, "Not Found".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
    };
    st.requests.push(ImdsRequest {
        method,
        path,
        token,
        token_valid,
        status: status.as_u16(),
    });
    (status, body).into_response()
}
