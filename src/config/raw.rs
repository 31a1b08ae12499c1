//! Stage one: serde structs that mirror the YAML files key for key.
//!
//! They accept any value of the right type; [`super::environment`] and [`super::daemon`] turn
//! them into validated types. `deny_unknown_fields` everywhere: a misspelt key is an error,
//! never silently ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::yaml::Value;

/// `environments/<env>/karrots.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) struct RawEnvironment {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub name: String,
    pub branch: String,
    pub aws: RawAws,
    pub terraform: RawTerraform,
    #[serde(default)]
    pub apply: RawApply,
    #[serde(default)]
    pub drift: RawDrift,
    #[serde(default)]
    pub alerts: Vec<RawAlert>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub verify: RawVerify,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAws {
    pub account_id: String,
    pub region: String,
    pub profile: Option<String>,
    pub role_arn: Option<String>,
    pub preview_role_arn: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTerraform {
    pub root: String,
    #[serde(default)]
    pub vars: BTreeMap<String, Value>,
    pub backend: Option<RawBackend>,
}

/// One of its fields must be set; serde_yaml reads externally tagged enums only from YAML
/// tags (`!s3`), so the choice is two optional fields checked in stage two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackend {
    pub local: Option<RawLocalBackend>,
    pub s3: Option<RawS3Backend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLocalBackend {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawS3Backend {
    pub bucket: String,
    pub key: String,
    pub region: String,
    pub dynamodb_table: Option<String>,
    pub use_lockfile: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApply {
    pub auto: Option<bool>,
    pub allow_destroy: Option<bool>,
    pub approval: Option<RawApproval>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApproval {
    pub required: Option<u64>,
    pub hardware_key: Option<bool>,
    pub four_eyes: Option<bool>,
    #[serde(default)]
    pub approvers: Vec<RawKey>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVerify {
    pub signed_commits: Option<bool>,
    #[serde(default)]
    pub signers: Vec<RawKey>,
}

/// `{ email: …, key: "ssh-ed25519 AAAA… comment" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKey {
    pub email: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDrift {
    pub interval: Option<String>,
    pub remediate: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlert {
    pub webhook: String,
}

/// The daemon configuration, `karrots serve --config FILE`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDaemon {
    pub repo: String,
    pub poll_interval: Option<String>,
    pub state_dir: String,
    pub listen: Option<String>,
    pub webhook_secret_file: Option<String>,
    pub api_token_file: Option<String>,
    pub metrics_public: Option<bool>,
    pub concurrency: Option<u64>,
    pub preview: Option<bool>,
    pub preview_network: Option<String>,
    pub max_file_size: Option<String>,
    pub trust_branch: Option<String>,
    #[serde(default)]
    pub terraform: RawTerraformSettings,
    pub sandbox: Option<String>,
    #[serde(default)]
    pub aws: RawAwsSettings,
    #[serde(default)]
    pub alerts: Vec<RawAlert>,
    #[serde(default)]
    pub git: RawGitAccess,
    pub forge: Option<RawForge>,
    pub github_app: Option<RawGithubApp>,
    pub store: Option<String>,
    pub store_password_file: Option<String>,
    pub store_ca_file: Option<String>,
    pub lease: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGithubApp {
    pub app_id: u64,
    pub installation_id: u64,
    pub private_key_file: String,
    pub api_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawForge {
    pub kind: String,
    pub api_url: Option<String>,
    pub repository: String,
    pub token_file: Option<String>,
    pub public_url: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGitAccess {
    pub ssh_key_file: Option<String>,
    pub known_hosts_file: Option<String>,
    pub token_file: Option<String>,
    pub username: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTerraformSettings {
    pub binary: Option<String>,
    pub timeout: Option<String>,
    pub plugin_mirror: Option<String>,
    pub providers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAwsSettings {
    pub endpoint_url: Option<String>,
    pub cloudtrail_endpoint_url: Option<String>,
}
