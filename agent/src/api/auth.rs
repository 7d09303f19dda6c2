//! Authentication of gRPC callers: server TLS, client certificates (mTLS) and bearer tokens.
//!
//! Owns the `api.auth` config section, the server's TLS setup and one tower layer that sees every
//! call's method path before any service does. Mutating RPCs (Cordon, Uncordon, Drain,
//! CancelDrain) and every method not known to be read-only need a verified client certificate or
//! the bearer token from `tokenFile`; read-only ones are open when `openReadOnly` is true. With
//! neither credential configured, mutating RPCs are refused: the API is never open by default.
//!
//! Must never log, echo or keep in an error a token, neither the configured one nor a caller's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

// === config ===

/// Read-only RPCs answer without credentials by default: they expose node state an orchestrator
/// or autoscaler polls often, and nothing in them changes the node.
pub const DEFAULT_OPEN_READ_ONLY: bool = true;
/// A TLS handshake that has not finished by then is dropped, so idle half-open connections
/// cannot pile up; a real client on a node-local network finishes in milliseconds.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A token file larger than this is not a token (a mounted directory or a wrong key).
const MAX_TOKEN_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuthConfig {
    /// A file holding one bearer token (a mounted Secret key). Re-read when it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Server TLS, and client certificate verification when `clientCaFile` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// When non-empty, a client certificate's subject CN or one of its DNS SANs must be listed.
    pub allowed_client_names: Vec<String>,
    /// GetNode, GetMetrics, WatchMetrics, GetDrain, KEDA's ExternalScaler, health and reflection
    /// need no credentials.
    pub open_read_only: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token_file: None,
            tls: None,
            allowed_client_names: Vec::new(),
            open_read_only: DEFAULT_OPEN_READ_ONLY,
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
        out
    }

    fn client_ca_file(&self) -> Option<&Path> {
        self.tls.as_ref()?.client_ca_file.as_deref()
    }
}

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
    /// The token file is empty or too large to hold a token.
    #[error("api.auth.tokenFile: {} {problem}", path.display())]
    BadToken { path: PathBuf, problem: String },
    /// The certificate, key or CA did not make a usable TLS server config.
    #[error("api.auth.tls: {0}")]
    Tls(#[from] tonic::transport::Error),
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
    pub tls: Option<ServerTlsConfig>,
    pub layer: AuthLayer,
}

impl ServerAuth {
    /// Reads every configured file now, so a wrong path or key fails the agent's start.
    pub fn load(config: &AuthConfig) -> Result<Self, AuthError> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| AuthError::Read {
                field,
                path: path.to_path_buf(),
                source,
            })
        };
        let tls = match &config.tls {
            None => None,
            Some(t) => {
                let identity = Identity::from_pem(
                    read("api.auth.tls.certFile", &t.cert_file)?,
                    read("api.auth.tls.keyFile", &t.key_file)?,
                );
                let mut tls = ServerTlsConfig::new()
                    .identity(identity)
                    .timeout(TLS_HANDSHAKE_TIMEOUT);
                if let Some(ca) = &t.client_ca_file {
                    tls = tls
                        .client_ca_root(Certificate::from_pem(read(
                            "api.auth.tls.clientCaFile",
                            ca,
                        )?))
                        .client_auth_optional(true);
                }
                // Builds the rustls config once so a bad PEM fails here, not on first connect.
                tonic::transport::Server::builder().tls_config(tls.clone())?;
                Some(tls)
            }
        };
        let token = match &config.token_file {
            None => None,
            Some(path) => {
                let t = TokenFile::new(path.clone());
                t.current().map_err(|e| match e {
                    TokenError::Read(source) => AuthError::Read {
                        field: "api.auth.tokenFile",
                        path: path.clone(),
                        source,
                    },
                    TokenError::Bad(problem) => AuthError::BadToken {
                        path: path.clone(),
                        problem: problem.into(),
                    },
                })?;
                Some(t)
            }
        };
        if token.is_some() && tls.is_none() {
            tracing::warn!(
                "api.auth.tokenFile is set without api.auth.tls: bearer tokens travel in clear text"
            );
        }
        let auth = Authenticator {
            token,
            client_certs: config.client_ca_file().is_some(),
            allowed_client_names: config.allowed_client_names.clone(),
            open_read_only: config.open_read_only,
        };
        Ok(Self {
            tls,
            layer: AuthLayer(Arc::new(auth)),
        })
    }
}

// === impl TokenFile ===

