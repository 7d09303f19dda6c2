//! The Kubernetes API client and this node's identity.
//!
//! Decides standalone vs connected at start: `auto` connects when a kubeconfig or the in-cluster
//! environment is present and runs standalone otherwise; capabilities that need the API log once
//! that they are off. Never lists cluster-wide objects.

use crate::config::{Config, KubernetesMode};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// `kubernetes.mode: required` and no client configuration was found or it was unusable.
    #[error("kubernetes.mode is required but no API client could be configured: {0}")]
    Required(String),
    /// No node name in config, `NODE_NAME` or the host name.
    #[error("cannot tell this node's name: set nodeName or NODE_NAME ({0})")]
    NodeName(String),
}

/// A client when the API is configured, `None` in standalone mode.
pub async fn connect(mode: KubernetesMode) -> Result<Option<kube::Client>, KubeError> {
    if mode == KubernetesMode::Standalone {
        tracing::info!(
            "standalone mode (kubernetes.mode: standalone): the Kubernetes API is not used"
        );
        return Ok(None);
    }
    let attempt = async {
        let mut config = kube::Config::infer().await.map_err(|e| e.to_string())?;
        // kube's built-in retry re-sends 429s for minutes without Retry-After; the drain must see
        // an eviction's 429 (a PodDisruptionBudget) at once to report it and back off itself, and
        // watchers have their own backoff.
        config.default_retry = false;
        kube::Client::try_from(config)
            .map(retry_after_headers)
            .map_err(|e| e.to_string())
    };
    match (attempt.await, mode) {
        (Ok(client), _) => Ok(Some(client)),
        (Err(e), KubernetesMode::Required) => Err(KubeError::Required(e)),
        (Err(e), _) => {
            tracing::info!(reason = %e, "no kubeconfig or in-cluster environment: standalone mode, features that need the API are off");
            Ok(None)
        }
    }
}

/// First wait after an API server that did not answer; doubles up to [`FIRST_ANSWER_MAX_WAIT`].
const FIRST_ANSWER_FIRST_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// Thousands of agents restarting against a recovering API server each ask at most this often.
const FIRST_ANSWER_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Asks the API server for `/version` until it answers (with jittered backoff; each try bounded
/// by [`API_CALL_TIMEOUT`]) and returns its git version, or `None` when `token` is cancelled.
/// Readiness waits for this; the listeners never do (issue #15).
pub async fn first_answer(
    client: &kube::Client,
    token: &tokio_util::sync::CancellationToken,
) -> Option<String> {
    let mut wait = FIRST_ANSWER_FIRST_WAIT;
    loop {
        let attempt = tokio::time::timeout(API_CALL_TIMEOUT, client.apiserver_version());
        let error = tokio::select! {
            _ = token.cancelled() => return None,
            r = attempt => match r {
                Ok(Ok(info)) => return Some(info.git_version),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {API_CALL_TIMEOUT:?}"),
            },
        };
        tracing::warn!(%error, ?wait, "the API server did not answer; retrying");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.subsec_nanos())
            .unwrap_or(0);
        // Jitter in [wait/2, wait): agents restarted together do not ask in step.
        let jittered = wait.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0);
        tokio::select! {
            _ = token.cancelled() => return None,
            _ = tokio::time::sleep(jittered) => {}
        }
        wait = (wait * 2).min(FIRST_ANSWER_MAX_WAIT);
    }
}

/// Config's `nodeName` (flags and `NODE_NAME` land there), else the host name, lowercased as
/// the kubelet does by default.
pub fn node_name(config: &Config) -> Result<String, KubeError> {
    if let Some(name) = &config.node_name {
        return Ok(name.clone());
    }
    let host = nix::unistd::gethostname().map_err(|e| KubeError::NodeName(e.to_string()))?;
    let host = host.to_string_lossy().to_lowercase();
    if host.is_empty() {
        return Err(KubeError::NodeName("the host name is empty".into()));
    }
    Ok(host)
}

// === this node, watched ===

/// What capabilities need to know about this Node object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub uid: String,
    /// `spec.unschedulable`: GetNode answers from here, not with a GET per call.
    pub unschedulable: bool,
}

/// Watches only this node (field selector `metadata.name=`), never the whole node list, and
/// publishes its labels on every change. Backs off with jitter on errors (kube-runtime's
/// default backoff) so thousands of agents do not hammer a recovering API server.
pub fn watch_node(
    client: kube::Client,
    node_name: String,
    token: tokio_util::sync::CancellationToken,
) -> tokio::sync::watch::Receiver<Option<NodeInfo>> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let (tx, rx) = tokio::sync::watch::channel(None);
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff().applied_objects();
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                next = stream.next() => match next {
                    Some(Ok(node)) => {
                        let info = NodeInfo {
                            labels: node.metadata.labels.unwrap_or_default(),
                            annotations: node.metadata.annotations.unwrap_or_default(),
                            uid: node.metadata.uid.unwrap_or_default(),
                            unschedulable: node.spec.and_then(|s| s.unschedulable).unwrap_or(false),
                        };
                        tx.send_if_modified(|cur| {
                            let changed = cur.as_ref() != Some(&info);
                            *cur = Some(info);
                            changed
                        });
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, node = %node_name, "node watch error; retrying with backoff"),
                    None => break,
                },
            }
        }
    });
    rx
}

