//! The one way the agent runs a host program (mkfs, mount, blkid, iptables, nft...): no shell,
//! no inherited stdin, a deadline, a cap on what it may make us buffer, and a kill that reaches
//! every process it started.
//!
//! The program runs as the leader of its own process group, so a timeout kills the group
//! (`SIGKILL` to `-pgid`): a wrapper script's children die with it instead of holding our pipes
//! open. Output beyond the cap is read and dropped (the program is never blocked on a full pipe),
//! and `truncated` says so. Never retries and never interprets output: callers decide what an
//! exit status means.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Default cap per output stream: tool outputs the agent parses (`iptables-save` on a node with
/// many Services is the largest) stay well under it, and a runaway tool costs at most this much.
pub const DEFAULT_OUTPUT_CAP: usize = 16 << 20;

/// How much of stderr goes into an error message: the first lines say what went wrong.
const STDERR_IN_ERROR: usize = 4096;

/// Why a program could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program is not installed (spawn found no such file).
    #[error("{program} is not installed")]
    NotFound { program: String },
    /// It ran and exited non-zero (or was killed by a signal).
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    /// It did not finish within its timeout; it and its process group were killed.
    #[error("`{command}` did not finish within {after:?} (killed)")]
    Timeout { command: String, after: Duration },
    /// Starting or talking to it failed for another reason.
    #[error("`{command}`: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
}

impl ExecError {
    /// The program (or command line) the error is about.
    pub fn command(&self) -> &str {
        match self {
            Self::NotFound { program } => program,
            Self::Failed { command, .. }
            | Self::Timeout { command, .. }
            | Self::Io { command, .. } => command,
        }
    }
}

/// What a finished program left.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, as errors name it.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Either stream passed the cap; the rest was dropped.
    pub truncated: bool,
}

impl Output {
    /// Stdout when the program exited 0, else [`ExecError::Failed`] with status and stderr.
    pub fn success(self) -> Result<String, ExecError> {
        if self.status.success() {
            return Ok(self.stdout);
        }
        let mut stderr = self.stderr.trim().to_string();
        if stderr.len() > STDERR_IN_ERROR {
            let mut end = STDERR_IN_ERROR;
            while !stderr.is_char_boundary(end) {
                end -= 1;
            }
            stderr.truncate(end);
            stderr.push_str("...");
        }
        Err(ExecError::Failed {
            command: self.command,
            status: self.status.to_string(),
            stderr,
        })
    }
}

/// One program to run: `Exec::new("mount", TIMEOUT).args([..]).run()`.
#[derive(Debug, Clone)]
pub struct Exec {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    output_cap: usize,
}

impl Exec {
    /// `program` is looked up in `$PATH` unless it is a path. `timeout` is the caller's named
    /// constant: every host tool call has one.
    pub fn new(program: impl AsRef<OsStr>, timeout: Duration) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            timeout,
            output_cap: DEFAULT_OUTPUT_CAP,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Bytes written to the program's stdin (otherwise stdin is /dev/null, so a tool can never
    /// wait on a prompt).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Most bytes kept from stdout and from stderr each.
    pub fn output_cap(mut self, bytes: usize) -> Self {
        self.output_cap = bytes;
        self
    }

    /// The command line, for logs and errors.
    pub fn command_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs it to completion on this thread (blocking). A non-zero exit is an `Ok` output:
    /// see [`Output::success`].
    pub fn run(self) -> Result<Output, ExecError> {
        let command = self.command_line();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so the timeout kill reaches its children too.
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ExecError::NotFound {
                program: self.program.to_string_lossy().into_owned(),
            },
            _ => ExecError::Io {
                command: command.clone(),
                source: e,
            },
        })?;
        let pgid = Pid::from_raw(child.id() as i32);
        let deadline = Instant::now() + self.timeout;

        // Writer and readers on their own threads: a program that fills one pipe while we wait
        // on another never deadlocks, and a cap never stops the program mid-write.
        if let (Some(bytes), Some(mut pipe)) = (self.stdin, child.stdin.take()) {
            std::thread::spawn(move || {
                // EPIPE when the program exits without reading: not our error to report.
                let _ = pipe.write_all(&bytes);
            });
        }
        let (tx, rx) = mpsc::channel::<(Stream, Vec<u8>, bool)>();
        let cap = self.output_cap;
        if let Some(pipe) = child.stdout.take() {
            spawn_reader(Stream::Out, pipe, cap, tx.clone());
        }
        if let Some(pipe) = child.stderr.take() {
            spawn_reader(Stream::Err, pipe, cap, tx.clone());
        }
        drop(tx);
        let (status_tx, status_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = status_tx.send(child.wait());
        });

        // Both pipes must close (every holder of them gone) and the program must exit, all
        // before the deadline; whatever is left then is killed as a group.
        let (mut stdout, mut stderr, mut truncated) = (Vec::new(), Vec::new(), false);
        let mut streams_open = 2;
        let mut status = None;
        let timed_out = loop {
            if streams_open == 0 && status.is_some() {
                break false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break true;
            }
            if status.is_none() {
                match status_rx.recv_timeout(if streams_open == 0 {
                    left
                } else {
                    left.min(Duration::from_millis(10))
                }) {
                    Ok(s) => status = Some(s),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break true,
                }
            }
            if streams_open > 0 {
                let wait = if status.is_some() {
                    left
                } else {
                    Duration::from_millis(10)
                };
                match rx.recv_timeout(wait) {
                    Ok((stream, bytes, cut)) => {
                        truncated |= cut;
                        match stream {
                            Stream::Out => stdout = bytes,
                            Stream::Err => stderr = bytes,
                        }
                        streams_open -= 1;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => streams_open = 0,
                }
            }
        };
        if timed_out {
            // The group is ours while its leader is unreaped or any member lives; ESRCH when
            // everyone is gone already is fine.
            let _ = killpg(pgid, Signal::SIGKILL);
            if status.is_none() {
                let _ = status_rx.recv();
            }
            tracing::warn!(%command, after = ?self.timeout, "host program timed out; killed its process group");
            return Err(ExecError::Timeout {
                command,
                after: self.timeout,
            });
        }
        let status = status
            .expect("loop ends with a status")
            .map_err(|source| ExecError::Io {
                command: command.clone(),
                source,
            })?;
        Ok(Output {
            command,
            status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            truncated,
        })
    }

    /// [`run`](Self::run) on tokio's blocking pool, for async callers.
    pub async fn run_async(self) -> Result<Output, ExecError> {
        let command = self.command_line();
        tokio::task::spawn_blocking(move || self.run())
            .await
            .map_err(|e| ExecError::Io {
                command,
                source: std::io::Error::other(e),
            })?
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Out,
    Err,
}

