//! The daemon configuration (`karrots serve --config FILE`) as a validated type.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::environment::AlertSink;
use super::raw::RawDaemon;
use super::raw::{RawForge, RawGitAccess, RawGithubApp};
use super::remote::{
    DEFAULT_GIT_USERNAME, ForgeKind, ForgeSettings, GitAccess, GithubApp, RepoAddress, Scheme,
};
use super::types::{
    BranchName, ProviderPattern, default_provider_patterns, parse_duration, parse_webhook_url,
};
use super::{Validator, yaml};
use crate::problem::{Problem, Problems};

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// The config repository to mirror: `https://`, `ssh://` (or `git@host:path`), `git://`,
    /// `http://`, `file://`.
    pub repo: RepoAddress,
    /// The files the daemon reaches `repo` with.
    pub git: GitAccess,
    /// Where run results are posted; `None`: nowhere.
    pub forge: Option<ForgeSettings>,
    /// A GitHub App whose installation tokens serve the fetch (https) and the forge.
    pub github_app: Option<GithubApp>,
    pub poll_interval: Duration,
    /// Everything the daemon knows lives here.
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// The webhook secret is read from this file at start; it is never in the configuration.
    pub webhook_secret_file: Option<PathBuf>,
    /// The bearer token the API requires; needed when `listen` is not a loopback address.
    pub api_token_file: Option<PathBuf>,
    /// `/metrics` answers without the API token (for a scraper on the network); the rest of
    /// the API still needs it.
    pub metrics_public: bool,
    /// Terraform processes at once, across environments.
    pub concurrency: NonZeroUsize,
    /// Plan (never apply) commits of other branches that touch an environment.
    pub preview: bool,
    /// Whether a preview's terraform can reach only AWS (`isolated`) or any host (`open`).
    pub preview_network: PreviewNetwork,
    /// The largest file a run exports from a commit; a larger one refuses the commit.
    pub max_file_bytes: u64,
    /// Where environment identities are read from.
    pub trust_branch: BranchName,
    pub terraform: TerraformSettings,
    /// Whether terraform processes run in the Landlock sandbox.
    pub sandbox: SandboxMode,
    /// An AWS emulator for tests and demos; `None` for real AWS.
    pub aws_endpoint_url: Option<url::Url>,
    /// Where CloudTrail `LookupEvents` goes, when not where `aws_endpoint_url` says (an
    /// emulator without CloudTrail, or a test double of it).
    pub cloudtrail_endpoint_url: Option<url::Url>,
    pub alerts: Vec<AlertSink>,
    /// Where the state lives: SQLite under `state_dir`, or PostgreSQL shared by several
    /// daemons.
    pub store: StoreSettings,
}

/// `store:` (with `store_password_file`, `store_ca_file` and `lease`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreSettings {
    /// `state_dir/karrots.db`: one daemon.
    #[default]
    Sqlite,
    /// One PostgreSQL database, shared by every daemon that names it.
    Postgres {
        /// `postgres://user@host:port/db?sslmode=…`, without a password.
        url: String,
        /// The password, read at each connection; without it `PGPASSWORD`, if set.
        password_file: Option<PathBuf>,
        /// A CA (PEM) trusted besides the system's for the server's certificate, read at
        /// each connection.
        ca_file: Option<PathBuf>,
        /// How long an environment's lease lasts without renewal.
        lease: Duration,
    },
}

impl StoreSettings {
    pub fn shared(&self) -> bool {
        matches!(self, StoreSettings::Postgres { .. })
    }

    /// How long a lease lasts (the default when the store is not shared).
    pub fn lease(&self) -> Duration {
        match self {
            StoreSettings::Postgres { lease, .. } => *lease,
            StoreSettings::Sqlite => LEASE,
        }
    }
}

/// The default `lease`.
const LEASE: Duration = Duration::from_secs(30);

