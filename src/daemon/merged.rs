//! The merged lane's worker: carries out the effects [`crate::engine::machine::step`] decides
//! for one commit of an environment's branch (inspect, stage, plan, apply, record, wait) and
//! feeds what they found back as events. Nothing here decides: each outcome is the record
//! the machine asked for, worded and written as one journal entry.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::alert::{Alert, AlertKind};
use crate::approval::{self, Approval, ApprovalPolicy};
use crate::config::{ApplyPolicy, EnvironmentSpec, RepoPath};
use crate::engine::machine::{
    self, Effect, EnvState, Event, Inspection, Phase, Record, Staging, Streak,
};
use crate::engine::reconcile::{MergedState, PlanOutcome, touches_inputs};
use crate::engine::retry::ErrorClass;
use crate::engine::state::{EnvStatus, RunKind, RunResult};
use crate::engine::{Lane, decide_lane};
use crate::git::{self, CommitId};
use crate::repo::CheckedEnvironment;
use crate::signature::Signer;
use crate::store::{EnvironmentRow, Summary};
use crate::terraform::{PlanRecord, StageError};

use super::Shared;
use super::outcome::Outcome;
use super::scheduler::Priority;
use super::steps::{
    ApplyReason, WorkError, WorkResult, config_error, doomed, failed_apply, plan, problem_lines,
    record_apply, refuse, resources, run_span, stage, start_apply, summary,
};

/// What the merged lane keeps between commits: the machine's streak and phase (a commit
/// waiting to be tried again, or its plan waiting for approvals), when that retry is due,
/// and the plan that waits.
#[derive(Debug, Default)]
pub(super) struct MergedLane {
    streak: Streak,
    phase: Phase,
    pub(super) retry_at: Option<tokio::time::Instant>,
    /// Boxed: an idle worker of an environment without approvals holds a pointer, not a plan.
    waiting: Option<Box<WaitingPlan>>,
}

/// A saved plan waiting for its approvals: its run, and the tags already reported as not
/// counting (each is reported once).
#[derive(Debug)]
struct WaitingPlan {
    run_id: i64,
    record: PlanRecord,
    reported: BTreeSet<String>,
}

impl MergedLane {
    /// The retry's event, once its time has come.
    pub(super) fn take_retry(&mut self) -> Option<Event> {
        self.retry_at.take().map(|_| Event::RetryDue)
    }

    /// Whether a saved plan waits for approvals.
    pub(super) fn awaits_approval(&self) -> bool {
        matches!(self.phase, Phase::AwaitingApproval { .. })
    }
}

/// Drives the machine from `event` until it asks for nothing more.
pub(super) async fn merged(
    shared: &Arc<Shared>,
    env: &str,
    lane: &mut MergedLane,
    event: Event,
    stop: &CancellationToken,
) -> WorkResult {
    let Some(trusted) = shared.trusted(env) else {
        return Ok(());
    };
    if shared.ownership.is_some() && trusted.terraform.backend == crate::config::Backend::Local {
        // Its state would live on whichever host ran it last.
        let Event::Head { commit } = &event else {
            return Ok(());
        };
        let message = "terraform.backend is local, and the daemons share a PostgreSQL store: the state would live on one host's disk; use the s3 backend".to_string();
        return config_error(
            shared,
            env,
            &CommitId::from_hex(commit),
            RunKind::Plan,
            message,
        )
        .await;
    }
    let name = env.to_string();
    let row = shared
        .store(move |store| store.environment(&name))
        .await?
        .unwrap_or_default();
    if lane.phase == Phase::Idle
        && row.status == EnvStatus::AwaitingApproval
        && trusted.approval.is_some()
        && let Event::Head { commit } = &event
    {
        resume_waiting(shared, env, commit, lane).await?;
    }
    let state = EnvState {
        streak: std::mem::take(&mut lane.streak),
        phase: std::mem::take(&mut lane.phase),
        ..recorded_state(&row, trusted.apply)
    };
    let waiting = lane.waiting.take();
    let mut run = Run {
        shared,
        env,
        trusted: &trusted,
        row: &row,
        stop,
        checked: None,
        plan: waiting
            .as_ref()
            .map(|waiting| (waiting.run_id, Ok(waiting.record.clone()))),
        apply_run: None,
        permit: None,
        retry_at: None,
        approvals: Vec::new(),
        reported: waiting.map(|waiting| waiting.reported).unwrap_or_default(),
    };
    let (state, result) = drive(state, &mut run, event).await;
    lane.waiting = match (&state.phase, run.plan) {
        (Phase::AwaitingApproval { .. }, Some((run_id, Ok(record)))) => {
            Some(Box::new(WaitingPlan {
                run_id,
                record,
                reported: run.reported,
            }))
        }
        _ => None,
    };
    lane.streak = state.streak;
    lane.phase = state.phase;
    lane.retry_at = run.retry_at;
    result
}

