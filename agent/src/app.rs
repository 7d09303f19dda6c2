//! Builds the agent from a validated `Config` and runs it until SIGTERM/SIGINT.
//!
//! The one place where capabilities are wired together: it creates the health registry, the
//! Prometheus registry, the shared snapshot cache, binds the listeners (so a port in use fails
//! the start instead of a background task), and hands each capability to the supervisor.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::api::{self, AgentIdentity, NodeAgentService};
use crate::config::Config;
use crate::http::{self, AdminState};
use crate::metrics::exposition::SnapshotCollector;
use crate::metrics::{CollectMetrics, ResourceCollector, SnapshotCache};
use crate::pb::HealthState;
use crate::runtime::{Health, Supervisor};
use crate::sysctl::apply::{OriginalsStore, SysctlFs};
use crate::sysctl::{ConfigSource, Reconciler, SysctlMetrics};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("NODEKEEPER_REVISION");

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Sysctl(#[from] crate::sysctl::apply::ApplyError),
    #[error(transparent)]
    DnsUpstream(#[from] crate::dns::upstream::UpstreamError),
}

/// The health entry that is STARTING until the API server first answered (connected mode).
pub const KUBERNETES: &str = "kubernetes";

/// Sets the DNS cluster group's servers from `service`'s ClusterIP, asking until the API server
/// answers (jittered backoff): the first answer decides; a Service that is missing, headless or
/// the cache's own address leaves cluster zones failing, with a log line saying why.
async fn learn_cluster_upstream(
    client: kube::Client,
    service: String,
    own_ips: Vec<std::net::IpAddr>,
    forwarder: Arc<crate::dns::upstream::Forwarder>,
    token: tokio_util::sync::CancellationToken,
    answered: impl FnOnce(),
) {
    let mut wait = LEARN_FIRST_WAIT;
    loop {
        let asked = tokio::select! {
            _ = token.cancelled() => return,
            r = crate::kube::service_cluster_ip(&client, &service) => r,
        };
        match asked {
            Ok(Some(ip)) if own_ips.contains(&ip) => tracing::error!(
                %service, %ip,
                "the cluster upstream Service's ClusterIP is one the cache holds itself (transparent mode): it would query itself; cluster zones will fail until dns.upstreams.clusterService names a second Service"
            ),
            Ok(Some(ip)) => {
                tracing::info!(%service, %ip, "dns cluster upstream from its Service");
                forwarder.set_cluster_servers(vec![std::net::SocketAddr::new(ip, 53)]);
            }
            Ok(None) => tracing::warn!(
                %service,
                "dns cluster upstream Service not found (or headless); cluster zones will fail"
            ),
            Err(e) => {
                tracing::warn!(error = %e, ?wait, "dns cluster upstream Service unreadable; cluster zones fail until it is read; retrying");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(LEARN_MAX_WAIT);
                continue;
            }
        }
        answered();
        return;
    }
}

/// The health entry that is STARTING until the DNS upstreams held in the API (the cluster
/// Service, the kube-dns ConfigMap) were read once: the cache serves by config before that, but
/// the pod is not Ready while cluster zones would still SERVFAIL.
pub const DNS_UPSTREAMS: &str = "dns-upstreams";

/// A health entry that turns SERVING once `n` one-time reads are done (none: never created).
#[derive(Debug, Clone)]
struct ReadOnceLatch {
    health: Health,
    name: &'static str,
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl ReadOnceLatch {
    fn new(health: &Health, name: &'static str, n: usize) -> Self {
        if n > 0 {
            health.set(name, HealthState::Starting, "waiting for the API server");
        }
        Self {
            health: health.clone(),
            name,
            pending: Arc::new(std::sync::atomic::AtomicUsize::new(n)),
        }
    }

    /// One read done; call once per read.
    fn done(&self) {
        if self
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.health.set(self.name, HealthState::Serving, "");
        }
    }
}

/// First retry of an unanswered Service lookup; doubles up to [`LEARN_MAX_WAIT`]: cluster
/// zones fail meanwhile, so ask again soon, but a down API server is not hammered.
const LEARN_FIRST_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
const LEARN_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Exports each capability's health as `nodekeeper_capability_state{capability,state} 1`.
#[derive(Debug)]
struct HealthCollector(Health);

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "capability_state",
            "1 for each capability's current state (SERVING, STARTING, FAILED...)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (name, h) in self.0.snapshot() {
            let state = h
                .state
                .as_str_name()
                .trim_start_matches("HEALTH_STATE_")
                .to_lowercase();
            let labels = [("capability", name.to_string()), ("state", state)];
            metric.encode_family(&labels)?.encode_gauge(&1i64)?;
        }
        Ok(())
    }
}

