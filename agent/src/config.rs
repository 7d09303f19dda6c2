//! The agent's one typed configuration: a YAML file (mounted from a ConfigMap) overlaid with
//! flags and `NODEKEEPER_*` environment variables.
//!
//! Owns parsing, defaults and validation. Parsing rejects unknown fields and names the field
//! path of any bad value; `validate` reports every semantic problem at once, not just the first.
//! Nothing here touches the host.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::disks::DisksConfig;
use crate::drain::DrainConfig;
use crate::host::HostPaths;
use crate::sysctl::SysctlConfig;

// === defaults ===

/// Next to node_exporter's 9100 family, unused by kubelet (10250), kube-proxy (10249/10256).
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9740";
/// The gRPC port is the metrics port + 1 so firewall rules can cover both as one range.
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:9741";
/// Scrapes and gRPC readers within this age share one collection: a 1 s window keeps a burst of
/// readers (Prometheus HA pairs, several autoscalers) from multiplying /proc reads.
pub const DEFAULT_MAX_SNAPSHOT_AGE: Duration = Duration::from_secs(1);
/// WatchMetrics intervals below this are raised: one collection per second is the finest
/// resolution the kernel counters are useful at, and it bounds the cost of a misbehaving client.
pub const DEFAULT_MIN_WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Interval used when a WatchMetrics request gives none; Prometheus' common scrape interval.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(15);
/// Concurrent WatchMetrics streams: a handful of autoscalers and orchestrators per node is normal,
/// hundreds means a leak in a client.
pub const DEFAULT_MAX_WATCH_STREAMS: usize = 64;
/// Server reflection on by default so grpcurl works against a local agent with no proto files;
/// the shipped manifests turn it off (it maps the attack surface for anyone who can connect).
pub const DEFAULT_API_REFLECTION: bool = true;
/// Where the agent keeps state that must survive restarts (sysctl originals, disk markers).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nodekeeper";
/// Time given to capabilities to stop after SIGTERM before the process exits anyway: the DNS
/// cache's default lame duck (5 s) plus its teardown (2 s) must fit, with room to spare, and
/// stay well below the DaemonSet's terminationGracePeriodSeconds (30). Capabilities that stop
/// sooner are not held up by it.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bounds that catch unit mistakes ("3600" meant as ms) rather than encode policy.
const MAX_SNAPSHOT_AGE_LIMIT: Duration = Duration::from_secs(60);
const MIN_WATCH_INTERVAL_FLOOR: Duration = Duration::from_millis(100);
const WATCH_STREAMS_LIMIT: usize = 10_000;
const SHUTDOWN_TIMEOUT_LIMIT: Duration = Duration::from_secs(60);

