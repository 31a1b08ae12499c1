//! How the daemon reaches its config repository: the `git` CLI, with OpenSSH for `ssh`
//! remotes and git's own HTTP stack (libcurl, the system's CAs) for `https`, given only the
//! files named under `git:`. No secret is ever on a command line, in the environment of a
//! child, or on disk outside its own file: the deploy key and the known hosts are paths
//! handed to `ssh`, and the token is read from its file by `karrots git-credential` (this
//! program) each time git asks for it, answered only for the repository's own host.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{GitAccess, RepoAddress, Scheme, is_loopback_host};

/// A git command longer than this is stopped and reported as failed.
const GIT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// What git may print on stderr that is kept (the rest is read and dropped).
const STDERR_KEPT: u64 = 64 * 1024;

/// Where the system keeps its CAs, as libcurl and OpenSSL look for them.
const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The environment of `karrots git-credential`: which file, user and host it answers with.
const TOKEN_FILE_VARIABLE: &str = "KARROTS_GIT_TOKEN_FILE";
const USERNAME_VARIABLE: &str = "KARROTS_GIT_USERNAME";
const HOST_VARIABLE: &str = "KARROTS_GIT_HOST";
/// Or the daemon's credential socket, which holds a GitHub App's token.
pub const SOCKET_VARIABLE: &str = "KARROTS_GIT_CREDENTIAL_SOCKET";

/// How `karrots git-credential` says on stderr why it had nothing to give: git passes the
/// line on, and [`Transport::explain`] takes it as the cause.
pub const HELPER_ERROR: &str = "karrots git-credential: ";

/// The repository's address and how to reach it.
#[derive(Debug, Clone)]
pub struct Transport {
    address: RepoAddress,
    access: GitAccess,
    /// The system's CAs and `git.ca_file` in one file (git takes one), when there is a CA file.
    ca_bundle: Option<PathBuf>,
    /// This program, which answers git's requests for the token.
    helper: Option<PathBuf>,
    /// The daemon's credential socket, when a GitHub App's installation token is the
    /// credential (it lives in the daemon's memory, not in a file).
    credential_socket: Option<PathBuf>,
    /// Where OpenSSH keeps the sockets of its shared connections (`ControlPath`), when the
    /// path is short enough for a socket.
    ssh_sockets: Option<PathBuf>,
}

/// How long an ssh connection stays open for the next poll once the last one ended.
const SSH_CONNECTION_KEPT: Duration = Duration::from_secs(120);

/// The longest socket path Linux takes (`sun_path`), with room for OpenSSH's temporary name.
const SOCKET_PATH_LIMIT: usize = 100;

/// Why the transport cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("{key} {path}: {message}")]
pub struct AccessError {
    key: &'static str,
    path: PathBuf,
    message: String,
}