enum TokenError {
    Read(std::io::Error),
    Bad(&'static str),
}

/// The bearer token file, re-read when its identity or modification time changes, so a rotated
/// Secret (kubelet swaps a symlink to a new file) takes effect without a restart.
struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(FileStamp, Arc<[u8]>)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl TokenFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new(None),
        }
    }

    /// The current token. One `stat` per call, a read only when the file changed; called only
    /// for calls that need credentials, which are rare (an orchestrator's control calls).
    fn current(&self) -> Result<Arc<[u8]>, TokenError> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&self.path).map_err(TokenError::Read)?;
        let stamp = FileStamp {
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        };
        let mut cached = self.cached.lock().expect("not poisoned");
        if let Some((s, token)) = cached.as_ref()
            && *s == stamp
        {
            return Ok(token.clone());
        }
        if stamp.len > MAX_TOKEN_BYTES {
            return Err(TokenError::Bad("is larger than a token (4 KiB)"));
        }
        let raw = std::fs::read(&self.path).map_err(TokenError::Read)?;
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(TokenError::Bad("is empty"));
        }
        let token: Arc<[u8]> = token.into();
        *cached = Some((stamp, token.clone()));
        tracing::debug!(path = %self.path.display(), "bearer token (re)loaded");
        Ok(token)
    }
}

// === impl Authenticator ===

/// Methods that change nothing; everything else (the four control RPCs, and any method added
/// later and not listed here) needs credentials.
const READ_ONLY_METHODS: &[&str] = &[
    "/nodekeeper.v1.NodeAgent/GetNode",
    "/nodekeeper.v1.NodeAgent/GetMetrics",
    "/nodekeeper.v1.NodeAgent/WatchMetrics",
    "/nodekeeper.v1.NodeAgent/GetDrain",
];
/// Whole services that change nothing. Matched as `/package.Service/` prefixes (the trailing
/// slash keeps `/externalscaler.ExternalScalerAdmin/...` from matching).
const READ_ONLY_SERVICES: &[&str] = &[
    // KEDA's scaler only reads the connection census; KEDA calls it without credentials.
    "/externalscaler.ExternalScaler/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// True when `path` (`/package.Service/Method`) changes nothing on the node.
pub fn is_read_only(path: &str) -> bool {
    READ_ONLY_METHODS.contains(&path) || READ_ONLY_SERVICES.iter().any(|s| path.starts_with(s))
}

/// Who made an accepted call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A read-only call with `openReadOnly`.
    Anonymous,
    /// The holder of the bearer token.
    Token,
    /// A verified client certificate, named by the name that matched (or its CN).
    Certificate(String),
}

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
    token: Option<TokenFile>,
    client_certs: bool,
    allowed_client_names: Vec<String>,
    open_read_only: bool,
}

