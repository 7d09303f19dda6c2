//! The object store: every object as JSON under (resource, namespace, name), one global
//! `resourceVersion` counter, the ordered history of watch events, the request log and the PDB
//! audit. One mutex guards it all, so every API operation is atomic; watchers are woken through a
//! `tokio::sync::watch` channel carrying the latest resourceVersion.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::controllers::{self, ControllerConfig, Followup};
use super::faults::{Fault, FieldValidation};
use super::pdb;
use super::resources::Res;

/// An API error, rendered as a `metav1.Status` body.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// Seconds for a `Retry-After` header (the API server sets it from
    /// `details.retryAfterSeconds`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub fn not_found(res: Res, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.qualified()),
        );
        e.details =
            Some(json!({"name": name, "group": res.info().group, "kind": res.info().plural}));
        e
    }

    pub fn already_exists(res: Res, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", res.qualified()),
        );
        e.details =
            Some(json!({"name": name, "group": res.info().group, "kind": res.info().plural}));
        e
    }

    pub fn conflict(res: Res, name: &str, why: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                res.qualified()
            ),
        );
        e.details =
            Some(json!({"name": name, "group": res.info().group, "kind": res.info().plural}));
        e
    }

    pub fn stale(res: Res, name: &str) -> Self {
        Self::conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        // A Status returned as an object (eviction.go's multi-PDB 500) has no reason.
        if !self.reason.is_empty() {
            s["reason"] = json!(self.reason);
        }
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    /// The request body as sent (lossy UTF-8), empty for none.
    pub body: String,
    /// A watch answered 200 whose stream carried an `ERROR` event: that event's code (410 for
    /// an injected `Expired`, as a real API server answers a too-old resourceVersion).
    pub watch_error: Option<u16>,
    /// Who made it (section 13): `fake-admin`, `system:serviceaccount:NS:NAME`, or empty for an
    /// unknown token.
    pub user: String,
    /// When the answer was ready (timelines in bench_drain).
    pub at: std::time::Instant,
}

/// A PodDisruptionBudget's health at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdbSample {
    pub time: SystemTime,
    /// `namespace/name`
    pub pdb: String,
    pub healthy: i64,
    pub desired_healthy: i64,
}

/// A watch event kept in history, with the previous object so selector-filtered watches can turn
/// a MODIFIED into ADDED/DELETED when an object enters or leaves the selection.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub res: Res,
    pub kind: &'static str,
    pub object: Value,
    pub old: Option<Value>,
}

pub type Key = (Res, String, String);

#[derive(Default)]
pub struct State {
    pub rv: u64,
    pub objects: BTreeMap<Key, Value>,
    pub history: Vec<Change>,
    pub requests: Vec<RecordedRequest>,
    pub audit: Vec<PdbSample>,
    /// Last (healthy, desired) per PDB, to record audit samples only on change.
    pub pdb_last: BTreeMap<String, (i64, i64)>,
    /// UIDs of Terminating pods whose grace period is over but whose finalizers hold them.
    pub grace_over: std::collections::BTreeSet<String>,
    /// Delayed work produced by the last operation (run by `Store::mutate`).
    pub followups: Vec<Followup>,
    pub seq: u64,
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

fn ns_of(obj: &Value) -> String {
    obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn name_of(obj: &Value) -> String {
    obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// A fresh pseudo-random-looking token (uids, generated names); unique per store.
    pub fn token(&mut self, len: usize) -> String {
        self.seq += 1;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let mut x = nanos ^ self.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
            })
            .collect()
    }

