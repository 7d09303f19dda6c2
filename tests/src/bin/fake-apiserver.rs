//! fake-apiserver: the tests' fake Kubernetes API server (`nodekeeper_tests::fake_api`, see
//! docs/fake-api-server.md) as a program, so anyone can try a drain locally with `kubectl` and the
//! agent in connected mode. Serves plain HTTP on a loopback port until SIGINT/SIGTERM.
//!
//! Usage: fake-apiserver --kubeconfig FILE [--seed rotation|empty] [--fault SPEC]...
//!                       [--pdb-lag MS] [--grace-second MS]
//!   --kubeconfig FILE  where to write the kubeconfig (server, dummy token) for kubectl/the agent
//!   --seed rotation    node-a with the 60-pod rotation scenario (tests/src/drain_scenario.rs);
//!                      `empty` (the default) has node-a and node-other only
//!   --fault SPEC       METHOD:PATH-SUBSTRING:KIND[:TIMES], KIND one of 429 (with Retry-After 1),
//!                      503, 504, 410, drop (a watch ends after 1 s); e.g. POST:/eviction:429:3
//!   --pdb-lag MS       disruption controller lag (default 100)
//!   --grace-second MS  length of one grace-period second (default 1000)
//! GET /fake/audit answers the PDB audit: {"samples": N, "violations": [...]}.

use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nodekeeper_tests::drain_scenario;
use nodekeeper_tests::fake_api::{FakeApi, Fault, FaultKind};

fn usage(why: &str) -> ExitCode {
    eprintln!("fake-apiserver: {why}");
    eprintln!(
        "usage: fake-apiserver --kubeconfig FILE [--seed rotation|empty] [--fault METHOD:PATH:KIND[:TIMES]]... [--pdb-lag MS] [--grace-second MS]"
    );
    ExitCode::from(64)
}

fn fault(spec: &str) -> Result<Fault, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (method, path, kind, times) = match parts.as_slice() {
        [m, p, k] => (*m, *p, *k, 1),
        [m, p, k, t] => (
            *m,
            *p,
            *k,
            t.parse::<u32>()
                .map_err(|_| format!("--fault {spec}: TIMES must be a number"))?,
        ),
        _ => return Err(format!("--fault {spec}: want METHOD:PATH:KIND[:TIMES]")),
    };
    let (kind, watch) = match kind {
        "429" => (
            FaultKind::TooManyRequests {
                retry_after_seconds: 1,
            },
            Some(false),
        ),
        "503" => (FaultKind::Unavailable, Some(false)),
        "504" => (FaultKind::GatewayTimeout, Some(false)),
        "410" => (FaultKind::Expired, Some(true)),
        "drop" => (
            FaultKind::DropWatchAfter(Duration::from_secs(1)),
            Some(true),
        ),
        other => return Err(format!("--fault {spec}: unknown kind {other:?}")),
    };
    let mut f = Fault::on(method, path, kind).times(times);
    if let Some(w) = watch {
        f = f.watch(w);
    }
    Ok(f)
}

fn main() -> ExitCode {
    let mut kubeconfig = None;
    let mut seed = "empty".to_string();
    let mut faults = Vec::new();
    let mut pdb_lag = 100u64;
    let mut grace_second = 1000u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--kubeconfig" => kubeconfig = Some(value("--kubeconfig")?),
                "--seed" => seed = value("--seed")?,
                "--fault" => faults.push(fault(&value("--fault")?)?),
                "--pdb-lag" => {
                    pdb_lag = value("--pdb-lag")?
                        .parse()
                        .map_err(|_| "--pdb-lag: milliseconds".to_string())?
                }
                "--grace-second" => {
                    grace_second = value("--grace-second")?
                        .parse()
                        .map_err(|_| "--grace-second: milliseconds".to_string())?
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            return usage(&e);
        }
    }
    let Some(kubeconfig) = kubeconfig else {
        return usage("--kubeconfig is required");
    };
    // Block the termination signals before any thread starts, then wait for one here.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("fake-apiserver: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    let builder = FakeApi::builder()
        .pdb_lag(Duration::from_millis(pdb_lag))
        .grace_second(Duration::from_millis(grace_second));
    let api = match seed.as_str() {
        "rotation" => {
            drain_scenario::rotation_on(
                builder
                    .replace_delay(Duration::from_millis(200))
                    .ready_delay(Duration::from_millis(1000)),
                None,
            )
            .api
        }
        "empty" => {
            let api = builder.start();
            api.add_node(drain_scenario::NODE, &[]);
            api.add_node("node-other", &[]);
            api
        }
        other => return usage(&format!("unknown --seed {other:?}")),
    };
    for f in faults {
        api.inject(f);
    }
    api.write_kubeconfig(std::path::Path::new(&kubeconfig));
    eprintln!(
        "fake-apiserver: serving {} (kubeconfig {kubeconfig}, seed {seed}); SIGINT/SIGTERM stops it",
        api.url()
    );
    let _ = signals.wait();
    eprintln!("fake-apiserver: stopping");
    ExitCode::SUCCESS
}
