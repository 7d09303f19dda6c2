//! The operator's side of the gRPC API: what `nodekeeper drain|cordon|uncordon|get-drain` do
//! against one node's agent. Connects (with an optional bearer token), sends the request,
//! follows a drain's event stream and renders it (progress bar, one line per event, JSON lines,
//! the dry-run table).
//!
//! Returns typed errors; the binary maps them to exit codes. Never retries a mutating call on
//! its own: a drain is idempotent by id, so the operator re-runs the same command to re-attach.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use tonic::codegen::http as http_uri;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pb::{self, DrainPhase, drain_event::Event, node_agent_client::NodeAgentClient};

/// Connecting to an agent on the node network: a live agent answers in milliseconds; five
/// seconds covers a loaded node without leaving the operator staring at a dead address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Cordon, uncordon, get-drain and the start of a drain: each is one or two Kubernetes API calls
/// on the agent (each bounded by its own 10 s timeout) plus an Event.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after the drain's own deadline the CLI still waits for the stream's final event:
/// the agent records the end on the Node and posts an Event before sending it.
pub const STREAM_GRACE: Duration = Duration::from_secs(60);
/// The agent refuses timeouts above 24 h; without `--timeout` the CLI waits at most that long.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is neither `host:port` nor an `http(s)://` URL.
    #[error("bad agent address {addr:?}: {why}")]
    BadAddress { addr: String, why: String },
    /// The token file could not be read or does not hold a usable token.
    #[error("token file {}: {why}", path.display())]
    Token { path: PathBuf, why: String },
    /// A TLS option (`--cacert`, `--cert`, `--key`, `--server-name`) is unusable.
    #[error("{flag}: {why}")]
    Tls { flag: &'static str, why: String },
    /// Nothing answered at the address (refused, unresolvable, TLS failure, connect timeout),
    /// or the connection broke mid-stream.
    #[error("agent at {addr} is unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
    /// The agent refused the request: invalid argument (a usage error).
    #[error("{0}")]
    Invalid(String),
    /// The agent refused or failed the request (another drain runs, no Kubernetes API, ...).
    #[error("agent refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    /// The drain ended without completing: failed, timed out or cancelled.
    #[error("drain {} {}: {}", .0.id, phase_word(.0.phase()), .0.error)]
    DrainEnded(Box<pb::DrainStatus>),
    /// A dry run found pods that a real drain would refuse to evict.
    #[error("a drain would fail: {0}")]
    WouldFail(String),
    /// The stream ended (or stalled past the deadline) without a final event.
    #[error("the drain stream ended without a result: {0}")]
    Incomplete(String),
}

impl ClientError {
    /// A short, low-cardinality label for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadAddress { .. } => "bad_address",
            Self::Token { .. } => "token",
            Self::Tls { .. } => "tls",
            Self::Unreachable { .. } => "unreachable",
            Self::Invalid(_) => "invalid",
            Self::Refused { .. } => "refused",
            Self::DrainEnded(_) => "drain_ended",
            Self::WouldFail(_) => "would_fail",
            Self::Incomplete(_) => "incomplete",
        }
    }

    fn from_status(addr: &str, s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument => Self::Invalid(s.message().to_string()),
            // Transport failures surface as UNAVAILABLE with a source error; the agent's own
            // UNAVAILABLE (Kubernetes API down) carries none.
            tonic::Code::Unavailable if std::error::Error::source(&s).is_some() => {
                Self::Unreachable {
                    addr: addr.to_string(),
                    detail: s.message().to_string(),
                }
            }
            code => Self::Refused {
                code,
                message: s.message().to_string(),
            },
        }
    }
}

fn phase_word(p: DrainPhase) -> &'static str {
    match p {
        DrainPhase::Unspecified => "unspecified",
        DrainPhase::Pending => "pending",
        DrainPhase::Cordoning => "cordoning",
        DrainPhase::Evicting => "evicting",
        DrainPhase::Completed => "completed",
        DrainPhase::Failed => "failed",
        DrainPhase::TimedOut => "timed out",
        DrainPhase::Cancelled => "cancelled",
    }
}