/// `store`, `store_password_file`, `store_ca_file` and `lease`: a `postgres://` or
/// `postgresql://` URL without a password (it would be in the configuration, a log line, a
/// process listing).
fn store_settings(
    v: &mut Validator,
    store: Option<&String>,
    (password_file, ca_file): (Option<&String>, Option<&String>),
    lease: Option<&String>,
    base: &Path,
) -> Option<StoreSettings> {
    let given_lease = lease.is_some();
    let lease = match lease {
        Some(text) => v.check(
            "lease",
            parse_duration(text).and_then(|lease| {
                if lease < Duration::from_secs(3) {
                    Err("must be at least 3s: the leases are renewed three times per lease".into())
                } else {
                    Ok(lease)
                }
            }),
        )?,
        None => LEASE,
    };
    let Some(text) = store else {
        let stray = if given_lease {
            Some("lease")
        } else {
            password_file
                .map(|_| "store_password_file")
                .or(ca_file.map(|_| "store_ca_file"))
        };
        if let Some(key) = stray {
            v.report(
                key,
                "is for a postgres:// store; without store: the state is SQLite under state_dir",
            );
        }
        return Some(StoreSettings::Sqlite);
    };
    let checked = url::Url::parse(text)
        .map_err(|e| format!("{text:?} is not a URL ({e})"))
        .and_then(|url| {
            if !matches!(url.scheme(), "postgres" | "postgresql") {
                return Err(format!(
                    "{text:?}: a shared store is postgres://user@host:5432/db (SQLite under state_dir needs no store:)"
                ));
            }
            if url.password().is_some() {
                return Err("the URL carries a password: put it in store_password_file (or PGPASSWORD), never in the configuration".into());
            }
            if url.host_str().is_none_or(str::is_empty) {
                return Err(format!("{text:?} names no host"));
            }
            Ok(())
        });
    v.check("store", checked)?;
    Some(StoreSettings::Postgres {
        url: text.to_string(),
        password_file: password_file.map(|file| base.join(file)),
        ca_file: ca_file.map(|file| base.join(file)),
        lease,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerraformSettings {
    /// `terraform` or `tofu`, looked up on PATH unless it contains a `/`.
    pub binary: PathBuf,
    /// A terraform process older than this is interrupted, then killed.
    pub timeout: Duration,
    /// A provider filesystem mirror; without one providers come from their registries.
    pub plugin_mirror: Option<PathBuf>,
    /// The provider sources a commit may require; any other is refused before init.
    pub providers: Vec<ProviderPattern>,
}

impl Default for TerraformSettings {
    fn default() -> TerraformSettings {
        TerraformSettings {
            binary: PathBuf::from("terraform"),
            timeout: Duration::from_secs(30 * 60),
            plugin_mirror: None,
            providers: default_provider_patterns(),
        }
    }
}

/// Whether terraform processes are sandboxed (daemon config `sandbox:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// Linux Landlock: each process reads only its checkout, binary, providers and system
    /// files, and writes only its own data, plan, state and temp directories.
    #[default]
    Landlock,
    /// No sandbox: for kernels without Landlock only; every run logs a warning.
    Off,
}

impl SandboxMode {
    pub fn parse(text: &str) -> Result<SandboxMode, String> {
        match text {
            "landlock" => Ok(SandboxMode::Landlock),
            "off" => Ok(SandboxMode::Off),
            other => Err(format!("{other:?} is not a sandbox: use landlock or off")),
        }
    }
}

/// What a preview's terraform process may reach over the network (`preview_network:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreviewNetwork {
    /// A private network namespace whose only way out is a proxy to the AWS endpoints (and
    /// `aws.endpoint_url`): provider code of an unmerged commit cannot send data elsewhere.
    #[default]
    Isolated,
    /// The host's network: for machines that forbid user namespaces, where previews would
    /// otherwise be refused. Provider code of any branch can then reach any host.
    Open,
}

impl PreviewNetwork {
    pub fn parse(text: &str) -> Result<PreviewNetwork, String> {
        match text {
            "isolated" => Ok(PreviewNetwork::Isolated),
            "open" => Ok(PreviewNetwork::Open),
            other => Err(format!(
                "{other:?} is not a preview network: use isolated or open"
            )),
        }
    }
}

/// Reads and validates the daemon configuration file. Relative paths in it are taken relative
/// to the file's own directory, so the daemon does not depend on where it was started.
pub fn load_daemon_config(file: &Path) -> Result<DaemonConfig, Problems> {
    let text = crate::limits::read_text(file).map_err(|error| {
        Problems::one(Problem::whole(
            file,
            format!("cannot read the file: {error}"),
        ))
    })?;
    let base = file.parent().unwrap_or(Path::new("."));
    parse_daemon_config(&text, file, base)
}

/// Validates daemon configuration text; `base` resolves relative paths.
pub fn parse_daemon_config(text: &str, file: &Path, base: &Path) -> Result<DaemonConfig, Problems> {
    let (raw, lines) = yaml::parse::<RawDaemon>(text)
        .map_err(|error| Problems::one(Problem::new(file, error.line, error.message)))?;
    let mut v = Validator::new(file.to_path_buf(), lines);

    let repo = v.check("repo", RepoAddress::parse(&raw.repo, base));
    let poll_interval = match raw.poll_interval {
        Some(text) => v.check("poll_interval", parse_duration(&text)),
        None => Some(Duration::from_secs(30)),
    };
    let resolve = |text: &str| base.join(text);
    let git = repo
        .as_ref()
        .map(|repo| git_access(&mut v, &raw.git, repo, base));
    if raw.state_dir.is_empty() {
        v.report("state_dir", "must not be empty");
    }
    let state_dir = resolve(&raw.state_dir);
    let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:8088".to_string());
    let listen = v.check(
        "listen",
        listen_text
            .parse::<SocketAddr>()
            .map_err(|_| format!("{listen_text:?} is not an address such as 127.0.0.1:8088")),
    );
    let concurrency = v.check(
        "concurrency",
        raw.concurrency
            .map_or(Ok(2), |n| usize::try_from(n).map_err(|_| n.to_string()))
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| "must be a whole number of at least 1".to_string()),
    );
    let trust_branch = v.check(
        "trust_branch",
        BranchName::parse(raw.trust_branch.as_deref().unwrap_or("main")),
    );
    let timeout = match raw.terraform.timeout {
        Some(text) => v.check("terraform.timeout", parse_duration(&text)),
        None => Some(TerraformSettings::default().timeout),
    };
    let aws_endpoint_url = match raw.aws.endpoint_url {
        Some(text) => v
            .check("aws.endpoint_url", parse_webhook_url(&text))
            .map(Some),
        None => Some(None),
    };
    let cloudtrail_endpoint_url = match raw.aws.cloudtrail_endpoint_url {
        Some(text) => v
            .check("aws.cloudtrail_endpoint_url", parse_webhook_url(&text))
            .map(Some),
        None => Some(None),
    };
    let alerts = v.alerts(&raw.alerts);
    let store = store_settings(
        &mut v,
        raw.store.as_ref(),
        (raw.store_password_file.as_ref(), raw.store_ca_file.as_ref()),
        raw.lease.as_ref(),
        base,
    );
    let github_app = match &raw.github_app {
        Some(app) => github_app(&mut v, app, base).map(Some),
        None => Some(None),
    };
    let app = raw.github_app.is_some();
    let forge = match &raw.forge {
        Some(forge) => forge_settings(&mut v, forge, base, app).map(Some),
        None => Some(None),
    };
    if app && raw.git.token_file.is_some() {
        v.report(
            "git.token_file",
            "and github_app both give the fetch its credentials: keep one",
        );
    }
    let sandbox = v.check(
        "sandbox",
        SandboxMode::parse(raw.sandbox.as_deref().unwrap_or("landlock")),
    );
    let preview_network = v.check(
        "preview_network",
        PreviewNetwork::parse(raw.preview_network.as_deref().unwrap_or("isolated")),
    );
    let max_file_bytes = match &raw.max_file_size {
        None => Some(crate::repo::DEFAULT_MAX_FILE_BYTES),
        Some(text) => v.check("max_file_size", parse_size(text)),
    };
    let providers = match raw.terraform.providers {
        None => Some(default_provider_patterns()),
        Some(texts) => texts
            .iter()
            .enumerate()
            .map(|(index, text)| {
                v.check(
                    &format!("terraform.providers[{index}]"),
                    ProviderPattern::parse(text),
                )
            })
            .collect::<Vec<_>>()
            .into_iter()
            .collect(),
    };

    if let Some(problems) = Problems::from_vec(v.problems) {
        return Err(problems);
    }
    let (Some(repo), Some(git), Some(poll_interval), Some(listen), Some(concurrency)) =
        (repo, git, poll_interval, listen, concurrency)
    else {
        unreachable!("a missing value without a reported problem")
    };
    let (Some(trust_branch), Some(timeout), Some(aws_endpoint_url), Some(sandbox), Some(providers)) =
        (trust_branch, timeout, aws_endpoint_url, sandbox, providers)
    else {
        unreachable!("a missing value without a reported problem")
    };
    let (
        Some(cloudtrail_endpoint_url),
        Some(preview_network),
        Some(max_file_bytes),
        Some(forge),
        Some(github_app),
        Some(store),
    ) = (
        cloudtrail_endpoint_url,
        preview_network,
        max_file_bytes,
        forge,
        github_app,
        store,
    )
    else {
        unreachable!("a missing value without a reported problem")
    };
    Ok(DaemonConfig {
        repo,
        git,
        forge,
        github_app,
        poll_interval,
        state_dir,
        listen,
        webhook_secret_file: raw.webhook_secret_file.as_deref().map(resolve),
        api_token_file: raw.api_token_file.as_deref().map(resolve),
        metrics_public: raw.metrics_public.unwrap_or(false),
        concurrency,
        preview: raw.preview.unwrap_or(true),
        preview_network,
        max_file_bytes,
        trust_branch,
        terraform: TerraformSettings {
            binary: PathBuf::from(raw.terraform.binary.as_deref().unwrap_or("terraform")),
            timeout,
            plugin_mirror: raw.terraform.plugin_mirror.as_deref().map(resolve),
            providers,
        },
        sandbox,
        aws_endpoint_url,
        cloudtrail_endpoint_url,
        alerts,
        store,
    })
}

