//! EC2 notices: polls the instance metadata service (IMDSv2) for a spot interruption
//! (`spot/instance-action`) and scheduled maintenance (`events/maintenance/scheduled`) and
//! starts a drain through `DrainController::start` with the notice's deadline.
//!
//! Deadline rule (see `deadline`): the notice's time minus a safety margin (spot: the
//! interruption `time` minus `SPOT_MARGIN`; maintenance: `NotBefore` minus
//! `MAINTENANCE_MARGIN`), but never later than `drain.defaultTimeout` from now and never sooner
//! than `MIN_WINDOW` from now. Drain ids are `imds-spot-<time>` and `imds-<EventId>`: a notice
//! seen again re-attaches to its drain instead of starting another, and the poller never starts
//! the same id twice.
//!
//! A scheduled-maintenance event is drained from `NotBefore - maintenanceLeadTime`, not when it
//! is first seen. A spot notice skips the fleet lock and cancels a running drain that is not a
//! spot drain (issue #20): the instance is gone in two minutes.
//!
//! Never talks to anything but the configured endpoint, always with the IMDSv2 session token,
//! never acts on completed or canceled maintenance events; only a spot notice cancels a drain
//! someone else started.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::engine::{DrainController, DrainParams};
use super::{DrainError, is_terminal};
use crate::config::ConfigDuration;
use crate::pb;

/// The link-local IMDS address on every EC2 instance.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// A spot notice comes two minutes ahead; polling every 5 s loses at most 5 s of them.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// IMDS answers in milliseconds; two seconds means it is not there (not on EC2, hop limit).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The session token's lifetime we ask for (IMDSv2's maximum, six hours).
pub const TOKEN_TTL: Duration = Duration::from_secs(21600);
/// Renew the token this long before it expires.
const TOKEN_SLACK: Duration = Duration::from_secs(60);
/// The spot `time` is when the instance is stopped or terminated: keep 15 s for the kubelet to
/// finish pod terminations and the OS to shut down.
pub const SPOT_MARGIN: Duration = Duration::from_secs(15);
/// Maintenance may begin at `NotBefore`: be done ten minutes earlier.
pub const MAINTENANCE_MARGIN: Duration = Duration::from_secs(600);
/// However late the notice, the drain gets at least this long (evictions are still worth it).
pub const MIN_WINDOW: Duration = Duration::from_secs(10);
/// A scheduled event is drained for this long before its `NotBefore` (issue #20: not at once,
/// weeks ahead, leaving the node cordoned): two hours cover a default one-hour drain.
pub const DEFAULT_MAINTENANCE_LEAD_TIME: Duration = Duration::from_secs(2 * 3600);
/// How long a spot notice waits for the drain it preempts to stop.
const PREEMPT_WAIT: Duration = Duration::from_secs(5);
/// IMDS documents are small; anything bigger is not IMDS.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ImdsConfig {
    /// Poll IMDS and drain on spot interruptions and scheduled maintenance (EC2 only).
    pub enabled: bool,
    /// IMDS base URL (`http://` only, as IMDS is).
    pub endpoint: String,
    /// How often both notices are polled.
    pub interval: ConfigDuration,
    /// A scheduled-maintenance event's drain starts this long before its `NotBefore`.
    pub maintenance_lead_time: ConfigDuration,
}

impl Default for ImdsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            interval: ConfigDuration(DEFAULT_INTERVAL),
            maintenance_lead_time: ConfigDuration(DEFAULT_MAINTENANCE_LEAD_TIME),
        }
    }
}

