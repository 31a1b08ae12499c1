//! The two configuration files, read in two stages.
//!
//! Stage one ([`raw`]) mirrors the YAML with serde and rejects unknown keys and wrong types;
//! stage two ([`environment`], [`daemon`]) builds validated types that cannot hold an invalid
//! value. Every error is a [`Problem`] naming the file, the line and the key.
//!
//! Architecture invariant: this module does no I/O except reading the one file it is asked to
//! load. Whether a root module exists on disk is the repository check's business.

mod daemon;
mod environment;
mod raw;
mod remote;
mod types;
mod yaml;

pub use daemon::{
    DaemonConfig, PreviewNetwork, SandboxMode, StoreSettings, TerraformSettings,
    load_daemon_config, parse_daemon_config,
};
pub use environment::{
    API_VERSION, AlertSink, AllowedKey, ApplyPolicy, ApprovalSettings, AwsTarget, Backend,
    DriftPolicy, EnvironmentFile, EnvironmentSpec, S3Backend, S3Locking, TerraformSpec,
    VerifySettings, parse_environment, parse_environment_file,
};
pub use remote::{
    ForgeKind, ForgeSettings, GitAccess, GithubApp, RepoAddress, Scheme, is_loopback_host,
};
pub(crate) use types::to_slash;
pub use types::{
    AccountId, Allowance, BranchName, EnvName, ProviderPattern, Region, RepoPath, RoleArn,
    default_provider_patterns, parse_duration,
};

use std::path::PathBuf;

use crate::problem::Problem;
use yaml::KeyLines;

/// Collects stage-two problems for one file, each located by the line of its key.
struct Validator {
    file: PathBuf,
    lines: KeyLines,
    problems: Vec<Problem>,
}

impl Validator {
    fn new(file: PathBuf, lines: KeyLines) -> Validator {
        Validator {
            file,
            lines,
            problems: Vec::new(),
        }
    }

    fn report(&mut self, key: &str, message: impl std::fmt::Display) {
        let line = self.lines.line(key);
        self.problems.push(Problem::new(
            self.file.clone(),
            line,
            format!("{key}: {message}"),
        ));
    }

    /// The `alerts:` list both configuration files share.
    fn alerts(&mut self, raw: &[raw::RawAlert]) -> Vec<AlertSink> {
        raw.iter()
            .enumerate()
            .filter_map(|(index, alert)| {
                let webhook = self.check(
                    &format!("alerts[{index}].webhook"),
                    types::parse_webhook_url(&alert.webhook),
                )?;
                Some(AlertSink { webhook })
            })
            .collect()
    }

    /// Runs a stage-two parser on one key's value, reporting a failure under that key.
    fn check<T>(&mut self, key: &str, parsed: Result<T, String>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(message) => {
                self.report(key, message);
                None
            }
        }
    }
}
