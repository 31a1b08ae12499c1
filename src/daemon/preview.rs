//! Previews: a commit of a branch that is no environment's, planned with the preview
//! identity (or none) and never applied; and the static check of an environment a branch
//! defines that the trust branch does not know yet.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::state::{RunKind, RunResult};
use crate::engine::{Lane, decide_lane};
use crate::git::CommitId;
use crate::repo::CheckedEnvironment;
use crate::store::Summary;
use crate::terraform::StageError;

use super::Shared;
use super::outcome::Outcome;
use super::scheduler::Priority;
use super::steps::{
    WorkResult, config_error, plan, problem_lines, resources, run_span, stage, summary,
};

/// A preview: the preview lane's identity, never applied; its artifacts are deleted once the
/// run is recorded. A commit that does not change the environment's inputs is not planned.
pub(super) async fn preview(
    shared: &Arc<Shared>,
    env: &str,
    commit: &CommitId,
    stop: &CancellationToken,
) -> WorkResult {
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
            )
            .await;
        }
        Err(error) => return Err(error.into()),
    };
    let name = env.to_string();
    let row = shared
        .store(move |store| store.environment(&name))
        .await?
        .unwrap_or_default();
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
        )
        .await;
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
        .start_run(env, commit, RunKind::Preview, None)
        .await?;
    let span = run_span(env, Lane::Preview, commit, run_id);
    let planned = plan(shared, env, Lane::Preview, commit, checked, run_id, stop)
        .instrument(span.clone())
        .await;
    let ended = Outcome::new(env, commit);
    match planned {
        Ok(record) => {
            let result = if record.summary.has_changes() {
                RunResult::Changes
            } else {
                RunResult::NoChanges
            };
            shared
                .record(ended.finish(
                    run_id,
                    RunKind::Preview,
                    result,
                    summary(&record),
                    resources(&record),
                    "",
                ))
                .await?;
            shared.runner.discard_preview(&record)?;
        }
        Err(error) => {
            let result = if stop.is_cancelled() {
                RunResult::Interrupted
            } else {
                RunResult::Failed
            };
            tracing::warn!(parent: &span, %error, %result, "the plan did not succeed");
            shared
                .record(ended.finish(
                    run_id,
                    RunKind::Preview,
                    result,
                    Summary::default(),
                    Vec::new(),
                    error.to_string(),
                ))
                .await?;
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
                ))
                .await?
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
        )
        .await,
        Err(error) => Err(error.into()),
    }
}
