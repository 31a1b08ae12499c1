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

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::{get, post};
use hmac::{KeyInit, Mac};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::DaemonConfig;
use crate::daemon::Shared;
use crate::engine::state::{DriftStatus, RunKind, RunResult};
use crate::store::{EnvironmentRow, RunRow, StoreError};

/// The largest webhook body accepted.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;

/// Hook bodies read at once. Each costs a connection and HMAC work but no buffer (the
/// signature is computed as the body arrives); beyond this a hook gets 503 at once, and the
/// forge retries it.
const MAX_CONCURRENT_HOOKS: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub env: String,
    pub kind: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvLabels {
    pub env: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub env: String,
    pub status: String,
}

/// The daemon's Prometheus metrics.
pub struct Metrics {
    /// 1 for each environment's current drift status, 0 for the others.
    pub drift_status: Family<DriftLabels, Gauge>,
    /// Resources the last drift check found drifted, per environment.
    pub drifted_resources: Family<EnvLabels, Gauge>,
    pub drift_check_seconds: Histogram,
    pub runs: Family<RunLabels, Counter>,
    pub plan_seconds: Histogram,
    pub apply_seconds: Histogram,
    pub fetch_errors: Counter,
    /// Commits waiting for a worker.
    pub queue_depth: Gauge,
    /// Seconds since the last successful fetch, set when scraped.
    pub since_fetch: Gauge<f64, AtomicU64>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let runs = Family::<RunLabels, Counter>::default();
        let drift_status = Family::<DriftLabels, Gauge>::default();
        let drifted_resources = Family::<EnvLabels, Gauge>::default();
        let drift_check_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let plan_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let apply_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let fetch_errors = Counter::default();
        let since_fetch = Gauge::<f64, AtomicU64>::default();
        let queue_depth = Gauge::default();
        let mut registry = Registry::with_prefix("karrots");
        registry.register("runs", "Runs by environment, kind and result", runs.clone());
        registry.register(
            "queue_depth",
            "Commits waiting for a worker",
            queue_depth.clone(),
        );
        registry.register(
            "plan_duration_seconds",
            "Duration of terraform plans",
            plan_seconds.clone(),
        );
        registry.register(
            "apply_duration_seconds",
            "Duration of terraform applies",
            apply_seconds.clone(),
        );
        registry.register(
            "drift_status",
            "Drift status per environment: 1 for the current one (in_sync, drifted, error)",
            drift_status.clone(),
        );
        registry.register(
            "drifted_resources",
            "Resources found drifted by the last drift check",
            drifted_resources.clone(),
        );
        registry.register(
            "drift_check_duration_seconds",
            "Duration of drift checks, from staging to the plan's summary",
            drift_check_seconds.clone(),
        );
        registry.register(
            "fetch_errors",
            "Failed fetches of the config repository",
            fetch_errors.clone(),
        );
        registry.register(
            "seconds_since_last_fetch",
            "Seconds since the config repository was last fetched successfully",
            since_fetch.clone(),
        );
        Metrics {
            drift_status,
            drifted_resources,
            drift_check_seconds,
            runs,
            plan_seconds,
            apply_seconds,
            fetch_errors,
            queue_depth,
            since_fetch,
            registry,
        }
    }
}

impl Metrics {
    /// Records an environment's drift status and how many resources drifted.
    pub fn drift(&self, env: &str, status: DriftStatus, drifted: usize) {
        use DriftStatus;
        for each in [
            DriftStatus::InSync,
            DriftStatus::Drifted,
            DriftStatus::Error,
        ] {
            self.drift_status
                .get_or_create(&DriftLabels {
                    env: env.to_string(),
                    status: each.as_str().to_string(),
                })
                .set(i64::from(each == status));
        }
        self.drifted_resources
            .get_or_create(&EnvLabels {
                env: env.to_string(),
            })
            .set(drifted as i64);
    }

