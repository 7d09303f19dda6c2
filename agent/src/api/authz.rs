//! Authorization of gRPC calls: which credential may call which RPC, and how often a principal
//! may change the node.
//!
//! Owns the rule table (one [`Rule`] per RPC path, unit-tested to cover every method of every
//! service descriptor the agent serves), the roles a credential carries, the [`Principal`] the
//! auth layer attaches to each accepted call, and the per-principal rate limit of mutating calls.
//! Must never authorize by anything the caller asserts in a message (such as `requester`): only
//! by the credential `auth` verified.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

// === roles and rules ===

/// What a credential may do. `control` is every role; the others are one kind of change each,
/// and every role may also read (an orchestrator that drains must follow the drain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// GetNode, GetMetrics, WatchMetrics, GetDrain, KEDA's scaler, reflection.
    Read,
    /// Cordon and Uncordon.
    Cordon,
    /// Drain and CancelDrain.
    Drain,
    /// Everything.
    Control,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Cordon => "cordon",
            Self::Drain => "drain",
            Self::Control => "control",
        }
    }

    fn grants(self, rule: Rule) -> bool {
        match rule {
            Rule::Anonymous => true,
            Rule::Read | Rule::Keda | Rule::Reflection => true,
            Rule::Cordon => matches!(self, Self::Cordon | Self::Control),
            Rule::Drain => matches!(self, Self::Drain | Self::Control),
            Rule::Control => self == Self::Control,
        }
    }
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, always (health: kubelet-style probes carry no credentials).
    Anonymous,
    /// Any role; anonymous when `openReadOnly`.
    Read,
    /// KEDA's scaler: any role; anonymous when `openReadOnly` or `openKeda` (KEDA calls
    /// external scalers without credentials unless configured for mTLS).
    Keda,
    /// Server reflection (the schema only): as `Read`.
    Reflection,
    /// Cordon, Uncordon: role `cordon` or `control`. Mutating.
    Cordon,
    /// Drain, CancelDrain: role `drain` or `control`. Mutating.
    Drain,
    /// A method without a rule (none today: the table test fails first): role `control`.
    Control,
}

impl Rule {
    /// Changes the node: rate-limited per principal and audit-logged.
    pub fn is_mutating(self) -> bool {
        matches!(self, Self::Cordon | Self::Drain | Self::Control)
    }

    /// The roles that grant this rule, for refusal messages.
    pub fn roles(self) -> &'static str {
        match self {
            Self::Anonymous => "none",
            Self::Read | Self::Keda | Self::Reflection => "any role",
            Self::Cordon => "cordon or control",
            Self::Drain => "drain or control",
            Self::Control => "control",
        }
    }
}

/// Every RPC the agent (and the aggregator) serves, by method path. A service listed with `*`
/// covers all its methods. An RPC added to a proto without a line here fails
/// `every_served_rpc_has_a_rule`, and at runtime falls to [`Rule::Control`].
const RULES: &[(&str, Rule)] = &[
    ("/nodekeeper.v1.NodeAgent/GetNode", Rule::Read),
    ("/nodekeeper.v1.NodeAgent/GetMetrics", Rule::Read),
    ("/nodekeeper.v1.NodeAgent/WatchMetrics", Rule::Read),
    ("/nodekeeper.v1.NodeAgent/GetDrain", Rule::Read),
    ("/nodekeeper.v1.NodeAgent/Cordon", Rule::Cordon),
    ("/nodekeeper.v1.NodeAgent/Uncordon", Rule::Cordon),
    ("/nodekeeper.v1.NodeAgent/Drain", Rule::Drain),
    ("/nodekeeper.v1.NodeAgent/CancelDrain", Rule::Drain),
    ("/nodekeeper.v1.Aggregator/GetFleet", Rule::Read),
    ("/externalscaler.ExternalScaler/IsActive", Rule::Keda),
    ("/externalscaler.ExternalScaler/StreamIsActive", Rule::Keda),
    ("/externalscaler.ExternalScaler/GetMetricSpec", Rule::Keda),
    ("/externalscaler.ExternalScaler/GetMetrics", Rule::Keda),
    (
        "/externalscaler.ExternalScaler/StreamMetricSpec",
        Rule::Keda,
    ),
    ("/grpc.health.v1.Health/Check", Rule::Anonymous),
    ("/grpc.health.v1.Health/Watch", Rule::Anonymous),
    // Newer tonic-health also serves List; harmless and read-only.
    ("/grpc.health.v1.Health/List", Rule::Anonymous),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Rule::Reflection,
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Rule::Reflection,
    ),
];

