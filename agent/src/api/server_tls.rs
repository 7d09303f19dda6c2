//! The gRPC server's TLS, re-read when its files change: certificate chain, private key and
//! client CA (`api.auth.tls`). Kubernetes updates a Secret volume by swapping the `..data`
//! symlink to a new directory, so every file changes at once; a reload needs no restart. New
//! connections get the new certificate (and are verified against the new CA); connections
//! already open keep the session they negotiated.
//!
//! The files are checked (one `stat` each) at every accepted connection and every
//! [`CHECK_INTERVAL`], and read only when one changed. A changed set that does not make a working
//! config (unreadable, not PEM, a key that does not match the certificate) is refused: one
//! warning naming the file, `nodekeeper_api_tls_reloads_total{result="refused"}`,
//! `nodekeeper_api_tls_files_refused` at 1 and the refusal in the api capability's health
//! detail, while the last good config stays in use. The same refused files are not re-read
//! until one of them changes again.
//!
//! Must never log or keep key material, only paths and parse errors.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;

use super::auth::{AuthFields, FileStamp, TLS_HANDSHAKE_TIMEOUT, TlsConfig};

/// How often the files are checked without any connection arriving, so a refused rotation
/// shows in the metric and health within seconds even on an idle agent. kubelet itself takes up
/// to a minute to project a changed Secret, so this adds little.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// HTTP/2 over TLS (gRPC needs it negotiated by ALPN).
const ALPN_H2: &[u8] = b"h2";

/// A TLS file that does not make a working server config.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file could not be read.
    #[error("{field}: cannot read {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file was read but is not what the field needs.
    #[error("{field}: {} {problem}", path.display())]
    Invalid {
        field: &'static str,
        path: PathBuf,
        problem: String,
    },
}

impl TlsFileError {
    /// The config field naming the bad file.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Read { field, .. } | Self::Invalid { field, .. } => field,
        }
    }
}

// === metrics ===

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The reload's metrics, on the agent's registry.
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    reloads: Family<ResultLabel, Counter>,
    refused: Gauge,
    not_after: Gauge,
}

impl TlsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "api_tls_reloads",
            "Changed gRPC TLS files (certificate, key, client CA) read again, by result: loaded \
             (new connections use them) or refused (the previous ones stay in use)",
            m.reloads.clone(),
        );
        registry.register(
            "api_tls_files_refused",
            "1 while the gRPC TLS files on disk are refused and the previously loaded certificate \
             is still served; the log and the api health detail name the file",
            m.refused.clone(),
        );
        registry.register(
            "api_tls_certificate_not_after_timestamp_seconds",
            "Expiry (notAfter, Unix seconds) of the gRPC server certificate being served",
            m.not_after.clone(),
        );
        m
    }
}

// === impl ReloadingServerTls ===

/// The stamps of the certificate, key and CA files (`None`: could not be stat'ed).
type Stamps = [Option<FileStamp>; 3];

struct State {
    config: Arc<ServerConfig>,
    /// The files `config` was built from.
    loaded: Stamps,
    /// Files that were refused, and why; not read again until one of them changes.
    refused: Option<(Stamps, String)>,
}

/// The server's TLS config, rebuilt from its files when they change.
pub struct ReloadingServerTls {
    files: TlsConfig,
    /// What the files are called in errors (the agent's keys or the aggregator's flags).
    fields: AuthFields,
    state: Mutex<State>,
    metrics: TlsMetrics,
}

impl ReloadingServerTls {
    /// Reads the files now: at start a bad file is an error (the agent does not start).
    pub fn load(
        files: &TlsConfig,
        metrics: TlsMetrics,
        fields: AuthFields,
    ) -> Result<Self, TlsFileError> {
        let stamps = stamps(files);
        let (config, not_after) = build(files, fields)?;
        metrics.not_after.set(not_after);
        Ok(Self {
            files: files.clone(),
            fields,
            state: Mutex::new(State {
                config: Arc::new(config),
                loaded: stamps,
                refused: None,
            }),
            metrics,
        })
    }

