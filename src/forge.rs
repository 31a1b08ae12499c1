//! Results where developers look: each run's commit status on the forge (GitHub, GitLab,
//! Gitea/Forgejo), context `karrots/<env>` for the merged lane and `karrots/<env>/preview`
//! for previews — `pending` when a run starts, then `success`, `failure` or `error` with the
//! summary or the reason, linked to the run's page.
//!
//! A status is a row of the outbox, written in the same transaction as the run's start or
//! outcome, and sent by [`deliver`]: retried with backoff, kept across a restart. A newer
//! status of a commit's context supersedes one not yet sent, so the forge never gets a
//! run's `pending` after its final state.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{ForgeKind, ForgeSettings};
use crate::engine::state::{EnvStatus, RunKind, RunResult};
use crate::store::{Delivery, OutboxEntry, OutboxKind, StateStore, Summary};

/// The forges' longest status description.
const DESCRIPTION_LIMIT: usize = 140;

/// How long one status request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusState {
    Pending,
    Success,
    /// The commit was refused or its apply failed: something in the commit to fix.
    Failure,
    /// Terraform, credentials, a timeout: something around the commit to fix.
    Error,
}

/// One commit status, as the outbox keeps it (the run it links to is the row's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStatus {
    pub sha: String,
    pub context: String,
    pub state: StatusState,
    pub description: String,
}

/// The context of `env`'s runs of `kind`; drift checks post none (they are about the
/// infrastructure, not a commit).
fn context(env: &str, kind: RunKind) -> Option<String> {
    match kind {
        RunKind::Plan | RunKind::Apply => Some(format!("karrots/{env}")),
        RunKind::Preview => Some(format!("karrots/{env}/preview")),
        RunKind::Drift => None,
    }
}

/// `+3 ~1 -0`.
fn counts(summary: &Summary) -> String {
    format!("+{} ~{} -{}", summary.add, summary.change, summary.destroy)
}

/// The first line of `text` — with the next one when it ends in a colon (`… does not
/// load:` then the first problem) — cut to what a forge takes.
fn first_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
    let first = lines.next().unwrap_or("");
    match lines.next() {
        Some(next) if first.ends_with(':') => bounded(&format!("{first} {next}")),
        _ => bounded(first),
    }
}

fn bounded(text: &str) -> String {
    if text.chars().count() <= DESCRIPTION_LIMIT {
        return text.to_string();
    }
    let cut: String = text.chars().take(DESCRIPTION_LIMIT - 1).collect();
    format!("{cut}…")
}

impl CommitStatus {
    /// The status of a run of `kind` starting on `sha`.
    pub fn started(env: &str, sha: &str, kind: RunKind) -> Option<CommitStatus> {
        let description = match kind {
            RunKind::Plan => "planning",
            RunKind::Apply => "applying the plan",
            RunKind::Preview => "planning a preview (never applied)",
            RunKind::Drift => return None,
        };
        Some(CommitStatus {
            sha: sha.to_string(),
            context: context(env, kind)?,
            state: StatusState::Pending,
            description: description.to_string(),
        })
    }

    /// The status of a run of `kind` on `sha` that ended with `result`; `status` is the
    /// environment's after it. `None` for what posts nothing: a superseded commit (never
    /// started), a drift check.
    pub fn ended(
        env: &str,
        sha: &str,
        kind: RunKind,
        result: RunResult,
        summary: &Summary,
        message: &str,
        status: Option<EnvStatus>,
    ) -> Option<CommitStatus> {
        use StatusState::{Error, Failure, Pending, Success};
        let (state, description) = match (kind, result) {
            (_, RunResult::Superseded) | (RunKind::Drift, _) => return None,
            (RunKind::Preview, RunResult::Changes) => {
                (Success, format!("preview: {}", counts(summary)))
            }
            (_, RunResult::NoChanges) => (Success, "no changes".to_string()),
            (_, RunResult::Changes) if status == Some(EnvStatus::AwaitingApproval) => (
                Pending,
                format!("planned {}: waiting for an approval", counts(summary)),
            ),
            (_, RunResult::Changes) => (Pending, format!("planned {}", counts(summary))),
            (_, RunResult::Applied) => (Success, format!("applied {}", counts(summary))),
            (RunKind::Apply, RunResult::Failed) => {
                (Failure, format!("apply failed: {}", first_line(message)))
            }
            (_, RunResult::Failed) => (Error, first_line(message)),
            (_, RunResult::Refused) => (Failure, first_line(message)),
            (_, RunResult::Interrupted) => (
                Error,
                "interrupted: the daemon stopped during the run".to_string(),
            ),
        };
        Some(CommitStatus {
            sha: sha.to_string(),
            context: context(env, kind)?,
            state,
            description: bounded(&description),
        })
    }

    /// The outbox row: destination `<sha> <context>`, so a newer status of the same context
    /// supersedes it.
    pub fn delivery(&self) -> Delivery {
        Delivery {
            kind: OutboxKind::Status,
            destination: format!("{} {}", self.sha, self.context),
            body: serde_json::to_string(self).unwrap_or_default(),
        }
    }
}

