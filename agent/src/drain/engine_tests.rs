//! Unit tests of the drain engine's requests against a scripted API (issue #21).
//!
//! A `tower-test` mock service sits behind a real `kube::Client` (as kube-rs tests its own
//! client); [`Script`] answers the requests in the order it lists them, checking each one's
//! method, path, query and, where it matters, body. A request the script does not expect (or
//! one after its end) fails the test at once, naming it: the tests pin the exact order of the
//! engine's calls. Time is paused (`start_paused`), so back-offs and `Retry-After` waits run in
//! virtual time and the time between two requests is asserted, never slept for.
//!
//! Cases ported from kubectl say so: `pkg/drain/drain_test.go` (TestDeleteOrEvict,
//! TestDeletePods) and `pkg/cmd/drain/drain_test.go` (TestDrain's pod kinds), both under
//! `staging/src/k8s.io/kubectl/`.

use std::collections::VecDeque;
use std::future::Future;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::client::Body;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};

use super::*;
use crate::drain::DrainConfig;

const NODE: &str = "node-a";
/// A test that has not finished after this much virtual time is stuck (waits are seconds).
const TEST_TIMEOUT: Duration = Duration::from_secs(3600);

// === the scripted API ===

type Check = Box<dyn FnOnce(&Value) + Send>;

enum Reply {
    /// This status and JSON body, with these headers.
    Json(u16, Value, Vec<(&'static str, String)>),
    /// 201 with the request's body (a created object, e.g. an Event).
    Echo,
    /// This status and a plain-text body (a proxy's answer, not a Kubernetes Status).
    Text(u16, &'static str, Vec<(&'static str, String)>),
}

struct Step {
    method: Method,
    path: String,
    query: Vec<String>,
    check: Option<Check>,
    reply: Reply,
}

impl Step {
    fn describe(&self) -> String {
        format!("{} {}?{}", self.method, self.path, self.query.join("&"))
    }
}

/// A request the scripted API answered, with the virtual time it arrived.
#[derive(Debug, Clone)]
struct Seen {
    line: String,
    at: Instant,
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The API's expected requests, in order, and its answers.
struct Script {
    handle: Handle,
    steps: VecDeque<Step>,
}

/// `a=b&c=d` as sorted, percent-decoded pairs (kube may add an empty `?` or `&`).
fn query_pairs(q: &str) -> Vec<String> {
    let mut out: Vec<String> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(percent_decode)
        .collect();
    out.sort();
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).expect("utf-8 query")
}

/// A Kubernetes `Status` error body.
fn status(code: u16, reason: &str, message: &str, details: Value) -> Value {
    let mut s = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    if !details.is_null() {
        s["details"] = details;
    }
    s
}

/// The eviction handler's refusal under a budget (as a real API server answers it).
fn budget_refusal(details_extra: Value) -> Value {
    let mut details = json!({ "causes": [{
        "reason": "DisruptionBudget",
        "message": "The disruption budget web-pdb needs 2 healthy pods and has 2 currently",
    }]});
    if let Value::Object(m) = details_extra {
        for (k, v) in m {
            details[k] = v;
        }
    }
    status(
        429,
        "TooManyRequests",
        "Cannot evict pod as it would violate the pod's disruption budget.",
        details,
    )
}

/// API Priority and Fairness throttling: no budget involved.
fn throttled(retry_after_seconds: Option<u32>) -> Value {
    status(
        429,
        "TooManyRequests",
        "Too many requests, please try again later.",
        retry_after_seconds.map_or(Value::Null, |s| json!({ "retryAfterSeconds": s })),
    )
}

fn not_found(name: &str) -> Value {
    status(
        404,
        "NotFound",
        &format!("pods \"{name}\" not found"),
        json!({ "name": name, "kind": "pods" }),
    )
}

fn evicted() -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201 })
}

impl Script {
    /// Expects `line` ("METHOD /path?query") next and answers `code` with `body`.
    fn expect(mut self, line: &str, code: u16, body: Value) -> Self {
        let (method, target) = line.split_once(' ').expect("METHOD /path");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        self.steps.push_back(Step {
            method: method.parse().expect("method"),
            path: path.to_string(),
            query: query_pairs(query),
            check: None,
            reply: Reply::Json(code, body, Vec::new()),
        });
        self
    }

    /// Checks the last expected request's body (JSON; `null` when empty) when it arrives; a
    /// check may also look at the engine's state at that moment.
    fn check(mut self, f: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.steps.back_mut().expect("a step").check = Some(Box::new(f));
        self
    }

    /// Adds a header to the last step's answer.
    fn header(mut self, name: &'static str, value: &str) -> Self {
        match &mut self.steps.back_mut().expect("a step").reply {
            Reply::Json(_, _, h) | Reply::Text(_, _, h) => h.push((name, value.to_string())),
            Reply::Echo => panic!("an echo has no headers"),
        }
        self
    }

