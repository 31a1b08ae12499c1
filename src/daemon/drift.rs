//! Drift checks: the merged worker of an environment re-plans its last applied commit on the
//! `drift.interval` schedule, with the apply identity and refresh on, and
//! [`crate::engine::drift`] decides what the finding means. Who changed a drifted resource
//! comes from CloudTrail; `drift.remediate` applies the check's own plan, through the same
//! guards as any apply.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::alert::{Alert, AlertKind};
use crate::aws::cloudtrail::{self, DELIVERY_MARGIN, Lookup};
use crate::engine::drift::{
    DriftAlert, DriftDecision, DriftMemory, Drifted, Finding, decide_drift,
};
use crate::engine::reconcile::{AfterPlan, PlanOutcome, decide_after_plan};
use crate::engine::state::{DriftStatus, EnvStatus, RunKind, RunResult};
use crate::engine::{Lane, decide_lane};
use crate::git::CommitId;
use crate::store::{DriftRow, DriftedResource, Summary, now_rfc3339};
use crate::terraform::{PlanRecord, RunId, StageError};

use super::Shared;
use super::outcome::Outcome;
use super::scheduler::Priority;
use super::scheduler::Queue;
use super::steps::{ApplyReason, WorkError, WorkResult, apply, refuse, stage};

/// How long the search for who changed the drifted resources may take before the alert goes
/// out without it.
const ATTRIBUTION_BOUND: Duration = Duration::from_secs(90);

/// Why a drift alert does not say who changed the resources when the search was cancelled.
const CUT_SHORT: &str =
    "who changed them is unknown: the search was cut short, as a merged commit goes first";

impl DriftedResource {
    /// A drifted resource not yet explained (no id, attributes or `changed_by`).
    fn unexplained(drifted: &Drifted) -> DriftedResource {
        DriftedResource {
            address: drifted.address.clone(),
            actions: drifted.actions.clone(),
            id: None,
            changed_attributes: Vec::new(),
            changed_by: Vec::new(),
        }
    }

    /// What the engine compares: the address and the actions.
    fn drifted(&self) -> Drifted {
        Drifted {
            address: self.address.clone(),
            actions: self.actions.clone(),
        }
    }
}

/// When the merged worker of an environment checks for drift next.
pub(super) struct DriftClock {
    /// When the last check ran (or, before the first, a moment chosen so that the first
    /// lands a share of the interval after the start).
    last: Option<Instant>,
    /// Failed checks in a row.
    failures: u32,
}

impl DriftClock {
    pub(super) fn new() -> DriftClock {
        DriftClock {
            last: None,
            failures: 0,
        }
    }

    /// When the next check is due, or `None` when drift checks are off. What it needs (the
    /// `drift:` settings of the last applied commit, and the last check's time the first
    /// time) is read on a blocking thread: the store, and git when those settings are new.
    pub(super) async fn due(&mut self, shared: &Arc<Shared>, env: &str) -> Option<Instant> {
        let first = self.last.is_none();
        let (reader, name) = (shared.clone(), env.to_string());
        let (policy, checked_at) = tokio::task::spawn_blocking(move || {
            let policy = reader.drift_policy(&name);
            let checked_at = first
                .then(|| reader.store.drift(&name).ok()?.checked_at)
                .flatten();
            (policy, checked_at)
        })
        .await
        .ok()?;
        let interval = policy?.interval?;
        let now = Instant::now();
        let last = *self.last.get_or_insert_with(|| {
            let checked_at = checked_at.and_then(|at| humantime::parse_rfc3339(&at).ok());
            match checked_at {
                // The wall clock says how long ago; the monotonic clock keeps it from here.
                Some(at) => {
                    let ago = SystemTime::now().duration_since(at).unwrap_or_default();
                    now.checked_sub(ago).unwrap_or(now)
                }
                None => {
                    let delay = crate::engine::drift::first_check_delay(env, interval);
                    (now + delay).checked_sub(interval).unwrap_or(now)
                }
            }
        });
        let wait = match self.failures {
            0 => interval,
            failures => crate::engine::drift::retry_after(interval, failures, fastrand::f64()),
        };
        Some(last + wait)
    }

