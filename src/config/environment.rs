//! `environments/<env>/karrots.yaml` (apiVersion `karrots/v1`) as a validated type.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use super::raw::{RawApproval, RawBackend, RawEnvironment, RawKey, RawVerify};
use super::types::{
    AccountId, Allowance, BranchName, EnvName, Region, RepoPath, RoleArn, parse_duration,
};
use super::yaml::KeyLines;
use super::{Validator, yaml};
use crate::problem::{Problem, Problems};

pub const API_VERSION: &str = "karrots/v1";

/// One environment, as its `karrots.yaml` describes it. Every field holds a checked value.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentSpec {
    pub name: EnvName,
    /// Commits on the first-parent chain of this branch are applied to the environment.
    pub branch: BranchName,
    pub aws: AwsTarget,
    pub terraform: TerraformSpec,
    pub apply: ApplyPolicy,
    pub drift: DriftPolicy,
    pub alerts: Vec<AlertSink>,
    /// Opt-ins for what the repository check refuses by default.
    pub allow: BTreeSet<Allowance>,
    /// `apply.approval`: the approvals a plan needs before it is applied.
    pub approval: Option<ApprovalSettings>,
    /// `verify`: the signatures the commits being applied must carry.
    pub verify: VerifySettings,
}

/// An allowed key: who holds it, and the OpenSSH public key (checked when read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedKey {
    pub email: String,
    /// `key-type base64 [comment]`.
    pub key: String,
}

/// `apply.approval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalSettings {
    /// Distinct approvers needed.
    pub required: usize,
    /// Only security keys, the user present.
    pub hardware_key: bool,
    /// An approver who wrote a commit being applied does not count.
    pub four_eyes: bool,
    pub approvers: Vec<AllowedKey>,
}

/// `verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifySettings {
    /// Every commit applied must carry a signers' SSH signature.
    pub signed_commits: bool,
    pub signers: Vec<AllowedKey>,
}

impl EnvironmentSpec {
    /// The identity fields in which `other` differs from `self`. Only the trust
    /// branch may change them: a commit elsewhere that does is refused.
    pub fn identity_differences(&self, other: &EnvironmentSpec) -> Vec<&'static str> {
        let fields: [(&'static str, bool); 10] = [
            ("name", self.name == other.name),
            ("branch", self.branch == other.branch),
            (
                "aws.account_id",
                self.aws.account_id == other.aws.account_id,
            ),
            ("aws.profile", self.aws.profile == other.aws.profile),
            ("aws.role_arn", self.aws.role_arn == other.aws.role_arn),
            (
                "aws.preview_role_arn",
                self.aws.preview_role_arn == other.aws.preview_role_arn,
            ),
            (
                "terraform.backend",
                self.terraform.backend == other.terraform.backend,
            ),
            // `allow:` lifts refusals; a commit that could set it could run a program on the host.
            ("allow", self.allow == other.allow),
            // A branch must not name its own approvers, nor lower how many it needs.
            ("apply.approval", self.approval == other.approval),
            ("verify", self.verify == other.verify),
        ];
        fields
            .into_iter()
            .filter(|(_, same)| !same)
            .map(|(name, _)| name)
            .collect()
    }
}

/// The keys of `key` (`apply.approval.approvers`, `verify.signers`): each an email and an
/// OpenSSH public key; with `hardware` only security keys.
fn allowed_keys(v: &mut Validator, key: &str, raw: &[RawKey], hardware: bool) -> Vec<AllowedKey> {
    let mut keys = Vec::new();
    for (index, entry) in raw.iter().enumerate() {
        let at = format!("{key}[{index}]");
        if !entry.email.contains('@') {
            v.report(&at, format!("{:?} is not an email address", entry.email));
            continue;
        }
        let parsed = match ssh_key::PublicKey::from_openssh(entry.key.trim()) {
            Ok(parsed) => parsed,
            Err(error) => {
                v.report(
                    &at,
                    format!("the key is not an OpenSSH public key ({error})"),
                );
                continue;
            }
        };
        let security_key = matches!(
            parsed.algorithm(),
            ssh_key::Algorithm::SkEd25519 | ssh_key::Algorithm::SkEcdsaSha2NistP256
        );
        if hardware && !security_key {
            v.report(
                &at,
                format!("{} is no security key (sk-ssh-ed25519@openssh.com or sk-ecdsa-sha2-nistp256@openssh.com), and hardware_key is on", parsed.algorithm()),
            );
            continue;
        }
        keys.push(AllowedKey {
            email: entry.email.clone(),
            key: entry.key.trim().to_string(),
        });
    }
    keys
}

