//! Authentication of gRPC callers: server TLS, client certificates (mTLS) and bearer tokens.
//!
//! Owns the `api.auth` config section (the TLS files themselves are loaded and re-read on change
//! by `server_tls`) and one tower layer that sees every call's method path before any service
//! does. The layer authenticates the caller into a
//! [`Principal`] (the control token, the read token, or a verified certificate name with its
//! roles), authorizes it against the RPC's rule (`authz`), rate-limits and audit-logs mutating
//! calls, and hands the principal to the handler in the request's extensions. Only health is
//! anonymous by default; reads are opened by `openReadOnly`, KEDA's scaler by `openKeda`. With
//! no credential configured, everything else is refused: the API is never open by default.
//!
//! Must never log, echo or keep in an error a token, neither the configured one nor a caller's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

pub use super::authz::{Principal, RateLimitConfig, Role, Rule};
use super::authz::{RateLimiter, rule_for};
use super::server_tls::{ReloadingServerTls, TlsFileError, TlsMetrics};

// === config ===

/// Read-only RPCs need the read (or a stronger) credential by default: they name every pod on
/// the node, its labels and its connection peers, which is more than anyone on the network
/// should learn (issue #19).
pub const DEFAULT_OPEN_READ_ONLY: bool = false;
/// KEDA's scaler needs a credential by default too; open it when KEDA calls the agent directly
/// without TLS client certificates.
pub const DEFAULT_OPEN_KEDA: bool = false;
/// A TLS handshake that has not finished by then is dropped, so idle half-open connections
/// cannot pile up; a real client on a node-local network finishes in milliseconds.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A token file larger than this is not a token (a mounted directory or a wrong key).
const MAX_TOKEN_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuthConfig {
    /// A file holding the control bearer token (role `control`; a mounted Secret key). Re-read
    /// when it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A file holding the read bearer token (role `read`). Re-read when it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_token_file: Option<PathBuf>,
    /// Server TLS, and client certificate verification when `clientCaFile` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Client certificate names (subject CN or DNS SAN) with role `control`. When this and
    /// `clientRoles` are both empty, every verified certificate has role `control`.
    pub allowed_client_names: Vec<String>,
    /// Client certificate names (subject CN or DNS SAN) and their roles (`read`, `cordon`,
    /// `drain`, `control`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub client_roles: BTreeMap<String, Vec<Role>>,
    /// GetNode, GetMetrics, WatchMetrics, GetDrain, KEDA's ExternalScaler and reflection need no
    /// credentials. Health never does.
    pub open_read_only: bool,
    /// KEDA's ExternalScaler needs no credentials.
    pub open_keda: bool,
    /// Mutating calls per principal.
    pub rate_limit: RateLimitConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token_file: None,
            read_token_file: None,
            tls: None,
            allowed_client_names: Vec::new(),
            client_roles: BTreeMap::new(),
            open_read_only: DEFAULT_OPEN_READ_ONLY,
            open_keda: DEFAULT_OPEN_KEDA,
            rate_limit: RateLimitConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsConfig {
    /// PEM server certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key of `certFile`.
    pub key_file: PathBuf,
    /// PEM CA bundle; client certificates are verified against it when set (optional for the
    /// client, so token-only clients still connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

impl AuthConfig {
    /// Semantic problems as (field, problem), fields under `api.auth`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut absolute = |field: &str, path: &Path| {
            if !path.is_absolute() {
                out.push((
                    format!("api.auth.{field}"),
                    format!("{:?} is not an absolute path", path.display().to_string()),
                ));
            }
        };
        if let Some(p) = &self.token_file {
            absolute("tokenFile", p);
        }
        if let Some(p) = &self.read_token_file {
            absolute("readTokenFile", p);
        }
        if let Some(tls) = &self.tls {
            absolute("tls.certFile", &tls.cert_file);
            absolute("tls.keyFile", &tls.key_file);
            if let Some(ca) = &tls.client_ca_file {
                absolute("tls.clientCaFile", ca);
            }
        }
        if !self.allowed_client_names.is_empty() && self.client_ca_file().is_none() {
            out.push((
                "api.auth.allowedClientNames".into(),
                "needs api.auth.tls.clientCaFile: without it no client certificate is verified"
                    .into(),
            ));
        }
        for (i, name) in self.allowed_client_names.iter().enumerate() {
            if name.trim().is_empty() {
                out.push((
                    format!("api.auth.allowedClientNames[{i}]"),
                    "must not be empty".into(),
                ));
            }
        }
        if !self.client_roles.is_empty() && self.client_ca_file().is_none() {
            out.push((
                "api.auth.clientRoles".into(),
                "needs api.auth.tls.clientCaFile: without it no client certificate is verified"
                    .into(),
            ));
        }
        for (name, roles) in &self.client_roles {
            if name.trim().is_empty() {
                out.push((
                    "api.auth.clientRoles".into(),
                    "a client name must not be empty".into(),
                ));
            }
            if roles.is_empty() {
                out.push((
                    format!("api.auth.clientRoles.{name}"),
                    "lists no role (read, cordon, drain, control)".into(),
                ));
            }
            if self.allowed_client_names.contains(name) {
                out.push((
                    format!("api.auth.clientRoles.{name}"),
                    "is also in allowedClientNames (role control); list it in one place".into(),
                ));
            }
        }
        if self.token_file.is_some() && self.token_file == self.read_token_file {
            out.push((
                "api.auth.readTokenFile".into(),
                "is the same file as tokenFile: the read token would carry control".into(),
            ));
        }
        out.extend(self.rate_limit.problems());
        out
    }

    fn client_ca_file(&self) -> Option<&Path> {
        self.tls.as_ref()?.client_ca_file.as_deref()
    }
}