// === connecting ===

/// The endpoint for `host:port` (plain HTTP/2) or an explicit `http://` / `https://` URL.
pub fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    let bad = |why: String| ClientError::BadAddress {
        addr: addr.to_string(),
        why,
    };
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let uri: http_uri::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        other => return Err(bad(format!("scheme {other:?}: want http or https"))),
    }
    if uri.port_u16().is_none() {
        return Err(bad("no port (want host:port, e.g. 10.1.2.3:9091)".into()));
    }
    let mut ep = Endpoint::from_shared(url)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT);
    if uri.scheme_str() == Some("https") {
        ep = ep
            .tls_config(ClientTlsConfig::new().with_enabled_roots())
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(ep)
}

/// How to reach and authenticate to an agent, from the CLI's flags.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// A bearer token file, sent as `authorization: Bearer <token>`.
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle the agent's certificate must chain to, instead of the public roots (a
    /// private CA, as cert-manager issues).
    pub cacert: Option<PathBuf>,
    /// PEM client certificate (mTLS), with `key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify the agent's certificate against, when it differs from the address
    /// dialled (e.g. a node-name SAN while dialling the node IP).
    pub server_name: Option<String>,
}

impl ConnectOptions {
    fn wants_tls(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.server_name.is_some()
    }

    /// The client TLS config these options describe.
    pub fn tls(&self) -> Result<ClientTlsConfig, ClientError> {
        let read = |flag: &'static str, path: &Path| {
            crate::state_file::read_capped(path, 1 << 20).map_err(|e| ClientError::Tls {
                flag,
                why: format!("cannot read {}: {e}", path.display()),
            })
        };
        let mut tls = ClientTlsConfig::new();
        tls = match &self.cacert {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read("--cacert", ca)?)),
            None => tls.with_enabled_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("--cert", cert)?,
                    read("--key", key)?,
                ));
            }
            (Some(_), None) => {
                return Err(ClientError::Tls {
                    flag: "--cert",
                    why: "needs --key".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ClientError::Tls {
                    flag: "--key",
                    why: "needs --cert".into(),
                });
            }
            (None, None) => {}
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
pub struct Auth(Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Reads a bearer token (surrounding whitespace ignored) into the header value.
pub fn read_token(path: &Path) -> Result<AsciiMetadataValue, ClientError> {
    let err = |why: String| ClientError::Token {
        path: path.to_path_buf(),
        why,
    };
    let raw = crate::state_file::read_capped(path, 4096).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8(raw).map_err(|_| err("is not UTF-8".into()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("is empty".into()));
    }
    MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| err("holds characters not allowed in a header".into()))
}

pub type AgentClient = NodeAgentClient<InterceptedService<Channel, Auth>>;

/// A connection to one agent.
pub struct Client {
    inner: AgentClient,
    addr: String,
    /// The node mutating calls are bound to (`--node`, `--node-uid`); when unset, GetNode's
    /// answer just before the call.
    expected_node: Option<(String, String)>,
}

impl Client {
    /// Connects eagerly, so an unreachable agent is reported as such before any request.
    pub async fn connect(addr: &str, token_file: Option<&Path>) -> Result<Self, ClientError> {
        let options = ConnectOptions {
            token_file: token_file.map(Path::to_path_buf),
            ..Default::default()
        };
        Self::connect_with(addr, &options).await
    }

    /// Connects with TLS options: any of `--cacert`, `--cert`, `--server-name` makes a
    /// `host:port` address TLS (an `http://` URL with them is a usage error).
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let auth = Auth(options.token_file.as_deref().map(read_token).transpose()?);
        let ep = if options.wants_tls() || options.key.is_some() {
            if addr.starts_with("http://") {
                return Err(ClientError::BadAddress {
                    addr: addr.to_string(),
                    why: "http:// with TLS options; use host:port or https://".into(),
                });
            }
            let https = if addr.contains("://") {
                addr.to_string()
            } else {
                format!("https://{addr}")
            };
            endpoint(&https)?
                .tls_config(options.tls()?)
                .map_err(|e| ClientError::Tls {
                    flag: "--cacert",
                    why: e.to_string(),
                })?
        } else {
            endpoint(addr)?
        };
        let unreachable = |detail: String| ClientError::Unreachable {
            addr: addr.to_string(),
            detail,
        };
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, ep.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unreachable(error_chain(&e))),
            Err(_) => return Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        };
        Ok(Self {
            inner: NodeAgentClient::with_interceptor(channel, auth),
            addr: addr.to_string(),
            expected_node: None,
        })
    }

    async fn unary<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ClientError::from_status(&self.addr, s)),
            Err(_) => Err(ClientError::Unreachable {
                addr: self.addr.clone(),
                detail: format!("no answer within {CALL_TIMEOUT:?}"),
            }),
        }
    }

    /// Binds every mutating call to this node (and uid, when not empty): the agent refuses it
    /// if it serves another node.
    pub fn expect_node(&mut self, name: &str, uid: &str) {
        self.expected_node = Some((name.to_string(), uid.to_string()));
    }

    /// The node name and uid a mutating call carries: the expected node, else the one the
    /// agent reports right now (so a drain started and re-attached by the CLI stays on it).
    async fn target(&mut self) -> Result<(String, String), ClientError> {
        if let Some(t) = &self.expected_node {
            return Ok(t.clone());
        }
        let node = self.get_node().await?;
        Ok((node.node_name, node.node_uid))
    }

    pub async fn cordon(&mut self, reason: &str) -> Result<pb::NodeStatus, ClientError> {
        let (node_name, node_uid) = self.target().await?;
        let mut c = self.inner.clone();
        let req = pb::CordonRequest {
            reason: reason.to_string(),
            node_name,
            node_uid,
        };
        self.unary(c.cordon(req)).await
    }

    pub async fn uncordon(&mut self) -> Result<pb::NodeStatus, ClientError> {
        let (node_name, node_uid) = self.target().await?;
        let mut c = self.inner.clone();
        let req = pb::UncordonRequest {
            node_name,
            node_uid,
        };
        self.unary(c.uncordon(req)).await
    }

    pub async fn get_node(&mut self) -> Result<pb::NodeStatus, ClientError> {
        let mut c = self.inner.clone();
        self.unary(c.get_node(pb::GetNodeRequest {})).await
    }

    pub async fn get_drain(&mut self) -> Result<pb::DrainStatus, ClientError> {
        let mut c = self.inner.clone();
        self.unary(c.get_drain(pb::GetDrainRequest {})).await
    }

    /// Starts (or re-attaches to) a drain and calls `on_event` for each event until the final
    /// one. Ok with the final status only when the drain completed (for a dry run: the plan,
    /// unless it holds pods a real drain would refuse).
    pub async fn drain(
        &mut self,
        mut req: pb::DrainRequest,
        mut on_event: impl FnMut(&pb::DrainEvent),
    ) -> Result<pb::DrainStatus, ClientError> {
        if req.node_name.is_empty() && req.node_uid.is_empty() {
            (req.node_name, req.node_uid) = self.target().await?;
        }
        let wait = req
            .timeout
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(MAX_DRAIN_TIMEOUT)
            + STREAM_GRACE;
        let dry_run = req.dry_run;
        let mut c = self.inner.clone();
        let mut stream = self.unary(c.drain(req)).await?;
        let follow = async {
            // The stream broke after the drain started (agent restart, rollout, network): the
            // drain goes on without us, so this is "re-attach", not "failed".
            while let Some(e) = stream.message().await.map_err(|s| {
                ClientError::Incomplete(format!(
                    "the stream broke ({:?}: {}); re-run the same command to re-attach",
                    s.code(),
                    s.message()
                ))
            })? {
                on_event(&e);
                match e.event {
                    Some(Event::Planned(plan)) if dry_run => {
                        return if plan.error.is_empty() {
                            Ok(plan)
                        } else {
                            Err(ClientError::WouldFail(plan.error))
                        };
                    }
                    Some(Event::Completed(s)) => return Ok(s),
                    Some(Event::Failed(s) | Event::TimedOut(s) | Event::Cancelled(s)) => {
                        return Err(ClientError::DrainEnded(Box::new(s)));
                    }
                    _ => {}
                }
            }
            Err(ClientError::Incomplete(
                "the agent closed the stream (shutting down?); re-run the same command to re-attach"
                    .into(),
            ))
        };
        match tokio::time::timeout(wait, follow).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Incomplete(format!(
                "no final event within {wait:?}"
            ))),
        }
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let _ = write!(out, ": {s}");
        src = s.source();
    }
    out
}

