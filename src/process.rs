//! The one subprocess wrapper. Every terraform call goes through [`run`].
//!
//! A child gets exactly the environment it is given (never the daemon's own), a null stdin,
//! an explicit working directory and its own process group. Its output goes to unnamed files,
//! never pipes (a child outliving its reader would die of SIGPIPE, terraform with its state
//! lock held), whose tail is kept; or stdout is streamed to a file created with mode 0600
//! (plans can hold secrets).
//! When it outlives its timeout it first gets SIGINT, so terraform can save state and release
//! its lock; after a grace period the whole group gets SIGKILL, because providers are
//! grandchildren. A run whose future is dropped kills the group too, so no process outlives
//! the run that started it.
//!
//! Stopping is the same whether the cause is the timeout or a [`CancellationToken`] (shutdown,
//! a superseding commit): SIGINT to terraform, the grace period, then SIGKILL to the group.
//! The leader's exit is watched through a pidfd without reaping it, so the group is signalled
//! only while its leader is still unreaped and the group id cannot belong to anyone else.
//!
//! Environment values are never displayed: they carry credentials.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::egress::EgressPolicy;
use crate::sandbox::SandboxPolicy;

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
    /// The Landlock policy the child is restricted to before exec; `None` runs it unsandboxed.
    sandbox: Option<SandboxPolicy>,
    /// The private network the child is moved into before exec; `None` leaves it the host's.
    egress: Option<EgressPolicy>,
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
            sandbox: None,
            egress: None,
        }
    }

    /// Runs the child inside a Landlock sandbox with this policy.
    pub fn sandbox(mut self, policy: SandboxPolicy) -> ProcessSpec {
        self.sandbox = Some(policy);
        self
    }

    /// Runs the child in a private network namespace that reaches only what `policy` allows.
    pub fn egress(mut self, policy: EgressPolicy) -> ProcessSpec {
        self.egress = Some(policy);
        self
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
    #[error("{command} was cancelled and interrupted{}", if *.killed { ", then killed" } else { "" })]
    Cancelled {
        command: String,
        killed: bool,
        output: Box<ProcessOutput>,
    },
    #[error("{command}: {source}")]
    Io { command: String, source: io::Error },
    #[error("{command}: {source}")]
    Sandbox {
        command: String,
        source: crate::sandbox::SandboxError,
    },
}

/// Why a process was stopped before it finished by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Cancelled,
}