/// Runs the agent; returns when it has shut down. `config_file` is re-read by capabilities that
/// follow ConfigMap updates (sysctl).
pub async fn run(config: Config, config_file: Option<std::path::PathBuf>) -> Result<(), AppError> {
    let started_at = SystemTime::now();
    let health = Health::default();
    let mut supervisor = Supervisor::new(health.clone());
    let node_name = crate::kube::node_name(&config)?;
    let kube = crate::kube::connect(config.kubernetes.mode).await?;
    if let Some(client) = kube.clone() {
        // Not ready until the API server has answered once; nothing else waits for it.
        let h = health.clone();
        supervisor.spawn(KUBERNETES, move |token| async move {
            if let Some(version) = crate::kube::first_answer(&client, &token).await {
                h.set(
                    KUBERNETES,
                    HealthState::Serving,
                    format!("API server {version}"),
                );
                token.cancelled().await;
            }
            Ok(())
        });
    }

    let mut registry = Registry::with_prefix("nodekeeper");
    registry.register(
        "build",
        "Agent version and revision",
        Info::new(vec![
            ("version", VERSION.to_string()),
            ("revision", REVISION.to_string()),
        ]),
    );
    registry.register_collector(Box::new(HealthCollector(health.clone())));

    // One watch of this Node, shared by the capabilities that need its labels or UID.
    let node_watch = kube
        .clone()
        .map(|client| crate::kube::watch_node(client, node_name.clone(), supervisor.token()));
    // One watch of this node's pods, shared by every capability that needs pod identities.
    let pod_view = crate::kube::WatchHealth::default();
    let deleted_pods = crate::kube::DeletedPods::default();
    let pod_watch = kube.clone().map(|client| {
        crate::kube::watch_pods(
            client,
            node_name.clone(),
            supervisor.token(),
            pod_view.clone(),
            deleted_pods.clone(),
        )
    });

    let snapshots = if config.metrics.enabled {
        let collect_metrics = CollectMetrics::register(&mut registry);
        let mut collector = ResourceCollector::new(
            config.host_paths.clone(),
            node_name.clone(),
            &config.metrics,
        );
        if let Some((store, _)) = &pod_watch {
            collector =
                collector.with_pod_store(store.clone(), pod_view.clone(), deleted_pods.clone());
        }
        if let Some(census) = collector.census_metrics() {
            census.register(&mut registry);
        }
        let cache = Arc::new(SnapshotCache::new(
            collector,
            config.metrics.max_snapshot_age.get(),
            collect_metrics,
        ));
        registry.register_collector(Box::new(SnapshotCollector(cache.clone())));
        Some(cache)
    } else {
        health.set("metrics", HealthState::Disabled, "metrics.enabled: false");
        None
    };

    // A state file we cannot read degrades its own capability, never the agent (issue #15):
    // DNS and metrics keep serving, health and the log say why, nothing is applied without it.
    let sysctl_store = if config.sysctl.enabled {
        match OriginalsStore::load(
            Some(crate::sysctl::Target::new(&config, None).host_journal()),
            crate::sysctl::apply::Owner::Daemon,
        ) {
            Ok(store) => Some(store),
            Err(e) => {
                tracing::error!(error = %e, "sysctl off until its state file is repaired or removed; the rest of the agent serves");
                health.set(
                    crate::sysctl::CAPABILITY,
                    HealthState::Degraded,
                    e.to_string(),
                );
                None
            }
        }
    } else {
        health.set(
            crate::sysctl::CAPABILITY,
            HealthState::Disabled,
            "sysctl.enabled: false",
        );
        None
    };
    let sysctl_status = if let Some(store) = sysctl_store {
        let status = crate::sysctl::SharedStatus::default();
        let reconciler = Reconciler::new(
            SysctlFs::new(&config.host_paths.proc),
            store,
            SysctlMetrics::register(&mut registry),
            status.clone(),
        );
        let source = match &config_file {
            Some(path) => ConfigSource::File(path.clone()),
            None => ConfigSource::Fixed(Box::new(config.sysctl.clone())),
        };
        let node = kube.clone().map(|client| crate::sysctl::NodeBinding {
            info: node_watch
                .clone()
                .expect("a node watch exists when connected"),
            client,
            name: node_name.clone(),
        });
        let h = health.clone();
        let pods = pod_watch
            .as_ref()
            .map(|(store, changed)| crate::sysctl::PodBinding {
                store: store.clone(),
                changed: changed.clone(),
                host: config.host_paths.clone(),
            });
        supervisor.spawn(crate::sysctl::CAPABILITY, move |token| {
            crate::sysctl::run(source, reconciler, node, pods, h, token)
        });
        Some(status)
    } else {
        None
    };

    // Read by the PV publisher (connected mode) and the API: what is prepared, what was lost.
    let disks_status = if config.disks.enabled {
        let status = crate::disks::prepare::SharedDisksStatus::default();
        let metrics = crate::disks::prepare::DisksMetrics::register(&mut registry);
        let disk_ops = Arc::new(tokio::sync::Mutex::new(()));
        let task = crate::disks::prepare::DisksTask {
            cfg: config.disks.clone(),
            paths: config.host_paths.clone(),
            state_dir: config.state_dir.clone(),
            metrics: metrics.clone(),
            status: status.clone(),
            disk_ops: disk_ops.clone(),
        };
        let h = health.clone();
        supervisor.spawn(crate::disks::CAPABILITY, move |token| {
            crate::disks::prepare::run(task, h, token)
        });
        if let Some(client) = &kube {
            let publisher = crate::disks::publish::Publisher {
                client: client.clone(),
                node: node_name.clone(),
                node_info: node_watch
                    .clone()
                    .expect("a node watch exists when connected"),
                cfg: config.disks.clone(),
                paths: config.host_paths.clone(),
                state_dir: config.state_dir.clone(),
                status: status.clone(),
                disk_ops,
                metrics,
                health: health.clone(),
            };
            let h = health.clone();
            supervisor.spawn("disks-publisher", move |token| async move {
                h.set("disks-publisher", HealthState::Serving, "");
                publisher.run(token).await
            });
        }
        Some(status)
    } else {
        health.set(
            crate::disks::CAPABILITY,
            HealthState::Disabled,
            "disks.enabled: false",
        );
        None
    };

    let dns_handle = if config.dns.enabled {
        let dns_config = config.dns.clone();
        let forwarder =
            crate::dns::upstream::Forwarder::new(&dns_config, &config.host_paths, &mut registry)?;
        // What the API says about upstreams is learnt in the background: the listeners must not
        // wait for an API server that may be down (issue #15). Until it answers, cluster zones
        // SERVFAIL (no cluster servers) and forwarding follows dns.upstreams alone.
        if let Some(client) = &kube {
            let ask_service = dns_config.upstreams.cluster.servers.is_empty();
            let watch_config_map = !dns_config.upstreams.kube_dns_config_map.is_empty();
            let latch = ReadOnceLatch::new(
                &health,
                DNS_UPSTREAMS,
                usize::from(ask_service) + usize::from(watch_config_map),
            );
            if ask_service {
                let latch = latch.clone();
                tokio::spawn(learn_cluster_upstream(
                    client.clone(),
                    dns_config.upstreams.cluster_service.clone(),
                    dns_config.cluster_ips.clone(),
                    forwarder.clone(),
                    supervisor.token().child_token(),
                    move || latch.done(),
                ));
            }
            if watch_config_map {
                // The watch's first list applies the ConfigMap; every change after it too.
                let fwd = forwarder.clone();
                let first = std::sync::atomic::AtomicBool::new(true);
                tokio::spawn(crate::dns::kube_dns::watch(
                    client.clone(),
                    dns_config.upstreams.kube_dns_config_map.clone(),
                    None,
                    move |data| {
                        if let Err(e) = fwd.apply_kube_dns(data) {
                            // Someone else's object in kube-system must not stop the agent:
                            // the previous forwarding stays until it is fixed.
                            tracing::warn!(error = %e, "kube-dns ConfigMap change refused; the previous forwarding stays");
                        }
                        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            latch.done();
                        }
                    },
                    supervisor.token().child_token(),
                ));
            }
        }
        // Strangers in the SO_REUSEPORT group (issue #15): checked as often as the wiring.
        tokio::spawn(crate::dns::strangers::watch(
            config.host_paths.proc.clone(),
            dns_config.listen_addrs(),
            crate::dns::strangers::StrangerMetrics::register(&mut registry),
            kube.clone().map(|client| (client, node_name.clone())),
            dns_config.node.check_interval.get(),
            supervisor.token().child_token(),
        ));
        let metrics = crate::dns::metrics::DnsMetrics::register(&mut registry);
        let server =
            crate::dns::server::DnsServer::new(dns_config.clone(), forwarder.clone(), metrics);
        let wiring: Option<Arc<dyn crate::dns::Wiring>> = Some(Arc::new(
            crate::dns::node::NodeWiring::new(&dns_config, &mut registry),
        ));
        let capability =
            crate::dns::DnsCapability::new(dns_config, server, Some(forwarder.clone()), wiring);
        let handle = capability.handle.clone();
        tokio::spawn(forwarder.run_probes(supervisor.token().child_token()));
        let h = health.clone();
        supervisor.spawn(crate::dns::CAPABILITY, move |token| async move {
            capability.run(h, token).await?;
            Ok(())
        });
        Some(handle)
    } else {
        health.set(
            crate::dns::CAPABILITY,
            HealthState::Disabled,
            "dns.enabled: false",
        );
        None
    };

    let drain = match (&kube, config.drain.enabled) {
        (Some(client), true) => {
            let controller = crate::drain::engine::DrainController::new(
                client.clone(),
                node_name.clone(),
                config.drain.clone(),
                crate::drain::DrainMetrics::register(&mut registry),
                pod_watch.clone(),
                supervisor.token(),
            );
            if let Some(node) = &node_watch {
                registry
                    .register_collector(Box::new(crate::drain::NodeStateCollector(node.clone())));
            }
            let (c, h) = (controller.clone(), health.clone());
            let drain_config = config.drain.clone();
            supervisor.spawn(crate::drain::CAPABILITY, move |token| async move {
                // A drain persisted by an earlier incarnation of this agent continues now. The
                // API server may be down as we start: retry with backoff until it answers, so
                // the drain is not abandoned (issue #15).
                let mut wait = drain_config.retry_initial.get();
                while let Err(e) = c.resume().await {
                    tracing::warn!(error = %e, ?wait, "could not read the node's drain state; retrying");
                    tokio::select! {
                        _ = token.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(drain_config.retry_max.get());
                }
                h.set(crate::drain::CAPABILITY, HealthState::Serving, "");
                // A rotation in progress carries on: the node's return after its reboot.
                let maintenance = c.maintenance();
                let returning = maintenance.run(h.clone(), token.clone());
                let notices = async move {
                    if drain_config.imds.enabled {
                        // EC2 spot and maintenance notices start drains (after resume, so a
                        // notice's drain persisted before a restart is re-attached).
                        let timeout = drain_config.default_timeout.get();
                        crate::drain::imds::run(c, drain_config.imds, timeout, token.clone())
                            .await;
                    } else {
                        token.cancelled().await;
                    }
                };
                tokio::join!(returning, notices);
                Ok(())
            });
            Some(controller)
        }
        (None, _) => {
            health.set(
                crate::drain::CAPABILITY,
                HealthState::Disabled,
                "standalone: no Kubernetes API",
            );
            None
        }
        (_, false) => {
            health.set(
                crate::drain::CAPABILITY,
                HealthState::Disabled,
                "drain.enabled: false",
            );
            None
        }
    };

    // Bind before spawning: a port in use is a start failure, not a background one.
    let http_listener = http::bind(config.metrics.listen.0).await?;
    let api_listener = if config.api.enabled {
        Some(api::bind(config.api.listen.0).await?)
    } else {
        None
    };
    tracing::info!(
        node = %node_name,
        metrics = %http_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        api = %api_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        kubernetes = kube.is_some(),
        "nodekeeper starting"
    );

    if let Some(cache) = snapshots.clone() {
        let h = health.clone();
        supervisor.spawn("metrics", move |token| async move {
            // One collection up front proves the host paths are readable before reporting ready.
            let snap = cache.get().await;
            let detail = if snap.unavailable.is_empty() {
                String::new()
            } else {
                format!("unavailable sources: {}", snap.unavailable.join(", "))
            };
            h.set("metrics", HealthState::Serving, detail);
            token.cancelled().await;
            Ok(())
        });
    }

    // Read before spawning: a wrong certificate or token path is a start failure.
    let auth = match &api_listener {
        Some(_) => Some(
            api::auth::ServerAuth::load(&config.api.auth, &mut registry)
                .map_err(api::ApiError::from)?,
        ),
        None => None,
    };
    let admin = AdminState {
        registry: Arc::new(registry),
        snapshots: snapshots.clone(),
        health: health.clone(),
    };
    let h = health.clone();
    supervisor.spawn("http", move |token| async move {
        h.set("http", HealthState::Serving, "");
        http::serve(http_listener, admin, token).await?;
        Ok(())
    });

    if let (Some(listener), Some(auth)) = (api_listener, auth) {
        let identity = AgentIdentity {
            node_name: node_name.clone(),
            version: VERSION.to_string(),
            revision: REVISION.to_string(),
            kubernetes_connected: kube.is_some(),
            started_at,
        };
        let h = health.clone();
        let api_config = config.api.clone();
        supervisor.spawn("api", move |token| async move {
            let capabilities = api::Capabilities {
                snapshots,
                sysctl: sysctl_status,
                drain,
                disks: disks_status,
                dns: dns_handle,
                node: node_watch.clone(),
            };
            let service = NodeAgentService::new(
                identity,
                h.clone(),
                capabilities,
                &api_config,
                token.clone(),
            );
            h.set("api", HealthState::Serving, "");
            api::serve(listener, service, h, auth, token).await?;
            Ok(())
        });
    }

    let stuck = supervisor
        .run_until_signal(config.shutdown_timeout.get())
        .await;
    if stuck.is_empty() {
        tracing::info!("nodekeeper stopped");
    }
    Ok(())
}