/// `$USER@hostname`, the default requester recorded on the drain.
pub fn default_requester() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{user}@{host}")
}

// === rendering ===

/// Shows a drain's progress: a bar of pods done / planned whose message is the budget(s)
/// currently blocking, and one line per event printed above it. The bar draws on stdout and
/// hides itself when stdout is not a terminal; the lines are printed either way.
pub struct Progress {
    bar: ProgressBar,
    blocked: BTreeMap<String, String>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} pods {wide_msg}",
            )
            .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            bar,
            blocked: BTreeMap::new(),
        }
    }

    fn line(&self, text: String) {
        // suspend() clears the bar, prints, redraws; with a hidden bar it just prints.
        self.bar.suspend(|| println!("{text}"));
    }

    fn refresh_message(&self) {
        let budgets: std::collections::BTreeSet<&str> =
            self.blocked.values().map(String::as_str).collect();
        self.bar.set_message(if budgets.is_empty() {
            String::new()
        } else {
            format!(
                "blocked by {}",
                budgets.into_iter().collect::<Vec<_>>().join(", ")
            )
        });
    }

    pub fn event(&mut self, e: &pb::DrainEvent) {
        match &e.event {
            Some(Event::Planned(s)) => {
                self.bar.set_length(s.plan.len() as u64);
                self.bar.set_position(s.done.len() as u64);
                self.line(format!(
                    "planned: {} pods to evict, {} left on the node",
                    s.plan.len(),
                    s.skipped.len()
                ));
            }
            Some(Event::Waiting(w)) => self.line(format!(
                "waiting for a slot of fleet lock {} (held by {})",
                w.lock, w.holders
            )),
            Some(Event::Evicting(p)) => self.line(format!("evicting {}/{}", p.namespace, p.name)),
            Some(Event::Blocked(b)) => {
                let pod = b
                    .pod
                    .as_ref()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .unwrap_or_default();
                let retry = b
                    .retry_in
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or_default();
                self.line(format!(
                    "blocked  {pod} by {} (attempt {}, retry in {:.1}s)",
                    b.budget,
                    b.attempt,
                    retry.as_secs_f64()
                ));
                self.blocked.insert(pod, b.budget.clone());
                self.refresh_message();
            }
            Some(Event::Deleted(p)) => {
                let pod = format!("{}/{}", p.namespace, p.name);
                self.line(format!("deleted  {pod}"));
                self.blocked.remove(&pod);
                self.refresh_message();
                self.bar.inc(1);
            }
            Some(
                Event::Completed(_) | Event::Failed(_) | Event::TimedOut(_) | Event::Cancelled(_),
            )
            | None => {}
        }
    }

    /// Removes the bar (the per-event lines stay).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The dry-run report: the plan in eviction order, then the pods left on the node.