    fn reply(mut self, reply: Reply) -> Self {
        self.steps.back_mut().expect("a step").reply = reply;
        self
    }

    // --- the engine's calls ---

    /// The node, as GET returns it.
    fn get_node(self, node: Value) -> Self {
        self.expect(&format!("GET /api/v1/nodes/{NODE}"), 200, node)
    }

    /// A write of the drain's state annotation (`save`: GET, then a resourceVersion-guarded
    /// PATCH) recording `phase`.
    fn save(self, node: &Value, phase: &'static str) -> Self {
        self.get_node(node.clone())
            .expect(
                &format!("PATCH /api/v1/nodes/{NODE}?fieldManager=nodekeeper"),
                200,
                node.clone(),
            )
            .check(move |b| {
                assert_eq!(b["metadata"]["resourceVersion"], "7", "{b}");
                let rec = b["metadata"]["annotations"][STATE_ANNOTATION]
                    .as_str()
                    .expect("the state annotation");
                let rec: Value = serde_json::from_str(rec).unwrap();
                assert_eq!(rec["phase"], phase, "{rec}");
            })
    }

    /// The cordon: GET (already cordoned?), then the PATCH of `spec.unschedulable`.
    fn cordon(self, node: &Value) -> Self {
        self.get_node(node.clone())
            .expect(
                &format!("PATCH /api/v1/nodes/{NODE}?fieldManager=nodekeeper"),
                200,
                node.clone(),
            )
            .check(|b| {
                assert_eq!(b["spec"]["unschedulable"], true, "{b}");
                assert!(b["metadata"]["annotations"][CORDONED_AT].is_string(), "{b}");
            })
    }

    /// A Kubernetes Event on the node with this reason.
    fn event(self, reason: &'static str) -> Self {
        self.expect("POST /api/v1/namespaces/default/events", 201, Value::Null)
            .reply(Reply::Echo)
            .check(move |b| {
                assert_eq!(b["reason"], reason, "{b}");
                assert_eq!(b["involvedObject"]["name"], NODE, "{b}");
            })
    }

    /// The LIST of the node's pods.
    fn list(self, pods: &[Pod]) -> Self {
        let list = json!({ "apiVersion": "v1", "kind": "PodList",
            "metadata": { "resourceVersion": "1" }, "items": pods });
        self.expect(
            &format!("GET /api/v1/pods?fieldSelector=spec.nodeName={NODE}"),
            200,
            list,
        )
    }

    /// The eviction POST of `name` (namespace `ns`), answered `code` with `body`.
    fn evict(self, name: &str, code: u16, body: Value) -> Self {
        self.expect(
            &format!("POST /api/v1/namespaces/ns/pods/{name}/eviction"),
            code,
            body,
        )
    }

    /// A GET of pod `name`, answered with that pod (still there) or 404 (`None`).
    fn get_pod(self, name: &str, pod: Option<&Pod>) -> Self {
        let line = format!("GET /api/v1/namespaces/ns/pods/{name}");
        match pod {
            Some(p) => self.expect(&line, 200, serde_json::to_value(p).unwrap()),
            None => self.expect(&line, 404, not_found(name)),
        }
    }

    /// What `drive` asks before its first eviction: the state (cordoning), the cordon, its
    /// Event, the LIST, the state (evicting).
    fn drive_start(self, node: &Value, pods: &[Pod]) -> Self {
        self.save(node, "cordoning")
            .cordon(node)
            .event("DrainStarted")
            .list(pods)
            .save(node, "evicting")
    }

    /// Runs `act` against the script and returns its output and the requests seen. The test
    /// fails at once on an unexpected request (or one after the script's end), when `act`
    /// outlives `TEST_TIMEOUT` (virtual), and when `act` ends with steps left unasked.
    async fn run<T>(self, act: impl Future<Output = T>) -> (T, Vec<Seen>) {
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let left = Arc::new(Mutex::new(
            self.steps
                .iter()
                .map(Step::describe)
                .collect::<VecDeque<_>>(),
        ));
        let mut task = tokio::spawn(serve(self.handle, self.steps, seen.clone(), left.clone()));
        let act = tokio::time::timeout(TEST_TIMEOUT, act);
        tokio::pin!(act);
        let snapshot = || seen.lock().unwrap().clone();
        let out = tokio::select! {
            biased;
            r = &mut task => match r {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                r => panic!("the scripted API stopped: {r:?}; seen {:#?}", snapshot()),
            },
            out = &mut act => out,
        };
        if task.is_finished()
            && let Err(e) = (&mut task).await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        let Ok(out) = out else {
            panic!(
                "the engine did not finish within {TEST_TIMEOUT:?}; seen {:#?}; still expected {:#?}",
                snapshot(),
                left.lock().unwrap()
            );
        };
        let unasked = left.lock().unwrap().clone();
        assert!(
            unasked.is_empty(),
            "the engine finished with requests of the script left unasked: {unasked:#?}; seen {:#?}",
            snapshot()
        );
        task.abort();
        (out, snapshot())
    }
}

