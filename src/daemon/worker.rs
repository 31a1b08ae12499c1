//! One worker per environment and lane: takes the newest queued commit and carries out what
//! the engine decides for it. A commit queued while another waits supersedes it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::alert::{Alert, AlertKind};
use crate::config::RepoPath;
use crate::engine::reconcile::{
    AfterPlan, HeadDecision, HeadFacts, MergedState, PlanOutcome, decide_after_plan, decide_head,
    decide_history, enqueue, touches_inputs,
};
use crate::engine::retry::{ErrorClass, Policy, classify_terraform_output, error_policy};
use crate::engine::state::{EnvStatus, RunKind, RunResult};
use crate::engine::{Lane, decide_lane};
use crate::git::{self, CommitId};
use crate::process::ProcessError;
use crate::repo::{CheckOptions, CheckedEnvironment};
use crate::store::Summary;
use crate::terraform::{PlanRecord, RunId, StageError, TerraformError, stage_commit};

use super::Shared;
use super::outcome::Outcome;

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
    let mut streak = Streak::default();
    loop {
        // Only the merged lane checks for drift (of the last applied commit).
        let drift_due = match lane {
            Lane::Merged => clock.due(&shared, &env),
            Lane::Preview => None,
        };
        let drift_wait = async {
            match drift_due {
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => std::future::pending().await,
            }
        };
        let retry_at = streak.retry_at;
        let retry_wait = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            () = queue.ready.notified() => Wake::Queued,
            () = drift_wait => Wake::DriftDue,
            () = retry_wait => Wake::RetryDue,
            () = stop.cancelled() => return,
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
            Wake::RetryDue => retry = streak.take_retry(),
        }
        // A commit queued meanwhile is newer than the one to retry: it goes instead.
        if let Some(commit) = retry.filter(|_| !queue.has_pending()) {
            Box::pin(run_one(&shared, &env, lane, &commit, &mut streak, &stop)).await;
        }
        while let Some(commit) = queue.take() {
            if stop.is_cancelled() {
                return;
            }
            let commit = CommitId::from_hex(&commit);
            Box::pin(run_one(&shared, &env, lane, &commit, &mut streak, &stop)).await;
        }
        queue
            .retry_pending
            .store(streak.retry_at.is_some(), Ordering::SeqCst);
    }
}

