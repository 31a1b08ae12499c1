//! Alerts: one JSON object per event, POSTed to every sink from the outbox in the state store.
//!
//! An alert is written to the outbox in the same step as the decision that raised it, and the
//! deliverer sends what is due, retrying with exponential backoff. A restart loses none; a
//! delivery acknowledged with a 2xx is marked and never sent again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::{
    Delivery, Journal, OutboxEntry, OutboxKind, StateStore, StoreError, now_rfc3339,
};

/// The `kind` of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    Applied,
    ApplyFailed,
    ApplyInterrupted,
    Refused,
    HistoryRewritten,
    ConfigError,
    SourceError,
    DriftDetected,
    DriftCleared,
    DriftError,
    /// A saved plan waits for approvals (`apply.approval`).
    ApprovalNeeded,
}

impl AlertKind {
    /// The name the JSON carries (`drift_detected`), from the same serde attributes, so the
    /// two never differ.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|kind| kind.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// One alert, as it is POSTed.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub env: String,
    pub commit: String,
    pub at: String,
    pub message: String,
    pub resources: Vec<serde_json::Value>,
    /// The approvals an `applied` plan was applied on (`apply.approval`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub approved_by: Vec<crate::approval::Approval>,
    /// One line for people: `karrots prod: drift_detected at 1a2b3c4: …`. Slack's incoming
    /// webhooks (and Mattermost's, Rocket.Chat's, Discord's `/slack`) post this field and
    /// ignore the others, so any of them is a sink as it is.
    pub text: String,
}

impl Alert {
    pub fn new(kind: AlertKind, env: &str, commit: &str, message: impl Into<String>) -> Alert {
        let message = message.into();
        let kind_name = kind.name();
        let first_line = message.lines().next().unwrap_or_default();
        let text = format!(
            "karrots {env}: {kind_name} at {}: {first_line}",
            &commit[..7.min(commit.len())]
        );
        Alert {
            kind,
            env: env.to_string(),
            commit: commit.to_string(),
            at: now_rfc3339(),
            message,
            resources: Vec::new(),
            approved_by: Vec::new(),
            text,
        }
    }
}

/// Alerts the outbox could not take (a full disk, a database away), oldest first, each as its
/// environment and deliveries: each is queued again before any newer one, and on every
/// [`Held::flush`], so none is lost while the daemon runs.
#[derive(Default)]
pub struct Held(Mutex<VecDeque<HeldAlert>>);

/// One alert held: the environment it is about (whose lease fences its queueing, with a
/// shared store), and its deliveries.
struct HeldAlert {
    env: String,
    deliveries: Vec<Delivery>,
}

impl HeldAlert {
    /// The alert's JSON, for a log line that is all that is left of it.
    fn body(&self) -> &str {
        self.deliveries
            .first()
            .map(|delivery| delivery.body.as_str())
            .unwrap_or_default()
    }
}

/// The most alerts kept in memory while the outbox refuses them.
const MAX_HELD: usize = 10_000;

impl Held {
    /// Writes `journal` with the deliveries of its `alerts`, which go after every alert held
    /// before them: while any is held, the journal is written without its own, and they are
    /// held behind the others. When the store refuses the journal, its alerts are held.
    pub fn record(
        &self,
        store: &dyn StateStore,
        mut journal: Journal,
        alerts: Vec<Vec<Delivery>>,
    ) -> Result<Option<i64>, StoreError> {
        let mut held = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Self::drain(store, &mut held);
        let behind = !held.is_empty();
        if !behind {
            journal.outbox = alerts.concat();
        }
        let recorded = store.journal(&journal);
        // A write the lease's fencing refused is another daemon's to make: its alerts are
        // that daemon's to raise, and are dropped here.
        let fenced = recorded.as_ref().is_err_and(StoreError::is_fenced);
        if (behind || recorded.is_err()) && !fenced {
            for deliveries in alerts {
                let env = journal.env.clone();
                Self::hold(&mut held, HeldAlert { env, deliveries });
            }
        }
        recorded
    }