/// A client on a fresh scripted API, and the (empty) script to fill.
fn scripted() -> (Client, Script) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (
        // The layer `kube::connect` puts on the agent's client, as in production.
        crate::kube::retry_after_headers(Client::new(service, "default")),
        Script {
            handle,
            steps: VecDeque::new(),
        },
    )
}

/// Answers the requests in `steps` order; panics on any other.
async fn serve(
    mut handle: Handle,
    mut steps: VecDeque<Step>,
    seen: Arc<Mutex<Vec<Seen>>>,
    left: Arc<Mutex<VecDeque<String>>>,
) {
    while let Some((req, send)) = handle.next_request().await {
        let line = format!(
            "{} {}?{}",
            req.method(),
            req.uri().path(),
            query_pairs(req.uri().query().unwrap_or("")).join("&")
        );
        seen.lock().unwrap().push(Seen {
            line: line.clone(),
            at: Instant::now(),
        });
        let Some(step) = steps.pop_front() else {
            panic!("unexpected request after the script's end: {line}");
        };
        left.lock().unwrap().pop_front();
        assert_eq!(
            line,
            step.describe(),
            "unexpected request (left: got, right: expected)"
        );
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON request body")
        };
        if let Some(check) = step.check {
            check(&body);
        }
        let (code, payload, headers) = match step.reply {
            Reply::Json(code, v, headers) => (code, serde_json::to_vec(&v).unwrap(), headers),
            Reply::Echo => (201, bytes.to_vec(), Vec::new()),
            Reply::Text(code, text, headers) => (code, text.as_bytes().to_vec(), headers),
        };
        let mut r = Response::builder().status(code);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        send.send_response(r.body(Body::from(payload)).expect("a response"));
    }
}

/// Virtual time between the `a`-th and `b`-th requests seen (0-based).
fn gap(seen: &[Seen], a: usize, b: usize) -> Duration {
    seen[b].at - seen[a].at
}

/// `lo <= waited <= hi`, give or take the timer wheel's 1 ms (a sleep ends on a whole ms).
fn assert_within(waited: Duration, lo: Duration, hi: Duration) {
    let tick = Duration::from_millis(1);
    assert!(
        waited + tick >= lo && waited <= hi + tick,
        "waited {waited:?}, not within [{lo:?}, {hi:?}]"
    );
}

// === fixtures ===

const CORDONED_AT: &str = super::super::CORDONED_AT_ANNOTATION;

fn controller(client: Client) -> Arc<DrainController> {
    let config = DrainConfig {
        // The longest lease: its fence (two thirds of it, virtual) outlives every back-off
        // these tests wait through without a renewal.
        owner_lease: crate::config::ConfigDuration(Duration::from_secs(600)),
        ..DrainConfig::default()
    };
    let metrics = DrainMetrics::register(&mut prometheus_client::registry::Registry::default());
    DrainController::new(
        client,
        NODE.to_string(),
        config,
        metrics,
        None,
        CancellationToken::new(),
    )
}

fn params(grace_period_seconds: Option<i64>) -> DrainParams {
    let now = SystemTime::now();
    DrainParams {
        id: "d-1".into(),
        reason: "test".into(),
        requester: "tester".into(),
        principal: "token:control".into(),
        started: now,
        deadline: now + Duration::from_secs(3600),
        grace_period_seconds,
        concurrency: 1,
        delete_emptydir_data: false,
        evict_unreplicated: false,
        leader_selector: plan::DEFAULT_LEADER_SELECTOR.into(),
        skip_wait_for_delete: None,
        rotation: None,
        bypass_fleet_lock: false,
    }
}

/// The Node as the API returns it: this controller's claim on drain `params` recorded, not
/// cordoned, resourceVersion 7.
fn node(ctrl: &DrainController, params: &DrainParams) -> Value {
    let mut rec = params.persisted(DrainPhase::Pending, Vec::new(), String::new());
    rec.driver = ctrl.instance.clone();
    rec.heartbeat = DrainController::now();
    json!({ "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": NODE, "uid": "node-uid", "resourceVersion": "7",
            "annotations": { STATE_ANNOTATION: rec.to_json() } },
        "spec": { "unschedulable": false } })
}

/// A ready pod in namespace `ns` owned by a ReplicaSet: `pod("web-1").leader()...`.
struct P(Pod);

fn pod(name: &str) -> P {
    let mut p = Pod::default();
    p.metadata.name = Some(name.into());
    p.metadata.namespace = Some("ns".into());
    p.metadata.uid = Some(format!("uid-{name}"));
    p.spec = Some(PodSpec::default());
    P(p).owned_by("apps/v1", "ReplicaSet", &format!("rs-{name}"))
        .ready(true)
}