/// What the fields of an [`AuthConfig`] are called where the operator sets them (the agent's
/// config keys, or the aggregator's flags), so errors, logs and refusals name what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFields {
    /// "agent" or "aggregator", in refusals ("not configured on this agent").
    pub server: &'static str,
    pub token_file: &'static str,
    pub read_token_file: &'static str,
    pub cert_file: &'static str,
    pub key_file: &'static str,
    pub client_ca_file: &'static str,
    /// Where certificate names get their roles.
    pub client_names: &'static str,
    /// What to set when nothing is configured.
    pub configure: &'static str,
}

/// The agent's `api.auth` keys.
pub const AGENT_FIELDS: AuthFields = AuthFields {
    server: "agent",
    token_file: "api.auth.tokenFile",
    read_token_file: "api.auth.readTokenFile",
    cert_file: "api.auth.tls.certFile",
    key_file: "api.auth.tls.keyFile",
    client_ca_file: "api.auth.tls.clientCaFile",
    client_names: "api.auth.allowedClientNames or clientRoles",
    configure: "set api.auth.tokenFile, readTokenFile or tls.clientCaFile",
};

// === errors ===

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A configured file (certificate, key, CA, token) could not be read.
    #[error("{field}: cannot read {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A token file is empty or too large to hold a token.
    #[error("{field}: {} {problem}", path.display())]
    BadToken {
        field: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// The certificate, key or CA did not make a usable TLS server config (the error names
    /// the field and file).
    #[error(transparent)]
    Tls(#[from] TlsFileError),
}

impl AuthError {
    /// Low-cardinality label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::BadToken { .. } => "bad_token",
            Self::Tls(_) => "tls",
        }
    }
}

// === loading ===

/// What `api::serve` needs: the TLS server config (when configured) and the auth layer.
pub struct ServerAuth {
    /// Re-read when its files change (`server_tls`).
    pub tls: Option<Arc<ReloadingServerTls>>,
    pub layer: AuthLayer,
}

impl ServerAuth {
    /// Reads every configured file now, so a wrong path or key fails the agent's start. The TLS
    /// metrics go on `registry`.
    pub fn load(config: &AuthConfig, registry: &mut Registry) -> Result<Self, AuthError> {
        Self::load_as(config, registry, AGENT_FIELDS)
    }

    /// [`ServerAuth::load`] for a server whose settings go by the names in `fields` (the
    /// aggregator's flags).
    pub fn load_as(
        config: &AuthConfig,
        registry: &mut Registry,
        fields: AuthFields,
    ) -> Result<Self, AuthError> {
        let tls = match &config.tls {
            None => None,
            Some(t) => Some(Arc::new(ReloadingServerTls::load(
                t,
                TlsMetrics::register(registry),
                fields,
            )?)),
        };
        let refused = TokenMetrics::register(registry);
        let token = load_token(fields.token_file, config.token_file.as_deref(), &refused)?;
        let read_token = load_token(
            fields.read_token_file,
            config.read_token_file.as_deref(),
            &refused,
        )?;
        if (token.is_some() || read_token.is_some()) && tls.is_none() {
            tracing::warn!(
                token_file = fields.token_file,
                read_token_file = fields.read_token_file,
                "a bearer token file is set without server TLS: bearer tokens travel in clear text"
            );
        }
        let auth = Authenticator {
            token,
            read_token,
            client_certs: config.client_ca_file().is_some(),
            allowed_client_names: config.allowed_client_names.clone(),
            client_roles: config.client_roles.clone(),
            open_read_only: config.open_read_only,
            open_keda: config.open_keda,
            limiter: RateLimiter::new(&config.rate_limit),
            fields,
        };
        Ok(Self {
            tls,
            layer: AuthLayer(Arc::new(auth), Admissions::default()),
        })
    }
}

/// Reads a configured token file once, so a missing or empty one fails the start.
fn load_token(
    field: &'static str,
    path: Option<&Path>,
    metrics: &TokenMetrics,
) -> Result<Option<Arc<TokenFile>>, AuthError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let t = TokenFile::new(path.to_path_buf(), field, metrics.clone());
    t.current().map_err(|e| match e {
        TokenError::Read(source) => AuthError::Read {
            field,
            path: path.to_path_buf(),
            source,
        },
        TokenError::Bad(problem) => AuthError::BadToken {
            field,
            path: path.to_path_buf(),
            problem: problem.into(),
        },
    })?;
    Ok(Some(Arc::new(t)))
}

/// Token file versions refused after the start (decision #19-i), by the setting that names
/// the file.
#[derive(Clone, Default)]
struct TokenMetrics {
    refused: prometheus_client::metrics::family::Family<
        Vec<(&'static str, &'static str)>,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl TokenMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "api_token_files_refused",
            "Changed bearer token files that could not be read as a token (missing, empty, too \
             large, not a regular file), by setting; the last good token stays in use",
            m.refused.clone(),
        );
        m
    }
}