    /// Queues the alerts held, oldest first, until the outbox refuses one.
    pub fn flush(&self, store: &dyn StateStore) {
        if let Ok(mut held) = self.0.lock() {
            Self::drain(store, &mut held);
        }
    }

    /// At stop, when memory is about to go: queues what the outbox takes, sends the rest
    /// straight to their sinks once, and logs in full any alert no sink took, so none is
    /// lost without a trace.
    pub async fn send_at_stop(
        self: &Arc<Self>,
        store: Arc<dyn StateStore>,
        client: &reqwest::Client,
    ) {
        let held = self.clone();
        let _ = tokio::task::spawn_blocking(move || held.flush(store.as_ref())).await;
        let left: Vec<Delivery> = match self.0.lock() {
            Ok(mut held) => held.drain(..).flat_map(|alert| alert.deliveries).collect(),
            Err(_) => return,
        };
        for delivery in left {
            let sink = &delivery.destination;
            if let Err(error) = post(client, sink, &delivery.body, Duration::from_secs(5)).await {
                tracing::error!(%sink, alert = %delivery.body, %error, "at stop, an alert the outbox refused was not delivered; it is lost but for this line");
            }
        }
    }

    fn hold(held: &mut VecDeque<HeldAlert>, alert: HeldAlert) {
        held.push_back(alert);
        while held.len() > MAX_HELD {
            if let Some(lost) = held.pop_front() {
                tracing::error!(
                    alert = lost.body(),
                    "more than {MAX_HELD} alerts could not be queued; the oldest is dropped"
                );
            }
        }
    }

    fn drain(store: &dyn StateStore, held: &mut VecDeque<HeldAlert>) {
        while let Some(alert) = held.front() {
            let queued = Journal {
                env: alert.env.clone(),
                outbox: alert.deliveries.clone(),
                ..Journal::default()
            };
            match store.journal(&queued) {
                Err(error) if error.is_fenced() => {
                    // The environment's lease moved while the database was away: the alert
                    // is no longer this daemon's to raise.
                    tracing::error!(%error, alert = alert.body(), "an alert held while the store refused it is dropped: the lease is another daemon's now; it is lost but for this line");
                }
                Err(error) => {
                    tracing::error!(%error, held = held.len(), "queueing an alert; it is kept in memory and queued again on the next poll");
                    return;
                }
                Ok(_) => {}
            }
            held.pop_front();
        }
    }
}

/// POSTs one alert body to one sink; anything but a 2xx answer is an error.
async fn post(
    client: &reqwest::Client,
    sink: &str,
    body: &str,
    timeout: Duration,
) -> Result<(), String> {
    let sent = client
        .post(sink)
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(timeout)
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("the sink answered {}", response.status())),
        Err(error) => Err(error.to_string()),
    }
}

