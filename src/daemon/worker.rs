//! One worker per environment and lane: it waits for a queued commit, its drift check's time
//! or its retry's, and hands each to its lane (`merged`, `preview`, `drift`). A commit queued
//! while another waits supersedes it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::Lane;
use crate::engine::machine::Event;
use crate::git::CommitId;

use super::Shared;
use super::merged::MergedLane;
use super::scheduler::Queue;
use super::steps::WorkResult;

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
            Lane::Merged => clock.due(&shared, &env).await,
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
        // New approval tags count for the waiting plan, unless a newer commit supersedes it.
        if queue.take_approvals() && merged.awaits_approval() && !queue.has_pending() {
            retry = Some(Event::TagsChanged);
        }
        // A commit queued meanwhile is newer than the one to retry: it goes instead.
        if let Some(event) = retry.filter(|_| !queue.has_pending()) {
            let span = tracing::info_span!("resume", env = %env, lane = %lane);
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
            super::preview::preview(shared, env, commit, stop)
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