impl P {
    fn owned_by(mut self, api_version: &str, kind: &str, name: &str) -> Self {
        self.0.metadata.owner_references = Some(vec![OwnerReference {
            api_version: api_version.into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            controller: Some(true),
            ..Default::default()
        }]);
        self
    }
    fn unowned(mut self) -> Self {
        self.0.metadata.owner_references = None;
        self
    }
    fn ready(mut self, ready: bool) -> Self {
        self.0.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        self
    }
    fn phase(mut self, phase: &str) -> Self {
        self.0.status.get_or_insert_with(Default::default).phase = Some(phase.into());
        self
    }
    fn leader(mut self) -> Self {
        self.0.metadata.labels =
            Some([("nodekeeper.io/role".to_string(), "leader".to_string())].into());
        self
    }
    fn mirror(mut self) -> Self {
        self.0.metadata.annotations =
            Some([(plan::MIRROR_ANNOTATION.to_string(), "x".to_string())].into());
        self
    }
    fn priority(mut self, p: i32) -> Self {
        self.0.spec.as_mut().unwrap().priority = Some(p);
        self
    }
    fn uid(mut self, uid: &str) -> Self {
        self.0.metadata.uid = Some(uid.into());
        self
    }
}

/// The plan's entry for pod `name` (class regular).
fn planned(name: &str) -> PlannedPod {
    PlannedPod {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        class: Class::Regular,
        priority: 0,
    }
}

fn run_for(params: &DrainParams) -> Arc<DrainRun> {
    DrainRun::new(pb::DrainStatus {
        id: params.id.clone(),
        ..Default::default()
    })
}

/// Evictions may be posted (the fence of #16-k) without a claim write first.
fn claimed(ctrl: &DrainController) {
    ctrl.claim_until
        .send_replace(Some(Instant::now() + Duration::from_secs(24 * 3600)));
}

fn count(
    f: &Family<Vec<(&'static str, &'static str)>, Counter>,
    k: &'static str,
    v: &'static str,
) -> u64 {
    f.get_or_create(&vec![(k, v)]).get()
}

fn evictions_of(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.line.ends_with("/eviction?"))
        .map(|s| s.line.split('/').nth(6).unwrap_or_default().to_string())
        .collect()
}

fn outcome_error(r: Result<(), Outcome>) -> String {
    match r {
        Ok(()) => panic!("the drain succeeded"),
        Err(Outcome::Failed(e)) => e,
        Err(Outcome::TimedOut) => panic!("timed out"),
        Err(Outcome::Cancelled) => panic!("cancelled"),
    }
}

/// `drive` on a fresh run of `params`, with its done set.
async fn drive(
    script: Script,
    ctrl: &Arc<DrainController>,
    params: &DrainParams,
) -> (
    Result<(), Outcome>,
    Vec<Seen>,
    Arc<DrainRun>,
    HashSet<String>,
) {
    let run = run_for(params);
    let done = Arc::new(Mutex::new(HashSet::new()));
    let slot: SlotCell = Arc::new(Mutex::new(None));
    let (r, seen) = script
        .run(ctrl.drive(&run, params, done.clone(), slot))
        .await;
    let done = done.lock().unwrap().clone();
    (r, seen, run, done)
}

fn conflict() -> Value {
    status(
        409,
        "Conflict",
        "Operation cannot be fulfilled on nodes \"node-a\": the object has been modified; please apply your changes to the latest version and try again",
        json!({ "name": NODE, "kind": "nodes" }),
    )
}

// === the order of a drain: state, cordon, then evictions ===

/// The whole drive of one pod, in order: the state (cordoning), the cordon PATCH, its Event,
/// the LIST, the state (evicting), then the eviction, the wait (a GET answering 404), the
/// progress save, and a LIST that shows no pod left. kubectl's TestDrain "RC-managed pod".
#[tokio::test(start_paused = true)]
async fn cordon_patch_precedes_every_eviction_and_a_final_list_ends_the_drain() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    let params = params(None);
    let node = node(&ctrl, &params);
    let web = pod("web-1").0;
    let script = script
        .drive_start(&node, std::slice::from_ref(&web))
        .evict("web-1", 201, evicted())
        .get_pod("web-1", None)
        .save(&node, "evicting")
        .list(&[]);
    let (r, seen, run, done) = drive(script, &ctrl, &params).await;
    assert!(r.is_ok());
    let cordon = seen
        .iter()
        .position(|s| s.line.starts_with("PATCH"))
        .and_then(|first| {
            seen.iter()
                .skip(first + 1)
                .position(|s| s.line.starts_with("PATCH"))
                .map(|i| i + first + 1)
        })
        .expect("the cordon PATCH");
    let first_eviction = seen
        .iter()
        .position(|s| s.line.ends_with("/eviction?"))
        .expect("an eviction");
    assert!(cordon < first_eviction, "{seen:#?}");
    assert_eq!(done, HashSet::from(["uid-web-1".to_string()]));
    assert_eq!(run.status().done, ["ns/web-1"]);
    assert_eq!(count(&ctrl.metrics.evictions, "result", "evicted"), 1);
}

// === the Eviction's body ===