pub fn plan_table(s: &pb::DrainStatus) -> String {
    let mut out = String::new();
    let width = s
        .plan
        .iter()
        .map(|p| p.namespace.len() + p.name.len() + 1)
        .chain(std::iter::once("NAMESPACE/NAME".len()))
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "{:<4} {:<width$}  {:<9}  PRIORITY",
        "#", "NAMESPACE/NAME", "CLASS"
    );
    for (i, p) in s.plan.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<4} {:<width$}  {:<9}  {}",
            i + 1,
            format!("{}/{}", p.namespace, p.name),
            p.class,
            p.priority
        );
    }
    let _ = writeln!(
        out,
        "\n{} pods would be evicted; {} stay on the node:",
        s.plan.len(),
        s.skipped.len()
    );
    for k in &s.skipped {
        let _ = writeln!(out, "  {}/{} ({})", k.namespace, k.name, k.reason);
    }
    out
}

/// A one-paragraph summary of a drain's status (get-drain, the end of a drain).
pub fn status_text(s: &pb::DrainStatus) -> String {
    let mut out = format!(
        "drain {}: {} ({} of {} pods done)",
        s.id,
        phase_word(s.phase()),
        s.done.len(),
        s.plan.len()
    );
    if !s.requester.is_empty() || !s.reason.is_empty() {
        let _ = write!(out, "\nrequested by {:?}: {:?}", s.requester, s.reason);
    }
    if let Some(t) = s.started_at {
        let _ = write!(out, "\nstarted {}", timestamp(&t));
    }
    if let Some(t) = s.deadline {
        let _ = write!(out, ", deadline {}", timestamp(&t));
    }
    if !s.error.is_empty() {
        let _ = write!(out, "\nerror: {}", s.error);
    }
    out
}

