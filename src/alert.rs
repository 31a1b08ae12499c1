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
            text,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