/// After a restart, the plan that waited for approvals of `commit` waits again, unless it
/// is gone: the environment's newest merged plan run is of `commit`, has changes, and its
/// saved plan is still in the workdir with the hash the run recorded. Its approvals then
/// still count; otherwise the commit is planned again, and needs approvals of the new plan.
async fn resume_waiting(
    shared: &Arc<Shared>,
    env: &str,
    commit: &str,
    lane: &mut MergedLane,
) -> WorkResult {
    let name = env.to_string();
    let runs = shared
        .store(move |store| store.runs(Some(&name), RESUME_LOOKBACK))
        .await?;
    let Some(run) = runs.into_iter().find(|run| run.kind == RunKind::Plan) else {
        return Ok(());
    };
    if run.commit != commit || run.result != Some(RunResult::Changes) {
        return Ok(());
    }
    let workdir = shared.workdir(&crate::config::EnvName::parse(env)?, Lane::Merged);
    let saved = crate::terraform::RunId::parse(&format!("run-{}", run.id))
        .ok()
        .and_then(|id| crate::terraform::saved_plan(&workdir, &id));
    let Some(record) = saved.filter(|record| {
        Some(&record.plan_sha256) == run.plan_sha256.as_ref() && record.commit == commit
    }) else {
        tracing::info!(
            run = run.id,
            "the plan that waited for approvals is gone; planning again"
        );
        return Ok(());
    };
    tracing::info!(run = run.id, "the plan still waits for approvals");
    lane.phase = Phase::AwaitingApproval {
        commit: commit.to_string(),
        fingerprint: record.fingerprint.clone(),
    };
    lane.waiting = Some(Box::new(WaitingPlan {
        run_id: run.id,
        record,
        reported: BTreeSet::new(),
    }));
    Ok(())
}

/// How many of an environment's newest runs are searched for the plan that waited.
const RESUME_LOOKBACK: usize = 50;

/// What carrying out the machine's effects takes: the world (git, the checks, terraform and
/// AWS, the store) for the daemon ([`Run`]), a script in the tests.
pub(super) trait Effects {
    /// Carries out `effect`; returns the event it produced, if any.
    async fn carry_out(&mut self, effect: Effect) -> Result<Option<Event>, WorkError>;
}

/// Feeds `event` to the machine and carries out what it asks, feeding each result back,
/// until it asks for nothing more — or an effect fails, and nothing after it is done (the
/// state stays where it got to; the next head starts over from inspecting).
pub(super) async fn drive(
    mut state: EnvState,
    effects: &mut impl Effects,
    event: Event,
) -> (EnvState, WorkResult) {
    let mut events = VecDeque::from([event]);
    while let Some(event) = events.pop_front() {
        let asked;
        (state, asked) = machine::step(state, event);
        for effect in asked {
            match effects.carry_out(effect).await {
                Ok(Some(event)) => events.push_back(event),
                Ok(None) => {}
                Err(error) => return (state, Err(error)),
            }
        }
    }
    (state, Ok(()))
}

/// One commit's way through the lane: what its effects found so far.
struct Run<'a> {
    shared: &'a Arc<Shared>,
    env: &'a str,
    trusted: &'a EnvironmentSpec,
    row: &'a EnvironmentRow,
    stop: &'a CancellationToken,
    /// The staged commit, once staging passed.
    checked: Option<CheckedEnvironment>,
    /// The plan's run, and the plan (or why it failed).
    plan: Option<(i64, Result<PlanRecord, String>)>,
    /// The apply's run, once it started.
    apply_run: Option<i64>,
    /// Held from the plan through the apply.
    permit: Option<tokio::sync::SemaphorePermit<'a>>,
    retry_at: Option<tokio::time::Instant>,
    /// The approvals that counted for the plan, once there are enough.
    approvals: Vec<Approval>,
    /// The approval tags already reported as not counting.
    reported: BTreeSet<String>,
}

impl Effects for Run<'_> {
    async fn carry_out(&mut self, effect: Effect) -> Result<Option<Event>, WorkError> {
        match effect {
            Effect::Inspect { commit } => {
                let found = self.inspect(&CommitId::from_hex(&commit)).await?;
                Ok(Some(Event::Inspected(found)))
            }
            Effect::Stage { commit } => {
                let staged = self.stage(&CommitId::from_hex(&commit)).await?;
                Ok(Some(Event::Staged(staged)))
            }
            Effect::Plan { commit } => self.plan(&CommitId::from_hex(&commit)).await,
            Effect::Apply { commit } => {
                let commit = CommitId::from_hex(&commit);
                let Some((_, Ok(record))) = &self.plan else {
                    return Err(WorkError::Other("an apply without its plan".into()));
                };
                let (run_id, ended) =
                    start_apply(self.shared, self.env, &commit, record, self.trusted).await?;
                self.apply_run = Some(run_id);
                Ok(Some(match ended {
                    Err(failure) if failure.stale => Event::ApplyStale {
                        message: failure.message,
                    },
                    ended => Event::ApplyEnded(ended.map_err(|failure| failure.message)),
                }))
            }
            Effect::CountApprovals { commit } => {
                let approved = self.count_approvals(&CommitId::from_hex(&commit)).await?;
                Ok(Some(Event::ApprovalsCounted { approved }))
            }
            Effect::Record(record) => {
                self.record(record).await?;
                Ok(None)
            }
            Effect::RetryAfter(after) => {
                self.retry_at = Some(tokio::time::Instant::now() + after);
                Ok(None)
            }
        }
    }
}

