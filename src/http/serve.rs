//! Serving the router connection by connection, within the descriptors the daemon has.
//!
//! Whoever can reach `listen` can open connections: the hooks need no token to connect. So at
//! most a cap of connections is open at once, leaving [`FD_RESERVE`] descriptors to the
//! mirror, SQLite and terraform's pipes. A connection that has not sent a whole request head
//! within [`HEADER_TIMEOUT`] — a new one, or a keep-alive one between requests — is closed,
//! and a request is answered within [`REQUEST_TIMEOUT`] or gets `408`. When every slot is
//! taken, a new connection closes the connection that has been idle longest (one with no
//! request in progress), so an idle flood cannot keep `/healthz` or a hook waiting behind it;
//! only when every connection is busy with a request is a new one turned away.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a connection may take to send a request head, and may sit idle between requests.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request may take, its body included (a hook body that trickles in is cut off).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Descriptors never handed to connections.
const FD_RESERVE: u64 = 256;

/// The most connections served at once, however many descriptors there are.
const MAX_CONNECTIONS: usize = 512;

/// The fewest, even on a host with too few descriptors for the reserve.
const MIN_CONNECTIONS: usize = 16;

/// The soft descriptor limit asked for at start, when the hard limit allows it.
const WANTED_NOFILE: u64 = 65_536;

/// How long to wait before accepting again after `accept` failed (a descriptor shortage).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Raises the soft limit on open files towards the hard one and returns how many connections
/// to serve at once, with [`FD_RESERVE`] kept back.
pub fn connection_cap() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let wanted = hard.min(WANTED_NOFILE);
            if soft < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
                wanted
            } else {
                soft
            }
        }
        Err(_) => 1024,
    };
    let cap = cap_for(limit);
    tracing::debug!(open_files = limit, connections = cap, "connection cap");
    cap
}

fn cap_for(open_files: u64) -> usize {
    let room = open_files.saturating_sub(FD_RESERVE);
    usize::try_from(room)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// Middleware: a request not answered within [`REQUEST_TIMEOUT`] gets `408`.
pub async fn request_timeout(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
    }
}

/// One open connection: how many of its requests are in progress, and how to close it.
struct Slot {
    busy: Arc<AtomicUsize>,
    close: CancellationToken,
}

/// The open connections, oldest first (ids grow with each accept).
#[derive(Default)]
struct Slots {
    next: u64,
    open: BTreeMap<u64, Slot>,
}

impl Slots {
    /// Makes room for one more connection when `cap` are open, by closing the one that has
    /// been open longest with no request in progress; `None` when every one is busy.
    fn admit(&mut self, cap: usize) -> Option<(u64, Arc<AtomicUsize>, CancellationToken)> {
        if self.open.len() >= cap {
            let idle = self
                .open
                .iter()
                .find(|(_, slot)| slot.busy.load(Ordering::SeqCst) == 0)
                .map(|(id, _)| *id)?;
            if let Some(slot) = self.open.remove(&idle) {
                slot.close.cancel();
            }
        }
        let id = self.next;
        self.next += 1;
        let busy = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        self.open.insert(
            id,
            Slot {
                busy: busy.clone(),
                close: close.clone(),
            },
        );
        Some((id, busy, close))
    }
}

/// Counts a request in progress on its connection while it lives.
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn enter(busy: &Arc<AtomicUsize>) -> InProgress {
        busy.fetch_add(1, Ordering::SeqCst);
        InProgress(busy.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `router` on `listener`, at most `cap` connections at once, until `stop`; then lets
/// each connection finish the request it is in and waits for them.
pub async fn serve(listener: TcpListener, router: Router, cap: usize, stop: CancellationToken) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let connections = TaskTracker::new();
    let mut turned_away = false;
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let admitted = slots.lock().expect("connection slots").admit(cap);
        let Some((id, busy, close)) = admitted else {
            if !turned_away {
                tracing::warn!(
                    connections = cap,
                    "every connection is busy with a request; new ones are closed"
                );
            }
            turned_away = true;
            continue;
        };
        turned_away = false;
        let inner = TowerToHyperService::new(router.clone());
        let service = hyper::service::service_fn(move |request| {
            let in_progress = InProgress::enter(&busy);
            let response = hyper::service::Service::call(&inner, request);
            async move {
                let _in_progress = in_progress;
                response.await
            }
        });
        let stop = stop.clone();
        let slots = slots.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = close.cancelled() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, connection).await;
                }
            }
            slots.lock().expect("connection slots").open.remove(&id);
        });
    }
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_descriptors_in_reserve_and_stays_within_bounds() {
        assert_eq!(cap_for(1024), 512);
        assert_eq!(cap_for(600), 344);
        assert_eq!(cap_for(256), MIN_CONNECTIONS);
        assert_eq!(cap_for(65_536), MAX_CONNECTIONS);
    }

    #[test]
    fn a_full_house_closes_the_oldest_idle_connection_and_never_a_busy_one() {
        let mut slots = Slots::default();
        let (first, first_busy, first_close) = slots.admit(2).unwrap();
        let (_, _, second_close) = slots.admit(2).unwrap();
        let _request = InProgress::enter(&first_busy);
        let (_, third_busy, _) = slots.admit(2).expect("the idle second one makes room");
        assert!(second_close.is_cancelled());
        assert!(!first_close.is_cancelled());
        assert!(slots.open.contains_key(&first));
        let _also = InProgress::enter(&third_busy);
        assert!(slots.admit(2).is_none(), "every connection is busy");
    }
}