fn approval_settings(v: &mut Validator, raw: &RawApproval) -> ApprovalSettings {
    let hardware_key = raw.hardware_key.unwrap_or(false);
    let approvers = allowed_keys(v, "apply.approval.approvers", &raw.approvers, hardware_key);
    let required = raw.required.unwrap_or(1);
    if raw.approvers.is_empty() {
        v.report(
            "apply.approval.approvers",
            "names no approver: nothing could ever be applied",
        );
    } else if required == 0 || required > raw.approvers.len() as u64 {
        v.report(
            "apply.approval.required",
            format!(
                "must be between 1 and the {} approvers named",
                raw.approvers.len()
            ),
        );
    }
    ApprovalSettings {
        required: usize::try_from(required).unwrap_or(usize::MAX),
        hardware_key,
        four_eyes: raw.four_eyes.unwrap_or(false),
        approvers,
    }
}

fn verify_settings(v: &mut Validator, raw: &RawVerify) -> VerifySettings {
    let signers = allowed_keys(v, "verify.signers", &raw.signers, false);
    let signed_commits = raw.signed_commits.unwrap_or(false);
    if signed_commits && raw.signers.is_empty() {
        v.report(
            "verify.signed_commits",
            "needs verify.signers: no commit could be applied",
        );
    }
    VerifySettings {
        signed_commits,
        signers,
    }
}