// === impl TokenFile ===

enum TokenError {
    Read(std::io::Error),
    Bad(&'static str),
}

impl TokenError {
    fn problem(&self) -> String {
        match self {
            Self::Read(e) => e.to_string(),
            Self::Bad(p) => p.to_string(),
        }
    }
}

/// The bearer token file, re-read when its identity, metadata or content changes, so a rotated
/// Secret (kubelet swaps a symlink to a new file) takes effect without a restart. A changed
/// file that cannot be read as a token (emptied, removed, too large, a FIFO or a directory)
/// is refused and the last good token kept, as for the TLS files (decision #19-i): revoking a
/// token means writing a new one.
struct TokenFile {
    path: PathBuf,
    /// The setting that names the file, in warnings and the refusal metric.
    field: &'static str,
    state: Mutex<TokenState>,
    metrics: TokenMetrics,
}

#[derive(Default)]
struct TokenState {
    /// The last good token and the stamp of the file it was read from.
    good: Option<(FileStamp, Arc<[u8]>)>,
    /// Bumped each time the good token changes: a stream opened under generation `n` ends once
    /// it is no longer `n` (decision #19-i).
    generation: u64,
    /// The refusal last counted (file stamp, problem), so one bad file counts and warns once.
    refused: Option<(Option<FileStamp>, String)>,
}

/// A bearer token an accepted call presented, as of its generation: [`TokenLease::valid`]
/// while the file still holds that token.
#[derive(Clone)]
pub(crate) struct TokenLease {
    file: Arc<TokenFile>,
    generation: u64,
}

impl std::fmt::Debug for TokenLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLease")
            .field("field", &self.file.field)
            .field("generation", &self.generation)
            .finish()
    }
}

impl TokenLease {
    /// Whether the token is still the file's (one `stat` and a small read when it changed).
    pub(crate) fn valid(&self) -> bool {
        self.file
            .current()
            .is_ok_and(|(_, generation)| generation == self.generation)
    }
}

/// Files at most this large are hashed for their stamp; a larger one is no credential of ours
/// (its reader refuses it), so its metadata is enough.
const STAMP_MAX_BYTES: u64 = 1 << 20;

/// What tells a changed file from the same one. A Secret update swaps in a new inode, but an
/// in-place rewrite of the same length within one timestamp tick (ext4 and tmpfs stamp times
/// from a coarse clock), or with its mtime put back (`touch -d`), keeps every metadata field
/// except perhaps ctime: so the stamp also carries a hash of the content (decision #19-e,
/// amended by #19-h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    /// A keyed 64-bit hash of the bytes (the key is random per process, so nobody can aim a
    /// rewrite at a colliding hash); `None` for a file over [`STAMP_MAX_BYTES`].
    content: Option<u64>,
}

impl FileStamp {
    /// The stamp of the file `path` names (symlinks followed, as kubelet's are). Reads the file
    /// (capped, never blocking on a FIFO): one small read per check, nothing beside a TLS
    /// handshake or a token comparison.
    pub(crate) fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path)?;
        let content = if meta.len() <= STAMP_MAX_BYTES {
            let bytes = crate::state_file::read_capped(path, STAMP_MAX_BYTES)?;
            Some(content_hash(&bytes))
        } else {
            None
        };
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            content,
        })
    }
}

/// foldhash's quality hasher with a per-process random seed: fast on a few KiB, and a
/// collision cannot be chosen without the seed (a cryptographic hash buys nothing here: whoever
/// can write the file can write any content).
fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::BuildHasher as _;
    static SEED: std::sync::OnceLock<foldhash::quality::RandomState> = std::sync::OnceLock::new();
    SEED.get_or_init(Default::default).hash_one(bytes)
}

impl TokenFile {
    fn new(path: PathBuf, field: &'static str, metrics: TokenMetrics) -> Self {
        Self {
            path,
            field,
            state: Mutex::new(TokenState::default()),
            metrics,
        }
    }

    /// The current token and its generation. One `stat` (and a small hash) per call, a read
    /// only when the file changed; a changed file that is no token keeps the last good one
    /// (counted and warned about once per file version). An error only before any good token.
    fn current(&self) -> Result<(Arc<[u8]>, u64), TokenError> {
        let stamp = FileStamp::of(&self.path).map_err(TokenError::Read);
        let seen = stamp.as_ref().ok().copied();
        let mut state = self.state.lock().expect("not poisoned");
        if let (Ok(s), Some((good, token))) = (&stamp, &state.good)
            && s == good
        {
            return Ok((token.clone(), state.generation));
        }
        match stamp.and_then(|s| self.read(s).map(|t| (s, t))) {
            Ok((stamp, token)) => {
                if state.good.as_ref().is_none_or(|(_, old)| *old != token) {
                    state.generation += 1;
                }
                state.good = Some((stamp, token.clone()));
                state.refused = None;
                tracing::debug!(path = %self.path.display(), "bearer token (re)loaded");
                Ok((token, state.generation))
            }
            Err(e) => {
                let Some((_, token)) = state.good.clone() else {
                    return Err(e);
                };
                let key = (seen, e.problem());
                if state.refused.as_ref() != Some(&key) {
                    self.metrics
                        .refused
                        .get_or_create(&vec![("field", self.field)])
                        .inc();
                    tracing::warn!(
                        field = self.field,
                        path = %self.path.display(),
                        problem = %key.1,
                        "the token file cannot be read as a token; refused, the last good token stays in use (revoke a token by writing a new one)"
                    );
                    state.refused = Some(key);
                }
                Ok((token, state.generation))
            }
        }
    }

