//! Results where developers look: each run's commit status on the forge (GitHub, GitLab,
//! Gitea/Forgejo), context `karrots/<env>` for the merged lane and `karrots/<env>/preview`
//! for previews — `pending` when a run starts, then `success`, `failure` or `error` with the
//! summary or the reason, linked to the run's page — and one comment on the pull request of a
//! previewed commit ([`comment`]).
//!
//! A status is a row of the outbox, written in the same transaction as the run's start or
//! outcome, and sent by [`deliver`]: retried with backoff, kept across a restart. A newer
//! status of a commit's context supersedes one not yet sent, so the forge never gets a
//! run's `pending` after its final state.

pub mod app;
pub mod comment;

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
            // The run's message says how to approve, when approvals can come.
            (_, RunResult::Changes) if status == Some(EnvStatus::AwaitingApproval) => (
                Pending,
                if message.is_empty() {
                    format!("planned {}: waiting for an approval", counts(summary))
                } else {
                    first_line(message)
                },
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

/// The outbox row that has the pull request comment of `sha` written again from the commit's
/// preview runs; one waiting per commit.
pub fn comment_delivery(sha: &str) -> Delivery {
    Delivery {
        kind: OutboxKind::Comment,
        destination: sha.to_string(),
        body: serde_json::json!({ "sha": sha }).to_string(),
    }
}

/// The HTTP client of a forge's API: no redirect followed (a token never goes to another
/// host), Karrots named as the user agent (GitHub requires one).
pub(crate) fn api_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("karrots/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
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
    /// The GitHub App whose installation token serves when there is no `token_file`.
    app: Option<Arc<app::AppTokens>>,
}

impl Forge {
    pub fn new(settings: ForgeSettings, app: Option<Arc<app::AppTokens>>) -> Forge {
        let client = api_client();
        Forge {
            settings,
            client,
            app,
        }
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
        let mut body = serde_json::json!({
            "description": status.description,
            "context": status.context,
            "state": status.state,
        });
        if let Some(run) = run {
            body["target_url"] = self.run_page(run).into();
        }
        let headers = self.headers(token);
        let url = self.url(&["statuses", &status.sha]);
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
        let request = self.status_request(&status, entry.run, &self.token().await?);
        let post = reqwest::Method::POST;
        let (code, answer) = self
            .exchange(&post, &request.url, &request.headers, Some(&request.body))
            .await?;
        if code.is_success() {
            return Ok(());
        }
        // GitLab refuses to set a state a status already has; it has it.
        if self.settings.kind == ForgeKind::Gitlab && answer.contains("Cannot transition status") {
            return Ok(());
        }
        Err(format!(
            "{post} {} answered {code}: {}",
            request.url,
            first_line(&answer)
        ))
    }

    /// One request to the API, with `headers` (the token's) and a JSON `body`: the answer's
    /// status and text. Its errors name the URL, never a header.
    async fn exchange(
        &self,
        method: &reqwest::Method,
        url: &url::Url,
        headers: &[(&'static str, String)],
        body: Option<&serde_json::Value>,
    ) -> Result<(reqwest::StatusCode, String), String> {
        let mut request = self
            .client
            .request(method.clone(), url.clone())
            .timeout(REQUEST_TIMEOUT);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let code = response.status();
        Ok((code, response.text().await.unwrap_or_default()))
    }
}

/// The pull request comment's part of the forge's API.
impl Forge {
    /// The largest comment the forge takes.
    fn comment_limit(&self) -> usize {
        match self.settings.kind {
            ForgeKind::Github => 65_536,
            ForgeKind::Gitea => 65_535,
            ForgeKind::Gitlab => 1_000_000,
        }
    }

    /// The API's URL of `segments` under the repository's root.
    fn url(&self, segments: &[&str]) -> url::Url {
        let mut url = self.settings.api_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            match self.settings.kind {
                ForgeKind::Github | ForgeKind::Gitea => {
                    path.push("repos");
                    path.extend(self.settings.repository.split('/'));
                }
                ForgeKind::Gitlab => {
                    path.push("projects").push(&self.settings.repository);
                }
            }
            path.extend(segments);
        }
        url
    }

    /// How each forge takes the token.
    fn headers(&self, token: &str) -> Vec<(&'static str, String)> {
        match self.settings.kind {
            ForgeKind::Github => vec![
                ("authorization", format!("Bearer {token}")),
                ("accept", "application/vnd.github+json".to_string()),
                ("x-github-api-version", "2022-11-28".to_string()),
            ],
            ForgeKind::Gitea => vec![("authorization", format!("token {token}"))],
            ForgeKind::Gitlab => vec![("private-token", token.to_string())],
        }
    }

    /// The API token: `token_file`'s as it is now, or the App's installation token.
    async fn token(&self) -> Result<String, String> {
        match (&self.settings.token_file, &self.app) {
            (Some(file), _) => std::fs::read_to_string(file)
                .map(|token| token.trim().to_string())
                .map_err(|e| format!("reading forge.token_file {}: {e}", file.display())),
            (None, Some(app)) => app.token().await,
            (None, None) => Err("forge: no token_file and no github_app".to_string()),
        }
    }

    /// One call of the API; its JSON answer (`null` for a GET answered 404: nothing there).
    async fn call(
        &self,
        method: reqwest::Method,
        url: url::Url,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let headers = self.headers(&self.token().await?);
        let (code, text) = self
            .exchange(&method, &url, &headers, body.as_ref())
            .await?;
        if code == reqwest::StatusCode::NOT_FOUND && method == reqwest::Method::GET {
            return Ok(serde_json::Value::Null);
        }
        if !code.is_success() {
            return Err(format!(
                "{method} {url} answered {code}: {}",
                first_line(&text)
            ));
        }
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    /// The open pull (merge) requests whose head is `sha`, by number (GitLab: `iid`).
    async fn pull_requests(&self, sha: &str) -> Result<Vec<u64>, String> {
        let get = reqwest::Method::GET;
        let (found, open_state, number) = match self.settings.kind {
            ForgeKind::Github => (
                self.call(get, self.url(&["commits", sha, "pulls"]), None)
                    .await?,
                "open",
                "number",
            ),
            ForgeKind::Gitea => {
                let pull = self
                    .call(get, self.url(&["commits", sha, "pull"]), None)
                    .await?;
                (serde_json::Value::Array(vec![pull]), "open", "number")
            }
            ForgeKind::Gitlab => (
                self.call(
                    get,
                    self.url(&["repository", "commits", sha, "merge_requests"]),
                    None,
                )
                .await?,
                "opened",
                "iid",
            ),
        };
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .filter(|pull| pull["state"] == open_state)
            .filter_map(|pull| pull[number].as_u64())
            .collect())
    }

    /// Creates the comment on pull request `number`, or edits the one that carries the marker.
    async fn put_comment(&self, number: u64, text: &str) -> Result<(), String> {
        let number = number.to_string();
        let comments = match self.settings.kind {
            ForgeKind::Github | ForgeKind::Gitea => vec!["issues", number.as_str(), "comments"],
            ForgeKind::Gitlab => vec!["merge_requests", number.as_str(), "notes"],
        };
        let mut listing = self.url(&comments);
        listing.query_pairs_mut().append_pair("per_page", "100");
        let existing = self.call(reqwest::Method::GET, listing, None).await?;
        let ours = existing
            .as_array()
            .into_iter()
            .flatten()
            .find(|comment| {
                comment["body"]
                    .as_str()
                    .is_some_and(|body| body.starts_with(comment::MARKER))
            })
            .and_then(|comment| comment["id"].as_u64());
        let body = Some(serde_json::json!({ "body": text }));
        match (ours, self.settings.kind) {
            (None, _) => {
                self.call(reqwest::Method::POST, self.url(&comments), body)
                    .await
            }
            (Some(id), ForgeKind::Gitlab) => {
                let id = id.to_string();
                let note = self.url(&["merge_requests", number.as_str(), "notes", id.as_str()]);
                self.call(reqwest::Method::PUT, note, body).await
            }
            (Some(id), _) => {
                let id = id.to_string();
                let edit = self.url(&["issues", "comments", id.as_str()]);
                self.call(reqwest::Method::PATCH, edit, body).await
            }
        }
        .map(drop)
    }

    /// Writes the comment of a previewed commit on each open pull request whose head it is,
    /// from the commit's preview runs as the store has them now.
    async fn send_comment(
        &self,
        store: &Arc<dyn StateStore>,
        entry: &OutboxEntry,
    ) -> Result<(), String> {
        let sha = serde_json::from_str::<serde_json::Value>(&entry.body)
            .ok()
            .and_then(|body| body["sha"].as_str().map(str::to_string))
            .ok_or("an outbox comment that does not parse")?;
        let (reader, commit) = (store.clone(), sha.clone());
        let runs =
            tokio::task::spawn_blocking(move || reader.commit_runs(&commit, RunKind::Preview))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        let pulls = self.pull_requests(&sha).await?;
        if runs.is_empty() || pulls.is_empty() {
            return Ok(());
        }
        let text = comment::render(
            &sha,
            &runs,
            self.settings.public_url.as_str(),
            self.comment_limit(),
        );
        for number in pulls {
            self.put_comment(number, &text).await?;
        }
        Ok(())
    }
}

/// Sends the commit statuses and the pull request comments due in the outbox to `forge`
/// until `shutdown`: one loop for each, so that a slow comment never holds up a status.
pub async fn deliver(
    store: Arc<dyn StateStore>,
    forge: Forge,
    tick: Duration,
    shutdown: CancellationToken,
) {
    let forge = Arc::new(forge);
    let statuses = {
        let forge = forge.clone();
        move |entry: OutboxEntry| {
            let forge = forge.clone();
            async move { forge.send(&entry).await }
        }
    };
    let reader = store.clone();
    let comments = move |entry: OutboxEntry| {
        let (forge, reader) = (forge.clone(), reader.clone());
        async move { forge.send_comment(&reader, &entry).await }
    };
    tokio::join!(
        crate::outbox::deliver(
            store.clone(),
            OutboxKind::Status,
            tick,
            shutdown.clone(),
            statuses
        ),
        crate::outbox::deliver(store, OutboxKind::Comment, tick, shutdown, comments),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forge(kind: ForgeKind, api: &str, repository: &str) -> Forge {
        Forge::new(
            ForgeSettings {
                kind,
                api_url: url::Url::parse(api).unwrap(),
                repository: repository.into(),
                token_file: Some("/etc/karrots/forge-token".into()),
                public_url: url::Url::parse("https://karrots.example.com/").unwrap(),
            },
            None,
        )
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
        // With approvers, the run's message is the command to run: as much of it as the
        // forge takes, the whole of it on the run page the status links.
        let command = format!(
            "approve with: git tag -s -m \"plan: sha256:{}\" karrots/approve/prod/{}/$USER",
            "a".repeat(64),
            "b".repeat(40)
        );
        let (_, state, description) = ended(
            RunKind::Plan,
            RunResult::Changes,
            &two,
            &command,
            Some(EnvStatus::AwaitingApproval),
        )
        .unwrap();
        assert_eq!(state, Pending);
        assert_eq!(description.chars().count(), DESCRIPTION_LIMIT);
        assert!(description.starts_with("approve with: git tag -s -m \"plan: sha256:aaaa"));
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