/// Where the environment lives in AWS and how Karrots gets there.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsTarget {
    /// The STS caller identity must answer as this account before any run.
    pub account_id: AccountId,
    pub region: Region,
    /// The aws CLI profile of the standard credential chain; `karrots` by default (seed).
    pub profile: String,
    /// Assumed through STS for plans and applies of merged commits.
    pub role_arn: Option<RoleArn>,
    /// Assumed for preview plans of unmerged commits; without it previews get no credentials.
    pub preview_role_arn: Option<RoleArn>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TerraformSpec {
    /// The root module, inside the repository.
    pub root: RepoPath,
    /// Written to the workdir as `karrots.auto.tfvars.json`.
    pub vars: BTreeMap<String, serde_json::Value>,
    pub backend: Backend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// State kept under the daemon's state directory for this environment.
    Local,
    S3(S3Backend),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Backend {
    pub bucket: String,
    pub key: String,
    pub region: String,
    pub locking: S3Locking,
}

/// S3 state must be locked one way or the other: two writers would corrupt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Locking {
    DynamoDbTable(String),
    /// Terraform's native S3 lock file (`use_lockfile = true`).
    Lockfile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyPolicy {
    /// `false`: plan only, never apply.
    pub auto: bool,
    /// `false`: a plan that deletes or replaces a resource is refused.
    pub allow_destroy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriftPolicy {
    /// How often the last applied commit is re-planned; `None` turns drift checks off.
    pub interval: Option<Duration>,
    /// Re-apply the last applied commit when drift is found.
    pub remediate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSink {
    pub webhook: url::Url,
}

/// A parsed `karrots.yaml` that still knows where its keys are, so later checks (does the root
/// module exist?) can point at the right line.
#[derive(Debug, Clone)]
pub struct EnvironmentFile {
    pub spec: EnvironmentSpec,
    lines: KeyLines,
}

impl EnvironmentFile {
    /// The line of a dotted key such as `terraform.root`.
    pub fn line(&self, key: &str) -> usize {
        self.lines.line(key)
    }
}

/// Reads a `karrots.yaml`. `file` is the path used in messages; `folder` is the name of the
/// environment folder, which `name` must equal.
pub fn parse_environment(
    text: &str,
    file: &Path,
    folder: &str,
) -> Result<EnvironmentSpec, Problems> {
    parse_environment_file(text, file, folder).map(|parsed| parsed.spec)
}

/// [`parse_environment`], keeping the key positions.
pub fn parse_environment_file(
    text: &str,
    file: &Path,
    folder: &str,
) -> Result<EnvironmentFile, Problems> {
    let (raw, lines) = yaml::parse::<RawEnvironment>(text)
        .map_err(|error| Problems::one(Problem::new(file, error.line, error.message)))?;
    let mut v = Validator::new(file.to_path_buf(), lines);

    if raw.api_version != API_VERSION {
        v.report(
            "apiVersion",
            format!("{:?} is not supported; use {API_VERSION}", raw.api_version),
        );
    }
    let name = v.check("name", EnvName::parse(&raw.name));
    if name.is_some() && raw.name != folder {
        v.report(
            "name",
            format!(
                "{:?} must equal the folder name {folder:?} (environments/{folder}/karrots.yaml)",
                raw.name
            ),
        );
    }
    let branch = v.check("branch", BranchName::parse(&raw.branch));

    let account_id = v.check("aws.account_id", AccountId::parse(&raw.aws.account_id));
    let region = v.check("aws.region", Region::parse(&raw.aws.region));
    let profile = raw.aws.profile.unwrap_or_else(|| "karrots".to_string());
    let profile_ok = !profile.is_empty()
        && profile
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+@".contains(c));
    if !profile_ok {
        v.report(
            "aws.profile",
            format!("{profile:?} is not an aws CLI profile name"),
        );
    }
    let role = |v: &mut Validator, key: &str, text: Option<String>| {
        let arn = v.check(key, RoleArn::parse(text.as_deref()?))?;
        if let Some(account) = &account_id
            && arn.account() != account
        {
            v.report(
                key,
                format!(
                    "the role is in account {}, not aws.account_id {account}; a session assumed from it would fail the account check",
                    arn.account()
                ),
            );
        }
        Some(arn)
    };
    let role_arn = role(&mut v, "aws.role_arn", raw.aws.role_arn);
    let preview_role_arn = role(&mut v, "aws.preview_role_arn", raw.aws.preview_role_arn);

    let root = v.check(
        "terraform.root",
        RepoPath::parse(&raw.terraform.root).and_then(|root| {
            if root.as_str().is_empty() {
                Err(format!(
                    "{:?} is the repository root; put the root module in a folder such as modules/platform, so the environment's inputs are that folder and the modules it reaches, not the whole repository",
                    raw.terraform.root
                ))
            } else {
                Ok(root)
            }
        }),
    );
    let mut vars = BTreeMap::new();
    for (key, value) in &raw.terraform.vars {
        let path = format!("terraform.vars.{key}");
        if !is_terraform_identifier(key) {
            v.report(&path, "is not a terraform variable name");
            continue;
        }
        if let Some(json) = v.check(&path, yaml::to_json(value)) {
            vars.insert(key.clone(), json);
        }
    }
    let backend = validate_backend(&mut v, raw.terraform.backend);

    let interval = match raw.drift.interval {
        Some(text) => v.check("drift.interval", parse_duration(&text)),
        None => None,
    };
    let remediate = raw.drift.remediate.unwrap_or(false);
    if remediate && interval.is_none() {
        v.report(
            "drift.remediate",
            "needs drift.interval: without it no drift check runs",
        );
    }

    let approval = raw
        .apply
        .approval
        .as_ref()
        .map(|raw| approval_settings(&mut v, raw));
    let verify = verify_settings(&mut v, &raw.verify);
    let alerts = v.alerts(&raw.alerts);
    let mut allow = BTreeSet::new();
    for (index, text) in raw.allow.iter().enumerate() {
        if let Some(allowance) = v.check(&format!("allow[{index}]"), Allowance::parse(text)) {
            allow.insert(allowance);
        }
    }

    if let Some(problems) = Problems::from_vec(v.problems) {
        return Err(problems);
    }
    // Every `None` above reported a problem, so reaching here means all are set.
    let (Some(name), Some(branch), Some(account_id), Some(region), Some(root), Some(backend)) =
        (name, branch, account_id, region, root, backend)
    else {
        unreachable!("a missing value without a reported problem")
    };
    let spec = EnvironmentSpec {
        name,
        branch,
        aws: AwsTarget {
            account_id,
            region,
            profile,
            role_arn,
            preview_role_arn,
        },
        terraform: TerraformSpec {
            root,
            vars,
            backend,
        },
        apply: ApplyPolicy {
            // A plan that needs approvals is never applied on its own: it waits.
            auto: raw.apply.auto.unwrap_or(true) && approval.is_none(),
            allow_destroy: raw.apply.allow_destroy.unwrap_or(false),
        },
        drift: DriftPolicy {
            interval,
            remediate,
        },
        alerts,
        allow,
        approval,
        verify,
    };
    Ok(EnvironmentFile {
        spec,
        lines: v.lines,
    })
}

fn validate_backend(v: &mut Validator, raw: Option<RawBackend>) -> Option<Backend> {
    let Some(raw) = raw else {
        return Some(Backend::Local);
    };
    match (raw.local, raw.s3) {
        (Some(_), None) => Some(Backend::Local),
        (None, Some(s3)) => {
            let bucket_ok = (3..=63).contains(&s3.bucket.len())
                && s3.bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                });
            if !bucket_ok {
                v.report(
                    "terraform.backend.s3.bucket",
                    format!("{:?} is not an S3 bucket name", s3.bucket),
                );
            }
            if s3.key.is_empty() || s3.key.starts_with('/') {
                v.report(
                    "terraform.backend.s3.key",
                    format!("{:?} must be a non-empty key not starting with /", s3.key),
                );
            }
            let region_ok = v
                .check("terraform.backend.s3.region", Region::parse(&s3.region))
                .is_some();
            let locking = match (s3.dynamodb_table, s3.use_lockfile) {
                (Some(table), None | Some(false)) if !table.is_empty() => {
                    Some(S3Locking::DynamoDbTable(table))
                }
                (None, Some(true)) => Some(S3Locking::Lockfile),
                (Some(_), Some(true)) => {
                    v.report(
                        "terraform.backend.s3",
                        "set one of dynamodb_table and use_lockfile, not both",
                    );
                    None
                }
                _ => {
                    v.report(
                        "terraform.backend.s3",
                        "state must be locked: set dynamodb_table or use_lockfile: true",
                    );
                    None
                }
            };
            let locking = locking?;
            (bucket_ok && region_ok && !s3.key.is_empty() && !s3.key.starts_with('/')).then_some(
                Backend::S3(S3Backend {
                    bucket: s3.bucket,
                    key: s3.key,
                    region: s3.region,
                    locking,
                }),
            )
        }
        _ => {
            v.report(
                "terraform.backend",
                "set exactly one of local: {} and s3: {...}",
            );
            None
        }
    }
}

fn is_terraform_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
apiVersion: karrots/v1
name: prod
branch: main
aws:
  account_id: \"111122223333\"
  region: us-east-1
  role_arn: arn:aws:iam::111122223333:role/karrots-worker
terraform:
  root: modules/platform
  vars: { cluster_name: karrots-prod, azs: [a, b] }
  backend: { s3: { bucket: karrots-state, key: prod.tfstate, region: us-east-1, use_lockfile: true } }
apply:
  auto: true
  allow_destroy: false
drift:
  interval: 1h
alerts:
  - webhook: https://example.invalid/hook
allow: [local-exec]
";

    fn parse(text: &str) -> Result<EnvironmentSpec, Vec<String>> {
        parse_environment(text, Path::new("environments/prod/karrots.yaml"), "prod")
            .map_err(|problems| problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_valid_file_reads_into_checked_values() {
        let spec = parse(VALID).unwrap();
        assert_eq!(spec.name.as_str(), "prod");
        assert_eq!(spec.aws.profile, "karrots");
        assert_eq!(spec.terraform.root.as_str(), "modules/platform");
        assert_eq!(spec.terraform.vars["azs"], serde_json::json!(["a", "b"]));
        assert!(matches!(
            spec.terraform.backend,
            Backend::S3(S3Backend {
                locking: S3Locking::Lockfile,
                ..
            })
        ));
        assert_eq!(spec.drift.interval, Some(Duration::from_secs(3600)));
        assert!(spec.allow.contains(&Allowance::LocalExec));
        assert!(spec.apply.auto && !spec.apply.allow_destroy);
    }

    /// Each row: a replacement applied to the valid file, and the one problem expected.
    /// An OpenSSH public key line of each kind, made here.
    fn public_key(security_key: bool) -> String {
        use ssh_key::public::{Ed25519PublicKey, KeyData, SkEd25519};
        let ed25519 = Ed25519PublicKey([7; 32]);
        let data = if security_key {
            KeyData::SkEd25519(SkEd25519::new(ed25519, "ssh:"))
        } else {
            KeyData::Ed25519(ed25519)
        };
        ssh_key::PublicKey::from(data).to_openssh().unwrap()
    }

    #[test]
    fn approvals_and_signers_are_checked_identity_fields() {
        let (sk, ed) = (public_key(true), public_key(false));
        let approval = format!(
            "  allow_destroy: false\n  approval:\n    required: 1\n    hardware_key: true\n    four_eyes: true\n    approvers:\n      - {{ email: alice@example.com, key: \"{sk} alice@yubikey\" }}\nverify:\n  signed_commits: true\n  signers:\n    - {{ email: bob@example.com, key: \"{ed} bob\" }}\n"
        );
        let text = VALID.replace("  allow_destroy: false\n", &approval);
        let spec = parse(&text).unwrap();
        assert!(
            !spec.apply.auto,
            "a plan that needs approvals waits, never applied on its own"
        );
        let settings = spec.approval.as_ref().unwrap();
        assert_eq!(
            (settings.required, settings.hardware_key, settings.four_eyes),
            (1, true, true)
        );
        assert_eq!(settings.approvers[0].email, "alice@example.com");
        assert!(spec.verify.signed_commits);
        let bob = format!("  signers:\n    - {{ email: bob@example.com, key: \"{ed} bob\" }}\n");
        let unsigned = parse(&text.replace(&bob, ""));
        assert!(
            unsigned
                .is_err_and(|problems| problems.iter().any(|p| p.contains("needs verify.signers"))),
            "signed commits without signers could apply nothing"
        );
        assert_eq!(spec.verify.signers[0].key, format!("{ed} bob"));
        let trusted = parse(VALID).unwrap();
        assert_eq!(
            trusted.identity_differences(&spec),
            ["apply.approval", "verify"]
        );

        let mistakes = [
            (
                format!("{sk} alice@yubikey"),
                format!("{ed} alice"),
                ":20: apply.approval.approvers[0]: ssh-ed25519 is no security key",
            ),
            // Keys three levels deep are placed at their section's line.
            (
                "required: 1".into(),
                "required: 2".into(),
                ":16: apply.approval.required: must be between 1 and the 1 approvers named",
            ),
            (
                format!("{ed} bob"),
                "ssh-ed25519 AAAA-not-base64 bob".into(),
                ":24: verify.signers[0]: the key is not an OpenSSH public key",
            ),
            (
                "email: bob@example.com".into(),
                "email: bob".into(),
                ":24: verify.signers[0]: \"bob\" is not an email address",
            ),
        ];
        for (from, to, expected) in mistakes {
            let problems = parse(&text.replace(&from, &to)).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0].starts_with("environments/prod/karrots.yaml:")
                    && problems[0].contains(expected),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn each_mistake_names_file_line_and_key() {
        let rows: &[(&str, &str, &str)] = &[
            (
                "account_id: \"111122223333\"",
                "account_id: \"12345\"",
                "environments/prod/karrots.yaml:5: aws.account_id: \"12345\" is not 12 digits",
            ),
            (
                "name: prod",
                "name: staging",
                "environments/prod/karrots.yaml:2: name: \"staging\" must equal the folder name \"prod\" (environments/prod/karrots.yaml)",
            ),
            (
                "branch: main",
                "branch: \"a..b\"",
                "environments/prod/karrots.yaml:3: branch: \"a..b\" is not a valid branch name (a plain name such as main or release/1.2)",
            ),
            (
                "region: us-east-1\n  role",
                "region: useast\n  role",
                "environments/prod/karrots.yaml:6: aws.region: \"useast\" is not an AWS region name (such as us-east-1 or eu-central-1)",
            ),
            (
                "apply:\n  auto: true",
                "apply:\n  auto: true\n  approve: yes",
                "environments/prod/karrots.yaml:14: apply.approve: unknown key `approve`, expected one of `auto`, `allow_destroy`, `approval`",
            ),
            (
                "root: modules/platform",
                "root: ../elsewhere",
                "environments/prod/karrots.yaml:9: terraform.root: \"../elsewhere\" leaves the repository",
            ),
            (
                "root: modules/platform",
                "root: .",
                "environments/prod/karrots.yaml:9: terraform.root: \".\" is the repository root; put the root module in a folder such as modules/platform, so the environment's inputs are that folder and the modules it reaches, not the whole repository",
            ),
            (
                "interval: 1h",
                "interval: hourly",
                "environments/prod/karrots.yaml:16: drift.interval: \"hourly\" is not a duration (such as 30s, 5m, 1h or 1h30m)",
            ),
            (
                "allow: [local-exec]",
                "allow: [local-exec, anything]",
                "environments/prod/karrots.yaml:19: allow[1]: \"anything\" is not one of local-exec, remote-exec, external, http, remote-state, remote-modules",
            ),
            (
                "role/karrots-worker",
                "role/karrots-worker\n  preview_role_arn: arn:aws:iam::999999999999:role/ro",
                "environments/prod/karrots.yaml:8: aws.preview_role_arn: the role is in account 999999999999, not aws.account_id 111122223333; a session assumed from it would fail the account check",
            ),
            (
                ", use_lockfile: true",
                "",
                "environments/prod/karrots.yaml:11: terraform.backend.s3: state must be locked: set dynamodb_table or use_lockfile: true",
            ),
            (
                "backend: { s3:",
                "backend: { local: {}, s3:",
                "environments/prod/karrots.yaml:11: terraform.backend: set exactly one of local: {} and s3: {...}",
            ),
            (
                "apiVersion: karrots/v1",
                "apiVersion: karrots/v2",
                "environments/prod/karrots.yaml:1: apiVersion: \"karrots/v2\" is not supported; use karrots/v1",
            ),
            (
                "https://example.invalid/hook",
                "ftp://example.invalid/hook",
                "environments/prod/karrots.yaml:18: alerts[0].webhook: \"ftp://example.invalid/hook\" must be an http or https URL",
            ),
            (
                "interval: 1h",
                "remediate: true",
                "environments/prod/karrots.yaml:16: drift.remediate: needs drift.interval: without it no drift check runs",
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

    #[test]
    fn structural_errors_carry_the_key_path() {
        let missing = VALID.replace("  region: us-east-1\n  role", "  role");
        assert_eq!(
            parse(&missing).unwrap_err(),
            vec!["environments/prod/karrots.yaml:5: aws: missing key `region`".to_string()]
        );
        let wrong_type = VALID.replace("auto: true", "auto: [yes]");
        assert_eq!(
            parse(&wrong_type).unwrap_err(),
            vec![
                "environments/prod/karrots.yaml:13: apply.auto: invalid type: sequence, expected a boolean"
                    .to_string()
            ]
        );
        assert_eq!(
            parse("").unwrap_err(),
            vec!["environments/prod/karrots.yaml:1: the file is empty".to_string()]
        );
    }

    #[test]
    fn identity_differences_name_exactly_the_changed_identity_fields() {
        let trusted = parse(VALID).unwrap();
        assert!(trusted.identity_differences(&trusted).is_empty());
        // Each row replaces every occurrence of a text in the valid file.
        let rows: &[(&str, &str, &[&str])] = &[
            ("cluster_name: karrots-prod", "cluster_name: other", &[]),
            ("interval: 1h", "interval: 2h", &[]),
            ("branch: main", "branch: dev", &["branch"]),
            (
                "111122223333",
                "999999999999",
                &["aws.account_id", "aws.role_arn"],
            ),
            ("role/karrots-worker", "role/admin", &["aws.role_arn"]),
            (
                "key: prod.tfstate",
                "key: dev.tfstate",
                &["terraform.backend"],
            ),
            (
                "  role_arn:",
                "  preview_role_arn:",
                &["aws.role_arn", "aws.preview_role_arn"],
            ),
        ];
        for (from, to, expected) in rows {
            let candidate = parse(&VALID.replace(from, to)).unwrap();
            assert_eq!(trusted.identity_differences(&candidate), *expected, "{to}");
        }
    }

    #[test]
    fn several_problems_are_all_reported_in_line_order() {
        let text = VALID
            .replace("name: prod", "name: Prod")
            .replace("\"111122223333\"", "\"1\"");
        let problems = parse(&text).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("environments/prod/karrots.yaml:2: name:"));
        assert!(problems[1].starts_with("environments/prod/karrots.yaml:5: aws.account_id:"));
    }
}
