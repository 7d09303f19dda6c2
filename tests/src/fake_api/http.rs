//! HTTP routing: maps Kubernetes REST paths (`/api/v1/namespaces/{ns}/pods/{name}/eviction`,
//! `/apis/{group}/{version}/...`) to store operations, renders errors as `Status` objects,
//! streams watches as newline-delimited JSON events and records every request.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::admission::{self, Admission};
use super::controllers::{self, check_preconditions};
use super::faults::{self, FaultKind, FieldValidation};
use super::managed;
use super::patch::{PatchType, json_patch, merge_patch};
use super::pdb;
use super::rbac::{self, Identity, Rbac};
use super::resources::{self, Res};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{ApiError, BOOKMARK_EVERY, Change, RecordedRequest, State, Store};
use super::table;

pub fn router(store: Arc<Store>) -> Router {
    Router::new().fallback(handle).with_state(store)
}

fn json_response(code: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(body).unwrap_or_default(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    let mut r = json_response(e.code, &e.status());
    if let Some(s) = e.retry_after
        && let Ok(v) = header::HeaderValue::from_str(&s.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decodes `a=b&c=d` (last value wins).
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

async fn handle(AxState(store): AxState<Arc<Store>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    let is_watch = matches!(
        parse_query(&query).get("watch").map(String::as_str),
        Some("true" | "1")
    );
    let fault = {
        let mut f = store.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults::take(&mut f, method.as_str(), &path, &query, is_watch)
    };
    let mut drop_watch_after = None;
    let resp = match &fault {
        Some(FaultKind::Delay(d)) => {
            tokio::time::sleep(*d).await;
            None
        }
        Some(FaultKind::Hold) => {
            store
                .held_total
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = store.released.subscribe().wait_for(|r| *r).await;
            None
        }
        Some(FaultKind::DropWatchAfter(d)) => {
            drop_watch_after = Some(*d);
            None
        }
        // A real API server answers a watch from a too-old resourceVersion with 200 and one
        // ERROR event (the watch cache's errWatcher), never with an HTTP 410: clients relist on
        // the event, while an HTTP error at watch start only makes them retry the same version.
        Some(FaultKind::Expired) if is_watch => Some(expired_watch()),
        Some(kind) => faults::error_of(kind).map(|(e, retry_after)| {
            let mut r = error_response(&e);
            if let Some(s) = retry_after
                && let Ok(v) = header::HeaderValue::from_str(&s.to_string())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }),
        None => None,
    };
    let resp = resp.unwrap_or_else(|| {
        route(
            &store,
            &Call {
                method: &method,
                path: &path,
                query: &query,
                headers: &headers,
                body: &body,
                drop_watch_after,
            },
        )
    });
    let watch_error = (is_watch && fault == Some(FaultKind::Expired)).then_some(410);
    store.lock().requests.push(RecordedRequest {
        method: method.to_string(),
        path,
        query,
        status: resp.status().as_u16(),
        body: String::from_utf8_lossy(&body).into_owned(),
        watch_error,
        user: authenticate(&headers)
            .map(|who| who.user())
            .unwrap_or_default(),
        at: std::time::Instant::now(),
    });
    resp
}

/// One request as routed.
struct Call<'a> {
    method: &'a Method,
    path: &'a str,
    query: &'a str,
    headers: &'a HeaderMap,
    body: &'a Bytes,
    /// An injected fault: a watch started by this request ends after this long.
    drop_watch_after: Option<Duration>,
}

/// Checks a body's fields under the request's validation mode: an error in Strict mode, the
/// `Warning` header values in Warn mode.
fn validate_fields(
    store: &Store,
    q: &HashMap<String, String>,
    kind: &str,
    unknown: Vec<String>,
) -> Result<Vec<String>, ApiError> {
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let mode = FieldValidation::for_request(
        store.validation,
        q.get("fieldValidation").map(String::as_str),
    );
    match mode {
        FieldValidation::Strict => Err(faults::strict_error(kind, &unknown)),
        FieldValidation::Warn => Ok(faults::warnings(&unknown)),
        FieldValidation::Ignore => Ok(Vec::new()),
    }
}

/// A parsed resource path.
struct Target<'a> {
    res: Res,
    ns: Option<&'a str>,
    name: Option<&'a str>,
    sub: Option<&'a str>,
    /// Who writes, and the policies the write must pass (section 14); None: not checked.
    admit: Option<(&'a Identity, &'a Admission)>,
    /// The field manager of a write whose field ownership is recorded (Nodes only, see
    /// `managed`); None: `metadata.managedFields` is left as it is.
    manager: Option<String>,
}

impl Target<'_> {
    /// Records the field ownership of a write of `new` over `old` (None: a create), when this
    /// target tracks it (`manager`).
    fn track(&self, old: Option<&Value>, new: &mut Value, operation: &str) {
        if let Some(manager) = &self.manager {
            managed::track(
                old,
                new,
                manager,
                operation,
                self.sub,
                &super::store::now_rfc3339(),
            );
        }
    }

    /// Runs the admission policies on a write of `name` (object after, old object before).
    fn admit(
        &self,
        operation: &str,
        name: &str,
        object: Option<&Value>,
        old_object: Option<&Value>,
    ) -> Result<(), ApiError> {
        let Some((who, policies)) = self.admit else {
            return Ok(());
        };
        let info = self.res.info();
        policies.admit(&admission::Request {
            who,
            operation,
            api_group: info.group,
            resource: info.plural,
            subresource: self.sub,
            namespace: self.ns,
            name,
            object,
            old_object,
        })
    }
}