/// The Eviction carries the drain's grace period in `deleteOptions.gracePeriodSeconds` (none:
/// the pod's own) and the planned UID as a precondition. kubectl's TestDeleteOrEvict
/// "eviction supported/enabled" (GracePeriodSeconds 10 in the Eviction's DeleteOptions).
#[tokio::test(start_paused = true)]
async fn eviction_carries_the_drains_grace_period_and_the_pods_uid() {
    for (grace, want) in [
        (Some(10), json!(10)),
        (Some(0), json!(0)),
        (None, Value::Null),
    ] {
        let (client, script) = scripted();
        let ctrl = controller(client);
        claimed(&ctrl);
        let params = params(grace);
        let script = script
            .evict("web-1", 201, evicted())
            .check(move |b| {
                assert_eq!(b["apiVersion"], "policy/v1", "{b}");
                assert_eq!(b["kind"], "Eviction", "{b}");
                assert_eq!(b["metadata"]["name"], "web-1", "{b}");
                assert_eq!(b["metadata"]["namespace"], "ns", "{b}");
                assert_eq!(b["deleteOptions"]["gracePeriodSeconds"], want, "{b}");
                assert_eq!(
                    b["deleteOptions"]["preconditions"]["uid"], "uid-web-1",
                    "{b}"
                );
            })
            .get_pod("web-1", None);
        let run = run_for(&params);
        let (r, _) = script
            .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
            .await;
        r.unwrap();
    }
}

// === 429: budgets and throttling ===

/// A budget's 429 is retried after the back-off (full jitter in [d/2, d), d doubling from
/// `retryInitial`); from the second refusal on, one GET checks the pod still exists. The
/// budget is named in `status.error` while it blocks, one DrainBlocked Event per budget, and
/// the error clears once the pod is evicted.
#[tokio::test(start_paused = true)]
async fn a_budget_refusal_is_retried_after_a_doubling_backoff() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let run = run_for(&params);
    let web = pod("web-1").0;
    let r2 = run.clone();
    let script = script
        .evict("web-1", 429, budget_refusal(Value::Null))
        .event("DrainBlocked")
        .check(|b| assert!(b["message"].as_str().unwrap().contains("web-pdb"), "{b}"))
        .evict("web-1", 429, budget_refusal(Value::Null))
        .check(move |_| {
            let error = r2.status().error;
            assert!(error.contains("ns/web-1 blocked by web-pdb"), "{error}");
        })
        .get_pod("web-1", Some(&web))
        .evict("web-1", 201, evicted())
        .get_pod("web-1", None);
    let (r, seen) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
    let first = gap(&seen, 0, 2);
    assert_within(first, Duration::from_millis(500), Duration::from_secs(1));
    let second = gap(&seen, 2, 4);
    assert_within(second, Duration::from_secs(1), Duration::from_secs(2));
    assert_eq!(count(&ctrl.metrics.retries, "reason", "pdb"), 2);
    assert_eq!(run.status().error, "", "unblocked once evicted");
}

/// A budget's 429 that carries a Retry-After (header and `details.retryAfterSeconds`, as the
/// API server writes both) is retried no sooner than it says.
#[tokio::test(start_paused = true)]
async fn a_budget_refusal_honours_retry_after() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let script = script
        .evict(
            "web-1",
            429,
            budget_refusal(json!({ "retryAfterSeconds": 10 })),
        )
        .header("Retry-After", "10")
        .event("DrainBlocked")
        .evict("web-1", 201, evicted())
        .get_pod("web-1", None);
    let run = run_for(&params);
    let (r, seen) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
    let waited = gap(&seen, 0, 2);
    assert!(
        waited >= Duration::from_secs(10),
        "retried after {waited:?}"
    );
}

/// API Priority and Fairness' 429 (no budget): retried after exactly its Retry-After, named
/// as throttling (one DrainThrottled Event), counted as `throttled`.
#[tokio::test(start_paused = true)]
async fn a_throttled_429_waits_its_retry_after() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let script = script
        .evict("web-1", 429, throttled(Some(7)))
        .header("Retry-After", "7")
        .event("DrainThrottled")
        .evict("web-1", 201, evicted())
        .get_pod("web-1", None);
    let run = run_for(&params);
    let (r, seen) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
    assert_within(
        gap(&seen, 0, 2),
        Duration::from_secs(7),
        Duration::from_secs(7),
    );
    assert_eq!(count(&ctrl.metrics.retries, "reason", "throttled"), 1);
    assert_eq!(count(&ctrl.metrics.retries, "reason", "pdb"), 0);
}

/// A 429 whose only Retry-After is the HTTP header (a proxy in front of the API server
/// answering in plain text) is retried no sooner than the header says.
#[tokio::test(start_paused = true)]
async fn a_retry_after_header_alone_is_honoured() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let script = script
        .evict("web-1", 429, Value::Null)
        .reply(Reply::Text(429, "Too Many Requests", Vec::new()))
        .header("Retry-After", "7")
        .event("DrainThrottled")
        .evict("web-1", 201, evicted())
        .get_pod("web-1", None);
    let run = run_for(&params);
    let (r, seen) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
    let waited = gap(&seen, 0, 2);
    assert!(waited >= Duration::from_secs(7), "retried after {waited:?}");
}

