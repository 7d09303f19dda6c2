//! Running the host's firewall tools (`iptables-save`, `iptables-restore`, `nft`) with a named
//! timeout, feeding a batch on stdin. Owns nothing else; never runs a shell.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// One firewall tool call. `iptables-restore` waits up to 5 s for the xtables lock (`-w 5`)
/// that kube-proxy may hold while it syncs; the rest is the commit on a node with many rules.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tool call failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program is not installed (spawn found no such file).
    #[error("{program} is not installed")]
    NotFound { program: String },
    /// It ran and exited non-zero.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    /// It did not finish within [`TOOL_TIMEOUT`] (it is killed).
    #[error("`{command}` did not finish within {TOOL_TIMEOUT:?}")]
    Timeout { command: String },
    /// Spawning or talking to it failed for another reason.
    #[error("`{command}`: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
}

/// Runs `program args...`, writes `stdin` to it when given, returns its stdout.
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ExecError::NotFound {
            program: program.to_string(),
        },
        _ => ExecError::Io {
            command: command.clone(),
            source: e,
        },
    })?;
    let io = |source| ExecError::Io {
        command: command.clone(),
        source,
    };
    let work = async {
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await.map_err(io)?;
            drop(pipe);
        }
        child.wait_with_output().await.map_err(io)
    };
    let out = tokio::time::timeout(TOOL_TIMEOUT, work)
        .await
        .map_err(|_| ExecError::Timeout {
            command: command.clone(),
        })??;
    if !out.status.success() {
        return Err(ExecError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when `program` is found and `program args` exits 0 (a probe; output ignored).
pub async fn works(program: &str, args: &[&str]) -> bool {
    run(program, args, None).await.is_ok()
}