    /// Re-reads the files if one changed since the last load or refusal; returns the config new
    /// connections use.
    pub fn refresh(&self) -> Arc<ServerConfig> {
        let now = stamps(&self.files);
        let mut state = self.state.lock().expect("not poisoned");
        if now == state.loaded || state.refused.as_ref().is_some_and(|(s, _)| *s == now) {
            return state.config.clone();
        }
        match build(&self.files, self.fields) {
            Ok((config, not_after)) => {
                tracing::info!(
                    cert = %self.files.cert_file.display(),
                    client_ca = ?self.files.client_ca_file.as_ref().map(|p| p.display().to_string()),
                    not_after,
                    "api TLS files changed: loaded; new connections use them"
                );
                state.config = Arc::new(config);
                state.loaded = now;
                state.refused = None;
                self.metrics
                    .reloads
                    .get_or_create(&ResultLabel { result: "loaded" })
                    .inc();
                self.metrics.refused.set(0);
                self.metrics.not_after.set(not_after);
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    field = e.field(),
                    "api TLS files changed but are refused; still serving the previously loaded certificate"
                );
                state.refused = Some((now, e.to_string()));
                self.metrics
                    .reloads
                    .get_or_create(&ResultLabel { result: "refused" })
                    .inc();
                self.metrics.refused.set(1);
            }
        }
        state.config.clone()
    }

    /// Why the files on disk are refused, while they are.
    pub fn refusal(&self) -> Option<String> {
        let state = self.state.lock().expect("not poisoned");
        state.refused.as_ref().map(|(_, why)| why.clone())
    }

    /// The TLS handshake of one accepted connection with the current config; `None` when it
    /// fails or does not finish within [`TLS_HANDSHAKE_TIMEOUT`] (logged at debug: scanners and
    /// plaintext clients are not worth a warning).
    pub async fn accept<IO>(&self, io: IO) -> Option<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.refresh());
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "grpc: TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("grpc: TLS handshake timed out");
                None
            }
        }
    }
}

fn stamps(files: &TlsConfig) -> Stamps {
    [
        FileStamp::of(&files.cert_file).ok(),
        FileStamp::of(&files.key_file).ok(),
        files
            .client_ca_file
            .as_deref()
            .and_then(|p| FileStamp::of(p).ok()),
    ]
}

