//! Who changed a drifted resource: CloudTrail `LookupEvents` by the resource's id.
//!
//! One lookup per resource over a window (from the last time the environment was known in
//! sync, less CloudTrail's delivery delay, to now), every page followed. Read-only events and
//! the daemon's own sessions (`karrots-<env>-…`) are left out; assumed-role and SSO sessions
//! resolve to the role ARN and the session name; the access key id is kept. Requests are
//! limited to two a second per account across the daemon (CloudTrail's own limit for
//! `LookupEvents`), throttling answers are retried with backoff a bounded number of times, and
//! a lookup that still fails says so — the alert goes out without it.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sdk_cloudtrail::config::http::HttpResponse;
use aws_sdk_cloudtrail::config::retry::RetryConfig;
use aws_sdk_cloudtrail::config::timeout::TimeoutConfig;
use aws_sdk_cloudtrail::config::{BehaviorVersion, Region};
use aws_sdk_cloudtrail::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_cloudtrail::operation::lookup_events::LookupEventsError;
use aws_sdk_cloudtrail::types::{LookupAttribute, LookupAttributeKey};
use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// How far back of the last in-sync moment the window starts: CloudTrail delivers events up
/// to about 15 minutes after the call.
pub const DELIVERY_MARGIN: Duration = Duration::from_secs(15 * 60);

/// Pages read per resource at most; a resource changed more often than this in one window
/// is named by its latest changes.
const MAX_PAGES: usize = 20;

/// Attempts of one request when CloudTrail throttles or cannot be reached.
const MAX_RETRIES: usize = 4;

/// `LookupEvents` requests per account, daemon-wide.
pub type AccountLimiter = DefaultKeyedRateLimiter<String>;

/// Two requests a second per account, no burst.
pub fn account_limiter() -> AccountLimiter {
    RateLimiter::keyed(Quota::with_period(Duration::from_millis(500)).expect("a non-zero period"))
}

/// One change to a resource, as the alert shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBy {
    /// The IAM user or role ARN (for an assumed-role or SSO session, the role's).
    pub principal: String,
    /// The session name of an assumed role (for SSO, the person's user name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The API call, e.g. `CreateTags`.
    pub event: String,
    /// RFC 3339.
    pub time: String,
    pub access_key_id: String,
    pub event_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CloudTrailError {
    #[error("CloudTrail throttled LookupEvents {attempts} times in a row; gave up")]
    Throttled { attempts: usize },
    #[error("CloudTrail LookupEvents failed: {0}")]
    Failed(String),
}

/// A CloudTrail client for one environment's credentials. Retries are the caller's (see
/// [`changes_to`]), so that every attempt passes the account's rate limit.
pub fn client(
    credentials: Credentials,
    region: &str,
    endpoint_url: Option<&str>,
) -> aws_sdk_cloudtrail::Client {
    let mut config = aws_sdk_cloudtrail::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .credentials_provider(credentials)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(20))
                .build(),
        );
    if let Some(url) = endpoint_url {
        config = config.endpoint_url(url);
    }
    aws_sdk_cloudtrail::Client::from_conf(config.build())
}

/// The window and whose sessions are the daemon's own.
pub struct Lookup<'a> {
    pub client: &'a aws_sdk_cloudtrail::Client,
    pub limiter: &'a AccountLimiter,
    pub account: &'a str,
    /// `karrots-<env>-`: sessions named so are the daemon's own runs.
    pub own_sessions: String,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// The write events of `resource_id` in the window, oldest first, without the daemon's own.