impl Authenticator {
    fn check<B>(&self, req: &http::Request<B>) -> Result<Caller, Refusal> {
        let path = req.uri().path();
        if self.open_read_only && is_read_only(path) {
            return Ok(Caller::Anonymous);
        }
        if self.token.is_none() && !self.client_certs {
            return Err(Refusal::unauthenticated(
                "not_configured",
                format!(
                    "authentication is not configured on this agent, so {path} is refused: set api.auth.tokenFile or api.auth.tls.clientCaFile"
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
            Some(leaf) if self.client_certs => self.check_certificate(leaf),
            _ => Err(Refusal::unauthenticated(
                "no_credentials",
                format!("{path} needs credentials: {}", self.accepted_credentials()),
            )),
        }
    }

    fn accepted_credentials(&self) -> &'static str {
        match (self.token.is_some(), self.client_certs) {
            (true, true) => "a client certificate or an `authorization: Bearer <token>` header",
            (true, false) => "an `authorization: Bearer <token>` header",
            _ => "a client certificate",
        }
    }

    fn check_token(&self, header: &http::HeaderValue) -> Result<Caller, Refusal> {
        let Some(file) = &self.token else {
            return Err(Refusal::unauthenticated(
                "token_not_configured",
                "bearer tokens are not accepted by this agent (api.auth.tokenFile is not set); use a client certificate".into(),
            ));
        };
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
        let expected = file.current().map_err(|e| {
            let problem = match &e {
                TokenError::Read(e) => e.to_string(),
                TokenError::Bad(p) => p.to_string(),
            };
            tracing::warn!(path = %file.path.display(), %problem, "cannot read api.auth.tokenFile; refusing bearer tokens");
            Refusal::unauthenticated(
                "token_unavailable",
                "the agent cannot read its token file; bearer tokens are refused until it can"
                    .into(),
            )
        })?;
        // Constant time in the token's content, so response timing does not reveal how many
        // leading bytes matched; only a length mismatch returns early, and length is not secret.
        if bool::from(presented.ct_eq(&expected)) {
            Ok(Caller::Token)
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
    ) -> Result<Caller, Refusal> {
        // rustls verified the chain against clientCaFile during the handshake; only the name
        // is left to check.
        let names = certificate_names(leaf).map_err(|e| Refusal {
            status: Status::permission_denied(format!("cannot read the client certificate: {e}")),
            reason: "bad_certificate",
        })?;
        let first = names.first().cloned().unwrap_or_default();
        if self.allowed_client_names.is_empty() {
            return Ok(Caller::Certificate(first));
        }
        match names
            .iter()
            .find(|n| self.allowed_client_names.iter().any(|a| a == *n))
        {
            Some(n) => Ok(Caller::Certificate(n.clone())),
            None => Err(Refusal {
                status: Status::permission_denied(format!(
                    "client certificate {names:?} is not in api.auth.allowedClientNames"
                )),
                reason: "name_not_allowed",
            }),
        }
    }
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
pub struct AuthLayer(Arc<Authenticator>);

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for AuthService<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<Self::Response, Self::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use futures::future::Either;
        match self.auth.check(&req) {
            Ok(caller) => {
                if caller != Caller::Anonymous {
                    tracing::debug!(
                        method = req.uri().path(),
                        ?caller,
                        "gRPC call authenticated"
                    );
                }
                req.extensions_mut().insert(caller);
                Either::Right(self.inner.call(req))
            }
            Err(refusal) => {
                let peer = req
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .map(|i| i.get_ref())
                    .or_else(|| req.extensions().get::<TcpConnectInfo>())
                    .and_then(|i| i.remote_addr());
                tracing::warn!(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_rpcs_and_unknown_methods_are_not_read_only() {
        for m in ["Cordon", "Uncordon", "Drain", "CancelDrain", "Reboot"] {
            assert!(
                !is_read_only(&format!("/nodekeeper.v1.NodeAgent/{m}")),
                "{m}"
            );
        }
        // Prefix guards: a GetMetrics elsewhere, or a service whose name merely starts like a
        // read-only one, is not read-only.
        for path in [
            "/other.v1.Scaler/GetMetrics",
            "/externalscaler.ExternalScalerAdmin/GetMetrics",
            "/nodekeeper.v1.NodeAgentAdmin/GetMetrics",
            "/nodekeeper.v1.NodeAgent/GetMetricsAndReboot",
        ] {
            assert!(!is_read_only(path), "{path}");
        }
        for m in [
            "IsActive",
            "StreamIsActive",
            "GetMetricSpec",
            "GetMetrics",
            "StreamMetricSpec",
        ] {
            assert!(
                is_read_only(&format!("/externalscaler.ExternalScaler/{m}")),
                "{m}"
            );
        }
        for m in ["GetNode", "GetMetrics", "WatchMetrics", "GetDrain"] {
            assert!(
                is_read_only(&format!("/nodekeeper.v1.NodeAgent/{m}")),
                "{m}"
            );
        }
        assert!(is_read_only("/grpc.health.v1.Health/Check"));
        assert!(is_read_only(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }

    fn request(path: &str, auth: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri(format!("http://x{path}"));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).unwrap()
    }

    fn with_token(dir: &Path, token: &str) -> Authenticator {
        let path = dir.join("token");
        std::fs::write(&path, format!("{token}\n")).unwrap();
        Authenticator {
            token: Some(TokenFile::new(path)),
            client_certs: false,
            allowed_client_names: vec![],
            open_read_only: true,
        }
    }

    #[test]
    fn nothing_configured_refuses_control_calls_and_opens_reads() {
        let a = Authenticator {
            token: None,
            client_certs: false,
            allowed_client_names: vec![],
            open_read_only: true,
        };
        let r = a
            .check(&request("/nodekeeper.v1.NodeAgent/Cordon", None))
            .unwrap_err();
        assert_eq!(r.status.code(), tonic::Code::Unauthenticated);
        assert!(r.status.message().contains("not configured"), "{r:?}");
        assert_eq!(
            a.check(&request("/nodekeeper.v1.NodeAgent/GetNode", None))
                .unwrap(),
            Caller::Anonymous
        );
    }

    #[test]
    fn tokens_are_checked_and_rotation_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_token(dir.path(), "s3cret-one");
        let cordon = "/nodekeeper.v1.NodeAgent/Cordon";
        assert_eq!(
            a.check(&request(cordon, Some("Bearer s3cret-one")))
                .unwrap(),
            Caller::Token
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
            "api:\n  auth:\n    tokenFile: /t\n    tls:\n      certFile: /c\n      keyFile: /k\n      clientCaFile: /ca\n    allowedClientNames: [orchestrator]\n    openReadOnly: false\n",
        )
        .unwrap();
        let a = &c.api.auth;
        assert_eq!(a.token_file.as_deref(), Some(Path::new("/t")));
        assert_eq!(a.client_ca_file(), Some(Path::new("/ca")));
        assert_eq!(a.allowed_client_names, ["orchestrator"]);
        assert!(!a.open_read_only);
        c.validate().unwrap();
        assert_eq!(Config::from_yaml(&c.to_yaml()).unwrap(), c);
        assert!(Config::default().api.auth.open_read_only);

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
            allowed_client_names: vec!["orchestrator".into(), " ".into()],
            ..Default::default()
        };
        let fields: Vec<_> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "api.auth.tokenFile",
                "api.auth.allowedClientNames",
                "api.auth.allowedClientNames[1]"
            ]
        );
        assert!(AuthConfig::default().problems().is_empty());
    }
}