/// Sets (or with `None`, removes) annotations on this node with one JSON merge patch.
pub async fn annotate_node(
    client: &kube::Client,
    node_name: &str,
    annotations: &[(&str, Option<String>)],
) -> Result<(), kube::Error> {
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let map: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.clone()
                    .map_or(serde_json::Value::Null, serde_json::Value::String),
            )
        })
        .collect();
    let patch = serde_json::json!({ "metadata": { "annotations": map } });
    // A named timeout: a hung API server must not stall the capability's loop.
    tokio::time::timeout(
        API_CALL_TIMEOUT,
        api.patch(
            node_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        ),
    )
    .await
    .map_err(|_| {
        kube::Error::Service(
            format!("PATCH node {node_name} timed out after {API_CALL_TIMEOUT:?}").into(),
        )
    })??;
    Ok(())
}

/// One API call: long enough for a loaded API server (p99 of a node PATCH is well under a
/// second), short enough that a capability loop notices a dead one within its interval.
pub const API_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

// === this node's pods, watched ===

/// This node's pods as last seen by the watch: a kube-runtime reflector store.
pub type PodStore = kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Pod>;

/// How long a watch error keeps the watch "failing" without another one. kube's watcher
/// retries with backoff capped at 30 s and reports each failed retry, so a watch still failing
/// errs again well within this; but a re-watch that succeeds yields no event until a pod
/// changes, so on a quiet node only the end of errors says the watch is back (resumed from its
/// resourceVersion, missing nothing). 90 s: three capped retries plus a slow API call.
pub const WATCH_FAILING_GRACE: std::time::Duration = std::time::Duration::from_secs(90);

/// Whether a watch is current: the time of its last successful list/watch event and, while it
/// is failing, the error since then. A quiet watch sends nothing, so staleness is judged by
/// errors (kube's watcher reports each failed re-list/re-watch), not by silence.
#[derive(Debug, Clone, Default)]
pub struct WatchHealth(std::sync::Arc<std::sync::Mutex<Recorded>>);

#[derive(Debug, Clone, Default)]
struct Recorded {
    last_ok: Option<std::time::SystemTime>,
    /// When the current failure began, when its last error came, and that error.
    failing: Option<(std::time::SystemTime, std::time::SystemTime, String)>,
    /// Since when the watcher is re-listing (`Init` seen, `InitDone` not yet): the store
    /// misses whatever changed since the watch broke until the list completes.
    relisting: Option<std::time::SystemTime>,
    /// Since when a watch request has been sent and not answered (no response headers yet):
    /// set and cleared by [`track_watches`]'s client. Not current once it lasts longer than
    /// [`WATCH_ANSWER_GRACE`]: the view misses every change since the last watch ended.
    watch_unanswered: Option<std::time::SystemTime>,
}

/// A watch's state as `WatchHealth::state` judges it now.
#[derive(Debug, Clone, Default)]
pub struct WatchHealthState {
    pub last_ok: Option<std::time::SystemTime>,
    /// When the current failure began, and its last error; `None` once no error came for
    /// `WATCH_FAILING_GRACE`. A re-list under way (kube's watcher sent `Init`, not yet
    /// `InitDone`) is failing too, however long it takes: the view is not current before it
    /// completes. So is a watch request unanswered for longer than [`WATCH_ANSWER_GRACE`]
    /// (recorded by [`track_watches`]).
    pub failing: Option<(std::time::SystemTime, String)>,
}

impl WatchHealth {
    /// Records one event of kube's watcher: `Init` starts a re-list (not current, even though
    /// it follows an error: the LIST may hang or be slow), `InitDone` ends it, any other
    /// event is a successful one.
    pub fn record_event<K>(&self, event: &kube::runtime::watcher::Event<K>) {
        use kube::runtime::watcher::Event;
        match event {
            Event::Init => {
                let mut s = self.0.lock().expect("not poisoned");
                let now = std::time::SystemTime::now();
                s.relisting.get_or_insert(now);
                s.last_ok = Some(now);
            }
            Event::InitApply(_) => {
                self.0.lock().expect("not poisoned").last_ok = Some(std::time::SystemTime::now())
            }
            Event::InitDone | Event::Apply(_) | Event::Delete(_) => self.record_ok(),
        }
    }

    pub fn record_ok(&self) {
        let mut s = self.0.lock().expect("not poisoned");
        s.last_ok = Some(std::time::SystemTime::now());
        s.failing = None;
        s.relisting = None;
    }

    pub fn record_error(&self, error: &dyn std::fmt::Display) {
        let now = std::time::SystemTime::now();
        let mut s = self.0.lock().expect("not poisoned");
        let since = s.failing.as_ref().map_or(now, |(t, _, _)| *t);
        s.failing = Some((since, now, error.to_string()));
    }

    /// A watch request was sent (by [`track_watches`]'s client); unanswered until the guard
    /// is dropped (its response headers came, it failed, or it was cancelled).
    fn watch_sent(&self) -> WatchAnswerPending {
        self.0.lock().expect("not poisoned").watch_unanswered = Some(std::time::SystemTime::now());
        WatchAnswerPending(self.clone())
    }

    pub fn state(&self) -> WatchHealthState {
        self.state_at(std::time::SystemTime::now())
    }