pub async fn changes_to(
    lookup: &Lookup<'_>,
    resource_id: &str,
) -> Result<Vec<ChangedBy>, CloudTrailError> {
    let attribute = LookupAttribute::builder()
        .attribute_key(LookupAttributeKey::ResourceName)
        .attribute_value(resource_id)
        .build()
        .map_err(|e| CloudTrailError::Failed(e.to_string()))?;
    let mut seen = HashSet::new();
    let mut changes = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let request = || async {
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            lookup
                .limiter
                .until_key_ready(&lookup.account.to_string())
                .await;
            lookup
                .client
                .lookup_events()
                .lookup_attributes(attribute.clone())
                .start_time(lookup.start.into())
                .end_time(lookup.end.into())
                .max_results(50)
                .set_next_token(token.clone())
                .send()
                .await
        };
        let page = request
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(500))
                    .with_max_delay(Duration::from_secs(4))
                    .with_max_times(MAX_RETRIES)
                    .with_jitter(),
            )
            .when(super::passing)
            .await
            .map_err(|error| {
                if super::is_throttling(&error) {
                    CloudTrailError::Throttled {
                        attempts: attempts.load(std::sync::atomic::Ordering::Relaxed),
                    }
                } else {
                    CloudTrailError::Failed(describe(&error))
                }
            })?;
        for event in page.events() {
            let facts = EventFacts {
                event_id: event.event_id().unwrap_or_default(),
                event_name: event.event_name().unwrap_or_default(),
                read_only: event.read_only(),
                access_key_id: event.access_key_id().unwrap_or_default(),
                time: event
                    .event_time()
                    .and_then(|t| SystemTime::try_from(*t).ok()),
                username: event.username().unwrap_or_default(),
                record: event.cloud_trail_event().unwrap_or_default(),
            };
            if !seen.insert(facts.event_id.to_string()) {
                continue;
            }
            if let Some(change) = change_of(&facts, &lookup.own_sessions) {
                changes.push(change);
            }
        }
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    changes.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(changes)
}

type LookupError = SdkError<LookupEventsError, HttpResponse>;

/// A failed request in one line: the HTTP status and the error code when CloudTrail answered
/// (its body can be an HTML page), else the cause, bounded.
fn describe(error: &LookupError) -> String {
    match (super::status(error), error.code()) {
        (Some(status), Some(code)) => format!(
            "HTTP {status} {code}: {}",
            error.message().unwrap_or_default()
        ),
        (Some(status), None) => format!("HTTP {status} (not a CloudTrail answer)"),
        _ => {
            let text = DisplayErrorContext(error).to_string();
            crate::terraform::tail(&text, 300)
        }
    }
}