impl Run<'_> {
    /// From git, on one blocking thread: whether the commit is on the first-parent chain of
    /// exactly `refs/remotes/origin/<branch>` (whatever name the queue was given it under),
    /// its ancestry, and whether it changed any path of the last applied commit's input
    /// closure (when that closure is known).
    async fn inspect(&self, commit: &CommitId) -> Result<Inspection, WorkError> {
        let shared = self.shared;
        let (mirror, commit, branch) = (
            shared.mirror.path().to_path_buf(),
            commit.clone(),
            self.trusted.branch.to_string(),
        );
        let last = self.row.last_applied.as_deref().map(CommitId::from_hex);
        let inputs = self.row.applied_inputs.clone();
        let compared = last
            .as_ref()
            .and_then(|last| shared.changed_paths(last, &commit));
        let signers = self.signers()?;
        let _git = shared.git_work.acquire().await;
        let found = tokio::task::spawn_blocking(move || {
            let repo = git::open(&mirror)?;
            let on_branch = match git::branch_tip(&repo, &branch) {
                Some(tip) => git::on_first_parent_chain(&repo, &tip, &commit)?,
                None => false,
            };
            let Some(last) = last.filter(|_| on_branch) else {
                let unsigned = match &signers {
                    Some(signers) if on_branch => unsigned(&repo, None, &commit, signers)?,
                    _ => None,
                };
                return Ok::<_, git::GitError>(Inspection {
                    on_branch,
                    descends: true,
                    untouched: false,
                    unsigned,
                });
            };
            let changes = match compared {
                Some(changed) => Some(changed),
                None => git::mirror::changes_since(&repo, &last, &commit)?,
            };
            let untouched = match (&inputs, &changes) {
                (Some(inputs), Some(changed)) => !touches_inputs(changed, inputs),
                _ => false,
            };
            let unsigned = match &signers {
                Some(signers) if changes.is_some() && last != commit => {
                    unsigned(&repo, Some(&last), &commit, signers)?
                }
                _ => None,
            };
            Ok(Inspection {
                on_branch,
                descends: changes.is_some(),
                untouched,
                unsigned,
            })
        })
        .await??;
        Ok(found)
    }

    /// The signers every commit applied must be signed by, when `verify.signed_commits` is
    /// on (the trust branch's).
    fn signers(&self) -> Result<Option<Vec<Signer>>, WorkError> {
        let verify = &self.trusted.verify;
        if !verify.signed_commits {
            return Ok(None);
        }
        let signers = verify
            .signers
            .iter()
            .map(Signer::allowed)
            .collect::<Result<Vec<Signer>, String>>()
            .map_err(WorkError::Other)?;
        Ok(Some(signers))
    }

    async fn stage(&mut self, commit: &CommitId) -> Result<Staging, WorkError> {
        let checked = match stage(self.shared, self.env, Lane::Merged, commit).await? {
            Ok(checked) => checked,
            Err(StageError::Refused(problems)) => {
                return Ok(Staging::Refused {
                    message: format!(
                        "the commit does not pass karrots check:\n{}",
                        problem_lines(&problems)
                    ),
                });
            }
            Err(error) => return Err(error.into()),
        };
        if let Err(refusal) = decide_lane(Some(self.trusted), &checked.spec, true) {
            let trust = self.shared.config.trust_branch.as_str();
            return Ok(Staging::Refused {
                message: refusal.reason(trust),
            });
        }
        let fingerprint = checked.fingerprint.to_string();
        self.checked = Some(checked);
        Ok(Staging::Checked { fingerprint })
    }

    /// Plans the staged commit as a `plan` run (the environment `planning`), with a permit
    /// that merged runs get first. `None` when the daemon stops before it starts.
    async fn plan(&mut self, commit: &CommitId) -> Result<Option<Event>, WorkError> {
        let (shared, env, stop) = (self.shared, self.env, self.stop);
        let Some(permit) = shared.scheduler.permit(Priority::First).await else {
            return Ok(None);
        };
        self.permit = Some(permit);
        if stop.is_cancelled() {
            return Ok(None);
        }
        let Some(checked) = &self.checked else {
            return Err(WorkError::Other("a plan without a staged commit".into()));
        };
        let planning = Some(EnvStatus::Planning);
        let run_id = shared
            .start_run(env, commit, RunKind::Plan, planning)
            .await?;
        let span = run_span(env, Lane::Merged, commit, run_id);
        let planned = plan(shared, env, Lane::Merged, commit, checked, run_id, stop)
            .instrument(span.clone())
            .await;
        let event = match &planned {
            Ok(record) => Event::Planned(PlanOutcome {
                has_changes: record.summary.has_changes(),
                destroys: record.summary.destroys(),
            }),
            Err(error) => {
                let _enter = span.enter();
                tracing::warn!(%error, "the plan did not succeed");
                if stop.is_cancelled() {
                    Event::Interrupted
                } else {
                    Event::PlanFailed {
                        class: error.class(),
                        message: error.to_string(),
                        jitter: fastrand::f64(),
                    }
                }
            }
        };
        self.plan = Some((run_id, planned.map_err(|error| error.to_string())));
        Ok(Some(event))
    }

    /// The outcome that ends the plan's run with its result: the caller adds what was
    /// decided after it and records them together.
    fn planned(&self, commit: &CommitId) -> Result<(Outcome, &PlanRecord), WorkError> {
        let Some((run_id, Ok(record))) = &self.plan else {
            return Err(WorkError::Other("no plan to record".into()));
        };
        let result = if record.summary.has_changes() {
            RunResult::Changes
        } else {
            RunResult::NoChanges
        };
        let outcome = Outcome::new(self.env, commit)
            .finish(
                *run_id,
                RunKind::Plan,
                result,
                summary(record),
                resources(record),
                "",
            )
            .plan_sha256(&record.plan_sha256);
        Ok((outcome, record))
    }

    /// The input closure of the commit the environment is now at: the staged one, or (when
    /// it was passed over unstaged) the last applied one's, which it shares.
    fn inputs(&self) -> BTreeSet<RepoPath> {
        match &self.checked {
            Some(checked) => checked.inputs.clone(),
            None => self.row.applied_inputs.clone().unwrap_or_default(),
        }
    }

    async fn record(&self, record: Record) -> WorkResult {
        let hex = |commit: &str| CommitId::from_hex(commit);
        match record {
            Record::NotOnBranch { commit } => self.not_on_branch(&hex(&commit)).await,
            Record::HistoryRewritten {
                commit,
                last_applied,
            } => self.history_rewritten(&hex(&commit), &last_applied).await,
            Record::PassedOver {
                commit,
                fingerprint,
                staged,
                status,
            } => {
                self.passed_over(&hex(&commit), &fingerprint, staged, status)
                    .await
            }
            Record::Unsigned { commit, message } => {
                let commit = hex(&commit);
                let alert = Alert::new(AlertKind::Refused, self.env, commit.as_str(), message);
                let refused = Some(EnvStatus::Refused);
                refuse(self.shared, &commit, RunKind::Plan, refused, alert).await
            }
            Record::ConfigError { commit, message } => {
                config_error(self.shared, self.env, &hex(&commit), RunKind::Plan, message).await
            }
            Record::Planned { commit } => {
                let (planned, _) = self.planned(&hex(&commit))?;
                self.write(planned).await
            }
            Record::InSync {
                commit,
                fingerprint,
            } => self.in_sync(&hex(&commit), &fingerprint).await,
            Record::AwaitingApproval { commit } => self.awaiting_approval(&hex(&commit)).await,
            Record::ApprovedPlanStale { commit, message } => {
                self.approved_plan_stale(&hex(&commit), &message).await
            }
            Record::RefusedDestroy { commit } => self.refused_destroy(&hex(&commit)).await,
            Record::PlanFailed {
                commit,
                message,
                class,
                attempt,
                status,
                retry_after,
                alert,
            } => {
                let failure = Failure {
                    class,
                    attempt,
                    status,
                    retry_after,
                    alert,
                };
                self.plan_failed(&hex(&commit), &message, &failure).await
            }
            Record::PlanInterrupted { commit } => self.plan_interrupted(&hex(&commit)).await,
            Record::Applied {
                commit,
                fingerprint,
            } => self.applied(&commit, fingerprint, Ok(())).await,
            Record::ApplyFailed { commit, message } => {
                self.applied(&commit, String::new(), Err(message)).await
            }
        }
    }

    /// The plan waits: with `apply.approval`, for the approvals the run's message says how
    /// to give (alerted once); with `apply.auto: false` alone, for nothing that can come.
    async fn awaiting_approval(&self, commit: &CommitId) -> WorkResult {
        let (planned, record) = self.planned(commit)?;
        let Some(approval) = &self.trusted.approval else {
            return self
                .write(planned.status(EnvStatus::AwaitingApproval).audit(
                    "awaiting_approval",
                    "apply.auto is false and apply.approval names no approvers: the plan is not applied",
                ))
                .await;
        };
        let command = approve_command(self.env, commit, &record.plan_sha256);
        let needed = format!(
            "the plan of {} (+{} ~{} -{}) waits for {} approval{} of plan sha256:{}; an approver runs: {command}",
            commit.short(),
            record.summary.add,
            record.summary.change,
            record.summary.destroy,
            approval.required,
            if approval.required == 1 { "" } else { "s" },
            record.plan_sha256,
        );
        let mut alert = Alert::new(
            AlertKind::ApprovalNeeded,
            self.env,
            commit.as_str(),
            needed.clone(),
        );
        alert.resources = resources(record);
        let run_id = self.plan.as_ref().map(|(id, _)| *id).unwrap_or_default();
        let waiting = planned
            .message(format!("approve with: {command}"))
            .status(EnvStatus::AwaitingApproval)
            .audit("awaiting_approval", format!("run {run_id}: {needed}"))
            .alert(alert);
        self.write(waiting).await
    }

    /// The approved plan went stale before it was applied: its apply run failed, alerted, and
    /// the commit is planned again (its new plan needs approvals of its own).
    async fn approved_plan_stale(&self, commit: &CommitId, message: &str) -> WorkResult {
        let (Some((_, Ok(record))), Some(run_id)) = (&self.plan, self.apply_run) else {
            return Err(WorkError::Other(
                "a stale plan's outcome without its run".into(),
            ));
        };
        let text = format!(
            "the approved plan of {} (sha256:{}) could not be applied: {message}; the commit is planned again, and the new plan needs approvals of its own",
            commit.short(),
            record.plan_sha256
        );
        let stale = failed_apply(self.env, commit, run_id, record, text.clone())
            .approved_by(self.approvals.clone())
            .status(EnvStatus::Planning)
            .audit("approved_plan_stale", format!("run {run_id}: {text}"));
        self.write(stale).await
    }

    /// Counts the approval tags of the waiting plan under the trust branch's
    /// `apply.approval`; reports each tag that does not count, once. Enough approvals are
    /// kept for the apply's record.
    async fn count_approvals(&mut self, commit: &CommitId) -> Result<bool, WorkError> {
        let Some(settings) = &self.trusted.approval else {
            return Ok(false);
        };
        let policy = ApprovalPolicy::from_settings(settings).map_err(WorkError::Other)?;
        let Some((_, Ok(record))) = &self.plan else {
            return Err(WorkError::Other("approvals without a plan".into()));
        };
        let (mirror, env, head) = (
            self.shared.mirror.path().to_path_buf(),
            self.env.to_string(),
            commit.clone(),
        );
        let last = self.row.last_applied.as_deref().map(CommitId::from_hex);
        let (tags, authors) = tokio::task::spawn_blocking(move || {
            let repo = git::open(&mirror)?;
            let tags = git::signed::approval_tags(&repo, &env)?;
            let authors = git::signed::authors_since(&repo, last.as_ref(), &head)?;
            Ok::<_, git::GitError>((tags, authors))
        })
        .await??;
        let plan = approval::Plan {
            env: self.env,
            commit: commit.as_str(),
            sha256: &record.plan_sha256,
            authors: &authors,
        };
        let tally = approval::tally(&tags, &plan, &policy);
        for (tag, why) in &tally.refused {
            if self.reported.insert(tag.clone()) {
                tracing::warn!(%tag, reason = %why, "an approval tag does not count");
                let refused = Outcome::new(self.env, commit)
                    .audit("approval_not_counted", format!("{tag}: {why}"));
                self.write(refused).await?;
            }
        }
        tracing::info!(
            counted = tally.counted.len(),
            required = policy.required,
            "approvals counted"
        );
        if !tally.approved(&policy) {
            return Ok(false);
        }
        self.approvals = tally.counted;
        Ok(true)
    }

    async fn write(&self, outcome: Outcome) -> WorkResult {
        self.shared
            .record(outcome)
            .await
            .map(drop)
            .map_err(Into::into)
    }

    async fn passed_over(
        &self,
        commit: &CommitId,
        fingerprint: &str,
        staged: bool,
        status: Option<EnvStatus>,
    ) -> WorkResult {
        let reason = if staged {
            "the commit does not change the environment's inputs"
        } else {
            UNTOUCHED
        };
        let inputs = self.inputs();
        self.write(passed_over(
            self.env,
            commit,
            fingerprint,
            &inputs,
            reason,
            status,
        ))
        .await
    }

    async fn plan_failed(&self, commit: &CommitId, message: &str, failure: &Failure) -> WorkResult {
        let run_id = self.plan.as_ref().map(|(id, _)| *id).unwrap_or_default();
        self.write(plan_failed(self.env, commit, run_id, message, failure))
            .await
    }

    async fn not_on_branch(&self, commit: &CommitId) -> WorkResult {
        let message = format!(
            "{} is not on the first-parent chain of branch {}: only commits merged there are planned and applied",
            commit.short(),
            self.trusted.branch
        );
        let alert = Alert::new(AlertKind::Refused, self.env, commit.as_str(), message);
        refuse(self.shared, commit, RunKind::Plan, None, alert).await
    }

    async fn history_rewritten(&self, commit: &CommitId, last_applied: &str) -> WorkResult {
        let message = format!(
            "{} does not descend from the last applied commit {}: history was rewritten (force-push or rewind); nothing is applied until the branch descends from it again",
            commit.short(),
            &last_applied[..7.min(last_applied.len())]
        );
        let alert = Alert::new(
            AlertKind::HistoryRewritten,
            self.env,
            commit.as_str(),
            message,
        );
        let refused = Some(EnvStatus::Refused);
        refuse(self.shared, commit, RunKind::Plan, refused, alert).await
    }

    async fn in_sync(&self, commit: &CommitId, fingerprint: &str) -> WorkResult {
        let (planned, _) = self.planned(commit)?;
        let in_sync =
            super::steps::back_in_sync(self.shared, self.env, commit, false, planned).await?;
        self.write(
            in_sync
                .last_applied(fingerprint, &self.inputs())
                .status(EnvStatus::InSync)
                .audit("in_sync", "the plan has no changes"),
        )
        .await
    }

    async fn refused_destroy(&self, commit: &CommitId) -> WorkResult {
        let (planned, record) = self.planned(commit)?;
        self.write(planned).await?;
        let doomed = doomed(record);
        let message = format!(
            "the plan deletes or replaces {} and apply.allow_destroy is false: {}",
            doomed.len(),
            doomed.join(", ")
        );
        let mut alert = Alert::new(AlertKind::Refused, self.env, commit.as_str(), message);
        alert.resources = resources(record);
        let refused = Some(EnvStatus::Refused);
        refuse(self.shared, commit, RunKind::Apply, refused, alert).await
    }

    async fn plan_interrupted(&self, commit: &CommitId) -> WorkResult {
        let Some((run_id, Err(error))) = &self.plan else {
            return Ok(());
        };
        let ended = Outcome::new(self.env, commit)
            .finish(
                *run_id,
                RunKind::Plan,
                RunResult::Interrupted,
                Summary::default(),
                Vec::new(),
                error.clone(),
            )
            .status(EnvStatus::Failed);
        self.write(ended).await
    }

    async fn applied(
        &self,
        commit: &str,
        fingerprint: String,
        ended: Result<(), String>,
    ) -> WorkResult {
        let (Some((_, Ok(record))), Some(run_id)) = (&self.plan, self.apply_run) else {
            return Err(WorkError::Other(
                "an apply's outcome without its run".into(),
            ));
        };
        let commit = CommitId::from_hex(commit);
        let span = run_span(self.env, Lane::Merged, &commit, run_id);
        let reason = ApplyReason::Commit {
            fingerprint,
            approved_by: self.approvals.clone(),
        };
        record_apply(
            self.shared,
            self.env,
            &commit,
            run_id,
            record,
            reason,
            ended,
        )
        .instrument(span)
        .await
    }
}