/// A 429 with no Retry-After at all backs off too, doubling: never a tight loop.
#[tokio::test(start_paused = true)]
async fn a_429_without_retry_after_backs_off_and_doubles() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let script = script
        .evict("web-1", 429, throttled(None))
        .event("DrainThrottled")
        .evict("web-1", 429, throttled(None))
        .evict("web-1", 201, evicted())
        .get_pod("web-1", None);
    let run = run_for(&params);
    let (r, seen) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
    let first = gap(&seen, 0, 2);
    assert_within(first, Duration::from_millis(500), Duration::from_secs(1));
    let second = gap(&seen, 2, 3);
    assert_within(second, Duration::from_secs(1), Duration::from_secs(2));
    assert_eq!(count(&ctrl.metrics.retries, "reason", "throttled"), 2);
}

// === 5xx ===

/// A 503 and a 500 from the eviction are retried with the back-off, and the pod counts as
/// evicted only after the POST that succeeds (checked as that POST arrives: not done, not in
/// the status, no `evicted` count). kubectl fails the drain on them ("Client error could be
/// passed out", TestDeletePods); the engine retries until the deadline.
#[tokio::test(start_paused = true)]
async fn a_5xx_on_eviction_is_retried_and_never_counts_as_evicted() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let node = node(&ctrl, &params);
    let run = run_for(&params);
    let done = Arc::new(Mutex::new(HashSet::<String>::new()));
    let (c2, r2, d2) = (ctrl.clone(), run.clone(), done.clone());
    let script = script
        .evict(
            "web-1",
            503,
            status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
                Value::Null,
            ),
        )
        .evict(
            "web-1",
            500,
            status(
                500,
                "InternalError",
                "etcdserver: request timed out",
                Value::Null,
            ),
        )
        .evict("web-1", 201, evicted())
        .check(move |_| {
            assert!(
                d2.lock().unwrap().is_empty(),
                "done before the eviction succeeded"
            );
            assert!(
                r2.status().done.is_empty(),
                "status.done before the eviction succeeded"
            );
            assert_eq!(count(&c2.metrics.evictions, "result", "evicted"), 0);
            assert_eq!(count(&c2.metrics.retries, "reason", "error"), 2);
        })
        .get_pod("web-1", None)
        .save(&node, "evicting");
    let (r, seen) = script
        .run(ctrl.evict_all(&run, &params, done.clone(), vec![planned("web-1")]))
        .await;
    assert!(r.is_ok());
    let first = gap(&seen, 0, 1);
    assert_within(first, Duration::from_millis(500), Duration::from_secs(1));
    let second = gap(&seen, 1, 2);
    assert_within(second, Duration::from_secs(1), Duration::from_secs(2));
    assert_eq!(
        *done.lock().unwrap(),
        HashSet::from(["uid-web-1".to_string()])
    );
    assert_eq!(run.status().done, ["ns/web-1"]);
    assert_eq!(count(&ctrl.metrics.evictions, "result", "evicted"), 1);
}

/// The eviction handler's "more than one PodDisruptionBudget" 500 cannot change on a retry:
/// the pod fails the drain at once, named, with no second POST.
#[tokio::test(start_paused = true)]
async fn a_500_for_a_pod_under_two_budgets_fails_without_a_retry() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let script = script.evict(
        "web-1",
        500,
        status(
            500,
            "InternalError",
            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            Value::Null,
        ),
    );
    let run = run_for(&params);
    let (r, _) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    let e = r.expect_err("fails").to_string();
    assert!(
        e.contains("ns/web-1") && e.contains("more than one PodDisruptionBudget"),
        "{e}"
    );
}

// === 404 and a pod that is gone ===

/// A 404 from the eviction, confirmed by a GET of the pod (404), means already gone: no wait,
/// counted `already_gone`, never `evicted` (kubectl's evictPods treats IsNotFound as done).
#[tokio::test(start_paused = true)]
async fn a_404_on_eviction_confirmed_by_a_get_is_already_gone() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let script = script
        .evict("web-1", 404, not_found("web-1"))
        .get_pod("web-1", None);
    let run = run_for(&params);
    let (r, _) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
    assert_eq!(count(&ctrl.metrics.evictions, "result", "already_gone"), 1);
    assert_eq!(count(&ctrl.metrics.evictions, "result", "evicted"), 0);
    let (history, _) = run.attach();
    assert!(
        history
            .iter()
            .any(|e| matches!(&e.event, Some(Ev::Deleted(p)) if p.name == "web-1")),
        "{history:?}"
    );
}