/// Sends the alerts due in the outbox until `shutdown`; checks every `tick`.
pub async fn deliver(
    store: Arc<dyn StateStore>,
    client: reqwest::Client,
    tick: Duration,
    shutdown: CancellationToken,
) {
    let send = |entry: OutboxEntry| {
        let client = client.clone();
        async move {
            post(
                &client,
                &entry.destination,
                &entry.body,
                Duration::from_secs(10),
            )
            .await
        }
    };
    crate::outbox::deliver(store, OutboxKind::Alert, tick, shutdown, send).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::unix_now;

    #[test]
    fn the_text_line_names_the_environment_kind_commit_and_first_line() {
        let alert = Alert::new(
            AlertKind::DriftDetected,
            "prod",
            "0123456789abcdef",
            "2 resources differ from 0123456\naws_vpc.main",
        );
        assert_eq!(
            alert.text,
            "karrots prod: drift_detected at 0123456: 2 resources differ from 0123456"
        );
        let json = serde_json::to_value(&alert).unwrap();
        assert_eq!(json["text"], alert.text.as_str());
        assert_eq!(json["kind"], "drift_detected");
    }

    /// Makes the database at `path` refuse every `statement` (`INSERT` or `UPDATE`) on the
    /// outbox, as a full disk does, until [`free_disk`] on the connection returned.
    fn fill_disk(path: &std::path::Path, statement: &str) -> rusqlite::Connection {
        let connection = rusqlite::Connection::open(path).unwrap();
        connection
            .execute_batch(&format!(
                "CREATE TRIGGER full_disk BEFORE {statement} ON outbox
                 BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;"
            ))
            .unwrap();
        connection
    }

    fn free_disk(connection: &rusqlite::Connection) {
        connection.execute_batch("DROP TRIGGER full_disk;").unwrap();
    }

    /// One alert's outbox rows: `body` for each of `sinks`.
    fn deliveries(sinks: &[&str], body: &str) -> Vec<Delivery> {
        sinks
            .iter()
            .map(|sink| Delivery {
                kind: OutboxKind::Alert,
                destination: sink.to_string(),
                body: body.to_string(),
            })
            .collect()
    }

    #[test]
    fn alerts_the_outbox_refuses_are_held_in_order_until_it_takes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = crate::store::SqliteStore::open(&path).unwrap();
        let disk = fill_disk(&path, "INSERT");
        let held = Held::default();
        let first = held.record(
            &store,
            Journal::default(),
            vec![deliveries(&["http://127.0.0.1:9/"], "first")],
        );
        assert!(first.is_err(), "the outbox refuses it");
        // An outcome recorded while an alert is held is written, its own alert held behind.
        let second = held.record(
            &store,
            Journal::default(),
            vec![deliveries(&["http://127.0.0.1:9/"], "second")],
        );
        assert!(second.is_ok());
        held.flush(&store);
        assert!(store.due(OutboxKind::Alert, i64::MAX).unwrap().is_empty());

        free_disk(&disk);
        held.flush(&store);
        let bodies: Vec<String> = store
            .due(OutboxKind::Alert, i64::MAX)
            .unwrap()
            .into_iter()
            .map(|entry| entry.body)
            .collect();
        assert_eq!(bodies, ["first", "second"]);
        held.flush(&store);
        assert_eq!(
            store.due(OutboxKind::Alert, i64::MAX).unwrap().len(),
            2,
            "queued once"
        );
    }

    /// A sink that answers `200` to every request and counts them.
    async fn counting_sink() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        (url, count)
    }

    #[tokio::test]
    async fn alerts_still_held_at_stop_are_sent_straight_to_their_sinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Arc::new(crate::store::SqliteStore::open(&path).unwrap());
        let _disk = fill_disk(&path, "INSERT");
        let (sink, posts) = counting_sink().await;
        let held = Arc::new(Held::default());
        for body in ["{\"n\":1}", "{\"n\":2}"] {
            let _ = held.record(
                store.as_ref(),
                Journal::default(),
                vec![deliveries(&[&sink], body)],
            );
        }
        held.send_at_stop(store.clone(), &reqwest::Client::new())
            .await;
        assert_eq!(posts.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(held.0.lock().unwrap().is_empty());
        assert!(store.due(OutboxKind::Alert, i64::MAX).unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_alert_delivered_but_not_recorded_is_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store: Arc<dyn StateStore> = Arc::new(crate::store::SqliteStore::open(&path).unwrap());
        let (sink, posts) = counting_sink().await;
        store
            .journal(&Journal {
                outbox: deliveries(&[&sink], "{}"),
                ..Journal::default()
            })
            .unwrap();
        // The database refuses the delivery mark, as a full disk does.
        let disk = fill_disk(&path, "UPDATE");
        let stop = CancellationToken::new();
        let delivering = tokio::spawn(deliver(
            store.clone(),
            reqwest::Client::new(),
            Duration::from_millis(20),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(posts.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(store.due(OutboxKind::Alert, unix_now()).unwrap().len(), 1);

        free_disk(&disk);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            store.due(OutboxKind::Alert, unix_now()).unwrap().is_empty(),
            "the mark is recorded at last"
        );
        assert_eq!(posts.load(std::sync::atomic::Ordering::SeqCst), 1);
        stop.cancel();
        delivering.await.unwrap();
    }
}