/// The machine's state of an environment as the store records it, idle, with no failures
/// in a row (the worker keeps those between commits).
fn recorded_state(row: &EnvironmentRow, apply: ApplyPolicy) -> EnvState {
    EnvState {
        status: row.status,
        merged: MergedState {
            last_applied: row.last_applied.clone(),
            applied_fingerprint: row.applied_fingerprint.clone(),
        },
        apply,
        streak: Streak::default(),
        phase: Phase::Idle,
    }
}

/// What the machine decides for the new head of an idle environment, a descendant of its
/// last applied commit that changes no path of that commit's input closure: `Some(None)`
/// when it is where the environment already is, `Some(outcome)` when it is passed over, and
/// `None` when it is for the environment's worker to decide.
pub(super) fn pass_over(
    row: &EnvironmentRow,
    apply: ApplyPolicy,
    head: &CommitId,
    inputs: &BTreeSet<RepoPath>,
) -> Option<Option<Outcome>> {
    let state = recorded_state(row, apply);
    let head_event = Event::Head {
        commit: head.to_string(),
    };
    let (state, _) = machine::step(state, head_event);
    let found = Inspection {
        on_branch: true,
        descends: true,
        untouched: true,
        unsigned: None,
    };
    match machine::step(state, Event::Inspected(found)).1.as_slice() {
        [] => Some(None),
        [
            Effect::Record(Record::PassedOver {
                fingerprint,
                staged: false,
                status,
                ..
            }),
        ] => Some(Some(passed_over(
            &row.name,
            head,
            fingerprint,
            inputs,
            UNTOUCHED,
            *status,
        ))),
        _ => None,
    }
}