// === JSON (the proto3 JSON mapping: lowerCamelCase names, enum names, RFC 3339 times) ===

fn timestamp(t: &prost_types::Timestamp) -> String {
    k8s_openapi::jiff::Timestamp::new(t.seconds, t.nanos)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn duration(d: &prost_types::Duration) -> String {
    let secs = d.seconds as f64 + d.nanos as f64 / 1e9;
    format!("{secs}s")
}

fn pod_ref_json(p: &pb::PodRef) -> Value {
    json!({"namespace": p.namespace, "name": p.name, "uid": p.uid})
}

/// A DrainStatus as proto3 JSON.
pub fn status_json(s: &pb::DrainStatus) -> Value {
    json!({
        "id": s.id,
        "phase": s.phase().as_str_name(),
        "reason": s.reason,
        "requester": s.requester,
        "startedAt": s.started_at.as_ref().map(timestamp),
        "deadline": s.deadline.as_ref().map(timestamp),
        "plan": s.plan.iter().map(|p| json!({
            "namespace": p.namespace, "name": p.name, "uid": p.uid,
            "class": p.class, "priority": p.priority,
        })).collect::<Vec<_>>(),
        "skipped": s.skipped.iter().map(|k| json!({
            "namespace": k.namespace, "name": k.name, "reason": k.reason,
        })).collect::<Vec<_>>(),
        "done": s.done,
        "error": s.error,
    })
}

/// A DrainEvent as proto3 JSON: `{"at", "drainId", <one of planned|evicting|blocked|...>}`.
pub fn event_json(e: &pb::DrainEvent) -> Value {
    let mut v = json!({"at": e.at.as_ref().map(timestamp), "drainId": e.drain_id});
    let (key, body) = match &e.event {
        Some(Event::Planned(s)) => ("planned", status_json(s)),
        Some(Event::Evicting(p)) => ("evicting", pod_ref_json(p)),
        Some(Event::Deleted(p)) => ("deleted", pod_ref_json(p)),
        Some(Event::Blocked(b)) => (
            "blocked",
            json!({
                "pod": b.pod.as_ref().map(pod_ref_json),
                "budget": b.budget,
                "message": b.message,
                "attempt": b.attempt,
                "retryIn": b.retry_in.as_ref().map(duration),
            }),
        ),
        Some(Event::Waiting(w)) => ("waiting", json!({"lock": w.lock, "holders": w.holders})),
        Some(Event::Completed(s)) => ("completed", status_json(s)),
        Some(Event::Failed(s)) => ("failed", status_json(s)),
        Some(Event::TimedOut(s)) => ("timedOut", status_json(s)),
        Some(Event::Cancelled(s)) => ("cancelled", status_json(s)),
        None => return v,
    };
    v[key] = body;
    v
}

/// `nodekeeper dns status`: the cache and its upstreams, one line each.
pub fn dns_status_text(node: &str, s: &pb::DnsStatus) -> String {
    let mut out = format!(
        "node {node}: dns cache on {}{}\ncache: {} entries, {} bytes, hit ratio {:.1}% ({} hits, {} misses), {} stale answers, {} prefetches, {} evictions\n",
        s.listen.join(", "),
        if s.lame_duck {
            " (lame duck: shutting down)"
        } else {
            ""
        },
        s.cache_entries,
        s.cache_bytes,
        s.hit_ratio * 100.0,
        s.hits,
        s.misses,
        s.stale_served,
        s.prefetches,
        s.evictions,
    );
    for u in &s.upstreams {
        out.push_str(&format!(
            "upstream {} {} ({}): {}, {} queries, {} failures{}\n",
            u.group,
            u.address,
            u.protocol,
            if u.healthy { "healthy" } else { "UNHEALTHY" },
            u.queries,
            u.failures,
            if u.last_error.is_empty() {
                String::new()
            } else {
                format!(", last error: {}", u.last_error)
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_http_and_need_a_port() {
        assert_eq!(
            endpoint("10.0.0.1:9091").unwrap().uri().to_string(),
            "http://10.0.0.1:9091/"
        );
        assert!(endpoint("https://agent.example:9091").is_ok());
        assert!(matches!(
            endpoint("10.0.0.1"),
            Err(ClientError::BadAddress { .. })
        ));
        assert!(matches!(
            endpoint("ftp://10.0.0.1:21"),
            Err(ClientError::BadAddress { .. })
        ));
    }

    #[test]
    fn tokens_are_trimmed_and_sent_as_bearer() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(read_token(&f).unwrap(), "Bearer s3cret");
        std::fs::write(&f, "  \n").unwrap();
        assert!(matches!(read_token(&f), Err(ClientError::Token { .. })));
    }

    #[test]
    fn events_render_as_proto_json_and_the_bar_counts_deletions() {
        let pod = pb::PodRef {
            namespace: "apps".into(),
            name: "web-1".into(),
            uid: "u1".into(),
        };
        let e = pb::DrainEvent {
            at: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            drain_id: "d".into(),
            event: Some(Event::Blocked(pb::Blocked {
                pod: Some(pod.clone()),
                budget: "web-pdb".into(),
                message: "m".into(),
                attempt: 2,
                retry_in: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
            })),
        };
        let v = event_json(&e);
        assert_eq!(v["at"], "1970-01-01T00:00:00Z");
        assert_eq!(v["blocked"]["budget"], "web-pdb");
        assert_eq!(v["blocked"]["retryIn"], "1.5s");

        let mut p = Progress::new();
        p.event(&pb::DrainEvent {
            event: Some(Event::Planned(pb::DrainStatus {
                plan: vec![Default::default(); 3],
                ..Default::default()
            })),
            ..Default::default()
        });
        p.event(&e);
        assert_eq!(p.bar.message(), "blocked by web-pdb");
        p.event(&pb::DrainEvent {
            event: Some(Event::Deleted(pod)),
            ..Default::default()
        });
        assert_eq!((p.bar.position(), p.bar.length()), (1, Some(3)));
        assert_eq!(p.bar.message(), "");
        p.finish();
    }
}
