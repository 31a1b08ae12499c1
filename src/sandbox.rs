//! The kernel sandbox every terraform process runs in (Linux Landlock).
//!
//! Terraform runs provider code, and a preview runs it from an unmerged commit. What that code
//! can read must be what was fingerprinted: its own checkout, the terraform binary, the
//! provider mirror, the system's libraries and the few `/etc` files name resolution and TLS
//! need. It may write only its own data dir, plan dir, state dir and a private temp dir. The
//! daemon's AWS files, its database, other workdirs and the webhook secret stay out of reach.
//!
//! The ruleset is built in the parent (opening the allowed paths allocates and may fail with a
//! useful error) and only enforced in the child between fork and exec, which is two system
//! calls. Providers are terraform's children and inherit the domain.

use std::io;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
};

/// The newest Landlock ABI whose rights Karrots asks for: file reads, writes, `refer`,
/// `truncate` and device ioctls. Older kernels get what they support.
const TARGET_ABI: ABI = ABI::V5;

pub use crate::config::SandboxMode;

/// System paths every terraform process may read: libraries, CA certificates, time zones and
/// the files the resolver reads. Paths that do not exist on a machine are left out.
const SYSTEM_READ_ONLY: [&str; 17] = [
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/os-release",
];

/// Devices a process may open for reading and writing.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

/// What one process may touch, beyond [`SYSTEM_READ_ONLY`] and [`DEVICES`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxPolicy {
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "this kernel does not enforce Linux Landlock ({reason}), so terraform cannot be sandboxed; use a kernel with Landlock enabled (5.13 or later, lsm=landlock), or set `sandbox: off` in the daemon configuration to run without it"
    )]
    Unsupported { reason: String },
    #[error("building the sandbox for {path}: {message}")]
    Rules { path: String, message: String },
}

/// Fails unless this kernel enforces Landlock. The daemon calls it at start.
pub fn probe() -> Result<(), SandboxError> {
    let unsupported = |reason: String| SandboxError::Unsupported { reason };
    let ruleset = landlock::Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V1))
        .map_err(|e| unsupported(e.to_string()))?
        .create()
        .map_err(|e| unsupported(e.to_string()))?;
    drop(ruleset);
    Ok(())
}

impl SandboxPolicy {
    /// Builds the ruleset (in the parent). `describe` names the process in errors.
    pub fn prepare(&self, describe: &str) -> Result<PreparedSandbox, SandboxError> {
        let rules_error = |message: String| SandboxError::Rules {
            path: describe.to_string(),
            message,
        };
        let read = AccessFs::from_read(TARGET_ABI);
        let all = AccessFs::from_all(TARGET_ABI);
        let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
        for path in self.read_write.iter().chain(&self.read_only) {
            if !path.exists() {
                return Err(rules_error(format!("{} does not exist", path.display())));
            }
        }
        let ruleset = landlock::Ruleset::default()
            .handle_access(all)
            .and_then(|ruleset| ruleset.create())
            .and_then(|created| created.add_rules(path_beneath_rules(SYSTEM_READ_ONLY, read)))
            .and_then(|created| created.add_rules(path_beneath_rules(DEVICES, device)))
            .and_then(|created| created.add_rules(path_beneath_rules(&self.read_only, read)))
            .and_then(|created| created.add_rules(path_beneath_rules(&self.read_write, all)))
            .map_err(|e| rules_error(e.to_string()))?;
        Ok(PreparedSandbox(Some(ruleset)))
    }
}

/// A ruleset ready to be enforced in a child process.
#[derive(Debug)]
pub struct PreparedSandbox(Option<RulesetCreated>);

impl PreparedSandbox {
    /// Restricts the calling process. Runs in the child between fork and exec: it only makes
    /// the `prctl` and `landlock_restrict_self` calls. A kernel that enforces nothing is an
    /// error, so the child never starts unsandboxed by accident.
    pub fn enforce(&mut self) -> io::Result<()> {
        let ruleset = self
            .0
            .take()
            .ok_or_else(|| io::Error::other("the sandbox was already enforced"))?;
        let status = ruleset.restrict_self().map_err(io::Error::other)?;
        match status.ruleset {
            RulesetStatus::NotEnforced => Err(io::Error::other("Landlock enforced nothing")),
            RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => Ok(()),
        }
    }
}

/// The directories to give read access for one file (a binary, a config file): the file's
/// real path when it is a symlink, and the file itself.
pub fn with_real_path(path: &Path) -> Vec<PathBuf> {
    let mut paths = vec![path.to_path_buf()];
    if let Ok(real) = std::fs::canonicalize(path)
        && real != path
    {
        paths.push(real);
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_modes_parse() {
        assert_eq!(SandboxMode::parse("landlock"), Ok(SandboxMode::Landlock));
        assert_eq!(SandboxMode::parse("off"), Ok(SandboxMode::Off));
        assert!(SandboxMode::parse("seccomp").is_err());
    }

    #[test]
    fn a_missing_allowed_path_is_an_error_not_a_silent_gap() {
        let policy = SandboxPolicy {
            read_only: vec![PathBuf::from("/nonexistent/karrots-checkout")],
            read_write: vec![],
        };
        let error = policy.prepare("terraform plan").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("/nonexistent/karrots-checkout does not exist")
        );
    }
}
