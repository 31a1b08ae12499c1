//! Several daemons on one PostgreSQL store: which environments this daemon runs. The lease
//! keeper renews its leases three times per lease, takes its share of the environments
//! (free ones, and those whose owner stopped renewing), and gives up what is over its share
//! when another daemon joins. An environment this daemon does not hold is neither queued,
//! planned, applied nor drift-checked here; one it just took over has the runs its last
//! owner left open ended `interrupted` (an apply alerted), and its head queued.
//!
//! The database decides ownership: every write for an environment is fenced by the lease's
//! epoch ([`crate::store::postgres`]). This daemon's clock only decides when to stop
//! starting terraform: a third of a lease before the lease could expire.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::store::postgres::{Held, Leases, PgTarget, REPOSITORY};

use super::Shared;
use super::scheduler::Key;

/// What the daemon needs to keep its leases: the keeper, and where and as whom to listen for
/// the other daemons' wakes.
pub(super) struct Keeping {
    pub leases: Leases,
    pub target: PgTarget,
    pub owner: String,
}

/// What this daemon holds, as the workers and the main loop ask it.
#[derive(Debug, Default)]
pub(crate) struct Ownership {
    pub held: Arc<Held>,
    /// Environments taken over since the main loop last looked: their heads are queued and
    /// their cut-off runs ended.
    gained: Mutex<BTreeSet<String>>,
    /// Why the store cannot be reached, while it cannot.
    pub trouble: Mutex<Option<String>>,
}

impl Ownership {
    pub fn new(held: Arc<Held>) -> Ownership {
        Ownership {
            held,
            ..Ownership::default()
        }
    }

    pub fn owns(&self, env: &str) -> bool {
        self.held.epoch(env).is_some()
    }

    pub fn may_run(&self, env: &str) -> bool {
        self.held.may_run(env)
    }

    pub fn take_gained(&self) -> BTreeSet<String> {
        self.gained
            .lock()
            .map(|mut gained| std::mem::take(&mut *gained))
            .unwrap_or_default()
    }

    pub fn trouble(&self) -> Option<String> {
        self.trouble.lock().ok()?.clone()
    }
}

/// Keeps this daemon's leases until `stop`; returns them, for the daemon to give up once its
/// workers are done (an apply in flight finishes and is recorded first).
pub(super) async fn keep(
    shared: Arc<Shared>,
    mut leases: Leases,
    stop: CancellationToken,
) -> Option<Leases> {
    let ownership = shared.ownership.clone()?;
    let mut trusted = shared.trusted.subscribe();
    let interval = leases.interval();
    loop {
        let environments: Vec<String> = std::iter::once(REPOSITORY.to_string())
            .chain(shared.trusted.borrow().keys().cloned())
            .collect();
        let scheduler = shared.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            let busy = |env: &str| scheduler.scheduler.is_busy(&Key::merged(env));
            let round = leases.round(&environments, &busy);
            (leases, round)
        });
        // A database that stops answering (a partition, a server hung) holds the round. The
        // leases already stop counting by this daemon's clock; say so, and wait for the round
        // to end with an answer or with the connection's timeout.
        let outcome = match tokio::time::timeout(interval, &mut task).await {
            Ok(outcome) => outcome,
            Err(_) => {
                ownership.held.expire();
                let trouble = format!("no answer from the state database within {interval:?}");
                tracing::error!("{trouble}: no terraform starts until it answers");
                if let Ok(mut slot) = ownership.trouble.lock() {
                    *slot = Some(trouble);
                }
                task.await
            }
        };
        let Ok((returned, round)) = outcome else {
            tracing::error!("the lease keeper's task failed");
            return None;
        };
        leases = returned;
        match round {
            Ok(round) => {
                if let Ok(mut trouble) = ownership.trouble.lock()
                    && trouble.take().is_some()
                {
                    tracing::info!("the state database answers again");
                }
                if !round.lost.is_empty() {
                    tracing::warn!(lost = ?round.lost, "leases lost to another daemon (or given up): nothing new starts for them here");
                }
                if !round.gained.is_empty() {
                    tracing::info!(gained = ?round.gained, daemons = round.daemons, "leases taken");
                    if let Ok(mut gained) = ownership.gained.lock() {
                        gained.extend(round.gained);
                    }
                    shared.wake.notify_one();
                }
            }
            Err(error) => {
                let first = ownership
                    .trouble
                    .lock()
                    .map(|mut trouble| trouble.replace(error.to_string()).is_none())
                    .unwrap_or(false);
                if first {
                    tracing::error!(%error, "the state database cannot be reached: no terraform starts until it can");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            changed = trusted.changed() => if changed.is_err() { return Some(leases) },
            () = stop.cancelled() => return Some(leases),
        }
    }
}

/// Wakes this daemon's main loop when another daemon sharing the store got a hook: on a
/// thread of its own (the blocking client waits for notifications), until `stop`.
pub(super) fn listen(
    shared: &Arc<Shared>,
    target: PgTarget,
    owner: String,
    stop: CancellationToken,
) {
    let wake = shared.wake.clone();
    let spawned = std::thread::Builder::new()
        .name("karrots-listen".into())
        .spawn(move || {
            crate::store::postgres::listen(&target, &owner, &|| wake.notify_one(), &|| {
                stop.is_cancelled()
            });
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "listening for the other daemons' wakes: hooks reach this daemon only");
    }
}

/// Gives every lease up: the other daemons take them at their next round.
pub(super) async fn give_up(mut leases: Leases) {
    let _ = tokio::task::spawn_blocking(move || leases.release_all()).await;
    tracing::info!("leases given up");
}
