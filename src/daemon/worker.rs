//! One worker per environment and lane: takes the newest queued commit and carries out what
//! the engine decides for it. A commit queued while another waits supersedes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::alert::{Alert, AlertKind};
use crate::engine::machine::Event;
use crate::engine::reconcile::enqueue;
use crate::engine::retry::{ErrorClass, classify_terraform_output};
use crate::engine::state::{EnvStatus, RunKind, RunResult};
use crate::engine::{Lane, decide_lane};
use crate::git::{self, CommitId};
use crate::process::ProcessError;
use crate::repo::{CheckOptions, CheckedEnvironment};
use crate::store::Summary;
use crate::terraform::{PlanRecord, RunId, StageError, TerraformError, stage_commit};

use super::Shared;
use super::merged::MergedLane;
use super::outcome::Outcome;
use super::scheduler::Priority;

/// The commits waiting for a worker: at most one per branch; a newer one of the same branch
/// replaces it.
pub struct Queue {
    pending: Mutex<crate::engine::reconcile::Waiting>,
    pub(super) ready: Notify,
    /// Cancels the drift check in progress, if any: a commit pushed goes first.
    drift_check: Mutex<CancellationToken>,
    /// Commits waiting across all queues (the `queue_depth` metric).
    depth: prometheus_client::metrics::gauge::Gauge,
    /// Held by the worker while it runs anything (a commit, a drift check), and by the main
    /// loop while it decides for the environment itself (a commit that passes it over): never
    /// two deciders for one environment and lane at once.
    pub(super) turn: Arc<tokio::sync::Mutex<()>>,
    /// Whether the worker will try a failed commit again: a commit passed over meanwhile
    /// would be older news than that retry, so the main loop leaves such a commit to it.
    retry_pending: AtomicBool,
}

impl Queue {
    pub fn new(depth: prometheus_client::metrics::gauge::Gauge) -> Queue {
        Queue {
            pending: Mutex::new(crate::engine::reconcile::Waiting::new()),
            ready: Notify::new(),
            drift_check: Mutex::new(CancellationToken::new()),
            depth,
            turn: Arc::new(tokio::sync::Mutex::new(())),
            retry_pending: AtomicBool::new(false),
        }
    }

    /// `cancel` is what stops the drift check now running; a pushed commit triggers it.
    pub(super) fn preempt_with(&self, cancel: CancellationToken) {
        *self.drift_check.lock().unwrap_or_else(|p| p.into_inner()) = cancel;
    }

    pub(super) fn has_pending(&self) -> bool {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        !pending.is_empty()
    }

    /// The worker's turn, when it is idle: nothing running, nothing queued, no retry
    /// scheduled. While the guard lives the worker starts nothing.
    pub(super) fn idle_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let turn = self.turn.clone().try_lock_owned().ok()?;
        (!self.has_pending() && !self.retry_pending.load(Ordering::SeqCst)).then_some(turn)
    }

    /// Queues `commit` of `branch`; returns the commit of that branch it superseded.
    pub fn push(&self, branch: &str, commit: &str) -> Option<String> {
        let superseded = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let before = pending.len();
            let superseded = enqueue(&mut pending, branch, commit);
            if pending.len() > before {
                self.depth.inc();
            }
            superseded
        };
        self.drift_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
        self.ready.notify_one();
        superseded
    }

    fn take(&self) -> Option<String> {
        let taken = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .map(|(_, commit)| commit);
        if taken.is_some() {
            self.depth.dec();
        }
        taken
    }
}

/// What woke a worker.
enum Wake {
    Queued,
    DriftDue,
    RetryDue,
}