    fn checked(&mut self, failed: bool) {
        self.last = Some(Instant::now());
        self.failures = if failed { self.failures + 1 } else { 0 };
    }
}

/// Runs one drift check of `env`, unless its state says there is nothing to check against
/// (never applied, or an apply that failed part-way: the state is neither commit's).
pub(super) async fn check(
    shared: &Arc<Shared>,
    env: &str,
    queue: &Queue,
    clock: &mut DriftClock,
    stop: &CancellationToken,
) -> WorkResult {
    // Another daemon holds the environment: its drift checks are that daemon's.
    if !shared.owns(env) {
        clock.checked(false);
        return Ok(());
    }
    let name = env.to_string();
    let row = shared.store(move |store| store.environment(&name)).await?;
    let (Some(trusted), Some(row)) = (shared.trusted(env), row) else {
        clock.checked(false);
        return Ok(());
    };
    let Some(last_applied) = row.last_applied.clone() else {
        clock.checked(false);
        return Ok(());
    };
    if matches!(
        row.status,
        EnvStatus::Failed | EnvStatus::Planning | EnvStatus::Applying
    ) {
        tracing::debug!(status = %row.status, "no drift check: the state is not the last applied commit's");
        clock.checked(false);
        return Ok(());
    }
    // The checkout holds the plan the approvers are looking at; a check would replace it.
    if row.status == EnvStatus::AwaitingApproval {
        tracing::debug!("no drift check: a plan waits for approvals in the checkout");
        clock.checked(false);
        return Ok(());
    }
    let commit = CommitId::from_hex(&last_applied);
    let Some(permit) = shared.scheduler.permit(Priority::AfterMerges).await else {
        return Ok(());
    };
    // A merged commit that arrives during the check cancels it: it goes first.
    let cancel = stop.child_token();
    queue.preempt_with(cancel.clone());
    if stop.is_cancelled() || queue.has_pending() {
        // One is already waiting: the check runs after it.
        return Ok(());
    }
    let run_id = shared.start_run(env, &commit, RunKind::Drift, None).await?;
    let span = super::steps::run_span(env, Lane::Merged, &commit, run_id);
    let check = Check {
        shared,
        env,
        commit,
        trusted,
        run_id,
        queue,
        cancel,
        stop,
    };
    check.run(clock, Some(permit)).instrument(span).await
}

/// One drift check of the last applied commit, as it goes.
struct Check<'a> {
    shared: &'a Arc<Shared>,
    env: &'a str,
    commit: CommitId,
    trusted: crate::config::EnvironmentSpec,
    run_id: i64,
    queue: &'a Queue,
    /// Cancelled by a merged commit (or the stop): it goes first.
    cancel: CancellationToken,
    stop: &'a CancellationToken,
}

impl<'a> Check<'a> {
    async fn run(
        &self,
        clock: &mut DriftClock,
        mut permit: Option<tokio::sync::SemaphorePermit<'a>>,
    ) -> WorkResult {
        tracing::info!("checking for drift");
        let started = Instant::now();
        let (shared, env) = (self.shared, self.env);
        let planned = drift_plan(
            shared,
            env,
            &self.commit,
            &self.trusted,
            self.run_id,
            &self.cancel,
        )
        .await;
        shared
            .metrics
            .drift_check_seconds
            .observe(started.elapsed().as_secs_f64());
        let name = env.to_string();
        let previous = shared.store(move |store| store.drift(&name)).await?;
        let planned = match planned {
            Ok(planned) => planned,
            Err(error) if self.cancel.is_cancelled() => return self.cut_short(&error).await,
            Err(error) => {
                clock.checked(true);
                return self.failed(&error, previous).await;
            }
        };
        clock.checked(false);
        let (finding, ended) = self.finding(&planned.record);
        let (reader, name, commit) = (shared.clone(), env.to_string(), self.commit.to_string());
        let remediation_on = tokio::task::spawn_blocking(move || {
            reader
                .drift_policy_at(&name, Some(&commit))
                .is_some_and(|policy| policy.remediate)
        })
        .await
        .unwrap_or(false);
        let decision = decide_drift(&memory(&previous), &finding, remediation_on);
        tracing::info!(
            status = decision.status.as_str(),
            drifted = decision.drifted.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drift checked"
        );
        let (resources, note) = self
            .explained(&planned, &decision, &previous, &mut permit)
            .await;
        self.queue.preempt_with(CancellationToken::new());
        let found = Found {
            decision: &decision,
            resources: &resources,
            note: &note,
        };
        self.record(ended, &found, &previous).await?;
        self.remediate(&decision, &planned, permit).await?;
        shared.runner.discard_plan(&planned.record)?;
        Ok(())
    }