impl Transport {
    /// Checks that the files of `access` can be read, and writes the CA bundle (public
    /// certificates only) under `state_dir` when there is a `ca_file`.
    pub fn new(
        address: &RepoAddress,
        access: &GitAccess,
        state_dir: &Path,
        credential_socket: Option<PathBuf>,
    ) -> Result<Transport, AccessError> {
        let readable = |key: &'static str, path: &Option<PathBuf>| match path {
            Some(path) => std::fs::File::open(path)
                .map(drop)
                .map_err(|e| AccessError {
                    key,
                    path: path.clone(),
                    message: format!("cannot be read: {e}"),
                }),
            None => Ok(()),
        };
        readable("git.ssh_key_file", &access.ssh_key_file)?;
        readable("git.known_hosts_file", &access.known_hosts_file)?;
        readable("git.token_file", &access.token_file)?;
        let ca_bundle = match &access.ca_file {
            Some(ca_file) => Some(write_ca_bundle(
                ca_file,
                &state_dir.join("git-ca-bundle.pem"),
            )?),
            None => None,
        };
        let helper = match access.token_file.as_ref().or(credential_socket.as_ref()) {
            Some(source) => Some(std::env::current_exe().map_err(|e| AccessError {
                key: "git.token_file",
                path: source.clone(),
                message: format!("the karrots program that hands it to git cannot be found: {e}"),
            })?),
            None => None,
        };
        Ok(Transport {
            address: address.clone(),
            access: access.clone(),
            ca_bundle,
            helper,
            credential_socket,
            ssh_sockets: ssh_sockets(address, state_dir),
        })
    }

    /// A transport for `address` with nothing but what its scheme needs by default.
    pub fn plain(address: &RepoAddress) -> Transport {
        Transport {
            address: address.clone(),
            access: GitAccess::default(),
            ca_bundle: None,
            helper: None,
            credential_socket: None,
            ssh_sockets: None,
        }
    }

    /// The daemon's credential socket git is told to ask, when there is one.
    pub fn credential_socket(&self) -> Option<&Path> {
        self.credential_socket.as_deref()
    }

    pub fn address(&self) -> &RepoAddress {
        &self.address
    }

    /// `git --git-dir <git_dir>` with nothing of the daemon's environment but `PATH`, no
    /// system or user configuration, no prompt, only the remote's protocol allowed, no
    /// redirect followed, and the credentials of `git:`.
    pub fn command(&self, git_dir: &Path) -> Command {
        let mut command = Command::new("git");
        command
            .arg("--git-dir")
            .arg(git_dir)
            .args([
                "-c",
                "http.followRedirects=false",
                "-c",
                "credential.helper=",
            ])
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", protocol(self.address.scheme()))
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if self.address.scheme() == Scheme::Ssh {
            command
                .env("GIT_SSH_COMMAND", self.ssh_command())
                .env("GIT_SSH_VARIANT", "ssh");
        }
        if let Some(helper) = &self.helper {
            let helper = format!("!{} git-credential", shell_quote(&helper.to_string_lossy()));
            command.args(["-c", &format!("credential.helper={helper}")]);
            if let Some(socket) = &self.credential_socket {
                command.env(SOCKET_VARIABLE, socket);
            } else if let Some(token_file) = &self.access.token_file {
                command
                    .env(TOKEN_FILE_VARIABLE, token_file)
                    .env(USERNAME_VARIABLE, &self.access.username)
                    .env(HOST_VARIABLE, self.address.host().unwrap_or_default());
            }
        }
        if let Some(bundle) = &self.ca_bundle {
            command
                .arg("-c")
                .arg(format!("http.sslCAInfo={}", bundle.display()));
        }
        command
    }

    /// OpenSSH with exactly the deploy key and the known hosts of `git:`: no agent, no user
    /// configuration, no prompt, no host key learned. `DEBUG1` so that a refused host's key
    /// can be named ([`Transport::explain`]); the rest of it is dropped.
    fn ssh_command(&self) -> String {
        let mut words = vec![
            "ssh".to_string(),
            "-F /dev/null".into(),
            "-o BatchMode=yes".into(),
            "-o IdentitiesOnly=yes".into(),
            "-o IdentityAgent=none".into(),
            "-o GlobalKnownHostsFile=/dev/null".into(),
            "-o StrictHostKeyChecking=yes".into(),
            "-o UpdateHostKeys=no".into(),
            "-o ConnectTimeout=30".into(),
            "-o LogLevel=DEBUG1".into(),
        ];
        if let Some(key) = &self.access.ssh_key_file {
            words.push(format!("-i {}", shell_quote(&key.to_string_lossy())));
        }
        let known = self
            .access
            .known_hosts_file
            .as_deref()
            .map_or("/dev/null".into(), |path| path.to_string_lossy());
        words.push(shell_quote(&format!("-oUserKnownHostsFile=\"{known}\"")));
        if let Some(sockets) = &self.ssh_sockets {
            // One connection serves the polls that follow each other: a poll that finds
            // nothing costs a channel, not a key exchange and an authentication.
            let path = sockets.join("%C").to_string_lossy().into_owned();
            words.push("-o ControlMaster=auto".into());
            words.push(format!(
                "-o ControlPersist={}",
                SSH_CONNECTION_KEPT.as_secs()
            ));
            words.push(shell_quote(&format!("-oControlPath=\"{path}\"")));
        }
        words.join(" ")
    }

    /// What went wrong, from git's (and ssh's) stderr: the cause in Karrots' words, then
    /// git's own lines. Never a secret: git and ssh print none, and the token is no argument.
    pub fn explain(&self, stderr: &str) -> String {
        let said: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with("debug1:"))
            .filter(|line| {
                !line.starts_with("Please make sure") && *line != "and the repository exists."
            })
            .collect();
        match self.cause(stderr) {
            // The cause says it; git's last word is enough to recognise it by.
            Some(cause) => match said.last() {
                Some(last) => format!("{cause} (git: {last})"),
                None => cause,
            },
            None => crate::limits::tail(&said.join("; "), 600),
        }
    }

    fn cause(&self, stderr: &str) -> Option<String> {
        if let Some(said) = stderr
            .lines()
            .find_map(|line| line.strip_prefix(HELPER_ERROR))
        {
            return Some(said.to_string());
        }
        let host = self.address.host().unwrap_or("the host");
        let named = |path: &Option<PathBuf>| {
            path.as_deref()
                .map_or("none".to_string(), |path| path.display().to_string())
        };
        if stderr.contains("Host key verification failed") {
            let offered = stderr
                .lines()
                .find_map(|line| line.strip_prefix("debug1: Server host key: "))
                .unwrap_or("a key");
            let known = named(&self.access.known_hosts_file);
            return Some(if stderr.contains("HOST IDENTIFICATION HAS CHANGED") {
                format!(
                    "the SSH host {host} offered {offered}, which is not its key in {known}: the host's key changed, or another host answers in its place; nothing was fetched"
                )
            } else {
                format!(
                    "the SSH host {host} offered {offered}, which {known} does not list; add the host's key there once it is checked (there is no trust on first use); nothing was fetched"
                )
            });
        }
        if stderr.contains("Permission denied (publickey") {
            let key = named(&self.access.ssh_key_file);
            return Some(format!("the SSH host {host} refused the deploy key {key}"));
        }
        if stderr.contains("Authentication failed for") || stderr.contains("returned error: 403") {
            let token = named(&self.access.token_file);
            let user = &self.access.username;
            return Some(format!(
                "{host} refused the credentials (user {user}, the token in {token})"
            ));
        }
        if stderr.contains("could not read Username") || stderr.contains("could not read Password")
        {
            return Some(match &self.access.token_file {
                None => format!("{host} asks for credentials, and git.token_file names none"),
                Some(_) => format!(
                    "{host} asks for credentials Karrots gives only to {host} over https (or plain http on this machine)"
                ),
            });
        }
        let tls = [
            "server certificate verification failed",
            "SSL certificate problem",
            "certificate verify failed",
        ];
        if tls.iter().any(|words| stderr.contains(words)) {
            let trusted = match &self.access.ca_file {
                Some(ca) => format!("the system's CAs and {}", ca.display()),
                None => "the system's CAs (add one with git.ca_file)".to_string(),
            };
            return Some(format!(
                "TLS: the certificate of {host} is not signed by {trusted}"
            ));
        }
        None
    }

    /// Runs `command` to its end (stopped after [`GIT_TIMEOUT`]); its stdout, or why it
    /// failed in [`Transport::explain`]'s words.
    pub fn run(&self, mut command: Command, what: &str) -> Result<String, String> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run git (is it installed?): {e}"))?;
        let stdout = child.stdout.take().map(|pipe| drain(pipe, u64::MAX));
        let stderr = child.stderr.take().map(|pipe| drain(pipe, STDERR_KEPT));
        let deadline = Instant::now() + GIT_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{what} ran longer than {GIT_TIMEOUT:?} and was stopped"
                    ));
                }
                Err(e) => return Err(format!("waiting for {what}: {e}")),
            }
        };
        let joined = |reader: Option<std::thread::JoinHandle<String>>| {
            reader
                .and_then(|reader| reader.join().ok())
                .unwrap_or_default()
        };
        let (stdout, stderr) = (joined(stdout), joined(stderr));
        if status.success() {
            return Ok(stdout);
        }
        let explained = self.explain(&stderr);
        Err(if explained.is_empty() {
            format!("{what} failed ({status})")
        } else {
            explained
        })
    }
}

