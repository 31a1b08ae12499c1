//! AWS identity for a terraform run.
//!
//! Credentials come from the standard chain (environment, the environment's `profile`, SSO,
//! instance role), optionally chained through STS AssumeRole with the session name
//! `karrots-<env>-<sha7>`, so CloudTrail tells Karrots' calls from out-of-band ones. Before
//! terraform starts, GetCallerIdentity must answer with the environment's `aws.account_id`.
//! The temporary credentials reach terraform only as variables of its process
//! ([`RunEnvironment`]); nothing here writes or logs them.

pub mod cloudtrail;

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use aws_sdk_sts::config::Region;
use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::config::{AwsTarget, EnvName, RoleArn};
use crate::engine::Lane;
use crate::engine::retry::ErrorClass;
use crate::git::CommitId;
use crate::terraform::RunEnvironment;

/// The identity a run was given, with the variables that hand it to terraform.
#[derive(Debug, Clone)]
pub struct RunIdentity {
    /// `None` for a preview without a preview role: terraform gets no credentials.
    pub caller_arn: Option<String>,
    pub run_env: RunEnvironment,
    /// The same credentials, for the daemon's own calls in the run's name (CloudTrail).
    /// Their `Debug` hides the secret.
    pub credentials: Option<Credentials>,
}

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("no AWS credentials for environment {env} (profile {profile:?}): {message}")]
    Credentials {
        env: String,
        profile: String,
        message: String,
    },
    #[error("assuming {role} for environment {env}: {message}")]
    AssumeRole {
        env: String,
        role: String,
        message: String,
        /// STS could not be reached, timed out, throttled or failed on its side.
        passing: bool,
    },
    #[error("STS GetCallerIdentity for environment {env}: {message}")]
    CallerIdentity {
        env: String,
        message: String,
        passing: bool,
    },
    #[error(
        "refusing to run environment {env}: the AWS credentials answer as account {actual} ({arn}), but aws.account_id is {expected}"
    )]
    WrongAccount {
        env: String,
        expected: String,
        actual: String,
        arn: String,
    },
}

impl AwsError {
    /// Whether trying again may succeed: an STS call that did not get an answer on its
    /// merits may; a credential chain that found nothing is tried once more; the wrong
    /// account or a refused role never.
    pub fn class(&self) -> ErrorClass {
        match self {
            AwsError::AssumeRole { passing: true, .. }
            | AwsError::CallerIdentity { passing: true, .. } => ErrorClass::Transient,
            AwsError::Credentials { .. } => ErrorClass::Unknown,
            _ => ErrorClass::Permanent,
        }
    }
}

/// The HTTP status of an AWS answer, when there was one.
pub(crate) fn status<E>(error: &SdkError<E, HttpResponse>) -> Option<u16> {
    error
        .raw_response()
        .map(|response| response.status().as_u16())
}

pub(crate) fn is_throttling<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> bool {
    let code = error.code().unwrap_or_default();
    code.contains("Throttl")
        || matches!(code, "TooManyRequestsException" | "RequestLimitExceeded")
        || status(error) == Some(429)
}

/// Throttling, a timeout, a connection that failed or a 5xx: worth another attempt.
pub(crate) fn passing<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> bool {
    is_throttling(error)
        || matches!(
            error,
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_)
        )
        || status(error).is_some_and(|s| s >= 500)
}

/// `karrots-<env>-<sha7>`, cut to STS's 64-character limit by shortening the env part.
pub fn session_name(env: &EnvName, commit: &CommitId) -> String {
    let short = commit.short();
    let room = 64 - "karrots-".len() - 1 - short.len();
    let env = &env.as_str()[..env.as_str().len().min(room)];
    format!("karrots-{env}-{short}")
}