/// PEM files larger than this are not a certificate chain, key or CA bundle of ours.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Never a plain read: a FIFO swapped in would block the thread with the TLS state held.
fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    crate::state_file::read_capped(path, MAX_PEM_BYTES).map_err(|source| TlsFileError::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(field: &'static str, path: &Path, problem: impl Into<String>) -> TlsFileError {
    TlsFileError::Invalid {
        field,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Every certificate of a PEM file; at least one.
fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, path, format!("is not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(field, path, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

/// The server config the files describe, and the leaf's notAfter (Unix seconds).
fn build(files: &TlsConfig, fields: AuthFields) -> Result<(ServerConfig, i64), TlsFileError> {
    let (cert_field, key_field, ca_field) =
        (fields.cert_file, fields.key_file, fields.client_ca_file);
    let certs = certificates(cert_field, &files.cert_file)?;
    let not_after = x509_parser::parse_x509_certificate(&certs[0])
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| {
            invalid(
                cert_field,
                &files.cert_file,
                format!("first certificate: {e}"),
            )
        })?;
    let key_pem = read(key_field, &files.key_file)?;
    // The parse error is not echoed: it could quote the file.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        invalid(
            key_field,
            &files.key_file,
            "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
        )
    })?;
    let builder = ServerConfig::builder();
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca_field, ca)? {
                roots
                    .add(cert)
                    .map_err(|e| invalid(ca_field, ca, format!("is not a usable CA: {e}")))?;
            }
            // Optional: token-only clients still connect; the auth layer decides per call.
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|e| invalid(ca_field, ca, format!("is not a usable CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(
            key_field,
            &files.key_file,
            format!(
                "does not go with the certificate in {}: {e}",
                files.cert_file.display()
            ),
        )
    })?;
    config.alpn_protocols.push(ALPN_H2.to_vec());
    Ok((config, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::AGENT_FIELDS;

    /// A self-signed EC certificate and key by `openssl`, in `dir` as NAME.crt / NAME.key.
    fn self_signed(dir: &Path, name: &str) -> bool {
        std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
            ])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(dir.join(format!("{name}.key")))
            .arg("-out")
            .arg(dir.join(format!("{name}.crt")))
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn files(dir: &Path, cert: &str, key: &str) -> TlsConfig {
        TlsConfig {
            cert_file: dir.join(cert),
            key_file: dir.join(key),
            client_ca_file: None,
        }
    }

    fn replace(dir: &Path, name: &str, from: &str) {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::copy(dir.join(from), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    #[test]
    fn a_bad_pair_is_refused_naming_the_file_and_the_old_config_stays() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        if !(self_signed(d, "one") && self_signed(d, "two")) {
            eprintln!("SKIP: openssl missing");
            return;
        }
        replace(d, "tls.crt", "one.crt");
        replace(d, "tls.key", "one.key");
        let mut registry = Registry::default();
        let tls = ReloadingServerTls::load(
            &files(d, "tls.crt", "tls.key"),
            TlsMetrics::register(&mut registry),
            AGENT_FIELDS,
        )
        .unwrap();
        let first = tls.refresh();
        assert!(
            Arc::ptr_eq(&first, &tls.refresh()),
            "unchanged files were rebuilt"
        );

        // A new certificate with the old key: refused, naming the key file; the old config stays.
        replace(d, "tls.crt", "two.crt");
        assert!(Arc::ptr_eq(&first, &tls.refresh()));
        let why = tls.refusal().expect("refused");
        assert!(
            why.starts_with(AGENT_FIELDS.key_file) && why.contains("tls.key"),
            "{why}"
        );
        assert_eq!(tls.metrics.refused.get(), 1);

        // Garbage where the certificate was: refused naming the certificate file.
        std::fs::write(d.join("tls.crt.tmp"), "not a certificate").unwrap();
        std::fs::rename(d.join("tls.crt.tmp"), d.join("tls.crt")).unwrap();
        assert!(Arc::ptr_eq(&first, &tls.refresh()));
        let why = tls.refusal().expect("refused");
        assert!(
            why.starts_with(AGENT_FIELDS.cert_file) && why.contains("tls.crt"),
            "{why}"
        );

        // The matching pair: loaded, the refusal cleared.
        replace(d, "tls.crt", "two.crt");
        replace(d, "tls.key", "two.key");
        let second = tls.refresh();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(tls.refusal(), None);
        assert_eq!(tls.metrics.refused.get(), 0);
        let counts = |r| {
            tls.metrics
                .reloads
                .get_or_create(&ResultLabel { result: r })
                .get()
        };
        assert_eq!((counts("loaded"), counts("refused")), (1, 2));
    }

    #[test]
    fn a_bad_file_at_start_names_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("tls.crt"), "garbage").unwrap();
        let e = ReloadingServerTls::load(
            &files(d, "tls.crt", "tls.key"),
            TlsMetrics::default(),
            AGENT_FIELDS,
        )
        .err()
        .expect("garbage accepted");
        assert_eq!(e.field(), AGENT_FIELDS.cert_file, "{e}");
        let e = ReloadingServerTls::load(
            &files(d, "missing.crt", "tls.key"),
            TlsMetrics::default(),
            AGENT_FIELDS,
        )
        .err()
        .expect("a missing file accepted");
        assert!(
            matches!(
                e,
                TlsFileError::Read { field, .. } if field == AGENT_FIELDS.cert_file
            ),
            "{e}"
        );
    }
}