/// A 404 from the eviction while a GET still shows the pod (a proxy or an API server still
/// installing its routes, #16-g) is no proof: the pod is evicted again after the back-off.
#[tokio::test(start_paused = true)]
async fn a_404_on_eviction_with_the_pod_still_there_evicts_again() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let web = pod("web-1").0;
    let script = script
        .evict("web-1", 404, not_found("web-1"))
        .get_pod("web-1", Some(&web))
        .evict("web-1", 201, evicted())
        .get_pod("web-1", None);
    let run = run_for(&params);
    let (r, seen) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
    let waited = gap(&seen, 1, 2);
    assert_within(waited, Duration::from_millis(500), Duration::from_secs(1));
    assert_eq!(count(&ctrl.metrics.evictions, "result", "evicted"), 1);
    assert_eq!(count(&ctrl.metrics.evictions, "result", "already_gone"), 0);
}

/// After the eviction the pod is polled (every `deletionPoll`) until the GET shows it gone: a
/// pod of that name with another UID is a replacement, so the evicted one is gone. kubectl's
/// TestDeletePods "Wait for deleting to complete".
#[tokio::test(start_paused = true)]
async fn a_same_name_pod_with_another_uid_counts_as_gone() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let old = pod("web-1").0;
    let new = pod("web-1").uid("uid-web-1-new").0;
    let script = script
        .evict("web-1", 201, evicted())
        .get_pod("web-1", Some(&old))
        .get_pod("web-1", Some(&new));
    let run = run_for(&params);
    let (r, seen) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
    assert_within(
        gap(&seen, 1, 2),
        crate::drain::DEFAULT_DELETION_POLL,
        crate::drain::DEFAULT_DELETION_POLL,
    );
}

/// With a skip-wait-for-delete timeout, a pod Terminating for longer than it counts as gone.
/// kubectl's TestDeletePods "Skip Deleted Pod" (deleted 100 s ago, timeout 10 s).
#[tokio::test(start_paused = true)]
async fn a_pod_terminating_past_skip_wait_for_delete_counts_as_gone() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    *ctrl.skip_wait.lock().unwrap() = Some(Duration::from_secs(10));
    let params = params(None);
    let mut stuck = serde_json::to_value(pod("web-1").0).unwrap();
    let deleted = SystemTime::now() - Duration::from_secs(100);
    stuck["metadata"]["deletionTimestamp"] = json!(
        k8s_openapi::jiff::Timestamp::try_from(deleted)
            .unwrap()
            .to_string()
    );
    let stuck: Pod = serde_json::from_value(stuck).unwrap();
    let script = script
        .evict("web-1", 201, evicted())
        .get_pod("web-1", Some(&stuck));
    let run = run_for(&params);
    let (r, _) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
}

/// A 403 NamespaceTerminating for a pod already being deleted is waited for, not a failure
/// (as kubectl's evictPods, NamespaceTerminatingCause).
#[tokio::test(start_paused = true)]
async fn a_namespace_terminating_403_waits_for_the_pod() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    claimed(&ctrl);
    let params = params(None);
    let mut terminating = serde_json::to_value(pod("web-1").0).unwrap();
    terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let terminating: Pod = serde_json::from_value(terminating).unwrap();
    let script = script
        .evict(
            "web-1",
            403,
            status(
                403,
                "Forbidden",
                "pods \"web-1\" is forbidden: unable to create new content in namespace ns because it is being terminated",
                json!({ "causes": [{ "reason": "NamespaceTerminating", "message": "namespace ns is being terminated" }] }),
            ),
        )
        .get_pod("web-1", Some(&terminating))
        .get_pod("web-1", None);
    let run = run_for(&params);
    let (r, _) = script
        .run(ctrl.evict_and_wait(&run, &params, &planned("web-1")))
        .await;
    r.unwrap();
}

// === the plan's order and the pods that stay ===

/// Pods that are not Ready first, then the regular ones by priority (lower first), leaders
/// last, each class only once the one before is gone (plan.rs, evict_all).
#[tokio::test(start_paused = true)]
async fn not_ready_pods_go_first_and_leaders_last() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    let params = params(None);
    let node = node(&ctrl, &params);
    let pods = [
        pod("leader").leader().0,
        pod("high").priority(1000).0,
        pod("low").priority(-5).0,
        pod("sick").ready(false).priority(9999).0,
    ];
    let mut script = script.drive_start(&node, &pods);
    for (i, name) in ["sick", "low", "high", "leader"].into_iter().enumerate() {
        script = script.evict(name, 201, evicted()).get_pod(name, None);
        if i == 0 {
            // The progress save: at most one per PROGRESS_PERSIST_INTERVAL (no time passes).
            script = script.save(&node, "evicting");
        }
    }
    let script = script.list(&[]);
    let (r, seen, run, _) = drive(script, &ctrl, &params).await;
    assert!(r.is_ok());
    assert_eq!(evictions_of(&seen), ["sick", "low", "high", "leader"]);
    assert_eq!(
        classes(&run.status()),
        BTreeMap::from([
            ("ns/sick".to_string(), "not-ready".to_string()),
            ("ns/low".to_string(), "regular".to_string()),
            ("ns/high".to_string(), "regular".to_string()),
            ("ns/leader".to_string(), "leader".to_string()),
        ])
    );
}

