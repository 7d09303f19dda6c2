//! What makes the fake behave like a busy or strict API server: request-body field validation
//! (`fieldValidation` Strict / Warn / Ignore) and injected faults (429 with Retry-After, 503, 504,
//! 409, any other status, slow answers, dropped watches, 410 Gone), each switchable per test.

use std::time::Duration;

use serde_json::{Value, json};

use super::store::ApiError;

/// How unknown fields in a request body are treated (the `fieldValidation` query parameter
/// overrides it per request, as on a real server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// 400 naming the unknown fields: the fake's default, so a misspelt field fails a test.
    #[default]
    Strict,
    /// Accepted with a `Warning: 299 - "unknown field ..."` header: a real server's default.
    Warn,
    /// Silently dropped.
    Ignore,
}

impl FieldValidation {
    /// The mode for one request: its `fieldValidation` parameter, else the server's default.
    pub fn for_request(default: Self, param: Option<&str>) -> Self {
        match param {
            Some("Strict") => Self::Strict,
            Some("Warn") => Self::Warn,
            Some("Ignore") => Self::Ignore,
            _ => default,
        }
    }
}

const OBJECT_META: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

const DELETE_OPTIONS: &[&str] = &[
    "apiVersion",
    "kind",
    "gracePeriodSeconds",
    "preconditions",
    "orphanDependents",
    "propagationPolicy",
    "dryRun",
    "ignoreStoreReadErrorWithClusterBreakingPotential",
];

const PRECONDITIONS: &[&str] = &["uid", "resourceVersion"];

fn unknown_in(obj: &Value, known: &[&str], prefix: &str, out: &mut Vec<String>) {
    if let Some(m) = obj.as_object() {
        for k in m.keys() {
            if !known.contains(&k.as_str()) {
                out.push(format!("{prefix}{k}"));
            }
        }
    }
}

fn unknown_in_delete_options(opts: &Value, prefix: &str, out: &mut Vec<String>) {
    unknown_in(opts, DELETE_OPTIONS, prefix, out);
    unknown_in(
        &opts["preconditions"],
        PRECONDITIONS,
        &format!("{prefix}preconditions."),
        out,
    );
}

/// Unknown fields (JSON paths) of a `policy/v1` Eviction body.
pub fn unknown_eviction_fields(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    unknown_in(
        body,
        &["apiVersion", "kind", "metadata", "deleteOptions"],
        "",
        &mut out,
    );
    unknown_in(&body["metadata"], OBJECT_META, "metadata.", &mut out);
    unknown_in_delete_options(&body["deleteOptions"], "deleteOptions.", &mut out);
    out
}

/// Unknown fields of a DELETE's `DeleteOptions` body.
pub fn unknown_delete_options_fields(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    unknown_in_delete_options(body, "", &mut out);
    out
}

/// What a strict server answers for unknown fields in a body of `kind`.
pub fn strict_error(kind: &str, unknown: &[String]) -> ApiError {
    let list: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    ApiError::bad_request(format!(
        "{kind} in version \"v1\" cannot be handled as a {kind}: strict decoding error: {}",
        list.join(", ")
    ))
}

/// The `Warning` header values a real server adds in Warn mode.
pub fn warnings(unknown: &[String]) -> Vec<String> {
    unknown
        .iter()
        .map(|f| format!("299 - \"unknown field \\\"{f}\\\"\""))
        .collect()
}

/// What an injected fault does to a matching request.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// API Priority and Fairness rejecting the request: 429 `TooManyRequests` with a
    /// `Retry-After` header and `details.retryAfterSeconds` (no DisruptionBudget cause).
    TooManyRequests { retry_after_seconds: u32 },
    /// 503 `ServiceUnavailable`.
    Unavailable,
    /// 504 `Timeout` (the request may or may not have been applied: the fake does not apply it).
    GatewayTimeout,
    /// 409 `Conflict` without touching the object (e.g. an eviction whose PDB update conflicted).
    Conflict,
    /// Any other status, e.g. `Status { code: 403, reason: "Forbidden", .. }`.
    Status {
        code: u16,
        reason: &'static str,
        message: String,
    },
    /// The answer is delayed this long (a watch's first line too: a slow-to-sync watch).
    Delay(Duration),
    /// A watch stream ends after this long (as when an apiserver restarts).
    DropWatchAfter(Duration),
    /// 410 `Expired` "too old resource version", as after etcd compaction. A plain request gets
    /// an HTTP 410; a watch gets 200 and one `ERROR` event carrying it, as on a real server.
    Expired,
    /// No answer at all until `FakeApi::release_held` (an API server that accepts connections
    /// and hangs); then the request is served normally. `FakeApi::held_total` counts them.
    Hold,
}

