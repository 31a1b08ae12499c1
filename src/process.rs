//! The one subprocess wrapper. Every terraform call goes through [`run`].
//!
//! A child gets exactly the environment it is given (never the daemon's own), a null stdin,
//! an explicit working directory and its own process group. Its output is captured with a size
//! bound, or stdout is streamed to a file created with mode 0600 (plans can hold secrets).
//! When it outlives its timeout it first gets SIGINT, so terraform can save state and release
//! its lock; after a grace period the whole group gets SIGKILL, because providers are
//! grandchildren. A run whose future is dropped kills the group too, so no process outlives
//! the run that started it.
//!
//! Environment values are never displayed: they carry credentials.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Output kept per stream; terraform's errors are at the end, so the tail is kept.
pub const DEFAULT_OUTPUT_LIMIT: usize = 4 * 1024 * 1024;

/// One command to run. Build with [`ProcessSpec::new`] and the setters.
#[derive(Clone)]
pub struct ProcessSpec {
    program: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
    /// The child's complete environment.
    env: BTreeMap<String, String>,
    timeout: Duration,
    /// Time between SIGINT and SIGKILL.
    grace: Duration,
    stdout_file: Option<PathBuf>,
    output_limit: usize,
}

impl ProcessSpec {
    pub fn new(program: impl Into<PathBuf>, cwd: impl Into<PathBuf>) -> ProcessSpec {
        ProcessSpec {
            program: program.into(),
            args: Vec::new(),
            cwd: cwd.into(),
            env: BTreeMap::new(),
            timeout: Duration::from_secs(30 * 60),
            grace: Duration::from_secs(30),
            stdout_file: None,
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> ProcessSpec {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> ProcessSpec {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Replaces the child's whole environment.
    pub fn env(mut self, env: BTreeMap<String, String>) -> ProcessSpec {
        self.env = env;
        self
    }

    pub fn timeout(mut self, timeout: Duration, grace: Duration) -> ProcessSpec {
        self.timeout = timeout;
        self.grace = grace;
        self
    }

    /// Streams stdout into `path` (created or truncated, mode 0600) instead of capturing it.
    pub fn stdout_to(mut self, path: impl Into<PathBuf>) -> ProcessSpec {
        self.stdout_file = Some(path.into());
        self
    }

    pub fn output_limit(mut self, bytes: usize) -> ProcessSpec {
        self.output_limit = bytes;
        self
    }

    pub fn program(&self) -> &Path {
        &self.program
    }
}

/// The command as a shell line, with the names (never the values) of its environment.
impl fmt::Display for ProcessSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program.display())?;
        for arg in &self.args {
            write!(f, " {}", arg.to_string_lossy())?;
        }
        write!(f, " (in {})", self.cwd.display())
    }
}

impl fmt::Debug for ProcessSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessSpec")
            .field("command", &self.to_string())
            .field("env_names", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// How a finished process ended and what it printed.
#[derive(Debug, Clone)]
pub struct ProcessOutput {
    /// `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl ProcessOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {command}: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("{command} ran longer than {timeout:?} and was interrupted{}", if *.killed { ", then killed" } else { "" })]
    TimedOut {
        command: String,
        timeout: Duration,
        /// Whether SIGINT was not enough and the group got SIGKILL.
        killed: bool,
        /// What the process printed before it was stopped.
        output: Box<ProcessOutput>,
    },
    #[error("{command}: {source}")]
    Io { command: String, source: io::Error },
}

/// Runs `spec` to completion or timeout. A non-zero exit is not an error here: the caller
/// knows what the program's exit codes mean.
pub async fn run(spec: &ProcessSpec) -> Result<ProcessOutput, ProcessError> {
    let command_line = spec.to_string();
    let io_error = |source| ProcessError::Io {
        command: command_line.clone(),
        source,
    };
    let stdout = match &spec.stdout_file {
        Some(path) => Stdio::from(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(io_error)?,
        ),
        None => Stdio::piped(),
    };
    let mut child = Command::new(&spec.program)
        .args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            command: command_line.clone(),
            source,
        })?;
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    // From here on, the group dies with this future, however it ends.
    let _group = GroupGuard(pid);
    let started = Instant::now();
    let stdout_task = child
        .stdout
        .take()
        .map(|pipe| tokio::spawn(read_bounded(pipe, spec.output_limit)));
    let stderr_task = child
        .stderr
        .take()
        .map(|pipe| tokio::spawn(read_bounded(pipe, spec.output_limit)));

