//! The daemon against real git hosts on loopback: OpenSSH serving the config repository to a
//! deploy key, and `git http-backend` over TLS behind basic auth. The credentials work, a
//! wrong one is a `source_error` that says which and fetches nothing, a rotated token is
//! taken without a restart, and no secret reaches the logs, the state or the API.

use std::path::{Path, PathBuf};

use crate::support::daemon::{Fixture, no_file_contains};
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

/// No file of the state, no log line and no API answer holds `secret`.
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
}

#[test]
fn an_ssh_remote_is_fetched_with_the_deploy_key_and_applied() {
    let sshd = SshServer::start();
    let secrets = Secrets::new();
    let known_hosts = secrets.write("known_hosts", &sshd.known_hosts_line("host_key"));
    let mut fixture = Fixture::build().unstarted();
    fixture.repo_url = Some(sshd.url(fixture.remote.path()));
    fixture.extra_config = git_section(&[
        ("ssh_key_file", &sshd.deploy_key()),
        ("known_hosts_file", &known_hosts),
    ]);
    fixture.start();
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
    let secrets = Secrets::new();
    // The host is listed, with another key: what a host in the middle looks like.
    let known_hosts = secrets.write("known_hosts", &sshd.known_hosts_line("other_key"));
    let mut fixture = Fixture::build().unstarted();
    fixture.repo_url = Some(sshd.url(fixture.remote.path()));
    fixture.extra_config = git_section(&[
        ("ssh_key_file", &sshd.deploy_key()),
        ("known_hosts_file", &known_hosts),
    ]);
    fixture.start();
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
    let git = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{seen}'\nenv >> '{seen}'\nexec {git} \"$@\"\n",
        seen = seen.display(),
        git = git.trim()
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