/// The rule of `path` (`/package.Service/Method`); exact match only.
pub fn rule_for(path: &str) -> Rule {
    RULES
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(Rule::Control, |(_, r)| *r)
}

// === principals ===

/// Who made an accepted call: the name recorded in Events, the drain annotation and the audit
/// log, and the roles its credential carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `anonymous`, `token:control`, `token:read`, or `cert:<name>`.
    pub name: String,
    pub roles: Vec<Role>,
}

impl Principal {
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            roles: Vec::new(),
        }
    }

    pub fn control_token() -> Self {
        Self {
            name: "token:control".into(),
            roles: vec![Role::Control],
        }
    }

    pub fn read_token() -> Self {
        Self {
            name: "token:read".into(),
            roles: vec![Role::Read],
        }
    }

    pub fn certificate(name: &str, roles: Vec<Role>) -> Self {
        Self {
            name: format!("cert:{name}"),
            roles,
        }
    }

    /// The agent itself (an IMDS notice), for drains nobody called.
    pub fn agent(source: &str) -> Self {
        Self {
            name: format!("agent:{source}"),
            roles: vec![Role::Control],
        }
    }

    pub fn may(&self, rule: Rule) -> bool {
        rule == Rule::Anonymous || self.roles.iter().any(|r| r.grants(rule))
    }

    pub fn role_names(&self) -> Vec<&'static str> {
        self.roles.iter().map(|r| r.name()).collect()
    }
}

// === rate limit ===

/// Mutating calls one principal may make in a burst: an orchestrator cordons, drains and
/// re-attaches a handful of times per node; 20 leaves room for retries.
pub const DEFAULT_MUTATING_BURST: u32 = 20;
/// Sustained mutating calls per principal per minute after the burst: one every two seconds
/// is far above any real rotation and far below what would hammer the API server.
pub const DEFAULT_MUTATING_PER_MINUTE: u32 = 30;
/// Principals tracked at once; past it the fullest buckets (idle principals) are forgotten.
/// Principals are credentials the operator issued, so this is never reached in practice.
const MAX_TRACKED_PRINCIPALS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RateLimitConfig {
    /// Mutating calls a principal may make at once.
    pub burst: u32,
    /// Mutating calls a principal may make per minute once its burst is spent.
    pub per_minute: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            burst: DEFAULT_MUTATING_BURST,
            per_minute: DEFAULT_MUTATING_PER_MINUTE,
        }
    }
}

impl RateLimitConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.burst == 0 {
            out.push((
                "api.auth.rateLimit.burst".into(),
                "must be at least 1 (0 would refuse every mutating call)".into(),
            ));
        }
        if self.per_minute == 0 {
            out.push((
                "api.auth.rateLimit.perMinute".into(),
                "must be at least 1".into(),
            ));
        }
        out
    }
}