    /// An RFC 4122-shaped UID in lowercase hex, as the API server assigns (the agent finds
    /// pods' cgroups by it).
    pub fn uid(&mut self) -> String {
        let t: String = self
            .token(32)
            .bytes()
            .map(|b| char::from(b"0123456789abcdef"[(b % 16) as usize]))
            .collect();
        format!(
            "{}-{}-{}-{}-{}",
            &t[..8],
            &t[8..12],
            &t[12..16],
            &t[16..20],
            &t[20..32]
        )
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(res, ns.to_string(), name.to_string()))
    }

    /// Objects of `res`, in `ns` when given.
    pub fn list(&self, res: Res, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, n, _), _)| *r == res && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn record(&mut self, res: Res, kind: &'static str, object: Value, old: Option<Value>) {
        let rv = self.rv;
        self.history.push(Change {
            rv,
            res,
            kind,
            object,
            old,
        });
    }

    /// Stores a new object: fills apiVersion/kind, uid, resourceVersion, creationTimestamp,
    /// generation and `generateName`. 409 AlreadyExists when the name is taken.
    pub fn create(&mut self, res: Res, mut obj: Value) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.info().kind);
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if name_of(&obj).is_empty() {
            match obj["metadata"]["generateName"].as_str().map(str::to_string) {
                Some(prefix) => {
                    obj["metadata"]["name"] = json!(format!("{prefix}{}", self.token(5)))
                }
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            }
        }
        if !res.info().namespaced {
            obj["metadata"]
                .as_object_mut()
                .expect("object")
                .remove("namespace");
        }
        let (ns, name) = (ns_of(&obj), name_of(&obj));
        if self.get(res, &ns, &name).is_some() {
            return Err(ApiError::already_exists(res, &name));
        }
        let rv = self.bump();
        let uid = self.uid();
        let m = &mut obj["metadata"];
        m["uid"] = json!(uid);
        m["resourceVersion"] = json!(rv.to_string());
        m["creationTimestamp"] = json!(now_rfc3339());
        m["generation"] = json!(1);
        self.objects.insert((res, ns, name), obj.clone());
        self.record(res, "ADDED", obj.clone(), None);
        Ok(obj)
    }

    /// Replaces an existing object (keeping uid and creationTimestamp), bumping resourceVersion
    /// and, when `spec` changed, generation.
    pub fn replace(&mut self, res: Res, mut obj: Value) -> Value {
        let key = (res, ns_of(&obj), name_of(&obj));
        let old = self.objects.get(&key).cloned();
        let rv = self.bump();
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.info().kind);
        if let Some(old) = &old {
            for f in ["uid", "creationTimestamp"] {
                obj["metadata"][f] = old["metadata"][f].clone();
            }
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(if old.get("spec") != obj.get("spec") {
                generation + 1
            } else {
                generation
            });
        }
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key, obj.clone());
        self.record(res, "MODIFIED", obj.clone(), old);
        obj
    }

    /// Removes an object for good (a DELETED event carrying a new resourceVersion).
    pub fn remove(&mut self, res: Res, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .remove(&(res, ns.to_string(), name.to_string()))?;
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(res, "DELETED", obj.clone(), None);
        Some(obj)
    }
}

/// The shared store plus the runtime handle delayed controllers run on.
pub struct Store {
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
    pub handle: tokio::runtime::Handle,
    pub config: ControllerConfig,
    /// The default `fieldValidation` mode.
    pub validation: FieldValidation,
    /// Injected faults, consumed in order of arrival.
    pub faults: Mutex<Vec<Fault>>,
    /// Requests a `Hold` fault ever held (answered or not).
    pub held_total: std::sync::atomic::AtomicUsize,
    /// `true` once held requests may go on.
    pub released: tokio::sync::watch::Sender<bool>,
    /// Path substrings whose open watches must end now (`FakeApi::end_watches`).
    pub watch_ends: tokio::sync::broadcast::Sender<String>,
    /// The ServiceAccount RBAC requests are authorized with; `None`: the shipped manifests'
    /// (loaded on the first ServiceAccount request).
    pub rbac: Mutex<Option<Arc<super::rbac::Rbac>>>,
    /// The admission policies ServiceAccount writes go through; `None`: the shipped ones.
    pub admission: Mutex<Option<Arc<super::admission::Admission>>>,
}