/// The fields of one event the attribution reads.
#[derive(Debug, Clone, Default)]
pub struct EventFacts<'a> {
    pub event_id: &'a str,
    pub event_name: &'a str,
    /// `"true"` or `"false"`.
    pub read_only: Option<&'a str>,
    pub access_key_id: &'a str,
    pub time: Option<SystemTime>,
    pub username: &'a str,
    /// The full CloudTrail record, a JSON string.
    pub record: &'a str,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Record {
    #[serde(default)]
    read_only: Option<bool>,
    #[serde(default)]
    user_identity: UserIdentity,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UserIdentity {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    arn: String,
    #[serde(default)]
    access_key_id: String,
    #[serde(default)]
    invoked_by: String,
    #[serde(default)]
    session_context: SessionContext,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SessionContext {
    #[serde(default)]
    session_issuer: SessionIssuer,
}

#[derive(Deserialize, Default)]
struct SessionIssuer {
    #[serde(default)]
    arn: String,
}

/// Who made one event, or `None` when it does not count: a read-only call, or one of the
/// daemon's own sessions (named `own_sessions…`).
pub fn change_of(event: &EventFacts<'_>, own_sessions: &str) -> Option<ChangedBy> {
    let record: Record = serde_json::from_str(event.record).unwrap_or_default();
    let read_only = match event.read_only {
        Some(flag) => flag.eq_ignore_ascii_case("true"),
        None => record.read_only.unwrap_or(false),
    };
    if read_only {
        return None;
    }
    let identity = &record.user_identity;
    let (principal, session) = match identity.kind.as_str() {
        "AssumedRole" => {
            // arn:aws:sts::<account>:assumed-role/<role>/<session>
            let session = identity.arn.rsplit('/').next().map(str::to_string);
            let role = if identity.session_context.session_issuer.arn.is_empty() {
                role_of_session(&identity.arn)
            } else {
                identity.session_context.session_issuer.arn.clone()
            };
            (role, session)
        }
        "AWSService" => (identity.invoked_by.clone(), None),
        _ if !identity.arn.is_empty() => (identity.arn.clone(), None),
        _ => (event.username.to_string(), None),
    };
    let session_name = session.as_deref().unwrap_or(event.username);
    if !own_sessions.is_empty() && session_name.starts_with(own_sessions) {
        return None;
    }
    let access_key_id = if event.access_key_id.is_empty() {
        identity.access_key_id.clone()
    } else {
        event.access_key_id.to_string()
    };
    Some(ChangedBy {
        principal,
        session,
        event: event.event_name.to_string(),
        time: event
            .time
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default(),
        access_key_id,
        event_id: event.event_id.to_string(),
    })
}

/// `arn:aws:sts::1:assumed-role/name/session` → `arn:aws:iam::1:role/name`.
fn role_of_session(arn: &str) -> String {
    let mut parts = arn.splitn(6, ':');
    let (Some(_), Some(partition), Some(_), Some(_), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return arn.to_string();
    };
    match resource
        .strip_prefix("assumed-role/")
        .and_then(|r| r.split_once('/'))
    {
        Some((role, _session)) => format!("arn:{partition}:iam::{account}:role/{role}"),
        None => arn.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(record: &'a str, read_only: Option<&'a str>) -> EventFacts<'a> {
        EventFacts {
            event_id: "e1",
            event_name: "CreateTags",
            read_only,
            access_key_id: "",
            time: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            username: "",
            record,
        }
    }

    #[test]
    fn sessions_resolve_to_their_role_and_keep_the_access_key() {
        let assumed = r#"{"userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::111122223333:assumed-role/admin/alice","accessKeyId":"ASIAALICE","sessionContext":{"sessionIssuer":{"arn":"arn:aws:iam::111122223333:role/ops/admin"}}}}"#;
        let change = change_of(&facts(assumed, Some("false")), "karrots-prod-").unwrap();
        assert_eq!(change.principal, "arn:aws:iam::111122223333:role/ops/admin");
        assert_eq!(change.session.as_deref(), Some("alice"));
        assert_eq!(change.access_key_id, "ASIAALICE");
        assert_eq!(change.time, "2023-11-14T22:13:20Z");

        // Without a session issuer, the role comes from the session ARN (path unknown).
        let sso = r#"{"userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_Admin_0123/bob@example.com","accessKeyId":"ASIABOB"}}"#;
        let change = change_of(&facts(sso, None), "karrots-prod-").unwrap();
        assert_eq!(
            change.principal,
            "arn:aws:iam::111122223333:role/AWSReservedSSO_Admin_0123"
        );
        assert_eq!(change.session.as_deref(), Some("bob@example.com"));

        let user = r#"{"userIdentity":{"type":"IAMUser","arn":"arn:aws:iam::111122223333:user/carol","accessKeyId":"AKIACAROL"}}"#;
        let change = change_of(&facts(user, None), "karrots-prod-").unwrap();
        assert_eq!(change.principal, "arn:aws:iam::111122223333:user/carol");
        assert_eq!(
            (change.session, change.access_key_id.as_str()),
            (None, "AKIACAROL")
        );
    }

    #[test]
    fn reads_and_the_daemons_own_sessions_are_never_blamed() {
        let own = r#"{"userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::111122223333:assumed-role/karrots-worker/karrots-prod-0123456"}}"#;
        assert_eq!(change_of(&facts(own, Some("false")), "karrots-prod-"), None);
        // Another environment's session is not this environment's daemon run.
        assert!(change_of(&facts(own, Some("false")), "karrots-dev-").is_some());
        let user = r#"{"userIdentity":{"type":"IAMUser","arn":"arn:aws:iam::1:user/carol"}}"#;
        assert_eq!(change_of(&facts(user, Some("true")), "karrots-prod-"), None);
        let read_in_record = r#"{"readOnly":true,"userIdentity":{"type":"IAMUser","arn":"arn:aws:iam::1:user/carol"}}"#;
        assert_eq!(
            change_of(&facts(read_in_record, None), "karrots-prod-"),
            None
        );
    }
}