fn parse_target<'a>(group: &str, version: &str, segs: &[&'a str]) -> Option<Target<'a>> {
    let (ns, rest) = match segs {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, segs),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return None,
    };
    let res = Res::lookup(group, version, plural)?;
    let ok_scope = if res.info().namespaced {
        ns.is_some() || name.is_none()
    } else {
        ns.is_none()
    };
    let ok_sub = match sub {
        None => true,
        Some("status") => res.info().has_status,
        Some("eviction") => res == Res::Pods,
        _ => false,
    };
    (ok_scope && ok_sub).then_some(Target {
        res,
        ns,
        name,
        sub,
        admit: None,
        manager: None,
    })
}

fn route(store: &Arc<Store>, call: &Call) -> Response {
    let (method, path, query, headers, body) =
        (call.method, call.path, call.query, call.headers, call.body);
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let discovery = match segs.as_slice() {
        ["version"] => Some(resources::version()),
        ["api"] => Some(resources::core_versions()),
        ["apis"] => Some(resources::group_list()),
        ["api", v] => resources::resource_list("", v),
        ["apis", g] => resources::group(g),
        ["apis", g, v] => resources::resource_list(g, v),
        _ => None,
    };
    let mut who = Identity::Admin;
    if segs.as_slice() != ["fake", "audit"] {
        who = match authenticate(headers) {
            Ok(who) => who,
            Err(e) => return error_response(&e),
        };
        if discovery.is_none()
            && let Err(e) = authorize(store, &who, method.as_str(), &segs, query)
        {
            return error_response(&e);
        }
    }
    // Admission (section 14) for ServiceAccount writes only: the admin needs no policy loaded.
    let policies: Option<Arc<Admission>> =
        (who != Identity::Admin && method != Method::GET).then(|| {
            store
                .admission
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(Admission::shipped)
        });
    if let Some(doc) = discovery {
        return json_response(200, &doc);
    }
    if segs.as_slice() == ["fake", "audit"] {
        // Not a Kubernetes path: the PDB audit, for the runnable fake's users (bin/fake-apiserver).
        let st = store.lock();
        let violations: Vec<Value> = st
            .audit
            .iter()
            .filter(|a| a.healthy < a.desired_healthy)
            .map(|a| json!({"pdb": a.pdb, "healthy": a.healthy, "desiredHealthy": a.desired_healthy}))
            .collect();
        return json_response(
            200,
            &json!({"samples": st.audit.len(), "violations": violations}),
        );
    }
    let target = match segs.as_slice() {
        ["api", v, rest @ ..] => parse_target("", v, rest),
        ["apis", g, v, rest @ ..] => parse_target(g, v, rest),
        _ => None,
    };
    let Some(mut t) = target else {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    t.admit = policies.as_deref().map(|p| (&who, p));
    let q = parse_query(query);
    if t.res == Res::Nodes && store.config.managed_fields {
        let ua = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok());
        t.manager = Some(managed::manager_of(
            q.get("fieldManager").map(String::as_str),
            ua,
        ));
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut warnings: Vec<String> = Vec::new();
    let result = match (method.as_str(), t.name, t.sub) {
        ("GET", None, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            return watch(store, &t, &q, call.path, call.drop_watch_after);
        }
        ("GET", None, None) => list(&store.lock(), &t, &q).map(|(items, rv)| {
            if table::wants_table(accept) {
                let include = q.get("includeObject").map_or("", String::as_str);
                (200, table::to_table(t.res, &items, &rv, include))
            } else {
                let kind = format!("{}List", t.res.info().kind);
                (
                    200,
                    json!({"kind": kind, "apiVersion": t.res.api_version(),
                             "metadata": {"resourceVersion": rv}, "items": items}),
                )
            }
        }),
        ("GET", Some(name), Some("status") | None) => get(&store.lock(), &t, name).map(|o| {
            if table::wants_table(accept) {
                let rv = o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let include = q.get("includeObject").map_or("", String::as_str);
                (
                    200,
                    table::to_table(t.res, std::slice::from_ref(&o), &rv, include),
                )
            } else {
                (200, o)
            }
        }),
        ("POST", None, None) => {
            parse_body(body).and_then(|b| store.mutate(|st| create(st, &t, b)).map(|o| (201, o)))
        }
        ("POST", Some(name), Some("eviction")) => parse_body(body).and_then(|b| {
            warnings = validate_fields(store, &q, "Eviction", faults::unknown_eviction_fields(&b))?;
            t.admit("CREATE", name, Some(&b), None)?;
            let ns = t.ns.unwrap_or_default();
            store
                .mutate(|st| pdb::evict(st, ns, name, &b, q.get("dryRun").map(String::as_str)))
                .map(|o| (201, o))
        }),
        ("PUT", Some(name), Some("status") | None) => parse_body(body)
            .and_then(|b| store.mutate(|st| update(st, &t, name, b)).map(|o| (200, o))),
        ("PATCH", Some(name), Some("status") | None) => store
            .mutate(|st| patch(st, &t, name, content_type, body))
            .map(|o| (200, o)),
        ("DELETE", Some(name), None) => {
            let opts = if body.is_empty() {
                Ok(json!({}))
            } else {
                parse_body(body)
            };
            opts.and_then(|opts| {
                warnings = validate_fields(
                    store,
                    &q,
                    "DeleteOptions",
                    faults::unknown_delete_options_fields(&opts),
                )?;
                let grace = q
                    .get("gracePeriodSeconds")
                    .and_then(|g| g.parse().ok())
                    .or_else(|| opts["gracePeriodSeconds"].as_i64());
                store
                    .mutate(|st| delete(st, &t, name, grace, &opts))
                    .map(|o| (200, o))
            })
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    };
    let mut resp = match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    };
    for w in warnings {
        if let Ok(v) = header::HeaderValue::from_str(&w) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

/// The identity of the request (section 13): no Authorization header is the admin (kubectl
/// sends no token over plain HTTP); a header with an unknown token is a 401.
fn authenticate(headers: &HeaderMap) -> Result<Identity, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Identity::Admin);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| Identity::from_token(t.trim()))
        .ok_or_else(|| ApiError::new(401, "Unauthorized", "Unauthorized"))
}