impl Store {
    pub fn new(
        handle: tokio::runtime::Handle,
        config: ControllerConfig,
        validation: FieldValidation,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            changed: tokio::sync::watch::channel(0).0,
            handle,
            config,
            validation,
            faults: Mutex::new(Vec::new()),
            held_total: std::sync::atomic::AtomicUsize::new(0),
            released: tokio::sync::watch::channel(false).0,
            watch_ends: tokio::sync::broadcast::channel(16).0,
            rbac: Mutex::new(None),
            admission: Mutex::new(None),
        })
    }

    /// Read-only access (also used for the request log).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Runs one atomic operation, then refreshes PDB status (and audit), wakes watchers and
    /// schedules the operation's delayed follow-ups (graceful deletion, ReplicaSet replacement).
    pub fn mutate<R>(self: &Arc<Self>, f: impl FnOnce(&mut State) -> R) -> R {
        let (mut f, mut out) = (Some(f), None);
        self.apply(&mut |st: &mut State| {
            if let Some(f) = f.take() {
                out = Some(f(st));
            }
        });
        out.expect("mutation ran")
    }

    fn apply(self: &Arc<Self>, f: &mut dyn FnMut(&mut State)) {
        let (followups, rv) = {
            let mut st = self.lock();
            f(&mut st);
            controllers::release_finalized(&mut st);
            pdb::audit(&mut st);
            (std::mem::take(&mut st.followups), st.rv)
        };
        self.changed.send_replace(rv);
        for fu in followups {
            let store = Arc::clone(self);
            let delay = fu.delay(&self.config);
            self.handle.spawn(async move {
                tokio::time::sleep(delay).await;
                let mut fu = Some(fu);
                let config = store.config.clone();
                store.apply(&mut |st: &mut State| {
                    if let Some(fu) = fu.take() {
                        controllers::run(st, &config, fu);
                    }
                });
            });
        }
    }
}

// === impl Store: the disruption controller ===

impl Store {
    /// Runs the disruption controller once now (PDB `status` from the current pods) and wakes
    /// watchers. Returns the resourceVersion after its writes and its next forced recheck.
    pub fn sync_pdbs(self: &Arc<Self>) -> (u64, Option<SystemTime>) {
        let mut recheck = None;
        let timeout = self.config.disrupted_pod_timeout;
        self.apply(&mut |st: &mut State| recheck = pdb::sync_status(st, timeout));
        (self.lock().rv, recheck)
    }

    /// Starts the disruption controller as a background task: `pdb_lag` after a write it
    /// recomputes every PDB's status from what it then sees (several writes within the lag are
    /// seen at once, like an informer that is behind). With `pdb_lag: None` it never runs: tests
    /// set the status by hand, as kubernetes' eviction tests do with a fake clientset.
    pub fn spawn_disruption_controller(self: &Arc<Self>) {
        let Some(lag) = self.config.pdb_lag else {
            return;
        };
        let store = Arc::clone(self);
        // Read where we are now, not when the task first runs: on a busy machine a test's first
        // writes can land before that, and the controller would wait for a change already made.
        let mut changes = store.subscribe();
        let mut seen = store.lock().rv;
        self.handle.spawn(async move {
            let mut recheck: Option<SystemTime> = None;
            loop {
                let until_recheck = recheck
                    .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
                    .unwrap_or(Duration::from_secs(3600));
                let changed = changes.wait_for(|rv| *rv > seen);
                // A change, or a disruptedPods deadline to look at again; an error: the store
                // is gone.
                if let Ok(Err(_)) = tokio::time::timeout(until_recheck, changed).await {
                    return;
                }
                tokio::time::sleep(lag).await;
                (seen, recheck) = store.sync_pdbs();
            }
        });
    }
}

/// How long a watch stays idle before a BOOKMARK is sent (when bookmarks were asked for).
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(1);