/// A size such as `64MiB` or `1 GB`, at least one byte.
fn parse_size(text: &str) -> Result<u64, String> {
    match text.trim().parse::<bytesize::ByteSize>() {
        Ok(size) if size.as_u64() > 0 => Ok(size.as_u64()),
        _ => Err(format!("{text:?} is not a size such as 64MiB")),
    }
}

/// `forge:`: a known kind, its API's address (GitHub's by default), the repository, the
/// token's file and where the run pages are reached.
fn forge_settings(
    v: &mut Validator,
    raw: &RawForge,
    base: &Path,
    app: bool,
) -> Option<ForgeSettings> {
    let kind = v.check(
        "forge.kind",
        raw.kind
            .parse::<ForgeKind>()
            .map_err(|_| format!("{:?} is not a forge: use github, gitlab or gitea", raw.kind)),
    );
    let api_url = match (
        raw.api_url.as_deref(),
        kind.and_then(ForgeKind::default_api_url),
    ) {
        (Some(text), _) | (None, Some(text)) => v.check("forge.api_url", parse_webhook_url(text)),
        (None, None) if kind.is_some() => {
            v.report(
                "forge.api_url",
                "is required for this forge: https://HOST/api/v4 (GitLab) or https://HOST/api/v1 (Gitea, Forgejo)",
            );
            None
        }
        (None, None) => None,
    };
    let repository = raw.repository.trim_matches('/');
    let parts: Vec<&str> = repository.split('/').collect();
    let repository = v.check(
        "forge.repository",
        if parts.len() >= 2
            && parts
                .iter()
                .all(|part| !part.is_empty() && !part.contains(['?', '#', ' ']))
        {
            Ok(repository.to_string())
        } else {
            Err(format!(
                "{:?} is not a repository such as acme/infra",
                raw.repository
            ))
        },
    );
    let api_url = api_url.and_then(|url| {
        let loopback = url.host_str().is_some_and(super::is_loopback_host);
        if url.scheme() == "http" && !loopback {
            v.report(
                "forge.api_url",
                format!("would get the token in the clear: use https://, or plain http:// only to this machine ({url})"),
            );
            return None;
        }
        Some(url)
    });
    let public_url = v.check("forge.public_url", parse_webhook_url(&raw.public_url));
    let token_file = raw.token_file.as_deref().map(|file| base.join(file));
    if token_file.is_none() && !(app && kind == Some(ForgeKind::Github)) {
        v.report(
            "forge.token_file",
            "is required: the forge's API token (or, for GitHub, a github_app)",
        );
    }
    Some(ForgeSettings {
        kind: kind?,
        api_url: api_url?,
        repository: repository?,
        token_file,
        public_url: public_url?,
    })
}

