//! The steps every lane's runs share: stage a commit, plan it with the lane's identity,
//! apply a saved plan and record how it ended, refuse a commit, and the span a run logs in.
//! The merged lane, previews and drift checks are built from them; nothing here decides.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::alert::{Alert, AlertKind};
use crate::approval::Approval;
use crate::engine::Lane;
use crate::engine::retry::{ErrorClass, classify_terraform_output};
use crate::engine::state::{DriftStatus, EnvStatus, RunKind, RunResult};
use crate::git::{self, CommitId};
use crate::process::ProcessError;
use crate::repo::{CheckOptions, CheckedEnvironment};
use crate::store::{DriftRow, Summary, now_rfc3339};
use crate::terraform::{PlanRecord, RunId, StageError, TerraformError, stage_commit};

use super::Shared;
use super::outcome::Outcome;

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
    let workdir = shared.workdir(&name, lane);
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
pub(super) async fn refuse(
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
    let run_id = shared
        .record(refused.alert(alert))
        .await?
        .unwrap_or_default();
    let span = run_span(&env, run_kind.lane(), commit, run_id);
    let _enter = span.enter();
    tracing::info!(decision = %decision, "refused");
    Ok(())
}

/// Refuses a commit whose configuration does not pass the checks: `config_error`. A preview
/// leaves the environment's status alone.
pub(super) async fn config_error(
    shared: &Shared,
    env: &str,
    commit: &CommitId,
    kind: RunKind,
    message: String,
) -> WorkResult {
    let status = (kind != RunKind::Preview).then_some(EnvStatus::Error);
    let alert = Alert::new(AlertKind::ConfigError, env, commit.as_str(), message);
    refuse(shared, commit, kind, status, alert).await
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
    let identity = shared
        .identities
        .establish(&name, &trusted.aws, lane, commit)
        .await?;
    let run = RunId::parse(&format!("run-{run_id}"))?;
    let workdir = shared.workdir(&name, lane);
    tracing::info!("planning");
    let started = std::time::Instant::now();
    let record = shared
        .runner
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
    Commit {
        fingerprint: String,
        /// The approvals the plan was applied on (`apply.approval`).
        approved_by: Vec<Approval>,
    },
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
    let ended = ended.map_err(|failure| failure.message);
    record_apply(shared, env, commit, run_id, record, reason, ended)
        .instrument(span)
        .await
}

