//! The daemon's HTTP interface: health, metrics, the JSON API, the status page and the
//! webhooks.
//!
//! A webhook only wakes the main loop for a fetch — the daemon trusts what it fetches, never
//! the payload — and only after its signature or token verifies in constant time. GitHub and
//! Gitea sign with HMAC-SHA256 (SHA-1 signatures are not accepted); GitLab sends the shared
//! token. A hook without its signature header is refused before its body is read; a signed
//! body is hashed frame by frame as it arrives, never buffered; at most 16 are read at once
//! (503 beyond), and one over 25 MiB gets 413. Connections are capped and timed out in
//! [`serve`]. Off loopback, every route but `/healthz`, the hooks and
//! the sign-in form needs `Authorization: Bearer <api token>`, or the status page's cookie,
//! which `POST /login` sets once the token is given (`HttpOnly`, `SameSite=Strict`); `/metrics`
//! too unless `metrics_public` is set.

mod page;
pub mod serve;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::{get, post};
use hmac::{KeyInit, Mac};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::config::DaemonConfig;
use crate::engine::state::DriftStatus;
use crate::metrics::Metrics;
use crate::store::{DriftedResource, EnvironmentRow, RunRow, StateStore, StoreError};

/// The largest webhook body accepted.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;

/// Hook bodies read at once. Each costs a connection and HMAC work but no buffer (the
/// signature is computed as the body arrives); beyond this a hook gets 503 at once, and the
/// forge retries it.
const MAX_CONCURRENT_HOOKS: usize = 16;

/// The webhook secret: `webhook_secret_file`, else `KARROTS_WEBHOOK_SECRET`; `None` turns the
/// hooks off (they answer 401). A configured but empty secret refuses the start.
pub fn load_webhook_secret(config: &DaemonConfig) -> Result<Option<Vec<u8>>, String> {
    let secret = match &config.webhook_secret_file {
        Some(file) => Some(
            std::fs::read(file)
                .map_err(|e| format!("webhook_secret_file {}: {e}", file.display()))?,
        ),
        None => std::env::var("KARROTS_WEBHOOK_SECRET")
            .ok()
            .map(String::into_bytes),
    };
    match secret {
        Some(mut bytes) => {
            while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                bytes.pop();
            }
            if bytes.is_empty() {
                return Err("the webhook secret is empty: webhooks would verify nothing; put a long random secret in webhook_secret_file".into());
            }
            Ok(Some(bytes))
        }
        None => Ok(None),
    }
}

/// The API token: required when `listen` is not a loopback address.
pub fn load_api_token(config: &DaemonConfig) -> Result<Option<Vec<u8>>, String> {
    let token = match &config.api_token_file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("api_token_file {}: {e}", file.display()))?;
            let token = text.trim().as_bytes().to_vec();
            if token.is_empty() {
                return Err(format!("api_token_file {} is empty", file.display()));
            }
            Some(token)
        }
        None => None,
    };
    if token.is_none() && !config.listen.ip().is_loopback() {
        return Err(format!(
            "listen: {} is not a loopback address, so the API would show your infrastructure to the network: set api_token_file, or listen on 127.0.0.1",
            config.listen
        ));
    }
    Ok(token)
}

/// What the routes need of the daemon, and nothing more: its store, a way to wake its main
/// loop, its metrics, when it last fetched, and whether drift checks are on for an
/// environment.
#[derive(Clone)]
pub struct Backend {
    pub store: Arc<dyn StateStore>,
    /// Wakes the main loop for a fetch; a burst of wakes is one fetch.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// When the last fetch succeeded.
    pub last_fetch: Arc<Mutex<Option<Instant>>>,
    pub drift_checks: Arc<dyn DriftChecks>,
    pub health: Arc<dyn Health>,
}

/// What `/healthz` reports besides "up": why the daemon cannot work, when it cannot (a
/// shared store out of reach).
pub trait Health: Send + Sync {
    fn trouble(&self) -> Option<String>;

    /// A verified hook arrived here: the other daemons sharing the store fetch too.
    fn hooked(&self) {}
}

/// Whether drift checks are on for an environment at its last applied commit: that commit's
/// `drift:` settings, else the trust branch's.
pub trait DriftChecks: Send + Sync {
    fn on(&self, env: &str, last_applied: Option<&str>) -> bool;
}

#[derive(Clone)]
struct AppState {
    backend: Backend,
    secret: Option<Arc<Vec<u8>>>,
    api_token: Option<Arc<Vec<u8>>>,
    /// Hook bodies being read now, at most [`MAX_CONCURRENT_HOOKS`].
    hooks: Arc<tokio::sync::Semaphore>,
}