/// `github_app:`: its ids, its key's file, and the API it mints tokens at.
fn github_app(v: &mut Validator, raw: &RawGithubApp, base: &Path) -> Option<GithubApp> {
    let text = raw.api_url.as_deref().unwrap_or("https://api.github.com");
    let api_url = v.check("github_app.api_url", parse_webhook_url(text))?;
    let loopback = api_url.host_str().is_some_and(super::is_loopback_host);
    if api_url.scheme() == "http" && !loopback {
        v.report(
            "github_app.api_url",
            format!("would get the App's tokens in the clear: use https:// ({api_url})"),
        );
        return None;
    }
    Some(GithubApp {
        app_id: raw.app_id,
        installation_id: raw.installation_id,
        private_key_file: base.join(&raw.private_key_file),
        api_url,
    })
}

/// `git:`, checked against the address: an ssh remote needs its key and the host keys it
/// trusts; a token never goes over plain `http://` off this machine.
fn git_access(v: &mut Validator, raw: &RawGitAccess, repo: &RepoAddress, base: &Path) -> GitAccess {
    let resolve = |text: &Option<String>| text.as_deref().map(|text| base.join(text));
    let access = GitAccess {
        ssh_key_file: resolve(&raw.ssh_key_file),
        known_hosts_file: resolve(&raw.known_hosts_file),
        token_file: resolve(&raw.token_file),
        username: raw
            .username
            .clone()
            .unwrap_or_else(|| DEFAULT_GIT_USERNAME.to_string()),
        ca_file: resolve(&raw.ca_file),
    };
    if repo.scheme() == Scheme::Ssh {
        if access.known_hosts_file.is_none() {
            v.report(
                "git.known_hosts_file",
                format!("is required for an ssh remote ({repo}): the host keys Karrots trusts, as `ssh-keyscan HOST` prints them once checked; there is no trust on first use"),
            );
        }
        if access.ssh_key_file.is_none() {
            v.report(
                "git.ssh_key_file",
                format!("is required for an ssh remote ({repo}): the deploy key, an OpenSSH private key without a passphrase"),
            );
        }
    }
    if access.token_file.is_some() && repo.scheme() == Scheme::Http && !repo.is_loopback() {
        v.report(
            "git.token_file",
            format!("would be sent in the clear to {repo}: use https://, or plain http:// only to this machine"),
        );
    }
    access
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
repo: file:///srv/git/config.git
poll_interval: 30s
state_dir: /var/lib/karrots
listen: 127.0.0.1:8088
webhook_secret_file: /etc/karrots/webhook-secret
concurrency: 2
preview: true
trust_branch: main
terraform:
  binary: terraform
  timeout: 30m
  plugin_mirror: /opt/tf-plugins
  providers: [hashicorp/*]
sandbox: landlock
aws:
  endpoint_url: http://127.0.0.1:4566
  cloudtrail_endpoint_url: http://127.0.0.1:4567
alerts:
  - webhook: http://127.0.0.1:9000/alerts
";

    fn parse(text: &str) -> Result<DaemonConfig, Vec<String>> {
        parse_daemon_config(text, Path::new("karrots.yaml"), Path::new("/etc/karrots"))
            .map_err(|problems| problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn the_spec_example_is_valid() {
        let config = parse(VALID).unwrap();
        assert_eq!(config.repo.as_str(), "file:///srv/git/config.git");
        assert_eq!(config.terraform.timeout, Duration::from_secs(1800));
        assert_eq!(config.concurrency.get(), 2);
        assert_eq!(config.alerts.len(), 1);
        assert_eq!(
            config.cloudtrail_endpoint_url.map(|u| u.to_string()),
            Some("http://127.0.0.1:4567/".into())
        );
    }

    #[test]
    fn defaults_and_relative_paths() {
        let config = parse("repo: ./config.git\nstate_dir: state\n").unwrap();
        assert_eq!(config.repo.as_str(), "file:///etc/karrots/config.git");
        assert_eq!(config.state_dir, PathBuf::from("/etc/karrots/state"));
        assert_eq!(config.poll_interval, Duration::from_secs(30));
        assert_eq!(config.max_file_bytes, 64 * 1024 * 1024);
        assert_eq!(config.preview_network, PreviewNetwork::Isolated);
        let sized = parse("repo: ./c.git\nstate_dir: s\nmax_file_size: 2MiB\n").unwrap();
        assert_eq!(sized.max_file_bytes, 2 * 1024 * 1024);
        assert_eq!(config.listen.to_string(), "127.0.0.1:8088");
        assert!(config.preview);
        assert_eq!(config.trust_branch.as_str(), "main");
        assert_eq!(config.terraform, TerraformSettings::default());
    }

    #[test]
    fn a_shared_store_reads_its_files_relative_to_the_configuration() {
        let text = format!(
            "{VALID}store: postgres://karrots@db.internal/karrots?sslmode=require\nstore_password_file: db-password\nstore_ca_file: db-ca.pem\nlease: 45s\n"
        );
        assert_eq!(
            parse(&text).unwrap().store,
            StoreSettings::Postgres {
                url: "postgres://karrots@db.internal/karrots?sslmode=require".into(),
                password_file: Some(PathBuf::from("/etc/karrots/db-password")),
                ca_file: Some(PathBuf::from("/etc/karrots/db-ca.pem")),
                lease: Duration::from_secs(45),
            }
        );
    }

    #[test]
    fn git_access_is_read_relative_to_the_file_with_githubs_user_name_by_default() {
        let text = VALID.replacen(
            "repo: file:///srv/git/config.git",
            "repo: http://127.0.0.1:8080/config.git\ngit:\n  token_file: git-token\n  ca_file: /etc/karrots/ca.pem",
            1,
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.repo.scheme(), Scheme::Http);
        assert_eq!(
            config.git,
            GitAccess {
                token_file: Some(PathBuf::from("/etc/karrots/git-token")),
                username: "x-access-token".into(),
                ca_file: Some(PathBuf::from("/etc/karrots/ca.pem")),
                ..GitAccess::default()
            },
            "a token may go over plain http to this machine"
        );
    }

    #[test]
    fn mistakes_are_located() {
        let rows: &[(&str, &str, &str)] = &[
            (
                "concurrency: 2",
                "concurrency: 0",
                "karrots.yaml:6: concurrency: must be a whole number of at least 1",
            ),
            (
                "listen: 127.0.0.1:8088",
                "listen: localhost",
                "karrots.yaml:4: listen: \"localhost\" is not an address such as 127.0.0.1:8088",
            ),
            (
                "timeout: 30m",
                "timeout: forever",
                "karrots.yaml:11: terraform.timeout: \"forever\" is not a duration (such as 30s, 5m, 1h or 1h30m)",
            ),
            (
                "repo: file:///srv/git/config.git",
                "repo: https://bot:hunter2@git.example.invalid/config.git",
                "karrots.yaml:1: repo: the address carries a password; Karrots keeps no secrets in its configuration: name a file with git.token_file",
            ),
            (
                "webhook_secret_file: /etc/karrots/webhook-secret",
                "webhook_secret: hunter2",
                "karrots.yaml:5: webhook_secret: unknown key `webhook_secret`, expected one of `repo`, `poll_interval`, `state_dir`, `listen`, `webhook_secret_file`, `api_token_file`, `metrics_public`, `concurrency`, `preview`, `preview_network`, `max_file_size`, `trust_branch`, `terraform`, `sandbox`, `aws`, `alerts`, `git`, `forge`, `github_app`, `store`, `store_password_file`, `store_ca_file`, `lease`",
            ),
            (
                "preview: true",
                "preview: true\nstore: postgres://karrots:hunter2@db.internal/karrots",
                "karrots.yaml:8: store: the URL carries a password: put it in store_password_file (or PGPASSWORD), never in the configuration",
            ),
            (
                "preview: true",
                "preview: true\nstore: mysql://db.internal/karrots",
                "karrots.yaml:8: store: \"mysql://db.internal/karrots\": a shared store is postgres://user@host:5432/db (SQLite under state_dir needs no store:)",
            ),
            (
                "preview: true",
                "preview: true\nstore: postgres://karrots@db.internal/karrots\nlease: 1s",
                "karrots.yaml:9: lease: must be at least 3s: the leases are renewed three times per lease",
            ),
            (
                "preview: true",
                "preview: true\nlease: 30s",
                "karrots.yaml:8: lease: is for a postgres:// store; without store: the state is SQLite under state_dir",
            ),
            (
                "preview: true",
                "preview: true\nstore_ca_file: /etc/karrots/db-ca.pem",
                "karrots.yaml:8: store_ca_file: is for a postgres:// store; without store: the state is SQLite under state_dir",
            ),
            (
                "providers: [hashicorp/*]",
                "providers: [hashicorp/*, \"*/aws\"]",
                "karrots.yaml:13: terraform.providers[1]: \"*/aws\" is not a provider source such as hashicorp/aws, hashicorp/* or registry.example.com/team/*",
            ),
            (
                "sandbox: landlock",
                "sandbox: none",
                "karrots.yaml:14: sandbox: \"none\" is not a sandbox: use landlock or off",
            ),
            (
                "preview: true",
                "preview: true\nmax_file_size: lots",
                "karrots.yaml:8: max_file_size: \"lots\" is not a size such as 64MiB",
            ),
            (
                "preview: true",
                "preview: true\npreview_network: none",
                "karrots.yaml:8: preview_network: \"none\" is not a preview network: use isolated or open",
            ),
            (
                "repo: file:///srv/git/config.git",
                "repo: git@git.example.com:acme/config.git\ngit:\n  ssh_key_file: /etc/karrots/deploy-key",
                "karrots.yaml:2: git.known_hosts_file: is required for an ssh remote (git@git.example.com:acme/config.git): the host keys Karrots trusts, as `ssh-keyscan HOST` prints them once checked; there is no trust on first use",
            ),
            (
                "repo: file:///srv/git/config.git",
                "repo: http://git.example.com/config.git\ngit:\n  token_file: /etc/karrots/git-token",
                "karrots.yaml:3: git.token_file: would be sent in the clear to http://git.example.com/config.git: use https://, or plain http:// only to this machine",
            ),
            (
                "preview: true",
                "preview: true\nforge:\n  kind: bitbucket\n  repository: acme/infra\n  token_file: t\n  public_url: https://karrots.example.com",
                "karrots.yaml:9: forge.kind: \"bitbucket\" is not a forge: use github, gitlab or gitea",
            ),
            (
                "preview: true",
                "preview: true\nforge:\n  kind: gitlab\n  repository: platform/infra\n  token_file: t\n  public_url: https://karrots.example.com",
                "karrots.yaml:8: forge.api_url: is required for this forge: https://HOST/api/v4 (GitLab) or https://HOST/api/v1 (Gitea, Forgejo)",
            ),
            (
                "preview: true",
                "preview: true\nforge:\n  kind: gitea\n  api_url: http://git.example.com/api/v1\n  repository: acme/infra\n  token_file: t\n  public_url: https://karrots.example.com",
                "karrots.yaml:10: forge.api_url: would get the token in the clear: use https://, or plain http:// only to this machine (http://git.example.com/api/v1)",
            ),
            (
                "preview: true",
                "preview: true\ngit:\n  token_file: t\ngithub_app:\n  app_id: 1\n  installation_id: 2\n  private_key_file: app.pem",
                "karrots.yaml:9: git.token_file: and github_app both give the fetch its credentials: keep one",
            ),
        ];
        for (from, to, expected) in rows {
            assert!(VALID.contains(from), "row does not apply: {from}");
            let text = VALID.replacen(from, to, 1);
            assert_eq!(
                parse(&text).unwrap_err(),
                vec![expected.to_string()],
                "{to}"
            );
        }
    }
}