    /// The token in the file `stamp` describes.
    fn read(&self, stamp: FileStamp) -> Result<Arc<[u8]>, TokenError> {
        if stamp.len > MAX_TOKEN_BYTES {
            return Err(TokenError::Bad("is larger than a token (4 KiB)"));
        }
        // Never a plain read: a FIFO swapped in would block this thread with the lock held.
        let raw = crate::state_file::read_capped(&self.path, MAX_TOKEN_BYTES)
            .map_err(TokenError::Read)?;
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(TokenError::Bad("is empty"));
        }
        Ok(token.into())
    }
}

// === impl Authenticator ===

/// A refused call: the gRPC status, and a low-cardinality label for the log.
#[derive(Debug)]
struct Refusal {
    status: Status,
    reason: &'static str,
}

impl Refusal {
    fn unauthenticated(reason: &'static str, message: String) -> Self {
        Self {
            status: Status::unauthenticated(message),
            reason,
        }
    }
}

struct Authenticator {
    /// The control token (role `control`).
    token: Option<Arc<TokenFile>>,
    /// The read token (role `read`).
    read_token: Option<Arc<TokenFile>>,
    client_certs: bool,
    allowed_client_names: Vec<String>,
    client_roles: BTreeMap<String, Vec<Role>>,
    open_read_only: bool,
    open_keda: bool,
    limiter: RateLimiter,
    fields: AuthFields,
}

impl Authenticator {
    /// Authenticates and authorizes one call: its principal, the rule it was judged by and,
    /// for a bearer token, the lease its response streams end with.
    fn check<B>(
        &self,
        req: &http::Request<B>,
    ) -> Result<(Principal, Rule, Option<TokenLease>), Refusal> {
        let path = req.uri().path();
        let rule = rule_for(path);
        if self.is_open(rule) {
            return Ok((Principal::anonymous(), rule, None));
        }
        let (principal, lease) = self.authenticate(req, path)?;
        if !principal.may(rule) {
            return Err(Refusal {
                status: Status::permission_denied(format!(
                    "{} (roles: {}) may not call {path}: it needs role {}",
                    principal.name,
                    principal.role_names().join(", "),
                    rule.roles()
                )),
                reason: "role_lacks_rpc",
            });
        }
        if rule.is_mutating()
            && let Err(wait) = self.limiter.take(&principal.name)
        {
            return Err(Refusal {
                status: Status::resource_exhausted(format!(
                    "{} made too many mutating calls (api.auth.rateLimit); retry in {}s",
                    principal.name,
                    wait.as_secs().max(1)
                )),
                reason: "rate_limited",
            });
        }
        Ok((principal, rule, lease))
    }

    /// Calls anyone may make under this config.
    fn is_open(&self, rule: Rule) -> bool {
        match rule {
            Rule::Anonymous => true,
            Rule::Read | Rule::Reflection => self.open_read_only,
            Rule::Keda => self.open_read_only || self.open_keda,
            Rule::Cordon | Rule::Drain | Rule::Control => false,
        }
    }

    fn authenticate<B>(
        &self,
        req: &http::Request<B>,
        path: &str,
    ) -> Result<(Principal, Option<TokenLease>), Refusal> {
        if self.token.is_none() && self.read_token.is_none() && !self.client_certs {
            return Err(Refusal::unauthenticated(
                "not_configured",
                format!(
                    "authentication is not configured on this {}, so {path} is refused: {}",
                    self.fields.server, self.fields.configure
                ),
            ));
        }
        // A bad token is refused even beside a good certificate: wrong credentials are an error.
        if let Some(header) = req.headers().get(http::header::AUTHORIZATION) {
            return self.check_token(header);
        }
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        match certs.as_deref().and_then(|c| c.first()) {
            Some(leaf) if self.client_certs => Ok((self.check_certificate(leaf)?, None)),
            _ => Err(Refusal::unauthenticated(
                "no_credentials",
                format!("{path} needs credentials: {}", self.accepted_credentials()),
            )),
        }
    }