    fn state_at(&self, now: std::time::SystemTime) -> WatchHealthState {
        let s = self.0.lock().expect("not poisoned");
        let failing = s.failing.as_ref().and_then(|(since, last, e)| {
            let quiet = now.duration_since(*last).unwrap_or_default();
            (quiet < WATCH_FAILING_GRACE).then(|| (*since, e.clone()))
        });
        let relisting = s.relisting.map(|since| {
            let secs = now.duration_since(since).unwrap_or_default().as_secs_f64();
            let why = match &s.failing {
                Some((_, _, e)) => format!(
                    "re-listing for {secs:.0}s after a watch error ({e}); not current until the \
                     list completes"
                ),
                None => format!("re-listing for {secs:.0}s; not current until the list completes"),
            };
            (
                s.failing
                    .as_ref()
                    .map_or(since, |(t, _, _)| (*t).min(since)),
                why,
            )
        });
        let unanswered = s.watch_unanswered.and_then(|sent| {
            let waited = now.duration_since(sent).unwrap_or_default();
            (waited > WATCH_ANSWER_GRACE).then(|| {
                (
                    sent,
                    format!(
                        "a watch request sent {:.1}s ago has not been answered; the view misses \
                         every change since the watch ended",
                        waited.as_secs_f64()
                    ),
                )
            })
        });
        WatchHealthState {
            last_ok: s.last_ok,
            failing: relisting.or(unanswered).or(failing),
        }
    }
}

/// Clears [`Recorded::watch_unanswered`] on drop.
struct WatchAnswerPending(WatchHealth);

impl Drop for WatchAnswerPending {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.0.lock() {
            s.watch_unanswered = None;
        }
    }
}

/// How long a watch request may go unanswered (no response headers) before the view it feeds
/// is not current. A routine re-watch (after the API server's `timeoutSeconds`, a restart, a
/// proxy's idle cut) is answered in milliseconds, even by a loaded API server serving it from
/// its watch cache; 2 s keeps those restarts from flapping KEDA queries to UNAVAILABLE, while a
/// hung re-watch is noticed within seconds instead of at the client's read timeout (minutes).
pub const WATCH_ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A watch request unanswered this long is cancelled and fails (kube's watcher records the
/// error and re-watches from the same resourceVersion with backoff): a hung API server or proxy
/// must not hold a watch for kube's client read timeout (minutes). As [`API_CALL_TIMEOUT`]: the
/// response headers of a watch come as fast as those of any call.
pub const WATCH_ANSWER_TIMEOUT: std::time::Duration = API_CALL_TIMEOUT;

/// Server-side `timeoutSeconds` of the pod watches: the API server ends each watch after this
/// and kube's watcher re-watches from its resourceVersion (missing nothing), and kube's watcher
/// treats a watch silent for this plus 5 s as dead. A watch that was answered and then went
/// silent (a proxy that stopped forwarding) is recycled within ~2 minutes instead of kube's
/// default 290 s; one re-watch per node every 2 minutes is served from the API server's watch
/// cache (client-go's reflectors re-watch every 5-10 minutes).
pub const POD_WATCH_TIMEOUT_SECS: u32 = 120;

/// Largest error body [`retry_after_headers`] reads to carry a `Retry-After` into it; an API
/// server's Status is a few hundred bytes, a proxy's error page a few KiB.
const ERROR_BODY_MAX: usize = 64 * 1024;

/// `client` whose 429 and 503 answers carry their `Retry-After` header (delay-seconds) into the
/// Status kube reads as `details.retryAfterSeconds`. kube's client turns an error answer into an
/// `Error::Api` from the body alone and drops the headers, so a proxy or load balancer in front
/// of the API server that answers 429 in plain text with only the header would be retried at the
/// caller's own back-off. A Status that already names a delay keeps it; an HTTP-date
/// `Retry-After` is not read (API servers and the proxies seen send seconds).
pub fn retry_after_headers(client: kube::Client) -> kube::Client {
    wrap_client(client, |client, req| {
        Box::pin(carry_retry_after(client, req))
    })
}

/// A request kube's client sends, and its answer.
type ApiRequest = http::Request<kube::client::Body>;
type ApiResponse = http::Response<kube::client::Body>;
type ApiAnswer = futures::future::BoxFuture<'static, Result<ApiResponse, kube::Error>>;

/// `client` with every request sent through `around(client, request)`: the one way this crate
/// layers behaviour on its API client (`kube::Client` runs over any tower service).
fn wrap_client<F>(client: kube::Client, around: F) -> kube::Client
where
    F: Fn(kube::Client, ApiRequest) -> ApiAnswer + Clone + Send + 'static,
{
    let ns = client.default_namespace().to_string();
    kube::Client::new(Around { client, around }, ns)
}

/// The service [`wrap_client`] builds its client on.
#[derive(Clone)]
struct Around<F> {
    client: kube::Client,
    around: F,
}

impl<F> tower_service::Service<ApiRequest> for Around<F>
where
    F: Fn(kube::Client, ApiRequest) -> ApiAnswer + Clone + Send + 'static,
{
    type Response = ApiResponse;
    type Error = kube::Error;
    type Future = ApiAnswer;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), kube::Error>> {
        // `client` buffers requests itself (kube::Client::send waits for its readiness).
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ApiRequest) -> ApiAnswer {
        (self.around)(self.client.clone(), req)
    }
}