/// Runs `spec` to completion, timeout or cancellation. A non-zero exit is not an error here:
/// the caller knows what the program's exit codes mean.
pub async fn run(
    spec: &ProcessSpec,
    cancel: &CancellationToken,
) -> Result<ProcessOutput, ProcessError> {
    let command_line = spec.to_string();
    let io_error = |source| ProcessError::Io {
        command: command_line.clone(),
        source,
    };
    // Output goes to files, never pipes: a child whose reader died (the daemon killed)
    // would die of SIGPIPE at its next line — terraform on the interrupt it then gets, with
    // its state lock still held. Unnamed files (deleted at once) unless stdout has a path.
    let captured = tempfile::tempfile().map_err(io_error)?;
    let errors = tempfile::tempfile().map_err(io_error)?;
    let stdout = match &spec.stdout_file {
        Some(path) => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io_error)?,
        None => captured.try_clone().map_err(io_error)?,
    };
    let stderr = errors.try_clone().map_err(io_error)?;
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true);
    // The namespaces come first: once Landlock is enforced, /proc/self cannot be written.
    let mut network = None;
    if let Some(policy) = &spec.egress {
        let (enter, receiver) = policy.prepare().map_err(io_error)?;
        command.envs(policy.proxy_variables());
        // SAFETY: `enter` makes system calls on buffers built before the fork; it takes no
        // lock and allocates nothing.
        unsafe {
            command.pre_exec(move || enter.enter());
        }
        network = Some(receiver);
    }
    if let Some(policy) = &spec.sandbox {
        let mut prepared =
            policy
                .prepare(&command_line)
                .map_err(|source| ProcessError::Sandbox {
                    command: command_line.clone(),
                    source,
                })?;
        // SAFETY: `enforce` makes two system calls (prctl, landlock_restrict_self) on a
        // ruleset built before the fork; it takes no lock and allocates nothing.
        unsafe {
            command.pre_exec(move || prepared.enforce());
        }
    }
    // Last, once the credentials are final (a change of them would clear it): if the daemon
    // dies (kill -9), terraform gets SIGTERM, which it takes as an interrupt:
    // it stops its providers, saves state and releases its lock instead of running on as an
    // orphan. Linux sends it when the forking *thread* exits; runs are spawned from the
    // runtime's worker threads, which live as long as the daemon.
    // SAFETY: getpid cannot fail.
    let parent = unsafe { nix::libc::getpid() };
    // SAFETY: two system calls (prctl, getppid); no lock, no allocation.
    unsafe {
        command.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before the signal was armed: do not start at all.
            if nix::libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
        command: match network {
            Some(_) => format!("{command_line} in a private network namespace"),
            None => command_line.clone(),
        },
        source,
    })?;
    // Served until this function returns; the child's connections die with it.
    let _network = network
        .map(|receiver| receiver.serve())
        .transpose()
        .map_err(io_error)?;
    let pid = child
        .id()
        .map(|id| Pid::from_raw(id as i32))
        .ok_or_else(|| io_error(io::Error::other("the child has no pid")))?;
    // From here on, the group dies with this future, however it ends.
    let mut group = GroupGuard(Some(pid));
    let exit = ExitWatch::open(pid).map_err(io_error)?;
    let started = Instant::now();

    let stop = tokio::select! {
        exited = exit.exited() => { exited.map_err(io_error)?; None }
        () = tokio::time::sleep(spec.timeout) => Some(Stop::TimedOut),
        () = cancel.cancelled() => Some(Stop::Cancelled),
    };
    let mut killed = false;
    if stop.is_some() {
        let _ = kill(pid, Signal::SIGINT);
        let graceful = tokio::time::timeout(spec.grace, exit.exited()).await;
        if !matches!(graceful, Ok(Ok(()))) {
            let _ = killpg(pid, Signal::SIGKILL);
            killed = true;
            exit.exited().await.map_err(io_error)?;
        }
    }
    // The leader has exited but is not reaped, so its pid still names this group: stragglers
    // it left (providers, forked children) die now, which also closes the pipes they hold.
    let _ = killpg(pid, Signal::SIGKILL);
    let status = child.wait().await.map_err(io_error)?;
    group.0 = None;
    // A process that left the group may still write: what is there now is the output.
    let limit = spec.output_limit;
    let stdout = match spec.stdout_file {
        Some(_) => String::new(),
        None => read_tail(captured, limit).map_err(io_error)?,
    };
    let output = ProcessOutput {
        code: status.code(),
        stdout,
        stderr: read_tail(errors, limit).map_err(io_error)?,
        elapsed: started.elapsed(),
    };
    tracing::debug!(command = %command_line, elapsed = ?output.elapsed, code = ?output.code, ?stop, "process finished");
    match stop {
        None => Ok(output),
        Some(Stop::TimedOut) => Err(ProcessError::TimedOut {
            command: command_line,
            timeout: spec.timeout,
            killed,
            output: Box::new(output),
        }),
        Some(Stop::Cancelled) => Err(ProcessError::Cancelled {
            command: command_line,
            killed,
            output: Box::new(output),
        }),
    }
}

/// Tells when a child has exited, without reaping it (a pidfd becomes readable at exit).
struct ExitWatch(AsyncFd<OwnedFd>);

impl ExitWatch {
    fn open(pid: Pid) -> io::Result<ExitWatch> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the registration owns the descriptor and drops it with itself; nothing
        // else closes it meanwhile.
        let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
        Ok(ExitWatch(registered.map_err(io::Error::from)?))
    }

    async fn exited(&self) -> io::Result<()> {
        // Readiness is left set: once exited, every later call returns at once.
        self.0.readable().await.map(|_| ())
    }
}

/// Kills the process group when dropped before its leader was reaped (a run whose future was
/// dropped). Cleared once the leader is reaped, so a reused pid is never signalled.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