impl ImdsConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match self.endpoint.parse::<http::Uri>() {
            Ok(u)
                if u.scheme_str() == Some("http")
                    && u.host().is_some()
                    && u.path_and_query().is_none_or(|p| p.as_str() == "/") => {}
            _ => out.push((
                "drain.imds.endpoint".into(),
                format!(
                    "{:?} is not an http:// base URL (scheme, host, optional port, no path)",
                    self.endpoint
                ),
            )),
        }
        let i = self.interval.get();
        if i < Duration::from_millis(100) || i > Duration::from_secs(300) {
            out.push((
                "drain.imds.interval".into(),
                format!("{} is out of range (100ms..=5m)", self.interval),
            ));
        }
        // At least the margin plus some evictions: a drain started later gets only MIN_WINDOW.
        let lead = self.maintenance_lead_time.get();
        if lead < Duration::from_secs(15 * 60) || lead > Duration::from_secs(30 * 86400) {
            out.push((
                "drain.imds.maintenanceLeadTime".into(),
                format!("{} is out of range (15m..=30d)", self.maintenance_lead_time),
            ));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    /// Connecting or talking to IMDS failed.
    #[error("IMDS {0}: {1}")]
    Http(&'static str, String),
    /// IMDS did not answer within `CALL_TIMEOUT`.
    #[error("IMDS {0}: no answer within {CALL_TIMEOUT:?}")]
    Timeout(&'static str),
    /// An unexpected status (a 401 means the token expired early).
    #[error("IMDS {0}: HTTP {1}")]
    Status(&'static str, u16),
    /// A document that does not parse.
    #[error("IMDS {0}: {1}")]
    Parse(&'static str, String),
}

impl ImdsError {
    /// Low-cardinality label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ImdsError::Http(..) => "http",
            ImdsError::Timeout(_) => "timeout",
            ImdsError::Status(..) => "status",
            ImdsError::Parse(..) => "parse",
        }
    }
}

// === notices ===

/// A notice that should drain this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub id: String,
    pub reason: String,
    /// When the disruption may begin (spot `time`, maintenance `NotBefore`).
    pub at: SystemTime,
    pub margin: Duration,
    /// A scheduled-maintenance event (drained from `at - lead time`), not a spot notice (at once).
    pub scheduled: bool,
}

impl Notice {
    /// When its drain may start: a spot notice at once, a scheduled event `lead` before `at`.
    pub fn drain_from(&self, lead: Duration) -> SystemTime {
        if self.scheduled {
            self.at.checked_sub(lead).unwrap_or(SystemTime::UNIX_EPOCH)
        } else {
            SystemTime::UNIX_EPOCH
        }
    }
}

#[derive(Debug, Deserialize)]
struct SpotAction {
    action: String,
    time: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScheduledEvent {
    code: String,
    not_before: String,
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    description: String,
}

fn timestamp_to_system(t: k8s_openapi::jiff::Timestamp) -> SystemTime {
    SystemTime::from(t)
}

/// `{"action":"terminate","time":"2026-11-23T12:00:00Z"}`
pub fn parse_spot(body: &str) -> Result<Notice, String> {
    let a: SpotAction = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let t: k8s_openapi::jiff::Timestamp = a
        .time
        .parse()
        .map_err(|e| format!("time {:?}: {e}", a.time))?;
    Ok(Notice {
        id: format!("imds-spot-{}", a.time),
        reason: format!("EC2 spot interruption: {} at {}", a.action, a.time),
        at: timestamp_to_system(t),
        margin: SPOT_MARGIN,
        scheduled: false,
    })
}

/// A JSON list of `{"Code","NotBefore":"21 Jan 2019 09:00:43 GMT","NotAfter","EventId","State"}`;
/// only active events count (completed and canceled ones stay listed for a while).
pub fn parse_scheduled(body: &str) -> Result<Vec<Notice>, String> {
    let events: Vec<ScheduledEvent> = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for e in events {
        let done = !e.state.is_empty() && e.state != "active";
        if done
            || e.description.starts_with("[Completed]")
            || e.description.starts_with("[Canceled]")
        {
            continue;
        }
        let at =
            k8s_openapi::jiff::civil::DateTime::strptime("%d %b %Y %H:%M:%S GMT", &e.not_before)
                .and_then(|dt| dt.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC))
                .map_err(|err| format!("NotBefore {:?}: {err}", e.not_before))?;
        let event_id = if e.event_id.is_empty() {
            format!("{}-{}", e.code, at.timestamp().as_second())
        } else {
            e.event_id.clone()
        };
        out.push(Notice {
            id: format!("imds-{event_id}"),
            reason: format!(
                "EC2 scheduled maintenance {} ({event_id}) not before {}",
                e.code, e.not_before
            ),
            at: timestamp_to_system(at.timestamp()),
            margin: MAINTENANCE_MARGIN,
            scheduled: true,
        });
    }
    Ok(out)
}

/// The drain's deadline for a notice: `at - margin`, capped at `now + default_timeout`, and at
/// least `now + MIN_WINDOW`.
pub fn deadline(notice: &Notice, now: SystemTime, default_timeout: Duration) -> SystemTime {
    let by_notice = notice.at.checked_sub(notice.margin).unwrap_or(now);
    by_notice.min(now + default_timeout).max(now + MIN_WINDOW)
}

// === the IMDSv2 client ===

/// IMDSv2: one session token (PUT), then GETs carrying it.
pub struct Imds {
    client: Client<HttpConnector, Empty<Bytes>>,
    endpoint: String,
    token: Option<(String, Instant)>,
}

impl Imds {
    pub fn new(endpoint: &str) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        Self {
            client,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: None,
        }
    }

    async fn send(
        &self,
        what: &'static str,
        req: http::Request<Empty<Bytes>>,
    ) -> Result<(u16, String), ImdsError> {
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ImdsError::Http(what, e.to_string()))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ImdsError::Http(what, e.to_string()))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| ImdsError::Timeout(what))?
    }

    async fn token(&mut self) -> Result<String, ImdsError> {
        if let Some((t, expires)) = &self.token
            && Instant::now() + TOKEN_SLACK < *expires
        {
            return Ok(t.clone());
        }
        let req = http::Request::put(format!("{}/latest/api/token", self.endpoint))
            .header(
                "X-aws-ec2-metadata-token-ttl-seconds",
                TOKEN_TTL.as_secs().to_string(),
            )
            .body(Empty::new())
            .map_err(|e| ImdsError::Http("PUT token", e.to_string()))?;
        let (status, body) = self.send("PUT token", req).await?;
        if status != 200 || body.trim().is_empty() {
            return Err(ImdsError::Status("PUT token", status));
        }
        let token = body.trim().to_string();
        self.token = Some((token.clone(), Instant::now() + TOKEN_TTL));
        Ok(token)
    }

    /// GET `path` with the session token: `Some(body)` on 200, `None` on 404.
    async fn get(&mut self, what: &'static str, path: &str) -> Result<Option<String>, ImdsError> {
        let token = self.token().await?;
        let req = http::Request::get(format!("{}{path}", self.endpoint))
            .header("X-aws-ec2-metadata-token", token)
            .body(Empty::new())
            .map_err(|e| ImdsError::Http(what, e.to_string()))?;
        match self.send(what, req).await? {
            (200, body) => Ok(Some(body)),
            (404, _) => Ok(None),
            (401, _) => {
                // The token expired or IMDS restarted: a new one next time.
                self.token = None;
                Err(ImdsError::Status(what, 401))
            }
            (status, _) => Err(ImdsError::Status(what, status)),
        }
    }

    /// Every current notice: the spot interruption first, then active maintenance events.
    pub async fn notices(&mut self) -> Result<Vec<Notice>, ImdsError> {
        let mut out = Vec::new();
        const SPOT: &str = "GET spot/instance-action";
        if let Some(body) = self
            .get(SPOT, "/latest/meta-data/spot/instance-action")
            .await?
        {
            out.push(parse_spot(&body).map_err(|e| ImdsError::Parse(SPOT, e))?);
        }
        const EVENTS: &str = "GET events/maintenance/scheduled";
        if let Some(body) = self
            .get(EVENTS, "/latest/meta-data/events/maintenance/scheduled")
            .await?
            && !body.trim().is_empty()
        {
            out.extend(parse_scheduled(&body).map_err(|e| ImdsError::Parse(EVENTS, e))?);
        }
        Ok(out)
    }
}