/// Sends `req`; a 429 or 503 with a `Retry-After` header comes back with the delay in its Status.
async fn carry_retry_after(
    client: kube::Client,
    req: ApiRequest,
) -> Result<ApiResponse, kube::Error> {
    let resp = client.send(req).await?;
    let code = resp.status().as_u16();
    let delay = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|s| *s > 0);
    let Some(delay) = delay.filter(|_| matches!(code, 429 | 503)) else {
        return Ok(resp);
    };
    let (mut parts, body) = resp.into_parts();
    let bytes =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, ERROR_BODY_MAX))
            .await
            .map(|c| c.to_bytes().to_vec())
            .unwrap_or_default();
    let status = status_with_retry_after(&bytes, code, delay);
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(http::Response::from_parts(
        parts,
        kube::client::Body::from(status),
    ))
}

/// `body` (an error answer with HTTP status `code`) as a Status JSON whose
/// `details.retryAfterSeconds` is `delay` unless it already names one. A body that is not a
/// Status becomes one, its text the message (as kube itself would report it).
fn status_with_retry_after(body: &[u8], code: u16, delay: u32) -> Vec<u8> {
    let mut status = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) if v.get("kind").and_then(|k| k.as_str()) == Some("Status") => v,
        _ => serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": String::from_utf8_lossy(body).trim(),
            "reason": if code == 429 { "TooManyRequests" } else { "ServiceUnavailable" },
            "code": code,
        }),
    };
    let named = status
        .pointer("/details/retryAfterSeconds")
        .and_then(|v| v.as_u64())
        .is_some_and(|s| s > 0);
    if !named {
        if !status.get("details").is_some_and(|d| d.is_object()) {
            status["details"] = serde_json::json!({});
        }
        status["details"]["retryAfterSeconds"] = serde_json::json!(delay);
    }
    serde_json::to_vec(&status).unwrap_or_default()
}

#[cfg(test)]
mod retry_after_tests {
    use super::status_with_retry_after;
    use serde_json::Value;

    fn parsed(b: &[u8]) -> Value {
        serde_json::from_slice(b).expect("json")
    }

    #[test]
    fn a_plain_text_answer_becomes_a_status_naming_the_delay() {
        let s = parsed(&status_with_retry_after(b"Too Many Requests\n", 429, 7));
        assert_eq!(s["kind"], "Status");
        assert_eq!(s["code"], 429);
        assert_eq!(s["reason"], "TooManyRequests");
        assert_eq!(s["message"], "Too Many Requests");
        assert_eq!(s["details"]["retryAfterSeconds"], 7);
    }

    #[test]
    fn a_status_without_a_delay_gets_the_headers_and_keeps_the_rest() {
        let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"Cannot evict pod","reason":"TooManyRequests","details":{"causes":[{"reason":"DisruptionBudget","message":"web-pdb"}]},"code":429}"#;
        let s = parsed(&status_with_retry_after(body, 429, 10));
        assert_eq!(s["message"], "Cannot evict pod");
        assert_eq!(s["details"]["causes"][0]["reason"], "DisruptionBudget");
        assert_eq!(s["details"]["retryAfterSeconds"], 10);
    }

    #[test]
    fn a_status_naming_its_own_delay_keeps_it() {
        let body =
            br#"{"kind":"Status","status":"Failure","code":429,"details":{"retryAfterSeconds":3}}"#;
        let s = parsed(&status_with_retry_after(body, 429, 10));
        assert_eq!(s["details"]["retryAfterSeconds"], 3);
    }
}

/// `client` with every watch request (`watch=true`) recorded in `health` (sent and not yet
/// answered: [`WATCH_ANSWER_GRACE`]) and cut at [`WATCH_ANSWER_TIMEOUT`] without an answer.
/// kube's watcher itself records nothing while a watch request hangs: a watch ending is not an
/// error, and the hung re-watch fails only at the client's read timeout. Use one per watch:
/// `health` belongs to the one watch this client serves.
pub fn track_watches(client: kube::Client, health: WatchHealth) -> kube::Client {
    track_watches_within(client, health, WATCH_ANSWER_TIMEOUT)
}

/// [`track_watches`] with the cut at `timeout` (tests).
fn track_watches_within(
    client: kube::Client,
    health: WatchHealth,
    timeout: std::time::Duration,
) -> kube::Client {
    wrap_client(client, move |client, req| {
        watch_answer(client, health.clone(), timeout, req)
    })
}

/// Sends `req`; a watch request is recorded in `health` until answered and cut at `timeout`.
fn watch_answer(
    client: kube::Client,
    health: WatchHealth,
    timeout: std::time::Duration,
    req: ApiRequest,
) -> ApiAnswer {
    let is_watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    Box::pin(async move {
        if !is_watch {
            return client.send(req).await;
        }
        let _unanswered = health.watch_sent();
        let answer = tokio::time::timeout(timeout, client.send(req)).await;
        // Errors are recorded before the guard clears: no instant reads current between.
        match answer {
            Ok(Ok(resp)) if !resp.status().is_success() => {
                health.record_error(&format!("a watch request was answered {}", resp.status()));
                Ok(resp)
            }
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                health.record_error(&e);
                Err(e)
            }
            Err(_) => {
                let e = kube::Error::Service(
                    format!("a watch request had no answer within {timeout:?}").into(),
                );
                health.record_error(&e);
                Err(e)
            }
        }
    })
}

