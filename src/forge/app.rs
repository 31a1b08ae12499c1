//! A GitHub App's installation tokens: an RS256 JWT signed with the App's key (read from its
//! file at each minting, never kept) is exchanged for an installation token
//! (`POST {api_url}/app/installations/{id}/access_tokens`), kept in memory only, and minted
//! again [`RENEW_BEFORE`] its `expires_at`. The token serves the fetch (through the daemon's
//! credential socket) and the forge.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::GithubApp;

/// A token is minted again when less than this is left of it (GitHub's last an hour).
pub const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);

/// How long a JWT is valid (GitHub takes at most 10 minutes), and how far back its `iat` is
/// set against a clock that runs late.
const JWT_LIFETIME: u64 = 9 * 60;
const CLOCK_SKEW: u64 = 60;

/// How long minting a token may take.
const MINT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Minted {
    token: String,
    expires: SystemTime,
}

/// The installation tokens of one App, minted when needed.
pub struct AppTokens {
    app: GithubApp,
    client: reqwest::Client,
    current: tokio::sync::Mutex<Option<Minted>>,
}

impl std::fmt::Debug for AppTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppTokens")
            .field("app_id", &self.app.app_id)
            .finish()
    }
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AppTokens {
    pub fn new(app: GithubApp) -> AppTokens {
        AppTokens {
            app,
            client: super::api_client(),
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// An installation token with more than [`RENEW_BEFORE`] left: the one in memory, or a
    /// new one. Why not, in words that name the App and never a secret.
    pub async fn token(&self) -> Result<String, String> {
        let mut current = self.current.lock().await;
        if let Some(minted) = current.as_ref()
            && minted.expires > SystemTime::now() + RENEW_BEFORE
        {
            return Ok(minted.token.clone());
        }
        let minted = self.mint().await.map_err(|error| {
            format!(
                "GitHub App {} (installation {}): {error}",
                self.app.app_id, self.app.installation_id
            )
        })?;
        let token = minted.token.clone();
        *current = Some(minted);
        Ok(token)
    }

    /// The App's JWT: `iss` the App, valid from a minute ago for nine minutes.
    pub fn jwt(&self, now: SystemTime) -> Result<String, String> {
        let key_file = &self.app.private_key_file;
        let pem = std::fs::read(key_file)
            .map_err(|e| format!("reading private_key_file {}: {e}", key_file.display()))?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|e| {
            format!(
                "private_key_file {} is no RSA private key in PEM: {e}",
                key_file.display()
            )
        })?;
        let now = unix(now);
        let claims = serde_json::json!({
            "iat": now.saturating_sub(CLOCK_SKEW),
            "exp": now + JWT_LIFETIME,
            "iss": self.app.app_id.to_string(),
        });
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        jsonwebtoken::encode(&header, &claims, &key).map_err(|e| format!("signing the JWT: {e}"))
    }

    async fn mint(&self) -> Result<Minted, String> {
        let jwt = self.jwt(SystemTime::now())?;
        let mut url = self.app.api_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            let installation = self.app.installation_id.to_string();
            path.pop_if_empty()
                .extend(["app", "installations", &installation, "access_tokens"]);
        }
        let response = self
            .client
            .post(url.clone())
            .header("authorization", format!("Bearer {jwt}"))
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28")
            .timeout(MINT_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let code = response.status();
        let text = response.text().await.unwrap_or_default();
        if !code.is_success() {
            let said = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|answer| answer["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            return Err(format!("POST {url} answered {code}: {said}"));
        }
        let answer: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("POST {url}: an answer that is no JSON: {e}"))?;
        let token = answer["token"].as_str().unwrap_or_default().to_string();
        let expires = answer["expires_at"]
            .as_str()
            .and_then(|at| humantime::parse_rfc3339_weak(at).ok());
        match expires {
            Some(expires) if !token.is_empty() => Ok(Minted { token, expires }),
            _ => Err(format!("POST {url}: no token and expires_at in the answer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jwt_is_rs256_for_the_app_and_lasts_nine_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("app.pem");
        let made = std::process::Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .expect("openssl is installed");
        assert!(made.status.success(), "{made:?}");
        let public = std::process::Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .output()
            .unwrap()
            .stdout;
        let tokens = AppTokens::new(GithubApp {
            app_id: 123456,
            installation_id: 42,
            private_key_file: key,
            api_url: url::Url::parse("https://api.github.com").unwrap(),
        });
        let now = SystemTime::now();
        let jwt = tokens.jwt(now).unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_rsa_pem(&public).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_required_spec_claims(&["exp", "iat", "iss"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(&jwt, &decoding, &validation)
            .expect("the App's public key verifies it")
            .claims;
        assert_eq!(claims["iss"], "123456");
        let iat = claims["iat"].as_u64().unwrap();
        assert_eq!(
            claims["exp"].as_u64().unwrap() - iat,
            JWT_LIFETIME + CLOCK_SKEW
        );
        assert_eq!(iat, unix(now) - CLOCK_SKEW);

        let missing = AppTokens::new(GithubApp {
            private_key_file: dir.path().join("nowhere.pem"),
            ..tokens.app.clone()
        });
        assert!(
            missing
                .jwt(now)
                .unwrap_err()
                .starts_with("reading private_key_file")
        );
    }
}