/// Reads `pipe` to its end on a thread (a child blocked on a full pipe never ends), keeping
/// the first `kept` bytes.
fn drain(pipe: impl Read + Send + 'static, kept: u64) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut pipe = pipe;
        let mut bytes = Vec::new();
        let _ = pipe.by_ref().take(kept).read_to_end(&mut bytes);
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The one protocol git may use for the remote (`GIT_ALLOW_PROTOCOL`): never `ext::`, never
/// another scheme by way of a submodule or an alternate.
fn protocol(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::File => "file",
        Scheme::Git => "git",
        Scheme::Http => "http",
        Scheme::Https => "https",
        Scheme::Ssh => "ssh",
    }
}

/// The private folder of OpenSSH's connection sockets under `state_dir`, for an ssh remote;
/// `None` when the sockets' paths would be too long (the connections are then not shared).
fn ssh_sockets(address: &RepoAddress, state_dir: &Path) -> Option<PathBuf> {
    if address.scheme() != Scheme::Ssh {
        return None;
    }
    let dir = state_dir.join("ssh");
    // `%C` is 40 hexadecimal characters.
    if dir.as_os_str().len() + 1 + 40 + 20 > SOCKET_PATH_LIMIT {
        return None;
    }
    use std::os::unix::fs::DirBuilderExt;
    let created = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    created.ok().map(|()| dir)
}

