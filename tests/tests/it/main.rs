//! The integration tests of nodekeeper, in one test binary (issue #21): one module per area,
//! each once its own `tests/tests/<area>.rs` binary. 64 binaries each linked the whole dependency
//! graph (~55 MB each, ~3.5 GB per build) and cost a link each; this one links once
//! (docs/benchmarks.md, "Integration tests: one binary").
//!
//! Run one area with `cargo test -p nodekeeper-tests --test it <area>::` (e.g. `dns_node::`).
//! A filter is a substring: `auth::` also matches `aggregate_auth::`; add `--skip aggregate_auth`
//! or name the test.
//!
//! Tests from different areas run side by side now (2 at a time on a 2-core machine, as tests of
//! one file always did). What that changes: the process is shared, so nothing here sets
//! environment variables, the working directory, the umask or signal dispositions; names of
//! host-wide things (network namespaces, cgroups) carry the process id *and* a per-test tag or
//! counter. `dns_cache_memory`'s counting allocator is the binary's global allocator and counts
//! per thread, so other tests' allocations do not enter its measurement.

mod support {
    pub mod aggregate;
    pub mod census_pods;
    pub mod rotation;
}

mod adversary_issue15;
mod adversary_issue16;
mod adversary_issue18;
mod adversary_issue18b;
mod adversary_issue18c;
mod adversary_issue18d;
mod adversary_issue18e;
mod adversary_issue18f;
mod adversary_issue18g;
mod adversary_issue19;
mod adversary_issue19b;
mod adversary_issue20;
mod adversary_issue20b;
mod adversary_issue20c;
mod adversary_issue20d;
mod adversary_issue22;
mod aggregate;
mod aggregate_auth;
mod aggregate_tls;
mod auth;
mod bench_connections_smoke;
mod bench_disks_smoke;
mod bench_dns_smoke;
mod bench_drain_smoke;
mod bench_smoke;
mod build_tooling;
mod capabilities;
mod config_cli;
mod connected;
mod connections;
mod disks_adversarial;
mod disks_inspect;
mod disks_prepare;
mod disks_publish;
mod dns;
mod dns_cache_memory;
mod dns_cache_rss;
mod dns_differential;
mod dns_edges;
mod dns_handover;
mod dns_kube_dns;
mod dns_miss_allocations;
mod dns_node;
mod dns_upstream;
mod drain;
mod drain_cli;
mod drain_rotation_faults;
mod drain_skip_wait;
mod drain_two_agents;
mod drain_wire;
mod eviction_conformance;
mod fake_api;
mod fake_apiserver_bin;
mod fake_disruption;
mod fake_rbac;
mod fleet_lock;
mod flood;
mod flood_dns_silent_upstream;
mod flood_health_watch;
mod grpc_python;
mod grpc_rust;
mod host_paths;
mod image;
mod imds;
mod keda;
mod manifests;
mod metrics_peers;
mod monitoring;
mod overlays;
mod rotation;
mod sysctl;
mod tls_reload;