    fn accepted_credentials(&self) -> &'static str {
        match (
            self.token.is_some() || self.read_token.is_some(),
            self.client_certs,
        ) {
            (true, true) => "a client certificate or an `authorization: Bearer <token>` header",
            (true, false) => "an `authorization: Bearer <token>` header",
            _ => "a client certificate",
        }
    }

    fn check_token(
        &self,
        header: &http::HeaderValue,
    ) -> Result<(Principal, Option<TokenLease>), Refusal> {
        if self.token.is_none() && self.read_token.is_none() {
            return Err(Refusal::unauthenticated(
                "token_not_configured",
                format!(
                    "bearer tokens are not accepted by this {} (no token file is set); use a client certificate",
                    self.fields.server
                ),
            ));
        }
        let presented = header
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| header.as_bytes().strip_prefix(b"bearer "))
            .map(<[u8]>::trim_ascii)
            .ok_or_else(|| {
                Refusal::unauthenticated(
                    "malformed_header",
                    "the authorization header is not `Bearer <token>`".into(),
                )
            })?;
        // Both tokens are always compared, so timing does not tell which one exists.
        let control = matches_token(self.token.as_ref(), presented)?;
        let read = matches_token(self.read_token.as_ref(), presented)?;
        if let Some(lease) = control {
            Ok((Principal::control_token(), Some(lease)))
        } else if let Some(lease) = read {
            Ok((Principal::read_token(), Some(lease)))
        } else {
            Err(Refusal::unauthenticated(
                "bad_token",
                "the bearer token is not valid".into(),
            ))
        }
    }

    fn check_certificate(
        &self,
        leaf: &tonic::transport::CertificateDer<'_>,
    ) -> Result<Principal, Refusal> {
        // rustls verified the chain against clientCaFile during the handshake; only the name
        // is left to check.
        let names = certificate_names(leaf).map_err(|e| Refusal {
            status: Status::permission_denied(format!("cannot read the client certificate: {e}")),
            reason: "bad_certificate",
        })?;
        if self.allowed_client_names.is_empty() && self.client_roles.is_empty() {
            let first = names.first().cloned().unwrap_or_default();
            return Ok(Principal::certificate(&first, vec![Role::Control]));
        }
        // The first of the certificate's names that is listed decides; a name in
        // allowedClientNames has role control.
        for n in &names {
            if self.allowed_client_names.iter().any(|a| a == n) {
                return Ok(Principal::certificate(n, vec![Role::Control]));
            }
            if let Some(roles) = self.client_roles.get(n) {
                return Ok(Principal::certificate(n, roles.clone()));
            }
        }
        Err(Refusal {
            status: Status::permission_denied(format!(
                "client certificate {names:?} is not in {}",
                self.fields.client_names
            )),
            reason: "name_not_allowed",
        })
    }
}

/// Whether `presented` is the token in `file` (its lease when it is), in constant time in the
/// token's content, so response timing does not reveal how many leading bytes matched; only a
/// length mismatch returns early, and length is not secret.
fn matches_token(
    file: Option<&Arc<TokenFile>>,
    presented: &[u8],
) -> Result<Option<TokenLease>, Refusal> {
    let Some(file) = file else {
        return Ok(None);
    };
    let (expected, generation) = file.current().map_err(|e| {
        tracing::warn!(field = file.field, path = %file.path.display(), problem = %e.problem(), "cannot read a token file; refusing bearer tokens");
        Refusal::unauthenticated(
            "token_unavailable",
            format!(
                "this server cannot read its token file ({}); bearer tokens are refused until it can",
                file.field
            ),
        )
    })?;
    Ok(bool::from(presented.ct_eq(&expected)).then(|| TokenLease {
        file: file.clone(),
        generation,
    }))
}

/// The subject CNs, then the DNS SANs, of a DER certificate.
fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push((*d).to_string());
            }
        }
    }
    Ok(names)
}

// === impl AuthLayer ===

/// Tower layer for `tonic::transport::Server::layer`: checks each call before routing.
#[derive(Clone)]
pub struct AuthLayer(Arc<Authenticator>, Admissions);

impl AuthLayer {
    /// Where this layer records the connections that made an admitted call.
    pub(crate) fn admissions(&self) -> Admissions {
        self.1.clone()
    }
}

// === impl Admissions ===

/// The connections waiting for their first admitted call (a TLS connection without a client
/// certificate, issue #19), by peer address: the auth layer marks them, the connection reads
/// the mark.
#[derive(Clone, Default)]
pub(crate) struct Admissions(
    Arc<Mutex<std::collections::HashMap<std::net::SocketAddr, Arc<std::sync::atomic::AtomicBool>>>>,
);

/// One connection's mark in [`Admissions`]; removed when it drops.
pub(crate) struct Admission {
    admissions: Admissions,
    peer: std::net::SocketAddr,
    admitted: Arc<std::sync::atomic::AtomicBool>,
}

impl Admissions {
    /// Starts watching the connection from `peer`.
    pub(crate) fn watch(&self, peer: std::net::SocketAddr) -> Admission {
        let admitted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.0
            .lock()
            .expect("not poisoned")
            .insert(peer, admitted.clone());
        Admission {
            admissions: self.clone(),
            peer,
            admitted,
        }
    }

