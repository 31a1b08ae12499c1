//! The outbox's deliverer, one loop per kind of delivery (alerts, commit statuses): what is
//! due is sent oldest first; a failure is tried again later with the daemon's one delivery
//! backoff ([`crate::engine::retry::Backoff::DELIVERY`]); the rows stay in the store until
//! the destination took them, so a restart loses none.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::engine::retry::Backoff;
use crate::store::{OutboxEntry, OutboxKind, StateStore, StoreError};

/// Sends the deliveries of `kind` due in the outbox with `send` until `shutdown`; checks
/// every `tick`.
///
/// A delivery the destination accepted but whose mark could not be recorded (a full disk)
/// is never sent again: it is kept in memory and only its mark is retried on each tick.
pub async fn deliver<Sent>(
    store: Arc<dyn StateStore>,
    kind: OutboxKind,
    tick: Duration,
    shutdown: CancellationToken,
    send: impl Fn(OutboxEntry) -> Sent,
) where
    Sent: Future<Output = Result<(), String>>,
{
    let mut sent_unrecorded: HashSet<i64> = HashSet::new();
    loop {
        let unrecorded = sent_unrecorded.clone();
        let still = on_store(&store, move |store| {
            Ok(unrecorded
                .into_iter()
                .filter(|id| store.delivered(*id).is_err())
                .collect())
        })
        .await;
        if let Ok(still) = still {
            sent_unrecorded = still;
        }
        let due = match on_store(&store, move |store| store.due(kind, unix_now())).await {
            Ok(due) => due,
            Err(error) => {
                tracing::error!(%error, kind = kind.as_str(), "reading the outbox");
                Vec::new()
            }
        };
        for entry in due {
            if sent_unrecorded.contains(&entry.id) {
                continue;
            }
            let (id, attempts, destination) = (entry.id, entry.attempts, entry.destination.clone());
            match send(entry).await {
                Ok(()) => {
                    if let Err(error) = on_store(&store, move |store| store.delivered(id)).await {
                        tracing::error!(%error, id, kind = kind.as_str(), "a delivery was taken but that could not be recorded; it is not sent again");
                        sent_unrecorded.insert(id);
                    }
                }
                Err(error) => {
                    let backoff = Backoff::DELIVERY.after(attempts + 1, fastrand::f64());
                    tracing::warn!(kind = kind.as_str(), %destination, attempts = attempts + 1, %error, "not delivered; retrying in {backoff:?}");
                    let next = unix_now() + backoff.as_secs() as i64;
                    let failed =
                        on_store(&store, move |store| store.delivery_failed(id, next, &error))
                            .await;
                    if let Err(error) = failed {
                        tracing::error!(%error, kind = kind.as_str(), "recording a delivery");
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn on_store<T: Send + 'static>(
    store: &Arc<dyn StateStore>,
    call: impl FnOnce(&dyn StateStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    crate::store::blocking(move || call(store.as_ref())).await
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
