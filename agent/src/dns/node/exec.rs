//! Running the host's firewall tools (`iptables-save`, `iptables-restore`, `nft`) with a named
//! timeout, feeding a batch on stdin, through the shared runner `host::exec`. Owns nothing
//! else; never runs a shell.

use std::time::Duration;

use crate::host::exec::Exec;
pub use crate::host::exec::ExecError;

/// One firewall tool call. `iptables-restore` waits up to 5 s for the xtables lock (`-w 5`)
/// that kube-proxy may hold while it syncs; the rest is the commit on a node with many rules.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `program args...` through `host::exec`, writes `stdin` to it when given, returns its
/// stdout.
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
    let mut exec = Exec::new(program, TOOL_TIMEOUT).args(args);
    if let Some(text) = stdin {
        exec = exec.stdin(text);
    }
    exec.run_async().await?.success()
}

/// True when `program` is found and `program args` exits 0 (a probe; output ignored).
pub async fn works(program: &str, args: &[&str]) -> bool {
    run(program, args, None).await.is_ok()
}