#[cfg(test)]
mod watch_health_tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn failing_until_an_event_or_a_grace_without_errors() {
        let h = WatchHealth::default();
        assert!(h.state().failing.is_none());
        h.record_error(&"503");
        h.record_error(&"503 again");
        let (since, e) = h.state().failing.expect("failing");
        assert_eq!(e, "503 again");
        assert!(since <= SystemTime::now());
        // A re-watch that succeeded sends nothing: errors stopping ends the failure.
        let later = SystemTime::now() + WATCH_FAILING_GRACE + Duration::from_secs(1);
        assert!(h.state_at(later).failing.is_none());
        h.record_ok();
        assert!(h.state().failing.is_none() && h.state().last_ok.is_some());
    }

    #[test]
    fn a_relist_is_not_current_until_init_done() {
        use kube::runtime::watcher::Event;
        let h = WatchHealth::default();
        h.record_error(&"410 Gone");
        h.record_event::<()>(&Event::Init);
        let (_, e) = h.state().failing.expect("re-listing after 410");
        assert!(e.contains("re-listing") && e.contains("410 Gone"), "{e}");
        h.record_event(&Event::InitApply(()));
        // However long the LIST takes: no grace ends a re-list.
        let later = SystemTime::now() + WATCH_FAILING_GRACE + Duration::from_secs(1);
        assert!(h.state_at(later).failing.is_some());
        h.record_event::<()>(&Event::InitDone);
        assert!(h.state().failing.is_none());
        // A re-list without a preceding error (a clean restart) is not current either.
        h.record_event::<()>(&Event::Init);
        assert!(h.state().failing.is_some());
        h.record_event::<()>(&Event::InitDone);
        assert!(h.state().failing.is_none());
    }
}

#[cfg(test)]
mod track_watches_tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// An API server that never answers watch requests (holds them until dropped) and answers
    /// anything else 200 at once, or answers watches `watch_status` at once when set.
    #[derive(Clone)]
    struct Api {
        watch_status: Option<u16>,
    }

    impl tower_service::Service<http::Request<kube::client::Body>> for Api {
        type Response = http::Response<kube::client::Body>;
        type Error = kube::Error;
        type Future = futures::future::BoxFuture<'static, Result<Self::Response, kube::Error>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), kube::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
            let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
            let status = self.watch_status;
            Box::pin(async move {
                match (watch, status) {
                    (true, None) => futures::future::pending().await,
                    (true, Some(code)) => Ok(http::Response::builder()
                        .status(code)
                        .body(kube::client::Body::empty())
                        .unwrap()),
                    (false, _) => Ok(http::Response::new(kube::client::Body::empty())),
                }
            })
        }
    }

    fn get(path: &str) -> http::Request<kube::client::Body> {
        http::Request::get(path)
            .body(kube::client::Body::empty())
            .unwrap()
    }

    /// Polls `send` until `health` records the request as sent (the client buffers it).
    async fn until_unanswered(health: &WatchHealth) {
        while health.0.lock().unwrap().watch_unanswered.is_none() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_unanswered_watch_is_not_current_after_the_grace_then_fails() {
        let health = WatchHealth::default();
        let client = track_watches_within(
            kube::Client::new(Api { watch_status: None }, "default"),
            health.clone(),
            Duration::from_millis(300),
        );
        // Other calls are not tracked.
        client.send(get("/api/v1/pods?limit=500")).await.unwrap();
        assert!(health.0.lock().unwrap().watch_unanswered.is_none());

        let watch = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .send(get("/api/v1/pods?watch=true&resourceVersion=7"))
                    .await
            }
        });
        until_unanswered(&health).await;
        let now = SystemTime::now();
        // Within the grace: current (a routine re-watch does not flap).
        assert!(health.state_at(now).failing.is_none());
        let (_, why) = health
            .state_at(now + WATCH_ANSWER_GRACE + Duration::from_millis(100))
            .failing
            .expect("unanswered past the grace");
        assert!(why.contains("has not been answered"), "{why}");
        // At the answer timeout (300 ms here) the request fails and the error is recorded.
        let err = watch.await.unwrap().expect_err("cut at the answer timeout");
        assert!(err.to_string().contains("no answer within"), "{err}");
        let (_, why) = health.state().failing.expect("failing after the cut");
        assert!(why.contains("no answer within"), "{why}");
        assert!(health.0.lock().unwrap().watch_unanswered.is_none());
    }

    #[tokio::test]
    async fn an_answered_watch_clears_unless_refused() {
        let health = WatchHealth::default();
        let client = track_watches(
            kube::Client::new(
                Api {
                    watch_status: Some(200),
                },
                "default",
            ),
            health.clone(),
        );
        client.send(get("/api/v1/pods?watch=true")).await.unwrap();
        let later = SystemTime::now() + WATCH_ANSWER_GRACE * 2;
        assert!(health.state_at(later).failing.is_none());

        let health = WatchHealth::default();
        let client = track_watches(
            kube::Client::new(
                Api {
                    watch_status: Some(503),
                },
                "default",
            ),
            health.clone(),
        );
        client.send(get("/api/v1/pods?watch=true")).await.unwrap();
        let (_, why) = health.state().failing.expect("a refused watch is failing");
        assert!(why.contains("503"), "{why}");
    }
}