/// `text` as one word of a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The system's CAs followed by `ca_file`, written to `bundle`.
fn write_ca_bundle(ca_file: &Path, bundle: &Path) -> Result<PathBuf, AccessError> {
    let failed = |message: String| AccessError {
        key: "git.ca_file",
        path: ca_file.to_path_buf(),
        message,
    };
    let extra =
        std::fs::read_to_string(ca_file).map_err(|e| failed(format!("cannot be read: {e}")))?;
    if !extra.contains("-----BEGIN CERTIFICATE-----") {
        return Err(failed("holds no PEM certificate".into()));
    }
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from))
        .find_map(|path| std::fs::read_to_string(path).ok())
        .unwrap_or_default();
    std::fs::write(bundle, format!("{system}\n{extra}"))
        .map_err(|e| failed(format!("writing {}: {e}", bundle.display())))?;
    Ok(bundle.to_path_buf())
}

/// Whether git's credential `request` (its `key=value` lines) asks for `host` over https,
/// or plain http to this machine: the only requests a credential is given for.
pub fn wanted(request: &str, host: &str) -> bool {
    let field = |name: &str| {
        request
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
    };
    let (Some(protocol), Some(asked)) = (field("protocol"), field("host")) else {
        return false;
    };
    let secure = protocol == "https" || (protocol == "http" && is_loopback_host(asked));
    secure && asked.eq_ignore_ascii_case(host)
}

/// What `karrots git-credential` answers with, from the environment [`Transport::command`]
/// gives git (file paths and names, never the token).
#[derive(Debug, Clone)]
pub struct CredentialSource {
    token_file: PathBuf,
    username: String,
    /// The repository's host (`host[:port]`): the only one answered.
    host: String,
}

impl CredentialSource {
    pub fn from_env() -> Option<CredentialSource> {
        let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        Some(CredentialSource {
            token_file: variable(TOKEN_FILE_VARIABLE)?.into(),
            username: variable(USERNAME_VARIABLE)?,
            host: variable(HOST_VARIABLE)?,
        })
    }