/// RBAC (section 13): a ServiceAccount may do only what its bound roles grant. Paths that are
/// not resource paths are left to routing (404).
fn authorize(
    store: &Store,
    who: &Identity,
    method: &str,
    segs: &[&str],
    query: &str,
) -> Result<(), ApiError> {
    if *who == Identity::Admin {
        return Ok(());
    }
    let (group, rest) = match segs {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", g, _, rest @ ..] => (*g, rest),
        _ => return Ok(()),
    };
    let q = parse_query(query);
    let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let fields = q.get("fieldSelector").map(String::as_str);
    let Some(attrs) = rbac::attributes(method, group, rest, fields, watch) else {
        return Ok(());
    };
    let rules = store
        .rbac
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| match who {
            Identity::ServiceAccount {
                namespace, name, ..
            } => Rbac::shipped_for(namespace, name),
            Identity::Admin => Rbac::shipped(),
        });
    if rules.allows(who, &attrs) {
        return Ok(());
    }
    let mut e = ApiError::new(403, "Forbidden", attrs.forbidden_message(&who.user()));
    e.details = Some(json!({
        "name": attrs.name.clone().unwrap_or_default(),
        "group": attrs.api_group,
        "kind": attrs.resource,
    }));
    Err(e)
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn selectors(
    res: Res,
    q: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str), res)
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn list(
    st: &State,
    t: &Target,
    q: &HashMap<String, String>,
) -> Result<(Vec<Value>, String), ApiError> {
    let (labels, fields) = selectors(t.res, q)?;
    let items = st
        .list(t.res, t.ns)
        .into_iter()
        .filter(|o| labels.matches_object(o) && fields.matches(o))
        .collect();
    Ok((items, st.rv.to_string()))
}