/// One injected fault: requests whose method and path match get `kind`, `times` times.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// `""` matches any method.
    pub method: String,
    /// A substring of the path (`"/eviction"`, `"/api/v1/nodes/node-a"`).
    pub path_contains: String,
    /// A substring of the raw query (`"limit="` picks kube-runtime's paged LIST).
    pub query_contains: String,
    /// `Some(true)`: only watches, `Some(false)`: never watches, `None`: both.
    pub watch: Option<bool>,
    pub kind: FaultKind,
    /// Remaining matches; `u32::MAX` never runs out.
    pub times: u32,
}

impl Fault {
    /// Matches the next request with `method` (`""` for any) whose path contains `path`, once.
    pub fn on(method: &str, path: &str, kind: FaultKind) -> Self {
        Self {
            method: method.to_string(),
            path_contains: path.to_string(),
            query_contains: String::new(),
            watch: None,
            kind,
            times: 1,
        }
    }
    pub fn times(mut self, n: u32) -> Self {
        self.times = n;
        self
    }
    pub fn always(self) -> Self {
        self.times(u32::MAX)
    }
    /// Only requests whose raw query contains `q`.
    pub fn query(mut self, q: &str) -> Self {
        self.query_contains = q.to_string();
        self
    }
    /// Only watch requests (`true`) or only non-watch requests (`false`).
    pub fn watch(mut self, watch: bool) -> Self {
        self.watch = Some(watch);
        self
    }

    pub fn matches(&self, method: &str, path: &str, query: &str, is_watch: bool) -> bool {
        self.times > 0
            && (self.method.is_empty() || self.method.eq_ignore_ascii_case(method))
            && path.contains(&self.path_contains)
            && query.contains(&self.query_contains)
            && self.watch.is_none_or(|w| w == is_watch)
    }
}

/// Takes the first matching fault (decrementing its count).
pub fn take(
    faults: &mut [Fault],
    method: &str,
    path: &str,
    query: &str,
    is_watch: bool,
) -> Option<FaultKind> {
    let f = faults
        .iter_mut()
        .find(|f| f.matches(method, path, query, is_watch))?;
    if f.times != u32::MAX {
        f.times -= 1;
    }
    Some(f.kind.clone())
}

/// 410 `Expired`, as after etcd compaction (on a watch: the body of its `ERROR` event).
pub fn expired() -> ApiError {
    ApiError::new(410, "Expired", "too old resource version: 1 (2)")
}

/// The error a status fault answers with, and its Retry-After seconds, if any.
pub fn error_of(kind: &FaultKind) -> Option<(ApiError, Option<u32>)> {
    Some(match kind {
        FaultKind::TooManyRequests {
            retry_after_seconds,
        } => {
            let mut e = ApiError::new(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
            );
            e.details = Some(json!({"retryAfterSeconds": retry_after_seconds}));
            (e, Some(*retry_after_seconds))
        }
        FaultKind::Unavailable => (
            ApiError::new(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            None,
        ),
        FaultKind::GatewayTimeout => (
            ApiError::new(
                504,
                "Timeout",
                "the server was unable to return a response in the time allotted, but may still be processing the request",
            ),
            None,
        ),
        FaultKind::Conflict => (
            ApiError::new(
                409,
                "Conflict",
                "Operation cannot be fulfilled on poddisruptionbudgets.policy: the object has been modified; please apply your changes to the latest version and try again",
            ),
            None,
        ),
        FaultKind::Status {
            code,
            reason,
            message,
        } => (ApiError::new(*code, reason, message.clone()), None),
        FaultKind::Expired => (expired(), None),
        FaultKind::Delay(_) | FaultKind::DropWatchAfter(_) | FaultKind::Hold => return None,
    })
}
