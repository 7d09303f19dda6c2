//! Who may call the aggregator's own API (issue #19): GetFleet and KEDA's ExternalScaler hand
//! out the census the aggregator read from the agents with its read credential, so they need a
//! credential of their own by default. KEDA authenticates to an external scaler only with a TLS
//! client certificate (its trigger's `caCert`, `tlsClientCert`, `tlsClientKey`), so mTLS
//! (`--listen-cert`, `--listen-key`, `--listen-client-ca`) is KEDA's path; a bearer token
//! (`--listen-token-file`) is for GetFleet from the CLI or grpcurl. Serving without any
//! credential takes `--allow-anonymous`, said at start in a `warn` line, in
//! `nodekeeper_aggregate_api_anonymous` and by `--check-config`. Health never needs one.
//!
//! Owns the flag-to-`AuthConfig` mapping only: the checks, the TLS reload and the token
//! re-read are the agent's own (`api::auth`, `api::server_tls`), under the flags' names.

use std::fmt::Write as _;

use crate::api::auth::{AuthConfig, AuthFields, TlsConfig};
use crate::api::authz::Role;

use super::AggregateArgs;

/// The aggregator's flags, as errors, logs and refusals name them.
pub const AGGREGATOR_FIELDS: AuthFields = AuthFields {
    server: "aggregator",
    // The aggregator has no control token (it serves no mutating RPC).
    token_file: "--listen-token-file",
    read_token_file: "--listen-token-file",
    cert_file: "--listen-cert",
    key_file: "--listen-key",
    client_ca_file: "--listen-client-ca",
    client_names: "--listen-client-names",
    configure: "start it with --listen-client-ca (mTLS, how KEDA authenticates) and/or \
                --listen-token-file, or open it to anyone with --allow-anonymous",
};

/// What the aggregator's API accepts, from its flags.
pub fn auth_config(args: &AggregateArgs) -> AuthConfig {
    let tls = match (&args.listen_cert, &args.listen_key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert_file: cert.clone(),
            key_file: key.clone(),
            client_ca_file: args.listen_client_ca.clone(),
        }),
        _ => None,
    };
    AuthConfig {
        token_file: None,
        // Role read: everything the aggregator serves is a read.
        read_token_file: args.listen_token_file.clone(),
        tls,
        allowed_client_names: Vec::new(),
        // Listed names get role read; with none listed, every certificate of the CA is accepted.
        client_roles: args
            .listen_client_names
            .iter()
            .map(|n| (n.clone(), vec![Role::Read]))
            .collect(),
        open_read_only: args.allow_anonymous,
        open_keda: args.allow_anonymous,
        ..AuthConfig::default()
    }
}

/// Whether any credential is configured.
pub fn has_credential(args: &AggregateArgs) -> bool {
    args.listen_token_file.is_some() || args.listen_client_ca.is_some()
}

/// Flag combinations clap cannot express, as usage errors naming the flag.
pub fn problems(args: &AggregateArgs) -> Vec<String> {
    let mut out = Vec::new();
    for (i, name) in args.listen_client_names.iter().enumerate() {
        if name.trim().is_empty() {
            out.push(format!("--listen-client-names: entry {i} is empty"));
        }
    }
    out
}

/// Whether the agents are dialled over TLS (`--cacert`, `--cert` or `--server-name`).
pub fn agents_over_tls(args: &AggregateArgs) -> bool {
    args.cacert.is_some() || args.cert.is_some() || args.server_name.is_some()
}

/// The refusal of a bearer token sent to the agents in clear text without
/// `--allow-plaintext-token` (decision #19-i), naming the flags.
pub fn plaintext_token_problem(args: &AggregateArgs) -> Option<String> {
    (args.token_file.is_some() && !agents_over_tls(args) && !args.allow_plaintext_token).then(
        || {
            "--token-file: the token would be sent to the agents in clear text (no --cacert): dial \
         them over TLS with --cacert (and --server-name, --cert/--key), or accept the exposure \
         with --allow-plaintext-token"
                .to_string()
        },
    )
}

/// The warning for a bearer token sent to the agents in clear text by `--allow-plaintext-token`.
pub fn plaintext_token_warning(args: &AggregateArgs) -> Option<String> {
    (args.token_file.is_some() && !agents_over_tls(args) && args.allow_plaintext_token).then(|| {
        "--allow-plaintext-token: --token-file's token is sent to every agent endpoint in clear \
         text; anyone on the path of a fan-out, or any endpoint of the agents' Service, reads it"
            .to_string()
    })
}

/// The warning for an API without credentials, or `None` when it has one.
pub fn open_warning(args: &AggregateArgs) -> Option<String> {
    if args.allow_anonymous {
        Some(format!(
            "--allow-anonymous: GetFleet, KEDA's scaler and reflection on {} answer anyone who can \
             reach it, with the census read from the agents with the aggregator's credential",
            args.listen
        ))
    } else if !has_credential(args) {
        Some(format!(
            "no credential is configured for the aggregator's API on {}: GetFleet and KEDA's \
             scaler refuse every caller (UNAUTHENTICATED); {}",
            args.listen, AGGREGATOR_FIELDS.configure
        ))
    } else {
        None
    }
}

/// `--check-config`'s report of the API's authentication (YAML).
pub fn describe(args: &AggregateArgs) -> String {
    let mut out = String::new();
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref().map_or("null".to_string(), |p| {
            format!("{:?}", p.display().to_string())
        })
    };
    let _ = writeln!(out, "agents:");
    let _ = writeln!(out, "  tls: {}", agents_over_tls(args));
    let _ = writeln!(out, "  cacert: {}", path(&args.cacert));
    let _ = writeln!(out, "  clientCert: {}", path(&args.cert));
    let _ = writeln!(out, "  tokenFile: {}", path(&args.token_file));
    let _ = writeln!(out, "  allowPlaintextToken: {}", args.allow_plaintext_token);
    let _ = writeln!(out, "listen: {:?}", args.listen.to_string());
    let _ = writeln!(out, "auth:");
    let _ = writeln!(out, "  tlsCert: {}", path(&args.listen_cert));
    let _ = writeln!(out, "  tlsKey: {}", path(&args.listen_key));
    let _ = writeln!(out, "  clientCa: {}", path(&args.listen_client_ca));
    let names = if args.listen_client_names.is_empty() {
        "[]  # any certificate of clientCa".to_string()
    } else {
        format!("{:?}", args.listen_client_names)
    };
    let _ = writeln!(out, "  clientNames: {names}");
    let _ = writeln!(out, "  tokenFile: {}", path(&args.listen_token_file));
    let _ = writeln!(out, "  allowAnonymous: {}", args.allow_anonymous);
    if let Some(w) = open_warning(args) {
        let _ = writeln!(out, "# WARNING: {w}");
    }
    if let Some(w) = plaintext_token_warning(args) {
        let _ = writeln!(out, "# WARNING: {w}");
    }
    out
}