/// Why the first commit of the first-parent chain from `last` (not included) to `head` that
/// carries no valid signature of a signer does not count, if one does not.
fn unsigned(
    repo: &git2::Repository,
    last: Option<&CommitId>,
    head: &CommitId,
    signers: &[Signer],
) -> Result<Option<String>, git::GitError> {
    for commit in git::signed::first_parents_since(repo, last, head)? {
        if let Err(refusal) = git::signed::verify_commit(repo, &commit, signers)? {
            return Ok(Some(format!(
                "commit {} {refusal}; verify.signed_commits asks every commit on the branch since the last applied one to be signed by one of verify.signers, so nothing is planned or applied while it stands between the last applied commit and the head",
                commit.short()
            )));
        }
    }
    Ok(None)
}

/// The command an approver runs to approve the plan `sha256` of `commit`: a signed tag
/// naming the environment, the commit and the plan, pushed.
pub(super) fn approve_command(env: &str, commit: &CommitId, sha256: &str) -> String {
    let tag = format!("karrots/approve/{env}/{commit}/$USER");
    format!("git tag -s -m \"plan: sha256:{sha256}\" {tag} {commit} && git push origin {tag}")
}

/// Why a commit whose changed paths miss the applied closure is passed over.
const UNTOUCHED: &str = "the commit changes no path the environment is built from";

