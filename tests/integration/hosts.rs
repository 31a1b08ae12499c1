//! The daemon against real git hosts on loopback: OpenSSH serving the config repository to a
//! deploy key, and `git http-backend` over TLS behind basic auth. The credentials work, a
//! wrong one is a `source_error` that says which and fetches nothing, a rotated token is
//! taken without a restart, and no secret reaches the logs, the state or the API.

use std::path::{Path, PathBuf};

use crate::support::daemon::{Fixture, http, no_file_contains};
use crate::support::forge::{App, ForgeStandIn};
use crate::support::hosts::{HttpsServer, SshServer};

/// Where the credential files live, apart from the daemon's state (as /etc/karrots would).
struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new() -> Secrets {
        Secrets {
            dir: tempfile::Builder::new()
                .prefix("karrots-secrets-")
                .tempdir()
                .unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The daemon's configuration lines for `git:`.
fn git_section(lines: &[(&str, &Path)]) -> String {
    let mut text = "git:\n".to_string();
    for (key, path) in lines {
        text.push_str(&format!("  {key}: {}\n", path.display()));
    }
    text
}

fn first_commit(fixture: &Fixture) -> String {
    fixture.clone.git(&["rev-parse", "HEAD"])
}

/// Nothing was fetched: the daemon knows no environment.
fn nothing_fetched(fixture: &Fixture) {
    let environments = fixture.get("/api/v1/environments");
    assert_eq!(environments, serde_json::json!([]), "{}", fixture.logs());
}

/// No file of the state, no log line, no API answer and no page holds `secret`.
fn nowhere(fixture: &Fixture, secret: &str) {
    if let Err(file) = no_file_contains(fixture.state.path(), secret) {
        panic!("the secret is in {file}");
    }
    assert!(
        !fixture.logs().contains(secret),
        "the secret is in the logs"
    );
    for path in ["/api/v1/environments", "/api/v1/runs"] {
        let answer = fixture.get(path).to_string();
        assert!(!answer.contains(secret), "the secret is in {path}");
    }
    let mut pages = vec!["/".to_string()];
    let runs = fixture.get("/api/v1/runs");
    pages.extend(
        runs.as_array()
            .into_iter()
            .flatten()
            .map(|run| format!("/runs/{}", run["id"])),
    );
    for page in pages {
        let (status, html) = http(&fixture.address, "GET", &page, &[], b"");
        assert_eq!(status, 200, "GET {page}");
        assert!(!html.contains(secret), "the secret is on {page}");
    }
}

/// The daemon fetching through `sshd` with its deploy key, trusting `host_key` for it
/// (`host_key`: the server's own; `other_key`: another).
fn over_ssh(sshd: &SshServer, host_key: &str) -> (Fixture, Secrets) {
    let secrets = Secrets::new();
    let known_hosts = secrets.write("known_hosts", &sshd.known_hosts_line(host_key));
    let mut fixture = Fixture::build().unstarted();
    fixture.repo_url = Some(sshd.url(fixture.remote.path()));
    fixture.extra_config = git_section(&[
        ("ssh_key_file", &sshd.deploy_key()),
        ("known_hosts_file", &known_hosts),
    ]);
    fixture.start();
    (fixture, secrets)
}

#[test]
fn an_ssh_remote_is_fetched_with_the_deploy_key_and_applied() {
    let sshd = SshServer::start();
    let (fixture, _secrets) = over_ssh(&sshd, "host_key");
    let first = first_commit(&fixture);
    fixture.wait_for("prod applied over ssh", |f| f.applied("prod", &first));

    let key = std::fs::read_to_string(sshd.deploy_key()).unwrap();
    let body = key.lines().nth(1).expect("the key's first line of base64");
    nowhere(&fixture, body);
    assert!(fixture.sink.kinds("").is_empty(), "no source_error");
}

#[test]
fn a_changed_host_key_is_refused_naming_the_host_and_the_offered_key() {
    let sshd = SshServer::start();
    // The host is listed, with another key: what a host in the middle looks like.
    let (fixture, _secrets) = over_ssh(&sshd, "other_key");
    fixture.wait_for("a source_error", |f| {
        f.sink.find("", "source_error").is_some()
    });
    let alert = fixture.sink.find("", "source_error").unwrap();
    let message = alert["message"].as_str().unwrap();
    let host = format!("127.0.0.1:{}", sshd.port);
    assert!(message.contains(&host), "{message}");
    assert!(
        message.contains(&format!("ssh-ed25519 {}", sshd.host_key_fingerprint())),
        "the offered key's fingerprint: {message}"
    );
    assert!(message.contains("not its key in"), "{message}");
    nothing_fetched(&fixture);

    // Still refused at the next attempts (each later than the one before), and alerted once
    // for the streak.
    let failures = |f: &Fixture| f.logs().matches("fetch failed").count();
    let seen = failures(&fixture);
    fixture.wait_for("two more attempts", |f| failures(f) >= seen + 2);
    assert_eq!(fixture.sink.all("", "source_error").len(), 1);
    nothing_fetched(&fixture);
}

#[test]
fn an_https_remote_with_a_private_ca_and_a_token_is_applied_and_the_token_kept_secret() {
    let token = "glpat-k4rr0ts-https-token";
    let mut fixture = Fixture::build().unstarted();
    let server = HttpsServer::start(fixture.remote.path(), token);
    let secrets = Secrets::new();
    let token_file = secrets.write("git-token", &format!("{token}\n"));
    fixture.repo_url = Some(server.url(fixture.remote.path()));
    fixture.extra_config = format!(
        "{}  username: karrots\n",
        git_section(&[("token_file", &token_file), ("ca_file", &server.ca_file())])
    );
    // git as the daemon runs it, recording each command line and environment it is given.
    let seen = secrets.dir.path().join("git-seen");
    let wrapper = secrets.dir.path().join("bin");
    std::fs::create_dir(&wrapper).unwrap();
    let git = crate::support::tool_path("git").expect("git is installed");
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{seen}'\nenv >> '{seen}'\nexec {git} \"$@\"\n",
        seen = seen.display(),
        git = git.display()
    );
    std::fs::write(wrapper.join("git"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(wrapper.join("git"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", wrapper.display(), std::env::var("PATH").unwrap());
    fixture.env.push(("PATH".into(), path));
    fixture.start();
    let first = first_commit(&fixture);
    fixture.wait_for("prod applied over https", |f| f.applied("prod", &first));
    nowhere(&fixture, token);
    let seen = std::fs::read_to_string(&seen).unwrap();
    assert!(
        seen.contains("ls-remote"),
        "the wrapper saw the daemon's git: {seen}"
    );
    assert!(
        !seen.contains(token),
        "the token is on no command line and in no environment of git"
    );
}

#[test]
fn a_refused_token_is_a_source_error_until_the_rotated_one_is_read_without_a_restart() {
    let mut fixture = Fixture::build().unstarted();
    let server = HttpsServer::start(fixture.remote.path(), "the-right-token");
    let secrets = Secrets::new();
    let token_file = secrets.write("git-token", "an-old-token\n");
    fixture.repo_url = Some(server.url(fixture.remote.path()));
    fixture.extra_config = format!(
        "{}  username: karrots\n",
        git_section(&[("token_file", &token_file), ("ca_file", &server.ca_file())])
    );
    fixture.start();
    fixture.wait_for("a source_error", |f| {
        f.sink.find("", "source_error").is_some()
    });
    let alert = fixture.sink.find("", "source_error").unwrap();
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "refused the credentials (user karrots, the token in {})",
            token_file.display()
        )),
        "{message}"
    );
    assert!(!message.contains("an-old-token"), "{message}");
    nothing_fetched(&fixture);

    std::fs::write(&token_file, "the-right-token\n").unwrap();
    let first = first_commit(&fixture);
    fixture.wait_for("prod applied with the rotated token", |f| {
        f.applied("prod", &first)
    });
    nowhere(&fixture, "the-right-token");
    nowhere(&fixture, "an-old-token");
}

#[test]
fn a_certificate_no_trusted_ca_signed_is_a_tls_source_error() {
    let mut fixture = Fixture::build().unstarted();
    let server = HttpsServer::start(fixture.remote.path(), "a-token");
    let secrets = Secrets::new();
    let token_file = secrets.write("git-token", "a-token\n");
    fixture.repo_url = Some(server.url(fixture.remote.path()));
    fixture.extra_config = git_section(&[("token_file", &token_file)]);
    fixture.start();
    fixture.wait_for("a source_error", |f| {
        f.sink.find("", "source_error").is_some()
    });
    let alert = fixture.sink.find("", "source_error").unwrap();
    let message = alert["message"].as_str().unwrap();
    let expected = format!(
        "TLS: the certificate of 127.0.0.1:{} is not signed by the system's CAs (add one with git.ca_file)",
        server.port
    );
    assert!(message.contains(&expected), "{message}");
    nothing_fetched(&fixture);
}

/// A GitHub App's key as GitHub hands it out (PKCS#1 PEM) under `dir`, and its public half.
fn app_key(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let key = dir.join(name);
    let made = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let public = std::process::Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&key)
        .output()
        .unwrap()
        .stdout;
    (key, public)
}

/// The daemon fetching over https and posting statuses with a GitHub App's installation
/// tokens, minted by `forge` (each living `lifetime`).
fn with_app(
    forge: &ForgeStandIn,
    public_key: Vec<u8>,
    key: &Path,
    lifetime: u64,
) -> (Fixture, HttpsServer) {
    let token = "ghs_installation-token-51f3";
    forge.issue_app_tokens(App {
        public_key,
        app_id: 123456,
        token: token.into(),
        lifetime: std::time::Duration::from_secs(lifetime),
        minted: 0,
    });
    let mut fixture = Fixture::build().unstarted();
    let server = HttpsServer::start_for(fixture.remote.path(), "x-access-token", token);
    fixture.repo_url = Some(server.url(fixture.remote.path()));
    fixture.extra_config = format!(
        "git:\n  ca_file: {ca}\ngithub_app:\n  app_id: 123456\n  installation_id: 42\n  private_key_file: {key}\n  api_url: {api}\nforge:\n  kind: github\n  api_url: {api}\n  repository: acme/infra\n  public_url: https://karrots.example.com\n",
        ca = server.ca_file().display(),
        key = key.display(),
        api = forge.url,
    );
    (fixture, server)
}

#[test]
fn a_github_app_token_serves_the_fetch_and_the_statuses_and_is_minted_again_before_it_expires() {
    let secrets = Secrets::new();
    let (key, public) = app_key(secrets.dir.path(), "app.pem");
    let forge = ForgeStandIn::start(false);
    // A token that lives 5 minutes and 8 seconds is minted again 8 seconds after it was.
    let (mut fixture, _server) = with_app(&forge, public, &key, 308);
    fixture.start();
    let first = first_commit(&fixture);
    fixture.wait_for("prod applied with the App's token", |f| {
        f.applied("prod", &first)
    });
    fixture.wait_for("prod's status", |_| {
        forge
            .taken(&first, "karrots/prod")
            .last()
            .is_some_and(|(state, _)| state == "success")
    });
    let status = forge
        .received()
        .into_iter()
        .find(|request| request.path.contains("/statuses/"))
        .unwrap();
    assert_eq!(
        status.headers["authorization"],
        "Bearer ghs_installation-token-51f3"
    );
    let minted_first = forge.minted();
    fixture.wait_for("a token minted again before it expires", |_| {
        forge.minted() > minted_first
    });
    let polls = fixture.polls();
    assert!(
        forge.minted() < polls,
        "a token serves the polls of its life: {} minted for {polls} polls",
        forge.minted()
    );
    nowhere(&fixture, "ghs_installation-token-51f3");
    let pem = std::fs::read_to_string(&key).unwrap();
    nowhere(&fixture, pem.lines().nth(1).unwrap());
}

#[test]
fn a_github_app_whose_key_github_does_not_know_is_a_source_error_naming_the_app() {
    let secrets = Secrets::new();
    let (_, public) = app_key(secrets.dir.path(), "registered.pem");
    let (other, _) = app_key(secrets.dir.path(), "other.pem");
    let forge = ForgeStandIn::start(false);
    let (mut fixture, _server) = with_app(&forge, public, &other, 3600);
    fixture.start();
    fixture.wait_for("a source_error", |f| {
        f.sink.find("", "source_error").is_some()
    });
    let alert = fixture.sink.find("", "source_error").unwrap();
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.contains("GitHub App 123456 (installation 42): POST ")
            && message.contains("answered 401 Unauthorized: A JSON web token could not be decoded"),
        "{message}"
    );
    nothing_fetched(&fixture);
}