/// DaemonSet and mirror pods stay (skipped, never evicted; still there in the last LIST, the
/// drain completes); a DaemonSet pod that has finished is removed like any finished pod.
/// kubectl's TestDrain "DS-managed pod", "mirror pod", "DS-managed terminated pod".
#[tokio::test(start_paused = true)]
async fn daemonset_and_mirror_pods_are_not_evicted() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    let params = params(None);
    let node = node(&ctrl, &params);
    let ds = pod("ds").owned_by("apps/v1", "DaemonSet", "ds").0;
    let mirror = pod("static").unowned().mirror().0;
    let ds_done = pod("ds-done")
        .owned_by("apps/v1", "DaemonSet", "ds")
        .ready(false)
        .phase("Succeeded")
        .0;
    let web = pod("web").0;
    let all = [ds.clone(), mirror.clone(), ds_done, web];
    let script = script
        .drive_start(&node, &all)
        .evict("ds-done", 201, evicted())
        .get_pod("ds-done", None)
        .save(&node, "evicting")
        .evict("web", 201, evicted())
        .get_pod("web", None)
        .list(&[ds, mirror]);
    let (r, seen, run, _) = drive(script, &ctrl, &params).await;
    assert!(r.is_ok());
    assert_eq!(evictions_of(&seen), ["ds-done", "web"]);
    let skipped: Vec<(String, String)> = run
        .status()
        .skipped
        .iter()
        .map(|s| (s.name.clone(), s.reason.clone()))
        .collect();
    assert_eq!(
        skipped,
        [
            ("ds".to_string(), "daemonset".to_string()),
            ("static".to_string(), "mirror".to_string())
        ]
    );
}

/// A pod the request does not allow (no controller) fails the drain after the cordon and
/// before any eviction. kubectl's TestDrain "naked pod" (refused without --force).
#[tokio::test(start_paused = true)]
async fn an_unreplicated_pod_fails_the_drain_before_any_eviction() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    let params = params(None);
    let node = node(&ctrl, &params);
    let naked = pod("naked").unowned().0;
    let script = script
        .save(&node, "cordoning")
        .cordon(&node)
        .event("DrainStarted")
        .list(&[naked]);
    let (r, _, _, _) = drive(script, &ctrl, &params).await;
    let e = outcome_error(r);
    assert!(
        e.contains("cannot drain: ns/naked has no controller"),
        "{e}"
    );
}

// === 409 and 410 on the Node's PATCH ===

/// A 409 on the state annotation's PATCH (its resourceVersion precondition lost a race, e.g.
/// to a kubelet status update) re-reads the Node and writes again.
#[tokio::test(start_paused = true)]
async fn a_409_on_the_state_patch_rereads_the_node_and_writes_again() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    let params = params(None);
    let node = node(&ctrl, &params);
    let script = script
        .get_node(node.clone())
        .expect(
            &format!("PATCH /api/v1/nodes/{NODE}?fieldManager=nodekeeper"),
            409,
            conflict(),
        )
        .save(&node, "cordoning");
    let (r, _) = script
        .run(ctrl.save(&params, DrainPhase::Cordoning, &[], ""))
        .await;
    r.unwrap();
}

/// A 410 on the state PATCH is neither a conflict nor transient: the drain fails before the
/// cordon, and nothing is evicted.
#[tokio::test(start_paused = true)]
async fn a_410_on_the_state_patch_fails_the_drain_before_the_cordon() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    let params = params(None);
    let node = node(&ctrl, &params);
    let script = script.get_node(node).expect(
        &format!("PATCH /api/v1/nodes/{NODE}?fieldManager=nodekeeper"),
        410,
        status(410, "Gone", "the resource version is too old", Value::Null),
    );
    let (r, _, _, _) = drive(script, &ctrl, &params).await;
    let e = outcome_error(r);
    assert!(e.contains("the resource version is too old"), "{e}");
}

/// A 409 on the cordon PATCH (a merge patch without a precondition: the server gave up on its
/// own retries) fails the drain as kubectl's cordon does: no Event, no LIST, no eviction.
#[tokio::test(start_paused = true)]
async fn a_409_on_the_cordon_patch_fails_the_drain_before_any_eviction() {
    let (client, script) = scripted();
    let ctrl = controller(client);
    let params = params(None);
    let node = node(&ctrl, &params);
    let script = script
        .save(&node, "cordoning")
        .get_node(node.clone())
        .expect(
            &format!("PATCH /api/v1/nodes/{NODE}?fieldManager=nodekeeper"),
            409,
            conflict(),
        );
    let (r, _, _, _) = drive(script, &ctrl, &params).await;
    let e = outcome_error(r);
    assert!(e.contains("the object has been modified"), "{e}");
}
