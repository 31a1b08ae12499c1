//! The systemd notification protocol, for `Type=notify` units: `READY=1` once the daemon
//! listens and has its state, `WATCHDOG=1` while the state store answers, `STOPPING=1` at
//! shutdown. Outside systemd (no `NOTIFY_SOCKET`) each call does nothing.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use super::Shared;

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

pub(super) fn ready(shared: &Shared) {
    let status = format!("serving on {}", shared.config.listen);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

pub(super) fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: an apply in flight finishes"),
    ]);
}

/// Pings the watchdog at half its interval (`WatchdogSec=`) while the daemon is healthy: the
/// runtime schedules this task and the state store answers a read within the interval. A
/// wedged store or runtime stops the pings, and systemd restarts the daemon. Returns at once
/// when `stop` is cancelled, so the caller can send `STOPPING=1` after the last ping: systemd
/// stops watching at that point, and a late ping would only be noise.
pub(super) async fn watchdog(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let store = shared.store.clone();
        let read = tokio::task::spawn_blocking(move || store.environments().is_ok());
        let answered = tokio::select! {
            answer = tokio::time::timeout(interval.max(Duration::from_secs(1)), read) => {
                matches!(answer, Ok(Ok(true)))
            }
            () = stop.cancelled() => return,
        };
        if answered {
            send(&[NotifyState::Watchdog]);
        } else {
            tracing::error!("the state store does not answer: no watchdog ping");
        }
    }
}