/// Watches only the pods scheduled to this node (`spec.nodeName=` field selector) into a store,
/// with managedFields and status but its phase stripped (they are most of a pod's size and
/// unused here; the phase says whether the pod must have a cgroup).
/// The returned counter increases on every event, so consumers can wait for one; `health`
/// records whether the watch is current, `deleted` the pods it saw deleted.
pub fn watch_pods(
    client: kube::Client,
    node_name: String,
    token: tokio_util::sync::CancellationToken,
    health: WatchHealth,
    deleted: DeletedPods,
) -> (PodStore, tokio::sync::watch::Receiver<u64>) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};

    let (reader, writer) = reflector::store();
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::all(track_watches(client, health.clone()));
    let config = watcher::Config::default()
        .fields(&format!("spec.nodeName={node_name}"))
        .timeout(POD_WATCH_TIMEOUT_SECS);
    tokio::spawn(async move {
        let stream = watcher(api, config)
            .default_backoff()
            .modify(|pod| {
                pod.metadata.managed_fields = None;
                // Only the phase: whether the pod should have a cgroup (ConnectionCollector).
                let phase = pod.status.take().and_then(|s| s.phase);
                pod.status = phase.map(|phase| k8s_openapi::api::core::v1::PodStatus {
                    phase: Some(phase),
                    ..Default::default()
                });
            })
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                next = stream.next() => match next {
                    // A re-list (`Init`) is not current until its `InitDone`; an empty
                    // re-list is still a successful one once done.
                    Some(Ok(event)) => {
                        health.record_event(&event);
                        deleted.observe(&event);
                        tx.send_modify(|v| *v += 1);
                    }
                    Some(Err(e)) => {
                        health.record_error(&e);
                        tracing::warn!(error = %e, "pod watch error; retrying with backoff")
                    }
                    None => break,
                },
            }
        }
    });
    (reader, rx)
}

/// What the metrics need to know about a pod besides its cgroup.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub labels: std::collections::HashMap<String, String>,
    /// Set once the pod is being deleted (terminating).
    pub deletion_timestamp: Option<prost_types::Timestamp>,
    /// `status.phase` (Pending, Running, Succeeded, Failed); `None` when the API has none yet.
    pub phase: Option<String>,
    /// Every UID the pod's cgroup may carry: its own, then a static pod's mirror annotation.
    pub uids: Vec<String>,
}

impl PodMeta {
    /// Running and not terminating: its containers have started, so its cgroup (and network
    /// namespace) exists and this node's census must name it, as the aggregator's placement
    /// requires (`PodPlacement`'s `running`). A Pending pod may have none yet; a finished one
    /// (Succeeded, Failed) has none any more.
    pub fn must_have_cgroup(&self) -> bool {
        self.phase.as_deref() == Some("Running")
            && self.deletion_timestamp.is_none()
            && !self.name.is_empty()
    }
}

/// UID -> metadata for every pod in the store; a static pod's mirror also under the UID its
/// cgroup has (its `kubernetes.io/config.mirror` annotation).
/// A pod's own UID always wins over an alias; an alias two pods claim names neither
/// (decision #18-p); the result does not depend on the store's order.
pub fn pod_meta(store: &PodStore) -> std::collections::HashMap<String, PodMeta> {
    let pods = store.state();
    let aliases = mirror_aliases(pods.iter().map(|p| p.as_ref()));
    let mut out = std::collections::HashMap::new();
    for p in &pods {
        let Some(meta) = pod_meta_of(p) else { continue };
        if let Some(alias) = mirror_alias(p).filter(|a| aliases.contains(*a)) {
            out.insert(alias.to_string(), meta.clone());
        }
        if let Some(uid) = p.metadata.uid.clone().filter(|u| !u.is_empty()) {
            out.insert(uid, meta);
        }
    }
    out
}

/// The `kubernetes.io/config.mirror` alias a pod may be known by: only a real mirror pod's, one
/// the kubelet created (an ownerReference of kind `Node` naming the pod's `spec.nodeName`).
/// A user can forge the annotation on an ordinary pod; a forged alias is ignored.
pub fn mirror_alias(pod: &k8s_openapi::api::core::v1::Pod) -> Option<&str> {
    let m = &pod.metadata;
    let node = pod.spec.as_ref()?.node_name.as_deref()?;
    let owned_by_node = m
        .owner_references
        .as_ref()?
        .iter()
        .any(|o| o.kind == "Node" && o.name == node);
    if !owned_by_node {
        return None;
    }
    m.annotations
        .as_ref()?
        .get(MIRROR_ANNOTATION)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The aliases ([`mirror_alias`]) of `pods` that may be honoured: claimed by exactly one pod
/// and no pod's own UID. Two pods claiming one alias (a real mirror and a forged one with a
/// forged Node ownerReference) make it ambiguous: it names neither, so that census entry is
/// unknown (UNAVAILABLE if selectable, decision #18-l), never counted as the wrong pod.
pub fn mirror_aliases<'a>(
    pods: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Pod> + Clone,
) -> std::collections::HashSet<String> {
    let own: std::collections::HashSet<&str> = pods
        .clone()
        .into_iter()
        .filter_map(|p| p.metadata.uid.as_deref())
        .collect();
    let mut claims: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for alias in pods.into_iter().filter_map(mirror_alias) {
        *claims.entry(alias).or_default() += 1;
    }
    claims
        .into_iter()
        .filter(|(a, n)| *n == 1 && !own.contains(a))
        .map(|(a, _)| a.to_string())
        .collect()
}