    /// git's credential helper protocol: for `get`, the user name and the token as its file
    /// holds it now — only when git asks for the repository's own host, over https (or plain
    /// http on this machine); nothing otherwise. `store` and `erase` keep nothing. `request`
    /// is what git wrote on stdin.
    pub fn answer(&self, action: &str, request: &str) -> String {
        if action != "get" {
            return String::new();
        }
        if !wanted(request, &self.host) {
            return String::new();
        }
        let Ok(token) = std::fs::read_to_string(&self.token_file) else {
            return String::new();
        };
        let token = token.trim();
        let unsafe_text = |text: &str| text.contains(['\n', '\r', '\0']);
        if token.is_empty() || unsafe_text(token) || unsafe_text(&self.username) {
            return String::new();
        }
        format!("username={}\npassword={token}\n", self.username)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(text: &str, access: GitAccess) -> Transport {
        Transport {
            address: RepoAddress::parse(text, Path::new("/")).unwrap(),
            access,
            ca_bundle: None,
            helper: None,
            credential_socket: None,
            ssh_sockets: None,
        }
    }

    #[test]
    fn a_refused_host_key_is_named_with_its_fingerprint() {
        let access = GitAccess {
            known_hosts_file: Some("/etc/karrots/known_hosts".into()),
            ..GitAccess::default()
        };
        let ssh = transport("ssh://git@127.0.0.1:2222/srv/config.git", access);
        let unknown = "debug1: Connecting to 127.0.0.1 [127.0.0.1] port 2222.\ndebug1: Server host key: ssh-ed25519 SHA256:YJNMm0fjz5EBcOfBNvAjdP3U2PJ5WpJLk0JiEkv2iC4\nNo ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\nHost key verification failed.\nfatal: Could not read from remote repository.\n\nPlease make sure you have the correct access rights\nand the repository exists.\n";
        assert_eq!(
            ssh.explain(unknown),
            "the SSH host 127.0.0.1:2222 offered ssh-ed25519 SHA256:YJNMm0fjz5EBcOfBNvAjdP3U2PJ5WpJLk0JiEkv2iC4, which /etc/karrots/known_hosts does not list; add the host's key there once it is checked (there is no trust on first use); nothing was fetched (git: fatal: Could not read from remote repository.)"
        );
        let changed = unknown.replace("No ED25519 host key is known", "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nNo ED25519 host key is known");
        assert!(
            ssh.explain(&changed)
                .contains("which is not its key in /etc/karrots/known_hosts")
        );
    }

    #[test]
    fn other_failures_say_which_file_or_trust_is_at_fault() {
        let access = GitAccess {
            token_file: Some("/etc/karrots/git-token".into()),
            username: "oauth2".into(),
            ..GitAccess::default()
        };
        let https = transport("https://git.example.com/acme/config.git", access);
        let refused =
            "fatal: Authentication failed for 'https://git.example.com/acme/config.git/'\n";
        assert!(https.explain(refused).starts_with(
            "git.example.com refused the credentials (user oauth2, the token in /etc/karrots/git-token)"
        ));
        let untrusted = "fatal: unable to access 'https://git.example.com/acme/config.git/': server certificate verification failed. CAfile: none CRLfile: none\n";
        assert!(https.explain(untrusted).starts_with(
            "TLS: the certificate of git.example.com is not signed by the system's CAs (add one with git.ca_file)"
        ));
        let plain = transport(
            "https://git.example.com/acme/config.git",
            GitAccess::default(),
        );
        let asked = "fatal: could not read Username for 'https://git.example.com': terminal prompts disabled\n";
        assert!(
            plain
                .explain(asked)
                .starts_with("git.example.com asks for credentials, and git.token_file names none")
        );
        assert_eq!(
            plain.explain("fatal: repository not found\n"),
            "fatal: repository not found"
        );
    }

    #[test]
    fn the_ssh_command_quotes_every_path_for_the_shell() {
        let access = GitAccess {
            ssh_key_file: Some("/etc/it's/deploy key".into()),
            known_hosts_file: Some("/etc/karrots/known hosts".into()),
            ..GitAccess::default()
        };
        let command = transport("git@github.com:acme/infra.git", access).ssh_command();
        assert!(
            command.contains(r"-i '/etc/it'\''s/deploy key'"),
            "{command}"
        );
        assert!(
            command.contains(r#"'-oUserKnownHostsFile="/etc/karrots/known hosts"'"#),
            "{command}"
        );
        assert!(command.contains("-o StrictHostKeyChecking=yes"));
    }

    #[test]
    fn the_token_goes_only_to_the_repositorys_host_over_https_or_loopback_http() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "ghs_first\n").unwrap();
        let source = |host: &str| CredentialSource {
            token_file: token_file.clone(),
            username: "x-access-token".into(),
            host: host.into(),
        };
        let github = source("github.com");
        let asked = |protocol: &str, host: &str| format!("protocol={protocol}\nhost={host}\n");
        assert_eq!(
            github.answer("get", &asked("https", "github.com")),
            "username=x-access-token\npassword=ghs_first\n"
        );
        for (protocol, host) in [("https", "evil.example"), ("http", "github.com")] {
            assert_eq!(
                github.answer("get", &asked(protocol, host)),
                "",
                "{protocol}://{host}"
            );
        }
        assert_eq!(github.answer("store", &asked("https", "github.com")), "");
        let local = source("127.0.0.1:8080");
        assert!(
            local
                .answer("get", &asked("http", "127.0.0.1:8080"))
                .contains("ghs_first")
        );

        std::fs::write(&token_file, "ghs_second").unwrap();
        assert!(
            github
                .answer("get", &asked("https", "github.com"))
                .contains("password=ghs_second"),
            "read again at each request: a rotated token needs no restart"
        );
        std::fs::write(&token_file, "two\nlines").unwrap();
        assert_eq!(github.answer("get", &asked("https", "github.com")), "");
    }
}