// === the config tree ===

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Config {
    /// This node's name; defaults to `NODE_NAME` (downward API), then the host name.
    pub node_name: Option<String>,
    pub state_dir: PathBuf,
    pub shutdown_timeout: ConfigDuration,
    pub host_paths: HostPaths,
    pub kubernetes: KubernetesConfig,
    pub metrics: MetricsConfig,
    pub api: ApiConfig,
    pub sysctl: SysctlConfig,
    pub drain: DrainConfig,
    pub disks: DisksConfig,
    pub dns: crate::dns::DnsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            shutdown_timeout: ConfigDuration(DEFAULT_SHUTDOWN_TIMEOUT),
            host_paths: HostPaths::default(),
            kubernetes: KubernetesConfig::default(),
            metrics: MetricsConfig::default(),
            api: ApiConfig::default(),
            sysctl: SysctlConfig::default(),
            drain: DrainConfig::default(),
            disks: DisksConfig::default(),
            dns: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum KubernetesMode {
    /// Use the API when a kubeconfig or the in-cluster environment is present, else standalone.
    #[default]
    Auto,
    /// Never talk to the API (laptops, CI, nodes being debugged).
    Standalone,
    /// Fail at start when no API client can be built.
    Required,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubernetesConfig {
    pub mode: KubernetesMode,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MetricsConfig {
    /// Node and pod resource collection. The HTTP endpoint itself always runs: probes need it.
    pub enabled: bool,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    pub listen: ListenAddr,
    pub max_snapshot_age: ConfigDuration,
    /// Mount points (as seen on the host) whose size and free space are reported.
    pub filesystems: Vec<PathBuf>,
    /// Per-pod CPU and memory from the kubepods cgroup hierarchy.
    pub pods: bool,
    /// Per-pod socket census (connection pools, accept queues, ephemeral ports).
    pub connections: crate::metrics::connections::ConnectionsConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: ListenAddr::parse_default(DEFAULT_METRICS_LISTEN),
            max_snapshot_age: ConfigDuration(DEFAULT_MAX_SNAPSHOT_AGE),
            filesystems: vec![PathBuf::from("/")],
            pods: true,
            connections: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ApiConfig {
    pub enabled: bool,
    /// Address of the gRPC server (NodeAgent, health, reflection).
    pub listen: ListenAddr,
    pub min_watch_interval: ConfigDuration,
    pub max_watch_streams: usize,
    /// Serve grpc.reflection (v1 and v1alpha).
    pub reflection: bool,
    /// Who may call what: TLS, client certificates, bearer token (see `api::auth`).
    pub auth: crate::api::auth::AuthConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: ListenAddr::parse_default(DEFAULT_API_LISTEN),
            min_watch_interval: ConfigDuration(DEFAULT_MIN_WATCH_INTERVAL),
            max_watch_streams: DEFAULT_MAX_WATCH_STREAMS,
            reflection: DEFAULT_API_REFLECTION,
            auth: Default::default(),
        }
    }
}

// === value types that explain their own parse errors ===

/// A socket address written as `host:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl ListenAddr {
    fn parse_default(s: &str) -> Self {
        Self(s.parse().expect("default listen address is valid"))
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(Self).map_err(|_| {
            format!("{s:?} is not a socket address (want host:port, e.g. 0.0.0.0:9740)")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A duration written with a unit: `250ms`, `15s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl std::str::FromStr for ConfigDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?} is not a duration (want a number with a unit: 250ms, 15s, 5m, 1h)");
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (number, unit) = s.split_at(split);
        let n: u64 = number.parse().map_err(|_| bad())?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        Ok(Self(d))
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// === errors ===

/// One bad field: its dotted path, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown field, or a value of the wrong type.
    #[error("{field}: {problem}")]
    Parse { field: String, problem: String },
    /// The file parsed, but some values are out of range or inconsistent.
    #[error("invalid config:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// Low-cardinality label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Parse { .. } => "parse",
            Self::Invalid(_) => "invalid",
        }
    }
}

// === loading ===

/// Values given as flags or env vars; each, when set, replaces the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub node_name: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub metrics_listen: Option<ListenAddr>,
    pub api_listen: Option<ListenAddr>,
    pub api_token_file: Option<PathBuf>,
    pub standalone: bool,
    pub host_proc: Option<PathBuf>,
    pub host_sys: Option<PathBuf>,
    pub host_dev: Option<PathBuf>,
    pub host_rootfs: Option<PathBuf>,
    pub host_cgroup: Option<PathBuf>,
}

impl Config {
    /// Parses YAML text. An empty document yields the defaults.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut field = String::new();
        let options = serde_saphyr::options! { with_snippet: false };
        serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                field = e.path().to_string();
                e.into_inner()
            })
        })
        .map_err(|e| ConfigError::Parse {
            field: if field.is_empty() || field == "." {
                "config".to_string()
            } else {
                field
            },
            problem: e.to_string(),
        })
    }

    /// Reads and parses a file; `None` means no file: defaults only.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Ok(Self::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::from_yaml(&text)
            }
        }
    }

    pub fn apply(&mut self, o: Overrides) {
        let Overrides {
            node_name,
            state_dir,
            metrics_listen,
            api_listen,
            api_token_file,
            standalone,
            host_proc,
            host_sys,
            host_dev,
            host_rootfs,
            host_cgroup,
        } = o;
        set(&mut self.node_name, node_name.map(Some));
        set(&mut self.state_dir, state_dir);
        set(&mut self.metrics.listen, metrics_listen);
        set(&mut self.api.listen, api_listen);
        set(&mut self.api.auth.token_file, api_token_file.map(Some));
        if standalone {
            self.kubernetes.mode = KubernetesMode::Standalone;
        }
        set(&mut self.host_paths.proc, host_proc);
        set(&mut self.host_paths.sys, host_sys);
        set(&mut self.host_paths.dev, host_dev);
        set(&mut self.host_paths.rootfs, host_rootfs);
        set(&mut self.host_paths.cgroup, host_cgroup);
    }

    /// Every semantic problem, each naming its field; empty when the config is usable.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut errs = Problems::default();
        if let Some(name) = &self.node_name
            && !is_dns_subdomain(name)
        {
            errs.add("nodeName", format!("{name:?} is not a valid node name (lowercase DNS subdomain, at most 253 characters)"));
        }
        errs.absolute("stateDir", &self.state_dir);
        errs.range(
            "shutdownTimeout",
            self.shutdown_timeout,
            Duration::from_millis(100),
            SHUTDOWN_TIMEOUT_LIMIT,
        );
        for (field, path) in self.host_paths.named() {
            errs.absolute(&format!("hostPaths.{field}"), path);
        }
        errs.range(
            "metrics.maxSnapshotAge",
            self.metrics.max_snapshot_age,
            Duration::ZERO,
            MAX_SNAPSHOT_AGE_LIMIT,
        );
        for (i, fs) in self.metrics.filesystems.iter().enumerate() {
            errs.absolute(&format!("metrics.filesystems[{i}]"), fs);
        }
        errs.range(
            "api.minWatchInterval",
            self.api.min_watch_interval,
            MIN_WATCH_INTERVAL_FLOOR,
            Duration::from_secs(3600),
        );
        if self.api.max_watch_streams == 0 || self.api.max_watch_streams > WATCH_STREAMS_LIMIT {
            errs.add(
                "api.maxWatchStreams",
                format!(
                    "{} is out of range (1..={WATCH_STREAMS_LIMIT})",
                    self.api.max_watch_streams
                ),
            );
        }
        if self.api.enabled
            && self.api.listen.0.port() != 0
            && self.api.listen == self.metrics.listen
        {
            errs.add(
                "api.listen",
                format!(
                    "{} is also metrics.listen; the gRPC and HTTP servers need their own ports",
                    self.api.listen
                ),
            );
        }
        // The cache answers through its lame-duck period, then tears the node wiring down:
        // both must fit in the time the agent gives its capabilities to stop.
        if self.dns.enabled
            && self.dns.lame_duck.get() + Duration::from_secs(2) > self.shutdown_timeout.get()
        {
            errs.add(
                "dns.lameDuck",
                format!(
                    "{:?} plus 2s for teardown exceeds shutdownTimeout {:?}; raise shutdownTimeout",
                    self.dns.lame_duck.get(),
                    self.shutdown_timeout.get()
                ),
            );
        }
        for (field, problem) in self
            .sysctl
            .problems()
            .into_iter()
            .chain(self.drain.problems())
            .chain(self.api.auth.problems())
            .chain(self.disks.problems())
            .chain(self.metrics.connections.problems())
            .chain(self.dns.problems())
        {
            errs.add(&field, problem);
        }
        errs.0
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The effective config as YAML, for `check-config`.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("config always serializes")
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: &str, problem: String) {
        self.0.push(FieldError {
            field: field.to_string(),
            problem,
        });
    }
    fn absolute(&mut self, field: &str, path: &Path) {
        if !path.is_absolute() {
            self.add(
                field,
                format!("{:?} is not an absolute path", path.display().to_string()),
            );
        }
    }
    fn range(&mut self, field: &str, value: ConfigDuration, min: Duration, max: Duration) {
        if value.0 < min || value.0 > max {
            self.add(
                field,
                format!(
                    "{value} is out of range ({}..={})",
                    ConfigDuration(min),
                    ConfigDuration(max)
                ),
            );
        }
    }
}

/// RFC 1123 subdomain, as Kubernetes requires of node names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_that_validate() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn full_file_parses() {
        let c = Config::from_yaml(
            "nodeName: ip-10-0-0-1.ec2.internal\nstateDir: /var/lib/nk\nhostPaths:\n  proc: /host/proc\nmetrics:\n  listen: 127.0.0.1:9000\n  maxSnapshotAge: 250ms\n  filesystems: [/, /var]\napi:\n  enabled: false\n",
        )
        .unwrap();
        assert_eq!(c.node_name.as_deref(), Some("ip-10-0-0-1.ec2.internal"));
        assert_eq!(c.host_paths.proc, PathBuf::from("/host/proc"));
        assert_eq!(c.host_paths.sys, PathBuf::from("/sys"));
        assert_eq!(c.metrics.listen.0, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.metrics.max_snapshot_age.0, Duration::from_millis(250));
        assert_eq!(c.metrics.filesystems.len(), 2);
        assert!(!c.api.enabled);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let e = Config::from_yaml("metrics:\n  lisen: 1.2.3.4:5\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("lisen"), "{msg}");
        assert!(msg.starts_with("metrics"), "{msg}");
    }

    #[test]
    fn bad_socket_address_names_field_and_value() {
        let e = Config::from_yaml("metrics:\n  listen: abc\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("metrics.listen: "), "{msg}");
        assert!(msg.contains("\"abc\" is not a socket address"), "{msg}");
    }

    #[test]
    fn wrong_type_names_field() {
        let e = Config::from_yaml("api:\n  maxWatchStreams: lots\n").unwrap_err();
        assert!(e.to_string().starts_with("api.maxWatchStreams: "), "{e}");
        let e = Config::from_yaml("metrics:\n  enabled: [1]\n").unwrap_err();
        assert!(e.to_string().starts_with("metrics.enabled: "), "{e}");
    }

    #[test]
    fn bad_duration_names_field() {
        let e = Config::from_yaml("metrics:\n  maxSnapshotAge: 10\n").unwrap_err();
        assert!(e.to_string().starts_with("metrics.maxSnapshotAge: "), "{e}");
        assert!(e.to_string().contains("not a duration"), "{e}");
    }

    #[test]
    fn every_out_of_range_value_is_reported_at_once() {
        let c = Config::from_yaml(
            "nodeName: Bad_Name\nstateDir: relative/dir\nmetrics:\n  maxSnapshotAge: 2h\n  filesystems: [var]\napi:\n  minWatchInterval: 10ms\n  maxWatchStreams: 0\n",
        )
        .unwrap();
        let fields: Vec<_> = c.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "nodeName",
                "stateDir",
                "metrics.maxSnapshotAge",
                "metrics.filesystems[0]",
                "api.minWatchInterval",
                "api.maxWatchStreams"
            ]
        );
    }

    #[test]
    fn same_port_for_both_servers_is_rejected() {
        let c =
            Config::from_yaml("metrics:\n  listen: 0.0.0.0:9000\napi:\n  listen: 0.0.0.0:9000\n")
                .unwrap();
        assert_eq!(c.problems()[0].field, "api.listen");
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut c = Config::from_yaml("metrics:\n  listen: 0.0.0.0:1\n").unwrap();
        c.apply(Overrides {
            metrics_listen: Some("127.0.0.1:2".parse().unwrap()),
            standalone: true,
            host_proc: Some("/tmp/proc".into()),
            ..Default::default()
        });
        assert_eq!(c.metrics.listen.0.port(), 2);
        assert_eq!(c.kubernetes.mode, KubernetesMode::Standalone);
        assert_eq!(c.host_paths.proc, PathBuf::from("/tmp/proc"));
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::default();
        assert_eq!(Config::from_yaml(&c.to_yaml()).unwrap(), c);
    }

    #[test]
    fn durations_parse_and_print() {
        for (s, d) in [
            ("250ms", 250),
            ("15s", 15_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
        ] {
            let parsed: ConfigDuration = s.parse().unwrap();
            assert_eq!(parsed.0, Duration::from_millis(d));
            assert_eq!(parsed.to_string(), s);
        }
        for bad in ["", "10", "s", "1.5s", "-1s", "10d"] {
            assert!(bad.parse::<ConfigDuration>().is_err(), "{bad}");
        }
    }
}