/// The status page's cookie: it holds a digest of the API token, not the token, so what a
/// browser keeps cannot be replayed as `Authorization: Bearer`.
const SESSION_COOKIE: &str = "karrots_session";

/// The routes; `/metrics` needs no token with `metrics_public`.
pub fn router(
    backend: Backend,
    metrics_public: bool,
    secret: Option<Vec<u8>>,
    api_token: Option<Vec<u8>>,
) -> Router {
    let state = AppState {
        backend,
        secret: secret.map(Arc::new),
        api_token: api_token.map(Arc::new),
        hooks: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HOOKS)),
    };
    let mut guarded = Router::new()
        .route("/", get(status_page))
        .route("/runs/{id}", get(run_page))
        .route("/api/v1/environments", get(environments))
        .route("/api/v1/runs", get(runs))
        .route("/api/v1/runs/{id}", get(run));
    let mut open = Router::new()
        .route("/healthz", get(healthz))
        .route("/login", post(login))
        .route("/hooks/github", post(github))
        .route("/hooks/gitlab", post(gitlab))
        .route("/hooks/gitea", post(gitea));
    if metrics_public {
        open = open.route("/metrics", get(metrics));
    } else {
        guarded = guarded.route("/metrics", get(metrics));
    }
    let guarded = guarded.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    open.merge(guarded)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(serve::request_timeout))
        .with_state(state)
}

/// 200 `ok`, or 503 with the reason the daemon cannot work now.
async fn healthz(State(state): State<AppState>) -> Response {
    match state.backend.health.trouble() {
        None => "ok".into_response(),
        Some(trouble) => (StatusCode::SERVICE_UNAVAILABLE, trouble).into_response(),
    }
}

/// Equal bytes, compared in constant time (over their SHA-256, so lengths do not leak).
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    Sha256::digest(given)
        .ct_eq(&Sha256::digest(expected))
        .into()
}

/// The status page cookie's value for `token`.
fn session_value(token: &[u8]) -> String {
    let mut digest = Sha256::new();
    digest.update(b"karrots status page session\0");
    digest.update(token);
    hex::encode(digest.finalize())
}

/// Whether the request carries the API token, or the status page cookie made from it.
fn authorized(headers: &HeaderMap, token: &[u8]) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if let Some(given) = bearer {
        return same_secret(given.as_bytes(), token);
    }
    let expected = session_value(token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|cookie| cookie.name() == SESSION_COOKIE)
        .any(|cookie| same_secret(cookie.value().as_bytes(), expected.as_bytes()))
}