/// The outcome of a merged commit that leaves the environment's inputs as last applied: it
/// becomes the last applied commit, with the status the machine decided (in sync again,
/// when a refusal or a wait no longer stands).
pub(super) fn passed_over(
    env: &str,
    commit: &CommitId,
    fingerprint: &str,
    inputs: &BTreeSet<RepoPath>,
    reason: &str,
    status: Option<EnvStatus>,
) -> Outcome {
    let unaffected = Outcome::new(env, commit)
        .last_applied(fingerprint, inputs)
        .audit("unaffected", reason);
    match status {
        Some(status) => unaffected.status(status),
        None => unaffected,
    }
}

/// How a merged plan failed, as the machine decided it.
struct Failure {
    class: ErrorClass,
    attempt: u32,
    status: EnvStatus,
    retry_after: Option<Duration>,
    alert: bool,
}

/// The outcome of a merged plan that failed, and whether and when its commit is tried again:
/// a passing failure leaves the environment `error` until the next attempt, any other
/// `failed` until a new commit. A merged commit is there to be applied, so a failed plan is
/// an `apply_failed` alert: on the first failure of a streak, and when the retries give up.
fn plan_failed(
    env: &str,
    commit: &CommitId,
    run_id: i64,
    text: &str,
    failure: &Failure,
) -> Outcome {
    let attempt = failure.attempt;
    let next = match failure.retry_after {
        Some(after) => {
            let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + after);
            match failure.class {
                ErrorClass::Transient => {
                    format!("; a passing failure (attempt {attempt}): tried again at {at}")
                }
                _ => format!("; tried once more at {at}, in case the failure passes"),
            }
        }
        None if attempt > 1 => {
            format!("; failed the same way {attempt} times: not tried again until a new commit")
        }
        None => String::new(),
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
        .status(failure.status)
        .audit(failure.status.as_str(), format!("run {run_id}{next}"));
    if !failure.alert {
        return failed;
    }
    failed.alert(Alert::new(
        AlertKind::ApplyFailed,
        env,
        commit.as_str(),
        format!(
            "the plan of {} failed, so nothing was applied{next}: {text}",
            commit.short()
        ),
    ))
}