/// One HTTP request to a forge's API.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub url: url::Url,
    pub headers: Vec<(&'static str, String)>,
    pub body: serde_json::Value,
}

/// A forge's REST API, as `forge:` names it.
#[derive(Debug, Clone)]
pub struct Forge {
    settings: ForgeSettings,
    client: reqwest::Client,
}

impl Forge {
    pub fn new(settings: ForgeSettings) -> Forge {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("karrots/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Forge { settings, client }
    }

    /// The page of run `run` that a status links to.
    fn run_page(&self, run: i64) -> String {
        let root = self.settings.public_url.as_str().trim_end_matches('/');
        format!("{root}/runs/{run}")
    }

    /// The request that sets `status` (of run `run`), authenticated with `token`: GitHub's
    /// and Gitea's `POST /repos/{owner}/{repo}/statuses/{sha}`, GitLab's
    /// `POST /projects/{path}/statuses/{sha}` (with its own states and `name`).
    pub fn status_request(&self, status: &CommitStatus, run: Option<i64>, token: &str) -> Request {
        let mut url = self.settings.api_url.clone();
        let mut body = serde_json::json!({
            "description": status.description,
            "context": status.context,
            "state": status.state,
        });
        if let Some(run) = run {
            body["target_url"] = self.run_page(run).into();
        }
        let headers = match self.settings.kind {
            ForgeKind::Github => vec![
                ("authorization", format!("Bearer {token}")),
                ("accept", "application/vnd.github+json".to_string()),
                ("x-github-api-version", "2022-11-28".to_string()),
            ],
            ForgeKind::Gitea => vec![("authorization", format!("token {token}"))],
            ForgeKind::Gitlab => vec![("private-token", token.to_string())],
        };
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            match self.settings.kind {
                ForgeKind::Github | ForgeKind::Gitea => {
                    path.push("repos");
                    path.extend(self.settings.repository.split('/'));
                }
                ForgeKind::Gitlab => {
                    // The project's path is one segment: `acme%2Finfra`.
                    path.push("projects").push(&self.settings.repository);
                }
            }
            path.push("statuses").push(&status.sha);
        }
        if self.settings.kind == ForgeKind::Gitlab
            && let Some(fields) = body.as_object_mut()
        {
            let context = fields.remove("context").unwrap_or_default();
            fields.insert("name".into(), context);
            fields["state"] = match status.state {
                StatusState::Pending => "running",
                StatusState::Success => "success",
                StatusState::Failure | StatusState::Error => "failed",
            }
            .into();
        }
        Request { url, headers, body }
    }

    /// Sends one status of the outbox.
    async fn send(&self, entry: &OutboxEntry) -> Result<(), String> {
        let status: CommitStatus = serde_json::from_str(&entry.body)
            .map_err(|e| format!("an outbox status that does not parse: {e}"))?;
        let token = std::fs::read_to_string(&self.settings.token_file).map_err(|e| {
            format!(
                "reading forge.token_file {}: {e}",
                self.settings.token_file.display()
            )
        })?;
        let request = self.status_request(&status, entry.run, token.trim());
        let mut sending = self
            .client
            .post(request.url.clone())
            .header("content-type", "application/json")
            .body(request.body.to_string())
            .timeout(REQUEST_TIMEOUT);
        for (name, value) in &request.headers {
            sending = sending.header(*name, value);
        }
        let response = sending.send().await.map_err(|e| {
            // reqwest names the URL, never the headers.
            format!("{}: {e}", request.url)
        })?;
        let code = response.status();
        if code.is_success() {
            return Ok(());
        }
        let answer = response.text().await.unwrap_or_default();
        // GitLab refuses to set a state a status already has; it has it.
        if self.settings.kind == ForgeKind::Gitlab && answer.contains("Cannot transition status") {
            return Ok(());
        }
        Err(format!(
            "{} answered {code}: {}",
            request.url,
            first_line(&answer)
        ))
    }
}