    let (status, timed_out, killed) = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(status) => (status.map_err(io_error)?, false, false),
        Err(_) => {
            if let Some(pid) = pid {
                let _ = kill(pid, Signal::SIGINT);
            }
            match tokio::time::timeout(spec.grace, child.wait()).await {
                Ok(status) => (status.map_err(io_error)?, true, false),
                Err(_) => {
                    if let Some(pid) = pid {
                        let _ = killpg(pid, Signal::SIGKILL);
                    }
                    (child.wait().await.map_err(io_error)?, true, true)
                }
            }
        }
    };
    // The leader is gone; stragglers it left in its group (providers, forked children) go too,
    // which also closes the pipes they may hold open.
    if let Some(pid) = pid {
        let _ = killpg(pid, Signal::SIGKILL);
    }
    let collect = |task: Option<tokio::task::JoinHandle<io::Result<String>>>| async move {
        match task {
            Some(task) => task.await.map_err(io::Error::other).and_then(|r| r),
            None => Ok(String::new()),
        }
    };
    let output = ProcessOutput {
        code: status.code(),
        stdout: collect(stdout_task).await.map_err(io_error)?,
        stderr: collect(stderr_task).await.map_err(io_error)?,
        elapsed: started.elapsed(),
    };
    tracing::debug!(command = %command_line, elapsed = ?output.elapsed, code = ?output.code, timed_out, "process finished");
    if timed_out {
        return Err(ProcessError::TimedOut {
            command: command_line,
            timeout: spec.timeout,
            killed,
            output: Box::new(output),
        });
    }
    Ok(output)
}

/// Kills the process group when dropped; harmless when the group is already gone.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

/// Reads a stream to its end, keeping at most the last `limit` bytes.
async fn read_bounded(mut stream: impl AsyncRead + Unpin, limit: usize) -> io::Result<String> {
    let mut kept: Vec<u8> = Vec::new();
    let mut dropped = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        kept.extend_from_slice(&chunk[..read]);
        if kept.len() > limit.saturating_mul(2) {
            let cut = kept.len() - limit;
            kept.drain(..cut);
            dropped = true;
        }
    }
    if kept.len() > limit {
        let cut = kept.len() - limit;
        kept.drain(..cut);
        dropped = true;
    }
    let mut text = String::from_utf8_lossy(&kept).into_owned();
    if dropped {
        text.insert_str(0, "[earlier output dropped]\n");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, cwd: &Path) -> ProcessSpec {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), "/usr/bin:/bin".to_string());
        ProcessSpec::new("/bin/sh", cwd)
            .arg("-c")
            .arg(script)
            .env(env)
    }

    fn alive(pid: i32) -> bool {
        // A zombie no longer runs; in a container nobody may reap it.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn the_child_sees_only_the_environment_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            std::env::var_os("HOME").is_some(),
            "the test runner has a HOME"
        );
        let output = run(&sh("env; pwd; cat", dir.path())).await.unwrap();
        assert!(output.success());
        assert!(!output.stdout.contains("HOME="), "{}", output.stdout);
        assert!(output.stdout.contains("PATH=/usr/bin:/bin"));
        assert!(
            output
                .stdout
                .contains(&dir.path().canonicalize().unwrap().display().to_string())
        );
    }

    #[tokio::test]
    async fn exit_codes_and_both_streams_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let output = run(&sh("echo out; echo err >&2; exit 2", dir.path()))
            .await
            .unwrap();
        assert_eq!(output.code, Some(2));
        assert_eq!(output.stdout, "out\n");
        assert_eq!(output.stderr, "err\n");
    }

    #[tokio::test]
    async fn output_is_bounded_to_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spec = sh("seq 1 100000", dir.path()).output_limit(1000);
        let output = run(&spec).await.unwrap();
        assert!(output.stdout.starts_with("[earlier output dropped]\n"));
        assert!(output.stdout.ends_with("99999\n100000\n"));
        assert!(output.stdout.len() < 1100);
    }

    #[tokio::test]
    async fn stdout_can_go_to_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plan.json");
        let output = run(&sh("echo '{}'", dir.path()).stdout_to(&file))
            .await
            .unwrap();
        assert_eq!(output.stdout, "");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "{}\n");
        let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_timeout_sends_sigint_first() {
        let dir = tempfile::tempdir().unwrap();
        let spec = sh(
            "trap 'echo interrupted; exit 3' INT; sleep 300 & wait",
            dir.path(),
        )
        .timeout(Duration::from_millis(300), Duration::from_secs(10));
        let started = Instant::now();
        let error = run(&spec).await.unwrap_err();
        let ProcessError::TimedOut { killed, output, .. } = error else {
            panic!("expected a timeout, got {error}");
        };
        assert!(!killed, "SIGINT alone should have ended it");
        assert_eq!(output.stdout, "interrupted\n");
        assert_eq!(output.code, Some(3));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_process_ignoring_sigint_is_killed_with_its_forked_child() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let script = format!(
            "trap '' INT; sleep 300 & echo $! > {}; wait; wait",
            pid_file.display()
        );
        let spec =
            sh(&script, dir.path()).timeout(Duration::from_millis(500), Duration::from_millis(500));
        let started = Instant::now();
        let error = run(&spec).await.unwrap_err();
        assert!(
            matches!(error, ProcessError::TimedOut { killed: true, .. }),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let child: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild got the group's SIGKILL too.
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive(child) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(child), "forked child {child} survived the timeout");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = run(&ProcessSpec::new("/nonexistent/terraform", dir.path()))
            .await
            .unwrap_err();
        assert!(matches!(error, ProcessError::Spawn { .. }), "{error}");
        assert!(
            error
                .to_string()
                .starts_with("cannot start /nonexistent/terraform")
        );
    }
}