#[cfg(test)]
mod tests {
    //! The merged lane driven without git, terraform or a store: a scripted world answers
    //! each effect, and the tests look at what was carried out and recorded.
    use std::collections::VecDeque;

    use super::*;
    use crate::config::ApplyPolicy;

    /// What the world answers, in order, and what was done in it.
    #[derive(Default)]
    struct Script {
        plans: VecDeque<Result<PlanOutcome, (ErrorClass, &'static str)>>,
        /// The record (counted from 0) whose write fails, as a full disk or a kill would.
        failing_record: Option<usize>,
        records: usize,
        done: Vec<String>,
        recorded: Vec<Record>,
        retry: Option<Duration>,
    }

    impl Effects for Script {
        async fn carry_out(&mut self, effect: Effect) -> Result<Option<Event>, WorkError> {
            self.done.push(format!("{effect:?}"));
            let event = match effect {
                Effect::Inspect { .. } => Event::Inspected(Inspection {
                    on_branch: true,
                    descends: true,
                    untouched: false,
                    unsigned: None,
                }),
                Effect::Stage { commit } => Event::Staged(Staging::Checked {
                    fingerprint: format!("fp-{commit}"),
                }),
                Effect::Plan { .. } => match self.plans.pop_front().expect("a scripted plan") {
                    Ok(plan) => Event::Planned(plan),
                    Err((class, message)) => Event::PlanFailed {
                        class,
                        message: message.into(),
                        jitter: 0.0,
                    },
                },
                Effect::Apply { .. } => Event::ApplyEnded(Ok(())),
                Effect::CountApprovals { .. } => Event::ApprovalsCounted { approved: false },
                Effect::Record(record) => {
                    self.records += 1;
                    if self.failing_record == Some(self.records - 1) {
                        return Err(WorkError::Other("the store refused the write".into()));
                    }
                    self.recorded.push(record);
                    return Ok(None);
                }
                Effect::RetryAfter(after) => {
                    self.retry = Some(after);
                    return Ok(None);
                }
            };
            Ok(Some(event))
        }
    }