pub(super) async fn work(
    shared: Arc<Shared>,
    env: String,
    lane: Lane,
    queue: Arc<Queue>,
    stop: CancellationToken,
) {
    let mut clock = super::drift::DriftClock::new();
    let mut merged = MergedLane::default();
    loop {
        // Only the merged lane checks for drift (of the last applied commit).
        let drift_due = match lane {
            Lane::Merged => clock.due(&shared, &env),
            Lane::Preview => None,
        };
        let Some(wake) = wake(&queue, drift_due, merged.retry_at, &stop).await else {
            return;
        };
        let _turn = queue.turn.lock().await;
        // The runs are boxed: an idle worker's task then holds only this loop's state, not
        // room for the deepest run it could make (a thousand idle environments are a
        // thousand tasks).
        let mut retry = None;
        match wake {
            Wake::Queued => {}
            Wake::DriftDue => {
                let span = tracing::info_span!("drift", env = %env, lane = %lane);
                let check = super::drift::check(&shared, &env, &queue, &mut clock, &stop);
                if let Err(error) = Box::pin(check).instrument(span.clone()).await {
                    let _enter = span.enter();
                    tracing::error!(%error, "the drift check failed");
                }
            }
            Wake::RetryDue => retry = merged.take_retry(),
        }
        // A commit queued meanwhile is newer than the one to retry: it goes instead.
        if let Some(event) = retry.filter(|_| !queue.has_pending()) {
            let span = tracing::info_span!("retry", env = %env, lane = %lane);
            let run = super::merged::merged(&shared, &env, &mut merged, event, &stop);
            log_failure(Box::pin(run).instrument(span.clone()).await, &span);
        }
        while let Some(commit) = queue.take() {
            if stop.is_cancelled() {
                return;
            }
            let commit = CommitId::from_hex(&commit);
            Box::pin(run_one(&shared, &env, lane, &commit, &mut merged, &stop)).await;
        }
        queue
            .retry_pending
            .store(merged.retry_at.is_some(), Ordering::SeqCst);
    }
}

/// Waits for what wakes a worker: a queued commit, its drift check's time, its retry's
/// time; `None` when the daemon stops.
async fn wake(
    queue: &Queue,
    drift_due: Option<std::time::Instant>,
    retry_at: Option<tokio::time::Instant>,
    stop: &CancellationToken,
) -> Option<Wake> {
    let at = |instant: Option<tokio::time::Instant>| async move {
        match instant {
            Some(instant) => tokio::time::sleep_until(instant).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = queue.ready.notified() => Some(Wake::Queued),
        () = at(drift_due.map(Into::into)) => Some(Wake::DriftDue),
        () = at(retry_at) => Some(Wake::RetryDue),
        () = stop.cancelled() => None,
    }
}

/// Carries one commit through its lane; a failure is logged (and, for a merged commit, may
/// leave a retry in `merged`).
async fn run_one(
    shared: &Arc<Shared>,
    env: &str,
    lane: Lane,
    commit: &CommitId,
    merged: &mut MergedLane,
    stop: &CancellationToken,
) {
    let span = tracing::info_span!("commit", env = %env, lane = %lane, commit = %commit.short());
    let outcome = match lane {
        Lane::Merged => {
            let head = Event::Head {
                commit: commit.to_string(),
            };
            super::merged::merged(shared, env, merged, head, stop)
                .instrument(span.clone())
                .await
        }
        Lane::Preview => {
            preview(shared, env, commit, stop)
                .instrument(span.clone())
                .await
        }
    };
    log_failure(outcome, &span);
}

fn log_failure(outcome: WorkResult, span: &tracing::Span) {
    if let Err(error) = outcome {
        let _enter = span.enter();
        tracing::error!(%error, "the run failed");
    }
}

/// The span of one recorded run. It has no parent, so each line logged in it carries exactly
/// one environment, lane, commit and run id (a merged commit's plan and apply are two runs).
pub(super) fn run_span(env: &str, lane: Lane, commit: &CommitId, run_id: i64) -> tracing::Span {
    tracing::info_span!(parent: None, "run", env = %env, %lane, commit = %commit.short(), run = run_id)
}

/// A failure the worker logs and moves on from; the run it belonged to is recorded as failed
/// where there is one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Git(#[from] git::GitError),
    #[error(transparent)]
    Terraform(#[from] TerraformError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Aws(#[from] crate::aws::AwsError),
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Other(String),
}

impl WorkError {
    /// Whether the same run may succeed when tried again ([`crate::engine::retry`]).
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            WorkError::Aws(error) => error.class(),
            WorkError::Terraform(TerraformError::Failed { stderr, .. }) => {
                classify_terraform_output(stderr)
            }
            WorkError::Terraform(TerraformError::Process(ProcessError::TimedOut { .. })) => {
                ErrorClass::Transient
            }
            WorkError::Terraform(TerraformError::ReservedFile { .. }) | WorkError::Other(_) => {
                ErrorClass::Permanent
            }
            _ => ErrorClass::Unknown,
        }
    }
}

impl From<String> for WorkError {
    fn from(message: String) -> WorkError {
        WorkError::Other(message)
    }
}

pub(super) type WorkResult = Result<(), WorkError>;

pub(super) fn resources(record: &PlanRecord) -> Vec<serde_json::Value> {
    record
        .summary
        .resources
        .iter()
        .map(|change| serde_json::json!({"address": change.address, "actions": change.actions}))
        .collect()
}