/// Reads `pipe` to its end, keeping the first `cap` bytes; sends them (and whether more came)
/// when the pipe closes.
fn spawn_reader(
    stream: Stream,
    mut pipe: impl Read + Send + 'static,
    cap: usize,
    tx: mpsc::Sender<(Stream, Vec<u8>, bool)>,
) {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut truncated = false;
        let mut buf = [0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = cap.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    truncated |= n > room;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send((stream, kept, truncated));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> Exec {
        Exec::new("sh", timeout).args(["-c", script])
    }

    fn alive(pid: i32) -> bool {
        // A zombie still has a /proc entry; count only processes that still run.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                let state = s.rsplit(") ").next().and_then(|r| r.chars().next());
                state.is_some_and(|c| c != 'Z' && c != 'X')
            })
            .unwrap_or(false)
    }

    #[test]
    fn stdout_status_and_stdin() {
        let out = Exec::new("cat", Duration::from_secs(10))
            .stdin("hello")
            .run()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, "hello");
        assert!(!out.truncated);
        let env = sh("printf %s \"$NK_X\"", Duration::from_secs(10))
            .env("NK_X", "y")
            .run()
            .unwrap();
        assert_eq!(env.success().unwrap(), "y");
    }

    #[test]
    fn failure_names_the_command_status_and_stderr() {
        let e = sh("echo broken disk >&2; exit 3", Duration::from_secs(10))
            .run()
            .unwrap()
            .success()
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ExecError::Failed { .. }), "{e:?}");
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("broken disk"), "{text}");
    }

    #[test]
    fn a_missing_program_is_named() {
        let e = Exec::new("nodekeeper-no-such-tool", Duration::from_secs(10))
            .arg("-x")
            .run()
            .unwrap_err();
        assert!(matches!(e, ExecError::NotFound { .. }), "{e:?}");
        assert_eq!(e.to_string(), "nodekeeper-no-such-tool is not installed");
    }

    #[test]
    fn a_program_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        // The child sleeps in the background (holding our pipes), the parent in the foreground.
        let script = format!(
            "sleep 60 & echo $! > {p}; echo $$ >> {p}; sleep 60",
            p = pids.display()
        );
        let started = Instant::now();
        let e = sh(&script, Duration::from_millis(500)).run().unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("did not finish within 500ms"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "did not wait for sleep 60"
        );
        let pids: Vec<i32> = std::fs::read_to_string(&pids)
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 2);
        // SIGKILL is delivered before kill returns, but the grandchild's exit is asynchronous.
        let gone = (0..200).any(|_| {
            if pids.iter().all(|p| !alive(*p)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
            false
        });
        assert!(gone, "still running: {pids:?}");
    }

    #[test]
    fn a_huge_stdout_is_capped_and_the_program_still_finishes() {
        // 8 MiB of output against a 64 KiB cap: kept bytes stop at the cap, the program is not
        // blocked on a full pipe, and the output says it was cut.
        let out = sh(
            "head -c 8388608 /dev/zero; echo done >&2",
            Duration::from_secs(60),
        )
        .output_cap(64 * 1024)
        .run()
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), 64 * 1024);
        assert!(out.truncated);
        assert_eq!(out.stderr, "done\n");
    }

    #[tokio::test]
    async fn async_callers_get_the_same_runner() {
        let out = Exec::new("echo", Duration::from_secs(10))
            .arg("hi")
            .run_async()
            .await
            .unwrap();
        assert_eq!(out.success().unwrap(), "hi\n");
    }
}
