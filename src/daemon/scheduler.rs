//! Who runs what, and in which order. The keys of the work: one worker per environment and
//! lane, each running one commit at a time (its workdir is one), whose queue keeps one commit
//! per branch — so previews are keyed by (environment, branch) and a commit supersedes only an
//! older one of its own branch, while merged runs and drift checks share the key
//! (environment, merged lane). The terraform permits (`concurrency`) and their order: merged
//! runs first, previews and drift checks after them.
//!
//! The daemon asks [`Scheduler`]; [`InProcess`] answers for one daemon. A lease-backed
//! scheduler (several daemons on one database) answers the same questions for the
//! environments its daemon holds.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedMutexGuard, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::engine::Lane;
use crate::engine::reconcile::enqueue;
use crate::git::CommitId;

use super::Shared;
use super::worker;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who gets the next terraform permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    /// Merged commits: never wait behind anything but other runs in flight.
    First,
    /// Previews and drift checks: wait while a merged run waits.
    AfterMerges,
}

/// The key of one worker: an environment and a lane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub env: String,
    pub lane: Lane,
}

impl Key {
    pub fn merged(env: &str) -> Key {
        Key {
            env: env.to_string(),
            lane: Lane::Merged,
        }
    }
}

/// What the main loop and the workers ask about running work.
pub(crate) trait Scheduler: Send + Sync {
    /// Queues `commit` of `branch` for `key`, starting its worker when there is none yet;
    /// returns the commit of that branch it superseded (never run).
    fn enqueue(
        &self,
        shared: &Arc<Shared>,
        key: &Key,
        branch: &str,
        commit: &CommitId,
    ) -> Option<String>;

    /// Whether `key`'s worker runs or has something queued or due.
    fn is_busy(&self, key: &Key) -> bool;

    /// Tells `key`'s worker, if it runs, that the environment's approval tags changed.
    fn approvals_changed(&self, key: &Key);

    /// The turn of `key`'s worker while it is idle (nothing running, queued or due for a
    /// retry): while the guard lives, the worker starts nothing.
    fn idle_turn(&self, key: &Key) -> Option<OwnedMutexGuard<()>>;

    /// A terraform permit, in `priority` order; `None` once the daemon stops.
    fn permit(&self, priority: Priority) -> BoxFuture<'_, Option<SemaphorePermit<'_>>>;

    /// Waits until every worker has ended (once the daemon's stop token is cancelled).
    fn drain(&self) -> BoxFuture<'_, ()>;
}

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
    pub(super) retry_pending: AtomicBool,
    /// The environment's approval tags changed since the worker last looked.
    approvals: AtomicBool,
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
            approvals: AtomicBool::new(false),
        }
    }

    /// Wakes the worker: the environment's approval tags changed.
    pub(super) fn approvals_changed(&self) {
        self.approvals.store(true, Ordering::SeqCst);
        self.ready.notify_one();
    }

    /// Whether the approval tags changed since the last call.
    pub(super) fn take_approvals(&self) -> bool {
        self.approvals.swap(false, Ordering::SeqCst)
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

    pub(super) fn take(&self) -> Option<String> {
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

/// One worker task and its queue.
struct Worker {
    queue: Arc<Queue>,
    task: tokio::task::JoinHandle<()>,
}

/// The scheduler of one daemon: its workers, in memory, and a semaphore of `concurrency`
/// permits.
pub(crate) struct InProcess {
    permits: Semaphore,
    /// Merged runs waiting for a permit: previews and drift checks wait while there are any.
    merged_waiting: AtomicUsize,
    workers: Mutex<HashMap<Key, Worker>>,
    stop: CancellationToken,
}

impl InProcess {
    pub fn new(concurrency: usize, stop: CancellationToken) -> InProcess {
        InProcess {
            permits: Semaphore::new(concurrency),
            merged_waiting: AtomicUsize::new(0),
            workers: Mutex::new(HashMap::new()),
            stop,
        }
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Worker>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn acquire(&self, priority: Priority) -> Option<SemaphorePermit<'_>> {
        match priority {
            Priority::First => {
                self.merged_waiting.fetch_add(1, Ordering::SeqCst);
                let permit = self.permits.acquire().await.ok();
                self.merged_waiting.fetch_sub(1, Ordering::SeqCst);
                permit
            }
            Priority::AfterMerges => loop {
                if self.merged_waiting.load(Ordering::SeqCst) == 0 {
                    let permit = self.permits.acquire().await.ok()?;
                    if self.merged_waiting.load(Ordering::SeqCst) == 0 {
                        return Some(permit);
                    }
                    drop(permit);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    }
}

impl Scheduler for InProcess {
    fn enqueue(
        &self,
        shared: &Arc<Shared>,
        key: &Key,
        branch: &str,
        commit: &CommitId,
    ) -> Option<String> {
        let mut workers = self.workers();
        let worker = workers.entry(key.clone()).or_insert_with(|| {
            let queue = Arc::new(Queue::new(shared.metrics.queue_depth.clone()));
            let task = tokio::spawn(worker::work(
                shared.clone(),
                key.env.clone(),
                key.lane,
                queue.clone(),
                self.stop.clone(),
            ));
            Worker { queue, task }
        });
        worker.queue.push(branch, commit.as_str())
    }

    fn is_busy(&self, key: &Key) -> bool {
        self.workers()
            .get(key)
            .is_some_and(|worker| worker.queue.idle_turn().is_none())
    }

    fn approvals_changed(&self, key: &Key) {
        if let Some(worker) = self.workers().get(key) {
            worker.queue.approvals_changed();
        }
    }

    fn idle_turn(&self, key: &Key) -> Option<OwnedMutexGuard<()>> {
        self.workers().get(key)?.queue.idle_turn()
    }

    fn permit(&self, priority: Priority) -> BoxFuture<'_, Option<SemaphorePermit<'_>>> {
        Box::pin(self.acquire(priority))
    }

    fn drain(&self) -> BoxFuture<'_, ()> {
        let tasks: Vec<_> = self
            .workers()
            .drain()
            .map(|(_, worker)| worker.task)
            .collect();
        Box::pin(async move {
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn merged_runs_take_permits_before_previews_and_drift_checks() {
        let scheduler = Arc::new(InProcess::new(1, CancellationToken::new()));
        let held = scheduler.permit(Priority::First).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiter = |priority, name: &'static str| {
            let (scheduler, order) = (scheduler.clone(), order.clone());
            tokio::spawn(async move {
                let _permit = scheduler.permit(priority).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(20)).await;
            })
        };
        // The preview asks first; the merged run, asking after it, still goes first.
        let preview = waiter(Priority::AfterMerges, "preview");
        tokio::time::sleep(Duration::from_millis(120)).await;
        let merged = waiter(Priority::First, "merged");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        merged.await.unwrap();
        preview.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["merged", "preview"]);
    }
}
