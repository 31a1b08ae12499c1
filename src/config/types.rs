//! Validated value types: each can only hold a value Karrots accepts.
//!
//! Every `parse` is a pure function from the raw text to the type or to a message that says
//! what is allowed; the caller adds the file, line and key.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An environment name: `[a-z0-9][a-z0-9-]{0,62}`, also used as a folder, an STS
/// session name part and a state directory name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EnvName(String);

impl EnvName {
    pub fn parse(text: &str) -> Result<EnvName, String> {
        let mut chars = text.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && text.len() <= 63 {
            Ok(EnvName(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a valid environment name (lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EnvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A git branch name as `git check-ref-format --branch` accepts it (checked by libgit2).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BranchName(String);

impl BranchName {
    pub fn parse(text: &str) -> Result<BranchName, String> {
        let looks_like_ref = text.starts_with("refs/") || text == "HEAD" || text.starts_with('-');
        if !looks_like_ref && git2::Reference::is_valid_name(&format!("refs/heads/{text}")) {
            Ok(BranchName(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a valid branch name (a plain name such as main or release/1.2)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BranchName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 12-digit AWS account id, kept as text because leading zeros matter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountId(String);

impl AccountId {
    pub fn parse(text: &str) -> Result<AccountId, String> {
        if text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit()) {
            Ok(AccountId(text.to_string()))
        } else {
            Err(format!("{text:?} is not 12 digits"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An AWS region name such as `us-east-1`, `eu-central-2` or `us-gov-west-1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region(String);

impl Region {
    pub fn parse(text: &str) -> Result<Region, String> {
        let parts: Vec<&str> = text.split('-').collect();
        let well_formed = (3..=4).contains(&parts.len())
            && parts[0].len() == 2
            && parts[..parts.len() - 1]
                .iter()
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase()))
            && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
            && !parts[parts.len() - 1].is_empty();
        if well_formed {
            Ok(Region(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not an AWS region name (such as us-east-1 or eu-central-1)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An IAM role ARN, `arn:<partition>:iam::<account>:role/<path/name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleArn {
    arn: String,
    /// The account that owns the role: a session assumed from it answers as this account.
    account: AccountId,
}

impl RoleArn {
    pub fn parse(text: &str) -> Result<RoleArn, String> {
        let invalid = || {
            format!("{text:?} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")
        };
        let fields: Vec<&str> = text.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = fields[..] else {
            return Err(invalid());
        };
        let partition_ok = matches!(partition, "aws" | "aws-cn" | "aws-us-gov");
        let name = resource.strip_prefix("role/").unwrap_or_default();
        let name_ok = !name.is_empty()
            && name.len() <= 512
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c));
        if arn != "arn" || !partition_ok || service != "iam" || !region.is_empty() || !name_ok {
            return Err(invalid());
        }
        let account = AccountId::parse(account).map_err(|_| invalid())?;
        Ok(RoleArn {
            arn: text.to_string(),
            account,
        })
    }

    pub fn account(&self) -> &AccountId {
        &self.account
    }

    pub fn as_str(&self) -> &str {
        &self.arn
    }
}

/// A path relative to the config repository root that cannot leave it: no absolute paths, no
/// `..` that climbs above the root. Stored normalized with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoPath(String);

impl TryFrom<String> for RepoPath {
    type Error = String;

    fn try_from(text: String) -> Result<RepoPath, String> {
        RepoPath::parse(&text)
    }
}

impl From<RepoPath> for String {
    fn from(path: RepoPath) -> String {
        path.0
    }
}

impl RepoPath {
    pub fn parse(text: &str) -> Result<RepoPath, String> {
        if text.is_empty() {
            return Err("the path is empty".to_string());
        }
        let path = Path::new(text);
        if path.is_absolute() {
            return Err(format!(
                "{text:?} is absolute; give a path relative to the repository root"
            ));
        }
        normalize_inside(Path::new(""), path)
            .map(|normal| RepoPath(to_slash(&normal)))
            .ok_or_else(|| format!("{text:?} leaves the repository"))
    }

    /// Whether the `/` path `path` is this directory or lies under it.
    pub fn contains(&self, path: &str) -> bool {
        path == self.0
            || path
                .strip_prefix(&self.0)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Whether the `/` path `path` is a directory above this one.
    pub fn is_below(&self, path: &str) -> bool {
        self.0
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Whether an export of this path writes the entry at `path` (a directory when `is_dir`):
    /// the path itself, what lies under it, and the directories above it.
    pub fn exported_with(&self, path: &str, is_dir: bool) -> bool {
        self.contains(path) || (is_dir && self.is_below(path))
    }

    /// `relative` resolved against `base` (a path inside the repository), if it stays inside.
    pub fn join(&self, relative: &str) -> Option<RepoPath> {
        let relative = Path::new(relative);
        if relative.is_absolute() {
            return None;
        }
        normalize_inside(Path::new(&self.0), relative).map(|normal| RepoPath(to_slash(&normal)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn to_path(&self, root: &Path) -> PathBuf {
        if self.0.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&self.0)
        }
    }
}

impl fmt::Display for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "." } else { &self.0 })
    }
}

/// Lexically joins `relative` onto `base`, returning `None` when `..` climbs above the root.
fn normalize_inside(base: &Path, relative: &Path) -> Option<PathBuf> {
    let mut parts: Vec<String> = base
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    for component in relative.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// A relative path with `/` separators, the same on every machine.
pub(crate) fn to_slash(path: &Path) -> String {
    path.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// What an environment's `allow:` list can opt into, from the refusals of the repository rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Allowance {
    /// `provisioner "local-exec"`: runs commands on the Karrots host.
    LocalExec,
    /// `provisioner "remote-exec"`: runs commands over SSH/WinRM.
    RemoteExec,
    /// `data "external"`: runs a program on the Karrots host at plan time.
    ExternalData,
    /// `data "http"`: makes arbitrary requests from the Karrots host at plan time.
    HttpData,
    /// `data "terraform_remote_state"`: reads another state from a backend the code names, an
    /// address that can carry the state it plans against to any server.
    RemoteState,
    /// Module sources outside the repository (registry, git, URLs): code not in the commit.
    RemoteModules,
}

impl Allowance {
    pub const ALL: [Allowance; 6] = [
        Allowance::LocalExec,
        Allowance::RemoteExec,
        Allowance::ExternalData,
        Allowance::HttpData,
        Allowance::RemoteState,
        Allowance::RemoteModules,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Allowance::LocalExec => "local-exec",
            Allowance::RemoteExec => "remote-exec",
            Allowance::ExternalData => "external",
            Allowance::HttpData => "http",
            Allowance::RemoteState => "remote-state",
            Allowance::RemoteModules => "remote-modules",
        }
    }

    pub fn parse(text: &str) -> Result<Allowance, String> {
        Allowance::ALL
            .into_iter()
            .find(|allowance| allowance.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Allowance::ALL.iter().map(|a| a.name()).collect();
                format!("{text:?} is not one of {}", names.join(", "))
            })
    }
}

/// A positive duration written as `30s`, `5m`, `1h`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is not a duration (such as 30s, 5m, 1h or 1h30m)"))?;
    if duration.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(duration)
}

/// An alert webhook: an `http` or `https` URL without credentials in it.
pub fn parse_webhook_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|error| format!("{text:?} is not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?} must be an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "the URL carries credentials; Karrots keeps no secrets in configuration".to_string(),
        );
    }
    Ok(url)
}

/// A provider source the daemon lets a commit require (daemon config `terraform.providers`):
/// `[hostname/]namespace/type`, where the type may be `*` (a whole namespace: one publisher's
/// providers). The namespace is always named: `*/aws` would let anyone publish an `aws`.
/// The hostname defaults to the public registry, as in terraform's own source addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPattern {
    hostname: String,
    namespace: String,
    kind: String,
}

/// The registry terraform assumes for a source address without a hostname.
const DEFAULT_PROVIDER_HOST: &str = "registry.terraform.io";

impl ProviderPattern {
    pub fn parse(text: &str) -> Result<ProviderPattern, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let (hostname, namespace, kind) = match parts.as_slice() {
            [namespace, kind] if *namespace != "*" => (DEFAULT_PROVIDER_HOST, *namespace, *kind),
            [hostname, namespace, kind] if *hostname != "*" && *namespace != "*" => {
                (*hostname, *namespace, *kind)
            }
            _ => {
                return Err(format!(
                    "{text:?} is not a provider source such as hashicorp/aws, hashicorp/* or registry.example.com/team/*"
                ));
            }
        };
        let segment_ok = |segment: &str| {
            segment == "*"
                || (!segment.is_empty()
                    && segment
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        };
        if !(segment_ok(hostname) && segment_ok(namespace) && segment_ok(kind)) {
            return Err(format!("{text:?}: each part is a name or *"));
        }
        Ok(ProviderPattern {
            hostname: hostname.to_ascii_lowercase(),
            namespace: namespace.to_ascii_lowercase(),
            kind: kind.to_ascii_lowercase(),
        })
    }

    /// Whether a `required_providers` source address (`hashicorp/aws`,
    /// `registry.terraform.io/hashicorp/aws`) matches. Names compare case-insensitively, as
    /// terraform compares them.
    pub fn matches(&self, source: &str) -> bool {
        let Ok(source) = ProviderPattern::parse(source) else {
            return false;
        };
        source.kind != "*"
            && self.hostname == source.hostname
            && self.namespace == source.namespace
            && (self.kind == "*" || self.kind == source.kind)
    }
}

impl std::fmt::Display for ProviderPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.hostname, self.namespace, self.kind)
    }
}

/// The default `terraform.providers`: HashiCorp's own providers only.
pub fn default_provider_patterns() -> Vec<ProviderPattern> {
    vec![ProviderPattern::parse("hashicorp/*").expect("a valid pattern")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        for good in ["prod", "dev", "eu-west-2", "0", &"a".repeat(63)] {
            assert!(EnvName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "Prod", "-dev", "dev_1", "dev.1", "dév", &"a".repeat(64)] {
            assert!(EnvName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn branch_names() {
        for good in ["main", "dev", "release/1.2", "feature-x"] {
            assert!(BranchName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a..b",
            "a b",
            "x~1",
            "end.",
            "refs/heads/main",
            "HEAD",
            "-x",
            "a.lock",
            "/a",
        ] {
            assert!(BranchName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn account_ids() {
        assert!(AccountId::parse("012345678901").is_ok());
        for bad in ["12345", "1234567890123", "12345678901a", ""] {
            assert_eq!(
                AccountId::parse(bad).unwrap_err(),
                format!("{bad:?} is not 12 digits")
            );
        }
    }

    #[test]
    fn regions() {
        for good in [
            "us-east-1",
            "eu-central-2",
            "us-gov-west-1",
            "ap-southeast-4",
        ] {
            assert!(Region::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "us-east",
            "US-EAST-1",
            "useast1",
            "u-east-1",
            "us-east-1a",
            "us--1",
        ] {
            assert!(Region::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn role_arns() {
        let arn = RoleArn::parse("arn:aws:iam::111122223333:role/karrots-worker").unwrap();
        assert_eq!(arn.account().as_str(), "111122223333");
        assert!(RoleArn::parse("arn:aws:iam::111122223333:role/path/to/name").is_ok());
        for bad in [
            "arn:aws:iam::111122223333:user/karrots",
            "arn:aws:iam::1111:role/x",
            "arn:aws:s3::111122223333:role/x",
            "arn:aws:iam:us-east-1:111122223333:role/x",
            "arn:aws:iam::111122223333:role/",
            "role/x",
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repo_paths_stay_inside() {
        assert_eq!(
            RepoPath::parse("modules/platform/").unwrap().as_str(),
            "modules/platform"
        );
        assert_eq!(
            RepoPath::parse("./modules/../modules/x").unwrap().as_str(),
            "modules/x"
        );
        for bad in ["", "/etc", "..", "modules/../../x"] {
            assert!(RepoPath::parse(bad).is_err(), "{bad}");
        }
        let platform = RepoPath::parse("modules/platform").unwrap();
        assert_eq!(
            platform.join("../network").unwrap().as_str(),
            "modules/network"
        );
        assert_eq!(
            platform.join("./sub").unwrap().as_str(),
            "modules/platform/sub"
        );
        assert!(platform.join("../../../etc").is_none());
        assert!(platform.join("/etc").is_none());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        for bad in ["", "30", "0s", "soon", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowances() {
        for allowance in Allowance::ALL {
            assert_eq!(Allowance::parse(allowance.name()).unwrap(), allowance);
        }
        assert!(Allowance::parse("everything").is_err());
    }

    #[test]
    fn webhook_urls() {
        assert!(parse_webhook_url("https://example.invalid/hook").is_ok());
        assert!(parse_webhook_url("http://127.0.0.1:9000/alerts").is_ok());
        for bad in ["ftp://x/y", "not a url", "https://user:pw@example.invalid/"] {
            assert!(parse_webhook_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn provider_patterns_match_whole_names() {
        let hashicorp = ProviderPattern::parse("hashicorp/*").unwrap();
        for allowed in [
            "hashicorp/aws",
            "registry.terraform.io/hashicorp/aws",
            "HashiCorp/AWS",
        ] {
            assert!(hashicorp.matches(allowed), "{allowed}");
        }
        for refused in [
            "evilcorp/aws",
            "hashicorp-evil/aws",
            "registry.example.com/hashicorp/aws",
            "hashicorp/*",
            "aws",
        ] {
            assert!(!hashicorp.matches(refused), "{refused}");
        }
        let private = ProviderPattern::parse("registry.example.com/team/tool").unwrap();
        assert!(private.matches("registry.example.com/team/tool"));
        assert!(!private.matches("team/tool"));
        for bad in [
            "aws",
            "*/aws",
            "*/*/*",
            "a/*/*",
            "a/b/c/d",
            "hashi corp/aws",
            "",
        ] {
            assert!(ProviderPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