pub(super) fn summary(record: &PlanRecord) -> Summary {
    Summary {
        add: record.summary.add,
        change: record.summary.change,
        destroy: record.summary.destroy,
    }
}

/// The problems of a check that refused a commit, one `path:line: message` per line.
pub(super) fn problem_lines(problems: &[crate::problem::Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// The resources a plan deletes or replaces, as `address (actions)`.
pub(super) fn doomed(record: &PlanRecord) -> Vec<String> {
    record
        .summary
        .resources
        .iter()
        .filter(|change| change.actions.iter().any(|action| action == "delete"))
        .map(|change| format!("{} ({})", change.address, change.actions.join(", ")))
        .collect()
}

/// Stages `commit` for `env` in `lane` on a blocking thread.
pub(super) async fn stage(
    shared: &Arc<Shared>,
    env: &str,
    lane: Lane,
    commit: &CommitId,
) -> Result<Result<CheckedEnvironment, StageError>, WorkError> {
    let name = crate::config::EnvName::parse(env)?;
    let workdir = shared.terraform.workdir(&name, lane);
    let mirror = shared.mirror.path().to_path_buf();
    let commit = commit.clone();
    let options = CheckOptions {
        providers: shared.config.terraform.providers.clone(),
        max_file_bytes: shared.config.max_file_bytes,
    };
    let _git = shared.git_work.acquire().await;
    tokio::task::spawn_blocking(move || stage_commit(&workdir, &mirror, &commit, &options))
        .await
        .map_err(WorkError::from)
}

/// Records a refusal: a run that never reaches terraform (result `refused`), the
/// environment's status when there is one to set, the audit log, the metric, and the alert.
pub(super) fn refuse(
    shared: &Shared,
    commit: &CommitId,
    run_kind: RunKind,
    status: Option<EnvStatus>,
    alert: Alert,
) -> WorkResult {
    let env = alert.env.clone();
    let decision = alert.kind.name();
    let mut refused = Outcome::new(&env, commit)
        .decided(run_kind, RunResult::Refused, alert.message.clone())
        .audit(&decision, alert.message.clone());
    if let Some(status) = status {
        refused = refused.status(status);
    }
    let run_id = shared.record(refused.alert(alert))?.unwrap_or_default();
    let span = run_span(&env, run_kind.lane(), commit, run_id);
    let _enter = span.enter();
    tracing::info!(decision = %decision, "refused");
    Ok(())
}

/// Refuses a commit whose configuration does not pass the checks: `config_error`. A preview
/// leaves the environment's status alone.
pub(super) fn config_error(
    shared: &Shared,
    env: &str,
    commit: &CommitId,
    kind: RunKind,
    message: String,
) -> WorkResult {
    let status = (kind != RunKind::Preview).then_some(EnvStatus::Error);
    let alert = Alert::new(AlertKind::ConfigError, env, commit.as_str(), message);
    refuse(shared, commit, kind, status, alert)
}

/// Plans `commit` in `lane` with the lane's identity.
pub(super) async fn plan(
    shared: &Arc<Shared>,
    env: &str,
    lane: Lane,
    commit: &CommitId,
    checked: &CheckedEnvironment,
    run_id: i64,
    stop: &CancellationToken,
) -> Result<PlanRecord, WorkError> {
    let trusted = shared
        .trusted(env)
        .ok_or_else(|| WorkError::Other("the environment left the trust branch".into()))?;
    let name = crate::config::EnvName::parse(env)?;
    let identity = crate::aws::establish(
        &name,
        &trusted.aws,
        lane,
        commit,
        shared.endpoint().as_deref(),
    )
    .await?;
    let run = RunId::parse(&format!("run-{run_id}"))?;
    let workdir = shared.terraform.workdir(&name, lane);
    tracing::info!("planning");
    let started = std::time::Instant::now();
    let record = shared
        .terraform
        .plan(&workdir, checked, commit, &run, &identity.run_env, stop)
        .await?;
    shared
        .metrics
        .plan_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        add = record.summary.add,
        change = record.summary.change,
        destroy = record.summary.destroy,
        "planned"
    );
    Ok(record)
}

/// Why an apply runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ApplyReason {
    /// A merged commit's plan: once applied, the environment is at the commit, whose input
    /// fingerprint (of the commit's closure, not of the initialised checkout) is this.
    Commit { fingerprint: String },
    /// `drift.remediate`: the plan of the last applied commit made by this drift check.
    Remediation { drift_run: i64 },
}