/// Sends the commit statuses due in the outbox to `forge` until `shutdown`.
pub async fn deliver(
    store: Arc<dyn StateStore>,
    forge: Forge,
    tick: Duration,
    shutdown: CancellationToken,
) {
    let forge = Arc::new(forge);
    let send = |entry: OutboxEntry| {
        let forge = forge.clone();
        async move { forge.send(&entry).await }
    };
    crate::outbox::deliver(store, OutboxKind::Status, tick, shutdown, send).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forge(kind: ForgeKind, api: &str, repository: &str) -> Forge {
        Forge::new(ForgeSettings {
            kind,
            api_url: url::Url::parse(api).unwrap(),
            repository: repository.into(),
            token_file: "/etc/karrots/forge-token".into(),
            public_url: url::Url::parse("https://karrots.example.com/").unwrap(),
        })
    }

    fn applied() -> CommitStatus {
        let summary = Summary {
            add: 3,
            change: 1,
            destroy: 0,
        };
        CommitStatus::ended(
            "prod",
            "0123abcd",
            RunKind::Apply,
            RunResult::Applied,
            &summary,
            "",
            None,
        )
        .unwrap()
    }

    #[test]
    fn each_forge_gets_its_own_request() {
        let status = applied();
        let github = forge(ForgeKind::Github, "https://api.github.com", "acme/infra")
            .status_request(&status, Some(7), "ghs_t");
        assert_eq!(
            github.url.as_str(),
            "https://api.github.com/repos/acme/infra/statuses/0123abcd"
        );
        assert_eq!(
            github.headers[0],
            ("authorization", "Bearer ghs_t".to_string())
        );
        assert_eq!(
            github.body,
            serde_json::json!({"state": "success", "context": "karrots/prod", "description": "applied +3 ~1 -0", "target_url": "https://karrots.example.com/runs/7"})
        );
        let gitea = forge(
            ForgeKind::Gitea,
            "https://git.example.com/api/v1/",
            "acme/infra",
        )
        .status_request(&status, Some(7), "t");
        assert_eq!(
            gitea.url.as_str(),
            "https://git.example.com/api/v1/repos/acme/infra/statuses/0123abcd"
        );
        assert_eq!(gitea.headers, [("authorization", "token t".to_string())]);
        assert_eq!(gitea.body, github.body);
        let gitlab = forge(
            ForgeKind::Gitlab,
            "https://gitlab.example.com/api/v4",
            "platform/team/infra",
        )
        .status_request(&status, Some(7), "glpat");
        assert_eq!(
            gitlab.url.as_str(),
            "https://gitlab.example.com/api/v4/projects/platform%2Fteam%2Finfra/statuses/0123abcd"
        );
        assert_eq!(gitlab.headers, [("private-token", "glpat".to_string())]);
        assert_eq!(
            gitlab.body,
            serde_json::json!({"state": "success", "name": "karrots/prod", "description": "applied +3 ~1 -0", "target_url": "https://karrots.example.com/runs/7"})
        );
    }

    #[test]
    fn each_outcome_has_its_state_and_words() {
        let none = Summary::default();
        let two = Summary {
            add: 2,
            change: 0,
            destroy: 1,
        };
        let ended = |kind, result, summary: &Summary, message: &str, status| {
            CommitStatus::ended("prod", "abc", kind, result, summary, message, status)
                .map(|status| (status.context, status.state, status.description))
        };
        use StatusState::*;
        let prod = || "karrots/prod".to_string();
        assert_eq!(
            ended(RunKind::Plan, RunResult::NoChanges, &none, "", None),
            Some((prod(), Success, "no changes".into()))
        );
        assert_eq!(
            ended(RunKind::Plan, RunResult::Changes, &two, "", None),
            Some((prod(), Pending, "planned +2 ~0 -1".into()))
        );
        assert_eq!(
            ended(
                RunKind::Plan,
                RunResult::Changes,
                &two,
                "",
                Some(EnvStatus::AwaitingApproval)
            ),
            Some((
                prod(),
                Pending,
                "planned +2 ~0 -1: waiting for an approval".into()
            ))
        );
        assert_eq!(
            ended(
                RunKind::Plan,
                RunResult::Refused,
                &none,
                "abc1234 does not descend from the last applied commit\nmore",
                None
            ),
            Some((
                prod(),
                Failure,
                "abc1234 does not descend from the last applied commit".into()
            ))
        );
        assert_eq!(
            ended(
                RunKind::Plan,
                RunResult::Failed,
                &none,
                "STS: Connection refused",
                None
            ),
            Some((prod(), Error, "STS: Connection refused".into()))
        );
        assert_eq!(
            ended(
                RunKind::Plan,
                RunResult::Refused,
                &none,
                "does not pass karrots check:\nkarrots.yaml:9: surprise: unknown key\nmore",
                None
            ),
            Some((
                prod(),
                Failure,
                "does not pass karrots check: karrots.yaml:9: surprise: unknown key".into()
            ))
        );
        assert_eq!(
            ended(
                RunKind::Apply,
                RunResult::Failed,
                &none,
                "Error: quota",
                None
            ),
            Some((prod(), Failure, "apply failed: Error: quota".into()))
        );
        assert_eq!(
            ended(RunKind::Preview, RunResult::Changes, &two, "", None),
            Some((
                "karrots/prod/preview".into(),
                Success,
                "preview: +2 ~0 -1".into()
            ))
        );
        assert_eq!(
            ended(RunKind::Plan, RunResult::Superseded, &none, "", None),
            None
        );
        assert_eq!(
            ended(RunKind::Drift, RunResult::Changes, &two, "", None),
            None
        );
        let long = "x".repeat(300);
        let (_, _, description) =
            ended(RunKind::Plan, RunResult::Failed, &none, &long, None).unwrap();
        assert_eq!(description.chars().count(), DESCRIPTION_LIMIT);
    }
}