    /// What the plan found, and the outcome that ends the check's run with it. The run is
    /// recorded with what the check concludes, after the search for who changed what: it is
    /// never shown finished while the drift is not yet known.
    fn finding(&self, record: &PlanRecord) -> (Finding, Outcome) {
        let drifted: Vec<Drifted> = record
            .summary
            .resources
            .iter()
            .map(|change| Drifted {
                address: change.address.clone(),
                actions: change.actions.clone(),
            })
            .collect();
        let short = self.commit.short();
        let (result, message) = if drifted.is_empty() {
            (RunResult::NoChanges, format!("no drift from {short}"))
        } else {
            let count = drifted.len();
            (
                RunResult::Changes,
                format!("{count} resources differ from {short}"),
            )
        };
        let ended = Outcome::new(self.env, &self.commit).finish(
            self.run_id,
            RunKind::Drift,
            result,
            super::steps::summary(record),
            super::steps::resources(record),
            message,
        );
        let finding = if drifted.is_empty() {
            Finding::Clean
        } else {
            Finding::Drift(drifted)
        };
        (finding, ended)
    }

    /// A check cut off by a merged commit (`superseded`) or the stop (`interrupted`).
    async fn cut_short(&self, error: &WorkError) -> WorkResult {
        self.queue.preempt_with(CancellationToken::new());
        let (result, message) = if self.stop.is_cancelled() {
            (
                RunResult::Interrupted,
                "the daemon stopped during the drift check",
            )
        } else {
            (
                RunResult::Superseded,
                "a merged commit arrived: it goes first, and drift is checked after it",
            )
        };
        tracing::info!(%error, "drift check cancelled");
        let ended = Outcome::new(self.env, &self.commit).finish(
            self.run_id,
            RunKind::Drift,
            result,
            Summary::default(),
            Vec::new(),
            message,
        );
        self.shared.record(ended).await?;
        Ok(())
    }

    /// A check that failed: drift is `error`, never drift; alerted once.
    async fn failed(&self, error: &WorkError, previous: DriftRow) -> WorkResult {
        self.queue.preempt_with(CancellationToken::new());
        let message = error.to_string();
        tracing::warn!(error = %message, "the drift check failed");
        let decision = decide_drift(&memory(&previous), &Finding::Failed, false);
        let row = DriftRow {
            status: decision.status,
            checked_at: Some(now_rfc3339()),
            message: message.clone(),
            ..previous
        };
        let mut failed = Outcome::new(self.env, &self.commit)
            .finish(
                self.run_id,
                RunKind::Drift,
                RunResult::Failed,
                Summary::default(),
                Vec::new(),
                message.clone(),
            )
            .drift(row, decision.status);
        if decision.alert == Some(DriftAlert::Error) {
            failed = failed.alert(Alert::new(
                AlertKind::DriftError,
                self.env,
                self.commit.as_str(),
                format!(
                    "the drift check of {} failed; drift is unknown until a check succeeds (retried with backoff): {message}",
                    self.commit.short()
                ),
            ));
        }
        self.shared.record(failed).await?;
        Ok(())
    }

    /// Who changed what: only when the drift is news (an alert goes out), from `show -json`
    /// (ids, attribute names) and CloudTrail, with a note when that is not known. Otherwise
    /// what was found before still holds. A merged commit arriving meanwhile cuts the search
    /// short: it goes first.
    async fn explained(
        &self,
        planned: &DriftPlan,
        decision: &DriftDecision,
        previous: &DriftRow,
        permit: &mut Option<tokio::sync::SemaphorePermit<'a>>,
    ) -> (Vec<DriftedResource>, String) {
        if decision.alert == Some(DriftAlert::Detected) {
            let (shared, env) = (self.shared, self.env);
            let drifted = &decision.drifted;
            return explain(
                shared,
                env,
                planned,
                drifted,
                previous,
                &self.cancel,
                permit,
            )
            .await;
        }
        let known = &previous.resources;
        let resources = decision
            .drifted
            .iter()
            .map(|drifted| {
                known
                    .iter()
                    .find(|r| r.drifted() == *drifted)
                    .cloned()
                    .unwrap_or_else(|| DriftedResource::unexplained(drifted))
            })
            .collect();
        (resources, String::new())
    }