    pub fn run(&self, env: &str, kind: RunKind, result: RunResult) {
        self.runs
            .get_or_create(&RunLabels {
                env: env.to_string(),
                kind: kind.as_str().to_string(),
                result: result.as_str().to_string(),
            })
            .inc();
    }
}

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

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    secret: Option<Arc<Vec<u8>>>,
    api_token: Option<Arc<Vec<u8>>>,
    /// Hook bodies being read now, at most [`MAX_CONCURRENT_HOOKS`].
    hooks: Arc<tokio::sync::Semaphore>,
}

/// The status page's cookie: it holds a digest of the API token, not the token, so what a
/// browser keeps cannot be replayed as `Authorization: Bearer`.
const SESSION_COOKIE: &str = "karrots_session";

pub fn router(shared: Arc<Shared>, secret: Option<Vec<u8>>, api_token: Option<Vec<u8>>) -> Router {
    let metrics_public = shared.config.metrics_public;
    let state = AppState {
        shared,
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
        .route("/healthz", get(|| async { "ok" }))
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
    let metrics = &state.shared.metrics;
    let since = state
        .shared
        .last_fetch
        .lock()
        .ok()
        .and_then(|last| last.map(|at| at.elapsed().as_secs_f64()))
        .unwrap_or(f64::NAN);
    metrics.since_fetch.set(since);
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &metrics.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
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
    details: Vec<serde_json::Value>,
    message: String,
}

fn environment_views(shared: &Shared) -> Result<Vec<EnvironmentView>, StoreError> {
    let store = &shared.store;
    let mut out = Vec::new();
    for row in store.environments()? {
        let last_run = store.runs(Some(&row.name), 1)?.into_iter().next();
        let drift = store.drift(&row.name)?;
        let checks_on = shared
            .drift_policy_at(&row.name, row.last_applied.as_deref())
            .is_some_and(|policy| policy.interval.is_some());
        let resources = drift
            .resources
            .iter()
            .filter_map(|resource| resource.get("address")?.as_str().map(str::to_string))
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
    match environment_views(&state.shared) {
        Ok(views) => Json(views).into_response(),
        Err(error) => internal(error),
    }
}

/// Runs the status page lists under the environments, and on a run's page.
const PAGE_RUNS: usize = 30;

/// Runs `/api/v1/runs` answers with, newest first.
const API_RUNS: usize = 200;

async fn status_page(State(state): State<AppState>) -> Response {
    let views = match environment_views(&state.shared) {
        Ok(views) => views,
        Err(error) => return internal(error),
    };
    match state.shared.store.runs(None, PAGE_RUNS) {
        Ok(runs) => page::overview(&views, &runs, std::time::SystemTime::now()).into_response(),
        Err(error) => internal(error),
    }
}

async fn run_page(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    let store = &state.shared.store;
    let run = match store.run(id) {
        Ok(Some(run)) => run,
        Ok(None) => return (StatusCode::NOT_FOUND, format!("no run {id}\n")).into_response(),
        Err(error) => return internal(error),
    };
    // One more than shown: the run itself is among them.
    match store.runs(Some(&run.env), PAGE_RUNS + 1) {
        Ok(mut others) => {
            others.retain(|other| other.id != run.id);
            others.truncate(PAGE_RUNS);
            page::run_page(&run, &others, std::time::SystemTime::now()).into_response()
        }
        Err(error) => internal(error),
    }
}

#[derive(Deserialize)]
struct RunsQuery {
    env: Option<String>,
}

async fn runs(State(state): State<AppState>, Query(query): Query<RunsQuery>) -> Response {
    match state.shared.store.runs(query.env.as_deref(), API_RUNS) {
        Ok(runs) => Json(runs).into_response(),
        Err(error) => internal(error),
    }
}

async fn run(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    match state.shared.store.run(id) {
        Ok(Some(run)) => Json(run).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(error) => internal(error),
    }
}

/// A verified hook: wake the main loop. A burst of hooks is one fetch, because the wake
/// notification holds at most one permit.
fn accepted(state: &AppState, forge: &str) -> Response {
    tracing::info!(forge, "verified webhook: fetching");
    state.shared.wake.notify_one();
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
