//! Alerts: one JSON object per event, POSTed to every sink from the outbox in the state store.
//!
//! An alert is written to the outbox in the same step as the decision that raised it, and the
//! deliverer sends what is due, retrying with exponential backoff. A restart loses none; a
//! delivery acknowledged with a 2xx is marked and never sent again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::{StateStore, now_rfc3339};

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
}

impl Alert {
    pub fn new(kind: AlertKind, env: &str, commit: &str, message: impl Into<String>) -> Alert {
        Alert {
            kind,
            env: env.to_string(),
            commit: commit.to_string(),
            at: now_rfc3339(),
            message: message.into(),
            resources: Vec::new(),
        }
    }
}

/// The longest wait between two attempts of one delivery.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Sends what is due in the outbox until `shutdown`; checks every `tick`.
pub async fn deliver(
    store: Arc<dyn StateStore>,
    client: reqwest::Client,
    tick: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let due = match store.due_alerts(unix_now()) {
            Ok(due) => due,
            Err(error) => {
                tracing::error!(%error, "reading the alert outbox");
                Vec::new()
            }
        };
        for entry in due {
            let sent = client
                .post(&entry.sink)
                .header("content-type", "application/json")
                .body(entry.body.clone())
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            let outcome = match sent {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(format!("the sink answered {}", response.status())),
                Err(error) => Err(error.to_string()),
            };
            let recorded = match outcome {
                Ok(()) => store.alert_delivered(entry.id),
                Err(error) => {
                    let backoff = Duration::from_secs(1 << entry.attempts.min(8)).min(MAX_BACKOFF);
                    tracing::warn!(sink = %entry.sink, attempts = entry.attempts + 1, %error, "alert not delivered; retrying in {backoff:?}");
                    store.alert_failed(entry.id, unix_now() + backoff.as_secs() as i64, &error)
                }
            };
            if let Err(error) = recorded {
                tracing::error!(%error, "recording an alert delivery");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