fn get(st: &State, t: &Target, name: &str) -> Result<Value, ApiError> {
    st.get(t.res, t.ns.unwrap_or_default(), name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(t.res, name))
}

fn set_namespace(t: &Target, obj: &mut Value) -> Result<(), ApiError> {
    if let Some(ns) = t.ns {
        match obj["metadata"]["namespace"].as_str() {
            Some(n) if !n.is_empty() && n != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => obj["metadata"]["namespace"] = json!(ns),
        }
    }
    Ok(())
}

fn create(st: &mut State, t: &Target, mut obj: Value) -> Result<Value, ApiError> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    set_namespace(t, &mut obj)?;
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("uid");
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    t.admit("CREATE", &name, Some(&obj), None)?;
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("managedFields");
    }
    t.track(None, &mut obj, "Update");
    st.create(t.res, obj)
}

/// Keeps the status of `cur` on a main-resource write, or only the new status on a `/status`
/// write, as the API server's status subresource strategy does.
fn split_status(t: &Target, cur: &Value, mut new: Value) -> Value {
    if !t.res.info().has_status {
        return new;
    }
    if t.sub == Some("status") {
        let mut out = cur.clone();
        out["status"] = new["status"].take();
        out
    } else {
        match cur.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        new
    }
}

/// Identity fields the client may not change.
fn keep_identity(cur: &Value, new: &mut Value) {
    for f in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
    ] {
        match cur["metadata"].get(f) {
            Some(v) => new["metadata"][f] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(f);
                }
            }
        }
    }
}

fn update(st: &mut State, t: &Target, name: &str, mut obj: Value) -> Result<Value, ApiError> {
    let cur = get(st, t, name)?;
    if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    set_namespace(t, &mut obj)?;
    if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
        && !rv.is_empty()
        && cur["metadata"]["resourceVersion"] != rv
    {
        return Err(ApiError::stale(t.res, name));
    }
    keep_identity(&cur, &mut obj);
    // A PUT without managedFields keeps the live ones; with some, they replace them (as a
    // real server honours them).
    if obj["metadata"]["managedFields"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        obj["metadata"]["managedFields"] = cur["metadata"]["managedFields"].clone();
    }
    let mut out = split_status(t, &cur, obj);
    t.track(Some(&cur), &mut out, "Update");
    if out["metadata"]["managedFields"].is_null()
        && let Some(m) = out["metadata"].as_object_mut()
    {
        m.remove("managedFields");
    }
    t.admit("UPDATE", name, Some(&out), Some(&cur))?;
    Ok(st.replace(t.res, out))
}