    /// Marks the connection from `peer` (if watched) as having made an admitted call.
    fn admit(&self, peer: std::net::SocketAddr) {
        if let Some(a) = self.0.lock().expect("not poisoned").remove(&peer) {
            a.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Admission {
    pub(crate) fn is_admitted(&self) -> bool {
        self.admitted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = self.admissions.0.lock().expect("not poisoned");
        if map
            .get(&self.peer)
            .is_some_and(|a| Arc::ptr_eq(a, &self.admitted))
        {
            map.remove(&self.peer);
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.0.clone(),
            admissions: self.1.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
    admissions: Admissions,
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for AuthService<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<Self::Response, Self::Error>>,
        futures::future::Either<
            S::Future,
            futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use futures::future::Either;
        let peer = peer_addr(&req);
        match self.auth.check(&req) {
            Ok((principal, rule, lease)) => {
                // A call beyond health keeps an uncertified connection open (issue #19).
                if rule != Rule::Anonymous
                    && let Some(peer) = peer
                {
                    self.admissions.admit(peer);
                }
                if rule.is_mutating() {
                    // The audit line: one per accepted mutating call, naming the verified
                    // principal (never the caller-asserted `requester`).
                    tracing::info!(
                        target: "nodekeeper::audit",
                        method = req.uri().path(),
                        principal = %principal.name,
                        peer = ?peer,
                        "gRPC mutating call authorized"
                    );
                }
                req.extensions_mut().insert(principal);
                let response = self.inner.call(req);
                match lease {
                    None => Either::Right(Either::Left(response)),
                    // A bearer token's response ends UNAUTHENTICATED once the token is rotated
                    // away, however long its stream lives (decision #19-i).
                    Some(lease) => Either::Right(Either::Right(Box::pin(async move {
                        let response = response.await?;
                        Ok(response
                            .map(|body| tonic::body::Body::new(RevocableBody::new(body, lease))))
                    }))),
                }
            }
            Err(refusal) => {
                tracing::warn!(
                    target: "nodekeeper::audit",
                    method = req.uri().path(),
                    peer = ?peer,
                    reason = refusal.reason,
                    code = ?refusal.status.code(),
                    "gRPC call refused"
                );
                Either::Left(futures::future::ready(Ok(refusal.status.into_http())))
            }
        }
    }
}

/// A response body that ends with UNAUTHENTICATED instead of its next message once the token
/// its call was accepted with is no longer the file's (checked at each message).
struct RevocableBody {
    inner: tonic::body::Body,
    lease: TokenLease,
    ended: bool,
}

impl RevocableBody {
    fn new(inner: tonic::body::Body, lease: TokenLease) -> Self {
        Self {
            inner,
            lease,
            ended: false,
        }
    }
}

impl http_body::Body for RevocableBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        match frame {
            Some(Ok(f)) if f.is_data() && !this.lease.valid() => {
                this.ended = true;
                let status = Status::unauthenticated(
                    "the bearer token this stream was opened with has been rotated away",
                );
                tracing::info!(
                    target: "nodekeeper::audit",
                    "a response stream opened with a rotated-away bearer token ended"
                );
                let mut trailers = http::HeaderMap::new();
                Poll::Ready(Some(
                    status
                        .add_header(&mut trailers)
                        .map(|()| http_body::Frame::trailers(trailers)),
                ))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

pub(crate) fn peer_addr<B>(req: &http::Request<B>) -> Option<std::net::SocketAddr> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .map(|i| i.get_ref())
        .or_else(|| req.extensions().get::<TcpConnectInfo>())
        .and_then(|i| i.remote_addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, auth: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri(format!("http://x{path}"));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).unwrap()
    }

    fn authenticator() -> Authenticator {
        Authenticator {
            token: None,
            read_token: None,
            client_certs: false,
            allowed_client_names: vec![],
            client_roles: BTreeMap::new(),
            open_read_only: false,
            open_keda: false,
            limiter: RateLimiter::new(&RateLimitConfig::default()),
            fields: AGENT_FIELDS,
        }
    }

    fn token_file(dir: &Path, name: &str, token: &str) -> Arc<TokenFile> {
        let path = dir.join(name);
        std::fs::write(&path, format!("{token}\n")).unwrap();
        let file = TokenFile::new(path, "api.auth.tokenFile", TokenMetrics::default());
        file.current().ok().expect("a good token at the start");
        Arc::new(file)
    }

    fn with_token(dir: &Path, token: &str) -> Authenticator {
        Authenticator {
            token: Some(token_file(dir, "token", token)),
            ..authenticator()
        }
    }

    fn name(r: Result<(Principal, Rule, Option<TokenLease>), Refusal>) -> String {
        r.unwrap().0.name
    }

    #[test]
    fn nothing_configured_refuses_everything_but_health() {
        let a = authenticator();
        for m in ["Cordon", "GetNode", "GetMetrics"] {
            let r = a
                .check(&request(&format!("/nodekeeper.v1.NodeAgent/{m}"), None))
                .unwrap_err();
            assert_eq!(r.status.code(), tonic::Code::Unauthenticated, "{m}");
            assert!(r.status.message().contains("not configured"), "{r:?}");
        }
        let r = a
            .check(&request("/externalscaler.ExternalScaler/GetMetrics", None))
            .unwrap_err();
        assert_eq!(r.status.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            name(a.check(&request("/grpc.health.v1.Health/Check", None))),
            "anonymous"
        );
    }

    #[test]
    fn open_read_only_and_open_keda_open_only_their_calls() {
        let mut a = authenticator();
        a.open_keda = true;
        assert!(
            a.check(&request("/externalscaler.ExternalScaler/IsActive", None))
                .is_ok()
        );
        assert!(
            a.check(&request("/nodekeeper.v1.NodeAgent/GetMetrics", None))
                .is_err()
        );
        a.open_read_only = true;
        for p in [
            "/nodekeeper.v1.NodeAgent/GetMetrics",
            "/nodekeeper.v1.NodeAgent/GetDrain",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(name(a.check(&request(p, None))), "anonymous", "{p}");
        }
        assert!(
            a.check(&request("/nodekeeper.v1.NodeAgent/Drain", None))
                .is_err()
        );
    }

    #[test]
    fn read_token_reads_and_cannot_change_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authenticator {
            read_token: Some(token_file(dir.path(), "read", "reader-1")),
            ..with_token(dir.path(), "controller-1")
        };
        let get = "/nodekeeper.v1.NodeAgent/GetNode";
        assert_eq!(
            name(a.check(&request(get, Some("Bearer reader-1")))),
            "token:read"
        );
        for m in ["Cordon", "Uncordon", "Drain", "CancelDrain", "Reboot"] {
            let r = a
                .check(&request(
                    &format!("/nodekeeper.v1.NodeAgent/{m}"),
                    Some("Bearer reader-1"),
                ))
                .unwrap_err();
            assert_eq!(r.status.code(), tonic::Code::PermissionDenied, "{m}");
            assert!(r.status.message().contains("token:read"), "{r:?}");
        }
        assert_eq!(
            name(a.check(&request(
                "/nodekeeper.v1.NodeAgent/Drain",
                Some("Bearer controller-1")
            ))),
            "token:control"
        );
    }

    #[test]
    fn mutating_calls_are_rate_limited_per_principal() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authenticator {
            limiter: RateLimiter::new(&RateLimitConfig {
                burst: 2,
                per_minute: 1,
            }),
            ..with_token(dir.path(), "t")
        };
        let cordon = "/nodekeeper.v1.NodeAgent/Cordon";
        let get = "/nodekeeper.v1.NodeAgent/GetNode";
        a.check(&request(cordon, Some("Bearer t"))).unwrap();
        a.check(&request(cordon, Some("Bearer t"))).unwrap();
        let r = a.check(&request(cordon, Some("Bearer t"))).unwrap_err();
        assert_eq!(r.status.code(), tonic::Code::ResourceExhausted);
        assert!(r.status.message().contains("token:control"), "{r:?}");
        // Reads are not counted.
        a.check(&request(get, Some("Bearer t"))).unwrap();
    }

    #[test]
    fn tokens_are_checked_and_rotation_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_token(dir.path(), "s3cret-one");
        let cordon = "/nodekeeper.v1.NodeAgent/Cordon";
        assert_eq!(
            name(a.check(&request(cordon, Some("Bearer s3cret-one")))),
            "token:control"
        );
        for bad in [
            "Bearer s3cret-two",
            "Bearer s3cret-on",
            "s3cret-one",
            "Basic x",
        ] {
            let r = a.check(&request(cordon, Some(bad))).unwrap_err();
            assert_eq!(r.status.code(), tonic::Code::Unauthenticated, "{bad}");
            assert!(!r.status.message().contains("s3cret"), "{r:?}");
        }
        assert_eq!(
            a.check(&request(cordon, None)).unwrap_err().status.code(),
            tonic::Code::Unauthenticated
        );
        // Rotation: a new file swapped in (as kubelet does) is picked up on the next call.
        let new = dir.path().join("token.new");
        std::fs::write(&new, "s3cret-two").unwrap();
        std::fs::rename(&new, dir.path().join("token")).unwrap();
        assert!(
            a.check(&request(cordon, Some("Bearer s3cret-one")))
                .is_err()
        );
        assert!(a.check(&request(cordon, Some("Bearer s3cret-two"))).is_ok());
    }

    /// Decision #19-i: a changed file that is no token keeps the last good token, counted once
    /// per file version; a new token revokes the old one and every lease taken under it.
    #[test]
    fn a_bad_token_file_keeps_the_last_good_token_and_a_new_one_revokes_leases() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_token(dir.path(), "s3cret-one");
        let cordon = "/nodekeeper.v1.NodeAgent/Cordon";
        let (_, _, lease) = a
            .check(&request(cordon, Some("Bearer s3cret-one")))
            .unwrap();
        let lease = lease.expect("a token call has a lease");
        assert!(lease.valid());
        let path = dir.path().join("token");
        let refused = || {
            let file = a.token.as_ref().unwrap();
            file.metrics
                .refused
                .get_or_create(&vec![("field", "api.auth.tokenFile")])
                .get()
        };
        for bad in [&b""[..], b" \n", &[b'a'; 5000]] {
            std::fs::write(dir.path().join("new"), bad).unwrap();
            std::fs::rename(dir.path().join("new"), &path).unwrap();
            for _ in 0..2 {
                assert!(a.check(&request(cordon, Some("Bearer s3cret-one"))).is_ok());
            }
            assert!(lease.valid(), "a refused file keeps the lease");
        }
        std::fs::remove_file(&path).unwrap();
        assert!(a.check(&request(cordon, Some("Bearer s3cret-one"))).is_ok());
        assert_eq!(refused(), 4, "each bad version counted once");
        std::fs::write(&path, "s3cret-two").unwrap();
        assert!(
            a.check(&request(cordon, Some("Bearer s3cret-one")))
                .is_err()
        );
        assert!(!lease.valid(), "the rotated-away token's lease ended");
        assert!(a.check(&request(cordon, Some("Bearer s3cret-two"))).is_ok());
    }