// === the poller ===

/// Polls until `token` is cancelled, starting a drain for each new notice.
pub async fn run(
    controller: Arc<DrainController>,
    config: ImdsConfig,
    default_timeout: Duration,
    token: CancellationToken,
) {
    let mut imds = Imds::new(&config.endpoint);
    let mut ticker = tokio::time::interval(config.interval.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Ids this poller already acted on (started, re-attached or refused): never twice.
    let mut handled: HashSet<String> = HashSet::new();
    let mut deferred: HashSet<String> = HashSet::new();
    let mut failing = false;
    // Scheduled events seen before their lead time, logged once each.
    let mut scheduled: HashSet<String> = HashSet::new();
    let lead = config.maintenance_lead_time.get();
    tracing::info!(endpoint = %config.endpoint, interval = %config.interval, "polling IMDS for spot and maintenance notices");
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let notices = match imds.notices().await {
            Ok(n) => {
                if failing {
                    tracing::info!("IMDS answers again");
                    failing = false;
                }
                n
            }
            Err(e) => {
                // Logged once per outage: off EC2 (or with a hop limit of 1 in a pod) every poll fails.
                if !failing {
                    tracing::warn!(error = %e, kind = e.label(), "IMDS poll failed; retrying every interval");
                    failing = true;
                }
                continue;
            }
        };
        for notice in notices {
            if handled.contains(&notice.id) {
                continue;
            }
            let from = notice.drain_from(lead);
            if SystemTime::now() < from {
                if scheduled.insert(notice.id.clone()) {
                    tracing::info!(id = %notice.id, reason = %notice.reason, drain_from = ?from, "EC2 notice: scheduled; draining at its lead time (drain.imds.maintenanceLeadTime)");
                }
                continue;
            }
            // A notice that arrives while another drain runs is retried every poll until that
            // drain ends (then its own drain starts), rather than dropped.
            let first_try = !deferred.contains(&notice.id);
            if start(&controller, &notice, default_timeout, first_try).await {
                handled.insert(notice.id.clone());
            } else {
                deferred.insert(notice.id.clone());
            }
        }
    }
}