/// Applies the saved plan of a merged commit and records the outcome: the drift check's
/// remediation. (A merged commit's apply is the machine's two effects, the same two steps.)
pub(super) async fn apply(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    record: &PlanRecord,
    trusted: &crate::config::EnvironmentSpec,
    reason: ApplyReason,
) -> WorkResult {
    let (run_id, ended) = start_apply(shared, env, commit, record, trusted).await?;
    let span = run_span(env, Lane::Merged, commit, run_id);
    let _enter = span.enter();
    record_apply(shared, env, commit, run_id, record, reason, ended)
}

/// Applies the saved plan of a merged commit as an `apply` run (recorded as started, the
/// environment `applying`, before terraform runs). Not cancelled by shutdown: an apply in
/// flight finishes (bounded by `terraform.timeout`). Returns the run and how it ended.
pub(super) async fn start_apply(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    record: &PlanRecord,
    trusted: &crate::config::EnvironmentSpec,
) -> Result<(i64, Result<(), String>), WorkError> {
    let name = crate::config::EnvName::parse(env)?;
    let endpoint = shared.endpoint();
    let run_id = shared.store.start_run(
        env,
        commit.as_str(),
        RunKind::Apply,
        Some(EnvStatus::Applying),
    )?;
    let applied = async {
        tracing::info!("applying");
        let started = std::time::Instant::now();
        let identity = crate::aws::establish(
            &name,
            &trusted.aws,
            Lane::Merged,
            commit,
            endpoint.as_deref(),
        )
        .await;
        let ended = match identity {
            Ok(identity) => {
                let workdir = shared.terraform.workdir(&name, Lane::Merged);
                let cancel = CancellationToken::new();
                shared
                    .terraform
                    .apply(&workdir, record, &identity.run_env, &cancel)
                    .await
                    .map(drop)
                    .map_err(|error| match error {
                        TerraformError::StalePlan { .. } => {
                            format!("{error}; the next commit re-plans")
                        }
                        other => other.to_string(),
                    })
            }
            Err(error) => Err(error.to_string()),
        };
        shared
            .metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        ended
    };
    let ended = applied
        .instrument(run_span(env, Lane::Merged, commit, run_id))
        .await;
    Ok((run_id, ended))
}

/// Records how apply run `run_id` ended: applied (the environment in sync at the commit,
/// drift cleared) or failed.
pub(super) fn record_apply(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    run_id: i64,
    record: &PlanRecord,
    reason: ApplyReason,
    ended: Result<(), String>,
) -> WorkResult {
    if let Err(message) = ended {
        return apply_failed(shared, env, commit, run_id, record, message);
    }
    tracing::info!("applied");
    let s = &record.summary;
    let counts = format!(
        "{} added, {} changed, {} destroyed",
        s.add, s.change, s.destroy
    );
    let (what, message) = match &reason {
        ApplyReason::Commit { .. } => (
            String::new(),
            format!("applied {}: {counts}", commit.short()),
        ),
        ApplyReason::Remediation { drift_run } => {
            let what = format!(
                "remediation: re-applied the last applied commit {} to undo the drift found by run {drift_run}",
                commit.short()
            );
            let message = format!("{what}: {counts}");
            (what, message)
        }
    };
    let mut alert = Alert::new(AlertKind::Applied, env, commit.as_str(), message);
    alert.resources = resources(record);
    let mut applied = Outcome::new(env, commit).finish(
        run_id,
        RunKind::Apply,
        RunResult::Applied,
        summary(record),
        resources(record),
        what,
    );
    // A remediation re-applies the last applied commit: where the environment is stays.
    let remediation = match &reason {
        ApplyReason::Commit { fingerprint } => {
            applied = applied.last_applied(fingerprint, &record.inputs);
            false
        }
        ApplyReason::Remediation { .. } => true,
    };
    let applied = applied
        .status(EnvStatus::InSync)
        .audit("applied", format!("run {run_id}"))
        .alert(alert);
    let applied = super::drift::back_in_sync(shared, env, commit, remediation, applied)?;
    shared.record(applied)?;
    Ok(())
}

/// Records apply run `run_id` failed: the environment `failed`, alerted.
fn apply_failed(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    run_id: i64,
    record: &PlanRecord,
    message: String,
) -> WorkResult {
    tracing::error!(error = %message, "apply failed");
    let alert = Alert::new(
        AlertKind::ApplyFailed,
        env,
        commit.as_str(),
        message.clone(),
    );
    let failed = Outcome::new(env, commit)
        .finish(
            run_id,
            RunKind::Apply,
            RunResult::Failed,
            summary(record),
            resources(record),
            message,
        )
        .status(EnvStatus::Failed)
        .alert(alert);
    shared.record(failed)?;
    Ok(())
}