    /// Records the check's run with what it found, the environment's status when drift
    /// comes or goes, and the alert.
    async fn record(&self, ended: Outcome, found: &Found<'_>, previous: &DriftRow) -> WorkResult {
        let decision = found.decision;
        let now = now_rfc3339();
        let row = DriftRow {
            status: decision.status,
            checked_at: Some(now.clone()),
            in_sync_at: if decision.status == DriftStatus::InSync {
                Some(now)
            } else {
                previous.in_sync_at.clone()
            },
            resources: found.resources.to_vec(),
            message: found.note.to_string(),
        };
        let mut checked = ended.drift(row, decision.status);
        let name = self.env.to_string();
        let env_status = self
            .shared
            .store(move |store| store.environment(&name))
            .await?
            .map(|row| row.status);
        match (decision.status, env_status) {
            (DriftStatus::Drifted, Some(EnvStatus::InSync)) => {
                checked = checked.status(EnvStatus::Drifted);
            }
            (DriftStatus::InSync, Some(EnvStatus::Drifted)) => {
                checked = checked.status(EnvStatus::InSync);
            }
            _ => {}
        }
        if let Some(alert) = found.alert(self.env, &self.commit) {
            checked = checked.alert(alert);
        }
        self.shared.record(checked).await?;
        Ok(())
    }

    /// `drift.remediate`: applies this check's plan, unless a merged commit waits (it heals
    /// the drift instead).
    async fn remediate(
        &self,
        decision: &DriftDecision,
        planned: &DriftPlan,
        mut permit: Option<tokio::sync::SemaphorePermit<'a>>,
    ) -> WorkResult {
        if !decision.remediate {
            return Ok(());
        }
        if self.queue.has_pending() {
            tracing::info!(
                "a merged commit is waiting: it heals the drift instead of a remediation"
            );
            return Ok(());
        }
        if permit.is_none() {
            permit = self.shared.scheduler.permit(Priority::AfterMerges).await;
        }
        if permit.is_some() && !self.stop.is_cancelled() {
            let (shared, env, commit) = (self.shared, self.env, &self.commit);
            remediate(
                shared,
                env,
                commit,
                &self.trusted,
                &planned.record,
                self.run_id,
            )
            .await?;
        }
        Ok(())
    }
}

/// What the previous checks left: the status and the drift last alerted.
fn memory(previous: &DriftRow) -> DriftMemory {
    DriftMemory {
        status: Some(previous.status),
        drifted: previous
            .resources
            .iter()
            .map(DriftedResource::drifted)
            .collect(),
    }
}

/// What a check concluded: the engine's decision, the drifted resources as explained, and a
/// note on what could not be found out.
struct Found<'a> {
    decision: &'a DriftDecision,
    resources: &'a [DriftedResource],
    note: &'a str,
}

impl Found<'_> {
    /// The alert the decision raises, if any.
    fn alert(&self, env: &str, commit: &CommitId) -> Option<Alert> {
        match self.decision.alert? {
            DriftAlert::Detected => {
                let resources = self.resources;
                let addresses: Vec<String> = resources
                    .iter()
                    .map(|r| format!("{} ({})", r.address, r.actions.join(", ")))
                    .collect();
                let mut message = format!(
                    "{} resources differ from the last applied commit {}: {}",
                    resources.len(),
                    commit.short(),
                    addresses.join(", ")
                );
                if !self.note.is_empty() {
                    message.push_str(". ");
                    message.push_str(self.note);
                }
                if self.decision.remediate {
                    message.push_str(". drift.remediate is on: re-applying it");
                }
                let mut alert = Alert::new(AlertKind::DriftDetected, env, commit.as_str(), message);
                alert.resources = resources.iter().map(to_value).collect();
                Some(alert)
            }
            DriftAlert::Cleared => Some(Alert::new(
                AlertKind::DriftCleared,
                env,
                commit.as_str(),
                format!(
                    "the infrastructure matches the last applied commit {} again",
                    commit.short()
                ),
            )),
            DriftAlert::Error => None,
        }
    }
}