/// Reads a stream to its end, keeping at most the last `limit` bytes.
/// The last `limit` bytes written to `file`, marked when earlier output was dropped.
fn read_tail(mut file: std::fs::File, limit: usize) -> io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let length = file.seek(SeekFrom::End(0))?;
    let limit = u64::try_from(limit).unwrap_or(u64::MAX);
    let dropped = length > limit;
    file.seek(SeekFrom::Start(length.saturating_sub(limit)))?;
    let mut kept = Vec::new();
    file.take(limit).read_to_end(&mut kept)?;
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

    fn never() -> CancellationToken {
        CancellationToken::new()
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
        let output = run(&sh("env; pwd; cat", dir.path()), &never())
            .await
            .unwrap();
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
        let output = run(&sh("echo out; echo err >&2; exit 2", dir.path()), &never())
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
        let output = run(&spec, &never()).await.unwrap();
        assert!(output.stdout.starts_with("[earlier output dropped]\n"));
        assert!(output.stdout.ends_with("99999\n100000\n"));
        assert!(output.stdout.len() < 1100);
    }

    #[tokio::test]
    async fn stdout_can_go_to_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plan.json");
        let output = run(&sh("echo '{}'", dir.path()).stdout_to(&file), &never())
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
        let error = run(&spec, &never()).await.unwrap_err();
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
        let error = run(&spec, &never()).await.unwrap_err();
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
        let error = run(
            &ProcessSpec::new("/nonexistent/terraform", dir.path()),
            &never(),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, ProcessError::Spawn { .. }), "{error}");
        assert!(
            error
                .to_string()
                .starts_with("cannot start /nonexistent/terraform")
        );
    }

    #[tokio::test]
    async fn cancelling_interrupts_first_then_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let spec = sh(
            "trap 'echo interrupted; exit 4' INT; sleep 300 & wait",
            dir.path(),
        )
        .timeout(Duration::from_secs(300), Duration::from_secs(10));
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let started = Instant::now();
        let error = run(&spec, &cancel).await.unwrap_err();
        let ProcessError::Cancelled { killed, output, .. } = error else {
            panic!("expected a cancellation, got {error}");
        };
        assert!(!killed, "SIGINT alone should have ended it");
        assert_eq!(output.stdout, "interrupted\n");
        assert_eq!(output.code, Some(4));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_process_that_leaves_the_group_does_not_hold_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("escaped.pid");
        // A new session is out of reach of the group kill, and it keeps stderr open.
        let script = format!(
            "setsid sleep 60 >/dev/null & echo $! > {}; sleep 0.5; exit 3",
            pid_file.display()
        );
        let started = Instant::now();
        let output = tokio::time::timeout(
            Duration::from_secs(20),
            run(&sh(&script, dir.path()), &never()),
        )
        .await
        .expect("the run waited for the escaped process")
        .unwrap();
        assert_eq!(output.code, Some(3));
        assert!(started.elapsed() < Duration::from_secs(10));
        let escaped = std::fs::read_to_string(&pid_file).unwrap();
        let _ = kill(
            Pid::from_raw(escaped.trim().parse().unwrap()),
            Signal::SIGKILL,
        );
    }

    #[tokio::test]
    async fn a_straggler_left_by_a_finished_leader_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("straggler.pid");
        // The leader exits at once; its child, detached from the pipes, would live on.
        let script = format!(
            "sleep 300 >/dev/null 2>&1 & echo $! > {}; exit 0",
            pid_file.display()
        );
        let output = run(&sh(&script, dir.path()), &never()).await.unwrap();
        assert!(output.success());
        let straggler: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive(straggler) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(straggler), "straggler {straggler} outlived its run");
    }

    #[tokio::test]
    async fn a_sandboxed_child_reads_only_what_its_policy_allows() {
        let allowed = tempfile::tempdir().unwrap();
        let secret = tempfile::tempdir().unwrap();
        std::fs::write(allowed.path().join("input"), "fingerprinted").unwrap();
        std::fs::write(
            secret.path().join("credentials"),
            "aws_secret_access_key=canary",
        )
        .unwrap();
        let policy = SandboxPolicy {
            read_only: vec![allowed.path().to_path_buf()],
            read_write: vec![],
        };
        let script = format!(
            "cat {}/input; cat {}/credentials",
            allowed.path().display(),
            secret.path().display()
        );
        let output = run(
            &sh(&script, allowed.path()).sandbox(policy.clone()),
            &never(),
        )
        .await
        .unwrap();
        assert_eq!(output.stdout, "fingerprinted");
        assert!(
            output.stderr.contains("Permission denied"),
            "{}",
            output.stderr
        );
        assert!(!output.success());

        // The same command outside the sandbox reads both, so the denial above is the sandbox's.
        let output = run(&sh(&script, allowed.path()), &never()).await.unwrap();
        assert_eq!(output.stdout, "fingerprintedaws_secret_access_key=canary");

        // Writing is refused in a read-only path, allowed in a read-write one.
        let written = allowed.path().join("written");
        let script = format!("echo x > {}", written.display());
        let output = run(&sh(&script, allowed.path()).sandbox(policy), &never())
            .await
            .unwrap();
        assert!(!output.success() && !written.exists(), "{}", output.stderr);
        let writable = SandboxPolicy {
            read_only: vec![],
            read_write: vec![allowed.path().to_path_buf()],
        };
        let output = run(&sh(&script, allowed.path()).sandbox(writable), &never())
            .await
            .unwrap();
        assert!(output.success() && written.exists(), "{}", output.stderr);
    }
}