fn patch(
    st: &mut State,
    t: &Target,
    name: &str,
    content_type: &str,
    body: &Bytes,
) -> Result<Value, ApiError> {
    let pt = PatchType::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"),
        )
    })?;
    let p: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the fake API server accepts JSON patch bodies only (apply-patch bodies must be JSON): {e}"
        ))
    })?;
    let cur = match get(st, t, name) {
        Ok(c) => c,
        // Server-side apply creates missing objects.
        Err(_) if pt == PatchType::Apply && t.sub.is_none() => {
            let mut obj = p;
            obj["metadata"]["name"] = json!(name);
            return create(st, t, obj);
        }
        Err(e) => return Err(e),
    };
    let mut new = cur.clone();
    if pt == PatchType::Json {
        json_patch(&mut new, &p).map_err(|e| ApiError::new(422, "Invalid", e))?;
    } else {
        if let Some(rv) = p["metadata"]["resourceVersion"].as_str()
            && cur["metadata"]["resourceVersion"] != rv
        {
            return Err(ApiError::stale(t.res, name));
        }
        merge_patch(&mut new, &p);
        if t.manager.is_none()
            && let Some(m) = new["metadata"].as_object_mut()
        {
            m.remove("managedFields");
        }
    }
    keep_identity(&cur, &mut new);
    let mut out = split_status(t, &cur, new);
    let operation = if pt == PatchType::Apply {
        "Apply"
    } else {
        "Update"
    };
    t.track(Some(&cur), &mut out, operation);
    t.admit("UPDATE", name, Some(&out), Some(&cur))?;
    Ok(st.replace(t.res, out))
}

fn delete(
    st: &mut State,
    t: &Target,
    name: &str,
    grace: Option<i64>,
    opts: &Value,
) -> Result<Value, ApiError> {
    let ns = t.ns.unwrap_or_default();
    if t.res == Res::Pods {
        return controllers::delete_pod(st, ns, name, grace, opts);
    }
    let cur = get(st, t, name)?;
    check_preconditions(t.res, &cur, opts)?;
    t.admit("DELETE", name, None, Some(&cur))?;
    Ok(st.remove(t.res, ns, name).unwrap_or(cur))
}

/// A watch stream holding only an `ERROR` event with the 410 `Expired` Status, then its end.
fn expired_watch() -> Response {
    let status = faults::expired().status();
    let mut line =
        serde_json::to_vec(&json!({"type": "ERROR", "object": status})).unwrap_or_default();
    line.push(b'\n');
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(line))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// One open watch.
struct Cursor {
    store: Arc<Store>,
    res: Res,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    next: usize,
    last_rv: u64,
    queue: VecDeque<Value>,
    deadline: Instant,
    bookmarks: bool,
    rx: tokio::sync::watch::Receiver<u64>,
    /// The request path, matched against `FakeApi::end_watches`.
    path: String,
    ends: tokio::sync::broadcast::Receiver<String>,
}

impl Cursor {
    fn selected(&self, obj: &Value) -> bool {
        self.ns
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"] == ns)
            && self.labels.matches_object(obj)
            && self.fields.matches(obj)
    }

    /// The event this watch reports for a change, if any.
    fn event(&self, ch: &Change) -> Option<Value> {
        if ch.res != self.res {
            return None;
        }
        let now = self.selected(&ch.object);
        let before = ch.old.as_ref().map(|o| self.selected(o));
        let kind = match (ch.kind, before, now) {
            ("MODIFIED", Some(true), true) => "MODIFIED",
            ("MODIFIED", Some(true), false) => "DELETED",
            ("MODIFIED", _, true) | ("ADDED", _, true) => "ADDED",
            ("DELETED", _, true) => "DELETED",
            _ => return None,
        };
        Some(json!({"type": kind, "object": ch.object}))
    }