/// Establishes the identity of one run and checks its account. The `merged` lane gets the
/// chain's credentials through `role_arn`; the `preview` lane gets `preview_role_arn`, or no
/// credentials at all — never the apply role.
pub async fn establish(
    env: &EnvName,
    target: &AwsTarget,
    lane: Lane,
    commit: &CommitId,
    endpoint_url: Option<&str>,
) -> Result<RunIdentity, AwsError> {
    let mut variables = std::collections::BTreeMap::new();
    variables.insert("AWS_REGION".to_string(), target.region.as_str().to_string());
    variables.insert(
        "AWS_DEFAULT_REGION".to_string(),
        target.region.as_str().to_string(),
    );
    if let Some(url) = endpoint_url {
        variables.insert("AWS_ENDPOINT_URL".to_string(), url.to_string());
    }
    let role = match lane {
        Lane::Merged => target.role_arn.as_ref(),
        Lane::Preview => match &target.preview_role_arn {
            Some(role) => Some(role),
            None => {
                return Ok(RunIdentity {
                    caller_arn: None,
                    run_env: RunEnvironment { variables },
                    credentials: None,
                });
            }
        },
    };

    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(target.region.as_str().to_string()))
        .profile_name(&target.profile);
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let base = loader.load().await;
    let credentials_error = |message: String| AwsError::Credentials {
        env: env.to_string(),
        profile: target.profile.clone(),
        message,
    };
    let credentials = match role {
        Some(role) => assume(env, &base, role, &session_name(env, commit)).await?,
        None => base
            .credentials_provider()
            .ok_or_else(|| credentials_error("no credential provider is configured".into()))?
            .provide_credentials()
            .await
            .map_err(|e| credentials_error(DisplayErrorContext(&e).to_string()))?,
    };

    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&base)
            .credentials_provider(credentials.clone())
            .build(),
    );
    let identity =
        sts.get_caller_identity()
            .send()
            .await
            .map_err(|e| AwsError::CallerIdentity {
                env: env.to_string(),
                message: DisplayErrorContext(&e).to_string(),
                passing: passing(&e),
            })?;
    let actual = identity.account().unwrap_or_default().to_string();
    let arn = identity.arn().unwrap_or_default().to_string();
    if actual != target.account_id.as_str() {
        return Err(AwsError::WrongAccount {
            env: env.to_string(),
            expected: target.account_id.to_string(),
            actual,
            arn,
        });
    }

    variables.insert(
        "AWS_ACCESS_KEY_ID".into(),
        credentials.access_key_id().to_string(),
    );
    variables.insert(
        "AWS_SECRET_ACCESS_KEY".into(),
        credentials.secret_access_key().to_string(),
    );
    if let Some(token) = credentials.session_token() {
        variables.insert("AWS_SESSION_TOKEN".into(), token.to_string());
    }
    Ok(RunIdentity {
        caller_arn: Some(arn),
        run_env: RunEnvironment { variables },
        credentials: Some(credentials),
    })
}

async fn assume(
    env: &EnvName,
    base: &aws_config::SdkConfig,
    role: &RoleArn,
    session_name: &str,
) -> Result<Credentials, AwsError> {
    let error = |message: String, passing: bool| AwsError::AssumeRole {
        env: env.to_string(),
        role: role.as_str().to_string(),
        message,
        passing,
    };
    let output = aws_sdk_sts::Client::new(base)
        .assume_role()
        .role_arn(role.as_str())
        .role_session_name(session_name)
        .send()
        .await
        .map_err(|e| error(DisplayErrorContext(&e).to_string(), passing(&e)))?;
    let issued = output
        .credentials()
        .ok_or_else(|| error("STS returned no credentials".into(), false))?;
    Ok(Credentials::new(
        issued.access_key_id(),
        issued.secret_access_key(),
        Some(issued.session_token().to_string()),
        None,
        "karrots-assume-role",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_fit_sts_limits() {
        let commit = crate::git::CommitId::from_hex("0123456789abcdef0123456789abcdef01234567");
        let prod = EnvName::parse("prod").unwrap();
        assert_eq!(session_name(&prod, &commit), "karrots-prod-0123456");
        let long = EnvName::parse(&"e".repeat(63)).unwrap();
        let name = session_name(&long, &commit);
        assert_eq!(name.len(), 64);
        assert!(name.starts_with("karrots-eee") && name.ends_with("-0123456"));
    }
}