/// A token bucket per principal name.
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        Self {
            burst: f64::from(config.burst.max(1)),
            per_second: f64::from(config.per_minute.max(1)) / 60.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call from `principal`'s bucket; `Err(wait)` when it is empty.
    pub fn take(&self, principal: &str) -> Result<(), Duration> {
        self.take_at(principal, Instant::now())
    }

    fn take_at(&self, principal: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("not poisoned");
        if !buckets.contains_key(principal) && buckets.len() >= MAX_TRACKED_PRINCIPALS {
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, b| refilled(b, now, burst, rate) < burst);
        }
        let bucket = buckets.entry(principal.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = refilled(bucket, now, self.burst, self.per_second);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

fn refilled(b: &Bucket, now: Instant, burst: f64, per_second: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * per_second).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// Every method of every service in the descriptor sets the agent and aggregator serve.
    fn served_methods() -> Vec<String> {
        let sets = [
            crate::api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut out = Vec::new();
        for bytes in sets {
            let set = prost_types::FileDescriptorSet::decode(bytes).expect("descriptor set");
            for file in set.file {
                let package = file.package().to_string();
                for service in &file.service {
                    for method in &service.method {
                        out.push(format!("/{package}.{}/{}", service.name(), method.name()));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_served_rpc_has_a_rule() {
        let methods = served_methods();
        assert!(
            methods.len() >= 17,
            "descriptor sets look empty: {methods:?}"
        );
        // Reading the descriptors found the services the table names, so an RPC added to any
        // of them shows up here.
        for service in [
            "/nodekeeper.v1.NodeAgent/",
            "/externalscaler.ExternalScaler/",
            "/grpc.health.v1.Health/",
            "/grpc.reflection.v1.ServerReflection/",
        ] {
            assert!(
                methods.iter().any(|m| m.starts_with(service)),
                "{service} not in the descriptors"
            );
        }
        let missing: Vec<_> = methods
            .iter()
            .filter(|m| !RULES.iter().any(|(p, _)| p == m))
            .collect();
        assert!(
            missing.is_empty(),
            "RPCs without an authorization rule: {missing:?}"
        );
    }

    #[test]
    fn mutating_rpcs_need_their_role_and_unknown_ones_need_control() {
        let path = |m: &str| format!("/nodekeeper.v1.NodeAgent/{m}");
        for m in ["Cordon", "Uncordon"] {
            assert_eq!(rule_for(&path(m)), Rule::Cordon, "{m}");
        }
        for m in ["Drain", "CancelDrain"] {
            assert_eq!(rule_for(&path(m)), Rule::Drain, "{m}");
        }
        for m in ["GetNode", "GetMetrics", "WatchMetrics", "GetDrain"] {
            assert_eq!(rule_for(&path(m)), Rule::Read, "{m}");
        }
        // Prefix and lookalike guards: only exact paths have rules.
        for p in [
            "/nodekeeper.v1.NodeAgent/Reboot",
            "/nodekeeper.v1.NodeAgentAdmin/GetNode",
            "/nodekeeper.v1.NodeAgent/GetNodeAndReboot",
            "/externalscaler.ExternalScalerAdmin/GetMetrics",
            "/grpc.health.v1.Health/",
        ] {
            assert_eq!(rule_for(p), Rule::Control, "{p}");
            assert!(rule_for(p).is_mutating());
        }
        assert_eq!(rule_for("/grpc.health.v1.Health/Check"), Rule::Anonymous);
    }

    #[test]
    fn roles_grant_only_their_calls() {
        let read = Principal::read_token();
        assert!(read.may(Rule::Read) && read.may(Rule::Keda));
        assert!(!read.may(Rule::Cordon) && !read.may(Rule::Drain) && !read.may(Rule::Control));
        let cordon = Principal::certificate("ops", vec![Role::Cordon]);
        assert!(cordon.may(Rule::Cordon) && cordon.may(Rule::Read));
        assert!(!cordon.may(Rule::Drain));
        let drain = Principal::certificate("rotator", vec![Role::Drain]);
        assert!(drain.may(Rule::Drain) && !drain.may(Rule::Cordon));
        let control = Principal::control_token();
        for r in [Rule::Read, Rule::Cordon, Rule::Drain, Rule::Control] {
            assert!(control.may(r), "{r:?}");
        }
        assert!(!Principal::anonymous().may(Rule::Read));
        assert!(Principal::anonymous().may(Rule::Anonymous));
    }

    #[test]
    fn rate_limit_refuses_past_the_burst_per_principal_and_refills() {
        let limiter = RateLimiter::new(&RateLimitConfig {
            burst: 3,
            per_minute: 60,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take_at("cert:a", t0).unwrap();
        }
        let wait = limiter.take_at("cert:a", t0).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Another principal has its own bucket.
        limiter.take_at("cert:b", t0).unwrap();
        // One second refills one call at 60 per minute.
        limiter
            .take_at("cert:a", t0 + Duration::from_secs(1))
            .unwrap();
        assert!(
            limiter
                .take_at("cert:a", t0 + Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn rate_limit_forgets_idle_principals_when_full() {
        let limiter = RateLimiter::new(&RateLimitConfig {
            burst: 2,
            per_minute: 60,
        });
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_PRINCIPALS {
            limiter.take_at(&format!("cert:{i}"), t0).unwrap();
        }
        // All refilled a minute later: the table is trimmed instead of growing.
        limiter
            .take_at("cert:new", t0 + Duration::from_secs(60))
            .unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }
}