    /// Decision #19-e's edge: an in-place rewrite with the same length and the old mtime put
    /// back (as `touch -d` or a restoring copy does) keeps inode, size and mtime.
    #[test]
    fn a_same_length_rewrite_with_the_old_mtime_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_token(dir.path(), "token-AAAA");
        let cordon = "/nodekeeper.v1.NodeAgent/Cordon";
        assert!(a.check(&request(cordon, Some("Bearer token-AAAA"))).is_ok());
        let path = dir.path().join("token");
        let before = FileStamp::of(&path).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        // Same inode (no rename), same length, mtime restored with utimensat.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(false)
            .open(&path)
            .and_then(|mut f| {
                use std::io::Write as _;
                f.write_all(b"token-BBBB")?;
                f.set_modified(mtime)
            })
            .unwrap();
        let after = FileStamp::of(&path).unwrap();
        assert_eq!(
            (after.ino, after.len, after.mtime_ns),
            (before.ino, before.len, before.mtime_ns),
            "the rewrite must keep what the old stamp compared"
        );
        // ctime changed too here, but a coarse clock can give both writes the same ctime: the
        // content alone must tell them apart.
        let same_tick = FileStamp {
            ctime_ns: before.ctime_ns,
            ..after
        };
        assert_ne!(
            same_tick, before,
            "the content hash does not tell the files apart"
        );
        assert!(
            a.check(&request(cordon, Some("Bearer token-AAAA")))
                .is_err(),
            "the replaced token is still accepted"
        );
        assert!(a.check(&request(cordon, Some("Bearer token-BBBB"))).is_ok());
    }

    #[test]
    fn closed_reads_need_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = with_token(dir.path(), "t");
        a.open_read_only = false;
        let get = "/nodekeeper.v1.NodeAgent/GetNode";
        assert_eq!(
            a.check(&request(get, None)).unwrap_err().status.code(),
            tonic::Code::Unauthenticated
        );
        assert!(a.check(&request(get, Some("Bearer t"))).is_ok());
    }

    #[test]
    fn parses_from_the_config_file_and_names_bad_fields() {
        use crate::config::Config;
        let c = Config::from_yaml(
            "api:\n  auth:\n    tokenFile: /t\n    tls:\n      certFile: /c\n      keyFile: /k\n      clientCaFile: /ca\n    allowedClientNames: [orchestrator]\n    clientRoles:\n      dashboard: [read]\n      rotator: [drain, cordon]\n    readTokenFile: /r\n    openReadOnly: true\n    openKeda: true\n    rateLimit: {burst: 5, perMinute: 10}\n",
        )
        .unwrap();
        let a = &c.api.auth;
        assert_eq!(a.token_file.as_deref(), Some(Path::new("/t")));
        assert_eq!(a.client_ca_file(), Some(Path::new("/ca")));
        assert_eq!(a.allowed_client_names, ["orchestrator"]);
        assert_eq!(a.client_roles["rotator"], [Role::Drain, Role::Cordon]);
        assert_eq!(a.read_token_file.as_deref(), Some(Path::new("/r")));
        assert!(a.open_read_only && a.open_keda);
        assert_eq!(a.rate_limit.burst, 5);
        c.validate().unwrap();
        assert_eq!(Config::from_yaml(&c.to_yaml()).unwrap(), c);
        // Reads and KEDA are closed unless opened.
        assert!(!Config::default().api.auth.open_read_only);
        assert!(!Config::default().api.auth.open_keda);

        let e = Config::from_yaml("api:\n  auth:\n    clientRoles:\n      dashboard: [admin]\n")
            .unwrap_err();
        assert!(e.to_string().contains("api.auth.clientRoles"), "{e}");

        let e = Config::from_yaml("api:\n  auth:\n    tokenfile: /t\n").unwrap_err();
        assert!(e.to_string().starts_with("api.auth"), "{e}");
        let e = Config::from_yaml("api:\n  auth:\n    tls:\n      certFile: /c\n").unwrap_err();
        assert!(e.to_string().starts_with("api.auth.tls"), "{e}");
        assert!(e.to_string().contains("keyFile"), "{e}");
    }

    #[test]
    fn config_problems_name_fields() {
        let c = AuthConfig {
            token_file: Some("token".into()),
            read_token_file: Some("token".into()),
            allowed_client_names: vec!["orchestrator".into(), " ".into()],
            client_roles: [
                ("orchestrator".to_string(), vec![Role::Read]),
                ("dashboard".to_string(), vec![]),
            ]
            .into(),
            rate_limit: RateLimitConfig {
                burst: 0,
                per_minute: 1,
            },
            ..Default::default()
        };
        let fields: Vec<_> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "api.auth.tokenFile",
                "api.auth.readTokenFile",
                "api.auth.allowedClientNames",
                "api.auth.allowedClientNames[1]",
                "api.auth.clientRoles",
                "api.auth.clientRoles.dashboard",
                "api.auth.clientRoles.orchestrator",
                "api.auth.readTokenFile",
                "api.auth.rateLimit.burst",
            ]
        );
        assert!(AuthConfig::default().problems().is_empty());
    }
}