/// Starts the notice's drain; false when another drain runs (try again next poll). A spot
/// notice skips the fleet lock and preempts (cancels) a running drain that is not a spot drain:
/// the instance is gone in two minutes whatever the rotation had planned.
async fn start(
    controller: &Arc<DrainController>,
    notice: &Notice,
    default_timeout: Duration,
    log_conflict: bool,
) -> bool {
    let now = SystemTime::now();
    let until = deadline(notice, now, default_timeout);
    let timeout = until.duration_since(now).unwrap_or(MIN_WINDOW);
    let req = pb::DrainRequest {
        id: notice.id.clone(),
        reason: notice.reason.clone(),
        requester: "imds".into(),
        timeout: prost_types::Duration::try_from(timeout).ok(),
        // The instance is going away or rebooting underneath these pods either way: evicting
        // them is strictly better than losing them with the node.
        evict_unreplicated: true,
        delete_emptydir_data: true,
        ..Default::default()
    };
    let spot = !notice.scheduled;
    let params = match controller.params(&req) {
        Ok(p) => DrainParams {
            bypass_fleet_lock: spot,
            ..p.by("agent:imds")
        },
        Err(e) => {
            tracing::error!(id = %notice.id, error = %e, "EC2 notice: could not start a drain");
            return true;
        }
    };
    let mut result = controller.claim_and_start(params.clone()).await;
    if spot
        && matches!(result, Err(DrainError::Conflict(_)))
        && let Some(running) = controller.current().filter(|r| !r.finished())
        && !running.id.starts_with("imds-spot-")
    {
        tracing::warn!(id = %notice.id, preempted = %running.id, "EC2 spot interruption: cancelling the running drain to drain for the interruption");
        let _ = controller.cancel(&running.id).await;
        let ended = async {
            while !running.finished() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout(PREEMPT_WAIT, ended).await;
        result = controller.claim_and_start(params).await;
    }
    match result {
        Ok(run) if run.id == notice.id && !is_terminal(run.status().phase()) => {
            tracing::warn!(id = %notice.id, reason = %notice.reason, deadline = ?until, "EC2 notice: draining");
            true
        }
        Ok(run) => {
            tracing::info!(id = %run.id, "EC2 notice: its drain already ran");
            true
        }
        Err(DrainError::Conflict(m)) => {
            if log_conflict {
                tracing::warn!(id = %notice.id, "EC2 notice while another drain runs; starting it when that one ends: {m}");
            }
            false
        }
        Err(e) => {
            tracing::error!(id = %notice.id, error = %e, "EC2 notice: could not start a drain");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_spot_notice_and_its_id() {
        let n = parse_spot(r#"{"action":"terminate","time":"2026-11-23T12:00:00Z"}"#).unwrap();
        assert_eq!(n.id, "imds-spot-2026-11-23T12:00:00Z");
        assert_eq!(
            n.at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_435_200)
        );
        assert!(n.reason.contains("terminate"), "{}", n.reason);
    }

    #[test]
    fn parses_active_maintenance_events_only() {
        let body = r#"[
          {"Code":"system-reboot","Description":"scheduled reboot","EventId":"instance-event-0d59937288b749b32",
           "NotBefore":"21 Jan 2019 09:00:43 GMT","NotAfter":"21 Jan 2019 09:17:23 GMT","State":"active"},
          {"Code":"instance-stop","Description":"[Completed] stop","EventId":"instance-event-1",
           "NotBefore":"20 Jan 2019 09:00:00 GMT","NotAfter":"20 Jan 2019 10:00:00 GMT","State":"completed"},
          {"Code":"instance-reboot","Description":"[Canceled] reboot","EventId":"instance-event-2",
           "NotBefore":"22 Jan 2019 09:00:00 GMT","State":"canceled"}
        ]"#;
        let n = parse_scheduled(body).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].id, "imds-instance-event-0d59937288b749b32");
        assert_eq!(
            n[0].at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_548_061_243)
        );
        assert!(parse_scheduled("[]").unwrap().is_empty());
        assert!(parse_scheduled(r#"[{"Code":"x","NotBefore":"yesterday"}]"#).is_err());
    }

    #[test]
    fn deadline_is_the_notice_minus_the_margin_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        let notice = |in_s: u64, margin: Duration| Notice {
            id: "x".into(),
            reason: String::new(),
            at: now + Duration::from_secs(in_s),
            margin,
            scheduled: margin == MAINTENANCE_MARGIN,
        };
        // A spot notice two minutes out: 105 s.
        assert_eq!(
            deadline(&notice(120, SPOT_MARGIN), now, hour),
            now + Duration::from_secs(105)
        );
        // Maintenance in three days: the default timeout is shorter.
        assert_eq!(
            deadline(&notice(3 * 86400, MAINTENANCE_MARGIN), now, hour),
            now + hour
        );
        // Drained from two hours before a scheduled event; a spot notice at once.
        assert_eq!(
            notice(3 * 86400, MAINTENANCE_MARGIN).drain_from(2 * hour),
            now + Duration::from_secs(3 * 86400) - 2 * hour
        );
        assert_eq!(
            notice(120, SPOT_MARGIN).drain_from(2 * hour),
            SystemTime::UNIX_EPOCH
        );
        // Seen late: still a minimal window.
        assert_eq!(
            deadline(&notice(5, SPOT_MARGIN), now, hour),
            now + MIN_WINDOW
        );
    }

    #[test]
    fn config_problems_name_their_fields() {
        assert!(ImdsConfig::default().problems().is_empty());
        let bad = ImdsConfig {
            enabled: true,
            endpoint: "https://169.254.169.254/latest".into(),
            interval: ConfigDuration(Duration::from_millis(10)),
            maintenance_lead_time: ConfigDuration(Duration::from_secs(31 * 86400)),
        };
        let fields: Vec<String> = bad.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "drain.imds.endpoint",
                "drain.imds.interval",
                "drain.imds.maintenanceLeadTime"
            ]
        );
    }
}