/// A browser asking for a page (it sends `Accept: text/html`); API clients do not.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.api_token
        && !authorized(request.headers(), token)
    {
        // A browser gets the sign-in form, which shows nothing of the infrastructure; anything
        // else an empty 401.
        if wants_html(request.headers()) {
            let form = page::login(false, std::time::SystemTime::now());
            return (StatusCode::UNAUTHORIZED, form).into_response();
        }
        return StatusCode::UNAUTHORIZED.into_response();
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login`: the sign-in form. The right token gets the session cookie (`HttpOnly`, so
/// no script reads it; `SameSite=Strict`, so no other site's page sends it) and a redirect to
/// the status page.
async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(token) = &state.api_token else {
        // On loopback there is nothing to sign in to.
        return Redirect::to("/").into_response();
    };
    if !same_secret(form.token.trim().as_bytes(), token) {
        tracing::warn!("status page sign-in with a wrong token");
        let form = page::login(true, std::time::SystemTime::now());
        return (StatusCode::UNAUTHORIZED, form).into_response();
    }
    // Behind a TLS-terminating proxy the cookie is also `Secure`.
    let behind_tls = headers
        .get("x-forwarded-proto")
        .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = cookie::Cookie::build((SESSION_COOKIE, session_value(token)))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(behind_tls)
        .build();
    let mut response = Redirect::to("/").into_response();
    match HeaderValue::from_str(&cookie.to_string()) {
        Ok(value) => {
            response.headers_mut().insert(header::SET_COOKIE, value);
            response
        }
        Err(error) => internal(error),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let since = state
        .backend
        .last_fetch
        .lock()
        .ok()
        .and_then(|last| last.map(|at| at.elapsed().as_secs_f64()));
    let Some(text) = state.backend.metrics.encode(since) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn internal(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "API request failed");
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

/// One environment as `/api/v1/environments` and the status page show it.
#[derive(Debug, Serialize)]
pub(crate) struct EnvironmentView {
    #[serde(flatten)]
    row: EnvironmentRow,
    last_run: Option<RunRow>,
    drift: DriftView,
}

/// What the drift checks found, or `off` when the environment's last applied commit does not
/// turn them on.
#[derive(Debug, Serialize)]
pub(crate) struct DriftView {
    status: DriftStatus,
    checked_at: Option<String>,
    /// The drifted addresses.
    resources: Vec<String>,
    /// Each drifted resource: address, actions, id, changed attribute names, `changed_by`.
    details: Vec<DriftedResource>,
    message: String,
}

/// The environments as the API and the page show them. It reads the store (and, once per
/// applied commit, the mirror): call it on a blocking thread.
fn environment_views(backend: &Backend) -> Result<Vec<EnvironmentView>, StoreError> {
    let store = &backend.store;
    let mut out = Vec::new();
    for row in store.environments()? {
        let last_run = store.runs(Some(&row.name), 1)?.into_iter().next();
        let drift = store.drift(&row.name)?;
        let checks_on = backend
            .drift_checks
            .on(&row.name, row.last_applied.as_deref());
        let resources = drift
            .resources
            .iter()
            .map(|resource| resource.address.clone())
            .collect();
        out.push(EnvironmentView {
            row,
            last_run,
            drift: DriftView {
                status: if checks_on {
                    drift.status
                } else {
                    DriftStatus::Off
                },
                checked_at: drift.checked_at,
                resources,
                details: drift.resources,
                message: drift.message,
            },
        });
    }
    Ok(out)
}

async fn environments(State(state): State<AppState>) -> Response {
    match blocking(&state, environment_views).await {
        Ok(views) => Json(views).into_response(),
        Err(error) => internal(error),
    }
}

/// Runs `read` (store reads, and git for what the store does not hold) on a blocking
/// thread, never on the runtime's.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    read: impl FnOnce(&Backend) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    let backend = state.backend.clone();
    match tokio::task::spawn_blocking(move || read(&backend)).await {
        Ok(read) => read.map_err(|error| error.to_string()),
        Err(error) => Err(format!("the read failed: {error}")),
    }
}

/// Runs the status page lists under the environments, and on a run's page.
const PAGE_RUNS: usize = 30;

/// Runs `/api/v1/runs` answers with, newest first.
const API_RUNS: usize = 200;

async fn status_page(State(state): State<AppState>) -> Response {
    let read = blocking(&state, |backend| {
        Ok((
            environment_views(backend)?,
            backend.store.runs(None, PAGE_RUNS)?,
        ))
    });
    match read.await {
        Ok((views, runs)) => {
            page::overview(&views, &runs, std::time::SystemTime::now()).into_response()
        }
        Err(error) => internal(error),
    }
}

async fn run_page(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    let read = blocking(&state, move |backend| {
        let Some(run) = backend.store.run(id)? else {
            return Ok(None);
        };
        // One more than shown: the run itself is among them.
        let mut others = backend.store.runs(Some(&run.env), PAGE_RUNS + 1)?;
        others.retain(|other| other.id != run.id);
        others.truncate(PAGE_RUNS);
        Ok(Some((run, others)))
    });
    match read.await {
        Ok(Some((run, others))) => {
            page::run_page(&run, &others, std::time::SystemTime::now()).into_response()
        }
        Ok(None) => (StatusCode::NOT_FOUND, format!("no run {id}\n")).into_response(),
        Err(error) => internal(error),
    }
}

#[derive(Deserialize)]
struct RunsQuery {
    env: Option<String>,
}

async fn runs(State(state): State<AppState>, Query(query): Query<RunsQuery>) -> Response {
    let read = blocking(&state, move |backend| {
        backend.store.runs(query.env.as_deref(), API_RUNS)
    });
    match read.await {
        Ok(runs) => Json(runs).into_response(),
        Err(error) => internal(error),
    }
}

async fn run(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    match blocking(&state, move |backend| backend.store.run(id)).await {
        Ok(Some(run)) => Json(run).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(error) => internal(error),
    }
}

/// A verified hook: wake the main loop. A burst of hooks is one fetch, because the wake
/// notification holds at most one permit.
fn accepted(state: &AppState, forge: &str) -> Response {
    tracing::info!(forge, "verified webhook: fetching");
    state.backend.wake.notify_one();
    state.backend.health.hooked();
    (StatusCode::ACCEPTED, "fetching\n").into_response()
}

fn unauthorized(forge: &str, why: &str) -> Response {
    tracing::warn!(forge, why, "webhook refused");
    StatusCode::UNAUTHORIZED.into_response()
}

type HookMac = hmac::Hmac<Sha256>;

fn new_mac(secret: &[u8]) -> Option<HookMac> {
    HookMac::new_from_slice(secret).ok()
}

/// The MAC equals the hex `signature` (constant time).
fn mac_verifies(mac: HookMac, signature: &str) -> bool {
    let Ok(expected) = hex::decode(signature.trim()) else {
        return false;
    };
    mac.verify_slice(&expected).is_ok()
}

/// Why a signed hook's body was not taken.
enum BodyRefusal {
    TooLarge,
    Unreadable,
    Busy,
}

impl BodyRefusal {
    fn response(self, forge: &str) -> Response {
        match self {
            BodyRefusal::TooLarge => {
                tracing::warn!(forge, "webhook refused: the body is over 25 MiB");
                StatusCode::PAYLOAD_TOO_LARGE.into_response()
            }
            BodyRefusal::Unreadable => StatusCode::BAD_REQUEST.into_response(),
            BodyRefusal::Busy => {
                tracing::warn!(forge, "webhook refused: too many hook bodies at once");
                (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "5")]).into_response()
            }
        }
    }
}

/// Reads a hook body into `mac` frame by frame, never holding more than one frame: at most
/// [`MAX_BODY_BYTES`] (a larger `content-length` is refused unread) and at most
/// [`MAX_CONCURRENT_HOOKS`] bodies at once.
async fn mac_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    mac: &mut HookMac,
) -> Result<(), BodyRefusal> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(BodyRefusal::TooLarge);
    }
    let Ok(_permit) = state.hooks.clone().try_acquire_owned() else {
        return Err(BodyRefusal::Busy);
    };
    let mut body = body;
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyRefusal::Unreadable)?;
        if let Some(data) = frame.data_ref() {
            read += data.len();
            if read > MAX_BODY_BYTES {
                return Err(BodyRefusal::TooLarge);
            }
            mac.update(data);
        }
    }
    Ok(())
}

/// A hook signed with HMAC-SHA256 in `header` (hex, after `prefix`): refused before its body
/// is read when the header is missing, verified as the body streams in.
async fn signed_hook(
    state: AppState,
    headers: HeaderMap,
    body: Body,
    forge: &str,
    header: &str,
    prefix: &str,
) -> Response {
    let Some(secret) = &state.secret else {
        return unauthorized(forge, "no webhook secret is configured");
    };
    let Some(signature) = headers
        .get(header)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix(prefix))
    else {
        return unauthorized(
            forge,
            &format!(
                "no {header} header with a {prefix}HMAC-SHA256 (SHA-1 signatures are not accepted)"
            ),
        );
    };
    let Some(mut mac) = new_mac(secret) else {
        return unauthorized(forge, "the webhook secret cannot key an HMAC");
    };
    if let Err(refusal) = mac_body(&state, &headers, body, &mut mac).await {
        return refusal.response(forge);
    }
    if mac_verifies(mac, signature) {
        accepted(&state, forge)
    } else {
        unauthorized(forge, &format!("{header} does not verify"))
    }
}

async fn github(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    signed_hook(
        state,
        headers,
        body,
        "github",
        "x-hub-signature-256",
        "sha256=",
    )
    .await
}

async fn gitea(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    signed_hook(state, headers, body, "gitea", "x-gitea-signature", "").await
}

/// GitLab sends the shared token, not a signature: the body is never read.
async fn gitlab(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(secret) = &state.secret else {
        return unauthorized("gitlab", "no webhook secret is configured");
    };
    match headers.get("x-gitlab-token").map(|value| value.as_bytes()) {
        Some(token) if same_secret(token, secret) => accepted(&state, "gitlab"),
        _ => unauthorized("gitlab", "X-Gitlab-Token does not match"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HMAC-SHA256 of `body` under `secret` equals the hex `signature`, as a hook verifies it.
    fn hmac_verifies(secret: &[u8], body: &[u8], signature: &str) -> bool {
        let Some(mut mac) = new_mac(secret) else {
            return false;
        };
        mac.update(body);
        mac_verifies(mac, signature)
    }

    #[test]
    fn hmac_signatures_verify_only_for_the_exact_body_and_secret() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        // GitHub's documented example of X-Hub-Signature-256.
        let signature = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(hmac_verifies(secret, body, signature));
        assert!(!hmac_verifies(secret, b"Hello, World?", signature));
        assert!(!hmac_verifies(b"another secret", body, signature));
        assert!(!hmac_verifies(secret, body, "not hex"));
        assert!(
            !hmac_verifies(secret, body, &signature[..40]),
            "a SHA-1-length digest"
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"toke", b"token"));
        assert!(!same_secret(b"", b"token"));
    }
}