/// A drift check's plan and the identity it ran with.
struct DriftPlan {
    record: PlanRecord,
    identity: crate::aws::RunIdentity,
}

/// Stages the last applied commit in the merged lane and plans it with the apply identity.
async fn drift_plan(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    trusted: &crate::config::EnvironmentSpec,
    run_id: i64,
    cancel: &CancellationToken,
) -> Result<DriftPlan, WorkError> {
    let checked = match stage(shared, env, Lane::Merged, commit).await? {
        Ok(checked) => checked,
        Err(StageError::Refused(problems)) => {
            return Err(WorkError::Other(format!(
                "the last applied commit no longer passes karrots check:\n{}",
                super::steps::problem_lines(&problems)
            )));
        }
        Err(error) => return Err(error.into()),
    };
    if let Err(refusal) = decide_lane(Some(trusted), &checked.spec, true) {
        return Err(WorkError::Other(
            refusal.reason(shared.config.trust_branch.as_str()),
        ));
    }
    let name = crate::config::EnvName::parse(env)?;
    let identity = shared
        .identities
        .establish(&name, &trusted.aws, Lane::Merged, commit)
        .await?;
    let run = RunId::parse(&format!("run-{run_id}"))?;
    let workdir = shared.workdir(&name, Lane::Merged);
    let record = shared
        .runner
        .plan(&workdir, &checked, commit, &run, &identity.run_env, cancel)
        .await?;
    Ok(DriftPlan { record, identity })
}

/// The drifted resources with their ids, changed attributes and who changed them, and a note
/// for the alert when that could not be found out. The terraform permit is given back once
/// `show -json` is done: CloudTrail is no terraform run.
async fn explain(
    shared: &Arc<Shared>,
    env: &str,
    planned: &DriftPlan,
    drifted: &[Drifted],
    previous: &DriftRow,
    cancel: &CancellationToken,
    permit: &mut Option<tokio::sync::SemaphorePermit<'_>>,
) -> (Vec<DriftedResource>, String) {
    let mut resources = match identified(shared, env, planned, drifted, cancel).await {
        Ok(resources) => resources,
        Err(unexplained) => {
            *permit = None;
            return unexplained;
        }
    };
    *permit = None;
    let Some(trusted) = shared.trusted(env) else {
        return (resources, String::new());
    };
    let Some(credentials) = planned.identity.credentials.clone() else {
        return (
            resources,
            "who changed them is unknown: the drift check had no AWS credentials".into(),
        );
    };
    let endpoint = shared
        .config
        .cloudtrail_endpoint_url
        .as_ref()
        .or(shared.config.aws_endpoint_url.as_ref())
        .map(|url| url.to_string());
    let client = cloudtrail::client(
        credentials,
        trusted.aws.region.as_str(),
        endpoint.as_deref(),
    );
    let end = SystemTime::now();
    let start = previous
        .in_sync_at
        .as_deref()
        .and_then(|at| humantime::parse_rfc3339(at).ok())
        .unwrap_or(end - Duration::from_secs(24 * 3600))
        - DELIVERY_MARGIN;
    let lookup = Lookup {
        client: &client,
        limiter: &shared.cloudtrail_limiter,
        account: trusted.aws.account_id.as_str(),
        own_sessions: format!("karrots-{env}-"),
        start,
        end,
    };
    let note = who_changed(&lookup, &mut resources, cancel).await;
    (resources, note)
}

