//! Where the config repository is (`repo:`) and the files the daemon reaches it with (`git:`).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The address of the config repository, kept as written (git's scp-like form
/// `git@host:org/repo.git` is no URL, and means a path relative to the account's home, which
/// rewriting it as one would change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoAddress {
    text: String,
    scheme: Scheme,
    /// The host, with its port when the address names one; `None` for `file://`.
    host: Option<String>,
}

/// How the daemon reaches the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    File,
    Git,
    Http,
    Https,
    /// `ssh://` or the scp-like form.
    Ssh,
}

impl RepoAddress {
    /// A URL (`file`, `https`, `http`, `ssh`, `git`), the scp-like form, or a path (relative to
    /// `base`) that becomes a `file://` URL.
    pub fn parse(text: &str, base: &Path) -> Result<RepoAddress, String> {
        if let Some(host) = scp_host(text) {
            return Ok(RepoAddress {
                text: text.to_string(),
                scheme: Scheme::Ssh,
                host: Some(host.to_string()),
            });
        }
        let url = match url::Url::parse(text) {
            Ok(url) => url,
            Err(url::ParseError::RelativeUrlWithoutBase) => {
                let absolute =
                    std::path::absolute(base.join(text)).map_err(|error| error.to_string())?;
                url::Url::from_file_path(&absolute)
                    .map_err(|()| format!("{text:?} is neither a URL nor a usable path"))?
            }
            Err(error) => return Err(format!("{text:?} is not a URL: {error}")),
        };
        let scheme = match url.scheme() {
            "file" => Scheme::File,
            "git" => Scheme::Git,
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "ssh" => Scheme::Ssh,
            _ => {
                return Err(format!(
                    "{text:?}: the scheme must be https, ssh, git, http or file (or the scp-like form git@host:org/repo.git)"
                ));
            }
        };
        if url.password().is_some() {
            return Err(
                "the address carries a password; Karrots keeps no secrets in its configuration: name a file with git.token_file"
                    .to_string(),
            );
        }
        let host = url.host_str().map(|host| match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        });
        Ok(RepoAddress {
            text: url.to_string(),
            scheme,
            host: host.filter(|_| scheme != Scheme::File),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// `host` or `host:port`.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// The repository's directory, for a `file://` address.
    pub fn file_path(&self) -> Option<PathBuf> {
        (self.scheme == Scheme::File)
            .then(|| url::Url::parse(&self.text).ok()?.to_file_path().ok())
            .flatten()
    }

    /// Whether the host is this machine (`localhost`, 127.0.0.0/8, ::1).
    pub fn is_loopback(&self) -> bool {
        self.host.as_deref().is_some_and(is_loopback_host)
    }
}

impl fmt::Display for RepoAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether `host` (`name`, `name:port`, `[v6]:port`) is this machine.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host of git's scp-like form `[user@]host:path`: no `://`, and a colon before the
/// first slash (as git decides it).
fn scp_host(text: &str) -> Option<&str> {
    if text.contains("://") {
        return None;
    }
    let (before, path) = text.split_once(':')?;
    if before.contains('/') || path.is_empty() || before.is_empty() {
        return None;
    }
    let host = before.rsplit_once('@').map_or(before, |(_, host)| host);
    (!host.is_empty()).then_some(host)
}

/// `git:`: the files the daemon reaches its repository with. Never a secret itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitAccess {
    /// An OpenSSH private key without a passphrase, for ssh remotes.
    pub ssh_key_file: Option<PathBuf>,
    /// The host keys trusted for ssh remotes (required for them: no trust on first use).
    pub known_hosts_file: Option<PathBuf>,
    /// The HTTP basic auth password (a token) for https remotes, read at every fetch.
    pub token_file: Option<PathBuf>,
    /// The basic auth user name: `x-access-token` (GitHub) unless set (`oauth2` for GitLab).
    pub username: String,
    /// A CA trusted besides the system's for https remotes.
    pub ca_file: Option<PathBuf>,
}

/// The user name GitHub expects with a token.
pub const DEFAULT_GIT_USERNAME: &str = "x-access-token";

/// `forge:`: where the results of runs are posted (commit statuses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeSettings {
    pub kind: ForgeKind,
    /// The REST API's root: `https://api.github.com`, `https://HOST/api/v4` (GitLab),
    /// `https://HOST/api/v1` (Gitea, Forgejo).
    pub api_url: url::Url,
    /// `owner/name`; for GitLab the project's path (groups included).
    pub repository: String,
    /// The API token, read at each delivery; `None` with a GitHub App, whose installation
    /// token serves.
    pub token_file: Option<PathBuf>,
    /// Where people reach the daemon's run pages: statuses link to `{public_url}/runs/{id}`.
    pub public_url: url::Url,
}

/// `github_app:`: an App installation whose short-lived tokens serve the fetch and the forge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubApp {
    pub app_id: u64,
    pub installation_id: u64,
    /// The App's private key (PEM, as GitHub hands it out).
    pub private_key_file: PathBuf,
    /// `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server.
    pub api_url: url::Url,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display, strum::EnumString)]
#[strum(serialize_all = "lowercase")]
pub enum ForgeKind {
    Github,
    Gitlab,
    Gitea,
}

impl ForgeKind {
    /// The API root when `forge.api_url` is not set: only GitHub's is one address.
    pub fn default_api_url(self) -> Option<&'static str> {
        (self == ForgeKind::Github).then_some("https://api.github.com")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_of_address_has_its_scheme_and_host() {
        let base = Path::new("/srv");
        let cases = [
            (
                "git@github.com:acme/infra.git",
                Scheme::Ssh,
                Some("github.com"),
            ),
            ("github.com:acme/infra.git", Scheme::Ssh, Some("github.com")),
            (
                "ssh://git@127.0.0.1:2222/srv/infra.git",
                Scheme::Ssh,
                Some("127.0.0.1:2222"),
            ),
            (
                "https://github.com/acme/infra.git",
                Scheme::Https,
                Some("github.com"),
            ),
            (
                "http://localhost:8080/infra.git",
                Scheme::Http,
                Some("localhost:8080"),
            ),
            (
                "git://example.com/infra.git",
                Scheme::Git,
                Some("example.com"),
            ),
            ("file:///srv/infra.git", Scheme::File, None),
            ("infra.git", Scheme::File, None),
            ("./a:b/infra.git", Scheme::File, None),
        ];
        for (text, scheme, host) in cases {
            let address = RepoAddress::parse(text, base).unwrap();
            assert_eq!((address.scheme(), address.host()), (scheme, host), "{text}");
        }
        let scp = RepoAddress::parse("git@github.com:acme/infra.git", base).unwrap();
        assert_eq!(
            scp.as_str(),
            "git@github.com:acme/infra.git",
            "kept as written"
        );
        assert_eq!(
            RepoAddress::parse("infra.git", base).unwrap().file_path(),
            Some(PathBuf::from("/srv/infra.git"))
        );
    }

    #[test]
    fn a_password_or_another_scheme_is_refused() {
        let base = Path::new("/srv");
        let password = RepoAddress::parse("https://bot:hunter2@github.com/a/b.git", base);
        assert!(password.unwrap_err().contains("password"));
        let ftp = RepoAddress::parse("ftp://example.com/b.git", base);
        assert!(ftp.unwrap_err().contains("scheme"));
    }

    #[test]
    fn loopback_hosts_are_this_machine_only() {
        for host in [
            "localhost",
            "localhost:80",
            "127.0.0.1",
            "127.1.2.3:8443",
            "[::1]:8443",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "example.com",
            "10.0.0.1:80",
            "[2001:db8::1]:443",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