    fn fresh() -> EnvState {
        EnvState {
            status: EnvStatus::Planning,
            merged: MergedState::default(),
            apply: ApplyPolicy {
                auto: true,
                allow_destroy: false,
            },
            streak: Streak::default(),
            phase: Phase::Idle,
        }
    }

    fn head(commit: &str) -> Event {
        Event::Head {
            commit: commit.into(),
        }
    }

    const CHANGES: PlanOutcome = PlanOutcome {
        has_changes: true,
        destroys: false,
    };

    /// The kinds of what was recorded, e.g. `PlanFailed`.
    fn kinds(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|record| {
                format!("{record:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_and_then_applied() {
        let mut world = Script::default();
        world
            .plans
            .push_back(Err((ErrorClass::Transient, "sts: connection refused")));
        world.plans.push_back(Ok(CHANGES));
        let (waiting, result) = drive(fresh(), &mut world, head("b")).await;
        assert!(result.is_ok());
        assert_eq!(waiting.status, EnvStatus::Error);
        assert!(world.retry.is_some(), "a retry is asked for");
        let (applied, result) = drive(waiting, &mut world, Event::RetryDue).await;
        assert!(result.is_ok());
        assert_eq!(kinds(&world.recorded), ["PlanFailed", "Planned", "Applied"]);
        assert_eq!(applied.status, EnvStatus::InSync);
        assert_eq!(applied.merged.last_applied.as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn a_permanent_failure_is_not_retried() {
        let mut world = Script::default();
        world.plans.push_back(Err((ErrorClass::Permanent, "bad")));
        let (failed, _) = drive(fresh(), &mut world, head("b")).await;
        assert_eq!(failed.status, EnvStatus::Failed);
        assert_eq!(world.retry, None);
        let done = world.done.len();
        let (_, result) = drive(failed, &mut world, Event::RetryDue).await;
        assert!(result.is_ok());
        assert_eq!(world.done.len(), done, "a retry's time does nothing");
    }

    #[tokio::test]
    async fn a_newer_commit_during_a_retry_wins() {
        let mut world = Script::default();
        world
            .plans
            .push_back(Err((ErrorClass::Transient, "throttled")));
        world.plans.push_back(Ok(CHANGES));
        let (waiting, _) = drive(fresh(), &mut world, head("b")).await;
        let before = world.done.len();
        let (applied, _) = drive(waiting, &mut world, head("c")).await;
        assert_eq!(applied.merged.last_applied.as_deref(), Some("c"));
        let done = world.done.len();
        let (_, _) = drive(applied, &mut world, Event::RetryDue).await;
        assert_eq!(world.done.len(), done, "b is never tried again");
        let after = &world.done[before..];
        assert!(
            !after.iter().any(|effect| effect.contains("\"b\"")),
            "{after:?}"
        );
    }

    /// A write that fails (a full disk, a kill) at any step: nothing after it is carried out,
    /// so no apply runs without its plan recorded, and the next head starts over.
    #[tokio::test]
    async fn a_failed_write_at_any_step_stops_the_lane_there() {
        for failing in 0..2 {
            let mut world = Script {
                failing_record: Some(failing),
                ..Script::default()
            };
            world.plans.push_back(Ok(CHANGES));
            let (stopped, result) = drive(fresh(), &mut world, head("b")).await;
            assert!(result.is_err(), "step {failing}");
            let last = world.done.last().unwrap();
            assert!(
                last.starts_with("Record"),
                "step {failing}: stopped at {last}"
            );
            let applies = world.done.iter().filter(|e| e.starts_with("Apply")).count();
            assert_eq!(applies, failing, "step {failing}: {:?}", world.done);
            // The daemon reads where the environment is from the store before each commit:
            // nothing was recorded applied.
            let restarted = EnvState {
                merged: MergedState::default(),
                ..stopped
            };
            world.plans.push_back(Ok(CHANGES));
            world.failing_record = None;
            let (again, result) = drive(restarted, &mut world, head("b")).await;
            assert!(result.is_ok());
            assert_eq!(
                again.merged.last_applied.as_deref(),
                Some("b"),
                "step {failing}"
            );
            assert_eq!(kinds(&world.recorded).last().unwrap(), "Applied");
        }
    }
}