    fn pull(&mut self) {
        let store = Arc::clone(&self.store);
        let st = store.lock();
        for ch in &st.history[self.next..] {
            if let Some(ev) = self.event(ch) {
                self.queue.push_back(ev);
            }
        }
        self.next = st.history.len();
        self.last_rv = st.rv;
    }

    fn bookmark(&self, annotations: Value) -> Value {
        json!({"type": "BOOKMARK", "object": {
            "kind": self.res.info().kind, "apiVersion": self.res.api_version(),
            "metadata": {"resourceVersion": self.last_rv.to_string(), "annotations": annotations}}})
    }

    /// Whether `FakeApi::end_watches` named this watch (a lagging receiver ends too: it may
    /// have missed its name).
    fn ended(&mut self) -> bool {
        use tokio::sync::broadcast::error::TryRecvError;
        loop {
            match self.ends.try_recv() {
                Ok(p) if self.path.contains(&p) => return true,
                Ok(_) => {}
                Err(TryRecvError::Empty | TryRecvError::Closed) => return false,
                Err(TryRecvError::Lagged(_)) => return true,
            }
        }
    }

    async fn next_line(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        loop {
            // Ended as by an API server restart: queued events are lost with the connection.
            if self.ended() {
                return None;
            }
            if let Some(ev) = self.queue.pop_front() {
                let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                line.push(b'\n');
                return Some((Ok(Bytes::from(line)), self));
            }
            let now = Instant::now();
            if now >= self.deadline {
                return None;
            }
            self.pull();
            if !self.queue.is_empty() {
                continue;
            }
            let wake = self.deadline.min(now + BOOKMARK_EVERY);
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                end = self.ends.recv() => {
                    use tokio::sync::broadcast::error::RecvError;
                    match end {
                        Ok(p) if !self.path.contains(&p) => {}
                        Ok(_) | Err(RecvError::Lagged(_) | RecvError::Closed) => return None,
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if self.bookmarks && Instant::now() < self.deadline {
                        let b = self.bookmark(json!({}));
                        self.queue.push_back(b);
                    }
                }
            }
        }
    }
}

fn watch(
    store: &Arc<Store>,
    t: &Target,
    q: &HashMap<String, String>,
    path: &str,
    drop_after: Option<Duration>,
) -> Response {
    let (labels, fields) = match selectors(t.res, q) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let rv = q.get("resourceVersion").map_or("", String::as_str);
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let mut cursor = Cursor {
        store: Arc::clone(store),
        res: t.res,
        ns: t.ns.map(str::to_string),
        labels,
        fields,
        next: 0,
        last_rv: 0,
        queue: VecDeque::new(),
        deadline: Instant::now()
            + drop_after
                .unwrap_or(Duration::from_secs(timeout))
                .min(Duration::from_secs(timeout)),
        bookmarks: q.get("allowWatchBookmarks").is_some_and(|v| v == "true"),
        rx: store.subscribe(),
        path: path.to_string(),
        ends: store.watch_ends.subscribe(),
    };
    {
        let st = store.lock();
        if rv.is_empty() || rv == "0" || send_initial {
            // Start "from now" with synthetic ADDED events for what exists.
            for o in st.list(t.res, t.ns) {
                if cursor.selected(&o) {
                    cursor
                        .queue
                        .push_back(json!({"type": "ADDED", "object": o}));
                }
            }
            cursor.next = st.history.len();
        } else {
            let Ok(from) = rv.parse::<u64>() else {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resource version {rv:?}"
                )));
            };
            cursor.next = st.history.partition_point(|c| c.rv <= from);
        }
        cursor.last_rv = st.rv;
    }
    if send_initial {
        let b = cursor.bookmark(json!({"k8s.io/initial-events-end": "true"}));
        cursor.queue.push_back(b);
    }
    let stream = futures::stream::unfold(cursor, Cursor::next_line);
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