/// One pod's metadata; `None` without a name.
fn pod_meta_of(p: &k8s_openapi::api::core::v1::Pod) -> Option<PodMeta> {
    let m = &p.metadata;
    Some(PodMeta {
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone()?,
        labels: m
            .labels
            .as_ref()
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        deletion_timestamp: m
            .deletion_timestamp
            .as_ref()
            .map(|t| prost_types::Timestamp {
                seconds: t.0.as_second(),
                nanos: t.0.subsec_nanosecond(),
            }),
        phase: p.status.as_ref().and_then(|s| s.phase.clone()),
        uids: pod_uids(p),
    })
}

/// A Service's ClusterIP (`namespace/name`); `None` when the Service does not exist or is
/// headless.
pub async fn service_cluster_ip(
    client: &kube::Client,
    namespaced_name: &str,
) -> Result<Option<std::net::IpAddr>, String> {
    let (ns, name) = namespaced_name
        .split_once('/')
        .ok_or_else(|| format!("{namespaced_name:?} is not namespace/name"))?;
    let api: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(client.clone(), ns);
    let svc = tokio::time::timeout(API_CALL_TIMEOUT, api.get_opt(name))
        .await
        .map_err(|_| format!("getting Service {namespaced_name} timed out"))?
        .map_err(|e| format!("getting Service {namespaced_name}: {e}"))?;
    Ok(svc
        .and_then(|s| s.spec?.cluster_ip)
        .and_then(|ip| ip.parse().ok()))
}

/// A ConfigMap's `data` (`namespace/name`); `None` when it does not exist.
pub async fn config_map_data(
    client: &kube::Client,
    namespaced_name: &str,
) -> Result<Option<std::collections::BTreeMap<String, String>>, String> {
    let (ns, name) = namespaced_name
        .split_once('/')
        .ok_or_else(|| format!("{namespaced_name:?} is not namespace/name"))?;
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), ns);
    let cm = tokio::time::timeout(API_CALL_TIMEOUT, api.get_opt(name))
        .await
        .map_err(|_| format!("getting ConfigMap {namespaced_name} timed out"))?
        .map_err(|e| format!("getting ConfigMap {namespaced_name}: {e}"))?;
    Ok(cm.map(|c| c.data.unwrap_or_default()))
}

/// Records a Kubernetes Event about this Node (core/v1, namespace `default`, as the kubelet's
/// node Events are); failures are logged, never fatal: an Event is a courtesy to humans.
pub async fn node_event(
    client: &kube::Client,
    node: &str,
    reason: &str,
    kind: &str,
    message: &str,
) {
    use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let ev = Event {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("{node}.")),
            namespace: Some("default".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            api_version: Some("v1".into()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(kind.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        source: Some(EventSource {
            component: Some("nodekeeper".into()),
            host: Some(node.to_string()),
        }),
        ..Default::default()
    };
    let api: kube::Api<Event> = kube::Api::namespaced(client.clone(), "default");
    match tokio::time::timeout(
        API_CALL_TIMEOUT,
        api.create(&kube::api::PostParams::default(), &ev),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, reason, "could not record a Kubernetes Event"),
        Err(_) => tracing::warn!(reason, "recording a Kubernetes Event timed out"),
    }
}

/// The annotation a static pod's mirror pod carries: the static pod's UID, which the kubelet
/// (and so the pod's cgroup) uses instead of the mirror pod's API UID.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// How long a pod the watch saw deleted is remembered: a deleted pod's cgroup (and so its
/// census entry) outlives its API object until the kubelet cleans it up (seconds; minutes
/// when a process is slow to die), and meanwhile its entry must read as deleted, not as a pod
/// the view is behind on (decision #18-l). Ten minutes is far past any cleanup seen.
pub const DELETED_POD_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);

/// At most this many deleted pods are remembered (the oldest are forgotten first): bounds the
/// memory of a cluster-wide watch during a mass deletion.
const DELETED_POD_LIMIT: usize = 20_000;

/// The pods a pod watch saw deleted in the last [`DELETED_POD_MEMORY`]: by a `Delete` event,
/// or gone from a re-list. Fed every event of the watch (`observe`); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DeletedPods(std::sync::Arc<std::sync::Mutex<DeletedInner>>);

#[derive(Debug, Default)]
struct DeletedInner {
    /// UIDs (and mirror UIDs) of the pods the watch has now.
    live: std::collections::HashSet<String>,
    /// During a re-list: the UIDs it has listed so far.
    relisting: Option<std::collections::HashSet<String>>,
    /// UID -> when the watch saw it deleted, and its metadata when the event carried it.
    deleted: std::collections::HashMap<String, (std::time::SystemTime, Option<PodMeta>)>,
}