/// Why an apply did not apply.
pub(super) struct ApplyFailure {
    pub message: String,
    /// Terraform refused the saved plan as stale: the state changed since it was made.
    pub stale: bool,
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
) -> Result<(i64, Result<(), ApplyFailure>), WorkError> {
    let name = crate::config::EnvName::parse(env)?;
    let applying = Some(EnvStatus::Applying);
    let run_id = shared
        .start_run(env, commit, RunKind::Apply, applying)
        .await?;
    let applied = async {
        tracing::info!("applying");
        let started = std::time::Instant::now();
        let identity = shared
            .identities
            .establish(&name, &trusted.aws, Lane::Merged, commit)
            .await;
        let ended = match identity {
            Ok(identity) => {
                let workdir = shared.workdir(&name, Lane::Merged);
                let cancel = CancellationToken::new();
                shared
                    .runner
                    .apply(&workdir, record, &identity.run_env, &cancel)
                    .await
                    .map_err(|error| ApplyFailure {
                        stale: matches!(error, TerraformError::StalePlan { .. }),
                        message: error.to_string(),
                    })
            }
            Err(error) => Err(ApplyFailure {
                message: error.to_string(),
                stale: false,
            }),
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
pub(super) async fn record_apply(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    run_id: i64,
    record: &PlanRecord,
    reason: ApplyReason,
    ended: Result<(), String>,
) -> WorkResult {
    if let Err(message) = ended {
        return apply_failed(shared, env, commit, run_id, record, message).await;
    }
    tracing::info!("applied");
    let s = &record.summary;
    let counts = format!(
        "{} added, {} changed, {} destroyed",
        s.add, s.change, s.destroy
    );
    let (what, message) = match &reason {
        ApplyReason::Commit { approved_by, .. } if !approved_by.is_empty() => {
            let what = format!("approved by {}", approvers(approved_by));
            let message = format!("applied {}: {counts}; {what}", commit.short());
            (what, message)
        }
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
        what.clone(),
    );
    let mut audit = format!("run {run_id}");
    // A remediation re-applies the last applied commit: where the environment is stays.
    let remediation = match reason {
        ApplyReason::Commit {
            fingerprint,
            approved_by,
        } => {
            applied = applied.last_applied(&fingerprint, &record.inputs);
            if !approved_by.is_empty() {
                audit = format!("{audit}; {what}");
                applied = applied.approved_by(approved_by.clone());
                alert.approved_by = approved_by;
            }
            false
        }
        ApplyReason::Remediation { .. } => true,
    };
    let applied = applied
        .status(EnvStatus::InSync)
        .audit("applied", audit)
        .alert(alert);
    let applied = back_in_sync(shared, env, commit, remediation, applied).await?;
    shared.record(applied).await?;
    Ok(())
}

/// Apply run `run_id` ended `failed` with `message`, alerted as `apply_failed`; the caller
/// adds the environment's status.
pub(super) fn failed_apply(
    env: &str,
    commit: &CommitId,
    run_id: i64,
    record: &PlanRecord,
    message: String,
) -> Outcome {
    let alert = Alert::new(
        AlertKind::ApplyFailed,
        env,
        commit.as_str(),
        message.clone(),
    );
    Outcome::new(env, commit)
        .finish(
            run_id,
            RunKind::Apply,
            RunResult::Failed,
            summary(record),
            resources(record),
            message,
        )
        .alert(alert)
}

/// `alice@example.com (SHA256:…, tag karrots/approve/…)`, one per approval.
pub(super) fn approvers(approved_by: &[Approval]) -> String {
    approved_by
        .iter()
        .map(|approval| {
            format!(
                "{} ({}, tag {})",
                approval.email, approval.fingerprint, approval.tag
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records apply run `run_id` failed: the environment `failed`, alerted.
async fn apply_failed(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    run_id: i64,
    record: &PlanRecord,
    message: String,
) -> WorkResult {
    tracing::error!(error = %message, "apply failed");
    let failed = failed_apply(env, commit, run_id, record, message).status(EnvStatus::Failed);
    shared.record(failed).await?;
    Ok(())
}

/// After an apply (or a plan with nothing to do) the environment is exactly its commit: drift
/// is gone, added to the outcome that records it. A drift that was alerted is cleared —
/// unless the apply was the remediation, whose own `applied` alert says so.
pub(super) async fn back_in_sync(
    shared: &Shared,
    env: &str,
    commit: &CommitId,
    remediation: bool,
    outcome: Outcome,
) -> Result<Outcome, WorkError> {
    let name = env.to_string();
    let previous = shared.store(move |store| store.drift(&name)).await?;
    let was_drifted = !previous.resources.is_empty() || previous.status == DriftStatus::Drifted;
    let outcome = outcome.drift(
        DriftRow {
            status: if previous.status == DriftStatus::Unchecked {
                previous.status
            } else {
                DriftStatus::InSync
            },
            checked_at: previous.checked_at.clone(),
            in_sync_at: Some(now_rfc3339()),
            resources: Vec::new(),
            message: String::new(),
        },
        DriftStatus::InSync,
    );
    if was_drifted && !remediation {
        return Ok(outcome.alert(Alert::new(
            AlertKind::DriftCleared,
            env,
            commit.as_str(),
            format!(
                "the apply of {} brought the infrastructure back to its commit",
                commit.short()
            ),
        )));
    }
    Ok(outcome)
}