/// The drifted resources with their ids and changed attributes, from the plan's
/// `show -json`; when that fails, the resources as they are and a note saying why.
async fn identified(
    shared: &Arc<Shared>,
    env: &str,
    planned: &DriftPlan,
    drifted: &[Drifted],
    cancel: &CancellationToken,
) -> Result<Vec<DriftedResource>, (Vec<DriftedResource>, String)> {
    let mut resources: Vec<DriftedResource> =
        drifted.iter().map(DriftedResource::unexplained).collect();
    let Ok(name) = crate::config::EnvName::parse(env) else {
        return Err((resources, String::new()));
    };
    let workdir = shared.workdir(&name, Lane::Merged);
    let shown = shared
        .runner
        .show_json(&workdir, &planned.record, &planned.identity.run_env, cancel)
        .await
        .map_err(|e| e.to_string())
        .and_then(|json| {
            crate::terraform::plan::resource_details(&json).map_err(|e| e.to_string())
        });
    let details = match shown {
        _ if cancel.is_cancelled() => return Err((resources, CUT_SHORT.to_string())),
        Ok(details) => details,
        Err(error) => {
            tracing::warn!(%error, "reading the drifted resources' ids");
            let note = format!("who changed them is unknown: terraform show failed: {error}");
            return Err((resources, note));
        }
    };
    for resource in &mut resources {
        if let Some(detail) = details.get(&resource.address) {
            resource.id = detail.id.clone();
            resource.changed_attributes = detail.changed_attributes.clone();
        }
    }
    Ok(resources)
}

/// Asks CloudTrail who changed each resource with an id, within [`ATTRIBUTION_BOUND`] and
/// until `cancel`; returns a note on what stays unknown (empty when nothing does).
async fn who_changed(
    lookup: &Lookup<'_>,
    resources: &mut [DriftedResource],
    cancel: &CancellationToken,
) -> String {
    let search = async {
        let mut problems = Vec::new();
        for resource in resources.iter_mut() {
            let Some(id) = resource.id.clone() else {
                continue;
            };
            match cloudtrail::changes_to(lookup, &id).await {
                Ok(changes) => resource.changed_by = changes,
                Err(error) => {
                    tracing::warn!(%error, resource = %resource.address, "CloudTrail lookup");
                    problems.push(format!("{}: {error}", resource.address));
                }
            }
        }
        problems
    };
    tokio::select! {
        searched = tokio::time::timeout(ATTRIBUTION_BOUND, search) => match searched {
            Ok(problems) if problems.is_empty() => String::new(),
            Ok(problems) => format!("who changed them is unknown for {}", problems.join("; ")),
            Err(_) => format!(
                "who changed them is unknown: CloudTrail did not answer within {}s",
                ATTRIBUTION_BOUND.as_secs()
            ),
        },
        () = cancel.cancelled() => {
            tracing::info!("the search for who changed the drifted resources is cut short");
            CUT_SHORT.to_string()
        }
    }
}

/// `drift.remediate`: applies the drift check's own plan of the last applied commit, through
/// the same guards as any apply (destroys refused unless allowed; `apply.auto: false` plans
/// only).
async fn remediate(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    trusted: &crate::config::EnvironmentSpec,
    record: &PlanRecord,
    drift_run: i64,
) -> WorkResult {
    let outcome = PlanOutcome {
        has_changes: record.summary.has_changes(),
        destroys: record.summary.destroys(),
    };
    match decide_after_plan(&trusted.apply, outcome) {
        AfterPlan::Apply => {
            apply(
                shared,
                env,
                commit,
                record,
                trusted,
                ApplyReason::Remediation { drift_run },
            )
            .await
        }
        AfterPlan::RefuseDestroy => {
            let doomed = super::steps::doomed(record);
            let message = format!(
                "remediation refused: re-applying {} deletes or replaces {} and apply.allow_destroy is false",
                commit.short(),
                doomed.join(", ")
            );
            let mut alert = Alert::new(AlertKind::Refused, env, commit.as_str(), message);
            alert.resources = super::steps::resources(record);
            refuse(shared, commit, RunKind::Apply, None, alert).await
        }
        AfterPlan::AwaitApproval | AfterPlan::InSync => {
            shared
                .record(Outcome::new(env, commit).audit(
                    "remediation_skipped",
                    "apply.auto is false: drift is alerted, not remediated",
                ))
                .await?;
            Ok(())
        }
    }
}

fn to_value(resource: &DriftedResource) -> serde_json::Value {
    serde_json::to_value(resource).unwrap_or_default()
}