/// Carries one commit through its lane; a failure is logged (and, for a merged commit, may
/// leave a retry in `streak`).
async fn run_one(
    shared: &Arc<Shared>,
    env: &str,
    lane: Lane,
    commit: &CommitId,
    streak: &mut Streak,
    stop: &CancellationToken,
) {
    let span = tracing::info_span!("commit", env = %env, lane = %lane, commit = %commit.short());
    let outcome = match lane {
        Lane::Merged => {
            streak.begin(commit);
            merged(shared, env, commit, streak, stop)
                .instrument(span.clone())
                .await
        }
        Lane::Preview => {
            preview(shared, env, commit, stop)
                .instrument(span.clone())
                .await
        }
    };
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

/// The failures in a row of one merged commit, and when it is tried again. A newer commit
/// starts a new streak: it wins over the retry of an older one.
#[derive(Debug, Default)]
pub(super) struct Streak {
    commit: Option<CommitId>,
    attempts: u32,
    message: String,
    /// When the commit is tried again; `None` when it is not.
    pub(super) retry_at: Option<tokio::time::Instant>,
}

impl Streak {
    /// The commit to try again, once `retry_at` has come.
    pub(super) fn take_retry(&mut self) -> Option<CommitId> {
        self.retry_at.take()?;
        self.commit.clone()
    }

    /// Forgets the failures of any commit but `commit`.
    pub(super) fn begin(&mut self, commit: &CommitId) {
        if self.commit.as_ref() != Some(commit) {
            *self = Streak::default();
        }
        self.retry_at = None;
    }

    /// Records a failure of `commit` with `message`; returns what to do and which attempt in
    /// a row it was.
    fn failed(&mut self, commit: &CommitId, class: ErrorClass, message: &str) -> (Policy, u32) {
        self.begin(commit);
        self.commit = Some(commit.clone());
        self.attempts += 1;
        let repeated = self.message == message;
        self.message = message.to_string();
        let policy = error_policy(class, self.attempts, repeated, fastrand::f64());
        self.retry_at = match policy {
            Policy::Requeue(after) => Some(tokio::time::Instant::now() + after),
            Policy::AwaitChange => None,
        };
        (policy, self.attempts)
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
fn config_error(
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

async fn merged(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    streak: &mut Streak,
    stop: &CancellationToken,
) -> WorkResult {
    let store = &shared.store;
    let Some(trusted) = shared.trusted(env) else {
        return Ok(());
    };
    let row = store.environment(env)?.unwrap_or_default();
    let state = MergedState {
        last_applied: row.last_applied.clone(),
        applied_fingerprint: row.applied_fingerprint.clone(),
    };
    // From git, on one blocking thread: whether the commit is on the first-parent chain of
    // exactly `refs/remotes/origin/<branch>` (whatever name the queue was given it under),
    // its ancestry, and whether it changed any path of the last applied commit's input
    // closure (when that closure is known).
    let (on_branch, descends, untouched) = {
        let (mirror, commit, branch) = (
            shared.mirror.path().to_path_buf(),
            commit.clone(),
            trusted.branch.to_string(),
        );
        let last = row.last_applied.as_deref().map(CommitId::from_hex);
        let inputs = row.applied_inputs.clone();
        let compared = last
            .as_ref()
            .and_then(|last| shared.changed_paths(last, &commit));
        let _git = shared.git_work.acquire().await;
        tokio::task::spawn_blocking(move || {
            let repo = git::open(&mirror)?;
            let on_branch = match git::branch_tip(&repo, &branch) {
                Some(tip) => git::on_first_parent_chain(&repo, &tip, &commit)?,
                None => false,
            };
            let Some(last) = last.filter(|_| on_branch) else {
                return Ok::<_, git::GitError>((on_branch, true, false));
            };
            let changes = match compared {
                Some(changed) => Some(changed),
                None => git::mirror::changes_since(&repo, &last, &commit)?,
            };
            let untouched = match (&inputs, &changes) {
                (Some(inputs), Some(changed)) => !touches_inputs(changed, inputs),
                _ => false,
            };
            Ok((on_branch, changes.is_some(), untouched))
        })
        .await??
    };
    if !on_branch {
        let message = format!(
            "{} is not on the first-parent chain of branch {}: only commits merged there are planned and applied",
            commit.short(),
            trusted.branch
        );
        let alert = Alert::new(AlertKind::Refused, env, commit.as_str(), message);
        return refuse(shared, commit, RunKind::Plan, None, alert);
    }
    match decide_history(&state, commit.as_str(), descends) {
        Some(HeadDecision::AlreadyThere) => return Ok(()),
        Some(HeadDecision::RefuseRewrittenHistory { last_applied }) => {
            let message = format!(
                "{} does not descend from the last applied commit {}: history was rewritten (force-push or rewind); nothing is applied until the branch descends from it again",
                commit.short(),
                &last_applied[..7.min(last_applied.len())]
            );
            let alert = Alert::new(AlertKind::HistoryRewritten, env, commit.as_str(), message);
            return refuse(
                shared,
                commit,
                RunKind::Plan,
                Some(EnvStatus::Refused),
                alert,
            );
        }
        _ => {}
    }

    // No path of the applied closure changed, so neither did the closure nor its fingerprint:
    // the engine decides on the applied fingerprint without the commit being staged (with
    // hundreds of environments on one branch, staging each to learn this would starve the
    // one that changed).
    if untouched && let Some(applied) = &state.applied_fingerprint {
        let facts = HeadFacts {
            commit: commit.to_string(),
            descends_from_last_applied: descends,
            fingerprint: applied.clone(),
        };
        if decide_head(&state, &facts) == HeadDecision::Unaffected
            && let Some(inputs) = &row.applied_inputs
        {
            shared.record(passed_over(
                env,
                row.status,
                commit,
                applied,
                inputs,
                "the commit changes no path the environment is built from",
            ))?;
            return Ok(());
        }
    }
    let checked = match stage(shared, env, Lane::Merged, commit).await? {
        Ok(checked) => checked,
        Err(StageError::Refused(problems)) => {
            return config_error(
                shared,
                env,
                commit,
                RunKind::Plan,
                format!(
                    "the commit does not pass karrots check:\n{}",
                    problem_lines(&problems)
                ),
            );
        }
        Err(error) => return Err(error.into()),
    };
    if let Err(refusal) = decide_lane(Some(&trusted), &checked.spec, true) {
        return config_error(
            shared,
            env,
            commit,
            RunKind::Plan,
            refusal.reason(shared.config.trust_branch.as_str()),
        );
    }
    let facts = HeadFacts {
        commit: commit.to_string(),
        descends_from_last_applied: descends,
        fingerprint: checked.fingerprint.to_string(),
    };
    let fingerprint = checked.fingerprint.to_string();
    if decide_head(&state, &facts) == HeadDecision::Unaffected {
        shared.record(passed_over(
            env,
            row.status,
            commit,
            &fingerprint,
            &checked.inputs,
            "the commit does not change the environment's inputs",
        ))?;
        return Ok(());
    }

    let Some(_permit) = super::permit(shared, super::Priority::First).await else {
        return Ok(());
    };
    if stop.is_cancelled() {
        return Ok(());
    }
    let Some(Planned {
        record,
        outcome: planned,
    }) = recorded_plan(shared, env, commit, &checked, Some(streak), stop).await?
    else {
        return Ok(());
    };

    let outcome = PlanOutcome {
        has_changes: record.summary.has_changes(),
        destroys: record.summary.destroys(),
    };
    match decide_after_plan(&trusted.apply, outcome) {
        AfterPlan::InSync => {
            let in_sync = super::drift::back_in_sync(shared, env, commit, false, planned)?;
            shared.record(
                in_sync
                    .last_applied(&fingerprint, &checked.inputs)
                    .status(EnvStatus::InSync)
                    .audit("in_sync", "the plan has no changes"),
            )?;
            Ok(())
        }
        AfterPlan::AwaitApproval => {
            shared.record(planned.status(EnvStatus::AwaitingApproval).audit(
                "awaiting_approval",
                "apply.auto is false: the plan waits for an approval and is not applied",
            ))?;
            Ok(())
        }
        AfterPlan::RefuseDestroy => {
            shared.record(planned)?;
            let doomed = doomed(&record);
            let message = format!(
                "the plan deletes or replaces {} and apply.allow_destroy is false: {}",
                doomed.len(),
                doomed.join(", ")
            );
            let mut alert = Alert::new(AlertKind::Refused, env, commit.as_str(), message);
            alert.resources = resources(&record);
            refuse(
                shared,
                commit,
                RunKind::Apply,
                Some(EnvStatus::Refused),
                alert,
            )
        }
        AfterPlan::Apply => {
            shared.record(planned)?;
            apply(
                shared,
                env,
                commit,
                &record,
                &trusted,
                &fingerprint,
                ApplyReason::Commit,
            )
            .await
        }
    }
}

/// The outcome of a merged commit that leaves the environment's inputs as last applied: it
/// becomes the last applied commit, and a refusal, a configuration error or a plan waiting
/// for approval of a commit in between (now reverted) no longer stands, so the environment
/// is in sync again. A failure or drift does stand: what is deployed is not known to be what
/// was applied.
pub(super) fn passed_over(
    env: &str,
    status: EnvStatus,
    commit: &CommitId,
    fingerprint: &str,
    inputs: &BTreeSet<RepoPath>,
    reason: &str,
) -> Outcome {
    let unaffected = Outcome::new(env, commit)
        .last_applied(fingerprint, inputs)
        .audit("unaffected", reason);
    if status.cleared_by_return() {
        unaffected.status(EnvStatus::InSync)
    } else {
        unaffected
    }
}

/// A plan that succeeded, and the outcome that ends its run (`changes` or `no_changes`): the
/// caller adds what it decides and records them together.
struct Planned {
    record: PlanRecord,
    outcome: Outcome,
}

/// Plans `commit` as a run: `plan` in the merged lane (the environment `planning`) when there
/// is a `streak` to keep its failures in, else `preview`. A plan that did not succeed is
/// recorded here, `failed` (or `interrupted` when cancelled) with the error, and is `None`.
async fn recorded_plan(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    checked: &CheckedEnvironment,
    streak: Option<&mut Streak>,
    stop: &CancellationToken,
) -> Result<Option<Planned>, WorkError> {
    let (lane, kind, status) = match streak {
        Some(_) => (Lane::Merged, RunKind::Plan, Some(EnvStatus::Planning)),
        None => (Lane::Preview, RunKind::Preview, None),
    };
    let run_id = shared.store.start_run(env, commit.as_str(), kind, status)?;
    let span = run_span(env, lane, commit, run_id);
    let planned = plan(shared, env, lane, commit, checked, run_id, stop)
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    let error = match planned {
        Ok(record) => {
            let result = if record.summary.has_changes() {
                RunResult::Changes
            } else {
                RunResult::NoChanges
            };
            let outcome = Outcome::new(env, commit).finish(
                run_id,
                kind,
                result,
                summary(&record),
                resources(&record),
                "",
            );
            return Ok(Some(Planned { record, outcome }));
        }
        Err(error) => error,
    };
    let result = if stop.is_cancelled() {
        RunResult::Interrupted
    } else {
        RunResult::Failed
    };
    tracing::warn!(%error, %result, "the plan did not succeed");
    match streak {
        Some(streak) if result == RunResult::Failed => {
            shared.record(merged_plan_failed(env, commit, run_id, &error, streak))?;
        }
        _ => {
            let mut ended = Outcome::new(env, commit).finish(
                run_id,
                kind,
                result,
                Summary::default(),
                Vec::new(),
                error.to_string(),
            );
            if lane == Lane::Merged {
                ended = ended.status(EnvStatus::Failed);
            }
            shared.record(ended)?;
        }
    }
    Ok(None)
}

/// The outcome of a merged plan that failed, and whether and when its commit is tried again:
/// a passing failure leaves the environment `error` until the next attempt, any other
/// `failed` until a new commit. A merged commit is there to be applied, so a failed plan is
/// an `apply_failed` alert: on the first failure of a streak, and when the retries give up.
fn merged_plan_failed(
    env: &str,
    commit: &CommitId,
    run_id: i64,
    error: &WorkError,
    streak: &mut Streak,
) -> Outcome {
    let text = error.to_string();
    let class = error.class();
    let (policy, attempt) = streak.failed(commit, class, &text);
    let (status, next) = match policy {
        Policy::Requeue(after) => {
            let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + after);
            let next = match class {
                ErrorClass::Transient => {
                    format!("; a passing failure (attempt {attempt}): tried again at {at}")
                }
                _ => format!("; tried once more at {at}, in case the failure passes"),
            };
            (EnvStatus::Error, next)
        }
        Policy::AwaitChange if attempt > 1 => (
            EnvStatus::Failed,
            format!("; failed the same way {attempt} times: not tried again until a new commit"),
        ),
        Policy::AwaitChange => (EnvStatus::Failed, String::new()),
    };
    let failed = Outcome::new(env, commit)
        .finish(
            run_id,
            RunKind::Plan,
            RunResult::Failed,
            Summary::default(),
            Vec::new(),
            format!("{text}{next}"),
        )
        .status(status)
        .audit(status.as_str(), format!("run {run_id}{next}"));
    if attempt == 1 || policy == Policy::AwaitChange {
        failed.alert(Alert::new(
            AlertKind::ApplyFailed,
            env,
            commit.as_str(),
            format!(
                "the plan of {} failed, so nothing was applied{next}: {text}",
                commit.short()
            ),
        ))
    } else {
        failed
    }
}

/// Plans `commit` in `lane` with the lane's identity.
async fn plan(
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ApplyReason {
    /// A merged commit's plan.
    Commit,
    /// `drift.remediate`: the plan of the last applied commit made by this drift check.
    Remediation { drift_run: i64 },
}

/// Applies the saved plan of a merged commit. Not cancelled by shutdown: an apply in flight
/// finishes (bounded by `terraform.timeout`).
pub(super) async fn apply(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    record: &PlanRecord,
    trusted: &crate::config::EnvironmentSpec,
    fingerprint: &str,
    reason: ApplyReason,
) -> WorkResult {
    let store = &shared.store;
    let name = crate::config::EnvName::parse(env)?;
    let endpoint = shared.endpoint();
    let run_id = store.start_run(
        env,
        commit.as_str(),
        RunKind::Apply,
        Some(EnvStatus::Applying),
    )?;
    async {
    tracing::info!("applying");
    let started = std::time::Instant::now();
    let outcome = async {
        let identity = crate::aws::establish(
            &name,
            &trusted.aws,
            Lane::Merged,
            commit,
            endpoint.as_deref(),
        )
        .await
        .map_err(|error| error.to_string())?;
        let workdir = shared.terraform.workdir(&name, Lane::Merged);
        shared
            .terraform
            .apply(
                &workdir,
                record,
                &identity.run_env,
                &CancellationToken::new(),
            )
            .await
            .map_err(|error| match error {
                TerraformError::StalePlan { .. } => format!("{error}; the next commit re-plans"),
                other => other.to_string(),
            })
    }
    .await;
    shared
        .metrics
        .apply_seconds
        .observe(started.elapsed().as_secs_f64());
    match outcome {
        Ok(_) => {
            let what = match reason {
                ApplyReason::Commit => String::new(),
                ApplyReason::Remediation { drift_run } => format!(
                    "remediation: re-applied the last applied commit {} to undo the drift found by run {drift_run}",
                    commit.short()
                ),
            };
            tracing::info!("applied");
            let s = &record.summary;
            let counts = format!(
                "{} added, {} changed, {} destroyed",
                s.add, s.change, s.destroy
            );
            let message = match reason {
                ApplyReason::Commit => format!("applied {}: {counts}", commit.short()),
                ApplyReason::Remediation { .. } => format!("{what}: {counts}"),
            };
            let remediation = matches!(reason, ApplyReason::Remediation { .. });
            let mut alert = Alert::new(AlertKind::Applied, env, commit.as_str(), message);
            alert.resources = resources(record);
            let applied = Outcome::new(env, commit)
                .finish(
                    run_id,
                    RunKind::Apply,
                    RunResult::Applied,
                    summary(record),
                    resources(record),
                    what,
                )
                .last_applied(fingerprint, &record.inputs)
                .status(EnvStatus::InSync)
                .audit("applied", format!("run {run_id}"))
                .alert(alert);
            shared.record(super::drift::back_in_sync(
                shared,
                env,
                commit,
                remediation,
                applied,
            )?)?;
        }
        Err(message) => {
            tracing::error!(error = %message, "apply failed");
            let alert = Alert::new(AlertKind::ApplyFailed, env, commit.as_str(), message.clone());
            shared.record(
                Outcome::new(env, commit)
                    .finish(
                        run_id,
                        RunKind::Apply,
                        RunResult::Failed,
                        summary(record),
                        resources(record),
                        message,
                    )
                    .status(EnvStatus::Failed)
                    .alert(alert),
            )?;
        }
    }
    Ok(())
    }
    .instrument(run_span(env, Lane::Merged, commit, run_id))
    .await
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
    let Some(_permit) = super::permit(shared, super::Priority::AfterMerges).await else {
        return Ok(());
    };
    if stop.is_cancelled() {
        return Ok(());
    }
    if let Some(Planned { record, outcome }) =
        recorded_plan(shared, env, commit, &checked, None, stop).await?
    {
        shared.record(outcome)?;
        shared.terraform.discard_preview(&record)?;
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