/// A pod's UID and, for a static pod's mirror, the UID its cgroup has.
fn pod_uids(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<String> {
    let mirror = mirror_alias(pod).map(str::to_string);
    pod.metadata.uid.clone().into_iter().chain(mirror).collect()
}

impl DeletedPods {
    /// Records one event of the pod watch.
    pub fn observe(&self, event: &kube::runtime::watcher::Event<k8s_openapi::api::core::v1::Pod>) {
        use kube::runtime::watcher::Event;
        let now = std::time::SystemTime::now();
        let mut s = self.0.lock().expect("not poisoned");
        match event {
            Event::Apply(pod) => {
                for uid in pod_uids(pod) {
                    s.deleted.remove(&uid);
                    s.live.insert(uid);
                }
            }
            Event::Delete(pod) => {
                let mut meta = pod_meta_of(pod);
                if let Some(m) = &mut meta {
                    m.deletion_timestamp.get_or_insert_with(|| now.into());
                }
                for uid in pod_uids(pod) {
                    s.live.remove(&uid);
                    s.deleted.insert(uid, (now, meta.clone()));
                }
            }
            Event::Init => s.relisting = Some(Default::default()),
            Event::InitApply(pod) => {
                let uids = pod_uids(pod);
                for uid in &uids {
                    s.deleted.remove(uid);
                }
                s.relisting
                    .get_or_insert_with(Default::default)
                    .extend(uids);
            }
            Event::InitDone => {
                let listed = s.relisting.take().unwrap_or_default();
                let gone: Vec<String> = s.live.difference(&listed).cloned().collect();
                for uid in gone {
                    s.deleted.insert(uid, (now, None));
                }
                s.live = listed;
            }
        }
        let horizon = now.checked_sub(DELETED_POD_MEMORY);
        s.deleted
            .retain(|_, (at, _)| horizon.is_none_or(|h| *at >= h));
        if s.deleted.len() > DELETED_POD_LIMIT {
            let mut by_age: Vec<(std::time::SystemTime, String)> = s
                .deleted
                .iter()
                .map(|(u, (at, _))| (*at, u.clone()))
                .collect();
            by_age.sort();
            let excess = s.deleted.len() - DELETED_POD_LIMIT;
            for (_, uid) in by_age.into_iter().take(excess) {
                s.deleted.remove(&uid);
            }
        }
    }

    /// Whether the watch saw the pod with this UID deleted (within [`DELETED_POD_MEMORY`]).
    pub fn contains(&self, uid: &str) -> bool {
        self.get(uid).is_some()
    }

    /// A deleted pod: its metadata (with `deletion_timestamp` set) when its `Delete` event
    /// carried it, else `None` inside.
    pub fn get(&self, uid: &str) -> Option<Option<PodMeta>> {
        let s = self.0.lock().expect("not poisoned");
        let (at, meta) = s.deleted.get(uid)?;
        let fresh = at.elapsed().map_or(true, |age| age <= DELETED_POD_MEMORY);
        fresh.then(|| meta.clone())
    }

    /// Every pod remembered as deleted, by UID, with its metadata as its `Delete` event had it
    /// (else only `deletion_timestamp`, the time the watch saw it gone).
    pub fn metas(&self) -> Vec<(String, PodMeta)> {
        let s = self.0.lock().expect("not poisoned");
        s.deleted
            .iter()
            .filter(|(_, (at, _))| at.elapsed().map_or(true, |a| a <= DELETED_POD_MEMORY))
            .map(|(uid, (at, meta))| {
                let meta = meta.clone().unwrap_or_else(|| PodMeta {
                    deletion_timestamp: Some((*at).into()),
                    ..PodMeta::default()
                });
                (uid.clone(), meta)
            })
            .collect()
    }

    /// Every UID remembered as deleted.
    pub fn uids(&self) -> std::collections::HashSet<String> {
        let s = self.0.lock().expect("not poisoned");
        s.deleted
            .iter()
            .filter(|(_, (at, _))| at.elapsed().map_or(true, |a| a <= DELETED_POD_MEMORY))
            .map(|(u, _)| u.clone())
            .collect()
    }
}

#[cfg(test)]
mod deleted_pods_tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher::Event;

    fn pod(uid: &str, mirror: Option<&str>) -> Pod {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("p-{uid}"), "namespace": "shop", "uid": uid,
                         "labels": {"app": "web"}},
        }))
        .unwrap();
        if let Some(m) = mirror {
            p.metadata.annotations = Some([(MIRROR_ANNOTATION.to_string(), m.to_string())].into());
            p = with_node_owner(p, "node-a");
        }
        p
    }

    /// `p` as the kubelet's mirror pod on `node`: scheduled there, owned by the Node.
    fn with_node_owner(mut p: Pod, node: &str) -> Pod {
        p.spec.get_or_insert_with(Default::default).node_name = Some(node.into());
        p.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.into(),
                uid: format!("node-uid-{node}"),
                ..Default::default()
            },
        ]);
        p
    }

    #[test]
    fn a_deleted_pod_is_remembered_with_its_metadata_and_a_recreated_uid_is_not() {
        let d = DeletedPods::default();
        d.observe(&Event::Apply(pod("u1", Some("hash-1"))));
        assert!(!d.contains("u1"));
        d.observe(&Event::Delete(pod("u1", Some("hash-1"))));
        let meta = d.get("u1").expect("deleted").expect("with its metadata");
        assert_eq!(meta.name, "p-u1");
        assert!(meta.deletion_timestamp.is_some());
        // The static pod's own UID (its cgroup's) too.
        assert!(d.contains("hash-1"));
        d.observe(&Event::Apply(pod("hash-1", None)));
        assert!(!d.contains("hash-1"));
    }

    #[test]
    fn a_pod_gone_from_a_relist_is_deleted() {
        let d = DeletedPods::default();
        d.observe(&Event::Apply(pod("u1", None)));
        d.observe(&Event::Apply(pod("u2", None)));
        d.observe(&Event::Init);
        d.observe(&Event::InitApply(pod("u2", None)));
        assert!(!d.contains("u1"), "not before the re-list is done");
        d.observe(&Event::InitDone);
        assert_eq!(d.get("u1"), Some(None));
        assert!(!d.contains("u2"));
        assert_eq!(d.uids(), ["u1".to_string()].into());
    }
}