/// A preview: the preview lane's identity, never applied; its artifacts are deleted once the
/// run is recorded. A commit that does not change the environment's inputs is not planned.
async fn preview(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    stop: &CancellationToken,
) -> WorkResult {
    let store = &shared.store;
    let Some(trusted) = shared.trusted(env) else {
        return static_check(shared, env, commit).await;
    };
    let checked = match stage(shared, env, Lane::Preview, commit).await? {
        Ok(checked) => checked,
        // A branch that does not define this environment, or breaks it, does not touch it
        // the way a preview can show; a broken one is reported.
        Err(StageError::Refused(problems)) => {
            let defines = problems
                .iter()
                .all(|p| !p.message.contains("does not exist here"));
            if !defines {
                return Ok(());
            }
            return config_error(
                shared,
                env,
                commit,
                RunKind::Preview,
                format!(
                    "the commit does not pass karrots check:\n{}",
                    problem_lines(&problems)
                ),
            );
        }
        Err(error) => return Err(error.into()),
    };
    let row = store.environment(env)?.unwrap_or_default();
    if row.applied_fingerprint.as_deref() == Some(checked.fingerprint.as_str()) {
        tracing::debug!("the commit does not change the environment's inputs: no preview");
        return Ok(());
    }
    if let Err(refusal) = decide_lane(Some(&trusted), &checked.spec, false) {
        return config_error(
            shared,
            env,
            commit,
            RunKind::Preview,
            refusal.reason(shared.config.trust_branch.as_str()),
        );
    }
    let Some(_permit) = shared.scheduler.permit(Priority::AfterMerges).await else {
        return Ok(());
    };
    if stop.is_cancelled() {
        return Ok(());
    }
    recorded_preview(shared, env, commit, &checked, stop).await
}

/// Plans `commit` as a `preview` run, records how it ended (`changes`, `no_changes`,
/// `failed`, or `interrupted` when cancelled) and deletes its artifacts.
async fn recorded_preview(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    checked: &CheckedEnvironment,
    stop: &CancellationToken,
) -> WorkResult {
    let run_id = shared
        .store
        .start_run(env, commit.as_str(), RunKind::Preview, None)?;
    let span = run_span(env, Lane::Preview, commit, run_id);
    let planned = plan(shared, env, Lane::Preview, commit, checked, run_id, stop)
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    let ended = Outcome::new(env, commit);
    match planned {
        Ok(record) => {
            let result = if record.summary.has_changes() {
                RunResult::Changes
            } else {
                RunResult::NoChanges
            };
            shared.record(ended.finish(
                run_id,
                RunKind::Preview,
                result,
                summary(&record),
                resources(&record),
                "",
            ))?;
            shared.terraform.discard_preview(&record)?;
        }
        Err(error) => {
            let result = if stop.is_cancelled() {
                RunResult::Interrupted
            } else {
                RunResult::Failed
            };
            tracing::warn!(%error, %result, "the plan did not succeed");
            shared.record(ended.finish(
                run_id,
                RunKind::Preview,
                result,
                Summary::default(),
                Vec::new(),
                error.to_string(),
            ))?;
        }
    }
    Ok(())
}

/// An environment a branch defines that is not on the trust branch yet: its identity is
/// unknown, so it is checked and never planned.
async fn static_check(shared: &Arc<Shared>, env: &str, commit: &CommitId) -> WorkResult {
    let trust = shared.config.trust_branch.as_str();
    match stage(shared, env, Lane::Preview, commit).await? {
        Ok(checked) => {
            let reason = decide_lane(None, &checked.spec, false)
                .err()
                .map(|refusal| refusal.reason(trust))
                .unwrap_or_default();
            let message = format!("passes karrots check; not planned: {reason}");
            let run_id = shared
                .record(Outcome::new(env, commit).decided(
                    RunKind::Preview,
                    RunResult::Refused,
                    message,
                ))?
                .unwrap_or_default();
            let span = run_span(env, Lane::Preview, commit, run_id);
            let _enter = span.enter();
            tracing::info!("checked, not planned: the environment is not on the trust branch");
            Ok(())
        }
        Err(StageError::Refused(problems)) => config_error(
            shared,
            env,
            commit,
            RunKind::Preview,
            format!(
                "the commit does not pass karrots check (the environment is not on the trust branch {trust} yet):\n{}",
                problem_lines(&problems)
            ),
        ),
        Err(error) => Err(error.into()),
    }
}
